/* GEMM path selection (CLBlast on the device, the host BLAS on mapped buffers, or clhclip's
 * own OpenCL kernels in gemm_ocl.c) and the host-BLAS path itself. Private to the library
 * and its tests; not installed. */
#ifndef CLHCLIP_GEMM_HOST_H
#define CLHCLIP_GEMM_HOST_H

#include "internal.h"

typedef enum clh_gemm_path {
    CLH_GEMM_AUTO = 0, /* host BLAS on CPU devices with host-unified memory, CLBlast elsewhere */
    CLH_GEMM_CLBLAST = 1,
    CLH_GEMM_HOST = 2,
    CLH_GEMM_OCL = 3, /* kernels/gemm.cl (gemm_ocl.c); auto does not pick it (gemm_host.c) */
} clh_gemm_path;

/* Process-wide override of $CLHCLIP_GEMM (tests use it to compare the paths).
 * CLH_GEMM_AUTO restores the default: follow $CLHCLIP_GEMM, else auto. */
void clh_gemm_set_path(clh_gemm_path path);

/* The path clh_gemm / clh_gemm_batched take on ctx's device now (never CLH_GEMM_AUTO).
 * Fails with CLH_ERR_INVALID_ARGUMENT when $CLHCLIP_GEMM holds an unknown value. */
clh_status clh_gemm_resolve_path(clh_ctx *ctx, clh_gemm_path *out);

/* 1 when the device is a CPU whose buffers live in host memory (PoCL): there mapping a
 * buffer costs nothing and the host BLAS runs on the same cores as the kernels. */
int clh_gemm_host_capable(clh_ctx *ctx);

/* "OpenBLAS 0.3.21 ... (n threads)" or similar, for benchmark reports. */
const char *clh_gemm_host_blas_name(void);

/* Strided-batched row-major SGEMM through cblas_sgemm on mapped buffers: waits for the
 * queue, maps each distinct buffer of A, B, C once, runs the products and unmaps.
 * Arguments are already validated (gemm.c's check_gemm). */
clh_status clh_gemm_host(clh_ctx *ctx, const char *fn, int trans_a, int trans_b, size_t m, size_t n,
                         size_t k, float alpha, const clh_tensor *a, size_t lda, size_t stride_a,
                         const clh_tensor *b, size_t ldb, size_t stride_b, float beta,
                         clh_tensor *c, size_t ldc, size_t stride_c, size_t batch);

#endif
