/* Attention and utility ops of the CAT-Seg head (head_ops.h): Swin window attention, linear
 * (elu + 1) attention, the 0213 permutation, row concatenation with broadcast, row max and
 * the per-class BCE loss. Argument and shape checks here, the work in kernels/head_attn.cl.
 * The attention ops are fused kernels that never materialise the score matrices in global
 * memory; their backward passes recompute the scores. The window attention and the row
 * concatenation have two kernel families (CLHCLIP_HATTN_KERNELS, see runs_mode): one
 * work-item per query / element (GPUs) and work-items looping over contiguous runs (CPUs). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "head_ops.h"
#include "layer_util.h"

/* Must match HATTN_MAX_HD in kernels/head_attn.cl. */
#define MAX_HEAD_DIM 128

/* ------------------------------------------------------------------ shared checks */

static clh_status check_positive(clh_ctx *ctx, const char *fn, const char *name, long long value) {
    if (value < 1)
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT, "%s: %s must be >= 1, got %lld", fn, name,
                        value);
    return CLH_OK;
}

/* t must have ref's shape. */
static clh_status check_like(clh_ctx *ctx, const char *fn, const char *ref_name,
                             const clh_tensor *ref, const char *name, const clh_tensor *t) {
    CLH_TRY(clh_check_tensor(ctx, fn, name, t));
    return clh_check_same_shape(ctx, fn, ref_name, ref, name, t);
}

/* q is [N, L, D] with no empty dimension, heads divides D and the head width fits the
 * kernels' private arrays. */
static clh_status check_heads(clh_ctx *ctx, const char *fn, const clh_tensor *q, int heads) {
    if (q->ndim != 3 || q->shape[0] < 1 || q->shape[1] < 1 || q->shape[2] < 1)
        return clh_shape_fail(ctx, fn, "q", q, "q", q, "q must be [N, tokens, D], nonempty");
    CLH_TRY(check_positive(ctx, fn, "heads", heads));
    int64_t dim = q->shape[2];
    if (dim % heads != 0)
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT,
                        "%s: heads (%d) must divide D = %lld (the last dimension of q)", fn, heads,
                        (long long)dim);
    if (dim / heads > MAX_HEAD_DIM)
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT,
                        "%s: head width D / heads = %lld exceeds the supported %d", fn,
                        (long long)(dim / heads), MAX_HEAD_DIM);
    return CLH_OK;
}

/* q, k, v (and the extra tensors, all of q's shape) exist, outputs alias no input and no
 * other output. */
static clh_status check_qkv(clh_ctx *ctx, const char *fn, const clh_tensor *q, const clh_tensor *k,
                            const clh_tensor *v, const clh_tensor *dout, int n_out,
                            const char *const *out_names, const clh_tensor *const *outs) {
    CLH_TRY(clh_check_ctx(ctx, fn));
    CLH_TRY(clh_check_tensor(ctx, fn, "q", q));
    CLH_TRY(check_like(ctx, fn, "q", q, "k", k));
    CLH_TRY(check_like(ctx, fn, "q", q, "v", v));
    if (dout)
        CLH_TRY(check_like(ctx, fn, "q", q, "dout", dout));
    const clh_tensor *ins[] = {q, k, v, dout};
    const char *in_names[] = {"q", "k", "v", "dout"};
    for (int o = 0; o < n_out; o++) {
        CLH_TRY(check_like(ctx, fn, "q", q, out_names[o], outs[o]));
        for (int i = 0; i < 4; i++)
            CLH_TRY(clh_check_no_alias(ctx, fn, out_names[o], outs[o], in_names[i], ins[i]));
        for (int p = 0; p < o; p++)
            CLH_TRY(clh_check_no_alias(ctx, fn, out_names[o], outs[o], out_names[p], outs[p]));
    }
    return CLH_OK;
}

/* A workspace vector of n floats. */
static clh_status ws_vector(clh_ctx *ctx, size_t n, clh_tensor **out) {
    int64_t shape[1] = {(int64_t)(n ? n : 1)};
    return clh_ws_tensor(ctx, 1, shape, out);
}

/* ------------------------------------------------------------------ window attention */

typedef struct win_args {
    int total, grid_h, grid_w, window, shift, heads, dim, hd;
    float scale;
} win_args;

static clh_status check_window_attention(clh_ctx *ctx, const char *fn, const clh_tensor *q,
                                         int grid_h, int grid_w, int window, int shift, int heads,
                                         win_args *a) {
    CLH_TRY(check_heads(ctx, fn, q, heads));
    CLH_TRY(check_positive(ctx, fn, "grid_h", grid_h));
    CLH_TRY(check_positive(ctx, fn, "grid_w", grid_w));
    CLH_TRY(check_positive(ctx, fn, "window", window));
    if (grid_h % window != 0 || grid_w % window != 0)
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT,
                        "%s: the grid %d x %d is not a multiple of window = %d", fn, grid_h, grid_w,
                        window);
    if (shift < 0 || shift >= window)
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT, "%s: shift = %d must be in [0, window = %d)",
                        fn, shift, window);
    if (q->shape[1] != (int64_t)grid_h * grid_w)
        return clh_shape_fail(ctx, fn, "q", q, "q", q, "q's tokens must be grid_h * grid_w = %lld",
                              (long long)grid_h * grid_w);
    int hd = (int)(q->shape[2] / heads);
    *a = (win_args){.total = (int)(q->numel / hd),
                    .grid_h = grid_h,
                    .grid_w = grid_w,
                    .window = window,
                    .shift = shift,
                    .heads = heads,
                    .dim = (int)q->shape[2],
                    .hd = hd,
                    .scale = 1.0f / sqrtf((float)hd)};
    return CLH_OK;
}

/* Launch plan of the work-group-per-block ("runs") kernels: one work-group per (sequence,
 * window, head) block, P = window^2 positions staged in local memory. */
typedef struct win_runs {
    int use;        /* 0: the per-item kernels run instead */
    int blocks;     /* work-groups */
    size_t len;     /* P */
    size_t local;   /* work-items per group */
    size_t scratch; /* bytes of the per-item score rows */
} win_runs;

/* CLHCLIP_HATTN_KERNELS selects the kernels of the window attention and the row
 * concatenation: "runs" (work-items that loop over contiguous runs: a work-group per window
 * block, a work-item per run of a row), "items" (one work-item per query, key or element) or
 * "auto" (default: runs on CPU devices, where the run loops vectorise and divisions are
 * rare, measured 5x+ faster on PoCL; items elsewhere, where they coalesce). */
static clh_status runs_mode(clh_ctx *ctx, const char *fn, int *want_runs, int *forced) {
    const char *mode = getenv("CLHCLIP_HATTN_KERNELS");
    *forced = 0;
    if (!mode || !*mode || strcmp(mode, "auto") == 0) {
        *want_runs = ctx->info.is_cpu;
        return CLH_OK;
    }
    *forced = 1;
    if (strcmp(mode, "runs") == 0 || strcmp(mode, "items") == 0) {
        *want_runs = strcmp(mode, "runs") == 0;
        return CLH_OK;
    }
    return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT,
                    "%s: CLHCLIP_HATTN_KERNELS must be auto, runs or items, got \"%s\"", fn, mode);
}

/* Sizes the runs kernel: `mats` [P, hd] float arrays, `vecs` [P] 4-byte arrays and
 * `rows_per_item` score rows of P floats per work-item must fit the device's local memory
 * (the group shrinks until they do). When they cannot, auto mode falls back to the
 * per-item kernels and a forced "runs" fails. */
static clh_status window_runs_plan(clh_ctx *ctx, const char *fn, const char *kernel,
                                   const win_args *a, int mats, int vecs, int rows_per_item,
                                   win_runs *r) {
    int want = 0, forced = 0;
    CLH_TRY(runs_mode(ctx, fn, &want, &forced));
    r->use = 0;
    if (!want)
        return CLH_OK;
    r->len = (size_t)a->window * (size_t)a->window;
    r->blocks = (int)((size_t)a->total / r->len);
    size_t fixed = ((size_t)mats * (size_t)a->hd + (size_t)vecs) * r->len * sizeof(float);
    size_t row = (size_t)rows_per_item * r->len * sizeof(float);
    CLH_TRY(clh_group_size(ctx, kernel, r->len < 64 ? r->len : 64, &r->local));
    while (r->local > 1 && fixed + r->local * row > ctx->info.local_mem)
        r->local /= 2;
    r->scratch = r->local * row;
    r->use = fixed + r->scratch <= ctx->info.local_mem;
    if (!r->use && forced)
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT,
                        "%s: window %d x %d with head width %d needs %zu bytes of local memory; "
                        "the device has %llu (unset CLHCLIP_HATTN_KERNELS=runs)",
                        fn, a->window, a->window, a->hd, fixed + r->scratch,
                        (unsigned long long)ctx->info.local_mem);
    return CLH_OK;
}

static clh_status launch_runs(clh_ctx *ctx, const char *kernel, const win_runs *r, int nargs,
                              const clh_karg *args) {
    size_t global[1] = {(size_t)r->blocks * r->local}, local[1] = {r->local};
    return clh_launch(ctx, kernel, 1, global, local, nargs, args);
}

clh_status clh_window_attention_forward(clh_ctx *ctx, const clh_tensor *q, const clh_tensor *k,
                                        const clh_tensor *v, int grid_h, int grid_w, int window,
                                        int shift, int heads, clh_tensor *out) {
    static const char fn[] = "clh_window_attention_forward";
    const char *names[] = {"out"};
    const clh_tensor *outs[] = {out};
    CLH_TRY(check_qkv(ctx, fn, q, k, v, NULL, 1, names, outs));
    win_args a;
    CLH_TRY(check_window_attention(ctx, fn, q, grid_h, grid_w, window, shift, heads, &a));
    win_runs r;
    CLH_TRY(window_runs_plan(ctx, fn, "hattn_window_forward_runs", &a, 2, 2, 1, &r));
    if (r.use) {
        size_t mat = r.len * (size_t)a.hd * sizeof(float), vec = r.len * sizeof(int);
        clh_karg args[] = {CLH_KTENSOR(q),     CLH_KTENSOR(k),       CLH_KTENSOR(v),
                           CLH_KTENSOR(out),   CLH_KARG(r.blocks),   CLH_KARG(a.grid_h),
                           CLH_KARG(a.grid_w), CLH_KARG(a.window),   CLH_KARG(a.shift),
                           CLH_KARG(a.heads),  CLH_KARG(a.dim),      CLH_KARG(a.scale),
                           CLH_KLOCAL(mat),    CLH_KLOCAL(mat),      CLH_KLOCAL(vec),
                           CLH_KLOCAL(vec),    CLH_KLOCAL(r.scratch)};
        return launch_runs(ctx, "hattn_window_forward_runs", &r, NARGS(args), args);
    }
    clh_karg args[] = {CLH_KTENSOR(q),     CLH_KTENSOR(k),     CLH_KTENSOR(v),
                       CLH_KTENSOR(out),   CLH_KARG(a.total),  CLH_KARG(a.grid_h),
                       CLH_KARG(a.grid_w), CLH_KARG(a.window), CLH_KARG(a.shift),
                       CLH_KARG(a.heads),  CLH_KARG(a.dim),    CLH_KARG(a.scale)};
    return clh_launch_1d(ctx, "hattn_window_forward", (size_t)a.total, NARGS(args), args);
}

/* The runs kernels of the backward (plans sized by window_runs_plan). */
static clh_status window_backward_runs(clh_ctx *ctx, const clh_tensor *q, const clh_tensor *k,
                                       const clh_tensor *v, const clh_tensor *dout,
                                       const win_args *a, const win_runs *rq, const win_runs *rk,
                                       clh_tensor *stats, clh_tensor *dq, clh_tensor *dk,
                                       clh_tensor *dv) {
    size_t mat = rq->len * (size_t)a->hd * sizeof(float), vec = rq->len * sizeof(int);
    clh_karg qargs[] = {
        CLH_KTENSOR(q),      CLH_KTENSOR(k),      CLH_KTENSOR(v),       CLH_KTENSOR(dout),
        CLH_KTENSOR(dq),     CLH_KTENSOR(stats),  CLH_KARG(rq->blocks), CLH_KARG(a->grid_h),
        CLH_KARG(a->grid_w), CLH_KARG(a->window), CLH_KARG(a->shift),   CLH_KARG(a->heads),
        CLH_KARG(a->dim),    CLH_KARG(a->scale),  CLH_KLOCAL(mat),      CLH_KLOCAL(mat),
        CLH_KLOCAL(mat),     CLH_KLOCAL(vec),     CLH_KLOCAL(vec),      CLH_KLOCAL(rq->scratch)};
    CLH_TRY(launch_runs(ctx, "hattn_window_backward_q_runs", rq, NARGS(qargs), qargs));
    clh_karg kargs[] = {
        CLH_KTENSOR(q),      CLH_KTENSOR(k),      CLH_KTENSOR(v),      CLH_KTENSOR(dout),
        CLH_KTENSOR(stats),  CLH_KTENSOR(dk),     CLH_KTENSOR(dv),     CLH_KARG(rk->blocks),
        CLH_KARG(a->grid_h), CLH_KARG(a->grid_w), CLH_KARG(a->window), CLH_KARG(a->shift),
        CLH_KARG(a->heads),  CLH_KARG(a->dim),    CLH_KARG(a->scale),  CLH_KLOCAL(mat),
        CLH_KLOCAL(mat),     CLH_KLOCAL(mat),     CLH_KLOCAL(mat),     CLH_KLOCAL(vec),
        CLH_KLOCAL(vec),     CLH_KLOCAL(vec),     CLH_KLOCAL(vec),     CLH_KLOCAL(rk->scratch)};
    return launch_runs(ctx, "hattn_window_backward_kv_runs", rk, NARGS(kargs), kargs);
}

static clh_status window_backward_kernels(clh_ctx *ctx, const char *fn, const clh_tensor *q,
                                          const clh_tensor *k, const clh_tensor *v,
                                          const clh_tensor *dout, const win_args *a,
                                          clh_tensor *stats, clh_tensor *dq, clh_tensor *dk,
                                          clh_tensor *dv) {
    win_runs rq, rk;
    CLH_TRY(window_runs_plan(ctx, fn, "hattn_window_backward_q_runs", a, 3, 2, 2, &rq));
    CLH_TRY(window_runs_plan(ctx, fn, "hattn_window_backward_kv_runs", a, 4, 4, 2, &rk));
    if (rq.use && rk.use)
        return window_backward_runs(ctx, q, k, v, dout, a, &rq, &rk, stats, dq, dk, dv);
    clh_karg qargs[] = {CLH_KTENSOR(q),      CLH_KTENSOR(k),      CLH_KTENSOR(v),
                        CLH_KTENSOR(dout),   CLH_KTENSOR(dq),     CLH_KTENSOR(stats),
                        CLH_KARG(a->total),  CLH_KARG(a->grid_h), CLH_KARG(a->grid_w),
                        CLH_KARG(a->window), CLH_KARG(a->shift),  CLH_KARG(a->heads),
                        CLH_KARG(a->dim),    CLH_KARG(a->scale)};
    CLH_TRY(clh_launch_1d(ctx, "hattn_window_backward_q", (size_t)a->total, NARGS(qargs), qargs));
    clh_karg kargs[] = {CLH_KTENSOR(q),      CLH_KTENSOR(k),      CLH_KTENSOR(v),
                        CLH_KTENSOR(dout),   CLH_KTENSOR(stats),  CLH_KTENSOR(dk),
                        CLH_KTENSOR(dv),     CLH_KARG(a->total),  CLH_KARG(a->grid_h),
                        CLH_KARG(a->grid_w), CLH_KARG(a->window), CLH_KARG(a->shift),
                        CLH_KARG(a->heads),  CLH_KARG(a->dim),    CLH_KARG(a->scale)};
    return clh_launch_1d(ctx, "hattn_window_backward_kv", (size_t)a->total, NARGS(kargs), kargs);
}

clh_status clh_window_attention_backward(clh_ctx *ctx, const clh_tensor *q, const clh_tensor *k,
                                         const clh_tensor *v, int grid_h, int grid_w, int window,
                                         int shift, int heads, const clh_tensor *dout,
                                         clh_tensor *dq, clh_tensor *dk, clh_tensor *dv) {
    static const char fn[] = "clh_window_attention_backward";
    const char *names[] = {"dq", "dk", "dv"};
    const clh_tensor *outs[] = {dq, dk, dv};
    CLH_TRY(clh_check_tensor(ctx, fn, "dout", dout));
    CLH_TRY(check_qkv(ctx, fn, q, k, v, dout, 3, names, outs));
    win_args a;
    CLH_TRY(check_window_attention(ctx, fn, q, grid_h, grid_w, window, shift, heads, &a));
    size_t mark = clh_ws_mark(ctx);
    clh_tensor *stats = NULL; /* (logsumexp, dout . out) per query and head */
    clh_status st = ws_vector(ctx, 2 * (size_t)a.total, &stats);
    if (st == CLH_OK)
        st = window_backward_kernels(ctx, fn, q, k, v, dout, &a, stats, dq, dk, dv);
    clh_tensor_release(stats);
    clh_ws_reset(ctx, mark);
    return st;
}

/* ------------------------------------------------------------------ linear attention */

typedef struct lin_args {
    int seq, heads, dim;
    int blocks;     /* N * heads * head width: work-items of the kv kernels */
    int rows;       /* N * seq * heads: work-items of the per-row kernels */
    size_t kv_size; /* floats of the [N heads, hd, hd + 1] kv buffer */
} lin_args;

static clh_status check_linear_attention(clh_ctx *ctx, const char *fn, const clh_tensor *q,
                                         int heads, float eps, lin_args *a) {
    CLH_TRY(check_heads(ctx, fn, q, heads));
    if (!(eps >= 0.0f) || isinf(eps))
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT, "%s: eps must be finite and >= 0, got %g",
                        fn, (double)eps);
    int64_t n = q->shape[0], hd = q->shape[2] / heads;
    a->seq = (int)q->shape[1];
    a->heads = heads;
    a->dim = (int)q->shape[2];
    a->blocks = (int)(n * heads * hd);
    a->rows = (int)(n * q->shape[1] * heads);
    a->kv_size = (size_t)a->blocks * (size_t)(hd + 1);
    if (a->kv_size >= (size_t)INT32_MAX)
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT, "%s: too many sequences (%lld)", fn,
                        (long long)n);
    return CLH_OK;
}

/* kv[n, h] = phi(K)^T [V | 1] per sequence and head. */
static clh_status linear_kv(clh_ctx *ctx, const clh_tensor *k, const clh_tensor *v,
                            const lin_args *a, clh_tensor *kv) {
    clh_karg args[] = {CLH_KTENSOR(k),   CLH_KTENSOR(v),     CLH_KTENSOR(kv), CLH_KARG(a->blocks),
                       CLH_KARG(a->seq), CLH_KARG(a->heads), CLH_KARG(a->dim)};
    return clh_launch_1d(ctx, "hattn_linear_kv", (size_t)a->blocks, NARGS(args), args);
}

/* Forward rows (backward == 0: out) or dq and the per-row stats (backward != 0). */
static clh_status linear_rows(clh_ctx *ctx, const clh_tensor *q, const clh_tensor *kv, float eps,
                              int backward, const clh_tensor *dout, clh_tensor *stats,
                              const lin_args *a, clh_tensor *out) {
    clh_karg args[] = {CLH_KTENSOR(q),     CLH_KTENSOR(kv),    CLH_KARG(eps),
                       CLH_KTENSOR(out),   CLH_KARG(backward), CLH_KTENSOR(dout),
                       CLH_KTENSOR(stats), CLH_KARG(a->rows),  CLH_KARG(a->seq),
                       CLH_KARG(a->heads), CLH_KARG(a->dim)};
    return clh_launch_1d(ctx, "hattn_linear_rows", (size_t)a->rows, NARGS(args), args);
}

clh_status clh_linear_attention_forward(clh_ctx *ctx, const clh_tensor *q, const clh_tensor *k,
                                        const clh_tensor *v, int heads, float eps,
                                        clh_tensor *out) {
    static const char fn[] = "clh_linear_attention_forward";
    const char *names[] = {"out"};
    const clh_tensor *outs[] = {out};
    CLH_TRY(check_qkv(ctx, fn, q, k, v, NULL, 1, names, outs));
    lin_args a;
    CLH_TRY(check_linear_attention(ctx, fn, q, heads, eps, &a));
    size_t mark = clh_ws_mark(ctx);
    clh_tensor *kv = NULL;
    clh_status st = ws_vector(ctx, a.kv_size, &kv);
    if (st == CLH_OK)
        st = linear_kv(ctx, k, v, &a, kv);
    /* dout and stats are unused in the forward: pass any valid buffers */
    if (st == CLH_OK)
        st = linear_rows(ctx, q, kv, eps, 0, q, kv, &a, out);
    clh_tensor_release(kv);
    clh_ws_reset(ctx, mark);
    return st;
}

/* kv, then dq with the row stats, then dkv, then dk and dv. */
static clh_status linear_backward_kernels(clh_ctx *ctx, const clh_tensor *q, const clh_tensor *k,
                                          const clh_tensor *v, float eps, const clh_tensor *dout,
                                          const lin_args *a, clh_tensor *kv, clh_tensor *stats,
                                          clh_tensor *dq, clh_tensor *dk, clh_tensor *dv) {
    CLH_TRY(linear_kv(ctx, k, v, a, kv));
    CLH_TRY(linear_rows(ctx, q, kv, eps, 1, dout, stats, a, dq));
    clh_tensor *dkv = kv; /* kv is no longer needed */
    clh_karg args[] = {CLH_KTENSOR(q),     CLH_KTENSOR(dout),   CLH_KTENSOR(stats),
                       CLH_KTENSOR(dkv),   CLH_KARG(a->blocks), CLH_KARG(a->seq),
                       CLH_KARG(a->heads), CLH_KARG(a->dim)};
    CLH_TRY(clh_launch_1d(ctx, "hattn_linear_dkv", (size_t)a->blocks, NARGS(args), args));
    clh_karg kargs[] = {CLH_KTENSOR(k),   CLH_KTENSOR(v),     CLH_KTENSOR(dkv),
                        CLH_KTENSOR(dk),  CLH_KTENSOR(dv),    CLH_KARG(a->rows),
                        CLH_KARG(a->seq), CLH_KARG(a->heads), CLH_KARG(a->dim)};
    return clh_launch_1d(ctx, "hattn_linear_dkdv", (size_t)a->rows, NARGS(kargs), kargs);
}

clh_status clh_linear_attention_backward(clh_ctx *ctx, const clh_tensor *q, const clh_tensor *k,
                                         const clh_tensor *v, int heads, float eps,
                                         const clh_tensor *dout, clh_tensor *dq, clh_tensor *dk,
                                         clh_tensor *dv) {
    static const char fn[] = "clh_linear_attention_backward";
    const char *names[] = {"dq", "dk", "dv"};
    const clh_tensor *outs[] = {dq, dk, dv};
    CLH_TRY(clh_check_tensor(ctx, fn, "dout", dout));
    CLH_TRY(check_qkv(ctx, fn, q, k, v, dout, 3, names, outs));
    lin_args a;
    CLH_TRY(check_linear_attention(ctx, fn, q, heads, eps, &a));
    size_t mark = clh_ws_mark(ctx);
    clh_tensor *kv = NULL, *stats = NULL;
    clh_status st = ws_vector(ctx, a.kv_size, &kv);
    if (st == CLH_OK)
        st = ws_vector(ctx, 2 * (size_t)a.rows, &stats);
    if (st == CLH_OK)
        st = linear_backward_kernels(ctx, q, k, v, eps, dout, &a, kv, stats, dq, dk, dv);
    clh_tensor_release(kv);
    clh_tensor_release(stats);
    clh_ws_reset(ctx, mark);
    return st;
}

/* ------------------------------------------------------------------ permutation */

static clh_status transpose_tiles(clh_ctx *ctx, const clh_tensor *x, int64_t d0, int64_t rows,
                                  int64_t cols, clh_tensor *y) {
    enum { TILE = 16 };
    int r = (int)rows, c = (int)cols;
    size_t row_tiles = (size_t)(rows + TILE - 1) / TILE,
           col_tiles = (size_t)(cols + TILE - 1) / TILE;
    size_t global[2] = {col_tiles * TILE, (size_t)d0 * row_tiles * TILE};
    size_t local[2] = {TILE, TILE};
    clh_karg args[] = {CLH_KTENSOR(x), CLH_KTENSOR(y), CLH_KARG(r), CLH_KARG(c)};
    return clh_launch(ctx, "hattn_transpose_tiles", 2, global, local, NARGS(args), args);
}

/* Can the 16 x 16 tiled transpose run as written (the launch would otherwise shrink it)? */
static int tiles_fit(clh_ctx *ctx) {
    size_t limit = 0;
    if (clh_kernel_wg_size(ctx, "hattn_transpose_tiles", &limit) != CLH_OK)
        return 0;
    const size_t *items = ctx->info.max_work_item_sizes;
    return limit >= 256 && (!items[0] || items[0] >= 16) && (!items[1] || items[1] >= 16);
}

clh_status clh_permute_0213(clh_ctx *ctx, const clh_tensor *x, int64_t d0, int64_t d1, int64_t d2,
                            int64_t d3, clh_tensor *y) {
    static const char fn[] = "clh_permute_0213";
    CLH_TRY(clh_check_ctx(ctx, fn));
    CLH_TRY(clh_check_tensor(ctx, fn, "x", x));
    CLH_TRY(clh_check_tensor(ctx, fn, "y", y));
    int64_t dims[4] = {d0, d1, d2, d3};
    const char *dim_names[4] = {"d0", "d1", "d2", "d3"};
    for (int i = 0; i < 4; i++)
        CLH_TRY(check_positive(ctx, fn, dim_names[i], dims[i]));
    if (d0 * d1 > INT32_MAX || d0 * d1 * d2 > INT32_MAX || d0 * d1 * d2 * d3 != (int64_t)x->numel)
        return clh_shape_fail(ctx, fn, "x", x, "y", y,
                              "x must have d0 d1 d2 d3 = %lld x %lld x %lld x %lld elements",
                              (long long)d0, (long long)d1, (long long)d2, (long long)d3);
    CLH_TRY(clh_check_same_numel(ctx, fn, "x", x, "y", y));
    CLH_TRY(clh_check_no_alias(ctx, fn, "y", y, "x", x));
    if (d3 == 1 && d1 > 1 && d2 > 1 && tiles_fit(ctx))
        return transpose_tiles(ctx, x, d0, d1, d2, y);
    int i1 = (int)d1, i2 = (int)d2, i3 = (int)d3, total = (int)x->numel;
    if (d3 >= 16) { /* runs of d3 contiguous elements: one work-item each */
        int runs = (int)(d0 * d1 * d2);
        clh_karg args[] = {CLH_KTENSOR(x), CLH_KTENSOR(y), CLH_KARG(i1),
                           CLH_KARG(i2),   CLH_KARG(i3),   CLH_KARG(runs)};
        return clh_launch_1d(ctx, "hattn_permute_runs", (size_t)runs, NARGS(args), args);
    }
    clh_karg args[] = {CLH_KTENSOR(x), CLH_KTENSOR(y), CLH_KARG(i1),
                       CLH_KARG(i2),   CLH_KARG(i3),   CLH_KARG(total)};
    return clh_launch_1d(ctx, "hattn_permute_0213", x->numel, NARGS(args), args);
}

/* ------------------------------------------------------------------ row concatenation */

typedef struct concat_args {
    int ca, cb, repeat, inner;
    size_t rows_a, rows_b; /* rows of a (and y), of b */
} concat_args;

static clh_status check_concat(clh_ctx *ctx, const char *fn, int64_t ca, int64_t cb, int64_t outer,
                               int64_t repeat, int64_t inner, concat_args *a) {
    CLH_TRY(clh_check_ctx(ctx, fn));
    if (ca < 0 || cb < 0 || ca + cb < 1)
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT,
                        "%s: ca = %lld and cb = %lld must be >= 0 with a positive sum", fn,
                        (long long)ca, (long long)cb);
    CLH_TRY(check_positive(ctx, fn, "outer", outer));
    CLH_TRY(check_positive(ctx, fn, "repeat", repeat));
    CLH_TRY(check_positive(ctx, fn, "inner", inner));
    if (outer * repeat > INT32_MAX || outer * repeat * inner > INT32_MAX ||
        outer * repeat * inner * (ca + cb) > INT32_MAX)
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT, "%s: the output has 2^31 or more elements",
                        fn);
    *a = (concat_args){.ca = (int)ca,
                       .cb = (int)cb,
                       .repeat = (int)repeat,
                       .inner = (int)inner,
                       .rows_a = (size_t)(outer * repeat * inner),
                       .rows_b = (size_t)(outer * inner)};
    return CLH_OK;
}

/* t (may be NULL when it holds no elements) has exactly rows * cols elements. */
static clh_status check_rows(clh_ctx *ctx, const char *fn, const char *name, const clh_tensor *t,
                             size_t rows, int cols) {
    if (!t && cols == 0)
        return CLH_OK;
    CLH_TRY(clh_check_tensor(ctx, fn, name, t));
    if (t->numel != rows * (size_t)cols) {
        char s[128];
        clh_shape_str(t->ndim, t->shape, s, sizeof s);
        return clh_fail(ctx, CLH_ERR_SHAPE, "%s: %s %s must have %zu x %d = %zu elements", fn, name,
                        s, rows, cols, rows * (size_t)cols);
    }
    return CLH_OK;
}

/* Runs of HATTN_RUN (kernels/head_attn.cl) elements per row of `cols`. */
static int runs_per_row(int cols) {
    enum { RUN = 256 };
    return (cols + RUN - 1) / RUN;
}

clh_status clh_concat_rows(clh_ctx *ctx, const clh_tensor *a, int64_t ca, const clh_tensor *b,
                           int64_t cb, int64_t outer, int64_t repeat, int64_t inner,
                           clh_tensor *y) {
    static const char fn[] = "clh_concat_rows";
    concat_args c;
    CLH_TRY(check_concat(ctx, fn, ca, cb, outer, repeat, inner, &c));
    CLH_TRY(check_rows(ctx, fn, "a", a, c.rows_a, c.ca));
    CLH_TRY(check_rows(ctx, fn, "b", b, c.rows_b, c.cb));
    CLH_TRY(check_rows(ctx, fn, "y", y, c.rows_a, c.ca + c.cb));
    CLH_TRY(clh_check_no_alias(ctx, fn, "y", y, "a", a));
    CLH_TRY(clh_check_no_alias(ctx, fn, "y", y, "b", b));
    const clh_tensor *aa = a ? a : y, *bb = b ? b : y; /* unread when empty */
    int runs = 0, forced = 0;
    CLH_TRY(runs_mode(ctx, fn, &runs, &forced));
    if (runs) {
        int rows = (int)c.rows_a, per_row = runs_per_row(c.ca + c.cb);
        clh_karg args[] = {CLH_KTENSOR(aa),   CLH_KTENSOR(bb), CLH_KTENSOR(y),
                           CLH_KARG(c.ca),    CLH_KARG(c.cb),  CLH_KARG(c.repeat),
                           CLH_KARG(c.inner), CLH_KARG(rows),  CLH_KARG(per_row)};
        return clh_launch_1d(ctx, "hattn_concat_rows_runs", (size_t)rows * (size_t)per_row,
                             NARGS(args), args);
    }
    int total = (int)y->numel;
    clh_karg args[] = {CLH_KTENSOR(aa), CLH_KTENSOR(bb),    CLH_KTENSOR(y),    CLH_KARG(c.ca),
                       CLH_KARG(c.cb),  CLH_KARG(c.repeat), CLH_KARG(c.inner), CLH_KARG(total)};
    return clh_launch_1d(ctx, "hattn_concat_rows", y->numel, NARGS(args), args);
}

static clh_status concat_backward_runs(clh_ctx *ctx, const clh_tensor *dy, const concat_args *c,
                                       clh_tensor *da, clh_tensor *db) {
    if (da && c->ca > 0) {
        int rows = (int)c->rows_a, per_row = runs_per_row(c->ca);
        clh_karg args[] = {CLH_KTENSOR(dy), CLH_KTENSOR(da), CLH_KARG(c->ca),
                           CLH_KARG(c->cb), CLH_KARG(rows),  CLH_KARG(per_row)};
        CLH_TRY(clh_launch_1d(ctx, "hattn_concat_rows_da_runs", (size_t)rows * (size_t)per_row,
                              NARGS(args), args));
    }
    if (db && c->cb > 0) {
        int rows = (int)c->rows_b, per_row = runs_per_row(c->cb);
        clh_karg args[] = {CLH_KTENSOR(dy), CLH_KTENSOR(db),     CLH_KARG(c->ca),
                           CLH_KARG(c->cb), CLH_KARG(c->repeat), CLH_KARG(c->inner),
                           CLH_KARG(rows),  CLH_KARG(per_row)};
        CLH_TRY(clh_launch_1d(ctx, "hattn_concat_rows_db_runs", (size_t)rows * (size_t)per_row,
                              NARGS(args), args));
    }
    return CLH_OK;
}

clh_status clh_concat_rows_backward(clh_ctx *ctx, const clh_tensor *dy, int64_t ca, int64_t cb,
                                    int64_t outer, int64_t repeat, int64_t inner, clh_tensor *da,
                                    clh_tensor *db) {
    static const char fn[] = "clh_concat_rows_backward";
    concat_args c;
    CLH_TRY(check_concat(ctx, fn, ca, cb, outer, repeat, inner, &c));
    CLH_TRY(check_rows(ctx, fn, "dy", dy, c.rows_a, c.ca + c.cb));
    CLH_TRY(clh_check_optional(ctx, fn, "da", da));
    CLH_TRY(clh_check_optional(ctx, fn, "db", db));
    if (da)
        CLH_TRY(check_rows(ctx, fn, "da", da, c.rows_a, c.ca));
    if (db)
        CLH_TRY(check_rows(ctx, fn, "db", db, c.rows_b, c.cb));
    CLH_TRY(clh_check_no_alias(ctx, fn, "da", da, "dy", dy));
    CLH_TRY(clh_check_no_alias(ctx, fn, "db", db, "dy", dy));
    CLH_TRY(clh_check_no_alias(ctx, fn, "db", db, "da", da));
    int runs = 0, forced = 0;
    CLH_TRY(runs_mode(ctx, fn, &runs, &forced));
    if (runs)
        return concat_backward_runs(ctx, dy, &c, da, db);
    if (da && c.ca > 0) {
        int total = (int)da->numel;
        clh_karg args[] = {CLH_KTENSOR(dy), CLH_KTENSOR(da), CLH_KARG(c.ca), CLH_KARG(c.cb),
                           CLH_KARG(total)};
        CLH_TRY(clh_launch_1d(ctx, "hattn_concat_rows_da", da->numel, NARGS(args), args));
    }
    if (db && c.cb > 0) {
        int total = (int)db->numel;
        clh_karg args[] = {CLH_KTENSOR(dy),    CLH_KTENSOR(db),   CLH_KARG(c.ca), CLH_KARG(c.cb),
                           CLH_KARG(c.repeat), CLH_KARG(c.inner), CLH_KARG(total)};
        CLH_TRY(clh_launch_1d(ctx, "hattn_concat_rows_db", db->numel, NARGS(args), args));
    }
    return CLH_OK;
}

/* ------------------------------------------------------------------ row max */

clh_status clh_row_max(clh_ctx *ctx, const clh_tensor *x, int64_t cols, clh_tensor *y) {
    static const char fn[] = "clh_row_max";
    CLH_TRY(clh_check_ctx(ctx, fn));
    CLH_TRY(clh_check_tensor(ctx, fn, "x", x));
    CLH_TRY(clh_check_tensor(ctx, fn, "y", y));
    CLH_TRY(check_positive(ctx, fn, "cols", cols));
    if (x->numel % (size_t)cols != 0 || x->numel / (size_t)cols != y->numel)
        return clh_shape_fail(ctx, fn, "x", x, "y", y,
                              "x must hold y's element count rows of cols = %lld", (long long)cols);
    CLH_TRY(clh_check_no_alias(ctx, fn, "y", y, "x", x));
    int rows = (int)y->numel, icols = (int)cols;
    clh_karg args[] = {CLH_KTENSOR(x), CLH_KTENSOR(y), CLH_KARG(rows), CLH_KARG(icols),
                       CLH_KLOCAL(0)};
    return clh_launch_rows(ctx, "hattn_row_max", y->numel, NARGS(args), args);
}

/* ------------------------------------------------------------------ BCE loss */

/* Every label is a class or the ignore label; counts the non-ignored pixels. */
static clh_status check_labels(clh_ctx *ctx, const char *fn, const int32_t *labels, int batch,
                               int classes, int64_t pixels, int ignore_label, int64_t *valid) {
    *valid = 0;
    for (int b = 0; b < batch; b++)
        for (int64_t p = 0; p < pixels; p++) {
            int32_t l = labels[b * pixels + p];
            if (l == ignore_label)
                continue;
            if (l < 0 || l >= classes)
                return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT,
                                "%s: labels[%d, %lld] = %d is neither a class in [0, %d) nor the "
                                "ignore label %d",
                                fn, b, (long long)p, (int)l, classes, ignore_label);
            (*valid)++;
        }
    return CLH_OK;
}

static clh_status check_bce(clh_ctx *ctx, const char *fn, const clh_tensor *logits,
                            const int32_t *labels, int batch, int classes, int64_t pixels,
                            int ignore_label, double *loss, const clh_tensor *dlogits) {
    CLH_TRY(clh_check_ctx(ctx, fn));
    CLH_TRY(clh_check_tensor(ctx, fn, "logits", logits));
    CLH_TRY(clh_check_optional(ctx, fn, "dlogits", dlogits));
    if (!labels || !loss)
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT, "%s: %s is NULL", fn,
                        labels ? "loss" : "labels");
    CLH_TRY(check_positive(ctx, fn, "batch", batch));
    CLH_TRY(check_positive(ctx, fn, "classes", classes));
    CLH_TRY(check_positive(ctx, fn, "pixels", pixels));
    if (ignore_label >= 0 && ignore_label < classes)
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT,
                        "%s: ignore_label %d must not be a class in [0, %d)", fn, ignore_label,
                        classes);
    if ((int64_t)batch * classes * pixels != (int64_t)logits->numel)
        return clh_shape_fail(ctx, fn, "logits", logits, "logits", logits,
                              "logits must be [batch %d, classes %d, pixels %lld]", batch, classes,
                              (long long)pixels);
    if (dlogits) {
        CLH_TRY(clh_check_same_numel(ctx, fn, "logits", logits, "dlogits", dlogits));
        CLH_TRY(clh_check_no_alias(ctx, fn, "dlogits", dlogits, "logits", logits));
    }
    return CLH_OK;
}

/* Work-group partial sums into `partial`, written gradient, then the host sum in double. */
static clh_status bce_launch(clh_ctx *ctx, const clh_tensor *logits, cl_mem labels, int classes,
                             int pixels, int ignore_label, int exclude, float inv_count,
                             clh_tensor *dlogits, size_t groups, size_t local, clh_tensor *partial,
                             double *sum) {
    int write_grad = dlogits != NULL;
    int items = (int)(logits->numel / (size_t)classes); /* batch * pixels */
    clh_tensor *dl = dlogits ? dlogits : partial;       /* unwritten when !write_grad */
    clh_karg args[] = {
        CLH_KTENSOR(logits), CLH_KARG(labels),     CLH_KARG(classes),
        CLH_KARG(pixels),    CLH_KARG(items),      CLH_KARG(ignore_label),
        CLH_KARG(exclude),   CLH_KARG(inv_count),  CLH_KARG(write_grad),
        CLH_KTENSOR(dl),     CLH_KTENSOR(partial), CLH_KLOCAL(local * sizeof(float))};
    size_t global[1] = {groups * local}, lsize[1] = {local};
    CLH_TRY(clh_launch(ctx, "hattn_bce_loss", 1, global, lsize, NARGS(args), args));
    float *host = malloc(groups * sizeof *host);
    if (!host)
        return clh_fail(ctx, CLH_ERR_OUT_OF_MEMORY, "clh_bce_logits_loss: host partial sums");
    clh_status st = clh_tensor_download(partial, host, groups);
    *sum = 0;
    for (size_t g = 0; st == CLH_OK && g < groups; g++)
        *sum += host[g];
    free(host);
    return st;
}

clh_status clh_bce_logits_loss(clh_ctx *ctx, const clh_tensor *logits, const int32_t *labels,
                               int batch, int classes, int64_t pixels, int ignore_label,
                               int exclude_ignored, double *loss, clh_tensor *dlogits) {
    static const char fn[] = "clh_bce_logits_loss";
    CLH_TRY(
        check_bce(ctx, fn, logits, labels, batch, classes, pixels, ignore_label, loss, dlogits));
    int64_t valid;
    CLH_TRY(check_labels(ctx, fn, labels, batch, classes, pixels, ignore_label, &valid));
    int exclude = exclude_ignored != 0;
    double count = (double)classes * (double)(exclude ? valid : (int64_t)batch * pixels);
    float inv_count = count > 0 ? (float)(1.0 / count) : 0.0f;
    cl_mem label_mem = NULL;
    CLH_TRY(clh_upload_ints(ctx, labels, (size_t)batch * (size_t)pixels, &label_mem));
    size_t local = 1;
    CLH_TRY(clh_group_size(ctx, "hattn_bce_loss", 256, &local));
    /* one work-item per (b, pixel) */
    size_t groups = ((size_t)batch * (size_t)pixels + local - 1) / local;
    size_t mark = clh_ws_mark(ctx);
    clh_tensor *partial = NULL;
    double sum = 0;
    clh_status st = ws_vector(ctx, groups, &partial);
    if (st == CLH_OK)
        st = bce_launch(ctx, logits, label_mem, classes, (int)pixels, ignore_label, exclude,
                        inv_count, dlogits, groups, local, partial, &sum);
    clh_tensor_release(partial);
    clh_ws_reset(ctx, mark);
    if (st == CLH_OK)
        *loss = count > 0 ? sum / count : 0.0;
    return st;
}
