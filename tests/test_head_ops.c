/* CAT-Seg head layers (head_ops.h) against plain C references computed in double.
 *
 * Every op has a C double forward and backward here. The C backward is checked against
 * central finite differences of the C forward (h = 1e-6, error <= 1e-6 of the largest
 * gradient); the device forward and backward (float) against the C reference on odd shapes,
 * with views at element offsets into NaN-filled buffers, NaN-filled input gradients (they
 * must be overwritten) and random parameter gradients (they must be accumulated onto). The
 * C references of conv2d, transposed conv, group norm, bilinear resize and average pooling
 * are compared with torch results (tests/fixtures/head_ops, made by
 * tests/reference/make_head_ops_fixtures.py), and so is the device. The largest errors are
 * printed at the end. */
#include <time.h>

#include "head_ops.h"
#include "testutil.h"

#define FD_STEP 1e-6
#define FD_TOL  1e-6
/* device vs C: results relative to max |want|; sums of K products relative to
 * K * max|a| * max|b| */
#define DEV_TOL  1e-5
#define GEMM_TOL 1e-6
/* C double reference vs torch (stored as float32) */
#define TORCH_TOL 1e-6

#define SHAPE(...) ((const int64_t[]){__VA_ARGS__})
#define NDIM(...)  ((int)(sizeof((int64_t[]){__VA_ARGS__}) / sizeof(int64_t)))
#define DIMS(...)  NDIM(__VA_ARGS__), SHAPE(__VA_ARGS__)

/* ------------------------------------------------------------------ error report */

typedef struct err_stat {
    const char *name;
    double fd, dev, torch; /* largest relative errors seen */
} err_stat;

static err_stat stats_[32];
static int n_stats_;

enum { ERR_FD, ERR_DEV, ERR_TORCH };

static void note_error(const char *name, int kind, double rel) {
    int i = 0;
    while (i < n_stats_ && strcmp(stats_[i].name, name) != 0)
        i++;
    if (i == n_stats_) {
        if (n_stats_ == (int)(sizeof stats_ / sizeof stats_[0]))
            return;
        stats_[n_stats_++] = (err_stat){name, -1, -1, -1};
    }
    double *slot = kind == ERR_FD    ? &stats_[i].fd
                   : kind == ERR_DEV ? &stats_[i].dev
                                     : &stats_[i].torch;
    if (rel > *slot)
        *slot = rel;
}

/* ------------------------------------------------------------------ host helpers */

/* ------------------------------------------------------------------ device helpers */

/* Device result vs double reference: max|got - want| <= tol (recorded relative to max|want|). */
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
    note_error(name, ERR_DEV, mag > 0 ? err / mag : err);
    if (!(err <= tol))
        fail_msg("%s: max abs err %.3g > tol %.3g (max |want| %.3g)", name, err, tol, mag);
    free(got);
}

static double rel_tol(const double *want, size_t n) {
    return DEV_TOL * tu_max_abs(want, n) + 1e-30;
}

/* ------------------------------------------------------------------ generic op cases
 * An op case holds up to three double inputs, integer parameters and the C forward and
 * backward. The finite-difference check and the device comparisons work on it. */

typedef struct op_case op_case;
/* y = forward(inputs) */
typedef void (*forward_fn)(const op_case *c, double *y);
/* grads[i] = d(sum(dy * y)) / d in[i] (overwritten; NULL entries skipped) */
typedef void (*backward_fn)(const op_case *c, const double *dy, double *const *grads);

struct op_case {
    const char *name;
    int n_in;
    double *in[3];
    size_t in_n[3];
    size_t out_n;
    int p[12];
    double eps;
    forward_fn forward;
    backward_fn backward;
    /* device side: tensor shapes, which inputs are parameters (gradients accumulated), and
     * the number of products summed per output / per gradient element (tolerances) */
    int in_ndim[3], out_ndim;
    int64_t in_shape[3][4], out_shape[4];
    int is_param[3];
    double k_out, k_grad[3];
};

static void set_shape(int64_t *dst, int *ndim, int nd, const int64_t *shape) {
    *ndim = nd;
    memcpy(dst, shape, (size_t)nd * sizeof *shape);
}

static double case_loss(const op_case *c, const double *dy) {
    double *y = tu_alloc_doubles(c->out_n);
    c->forward(c, y);
    double l = tu_dot(y, dy, c->out_n);
    free(y);
    return l;
}

/* Central differences of sum(dy * forward) for every input element vs the C backward. */
static void fd_check_case(op_case *c, uint32_t seed) {
    float *dyf = tu_random_floats(c->out_n, -1, 1, seed);
    double *dy = tu_to_double(dyf, c->out_n);
    double *grads[3] = {NULL, NULL, NULL};
    for (int i = 0; i < c->n_in; i++)
        grads[i] = tu_alloc_doubles(c->in_n[i]);
    c->backward(c, dy, grads);
    for (int k = 0; k < c->n_in; k++) {
        double err = 0, mag = tu_max_abs(grads[k], c->in_n[k]);
        double *x = c->in[k];
        for (size_t i = 0; i < c->in_n[k]; i++) {
            double saved = x[i];
            x[i] = saved + FD_STEP;
            double up = case_loss(c, dy);
            x[i] = saved - FD_STEP;
            double down = case_loss(c, dy);
            x[i] = saved;
            err = fmax(err, fabs((up - down) / (2 * FD_STEP) - grads[k][i]));
        }
        double rel = mag > 0 ? err / mag : err;
        note_error(c->name, ERR_FD, rel);
        if (!(mag > 0))
            fail_msg("%s: input %d has an all-zero gradient (the check would be empty)", c->name,
                     k);
        if (!(rel <= FD_TOL))
            fail_msg("%s: input %d: finite differences differ by %.3g relative (max |grad| %.3g)",
                     c->name, k, rel, mag);
        free(grads[k]);
    }
    free(dyf);
    free(dy);
}

/* Random double inputs of the given sizes (from float draws, as the device sees them). */
static void case_inputs(op_case *c, int n_in, const size_t *sizes, uint32_t seed) {
    c->n_in = n_in;
    for (int i = 0; i < n_in; i++) {
        float *f = tu_random_floats(sizes[i], -1, 1, seed + (uint32_t)i);
        c->in_n[i] = sizes[i];
        c->in[i] = tu_to_double(f, sizes[i]);
        free(f);
    }
}

static void case_free(op_case *c) {
    for (int i = 0; i < c->n_in; i++)
        free(c->in[i]);
}

static float *to_float(const double *x, size_t n) {
    float *y = malloc((n ? n : 1) * sizeof *y);
    assert_non_null(y);
    for (size_t i = 0; i < n; i++)
        y[i] = (float)x[i];
    return y;
}

/* ================================================================== conv2d
 * p = {N, C, H, W, O, kh, kw, stride, pad, OH, OW}; in = {x, w, b}. */

static void conv_setup(op_case *c, int n, int ch, int h, int w, int o, int kh, int kw, int stride,
                       int pad, uint32_t seed);

static double conv_x(const op_case *c, const double *x, int n, int ch, int ih, int iw) {
    const int *p = c->p;
    if (ih < 0 || ih >= p[2] || iw < 0 || iw >= p[3])
        return 0.0;
    return x[((n * p[1] + ch) * p[2] + ih) * p[3] + iw];
}

static void ref_conv2d(const op_case *c, double *y) {
    const int *p = c->p;
    const double *x = c->in[0], *w = c->in[1], *b = c->in[2];
    for (int n = 0; n < p[0]; n++)
        for (int o = 0; o < p[4]; o++)
            for (int oh = 0; oh < p[9]; oh++)
                for (int ow = 0; ow < p[10]; ow++) {
                    double acc = b[o];
                    for (int ch = 0; ch < p[1]; ch++)
                        for (int i = 0; i < p[5]; i++)
                            for (int j = 0; j < p[6]; j++)
                                acc +=
                                    w[((o * p[1] + ch) * p[5] + i) * p[6] + j] *
                                    conv_x(c, x, n, ch, oh * p[7] - p[8] + i, ow * p[7] - p[8] + j);
                    y[((n * p[4] + o) * p[9] + oh) * p[10] + ow] = acc;
                }
}

/* Scatter form (the device uses a gather): each output adds its gradient to its taps. */
static void ref_conv2d_backward(const op_case *c, const double *dy, double *const *g) {
    const int *p = c->p;
    const double *x = c->in[0], *w = c->in[1];
    for (int k = 0; k < 3; k++)
        if (g[k])
            memset(g[k], 0, c->in_n[k] * sizeof(double));
    for (int n = 0; n < p[0]; n++)
        for (int o = 0; o < p[4]; o++)
            for (int oh = 0; oh < p[9]; oh++)
                for (int ow = 0; ow < p[10]; ow++) {
                    double d = dy[((n * p[4] + o) * p[9] + oh) * p[10] + ow];
                    if (g[2])
                        g[2][o] += d;
                    for (int ch = 0; ch < p[1]; ch++)
                        for (int i = 0; i < p[5]; i++)
                            for (int j = 0; j < p[6]; j++) {
                                int ih = oh * p[7] - p[8] + i, iw = ow * p[7] - p[8] + j;
                                if (ih < 0 || ih >= p[2] || iw < 0 || iw >= p[3])
                                    continue;
                                int xi = ((n * p[1] + ch) * p[2] + ih) * p[3] + iw;
                                int wi = ((o * p[1] + ch) * p[5] + i) * p[6] + j;
                                if (g[0])
                                    g[0][xi] += d * w[wi];
                                if (g[1])
                                    g[1][wi] += d * x[xi];
                            }
                }
}

static void conv_setup(op_case *c, int n, int ch, int h, int w, int o, int kh, int kw, int stride,
                       int pad, uint32_t seed) {
    int oh = (h + 2 * pad - kh) / stride + 1, ow = (w + 2 * pad - kw) / stride + 1;
    *c = (op_case){.name = "conv2d",
                   .p = {n, ch, h, w, o, kh, kw, stride, pad, oh, ow},
                   .out_n = (size_t)n * o * oh * ow,
                   .forward = ref_conv2d,
                   .backward = ref_conv2d_backward};
    size_t sizes[3] = {(size_t)n * ch * h * w, (size_t)o * ch * kh * kw, (size_t)o};
    case_inputs(c, 3, sizes, seed);
    set_shape(c->in_shape[0], &c->in_ndim[0], DIMS(n, ch, h, w));
    set_shape(c->in_shape[1], &c->in_ndim[1], DIMS(o, ch, kh, kw));
    set_shape(c->in_shape[2], &c->in_ndim[2], DIMS(o));
    set_shape(c->out_shape, &c->out_ndim, DIMS(n, o, oh, ow));
    c->is_param[1] = c->is_param[2] = 1;
    c->k_out = ch * kh * kw + 1;
    c->k_grad[0] = o * kh * kw;
    c->k_grad[1] = c->k_grad[2] = n * oh * ow;
}

/* ================================================================== transposed conv2d
 * p = {N, C, H, W, O, k}; in = {x, w [C, O, k, k], b}. */

static void ref_convt(const op_case *c, double *y) {
    const int *p = c->p;
    const double *x = c->in[0], *w = c->in[1], *b = c->in[2];
    int n_ = p[0], ch_ = p[1], h_ = p[2], w_ = p[3], o_ = p[4], k = p[5];
    for (int n = 0; n < n_; n++)
        for (int o = 0; o < o_; o++)
            for (int oh = 0; oh < h_ * k; oh++)
                for (int ow = 0; ow < w_ * k; ow++) {
                    double acc = b[o];
                    for (int ch = 0; ch < ch_; ch++)
                        acc += x[((n * ch_ + ch) * h_ + oh / k) * w_ + ow / k] *
                               w[((ch * o_ + o) * k + oh % k) * k + ow % k];
                    y[((n * o_ + o) * h_ * k + oh) * w_ * k + ow] = acc;
                }
}

static void ref_convt_backward(const op_case *c, const double *dy, double *const *g) {
    const int *p = c->p;
    const double *x = c->in[0], *w = c->in[1];
    int n_ = p[0], ch_ = p[1], h_ = p[2], w_ = p[3], o_ = p[4], k = p[5];
    for (int i = 0; i < 3; i++)
        if (g[i])
            memset(g[i], 0, c->in_n[i] * sizeof(double));
    for (int n = 0; n < n_; n++)
        for (int o = 0; o < o_; o++)
            for (int oh = 0; oh < h_ * k; oh++)
                for (int ow = 0; ow < w_ * k; ow++) {
                    double d = dy[((n * o_ + o) * h_ * k + oh) * w_ * k + ow];
                    if (g[2])
                        g[2][o] += d;
                    for (int ch = 0; ch < ch_; ch++) {
                        int xi = ((n * ch_ + ch) * h_ + oh / k) * w_ + ow / k;
                        int wi = ((ch * o_ + o) * k + oh % k) * k + ow % k;
                        if (g[0])
                            g[0][xi] += d * w[wi];
                        if (g[1])
                            g[1][wi] += d * x[xi];
                    }
                }
}

static void convt_setup(op_case *c, int n, int ch, int h, int w, int o, int k, uint32_t seed) {
    *c = (op_case){.name = "conv_transpose2d",
                   .p = {n, ch, h, w, o, k},
                   .out_n = (size_t)n * o * h * k * w * k,
                   .forward = ref_convt,
                   .backward = ref_convt_backward};
    size_t sizes[3] = {(size_t)n * ch * h * w, (size_t)ch * o * k * k, (size_t)o};
    case_inputs(c, 3, sizes, seed);
    set_shape(c->in_shape[0], &c->in_ndim[0], DIMS(n, ch, h, w));
    set_shape(c->in_shape[1], &c->in_ndim[1], DIMS(ch, o, k, k));
    set_shape(c->in_shape[2], &c->in_ndim[2], DIMS(o));
    set_shape(c->out_shape, &c->out_ndim, DIMS(n, o, h * k, w * k));
    c->is_param[1] = c->is_param[2] = 1;
    c->k_out = ch + 1;
    c->k_grad[0] = o * k * k;
    c->k_grad[1] = n * h * w;
    c->k_grad[2] = n * h * w * k * k;
}

/* ================================================================== group norm
 * p = {N, C, H, W, G}; in = {x, gamma, beta}; eps. */

static void gn_stats(const op_case *c, int n, int g, double *mean, double *rstd) {
    const int *p = c->p;
    int count = p[1] / p[4] * p[2] * p[3];
    const double *xg = c->in[0] + (size_t)(n * p[4] + g) * count;
    double s = 0, v = 0;
    for (int e = 0; e < count; e++)
        s += xg[e];
    *mean = s / count;
    for (int e = 0; e < count; e++)
        v += (xg[e] - *mean) * (xg[e] - *mean);
    *rstd = 1.0 / sqrt(v / count + c->eps);
}

static void ref_group_norm(const op_case *c, double *y) {
    const int *p = c->p;
    int pixels = p[2] * p[3], count = p[1] / p[4] * pixels;
    for (int n = 0; n < p[0]; n++)
        for (int g = 0; g < p[4]; g++) {
            double mean, rstd;
            gn_stats(c, n, g, &mean, &rstd);
            size_t base = (size_t)(n * p[4] + g) * count;
            for (int e = 0; e < count; e++) {
                int ch = (int)((base + e) / pixels) % p[1];
                y[base + e] = (c->in[0][base + e] - mean) * rstd * c->in[1][ch] + c->in[2][ch];
            }
        }
}

static void ref_group_norm_backward(const op_case *c, const double *dy, double *const *grads) {
    const int *p = c->p;
    int pixels = p[2] * p[3], count = p[1] / p[4] * pixels;
    const double *x = c->in[0], *gamma = c->in[1];
    for (int i = 1; i < 3; i++)
        if (grads[i])
            memset(grads[i], 0, c->in_n[i] * sizeof(double));
    for (int n = 0; n < p[0]; n++)
        for (int g = 0; g < p[4]; g++) {
            double mean, rstd, mt = 0, mtx = 0;
            gn_stats(c, n, g, &mean, &rstd);
            size_t base = (size_t)(n * p[4] + g) * count;
            for (int e = 0; e < count; e++) {
                int ch = (int)((base + e) / pixels) % p[1];
                double t = dy[base + e] * gamma[ch], xhat = (x[base + e] - mean) * rstd;
                mt += t / count;
                mtx += t * xhat / count;
                if (grads[1])
                    grads[1][ch] += dy[base + e] * xhat;
                if (grads[2])
                    grads[2][ch] += dy[base + e];
            }
            for (int e = 0; grads[0] && e < count; e++) {
                int ch = (int)((base + e) / pixels) % p[1];
                double t = dy[base + e] * gamma[ch], xhat = (x[base + e] - mean) * rstd;
                grads[0][base + e] = rstd * (t - mt - xhat * mtx);
            }
        }
}

static void gn_setup(op_case *c, int n, int ch, int h, int w, int groups, double eps,
                     uint32_t seed) {
    *c = (op_case){.name = "group_norm",
                   .p = {n, ch, h, w, groups},
                   .eps = eps,
                   .out_n = (size_t)n * ch * h * w,
                   .forward = ref_group_norm,
                   .backward = ref_group_norm_backward};
    size_t sizes[3] = {(size_t)n * ch * h * w, (size_t)ch, (size_t)ch};
    case_inputs(c, 3, sizes, seed);
    set_shape(c->in_shape[0], &c->in_ndim[0], DIMS(n, ch, h, w));
    set_shape(c->in_shape[1], &c->in_ndim[1], DIMS(ch));
    set_shape(c->in_shape[2], &c->in_ndim[2], DIMS(ch));
    set_shape(c->out_shape, &c->out_ndim, DIMS(n, ch, h, w));
    c->is_param[1] = c->is_param[2] = 1;
    c->k_grad[1] = c->k_grad[2] = n * h * w;
}

/* ================================================================== bilinear resize
 * p = {planes, H, W, H2, W2, align}; in = {x}. */

/* torch's source coordinate of output index d, in double. */
static void ref_taps(int d, int in, int out, int align, int *i0, int *i1, double *l) {
    double src;
    if (align)
        src = out > 1 ? d * (double)(in - 1) / (out - 1) : 0.0;
    else
        src = fmax((d + 0.5) * in / out - 0.5, 0.0);
    *i0 = (int)src < in - 1 ? (int)src : in - 1;
    *i1 = *i0 + 1 < in - 1 ? *i0 + 1 : in - 1;
    *l = src - *i0;
}

static void ref_bilinear(const op_case *c, double *y) {
    const int *p = c->p;
    for (int pl = 0; pl < p[0]; pl++)
        for (int oh = 0; oh < p[3]; oh++)
            for (int ow = 0; ow < p[4]; ow++) {
                int h0, h1, w0, w1;
                double lh, lw;
                ref_taps(oh, p[1], p[3], p[5], &h0, &h1, &lh);
                ref_taps(ow, p[2], p[4], p[5], &w0, &w1, &lw);
                const double *x = c->in[0] + (size_t)pl * p[1] * p[2];
                double top = (1 - lw) * x[h0 * p[2] + w0] + lw * x[h0 * p[2] + w1];
                double bot = (1 - lw) * x[h1 * p[2] + w0] + lw * x[h1 * p[2] + w1];
                y[((size_t)pl * p[3] + oh) * p[4] + ow] = (1 - lh) * top + lh * bot;
            }
}

/* Scatter form (the device gathers). */
static void ref_bilinear_backward(const op_case *c, const double *dy, double *const *g) {
    const int *p = c->p;
    memset(g[0], 0, c->in_n[0] * sizeof(double));
    for (int pl = 0; pl < p[0]; pl++)
        for (int oh = 0; oh < p[3]; oh++)
            for (int ow = 0; ow < p[4]; ow++) {
                int h0, h1, w0, w1;
                double lh, lw;
                ref_taps(oh, p[1], p[3], p[5], &h0, &h1, &lh);
                ref_taps(ow, p[2], p[4], p[5], &w0, &w1, &lw);
                double d = dy[((size_t)pl * p[3] + oh) * p[4] + ow];
                double *gx = g[0] + (size_t)pl * p[1] * p[2];
                gx[h0 * p[2] + w0] += d * (1 - lh) * (1 - lw);
                gx[h0 * p[2] + w1] += d * (1 - lh) * lw;
                gx[h1 * p[2] + w0] += d * lh * (1 - lw);
                gx[h1 * p[2] + w1] += d * lh * lw;
            }
}

static void bilinear_setup(op_case *c, int n, int ch, int h, int w, int h2, int w2, int align,
                           uint32_t seed) {
    int planes = n * ch;
    *c = (op_case){.name = align ? "bilinear_align" : "bilinear",
                   .p = {planes, h, w, h2, w2, align},
                   .out_n = (size_t)planes * h2 * w2,
                   .forward = ref_bilinear,
                   .backward = ref_bilinear_backward};
    size_t sizes[1] = {(size_t)planes * h * w};
    case_inputs(c, 1, sizes, seed);
    set_shape(c->in_shape[0], &c->in_ndim[0], DIMS(n, ch, h, w));
    set_shape(c->out_shape, &c->out_ndim, DIMS(n, ch, h2, w2));
    /* an input pixel gathers from at most ceil(out/in) + 1 outputs per axis */
    c->k_grad[0] = (double)(h2 / h + 2) * (w2 / w + 2);
}

/* ================================================================== average pooling
 * p = {planes, H, W, k}; in = {x}. */

static void ref_avg_pool(const op_case *c, double *y) {
    const int *p = c->p;
    int oh_n = p[1] / p[3], ow_n = p[2] / p[3], k = p[3];
    for (int pl = 0; pl < p[0]; pl++)
        for (int oh = 0; oh < oh_n; oh++)
            for (int ow = 0; ow < ow_n; ow++) {
                double acc = 0;
                for (int i = 0; i < k; i++)
                    for (int j = 0; j < k; j++)
                        acc += c->in[0][((size_t)pl * p[1] + oh * k + i) * p[2] + ow * k + j];
                y[((size_t)pl * oh_n + oh) * ow_n + ow] = acc / (k * k);
            }
}

static void ref_avg_pool_backward(const op_case *c, const double *dy, double *const *g) {
    const int *p = c->p;
    int oh_n = p[1] / p[3], ow_n = p[2] / p[3], k = p[3];
    memset(g[0], 0, c->in_n[0] * sizeof(double));
    for (int pl = 0; pl < p[0]; pl++)
        for (int oh = 0; oh < oh_n; oh++)
            for (int ow = 0; ow < ow_n; ow++)
                for (int i = 0; i < k; i++)
                    for (int j = 0; j < k; j++)
                        g[0][((size_t)pl * p[1] + oh * k + i) * p[2] + ow * k + j] +=
                            dy[((size_t)pl * oh_n + oh) * ow_n + ow] / (k * k);
}

static void pool_setup(op_case *c, int n, int ch, int h, int w, int k, uint32_t seed) {
    int planes = n * ch;
    *c = (op_case){.name = "avg_pool2d",
                   .p = {planes, h, w, k},
                   .out_n = (size_t)planes * (h / k) * (w / k),
                   .forward = ref_avg_pool,
                   .backward = ref_avg_pool_backward};
    size_t sizes[1] = {(size_t)planes * h * w};
    case_inputs(c, 1, sizes, seed);
    set_shape(c->in_shape[0], &c->in_ndim[0], DIMS(n, ch, h, w));
    set_shape(c->out_shape, &c->out_ndim, DIMS(n, ch, h / k, w / k));
    c->k_out = k * k;
}

/* ================================================================== activations
 * p = {n, op (0 relu, 1 elu)}; in = {x}. */

static void ref_act(const op_case *c, double *y) {
    for (size_t i = 0; i < c->in_n[0]; i++) {
        double v = c->in[0][i];
        y[i] = v > 0 ? v : (c->p[1] ? expm1(v) : 0.0);
    }
}

static void ref_act_backward(const op_case *c, const double *dy, double *const *g) {
    for (size_t i = 0; i < c->in_n[0]; i++) {
        double v = c->in[0][i];
        g[0][i] = dy[i] * (v > 0 ? 1.0 : (c->p[1] ? exp(v) : 0.0));
    }
}

static void act_setup(op_case *c, int n, int op, uint32_t seed) {
    *c = (op_case){.name = op ? "elu" : "relu",
                   .p = {n, op},
                   .out_n = (size_t)n,
                   .forward = ref_act,
                   .backward = ref_act_backward};
    size_t sizes[1] = {(size_t)n};
    case_inputs(c, 1, sizes, seed);
    set_shape(c->in_shape[0], &c->in_ndim[0], DIMS(n));
    set_shape(c->out_shape, &c->out_ndim, DIMS(n));
    /* keep inputs away from the kink at 0, where differences straddle it */
    for (size_t i = 0; i < c->in_n[0]; i++)
        if (fabs(c->in[0][i]) < 1e-3)
            c->in[0][i] = 0.25;
}

/* ================================================================== Swin window ops
 * Permutations of [N, H, W, C]: p = {N, H, W, C, a, b, kind} with kind 0: window partition
 * (a = ws), 1: window reverse (a = ws), 2: roll by (a, b). The output element i comes from
 * input element source(i). */

static size_t perm_source(const int *p, size_t i) {
    int h_ = p[1], w_ = p[2], ch = p[3];
    if (p[6] == 2) {
        int c = (int)(i % ch), w = (int)(i / ch % w_), h = (int)(i / ch / w_ % h_);
        size_t n = i / ch / w_ / h_;
        int sh = ((h - p[4]) % h_ + h_) % h_, sw = ((w - p[5]) % w_ + w_) % w_;
        return ((n * h_ + sh) * w_ + sw) * ch + c;
    }
    int ws = p[4], nw_w = w_ / ws, nw = (h_ / ws) * nw_w;
    if (p[6] == 0) {
        int c = (int)(i % ch), t = (int)(i / ch % (ws * ws));
        size_t win = i / ch / (ws * ws);
        size_t n = win / nw;
        int wh = (int)(win % nw) / nw_w, ww = (int)(win % nw) % nw_w;
        return ((n * h_ + wh * ws + t / ws) * w_ + ww * ws + t % ws) * ch + c;
    }
    /* reverse: output [N, H, W, C] from windows */
    int c = (int)(i % ch), w = (int)(i / ch % w_), h = (int)(i / ch / w_ % h_);
    size_t n = i / ch / w_ / h_;
    size_t win = n * nw + (h / ws) * nw_w + w / ws;
    return (win * ws * ws + (h % ws) * ws + w % ws) * ch + c;
}

static void ref_perm(const op_case *c, double *y) {
    for (size_t i = 0; i < c->out_n; i++)
        y[i] = c->in[0][perm_source(c->p, i)];
}

static void ref_perm_backward(const op_case *c, const double *dy, double *const *g) {
    memset(g[0], 0, c->in_n[0] * sizeof(double));
    for (size_t i = 0; i < c->out_n; i++)
        g[0][perm_source(c->p, i)] += dy[i];
}

static void perm_setup(op_case *c, int n, int h, int w, int ch, int a, int b, int kind,
                       uint32_t seed) {
    static const char *names[] = {"window_partition", "window_reverse", "roll2d"};
    *c = (op_case){.name = names[kind],
                   .p = {n, h, w, ch, a, b, kind},
                   .out_n = (size_t)n * h * w * ch,
                   .forward = ref_perm,
                   .backward = ref_perm_backward};
    size_t sizes[1] = {c->out_n};
    case_inputs(c, 1, sizes, seed);
    int64_t windows = kind == 2 ? 0 : (int64_t)n * (h / a) * (w / a);
    int64_t *grid = kind == 1 ? c->out_shape : c->in_shape[0];
    int64_t *win = kind == 1 ? c->in_shape[0] : c->out_shape;
    int *grid_nd = kind == 1 ? &c->out_ndim : &c->in_ndim[0];
    int *win_nd = kind == 1 ? &c->in_ndim[0] : &c->out_ndim;
    set_shape(grid, grid_nd, DIMS(n, h, w, ch));
    if (kind == 2)
        set_shape(win, win_nd, DIMS(n, h, w, ch));
    else
        set_shape(win, win_nd, DIMS(windows, (int64_t)a * a, ch));
}

/* ================================================================== finite differences */

static void test_fd_conv(void **state) {
    (void)state;
    op_case c;
    conv_setup(&c, 2, 3, 5, 6, 2, 3, 3, 1, 1, 10);
    fd_check_case(&c, 11);
    case_free(&c);
    conv_setup(&c, 1, 2, 7, 6, 3, 7, 7, 1, 3, 12);
    fd_check_case(&c, 13);
    case_free(&c);
    conv_setup(&c, 2, 3, 5, 7, 2, 3, 2, 2, 1, 14); /* stride 2, non-square kernel */
    fd_check_case(&c, 15);
    case_free(&c);
    convt_setup(&c, 2, 3, 2, 3, 2, 2, 16);
    fd_check_case(&c, 17);
    case_free(&c);
    convt_setup(&c, 1, 2, 2, 1, 3, 4, 18);
    fd_check_case(&c, 19);
    case_free(&c);
}

static void test_fd_norm_resample(void **state) {
    (void)state;
    op_case c;
    gn_setup(&c, 2, 6, 3, 4, 2, 1e-5, 20);
    fd_check_case(&c, 21);
    case_free(&c);
    for (int align = 0; align < 2; align++) {
        bilinear_setup(&c, 1, 2, 5, 7, 12, 10, align, 22);
        fd_check_case(&c, 23);
        case_free(&c);
        bilinear_setup(&c, 2, 1, 12, 10, 5, 7, align, 24);
        fd_check_case(&c, 25);
        case_free(&c);
    }
    pool_setup(&c, 1, 3, 7, 9, 2, 26);
    fd_check_case(&c, 27);
    case_free(&c);
    pool_setup(&c, 2, 1, 9, 8, 4, 28);
    fd_check_case(&c, 29);
    case_free(&c);
}

static void test_fd_elementwise_and_windows(void **state) {
    (void)state;
    op_case c;
    for (int op = 0; op < 2; op++) {
        act_setup(&c, 50, op, 30);
        fd_check_case(&c, 31);
        case_free(&c);
    }
    for (int kind = 0; kind < 3; kind++) {
        perm_setup(&c, 2, 8, 12, 3, kind == 2 ? -2 : 4, -2, kind, 32);
        fd_check_case(&c, 33);
        case_free(&c);
    }
}

/* ================================================================== device runner */

typedef void (*dev_forward)(clh_ctx *ctx, const op_case *c, clh_tensor *const *in, clh_tensor *y);
/* grads[i] may be NULL (skipped) */
typedef void (*dev_backward)(clh_ctx *ctx, const op_case *c, clh_tensor *const *in,
                             const clh_tensor *dy, clh_tensor *const *grads);

static double grad_tol(const op_case *c, int i, const double *want, double extra) {
    return rel_tol(want, c->in_n[i]) + GEMM_TOL * c->k_grad[i] + extra;
}

/* Gradient output i: NaN for inputs (must be overwritten), `init` for parameters. */
static clh_tensor *grad_tensor(clh_ctx *ctx, const op_case *c, int i, const float *init) {
    return tu_put(ctx, 4 + i, c->in_ndim[i], c->in_shape[i], c->is_param[i] ? init : NULL);
}

/* Forward and backward on the device vs the C reference: once with every gradient (twice,
 * so parameter gradients accumulate and input gradients are overwritten), then with one
 * gradient output at a time (the others NULL). */
static void device_check(clh_ctx *ctx, const op_case *c, dev_forward fwd, dev_backward bwd,
                         uint32_t seed) {
    clh_tensor *tin[3] = {NULL, NULL, NULL}, *tg[3] = {NULL, NULL, NULL};
    float *g0[3] = {NULL, NULL, NULL};
    double *gref[3] = {NULL, NULL, NULL};
    for (int i = 0; i < c->n_in; i++) {
        float *f = to_float(c->in[i], c->in_n[i]);
        tin[i] = tu_put(ctx, 3 + (size_t)i, c->in_ndim[i], c->in_shape[i], f);
        free(f);
        g0[i] = tu_random_floats(c->in_n[i], -1, 1, seed + 10 + (uint32_t)i);
        gref[i] = tu_alloc_doubles(c->in_n[i]);
    }
    clh_tensor *ty = tu_nan_tensor(ctx, c->out_ndim, c->out_shape);
    fwd(ctx, c, tin, ty);
    double *want = tu_alloc_doubles(c->out_n);
    c->forward(c, want);
    expect_close(c->name, ty, want, c->out_n, rel_tol(want, c->out_n) + GEMM_TOL * c->k_out);

    float *dyf = tu_random_floats(c->out_n, -1, 1, seed);
    double *dy = tu_to_double(dyf, c->out_n);
    clh_tensor *tdy = tu_put(ctx, 1, c->out_ndim, c->out_shape, dyf);
    c->backward(c, dy, gref);
    for (int i = 0; i < c->n_in; i++)
        tg[i] = grad_tensor(ctx, c, i, g0[i]);
    for (int round = 1; round <= 2; round++) {
        bwd(ctx, c, tin, tdy, tg);
        for (int i = 0; i < c->n_in; i++) {
            double *w = tu_alloc_doubles(c->in_n[i]);
            for (size_t e = 0; e < c->in_n[i]; e++)
                w[e] = c->is_param[i] ? g0[i][e] + round * gref[i][e] : gref[i][e];
            expect_close(c->name, tg[i], w, c->in_n[i], round * grad_tol(c, i, gref[i], 1e-6));
            free(w);
        }
    }
    for (int only = 0; c->n_in > 1 && only < c->n_in; only++) {
        clh_tensor *one[3] = {NULL, NULL, NULL};
        if (c->is_param[only])
            TU_OK(clh_tensor_fill(tg[only], 0));
        else
            TU_OK(clh_tensor_fill(tg[only], NAN));
        one[only] = tg[only];
        bwd(ctx, c, tin, tdy, one);
        expect_close(c->name, tg[only], gref[only], c->in_n[only],
                     grad_tol(c, only, gref[only], 0));
    }
    for (int i = 0; i < c->n_in; i++) {
        clh_tensor_release(tin[i]);
        clh_tensor_release(tg[i]);
        free(g0[i]);
        free(gref[i]);
    }
    clh_tensor_release(ty);
    clh_tensor_release(tdy);
    free(want);
    free(dyf);
    free(dy);
}

static void conv_fwd(clh_ctx *ctx, const op_case *c, clh_tensor *const *in, clh_tensor *y) {
    TU_OK(clh_conv2d_forward(ctx, in[0], in[1], in[2], c->p[7], c->p[8], y));
}

static void conv_bwd(clh_ctx *ctx, const op_case *c, clh_tensor *const *in, const clh_tensor *dy,
                     clh_tensor *const *g) {
    TU_OK(clh_conv2d_backward(ctx, in[0], in[1], c->p[7], c->p[8], dy, g[0], g[1], g[2]));
}

static void convt_fwd(clh_ctx *ctx, const op_case *c, clh_tensor *const *in, clh_tensor *y) {
    (void)c;
    TU_OK(clh_conv_transpose2d_forward(ctx, in[0], in[1], in[2], y));
}

static void convt_bwd(clh_ctx *ctx, const op_case *c, clh_tensor *const *in, const clh_tensor *dy,
                      clh_tensor *const *g) {
    (void)c;
    TU_OK(clh_conv_transpose2d_backward(ctx, in[0], in[1], dy, g[0], g[1], g[2]));
}

static void gn_fwd(clh_ctx *ctx, const op_case *c, clh_tensor *const *in, clh_tensor *y) {
    TU_OK(clh_group_norm_forward(ctx, in[0], c->p[4], in[1], in[2], (float)c->eps, y));
}

static void gn_bwd(clh_ctx *ctx, const op_case *c, clh_tensor *const *in, const clh_tensor *dy,
                   clh_tensor *const *g) {
    TU_OK(clh_group_norm_backward(ctx, in[0], c->p[4], in[1], (float)c->eps, dy, g[0], g[1], g[2]));
}

static void bilinear_fwd(clh_ctx *ctx, const op_case *c, clh_tensor *const *in, clh_tensor *y) {
    TU_OK(clh_bilinear_resize_forward(ctx, in[0], c->p[5], y));
}

static void bilinear_bwd(clh_ctx *ctx, const op_case *c, clh_tensor *const *in,
                         const clh_tensor *dy, clh_tensor *const *g) {
    (void)in;
    TU_OK(clh_bilinear_resize_backward(ctx, dy, c->p[5], g[0]));
}

static void pool_fwd(clh_ctx *ctx, const op_case *c, clh_tensor *const *in, clh_tensor *y) {
    TU_OK(clh_avg_pool2d_forward(ctx, in[0], c->p[3], y));
}

static void pool_bwd(clh_ctx *ctx, const op_case *c, clh_tensor *const *in, const clh_tensor *dy,
                     clh_tensor *const *g) {
    (void)in;
    TU_OK(clh_avg_pool2d_backward(ctx, dy, c->p[3], g[0]));
}

static void act_fwd(clh_ctx *ctx, const op_case *c, clh_tensor *const *in, clh_tensor *y) {
    TU_OK(c->p[1] ? clh_elu_forward(ctx, in[0], y) : clh_relu_forward(ctx, in[0], y));
}

static void act_bwd(clh_ctx *ctx, const op_case *c, clh_tensor *const *in, const clh_tensor *dy,
                    clh_tensor *const *g) {
    TU_OK(c->p[1] ? clh_elu_backward(ctx, in[0], dy, g[0])
                  : clh_relu_backward(ctx, in[0], dy, g[0]));
}

static void perm_fwd(clh_ctx *ctx, const op_case *c, clh_tensor *const *in, clh_tensor *y) {
    const int *p = c->p;
    if (p[6] == 0)
        TU_OK(clh_window_partition(ctx, in[0], p[4], y));
    else if (p[6] == 1)
        TU_OK(clh_window_reverse(ctx, in[0], p[4], y));
    else
        TU_OK(clh_roll2d(ctx, in[0], p[4], p[5], y));
}

static void perm_bwd(clh_ctx *ctx, const op_case *c, clh_tensor *const *in, const clh_tensor *dy,
                     clh_tensor *const *g) {
    (void)in;
    const int *p = c->p;
    if (p[6] == 0)
        TU_OK(clh_window_partition_backward(ctx, dy, p[4], g[0]));
    else if (p[6] == 1)
        TU_OK(clh_window_reverse_backward(ctx, dy, p[4], g[0]));
    else
        TU_OK(clh_roll2d_backward(ctx, dy, p[4], p[5], g[0]));
}

/* ================================================================== device tests */

static void test_conv2d_device(void **state) {
    TU_CTX_OR_SKIP(ctx);
    /* {N, C, H, W, O, kh, kw, stride, pad} */
    static const int cases[][9] = {{2, 3, 7, 9, 5, 3, 3, 1, 1},    {2, 1, 9, 11, 6, 7, 7, 1, 3},
                                   {2, 5, 7, 9, 3, 1, 1, 1, 0},    {2, 5, 7, 9, 3, 3, 3, 2, 1},
                                   {1, 3, 6, 5, 4, 2, 3, 2, 0},    {3, 2, 5, 7, 4, 1, 1, 2, 0},
                                   {2, 33, 10, 12, 17, 3, 3, 1, 1}};
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        const int *q = cases[k];
        op_case c;
        conv_setup(&c, q[0], q[1], q[2], q[3], q[4], q[5], q[6], q[7], q[8], 100 + 10 * k);
        device_check(ctx, &c, conv_fwd, conv_bwd, 500 + 10 * k);
        case_free(&c);
    }
}

static void test_conv_transpose2d_device(void **state) {
    TU_CTX_OR_SKIP(ctx);
    /* {N, C, H, W, O, k} */
    static const int cases[][6] = {{2, 5, 3, 4, 3, 2}, {1, 3, 5, 7, 2, 4}, {2, 19, 7, 9, 6, 2}};
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        const int *q = cases[k];
        op_case c;
        convt_setup(&c, q[0], q[1], q[2], q[3], q[4], q[5], 200 + 10 * k);
        device_check(ctx, &c, convt_fwd, convt_bwd, 600 + 10 * k);
        case_free(&c);
    }
}

static void test_group_norm_device(void **state) {
    TU_CTX_OR_SKIP(ctx);
    op_case c;
    gn_setup(&c, 2, 6, 7, 9, 2, 1e-5, 300);
    device_check(ctx, &c, gn_fwd, gn_bwd, 700);
    case_free(&c);
    gn_setup(&c, 3, 8, 5, 3, 8, 1e-3, 310); /* one channel per group */
    device_check(ctx, &c, gn_fwd, gn_bwd, 710);
    case_free(&c);
    gn_setup(&c, 2, 64, 12, 12, 4, 1e-5, 320); /* groups larger than a work-group */
    device_check(ctx, &c, gn_fwd, gn_bwd, 720);
    case_free(&c);
}

static void test_bilinear_device(void **state) {
    TU_CTX_OR_SKIP(ctx);
    /* {H, W, H2, W2} */
    static const int sizes[][4] = {{5, 7, 12, 10}, {12, 10, 5, 7}, {6, 6, 24, 24},
                                   {1, 3, 4, 1},   {7, 9, 7, 9},   {24, 24, 6, 6}};
    for (int align = 0; align < 2; align++)
        for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
            const int *q = sizes[k];
            op_case c;
            bilinear_setup(&c, 2, 3, q[0], q[1], q[2], q[3], align, 400 + 10 * k);
            device_check(ctx, &c, bilinear_fwd, bilinear_bwd, 800 + 10 * k);
            case_free(&c);
        }
}

static void test_pool_and_activations_device(void **state) {
    TU_CTX_OR_SKIP(ctx);
    op_case c;
    pool_setup(&c, 2, 3, 7, 9, 2, 900);
    device_check(ctx, &c, pool_fwd, pool_bwd, 910);
    case_free(&c);
    pool_setup(&c, 2, 5, 8, 12, 4, 920);
    device_check(ctx, &c, pool_fwd, pool_bwd, 930);
    case_free(&c);
    pool_setup(&c, 1, 2, 5, 5, 1, 940);
    device_check(ctx, &c, pool_fwd, pool_bwd, 950);
    case_free(&c);
    for (int op = 0; op < 2; op++) {
        act_setup(&c, 1001, op, 960);
        device_check(ctx, &c, act_fwd, act_bwd, 970);
        case_free(&c);
    }
}

/* In place: y may be x; dx may be dy. */
static void test_activations_in_place(void **state) {
    TU_CTX_OR_SKIP(ctx);
    for (int op = 0; op < 2; op++) {
        op_case c;
        act_setup(&c, 37, op, 980);
        float *xf = to_float(c.in[0], 37), *dyf = tu_random_floats(37, -1, 1, 981);
        double *want = tu_alloc_doubles(37), *dy = tu_to_double(dyf, 37),
               *gx = tu_alloc_doubles(37);
        c.forward(&c, want);
        double *grads[1] = {gx};
        c.backward(&c, dy, grads);
        clh_tensor *x = tu_put(ctx, 1, DIMS(37), xf), *t = tu_put(ctx, 2, DIMS(37), xf);
        clh_tensor *d = tu_put(ctx, 0, DIMS(37), dyf);
        TU_OK(op ? clh_elu_backward(ctx, x, d, d) : clh_relu_backward(ctx, x, d, d));
        expect_close(c.name, d, gx, 37, rel_tol(gx, 37));
        TU_OK(op ? clh_elu_forward(ctx, t, t) : clh_relu_forward(ctx, t, t));
        expect_close(c.name, t, want, 37, rel_tol(want, 37));
        clh_tensor_release(x);
        clh_tensor_release(t);
        clh_tensor_release(d);
        free(xf);
        free(dyf);
        free(want);
        free(dy);
        free(gx);
        case_free(&c);
    }
}

static void test_windows_device(void **state) {
    TU_CTX_OR_SKIP(ctx);
    /* {N, H, W, C, a, b, kind} */
    static const int cases[][7] = {{2, 8, 12, 5, 4, 0, 0},   {2, 8, 12, 5, 4, 0, 1},
                                   {2, 8, 12, 5, -2, -2, 2}, {2, 8, 12, 5, 2, 2, 2},
                                   {1, 6, 6, 3, 6, 0, 0},    {1, 7, 9, 3, 15, -10, 2}};
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        const int *q = cases[k];
        op_case c;
        perm_setup(&c, q[0], q[1], q[2], q[3], q[4], q[5], q[6], 1000 + 10 * k);
        device_check(ctx, &c, perm_fwd, perm_bwd, 1100 + 10 * k);
        case_free(&c);
    }
}

/* Swin's shifted-window path round-trips: reverse(partition(roll(x, -s))) rolled by +s is x. */
static void test_windows_round_trip(void **state) {
    TU_CTX_OR_SKIP(ctx);
    float *xf = tu_random_floats(2 * 8 * 12 * 3, -1, 1, 1200);
    clh_tensor *x = tu_put(ctx, 1, DIMS(2, 8, 12, 3), xf),
               *r = tu_nan_tensor(ctx, DIMS(2, 8, 12, 3));
    clh_tensor *w = tu_nan_tensor(ctx, DIMS(12, 16, 3)), *b = tu_nan_tensor(ctx, DIMS(2, 8, 12, 3));
    TU_OK(clh_roll2d(ctx, x, -2, -2, r));
    TU_OK(clh_window_partition(ctx, r, 4, w));
    TU_OK(clh_window_reverse(ctx, w, 4, b));
    TU_OK(clh_roll2d(ctx, b, 2, 2, r));
    float *got = tu_fetch(r);
    assert_memory_equal(got, xf, sizeof(float) * 2 * 8 * 12 * 3);
    free(got);
    free(xf);
    clh_tensor_release(x);
    clh_tensor_release(r);
    clh_tensor_release(w);
    clh_tensor_release(b);
}

/* ================================================================== torch fixtures */

static double *read_fixture(clh_st_file *f, const char *cname, const char *tname, size_t n) {
    char key[64];
    snprintf(key, sizeof key, "%s.%s", cname, tname);
    clh_st_tensor_info info;
    TU_OK(clh_st_info(f, key, &info));
    assert_int_equal(info.numel, n);
    float *buf = malloc(n * sizeof *buf);
    assert_non_null(buf);
    TU_OK(clh_st_read_f32(f, key, buf, n));
    double *d = tu_to_double(buf, n);
    free(buf);
    return d;
}

/* max|got - want| / max|want| of a C reference result against torch. */
static void expect_torch(const char *name, const double *got, const double *want, size_t n) {
    double err = 0, mag = tu_max_abs(want, n);
    for (size_t i = 0; i < n; i++)
        err = fmax(err, fabs(got[i] - want[i]));
    double rel = mag > 0 ? err / mag : err;
    note_error(name, ERR_TORCH, rel);
    if (!(rel <= TORCH_TOL))
        fail_msg("%s: C reference differs from torch by %.3g relative", name, rel);
}

/* Inputs from the fixture case `cname`; the C reference and the device against torch's y and
 * gradients (device parameter gradients start at 0). */
static void torch_case(clh_ctx *ctx, clh_st_file *f, const char *cname, op_case *c,
                       const char *const *in_names, dev_forward fwd, dev_backward bwd) {
    double *torch_g[3] = {NULL, NULL, NULL}, *ref_g[3] = {NULL, NULL, NULL};
    clh_tensor *tin[3] = {NULL, NULL, NULL}, *tg[3] = {NULL, NULL, NULL};
    for (int i = 0; i < c->n_in; i++) {
        char gname[32];
        free(c->in[i]);
        c->in[i] = read_fixture(f, cname, in_names[i], c->in_n[i]);
        snprintf(gname, sizeof gname, "d%s", in_names[i]);
        torch_g[i] = read_fixture(f, cname, gname, c->in_n[i]);
        ref_g[i] = tu_alloc_doubles(c->in_n[i]);
        float *xf = to_float(c->in[i], c->in_n[i]);
        tin[i] = tu_put(ctx, 1, c->in_ndim[i], c->in_shape[i], xf);
        free(xf);
        tg[i] = tu_nan_tensor(ctx, c->in_ndim[i], c->in_shape[i]);
        if (c->is_param[i])
            TU_OK(clh_tensor_fill(tg[i], 0));
    }
    double *ty_want = read_fixture(f, cname, "y", c->out_n);
    double *dy = read_fixture(f, cname, "dy", c->out_n);
    double *y = tu_alloc_doubles(c->out_n);
    c->forward(c, y);
    expect_torch(c->name, y, ty_want, c->out_n);
    c->backward(c, dy, ref_g);
    for (int i = 0; i < c->n_in; i++)
        expect_torch(c->name, ref_g[i], torch_g[i], c->in_n[i]);

    clh_tensor *ty = tu_nan_tensor(ctx, c->out_ndim, c->out_shape);
    fwd(ctx, c, tin, ty);
    expect_close(c->name, ty, ty_want, c->out_n, rel_tol(ty_want, c->out_n) + GEMM_TOL * c->k_out);
    float *dyf = to_float(dy, c->out_n);
    clh_tensor *tdy = tu_put(ctx, 2, c->out_ndim, c->out_shape, dyf);
    bwd(ctx, c, tin, tdy, tg);
    for (int i = 0; i < c->n_in; i++) {
        expect_close(c->name, tg[i], torch_g[i], c->in_n[i], grad_tol(c, i, torch_g[i], 1e-7));
        clh_tensor_release(tin[i]);
        clh_tensor_release(tg[i]);
        free(torch_g[i]);
        free(ref_g[i]);
    }
    clh_tensor_release(ty);
    clh_tensor_release(tdy);
    free(ty_want);
    free(dy);
    free(y);
    free(dyf);
}

static void test_against_torch(void **state) {
    TU_CTX_OR_SKIP(ctx);
    clh_st_file *f = NULL;
    TU_OK(clh_st_open(tu_fixture("head_ops/head_ops.safetensors"), &f));
    static const char *const conv_names[] = {"x", "w", "b"};
    static const char *const gn_names[] = {"x", "gamma", "beta"};
    static const char *const x_names[] = {"x"};
    op_case c;
    conv_setup(&c, 2, 3, 9, 11, 4, 7, 7, 1, 3, 1);
    torch_case(ctx, f, "conv7", &c, conv_names, conv_fwd, conv_bwd);
    case_free(&c);
    conv_setup(&c, 2, 5, 7, 9, 3, 3, 3, 2, 1, 1);
    torch_case(ctx, f, "conv3s2", &c, conv_names, conv_fwd, conv_bwd);
    case_free(&c);
    conv_setup(&c, 2, 5, 3, 4, 6, 1, 1, 1, 0, 1);
    torch_case(ctx, f, "conv1", &c, conv_names, conv_fwd, conv_bwd);
    case_free(&c);
    convt_setup(&c, 2, 5, 3, 4, 3, 2, 1);
    torch_case(ctx, f, "convt2", &c, conv_names, convt_fwd, convt_bwd);
    case_free(&c);
    convt_setup(&c, 1, 3, 2, 3, 2, 4, 1);
    torch_case(ctx, f, "convt4", &c, conv_names, convt_fwd, convt_bwd);
    case_free(&c);
    gn_setup(&c, 2, 6, 3, 4, 2, 1e-5, 1);
    torch_case(ctx, f, "gn", &c, gn_names, gn_fwd, gn_bwd);
    case_free(&c);
    bilinear_setup(&c, 2, 3, 5, 7, 12, 10, 1, 1);
    torch_case(ctx, f, "up_ac", &c, x_names, bilinear_fwd, bilinear_bwd);
    case_free(&c);
    bilinear_setup(&c, 2, 3, 5, 7, 12, 10, 0, 1);
    torch_case(ctx, f, "up", &c, x_names, bilinear_fwd, bilinear_bwd);
    case_free(&c);
    bilinear_setup(&c, 2, 3, 12, 10, 5, 7, 1, 1);
    torch_case(ctx, f, "down_ac", &c, x_names, bilinear_fwd, bilinear_bwd);
    case_free(&c);
    bilinear_setup(&c, 2, 3, 12, 10, 5, 7, 0, 1);
    torch_case(ctx, f, "down", &c, x_names, bilinear_fwd, bilinear_bwd);
    case_free(&c);
    pool_setup(&c, 2, 3, 7, 9, 2, 1);
    torch_case(ctx, f, "pool2", &c, x_names, pool_fwd, pool_bwd);
    case_free(&c);
    clh_st_close(f);
}

/* ================================================================== errors */

static void test_shape_errors(void **state) {
    TU_CTX_OR_SKIP(ctx);
    clh_tensor *x = tu_nan_tensor(ctx, DIMS(2, 3, 7, 9)), *w = tu_nan_tensor(ctx, DIMS(4, 3, 3, 3));
    clh_tensor *b = tu_nan_tensor(ctx, DIMS(4)), *y = tu_nan_tensor(ctx, DIMS(2, 4, 7, 9));
    clh_tensor *y_bad = tu_nan_tensor(ctx, DIMS(2, 4, 7, 8)),
               *w_bad = tu_nan_tensor(ctx, DIMS(4, 2, 3, 3));
    clh_tensor *b_bad = tu_nan_tensor(ctx, DIMS(5)), *x3 = tu_nan_tensor(ctx, DIMS(3, 7, 9));
    clh_tensor *dx_bad = tu_nan_tensor(ctx, DIMS(2, 3, 7, 8));

    /* conv2d */
    TU_FAILS(clh_conv2d_forward(ctx, x, w, b, 1, 1, y_bad), CLH_ERR_SHAPE, "y [2, 4, 7, 8]");
    TU_FAILS(clh_conv2d_forward(ctx, x, w, b, 1, 1, y_bad), CLH_ERR_SHAPE, "x [2, 3, 7, 9]");
    TU_FAILS(clh_conv2d_forward(ctx, x, w_bad, b, 1, 1, y), CLH_ERR_SHAPE, "w [4, 2, 3, 3]");
    TU_FAILS(clh_conv2d_forward(ctx, x, w, b_bad, 1, 1, y), CLH_ERR_SHAPE, "b [5]");
    TU_FAILS(clh_conv2d_forward(ctx, x3, w, b, 1, 1, y), CLH_ERR_SHAPE, "4-D");
    TU_FAILS(clh_conv2d_forward(ctx, x, w, b, 0, 1, y), CLH_ERR_INVALID_ARGUMENT, "stride");
    TU_FAILS(clh_conv2d_forward(ctx, x, w, b, 1, -1, y), CLH_ERR_INVALID_ARGUMENT, "padding");
    TU_FAILS(clh_conv2d_forward(ctx, x, w, b, 1, 1, x), CLH_ERR_SHAPE, "y [2, 3, 7, 9]");
    TU_FAILS(clh_conv2d_forward(NULL, x, w, b, 1, 1, y), CLH_ERR_INVALID_ARGUMENT, "context");
    TU_FAILS(clh_conv2d_forward(ctx, NULL, w, b, 1, 1, y), CLH_ERR_INVALID_ARGUMENT, "x is NULL");
    TU_FAILS(clh_conv2d_backward(ctx, x, w, 1, 1, y_bad, NULL, NULL, NULL), CLH_ERR_SHAPE,
             "dy [2, 4, 7, 8]");
    TU_FAILS(clh_conv2d_backward(ctx, x, w, 1, 1, y, dx_bad, NULL, NULL), CLH_ERR_SHAPE,
             "dx [2, 3, 7, 8]");
    TU_FAILS(clh_conv2d_backward(ctx, x, w, 1, 1, y, NULL, w_bad, NULL), CLH_ERR_SHAPE,
             "dw [4, 2, 3, 3]");
    TU_FAILS(clh_conv2d_backward(ctx, x, w, 1, 1, y, NULL, NULL, b_bad), CLH_ERR_SHAPE, "db [5]");
    TU_FAILS(clh_conv2d_backward(ctx, x, w, 1, 1, y, x, NULL, NULL), CLH_ERR_INVALID_ARGUMENT,
             "dx must not alias x");
    clh_tensor *big = tu_nan_tensor(ctx, DIMS(1, 1, 2, 2)),
               *k3 = tu_nan_tensor(ctx, DIMS(1, 1, 3, 3));
    clh_tensor *y1 = tu_nan_tensor(ctx, DIMS(1, 1, 1, 1));
    TU_FAILS(clh_conv2d_forward(ctx, big, k3, NULL, 1, 0, y1), CLH_ERR_SHAPE, "larger");

    /* transposed conv */
    clh_tensor *wt = tu_nan_tensor(ctx, DIMS(3, 4, 2, 2)),
               *yt = tu_nan_tensor(ctx, DIMS(2, 4, 14, 18));
    clh_tensor *wt_rect = tu_nan_tensor(ctx, DIMS(3, 4, 2, 3)),
               *wt_bad = tu_nan_tensor(ctx, DIMS(4, 4, 2, 2));
    TU_OK(clh_conv_transpose2d_forward(ctx, x, wt, b, yt));
    TU_FAILS(clh_conv_transpose2d_forward(ctx, x, wt, b, y), CLH_ERR_SHAPE, "y [2, 4, 7, 9]");
    TU_FAILS(clh_conv_transpose2d_forward(ctx, x, wt, b, y), CLH_ERR_SHAPE, "[2, 4, 14, 18]");
    TU_FAILS(clh_conv_transpose2d_forward(ctx, x, wt_rect, b, yt), CLH_ERR_SHAPE, "square");
    TU_FAILS(clh_conv_transpose2d_forward(ctx, x, wt_bad, b, yt), CLH_ERR_SHAPE, "w [4, 4, 2, 2]");
    TU_FAILS(clh_conv_transpose2d_forward(ctx, x, wt, b_bad, yt), CLH_ERR_SHAPE, "b [5]");
    TU_FAILS(clh_conv_transpose2d_backward(ctx, x, wt, yt, dx_bad, NULL, NULL), CLH_ERR_SHAPE,
             "dx [2, 3, 7, 8]");

    /* group norm */
    clh_tensor *g3 = tu_nan_tensor(ctx, DIMS(3)), *g4 = tu_nan_tensor(ctx, DIMS(4));
    clh_tensor *x6 = tu_nan_tensor(ctx, DIMS(2, 6, 3, 3)), *g6 = tu_nan_tensor(ctx, DIMS(6));
    TU_FAILS(clh_group_norm_forward(ctx, x, 2, g3, g3, 1e-5f, x), CLH_ERR_INVALID_ARGUMENT,
             "groups (2) must divide the 3 channels");
    TU_FAILS(clh_group_norm_forward(ctx, x, 3, g4, g3, 1e-5f, x), CLH_ERR_SHAPE, "gamma [4]");
    TU_FAILS(clh_group_norm_forward(ctx, x, 3, g3, g4, 1e-5f, x), CLH_ERR_SHAPE, "beta [4]");
    TU_FAILS(clh_group_norm_forward(ctx, x, 3, g3, g3, 1e-5f, dx_bad), CLH_ERR_SHAPE,
             "y [2, 3, 7, 8]");
    TU_FAILS(clh_group_norm_forward(ctx, x, 0, g3, g3, 1e-5f, x), CLH_ERR_INVALID_ARGUMENT,
             "groups");
    TU_FAILS(clh_group_norm_backward(ctx, x6, 2, g6, 1e-5f, x6, x6, NULL, NULL),
             CLH_ERR_INVALID_ARGUMENT, "dx must not alias x");
    TU_FAILS(clh_group_norm_backward(ctx, x6, 2, g6, 1e-5f, x6, NULL, g3, NULL), CLH_ERR_SHAPE,
             "dgamma [3]");

    /* bilinear, pooling */
    clh_tensor *r_bad = tu_nan_tensor(ctx, DIMS(2, 4, 5, 5)),
               *r = tu_nan_tensor(ctx, DIMS(2, 3, 5, 5));
    TU_FAILS(clh_bilinear_resize_forward(ctx, x, 0, r_bad), CLH_ERR_SHAPE, "y [2, 4, 5, 5]");
    TU_FAILS(clh_bilinear_resize_forward(ctx, x, 0, r_bad), CLH_ERR_SHAPE, "x [2, 3, 7, 9]");
    TU_FAILS(clh_bilinear_resize_backward(ctx, r_bad, 0, x), CLH_ERR_SHAPE, "dy [2, 4, 5, 5]");
    TU_FAILS(clh_bilinear_resize_forward(ctx, x3, 0, r), CLH_ERR_SHAPE, "4-D");
    TU_FAILS(clh_bilinear_resize_forward(ctx, x, 1, x), CLH_ERR_INVALID_ARGUMENT, "alias");
    clh_tensor *p2 = tu_nan_tensor(ctx, DIMS(2, 3, 3, 4));
    TU_OK(clh_avg_pool2d_forward(ctx, x, 2, p2));
    TU_FAILS(clh_avg_pool2d_forward(ctx, x, 2, r), CLH_ERR_SHAPE, "y [2, 3, 5, 5]");
    TU_FAILS(clh_avg_pool2d_forward(ctx, x, 2, r), CLH_ERR_SHAPE, "[2, 3, 3, 4]");
    TU_FAILS(clh_avg_pool2d_backward(ctx, r, 2, x), CLH_ERR_SHAPE, "dy [2, 3, 5, 5]");
    TU_FAILS(clh_avg_pool2d_forward(ctx, x, 0, p2), CLH_ERR_INVALID_ARGUMENT, "k must be >= 1");
    TU_FAILS(clh_avg_pool2d_forward(ctx, x, 8, p2), CLH_ERR_SHAPE, "smaller than k = 8");

    /* activations */
    TU_FAILS(clh_relu_forward(ctx, x, b), CLH_ERR_SHAPE, "y [4]");
    TU_FAILS(clh_elu_backward(ctx, x, y, x), CLH_ERR_SHAPE, "dy [2, 4, 7, 9]");

    /* windows and roll */
    clh_tensor *grid = tu_nan_tensor(ctx, DIMS(2, 8, 12, 5)),
               *win = tu_nan_tensor(ctx, DIMS(12, 16, 5));
    clh_tensor *win_bad = tu_nan_tensor(ctx, DIMS(12, 16, 4)),
               *grid_odd = tu_nan_tensor(ctx, DIMS(2, 7, 12, 5));
    TU_OK(clh_window_partition(ctx, grid, 4, win));
    TU_FAILS(clh_window_partition(ctx, grid, 4, win_bad), CLH_ERR_SHAPE, "win [12, 16, 4]");
    TU_FAILS(clh_window_partition(ctx, grid, 4, win_bad), CLH_ERR_SHAPE, "x [2, 8, 12, 5]");
    TU_FAILS(clh_window_partition(ctx, grid_odd, 4, win), CLH_ERR_SHAPE,
             "not a multiple of ws = 4");
    TU_FAILS(clh_window_reverse(ctx, win_bad, 4, grid), CLH_ERR_SHAPE, "win [12, 16, 4]");
    TU_FAILS(clh_window_partition(ctx, grid, 0, win), CLH_ERR_INVALID_ARGUMENT, "ws");
    TU_FAILS(clh_roll2d(ctx, grid, 1, 1, grid_odd), CLH_ERR_SHAPE, "y [2, 7, 12, 5]");
    TU_FAILS(clh_roll2d(ctx, grid, 1, 1, grid), CLH_ERR_INVALID_ARGUMENT, "alias");
    TU_FAILS(clh_roll2d_backward(ctx, grid, 1, 1, grid_odd), CLH_ERR_SHAPE, "dx [2, 7, 12, 5]");

    clh_tensor *all[] = {x,   w,  b,     y,  y_bad, w_bad,   b_bad,  x3,      dx_bad,
                         big, k3, y1,    wt, yt,    wt_rect, wt_bad, g3,      g4,
                         x6,  g6, r_bad, r,  p2,    grid,    win,    win_bad, grid_odd};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        clh_tensor_release(all[i]);
}

/* ================================================================== timing */

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* CAT-Seg decoder-sized layers (batch of 4 class maps): forward + backward times, printed. */
static void test_timing(void **state) {
    TU_CTX_OR_SKIP(ctx);
    const int n = 4;
    clh_tensor *x = tu_nan_tensor(ctx, DIMS(n, 128, 48, 48)),
               *w = tu_nan_tensor(ctx, DIMS(64, 128, 3, 3));
    clh_tensor *y = tu_nan_tensor(ctx, DIMS(n, 64, 48, 48)),
               *dw = tu_nan_tensor(ctx, DIMS(64, 128, 3, 3));
    clh_tensor *dx = tu_nan_tensor(ctx, DIMS(n, 128, 48, 48)), *g = tu_nan_tensor(ctx, DIMS(64));
    clh_tensor *up = tu_nan_tensor(ctx, DIMS(n, 64, 96, 96)),
               *wt = tu_nan_tensor(ctx, DIMS(64, 48, 2, 2));
    clh_tensor *yt = tu_nan_tensor(ctx, DIMS(n, 48, 96, 96)),
               *gy = tu_nan_tensor(ctx, DIMS(n, 64, 48, 48));
    clh_tensor *dg = tu_nan_tensor(ctx, DIMS(64)), *db = tu_nan_tensor(ctx, DIMS(64));
    TU_OK(clh_tensor_fill(x, 0.5f));
    TU_OK(clh_tensor_fill(w, 0.01f));
    TU_OK(clh_tensor_fill(dw, 0));
    TU_OK(clh_tensor_fill(g, 1));
    TU_OK(clh_tensor_fill(dg, 0));
    TU_OK(clh_tensor_fill(db, 0));
    TU_OK(clh_tensor_fill(wt, 0.02f));
    double t[6];
    /* warm-up builds the programs */
    TU_OK(clh_conv2d_forward(ctx, x, w, NULL, 1, 1, y));
    TU_OK(clh_ctx_finish(ctx));
    t[0] = now_seconds();
    TU_OK(clh_conv2d_forward(ctx, x, w, NULL, 1, 1, y));
    TU_OK(clh_ctx_finish(ctx));
    t[1] = now_seconds();
    TU_OK(clh_conv2d_backward(ctx, x, w, 1, 1, y, dx, dw, NULL));
    TU_OK(clh_ctx_finish(ctx));
    t[2] = now_seconds();
    TU_OK(clh_group_norm_forward(ctx, y, 4, g, g, 1e-5f, y));
    TU_OK(clh_group_norm_backward(ctx, y, 4, g, 1e-5f, y, gy, dg, db));
    TU_OK(clh_ctx_finish(ctx));
    t[3] = now_seconds();
    TU_OK(clh_bilinear_resize_forward(ctx, y, 1, up));
    TU_OK(clh_bilinear_resize_backward(ctx, up, 1, y));
    TU_OK(clh_ctx_finish(ctx));
    t[4] = now_seconds();
    TU_OK(clh_conv_transpose2d_forward(ctx, y, wt, NULL, yt));
    TU_OK(clh_ctx_finish(ctx));
    t[5] = now_seconds();
    print_message("timing on %s (N=%d): conv3x3 128->64 @48x48 fwd %.1f ms, bwd %.1f ms; "
                  "group norm fwd+bwd %.1f ms; bilinear 48->96 fwd+bwd %.1f ms; "
                  "convT k2 64->48 fwd %.1f ms\n",
                  clh_ctx_device(ctx)->name, n, 1e3 * (t[1] - t[0]), 1e3 * (t[2] - t[1]),
                  1e3 * (t[3] - t[2]), 1e3 * (t[4] - t[3]), 1e3 * (t[5] - t[4]));
    clh_tensor *all[] = {x, w, y, dw, dx, g, up, wt, yt, gy, dg, db};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        clh_tensor_release(all[i]);
}

/* ------------------------------------------------------------------ main */

static int teardown(void **state) {
    (void)state;
    print_message("max relative errors (finite differences of the C double reference | device "
                  "float vs C double or torch | C double vs torch):\n");
    for (int i = 0; i < n_stats_; i++)
        print_message("  %-18s fd %-9.2e device %-9.2e torch %.2e\n", stats_[i].name,
                      stats_[i].fd < 0 ? NAN : stats_[i].fd,
                      stats_[i].dev < 0 ? NAN : stats_[i].dev,
                      stats_[i].torch < 0 ? NAN : stats_[i].torch);
    tu_ctx_teardown();
    return 0;
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fd_conv),
        cmocka_unit_test(test_fd_norm_resample),
        cmocka_unit_test(test_fd_elementwise_and_windows),
        cmocka_unit_test(test_conv2d_device),
        cmocka_unit_test(test_conv_transpose2d_device),
        cmocka_unit_test(test_group_norm_device),
        cmocka_unit_test(test_bilinear_device),
        cmocka_unit_test(test_pool_and_activations_device),
        cmocka_unit_test(test_activations_in_place),
        cmocka_unit_test(test_windows_device),
        cmocka_unit_test(test_windows_round_trip),
        cmocka_unit_test(test_against_torch),
        cmocka_unit_test(test_shape_errors),
        cmocka_unit_test(test_timing),
    };
    return cmocka_run_group_tests_name("head_ops", tests, NULL, teardown);
}
