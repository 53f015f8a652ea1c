/* Backward kernels: row-wise gradients (layer norm, softmax, L2 normalisation),
 * activation derivatives, two-stage column sums for bias/gain gradients, a
 * deterministic row scatter-add, and small vector helpers (axpy, scale, sum of squares).
 *
 * Determinism: no float atomics anywhere. Row reductions use a fixed tree over the
 * work-group; column sums first reduce fixed tiles of rows in row order (one work-item
 * per column and tile), then sum the tiles in tile order. Every result therefore
 * depends only on the shapes and the device, never on scheduling. */

/* Sum of v over the work-group (fixed tree order); the local size is a power of two. */
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

/* ------------------------------------------------------------------ column sums */

/* partial[t, c] = sum of src[r, c] over the rows r of tile t (rows_per_tile rows each,
 * in row order). 2-D range (cols, tiles). */
__kernel void col_sums_partial(__global const float *src, const int src_off, const int rows,
                               const int cols, const int rows_per_tile, const int tiles,
                               __global float *partial, const int partial_off) {
    int c = get_global_id(0);
    int t = get_global_id(1);
    if (c >= cols || t >= tiles)
        return;
    int end = min(rows, (t + 1) * rows_per_tile);
    float acc = 0.0f;
    for (int r = t * rows_per_tile; r < end; r++)
        acc += src[src_off + r * cols + c];
    partial[partial_off + t * cols + c] = acc;
}

/* out[c] += sum over tiles of partial[t, c] (tile order). 1-D range (cols). */
__kernel void col_sums_finish(__global const float *partial, const int partial_off,
                              const int tiles, const int cols, __global float *out,
                              const int out_off) {
    int c = get_global_id(0);
    if (c >= cols)
        return;
    float acc = 0.0f;
    for (int t = 0; t < tiles; t++)
        acc += partial[partial_off + t * cols + c];
    out[out_off + c] += acc;
}

/* ------------------------------------------------------------------ layer norm */

/* One work-group per row: recompute mean and 1/std exactly as the forward does (two
 * passes, biased variance), store them in stats[row] = (mean, rstd) for the parameter
 * gradients and, when write_dx != 0, write
 *   dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),  g = dy * gamma,
 *   xhat = (x - mean) * rstd. */
__kernel void layer_norm_backward_rows(__global const float *x, const int x_off,
                                       __global const float *gamma, const int gamma_off,
                                       __global const float *dy, const int dy_off,
                                       __global float *dx, const int dx_off,
                                       __global float *stats, const int stats_off,
                                       const int rows, const int cols, const float eps,
                                       const int write_dx, __local float *scratch) {
    int row = get_group_id(0);
    if (row >= rows)
        return; /* uniform over the work-group */
    int lid = get_local_id(0);
    int lsize = get_local_size(0);
    __global const float *xr = x + x_off + row * cols;
    __global const float *dyr = dy + dy_off + row * cols;

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
    float rstd = 1.0f / sqrt(var + eps);
    if (lid == 0) {
        stats[stats_off + 2 * row] = mean;
        stats[stats_off + 2 * row + 1] = rstd;
    }
    if (!write_dx)
        return;

    float sum_g = 0.0f, sum_gx = 0.0f;
    for (int c = lid; c < cols; c += lsize) {
        float g = dyr[c] * gamma[gamma_off + c];
        sum_g += g;
        sum_gx += g * (xr[c] - mean) * rstd;
    }
    float mean_g = group_sum(scratch, sum_g) / (float)cols;
    float mean_gx = group_sum(scratch, sum_gx) / (float)cols;
    __global float *dxr = dx + dx_off + row * cols;
    for (int c = lid; c < cols; c += lsize) {
        float xhat = (xr[c] - mean) * rstd;
        dxr[c] = rstd * (dyr[c] * gamma[gamma_off + c] - mean_g - xhat * mean_gx);
    }
}

/* Tile partial sums of dgamma (dy * xhat) into partial[t, c] and of dbeta (dy) into
 * partial[tiles + t, c]. 2-D range (cols, tiles). */
__kernel void layer_norm_param_partial(__global const float *x, const int x_off,
                                       __global const float *dy, const int dy_off,
                                       __global const float *stats, const int stats_off,
                                       const int rows, const int cols, const int rows_per_tile,
                                       const int tiles, __global float *partial,
                                       const int partial_off) {
    int c = get_global_id(0);
    int t = get_global_id(1);
    if (c >= cols || t >= tiles)
        return;
    int end = min(rows, (t + 1) * rows_per_tile);
    float acc_gamma = 0.0f, acc_beta = 0.0f;
    for (int r = t * rows_per_tile; r < end; r++) {
        float mean = stats[stats_off + 2 * r], rstd = stats[stats_off + 2 * r + 1];
        float g = dy[dy_off + r * cols + c];
        acc_gamma += g * (x[x_off + r * cols + c] - mean) * rstd;
        acc_beta += g;
    }
    partial[partial_off + t * cols + c] = acc_gamma;
    partial[partial_off + (tiles + t) * cols + c] = acc_beta;
}

/* ------------------------------------------------------------------ softmax, L2 norm */

/* dx = scale * y * (dy - sum(dy * y)) per row. Each work-item reads its columns
 * before writing them, so dx may alias dy or y. */
__kernel void softmax_backward_rows(__global const float *y, const int y_off,
                                    __global const float *dy, const int dy_off,
                                    __global float *dx, const int dx_off, const int rows,
                                    const int cols, const float scale, __local float *scratch) {
    int row = get_group_id(0);
    if (row >= rows)
        return;
    int lid = get_local_id(0);
    int lsize = get_local_size(0);
    __global const float *yr = y + y_off + row * cols;
    __global const float *dyr = dy + dy_off + row * cols;
    __global float *dxr = dx + dx_off + row * cols;
    float acc = 0.0f;
    for (int c = lid; c < cols; c += lsize)
        acc += dyr[c] * yr[c];
    float dot = group_sum(scratch, acc);
    for (int c = lid; c < cols; c += lsize)
        dxr[c] = scale * yr[c] * (dyr[c] - dot);
}

/* Backward of y = x / max(||x||, 1e-12): with n = ||x|| above the clamp,
 * dx = (dy - x (x . dy) / n^2) / n; at the clamp y = x / 1e-12 is linear: dx = dy / 1e-12.
 * dx may alias dy or x (reads before writes, per column). */
__kernel void l2_normalize_backward_rows(__global const float *x, const int x_off,
                                         __global const float *dy, const int dy_off,
                                         __global float *dx, const int dx_off, const int rows,
                                         const int cols, __local float *scratch) {
    int row = get_group_id(0);
    if (row >= rows)
        return;
    int lid = get_local_id(0);
    int lsize = get_local_size(0);
    __global const float *xr = x + x_off + row * cols;
    __global const float *dyr = dy + dy_off + row * cols;
    __global float *dxr = dx + dx_off + row * cols;
    float sq = 0.0f, dot = 0.0f;
    for (int c = lid; c < cols; c += lsize) {
        sq += xr[c] * xr[c];
        dot += xr[c] * dyr[c];
    }
    float norm = sqrt(group_sum(scratch, sq));
    dot = group_sum(scratch, dot);
    if (norm > 1e-12f) {
        float inv = 1.0f / norm;
        float proj = dot * inv * inv;
        for (int c = lid; c < cols; c += lsize)
            dxr[c] = (dyr[c] - xr[c] * proj) * inv;
    } else {
        for (int c = lid; c < cols; c += lsize)
            dxr[c] = dyr[c] * 1e12f;
    }
}

/* ------------------------------------------------------------------ one row per work-item
 * Variants of the three row kernels above for CPU devices, where work-group barriers are
 * costly (the forward's *_item kernels in norm.cl explain the choice). Each work-item owns
 * one row; sums keep 16 strided partial sums (float16 lanes) added in group_sum's tree order,
 * then the tail columns. Per column, reads come before writes, so the same aliasing is
 * allowed as above. */

static float lanes_sum(float16 v) {
    float8 a = v.lo + v.hi;
    float4 b = a.lo + a.hi;
    float2 c = b.lo + b.hi;
    return c.lo + c.hi;
}

__kernel void layer_norm_backward_item(__global const float *x, const int x_off,
                                       __global const float *gamma, const int gamma_off,
                                       __global const float *dy, const int dy_off,
                                       __global float *dx, const int dx_off,
                                       __global float *stats, const int stats_off,
                                       const int rows, const int cols, const float eps,
                                       const int write_dx) {
    int row = get_global_id(0);
    if (row >= rows)
        return;
    __global const float *xr = x + x_off + row * cols;
    __global const float *dyr = dy + dy_off + row * cols;
    __global const float *gr = gamma + gamma_off;
    int full = cols & ~15;

    float16 acc = (float16)(0.0f);
    for (int c = 0; c < full; c += 16)
        acc += vload16(0, xr + c);
    float tail = 0.0f;
    for (int c = full; c < cols; c++)
        tail += xr[c];
    float mean = (lanes_sum(acc) + tail) / (float)cols;

    acc = (float16)(0.0f);
    for (int c = 0; c < full; c += 16) {
        float16 d = vload16(0, xr + c) - mean;
        acc += d * d;
    }
    tail = 0.0f;
    for (int c = full; c < cols; c++) {
        float d = xr[c] - mean;
        tail += d * d;
    }
    float var = (lanes_sum(acc) + tail) / (float)cols;
    float rstd = 1.0f / sqrt(var + eps);
    stats[stats_off + 2 * row] = mean;
    stats[stats_off + 2 * row + 1] = rstd;
    if (!write_dx)
        return;

    float16 acc_g = (float16)(0.0f), acc_gx = (float16)(0.0f);
    for (int c = 0; c < full; c += 16) {
        float16 g = vload16(0, dyr + c) * vload16(0, gr + c);
        acc_g += g;
        acc_gx += g * (vload16(0, xr + c) - mean) * rstd;
    }
    float tail_g = 0.0f, tail_gx = 0.0f;
    for (int c = full; c < cols; c++) {
        float g = dyr[c] * gr[c];
        tail_g += g;
        tail_gx += g * (xr[c] - mean) * rstd;
    }
    float mean_g = (lanes_sum(acc_g) + tail_g) / (float)cols;
    float mean_gx = (lanes_sum(acc_gx) + tail_gx) / (float)cols;
    __global float *dxr = dx + dx_off + row * cols;
    for (int c = 0; c < cols; c++) {
        float xhat = (xr[c] - mean) * rstd;
        dxr[c] = rstd * (dyr[c] * gr[c] - mean_g - xhat * mean_gx);
    }
}

__kernel void softmax_backward_item(__global const float *y, const int y_off,
                                    __global const float *dy, const int dy_off,
                                    __global float *dx, const int dx_off, const int rows,
                                    const int cols, const float scale) {
    int row = get_global_id(0);
    if (row >= rows)
        return;
    __global const float *yr = y + y_off + row * cols;
    __global const float *dyr = dy + dy_off + row * cols;
    __global float *dxr = dx + dx_off + row * cols;
    int full = cols & ~15;
    float16 acc = (float16)(0.0f);
    for (int c = 0; c < full; c += 16)
        acc += vload16(0, dyr + c) * vload16(0, yr + c);
    float tail = 0.0f;
    for (int c = full; c < cols; c++)
        tail += dyr[c] * yr[c];
    float dot = lanes_sum(acc) + tail;
    for (int c = 0; c < cols; c++)
        dxr[c] = scale * yr[c] * (dyr[c] - dot);
}

__kernel void l2_normalize_backward_item(__global const float *x, const int x_off,
                                         __global const float *dy, const int dy_off,
                                         __global float *dx, const int dx_off, const int rows,
                                         const int cols) {
    int row = get_global_id(0);
    if (row >= rows)
        return;
    __global const float *xr = x + x_off + row * cols;
    __global const float *dyr = dy + dy_off + row * cols;
    __global float *dxr = dx + dx_off + row * cols;
    int full = cols & ~15;
    float16 acc_sq = (float16)(0.0f), acc_dot = (float16)(0.0f);
    for (int c = 0; c < full; c += 16) {
        float16 v = vload16(0, xr + c);
        acc_sq += v * v;
        acc_dot += v * vload16(0, dyr + c);
    }
    float sq = 0.0f, dot = 0.0f;
    for (int c = full; c < cols; c++) {
        sq += xr[c] * xr[c];
        dot += xr[c] * dyr[c];
    }
    float norm = sqrt(lanes_sum(acc_sq) + sq);
    dot = lanes_sum(acc_dot) + dot;
    if (norm > 1e-12f) {
        float inv = 1.0f / norm;
        float proj = dot * inv * inv;
        for (int c = 0; c < cols; c++)
            dxr[c] = (dyr[c] - xr[c] * proj) * inv;
    } else {
        for (int c = 0; c < cols; c++)
            dxr[c] = dyr[c] * 1e12f;
    }
}

/* ------------------------------------------------------------------ activations */

/* f(x) = x s(x), s = sigmoid(1.702 x): f' = s (1 + 1.702 x (1 - s)). dx may alias dy. */
__kernel void quick_gelu_backward(__global const float *x, const int x_off,
                                  __global const float *dy, const int dy_off, __global float *dx,
                                  const int dx_off, const int n) {
    int i = get_global_id(0);
    if (i >= n)
        return;
    float v = x[x_off + i];
    float s = 1.0f / (1.0f + exp(-1.702f * v));
    dx[dx_off + i] = dy[dy_off + i] * s * (1.0f + 1.702f * v * (1.0f - s));
}

/* (Same as gelu_normal_cdf in elementwise.cl, a separate program.)
 * Phi(x) = 0.5 erfc(-x / sqrt 2), the normal CDF, for the exact-erf GELU. The built-in erf /
 * erfc are branchy scalar code on CPU devices (5x to 15x slower on PoCL); here erfc(a),
 * a = |x| / sqrt 2, is the Chebyshev fit t exp(-a^2 + P(t)), t = 1 / (1 + a / 2) (Numerical
 * Recipes' erfcc, fractional error < 1.2e-7 in exact arithmetic; measured in float against
 * double erfc: Phi relative error <= 1.2e-6 for x >= -6, |GELU error| <= 7e-8 (1 + |y|)).
 * It keeps relative accuracy in the left tail, where 1 + erf(x / sqrt 2) would cancel.
 * a^2 = x^2 / 2 is taken as hi + lo (exact with fma) so that exp(-a^2) stays accurate for
 * large |x|. Branch-free, so it vectorises across work-items. */
static float gelu_bwd_normal_cdf(float x) {
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

/* f(x) = x Phi(x): f' = Phi(x) + x phi(x). dx may alias dy. */
__kernel void gelu_backward(__global const float *x, const int x_off, __global const float *dy,
                            const int dy_off, __global float *dx, const int dx_off, const int n) {
    int i = get_global_id(0);
    if (i >= n)
        return;
    float v = x[x_off + i];
    float cdf = gelu_bwd_normal_cdf(v);
    float pdf = 0.39894228040143268f * exp(-0.5f * v * v);
    dx[dx_off + i] = dy[dy_off + i] * (cdf + v * pdf);
}

/* ------------------------------------------------------------------ scatter-add */

/* Rows grouped by target on the host: lists = [targets (n_targets) | starts (n_targets + 1)
 * | sources]. Target row targets[j] receives dy rows sources[starts[j] .. starts[j+1]) in
 * that (ascending) order, so repeated indices add up exactly as a sequential loop would.
 * 2-D range (cols, n_targets). */
__kernel void scatter_add_rows(__global const float *dy, const int dy_off,
                               __global const int *lists, __global float *dx, const int dx_off,
                               const int n_targets, const int cols) {
    int c = get_global_id(0);
    int j = get_global_id(1);
    if (c >= cols || j >= n_targets)
        return;
    __global const int *starts = lists + n_targets;
    __global const int *sources = starts + n_targets + 1;
    int target = lists[j];
    float acc = dx[dx_off + target * cols + c];
    for (int s = starts[j]; s < starts[j + 1]; s++)
        acc += dy[dy_off + sources[s] * cols + c];
    dx[dx_off + target * cols + c] = acc;
}

/* ------------------------------------------------------------------ vector helpers */

/* y += alpha x (x may alias y). */
__kernel void axpy(__global const float *x, const int x_off, __global float *y, const int y_off,
                   const float alpha, const int n) {
    int i = get_global_id(0);
    if (i >= n)
        return;
    y[y_off + i] += alpha * x[x_off + i];
}

/* x *= alpha */
__kernel void scale_elements(__global float *x, const int x_off, const float alpha,
                             const int n) {
    int i = get_global_id(0);
    if (i >= n)
        return;
    x[x_off + i] *= alpha;
}

/* partial[g] = sum of x[i]^2 over chunk g = [g * chunk, (g + 1) * chunk), one work-group
 * per chunk, tree-reduced. The host adds the partial sums in double. */
__kernel void sum_squares_partial(__global const float *x, const int x_off, const int n,
                                  const int chunk, const int groups, __global float *partial,
                                  const int partial_off, __local float *scratch) {
    int g = get_group_id(0);
    if (g >= groups)
        return;
    int lid = get_local_id(0);
    int lsize = get_local_size(0);
    int begin = g * chunk;
    int end = min(n, begin + chunk);
    float acc = 0.0f;
    for (int i = begin + lid; i < end; i += lsize) {
        float v = x[x_off + i];
        acc += v * v;
    }
    float total = group_sum(scratch, acc);
    if (lid == 0)
        partial[partial_off + g] = total;
}
