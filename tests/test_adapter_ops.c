/* H-CLIP adapter math (hclip.h "adapter math") against plain C references computed in
 * double: block-diagonal transforms, batched inverse (both the local- and the
 * global-memory variant), Cayley map, DCRC relation maps, hyperspherical energy.
 * Each reference backward is checked against central finite differences of the
 * reference forward, and each device backward against the reference backward. */
#include <time.h>

#include "hclip.h"
#include "testutil.h"

#define DEV_TOL 1e-5 /* device vs double reference: max abs err <= DEV_TOL * max |ref| */
#define FD_TOL  1e-6 /* reference backward vs finite differences, same measure */
#define FD_H    1e-6

/* ------------------------------------------------------------------ helpers */

/* N(0, std) by Box-Muller on the deterministic uniforms of testutil.h. */
static float *normal_floats(size_t n, float std, uint32_t seed) {
    float *u = tu_random_floats(2 * n, 0.0f, 1.0f, seed);
    float *x = tu_alloc_floats(n);
    for (size_t i = 0; i < n; i++) {
        double r = sqrt(-2.0 * log(1.0 - (double)u[2 * i]));
        x[i] = (float)(std * r * cos(2.0 * M_PI * (double)u[2 * i + 1]));
    }
    free(u);
    return x;
}

/* max |got - want| / max |want| */
static double rel_err(const float *got, const double *want, size_t n) {
    double err = 0, mag = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)got[i] - want[i]);
        if (!(d <= err))
            err = d; /* NaN sticks */
        mag = fmax(mag, fabs(want[i]));
    }
    return err / (mag > 0 ? mag : 1.0);
}

static double rel_err_d(const double *got, const double *want, size_t n) {
    double err = 0, mag = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs(got[i] - want[i]);
        if (!(d <= err))
            err = d;
        mag = fmax(mag, fabs(want[i]));
    }
    return err / (mag > 0 ? mag : 1.0);
}

/* Download t and require rel_err <= tol; returns the error for reporting. */
static double expect_close(const char *what, const clh_tensor *t, const double *want, size_t n,
                           double tol) {
    assert_int_equal(clh_tensor_numel(t), n);
    float *got = tu_fetch(t);
    double e = rel_err(got, want, n);
    free(got);
    if (!(e <= tol))
        fail_msg("%s: relative error %.3g > %.3g", what, e, tol);
    return e;
}

static void expect_fd(const char *what, const double *analytic, const double *numeric, size_t n) {
    double e = rel_err_d(analytic, numeric, n);
    if (!(e <= FD_TOL))
        fail_msg("%s: reference backward vs finite differences: relative error %.3g > %.3g", what,
                 e, FD_TOL);
}

static double dot_d(const double *a, const double *b, size_t n) {
    double s = 0;
    for (size_t i = 0; i < n; i++)
        s += a[i] * b[i];
    return s;
}

/* Central difference of f at x along coordinate i. */
typedef double (*scalar_fn)(const double *x, void *data);
static void numeric_grad(scalar_fn f, double *x, size_t n, void *data, double *grad) {
    for (size_t i = 0; i < n; i++) {
        double keep = x[i];
        x[i] = keep + FD_H;
        double up = f(x, data);
        x[i] = keep - FD_H;
        double down = f(x, data);
        x[i] = keep;
        grad[i] = (up - down) / (2 * FD_H);
    }
}

#define SHAPE(...) ((const int64_t[]){__VA_ARGS__})

/* ------------------------------------------------------------------ reference: block-diagonal */

/* y[r, qj + a] = sum_c x[r, qj + c] R_j[a, c] */
static void ref_bd_forward(const double *x, const double *blocks, size_t rows, size_t nb, size_t q,
                           double *y) {
    size_t d = nb * q;
    for (size_t r = 0; r < rows; r++)
        for (size_t j = 0; j < nb; j++)
            for (size_t a = 0; a < q; a++) {
                double acc = 0;
                for (size_t c = 0; c < q; c++)
                    acc += x[r * d + q * j + c] * blocks[(j * q + a) * q + c];
                y[r * d + q * j + a] = acc;
            }
}

/* dx = dy BD (overwritten), dblocks += dy_j^T x_j */
static void ref_bd_backward(const double *x, const double *blocks, const double *dy, size_t rows,
                            size_t nb, size_t q, double *dx, double *dblocks) {
    size_t d = nb * q;
    for (size_t r = 0; r < rows; r++)
        for (size_t j = 0; j < nb; j++)
            for (size_t c = 0; c < q; c++) {
                double acc = 0;
                for (size_t a = 0; a < q; a++)
                    acc += dy[r * d + q * j + a] * blocks[(j * q + a) * q + c];
                dx[r * d + q * j + c] = acc;
            }
    for (size_t j = 0; j < nb; j++)
        for (size_t a = 0; a < q; a++)
            for (size_t c = 0; c < q; c++)
                for (size_t r = 0; r < rows; r++)
                    dblocks[(j * q + a) * q + c] += dy[r * d + q * j + a] * x[r * d + q * j + c];
}

/* Dense BD [d, d] from blocks. */
static void ref_bd_dense(const double *blocks, size_t nb, size_t q, double *bd) {
    size_t d = nb * q;
    memset(bd, 0, d * d * sizeof *bd);
    for (size_t j = 0; j < nb; j++)
        for (size_t a = 0; a < q; a++)
            for (size_t c = 0; c < q; c++)
                bd[(q * j + a) * d + q * j + c] = blocks[(j * q + a) * q + c];
}

static void ref_matmul(const double *a, const double *b, size_t m, size_t k, size_t n, double *c) {
    for (size_t i = 0; i < m; i++)
        for (size_t j = 0; j < n; j++) {
            double acc = 0;
            for (size_t p = 0; p < k; p++)
                acc += a[i * k + p] * b[p * n + j];
            c[i * n + j] = acc;
        }
}

/* ------------------------------------------------------------------ tests: block-diagonal */

static void check_bd_forward(clh_ctx *ctx, int ndim, const int64_t *xshape, size_t nb, size_t q,
                             size_t offset, uint32_t seed) {
    size_t d = nb * q, numel = 1;
    for (int i = 0; i < ndim; i++)
        numel *= (size_t)xshape[i];
    size_t rows = numel / d;
    float *x = tu_random_floats(numel, -1, 1, seed),
          *blk = tu_random_floats(nb * q * q, -1, 1, seed + 1);
    clh_tensor *tx = tu_put(ctx, offset, ndim, xshape, x);
    clh_tensor *tb = tu_put(ctx, 0, 3, SHAPE((int64_t)nb, (int64_t)q, (int64_t)q), blk);
    clh_tensor *ty = tu_put(ctx, offset + 1, ndim, xshape, NULL);
    TU_OK(clh_blockdiag_forward(ctx, tx, tb, ty));
    double *xd = tu_to_double(x, numel), *bd = tu_to_double(blk, nb * q * q),
           *want = tu_alloc_doubles(numel);
    ref_bd_forward(xd, bd, rows, nb, q, want);
    expect_close("blockdiag forward", ty, want, numel, DEV_TOL);
    clh_tensor_release(tx);
    clh_tensor_release(tb);
    clh_tensor_release(ty);
    free(x);
    free(blk);
    free(xd);
    free(bd);
    free(want);
}

static void test_blockdiag_forward(void **state) {
    (void)state;
    TU_CTX_OR_SKIP(ctx);
    check_bd_forward(ctx, 2, SHAPE(7, 12), 3, 4, 0, 1);
    check_bd_forward(ctx, 3, SHAPE(2, 5, 16), 2, 8, 5, 2);
    check_bd_forward(ctx, 2, SHAPE(1, 8), 1, 8, 3, 3);
}

typedef struct bd_fd {
    const double *x, *blocks, *g;
    size_t rows, nb, q;
    int wrt_x; /* 1: the variable is x, 0: blocks */
} bd_fd;

/* L = sum(g . y(x, blocks)) */
static double bd_loss(const double *v, void *data) {
    bd_fd *p = data;
    size_t n = p->rows * p->nb * p->q;
    double *y = tu_alloc_doubles(n);
    ref_bd_forward(p->wrt_x ? v : p->x, p->wrt_x ? p->blocks : v, p->rows, p->nb, p->q, y);
    double l = dot_d(y, p->g, n);
    free(y);
    return l;
}

static void test_blockdiag_backward(void **state) {
    (void)state;
    TU_CTX_OR_SKIP(ctx);
    const size_t rows = 5, nb = 3, q = 4, d = nb * q, nx = rows * d, nbq = nb * q * q;
    float *x = tu_random_floats(nx, -1, 1, 10), *blk = tu_random_floats(nbq, -1, 1, 11);
    float *dy = tu_random_floats(nx, -1, 1, 12), *db0 = tu_random_floats(nbq, -1, 1, 13);
    double *xd = tu_to_double(x, nx), *bd = tu_to_double(blk, nbq), *dyd = tu_to_double(dy, nx);
    double *dx_ref = tu_alloc_doubles(nx), *db_ref = tu_to_double(db0, nbq);
    ref_bd_backward(xd, bd, dyd, rows, nb, q, dx_ref, db_ref);

    /* reference backward vs finite differences (dblocks from a zero start) */
    double *db_zero = tu_alloc_doubles(nbq), *num = tu_alloc_doubles(nx > nbq ? nx : nbq);
    double *dx_tmp = tu_alloc_doubles(nx);
    ref_bd_backward(xd, bd, dyd, rows, nb, q, dx_tmp, db_zero);
    bd_fd p = {xd, bd, dyd, rows, nb, q, 1};
    numeric_grad(bd_loss, xd, nx, &p, num);
    expect_fd("blockdiag dx", dx_tmp, num, nx);
    p.wrt_x = 0;
    numeric_grad(bd_loss, bd, nbq, &p, num);
    expect_fd("blockdiag dblocks", db_zero, num, nbq);

    clh_tensor *tx = tu_put(ctx, 2, 2, SHAPE(rows, d), x);
    clh_tensor *tb = tu_put(ctx, 0, 3, SHAPE(nb, q, q), blk);
    clh_tensor *tdy = tu_put(ctx, 1, 2, SHAPE(rows, d), dy);
    clh_tensor *tdx = tu_put(ctx, 3, 2, SHAPE(rows, d), NULL);
    clh_tensor *tdb = tu_put(ctx, 4, 3, SHAPE(nb, q, q), db0);
    TU_OK(clh_blockdiag_backward(ctx, tx, tb, tdy, tdx, tdb));
    expect_close("blockdiag dx", tdx, dx_ref, nx, DEV_TOL);
    expect_close("blockdiag dblocks (accumulated)", tdb, db_ref, nbq, DEV_TOL);
    /* NULL outputs are skipped: dblocks alone accumulates once more */
    TU_OK(clh_blockdiag_backward(ctx, tx, tb, tdy, NULL, tdb));
    for (size_t i = 0; i < nbq; i++)
        db_ref[i] += db_zero[i];
    expect_close("blockdiag dblocks (twice)", tdb, db_ref, nbq, DEV_TOL);
    TU_OK(clh_blockdiag_backward(ctx, tx, tb, tdy, tdx, NULL));
    expect_close("blockdiag dx (dblocks NULL)", tdx, dx_ref, nx, DEV_TOL);

    clh_tensor *ts[] = {tx, tb, tdy, tdx, tdb};
    for (int i = 0; i < 5; i++)
        clh_tensor_release(ts[i]);
    void *fs[] = {x, blk, dy, db0, xd, bd, dyd, dx_ref, db_ref, db_zero, num, dx_tmp};
    for (int i = 0; i < 12; i++)
        free(fs[i]);
}

static void test_blockdiag_fold(void **state) {
    (void)state;
    TU_CTX_OR_SKIP(ctx);
    const size_t nb = 3, q = 4, d = nb * q, nbq = nb * q * q;
    float *w = tu_random_floats(d * d, -1, 1, 20), *blk = tu_random_floats(nbq, -1, 1, 21);
    double *wd = tu_to_double(w, d * d), *bdense = tu_alloc_doubles(d * d),
           *want = tu_alloc_doubles(d * d);
    double *blkd = tu_to_double(blk, nbq);
    ref_bd_dense(blkd, nb, q, bdense);
    clh_tensor *tw = tu_put(ctx, 1, 2, SHAPE(d, d), w);
    clh_tensor *tb = tu_put(ctx, 2, 3, SHAPE(nb, q, q), blk);
    clh_tensor *out = tu_put(ctx, 3, 2, SHAPE(d, d), NULL);
    TU_OK(clh_blockdiag_fold(ctx, tw, tb, 0, out));
    ref_matmul(wd, bdense, d, d, d, want);
    expect_close("fold w . BD", out, want, d * d, DEV_TOL);
    TU_OK(clh_blockdiag_fold(ctx, tw, tb, 1, out));
    ref_matmul(bdense, wd, d, d, d, want);
    expect_close("fold BD . w", out, want, d * d, DEV_TOL);

    /* the input-side fold is what the forward applies: x (w BD)^T = (x BD^T) w^T */
    const size_t rows = 3;
    float *x = tu_random_floats(rows * d, -1, 1, 22);
    clh_tensor *tx = tu_put(ctx, 0, 2, SHAPE(rows, d), x);
    clh_tensor *txr = tu_put(ctx, 0, 2, SHAPE(rows, d), NULL);
    clh_tensor *y1 = tu_put(ctx, 0, 2, SHAPE(rows, d), NULL);
    clh_tensor *y2 = tu_put(ctx, 0, 2, SHAPE(rows, d), NULL);
    TU_OK(clh_blockdiag_fold(ctx, tw, tb, 0, out));
    TU_OK(clh_linear(ctx, tx, out, NULL, y1));
    TU_OK(clh_blockdiag_forward(ctx, tx, tb, txr));
    TU_OK(clh_linear(ctx, txr, tw, NULL, y2));
    float *g1 = tu_fetch(y1), *g2 = tu_fetch(y2);
    TU_ASSERT_CLOSE(g1, g2, rows * d, 1e-5, 1e-6);
    /* output side: (x w^T) BD^T = x (BD w)^T */
    TU_OK(clh_blockdiag_fold(ctx, tw, tb, 1, out));
    TU_OK(clh_linear(ctx, tx, out, NULL, y1));
    TU_OK(clh_linear(ctx, tx, tw, NULL, txr));
    TU_OK(clh_blockdiag_forward(ctx, txr, tb, y2));
    float *h1 = tu_fetch(y1), *h2 = tu_fetch(y2);
    TU_ASSERT_CLOSE(h1, h2, rows * d, 1e-5, 1e-6);

    clh_tensor *ts[] = {tw, tb, out, tx, txr, y1, y2};
    for (int i = 0; i < 7; i++)
        clh_tensor_release(ts[i]);
    void *fs[] = {w, blk, wd, bdense, want, blkd, x, g1, g2, h1, h2};
    for (int i = 0; i < 11; i++)
        free(fs[i]);
}

static void test_blockdiag_errors(void **state) {
    (void)state;
    TU_CTX_OR_SKIP(ctx);
    clh_tensor *x = tu_put(ctx, 0, 2, SHAPE(3, 12), NULL);
    clh_tensor *y = tu_put(ctx, 0, 2, SHAPE(3, 12), NULL);
    clh_tensor *blk = tu_put(ctx, 0, 3, SHAPE(3, 4, 4), NULL);
    clh_tensor *bad_blk = tu_put(ctx, 0, 3, SHAPE(2, 4, 4), NULL);
    clh_tensor *rect = tu_put(ctx, 0, 3, SHAPE(3, 4, 5), NULL);
    clh_tensor *y_bad = tu_put(ctx, 0, 2, SHAPE(3, 8), NULL);
    clh_tensor *w = tu_put(ctx, 0, 2, SHAPE(12, 12), NULL);
    TU_FAILS(clh_blockdiag_forward(ctx, x, bad_blk, y), CLH_ERR_SHAPE, "cover 8 features");
    TU_FAILS(clh_blockdiag_forward(ctx, x, rect, y), CLH_ERR_SHAPE, "expected [b, q, q]");
    TU_FAILS(clh_blockdiag_forward(ctx, x, blk, y_bad), CLH_ERR_SHAPE, "y [3, 8]");
    TU_FAILS(clh_blockdiag_forward(ctx, x, blk, x), CLH_ERR_INVALID_ARGUMENT, "must not alias");
    TU_FAILS(clh_blockdiag_forward(ctx, x, NULL, y), CLH_ERR_INVALID_ARGUMENT, "blocks is NULL");
    TU_FAILS(clh_blockdiag_forward(NULL, x, blk, y), CLH_ERR_INVALID_ARGUMENT, "NULL context");
    TU_FAILS(clh_blockdiag_backward(ctx, x, blk, y_bad, NULL, NULL), CLH_ERR_SHAPE, "dy");
    TU_FAILS(clh_blockdiag_backward(ctx, x, blk, y, NULL, bad_blk), CLH_ERR_SHAPE, "dblocks");
    TU_FAILS(clh_blockdiag_fold(ctx, w, blk, 2, y), CLH_ERR_INVALID_ARGUMENT, "side = 2");
    TU_FAILS(clh_blockdiag_fold(ctx, w, blk, 0, x), CLH_ERR_SHAPE, "w_out");
    TU_FAILS(clh_blockdiag_fold(ctx, w, blk, 0, w), CLH_ERR_INVALID_ARGUMENT, "must not alias");
    TU_FAILS(clh_blockdiag_fold(ctx, x, blk, 1, y), CLH_ERR_SHAPE, "cover 12 features");
    clh_tensor *ts[] = {x, y, blk, bad_blk, rect, y_bad, w};
    for (int i = 0; i < 7; i++)
        clh_tensor_release(ts[i]);
}

/* ------------------------------------------------------------------ reference: inverse, Cayley */

/* Gauss-Jordan with partial pivoting in double; returns 0 when singular. */
static int ref_inverse(const double *a, double *inv, size_t m) {
    double *w = tu_alloc_doubles(m * m);
    memcpy(w, a, m * m * sizeof *w);
    for (size_t i = 0; i < m * m; i++)
        inv[i] = i / m == i % m;
    int ok = 1;
    for (size_t k = 0; k < m && ok; k++) {
        size_t p = k;
        for (size_t i = k + 1; i < m; i++)
            if (fabs(w[i * m + k]) > fabs(w[p * m + k]))
                p = i;
        if (fabs(w[p * m + k]) < 1e-300) {
            ok = 0;
            break;
        }
        for (size_t c = 0; c < m; c++) {
            double t = w[k * m + c];
            w[k * m + c] = w[p * m + c];
            w[p * m + c] = t;
            t = inv[k * m + c];
            inv[k * m + c] = inv[p * m + c];
            inv[p * m + c] = t;
        }
        double piv = w[k * m + k];
        for (size_t c = 0; c < m; c++) {
            w[k * m + c] /= piv;
            inv[k * m + c] /= piv;
        }
        for (size_t i = 0; i < m; i++) {
            if (i == k)
                continue;
            double f = w[i * m + k];
            for (size_t c = 0; c < m; c++) {
                w[i * m + c] -= f * w[k * m + c];
                inv[i * m + c] -= f * inv[k * m + c];
            }
        }
    }
    free(w);
    return ok;
}

static void ref_transpose(const double *a, size_t m, double *t) {
    for (size_t i = 0; i < m; i++)
        for (size_t j = 0; j < m; j++)
            t[j * m + i] = a[i * m + j];
}

/* One block: S = (raw - raw^T)/2, X = (I + S)^-1, R = (I - S) X. */
static void ref_cayley_one(const double *raw, size_t m, double *r, double *x_out) {
    double *a = tu_alloc_doubles(m * m), *ims = tu_alloc_doubles(m * m),
           *x = tu_alloc_doubles(m * m);
    for (size_t i = 0; i < m; i++)
        for (size_t j = 0; j < m; j++) {
            double s = 0.5 * (raw[i * m + j] - raw[j * m + i]);
            a[i * m + j] = (i == j) + s;
            ims[i * m + j] = (i == j) - s;
        }
    assert_true(ref_inverse(a, x, m));
    ref_matmul(ims, x, m, m, m, r);
    if (x_out)
        memcpy(x_out, x, m * m * sizeof *x);
    free(a);
    free(ims);
    free(x);
}

static void ref_cayley(const double *raw, size_t n, size_t m, double *r) {
    for (size_t b = 0; b < n; b++)
        ref_cayley_one(raw + b * m * m, m, r + b * m * m, NULL);
}

/* The chain rule step by step (not the simplified form the library uses):
 * dX = (I - S)^T dR, dS = -dR X^T + dA with dA = -X^T dX X^T, draw = (dS - dS^T)/2. */
static void ref_cayley_backward(const double *raw, const double *dr, size_t n, size_t m,
                                double *draw) {
    size_t mm = m * m;
    double *r = tu_alloc_doubles(mm), *x = tu_alloc_doubles(mm), *xt = tu_alloc_doubles(mm);
    double *imst = tu_alloc_doubles(mm), *dx = tu_alloc_doubles(mm), *t = tu_alloc_doubles(mm);
    double *ds = tu_alloc_doubles(mm), *da = tu_alloc_doubles(mm);
    for (size_t b = 0; b < n; b++) {
        const double *rb = raw + b * mm, *drb = dr + b * mm;
        ref_cayley_one(rb, m, r, x);
        ref_transpose(x, m, xt);
        for (size_t i = 0; i < m; i++)
            for (size_t j = 0; j < m; j++) /* (I - S)^T = I + S */
                imst[i * m + j] = (i == j) + 0.5 * (rb[i * m + j] - rb[j * m + i]);
        ref_matmul(imst, drb, m, m, m, dx);
        ref_matmul(drb, xt, m, m, m, ds); /* dR X^T */
        ref_matmul(xt, dx, m, m, m, t);
        ref_matmul(t, xt, m, m, m, da);
        for (size_t i = 0; i < mm; i++)
            ds[i] = -ds[i] - da[i];
        for (size_t i = 0; i < m; i++)
            for (size_t j = 0; j < m; j++)
                draw[b * mm + i * m + j] = 0.5 * (ds[i * m + j] - ds[j * m + i]);
    }
    void *fs[] = {r, x, xt, imst, dx, t, ds, da};
    for (int i = 0; i < 8; i++)
        free(fs[i]);
}

/* ------------------------------------------------------------------ tests: inverse */

/* Overwrite the local-memory size the context reports: 0 makes clh_batched_inverse take
 * its global-memory variant (it reads the field at each launch). Tests restore it. */
static void set_local_mem(clh_ctx *ctx, unsigned long long bytes) {
    ((clh_device_info *)clh_ctx_device(ctx))->local_mem = bytes;
}

/* Inverse of n random matrices (I * diag + uniform noise) on both variants. */
static void check_inverse(clh_ctx *ctx, size_t n, size_t m, const float *a, const char *what) {
    size_t total = n * m * m;
    double *ad = tu_to_double(a, total), *want = tu_alloc_doubles(total);
    for (size_t b = 0; b < n; b++)
        assert_true(ref_inverse(ad + b * m * m, want + b * m * m, m));
    clh_tensor *ta = tu_put(ctx, 3, 3, SHAPE(n, m, m), a);
    clh_tensor *ti = tu_put(ctx, 1, 3, SHAPE(n, m, m), NULL);
    unsigned long long local = clh_ctx_device(ctx)->local_mem;
    for (int variant = 0; variant < 2; variant++) {
        if (variant == 1)
            set_local_mem(ctx, 0);
        clh_status st = clh_batched_inverse(ctx, ta, ti);
        set_local_mem(ctx, local);
        TU_OK(st);
        float *got = tu_fetch(ti);
        double e = rel_err(got, want, total);
        /* A A^-1 - I, max abs entry */
        double resid = 0;
        for (size_t b = 0; b < n; b++)
            for (size_t i = 0; i < m; i++)
                for (size_t j = 0; j < m; j++) {
                    double acc = 0;
                    for (size_t k = 0; k < m; k++)
                        acc += ad[b * m * m + i * m + k] * got[b * m * m + k * m + j];
                    resid = fmax(resid, fabs(acc - (i == j)));
                }
        print_message("inverse %s (%s memory): rel err %.2e, |A A^-1 - I|max %.2e\n", what,
                      variant ? "global" : "local", e, resid);
        if (!(e <= 1e-5 * (double)m && resid <= 1e-5))
            fail_msg("inverse %s (%s variant): rel err %.3g, residual %.3g", what,
                     variant ? "global" : "local", e, resid);
        free(got);
    }
    clh_tensor_release(ta);
    clh_tensor_release(ti);
    free(ad);
    free(want);
}

/* m x m matrices I * 1 + noise / sqrt(m): well conditioned. */
static float *well_conditioned(size_t n, size_t m, uint32_t seed) {
    float *a = normal_floats(n * m * m, (float)(0.5 / sqrt((double)m)), seed);
    for (size_t b = 0; b < n; b++)
        for (size_t i = 0; i < m; i++)
            a[b * m * m + i * m + i] += 1.0f;
    return a;
}

static void test_inverse_small(void **state) {
    (void)state;
    TU_CTX_OR_SKIP(ctx);
    float *a = well_conditioned(3, 5, 30);
    check_inverse(ctx, 3, 5, a, "3 x 5x5");
    free(a);
    float *one = well_conditioned(1, 1, 31);
    check_inverse(ctx, 1, 1, one, "1 x 1x1");
    free(one);
}

static void test_inverse_128(void **state) {
    (void)state;
    TU_CTX_OR_SKIP(ctx);
    float *a = well_conditioned(3, 128, 32);
    check_inverse(ctx, 3, 128, a, "3 x 128x128");
    free(a);
}

/* Zeros on the diagonal: no step can go without a row swap. */
static void test_inverse_pivoting(void **state) {
    (void)state;
    TU_CTX_OR_SKIP(ctx);
    const size_t m = 6;
    float a[2 * 6 * 6];
    tu_fill_random(a, 2 * m * m, -0.1f, 0.1f, 33);
    for (size_t b = 0; b < 2; b++)
        for (size_t i = 0; i < m; i++) {
            a[b * m * m + i * m + i] = 0.0f;
            a[b * m * m + i * m + (i + 1 + b) % m] = 2.0f; /* a shifted permutation */
        }
    check_inverse(ctx, 2, m, a, "2 x 6x6, zero diagonal");
}

static void test_inverse_singular(void **state) {
    (void)state;
    TU_CTX_OR_SKIP(ctx);
    const size_t m = 4;
    float *a = well_conditioned(3, m, 34);
    /* matrix 1: column 2 is zero, so elimination meets an exactly zero pivot there (a
     * rounding-level pivot, as from two equal rows, is above the 1e-30 threshold) */
    for (size_t r = 0; r < m; r++)
        a[m * m + r * m + 2] = 0.0f;
    clh_tensor *ta = tu_put(ctx, 0, 3, SHAPE(3, m, m), a);
    clh_tensor *ti = tu_put(ctx, 0, 3, SHAPE(3, m, m), NULL);
    unsigned long long local = clh_ctx_device(ctx)->local_mem;
    TU_FAILS(
        clh_batched_inverse(ctx, ta, ti), CLH_ERR_INVALID_ARGUMENT,
        "matrix 1 of 3 is singular (or not finite): no pivot of magnitude >= 1e-30 in column 2");
    set_local_mem(ctx, 0);
    clh_status st = clh_batched_inverse(ctx, ta, ti);
    set_local_mem(ctx, local);
    assert_int_equal(st, CLH_ERR_INVALID_ARGUMENT);
    assert_true(tu_contains(clh_last_error(), "matrix 1 of 3"));
    /* an all-zero matrix 2 as well: the first one is named */
    memset(a + 2 * m * m, 0, m * m * sizeof *a);
    TU_OK(clh_tensor_upload(ta, a, 3 * m * m));
    TU_FAILS(clh_batched_inverse(ctx, ta, ti), CLH_ERR_INVALID_ARGUMENT, "matrix 1 of 3");
    /* a NaN makes the matrix unusable */
    float *b = well_conditioned(3, m, 35);
    for (size_t i = 0; i < m * m; i++)
        b[2 * m * m + i] = NAN;
    TU_OK(clh_tensor_upload(ta, b, 3 * m * m));
    TU_FAILS(clh_batched_inverse(ctx, ta, ti), CLH_ERR_INVALID_ARGUMENT, "matrix 2 of 3");
    /* shapes */
    clh_tensor *rect = tu_put(ctx, 0, 3, SHAPE(3, m, m + 1), NULL);
    clh_tensor *small = tu_put(ctx, 0, 3, SHAPE(2, m, m), NULL);
    TU_FAILS(clh_batched_inverse(ctx, rect, ti), CLH_ERR_SHAPE, "expected [n, m, m]");
    TU_FAILS(clh_batched_inverse(ctx, ta, small), CLH_ERR_SHAPE, "inv has shape [2, 4, 4]");
    TU_FAILS(clh_batched_inverse(ctx, ta, ta), CLH_ERR_INVALID_ARGUMENT, "must not alias");
    clh_tensor_release(ta);
    clh_tensor_release(ti);
    clh_tensor_release(rect);
    clh_tensor_release(small);
    free(a);
    free(b);
}

/* ------------------------------------------------------------------ tests: Cayley */

static void test_cayley_forward(void **state) {
    (void)state;
    TU_CTX_OR_SKIP(ctx);
    const size_t sizes[2][2] = {{3, 4}, {2, 8}};
    for (int c = 0; c < 2; c++) {
        size_t n = sizes[c][0], m = sizes[c][1], total = n * m * m;
        float *raw = normal_floats(total, 0.7f, 40 + (uint32_t)c);
        double *rawd = tu_to_double(raw, total), *want = tu_alloc_doubles(total);
        double *want_inv = tu_alloc_doubles(total), *r1 = tu_alloc_doubles(m * m);
        ref_cayley(rawd, n, m, want);
        for (size_t b = 0; b < n; b++)
            ref_cayley_one(rawd + b * m * m, m, r1, want_inv + b * m * m);
        clh_tensor *traw = tu_put(ctx, 1, 3, SHAPE(n, m, m), raw);
        clh_tensor *tr = tu_put(ctx, 2, 3, SHAPE(n, m, m), NULL);
        clh_tensor *tinv = tu_put(ctx, 3, 3, SHAPE(n, m, m), NULL);
        TU_OK(clh_cayley_forward(ctx, traw, tr, tinv));
        expect_close("cayley R", tr, want, total, DEV_TOL);
        expect_close("cayley inv", tinv, want_inv, total, DEV_TOL);
        TU_OK(clh_cayley_forward(ctx, traw, tr, NULL));
        expect_close("cayley R (no inv)", tr, want, total, DEV_TOL);
        /* r may overwrite raw */
        TU_OK(clh_cayley_forward(ctx, traw, traw, NULL));
        expect_close("cayley R in place", traw, want, total, DEV_TOL);
        clh_tensor_release(traw);
        clh_tensor_release(tr);
        clh_tensor_release(tinv);
        free(raw);
        free(rawd);
        free(want);
        free(want_inv);
        free(r1);
    }
}

/* Cayley(0) = I exactly, and a symmetric raw has no skew part. */
static void test_cayley_identity(void **state) {
    (void)state;
    TU_CTX_OR_SKIP(ctx);
    const size_t n = 2, m = 8, total = n * m * m;
    float *raw = tu_random_floats(total, -1, 1, 45);
    for (size_t b = 0; b < n; b++)
        for (size_t i = 0; i < m; i++)
            for (size_t j = 0; j < i; j++)
                raw[b * m * m + i * m + j] = raw[b * m * m + j * m + i];
    clh_tensor *traw = tu_put(ctx, 0, 3, SHAPE(n, m, m), raw);
    clh_tensor *tr = tu_put(ctx, 0, 3, SHAPE(n, m, m), NULL);
    TU_OK(clh_cayley_forward(ctx, traw, tr, NULL));
    float *got = tu_fetch(tr);
    for (size_t i = 0; i < total; i++)
        if (got[i] != (float)((i % (m * m)) / m == i % m))
            fail_msg("Cayley of a symmetric raw: element %zu is %g, not exactly identity", i,
                     (double)got[i]);
    clh_tensor_release(traw);
    clh_tensor_release(tr);
    free(raw);
    free(got);
}

/* ||R^T R - I|| per block, maximised over blocks: as the largest absolute entry, and as the
 * induced infinity norm (largest absolute row sum) in *row_norm. */
static double orthogonality_error_norms(const float *r, size_t n, size_t m, double *row_norm) {
    double worst = 0, worst_row = 0;
    for (size_t b = 0; b < n; b++) {
        const float *rb = r + b * m * m;
        for (size_t i = 0; i < m; i++) {
            double row = 0;
            for (size_t j = 0; j < m; j++) {
                double acc = 0;
                for (size_t k = 0; k < m; k++)
                    acc += (double)rb[k * m + i] * rb[k * m + j];
                worst = fmax(worst, fabs(acc - (i == j)));
                row += fabs(acc - (i == j));
            }
            worst_row = fmax(worst_row, row);
        }
    }
    if (row_norm)
        *row_norm = worst_row;
    return worst;
}

static double orthogonality_error(const float *r, size_t n, size_t m) {
    return orthogonality_error_norms(r, n, m, NULL);
}

static void test_cayley_orthogonality_128(void **state) {
    (void)state;
    TU_CTX_OR_SKIP(ctx);
    const size_t n = 4, m = 128, total = n * m * m;
    const float stds[2] = {0.1f, 1.0f};
    for (int c = 0; c < 2; c++) {
        float *raw = normal_floats(total, stds[c], 50 + (uint32_t)c);
        clh_tensor *traw = tu_put(ctx, 0, 3, SHAPE(n, m, m), raw);
        clh_tensor *tr = tu_put(ctx, 0, 3, SHAPE(n, m, m), NULL);
        TU_OK(clh_cayley_forward(ctx, traw, tr, NULL));
        float *r = tu_fetch(tr);
        double row_norm;
        double e = orthogonality_error_norms(r, n, m, &row_norm);
        /* against the double reference for one block */
        double *rawd = tu_to_double(raw, m * m), *want = tu_alloc_doubles(m * m);
        ref_cayley(rawd, 1, m, want);
        double rel = rel_err(r, want, m * m);
        print_message("Cayley q=128, raw ~ N(0, %.1f): |R^T R - I|max = %.2e, induced inf-norm "
                      "%.2e, rel err vs double %.2e\n",
                      (double)stds[c], e, row_norm, rel);
        if (!(e <= 1e-5))
            fail_msg("|R^T R - I|max = %.3g > 1e-5 for raw ~ N(0, %g)", e, (double)stds[c]);
        if (!(rel <= 1e-4))
            fail_msg("R vs double reference: %.3g", rel);
        clh_tensor_release(traw);
        clh_tensor_release(tr);
        free(raw);
        free(r);
        free(rawd);
        free(want);
    }
}

typedef struct cayley_fd {
    const double *g;
    size_t n, m;
} cayley_fd;

static double cayley_loss(const double *raw, void *data) {
    cayley_fd *p = data;
    size_t total = p->n * p->m * p->m;
    double *r = tu_alloc_doubles(total);
    ref_cayley(raw, p->n, p->m, r);
    double l = dot_d(r, p->g, total);
    free(r);
    return l;
}

static void test_cayley_backward(void **state) {
    (void)state;
    TU_CTX_OR_SKIP(ctx);
    const size_t sizes[2][2] = {{3, 4}, {2, 8}};
    for (int c = 0; c < 2; c++) {
        size_t n = sizes[c][0], m = sizes[c][1], total = n * m * m;
        float *raw = normal_floats(total, 0.7f, 60 + (uint32_t)c);
        float *dr = tu_random_floats(total, -1, 1, 62 + (uint32_t)c);
        double *rawd = tu_to_double(raw, total), *drd = tu_to_double(dr, total);
        double *want = tu_alloc_doubles(total), *num = tu_alloc_doubles(total);
        ref_cayley_backward(rawd, drd, n, m, want);
        cayley_fd p = {drd, n, m};
        numeric_grad(cayley_loss, rawd, total, &p, num);
        expect_fd("cayley draw", want, num, total);
        double fd_err = rel_err_d(want, num, total);

        clh_tensor *traw = tu_put(ctx, 1, 3, SHAPE(n, m, m), raw);
        clh_tensor *tr = tu_put(ctx, 0, 3, SHAPE(n, m, m), NULL);
        clh_tensor *tinv = tu_put(ctx, 2, 3, SHAPE(n, m, m), NULL);
        clh_tensor *tdr = tu_put(ctx, 3, 3, SHAPE(n, m, m), dr);
        clh_tensor *tdraw = tu_put(ctx, 4, 3, SHAPE(n, m, m), NULL);
        TU_OK(clh_cayley_forward(ctx, traw, tr, tinv));
        TU_OK(clh_cayley_backward(ctx, traw, tinv, tdr, tdraw));
        double dev_err = expect_close("cayley draw", tdraw, want, total, DEV_TOL);
        print_message("Cayley backward n=%zu q=%zu: ref vs FD %.2e, device vs ref %.2e\n", n, m,
                      fd_err, dev_err);
        /* draw may overwrite dr */
        TU_OK(clh_cayley_backward(ctx, traw, tinv, tdr, tdr));
        expect_close("cayley draw in place", tdr, want, total, DEV_TOL);
        clh_tensor *ts[] = {traw, tr, tinv, tdr, tdraw};
        for (int i = 0; i < 5; i++)
            clh_tensor_release(ts[i]);
        void *fs[] = {raw, dr, rawd, drd, want, num};
        for (int i = 0; i < 6; i++)
            free(fs[i]);
    }
}

static void test_cayley_errors(void **state) {
    (void)state;
    TU_CTX_OR_SKIP(ctx);
    clh_tensor *raw = tu_put(ctx, 0, 3, SHAPE(2, 4, 4), NULL);
    clh_tensor *r = tu_put(ctx, 0, 3, SHAPE(2, 4, 4), NULL);
    clh_tensor *inv = tu_put(ctx, 0, 3, SHAPE(2, 4, 4), NULL);
    clh_tensor *bad = tu_put(ctx, 0, 3, SHAPE(2, 4, 3), NULL);
    clh_tensor *other = tu_put(ctx, 0, 3, SHAPE(3, 4, 4), NULL);
    TU_FAILS(clh_cayley_forward(ctx, bad, r, NULL), CLH_ERR_SHAPE, "raw has shape [2, 4, 3]");
    TU_FAILS(clh_cayley_forward(ctx, raw, other, NULL), CLH_ERR_SHAPE, "r has shape");
    TU_FAILS(clh_cayley_forward(ctx, raw, r, other), CLH_ERR_SHAPE, "inv has shape");
    TU_FAILS(clh_cayley_forward(ctx, raw, r, r), CLH_ERR_INVALID_ARGUMENT, "must not alias");
    /* raw is NaN-filled by tu_put(): I + S cannot be inverted */
    TU_FAILS(clh_cayley_forward(ctx, raw, r, inv), CLH_ERR_INVALID_ARGUMENT, "inf or NaN");
    TU_FAILS(clh_cayley_backward(ctx, raw, inv, other, r), CLH_ERR_SHAPE, "dr has shape");
    TU_FAILS(clh_cayley_backward(ctx, raw, inv, r, inv), CLH_ERR_INVALID_ARGUMENT,
             "must not alias");
    TU_FAILS(clh_cayley_backward(ctx, raw, NULL, r, r), CLH_ERR_INVALID_ARGUMENT, "inv is NULL");
    clh_tensor *ts[] = {raw, r, inv, bad, other};
    for (int i = 0; i < 5; i++)
        clh_tensor_release(ts[i]);
}

/* ------------------------------------------------------------------ reference: DCRC */

typedef struct dcrc_sizes {
    size_t q, lt, lv, bt, bv, layers, slots, mods, blocks;
} dcrc_sizes;

static dcrc_sizes sizes_of(const clh_dcrc_layout *l) {
    dcrc_sizes s;
    s.q = (size_t)l->q;
    s.lt = (size_t)l->text_layers;
    s.lv = (size_t)l->vision_layers;
    s.bt = (size_t)l->text_blocks;
    s.bv = (size_t)l->vision_blocks;
    s.layers = s.lt > s.lv ? s.lt : s.lv;
    s.slots = 4 * s.layers;
    s.mods = s.bt + s.bv;
    s.blocks = 4 * (s.lt * s.bt + s.lv * s.bv);
    return s;
}

/* Raw block index of (encoder e, layer l, type t, block j). */
static size_t raw_index(const dcrc_sizes *s, int e, size_t l, size_t t, size_t j) {
    return e == 0 ? (l * 4 + t) * s->bt + j : 4 * s->lt * s->bt + (l * 4 + t) * s->bv + j;
}

/* The spec's formulation (hclip-spec 3.2): U = P mixed over m by A_l, keep this
 * encoder's blocks, V = mixed over slots by B, take the layer's four slots. NULL a / b:
 * identity. */
static void ref_dcrc_forward(const dcrc_sizes *s, const double *p, const double *a, const double *b,
                             double *raw) {
    size_t q2 = s->q * s->q, sm = s->slots * s->mods;
    double *u = tu_alloc_doubles(q2 * sm);
    for (int e = 0; e < 2; e++) {
        size_t layers = e == 0 ? s->lt : s->lv, nb = e == 0 ? s->bt : s->bv;
        for (size_t l = 0; l < layers; l++) {
            /* U[ab, s', m] = sum_m' A_l[m, m'] P[ab, s', m'] */
            for (size_t ab = 0; ab < q2; ab++)
                for (size_t sl = 0; sl < s->slots; sl++)
                    for (size_t m = 0; m < s->mods; m++) {
                        double acc = 0;
                        for (size_t m2 = 0; m2 < s->mods; m2++) {
                            double av = a ? a[(l * s->mods + m) * s->mods + m2] : (m == m2);
                            acc += av * p[ab * sm + sl * s->mods + m2];
                        }
                        u[ab * sm + sl * s->mods + m] = acc;
                    }
            for (size_t t = 0; t < 4; t++)
                for (size_t j = 0; j < nb; j++) {
                    size_t mj = e == 0 ? j : s->bt + j, slot = 4 * l + t;
                    double *dst = raw + raw_index(s, e, l, t, j) * q2;
                    for (size_t ab = 0; ab < q2; ab++) {
                        double acc = 0;
                        for (size_t s2 = 0; s2 < s->slots; s2++) {
                            double bv = b ? b[slot * s->slots + s2] : (slot == s2);
                            acc += bv * u[ab * sm + s2 * s->mods + mj];
                        }
                        dst[ab] = acc;
                    }
                }
        }
    }
    free(u);
}

/* dP, dA, dB (accumulated) of L = sum(draw . raw): raw is bilinear in (B, A) times P,
 * so each gradient is the sum of draw times the other two factors. */
static void ref_dcrc_backward(const dcrc_sizes *s, const double *p, const double *a,
                              const double *b, const double *draw, double *dp, double *da,
                              double *db) {
    size_t q2 = s->q * s->q, sm = s->slots * s->mods;
    for (int e = 0; e < 2; e++) {
        size_t layers = e == 0 ? s->lt : s->lv, nb = e == 0 ? s->bt : s->bv;
        for (size_t l = 0; l < layers; l++)
            for (size_t t = 0; t < 4; t++)
                for (size_t j = 0; j < nb; j++) {
                    size_t mj = e == 0 ? j : s->bt + j, slot = 4 * l + t;
                    const double *g = draw + raw_index(s, e, l, t, j) * q2;
                    for (size_t sl = 0; sl < s->slots; sl++)
                        for (size_t m = 0; m < s->mods; m++) {
                            double bv = b ? b[slot * s->slots + sl] : (slot == sl);
                            double av = a ? a[(l * s->mods + mj) * s->mods + m] : (mj == m);
                            double gp = 0; /* sum_ab draw[ab] P[ab, sl, m] */
                            for (size_t ab = 0; ab < q2; ab++) {
                                gp += g[ab] * p[ab * sm + sl * s->mods + m];
                                dp[ab * sm + sl * s->mods + m] += g[ab] * bv * av;
                            }
                            db[slot * s->slots + sl] += gp * av;
                            da[(l * s->mods + mj) * s->mods + m] += gp * bv;
                        }
                }
    }
}

/* ------------------------------------------------------------------ tests: DCRC */

static void test_dcrc_num_blocks(void **state) {
    (void)state;
    clh_dcrc_layout vit_b = {128, 12, 12, 4, 6}, vit_l = {128, 12, 24, 6, 8};
    assert_int_equal(clh_dcrc_num_blocks(&vit_b), 480);
    assert_int_equal(clh_dcrc_num_blocks(&vit_l), 1056);
    clh_dcrc_layout bad = {0, 12, 12, 4, 6};
    assert_int_equal(clh_dcrc_num_blocks(&bad), 0);
    assert_int_equal(clh_dcrc_num_blocks(NULL), 0);
}

/* A small layout with unequal layer counts (text 2, vision 3) and block counts. */
static const clh_dcrc_layout small_layout = {4, 2, 3, 2, 3};

typedef struct dcrc_case {
    dcrc_sizes s;
    size_t np, na, nb_, nraw;
    float *p, *a, *b;
    clh_tensor *tp, *ta, *tb, *traw;
} dcrc_case;

static void dcrc_case_init(clh_ctx *ctx, dcrc_case *c, uint32_t seed) {
    c->s = sizes_of(&small_layout);
    const dcrc_sizes *s = &c->s;
    c->np = s->q * s->q * s->slots * s->mods;
    c->na = s->layers * s->mods * s->mods;
    c->nb_ = s->slots * s->slots;
    c->nraw = s->blocks * s->q * s->q;
    c->p = tu_random_floats(c->np, -1, 1, seed);
    c->a = tu_random_floats(c->na, -1, 1, seed + 1);
    c->b = tu_random_floats(c->nb_, -1, 1, seed + 2);
    c->tp = tu_put(ctx, 1, 4, SHAPE(s->q, s->q, s->slots, s->mods), c->p);
    c->ta = tu_put(ctx, 2, 3, SHAPE(s->layers, s->mods, s->mods), c->a);
    c->tb = tu_put(ctx, 3, 2, SHAPE(s->slots, s->slots), c->b);
    c->traw = tu_put(ctx, 4, 3, SHAPE(s->blocks, s->q, s->q), NULL);
}

static void dcrc_case_free(dcrc_case *c) {
    clh_tensor_release(c->tp);
    clh_tensor_release(c->ta);
    clh_tensor_release(c->tb);
    clh_tensor_release(c->traw);
    free(c->p);
    free(c->a);
    free(c->b);
}

/* Identity maps: raw block (e, l, t, j) is P[:, :, 4l + t, m_e(j)]; with H-CLIP's init
 * (text blocks 0, vision blocks I) the text blocks are 0 and the vision blocks I. */
static void test_dcrc_identity(void **state) {
    (void)state;
    TU_CTX_OR_SKIP(ctx);
    dcrc_case c;
    dcrc_case_init(ctx, &c, 70);
    const dcrc_sizes *s = &c.s;
    size_t q2 = s->q * s->q, sm = s->slots * s->mods;
    float *eye_a = tu_alloc_floats(c.na), *eye_b = tu_alloc_floats(c.nb_);
    for (size_t l = 0; l < s->layers; l++)
        for (size_t m = 0; m < s->mods; m++)
            eye_a[(l * s->mods + m) * s->mods + m] = 1.0f;
    for (size_t i = 0; i < s->slots; i++)
        eye_b[i * s->slots + i] = 1.0f;
    TU_OK(clh_tensor_upload(c.ta, eye_a, c.na));
    TU_OK(clh_tensor_upload(c.tb, eye_b, c.nb_));
    double *want = tu_alloc_doubles(c.nraw);
    for (int e = 0; e < 2; e++)
        for (size_t l = 0; l < (e ? s->lv : s->lt); l++)
            for (size_t t = 0; t < 4; t++)
                for (size_t j = 0; j < (e ? s->bv : s->bt); j++)
                    for (size_t ab = 0; ab < q2; ab++)
                        want[raw_index(s, e, l, t, j) * q2 + ab] =
                            c.p[ab * sm + (4 * l + t) * s->mods + (e ? s->bt + j : j)];
    TU_OK(clh_dcrc_forward(ctx, &small_layout, c.tp, c.ta, c.tb, c.traw));
    expect_close("dcrc, identity A and B", c.traw, want, c.nraw, 0.0);
    TU_OK(clh_dcrc_forward(ctx, &small_layout, c.tp, NULL, NULL, c.traw));
    expect_close("dcrc, A and B NULL", c.traw, want, c.nraw, 0.0);

    /* H-CLIP's init of P */
    float *p0 = tu_alloc_floats(c.np);
    for (size_t a = 0; a < s->q; a++)
        for (size_t sl = 0; sl < s->slots; sl++)
            for (size_t m = s->bt; m < s->mods; m++)
                p0[(a * s->q + a) * sm + sl * s->mods + m] = 1.0f;
    TU_OK(clh_tensor_upload(c.tp, p0, c.np));
    TU_OK(clh_dcrc_forward(ctx, &small_layout, c.tp, c.ta, c.tb, c.traw));
    float *raw = tu_fetch(c.traw);
    size_t text_rows = 4 * s->lt * s->bt;
    for (size_t blk = 0; blk < s->blocks; blk++)
        for (size_t ab = 0; ab < q2; ab++) {
            float expect = blk >= text_rows && ab / s->q == ab % s->q ? 1.0f : 0.0f;
            if (raw[blk * q2 + ab] != expect)
                fail_msg("init: raw block %zu element %zu is %g, expected %g", blk, ab,
                         (double)raw[blk * q2 + ab], (double)expect);
        }
    free(raw);
    free(p0);
    free(eye_a);
    free(eye_b);
    free(want);
    dcrc_case_free(&c);
}

static void test_dcrc_forward(void **state) {
    (void)state;
    TU_CTX_OR_SKIP(ctx);
    dcrc_case c;
    dcrc_case_init(ctx, &c, 80);
    double *pd = tu_to_double(c.p, c.np), *ad = tu_to_double(c.a, c.na),
           *bd = tu_to_double(c.b, c.nb_);
    double *want = tu_alloc_doubles(c.nraw);
    for (int v = 0; v < 4; v++) {
        int use_a = v & 1, use_b = v & 2;
        ref_dcrc_forward(&c.s, pd, use_a ? ad : NULL, use_b ? bd : NULL, want);
        TU_OK(clh_dcrc_forward(ctx, &small_layout, c.tp, use_a ? c.ta : NULL, use_b ? c.tb : NULL,
                               c.traw));
        char what[64];
        snprintf(what, sizeof what, "dcrc forward (A %s, B %s)", use_a ? "set" : "NULL",
                 use_b ? "set" : "NULL");
        expect_close(what, c.traw, want, c.nraw, DEV_TOL);
    }
    free(pd);
    free(ad);
    free(bd);
    free(want);
    dcrc_case_free(&c);
}

typedef struct dcrc_fd {
    const dcrc_sizes *s;
    const double *p, *a, *b, *g;
    int wrt; /* 0: p, 1: a, 2: b */
} dcrc_fd;

static double dcrc_loss(const double *v, void *data) {
    dcrc_fd *f = data;
    size_t n = f->s->blocks * f->s->q * f->s->q;
    double *raw = tu_alloc_doubles(n);
    ref_dcrc_forward(f->s, f->wrt == 0 ? v : f->p, f->wrt == 1 ? v : f->a, f->wrt == 2 ? v : f->b,
                     raw);
    double l = dot_d(raw, f->g, n);
    free(raw);
    return l;
}

static void test_dcrc_backward(void **state) {
    (void)state;
    TU_CTX_OR_SKIP(ctx);
    dcrc_case c;
    dcrc_case_init(ctx, &c, 90);
    const dcrc_sizes *s = &c.s;
    float *draw = tu_random_floats(c.nraw, -1, 1, 93);
    float *g0p = tu_random_floats(c.np, -1, 1, 94), *g0a = tu_random_floats(c.na, -1, 1, 95);
    float *g0b = tu_random_floats(c.nb_, -1, 1, 96);
    double *pd = tu_to_double(c.p, c.np), *ad = tu_to_double(c.a, c.na),
           *bd = tu_to_double(c.b, c.nb_);
    double *gd = tu_to_double(draw, c.nraw);
    clh_tensor *tdraw = tu_put(ctx, 5, 3, SHAPE(s->blocks, s->q, s->q), draw);
    clh_tensor *tdp = tu_put(ctx, 6, 4, SHAPE(s->q, s->q, s->slots, s->mods), NULL);
    clh_tensor *tda = tu_put(ctx, 7, 3, SHAPE(s->layers, s->mods, s->mods), NULL);
    clh_tensor *tdb = tu_put(ctx, 8, 2, SHAPE(s->slots, s->slots), NULL);

    for (int v = 0; v < 4; v++) {
        int use_a = v & 1, use_b = v & 2;
        const double *a = use_a ? ad : NULL, *b = use_b ? bd : NULL;
        /* reference from zero, checked against finite differences where the map exists */
        double *dp = tu_alloc_doubles(c.np), *da = tu_alloc_doubles(c.na),
               *db = tu_alloc_doubles(c.nb_);
        ref_dcrc_backward(s, pd, a, b, gd, dp, da, db);
        if (v == 3) {
            double *num = tu_alloc_doubles(c.np);
            dcrc_fd f = {s, pd, ad, bd, gd, 0};
            numeric_grad(dcrc_loss, pd, c.np, &f, num);
            expect_fd("dcrc dP", dp, num, c.np);
            f.wrt = 1;
            numeric_grad(dcrc_loss, ad, c.na, &f, num);
            expect_fd("dcrc dA", da, num, c.na);
            f.wrt = 2;
            numeric_grad(dcrc_loss, bd, c.nb_, &f, num);
            expect_fd("dcrc dB", db, num, c.nb_);
            free(num);
        }
        /* device: accumulation onto random starting gradients */
        TU_OK(clh_tensor_upload(tdp, g0p, c.np));
        TU_OK(clh_tensor_upload(tda, g0a, c.na));
        TU_OK(clh_tensor_upload(tdb, g0b, c.nb_));
        TU_OK(clh_dcrc_backward(ctx, &small_layout, c.tp, use_a ? c.ta : NULL, use_b ? c.tb : NULL,
                                tdraw, tdp, tda, tdb));
        for (size_t i = 0; i < c.np; i++)
            dp[i] += g0p[i];
        for (size_t i = 0; i < c.na; i++)
            da[i] += g0a[i];
        for (size_t i = 0; i < c.nb_; i++)
            db[i] += g0b[i];
        char what[64];
        snprintf(what, sizeof what, "dcrc dP (A %s, B %s)", use_a ? "set" : "NULL",
                 use_b ? "set" : "NULL");
        expect_close(what, tdp, dp, c.np, DEV_TOL);
        what[6] = 'A';
        expect_close(what, tda, da, c.na, DEV_TOL);
        what[6] = 'B';
        expect_close(what, tdb, db, c.nb_, DEV_TOL);
        free(dp);
        free(da);
        free(db);
    }
    /* NULL gradients are skipped */
    TU_OK(clh_tensor_upload(tdb, g0b, c.nb_));
    TU_OK(clh_dcrc_backward(ctx, &small_layout, c.tp, c.ta, c.tb, tdraw, NULL, NULL, tdb));
    double *dp = tu_alloc_doubles(c.np), *da = tu_alloc_doubles(c.na),
           *db = tu_alloc_doubles(c.nb_);
    ref_dcrc_backward(s, pd, ad, bd, gd, dp, da, db);
    for (size_t i = 0; i < c.nb_; i++)
        db[i] += g0b[i];
    expect_close("dcrc dB alone", tdb, db, c.nb_, DEV_TOL);
    TU_OK(clh_dcrc_backward(ctx, &small_layout, c.tp, c.ta, c.tb, tdraw, NULL, NULL, NULL));

    clh_tensor *ts[] = {tdraw, tdp, tda, tdb};
    for (int i = 0; i < 4; i++)
        clh_tensor_release(ts[i]);
    void *fs[] = {draw, g0p, g0a, g0b, pd, ad, bd, gd, dp, da, db};
    for (int i = 0; i < 11; i++)
        free(fs[i]);
    dcrc_case_free(&c);
}

static void test_dcrc_errors(void **state) {
    (void)state;
    TU_CTX_OR_SKIP(ctx);
    dcrc_case c;
    dcrc_case_init(ctx, &c, 99);
    clh_dcrc_layout bad = small_layout;
    bad.q = 0;
    TU_FAILS(clh_dcrc_forward(ctx, &bad, c.tp, c.ta, c.tb, c.traw), CLH_ERR_INVALID_ARGUMENT,
             "invalid layout (q = 0");
    TU_FAILS(clh_dcrc_forward(ctx, NULL, c.tp, c.ta, c.tb, c.traw), CLH_ERR_INVALID_ARGUMENT,
             "layout is NULL");
    clh_dcrc_layout other = small_layout;
    other.vision_blocks = 2; /* M = 4, P has M = 5 */
    TU_FAILS(clh_dcrc_forward(ctx, &other, c.tp, NULL, NULL, c.traw), CLH_ERR_SHAPE,
             "p has shape [4, 4, 12, 5], expected [4, 4, 12, 4]");
    TU_FAILS(clh_dcrc_forward(ctx, &small_layout, c.tp, c.tb, NULL, c.traw), CLH_ERR_SHAPE,
             "a has shape");
    TU_FAILS(clh_dcrc_forward(ctx, &small_layout, c.tp, NULL, c.ta, c.traw), CLH_ERR_SHAPE,
             "b has shape");
    TU_FAILS(clh_dcrc_forward(ctx, &small_layout, c.tp, NULL, NULL, c.tp), CLH_ERR_SHAPE,
             "raw has shape");
    TU_FAILS(clh_dcrc_backward(ctx, &small_layout, c.tp, c.ta, c.tb, c.traw, NULL, c.tb, NULL),
             CLH_ERR_SHAPE, "da has shape");
    TU_FAILS(clh_dcrc_backward(ctx, &small_layout, c.tp, c.ta, c.tb, c.traw, c.tp, NULL, NULL),
             CLH_ERR_INVALID_ARGUMENT, "must not alias");
    dcrc_case_free(&c);
}

/* ------------------------------------------------------------------ reference: HE */

/* Vectors of w [n, d] along axis, normalised, into u [nv, len]; norms [nv]. */
static void ref_he_vectors(const double *w, size_t n, size_t d, int axis, double *u,
                           double *norms) {
    size_t nv = axis == 0 ? n : d, len = axis == 0 ? d : n;
    for (size_t i = 0; i < nv; i++) {
        double ss = 0;
        for (size_t k = 0; k < len; k++) {
            double v = axis == 0 ? w[i * d + k] : w[k * d + i];
            ss += v * v;
        }
        norms[i] = sqrt(ss);
        for (size_t k = 0; k < len; k++)
            u[i * len + k] = (axis == 0 ? w[i * d + k] : w[k * d + i]) / fmax(norms[i], 1e-12);
    }
}

static double ref_f(double z, double s) {
    return s == 0 ? -log(z) : pow(z, -s);
}

static double ref_he(const double *w, size_t n, size_t d, int axis, double s) {
    size_t nv = axis == 0 ? n : d, len = axis == 0 ? d : n;
    double *u = tu_alloc_doubles(nv * len), *norms = tu_alloc_doubles(nv);
    ref_he_vectors(w, n, d, axis, u, norms);
    double e = 0;
    for (size_t i = 0; i < nv; i++)
        for (size_t j = 0; j < nv; j++) {
            if (i == j)
                continue;
            double d2 = 0;
            for (size_t k = 0; k < len; k++) {
                double t = u[i * len + k] - u[j * len + k];
                d2 += t * t;
            }
            e += ref_f(sqrt(d2), s);
        }
    free(u);
    free(norms);
    return e;
}

/* dE/dw: dE/du_i = sum_{j != i} 2 f'(d_ij) (u_i - u_j) / d_ij, then through u = w/|w|. */
static void ref_he_backward(const double *w, size_t n, size_t d, int axis, double s, double *dw) {
    size_t nv = axis == 0 ? n : d, len = axis == 0 ? d : n;
    double *u = tu_alloc_doubles(nv * len), *norms = tu_alloc_doubles(nv),
           *du = tu_alloc_doubles(len);
    ref_he_vectors(w, n, d, axis, u, norms);
    for (size_t i = 0; i < nv; i++) {
        memset(du, 0, len * sizeof *du);
        for (size_t j = 0; j < nv; j++) {
            if (i == j)
                continue;
            double d2 = 0;
            for (size_t k = 0; k < len; k++) {
                double t = u[i * len + k] - u[j * len + k];
                d2 += t * t;
            }
            double z = sqrt(d2);
            double fprime = s == 0 ? -1.0 / z : -s * pow(z, -s - 1);
            for (size_t k = 0; k < len; k++)
                du[k] += 2 * fprime * (u[i * len + k] - u[j * len + k]) / z;
        }
        double proj = 0;
        for (size_t k = 0; k < len; k++)
            proj += u[i * len + k] * du[k];
        for (size_t k = 0; k < len; k++) {
            double g = (du[k] - u[i * len + k] * proj) / norms[i];
            if (axis == 0)
                dw[i * d + k] = g;
            else
                dw[k * d + i] = g;
        }
    }
    free(u);
    free(norms);
    free(du);
}

/* ------------------------------------------------------------------ tests: HE */

static void test_he_forward(void **state) {
    (void)state;
    TU_CTX_OR_SKIP(ctx);
    const size_t n = 13, d = 7;
    float *w = tu_random_floats(n * d, -1, 1, 100);
    double *wd = tu_to_double(w, n * d);
    clh_tensor *tw = tu_put(ctx, 3, 2, SHAPE(n, d), w);
    const float ss[4] = {0.0f, 1.0f, 2.0f, 1.5f};
    for (int axis = 0; axis < 2; axis++)
        for (int k = 0; k < 4; k++) {
            double got = 0, want = ref_he(wd, n, d, axis, ss[k]);
            TU_OK(clh_hyperspherical_energy(ctx, tw, axis, ss[k], &got));
            double rel = fabs(got - want) / fabs(want);
            if (!(rel <= DEV_TOL))
                fail_msg("HE axis %d s %g: %.9g vs reference %.9g (rel %.3g)", axis, (double)ss[k],
                         got, want, rel);
        }
    clh_tensor_release(tw);
    free(w);
    free(wd);
}

/* More vectors than one Gram tile holds (2 full tiles and a partial one). */
static void test_he_tiled(void **state) {
    (void)state;
    TU_CTX_OR_SKIP(ctx);
    const size_t n = 1500, d = 16;
    float *w = tu_random_floats(n * d, -1, 1, 101);
    double *wd = tu_to_double(w, n * d);
    clh_tensor *tw = tu_put(ctx, 0, 2, SHAPE(n, d), w);
    double got = 0, want = ref_he(wd, n, d, 0, 1.0);
    TU_OK(clh_hyperspherical_energy(ctx, tw, 0, 1.0f, &got));
    double rel = fabs(got - want) / want;
    print_message("HE 1500 x 16 (3 tiles), s = 1: rel err %.2e\n", rel);
    if (!(rel <= DEV_TOL))
        fail_msg("tiled HE: %.9g vs reference %.9g (rel %.3g)", got, want, rel);
    /* backward over the same tiles, against the reference at a few rows */
    clh_tensor *tdw = tu_put(ctx, 0, 2, SHAPE(n, d), NULL);
    TU_OK(clh_tensor_fill(tdw, 0.0f));
    TU_OK(clh_hyperspherical_energy_backward(ctx, tw, 0, 1.0f, 1.0f, tdw));
    double *want_dw = tu_alloc_doubles(n * d);
    ref_he_backward(wd, n, d, 0, 1.0, want_dw);
    expect_close("tiled HE backward", tdw, want_dw, n * d, 1e-4);
    clh_tensor_release(tw);
    clh_tensor_release(tdw);
    free(w);
    free(wd);
    free(want_dw);
}

typedef struct he_fd {
    size_t n, d;
    int axis;
    double s;
} he_fd;

static double he_loss(const double *w, void *data) {
    he_fd *p = data;
    return ref_he(w, p->n, p->d, p->axis, p->s);
}

static void test_he_backward(void **state) {
    (void)state;
    TU_CTX_OR_SKIP(ctx);
    const size_t n = 9, d = 6, total = n * d;
    float *w = tu_random_floats(total, -1, 1, 110), *g0 = tu_random_floats(total, -1, 1, 111);
    double *wd = tu_to_double(w, total), *want = tu_alloc_doubles(total),
           *num = tu_alloc_doubles(total);
    clh_tensor *tw = tu_put(ctx, 1, 2, SHAPE(n, d), w);
    clh_tensor *tdw = tu_put(ctx, 2, 2, SHAPE(n, d), NULL);
    const float ss[3] = {0.0f, 1.0f, 2.0f}, scale = 0.75f;
    double worst_fd = 0, worst_dev = 0;
    for (int axis = 0; axis < 2; axis++)
        for (int k = 0; k < 3; k++) {
            ref_he_backward(wd, n, d, axis, ss[k], want);
            he_fd p = {n, d, axis, ss[k]};
            numeric_grad(he_loss, wd, total, &p, num);
            char what[64];
            snprintf(what, sizeof what, "HE backward axis %d s %g", axis, (double)ss[k]);
            expect_fd(what, want, num, total);
            worst_fd = fmax(worst_fd, rel_err_d(want, num, total));
            TU_OK(clh_tensor_upload(tdw, g0, total));
            TU_OK(clh_hyperspherical_energy_backward(ctx, tw, axis, ss[k], scale, tdw));
            for (size_t i = 0; i < total; i++)
                want[i] = g0[i] + scale * want[i];
            worst_dev = fmax(worst_dev, expect_close(what, tdw, want, total, DEV_TOL));
        }
    print_message("HE backward: ref vs FD %.2e, device vs ref %.2e (worst over s, axis)\n",
                  worst_fd, worst_dev);
    clh_tensor_release(tw);
    clh_tensor_release(tdw);
    void *fs[] = {w, g0, wd, want, num};
    for (int i = 0; i < 5; i++)
        free(fs[i]);
}

/* HE over rows of W.BD equals HE over rows of W, and over columns of BD.W equals
 * that over columns of W, when BD is orthogonal (blocks from the Cayley map). */
static void test_he_invariance(void **state) {
    (void)state;
    TU_CTX_OR_SKIP(ctx);
    const size_t nb = 4, q = 8, d = nb * q, other = 24;
    float *raw = normal_floats(nb * q * q, 1.0f, 120);
    clh_tensor *traw = tu_put(ctx, 0, 3, SHAPE(nb, q, q), raw);
    clh_tensor *blocks = tu_put(ctx, 0, 3, SHAPE(nb, q, q), NULL);
    TU_OK(clh_cayley_forward(ctx, traw, blocks, NULL));
    float *w = tu_random_floats(other * d, -1, 1, 121);
    clh_tensor *w_rows = tu_put(ctx, 0, 2, SHAPE(other, d), w); /* [24, 32] */
    clh_tensor *w_cols = tu_put(ctx, 0, 2, SHAPE(d, other), w); /* [32, 24] */
    clh_tensor *out_rows = tu_put(ctx, 0, 2, SHAPE(other, d), NULL);
    clh_tensor *out_cols = tu_put(ctx, 0, 2, SHAPE(d, other), NULL);
    TU_OK(clh_blockdiag_fold(ctx, w_rows, blocks, 0, out_rows));
    TU_OK(clh_blockdiag_fold(ctx, w_cols, blocks, 1, out_cols));
    for (int k = 0; k < 3; k++) {
        float s = (float)k;
        double e0, e1, c0, c1, r_other;
        TU_OK(clh_hyperspherical_energy(ctx, w_rows, 0, s, &e0));
        TU_OK(clh_hyperspherical_energy(ctx, out_rows, 0, s, &e1));
        TU_OK(clh_hyperspherical_energy(ctx, w_cols, 1, s, &c0));
        TU_OK(clh_hyperspherical_energy(ctx, out_cols, 1, s, &c1));
        if (!(fabs(e1 - e0) <= 1e-4 * fabs(e0)))
            fail_msg("s = %d: HE rows of W.BD %.9g != rows of W %.9g", k, e1, e0);
        if (!(fabs(c1 - c0) <= 1e-4 * fabs(c0)))
            fail_msg("s = %d: HE columns of BD.W %.9g != columns of W %.9g", k, c1, c0);
        /* the other axis is not preserved: the test can tell */
        TU_OK(clh_hyperspherical_energy(ctx, out_rows, 1, s, &r_other));
        double base;
        TU_OK(clh_hyperspherical_energy(ctx, w_rows, 1, s, &base));
        if (!(fabs(r_other - base) > 1e-3 * fabs(base)))
            fail_msg("s = %d: HE columns of W.BD unexpectedly equal those of W", k);
    }
    clh_tensor *ts[] = {traw, blocks, w_rows, w_cols, out_rows, out_cols};
    for (int i = 0; i < 6; i++)
        clh_tensor_release(ts[i]);
    free(raw);
    free(w);
}

static int large_tests_enabled(void) {
    const char *enabled = getenv("CLHCLIP_LARGE_TESTS");
    return enabled && strcmp(enabled, "1") == 0;
}

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* The size of a CLIP MLP weight (c_fc of ViT-B: 3072 x 768): forward and backward run
 * and are timed; the energy of W and of 2 W (same directions) agree. It takes ~15 s on
 * a 2-core PoCL, so it runs only with CLHCLIP_LARGE_TESTS=1; test_he_tiled covers the
 * tiling in the default suite. */
static void test_he_large(void **state) {
    (void)state;
    if (!large_tests_enabled()) {
        print_message("SKIP: set CLHCLIP_LARGE_TESTS=1 for the 3072 x 768 energy\n");
        skip();
    }
    TU_CTX_OR_SKIP(ctx);
    const size_t n = 3072, d = 768;
    float *w = normal_floats(n * d, 0.02f, 130);
    clh_tensor *tw = tu_put(ctx, 0, 2, SHAPE(n, d), w);
    clh_tensor *tdw = tu_put(ctx, 0, 2, SHAPE(n, d), NULL);
    TU_OK(clh_tensor_fill(tdw, 0.0f));
    double e = 0, e2 = 0;
    TU_OK(clh_hyperspherical_energy(ctx, tw, 0, 1.0f, &e)); /* warm-up: kernel builds */
    double t0 = now_seconds();
    TU_OK(clh_hyperspherical_energy(ctx, tw, 0, 1.0f, &e));
    double t1 = now_seconds();
    TU_OK(clh_hyperspherical_energy_backward(ctx, tw, 0, 1.0f, 1.0f, tdw));
    TU_OK(clh_ctx_finish(ctx));
    double t2 = now_seconds();
    print_message("HE 3072 x 768 rows, s = 1 on '%s': forward %.3f s, backward %.3f s, E = %.6g\n",
                  clh_ctx_device(ctx)->name, t1 - t0, t2 - t1, e);
    /* random directions in 768-d are nearly orthogonal: d ~ sqrt(2), E ~ n (n-1) / sqrt 2 */
    double expect = (double)n * (double)(n - 1) / sqrt(2.0);
    if (!(fabs(e - expect) <= 0.01 * expect))
        fail_msg("E = %.9g, expected about %.9g", e, expect);
    for (size_t i = 0; i < n * d; i++)
        w[i] *= 2.0f;
    TU_OK(clh_tensor_upload(tw, w, n * d));
    TU_OK(clh_hyperspherical_energy(ctx, tw, 0, 1.0f, &e2));
    if (!(fabs(e2 - e) <= 1e-5 * e))
        fail_msg("scaling W changed its energy: %.9g vs %.9g", e2, e);
    float *g = tu_fetch(tdw);
    for (size_t i = 0; i < n * d; i++)
        if (!isfinite(g[i]))
            fail_msg("dw[%zu] = %g is not finite", i, (double)g[i]);
    clh_tensor_release(tw);
    clh_tensor_release(tdw);
    free(w);
    free(g);
}

/* One H-CLIP adapter step at ViT-B/16 size (q = 128, 12 + 12 layers, 4 + 6 blocks):
 * DCRC forward, Cayley of the 192 text blocks, their backward and the DCRC backward,
 * each timed after a warm-up. Only with CLHCLIP_LARGE_TESTS=1. */
static void test_adapter_vitb_large(void **state) {
    (void)state;
    if (!large_tests_enabled()) {
        print_message("SKIP: set CLHCLIP_LARGE_TESTS=1 for the ViT-B/16-size adapter step\n");
        skip();
    }
    TU_CTX_OR_SKIP(ctx);
    const clh_dcrc_layout layout = {128, 12, 12, 4, 6};
    dcrc_sizes s = sizes_of(&layout);
    size_t q2 = s.q * s.q, np = q2 * s.slots * s.mods;
    size_t ntext = 4 * s.lt * s.bt, na = s.layers * s.mods * s.mods, nb = s.slots * s.slots;
    /* H-CLIP's init perturbed: P = [0 | I] + noise, A = I + noise, B = I + noise */
    float *p = normal_floats(np, 0.01f, 140), *a = normal_floats(na, 0.01f, 141);
    float *b = normal_floats(nb, 0.01f, 142), *dr = normal_floats(ntext * q2, 1.0f, 143);
    for (size_t i = 0; i < s.q; i++)
        for (size_t sl = 0; sl < s.slots; sl++)
            for (size_t m = s.bt; m < s.mods; m++)
                p[(i * s.q + i) * s.slots * s.mods + sl * s.mods + m] += 1.0f;
    for (size_t l = 0; l < s.layers; l++)
        for (size_t m = 0; m < s.mods; m++)
            a[(l * s.mods + m) * s.mods + m] += 1.0f;
    for (size_t i = 0; i < s.slots; i++)
        b[i * s.slots + i] += 1.0f;
    clh_tensor *tp = tu_put(ctx, 0, 4, SHAPE(s.q, s.q, s.slots, s.mods), p);
    clh_tensor *ta = tu_put(ctx, 0, 3, SHAPE(s.layers, s.mods, s.mods), a);
    clh_tensor *tb = tu_put(ctx, 0, 2, SHAPE(s.slots, s.slots), b);
    clh_tensor *traw = tu_put(ctx, 0, 3, SHAPE(s.blocks, s.q, s.q), NULL);
    clh_tensor *draw = tu_put(ctx, 0, 3, SHAPE(s.blocks, s.q, s.q), NULL);
    clh_tensor *tr = tu_put(ctx, 0, 3, SHAPE(ntext, s.q, s.q), NULL);
    clh_tensor *tinv = tu_put(ctx, 0, 3, SHAPE(ntext, s.q, s.q), NULL);
    clh_tensor *tdr = tu_put(ctx, 0, 3, SHAPE(ntext, s.q, s.q), dr);
    clh_tensor *dp = tu_put(ctx, 0, 4, SHAPE(s.q, s.q, s.slots, s.mods), NULL);
    clh_tensor *da = tu_put(ctx, 0, 3, SHAPE(s.layers, s.mods, s.mods), NULL);
    clh_tensor *db = tu_put(ctx, 0, 2, SHAPE(s.slots, s.slots), NULL);
    clh_tensor *text_raw = NULL, *text_draw = NULL;
    TU_OK(clh_tensor_view(traw, 0, 3, SHAPE(ntext, s.q, s.q), &text_raw));
    TU_OK(clh_tensor_view(draw, 0, 3, SHAPE(ntext, s.q, s.q), &text_draw));
    TU_OK(clh_tensor_fill(draw, 0.0f));
    TU_OK(clh_tensor_fill(dp, 0.0f));
    TU_OK(clh_tensor_fill(da, 0.0f));
    TU_OK(clh_tensor_fill(db, 0.0f));
    double t[5];
    for (int pass = 0; pass < 2; pass++) { /* pass 0 builds the kernels */
        TU_OK(clh_ctx_finish(ctx));
        t[0] = now_seconds();
        TU_OK(clh_dcrc_forward(ctx, &layout, tp, ta, tb, traw));
        TU_OK(clh_ctx_finish(ctx));
        t[1] = now_seconds();
        TU_OK(clh_cayley_forward(ctx, text_raw, tr, tinv));
        TU_OK(clh_ctx_finish(ctx));
        t[2] = now_seconds();
        TU_OK(clh_cayley_backward(ctx, text_raw, tinv, tdr, text_draw));
        TU_OK(clh_ctx_finish(ctx));
        t[3] = now_seconds();
        TU_OK(clh_dcrc_backward(ctx, &layout, tp, ta, tb, draw, dp, da, db));
        TU_OK(clh_ctx_finish(ctx));
        t[4] = now_seconds();
    }
    print_message("ViT-B/16 adapter step on '%s': DCRC forward %.1f ms, Cayley forward (192 x "
                  "128^2) %.1f ms, Cayley backward %.1f ms, DCRC backward %.1f ms\n",
                  clh_ctx_device(ctx)->name, 1e3 * (t[1] - t[0]), 1e3 * (t[2] - t[1]),
                  1e3 * (t[3] - t[2]), 1e3 * (t[4] - t[3]));
    float *r = tu_fetch(tr);
    double e = orthogonality_error(r, 8, s.q);
    print_message("ViT-B/16 text blocks: |R^T R - I|max = %.2e (first 8 blocks)\n", e);
    if (!(e <= 1e-5))
        fail_msg("text blocks not orthogonal: %.3g", e);
    clh_tensor *ts[] = {tp, ta, tb, traw, draw, tr, tinv, tdr, dp, da, db, text_raw, text_draw};
    for (int i = 0; i < 13; i++)
        clh_tensor_release(ts[i]);
    void *fs[] = {p, a, b, dr, r};
    for (int i = 0; i < 5; i++)
        free(fs[i]);
}

static void test_he_errors(void **state) {
    (void)state;
    TU_CTX_OR_SKIP(ctx);
    clh_tensor *w = tu_put(ctx, 0, 2, SHAPE(4, 3), NULL);
    clh_tensor *w3 = tu_put(ctx, 0, 3, SHAPE(2, 2, 3), NULL);
    clh_tensor *dw_bad = tu_put(ctx, 0, 2, SHAPE(3, 4), NULL);
    clh_tensor *one = tu_put(ctx, 0, 2, SHAPE(1, 5), NULL);
    double e = -1;
    TU_FAILS(clh_hyperspherical_energy(ctx, w, 2, 1.0f, &e), CLH_ERR_INVALID_ARGUMENT, "axis = 2");
    TU_FAILS(clh_hyperspherical_energy(ctx, w, 0, -1.0f, &e), CLH_ERR_INVALID_ARGUMENT, "s = -1");
    TU_FAILS(clh_hyperspherical_energy(ctx, w, 0, NAN, &e), CLH_ERR_INVALID_ARGUMENT, "finite");
    TU_FAILS(clh_hyperspherical_energy(ctx, w3, 0, 1.0f, &e), CLH_ERR_SHAPE, "expected a matrix");
    TU_FAILS(clh_hyperspherical_energy(ctx, w, 0, 1.0f, NULL), CLH_ERR_INVALID_ARGUMENT,
             "energy is NULL");
    TU_FAILS(clh_hyperspherical_energy_backward(ctx, w, 0, 1.0f, 1.0f, dw_bad), CLH_ERR_SHAPE,
             "dw has shape [3, 4], expected [4, 3]");
    TU_FAILS(clh_hyperspherical_energy_backward(ctx, w, 0, 1.0f, INFINITY, w),
             CLH_ERR_INVALID_ARGUMENT, "scale");
    /* a single vector has no pairs */
    TU_OK(clh_hyperspherical_energy(ctx, one, 0, 1.0f, &e));
    assert_true(e == 0.0);
    clh_tensor *ts[] = {w, w3, dw_bad, one};
    for (int i = 0; i < 4; i++)
        clh_tensor_release(ts[i]);
}

static int teardown(void **state) {
    (void)state;
    tu_ctx_teardown();
    return 0;
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_blockdiag_forward),
        cmocka_unit_test(test_blockdiag_backward),
        cmocka_unit_test(test_blockdiag_fold),
        cmocka_unit_test(test_blockdiag_errors),
        cmocka_unit_test(test_inverse_small),
        cmocka_unit_test(test_inverse_128),
        cmocka_unit_test(test_inverse_pivoting),
        cmocka_unit_test(test_inverse_singular),
        cmocka_unit_test(test_cayley_forward),
        cmocka_unit_test(test_cayley_identity),
        cmocka_unit_test(test_cayley_orthogonality_128),
        cmocka_unit_test(test_cayley_backward),
        cmocka_unit_test(test_cayley_errors),
        cmocka_unit_test(test_dcrc_num_blocks),
        cmocka_unit_test(test_dcrc_identity),
        cmocka_unit_test(test_dcrc_forward),
        cmocka_unit_test(test_dcrc_backward),
        cmocka_unit_test(test_dcrc_errors),
        cmocka_unit_test(test_he_forward),
        cmocka_unit_test(test_he_tiled),
        cmocka_unit_test(test_he_backward),
        cmocka_unit_test(test_he_invariance),
        cmocka_unit_test(test_he_large),
        cmocka_unit_test(test_he_errors),
        cmocka_unit_test(test_adapter_vitb_large),
    };
    return cmocka_run_group_tests(tests, NULL, teardown);
}
