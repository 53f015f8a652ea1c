/* Device discovery and selection, contexts, lazy program builds, kernel launches,
 * profiling. */
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

#define MAX_PLATFORMS 16
#define MAX_DEVICES   64

struct clh_program_entry {
    cl_program program;
    int built;
};

struct clh_kernel_entry {
    char name[64];
    cl_kernel kernel;
    size_t wg_size; /* usable work-group size for this kernel on this device */
};

struct clh_profile_entry {
    char name[64];
    long calls;
    double total_ms;
};

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ------------------------------------------------------------------ PoCL cache */

/* PoCL reports "no device" without a word when its cache directory cannot be
 * created (toolchain.md 9.1). If the user set nothing and the default location is not
 * writable, point PoCL at a per-user directory under the temporary directory. */
static void ensure_pocl_cache_dir(void) {
    if (getenv("POCL_CACHE_DIR"))
        return;
    char base[1024];
    const char *xdg = getenv("XDG_CACHE_HOME");
    const char *home = getenv("HOME");
    if (xdg && *xdg)
        snprintf(base, sizeof base, "%s", xdg);
    else if (home && *home)
        snprintf(base, sizeof base, "%s/.cache", home);
    else
        base[0] = '\0';
    if (base[0]) {
        mkdir(base, 0700);
        if (access(base, W_OK) == 0)
            return;
    }
    const char *tmp = getenv("TMPDIR");
    char dir[1100];
    snprintf(dir, sizeof dir, "%s/clhclip-pocl-cache-%u", tmp && *tmp ? tmp : "/tmp",
             (unsigned)getuid());
    mkdir(dir, 0700);
    setenv("POCL_CACHE_DIR", dir, 0);
}

/* ------------------------------------------------------------------ device info */

/* Device/platform strings, truncated to the buffer when longer. */
static void get_device_string(cl_device_id dev, cl_device_info what, char *out, size_t size) {
    size_t len = 0;
    out[0] = '\0';
    char *tmp = NULL;
    if (clGetDeviceInfo(dev, what, 0, NULL, &len) == CL_SUCCESS && (tmp = calloc(len + 1, 1)) &&
        clGetDeviceInfo(dev, what, len, tmp, NULL) == CL_SUCCESS)
        snprintf(out, size, "%s", tmp);
    else
        snprintf(out, size, "?");
    free(tmp);
}

static void get_platform_string(cl_platform_id p, cl_platform_info what, char *out, size_t size) {
    size_t len = 0;
    out[0] = '\0';
    char *tmp = NULL;
    if (clGetPlatformInfo(p, what, 0, NULL, &len) == CL_SUCCESS && (tmp = calloc(len + 1, 1)) &&
        clGetPlatformInfo(p, what, len, tmp, NULL) == CL_SUCCESS)
        snprintf(out, size, "%s", tmp);
    else
        snprintf(out, size, "?");
    free(tmp);
}

static int has_extension(cl_device_id dev, const char *ext) {
    size_t len = 0;
    if (clGetDeviceInfo(dev, CL_DEVICE_EXTENSIONS, 0, NULL, &len) != CL_SUCCESS || len == 0)
        return 0;
    char *buf = malloc(len + 1);
    if (!buf)
        return 0;
    int found = 0;
    if (clGetDeviceInfo(dev, CL_DEVICE_EXTENSIONS, len, buf, NULL) == CL_SUCCESS) {
        buf[len] = '\0';
        size_t n = strlen(ext);
        for (char *p = strstr(buf, ext); p && !found; p = strstr(p + 1, ext))
            found = (p == buf || p[-1] == ' ') && (p[n] == ' ' || p[n] == '\0');
    }
    free(buf);
    return found;
}

static void fill_device_info(cl_platform_id plat, cl_device_id dev, int pi, int di,
                             clh_device_info *info) {
    memset(info, 0, sizeof *info);
    info->platform_index = pi;
    info->device_index = di;
    get_platform_string(plat, CL_PLATFORM_NAME, info->platform_name, sizeof info->platform_name);
    get_platform_string(plat, CL_PLATFORM_VENDOR, info->platform_vendor,
                        sizeof info->platform_vendor);
    get_platform_string(plat, CL_PLATFORM_VERSION, info->platform_version,
                        sizeof info->platform_version);
    get_device_string(dev, CL_DEVICE_NAME, info->name, sizeof info->name);
    get_device_string(dev, CL_DEVICE_VENDOR, info->vendor, sizeof info->vendor);
    get_device_string(dev, CL_DEVICE_VERSION, info->version, sizeof info->version);
    get_device_string(dev, CL_DEVICE_OPENCL_C_VERSION, info->c_version, sizeof info->c_version);
    get_device_string(dev, CL_DRIVER_VERSION, info->driver, sizeof info->driver);
    cl_device_type type = 0;
    clGetDeviceInfo(dev, CL_DEVICE_TYPE, sizeof type, &type, NULL);
    info->is_gpu = (type & CL_DEVICE_TYPE_GPU) != 0;
    info->is_cpu = (type & CL_DEVICE_TYPE_CPU) != 0;
    snprintf(info->type, sizeof info->type, "%s",
             info->is_gpu                          ? "GPU"
             : info->is_cpu                        ? "CPU"
             : (type & CL_DEVICE_TYPE_ACCELERATOR) ? "ACCELERATOR"
                                                   : "OTHER");
    cl_uint u = 0;
    cl_ulong ul = 0;
    clGetDeviceInfo(dev, CL_DEVICE_MAX_COMPUTE_UNITS, sizeof u, &u, NULL);
    info->compute_units = u;
    u = 0;
    clGetDeviceInfo(dev, CL_DEVICE_MAX_CLOCK_FREQUENCY, sizeof u, &u, NULL);
    info->clock_mhz = u;
    clGetDeviceInfo(dev, CL_DEVICE_GLOBAL_MEM_SIZE, sizeof ul, &ul, NULL);
    info->global_mem = ul;
    ul = 0;
    clGetDeviceInfo(dev, CL_DEVICE_MAX_MEM_ALLOC_SIZE, sizeof ul, &ul, NULL);
    info->max_alloc = ul;
    ul = 0;
    clGetDeviceInfo(dev, CL_DEVICE_LOCAL_MEM_SIZE, sizeof ul, &ul, NULL);
    info->local_mem = ul;
    clGetDeviceInfo(dev, CL_DEVICE_MAX_WORK_GROUP_SIZE, sizeof info->max_work_group_size,
                    &info->max_work_group_size, NULL);
    clGetDeviceInfo(dev, CL_DEVICE_MAX_WORK_ITEM_SIZES, sizeof info->max_work_item_sizes,
                    info->max_work_item_sizes, NULL);
    info->has_fp16 = has_extension(dev, "cl_khr_fp16");
    info->has_fp64 = has_extension(dev, "cl_khr_fp64");
    info->has_subgroups =
        has_extension(dev, "cl_khr_subgroups") || has_extension(dev, "cl_intel_subgroups");
}

static const char *NO_DEVICE_HINT =
    "Hint: install an OpenCL driver (ICD), e.g. `apt-get install pocl-opencl-icd` for CPUs, "
    "and check /etc/OpenCL/vendors/*.icd (or OCL_ICD_VENDORS); PoCL also needs a writable "
    "cache directory (POCL_CACHE_DIR, default ~/.cache/pocl).";

typedef struct device_entry {
    cl_platform_id platform;
    cl_device_id device;
    clh_device_info info;
} device_entry;

static clh_status enumerate(device_entry *out, int max, int *count) {
    ensure_pocl_cache_dir();
    cl_platform_id plats[MAX_PLATFORMS];
    cl_uint np = 0;
    *count = 0;
    cl_int err = clGetPlatformIDs(MAX_PLATFORMS, plats, &np);
    if (err != CL_SUCCESS || np == 0)
        return clh_fail(NULL, CLH_ERR_NO_DEVICE,
                        "no OpenCL platform found (clGetPlatformIDs: %s (%d)). %s",
                        clh_cl_error_name(err), (int)err, NO_DEVICE_HINT);
    for (cl_uint p = 0; p < np; p++) {
        cl_device_id devs[MAX_DEVICES];
        cl_uint nd = 0;
        if (clGetDeviceIDs(plats[p], CL_DEVICE_TYPE_ALL, MAX_DEVICES, devs, &nd) != CL_SUCCESS)
            continue;
        for (cl_uint d = 0; d < nd && *count < max; d++) {
            out[*count].platform = plats[p];
            out[*count].device = devs[d];
            fill_device_info(plats[p], devs[d], (int)p, (int)d, &out[*count].info);
            (*count)++;
        }
    }
    if (*count == 0)
        return clh_fail(NULL, CLH_ERR_NO_DEVICE,
                        "no OpenCL device found on %u platform(s) (clGetDeviceIDs returned none). "
                        "%s",
                        (unsigned)np, NO_DEVICE_HINT);
    return CLH_OK;
}

clh_status clh_list_devices(clh_device_info **out, int *count) {
    *out = NULL;
    *count = 0;
    device_entry *all = calloc(MAX_DEVICES, sizeof *all);
    if (!all)
        return clh_fail(NULL, CLH_ERR_OUT_OF_MEMORY, "clh_list_devices: out of host memory");
    int n = 0;
    clh_status st = enumerate(all, MAX_DEVICES, &n);
    if (st == CLH_OK) {
        *out = calloc((size_t)n, sizeof **out);
        if (!*out) {
            st = clh_fail(NULL, CLH_ERR_OUT_OF_MEMORY, "clh_list_devices: out of host memory");
        } else {
            for (int i = 0; i < n; i++)
                (*out)[i] = all[i].info;
            *count = n;
        }
    }
    free(all);
    return st;
}

static void format_bytes(unsigned long long b, char *buf, size_t size) {
    if (b >= (1ULL << 30))
        snprintf(buf, size, "%.2f GiB", (double)b / (double)(1ULL << 30));
    else if (b >= (1ULL << 20))
        snprintf(buf, size, "%.1f MiB", (double)b / (double)(1ULL << 20));
    else
        snprintf(buf, size, "%.1f KiB", (double)b / 1024.0);
}

void clh_device_info_format(const clh_device_info *d, char *buf, size_t size) {
    char gm[32], ma[32], lm[32];
    format_bytes(d->global_mem, gm, sizeof gm);
    format_bytes(d->max_alloc, ma, sizeof ma);
    format_bytes(d->local_mem, lm, sizeof lm);
    snprintf(buf, size,
             "platform %d: %s (%s, %s)\n"
             "device %d.%d: %s\n"
             "  vendor            %s\n"
             "  type              %s\n"
             "  OpenCL            %s\n"
             "  OpenCL C          %s\n"
             "  driver            %s\n"
             "  compute units     %u @ %u MHz\n"
             "  global memory     %s\n"
             "  max allocation    %s\n"
             "  local memory      %s\n"
             "  work-group max    %zu (items %zu x %zu x %zu)\n"
             "  fp16 %s, fp64 %s, subgroups %s\n",
             d->platform_index, d->platform_name, d->platform_vendor, d->platform_version,
             d->platform_index, d->device_index, d->name, d->vendor, d->type, d->version,
             d->c_version, d->driver, d->compute_units, d->clock_mhz, gm, ma, lm,
             d->max_work_group_size, d->max_work_item_sizes[0], d->max_work_item_sizes[1],
             d->max_work_item_sizes[2], d->has_fp16 ? "yes" : "no", d->has_fp64 ? "yes" : "no",
             d->has_subgroups ? "yes" : "no");
}

/* ------------------------------------------------------------------ selection */

static int parse_index(const char *s, int *out) {
    if (!s || !*s)
        return 0;
    char *end = NULL;
    long v = strtol(s, &end, 10);
    if (*end != '\0' || v < 0)
        return 0;
    *out = (int)v;
    return 1;
}

static int contains_nocase(const char *hay, const char *needle) {
    size_t n = strlen(needle);
    for (; *hay; hay++) {
        size_t i = 0;
        while (i < n && hay[i] &&
               tolower((unsigned char)hay[i]) == tolower((unsigned char)needle[i]))
            i++;
        if (i == n)
            return 1;
    }
    return n == 0;
}

static int platform_matches(const clh_device_info *info, const char *sel) {
    int idx;
    if (!sel || !*sel)
        return 1;
    if (parse_index(sel, &idx))
        return info->platform_index == idx;
    return contains_nocase(info->platform_name, sel) || contains_nocase(info->platform_vendor, sel);
}

/* Index among the candidates of the selected platform(s), or name substring;
 * default: first GPU, else the first device. Returns -1 when nothing matches. */
static int select_device(const device_entry *all, int n, const char *plat_sel,
                         const char *dev_sel) {
    int idx = -1, want = -1, seen = 0;
    int by_index = parse_index(dev_sel, &want);
    for (int i = 0; i < n; i++) {
        if (!platform_matches(&all[i].info, plat_sel))
            continue;
        if (by_index) {
            if (seen++ == want)
                return i;
        } else if (dev_sel && *dev_sel) {
            if (contains_nocase(all[i].info.name, dev_sel))
                return i;
        } else if (all[i].info.is_gpu) {
            return i;
        } else if (idx < 0) {
            idx = i;
        }
    }
    return (by_index || (dev_sel && *dev_sel)) ? -1 : idx;
}

static clh_status create_queue(clh_ctx *ctx) {
    cl_int err;
    cl_command_queue_properties props = ctx->profile ? CL_QUEUE_PROFILING_ENABLE : 0;
    /* clCreateCommandQueue is deprecated in 2.0 headers but is the 1.2 entry point. */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
    ctx->queue = clCreateCommandQueue(ctx->context, ctx->device, props, &err);
#pragma GCC diagnostic pop
    if (err != CL_SUCCESS)
        return clh_fail_cl(ctx, err, "clCreateCommandQueue", "profiling=%d", ctx->profile);
    return CLH_OK;
}

static int env_flag(const char *name) {
    const char *v = getenv(name);
    return v && *v && strcmp(v, "0") != 0;
}

clh_status clh_ctx_create(const clh_ctx_options *options, clh_ctx **out) {
    *out = NULL;
    const char *plat_sel =
        options && options->platform ? options->platform : getenv("CLHCLIP_PLATFORM");
    const char *dev_sel = options && options->device ? options->device : getenv("CLHCLIP_DEVICE");
    int profile = options && options->profile >= 0 ? options->profile : env_flag("CLHCLIP_PROFILE");
    device_entry *all = calloc(MAX_DEVICES, sizeof *all);
    if (!all)
        return clh_fail(NULL, CLH_ERR_OUT_OF_MEMORY, "clh_ctx_create: out of host memory");
    int n = 0;
    clh_status st = enumerate(all, MAX_DEVICES, &n);
    if (st != CLH_OK) {
        free(all);
        return st;
    }
    int pick = select_device(all, n, plat_sel, dev_sel);
    if (pick < 0) {
        st = clh_fail(NULL, CLH_ERR_NO_DEVICE,
                      "no OpenCL device matches platform '%s' / device '%s' (%d device(s) "
                      "present; run scripts/info.lua to list them)",
                      plat_sel ? plat_sel : "", dev_sel ? dev_sel : "", n);
        free(all);
        return st;
    }
    clh_ctx *ctx = calloc(1, sizeof *ctx);
    if (!ctx) {
        free(all);
        return clh_fail(NULL, CLH_ERR_OUT_OF_MEMORY, "clh_ctx_create: out of host memory");
    }
    ctx->info = all[pick].info;
    ctx->platform = all[pick].platform;
    ctx->device = all[pick].device;
    ctx->profile = profile;
    ctx->sync = env_flag("CLHCLIP_SYNC");
    free(all);
    cl_int err;
    ctx->context = clCreateContext(NULL, 1, &ctx->device, NULL, NULL, &err);
    if (err != CL_SUCCESS) {
        st = clh_fail_cl(ctx, err, "clCreateContext", NULL);
        clh_ctx_destroy(ctx);
        return st;
    }
    st = create_queue(ctx);
    if (st == CLH_OK) {
        ctx->n_programs = clh_kernel_source_count;
        ctx->programs = calloc((size_t)clh_kernel_source_count + 1, sizeof *ctx->programs);
        if (!ctx->programs)
            st = clh_fail(ctx, CLH_ERR_OUT_OF_MEMORY, "clh_ctx_create: out of host memory");
    }
    if (st != CLH_OK) {
        clh_ctx_destroy(ctx);
        return st;
    }
    *out = ctx;
    return CLH_OK;
}

void clh_ctx_destroy(clh_ctx *ctx) {
    if (!ctx)
        return;
    if (ctx->queue)
        clFinish(ctx->queue);
    for (int i = 0; i < ctx->n_kernels; i++)
        clReleaseKernel(ctx->kernels[i].kernel);
    for (int i = 0; i < ctx->n_programs; i++)
        if (ctx->programs[i].program)
            clReleaseProgram(ctx->programs[i].program);
    for (int i = 0; i < ctx->n_ws_chunks; i++)
        clReleaseMemObject(ctx->ws_chunks[i].mem);
    if (ctx->int_scratch)
        clReleaseMemObject(ctx->int_scratch);
    if (ctx->queue)
        clReleaseCommandQueue(ctx->queue);
    if (ctx->context)
        clReleaseContext(ctx->context);
    free(ctx->kernels);
    free(ctx->programs);
    free(ctx->prof);
    free(ctx->ws_chunks);
    free(ctx);
}

const clh_device_info *clh_ctx_device(const clh_ctx *ctx) {
    return &ctx->info;
}

const char *clh_ctx_error(const clh_ctx *ctx) {
    return ctx ? ctx->error : clh_last_error();
}

clh_status clh_ctx_finish(clh_ctx *ctx) {
    cl_int err = clFinish(ctx->queue);
    return err == CL_SUCCESS ? CLH_OK : clh_fail_cl(ctx, err, "clFinish", NULL);
}

double clh_ctx_build_seconds(const clh_ctx *ctx) {
    return ctx->build_seconds;
}

size_t clh_ctx_device_bytes(const clh_ctx *ctx) {
    return ctx->device_bytes;
}

size_t clh_ctx_peak_device_bytes(const clh_ctx *ctx) {
    return ctx->peak_device_bytes;
}

/* ------------------------------------------------------------------ programs */

/* Source of program i: embedded, or $CLHCLIP_KERNEL_DIR/<file> for kernel development. */
static clh_status program_source(clh_ctx *ctx, int i, char **owned, const char **src) {
    *owned = NULL;
    *src = clh_kernel_sources[i].source;
    const char *dir = getenv("CLHCLIP_KERNEL_DIR");
    if (!dir || !*dir)
        return CLH_OK;
    char path[2048];
    snprintf(path, sizeof path, "%s/%s", dir, clh_kernel_sources[i].file);
    clh_status st = clh_read_file(path, owned, NULL);
    if (st != CLH_OK)
        return clh_fail(ctx, st, "CLHCLIP_KERNEL_DIR is set but %s", clh_last_error());
    *src = *owned;
    return CLH_OK;
}

static clh_status build_program(clh_ctx *ctx, int i) {
    clh_program_entry *pe = &ctx->programs[i];
    if (pe->built)
        return CLH_OK;
    char *owned = NULL;
    const char *src = NULL;
    CLH_TRY(program_source(ctx, i, &owned, &src));
    const char *file = clh_kernel_sources[i].file;
    cl_int err;
    pe->program = clCreateProgramWithSource(ctx->context, 1, &src, NULL, &err);
    free(owned);
    if (err != CL_SUCCESS)
        return clh_fail_cl(ctx, err, "clCreateProgramWithSource", "%s", file);
    char options[1024];
    const char *extra = getenv("CLHCLIP_CL_BUILD_OPTIONS");
    /* -cl-std=CL1.2 fails to build on OpenCL C 1.1 devices; our kernels are 1.1-clean */
    int c11 = strstr(ctx->info.c_version, "OpenCL C 1.1") != NULL;
    snprintf(options, sizeof options, "%s %s", c11 ? "" : "-cl-std=CL1.2", extra ? extra : "");
    double t0 = now_seconds();
    err = clBuildProgram(pe->program, 1, &ctx->device, options, NULL, NULL);
    ctx->build_seconds += now_seconds() - t0;
    if (err != CL_SUCCESS) {
        size_t len = 0;
        clGetProgramBuildInfo(pe->program, ctx->device, CL_PROGRAM_BUILD_LOG, 0, NULL, &len);
        char *log = calloc(len + 1, 1);
        if (log)
            clGetProgramBuildInfo(pe->program, ctx->device, CL_PROGRAM_BUILD_LOG, len, log, NULL);
        clh_fail(ctx, CLH_ERR_BUILD, "clBuildProgram(kernels/%s, \"%s\") on '%s': %s (%d)\n%s",
                 file, options, ctx->info.name, clh_cl_error_name(err), (int)err,
                 log ? log : "(no build log)");
        free(log);
        clReleaseProgram(pe->program);
        pe->program = NULL;
        return CLH_ERR_BUILD;
    }
    pe->built = 1;
    return CLH_OK;
}

clh_status clh_ctx_build_all(clh_ctx *ctx) {
    for (int i = 0; i < ctx->n_programs; i++)
        CLH_TRY(build_program(ctx, i));
    return CLH_OK;
}

static int defines_kernel(const char *list, const char *name) {
    size_t n = strlen(name);
    for (const char *p = strstr(list, name); p; p = strstr(p + 1, name))
        if ((p == list || p[-1] == ' ') && (p[n] == ' ' || p[n] == '\0'))
            return 1;
    return 0;
}

static clh_status find_kernel(clh_ctx *ctx, const char *name, clh_kernel_entry **out) {
    for (int i = 0; i < ctx->n_kernels; i++)
        if (strcmp(ctx->kernels[i].name, name) == 0) {
            *out = &ctx->kernels[i];
            return CLH_OK;
        }
    int prog = -1;
    for (int i = 0; i < clh_kernel_source_count && prog < 0; i++)
        if (defines_kernel(clh_kernel_sources[i].kernels, name))
            prog = i;
    if (prog < 0)
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT,
                        "kernel '%s' is not defined in any embedded kernels/*.cl file", name);
    CLH_TRY(build_program(ctx, prog));
    if (ctx->n_kernels == ctx->cap_kernels) {
        int cap = ctx->cap_kernels ? ctx->cap_kernels * 2 : 32;
        clh_kernel_entry *k = realloc(ctx->kernels, (size_t)cap * sizeof *k);
        if (!k)
            return clh_fail(ctx, CLH_ERR_OUT_OF_MEMORY, "kernel cache: out of host memory");
        ctx->kernels = k;
        ctx->cap_kernels = cap;
    }
    clh_kernel_entry *e = &ctx->kernels[ctx->n_kernels];
    memset(e, 0, sizeof *e);
    snprintf(e->name, sizeof e->name, "%s", name);
    cl_int err;
    e->kernel = clCreateKernel(ctx->programs[prog].program, name, &err);
    if (err != CL_SUCCESS)
        return clh_fail_cl(ctx, err, "clCreateKernel", "%s from kernels/%s", name,
                           clh_kernel_sources[prog].file);
    size_t wg = 0;
    err = clGetKernelWorkGroupInfo(e->kernel, ctx->device, CL_KERNEL_WORK_GROUP_SIZE, sizeof wg,
                                   &wg, NULL);
    if (err != CL_SUCCESS || wg == 0)
        wg = 1;
    if (wg > ctx->info.max_work_group_size && ctx->info.max_work_group_size > 0)
        wg = ctx->info.max_work_group_size;
    e->wg_size = wg;
    ctx->n_kernels++;
    *out = e;
    return CLH_OK;
}

clh_status clh_kernel_wg_size(clh_ctx *ctx, const char *kernel, size_t *out) {
    clh_kernel_entry *e;
    CLH_TRY(find_kernel(ctx, kernel, &e));
    *out = e->wg_size;
    return CLH_OK;
}

/* ------------------------------------------------------------------ launch */

static void choose_local(const clh_ctx *ctx, const clh_kernel_entry *e, int dims,
                         const size_t *requested, size_t *local) {
    static const size_t default_1d = 256, default_2d = 16;
    for (int d = 0; d < dims; d++) {
        local[d] = requested ? requested[d] : (dims == 1 ? default_1d : default_2d);
        if (dims == 3 && !requested && d == 2)
            local[d] = 1;
        size_t item_max = ctx->info.max_work_item_sizes[d < 3 ? d : 2];
        if (item_max && local[d] > item_max)
            local[d] = item_max;
        if (local[d] == 0)
            local[d] = 1;
    }
    /* Shrink the largest dimension until the product fits the kernel's limit. */
    for (;;) {
        size_t prod = 1;
        int largest = 0;
        for (int d = 0; d < dims; d++) {
            prod *= local[d];
            if (local[d] > local[largest])
                largest = d;
        }
        if (prod <= e->wg_size || local[largest] == 1)
            break;
        local[largest] = (local[largest] + 1) / 2;
    }
}

static void record_profile(clh_ctx *ctx, const char *name, double ms) {
    for (int i = 0; i < ctx->n_prof; i++)
        if (strcmp(ctx->prof[i].name, name) == 0) {
            ctx->prof[i].calls++;
            ctx->prof[i].total_ms += ms;
            return;
        }
    if (ctx->n_prof == ctx->cap_prof) {
        int cap = ctx->cap_prof ? ctx->cap_prof * 2 : 32;
        clh_profile_entry *p = realloc(ctx->prof, (size_t)cap * sizeof *p);
        if (!p)
            return; /* profiling is best effort */
        ctx->prof = p;
        ctx->cap_prof = cap;
    }
    clh_profile_entry *p = &ctx->prof[ctx->n_prof++];
    snprintf(p->name, sizeof p->name, "%s", name);
    p->calls = 1;
    p->total_ms = ms;
}

void clh_profile_event(clh_ctx *ctx, const char *name, cl_event event) {
    if (!event)
        return;
    if (ctx->profile && clWaitForEvents(1, &event) == CL_SUCCESS) {
        cl_ulong start = 0, end = 0;
        if (clGetEventProfilingInfo(event, CL_PROFILING_COMMAND_START, sizeof start, &start,
                                    NULL) == CL_SUCCESS &&
            clGetEventProfilingInfo(event, CL_PROFILING_COMMAND_END, sizeof end, &end, NULL) ==
                CL_SUCCESS)
            record_profile(ctx, name, (double)(end - start) * 1e-6);
    }
    clReleaseEvent(event);
}

static void format_sizes(int dims, const size_t *v, char *buf, size_t size) {
    int64_t s[3] = {0, 0, 0};
    for (int d = 0; d < dims && d < 3; d++)
        s[d] = (int64_t)v[d];
    clh_shape_str(dims, s, buf, size);
}

clh_status clh_launch(clh_ctx *ctx, const char *kernel, int dims, const size_t *global,
                      const size_t *local_req, int nargs, const clh_karg *args) {
    if (dims < 1 || dims > 3)
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT, "clh_launch(%s): %d dimensions", kernel,
                        dims);
    clh_kernel_entry *e;
    CLH_TRY(find_kernel(ctx, kernel, &e));
    for (int i = 0; i < nargs; i++) {
        cl_int err = clSetKernelArg(e->kernel, (cl_uint)i, args[i].size, args[i].value);
        if (err != CL_SUCCESS)
            return clh_fail_cl(ctx, err, "clSetKernelArg", "%s, arg %d of size %zu", kernel, i,
                               args[i].size);
    }
    size_t local[3], padded[3];
    choose_local(ctx, e, dims, local_req, local);
    int empty = 0;
    for (int d = 0; d < dims; d++) {
        padded[d] = (global[d] + local[d] - 1) / local[d] * local[d];
        empty |= global[d] == 0;
    }
    if (empty)
        return CLH_OK;
    cl_event ev = NULL;
    cl_int err = clEnqueueNDRangeKernel(ctx->queue, e->kernel, (cl_uint)dims, NULL, padded, local,
                                        0, NULL, ctx->profile ? &ev : NULL);
    if (err != CL_SUCCESS) {
        char g[64], l[64];
        format_sizes(dims, padded, g, sizeof g);
        format_sizes(dims, local, l, sizeof l);
        return clh_fail_cl(ctx, err, "clEnqueueNDRangeKernel", "%s, global=%s, local=%s", kernel, g,
                           l);
    }
    if (ev)
        clh_profile_event(ctx, kernel, ev);
    if (ctx->sync) {
        err = clFinish(ctx->queue);
        if (err != CL_SUCCESS)
            return clh_fail_cl(ctx, err, "clFinish", "after %s (CLHCLIP_SYNC)", kernel);
    }
    return CLH_OK;
}

/* ------------------------------------------------------------------ profile table */

static int by_total_desc(const void *a, const void *b) {
    double x = ((const clh_profile_entry *)a)->total_ms,
           y = ((const clh_profile_entry *)b)->total_ms;
    return (x < y) - (x > y);
}

clh_status clh_profile_table(clh_ctx *ctx, char **table) {
    size_t cap = 256 + (size_t)ctx->n_prof * 128;
    char *buf = malloc(cap);
    if (!buf)
        return clh_fail(ctx, CLH_ERR_OUT_OF_MEMORY, "clh_profile_table: out of host memory");
    clFinish(ctx->queue);
    qsort(ctx->prof, (size_t)ctx->n_prof, sizeof *ctx->prof, by_total_desc);
    double total = 0;
    for (int i = 0; i < ctx->n_prof; i++)
        total += ctx->prof[i].total_ms;
    size_t used = (size_t)snprintf(buf, cap, "%-40s %8s %12s %10s %6s\n", "kernel", "calls",
                                   "total ms", "mean ms", "share");
    if (!ctx->profile)
        used +=
            (size_t)snprintf(buf + used, cap - used, "(profiling is off: set CLHCLIP_PROFILE=1)\n");
    for (int i = 0; i < ctx->n_prof && used < cap; i++) {
        const clh_profile_entry *p = &ctx->prof[i];
        used += (size_t)snprintf(buf + used, cap - used, "%-40s %8ld %12.3f %10.4f %5.1f%%\n",
                                 p->name, p->calls, p->total_ms, p->total_ms / (double)p->calls,
                                 total > 0 ? 100.0 * p->total_ms / total : 0.0);
    }
    if (used < cap)
        snprintf(buf + used, cap - used, "%-40s %8s %12.3f\n", "total", "", total);
    *table = buf;
    return CLH_OK;
}

void clh_profile_reset(clh_ctx *ctx) {
    ctx->n_prof = 0;
}

/* ------------------------------------------------------------------ int scratch */

clh_status clh_upload_ints(clh_ctx *ctx, const int32_t *values, size_t count, cl_mem *out) {
    size_t n = count ? count : 1; /* keep a valid buffer for empty launches */
    if (n > ctx->int_scratch_count) {
        if (ctx->int_scratch) {
            clFinish(ctx->queue);
            clReleaseMemObject(ctx->int_scratch);
            ctx->device_bytes -= ctx->int_scratch_count * sizeof(int32_t);
            ctx->int_scratch = NULL;
            ctx->int_scratch_count = 0;
        }
        size_t cap = n < 1024 ? 1024 : n;
        CLH_TRY(clh_buffer_new(ctx, cap * sizeof(int32_t), &ctx->int_scratch));
        ctx->int_scratch_count = cap;
    }
    if (values && count) {
        /* Blocking write: the host array may go away as soon as we return. */
        cl_int err = clEnqueueWriteBuffer(ctx->queue, ctx->int_scratch, CL_TRUE, 0,
                                          n * sizeof(int32_t), values, 0, NULL, NULL);
        if (err != CL_SUCCESS)
            return clh_fail_cl(ctx, err, "clEnqueueWriteBuffer", "%zu indices", n);
    }
    *out = ctx->int_scratch;
    return CLH_OK;
}
