/* The three GEMM paths (CLBlast on the device, host BLAS on mapped buffers, clhclip's own
 * OpenCL kernels) give the same results within 1e-5 relative on every kind of call the
 * library makes: transpositions, padded leading dimensions, offset views, beta 0 over NaN,
 * beta 1, strided batches, a shared A, A/B/C carved from one buffer like the workspace, odd
 * sizes in every dimension, and the encoders' shapes (the largest only with
 * CLHCLIP_LARGE_TESTS=1). Also the path selection ($CLHCLIP_GEMM, the override, auto). */
#include "testutil.h"

#include "gemm_host.h"

#define REL 1e-5 /* selection must never change results beyond this (relative to max |C|) */

typedef struct gemm_case {
    const char *name;
    int ta, tb;
    size_t m, n, k, batch;
    float alpha, beta;
    size_t pad_a, pad_b, pad_c; /* leading dimension = stored row length + pad */
    size_t gap_a, gap_b, gap_c; /* batch stride = matrix size + gap */
    size_t off_a, off_b, off_c; /* element offsets of the views */
    int shared_a;               /* stride_a = 0: every product uses the same A */
    int c_nan;                  /* C starts as NaN (only with beta = 0) */
    int one_buffer;             /* A, B and C are views of one buffer */
} gemm_case;

typedef struct layout {
    size_t lda, ldb, ldc, sa, sb, sc, na, nb, nc;
} layout;

static layout layout_of(const gemm_case *g) {
    layout l;
    size_t a_rows = g->ta ? g->k : g->m, a_cols = g->ta ? g->m : g->k;
    size_t b_rows = g->tb ? g->n : g->k, b_cols = g->tb ? g->k : g->n;
    l.lda = a_cols + g->pad_a;
    l.ldb = b_cols + g->pad_b;
    l.ldc = g->n + g->pad_c;
    l.sa = g->shared_a ? 0 : a_rows * l.lda + g->gap_a;
    l.sb = b_rows * l.ldb + g->gap_b;
    l.sc = g->m * l.ldc + g->gap_c;
    l.na = (g->batch - 1) * l.sa + a_rows * l.lda;
    l.nb = (g->batch - 1) * l.sb + b_rows * l.ldb;
    l.nc = (g->batch - 1) * l.sc + g->m * l.ldc;
    return l;
}

static clh_tensor *view_of(clh_tensor *base, size_t offset, size_t n) {
    int64_t shape[1] = {(int64_t)n};
    clh_tensor *v = NULL;
    TU_OK(clh_tensor_view(base, offset, 1, shape, &v));
    return v;
}

/* Runs the case on `path` from the same host data and returns all of C (padding and gaps
 * included, so a write outside the matrices shows up). */
static float *run_case(clh_ctx *ctx, const gemm_case *g, clh_gemm_path path, const float *a,
                       const float *b, const float *c0) {
    layout l = layout_of(g);
    size_t at_a = g->off_a, at_b = at_a + l.na + g->off_b, at_c = at_b + l.nb + g->off_c;
    size_t total = at_c + l.nc + 5;
    int64_t shape[1] = {(int64_t)total};
    clh_tensor *base = NULL, *own[3] = {NULL, NULL, NULL};
    clh_tensor *ta, *tb, *tc;
    if (g->one_buffer) {
        TU_OK(clh_tensor_new(ctx, 1, shape, &base));
        TU_OK(clh_tensor_fill(base, NAN));
        ta = view_of(base, at_a, l.na);
        tb = view_of(base, at_b, l.nb);
        tc = view_of(base, at_c, l.nc);
    } else {
        size_t offs[3] = {g->off_a, g->off_b, g->off_c}, ns[3] = {l.na, l.nb, l.nc};
        clh_tensor **out[3] = {&ta, &tb, &tc};
        for (int i = 0; i < 3; i++) {
            int64_t s[1] = {(int64_t)(offs[i] + ns[i] + 3)};
            TU_OK(clh_tensor_new(ctx, 1, s, &own[i]));
            TU_OK(clh_tensor_fill(own[i], NAN));
            *out[i] = view_of(own[i], offs[i], ns[i]);
        }
    }
    TU_OK(clh_tensor_upload(ta, a, l.na));
    TU_OK(clh_tensor_upload(tb, b, l.nb));
    if (!g->c_nan)
        TU_OK(clh_tensor_upload(tc, c0, l.nc));
    clh_gemm_set_path(path);
    if (g->batch == 1)
        TU_OK(clh_gemm(ctx, g->ta, g->tb, g->m, g->n, g->k, g->alpha, ta, l.lda, tb, l.ldb, g->beta,
                       tc, l.ldc));
    else
        TU_OK(clh_gemm_batched(ctx, g->ta, g->tb, g->m, g->n, g->k, g->alpha, ta, l.lda, l.sa, tb,
                               l.ldb, l.sb, g->beta, tc, l.ldc, l.sc, g->batch));
    clh_gemm_set_path(CLH_GEMM_AUTO);
    float *got = malloc(l.nc * sizeof *got);
    assert_non_null(got);
    TU_OK(clh_tensor_download(tc, got, l.nc));
    /* A and B must be unchanged by either path (they share C's buffer in one_buffer cases) */
    float *back = malloc((l.na > l.nb ? l.na : l.nb) * sizeof *back);
    assert_non_null(back);
    TU_OK(clh_tensor_download(ta, back, l.na));
    assert_memory_equal(back, a, l.na * sizeof *a);
    TU_OK(clh_tensor_download(tb, back, l.nb));
    assert_memory_equal(back, b, l.nb * sizeof *b);
    free(back);
    clh_tensor_release(ta);
    clh_tensor_release(tb);
    clh_tensor_release(tc);
    clh_tensor_release(base);
    for (int i = 0; i < 3; i++)
        clh_tensor_release(own[i]);
    return got;
}

/* Element (r, c) of op(X), X row-major with leading dimension ld. */
static double op_at(const float *x, int trans, size_t ld, size_t r, size_t c) {
    return trans ? x[c * ld + r] : x[r * ld + c];
}

/* Double-precision reference for small cases (keeps both paths honest, not just equal). */
static void ref_case(const gemm_case *g, const float *a, const float *b, float *c) {
    layout l = layout_of(g);
    for (size_t p = 0; p < g->batch; p++)
        for (size_t i = 0; i < g->m; i++)
            for (size_t j = 0; j < g->n; j++) {
                double acc = 0;
                for (size_t q = 0; q < g->k; q++)
                    acc += op_at(a + p * l.sa, g->ta, l.lda, i, q) *
                           op_at(b + p * l.sb, g->tb, l.ldb, q, j);
                float *out = &c[p * l.sc + i * l.ldc + j];
                double prior = g->beta != 0.0f ? (double)g->beta * *out : 0.0;
                *out = (float)(g->alpha * acc + prior);
            }
}

/* got vs want over all of C: equal NaN pattern (untouched padding stays as it was), and
 * max |got - want| <= rel * max |want| + floor over the finite elements. */
static void assert_same(const char *what, const float *got, const float *want, size_t n, double rel,
                        double floor) {
    double err = 0, mag = 0;
    for (size_t i = 0; i < n; i++) {
        if (isnan(want[i]) || isnan(got[i])) {
            if (isnan(want[i]) != isnan(got[i]))
                fail_msg("%s: element %zu is %g, expected %g", what, i, (double)got[i],
                         (double)want[i]);
            continue;
        }
        err = fmax(err, fabs((double)got[i] - (double)want[i]));
        mag = fmax(mag, fabs((double)want[i]));
    }
    if (!(err <= rel * mag + floor))
        fail_msg("%s: max abs diff %.3g > %.1g * max |C| %.3g", what, err, rel, mag);
}

static void check_case(clh_ctx *ctx, const gemm_case *g) {
    layout l = layout_of(g);
    float *a = malloc(l.na * sizeof *a), *b = malloc(l.nb * sizeof *b);
    float *c0 = malloc(l.nc * sizeof *c0);
    assert_true(a && b && c0);
    tu_fill_random(a, l.na, -1, 1, 7 + (uint32_t)g->m);
    tu_fill_random(b, l.nb, -1, 1, 9 + (uint32_t)g->n);
    tu_fill_random(c0, l.nc, -1, 1, 13);
    if (g->c_nan)
        for (size_t i = 0; i < l.nc; i++)
            c0[i] = NAN;
    float *host = run_case(ctx, g, CLH_GEMM_HOST, a, b, c0);
    float *blast = run_case(ctx, g, CLH_GEMM_CLBLAST, a, b, c0);
    float *ocl = run_case(ctx, g, CLH_GEMM_OCL, a, b, c0);
    char what[160];
    snprintf(what, sizeof what, "%s: host vs clblast", g->name);
    assert_same(what, host, blast, l.nc, REL, 1e-7);
    snprintf(what, sizeof what, "%s: ocl vs clblast", g->name);
    assert_same(what, ocl, blast, l.nc, REL, 1e-7);
    snprintf(what, sizeof what, "%s: ocl vs host", g->name);
    assert_same(what, ocl, host, l.nc, REL, 1e-7);
    if (g->m * g->n * g->k * g->batch <= 4000000) {
        ref_case(g, a, b, c0); /* c0 becomes the reference (NaN stays where unwritten) */
        float *paths[3] = {host, blast, ocl};
        const char *names[3] = {"host", "clblast", "ocl"};
        for (int i = 0; i < 3; i++) {
            snprintf(what, sizeof what, "%s: %s vs double reference", g->name, names[i]);
            assert_same(what, paths[i], c0, l.nc, REL, 1e-7);
        }
    }
    free(host);
    free(blast);
    free(ocl);
    free(a);
    free(b);
    free(c0);
}

/* Every kind of call the library makes (layers.c, layers_backward.c, adapter_ops.c,
 * clip_block.c), on odd sizes. */
static const gemm_case cases[] = {
    {"NN padded", 0, 0, 7, 33, 77, 1, 1.5f, 0.5f, 3, 1, 2, 0, 0, 0, 5, 0, 9, 0, 0, 0},
    {"NT padded", 0, 1, 7, 33, 77, 1, 1.5f, 0.5f, 3, 1, 2, 0, 0, 0, 5, 0, 9, 0, 0, 0},
    {"TN padded", 1, 0, 7, 33, 77, 1, 1.5f, 0.5f, 3, 1, 2, 0, 0, 0, 5, 0, 9, 0, 0, 0},
    {"TT padded", 1, 1, 7, 33, 77, 1, 1.5f, 0.5f, 3, 1, 2, 0, 0, 0, 5, 0, 9, 0, 0, 0},
    {"beta 0 over NaN", 0, 1, 5, 13, 9, 1, 1.0f, 0.0f, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0},
    {"beta 0 over NaN, large",
     0,
     0,
     300,
     301,
     257,
     1,
     1.0f,
     0.0f,
     0,
     0,
     0,
     0,
     0,
     0,
     0,
     0,
     0,
     0,
     1,
     0},
    {"beta 1 (accumulate, TN like dW)",
     1,
     0,
     65,
     47,
     129,
     1,
     1.0f,
     1.0f,
     0,
     0,
     0,
     0,
     0,
     0,
     3,
     1,
     2,
     0,
     0,
     0},
    {"alpha -1 beta 1", 0, 0, 17, 19, 23, 1, -1.0f, 1.0f, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0},
    {"batched NT with gaps", 0, 1, 5, 130, 33, 3, 0.75f, 0.25f, 0, 0, 0, 7, 2, 5, 0, 3, 0, 0, 0, 0},
    {"batched TN with gaps", 1, 0, 5, 130, 33, 3, 0.75f, 0.25f, 0, 0, 0, 7, 2, 5, 0, 3, 0, 0, 0, 0},
    {"batched NN beta 0 over NaN",
     0,
     0,
     31,
     16,
     40,
     4,
     1.0f,
     0.0f,
     0,
     0,
     0,
     0,
     0,
     0,
     1,
     2,
     3,
     0,
     1,
     0},
    {"batched shared A (stride 0)",
     0,
     0,
     1,
     48,
     20,
     5,
     1.0f,
     0.0f,
     0,
     0,
     0,
     0,
     0,
     0,
     0,
     0,
     0,
     1,
     1,
     0},
    {"one buffer (workspace views)",
     0,
     1,
     19,
     21,
     35,
     1,
     1.0f,
     0.5f,
     2,
     0,
     1,
     0,
     0,
     0,
     4,
     6,
     8,
     0,
     0,
     1},
    {"one buffer, batched", 1, 0, 9, 11, 13, 3, 1.0f, 1.0f, 0, 1, 0, 3, 0, 2, 0, 1, 2, 0, 0, 1},
    {"attention scores 577x577x64 x12",
     0,
     1,
     577,
     577,
     64,
     12,
     0.125f,
     0.0f,
     0,
     0,
     0,
     0,
     0,
     0,
     0,
     0,
     0,
     0,
     1,
     0},
    {"attention values 577x64x577 x12",
     0,
     0,
     577,
     64,
     577,
     12,
     1.0f,
     0.0f,
     0,
     0,
     0,
     0,
     0,
     0,
     0,
     0,
     0,
     0,
     1,
     0},
    {"linear 577x768x768", 0, 1, 577, 768, 768, 1, 1.0f, 0.0f, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0},
};

static void test_paths_agree(void **state) {
    TU_CTX_OR_SKIP(ctx);
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        check_case(ctx, &cases[i]);
}

/* Each of m, n, k in turn over 1, 3, 17, 33, 65 (the others odd too), every transpose
 * combination, offset views, padded leading dimensions, beta != 0; every other case also
 * batched. These cross the kernel's 8 x 16 tile edges from both sides. */
static void test_odd_sizes(void **state) {
    TU_CTX_OR_SKIP(ctx);
    static const size_t sizes[] = {1, 3, 17, 33, 65};
    int count = 0;
    for (int dim = 0; dim < 3; dim++)
        for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++)
            for (int t = 0; t < 4; t++) {
                size_t mnk[3] = {17, 33, 3};
                mnk[dim] = sizes[s];
                char name[96];
                snprintf(name, sizeof name, "odd %s%s m=%zu n=%zu k=%zu", t & 1 ? "T" : "N",
                         t & 2 ? "T" : "N", mnk[0], mnk[1], mnk[2]);
                gemm_case g = {name,
                               t & 1,
                               (t & 2) != 0,
                               mnk[0],
                               mnk[1],
                               mnk[2],
                               count % 2 ? 2 : 1,
                               0.75f,
                               -0.5f,
                               1,
                               2,
                               3,
                               1,
                               0,
                               2,
                               5,
                               3,
                               7,
                               0,
                               0,
                               0};
                check_case(ctx, &g);
                count++;
            }
}

/* The encoders' GEMMs: ViT-B/16 at 384 (577 tokens; projections, MLP, attention per head)
 * and the text encoder over 171 prompts x 77 tokens. The mid-size one always runs; the rest
 * with CLHCLIP_LARGE_TESTS=1. */
static void test_encoder_shapes(void **state) {
    TU_CTX_OR_SKIP(ctx);
    static const gemm_case mid = {"mid 289x384x192 NT beta 1",
                                  0,
                                  1,
                                  289,
                                  192,
                                  384,
                                  1,
                                  1.0f,
                                  1.0f,
                                  0,
                                  0,
                                  0,
                                  0,
                                  0,
                                  0,
                                  3,
                                  5,
                                  7,
                                  0,
                                  0,
                                  0};
    check_case(ctx, &mid);
    const char *large = getenv("CLHCLIP_LARGE_TESTS");
    if (!large || strcmp(large, "1") != 0) {
        fprintf(stderr, "test_encoder_shapes: large shapes skipped (set CLHCLIP_LARGE_TESTS=1)\n");
        return;
    }
    static const gemm_case big[] = {
        {"vit 577x768x768 NT",
         0,
         1,
         577,
         768,
         768,
         1,
         1.0f,
         0.0f,
         0,
         0,
         0,
         0,
         0,
         0,
         0,
         0,
         0,
         0,
         1,
         0},
        {"vit fc1 577x768x3072 NT",
         0,
         1,
         577,
         3072,
         768,
         1,
         1.0f,
         1.0f,
         0,
         0,
         0,
         0,
         0,
         0,
         0,
         0,
         0,
         0,
         0,
         0},
        {"vit fc2 577x3072x768 NT",
         0,
         1,
         577,
         768,
         3072,
         1,
         1.0f,
         1.0f,
         0,
         0,
         0,
         0,
         0,
         0,
         0,
         0,
         0,
         0,
         0,
         0},
        {"text 13167x512x512 NT",
         0,
         1,
         13167,
         512,
         512,
         1,
         1.0f,
         0.0f,
         0,
         0,
         0,
         0,
         0,
         0,
         0,
         0,
         0,
         0,
         1,
         0},
        {"vit dW 768x577x768 TN",
         1,
         0,
         768,
         768,
         577,
         1,
         1.0f,
         1.0f,
         0,
         0,
         0,
         0,
         0,
         0,
         0,
         0,
         0,
         0,
         0,
         0},
    };
    for (size_t i = 0; i < sizeof big / sizeof big[0]; i++)
        check_case(ctx, &big[i]);
}

static void test_selection(void **state) {
    TU_CTX_OR_SKIP(ctx);
    const char *saved = getenv("CLHCLIP_GEMM");
    char keep[64] = "";
    if (saved)
        snprintf(keep, sizeof keep, "%s", saved);
    clh_gemm_path p;

    unsetenv("CLHCLIP_GEMM");
    TU_OK(clh_gemm_resolve_path(ctx, &p));
    const clh_device_info *info = clh_ctx_device(ctx);
    int capable = clh_gemm_host_capable(ctx);
    assert_int_equal(p, capable ? CLH_GEMM_HOST : CLH_GEMM_CLBLAST);
    if (info->is_gpu)
        assert_false(capable); /* GPUs keep CLBlast by default */

    setenv("CLHCLIP_GEMM", "clblast", 1);
    TU_OK(clh_gemm_resolve_path(ctx, &p));
    assert_int_equal(p, CLH_GEMM_CLBLAST);
    setenv("CLHCLIP_GEMM", "HOST", 1);
    TU_OK(clh_gemm_resolve_path(ctx, &p));
    assert_int_equal(p, CLH_GEMM_HOST);
    setenv("CLHCLIP_GEMM", "ocl", 1);
    TU_OK(clh_gemm_resolve_path(ctx, &p));
    assert_int_equal(p, CLH_GEMM_OCL);
    /* the in-process override wins over the environment */
    clh_gemm_set_path(CLH_GEMM_CLBLAST);
    TU_OK(clh_gemm_resolve_path(ctx, &p));
    assert_int_equal(p, CLH_GEMM_CLBLAST);
    clh_gemm_set_path(CLH_GEMM_AUTO);

    setenv("CLHCLIP_GEMM", "openblas", 1);
    TU_FAILS(clh_gemm_resolve_path(ctx, &p), CLH_ERR_INVALID_ARGUMENT,
             "CLHCLIP_GEMM='openblas' is not one of clblast, host, ocl, auto");
    int64_t s[2] = {2, 2};
    clh_tensor *t = NULL;
    TU_OK(clh_tensor_new(ctx, 2, s, &t));
    TU_FAILS(clh_gemm(ctx, 0, 0, 2, 2, 2, 1, t, 2, t, 2, 0, t, 2), CLH_ERR_INVALID_ARGUMENT,
             "CLHCLIP_GEMM='openblas'");
    clh_tensor_release(t);

    if (saved)
        setenv("CLHCLIP_GEMM", keep, 1);
    else
        unsetenv("CLHCLIP_GEMM");
    assert_non_null(strstr(clh_gemm_host_blas_name(), "threads"));
}

static int teardown(void **state) {
    (void)state;
    tu_ctx_teardown();
    return 0;
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_paths_agree),
        cmocka_unit_test(test_odd_sizes),
        cmocka_unit_test(test_encoder_shapes),
        cmocka_unit_test(test_selection),
    };
    return cmocka_run_group_tests(tests, NULL, teardown);
}
