/* H-CLIP adapter math (hclip.h, "adapter math"): block-diagonal transforms, batched
 * Gauss-Jordan inverse, the Cayley map, DCRC relation maps and hyperspherical energy.
 * Argument and shape checks on the host; the work in CLBlast (gemm.c) and in
 * kernels/adapter.cl. Temporaries come from the context's workspace. */
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hclip.h"
#include "layer_util.h"

/* ------------------------------------------------------------------ checks */

/* ------------------------------------------------------------------ launch helpers */

/* A 1-D window of `numel` elements of t starting `offset` elements into it: the
 * operand of one GEMM among several that share a tensor. */
static clh_status window(const clh_tensor *t, size_t offset, size_t numel, clh_tensor **out) {
    int64_t shape[1] = {(int64_t)numel};
    return clh_tensor_view((clh_tensor *)t, offset, 1, shape, out);
}

/* Workspace tensor whose end kernels can index. */
static clh_status ws_tensor(clh_ctx *ctx, const char *fn, int ndim, const int64_t *shape,
                            clh_tensor **out) {
    CLH_TRY(clh_ws_tensor(ctx, ndim, shape, out));
    if ((*out)->offset + (*out)->numel > (size_t)INT_MAX)
        return clh_fail(ctx, CLH_ERR_UNSUPPORTED,
                        "%s: a temporary of %zu elements is beyond what kernels can index", fn,
                        (*out)->numel);
    return CLH_OK;
}

/* Release the temporaries of a call and return its workspace. */
static void release_all(clh_ctx *ctx, size_t mark, clh_tensor **tmp, int n) {
    for (int i = 0; i < n; i++) {
        clh_tensor_release(tmp[i]);
        tmp[i] = NULL;
    }
    clh_ws_reset(ctx, mark);
}

/* ------------------------------------------------------------------ block-diagonal */

/* blocks must be [b, q, q] with b q = d; *nb = b, *q = q. */
static clh_status check_blocks(clh_ctx *ctx, const char *fn, const clh_tensor *blocks, int64_t d,
                               size_t *nb, size_t *q) {
    if (blocks->ndim != 3 || blocks->shape[1] != blocks->shape[2] || blocks->shape[1] < 1) {
        char s[128];
        clh_shape_str(blocks->ndim, blocks->shape, s, sizeof s);
        return clh_fail(ctx, CLH_ERR_SHAPE, "%s: blocks has shape %s, expected [b, q, q]", fn, s);
    }
    if (blocks->shape[0] * blocks->shape[1] != d) {
        char s[128];
        clh_shape_str(blocks->ndim, blocks->shape, s, sizeof s);
        return clh_fail(ctx, CLH_ERR_SHAPE,
                        "%s: blocks %s cover %lld features but the transformed dimension is %lld",
                        fn, s, (long long)(blocks->shape[0] * blocks->shape[1]), (long long)d);
    }
    *nb = (size_t)blocks->shape[0];
    *q = (size_t)blocks->shape[1];
    return CLH_OK;
}

/* dst_j = src_j op(R_j) for every column block j, where src_j / dst_j are the q columns
 * qj..qj+q-1 of `rows` rows of leading dimension ld, and op(R) = R^T (trans_r) or R.
 * One GEMM per block: one strided-batched call would write b outputs whose rows
 * interleave (stride q, leading dimension ld), which clh_gemm_batched refuses as
 * overlapping although no element is shared. */
static clh_status per_block_gemm(clh_ctx *ctx, int trans_r, size_t rows, size_t ld, size_t nb,
                                 size_t q, const clh_tensor *src, const clh_tensor *blocks,
                                 clh_tensor *dst) {
    size_t span = (rows - 1) * ld + q;
    clh_status st = CLH_OK;
    for (size_t j = 0; j < nb && st == CLH_OK; j++) {
        clh_tensor *s = NULL, *r = NULL, *d = NULL;
        st = window(src, q * j, span, &s);
        if (st == CLH_OK)
            st = window(blocks, q * q * j, q * q, &r);
        if (st == CLH_OK)
            st = window(dst, q * j, span, &d);
        if (st == CLH_OK)
            st = clh_gemm(ctx, 0, trans_r, rows, q, q, 1.0f, s, ld, r, q, 0.0f, d, ld);
        clh_tensor_release(s);
        clh_tensor_release(r);
        clh_tensor_release(d);
    }
    return st;
}

/* x [..., D] and a same-shaped partner (y, dy or dx). */
static clh_status check_rows_like(clh_ctx *ctx, const char *fn, const char *x_name,
                                  const clh_tensor *x, const char *y_name, const clh_tensor *y) {
    if (y->numel != x->numel || y->ndim < 1 || clh_last_dim(y) != clh_last_dim(x)) {
        char sx[128], sy[128];
        clh_shape_str(x->ndim, x->shape, sx, sizeof sx);
        clh_shape_str(y->ndim, y->shape, sy, sizeof sy);
        return clh_fail(ctx, CLH_ERR_SHAPE, "%s: %s %s must have the rows and last dim of %s %s",
                        fn, y_name, sy, x_name, sx);
    }
    return CLH_OK;
}

clh_status clh_blockdiag_forward(clh_ctx *ctx, const clh_tensor *x, const clh_tensor *blocks,
                                 clh_tensor *y) {
    static const char fn[] = "clh_blockdiag_forward";
    CLH_TRY(clh_check_ctx(ctx, fn));
    CLH_TRY(clh_check_tensor(ctx, fn, "x", x));
    CLH_TRY(clh_check_tensor(ctx, fn, "blocks", blocks));
    CLH_TRY(clh_check_tensor(ctx, fn, "y", y));
    if (x->ndim < 1)
        return clh_fail(ctx, CLH_ERR_SHAPE, "%s: x must be [..., D], not a scalar", fn);
    size_t nb = 0, q = 0, d = (size_t)clh_last_dim(x);
    CLH_TRY(check_blocks(ctx, fn, blocks, (int64_t)d, &nb, &q));
    CLH_TRY(check_rows_like(ctx, fn, "x", x, "y", y));
    if (clh_overlaps(x, y) || clh_overlaps(blocks, y))
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT, "%s: y must not alias x or blocks", fn);
    size_t rows = x->numel / d;
    if (rows == 0)
        return CLH_OK;
    return per_block_gemm(ctx, 1, rows, d, nb, q, x, blocks, y);
}

clh_status clh_blockdiag_backward(clh_ctx *ctx, const clh_tensor *x, const clh_tensor *blocks,
                                  const clh_tensor *dy, clh_tensor *dx, clh_tensor *dblocks) {
    static const char fn[] = "clh_blockdiag_backward";
    CLH_TRY(clh_check_ctx(ctx, fn));
    CLH_TRY(clh_check_tensor(ctx, fn, "x", x));
    CLH_TRY(clh_check_tensor(ctx, fn, "blocks", blocks));
    CLH_TRY(clh_check_tensor(ctx, fn, "dy", dy));
    CLH_TRY(clh_check_optional(ctx, fn, "dx", dx));
    CLH_TRY(clh_check_optional(ctx, fn, "dblocks", dblocks));
    if (x->ndim < 1)
        return clh_fail(ctx, CLH_ERR_SHAPE, "%s: x must be [..., D], not a scalar", fn);
    size_t nb = 0, q = 0, d = (size_t)clh_last_dim(x);
    CLH_TRY(check_blocks(ctx, fn, blocks, (int64_t)d, &nb, &q));
    CLH_TRY(check_rows_like(ctx, fn, "x", x, "dy", dy));
    if (dx) {
        CLH_TRY(check_rows_like(ctx, fn, "x", x, "dx", dx));
        if (clh_overlaps(dx, dy) || clh_overlaps(dx, blocks))
            return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT, "%s: dx must not alias dy or blocks",
                            fn);
    }
    if (dblocks) {
        CLH_TRY(clh_check_shape_is(ctx, fn, "dblocks", dblocks, blocks->ndim, blocks->shape));
        if (clh_overlaps(dblocks, x) || clh_overlaps(dblocks, dy))
            return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT, "%s: dblocks must not alias x or dy",
                            fn);
    }
    size_t rows = x->numel / d;
    if (rows == 0)
        return CLH_OK;
    /* dblocks_j += dy_j^T x_j: the outputs are whole q x q blocks, one batched GEMM */
    if (dblocks)
        CLH_TRY(clh_gemm_batched(ctx, 1, 0, q, q, rows, 1.0f, dy, d, q, x, d, q, 1.0f, dblocks, q,
                                 q * q, nb));
    if (dx)
        CLH_TRY(per_block_gemm(ctx, 0, rows, d, nb, q, dy, blocks, dx));
    return CLH_OK;
}

clh_status clh_blockdiag_fold(clh_ctx *ctx, const clh_tensor *w, const clh_tensor *blocks, int side,
                              clh_tensor *w_out) {
    static const char fn[] = "clh_blockdiag_fold";
    CLH_TRY(clh_check_ctx(ctx, fn));
    CLH_TRY(clh_check_tensor(ctx, fn, "w", w));
    CLH_TRY(clh_check_tensor(ctx, fn, "blocks", blocks));
    CLH_TRY(clh_check_tensor(ctx, fn, "w_out", w_out));
    if (side != 0 && side != 1)
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT,
                        "%s: side = %d must be 0 (w . BD, input side) or 1 (BD . w, output side)",
                        fn, side);
    if (w->ndim != 2) {
        char s[128];
        clh_shape_str(w->ndim, w->shape, s, sizeof s);
        return clh_fail(ctx, CLH_ERR_SHAPE, "%s: w has shape %s, expected a matrix [D, D]", fn, s);
    }
    /* w [n, D] (side 0) or [D, n] (side 1); H-CLIP's weights are square, n = D */
    size_t nb = 0, q = 0, d = (size_t)w->shape[side == 0 ? 1 : 0], other = (size_t)w->shape[side];
    CLH_TRY(check_blocks(ctx, fn, blocks, (int64_t)d, &nb, &q));
    CLH_TRY(clh_check_shape_is(ctx, fn, "w_out", w_out, 2, w->shape));
    if (clh_overlaps(w, w_out) || clh_overlaps(blocks, w_out))
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT, "%s: w_out must not alias w or blocks", fn);
    if (other == 0)
        return CLH_OK;
    if (side == 0) /* column block j of the result: w_j R_j */
        return per_block_gemm(ctx, 0, other, d, nb, q, w, blocks, w_out);
    /* row block j of the result: R_j w_j, whole row blocks, one batched GEMM */
    return clh_gemm_batched(ctx, 0, 0, q, other, q, 1.0f, blocks, q, q * q, w, other, q * other,
                            0.0f, w_out, other, q * other, nb);
}

/* ------------------------------------------------------------------ batched inverse */

/* Square matrices [n, m, m]; *n and *m receive the sizes. */
static clh_status check_square_batch(clh_ctx *ctx, const char *fn, const char *name,
                                     const clh_tensor *t, size_t *n, size_t *m) {
    if (t->ndim != 3 || t->shape[1] != t->shape[2]) {
        char s[128];
        clh_shape_str(t->ndim, t->shape, s, sizeof s);
        return clh_fail(ctx, CLH_ERR_SHAPE, "%s: %s has shape %s, expected [n, m, m]", fn, name, s);
    }
    *n = (size_t)t->shape[0];
    *m = (size_t)t->shape[1];
    return CLH_OK;
}

/* Bytes of local memory the local-memory variant needs: W and V, the pivot reduction
 * (value and row per work-item) and the elimination factors. */
static size_t inverse_local_bytes(size_t m, size_t group) {
    return 2 * m * m * sizeof(float) + group * (sizeof(float) + sizeof(cl_int)) + m * sizeof(float);
}

/* Work-group size of a GJ kernel: a power of two, at most 256, and no larger than the
 * 2 m columns of [W | V] (one work-item per column in the elimination). */
static clh_status inverse_group(clh_ctx *ctx, const char *kernel, size_t m, size_t *group) {
    size_t cap = 2 * m < 256 ? 2 * m : 256;
    return clh_group_size(ctx, kernel, cap, group);
}

/* Launch the local-memory variant when W and V fit (with 1 KiB spare for what the
 * compiler reserves), else the global one on a workspace copy of a. status [n]
 * receives 0 or k + 1 per matrix. */
static clh_status launch_inverse(clh_ctx *ctx, const clh_tensor *a, clh_tensor *inv,
                                 clh_tensor *status, size_t n, size_t m, clh_tensor **work) {
    int n_i = (int)n, m_i = (int)m;
    size_t group;
    CLH_TRY(inverse_group(ctx, "gj_inverse_local", m, &group));
    if (inverse_local_bytes(m, group) + 1024 <= ctx->info.local_mem) {
        size_t global[1] = {n * group};
        clh_karg args[] = {CLH_KTENSOR(a),
                           CLH_KTENSOR(inv),
                           CLH_KTENSOR(status),
                           CLH_KARG(n_i),
                           CLH_KARG(m_i),
                           CLH_KLOCAL(2 * m * m * sizeof(float)),
                           CLH_KLOCAL(group * sizeof(float)),
                           CLH_KLOCAL(group * sizeof(cl_int)),
                           CLH_KLOCAL(m * sizeof(float))};
        return clh_launch(ctx, "gj_inverse_local", 1, global, &group, NARGS(args), args);
    }
    CLH_TRY(inverse_group(ctx, "gj_inverse_global", m, &group));
    int64_t shape[3] = {(int64_t)n, (int64_t)m, (int64_t)m};
    CLH_TRY(ws_tensor(ctx, "clh_batched_inverse", 3, shape, work));
    size_t global[1] = {n * group};
    clh_karg args[] = {CLH_KTENSOR(a),
                       CLH_KTENSOR(*work),
                       CLH_KTENSOR(inv),
                       CLH_KTENSOR(status),
                       CLH_KARG(n_i),
                       CLH_KARG(m_i),
                       CLH_KLOCAL(group * sizeof(float)),
                       CLH_KLOCAL(group * sizeof(cl_int)),
                       CLH_KLOCAL(m * sizeof(float))};
    return clh_launch(ctx, "gj_inverse_global", 1, global, &group, NARGS(args), args);
}

/* Read the per-matrix status back and name the first singular matrix. */
static clh_status report_singular(clh_ctx *ctx, const clh_tensor *status, size_t n) {
    float *flags = malloc(n * sizeof *flags);
    if (!flags)
        return clh_fail(ctx, CLH_ERR_OUT_OF_MEMORY, "clh_batched_inverse: out of host memory");
    clh_status st = clh_tensor_download(status, flags, n);
    for (size_t i = 0; st == CLH_OK && i < n; i++)
        if (flags[i] != 0.0f) {
            st = clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT,
                          "clh_batched_inverse: matrix %zu of %zu is singular (or not finite): "
                          "no pivot of magnitude >= 1e-30 in column %d",
                          i, n, (int)flags[i] - 1);
        }
    free(flags);
    return st;
}

/* Numerical note: Gauss-Jordan with partial pivoting is backward stable in practice
 * (growth factors stay small for all but contrived matrices). Its main client is the
 * Cayley map, which inverts I + S with S skew-symmetric: (I + S)^T (I + S) = I - S^2 =
 * I + S^T S, so every singular value of I + S is >= 1 and the condition number is
 * at most sqrt(1 + ||S||^2); the elimination never meets a tiny pivot there. */
clh_status clh_batched_inverse(clh_ctx *ctx, const clh_tensor *a, clh_tensor *inv) {
    static const char fn[] = "clh_batched_inverse";
    CLH_TRY(clh_check_ctx(ctx, fn));
    CLH_TRY(clh_check_tensor(ctx, fn, "a", a));
    CLH_TRY(clh_check_tensor(ctx, fn, "inv", inv));
    size_t n = 0, m = 0;
    CLH_TRY(check_square_batch(ctx, fn, "a", a, &n, &m));
    CLH_TRY(clh_check_shape_is(ctx, fn, "inv", inv, 3, a->shape));
    if (clh_overlaps(a, inv))
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT, "%s: inv must not alias a", fn);
    if (n == 0 || m == 0)
        return CLH_OK;
    size_t mark = clh_ws_mark(ctx);
    clh_tensor *tmp[2] = {NULL, NULL}; /* status, global-variant work copy */
    int64_t status_shape[1] = {(int64_t)n};
    clh_status st = ws_tensor(ctx, fn, 1, status_shape, &tmp[0]);
    if (st == CLH_OK)
        st = launch_inverse(ctx, a, inv, tmp[0], n, m, &tmp[1]);
    if (st == CLH_OK)
        st = report_singular(ctx, tmp[0], n);
    release_all(ctx, mark, tmp, 2);
    return st;
}

/* ------------------------------------------------------------------ Cayley */

static clh_status cayley_forward_core(clh_ctx *ctx, const clh_tensor *raw, clh_tensor *r,
                                      clh_tensor *inv, size_t n, size_t m, clh_tensor **tmp) {
    static const char fn[] = "clh_cayley_forward";
    CLH_TRY(ws_tensor(ctx, fn, 3, raw->shape, &tmp[0]));
    clh_tensor *a = tmp[0];
    if (!inv) {
        CLH_TRY(ws_tensor(ctx, fn, 3, raw->shape, &tmp[1]));
        inv = tmp[1];
    }
    int n_i = (int)n, m_i = (int)m;
    clh_karg args[] = {CLH_KTENSOR(raw), CLH_KTENSOR(a), CLH_KARG(n_i), CLH_KARG(m_i)};
    CLH_TRY(clh_launch_2d(ctx, "cayley_one_plus_skew", m * m, n, NARGS(args), args));
    clh_status st = clh_batched_inverse(ctx, a, inv);
    if (st != CLH_OK) {
        /* I + S is never singular for finite raw (see clh_batched_inverse) */
        char why[1024];
        snprintf(why, sizeof why, "%s", clh_ctx_error(ctx));
        return clh_fail(ctx, st, "%s: inverting I + S failed; does raw hold inf or NaN? (%s)", fn,
                        why);
    }
    /* R = (I - S)(I + S)^-1 = A^T X, since I - S = (I + S)^T exactly */
    size_t mm = m * m;
    return clh_gemm_batched(ctx, 1, 0, m, m, m, 1.0f, a, m, mm, inv, m, mm, 0.0f, r, m, mm, n);
}

clh_status clh_cayley_forward(clh_ctx *ctx, const clh_tensor *raw, clh_tensor *r, clh_tensor *inv) {
    static const char fn[] = "clh_cayley_forward";
    CLH_TRY(clh_check_ctx(ctx, fn));
    CLH_TRY(clh_check_tensor(ctx, fn, "raw", raw));
    CLH_TRY(clh_check_tensor(ctx, fn, "r", r));
    CLH_TRY(clh_check_optional(ctx, fn, "inv", inv));
    size_t n = 0, m = 0;
    CLH_TRY(check_square_batch(ctx, fn, "raw", raw, &n, &m));
    CLH_TRY(clh_check_shape_is(ctx, fn, "r", r, 3, raw->shape));
    if (inv)
        CLH_TRY(clh_check_shape_is(ctx, fn, "inv", inv, 3, raw->shape));
    if (clh_overlaps(r, inv))
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT, "%s: r must not alias inv", fn);
    if (n == 0 || m == 0)
        return CLH_OK;
    size_t mark = clh_ws_mark(ctx);
    clh_tensor *tmp[2] = {NULL, NULL};
    clh_status st = cayley_forward_core(ctx, raw, r, inv, n, m, tmp);
    release_all(ctx, mark, tmp, 2);
    return st;
}

/* R = M X with M = I - S, X = A^-1, A = I + S. The chain rule gives
 *   dS = -dM + dA = -dR X^T - X^T (M^T dR) X^T = -(I + X^T A) dR X^T,
 * and because A + A^T = 2I (S is skew), I + X^T A = X^T (A^T + A) = 2 X^T, so
 *   dS = -2 X^T dR X^T,   draw = (dS - dS^T) / 2   (S = (raw - raw^T) / 2).
 * raw itself is not needed: X carries everything. */
static clh_status cayley_backward_core(clh_ctx *ctx, const clh_tensor *inv, const clh_tensor *dr,
                                       clh_tensor *draw, size_t n, size_t m, clh_tensor **tmp) {
    static const char fn[] = "clh_cayley_backward";
    CLH_TRY(ws_tensor(ctx, fn, 3, inv->shape, &tmp[0]));
    CLH_TRY(ws_tensor(ctx, fn, 3, inv->shape, &tmp[1]));
    clh_tensor *t1 = tmp[0], *ds = tmp[1];
    size_t mm = m * m;
    CLH_TRY(clh_gemm_batched(ctx, 0, 1, m, m, m, 1.0f, dr, m, mm, inv, m, mm, 0.0f, t1, m, mm, n));
    CLH_TRY(clh_gemm_batched(ctx, 1, 0, m, m, m, -2.0f, inv, m, mm, t1, m, mm, 0.0f, ds, m, mm, n));
    int n_i = (int)n, m_i = (int)m;
    clh_karg args[] = {CLH_KTENSOR(ds), CLH_KTENSOR(draw), CLH_KARG(n_i), CLH_KARG(m_i)};
    return clh_launch_2d(ctx, "cayley_skew_part", mm, n, NARGS(args), args);
}

clh_status clh_cayley_backward(clh_ctx *ctx, const clh_tensor *raw, const clh_tensor *inv,
                               const clh_tensor *dr, clh_tensor *draw) {
    static const char fn[] = "clh_cayley_backward";
    CLH_TRY(clh_check_ctx(ctx, fn));
    CLH_TRY(clh_check_tensor(ctx, fn, "raw", raw));
    CLH_TRY(clh_check_tensor(ctx, fn, "inv", inv));
    CLH_TRY(clh_check_tensor(ctx, fn, "dr", dr));
    CLH_TRY(clh_check_tensor(ctx, fn, "draw", draw));
    size_t n = 0, m = 0;
    CLH_TRY(check_square_batch(ctx, fn, "raw", raw, &n, &m));
    CLH_TRY(clh_check_shape_is(ctx, fn, "inv", inv, 3, raw->shape));
    CLH_TRY(clh_check_shape_is(ctx, fn, "dr", dr, 3, raw->shape));
    CLH_TRY(clh_check_shape_is(ctx, fn, "draw", draw, 3, raw->shape));
    if (clh_overlaps(draw, inv))
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT, "%s: draw must not alias inv", fn);
    if (n == 0 || m == 0)
        return CLH_OK;
    size_t mark = clh_ws_mark(ctx);
    clh_tensor *tmp[2] = {NULL, NULL};
    clh_status st = cayley_backward_core(ctx, inv, dr, draw, n, m, tmp);
    release_all(ctx, mark, tmp, 2);
    return st;
}

/* ------------------------------------------------------------------ DCRC */

/* Derived sizes of a layout. */
typedef struct dcrc_dims {
    int layers; /* L = max(text_layers, vision_layers) */
    int slots;  /* S = 4 L */
    int mods;   /* M = bt + bv */
    int blocks; /* raw blocks */
    int q;
} dcrc_dims;

static int layout_valid(const clh_dcrc_layout *l) {
    return l && l->q >= 1 && l->text_layers >= 0 && l->vision_layers >= 0 && l->text_blocks >= 0 &&
           l->vision_blocks >= 0 && (l->text_layers > 0 || l->vision_layers > 0) &&
           l->text_blocks + l->vision_blocks > 0 && l->q <= 4096 && l->text_layers <= 4096 &&
           l->vision_layers <= 4096 && l->text_blocks <= 4096 && l->vision_blocks <= 4096;
}

/* 0 for a NULL or invalid layout. */
int clh_dcrc_num_blocks(const clh_dcrc_layout *layout) {
    if (!layout_valid(layout))
        return 0;
    return 4 * (layout->text_layers * layout->text_blocks +
                layout->vision_layers * layout->vision_blocks);
}

static clh_status dcrc_layout_dims(clh_ctx *ctx, const char *fn, const clh_dcrc_layout *l,
                                   dcrc_dims *d) {
    if (!layout_valid(l)) {
        if (!l)
            return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT, "%s: layout is NULL", fn);
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT,
                        "%s: invalid layout (q = %d, text_layers = %d, vision_layers = %d, "
                        "text_blocks = %d, vision_blocks = %d): sizes must be in 0..4096, q >= 1, "
                        "with some layers and some blocks",
                        fn, l->q, l->text_layers, l->vision_layers, l->text_blocks,
                        l->vision_blocks);
    }
    d->layers = l->text_layers > l->vision_layers ? l->text_layers : l->vision_layers;
    d->slots = 4 * d->layers;
    d->mods = l->text_blocks + l->vision_blocks;
    d->blocks = clh_dcrc_num_blocks(l);
    d->q = l->q;
    if (d->blocks == 0)
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT,
                        "%s: the layout has no raw blocks (no layers with blocks)", fn);
    return CLH_OK;
}

/* P [q, q, S, M], A [L, M, M], B [S, S], raw-like [n_blocks, q, q]. */
static clh_status check_dcrc_tensors(clh_ctx *ctx, const char *fn, const dcrc_dims *d,
                                     const clh_tensor *p, const clh_tensor *a, const clh_tensor *b,
                                     const char *raw_name, const clh_tensor *raw) {
    const int64_t p_shape[4] = {d->q, d->q, d->slots, d->mods};
    const int64_t a_shape[3] = {d->layers, d->mods, d->mods};
    const int64_t b_shape[2] = {d->slots, d->slots};
    const int64_t raw_shape[3] = {d->blocks, d->q, d->q};
    CLH_TRY(clh_check_tensor(ctx, fn, "p", p));
    CLH_TRY(clh_check_shape_is(ctx, fn, "p", p, 4, p_shape));
    if (a) {
        CLH_TRY(clh_check_tensor(ctx, fn, "a", a));
        CLH_TRY(clh_check_shape_is(ctx, fn, "a", a, 3, a_shape));
    }
    if (b) {
        CLH_TRY(clh_check_tensor(ctx, fn, "b", b));
        CLH_TRY(clh_check_shape_is(ctx, fn, "b", b, 2, b_shape));
    }
    CLH_TRY(clh_check_tensor(ctx, fn, raw_name, raw));
    return clh_check_shape_is(ctx, fn, raw_name, raw, 3, raw_shape);
}

/* K [n_blocks, S*M]: K[(e,l,t,j), (s,m)] = B[4l+t, s] A_l[m_e(j), m], so that
 * raw = K . P2^T with P2 = P viewed as [q*q, S*M]. NULL a or b: identity (the kernel
 * reads a stand-in buffer it never touches). */
static clh_status dcrc_build_k(clh_ctx *ctx, const clh_dcrc_layout *l, const dcrc_dims *d,
                               const clh_tensor *p, const clh_tensor *a, const clh_tensor *b,
                               clh_tensor *k) {
    const clh_tensor *a_t = a ? a : p, *b_t = b ? b : p;
    int has_a = a != NULL, has_b = b != NULL;
    clh_karg args[] = {
        CLH_KTENSOR(a_t),         CLH_KARG(has_a),          CLH_KTENSOR(b_t),
        CLH_KARG(has_b),          CLH_KTENSOR(k),           CLH_KARG(d->blocks),
        CLH_KARG(l->text_layers), CLH_KARG(l->text_blocks), CLH_KARG(l->vision_blocks),
        CLH_KARG(d->slots),       CLH_KARG(d->mods)};
    return clh_launch_2d(ctx, "dcrc_build_k", (size_t)d->slots * (size_t)d->mods, (size_t)d->blocks,
                         NARGS(args), args);
}

static clh_status dcrc_forward_core(clh_ctx *ctx, const clh_dcrc_layout *l, const dcrc_dims *d,
                                    const clh_tensor *p, const clh_tensor *a, const clh_tensor *b,
                                    clh_tensor *raw, clh_tensor **tmp) {
    size_t sm = (size_t)d->slots * (size_t)d->mods, qq = (size_t)d->q * (size_t)d->q;
    int64_t k_shape[2] = {d->blocks, (int64_t)sm};
    CLH_TRY(ws_tensor(ctx, "clh_dcrc_forward", 2, k_shape, &tmp[0]));
    CLH_TRY(dcrc_build_k(ctx, l, d, p, a, b, tmp[0]));
    return clh_gemm(ctx, 0, 1, (size_t)d->blocks, qq, sm, 1.0f, tmp[0], sm, p, sm, 0.0f, raw, qq);
}

clh_status clh_dcrc_forward(clh_ctx *ctx, const clh_dcrc_layout *layout, const clh_tensor *p,
                            const clh_tensor *a, const clh_tensor *b, clh_tensor *raw) {
    static const char fn[] = "clh_dcrc_forward";
    CLH_TRY(clh_check_ctx(ctx, fn));
    dcrc_dims d;
    CLH_TRY(dcrc_layout_dims(ctx, fn, layout, &d));
    CLH_TRY(check_dcrc_tensors(ctx, fn, &d, p, a, b, "raw", raw));
    if (clh_overlaps(raw, p) || clh_overlaps(raw, a) || clh_overlaps(raw, b))
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT, "%s: raw must not alias p, a or b", fn);
    size_t mark = clh_ws_mark(ctx);
    clh_tensor *tmp[1] = {NULL};
    clh_status st = dcrc_forward_core(ctx, layout, &d, p, a, b, raw, tmp);
    release_all(ctx, mark, tmp, 1);
    return st;
}

/* dB and dA from dK = draw . P2 (each output element summed by one work-item). */
static clh_status dcrc_grad_maps(clh_ctx *ctx, const clh_dcrc_layout *l, const dcrc_dims *d,
                                 const clh_tensor *p, const clh_tensor *a, const clh_tensor *b,
                                 const clh_tensor *dk, clh_tensor *da, clh_tensor *db) {
    int has_a = a != NULL, has_b = b != NULL;
    const clh_tensor *a_t = a ? a : p, *b_t = b ? b : p;
    if (db) {
        clh_karg args[] = {CLH_KTENSOR(dk),          CLH_KTENSOR(a_t),
                           CLH_KARG(has_a),          CLH_KTENSOR(db),
                           CLH_KARG(l->text_layers), CLH_KARG(l->vision_layers),
                           CLH_KARG(l->text_blocks), CLH_KARG(l->vision_blocks),
                           CLH_KARG(d->slots),       CLH_KARG(d->mods)};
        CLH_TRY(clh_launch_2d(ctx, "dcrc_grad_b", (size_t)d->slots, (size_t)d->slots, NARGS(args),
                              args));
    }
    if (da) {
        clh_karg args[] = {CLH_KTENSOR(dk),          CLH_KTENSOR(b_t),
                           CLH_KARG(has_b),          CLH_KTENSOR(da),
                           CLH_KARG(l->text_layers), CLH_KARG(l->vision_layers),
                           CLH_KARG(l->text_blocks), CLH_KARG(l->vision_blocks),
                           CLH_KARG(d->slots),       CLH_KARG(d->mods)};
        CLH_TRY(clh_launch_2d(ctx, "dcrc_grad_a", (size_t)d->mods * (size_t)d->mods,
                              (size_t)d->layers, NARGS(args), args));
    }
    return CLH_OK;
}

static clh_status dcrc_backward_core(clh_ctx *ctx, const clh_dcrc_layout *l, const dcrc_dims *d,
                                     const clh_tensor *p, const clh_tensor *a, const clh_tensor *b,
                                     const clh_tensor *draw, clh_tensor *dp, clh_tensor *da,
                                     clh_tensor *db, clh_tensor **tmp) {
    static const char fn[] = "clh_dcrc_backward";
    size_t sm = (size_t)d->slots * (size_t)d->mods, qq = (size_t)d->q * (size_t)d->q;
    size_t nb = (size_t)d->blocks;
    int64_t k_shape[2] = {d->blocks, (int64_t)sm};
    if (dp) { /* dP2 += draw^T K */
        CLH_TRY(ws_tensor(ctx, fn, 2, k_shape, &tmp[0]));
        CLH_TRY(dcrc_build_k(ctx, l, d, p, a, b, tmp[0]));
        CLH_TRY(clh_gemm(ctx, 1, 0, qq, sm, nb, 1.0f, draw, qq, tmp[0], sm, 1.0f, dp, sm));
    }
    if (!da && !db)
        return CLH_OK;
    CLH_TRY(ws_tensor(ctx, fn, 2, k_shape, &tmp[1])); /* dK = draw P2 */
    CLH_TRY(clh_gemm(ctx, 0, 0, nb, sm, qq, 1.0f, draw, qq, p, sm, 0.0f, tmp[1], sm));
    return dcrc_grad_maps(ctx, l, d, p, a, b, tmp[1], da, db);
}

clh_status clh_dcrc_backward(clh_ctx *ctx, const clh_dcrc_layout *layout, const clh_tensor *p,
                             const clh_tensor *a, const clh_tensor *b, const clh_tensor *draw,
                             clh_tensor *dp, clh_tensor *da, clh_tensor *db) {
    static const char fn[] = "clh_dcrc_backward";
    CLH_TRY(clh_check_ctx(ctx, fn));
    dcrc_dims d;
    CLH_TRY(dcrc_layout_dims(ctx, fn, layout, &d));
    CLH_TRY(check_dcrc_tensors(ctx, fn, &d, p, a, b, "draw", draw));
    /* gradients have their parameter's shape, also where the parameter is NULL */
    const int64_t a_shape[3] = {d.layers, d.mods, d.mods};
    const int64_t b_shape[2] = {d.slots, d.slots};
    CLH_TRY(clh_check_optional(ctx, fn, "dp", dp));
    CLH_TRY(clh_check_optional(ctx, fn, "da", da));
    CLH_TRY(clh_check_optional(ctx, fn, "db", db));
    if (dp)
        CLH_TRY(clh_check_shape_is(ctx, fn, "dp", dp, 4, p->shape));
    if (da)
        CLH_TRY(clh_check_shape_is(ctx, fn, "da", da, 3, a_shape));
    if (db)
        CLH_TRY(clh_check_shape_is(ctx, fn, "db", db, 2, b_shape));
    const clh_tensor *grads[3] = {dp, da, db}, *inputs[4] = {p, a, b, draw};
    for (int i = 0; i < 3; i++)
        for (int j = 0; j < 4; j++)
            if (clh_overlaps(grads[i], inputs[j]))
                return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT,
                                "%s: the gradients must not alias p, a, b or draw", fn);
    if (!dp && !da && !db)
        return CLH_OK;
    size_t mark = clh_ws_mark(ctx);
    clh_tensor *tmp[2] = {NULL, NULL};
    clh_status st = dcrc_backward_core(ctx, layout, &d, p, a, b, draw, dp, da, db, tmp);
    release_all(ctx, mark, tmp, 2);
    return st;
}

/* ------------------------------------------------------------------ hyperspherical energy */

/* Gram tiles of at most this many floats (4 MB): rows of the energy are processed a
 * tile at a time, so memory stays O(n d + tile) for any n. */
#define HE_TILE_FLOATS ((size_t)1 << 20)

/* The vectors of w: nv vectors of length len, vector i element k at i * rs + k * cs. */
typedef struct he_geometry {
    size_t nv, len, rs, cs, tile;
} he_geometry;

static clh_status he_check(clh_ctx *ctx, const char *fn, const clh_tensor *w, int axis, float s,
                           he_geometry *g) {
    CLH_TRY(clh_check_ctx(ctx, fn));
    CLH_TRY(clh_check_tensor(ctx, fn, "w", w));
    if (w->ndim != 2) {
        char sh[128];
        clh_shape_str(w->ndim, w->shape, sh, sizeof sh);
        return clh_fail(ctx, CLH_ERR_SHAPE, "%s: w has shape %s, expected a matrix [n, d]", fn, sh);
    }
    if (axis != 0 && axis != 1)
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT,
                        "%s: axis = %d must be 0 (rows) or 1 (columns)", fn, axis);
    if (!(s >= 0.0f) || !isfinite(s))
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT,
                        "%s: s = %g must be finite and >= 0 (0: logarithmic energy)", fn,
                        (double)s);
    size_t rows = (size_t)w->shape[0], cols = (size_t)w->shape[1];
    g->nv = axis == 0 ? rows : cols;
    g->len = axis == 0 ? cols : rows;
    g->rs = axis == 0 ? cols : 1;
    g->cs = axis == 0 ? 1 : cols;
    if (g->len == 0 && g->nv > 1)
        return clh_fail(ctx, CLH_ERR_SHAPE, "%s: the %s of w have length 0", fn,
                        axis == 0 ? "rows" : "columns");
    g->tile = g->nv ? HE_TILE_FLOATS / g->nv : 1;
    if (g->tile < 1)
        g->tile = 1;
    if (g->tile > g->nv)
        g->tile = g->nv;
    return CLH_OK;
}

/* Workspace: what [nv, len], norms [nv], sq [nv], per-vector sums [nv], Gram tile
 * [tile, nv]; filled with the normalised vectors. */
static clh_status he_prepare(clh_ctx *ctx, const char *fn, const clh_tensor *w,
                             const he_geometry *g, clh_tensor **tmp) {
    int64_t vec_shape[2] = {(int64_t)g->nv, (int64_t)g->len}, one[1] = {(int64_t)g->nv};
    int64_t tile_shape[2] = {(int64_t)g->tile, (int64_t)g->nv};
    CLH_TRY(ws_tensor(ctx, fn, 2, vec_shape, &tmp[0]));
    CLH_TRY(ws_tensor(ctx, fn, 1, one, &tmp[1]));
    CLH_TRY(ws_tensor(ctx, fn, 1, one, &tmp[2]));
    CLH_TRY(ws_tensor(ctx, fn, 1, one, &tmp[3]));
    CLH_TRY(ws_tensor(ctx, fn, 2, tile_shape, &tmp[4]));
    int rs = (int)g->rs, cs = (int)g->cs, nv = (int)g->nv, len = (int)g->len;
    clh_karg args[] = {CLH_KTENSOR(w),      CLH_KARG(rs),        CLH_KARG(cs),
                       CLH_KARG(nv),        CLH_KARG(len),       CLH_KTENSOR(tmp[0]),
                       CLH_KTENSOR(tmp[1]), CLH_KTENSOR(tmp[2]), CLH_KLOCAL(0)};
    return clh_launch_rows(ctx, "he_normalize", g->nv, NARGS(args), args);
}

/* Gram tile rows i0 .. i0 + rows - 1 against all vectors: gram = what[i0:] what^T. */
static clh_status he_gram(clh_ctx *ctx, const he_geometry *g, clh_tensor *what, size_t i0,
                          size_t rows, clh_tensor *gram) {
    clh_tensor *block = NULL;
    CLH_TRY(window(what, i0 * g->len, rows * g->len, &block));
    clh_status st = clh_gemm(ctx, 0, 1, rows, g->nv, g->len, 1.0f, block, g->len, what, g->len,
                             0.0f, gram, g->nv);
    clh_tensor_release(block);
    return st;
}

/* Sum of the per-vector partial energies, in double on the host. */
static clh_status he_sum(clh_ctx *ctx, const clh_tensor *partial, size_t n, double *energy) {
    float *host = malloc(n * sizeof *host);
    if (!host)
        return clh_fail(ctx, CLH_ERR_OUT_OF_MEMORY,
                        "clh_hyperspherical_energy: out of host memory");
    clh_status st = clh_tensor_download(partial, host, n);
    double total = 0.0;
    for (size_t i = 0; i < n; i++)
        total += host[i];
    free(host);
    if (st == CLH_OK)
        *energy = total;
    return st;
}

static clh_status he_forward_core(clh_ctx *ctx, const clh_tensor *w, const he_geometry *g, float s,
                                  double *energy, clh_tensor **tmp) {
    static const char fn[] = "clh_hyperspherical_energy";
    CLH_TRY(he_prepare(ctx, fn, w, g, tmp));
    clh_tensor *what = tmp[0], *sq = tmp[2], *partial = tmp[3], *gram = tmp[4];
    int nv = (int)g->nv;
    for (size_t i0 = 0; i0 < g->nv; i0 += g->tile) {
        size_t rows = g->nv - i0 < g->tile ? g->nv - i0 : g->tile;
        CLH_TRY(he_gram(ctx, g, what, i0, rows, gram));
        int i0_i = (int)i0, rows_i = (int)rows;
        clh_karg args[] = {CLH_KTENSOR(gram),    CLH_KTENSOR(sq), CLH_KARG(i0_i),
                           CLH_KARG(rows_i),     CLH_KARG(nv),    CLH_KARG(s),
                           CLH_KTENSOR(partial), CLH_KLOCAL(0)};
        CLH_TRY(clh_launch_rows(ctx, "he_energy_rows", rows, NARGS(args), args));
    }
    return he_sum(ctx, partial, g->nv, energy);
}

clh_status clh_hyperspherical_energy(clh_ctx *ctx, const clh_tensor *w, int axis, float s,
                                     double *energy) {
    static const char fn[] = "clh_hyperspherical_energy";
    he_geometry g;
    CLH_TRY(he_check(ctx, fn, w, axis, s, &g));
    if (!energy)
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT, "%s: energy is NULL", fn);
    *energy = 0.0;
    if (g.nv < 2)
        return CLH_OK; /* no pairs */
    size_t mark = clh_ws_mark(ctx);
    clh_tensor *tmp[5] = {NULL, NULL, NULL, NULL, NULL};
    clh_status st = he_forward_core(ctx, w, &g, s, energy, tmp);
    release_all(ctx, mark, tmp, 5);
    return st;
}

/* E = sum_{i != j} f(d_ij): dE/dwhat_i = sum_j C_ij (what_i - what_j) with
 * C_ij = 2 f'(d_ij) / d_ij (each pair counted in both orders), i.e.
 * dWhat = diag(rowsum C) What - C What, taken a tile of rows at a time; then through
 * the normalisation into dw. */
static clh_status he_backward_core(clh_ctx *ctx, const clh_tensor *w, const he_geometry *g, float s,
                                   float scale, clh_tensor *dw, clh_tensor **tmp) {
    static const char fn[] = "clh_hyperspherical_energy_backward";
    CLH_TRY(he_prepare(ctx, fn, w, g, tmp));
    int64_t vec_shape[2] = {(int64_t)g->nv, (int64_t)g->len};
    CLH_TRY(ws_tensor(ctx, fn, 2, vec_shape, &tmp[5]));
    clh_tensor *what = tmp[0], *norms = tmp[1], *sq = tmp[2], *csum = tmp[3], *gram = tmp[4];
    clh_tensor *y = tmp[5];
    int nv = (int)g->nv, len = (int)g->len;
    for (size_t i0 = 0; i0 < g->nv; i0 += g->tile) {
        size_t rows = g->nv - i0 < g->tile ? g->nv - i0 : g->tile;
        CLH_TRY(he_gram(ctx, g, what, i0, rows, gram));
        int i0_i = (int)i0, rows_i = (int)rows;
        clh_karg args[] = {CLH_KTENSOR(gram), CLH_KTENSOR(sq), CLH_KARG(i0_i),    CLH_KARG(rows_i),
                           CLH_KARG(nv),      CLH_KARG(s),     CLH_KTENSOR(csum), CLH_KLOCAL(0)};
        CLH_TRY(clh_launch_rows(ctx, "he_coeff_rows", rows, NARGS(args), args));
        clh_tensor *y_rows = NULL;
        CLH_TRY(window(y, i0 * g->len, rows * g->len, &y_rows));
        clh_status st = clh_gemm(ctx, 0, 0, rows, g->len, g->nv, -1.0f, gram, g->nv, what, g->len,
                                 0.0f, y_rows, g->len);
        clh_tensor_release(y_rows);
        CLH_TRY(st);
    }
    int rs = (int)g->rs, cs = (int)g->cs;
    clh_karg args[] = {CLH_KTENSOR(what), CLH_KTENSOR(y), CLH_KTENSOR(csum), CLH_KTENSOR(norms),
                       CLH_KARG(nv),      CLH_KARG(len),  CLH_KARG(scale),   CLH_KTENSOR(dw),
                       CLH_KARG(rs),      CLH_KARG(cs),   CLH_KLOCAL(0)};
    return clh_launch_rows(ctx, "he_backward_rows", g->nv, NARGS(args), args);
}

clh_status clh_hyperspherical_energy_backward(clh_ctx *ctx, const clh_tensor *w, int axis, float s,
                                              float scale, clh_tensor *dw) {
    static const char fn[] = "clh_hyperspherical_energy_backward";
    he_geometry g;
    CLH_TRY(he_check(ctx, fn, w, axis, s, &g));
    CLH_TRY(clh_check_tensor(ctx, fn, "dw", dw));
    CLH_TRY(clh_check_shape_is(ctx, fn, "dw", dw, 2, w->shape));
    if (!isfinite(scale))
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT, "%s: scale = %g is not finite", fn,
                        (double)scale);
    if (g.nv < 2)
        return CLH_OK; /* no pairs: zero gradient */
    size_t mark = clh_ws_mark(ctx);
    clh_tensor *tmp[6] = {NULL, NULL, NULL, NULL, NULL, NULL};
    clh_status st = he_backward_core(ctx, w, &g, s, scale, dw, tmp);
    release_all(ctx, mark, tmp, 6);
    return st;
}
