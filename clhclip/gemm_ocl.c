/* clhclip's own OpenCL GEMM (kernels/gemm.cl): op(B) packed into panels of 16 columns in the
 * workspace, then TM x TN register tiles per work-item. Chosen with CLHCLIP_GEMM=ocl; "auto"
 * keeps the host BLAS on PoCL, where it is measured faster, and CLBlast on GPUs
 * (gemm_host.c). */
#include "gemm_ocl.h"

#include "layer_util.h"

#include <limits.h>
#include <stdlib.h>

/* Tile of C per work-item; must match TM / TN in kernels/gemm.cl. */
enum { GEMM_TM = 8, GEMM_TN = 16 };

/* Work-items per group along (dimension 0, dimension 1) before clamping to the kernel's
 * queried limit: 4 x 8 tiles, a block of C of 32..64 x 64..128, which keeps a group's rows
 * of A and panels of B in a CPU core's L2 and still gives a few groups per core at the
 * encoder shapes (measured: 1x1 .. 16x4 are within the noise of each other on PoCL). */
enum { GEMM_LOCAL_0 = 4, GEMM_LOCAL_1 = 8 };

/* Last element + 1 that `batch` matrices of rows x cols (ld, stride) at t's offset reach. */
static size_t extent_of(const clh_tensor *t, size_t rows, size_t cols, size_t ld, size_t stride,
                        size_t batch) {
    return t->offset + (batch - 1) * stride + (rows - 1) * ld + cols;
}

static int below_int_max(size_t v) {
    return v < (size_t)INT_MAX;
}

static size_t panels_of(size_t n) {
    return (n + GEMM_TN - 1) / GEMM_TN;
}

/* op(B) of each of `count` batches into bp: panels_of(n) panels of k x 16. */
static clh_status pack_b(clh_ctx *ctx, int trans_b, const clh_tensor *b, size_t k, size_t n,
                         size_t ldb, size_t stride_b, size_t count, clh_tensor *bp) {
    int ld = (int)ldb, stride = (int)stride_b, k_i = (int)k, n_i = (int)n, trans = trans_b != 0;
    clh_karg args[] = {CLH_KTENSOR(b), CLH_KARG(ld),  CLH_KARG(stride), CLH_KTENSOR(bp),
                       CLH_KARG(k_i),  CLH_KARG(n_i), CLH_KARG(trans)};
    size_t global[3] = {k, panels_of(n), count}, local[3] = {16, 1, 1};
    return clh_launch(ctx, "gemm_pack_b", 3, global, local, NARGS(args), args);
}

static clh_status launch_tiles(clh_ctx *ctx, int trans_a, size_t m, size_t n, size_t k, float alpha,
                               const clh_tensor *a, size_t lda, size_t stride_a,
                               const clh_tensor *bp, size_t stride_bp, float beta, clh_tensor *c,
                               size_t ldc, size_t stride_c, size_t batch) {
    const char *kernel = trans_a ? "gemm_tile_at" : "gemm_tile_an";
    /* Consecutive groups (dimension 0 first) walk along the smaller operand while the larger
     * one's block stays in cache: across B for the text encoder's 13167 x 512 activations
     * times a 512 x 512 weight, down A for ViT's 577 rows times a 768 x 3072 weight
     * (measured 10-30 % either way at those shapes). */
    int rows_first = m < n;
    int lda_i = (int)lda, sa = (int)stride_a, sb = (int)stride_bp, ldc_i = (int)ldc;
    int sc = (int)stride_c, m_i = (int)m, n_i = (int)n, k_i = (int)k;
    clh_karg args[] = {CLH_KTENSOR(a), CLH_KARG(lda_i),     CLH_KARG(sa),    CLH_KTENSOR(bp),
                       CLH_KARG(sb),   CLH_KTENSOR(c),      CLH_KARG(ldc_i), CLH_KARG(sc),
                       CLH_KARG(m_i),  CLH_KARG(n_i),       CLH_KARG(k_i),   CLH_KARG(alpha),
                       CLH_KARG(beta), CLH_KARG(rows_first)};
    size_t col_tiles = panels_of(n), row_tiles = (m + GEMM_TM - 1) / GEMM_TM;
    size_t global[3] = {rows_first ? row_tiles : col_tiles, rows_first ? col_tiles : row_tiles,
                        batch};
    /* clh_launch shrinks this to the kernel's queried work-group limit and rounds the global
     * size up to it; the kernel skips tiles outside C. */
    size_t local[3] = {GEMM_LOCAL_0, GEMM_LOCAL_1, 1};
    return clh_launch(ctx, kernel, 3, global, local, NARGS(args), args);
}

clh_status clh_gemm_ocl(clh_ctx *ctx, const char *fn, int trans_a, int trans_b, size_t m, size_t n,
                        size_t k, float alpha, const clh_tensor *a, size_t lda, size_t stride_a,
                        const clh_tensor *b, size_t ldb, size_t stride_b, float beta, clh_tensor *c,
                        size_t ldc, size_t stride_c, size_t batch) {
    /* stride_b = 0 (one B shared by the batch) needs one packed copy only */
    size_t b_count = stride_b == 0 ? 1 : batch;
    size_t packed = panels_of(n) * GEMM_TN * k; /* floats per packed batch */
    size_t ends[3] = {
        extent_of(a, trans_a ? k : m, trans_a ? m : k, lda, stride_a, batch),
        extent_of(b, trans_b ? n : k, trans_b ? k : n, ldb, stride_b, batch),
        extent_of(c, m, n, ldc, stride_c, batch),
    };
    int fits = below_int_max(ends[0]) && below_int_max(ends[1]) && below_int_max(ends[2]) &&
               below_int_max(b_count * packed);
    if (!fits)
        return clh_fail(ctx, CLH_ERR_UNSUPPORTED,
                        "%s: the OpenCL GEMM indexes with int; m=%zu n=%zu k=%zu batch=%zu reach "
                        "element %zu/%zu/%zu of A/B/C (set CLHCLIP_GEMM=host or clblast)",
                        fn, m, n, k, batch, ends[0], ends[1], ends[2]);
    size_t mark = clh_ws_mark(ctx);
    int64_t shape[2] = {(int64_t)b_count, (int64_t)packed};
    clh_tensor *bp = NULL;
    clh_status st = clh_ws_tensor(ctx, 2, shape, &bp);
    if (st == CLH_OK && bp->offset + bp->numel > (size_t)INT_MAX)
        st = clh_fail(ctx, CLH_ERR_UNSUPPORTED,
                      "%s: the packed B (%zu floats) lies beyond what the OpenCL GEMM can index "
                      "(set CLHCLIP_GEMM=host or clblast)",
                      fn, bp->numel);
    if (st == CLH_OK)
        st = pack_b(ctx, trans_b, b, k, n, ldb, stride_b, b_count, bp);
    if (st == CLH_OK)
        st = launch_tiles(ctx, trans_a, m, n, k, alpha, a, lda, stride_a, bp,
                          stride_b == 0 ? 0 : packed, beta, c, ldc, stride_c, batch);
    clh_tensor_release(bp);
    clh_ws_reset(ctx, mark);
    return st;
}
