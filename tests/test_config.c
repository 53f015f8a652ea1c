/* HF CLIP config.json parsing: defaults, sparse and legacy configs, bad input. */
#include "testutil.h"

static void assert_tower(const clh_clip_tower_config *t, int hidden, int inter, int layers,
                         int heads, clh_activation act) {
    assert_int_equal(t->hidden, hidden);
    assert_int_equal(t->intermediate, inter);
    assert_int_equal(t->layers, layers);
    assert_int_equal(t->heads, heads);
    assert_int_equal(t->act, act);
    assert_true(t->eps == 1e-5f);
}

/* HF CLIPTextConfig / CLIPVisionConfig / CLIPConfig defaults. */
static void assert_default_values(const clh_clip_config *c) {
    assert_tower(&c->text, 512, 2048, 12, 8, CLH_ACT_QUICK_GELU);
    assert_int_equal(c->vocab_size, 49408);
    assert_int_equal(c->max_positions, 77);
    assert_int_equal(c->eos_token_id, 49407);
    assert_int_equal(c->eos_argmax, 0);
    assert_tower(&c->vision, 768, 3072, 12, 12, CLH_ACT_QUICK_GELU);
    assert_int_equal(c->image_size, 224);
    assert_int_equal(c->patch_size, 32);
    assert_int_equal(c->projection_dim, 512);
    assert_true(c->logit_scale == 2.6592f);
}

static void test_defaults(void **state) {
    (void)state;
    clh_clip_config c;
    memset(&c, 0x5a, sizeof c);
    clh_clip_config_defaults(&c);
    assert_default_values(&c);
    TU_OK(clh_clip_config_parse("{}", &c));
    assert_default_values(&c);
    /* Unknown keys and explicit nulls leave the defaults alone. */
    TU_OK(clh_clip_config_parse("{\"model_type\":\"clip\",\"text_config\":null,"
                                "\"vision_config\":{\"patch_size\":null,\"dropout\":0.1}}",
                                &c));
    assert_default_values(&c);
}

static void test_sparse_config(void **state) {
    (void)state;
    clh_clip_config c;
    TU_OK(clh_clip_config_parse("{\"vision_config\":{\"patch_size\":16}}", &c));
    assert_int_equal(c.patch_size, 16);
    assert_int_equal(c.image_size, 224);
    assert_tower(&c.vision, 768, 3072, 12, 12, CLH_ACT_QUICK_GELU);
    assert_tower(&c.text, 512, 2048, 12, 8, CLH_ACT_QUICK_GELU);
    assert_int_equal(c.eos_token_id, 49407);
    assert_int_equal(c.eos_argmax, 0);

    /* The legacy hub form: only bos/eos in text_config -> argmax pooling. */
    TU_OK(clh_clip_config_parse("{\"text_config\":{\"bos_token_id\":0,\"eos_token_id\":2},"
                                "\"vision_config\":{\"patch_size\":16}}",
                                &c));
    assert_int_equal(c.eos_token_id, 2);
    assert_int_equal(c.eos_argmax, 1);
    assert_int_equal(c.patch_size, 16);
    assert_int_equal(c.text.hidden, 512);
}

/* A ViT-L/14-like config with every key given, GELU towers and a non-legacy eos. */
static void test_full_config(void **state) {
    (void)state;
    const char *json =
        "{\"projection_dim\":768,\"logit_scale_init_value\":4.6052,"
        "\"text_config\":{\"hidden_size\":768,\"intermediate_size\":3072,"
        "\"num_hidden_layers\":12,\"num_attention_heads\":12,\"layer_norm_eps\":1e-6,"
        "\"hidden_act\":\"gelu\",\"vocab_size\":49408,\"max_position_embeddings\":64,"
        "\"eos_token_id\":49407},"
        "\"vision_config\":{\"hidden_size\":1024,\"intermediate_size\":4096,"
        "\"num_hidden_layers\":24,\"num_attention_heads\":16,\"layer_norm_eps\":1e-6,"
        "\"hidden_act\":\"quick_gelu\",\"image_size\":336,\"patch_size\":14}}";
    clh_clip_config c;
    TU_OK(clh_clip_config_parse(json, &c));
    assert_int_equal(c.projection_dim, 768);
    assert_true(c.logit_scale == 4.6052f);
    assert_int_equal(c.text.hidden, 768);
    assert_int_equal(c.text.heads, 12);
    assert_int_equal(c.text.act, CLH_ACT_GELU);
    assert_true(c.text.eps == 1e-6f);
    assert_int_equal(c.max_positions, 64);
    assert_int_equal(c.eos_token_id, 49407);
    assert_int_equal(c.eos_argmax, 0);
    assert_int_equal(c.vision.hidden, 1024);
    assert_int_equal(c.vision.intermediate, 4096);
    assert_int_equal(c.vision.layers, 24);
    assert_int_equal(c.vision.heads, 16);
    assert_int_equal(c.vision.act, CLH_ACT_QUICK_GELU);
    assert_int_equal(c.image_size, 336);
    assert_int_equal(c.patch_size, 14);
}

/* Old configs: HF builds a complete tower config from *_config_dict (defaults for its
 * missing keys) and copies all of it over *_config. */
static void test_config_dict_keys(void **state) {
    (void)state;
    clh_clip_config c;
    TU_OK(
        clh_clip_config_parse("{\"text_config\":{\"hidden_size\":640,\"num_attention_heads\":16,"
                              "\"eos_token_id\":2},"
                              "\"text_config_dict\":{\"hidden_size\":768,\"eos_token_id\":49407},"
                              "\"vision_config\":{\"hidden_size\":1024,\"num_attention_heads\":16},"
                              "\"vision_config_dict\":{\"patch_size\":16,\"image_size\":384}}",
                              &c));
    assert_int_equal(c.text.hidden, 768);
    assert_int_equal(c.text.heads, 8); /* the default, not text_config's 16 */
    assert_int_equal(c.eos_token_id, 49407);
    assert_int_equal(c.eos_argmax, 0);
    assert_int_equal(c.patch_size, 16);
    assert_int_equal(c.image_size, 384);
    assert_int_equal(c.vision.hidden, 768);
    assert_int_equal(c.vision.heads, 12);
    /* Errors name the key they came from. */
    TU_FAILS(clh_clip_config_parse("{\"text_config_dict\":{\"hidden_size\":\"x\"}}", &c),
             CLH_ERR_FORMAT, "text_config_dict.hidden_size");
}

static void test_hf_config_file(void **state) {
    (void)state;
    char path[2048]; /* > the 1024-byte data-dir buffer, or -Wformat-truncation fires */
    TU_SHARED_OR_SKIP(path, "hf_clip-vit-base-patch16/config.json");
    FILE *fp = fopen(path, "rb");
    assert_non_null(fp);
    static char json[1 << 16];
    size_t n = fread(json, 1, sizeof json - 1, fp);
    fclose(fp);
    assert_true(n > 100 && n < sizeof json - 1);
    json[n] = '\0';
    clh_clip_config c;
    TU_OK(clh_clip_config_parse(json, &c));
    assert_int_equal(c.patch_size, 16);
    assert_int_equal(c.image_size, 224);
    assert_tower(&c.vision, 768, 3072, 12, 12, CLH_ACT_QUICK_GELU);
    assert_tower(&c.text, 512, 2048, 12, 8, CLH_ACT_QUICK_GELU);
    assert_int_equal(c.eos_token_id, 2);
    assert_int_equal(c.eos_argmax, 1);
    assert_int_equal(c.vocab_size, 49408);
    assert_int_equal(c.max_positions, 77);
    assert_int_equal(c.projection_dim, 512);
    assert_true(c.logit_scale == 2.6592f);
}

static void test_bad_configs(void **state) {
    (void)state;
    static const struct {
        const char *json;
        clh_status status;
        const char *needle;
    } cases[] = {
        {"{\"vision_config\":", CLH_ERR_FORMAT, "invalid JSON"},
        {"{} trailing", CLH_ERR_FORMAT, "invalid JSON"},
        {"[1,2]", CLH_ERR_FORMAT, "not an object"},
        {"{\"text_config\":[1]}", CLH_ERR_FORMAT, "text_config"},
        {"{\"vision_config\":\"x\"}", CLH_ERR_FORMAT, "vision_config"},
        {"{\"text_config\":{\"hidden_size\":\"512\"}}", CLH_ERR_FORMAT, "text_config.hidden_size"},
        {"{\"vision_config\":{\"num_hidden_layers\":1.5}}", CLH_ERR_FORMAT,
         "vision_config.num_hidden_layers"},
        {"{\"vision_config\":{\"patch_size\":1e12}}", CLH_ERR_FORMAT, "patch_size"},
        {"{\"text_config\":{\"num_attention_heads\":7}}", CLH_ERR_FORMAT, "num_attention_heads"},
        {"{\"vision_config\":{\"num_hidden_layers\":-1}}", CLH_ERR_FORMAT,
         "vision_config.num_hidden_layers"},
        {"{\"text_config\":{\"intermediate_size\":0}}", CLH_ERR_FORMAT,
         "text_config.intermediate_size"},
        {"{\"vision_config\":{\"image_size\":225,\"patch_size\":16}}", CLH_ERR_FORMAT,
         "patch_size"},
        {"{\"vision_config\":{\"patch_size\":0}}", CLH_ERR_FORMAT, "patch_size"},
        {"{\"text_config\":{\"layer_norm_eps\":0}}", CLH_ERR_FORMAT, "layer_norm_eps"},
        {"{\"text_config\":{\"layer_norm_eps\":\"1e-5\"}}", CLH_ERR_FORMAT, "layer_norm_eps"},
        {"{\"projection_dim\":0}", CLH_ERR_FORMAT, "projection_dim"},
        {"{\"logit_scale_init_value\":\"2.6\"}", CLH_ERR_FORMAT, "logit_scale_init_value"},
        {"{\"text_config\":{\"eos_token_id\":50000}}", CLH_ERR_FORMAT, "eos_token_id"},
        {"{\"text_config\":{\"hidden_act\":\"relu\"}}", CLH_ERR_UNSUPPORTED, "relu"},
        {"{\"vision_config\":{\"hidden_act\":\"gelu_new\"}}", CLH_ERR_UNSUPPORTED,
         "vision_config.hidden_act 'gelu_new'"},
        {"{\"vision_config\":{\"hidden_act\":3}}", CLH_ERR_FORMAT, "hidden_act"},
        {"{\"vision_config_dict\":{\"hidden_size\":100}}", CLH_ERR_FORMAT, "hidden_size"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        clh_clip_config c;
        clh_clip_config_defaults(&c);
        c.patch_size = 99; /* a failed parse must leave *cfg untouched */
        clh_status st = clh_clip_config_parse(cases[i].json, &c);
        if (st != cases[i].status || !strstr(clh_last_error(), cases[i].needle))
            fail_msg("case %zu %s: got %s '%s', want %s with '%s'", i, cases[i].json,
                     clh_status_name(st), clh_last_error(), clh_status_name(cases[i].status),
                     cases[i].needle);
        assert_int_equal(c.patch_size, 99);
    }
    clh_clip_config c;
    TU_FAILS(clh_clip_config_parse(NULL, &c), CLH_ERR_INVALID_ARGUMENT, "NULL");
    TU_FAILS(clh_clip_config_parse("{}", NULL), CLH_ERR_INVALID_ARGUMENT, "NULL");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults),       cmocka_unit_test(test_sparse_config),
        cmocka_unit_test(test_full_config),    cmocka_unit_test(test_config_dict_keys),
        cmocka_unit_test(test_hf_config_file), cmocka_unit_test(test_bad_configs),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
