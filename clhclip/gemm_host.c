/* GEMM on the host BLAS (OpenBLAS) over mapped OpenCL buffers, and the choice between it,
 * CLBlast and clhclip's own kernels (gemm_ocl.c). On a CPU device whose buffers live in host
 * memory (PoCL) a blocking map returns a pointer into the buffer itself, so the host path
 * costs one queue drain plus the BLAS call, and OpenBLAS is 10-20x faster there than
 * CLBlast's OpenCL kernels (toolchain.md 3). */
#include "gemm_host.h"

#include <cblas.h>
#include <limits.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

static _Atomic int forced_path = CLH_GEMM_AUTO;

void clh_gemm_set_path(clh_gemm_path path) {
    atomic_store(&forced_path, (int)path);
}

int clh_gemm_host_capable(clh_ctx *ctx) {
    cl_device_type type = 0;
    cl_bool unified = CL_FALSE;
    if (clGetDeviceInfo(ctx->device, CL_DEVICE_TYPE, sizeof type, &type, NULL) != CL_SUCCESS)
        return 0;
    /* Deprecated in OpenCL 2.0 but still answered by 2.x/3.0 drivers (PoCL 3.1 does). */
    if (clGetDeviceInfo(ctx->device, CL_DEVICE_HOST_UNIFIED_MEMORY, sizeof unified, &unified,
                        NULL) != CL_SUCCESS)
        return 0;
    return (type & CL_DEVICE_TYPE_CPU) && unified == CL_TRUE;
}

/* $CLHCLIP_GEMM, read at every call so a process can switch paths between calls. */
static clh_status env_path(clh_ctx *ctx, clh_gemm_path *out) {
    const char *v = getenv("CLHCLIP_GEMM");
    if (!v || !*v || strcasecmp(v, "auto") == 0)
        *out = CLH_GEMM_AUTO;
    else if (strcasecmp(v, "clblast") == 0)
        *out = CLH_GEMM_CLBLAST;
    else if (strcasecmp(v, "host") == 0)
        *out = CLH_GEMM_HOST;
    else if (strcasecmp(v, "ocl") == 0)
        *out = CLH_GEMM_OCL;
    else
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT,
                        "CLHCLIP_GEMM='%s' is not one of clblast, host, ocl, auto", v);
    return CLH_OK;
}

/* auto: the host BLAS on PoCL-like devices, CLBlast elsewhere. The own kernels (ocl) reach
 * 85-100 % of the host BLAS at the encoders' single GEMMs and beat it at the 12-head batched
 * attention products when timed alone, but the ViT-B/16 384 forward with them was slower
 * than with the host BLAS (issue 5 report), so auto never picks them; GPUs keep CLBlast until
 * the own kernels are measured there. */
clh_status clh_gemm_resolve_path(clh_ctx *ctx, clh_gemm_path *out) {
    clh_gemm_path path = (clh_gemm_path)atomic_load(&forced_path);
    if (path == CLH_GEMM_AUTO)
        CLH_TRY(env_path(ctx, &path));
    if (path == CLH_GEMM_AUTO)
        path = clh_gemm_host_capable(ctx) ? CLH_GEMM_HOST : CLH_GEMM_CLBLAST;
    *out = path;
    return CLH_OK;
}

const char *clh_gemm_host_blas_name(void) {
    static char name[256];
    snprintf(name, sizeof name, "%s (core %s, %d threads)", openblas_get_config(),
             openblas_get_corename(), openblas_get_num_threads());
    return name;
}

/* ------------------------------------------------------------------ mapping */

/* One mapped buffer: the element range [lo, hi) of mem that A, B or C touch. */
typedef struct mapping {
    cl_mem mem;
    size_t lo, hi;
    int write;
    float *base; /* host pointer of element lo */
} mapping;

/* Element range of `batch` matrices of rows x cols (ld, stride) starting at t's offset. */
static void add_range(mapping *maps, int *n, const clh_tensor *t, size_t rows, size_t cols,
                      size_t ld, size_t stride, size_t batch, int write) {
    size_t lo = t->offset, hi = lo + (batch - 1) * stride + (rows - 1) * ld + cols;
    /* Map each buffer once over the union of its ranges: overlapping maps of one buffer
     * for writing are an error in OpenCL (A, B and C are often views of one workspace). */
    for (int i = 0; i < *n; i++)
        if (maps[i].mem == t->mem) {
            maps[i].lo = lo < maps[i].lo ? lo : maps[i].lo;
            maps[i].hi = hi > maps[i].hi ? hi : maps[i].hi;
            maps[i].write |= write;
            return;
        }
    maps[(*n)++] = (mapping){t->mem, lo, hi, write, NULL};
}

static clh_status unmap_all(clh_ctx *ctx, const char *fn, mapping *maps, int n) {
    clh_status st = CLH_OK;
    for (int i = 0; i < n; i++) {
        if (!maps[i].base)
            continue;
        cl_int err = clEnqueueUnmapMemObject(ctx->queue, maps[i].mem, maps[i].base, 0, NULL, NULL);
        if (err != CL_SUCCESS && st == CLH_OK)
            st = clh_fail_cl(ctx, err, "clEnqueueUnmapMemObject",
                             "%s host GEMM, elements [%zu, %zu)", fn, maps[i].lo, maps[i].hi);
        maps[i].base = NULL;
    }
    return st;
}

static clh_status map_all(clh_ctx *ctx, const char *fn, mapping *maps, int n) {
    for (int i = 0; i < n; i++) {
        cl_map_flags flags = maps[i].write ? CL_MAP_READ | CL_MAP_WRITE : CL_MAP_READ;
        cl_int err = CL_SUCCESS;
        /* Blocking: on the in-order queue this also waits for the kernels before it. */
        void *p =
            clEnqueueMapBuffer(ctx->queue, maps[i].mem, CL_TRUE, flags, maps[i].lo * sizeof(float),
                               (maps[i].hi - maps[i].lo) * sizeof(float), 0, NULL, NULL, &err);
        if (err != CL_SUCCESS || !p) {
            clh_status st =
                clh_fail_cl(ctx, err != CL_SUCCESS ? err : CL_MAP_FAILURE, "clEnqueueMapBuffer",
                            "%s host GEMM, elements [%zu, %zu) %s", fn, maps[i].lo, maps[i].hi,
                            maps[i].write ? "read+write" : "read");
            unmap_all(ctx, fn, maps, i);
            return st;
        }
        maps[i].base = p;
    }
    return CLH_OK;
}

/* Host pointer of tensor t's first element inside its mapping. */
static float *host_ptr(const mapping *maps, int n, const clh_tensor *t) {
    for (int i = 0; i < n; i++)
        if (maps[i].mem == t->mem)
            return maps[i].base + (t->offset - maps[i].lo);
    return NULL;
}

/* ------------------------------------------------------------------ GEMM */

static int fits_int(size_t v) {
    return v <= (size_t)INT_MAX;
}

clh_status clh_gemm_host(clh_ctx *ctx, const char *fn, int trans_a, int trans_b, size_t m, size_t n,
                         size_t k, float alpha, const clh_tensor *a, size_t lda, size_t stride_a,
                         const clh_tensor *b, size_t ldb, size_t stride_b, float beta,
                         clh_tensor *c, size_t ldc, size_t stride_c, size_t batch) {
    if (!fits_int(m) || !fits_int(n) || !fits_int(k) || !fits_int(lda) || !fits_int(ldb) ||
        !fits_int(ldc))
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT,
                        "%s: host BLAS takes int sizes; m=%zu n=%zu k=%zu lda=%zu ldb=%zu "
                        "ldc=%zu is too large (set CLHCLIP_GEMM=clblast)",
                        fn, m, n, k, lda, ldb, ldc);
    mapping maps[3];
    int nmaps = 0;
    add_range(maps, &nmaps, a, trans_a ? k : m, trans_a ? m : k, lda, stride_a, batch, 0);
    add_range(maps, &nmaps, b, trans_b ? n : k, trans_b ? k : n, ldb, stride_b, batch, 0);
    add_range(maps, &nmaps, c, m, n, ldc, stride_c, batch, 1);
    CLH_TRY(map_all(ctx, fn, maps, nmaps));
    const float *pa = host_ptr(maps, nmaps, a), *pb = host_ptr(maps, nmaps, b);
    float *pc = host_ptr(maps, nmaps, c);
    enum CBLAS_TRANSPOSE ta = trans_a ? CblasTrans : CblasNoTrans;
    enum CBLAS_TRANSPOSE tb = trans_b ? CblasTrans : CblasNoTrans;
    for (size_t i = 0; i < batch; i++)
        cblas_sgemm(CblasRowMajor, ta, tb, (int)m, (int)n, (int)k, alpha, pa + i * stride_a,
                    (int)lda, pb + i * stride_b, (int)ldb, beta, pc + i * stride_c, (int)ldc);
    return unmap_all(ctx, fn, maps, nmaps);
}
