/*
 * Aggregator layers of the CAT-Seg head (hclip-spec 5.3 step 4): two Swin blocks per class
 * (spatial), then linear class attention per pooled location (class), forward and backward.
 *
 * Layouts: the cost embedding x is kept channels-last as [N = B*T, S = g*g, h] rows
 * (row (b, t, s)); linear layers and layer norms then work on rows directly, and the Swin
 * window attention takes the token grid in this order. The class attention needs sequences
 * over classes, [B, S', T, h], reached with clh_permute_0213.
 */
#include "cathead_internal.h"

static clh_status swin_forward(clh_ctx *ctx, const clh_cathead_config *cfg, const ch_geom *g,
                               const ch_swin_params *p, ch_swin_tape *t, const clh_tensor *x,
                               const clh_tensor *gnorm, int shift) {
    int64_t rows = g->n * g->tokens, h = cfg->hidden, a = cfg->appearance_proj;
    int64_t wide = h * cfg->mlp_ratio;
    t->x = x;
    CLH_TRY(SLOT(ctx, t->xn, rows, h));
    CLH_TRY(SLOT(ctx, t->cat, rows, h + a));
    CLH_TRY(SLOT(ctx, t->q, rows, h));
    CLH_TRY(SLOT(ctx, t->k, rows, h));
    CLH_TRY(SLOT(ctx, t->v, rows, h));
    CLH_TRY(SLOT(ctx, t->att, rows, h));
    CLH_TRY(SLOT(ctx, t->x1, rows, h));
    CLH_TRY(SLOT(ctx, t->x1n, rows, h));
    CLH_TRY(SLOT(ctx, t->f1, rows, wide));
    CLH_TRY(SLOT(ctx, t->act, rows, wide));
    CLH_TRY(SLOT(ctx, t->y, rows, h));
    CLH_TRY(clh_layer_norm(ctx, x, p->norm1.w, p->norm1.b, CATHEAD_LN_EPS, t->xn));
    CLH_TRY(clh_concat_rows(ctx, t->xn, h, gnorm, a, g->batch, g->classes, g->tokens, t->cat));
    CLH_TRY(clh_linear(ctx, t->cat, p->q.w, p->q.b, t->q));
    CLH_TRY(clh_linear(ctx, t->cat, p->k.w, p->k.b, t->k));
    CLH_TRY(clh_linear(ctx, t->xn, p->v.w, p->v.b, t->v));
    CLH_TRY(clh_window_attention_forward(ctx, RS(t->q, g->n, g->tokens, h),
                                         RS(t->k, g->n, g->tokens, h), RS(t->v, g->n, g->tokens, h),
                                         g->grid, g->grid, g->window, shift, cfg->heads,
                                         RS(t->att, g->n, g->tokens, h)));
    CLH_TRY(clh_linear(ctx, t->att, p->proj.w, p->proj.b, t->x1));
    CLH_TRY(clh_add(ctx, t->x1, x, t->x1));
    CLH_TRY(clh_layer_norm(ctx, t->x1, p->norm2.w, p->norm2.b, CATHEAD_LN_EPS, t->x1n));
    CLH_TRY(clh_linear(ctx, t->x1n, p->fc1.w, p->fc1.b, t->f1));
    CLH_TRY(clh_gelu(ctx, t->f1, t->act));
    CLH_TRY(clh_linear(ctx, t->act, p->fc2.w, p->fc2.b, t->y));
    return clh_add(ctx, t->y, t->x1, t->y);
}

/* d_in = LN-backward(...) + d_res into dst (the residual sum of a pre-norm block). */
static clh_status norm_residual_backward(clh_ctx *ctx, clip_scratch *s, const clh_tensor *x,
                                         ch_pw *norm, const clh_tensor *d_normed,
                                         const clh_tensor *d_res, clh_tensor *dst) {
    clh_tensor *d_ln = NULL;
    CLH_TRY(clip_ws(ctx, s, x->ndim, x->shape, &d_ln));
    CLH_TRY(clh_layer_norm_backward(ctx, x, norm->w, CATHEAD_LN_EPS, d_normed, d_ln, norm->dw,
                                    norm->db));
    return clh_add(ctx, d_ln, d_res, dst);
}

/* Gradient of the input of two linear layers sharing it: dx = dy1 W1 + dy2 W2. */
static clh_status twin_linear_backward(clh_ctx *ctx, clip_scratch *s, const clh_tensor *x,
                                       ch_pw *l1, const clh_tensor *dy1, ch_pw *l2,
                                       const clh_tensor *dy2, clh_tensor *dx) {
    clh_tensor *dx2 = NULL;
    CLH_TRY(clip_ws(ctx, s, x->ndim, x->shape, &dx2));
    CLH_TRY(clh_linear_backward(ctx, x, l1->w, dy1, dx, l1->dw, l1->db));
    CLH_TRY(clh_linear_backward(ctx, x, l2->w, dy2, dx2, l2->dw, l2->db));
    return clh_add(ctx, dx, dx2, dx);
}

/* MLP + residual backward: y = x1 + fc2(act(fc1(norm2(x1)))); dy -> d_x1 (scratch). */
static clh_status mlp_backward(clh_ctx *ctx, clip_scratch *s, ch_pw *norm2, ch_pw *fc1, ch_pw *fc2,
                               const clh_tensor *x1, const clh_tensor *x1n, const clh_tensor *f1,
                               const clh_tensor *act, int gelu, const clh_tensor *dy,
                               clh_tensor **d_x1) {
    clh_tensor *d_act = NULL, *d_f1 = NULL, *d_x1n = NULL;
    CLH_TRY(clip_ws(ctx, s, act->ndim, act->shape, &d_act));
    CLH_TRY(clip_ws(ctx, s, act->ndim, act->shape, &d_f1));
    CLH_TRY(clip_ws(ctx, s, x1n->ndim, x1n->shape, &d_x1n));
    CLH_TRY(clip_ws(ctx, s, x1->ndim, x1->shape, d_x1));
    CLH_TRY(clh_linear_backward(ctx, act, fc2->w, dy, d_act, fc2->dw, fc2->db));
    if (gelu)
        CLH_TRY(clh_gelu_backward(ctx, f1, d_act, d_f1));
    else
        CLH_TRY(clh_relu_backward(ctx, f1, d_act, d_f1));
    CLH_TRY(clh_linear_backward(ctx, x1n, fc1->w, d_f1, d_x1n, fc1->dw, fc1->db));
    return norm_residual_backward(ctx, s, x1, norm2, d_x1n, dy, *d_x1);
}

/* dx: gradient of the block output on entry, of its input on return. dG accumulated. */
static clh_status swin_backward_core(clh_ctx *ctx, clip_scratch *s, const clh_cathead_config *cfg,
                                     const ch_geom *g, ch_swin_params *p, ch_swin_tape *t,
                                     const clh_tensor *gnorm, int shift, clh_tensor *dx,
                                     clh_tensor *dG) {
    int64_t rows = g->n * g->tokens, h = cfg->hidden, a = cfg->appearance_proj;
    clh_tensor *d_x1 = NULL, *d_att, *dq, *dk, *dv, *d_cat, *d_xn, *d_xn_cat, *d_g;
    CLH_TRY(mlp_backward(ctx, s, &p->norm2, &p->fc1, &p->fc2, t->x1, t->x1n, t->f1, t->act, 1, dx,
                         &d_x1));
    CLH_TRY(SCR(ctx, s, d_att, rows, h));
    CLH_TRY(SCR(ctx, s, dq, rows, h));
    CLH_TRY(SCR(ctx, s, dk, rows, h));
    CLH_TRY(SCR(ctx, s, dv, rows, h));
    CLH_TRY(SCR(ctx, s, d_cat, rows, h + a));
    CLH_TRY(SCR(ctx, s, d_xn, rows, h));
    CLH_TRY(SCR(ctx, s, d_xn_cat, rows, h));
    CLH_TRY(SCR(ctx, s, d_g, (int64_t)g->batch * g->tokens, a));
    CLH_TRY(clh_linear_backward(ctx, t->att, p->proj.w, d_x1, d_att, p->proj.dw, p->proj.db));
    CLH_TRY(clh_window_attention_backward(
        ctx, RS(t->q, g->n, g->tokens, h), RS(t->k, g->n, g->tokens, h),
        RS(t->v, g->n, g->tokens, h), g->grid, g->grid, g->window, shift, cfg->heads,
        RS(d_att, g->n, g->tokens, h), RS(dq, g->n, g->tokens, h), RS(dk, g->n, g->tokens, h),
        RS(dv, g->n, g->tokens, h)));
    CLH_TRY(twin_linear_backward(ctx, s, t->cat, &p->q, dq, &p->k, dk, d_cat));
    CLH_TRY(clh_linear_backward(ctx, t->xn, p->v.w, dv, d_xn, p->v.dw, p->v.db));
    CLH_TRY(
        clh_concat_rows_backward(ctx, d_cat, h, a, g->batch, g->classes, g->tokens, d_xn_cat, d_g));
    CLH_TRY(clh_add(ctx, d_xn, d_xn_cat, d_xn));
    CLH_TRY(clh_add(ctx, dG, d_g, dG));
    return norm_residual_backward(ctx, s, t->x, &p->norm1, d_xn, d_x1, dx);
}

static clh_status swin_backward(clh_ctx *ctx, const clh_cathead_config *cfg, const ch_geom *g,
                                ch_swin_params *p, ch_swin_tape *t, const clh_tensor *gnorm,
                                int shift, clh_tensor *dx, clh_tensor *dG) {
    size_t mark = clh_ws_mark(ctx);
    clip_scratch s = {.n = 0};
    clh_status st = swin_backward_core(ctx, &s, cfg, g, p, t, gnorm, shift, dx, dG);
    clip_release_all(&s);
    clh_ws_reset(ctx, mark);
    return st;
}

/* ------------------------------------------------------------------ class attention */

/* Host index of n zeros (the pad rows all copy row 0 of a one-row table). */
static clh_status zeros_index(clh_ctx *ctx, int n, int32_t **out) {
    *out = calloc((size_t)(n > 0 ? n : 1), sizeof **out);
    if (!*out)
        return clh_fail(ctx, CLH_ERR_OUT_OF_MEMORY, "cathead: out of host memory");
    return CLH_OK;
}

/* x_sp [N*S, h] -> sequences over classes seq [B*S'*T, h] (pooled when pool > 1). */
static clh_status cls_gather(clh_ctx *ctx, const clh_cathead_config *cfg, const ch_geom *g,
                             ch_cls_tape *t, const clh_tensor *x) {
    int64_t h = cfg->hidden;
    const clh_tensor *src = x;
    if (g->pool > 1) {
        CLH_TRY(SLOT(ctx, t->planes, g->n, h, g->grid, g->grid));
        CLH_TRY(SLOT(ctx, t->pooled, g->n, h, g->pgrid, g->pgrid));
        CLH_TRY(SLOT(ctx, t->ptok, g->n * g->ptokens, h));
        CLH_TRY(clh_permute_0213(ctx, x, g->n, g->tokens, h, 1, t->planes));
        CLH_TRY(clh_avg_pool2d_forward(ctx, t->planes, g->pool, t->pooled));
        CLH_TRY(clh_permute_0213(ctx, t->pooled, g->n, h, g->ptokens, 1, t->ptok));
        src = t->ptok;
    }
    CLH_TRY(SLOT(ctx, t->seq, (int64_t)g->batch * g->ptokens * g->classes, h));
    return clh_permute_0213(ctx, src, g->batch, g->classes, g->ptokens, h, t->seq);
}

/* Pad the class sequences and the text guidance to the attention length. */
static clh_status cls_pad(clh_ctx *ctx, const clh_cathead_config *cfg, const ch_geom *g,
                          const ch_cls_params *p, ch_cls_tape *t, const clh_tensor *tg,
                          const clh_tensor **xp, const clh_tensor **tgp) {
    int64_t h = cfg->hidden, tp = cfg->text_proj, extra = g->seq - g->classes;
    *xp = t->seq;
    *tgp = tg;
    if (extra == 0)
        return CLH_OK;
    int32_t *zeros = NULL;
    CLH_TRY(zeros_index(ctx, (int)extra, &zeros));
    clh_status st = SLOT(ctx, t->padrows, extra, h);
    if (st == CLH_OK)
        st = SLOT(ctx, t->padgrows, extra, tp);
    if (st == CLH_OK)
        st = clh_gather_rows(ctx, RS(p->pad, 1, h), zeros, (size_t)extra, t->padrows);
    if (st == CLH_OK)
        st = clh_gather_rows(ctx, RS(p->padg, 1, tp), zeros, (size_t)extra, t->padgrows);
    free(zeros);
    CLH_TRY(st);
    CLH_TRY(SLOT(ctx, t->xp, (int64_t)g->batch * g->ptokens * g->seq, h));
    CLH_TRY(SLOT(ctx, t->tgp, (int64_t)g->batch * g->seq, tp));
    CLH_TRY(clh_concat_rows(ctx, t->seq, g->classes * h, t->padrows, extra * h, 1,
                            (int64_t)g->batch * g->ptokens, 1, t->xp));
    CLH_TRY(
        clh_concat_rows(ctx, tg, g->classes * tp, t->padgrows, extra * tp, 1, g->batch, 1, t->tgp));
    *xp = t->xp;
    *tgp = t->tgp;
    return CLH_OK;
}

/* The attention and MLP on padded sequences xp [B*S'*L, h] -> t->xp2. */
static clh_status cls_attend(clh_ctx *ctx, const clh_cathead_config *cfg, const ch_geom *g,
                             const ch_cls_params *p, ch_cls_tape *t, const clh_tensor *xp,
                             const clh_tensor *tgp) {
    int64_t h = cfg->hidden, tp = cfg->text_proj, wide = h * cfg->mlp_ratio;
    int64_t nseq = (int64_t)g->batch * g->ptokens, rows = nseq * g->seq;
    CLH_TRY(SLOT(ctx, t->u, rows, h));
    CLH_TRY(SLOT(ctx, t->cat, rows, h + tp));
    CLH_TRY(SLOT(ctx, t->q, rows, h));
    CLH_TRY(SLOT(ctx, t->k, rows, h));
    CLH_TRY(SLOT(ctx, t->v, rows, h));
    CLH_TRY(SLOT(ctx, t->la, rows, h));
    CLH_TRY(SLOT(ctx, t->xp1, rows, h));
    CLH_TRY(SLOT(ctx, t->u2, rows, h));
    CLH_TRY(SLOT(ctx, t->f1, rows, wide));
    CLH_TRY(SLOT(ctx, t->act, rows, wide));
    CLH_TRY(SLOT(ctx, t->xp2, rows, h));
    CLH_TRY(clh_layer_norm(ctx, xp, p->norm1.w, p->norm1.b, CATHEAD_LN_EPS, t->u));
    CLH_TRY(clh_concat_rows(ctx, t->u, h, tgp, tp, g->batch, g->ptokens, g->seq, t->cat));
    CLH_TRY(clh_linear(ctx, t->cat, p->q.w, p->q.b, t->q));
    CLH_TRY(clh_linear(ctx, t->cat, p->k.w, p->k.b, t->k));
    CLH_TRY(clh_linear(ctx, t->u, p->v.w, p->v.b, t->v));
    CLH_TRY(clh_linear_attention_forward(ctx, RS(t->q, nseq, g->seq, h), RS(t->k, nseq, g->seq, h),
                                         RS(t->v, nseq, g->seq, h), cfg->heads, CATHEAD_LA_EPS,
                                         RS(t->la, nseq, g->seq, h)));
    CLH_TRY(clh_add(ctx, xp, t->la, t->xp1));
    CLH_TRY(clh_layer_norm(ctx, t->xp1, p->norm2.w, p->norm2.b, CATHEAD_LN_EPS, t->u2));
    CLH_TRY(clh_linear(ctx, t->u2, p->fc1.w, p->fc1.b, t->f1));
    CLH_TRY(clh_relu_forward(ctx, t->f1, t->act));
    CLH_TRY(clh_linear(ctx, t->act, p->fc2.w, p->fc2.b, t->xp2));
    return clh_add(ctx, t->xp2, t->xp1, t->xp2);
}

/* Drop the pad positions, back to [N*S', h], upsample to the grid, out = x + that. */
static clh_status cls_scatter(clh_ctx *ctx, const clh_cathead_config *cfg, const ch_geom *g,
                              ch_cls_tape *t, const clh_tensor *x, clh_tensor *out) {
    int64_t h = cfg->hidden, nseq = (int64_t)g->batch * g->ptokens;
    const clh_tensor *xd = t->xp2;
    if (g->seq > g->classes) {
        CLH_TRY(SLOT(ctx, t->xd, nseq * g->classes, h));
        CLH_TRY(clh_concat_rows_backward(ctx, t->xp2, g->classes * h,
                                         (int64_t)(g->seq - g->classes) * h, 1, nseq, 1, t->xd,
                                         NULL));
        xd = t->xd;
    }
    CLH_TRY(SLOT(ctx, t->back, g->n * g->ptokens, h));
    CLH_TRY(clh_permute_0213(ctx, xd, g->batch, g->ptokens, g->classes, h, t->back));
    if (g->pool == 1)
        return clh_add(ctx, x, t->back, out);
    CLH_TRY(SLOT(ctx, t->planes2, g->n, h, g->pgrid, g->pgrid));
    CLH_TRY(SLOT(ctx, t->up, g->n, h, g->grid, g->grid));
    CLH_TRY(SLOT(ctx, t->uptok, g->n * g->tokens, h));
    CLH_TRY(clh_permute_0213(ctx, t->back, g->n, g->ptokens, h, 1, t->planes2));
    CLH_TRY(clh_bilinear_resize_forward(ctx, t->planes2, 1, t->up));
    CLH_TRY(clh_permute_0213(ctx, t->up, g->n, h, g->tokens, 1, t->uptok));
    return clh_add(ctx, x, t->uptok, out);
}

static clh_status cls_forward(clh_ctx *ctx, const clh_cathead_config *cfg, const ch_geom *g,
                              const ch_cls_params *p, ch_cls_tape *t, const clh_tensor *x,
                              const clh_tensor *tg, clh_tensor *out) {
    const clh_tensor *xp, *tgp;
    CLH_TRY(cls_gather(ctx, cfg, g, t, x));
    CLH_TRY(cls_pad(ctx, cfg, g, p, t, tg, &xp, &tgp));
    CLH_TRY(cls_attend(ctx, cfg, g, p, t, xp, tgp));
    return cls_scatter(ctx, cfg, g, t, x, out);
}

/* d out [N*S, h] -> d of the padded sequence output xp2 (scratch). */
static clh_status cls_scatter_backward(clh_ctx *ctx, clip_scratch *s, const clh_cathead_config *cfg,
                                       const ch_geom *g, const clh_tensor *dout,
                                       clh_tensor **d_xp2) {
    int64_t h = cfg->hidden, nseq = (int64_t)g->batch * g->ptokens, extra = g->seq - g->classes;
    const clh_tensor *d_back = dout;
    if (g->pool > 1) {
        clh_tensor *d_up, *d_planes2, *d_b;
        CLH_TRY(SCR(ctx, s, d_up, g->n, h, g->grid, g->grid));
        CLH_TRY(SCR(ctx, s, d_planes2, g->n, h, g->pgrid, g->pgrid));
        CLH_TRY(SCR(ctx, s, d_b, g->n * g->ptokens, h));
        CLH_TRY(clh_permute_0213(ctx, dout, g->n, g->tokens, h, 1, d_up));
        CLH_TRY(clh_bilinear_resize_backward(ctx, d_up, 1, d_planes2));
        CLH_TRY(clh_permute_0213(ctx, d_planes2, g->n, h, g->ptokens, 1, d_b));
        d_back = d_b;
    }
    clh_tensor *d_xd;
    CLH_TRY(SCR(ctx, s, d_xd, nseq * g->classes, h));
    CLH_TRY(clh_permute_0213(ctx, d_back, g->batch, g->classes, g->ptokens, h, d_xd));
    if (extra == 0) {
        *d_xp2 = d_xd;
        return CLH_OK;
    }
    clh_tensor *zeros;
    CLH_TRY(SCR(ctx, s, zeros, extra, h));
    CLH_TRY(clh_tensor_fill(zeros, 0.0f));
    CLH_TRY(SCR(ctx, s, *d_xp2, nseq * g->seq, h));
    return clh_concat_rows(ctx, d_xd, g->classes * h, zeros, extra * h, 1, nseq, 1, *d_xp2);
}

/* d of the padded input xp -> d of the unpadded sequences (scratch) and the pad gradients;
 * the same for the text guidance (d_tg accumulated). */
static clh_status cls_pad_backward(clh_ctx *ctx, clip_scratch *s, const clh_cathead_config *cfg,
                                   const ch_geom *g, ch_cls_params *p, const clh_tensor *d_xp,
                                   const clh_tensor *d_tgp, clh_tensor *d_tg,
                                   const clh_tensor **d_seq) {
    int64_t h = cfg->hidden, tp = cfg->text_proj, nseq = (int64_t)g->batch * g->ptokens;
    int64_t extra = g->seq - g->classes;
    if (extra == 0) {
        *d_seq = d_xp;
        return clh_add(ctx, d_tg, d_tgp, d_tg);
    }
    clh_tensor *ds, *d_rows, *d_tgpart, *d_grows;
    CLH_TRY(SCR(ctx, s, ds, nseq * g->classes, h));
    CLH_TRY(SCR(ctx, s, d_rows, extra, h));
    CLH_TRY(SCR(ctx, s, d_tgpart, (int64_t)g->batch * g->classes, tp));
    CLH_TRY(SCR(ctx, s, d_grows, extra, tp));
    CLH_TRY(clh_concat_rows_backward(ctx, d_xp, g->classes * h, extra * h, 1, nseq, 1, ds, d_rows));
    CLH_TRY(clh_concat_rows_backward(ctx, d_tgp, g->classes * tp, extra * tp, 1, g->batch, 1,
                                     d_tgpart, d_grows));
    CLH_TRY(clh_add(ctx, d_tg, d_tgpart, d_tg));
    int32_t *zeros = NULL;
    CLH_TRY(zeros_index(ctx, (int)extra, &zeros));
    clh_status st = clh_scatter_add_rows(ctx, d_rows, zeros, (size_t)extra, RS(p->dpad, 1, h));
    if (st == CLH_OK)
        st = clh_scatter_add_rows(ctx, d_grows, zeros, (size_t)extra, RS(p->dpadg, 1, tp));
    free(zeros);
    *d_seq = ds;
    return st;
}

/* Attention + MLP backward: d_xp2 -> d_xp (scratch), d_tgp (scratch). */
static clh_status cls_attend_backward(clh_ctx *ctx, clip_scratch *s, const clh_cathead_config *cfg,
                                      const ch_geom *g, ch_cls_params *p, ch_cls_tape *t,
                                      const clh_tensor *xp, const clh_tensor *d_xp2,
                                      clh_tensor **d_xp, clh_tensor **d_tgp) {
    int64_t h = cfg->hidden, tp = cfg->text_proj, nseq = (int64_t)g->batch * g->ptokens;
    int64_t rows = nseq * g->seq;
    clh_tensor *d_xp1 = NULL, *dq, *dk, *dv, *d_cat, *d_u, *d_u_cat;
    CLH_TRY(mlp_backward(ctx, s, &p->norm2, &p->fc1, &p->fc2, t->xp1, t->u2, t->f1, t->act, 0,
                         d_xp2, &d_xp1));
    CLH_TRY(SCR(ctx, s, dq, rows, h));
    CLH_TRY(SCR(ctx, s, dk, rows, h));
    CLH_TRY(SCR(ctx, s, dv, rows, h));
    CLH_TRY(SCR(ctx, s, d_cat, rows, h + tp));
    CLH_TRY(SCR(ctx, s, d_u, rows, h));
    CLH_TRY(SCR(ctx, s, d_u_cat, rows, h));
    CLH_TRY(SCR(ctx, s, *d_tgp, (int64_t)g->batch * g->seq, tp));
    CLH_TRY(SCR(ctx, s, *d_xp, rows, h));
    CLH_TRY(clh_linear_attention_backward(ctx, RS(t->q, nseq, g->seq, h), RS(t->k, nseq, g->seq, h),
                                          RS(t->v, nseq, g->seq, h), cfg->heads, CATHEAD_LA_EPS,
                                          RS(d_xp1, nseq, g->seq, h), RS(dq, nseq, g->seq, h),
                                          RS(dk, nseq, g->seq, h), RS(dv, nseq, g->seq, h)));
    CLH_TRY(twin_linear_backward(ctx, s, t->cat, &p->q, dq, &p->k, dk, d_cat));
    CLH_TRY(clh_linear_backward(ctx, t->u, p->v.w, dv, d_u, p->v.dw, p->v.db));
    CLH_TRY(
        clh_concat_rows_backward(ctx, d_cat, h, tp, g->batch, g->ptokens, g->seq, d_u_cat, *d_tgp));
    CLH_TRY(clh_add(ctx, d_u, d_u_cat, d_u));
    return norm_residual_backward(ctx, s, xp, &p->norm1, d_u, d_xp1, *d_xp);
}

/* d_seq [B*S'*T, h] -> added to dx [N*S, h] (through the pooling when pool > 1). */
static clh_status cls_gather_backward(clh_ctx *ctx, clip_scratch *s, const clh_cathead_config *cfg,
                                      const ch_geom *g, const clh_tensor *d_seq, clh_tensor *dx) {
    int64_t h = cfg->hidden;
    clh_tensor *d_src;
    CLH_TRY(SCR(ctx, s, d_src, g->n * g->ptokens, h));
    CLH_TRY(clh_permute_0213(ctx, d_seq, g->batch, g->ptokens, g->classes, h, d_src));
    if (g->pool == 1)
        return clh_add(ctx, dx, d_src, dx);
    clh_tensor *d_pooled, *d_planes, *d_tok;
    CLH_TRY(SCR(ctx, s, d_pooled, g->n, h, g->pgrid, g->pgrid));
    CLH_TRY(SCR(ctx, s, d_planes, g->n, h, g->grid, g->grid));
    CLH_TRY(SCR(ctx, s, d_tok, g->n * g->tokens, h));
    CLH_TRY(clh_permute_0213(ctx, d_src, g->n, g->ptokens, h, 1, d_pooled));
    CLH_TRY(clh_avg_pool2d_backward(ctx, d_pooled, g->pool, d_planes));
    CLH_TRY(clh_permute_0213(ctx, d_planes, g->n, h, g->tokens, 1, d_tok));
    return clh_add(ctx, dx, d_tok, dx);
}

static clh_status cls_backward_core(clh_ctx *ctx, clip_scratch *s, const clh_cathead_config *cfg,
                                    const ch_geom *g, ch_cls_params *p, ch_cls_tape *t,
                                    clh_tensor *dx, clh_tensor *d_tg) {
    clh_tensor *d_xp2 = NULL, *d_xp = NULL, *d_tgp = NULL;
    const clh_tensor *d_seq = NULL;
    const clh_tensor *xp = g->seq > g->classes ? t->xp : t->seq;
    CLH_TRY(cls_scatter_backward(ctx, s, cfg, g, dx, &d_xp2));
    CLH_TRY(cls_attend_backward(ctx, s, cfg, g, p, t, xp, d_xp2, &d_xp, &d_tgp));
    CLH_TRY(cls_pad_backward(ctx, s, cfg, g, p, d_xp, d_tgp, d_tg, &d_seq));
    return cls_gather_backward(ctx, s, cfg, g, d_seq, dx);
}

/* ------------------------------------------------------------------ layer */

void ch_swin_tape_drop(ch_swin_tape *s) {
    clh_tensor **owned[] = {&s->xn,  &s->cat, &s->q,   &s->k,  &s->v,
                            &s->att, &s->x1,  &s->x1n, &s->f1, &s->act};
    for (size_t i = 0; i < sizeof owned / sizeof *owned; i++) {
        ch_discard(*owned[i]);
        *owned[i] = NULL;
    }
}

static void swin_tape_free(ch_swin_tape *s) {
    ch_swin_tape_drop(s);
    ch_discard(s->y);
    s->y = NULL;
}

clh_status ch_layer_forward(clh_ctx *ctx, const clh_cathead_config *cfg, const ch_geom *g,
                            const ch_layer_params *p, ch_layer_tape *t, const clh_tensor *x,
                            const clh_tensor *app, const clh_tensor *tg, int lean) {
    CLH_TRY(SLOT(ctx, t->gnorm, (int64_t)g->batch * g->tokens, cfg->appearance_proj));
    CLH_TRY(SLOT(ctx, t->out, g->n * g->tokens, cfg->hidden));
    CLH_TRY(
        clh_layer_norm(ctx, app, p->guidance_norm.w, p->guidance_norm.b, CATHEAD_LN_EPS, t->gnorm));
    CLH_TRY(swin_forward(ctx, cfg, g, &p->spatial[0], &t->spatial[0], x, t->gnorm, 0));
    if (lean)
        ch_swin_tape_drop(&t->spatial[0]);
    CLH_TRY(swin_forward(ctx, cfg, g, &p->spatial[1], &t->spatial[1], t->spatial[0].y, t->gnorm,
                         g->shift));
    if (lean) {
        swin_tape_free(&t->spatial[0]);
        ch_swin_tape_drop(&t->spatial[1]);
    }
    clh_status st = cls_forward(ctx, cfg, g, &p->cls, &t->cls, t->spatial[1].y, tg, t->out);
    if (lean) {
        swin_tape_free(&t->spatial[1]);
        ch_release_slots((clh_tensor **)&t->cls, sizeof t->cls / sizeof(clh_tensor *));
    }
    return st;
}

static clh_status layer_backward_core(clh_ctx *ctx, clip_scratch *s, const clh_cathead_config *cfg,
                                      const ch_geom *g, ch_layer_params *p, ch_layer_tape *t,
                                      const clh_tensor *app, clh_tensor *dx, clh_tensor *d_app,
                                      clh_tensor *d_tg) {
    clh_tensor *dG, *d_app_part;
    CLH_TRY(SCR(ctx, s, dG, (int64_t)g->batch * g->tokens, cfg->appearance_proj));
    CLH_TRY(SCR(ctx, s, d_app_part, (int64_t)g->batch * g->tokens, cfg->appearance_proj));
    CLH_TRY(clh_tensor_fill(dG, 0.0f));
    size_t mark = clh_ws_mark(ctx);
    clip_scratch inner = {.n = 0};
    clh_status st = cls_backward_core(ctx, &inner, cfg, g, &p->cls, &t->cls, dx, d_tg);
    clip_release_all(&inner);
    clh_ws_reset(ctx, mark);
    CLH_TRY(st);
    CLH_TRY(swin_backward(ctx, cfg, g, &p->spatial[1], &t->spatial[1], t->gnorm, g->shift, dx, dG));
    CLH_TRY(swin_backward(ctx, cfg, g, &p->spatial[0], &t->spatial[0], t->gnorm, 0, dx, dG));
    CLH_TRY(clh_layer_norm_backward(ctx, app, p->guidance_norm.w, CATHEAD_LN_EPS, dG, d_app_part,
                                    p->guidance_norm.dw, p->guidance_norm.db));
    return clh_add(ctx, d_app, d_app_part, d_app);
}

clh_status ch_layer_backward(clh_ctx *ctx, const clh_cathead_config *cfg, const ch_geom *g,
                             ch_layer_params *p, ch_layer_tape *tape, const clh_tensor *app,
                             const clh_tensor *tg, clh_tensor *dx, clh_tensor *d_app,
                             clh_tensor *d_tg) {
    (void)tg;
    size_t mark = clh_ws_mark(ctx);
    clip_scratch s = {.n = 0};
    clh_status st = layer_backward_core(ctx, &s, cfg, g, p, tape, app, dx, d_app, d_tg);
    clip_release_all(&s);
    clh_ws_reset(ctx, mark);
    return st;
}

void ch_layer_tape_free(ch_layer_tape *t) {
    for (int j = 0; j < 2; j++)
        swin_tape_free(&t->spatial[j]);
    ch_release_slots((clh_tensor **)&t->cls, sizeof t->cls / sizeof(clh_tensor *));
    ch_discard(t->gnorm);
    ch_discard(t->out);
    memset(t, 0, sizeof *t);
}
