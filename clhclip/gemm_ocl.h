/* The CLHCLIP_GEMM=ocl path: clhclip's own register-tiled OpenCL GEMM (kernels/gemm.cl),
 * written for CPU-class devices. Private to the library and its tests; not installed. */
#ifndef CLHCLIP_GEMM_OCL_H
#define CLHCLIP_GEMM_OCL_H

#include "internal.h"

/* Strided-batched row-major SGEMM with kernels/gemm.cl on ctx's queue (asynchronous, like
 * CLBlast). op(B) is first packed into the workspace (n rounded up to 16, times k floats
 * per batch; one copy when stride_b = 0). Arguments are already
 * validated (gemm.c's check_gemm); fails with CLH_ERR_UNSUPPORTED when an index would not
 * fit the kernels' int arithmetic. */
clh_status clh_gemm_ocl(clh_ctx *ctx, const char *fn, int trans_a, int trans_b, size_t m, size_t n,
                        size_t k, float alpha, const clh_tensor *a, size_t lda, size_t stride_a,
                        const clh_tensor *b, size_t ldb, size_t stride_b, float beta, clh_tensor *c,
                        size_t ldc, size_t stride_c, size_t batch);

#endif
