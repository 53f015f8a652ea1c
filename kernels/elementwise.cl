/* Elementwise kernels: activations, additions, broadcasts.
 * Tensors are (buffer, element offset) pairs; every kernel bounds-checks its
 * global id because clh_launch rounds global sizes up. */

/* y = x * sigmoid(1.702 x)  (CLIP's QuickGELU) */
__kernel void quick_gelu(__global const float *x, const int x_off, __global float *y,
                         const int y_off, const int n) {
    int i = get_global_id(0);
    if (i >= n)
        return;
    float v = x[x_off + i];
    y[y_off + i] = v / (1.0f + exp(-1.702f * v));
}

/* Phi(x) = 0.5 erfc(-x / sqrt 2), the normal CDF, for the exact-erf GELU. The built-in erf /
 * erfc are branchy scalar code on CPU devices (5x to 15x slower on PoCL); here erfc(a),
 * a = |x| / sqrt 2, is the Chebyshev fit t exp(-a^2 + P(t)), t = 1 / (1 + a / 2) (Numerical
 * Recipes' erfcc, fractional error < 1.2e-7 in exact arithmetic; measured in float against
 * double erfc: Phi relative error <= 1.2e-6 for x >= -6, |GELU error| <= 7e-8 (1 + |y|)).
 * It keeps relative accuracy in the left tail, where 1 + erf(x / sqrt 2) would cancel.
 * a^2 = x^2 / 2 is taken as hi + lo (exact with fma) so that exp(-a^2) stays accurate for
 * large |x|. Branch-free, so it vectorises across work-items. */
static float gelu_normal_cdf(float x) {
    float a = fabs(x) * 0.70710678118654752f;
    float t = 1.0f / (1.0f + 0.5f * a);
    float p = fma(t, 0.17087277f, -0.82215223f);
    p = fma(t, p, 1.48851587f);
    p = fma(t, p, -1.13520398f);
    p = fma(t, p, 0.27886807f);
    p = fma(t, p, -0.18628806f);
    p = fma(t, p, 0.09678418f);
    p = fma(t, p, 0.37409196f);
    p = fma(t, p, 1.00002368f);
    p = fma(t, p, -1.26551223f);
    float hi = x * x, lo = fma(x, x, -hi);
    float r = 0.5f * t * exp(fma(-0.5f, hi, fma(-0.5f, lo, p))); /* Phi(-|x|) */
    return x <= 0.0f ? r : 1.0f - r;
}

/* y = x Phi(x) = 0.5 x (1 + erf(x / sqrt(2)))  (exact GELU, torch's approximate="none") */
__kernel void gelu(__global const float *x, const int x_off, __global float *y, const int y_off,
                   const int n) {
    int i = get_global_id(0);
    if (i >= n)
        return;
    float v = x[x_off + i];
    y[y_off + i] = v * gelu_normal_cdf(v);
}

/* y = a + b (y may alias a or b: each item reads before it writes its own element) */
__kernel void add(__global const float *a, const int a_off, __global const float *b,
                  const int b_off, __global float *y, const int y_off, const int n) {
    int i = get_global_id(0);
    if (i >= n)
        return;
    y[y_off + i] = a[a_off + i] + b[b_off + i];
}

/* x[r, c] += bias[c]; 2-D range (cols, rows) */
__kernel void add_bias(__global float *x, const int x_off, __global const float *bias,
                       const int bias_off, const int rows, const int cols) {
    int c = get_global_id(0);
    int r = get_global_id(1);
    if (c >= cols || r >= rows)
        return;
    x[x_off + r * cols + c] += bias[bias_off + c];
}

/* y[r, c] = bias[c]; 2-D range (cols, rows). Seeds a GEMM with beta = 1. */
__kernel void broadcast_rows(__global float *y, const int y_off, __global const float *bias,
                             const int bias_off, const int rows, const int cols) {
    int c = get_global_id(0);
    int r = get_global_id(1);
    if (c >= cols || r >= rows)
        return;
    y[y_off + r * cols + c] = bias[bias_off + c];
}

/* x[n, j] += rows[j] for j < period (= L*D); 2-D range (period, batch) */
__kernel void add_rows(__global float *x, const int x_off, __global const float *rows,
                       const int rows_off, const int batch, const int period) {
    int j = get_global_id(0);
    int n = get_global_id(1);
    if (j >= period || n >= batch)
        return;
    x[x_off + n * period + j] += rows[rows_off + j];
}
