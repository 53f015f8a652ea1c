/* Procedural segmentation dataset for demos: textured backgrounds (one kind, or two split
 * by a random line) plus 1-4 coloured shapes, with exact per-pixel labels. Every image
 * depends only on (seed, image index). */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "data.h"
#include "hclip.h"
#include "internal.h"

#define PI 3.14159265358979323846

enum { GRASS, SAND, WATER, N_BACKGROUNDS };
enum { CIRCLE = N_BACKGROUNDS, SQUARE, TRIANGLE, STAR, CROSS, N_CLASSES };

/* Names a CLIP text encoder tokenizes as plain words; the shape and colour of each
 * object kind go together, so either cue identifies the class. */
static const char *const class_names[N_CLASSES] = {"grass",      "sand",        "water",
                                                   "red circle", "blue square", "yellow triangle",
                                                   "white star", "black cross"};

static const uint8_t object_colors[N_CLASSES - N_BACKGROUNDS][3] = {
    {210, 40, 40}, {40, 70, 215}, {235, 210, 40}, {245, 245, 245}, {25, 25, 25}};

int clh_procedural_class_count(void) {
    return N_CLASSES;
}

const char *clh_procedural_class_name(int id) {
    return id >= 0 && id < N_CLASSES ? class_names[id] : NULL;
}

static uint64_t hash3(uint64_t seed, uint64_t a, uint64_t b) {
    uint64_t z = seed ^ (a * 0x9E3779B97F4A7C15ULL) ^ (b * 0xC2B2AE3D27D4EB4FULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* Per-pixel noise in [-1, 1). */
static double pixel_noise(uint64_t seed, int x, int y) {
    return (double)(hash3(seed, (uint64_t)x, (uint64_t)y) >> 11) * 0x1.0p-52 - 1.0;
}

static uint8_t to_u8(double v) {
    return (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v + 0.5);
}

typedef struct canvas {
    int size;
    uint8_t *rgb;
    int32_t *ids;
    uint64_t noise_seed;
    double jitter[3]; /* per-image colour shift */
} canvas;

static void background_color(const canvas *cv, int kind, int x, int y, double phase, double *rgb) {
    double n = pixel_noise(cv->noise_seed, x, y);
    double coarse = pixel_noise(cv->noise_seed ^ 0x5151, x / 3, y / 3);
    switch (kind) {
        case GRASS: { /* green, coarse blades plus fine noise */
            double streak = 18 * pixel_noise(cv->noise_seed ^ 0x77, x, y / 6);
            rgb[0] = 60 + 15 * coarse + 10 * n;
            rgb[1] = 140 + 25 * coarse + streak + 10 * n;
            rgb[2] = 45 + 10 * coarse + 8 * n;
            break;
        }
        case SAND: /* tan, fine grain */
            rgb[0] = 205 + 14 * n;
            rgb[1] = 178 + 14 * n;
            rgb[2] = 125 + 12 * n;
            break;
        default: { /* water: blue with waves */
            double wave = sin(0.35 * x + 1.3 * sin(0.12 * y + phase) + phase);
            rgb[0] = 35 + 10 * wave + 5 * n;
            rgb[1] = 95 + 20 * wave + 6 * n;
            rgb[2] = 175 + 30 * wave + 8 * n;
            break;
        }
    }
}

/* Background: one kind, or two kinds on either side of a random line. */
static void draw_background(canvas *cv, clh_rng *rng) {
    int a = (int)(clh_rng_uniform(rng) * N_BACKGROUNDS) % N_BACKGROUNDS;
    int b = a;
    if (clh_rng_uniform(rng) < 0.5)
        b = (a + 1 + (int)(clh_rng_uniform(rng) * (N_BACKGROUNDS - 1))) % N_BACKGROUNDS;
    double angle = clh_rng_uniform(rng) * 2 * PI, nx = cos(angle), ny = sin(angle);
    double offset = (clh_rng_uniform(rng) - 0.5) * 0.6 * cv->size;
    double phase = clh_rng_uniform(rng) * 2 * PI, c = 0.5 * cv->size;
    for (int y = 0; y < cv->size; y++)
        for (int x = 0; x < cv->size; x++) {
            int kind = ((x - c) * nx + (y - c) * ny > offset) ? b : a;
            double rgb[3];
            background_color(cv, kind, x, y, phase, rgb);
            size_t i = (size_t)y * cv->size + x;
            for (int k = 0; k < 3; k++)
                cv->rgb[3 * i + k] = to_u8(rgb[k] + cv->jitter[k]);
            cv->ids[i] = kind;
        }
}

/* Even-odd point-in-polygon test. */
static int in_polygon(const double *vx, const double *vy, int n, double x, double y) {
    int inside = 0;
    for (int i = 0, j = n - 1; i < n; j = i++)
        if ((vy[i] > y) != (vy[j] > y) &&
            x < (vx[j] - vx[i]) * (y - vy[i]) / (vy[j] - vy[i]) + vx[i])
            inside = !inside;
    return inside;
}

#define MAX_VERTS 12

/* Polygon of a shape of radius 1 centred at 0, rotated by `rot`. */
static int shape_polygon(int kind, double rot, double *vx, double *vy) {
    static const double cross[MAX_VERTS][2] = {{-0.3, -1},  {0.3, -1},  {0.3, -0.3}, {1, -0.3},
                                               {1, 0.3},    {0.3, 0.3}, {0.3, 1},    {-0.3, 1},
                                               {-0.3, 0.3}, {-1, 0.3},  {-1, -0.3},  {-0.3, -0.3}};
    int n = 0;
    double px[MAX_VERTS], py[MAX_VERTS];
    if (kind == SQUARE || kind == TRIANGLE || kind == STAR) {
        n = kind == SQUARE ? 4 : kind == TRIANGLE ? 3 : 10;
        for (int i = 0; i < n; i++) {
            double t = -PI / 2 + 2 * PI * i / n + (kind == SQUARE ? PI / 4 : 0);
            double r = kind == STAR && (i & 1) ? 0.45 : 1.0;
            px[i] = r * cos(t);
            py[i] = r * sin(t);
        }
    } else {
        n = MAX_VERTS;
        for (int i = 0; i < n; i++) {
            px[i] = cross[i][0];
            py[i] = cross[i][1];
        }
    }
    for (int i = 0; i < n; i++) {
        vx[i] = px[i] * cos(rot) - py[i] * sin(rot);
        vy[i] = px[i] * sin(rot) + py[i] * cos(rot);
    }
    return n;
}

static void draw_object(canvas *cv, clh_rng *rng, int index) {
    int kind = N_BACKGROUNDS + (int)(clh_rng_uniform(rng) * (N_CLASSES - N_BACKGROUNDS));
    if (kind >= N_CLASSES)
        kind = N_CLASSES - 1;
    double s = cv->size, r = s * (0.13 + 0.13 * clh_rng_uniform(rng));
    double cx = s * (0.1 + 0.8 * clh_rng_uniform(rng)), cy = s * (0.1 + 0.8 * clh_rng_uniform(rng));
    /* Triangles and stars stay upright-ish so their shape reads as the name says. */
    double rot = (clh_rng_uniform(rng) - 0.5) * (kind == SQUARE || kind == CROSS ? PI / 2 : 0.5);
    double vx[MAX_VERTS], vy[MAX_VERTS];
    int nv = kind == CIRCLE ? 0 : shape_polygon(kind, rot, vx, vy);
    double tint[3];
    for (int k = 0; k < 3; k++)
        tint[k] = object_colors[kind - N_BACKGROUNDS][k] + 24 * (clh_rng_uniform(rng) - 0.5);
    uint64_t noise = cv->noise_seed ^ (0xABCDULL * (uint64_t)(index + 1));
    int x0 = (int)floor(cx - r), x1 = (int)ceil(cx + r), y0 = (int)floor(cy - r),
        y1 = (int)ceil(cy + r);
    for (int y = y0 < 0 ? 0 : y0; y <= y1 && y < cv->size; y++)
        for (int x = x0 < 0 ? 0 : x0; x <= x1 && x < cv->size; x++) {
            double dx = (x + 0.5 - cx) / r, dy = (y + 0.5 - cy) / r;
            int inside = kind == CIRCLE ? dx * dx + dy * dy <= 1.0 : in_polygon(vx, vy, nv, dx, dy);
            if (!inside)
                continue;
            double n = 8 * pixel_noise(noise, x, y);
            size_t i = (size_t)y * cv->size + x;
            for (int k = 0; k < 3; k++)
                cv->rgb[3 * i + k] = to_u8(tint[k] + n + cv->jitter[k]);
            cv->ids[i] = kind;
        }
}

static void render_image(canvas *cv, uint64_t seed, int index) {
    clh_rng rng;
    clh_rng_seed(&rng, hash3(seed, 0x50524F43ULL, (uint64_t)index));
    cv->noise_seed = clh_rng_next_u64(&rng);
    for (int k = 0; k < 3; k++)
        cv->jitter[k] = 16 * (clh_rng_uniform(&rng) - 0.5);
    draw_background(cv, &rng);
    int objects = 1 + (int)(clh_rng_uniform(&rng) * 4);
    for (int o = 0; o < objects && o < 4; o++)
        draw_object(cv, &rng, o);
}

static clh_status make_dir(const char *path) {
    if (mkdir(path, 0777) != 0 && errno != EEXIST)
        return clh_fail(NULL, CLH_ERR_IO, "cannot create folder '%s': %s", path, strerror(errno));
    struct stat st;
    if (stat(path, &st) != 0 || !S_ISDIR(st.st_mode))
        return clh_fail(NULL, CLH_ERR_IO, "'%s' exists and is not a folder", path);
    return CLH_OK;
}

static clh_status write_classes(const char *dir) {
    char path[4096];
    snprintf(path, sizeof path, "%s/classes.txt", dir);
    FILE *fp = fopen(path, "w");
    if (!fp)
        return clh_fail(NULL, CLH_ERR_IO, "cannot write '%s': %s", path, strerror(errno));
    for (int k = 0; k < N_CLASSES; k++)
        fprintf(fp, "%s\n", class_names[k]);
    if (fclose(fp) != 0)
        return clh_fail(NULL, CLH_ERR_IO, "cannot write '%s': %s", path, strerror(errno));
    return CLH_OK;
}

static clh_status write_all(const char *dir, const clh_procedural_options *opt, canvas *cv) {
    char path[4096];
    int digits = 4;
    for (int n = opt->n_images - 1; n >= 10000; n /= 10)
        digits++;
    for (int i = 0; i < opt->n_images; i++) {
        render_image(cv, opt->seed, i);
        if (snprintf(path, sizeof path, "%s/images/%0*d.png", dir, digits, i) >= (int)sizeof path)
            return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "procedural: path too long");
        CLH_TRY(clh_png_write(path, cv->rgb, cv->size, cv->size, 3));
        if (snprintf(path, sizeof path, "%s/labels/%0*d.png", dir, digits, i) >= (int)sizeof path)
            return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "procedural: path too long");
        CLH_TRY(clh_label_write_png(path, cv->ids, cv->size, cv->size));
    }
    return write_classes(dir);
}

clh_status clh_procedural_write(const char *dir, const clh_procedural_options *opt) {
    if (!dir || !opt || opt->n_images <= 0 || opt->size < 16 || opt->size > 4096 ||
        strlen(dir) > 3000)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT,
                        "clh_procedural_write: need a folder, n_images > 0 (got %d) and size "
                        "16..4096 (got %d)",
                        opt ? opt->n_images : 0, opt ? opt->size : 0);
    char sub[4096];
    CLH_TRY(make_dir(dir));
    snprintf(sub, sizeof sub, "%s/images", dir);
    CLH_TRY(make_dir(sub));
    snprintf(sub, sizeof sub, "%s/labels", dir);
    CLH_TRY(make_dir(sub));
    canvas cv = {.size = opt->size};
    size_t n = (size_t)opt->size * opt->size;
    cv.rgb = malloc(3 * n);
    cv.ids = malloc(n * sizeof *cv.ids);
    clh_status st = cv.rgb && cv.ids ? write_all(dir, opt, &cv)
                                     : clh_fail(NULL, CLH_ERR_OUT_OF_MEMORY,
                                                "clh_procedural_write: out of memory");
    free(cv.rgb);
    free(cv.ids);
    return st;
}
