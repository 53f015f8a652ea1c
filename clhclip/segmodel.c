/*
 * Segmentation model = CLIP + H-CLIP adapters + CAT-Seg head (segmodel.h): prompts and the
 * text cache, the training step, sliding-window inference, checkpoints and export.
 */
#include <cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "cathead_internal.h"
#include "segmodel.h"

#define META_KEY "segmodel"

struct clh_segmodel {
    clh_ctx *ctx;
    clh_clip *clip;
    clh_hclip *hclip;
    clh_cathead *head;
    clh_segmodel_options opt;
    char *templates[CLH_SEG_MAX_PROMPTS];
    int n_templates;
    int32_t *ids; /* [T * P, context] */
    int n_classes, context;
    clh_tensor *text_cache; /* normalised text [T, P, D]; NULL when stale */
};

void clh_segmodel_options_default(clh_segmodel_options *o) {
    memset(o, 0, sizeof *o);
    o->image_size = 384;
    o->hooks[0] = o->hooks[1] = -1;
    o->seed = 0;
}

static void drop_text_cache(clh_segmodel *m) {
    clh_tensor_release(m->text_cache);
    m->text_cache = NULL;
}

static clh_status resolve_options(clh_clip *clip, const clh_segmodel_options *in,
                                  clh_segmodel_options *o) {
    const clh_clip_config *c = clh_clip_get_config(clip);
    *o = *in;
    if (o->image_size <= 0)
        o->image_size = 384;
    if (o->image_size % c->patch_size)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT,
                        "segmodel: image size %d is not a multiple of the patch size %d",
                        o->image_size, c->patch_size);
    int layers = c->vision.layers;
    if (o->hooks[0] < 0 || o->hooks[1] < 0) {
        o->hooks[0] = layers / 3 - 1 < 0 ? 0 : layers / 3 - 1;
        o->hooks[1] = 2 * layers / 3 - 1 < 0 ? 0 : 2 * layers / 3 - 1;
    }
    for (int i = 0; i < 2; i++)
        if (o->hooks[i] >= layers)
            return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT,
                            "segmodel: hook block %d is beyond the %d vision blocks", o->hooks[i],
                            layers);
    if (o->head.hidden == 0) {
        int prompts = o->head.n_prompts;
        clh_cathead_config_for_clip(c, &o->head);
        if (prompts > 0)
            o->head.n_prompts = prompts;
    }
    if (o->head.n_prompts < 1 || o->head.n_prompts > CLH_SEG_MAX_PROMPTS)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT,
                        "segmodel: head n_prompts %d must be in 1..%d", o->head.n_prompts,
                        CLH_SEG_MAX_PROMPTS);
    if (o->head.d_img != c->projection_dim || o->head.d_vis != c->vision.hidden)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT,
                        "segmodel: head widths d_img %d / d_vis %d do not match the CLIP "
                        "projection %d / vision width %d",
                        o->head.d_img, o->head.d_vis, c->projection_dim, c->vision.hidden);
    return CLH_OK;
}

clh_status clh_segmodel_new(clh_clip *clip, const clh_segmodel_options *options,
                            clh_segmodel **out) {
    *out = NULL;
    if (!clip)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "clh_segmodel_new: NULL CLIP");
    clh_segmodel_options defaults;
    clh_segmodel_options_default(&defaults);
    clh_segmodel *m = calloc(1, sizeof *m);
    if (!m)
        return clh_fail(NULL, CLH_ERR_OUT_OF_MEMORY, "clh_segmodel_new: out of host memory");
    m->ctx = clh_clip_ctx(clip);
    m->clip = clip;
    clh_status st = resolve_options(clip, options ? options : &defaults, &m->opt);
    if (st == CLH_OK)
        st = clh_hclip_new(clip, &m->opt.adapter, &m->hclip);
    if (st == CLH_OK)
        st = clh_cathead_new(m->ctx, &m->opt.head, m->opt.seed, &m->head);
    const char *def = CLH_SEG_DEFAULT_TEMPLATE;
    if (st == CLH_OK && m->opt.head.n_prompts == 1)
        st = clh_segmodel_set_templates(m, &def, 1);
    if (st != CLH_OK) {
        clh_segmodel_free(m);
        return st;
    }
    *out = m;
    return CLH_OK;
}

void clh_segmodel_free(clh_segmodel *m) {
    if (!m)
        return;
    drop_text_cache(m);
    clh_cathead_free(m->head);
    clh_hclip_free(m->hclip);
    for (int i = 0; i < m->n_templates; i++)
        free(m->templates[i]);
    free(m->ids);
    free(m);
}

clh_hclip *clh_segmodel_hclip(clh_segmodel *m) {
    return m->hclip;
}

clh_cathead *clh_segmodel_head(clh_segmodel *m) {
    return m->head;
}

const clh_segmodel_options *clh_segmodel_get_options(const clh_segmodel *m) {
    return &m->opt;
}

int clh_segmodel_num_classes(const clh_segmodel *m) {
    return m ? m->n_classes : 0;
}

clh_status clh_segmodel_update(clh_segmodel *m) {
    drop_text_cache(m);
    return clh_hclip_update(m->hclip);
}

/* ------------------------------------------------------------------ prompts */

clh_status clh_segmodel_set_templates(clh_segmodel *m, const char *const *templates, int n) {
    if (!m || !templates)
        return clh_fail(m ? m->ctx : NULL, CLH_ERR_INVALID_ARGUMENT,
                        "segmodel: set_templates needs a model and templates");
    if (n != m->opt.head.n_prompts || n > CLH_SEG_MAX_PROMPTS)
        return clh_fail(m->ctx, CLH_ERR_INVALID_ARGUMENT,
                        "segmodel: %d prompt templates given, the head takes %d", n,
                        m->opt.head.n_prompts);
    for (int i = 0; i < n; i++)
        if (!templates[i] || !strstr(templates[i], "{}"))
            return clh_fail(m->ctx, CLH_ERR_INVALID_ARGUMENT,
                            "segmodel: prompt template %d ('%s') has no '{}' for the class name", i,
                            templates[i] ? templates[i] : "(null)");
    for (int i = 0; i < m->n_templates; i++)
        free(m->templates[i]);
    m->n_templates = 0;
    for (int i = 0; i < n; i++) {
        m->templates[i] = strdup(templates[i]);
        if (!m->templates[i])
            return clh_fail(m->ctx, CLH_ERR_OUT_OF_MEMORY, "segmodel: out of host memory");
        m->n_templates++;
    }
    m->n_classes = 0; /* the prompts must be made again */
    drop_text_cache(m);
    return CLH_OK;
}

/* template with "{}" replaced by the first synonym of name (text before ", "). */
static char *make_prompt(const char *templ, const char *name) {
    const char *comma = strstr(name, ", ");
    size_t nlen = comma ? (size_t)(comma - name) : strlen(name);
    const char *slot = strstr(templ, "{}");
    size_t pre = (size_t)(slot - templ), len = strlen(templ) - 2 + nlen;
    char *s = malloc(len + 1);
    if (!s)
        return NULL;
    memcpy(s, templ, pre);
    memcpy(s + pre, name, nlen);
    strcpy(s + pre + nlen, slot + 2);
    return s;
}

/* Keep only the first `used` columns of the [rows, context] ids, used = 1 + the last
 * end-of-text position over all rows. Exact: CLIP's text attention is causal, so the
 * features at the end-of-text token (where both HF poolings read) do not depend on the
 * padding after it. Prompts are short (about 10 of 77 tokens), so the text tower, which
 * runs on every class at every training step, costs that much less time and memory. */
static int trim_context(int32_t *ids, int rows, int context, int32_t eot) {
    int used = 1;
    for (int r = 0; r < rows; r++) {
        int found = 0;
        for (int j = context - 1; j >= 0 && !found; j--)
            if (ids[(size_t)r * context + j] == eot) {
                used = j + 1 > used ? j + 1 : used;
                found = 1;
            }
        if (!found)
            return context; /* not a CLIP-tokenised row: keep everything */
    }
    for (int r = 0; r < rows; r++) /* compact in place, row by row (rows only shrink) */
        memmove(ids + (size_t)r * used, ids + (size_t)r * context, (size_t)used * sizeof *ids);
    return used;
}

clh_status clh_segmodel_set_classes(clh_segmodel *m, clh_tokenizer *tok, const char *const *names,
                                    int n) {
    if (!tok || !names || n < 1)
        return clh_fail(m->ctx, CLH_ERR_INVALID_ARGUMENT,
                        "segmodel: set_classes needs a tokenizer and at least one class name");
    int ctxlen = clh_clip_get_config(m->clip)->max_positions, p = m->n_templates;
    if (p < 1)
        return clh_fail(m->ctx, CLH_ERR_INVALID_ARGUMENT, "segmodel: no prompt templates set");
    int32_t *ids = malloc((size_t)n * p * ctxlen * sizeof *ids);
    if (!ids)
        return clh_fail(m->ctx, CLH_ERR_OUT_OF_MEMORY, "segmodel: out of host memory");
    for (int t = 0; t < n; t++) {
        if (!names[t] || !*names[t]) {
            free(ids);
            return clh_fail(m->ctx, CLH_ERR_INVALID_ARGUMENT,
                            "segmodel: class %d has an empty "
                            "name",
                            t);
        }
        for (int j = 0; j < p; j++) {
            char *prompt = make_prompt(m->templates[j], names[t]);
            clh_status st =
                prompt ? clh_tokenize(tok, prompt, ctxlen, 0, ids + ((size_t)t * p + j) * ctxlen)
                       : clh_fail(m->ctx, CLH_ERR_OUT_OF_MEMORY, "segmodel: OOM");
            if (st != CLH_OK) {
                char msg[1024];
                snprintf(msg, sizeof msg, "%s", clh_last_error());
                free(prompt);
                free(ids);
                return clh_fail(m->ctx, st, "segmodel: class %d ('%s'): %s", t, names[t], msg);
            }
            free(prompt);
        }
    }
    free(m->ids);
    m->ids = ids;
    m->n_classes = n;
    m->context = trim_context(ids, n * p, ctxlen, clh_tokenizer_eot(tok));
    drop_text_cache(m);
    return CLH_OK;
}

/* ------------------------------------------------------------------ forward */

static clh_image_request image_request(const clh_segmodel *m) {
    return (clh_image_request){
        .want_dense = 1, .dense_last_layer = 1, .n_hooks = 2, .hooks = m->opt.hooks};
}

static clh_status need_classes(clh_segmodel *m) {
    if (m->n_classes < 1)
        return clh_fail(m->ctx, CLH_ERR_INVALID_ARGUMENT,
                        "segmodel: no class names set (set_classes first)");
    return CLH_OK;
}

/* The normalised text of all prompts [T, P, D], computed once per vocabulary. */
static clh_status cached_text(clh_segmodel *m) {
    if (m->text_cache)
        return CLH_OK;
    CLH_TRY(need_classes(m));
    clh_tensor *raw = NULL;
    int rows = m->n_classes * m->n_templates;
    CLH_TRY(clh_hclip_forward(m->hclip, 0, NULL, NULL, NULL, m->ids, rows, m->context, &raw));
    int64_t d = clh_tensor_dim(raw, 1);
    clh_status st = clh_tensor_new(m->ctx, DIMS(m->n_classes, m->n_templates, d), &m->text_cache);
    if (st == CLH_OK)
        st = clh_l2_normalize(m->ctx, raw, RS(m->text_cache, rows, d));
    clh_tensor_release(raw);
    if (st != CLH_OK)
        drop_text_cache(m);
    return st;
}

clh_status clh_segmodel_logits(clh_segmodel *m, const clh_tensor *pixels, clh_tensor **logits) {
    if (!m || !pixels || !logits)
        return clh_fail(m ? m->ctx : NULL, CLH_ERR_INVALID_ARGUMENT,
                        "clh_segmodel_logits: NULL argument");
    *logits = NULL;
    CLH_TRY(cached_text(m));
    clh_image_request req = image_request(m);
    clh_image_outputs img;
    memset(&img, 0, sizeof img);
    CLH_TRY(clh_hclip_forward(m->hclip, 0, pixels, &req, &img, NULL, 0, 0, NULL));
    clh_cathead_inputs in = {.dense = img.dense,
                             .hooks = {img.hooks[0], img.hooks[1]},
                             .text = m->text_cache,
                             .pool = 1};
    clh_status st = clh_cathead_forward(m->head, 0, &in, logits);
    clh_image_outputs_release(&img);
    return st;
}

/* ------------------------------------------------------------------ training */

/* Head forward + loss + backward for image b of the batch; gradients into the views. */
static clh_status train_image(clh_segmodel *m, const clh_image_outputs *img, const clh_tensor *text,
                              int b, int batch, const int32_t *labels,
                              const clh_seg_train_options *o, clh_tensor *d_dense,
                              clh_tensor *const d_hooks[2], clh_tensor *d_text, double *loss) {
    int64_t rows = clh_tensor_dim(img->dense, 1), dp = clh_tensor_dim(img->dense, 2);
    int64_t dv = clh_tensor_dim(img->hooks[0], 2);
    int size = m->opt.image_size;
    size_t off_d = (size_t)(b * rows * dp), off_v = (size_t)(b * rows * dv);
    clh_cathead_inputs in = {
        .dense = PART(img->dense, off_d, 1, rows, dp),
        .hooks = {PART(img->hooks[0], off_v, 1, rows, dv), PART(img->hooks[1], off_v, 1, rows, dv)},
        .text = text,
        .pool = o->pool};
    clh_tensor *logits = NULL, *d_logits = NULL;
    double l = 0;
    CLH_TRY(clh_cathead_forward(m->head, 1, &in, &logits));
    clh_status st = clh_tensor_new(m->ctx, logits->ndim, logits->shape, &d_logits);
    if (st == CLH_OK)
        st = clh_seg_loss(m->ctx, logits, labels + (size_t)b * size * size, size, size, &o->loss,
                          &l, d_logits);
    if (st == CLH_OK)
        st = clh_scale(m->ctx, d_logits, 1.0f / (float)batch);
    clh_tensor *dh[2] = {PART(d_hooks[0], off_v, 1, rows, dv),
                         PART(d_hooks[1], off_v, 1, rows, dv)};
    if (st == CLH_OK)
        st = clh_cathead_backward(m->head, d_logits, PART(d_dense, off_d, 1, rows, dp), dh, d_text);
    else
        clh_cathead_discard(m->head);
    clh_tensor_release(logits);
    clh_tensor_release(d_logits);
    *loss += l / batch;
    return st;
}

static clh_status zeros_like(clh_ctx *ctx, const clh_tensor *t, clh_tensor **out) {
    CLH_TRY(clh_tensor_new(ctx, t->ndim, t->shape, out));
    return clh_tensor_fill(*out, 0.0f);
}

typedef struct train_bufs {
    clh_tensor *px, *textn, *d_dense, *d_hooks[2], *d_textn, *d_text_b, *d_text;
} train_bufs;

static clh_status train_core(clh_segmodel *m, const float *pixels, const int32_t *labels, int batch,
                             const clh_seg_train_options *o, train_bufs *t, clh_image_outputs *img,
                             clh_tensor **raw, double *loss) {
    int size = m->opt.image_size, rows = m->n_classes * m->n_templates;
    CLH_TRY(clh_tensor_from_host(m->ctx, DIMS(batch, 3, size, size), pixels, &t->px));
    clh_image_request req = image_request(m);
    CLH_TRY(clh_hclip_forward(m->hclip, 1, t->px, &req, img, m->ids, rows, m->context, raw));
    int64_t d = clh_tensor_dim(*raw, 1);
    CLH_TRY(clh_tensor_new(m->ctx, DIMS(m->n_classes, m->n_templates, d), &t->textn));
    CLH_TRY(clh_l2_normalize(m->ctx, *raw, RS(t->textn, rows, d)));
    CLH_TRY(zeros_like(m->ctx, img->dense, &t->d_dense));
    for (int i = 0; i < 2; i++)
        CLH_TRY(zeros_like(m->ctx, img->hooks[i], &t->d_hooks[i]));
    CLH_TRY(zeros_like(m->ctx, t->textn, &t->d_textn));
    CLH_TRY(zeros_like(m->ctx, t->textn, &t->d_text_b));
    CLH_TRY(zeros_like(m->ctx, *raw, &t->d_text));
    *loss = 0;
    for (int b = 0; b < batch; b++) {
        CLH_TRY(train_image(m, img, t->textn, b, batch, labels, o, t->d_dense, t->d_hooks,
                            t->d_text_b, loss));
        CLH_TRY(clh_add(m->ctx, t->d_textn, t->d_text_b, t->d_textn));
    }
    CLH_TRY(clh_l2_normalize_backward(m->ctx, *raw, RS(t->d_textn, rows, d), t->d_text));
    return clh_hclip_backward(m->hclip, NULL, t->d_dense, (const clh_tensor *const *)t->d_hooks,
                              t->d_text);
}

clh_status clh_segmodel_train_step(clh_segmodel *m, const float *pixels, const int32_t *labels,
                                   int batch, const clh_seg_train_options *options, double *loss) {
    if (!m || !pixels || !labels || !loss || batch < 1)
        return clh_fail(m ? m->ctx : NULL, CLH_ERR_INVALID_ARGUMENT,
                        "clh_segmodel_train_step: NULL argument or empty batch");
    CLH_TRY(need_classes(m));
    clh_seg_train_options o =
        options ? *options : (clh_seg_train_options){.pool = 2, .loss = {255, 0}};
    int size = m->opt.image_size;
    for (size_t i = 0; i < (size_t)batch * size * size; i++)
        if (labels[i] != o.loss.ignore_label && (labels[i] < 0 || labels[i] >= m->n_classes))
            return clh_fail(m->ctx, CLH_ERR_INVALID_ARGUMENT,
                            "clh_segmodel_train_step: label %d at pixel %zu of the batch is "
                            "outside [0, %d) and not the ignore label %d",
                            labels[i], i, m->n_classes, o.loss.ignore_label);
    drop_text_cache(m);
    train_bufs t;
    memset(&t, 0, sizeof t);
    clh_image_outputs img;
    memset(&img, 0, sizeof img);
    clh_tensor *raw = NULL;
    clh_status st = train_core(m, pixels, labels, batch, &o, &t, &img, &raw, loss);
    if (st != CLH_OK) {
        clh_hclip_discard(m->hclip);
        clh_cathead_discard(m->head);
    }
    ch_release_slots((clh_tensor **)&t, sizeof t / sizeof(clh_tensor *));
    clh_image_outputs_release(&img);
    clh_tensor_release(raw);
    return st;
}

/* ------------------------------------------------------------------ parameters */

int clh_segmodel_num_params(const clh_segmodel *m) {
    return clh_hclip_num_params(m->hclip) + clh_cathead_num_params(m->head);
}

clh_status clh_segmodel_param(clh_segmodel *m, int i, const char **name, clh_tensor **param,
                              clh_tensor **grad, int *is_clip, int *no_decay) {
    int na = clh_hclip_num_params(m->hclip);
    if (is_clip)
        *is_clip = i < na;
    if (no_decay)
        *no_decay = i >= na && clh_cathead_param_no_decay(m->head, i - na);
    if (i < na)
        return clh_hclip_param(m->hclip, i, name, param, grad);
    return clh_cathead_param(m->head, i - na, name, param, grad);
}

clh_status clh_segmodel_zero_grad(clh_segmodel *m) {
    CLH_TRY(clh_hclip_zero_grad(m->hclip));
    return clh_cathead_zero_grad(m->head);
}

/* ------------------------------------------------------------------ inference */

/* Bilinear sampling positions of torch interpolate(align_corners=False). */
typedef struct taps {
    int *i0, *i1;
    float *l;
} taps;

static clh_status make_taps(int in, int out, taps *t) {
    t->i0 = malloc((size_t)out * sizeof *t->i0);
    t->i1 = malloc((size_t)out * sizeof *t->i1);
    t->l = malloc((size_t)out * sizeof *t->l);
    if (!t->i0 || !t->i1 || !t->l)
        return clh_fail(NULL, CLH_ERR_OUT_OF_MEMORY, "segmodel: out of host memory");
    double scale = (double)in / out;
    for (int o = 0; o < out; o++) {
        double src = (o + 0.5) * scale - 0.5;
        if (src < 0)
            src = 0;
        int i0 = (int)src;
        if (i0 > in - 1)
            i0 = in - 1;
        t->i0[o] = i0;
        t->i1[o] = i0 < in - 1 ? i0 + 1 : i0;
        t->l[o] = (float)(src - i0);
    }
    return CLH_OK;
}

static void free_taps(taps *t) {
    free(t->i0);
    free(t->i1);
    free(t->l);
}

static inline float sample(const float *p, int w, const taps *ty, const taps *tx, int y, int x) {
    int y0 = ty->i0[y], y1 = ty->i1[y], x0 = tx->i0[x], x1 = tx->i1[x];
    float ly = ty->l[y], lx = tx->l[x];
    float top = p[(size_t)y0 * w + x0] * (1 - lx) + p[(size_t)y0 * w + x1] * lx;
    float bot = p[(size_t)y1 * w + x0] * (1 - lx) + p[(size_t)y1 * w + x1] * lx;
    return top * (1 - ly) + bot * ly;
}

/* planes [n, h, w] -> out [n, oh, ow] (bilinear, align_corners = False). */
static clh_status resize_planes(const float *in, int n, int h, int w, float *out, int oh, int ow) {
    taps ty = {0}, tx = {0};
    clh_status st = make_taps(h, oh, &ty);
    if (st == CLH_OK)
        st = make_taps(w, ow, &tx);
    for (int c = 0; st == CLH_OK && c < n; c++)
        for (int y = 0; y < oh; y++)
            for (int x = 0; x < ow; x++)
                out[((size_t)c * oh + y) * ow + x] =
                    sample(in + (size_t)c * h * w, w, &ty, &tx, y, x);
    free_taps(&ty);
    free_taps(&tx);
    return st;
}

/* Normalised CHW planes of an RGB image (CLIP mean/std). */
static float *normalised_chw(const clh_image *img) {
    size_t plane = (size_t)img->width * img->height;
    float *x = malloc(3 * plane * sizeof *x);
    if (!x)
        return NULL;
    for (size_t i = 0; i < plane; i++)
        for (int c = 0; c < 3; c++)
            x[c * plane + i] = (img->data[i * 3 + c] - CLH_CLIP_MEAN[c]) / CLH_CLIP_STD[c];
    return x;
}

/* Sigmoid scores [T, S, S] of one S x S normalised crop. */
static clh_status crop_scores(clh_segmodel *m, const float *crop, float *scores) {
    int size = m->opt.image_size, t = m->n_classes;
    clh_tensor *px = NULL, *logits = NULL, *up = NULL;
    clh_status st = clh_tensor_from_host(m->ctx, DIMS(1, 3, size, size), crop, &px);
    if (st == CLH_OK)
        st = clh_segmodel_logits(m, px, &logits);
    if (st == CLH_OK)
        st = clh_tensor_new(m->ctx, DIMS(t, 1, size, size), &up);
    if (st == CLH_OK)
        st = clh_bilinear_resize_forward(
            m->ctx, RS(logits, t, 1, clh_tensor_dim(logits, 2), clh_tensor_dim(logits, 3)), 0, up);
    if (st == CLH_OK)
        st = clh_tensor_download(up, scores, (size_t)t * size * size);
    for (size_t i = 0; st == CLH_OK && i < (size_t)t * size * size; i++)
        scores[i] = 1.0f / (1.0f + expf(-scores[i]));
    clh_tensor_release(px);
    clh_tensor_release(logits);
    clh_tensor_release(up);
    return st;
}

/* Copy the S x S window at (x0, y0) of planes [3, r, r]. */
static void cut_crop(const float *big, int r, int size, int x0, int y0, float *crop) {
    for (int c = 0; c < 3; c++)
        for (int y = 0; y < size; y++)
            memcpy(crop + ((size_t)c * size + y) * size, big + ((size_t)c * r + y0 + y) * r + x0,
                   (size_t)size * sizeof *crop);
}

/* Spec 5.7 on the big (r x r) view: average of the overlapping crops, then the mean with
 * the global view; result in acc [T, r, r]. */
static clh_status sliding_scores(clh_segmodel *m, const float *big, int r, const float *global,
                                 float *acc, float *scores) {
    int size = m->opt.image_size, t = m->n_classes;
    /* the released int(S (1 - 0.333)): 256 for 384; capped so that the last crop ends at the
     * border for sizes where rounding would leave a strip uncovered */
    int stride = (int)(size * (1.0 - 0.333));
    if (r > size && stride > r - size)
        stride = r - size;
    size_t rr = (size_t)r * r;
    float *count = calloc(rr, sizeof *count), *crop = malloc((size_t)3 * size * size * 4);
    if (!count || !crop) {
        free(count);
        free(crop);
        return clh_fail(m->ctx, CLH_ERR_OUT_OF_MEMORY, "segmodel: out of host memory");
    }
    clh_status st = CLH_OK;
    memset(acc, 0, (size_t)t * rr * sizeof *acc);
    for (int y0 = 0; st == CLH_OK && y0 + size <= r; y0 += stride)
        for (int x0 = 0; st == CLH_OK && x0 + size <= r; x0 += stride) {
            cut_crop(big, r, size, x0, y0, crop);
            st = crop_scores(m, crop, scores);
            for (int c = 0; st == CLH_OK && c < t; c++)
                for (int y = 0; y < size; y++)
                    for (int x = 0; x < size; x++)
                        acc[(size_t)c * rr + (size_t)(y0 + y) * r + x0 + x] +=
                            scores[((size_t)c * size + y) * size + x];
            for (int y = 0; st == CLH_OK && y < size; y++)
                for (int x = 0; x < size; x++)
                    count[(size_t)(y0 + y) * r + x0 + x] += 1;
        }
    if (st == CLH_OK)
        st = crop_scores(m, global, scores);
    float *g = st == CLH_OK ? malloc((size_t)t * rr * sizeof *g) : NULL;
    if (st == CLH_OK && !g)
        st = clh_fail(m->ctx, CLH_ERR_OUT_OF_MEMORY, "segmodel: out of host memory");
    if (st == CLH_OK)
        st = resize_planes(scores, t, size, size, g, r, r);
    for (size_t i = 0; st == CLH_OK && i < (size_t)t * rr; i++) {
        float n = count[i % rr];
        acc[i] = ((n > 0 ? acc[i] / n : 0) + g[i]) * 0.5f;
    }
    free(g);
    free(count);
    free(crop);
    return st;
}

/* labels[y, x] = argmax_c of the bilinear resize of maps [T, h, w] to the image size. */
static clh_status argmax_resized(const float *maps, int t, int h, int w, int oh, int ow,
                                 int32_t *labels, float *scores) {
    taps ty = {0}, tx = {0};
    clh_status st = make_taps(h, oh, &ty);
    if (st == CLH_OK)
        st = make_taps(w, ow, &tx);
    for (int y = 0; st == CLH_OK && y < oh; y++)
        for (int x = 0; x < ow; x++) {
            int best = 0;
            float best_v = -INFINITY;
            for (int c = 0; c < t; c++) {
                float v = sample(maps + (size_t)c * h * w, w, &ty, &tx, y, x);
                if (v > best_v) {
                    best_v = v;
                    best = c;
                }
            }
            labels[(size_t)y * ow + x] = best;
        }
    for (int c = 0; st == CLH_OK && scores && c < t; c++) {
        float mx = 0;
        for (size_t i = 0; i < (size_t)h * w; i++)
            mx = fmaxf(mx, maps[(size_t)c * h * w + i]);
        scores[c] = mx;
    }
    free_taps(&ty);
    free_taps(&tx);
    return st;
}

static clh_status predict_core(clh_segmodel *m, const clh_image *image, int sliding, float *full,
                               float **bufs, int32_t *labels, float *scores) {
    int size = m->opt.image_size, t = m->n_classes, r = size * 5 / 3;
    float *global = bufs[0], *crop_scores_buf = bufs[1], *big = bufs[2], *acc = bufs[3];
    CLH_TRY(resize_planes(full, 3, image->height, image->width, global, size, size));
    if (!sliding) {
        CLH_TRY(crop_scores(m, global, crop_scores_buf));
        return argmax_resized(crop_scores_buf, t, size, size, image->height, image->width, labels,
                              scores);
    }
    CLH_TRY(resize_planes(full, 3, image->height, image->width, big, r, r));
    CLH_TRY(sliding_scores(m, big, r, global, acc, crop_scores_buf));
    return argmax_resized(acc, t, r, r, image->height, image->width, labels, scores);
}

clh_status clh_segmodel_predict(clh_segmodel *m, const clh_image *image,
                                const clh_seg_predict_options *options, int32_t *labels,
                                float *scores) {
    if (!m || !image || !image->data || !labels || image->width < 1 || image->height < 1)
        return clh_fail(m ? m->ctx : NULL, CLH_ERR_INVALID_ARGUMENT,
                        "clh_segmodel_predict: NULL or empty argument");
    CLH_TRY(cached_text(m));
    int sliding = options ? options->sliding : 1;
    size_t size = (size_t)m->opt.image_size, t = (size_t)m->n_classes, r = size * 5 / 3;
    size_t counts[4] = {3 * size * size, t * size * size, sliding ? 3 * r * r : 1,
                        sliding ? t * r * r : 1};
    float *bufs[4] = {0}, *full = normalised_chw(image);
    clh_status st = full ? CLH_OK : clh_fail(m->ctx, CLH_ERR_OUT_OF_MEMORY, "segmodel: OOM");
    for (int i = 0; st == CLH_OK && i < 4; i++)
        if (!(bufs[i] = malloc(counts[i] * sizeof(float))))
            st = clh_fail(m->ctx, CLH_ERR_OUT_OF_MEMORY,
                          "segmodel: out of host memory for %zu scores", counts[i]);
    if (st == CLH_OK)
        st = predict_core(m, image, sliding, full, bufs, labels, scores);
    for (int i = 0; i < 4; i++)
        free(bufs[i]);
    free(full);
    return st;
}

/* ------------------------------------------------------------------ checkpoints */

static char *templates_json(const clh_segmodel *m) {
    cJSON *templ = cJSON_CreateArray();
    for (int i = 0; i < m->n_templates; i++)
        cJSON_AddItemToArray(templ, cJSON_CreateString(m->templates[i]));
    char *s = cJSON_PrintUnformatted(templ);
    cJSON_Delete(templ);
    return s;
}

/* The configuration a checkpoint must match (prompt templates may change at inference). */
static cJSON *options_json(const clh_segmodel *m) {
    const clh_cathead_config *h = &m->opt.head;
    cJSON *root = cJSON_CreateObject(), *head = cJSON_AddObjectToObject(root, "head");
    cJSON_AddNumberToObject(root, "image_size", m->opt.image_size);
    cJSON_AddItemToObject(root, "hooks", cJSON_CreateIntArray(m->opt.hooks, 2));
    const struct {
        const char *k;
        int v;
    } ints[] = {{"d_img", h->d_img},         {"d_vis", h->d_vis},
                {"n_prompts", h->n_prompts}, {"hidden", h->hidden},
                {"heads", h->heads},         {"appearance_proj", h->appearance_proj},
                {"text_proj", h->text_proj}, {"gn_group_size", h->gn_group_size},
                {"window", h->window},       {"pad_len", h->pad_len},
                {"mlp_ratio", h->mlp_ratio}, {"n_layers", h->n_layers}};
    for (size_t i = 0; i < sizeof ints / sizeof *ints; i++)
        cJSON_AddNumberToObject(head, ints[i].k, ints[i].v);
    cJSON_AddItemToObject(head, "guidance_up", cJSON_CreateIntArray(h->guidance_up, 2));
    cJSON_AddItemToObject(head, "decoder_guidance_proj",
                          cJSON_CreateIntArray(h->decoder_guidance_proj, 2));
    cJSON_AddItemToObject(head, "decoder", cJSON_CreateIntArray(h->decoder, 2));
    return root;
}

typedef struct head_tensors {
    const char **names;
    clh_tensor **tensors;
    char *meta, *templ;
    const char *keys[2], *values[2];
} head_tensors;

static clh_status collect_head(clh_segmodel *m, head_tensors *ht, clh_ckpt_more *more) {
    int n = clh_cathead_num_params(m->head);
    ht->names = calloc((size_t)n, sizeof *ht->names);
    ht->tensors = calloc((size_t)n, sizeof *ht->tensors);
    cJSON *j = options_json(m);
    ht->meta = j ? cJSON_PrintUnformatted(j) : NULL;
    ht->templ = templates_json(m);
    cJSON_Delete(j);
    if (!ht->names || !ht->tensors || !ht->meta || !ht->templ)
        return clh_fail(m->ctx, CLH_ERR_OUT_OF_MEMORY, "segmodel: out of host memory");
    for (int i = 0; i < n; i++)
        CLH_TRY(clh_cathead_param(m->head, i, &ht->names[i], &ht->tensors[i], NULL));
    ht->keys[0] = META_KEY;
    ht->values[0] = ht->meta;
    ht->keys[1] = "templates";
    ht->values[1] = ht->templ;
    *more = (clh_ckpt_more){n, ht->names, ht->tensors, 2, ht->keys, ht->values};
    return CLH_OK;
}

static void free_head_tensors(head_tensors *ht) {
    free(ht->names);
    free(ht->tensors);
    cJSON_free(ht->meta);
    cJSON_free(ht->templ);
}

clh_status clh_segmodel_save(clh_segmodel *m, clh_adamw *opt, const clh_train_state *state,
                             const char *extra_json, const char *path) {
    head_tensors ht = {0};
    clh_ckpt_more more;
    clh_status st = collect_head(m, &ht, &more);
    if (st == CLH_OK)
        st = clh_hclip_save_checkpoint_more(m->hclip, opt, state, extra_json, &more, path);
    free_head_tensors(&ht);
    return st;
}

clh_status clh_segmodel_load(clh_segmodel *m, clh_adamw *opt, clh_train_state *state,
                             const char *path) {
    head_tensors ht = {0};
    clh_ckpt_more more;
    clh_st_file *f = NULL;
    clh_status st = clh_st_open(path, &f);
    if (st == CLH_OK)
        st = collect_head(m, &ht, &more);
    if (st == CLH_OK) {
        const char *theirs = clh_st_metadata(f, META_KEY);
        if (!theirs || strcmp(theirs, ht.meta) != 0)
            st = clh_fail(m->ctx, CLH_ERR_INVALID_ARGUMENT,
                          "checkpoint '%s' has segmentation configuration %s, the model is "
                          "configured as %s",
                          path, theirs ? theirs : "(none: not a segmentation checkpoint)", ht.meta);
    }
    clh_st_close(f);
    if (st == CLH_OK)
        st = clh_hclip_load_checkpoint_more(m->hclip, opt, state, &more, path);
    free_head_tensors(&ht);
    drop_text_cache(m);
    return st;
}

static int json_int(const cJSON *o, const char *key, int def) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsNumber(v) ? v->valueint : def;
}

static void json_pair(const cJSON *o, const char *key, int *out) {
    const cJSON *a = cJSON_GetObjectItemCaseSensitive(o, key);
    for (int i = 0; i < 2 && cJSON_IsArray(a); i++) {
        const cJSON *v = cJSON_GetArrayItem(a, i);
        if (cJSON_IsNumber(v))
            out[i] = v->valueint;
    }
}

static void parse_head(const cJSON *h, clh_cathead_config *c) {
    c->d_img = json_int(h, "d_img", 0);
    c->d_vis = json_int(h, "d_vis", 0);
    c->n_prompts = json_int(h, "n_prompts", 0);
    c->hidden = json_int(h, "hidden", 0);
    c->heads = json_int(h, "heads", 0);
    c->appearance_proj = json_int(h, "appearance_proj", 0);
    c->text_proj = json_int(h, "text_proj", 0);
    c->gn_group_size = json_int(h, "gn_group_size", 0);
    c->window = json_int(h, "window", 0);
    c->pad_len = json_int(h, "pad_len", 0);
    c->mlp_ratio = json_int(h, "mlp_ratio", 0);
    c->n_layers = json_int(h, "n_layers", 0);
    json_pair(h, "guidance_up", c->guidance_up);
    json_pair(h, "decoder_guidance_proj", c->decoder_guidance_proj);
    json_pair(h, "decoder", c->decoder);
}

static void parse_adapter(const char *json, clh_hclip_options *a) {
    cJSON *j = json ? cJSON_Parse(json) : NULL;
    if (!j)
        return;
    a->block_size = json_int(j, "block_size", a->block_size);
    a->ortho = (clh_ortho)json_int(j, "ortho", (int)a->ortho);
    a->no_modality_map = json_int(j, "no_modality_map", 0);
    a->no_layer_map = json_int(j, "no_layer_map", 0);
    cJSON_Delete(j);
}

clh_status clh_segmodel_checkpoint_options(const char *path, clh_segmodel_options *o,
                                           char **templates_out) {
    if (!path || !o)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT,
                        "clh_segmodel_checkpoint_options: NULL argument");
    if (templates_out)
        *templates_out = NULL;
    clh_st_file *f;
    CLH_TRY(clh_st_open(path, &f));
    const char *meta = clh_st_metadata(f, META_KEY);
    cJSON *j = meta ? cJSON_Parse(meta) : NULL;
    clh_status st = CLH_OK;
    if (!j) {
        st = clh_fail(NULL, CLH_ERR_FORMAT,
                      "'%s' is not a segmentation checkpoint (no '" META_KEY "' metadata)", path);
    } else {
        clh_segmodel_options_default(o);
        o->image_size = json_int(j, "image_size", 384);
        json_pair(j, "hooks", o->hooks);
        parse_head(cJSON_GetObjectItemCaseSensitive(j, "head"), &o->head);
        parse_adapter(clh_st_metadata(f, "config"), &o->adapter);
        const char *t = clh_st_metadata(f, "templates");
        if (templates_out && t && !(*templates_out = strdup(t)))
            st = clh_fail(NULL, CLH_ERR_OUT_OF_MEMORY, "segmodel: out of host memory");
    }
    cJSON_Delete(j);
    clh_st_close(f);
    return st;
}

clh_status clh_segmodel_export(clh_segmodel *m, const char *dir) {
    CLH_TRY(clh_hclip_export_folded(m->hclip, dir));
    char path[4096];
    if (snprintf(path, sizeof path, "%s/head.safetensors", dir) >= (int)sizeof path)
        return clh_fail(m->ctx, CLH_ERR_INVALID_ARGUMENT, "segmodel: export path too long");
    clh_st_writer *w;
    CLH_TRY(clh_st_writer_new(&w));
    cJSON *j = options_json(m);
    char *meta = j ? cJSON_PrintUnformatted(j) : NULL;
    cJSON_Delete(j);
    char *templ = templates_json(m);
    clh_status st = meta && templ ? clh_st_writer_set_metadata(w, META_KEY, meta)
                                  : clh_fail(m->ctx, CLH_ERR_OUT_OF_MEMORY, "segmodel: OOM");
    if (st == CLH_OK)
        st = clh_st_writer_set_metadata(w, "templates", templ);
    if (st == CLH_OK)
        st = clh_st_writer_set_metadata(w, "format", "clhclip-seghead");
    if (st == CLH_OK)
        st = clh_cathead_add_params(m->head, w);
    if (st == CLH_OK)
        st = clh_st_writer_save(w, path);
    cJSON_free(meta);
    cJSON_free(templ);
    clh_st_writer_free(w);
    return st;
}

/* Load the head parameters of a folded export's head.safetensors into m (the stored model
 * configuration must equal m's: heads, window, pad length, hooks change no shapes). */
clh_status clh_segmodel_load_head(clh_segmodel *m, const char *path) {
    clh_st_file *f;
    CLH_TRY(clh_st_open(path, &f));
    cJSON *j = options_json(m);
    char *mine = j ? cJSON_PrintUnformatted(j) : NULL;
    cJSON_Delete(j);
    const char *theirs = clh_st_metadata(f, META_KEY);
    clh_status st = CLH_OK;
    if (!mine)
        st = clh_fail(m->ctx, CLH_ERR_OUT_OF_MEMORY, "segmodel: out of host memory");
    else if (!theirs || strcmp(theirs, mine) != 0)
        st = clh_fail(m->ctx, CLH_ERR_INVALID_ARGUMENT,
                      "'%s' has segmentation configuration %s, the model is configured as %s", path,
                      theirs ? theirs : "(none)", mine);
    cJSON_free(mine);
    if (st == CLH_OK)
        st = clh_cathead_load_params(m->head, f);
    clh_st_close(f);
    drop_text_cache(m);
    return st;
}
