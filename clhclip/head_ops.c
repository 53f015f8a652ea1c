/* CAT-Seg head layers (head_ops.h): argument and shape checks on the host, the work in
 * kernels/head.cl and CLBlast (gemm.c). Convolutions are im2col + GEMM per image (the
 * column matrix of one image lives in the workspace); transposed convolutions with
 * kernel == stride are one GEMM per image followed by a pixel rearrangement. Gradients of
 * inputs are overwritten, of parameters accumulated, NULL outputs skipped. */
#include <limits.h>
#include <stdio.h>

#include "head_ops.h"
#include "layer_util.h"

/* t must have exactly the given shape; the message also shows ref's shape. */
static clh_status check_shape_against(clh_ctx *ctx, const char *fn, const char *ref_name,
                                      const clh_tensor *ref, const char *name, const clh_tensor *t,
                                      int ndim, const int64_t *shape) {
    int same = t->ndim == ndim;
    for (int i = 0; same && i < ndim; i++)
        same = t->shape[i] == shape[i];
    if (same)
        return CLH_OK;
    char want[128];
    clh_shape_str(ndim, shape, want, sizeof want);
    return clh_shape_fail(ctx, fn, ref_name, ref, name, t, "%s must be %s", name, want);
}

/* ------------------------------------------------------------------ checks */

/* t must be 4-D with every dimension >= 1. */
static clh_status check_4d(clh_ctx *ctx, const char *fn, const char *name, const clh_tensor *t) {
    int ok = t->ndim == 4;
    for (int i = 0; ok && i < 4; i++)
        ok = t->shape[i] >= 1;
    if (!ok) {
        char s[128];
        clh_shape_str(t->ndim, t->shape, s, sizeof s);
        return clh_fail(ctx, CLH_ERR_SHAPE, "%s: %s must be 4-D with no empty dimension, got %s",
                        fn, name, s);
    }
    return CLH_OK;
}

/* out may be exactly in (in place) but must not partly overlap it. */
static clh_status check_in_place_ok(clh_ctx *ctx, const char *fn, const char *out_name,
                                    const clh_tensor *out, const char *in_name,
                                    const clh_tensor *in) {
    if (out->mem == in->mem && out->offset == in->offset)
        return CLH_OK;
    return clh_check_no_alias(ctx, fn, out_name, out, in_name, in);
}

static clh_status check_positive(clh_ctx *ctx, const char *fn, const char *name, int value) {
    if (value < 1)
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT, "%s: %s must be >= 1, got %d", fn, name,
                        value);
    return CLH_OK;
}

/* ------------------------------------------------------------------ launch helpers */

/* One work-group per item (channel or norm group) with a power-of-two size (the kernel's
 * limit, the device's dimension-0 limit and 256); args[nargs - 1] is the local slot. */
static clh_status launch_groups(clh_ctx *ctx, const char *kernel, size_t groups, int nargs,
                                clh_karg *args) {
    size_t limit = 0;
    CLH_TRY(clh_kernel_wg_size(ctx, kernel, &limit));
    if (limit > 256)
        limit = 256;
    if (ctx->info.max_work_item_sizes[0] && limit > ctx->info.max_work_item_sizes[0])
        limit = ctx->info.max_work_item_sizes[0];
    size_t local[1] = {1};
    while (local[0] * 2 <= limit)
        local[0] *= 2;
    size_t global[1] = {groups * local[0]};
    args[nargs - 1] = (clh_karg)CLH_KLOCAL(local[0] * sizeof(float));
    return clh_launch(ctx, kernel, 1, global, local, nargs, args);
}

/* A view of `numel` elements of t starting `offset` elements in, as a matrix [rows, cols]. */
static clh_status matrix_view(const clh_tensor *t, size_t offset, size_t rows, size_t cols,
                              clh_tensor **out) {
    int64_t shape[2] = {(int64_t)rows, (int64_t)cols};
    return clh_tensor_view((clh_tensor *)t, offset, 2, shape, out);
}

/* out[c] += sum over n, p of a[n, c, p] (times b when non-NULL) for [N, C, P]. */
static clh_status channel_sums(clh_ctx *ctx, const clh_tensor *a, const clh_tensor *b, int batch,
                               int channels, int pixels, clh_tensor *out) {
    int use_b = b != NULL;
    const clh_tensor *bb = b ? b : a;
    clh_karg args[] = {CLH_KTENSOR(a),     CLH_KTENSOR(bb),  CLH_KARG(use_b),  CLH_KARG(batch),
                       CLH_KARG(channels), CLH_KARG(pixels), CLH_KTENSOR(out), CLH_KLOCAL(0)};
    return launch_groups(ctx, "head_channel_sums", (size_t)channels, NARGS(args), args);
}

/* ------------------------------------------------------------------ conv2d */

typedef struct conv_geom {
    int n, c, h, w;   /* input */
    int o, kh, kw;    /* weight */
    int out_h, out_w; /* output */
    int stride, pad;
    size_t rows, pixels; /* column matrix [C kh kw, out_h out_w] of one image */
} conv_geom;

static clh_status conv_geometry(clh_ctx *ctx, const char *fn, const clh_tensor *x,
                                const clh_tensor *w, int stride, int padding, conv_geom *g) {
    CLH_TRY(check_4d(ctx, fn, "x", x));
    CLH_TRY(check_4d(ctx, fn, "w", w));
    CLH_TRY(check_positive(ctx, fn, "stride", stride));
    if (padding < 0)
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT, "%s: padding must be >= 0, got %d", fn,
                        padding);
    *g = (conv_geom){.n = (int)x->shape[0],
                     .c = (int)x->shape[1],
                     .h = (int)x->shape[2],
                     .w = (int)x->shape[3],
                     .o = (int)w->shape[0],
                     .kh = (int)w->shape[2],
                     .kw = (int)w->shape[3],
                     .stride = stride,
                     .pad = padding};
    if (w->shape[1] != x->shape[1])
        return clh_shape_fail(ctx, fn, "x", x, "w", w,
                              "w's input channels differ from x's channels");
    if (g->h + 2 * padding < g->kh || g->w + 2 * padding < g->kw)
        return clh_shape_fail(ctx, fn, "x", x, "w", w,
                              "the kernel is larger than the padded input");
    g->out_h = (g->h + 2 * padding - g->kh) / stride + 1;
    g->out_w = (g->w + 2 * padding - g->kw) / stride + 1;
    g->rows = (size_t)g->c * g->kh * g->kw;
    g->pixels = (size_t)g->out_h * g->out_w;
    return CLH_OK;
}

/* 1x1, stride 1, no padding: the column matrix is the image itself. */
static int conv_is_pointwise(const conv_geom *g) {
    return g->kh == 1 && g->kw == 1 && g->stride == 1 && g->pad == 0;
}

static clh_status check_conv2d(clh_ctx *ctx, const char *fn, const clh_tensor *x,
                               const clh_tensor *w, const clh_tensor *b, int stride, int padding,
                               const char *y_name, const clh_tensor *y, conv_geom *g) {
    CLH_TRY(clh_check_ctx(ctx, fn));
    CLH_TRY(clh_check_tensor(ctx, fn, "x", x));
    CLH_TRY(clh_check_tensor(ctx, fn, "w", w));
    CLH_TRY(clh_check_optional(ctx, fn, "b", b));
    CLH_TRY(clh_check_tensor(ctx, fn, y_name, y));
    CLH_TRY(conv_geometry(ctx, fn, x, w, stride, padding, g));
    if (b && (b->ndim != 1 || b->shape[0] != w->shape[0]))
        return clh_shape_fail(ctx, fn, "w", w, "b", b, "b must be [out channels]");
    int64_t want[4] = {g->n, g->o, g->out_h, g->out_w};
    return check_shape_against(ctx, fn, "x", x, y_name, y, 4, want);
}

/* Images per chunk: the column buffer [chunk, C kh kw, P] stays under this many floats. */
#define CONV_CHUNK_FLOATS ((size_t)1 << 24)

static int conv_chunk(const conv_geom *g) {
    size_t per = g->rows * g->pixels, n = per ? CONV_CHUNK_FLOATS / per : 1;
    if (n < 1)
        n = 1;
    return n > (size_t)g->n ? g->n : (int)n;
}

/* col = im2col of images first .. first+count-1 of x, image i's matrix at element
 * i * img_stride, rows row_stride apart (see head_im2col_batch). */
static clh_status conv_columns(clh_ctx *ctx, const clh_tensor *x, const conv_geom *g, int first,
                               int count, int img_stride, int row_stride, clh_tensor *col) {
    int x_off = (int)(x->offset + (size_t)first * g->c * g->h * g->w);
    clh_karg args[] = {CLH_KARG(x->mem),     CLH_KARG(x_off),      CLH_KARG(g->c),
                       CLH_KARG(g->h),       CLH_KARG(g->w),       CLH_KARG(g->kh),
                       CLH_KARG(g->kw),      CLH_KARG(g->stride),  CLH_KARG(g->pad),
                       CLH_KARG(g->out_h),   CLH_KARG(g->out_w),   CLH_KARG(count),
                       CLH_KARG(img_stride), CLH_KARG(row_stride), CLH_KTENSOR(col)};
    return clh_launch_1d(ctx, "head_im2col_batch", (size_t)count * g->rows * g->out_h, NARGS(args),
                         args);
}

/* The column matrices of a chunk: a view of x itself for pointwise convolutions. */
static clh_status chunk_columns(clh_ctx *ctx, const clh_tensor *x, const conv_geom *g, int first,
                                int count, clh_tensor *buf, clh_tensor **col) {
    size_t image = (size_t)g->c * g->h * g->w;
    if (conv_is_pointwise(g))
        return matrix_view(x, first * image, (size_t)count * g->rows, g->pixels, col);
    CLH_TRY(conv_columns(ctx, x, g, first, count, (int)(g->rows * g->pixels), (int)g->pixels, buf));
    clh_tensor_retain(buf);
    *col = buf;
    return CLH_OK;
}

/* y_n [O, P] = w [O, C kh kw] col_n [C kh kw, P], a chunk of images per batched GEMM. */
static clh_status conv2d_images(clh_ctx *ctx, const clh_tensor *x, const clh_tensor *w,
                                const conv_geom *g, clh_tensor *col_buf, clh_tensor *y) {
    size_t out_image = (size_t)g->o * g->pixels;
    int chunk = conv_chunk(g);
    clh_status st = CLH_OK;
    for (int n = 0; n < g->n && st == CLH_OK; n += chunk) {
        int count = g->n - n < chunk ? g->n - n : chunk;
        clh_tensor *col = NULL, *yn = NULL;
        st = chunk_columns(ctx, x, g, n, count, col_buf, &col);
        if (st == CLH_OK)
            st = matrix_view(y, n * out_image, (size_t)count * g->o, g->pixels, &yn);
        if (st == CLH_OK)
            st = clh_gemm_batched(ctx, 0, 0, g->o, g->pixels, g->rows, 1.0f, w, g->rows, 0, col,
                                  g->pixels, g->rows * g->pixels, 0.0f, yn, g->pixels, out_image,
                                  (size_t)count);
        clh_tensor_release(col);
        clh_tensor_release(yn);
    }
    return st;
}

static clh_status add_channel_bias(clh_ctx *ctx, clh_tensor *y, const clh_tensor *b, int channels,
                                   int pixels) {
    int total = (int)y->numel;
    clh_karg args[] = {CLH_KTENSOR(y), CLH_KARG(channels), CLH_KARG(pixels), CLH_KARG(total),
                       CLH_KTENSOR(b)};
    return clh_launch_1d(ctx, "head_add_channel_bias", y->numel, NARGS(args), args);
}

/* A workspace matrix [rows, cols], or NULL (no allocation) when skip. */
static clh_status ws_matrix(clh_ctx *ctx, size_t rows, size_t cols, int skip, clh_tensor **out) {
    *out = NULL;
    if (skip)
        return CLH_OK;
    int64_t shape[2] = {(int64_t)rows, (int64_t)cols};
    return clh_ws_tensor(ctx, 2, shape, out);
}

clh_status clh_conv2d_forward(clh_ctx *ctx, const clh_tensor *x, const clh_tensor *w,
                              const clh_tensor *b, int stride, int padding, clh_tensor *y) {
    static const char fn[] = "clh_conv2d_forward";
    conv_geom g;
    CLH_TRY(check_conv2d(ctx, fn, x, w, b, stride, padding, "y", y, &g));
    CLH_TRY(clh_check_no_alias(ctx, fn, "y", y, "x", x));
    CLH_TRY(clh_check_no_alias(ctx, fn, "y", y, "w", w));
    size_t mark = clh_ws_mark(ctx);
    clh_tensor *col_buf = NULL;
    clh_status st =
        ws_matrix(ctx, (size_t)conv_chunk(&g) * g.rows, g.pixels, conv_is_pointwise(&g), &col_buf);
    if (st == CLH_OK)
        st = conv2d_images(ctx, x, w, &g, col_buf, y);
    if (st == CLH_OK && b)
        st = add_channel_bias(ctx, y, b, g.o, (int)g.pixels);
    clh_tensor_release(col_buf);
    clh_ws_reset(ctx, mark);
    return st;
}

static clh_status check_conv2d_backward(clh_ctx *ctx, const char *fn, const clh_tensor *x,
                                        const clh_tensor *w, int stride, int padding,
                                        const clh_tensor *dy, const clh_tensor *dx,
                                        const clh_tensor *dw, const clh_tensor *db, conv_geom *g) {
    CLH_TRY(check_conv2d(ctx, fn, x, w, NULL, stride, padding, "dy", dy, g));
    CLH_TRY(clh_check_optional(ctx, fn, "dx", dx));
    CLH_TRY(clh_check_optional(ctx, fn, "dw", dw));
    CLH_TRY(clh_check_optional(ctx, fn, "db", db));
    if (dx)
        CLH_TRY(check_shape_against(ctx, fn, "x", x, "dx", dx, 4, x->shape));
    if (dw)
        CLH_TRY(check_shape_against(ctx, fn, "w", w, "dw", dw, 4, w->shape));
    int64_t bshape[1] = {g->o};
    if (db)
        CLH_TRY(check_shape_against(ctx, fn, "w", w, "db", db, 1, bshape));
    const clh_tensor *ins[] = {x, w, dy};
    const char *in_names[] = {"x", "w", "dy"};
    for (int i = 0; i < 3; i++) {
        CLH_TRY(clh_check_no_alias(ctx, fn, "dx", dx, in_names[i], ins[i]));
        CLH_TRY(clh_check_no_alias(ctx, fn, "dw", dw, in_names[i], ins[i]));
        CLH_TRY(clh_check_no_alias(ctx, fn, "db", db, in_names[i], ins[i]));
    }
    return CLH_OK;
}

/* dx of a chunk: dcol_n = w^T dy_n (batched), then col2im (pointwise: straight into dx). */
static clh_status conv2d_input_grad(clh_ctx *ctx, const clh_tensor *w, const clh_tensor *dy,
                                    const conv_geom *g, int first, int count, clh_tensor *dcol,
                                    clh_tensor *dx) {
    size_t image = (size_t)g->c * g->h * g->w, out_image = (size_t)g->o * g->pixels;
    clh_tensor *dyc = NULL, *target = NULL;
    clh_status st = matrix_view(dy, first * out_image, (size_t)count * g->o, g->pixels, &dyc);
    int pointwise = conv_is_pointwise(g);
    if (st == CLH_OK && pointwise)
        st = matrix_view(dx, first * image, (size_t)count * g->rows, g->pixels, &target);
    if (st == CLH_OK)
        st = clh_gemm_batched(ctx, 1, 0, g->rows, g->pixels, g->o, 1.0f, w, g->rows, 0, dyc,
                              g->pixels, out_image, 0.0f, pointwise ? target : dcol, g->pixels,
                              g->rows * g->pixels, (size_t)count);
    clh_tensor_release(dyc);
    clh_tensor_release(target);
    if (st != CLH_OK || pointwise)
        return st;
    int dx_off = (int)(dx->offset + first * image);
    clh_karg args[] = {CLH_KTENSOR(dcol),   CLH_KARG(g->c),   CLH_KARG(g->h),
                       CLH_KARG(g->w),      CLH_KARG(g->kh),  CLH_KARG(g->kw),
                       CLH_KARG(g->stride), CLH_KARG(g->pad), CLH_KARG(g->out_h),
                       CLH_KARG(g->out_w),  CLH_KARG(count),  CLH_KARG(dx->mem),
                       CLH_KARG(dx_off)};
    return clh_launch_1d(ctx, "head_col2im_batch", (size_t)count * g->c * g->h, NARGS(args), args);
}

/* dw += sum_n dy_n col_n^T for a chunk as one GEMM over the chunk's pixels: the columns are
 * written as [C kh kw, count P] and dy is permuted to [O, count P]. */
static clh_status conv2d_weight_grad(clh_ctx *ctx, const clh_tensor *x, const clh_tensor *dy,
                                     const conv_geom *g, int first, int count, clh_tensor *buf,
                                     clh_tensor *dw) {
    size_t out_image = (size_t)g->o * g->pixels, k = (size_t)count * g->pixels;
    size_t mark = clh_ws_mark(ctx);
    clh_tensor *colp = NULL, *dyp = NULL, *dyc = NULL;
    clh_status st = CLH_OK;
    if (conv_is_pointwise(g)) /* x's chunk is [count, C, P]: permute it like dy */
        st = ws_matrix(ctx, g->rows, k, 0, &colp);
    else
        st = matrix_view(buf, 0, g->rows, k, &colp);
    if (st == CLH_OK && conv_is_pointwise(g)) {
        clh_tensor *xc = NULL;
        st = matrix_view(x, first * g->rows * g->pixels, (size_t)count * g->rows, g->pixels, &xc);
        if (st == CLH_OK)
            st = clh_permute_0213(ctx, xc, 1, count, (int64_t)g->rows, (int64_t)g->pixels, colp);
        clh_tensor_release(xc);
    } else if (st == CLH_OK) {
        st = conv_columns(ctx, x, g, first, count, (int)g->pixels, (int)k, colp);
    }
    if (st == CLH_OK)
        st = ws_matrix(ctx, g->o, k, 0, &dyp);
    if (st == CLH_OK)
        st = matrix_view(dy, first * out_image, (size_t)count * g->o, g->pixels, &dyc);
    if (st == CLH_OK)
        st = clh_permute_0213(ctx, dyc, 1, count, g->o, (int64_t)g->pixels, dyp);
    if (st == CLH_OK)
        st = clh_gemm(ctx, 0, 1, g->o, g->rows, k, 1.0f, dyp, k, colp, k, 1.0f, dw, g->rows);
    clh_tensor *all[] = {colp, dyp, dyc};
    for (int i = 0; i < 3; i++)
        clh_tensor_release(all[i]);
    clh_ws_reset(ctx, mark);
    return st;
}

/* Per chunk of images: dw, then dx (the column buffer is reused for dcol). */
static clh_status conv2d_backward_images(clh_ctx *ctx, const clh_tensor *x, const clh_tensor *w,
                                         const clh_tensor *dy, const conv_geom *g, clh_tensor *buf,
                                         clh_tensor *dx, clh_tensor *dw) {
    int chunk = conv_chunk(g);
    clh_status st = CLH_OK;
    for (int n = 0; n < g->n && st == CLH_OK; n += chunk) {
        int count = g->n - n < chunk ? g->n - n : chunk;
        if (dw)
            st = conv2d_weight_grad(ctx, x, dy, g, n, count, buf, dw);
        if (st == CLH_OK && dx)
            st = conv2d_input_grad(ctx, w, dy, g, n, count, buf, dx);
    }
    return st;
}

clh_status clh_conv2d_backward(clh_ctx *ctx, const clh_tensor *x, const clh_tensor *w, int stride,
                               int padding, const clh_tensor *dy, clh_tensor *dx, clh_tensor *dw,
                               clh_tensor *db) {
    static const char fn[] = "clh_conv2d_backward";
    conv_geom g;
    CLH_TRY(check_conv2d_backward(ctx, fn, x, w, stride, padding, dy, dx, dw, db, &g));
    if (db)
        CLH_TRY(channel_sums(ctx, dy, NULL, g.n, g.o, (int)g.pixels, db));
    if (!dx && !dw)
        return CLH_OK;
    size_t mark = clh_ws_mark(ctx);
    clh_tensor *buf = NULL;
    clh_status st =
        ws_matrix(ctx, (size_t)conv_chunk(&g) * g.rows, g.pixels, conv_is_pointwise(&g), &buf);
    if (st == CLH_OK)
        st = conv2d_backward_images(ctx, x, w, dy, &g, buf, dx, dw);
    clh_tensor_release(buf);
    clh_ws_reset(ctx, mark);
    return st;
}

/* ------------------------------------------------------------------ transposed conv2d */

typedef struct convt_geom {
    int n, c, h, w, o, k;
    size_t rows, pixels; /* z [O k k, H W] of one image */
} convt_geom;

static clh_status check_convt(clh_ctx *ctx, const char *fn, const clh_tensor *x,
                              const clh_tensor *w, const clh_tensor *b, const char *y_name,
                              const clh_tensor *y, convt_geom *g) {
    CLH_TRY(clh_check_ctx(ctx, fn));
    CLH_TRY(clh_check_tensor(ctx, fn, "x", x));
    CLH_TRY(clh_check_tensor(ctx, fn, "w", w));
    CLH_TRY(clh_check_optional(ctx, fn, "b", b));
    CLH_TRY(clh_check_tensor(ctx, fn, y_name, y));
    CLH_TRY(check_4d(ctx, fn, "x", x));
    CLH_TRY(check_4d(ctx, fn, "w", w));
    if (w->shape[0] != x->shape[1])
        return clh_shape_fail(ctx, fn, "x", x, "w", w, "w's first dimension must be x's channels");
    if (w->shape[2] != w->shape[3])
        return clh_shape_fail(ctx, fn, "x", x, "w", w,
                              "the kernel must be square (stride = kernel)");
    *g = (convt_geom){.n = (int)x->shape[0],
                      .c = (int)x->shape[1],
                      .h = (int)x->shape[2],
                      .w = (int)x->shape[3],
                      .o = (int)w->shape[1],
                      .k = (int)w->shape[2]};
    g->rows = (size_t)g->o * g->k * g->k;
    g->pixels = (size_t)g->h * g->w;
    if (b && (b->ndim != 1 || b->shape[0] != w->shape[1]))
        return clh_shape_fail(ctx, fn, "w", w, "b", b, "b must be [out channels]");
    int64_t want[4] = {g->n, g->o, (int64_t)g->h * g->k, (int64_t)g->w * g->k};
    return check_shape_against(ctx, fn, "x", x, y_name, y, 4, want);
}

/* y_n = scatter(w^T x_n) (+ bias) for every image, through z [O k k, H W]. */
static clh_status convt_images(clh_ctx *ctx, const clh_tensor *x, const clh_tensor *w,
                               const clh_tensor *b, const convt_geom *g, clh_tensor *z,
                               clh_tensor *y) {
    size_t in_image = (size_t)g->c * g->pixels, out_image = g->rows * g->pixels;
    int use_bias = b != NULL;
    const clh_tensor *bb = b ? b : w;
    for (int n = 0; n < g->n; n++) {
        clh_tensor *xn = NULL;
        CLH_TRY(matrix_view(x, n * in_image, g->c, g->pixels, &xn));
        clh_status st = clh_gemm(ctx, 1, 0, g->rows, g->pixels, g->c, 1.0f, w, g->rows, xn,
                                 g->pixels, 0.0f, z, g->pixels);
        clh_tensor_release(xn);
        CLH_TRY(st);
        int y_off = (int)(y->offset + n * out_image);
        clh_karg args[] = {CLH_KTENSOR(z),     CLH_KARG(g->o),   CLH_KARG(g->h),
                           CLH_KARG(g->w),     CLH_KARG(g->k),   CLH_KTENSOR(bb),
                           CLH_KARG(use_bias), CLH_KARG(y->mem), CLH_KARG(y_off)};
        CLH_TRY(clh_launch_1d(ctx, "head_convt_scatter", out_image, NARGS(args), args));
    }
    return CLH_OK;
}

clh_status clh_conv_transpose2d_forward(clh_ctx *ctx, const clh_tensor *x, const clh_tensor *w,
                                        const clh_tensor *b, clh_tensor *y) {
    static const char fn[] = "clh_conv_transpose2d_forward";
    convt_geom g;
    CLH_TRY(check_convt(ctx, fn, x, w, b, "y", y, &g));
    CLH_TRY(clh_check_no_alias(ctx, fn, "y", y, "x", x));
    CLH_TRY(clh_check_no_alias(ctx, fn, "y", y, "w", w));
    size_t mark = clh_ws_mark(ctx);
    clh_tensor *z = NULL;
    clh_status st = ws_matrix(ctx, g.rows, g.pixels, 0, &z);
    if (st == CLH_OK)
        st = convt_images(ctx, x, w, b, &g, z, y);
    clh_tensor_release(z);
    clh_ws_reset(ctx, mark);
    return st;
}

/* Per image: dz = gather(dy_n); dw [C, O k k] += x_n dz^T; dx_n = w dz. */
static clh_status convt_backward_images(clh_ctx *ctx, const clh_tensor *x, const clh_tensor *w,
                                        const clh_tensor *dy, const convt_geom *g, clh_tensor *dz,
                                        clh_tensor *dx, clh_tensor *dw) {
    size_t in_image = (size_t)g->c * g->pixels, out_image = g->rows * g->pixels;
    clh_status st = CLH_OK;
    for (int n = 0; n < g->n && st == CLH_OK; n++) {
        int dy_off = (int)(dy->offset + n * out_image);
        clh_karg args[] = {CLH_KARG(dy->mem), CLH_KARG(dy_off), CLH_KARG(g->o), CLH_KARG(g->h),
                           CLH_KARG(g->w),    CLH_KARG(g->k),   CLH_KTENSOR(dz)};
        st = clh_launch_1d(ctx, "head_convt_gather", out_image, NARGS(args), args);
        clh_tensor *xn = NULL, *dxn = NULL;
        if (st == CLH_OK && dw)
            st = matrix_view(x, n * in_image, g->c, g->pixels, &xn);
        if (st == CLH_OK && dw)
            st = clh_gemm(ctx, 0, 1, g->c, g->rows, g->pixels, 1.0f, xn, g->pixels, dz, g->pixels,
                          1.0f, dw, g->rows);
        if (st == CLH_OK && dx)
            st = matrix_view(dx, n * in_image, g->c, g->pixels, &dxn);
        if (st == CLH_OK && dx)
            st = clh_gemm(ctx, 0, 0, g->c, g->pixels, g->rows, 1.0f, w, g->rows, dz, g->pixels,
                          0.0f, dxn, g->pixels);
        clh_tensor_release(xn);
        clh_tensor_release(dxn);
    }
    return st;
}

clh_status clh_conv_transpose2d_backward(clh_ctx *ctx, const clh_tensor *x, const clh_tensor *w,
                                         const clh_tensor *dy, clh_tensor *dx, clh_tensor *dw,
                                         clh_tensor *db) {
    static const char fn[] = "clh_conv_transpose2d_backward";
    convt_geom g;
    CLH_TRY(check_convt(ctx, fn, x, w, NULL, "dy", dy, &g));
    CLH_TRY(clh_check_optional(ctx, fn, "dx", dx));
    CLH_TRY(clh_check_optional(ctx, fn, "dw", dw));
    CLH_TRY(clh_check_optional(ctx, fn, "db", db));
    if (dx)
        CLH_TRY(check_shape_against(ctx, fn, "x", x, "dx", dx, 4, x->shape));
    if (dw)
        CLH_TRY(check_shape_against(ctx, fn, "w", w, "dw", dw, 4, w->shape));
    int64_t bshape[1] = {g.o};
    if (db)
        CLH_TRY(check_shape_against(ctx, fn, "w", w, "db", db, 1, bshape));
    const clh_tensor *ins[] = {x, w, dy};
    const char *in_names[] = {"x", "w", "dy"};
    for (int i = 0; i < 3; i++) {
        CLH_TRY(clh_check_no_alias(ctx, fn, "dx", dx, in_names[i], ins[i]));
        CLH_TRY(clh_check_no_alias(ctx, fn, "dw", dw, in_names[i], ins[i]));
        CLH_TRY(clh_check_no_alias(ctx, fn, "db", db, in_names[i], ins[i]));
    }
    if (db)
        CLH_TRY(channel_sums(ctx, dy, NULL, g.n, g.o, (int)(g.pixels * g.k * g.k), db));
    if (!dx && !dw)
        return CLH_OK;
    size_t mark = clh_ws_mark(ctx);
    clh_tensor *dz = NULL;
    clh_status st = ws_matrix(ctx, g.rows, g.pixels, 0, &dz);
    if (st == CLH_OK)
        st = convt_backward_images(ctx, x, w, dy, &g, dz, dx, dw);
    clh_tensor_release(dz);
    clh_ws_reset(ctx, mark);
    return st;
}

/* ------------------------------------------------------------------ group norm */

static clh_status check_group_norm(clh_ctx *ctx, const char *fn, const clh_tensor *x, int groups,
                                   const clh_tensor *gamma, const char *beta_name,
                                   const clh_tensor *beta, const char *y_name,
                                   const clh_tensor *y) {
    CLH_TRY(clh_check_ctx(ctx, fn));
    CLH_TRY(clh_check_tensor(ctx, fn, "x", x));
    CLH_TRY(clh_check_tensor(ctx, fn, "gamma", gamma));
    CLH_TRY(clh_check_optional(ctx, fn, beta_name, beta));
    CLH_TRY(clh_check_tensor(ctx, fn, y_name, y));
    CLH_TRY(check_4d(ctx, fn, "x", x));
    CLH_TRY(check_positive(ctx, fn, "groups", groups));
    if (x->shape[1] % groups != 0)
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT,
                        "%s: groups (%d) must divide the %lld channels of x", fn, groups,
                        (long long)x->shape[1]);
    int64_t cshape[1] = {x->shape[1]};
    CLH_TRY(check_shape_against(ctx, fn, "x", x, "gamma", gamma, 1, cshape));
    if (beta)
        CLH_TRY(check_shape_against(ctx, fn, "x", x, beta_name, beta, 1, cshape));
    return check_shape_against(ctx, fn, "x", x, y_name, y, 4, x->shape);
}

clh_status clh_group_norm_forward(clh_ctx *ctx, const clh_tensor *x, int groups,
                                  const clh_tensor *gamma, const clh_tensor *beta, float eps,
                                  clh_tensor *y) {
    static const char fn[] = "clh_group_norm_forward";
    CLH_TRY(check_group_norm(ctx, fn, x, groups, gamma, "beta", beta, "y", y));
    if (!beta)
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT, "%s: tensor beta is NULL", fn);
    CLH_TRY(check_in_place_ok(ctx, fn, "y", y, "x", x));
    int channels = (int)x->shape[1], pixels = (int)(x->shape[2] * x->shape[3]);
    int total = (int)x->shape[0] * groups, count = channels / groups * pixels;
    clh_karg args[] = {CLH_KTENSOR(x),  CLH_KTENSOR(gamma), CLH_KTENSOR(beta),  CLH_KTENSOR(y),
                       CLH_KARG(total), CLH_KARG(count),    CLH_KARG(channels), CLH_KARG(pixels),
                       CLH_KARG(eps),   CLH_KLOCAL(0)};
    return launch_groups(ctx, "head_group_norm_forward", (size_t)total, NARGS(args), args);
}

/* stats (mean, rstd per (n, g)) and dx; then the parameter sums per channel. */
static clh_status group_norm_backward_core(clh_ctx *ctx, const clh_tensor *x, int groups,
                                           const clh_tensor *gamma, float eps, const clh_tensor *dy,
                                           clh_tensor *dx, clh_tensor *dgamma, clh_tensor *dbeta,
                                           clh_tensor *stats) {
    int batch = (int)x->shape[0], channels = (int)x->shape[1];
    int pixels = (int)(x->shape[2] * x->shape[3]), group_ch = channels / groups;
    int total = batch * groups, count = group_ch * pixels, write_dx = dx != NULL;
    clh_tensor *dxx = dx ? dx : stats; /* any valid buffer when dx is not written */
    clh_karg args[] = {CLH_KTENSOR(x),   CLH_KTENSOR(gamma), CLH_KTENSOR(dy),
                       CLH_KTENSOR(dxx), CLH_KTENSOR(stats), CLH_KARG(total),
                       CLH_KARG(count),  CLH_KARG(channels), CLH_KARG(pixels),
                       CLH_KARG(eps),    CLH_KARG(write_dx), CLH_KLOCAL(0)};
    CLH_TRY(launch_groups(ctx, "head_group_norm_backward", (size_t)total, NARGS(args), args));
    if (!dgamma && !dbeta)
        return CLH_OK;
    int want_g = dgamma != NULL, want_b = dbeta != NULL;
    clh_tensor *dg = dgamma ? dgamma : stats, *dbb = dbeta ? dbeta : stats;
    clh_karg pargs[] = {CLH_KTENSOR(x),     CLH_KTENSOR(dy),  CLH_KTENSOR(stats), CLH_KARG(batch),
                        CLH_KARG(channels), CLH_KARG(pixels), CLH_KARG(group_ch), CLH_KTENSOR(dg),
                        CLH_KARG(want_g),   CLH_KTENSOR(dbb), CLH_KARG(want_b),   CLH_KLOCAL(0)};
    return launch_groups(ctx, "head_group_norm_params", (size_t)channels, NARGS(pargs), pargs);
}

clh_status clh_group_norm_backward(clh_ctx *ctx, const clh_tensor *x, int groups,
                                   const clh_tensor *gamma, float eps, const clh_tensor *dy,
                                   clh_tensor *dx, clh_tensor *dgamma, clh_tensor *dbeta) {
    static const char fn[] = "clh_group_norm_backward";
    CLH_TRY(check_group_norm(ctx, fn, x, groups, gamma, "dbeta", dbeta, "dy", dy));
    CLH_TRY(clh_check_optional(ctx, fn, "dx", dx));
    CLH_TRY(clh_check_optional(ctx, fn, "dgamma", dgamma));
    int64_t cshape[1] = {x->shape[1]};
    if (dx)
        CLH_TRY(check_shape_against(ctx, fn, "x", x, "dx", dx, 4, x->shape));
    if (dgamma)
        CLH_TRY(check_shape_against(ctx, fn, "x", x, "dgamma", dgamma, 1, cshape));
    const clh_tensor *ins[] = {x, gamma, dy};
    const char *in_names[] = {"x", "gamma", "dy"};
    for (int i = 0; i < 3; i++) {
        CLH_TRY(clh_check_no_alias(ctx, fn, "dx", dx, in_names[i], ins[i]));
        CLH_TRY(clh_check_no_alias(ctx, fn, "dgamma", dgamma, in_names[i], ins[i]));
        CLH_TRY(clh_check_no_alias(ctx, fn, "dbeta", dbeta, in_names[i], ins[i]));
    }
    if (!dx && !dgamma && !dbeta)
        return CLH_OK;
    size_t mark = clh_ws_mark(ctx);
    clh_tensor *stats = NULL;
    clh_status st = ws_matrix(ctx, (size_t)x->shape[0] * groups, 2, 0, &stats);
    if (st == CLH_OK)
        st = group_norm_backward_core(ctx, x, groups, gamma, eps, dy, dx, dgamma, dbeta, stats);
    clh_tensor_release(stats);
    clh_ws_reset(ctx, mark);
    return st;
}

/* ------------------------------------------------------------------ bilinear resize */

/* big [N, C, H2, W2] and small ... share N and C; both 4-D. */
static clh_status check_planes(clh_ctx *ctx, const char *fn, const char *a_name,
                               const clh_tensor *a, const char *b_name, const clh_tensor *b) {
    CLH_TRY(clh_check_tensor(ctx, fn, a_name, a));
    CLH_TRY(clh_check_tensor(ctx, fn, b_name, b));
    CLH_TRY(check_4d(ctx, fn, a_name, a));
    CLH_TRY(check_4d(ctx, fn, b_name, b));
    if (a->shape[0] != b->shape[0] || a->shape[1] != b->shape[1])
        return clh_shape_fail(ctx, fn, a_name, a, b_name, b, "batch and channels must agree");
    return clh_check_no_alias(ctx, fn, b_name, b, a_name, a);
}

static clh_status bilinear_launch(clh_ctx *ctx, const char *kernel, const clh_tensor *src,
                                  const clh_tensor *small, const clh_tensor *big, int align,
                                  clh_tensor *dst) {
    int planes = (int)(small->shape[0] * small->shape[1]);
    int in_h = (int)small->shape[2], in_w = (int)small->shape[3];
    int out_h = (int)big->shape[2], out_w = (int)big->shape[3];
    align = align != 0;
    clh_karg args[] = {CLH_KTENSOR(src), CLH_KARG(planes), CLH_KARG(in_h),  CLH_KARG(in_w),
                       CLH_KARG(out_h),  CLH_KARG(out_w),  CLH_KARG(align), CLH_KTENSOR(dst)};
    return clh_launch_1d(ctx, kernel, dst->numel, NARGS(args), args);
}

clh_status clh_bilinear_resize_forward(clh_ctx *ctx, const clh_tensor *x, int align_corners,
                                       clh_tensor *y) {
    static const char fn[] = "clh_bilinear_resize_forward";
    CLH_TRY(clh_check_ctx(ctx, fn));
    CLH_TRY(check_planes(ctx, fn, "x", x, "y", y));
    return bilinear_launch(ctx, "head_bilinear_forward", x, x, y, align_corners, y);
}

clh_status clh_bilinear_resize_backward(clh_ctx *ctx, const clh_tensor *dy, int align_corners,
                                        clh_tensor *dx) {
    static const char fn[] = "clh_bilinear_resize_backward";
    CLH_TRY(clh_check_ctx(ctx, fn));
    CLH_TRY(check_planes(ctx, fn, "dy", dy, "dx", dx));
    return bilinear_launch(ctx, "head_bilinear_backward", dy, dx, dy, align_corners, dx);
}

/* ------------------------------------------------------------------ average pooling */

/* x [N, C, H, W] and y [N, C, H / k, W / k]. */
static clh_status check_pool(clh_ctx *ctx, const char *fn, const char *x_name, const clh_tensor *x,
                             int k, const char *y_name, const clh_tensor *y) {
    CLH_TRY(clh_check_ctx(ctx, fn));
    CLH_TRY(check_positive(ctx, fn, "k", k));
    CLH_TRY(clh_check_tensor(ctx, fn, x_name, x));
    CLH_TRY(clh_check_tensor(ctx, fn, y_name, y));
    CLH_TRY(check_4d(ctx, fn, x_name, x));
    if (x->shape[2] < k || x->shape[3] < k)
        return clh_fail(ctx, CLH_ERR_SHAPE, "%s: %s [.., %lld, %lld] is smaller than k = %d", fn,
                        x_name, (long long)x->shape[2], (long long)x->shape[3], k);
    int64_t want[4] = {x->shape[0], x->shape[1], x->shape[2] / k, x->shape[3] / k};
    CLH_TRY(check_shape_against(ctx, fn, x_name, x, y_name, y, 4, want));
    return clh_check_no_alias(ctx, fn, y_name, y, x_name, x);
}

static clh_status pool_launch(clh_ctx *ctx, const char *kernel, const clh_tensor *src,
                              const clh_tensor *big, const clh_tensor *small, int k,
                              clh_tensor *dst) {
    int planes = (int)(big->shape[0] * big->shape[1]);
    int in_h = (int)big->shape[2], in_w = (int)big->shape[3];
    int out_h = (int)small->shape[2], out_w = (int)small->shape[3];
    clh_karg args[] = {CLH_KTENSOR(src), CLH_KARG(planes), CLH_KARG(in_h),  CLH_KARG(in_w),
                       CLH_KARG(k),      CLH_KARG(out_h),  CLH_KARG(out_w), CLH_KTENSOR(dst)};
    return clh_launch_1d(ctx, kernel, dst->numel, NARGS(args), args);
}

clh_status clh_avg_pool2d_forward(clh_ctx *ctx, const clh_tensor *x, int k, clh_tensor *y) {
    static const char fn[] = "clh_avg_pool2d_forward";
    CLH_TRY(check_pool(ctx, fn, "x", x, k, "y", y));
    return pool_launch(ctx, "head_avg_pool_forward", x, x, y, k, y);
}

clh_status clh_avg_pool2d_backward(clh_ctx *ctx, const clh_tensor *dy, int k, clh_tensor *dx) {
    static const char fn[] = "clh_avg_pool2d_backward";
    CLH_TRY(check_pool(ctx, fn, "dx", dx, k, "dy", dy));
    return pool_launch(ctx, "head_avg_pool_backward", dy, dx, dy, k, dx);
}

/* ------------------------------------------------------------------ activations */

enum { ACT_RELU = 0, ACT_ELU = 1 };

static clh_status act_forward(clh_ctx *ctx, const char *fn, int op, const clh_tensor *x,
                              clh_tensor *y) {
    CLH_TRY(clh_check_ctx(ctx, fn));
    CLH_TRY(clh_check_same_numel(ctx, fn, "x", x, "y", y));
    CLH_TRY(check_in_place_ok(ctx, fn, "y", y, "x", x));
    int n = (int)x->numel;
    clh_karg args[] = {CLH_KTENSOR(x), CLH_KARG(n), CLH_KARG(op), CLH_KTENSOR(y)};
    return clh_launch_1d(ctx, "head_act_forward", x->numel, NARGS(args), args);
}

static clh_status act_backward(clh_ctx *ctx, const char *fn, int op, const clh_tensor *x,
                               const clh_tensor *dy, clh_tensor *dx) {
    CLH_TRY(clh_check_ctx(ctx, fn));
    CLH_TRY(clh_check_same_numel(ctx, fn, "x", x, "dy", dy));
    CLH_TRY(clh_check_same_numel(ctx, fn, "x", x, "dx", dx));
    CLH_TRY(check_in_place_ok(ctx, fn, "dx", dx, "dy", dy));
    CLH_TRY(check_in_place_ok(ctx, fn, "dx", dx, "x", x));
    int n = (int)x->numel;
    clh_karg args[] = {CLH_KTENSOR(x), CLH_KTENSOR(dy), CLH_KARG(n), CLH_KARG(op), CLH_KTENSOR(dx)};
    return clh_launch_1d(ctx, "head_act_backward", x->numel, NARGS(args), args);
}

clh_status clh_relu_forward(clh_ctx *ctx, const clh_tensor *x, clh_tensor *y) {
    return act_forward(ctx, "clh_relu_forward", ACT_RELU, x, y);
}

clh_status clh_elu_forward(clh_ctx *ctx, const clh_tensor *x, clh_tensor *y) {
    return act_forward(ctx, "clh_elu_forward", ACT_ELU, x, y);
}

clh_status clh_relu_backward(clh_ctx *ctx, const clh_tensor *x, const clh_tensor *dy,
                             clh_tensor *dx) {
    return act_backward(ctx, "clh_relu_backward", ACT_RELU, x, dy, dx);
}

clh_status clh_elu_backward(clh_ctx *ctx, const clh_tensor *x, const clh_tensor *dy,
                            clh_tensor *dx) {
    return act_backward(ctx, "clh_elu_backward", ACT_ELU, x, dy, dx);
}

/* ------------------------------------------------------------------ Swin window ops */

/* grid [N, H, W, C] (H, W multiples of ws) and win [N nW, ws ws, C]. */
static clh_status check_windows(clh_ctx *ctx, const char *fn, const char *grid_name,
                                const clh_tensor *grid, int ws, const char *win_name,
                                const clh_tensor *win) {
    CLH_TRY(clh_check_ctx(ctx, fn));
    CLH_TRY(check_positive(ctx, fn, "ws", ws));
    CLH_TRY(clh_check_tensor(ctx, fn, grid_name, grid));
    CLH_TRY(clh_check_tensor(ctx, fn, win_name, win));
    CLH_TRY(check_4d(ctx, fn, grid_name, grid));
    if (grid->shape[1] % ws != 0 || grid->shape[2] % ws != 0)
        return clh_fail(ctx, CLH_ERR_SHAPE,
                        "%s: the grid of %s [%lld, %lld] is not a multiple of ws = %d", fn,
                        grid_name, (long long)grid->shape[1], (long long)grid->shape[2], ws);
    int64_t windows = grid->shape[0] * (grid->shape[1] / ws) * (grid->shape[2] / ws);
    int64_t want[3] = {windows, (int64_t)ws * ws, grid->shape[3]};
    CLH_TRY(check_shape_against(ctx, fn, grid_name, grid, win_name, win, 3, want));
    return clh_check_no_alias(ctx, fn, win_name, win, grid_name, grid);
}

static clh_status window_permute(clh_ctx *ctx, const clh_tensor *src, const clh_tensor *grid,
                                 int ws, int direction, clh_tensor *dst) {
    int height = (int)grid->shape[1], width = (int)grid->shape[2], chans = (int)grid->shape[3];
    int total = (int)grid->numel;
    clh_karg args[] = {CLH_KTENSOR(src), CLH_KARG(height), CLH_KARG(width),     CLH_KARG(chans),
                       CLH_KARG(ws),     CLH_KARG(total),  CLH_KARG(direction), CLH_KTENSOR(dst)};
    return clh_launch_1d(ctx, "head_window_permute", grid->numel, NARGS(args), args);
}

clh_status clh_window_partition(clh_ctx *ctx, const clh_tensor *x, int ws, clh_tensor *win) {
    CLH_TRY(check_windows(ctx, "clh_window_partition", "x", x, ws, "win", win));
    return window_permute(ctx, x, x, ws, 0, win);
}

clh_status clh_window_reverse(clh_ctx *ctx, const clh_tensor *win, int ws, clh_tensor *x) {
    CLH_TRY(check_windows(ctx, "clh_window_reverse", "x", x, ws, "win", win));
    return window_permute(ctx, win, x, ws, 1, x);
}

clh_status clh_window_partition_backward(clh_ctx *ctx, const clh_tensor *dwin, int ws,
                                         clh_tensor *dx) {
    CLH_TRY(check_windows(ctx, "clh_window_partition_backward", "dx", dx, ws, "dwin", dwin));
    return window_permute(ctx, dwin, dx, ws, 1, dx);
}

clh_status clh_window_reverse_backward(clh_ctx *ctx, const clh_tensor *dx, int ws,
                                       clh_tensor *dwin) {
    CLH_TRY(check_windows(ctx, "clh_window_reverse_backward", "dx", dx, ws, "dwin", dwin));
    return window_permute(ctx, dx, dx, ws, 0, dwin);
}

static clh_status roll_core(clh_ctx *ctx, const char *fn, const char *x_name, const clh_tensor *x,
                            int shift_h, int shift_w, const char *y_name, clh_tensor *y) {
    CLH_TRY(clh_check_ctx(ctx, fn));
    CLH_TRY(clh_check_tensor(ctx, fn, x_name, x));
    CLH_TRY(clh_check_tensor(ctx, fn, y_name, y));
    CLH_TRY(check_4d(ctx, fn, x_name, x));
    CLH_TRY(check_shape_against(ctx, fn, x_name, x, y_name, y, 4, x->shape));
    CLH_TRY(clh_check_no_alias(ctx, fn, y_name, y, x_name, x));
    int height = (int)x->shape[1], width = (int)x->shape[2], chans = (int)x->shape[3];
    /* reduce to [0, H) and [0, W) (C's % keeps the sign of a negative shift) */
    int sh = (int)(((long long)shift_h % height + height) % height);
    int sw = (int)(((long long)shift_w % width + width) % width);
    int total = (int)x->numel;
    clh_karg args[] = {CLH_KTENSOR(x), CLH_KARG(height), CLH_KARG(width), CLH_KARG(chans),
                       CLH_KARG(sh),   CLH_KARG(sw),     CLH_KARG(total), CLH_KTENSOR(y)};
    return clh_launch_1d(ctx, "head_roll2d", x->numel, NARGS(args), args);
}

clh_status clh_roll2d(clh_ctx *ctx, const clh_tensor *x, int shift_h, int shift_w, clh_tensor *y) {
    return roll_core(ctx, "clh_roll2d", "x", x, shift_h, shift_w, "y", y);
}

clh_status clh_roll2d_backward(clh_ctx *ctx, const clh_tensor *dy, int shift_h, int shift_w,
                               clh_tensor *dx) {
    /* -INT_MIN overflows: reduce first (the result only depends on the shift mod H, W) */
    long long nh = -(long long)shift_h, nw = -(long long)shift_w;
    if (dy && dy->ndim == 4 && dy->shape[1] > 0 && dy->shape[2] > 0) {
        nh %= dy->shape[1];
        nw %= dy->shape[2];
    } else {
        nh = 0;
        nw = 0;
    }
    return roll_core(ctx, "clh_roll2d_backward", "dy", dy, (int)nh, (int)nw, "dx", dx);
}
