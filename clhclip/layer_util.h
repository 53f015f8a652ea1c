/* Argument checks and launch helpers shared by the layer implementations (layers.c,
 * layers_backward.c, adapter_ops.c, ...). Internal. */
#ifndef CLHCLIP_LAYER_UTIL_H
#define CLHCLIP_LAYER_UTIL_H

#include "internal.h"

/* Internal to the library: not exported from libclhclip.so. */
#pragma GCC visibility push(hidden)

/* Number of entries of a clh_karg array. */
#define NARGS(args) ((int)(sizeof(args) / sizeof((args)[0])))

clh_status clh_check_ctx(clh_ctx *ctx, const char *fn);
/* Non-NULL, of this context, and ending below 2^31 elements (kernels index with int). */
clh_status clh_check_tensor(clh_ctx *ctx, const char *fn, const char *name, const clh_tensor *t);
/* check_tensor for an optional (possibly NULL) tensor. */
clh_status clh_check_optional(clh_ctx *ctx, const char *fn, const char *name, const clh_tensor *t);
/* "fn: <reason> (a [2, 3], b [4])" with CLH_ERR_SHAPE. */
__attribute__((format(printf, 7, 8))) clh_status
clh_shape_fail(clh_ctx *ctx, const char *fn, const char *a_name, const clh_tensor *a,
               const char *b_name, const clh_tensor *b, const char *reason_fmt, ...);
clh_status clh_check_same_numel(clh_ctx *ctx, const char *fn, const char *a_name,
                                const clh_tensor *a, const char *b_name, const clh_tensor *b);
/* Same element count and same last dimension (row-wise ops). */
clh_status clh_check_same_rows(clh_ctx *ctx, const char *fn, const char *a_name,
                               const clh_tensor *a, const char *b_name, const clh_tensor *b);
clh_status clh_check_same_shape(clh_ctx *ctx, const char *fn, const char *a_name,
                                const clh_tensor *a, const char *b_name, const clh_tensor *b);
/* t must have exactly the given shape. */
clh_status clh_check_shape_is(clh_ctx *ctx, const char *fn, const char *name, const clh_tensor *t,
                              int ndim, const int64_t *shape);
/* Do the element ranges of a and b share memory? (NULL never does.) */
int clh_overlaps(const clh_tensor *a, const clh_tensor *b);
clh_status clh_check_no_alias(clh_ctx *ctx, const char *fn, const char *out_name,
                              const clh_tensor *out, const char *in_name, const clh_tensor *in);
int64_t clh_last_dim(const clh_tensor *t);

clh_status clh_launch_1d(clh_ctx *ctx, const char *kernel, size_t n, int nargs,
                         const clh_karg *args);
/* 2-D range: dimension 0 runs along a row (contiguous), dimension 1 over rows. */
clh_status clh_launch_2d(clh_ctx *ctx, const char *kernel, size_t cols, size_t rows, int nargs,
                         const clh_karg *args);
/* Largest power of two within the kernel's limit, the device's dimension-0 limit and cap:
 * the work-group size of one-group-per-row reductions. One fixed size per kernel keeps
 * results independent of the row length and avoids a recompile per local size on PoCL. */
clh_status clh_group_size(clh_ctx *ctx, const char *kernel, size_t cap, size_t *local);
clh_status clh_row_group_size(clh_ctx *ctx, const char *kernel, size_t *local); /* cap 256 */
/* One work-group per row for `rows` rows; args[nargs - 1] must be the CLH_KLOCAL slot of
 * one float per work-item, which is sized here. */
clh_status clh_launch_rows(clh_ctx *ctx, const char *kernel, size_t rows, int nargs,
                           clh_karg *args);

/* Row reductions (softmax, layer norm, L2 norm and their backward) have two kernel variants:
 * one work-group per row with a local-memory tree (GPUs) and one work-item per row with
 * vector loads (CPUs, where work-group barriers are slow). $CLHCLIP_ROW_KERNELS = item |
 * group forces one (read per call); otherwise CPU devices get the item variant. */
int clh_use_row_items(const clh_ctx *ctx);
/* 1-D launch of an item-variant kernel over `rows` rows with small work-groups (32), which
 * spread the rows evenly over the CPU cores; rows are independent, so results do not depend
 * on the size. */
clh_status clh_launch_row_items(clh_ctx *ctx, const char *kernel, size_t rows, int nargs,
                                const clh_karg *args);

#pragma GCC visibility pop

#endif
