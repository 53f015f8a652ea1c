/* Forward layers against plain C references (computed in double) on shapes that are
 * not multiples of work-group sizes; in-place and offset-view variants; shape and
 * argument errors. */
#include "hclip.h"
#include "testutil.h"

#define TOL 1e-5 /* max abs error <= TOL * max |expected| (+ a small floor) */

#define SHAPE(...) ((const int64_t[]){__VA_ARGS__})
#define NDIM(...)  ((int)(sizeof((int64_t[]){__VA_ARGS__}) / sizeof(int64_t)))
/* dims, shape in one go: T(ctx, DIMS(2, 3), data) */
#define DIMS(...) NDIM(__VA_ARGS__), SHAPE(__VA_ARGS__)

static void assert_tensor_close(const clh_tensor *t, const float *want, size_t n, double rel,
                                double abs_floor) {
    assert_int_equal(clh_tensor_numel(t), n);
    float *got = tu_fetch(t);
    /* tu_max_errors lets a NaN through unless it is the last element: check first */
    for (size_t i = 0; i < n; i++)
        if (isfinite(want[i]) && !isfinite(got[i]))
            fail_msg("element %zu is %g, expected %g", i, (double)got[i], (double)want[i]);
    TU_ASSERT_CLOSE(got, want, n, rel, abs_floor);
    free(got);
}

/* ------------------------------------------------------------------ GEMM */

/* Element (r, c) of op(X) where X is stored row-major with leading dimension ld. */
static double op_at(const float *x, int trans, size_t ld, size_t r, size_t c) {
    return trans ? x[c * ld + r] : x[r * ld + c];
}

static void ref_gemm(int ta, int tb, size_t m, size_t n, size_t k, float alpha, const float *a,
                     size_t lda, const float *b, size_t ldb, float beta, float *c, size_t ldc) {
    for (size_t i = 0; i < m; i++)
        for (size_t j = 0; j < n; j++) {
            double acc = 0;
            for (size_t p = 0; p < k; p++)
                acc += op_at(a, ta, lda, i, p) * op_at(b, tb, ldb, p, j);
            double prior = beta != 0.0f ? (double)beta * c[i * ldc + j] : 0.0;
            c[i * ldc + j] = (float)(alpha * acc + prior);
        }
}

/* GEMM tolerance: relative to k * max|a| * max|b| (the scale of a dot product). */
static double gemm_tol(size_t k, float alpha, const float *a, size_t na, const float *b,
                       size_t nb) {
    double ma = 0, mb = 0;
    for (size_t i = 0; i < na; i++)
        ma = fmax(ma, fabs(a[i]));
    for (size_t i = 0; i < nb; i++)
        mb = fmax(mb, fabs(b[i]));
    return 1e-6 * (double)k * ma * mb * fabs(alpha) + 1e-6;
}

static void check_gemm_case(clh_ctx *ctx, int ta, int tb) {
    const size_t m = 7, n = 33, k = 77;
    /* Padded leading dimensions exercise lda/ldb/ldc beyond the row length. */
    size_t a_rows = ta ? k : m, a_cols = ta ? m : k, lda = a_cols + 3;
    size_t b_rows = tb ? n : k, b_cols = tb ? k : n, ldb = b_cols + 1;
    size_t ldc = n + 2;
    size_t na = a_rows * lda, nb = b_rows * ldb, nc = m * ldc;
    float *a = tu_random_floats(na, -1, 1, 11 + ta), *b = tu_random_floats(nb, -2, 2, 21 + tb);
    float *c = tu_random_floats(nc, -1, 1, 31);
    clh_tensor *ta_t = tu_put(ctx, 5, DIMS((int64_t)na), a);
    clh_tensor *tb_t = tu_put(ctx, 0, DIMS((int64_t)nb), b);
    clh_tensor *tc_t = tu_put(ctx, 9, DIMS((int64_t)nc), c);
    const float alpha = 1.5f, beta = 0.5f;
    TU_OK(clh_gemm(ctx, ta, tb, m, n, k, alpha, ta_t, lda, tb_t, ldb, beta, tc_t, ldc));
    ref_gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    float *got = tu_fetch(tc_t);
    /* the padding columns of C must be untouched: compare every element */
    double err, mag;
    tu_max_errors(got, c, nc, &err, &mag);
    double tol = gemm_tol(k, alpha, a, na, b, nb);
    if (!(err <= tol))
        fail_msg("gemm ta=%d tb=%d: max abs err %.3g > tol %.3g", ta, tb, err, tol);
    free(got);
    free(a);
    free(b);
    free(c);
    clh_tensor_release(ta_t);
    clh_tensor_release(tb_t);
    clh_tensor_release(tc_t);
}

static void test_gemm_transposes(void **state) {
    TU_CTX_OR_SKIP(ctx);
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++)
            check_gemm_case(ctx, ta, tb);
}

/* beta = 0 must not read C: workspace temporaries may hold NaN from earlier use. */
static void check_gemm_beta_zero(clh_ctx *ctx, size_t m, size_t n, size_t k) {
    float *a = tu_random_floats(m * k, -1, 1, 1), *b = tu_random_floats(k * n, -1, 1, 2);
    float *want = tu_alloc_floats(m * n);
    clh_tensor *ta = tu_put(ctx, 0, DIMS((int64_t)m, (int64_t)k), a);
    clh_tensor *tb = tu_put(ctx, 0, DIMS((int64_t)k, (int64_t)n), b);
    clh_tensor *tc = tu_nan_tensor(ctx, DIMS((int64_t)m, (int64_t)n));
    TU_OK(clh_gemm(ctx, 0, 0, m, n, k, 1.0f, ta, k, tb, n, 0.0f, tc, n));
    ref_gemm(0, 0, m, n, k, 1.0f, a, k, b, n, 0.0f, want, n);
    assert_tensor_close(tc, want, m * n, 0, gemm_tol(k, 1.0f, a, m * k, b, k * n));
    free(a);
    free(b);
    free(want);
    clh_tensor_release(ta);
    clh_tensor_release(tb);
    clh_tensor_release(tc);
}

static void test_gemm_beta_zero_ignores_c(void **state) {
    TU_CTX_OR_SKIP(ctx);
    check_gemm_beta_zero(ctx, 5, 13, 9);
    /* m*n*k >= 896^3 takes CLBlast's indirect (padded) GEMM path, not the direct one */
    check_gemm_beta_zero(ctx, 900, 901, 903);
}

static void test_gemm_batched(void **state) {
    TU_CTX_OR_SKIP(ctx);
    const size_t batch = 3, m = 5, n = 130, k = 33;
    for (int ta = 0; ta < 2; ta++) {
        const int tb = !ta; /* covers NT (attention scores) and TN */
        size_t lda = ta ? m : k, ldb = tb ? k : n, ldc = n;
        size_t sa = m * k + 7, sb = k * n + 2, sc = m * n + 5; /* gaps between matrices */
        size_t na = batch * sa, nb = batch * sb, nc = batch * sc;
        float *a = tu_random_floats(na, -1, 1, 41), *b = tu_random_floats(nb, -1, 1, 42);
        float *c = tu_random_floats(nc, -1, 1, 43);
        clh_tensor *ta_t = tu_put(ctx, 0, DIMS((int64_t)na), a);
        clh_tensor *tb_t = tu_put(ctx, 3, DIMS((int64_t)nb), b);
        clh_tensor *tc_t = tu_put(ctx, 0, DIMS((int64_t)nc), c);
        TU_OK(clh_gemm_batched(ctx, ta, tb, m, n, k, 0.75f, ta_t, lda, sa, tb_t, ldb, sb, 0.25f,
                               tc_t, ldc, sc, batch));
        for (size_t i = 0; i < batch; i++)
            ref_gemm(ta, tb, m, n, k, 0.75f, a + i * sa, lda, b + i * sb, ldb, 0.25f, c + i * sc,
                     ldc);
        assert_tensor_close(tc_t, c, nc, 0, gemm_tol(k, 0.75f, a, na, b, nb));
        free(a);
        free(b);
        free(c);
        clh_tensor_release(ta_t);
        clh_tensor_release(tb_t);
        clh_tensor_release(tc_t);
    }
}

static void test_gemm_errors(void **state) {
    TU_CTX_OR_SKIP(ctx);
    clh_tensor *a = tu_nan_tensor(ctx, DIMS(4, 6)), *b = tu_nan_tensor(ctx, DIMS(6, 5));
    clh_tensor *c = tu_nan_tensor(ctx, DIMS(4, 5));
    TU_FAILS(clh_gemm(ctx, 0, 0, 4, 5, 6, 1, a, 5, b, 5, 0, c, 5), CLH_ERR_INVALID_ARGUMENT,
             "leading dimension of A (5)");
    TU_FAILS(clh_gemm(ctx, 0, 0, 5, 5, 6, 1, a, 6, b, 5, 0, c, 5), CLH_ERR_SHAPE, "[4, 6]");
    TU_FAILS(clh_gemm(ctx, 0, 1, 4, 5, 6, 1, a, 6, b, 7, 0, c, 5), CLH_ERR_SHAPE,
             "B needs 34 elements");
    TU_FAILS(clh_gemm(ctx, 0, 0, 4, 5, 0, 1, a, 6, b, 5, 0, c, 5), CLH_ERR_INVALID_ARGUMENT,
             "k = 0");
    TU_FAILS(clh_gemm(ctx, 0, 0, 4, 5, 6, 1, NULL, 6, b, 5, 0, c, 5), CLH_ERR_INVALID_ARGUMENT,
             "matrix A is NULL");
    TU_FAILS(clh_gemm_batched(ctx, 0, 0, 2, 5, 6, 1, a, 6, 0, b, 5, 0, 0, c, 5, 5, 2),
             CLH_ERR_INVALID_ARGUMENT, "overlap");
    /* nothing to compute is not an error */
    TU_OK(clh_gemm(ctx, 0, 0, 0, 5, 6, 1, a, 6, b, 5, 0, c, 5));
    TU_OK(clh_gemm_batched(ctx, 0, 0, 4, 5, 6, 1, a, 6, 24, b, 5, 30, 0, c, 5, 20, 0));
    clh_tensor_release(a);
    clh_tensor_release(b);
    clh_tensor_release(c);
}

/* ------------------------------------------------------------------ linear */

static void ref_linear(const float *x, const float *w, const float *b, size_t rows, size_t in,
                       size_t out, float *y) {
    for (size_t r = 0; r < rows; r++)
        for (size_t o = 0; o < out; o++) {
            double acc = b ? b[o] : 0.0;
            for (size_t i = 0; i < in; i++)
                acc += (double)x[r * in + i] * w[o * in + i];
            y[r * out + o] = (float)acc;
        }
}

static void test_linear(void **state) {
    TU_CTX_OR_SKIP(ctx);
    const size_t rows = 14, in = 77, out = 130;
    float *x = tu_random_floats(rows * in, -1, 1, 51),
          *w = tu_random_floats(out * in, -0.5f, 0.5f, 52);
    float *b = tu_random_floats(out, -3, 3, 53), *want = tu_alloc_floats(rows * out);
    clh_tensor *tx = tu_put(ctx, 3, DIMS(2, 7, (int64_t)in), x);
    clh_tensor *tw = tu_put(ctx, 0, DIMS((int64_t)out, (int64_t)in), w);
    clh_tensor *tb = tu_put(ctx, 1, DIMS((int64_t)out), b);
    clh_tensor *ty = tu_nan_tensor(ctx, DIMS(2, 7, (int64_t)out));
    double tol = gemm_tol(in, 1, x, rows * in, w, out * in);

    TU_OK(clh_linear(ctx, tx, tw, tb, ty));
    ref_linear(x, w, b, rows, in, out, want);
    assert_tensor_close(ty, want, rows * out, 0, tol);

    TU_OK(clh_tensor_fill(ty, NAN));
    TU_OK(clh_linear(ctx, tx, tw, NULL, ty));
    ref_linear(x, w, NULL, rows, in, out, want);
    assert_tensor_close(ty, want, rows * out, 0, tol);

    clh_tensor *bad_y = tu_nan_tensor(ctx, DIMS(14, 129)), *bad_b = tu_nan_tensor(ctx, DIMS(129));
    clh_tensor *bad_w = tu_nan_tensor(ctx, DIMS((int64_t)out, 76));
    TU_FAILS(clh_linear(ctx, tx, tw, tb, bad_y), CLH_ERR_SHAPE, "[14, 129]");
    TU_FAILS(clh_linear(ctx, tx, tw, bad_b, ty), CLH_ERR_SHAPE, "clh_linear");
    TU_FAILS(clh_linear(ctx, tx, bad_w, tb, ty), CLH_ERR_SHAPE, "[2, 7, 77]");
    TU_FAILS(clh_linear(ctx, tx, tw, tb, tx), CLH_ERR_SHAPE, "clh_linear");
    clh_tensor *square_w = tu_nan_tensor(ctx, DIMS((int64_t)in, (int64_t)in));
    TU_FAILS(clh_linear(ctx, tx, square_w, NULL, tx), CLH_ERR_INVALID_ARGUMENT, "alias");
    clh_tensor_release(square_w);
    clh_tensor_release(bad_y);
    clh_tensor_release(bad_b);
    clh_tensor_release(bad_w);
    clh_tensor_release(tx);
    clh_tensor_release(tw);
    clh_tensor_release(tb);
    clh_tensor_release(ty);
    free(x);
    free(w);
    free(b);
    free(want);
}

/* ------------------------------------------------------------------ layer norm */

static void ref_layer_norm(const float *x, const float *g, const float *b, size_t rows, size_t cols,
                           float eps, float *y) {
    for (size_t r = 0; r < rows; r++) {
        const float *xr = x + r * cols;
        double mean = 0, var = 0;
        for (size_t c = 0; c < cols; c++)
            mean += xr[c];
        mean /= (double)cols;
        for (size_t c = 0; c < cols; c++)
            var += (xr[c] - mean) * (xr[c] - mean);
        var /= (double)cols;
        for (size_t c = 0; c < cols; c++)
            y[r * cols + c] = (float)((xr[c] - mean) / sqrt(var + eps) * g[c] + b[c]);
    }
}

static void test_layer_norm(void **state) {
    TU_CTX_OR_SKIP(ctx);
    /* rows, cols, centre, spread: a large centre checks the two-pass variance, a tiny
     * spread makes eps matter */
    static const struct {
        size_t rows, cols;
        float centre, spread;
    } shapes[] = {
        {1, 5, 100, 5}, {7, 77, 100, 5}, {33, 513, 100, 5}, {3, 1, 0, 1}, {7, 130, 0, 0.003f}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        size_t rows = shapes[s].rows, cols = shapes[s].cols, n = rows * cols;
        float lo = shapes[s].centre - shapes[s].spread, hi = shapes[s].centre + shapes[s].spread;
        float *x = tu_random_floats(n, lo, hi, 60 + (uint32_t)s);
        float *g = tu_random_floats(cols, 0.5f, 1.5f, 70), *b = tu_random_floats(cols, -1, 1, 71);
        float *want = tu_alloc_floats(n);
        ref_layer_norm(x, g, b, rows, cols, 1e-5f, want);
        clh_tensor *tx = tu_put(ctx, 7, DIMS((int64_t)rows, (int64_t)cols), x);
        clh_tensor *tg = tu_put(ctx, 0, DIMS((int64_t)cols), g);
        clh_tensor *tb = tu_put(ctx, 2, DIMS((int64_t)cols), b);
        clh_tensor *ty = tu_nan_tensor(ctx, DIMS((int64_t)rows, (int64_t)cols));
        TU_OK(clh_layer_norm(ctx, tx, tg, tb, 1e-5f, ty));
        assert_tensor_close(ty, want, n, TOL, 1e-6);
        TU_OK(clh_layer_norm(ctx, tx, tg, tb, 1e-5f, tx)); /* in place */
        assert_tensor_close(tx, want, n, TOL, 1e-6);
        clh_tensor_release(tx);
        clh_tensor_release(tg);
        clh_tensor_release(tb);
        clh_tensor_release(ty);
        free(x);
        free(g);
        free(b);
        free(want);
    }
}

static void test_layer_norm_errors(void **state) {
    TU_CTX_OR_SKIP(ctx);
    clh_tensor *x = tu_nan_tensor(ctx, DIMS(7, 77)), *g = tu_nan_tensor(ctx, DIMS(77));
    clh_tensor *g_bad = tu_nan_tensor(ctx, DIMS(76)), *y_bad = tu_nan_tensor(ctx, DIMS(77, 7));
    TU_FAILS(clh_layer_norm(ctx, x, g_bad, g, 1e-5f, x), CLH_ERR_SHAPE, "[76]");
    TU_FAILS(clh_layer_norm(ctx, x, g, g_bad, 1e-5f, x), CLH_ERR_SHAPE, "clh_layer_norm");
    TU_FAILS(clh_layer_norm(ctx, x, g, g, 1e-5f, y_bad), CLH_ERR_SHAPE, "[77, 7]");
    TU_FAILS(clh_layer_norm(ctx, x, g, g, -1.0f, x), CLH_ERR_INVALID_ARGUMENT, "eps");
    TU_FAILS(clh_layer_norm(ctx, x, NULL, g, 1e-5f, x), CLH_ERR_INVALID_ARGUMENT, "gamma");
    clh_tensor_release(x);
    clh_tensor_release(g);
    clh_tensor_release(g_bad);
    clh_tensor_release(y_bad);
}

/* ------------------------------------------------------------------ softmax */

static void ref_softmax(const float *x, size_t rows, size_t lq, size_t lk, float scale, int causal,
                        float *y) {
    for (size_t r = 0; r < rows; r++) {
        size_t valid = causal ? (r % lq + 1 < lk ? r % lq + 1 : lk) : lk;
        double m = -INFINITY, sum = 0;
        for (size_t c = 0; c < valid; c++)
            m = fmax(m, (double)scale * x[r * lk + c]);
        for (size_t c = 0; c < valid; c++)
            sum += exp((double)scale * x[r * lk + c] - m);
        for (size_t c = 0; c < lk; c++)
            y[r * lk + c] = c < valid ? (float)(exp((double)scale * x[r * lk + c] - m) / sum) : 0;
    }
}

static void check_softmax(clh_ctx *ctx, size_t batch, size_t lq, size_t lk, float scale,
                          int causal) {
    size_t rows = batch * lq, n = rows * lk;
    float *x = tu_random_floats(n, -8, 8, (uint32_t)(lq * 31 + lk)), *want = tu_alloc_floats(n);
    ref_softmax(x, rows, lq, lk, scale, causal, want);
    clh_tensor *tx = tu_put(ctx, 1, DIMS((int64_t)batch, (int64_t)lq, (int64_t)lk), x);
    clh_tensor *ty = tu_nan_tensor(ctx, DIMS((int64_t)batch, (int64_t)lq, (int64_t)lk));
    TU_OK(clh_softmax(ctx, tx, scale, causal, ty));
    assert_tensor_close(ty, want, n, TOL, 1e-7);
    TU_OK(clh_softmax(ctx, tx, scale, causal, tx));
    assert_tensor_close(tx, want, n, TOL, 1e-7);
    clh_tensor_release(tx);
    clh_tensor_release(ty);
    free(x);
    free(want);
}

static void test_softmax(void **state) {
    TU_CTX_OR_SKIP(ctx);
    check_softmax(ctx, 2, 7, 130, 0.37f, 0);
    check_softmax(ctx, 1, 1, 513, 1.0f, 0);
    check_softmax(ctx, 3, 7, 7, 0.5f, 1);  /* causal, square */
    check_softmax(ctx, 2, 5, 9, 1.25f, 1); /* causal, more keys than queries */
    check_softmax(ctx, 1, 33, 5, 1.0f, 1); /* causal, rows past the last key */

    clh_tensor *x = tu_nan_tensor(ctx, DIMS(2, 7, 5)), *y = tu_nan_tensor(ctx, DIMS(2, 5, 7));
    TU_FAILS(clh_softmax(ctx, x, 1, 0, y), CLH_ERR_SHAPE, "[2, 5, 7]");
    clh_tensor_release(x);
    clh_tensor_release(y);
}

/* ------------------------------------------------------------------ L2 norm */

static void test_l2_normalize(void **state) {
    TU_CTX_OR_SKIP(ctx);
    const size_t rows = 7, cols = 77, n = rows * cols;
    float *x = tu_random_floats(n, -2, 2, 80), *want = tu_alloc_floats(n);
    for (size_t c = 0; c < cols; c++)
        x[3 * cols + c] = 0; /* a zero row stays zero, not NaN */
    for (size_t r = 0; r < rows; r++) {
        double ss = 0;
        for (size_t c = 0; c < cols; c++)
            ss += (double)x[r * cols + c] * x[r * cols + c];
        double norm = fmax(sqrt(ss), 1e-12);
        for (size_t c = 0; c < cols; c++)
            want[r * cols + c] = (float)(x[r * cols + c] / norm);
    }
    clh_tensor *tx = tu_put(ctx, 4, DIMS((int64_t)rows, (int64_t)cols), x);
    clh_tensor *ty = tu_nan_tensor(ctx, DIMS((int64_t)rows, (int64_t)cols));
    TU_OK(clh_l2_normalize(ctx, tx, ty));
    assert_tensor_close(ty, want, n, TOL, 1e-7);
    TU_OK(clh_l2_normalize(ctx, tx, tx));
    assert_tensor_close(tx, want, n, TOL, 1e-7);
    clh_tensor *bad = tu_nan_tensor(ctx, DIMS((int64_t)cols, (int64_t)rows));
    TU_FAILS(clh_l2_normalize(ctx, tx, bad), CLH_ERR_SHAPE, "[77, 7]");
    clh_tensor_release(bad);
    clh_tensor_release(tx);
    clh_tensor_release(ty);
    free(x);
    free(want);
}

/* ------------------------------------------------------------------ row-kernel variants */

/* Layer norm, softmax and L2 normalisation have two kernels each: one work-group per row
 * (GPUs) and one work-item per row (CPUs). CLHCLIP_ROW_KERNELS=group|item forces one and
 * is read on every call: the fixtures rerun the reference tests above under each variant,
 * and the tests below run both on the same inputs. */
static int force_group_rows(void **state) {
    (void)state;
    return setenv("CLHCLIP_ROW_KERNELS", "group", 1);
}

static int force_item_rows(void **state) {
    (void)state;
    return setenv("CLHCLIP_ROW_KERNELS", "item", 1);
}

static int auto_rows(void **state) {
    (void)state;
    return unsetenv("CLHCLIP_ROW_KERNELS");
}

#define VARIANT_REL 1e-6 /* the two variants differ only in the order of a row's sum */

enum row_op {
    ROW_LAYER_NORM,
    ROW_SOFTMAX,
    ROW_SOFTMAX_CAUSAL,
    ROW_L2,
    ROW_LAYER_NORM_BACKWARD,        /* dx, from x, gamma = g, dy = b */
    ROW_LAYER_NORM_BACKWARD_PARAMS, /* dgamma then dbeta, from x, gamma = g, dy = b */
    ROW_SOFTMAX_BACKWARD,           /* dx, from y = x, dy = b */
    ROW_L2_BACKWARD,                /* dx, from x, dy = b */
};

/* dgamma and dbeta (accumulated onto zeros) of a layer norm backward, one after the other. */
static float *layer_norm_param_grads(clh_ctx *ctx, clh_tensor *x, clh_tensor *g, clh_tensor *dy) {
    size_t cols = clh_tensor_numel(g);
    float *zeros = calloc(cols, sizeof(float)), *out = tu_alloc_floats(2 * cols);
    clh_tensor *dg = tu_put(ctx, 0, DIMS((int64_t)cols), zeros);
    clh_tensor *db = tu_put(ctx, 0, DIMS((int64_t)cols), zeros);
    TU_OK(clh_layer_norm_backward(ctx, x, g, 1e-5f, dy, NULL, dg, db));
    TU_OK(clh_tensor_download(dg, out, cols));
    TU_OK(clh_tensor_download(db, out + cols, cols));
    clh_tensor_release(dg);
    clh_tensor_release(db);
    free(zeros);
    return out;
}

/* Runs op under the given variant (see enum row_op for the operands); host copy of the
 * result, whose length goes to *n. */
static float *run_row_op(clh_ctx *ctx, const char *variant, enum row_op op, clh_tensor *x,
                         clh_tensor *g, clh_tensor *b, size_t *n) {
    assert_int_equal(setenv("CLHCLIP_ROW_KERNELS", variant, 1), 0);
    if (op == ROW_LAYER_NORM_BACKWARD_PARAMS) {
        *n = 2 * clh_tensor_numel(g);
        return layer_norm_param_grads(ctx, x, g, b);
    }
    int64_t shape[CLH_MAX_DIMS];
    int ndim = clh_tensor_ndim(x);
    for (int i = 0; i < ndim; i++)
        shape[i] = clh_tensor_dim(x, i);
    clh_tensor *y = tu_nan_tensor(ctx, ndim, shape);
    switch (op) {
        case ROW_LAYER_NORM:
            TU_OK(clh_layer_norm(ctx, x, g, b, 1e-5f, y));
            break;
        case ROW_SOFTMAX:
            TU_OK(clh_softmax(ctx, x, 0.125f, 0, y));
            break;
        case ROW_SOFTMAX_CAUSAL:
            TU_OK(clh_softmax(ctx, x, 0.7f, 1, y));
            break;
        case ROW_L2:
            TU_OK(clh_l2_normalize(ctx, x, y));
            break;
        case ROW_LAYER_NORM_BACKWARD:
            TU_OK(clh_layer_norm_backward(ctx, x, g, 1e-5f, b, y, NULL, NULL));
            break;
        case ROW_SOFTMAX_BACKWARD:
            TU_OK(clh_softmax_backward(ctx, x, b, 0.125f, y));
            break;
        case ROW_L2_BACKWARD:
            TU_OK(clh_l2_normalize_backward(ctx, x, b, y));
            break;
        case ROW_LAYER_NORM_BACKWARD_PARAMS:
            break; /* handled above */
    }
    *n = clh_tensor_numel(y);
    float *out = tu_fetch(y);
    clh_tensor_release(y);
    return out;
}

/* Both variants agree within VARIANT_REL, and each gives bit-identical results run to run. */
static void check_variants(clh_ctx *ctx, enum row_op op, clh_tensor *x, clh_tensor *g,
                           clh_tensor *b) {
    size_t n = 0, n_item = 0;
    float *group = run_row_op(ctx, "group", op, x, g, b, &n);
    float *item = run_row_op(ctx, "item", op, x, g, b, &n_item);
    assert_int_equal(n, n_item);
    for (size_t i = 0; i < n; i++)
        if (!isfinite(item[i]) || !isfinite(group[i]))
            fail_msg("op %d element %zu: group %g, item %g", (int)op, i, (double)group[i],
                     (double)item[i]);
    TU_ASSERT_CLOSE(item, group, n, VARIANT_REL, 0.0);
    float *item2 = run_row_op(ctx, "item", op, x, g, b, &n_item);
    float *group2 = run_row_op(ctx, "group", op, x, g, b, &n_item);
    assert_memory_equal(item, item2, n * sizeof *item);
    assert_memory_equal(group, group2, n * sizeof *group);
    free(group);
    free(item);
    free(item2);
    free(group2);
}

static void test_row_variants_agree(void **state) {
    TU_CTX_OR_SKIP(ctx);
    /* ViT-B/16-like widths (768 features, 577 tokens) and ragged ones; odd offsets make the
     * rows unaligned for the item kernels' vector loads. Layer-norm inputs keep |mean| near
     * their spread: with |mean| >> std, one float32 ulp of the row sum (which depends on the
     * summation order) moves the output by more than 1e-6; test_layer_norm checks both
     * variants on such rows against the double reference. */
    static const struct {
        size_t rows, cols;
        float centre, spread;
    } ln[] = {{50, 768, 3, 5}, {13, 77, -1, 2}, {7, 15, 0, 1}, {5, 1, 0, 1}};
    for (size_t s = 0; s < sizeof ln / sizeof ln[0]; s++) {
        size_t rows = ln[s].rows, cols = ln[s].cols;
        float *x = tu_random_floats(rows * cols, ln[s].centre - ln[s].spread,
                                    ln[s].centre + ln[s].spread, 90 + (uint32_t)s);
        float *g = tu_random_floats(cols, 0.5f, 1.5f, 91), *b = tu_random_floats(cols, -1, 1, 92);
        clh_tensor *tx = tu_put(ctx, 3, DIMS((int64_t)rows, (int64_t)cols), x);
        clh_tensor *tg = tu_put(ctx, 1, DIMS((int64_t)cols), g);
        clh_tensor *tb = tu_put(ctx, 5, DIMS((int64_t)cols), b);
        check_variants(ctx, ROW_LAYER_NORM, tx, tg, tb);
        check_variants(ctx, ROW_L2, tx, NULL, NULL);
        float *dy = tu_random_floats(rows * cols, -1, 1, 95 + (uint32_t)s);
        clh_tensor *tdy = tu_put(ctx, 2, DIMS((int64_t)rows, (int64_t)cols), dy);
        check_variants(ctx, ROW_LAYER_NORM_BACKWARD, tx, tg, tdy);
        check_variants(ctx, ROW_LAYER_NORM_BACKWARD_PARAMS, tx, tg, tdy);
        check_variants(ctx, ROW_L2_BACKWARD, tx, NULL, tdy);
        check_variants(ctx, ROW_SOFTMAX_BACKWARD, tx, NULL, tdy);
        clh_tensor_release(tdy);
        free(dy);
        clh_tensor_release(tx);
        clh_tensor_release(tg);
        clh_tensor_release(tb);
        free(x);
        free(g);
        free(b);
    }
    float *x = tu_random_floats(4 * 77 * 577, -40, 40, 93);
    clh_tensor *scores = tu_put(ctx, 1, DIMS(4, 77, 577), x);
    check_variants(ctx, ROW_SOFTMAX, scores, NULL, NULL);
    clh_tensor_release(scores);
    clh_tensor *causal = tu_put(ctx, 2, DIMS(3, 40, 37), x); /* rows past the last key too */
    check_variants(ctx, ROW_SOFTMAX_CAUSAL, causal, NULL, NULL);
    clh_tensor_release(causal);
    free(x);
    assert_int_equal(unsetenv("CLHCLIP_ROW_KERNELS"), 0);
}

/* An unknown CLHCLIP_ROW_KERNELS value means auto: the call still works. */
static void test_row_variant_auto(void **state) {
    TU_CTX_OR_SKIP(ctx);
    float x[6] = {1, 2, 3, -1, 0, 1};
    clh_tensor *tx = tu_put(ctx, 0, DIMS(2, 3), x);
    assert_int_equal(setenv("CLHCLIP_ROW_KERNELS", "auto", 1), 0);
    size_t n = 0;
    float *a = run_row_op(ctx, "auto", ROW_SOFTMAX, tx, NULL, NULL, &n);
    float *b = run_row_op(ctx, "bogus", ROW_SOFTMAX, tx, NULL, NULL, &n);
    const char *expected = clh_ctx_device(ctx)->is_cpu ? "item" : "group";
    float *want = run_row_op(ctx, expected, ROW_SOFTMAX, tx, NULL, NULL, &n);
    assert_memory_equal(a, want, sizeof x);
    assert_memory_equal(b, want, sizeof x);
    free(a);
    free(b);
    free(want);
    clh_tensor_release(tx);
    assert_int_equal(unsetenv("CLHCLIP_ROW_KERNELS"), 0);
}

/* ------------------------------------------------------------------ attention */

static void ref_attention(const float *q, const float *k, const float *v, size_t n, size_t lq,
                          size_t lk, size_t d, int heads, int causal, float *out) {
    size_t hd = d / (size_t)heads;
    double scale = 1.0 / sqrt((double)hd);
    double *p = malloc(lk * sizeof *p);
    assert_non_null(p);
    for (size_t b = 0; b < n; b++)
        for (int h = 0; h < heads; h++)
            for (size_t i = 0; i < lq; i++) {
                const float *qi = q + (b * lq + i) * d + (size_t)h * hd;
                double m = -INFINITY, sum = 0;
                for (size_t j = 0; j < lk; j++) {
                    const float *kj = k + (b * lk + j) * d + (size_t)h * hd;
                    double s = 0;
                    for (size_t e = 0; e < hd; e++)
                        s += (double)qi[e] * kj[e];
                    p[j] = causal && j > i ? -INFINITY : s * scale;
                    m = fmax(m, p[j]);
                }
                for (size_t j = 0; j < lk; j++) {
                    p[j] = exp(p[j] - m);
                    sum += p[j];
                }
                for (size_t e = 0; e < hd; e++) {
                    double acc = 0;
                    for (size_t j = 0; j < lk; j++)
                        acc += p[j] / sum * v[(b * lk + j) * d + (size_t)h * hd + e];
                    out[(b * lq + i) * d + (size_t)h * hd + e] = (float)acc;
                }
            }
    free(p);
}

static void check_attention(clh_ctx *ctx, size_t n, size_t lq, size_t lk, size_t d, int heads,
                            int causal) {
    size_t nq = n * lq * d, nk = n * lk * d;
    float *q = tu_random_floats(nq, -2, 2, 90), *k = tu_random_floats(nk, -2, 2, 91);
    float *v = tu_random_floats(nk, -1, 1, 92), *want = tu_alloc_floats(nq);
    ref_attention(q, k, v, n, lq, lk, d, heads, causal, want);
    clh_tensor *tq = tu_put(ctx, 2, DIMS((int64_t)n, (int64_t)lq, (int64_t)d), q);
    clh_tensor *tk = tu_put(ctx, 0, DIMS((int64_t)n, (int64_t)lk, (int64_t)d), k);
    clh_tensor *tv = tu_put(ctx, 5, DIMS((int64_t)n, (int64_t)lk, (int64_t)d), v);
    clh_tensor *to = tu_nan_tensor(ctx, DIMS((int64_t)n, (int64_t)lq, (int64_t)d));
    TU_OK(clh_attention(ctx, tq, tk, tv, heads, causal, to));
    assert_tensor_close(to, want, nq, TOL, 1e-6);
    TU_OK(clh_attention(ctx, tq, tk, tv, heads, causal, tq)); /* out may be q */
    assert_tensor_close(tq, want, nq, TOL, 1e-6);
    clh_tensor_release(tq);
    clh_tensor_release(tk);
    clh_tensor_release(tv);
    clh_tensor_release(to);
    free(q);
    free(k);
    free(v);
    free(want);
}

static void test_attention(void **state) {
    TU_CTX_OR_SKIP(ctx);
    check_attention(ctx, 2, 7, 7, 12, 3, 0);
    check_attention(ctx, 2, 7, 7, 12, 3, 1);
    check_attention(ctx, 1, 5, 9, 10, 2, 0); /* more keys than queries */
    check_attention(ctx, 3, 1, 1, 8, 8, 1);  /* one token, head_dim 1 */
}

static void test_attention_errors(void **state) {
    TU_CTX_OR_SKIP(ctx);
    clh_tensor *q = tu_nan_tensor(ctx, DIMS(2, 7, 12)), *k = tu_nan_tensor(ctx, DIMS(2, 5, 12));
    clh_tensor *k_bad = tu_nan_tensor(ctx, DIMS(2, 5, 10)),
               *o_bad = tu_nan_tensor(ctx, DIMS(2, 5, 12));
    TU_FAILS(clh_attention(ctx, q, k, k, 5, 0, q), CLH_ERR_SHAPE, "heads = 5");
    TU_FAILS(clh_attention(ctx, q, k_bad, k_bad, 3, 0, q), CLH_ERR_SHAPE, "[2, 5, 10]");
    TU_FAILS(clh_attention(ctx, q, k, k_bad, 3, 0, q), CLH_ERR_SHAPE, "clh_attention");
    TU_FAILS(clh_attention(ctx, q, k, k, 3, 0, o_bad), CLH_ERR_SHAPE, "[2, 7, 12]");
    TU_FAILS(clh_attention(ctx, q, k, k, 0, 0, q), CLH_ERR_SHAPE, "heads = 0");
    clh_tensor_release(q);
    clh_tensor_release(k);
    clh_tensor_release(k_bad);
    clh_tensor_release(o_bad);
}

/* ------------------------------------------------------------------ elementwise */

static void test_activations(void **state) {
    TU_CTX_OR_SKIP(ctx);
    const size_t n = 513;
    float *x = tu_random_floats(n, -6, 6, 100), *want_q = tu_alloc_floats(n),
          *want_g = tu_alloc_floats(n);
    for (size_t i = 0; i < n; i++) {
        double v = x[i];
        want_q[i] = (float)(v / (1.0 + exp(-1.702 * v)));
        want_g[i] = (float)(0.5 * v * (1.0 + erf(v / sqrt(2.0))));
    }
    clh_tensor *tx = tu_put(ctx, 3, DIMS(27, 19), x), *ty = tu_nan_tensor(ctx, DIMS((int64_t)n));
    TU_OK(clh_quick_gelu(ctx, tx, ty));
    assert_tensor_close(ty, want_q, n, TOL, 1e-6);
    TU_OK(clh_gelu(ctx, tx, ty));
    assert_tensor_close(ty, want_g, n, TOL, 1e-6);
    TU_OK(clh_gelu(ctx, tx, tx)); /* in place */
    assert_tensor_close(tx, want_g, n, TOL, 1e-6);
    clh_tensor *bad = tu_nan_tensor(ctx, DIMS(512));
    TU_FAILS(clh_gelu(ctx, tx, bad), CLH_ERR_SHAPE, "[512]");
    TU_FAILS(clh_quick_gelu(ctx, bad, tx), CLH_ERR_SHAPE, "clh_quick_gelu");
    clh_tensor_release(bad);
    clh_tensor_release(tx);
    clh_tensor_release(ty);
    free(x);
    free(want_q);
    free(want_g);
}

static void test_adds(void **state) {
    TU_CTX_OR_SKIP(ctx);
    const size_t n_batch = 3, len = 7, dim = 5, n = n_batch * len * dim;
    float *a = tu_random_floats(n, -1, 1, 110), *b = tu_random_floats(n, -1, 1, 111);
    float *rows = tu_random_floats(len * dim, -1, 1, 112), *want = tu_alloc_floats(n);
    clh_tensor *ta = tu_put(ctx, 1, DIMS((int64_t)n_batch, (int64_t)len, (int64_t)dim), a);
    clh_tensor *tb = tu_put(ctx, 6, DIMS((int64_t)n), b);
    clh_tensor *tr = tu_put(ctx, 2, DIMS((int64_t)len, (int64_t)dim), rows);
    clh_tensor *tbias = tu_put(ctx, 4, DIMS((int64_t)dim), rows); /* first row as a bias */

    for (size_t i = 0; i < n; i++)
        want[i] = a[i] + b[i];
    TU_OK(clh_add(ctx, ta, tb, ta)); /* y aliases a */
    assert_tensor_close(ta, want, n, 0, 0);

    for (size_t i = 0; i < n; i++)
        want[i] += rows[i % (len * dim)];
    TU_OK(clh_add_rows(ctx, ta, tr));
    assert_tensor_close(ta, want, n, TOL, 1e-6);

    for (size_t i = 0; i < n; i++)
        want[i] += rows[i % dim];
    TU_OK(clh_add_bias(ctx, ta, tbias));
    assert_tensor_close(ta, want, n, TOL, 1e-6);

    clh_tensor *short_b = tu_nan_tensor(ctx, DIMS((int64_t)n - 1));
    clh_tensor *wrong_rows = tu_nan_tensor(ctx, DIMS((int64_t)len - 1, (int64_t)dim));
    TU_FAILS(clh_add(ctx, ta, short_b, ta), CLH_ERR_SHAPE, "[104]");
    TU_FAILS(clh_add(ctx, tb, tb, short_b), CLH_ERR_SHAPE, "clh_add");
    TU_FAILS(clh_add_rows(ctx, ta, wrong_rows), CLH_ERR_SHAPE, "[6, 5]");
    TU_FAILS(clh_add_rows(ctx, tb, tr), CLH_ERR_SHAPE, "[105]");
    TU_FAILS(clh_add_bias(ctx, ta, tr), CLH_ERR_SHAPE, "[3, 7, 5]");
    clh_tensor_release(short_b);
    clh_tensor_release(wrong_rows);
    clh_tensor_release(ta);
    clh_tensor_release(tb);
    clh_tensor_release(tr);
    clh_tensor_release(tbias);
    free(a);
    free(b);
    free(rows);
    free(want);
}

/* ------------------------------------------------------------------ gathers */

static void test_embedding_and_gather(void **state) {
    TU_CTX_OR_SKIP(ctx);
    const size_t vocab = 50, dim = 33;
    float *table = tu_random_floats(vocab * dim, -1, 1, 120);
    const int32_t ids[] = {0, 49, 7, 7, 13, 1, 48};
    const size_t n = sizeof ids / sizeof ids[0];
    float *want = tu_alloc_floats(n * dim);
    for (size_t i = 0; i < n; i++)
        memcpy(want + i * dim, table + (size_t)ids[i] * dim, dim * sizeof(float));
    clh_tensor *tt = tu_put(ctx, 3, DIMS((int64_t)vocab, (int64_t)dim), table);
    clh_tensor *ty = tu_nan_tensor(ctx, DIMS((int64_t)n, (int64_t)dim));
    TU_OK(clh_embedding(ctx, ids, n, tt, ty));
    assert_tensor_close(ty, want, n * dim, 0, 0);

    const int32_t bad_high[] = {1, 2, 3, 50}, bad_low[] = {-1};
    TU_FAILS(clh_embedding(ctx, bad_high, 4, tt, ty), CLH_ERR_SHAPE, "[7, 33]");
    TU_FAILS(clh_embedding(ctx, bad_high, 4, tt, ty), CLH_ERR_SHAPE, "[50, 33]");
    clh_tensor *y4 = tu_nan_tensor(ctx, DIMS(4, (int64_t)dim)),
               *y1 = tu_nan_tensor(ctx, DIMS(1, 33));
    TU_FAILS(clh_embedding(ctx, bad_high, 4, tt, y4), CLH_ERR_INVALID_ARGUMENT, "ids[3] = 50");
    TU_FAILS(clh_embedding(ctx, bad_low, 1, tt, y1), CLH_ERR_INVALID_ARGUMENT, "ids[0] = -1");
    TU_FAILS(clh_embedding(ctx, NULL, 1, tt, y1), CLH_ERR_INVALID_ARGUMENT, "NULL");

    /* gather from a [2, 25, 33] sequence tensor viewed as 50 rows */
    clh_tensor *seq = tu_put(ctx, 0, DIMS(2, 25, (int64_t)dim), table);
    const int32_t index[] = {49, 0, 25, 24};
    float *want_g = tu_alloc_floats(4 * dim);
    for (size_t i = 0; i < 4; i++)
        memcpy(want_g + i * dim, table + (size_t)index[i] * dim, dim * sizeof(float));
    TU_OK(clh_gather_rows(ctx, seq, index, 4, y4));
    assert_tensor_close(y4, want_g, 4 * dim, 0, 0);
    const int32_t index_bad[] = {0, 50};
    clh_tensor *y2 = tu_nan_tensor(ctx, DIMS(2, (int64_t)dim));
    TU_FAILS(clh_gather_rows(ctx, seq, index_bad, 2, y2), CLH_ERR_INVALID_ARGUMENT,
             "index[1] = 50");
    TU_FAILS(clh_gather_rows(ctx, seq, index, 4, y2), CLH_ERR_SHAPE, "[2, 33]");
    clh_tensor_release(y2);
    clh_tensor_release(seq);
    clh_tensor_release(y4);
    clh_tensor_release(y1);
    clh_tensor_release(tt);
    clh_tensor_release(ty);
    free(table);
    free(want);
    free(want_g);
}

/* ------------------------------------------------------------------ patch embedding */

static void test_patch_embed(void **state) {
    TU_CTX_OR_SKIP(ctx);
    const size_t nb = 2, ch = 3, h = 10, w = 15, p = 5, d = 7, gh = h / p, gw = w / p;
    float *img = tu_random_floats(nb * ch * h * w, -1, 1, 130);
    float *wt = tu_random_floats(d * ch * p * p, -0.2f, 0.2f, 131);
    float *want = tu_alloc_floats(nb * gh * gw * d);
    for (size_t b = 0; b < nb; b++)
        for (size_t py = 0; py < gh; py++)
            for (size_t px = 0; px < gw; px++)
                for (size_t o = 0; o < d; o++) {
                    double acc = 0;
                    for (size_t c = 0; c < ch; c++)
                        for (size_t ky = 0; ky < p; ky++)
                            for (size_t kx = 0; kx < p; kx++)
                                acc += (double)wt[((o * ch + c) * p + ky) * p + kx] *
                                       img[((b * ch + c) * h + py * p + ky) * w + px * p + kx];
                    want[((b * gh + py) * gw + px) * d + o] = (float)acc;
                }
    clh_tensor *ti = tu_put(ctx, 1, DIMS((int64_t)nb, (int64_t)ch, (int64_t)h, (int64_t)w), img);
    clh_tensor *tw = tu_put(ctx, 0, DIMS((int64_t)d, (int64_t)ch, (int64_t)p, (int64_t)p), wt);
    clh_tensor *to = tu_nan_tensor(ctx, DIMS((int64_t)nb, (int64_t)(gh * gw), (int64_t)d));
    TU_OK(clh_patch_embed(ctx, ti, tw, to));
    assert_tensor_close(to, want, nb * gh * gw * d, 0,
                        gemm_tol(ch * p * p, 1, img, nb * ch * h * w, wt, d * ch * p * p));

    clh_tensor *w_c = tu_nan_tensor(ctx, DIMS(7, 2, 5, 5)),
               *w_p = tu_nan_tensor(ctx, DIMS(7, 3, 4, 4));
    clh_tensor *o_bad = tu_nan_tensor(ctx, DIMS(2, 5, 7));
    TU_FAILS(clh_patch_embed(ctx, ti, w_c, to), CLH_ERR_SHAPE, "[7, 2, 5, 5]");
    TU_FAILS(clh_patch_embed(ctx, ti, w_p, to), CLH_ERR_SHAPE, "multiples of the patch size 4");
    TU_FAILS(clh_patch_embed(ctx, ti, tw, o_bad), CLH_ERR_SHAPE, "[2, 5, 7]");
    clh_tensor_release(w_c);
    clh_tensor_release(w_p);
    clh_tensor_release(o_bad);
    clh_tensor_release(ti);
    clh_tensor_release(tw);
    clh_tensor_release(to);
    free(img);
    free(wt);
    free(want);
}

/* ------------------------------------------------------------------ bicubic */

/* Reference of torch.nn.functional.interpolate(mode="bicubic", align_corners=False) in
 * fp32, with the same fused multiply-adds as kernels/embed.cl. Checked offline against
 * torch 2.x: max |diff| 1.5e-7 of max |y| over 10 shape pairs (up and down). */
static float cubic_near(float x) {
    const float a = -0.75f;
    return ((a + 2.0f) * x - (a + 3.0f)) * x * x + 1.0f;
}

static float cubic_far(float x) {
    const float a = -0.75f;
    float p = fmaf(fmaf(a, x, -5.0f * a), x, 8.0f * a);
    return p * x - 4.0f * a;
}

static int cubic_taps(int dst, float scale, int in_size, float *w) {
    float src = fmaf(scale, (float)dst + 0.5f, -0.5f);
    int i0 = (int)floorf(src);
    if (i0 > in_size - 1)
        i0 = in_size - 1;
    float t = fminf(fmaxf(src - (float)i0, 0.0f), 1.0f), u = 1.0f - t;
    w[0] = cubic_far(t + 1.0f);
    w[1] = cubic_near(t);
    w[2] = cubic_near(u);
    w[3] = cubic_far(u + 1.0f);
    return i0;
}

static int clamp_int(int v, int lo, int hi) {
    return v < lo ? lo : v > hi ? hi : v;
}

static void ref_bicubic(const float *x, int ch, int h, int w, int h2, int w2, float *y) {
    float sh = (float)h / (float)h2, sw = (float)w / (float)w2;
    for (int c = 0; c < ch; c++)
        for (int oy = 0; oy < h2; oy++)
            for (int ox = 0; ox < w2; ox++) {
                float wx[4], wy[4];
                int x0 = cubic_taps(ox, sw, w, wx), y0 = cubic_taps(oy, sh, h, wy);
                float out = 0;
                for (int i = 0; i < 4; i++) {
                    const float *row = x + ((size_t)c * h + clamp_int(y0 - 1 + i, 0, h - 1)) * w;
                    float acc = row[clamp_int(x0 - 1, 0, w - 1)] * wx[0];
                    for (int j = 1; j < 4; j++)
                        acc = fmaf(row[clamp_int(x0 - 1 + j, 0, w - 1)], wx[j], acc);
                    out = i == 0 ? acc * wy[0] : fmaf(acc, wy[i], out);
                }
                y[((size_t)c * h2 + oy) * w2 + ox] = out;
            }
}

static void test_bicubic(void **state) {
    TU_CTX_OR_SKIP(ctx);
    static const int cases[][5] = {
        {3, 7, 7, 14, 14}, {2, 5, 9, 13, 4}, {1, 16, 16, 5, 3}, {4, 7, 7, 7, 7}, {1, 1, 5, 3, 8}};
    for (size_t s = 0; s < sizeof cases / sizeof cases[0]; s++) {
        const int *k = cases[s];
        size_t nin = (size_t)k[0] * k[1] * k[2], nout = (size_t)k[0] * k[3] * k[4];
        float *x = tu_random_floats(nin, -3, 3, 140 + (uint32_t)s), *want = tu_alloc_floats(nout);
        ref_bicubic(x, k[0], k[1], k[2], k[3], k[4], want);
        if (k[1] == k[3] && k[2] == k[4]) /* same size: the identity */
            for (size_t i = 0; i < nin; i++)
                assert_true(want[i] == x[i]);
        clh_tensor *tx = tu_put(ctx, 5, DIMS(k[0], k[1], k[2]), x);
        clh_tensor *ty = tu_nan_tensor(ctx, DIMS(k[0], k[3], k[4]));
        TU_OK(clh_bicubic_resize(ctx, tx, ty));
        assert_tensor_close(ty, want, nout, 1e-6, 0);
        clh_tensor_release(tx);
        clh_tensor_release(ty);
        free(x);
        free(want);
    }
    clh_tensor *x = tu_nan_tensor(ctx, DIMS(3, 7, 7)), *y = tu_nan_tensor(ctx, DIMS(2, 14, 14));
    TU_FAILS(clh_bicubic_resize(ctx, x, y), CLH_ERR_SHAPE, "[2, 14, 14]");
    TU_FAILS(clh_bicubic_resize(ctx, x, x), CLH_ERR_INVALID_ARGUMENT, "alias");
    clh_tensor_release(x);
    clh_tensor_release(y);
}

/* ------------------------------------------------------------------ misc errors */

static void test_null_arguments(void **state) {
    TU_CTX_OR_SKIP(ctx);
    clh_tensor *x = tu_nan_tensor(ctx, DIMS(2, 3));
    TU_FAILS(clh_gelu(NULL, x, x), CLH_ERR_INVALID_ARGUMENT, "NULL context");
    TU_FAILS(clh_add(ctx, x, NULL, x), CLH_ERR_INVALID_ARGUMENT, "tensor b is NULL");
    TU_FAILS(clh_softmax(ctx, NULL, 1, 0, x), CLH_ERR_INVALID_ARGUMENT, "clh_softmax");
    clh_tensor_release(x);
}

static int teardown(void **state) {
    tu_ctx_teardown();
    return 0;
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_gemm_transposes),
        cmocka_unit_test(test_gemm_beta_zero_ignores_c),
        cmocka_unit_test(test_gemm_batched),
        cmocka_unit_test(test_gemm_errors),
        cmocka_unit_test(test_linear),
        cmocka_unit_test(test_layer_norm),
        cmocka_unit_test(test_layer_norm_errors),
        cmocka_unit_test(test_softmax),
        cmocka_unit_test(test_l2_normalize),
        cmocka_unit_test_setup_teardown(test_layer_norm, force_group_rows, auto_rows),
        cmocka_unit_test_setup_teardown(test_softmax, force_group_rows, auto_rows),
        cmocka_unit_test_setup_teardown(test_l2_normalize, force_group_rows, auto_rows),
        cmocka_unit_test_setup_teardown(test_attention, force_group_rows, auto_rows),
        cmocka_unit_test_setup_teardown(test_layer_norm, force_item_rows, auto_rows),
        cmocka_unit_test_setup_teardown(test_softmax, force_item_rows, auto_rows),
        cmocka_unit_test_setup_teardown(test_l2_normalize, force_item_rows, auto_rows),
        cmocka_unit_test_setup_teardown(test_attention, force_item_rows, auto_rows),
        cmocka_unit_test_setup_teardown(test_row_variants_agree, NULL, auto_rows),
        cmocka_unit_test_setup_teardown(test_row_variant_auto, NULL, auto_rows),
        cmocka_unit_test(test_attention),
        cmocka_unit_test(test_attention_errors),
        cmocka_unit_test(test_activations),
        cmocka_unit_test(test_adds),
        cmocka_unit_test(test_embedding_and_gather),
        cmocka_unit_test(test_patch_embed),
        cmocka_unit_test(test_bicubic),
        cmocka_unit_test(test_null_arguments),
    };
    return cmocka_run_group_tests_name("ops", tests, NULL, teardown);
}
