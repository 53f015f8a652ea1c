/* HF transformers CLIP config.json: defaults and parsing.
 *
 * Hub configs are often sparse (e.g. only "vision_config": {"patch_size": 16}), so every
 * missing key takes the CLIPTextConfig / CLIPVisionConfig / CLIPConfig default. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "internal.h"

void clh_clip_config_defaults(clh_clip_config *cfg) {
    memset(cfg, 0, sizeof *cfg);
    cfg->text = (clh_clip_tower_config){.hidden = 512,
                                        .intermediate = 2048,
                                        .layers = 12,
                                        .heads = 8,
                                        .eps = 1e-5f,
                                        .act = CLH_ACT_QUICK_GELU};
    cfg->vocab_size = 49408;
    cfg->max_positions = 77;
    cfg->eos_token_id = 49407;
    cfg->eos_argmax = 0;
    cfg->vision = (clh_clip_tower_config){.hidden = 768,
                                          .intermediate = 3072,
                                          .layers = 12,
                                          .heads = 12,
                                          .eps = 1e-5f,
                                          .act = CLH_ACT_QUICK_GELU};
    cfg->image_size = 224;
    cfg->patch_size = 32;
    cfg->projection_dim = 512;
    cfg->logit_scale = 2.6592f;
}

/* ------------------------------------------------------------------ typed getters
 * Each returns CLH_OK and leaves *out alone when the key is absent (or JSON null, which
 * HF treats as "not given" for these keys). `where` is "text_config" etc. for messages. */

static clh_status get_int(const cJSON *obj, const char *where, const char *key, int *out) {
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!item || cJSON_IsNull(item))
        return CLH_OK;
    double v = cJSON_IsNumber(item) ? item->valuedouble : NAN;
    if (!(v == floor(v)) || v < -2147483648.0 || v > 2147483647.0)
        return clh_fail(NULL, CLH_ERR_FORMAT, "CLIP config: %s%s%s is not an integer", where,
                        *where ? "." : "", key);
    *out = (int)v;
    return CLH_OK;
}

static clh_status get_float(const cJSON *obj, const char *where, const char *key, float *out) {
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!item || cJSON_IsNull(item))
        return CLH_OK;
    if (!cJSON_IsNumber(item) || !isfinite(item->valuedouble))
        return clh_fail(NULL, CLH_ERR_FORMAT, "CLIP config: %s%s%s is not a finite number", where,
                        *where ? "." : "", key);
    *out = (float)item->valuedouble;
    return CLH_OK;
}

static clh_status get_activation(const cJSON *obj, const char *where, clh_activation *out) {
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(obj, "hidden_act");
    if (!item || cJSON_IsNull(item))
        return CLH_OK;
    if (!cJSON_IsString(item))
        return clh_fail(NULL, CLH_ERR_FORMAT, "CLIP config: %s.hidden_act is not a string", where);
    if (strcmp(item->valuestring, "quick_gelu") == 0)
        *out = CLH_ACT_QUICK_GELU;
    else if (strcmp(item->valuestring, "gelu") == 0)
        *out = CLH_ACT_GELU;
    else
        return clh_fail(NULL, CLH_ERR_UNSUPPORTED,
                        "CLIP config: %s.hidden_act '%s' is not supported (quick_gelu, gelu)",
                        where, item->valuestring);
    return CLH_OK;
}

/* The object under `key`, or NULL when absent/null; non-objects are format errors. */
static clh_status get_object(const cJSON *root, const char *key, const cJSON **out) {
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(root, key);
    *out = NULL;
    if (!item || cJSON_IsNull(item))
        return CLH_OK;
    if (!cJSON_IsObject(item))
        return clh_fail(NULL, CLH_ERR_FORMAT, "CLIP config: %s is not a JSON object", key);
    *out = item;
    return CLH_OK;
}

/* "<name>_dict" when present, else "<name>" (either may be absent: *out = NULL). */
static clh_status select_section(const cJSON *root, const char *name, char dict_key[64],
                                 const char **key, const cJSON **out) {
    snprintf(dict_key, 64, "%s_dict", name);
    CLH_TRY(get_object(root, dict_key, out));
    if (*out) {
        *key = dict_key;
        return CLH_OK;
    }
    *key = name;
    return get_object(root, name, out);
}

/* ------------------------------------------------------------------ sections */

static clh_status parse_tower(const cJSON *obj, const char *where, clh_clip_tower_config *t) {
    CLH_TRY(get_int(obj, where, "hidden_size", &t->hidden));
    CLH_TRY(get_int(obj, where, "intermediate_size", &t->intermediate));
    CLH_TRY(get_int(obj, where, "num_hidden_layers", &t->layers));
    CLH_TRY(get_int(obj, where, "num_attention_heads", &t->heads));
    CLH_TRY(get_float(obj, where, "layer_norm_eps", &t->eps));
    return get_activation(obj, where, &t->act);
}

static clh_status parse_text(const cJSON *obj, const char *where, clh_clip_config *cfg) {
    if (!obj)
        return CLH_OK;
    CLH_TRY(parse_tower(obj, where, &cfg->text));
    CLH_TRY(get_int(obj, where, "vocab_size", &cfg->vocab_size));
    CLH_TRY(get_int(obj, where, "max_position_embeddings", &cfg->max_positions));
    return get_int(obj, where, "eos_token_id", &cfg->eos_token_id);
}

static clh_status parse_vision(const cJSON *obj, const char *where, clh_clip_config *cfg) {
    if (!obj)
        return CLH_OK;
    CLH_TRY(parse_tower(obj, where, &cfg->vision));
    CLH_TRY(get_int(obj, where, "image_size", &cfg->image_size));
    return get_int(obj, where, "patch_size", &cfg->patch_size);
}

static clh_status check_positive(int value, const char *key) {
    if (value <= 0)
        return clh_fail(NULL, CLH_ERR_FORMAT, "CLIP config: %s must be positive (got %d)", key,
                        value);
    return CLH_OK;
}

static clh_status validate_tower(const clh_clip_tower_config *t, const char *where) {
    char key[64];
    snprintf(key, sizeof key, "%s.hidden_size", where);
    CLH_TRY(check_positive(t->hidden, key));
    snprintf(key, sizeof key, "%s.intermediate_size", where);
    CLH_TRY(check_positive(t->intermediate, key));
    snprintf(key, sizeof key, "%s.num_hidden_layers", where);
    CLH_TRY(check_positive(t->layers, key));
    snprintf(key, sizeof key, "%s.num_attention_heads", where);
    CLH_TRY(check_positive(t->heads, key));
    if (t->hidden % t->heads != 0)
        return clh_fail(NULL, CLH_ERR_FORMAT,
                        "CLIP config: %s.hidden_size %d is not divisible by "
                        "num_attention_heads %d",
                        where, t->hidden, t->heads);
    if (!(t->eps > 0.0f))
        return clh_fail(NULL, CLH_ERR_FORMAT, "CLIP config: %s.layer_norm_eps must be positive",
                        where);
    return CLH_OK;
}

static clh_status validate(const clh_clip_config *cfg) {
    CLH_TRY(validate_tower(&cfg->text, "text_config"));
    CLH_TRY(validate_tower(&cfg->vision, "vision_config"));
    CLH_TRY(check_positive(cfg->vocab_size, "text_config.vocab_size"));
    CLH_TRY(check_positive(cfg->max_positions, "text_config.max_position_embeddings"));
    CLH_TRY(check_positive(cfg->image_size, "vision_config.image_size"));
    CLH_TRY(check_positive(cfg->patch_size, "vision_config.patch_size"));
    CLH_TRY(check_positive(cfg->projection_dim, "projection_dim"));
    if (cfg->image_size % cfg->patch_size != 0)
        return clh_fail(NULL, CLH_ERR_FORMAT,
                        "CLIP config: vision_config.image_size %d is not divisible by "
                        "vision_config.patch_size %d",
                        cfg->image_size, cfg->patch_size);
    if (cfg->eos_token_id < 0 || cfg->eos_token_id >= cfg->vocab_size)
        return clh_fail(NULL, CLH_ERR_FORMAT,
                        "CLIP config: text_config.eos_token_id %d outside the vocabulary "
                        "(vocab_size %d)",
                        cfg->eos_token_id, cfg->vocab_size);
    return CLH_OK;
}

static clh_status parse_root(const cJSON *root, clh_clip_config *cfg) {
    char text_dict[64], vision_dict[64];
    const char *text_key, *vision_key;
    const cJSON *text, *vision;
    CLH_TRY(get_int(root, "", "projection_dim", &cfg->projection_dim));
    CLH_TRY(get_float(root, "", "logit_scale_init_value", &cfg->logit_scale));
    /* Old configs carry *_config_dict. HF builds a complete tower config from it (defaults
     * for its missing keys) and copies every field over *_config, so when it is present
     * the *_config object has no effect on the fields used here. */
    CLH_TRY(select_section(root, "text_config", text_dict, &text_key, &text));
    CLH_TRY(parse_text(text, text_key, cfg));
    CLH_TRY(select_section(root, "vision_config", vision_dict, &vision_key, &vision));
    CLH_TRY(parse_vision(vision, vision_key, cfg));
    /* HF legacy rule: configs saved with eos_token_id 2 pool at the argmax of the ids
     * (the EOT token 49407 is the largest id); others pool at the first eos_token_id. */
    cfg->eos_argmax = cfg->eos_token_id == 2;
    return validate(cfg);
}

clh_status clh_clip_config_parse(const char *json, clh_clip_config *cfg) {
    if (!json || !cfg)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "clh_clip_config_parse: NULL argument");
    clh_clip_config parsed;
    clh_clip_config_defaults(&parsed);
    const char *end = NULL; /* cJSON_GetErrorPtr is a global; the parse end is not */
    cJSON *root = cJSON_ParseWithOpts(json, &end, 1);
    if (!root)
        return clh_fail(NULL, CLH_ERR_FORMAT, "CLIP config: invalid JSON near byte %ld",
                        end ? (long)(end - json) : -1L);
    clh_status st = cJSON_IsObject(root)
                        ? parse_root(root, &parsed)
                        : clh_fail(NULL, CLH_ERR_FORMAT, "CLIP config: top level is not an object");
    cJSON_Delete(root);
    if (st == CLH_OK)
        *cfg = parsed;
    return st;
}
