/* Forward layers: argument and shape checks on the host, the work in the kernels
 * (elementwise.cl, norm.cl, attention.cl, embed.cl) and CLBlast (gemm.c). */
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "layer_util.h"

/* ------------------------------------------------------------------ checks */

/* ------------------------------------------------------------------ launch helpers */

/* ------------------------------------------------------------------ linear */

clh_status clh_linear(clh_ctx *ctx, const clh_tensor *x, const clh_tensor *w, const clh_tensor *b,
                      clh_tensor *y) {
    static const char fn[] = "clh_linear";
    CLH_TRY(clh_check_ctx(ctx, fn));
    CLH_TRY(clh_check_tensor(ctx, fn, "x", x));
    CLH_TRY(clh_check_tensor(ctx, fn, "w", w));
    CLH_TRY(clh_check_tensor(ctx, fn, "y", y));
    if (b)
        CLH_TRY(clh_check_tensor(ctx, fn, "b", b));
    if (w->ndim != 2 || x->ndim < 1 || clh_last_dim(x) != w->shape[1])
        return clh_shape_fail(ctx, fn, "x", x, "w", w,
                              "w must be [out, in] with in = x's last dim");
    size_t in = (size_t)w->shape[1], out = (size_t)w->shape[0];
    size_t rows = in ? x->numel / in : 0;
    if (y->ndim < 1 || (size_t)clh_last_dim(y) != out || y->numel != rows * out)
        return clh_shape_fail(ctx, fn, "w", w, "y", y,
                              "y must hold %zu rows of %zu (x has %zu rows)", rows, out, rows);
    if (b && b->numel != out)
        return clh_shape_fail(ctx, fn, "w", w, "b", b, "b must have %zu elements", out);
    if (clh_overlaps(x, y))
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT, "%s: y must not alias x", fn);
    if (rows == 0 || out == 0)
        return CLH_OK;
    if (!b)
        return clh_gemm(ctx, 0, 1, rows, out, in, 1.0f, x, in, w, in, 0.0f, y, out);
    /* Seed y with the bias rows, then accumulate x W^T onto it. */
    int rows_i = (int)rows, out_i = (int)out;
    clh_karg args[] = {CLH_KTENSOR(y), CLH_KTENSOR(b), CLH_KARG(rows_i), CLH_KARG(out_i)};
    CLH_TRY(clh_launch_2d(ctx, "broadcast_rows", out, rows, 6, args));
    return clh_gemm(ctx, 0, 1, rows, out, in, 1.0f, x, in, w, in, 1.0f, y, out);
}

/* ------------------------------------------------------------------ row reductions */

clh_status clh_layer_norm(clh_ctx *ctx, const clh_tensor *x, const clh_tensor *gamma,
                          const clh_tensor *beta, float eps, clh_tensor *y) {
    static const char fn[] = "clh_layer_norm";
    CLH_TRY(clh_check_ctx(ctx, fn));
    CLH_TRY(clh_check_tensor(ctx, fn, "x", x));
    CLH_TRY(clh_check_tensor(ctx, fn, "gamma", gamma));
    CLH_TRY(clh_check_tensor(ctx, fn, "beta", beta));
    CLH_TRY(clh_check_tensor(ctx, fn, "y", y));
    if (x->ndim < 1)
        return clh_shape_fail(ctx, fn, "x", x, "y", y, "x needs at least one dimension");
    CLH_TRY(clh_check_same_rows(ctx, fn, "x", x, "y", y));
    int64_t d = clh_last_dim(x);
    if ((int64_t)gamma->numel != d)
        return clh_shape_fail(ctx, fn, "x", x, "gamma", gamma, "gamma must have %lld elements",
                              (long long)d);
    if ((int64_t)beta->numel != d)
        return clh_shape_fail(ctx, fn, "x", x, "beta", beta, "beta must have %lld elements",
                              (long long)d);
    if (!(eps >= 0.0f))
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT, "%s: eps = %g must be >= 0", fn,
                        (double)eps);
    if (x->numel == 0)
        return CLH_OK;
    int rows = (int)(x->numel / (size_t)d), cols = (int)d;
    clh_karg args[] = {CLH_KTENSOR(x), CLH_KTENSOR(gamma), CLH_KTENSOR(beta), CLH_KTENSOR(y),
                       CLH_KARG(rows), CLH_KARG(cols),     CLH_KARG(eps),     CLH_KLOCAL(0)};
    if (clh_use_row_items(ctx))
        return clh_launch_row_items(ctx, "layer_norm_item", (size_t)rows, 11, args);
    return clh_launch_rows(ctx, "layer_norm", (size_t)rows, 12, args);
}

/* Softmax over rows of length cols; causal masking restarts every rows_per_block rows. */
static clh_status softmax_rows(clh_ctx *ctx, const clh_tensor *x, clh_tensor *y, size_t rows,
                               size_t rows_per_block, size_t cols, float scale, int causal) {
    int rows_i = (int)rows, block_i = (int)rows_per_block, cols_i = (int)cols;
    int causal_i = causal != 0;
    clh_karg args[] = {CLH_KTENSOR(x),   CLH_KTENSOR(y),  CLH_KARG(rows_i),   CLH_KARG(block_i),
                       CLH_KARG(cols_i), CLH_KARG(scale), CLH_KARG(causal_i), CLH_KLOCAL(0)};
    if (clh_use_row_items(ctx))
        return clh_launch_row_items(ctx, "softmax_item", rows, 9, args);
    return clh_launch_rows(ctx, "softmax", rows, 10, args);
}

clh_status clh_softmax(clh_ctx *ctx, const clh_tensor *x, float scale, int causal, clh_tensor *y) {
    static const char fn[] = "clh_softmax";
    CLH_TRY(clh_check_ctx(ctx, fn));
    CLH_TRY(clh_check_tensor(ctx, fn, "x", x));
    CLH_TRY(clh_check_tensor(ctx, fn, "y", y));
    if (x->ndim < 1)
        return clh_shape_fail(ctx, fn, "x", x, "y", y, "x needs at least one dimension");
    CLH_TRY(clh_check_same_rows(ctx, fn, "x", x, "y", y));
    if (x->numel == 0)
        return CLH_OK;
    size_t cols = (size_t)clh_last_dim(x);
    size_t lq = x->ndim >= 2 ? (size_t)x->shape[x->ndim - 2] : 1;
    return softmax_rows(ctx, x, y, x->numel / cols, lq, cols, scale, causal);
}

clh_status clh_l2_normalize(clh_ctx *ctx, const clh_tensor *x, clh_tensor *y) {
    static const char fn[] = "clh_l2_normalize";
    CLH_TRY(clh_check_ctx(ctx, fn));
    CLH_TRY(clh_check_tensor(ctx, fn, "x", x));
    CLH_TRY(clh_check_tensor(ctx, fn, "y", y));
    if (x->ndim < 1)
        return clh_shape_fail(ctx, fn, "x", x, "y", y, "x needs at least one dimension");
    CLH_TRY(clh_check_same_rows(ctx, fn, "x", x, "y", y));
    if (x->numel == 0)
        return CLH_OK;
    int cols = (int)clh_last_dim(x), rows = (int)(x->numel / (size_t)cols);
    clh_karg args[] = {CLH_KTENSOR(x), CLH_KTENSOR(y), CLH_KARG(rows), CLH_KARG(cols),
                       CLH_KLOCAL(0)};
    if (clh_use_row_items(ctx))
        return clh_launch_row_items(ctx, "l2_normalize_item", (size_t)rows, 6, args);
    return clh_launch_rows(ctx, "l2_normalize", (size_t)rows, 7, args);
}

/* ------------------------------------------------------------------ attention */

/* [N, L, H*hd] <-> [N*H, L, hd] */
static clh_status permute_heads(clh_ctx *ctx, const char *kernel, const clh_tensor *src,
                                clh_tensor *dst, size_t n, size_t len, int heads, size_t head_dim) {
    int rows = (int)(n * len), len_i = (int)len, hd = (int)head_dim;
    clh_karg args[] = {CLH_KTENSOR(src), CLH_KTENSOR(dst), CLH_KARG(rows),
                       CLH_KARG(len_i),  CLH_KARG(heads),  CLH_KARG(hd)};
    return clh_launch_2d(ctx, kernel, (size_t)heads * head_dim, n * len, 8, args);
}

static clh_status check_attention(clh_ctx *ctx, const clh_tensor *q, const clh_tensor *k,
                                  const clh_tensor *v, int heads, const clh_tensor *out) {
    static const char fn[] = "clh_attention";
    CLH_TRY(clh_check_ctx(ctx, fn));
    CLH_TRY(clh_check_tensor(ctx, fn, "q", q));
    CLH_TRY(clh_check_tensor(ctx, fn, "k", k));
    CLH_TRY(clh_check_tensor(ctx, fn, "v", v));
    CLH_TRY(clh_check_tensor(ctx, fn, "out", out));
    if (q->ndim != 3)
        return clh_shape_fail(ctx, fn, "q", q, "k", k, "q must be [N, L, D]");
    if (k->ndim != 3 || k->shape[0] != q->shape[0] || k->shape[2] != q->shape[2])
        return clh_shape_fail(ctx, fn, "q", q, "k", k, "k must be [N, Lk, D] with q's N and D");
    if (v->ndim != 3 || v->shape[0] != k->shape[0] || v->shape[1] != k->shape[1] ||
        v->shape[2] != k->shape[2])
        return clh_shape_fail(ctx, fn, "k", k, "v", v, "v must have k's shape");
    if (out->ndim != 3 || out->shape[0] != q->shape[0] || out->shape[1] != q->shape[1] ||
        out->shape[2] != q->shape[2])
        return clh_shape_fail(ctx, fn, "q", q, "out", out, "out must have q's shape");
    if (heads < 1 || q->shape[2] % heads != 0)
        return clh_fail(ctx, CLH_ERR_SHAPE, "%s: heads = %d does not divide D = %lld", fn, heads,
                        (long long)q->shape[2]);
    return CLH_OK;
}

/* Per-head layout [N*H, L, hd] makes each head one contiguous matrix, so the scores
 * and the weighted sum are two strided-batched GEMMs. The output of P.V reuses the
 * permuted q (no longer needed), and the softmax runs in place on the scores. */
static clh_status attention_core(clh_ctx *ctx, const clh_tensor *q, const clh_tensor *k,
                                 const clh_tensor *v, int heads, int causal, clh_tensor *out,
                                 clh_tensor **tmp) {
    size_t n = (size_t)q->shape[0], lq = (size_t)q->shape[1], lk = (size_t)k->shape[1];
    size_t hd = (size_t)q->shape[2] / (size_t)heads, nh = n * (size_t)heads;
    int64_t q_shape[3] = {(int64_t)nh, (int64_t)lq, (int64_t)hd};
    int64_t kv_shape[3] = {(int64_t)nh, (int64_t)lk, (int64_t)hd};
    int64_t s_shape[3] = {(int64_t)nh, (int64_t)lq, (int64_t)lk};
    CLH_TRY(clh_ws_tensor(ctx, 3, q_shape, &tmp[0]));
    CLH_TRY(clh_ws_tensor(ctx, 3, kv_shape, &tmp[1]));
    CLH_TRY(clh_ws_tensor(ctx, 3, kv_shape, &tmp[2]));
    CLH_TRY(clh_ws_tensor(ctx, 3, s_shape, &tmp[3]));
    clh_tensor *qh = tmp[0], *kh = tmp[1], *vh = tmp[2], *scores = tmp[3];
    if (scores->offset + scores->numel > (size_t)INT_MAX)
        return clh_fail(ctx, CLH_ERR_UNSUPPORTED,
                        "clh_attention: the score matrix (%zu elements) is beyond what kernels "
                        "can index",
                        scores->numel);

    CLH_TRY(permute_heads(ctx, "split_heads", q, qh, n, lq, heads, hd));
    CLH_TRY(permute_heads(ctx, "split_heads", k, kh, n, lk, heads, hd));
    CLH_TRY(permute_heads(ctx, "split_heads", v, vh, n, lk, heads, hd));
    CLH_TRY(clh_gemm_batched(ctx, 0, 1, lq, lk, hd, 1.0f, qh, hd, lq * hd, kh, hd, lk * hd, 0.0f,
                             scores, lk, lq * lk, nh));
    float scale = (float)(1.0 / sqrt((double)hd));
    CLH_TRY(softmax_rows(ctx, scores, scores, nh * lq, lq, lk, scale, causal));
    CLH_TRY(clh_gemm_batched(ctx, 0, 0, lq, hd, lk, 1.0f, scores, lk, lq * lk, vh, hd, lk * hd,
                             0.0f, qh, hd, lq * hd, nh));
    return permute_heads(ctx, "merge_heads", qh, out, n, lq, heads, hd);
}

/* Head dimension of the fused kernel (attention_fused_hd64 in kernels/attention.cl). */
#define FUSED_HEAD_DIM 64
#define FUSED_ROWS     4  /* query rows per work-item (FA_TQ) */
#define FUSED_KEYS     16 /* keys per block (one float16) */

/* Flash-style attention without the score matrix: K transposed once into the workspace,
 * then one kernel for QK^T, the (causal) online softmax and the product with V. */
static clh_status attention_fused(clh_ctx *ctx, const clh_tensor *q, const clh_tensor *k,
                                  const clh_tensor *v, int heads, int causal, clh_tensor *out,
                                  clh_tensor **kt_out) {
    size_t n = (size_t)q->shape[0], lq = (size_t)q->shape[1], lk = (size_t)k->shape[1];
    size_t nh = n * (size_t)heads, hd = FUSED_HEAD_DIM;
    size_t lpad = (lk + FUSED_KEYS - 1) / FUSED_KEYS * FUSED_KEYS;
    int64_t kt_shape[3] = {(int64_t)nh, (int64_t)hd, (int64_t)lpad};
    CLH_TRY(clh_ws_tensor(ctx, 3, kt_shape, kt_out));
    clh_tensor *kt = *kt_out;
    if (kt->offset + kt->numel > (size_t)INT_MAX)
        return clh_fail(ctx, CLH_ERR_UNSUPPORTED,
                        "clh_attention: the transposed keys (%zu elements) are beyond what "
                        "kernels can index",
                        kt->numel);
    int lq_i = (int)lq, lk_i = (int)lk, lpad_i = (int)lpad, hd_i = (int)hd, causal_i = causal != 0;
    clh_karg targs[] = {CLH_KTENSOR(k),   CLH_KTENSOR(kt), CLH_KARG(lk_i),
                        CLH_KARG(lpad_i), CLH_KARG(heads), CLH_KARG(hd_i)};
    size_t tglobal[3] = {lpad, hd, nh};
    CLH_TRY(clh_launch(ctx, "attention_k_transpose", 3, tglobal, NULL, NARGS(targs), targs));
    float scale = (float)(1.0 / sqrt((double)hd));
    clh_karg args[] = {CLH_KTENSOR(q),     CLH_KTENSOR(kt), CLH_KTENSOR(v),   CLH_KTENSOR(out),
                       CLH_KARG(lq_i),     CLH_KARG(lk_i),  CLH_KARG(lpad_i), CLH_KARG(heads),
                       CLH_KARG(causal_i), CLH_KARG(scale)};
    /* One work-item per group on CPUs: PoCL's work-group vectoriser makes this explicitly
     * vectorised kernel 2x slower (measured); clh_launch clamps the GPU size to the limit. */
    size_t global[2] = {(lq + FUSED_ROWS - 1) / FUSED_ROWS, nh};
    size_t local[2] = {ctx->info.is_cpu ? 1 : 64, 1};
    return clh_launch(ctx, "attention_fused_hd64", 2, global, local, NARGS(args), args);
}

/* Fused kernel or the GEMM composition? $CLHCLIP_ATTENTION = fused | gemm | auto (read per
 * call; auto when unset). The fused kernel exists for head_dim 64 only and needs out apart
 * from k and v (other work-items still read them while out is written); elsewhere, and
 * for "gemm", the GEMM path runs. auto: fused on CPU devices (measured faster there: see
 * the report of issue 5), GEMM elsewhere (GPUs keep CLBlast's batched GEMMs). */
static clh_status attention_wants_fused(clh_ctx *ctx, const clh_tensor *q, const clh_tensor *k,
                                        const clh_tensor *v, int heads, const clh_tensor *out,
                                        int *fused) {
    const char *mode = getenv("CLHCLIP_ATTENTION");
    int want;
    if (!mode || !*mode || strcmp(mode, "auto") == 0)
        want = ctx->info.is_cpu;
    else if (strcmp(mode, "fused") == 0)
        want = 1;
    else if (strcmp(mode, "gemm") == 0)
        want = 0;
    else
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT,
                        "clh_attention: CLHCLIP_ATTENTION='%s' is not one of fused, gemm, auto",
                        mode);
    int supported =
        q->shape[2] / heads == FUSED_HEAD_DIM && !clh_overlaps(out, k) && !clh_overlaps(out, v);
    *fused = want && supported;
    return CLH_OK;
}

clh_status clh_attention(clh_ctx *ctx, const clh_tensor *q, const clh_tensor *k,
                         const clh_tensor *v, int heads, int causal, clh_tensor *out) {
    CLH_TRY(check_attention(ctx, q, k, v, heads, out));
    if (q->numel == 0 || k->numel == 0)
        return CLH_OK;
    int fused = 0;
    CLH_TRY(attention_wants_fused(ctx, q, k, v, heads, out, &fused));
    size_t mark = clh_ws_mark(ctx);
    clh_tensor *tmp[4] = {NULL, NULL, NULL, NULL};
    clh_status st = fused ? attention_fused(ctx, q, k, v, heads, causal, out, &tmp[0])
                          : attention_core(ctx, q, k, v, heads, causal, out, tmp);
    for (int i = 0; i < 4; i++)
        clh_tensor_release(tmp[i]);
    clh_ws_reset(ctx, mark);
    return st;
}

/* ------------------------------------------------------------------ elementwise */

static clh_status unary(clh_ctx *ctx, const char *fn, const char *kernel, const clh_tensor *x,
                        clh_tensor *y) {
    CLH_TRY(clh_check_ctx(ctx, fn));
    CLH_TRY(clh_check_tensor(ctx, fn, "x", x));
    CLH_TRY(clh_check_tensor(ctx, fn, "y", y));
    CLH_TRY(clh_check_same_numel(ctx, fn, "x", x, "y", y));
    int n = (int)x->numel;
    clh_karg args[] = {CLH_KTENSOR(x), CLH_KTENSOR(y), CLH_KARG(n)};
    return clh_launch_1d(ctx, kernel, x->numel, 5, args);
}

clh_status clh_quick_gelu(clh_ctx *ctx, const clh_tensor *x, clh_tensor *y) {
    return unary(ctx, "clh_quick_gelu", "quick_gelu", x, y);
}

clh_status clh_gelu(clh_ctx *ctx, const clh_tensor *x, clh_tensor *y) {
    return unary(ctx, "clh_gelu", "gelu", x, y);
}

clh_status clh_add(clh_ctx *ctx, const clh_tensor *a, const clh_tensor *b, clh_tensor *y) {
    static const char fn[] = "clh_add";
    CLH_TRY(clh_check_ctx(ctx, fn));
    CLH_TRY(clh_check_tensor(ctx, fn, "a", a));
    CLH_TRY(clh_check_tensor(ctx, fn, "b", b));
    CLH_TRY(clh_check_tensor(ctx, fn, "y", y));
    CLH_TRY(clh_check_same_numel(ctx, fn, "a", a, "b", b));
    CLH_TRY(clh_check_same_numel(ctx, fn, "a", a, "y", y));
    int n = (int)a->numel;
    clh_karg args[] = {CLH_KTENSOR(a), CLH_KTENSOR(b), CLH_KTENSOR(y), CLH_KARG(n)};
    return clh_launch_1d(ctx, "add", a->numel, 7, args);
}

clh_status clh_add_bias(clh_ctx *ctx, clh_tensor *x, const clh_tensor *bias) {
    static const char fn[] = "clh_add_bias";
    CLH_TRY(clh_check_ctx(ctx, fn));
    CLH_TRY(clh_check_tensor(ctx, fn, "x", x));
    CLH_TRY(clh_check_tensor(ctx, fn, "bias", bias));
    if (x->ndim < 1 || (int64_t)bias->numel != clh_last_dim(x))
        return clh_shape_fail(ctx, fn, "x", x, "bias", bias,
                              "bias must have as many elements as x's last dim");
    if (x->numel == 0)
        return CLH_OK;
    int cols = (int)clh_last_dim(x), rows = (int)(x->numel / (size_t)cols);
    clh_karg args[] = {CLH_KTENSOR(x), CLH_KTENSOR(bias), CLH_KARG(rows), CLH_KARG(cols)};
    return clh_launch_2d(ctx, "add_bias", (size_t)cols, (size_t)rows, 6, args);
}

clh_status clh_add_rows(clh_ctx *ctx, clh_tensor *x, const clh_tensor *rows) {
    static const char fn[] = "clh_add_rows";
    CLH_TRY(clh_check_ctx(ctx, fn));
    CLH_TRY(clh_check_tensor(ctx, fn, "x", x));
    CLH_TRY(clh_check_tensor(ctx, fn, "rows", rows));
    if (x->ndim != 3)
        return clh_shape_fail(ctx, fn, "x", x, "rows", rows, "x must be [N, L, D]");
    size_t period = (size_t)(x->shape[1] * x->shape[2]);
    if (rows->numel != period || rows->ndim < 1 || clh_last_dim(rows) != x->shape[2])
        return clh_shape_fail(ctx, fn, "x", x, "rows", rows, "rows must be [L, D] = [%lld, %lld]",
                              (long long)x->shape[1], (long long)x->shape[2]);
    if (x->numel == 0)
        return CLH_OK;
    int batch = (int)x->shape[0], period_i = (int)period;
    clh_karg args[] = {CLH_KTENSOR(x), CLH_KTENSOR(rows), CLH_KARG(batch), CLH_KARG(period_i)};
    return clh_launch_2d(ctx, "add_rows", period, (size_t)batch, 6, args);
}

/* ------------------------------------------------------------------ gathers */

/* y[r, :] = x[index[r], :] for a table x of `count` rows; indices are checked first. */
static clh_status gather(clh_ctx *ctx, const char *fn, const char *what, const clh_tensor *x,
                         size_t count, const int32_t *index, size_t n, clh_tensor *y) {
    if (n > 0 && !index)
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT, "%s: %s is NULL with n = %zu", fn, what, n);
    for (size_t i = 0; i < n; i++)
        if (index[i] < 0 || (size_t)index[i] >= count)
            return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT, "%s: %s[%zu] = %d is outside [0, %zu)",
                            fn, what, i, (int)index[i], count);
    if (clh_overlaps(x, y))
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT, "%s: y must not alias the table", fn);
    if (n == 0 || y->numel == 0)
        return CLH_OK;
    cl_mem indices;
    CLH_TRY(clh_upload_ints(ctx, index, n, &indices));
    int rows = (int)n, cols = (int)clh_last_dim(x);
    clh_karg args[] = {CLH_KTENSOR(x), CLH_KARG(indices), CLH_KTENSOR(y), CLH_KARG(rows),
                       CLH_KARG(cols)};
    return clh_launch_2d(ctx, "gather_rows", (size_t)cols, n, 7, args);
}

static clh_status check_gather_shapes(clh_ctx *ctx, const char *fn, const char *table_name,
                                      const clh_tensor *x, size_t n, const clh_tensor *y) {
    int64_t d = clh_last_dim(x);
    if (y->ndim < 1 || clh_last_dim(y) != d || y->numel != n * (size_t)d)
        return clh_shape_fail(ctx, fn, table_name, x, "y", y, "y must be [%zu, %lld]", n,
                              (long long)d);
    return CLH_OK;
}

clh_status clh_embedding(clh_ctx *ctx, const int32_t *ids, size_t n, const clh_tensor *table,
                         clh_tensor *y) {
    static const char fn[] = "clh_embedding";
    CLH_TRY(clh_check_ctx(ctx, fn));
    CLH_TRY(clh_check_tensor(ctx, fn, "table", table));
    CLH_TRY(clh_check_tensor(ctx, fn, "y", y));
    if (table->ndim != 2)
        return clh_shape_fail(ctx, fn, "table", table, "y", y, "table must be [V, D]");
    CLH_TRY(check_gather_shapes(ctx, fn, "table", table, n, y));
    return gather(ctx, fn, "ids", table, (size_t)table->shape[0], ids, n, y);
}

clh_status clh_gather_rows(clh_ctx *ctx, const clh_tensor *x, const int32_t *index, size_t n,
                           clh_tensor *y) {
    static const char fn[] = "clh_gather_rows";
    CLH_TRY(clh_check_ctx(ctx, fn));
    CLH_TRY(clh_check_tensor(ctx, fn, "x", x));
    CLH_TRY(clh_check_tensor(ctx, fn, "y", y));
    if (x->ndim < 2)
        return clh_shape_fail(ctx, fn, "x", x, "y", y, "x must have at least 2 dims [.., D]");
    CLH_TRY(check_gather_shapes(ctx, fn, "x", x, n, y));
    size_t d = (size_t)clh_last_dim(x);
    return gather(ctx, fn, "index", x, d ? x->numel / d : 0, index, n, y);
}

/* ------------------------------------------------------------------ patch embedding */

static clh_status check_patch_embed(clh_ctx *ctx, const clh_tensor *img, const clh_tensor *weight,
                                    const clh_tensor *out) {
    static const char fn[] = "clh_patch_embed";
    CLH_TRY(clh_check_ctx(ctx, fn));
    CLH_TRY(clh_check_tensor(ctx, fn, "img", img));
    CLH_TRY(clh_check_tensor(ctx, fn, "weight", weight));
    CLH_TRY(clh_check_tensor(ctx, fn, "out", out));
    if (img->ndim != 4)
        return clh_shape_fail(ctx, fn, "img", img, "weight", weight, "img must be [N, C, H, W]");
    if (weight->ndim != 4 || weight->shape[1] != img->shape[1] ||
        weight->shape[2] != weight->shape[3] || weight->shape[2] < 1)
        return clh_shape_fail(ctx, fn, "img", img, "weight", weight,
                              "weight must be [D, C, p, p] with img's C");
    int64_t p = weight->shape[2];
    if (img->shape[2] % p != 0 || img->shape[3] % p != 0)
        return clh_shape_fail(ctx, fn, "img", img, "weight", weight,
                              "H and W must be multiples of the patch size %lld", (long long)p);
    int64_t cells = (img->shape[2] / p) * (img->shape[3] / p);
    if (out->ndim != 3 || out->shape[0] != img->shape[0] || out->shape[1] != cells ||
        out->shape[2] != weight->shape[0])
        return clh_shape_fail(ctx, fn, "img", img, "out", out, "out must be [%lld, %lld, %lld]",
                              (long long)img->shape[0], (long long)cells,
                              (long long)weight->shape[0]);
    return CLH_OK;
}

/* Patch matrix [N*g*g, C*p*p] in the workspace, then out = patches * W^T. */
static clh_status patch_embed_core(clh_ctx *ctx, const clh_tensor *img, const clh_tensor *weight,
                                   clh_tensor *out, clh_tensor **cols) {
    int batch = (int)img->shape[0], channels = (int)img->shape[1];
    int height = (int)img->shape[2], width = (int)img->shape[3], patch = (int)weight->shape[2];
    size_t rows = (size_t)out->shape[0] * (size_t)out->shape[1];
    size_t row_len = (size_t)channels * (size_t)patch * (size_t)patch;
    int64_t shape[2] = {(int64_t)rows, (int64_t)row_len};
    CLH_TRY(clh_ws_tensor(ctx, 2, shape, cols));
    if ((*cols)->offset + (*cols)->numel > (size_t)INT_MAX)
        return clh_fail(ctx, CLH_ERR_UNSUPPORTED,
                        "clh_patch_embed: the patch matrix (%zu elements) is beyond what kernels "
                        "can index",
                        (*cols)->numel);
    clh_karg args[] = {CLH_KTENSOR(img), CLH_KTENSOR(*cols), CLH_KARG(batch), CLH_KARG(channels),
                       CLH_KARG(height), CLH_KARG(width),    CLH_KARG(patch)};
    CLH_TRY(clh_launch_2d(ctx, "im2col_patches", row_len, rows, 9, args));
    size_t d = (size_t)weight->shape[0];
    return clh_gemm(ctx, 0, 1, rows, d, row_len, 1.0f, *cols, row_len, weight, row_len, 0.0f, out,
                    d);
}

clh_status clh_patch_embed(clh_ctx *ctx, const clh_tensor *img, const clh_tensor *weight,
                           clh_tensor *out) {
    CLH_TRY(check_patch_embed(ctx, img, weight, out));
    if (out->numel == 0)
        return CLH_OK;
    size_t mark = clh_ws_mark(ctx);
    clh_tensor *cols = NULL;
    clh_status st = patch_embed_core(ctx, img, weight, out, &cols);
    clh_tensor_release(cols);
    clh_ws_reset(ctx, mark);
    return st;
}

/* ------------------------------------------------------------------ bicubic resize */

clh_status clh_bicubic_resize(clh_ctx *ctx, const clh_tensor *x, clh_tensor *y) {
    static const char fn[] = "clh_bicubic_resize";
    CLH_TRY(clh_check_ctx(ctx, fn));
    CLH_TRY(clh_check_tensor(ctx, fn, "x", x));
    CLH_TRY(clh_check_tensor(ctx, fn, "y", y));
    if (x->ndim != 3 || y->ndim != 3 || x->shape[0] != y->shape[0])
        return clh_shape_fail(ctx, fn, "x", x, "y", y, "x must be [C, H, W] and y [C, H2, W2]");
    if (clh_overlaps(x, y))
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT, "%s: y must not alias x", fn);
    if (y->numel == 0)
        return CLH_OK;
    if (x->numel == 0)
        return clh_shape_fail(ctx, fn, "x", x, "y", y, "cannot resize an empty image");
    int channels = (int)x->shape[0], in_h = (int)x->shape[1], in_w = (int)x->shape[2];
    int out_h = (int)y->shape[1], out_w = (int)y->shape[2];
    /* torch: static_cast<float>(input_size) / output_size */
    float scale_h = (float)in_h / (float)out_h, scale_w = (float)in_w / (float)out_w;
    clh_karg args[] = {CLH_KTENSOR(x),  CLH_KTENSOR(y),    CLH_KARG(channels),
                       CLH_KARG(in_h),  CLH_KARG(in_w),    CLH_KARG(out_h),
                       CLH_KARG(out_w), CLH_KARG(scale_h), CLH_KARG(scale_w)};
    return clh_launch_2d(ctx, "bicubic_resize", (size_t)out_w, (size_t)channels * (size_t)out_h, 11,
                         args);
}
