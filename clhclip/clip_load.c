/* CLIP model loading: locate files, read the config or infer it from tensor shapes,
 * map HF or OpenAI/open_clip tensor names onto one set of device tensors. */
#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "clip_internal.h"

typedef enum { NAMES_HF, NAMES_OPENAI } name_style;

typedef struct loader {
    clh_ctx *ctx;
    clh_st_file *st;
    const char *path; /* weights file, for messages */
    name_style style;
} loader;

/* ------------------------------------------------------------------ files */

static int is_dir(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

static int is_file(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

static int ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcmp(s + n - m, suffix) == 0;
}

/* The weights file inside a model directory: the usual names first, else the only
 * *.safetensors file there. */
static clh_status find_weights(const char *dir, char *out, size_t size) {
    static const char *names[] = {"model.safetensors", "open_clip_model.safetensors"};
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
        snprintf(out, size, "%s/%s", dir, names[i]);
        if (is_file(out))
            return CLH_OK;
    }
    DIR *d = opendir(dir);
    if (!d)
        return clh_fail(NULL, CLH_ERR_IO, "cannot open model directory '%s': %s", dir,
                        strerror(errno));
    int found = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        if (ends_with(e->d_name, ".safetensors")) {
            if (found++ == 0)
                snprintf(out, size, "%s/%s", dir, e->d_name);
        }
    closedir(d);
    if (found == 1)
        return CLH_OK;
    if (found == 0)
        return clh_fail(NULL, CLH_ERR_IO,
                        "no .safetensors weights in '%s' (expected model.safetensors; convert "
                        "OpenAI .pt files with models/convert_to_safetensors.py)",
                        dir);
    return clh_fail(NULL, CLH_ERR_FORMAT,
                    "'%s' holds %d .safetensors files and no model.safetensors: sharded "
                    "checkpoints are not supported, pass the file to use",
                    dir, found);
}

/* ------------------------------------------------------------------ config inference */

static int has_tensor(const clh_st_file *st, const char *name) {
    clh_st_tensor_info info;
    return clh_st_info(st, name, &info) == CLH_OK;
}

static clh_status tensor_info(const loader *ld, const char *name, clh_st_tensor_info *info) {
    clh_status st = clh_st_info(ld->st, name, info);
    if (st != CLH_OK)
        return clh_fail(ld->ctx, CLH_ERR_NOT_FOUND, "CLIP weights '%s': missing tensor '%s'",
                        ld->path, name);
    return CLH_OK;
}

static int count_layers(const clh_st_file *st, const char *fmt) {
    char name[256];
    int n = 0;
    for (;;) {
        snprintf(name, sizeof name, fmt, n);
        if (!has_tensor(st, name))
            return n;
        n++;
    }
}

static clh_status dim_of(const loader *ld, const char *name, int axis, int *out) {
    clh_st_tensor_info info;
    CLH_TRY(tensor_info(ld, name, &info));
    if (axis >= info.ndim)
        return clh_fail(ld->ctx, CLH_ERR_FORMAT, "CLIP weights '%s': tensor '%s' has %d dims",
                        ld->path, name, info.ndim);
    *out = (int)info.shape[axis];
    return CLH_OK;
}

/* Shapes cannot tell QuickGELU (OpenAI) from exact GELU (LAION open_clip models without
 * "-quickgelu"): a "hidden_act" metadata entry, written by models/convert_to_safetensors.py
 * --act, decides; without it OpenAI's QuickGELU is assumed. */
static clh_status infer_activation(const loader *ld, clh_clip_config *cfg) {
    const char *act = clh_st_metadata(ld->st, "hidden_act");
    clh_activation a = CLH_ACT_QUICK_GELU;
    if (act && strcmp(act, "gelu") == 0)
        a = CLH_ACT_GELU;
    else if (act && strcmp(act, "quick_gelu") != 0)
        return clh_fail(ld->ctx, CLH_ERR_UNSUPPORTED,
                        "CLIP weights '%s': hidden_act '%s' is not supported (quick_gelu, gelu)",
                        ld->path, act);
    cfg->vision.act = cfg->text.act = a;
    return CLH_OK;
}

/* Architecture from shapes (hclip-spec 8.1): heads = width / 64, as OpenAI's build_model. */
static clh_status infer_config(loader *ld, clh_clip_config *cfg) {
    int hf = ld->style == NAMES_HF;
    clh_clip_config_defaults(cfg);
    int pos_rows = 0, grid;
    CLH_TRY(dim_of(ld,
                   hf ? "vision_model.embeddings.patch_embedding.weight" : "visual.conv1.weight", 0,
                   &cfg->vision.hidden));
    CLH_TRY(dim_of(ld,
                   hf ? "vision_model.embeddings.patch_embedding.weight" : "visual.conv1.weight", 3,
                   &cfg->patch_size));
    CLH_TRY(dim_of(ld,
                   hf ? "vision_model.embeddings.position_embedding.weight"
                      : "visual.positional_embedding",
                   0, &pos_rows));
    grid = (int)lround(sqrt((double)(pos_rows - 1)));
    if (grid * grid + 1 != pos_rows)
        return clh_fail(ld->ctx, CLH_ERR_FORMAT,
                        "CLIP weights '%s': %d vision positions is not 1 + a square grid", ld->path,
                        pos_rows);
    cfg->image_size = grid * cfg->patch_size;
    cfg->vision.layers =
        count_layers(ld->st, hf ? "vision_model.encoder.layers.%d.mlp.fc1.weight"
                                : "visual.transformer.resblocks.%d.mlp.c_fc.weight");
    CLH_TRY(dim_of(ld,
                   hf ? "vision_model.encoder.layers.0.mlp.fc1.weight"
                      : "visual.transformer.resblocks.0.mlp.c_fc.weight",
                   0, &cfg->vision.intermediate));
    CLH_TRY(dim_of(ld,
                   hf ? "text_model.embeddings.token_embedding.weight" : "token_embedding.weight",
                   0, &cfg->vocab_size));
    CLH_TRY(dim_of(ld,
                   hf ? "text_model.embeddings.token_embedding.weight" : "token_embedding.weight",
                   1, &cfg->text.hidden));
    CLH_TRY(dim_of(ld,
                   hf ? "text_model.embeddings.position_embedding.weight" : "positional_embedding",
                   0, &cfg->max_positions));
    cfg->text.layers = count_layers(ld->st, hf ? "text_model.encoder.layers.%d.mlp.fc1.weight"
                                               : "transformer.resblocks.%d.mlp.c_fc.weight");
    CLH_TRY(dim_of(ld,
                   hf ? "text_model.encoder.layers.0.mlp.fc1.weight"
                      : "transformer.resblocks.0.mlp.c_fc.weight",
                   0, &cfg->text.intermediate));
    CLH_TRY(dim_of(ld, hf ? "text_projection.weight" : "text_projection", hf ? 0 : 1,
                   &cfg->projection_dim));
    cfg->vision.heads = cfg->vision.hidden / 64;
    cfg->text.heads = cfg->text.hidden / 64;
    if (cfg->vision.heads < 1 || cfg->text.heads < 1 || cfg->vision.hidden % 64 ||
        cfg->text.hidden % 64)
        return clh_fail(ld->ctx, CLH_ERR_FORMAT,
                        "CLIP weights '%s' without config.json: widths %d/%d are not multiples "
                        "of 64, so the head count cannot be inferred; add a config.json",
                        ld->path, cfg->vision.hidden, cfg->text.hidden);
    /* OpenAI pooling takes the argmax of the ids (EOT is the largest id). */
    cfg->eos_argmax = 1;
    cfg->eos_token_id = cfg->vocab_size - 1;
    return infer_activation(ld, cfg);
}

/* ------------------------------------------------------------------ tensors */

static clh_status check_shape(const loader *ld, const char *name, const clh_st_tensor_info *info,
                              int ndim, const int64_t *shape) {
    int same = info->ndim == ndim;
    for (int i = 0; same && i < ndim; i++)
        same = info->shape[i] == shape[i];
    if (same)
        return CLH_OK;
    char want[128], got[128];
    clh_shape_str(ndim, shape, want, sizeof want);
    clh_shape_str(info->ndim, info->shape, got, sizeof got);
    return clh_fail(ld->ctx, CLH_ERR_SHAPE,
                    "CLIP weights '%s': tensor '%s' has shape %s but the config needs %s", ld->path,
                    name, got, want);
}

/* Read `name` (checked against shape) into host memory as fp32. */
static clh_status read_host(const loader *ld, const char *name, int ndim, const int64_t *shape,
                            float **out) {
    clh_st_tensor_info info;
    *out = NULL;
    CLH_TRY(tensor_info(ld, name, &info));
    CLH_TRY(check_shape(ld, name, &info, ndim, shape));
    float *buf = malloc((info.numel ? info.numel : 1) * sizeof(float));
    if (!buf)
        return clh_fail(ld->ctx, CLH_ERR_OUT_OF_MEMORY, "out of host memory reading '%s'", name);
    clh_status st = clh_st_read_f32(ld->st, name, buf, info.numel);
    if (st != CLH_OK) {
        free(buf);
        return clh_fail(ld->ctx, st, "%s", clh_last_error());
    }
    *out = buf;
    return CLH_OK;
}

static clh_status load_tensor(const loader *ld, const char *name, int ndim, const int64_t *shape,
                              clh_tensor **out) {
    float *host;
    CLH_TRY(read_host(ld, name, ndim, shape, &host));
    clh_status st = clh_tensor_from_host(ld->ctx, ndim, shape, host, out);
    free(host);
    return st;
}

/* Load `name` [rows, cols] transposed into a device tensor [cols, rows]. OpenAI stores
 * projections as x @ proj; we keep the HF (nn.Linear) layout W[out, in]. */
static clh_status load_transposed(const loader *ld, const char *name, int64_t rows, int64_t cols,
                                  clh_tensor **out) {
    int64_t shape[2] = {rows, cols}, tshape[2] = {cols, rows};
    float *host;
    CLH_TRY(read_host(ld, name, 2, shape, &host));
    float *t = malloc((size_t)(rows * cols) * sizeof(float));
    clh_status st = CLH_ERR_OUT_OF_MEMORY;
    if (t) {
        for (int64_t r = 0; r < rows; r++)
            for (int64_t c = 0; c < cols; c++)
                t[c * rows + r] = host[r * cols + c];
        st = clh_tensor_from_host(ld->ctx, 2, tshape, t, out);
    } else {
        clh_fail(ld->ctx, st, "out of host memory transposing '%s'", name);
    }
    free(t);
    free(host);
    return st;
}

/* Copy a host tensor into part of a device tensor (rows [row0, row0+rows)). */
static clh_status load_into(const loader *ld, const char *name, int ndim, const int64_t *shape,
                            clh_tensor *dst, size_t offset) {
    float *host;
    CLH_TRY(read_host(ld, name, ndim, shape, &host));
    clh_tensor *view = NULL;
    clh_status st = clh_tensor_view(dst, offset, ndim, shape, &view);
    if (st == CLH_OK)
        st = clh_tensor_upload(view, host, clh_shape_numel(ndim, shape));
    clh_tensor_release(view);
    free(host);
    return st;
}

static clh_status make_view(clh_tensor *base, size_t offset, int ndim, const int64_t *shape,
                            clh_tensor **out) {
    return clh_tensor_view(base, offset, ndim, shape, out);
}

/* q, k and v weights live in one [3D, D] tensor (and biases in one [3D]) for both
 * naming styles: OpenAI stores them so; HF files are packed on load. */
static clh_status load_qkv(const loader *ld, const char *prefix, int d, clip_layer *L) {
    char name[256];
    int64_t wshape[2] = {3 * (int64_t)d, d}, bshape[1] = {3 * (int64_t)d};
    int64_t w1[2] = {d, d}, b1[1] = {d};
    if (ld->style == NAMES_OPENAI) {
        snprintf(name, sizeof name, "%sattn.in_proj_weight", prefix);
        CLH_TRY(load_tensor(ld, name, 2, wshape, &L->qkv_w));
        snprintf(name, sizeof name, "%sattn.in_proj_bias", prefix);
        CLH_TRY(load_tensor(ld, name, 1, bshape, &L->qkv_b));
    } else {
        static const char *parts[3] = {"q_proj", "k_proj", "v_proj"};
        CLH_TRY(clh_tensor_new(ld->ctx, 2, wshape, &L->qkv_w));
        CLH_TRY(clh_tensor_new(ld->ctx, 1, bshape, &L->qkv_b));
        for (int i = 0; i < 3; i++) {
            snprintf(name, sizeof name, "%sself_attn.%s.weight", prefix, parts[i]);
            CLH_TRY(load_into(ld, name, 2, w1, L->qkv_w, (size_t)i * d * d));
            snprintf(name, sizeof name, "%sself_attn.%s.bias", prefix, parts[i]);
            CLH_TRY(load_into(ld, name, 1, b1, L->qkv_b, (size_t)i * d));
        }
    }
    for (int i = 0; i < 3; i++) {
        CLH_TRY(make_view(L->qkv_w, (size_t)i * d * d, 2, w1, &L->w[i]));
        CLH_TRY(make_view(L->qkv_b, (size_t)i * d, 1, b1, &L->b[i]));
    }
    return CLH_OK;
}

static clh_status load_layer(const loader *ld, const char *prefix, const clh_clip_tower_config *t,
                             clip_layer *L) {
    int hf = ld->style == NAMES_HF;
    int64_t d = t->hidden, f = t->intermediate;
    int64_t vd[1] = {d}, vf[1] = {f}, dd[2] = {d, d}, fd[2] = {f, d}, df[2] = {d, f};
    char name[256];
#define LOAD(suffix_hf, suffix_oa, nd, shape, dst)                                                 \
    do {                                                                                           \
        snprintf(name, sizeof name, "%s%s", prefix, hf ? (suffix_hf) : (suffix_oa));               \
        CLH_TRY(load_tensor(ld, name, nd, shape, dst));                                            \
    } while (0)
    LOAD("layer_norm1.weight", "ln_1.weight", 1, vd, &L->ln1_w);
    LOAD("layer_norm1.bias", "ln_1.bias", 1, vd, &L->ln1_b);
    CLH_TRY(load_qkv(ld, prefix, (int)d, L));
    LOAD("self_attn.out_proj.weight", "attn.out_proj.weight", 2, dd, &L->w[3]);
    LOAD("self_attn.out_proj.bias", "attn.out_proj.bias", 1, vd, &L->b[3]);
    LOAD("layer_norm2.weight", "ln_2.weight", 1, vd, &L->ln2_w);
    LOAD("layer_norm2.bias", "ln_2.bias", 1, vd, &L->ln2_b);
    LOAD("mlp.fc1.weight", "mlp.c_fc.weight", 2, fd, &L->fc1_w);
    LOAD("mlp.fc1.bias", "mlp.c_fc.bias", 1, vf, &L->fc1_b);
    LOAD("mlp.fc2.weight", "mlp.c_proj.weight", 2, df, &L->fc2_w);
    LOAD("mlp.fc2.bias", "mlp.c_proj.bias", 1, vd, &L->fc2_b);
#undef LOAD
    return CLH_OK;
}

static clh_status load_tower_layers(const loader *ld, const char *fmt,
                                    const clh_clip_tower_config *t, clip_layer **out) {
    *out = calloc((size_t)t->layers, sizeof **out);
    if (!*out)
        return clh_fail(ld->ctx, CLH_ERR_OUT_OF_MEMORY, "out of host memory");
    char prefix[128];
    for (int i = 0; i < t->layers; i++) {
        snprintf(prefix, sizeof prefix, fmt, i);
        CLH_TRY(load_layer(ld, prefix, t, &(*out)[i]));
    }
    return CLH_OK;
}

static clh_status load_vision(const loader *ld, clh_clip *m) {
    const clh_clip_config *c = &m->cfg;
    int hf = ld->style == NAMES_HF;
    int64_t d = c->vision.hidden, p = c->patch_size, g = c->image_size / c->patch_size;
    int64_t conv[4] = {d, 3, p, p}, vd[1] = {d}, pos[2] = {1 + g * g, d};
    CLH_TRY(load_tensor(
        ld, hf ? "vision_model.embeddings.patch_embedding.weight" : "visual.conv1.weight", 4, conv,
        &m->patch_w));
    CLH_TRY(load_tensor(ld,
                        hf ? "vision_model.embeddings.class_embedding" : "visual.class_embedding",
                        1, vd, &m->class_emb));
    CLH_TRY(load_tensor(ld,
                        hf ? "vision_model.embeddings.position_embedding.weight"
                           : "visual.positional_embedding",
                        2, pos, &m->vis_pos));
    CLH_TRY(load_tensor(ld, hf ? "vision_model.pre_layrnorm.weight" : "visual.ln_pre.weight", 1, vd,
                        &m->pre_ln_w));
    CLH_TRY(load_tensor(ld, hf ? "vision_model.pre_layrnorm.bias" : "visual.ln_pre.bias", 1, vd,
                        &m->pre_ln_b));
    CLH_TRY(load_tensor(ld, hf ? "vision_model.post_layernorm.weight" : "visual.ln_post.weight", 1,
                        vd, &m->post_ln_w));
    CLH_TRY(load_tensor(ld, hf ? "vision_model.post_layernorm.bias" : "visual.ln_post.bias", 1, vd,
                        &m->post_ln_b));
    if (hf) {
        int64_t proj[2] = {c->projection_dim, d};
        CLH_TRY(load_tensor(ld, "visual_projection.weight", 2, proj, &m->vis_proj));
    } else {
        CLH_TRY(load_transposed(ld, "visual.proj", d, c->projection_dim, &m->vis_proj));
    }
    return load_tower_layers(
        ld, hf ? "vision_model.encoder.layers.%d." : "visual.transformer.resblocks.%d.", &c->vision,
        &m->vis_layers);
}

static clh_status load_text(const loader *ld, clh_clip *m) {
    const clh_clip_config *c = &m->cfg;
    int hf = ld->style == NAMES_HF;
    int64_t d = c->text.hidden, vd[1] = {d};
    int64_t tok[2] = {c->vocab_size, d}, pos[2] = {c->max_positions, d};
    CLH_TRY(load_tensor(
        ld, hf ? "text_model.embeddings.token_embedding.weight" : "token_embedding.weight", 2, tok,
        &m->tok_emb));
    CLH_TRY(load_tensor(
        ld, hf ? "text_model.embeddings.position_embedding.weight" : "positional_embedding", 2, pos,
        &m->txt_pos));
    CLH_TRY(load_tensor(ld, hf ? "text_model.final_layer_norm.weight" : "ln_final.weight", 1, vd,
                        &m->final_ln_w));
    CLH_TRY(load_tensor(ld, hf ? "text_model.final_layer_norm.bias" : "ln_final.bias", 1, vd,
                        &m->final_ln_b));
    if (hf) {
        int64_t proj[2] = {c->projection_dim, d};
        CLH_TRY(load_tensor(ld, "text_projection.weight", 2, proj, &m->txt_proj));
    } else {
        CLH_TRY(load_transposed(ld, "text_projection", d, c->projection_dim, &m->txt_proj));
    }
    return load_tower_layers(ld, hf ? "text_model.encoder.layers.%d." : "transformer.resblocks.%d.",
                             &c->text, &m->txt_layers);
}

static void read_logit_scale(const loader *ld, clh_clip_config *cfg) {
    clh_st_tensor_info info;
    float v;
    if (clh_st_info(ld->st, "logit_scale", &info) == CLH_OK && info.numel == 1 &&
        clh_st_read_f32(ld->st, "logit_scale", &v, 1) == CLH_OK)
        cfg->logit_scale = v;
}

static clh_status validate_config(clh_ctx *ctx, const clh_clip_config *c) {
    const clh_clip_tower_config *t[2] = {&c->vision, &c->text};
    for (int i = 0; i < 2; i++)
        if (t[i]->hidden <= 0 || t[i]->heads <= 0 || t[i]->hidden % t[i]->heads ||
            t[i]->layers <= 0 || t[i]->intermediate <= 0)
            return clh_fail(ctx, CLH_ERR_FORMAT,
                            "CLIP config: %s tower has hidden %d, heads %d, layers %d, "
                            "intermediate %d",
                            i ? "text" : "vision", t[i]->hidden, t[i]->heads, t[i]->layers,
                            t[i]->intermediate);
    if (c->patch_size <= 0 || c->image_size % c->patch_size)
        return clh_fail(ctx, CLH_ERR_FORMAT,
                        "CLIP config: image size %d is not a multiple of "
                        "patch size %d",
                        c->image_size, c->patch_size);
    return CLH_OK;
}

static clh_status detect_style(loader *ld) {
    if (has_tensor(ld->st, "vision_model.embeddings.patch_embedding.weight"))
        ld->style = NAMES_HF;
    else if (has_tensor(ld->st, "visual.conv1.weight"))
        ld->style = NAMES_OPENAI;
    else
        return clh_fail(ld->ctx, CLH_ERR_FORMAT,
                        "'%s' is not a CLIP checkpoint: it has neither HF "
                        "(vision_model.embeddings.patch_embedding.weight) nor OpenAI "
                        "(visual.conv1.weight) tensor names",
                        ld->path);
    return CLH_OK;
}

static clh_status read_config_json(clh_ctx *ctx, const char *dir, int *found,
                                   clh_clip_config *cfg) {
    char path[2048];
    snprintf(path, sizeof path, "%s/config.json", dir);
    *found = is_file(path);
    if (!*found)
        return CLH_OK;
    char *json = NULL;
    CLH_TRY(clh_read_file(path, &json, NULL));
    clh_status st = clh_clip_config_parse(json, cfg);
    free(json);
    if (st != CLH_OK)
        return clh_fail(ctx, st, "%s: %s", path, clh_last_error());
    return CLH_OK;
}

static clh_status load_model(clh_ctx *ctx, const char *path, clh_clip *m) {
    char weights[2048];
    int have_config = 0;
    if (is_dir(path)) {
        CLH_TRY(find_weights(path, weights, sizeof weights));
        CLH_TRY(read_config_json(ctx, path, &have_config, &m->cfg));
    } else if (is_file(path)) {
        snprintf(weights, sizeof weights, "%s", path);
    } else {
        return clh_fail(ctx, CLH_ERR_IO, "CLIP model '%s': no such file or directory", path);
    }
    loader ld = {ctx, NULL, weights, NAMES_HF};
    clh_status st = clh_st_open(weights, &ld.st);
    if (st != CLH_OK)
        return clh_fail(ctx, st, "%s", clh_last_error());
    st = detect_style(&ld);
    if (st == CLH_OK && !have_config)
        st = infer_config(&ld, &m->cfg);
    if (st == CLH_OK) {
        read_logit_scale(&ld, &m->cfg);
        st = validate_config(ctx, &m->cfg);
    }
    if (st == CLH_OK)
        st = load_vision(&ld, m);
    if (st == CLH_OK)
        st = load_text(&ld, m);
    clh_st_close(ld.st);
    return st;
}

/* FNV-1a over the 32-bit words of t's values. */
static clh_status hash_tensor(const clh_tensor *t, uint64_t *hash) {
    size_t n = clh_tensor_numel(t);
    uint32_t *w = malloc((n ? n : 1) * sizeof *w);
    if (!w)
        return clh_fail(clh_tensor_ctx(t), CLH_ERR_OUT_OF_MEMORY, "weights hash: out of memory");
    clh_status st = clh_tensor_download(t, (float *)w, n);
    uint64_t h = *hash;
    for (size_t i = 0; st == CLH_OK && i < n; i++)
        h = (h ^ w[i]) * 0x100000001b3ULL;
    *hash = h;
    free(w);
    return st;
}

static clh_status hash_layers(const clip_layer *layers, int n, uint64_t *hash) {
    for (int i = 0; i < n; i++) {
        const clip_layer *L = &layers[i];
        const clh_tensor *all[] = {L->ln1_w, L->ln1_b, L->qkv_w, L->qkv_b, L->w[3],  L->b[3],
                                   L->ln2_w, L->ln2_b, L->fc1_w, L->fc1_b, L->fc2_w, L->fc2_b};
        for (size_t j = 0; j < sizeof all / sizeof *all; j++)
            CLH_TRY(hash_tensor(all[j], hash));
    }
    return CLH_OK;
}

/* Hash of the weights in their device layout, so HF and OpenAI files of the same model
 * agree. */
static clh_status compute_weights_hash(clh_clip *m) {
    uint64_t h = 0xcbf29ce484222325ULL;
    const clh_tensor *all[] = {m->patch_w,    m->class_emb,  m->vis_pos,  m->pre_ln_w, m->pre_ln_b,
                               m->post_ln_w,  m->post_ln_b,  m->vis_proj, m->tok_emb,  m->txt_pos,
                               m->final_ln_w, m->final_ln_b, m->txt_proj};
    for (size_t j = 0; j < sizeof all / sizeof *all; j++)
        CLH_TRY(hash_tensor(all[j], &h));
    CLH_TRY(hash_layers(m->vis_layers, m->cfg.vision.layers, &h));
    CLH_TRY(hash_layers(m->txt_layers, m->cfg.text.layers, &h));
    m->weights_hash = h;
    return CLH_OK;
}

clh_status clh_clip_load(clh_ctx *ctx, const char *path, clh_clip **out) {
    *out = NULL;
    if (!ctx || !path)
        return clh_fail(ctx, CLH_ERR_INVALID_ARGUMENT, "clh_clip_load: NULL argument");
    clh_clip *m = calloc(1, sizeof *m);
    if (!m)
        return clh_fail(ctx, CLH_ERR_OUT_OF_MEMORY, "clh_clip_load: out of host memory");
    m->ctx = ctx;
    clh_status st = load_model(ctx, path, m);
    if (st == CLH_OK)
        st = compute_weights_hash(m);
    if (st != CLH_OK) {
        clh_clip_free(m);
        return st;
    }
    *out = m;
    return CLH_OK;
}

static void free_layers(clip_layer *layers, int n) {
    if (!layers)
        return;
    for (int i = 0; i < n; i++) {
        clip_layer *L = &layers[i];
        clh_tensor *all[] = {L->ln1_w, L->ln1_b, L->qkv_w, L->qkv_b, L->ln2_w,
                             L->ln2_b, L->fc1_w, L->fc1_b, L->fc2_w, L->fc2_b};
        for (size_t j = 0; j < sizeof all / sizeof *all; j++)
            clh_tensor_release(all[j]);
        for (int j = 0; j < 4; j++) {
            clh_tensor_release(L->w[j]);
            clh_tensor_release(L->b[j]);
        }
    }
    free(layers);
}

void clh_clip_free(clh_clip *m) {
    if (!m)
        return;
    clh_tensor *all[] = {m->patch_w,    m->class_emb,  m->vis_pos,  m->pre_ln_w, m->pre_ln_b,
                         m->post_ln_w,  m->post_ln_b,  m->vis_proj, m->tok_emb,  m->txt_pos,
                         m->final_ln_w, m->final_ln_b, m->txt_proj, m->pos_cache};
    for (size_t j = 0; j < sizeof all / sizeof *all; j++)
        clh_tensor_release(all[j]);
    free_layers(m->vis_layers, m->cfg.vision.layers);
    free_layers(m->txt_layers, m->cfg.text.layers);
    free(m);
}

const clh_clip_config *clh_clip_get_config(const clh_clip *m) {
    return &m->cfg;
}

uint64_t clh_clip_weights_hash(const clh_clip *m) {
    return m->weights_hash;
}

clh_ctx *clh_clip_ctx(const clh_clip *m) {
    return m->ctx;
}
