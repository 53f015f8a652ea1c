/* Row-wise reductions: layer norm, softmax, L2 normalisation.
 * One work-group per row; the local size is a power of two and `scratch` holds
 * one float per work-item. Work-item `lid` handles columns lid, lid + lsize, ...
 * and always reads a column before writing it, so in-place use (y == x) is safe. */

/* Sum of v over the work-group (fixed tree order, so results are reproducible). */
static float group_sum(__local float *scratch, float v) {
    int lid = get_local_id(0);
    scratch[lid] = v;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int stride = get_local_size(0) / 2; stride > 0; stride >>= 1) {
        if (lid < stride)
            scratch[lid] += scratch[lid + stride];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    float total = scratch[0];
    barrier(CLK_LOCAL_MEM_FENCE); /* scratch is reused by the next reduction */
    return total;
}

static float group_max(__local float *scratch, float v) {
    int lid = get_local_id(0);
    scratch[lid] = v;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int stride = get_local_size(0) / 2; stride > 0; stride >>= 1) {
        if (lid < stride)
            scratch[lid] = fmax(scratch[lid], scratch[lid + stride]);
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    float best = scratch[0];
    barrier(CLK_LOCAL_MEM_FENCE);
    return best;
}

/* y = (x - mean) / sqrt(var + eps) * gamma + beta with the biased variance,
 * computed in two passes (mean, then squared deviations) like torch. */
__kernel void layer_norm(__global const float *x, const int x_off, __global const float *gamma,
                         const int gamma_off, __global const float *beta, const int beta_off,
                         __global float *y, const int y_off, const int rows, const int cols,
                         const float eps, __local float *scratch) {
    int row = get_group_id(0);
    if (row >= rows)
        return; /* uniform over the work-group */
    int lid = get_local_id(0);
    int lsize = get_local_size(0);
    __global const float *xr = x + x_off + row * cols;
    __global float *yr = y + y_off + row * cols;

    float acc = 0.0f;
    for (int c = lid; c < cols; c += lsize)
        acc += xr[c];
    float mean = group_sum(scratch, acc) / (float)cols;

    acc = 0.0f;
    for (int c = lid; c < cols; c += lsize) {
        float d = xr[c] - mean;
        acc += d * d;
    }
    float var = group_sum(scratch, acc) / (float)cols;
    float inv_std = 1.0f / sqrt(var + eps);

    for (int c = lid; c < cols; c += lsize)
        yr[c] = (xr[c] - mean) * inv_std * gamma[gamma_off + c] + beta[beta_off + c];
}

/* Softmax of scale * x over each row of length cols. With causal != 0, row r of
 * each [rows_per_block, cols] block (r = row % rows_per_block) only keeps columns
 * c <= r; the others are -inf before the softmax and 0 after it. */
__kernel void softmax(__global const float *x, const int x_off, __global float *y,
                      const int y_off, const int rows, const int rows_per_block, const int cols,
                      const float scale, const int causal, __local float *scratch) {
    int row = get_group_id(0);
    if (row >= rows)
        return;
    int lid = get_local_id(0);
    int lsize = get_local_size(0);
    __global const float *xr = x + x_off + row * cols;
    __global float *yr = y + y_off + row * cols;
    int valid = cols;
    if (causal)
        valid = min(cols, row % rows_per_block + 1);

    float m = -INFINITY;
    for (int c = lid; c < valid; c += lsize)
        m = fmax(m, xr[c] * scale);
    m = group_max(scratch, m);

    float acc = 0.0f;
    for (int c = lid; c < valid; c += lsize)
        acc += exp(xr[c] * scale - m);
    float total = group_sum(scratch, acc);

    for (int c = lid; c < cols; c += lsize)
        yr[c] = c < valid ? exp(xr[c] * scale - m) / total : 0.0f;
}

/* y = x / max(||x||_2, 1e-12) per row (torch.nn.functional.normalize). */
__kernel void l2_normalize(__global const float *x, const int x_off, __global float *y,
                           const int y_off, const int rows, const int cols,
                           __local float *scratch) {
    int row = get_group_id(0);
    if (row >= rows)
        return;
    int lid = get_local_id(0);
    int lsize = get_local_size(0);
    __global const float *xr = x + x_off + row * cols;
    __global float *yr = y + y_off + row * cols;

    float acc = 0.0f;
    for (int c = lid; c < cols; c += lsize)
        acc += xr[c] * xr[c];
    float norm = fmax(sqrt(group_sum(scratch, acc)), 1e-12f);

    for (int c = lid; c < cols; c += lsize)
        yr[c] = xr[c] / norm;
}
