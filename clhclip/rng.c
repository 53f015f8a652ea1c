/* Counter-based random numbers: the i-th 64-bit output of seed s is SplitMix64's
 * finaliser applied to s + (i + 1) * golden-ratio increment, which is exactly
 * Steele, Lea & Flood's SplitMix64 sequence started from state s. The whole state is
 * (seed, counter), so a checkpoint stores two integers and a restored generator
 * continues bit-identically; nothing depends on threads or devices.
 *
 * Uniforms take the top 53 bits (multiples of 2^-53 in [0, 1)). Normals use the
 * Box-Muller transform, cosine branch: z = sqrt(-2 ln(1 - u1)) cos(2 pi u2) from two
 * consecutive outputs, so every normal advances the counter by exactly 2 and no
 * spare value is cached outside the state. clh_rng_fill_normal uses both branches of
 * each pair (x[2k] = r cos, x[2k+1] = r sin), still 2 counters per pair, and the
 * cosine branch for an odd last element. The transcendental functions are libm's in
 * double; the fp32 results are the same on every IEEE platform save for a last-bit
 * difference of a libm on rare inputs. */
#include <math.h>

#include "hclip.h"

#define SPLITMIX_GAMMA 0x9E3779B97F4A7C15ULL
#define TWO_PI         6.283185307179586476925286766559

static uint64_t splitmix_finalise(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

void clh_rng_seed(clh_rng *rng, uint64_t seed) {
    rng->seed = seed;
    rng->counter = 0;
}

uint64_t clh_rng_next_u64(clh_rng *rng) {
    rng->counter++;
    return splitmix_finalise(rng->seed + rng->counter * SPLITMIX_GAMMA);
}

double clh_rng_uniform(clh_rng *rng) {
    return (double)(clh_rng_next_u64(rng) >> 11) * 0x1.0p-53;
}

/* Radius and angle of one Box-Muller pair; 1 - u lies in (0, 1], so the log is finite. */
static void box_muller_pair(clh_rng *rng, double *radius, double *angle) {
    double u1 = clh_rng_uniform(rng);
    double u2 = clh_rng_uniform(rng);
    *radius = sqrt(-2.0 * log(1.0 - u1));
    *angle = TWO_PI * u2;
}

double clh_rng_normal(clh_rng *rng) {
    double r, a;
    box_muller_pair(rng, &r, &a);
    return r * cos(a);
}

void clh_rng_fill_normal(clh_rng *rng, float *x, size_t n, float std) {
    double r, a;
    size_t i = 0;
    for (; i + 1 < n; i += 2) {
        box_muller_pair(rng, &r, &a);
        x[i] = (float)(std * r * cos(a));
        x[i + 1] = (float)(std * r * sin(a));
    }
    if (i < n)
        x[i] = (float)(std * clh_rng_normal(rng));
}
