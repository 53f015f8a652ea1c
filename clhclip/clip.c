/* CLIP forward passes: the vision tower (pooled, dense, CAT-Seg dense last layer,
 * hooked blocks) and the text tower (causal, EOS pooling). Activations are batch-first
 * [N, L, D] and live in the context's workspace. */
#include <stdlib.h>
#include <string.h>

#include "clip_internal.h"

/* Block l of a tower, recording what the tape asks for. */
static clh_status run_block(clh_ctx *ctx, const clip_layer *layers, const clh_clip_tower_config *t,
                            int l, clh_tensor *x, int causal, clip_tower_tape *tape) {
    const clip_adapter *ad = tape && tape->ad ? &tape->ad[l] : NULL;
    if (!tape || !tape->record)
        return clip_block_forward(ctx, &layers[l], t, ad, x, causal, NULL);
    tape->ran[l] = 1;
    if (!tape->recompute)
        return clip_block_forward(ctx, &layers[l], t, ad, x, causal, &tape->acts[l]);
    CLH_TRY(clh_ws_tensor(ctx, clh_tensor_ndim(x), clh_tensor_shape(x), &tape->x_in[l]));
    CLH_TRY(clh_tensor_copy(tape->x_in[l], x));
    return clip_block_forward(ctx, &layers[l], t, ad, x, causal, NULL);
}

static clh_status run_dense_block(clh_ctx *ctx, const clip_layer *layers,
                                  const clh_clip_tower_config *t, int l, const clh_tensor *x,
                                  clh_tensor *y, clip_tower_tape *tape) {
    const clip_adapter *ad = tape && tape->ad ? &tape->ad[l] : NULL;
    int record = tape && tape->record;
    if (record)
        tape->catseg = 1;
    return clip_dense_block_forward(ctx, &layers[l], t, ad, x, y, record ? &tape->dense : NULL);
}

/* Keep a reference to t in tape->field when recording. */
#define TAPE_KEEP(tape, field, t)                                                                  \
    do {                                                                                           \
        if ((tape) && (tape)->record) {                                                            \
            clh_tensor_retain(t);                                                                  \
            (tape)->field = (t);                                                                   \
        }                                                                                          \
    } while (0)

void clip_tower_tape_release(clip_tower_tape *tape) {
    for (int l = 0; l < tape->layers; l++) {
        if (tape->acts)
            clip_block_acts_release(&tape->acts[l]);
        if (tape->x_in)
            clh_tensor_release(tape->x_in[l]);
    }
    clip_block_acts_release(&tape->dense);
    clh_tensor_release(tape->dense_src);
    clh_tensor_release(tape->cls);
    clh_tensor_release(tape->pooled);
    free(tape->acts);
    free(tape->x_in);
    free(tape->ran);
    free(tape->pool_rows);
    const clip_adapter *ad = tape->ad;
    int record = tape->record, recompute = tape->recompute;
    memset(tape, 0, sizeof *tape);
    tape->ad = ad;
    tape->record = record;
    tape->recompute = recompute;
}

/* Per-layer arrays of a recording tape. */
static clh_status tape_begin(clh_ctx *ctx, clip_tower_tape *tape, int layers) {
    if (!tape || !tape->record)
        return CLH_OK;
    clip_tower_tape_release(tape);
    tape->layers = layers;
    tape->acts = calloc((size_t)layers, sizeof *tape->acts);
    tape->x_in = calloc((size_t)layers, sizeof *tape->x_in);
    tape->ran = calloc((size_t)layers, sizeof *tape->ran);
    if (!tape->acts || !tape->x_in || !tape->ran)
        return clh_fail(ctx, CLH_ERR_OUT_OF_MEMORY, "training tape: out of host memory");
    return CLH_OK;
}

/* ------------------------------------------------------------------ vision */

/* Position embeddings for a gh x gw grid: the CLS row unchanged, the native grid
 * bicubic-resized (torch interpolate, align_corners=False). Cached per grid. */
static clh_status resized_positions(clh_clip *m, int gh, int gw, clh_tensor **out) {
    clh_ctx *ctx = m->ctx;
    int g0 = m->cfg.image_size / m->cfg.patch_size;
    int64_t d = m->cfg.vision.hidden;
    if (gh == g0 && gw == g0) {
        *out = m->vis_pos;
        return CLH_OK;
    }
    if (m->pos_cache && m->pos_cache_h == gh && m->pos_cache_w == gw) {
        *out = m->pos_cache;
        return CLH_OK;
    }
    size_t n0 = (size_t)(1 + g0 * g0) * (size_t)d, n1 = (size_t)(1 + gh * gw) * (size_t)d;
    float *pos = malloc(n0 * sizeof *pos), *chw = malloc(n0 * sizeof *chw);
    float *res = malloc(n1 * sizeof *res), *rows = malloc(n1 * sizeof *rows);
    clh_tensor *src = NULL, *dst = NULL, *cache = NULL;
    clh_status st = (pos && chw && res && rows)
                        ? CLH_OK
                        : clh_fail(ctx, CLH_ERR_OUT_OF_MEMORY, "position resize: out of memory");
    /* tokens-major [g0*g0, D] -> channels-major [D, g0, g0] for the resize kernel */
    if (st == CLH_OK)
        st = clh_tensor_download(m->vis_pos, pos, n0);
    for (size_t i = 0; st == CLH_OK && i < (size_t)(g0 * g0); i++)
        for (int64_t c = 0; c < d; c++)
            chw[(size_t)c * g0 * g0 + i] = pos[(1 + i) * (size_t)d + (size_t)c];
    int64_t s0[3] = {d, g0, g0}, s1[3] = {d, gh, gw}, sc[2] = {1 + (int64_t)gh * gw, d};
    if (st == CLH_OK)
        st = clh_tensor_from_host(ctx, 3, s0, chw, &src);
    if (st == CLH_OK)
        st = clh_tensor_new(ctx, 3, s1, &dst);
    if (st == CLH_OK)
        st = clh_bicubic_resize(ctx, src, dst);
    if (st == CLH_OK)
        st = clh_tensor_download(dst, res, (size_t)(d * gh * gw));
    if (st == CLH_OK) {
        memcpy(rows, pos, (size_t)d * sizeof *rows); /* CLS position */
        for (size_t i = 0; i < (size_t)(gh * gw); i++)
            for (int64_t c = 0; c < d; c++)
                rows[(1 + i) * (size_t)d + (size_t)c] = res[(size_t)c * gh * gw + i];
        st = clh_tensor_from_host(ctx, 2, sc, rows, &cache);
    }
    if (st == CLH_OK) {
        clh_tensor_release(m->pos_cache);
        m->pos_cache = cache;
        m->pos_cache_h = gh;
        m->pos_cache_w = gw;
        *out = cache;
    }
    clh_tensor_release(src);
    clh_tensor_release(dst);
    free(pos);
    free(chw);
    free(res);
    free(rows);
    return st;
}

/* Row 0 of sequence i is the class embedding, rows 1.. its patch embeddings. */
static clh_status place_tokens(clh_ctx *ctx, const clh_tensor *cls, clh_tensor *patches,
                               clh_tensor *x, int64_t i, int64_t g, int64_t d) {
    int64_t row[1] = {d}, block[2] = {g, d};
    clh_tensor *cls_dst = NULL, *patch_dst = NULL, *patch_src = NULL;
    clh_status st = clh_tensor_view(x, (size_t)(i * (g + 1) * d), 1, row, &cls_dst);
    if (st == CLH_OK)
        st = clh_tensor_view(x, (size_t)((i * (g + 1) + 1) * d), 2, block, &patch_dst);
    if (st == CLH_OK)
        st = clh_tensor_view(patches, (size_t)(i * g * d), 2, block, &patch_src);
    if (st == CLH_OK)
        st = clh_tensor_copy(cls_dst, cls);
    if (st == CLH_OK)
        st = clh_tensor_copy(patch_dst, patch_src);
    clh_tensor_release(cls_dst);
    clh_tensor_release(patch_dst);
    clh_tensor_release(patch_src);
    (void)ctx;
    return st;
}

/* x [N, 1+G, D] = [class_emb ; patch_embed(pixels)] + positions, then ln_pre. */
static clh_status vision_embed(clh_clip *m, clip_scratch *s, const clh_tensor *pixels, int gh,
                               int gw, clh_tensor *x) {
    clh_ctx *ctx = m->ctx;
    int64_t n = clh_tensor_dim(pixels, 0), d = m->cfg.vision.hidden, g = (int64_t)gh * gw;
    clh_tensor *patches, *pos = NULL, *x2;
    CLH_TRY(clip_ws3(ctx, s, n, g, d, &patches));
    CLH_TRY(clh_patch_embed(ctx, pixels, m->patch_w, patches));
    for (int64_t i = 0; i < n; i++)
        CLH_TRY(place_tokens(ctx, m->class_emb, patches, x, i, g, d));
    CLH_TRY(resized_positions(m, gh, gw, &pos));
    CLH_TRY(clh_add_rows(ctx, x, pos));
    CLH_TRY(clip_as2(ctx, s, x, &x2));
    return clh_layer_norm(ctx, x2, m->pre_ln_w, m->pre_ln_b, m->cfg.vision.eps, x2);
}

/* out [rows, P] = ln_post(x2 [rows, D]) @ proj^T, into a new tensor. */
static clh_status post_project(clh_clip *m, clip_scratch *s, const clh_tensor *x2, int ndim,
                               const int64_t *out_shape, clh_tensor **out) {
    clh_ctx *ctx = m->ctx;
    int64_t rows = clh_tensor_dim(x2, 0), proj2[2] = {rows, m->cfg.projection_dim};
    clh_tensor *h, *y2;
    CLH_TRY(clip_ws2(ctx, s, rows, m->cfg.vision.hidden, &h));
    CLH_TRY(clh_layer_norm(ctx, x2, m->post_ln_w, m->post_ln_b, m->cfg.vision.eps, h));
    CLH_TRY(clh_tensor_new(ctx, ndim, out_shape, out));
    CLH_TRY(clh_tensor_view(*out, 0, 2, proj2, &y2));
    CLH_TRY(clip_keep(ctx, s, y2));
    return clh_linear(ctx, h, m->vis_proj, NULL, y2);
}

static clh_status pooled_output(clh_clip *m, clip_scratch *s, clh_tensor *x, clh_tensor **out,
                                clip_tower_tape *tape) {
    clh_ctx *ctx = m->ctx;
    int64_t n = clh_tensor_dim(x, 0), len = clh_tensor_dim(x, 1);
    int32_t *index = malloc((size_t)n * sizeof *index);
    if (!index)
        return clh_fail(ctx, CLH_ERR_OUT_OF_MEMORY, "pooled output: out of host memory");
    for (int64_t i = 0; i < n; i++)
        index[i] = (int32_t)(i * len);
    clh_tensor *x2, *cls;
    clh_status st = clip_as2(ctx, s, x, &x2);
    if (st == CLH_OK)
        st = clip_ws2(ctx, s, n, m->cfg.vision.hidden, &cls);
    if (st == CLH_OK)
        st = clh_gather_rows(ctx, x2, index, (size_t)n, cls);
    free(index);
    CLH_TRY(st);
    TAPE_KEEP(tape, cls, cls);
    int64_t shape[2] = {n, m->cfg.projection_dim};
    return post_project(m, s, cls, 2, shape, out);
}

static clh_status dense_output(clh_clip *m, clip_scratch *s, clh_tensor *x, clh_tensor **out,
                               clip_tower_tape *tape) {
    clh_tensor *x2;
    TAPE_KEEP(tape, dense_src, x);
    CLH_TRY(clip_as2(m->ctx, s, x, &x2));
    int64_t shape[3] = {clh_tensor_dim(x, 0), clh_tensor_dim(x, 1), m->cfg.projection_dim};
    return post_project(m, s, x2, 3, shape, out);
}

static clh_status copy_out(clh_ctx *ctx, const clh_tensor *x, clh_tensor **out) {
    CLH_TRY(clh_tensor_new(ctx, clh_tensor_ndim(x), clh_tensor_shape(x), out));
    return clh_tensor_copy(*out, x);
}

static clh_status check_image_request(clh_clip *m, const clh_tensor *pixels,
                                      const clh_image_request *req) {
    clh_ctx *ctx = m->ctx;
    int p = m->cfg.patch_size;
    if (!pixels || !req)
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT, "clh_clip_encode_image: NULL argument");
    char shape[128];
    clh_shape_str(clh_tensor_ndim(pixels), clh_tensor_shape(pixels), shape, sizeof shape);
    if (clh_tensor_ndim(pixels) != 4 || clh_tensor_dim(pixels, 1) != 3 ||
        clh_tensor_dim(pixels, 0) < 1)
        return clh_fail(ctx, CLH_ERR_SHAPE,
                        "clh_clip_encode_image: pixels must be [N, 3, H, W], got %s", shape);
    if (clh_tensor_dim(pixels, 2) % p || clh_tensor_dim(pixels, 3) % p ||
        clh_tensor_dim(pixels, 2) < p || clh_tensor_dim(pixels, 3) < p)
        return clh_fail(ctx, CLH_ERR_SHAPE,
                        "clh_clip_encode_image: image size %s is not a positive multiple of the "
                        "patch size %d",
                        shape, p);
    if (req->n_hooks < 0 || req->n_hooks > 64 || (req->n_hooks && !req->hooks))
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT,
                        "clh_clip_encode_image: %d hooks (0..64 allowed)", req->n_hooks);
    for (int i = 0; i < req->n_hooks; i++)
        if (req->hooks[i] < 0 || req->hooks[i] >= m->cfg.vision.layers)
            return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT,
                            "clh_clip_encode_image: hook block %d is outside 0..%d", req->hooks[i],
                            m->cfg.vision.layers - 1);
    return CLH_OK;
}

static int hooks_layer(const clh_image_request *req, int layer) {
    for (int i = 0; i < req->n_hooks; i++)
        if (req->hooks[i] == layer)
            return 1;
    return 0;
}

static clh_status save_hooks(clh_clip *m, const clh_image_request *req, int layer,
                             const clh_tensor *x, clh_image_outputs *out) {
    for (int i = 0; i < req->n_hooks; i++)
        if (req->hooks[i] == layer && !out->hooks[i])
            CLH_TRY(copy_out(m->ctx, x, &out->hooks[i]));
    return CLH_OK;
}

static clh_status encode_image_body(clh_clip *m, clip_scratch *s, const clh_tensor *pixels,
                                    const clh_image_request *req, clh_image_outputs *out,
                                    clip_tower_tape *tape) {
    clh_ctx *ctx = m->ctx;
    int p = m->cfg.patch_size, layers = m->cfg.vision.layers;
    int gh = (int)clh_tensor_dim(pixels, 2) / p, gw = (int)clh_tensor_dim(pixels, 3) / p;
    int64_t n = clh_tensor_dim(pixels, 0), len = 1 + (int64_t)gh * gw;
    clh_tensor *x, *dense_x = NULL;
    CLH_TRY(tape_begin(ctx, tape, layers));
    CLH_TRY(clip_ws3(ctx, s, n, len, m->cfg.vision.hidden, &x));
    CLH_TRY(vision_embed(m, s, pixels, gh, gw, x));
    int catseg = req->want_dense && req->dense_last_layer;
    for (int l = 0; l < layers; l++) {
        if (l == layers - 1 && catseg) {
            CLH_TRY(clip_ws3(ctx, s, n, len, m->cfg.vision.hidden, &dense_x));
            CLH_TRY(run_dense_block(ctx, m->vis_layers, &m->cfg.vision, l, x, dense_x, tape));
            if (!req->want_pooled && !hooks_layer(req, l))
                break; /* the normal last block would only feed outputs nobody asked for */
        }
        CLH_TRY(run_block(ctx, m->vis_layers, &m->cfg.vision, l, x, 0, tape));
        CLH_TRY(save_hooks(m, req, l, x, out));
    }
    if (req->want_pooled)
        CLH_TRY(pooled_output(m, s, x, &out->pooled, tape));
    if (req->want_dense)
        CLH_TRY(dense_output(m, s, catseg ? dense_x : x, &out->dense, tape));
    if (tape && tape->record) {
        tape->n = n;
        tape->len = len;
    }
    return CLH_OK;
}

clh_status clip_encode_image_taped(clh_clip *m, const clh_tensor *pixels,
                                   const clh_image_request *req, clh_image_outputs *out,
                                   clip_tower_tape *tape) {
    if (!m || !out)
        return clh_fail(m ? m->ctx : NULL, CLH_ERR_INVALID_ARGUMENT,
                        "clh_clip_encode_image: NULL argument");
    memset(out, 0, sizeof *out);
    CLH_TRY(check_image_request(m, pixels, req));
    int record = tape && tape->record;
    size_t mark = clh_ws_mark(m->ctx);
    clip_scratch s = {0};
    clh_status st = encode_image_body(m, &s, pixels, req, out, tape);
    clip_release_all(&s);
    if (!record || st != CLH_OK)
        clh_ws_reset(m->ctx, mark);
    if (st != CLH_OK) {
        clh_image_outputs_release(out);
        if (record)
            clip_tower_tape_release(tape);
    }
    return st;
}

clh_status clh_clip_encode_image(clh_clip *m, const clh_tensor *pixels,
                                 const clh_image_request *req, clh_image_outputs *out) {
    return clip_encode_image_taped(m, pixels, req, out, NULL);
}

void clh_image_outputs_release(clh_image_outputs *out) {
    if (!out)
        return;
    clh_tensor_release(out->pooled);
    clh_tensor_release(out->dense);
    for (int i = 0; i < 64; i++)
        clh_tensor_release(out->hooks[i]);
    memset(out, 0, sizeof *out);
}

/* ------------------------------------------------------------------ text */

/* Pooling position per row, with HF semantics: legacy configs (eos_token_id == 2) take
 * the argmax of the ids (first maximum); others the first position holding eos_token_id
 * (position 0 when there is none, as torch's argmax of an all-false mask gives). */
static int32_t pool_position(const clh_clip_config *c, const int32_t *ids, int context) {
    int32_t best = 0;
    for (int j = 0; j < context; j++) {
        if (c->eos_argmax ? ids[j] > ids[best] : ids[j] == c->eos_token_id) {
            best = j;
            if (!c->eos_argmax)
                break;
        }
    }
    return best;
}

static clh_status check_text_request(clh_clip *m, const int32_t *ids, int n, int context) {
    clh_ctx *ctx = m->ctx;
    if (!ids || n <= 0)
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT,
                        "clh_clip_encode_text: no token ids (n = %d)", n);
    if (context <= 0 || context > m->cfg.max_positions)
        return clh_fail(ctx, CLH_ERR_TOO_LONG,
                        "clh_clip_encode_text: context length %d outside 1..%d (the model's "
                        "position embeddings)",
                        context, m->cfg.max_positions);
    for (size_t i = 0; i < (size_t)n * (size_t)context; i++)
        if (ids[i] < 0 || ids[i] >= m->cfg.vocab_size)
            return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT,
                            "clh_clip_encode_text: token id %d (row %zu, position %zu) outside "
                            "the vocabulary 0..%d",
                            ids[i], i / (size_t)context, i % (size_t)context,
                            m->cfg.vocab_size - 1);
    return CLH_OK;
}

static clh_status encode_text_body(clh_clip *m, clip_scratch *s, const int32_t *ids, int n,
                                   int context, int32_t *pool_rows, clh_tensor **features,
                                   clip_tower_tape *tape) {
    clh_ctx *ctx = m->ctx;
    const clh_clip_tower_config *t = &m->cfg.text;
    int64_t rows = (int64_t)n * context, pos_shape[2] = {context, t->hidden};
    clh_tensor *x, *x2, *pos, *pooled, *h;
    CLH_TRY(tape_begin(ctx, tape, t->layers));
    CLH_TRY(clip_ws3(ctx, s, n, context, t->hidden, &x));
    CLH_TRY(clip_as2(ctx, s, x, &x2));
    CLH_TRY(clh_embedding(ctx, ids, (size_t)rows, m->tok_emb, x2));
    CLH_TRY(clh_tensor_view(m->txt_pos, 0, 2, pos_shape, &pos));
    CLH_TRY(clip_keep(ctx, s, pos));
    CLH_TRY(clh_add_rows(ctx, x, pos));
    for (int l = 0; l < t->layers; l++)
        CLH_TRY(run_block(ctx, m->txt_layers, t, l, x, 1, tape));
    /* Layer norm is per row, so pool first and normalise only the pooled rows. */
    CLH_TRY(clip_ws2(ctx, s, n, t->hidden, &pooled));
    CLH_TRY(clip_ws2(ctx, s, n, t->hidden, &h));
    CLH_TRY(clh_gather_rows(ctx, x2, pool_rows, (size_t)n, pooled));
    TAPE_KEEP(tape, pooled, pooled);
    CLH_TRY(clh_layer_norm(ctx, pooled, m->final_ln_w, m->final_ln_b, t->eps, h));
    int64_t out_shape[2] = {n, m->cfg.projection_dim};
    CLH_TRY(clh_tensor_new(ctx, 2, out_shape, features));
    return clh_linear(ctx, h, m->txt_proj, NULL, *features);
}

clh_status clip_encode_text_taped(clh_clip *m, const int32_t *ids, int n, int context,
                                  clh_tensor **features, clip_tower_tape *tape) {
    if (!m || !features)
        return clh_fail(m ? m->ctx : NULL, CLH_ERR_INVALID_ARGUMENT,
                        "clh_clip_encode_text: NULL argument");
    *features = NULL;
    CLH_TRY(check_text_request(m, ids, n, context));
    int32_t *pool_rows = malloc((size_t)n * sizeof *pool_rows);
    if (!pool_rows)
        return clh_fail(m->ctx, CLH_ERR_OUT_OF_MEMORY, "clh_clip_encode_text: out of memory");
    for (int i = 0; i < n; i++)
        pool_rows[i] = i * context + pool_position(&m->cfg, ids + (size_t)i * context, context);
    int record = tape && tape->record;
    size_t mark = clh_ws_mark(m->ctx);
    clip_scratch s = {0};
    clh_status st = encode_text_body(m, &s, ids, n, context, pool_rows, features, tape);
    clip_release_all(&s);
    if (!record || st != CLH_OK)
        clh_ws_reset(m->ctx, mark);
    if (st == CLH_OK && record) {
        tape->pool_rows = pool_rows; /* the tape owns them now */
        tape->n_pool = n;
        tape->n = n;
        tape->len = context;
        pool_rows = NULL;
    }
    free(pool_rows);
    if (st != CLH_OK) {
        clh_tensor_release(*features);
        *features = NULL;
        if (record)
            clip_tower_tape_release(tape);
    }
    return st;
}

clh_status clh_clip_encode_text(clh_clip *m, const int32_t *ids, int n, int context,
                                clh_tensor **features) {
    return clip_encode_text_taped(m, ids, n, context, features, NULL);
}
