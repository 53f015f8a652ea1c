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

/* ------------------------------------------------------------------ one row per work-item
 * Variants of the kernels above for CPU devices, where work-group barriers are costly:
 * each work-item owns one whole row and walks it with float16 vectors, using the same
 * two-pass formulas. Sums keep 16 strided partial sums (lane j holds columns j, j + 16, ...)
 * added in the same tree order as group_sum with 16 work-items, then the tail columns, so
 * they stay close to the group kernels' pairwise-like rounding rather than a long serial
 * sum. A row is read and written only by its own work-item, so in-place use is safe. */

static float lanes_sum(float16 v) {
    float8 a = v.lo + v.hi;
    float4 b = a.lo + a.hi;
    float2 c = b.lo + b.hi;
    return c.lo + c.hi;
}

static float lanes_max(float16 v) {
    float8 a = fmax(v.lo, v.hi);
    float4 b = fmax(a.lo, a.hi);
    float2 c = fmax(b.lo, b.hi);
    return fmax(c.lo, c.hi);
}

static float row_sum(__global const float *xr, int cols) {
    int full = cols & ~15;
    float16 acc = (float16)(0.0f);
    for (int c = 0; c < full; c += 16)
        acc += vload16(0, xr + c);
    float tail = 0.0f;
    for (int c = full; c < cols; c++)
        tail += xr[c];
    return lanes_sum(acc) + tail;
}

static float row_sum_sq_dev(__global const float *xr, int cols, float mean) {
    int full = cols & ~15;
    float16 acc = (float16)(0.0f);
    for (int c = 0; c < full; c += 16) {
        float16 d = vload16(0, xr + c) - mean;
        acc += d * d;
    }
    float tail = 0.0f;
    for (int c = full; c < cols; c++) {
        float d = xr[c] - mean;
        tail += d * d;
    }
    return lanes_sum(acc) + tail;
}

__kernel void layer_norm_item(__global const float *x, const int x_off,
                              __global const float *gamma, const int gamma_off,
                              __global const float *beta, const int beta_off, __global float *y,
                              const int y_off, const int rows, const int cols, const float eps) {
    int row = get_global_id(0);
    if (row >= rows)
        return;
    __global const float *xr = x + x_off + row * cols;
    __global float *yr = y + y_off + row * cols;
    __global const float *g = gamma + gamma_off;
    __global const float *b = beta + beta_off;

    float mean = row_sum(xr, cols) / (float)cols;
    float var = row_sum_sq_dev(xr, cols, mean) / (float)cols;
    float inv_std = 1.0f / sqrt(var + eps);

    for (int c = 0; c < cols; c++)
        yr[c] = (xr[c] - mean) * inv_std * g[c] + b[c];
}

/* Same contract as softmax. The exponentials are stored in the row on the second pass
 * and divided by their sum on the third, so each is computed once. */
__kernel void softmax_item(__global const float *x, const int x_off, __global float *y,
                           const int y_off, const int rows, const int rows_per_block,
                           const int cols, const float scale, const int causal) {
    int row = get_global_id(0);
    if (row >= rows)
        return;
    __global const float *xr = x + x_off + row * cols;
    __global float *yr = y + y_off + row * cols;
    int valid = cols;
    if (causal)
        valid = min(cols, row % rows_per_block + 1);
    int full = valid & ~15;

    float16 m16 = (float16)(-INFINITY);
    for (int c = 0; c < full; c += 16)
        m16 = fmax(m16, vload16(0, xr + c) * scale);
    float m = lanes_max(m16);
    for (int c = full; c < valid; c++)
        m = fmax(m, xr[c] * scale);

    float16 acc = (float16)(0.0f);
    for (int c = 0; c < full; c += 16) {
        float16 e = exp(vload16(0, xr + c) * scale - m);
        vstore16(e, 0, yr + c);
        acc += e;
    }
    float tail = 0.0f;
    for (int c = full; c < valid; c++) {
        float e = exp(xr[c] * scale - m);
        yr[c] = e;
        tail += e;
    }
    float total = lanes_sum(acc) + tail;

    for (int c = 0; c < valid; c++)
        yr[c] = yr[c] / total;
    for (int c = valid; c < cols; c++)
        yr[c] = 0.0f;
}

static float row_sum_sq(__global const float *xr, int cols) {
    int full = cols & ~15;
    float16 acc = (float16)(0.0f);
    for (int c = 0; c < full; c += 16) {
        float16 v = vload16(0, xr + c);
        acc += v * v;
    }
    float tail = 0.0f;
    for (int c = full; c < cols; c++)
        tail += xr[c] * xr[c];
    return lanes_sum(acc) + tail;
}

__kernel void l2_normalize_item(__global const float *x, const int x_off, __global float *y,
                                const int y_off, const int rows, const int cols) {
    int row = get_global_id(0);
    if (row >= rows)
        return;
    __global const float *xr = x + x_off + row * cols;
    __global float *yr = y + y_off + row * cols;

    float norm = fmax(sqrt(row_sum_sq(xr, cols)), 1e-12f);
    for (int c = 0; c < cols; c++)
        yr[c] = xr[c] / norm;
}
