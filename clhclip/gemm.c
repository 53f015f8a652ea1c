/* Matrix products (row-major, single precision) through CLBlast's C API, through the host
 * BLAS on mapped buffers where that is faster, or through clhclip's own OpenCL kernels
 * (gemm_ocl.c); gemm_host.c decides. */
#include "internal.h" /* first: it sets CL_TARGET_OPENCL_VERSION for clblast_c.h */

#include "gemm_host.h"
#include "gemm_ocl.h"

#include <clblast_c.h>
#include <stdio.h>

/* "CLBlastInvalidLocalMemUsage" for -2046; NULL for a code CLBlast does not define. */
static const char *clblast_status_name(CLBlastStatusCode code) {
    switch (code) {
        case CLBlastSuccess:
            return "CLBlastSuccess";
        case CLBlastOpenCLCompilerNotAvailable:
            return "CLBlastOpenCLCompilerNotAvailable";
        case CLBlastTempBufferAllocFailure:
            return "CLBlastTempBufferAllocFailure";
        case CLBlastOpenCLOutOfResources:
            return "CLBlastOpenCLOutOfResources";
        case CLBlastOpenCLOutOfHostMemory:
            return "CLBlastOpenCLOutOfHostMemory";
        case CLBlastOpenCLBuildProgramFailure:
            return "CLBlastOpenCLBuildProgramFailure";
        case CLBlastInvalidValue:
            return "CLBlastInvalidValue";
        case CLBlastInvalidCommandQueue:
            return "CLBlastInvalidCommandQueue";
        case CLBlastInvalidMemObject:
            return "CLBlastInvalidMemObject";
        case CLBlastInvalidBinary:
            return "CLBlastInvalidBinary";
        case CLBlastInvalidBuildOptions:
            return "CLBlastInvalidBuildOptions";
        case CLBlastInvalidProgram:
            return "CLBlastInvalidProgram";
        case CLBlastInvalidProgramExecutable:
            return "CLBlastInvalidProgramExecutable";
        case CLBlastInvalidKernelName:
            return "CLBlastInvalidKernelName";
        case CLBlastInvalidKernelDefinition:
            return "CLBlastInvalidKernelDefinition";
        case CLBlastInvalidKernel:
            return "CLBlastInvalidKernel";
        case CLBlastInvalidArgIndex:
            return "CLBlastInvalidArgIndex";
        case CLBlastInvalidArgValue:
            return "CLBlastInvalidArgValue";
        case CLBlastInvalidArgSize:
            return "CLBlastInvalidArgSize";
        case CLBlastInvalidKernelArgs:
            return "CLBlastInvalidKernelArgs";
        case CLBlastInvalidLocalNumDimensions:
            return "CLBlastInvalidLocalNumDimensions";
        case CLBlastInvalidLocalThreadsTotal:
            return "CLBlastInvalidLocalThreadsTotal";
        case CLBlastInvalidLocalThreadsDim:
            return "CLBlastInvalidLocalThreadsDim";
        case CLBlastInvalidGlobalOffset:
            return "CLBlastInvalidGlobalOffset";
        case CLBlastInvalidEventWaitList:
            return "CLBlastInvalidEventWaitList";
        case CLBlastInvalidEvent:
            return "CLBlastInvalidEvent";
        case CLBlastInvalidOperation:
            return "CLBlastInvalidOperation";
        case CLBlastInvalidBufferSize:
            return "CLBlastInvalidBufferSize";
        case CLBlastInvalidGlobalWorkSize:
            return "CLBlastInvalidGlobalWorkSize";
        case CLBlastNotImplemented:
            return "CLBlastNotImplemented";
        case CLBlastInvalidMatrixA:
            return "CLBlastInvalidMatrixA";
        case CLBlastInvalidMatrixB:
            return "CLBlastInvalidMatrixB";
        case CLBlastInvalidMatrixC:
            return "CLBlastInvalidMatrixC";
        case CLBlastInvalidVectorX:
            return "CLBlastInvalidVectorX";
        case CLBlastInvalidVectorY:
            return "CLBlastInvalidVectorY";
        case CLBlastInvalidDimension:
            return "CLBlastInvalidDimension";
        case CLBlastInvalidLeadDimA:
            return "CLBlastInvalidLeadDimA";
        case CLBlastInvalidLeadDimB:
            return "CLBlastInvalidLeadDimB";
        case CLBlastInvalidLeadDimC:
            return "CLBlastInvalidLeadDimC";
        case CLBlastInvalidIncrementX:
            return "CLBlastInvalidIncrementX";
        case CLBlastInvalidIncrementY:
            return "CLBlastInvalidIncrementY";
        case CLBlastInsufficientMemoryA:
            return "CLBlastInsufficientMemoryA";
        case CLBlastInsufficientMemoryB:
            return "CLBlastInsufficientMemoryB";
        case CLBlastInsufficientMemoryC:
            return "CLBlastInsufficientMemoryC";
        case CLBlastInsufficientMemoryX:
            return "CLBlastInsufficientMemoryX";
        case CLBlastInsufficientMemoryY:
            return "CLBlastInsufficientMemoryY";
        case CLBlastInsufficientMemoryTemp:
            return "CLBlastInsufficientMemoryTemp";
        case CLBlastInvalidBatchCount:
            return "CLBlastInvalidBatchCount";
        case CLBlastInvalidOverrideKernel:
            return "CLBlastInvalidOverrideKernel";
        case CLBlastMissingOverrideParameter:
            return "CLBlastMissingOverrideParameter";
        case CLBlastInvalidLocalMemUsage:
            return "CLBlastInvalidLocalMemUsage";
        case CLBlastNoHalfPrecision:
            return "CLBlastNoHalfPrecision";
        case CLBlastNoDoublePrecision:
            return "CLBlastNoDoublePrecision";
        case CLBlastInvalidVectorScalar:
            return "CLBlastInvalidVectorScalar";
        case CLBlastInsufficientMemoryScalar:
            return "CLBlastInsufficientMemoryScalar";
        case CLBlastDatabaseError:
            return "CLBlastDatabaseError";
        case CLBlastUnknownError:
            return "CLBlastUnknownError";
        case CLBlastUnexpectedError:
            return "CLBlastUnexpectedError";
    }
    return NULL;
}

/* "<routine>(<m>x<n>x<k>, batch b) on '<device>': CLBlastX (-n)", plus the OpenCL name
 * for codes CLBlast passes through from OpenCL. */
static clh_status clblast_fail(clh_ctx *ctx, CLBlastStatusCode code, const char *routine, size_t m,
                               size_t n, size_t k, size_t batch) {
    const char *name = clblast_status_name(code);
    char shown[160];
    if (name && code > -1000)
        snprintf(shown, sizeof shown, "%s / %s (%d)", name, clh_cl_error_name((int)code),
                 (int)code);
    else if (name)
        snprintf(shown, sizeof shown, "%s (%d)", name, (int)code);
    else
        snprintf(shown, sizeof shown, "unknown CLBlast status / %s (%d)",
                 clh_cl_error_name((int)code), (int)code);
    return clh_fail(ctx, CLH_ERR_CLBLAST, "%s(m=%zu, n=%zu, k=%zu, batch=%zu) on '%s': %s", routine,
                    m, n, k, batch, ctx->info.name, shown);
}

/* Check that `batch` stored matrices of rows x cols (leading dimension ld, `stride`
 * elements apart) lie inside tensor t. */
static clh_status check_matrix(clh_ctx *ctx, const char *fn, const char *name, const clh_tensor *t,
                               size_t rows, size_t cols, size_t ld, size_t stride, size_t batch) {
    if (!t)
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT, "%s: matrix %s is NULL", fn, name);
    if (t->ctx != ctx)
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT, "%s: matrix %s belongs to another context",
                        fn, name);
    if (ld < cols)
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT,
                        "%s: leading dimension of %s (%zu) is smaller than its stored row "
                        "length %zu",
                        fn, name, ld, cols);
    size_t need = (batch - 1) * stride + (rows - 1) * ld + cols;
    if (need > t->numel) {
        char s[128];
        clh_shape_str(t->ndim, t->shape, s, sizeof s);
        return clh_fail(ctx, CLH_ERR_SHAPE,
                        "%s: %s needs %zu elements (%zu x %zu stored, ld %zu, %zu batch(es) at "
                        "stride %zu) but its tensor has shape %s (%zu elements)",
                        fn, name, need, rows, cols, ld, batch, stride, s, t->numel);
    }
    return CLH_OK;
}

/* Validate both GEMM entry points; *skip is set when there is nothing to compute. */
static clh_status check_gemm(clh_ctx *ctx, const char *fn, int trans_a, int trans_b, size_t m,
                             size_t n, size_t k, const clh_tensor *a, size_t lda, size_t stride_a,
                             const clh_tensor *b, size_t ldb, size_t stride_b, const clh_tensor *c,
                             size_t ldc, size_t stride_c, size_t batch, int *skip) {
    *skip = 0;
    if (!ctx)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "%s: NULL context", fn);
    if (m == 0 || n == 0 || batch == 0) {
        *skip = 1;
        return CLH_OK;
    }
    if (k == 0)
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT,
                        "%s: k = 0 (an empty inner dimension) is not supported", fn);
    CLH_TRY(check_matrix(ctx, fn, "A", a, trans_a ? k : m, trans_a ? m : k, lda, stride_a, batch));
    CLH_TRY(check_matrix(ctx, fn, "B", b, trans_b ? n : k, trans_b ? k : n, ldb, stride_b, batch));
    CLH_TRY(check_matrix(ctx, fn, "C", c, m, n, ldc, stride_c, batch));
    if (batch > 1 && stride_c < (m - 1) * ldc + n)
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT,
                        "%s: the %zu output matrices overlap (stride_c %zu < %zu)", fn, batch,
                        stride_c, (m - 1) * ldc + n);
    return CLH_OK;
}

static CLBlastTranspose transpose_of(int trans) {
    return trans ? CLBlastTransposeYes : CLBlastTransposeNo;
}

clh_status clh_gemm(clh_ctx *ctx, int trans_a, int trans_b, size_t m, size_t n, size_t k,
                    float alpha, const clh_tensor *a, size_t lda, const clh_tensor *b, size_t ldb,
                    float beta, clh_tensor *c, size_t ldc) {
    int skip;
    CLH_TRY(check_gemm(ctx, "clh_gemm", trans_a, trans_b, m, n, k, a, lda, 0, b, ldb, 0, c, ldc, 0,
                       1, &skip));
    if (skip)
        return CLH_OK;
    clh_gemm_path path;
    CLH_TRY(clh_gemm_resolve_path(ctx, &path));
    if (path == CLH_GEMM_HOST)
        return clh_gemm_host(ctx, "clh_gemm", trans_a, trans_b, m, n, k, alpha, a, lda, 0, b, ldb,
                             0, beta, c, ldc, 0, 1);
    if (path == CLH_GEMM_OCL)
        return clh_gemm_ocl(ctx, "clh_gemm", trans_a, trans_b, m, n, k, alpha, a, lda, 0, b, ldb, 0,
                            beta, c, ldc, 0, 1);
    cl_event ev = NULL;
    CLBlastStatusCode st =
        CLBlastSgemm(CLBlastLayoutRowMajor, transpose_of(trans_a), transpose_of(trans_b), m, n, k,
                     alpha, a->mem, a->offset, lda, b->mem, b->offset, ldb, beta, c->mem, c->offset,
                     ldc, clh_queue_ptr(ctx), &ev);
    if (st != CLBlastSuccess)
        return clblast_fail(ctx, st, "CLBlastSgemm", m, n, k, 1);
    clh_profile_event(ctx, "clblast_sgemm", ev);
    return CLH_OK;
}

clh_status clh_gemm_batched(clh_ctx *ctx, int trans_a, int trans_b, size_t m, size_t n, size_t k,
                            float alpha, const clh_tensor *a, size_t lda, size_t stride_a,
                            const clh_tensor *b, size_t ldb, size_t stride_b, float beta,
                            clh_tensor *c, size_t ldc, size_t stride_c, size_t batch) {
    int skip;
    CLH_TRY(check_gemm(ctx, "clh_gemm_batched", trans_a, trans_b, m, n, k, a, lda, stride_a, b, ldb,
                       stride_b, c, ldc, stride_c, batch, &skip));
    if (skip)
        return CLH_OK;
    /* A single matrix takes the plain routine: it avoids compiling the batched
     * kernels (seconds on PoCL) for nothing. */
    if (batch == 1)
        return clh_gemm(ctx, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    clh_gemm_path path;
    CLH_TRY(clh_gemm_resolve_path(ctx, &path));
    if (path == CLH_GEMM_HOST)
        return clh_gemm_host(ctx, "clh_gemm_batched", trans_a, trans_b, m, n, k, alpha, a, lda,
                             stride_a, b, ldb, stride_b, beta, c, ldc, stride_c, batch);
    if (path == CLH_GEMM_OCL)
        return clh_gemm_ocl(ctx, "clh_gemm_batched", trans_a, trans_b, m, n, k, alpha, a, lda,
                            stride_a, b, ldb, stride_b, beta, c, ldc, stride_c, batch);
    cl_event ev = NULL;
    CLBlastStatusCode st = CLBlastSgemmStridedBatched(
        CLBlastLayoutRowMajor, transpose_of(trans_a), transpose_of(trans_b), m, n, k, alpha, a->mem,
        a->offset, lda, stride_a, b->mem, b->offset, ldb, stride_b, beta, c->mem, c->offset, ldc,
        stride_c, batch, clh_queue_ptr(ctx), &ev);
    if (st != CLBlastSuccess)
        return clblast_fail(ctx, st, "CLBlastSgemmStridedBatched", m, n, k, batch);
    clh_profile_event(ctx, "clblast_sgemm_strided_batched", ev);
    return CLH_OK;
}
