/* CAT-Seg head: parity of the forward logits, the loss and every gradient with the
 * independent PyTorch implementation (tests/reference/make_cathead_fixtures.py) on three tiny
 * configurations (training path with pooling and pad tokens, top-k over a large vocabulary,
 * test-time pooling 1), plus bad inputs. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "cathead.h"
#include "testutil.h"

/* Tolerance relative to each tensor's largest magnitude (the fixture README's advice: some
 * gradients are tiny and made by cancellation). */
#define REL_TOL 1e-4

typedef struct fixture {
    clh_st_file *params, *inputs, *expected;
    clh_cathead_config cfg;
    int batch, grid, classes, crop, pool;
} fixture;

static int meta_int(const clh_st_file *f, const char *key, int index) {
    const char *v = clh_st_metadata(f, key);
    assert_non_null(v);
    for (int i = 0; i < index; i++) {
        v = strchr(v, ',');
        assert_non_null(v);
        v++;
    }
    return atoi(v);
}

static void open_fixture(const char *name, fixture *fx) {
    char path[1200];
    memset(fx, 0, sizeof *fx);
    const char *files[] = {"params", "inputs", "expected"};
    clh_st_file **out[] = {&fx->params, &fx->inputs, &fx->expected};
    for (int i = 0; i < 3; i++) {
        snprintf(path, sizeof path, "%s/%s.safetensors", tu_fixture(name), files[i]);
        TU_OK(clh_st_open(path, out[i]));
    }
    const clh_st_file *m = fx->params;
    clh_cathead_config *c = &fx->cfg;
    *c = (clh_cathead_config){
        .d_img = meta_int(m, "d_img", 0),
        .d_vis = meta_int(m, "d_vis", 0),
        .n_prompts = meta_int(m, "n_prompts", 0),
        .hidden = meta_int(m, "hidden", 0),
        .heads = meta_int(m, "heads", 0),
        .appearance_proj = meta_int(m, "appearance_proj", 0),
        .text_proj = meta_int(m, "text_proj", 0),
        .guidance_up = {meta_int(m, "guidance_up", 0), meta_int(m, "guidance_up", 1)},
        .decoder_guidance_proj = {meta_int(m, "decoder_guidance_proj", 0),
                                  meta_int(m, "decoder_guidance_proj", 1)},
        .decoder = {meta_int(m, "decoder", 0), meta_int(m, "decoder", 1)},
        .gn_group_size = meta_int(m, "gn_group_size", 0),
        .window = meta_int(m, "window", 0),
        .pad_len = meta_int(m, "pad_len", 0),
        .mlp_ratio = meta_int(m, "mlp_ratio", 0),
        .n_layers = meta_int(m, "n_layers", 0),
    };
    fx->batch = meta_int(m, "batch", 0);
    fx->grid = meta_int(m, "grid", 0);
    fx->classes = meta_int(m, "n_classes", 0);
    fx->crop = meta_int(m, "crop", 0);
    fx->pool = meta_int(m, "pool", 0);
}

static void close_fixture(fixture *fx) {
    clh_st_close(fx->params);
    clh_st_close(fx->inputs);
    clh_st_close(fx->expected);
}

static clh_tensor *load_tensor(const clh_st_file *f, const char *name) {
    clh_st_tensor_info info;
    TU_OK(clh_st_info(f, name, &info));
    float *x = tu_alloc_floats(info.numel);
    TU_OK(clh_st_read_f32(f, name, x, info.numel));
    clh_tensor *t;
    TU_OK(clh_tensor_from_host(tu_ctx(), info.ndim, info.shape, x, &t));
    free(x);
    return t;
}

static clh_tensor *zeros_like(const clh_tensor *t) {
    clh_tensor *z;
    TU_OK(clh_tensor_new(tu_ctx(), clh_tensor_ndim(t), clh_tensor_shape(t), &z));
    TU_OK(clh_tensor_fill(z, 0.0f));
    return z;
}

/* max |got - want| / max |want| (with an absolute floor for all-zero expectations). */
static double compare(const clh_tensor *got, const clh_st_file *f, const char *name) {
    clh_st_tensor_info info;
    TU_OK(clh_st_info(f, name, &info));
    assert_int_equal(info.numel, clh_tensor_numel(got));
    float *want = tu_alloc_floats(info.numel), *have = tu_fetch(got);
    TU_OK(clh_st_read_f32(f, name, want, info.numel));
    double scale = 0, diff = 0;
    for (size_t i = 0; i < info.numel; i++) {
        scale = fmax(scale, fabs(want[i]));
        diff = fmax(diff, fabs((double)have[i] - want[i]));
        if (isnan(have[i]))
            diff = INFINITY;
    }
    free(want);
    free(have);
    /* The floor covers the exactly-zero Swin attn.k.bias gradients (softmax ignores a
     * per-row constant): roundoff there is ~1e-10 absolute. */
    return diff / fmax(scale, 1e-5);
}

static int32_t *load_labels(const fixture *fx) {
    size_t n = (size_t)fx->batch * fx->crop * fx->crop;
    int64_t *raw = malloc(n * sizeof *raw);
    int32_t *labels = malloc(n * sizeof *labels);
    TU_OK(clh_st_read_i64(fx->inputs, "labels", raw, n));
    for (size_t i = 0; i < n; i++)
        labels[i] = (int32_t)raw[i];
    free(raw);
    return labels;
}

static void run_parity(const char *name) {
    TU_CTX_OR_SKIP(ctx);
    (void)ctx;
    fixture fx;
    open_fixture(name, &fx);
    clh_cathead *head;
    TU_OK(clh_cathead_new(tu_ctx(), &fx.cfg, 1, &head));
    TU_OK(clh_cathead_load_params(head, fx.params));
    clh_tensor *dense = load_tensor(fx.inputs, "image_dense");
    clh_tensor *hook0 = load_tensor(fx.inputs, "hook_0"), *hook1 = load_tensor(fx.inputs, "hook_1");
    clh_tensor *text = load_tensor(fx.inputs, "text");
    clh_cathead_inputs in = {
        .dense = dense, .hooks = {hook0, hook1}, .text = text, .pool = fx.pool};
    clh_tensor *logits;
    TU_OK(clh_cathead_forward(head, 1, &in, &logits));
    double err = compare(logits, fx.expected, "logits");
    printf("  %s: logits rel err %.2e\n", name, err);
    assert_true(err < REL_TOL);

    int32_t *labels = load_labels(&fx);
    clh_tensor *d_logits = zeros_like(logits);
    double loss;
    TU_OK(clh_seg_loss(tu_ctx(), logits, labels, fx.crop, fx.crop, NULL, &loss, d_logits));
    float want_loss;
    TU_OK(clh_st_read_f32(fx.expected, "loss", &want_loss, 1));
    printf("  %s: loss %.7f (reference %.7f)\n", name, loss, want_loss);
    assert_true(fabs(loss - want_loss) <= 1e-5 * fabs(want_loss));

    clh_tensor *d_dense = zeros_like(dense), *d_text = zeros_like(text);
    clh_tensor *d_hooks[2] = {zeros_like(hook0), zeros_like(hook1)};
    TU_OK(clh_cathead_backward(head, d_logits, d_dense, d_hooks, d_text));
    double worst = 0;
    const char *worst_name = "";
    char key[160];
    for (int i = 0; i < clh_cathead_num_params(head); i++) {
        const char *pname;
        clh_tensor *grad;
        TU_OK(clh_cathead_param(head, i, &pname, NULL, &grad));
        snprintf(key, sizeof key, "grad.%s", pname);
        double e = compare(grad, fx.expected, key);
        if (e > worst) {
            worst = e;
            worst_name = pname;
        }
        if (e >= REL_TOL)
            printf("  %s: %s rel err %.2e\n", name, key, e);
        assert_true(e < REL_TOL);
    }
    printf("  %s: %d parameter gradients, worst rel err %.2e (%s)\n", name,
           clh_cathead_num_params(head), worst, worst_name);
    const char *inputs[] = {"grad.image_dense", "grad.hook_0", "grad.hook_1", "grad.text"};
    clh_tensor *got[] = {d_dense, d_hooks[0], d_hooks[1], d_text};
    for (int i = 0; i < 4; i++) {
        double e = compare(got[i], fx.expected, inputs[i]);
        printf("  %s: %s rel err %.2e\n", name, inputs[i], e);
        assert_true(e < REL_TOL);
    }

    /* Inference (activations released stage by stage) computes the same logits, and a
     * training forward afterwards still works. */
    clh_tensor *lean = NULL, *again = NULL;
    float *a = tu_fetch(logits), *b = NULL;
    for (int pass = 0; pass < 2; pass++) { /* the second reuses the released buffers */
        TU_OK(clh_cathead_forward(head, 0, &in, &lean));
        b = tu_fetch(lean);
        assert_memory_equal(a, b, clh_tensor_numel(logits) * sizeof(float));
        free(b);
        clh_tensor_release(lean);
        lean = NULL;
    }
    TU_OK(clh_cathead_forward(head, 1, &in, &again));
    b = tu_fetch(again);
    assert_memory_equal(a, b, clh_tensor_numel(logits) * sizeof(float));
    TU_OK(clh_cathead_backward(head, d_logits, d_dense, d_hooks, d_text));
    assert_int_not_equal(clh_cathead_backward(head, d_logits, d_dense, d_hooks, d_text), CLH_OK);
    free(a);
    free(b);
    clh_tensor_release(lean);
    clh_tensor_release(again);

    clh_tensor *all[] = {dense,    hook0,   hook1,  text,       logits,
                         d_logits, d_dense, d_text, d_hooks[0], d_hooks[1]};
    for (size_t i = 0; i < sizeof all / sizeof *all; i++)
        clh_tensor_release(all[i]);
    free(labels);
    clh_cathead_free(head);
    close_fixture(&fx);
}

static void test_parity_tiny(void **state) {
    (void)state;
    run_parity("cathead_tiny");
}

static void test_parity_topk(void **state) {
    (void)state;
    run_parity("cathead_tiny_topk");
}

static void test_parity_pool1(void **state) {
    (void)state;
    run_parity("cathead_tiny_pool1");
}

static clh_tensor *zeros(int ndim, const int64_t *shape) {
    clh_tensor *t;
    TU_OK(clh_tensor_new(tu_ctx(), ndim, shape, &t));
    TU_OK(clh_tensor_fill(t, 0.0f));
    return t;
}

static void test_bad_configs_and_inputs(void **state) {
    (void)state;
    TU_CTX_OR_SKIP(ctx);
    fixture fx;
    open_fixture("cathead_tiny", &fx);
    clh_cathead_config bad = fx.cfg;
    bad.heads = 5; /* does not divide hidden 12 */
    clh_cathead *head = NULL;
    TU_FAILS(clh_cathead_new(ctx, &bad, 0, &head), CLH_ERR_INVALID_ARGUMENT, "heads");
    bad = fx.cfg;
    bad.window = 0;
    TU_FAILS(clh_cathead_new(ctx, &bad, 0, &head), CLH_ERR_INVALID_ARGUMENT, "window");
    TU_OK(clh_cathead_new(ctx, &fx.cfg, 0, &head));

    const int64_t d = fx.cfg.d_img, v = fx.cfg.d_vis;
    clh_tensor *dense = zeros(3, (int64_t[]){2, 37, d}), *hook = zeros(3, (int64_t[]){2, 37, v});
    clh_tensor *text = zeros(3, (int64_t[]){5, 2, d});
    clh_tensor *odd = zeros(3, (int64_t[]){2, 36, d}),
               *short_hook = zeros(3, (int64_t[]){1, 37, v});
    clh_tensor *wide_text = zeros(3, (int64_t[]){5, 2, d + 1});
    clh_tensor *big_grid = zeros(3, (int64_t[]){1, 65, d}),
               *big_hook = zeros(3, (int64_t[]){1, 65, v});
    clh_tensor *logits = NULL;
    clh_cathead_inputs in = {.dense = dense, .hooks = {hook, hook}, .text = text, .pool = 2};
    clh_cathead_inputs x = in;
    x.dense = odd;
    TU_FAILS(clh_cathead_forward(head, 1, &x, &logits), CLH_ERR_SHAPE, "square grid");
    x = in;
    x.hooks[1] = short_hook;
    TU_FAILS(clh_cathead_forward(head, 1, &x, &logits), CLH_ERR_SHAPE, "hooks[1]");
    x = in;
    x.text = wide_text;
    TU_FAILS(clh_cathead_forward(head, 1, &x, &logits), CLH_ERR_SHAPE, "text");
    x = in;
    x.pool = 7;
    TU_FAILS(clh_cathead_forward(head, 1, &x, &logits), CLH_ERR_INVALID_ARGUMENT, NULL);
    x = in; /* grid 8 is larger than the window 3 and not a multiple of it */
    x.dense = big_grid;
    x.hooks[0] = x.hooks[1] = big_hook;
    TU_FAILS(clh_cathead_forward(head, 1, &x, &logits), CLH_ERR_SHAPE, "window");
    assert_null(logits);
    /* backward needs a pending training forward of the right size */
    clh_tensor *dl = zeros(4, (int64_t[]){2, 5, 24, 24}),
               *dl_bad = zeros(4, (int64_t[]){2, 5, 24, 23});
    TU_FAILS(clh_cathead_backward(head, dl, NULL, NULL, NULL), CLH_ERR_INVALID_ARGUMENT, NULL);
    TU_OK(clh_cathead_forward(head, 1, &in, &logits));
    TU_FAILS(clh_cathead_backward(head, dl_bad, NULL, NULL, NULL), CLH_ERR_SHAPE, NULL);
    clh_tensor_release(logits);

    /* a parameter file with a missing, an extra or a mis-shaped tensor is refused */
    clh_cathead *other = NULL;
    clh_cathead_config smaller = fx.cfg;
    smaller.n_layers = 1;
    TU_OK(clh_cathead_new(ctx, &smaller, 0, &other));
    TU_FAILS(clh_cathead_load_params(other, fx.params), CLH_ERR_INVALID_ARGUMENT, "head.layers.1");
    clh_st_writer *w;
    TU_OK(clh_st_writer_new(&w));
    TU_OK(clh_cathead_add_params(other, w));
    char path[1024];
    snprintf(path, sizeof path, "%s", tu_tmp_path("small_head.safetensors"));
    TU_OK(clh_st_writer_save(w, path));
    clh_st_writer_free(w);
    clh_st_file *f;
    TU_OK(clh_st_open(path, &f));
    TU_FAILS(clh_cathead_load_params(head, f), CLH_ERR_NOT_FOUND, "missing");
    clh_st_close(f);
    clh_cathead_config wider = fx.cfg;
    wider.text_proj = 7;
    clh_cathead *wide = NULL;
    TU_OK(clh_cathead_new(ctx, &wider, 0, &wide));
    TU_FAILS(clh_cathead_load_params(wide, fx.params), CLH_ERR_SHAPE, "expected");

    clh_tensor *all[] = {dense,     hook,     text,     odd, short_hook,
                         wide_text, big_grid, big_hook, dl,  dl_bad};
    for (size_t i = 0; i < sizeof all / sizeof *all; i++)
        clh_tensor_release(all[i]);
    clh_cathead_free(head);
    clh_cathead_free(other);
    clh_cathead_free(wide);
    close_fixture(&fx);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parity_tiny),
        cmocka_unit_test(test_parity_topk),
        cmocka_unit_test(test_parity_pool1),
        cmocka_unit_test(test_bad_configs_and_inputs),
    };
    return cmocka_run_group_tests(tests, tu_setup_tmp, tu_teardown_tmp);
}
