/* H-CLIP adapters on a frozen CLIP: parameters P, A, B (hclip-spec 3.2), the block
 * transforms derived from them, the training forward/backward through both towers, and
 * the folded export. */
#include <stdlib.h>
#include <string.h>

#include "clip_internal.h"
#include "hclip.h"

enum { TEXT = 0, VISION = 1 };

typedef struct tower_adapters {
    int layers, blocks;     /* blocks per matrix */
    size_t first;           /* first raw block of this tower */
    int ortho;              /* Cayley applies */
    clip_adapter *ad;       /* [layers]: views into h->blocks */
    clh_tensor *(*dblk)[4]; /* [layers][4]: views into h->dblocks */
    clip_tower_tape tape;
    int pending;            /* a training forward awaits its backward */
    size_t mark;            /* workspace mark before that forward */
    int hooks[64], n_hooks; /* the image request of that forward */
} tower_adapters;

struct clh_hclip {
    clh_clip *base;
    clh_ctx *ctx;
    clh_hclip_options opt;
    clh_dcrc_layout lay;
    int n_blocks;
    clh_tensor *p, *a, *b, *dp, *da, *db;
    clh_tensor *raw, *blocks, *dblocks, *draw, *inv;
    tower_adapters tw[2];
    clh_he_options he;
    double he_loss;
    double *he_base; /* HE(W) per (tower, layer, t) for he_base_s; NULL until computed */
    float he_base_s;
};

/* ------------------------------------------------------------------ set-up */

static clh_status new_tensor(clh_ctx *ctx, int ndim, int64_t d0, int64_t d1, int64_t d2, int64_t d3,
                             clh_tensor **out) {
    int64_t shape[4] = {d0, d1, d2, d3};
    return clh_tensor_new(ctx, ndim, shape, out);
}

/* View of `count` blocks starting at block `first` of a [n, q, q] tensor. */
static clh_status block_view(clh_tensor *t, int q, size_t first, int count, clh_tensor **out) {
    int64_t shape[3] = {count, q, q};
    return clh_tensor_view(t, first * (size_t)q * (size_t)q, 3, shape, out);
}

static clh_status init_tower(clh_hclip *h, int e) {
    tower_adapters *tw = &h->tw[e];
    int q = h->lay.q;
    tw->ad = calloc((size_t)tw->layers, sizeof *tw->ad);
    tw->dblk = calloc((size_t)tw->layers, sizeof *tw->dblk);
    if (!tw->ad || !tw->dblk)
        return clh_fail(h->ctx, CLH_ERR_OUT_OF_MEMORY, "H-CLIP: out of host memory");
    tw->tape.ad = tw->ad;
    tw->tape.record = 1;
    tw->tape.recompute = h->opt.recompute;
    for (int l = 0; l < tw->layers; l++)
        for (int t = 0; t < 4; t++) {
            size_t first = tw->first + (size_t)(l * 4 + t) * (size_t)tw->blocks;
            clh_tensor *v;
            CLH_TRY(block_view(h->blocks, q, first, tw->blocks, &v));
            tw->ad[l].r[t] = v;
            CLH_TRY(block_view(h->dblocks, q, first, tw->blocks, &tw->dblk[l][t]));
        }
    return CLH_OK;
}

/* Identity at initialisation: P's blocks are 0 for towers under the Cayley map
 * (Cayley(0) = I) and I for unconstrained towers; A_l = I; B = I. */
static clh_status init_parameters(clh_hclip *h) {
    const clh_dcrc_layout *L = &h->lay;
    int q = L->q, m = L->text_blocks + L->vision_blocks;
    int layers = L->text_layers > L->vision_layers ? L->text_layers : L->vision_layers;
    int s = 4 * layers;
    size_t np = (size_t)q * q * s * m, na = (size_t)layers * m * m, nb = (size_t)s * s;
    float *host = calloc(np > na + nb ? np : na + nb, sizeof *host);
    if (!host)
        return clh_fail(h->ctx, CLH_ERR_OUT_OF_MEMORY, "H-CLIP: out of host memory");
    for (int blk = 0; blk < m; blk++) {
        int tower = blk < L->text_blocks ? TEXT : VISION;
        if (h->tw[tower].ortho)
            continue;
        for (int i = 0; i < q; i++)
            for (int slot = 0; slot < s; slot++)
                host[(((size_t)i * q + i) * s + slot) * m + blk] = 1.0f;
    }
    clh_status st = clh_tensor_upload(h->p, host, np);
    memset(host, 0, (na + nb) * sizeof *host);
    for (int l = 0; l < layers; l++)
        for (int i = 0; i < m; i++)
            host[((size_t)l * m + i) * m + i] = 1.0f;
    for (int i = 0; i < s; i++)
        host[na + (size_t)i * s + i] = 1.0f;
    if (st == CLH_OK)
        st = clh_tensor_upload(h->a, host, na);
    if (st == CLH_OK)
        st = clh_tensor_upload(h->b, host + na, nb);
    free(host);
    return st;
}

static clh_status check_widths(clh_ctx *ctx, const clh_clip_config *c, int q) {
    if (q <= 0 || c->text.hidden % q || c->vision.hidden % q)
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT,
                        "H-CLIP: block size %d must divide both tower widths (text %d, vision %d)",
                        q, c->text.hidden, c->vision.hidden);
    return CLH_OK;
}

static clh_status hclip_setup(clh_hclip *h) {
    clh_ctx *ctx = h->ctx;
    const clh_clip_config *c = clh_clip_get_config(h->base);
    int q = h->opt.block_size;
    CLH_TRY(check_widths(ctx, c, q));
    h->lay = (clh_dcrc_layout){q, c->text.layers, c->vision.layers, c->text.hidden / q,
                               c->vision.hidden / q};
    int layers = c->text.layers > c->vision.layers ? c->text.layers : c->vision.layers;
    int m = h->lay.text_blocks + h->lay.vision_blocks, s = 4 * layers;
    h->n_blocks = clh_dcrc_num_blocks(&h->lay);
    h->tw[TEXT] =
        (tower_adapters){.layers = c->text.layers,
                         .blocks = h->lay.text_blocks,
                         .first = 0,
                         .ortho = h->opt.ortho == CLH_ORTHO_TEXT || h->opt.ortho == CLH_ORTHO_BOTH};
    h->tw[VISION] = (tower_adapters){.layers = c->vision.layers,
                                     .blocks = h->lay.vision_blocks,
                                     .first = (size_t)4 * c->text.layers * h->lay.text_blocks,
                                     .ortho = h->opt.ortho == CLH_ORTHO_VISION ||
                                              h->opt.ortho == CLH_ORTHO_BOTH};
    CLH_TRY(new_tensor(ctx, 4, q, q, s, m, &h->p));
    CLH_TRY(new_tensor(ctx, 4, q, q, s, m, &h->dp));
    CLH_TRY(new_tensor(ctx, 3, layers, m, m, 0, &h->a));
    CLH_TRY(new_tensor(ctx, 3, layers, m, m, 0, &h->da));
    CLH_TRY(new_tensor(ctx, 2, s, s, 0, 0, &h->b));
    CLH_TRY(new_tensor(ctx, 2, s, s, 0, 0, &h->db));
    CLH_TRY(new_tensor(ctx, 3, h->n_blocks, q, q, 0, &h->raw));
    CLH_TRY(new_tensor(ctx, 3, h->n_blocks, q, q, 0, &h->blocks));
    CLH_TRY(new_tensor(ctx, 3, h->n_blocks, q, q, 0, &h->dblocks));
    CLH_TRY(new_tensor(ctx, 3, h->n_blocks, q, q, 0, &h->draw));
    CLH_TRY(new_tensor(ctx, 3, h->n_blocks, q, q, 0, &h->inv));
    CLH_TRY(init_tower(h, TEXT));
    CLH_TRY(init_tower(h, VISION));
    CLH_TRY(init_parameters(h));
    return clh_hclip_update(h);
}

clh_status clh_hclip_new(clh_clip *base, const clh_hclip_options *options, clh_hclip **out) {
    *out = NULL;
    if (!base)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "clh_hclip_new: NULL model");
    clh_hclip *h = calloc(1, sizeof *h);
    if (!h)
        return clh_fail(NULL, CLH_ERR_OUT_OF_MEMORY, "clh_hclip_new: out of host memory");
    h->base = base;
    h->ctx = clh_clip_ctx(base);
    if (options)
        h->opt = *options;
    if (h->opt.block_size == 0)
        h->opt.block_size = 128;
    if ((unsigned)h->opt.ortho > CLH_ORTHO_VISION) {
        free(h);
        return clh_fail(clh_clip_ctx(base), CLH_ERR_INVALID_ARGUMENT,
                        "clh_hclip_new: unknown orthogonality placement %d", (int)options->ortho);
    }
    clh_status st = hclip_setup(h);
    if (st != CLH_OK) {
        clh_hclip_free(h);
        return st;
    }
    *out = h;
    return CLH_OK;
}

static void free_tower(tower_adapters *tw) {
    for (int l = 0; tw->ad && l < tw->layers; l++)
        for (int t = 0; t < 4; t++) {
            clh_tensor_release((clh_tensor *)tw->ad[l].r[t]);
            if (tw->dblk)
                clh_tensor_release(tw->dblk[l][t]);
        }
    free(tw->ad);
    free(tw->dblk);
}

void clh_hclip_free(clh_hclip *h) {
    if (!h)
        return;
    clh_hclip_discard(h);
    free_tower(&h->tw[TEXT]);
    free_tower(&h->tw[VISION]);
    clh_tensor *all[] = {h->p,   h->a,      h->b,       h->dp,   h->da, h->db,
                         h->raw, h->blocks, h->dblocks, h->draw, h->inv};
    for (size_t i = 0; i < sizeof all / sizeof *all; i++)
        clh_tensor_release(all[i]);
    free(h->he_base);
    free(h);
}

const clh_dcrc_layout *clh_hclip_layout(const clh_hclip *h) {
    return &h->lay;
}

const clh_hclip_options *clh_hclip_get_options(const clh_hclip *h) {
    return &h->opt;
}

clh_clip *clh_hclip_base(const clh_hclip *h) {
    return h->base;
}

const clh_tensor *clh_hclip_blocks(const clh_hclip *h) {
    return h->blocks;
}

/* ------------------------------------------------------------------ parameters */

int clh_hclip_num_params(const clh_hclip *h) {
    return 1 + !h->opt.no_modality_map + !h->opt.no_layer_map;
}

clh_status clh_hclip_param(clh_hclip *h, int i, const char **name, clh_tensor **param,
                           clh_tensor **grad) {
    int which[3], n = 0;
    which[n++] = 0;
    if (!h->opt.no_modality_map)
        which[n++] = 1;
    if (!h->opt.no_layer_map)
        which[n++] = 2;
    if (i < 0 || i >= n)
        return clh_fail(h->ctx, CLH_ERR_INVALID_ARGUMENT, "clh_hclip_param: index %d outside 0..%d",
                        i, n - 1);
    static const char *names[3] = {"hclip.P", "hclip.A", "hclip.B"};
    clh_tensor *params[3] = {h->p, h->a, h->b}, *grads[3] = {h->dp, h->da, h->db};
    if (name)
        *name = names[which[i]];
    if (param)
        *param = params[which[i]];
    if (grad)
        *grad = grads[which[i]];
    return CLH_OK;
}

clh_status clh_hclip_zero_grad(clh_hclip *h) {
    CLH_TRY(clh_tensor_fill(h->dp, 0.0f));
    CLH_TRY(clh_tensor_fill(h->da, 0.0f));
    return clh_tensor_fill(h->db, 0.0f);
}

/* Per tower: R = Cayley(raw) or R = raw, on that tower's range of blocks. */
static clh_status update_tower(clh_hclip *h, const tower_adapters *tw) {
    int q = h->lay.q, count = 4 * tw->layers * tw->blocks;
    clh_tensor *raw = NULL, *r = NULL, *inv = NULL;
    clh_status st = block_view(h->raw, q, tw->first, count, &raw);
    if (st == CLH_OK)
        st = block_view(h->blocks, q, tw->first, count, &r);
    if (st == CLH_OK)
        st = block_view(h->inv, q, tw->first, count, &inv);
    if (st == CLH_OK)
        st = tw->ortho ? clh_cayley_forward(h->ctx, raw, r, inv) : clh_tensor_copy(r, raw);
    clh_tensor_release(raw);
    clh_tensor_release(r);
    clh_tensor_release(inv);
    return st;
}

clh_status clh_hclip_update(clh_hclip *h) {
    /* activations saved with the old transforms would give wrong gradients */
    clh_hclip_discard(h);
    CLH_TRY(clh_dcrc_forward(h->ctx, &h->lay, h->p, h->opt.no_modality_map ? NULL : h->a,
                             h->opt.no_layer_map ? NULL : h->b, h->raw));
    CLH_TRY(update_tower(h, &h->tw[TEXT]));
    return update_tower(h, &h->tw[VISION]);
}

/* draw from dblocks, per tower through the Cayley map where it applies. */
static clh_status backward_tower_transform(clh_hclip *h, const tower_adapters *tw) {
    int q = h->lay.q, count = 4 * tw->layers * tw->blocks;
    clh_tensor *raw = NULL, *inv = NULL, *dr = NULL, *draw = NULL;
    clh_status st = block_view(h->raw, q, tw->first, count, &raw);
    if (st == CLH_OK)
        st = block_view(h->inv, q, tw->first, count, &inv);
    if (st == CLH_OK)
        st = block_view(h->dblocks, q, tw->first, count, &dr);
    if (st == CLH_OK)
        st = block_view(h->draw, q, tw->first, count, &draw);
    if (st == CLH_OK)
        st =
            tw->ortho ? clh_cayley_backward(h->ctx, raw, inv, dr, draw) : clh_tensor_copy(draw, dr);
    clh_tensor_release(raw);
    clh_tensor_release(inv);
    clh_tensor_release(dr);
    clh_tensor_release(draw);
    return st;
}

static clh_status backward_parameters(clh_hclip *h) {
    CLH_TRY(backward_tower_transform(h, &h->tw[TEXT]));
    CLH_TRY(backward_tower_transform(h, &h->tw[VISION]));
    return clh_dcrc_backward(h->ctx, &h->lay, h->p, h->opt.no_modality_map ? NULL : h->a,
                             h->opt.no_layer_map ? NULL : h->b, h->draw, h->dp,
                             h->opt.no_modality_map ? NULL : h->da,
                             h->opt.no_layer_map ? NULL : h->db);
}

/* ------------------------------------------------------------------ forward */

/* Invariant: a model has pending tapes only while it owns the top of its context's
 * workspace (ctx->ws_owner), so resetting the workspace to its marks is safe. */
static void drop_pending(clh_hclip *h, tower_adapters *tw) {
    if (!tw->pending)
        return;
    clip_tower_tape_release(&tw->tape);
    clh_ws_reset(h->ctx, tw->mark);
    tw->pending = 0;
}

/* Text was recorded above the image on the workspace stack: drop it first. */
void clh_hclip_discard(clh_hclip *h) {
    if (!h || h->ctx->ws_owner != h)
        return;
    drop_pending(h, &h->tw[TEXT]);
    drop_pending(h, &h->tw[VISION]);
    h->ctx->ws_owner = NULL;
}

static clh_status forward_image(clh_hclip *h, int train, const clh_tensor *pixels,
                                const clh_image_request *req, clh_image_outputs *out) {
    tower_adapters *tw = &h->tw[VISION];
    clip_tower_tape plain = {.ad = tw->ad, .record = 0};
    if (!train)
        return clip_encode_image_taped(h->base, pixels, req, out, &plain);
    if (req->n_hooks > 64)
        return clh_fail(h->ctx, CLH_ERR_INVALID_ARGUMENT, "H-CLIP: at most 64 hooks");
    tw->mark = clh_ws_mark(h->ctx);
    CLH_TRY(clip_encode_image_taped(h->base, pixels, req, out, &tw->tape));
    tw->n_hooks = req->n_hooks;
    for (int i = 0; i < req->n_hooks; i++)
        tw->hooks[i] = req->hooks[i];
    tw->pending = 1;
    return CLH_OK;
}

static clh_status forward_text(clh_hclip *h, int train, const int32_t *ids, int n, int context,
                               clh_tensor **text) {
    tower_adapters *tw = &h->tw[TEXT];
    clip_tower_tape plain = {.ad = tw->ad, .record = 0};
    if (!train)
        return clip_encode_text_taped(h->base, ids, n, context, text, &plain);
    tw->mark = clh_ws_mark(h->ctx);
    CLH_TRY(clip_encode_text_taped(h->base, ids, n, context, text, &tw->tape));
    tw->pending = 1;
    return CLH_OK;
}

clh_status clh_hclip_forward(clh_hclip *h, int train, const clh_tensor *pixels,
                             const clh_image_request *request, clh_image_outputs *image,
                             const int32_t *ids, int n_text, int context, clh_tensor **text) {
    if (!h)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "clh_hclip_forward: NULL model");
    if ((pixels && (!request || !image)) || (n_text > 0 && !text))
        return clh_fail(h->ctx, CLH_ERR_INVALID_ARGUMENT,
                        "clh_hclip_forward: outputs missing for the requested towers");
    /* A new training forward replaces pending ones (the workspace is a stack). */
    if (train) {
        clh_hclip_discard(h->ctx->ws_owner); /* another model's pending forward, or ours */
        h->ctx->ws_owner = h;
    }
    if (pixels)
        CLH_TRY(forward_image(h, train, pixels, request, image));
    if (n_text > 0) {
        clh_status st = forward_text(h, train, ids, n_text, context, text);
        if (st != CLH_OK && pixels) {
            clh_image_outputs_release(image);
            drop_pending(h, &h->tw[VISION]);
        }
        return st;
    }
    return CLH_OK;
}

/* ------------------------------------------------------------------ hyperspherical energy */

static int max_layers(const clh_hclip *h) {
    return h->tw[TEXT].layers > h->tw[VISION].layers ? h->tw[TEXT].layers : h->tw[VISION].layers;
}

static const clip_layer *tower_layer(const clh_hclip *h, int e, int l) {
    return e == TEXT ? &h->base->txt_layers[l] : &h->base->vis_layers[l];
}

/* HE of W' (adapted, when adapted != 0) or W of tower e, layer l, matrix t; rows for q, k,
 * v and columns for out-proj, where the transform preserves it when orthogonal. */
static clh_status matrix_energy(clh_hclip *h, int e, int l, int t, int adapted, float s,
                                clh_tensor *folded, double *energy) {
    const clh_tensor *w = tower_layer(h, e, l)->w[t];
    if (adapted) {
        CLH_TRY(clh_blockdiag_fold(h->ctx, w, h->tw[e].ad[l].r[t], t == 3, folded));
        w = folded;
    }
    return clh_hyperspherical_energy(h->ctx, w, t == 3, s, energy);
}

/* HE(W) of every matrix, cached per s. */
static clh_status base_energies(clh_hclip *h, float s, clh_tensor *scratch_w) {
    int lm = max_layers(h);
    if (h->he_base && h->he_base_s == s)
        return CLH_OK;
    free(h->he_base);
    h->he_base = calloc((size_t)2 * lm * 4, sizeof *h->he_base);
    if (!h->he_base)
        return clh_fail(h->ctx, CLH_ERR_OUT_OF_MEMORY, "HE: out of host memory");
    h->he_base_s = s;
    for (int e = 0; e < 2; e++)
        for (int l = 0; l < h->tw[e].layers; l++)
            for (int t = 0; t < 4; t++) {
                clh_status st =
                    matrix_energy(h, e, l, t, 0, s, scratch_w, &h->he_base[(e * lm + l) * 4 + t]);
                if (st != CLH_OK) {
                    free(h->he_base);
                    h->he_base = NULL;
                    return st;
                }
            }
    return CLH_OK;
}

static clh_status width_scratch(clh_hclip *h, int e, clh_tensor **out) {
    int64_t d = e == TEXT ? h->base->cfg.text.hidden : h->base->cfg.vision.hidden;
    int64_t shape[2] = {d, d};
    return clh_tensor_new(h->ctx, 2, shape, out);
}

clh_status clh_hclip_he_drift(clh_hclip *h, float s, double *drift) {
    int lm = max_layers(h);
    memset(drift, 0, (size_t)2 * lm * 4 * sizeof *drift);
    clh_tensor *w[2] = {NULL, NULL};
    clh_status st = width_scratch(h, TEXT, &w[0]);
    if (st == CLH_OK)
        st = width_scratch(h, VISION, &w[1]);
    for (int e = 0; e < 2 && st == CLH_OK; e++) {
        st = base_energies(h, s, w[e]);
        for (int l = 0; l < h->tw[e].layers && st == CLH_OK; l++)
            for (int t = 0; t < 4 && st == CLH_OK; t++) {
                double now, base = h->he_base[(e * lm + l) * 4 + t];
                st = matrix_energy(h, e, l, t, 1, s, w[e], &now);
                drift[(e * lm + l) * 4 + t] = base != 0 ? (now - base) / base : now - base;
            }
    }
    clh_tensor_release(w[0]);
    clh_tensor_release(w[1]);
    return st;
}

clh_status clh_hclip_set_he_loss(clh_hclip *h, const clh_he_options *options) {
    if (!options)
        return clh_fail(h->ctx, CLH_ERR_INVALID_ARGUMENT, "clh_hclip_set_he_loss: NULL options");
    if (options->lambda < 0 || options->s < 0)
        return clh_fail(h->ctx, CLH_ERR_INVALID_ARGUMENT,
                        "clh_hclip_set_he_loss: lambda %g and s %g must be >= 0",
                        (double)options->lambda, (double)options->s);
    h->he = *options;
    return CLH_OK;
}

double clh_hclip_he_loss(const clh_hclip *h) {
    return h->he_loss;
}

/* dR_j += W_j^T dW'_j (input side, column blocks) or dW'_j W_j^T (output side, row blocks). */
static clh_status blocks_from_weight_grad(clh_hclip *h, const clh_tensor *w, const clh_tensor *dw,
                                          int output_side, clh_tensor *dblocks) {
    size_t d = (size_t)clh_tensor_dim(w, 0), q = (size_t)h->lay.q, b = d / q;
    if (!output_side)
        return clh_gemm_batched(h->ctx, 1, 0, q, q, d, 1.0f, w, d, q, dw, d, q, 1.0f, dblocks, q,
                                q * q, b);
    return clh_gemm_batched(h->ctx, 0, 1, q, q, d, 1.0f, dw, d, q * d, w, d, q * d, 1.0f, dblocks,
                            q, q * q, b);
}

static int he_selected(const clh_hclip *h, int e, int l) {
    int last = h->he.last_layer < 0 ? h->tw[e].layers - 1 : h->he.last_layer;
    return (e == TEXT ? h->he.text : h->he.vision) && l >= h->he.first_layer && l <= last;
}

/* lambda |HE(W') - HE(W)| for one matrix, its gradient into dblocks. */
static clh_status he_term(clh_hclip *h, int e, int l, int t, clh_tensor *wf, clh_tensor *dwf) {
    int lm = max_layers(h);
    double now, base = h->he_base[(e * lm + l) * 4 + t];
    CLH_TRY(matrix_energy(h, e, l, t, 1, h->he.s, wf, &now));
    h->he_loss += h->he.lambda * (now > base ? now - base : base - now);
    if (now == base)
        return CLH_OK;
    float scale = h->he.lambda * (now > base ? 1.0f : -1.0f);
    CLH_TRY(clh_tensor_fill(dwf, 0.0f));
    CLH_TRY(clh_hyperspherical_energy_backward(h->ctx, wf, t == 3, h->he.s, scale, dwf));
    return blocks_from_weight_grad(h, tower_layer(h, e, l)->w[t], dwf, t == 3, h->tw[e].dblk[l][t]);
}

static clh_status he_loss_backward(clh_hclip *h) {
    clh_status st = CLH_OK;
    for (int e = 0; e < 2 && st == CLH_OK; e++) {
        clh_tensor *wf = NULL, *dwf = NULL;
        st = width_scratch(h, e, &wf);
        if (st == CLH_OK)
            st = width_scratch(h, e, &dwf);
        if (st == CLH_OK)
            st = base_energies(h, h->he.s, wf);
        for (int l = 0; l < h->tw[e].layers && st == CLH_OK; l++)
            for (int t = 0; t < 4 && st == CLH_OK && he_selected(h, e, l); t++)
                st = he_term(h, e, l, t, wf, dwf);
        clh_tensor_release(wf);
        clh_tensor_release(dwf);
    }
    return st;
}

/* ------------------------------------------------------------------ backward */

/* Block l's backward, recomputing its activations first when only its input was kept. */
static clh_status block_backward(clh_hclip *h, tower_adapters *tw, const clip_layer *layers,
                                 const clh_clip_tower_config *t, int l, int causal, clh_tensor *g) {
    clh_ctx *ctx = h->ctx;
    const clip_adapter *ad = &tw->ad[l];
    if (!tw->tape.recompute)
        return clip_block_backward(ctx, &layers[l], t, ad, causal, &tw->tape.acts[l], g,
                                   tw->dblk[l]);
    size_t mark = clh_ws_mark(ctx);
    clip_block_acts acts = {0};
    clh_tensor *x = NULL;
    const clh_tensor *in = tw->tape.x_in[l];
    clh_status st = clh_ws_tensor(ctx, clh_tensor_ndim(in), clh_tensor_shape(in), &x);
    if (st == CLH_OK)
        st = clh_tensor_copy(x, in);
    if (st == CLH_OK)
        st = clip_block_forward(ctx, &layers[l], t, ad, x, causal, &acts);
    if (st == CLH_OK)
        st = clip_block_backward(ctx, &layers[l], t, ad, causal, &acts, g, tw->dblk[l]);
    clip_block_acts_release(&acts);
    clh_tensor_release(x);
    clh_ws_reset(ctx, mark);
    return st;
}

/* d(src) = ln_backward(src, ln_w, proj^T-backward(d_out)) for out = proj(ln(src)); into dsrc
 * (overwritten). src, dsrc [R, D]; d_out [R, P]. */
static clh_status head_backward(clh_ctx *ctx, clip_scratch *s, const clh_tensor *src,
                                const clh_tensor *ln_w, float eps, const clh_tensor *proj,
                                const clh_tensor *d_out, clh_tensor *dsrc) {
    clh_tensor *src2, *dout2, *dsrc2, *dh;
    CLH_TRY(clip_as2(ctx, s, src, &src2));
    CLH_TRY(clip_as2(ctx, s, d_out, &dout2));
    CLH_TRY(clip_as2(ctx, s, dsrc, &dsrc2));
    CLH_TRY(clip_ws2(ctx, s, clh_tensor_dim(src2, 0), clh_tensor_dim(src2, 1), &dh));
    CLH_TRY(clh_linear_backward(ctx, src2, proj, dout2, dh, NULL, NULL));
    return clh_layer_norm_backward(ctx, src2, ln_w, eps, dh, dsrc2, NULL, NULL);
}

static clh_status check_grad_numel(clh_ctx *ctx, const char *what, const clh_tensor *g,
                                   int produced, int64_t numel) {
    if (!produced)
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT,
                        "clh_hclip_backward: a gradient for %s was given but the forward did not "
                        "produce it",
                        what);
    if ((int64_t)clh_tensor_numel(g) != numel)
        return clh_fail(ctx, CLH_ERR_SHAPE,
                        "clh_hclip_backward: gradient for %s has %zu elements, expected %lld", what,
                        clh_tensor_numel(g), (long long)numel);
    return CLH_OK;
}

/* Gradients entering the vision stream after the last normal block. */
static clh_status vision_head_grads(clh_hclip *h, clip_scratch *s, const clh_tensor *d_pooled,
                                    const clh_tensor *d_dense, clh_tensor *g) {
    clh_ctx *ctx = h->ctx;
    const struct clh_clip *m = h->base;
    clip_tower_tape *tp = &h->tw[VISION].tape;
    int64_t n = tp->n, len = tp->len, d = m->cfg.vision.hidden;
    if (d_pooled) {
        clh_tensor *dcls, *g2;
        CLH_TRY(clip_ws2(ctx, s, n, d, &dcls));
        CLH_TRY(head_backward(ctx, s, tp->cls, m->post_ln_w, m->cfg.vision.eps, m->vis_proj,
                              d_pooled, dcls));
        int32_t *index = malloc((size_t)n * sizeof *index);
        if (!index)
            return clh_fail(ctx, CLH_ERR_OUT_OF_MEMORY, "H-CLIP backward: out of host memory");
        for (int64_t i = 0; i < n; i++)
            index[i] = (int32_t)(i * len); /* the CLS row of every sequence */
        clh_status st = clip_as2(ctx, s, g, &g2);
        if (st == CLH_OK)
            st = clh_scatter_add_rows(ctx, dcls, index, (size_t)n, g2);
        free(index);
        CLH_TRY(st);
    }
    if (d_dense && !tp->catseg) {
        clh_tensor *dsrc;
        CLH_TRY(clip_ws3(ctx, s, n, len, d, &dsrc));
        CLH_TRY(head_backward(ctx, s, tp->dense_src, m->post_ln_w, m->cfg.vision.eps, m->vis_proj,
                              d_dense, dsrc));
        CLH_TRY(clh_axpy(ctx, 1.0f, dsrc, g));
    }
    return CLH_OK;
}

static clh_status add_hook_grads(clh_hclip *h, const clh_tensor *const *d_hooks, int layer,
                                 clh_tensor *g) {
    tower_adapters *tw = &h->tw[VISION];
    for (int i = 0; d_hooks && i < tw->n_hooks; i++)
        if (tw->hooks[i] == layer && d_hooks[i]) {
            CLH_TRY(check_grad_numel(h->ctx, "a hooked block", d_hooks[i], 1,
                                     (int64_t)clh_tensor_numel(g)));
            CLH_TRY(clh_axpy(h->ctx, 1.0f, d_hooks[i], g));
        }
    return CLH_OK;
}

static clh_status vision_backward_body(clh_hclip *h, clip_scratch *s, const clh_tensor *d_pooled,
                                       const clh_tensor *d_dense,
                                       const clh_tensor *const *d_hooks) {
    clh_ctx *ctx = h->ctx;
    const struct clh_clip *m = h->base;
    tower_adapters *tw = &h->tw[VISION];
    clip_tower_tape *tp = &tw->tape;
    int layers = m->cfg.vision.layers;
    int64_t p = m->cfg.projection_dim;
    if (d_pooled)
        CLH_TRY(check_grad_numel(ctx, "the pooled output", d_pooled, tp->cls != NULL, tp->n * p));
    if (d_dense)
        CLH_TRY(check_grad_numel(ctx, "the dense output", d_dense, tp->dense_src != NULL,
                                 tp->n * tp->len * p));
    clh_tensor *g;
    CLH_TRY(clip_ws3(ctx, s, tp->n, tp->len, m->cfg.vision.hidden, &g));
    CLH_TRY(clh_tensor_fill(g, 0.0f));
    CLH_TRY(vision_head_grads(h, s, d_pooled, d_dense, g));
    for (int l = layers - 1; l >= 0; l--) {
        CLH_TRY(add_hook_grads(h, d_hooks, l, g));
        if (tp->ran[l])
            CLH_TRY(block_backward(h, tw, m->vis_layers, &m->cfg.vision, l, 0, g));
        if (l == layers - 1 && tp->catseg && d_dense) {
            clh_tensor *dd;
            CLH_TRY(clip_ws3(ctx, s, tp->n, tp->len, m->cfg.vision.hidden, &dd));
            CLH_TRY(head_backward(ctx, s, tp->dense_src, m->post_ln_w, m->cfg.vision.eps,
                                  m->vis_proj, d_dense, dd));
            CLH_TRY(clip_dense_block_backward(ctx, &m->vis_layers[l], &m->cfg.vision, &tw->ad[l],
                                              &tp->dense, dd, g, tw->dblk[l]));
        }
    }
    return CLH_OK;
}

static clh_status text_backward_body(clh_hclip *h, clip_scratch *s, const clh_tensor *d_text) {
    clh_ctx *ctx = h->ctx;
    const struct clh_clip *m = h->base;
    tower_adapters *tw = &h->tw[TEXT];
    clip_tower_tape *tp = &tw->tape;
    const clh_clip_tower_config *t = &m->cfg.text;
    clh_tensor *g, *g2, *dp;
    CLH_TRY(check_grad_numel(ctx, "the text features", d_text, 1, tp->n * m->cfg.projection_dim));
    CLH_TRY(clip_ws3(ctx, s, tp->n, tp->len, t->hidden, &g));
    CLH_TRY(clh_tensor_fill(g, 0.0f));
    CLH_TRY(clip_ws2(ctx, s, tp->n, t->hidden, &dp));
    CLH_TRY(head_backward(ctx, s, tp->pooled, m->final_ln_w, t->eps, m->txt_proj, d_text, dp));
    CLH_TRY(clip_as2(ctx, s, g, &g2));
    CLH_TRY(clh_scatter_add_rows(ctx, dp, tp->pool_rows, (size_t)tp->n_pool, g2));
    for (int l = t->layers - 1; l >= 0; l--)
        CLH_TRY(block_backward(h, tw, m->txt_layers, t, l, 1, g));
    return CLH_OK;
}

/* Run one tower's backward with its own scratch; the workspace is reset by the caller. */
static clh_status run_tower_backward(clh_hclip *h, int e, const clh_tensor *d_pooled,
                                     const clh_tensor *d_dense, const clh_tensor *const *d_hooks,
                                     const clh_tensor *d_text) {
    clip_scratch s = {0};
    clh_status st = e == VISION ? vision_backward_body(h, &s, d_pooled, d_dense, d_hooks)
                                : text_backward_body(h, &s, d_text);
    clip_release_all(&s);
    return st;
}

clh_status clh_hclip_backward(clh_hclip *h, const clh_tensor *d_pooled, const clh_tensor *d_dense,
                              const clh_tensor *const *d_hooks, const clh_tensor *d_text) {
    if (!h)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "clh_hclip_backward: NULL model");
    tower_adapters *vt = &h->tw[VISION], *tt = &h->tw[TEXT];
    if (!vt->pending && !tt->pending)
        return clh_fail(h->ctx, CLH_ERR_INVALID_ARGUMENT,
                        "clh_hclip_backward: no training forward is pending");
    if ((d_text && !tt->pending) || ((d_pooled || d_dense || d_hooks) && !vt->pending))
        return clh_fail(h->ctx, CLH_ERR_INVALID_ARGUMENT,
                        "clh_hclip_backward: a gradient was given for a tower the last training "
                        "forward did not run");
    clh_status st = clh_tensor_fill(h->dblocks, 0.0f);
    /* Text was recorded above the image on the workspace stack: undo it first. */
    size_t bottom = vt->pending ? vt->mark : tt->mark;
    if (st == CLH_OK && tt->pending && d_text)
        st = run_tower_backward(h, TEXT, NULL, NULL, NULL, d_text);
    if (st == CLH_OK && vt->pending && (d_pooled || d_dense || d_hooks))
        st = run_tower_backward(h, VISION, d_pooled, d_dense, d_hooks, NULL);
    clip_tower_tape_release(&tt->tape);
    clip_tower_tape_release(&vt->tape);
    tt->pending = vt->pending = 0;
    clh_ws_reset(h->ctx, bottom);
    h->ctx->ws_owner = NULL;
    h->he_loss = 0;
    if (st == CLH_OK && h->he.lambda != 0.0f)
        st = he_loss_backward(h);
    if (st == CLH_OK)
        st = backward_parameters(h);
    return st;
}
