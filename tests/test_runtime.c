/* Device runtime: discovery, selection, errors, tensors, workspace, launches, profiling. */
#include <sys/wait.h>
#include <unistd.h>

#include "testutil.h"
#include "internal.h"

static const char *self_path;

static void test_list_devices(void **state) {
    clh_device_info *devs = NULL;
    int n = 0;
    clh_status st = clh_list_devices(&devs, &n);
    if (st == CLH_ERR_NO_DEVICE) {
        print_message("SKIP: %s\n", clh_last_error());
        skip();
    }
    TU_OK(st);
    assert_true(n >= 1);
    char buf[4096];
    clh_device_info_format(&devs[0], buf, sizeof buf);
    assert_non_null(strstr(buf, devs[0].name));
    assert_non_null(strstr(buf, "OpenCL C"));
    assert_true(devs[0].max_work_group_size >= 1);
    assert_true(devs[0].max_alloc > 0);
    free(devs);
}

static void test_bad_selection_is_clear_error(void **state) {
    TU_CTX_OR_SKIP(ctx);
    (void)ctx;
    clh_ctx *other = NULL;
    clh_ctx_options opt = {.platform = NULL, .device = "no-such-device-xyz", .profile = 0};
    TU_FAILS(clh_ctx_create(&opt, &other), CLH_ERR_NO_DEVICE, "no-such-device-xyz");
    assert_null(other);
    opt.device = "57";
    TU_FAILS(clh_ctx_create(&opt, &other), CLH_ERR_NO_DEVICE, "scripts/info.lua");
    opt.device = "0";
    TU_OK(clh_ctx_create(&opt, &other));
    clh_ctx_destroy(other);
}

/* With no ICD registered, the message must say so and hint at the fix. The check runs
 * in a fresh process because the ICD loader reads its environment once. */
static void test_no_device_message(void **state) {
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        setenv("OCL_ICD_VENDORS", "/nonexistent-clhclip-icd-dir", 1);
        unsetenv("OCL_ICD_FILENAMES");
        execl(self_path, self_path, "--no-device-child", (char *)NULL);
        _exit(3);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
}

static int no_device_child(void) {
    clh_ctx *ctx = NULL;
    clh_status st = clh_ctx_create(NULL, &ctx);
    const char *msg = clh_last_error();
    int ok = st == CLH_ERR_NO_DEVICE && strstr(msg, "ICD") && strstr(msg, "POCL_CACHE_DIR");
    if (!ok)
        fprintf(stderr, "child: status %s, message '%s'\n", clh_status_name(st), msg);
    return ok ? 0 : 1;
}

static void test_tensor_roundtrip_and_views(void **state) {
    TU_CTX_OR_SKIP(ctx);
    int64_t shape[2] = {3, 5};
    clh_tensor *t;
    TU_OK(clh_tensor_new(ctx, 2, shape, &t));
    float host[15], back[15];
    TU_OK(clh_tensor_download(t, back, 15));
    for (int i = 0; i < 15; i++)
        assert_true(back[i] == 0.0f);
    for (int i = 0; i < 15; i++)
        host[i] = (float)i * 0.5f;
    TU_OK(clh_tensor_upload(t, host, 15));
    int64_t vshape[1] = {5};
    clh_tensor *row;
    TU_OK(clh_tensor_view(t, 5, 1, vshape, &row));
    assert_int_equal(clh_tensor_offset(row), 5);
    float r[5];
    TU_OK(clh_tensor_download(row, r, 5));
    for (int i = 0; i < 5; i++)
        assert_true(r[i] == host[5 + i]);
    TU_OK(clh_tensor_fill(row, 7.0f));
    clh_tensor_release(t); /* the view keeps the buffer alive */
    TU_OK(clh_tensor_download(row, r, 5));
    assert_true(r[4] == 7.0f);
    TU_FAILS(clh_tensor_upload(row, host, 15), CLH_ERR_SHAPE, "[5]");
    clh_tensor *bad = NULL;
    TU_FAILS(clh_tensor_view(row, 3, 1, vshape, &bad), CLH_ERR_SHAPE, "does not fit");
    assert_null(bad);
    clh_tensor_release(row);
}

/* Shapes whose element count overflows or exceeds the int index range are refused. */
static void test_shape_overflow(void **state) {
    TU_CTX_OR_SKIP(ctx);
    clh_tensor *t = NULL;
    int64_t huge[2] = {(int64_t)1 << 32, (int64_t)1 << 32};
    TU_FAILS(clh_tensor_new(ctx, 2, huge, &t), CLH_ERR_OUT_OF_MEMORY, "2^31-1");
    int64_t wrap[3] = {(int64_t)1 << 21, (int64_t)1 << 21, (int64_t)1 << 22};
    TU_FAILS(clh_ws_tensor(ctx, 3, wrap, &t), CLH_ERR_OUT_OF_MEMORY, "2^31-1");
    assert_null(t);
}

static void test_alloc_limit(void **state) {
    TU_CTX_OR_SKIP(ctx);
    const clh_device_info *info = clh_ctx_device(ctx);
    int64_t shape[1] = {(int64_t)(info->max_alloc / sizeof(float)) + 1024};
    clh_tensor *t = NULL;
    clh_status st = clh_tensor_new(ctx, 1, shape, &t);
    assert_int_equal(st, CLH_ERR_OUT_OF_MEMORY);
    assert_null(t);
    assert_true(strstr(clh_ctx_error(ctx), "maximum allocation") ||
                strstr(clh_ctx_error(ctx), "2^31"));
}

static void add_token_reference(float *x, const float *src, int n, int len, int dim, int src_len,
                                int token) {
    for (int s = 0; s < n; s++)
        for (int l = 0; l < len; l++)
            for (int d = 0; d < dim; d++)
                x[(s * len + l) * dim + d] += src[(s * src_len + token) * dim + d];
}

static clh_status launch_add_token(clh_ctx *ctx, clh_tensor *x, const clh_tensor *src, int n,
                                   int len, int dim, int src_len, int token) {
    int total = n * len * dim;
    size_t global[1] = {(size_t)total};
    clh_karg args[] = {CLH_KTENSOR(x),   CLH_KARG(n),       CLH_KARG(len),  CLH_KARG(dim),
                       CLH_KTENSOR(src), CLH_KARG(src_len), CLH_KARG(token)};
    return clh_launch(ctx, "clip_add_token_broadcast", 1, global, NULL, 9, args);
}

static void test_launch_odd_sizes(void **state) {
    TU_CTX_OR_SKIP(ctx);
    const int n = 3, len = 7, dim = 13, src_len = 5, token = 2;
    float x[3 * 7 * 13], src[3 * 5 * 13], want[3 * 7 * 13], got[3 * 7 * 13];
    tu_fill_random(x, sizeof x / sizeof *x, -1, 1, 1);
    tu_fill_random(src, sizeof src / sizeof *src, -1, 1, 2);
    memcpy(want, x, sizeof x);
    add_token_reference(want, src, n, len, dim, src_len, token);
    int64_t xs[3] = {n, len, dim}, ss[3] = {n, src_len, dim};
    clh_tensor *tx, *ts;
    TU_OK(clh_tensor_from_host(ctx, 3, xs, x, &tx));
    TU_OK(clh_tensor_from_host(ctx, 3, ss, src, &ts));
    TU_OK(launch_add_token(ctx, tx, ts, n, len, dim, src_len, token));
    TU_OK(clh_tensor_download(tx, got, sizeof got / sizeof *got));
    TU_ASSERT_CLOSE(got, want, sizeof got / sizeof *got, 0, 1e-6);
    clh_tensor_release(tx);
    clh_tensor_release(ts);
}

static void test_launch_errors_are_named(void **state) {
    TU_CTX_OR_SKIP(ctx);
    size_t global[1] = {4};
    TU_FAILS(clh_launch(ctx, "no_such_kernel", 1, global, NULL, 0, NULL), CLH_ERR_INVALID_ARGUMENT,
             "no_such_kernel");
    /* One argument more than the kernel declares: CL_INVALID_ARG_INDEX. */
    int n = 1;
    clh_tensor *t;
    int64_t shape[1] = {4};
    TU_OK(clh_tensor_new(ctx, 1, shape, &t));
    clh_karg args[] = {CLH_KTENSOR(t), CLH_KARG(n), CLH_KARG(n), CLH_KARG(n),
                       CLH_KTENSOR(t), CLH_KARG(n), CLH_KARG(n), CLH_KARG(n)};
    clh_status st = clh_launch(ctx, "clip_add_token_broadcast", 1, global, NULL, 10, args);
    clh_tensor_release(t);
    assert_int_equal(st, CLH_ERR_OPENCL);
    const char *msg = clh_ctx_error(ctx);
    assert_non_null(strstr(msg, "clSetKernelArg"));
    assert_non_null(strstr(msg, "clip_add_token_broadcast"));
    assert_non_null(strstr(msg, "CL_INVALID_"));
    assert_non_null(strstr(msg, clh_ctx_device(ctx)->name));
}

static void test_cl_error_names(void **state) {
    assert_string_equal(clh_cl_error_name(-54), "CL_INVALID_WORK_GROUP_SIZE");
    assert_string_equal(clh_cl_error_name(-5), "CL_OUT_OF_RESOURCES");
    assert_string_equal(clh_cl_error_name(12345), "CL_UNKNOWN_ERROR");
    assert_string_equal(clh_status_name(CLH_ERR_SHAPE), "CLH_ERR_SHAPE");
}

static void test_workspace_reuses_memory(void **state) {
    TU_CTX_OR_SKIP(ctx);
    size_t before = clh_ctx_device_bytes(ctx);
    for (int pass = 0; pass < 3; pass++) {
        size_t mark = clh_ws_mark(ctx);
        clh_tensor *a, *b;
        int64_t sa[2] = {1000, 1000}, sb[1] = {3000000}; /* together larger than one chunk */
        TU_OK(clh_ws_tensor(ctx, 2, sa, &a));
        TU_OK(clh_ws_tensor(ctx, 1, sb, &b));
        TU_OK(clh_tensor_fill(b, 1.0f));
        clh_tensor_release(a);
        clh_tensor_release(b);
        clh_ws_reset(ctx, mark);
        if (pass == 1)
            before = clh_ctx_device_bytes(ctx);
    }
    /* After the first pass consolidated the chunks, later passes allocate nothing. */
    assert_int_equal(clh_ctx_device_bytes(ctx), before);
    assert_true(clh_ctx_peak_device_bytes(ctx) >= before);
}

static void test_profile_table(void **state) {
    TU_CTX_OR_SKIP(base);
    (void)base;
    clh_ctx *ctx;
    clh_ctx_options opt = {NULL, NULL, 1};
    TU_OK(clh_ctx_create(&opt, &ctx));
    int64_t s[3] = {2, 3, 4};
    clh_tensor *x, *src;
    TU_OK(clh_tensor_new(ctx, 3, s, &x));
    TU_OK(clh_tensor_new(ctx, 3, s, &src));
    TU_OK(launch_add_token(ctx, x, src, 2, 3, 4, 3, 0));
    TU_OK(launch_add_token(ctx, x, src, 2, 3, 4, 3, 1));
    char *table = NULL;
    TU_OK(clh_profile_table(ctx, &table));
    assert_non_null(strstr(table, "clip_add_token_broadcast"));
    assert_non_null(strstr(table, " 2 "));
    free(table);
    clh_tensor_release(x);
    clh_tensor_release(src);
    clh_ctx_destroy(ctx);
}

/* A kernel that fails to compile must report the build log. */
static void test_build_failure_has_log(void **state) {
    TU_CTX_OR_SKIP(base);
    (void)base;
    char dir[] = "/tmp/clhclip-kdir-XXXXXX";
    assert_non_null(mkdtemp(dir));
    char path[256];
    snprintf(path, sizeof path, "%s/clip.cl", dir);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs("__kernel void clip_add_token_broadcast(__global float *x) { x[0] = undefined_name; }\n",
          f);
    fclose(f);
    setenv("CLHCLIP_KERNEL_DIR", dir, 1);
    clh_ctx *ctx;
    TU_OK(clh_ctx_create(NULL, &ctx));
    size_t global[1] = {1};
    clh_status st = clh_launch(ctx, "clip_add_token_broadcast", 1, global, NULL, 0, NULL);
    unsetenv("CLHCLIP_KERNEL_DIR");
    assert_int_equal(st, CLH_ERR_BUILD);
    assert_non_null(strstr(clh_ctx_error(ctx), "undefined_name"));
    assert_non_null(strstr(clh_ctx_error(ctx), "CL_BUILD_PROGRAM_FAILURE"));
    clh_ctx_destroy(ctx);
    remove(path);
    rmdir(dir);
}

static int teardown(void **state) {
    tu_ctx_teardown();
    return 0;
}

int main(int argc, char **argv) {
    self_path = argv[0];
    if (argc > 1 && strcmp(argv[1], "--no-device-child") == 0)
        return no_device_child();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_cl_error_names),
        cmocka_unit_test(test_no_device_message),
        cmocka_unit_test(test_list_devices),
        cmocka_unit_test(test_bad_selection_is_clear_error),
        cmocka_unit_test(test_tensor_roundtrip_and_views),
        cmocka_unit_test(test_alloc_limit),
        cmocka_unit_test(test_shape_overflow),
        cmocka_unit_test(test_launch_odd_sizes),
        cmocka_unit_test(test_launch_errors_are_named),
        cmocka_unit_test(test_workspace_reuses_memory),
        cmocka_unit_test(test_profile_table),
        cmocka_unit_test(test_build_failure_has_log),
    };
    return cmocka_run_group_tests_name("runtime", tests, NULL, teardown);
}
