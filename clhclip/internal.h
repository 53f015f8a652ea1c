/* Internal declarations shared by the library's translation units. Not installed. */
#ifndef CLHCLIP_INTERNAL_H
#define CLHCLIP_INTERNAL_H

#ifndef CL_TARGET_OPENCL_VERSION
#define CL_TARGET_OPENCL_VERSION 120
#endif
#include <CL/cl.h>
#include <stdarg.h>

#include "clhclip.h"

/* ------------------------------------------------------------------ errors */

/* Record a formatted message (in ctx if non-NULL, and in the thread-local slot) and
 * return status. Use as: return clh_fail(ctx, CLH_ERR_SHAPE, "clh_linear: ...", ...); */
clh_status clh_fail(clh_ctx *ctx, clh_status status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* OpenCL failure: "<call>(<detail>) on '<device>': CL_XXX (-n)". Returns CLH_ERR_OPENCL,
 * or CLH_ERR_OUT_OF_MEMORY for allocation errors. */
clh_status clh_fail_cl(clh_ctx *ctx, cl_int err, const char *call, const char *detail_fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* Evaluate a clh_status expression; return it on failure. */
#define CLH_TRY(expr)                                                                              \
    do {                                                                                           \
        clh_status clh_try_status_ = (expr);                                                       \
        if (clh_try_status_ != CLH_OK)                                                             \
            return clh_try_status_;                                                                \
    } while (0)

/* ------------------------------------------------------------------ context */

typedef struct clh_program_entry clh_program_entry;
typedef struct clh_kernel_entry clh_kernel_entry;
typedef struct clh_profile_entry clh_profile_entry;

typedef struct clh_ws_chunk {
    cl_mem mem;
    size_t capacity; /* floats */
} clh_ws_chunk;

struct clh_ctx {
    clh_device_info info;
    cl_platform_id platform;
    cl_device_id device;
    cl_context context;
    cl_command_queue queue;
    char error[4096];

    clh_program_entry *programs; /* one per embedded .cl file, built lazily */
    int n_programs;
    clh_kernel_entry *kernels; /* kernel cache (name -> cl_kernel, work-group size) */
    int n_kernels, cap_kernels;
    double build_seconds;

    int profile;
    int sync; /* $CLHCLIP_SYNC: clFinish after every launch */
    clh_profile_entry *prof;
    int n_prof, cap_prof;

    /* workspace arena: chunks in use; allocation bumps within the last chunk */
    clh_ws_chunk *ws_chunks;
    int n_ws_chunks, cap_ws_chunks;
    size_t ws_used;       /* floats used over all chunks, as a stack position */
    size_t ws_chunk_used; /* floats used in the last chunk */

    size_t device_bytes, peak_device_bytes;
    /* The H-CLIP model whose pending training forward holds the top of the workspace
     * (NULL: none). Another model's training forward discards it first. */
    struct clh_hclip *ws_owner;
    cl_mem int_scratch; /* device int buffer for host index uploads */
    size_t int_scratch_count;
};

struct clh_tensor {
    clh_ctx *ctx;
    cl_mem mem;    /* retained by every tensor that references it */
    size_t offset; /* elements */
    int ndim;
    int64_t shape[CLH_MAX_DIMS];
    size_t numel;
    int refcount;
    size_t owned_bytes; /* bytes accounted to ctx->device_bytes when this tensor made mem */
};

/* Allocate a device buffer of `bytes` (checked against max_alloc, accounted). */
clh_status clh_buffer_new(clh_ctx *ctx, size_t bytes, cl_mem *out);

/* ------------------------------------------------------------------ kernels */

/* One kernel argument: value pointer and size; value == NULL means __local memory. */
typedef struct clh_karg {
    size_t size;
    const void *value;
} clh_karg;

#define CLH_KARG(x)                                                                                \
    { sizeof(x), &(x) }
#define CLH_KLOCAL(bytes)                                                                          \
    { (bytes), NULL }
/* A tensor is passed as two kernel arguments: its buffer and its element offset
 * (kernel side: `__global float *x, const int x_off`). */
#define CLH_KTENSOR(t)                                                                             \
    {sizeof(cl_mem), &(t)->mem}, {                                                                 \
        sizeof(int), clh_offset_ptr(t)                                                             \
    }
const int *clh_offset_ptr(const clh_tensor *t);

/* Launch `kernel` (found in the embedded programs, built lazily) over `global`
 * work-items in `dims` dimensions. local == NULL picks a work-group size from the
 * kernel's CL_KERNEL_WORK_GROUP_SIZE (1-D: up to 256; 2-D: 16x16 clamped), and the
 * global size is rounded up to a multiple of it: kernels must bounds-check.
 * A non-NULL local is clamped to the device/kernel limits the same way. */
clh_status clh_launch(clh_ctx *ctx, const char *kernel, int dims, const size_t *global,
                      const size_t *local, int nargs, const clh_karg *args);
/* Largest work-group size usable for `kernel` on this device (after clamping). */
clh_status clh_kernel_wg_size(clh_ctx *ctx, const char *kernel, size_t *out);

/* Record a finished-or-pending event under `name` when profiling is on (takes
 * ownership of the event: it is released). With profiling off it just releases it.
 * Used for work not launched through clh_launch (CLBlast calls). */
void clh_profile_event(clh_ctx *ctx, const char *name, cl_event event);
/* Pointer to the context's queue, for libraries that take cl_command_queue*. */
static inline cl_command_queue *clh_queue_ptr(clh_ctx *ctx) {
    return &ctx->queue;
}

/* Upload n host ints into the context's int scratch buffer (valid until the next call). */
clh_status clh_upload_ints(clh_ctx *ctx, const int32_t *values, size_t n, cl_mem *out);

/* Embedded kernel sources (generated at build time from kernels/\*.cl). */
typedef struct clh_kernel_source {
    const char *file;    /* "layers.cl" */
    const char *source;  /* full text */
    const char *kernels; /* space-separated kernel names defined in the file */
} clh_kernel_source;
extern const clh_kernel_source clh_kernel_sources[];
extern const int clh_kernel_source_count;

/* ------------------------------------------------------------------ helpers */

static inline size_t clh_shape_numel(int ndim, const int64_t *shape) {
    size_t n = 1;
    for (int i = 0; i < ndim; i++)
        n *= (size_t)shape[i];
    return n;
}

/* "[2, 3, 4]" into buf. */
void clh_shape_str(int ndim, const int64_t *shape, char *buf, size_t size);

/* Read a whole file into a malloc'd, NUL-terminated buffer. */
clh_status clh_read_file(const char *path, char **data, size_t *size);

#endif
