/* Helpers shared by the cmocka tests (header-only; each test is one binary). */
#ifndef CLHCLIP_TESTUTIL_H
#define CLHCLIP_TESTUTIL_H

#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <cmocka.h>

#include "clhclip.h"

/* Directory of the shared test data (../shared/data from the repo root), or
 * $CLHCLIP_SHARED_DATA. Returns NULL when absent. */
static inline const char *tu_shared_data(void) {
    static char path[400];
    const char *env = getenv("CLHCLIP_SHARED_DATA");
    struct stat st;
    snprintf(path, sizeof path, "%s", env && *env ? env : "../shared/data");
    if (stat(path, &st) != 0 || !S_ISDIR(st.st_mode))
        return NULL;
    return path;
}

/* Path inside the shared data dir; calls skip() with a message when it is absent. */
#define TU_SHARED_OR_SKIP(buf, rel)                                                                \
    do {                                                                                           \
        const char *tu_dir_ = tu_shared_data();                                                    \
        if (!tu_dir_) {                                                                            \
            print_message("SKIP: ../shared/data is absent (set CLHCLIP_SHARED_DATA)\n");           \
            skip();                                                                                \
        }                                                                                          \
        snprintf((buf), sizeof(buf), "%s/%s", tu_dir_, (rel));                                     \
    } while (0)

/* Committed fixtures live in tests/fixtures (tests run from the repo root); an absolute
 * path is returned unchanged. */
static inline const char *tu_fixture(const char *rel) {
    static char path[1024];
    snprintf(path, sizeof path, "%s%s", rel[0] == '/' ? "" : "tests/fixtures/", rel);
    return path;
}

/* A private temporary directory per test binary: tu_setup_tmp / tu_teardown_tmp as the
 * group setup/teardown, tu_tmp_path(name) for files inside it. */
static char tu_tmp_dir_[256];

static inline const char *tu_tmp_path(const char *name) {
    static char path[512];
    snprintf(path, sizeof path, "%s/%s", tu_tmp_dir_, name);
    return path;
}

static inline int tu_setup_tmp(void **state) {
    (void)state;
    const char *base = getenv("TMPDIR");
    snprintf(tu_tmp_dir_, sizeof tu_tmp_dir_, "%s/clhclip-test-XXXXXX",
             base && *base ? base : "/tmp");
    return mkdtemp(tu_tmp_dir_) ? 0 : -1;
}

static inline int tu_teardown_tmp(void **state) {
    (void)state;
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tu_tmp_dir_);
    return system(cmd) == 0 ? 0 : -1;
}

/* One context per test binary; tests skip when no OpenCL device exists. */
static clh_ctx *tu_ctx_;
static inline clh_ctx *tu_ctx(void) {
    if (!tu_ctx_) {
        clh_status st = clh_ctx_create(NULL, &tu_ctx_);
        if (st != CLH_OK) {
            print_message("SKIP: no OpenCL device: %s\n", clh_last_error());
            tu_ctx_ = NULL;
        }
    }
    return tu_ctx_;
}
#define TU_CTX_OR_SKIP(var)                                                                        \
    clh_ctx *var = tu_ctx();                                                                       \
    if (!var)                                                                                      \
    skip()

static inline void tu_ctx_teardown(void) {
    clh_ctx_destroy(tu_ctx_);
    tu_ctx_ = NULL;
}

/* Assert a clh call succeeded, printing the error message otherwise. */
#define TU_OK(expr)                                                                                \
    do {                                                                                           \
        clh_status tu_st_ = (expr);                                                                \
        if (tu_st_ != CLH_OK)                                                                      \
            fail_msg("%s -> %s: %s", #expr, clh_status_name(tu_st_), clh_last_error());            \
    } while (0)

static inline int tu_contains(const char *hay, const char *needle) {
    return !needle || strstr(hay, needle) != NULL;
}

/* Assert a clh call failed with `status` and that its message contains `needle`. */
#define TU_FAILS(expr, status, needle)                                                             \
    do {                                                                                           \
        clh_status tu_st_ = (expr);                                                                \
        if (tu_st_ != (status))                                                                    \
            fail_msg("%s -> %s (expected %s): %s", #expr, clh_status_name(tu_st_),                 \
                     clh_status_name(status), clh_last_error());                                   \
        if (!tu_contains(clh_last_error(), (needle)))                                              \
            fail_msg("%s: message '%s' lacks '%s'", #expr, clh_last_error(), (needle));            \
    } while (0)

/* Deterministic uniform floats in [lo, hi). */
static inline void tu_fill_random(float *x, size_t n, float lo, float hi, uint32_t seed) {
    uint64_t s = seed * 6364136223846793005ULL + 1442695040888963407ULL;
    for (size_t i = 0; i < n; i++) {
        s = s * 6364136223846793005ULL + 1442695040888963407ULL;
        float u = (float)((s >> 40) & 0xFFFFFF) / 16777216.0f;
        x[i] = lo + (hi - lo) * u;
    }
}

/* max |a-b| and max |b| */
static inline void tu_max_errors(const float *a, const float *b, size_t n, double *max_abs,
                                 double *max_mag) {
    *max_abs = 0;
    *max_mag = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        if (isnan(*max_abs))
            continue; /* a NaN anywhere stays: it must fail the comparison */
        if (!(d <= *max_abs))
            *max_abs = d;
        if (fabs((double)b[i]) > *max_mag)
            *max_mag = fabs((double)b[i]);
    }
}

/* Assert max|got-want| <= rel * max|want| (+ abs floor). */
#define TU_ASSERT_CLOSE(got, want, n, rel, abs_floor)                                              \
    do {                                                                                           \
        double tu_e_, tu_m_;                                                                       \
        tu_max_errors((got), (want), (n), &tu_e_, &tu_m_);                                         \
        double tu_tol_ = (rel)*tu_m_ + (abs_floor);                                                \
        if (!(tu_e_ <= tu_tol_))                                                                   \
            fail_msg("%s vs %s: max abs err %.3g > tol %.3g (max |want| %.3g)", #got, #want,       \
                     tu_e_, tu_tol_, tu_m_);                                                       \
    } while (0)

/* Host arrays for tests (free() them). */
static inline float *tu_random_floats(size_t n, float lo, float hi, uint32_t seed) {
    float *x = malloc((n ? n : 1) * sizeof *x);
    assert_non_null(x);
    tu_fill_random(x, n, lo, hi, seed);
    return x;
}

static inline float *tu_alloc_floats(size_t n) {
    float *x = calloc(n ? n : 1, sizeof *x);
    assert_non_null(x);
    return x;
}

static inline double *tu_alloc_doubles(size_t n) {
    double *x = calloc(n ? n : 1, sizeof *x);
    assert_non_null(x);
    return x;
}

static inline double *tu_to_double(const float *x, size_t n) {
    double *y = tu_alloc_doubles(n);
    for (size_t i = 0; i < n; i++)
        y[i] = x[i];
    return y;
}

static inline double tu_max_abs(const double *x, size_t n) {
    double m = 0;
    for (size_t i = 0; i < n; i++)
        m = fmax(m, fabs(x[i]));
    return m;
}

static inline double tu_dot(const double *a, const double *b, size_t n) {
    double s = 0;
    for (size_t i = 0; i < n; i++)
        s += a[i] * b[i];
    return s;
}

/* Device tensor holding data (may be NULL: contents NaN); with offset > 0 it is a view that
 * starts `offset` elements into a NaN-filled buffer, so kernels must honour element
 * offsets and stay in bounds. */
static inline clh_tensor *tu_put(clh_ctx *ctx, size_t offset, int ndim, const int64_t *shape,
                                 const float *data) {
    size_t numel = 1;
    for (int i = 0; i < ndim; i++)
        numel *= (size_t)shape[i];
    int64_t base_shape[1] = {(int64_t)(offset + numel + 3)};
    clh_tensor *base = NULL, *view = NULL;
    TU_OK(clh_tensor_new(ctx, 1, base_shape, &base));
    TU_OK(clh_tensor_fill(base, NAN));
    TU_OK(clh_tensor_view(base, offset, ndim, shape, &view));
    clh_tensor_release(base);
    if (data)
        TU_OK(clh_tensor_upload(view, data, numel));
    return view;
}

/* Output tensor pre-filled with NaN, so an element a kernel skips shows up. */
static inline clh_tensor *tu_nan_tensor(clh_ctx *ctx, int ndim, const int64_t *shape) {
    return tu_put(ctx, 0, ndim, shape, NULL);
}

/* Host copy of a tensor (free() it). */
static inline float *tu_fetch(const clh_tensor *t) {
    size_t n = clh_tensor_numel(t);
    float *x = calloc(n ? n : 1, sizeof *x);
    assert_non_null(x);
    TU_OK(clh_tensor_download(t, x, n));
    return x;
}

#endif
