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

/* y = 0.5 x (1 + erf(x / sqrt(2)))  (exact GELU, torch's approximate="none") */
__kernel void gelu(__global const float *x, const int x_off, __global float *y, const int y_off,
                   const int n) {
    int i = get_global_id(0);
    if (i >= n)
        return;
    float v = x[x_off + i];
    y[y_off + i] = 0.5f * v * (1.0f + erf(v * 0.70710678118654752f));
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
