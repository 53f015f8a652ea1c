/* Device buffers, tensors (refcounted, views share a buffer), host transfers and
 * the workspace arena. */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define WS_ALIGN     16         /* floats: 64-byte aligned workspace views */
#define WS_MIN_CHUNK (1u << 20) /* floats: 4 MiB */

clh_status clh_buffer_new(clh_ctx *ctx, size_t bytes, cl_mem *out) {
    *out = NULL;
    if (bytes == 0)
        bytes = sizeof(float);
    if (ctx->info.max_alloc && bytes > ctx->info.max_alloc)
        return clh_fail(ctx, CLH_ERR_OUT_OF_MEMORY,
                        "allocation of %zu bytes exceeds the device's maximum allocation of %llu "
                        "bytes (CL_DEVICE_MAX_MEM_ALLOC_SIZE) on '%s'",
                        bytes, ctx->info.max_alloc, ctx->info.name);
    cl_int err;
    *out = clCreateBuffer(ctx->context, CL_MEM_READ_WRITE, bytes, NULL, &err);
    if (err != CL_SUCCESS) {
        *out = NULL;
        return clh_fail_cl(ctx, err, "clCreateBuffer", "%zu bytes; %zu bytes already in use", bytes,
                           ctx->device_bytes);
    }
    ctx->device_bytes += bytes;
    if (ctx->device_bytes > ctx->peak_device_bytes)
        ctx->peak_device_bytes = ctx->device_bytes;
    return CLH_OK;
}

static clh_status check_shape(clh_ctx *ctx, int ndim, const int64_t *shape, const char *fn) {
    if (ndim < 0 || ndim > CLH_MAX_DIMS || (ndim > 0 && !shape))
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT, "%s: %d dimensions (allowed 0..%d)", fn,
                        ndim, CLH_MAX_DIMS);
    size_t numel = 1;
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 0)
            return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT, "%s: negative size %lld in dim %d", fn,
                            (long long)shape[i], i);
        /* kernels index with int: every tensor stays below 2^31 elements */
        if (__builtin_mul_overflow(numel, (size_t)shape[i], &numel) || numel > (size_t)INT32_MAX) {
            char buf[160];
            clh_shape_str(ndim, shape, buf, sizeof buf);
            return clh_fail(ctx, CLH_ERR_OUT_OF_MEMORY,
                            "%s: shape %s has more than 2^31-1 elements", fn, buf);
        }
    }
    return CLH_OK;
}

static clh_tensor *tensor_struct(clh_ctx *ctx, cl_mem mem, size_t offset, int ndim,
                                 const int64_t *shape) {
    clh_tensor *t = calloc(1, sizeof *t);
    if (!t)
        return NULL;
    t->ctx = ctx;
    t->mem = mem;
    t->offset = offset;
    t->ndim = ndim;
    for (int i = 0; i < ndim; i++)
        t->shape[i] = shape[i];
    t->numel = clh_shape_numel(ndim, shape);
    t->refcount = 1;
    return t;
}

clh_status clh_tensor_new(clh_ctx *ctx, int ndim, const int64_t *shape, clh_tensor **out) {
    *out = NULL;
    if (!ctx)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "clh_tensor_new: NULL context");
    CLH_TRY(check_shape(ctx, ndim, shape, "clh_tensor_new"));
    size_t numel = clh_shape_numel(ndim, shape);
    size_t bytes = (numel ? numel : 1) * sizeof(float);
    cl_mem mem;
    CLH_TRY(clh_buffer_new(ctx, bytes, &mem));
    clh_tensor *t = tensor_struct(ctx, mem, 0, ndim, shape);
    if (!t) {
        clReleaseMemObject(mem);
        ctx->device_bytes -= bytes;
        return clh_fail(ctx, CLH_ERR_OUT_OF_MEMORY, "clh_tensor_new: out of host memory");
    }
    t->owned_bytes = bytes;
    clh_status st = clh_tensor_fill(t, 0.0f);
    if (st != CLH_OK) {
        clh_tensor_release(t);
        return st;
    }
    *out = t;
    return CLH_OK;
}

clh_status clh_tensor_from_host(clh_ctx *ctx, int ndim, const int64_t *shape, const float *data,
                                clh_tensor **out) {
    CLH_TRY(clh_tensor_new(ctx, ndim, shape, out));
    clh_status st = clh_tensor_upload(*out, data, (*out)->numel);
    if (st != CLH_OK) {
        clh_tensor_release(*out);
        *out = NULL;
    }
    return st;
}

clh_status clh_tensor_view(clh_tensor *base, size_t offset, int ndim, const int64_t *shape,
                           clh_tensor **out) {
    *out = NULL;
    if (!base)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "clh_tensor_view: NULL base tensor");
    clh_ctx *ctx = base->ctx;
    CLH_TRY(check_shape(ctx, ndim, shape, "clh_tensor_view"));
    size_t numel = clh_shape_numel(ndim, shape);
    if (offset > base->numel || numel > base->numel - offset) {
        char a[128], b[128];
        clh_shape_str(ndim, shape, a, sizeof a);
        clh_shape_str(base->ndim, base->shape, b, sizeof b);
        return clh_fail(ctx, CLH_ERR_SHAPE,
                        "clh_tensor_view: view %s at offset %zu does not fit in tensor %s", a,
                        offset, b);
    }
    clh_tensor *t = tensor_struct(ctx, base->mem, base->offset + offset, ndim, shape);
    if (!t)
        return clh_fail(ctx, CLH_ERR_OUT_OF_MEMORY, "clh_tensor_view: out of host memory");
    clRetainMemObject(base->mem);
    *out = t;
    return CLH_OK;
}

void clh_tensor_retain(clh_tensor *t) {
    if (t)
        t->refcount++;
}

void clh_tensor_release(clh_tensor *t) {
    if (!t || --t->refcount > 0)
        return;
    if (t->owned_bytes)
        t->ctx->device_bytes -= t->owned_bytes;
    clReleaseMemObject(t->mem);
    free(t);
}

int clh_tensor_ndim(const clh_tensor *t) {
    return t->ndim;
}

int64_t clh_tensor_dim(const clh_tensor *t, int i) {
    if (i < 0)
        i += t->ndim;
    return (i >= 0 && i < t->ndim) ? t->shape[i] : 0;
}

const int64_t *clh_tensor_shape(const clh_tensor *t) {
    return t->shape;
}

size_t clh_tensor_numel(const clh_tensor *t) {
    return t->numel;
}

size_t clh_tensor_offset(const clh_tensor *t) {
    return t->offset;
}

clh_ctx *clh_tensor_ctx(const clh_tensor *t) {
    return t->ctx;
}

const int *clh_offset_ptr(const clh_tensor *t) {
    /* Kernels take int offsets; tensors are limited to 2^31-1 elements per buffer. */
    static _Thread_local int slots[64];
    static _Thread_local unsigned next;
    int *slot = &slots[next++ % 64];
    *slot = (int)t->offset;
    return slot;
}

static clh_status check_count(const clh_tensor *t, size_t n, const char *fn) {
    if (n != t->numel) {
        char s[128];
        clh_shape_str(t->ndim, t->shape, s, sizeof s);
        return clh_fail(t->ctx, CLH_ERR_SHAPE, "%s: %zu values for a tensor of shape %s (%zu)", fn,
                        n, s, t->numel);
    }
    return CLH_OK;
}

clh_status clh_tensor_upload(clh_tensor *t, const float *src, size_t n) {
    CLH_TRY(check_count(t, n, "clh_tensor_upload"));
    if (n == 0)
        return CLH_OK;
    if (!src)
        return clh_fail(t->ctx, CLH_ERR_INVALID_ARGUMENT, "clh_tensor_upload: NULL source");
    cl_int err = clEnqueueWriteBuffer(t->ctx->queue, t->mem, CL_TRUE, t->offset * sizeof(float),
                                      n * sizeof(float), src, 0, NULL, NULL);
    return err == CL_SUCCESS ? CLH_OK
                             : clh_fail_cl(t->ctx, err, "clEnqueueWriteBuffer", "%zu floats", n);
}

clh_status clh_tensor_download(const clh_tensor *t, float *dst, size_t n) {
    CLH_TRY(check_count(t, n, "clh_tensor_download"));
    if (n == 0)
        return CLH_OK;
    if (!dst)
        return clh_fail(t->ctx, CLH_ERR_INVALID_ARGUMENT, "clh_tensor_download: NULL destination");
    cl_int err = clEnqueueReadBuffer(t->ctx->queue, t->mem, CL_TRUE, t->offset * sizeof(float),
                                     n * sizeof(float), dst, 0, NULL, NULL);
    return err == CL_SUCCESS ? CLH_OK
                             : clh_fail_cl(t->ctx, err, "clEnqueueReadBuffer", "%zu floats", n);
}

clh_status clh_tensor_copy(clh_tensor *dst, const clh_tensor *src) {
    CLH_TRY(check_count(dst, src->numel, "clh_tensor_copy"));
    if (src->numel == 0 || (dst->mem == src->mem && dst->offset == src->offset))
        return CLH_OK;
    cl_int err =
        clEnqueueCopyBuffer(dst->ctx->queue, src->mem, dst->mem, src->offset * sizeof(float),
                            dst->offset * sizeof(float), src->numel * sizeof(float), 0, NULL, NULL);
    return err == CL_SUCCESS
               ? CLH_OK
               : clh_fail_cl(dst->ctx, err, "clEnqueueCopyBuffer", "%zu floats", src->numel);
}

clh_status clh_tensor_fill(clh_tensor *t, float value) {
    if (t->numel == 0)
        return CLH_OK;
    cl_int err =
        clEnqueueFillBuffer(t->ctx->queue, t->mem, &value, sizeof value, t->offset * sizeof(float),
                            t->numel * sizeof(float), 0, NULL, NULL);
    return err == CL_SUCCESS
               ? CLH_OK
               : clh_fail_cl(t->ctx, err, "clEnqueueFillBuffer", "%zu floats", t->numel);
}

/* ------------------------------------------------------------------ workspace */

/* The arena is a stack over a list of chunks. A mark is the stack position in floats,
 * counting the full capacity of every chunk before the current one. */

static size_t ws_base_of(const clh_ctx *ctx, int chunk) {
    size_t base = 0;
    for (int i = 0; i < chunk; i++)
        base += ctx->ws_chunks[i].capacity;
    return base;
}

size_t clh_ws_mark(clh_ctx *ctx) {
    if (ctx->n_ws_chunks == 0)
        return 0;
    return ws_base_of(ctx, ctx->n_ws_chunks - 1) + ctx->ws_chunk_used;
}

static void ws_drop_chunk(clh_ctx *ctx, int i) {
    clReleaseMemObject(ctx->ws_chunks[i].mem);
    ctx->device_bytes -= ctx->ws_chunks[i].capacity * sizeof(float);
}

static clh_status ws_add_chunk(clh_ctx *ctx, size_t min_floats) {
    size_t max_floats = ctx->info.max_alloc ? ctx->info.max_alloc / sizeof(float) : SIZE_MAX;
    size_t last = ctx->n_ws_chunks ? ctx->ws_chunks[ctx->n_ws_chunks - 1].capacity : 0;
    size_t want = last * 2 > min_floats ? last * 2 : min_floats;
    if (want < WS_MIN_CHUNK)
        want = WS_MIN_CHUNK;
    if (want > max_floats)
        want = max_floats;
    if (want < min_floats)
        return clh_fail(ctx, CLH_ERR_OUT_OF_MEMORY,
                        "workspace: a temporary of %zu bytes exceeds the device's maximum "
                        "allocation of %llu bytes on '%s'",
                        min_floats * sizeof(float), ctx->info.max_alloc, ctx->info.name);
    if (ctx->n_ws_chunks == ctx->cap_ws_chunks) {
        int cap = ctx->cap_ws_chunks ? ctx->cap_ws_chunks * 2 : 8;
        clh_ws_chunk *c = realloc(ctx->ws_chunks, (size_t)cap * sizeof *c);
        if (!c)
            return clh_fail(ctx, CLH_ERR_OUT_OF_MEMORY, "workspace: out of host memory");
        ctx->ws_chunks = c;
        ctx->cap_ws_chunks = cap;
    }
    cl_mem mem;
    CLH_TRY(clh_buffer_new(ctx, want * sizeof(float), &mem));
    ctx->ws_chunks[ctx->n_ws_chunks++] = (clh_ws_chunk){mem, want};
    ctx->ws_chunk_used = 0;
    return CLH_OK;
}

clh_status clh_ws_tensor(clh_ctx *ctx, int ndim, const int64_t *shape, clh_tensor **out) {
    *out = NULL;
    CLH_TRY(check_shape(ctx, ndim, shape, "clh_ws_tensor"));
    size_t numel = clh_shape_numel(ndim, shape);
    size_t need = (numel + WS_ALIGN - 1) / WS_ALIGN * WS_ALIGN;
    if (need == 0)
        need = WS_ALIGN;
    if (ctx->n_ws_chunks == 0 ||
        ctx->ws_chunks[ctx->n_ws_chunks - 1].capacity - ctx->ws_chunk_used < need)
        CLH_TRY(ws_add_chunk(ctx, need));
    clh_ws_chunk *c = &ctx->ws_chunks[ctx->n_ws_chunks - 1];
    clh_tensor *t = tensor_struct(ctx, c->mem, ctx->ws_chunk_used, ndim, shape);
    if (!t)
        return clh_fail(ctx, CLH_ERR_OUT_OF_MEMORY, "clh_ws_tensor: out of host memory");
    clRetainMemObject(c->mem);
    ctx->ws_chunk_used += need;
    *out = t;
    return CLH_OK;
}

void clh_ws_reset(clh_ctx *ctx, size_t mark) {
    if (ctx->n_ws_chunks == 0)
        return;
    if (mark == 0 && ctx->n_ws_chunks > 1) {
        /* The last pass needed several chunks: replace them by one big enough for all,
         * so the next pass runs without allocating. */
        size_t total = ws_base_of(ctx, ctx->n_ws_chunks);
        for (int i = 0; i < ctx->n_ws_chunks; i++)
            ws_drop_chunk(ctx, i);
        ctx->n_ws_chunks = 0;
        if (ws_add_chunk(ctx, total) != CLH_OK)
            ctx->n_ws_chunks = 0; /* grow lazily again on the next request */
        ctx->ws_chunk_used = 0;
        return;
    }
    int k = 0;
    size_t base = 0;
    while (k < ctx->n_ws_chunks - 1 && mark >= base + ctx->ws_chunks[k].capacity) {
        base += ctx->ws_chunks[k].capacity;
        k++;
    }
    for (int i = k + 1; i < ctx->n_ws_chunks; i++)
        ws_drop_chunk(ctx, i);
    ctx->n_ws_chunks = k + 1;
    ctx->ws_chunk_used = mark - base;
}
