/* Backward layers (hclip.h "layers (backward)").
 *
 * For every backward function a plain C forward and backward in double precision are
 * written here; the C backward is checked against central finite differences of the C
 * forward (h = 1e-6, relative error <= 1e-6 of the largest gradient), and the device
 * backward (float) against the C backward on odd shapes. Also: accumulation of parameter
 * gradients, NULL outputs, documented aliasing, shape and argument errors. The largest
 * errors seen per function are printed at the end. */
#include "testutil.h"

#include "hclip.h"

/* finite differences vs the C backward: relative to max |grad| */
#define FD_STEP 1e-6
#define FD_TOL  1e-6
/* device vs C: row-wise results relative to max |want|; sums of K products relative to
 * K * max|a| * max|b| */
#define ROW_TOL  1e-5
#define GEMM_TOL 1e-6

#define SHAPE(...) ((const int64_t[]){__VA_ARGS__})
#define NDIM(...)  ((int)(sizeof((int64_t[]){__VA_ARGS__}) / sizeof(int64_t)))
#define DIMS(...)  NDIM(__VA_ARGS__), SHAPE(__VA_ARGS__)

/* ------------------------------------------------------------------ error report */

typedef struct err_stat {
    const char *name;
    double fd, dev; /* largest relative errors seen */
} err_stat;

static err_stat stats_[24];
static int n_stats_;

static void note_error(const char *name, int is_fd, double rel) {
    int i = 0;
    while (i < n_stats_ && strcmp(stats_[i].name, name) != 0)
        i++;
    if (i == n_stats_) {
        if (n_stats_ == (int)(sizeof stats_ / sizeof stats_[0]))
            return;
        stats_[n_stats_++] = (err_stat){name, -1, -1};
    }
    double *slot = is_fd ? &stats_[i].fd : &stats_[i].dev;
    if (rel > *slot)
        *slot = rel;
}

/* ------------------------------------------------------------------ host helpers */

static double max_abs_f(const float *x, size_t n) {
    double m = 0;
    for (size_t i = 0; i < n; i++)
        m = fmax(m, fabs((double)x[i]));
    return m;
}

/* ------------------------------------------------------------------ device helpers */

/* Device result vs double reference: max|got - want| <= tol. The error relative to
 * max|want| is recorded under name. */
static void expect_close(const char *name, const clh_tensor *t, const double *want, size_t n,
                         double tol) {
    assert_int_equal(clh_tensor_numel(t), n);
    float *got = tu_fetch(t);
    double err = 0, mag = tu_max_abs(want, n);
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(got[i]))
            fail_msg("%s: element %zu is %g, expected %g", name, i, (double)got[i], want[i]);
        err = fmax(err, fabs((double)got[i] - want[i]));
    }
    note_error(name, 0, mag > 0 ? err / mag : err);
    if (!(err <= tol))
        fail_msg("%s: max abs err %.3g > tol %.3g (max |want| %.3g)", name, err, tol, mag);
    free(got);
}

/* Tolerance of a row-wise result and of a sum of k products of a and b. */
static double row_tol(const double *want, size_t n) {
    return ROW_TOL * tu_max_abs(want, n) + 1e-30;
}

static double gemm_tol(size_t k, double max_a, double max_b) {
    return GEMM_TOL * (double)k * max_a * max_b + 1e-30;
}

/* ------------------------------------------------------------------ finite differences */

/* A scalar loss of some inputs: sum(dy * forward(inputs)) for a fixed dy. */
typedef double (*loss_fn)(const void *problem);

/* Central differences of loss with respect to every element of x (part of the problem)
 * against the analytic gradient; asserts and records the relative error. */
static void fd_check(const char *name, loss_fn loss, const void *problem, double *x, size_t n,
                     const double *analytic) {
    double err = 0, mag = tu_max_abs(analytic, n);
    for (size_t i = 0; i < n; i++) {
        double saved = x[i];
        x[i] = saved + FD_STEP;
        double up = loss(problem);
        x[i] = saved - FD_STEP;
        double down = loss(problem);
        x[i] = saved;
        err = fmax(err, fabs((up - down) / (2 * FD_STEP) - analytic[i]));
    }
    double rel = mag > 0 ? err / mag : err;
    note_error(name, 1, rel);
    if (!(rel <= FD_TOL))
        fail_msg("%s: finite differences differ by %.3g relative (max |grad| %.3g)", name, rel,
                 mag);
}

/* ================================================================== linear */

static void ref_linear(const double *x, const double *w, const double *b, size_t rows, size_t in,
                       size_t out, double *y) {
    for (size_t r = 0; r < rows; r++)
        for (size_t o = 0; o < out; o++) {
            double acc = b ? b[o] : 0.0;
            for (size_t i = 0; i < in; i++)
                acc += x[r * in + i] * w[o * in + i];
            y[r * out + o] = acc;
        }
}

/* dx = dy W; dw = dy^T x; db = column sums of dy (all overwritten). */
static void ref_linear_backward(const double *x, const double *w, const double *dy, size_t rows,
                                size_t in, size_t out, double *dx, double *dw, double *db) {
    for (size_t r = 0; r < rows; r++)
        for (size_t i = 0; i < in; i++) {
            double acc = 0;
            for (size_t o = 0; o < out; o++)
                acc += dy[r * out + o] * w[o * in + i];
            dx[r * in + i] = acc;
        }
    for (size_t o = 0; o < out; o++) {
        for (size_t i = 0; i < in; i++) {
            double acc = 0;
            for (size_t r = 0; r < rows; r++)
                acc += dy[r * out + o] * x[r * in + i];
            dw[o * in + i] = acc;
        }
        double acc = 0;
        for (size_t r = 0; r < rows; r++)
            acc += dy[r * out + o];
        db[o] = acc;
    }
}

typedef struct linear_problem {
    double *x, *w, *b, *dy;
    size_t rows, in, out;
} linear_problem;

static double linear_loss(const void *p_) {
    const linear_problem *p = p_;
    double *y = tu_alloc_doubles(p->rows * p->out);
    ref_linear(p->x, p->w, p->b, p->rows, p->in, p->out, y);
    double l = tu_dot(y, p->dy, p->rows * p->out);
    free(y);
    return l;
}

static void test_linear_backward_fd(void **state) {
    (void)state;
    const size_t rows = 3, in = 5, out = 4;
    float *xf = tu_random_floats(rows * in, -1, 1, 1), *wf = tu_random_floats(out * in, -1, 1, 2);
    float *bf = tu_random_floats(out, -1, 1, 3), *dyf = tu_random_floats(rows * out, -1, 1, 4);
    linear_problem p = {tu_to_double(xf, rows * in),
                        tu_to_double(wf, out * in),
                        tu_to_double(bf, out),
                        tu_to_double(dyf, rows * out),
                        rows,
                        in,
                        out};
    double *dx = tu_alloc_doubles(rows * in), *dw = tu_alloc_doubles(out * in),
           *db = tu_alloc_doubles(out);
    ref_linear_backward(p.x, p.w, p.dy, rows, in, out, dx, dw, db);
    fd_check("linear_backward", linear_loss, &p, p.x, rows * in, dx);
    fd_check("linear_backward", linear_loss, &p, p.w, out * in, dw);
    fd_check("linear_backward", linear_loss, &p, p.b, out, db);
    free(xf);
    free(wf);
    free(bf);
    free(dyf);
    free(p.w);
    free(p.b);
    free(p.dy);
    free(dx);
    free(dw);
    free(db);
    free(p.x);
}

/* One device case: x [rows, in] (as [3, rows/3, in] when rows is a multiple of 3 > 3). */
static void check_linear_case(clh_ctx *ctx, size_t rows, size_t in, size_t out, uint32_t seed) {
    float *x = tu_random_floats(rows * in, -1, 1, seed),
          *w = tu_random_floats(out * in, -1, 1, seed + 1);
    float *dy = tu_random_floats(rows * out, -1, 1, seed + 2);
    float *dw0 = tu_random_floats(out * in, -1, 1, seed + 3),
          *db0 = tu_random_floats(out, -1, 1, seed + 4);
    double *xd = tu_to_double(x, rows * in), *wd = tu_to_double(w, out * in);
    double *dyd = tu_to_double(dy, rows * out);
    double *dx = tu_alloc_doubles(rows * in), *dw = tu_alloc_doubles(out * in),
           *db = tu_alloc_doubles(out);
    ref_linear_backward(xd, wd, dyd, rows, in, out, dx, dw, db);

    int split = rows > 3 && rows % 3 == 0;
    clh_tensor *tx = split ? tu_put(ctx, 5, DIMS(3, (int64_t)rows / 3, (int64_t)in), x)
                           : tu_put(ctx, 5, DIMS((int64_t)rows, (int64_t)in), x);
    clh_tensor *tw = tu_put(ctx, 0, DIMS((int64_t)out, (int64_t)in), w);
    clh_tensor *tdy = tu_put(ctx, 2, DIMS((int64_t)rows, (int64_t)out), dy);
    clh_tensor *tdx = tu_put(ctx, 1, clh_tensor_ndim(tx), clh_tensor_shape(tx), NULL);
    clh_tensor *tdw = tu_put(ctx, 3, DIMS((int64_t)out, (int64_t)in), dw0);
    clh_tensor *tdb = tu_put(ctx, 7, DIMS((int64_t)out), db0);
    TU_OK(clh_linear_backward(ctx, tx, tw, tdy, tdx, tdw, tdb));

    double mdy = max_abs_f(dy, rows * out);
    double *want_w = tu_alloc_doubles(out * in), *want_b = tu_alloc_doubles(out);
    for (size_t i = 0; i < out * in; i++)
        want_w[i] = dw0[i] + dw[i]; /* accumulated onto the initial values */
    for (size_t i = 0; i < out; i++)
        want_b[i] = db0[i] + db[i];
    expect_close("linear_backward", tdx, dx, rows * in, gemm_tol(out, mdy, max_abs_f(w, out * in)));
    double tol_w = gemm_tol(rows, mdy, max_abs_f(x, rows * in)) + 1e-7;
    expect_close("linear_backward", tdw, want_w, out * in, tol_w);
    expect_close("linear_backward", tdb, want_b, out, gemm_tol(rows, mdy, 1) + 1e-7);

    /* a second call adds the parameter gradients again; dx is overwritten, not added */
    TU_OK(clh_linear_backward(ctx, tx, tw, tdy, tdx, tdw, tdb));
    for (size_t i = 0; i < out * in; i++)
        want_w[i] += dw[i];
    for (size_t i = 0; i < out; i++)
        want_b[i] += db[i];
    expect_close("linear_backward", tdx, dx, rows * in, gemm_tol(out, mdy, max_abs_f(w, out * in)));
    expect_close("linear_backward", tdw, want_w, out * in, 2 * tol_w);
    expect_close("linear_backward", tdb, want_b, out, 2 * gemm_tol(rows, mdy, 1) + 2e-7);

    clh_tensor_release(tx);
    clh_tensor_release(tw);
    clh_tensor_release(tdy);
    clh_tensor_release(tdx);
    clh_tensor_release(tdw);
    clh_tensor_release(tdb);
    free(x);
    free(w);
    free(dy);
    free(dw0);
    free(db0);
    free(xd);
    free(wd);
    free(dyd);
    free(dx);
    free(dw);
    free(db);
    free(want_w);
    free(want_b);
}

static void test_linear_backward(void **state) {
    TU_CTX_OR_SKIP(ctx);
    static const size_t rows[] = {1, 3, 7, 33};
    static const size_t widths[][2] = {{5, 77}, {77, 130}, {130, 5}};
    uint32_t seed = 100;
    for (size_t r = 0; r < sizeof rows / sizeof rows[0]; r++)
        for (size_t w = 0; w < sizeof widths / sizeof widths[0]; w++, seed += 10)
            check_linear_case(ctx, rows[r], widths[w][0], widths[w][1], seed);
    /* more rows than one tile of the two-stage bias sum */
    check_linear_case(ctx, 5000, 5, 3, 200);
}

/* NULL outputs are skipped; dx may alias x (dw is computed first). */
static void test_linear_backward_null_and_alias(void **state) {
    TU_CTX_OR_SKIP(ctx);
    const size_t rows = 7, in = 5, out = 77;
    float *x = tu_random_floats(rows * in, -1, 1, 300), *w = tu_random_floats(out * in, -1, 1, 301);
    float *dy = tu_random_floats(rows * out, -1, 1, 302);
    double *xd = tu_to_double(x, rows * in), *wd = tu_to_double(w, out * in);
    double *dyd = tu_to_double(dy, rows * out);
    double *dx = tu_alloc_doubles(rows * in), *dw = tu_alloc_doubles(out * in),
           *db = tu_alloc_doubles(out);
    ref_linear_backward(xd, wd, dyd, rows, in, out, dx, dw, db);
    double mdy = max_abs_f(dy, rows * out);
    double tol_x = gemm_tol(out, mdy, 1), tol_w = gemm_tol(rows, mdy, 1);

    clh_tensor *tx = tu_put(ctx, 0, DIMS((int64_t)rows, (int64_t)in), x);
    clh_tensor *tw = tu_put(ctx, 0, DIMS((int64_t)out, (int64_t)in), w);
    clh_tensor *tdy = tu_put(ctx, 0, DIMS((int64_t)rows, (int64_t)out), dy);
    clh_tensor *tdx = tu_nan_tensor(ctx, DIMS((int64_t)rows, (int64_t)in));
    clh_tensor *tdw = tu_nan_tensor(ctx, DIMS((int64_t)out, (int64_t)in));
    clh_tensor *tdb = tu_nan_tensor(ctx, DIMS((int64_t)out));

    TU_OK(clh_linear_backward(ctx, tx, tw, tdy, tdx, NULL, NULL));
    expect_close("linear_backward", tdx, dx, rows * in, tol_x);
    TU_OK(clh_tensor_fill(tdw, 0));
    TU_OK(clh_linear_backward(ctx, tx, tw, tdy, NULL, tdw, NULL));
    expect_close("linear_backward", tdw, dw, out * in, tol_w);
    TU_OK(clh_tensor_fill(tdb, 0));
    TU_OK(clh_linear_backward(ctx, tx, tw, tdy, NULL, NULL, tdb));
    expect_close("linear_backward", tdb, db, out, tol_w);
    TU_OK(clh_linear_backward(ctx, tx, tw, tdy, NULL, NULL, NULL));

    /* dx written over x: dw must still see the original x */
    TU_OK(clh_tensor_fill(tdw, 0));
    TU_OK(clh_linear_backward(ctx, tx, tw, tdy, tx, tdw, NULL));
    expect_close("linear_backward", tdw, dw, out * in, tol_w);
    expect_close("linear_backward", tx, dx, rows * in, tol_x);

    /* no rows: parameter gradients keep their values; no outputs: dx is zero */
    clh_tensor *x0 = tu_nan_tensor(ctx, DIMS(0, (int64_t)in)),
               *dy0 = tu_nan_tensor(ctx, DIMS(0, (int64_t)out));
    TU_OK(clh_linear_backward(ctx, x0, tw, dy0, x0, tdw, tdb));
    expect_close("linear_backward", tdw, dw, out * in, tol_w);
    expect_close("linear_backward", tdb, db, out, tol_w);
    clh_tensor *w_none = tu_nan_tensor(ctx, DIMS(0, (int64_t)in)),
               *dy_none = tu_nan_tensor(ctx, DIMS((int64_t)rows, 0));
    double zeros[7 * 5] = {0};
    TU_OK(clh_linear_backward(ctx, tx, w_none, dy_none, tdx, NULL, NULL));
    expect_close("linear_backward", tdx, zeros, rows * in, 0);

    clh_tensor *all[] = {tx, tw, tdy, tdx, tdw, tdb, x0, dy0, w_none, dy_none};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        clh_tensor_release(all[i]);
    void *mem[] = {x, w, dy, xd, wd, dyd, dx, dw, db};
    for (size_t i = 0; i < sizeof mem / sizeof mem[0]; i++)
        free(mem[i]);
}

static void test_linear_backward_errors(void **state) {
    TU_CTX_OR_SKIP(ctx);
    clh_tensor *x = tu_nan_tensor(ctx, DIMS(2, 7, 5)), *w = tu_nan_tensor(ctx, DIMS(6, 5));
    clh_tensor *dy = tu_nan_tensor(ctx, DIMS(14, 6)), *dx = tu_nan_tensor(ctx, DIMS(14, 5));
    clh_tensor *dw = tu_nan_tensor(ctx, DIMS(6, 5)), *db = tu_nan_tensor(ctx, DIMS(6));
    clh_tensor *dy_bad = tu_nan_tensor(ctx, DIMS(13, 6)), *w_bad = tu_nan_tensor(ctx, DIMS(6, 4));
    clh_tensor *dw_bad = tu_nan_tensor(ctx, DIMS(5, 6)), *db_bad = tu_nan_tensor(ctx, DIMS(5));
    clh_tensor *dx_bad = tu_nan_tensor(ctx, DIMS(14, 6));
    TU_FAILS(clh_linear_backward(ctx, x, w, dy_bad, dx, dw, db), CLH_ERR_SHAPE, "[13, 6]");
    TU_FAILS(clh_linear_backward(ctx, x, w, dy_bad, dx, dw, db), CLH_ERR_SHAPE, "x [2, 7, 5]");
    TU_FAILS(clh_linear_backward(ctx, x, w_bad, dy, dx, dw, db), CLH_ERR_SHAPE, "[6, 4]");
    TU_FAILS(clh_linear_backward(ctx, x, w, dy, dx, dw_bad, db), CLH_ERR_SHAPE,
             "clh_linear_backward: dw must have w's shape (w [6, 5], dw [5, 6])");
    TU_FAILS(clh_linear_backward(ctx, x, w, dy, dx, dw, db_bad), CLH_ERR_SHAPE, "db [5]");
    TU_FAILS(clh_linear_backward(ctx, x, w, dy, dx_bad, dw, db), CLH_ERR_SHAPE, "dx [14, 6]");
    TU_FAILS(clh_linear_backward(ctx, x, w, NULL, dx, dw, db), CLH_ERR_INVALID_ARGUMENT,
             "tensor dy is NULL");
    TU_FAILS(clh_linear_backward(NULL, x, w, dy, dx, dw, db), CLH_ERR_INVALID_ARGUMENT,
             "NULL context");
    /* GEMM outputs must not overlap their inputs */
    clh_tensor *sq_w = tu_nan_tensor(ctx, DIMS(5, 5)), *sq_dy = tu_nan_tensor(ctx, DIMS(14, 5));
    TU_FAILS(clh_linear_backward(ctx, x, sq_w, sq_dy, sq_dy, NULL, NULL), CLH_ERR_INVALID_ARGUMENT,
             "dx must not alias dy");
    clh_tensor *xw = tu_nan_tensor(ctx, DIMS(5, 5));
    TU_FAILS(clh_linear_backward(ctx, xw, sq_w, xw, NULL, xw, NULL), CLH_ERR_INVALID_ARGUMENT,
             "dw must not alias x");
    clh_tensor *all[] = {x,     w,      dy,     dx,     dw,   db,    dy_bad,
                         w_bad, dw_bad, db_bad, dx_bad, sq_w, sq_dy, xw};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        clh_tensor_release(all[i]);
}

/* ================================================================== layer norm */

static void ref_layer_norm(const double *x, const double *g, const double *b, size_t rows,
                           size_t cols, double eps, double *y) {
    for (size_t r = 0; r < rows; r++) {
        const double *xr = x + r * cols;
        double mean = 0, var = 0;
        for (size_t c = 0; c < cols; c++)
            mean += xr[c];
        mean /= (double)cols;
        for (size_t c = 0; c < cols; c++)
            var += (xr[c] - mean) * (xr[c] - mean);
        var /= (double)cols;
        for (size_t c = 0; c < cols; c++)
            y[r * cols + c] = (xr[c] - mean) / sqrt(var + eps) * g[c] + b[c];
    }
}

/* dx = rstd (g - mean(g) - xhat mean(g xhat)), g = dy gamma; dgamma = sum dy xhat;
 * dbeta = sum dy (all overwritten). */
static void ref_layer_norm_backward(const double *x, const double *gamma, const double *dy,
                                    size_t rows, size_t cols, double eps, double *dx,
                                    double *dgamma, double *dbeta) {
    memset(dgamma, 0, cols * sizeof *dgamma);
    memset(dbeta, 0, cols * sizeof *dbeta);
    for (size_t r = 0; r < rows; r++) {
        const double *xr = x + r * cols, *dyr = dy + r * cols;
        double mean = 0, var = 0;
        for (size_t c = 0; c < cols; c++)
            mean += xr[c];
        mean /= (double)cols;
        for (size_t c = 0; c < cols; c++)
            var += (xr[c] - mean) * (xr[c] - mean);
        var /= (double)cols;
        double rstd = 1 / sqrt(var + eps), mean_g = 0, mean_gx = 0;
        for (size_t c = 0; c < cols; c++) {
            double xhat = (xr[c] - mean) * rstd;
            mean_g += dyr[c] * gamma[c];
            mean_gx += dyr[c] * gamma[c] * xhat;
            dgamma[c] += dyr[c] * xhat;
            dbeta[c] += dyr[c];
        }
        mean_g /= (double)cols;
        mean_gx /= (double)cols;
        for (size_t c = 0; c < cols; c++) {
            double xhat = (xr[c] - mean) * rstd;
            dx[r * cols + c] = rstd * (dyr[c] * gamma[c] - mean_g - xhat * mean_gx);
        }
    }
}

static double max_abs_xhat(const double *x, size_t rows, size_t cols, double eps) {
    double *y = tu_alloc_doubles(rows * cols), *ones = tu_alloc_doubles(cols),
           *zeros = tu_alloc_doubles(cols);
    for (size_t c = 0; c < cols; c++)
        ones[c] = 1;
    ref_layer_norm(x, ones, zeros, rows, cols, eps, y);
    double m = tu_max_abs(y, rows * cols);
    free(y);
    free(ones);
    free(zeros);
    return m;
}

typedef struct ln_problem {
    double *x, *gamma, *beta, *dy;
    size_t rows, cols;
    double eps;
} ln_problem;

static double ln_loss(const void *p_) {
    const ln_problem *p = p_;
    size_t n = p->rows * p->cols;
    double *y = tu_alloc_doubles(n);
    ref_layer_norm(p->x, p->gamma, p->beta, p->rows, p->cols, p->eps, y);
    double l = tu_dot(y, p->dy, n);
    free(y);
    return l;
}

static void test_layer_norm_backward_fd(void **state) {
    (void)state;
    static const size_t shapes[][2] = {{1, 5}, {3, 7}, {2, 1}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        size_t rows = shapes[s][0], cols = shapes[s][1], n = rows * cols;
        float *xf = tu_random_floats(n, -2, 3, 10 + (uint32_t)s),
              *gf = tu_random_floats(cols, 0.5f, 1.5f, 11);
        float *bf = tu_random_floats(cols, -1, 1, 12), *dyf = tu_random_floats(n, -1, 1, 13);
        ln_problem p = {tu_to_double(xf, n),
                        tu_to_double(gf, cols),
                        tu_to_double(bf, cols),
                        tu_to_double(dyf, n),
                        rows,
                        cols,
                        1e-5};
        double *dx = tu_alloc_doubles(n), *dg = tu_alloc_doubles(cols),
               *db = tu_alloc_doubles(cols);
        ref_layer_norm_backward(p.x, p.gamma, p.dy, rows, cols, p.eps, dx, dg, db);
        fd_check("layer_norm_backward", ln_loss, &p, p.x, n, dx);
        fd_check("layer_norm_backward", ln_loss, &p, p.gamma, cols, dg);
        fd_check("layer_norm_backward", ln_loss, &p, p.beta, cols, db);
        free(xf);
        free(gf);
        free(bf);
        free(dyf);
        free(p.x);
        free(p.gamma);
        free(p.beta);
        free(p.dy);
        free(dx);
        free(dg);
        free(db);
    }
}

static void check_layer_norm_case(clh_ctx *ctx, size_t rows, size_t cols, uint32_t seed) {
    size_t n = rows * cols;
    const float eps = 1e-5f;
    float *x = tu_random_floats(n, -1.5f, 2.5f, seed),
          *g = tu_random_floats(cols, 0.5f, 1.5f, seed + 1);
    float *dy = tu_random_floats(n, -1, 1, seed + 2);
    float *dg0 = tu_random_floats(cols, -1, 1, seed + 3),
          *db0 = tu_random_floats(cols, -1, 1, seed + 4);
    double *xd = tu_to_double(x, n), *gd = tu_to_double(g, cols), *dyd = tu_to_double(dy, n);
    double *dx = tu_alloc_doubles(n), *dg = tu_alloc_doubles(cols), *db = tu_alloc_doubles(cols);
    ref_layer_norm_backward(xd, gd, dyd, rows, cols, eps, dx, dg, db);

    clh_tensor *tx = tu_put(ctx, 3, DIMS((int64_t)rows, (int64_t)cols), x);
    clh_tensor *tg = tu_put(ctx, 1, DIMS((int64_t)cols), g);
    clh_tensor *tdy = tu_put(ctx, 0, DIMS((int64_t)rows, (int64_t)cols), dy);
    clh_tensor *tdx = tu_put(ctx, 5, DIMS((int64_t)rows, (int64_t)cols), NULL);
    clh_tensor *tdg = tu_put(ctx, 2, DIMS((int64_t)cols), dg0);
    clh_tensor *tdb = tu_put(ctx, 0, DIMS((int64_t)cols), db0);
    double *want_g = tu_alloc_doubles(cols), *want_b = tu_alloc_doubles(cols);
    /* dgamma sums rows of dy * xhat */
    double mdy = max_abs_f(dy, n), max_xhat = max_abs_xhat(xd, rows, cols, eps);
    double tol_g = gemm_tol(rows, mdy, max_xhat) + 1e-7, tol_b = gemm_tol(rows, mdy, 1) + 1e-7;
    for (int call = 1; call <= 2; call++) {
        TU_OK(clh_layer_norm_backward(ctx, tx, tg, eps, tdy, tdx, tdg, tdb));
        for (size_t c = 0; c < cols; c++) {
            want_g[c] = dg0[c] + call * dg[c];
            want_b[c] = db0[c] + call * db[c];
        }
        expect_close("layer_norm_backward", tdx, dx, n, row_tol(dx, n));
        expect_close("layer_norm_backward", tdg, want_g, cols, call * tol_g);
        expect_close("layer_norm_backward", tdb, want_b, cols, call * tol_b);
    }
    clh_tensor_release(tx);
    clh_tensor_release(tg);
    clh_tensor_release(tdy);
    clh_tensor_release(tdx);
    clh_tensor_release(tdg);
    clh_tensor_release(tdb);
    free(x);
    free(g);
    free(dy);
    free(dg0);
    free(db0);
    free(xd);
    free(gd);
    free(dyd);
    free(dx);
    free(dg);
    free(db);
    free(want_g);
    free(want_b);
}

static void test_layer_norm_backward(void **state) {
    TU_CTX_OR_SKIP(ctx);
    static const size_t rows[] = {1, 3, 7, 33}, cols[] = {5, 77, 130};
    uint32_t seed = 400;
    for (size_t r = 0; r < sizeof rows / sizeof rows[0]; r++)
        for (size_t c = 0; c < sizeof cols / sizeof cols[0]; c++, seed += 10)
            check_layer_norm_case(ctx, rows[r], cols[c], seed);
    check_layer_norm_case(ctx, 5000, 5, 600); /* many tiles of more than 16 rows */
}

/* NULL outputs, bitwise reproducibility, aliasing refused, shape errors. */
static void test_layer_norm_backward_misc(void **state) {
    TU_CTX_OR_SKIP(ctx);
    const size_t rows = 33, cols = 77, n = rows * cols;
    float *x = tu_random_floats(n, -1, 1, 700), *g = tu_random_floats(cols, 0.5f, 1.5f, 701);
    float *dy = tu_random_floats(n, -1, 1, 702);
    double *xd = tu_to_double(x, n), *gd = tu_to_double(g, cols), *dyd = tu_to_double(dy, n);
    double *dx = tu_alloc_doubles(n), *dg = tu_alloc_doubles(cols), *db = tu_alloc_doubles(cols);
    ref_layer_norm_backward(xd, gd, dyd, rows, cols, 1e-5, dx, dg, db);
    clh_tensor *tx = tu_put(ctx, 0, DIMS((int64_t)rows, (int64_t)cols), x);
    clh_tensor *tg = tu_put(ctx, 0, DIMS((int64_t)cols), g);
    clh_tensor *tdy = tu_put(ctx, 0, DIMS((int64_t)rows, (int64_t)cols), dy);
    clh_tensor *tdx = tu_nan_tensor(ctx, DIMS((int64_t)rows, (int64_t)cols));
    clh_tensor *tdb = tu_nan_tensor(ctx, DIMS((int64_t)cols));
    clh_tensor *tdg = tu_nan_tensor(ctx, DIMS((int64_t)cols));

    TU_OK(clh_layer_norm_backward(ctx, tx, tg, 1e-5f, tdy, tdx, NULL, NULL));
    expect_close("layer_norm_backward", tdx, dx, n, row_tol(dx, n));
    TU_OK(clh_tensor_fill(tdb, 0));
    TU_OK(clh_layer_norm_backward(ctx, tx, tg, 1e-5f, tdy, NULL, NULL, tdb));
    expect_close("layer_norm_backward", tdb, db, cols, gemm_tol(rows, 1, 1));
    TU_OK(clh_tensor_fill(tdg, 0));
    TU_OK(clh_layer_norm_backward(ctx, tx, tg, 1e-5f, tdy, NULL, tdg, NULL));
    expect_close("layer_norm_backward", tdg, dg, cols,
                 gemm_tol(rows, 1, max_abs_xhat(xd, rows, cols, 1e-5)));

    /* the same call twice gives the same bits (no atomics, fixed reduction order) */
    float *first_dx = tu_fetch(tdx), *first_dg = tu_fetch(tdg);
    TU_OK(clh_tensor_fill(tdg, 0));
    TU_OK(clh_layer_norm_backward(ctx, tx, tg, 1e-5f, tdy, tdx, tdg, NULL));
    float *again_dx = tu_fetch(tdx), *again_dg = tu_fetch(tdg);
    assert_memory_equal(first_dx, again_dx, n * sizeof(float));
    assert_memory_equal(first_dg, again_dg, cols * sizeof(float));

    TU_FAILS(clh_layer_norm_backward(ctx, tx, tg, 1e-5f, tdy, tdy, NULL, NULL),
             CLH_ERR_INVALID_ARGUMENT, "dx must not alias dy");
    TU_FAILS(clh_layer_norm_backward(ctx, tx, tg, 1e-5f, tdy, tx, NULL, NULL),
             CLH_ERR_INVALID_ARGUMENT, "dx must not alias x");
    clh_tensor *g_bad = tu_nan_tensor(ctx, DIMS(76)), *dy_bad = tu_nan_tensor(ctx, DIMS(77, 33));
    TU_FAILS(clh_layer_norm_backward(ctx, tx, g_bad, 1e-5f, tdy, tdx, NULL, NULL), CLH_ERR_SHAPE,
             "clh_layer_norm_backward: gamma must have 77 elements (x [33, 77], gamma [76])");
    TU_FAILS(clh_layer_norm_backward(ctx, tx, tg, 1e-5f, dy_bad, tdx, NULL, NULL), CLH_ERR_SHAPE,
             "dy [77, 33]");
    TU_FAILS(clh_layer_norm_backward(ctx, tx, tg, 1e-5f, tdy, dy_bad, NULL, NULL), CLH_ERR_SHAPE,
             "dx [77, 33]");
    TU_FAILS(clh_layer_norm_backward(ctx, tx, tg, 1e-5f, tdy, tdx, g_bad, NULL), CLH_ERR_SHAPE,
             "dgamma [76]");
    TU_FAILS(clh_layer_norm_backward(ctx, tx, tg, 1e-5f, tdy, tdx, NULL, g_bad), CLH_ERR_SHAPE,
             "dbeta [76]");
    TU_FAILS(clh_layer_norm_backward(ctx, tx, tg, -1.0f, tdy, tdx, NULL, NULL),
             CLH_ERR_INVALID_ARGUMENT, "eps");
    TU_FAILS(clh_layer_norm_backward(ctx, tx, NULL, 1e-5f, tdy, tdx, NULL, NULL),
             CLH_ERR_INVALID_ARGUMENT, "tensor gamma is NULL");

    clh_tensor *all[] = {tx, tg, tdy, tdx, tdb, tdg, g_bad, dy_bad};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        clh_tensor_release(all[i]);
    void *mem[] = {x, g, dy, xd, gd, dyd, dx, dg, db, first_dx, first_dg, again_dx, again_dg};
    for (size_t i = 0; i < sizeof mem / sizeof mem[0]; i++)
        free(mem[i]);
}

/* ================================================================== softmax */

/* Softmax over rows of scale * x; with causal, row r of each block of lq rows keeps
 * columns c <= r % lq. */
static void ref_softmax(const double *x, size_t rows, size_t lq, size_t cols, double scale,
                        int causal, double *y) {
    for (size_t r = 0; r < rows; r++) {
        size_t valid = causal ? (r % lq + 1 < cols ? r % lq + 1 : cols) : cols;
        double m = -INFINITY, total = 0;
        for (size_t c = 0; c < valid; c++)
            m = fmax(m, scale * x[r * cols + c]);
        for (size_t c = 0; c < valid; c++)
            total += exp(scale * x[r * cols + c] - m);
        for (size_t c = 0; c < cols; c++)
            y[r * cols + c] = c < valid ? exp(scale * x[r * cols + c] - m) / total : 0.0;
    }
}

static void ref_softmax_backward(const double *y, const double *dy, size_t rows, size_t cols,
                                 double scale, double *dx) {
    for (size_t r = 0; r < rows; r++) {
        double s = tu_dot(y + r * cols, dy + r * cols, cols);
        for (size_t c = 0; c < cols; c++)
            dx[r * cols + c] = scale * y[r * cols + c] * (dy[r * cols + c] - s);
    }
}

typedef struct softmax_problem {
    double *x, *dy;
    size_t rows, lq, cols;
    double scale;
    int causal;
} softmax_problem;

static double softmax_loss(const void *p_) {
    const softmax_problem *p = p_;
    size_t n = p->rows * p->cols;
    double *y = tu_alloc_doubles(n);
    ref_softmax(p->x, p->rows, p->lq, p->cols, p->scale, p->causal, y);
    double l = tu_dot(y, p->dy, n);
    free(y);
    return l;
}

static void test_softmax_backward_fd(void **state) {
    (void)state;
    for (int causal = 0; causal < 2; causal++) {
        const size_t rows = 6, lq = 3, cols = 5, n = rows * cols;
        float *xf = tu_random_floats(n, -2, 2, 20 + (uint32_t)causal),
              *dyf = tu_random_floats(n, -1, 1, 22);
        softmax_problem p = {
            tu_to_double(xf, n), tu_to_double(dyf, n), rows, lq, cols, 0.37, causal};
        double *y = tu_alloc_doubles(n), *dx = tu_alloc_doubles(n);
        ref_softmax(p.x, rows, lq, cols, p.scale, causal, y);
        ref_softmax_backward(y, p.dy, rows, cols, p.scale, dx);
        fd_check("softmax_backward", softmax_loss, &p, p.x, n, dx);
        free(xf);
        free(dyf);
        free(p.x);
        free(p.dy);
        free(y);
        free(dx);
    }
}

static void check_softmax_case(clh_ctx *ctx, size_t blocks, size_t lq, size_t cols, int causal,
                               int in_place, uint32_t seed) {
    size_t rows = blocks * lq, n = rows * cols;
    const double scale = 0.37;
    float *xf = tu_random_floats(n, -4, 4, seed), *dy = tu_random_floats(n, -1, 1, seed + 1);
    double *x = tu_to_double(xf, n), *y = tu_alloc_doubles(n), *dx = tu_alloc_doubles(n);
    ref_softmax(x, rows, lq, cols, scale, causal, y);
    float *yf = malloc(n * sizeof *yf);
    assert_non_null(yf);
    for (size_t i = 0; i < n; i++)
        yf[i] = (float)y[i];
    double *yr = tu_to_double(yf, n), *dyd = tu_to_double(dy, n);
    ref_softmax_backward(yr, dyd, rows, cols, scale, dx); /* from the y the device sees */
    clh_tensor *ty = tu_put(ctx, 1, DIMS((int64_t)blocks, (int64_t)lq, (int64_t)cols), yf);
    clh_tensor *tdy = tu_put(ctx, 4, DIMS((int64_t)blocks, (int64_t)lq, (int64_t)cols), dy);
    clh_tensor *tdx =
        in_place ? tdy : tu_nan_tensor(ctx, DIMS((int64_t)blocks, (int64_t)lq, (int64_t)cols));
    TU_OK(clh_softmax_backward(ctx, ty, tdy, (float)scale, tdx));
    expect_close("softmax_backward", tdx, dx, n, row_tol(dx, n));
    clh_tensor_release(ty);
    clh_tensor_release(tdy);
    if (!in_place)
        clh_tensor_release(tdx);
    void *mem[] = {xf, dy, x, y, dx, yf, yr, dyd};
    for (size_t i = 0; i < sizeof mem / sizeof mem[0]; i++)
        free(mem[i]);
}

static void test_softmax_backward(void **state) {
    TU_CTX_OR_SKIP(ctx);
    /* rows 1, 3, 7, 33 (= 3 blocks of 11) over widths 5, 77, 130 */
    static const size_t shapes[][2] = {{1, 1}, {1, 3}, {1, 7}, {3, 11}};
    static const size_t widths[] = {5, 77, 130};
    uint32_t seed = 800;
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
        for (size_t w = 0; w < sizeof widths / sizeof widths[0]; w++, seed += 10)
            check_softmax_case(ctx, shapes[s][0], shapes[s][1], widths[w], (int)((s + w) % 2),
                               (int)(w == 1), seed);
    check_softmax_case(ctx, 3, 11, 13, 1, 0, 900);
    clh_tensor *y = tu_nan_tensor(ctx, DIMS(2, 5, 7)), *bad = tu_nan_tensor(ctx, DIMS(2, 7, 5));
    TU_FAILS(clh_softmax_backward(ctx, y, bad, 1, y), CLH_ERR_SHAPE,
             "clh_softmax_backward: last dimensions differ (y [2, 5, 7], dy [2, 7, 5])");
    TU_FAILS(clh_softmax_backward(ctx, y, y, 1, bad), CLH_ERR_SHAPE, "dx [2, 7, 5]");
    TU_FAILS(clh_softmax_backward(ctx, NULL, y, 1, y), CLH_ERR_INVALID_ARGUMENT, "tensor y");
    TU_OK(clh_softmax_backward(ctx, y, y, 1, NULL)); /* nothing asked */
    clh_tensor_release(y);
    clh_tensor_release(bad);
}

/* ================================================================== attention */

typedef struct attn_shape {
    size_t n, lq, lk, d;
    int heads, causal;
} attn_shape;

/* P for sequence n, head h: [lq, lk] */
static void ref_attention_probs(const attn_shape *s, const double *q, const double *k, size_t n,
                                int h, double *p) {
    size_t hd = s->d / (size_t)s->heads;
    double scale = 1 / sqrt((double)hd);
    for (size_t i = 0; i < s->lq; i++) {
        double m = -INFINITY, total = 0;
        size_t valid = s->causal ? (i + 1 < s->lk ? i + 1 : s->lk) : s->lk;
        for (size_t j = 0; j < s->lk; j++) {
            double acc = 0;
            for (size_t e = 0; e < hd; e++)
                acc +=
                    q[(n * s->lq + i) * s->d + h * hd + e] * k[(n * s->lk + j) * s->d + h * hd + e];
            p[i * s->lk + j] = acc * scale;
            if (j < valid)
                m = fmax(m, acc * scale);
        }
        for (size_t j = 0; j < s->lk; j++) {
            p[i * s->lk + j] = j < valid ? exp(p[i * s->lk + j] - m) : 0.0;
            total += p[i * s->lk + j];
        }
        for (size_t j = 0; j < s->lk; j++)
            p[i * s->lk + j] /= total;
    }
}

static void ref_attention(const attn_shape *s, const double *q, const double *k, const double *v,
                          double *out) {
    size_t hd = s->d / (size_t)s->heads;
    double *p = tu_alloc_doubles(s->lq * s->lk);
    for (size_t n = 0; n < s->n; n++)
        for (int h = 0; h < s->heads; h++) {
            ref_attention_probs(s, q, k, n, h, p);
            for (size_t i = 0; i < s->lq; i++)
                for (size_t e = 0; e < hd; e++) {
                    double acc = 0;
                    for (size_t j = 0; j < s->lk; j++)
                        acc += p[i * s->lk + j] * v[(n * s->lk + j) * s->d + h * hd + e];
                    out[(n * s->lq + i) * s->d + h * hd + e] = acc;
                }
        }
    free(p);
}

/* dV = P^T dO; dP = dO V^T; dS = P (dP - rowsum(P dP)); dQ = scale dS K; dK = scale dS^T Q. */
static void ref_attention_backward(const attn_shape *s, const double *q, const double *k,
                                   const double *v, const double *dout, double *dq, double *dk,
                                   double *dv) {
    size_t hd = s->d / (size_t)s->heads, lq = s->lq, lk = s->lk, d = s->d;
    double scale = 1 / sqrt((double)hd);
    double *p = tu_alloc_doubles(lq * lk), *ds = tu_alloc_doubles(lq * lk);
    for (size_t n = 0; n < s->n; n++)
        for (int h = 0; h < s->heads; h++) {
            ref_attention_probs(s, q, k, n, h, p);
            const double *qn = q + n * lq * d + h * hd, *kn = k + n * lk * d + h * hd;
            const double *vn = v + n * lk * d + h * hd, *don = dout + n * lq * d + h * hd;
            for (size_t i = 0; i < lq; i++) {
                double row = 0;
                for (size_t j = 0; j < lk; j++) {
                    double dp = 0;
                    for (size_t e = 0; e < hd; e++)
                        dp += don[i * d + e] * vn[j * d + e];
                    ds[i * lk + j] = dp;
                    row += p[i * lk + j] * dp;
                }
                for (size_t j = 0; j < lk; j++)
                    ds[i * lk + j] = p[i * lk + j] * (ds[i * lk + j] - row);
            }
            for (size_t e = 0; e < hd; e++) {
                for (size_t i = 0; i < lq; i++) {
                    double acc = 0;
                    for (size_t j = 0; j < lk; j++)
                        acc += ds[i * lk + j] * kn[j * d + e];
                    dq[(n * lq + i) * d + h * hd + e] = scale * acc;
                }
                for (size_t j = 0; j < lk; j++) {
                    double acc_k = 0, acc_v = 0;
                    for (size_t i = 0; i < lq; i++) {
                        acc_k += ds[i * lk + j] * qn[i * d + e];
                        acc_v += p[i * lk + j] * don[i * d + e];
                    }
                    dk[(n * lk + j) * d + h * hd + e] = scale * acc_k;
                    dv[(n * lk + j) * d + h * hd + e] = acc_v;
                }
            }
        }
    free(p);
    free(ds);
}

typedef struct attn_problem {
    attn_shape s;
    double *q, *k, *v, *dout;
} attn_problem;

static double attn_loss(const void *p_) {
    const attn_problem *p = p_;
    size_t n = p->s.n * p->s.lq * p->s.d;
    double *out = tu_alloc_doubles(n);
    ref_attention(&p->s, p->q, p->k, p->v, out);
    double l = tu_dot(out, p->dout, n);
    free(out);
    return l;
}

/* Random q, k, v, dout for shape s (in [-1, 1]; q a little larger for peaked softmaxes). */
typedef struct attn_data {
    float *q, *k, *v, *dout;
    size_t nq, nk;
} attn_data;

static attn_data attn_data_new(const attn_shape *s, uint32_t seed) {
    attn_data a;
    a.nq = s->n * s->lq * s->d;
    a.nk = s->n * s->lk * s->d;
    a.q = tu_random_floats(a.nq, -2, 2, seed);
    a.k = tu_random_floats(a.nk, -1, 1, seed + 1);
    a.v = tu_random_floats(a.nk, -1, 1, seed + 2);
    a.dout = tu_random_floats(a.nq, -1, 1, seed + 3);
    return a;
}

static void attn_data_free(attn_data *a) {
    free(a->q);
    free(a->k);
    free(a->v);
    free(a->dout);
}

static void test_attention_backward_fd(void **state) {
    (void)state;
    static const attn_shape shapes[] = {
        {2, 4, 4, 6, 2, 0}, {2, 4, 4, 6, 2, 1}, {1, 3, 5, 6, 3, 0}, {1, 5, 3, 4, 1, 1}};
    for (size_t c = 0; c < sizeof shapes / sizeof shapes[0]; c++) {
        attn_data a = attn_data_new(&shapes[c], 30 + 4 * (uint32_t)c);
        attn_problem p = {shapes[c], tu_to_double(a.q, a.nq), tu_to_double(a.k, a.nk),
                          tu_to_double(a.v, a.nk), tu_to_double(a.dout, a.nq)};
        double *dq = tu_alloc_doubles(a.nq), *dk = tu_alloc_doubles(a.nk),
               *dv = tu_alloc_doubles(a.nk);
        ref_attention_backward(&p.s, p.q, p.k, p.v, p.dout, dq, dk, dv);
        fd_check("attention_backward", attn_loss, &p, p.q, a.nq, dq);
        fd_check("attention_backward", attn_loss, &p, p.k, a.nk, dk);
        fd_check("attention_backward", attn_loss, &p, p.v, a.nk, dv);
        void *mem[] = {p.q, p.k, p.v, p.dout, dq, dk, dv};
        for (size_t i = 0; i < sizeof mem / sizeof mem[0]; i++)
            free(mem[i]);
        attn_data_free(&a);
    }
}

typedef struct attn_ref {
    double *dq, *dk, *dv;
} attn_ref;

static attn_ref attn_ref_new(const attn_shape *s, const attn_data *a) {
    double *q = tu_to_double(a->q, a->nq), *k = tu_to_double(a->k, a->nk),
           *v = tu_to_double(a->v, a->nk);
    double *dout = tu_to_double(a->dout, a->nq);
    attn_ref r = {tu_alloc_doubles(a->nq), tu_alloc_doubles(a->nk), tu_alloc_doubles(a->nk)};
    ref_attention_backward(s, q, k, v, dout, r.dq, r.dk, r.dv);
    free(q);
    free(k);
    free(v);
    free(dout);
    return r;
}

static void attn_ref_free(attn_ref *r) {
    free(r->dq);
    free(r->dk);
    free(r->dv);
}

/* Tolerance: the gradients are sums of lk (dq) or lq (dk, dv) products of O(1) terms;
 * 1e-5 of the largest gradient covers both on these sizes. */
static void check_attention_case(clh_ctx *ctx, const attn_shape *s, uint32_t seed) {
    attn_data a = attn_data_new(s, seed);
    attn_ref r = attn_ref_new(s, &a);
    int64_t qs[3] = {(int64_t)s->n, (int64_t)s->lq, (int64_t)s->d};
    int64_t ks[3] = {(int64_t)s->n, (int64_t)s->lk, (int64_t)s->d};
    clh_tensor *tq = tu_put(ctx, 3, 3, qs, a.q), *tk = tu_put(ctx, 0, 3, ks, a.k);
    clh_tensor *tv = tu_put(ctx, 1, 3, ks, a.v), *tdo = tu_put(ctx, 2, 3, qs, a.dout);
    clh_tensor *tdq = tu_put(ctx, 5, 3, qs, NULL), *tdk = tu_put(ctx, 0, 3, ks, NULL);
    clh_tensor *tdv = tu_put(ctx, 7, 3, ks, NULL);
    TU_OK(clh_attention_backward(ctx, tq, tk, tv, s->heads, s->causal, tdo, tdq, tdk, tdv));
    expect_close("attention_backward", tdq, r.dq, a.nq, row_tol(r.dq, a.nq));
    expect_close("attention_backward", tdk, r.dk, a.nk, row_tol(r.dk, a.nk));
    expect_close("attention_backward", tdv, r.dv, a.nk, row_tol(r.dv, a.nk));
    clh_tensor *all[] = {tq, tk, tv, tdo, tdq, tdk, tdv};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        clh_tensor_release(all[i]);
    attn_ref_free(&r);
    attn_data_free(&a);
}

static void test_attention_backward(void **state) {
    TU_CTX_OR_SKIP(ctx);
    static const size_t lens[] = {7, 13}, head_dims[] = {5, 16};
    static const int heads[] = {2, 3};
    uint32_t seed = 1000;
    for (size_t l = 0; l < 2; l++)
        for (size_t h = 0; h < 2; h++)
            for (size_t e = 0; e < 2; e++)
                for (int causal = 0; causal < 2; causal++, seed += 4) {
                    attn_shape s = {2,        lens[l], lens[l], (size_t)heads[h] * head_dims[e],
                                    heads[h], causal};
                    check_attention_case(ctx, &s, seed);
                }
    /* keys longer than queries (cross attention), with and without the causal mask */
    attn_shape cross = {2, 7, 13, 10, 2, 0};
    check_attention_case(ctx, &cross, 1100);
    cross.causal = 1;
    check_attention_case(ctx, &cross, 1104);
}

/* NULL outputs are skipped; outputs may alias the inputs; errors. */
static void test_attention_backward_misc(void **state) {
    TU_CTX_OR_SKIP(ctx);
    attn_shape s = {2, 7, 7, 10, 2, 1};
    attn_data a = attn_data_new(&s, 1200);
    attn_ref r = attn_ref_new(&s, &a);
    clh_tensor *tq = tu_put(ctx, 0, DIMS(2, 7, 10), a.q), *tk = tu_put(ctx, 0, DIMS(2, 7, 10), a.k);
    clh_tensor *tv = tu_put(ctx, 0, DIMS(2, 7, 10), a.v),
               *tdo = tu_put(ctx, 0, DIMS(2, 7, 10), a.dout);
    clh_tensor *tdq = tu_nan_tensor(ctx, DIMS(2, 7, 10)), *tdk = tu_nan_tensor(ctx, DIMS(2, 7, 10));
    clh_tensor *tdv = tu_nan_tensor(ctx, DIMS(2, 7, 10));
    TU_OK(clh_attention_backward(ctx, tq, tk, tv, 2, 1, tdo, NULL, NULL, tdv));
    expect_close("attention_backward", tdv, r.dv, a.nq, row_tol(r.dv, a.nq));
    TU_OK(clh_attention_backward(ctx, tq, tk, tv, 2, 1, tdo, tdq, NULL, NULL));
    expect_close("attention_backward", tdq, r.dq, a.nq, row_tol(r.dq, a.nq));
    TU_OK(clh_attention_backward(ctx, tq, tk, tv, 2, 1, tdo, NULL, tdk, NULL));
    expect_close("attention_backward", tdk, r.dk, a.nq, row_tol(r.dk, a.nq));
    TU_OK(clh_attention_backward(ctx, tq, tk, tv, 2, 1, tdo, NULL, NULL, NULL));

    /* dq over q, dk over k, dv over dout: inputs are read before outputs are written */
    TU_OK(clh_attention_backward(ctx, tq, tk, tv, 2, 1, tdo, tq, tk, tdo));
    expect_close("attention_backward", tq, r.dq, a.nq, row_tol(r.dq, a.nq));
    expect_close("attention_backward", tk, r.dk, a.nq, row_tol(r.dk, a.nq));
    expect_close("attention_backward", tdo, r.dv, a.nq, row_tol(r.dv, a.nq));

    clh_tensor *bad = tu_nan_tensor(ctx, DIMS(2, 7, 12)),
               *bad_k = tu_nan_tensor(ctx, DIMS(2, 5, 10));
    TU_FAILS(clh_attention_backward(ctx, tq, tk, tv, 3, 0, tdo, tdq, tdk, tdv), CLH_ERR_SHAPE,
             "heads = 3 does not divide D = 10");
    TU_FAILS(clh_attention_backward(ctx, tq, tk, tv, 2, 0, bad, tdq, tdk, tdv), CLH_ERR_SHAPE,
             "clh_attention_backward: dout must have q's shape (q [2, 7, 10], dout [2, 7, 12])");
    TU_FAILS(clh_attention_backward(ctx, tq, tk, tv, 2, 0, tdo, bad, tdk, tdv), CLH_ERR_SHAPE,
             "dq [2, 7, 12]");
    TU_FAILS(clh_attention_backward(ctx, tq, tk, tv, 2, 0, tdo, tdq, tdk, bad_k), CLH_ERR_SHAPE,
             "dv [2, 5, 10]");
    TU_FAILS(clh_attention_backward(ctx, tq, tk, bad_k, 2, 0, tdo, tdq, tdk, tdv), CLH_ERR_SHAPE,
             "v [2, 5, 10]");
    TU_FAILS(clh_attention_backward(ctx, tq, bad, tv, 2, 0, tdo, tdq, tdk, tdv), CLH_ERR_SHAPE,
             "k [2, 7, 12]");
    TU_FAILS(clh_attention_backward(ctx, tq, tk, tv, 2, 0, tdo, tdq, tdq, tdv),
             CLH_ERR_INVALID_ARGUMENT, "dq must not alias dk");
    TU_FAILS(clh_attention_backward(ctx, tq, tk, tv, 2, 0, NULL, tdq, tdk, tdv),
             CLH_ERR_INVALID_ARGUMENT, "tensor dout is NULL");

    /* no queries: dk and dv are zero */
    clh_tensor *q0 = tu_nan_tensor(ctx, DIMS(2, 0, 10)), *dk0 = tu_nan_tensor(ctx, DIMS(2, 5, 10));
    clh_tensor *dv0 = tu_nan_tensor(ctx, DIMS(2, 5, 10));
    double zeros[2 * 5 * 10] = {0};
    TU_OK(clh_attention_backward(ctx, q0, bad_k, bad_k, 2, 1, q0, q0, dk0, dv0));
    expect_close("attention_backward", dk0, zeros, 100, 0);
    expect_close("attention_backward", dv0, zeros, 100, 0);
    clh_tensor_release(q0);
    clh_tensor_release(dk0);
    clh_tensor_release(dv0);

    clh_tensor *all[] = {tq, tk, tv, tdo, tdq, tdk, tdv, bad, bad_k};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        clh_tensor_release(all[i]);
    attn_ref_free(&r);
    attn_data_free(&a);
}

/* ================================================================== activations */

static double quick_gelu_d(double x) {
    return x / (1 + exp(-1.702 * x));
}

static double quick_gelu_grad(double x) {
    double s = 1 / (1 + exp(-1.702 * x));
    return s * (1 + 1.702 * x * (1 - s));
}

static double gelu_d(double x) {
    return 0.5 * x * (1 + erf(x / sqrt(2.0)));
}

static double gelu_grad(double x) {
    return 0.5 * (1 + erf(x / sqrt(2.0))) + x * exp(-0.5 * x * x) / sqrt(2 * M_PI);
}

typedef struct act_problem {
    double *x, *dy;
    size_t n;
    double (*f)(double);
} act_problem;

static double act_loss(const void *p_) {
    const act_problem *p = p_;
    double l = 0;
    for (size_t i = 0; i < p->n; i++)
        l += p->dy[i] * p->f(p->x[i]);
    return l;
}

typedef struct activation {
    const char *name;
    double (*f)(double), (*grad)(double);
    clh_status (*backward)(clh_ctx *, const clh_tensor *, const clh_tensor *, clh_tensor *);
} activation;

static const activation activations[] = {
    {"quick_gelu_backward", quick_gelu_d, quick_gelu_grad, clh_quick_gelu_backward},
    {"gelu_backward", gelu_d, gelu_grad, clh_gelu_backward},
};

static void test_activation_backward_fd(void **state) {
    (void)state;
    const size_t n = 200;
    for (size_t a = 0; a < 2; a++) {
        float *xf = tu_random_floats(n, -7, 7, 40), *dyf = tu_random_floats(n, -1, 1, 41);
        act_problem p = {tu_to_double(xf, n), tu_to_double(dyf, n), n, activations[a].f};
        double *dx = tu_alloc_doubles(n);
        for (size_t i = 0; i < n; i++)
            dx[i] = p.dy[i] * activations[a].grad(p.x[i]);
        fd_check(activations[a].name, act_loss, &p, p.x, n, dx);
        free(xf);
        free(dyf);
        free(p.x);
        free(p.dy);
        free(dx);
    }
}

static void test_activation_backward(void **state) {
    TU_CTX_OR_SKIP(ctx);
    static const size_t sizes[] = {1, 77, 33 * 130};
    for (size_t a = 0; a < 2; a++)
        for (size_t s = 0; s < 3; s++) {
            size_t n = sizes[s];
            float *x = tu_random_floats(n, -9, 9, 1300 + (uint32_t)s),
                  *dy = tu_random_floats(n, -1, 1, 1310);
            double *want = tu_alloc_doubles(n);
            for (size_t i = 0; i < n; i++)
                want[i] = (double)dy[i] * activations[a].grad(x[i]);
            clh_tensor *tx = tu_put(ctx, 1, DIMS((int64_t)n), x),
                       *tdy = tu_put(ctx, 3, DIMS((int64_t)n), dy);
            clh_tensor *tdx = tu_nan_tensor(ctx, DIMS((int64_t)n));
            TU_OK(activations[a].backward(ctx, tx, tdy, tdx));
            expect_close(activations[a].name, tdx, want, n, row_tol(want, n));
            TU_OK(activations[a].backward(ctx, tx, tdy, tdy)); /* dx may alias dy */
            expect_close(activations[a].name, tdy, want, n, row_tol(want, n));
            TU_OK(activations[a].backward(ctx, tx, tdy, NULL));
            clh_tensor *bad = tu_nan_tensor(ctx, DIMS((int64_t)n + 1));
            TU_FAILS(activations[a].backward(ctx, tx, bad, tdx), CLH_ERR_SHAPE, "dy [");
            TU_FAILS(activations[a].backward(ctx, tx, tdy, bad), CLH_ERR_SHAPE,
                     activations[a].name);
            clh_tensor_release(bad);
            clh_tensor_release(tx);
            clh_tensor_release(tdy);
            clh_tensor_release(tdx);
            free(x);
            free(dy);
            free(want);
        }
}

/* ================================================================== L2 normalisation */

static void ref_l2_normalize(const double *x, size_t rows, size_t cols, double *y) {
    for (size_t r = 0; r < rows; r++) {
        double norm = fmax(sqrt(tu_dot(x + r * cols, x + r * cols, cols)), 1e-12);
        for (size_t c = 0; c < cols; c++)
            y[r * cols + c] = x[r * cols + c] / norm;
    }
}

static void ref_l2_normalize_backward(const double *x, const double *dy, size_t rows, size_t cols,
                                      double *dx) {
    for (size_t r = 0; r < rows; r++) {
        const double *xr = x + r * cols, *dyr = dy + r * cols;
        double norm = sqrt(tu_dot(xr, xr, cols));
        if (norm > 1e-12) {
            double proj = tu_dot(xr, dyr, cols) / (norm * norm);
            for (size_t c = 0; c < cols; c++)
                dx[r * cols + c] = (dyr[c] - xr[c] * proj) / norm;
        } else {
            for (size_t c = 0; c < cols; c++)
                dx[r * cols + c] = dyr[c] / 1e-12;
        }
    }
}

typedef struct l2_problem {
    double *x, *dy;
    size_t rows, cols;
} l2_problem;

static double l2_loss(const void *p_) {
    const l2_problem *p = p_;
    size_t n = p->rows * p->cols;
    double *y = tu_alloc_doubles(n);
    ref_l2_normalize(p->x, p->rows, p->cols, y);
    double l = tu_dot(y, p->dy, n);
    free(y);
    return l;
}

static void test_l2_normalize_backward_fd(void **state) {
    (void)state;
    const size_t rows = 3, cols = 7, n = rows * cols;
    float *xf = tu_random_floats(n, -1, 1, 50), *dyf = tu_random_floats(n, -1, 1, 51);
    l2_problem p = {tu_to_double(xf, n), tu_to_double(dyf, n), rows, cols};
    double *dx = tu_alloc_doubles(n);
    ref_l2_normalize_backward(p.x, p.dy, rows, cols, dx);
    fd_check("l2_normalize_backward", l2_loss, &p, p.x, n, dx);
    free(xf);
    free(dyf);
    free(p.x);
    free(p.dy);
    free(dx);
}

static void test_l2_normalize_backward(void **state) {
    TU_CTX_OR_SKIP(ctx);
    static const size_t rows[] = {1, 3, 7, 33}, cols[] = {5, 77, 130};
    uint32_t seed = 1400;
    for (size_t r = 0; r < 4; r++)
        for (size_t c = 0; c < 3; c++, seed += 2) {
            size_t n = rows[r] * cols[c];
            float *x = tu_random_floats(n, -1, 1, seed), *dy = tu_random_floats(n, -1, 1, seed + 1);
            double *xd = tu_to_double(x, n), *dyd = tu_to_double(dy, n),
                   *want = tu_alloc_doubles(n);
            ref_l2_normalize_backward(xd, dyd, rows[r], cols[c], want);
            clh_tensor *tx = tu_put(ctx, 2, DIMS((int64_t)rows[r], (int64_t)cols[c]), x);
            clh_tensor *tdy = tu_put(ctx, 0, DIMS((int64_t)rows[r], (int64_t)cols[c]), dy);
            clh_tensor *tdx = tu_nan_tensor(ctx, DIMS((int64_t)rows[r], (int64_t)cols[c]));
            TU_OK(clh_l2_normalize_backward(ctx, tx, tdy, tdx));
            expect_close("l2_normalize_backward", tdx, want, n, row_tol(want, n));
            TU_OK(clh_l2_normalize_backward(ctx, tx, tdy, tdy)); /* in place is safe */
            expect_close("l2_normalize_backward", tdy, want, n, row_tol(want, n));
            clh_tensor_release(tx);
            clh_tensor_release(tdy);
            clh_tensor_release(tdx);
            void *mem[] = {x, dy, xd, dyd, want};
            for (size_t i = 0; i < 5; i++)
                free(mem[i]);
        }
    /* a zero row sits at the 1e-12 clamp, where the map is x / 1e-12 */
    float zero[5] = {0}, dy[5] = {1, -2, 0.5f, 0, 3};
    double want[5];
    for (int i = 0; i < 5; i++)
        want[i] = dy[i] * 1e12;
    clh_tensor *tx = tu_put(ctx, 0, DIMS(1, 5), zero), *tdy = tu_put(ctx, 0, DIMS(1, 5), dy);
    clh_tensor *tdx = tu_nan_tensor(ctx, DIMS(1, 5)), *bad = tu_nan_tensor(ctx, DIMS(5, 1));
    TU_OK(clh_l2_normalize_backward(ctx, tx, tdy, tdx));
    expect_close("l2_normalize_backward", tdx, want, 5, row_tol(want, 5));
    TU_FAILS(clh_l2_normalize_backward(ctx, tx, bad, tdx), CLH_ERR_SHAPE,
             "clh_l2_normalize_backward: last dimensions differ (x [1, 5], dy [5, 1])");
    TU_FAILS(clh_l2_normalize_backward(ctx, tx, tdy, bad), CLH_ERR_SHAPE, "dx [5, 1]");
    clh_tensor_release(tx);
    clh_tensor_release(tdy);
    clh_tensor_release(tdx);
    clh_tensor_release(bad);
}

/* ================================================================== scatter-add */

typedef struct gather_problem {
    double *x, *dy;
    const int32_t *index;
    size_t n, cols;
} gather_problem;

static double gather_loss(const void *p_) {
    const gather_problem *p = p_;
    double l = 0;
    for (size_t i = 0; i < p->n; i++)
        l += tu_dot(p->x + (size_t)p->index[i] * p->cols, p->dy + i * p->cols, p->cols);
    return l;
}

static void ref_scatter_add(const double *dy, const int32_t *index, size_t n, size_t cols,
                            double *dx) {
    for (size_t i = 0; i < n; i++)
        for (size_t c = 0; c < cols; c++)
            dx[(size_t)index[i] * cols + c] += dy[i * cols + c];
}

static void test_scatter_add_rows_fd(void **state) {
    (void)state;
    const size_t rows = 6, cols = 5, n = 8;
    const int32_t index[8] = {4, 0, 4, 2, 4, 5, 0, 3}; /* row 1 is never gathered */
    float *xf = tu_random_floats(rows * cols, -1, 1, 60),
          *dyf = tu_random_floats(n * cols, -1, 1, 61);
    gather_problem p = {tu_to_double(xf, rows * cols), tu_to_double(dyf, n * cols), index, n, cols};
    double *dx = tu_alloc_doubles(rows * cols);
    ref_scatter_add(p.dy, index, n, cols, dx);
    fd_check("scatter_add_rows", gather_loss, &p, p.x, rows * cols, dx);
    free(xf);
    free(dyf);
    free(p.x);
    free(p.dy);
    free(dx);
}

static void test_scatter_add_rows(void **state) {
    TU_CTX_OR_SKIP(ctx);
    const size_t rows = 9, cols = 77, n = 40;
    int32_t index[40];
    for (size_t i = 0; i < n; i++)
        index[i] = (int32_t)((i * 7 + i / 5) % rows);
    index[3] = index[17] = index[39] = 8; /* repeats far apart */
    float *dy = tu_random_floats(n * cols, -1, 1, 1500),
          *dx0 = tu_random_floats(rows * cols, -1, 1, 1501);
    /* a sequential float loop gives the expected bits: the device adds each target's
     * rows in the same (ascending) order, starting from the old value */
    float *want = malloc(rows * cols * sizeof *want);
    assert_non_null(want);
    memcpy(want, dx0, rows * cols * sizeof *want);
    for (size_t i = 0; i < n; i++)
        for (size_t c = 0; c < cols; c++)
            want[(size_t)index[i] * cols + c] += dy[i * cols + c];
    double *want_d = tu_to_double(want, rows * cols);
    clh_tensor *tdy = tu_put(ctx, 3, DIMS((int64_t)n, (int64_t)cols), dy);
    clh_tensor *tdx = tu_put(ctx, 1, DIMS(3, 3, (int64_t)cols), dx0);
    TU_OK(clh_scatter_add_rows(ctx, tdy, index, n, tdx));
    float *got = tu_fetch(tdx);
    expect_close("scatter_add_rows", tdx, want_d, rows * cols, 0);
    assert_memory_equal(got, want, rows * cols * sizeof *want);

    TU_OK(clh_scatter_add_rows(ctx, tdy, index, 0, NULL)); /* nothing to do */
    int32_t none[1] = {0};
    clh_tensor *empty_dy = tu_nan_tensor(ctx, DIMS(0, (int64_t)cols));
    TU_OK(clh_scatter_add_rows(ctx, empty_dy, none, 0, tdx));
    expect_close("scatter_add_rows", tdx, want_d, rows * cols, 0);

    int32_t bad_index[2] = {1, 9};
    clh_tensor *dy2 = tu_put(ctx, 0, DIMS(2, (int64_t)cols), dy);
    TU_FAILS(clh_scatter_add_rows(ctx, dy2, bad_index, 2, tdx), CLH_ERR_INVALID_ARGUMENT,
             "index[1] = 9 is outside [0, 9)");
    TU_FAILS(clh_scatter_add_rows(ctx, dy2, NULL, 2, tdx), CLH_ERR_INVALID_ARGUMENT,
             "index is NULL");
    TU_FAILS(clh_scatter_add_rows(ctx, dy2, index, 3, tdx), CLH_ERR_SHAPE,
             "clh_scatter_add_rows: dy must be [3, 77] (dy [2, 77], dx [3, 3, 77])");
    clh_tensor *flat = tu_nan_tensor(ctx, DIMS((int64_t)cols));
    TU_FAILS(clh_scatter_add_rows(ctx, dy2, index, 2, flat), CLH_ERR_SHAPE, "dx [77]");
    clh_tensor *both = tu_nan_tensor(ctx, DIMS(4, 5)), *dy_view = NULL, *dx_view = NULL;
    TU_OK(clh_tensor_view(both, 0, DIMS(2, 5), &dy_view));
    TU_OK(clh_tensor_view(both, 5, DIMS(2, 5), &dx_view));
    int32_t in_range[2] = {1, 0};
    TU_FAILS(clh_scatter_add_rows(ctx, dy_view, in_range, 2, dx_view), CLH_ERR_INVALID_ARGUMENT,
             "dx must not alias dy");
    clh_tensor *all[] = {tdy, tdx, empty_dy, dy2, flat, both, dy_view, dx_view};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        clh_tensor_release(all[i]);
    free(dy);
    free(dx0);
    free(want);
    free(want_d);
    free(got);
}

/* ================================================================== vector helpers */

static void test_axpy_and_scale(void **state) {
    TU_CTX_OR_SKIP(ctx);
    const size_t n = 1000;
    float *x = tu_random_floats(n, -1, 1, 1600), *y = tu_random_floats(n, -1, 1, 1601);
    double *want = tu_alloc_doubles(n);
    for (size_t i = 0; i < n; i++)
        want[i] = y[i] + 0.3 * (double)x[i];
    clh_tensor *tx = tu_put(ctx, 1, DIMS(10, 100), x), *ty = tu_put(ctx, 2, DIMS((int64_t)n), y);
    TU_OK(clh_axpy(ctx, 0.3f, tx, ty));
    expect_close("axpy", ty, want, n, row_tol(want, n));
    TU_OK(clh_axpy(ctx, -0.5f, ty, ty)); /* x may be y */
    for (size_t i = 0; i < n; i++)
        want[i] *= 0.5;
    expect_close("axpy", ty, want, n, row_tol(want, n));
    TU_OK(clh_scale(ctx, ty, -3.0f));
    for (size_t i = 0; i < n; i++)
        want[i] *= -3.0;
    expect_close("scale", ty, want, n, row_tol(want, n));
    clh_tensor *bad = tu_nan_tensor(ctx, DIMS(999));
    TU_FAILS(clh_axpy(ctx, 1, tx, bad), CLH_ERR_SHAPE,
             "clh_axpy: x has 1000 elements but y has 999 (x [10, 100], y [999])");
    TU_FAILS(clh_scale(ctx, NULL, 1), CLH_ERR_INVALID_ARGUMENT, "clh_scale: tensor x is NULL");
    clh_tensor_release(bad);
    clh_tensor_release(tx);
    clh_tensor_release(ty);
    free(x);
    free(y);
    free(want);
}

static void test_sum_squares(void **state) {
    TU_CTX_OR_SKIP(ctx);
    static const size_t sizes[] = {1, 77, 4097, 3000001};
    for (size_t s = 0; s < 4; s++) {
        size_t n = sizes[s];
        float *x = tu_random_floats(n, -2, 2, 1700 + (uint32_t)s);
        double want = 0, got = -1;
        for (size_t i = 0; i < n; i++)
            want += (double)x[i] * x[i];
        clh_tensor *tx = tu_put(ctx, 3, DIMS((int64_t)n), x);
        TU_OK(clh_sum_squares(ctx, tx, &got));
        double rel = fabs(got - want) / want;
        note_error("sum_squares", 0, rel);
        if (!(rel <= 1e-6))
            fail_msg("sum_squares(n=%zu) = %.10g, expected %.10g", n, got, want);
        clh_tensor_release(tx);
        free(x);
    }
    clh_tensor *empty = tu_nan_tensor(ctx, DIMS(0)), *x = tu_nan_tensor(ctx, DIMS(3));
    double got = -1;
    TU_OK(clh_sum_squares(ctx, empty, &got));
    assert_true(got == 0.0);
    TU_FAILS(clh_sum_squares(ctx, x, NULL), CLH_ERR_INVALID_ARGUMENT, "out is NULL");
    clh_tensor_release(empty);
    clh_tensor_release(x);
}

/* ------------------------------------------------------------------ main */

static int teardown(void **state) {
    (void)state;
    print_message("max relative errors (finite differences of the C double reference | "
                  "device float vs C double):\n");
    for (int i = 0; i < n_stats_; i++)
        print_message("  %-24s fd %-9.2e device %.2e\n", stats_[i].name,
                      stats_[i].fd < 0 ? NAN : stats_[i].fd,
                      stats_[i].dev < 0 ? NAN : stats_[i].dev);
    tu_ctx_teardown();
    return 0;
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_linear_backward_fd),
        cmocka_unit_test(test_linear_backward),
        cmocka_unit_test(test_linear_backward_null_and_alias),
        cmocka_unit_test(test_linear_backward_errors),
        cmocka_unit_test(test_layer_norm_backward_fd),
        cmocka_unit_test(test_layer_norm_backward),
        cmocka_unit_test(test_layer_norm_backward_misc),
        cmocka_unit_test(test_softmax_backward_fd),
        cmocka_unit_test(test_softmax_backward),
        cmocka_unit_test(test_attention_backward_fd),
        cmocka_unit_test(test_attention_backward),
        cmocka_unit_test(test_attention_backward_misc),
        cmocka_unit_test(test_activation_backward_fd),
        cmocka_unit_test(test_activation_backward),
        cmocka_unit_test(test_l2_normalize_backward_fd),
        cmocka_unit_test(test_l2_normalize_backward),
        cmocka_unit_test(test_scatter_add_rows_fd),
        cmocka_unit_test(test_scatter_add_rows),
        cmocka_unit_test(test_axpy_and_scale),
        cmocka_unit_test(test_sum_squares),
    };
    return cmocka_run_group_tests_name("backward", tests, NULL, teardown);
}
