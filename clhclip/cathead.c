/*
 * CAT-Seg head: configuration, parameters, cost volume with top-k, guidance, decoder, the top
 * level forward/backward and the loss. The aggregator layers are in cathead_agg.c.
 *
 * Activations live in "slots": tensors owned by the head and reused by the next forward
 * of the same shape, so a training loop allocates nothing after its first step. Gradient
 * temporaries come from the context workspace and are released per stage.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "cathead_internal.h"

/* 32 tensors outside the aggregator + 50 per aggregator layer */
#define MAX_PARAMS (32 + 50 * CATHEAD_MAX_LAYERS)

typedef struct ch_named {
    char name[96];
    clh_tensor *w, *g;
    int no_decay; /* norms and pad tokens: no weight decay (detectron2 defaults) */
} ch_named;

typedef struct ch_dec_params {
    ch_pw up, conv1, gn1, conv2, gn2;
} ch_dec_params;

typedef struct ch_dec_tape {
    const clh_tensor *in; /* [N, Cin, H, W] (borrowed) */
    clh_tensor *u, *c, *c1, *g1, *r1, *c2, *g2, *r2;
} ch_dec_tape;

typedef struct ch_tape {
    clh_tensor *img_tok, *imgn, *res3, *textn, *corr_mm, *corr_all, *corr, *x0, *x;
    clh_tensor *app_pre, *app, *app_tok;
    clh_tensor *tsel, *tselp, *tmean, *tnorm, *tlin, *tg;
    clh_tensor *hook_tok[2], *hook_pl[2], *up[2], *decg_pre[2], *decg[2];
    clh_tensor *dec_in, *ext;
} ch_tape;

/* Tensors released by a lean (inference) forward, kept for the next allocation of the same
 * size: fresh buffers of hundreds of MB cost page faults on host-memory devices (PoCL),
 * which took seconds per image. Active only inside the head's own calls. */
#define BIN_CAPACITY 160
typedef struct ch_bin {
    clh_tensor *t[BIN_CAPACITY];
    int n;
} ch_bin;
static _Thread_local ch_bin *active_bin;

struct clh_cathead {
    clh_ctx *ctx;
    clh_cathead_config cfg;
    ch_named params[MAX_PARAMS];
    int n_params;
    clh_rng rng;

    ch_pw guidance_up[2], cost_embed, appearance_proj, text_proj, decoder_guidance_proj[2],
        out_conv;
    ch_layer_params layers[CATHEAD_MAX_LAYERS];
    ch_dec_params decoder[2];

    /* the last forward */
    ch_geom geom;
    int pending; /* a training forward waits for its backward */
    int lean;    /* inference forward: release activations as soon as they are used */
    int topk;
    clh_cathead_inputs in;
    int32_t *tok_index;  /* [B*S]: token rows of the inputs without the CLS rows */
    int32_t *text_index; /* [B*T]: text row of each kept (image, class) */
    int32_t *kept;       /* [B*T]: kept class ids per image */
    int32_t *logit_rows; /* [B*T_all]: row of ext for each output logit plane (top-k) */
    int32_t *kept_rows;  /* [B*T]: output row of each kept plane (top-k) */
    ch_tape t;
    ch_layer_tape lt[CATHEAD_MAX_LAYERS];
    ch_dec_tape dt[2];
    ch_bin bin; /* buffers a lean forward released, for its next allocations */
};

/* ------------------------------------------------------------------ small helpers */

void ch_discard(clh_tensor *t) {
    if (!t)
        return;
    if (active_bin && active_bin->n < BIN_CAPACITY && t->refcount == 1 && t->offset == 0 &&
        t->owned_bytes) {
        active_bin->t[active_bin->n++] = t;
        return;
    }
    clh_tensor_release(t);
}

/* The smallest binned tensor holding numel to 2 numel elements, reshaped (its buffer may be
 * larger than the new shape), or NULL. */
static clh_tensor *from_bin(size_t numel, int ndim, const int64_t *shape) {
    ch_bin *b = active_bin;
    int best = -1;
    size_t best_cap = 0;
    for (int i = 0; b && i < b->n; i++) {
        size_t cap = b->t[i]->owned_bytes / sizeof(float);
        if (cap >= numel && cap <= 2 * numel && (best < 0 || cap < best_cap)) {
            best = i;
            best_cap = cap;
        }
    }
    if (best < 0)
        return NULL;
    clh_tensor *t = b->t[best];
    b->t[best] = b->t[--b->n];
    t->ndim = ndim;
    memcpy(t->shape, shape, (size_t)ndim * sizeof *shape);
    t->numel = numel;
    return t;
}

static void bin_clear(ch_bin *b) {
    for (int i = 0; i < b->n; i++)
        clh_tensor_release(b->t[i]);
    b->n = 0;
}

clh_status ch_slot(clh_ctx *ctx, clh_tensor **slot, int ndim, const int64_t *shape) {
    clh_tensor *s = *slot;
    if (s && s->ndim == ndim && !memcmp(s->shape, shape, (size_t)ndim * sizeof *shape))
        return CLH_OK;
    ch_discard(s);
    *slot = from_bin(clh_shape_numel(ndim, shape), ndim, shape);
    if (*slot)
        return CLH_OK;
    clh_status st = clh_tensor_new(ctx, ndim, shape, slot);
    if (st == CLH_ERR_OUT_OF_MEMORY && active_bin && active_bin->n) {
        bin_clear(active_bin); /* give the kept buffers back and try again */
        st = clh_tensor_new(ctx, ndim, shape, slot);
    }
    return st;
}

clh_tensor ch_part(const clh_tensor *t, size_t offset, int ndim, const int64_t *shape) {
    clh_tensor v = *t;
    size_t numel = clh_shape_numel(ndim, shape);
    v.ndim = ndim;
    memcpy(v.shape, shape, (size_t)ndim * sizeof *shape);
    v.offset = t->offset + offset;
    v.numel = offset + numel <= t->numel ? numel : 0;
    return v;
}

clh_tensor ch_shaped(const clh_tensor *t, int ndim, const int64_t *shape) {
    clh_tensor v = ch_part(t, 0, ndim, shape);
    if (v.numel != t->numel)
        v.numel = 0;
    return v;
}

void ch_release_slots(clh_tensor **slots, size_t count) {
    for (size_t i = 0; i < count; i++) {
        ch_discard(slots[i]);
        slots[i] = NULL;
    }
}

static clh_status host_ints(clh_ctx *ctx, int32_t **p, size_t n) {
    free(*p);
    *p = malloc((n ? n : 1) * sizeof **p);
    if (!*p)
        return clh_fail(ctx, CLH_ERR_OUT_OF_MEMORY, "cathead: out of host memory");
    return CLH_OK;
}

/* ------------------------------------------------------------------ configuration */

void clh_cathead_config_vitb(clh_cathead_config *c) {
    *c = (clh_cathead_config){.d_img = 512,
                              .d_vis = 768,
                              .n_prompts = 1,
                              .hidden = 128,
                              .heads = 4,
                              .appearance_proj = 128,
                              .text_proj = 128,
                              .guidance_up = {256, 128},
                              .decoder_guidance_proj = {32, 16},
                              .decoder = {64, 32},
                              .gn_group_size = 16,
                              .window = 12,
                              .pad_len = 256,
                              .mlp_ratio = 4,
                              .n_layers = 2};
}

void clh_cathead_config_for_clip(const clh_clip_config *clip, clh_cathead_config *cfg) {
    clh_cathead_config_vitb(cfg);
    cfg->d_img = clip->projection_dim;
    cfg->d_vis = clip->vision.hidden;
}

static clh_status positive(const char *field, int v) {
    if (v <= 0)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT,
                        "cathead config: %s must be positive (got %d)", field, v);
    return CLH_OK;
}

static clh_status divides(const char *what, int a, int b) {
    if (a <= 0 || b % a != 0)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT,
                        "cathead config: %s (%d does not divide %d)", what, a, b);
    return CLH_OK;
}

clh_status clh_cathead_config_check(const clh_cathead_config *c) {
    if (!c)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "cathead config: NULL");
    const struct {
        const char *name;
        int v;
    } fields[] = {{"d_img", c->d_img},
                  {"d_vis", c->d_vis},
                  {"n_prompts", c->n_prompts},
                  {"hidden", c->hidden},
                  {"heads", c->heads},
                  {"appearance_proj", c->appearance_proj},
                  {"text_proj", c->text_proj},
                  {"guidance_up[0]", c->guidance_up[0]},
                  {"guidance_up[1]", c->guidance_up[1]},
                  {"decoder_guidance_proj[0]", c->decoder_guidance_proj[0]},
                  {"decoder_guidance_proj[1]", c->decoder_guidance_proj[1]},
                  {"decoder[0]", c->decoder[0]},
                  {"decoder[1]", c->decoder[1]},
                  {"gn_group_size", c->gn_group_size},
                  {"window", c->window},
                  {"pad_len", c->pad_len},
                  {"mlp_ratio", c->mlp_ratio},
                  {"n_layers", c->n_layers}};
    for (size_t i = 0; i < sizeof fields / sizeof *fields; i++)
        CLH_TRY(positive(fields[i].name, fields[i].v));
    if (c->n_layers > CATHEAD_MAX_LAYERS)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "cathead config: n_layers %d > %d",
                        c->n_layers, CATHEAD_MAX_LAYERS);
    CLH_TRY(divides("heads must divide hidden", c->heads, c->hidden));
    CLH_TRY(divides("gn_group_size must divide decoder[0]", c->gn_group_size, c->decoder[0]));
    CLH_TRY(divides("gn_group_size must divide decoder[1]", c->gn_group_size, c->decoder[1]));
    if (c->decoder_guidance_proj[0] >= c->hidden || c->decoder_guidance_proj[1] >= c->decoder[0])
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT,
                        "cathead config: decoder_guidance_proj[i] must be smaller than the "
                        "decoder stage input (hidden %d, decoder[0] %d)",
                        c->hidden, c->decoder[0]);
    return CLH_OK;
}

/* ------------------------------------------------------------------ parameters */

enum { INIT_UNIFORM, INIT_ONES, INIT_ZEROS };

static clh_status add_tensor(clh_cathead *h, clh_tensor **w, clh_tensor **g, int init, double bound,
                             int no_decay, int ndim, const int64_t *shape, const char *fmt, ...)
    __attribute__((format(printf, 9, 10)));

static clh_status add_tensor(clh_cathead *h, clh_tensor **w, clh_tensor **g, int init, double bound,
                             int no_decay, int ndim, const int64_t *shape, const char *fmt, ...) {
    if (h->n_params == MAX_PARAMS)
        return clh_fail(h->ctx, CLH_ERR_INVALID_ARGUMENT, "cathead: too many parameters");
    ch_named *p = &h->params[h->n_params];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(p->name, sizeof p->name, fmt, ap);
    va_end(ap);
    size_t n = clh_shape_numel(ndim, shape);
    float *host = malloc((n ? n : 1) * sizeof *host);
    if (!host)
        return clh_fail(h->ctx, CLH_ERR_OUT_OF_MEMORY, "cathead: out of host memory");
    for (size_t i = 0; i < n; i++)
        host[i] = init == INIT_ONES    ? 1.0f
                  : init == INIT_ZEROS ? 0.0f
                                       : (float)((2.0 * clh_rng_uniform(&h->rng) - 1.0) * bound);
    clh_status st = clh_tensor_from_host(h->ctx, ndim, shape, host, &p->w);
    free(host);
    if (st == CLH_OK)
        st = clh_tensor_new(h->ctx, ndim, shape, &p->g);
    if (st == CLH_OK)
        st = clh_tensor_fill(p->g, 0.0f);
    if (st != CLH_OK) {
        clh_tensor_release(p->w);
        clh_tensor_release(p->g);
        p->w = p->g = NULL;
        return st;
    }
    p->no_decay = no_decay;
    h->n_params++;
    *w = p->w;
    *g = p->g;
    return CLH_OK;
}

/* Linear [out, in] + bias, PyTorch default init. */
static clh_status add_linear(clh_cathead *h, ch_pw *pw, const char *name, int out, int in) {
    double bound = 1.0 / sqrt((double)in);
    CLH_TRY(
        add_tensor(h, &pw->w, &pw->dw, INIT_UNIFORM, bound, 0, DIMS(out, in), "%s.weight", name));
    return add_tensor(h, &pw->b, &pw->db, INIT_UNIFORM, bound, 0, DIMS(out), "%s.bias", name);
}

static clh_status add_conv(clh_cathead *h, ch_pw *pw, const char *name, int out, int in, int k,
                           int bias) {
    double bound = 1.0 / sqrt((double)in * k * k);
    CLH_TRY(add_tensor(h, &pw->w, &pw->dw, INIT_UNIFORM, bound, 0, DIMS(out, in, k, k), "%s.weight",
                       name));
    if (!bias)
        return CLH_OK;
    return add_tensor(h, &pw->b, &pw->db, INIT_UNIFORM, bound, 0, DIMS(out), "%s.bias", name);
}

/* ConvTranspose2d weight [in, out, k, k]: torch's fan-in is out * k * k. */
static clh_status add_convt(clh_cathead *h, ch_pw *pw, const char *name, int in, int out, int k) {
    double bound = 1.0 / sqrt((double)out * k * k);
    CLH_TRY(add_tensor(h, &pw->w, &pw->dw, INIT_UNIFORM, bound, 0, DIMS(in, out, k, k), "%s.weight",
                       name));
    return add_tensor(h, &pw->b, &pw->db, INIT_UNIFORM, bound, 0, DIMS(out), "%s.bias", name);
}

static clh_status add_norm(clh_cathead *h, ch_pw *pw, const char *name, int n) {
    CLH_TRY(add_tensor(h, &pw->w, &pw->dw, INIT_ONES, 0, 1, DIMS(n), "%s.weight", name));
    return add_tensor(h, &pw->b, &pw->db, INIT_ZEROS, 0, 1, DIMS(n), "%s.bias", name);
}

/* "pre.leaf" into buf (names are short; a too-long one is cut, and then fails to load). */
static const char *join_name(char *buf, size_t size, const char *pre, const char *leaf) {
    if (snprintf(buf, size, "%s.%s", pre, leaf) >= (int)size)
        buf[size - 1] = '\0';
    return buf;
}

static clh_status add_swin(clh_cathead *h, ch_swin_params *p, const char *pre) {
    const clh_cathead_config *c = &h->cfg;
    int hd = c->hidden, wide = c->hidden * c->mlp_ratio;
    char n[96];
#define NAME(s) join_name(n, sizeof n, pre, s)
    CLH_TRY(add_norm(h, &p->norm1, NAME("norm1"), hd));
    CLH_TRY(add_linear(h, &p->q, NAME("attn.q"), hd, hd + c->appearance_proj));
    CLH_TRY(add_linear(h, &p->k, NAME("attn.k"), hd, hd + c->appearance_proj));
    CLH_TRY(add_linear(h, &p->v, NAME("attn.v"), hd, hd));
    CLH_TRY(add_linear(h, &p->proj, NAME("attn.proj"), hd, hd));
    CLH_TRY(add_norm(h, &p->norm2, NAME("norm2"), hd));
    CLH_TRY(add_linear(h, &p->fc1, NAME("mlp.fc1"), wide, hd));
    return add_linear(h, &p->fc2, NAME("mlp.fc2"), hd, wide);
}

static clh_status add_cls(clh_cathead *h, ch_cls_params *p, const char *pre) {
    const clh_cathead_config *c = &h->cfg;
    int hd = c->hidden, wide = c->hidden * c->mlp_ratio;
    char n[96];
    CLH_TRY(add_norm(h, &p->norm1, NAME("norm1"), hd));
    CLH_TRY(add_linear(h, &p->q, NAME("attn.q"), hd, hd + c->text_proj));
    CLH_TRY(add_linear(h, &p->k, NAME("attn.k"), hd, hd + c->text_proj));
    CLH_TRY(add_linear(h, &p->v, NAME("attn.v"), hd, hd));
    CLH_TRY(add_norm(h, &p->norm2, NAME("norm2"), hd));
    CLH_TRY(add_linear(h, &p->fc1, NAME("mlp.fc1"), wide, hd));
    CLH_TRY(add_linear(h, &p->fc2, NAME("mlp.fc2"), hd, wide));
    CLH_TRY(add_tensor(h, &p->pad, &p->dpad, INIT_ZEROS, 0, 1, DIMS(hd), "%s.pad_token", pre));
    return add_tensor(h, &p->padg, &p->dpadg, INIT_ZEROS, 0, 1, DIMS(c->text_proj),
                      "%s.pad_guidance", pre);
#undef NAME
}

static clh_status add_decoder(clh_cathead *h, int i) {
    const clh_cathead_config *c = &h->cfg;
    ch_dec_params *d = &h->decoder[i];
    int cin = i == 0 ? c->hidden : c->decoder[0], q = c->decoder_guidance_proj[i];
    int out = c->decoder[i];
    char n[96];
    snprintf(n, sizeof n, "head.decoder.%d.up", i);
    CLH_TRY(add_convt(h, &d->up, n, cin, cin - q, 2));
    snprintf(n, sizeof n, "head.decoder.%d.conv1", i);
    CLH_TRY(add_conv(h, &d->conv1, n, out, cin, 3, 0));
    snprintf(n, sizeof n, "head.decoder.%d.gn1", i);
    CLH_TRY(add_norm(h, &d->gn1, n, out));
    snprintf(n, sizeof n, "head.decoder.%d.conv2", i);
    CLH_TRY(add_conv(h, &d->conv2, n, out, out, 3, 0));
    snprintf(n, sizeof n, "head.decoder.%d.gn2", i);
    return add_norm(h, &d->gn2, n, out);
}

static clh_status add_all_params(clh_cathead *h) {
    const clh_cathead_config *c = &h->cfg;
    char n[96];
    CLH_TRY(add_convt(h, &h->guidance_up[0], "head.guidance_up.0", c->d_vis, c->guidance_up[0], 2));
    CLH_TRY(add_convt(h, &h->guidance_up[1], "head.guidance_up.1", c->d_vis, c->guidance_up[1], 4));
    CLH_TRY(add_conv(h, &h->cost_embed, "head.cost_embed", c->hidden, c->n_prompts, 7, 1));
    CLH_TRY(add_conv(h, &h->appearance_proj, "head.appearance_proj", c->appearance_proj, c->d_img,
                     3, 1));
    CLH_TRY(add_linear(h, &h->text_proj, "head.text_proj", c->text_proj, c->d_img));
    for (int i = 0; i < 2; i++) {
        snprintf(n, sizeof n, "head.decoder_guidance_proj.%d", i);
        CLH_TRY(add_conv(h, &h->decoder_guidance_proj[i], n, c->decoder_guidance_proj[i],
                         c->guidance_up[i], 3, 1));
    }
    for (int l = 0; l < c->n_layers; l++) {
        snprintf(n, sizeof n, "head.layers.%d.guidance_norm", l);
        CLH_TRY(add_norm(h, &h->layers[l].guidance_norm, n, c->appearance_proj));
        for (int j = 0; j < 2; j++) {
            snprintf(n, sizeof n, "head.layers.%d.spatial.%d", l, j);
            CLH_TRY(add_swin(h, &h->layers[l].spatial[j], n));
        }
        snprintf(n, sizeof n, "head.layers.%d.cls", l);
        CLH_TRY(add_cls(h, &h->layers[l].cls, n));
    }
    for (int i = 0; i < 2; i++)
        CLH_TRY(add_decoder(h, i));
    return add_conv(h, &h->out_conv, "head.out_conv", 1, c->decoder[1], 3, 1);
}

clh_status clh_cathead_new(clh_ctx *ctx, const clh_cathead_config *cfg, uint64_t seed,
                           clh_cathead **out) {
    *out = NULL;
    if (!ctx)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "clh_cathead_new: NULL context");
    CLH_TRY(clh_cathead_config_check(cfg));
    clh_cathead *h = calloc(1, sizeof *h);
    if (!h)
        return clh_fail(ctx, CLH_ERR_OUT_OF_MEMORY, "clh_cathead_new: out of host memory");
    h->ctx = ctx;
    h->cfg = *cfg;
    clh_rng_seed(&h->rng, seed);
    clh_status st = add_all_params(h);
    if (st != CLH_OK) {
        clh_cathead_free(h);
        return st;
    }
    *out = h;
    return CLH_OK;
}

static void free_tapes(clh_cathead *h) {
    ch_release_slots((clh_tensor **)&h->t, sizeof h->t / sizeof(clh_tensor *));
    for (int l = 0; l < CATHEAD_MAX_LAYERS; l++)
        ch_layer_tape_free(&h->lt[l]);
    for (int i = 0; i < 2; i++) {
        ch_dec_tape *d = &h->dt[i];
        clh_tensor *owned[] = {d->u, d->c, d->c1, d->g1, d->r1, d->c2, d->g2, d->r2};
        ch_release_slots(owned, sizeof owned / sizeof *owned);
        memset(d, 0, sizeof *d);
    }
}

void clh_cathead_free(clh_cathead *h) {
    if (!h)
        return;
    free_tapes(h);
    bin_clear(&h->bin);
    for (int i = 0; i < h->n_params; i++) {
        clh_tensor_release(h->params[i].w);
        clh_tensor_release(h->params[i].g);
    }
    free(h->tok_index);
    free(h->text_index);
    free(h->kept);
    free(h->logit_rows);
    free(h->kept_rows);
    free(h);
}

const clh_cathead_config *clh_cathead_get_config(const clh_cathead *h) {
    return &h->cfg;
}

int clh_cathead_num_params(const clh_cathead *h) {
    return h ? h->n_params : 0;
}

clh_status clh_cathead_param(clh_cathead *h, int i, const char **name, clh_tensor **param,
                             clh_tensor **grad) {
    if (!h || i < 0 || i >= h->n_params)
        return clh_fail(h ? h->ctx : NULL, CLH_ERR_INVALID_ARGUMENT,
                        "clh_cathead_param: index %d out of range [0, %d)", i, h ? h->n_params : 0);
    if (name)
        *name = h->params[i].name;
    if (param)
        *param = h->params[i].w;
    if (grad)
        *grad = h->params[i].g;
    return CLH_OK;
}

int clh_cathead_param_no_decay(const clh_cathead *h, int i) {
    return h && i >= 0 && i < h->n_params ? h->params[i].no_decay : 0;
}

int clh_cathead_find_param(const clh_cathead *h, const char *name) {
    for (int i = 0; h && name && i < h->n_params; i++)
        if (!strcmp(h->params[i].name, name))
            return i;
    return -1;
}

clh_status clh_cathead_zero_grad(clh_cathead *h) {
    for (int i = 0; i < h->n_params; i++)
        CLH_TRY(clh_tensor_fill(h->params[i].g, 0.0f));
    return CLH_OK;
}

static clh_status load_one(clh_cathead *h, const clh_st_file *f, const ch_named *p) {
    clh_st_tensor_info info;
    if (clh_st_info(f, p->name, &info) != CLH_OK)
        return clh_fail(h->ctx, CLH_ERR_NOT_FOUND, "cathead: tensor '%s' is missing from the file",
                        p->name);
    if (info.ndim != p->w->ndim || memcmp(info.shape, p->w->shape, sizeof(int64_t) * info.ndim)) {
        char want[96], got[96];
        clh_shape_str(p->w->ndim, p->w->shape, want, sizeof want);
        clh_shape_str(info.ndim, info.shape, got, sizeof got);
        return clh_fail(h->ctx, CLH_ERR_SHAPE, "cathead: tensor '%s' has shape %s, expected %s",
                        p->name, got, want);
    }
    float *host = malloc((info.numel ? info.numel : 1) * sizeof *host);
    if (!host)
        return clh_fail(h->ctx, CLH_ERR_OUT_OF_MEMORY, "cathead: out of host memory");
    clh_status st = clh_st_read_f32(f, p->name, host, info.numel);
    if (st == CLH_OK)
        st = clh_tensor_upload(p->w, host, info.numel);
    free(host);
    return st;
}

clh_status clh_cathead_load_params(clh_cathead *h, const clh_st_file *f) {
    for (size_t i = 0; i < clh_st_count(f); i++) {
        clh_st_tensor_info info;
        CLH_TRY(clh_st_info_at(f, i, &info));
        if (!strncmp(info.name, "head.", 5) && clh_cathead_find_param(h, info.name) < 0)
            return clh_fail(h->ctx, CLH_ERR_INVALID_ARGUMENT,
                            "cathead: the file has tensor '%s', which this head configuration "
                            "does not have",
                            info.name);
    }
    for (int i = 0; i < h->n_params; i++)
        CLH_TRY(load_one(h, f, &h->params[i]));
    return CLH_OK;
}

clh_status clh_cathead_add_params(clh_cathead *h, clh_st_writer *w) {
    for (int i = 0; i < h->n_params; i++) {
        ch_named *p = &h->params[i];
        size_t n = p->w->numel;
        float *host = malloc((n ? n : 1) * sizeof *host);
        if (!host)
            return clh_fail(h->ctx, CLH_ERR_OUT_OF_MEMORY, "cathead: out of host memory");
        clh_status st = clh_tensor_download(p->w, host, n);
        if (st == CLH_OK)
            st = clh_st_writer_add_f32(w, p->name, p->w->ndim, p->w->shape, host);
        free(host);
        CLH_TRY(st);
    }
    return CLH_OK;
}

/* ------------------------------------------------------------------ forward: inputs */

static clh_status check_seq_input(clh_ctx *ctx, const char *name, const clh_tensor *t, int batch,
                                  int tokens, int width) {
    if (!t)
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT, "clh_cathead_forward: %s is NULL", name);
    if (t->ndim != 3 || t->shape[0] < 1 || (batch >= 0 && t->shape[0] != batch) ||
        (tokens >= 0 && t->shape[1] != tokens) || t->shape[2] != width) {
        char got[96];
        clh_shape_str(t->ndim, t->shape, got, sizeof got);
        return clh_fail(ctx, CLH_ERR_SHAPE,
                        "clh_cathead_forward: %s has shape %s, expected [B, 1+g*g, %d]%s", name,
                        got, width, batch >= 0 ? " like dense" : "");
    }
    return CLH_OK;
}

static clh_status check_text_input(clh_ctx *ctx, const clh_cathead_config *c, const clh_tensor *t) {
    if (!t)
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT, "clh_cathead_forward: text is NULL");
    int ok = (t->ndim == 3 && t->shape[1] == c->n_prompts && t->shape[2] == c->d_img) ||
             (t->ndim == 2 && c->n_prompts == 1 && t->shape[1] == c->d_img);
    if (!ok || t->shape[0] < 1) {
        char got[96];
        clh_shape_str(t->ndim, t->shape, got, sizeof got);
        return clh_fail(ctx, CLH_ERR_SHAPE,
                        "clh_cathead_forward: text has shape %s, expected [T >= 1, %d, %d]", got,
                        c->n_prompts, c->d_img);
    }
    return CLH_OK;
}

/* Validate the inputs and derive the geometry of this forward. */
static clh_status plan(clh_cathead *h, const clh_cathead_inputs *in, ch_geom *g) {
    const clh_cathead_config *c = &h->cfg;
    clh_ctx *ctx = h->ctx;
    CLH_TRY(check_seq_input(ctx, "dense", in->dense, -1, -1, c->d_img));
    int batch = (int)in->dense->shape[0], tokens = (int)in->dense->shape[1] - 1;
    int grid = (int)lround(sqrt((double)(tokens > 0 ? tokens : 0)));
    if (tokens < 1 || grid * grid != tokens)
        return clh_fail(ctx, CLH_ERR_SHAPE,
                        "clh_cathead_forward: dense has %d tokens after the CLS row; expected a "
                        "square grid g*g",
                        tokens);
    for (int i = 0; i < 2; i++)
        CLH_TRY(check_seq_input(ctx, i ? "hooks[1]" : "hooks[0]", in->hooks[i], batch, tokens + 1,
                                c->d_vis));
    CLH_TRY(check_text_input(ctx, c, in->text));
    if (in->pool < 1 || in->pool > grid)
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT,
                        "clh_cathead_forward: pool %d must be in [1, grid %d]", in->pool, grid);
    int window = grid <= c->window ? grid : c->window;
    if (grid % window)
        return clh_fail(ctx, CLH_ERR_SHAPE,
                        "clh_cathead_forward: the token grid %d is not a multiple of the Swin "
                        "window %d",
                        grid, window);
    int t_all = (int)in->text->shape[0], kept = t_all > c->pad_len ? c->pad_len : t_all;
    *g = (ch_geom){.batch = batch,
                   .grid = grid,
                   .tokens = tokens,
                   .classes_all = t_all,
                   .classes = kept,
                   .prompts = c->n_prompts,
                   .pool = in->pool,
                   .pgrid = grid / in->pool,
                   .ptokens = (grid / in->pool) * (grid / in->pool),
                   .seq = kept > c->pad_len ? kept : c->pad_len,
                   .window = window,
                   .shift = window < grid ? window / 2 : 0,
                   .n = (int64_t)batch * kept};
    return CLH_OK;
}

/* Image tokens without the CLS rows: tokens [B*S, D] and planes [B, D, g, g]. */
static clh_status tokens_and_planes(clh_cathead *h, const clh_tensor *x, int width,
                                    clh_tensor **tok, clh_tensor **planes) {
    const ch_geom *g = &h->geom;
    CLH_TRY(SLOT(h->ctx, *tok, (int64_t)g->batch * g->tokens, width));
    CLH_TRY(SLOT(h->ctx, *planes, g->batch, width, g->grid, g->grid));
    CLH_TRY(clh_gather_rows(h->ctx, RS(x, (int64_t)g->batch * (g->tokens + 1), width), h->tok_index,
                            (size_t)g->batch * g->tokens, *tok));
    return clh_permute_0213(h->ctx, *tok, g->batch, g->tokens, width, 1, *planes);
}

/* Per image, the pad_len classes with the highest max over prompts and pixels of the cost,
 * in ascending class order. */
static clh_status select_classes(clh_cathead *h) {
    const ch_geom *g = &h->geom;
    clh_ctx *ctx = h->ctx;
    int t_all = g->classes_all, k = g->classes;
    clh_tensor *scores = NULL;
    float *host = malloc((size_t)g->batch * t_all * sizeof *host);
    int *order = malloc((size_t)t_all * sizeof *order);
    clh_status st =
        host && order ? CLH_OK : clh_fail(ctx, CLH_ERR_OUT_OF_MEMORY, "cathead: out of memory");
    if (st == CLH_OK)
        st = clh_tensor_new(ctx, DIMS((int64_t)g->batch * t_all), &scores);
    if (st == CLH_OK)
        st = clh_row_max(ctx, h->t.corr_all, (int64_t)g->prompts * g->tokens, scores);
    if (st == CLH_OK)
        st = clh_tensor_download(scores, host, (size_t)g->batch * t_all);
    for (int b = 0; st == CLH_OK && b < g->batch; b++) {
        const float *s = host + (size_t)b * t_all;
        for (int i = 0; i < t_all; i++)
            order[i] = i;
        /* partial selection sort of the best k (stable: ties keep the lower class) */
        for (int i = 0; i < k; i++) {
            int best = i;
            for (int j = i + 1; j < t_all; j++)
                if (s[order[j]] > s[order[best]] ||
                    (s[order[j]] == s[order[best]] && order[j] < order[best]))
                    best = j;
            int tmp = order[i];
            order[i] = order[best];
            order[best] = tmp;
        }
        int32_t *kept = h->kept + (size_t)b * k;
        for (int i = 0, n = 0; i < t_all; i++)
            for (int j = 0; j < k; j++)
                if (order[j] == i)
                    kept[n++] = i;
    }
    clh_tensor_release(scores);
    free(host);
    free(order);
    return st;
}

/* Index arrays of this forward (CLS-free token rows, kept classes, text rows, logit rows). */
static clh_status make_indices(clh_cathead *h) {
    const ch_geom *g = &h->geom;
    size_t bs = (size_t)g->batch * g->tokens, n = (size_t)g->n;
    CLH_TRY(host_ints(h->ctx, &h->tok_index, bs));
    CLH_TRY(host_ints(h->ctx, &h->kept, n));
    CLH_TRY(host_ints(h->ctx, &h->text_index, n));
    CLH_TRY(host_ints(h->ctx, &h->kept_rows, n));
    CLH_TRY(host_ints(h->ctx, &h->logit_rows, (size_t)g->batch * g->classes_all));
    for (int b = 0; b < g->batch; b++)
        for (int s = 0; s < g->tokens; s++)
            h->tok_index[(size_t)b * g->tokens + s] = b * (g->tokens + 1) + 1 + s;
    for (size_t i = 0; i < n; i++)
        h->kept[i] = (int32_t)(i % (size_t)g->classes);
    return CLH_OK;
}

static void finish_indices(clh_cathead *h) {
    const ch_geom *g = &h->geom;
    for (size_t i = 0; i < (size_t)g->batch * g->classes_all; i++)
        h->logit_rows[i] = (int32_t)g->n; /* the -100 row */
    for (int b = 0; b < g->batch; b++)
        for (int j = 0; j < g->classes; j++) {
            size_t r = (size_t)b * g->classes + j;
            int32_t cls = h->kept[r];
            h->text_index[r] = cls;
            h->kept_rows[r] = b * g->classes_all + cls;
            h->logit_rows[h->kept_rows[r]] = (int32_t)r;
        }
}

/* ------------------------------------------------------------------ forward: cost volume */

/* corr[b, t, p, s] = <n(img[b, s]), n(text[t, p])>, then top-k and the cost embedding. */
static clh_status cost_volume(clh_cathead *h) {
    const ch_geom *g = &h->geom;
    const clh_cathead_config *c = &h->cfg;
    clh_ctx *ctx = h->ctx;
    ch_tape *t = &h->t;
    int64_t tp_rows = (int64_t)g->classes_all * g->prompts, bs = (int64_t)g->batch * g->tokens;
    CLH_TRY(SLOT(ctx, t->imgn, bs, c->d_img));
    CLH_TRY(SLOT(ctx, t->textn, tp_rows, c->d_img));
    CLH_TRY(SLOT(ctx, t->corr_mm, tp_rows, bs));
    CLH_TRY(
        SLOT(ctx, t->corr_all, (int64_t)g->batch * g->classes_all, g->prompts, g->grid, g->grid));
    CLH_TRY(clh_l2_normalize(ctx, t->img_tok, t->imgn));
    CLH_TRY(clh_l2_normalize(ctx, RS(h->in.text, tp_rows, c->d_img), t->textn));
    CLH_TRY(clh_gemm(ctx, 0, 1, (size_t)tp_rows, (size_t)bs, (size_t)c->d_img, 1.0f, t->textn,
                     (size_t)c->d_img, t->imgn, (size_t)c->d_img, 0.0f, t->corr_mm, (size_t)bs));
    CLH_TRY(clh_permute_0213(ctx, t->corr_mm, 1, tp_rows, g->batch, g->tokens, t->corr_all));
    if (h->topk)
        CLH_TRY(select_classes(h));
    finish_indices(h);
    const clh_tensor *corr = t->corr_all;
    if (h->topk) {
        int64_t row = (int64_t)g->prompts * g->tokens;
        CLH_TRY(SLOT(ctx, t->corr, g->n, g->prompts, g->grid, g->grid));
        CLH_TRY(clh_gather_rows(ctx, RS(t->corr_all, (int64_t)g->batch * g->classes_all, row),
                                h->kept_rows, (size_t)g->n, RS(t->corr, g->n, row)));
        corr = t->corr;
    }
    CLH_TRY(SLOT(ctx, t->x0, g->n, c->hidden, g->grid, g->grid));
    CLH_TRY(SLOT(ctx, t->x, g->n * g->tokens, c->hidden));
    CLH_TRY(clh_conv2d_forward(ctx, corr, h->cost_embed.w, h->cost_embed.b, 1, 3, t->x0));
    return clh_permute_0213(ctx, t->x0, g->n, c->hidden, g->tokens, 1, t->x);
}

/* ------------------------------------------------------------------ forward: guidance */

static clh_status appearance_guidance(clh_cathead *h) {
    const ch_geom *g = &h->geom;
    const clh_cathead_config *c = &h->cfg;
    ch_tape *t = &h->t;
    CLH_TRY(SLOT(h->ctx, t->app_pre, g->batch, c->appearance_proj, g->grid, g->grid));
    CLH_TRY(SLOT(h->ctx, t->app, g->batch, c->appearance_proj, g->grid, g->grid));
    CLH_TRY(SLOT(h->ctx, t->app_tok, (int64_t)g->batch * g->tokens, c->appearance_proj));
    CLH_TRY(clh_conv2d_forward(h->ctx, t->res3, h->appearance_proj.w, h->appearance_proj.b, 1, 1,
                               t->app_pre));
    CLH_TRY(clh_relu_forward(h->ctx, t->app_pre, t->app));
    return clh_permute_0213(h->ctx, t->app, g->batch, c->appearance_proj, g->tokens, 1, t->app_tok);
}

/* tg = ReLU(text_proj(normalize(mean over prompts))) for each kept (image, class). The
 * source is the raw text without top-k and the normalised text with it (released code). */
static clh_status text_guidance(clh_cathead *h) {
    const ch_geom *g = &h->geom;
    const clh_cathead_config *c = &h->cfg;
    clh_ctx *ctx = h->ctx;
    ch_tape *t = &h->t;
    int64_t p = g->prompts, d = c->d_img, width = p * d;
    const clh_tensor *src = h->topk ? t->textn : h->in.text;
    CLH_TRY(SLOT(ctx, t->tsel, g->n, width));
    CLH_TRY(SLOT(ctx, t->tmean, g->n, d));
    CLH_TRY(SLOT(ctx, t->tnorm, g->n, d));
    CLH_TRY(SLOT(ctx, t->tlin, g->n, c->text_proj));
    CLH_TRY(SLOT(ctx, t->tg, g->n, c->text_proj));
    CLH_TRY(
        clh_gather_rows(ctx, RS(src, g->classes_all, width), h->text_index, (size_t)g->n, t->tsel));
    if (p == 1) {
        CLH_TRY(clh_tensor_copy(t->tmean, t->tsel));
    } else {
        /* [n, P, d] -> [P, n, d], then the mean of the P blocks */
        CLH_TRY(SLOT(ctx, t->tselp, p, g->n, d));
        CLH_TRY(clh_permute_0213(ctx, t->tsel, 1, g->n, p, d, t->tselp));
        CLH_TRY(clh_tensor_copy(t->tmean, PART(t->tselp, 0, g->n, d)));
        for (int64_t i = 1; i < p; i++)
            CLH_TRY(clh_axpy(ctx, 1.0f, PART(t->tselp, (size_t)(i * g->n * d), g->n, d), t->tmean));
        CLH_TRY(clh_scale(ctx, t->tmean, 1.0f / (float)p));
    }
    CLH_TRY(clh_l2_normalize(ctx, t->tmean, t->tnorm));
    CLH_TRY(clh_linear(ctx, t->tnorm, h->text_proj.w, h->text_proj.b, t->tlin));
    return clh_relu_forward(ctx, t->tlin, t->tg);
}

/* dec_i = ReLU(decoder_guidance_proj.i(guidance_up.i(hook_i))). */
static clh_status decoder_guidance(clh_cathead *h, int i) {
    const ch_geom *g = &h->geom;
    const clh_cathead_config *c = &h->cfg;
    ch_tape *t = &h->t;
    int k = i == 0 ? 2 : 4, size = g->grid * k;
    CLH_TRY(tokens_and_planes(h, h->in.hooks[i], c->d_vis, &t->hook_tok[i], &t->hook_pl[i]));
    CLH_TRY(SLOT(h->ctx, t->up[i], g->batch, c->guidance_up[i], size, size));
    CLH_TRY(SLOT(h->ctx, t->decg_pre[i], g->batch, c->decoder_guidance_proj[i], size, size));
    CLH_TRY(SLOT(h->ctx, t->decg[i], g->batch, c->decoder_guidance_proj[i], size, size));
    CLH_TRY(clh_conv_transpose2d_forward(h->ctx, t->hook_pl[i], h->guidance_up[i].w,
                                         h->guidance_up[i].b, t->up[i]));
    CLH_TRY(clh_conv2d_forward(h->ctx, t->up[i], h->decoder_guidance_proj[i].w,
                               h->decoder_guidance_proj[i].b, 1, 1, t->decg_pre[i]));
    return clh_relu_forward(h->ctx, t->decg_pre[i], t->decg[i]);
}

/* ------------------------------------------------------------------ forward: decoder */

/* One Up stage: ConvTranspose k2, concat the guidance, DoubleConv. */
static clh_status decoder_stage(clh_cathead *h, int i, const clh_tensor *in) {
    const ch_geom *g = &h->geom;
    const clh_cathead_config *c = &h->cfg;
    clh_ctx *ctx = h->ctx;
    ch_dec_params *p = &h->decoder[i];
    ch_dec_tape *t = &h->dt[i];
    int64_t cin = in->shape[1], q = c->decoder_guidance_proj[i], out = c->decoder[i];
    int64_t size = in->shape[2] * 2, plane = size * size;
    int groups = c->decoder[i] / c->gn_group_size;
    t->in = in;
    CLH_TRY(SLOT(ctx, t->u, g->n, cin - q, size, size));
    CLH_TRY(SLOT(ctx, t->c, g->n, cin, size, size));
    clh_tensor **outs[] = {&t->c1, &t->g1, &t->r1, &t->c2, &t->g2, &t->r2};
    for (size_t j = 0; j < sizeof outs / sizeof *outs; j++)
        CLH_TRY(SLOT(ctx, *outs[j], g->n, out, size, size));
    CLH_TRY(clh_conv_transpose2d_forward(ctx, in, p->up.w, p->up.b, t->u));
    CLH_TRY(clh_concat_rows(ctx, t->u, (cin - q) * plane, h->t.decg[i], q * plane, g->batch,
                            g->classes, 1, t->c));
    CLH_TRY(clh_conv2d_forward(ctx, t->c, p->conv1.w, NULL, 1, 1, t->c1));
    CLH_TRY(clh_group_norm_forward(ctx, t->c1, groups, p->gn1.w, p->gn1.b, CATHEAD_GN_EPS, t->g1));
    CLH_TRY(clh_relu_forward(ctx, t->g1, t->r1));
    CLH_TRY(clh_conv2d_forward(ctx, t->r1, p->conv2.w, NULL, 1, 1, t->c2));
    CLH_TRY(clh_group_norm_forward(ctx, t->c2, groups, p->gn2.w, p->gn2.b, CATHEAD_GN_EPS, t->g2));
    return clh_relu_forward(ctx, t->g2, t->r2);
}

/* Decoder on the aggregated x, then the logits (scattered back to all classes with -100
 * for the dropped ones under top-k). */
static void dec_tape_drop(ch_dec_tape *d, int keep_output);

static clh_status decode(clh_cathead *h, const clh_tensor *x, clh_tensor *logits) {
    const ch_geom *g = &h->geom;
    const clh_cathead_config *c = &h->cfg;
    clh_ctx *ctx = h->ctx;
    int64_t size = (int64_t)g->grid * 4, plane = size * size;
    CLH_TRY(SLOT(ctx, h->t.dec_in, g->n, c->hidden, g->grid, g->grid));
    CLH_TRY(clh_permute_0213(ctx, x, g->n, g->tokens, c->hidden, 1, h->t.dec_in));
    CLH_TRY(decoder_stage(h, 0, h->t.dec_in));
    if (h->lean) {
        dec_tape_drop(&h->dt[0], 1);
        ch_discard(h->t.dec_in);
        h->t.dec_in = NULL;
    }
    CLH_TRY(decoder_stage(h, 1, h->dt[0].r2));
    if (h->lean) {
        dec_tape_drop(&h->dt[0], 0);
        dec_tape_drop(&h->dt[1], 1);
    }
    if (!h->topk)
        return clh_conv2d_forward(ctx, h->dt[1].r2, h->out_conv.w, h->out_conv.b, 1, 1,
                                  RS(logits, g->n, 1, size, size));
    CLH_TRY(SLOT(ctx, h->t.ext, g->n + 1, plane));
    CLH_TRY(clh_conv2d_forward(ctx, h->dt[1].r2, h->out_conv.w, h->out_conv.b, 1, 1,
                               PART(h->t.ext, 0, g->n, 1, size, size)));
    CLH_TRY(clh_tensor_fill(PART(h->t.ext, (size_t)(g->n * plane), 1, plane), -100.0f));
    return clh_gather_rows(ctx, h->t.ext, h->logit_rows, (size_t)g->batch * g->classes_all,
                           RS(logits, (int64_t)g->batch * g->classes_all, plane));
}

static void dec_tape_drop(ch_dec_tape *d, int keep_output) {
    clh_tensor *r2 = d->r2;
    clh_tensor **owned[] = {&d->u, &d->c, &d->c1, &d->g1, &d->r1, &d->c2, &d->g2, &d->r2};
    for (size_t i = 0; i < sizeof owned / sizeof *owned; i++) {
        if (keep_output && *owned[i] == r2)
            continue;
        ch_discard(*owned[i]);
        *owned[i] = NULL;
    }
}

/* With lean != 0 (inference) every stage's activations are released once the next stage
 * has consumed them (into the bin, for reuse by later stages and calls): the peak is the
 * largest stages' buffers, not the whole tape (ViT-B, 150 classes: 4.5 GB instead of 9.7). */
static clh_status aggregate_and_decode(clh_cathead *h, clh_tensor *logits, int lean) {
    const ch_geom *g = &h->geom;
    const clh_cathead_config *c = &h->cfg;
    const clh_tensor *x = h->t.x;
    for (int l = 0; l < c->n_layers; l++) {
        CLH_TRY(ch_layer_forward(h->ctx, c, g, &h->layers[l], &h->lt[l], x, h->t.app_tok, h->t.tg,
                                 lean));
        if (lean && l > 0)
            ch_layer_tape_free(&h->lt[l - 1]);
        x = h->lt[l].out;
    }
    clh_status st = decode(h, x, logits);
    if (lean)
        ch_layer_tape_free(&h->lt[c->n_layers - 1]);
    return st;
}

static clh_status forward_core(clh_cathead *h, clh_tensor *logits, int lean) {
    const clh_cathead_config *c = &h->cfg;
    CLH_TRY(make_indices(h));
    CLH_TRY(tokens_and_planes(h, h->in.dense, c->d_img, &h->t.img_tok, &h->t.res3));
    CLH_TRY(cost_volume(h));
    CLH_TRY(appearance_guidance(h));
    CLH_TRY(text_guidance(h));
    for (int i = 0; i < 2; i++)
        CLH_TRY(decoder_guidance(h, i));
    h->lean = lean;
    clh_status st = aggregate_and_decode(h, logits, lean);
    h->lean = 0;
    if (lean)
        free_tapes(h);
    return st;
}

clh_status clh_cathead_forward(clh_cathead *h, int train, const clh_cathead_inputs *in,
                               clh_tensor **logits) {
    if (logits)
        *logits = NULL;
    if (!h || !in || !logits)
        return clh_fail(h ? h->ctx : NULL, CLH_ERR_INVALID_ARGUMENT,
                        "clh_cathead_forward: NULL head or inputs");
    h->pending = 0;
    ch_geom g;
    CLH_TRY(plan(h, in, &g));
    h->geom = g;
    h->in = *in;
    h->topk = g.classes_all > h->cfg.pad_len;
    int64_t size = (int64_t)g.grid * 4;
    clh_tensor *out = NULL;
    CLH_TRY(clh_tensor_new(h->ctx, DIMS(g.batch, g.classes_all, size, size), &out));
    active_bin = &h->bin;
    clh_status st = forward_core(h, out, !train);
    active_bin = NULL;
    if (train)
        bin_clear(&h->bin); /* a training tape keeps its slots: the bin is not needed */
    if (st != CLH_OK) {
        clh_tensor_release(out);
        return st;
    }
    h->pending = train != 0;
    *logits = out;
    return CLH_OK;
}

int clh_cathead_kept_classes(const clh_cathead *h, int b, const int32_t **classes) {
    if (!h || !h->kept || b < 0 || b >= h->geom.batch) {
        if (classes)
            *classes = NULL;
        return 0;
    }
    if (classes)
        *classes = h->kept + (size_t)b * h->geom.classes;
    return h->geom.classes;
}

void clh_cathead_discard(clh_cathead *h) {
    if (h)
        h->pending = 0;
}

/* ------------------------------------------------------------------ backward */

/* d of one decoder stage's output (r2) -> d of its input (scratch) and of the guidance. */
static clh_status decoder_stage_backward(clh_cathead *h, clip_scratch *s, int i,
                                         const clh_tensor *d_r2, clh_tensor **d_in,
                                         clh_tensor *d_decg) {
    const clh_cathead_config *c = &h->cfg;
    const ch_geom *g = &h->geom;
    clh_ctx *ctx = h->ctx;
    ch_dec_params *p = &h->decoder[i];
    ch_dec_tape *t = &h->dt[i];
    int groups = c->decoder[i] / c->gn_group_size;
    int64_t cin = t->in->shape[1], q = c->decoder_guidance_proj[i];
    int64_t plane = t->c->shape[2] * t->c->shape[3];
    clh_tensor *a, *b, *d_c, *d_u;
    CLH_TRY(clip_ws(ctx, s, t->r2->ndim, t->r2->shape, &a));
    CLH_TRY(clip_ws(ctx, s, t->r2->ndim, t->r2->shape, &b));
    CLH_TRY(clip_ws(ctx, s, t->c->ndim, t->c->shape, &d_c));
    CLH_TRY(clip_ws(ctx, s, t->u->ndim, t->u->shape, &d_u));
    CLH_TRY(clip_ws(ctx, s, t->in->ndim, t->in->shape, d_in));
    CLH_TRY(clh_relu_backward(ctx, t->g2, d_r2, a));
    CLH_TRY(clh_group_norm_backward(ctx, t->c2, groups, p->gn2.w, CATHEAD_GN_EPS, a, b, p->gn2.dw,
                                    p->gn2.db));
    CLH_TRY(clh_conv2d_backward(ctx, t->r1, p->conv2.w, 1, 1, b, a, p->conv2.dw, NULL));
    CLH_TRY(clh_relu_backward(ctx, t->g1, a, b));
    CLH_TRY(clh_group_norm_backward(ctx, t->c1, groups, p->gn1.w, CATHEAD_GN_EPS, b, a, p->gn1.dw,
                                    p->gn1.db));
    CLH_TRY(clh_conv2d_backward(ctx, t->c, p->conv1.w, 1, 1, a, d_c, p->conv1.dw, NULL));
    CLH_TRY(clh_concat_rows_backward(ctx, d_c, (cin - q) * plane, q * plane, g->batch, g->classes,
                                     1, d_u, d_decg));
    return clh_conv_transpose2d_backward(ctx, t->in, p->up.w, d_u, *d_in, p->up.dw, p->up.db);
}

/* d logits -> d of the aggregated x [N*S, h] (d_x) and of both decoder guidances. */
static clh_status decode_backward_core(clh_cathead *h, clip_scratch *s, const clh_tensor *d_logits,
                                       clh_tensor *d_x, clh_tensor *d_decg[2]) {
    const ch_geom *g = &h->geom;
    const clh_cathead_config *c = &h->cfg;
    clh_ctx *ctx = h->ctx;
    int64_t size = (int64_t)g->grid * 4, plane = size * size;
    const clh_tensor *d_out = RS(d_logits, g->n, 1, size, size);
    if (h->topk) {
        clh_tensor *kept;
        CLH_TRY(SCR(ctx, s, kept, g->n, 1, size, size));
        CLH_TRY(clh_gather_rows(ctx, RS(d_logits, (int64_t)g->batch * g->classes_all, plane),
                                h->kept_rows, (size_t)g->n, RS(kept, g->n, plane)));
        d_out = kept;
    }
    const clh_tensor *r2 = h->dt[1].r2;
    clh_tensor *d_r2, *d_mid, *d_in;
    CLH_TRY(clip_ws(ctx, s, r2->ndim, r2->shape, &d_r2));
    CLH_TRY(clh_conv2d_backward(ctx, r2, h->out_conv.w, 1, 1, d_out, d_r2, h->out_conv.dw,
                                h->out_conv.db));
    CLH_TRY(decoder_stage_backward(h, s, 1, d_r2, &d_mid, d_decg[1]));
    CLH_TRY(decoder_stage_backward(h, s, 0, d_mid, &d_in, d_decg[0]));
    return clh_permute_0213(ctx, d_in, g->n, c->hidden, g->tokens, 1, d_x);
}

/* The decoder's temporaries are large (full resolution, all classes): release them before
 * the aggregator's backward. */
static clh_status decode_backward(clh_cathead *h, clip_scratch *s, const clh_tensor *d_logits,
                                  clh_tensor **d_x, clh_tensor *d_decg[2]) {
    CLH_TRY(SCR(h->ctx, s, *d_x, h->geom.n * h->geom.tokens, h->cfg.hidden));
    size_t mark = clh_ws_mark(h->ctx);
    clip_scratch inner = {.n = 0};
    clh_status st = decode_backward_core(h, &inner, d_logits, *d_x, d_decg);
    clip_release_all(&inner);
    clh_ws_reset(h->ctx, mark);
    return st;
}

/* d of token rows [B*S, width] -> d of the [B, 1+S, width] input (CLS rows 0). */
static clh_status scatter_tokens(clh_cathead *h, const clh_tensor *d_tok, clh_tensor *d_input) {
    const ch_geom *g = &h->geom;
    int64_t width = d_tok->shape[1];
    if (clh_tensor_numel(d_input) != (size_t)g->batch * (g->tokens + 1) * width)
        return clh_fail(h->ctx, CLH_ERR_SHAPE,
                        "clh_cathead_backward: an input gradient does not match its input's size");
    CLH_TRY(clh_tensor_fill(d_input, 0.0f));
    return clh_scatter_add_rows(h->ctx, d_tok, h->tok_index, (size_t)g->batch * g->tokens,
                                RS(d_input, (int64_t)g->batch * (g->tokens + 1), width));
}

/* Planes [B, C, g, g] gradient -> token rows [B*S, C] (scratch). */
static clh_status planes_to_tokens(clh_cathead *h, clip_scratch *s, const clh_tensor *d_planes,
                                   clh_tensor **d_tok) {
    const ch_geom *g = &h->geom;
    int64_t ch = d_planes->shape[1];
    CLH_TRY(SCR(h->ctx, s, *d_tok, (int64_t)g->batch * g->tokens, ch));
    return clh_permute_0213(h->ctx, d_planes, g->batch, ch, g->tokens, 1, *d_tok);
}

static clh_status decoder_guidance_backward(clh_cathead *h, clip_scratch *s, int i,
                                            const clh_tensor *d_decg, clh_tensor *d_hook) {
    clh_ctx *ctx = h->ctx;
    ch_tape *t = &h->t;
    clh_tensor *a, *d_up, *d_pl, *d_tok;
    CLH_TRY(clip_ws(ctx, s, d_decg->ndim, d_decg->shape, &a));
    CLH_TRY(clip_ws(ctx, s, t->up[i]->ndim, t->up[i]->shape, &d_up));
    CLH_TRY(clip_ws(ctx, s, t->hook_pl[i]->ndim, t->hook_pl[i]->shape, &d_pl));
    CLH_TRY(clh_relu_backward(ctx, t->decg_pre[i], d_decg, a));
    CLH_TRY(clh_conv2d_backward(ctx, t->up[i], h->decoder_guidance_proj[i].w, 1, 1, a, d_up,
                                h->decoder_guidance_proj[i].dw, h->decoder_guidance_proj[i].db));
    CLH_TRY(clh_conv_transpose2d_backward(ctx, t->hook_pl[i], h->guidance_up[i].w, d_up,
                                          d_hook ? d_pl : NULL, h->guidance_up[i].dw,
                                          h->guidance_up[i].db));
    if (!d_hook)
        return CLH_OK;
    CLH_TRY(planes_to_tokens(h, s, d_pl, &d_tok));
    return scatter_tokens(h, d_tok, d_hook);
}

/* d tg -> d of the text rows the guidance was gathered from (d_src [T, P*d], zeroed here). */
static clh_status text_guidance_backward(clh_cathead *h, clip_scratch *s, const clh_tensor *d_tg,
                                         clh_tensor *d_src) {
    const ch_geom *g = &h->geom;
    const clh_cathead_config *c = &h->cfg;
    clh_ctx *ctx = h->ctx;
    ch_tape *t = &h->t;
    int64_t p = g->prompts, d = c->d_img;
    clh_tensor *a, *d_norm, *d_mean, *d_sel;
    CLH_TRY(SCR(ctx, s, a, g->n, c->text_proj));
    CLH_TRY(SCR(ctx, s, d_norm, g->n, d));
    CLH_TRY(SCR(ctx, s, d_mean, g->n, d));
    CLH_TRY(SCR(ctx, s, d_sel, g->n, p * d));
    CLH_TRY(clh_relu_backward(ctx, t->tlin, d_tg, a));
    CLH_TRY(clh_linear_backward(ctx, t->tnorm, h->text_proj.w, a, d_norm, h->text_proj.dw,
                                h->text_proj.db));
    CLH_TRY(clh_l2_normalize_backward(ctx, t->tmean, d_norm, d_mean));
    if (p == 1) {
        CLH_TRY(clh_tensor_copy(d_sel, d_mean));
    } else {
        clh_tensor *d_selp;
        CLH_TRY(SCR(ctx, s, d_selp, p, g->n, d));
        CLH_TRY(clh_scale(ctx, d_mean, 1.0f / (float)p));
        for (int64_t i = 0; i < p; i++)
            CLH_TRY(clh_tensor_copy(PART(d_selp, (size_t)(i * g->n * d), g->n, d), d_mean));
        CLH_TRY(clh_permute_0213(ctx, d_selp, 1, p, g->n, d, d_sel));
    }
    CLH_TRY(clh_tensor_fill(d_src, 0.0f));
    return clh_scatter_add_rows(ctx, d_sel, h->text_index, (size_t)g->n, d_src);
}

/* d of the cost embedding output tokens -> d of the normalised image tokens and text. */
static clh_status cost_volume_backward(clh_cathead *h, clip_scratch *s, const clh_tensor *d_x,
                                       clh_tensor **d_imgn, clh_tensor **d_textn) {
    const ch_geom *g = &h->geom;
    const clh_cathead_config *c = &h->cfg;
    clh_ctx *ctx = h->ctx;
    ch_tape *t = &h->t;
    int64_t tp_rows = (int64_t)g->classes_all * g->prompts, bs = (int64_t)g->batch * g->tokens;
    int64_t row = (int64_t)g->prompts * g->tokens;
    clh_tensor *d_x0, *d_corr, *d_all, *d_mm;
    CLH_TRY(SCR(ctx, s, d_x0, g->n, c->hidden, g->grid, g->grid));
    CLH_TRY(SCR(ctx, s, d_corr, g->n, g->prompts, g->grid, g->grid));
    CLH_TRY(SCR(ctx, s, d_mm, tp_rows, bs));
    CLH_TRY(SCR(ctx, s, *d_imgn, bs, c->d_img));
    CLH_TRY(SCR(ctx, s, *d_textn, tp_rows, c->d_img));
    CLH_TRY(clh_permute_0213(ctx, d_x, g->n, g->tokens, c->hidden, 1, d_x0));
    const clh_tensor *corr = h->topk ? t->corr : t->corr_all;
    CLH_TRY(clh_conv2d_backward(ctx, corr, h->cost_embed.w, 1, 3, d_x0, d_corr, h->cost_embed.dw,
                                h->cost_embed.db));
    d_all = d_corr;
    if (h->topk) {
        CLH_TRY(SCR(ctx, s, d_all, (int64_t)g->batch * g->classes_all, row));
        CLH_TRY(clh_tensor_fill(d_all, 0.0f));
        CLH_TRY(
            clh_scatter_add_rows(ctx, RS(d_corr, g->n, row), h->kept_rows, (size_t)g->n, d_all));
    }
    CLH_TRY(clh_permute_0213(ctx, d_all, 1, g->batch, tp_rows, g->tokens, d_mm));
    CLH_TRY(clh_gemm(ctx, 0, 0, (size_t)tp_rows, (size_t)c->d_img, (size_t)bs, 1.0f, d_mm,
                     (size_t)bs, t->imgn, (size_t)c->d_img, 0.0f, *d_textn, (size_t)c->d_img));
    return clh_gemm(ctx, 1, 0, (size_t)bs, (size_t)c->d_img, (size_t)tp_rows, 1.0f, d_mm,
                    (size_t)bs, t->textn, (size_t)c->d_img, 0.0f, *d_imgn, (size_t)c->d_img);
}

/* Image side: d_imgn and the appearance gradient -> d_dense. */
static clh_status image_backward(clh_cathead *h, clip_scratch *s, const clh_tensor *d_imgn,
                                 const clh_tensor *d_app_tok, clh_tensor *d_dense) {
    const ch_geom *g = &h->geom;
    const clh_cathead_config *c = &h->cfg;
    clh_ctx *ctx = h->ctx;
    ch_tape *t = &h->t;
    clh_tensor *d_app, *a, *d_res3, *d_tok_a, *d_tok;
    CLH_TRY(clip_ws(ctx, s, t->app->ndim, t->app->shape, &d_app));
    CLH_TRY(clip_ws(ctx, s, t->app->ndim, t->app->shape, &a));
    CLH_TRY(clip_ws(ctx, s, t->res3->ndim, t->res3->shape, &d_res3));
    CLH_TRY(clip_ws(ctx, s, t->img_tok->ndim, t->img_tok->shape, &d_tok));
    CLH_TRY(clh_permute_0213(ctx, d_app_tok, g->batch, g->tokens, c->appearance_proj, 1, d_app));
    CLH_TRY(clh_relu_backward(ctx, t->app_pre, d_app, a));
    CLH_TRY(clh_conv2d_backward(ctx, t->res3, h->appearance_proj.w, 1, 1, a,
                                d_dense ? d_res3 : NULL, h->appearance_proj.dw,
                                h->appearance_proj.db));
    if (!d_dense)
        return CLH_OK;
    CLH_TRY(planes_to_tokens(h, s, d_res3, &d_tok_a));
    CLH_TRY(clh_l2_normalize_backward(ctx, t->img_tok, d_imgn, d_tok));
    CLH_TRY(clh_add(ctx, d_tok, d_tok_a, d_tok));
    return scatter_tokens(h, d_tok, d_dense);
}

/* Text side: d of the normalised text (cost volume, and the guidance under top-k) plus the
 * guidance's gradient of the raw text without top-k -> d_text [T, P, d]. */
static clh_status text_backward(clh_cathead *h, clip_scratch *s, clh_tensor *d_textn,
                                const clh_tensor *d_src, clh_tensor *d_text) {
    const ch_geom *g = &h->geom;
    const clh_cathead_config *c = &h->cfg;
    clh_ctx *ctx = h->ctx;
    int64_t rows = (int64_t)g->classes_all * g->prompts;
    if (clh_tensor_numel(d_text) != (size_t)rows * c->d_img)
        return clh_fail(ctx, CLH_ERR_SHAPE,
                        "clh_cathead_backward: d_text does not match the text's size");
    if (h->topk)
        CLH_TRY(clh_add(ctx, d_textn, RS(d_src, rows, c->d_img), d_textn));
    CLH_TRY(clh_l2_normalize_backward(ctx, RS(h->in.text, rows, c->d_img), d_textn,
                                      RS(d_text, rows, c->d_img)));
    if (!h->topk)
        CLH_TRY(clh_add(ctx, d_text, RS(d_src, rows, c->d_img), d_text));
    (void)s;
    return CLH_OK;
}

static clh_status backward_core(clh_cathead *h, clip_scratch *s, const clh_tensor *d_logits,
                                clh_tensor *d_dense, clh_tensor *const d_hooks[2],
                                clh_tensor *d_text) {
    const ch_geom *g = &h->geom;
    const clh_cathead_config *c = &h->cfg;
    clh_ctx *ctx = h->ctx;
    clh_tensor *d_x = NULL, *d_decg[2], *d_app, *d_tg, *d_src, *d_imgn = NULL, *d_textn = NULL;
    for (int i = 0; i < 2; i++)
        CLH_TRY(clip_ws(ctx, s, h->t.decg[i]->ndim, h->t.decg[i]->shape, &d_decg[i]));
    CLH_TRY(SCR(ctx, s, d_app, (int64_t)g->batch * g->tokens, c->appearance_proj));
    CLH_TRY(SCR(ctx, s, d_tg, g->n, c->text_proj));
    CLH_TRY(SCR(ctx, s, d_src, g->classes_all, (int64_t)g->prompts * c->d_img));
    CLH_TRY(clh_tensor_fill(d_app, 0.0f));
    CLH_TRY(clh_tensor_fill(d_tg, 0.0f));
    CLH_TRY(decode_backward(h, s, d_logits, &d_x, d_decg));
    for (int l = c->n_layers - 1; l >= 0; l--)
        CLH_TRY(ch_layer_backward(ctx, c, g, &h->layers[l], &h->lt[l], h->t.app_tok, h->t.tg, d_x,
                                  d_app, d_tg));
    for (int i = 0; i < 2; i++)
        CLH_TRY(decoder_guidance_backward(h, s, i, d_decg[i], d_hooks ? d_hooks[i] : NULL));
    CLH_TRY(text_guidance_backward(h, s, d_tg, d_src));
    CLH_TRY(cost_volume_backward(h, s, d_x, &d_imgn, &d_textn));
    CLH_TRY(image_backward(h, s, d_imgn, d_app, d_dense));
    if (!d_text)
        return CLH_OK;
    return text_backward(h, s, d_textn, d_src, d_text);
}

clh_status clh_cathead_backward(clh_cathead *h, const clh_tensor *d_logits, clh_tensor *d_dense,
                                clh_tensor *const d_hooks[2], clh_tensor *d_text) {
    if (!h || !d_logits)
        return clh_fail(h ? h->ctx : NULL, CLH_ERR_INVALID_ARGUMENT,
                        "clh_cathead_backward: NULL head or d_logits");
    if (!h->pending)
        return clh_fail(h->ctx, CLH_ERR_INVALID_ARGUMENT,
                        "clh_cathead_backward: no pending training forward (call "
                        "clh_cathead_forward with train = 1 first)");
    const ch_geom *g = &h->geom;
    int64_t size = (int64_t)g->grid * 4;
    if (clh_tensor_numel(d_logits) != (size_t)g->batch * g->classes_all * size * size)
        return clh_fail(h->ctx, CLH_ERR_SHAPE,
                        "clh_cathead_backward: d_logits must match the logits [%d, %d, %lld, "
                        "%lld]",
                        g->batch, g->classes_all, (long long)size, (long long)size);
    h->pending = 0;
    size_t mark = clh_ws_mark(h->ctx);
    clip_scratch s = {.n = 0};
    clh_status st = backward_core(h, &s, d_logits, d_dense, d_hooks, d_text);
    clip_release_all(&s);
    clh_ws_reset(h->ctx, mark);
    return st;
}

/* ------------------------------------------------------------------ loss */

clh_status clh_seg_loss(clh_ctx *ctx, const clh_tensor *logits, const int32_t *labels, int height,
                        int width, const clh_seg_loss_options *options, double *loss,
                        clh_tensor *d_logits) {
    static const char fn[] = "clh_seg_loss";
    if (!ctx || !logits || !labels || !loss)
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT, "%s: NULL argument", fn);
    if (logits->ndim != 4 || height < 1 || width < 1)
        return clh_fail(ctx, CLH_ERR_SHAPE,
                        "%s: logits must be [B, T, h, w] and the labels at "
                        "least 1x1",
                        fn);
    clh_seg_loss_options o = options ? *options : (clh_seg_loss_options){255, 0};
    int64_t batch = logits->shape[0], classes = logits->shape[1];
    int64_t planes = batch * classes, pixels = (int64_t)height * width;
    if (d_logits && d_logits->numel != logits->numel)
        return clh_fail(ctx, CLH_ERR_SHAPE, "%s: d_logits must be shaped like logits", fn);
    size_t mark = clh_ws_mark(ctx);
    clip_scratch s = {.n = 0};
    clh_tensor *up = NULL, *d_up = NULL;
    clh_status st = SCR(ctx, &s, up, planes, 1, height, width);
    if (st == CLH_OK && d_logits)
        st = SCR(ctx, &s, d_up, planes, 1, height, width);
    if (st == CLH_OK)
        st = clh_bilinear_resize_forward(
            ctx, RS(logits, planes, 1, logits->shape[2], logits->shape[3]), 0, up);
    if (st == CLH_OK)
        st = clh_bce_logits_loss(ctx, up, labels, (int)batch, (int)classes, pixels, o.ignore_label,
                                 o.exclude_ignored, loss, d_up);
    if (st == CLH_OK && d_logits)
        st = clh_bilinear_resize_backward(
            ctx, d_up, 0, RS(d_logits, planes, 1, logits->shape[2], logits->shape[3]));
    clip_release_all(&s);
    clh_ws_reset(ctx, mark);
    return st;
}
