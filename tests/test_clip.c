/* CLIP parity against fixtures written by tests/reference/make_clip_fixtures.py with HF
 * transformers, plus loader and input errors. */
#include <unistd.h>

#include "testutil.h"

#define TOL 1e-5 /* max abs error <= TOL * max |expected| (issue 2) */

typedef struct fixture {
    const char *dir;
    clh_clip *model;
    clh_st_file *inputs, *expected;
} fixture;

/* Model from tests/fixtures/<name>, inputs and expected outputs from <data> (same when NULL). */
static int open_fixture_with_data(fixture *f, const char *name, const char *data) {
    static char dir[1024], data_dir[1024], path[1100];
    snprintf(dir, sizeof dir, "%s", tu_fixture(name));
    snprintf(data_dir, sizeof data_dir, "%s", tu_fixture(data ? data : name));
    if (access(dir, R_OK) != 0) {
        print_message("SKIP: fixture %s is absent (run tests/reference/make_clip_fixtures.py)\n",
                      dir);
        return 0;
    }
    f->dir = dir;
    TU_OK(clh_clip_load(tu_ctx(), dir, &f->model));
    snprintf(path, sizeof path, "%s/inputs.safetensors", data_dir);
    TU_OK(clh_st_open(path, &f->inputs));
    snprintf(path, sizeof path, "%s/expected.safetensors", data_dir);
    TU_OK(clh_st_open(path, &f->expected));
    return 1;
}

static int open_fixture(fixture *f, const char *name) {
    return open_fixture_with_data(f, name, NULL);
}

static void close_fixture(fixture *f) {
    clh_clip_free(f->model);
    clh_st_close(f->inputs);
    clh_st_close(f->expected);
}

static float *read_floats(clh_st_file *st, const char *name, clh_st_tensor_info *info) {
    TU_OK(clh_st_info(st, name, info));
    float *buf = malloc(info->numel * sizeof *buf);
    assert_non_null(buf);
    TU_OK(clh_st_read_f32(st, name, buf, info->numel));
    return buf;
}

static void assert_tensor_matches(const clh_tensor *got, clh_st_file *expected, const char *name,
                                  const char *fixture_dir) {
    clh_st_tensor_info info;
    float *want = read_floats(expected, name, &info);
    assert_int_equal(clh_tensor_numel(got), info.numel);
    for (int i = 0; i < info.ndim; i++)
        assert_int_equal(clh_tensor_dim(got, i), info.shape[i]);
    float *have = malloc(info.numel * sizeof *have);
    TU_OK(clh_tensor_download(got, have, info.numel));
    double err, mag;
    tu_max_errors(have, want, info.numel, &err, &mag);
    print_message("  %s/%s: max abs err %.3g, max |want| %.3g, ratio %.3g\n", fixture_dir, name,
                  err, mag, mag > 0 ? err / mag : err);
    TU_ASSERT_CLOSE(have, want, info.numel, TOL, 0.0);
    free(have);
    free(want);
}

static clh_tensor *input_pixels(fixture *f) {
    clh_st_tensor_info info;
    float *px = read_floats(f->inputs, "pixel_values", &info);
    clh_tensor *t;
    TU_OK(clh_tensor_from_host(tu_ctx(), info.ndim, info.shape, px, &t));
    free(px);
    return t;
}

static int32_t *input_ids(fixture *f, int *n, int *context) {
    clh_st_tensor_info info;
    TU_OK(clh_st_info(f->inputs, "input_ids", &info));
    assert_int_equal(info.ndim, 2);
    int64_t *ids64 = malloc(info.numel * sizeof *ids64);
    int32_t *ids = malloc(info.numel * sizeof *ids);
    TU_OK(clh_st_read_i64(f->inputs, "input_ids", ids64, info.numel));
    for (size_t i = 0; i < info.numel; i++)
        ids[i] = (int32_t)ids64[i];
    free(ids64);
    *n = (int)info.shape[0];
    *context = (int)info.shape[1];
    return ids;
}

/* Hooked blocks are the expected tensors named hidden_vision_<i>. */
static int expected_hooks(clh_st_file *expected, int *hooks, int max) {
    int n = 0;
    for (size_t i = 0; i < clh_st_count(expected) && n < max; i++) {
        clh_st_tensor_info info;
        TU_OK(clh_st_info_at(expected, i, &info));
        if (strncmp(info.name, "hidden_vision_", 14) == 0)
            hooks[n++] = atoi(info.name + 14);
    }
    return n;
}

static void check_image(fixture *f) {
    clh_tensor *px = input_pixels(f);
    int hooks[16];
    int n_hooks = expected_hooks(f->expected, hooks, 16);
    clh_image_request req = {1, 1, 0, n_hooks, hooks};
    clh_image_outputs out;
    TU_OK(clh_clip_encode_image(f->model, px, &req, &out));
    assert_tensor_matches(out.pooled, f->expected, "image_pooled", f->dir);
    assert_tensor_matches(out.dense, f->expected, "image_dense", f->dir);
    for (int i = 0; i < n_hooks; i++) {
        char name[64];
        snprintf(name, sizeof name, "hidden_vision_%d", hooks[i]);
        assert_tensor_matches(out.hooks[i], f->expected, name, f->dir);
    }
    clh_image_outputs_release(&out);
    clh_image_request catseg = {0, 1, 1, 0, NULL};
    TU_OK(clh_clip_encode_image(f->model, px, &catseg, &out));
    assert_null(out.pooled);
    assert_tensor_matches(out.dense, f->expected, "image_dense_catseg", f->dir);
    clh_image_outputs_release(&out);
    clh_tensor_release(px);
}

static void check_text(fixture *f) {
    int n, context;
    int32_t *ids = input_ids(f, &n, &context);
    clh_tensor *feat;
    TU_OK(clh_clip_encode_text(f->model, ids, n, context, &feat));
    assert_tensor_matches(feat, f->expected, "text_features", f->dir);
    clh_tensor_release(feat);
    free(ids);
}

static void check_logit_scale(fixture *f) {
    clh_st_tensor_info info;
    float *want = read_floats(f->expected, "logit_scale", &info);
    assert_float_equal(clh_clip_get_config(f->model)->logit_scale, want[0], 1e-6);
    free(want);
}

static void run_parity_with_data(const char *name, const char *data) {
    TU_CTX_OR_SKIP(ctx);
    (void)ctx;
    fixture f = {0};
    if (!open_fixture_with_data(&f, name, data))
        skip();
    check_image(&f);
    check_text(&f);
    check_logit_scale(&f);
    close_fixture(&f);
}

static void run_parity(const char *name) {
    run_parity_with_data(name, NULL);
}

/* Patch 8, inputs at 48x48 on a 32x32 native model: position embeddings resized. */
static void test_parity_tiny_p8(void **state) {
    run_parity("clip_tiny_p8");
}

/* Sparse legacy config (defaults, patch 32, argmax pooling) and fp16 weights. */
static void test_parity_legacy_sparse(void **state) {
    run_parity("clip_legacy_sparse");
    TU_CTX_OR_SKIP(ctx);
    clh_clip *m;
    if (access(tu_fixture("clip_legacy_sparse"), R_OK) != 0)
        skip();
    TU_OK(clh_clip_load(ctx, tu_fixture("clip_legacy_sparse"), &m));
    const clh_clip_config *c = clh_clip_get_config(m);
    assert_int_equal(c->patch_size, 32);
    assert_int_equal(c->eos_argmax, 1);
    assert_int_equal(c->projection_dim, 512);
    clh_clip_free(m);
}

/* OpenAI/open_clip tensor names, no config.json: architecture inferred from shapes. */
static void test_parity_openai_names(void **state) {
    run_parity("clip_tiny_openai");
}

/* Optional: a large fixture outside the repo (e.g. vitb16_384 written to /tmp/vitb16 by
 * the reference script) named by $CLHCLIP_LARGE_FIXTURE. */
static void test_parity_large_fixture(void **state) {
    const char *dir = getenv("CLHCLIP_LARGE_FIXTURE");
    if (!dir || !*dir) {
        print_message("SKIP: set CLHCLIP_LARGE_FIXTURE to a make_clip_fixtures.py output dir\n");
        skip();
    }
    run_parity(dir);
}

static void test_openai_equals_hf_names(void **state) {
    TU_CTX_OR_SKIP(ctx);
    if (access(tu_fixture("clip_tiny_openai_hf"), R_OK) != 0) {
        print_message("SKIP: clip_tiny_openai_hf fixture absent\n");
        skip();
    }
    /* same weights under HF names + config.json; inputs/expected live in the OpenAI dir */
    run_parity_with_data("clip_tiny_openai_hf", "clip_tiny_openai");
}

/* A second forward pass must not allocate device memory (workspace reuse). */
static void test_forward_reuses_workspace(void **state) {
    TU_CTX_OR_SKIP(ctx);
    fixture f = {0};
    if (!open_fixture(&f, "clip_tiny_p8"))
        skip();
    clh_tensor *px = input_pixels(&f);
    clh_image_request req = {1, 1, 0, 0, NULL};
    clh_image_outputs out;
    TU_OK(clh_clip_encode_image(f.model, px, &req, &out));
    clh_image_outputs_release(&out);
    size_t after_first = clh_ctx_device_bytes(ctx);
    TU_OK(clh_clip_encode_image(f.model, px, &req, &out));
    clh_image_outputs_release(&out);
    assert_int_equal(clh_ctx_device_bytes(ctx), after_first);
    clh_tensor_release(px);
    close_fixture(&f);
}

static void test_bad_inputs(void **state) {
    TU_CTX_OR_SKIP(ctx);
    fixture f = {0};
    if (!open_fixture(&f, "clip_tiny_p8"))
        skip();
    int64_t odd[4] = {1, 3, 30, 32}, gray[4] = {1, 1, 32, 32};
    clh_tensor *px;
    clh_image_request req = {1, 0, 0, 0, NULL};
    clh_image_outputs out;
    TU_OK(clh_tensor_new(ctx, 4, odd, &px));
    TU_FAILS(clh_clip_encode_image(f.model, px, &req, &out), CLH_ERR_SHAPE, "patch size");
    clh_tensor_release(px);
    TU_OK(clh_tensor_new(ctx, 4, gray, &px));
    TU_FAILS(clh_clip_encode_image(f.model, px, &req, &out), CLH_ERR_SHAPE, "[1, 1, 32, 32]");
    clh_tensor_release(px);
    int64_t ok_shape[4] = {1, 3, 32, 32};
    TU_OK(clh_tensor_new(ctx, 4, ok_shape, &px));
    int hook = 99;
    clh_image_request bad_hook = {1, 0, 0, 1, &hook};
    TU_FAILS(clh_clip_encode_image(f.model, px, &bad_hook, &out), CLH_ERR_INVALID_ARGUMENT, "99");
    clh_tensor_release(px);
    const clh_clip_config *c = clh_clip_get_config(f.model);
    int32_t ids[4] = {1, 2, c->vocab_size, 0};
    clh_tensor *feat = NULL;
    TU_FAILS(clh_clip_encode_text(f.model, ids, 1, 4, &feat), CLH_ERR_INVALID_ARGUMENT,
             "vocabulary");
    int32_t *many = calloc((size_t)c->max_positions + 1, sizeof *many);
    TU_FAILS(clh_clip_encode_text(f.model, many, 1, c->max_positions + 1, &feat), CLH_ERR_TOO_LONG,
             "context length");
    free(many);
    assert_null(feat);
    close_fixture(&f);
}

/* Copy a fixture's weights, leaving out or reshaping one tensor. */
static void write_modified_act(const char *src_dir, const char *dst_dir, const char *victim,
                               int reshape, const char *hidden_act) {
    char path[1100];
    snprintf(path, sizeof path, "%s/model.safetensors", src_dir);
    clh_st_file *src;
    TU_OK(clh_st_open(path, &src));
    clh_st_writer *w;
    TU_OK(clh_st_writer_new(&w));
    for (size_t i = 0; i < clh_st_count(src); i++) {
        clh_st_tensor_info info;
        TU_OK(clh_st_info_at(src, i, &info));
        if (strcmp(info.name, victim) == 0 && !reshape)
            continue;
        float *buf = malloc((info.numel ? info.numel : 1) * sizeof *buf);
        TU_OK(clh_st_read_f32(src, info.name, buf, info.numel));
        if (strcmp(info.name, victim) == 0) { /* same data, wrong shape */
            int64_t flat[1] = {(int64_t)info.numel};
            TU_OK(clh_st_writer_add_f32(w, info.name, 1, flat, buf));
        } else {
            TU_OK(clh_st_writer_add_f32(w, info.name, info.ndim, info.shape, buf));
        }
        free(buf);
    }
    if (hidden_act)
        TU_OK(clh_st_writer_set_metadata(w, "hidden_act", hidden_act));
    snprintf(path, sizeof path, "%s/model.safetensors", dst_dir);
    TU_OK(clh_st_writer_save(w, path));
    clh_st_writer_free(w);
    clh_st_close(src);
}

static void write_modified(const char *src_dir, const char *dst_dir, const char *victim,
                           int reshape) {
    write_modified_act(src_dir, dst_dir, victim, reshape, NULL);
}

static void test_loader_errors(void **state) {
    TU_CTX_OR_SKIP(ctx);
    clh_clip *m = NULL;
    TU_FAILS(clh_clip_load(ctx, "/nonexistent/clip", &m), CLH_ERR_IO, "/nonexistent/clip");
    assert_null(m);
    const char *src = tu_fixture("clip_tiny_openai");
    if (access(src, R_OK) != 0)
        skip();
    char dir[] = "/tmp/clhclip-bad-model-XXXXXX";
    assert_non_null(mkdtemp(dir));
    write_modified(src, dir, "visual.ln_post.bias", 0);
    TU_FAILS(clh_clip_load(ctx, dir, &m), CLH_ERR_NOT_FOUND, "visual.ln_post.bias");
    write_modified(src, dir, "visual.proj", 1);
    TU_FAILS(clh_clip_load(ctx, dir, &m), CLH_ERR_SHAPE, "visual.proj");
    assert_null(m);
    /* OpenAI names without config.json: the activation comes from the file's metadata */
    write_modified_act(src, dir, "", 0, "gelu");
    TU_OK(clh_clip_load(ctx, dir, &m));
    assert_int_equal(clh_clip_get_config(m)->vision.act, CLH_ACT_GELU);
    assert_int_equal(clh_clip_get_config(m)->text.act, CLH_ACT_GELU);
    clh_clip_free(m);
    m = NULL;
    write_modified_act(src, dir, "", 0, "swish");
    TU_FAILS(clh_clip_load(ctx, dir, &m), CLH_ERR_UNSUPPORTED, "swish");
    /* not a CLIP checkpoint at all */
    char path[1100];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    clh_st_writer *w;
    TU_OK(clh_st_writer_new(&w));
    float one = 1;
    int64_t shape[1] = {1};
    TU_OK(clh_st_writer_add_f32(w, "something.else", 1, shape, &one));
    TU_OK(clh_st_writer_save(w, path));
    clh_st_writer_free(w);
    TU_FAILS(clh_clip_load(ctx, dir, &m), CLH_ERR_FORMAT, "not a CLIP checkpoint");
    /* truncated file */
    FILE *fp = fopen(path, "wb");
    fputs("\x08\x00", fp);
    fclose(fp);
    TU_FAILS(clh_clip_load(ctx, dir, &m), CLH_ERR_FORMAT, NULL);
    remove(path);
    rmdir(dir);
}

static int teardown(void **state) {
    tu_ctx_teardown();
    return 0;
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parity_tiny_p8),
        cmocka_unit_test(test_parity_legacy_sparse),
        cmocka_unit_test(test_parity_openai_names),
        cmocka_unit_test(test_openai_equals_hf_names),
        cmocka_unit_test(test_parity_large_fixture),
        cmocka_unit_test(test_forward_reuses_workspace),
        cmocka_unit_test(test_bad_inputs),
        cmocka_unit_test(test_loader_errors),
    };
    return cmocka_run_group_tests_name("clip", tests, NULL, teardown);
}
