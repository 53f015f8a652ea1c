/* safetensors reader and writer.
 *
 * File layout: u64 little-endian header length N, N bytes of JSON
 * {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}},
 * then the raw little-endian tensor data; offsets are relative to the end of the header.
 * Everything in the header is validated at open time, so the read functions only
 * convert bytes. */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "internal.h"

/* The Python library refuses headers above 100 MB; anything larger is corrupt. */
#define ST_MAX_HEADER ((uint64_t)100 * 1000 * 1000)
/* JSON numbers are doubles: integers above 2^53 cannot be represented exactly. */
#define ST_MAX_JSON_INT 9007199254740992.0

typedef struct st_entry {
    char *name;
    clh_dtype dtype;
    int ndim;
    int64_t shape[CLH_MAX_DIMS];
    size_t numel;
    size_t begin, end; /* byte offsets into the data section */
} st_entry;

struct clh_st_file {
    char *path;
    uint8_t *map;
    size_t map_size;
    const uint8_t *data; /* start of the data section */
    size_t data_size;
    st_entry *entries; /* header order */
    size_t count;
    const st_entry **sorted; /* entries sorted by name, for lookup */
    char **meta_keys;
    char **meta_values;
    size_t n_meta;
};

/* ------------------------------------------------------------------ dtypes */

static const struct {
    const char *name;
    size_t size;
} dtype_table[] = {
    [CLH_DTYPE_F32] = {"F32", 4},   [CLH_DTYPE_F16] = {"F16", 2}, [CLH_DTYPE_BF16] = {"BF16", 2},
    [CLH_DTYPE_F64] = {"F64", 8},   [CLH_DTYPE_I64] = {"I64", 8}, [CLH_DTYPE_I32] = {"I32", 4},
    [CLH_DTYPE_I16] = {"I16", 2},   [CLH_DTYPE_I8] = {"I8", 1},   [CLH_DTYPE_U8] = {"U8", 1},
    [CLH_DTYPE_BOOL] = {"BOOL", 1},
};
#define N_DTYPES ((int)(sizeof dtype_table / sizeof dtype_table[0]))

const char *clh_dtype_name(clh_dtype dtype) {
    if ((int)dtype < 0 || (int)dtype >= N_DTYPES)
        return "UNKNOWN";
    return dtype_table[dtype].name;
}

static int dtype_from_name(const char *name, clh_dtype *out) {
    for (int i = 0; i < N_DTYPES; i++) {
        if (strcmp(name, dtype_table[i].name) == 0) {
            *out = (clh_dtype)i;
            return 1;
        }
    }
    return 0;
}

static int dtype_is_float(clh_dtype d) {
    return d == CLH_DTYPE_F32 || d == CLH_DTYPE_F16 || d == CLH_DTYPE_BF16 || d == CLH_DTYPE_F64;
}

static int dtype_is_int(clh_dtype d) {
    return d == CLH_DTYPE_I64 || d == CLH_DTYPE_I32 || d == CLH_DTYPE_I16 || d == CLH_DTYPE_I8 ||
           d == CLH_DTYPE_U8;
}

/* ------------------------------------------------------------------ byte conversion
 * Explicit little-endian decoding keeps the reader correct on any host. */

static uint16_t load_u16(const uint8_t *p) {
    return (uint16_t)(p[0] | (p[1] << 8));
}

static uint32_t load_u32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static uint64_t load_u64(const uint8_t *p) {
    return (uint64_t)load_u32(p) | ((uint64_t)load_u32(p + 4) << 32);
}

static void store_u32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static void store_u64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static float f32_from_bits(uint32_t bits) {
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* IEEE half -> float; every half value (subnormals, inf, NaN payloads) is exact in float. */
static float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exponent = (h >> 10) & 0x1fu;
    uint32_t mantissa = h & 0x3ffu;
    if (exponent == 0) {
        /* zero or subnormal: mantissa * 2^-24, exact in float */
        float magnitude = ldexpf((float)mantissa, -24);
        return sign ? -magnitude : magnitude;
    }
    if (exponent == 31)
        return f32_from_bits(sign | 0x7f800000u | (mantissa << 13));
    return f32_from_bits(sign | ((exponent - 15 + 127) << 23) | (mantissa << 13));
}

/* bfloat16 is the upper half of a float. */
static float bf16_to_f32(uint16_t b) {
    return f32_from_bits((uint32_t)b << 16);
}

static double f64_from_bits(uint64_t bits) {
    double d;
    memcpy(&d, &bits, sizeof d);
    return d;
}

static void convert_to_f32(clh_dtype dtype, const uint8_t *src, float *dst, size_t n) {
    switch (dtype) {
        case CLH_DTYPE_F32:
            for (size_t i = 0; i < n; i++)
                dst[i] = f32_from_bits(load_u32(src + 4 * i));
            break;
        case CLH_DTYPE_F16:
            for (size_t i = 0; i < n; i++)
                dst[i] = f16_to_f32(load_u16(src + 2 * i));
            break;
        case CLH_DTYPE_BF16:
            for (size_t i = 0; i < n; i++)
                dst[i] = bf16_to_f32(load_u16(src + 2 * i));
            break;
        case CLH_DTYPE_F64:
            for (size_t i = 0; i < n; i++)
                dst[i] = (float)f64_from_bits(load_u64(src + 8 * i));
            break;
        default:
            break;
    }
}

static void convert_to_i64(clh_dtype dtype, const uint8_t *src, int64_t *dst, size_t n) {
    switch (dtype) {
        case CLH_DTYPE_I64:
            for (size_t i = 0; i < n; i++)
                dst[i] = (int64_t)load_u64(src + 8 * i);
            break;
        case CLH_DTYPE_I32:
            for (size_t i = 0; i < n; i++)
                dst[i] = (int32_t)load_u32(src + 4 * i);
            break;
        case CLH_DTYPE_I16:
            for (size_t i = 0; i < n; i++)
                dst[i] = (int16_t)load_u16(src + 2 * i);
            break;
        case CLH_DTYPE_I8:
            for (size_t i = 0; i < n; i++)
                dst[i] = (int8_t)src[i];
            break;
        case CLH_DTYPE_U8:
            for (size_t i = 0; i < n; i++)
                dst[i] = src[i];
            break;
        default:
            break;
    }
}

/* ------------------------------------------------------------------ reader: header parsing */

static char *dup_string(const char *s) {
    size_t n = strlen(s) + 1;
    char *copy = malloc(n);
    if (copy)
        memcpy(copy, s, n);
    return copy;
}

/* A JSON number holding an exact non-negative integer representable in a double. */
static int json_to_size(const cJSON *item, uint64_t *out) {
    if (!cJSON_IsNumber(item))
        return 0;
    double v = item->valuedouble;
    if (!(v >= 0.0) || v > ST_MAX_JSON_INT || v != floor(v))
        return 0;
    *out = (uint64_t)v;
    return 1;
}

static clh_status format_error(const char *path, const char *what, const char *name) {
    if (name)
        return clh_fail(NULL, CLH_ERR_FORMAT, "safetensors '%s': tensor '%s': %s", path, name,
                        what);
    return clh_fail(NULL, CLH_ERR_FORMAT, "safetensors '%s': %s", path, what);
}

static clh_status parse_shape(const char *path, const char *name, const cJSON *shape, st_entry *e) {
    if (!cJSON_IsArray(shape))
        return format_error(path, "\"shape\" is missing or not an array", name);
    int ndim = cJSON_GetArraySize(shape);
    if (ndim > CLH_MAX_DIMS)
        return clh_fail(NULL, CLH_ERR_FORMAT,
                        "safetensors '%s': tensor '%s': %d dimensions (at most %d supported)", path,
                        name, ndim, CLH_MAX_DIMS);
    size_t numel = 1;
    int i = 0;
    for (const cJSON *dim = shape->child; dim; dim = dim->next, i++) {
        uint64_t v;
        if (!json_to_size(dim, &v))
            return format_error(path, "shape entry is not a non-negative integer", name);
        if (v > (uint64_t)INT64_MAX || __builtin_mul_overflow(numel, (size_t)v, &numel))
            return format_error(path, "shape is too large", name);
        e->shape[i] = (int64_t)v;
    }
    e->ndim = ndim;
    e->numel = numel;
    return CLH_OK;
}

static clh_status parse_offsets(const char *path, const char *name, const cJSON *offsets,
                                size_t data_size, st_entry *e) {
    uint64_t begin, end;
    if (!cJSON_IsArray(offsets) || cJSON_GetArraySize(offsets) != 2 ||
        !json_to_size(offsets->child, &begin) || !json_to_size(offsets->child->next, &end))
        return format_error(path, "\"data_offsets\" is not a pair of non-negative integers", name);
    if (begin > end || end > data_size)
        return clh_fail(NULL, CLH_ERR_FORMAT,
                        "safetensors '%s': tensor '%s': data_offsets [%llu, %llu] out of range "
                        "(data section has %zu bytes)",
                        path, name, (unsigned long long)begin, (unsigned long long)end, data_size);
    size_t bytes;
    if (__builtin_mul_overflow(e->numel, dtype_table[e->dtype].size, &bytes) ||
        bytes != end - begin)
        return clh_fail(NULL, CLH_ERR_FORMAT,
                        "safetensors '%s': tensor '%s': data_offsets span %llu bytes but %zu "
                        "elements of %s need %zu",
                        path, name, (unsigned long long)(end - begin), e->numel,
                        dtype_table[e->dtype].name, e->numel * dtype_table[e->dtype].size);
    e->begin = (size_t)begin;
    e->end = (size_t)end;
    return CLH_OK;
}

static clh_status parse_entry(clh_st_file *f, const cJSON *item, st_entry *e) {
    const char *name = item->string;
    if (!cJSON_IsObject(item))
        return format_error(f->path, "entry is not a JSON object", name);
    const cJSON *dtype = cJSON_GetObjectItemCaseSensitive(item, "dtype");
    if (!cJSON_IsString(dtype))
        return format_error(f->path, "\"dtype\" is missing or not a string", name);
    if (!dtype_from_name(dtype->valuestring, &e->dtype))
        return clh_fail(NULL, CLH_ERR_FORMAT,
                        "safetensors '%s': tensor '%s': unsupported dtype '%s'", f->path, name,
                        dtype->valuestring);
    CLH_TRY(parse_shape(f->path, name, cJSON_GetObjectItemCaseSensitive(item, "shape"), e));
    CLH_TRY(parse_offsets(f->path, name, cJSON_GetObjectItemCaseSensitive(item, "data_offsets"),
                          f->data_size, e));
    e->name = dup_string(name);
    if (!e->name)
        return clh_fail(NULL, CLH_ERR_OUT_OF_MEMORY, "safetensors '%s': out of host memory",
                        f->path);
    return CLH_OK;
}

static clh_status parse_metadata(clh_st_file *f, const cJSON *meta) {
    if (!cJSON_IsObject(meta))
        return format_error(f->path, "\"__metadata__\" is not a JSON object", NULL);
    size_t n = (size_t)cJSON_GetArraySize(meta);
    f->meta_keys = calloc(n ? n : 1, sizeof *f->meta_keys);
    f->meta_values = calloc(n ? n : 1, sizeof *f->meta_values);
    if (!f->meta_keys || !f->meta_values)
        return clh_fail(NULL, CLH_ERR_OUT_OF_MEMORY, "safetensors '%s': out of host memory",
                        f->path);
    for (const cJSON *item = meta->child; item; item = item->next) {
        if (!cJSON_IsString(item))
            return clh_fail(NULL, CLH_ERR_FORMAT,
                            "safetensors '%s': __metadata__ value of '%s' is not a string", f->path,
                            item->string);
        f->meta_keys[f->n_meta] = dup_string(item->string);
        f->meta_values[f->n_meta] = dup_string(item->valuestring);
        f->n_meta++;
        if (!f->meta_keys[f->n_meta - 1] || !f->meta_values[f->n_meta - 1])
            return clh_fail(NULL, CLH_ERR_OUT_OF_MEMORY, "safetensors '%s': out of host memory",
                            f->path);
    }
    return CLH_OK;
}

static int compare_names(const void *a, const void *b) {
    return strcmp((*(const st_entry *const *)a)->name, (*(const st_entry *const *)b)->name);
}

/* Sorted name index for lookup; also rejects duplicate names (cJSON keeps both). */
static clh_status build_name_index(clh_st_file *f) {
    f->sorted = malloc((f->count ? f->count : 1) * sizeof *f->sorted);
    if (!f->sorted)
        return clh_fail(NULL, CLH_ERR_OUT_OF_MEMORY, "safetensors '%s': out of host memory",
                        f->path);
    for (size_t i = 0; i < f->count; i++)
        f->sorted[i] = &f->entries[i];
    qsort(f->sorted, f->count, sizeof *f->sorted, compare_names);
    for (size_t i = 1; i < f->count; i++)
        if (strcmp(f->sorted[i]->name, f->sorted[i - 1]->name) == 0)
            return format_error(f->path, "duplicate tensor name", f->sorted[i]->name);
    return CLH_OK;
}

static clh_status parse_header(clh_st_file *f, const char *json, size_t len) {
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(json, len, &end, 0);
    if (!root)
        return clh_fail(NULL, CLH_ERR_FORMAT,
                        "safetensors '%s': header is not valid JSON (error near byte %zu)", f->path,
                        (size_t)((end ? end : json) - json));
    /* Only padding (spaces, as the Python writer adds) may follow the JSON object. */
    for (const char *p = end ? end : json + len; p < json + len; p++) {
        if (*p != ' ' && *p != '\t' && *p != '\n' && *p != '\r' && *p != '\0') {
            cJSON_Delete(root);
            return format_error(f->path, "trailing bytes after the header JSON", NULL);
        }
    }
    clh_status st = CLH_OK;
    if (!cJSON_IsObject(root)) {
        st = format_error(f->path, "header is not a JSON object", NULL);
        goto done;
    }
    size_t n = (size_t)cJSON_GetArraySize(root);
    f->entries = calloc(n ? n : 1, sizeof *f->entries);
    if (!f->entries) {
        st = clh_fail(NULL, CLH_ERR_OUT_OF_MEMORY, "safetensors '%s': out of host memory", f->path);
        goto done;
    }
    for (const cJSON *item = root->child; item && st == CLH_OK; item = item->next) {
        if (strcmp(item->string, "__metadata__") == 0) {
            if (f->meta_keys)
                st = format_error(f->path, "duplicate \"__metadata__\"", NULL);
            else
                st = parse_metadata(f, item);
        } else {
            st = parse_entry(f, item, &f->entries[f->count]);
            if (st == CLH_OK)
                f->count++;
        }
    }
    if (st == CLH_OK)
        st = build_name_index(f);
done:
    cJSON_Delete(root);
    return st;
}

/* ------------------------------------------------------------------ reader: open/close */

static clh_status map_file(clh_st_file *f) {
    int fd = open(f->path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return clh_fail(NULL, CLH_ERR_IO, "cannot open safetensors '%s': %s", f->path,
                        strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        int err = errno;
        close(fd);
        return clh_fail(NULL, CLH_ERR_IO, "cannot stat safetensors '%s': %s", f->path,
                        strerror(err));
    }
    if (!S_ISREG(sb.st_mode)) {
        close(fd);
        return clh_fail(NULL, CLH_ERR_IO, "cannot read safetensors '%s': not a regular file",
                        f->path);
    }
    if (sb.st_size < 8) {
        close(fd);
        return clh_fail(NULL, CLH_ERR_FORMAT,
                        "safetensors '%s': truncated file (%lld bytes, header length needs 8)",
                        f->path, (long long)sb.st_size);
    }
    f->map_size = (size_t)sb.st_size;
    void *map = mmap(NULL, f->map_size, PROT_READ, MAP_PRIVATE, fd, 0);
    int err = errno;
    close(fd);
    if (map == MAP_FAILED)
        return clh_fail(NULL, CLH_ERR_IO, "cannot map safetensors '%s': %s", f->path,
                        strerror(err));
    f->map = map;
    return CLH_OK;
}

static clh_status open_checked(clh_st_file *f) {
    CLH_TRY(map_file(f));
    uint64_t header_len = load_u64(f->map);
    if (header_len > ST_MAX_HEADER || header_len > f->map_size - 8)
        return clh_fail(NULL, CLH_ERR_FORMAT,
                        "safetensors '%s': header length %llu does not fit the file size %zu "
                        "(truncated or not a safetensors file)",
                        f->path, (unsigned long long)header_len, f->map_size);
    if (header_len < 2 || f->map[8] != '{')
        return format_error(f->path, "header does not start with a JSON object", NULL);
    f->data = f->map + 8 + header_len;
    f->data_size = f->map_size - 8 - (size_t)header_len;
    return parse_header(f, (const char *)f->map + 8, (size_t)header_len);
}

clh_status clh_st_open(const char *path, clh_st_file **out) {
    if (!out)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "clh_st_open: out is NULL");
    *out = NULL;
    if (!path)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "clh_st_open: path is NULL");
    clh_st_file *f = calloc(1, sizeof *f);
    if (!f || !(f->path = dup_string(path))) {
        free(f);
        return clh_fail(NULL, CLH_ERR_OUT_OF_MEMORY, "clh_st_open('%s'): out of host memory", path);
    }
    clh_status st = open_checked(f);
    if (st != CLH_OK) {
        clh_st_close(f);
        return st;
    }
    *out = f;
    return CLH_OK;
}

void clh_st_close(clh_st_file *f) {
    if (!f)
        return;
    if (f->map)
        munmap(f->map, f->map_size);
    for (size_t i = 0; i < f->count; i++)
        free(f->entries[i].name);
    for (size_t i = 0; i < f->n_meta; i++) {
        free(f->meta_keys[i]);
        free(f->meta_values[i]);
    }
    free(f->meta_keys);
    free(f->meta_values);
    free(f->entries);
    free((void *)f->sorted);
    free(f->path);
    free(f);
}

/* ------------------------------------------------------------------ reader: queries */

size_t clh_st_count(const clh_st_file *f) {
    return f ? f->count : 0;
}

static void fill_info(const st_entry *e, clh_st_tensor_info *info) {
    memset(info, 0, sizeof *info);
    info->name = e->name;
    info->dtype = e->dtype;
    info->ndim = e->ndim;
    memcpy(info->shape, e->shape, sizeof info->shape);
    info->numel = e->numel;
}

static const st_entry *find_entry(const clh_st_file *f, const char *name) {
    size_t lo = 0, hi = f->count;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        const st_entry *e = f->sorted[mid];
        int c = strcmp(name, e->name);
        if (c == 0)
            return e;
        if (c < 0)
            hi = mid;
        else
            lo = mid + 1;
    }
    return NULL;
}

/* Lookup shared by the public functions: argument checks and the NOT_FOUND message. */
static clh_status lookup(const clh_st_file *f, const char *name, const char *fn,
                         const st_entry **out) {
    if (!f || !name)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "%s: file or name is NULL", fn);
    *out = find_entry(f, name);
    if (!*out)
        return clh_fail(NULL, CLH_ERR_NOT_FOUND, "safetensors '%s': no tensor named '%s'", f->path,
                        name);
    return CLH_OK;
}

clh_status clh_st_info_at(const clh_st_file *f, size_t i, clh_st_tensor_info *info) {
    if (!f || !info)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "clh_st_info_at: file or info is NULL");
    if (i >= f->count)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT,
                        "clh_st_info_at: index %zu out of range ('%s' has %zu tensors)", i, f->path,
                        f->count);
    fill_info(&f->entries[i], info);
    return CLH_OK;
}

clh_status clh_st_info(const clh_st_file *f, const char *name, clh_st_tensor_info *info) {
    const st_entry *e;
    if (!info)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "clh_st_info: info is NULL");
    CLH_TRY(lookup(f, name, "clh_st_info", &e));
    fill_info(e, info);
    return CLH_OK;
}

static clh_status check_read(const clh_st_file *f, const st_entry *e, const void *dst, size_t n,
                             const char *fn) {
    if (n != e->numel)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT,
                        "%s: tensor '%s' in '%s' has %zu elements, caller asked for %zu", fn,
                        e->name, f->path, e->numel, n);
    if (!dst && n > 0)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "%s: destination for '%s' is NULL", fn,
                        e->name);
    return CLH_OK;
}

clh_status clh_st_read_f32(const clh_st_file *f, const char *name, float *dst, size_t n) {
    const st_entry *e;
    CLH_TRY(lookup(f, name, "clh_st_read_f32", &e));
    if (!dtype_is_float(e->dtype))
        return clh_fail(NULL, CLH_ERR_FORMAT,
                        "clh_st_read_f32: tensor '%s' in '%s' has dtype %s, not a float type", name,
                        f->path, clh_dtype_name(e->dtype));
    CLH_TRY(check_read(f, e, dst, n, "clh_st_read_f32"));
    convert_to_f32(e->dtype, f->data + e->begin, dst, n);
    return CLH_OK;
}

clh_status clh_st_read_i64(const clh_st_file *f, const char *name, int64_t *dst, size_t n) {
    const st_entry *e;
    CLH_TRY(lookup(f, name, "clh_st_read_i64", &e));
    if (!dtype_is_int(e->dtype))
        return clh_fail(NULL, CLH_ERR_FORMAT,
                        "clh_st_read_i64: tensor '%s' in '%s' has dtype %s, not an integer type",
                        name, f->path, clh_dtype_name(e->dtype));
    CLH_TRY(check_read(f, e, dst, n, "clh_st_read_i64"));
    convert_to_i64(e->dtype, f->data + e->begin, dst, n);
    return CLH_OK;
}

const char *clh_st_metadata(const clh_st_file *f, const char *key) {
    if (!f || !key)
        return NULL;
    for (size_t i = 0; i < f->n_meta; i++)
        if (strcmp(f->meta_keys[i], key) == 0)
            return f->meta_values[i];
    return NULL;
}

/* ------------------------------------------------------------------ writer */

typedef struct st_wtensor {
    char *name;
    clh_dtype dtype;
    int ndim;
    int64_t shape[CLH_MAX_DIMS];
    uint8_t *bytes; /* little-endian payload */
    size_t size;
} st_wtensor;

struct clh_st_writer {
    st_wtensor *tensors;
    size_t count, cap;
    char **meta_keys;
    char **meta_values;
    size_t n_meta, cap_meta;
};

clh_status clh_st_writer_new(clh_st_writer **out) {
    if (!out)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "clh_st_writer_new: out is NULL");
    *out = calloc(1, sizeof **out);
    if (!*out)
        return clh_fail(NULL, CLH_ERR_OUT_OF_MEMORY, "clh_st_writer_new: out of host memory");
    return CLH_OK;
}

void clh_st_writer_free(clh_st_writer *w) {
    if (!w)
        return;
    for (size_t i = 0; i < w->count; i++) {
        free(w->tensors[i].name);
        free(w->tensors[i].bytes);
    }
    for (size_t i = 0; i < w->n_meta; i++) {
        free(w->meta_keys[i]);
        free(w->meta_values[i]);
    }
    free(w->tensors);
    free(w->meta_keys);
    free(w->meta_values);
    free(w);
}

static clh_status writer_check_new(const clh_st_writer *w, const char *fn, const char *name,
                                   int ndim, const int64_t *shape, const void *data,
                                   size_t *numel) {
    if (!w || !name || !*name)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "%s: writer or name is NULL/empty", fn);
    if (strcmp(name, "__metadata__") == 0)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "%s: '__metadata__' is reserved", fn);
    if (ndim < 0 || ndim > CLH_MAX_DIMS || (ndim > 0 && !shape))
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "%s('%s'): ndim %d out of range 0..%d", fn,
                        name, ndim, CLH_MAX_DIMS);
    size_t n = 1;
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 0 || __builtin_mul_overflow(n, (size_t)shape[i], &n))
            return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "%s('%s'): bad dimension %lld", fn,
                            name, (long long)shape[i]);
    }
    if (n > 0 && !data)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "%s('%s'): data is NULL", fn, name);
    for (size_t i = 0; i < w->count; i++)
        if (strcmp(w->tensors[i].name, name) == 0)
            return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "%s: tensor name '%s' already added",
                            fn, name);
    *numel = n;
    return CLH_OK;
}

/* Append a tensor whose payload is `numel` elements of `elem` bytes, encoded by `encode`. */
static clh_status writer_append(clh_st_writer *w, const char *name, clh_dtype dtype, int ndim,
                                const int64_t *shape, size_t numel, st_wtensor **out) {
    if (w->count == w->cap) {
        size_t cap = w->cap ? 2 * w->cap : 16;
        st_wtensor *bigger = realloc(w->tensors, cap * sizeof *bigger);
        if (!bigger)
            return clh_fail(NULL, CLH_ERR_OUT_OF_MEMORY, "clh_st_writer: out of host memory");
        w->tensors = bigger;
        w->cap = cap;
    }
    st_wtensor *t = &w->tensors[w->count];
    memset(t, 0, sizeof *t);
    t->size = numel * dtype_table[dtype].size;
    t->name = dup_string(name);
    t->bytes = malloc(t->size ? t->size : 1);
    if (!t->name || !t->bytes) {
        free(t->name);
        free(t->bytes);
        return clh_fail(NULL, CLH_ERR_OUT_OF_MEMORY, "clh_st_writer('%s'): out of host memory",
                        name);
    }
    t->dtype = dtype;
    t->ndim = ndim;
    for (int i = 0; i < ndim; i++)
        t->shape[i] = shape[i];
    w->count++;
    *out = t;
    return CLH_OK;
}

clh_status clh_st_writer_add_f32(clh_st_writer *w, const char *name, int ndim, const int64_t *shape,
                                 const float *data) {
    size_t numel;
    st_wtensor *t;
    CLH_TRY(writer_check_new(w, "clh_st_writer_add_f32", name, ndim, shape, data, &numel));
    CLH_TRY(writer_append(w, name, CLH_DTYPE_F32, ndim, shape, numel, &t));
    for (size_t i = 0; i < numel; i++) {
        uint32_t bits;
        memcpy(&bits, &data[i], sizeof bits);
        store_u32(t->bytes + 4 * i, bits);
    }
    return CLH_OK;
}

clh_status clh_st_writer_add_i64(clh_st_writer *w, const char *name, int ndim, const int64_t *shape,
                                 const int64_t *data) {
    size_t numel;
    st_wtensor *t;
    CLH_TRY(writer_check_new(w, "clh_st_writer_add_i64", name, ndim, shape, data, &numel));
    CLH_TRY(writer_append(w, name, CLH_DTYPE_I64, ndim, shape, numel, &t));
    for (size_t i = 0; i < numel; i++)
        store_u64(t->bytes + 8 * i, (uint64_t)data[i]);
    return CLH_OK;
}

clh_status clh_st_writer_set_metadata(clh_st_writer *w, const char *key, const char *value) {
    if (!w || !key || !value)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT,
                        "clh_st_writer_set_metadata: writer, key or value is NULL");
    char *copy = dup_string(value);
    if (!copy)
        return clh_fail(NULL, CLH_ERR_OUT_OF_MEMORY, "clh_st_writer_set_metadata: out of memory");
    for (size_t i = 0; i < w->n_meta; i++) {
        if (strcmp(w->meta_keys[i], key) == 0) { /* later value replaces the earlier one */
            free(w->meta_values[i]);
            w->meta_values[i] = copy;
            return CLH_OK;
        }
    }
    if (w->n_meta == w->cap_meta) {
        size_t cap = w->cap_meta ? 2 * w->cap_meta : 8;
        char **keys = realloc(w->meta_keys, cap * sizeof *keys);
        if (keys)
            w->meta_keys = keys;
        char **values = keys ? realloc(w->meta_values, cap * sizeof *values) : NULL;
        if (values)
            w->meta_values = values;
        if (!keys || !values) {
            free(copy);
            return clh_fail(NULL, CLH_ERR_OUT_OF_MEMORY,
                            "clh_st_writer_set_metadata: out of memory");
        }
        w->cap_meta = cap;
    }
    w->meta_keys[w->n_meta] = dup_string(key);
    if (!w->meta_keys[w->n_meta]) {
        free(copy);
        return clh_fail(NULL, CLH_ERR_OUT_OF_MEMORY, "clh_st_writer_set_metadata: out of memory");
    }
    w->meta_values[w->n_meta++] = copy;
    return CLH_OK;
}

/* Header JSON: "__metadata__" first, then the tensors in insertion order with
 * consecutive data offsets. */
static char *build_header_json(const clh_st_writer *w) {
    cJSON *root = cJSON_CreateObject();
    int ok = root != NULL;
    if (ok && w->n_meta) {
        cJSON *meta = cJSON_AddObjectToObject(root, "__metadata__");
        ok = meta != NULL;
        for (size_t i = 0; ok && i < w->n_meta; i++)
            ok = cJSON_AddStringToObject(meta, w->meta_keys[i], w->meta_values[i]) != NULL;
    }
    size_t offset = 0;
    for (size_t i = 0; ok && i < w->count; i++) {
        const st_wtensor *t = &w->tensors[i];
        cJSON *obj = cJSON_AddObjectToObject(root, t->name);
        ok = obj && cJSON_AddStringToObject(obj, "dtype", dtype_table[t->dtype].name);
        cJSON *shape = ok ? cJSON_AddArrayToObject(obj, "shape") : NULL;
        cJSON *offsets = shape ? cJSON_AddArrayToObject(obj, "data_offsets") : NULL;
        ok = offsets != NULL;
        for (int d = 0; ok && d < t->ndim; d++)
            ok = cJSON_AddItemToArray(shape, cJSON_CreateNumber((double)t->shape[d]));
        ok = ok && cJSON_AddItemToArray(offsets, cJSON_CreateNumber((double)offset));
        offset += t->size;
        ok = ok && cJSON_AddItemToArray(offsets, cJSON_CreateNumber((double)offset));
    }
    char *text = ok ? cJSON_PrintUnformatted(root) : NULL;
    cJSON_Delete(root);
    return text;
}

static int write_all(FILE *fp, const void *data, size_t size) {
    return size == 0 || fwrite(data, 1, size, fp) == size;
}

/* Write header + data to fp; returns 0 on an I/O error (errno set). */
static int write_contents(const clh_st_writer *w, const char *json, FILE *fp) {
    size_t json_len = strlen(json);
    size_t padded = (json_len + 7) / 8 * 8; /* data starts 8-aligned, like the Python writer */
    uint8_t len_bytes[8];
    store_u64(len_bytes, padded);
    static const char spaces[8] = "        ";
    if (!write_all(fp, len_bytes, 8) || !write_all(fp, json, json_len) ||
        !write_all(fp, spaces, padded - json_len))
        return 0;
    for (size_t i = 0; i < w->count; i++)
        if (!write_all(fp, w->tensors[i].bytes, w->tensors[i].size))
            return 0;
    return fflush(fp) == 0 && fsync(fileno(fp)) == 0;
}

/* fsync the directory holding `path` so the rename itself is durable. */
static void sync_parent_dir(const char *path) {
    char dir[4096];
    const char *slash = strrchr(path, '/');
    if (!slash)
        snprintf(dir, sizeof dir, ".");
    else if (slash == path)
        snprintf(dir, sizeof dir, "/");
    else
        snprintf(dir, sizeof dir, "%.*s", (int)(slash - path), path);
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd >= 0) {
        fsync(fd); /* best effort: some file systems refuse fsync on directories */
        close(fd);
    }
}

clh_status clh_st_writer_save(clh_st_writer *w, const char *path) {
    if (!w || !path || !*path)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "clh_st_writer_save: writer or path NULL");
    char *json = build_header_json(w);
    if (!json)
        return clh_fail(NULL, CLH_ERR_OUT_OF_MEMORY, "clh_st_writer_save('%s'): out of memory",
                        path);
    size_t tmp_len = strlen(path) + 32;
    char *tmp = malloc(tmp_len);
    if (!tmp) {
        cJSON_free(json);
        return clh_fail(NULL, CLH_ERR_OUT_OF_MEMORY, "clh_st_writer_save('%s'): out of memory",
                        path);
    }
    snprintf(tmp, tmp_len, "%s.tmp.%ld", path, (long)getpid());
    clh_status st = CLH_OK;
    FILE *fp = fopen(tmp, "wb");
    if (!fp) {
        st = clh_fail(NULL, CLH_ERR_IO, "cannot create '%s' (to save '%s'): %s", tmp, path,
                      strerror(errno));
    } else {
        int ok = write_contents(w, json, fp);
        int err = errno;
        if (fclose(fp) != 0 && ok) {
            ok = 0;
            err = errno;
        }
        if (!ok)
            st = clh_fail(NULL, CLH_ERR_IO, "cannot write '%s' (to save '%s'): %s", tmp, path,
                          strerror(err));
        else if (rename(tmp, path) != 0)
            st = clh_fail(NULL, CLH_ERR_IO, "cannot rename '%s' to '%s': %s", tmp, path,
                          strerror(errno));
        if (st != CLH_OK)
            unlink(tmp); /* any existing file at `path` is left untouched */
        else
            sync_parent_dir(path);
    }
    free(tmp);
    cJSON_free(json);
    return st;
}
