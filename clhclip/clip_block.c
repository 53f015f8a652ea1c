/* Transformer blocks of both CLIP towers, forward and backward, with optional H-CLIP
 * block-diagonal transforms (hclip-spec 3.2: q/k/v on the input side, out-proj on the
 * output side) and optional saving of the activations the backward needs.
 *
 * Forward of one pre-LN block (x is the residual stream [N, T, D], updated in place):
 *   h1 = LN1(x);  xt_i = h1 · BD_i^T (i = q, k, v; xt_i = h1 without adapters)
 *   q, k, v = xt_i W_i^T + b_i;  att = attention(q, k, v)
 *   yt = att W_o^T;  o = yt · BD_o^T + b_o;  x_mid = x + o
 *   h2 = LN2(x_mid);  m = h2 W_fc1^T + b_fc1;  x_out = x_mid + act(m) W_fc2^T + b_fc2 */
#include <stdlib.h>
#include <string.h>

#include "clip_internal.h"
#include "hclip.h"

/* ------------------------------------------------------------------ scratch */

clh_status clip_keep(clh_ctx *ctx, clip_scratch *s, clh_tensor *t) {
    if (s->n == (int)(sizeof s->t / sizeof *s->t)) {
        clh_tensor_release(t);
        return clh_fail(ctx, CLH_ERR_OUT_OF_MEMORY, "CLIP: scratch list full");
    }
    s->t[s->n++] = t;
    return CLH_OK;
}

void clip_release_all(clip_scratch *s) {
    for (int i = 0; i < s->n; i++)
        clh_tensor_release(s->t[i]);
    s->n = 0;
}

clh_status clip_ws(clh_ctx *ctx, clip_scratch *s, int ndim, const int64_t *shape,
                   clh_tensor **out) {
    CLH_TRY(clh_ws_tensor(ctx, ndim, shape, out));
    return s ? clip_keep(ctx, s, *out) : CLH_OK;
}

clh_status clip_ws2(clh_ctx *ctx, clip_scratch *s, int64_t a, int64_t b, clh_tensor **out) {
    int64_t shape[2] = {a, b};
    return clip_ws(ctx, s, 2, shape, out);
}

clh_status clip_ws3(clh_ctx *ctx, clip_scratch *s, int64_t a, int64_t b, int64_t c,
                    clh_tensor **out) {
    int64_t shape[3] = {a, b, c};
    return clip_ws(ctx, s, 3, shape, out);
}

clh_status clip_as2(clh_ctx *ctx, clip_scratch *s, const clh_tensor *t, clh_tensor **out) {
    int64_t last = clh_tensor_dim(t, -1);
    int64_t shape[2] = {(int64_t)clh_tensor_numel(t) / last, last};
    CLH_TRY(clh_tensor_view((clh_tensor *)t, 0, 2, shape, out));
    return clip_keep(ctx, s, *out);
}

static clh_status activate(clh_ctx *ctx, clh_activation act, const clh_tensor *x, clh_tensor *y) {
    return act == CLH_ACT_GELU ? clh_gelu(ctx, x, y) : clh_quick_gelu(ctx, x, y);
}

static clh_status activate_backward(clh_ctx *ctx, clh_activation act, const clh_tensor *x,
                                    const clh_tensor *dy, clh_tensor *dx) {
    return act == CLH_ACT_GELU ? clh_gelu_backward(ctx, x, dy, dx)
                               : clh_quick_gelu_backward(ctx, x, dy, dx);
}

void clip_block_acts_release(clip_block_acts *a) {
    clh_tensor *all[] = {a->x_in,   a->h1,  a->xt[0], a->xt[1], a->xt[2], a->qkv[0], a->qkv[1],
                         a->qkv[2], a->att, a->yt,    a->x_mid, a->h2,    a->m_pre};
    for (size_t i = 0; i < sizeof all / sizeof *all; i++)
        clh_tensor_release(all[i]);
    memset(a, 0, sizeof *a);
}

/* Allocate every activation the block produces up front: with saving on they sit on the
 * workspace stack below the block's temporaries, which can then be dropped at its end. */
static clh_status alloc_acts(clh_ctx *ctx, clip_scratch *s, const clh_clip_tower_config *t,
                             const clip_adapter *ad, int64_t n, int64_t len, clip_block_acts *a) {
    clip_scratch *owner = a->keep ? NULL : s;
    int64_t rd[2] = {n * len, t->hidden}, rf[2] = {n * len, t->intermediate};
    int64_t nld[3] = {n, len, t->hidden};
    if (a->keep) {
        CLH_TRY(clip_ws(ctx, owner, 3, nld, &a->x_in));
        CLH_TRY(clip_ws(ctx, owner, 2, rd, &a->x_mid));
    }
    CLH_TRY(clip_ws(ctx, owner, 2, rd, &a->h1));
    for (int i = 0; i < 3; i++) {
        if (ad && ad->r[i])
            CLH_TRY(clip_ws(ctx, owner, 2, rd, &a->xt[i]));
        CLH_TRY(clip_ws(ctx, owner, 3, nld, &a->qkv[i]));
    }
    CLH_TRY(clip_ws(ctx, owner, 3, nld, &a->att));
    if (ad && ad->r[3])
        CLH_TRY(clip_ws(ctx, owner, 2, rd, &a->yt));
    CLH_TRY(clip_ws(ctx, owner, 2, rd, &a->h2));
    return clip_ws(ctx, owner, 2, rf, &a->m_pre);
}

/* ------------------------------------------------------------------ forward */

/* x2 [R, D] += fc2(act(fc1(LN2(x2)))) */
static clh_status mlp_forward(clh_ctx *ctx, clip_scratch *s, const clip_layer *L,
                              const clh_clip_tower_config *t, clh_tensor *x2, clip_block_acts *a) {
    int64_t rows = clh_tensor_dim(x2, 0);
    clh_tensor *g, *o;
    CLH_TRY(clip_ws2(ctx, s, rows, t->intermediate, &g));
    CLH_TRY(clip_ws2(ctx, s, rows, t->hidden, &o));
    CLH_TRY(clh_layer_norm(ctx, x2, L->ln2_w, L->ln2_b, t->eps, a->h2));
    CLH_TRY(clh_linear(ctx, a->h2, L->fc1_w, L->fc1_b, a->m_pre));
    CLH_TRY(activate(ctx, t->act, a->m_pre, g));
    CLH_TRY(clh_linear(ctx, g, L->fc2_w, L->fc2_b, o));
    return clh_add(ctx, x2, o, x2);
}

/* o2 [R, D] = att2 W_o^T (· BD_o^T) + b_o */
static clh_status out_projection(clh_ctx *ctx, const clip_layer *L, const clip_adapter *ad,
                                 const clh_tensor *att2, clip_block_acts *a, clh_tensor *o2) {
    if (!ad || !ad->r[3])
        return clh_linear(ctx, att2, L->w[3], L->b[3], o2);
    CLH_TRY(clh_linear(ctx, att2, L->w[3], NULL, a->yt));
    CLH_TRY(clh_blockdiag_forward(ctx, a->yt, ad->r[3], o2));
    return clh_add_bias(ctx, o2, L->b[3]);
}

static clh_status attention_forward(clh_ctx *ctx, clip_scratch *s, const clip_layer *L,
                                    const clh_clip_tower_config *t, const clip_adapter *ad,
                                    clh_tensor *x2, int causal, clip_block_acts *a) {
    clh_tensor *q2, *att2, *o;
    CLH_TRY(clh_layer_norm(ctx, x2, L->ln1_w, L->ln1_b, t->eps, a->h1));
    for (int i = 0; i < 3; i++) {
        const clh_tensor *in = a->h1;
        if (ad && ad->r[i]) {
            CLH_TRY(clh_blockdiag_forward(ctx, a->h1, ad->r[i], a->xt[i]));
            in = a->xt[i];
        }
        CLH_TRY(clip_as2(ctx, s, a->qkv[i], &q2));
        CLH_TRY(clh_linear(ctx, in, L->w[i], L->b[i], q2));
    }
    CLH_TRY(clh_attention(ctx, a->qkv[0], a->qkv[1], a->qkv[2], t->heads, causal, a->att));
    CLH_TRY(clip_as2(ctx, s, a->att, &att2));
    CLH_TRY(clip_ws2(ctx, s, clh_tensor_dim(x2, 0), t->hidden, &o));
    CLH_TRY(out_projection(ctx, L, ad, att2, a, o));
    return clh_add(ctx, x2, o, x2);
}

static clh_status block_forward_body(clh_ctx *ctx, clip_scratch *s, const clip_layer *L,
                                     const clh_clip_tower_config *t, const clip_adapter *ad,
                                     clh_tensor *x, int causal, clip_block_acts *a) {
    clh_tensor *x2;
    CLH_TRY(clip_as2(ctx, s, x, &x2));
    if (a->keep)
        CLH_TRY(clh_tensor_copy(a->x_in, x));
    CLH_TRY(attention_forward(ctx, s, L, t, ad, x2, causal, a));
    if (a->keep)
        CLH_TRY(clh_tensor_copy(a->x_mid, x2));
    return mlp_forward(ctx, s, L, t, x2, a);
}

/* ------------------------------------------------------------------ backward */

/* dx2 [R, D]: in d(MLP output stream), out d(MLP input stream x_mid). */
static clh_status mlp_backward(clh_ctx *ctx, clip_scratch *s, const clip_layer *L,
                               const clh_clip_tower_config *t, const clip_block_acts *a,
                               clh_tensor *dx2) {
    int64_t rows = clh_tensor_dim(dx2, 0);
    clh_tensor *dg, *dh2, *dxm;
    CLH_TRY(clip_ws2(ctx, s, rows, t->intermediate, &dg));
    CLH_TRY(clip_ws2(ctx, s, rows, t->hidden, &dh2));
    CLH_TRY(clip_ws2(ctx, s, rows, t->hidden, &dxm));
    /* fc2's input only matters for its weight gradient, which frozen weights skip */
    CLH_TRY(clh_linear_backward(ctx, a->m_pre, L->fc2_w, dx2, dg, NULL, NULL));
    CLH_TRY(activate_backward(ctx, t->act, a->m_pre, dg, dg));
    CLH_TRY(clh_linear_backward(ctx, a->h2, L->fc1_w, dg, dh2, NULL, NULL));
    CLH_TRY(clh_layer_norm_backward(ctx, a->x_mid, L->ln2_w, t->eps, dh2, dxm, NULL, NULL));
    return clh_axpy(ctx, 1.0f, dxm, dx2);
}

/* d(out-proj output) do2 -> d(attention output) datt2. */
static clh_status out_projection_backward(clh_ctx *ctx, clip_scratch *s, const clip_layer *L,
                                          const clip_adapter *ad, const clip_block_acts *a,
                                          const clh_tensor *att2, const clh_tensor *do2,
                                          clh_tensor *datt2, clh_tensor *const *dblocks) {
    const clh_tensor *dyt = do2;
    if (ad && ad->r[3]) {
        clh_tensor *t;
        CLH_TRY(clip_ws2(ctx, s, clh_tensor_dim(do2, 0), clh_tensor_dim(do2, 1), &t));
        CLH_TRY(clh_blockdiag_backward(ctx, a->yt, ad->r[3], do2, t, dblocks ? dblocks[3] : NULL));
        dyt = t;
    }
    return clh_linear_backward(ctx, att2, L->w[3], dyt, datt2, NULL, NULL);
}

/* d(projection input) for input i (q, k, v) accumulated into dh1 (first: overwrite). */
static clh_status input_transform_backward(clh_ctx *ctx, clip_scratch *s, const clip_layer *L,
                                           const clip_adapter *ad, const clip_block_acts *a, int i,
                                           const clh_tensor *dout2, clh_tensor *dh1, int first,
                                           clh_tensor *const *dblocks) {
    int64_t rows = clh_tensor_dim(dh1, 0), d = clh_tensor_dim(dh1, 1);
    int adapted = ad && ad->r[i];
    clh_tensor *dxt, *dh;
    CLH_TRY(clip_ws2(ctx, s, rows, d, &dxt));
    CLH_TRY(clh_linear_backward(ctx, adapted ? a->xt[i] : a->h1, L->w[i], dout2, dxt, NULL, NULL));
    dh = dxt;
    if (adapted) {
        CLH_TRY(clip_ws2(ctx, s, rows, d, &dh));
        CLH_TRY(clh_blockdiag_backward(ctx, a->h1, ad->r[i], dxt, dh, dblocks ? dblocks[i] : NULL));
    }
    return first ? clh_tensor_copy(dh1, dh) : clh_axpy(ctx, 1.0f, dh, dh1);
}

static clh_status block_backward_body(clh_ctx *ctx, clip_scratch *s, const clip_layer *L,
                                      const clh_clip_tower_config *t, const clip_adapter *ad,
                                      int causal, const clip_block_acts *a, clh_tensor *dx,
                                      clh_tensor *const *dblocks) {
    int64_t n = clh_tensor_dim(dx, 0), len = clh_tensor_dim(dx, 1), d = t->hidden;
    clh_tensor *dx2, *att2, *datt, *datt2, *dq[3], *dq2, *dh1, *dxi, *xin2;
    CLH_TRY(clip_as2(ctx, s, dx, &dx2));
    CLH_TRY(mlp_backward(ctx, s, L, t, a, dx2));
    CLH_TRY(clip_as2(ctx, s, a->att, &att2));
    CLH_TRY(clip_ws3(ctx, s, n, len, d, &datt));
    CLH_TRY(clip_as2(ctx, s, datt, &datt2));
    CLH_TRY(out_projection_backward(ctx, s, L, ad, a, att2, dx2, datt2, dblocks));
    for (int i = 0; i < 3; i++)
        CLH_TRY(clip_ws3(ctx, s, n, len, d, &dq[i]));
    CLH_TRY(clh_attention_backward(ctx, a->qkv[0], a->qkv[1], a->qkv[2], t->heads, causal, datt,
                                   dq[0], dq[1], dq[2]));
    CLH_TRY(clip_ws2(ctx, s, n * len, d, &dh1));
    for (int i = 0; i < 3; i++) {
        CLH_TRY(clip_as2(ctx, s, dq[i], &dq2));
        CLH_TRY(input_transform_backward(ctx, s, L, ad, a, i, dq2, dh1, i == 0, dblocks));
    }
    CLH_TRY(clip_ws2(ctx, s, n * len, d, &dxi));
    CLH_TRY(clip_as2(ctx, s, a->x_in, &xin2));
    CLH_TRY(clh_layer_norm_backward(ctx, xin2, L->ln1_w, t->eps, dh1, dxi, NULL, NULL));
    return clh_axpy(ctx, 1.0f, dxi, dx2);
}

clh_status clip_block_backward(clh_ctx *ctx, const clip_layer *L, const clh_clip_tower_config *t,
                               const clip_adapter *ad, int causal, const clip_block_acts *a,
                               clh_tensor *dx, clh_tensor *const *dblocks) {
    clip_scratch s = {0};
    size_t mark = clh_ws_mark(ctx);
    clh_status st = block_backward_body(ctx, &s, L, t, ad, causal, a, dx, dblocks);
    clip_release_all(&s);
    clh_ws_reset(ctx, mark);
    return st;
}

/* ------------------------------------------------------------------ CAT-Seg dense block */

/* CAT-Seg's dense last block (hclip-spec 2.3): no attention; the value stream goes through
 * out_proj, the CLS token of the block input is added to every token as the residual,
 * then the usual MLP residual. Saved activations reuse clip_block_acts: x_in, h1, xt[2],
 * qkv[2] (the value stream), yt, x_mid (y before the MLP), h2, m_pre. */
static clh_status alloc_dense_acts(clh_ctx *ctx, clip_scratch *s, const clh_clip_tower_config *t,
                                   const clip_adapter *ad, int64_t n, int64_t len,
                                   clip_block_acts *a) {
    clip_scratch *owner = a->keep ? NULL : s;
    int64_t rd[2] = {n * len, t->hidden}, rf[2] = {n * len, t->intermediate};
    int64_t nld[3] = {n, len, t->hidden};
    if (a->keep)
        CLH_TRY(clip_ws(ctx, owner, 3, nld, &a->x_in));
    CLH_TRY(clip_ws(ctx, owner, 2, rd, &a->x_mid));
    CLH_TRY(clip_ws(ctx, owner, 2, rd, &a->h1));
    if (ad && ad->r[2])
        CLH_TRY(clip_ws(ctx, owner, 2, rd, &a->xt[2]));
    CLH_TRY(clip_ws(ctx, owner, 2, rd, &a->qkv[2]));
    if (ad && ad->r[3])
        CLH_TRY(clip_ws(ctx, owner, 2, rd, &a->yt));
    CLH_TRY(clip_ws(ctx, owner, 2, rd, &a->h2));
    return clip_ws(ctx, owner, 2, rf, &a->m_pre);
}

static clh_status add_cls_residual(clh_ctx *ctx, const clh_tensor *x, clh_tensor *y) {
    int n = (int)clh_tensor_dim(x, 0), len = (int)clh_tensor_dim(x, 1);
    int d = (int)clh_tensor_dim(x, 2), token = 0;
    size_t global[1] = {(size_t)n * (size_t)len * (size_t)d};
    clh_karg args[] = {CLH_KTENSOR(y), CLH_KARG(n),   CLH_KARG(len),  CLH_KARG(d),
                       CLH_KTENSOR(x), CLH_KARG(len), CLH_KARG(token)};
    return clh_launch(ctx, "clip_add_token_broadcast", 1, global, NULL, 9, args);
}

static clh_status dense_forward_body(clh_ctx *ctx, clip_scratch *s, const clip_layer *L,
                                     const clh_clip_tower_config *t, const clip_adapter *ad,
                                     const clh_tensor *x, clh_tensor *y, clip_block_acts *a) {
    clh_tensor *x2, *y2;
    const clh_tensor *in;
    CLH_TRY(clip_as2(ctx, s, x, &x2));
    CLH_TRY(clip_as2(ctx, s, y, &y2));
    if (a->keep)
        CLH_TRY(clh_tensor_copy(a->x_in, x));
    CLH_TRY(clh_layer_norm(ctx, x2, L->ln1_w, L->ln1_b, t->eps, a->h1));
    in = a->h1;
    if (ad && ad->r[2]) {
        CLH_TRY(clh_blockdiag_forward(ctx, a->h1, ad->r[2], a->xt[2]));
        in = a->xt[2];
    }
    CLH_TRY(clh_linear(ctx, in, L->w[2], L->b[2], a->qkv[2]));
    CLH_TRY(out_projection(ctx, L, ad, a->qkv[2], a, y2));
    CLH_TRY(add_cls_residual(ctx, x, y));
    if (a->keep)
        CLH_TRY(clh_tensor_copy(a->x_mid, y2));
    return mlp_forward(ctx, s, L, t, y2, a);
}

/* Forward of a normal block (y == NULL: in place on x) or of the CAT-Seg dense block
 * (x -> y) with the workspace discipline both share: every activation is allocated first;
 * with saving on they stay on the workspace stack below the temporaries, which are dropped
 * at the end; otherwise everything is dropped. */
static clh_status run_block(clh_ctx *ctx, const clip_layer *L, const clh_clip_tower_config *t,
                            const clip_adapter *ad, clh_tensor *x, clh_tensor *y, int causal,
                            clip_block_acts *save) {
    clip_block_acts local = {0};
    clip_block_acts *a = save ? save : &local;
    memset(a, 0, sizeof *a);
    a->keep = save != NULL;
    clip_scratch s = {0};
    size_t mark = clh_ws_mark(ctx);
    int64_t n = clh_tensor_dim(x, 0), len = clh_tensor_dim(x, 1);
    clh_status st =
        y ? alloc_dense_acts(ctx, &s, t, ad, n, len, a) : alloc_acts(ctx, &s, t, ad, n, len, a);
    size_t temporaries = clh_ws_mark(ctx);
    if (st == CLH_OK)
        st = y ? dense_forward_body(ctx, &s, L, t, ad, x, y, a)
               : block_forward_body(ctx, &s, L, t, ad, x, causal, a);
    clip_release_all(&s);
    if (save && st != CLH_OK)
        clip_block_acts_release(save);
    clh_ws_reset(ctx, save && st == CLH_OK ? temporaries : mark);
    return st;
}

clh_status clip_block_forward(clh_ctx *ctx, const clip_layer *L, const clh_clip_tower_config *t,
                              const clip_adapter *ad, clh_tensor *x, int causal,
                              clip_block_acts *save) {
    return run_block(ctx, L, t, ad, x, NULL, causal, save);
}

clh_status clip_dense_block_forward(clh_ctx *ctx, const clip_layer *L,
                                    const clh_clip_tower_config *t, const clip_adapter *ad,
                                    const clh_tensor *x, clh_tensor *y, clip_block_acts *save) {
    return run_block(ctx, L, t, ad, (clh_tensor *)x, y, 0, save);
}

/* dx[n, 0, :] += sum over tokens of dy[n, :, :] (the CLS residual's gradient), as one
 * batched GEMM with a row of ones. */
static clh_status cls_residual_backward(clh_ctx *ctx, clip_scratch *s, const clh_tensor *dy,
                                        clh_tensor *dx) {
    int64_t n = clh_tensor_dim(dx, 0), len = clh_tensor_dim(dx, 1), d = clh_tensor_dim(dx, 2);
    clh_tensor *ones;
    CLH_TRY(clip_ws2(ctx, s, 1, len, &ones));
    CLH_TRY(clh_tensor_fill(ones, 1.0f));
    return clh_gemm_batched(ctx, 0, 0, 1, (size_t)d, (size_t)len, 1.0f, ones, (size_t)len, 0, dy,
                            (size_t)d, (size_t)(len * d), 1.0f, dx, (size_t)d, (size_t)(len * d),
                            (size_t)n);
}

static clh_status dense_backward_body(clh_ctx *ctx, clip_scratch *s, const clip_layer *L,
                                      const clh_clip_tower_config *t, const clip_adapter *ad,
                                      const clip_block_acts *a, clh_tensor *dy, clh_tensor *dx,
                                      clh_tensor *const *dblocks) {
    int64_t rows = clh_tensor_numel(dy) / (size_t)t->hidden, d = t->hidden;
    clh_tensor *dy2, *dv, *dh, *dxi, *xin2;
    CLH_TRY(clip_as2(ctx, s, dy, &dy2));
    CLH_TRY(mlp_backward(ctx, s, L, t, a, dy2));
    CLH_TRY(cls_residual_backward(ctx, s, dy, dx));
    CLH_TRY(clip_ws2(ctx, s, rows, d, &dv));
    CLH_TRY(out_projection_backward(ctx, s, L, ad, a, a->qkv[2], dy2, dv, dblocks));
    CLH_TRY(clip_ws2(ctx, s, rows, d, &dh));
    CLH_TRY(input_transform_backward(ctx, s, L, ad, a, 2, dv, dh, 1, dblocks));
    CLH_TRY(clip_ws2(ctx, s, rows, d, &dxi));
    CLH_TRY(clip_as2(ctx, s, a->x_in, &xin2));
    CLH_TRY(clh_layer_norm_backward(ctx, xin2, L->ln1_w, t->eps, dh, dxi, NULL, NULL));
    clh_tensor *dx2;
    CLH_TRY(clip_as2(ctx, s, dx, &dx2));
    return clh_axpy(ctx, 1.0f, dxi, dx2);
}

clh_status clip_dense_block_backward(clh_ctx *ctx, const clip_layer *L,
                                     const clh_clip_tower_config *t, const clip_adapter *ad,
                                     const clip_block_acts *a, clh_tensor *dy, clh_tensor *dx,
                                     clh_tensor *const *dblocks) {
    clip_scratch s = {0};
    size_t mark = clh_ws_mark(ctx);
    clh_status st = dense_backward_body(ctx, &s, L, t, ad, a, dy, dx, dblocks);
    clip_release_all(&s);
    clh_ws_reset(ctx, mark);
    return st;
}
