/* H-CLIP adapters on a tiny CLIP: identity at initialisation, parity with an independent
 * PyTorch implementation (outputs and gradients of P, A, B), recompute, folding,
 * checkpoints, bit-identical resume, a falling loss, the hyperspherical-energy term. */
#include <unistd.h>

#include "hclip.h"
#include "testutil.h"

#include <time.h>

#define MODEL "clip_tiny_p8" /* vision 64 wide, text 48 wide: block size 16 */

static double clh_test_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static clh_clip *load_model(const char *name) {
    clh_clip *m = NULL;
    TU_OK(clh_clip_load(tu_ctx(), tu_fixture(name), &m));
    return m;
}

static clh_tensor *random_tensor(clh_ctx *ctx, int ndim, const int64_t *shape, float scale,
                                 uint32_t seed) {
    size_t n = 1;
    for (int i = 0; i < ndim; i++)
        n *= (size_t)shape[i];
    float *x = malloc(n * sizeof *x);
    tu_fill_random(x, n, -scale, scale, seed);
    clh_tensor *t;
    TU_OK(clh_tensor_from_host(ctx, ndim, shape, x, &t));
    free(x);
    return t;
}

static float *download(const clh_tensor *t) {
    size_t n = clh_tensor_numel(t);
    float *x = malloc(n * sizeof *x);
    TU_OK(clh_tensor_download(t, x, n));
    return x;
}

/* Add uniform noise in [-scale, scale] to every trainable tensor. */
static void perturb(clh_hclip *h, float scale, uint32_t seed) {
    for (int i = 0; i < clh_hclip_num_params(h); i++) {
        clh_tensor *p;
        TU_OK(clh_hclip_param(h, i, NULL, &p, NULL));
        size_t n = clh_tensor_numel(p);
        float *x = download(p), *noise = malloc(n * sizeof *noise);
        tu_fill_random(noise, n, -scale, scale, seed + (uint32_t)i);
        for (size_t j = 0; j < n; j++)
            x[j] += noise[j];
        TU_OK(clh_tensor_upload(p, x, n));
        free(x);
        free(noise);
    }
    TU_OK(clh_hclip_update(h));
}

typedef struct io {
    clh_tensor *pixels;
    int32_t *ids;
    int n_text, context;
} io;

static io make_inputs(clh_clip *m) {
    const clh_clip_config *c = clh_clip_get_config(m);
    io in = {0};
    int64_t px[4] = {2, 3, 48, 48};
    in.pixels = random_tensor(tu_ctx(), 4, px, 1.5f, 11);
    in.n_text = 3;
    in.context = c->max_positions;
    in.ids = calloc((size_t)in.n_text * in.context, sizeof *in.ids);
    for (int r = 0; r < in.n_text; r++) {
        for (int j = 0; j < 4 + r; j++)
            in.ids[r * in.context + j] = 1 + (r * 37 + j * 11) % (c->vocab_size - 2);
        in.ids[r * in.context + 4 + r] = c->eos_token_id;
    }
    return in;
}

static void free_inputs(io *in) {
    clh_tensor_release(in->pixels);
    free(in->ids);
}

static const int HOOKS[1] = {1};

/* dense (CAT-Seg last layer) + one hook + pooled */
static clh_image_request train_request(void) {
    clh_image_request r = {1, 1, 1, 1, HOOKS};
    return r;
}

static void assert_same_tensor(const clh_tensor *a, const clh_tensor *b, double rel) {
    assert_int_equal(clh_tensor_numel(a), clh_tensor_numel(b));
    float *x = download(a), *y = download(b);
    TU_ASSERT_CLOSE(x, y, clh_tensor_numel(a), rel, 0.0);
    free(x);
    free(y);
}

/* ------------------------------------------------------------------ identity */

static void test_identity_at_init(void **state) {
    TU_CTX_OR_SKIP(ctx);
    (void)ctx;
    clh_clip *m = load_model(MODEL);
    io in = make_inputs(m);
    clh_image_request req = train_request();
    clh_image_outputs plain, adapted;
    clh_tensor *plain_text, *adapted_text;
    TU_OK(clh_clip_encode_image(m, in.pixels, &req, &plain));
    TU_OK(clh_clip_encode_text(m, in.ids, in.n_text, in.context, &plain_text));
    for (int ortho = 0; ortho <= CLH_ORTHO_VISION; ortho++) {
        clh_hclip_options opt = {.block_size = 16, .ortho = (clh_ortho)ortho};
        clh_hclip *h;
        TU_OK(clh_hclip_new(m, &opt, &h));
        TU_OK(clh_hclip_forward(h, 0, in.pixels, &req, &adapted, in.ids, in.n_text, in.context,
                                &adapted_text));
        /* exactly equal: every transform is the identity */
        assert_same_tensor(adapted.pooled, plain.pooled, 0.0);
        assert_same_tensor(adapted.dense, plain.dense, 0.0);
        assert_same_tensor(adapted.hooks[0], plain.hooks[0], 0.0);
        assert_same_tensor(adapted_text, plain_text, 0.0);
        clh_image_outputs_release(&adapted);
        clh_tensor_release(adapted_text);
        clh_hclip_free(h);
    }
    clh_image_outputs_release(&plain);
    clh_tensor_release(plain_text);
    free_inputs(&in);
    clh_clip_free(m);
}

static void test_bad_options(void **state) {
    TU_CTX_OR_SKIP(ctx);
    (void)ctx;
    clh_clip *m = load_model(MODEL);
    clh_hclip *h = NULL;
    clh_hclip_options opt = {.block_size = 20};
    TU_FAILS(clh_hclip_new(m, &opt, &h), CLH_ERR_INVALID_ARGUMENT, "block size 20");
    assert_null(h);
    TU_FAILS(clh_hclip_backward(NULL, NULL, NULL, NULL, NULL), CLH_ERR_INVALID_ARGUMENT, NULL);
    opt.block_size = 16;
    TU_OK(clh_hclip_new(m, &opt, &h));
    TU_FAILS(clh_hclip_backward(h, NULL, NULL, NULL, NULL), CLH_ERR_INVALID_ARGUMENT,
             "no training forward");
    clh_hclip_free(h);
    clh_clip_free(m);
}

/* ------------------------------------------------------------------ gradients */

typedef struct grads {
    float *g[3];
    size_t n[3];
    int count;
} grads;

/* One training forward + backward with fixed random cotangents; returns the parameter
 * gradients. */
static grads train_grads(clh_hclip *h, io *in, uint32_t seed) {
    clh_ctx *ctx = tu_ctx();
    clh_image_request req = train_request();
    clh_image_outputs out;
    clh_tensor *text;
    TU_OK(clh_hclip_zero_grad(h));
    TU_OK(clh_hclip_forward(h, 1, in->pixels, &req, &out, in->ids, in->n_text, in->context, &text));
    clh_tensor *dp = random_tensor(ctx, 2, clh_tensor_shape(out.pooled), 1, seed);
    clh_tensor *dd = random_tensor(ctx, 3, clh_tensor_shape(out.dense), 1, seed + 1);
    clh_tensor *dh = random_tensor(ctx, 3, clh_tensor_shape(out.hooks[0]), 1, seed + 2);
    clh_tensor *dt = random_tensor(ctx, 2, clh_tensor_shape(text), 1, seed + 3);
    const clh_tensor *hooks[1] = {dh};
    TU_OK(clh_hclip_backward(h, dp, dd, hooks, dt));
    grads g = {.count = clh_hclip_num_params(h)};
    for (int i = 0; i < g.count; i++) {
        clh_tensor *grad;
        TU_OK(clh_hclip_param(h, i, NULL, NULL, &grad));
        g.g[i] = download(grad);
        g.n[i] = clh_tensor_numel(grad);
    }
    clh_tensor *all[] = {dp, dd, dh, dt, text};
    for (int i = 0; i < 5; i++)
        clh_tensor_release(all[i]);
    clh_image_outputs_release(&out);
    return g;
}

static void free_grads(grads *g) {
    for (int i = 0; i < g->count; i++)
        free(g->g[i]);
}

/* Recomputing activations in the backward gives the same gradients bit for bit. */
static void test_recompute_matches(void **state) {
    TU_CTX_OR_SKIP(ctx);
    clh_clip *m = load_model(MODEL);
    io in = make_inputs(m);
    clh_hclip_options opt = {.block_size = 16, .ortho = CLH_ORTHO_BOTH};
    clh_hclip *a, *b;
    TU_OK(clh_hclip_new(m, &opt, &a));
    opt.recompute = 1;
    TU_OK(clh_hclip_new(m, &opt, &b));
    perturb(a, 0.05f, 3);
    perturb(b, 0.05f, 3);
    size_t base = clh_ctx_peak_device_bytes(ctx);
    grads ga = train_grads(a, &in, 100), gb = train_grads(b, &in, 100);
    (void)base;
    for (int i = 0; i < ga.count; i++) {
        assert_int_equal(ga.n[i], gb.n[i]);
        assert_memory_equal(ga.g[i], gb.g[i], ga.n[i] * sizeof(float));
        double mx = 0;
        for (size_t j = 0; j < ga.n[i]; j++)
            mx = fmax(mx, fabs(ga.g[i][j]));
        assert_true(mx > 0); /* every parameter gets a gradient */
    }
    free_grads(&ga);
    free_grads(&gb);
    clh_hclip_free(a);
    clh_hclip_free(b);
    free_inputs(&in);
    clh_clip_free(m);
}

/* ------------------------------------------------------------------ folding */

static void test_folded_export_matches(void **state) {
    TU_CTX_OR_SKIP(ctx);
    clh_clip *m = load_model(MODEL);
    io in = make_inputs(m);
    clh_hclip_options opt = {.block_size = 16, .ortho = CLH_ORTHO_TEXT};
    clh_hclip *h;
    TU_OK(clh_hclip_new(m, &opt, &h));
    perturb(h, 0.1f, 21);
    char dir[] = "/tmp/clhclip-fold-XXXXXX";
    assert_non_null(mkdtemp(dir));
    TU_OK(clh_hclip_export_folded(h, dir));
    clh_clip *folded;
    TU_OK(clh_clip_load(ctx, dir, &folded));
    clh_image_request req = train_request();
    clh_image_outputs a, b;
    clh_tensor *ta, *tb;
    TU_OK(clh_hclip_forward(h, 0, in.pixels, &req, &a, in.ids, in.n_text, in.context, &ta));
    TU_OK(clh_clip_encode_image(folded, in.pixels, &req, &b));
    TU_OK(clh_clip_encode_text(folded, in.ids, in.n_text, in.context, &tb));
    assert_same_tensor(b.pooled, a.pooled, 1e-5);
    assert_same_tensor(b.dense, a.dense, 1e-5);
    assert_same_tensor(b.hooks[0], a.hooks[0], 1e-5);
    assert_same_tensor(tb, ta, 1e-5);
    /* and the adapters changed something: the folded model differs from the base */
    clh_image_outputs base;
    TU_OK(clh_clip_encode_image(m, in.pixels, &req, &base));
    float *x = download(base.dense), *y = download(b.dense);
    double err, mag;
    tu_max_errors(x, y, clh_tensor_numel(b.dense), &err, &mag);
    assert_true(err > 1e-3 * mag);
    free(x);
    free(y);
    clh_image_outputs_release(&base);
    clh_image_outputs_release(&a);
    clh_image_outputs_release(&b);
    clh_tensor_release(ta);
    clh_tensor_release(tb);
    char path[128];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    remove(path);
    snprintf(path, sizeof path, "%s/config.json", dir);
    remove(path);
    rmdir(dir);
    clh_clip_free(folded);
    clh_hclip_free(h);
    free_inputs(&in);
    clh_clip_free(m);
}

/* ------------------------------------------------------------------ training */

/* Synthetic objective: L = 0.5 |dense - target_d|^2 + 0.5 |text - target_t|^2, gradients
 * computed on the host. */
typedef struct objective {
    float *target_dense, *target_text;
} objective;

static double loss_and_grad(const clh_tensor *out, const float *target, clh_tensor **grad) {
    size_t n = clh_tensor_numel(out);
    float *y = download(out);
    double loss = 0;
    for (size_t i = 0; i < n; i++) {
        y[i] -= target[i];
        loss += 0.5 * (double)y[i] * y[i];
    }
    TU_OK(clh_tensor_from_host(clh_tensor_ctx(out), clh_tensor_ndim(out), clh_tensor_shape(out), y,
                               grad));
    free(y);
    return loss;
}

/* One AdamW step; returns the loss before it. */
static double train_step(clh_hclip *h, clh_adamw *opt, io *in, const objective *obj) {
    clh_image_request req = {0, 1, 1, 0, NULL};
    clh_image_outputs out;
    clh_tensor *text, *dd, *dt;
    TU_OK(clh_hclip_zero_grad(h));
    TU_OK(clh_hclip_forward(h, 1, in->pixels, &req, &out, in->ids, in->n_text, in->context, &text));
    double loss = loss_and_grad(out.dense, obj->target_dense, &dd);
    loss += loss_and_grad(text, obj->target_text, &dt);
    TU_OK(clh_hclip_backward(h, NULL, dd, NULL, dt));
    TU_OK(clh_adamw_clip_grad_norm(opt, 10.0f, NULL));
    TU_OK(clh_adamw_step(opt, clh_cosine_schedule(clh_adamw_steps(opt), 200, 5)));
    TU_OK(clh_hclip_update(h));
    clh_image_outputs_release(&out);
    clh_tensor_release(text);
    clh_tensor_release(dd);
    clh_tensor_release(dt);
    return loss;
}

static clh_adamw *make_optimizer(clh_hclip *h) {
    clh_adamw *opt;
    TU_OK(clh_adamw_new(tu_ctx(), &opt));
    clh_adamw_config cfg = {
        .lr = 2e-3f, .beta1 = 0.9f, .beta2 = 0.999f, .eps = 1e-8f, .weight_decay = 1e-4f};
    int group;
    TU_OK(clh_adamw_add_group(opt, &cfg, &group));
    for (int i = 0; i < clh_hclip_num_params(h); i++) {
        clh_tensor *p, *g;
        TU_OK(clh_hclip_param(h, i, NULL, &p, &g));
        TU_OK(clh_adamw_add_param(opt, group, p, g));
    }
    return opt;
}

/* Targets: the outputs of the same model with other (random) adapters, so the objective
 * is reachable. */
static objective make_objective(clh_clip *m, io *in) {
    clh_hclip_options opt = {.block_size = 16};
    clh_hclip *teacher;
    TU_OK(clh_hclip_new(m, &opt, &teacher));
    perturb(teacher, 0.15f, 77);
    clh_image_request req = {0, 1, 1, 0, NULL};
    clh_image_outputs out;
    clh_tensor *text;
    TU_OK(clh_hclip_forward(teacher, 0, in->pixels, &req, &out, in->ids, in->n_text, in->context,
                            &text));
    objective obj = {download(out.dense), download(text)};
    clh_image_outputs_release(&out);
    clh_tensor_release(text);
    clh_hclip_free(teacher);
    return obj;
}

static void test_loss_falls_over_100_steps(void **state) {
    TU_CTX_OR_SKIP(ctx);
    (void)ctx;
    clh_clip *m = load_model(MODEL);
    io in = make_inputs(m);
    objective obj = make_objective(m, &in);
    clh_hclip_options opt = {.block_size = 16};
    clh_hclip *h;
    TU_OK(clh_hclip_new(m, &opt, &h));
    clh_adamw *adam = make_optimizer(h);
    double first = 0, last = 0, prev_window = 1e300;
    for (int step = 0; step < 100; step++) {
        double loss = train_step(h, adam, &in, &obj);
        if (step == 0)
            first = loss;
        last = loss;
        if (step % 25 == 24) { /* steadily: every quarter ends lower than the one before */
            print_message("  step %3d: loss %.5f\n", step + 1, loss);
            assert_true(loss < prev_window);
            prev_window = loss;
        }
    }
    print_message("  loss %.5f -> %.5f\n", first, last);
    assert_true(last < 0.5 * first);
    clh_adamw_free(adam);
    clh_hclip_free(h);
    free(obj.target_dense);
    free(obj.target_text);
    free_inputs(&in);
    clh_clip_free(m);
}

/* N steps equal K steps + save + load into fresh objects + (N - K) steps, bit for bit. */
static void test_resume_is_bit_identical(void **state) {
    TU_CTX_OR_SKIP(ctx);
    (void)ctx;
    const int N = 6, K = 3;
    clh_clip *m = load_model(MODEL);
    io in = make_inputs(m);
    objective obj = make_objective(m, &in);
    clh_hclip_options opt = {.block_size = 16};
    clh_hclip *a, *b;
    TU_OK(clh_hclip_new(m, &opt, &a));
    clh_adamw *adam_a = make_optimizer(a);
    for (int i = 0; i < N; i++)
        train_step(a, adam_a, &in, &obj);

    TU_OK(clh_hclip_new(m, &opt, &b));
    clh_adamw *adam_b = make_optimizer(b);
    for (int i = 0; i < K; i++)
        train_step(b, adam_b, &in, &obj);
    clh_train_state st = {.step = K};
    clh_rng_seed(&st.rng, 5);
    clh_rng_next_u64(&st.rng);
    TU_OK(clh_hclip_save_checkpoint(b, adam_b, &st, "{\"note\":\"test\"}",
                                    tu_tmp_path("resume.safetensors")));
    clh_adamw_free(adam_b);
    clh_hclip_free(b);

    TU_OK(clh_hclip_new(m, &opt, &b));
    adam_b = make_optimizer(b);
    clh_train_state back = {0};
    TU_OK(clh_hclip_load_checkpoint(b, adam_b, &back, tu_tmp_path("resume.safetensors")));
    assert_int_equal(back.step, K);
    assert_true(back.rng.seed == st.rng.seed && back.rng.counter == st.rng.counter);
    assert_int_equal(clh_adamw_steps(adam_b), K);
    for (int i = K; i < N; i++)
        train_step(b, adam_b, &in, &obj);
    for (int i = 0; i < clh_hclip_num_params(a); i++) {
        clh_tensor *pa, *pb;
        TU_OK(clh_hclip_param(a, i, NULL, &pa, NULL));
        TU_OK(clh_hclip_param(b, i, NULL, &pb, NULL));
        float *x = download(pa), *y = download(pb);
        assert_memory_equal(x, y, clh_tensor_numel(pa) * sizeof(float));
        free(x);
        free(y);
    }
    clh_adamw_free(adam_a);
    clh_adamw_free(adam_b);
    clh_hclip_free(a);
    clh_hclip_free(b);
    free(obj.target_dense);
    free(obj.target_text);
    free_inputs(&in);
    clh_clip_free(m);
}

/* Copy checkpoint src to dst with tensor `victim` reshaped flat (reshape) or with a NaN. */
static void corrupt_checkpoint(const char *src, const char *dst, const char *victim, int reshape) {
    static const char *keys[] = {"format", "version", "config", "base_hash"};
    clh_st_file *f;
    TU_OK(clh_st_open(src, &f));
    clh_st_writer *w;
    TU_OK(clh_st_writer_new(&w));
    for (size_t i = 0; i < clh_st_count(f); i++) {
        clh_st_tensor_info info;
        TU_OK(clh_st_info_at(f, i, &info));
        float *x = malloc(info.numel * sizeof *x);
        TU_OK(clh_st_read_f32(f, info.name, x, info.numel));
        int64_t flat[1] = {(int64_t)info.numel};
        int hit = strcmp(info.name, victim) == 0;
        if (hit && !reshape)
            x[info.numel / 2] = NAN;
        TU_OK(clh_st_writer_add_f32(w, info.name, hit && reshape ? 1 : info.ndim,
                                    hit && reshape ? flat : info.shape, x));
        free(x);
    }
    for (size_t k = 0; k < sizeof keys / sizeof *keys; k++)
        TU_OK(clh_st_writer_set_metadata(w, keys[k], clh_st_metadata(f, keys[k])));
    TU_OK(clh_st_writer_save(w, dst));
    clh_st_writer_free(w);
    clh_st_close(f);
}

static void assert_params_equal(clh_hclip *h, float **before) {
    for (int i = 0; i < clh_hclip_num_params(h); i++) {
        clh_tensor *p;
        TU_OK(clh_hclip_param(h, i, NULL, &p, NULL));
        float *now = download(p);
        assert_memory_equal(now, before[i], clh_tensor_numel(p) * sizeof(float));
        free(now);
    }
}

static void test_checkpoint_errors(void **state) {
    TU_CTX_OR_SKIP(ctx);
    (void)ctx;
    clh_clip *m = load_model(MODEL);
    clh_hclip_options opt = {.block_size = 16};
    clh_hclip *h, *other;
    TU_OK(clh_hclip_new(m, &opt, &h));
    perturb(h, 0.1f, 5);
    char path[600], bad[600]; /* tu_tmp_path returns a static buffer: copy */
    snprintf(path, sizeof path, "%s", tu_tmp_path("ckpt.safetensors"));
    snprintf(bad, sizeof bad, "%s", tu_tmp_path("bad.safetensors"));
    TU_OK(clh_hclip_save_checkpoint(h, NULL, NULL, NULL, path));
    /* another adapter configuration */
    clh_hclip_options opt8 = {.block_size = 8};
    TU_OK(clh_hclip_new(m, &opt8, &other));
    TU_FAILS(clh_hclip_load_checkpoint(other, NULL, NULL, path), CLH_ERR_INVALID_ARGUMENT,
             "adapter configuration");
    clh_hclip_free(other);
    /* other base weights: the legacy model's text tower is 32 wide, so block size 16 fits */
    clh_clip *m2 = load_model("clip_legacy_sparse");
    TU_OK(clh_hclip_new(m2, &opt, &other));
    TU_FAILS(clh_hclip_load_checkpoint(other, NULL, NULL, path), CLH_ERR_INVALID_ARGUMENT,
             "other base weights");
    clh_hclip_free(other);
    clh_clip_free(m2);
    /* a wrong shape with the right element count, or a NaN, changes nothing */
    float *before[3];
    for (int i = 0; i < clh_hclip_num_params(h); i++) {
        clh_tensor *p;
        TU_OK(clh_hclip_param(h, i, NULL, &p, NULL));
        before[i] = download(p);
    }
    clh_hclip *fresh;
    TU_OK(clh_hclip_new(m, &opt, &fresh));
    perturb(fresh, 0.3f, 6); /* different values, so a partial load would show */
    float *fresh_before[3];
    for (int i = 0; i < clh_hclip_num_params(fresh); i++) {
        clh_tensor *p;
        TU_OK(clh_hclip_param(fresh, i, NULL, &p, NULL));
        fresh_before[i] = download(p);
    }
    corrupt_checkpoint(path, bad, "hclip.A", 1);
    TU_FAILS(clh_hclip_load_checkpoint(fresh, NULL, NULL, bad), CLH_ERR_FORMAT, "hclip.A");
    assert_params_equal(fresh, fresh_before);
    corrupt_checkpoint(path, bad, "hclip.B", 0);
    TU_FAILS(clh_hclip_load_checkpoint(fresh, NULL, NULL, bad), CLH_ERR_FORMAT, "non-finite");
    assert_params_equal(fresh, fresh_before);
    TU_OK(clh_hclip_load_checkpoint(fresh, NULL, NULL, path)); /* the good one loads */
    assert_params_equal(fresh, before);
    for (int i = 0; i < clh_hclip_num_params(h); i++) {
        free(before[i]);
        free(fresh_before[i]);
    }
    clh_hclip_free(fresh);
    /* a truncated file changes nothing */
    clh_tensor *p;
    TU_OK(clh_hclip_param(h, 0, NULL, &p, NULL));
    float *first = download(p);
    FILE *f = fopen(path, "r+b");
    assert_non_null(f);
    assert_int_equal(ftruncate(fileno(f), 100), 0);
    fclose(f);
    TU_FAILS(clh_hclip_load_checkpoint(h, NULL, NULL, path), CLH_ERR_FORMAT, path);
    float *after = download(p);
    assert_memory_equal(first, after, clh_tensor_numel(p) * sizeof(float));
    free(first);
    free(after);
    TU_FAILS(clh_hclip_load_checkpoint(h, NULL, NULL, "/nonexistent/ckpt.safetensors"), CLH_ERR_IO,
             "/nonexistent/ckpt.safetensors");
    clh_hclip_free(h);
    clh_clip_free(m);
}

/* The same weights under HF and OpenAI names hash the same; other weights do not. */
static void test_weights_hash(void **state) {
    TU_CTX_OR_SKIP(ctx);
    (void)ctx;
    clh_clip *a = load_model("clip_tiny_openai"), *b = load_model("clip_tiny_openai_hf");
    clh_clip *c = load_model(MODEL);
    assert_true(clh_clip_weights_hash(a) == clh_clip_weights_hash(b));
    assert_true(clh_clip_weights_hash(a) != clh_clip_weights_hash(c));
    clh_clip_free(a);
    clh_clip_free(b);
    clh_clip_free(c);
}

/* ------------------------------------------------------------------ hyperspherical energy */

static void test_he_drift_and_loss(void **state) {
    TU_CTX_OR_SKIP(ctx);
    (void)ctx;
    clh_clip *m = load_model(MODEL);
    const clh_clip_config *c = clh_clip_get_config(m);
    int lm = c->text.layers > c->vision.layers ? c->text.layers : c->vision.layers;
    clh_hclip_options opt = {.block_size = 16, .ortho = CLH_ORTHO_TEXT};
    clh_hclip *h;
    TU_OK(clh_hclip_new(m, &opt, &h));
    perturb(h, 0.2f, 9);
    double *drift = calloc((size_t)2 * lm * 4, sizeof *drift);
    TU_OK(clh_hclip_he_drift(h, 1.0f, drift));
    double text_max = 0, vision_max = 0;
    for (int l = 0; l < lm; l++)
        for (int t = 0; t < 4; t++) {
            text_max = fmax(text_max, fabs(drift[(0 * lm + l) * 4 + t]));
            vision_max = fmax(vision_max, fabs(drift[(1 * lm + l) * 4 + t]));
        }
    print_message("  HE drift: text (orthogonal) %.2g, vision (free) %.2g\n", text_max, vision_max);
    assert_true(text_max <= 1e-4); /* orthogonal transforms keep HE */
    assert_true(vision_max > 1e-4);
    /* the loss term on the vision tower pulls the drift down */
    io in = make_inputs(m);
    clh_he_options he = {.lambda = 1e-2f, .s = 1.0f, .text = 0, .vision = 1, .last_layer = -1};
    TU_OK(clh_hclip_set_he_loss(h, &he));
    clh_adamw *adam = make_optimizer(h);
    double first = -1, last = 0;
    for (int step = 0; step < 20; step++) {
        clh_image_request req = {0, 1, 1, 0, NULL};
        clh_image_outputs out;
        TU_OK(clh_hclip_zero_grad(h));
        TU_OK(clh_hclip_forward(h, 1, in.pixels, &req, &out, NULL, 0, 0, NULL));
        clh_tensor *zero;
        TU_OK(clh_tensor_new(tu_ctx(), 3, clh_tensor_shape(out.dense), &zero));
        TU_OK(clh_hclip_backward(h, NULL, zero, NULL, NULL));
        if (first < 0)
            first = clh_hclip_he_loss(h);
        last = clh_hclip_he_loss(h);
        TU_OK(clh_adamw_step(adam, 1.0f));
        TU_OK(clh_hclip_update(h));
        clh_tensor_release(zero);
        clh_image_outputs_release(&out);
    }
    print_message("  HE loss %.4g -> %.4g\n", first, last);
    assert_true(first > 0 && last < first);
    clh_adamw_free(adam);
    free(drift);
    free_inputs(&in);
    clh_hclip_free(h);
    clh_clip_free(m);
}

/* ------------------------------------------------------------------ PyTorch parity */

#define PARITY_TOL 1e-4 /* relative to the largest expected magnitude (issue 3) */

static float *read_expected(clh_st_file *f, const char *name, size_t *n) {
    clh_st_tensor_info info;
    TU_OK(clh_st_info(f, name, &info));
    float *x = malloc(info.numel * sizeof *x);
    TU_OK(clh_st_read_f32(f, name, x, info.numel));
    *n = info.numel;
    return x;
}

static clh_tensor *expected_tensor(clh_st_file *f, const char *name) {
    clh_st_tensor_info info;
    size_t n;
    TU_OK(clh_st_info(f, name, &info));
    float *x = read_expected(f, name, &n);
    clh_tensor *t;
    TU_OK(clh_tensor_from_host(tu_ctx(), info.ndim, info.shape, x, &t));
    free(x);
    return t;
}

static void compare_expected(const clh_tensor *got, clh_st_file *f, const char *name,
                             const char *fixture) {
    size_t n;
    float *want = read_expected(f, name, &n), *have = download(got);
    assert_int_equal(clh_tensor_numel(got), n);
    double err, mag;
    tu_max_errors(have, want, n, &err, &mag);
    print_message("  %s/%s: max rel err %.2g\n", fixture, name, mag > 0 ? err / mag : err);
    TU_ASSERT_CLOSE(have, want, n, PARITY_TOL, 0.0);
    free(want);
    free(have);
}

static clh_ortho parse_ortho(const char *s) {
    if (strcmp(s, "both") == 0)
        return CLH_ORTHO_BOTH;
    if (strcmp(s, "none") == 0)
        return CLH_ORTHO_NONE;
    if (strcmp(s, "vision") == 0)
        return CLH_ORTHO_VISION;
    return CLH_ORTHO_TEXT;
}

/* Adapters with the options and tensors of <dir>/adapters.safetensors. */
static clh_hclip *load_adapters(clh_clip *m, const char *dir, int *hooks, int *n_hooks) {
    char path[1200];
    snprintf(path, sizeof path, "%s/adapters.safetensors", dir);
    clh_st_file *f;
    TU_OK(clh_st_open(path, &f));
    clh_hclip_options opt = {
        .block_size = atoi(clh_st_metadata(f, "q")),
        .ortho = parse_ortho(clh_st_metadata(f, "orthogonal")),
        .no_modality_map = strcmp(clh_st_metadata(f, "use_a"), "1") != 0,
        .no_layer_map = strcmp(clh_st_metadata(f, "use_b"), "1") != 0,
    };
    *n_hooks = 0;
    for (const char *p = clh_st_metadata(f, "hooks_vision"); p && *p; p = strchr(p, ',')) {
        if (*p == ',')
            p++;
        hooks[(*n_hooks)++] = atoi(p);
    }
    clh_hclip *h;
    TU_OK(clh_hclip_new(m, &opt, &h));
    for (int i = 0; i < clh_hclip_num_params(h); i++) {
        const char *name;
        clh_tensor *p;
        size_t n;
        TU_OK(clh_hclip_param(h, i, &name, &p, NULL));
        float *x = read_expected(f, name, &n);
        TU_OK(clh_tensor_upload(p, x, n));
        free(x);
    }
    TU_OK(clh_hclip_update(h));
    clh_st_close(f);
    return h;
}

static void run_hclip_parity(const char *name) {
    TU_CTX_OR_SKIP(ctx);
    const char *dir = tu_fixture(name);
    if (access(dir, R_OK) != 0) {
        print_message("SKIP: %s absent (tests/reference/make_hclip_fixtures.py)\n", dir);
        skip();
    }
    char d[1024], path[1200];
    snprintf(d, sizeof d, "%s", dir);
    clh_clip *m;
    TU_OK(clh_clip_load(ctx, d, &m));
    int hooks[8], n_hooks;
    clh_hclip *h = load_adapters(m, d, hooks, &n_hooks);
    clh_st_file *in, *exp;
    snprintf(path, sizeof path, "%s/inputs.safetensors", d);
    TU_OK(clh_st_open(path, &in));
    snprintf(path, sizeof path, "%s/expected.safetensors", d);
    TU_OK(clh_st_open(path, &exp));
    compare_expected(clh_hclip_blocks(h), exp, "dcrc_blocks", name);

    clh_tensor *px = expected_tensor(in, "pixel_values");
    clh_st_tensor_info ii;
    TU_OK(clh_st_info(in, "input_ids", &ii));
    int64_t *ids64 = malloc(ii.numel * sizeof *ids64);
    int32_t *ids = malloc(ii.numel * sizeof *ids);
    TU_OK(clh_st_read_i64(in, "input_ids", ids64, ii.numel));
    for (size_t i = 0; i < ii.numel; i++)
        ids[i] = (int32_t)ids64[i];

    clh_image_request req = {1, 1, 1, n_hooks, hooks};
    clh_image_outputs out;
    clh_tensor *text;
    TU_OK(clh_hclip_zero_grad(h));
    TU_OK(clh_hclip_forward(h, 1, px, &req, &out, ids, (int)ii.shape[0], (int)ii.shape[1], &text));
    compare_expected(out.dense, exp, "image_dense_catseg", name);
    compare_expected(out.pooled, exp, "image_pooled", name);
    compare_expected(text, exp, "text_features", name);
    const clh_tensor *d_hooks[8];
    for (int i = 0; i < n_hooks; i++) {
        char key[64];
        snprintf(key, sizeof key, "hidden_vision_%d", hooks[i]);
        compare_expected(out.hooks[i], exp, key, name);
        snprintf(key, sizeof key, "grad_out_hidden_%d", hooks[i]);
        d_hooks[i] = expected_tensor(exp, key);
    }
    clh_tensor *dd = expected_tensor(exp, "grad_out_dense");
    clh_tensor *dt = expected_tensor(exp, "grad_out_text");
    TU_OK(clh_hclip_backward(h, NULL, dd, d_hooks, dt));
    static const char *grad_names[3] = {"grad_P", "grad_A", "grad_B"};
    for (int i = 0; i < clh_hclip_num_params(h); i++) {
        const char *pname;
        clh_tensor *g;
        TU_OK(clh_hclip_param(h, i, &pname, NULL, &g));
        compare_expected(g, exp, grad_names[pname[6] == 'P' ? 0 : pname[6] == 'A' ? 1 : 2], name);
    }
    for (int i = 0; i < n_hooks; i++)
        clh_tensor_release((clh_tensor *)d_hooks[i]);
    clh_tensor_release(dd);
    clh_tensor_release(dt);
    clh_tensor_release(text);
    clh_tensor_release(px);
    clh_image_outputs_release(&out);
    free(ids);
    free(ids64);
    clh_st_close(in);
    clh_st_close(exp);
    clh_hclip_free(h);
    clh_clip_free(m);
}

static void test_parity_text_ortho(void **state) {
    run_hclip_parity("hclip_tiny_text_ortho");
}

/* both towers orthogonal, vision deeper than text, position embeddings resized */
static void test_parity_both_depths(void **state) {
    run_hclip_parity("hclip_tiny_both_depths");
}

/* relation maps switched off, text wider than vision */
static void test_parity_no_maps(void **state) {
    run_hclip_parity("hclip_tiny_no_maps");
}

/* Two models on one context: a training forward of one discards the other's pending one
 * (the workspace is a stack), and freeing models gives their workspace back. */
static void test_two_models_share_workspace(void **state) {
    TU_CTX_OR_SKIP(ctx);
    clh_clip *m = load_model(MODEL);
    io in = make_inputs(m);
    clh_hclip_options opt = {.block_size = 16};
    clh_hclip *a, *b;
    TU_OK(clh_hclip_new(m, &opt, &a));
    TU_OK(clh_hclip_new(m, &opt, &b));
    clh_image_request req = {0, 1, 1, 0, NULL};
    clh_image_outputs oa, ob;
    TU_OK(clh_hclip_forward(a, 1, in.pixels, &req, &oa, NULL, 0, 0, NULL));
    TU_OK(clh_hclip_forward(b, 1, in.pixels, &req, &ob, NULL, 0, 0, NULL));
    TU_FAILS(clh_hclip_backward(a, NULL, oa.dense, NULL, NULL), CLH_ERR_INVALID_ARGUMENT,
             "no training forward");
    TU_OK(clh_hclip_backward(b, NULL, ob.dense, NULL, NULL));
    clh_image_outputs_release(&oa);
    clh_image_outputs_release(&ob);
    size_t after_first = 0;
    for (int i = 0; i < 6; i++) { /* pending forwards dropped by free do not pile up */
        clh_hclip *c;
        TU_OK(clh_hclip_new(m, &opt, &c));
        TU_OK(clh_hclip_forward(c, 1, in.pixels, &req, &oa, NULL, 0, 0, NULL));
        clh_image_outputs_release(&oa);
        clh_hclip_free(c);
        if (i == 0)
            after_first = clh_ctx_device_bytes(ctx);
    }
    assert_int_equal(clh_ctx_device_bytes(ctx), after_first);
    clh_hclip_free(a);
    clh_hclip_free(b);
    free_inputs(&in);
    clh_clip_free(m);
}

/* ------------------------------------------------------------------ large step (optional) */

/* One training step (forward + backward through both towers) of the model in
 * $CLHCLIP_LARGE_FIXTURE (e.g. the ViT-B/16 written by make_clip_fixtures.py --config
 * vitb16_384) at 384x384 with 171 prompts; prints wall time and peak device memory. */
static void large_step(const char *dir, int recompute) {
    clh_ctx *ctx;
    TU_OK(clh_ctx_create(NULL, &ctx));
    clh_clip *m;
    TU_OK(clh_clip_load(ctx, dir, &m));
    const clh_clip_config *c = clh_clip_get_config(m);
    size_t weights = clh_ctx_device_bytes(ctx);
    clh_hclip_options opt = {.block_size = 128, .recompute = recompute};
    clh_hclip *h;
    TU_OK(clh_hclip_new(m, &opt, &h));
    int64_t px_shape[4] = {1, 3, 384, 384};
    clh_tensor *px = random_tensor(ctx, 4, px_shape, 1.5f, 3);
    const int n_text = 171, context = c->max_positions;
    int32_t *ids = calloc((size_t)n_text * context, sizeof *ids);
    for (int r = 0; r < n_text; r++) {
        int len = 6 + r % 12;
        ids[r * context] = c->vocab_size - 2;
        for (int j = 1; j < len; j++)
            ids[r * context + j] = 1 + (r * 131 + j * 17) % (c->vocab_size - 3);
        ids[r * context + len] = c->eos_token_id;
    }
    int hooks[2] = {3, 7};
    clh_image_request req = {0, 1, 1, 2, hooks};
    double t0 = clh_test_now();
    clh_image_outputs out;
    clh_tensor *text;
    TU_OK(clh_hclip_zero_grad(h));
    TU_OK(clh_hclip_forward(h, 1, px, &req, &out, ids, n_text, context, &text));
    TU_OK(clh_ctx_finish(ctx));
    double t1 = clh_test_now();
    clh_tensor *dd = random_tensor(ctx, 3, clh_tensor_shape(out.dense), 1, 4);
    clh_tensor *dh0 = random_tensor(ctx, 3, clh_tensor_shape(out.hooks[0]), 1, 5);
    clh_tensor *dh1 = random_tensor(ctx, 3, clh_tensor_shape(out.hooks[1]), 1, 6);
    clh_tensor *dt = random_tensor(ctx, 2, clh_tensor_shape(text), 1, 7);
    const clh_tensor *dhooks[2] = {dh0, dh1};
    TU_OK(clh_hclip_backward(h, NULL, dd, dhooks, dt));
    TU_OK(clh_ctx_finish(ctx));
    double t2 = clh_test_now();
    print_message("  %s on %s: recompute=%d forward %.2f s, backward %.2f s, step %.2f s; peak "
                  "device memory %.2f GiB (weights %.2f GiB)\n",
                  dir, clh_ctx_device(ctx)->name, recompute, t1 - t0, t2 - t1, t2 - t0,
                  clh_ctx_peak_device_bytes(ctx) / 1073741824.0, weights / 1073741824.0);
    clh_tensor *all[] = {px, dd, dh0, dh1, dt, text};
    for (int i = 0; i < 6; i++)
        clh_tensor_release(all[i]);
    clh_image_outputs_release(&out);
    free(ids);
    clh_hclip_free(h);
    clh_clip_free(m);
    clh_ctx_destroy(ctx);
}

static void test_large_training_step(void **state) {
    const char *dir = getenv("CLHCLIP_LARGE_FIXTURE");
    if (!dir || !*dir) {
        print_message("SKIP: set CLHCLIP_LARGE_FIXTURE to a ViT-B/16 model directory\n");
        skip();
    }
    const char *which = getenv("CLHCLIP_LARGE_RECOMPUTE"); /* "0", "1" or unset: both */
    if (!which || strcmp(which, "0") == 0)
        large_step(dir, 0);
    if (!which || strcmp(which, "1") == 0)
        large_step(dir, 1);
}

static int teardown(void **state) {
    tu_ctx_teardown();
    return tu_teardown_tmp(state);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_identity_at_init),
        cmocka_unit_test(test_bad_options),
        cmocka_unit_test(test_recompute_matches),
        cmocka_unit_test(test_parity_text_ortho),
        cmocka_unit_test(test_parity_both_depths),
        cmocka_unit_test(test_parity_no_maps),
        cmocka_unit_test(test_folded_export_matches),
        cmocka_unit_test(test_weights_hash),
        cmocka_unit_test(test_checkpoint_errors),
        cmocka_unit_test(test_resume_is_bit_identical),
        cmocka_unit_test(test_loss_falls_over_100_steps),
        cmocka_unit_test(test_he_drift_and_loss),
        cmocka_unit_test(test_two_models_share_workspace),
        cmocka_unit_test(test_large_training_step),
    };
    return cmocka_run_group_tests_name("hclip", tests, tu_setup_tmp, teardown);
}
