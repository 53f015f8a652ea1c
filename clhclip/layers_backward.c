/* Backward layers (hclip.h "layers (backward)"): argument and shape checks on the host,
 * the work in kernels/backward.cl, the forward kernels (split/merge heads, softmax) and
 * CLBlast (gemm.c). Gradients of inputs are overwritten, gradients of parameters are
 * accumulated, NULL gradient outputs are skipped. No float atomics: column sums are
 * two-stage (fixed row tiles, then the tiles in order), so results are reproducible. */
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hclip.h"
#include "layer_util.h"

/* ------------------------------------------------------------------ checks
 * (the same conventions and messages as layers.c) */

/* ------------------------------------------------------------------ launch helpers */

/* One work-group per row (or chunk); args[nargs - 1] is the CLH_KLOCAL slot, sized here. */
static clh_status launch_groups(clh_ctx *ctx, const char *kernel, size_t groups, int nargs,
                                clh_karg *args) {
    size_t local[1];
    CLH_TRY(clh_row_group_size(ctx, kernel, local));
    size_t global[1] = {groups * local[0]};
    args[nargs - 1] = (clh_karg)CLH_KLOCAL(local[0] * sizeof(float));
    return clh_launch(ctx, kernel, 1, global, local, nargs, args);
}

/* Column sums are reduced over tiles of rows. The tiling depends on the row count only
 * (at least 16 rows a tile, at most about 256 tiles), so the summation order, hence
 * the result, is the same on every device. */
static void row_tiles(size_t rows, size_t *rows_per_tile, size_t *tiles) {
    size_t per = (rows + 255) / 256;
    if (per < 16)
        per = 16;
    *rows_per_tile = per;
    *tiles = (rows + per - 1) / per;
}

/* out[c] += partial[t, c] summed over tiles; partial starts at element `first` of buf. */
static clh_status finish_col_sums(clh_ctx *ctx, const clh_tensor *buf, size_t first, size_t tiles,
                                  size_t cols, clh_tensor *out) {
    int off = (int)(buf->offset + first), tiles_i = (int)tiles, cols_i = (int)cols;
    clh_karg args[] = {CLH_KARG(buf->mem), CLH_KARG(off), CLH_KARG(tiles_i), CLH_KARG(cols_i),
                       CLH_KTENSOR(out)};
    return clh_launch_1d(ctx, "col_sums_finish", cols, NARGS(args), args);
}

/* out[c] += sum over rows of src[r, c] (two stages through a workspace tensor). */
static clh_status col_sums_core(clh_ctx *ctx, const clh_tensor *src, size_t rows, size_t cols,
                                clh_tensor *out, clh_tensor **partial) {
    size_t per, tiles;
    row_tiles(rows, &per, &tiles);
    int64_t shape[2] = {(int64_t)tiles, (int64_t)cols};
    CLH_TRY(clh_ws_tensor(ctx, 2, shape, partial));
    int rows_i = (int)rows, cols_i = (int)cols, per_i = (int)per, tiles_i = (int)tiles;
    clh_karg args[] = {CLH_KTENSOR(src), CLH_KARG(rows_i),  CLH_KARG(cols_i),
                       CLH_KARG(per_i),  CLH_KARG(tiles_i), CLH_KTENSOR(*partial)};
    CLH_TRY(clh_launch_2d(ctx, "col_sums_partial", cols, tiles, NARGS(args), args));
    return finish_col_sums(ctx, *partial, 0, tiles, cols, out);
}

static clh_status col_sums_add(clh_ctx *ctx, const clh_tensor *src, size_t rows, size_t cols,
                               clh_tensor *out) {
    size_t mark = clh_ws_mark(ctx);
    clh_tensor *partial = NULL;
    clh_status st = col_sums_core(ctx, src, rows, cols, out, &partial);
    clh_tensor_release(partial);
    clh_ws_reset(ctx, mark);
    return st;
}

/* ------------------------------------------------------------------ linear */

static clh_status check_linear_backward(clh_ctx *ctx, const clh_tensor *x, const clh_tensor *w,
                                        const clh_tensor *dy, const clh_tensor *dx,
                                        const clh_tensor *dw, const clh_tensor *db) {
    static const char fn[] = "clh_linear_backward";
    CLH_TRY(clh_check_ctx(ctx, fn));
    CLH_TRY(clh_check_tensor(ctx, fn, "x", x));
    CLH_TRY(clh_check_tensor(ctx, fn, "w", w));
    CLH_TRY(clh_check_tensor(ctx, fn, "dy", dy));
    CLH_TRY(clh_check_optional(ctx, fn, "dx", dx));
    CLH_TRY(clh_check_optional(ctx, fn, "dw", dw));
    CLH_TRY(clh_check_optional(ctx, fn, "db", db));
    if (w->ndim != 2 || x->ndim < 1 || clh_last_dim(x) != w->shape[1])
        return clh_shape_fail(ctx, fn, "x", x, "w", w,
                              "w must be [out, in] with in = x's last dim");
    size_t in = (size_t)w->shape[1], out = (size_t)w->shape[0];
    size_t rows = in ? x->numel / in : 0;
    if (dy->ndim < 1 || (size_t)clh_last_dim(dy) != out || dy->numel != rows * out)
        return clh_shape_fail(ctx, fn, "x", x, "dy", dy,
                              "dy must hold %zu rows of %zu (w is [%zu, %zu])", rows, out, out, in);
    if (dx)
        CLH_TRY(clh_check_same_rows(ctx, fn, "x", x, "dx", dx));
    if (dw)
        CLH_TRY(clh_check_same_shape(ctx, fn, "w", w, "dw", dw));
    if (db && db->numel != out)
        return clh_shape_fail(ctx, fn, "w", w, "db", db, "db must have %zu elements", out);
    /* GEMM outputs must not overlap their inputs; dw is computed before dx, so dx may
     * alias x. */
    CLH_TRY(clh_check_no_alias(ctx, fn, "dx", dx, "dy", dy));
    CLH_TRY(clh_check_no_alias(ctx, fn, "dx", dx, "w", w));
    CLH_TRY(clh_check_no_alias(ctx, fn, "dw", dw, "x", x));
    CLH_TRY(clh_check_no_alias(ctx, fn, "dw", dw, "dy", dy));
    return CLH_OK;
}

clh_status clh_linear_backward(clh_ctx *ctx, const clh_tensor *x, const clh_tensor *w,
                               const clh_tensor *dy, clh_tensor *dx, clh_tensor *dw,
                               clh_tensor *db) {
    CLH_TRY(check_linear_backward(ctx, x, w, dy, dx, dw, db));
    size_t in = (size_t)w->shape[1], out = (size_t)w->shape[0];
    size_t rows = in ? x->numel / in : 0;
    if (rows == 0 || out == 0 || in == 0) {
        /* Nothing flows back: dx = dy W is a sum over out (zero when out == 0). */
        return dx && out == 0 ? clh_tensor_fill(dx, 0.0f) : CLH_OK;
    }
    if (db)
        CLH_TRY(col_sums_add(ctx, dy, rows, out, db));
    /* dw[out, in] += dy^T x */
    if (dw)
        CLH_TRY(clh_gemm(ctx, 1, 0, out, in, rows, 1.0f, dy, out, x, in, 1.0f, dw, in));
    /* dx[rows, in] = dy W */
    if (dx)
        CLH_TRY(clh_gemm(ctx, 0, 0, rows, in, out, 1.0f, dy, out, w, in, 0.0f, dx, in));
    return CLH_OK;
}

/* ------------------------------------------------------------------ layer norm */

static clh_status check_layer_norm_backward(clh_ctx *ctx, const clh_tensor *x,
                                            const clh_tensor *gamma, float eps,
                                            const clh_tensor *dy, const clh_tensor *dx,
                                            const clh_tensor *dgamma, const clh_tensor *dbeta) {
    static const char fn[] = "clh_layer_norm_backward";
    CLH_TRY(clh_check_ctx(ctx, fn));
    CLH_TRY(clh_check_tensor(ctx, fn, "x", x));
    CLH_TRY(clh_check_tensor(ctx, fn, "gamma", gamma));
    CLH_TRY(clh_check_tensor(ctx, fn, "dy", dy));
    CLH_TRY(clh_check_optional(ctx, fn, "dx", dx));
    CLH_TRY(clh_check_optional(ctx, fn, "dgamma", dgamma));
    CLH_TRY(clh_check_optional(ctx, fn, "dbeta", dbeta));
    if (x->ndim < 1)
        return clh_shape_fail(ctx, fn, "x", x, "dy", dy, "x needs at least one dimension");
    CLH_TRY(clh_check_same_rows(ctx, fn, "x", x, "dy", dy));
    if (dx)
        CLH_TRY(clh_check_same_rows(ctx, fn, "x", x, "dx", dx));
    int64_t d = clh_last_dim(x);
    if ((int64_t)gamma->numel != d)
        return clh_shape_fail(ctx, fn, "x", x, "gamma", gamma, "gamma must have %lld elements",
                              (long long)d);
    if (dgamma && (int64_t)dgamma->numel != d)
        return clh_shape_fail(ctx, fn, "x", x, "dgamma", dgamma, "dgamma must have %lld elements",
                              (long long)d);
    if (dbeta && (int64_t)dbeta->numel != d)
        return clh_shape_fail(ctx, fn, "x", x, "dbeta", dbeta, "dbeta must have %lld elements",
                              (long long)d);
    if (!(eps >= 0.0f))
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT, "%s: eps = %g must be >= 0", fn,
                        (double)eps);
    /* The parameter pass reads x and dy after dx is written. */
    CLH_TRY(clh_check_no_alias(ctx, fn, "dx", dx, "x", x));
    CLH_TRY(clh_check_no_alias(ctx, fn, "dx", dx, "dy", dy));
    CLH_TRY(clh_check_no_alias(ctx, fn, "dx", dx, "gamma", gamma));
    return CLH_OK;
}

/* stats [rows, 2] = (mean, rstd) per row, then dx (if wanted), then the tile partial sums
 * of dgamma and dbeta and their final sums. */
static clh_status layer_norm_backward_core(clh_ctx *ctx, const clh_tensor *x,
                                           const clh_tensor *gamma, float eps, const clh_tensor *dy,
                                           clh_tensor *dx, clh_tensor *dgamma, clh_tensor *dbeta,
                                           clh_tensor **tmp) {
    size_t cols = (size_t)clh_last_dim(x), rows = x->numel / cols;
    int64_t stats_shape[2] = {(int64_t)rows, 2};
    CLH_TRY(clh_ws_tensor(ctx, 2, stats_shape, &tmp[0]));
    clh_tensor *stats = tmp[0];
    const clh_tensor *dx_arg = dx ? dx : stats; /* a valid buffer the kernel will not touch */
    int rows_i = (int)rows, cols_i = (int)cols, write_dx = dx != NULL;
    clh_karg args[] = {CLH_KTENSOR(x),      CLH_KTENSOR(gamma), CLH_KTENSOR(dy),
                       CLH_KTENSOR(dx_arg), CLH_KTENSOR(stats), CLH_KARG(rows_i),
                       CLH_KARG(cols_i),    CLH_KARG(eps),      CLH_KARG(write_dx),
                       CLH_KLOCAL(0)};
    if (clh_use_row_items(ctx))
        CLH_TRY(clh_launch_row_items(ctx, "layer_norm_backward_item", rows, NARGS(args) - 1, args));
    else
        CLH_TRY(launch_groups(ctx, "layer_norm_backward_rows", rows, NARGS(args), args));
    if (!dgamma && !dbeta)
        return CLH_OK;

    size_t per, tiles;
    row_tiles(rows, &per, &tiles);
    int64_t partial_shape[3] = {2, (int64_t)tiles, (int64_t)cols};
    CLH_TRY(clh_ws_tensor(ctx, 3, partial_shape, &tmp[1]));
    clh_tensor *partial = tmp[1];
    int per_i = (int)per, tiles_i = (int)tiles;
    clh_karg pargs[] = {CLH_KTENSOR(x),    CLH_KTENSOR(dy),     CLH_KTENSOR(stats),
                        CLH_KARG(rows_i),  CLH_KARG(cols_i),    CLH_KARG(per_i),
                        CLH_KARG(tiles_i), CLH_KTENSOR(partial)};
    CLH_TRY(clh_launch_2d(ctx, "layer_norm_param_partial", cols, tiles, NARGS(pargs), pargs));
    if (dgamma)
        CLH_TRY(finish_col_sums(ctx, partial, 0, tiles, cols, dgamma));
    if (dbeta)
        CLH_TRY(finish_col_sums(ctx, partial, tiles * cols, tiles, cols, dbeta));
    return CLH_OK;
}

clh_status clh_layer_norm_backward(clh_ctx *ctx, const clh_tensor *x, const clh_tensor *gamma,
                                   float eps, const clh_tensor *dy, clh_tensor *dx,
                                   clh_tensor *dgamma, clh_tensor *dbeta) {
    CLH_TRY(check_layer_norm_backward(ctx, x, gamma, eps, dy, dx, dgamma, dbeta));
    if (x->numel == 0 || (!dx && !dgamma && !dbeta))
        return CLH_OK;
    size_t mark = clh_ws_mark(ctx);
    clh_tensor *tmp[2] = {NULL, NULL};
    clh_status st = layer_norm_backward_core(ctx, x, gamma, eps, dy, dx, dgamma, dbeta, tmp);
    clh_tensor_release(tmp[0]);
    clh_tensor_release(tmp[1]);
    clh_ws_reset(ctx, mark);
    return st;
}

/* ------------------------------------------------------------------ softmax */

static clh_status softmax_backward_rows(clh_ctx *ctx, const clh_tensor *y, const clh_tensor *dy,
                                        clh_tensor *dx, size_t rows, size_t cols, float scale) {
    int rows_i = (int)rows, cols_i = (int)cols;
    clh_karg args[] = {CLH_KTENSOR(y),   CLH_KTENSOR(dy), CLH_KTENSOR(dx), CLH_KARG(rows_i),
                       CLH_KARG(cols_i), CLH_KARG(scale), CLH_KLOCAL(0)};
    if (clh_use_row_items(ctx))
        return clh_launch_row_items(ctx, "softmax_backward_item", rows, NARGS(args) - 1, args);
    return launch_groups(ctx, "softmax_backward_rows", rows, NARGS(args), args);
}

clh_status clh_softmax_backward(clh_ctx *ctx, const clh_tensor *y, const clh_tensor *dy,
                                float scale, clh_tensor *dx) {
    static const char fn[] = "clh_softmax_backward";
    CLH_TRY(clh_check_ctx(ctx, fn));
    CLH_TRY(clh_check_tensor(ctx, fn, "y", y));
    CLH_TRY(clh_check_tensor(ctx, fn, "dy", dy));
    CLH_TRY(clh_check_optional(ctx, fn, "dx", dx));
    if (y->ndim < 1)
        return clh_shape_fail(ctx, fn, "y", y, "dy", dy, "y needs at least one dimension");
    CLH_TRY(clh_check_same_rows(ctx, fn, "y", y, "dy", dy));
    if (dx)
        CLH_TRY(clh_check_same_rows(ctx, fn, "y", y, "dx", dx));
    if (!dx || y->numel == 0)
        return CLH_OK;
    size_t cols = (size_t)clh_last_dim(y);
    return softmax_backward_rows(ctx, y, dy, dx, y->numel / cols, cols, scale);
}

/* ------------------------------------------------------------------ attention */

static clh_status check_attention_backward(clh_ctx *ctx, const clh_tensor *q, const clh_tensor *k,
                                           const clh_tensor *v, int heads, const clh_tensor *dout,
                                           const clh_tensor *dq, const clh_tensor *dk,
                                           const clh_tensor *dv) {
    static const char fn[] = "clh_attention_backward";
    CLH_TRY(clh_check_ctx(ctx, fn));
    CLH_TRY(clh_check_tensor(ctx, fn, "q", q));
    CLH_TRY(clh_check_tensor(ctx, fn, "k", k));
    CLH_TRY(clh_check_tensor(ctx, fn, "v", v));
    CLH_TRY(clh_check_tensor(ctx, fn, "dout", dout));
    CLH_TRY(clh_check_optional(ctx, fn, "dq", dq));
    CLH_TRY(clh_check_optional(ctx, fn, "dk", dk));
    CLH_TRY(clh_check_optional(ctx, fn, "dv", dv));
    if (q->ndim != 3)
        return clh_shape_fail(ctx, fn, "q", q, "k", k, "q must be [N, L, D]");
    if (k->ndim != 3 || k->shape[0] != q->shape[0] || k->shape[2] != q->shape[2])
        return clh_shape_fail(ctx, fn, "q", q, "k", k, "k must be [N, Lk, D] with q's N and D");
    CLH_TRY(clh_check_same_shape(ctx, fn, "k", k, "v", v));
    CLH_TRY(clh_check_same_shape(ctx, fn, "q", q, "dout", dout));
    if (dq)
        CLH_TRY(clh_check_same_shape(ctx, fn, "q", q, "dq", dq));
    if (dk)
        CLH_TRY(clh_check_same_shape(ctx, fn, "k", k, "dk", dk));
    if (dv)
        CLH_TRY(clh_check_same_shape(ctx, fn, "v", v, "dv", dv));
    if (heads < 1 || q->shape[2] % heads != 0)
        return clh_fail(ctx, CLH_ERR_SHAPE, "%s: heads = %d does not divide D = %lld", fn, heads,
                        (long long)q->shape[2]);
    /* Inputs are copied to the workspace before any output is written, so outputs may
     * alias inputs, but not each other. */
    CLH_TRY(clh_check_no_alias(ctx, fn, "dq", dq, "dk", dk));
    CLH_TRY(clh_check_no_alias(ctx, fn, "dq", dq, "dv", dv));
    CLH_TRY(clh_check_no_alias(ctx, fn, "dk", dk, "dv", dv));
    return CLH_OK;
}

/* [N, L, H*hd] <-> [N*H, L, hd] with the forward's attention.cl kernels. */
static clh_status permute_heads(clh_ctx *ctx, const char *kernel, const clh_tensor *src,
                                clh_tensor *dst, size_t n, size_t len, int heads, size_t head_dim) {
    int rows = (int)(n * len), len_i = (int)len, hd = (int)head_dim;
    clh_karg args[] = {CLH_KTENSOR(src), CLH_KTENSOR(dst), CLH_KARG(rows),
                       CLH_KARG(len_i),  CLH_KARG(heads),  CLH_KARG(hd)};
    return clh_launch_2d(ctx, kernel, (size_t)heads * head_dim, n * len, NARGS(args), args);
}

/* The forward's softmax kernels (norm.cl): causal masking restarts every lq rows; one
 * work-item per row on CPU devices, one work-group per row elsewhere (as clh_softmax). */
static clh_status softmax_forward_rows(clh_ctx *ctx, clh_tensor *s, size_t rows, size_t lq,
                                       size_t cols, float scale, int causal) {
    int rows_i = (int)rows, block_i = (int)lq, cols_i = (int)cols, causal_i = causal != 0;
    clh_karg args[] = {CLH_KTENSOR(s),   CLH_KTENSOR(s),  CLH_KARG(rows_i),   CLH_KARG(block_i),
                       CLH_KARG(cols_i), CLH_KARG(scale), CLH_KARG(causal_i), CLH_KLOCAL(0)};
    if (clh_use_row_items(ctx))
        return clh_launch_row_items(ctx, "softmax_item", rows, NARGS(args) - 1, args);
    return launch_groups(ctx, "softmax", rows, NARGS(args), args);
}

typedef struct attn_dims {
    size_t n, lq, lk, hd, nh;
    int heads;
} attn_dims;

/* Workspace: qh, kh, vh, doh in the per-head layout and two score-sized buffers P, dP.
 * The results reuse buffers whose contents are no longer needed:
 *   dP = dO V^T;  dV = P^T dO -> vh;  dS = softmax_backward(P, dP) in place;
 *   dQ = dS K -> doh;  dK = dS^T Q -> kh. */
static clh_status attention_backward_core(clh_ctx *ctx, const attn_dims *a, const clh_tensor *q,
                                          const clh_tensor *k, const clh_tensor *v, int causal,
                                          const clh_tensor *dout, clh_tensor *dq, clh_tensor *dk,
                                          clh_tensor *dv, clh_tensor **tmp) {
    size_t lq = a->lq, lk = a->lk, hd = a->hd, nh = a->nh;
    int64_t q_shape[3] = {(int64_t)nh, (int64_t)lq, (int64_t)hd};
    int64_t kv_shape[3] = {(int64_t)nh, (int64_t)lk, (int64_t)hd};
    int64_t s_shape[3] = {(int64_t)nh, (int64_t)lq, (int64_t)lk};
    CLH_TRY(clh_ws_tensor(ctx, 3, q_shape, &tmp[0]));
    CLH_TRY(clh_ws_tensor(ctx, 3, kv_shape, &tmp[1]));
    CLH_TRY(clh_ws_tensor(ctx, 3, kv_shape, &tmp[2]));
    CLH_TRY(clh_ws_tensor(ctx, 3, q_shape, &tmp[3]));
    CLH_TRY(clh_ws_tensor(ctx, 3, s_shape, &tmp[4]));
    CLH_TRY(clh_ws_tensor(ctx, 3, s_shape, &tmp[5]));
    clh_tensor *qh = tmp[0], *kh = tmp[1], *vh = tmp[2], *doh = tmp[3], *p = tmp[4], *dp = tmp[5];
    if (dp->offset + dp->numel > (size_t)INT_MAX)
        return clh_fail(ctx, CLH_ERR_UNSUPPORTED,
                        "clh_attention_backward: the score matrices (%zu elements each) are "
                        "beyond what kernels can index",
                        dp->numel);
    int want_scores_grad = dq || dk;
    CLH_TRY(permute_heads(ctx, "split_heads", q, qh, a->n, lq, a->heads, hd));
    CLH_TRY(permute_heads(ctx, "split_heads", k, kh, a->n, lk, a->heads, hd));
    CLH_TRY(permute_heads(ctx, "split_heads", dout, doh, a->n, lq, a->heads, hd));
    if (want_scores_grad)
        CLH_TRY(permute_heads(ctx, "split_heads", v, vh, a->n, lk, a->heads, hd));

    /* P = softmax(scale * Q K^T [+ causal]) */
    float scale = (float)(1.0 / sqrt((double)hd));
    CLH_TRY(clh_gemm_batched(ctx, 0, 1, lq, lk, hd, 1.0f, qh, hd, lq * hd, kh, hd, lk * hd, 0.0f, p,
                             lk, lq * lk, nh));
    CLH_TRY(softmax_forward_rows(ctx, p, nh * lq, lq, lk, scale, causal));

    if (want_scores_grad) /* dP = dO V^T, before vh is reused for dV */
        CLH_TRY(clh_gemm_batched(ctx, 0, 1, lq, lk, hd, 1.0f, doh, hd, lq * hd, vh, hd, lk * hd,
                                 0.0f, dp, lk, lq * lk, nh));
    if (dv) /* dV = P^T dO */
        CLH_TRY(clh_gemm_batched(ctx, 1, 0, lk, hd, lq, 1.0f, p, lk, lq * lk, doh, hd, lq * hd,
                                 0.0f, vh, hd, lk * hd, nh));
    if (want_scores_grad) {
        /* gradient of the unscaled scores: the softmax backward carries the scale */
        CLH_TRY(softmax_backward_rows(ctx, p, dp, dp, nh * lq, lk, scale));
        if (dq) /* dQ = dS K */
            CLH_TRY(clh_gemm_batched(ctx, 0, 0, lq, hd, lk, 1.0f, dp, lk, lq * lk, kh, hd, lk * hd,
                                     0.0f, doh, hd, lq * hd, nh));
        if (dk) /* dK = dS^T Q */
            CLH_TRY(clh_gemm_batched(ctx, 1, 0, lk, hd, lq, 1.0f, dp, lk, lq * lk, qh, hd, lq * hd,
                                     0.0f, kh, hd, lk * hd, nh));
    }
    if (dq)
        CLH_TRY(permute_heads(ctx, "merge_heads", doh, dq, a->n, lq, a->heads, hd));
    if (dk)
        CLH_TRY(permute_heads(ctx, "merge_heads", kh, dk, a->n, lk, a->heads, hd));
    if (dv)
        CLH_TRY(permute_heads(ctx, "merge_heads", vh, dv, a->n, lk, a->heads, hd));
    return CLH_OK;
}

clh_status clh_attention_backward(clh_ctx *ctx, const clh_tensor *q, const clh_tensor *k,
                                  const clh_tensor *v, int heads, int causal,
                                  const clh_tensor *dout, clh_tensor *dq, clh_tensor *dk,
                                  clh_tensor *dv) {
    CLH_TRY(check_attention_backward(ctx, q, k, v, heads, dout, dq, dk, dv));
    if (!dq && !dk && !dv)
        return CLH_OK;
    if (q->numel == 0 || k->numel == 0) {
        /* No scores (Lq, Lk or D is 0): the gradients that exist are zero. */
        if (dq)
            CLH_TRY(clh_tensor_fill(dq, 0.0f));
        if (dk)
            CLH_TRY(clh_tensor_fill(dk, 0.0f));
        if (dv)
            CLH_TRY(clh_tensor_fill(dv, 0.0f));
        return CLH_OK;
    }
    attn_dims a = {(size_t)q->shape[0], (size_t)q->shape[1], (size_t)k->shape[1], 0, 0, heads};
    a.hd = (size_t)q->shape[2] / (size_t)heads;
    a.nh = a.n * (size_t)heads;
    size_t mark = clh_ws_mark(ctx);
    clh_tensor *tmp[6] = {NULL, NULL, NULL, NULL, NULL, NULL};
    clh_status st = attention_backward_core(ctx, &a, q, k, v, causal, dout, dq, dk, dv, tmp);
    for (int i = 0; i < 6; i++)
        clh_tensor_release(tmp[i]);
    clh_ws_reset(ctx, mark);
    return st;
}

/* ------------------------------------------------------------------ activations */

static clh_status activation_backward(clh_ctx *ctx, const char *fn, const char *kernel,
                                      const clh_tensor *x, const clh_tensor *dy, clh_tensor *dx) {
    CLH_TRY(clh_check_ctx(ctx, fn));
    CLH_TRY(clh_check_tensor(ctx, fn, "x", x));
    CLH_TRY(clh_check_tensor(ctx, fn, "dy", dy));
    CLH_TRY(clh_check_optional(ctx, fn, "dx", dx));
    CLH_TRY(clh_check_same_numel(ctx, fn, "x", x, "dy", dy));
    if (!dx)
        return CLH_OK;
    CLH_TRY(clh_check_same_numel(ctx, fn, "x", x, "dx", dx));
    int n = (int)x->numel;
    clh_karg args[] = {CLH_KTENSOR(x), CLH_KTENSOR(dy), CLH_KTENSOR(dx), CLH_KARG(n)};
    return clh_launch_1d(ctx, kernel, x->numel, NARGS(args), args);
}

clh_status clh_quick_gelu_backward(clh_ctx *ctx, const clh_tensor *x, const clh_tensor *dy,
                                   clh_tensor *dx) {
    return activation_backward(ctx, "clh_quick_gelu_backward", "quick_gelu_backward", x, dy, dx);
}

clh_status clh_gelu_backward(clh_ctx *ctx, const clh_tensor *x, const clh_tensor *dy,
                             clh_tensor *dx) {
    return activation_backward(ctx, "clh_gelu_backward", "gelu_backward", x, dy, dx);
}

/* ------------------------------------------------------------------ L2 normalisation */

clh_status clh_l2_normalize_backward(clh_ctx *ctx, const clh_tensor *x, const clh_tensor *dy,
                                     clh_tensor *dx) {
    static const char fn[] = "clh_l2_normalize_backward";
    CLH_TRY(clh_check_ctx(ctx, fn));
    CLH_TRY(clh_check_tensor(ctx, fn, "x", x));
    CLH_TRY(clh_check_tensor(ctx, fn, "dy", dy));
    CLH_TRY(clh_check_optional(ctx, fn, "dx", dx));
    if (x->ndim < 1)
        return clh_shape_fail(ctx, fn, "x", x, "dy", dy, "x needs at least one dimension");
    CLH_TRY(clh_check_same_rows(ctx, fn, "x", x, "dy", dy));
    if (dx)
        CLH_TRY(clh_check_same_rows(ctx, fn, "x", x, "dx", dx));
    if (!dx || x->numel == 0)
        return CLH_OK;
    int cols = (int)clh_last_dim(x), rows = (int)(x->numel / (size_t)cols);
    clh_karg args[] = {CLH_KTENSOR(x), CLH_KTENSOR(dy), CLH_KTENSOR(dx),
                       CLH_KARG(rows), CLH_KARG(cols),  CLH_KLOCAL(0)};
    if (clh_use_row_items(ctx))
        return clh_launch_row_items(ctx, "l2_normalize_backward_item", (size_t)rows,
                                    NARGS(args) - 1, args);
    return launch_groups(ctx, "l2_normalize_backward_rows", (size_t)rows, NARGS(args), args);
}

/* ------------------------------------------------------------------ scatter-add */

typedef struct index_pair {
    int32_t target, source;
} index_pair;

static int by_target_then_source(const void *a, const void *b) {
    const index_pair *x = a, *y = b;
    if (x->target != y->target)
        return x->target < y->target ? -1 : 1;
    return (x->source > y->source) - (x->source < y->source);
}

/* Group the sources by target row: lists = [targets (u) | starts (u + 1) | sources (n)],
 * sources ascending within a target. Returns u through *targets. */
static clh_status build_scatter_lists(clh_ctx *ctx, const int32_t *index, size_t n,
                                      int32_t **lists_out, size_t *targets) {
    index_pair *pairs = malloc(n * sizeof *pairs);
    int32_t *lists = malloc((3 * n + 1) * sizeof *lists); /* u <= n */
    if (!pairs || !lists) {
        free(pairs);
        free(lists);
        return clh_fail(ctx, CLH_ERR_OUT_OF_MEMORY,
                        "clh_scatter_add_rows: out of host memory for %zu indices", n);
    }
    for (size_t i = 0; i < n; i++)
        pairs[i] = (index_pair){index[i], (int32_t)i};
    qsort(pairs, n, sizeof *pairs, by_target_then_source);
    size_t u = 0;
    for (size_t i = 0; i < n; i++)
        if (i == 0 || pairs[i].target != pairs[i - 1].target)
            u++;
    int32_t *tgt = lists, *starts = lists + u, *sources = starts + u + 1;
    size_t j = 0;
    for (size_t i = 0; i < n; i++) {
        if (i == 0 || pairs[i].target != pairs[i - 1].target) {
            tgt[j] = pairs[i].target;
            starts[j++] = (int32_t)i;
        }
        sources[i] = pairs[i].source;
    }
    starts[u] = (int32_t)n;
    free(pairs);
    *lists_out = lists;
    *targets = u;
    return CLH_OK;
}

static clh_status check_scatter_add(clh_ctx *ctx, const clh_tensor *dy, const int32_t *index,
                                    size_t n, const clh_tensor *dx) {
    static const char fn[] = "clh_scatter_add_rows";
    CLH_TRY(clh_check_ctx(ctx, fn));
    CLH_TRY(clh_check_tensor(ctx, fn, "dy", dy));
    CLH_TRY(clh_check_optional(ctx, fn, "dx", dx));
    if (!dx)
        return CLH_OK;
    if (dx->ndim < 2)
        return clh_shape_fail(ctx, fn, "dy", dy, "dx", dx, "dx must have at least 2 dims [.., D]");
    int64_t d = clh_last_dim(dx);
    if (dy->ndim < 1 || clh_last_dim(dy) != d || dy->numel != n * (size_t)d)
        return clh_shape_fail(ctx, fn, "dy", dy, "dx", dx, "dy must be [%zu, %lld]", n,
                              (long long)d);
    if (n > (size_t)INT_MAX / 3)
        return clh_fail(ctx, CLH_ERR_UNSUPPORTED, "%s: n = %zu indices is too many", fn, n);
    if (n > 0 && !index)
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT, "%s: index is NULL with n = %zu", fn, n);
    size_t count = d ? dx->numel / (size_t)d : 0;
    for (size_t i = 0; i < n; i++)
        if (index[i] < 0 || (size_t)index[i] >= count)
            return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT,
                            "%s: index[%zu] = %d is outside [0, %zu)", fn, i, (int)index[i], count);
    return clh_check_no_alias(ctx, fn, "dx", dx, "dy", dy);
}

clh_status clh_scatter_add_rows(clh_ctx *ctx, const clh_tensor *dy, const int32_t *index, size_t n,
                                clh_tensor *dx) {
    CLH_TRY(check_scatter_add(ctx, dy, index, n, dx));
    if (!dx || n == 0 || dx->numel == 0)
        return CLH_OK;
    int32_t *lists = NULL;
    size_t targets = 0;
    CLH_TRY(build_scatter_lists(ctx, index, n, &lists, &targets));
    cl_mem mem;
    clh_status st = clh_upload_ints(ctx, lists, 2 * targets + 1 + n, &mem);
    free(lists);
    CLH_TRY(st);
    int targets_i = (int)targets, cols = (int)clh_last_dim(dx);
    clh_karg args[] = {CLH_KTENSOR(dy), CLH_KARG(mem), CLH_KTENSOR(dx), CLH_KARG(targets_i),
                       CLH_KARG(cols)};
    return clh_launch_2d(ctx, "scatter_add_rows", (size_t)cols, targets, NARGS(args), args);
}

/* ------------------------------------------------------------------ vector helpers */

clh_status clh_axpy(clh_ctx *ctx, float alpha, const clh_tensor *x, clh_tensor *y) {
    static const char fn[] = "clh_axpy";
    CLH_TRY(clh_check_ctx(ctx, fn));
    CLH_TRY(clh_check_tensor(ctx, fn, "x", x));
    CLH_TRY(clh_check_tensor(ctx, fn, "y", y));
    CLH_TRY(clh_check_same_numel(ctx, fn, "x", x, "y", y));
    int n = (int)x->numel;
    clh_karg args[] = {CLH_KTENSOR(x), CLH_KTENSOR(y), CLH_KARG(alpha), CLH_KARG(n)};
    return clh_launch_1d(ctx, "axpy", x->numel, NARGS(args), args);
}

clh_status clh_scale(clh_ctx *ctx, clh_tensor *x, float alpha) {
    static const char fn[] = "clh_scale";
    CLH_TRY(clh_check_ctx(ctx, fn));
    CLH_TRY(clh_check_tensor(ctx, fn, "x", x));
    int n = (int)x->numel;
    clh_karg args[] = {CLH_KTENSOR(x), CLH_KARG(alpha), CLH_KARG(n)};
    return clh_launch_1d(ctx, "scale_elements", x->numel, NARGS(args), args);
}

/* Chunks of at least 4096 elements and at most 1024 chunks; each work-group reduces
 * one chunk in float, the host adds the chunk sums in double. */
static clh_status sum_squares_core(clh_ctx *ctx, const clh_tensor *x, double *out,
                                   clh_tensor **partial) {
    size_t n = x->numel, chunk = (n + 1023) / 1024;
    if (chunk < 4096)
        chunk = 4096;
    size_t groups = (n + chunk - 1) / chunk;
    int64_t shape[1] = {(int64_t)groups};
    CLH_TRY(clh_ws_tensor(ctx, 1, shape, partial));
    int n_i = (int)n, chunk_i = (int)chunk, groups_i = (int)groups;
    clh_karg args[] = {CLH_KTENSOR(x),     CLH_KARG(n_i),         CLH_KARG(chunk_i),
                       CLH_KARG(groups_i), CLH_KTENSOR(*partial), CLH_KLOCAL(0)};
    CLH_TRY(launch_groups(ctx, "sum_squares_partial", groups, NARGS(args), args));
    float sums[1024];
    CLH_TRY(clh_tensor_download(*partial, sums, groups));
    double total = 0.0;
    for (size_t g = 0; g < groups; g++)
        total += (double)sums[g];
    *out = total;
    return CLH_OK;
}

clh_status clh_sum_squares(clh_ctx *ctx, const clh_tensor *x, double *out) {
    static const char fn[] = "clh_sum_squares";
    CLH_TRY(clh_check_ctx(ctx, fn));
    CLH_TRY(clh_check_tensor(ctx, fn, "x", x));
    if (!out)
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT, "%s: out is NULL", fn);
    *out = 0.0;
    if (x->numel == 0)
        return CLH_OK;
    size_t mark = clh_ws_mark(ctx);
    clh_tensor *partial = NULL;
    clh_status st = sum_squares_core(ctx, x, out, &partial);
    clh_tensor_release(partial);
    clh_ws_reset(ctx, mark);
    return st;
}
