/* H-CLIP files: the folded export (plain CLIP weights with HF names) and training
 * checkpoints (trainable tensors + optimiser state + metadata, atomically written). */
#include <errno.h>
#include <math.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <cjson/cJSON.h>

#include "clip_internal.h"
#include "hclip.h"

#define CHECKPOINT_FORMAT  "clhclip-hclip-checkpoint"
#define CHECKPOINT_VERSION "1"

/* ------------------------------------------------------------------ helpers */

/* Download t and add it to the writer under name. */
static clh_status put_tensor(clh_st_writer *w, const char *name, const clh_tensor *t) {
    size_t n = clh_tensor_numel(t);
    float *host = malloc((n ? n : 1) * sizeof *host);
    if (!host)
        return clh_fail(clh_tensor_ctx(t), CLH_ERR_OUT_OF_MEMORY, "out of host memory for '%s'",
                        name);
    clh_status st = clh_tensor_download(t, host, n);
    if (st == CLH_OK)
        st = clh_st_writer_add_f32(w, name, clh_tensor_ndim(t), clh_tensor_shape(t), host);
    free(host);
    return st;
}

static clh_status put_folded(clh_hclip *h, clh_st_writer *w, const char *name,
                             const clh_tensor *weight, const clh_tensor *blocks, int side) {
    clh_ctx *ctx = clh_clip_ctx(clh_hclip_base(h));
    clh_tensor *folded = NULL;
    clh_status st = clh_tensor_new(ctx, 2, clh_tensor_shape(weight), &folded);
    if (st == CLH_OK)
        st = clh_blockdiag_fold(ctx, weight, blocks, side, folded);
    if (st == CLH_OK)
        st = put_tensor(w, name, folded);
    clh_tensor_release(folded);
    return st;
}

/* Blocks [b, q, q] of tower e (0 text, 1 vision), layer l, matrix t (q, k, v, out). */
static clh_status tower_blocks(clh_hclip *h, int e, int l, int t, clh_tensor **out) {
    const clh_dcrc_layout *L = clh_hclip_layout(h);
    int b = e ? L->vision_blocks : L->text_blocks;
    size_t first = e ? (size_t)4 * L->text_layers * L->text_blocks : 0;
    first += (size_t)(l * 4 + t) * (size_t)b;
    int64_t shape[3] = {b, L->q, L->q};
    return clh_tensor_view((clh_tensor *)clh_hclip_blocks(h), first * (size_t)L->q * L->q, 3, shape,
                           out);
}

static clh_status put_layer(clh_hclip *h, clh_st_writer *w, const char *prefix, int e, int l,
                            const clip_layer *L) {
    static const char *proj[4] = {"q_proj", "k_proj", "v_proj", "out_proj"};
    char name[256];
    for (int t = 0; t < 4; t++) {
        clh_tensor *blocks = NULL;
        CLH_TRY(tower_blocks(h, e, l, t, &blocks));
        snprintf(name, sizeof name, "%s%d.self_attn.%s.weight", prefix, l, proj[t]);
        clh_status st = put_folded(h, w, name, L->w[t], blocks, t == 3);
        clh_tensor_release(blocks);
        CLH_TRY(st);
        snprintf(name, sizeof name, "%s%d.self_attn.%s.bias", prefix, l, proj[t]);
        CLH_TRY(put_tensor(w, name, L->b[t]));
    }
    const struct {
        const char *suffix;
        const clh_tensor *t;
    } rest[] = {{"layer_norm1.weight", L->ln1_w}, {"layer_norm1.bias", L->ln1_b},
                {"layer_norm2.weight", L->ln2_w}, {"layer_norm2.bias", L->ln2_b},
                {"mlp.fc1.weight", L->fc1_w},     {"mlp.fc1.bias", L->fc1_b},
                {"mlp.fc2.weight", L->fc2_w},     {"mlp.fc2.bias", L->fc2_b}};
    for (size_t i = 0; i < sizeof rest / sizeof *rest; i++) {
        snprintf(name, sizeof name, "%s%d.%s", prefix, l, rest[i].suffix);
        CLH_TRY(put_tensor(w, name, rest[i].t));
    }
    return CLH_OK;
}

static clh_status put_embeddings(clh_st_writer *w, const struct clh_clip *m) {
    const struct {
        const char *name;
        const clh_tensor *t;
    } all[] = {
        {"vision_model.embeddings.patch_embedding.weight", m->patch_w},
        {"vision_model.embeddings.class_embedding", m->class_emb},
        {"vision_model.embeddings.position_embedding.weight", m->vis_pos},
        {"vision_model.pre_layrnorm.weight", m->pre_ln_w},
        {"vision_model.pre_layrnorm.bias", m->pre_ln_b},
        {"vision_model.post_layernorm.weight", m->post_ln_w},
        {"vision_model.post_layernorm.bias", m->post_ln_b},
        {"visual_projection.weight", m->vis_proj},
        {"text_model.embeddings.token_embedding.weight", m->tok_emb},
        {"text_model.embeddings.position_embedding.weight", m->txt_pos},
        {"text_model.final_layer_norm.weight", m->final_ln_w},
        {"text_model.final_layer_norm.bias", m->final_ln_b},
        {"text_projection.weight", m->txt_proj},
    };
    for (size_t i = 0; i < sizeof all / sizeof *all; i++)
        CLH_TRY(put_tensor(w, all[i].name, all[i].t));
    int64_t one[1] = {1};
    return clh_st_writer_add_f32(w, "logit_scale", 0, one, &m->cfg.logit_scale);
}

static cJSON *tower_json(const clh_clip_tower_config *t) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "hidden_size", t->hidden);
    cJSON_AddNumberToObject(o, "intermediate_size", t->intermediate);
    cJSON_AddNumberToObject(o, "num_hidden_layers", t->layers);
    cJSON_AddNumberToObject(o, "num_attention_heads", t->heads);
    cJSON_AddNumberToObject(o, "layer_norm_eps", t->eps);
    cJSON_AddStringToObject(o, "hidden_act", t->act == CLH_ACT_GELU ? "gelu" : "quick_gelu");
    return o;
}

/* HF config.json text for c (caller frees). */
static char *config_json(const clh_clip_config *c) {
    cJSON *root = cJSON_CreateObject();
    cJSON *text = tower_json(&c->text), *vision = tower_json(&c->vision);
    cJSON_AddNumberToObject(text, "vocab_size", c->vocab_size);
    cJSON_AddNumberToObject(text, "max_position_embeddings", c->max_positions);
    cJSON_AddNumberToObject(text, "eos_token_id", c->eos_argmax ? 2 : c->eos_token_id);
    cJSON_AddNumberToObject(vision, "image_size", c->image_size);
    cJSON_AddNumberToObject(vision, "patch_size", c->patch_size);
    cJSON_AddItemToObject(root, "text_config", text);
    cJSON_AddItemToObject(root, "vision_config", vision);
    cJSON_AddNumberToObject(root, "projection_dim", c->projection_dim);
    cJSON_AddNumberToObject(root, "logit_scale_init_value", c->logit_scale);
    cJSON_AddStringToObject(root, "model_type", "clip");
    char *s = cJSON_Print(root);
    cJSON_Delete(root);
    return s;
}

static clh_status write_text_file(const char *path, const char *text) {
    char tmp[2100];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (!f)
        return clh_fail(NULL, CLH_ERR_IO, "cannot write '%s': %s", tmp, strerror(errno));
    int ok = fputs(text, f) >= 0;
    ok &= fclose(f) == 0;
    if (!ok || rename(tmp, path) != 0) {
        remove(tmp);
        return clh_fail(NULL, CLH_ERR_IO, "cannot write '%s': %s", path, strerror(errno));
    }
    return CLH_OK;
}

static clh_status export_body(clh_hclip *h, clh_st_writer *w, const char *dir) {
    const struct clh_clip *m = clh_hclip_base(h);
    CLH_TRY(put_embeddings(w, m));
    for (int l = 0; l < m->cfg.vision.layers; l++)
        CLH_TRY(put_layer(h, w, "vision_model.encoder.layers.", 1, l, &m->vis_layers[l]));
    for (int l = 0; l < m->cfg.text.layers; l++)
        CLH_TRY(put_layer(h, w, "text_model.encoder.layers.", 0, l, &m->txt_layers[l]));
    CLH_TRY(clh_st_writer_set_metadata(w, "format", "pt"));
    char path[2048];
    if (snprintf(path, sizeof path, "%s/model.safetensors", dir) >= (int)sizeof path)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "export directory name too long");
    CLH_TRY(clh_st_writer_save(w, path));
    char *json = config_json(&m->cfg);
    if (!json)
        return clh_fail(NULL, CLH_ERR_OUT_OF_MEMORY, "config.json: out of memory");
    snprintf(path, sizeof path, "%s/config.json", dir);
    clh_status st = write_text_file(path, json);
    cJSON_free(json);
    return st;
}

clh_status clh_hclip_export_folded(clh_hclip *h, const char *dir) {
    if (!h || !dir)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "clh_hclip_export_folded: NULL argument");
    if (mkdir(dir, 0755) != 0 && errno != EEXIST)
        return clh_fail(NULL, CLH_ERR_IO, "cannot create '%s': %s", dir, strerror(errno));
    clh_st_writer *w;
    CLH_TRY(clh_st_writer_new(&w));
    clh_status st = export_body(h, w, dir);
    clh_st_writer_free(w);
    return st;
}

/* ------------------------------------------------------------------ checkpoints */

/* The configuration a checkpoint must match: adapters and the base model's shapes. */
static char *adapter_config_json(clh_hclip *h) {
    const clh_hclip_options *o = clh_hclip_get_options(h);
    const clh_dcrc_layout *L = clh_hclip_layout(h);
    cJSON *root = cJSON_CreateObject();
    cJSON_AddNumberToObject(root, "block_size", o->block_size);
    cJSON_AddNumberToObject(root, "ortho", o->ortho);
    cJSON_AddNumberToObject(root, "no_modality_map", o->no_modality_map);
    cJSON_AddNumberToObject(root, "no_layer_map", o->no_layer_map);
    cJSON_AddNumberToObject(root, "text_layers", L->text_layers);
    cJSON_AddNumberToObject(root, "vision_layers", L->vision_layers);
    cJSON_AddNumberToObject(root, "text_blocks", L->text_blocks);
    cJSON_AddNumberToObject(root, "vision_blocks", L->vision_blocks);
    char *s = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    return s;
}

static clh_status set_meta_u64(clh_st_writer *w, const char *key, uint64_t v) {
    char buf[32];
    snprintf(buf, sizeof buf, "%" PRIu64, v);
    return clh_st_writer_set_metadata(w, key, buf);
}

static char *adamw_groups_json(clh_adamw *opt, int *n_groups) {
    cJSON *arr = cJSON_CreateArray();
    int groups = 0;
    for (int i = 0; i < clh_adamw_num_params(opt); i++)
        if (clh_adamw_param_at(opt, i)->group + 1 > groups)
            groups = clh_adamw_param_at(opt, i)->group + 1;
    for (int g = 0; g < groups; g++) {
        const clh_adamw_config *c = clh_adamw_group_config(opt, g);
        cJSON *o = cJSON_CreateObject();
        cJSON_AddNumberToObject(o, "lr", c->lr);
        cJSON_AddNumberToObject(o, "beta1", c->beta1);
        cJSON_AddNumberToObject(o, "beta2", c->beta2);
        cJSON_AddNumberToObject(o, "eps", c->eps);
        cJSON_AddNumberToObject(o, "weight_decay", c->weight_decay);
        cJSON_AddItemToArray(arr, o);
    }
    *n_groups = groups;
    char *s = cJSON_PrintUnformatted(arr);
    cJSON_Delete(arr);
    return s;
}

static clh_status save_optimizer(clh_st_writer *w, clh_adamw *opt) {
    char name[64];
    for (int i = 0; i < clh_adamw_num_params(opt); i++) {
        const clh_adamw_param *p = clh_adamw_param_at(opt, i);
        snprintf(name, sizeof name, "adamw.m.%d", i);
        CLH_TRY(put_tensor(w, name, p->m));
        snprintf(name, sizeof name, "adamw.v.%d", i);
        CLH_TRY(put_tensor(w, name, p->v));
    }
    int groups = 0;
    char *json = adamw_groups_json(opt, &groups);
    clh_status st = json ? clh_st_writer_set_metadata(w, "adamw_groups", json)
                         : clh_fail(NULL, CLH_ERR_OUT_OF_MEMORY, "checkpoint: out of memory");
    cJSON_free(json);
    CLH_TRY(st);
    CLH_TRY(set_meta_u64(w, "adamw_params", (uint64_t)clh_adamw_num_params(opt)));
    return set_meta_u64(w, "adamw_t", (uint64_t)clh_adamw_steps(opt));
}

static clh_status save_body(clh_hclip *h, clh_adamw *opt, const clh_train_state *state,
                            const char *extra, const clh_ckpt_more *more, clh_st_writer *w) {
    for (int i = 0; i < clh_hclip_num_params(h); i++) {
        const char *name;
        clh_tensor *p;
        CLH_TRY(clh_hclip_param(h, i, &name, &p, NULL));
        CLH_TRY(put_tensor(w, name, p));
    }
    for (int i = 0; more && i < more->n; i++)
        CLH_TRY(put_tensor(w, more->names[i], more->tensors[i]));
    for (int i = 0; more && i < more->n_meta; i++)
        CLH_TRY(clh_st_writer_set_metadata(w, more->meta_keys[i], more->meta_values[i]));
    if (opt)
        CLH_TRY(save_optimizer(w, opt));
    char *cfg = adapter_config_json(h);
    if (!cfg)
        return clh_fail(NULL, CLH_ERR_OUT_OF_MEMORY, "checkpoint: out of memory");
    clh_status st = clh_st_writer_set_metadata(w, "config", cfg);
    cJSON_free(cfg);
    CLH_TRY(st);
    CLH_TRY(clh_st_writer_set_metadata(w, "format", CHECKPOINT_FORMAT));
    CLH_TRY(clh_st_writer_set_metadata(w, "version", CHECKPOINT_VERSION));
    CLH_TRY(set_meta_u64(w, "base_hash", clh_clip_weights_hash(clh_hclip_base(h))));
    if (state) {
        CLH_TRY(set_meta_u64(w, "step", (uint64_t)state->step));
        CLH_TRY(set_meta_u64(w, "rng_seed", state->rng.seed));
        CLH_TRY(set_meta_u64(w, "rng_counter", state->rng.counter));
    }
    if (extra)
        CLH_TRY(clh_st_writer_set_metadata(w, "extra", extra));
    return CLH_OK;
}

clh_status clh_hclip_save_checkpoint(clh_hclip *h, clh_adamw *opt, const clh_train_state *state,
                                     const char *extra_json, const char *path) {
    return clh_hclip_save_checkpoint_more(h, opt, state, extra_json, NULL, path);
}

clh_status clh_hclip_save_checkpoint_more(clh_hclip *h, clh_adamw *opt,
                                          const clh_train_state *state, const char *extra_json,
                                          const clh_ckpt_more *more, const char *path) {
    if (!h || !path)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "clh_hclip_save_checkpoint: NULL argument");
    clh_st_writer *w;
    CLH_TRY(clh_st_writer_new(&w));
    clh_status st = save_body(h, opt, state, extra_json, more, w);
    if (st == CLH_OK)
        st = clh_st_writer_save(w, path);
    clh_st_writer_free(w);
    return st;
}

static clh_status meta_u64(const clh_st_file *f, const char *path, const char *key, uint64_t *out) {
    const char *v = clh_st_metadata(f, key);
    char *end = NULL;
    if (!v || !*v)
        return clh_fail(NULL, CLH_ERR_FORMAT, "checkpoint '%s': metadata '%s' is missing", path,
                        key);
    errno = 0;
    unsigned long long x = strtoull(v, &end, 10);
    if (errno || *end)
        return clh_fail(NULL, CLH_ERR_FORMAT,
                        "checkpoint '%s': metadata '%s' = '%s' is not a "
                        "number",
                        path, key, v);
    *out = x;
    return CLH_OK;
}

/* Refuse checkpoints of another format, base model or adapter configuration. */
static clh_status check_identity(clh_hclip *h, const clh_st_file *f, const char *path) {
    const char *format = clh_st_metadata(f, "format");
    if (!format || strcmp(format, CHECKPOINT_FORMAT) != 0)
        return clh_fail(NULL, CLH_ERR_FORMAT, "'%s' is not an H-CLIP checkpoint (format '%s')",
                        path, format ? format : "");
    const char *version = clh_st_metadata(f, "version");
    if (!version || strcmp(version, CHECKPOINT_VERSION) != 0)
        return clh_fail(NULL, CLH_ERR_FORMAT,
                        "checkpoint '%s' has version '%s'; this build "
                        "reads version %s",
                        path, version ? version : "", CHECKPOINT_VERSION);
    uint64_t hash;
    CLH_TRY(meta_u64(f, path, "base_hash", &hash));
    uint64_t mine = clh_clip_weights_hash(clh_hclip_base(h));
    if (hash != mine)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT,
                        "checkpoint '%s' was made for other base weights (hash %016" PRIx64
                        ", the loaded model has %016" PRIx64 ")",
                        path, hash, mine);
    char *cfg = adapter_config_json(h);
    const char *theirs = clh_st_metadata(f, "config");
    int same = cfg && theirs && strcmp(cfg, theirs) == 0;
    clh_status st = same ? CLH_OK
                         : clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT,
                                    "checkpoint '%s' has adapter configuration %s, but the "
                                    "model is configured as %s",
                                    path, theirs ? theirs : "(none)", cfg ? cfg : "?");
    cJSON_free(cfg);
    return st;
}

/* ------------------------------------------------------------------ loading */

/* A tensor of the checkpoint staged in host memory before anything on the device changes,
 * with a backup of the device values it replaces. */
typedef struct staged {
    char name[64];
    clh_tensor *dst;
    float *data, *backup;
    size_t n;
} staged;

typedef struct stage_list {
    staged *items;
    int n, cap;
} stage_list;

static void stage_free(stage_list *l) {
    for (int i = 0; i < l->n; i++) {
        free(l->items[i].data);
        free(l->items[i].backup);
    }
    free(l->items);
}

static int is_float_dtype(clh_dtype d) {
    return d == CLH_DTYPE_F32 || d == CLH_DTYPE_F16 || d == CLH_DTYPE_BF16 || d == CLH_DTYPE_F64;
}

/* Read `name` (a float tensor of exactly dst's shape, all values finite) into host memory. */
static clh_status stage(stage_list *l, const clh_st_file *f, const char *path, const char *name,
                        clh_tensor *dst) {
    clh_st_tensor_info info;
    if (clh_st_info(f, name, &info) != CLH_OK)
        return clh_fail(NULL, CLH_ERR_FORMAT, "checkpoint '%s' lacks tensor '%s'", path, name);
    int same = is_float_dtype(info.dtype) && info.ndim == clh_tensor_ndim(dst);
    for (int i = 0; same && i < info.ndim; i++)
        same = info.shape[i] == clh_tensor_dim(dst, i);
    if (!same) {
        char got[128], want[128];
        clh_shape_str(info.ndim, info.shape, got, sizeof got);
        clh_shape_str(clh_tensor_ndim(dst), clh_tensor_shape(dst), want, sizeof want);
        return clh_fail(NULL, CLH_ERR_FORMAT,
                        "checkpoint '%s': tensor '%s' is %s %s, expected a float tensor %s", path,
                        name, clh_dtype_name(info.dtype), got, want);
    }
    if (l->n == l->cap) {
        int cap = l->cap ? 2 * l->cap : 8;
        staged *items = realloc(l->items, (size_t)cap * sizeof *items);
        if (!items)
            return clh_fail(NULL, CLH_ERR_OUT_OF_MEMORY, "checkpoint: out of host memory");
        l->items = items;
        l->cap = cap;
    }
    staged *e = &l->items[l->n];
    memset(e, 0, sizeof *e);
    snprintf(e->name, sizeof e->name, "%s", name);
    e->dst = dst;
    e->n = info.numel;
    e->data = malloc((e->n ? e->n : 1) * sizeof *e->data);
    e->backup = malloc((e->n ? e->n : 1) * sizeof *e->backup);
    l->n++; /* freed by stage_free even when reading fails */
    if (!e->data || !e->backup)
        return clh_fail(NULL, CLH_ERR_OUT_OF_MEMORY, "checkpoint: out of host memory");
    CLH_TRY(clh_st_read_f32(f, name, e->data, e->n));
    for (size_t i = 0; i < e->n; i++)
        if (!isfinite(e->data[i]))
            return clh_fail(NULL, CLH_ERR_FORMAT,
                            "checkpoint '%s': tensor '%s' holds a non-finite value at %zu", path,
                            name, i);
    return CLH_OK;
}

static clh_status stage_all(clh_hclip *h, clh_adamw *opt, const clh_ckpt_more *more,
                            const clh_st_file *f, const char *path, stage_list *l) {
    for (int i = 0; i < clh_hclip_num_params(h); i++) {
        const char *name;
        clh_tensor *p;
        CLH_TRY(clh_hclip_param(h, i, &name, &p, NULL));
        CLH_TRY(stage(l, f, path, name, p));
    }
    for (int i = 0; more && i < more->n; i++)
        CLH_TRY(stage(l, f, path, more->names[i], more->tensors[i]));
    if (!opt)
        return CLH_OK;
    uint64_t n;
    CLH_TRY(meta_u64(f, path, "adamw_params", &n));
    if ((int)n != clh_adamw_num_params(opt))
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT,
                        "checkpoint '%s' holds optimiser state for %d parameters, the optimiser "
                        "has %d",
                        path, (int)n, clh_adamw_num_params(opt));
    char name[64];
    for (int i = 0; i < (int)n; i++) {
        snprintf(name, sizeof name, "adamw.m.%d", i);
        CLH_TRY(stage(l, f, path, name, clh_adamw_param_at(opt, i)->m));
        snprintf(name, sizeof name, "adamw.v.%d", i);
        CLH_TRY(stage(l, f, path, name, clh_adamw_param_at(opt, i)->v));
    }
    return CLH_OK;
}

/* Upload the staged values (or the backups) and rebuild the transforms. */
static clh_status apply(clh_hclip *h, const stage_list *l, int backups) {
    for (int i = 0; i < l->n; i++) {
        const staged *e = &l->items[i];
        CLH_TRY(clh_tensor_upload(e->dst, backups ? e->backup : e->data, e->n));
    }
    return clh_hclip_update(h);
}

/* Everything is read and checked before the device changes; a failure while applying
 * restores the previous values, so a bad checkpoint loses nothing. */
static clh_status load_body(clh_hclip *h, clh_adamw *opt, clh_train_state *state,
                            const clh_ckpt_more *more, const clh_st_file *f, const char *path,
                            stage_list *l) {
    uint64_t t = 0, step = 0, seed = 0, counter = 0;
    CLH_TRY(check_identity(h, f, path));
    CLH_TRY(stage_all(h, opt, more, f, path, l));
    if (opt)
        CLH_TRY(meta_u64(f, path, "adamw_t", &t));
    if (state) {
        CLH_TRY(meta_u64(f, path, "step", &step));
        CLH_TRY(meta_u64(f, path, "rng_seed", &seed));
        CLH_TRY(meta_u64(f, path, "rng_counter", &counter));
    }
    for (int i = 0; i < l->n; i++)
        CLH_TRY(clh_tensor_download(l->items[i].dst, l->items[i].backup, l->items[i].n));
    clh_hclip_discard(h); /* saved activations would not match the new transforms */
    clh_status st = apply(h, l, 0);
    if (st != CLH_OK) {
        char msg[4096];
        snprintf(msg, sizeof msg, "%s", clh_last_error());
        apply(h, l, 1);
        return clh_fail(NULL, st, "%s (the previous values were restored)", msg);
    }
    if (opt)
        clh_adamw_set_steps(opt, (long)t);
    if (state) {
        state->step = (long)step;
        state->rng.seed = seed;
        state->rng.counter = counter;
    }
    return CLH_OK;
}

clh_status clh_hclip_load_checkpoint(clh_hclip *h, clh_adamw *opt, clh_train_state *state,
                                     const char *path) {
    return clh_hclip_load_checkpoint_more(h, opt, state, NULL, path);
}

clh_status clh_hclip_load_checkpoint_more(clh_hclip *h, clh_adamw *opt, clh_train_state *state,
                                          const clh_ckpt_more *more, const char *path) {
    if (!h || !path)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "clh_hclip_load_checkpoint: NULL argument");
    clh_st_file *f;
    CLH_TRY(clh_st_open(path, &f));
    stage_list staged_tensors = {0};
    clh_status st = load_body(h, opt, state, more, f, path, &staged_tensors);
    stage_free(&staged_tensors);
    clh_st_close(f);
    return st;
}
