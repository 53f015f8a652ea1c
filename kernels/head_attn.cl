/* Kernels of the CAT-Seg head's attention and utility ops (clhclip/head_attn.c): Swin window
 * attention, linear (elu + 1) attention, a 0213 permutation, row concatenation with
 * broadcast, row max and the per-class sigmoid BCE loss. fp32 tensors with an element offset
 * per tensor.
 *
 * Determinism: no atomics. Backward passes are gathers with fixed loop orders; reductions
 * use a fixed tree over a power-of-two work-group. */

/* Largest head width the attention kernels keep in private arrays (checked on the host). */
#define HATTN_MAX_HD 128

/* ------------------------------------------------------------------ window attention */

/* Geometry of one (sequence, window, head) block of the window attention. Windows are
 * numbered row-major over the rolled grid; position p of a window is row-major inside it. */
typedef struct hattn_win {
    int grid_h, grid_w, ws, shift, heads, dim, hd, n_wx, n_win;
} hattn_win;

static hattn_win hattn_win_make(int grid_h, int grid_w, int ws, int shift, int heads, int dim) {
    hattn_win g;
    g.grid_h = grid_h;
    g.grid_w = grid_w;
    g.ws = ws;
    g.shift = shift;
    g.heads = heads;
    g.dim = dim;
    g.hd = dim / heads;
    g.n_wx = grid_w / ws;
    g.n_win = (grid_h / ws) * g.n_wx;
    return g;
}

/* Which of the mask's three strips [0, G - ws), [G - ws, G - shift), [G - shift, G) the rolled
 * coordinate c lies in (0 without a shift). */
static int hattn_part(int c, int size, int ws, int shift) {
    if (shift == 0)
        return 0;
    return (c >= size - ws) + (c >= size - shift);
}

/* Walks the positions of one window in row-major order without divisions (they would cost
 * more than the head-width dot products on CPUs). */
typedef struct hattn_iter {
    int n, h, y0, x0, ly, lx;
    int row_y, part_y; /* first element of the original grid row; 3 * row strip */
} hattn_iter;

static void hattn_iter_row(const hattn_win *g, hattn_iter *it) {
    int ry = it->y0 + it->ly, oy = ry + g->shift;
    if (oy >= g->grid_h)
        oy -= g->grid_h;
    it->row_y = (it->n * g->grid_h + oy) * g->grid_w;
    it->part_y = 3 * hattn_part(ry, g->grid_h, g->ws, g->shift);
}

static hattn_iter hattn_iter_start(const hattn_win *g, int n, int w, int h) {
    hattn_iter it;
    it.n = n;
    it.h = h;
    it.y0 = (w / g->n_wx) * g->ws;
    it.x0 = (w % g->n_wx) * g->ws;
    it.ly = 0;
    it.lx = 0;
    hattn_iter_row(g, &it);
    return it;
}

static void hattn_iter_next(const hattn_win *g, hattn_iter *it) {
    if (++it->lx == g->ws) {
        it->lx = 0;
        it->ly++;
        hattn_iter_row(g, it);
    }
}

/* Element offset (without tensor offsets) of the current position's head row, and its mask
 * region. */
static int hattn_iter_at(const hattn_win *g, const hattn_iter *it, int *region) {
    int rx = it->x0 + it->lx, ox = rx + g->shift;
    if (ox >= g->grid_w)
        ox -= g->grid_w;
    *region = it->part_y + hattn_part(rx, g->grid_w, g->ws, g->shift);
    return (it->row_y + ox) * g->dim + it->h * g->hd;
}

/* Decompose a work-item id over (n, window, head, position); returns the iterator placed
 * at the work-item's own position. */
static hattn_iter hattn_win_item(const hattn_win *g, int gid, int *first) {
    int len = g->ws * g->ws, p = gid % len, rest = gid / len;
    int h = rest % g->heads;
    rest /= g->heads;
    hattn_iter it = hattn_iter_start(g, rest / g->n_win, rest % g->n_win, h);
    it.ly = p / g->ws;
    it.lx = p % g->ws;
    hattn_iter_row(g, &it);
    *first = gid - p; /* work-item id of position 0 of this block */
    return it;
}

static float hattn_dot(const float *a, __global const float *b, int n) {
    float s = 0.0f;
    for (int d = 0; d < n; d++)
        s += a[d] * b[d];
    return s;
}

/* One work-item per query and head: one pass over the window's keys with a running maximum
 * (online softmax), rescaling the partial sums when the maximum grows. */
__kernel void hattn_window_forward(__global const float *q, const int q_off,
                                   __global const float *k, const int k_off,
                                   __global const float *v, const int v_off, __global float *out,
                                   const int out_off, const int total, const int grid_h,
                                   const int grid_w, const int ws, const int shift, const int heads,
                                   const int dim, const float scale) {
    int gid = get_global_id(0);
    if (gid >= total)
        return;
    hattn_win g = hattn_win_make(grid_h, grid_w, ws, shift, heads, dim);
    int first, q_region, region;
    hattn_iter it = hattn_win_item(&g, gid, &first);
    int q_row = hattn_iter_at(&g, &it, &q_region);
    float qs[HATTN_MAX_HD], acc[HATTN_MAX_HD];
    for (int d = 0; d < g.hd; d++) {
        qs[d] = q[q_off + q_row + d] * scale;
        acc[d] = 0.0f;
    }
    it.ly = 0;
    it.lx = 0;
    hattn_iter_row(&g, &it);
    float m = -INFINITY, l = 0.0f;
    for (int j = 0; j < ws * ws; j++, hattn_iter_next(&g, &it)) {
        int row = hattn_iter_at(&g, &it, &region);
        float sc = hattn_dot(qs, k + k_off + row, g.hd) - (region != q_region ? 100.0f : 0.0f);
        if (sc > m) {
            float c = exp(m - sc); /* 0 on the first key */
            l *= c;
            for (int d = 0; d < g.hd; d++)
                acc[d] *= c;
            m = sc;
        }
        float e = exp(sc - m);
        l += e;
        __global const float *vr = v + v_off + row;
        for (int d = 0; d < g.hd; d++)
            acc[d] += e * vr[d];
    }
    float inv = 1.0f / l;
    for (int d = 0; d < g.hd; d++)
        out[out_off + q_row + d] = acc[d] * inv;
}

/* Backward, query side: per query i, lse_i = log sum_j exp(s_ij), D_i = sum_j P_ij dP_ij with
 * dP_ij = dout_i . v_j (one online pass), then dq_i = scale sum_j P_ij (dP_ij - D_i) k_j.
 * (lse, D) go to stats[2 gid] for the key side. */
__kernel void hattn_window_backward_q(__global const float *q, const int q_off,
                                      __global const float *k, const int k_off,
                                      __global const float *v, const int v_off,
                                      __global const float *dout, const int dout_off,
                                      __global float *dq, const int dq_off, __global float *stats,
                                      const int stats_off, const int total, const int grid_h,
                                      const int grid_w, const int ws, const int shift,
                                      const int heads, const int dim, const float scale) {
    int gid = get_global_id(0);
    if (gid >= total)
        return;
    hattn_win g = hattn_win_make(grid_h, grid_w, ws, shift, heads, dim);
    int first, q_region, region;
    hattn_iter it = hattn_win_item(&g, gid, &first);
    int q_row = hattn_iter_at(&g, &it, &q_region);
    float qs[HATTN_MAX_HD], go[HATTN_MAX_HD], acc[HATTN_MAX_HD];
    for (int d = 0; d < g.hd; d++) {
        qs[d] = q[q_off + q_row + d] * scale;
        go[d] = dout[dout_off + q_row + d];
        acc[d] = 0.0f;
    }
    hattn_iter start = it;
    start.ly = 0;
    start.lx = 0;
    hattn_iter_row(&g, &start);
    it = start;
    float m = -INFINITY, l = 0.0f, dsum = 0.0f;
    for (int j = 0; j < ws * ws; j++, hattn_iter_next(&g, &it)) {
        int row = hattn_iter_at(&g, &it, &region);
        float sc = hattn_dot(qs, k + k_off + row, g.hd) - (region != q_region ? 100.0f : 0.0f);
        if (sc > m) {
            float c = exp(m - sc);
            l *= c;
            dsum *= c;
            m = sc;
        }
        float e = exp(sc - m);
        l += e;
        dsum += e * hattn_dot(go, v + v_off + row, g.hd);
    }
    float lse = m + log(l), delta = dsum / l;
    it = start;
    for (int j = 0; j < ws * ws; j++, hattn_iter_next(&g, &it)) {
        int row = hattn_iter_at(&g, &it, &region);
        float sc = hattn_dot(qs, k + k_off + row, g.hd) - (region != q_region ? 100.0f : 0.0f);
        float ds = exp(sc - lse) * (hattn_dot(go, v + v_off + row, g.hd) - delta);
        __global const float *kr = k + k_off + row;
        for (int d = 0; d < g.hd; d++)
            acc[d] += ds * kr[d];
    }
    for (int d = 0; d < g.hd; d++)
        dq[dq_off + q_row + d] = acc[d] * scale;
    stats[stats_off + 2 * gid] = lse;
    stats[stats_off + 2 * gid + 1] = delta;
}

/* Backward, key side: per key j, dv_j = sum_i P_ij dout_i and
 * dk_j = scale sum_i P_ij (dP_ij - D_i) q_i, with P recomputed from lse. */
__kernel void hattn_window_backward_kv(
    __global const float *q, const int q_off, __global const float *k, const int k_off,
    __global const float *v, const int v_off, __global const float *dout, const int dout_off,
    __global const float *stats, const int stats_off, __global float *dk, const int dk_off,
    __global float *dv, const int dv_off, const int total, const int grid_h, const int grid_w,
    const int ws, const int shift, const int heads, const int dim, const float scale) {
    int gid = get_global_id(0);
    if (gid >= total)
        return;
    hattn_win g = hattn_win_make(grid_h, grid_w, ws, shift, heads, dim);
    int first, k_region, region;
    hattn_iter it = hattn_win_item(&g, gid, &first);
    int k_row = hattn_iter_at(&g, &it, &k_region);
    float ks[HATTN_MAX_HD], vv[HATTN_MAX_HD], dka[HATTN_MAX_HD], dva[HATTN_MAX_HD];
    for (int d = 0; d < g.hd; d++) {
        ks[d] = k[k_off + k_row + d] * scale;
        vv[d] = v[v_off + k_row + d];
        dka[d] = 0.0f;
        dva[d] = 0.0f;
    }
    it.ly = 0;
    it.lx = 0;
    hattn_iter_row(&g, &it);
    __global const float *st = stats + stats_off + 2 * first;
    for (int i = 0; i < ws * ws; i++, hattn_iter_next(&g, &it)) {
        int row = hattn_iter_at(&g, &it, &region);
        __global const float *qr = q + q_off + row;
        __global const float *gr = dout + dout_off + row;
        float sc = hattn_dot(ks, qr, g.hd) - (region != k_region ? 100.0f : 0.0f);
        float pij = exp(sc - st[2 * i]);
        float ds = pij * (hattn_dot(vv, gr, g.hd) - st[2 * i + 1]) * scale;
        for (int d = 0; d < g.hd; d++) {
            dva[d] += pij * gr[d];
            dka[d] += ds * qr[d];
        }
    }
    for (int d = 0; d < g.hd; d++) {
        dk[dk_off + k_row + d] = dka[d];
        dv[dv_off + k_row + d] = dva[d];
    }
}

/* ---------------------------------------------------- window attention, CPU ("runs") path */

/* One work-group per (sequence, window, head) block, work-items looping over positions.
 * The block's keys and values are staged in local memory, transposed where the inner loop
 * runs over positions, so that every inner loop walks a contiguous run without division:
 * a CPU compiler vectorises those loops (per-item online softmax with private arrays does
 * not vectorise on CPUs). Each work-item keeps one row of scores in `scratch`
 * ([local size, P] floats, P = ws * ws). Block b = (n n_win + w) heads + h, as in the
 * per-item kernels, so the stats layout is shared. */

/* Cooperative staging: rows[p] = element offset of position p's head row (no tensor offset)
 * and regions[p] = its mask region. */
static void hattn_block_geometry(const hattn_win *g, int b, __local int *rows,
                                 __local int *regions) {
    int h = b % g->heads, nw = b / g->heads, n = nw / g->n_win, w = nw % g->n_win;
    int y0 = (w / g->n_wx) * g->ws, x0 = (w % g->n_wx) * g->ws, len = g->ws * g->ws;
    for (int p = get_local_id(0); p < len; p += get_local_size(0)) {
        int ry = y0 + p / g->ws, rx = x0 + p % g->ws;
        int oy = ry + g->shift, ox = rx + g->shift;
        oy -= oy >= g->grid_h ? g->grid_h : 0;
        ox -= ox >= g->grid_w ? g->grid_w : 0;
        rows[p] = ((n * g->grid_h + oy) * g->grid_w + ox) * g->dim + h * g->hd;
        regions[p] = 3 * hattn_part(ry, g->grid_h, g->ws, g->shift) +
                     hattn_part(rx, g->grid_w, g->ws, g->shift);
    }
}

/* Copies the block's head rows of x (after rows[] is visible): transposed [hd, P] into xt
 * and/or row-major [P, hd] into xr (either may be NULL). */
static void hattn_stage(__global const float *x, int off, __local const int *rows, int len, int hd,
                        __local float *xt, __local float *xr) {
    for (int p = get_local_id(0); p < len; p += get_local_size(0)) {
        __global const float *src = x + off + rows[p];
        for (int d = 0; d < hd; d++) {
            float val = src[d];
            if (xt)
                xt[d * len + p] = val;
            if (xr)
                xr[p * hd + d] = val;
        }
    }
}

/* t[j] = sum_d a[d] xt[d, j] * scale, d ascending (the per-item kernels' order): a is the
 * head row at a_row. Eight d at a time, added one after another, so that t[j] is loaded and
 * stored once per eight products without changing the order of the sum. */
static void hattn_dots_row(__global const float *a, int a_row, float scale, __local const float *xt,
                           int len, int hd, __local float *t) {
    for (int j = 0; j < len; j++)
        t[j] = 0.0f;
    int d = 0;
    for (; d + 8 <= hd; d += 8) {
        __global const float *ar = a + a_row + d;
        float a0 = ar[0] * scale, a1 = ar[1] * scale, a2 = ar[2] * scale, a3 = ar[3] * scale;
        float a4 = ar[4] * scale, a5 = ar[5] * scale, a6 = ar[6] * scale, a7 = ar[7] * scale;
        __local const float *x = xt + d * len;
        for (int j = 0; j < len; j++) {
            float acc = t[j] + a0 * x[j];
            acc += a1 * x[len + j];
            acc += a2 * x[2 * len + j];
            acc += a3 * x[3 * len + j];
            acc += a4 * x[4 * len + j];
            acc += a5 * x[5 * len + j];
            acc += a6 * x[6 * len + j];
            t[j] = acc + a7 * x[7 * len + j];
        }
    }
    for (; d < hd; d++) {
        float ad = a[a_row + d] * scale;
        __local const float *x = xt + d * len;
        for (int j = 0; j < len; j++)
            t[j] += ad * x[j];
    }
}

/* Scores of one query (or key) against the block: dots minus 100 where the region differs. */
static void hattn_scores_row(__global const float *a, int a_row, float scale,
                             __local const float *xt, __local const int *regions, int region,
                             int len, int hd, __local float *s) {
    hattn_dots_row(a, a_row, scale, xt, len, hd, s);
    for (int j = 0; j < len; j++)
        s[j] -= regions[j] != region ? 100.0f : 0.0f;
}

/* acc[0, hd) = sum_j w[j] xr[j, :], j ascending; four j at a time, added in order. */
static void hattn_mix_rows(__local const float *w, __local const float *xr, int len, int hd,
                           float *acc) {
    for (int e = 0; e < hd; e++)
        acc[e] = 0.0f;
    int j = 0;
    for (; j + 4 <= len; j += 4) {
        float w0 = w[j], w1 = w[j + 1], w2 = w[j + 2], w3 = w[j + 3];
        __local const float *r = xr + j * hd;
        for (int e = 0; e < hd; e++) {
            float sum = acc[e] + w0 * r[e];
            sum += w1 * r[hd + e];
            sum += w2 * r[2 * hd + e];
            acc[e] = sum + w3 * r[3 * hd + e];
        }
    }
    for (; j < len; j++) {
        float wj = w[j];
        __local const float *r = xr + j * hd;
        for (int e = 0; e < hd; e++)
            acc[e] += wj * r[e];
    }
}

/* Reductions of a row over eight interleaved partial results, so that the CPU compiler can
 * keep them in one vector register (a single running sum would serialise on the add
 * latency). The sum's order differs from a sequential one by roundings only. */
static float hattn_lanes_max(__local const float *s, int len) {
    float part[8] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY,
                     -INFINITY, -INFINITY, -INFINITY, -INFINITY};
    int j = 0;
    for (; j + 8 <= len; j += 8)
        for (int u = 0; u < 8; u++)
            part[u] = fmax(part[u], s[j + u]);
    float m = -INFINITY;
    for (; j < len; j++)
        m = fmax(m, s[j]);
    for (int u = 0; u < 8; u++)
        m = fmax(m, part[u]);
    return m;
}

/* sum_j a[j] * (b ? b[j] : 1). */
static float hattn_lanes_dot(__local const float *a, __local const float *b, int len) {
    float part[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    int j = 0;
    for (; j + 8 <= len; j += 8)
        for (int u = 0; u < 8; u++)
            part[u] += a[j + u] * (b ? b[j + u] : 1.0f);
    float sum = 0.0f;
    for (; j < len; j++)
        sum += a[j] * (b ? b[j] : 1.0f);
    for (int u = 0; u < 8; u++)
        sum += part[u];
    return sum;
}

/* exp(x) for the softmax numerators, x <= 0 (up to rounding; valid below 88): 2^n e^r with
 * n = rint(x / ln 2), r = x - n ln 2 (ln 2 in two parts) and e^r by its degree-7 Taylor
 * polynomial (|r| <= 0.35: relative error < 1e-8 before float rounding, about 2 ulp
 * after); 0 below -87 (the true value is under 2^-125). Branch-free, so it vectorises: the
 * built-in exp cost a third of the forward on PoCL. */
static float hattn_exp(float x) {
    float n = rint(x * 1.44269504088896341f);
    float r = fma(n, -0.693145751953125f, x);
    r = fma(n, -1.42860682030941723e-6f, r);
    float p = fma(r, 1.98412698e-4f, 1.38888889e-3f);
    p = fma(r, p, 8.33333333e-3f);
    p = fma(r, p, 4.16666667e-2f);
    p = fma(r, p, 1.66666667e-1f);
    p = fma(r, p, 0.5f);
    p = fma(r, p, 1.0f);
    p = fma(r, p, 1.0f);
    float scale = as_float((convert_int(fmax(n, -126.0f)) + 127) << 23);
    return x < -87.0f ? 0.0f : p * scale;
}

/* Softmax numerators in place: s[j] = exp(s[j] - max); returns max, *sum = sum of s. */
static float hattn_exp_row(__local float *s, int len, float *sum) {
    float m = hattn_lanes_max(s, len);
    for (int j = 0; j < len; j++)
        s[j] = hattn_exp(s[j] - m);
    *sum = hattn_lanes_dot(s, 0, len);
    return m;
}

/* Output row of query i (s: its score row). */
static void hattn_forward_query(__global const float *q, int q_off, __global float *out,
                                int out_off, float scale, __local const float *kt,
                                __local const float *vr, __local const int *rows,
                                __local const int *regions, int i, int len, int hd,
                                __local float *s) {
    float acc[HATTN_MAX_HD];
    hattn_scores_row(q, q_off + rows[i], scale, kt, regions, regions[i], len, hd, s);
    float l;
    hattn_exp_row(s, len, &l);
    hattn_mix_rows(s, vr, len, hd, acc);
    float inv = 1.0f / l;
    __global float *o = out + out_off + rows[i];
    for (int e = 0; e < hd; e++)
        o[e] = acc[e] * inv;
}

/* Local memory: kt [hd, P], vr [P, hd], rows and regions [P], scratch [local size, P]. */
__kernel void hattn_window_forward_runs(
    __global const float *q, const int q_off, __global const float *k, const int k_off,
    __global const float *v, const int v_off, __global float *out, const int out_off,
    const int blocks, const int grid_h, const int grid_w, const int ws, const int shift,
    const int heads, const int dim, const float scale, __local float *kt, __local float *vr,
    __local int *rows, __local int *regions, __local float *scratch) {
    int b = get_group_id(0);
    if (b >= blocks)
        return; /* uniform over the work-group */
    hattn_win g = hattn_win_make(grid_h, grid_w, ws, shift, heads, dim);
    int len = ws * ws, hd = g.hd;
    hattn_block_geometry(&g, b, rows, regions);
    barrier(CLK_LOCAL_MEM_FENCE);
    hattn_stage(k, k_off, rows, len, hd, kt, 0);
    hattn_stage(v, v_off, rows, len, hd, 0, vr);
    barrier(CLK_LOCAL_MEM_FENCE);
    __local float *s = scratch + get_local_id(0) * len;
    for (int i = get_local_id(0); i < len; i += get_local_size(0))
        hattn_forward_query(q, q_off, out, out_off, scale, kt, vr, rows, regions, i, len, hd, s);
}
/* Query side of the backward (see hattn_window_backward_q). Local memory: kt, vt [hd, P],
 * kr [P, hd], rows and regions [P], scratch [2 local size, P] (P, then dP). */
__kernel void hattn_window_backward_q_runs(
    __global const float *q, const int q_off, __global const float *k, const int k_off,
    __global const float *v, const int v_off, __global const float *dout, const int dout_off,
    __global float *dq, const int dq_off, __global float *stats, const int stats_off,
    const int blocks, const int grid_h, const int grid_w, const int ws, const int shift,
    const int heads, const int dim, const float scale, __local float *kt, __local float *vt,
    __local float *kr, __local int *rows, __local int *regions, __local float *scratch) {
    int b = get_group_id(0);
    if (b >= blocks)
        return; /* uniform over the work-group */
    hattn_win g = hattn_win_make(grid_h, grid_w, ws, shift, heads, dim);
    int len = ws * ws, hd = g.hd;
    hattn_block_geometry(&g, b, rows, regions);
    barrier(CLK_LOCAL_MEM_FENCE);
    hattn_stage(k, k_off, rows, len, hd, kt, kr);
    hattn_stage(v, v_off, rows, len, hd, vt, 0);
    barrier(CLK_LOCAL_MEM_FENCE);
    __local float *p = scratch + 2 * get_local_id(0) * len, *dp = p + len;
    float acc[HATTN_MAX_HD];
    for (int i = get_local_id(0); i < len; i += get_local_size(0)) {
        hattn_scores_row(q, q_off + rows[i], scale, kt, regions, regions[i], len, hd, p);
        float l, m = hattn_exp_row(p, len, &l);
        hattn_dots_row(dout, dout_off + rows[i], 1.0f, vt, len, hd, dp);
        float inv = 1.0f / l, delta = hattn_lanes_dot(p, dp, len) * inv;
        for (int j = 0; j < len; j++)
            p[j] = p[j] * inv * (dp[j] - delta); /* now dS */
        hattn_mix_rows(p, kr, len, hd, acc);
        __global float *o = dq + dq_off + rows[i];
        for (int e = 0; e < hd; e++)
            o[e] = acc[e] * scale;
        int st = stats_off + 2 * (b * len + i);
        stats[st] = m + log(l);
        stats[st + 1] = delta;
    }
}

/* Key side of the backward (see hattn_window_backward_kv). Local memory: qt, gt [hd, P],
 * qr, gr [P, hd], rows and regions [P], lse and delta [P], scratch [2 local size, P]. */
__kernel void hattn_window_backward_kv_runs(
    __global const float *q, const int q_off, __global const float *k, const int k_off,
    __global const float *v, const int v_off, __global const float *dout, const int dout_off,
    __global const float *stats, const int stats_off, __global float *dk, const int dk_off,
    __global float *dv, const int dv_off, const int blocks, const int grid_h, const int grid_w,
    const int ws, const int shift, const int heads, const int dim, const float scale,
    __local float *qt, __local float *gt, __local float *qr, __local float *gr, __local int *rows,
    __local int *regions, __local float *lse, __local float *delta, __local float *scratch) {
    int b = get_group_id(0);
    if (b >= blocks)
        return; /* uniform over the work-group */
    hattn_win g = hattn_win_make(grid_h, grid_w, ws, shift, heads, dim);
    int len = ws * ws, hd = g.hd;
    hattn_block_geometry(&g, b, rows, regions);
    for (int i = get_local_id(0); i < len; i += get_local_size(0)) {
        lse[i] = stats[stats_off + 2 * (b * len + i)];
        delta[i] = stats[stats_off + 2 * (b * len + i) + 1];
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    hattn_stage(q, q_off, rows, len, hd, qt, qr);
    hattn_stage(dout, dout_off, rows, len, hd, gt, gr);
    barrier(CLK_LOCAL_MEM_FENCE);
    __local float *p = scratch + 2 * get_local_id(0) * len, *ds = p + len;
    float dka[HATTN_MAX_HD], dva[HATTN_MAX_HD];
    for (int j = get_local_id(0); j < len; j += get_local_size(0)) {
        hattn_scores_row(k, k_off + rows[j], scale, qt, regions, regions[j], len, hd, p);
        hattn_dots_row(v, v_off + rows[j], 1.0f, gt, len, hd, ds);
        for (int i = 0; i < len; i++) {
            float pij = hattn_exp(p[i] - lse[i]);
            p[i] = pij;
            ds[i] = pij * (ds[i] - delta[i]) * scale;
        }
        hattn_mix_rows(p, gr, len, hd, dva);
        hattn_mix_rows(ds, qr, len, hd, dka);
        __global float *ok = dk + dk_off + rows[j], *ov = dv + dv_off + rows[j];
        for (int e = 0; e < hd; e++) {
            ok[e] = dka[e];
            ov[e] = dva[e];
        }
    }
}

/* ------------------------------------------------------------------ linear attention */

/* phi(x) = elu(x) + 1 and its derivative. */
static float hattn_phi(float x) {
    return x > 0.0f ? x + 1.0f : exp(x);
}

static float hattn_dphi(float x) {
    return x > 0.0f ? 1.0f : exp(x);
}

/* kv[(n heads + h), d, e] = sum_s phi(k[n, s, h hd + d]) v[n, s, h hd + e] for e < hd and
 * the key sum phi(k) at e = hd: one work-item per (n, h, d), row of hd + 1 floats. */
__kernel void hattn_linear_kv(__global const float *k, const int k_off, __global const float *v,
                              const int v_off, __global float *kv, const int kv_off,
                              const int total, const int seq, const int heads, const int dim) {
    int gid = get_global_id(0);
    if (gid >= total)
        return;
    int hd = dim / heads, d = gid % hd, nh = gid / hd, h = nh % heads, n = nh / heads;
    float acc[HATTN_MAX_HD + 1];
    for (int e = 0; e <= hd; e++)
        acc[e] = 0.0f;
    for (int s = 0; s < seq; s++) {
        int row = (n * seq + s) * dim + h * hd;
        float kf = hattn_phi(k[k_off + row + d]);
        for (int e = 0; e < hd; e++)
            acc[e] += kf * v[v_off + row + e];
        acc[hd] += kf;
    }
    for (int e = 0; e <= hd; e++)
        kv[kv_off + gid * (hd + 1) + e] = acc[e];
}

/* Work-item order (n, h, s): neighbours share the same kv block. */
static void hattn_lin_item(int gid, int seq, int heads, int *n, int *h, int *s) {
    *s = gid % seq;
    int nh = gid / seq;
    *h = nh % heads;
    *n = nh / heads;
}

/* out_s = phi(q_s) kv / (phi(q_s) . ksum + eps): one work-item per (n, h, s). With
 * backward != 0 it also computes dq from dout and stores (1 / den, dden) in stats[2 gid]:
 * dnum = dout / den, dden = -(dout . out) / den,
 * dq = phi'(q) (kv dnum + dden ksum). */
__kernel void hattn_linear_rows(__global const float *q, const int q_off, __global const float *kv,
                                const int kv_off, const float eps, __global float *out,
                                const int out_off, const int backward, __global const float *dout,
                                const int dout_off, __global float *stats, const int stats_off,
                                const int total, const int seq, const int heads, const int dim) {
    int gid = get_global_id(0);
    if (gid >= total)
        return;
    int n, h, s, hd = dim / heads;
    hattn_lin_item(gid, seq, heads, &n, &h, &s);
    int row = (n * seq + s) * dim + h * hd;
    __global const float *blk = kv + kv_off + (n * heads + h) * hd * (hd + 1);
    float qf[HATTN_MAX_HD], num[HATTN_MAX_HD];
    float den = eps;
    for (int e = 0; e < hd; e++)
        num[e] = 0.0f;
    for (int d = 0; d < hd; d++) {
        qf[d] = hattn_phi(q[q_off + row + d]);
        __global const float *kr = blk + d * (hd + 1);
        for (int e = 0; e < hd; e++)
            num[e] += qf[d] * kr[e];
        den += qf[d] * kr[hd];
    }
    float rden = 1.0f / den;
    if (!backward) {
        for (int e = 0; e < hd; e++)
            out[out_off + row + e] = num[e] * rden;
        return;
    }
    float dot = 0.0f;
    for (int e = 0; e < hd; e++) {
        num[e] *= rden; /* now out_s */
        dot += dout[dout_off + row + e] * num[e];
    }
    float dden = -dot * rden;
    for (int e = 0; e < hd; e++)
        num[e] = dout[dout_off + row + e] * rden; /* now dnum */
    for (int d = 0; d < hd; d++) {
        __global const float *kr = blk + d * (hd + 1);
        float acc = dden * kr[hd];
        for (int e = 0; e < hd; e++)
            acc += kr[e] * num[e];
        out[out_off + row + d] = acc * hattn_dphi(q[q_off + row + d]); /* out is dq here */
    }
    stats[stats_off + 2 * gid] = rden;
    stats[stats_off + 2 * gid + 1] = dden;
}

/* dkv[(n heads + h), d, e] = sum_s phi(q_s[d]) dout_s[e] / den_s for e < hd and
 * dksum[d] = sum_s phi(q_s[d]) dden_s at e = hd: one work-item per (n, h, d). */
__kernel void hattn_linear_dkv(__global const float *q, const int q_off, __global const float *dout,
                               const int dout_off, __global const float *stats, const int stats_off,
                               __global float *dkv, const int dkv_off, const int total,
                               const int seq, const int heads, const int dim) {
    int gid = get_global_id(0);
    if (gid >= total)
        return;
    int hd = dim / heads, d = gid % hd, nh = gid / hd, h = nh % heads, n = nh / heads;
    float acc[HATTN_MAX_HD + 1];
    for (int e = 0; e <= hd; e++)
        acc[e] = 0.0f;
    for (int s = 0; s < seq; s++) {
        int row = (n * seq + s) * dim + h * hd;
        int st = stats_off + 2 * (nh * seq + s);
        float qf = hattn_phi(q[q_off + row + d]);
        float w = qf * stats[st];
        for (int e = 0; e < hd; e++)
            acc[e] += w * dout[dout_off + row + e];
        acc[hd] += qf * stats[st + 1];
    }
    for (int e = 0; e <= hd; e++)
        dkv[dkv_off + gid * (hd + 1) + e] = acc[e];
}

/* Per key j (work-item order (n, h, j)): dk_j = phi'(k_j) (dkv v_j + dksum) and
 * dv_j = dkv^T phi(k_j). */
__kernel void hattn_linear_dkdv(__global const float *k, const int k_off, __global const float *v,
                                const int v_off, __global const float *dkv, const int dkv_off,
                                __global float *dk, const int dk_off, __global float *dv,
                                const int dv_off, const int total, const int seq, const int heads,
                                const int dim) {
    int gid = get_global_id(0);
    if (gid >= total)
        return;
    int n, h, s, hd = dim / heads;
    hattn_lin_item(gid, seq, heads, &n, &h, &s);
    int row = (n * seq + s) * dim + h * hd;
    __global const float *blk = dkv + dkv_off + (n * heads + h) * hd * (hd + 1);
    float vv[HATTN_MAX_HD], acc[HATTN_MAX_HD];
    for (int e = 0; e < hd; e++) {
        vv[e] = v[v_off + row + e];
        acc[e] = 0.0f;
    }
    for (int d = 0; d < hd; d++) {
        __global const float *gr = blk + d * (hd + 1);
        float kx = k[k_off + row + d], kf = hattn_phi(kx), g = gr[hd];
        for (int e = 0; e < hd; e++) {
            g += gr[e] * vv[e];
            acc[e] += kf * gr[e];
        }
        dk[dk_off + row + d] = g * hattn_dphi(kx);
    }
    for (int e = 0; e < hd; e++)
        dv[dv_off + row + e] = acc[e];
}

/* ------------------------------------------------------------------ permutation */

/* y[a, c, b, d] = x[a, b, c, d]: one work-item per element of y. */
__kernel void hattn_permute_0213(__global const float *x, const int x_off, __global float *y,
                                 const int y_off, const int d1, const int d2, const int d3,
                                 const int total) {
    int idx = get_global_id(0);
    if (idx >= total)
        return;
    int d = idx % d3, rest = idx / d3;
    int b = rest % d1;
    rest /= d1;
    int c = rest % d2, a = rest / d2;
    y[y_off + idx] = x[x_off + ((a * d1 + b) * d2 + c) * d3 + d];
}

/* The same for long runs (d3 large): one work-item copies a run of d3 elements, so that the
 * index arithmetic is paid once per run. 1-D range over d0 * d2 * d1 runs of y. */
__kernel void hattn_permute_runs(__global const float *x, const int x_off, __global float *y,
                                 const int y_off, const int d1, const int d2, const int d3,
                                 const int runs) {
    int r = get_global_id(0);
    if (r >= runs)
        return;
    int b = r % d1, rest = r / d1;
    int c = rest % d2, a = rest / d2;
    __global const float *src = x + x_off + ((a * d1 + b) * d2 + c) * d3;
    __global float *dst = y + y_off + r * d3;
    for (int d = 0; d < d3; d++)
        dst[d] = src[d];
}

#define HATTN_TILE 16

/* Batched transpose x [d0, rows, cols] -> y [d0, cols, rows] through a 16 x 17 local tile
 * (both the reads and the writes run along rows). Local size (16, 16); dimension 0 covers
 * the columns, dimension 1 d0 * (rows rounded up to 16). */
__kernel void hattn_transpose_tiles(__global const float *x, const int x_off, __global float *y,
                                    const int y_off, const int rows, const int cols) {
    __local float tile[HATTN_TILE][HATTN_TILE + 1];
    int lx = get_local_id(0), ly = get_local_id(1);
    int row_tiles = (rows + HATTN_TILE - 1) / HATTN_TILE;
    int a = get_group_id(1) / row_tiles, r0 = (get_group_id(1) % row_tiles) * HATTN_TILE;
    int c0 = get_group_id(0) * HATTN_TILE;
    int base = a * rows * cols;
    if (r0 + ly < rows && c0 + lx < cols)
        tile[ly][lx] = x[x_off + base + (r0 + ly) * cols + c0 + lx];
    barrier(CLK_LOCAL_MEM_FENCE);
    if (c0 + ly < cols && r0 + lx < rows)
        y[y_off + base + (c0 + ly) * rows + r0 + lx] = tile[lx][ly];
}

/* ------------------------------------------------------------------ row concatenation */

/* y row r = (o repeat + t) inner + i is [a row r | b row o inner + i]: one work-item per
 * element of y. */
__kernel void hattn_concat_rows(__global const float *a, const int a_off, __global const float *b,
                                const int b_off, __global float *y, const int y_off, const int ca,
                                const int cb, const int repeat, const int inner, const int total) {
    int idx = get_global_id(0);
    if (idx >= total)
        return;
    int width = ca + cb, r = idx / width, c = idx % width;
    if (c < ca) {
        y[y_off + idx] = a[a_off + r * ca + c];
        return;
    }
    int i = r % inner, o = r / (inner * repeat);
    y[y_off + idx] = b[b_off + (o * inner + i) * cb + c - ca];
}

/* da = the first ca columns of dy. */
__kernel void hattn_concat_rows_da(__global const float *dy, const int dy_off, __global float *da,
                                   const int da_off, const int ca, const int cb, const int total) {
    int idx = get_global_id(0);
    if (idx >= total)
        return;
    int r = idx / ca, c = idx % ca;
    da[da_off + idx] = dy[dy_off + r * (ca + cb) + c];
}

/* db[o inner + i, c] = sum over t of dy[(o repeat + t) inner + i, ca + c] (t ascending). */
__kernel void hattn_concat_rows_db(__global const float *dy, const int dy_off, __global float *db,
                                   const int db_off, const int ca, const int cb, const int repeat,
                                   const int inner, const int total) {
    int idx = get_global_id(0);
    if (idx >= total)
        return;
    int c = idx % cb, rb = idx / cb, i = rb % inner, o = rb / inner;
    float acc = 0.0f;
    for (int t = 0; t < repeat; t++)
        acc += dy[dy_off + ((o * repeat + t) * inner + i) * (ca + cb) + ca + c];
    db[db_off + idx] = acc;
}

/* CPU variants ("runs" kernels): one work-item per run of up to HATTN_RUN contiguous
 * elements of a row, so the index arithmetic (divisions) is paid once per run and the copy
 * loops vectorise. 1-D ranges over rows * runs_per_row. */
#define HATTN_RUN 256

/* y row r: columns [lo, hi) of [a row r | b row o inner + i] (see hattn_concat_rows). */
__kernel void hattn_concat_rows_runs(__global const float *a, const int a_off,
                                     __global const float *b, const int b_off, __global float *y,
                                     const int y_off, const int ca, const int cb, const int repeat,
                                     const int inner, const int rows, const int runs_per_row) {
    int gid = get_global_id(0);
    if (gid >= rows * runs_per_row)
        return;
    int r = gid / runs_per_row, width = ca + cb;
    int lo = (gid - r * runs_per_row) * HATTN_RUN, hi = min(lo + HATTN_RUN, width);
    __global float *dst = y + y_off + r * width;
    __global const float *src_a = a + a_off + r * ca;
    for (int c = lo; c < min(hi, ca); c++)
        dst[c] = src_a[c];
    int o = r / (inner * repeat), i = r % inner;
    __global const float *src_b = b + b_off + (o * inner + i) * cb;
    for (int c = max(lo, ca); c < hi; c++)
        dst[c] = src_b[c - ca];
}

/* da row r, columns [lo, hi) = dy row r, same columns. */
__kernel void hattn_concat_rows_da_runs(__global const float *dy, const int dy_off,
                                        __global float *da, const int da_off, const int ca,
                                        const int cb, const int rows, const int runs_per_row) {
    int gid = get_global_id(0);
    if (gid >= rows * runs_per_row)
        return;
    int r = gid / runs_per_row;
    int lo = (gid - r * runs_per_row) * HATTN_RUN, hi = min(lo + HATTN_RUN, ca);
    __global const float *src = dy + dy_off + r * (ca + cb);
    __global float *dst = da + da_off + r * ca;
    for (int c = lo; c < hi; c++)
        dst[c] = src[c];
}

/* db row rb = o inner + i, columns [lo, hi): the sum over t ascending, accumulated in db
 * itself (the same order and roundings as hattn_concat_rows_db). */
__kernel void hattn_concat_rows_db_runs(__global const float *dy, const int dy_off,
                                        __global float *db, const int db_off, const int ca,
                                        const int cb, const int repeat, const int inner,
                                        const int rows, const int runs_per_row) {
    int gid = get_global_id(0);
    if (gid >= rows * runs_per_row)
        return;
    int rb = gid / runs_per_row, i = rb % inner, o = rb / inner;
    int lo = (gid - rb * runs_per_row) * HATTN_RUN, hi = min(lo + HATTN_RUN, cb);
    __global float *dst = db + db_off + rb * cb;
    for (int c = lo; c < hi; c++)
        dst[c] = 0.0f;
    for (int t = 0; t < repeat; t++) {
        __global const float *src = dy + dy_off + ((o * repeat + t) * inner + i) * (ca + cb) + ca;
        for (int c = lo; c < hi; c++)
            dst[c] += src[c];
    }
}

/* ------------------------------------------------------------------ row max */

/* y[r] = max over the row: one work-group per row, strided maxima then a fixed tree. */
__kernel void hattn_row_max(__global const float *x, const int x_off, __global float *y,
                            const int y_off, const int rows, const int cols,
                            __local float *scratch) {
    int r = get_group_id(0), lid = get_local_id(0), size = get_local_size(0);
    if (r >= rows)
        return; /* uniform over the work-group */
    float m = -INFINITY;
    for (int c = lid; c < cols; c += size)
        m = fmax(m, x[x_off + r * cols + c]);
    scratch[lid] = m;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int stride = size / 2; stride > 0; stride >>= 1) {
        if (lid < stride)
            scratch[lid] = fmax(scratch[lid], scratch[lid + stride]);
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    if (lid == 0)
        y[y_off + r] = scratch[0];
}

/* ------------------------------------------------------------------ BCE loss */

/* Per-class sigmoid BCE with logits over [batch, classes, pixels]; target = (label == c).
 * One work-item per (b, pixel): its label is read once and it walks the classes (neighbouring
 * work-items read neighbouring pixels). The group sums with a fixed tree into
 * partial[group]. Elements of ignored pixels count unless exclude. With write_grad,
 * dlogits = (sigmoid(x) - target) * inv_count (0 where excluded). */
__kernel void hattn_bce_loss(__global const float *logits, const int logits_off,
                             __global const int *labels, const int classes, const int pixels,
                             const int items, const int ignore_label, const int exclude,
                             const float inv_count, const int write_grad, __global float *dlogits,
                             const int dlogits_off, __global float *partial, const int partial_off,
                             __local float *scratch) {
    int gid = get_global_id(0), lid = get_local_id(0), size = get_local_size(0);
    float acc = 0.0f;
    if (gid < items) {
        int label = labels[gid], b = gid / pixels, p = gid % pixels;
        int skip = exclude && label == ignore_label;
        int e = b * classes * pixels + p;
        for (int c = 0; c < classes; c++, e += pixels) {
            float x = logits[logits_off + e], grad = 0.0f;
            if (!skip) {
                float t = label == c ? 1.0f : 0.0f;
                float z = exp(-fabs(x)); /* in (0, 1]: no overflow */
                acc += fmax(x, 0.0f) - x * t + log1p(z);
                float sig = x >= 0.0f ? 1.0f / (1.0f + z) : z / (1.0f + z);
                grad = (sig - t) * inv_count;
            }
            if (write_grad)
                dlogits[dlogits_off + e] = grad;
        }
    }
    scratch[lid] = acc;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int stride = size / 2; stride > 0; stride >>= 1) {
        if (lid < stride)
            scratch[lid] += scratch[lid + stride];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    if (lid == 0)
        partial[partial_off + get_group_id(0)] = scratch[0];
}
