/* Argument checks and launch helpers shared by the layer implementations. */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "layer_util.h"

clh_status clh_check_ctx(clh_ctx *ctx, const char *fn) {
    return ctx ? CLH_OK : clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "%s: NULL context", fn);
}

clh_status clh_check_tensor(clh_ctx *ctx, const char *fn, const char *name, const clh_tensor *t) {
    if (!t)
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT, "%s: tensor %s is NULL", fn, name);
    if (t->ctx != ctx)
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT, "%s: tensor %s belongs to another context",
                        fn, name);
    if (t->offset + t->numel > (size_t)INT_MAX)
        return clh_fail(ctx, CLH_ERR_UNSUPPORTED,
                        "%s: tensor %s (%zu elements at offset %zu) is beyond the 2^31-1 "
                        "elements kernels can index",
                        fn, name, t->numel, t->offset);
    return CLH_OK;
}

clh_status clh_check_optional(clh_ctx *ctx, const char *fn, const char *name, const clh_tensor *t) {
    return t ? clh_check_tensor(ctx, fn, name, t) : CLH_OK;
}

__attribute__((format(printf, 7, 8))) clh_status
clh_shape_fail(clh_ctx *ctx, const char *fn, const char *a_name, const clh_tensor *a,
               const char *b_name, const clh_tensor *b, const char *reason_fmt, ...) {
    char reason[256], sa[128], sb[128];
    va_list ap;
    va_start(ap, reason_fmt);
    vsnprintf(reason, sizeof reason, reason_fmt, ap);
    va_end(ap);
    clh_shape_str(a->ndim, a->shape, sa, sizeof sa);
    clh_shape_str(b->ndim, b->shape, sb, sizeof sb);
    return clh_fail(ctx, CLH_ERR_SHAPE, "%s: %s (%s %s, %s %s)", fn, reason, a_name, sa, b_name,
                    sb);
}

clh_status clh_check_same_numel(clh_ctx *ctx, const char *fn, const char *a_name,
                                const clh_tensor *a, const char *b_name, const clh_tensor *b) {
    if (a->numel != b->numel)
        return clh_shape_fail(ctx, fn, a_name, a, b_name, b, "%s has %zu elements but %s has %zu",
                              a_name, a->numel, b_name, b->numel);
    return CLH_OK;
}

clh_status clh_check_same_rows(clh_ctx *ctx, const char *fn, const char *a_name,
                               const clh_tensor *a, const char *b_name, const clh_tensor *b) {
    CLH_TRY(clh_check_same_numel(ctx, fn, a_name, a, b_name, b));
    if (a->ndim < 1 || b->ndim < 1 || clh_last_dim(a) != clh_last_dim(b))
        return clh_shape_fail(ctx, fn, a_name, a, b_name, b, "last dimensions differ");
    return CLH_OK;
}

clh_status clh_check_same_shape(clh_ctx *ctx, const char *fn, const char *a_name,
                                const clh_tensor *a, const char *b_name, const clh_tensor *b) {
    int same = a->ndim == b->ndim;
    for (int i = 0; same && i < a->ndim; i++)
        same = a->shape[i] == b->shape[i];
    return same ? CLH_OK
                : clh_shape_fail(ctx, fn, a_name, a, b_name, b, "%s must have %s's shape", b_name,
                                 a_name);
}

clh_status clh_check_shape_is(clh_ctx *ctx, const char *fn, const char *name, const clh_tensor *t,
                              int ndim, const int64_t *shape) {
    int same = t->ndim == ndim;
    for (int i = 0; same && i < ndim; i++)
        same = t->shape[i] == shape[i];
    if (same)
        return CLH_OK;
    char got[128], want[128];
    clh_shape_str(t->ndim, t->shape, got, sizeof got);
    clh_shape_str(ndim, shape, want, sizeof want);
    return clh_fail(ctx, CLH_ERR_SHAPE, "%s: %s has shape %s, expected %s", fn, name, got, want);
}

int clh_overlaps(const clh_tensor *a, const clh_tensor *b) {
    return a && b && a->mem == b->mem && a->offset < b->offset + b->numel &&
           b->offset < a->offset + a->numel;
}

clh_status clh_check_no_alias(clh_ctx *ctx, const char *fn, const char *out_name,
                              const clh_tensor *out, const char *in_name, const clh_tensor *in) {
    if (clh_overlaps(out, in))
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT, "%s: %s must not alias %s", fn, out_name,
                        in_name);
    return CLH_OK;
}

int64_t clh_last_dim(const clh_tensor *t) {
    return t->ndim > 0 ? t->shape[t->ndim - 1] : 1;
}

clh_status clh_launch_1d(clh_ctx *ctx, const char *kernel, size_t n, int nargs,
                         const clh_karg *args) {
    size_t global[1] = {n};
    return clh_launch(ctx, kernel, 1, global, NULL, nargs, args);
}

clh_status clh_launch_2d(clh_ctx *ctx, const char *kernel, size_t cols, size_t rows, int nargs,
                         const clh_karg *args) {
    size_t global[2] = {cols, rows};
    return clh_launch(ctx, kernel, 2, global, NULL, nargs, args);
}

clh_status clh_group_size(clh_ctx *ctx, const char *kernel, size_t cap, size_t *local) {
    size_t limit = 0;
    CLH_TRY(clh_kernel_wg_size(ctx, kernel, &limit));
    if (limit > cap)
        limit = cap;
    if (ctx->info.max_work_item_sizes[0] && limit > ctx->info.max_work_item_sizes[0])
        limit = ctx->info.max_work_item_sizes[0];
    size_t size = 1;
    while (size * 2 <= limit)
        size *= 2;
    *local = size;
    return CLH_OK;
}

clh_status clh_row_group_size(clh_ctx *ctx, const char *kernel, size_t *local) {
    return clh_group_size(ctx, kernel, 256, local);
}

clh_status clh_launch_rows(clh_ctx *ctx, const char *kernel, size_t rows, int nargs,
                           clh_karg *args) {
    size_t local[1];
    CLH_TRY(clh_group_size(ctx, kernel, 256, local));
    size_t global[1] = {rows * local[0]};
    args[nargs - 1] = (clh_karg)CLH_KLOCAL(local[0] * sizeof(float));
    return clh_launch(ctx, kernel, 1, global, local, nargs, args);
}

int clh_use_row_items(const clh_ctx *ctx) {
    const char *mode = getenv("CLHCLIP_ROW_KERNELS");
    if (mode && strcmp(mode, "item") == 0)
        return 1;
    if (mode && strcmp(mode, "group") == 0)
        return 0;
    return ctx->info.is_cpu;
}

clh_status clh_launch_row_items(clh_ctx *ctx, const char *kernel, size_t rows, int nargs,
                                const clh_karg *args) {
    size_t global[1] = {rows}, local[1] = {32};
    return clh_launch(ctx, kernel, 1, global, local, nargs, args);
}
