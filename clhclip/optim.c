/* AdamW with parameter groups, global gradient-norm clipping and the cosine schedule.
 *
 * The update is torch.optim.AdamW's (decoupled weight decay, bias corrections with the
 * step count t starting at 1), one kernel launch per parameter tensor (kernels/optim.cl).
 * Clipping is torch.nn.utils.clip_grad_norm_: the L2 norm over all gradients, and when
 * max_norm / (norm + 1e-6) < 1 every gradient is multiplied by that factor.
 *
 * Hyper-parameters are floats in the API; the host derives the per-step scalars
 * (1 - lr wd, lr / (1 - beta1^t), sqrt(1 - beta2^t)) in double and rounds them once,
 * as torch does with its Python-float hyper-parameters. */
#include <limits.h>
#include <math.h>
#include <stdlib.h>

#include "hclip.h"
#include "internal.h"

/* Work-groups per tensor for the gradient sum of squares. A fixed count keeps the
 * partial sums, and so the norm, bit-identical from run to run on one device. */
#define SUM_GROUPS    64
#define SUM_MAX_LOCAL 256

struct clh_adamw {
    clh_ctx *ctx;
    /* arrays of pointers, so that pointers handed out stay valid when they grow */
    clh_adamw_config **groups;
    int n_groups, cap_groups;
    clh_adamw_param **params;
    int n_params, cap_params;
    long steps;
    clh_tensor *partials; /* SUM_GROUPS floats per parameter, for the norm */
};

/* ------------------------------------------------------------------ helpers */

/* Grow an array of pointers to hold one more entry. */
static int grow(void ***items, int count, int *cap) {
    if (count < *cap)
        return 1;
    int new_cap = *cap ? *cap * 2 : 8;
    void **bigger = realloc(*items, (size_t)new_cap * sizeof *bigger);
    if (!bigger)
        return 0;
    *items = bigger;
    *cap = new_cap;
    return 1;
}

static int same_shape(const clh_tensor *a, const clh_tensor *b) {
    if (a->ndim != b->ndim)
        return 0;
    for (int i = 0; i < a->ndim; i++)
        if (a->shape[i] != b->shape[i])
            return 0;
    return 1;
}

/* Do the element ranges of a and b share memory? */
static int overlaps(const clh_tensor *a, const clh_tensor *b) {
    return a->mem == b->mem && a->offset < b->offset + b->numel && b->offset < a->offset + a->numel;
}

/* torch.optim.AdamW's argument checks. */
static clh_status check_config(clh_ctx *ctx, const char *fn, int group, const clh_adamw_config *c) {
    const char *bad = NULL;
    if (!(c->lr >= 0.0f) || isinf(c->lr))
        bad = "lr must be finite and >= 0";
    else if (!(c->beta1 >= 0.0f && c->beta1 < 1.0f))
        bad = "beta1 must be in [0, 1)";
    else if (!(c->beta2 >= 0.0f && c->beta2 < 1.0f))
        bad = "beta2 must be in [0, 1)";
    else if (!(c->eps >= 0.0f) || isinf(c->eps))
        bad = "eps must be finite and >= 0";
    else if (!(c->weight_decay >= 0.0f) || isinf(c->weight_decay))
        bad = "weight_decay must be finite and >= 0";
    if (!bad)
        return CLH_OK;
    return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT,
                    "%s: group %d: %s (lr %g, betas (%g, %g), eps %g, weight_decay %g)", fn, group,
                    bad, (double)c->lr, (double)c->beta1, (double)c->beta2, (double)c->eps,
                    (double)c->weight_decay);
}

static clh_status check_tensor(clh_adamw *opt, const char *fn, int index, const char *name,
                               const clh_tensor *t) {
    if (!t)
        return clh_fail(opt->ctx, CLH_ERR_INVALID_ARGUMENT, "%s: %s of parameter %d is NULL", fn,
                        name, index);
    if (t->ctx != opt->ctx)
        return clh_fail(opt->ctx, CLH_ERR_INVALID_ARGUMENT,
                        "%s: %s of parameter %d belongs to another context than the optimizer", fn,
                        name, index);
    if (t->offset + t->numel > (size_t)INT_MAX)
        return clh_fail(opt->ctx, CLH_ERR_UNSUPPORTED,
                        "%s: %s of parameter %d (%zu elements at offset %zu) is beyond the "
                        "2^31-1 elements kernels can index",
                        fn, name, index, t->numel, t->offset);
    return CLH_OK;
}

/* A parameter or gradient must not share memory with one already registered (torch:
 * "some parameters appear in more than one parameter group"), nor with each other. */
static clh_status check_no_overlap(clh_adamw *opt, const char *fn, const clh_tensor *param,
                                   const clh_tensor *grad) {
    int index = opt->n_params;
    if (overlaps(param, grad))
        return clh_fail(opt->ctx, CLH_ERR_INVALID_ARGUMENT,
                        "%s: param and grad of parameter %d share memory", fn, index);
    for (int i = 0; i < opt->n_params; i++) {
        const clh_adamw_param *old = opt->params[i];
        if (overlaps(param, old->param) || overlaps(param, old->grad))
            return clh_fail(opt->ctx, CLH_ERR_INVALID_ARGUMENT,
                            "%s: param of parameter %d shares memory with parameter %d "
                            "(registered twice?)",
                            fn, index, i);
        if (overlaps(grad, old->param) || overlaps(grad, old->grad))
            return clh_fail(opt->ctx, CLH_ERR_INVALID_ARGUMENT,
                            "%s: grad of parameter %d shares memory with parameter %d", fn, index,
                            i);
    }
    return CLH_OK;
}

static void param_free(clh_adamw_param *p) {
    if (!p)
        return;
    clh_tensor_release(p->param);
    clh_tensor_release(p->grad);
    clh_tensor_release(p->m);
    clh_tensor_release(p->v);
    free(p);
}

/* ------------------------------------------------------------------ lifetime */

clh_status clh_adamw_new(clh_ctx *ctx, clh_adamw **out) {
    if (!out)
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT, "clh_adamw_new: NULL out pointer");
    *out = NULL;
    if (!ctx)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "clh_adamw_new: NULL context");
    clh_adamw *opt = calloc(1, sizeof *opt);
    if (!opt)
        return clh_fail(ctx, CLH_ERR_OUT_OF_MEMORY, "clh_adamw_new: out of host memory");
    opt->ctx = ctx;
    *out = opt;
    return CLH_OK;
}

void clh_adamw_free(clh_adamw *opt) {
    if (!opt)
        return;
    for (int i = 0; i < opt->n_params; i++)
        param_free(opt->params[i]);
    for (int i = 0; i < opt->n_groups; i++)
        free(opt->groups[i]);
    free(opt->params);
    free(opt->groups);
    clh_tensor_release(opt->partials);
    free(opt);
}

/* ------------------------------------------------------------------ registration */

clh_status clh_adamw_add_group(clh_adamw *opt, const clh_adamw_config *config, int *group) {
    static const char fn[] = "clh_adamw_add_group";
    if (!opt || !config || !group)
        return clh_fail(opt ? opt->ctx : NULL, CLH_ERR_INVALID_ARGUMENT, "%s: NULL %s", fn,
                        !opt      ? "optimizer"
                        : !config ? "config"
                                  : "group");
    CLH_TRY(check_config(opt->ctx, fn, opt->n_groups, config));
    if (!grow((void ***)&opt->groups, opt->n_groups, &opt->cap_groups))
        return clh_fail(opt->ctx, CLH_ERR_OUT_OF_MEMORY, "%s: out of host memory", fn);
    clh_adamw_config *copy = malloc(sizeof *copy);
    if (!copy)
        return clh_fail(opt->ctx, CLH_ERR_OUT_OF_MEMORY, "%s: out of host memory", fn);
    *copy = *config;
    opt->groups[opt->n_groups] = copy;
    *group = opt->n_groups++;
    return CLH_OK;
}

clh_adamw_config *clh_adamw_group_config(clh_adamw *opt, int group) {
    if (!opt || group < 0 || group >= opt->n_groups)
        return NULL;
    return opt->groups[group];
}

/* The state tensors m and v: zero-filled, with the parameter's shape. */
static clh_status new_state(clh_adamw *opt, const clh_tensor *param, clh_adamw_param *p) {
    CLH_TRY(clh_tensor_new(opt->ctx, param->ndim, param->shape, &p->m));
    return clh_tensor_new(opt->ctx, param->ndim, param->shape, &p->v);
}

clh_status clh_adamw_add_param(clh_adamw *opt, int group, clh_tensor *param, clh_tensor *grad) {
    static const char fn[] = "clh_adamw_add_param";
    if (!opt)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "%s: NULL optimizer", fn);
    int index = opt->n_params;
    if (group < 0 || group >= opt->n_groups)
        return clh_fail(opt->ctx, CLH_ERR_INVALID_ARGUMENT,
                        "%s: group %d of parameter %d does not exist (%d groups)", fn, group, index,
                        opt->n_groups);
    CLH_TRY(check_tensor(opt, fn, index, "param", param));
    CLH_TRY(check_tensor(opt, fn, index, "grad", grad));
    if (!same_shape(param, grad)) {
        char sp[128], sg[128];
        clh_shape_str(param->ndim, param->shape, sp, sizeof sp);
        clh_shape_str(grad->ndim, grad->shape, sg, sizeof sg);
        return clh_fail(opt->ctx, CLH_ERR_SHAPE,
                        "%s: grad %s does not have the shape of param %s (parameter %d)", fn, sg,
                        sp, index);
    }
    CLH_TRY(check_no_overlap(opt, fn, param, grad));
    if (!grow((void ***)&opt->params, opt->n_params, &opt->cap_params))
        return clh_fail(opt->ctx, CLH_ERR_OUT_OF_MEMORY, "%s: out of host memory", fn);
    clh_adamw_param *p = calloc(1, sizeof *p);
    if (!p)
        return clh_fail(opt->ctx, CLH_ERR_OUT_OF_MEMORY, "%s: out of host memory", fn);
    clh_status st = new_state(opt, param, p);
    if (st != CLH_OK) {
        param_free(p);
        return st;
    }
    clh_tensor_retain(param);
    clh_tensor_retain(grad);
    p->param = param;
    p->grad = grad;
    p->group = group;
    opt->params[opt->n_params++] = p;
    return CLH_OK;
}

/* ------------------------------------------------------------------ clipping */

/* Local size of adamw_sum_squares: a power of two within the device and kernel
 * limits (the tree reduction needs a power of two). */
static clh_status sum_local_size(clh_ctx *ctx, size_t *local) {
    size_t limit = 0;
    CLH_TRY(clh_kernel_wg_size(ctx, "adamw_sum_squares", &limit));
    if (limit > SUM_MAX_LOCAL)
        limit = SUM_MAX_LOCAL;
    if (ctx->info.max_work_item_sizes[0] && limit > ctx->info.max_work_item_sizes[0])
        limit = ctx->info.max_work_item_sizes[0];
    size_t size = 1;
    while (size * 2 <= limit)
        size *= 2;
    *local = size;
    return CLH_OK;
}

/* Enough zeroed partial-sum slots for every parameter. */
static clh_status prepare_partials(clh_adamw *opt) {
    size_t need = (size_t)opt->n_params * SUM_GROUPS;
    if (!opt->partials || opt->partials->numel < need) {
        clh_tensor_release(opt->partials);
        opt->partials = NULL;
        int64_t shape[1] = {(int64_t)need};
        return clh_tensor_new(opt->ctx, 1, shape, &opt->partials);
    }
    return clh_tensor_fill(opt->partials, 0.0f);
}

/* Launch the partial sums of squares of one tensor into slots [slot, slot + SUM_GROUPS). */
static clh_status launch_sum_squares(clh_adamw *opt, const clh_tensor *x, size_t local, int slot) {
    size_t groups = (x->numel + local - 1) / local;
    if (groups > SUM_GROUPS)
        groups = SUM_GROUPS;
    int n = (int)x->numel;
    /* partials is an owned tensor (offset 0): the slot is the kernel's output offset */
    clh_karg args[] = {CLH_KTENSOR(x),
                       CLH_KARG(n),
                       {sizeof(cl_mem), &opt->partials->mem},
                       CLH_KARG(slot),
                       CLH_KLOCAL(local * sizeof(float))};
    size_t global[1] = {groups * local}, local_arr[1] = {local};
    return clh_launch(opt->ctx, "adamw_sum_squares", 1, global, local_arr, 6, args);
}

/* Sum of squares of every gradient, the partials added in double in a fixed order. */
static clh_status grad_sum_squares(clh_adamw *opt, double *total) {
    *total = 0.0;
    if (opt->n_params == 0)
        return CLH_OK;
    size_t local = 0;
    CLH_TRY(sum_local_size(opt->ctx, &local));
    CLH_TRY(prepare_partials(opt));
    for (int i = 0; i < opt->n_params; i++)
        if (opt->params[i]->grad->numel > 0)
            CLH_TRY(launch_sum_squares(opt, opt->params[i]->grad, local, i * SUM_GROUPS));
    size_t count = (size_t)opt->n_params * SUM_GROUPS;
    float *host = malloc(count * sizeof *host);
    if (!host)
        return clh_fail(opt->ctx, CLH_ERR_OUT_OF_MEMORY,
                        "clh_adamw_clip_grad_norm: out of host memory");
    clh_tensor *view = NULL;
    int64_t shape[1] = {(int64_t)count};
    clh_status st = clh_tensor_view(opt->partials, 0, 1, shape, &view);
    if (st == CLH_OK)
        st = clh_tensor_download(view, host, count);
    clh_tensor_release(view);
    for (size_t i = 0; st == CLH_OK && i < count; i++)
        *total += (double)host[i];
    free(host);
    return st;
}

static clh_status scale_grad(clh_adamw *opt, clh_tensor *grad, float alpha) {
    int n = (int)grad->numel;
    clh_karg args[] = {CLH_KTENSOR(grad), CLH_KARG(n), CLH_KARG(alpha)};
    size_t global[1] = {grad->numel};
    return clh_launch(opt->ctx, "adamw_scale_grad", 1, global, NULL, 4, args);
}

clh_status clh_adamw_clip_grad_norm(clh_adamw *opt, float max_norm, double *norm) {
    static const char fn[] = "clh_adamw_clip_grad_norm";
    if (!opt)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "%s: NULL optimizer", fn);
    if (isnan(max_norm))
        return clh_fail(opt->ctx, CLH_ERR_INVALID_ARGUMENT, "%s: max_norm is NaN", fn);
    double sum = 0.0;
    CLH_TRY(grad_sum_squares(opt, &sum));
    double total = sqrt(sum);
    if (norm)
        *norm = total;
    /* A non-finite norm leaves the gradients alone; the caller sees it in *norm. */
    if (!(max_norm > 0.0f) || !isfinite(total))
        return CLH_OK;
    double coef = (double)max_norm / (total + 1e-6);
    if (coef >= 1.0)
        return CLH_OK;
    for (int i = 0; i < opt->n_params; i++)
        CLH_TRY(scale_grad(opt, opt->params[i]->grad, (float)coef));
    return CLH_OK;
}

/* ------------------------------------------------------------------ step */

/* Per-step scalars of one group, derived in double and rounded once. */
typedef struct adamw_scalars {
    float decay, w1, beta2, w2, neg_step, bc2_sqrt, eps;
} adamw_scalars;

static adamw_scalars group_scalars(const clh_adamw_config *c, float lr_scale, long t) {
    double lr = (double)c->lr * (double)lr_scale;
    double bc1 = 1.0 - pow((double)c->beta1, (double)t);
    double bc2 = 1.0 - pow((double)c->beta2, (double)t);
    adamw_scalars s;
    s.decay = (float)(1.0 - lr * (double)c->weight_decay);
    s.w1 = (float)(1.0 - (double)c->beta1);
    s.beta2 = c->beta2;
    s.w2 = (float)(1.0 - (double)c->beta2);
    s.neg_step = (float)(-(lr / bc1));
    s.bc2_sqrt = (float)sqrt(bc2);
    s.eps = c->eps;
    return s;
}

static clh_status launch_update(clh_adamw *opt, clh_adamw_param *p, const adamw_scalars *s) {
    int n = (int)p->param->numel;
    clh_karg args[] = {CLH_KTENSOR(p->param), CLH_KTENSOR(p->grad),  CLH_KTENSOR(p->m),
                       CLH_KTENSOR(p->v),     CLH_KARG(n),           CLH_KARG(s->decay),
                       CLH_KARG(s->w1),       CLH_KARG(s->beta2),    CLH_KARG(s->w2),
                       CLH_KARG(s->neg_step), CLH_KARG(s->bc2_sqrt), CLH_KARG(s->eps)};
    size_t global[1] = {p->param->numel};
    return clh_launch(opt->ctx, "adamw_update", 1, global, NULL, (int)(sizeof args / sizeof *args),
                      args);
}

clh_status clh_adamw_step(clh_adamw *opt, float lr_scale) {
    static const char fn[] = "clh_adamw_step";
    if (!opt)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "%s: NULL optimizer", fn);
    if (!(lr_scale >= 0.0f) || isinf(lr_scale))
        return clh_fail(opt->ctx, CLH_ERR_INVALID_ARGUMENT,
                        "%s: lr_scale %g must be finite and >= 0", fn, (double)lr_scale);
    /* group configs are writable through clh_adamw_group_config: check them again */
    for (int g = 0; g < opt->n_groups; g++)
        CLH_TRY(check_config(opt->ctx, fn, g, opt->groups[g]));
    long t = opt->steps + 1;
    for (int i = 0; i < opt->n_params; i++) {
        clh_adamw_param *p = opt->params[i];
        if (p->param->numel == 0)
            continue;
        adamw_scalars s = group_scalars(opt->groups[p->group], lr_scale, t);
        CLH_TRY(launch_update(opt, p, &s));
    }
    opt->steps = t;
    return CLH_OK;
}

clh_status clh_adamw_zero_grad(clh_adamw *opt) {
    if (!opt)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "clh_adamw_zero_grad: NULL optimizer");
    for (int i = 0; i < opt->n_params; i++)
        CLH_TRY(clh_tensor_fill(opt->params[i]->grad, 0.0f));
    return CLH_OK;
}

/* ------------------------------------------------------------------ state access */

long clh_adamw_steps(const clh_adamw *opt) {
    return opt ? opt->steps : 0;
}

/* For restoring a checkpoint (with m and v uploaded through clh_adamw_param_at);
 * a negative t counts as 0. */
void clh_adamw_set_steps(clh_adamw *opt, long t) {
    if (opt)
        opt->steps = t > 0 ? t : 0;
}

int clh_adamw_num_params(const clh_adamw *opt) {
    return opt ? opt->n_params : 0;
}

clh_adamw_param *clh_adamw_param_at(clh_adamw *opt, int i) {
    if (!opt || i < 0 || i >= opt->n_params)
        return NULL;
    return opt->params[i];
}

/* ------------------------------------------------------------------ schedule */

/* transformers' get_cosine_schedule_with_warmup (half a cosine period): t / warmup
 * during the warm-up, then 0.5 (1 + cos(pi * progress)). From t = total on the
 * multiplier stays 0 (transformers would let the cosine rise again). */
float clh_cosine_schedule(long t, long total, long warmup) {
    if (t < 0)
        return 0.0f;
    if (t < warmup)
        return (float)((double)t / (double)warmup);
    if (t >= total)
        return 0.0f;
    double progress = (double)(t - warmup) / (double)(total - warmup);
    return (float)(0.5 * (1.0 + cos(M_PI * progress)));
}
