/* Status names, OpenCL error names, last-error messages and small host helpers. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

static _Thread_local char thread_error[4096];

const char *clh_last_error(void) {
    return thread_error;
}

const char *clh_status_name(clh_status status) {
    switch (status) {
        case CLH_OK:
            return "CLH_OK";
        case CLH_ERR_OPENCL:
            return "CLH_ERR_OPENCL";
        case CLH_ERR_CLBLAST:
            return "CLH_ERR_CLBLAST";
        case CLH_ERR_NO_DEVICE:
            return "CLH_ERR_NO_DEVICE";
        case CLH_ERR_BUILD:
            return "CLH_ERR_BUILD";
        case CLH_ERR_OUT_OF_MEMORY:
            return "CLH_ERR_OUT_OF_MEMORY";
        case CLH_ERR_INVALID_ARGUMENT:
            return "CLH_ERR_INVALID_ARGUMENT";
        case CLH_ERR_SHAPE:
            return "CLH_ERR_SHAPE";
        case CLH_ERR_IO:
            return "CLH_ERR_IO";
        case CLH_ERR_FORMAT:
            return "CLH_ERR_FORMAT";
        case CLH_ERR_NOT_FOUND:
            return "CLH_ERR_NOT_FOUND";
        case CLH_ERR_TOO_LONG:
            return "CLH_ERR_TOO_LONG";
        case CLH_ERR_UNSUPPORTED:
            return "CLH_ERR_UNSUPPORTED";
    }
    return "CLH_ERR_UNKNOWN";
}

const char *clh_cl_error_name(int err) {
#define CASE(x)                                                                                    \
    case x:                                                                                        \
        return #x
    switch (err) {
        CASE(CL_SUCCESS);
        CASE(CL_DEVICE_NOT_FOUND);
        CASE(CL_DEVICE_NOT_AVAILABLE);
        CASE(CL_COMPILER_NOT_AVAILABLE);
        CASE(CL_MEM_OBJECT_ALLOCATION_FAILURE);
        CASE(CL_OUT_OF_RESOURCES);
        CASE(CL_OUT_OF_HOST_MEMORY);
        CASE(CL_PROFILING_INFO_NOT_AVAILABLE);
        CASE(CL_MEM_COPY_OVERLAP);
        CASE(CL_IMAGE_FORMAT_MISMATCH);
        CASE(CL_IMAGE_FORMAT_NOT_SUPPORTED);
        CASE(CL_BUILD_PROGRAM_FAILURE);
        CASE(CL_MAP_FAILURE);
        CASE(CL_MISALIGNED_SUB_BUFFER_OFFSET);
        CASE(CL_EXEC_STATUS_ERROR_FOR_EVENTS_IN_WAIT_LIST);
        CASE(CL_COMPILE_PROGRAM_FAILURE);
        CASE(CL_LINKER_NOT_AVAILABLE);
        CASE(CL_LINK_PROGRAM_FAILURE);
        CASE(CL_DEVICE_PARTITION_FAILED);
        CASE(CL_KERNEL_ARG_INFO_NOT_AVAILABLE);
        CASE(CL_INVALID_VALUE);
        CASE(CL_INVALID_DEVICE_TYPE);
        CASE(CL_INVALID_PLATFORM);
        CASE(CL_INVALID_DEVICE);
        CASE(CL_INVALID_CONTEXT);
        CASE(CL_INVALID_QUEUE_PROPERTIES);
        CASE(CL_INVALID_COMMAND_QUEUE);
        CASE(CL_INVALID_HOST_PTR);
        CASE(CL_INVALID_MEM_OBJECT);
        CASE(CL_INVALID_IMAGE_FORMAT_DESCRIPTOR);
        CASE(CL_INVALID_IMAGE_SIZE);
        CASE(CL_INVALID_SAMPLER);
        CASE(CL_INVALID_BINARY);
        CASE(CL_INVALID_BUILD_OPTIONS);
        CASE(CL_INVALID_PROGRAM);
        CASE(CL_INVALID_PROGRAM_EXECUTABLE);
        CASE(CL_INVALID_KERNEL_NAME);
        CASE(CL_INVALID_KERNEL_DEFINITION);
        CASE(CL_INVALID_KERNEL);
        CASE(CL_INVALID_ARG_INDEX);
        CASE(CL_INVALID_ARG_VALUE);
        CASE(CL_INVALID_ARG_SIZE);
        CASE(CL_INVALID_KERNEL_ARGS);
        CASE(CL_INVALID_WORK_DIMENSION);
        CASE(CL_INVALID_WORK_GROUP_SIZE);
        CASE(CL_INVALID_WORK_ITEM_SIZE);
        CASE(CL_INVALID_GLOBAL_OFFSET);
        CASE(CL_INVALID_EVENT_WAIT_LIST);
        CASE(CL_INVALID_EVENT);
        CASE(CL_INVALID_OPERATION);
        CASE(CL_INVALID_GL_OBJECT);
        CASE(CL_INVALID_BUFFER_SIZE);
        CASE(CL_INVALID_MIP_LEVEL);
        CASE(CL_INVALID_GLOBAL_WORK_SIZE);
        CASE(CL_INVALID_PROPERTY);
        CASE(CL_INVALID_IMAGE_DESCRIPTOR);
        CASE(CL_INVALID_COMPILER_OPTIONS);
        CASE(CL_INVALID_LINKER_OPTIONS);
        CASE(CL_INVALID_DEVICE_PARTITION_COUNT);
        case -1001:
            return "CL_PLATFORM_NOT_FOUND_KHR";
    }
#undef CASE
    return "CL_UNKNOWN_ERROR";
}

static void store_message(clh_ctx *ctx, const char *msg) {
    snprintf(thread_error, sizeof thread_error, "%s", msg);
    if (ctx)
        snprintf(ctx->error, sizeof ctx->error, "%s", msg);
}

clh_status clh_fail(clh_ctx *ctx, clh_status status, const char *fmt, ...) {
    char msg[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    store_message(ctx, msg);
    return status;
}

clh_status clh_fail_cl(clh_ctx *ctx, cl_int err, const char *call, const char *detail_fmt, ...) {
    char detail[2048] = "";
    char msg[4096];
    if (detail_fmt) {
        va_list ap;
        va_start(ap, detail_fmt);
        vsnprintf(detail, sizeof detail, detail_fmt, ap);
        va_end(ap);
    }
    const char *device = ctx ? ctx->info.name : "?";
    snprintf(msg, sizeof msg, "%s(%s) on '%s': %s (%d)", call, detail, device,
             clh_cl_error_name(err), (int)err);
    store_message(ctx, msg);
    if (err == CL_MEM_OBJECT_ALLOCATION_FAILURE || err == CL_OUT_OF_RESOURCES ||
        err == CL_OUT_OF_HOST_MEMORY || err == CL_INVALID_BUFFER_SIZE)
        return CLH_ERR_OUT_OF_MEMORY;
    return CLH_ERR_OPENCL;
}

void clh_shape_str(int ndim, const int64_t *shape, char *buf, size_t size) {
    size_t used = 0;
    used += (size_t)snprintf(buf, size, "[");
    for (int i = 0; i < ndim && used < size; i++)
        used +=
            (size_t)snprintf(buf + used, size - used, i ? ", %lld" : "%lld", (long long)shape[i]);
    if (used < size)
        snprintf(buf + used, size - used, "]");
}

clh_status clh_read_file(const char *path, char **data, size_t *size) {
    *data = NULL;
    if (size)
        *size = 0;
    FILE *f = fopen(path, "rb");
    if (!f)
        return clh_fail(NULL, CLH_ERR_IO, "cannot open '%s': %s", path, strerror(errno));
    size_t cap = 1 << 16, len = 0;
    char *buf = malloc(cap + 1);
    while (buf) {
        size_t got = fread(buf + len, 1, cap - len, f);
        len += got;
        if (len < cap)
            break;
        cap *= 2;
        char *bigger = realloc(buf, cap + 1);
        if (!bigger) {
            free(buf);
            buf = NULL;
        } else {
            buf = bigger;
        }
    }
    int read_error = ferror(f);
    fclose(f);
    if (!buf)
        return clh_fail(NULL, CLH_ERR_OUT_OF_MEMORY, "out of host memory reading '%s'", path);
    if (read_error) {
        free(buf);
        return clh_fail(NULL, CLH_ERR_IO, "read error on '%s'", path);
    }
    buf[len] = '\0';
    *data = buf;
    if (size)
        *size = len;
    return CLH_OK;
}
