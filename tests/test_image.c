/* Image loading, PIL-compatible resize, crop, PNG writing and CLIP preprocessing.
 * Expected values come from tests/reference/make_image_fixtures.py (PIL and HF
 * CLIPImageProcessorPil), stored in tests/fixtures/image/expected.safetensors. */
#include <errno.h>
#include <unistd.h>

#include "testutil.h"

static clh_st_file *expected;
static char tmp_dir[256];

static int setup(void **state) {
    (void)state;
    const char *base = getenv("TMPDIR");
    snprintf(tmp_dir, sizeof tmp_dir, "%s/clhclip-img-XXXXXX", base && *base ? base : "/tmp");
    if (!mkdtemp(tmp_dir))
        return -1;
    if (clh_st_open(tu_fixture("image/expected.safetensors"), &expected) != CLH_OK) {
        print_message("cannot open the expected values: %s\n", clh_last_error());
        return -1;
    }
    return 0;
}

static int teardown(void **state) {
    (void)state;
    clh_st_close(expected);
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp_dir);
    return system(cmd) == 0 ? 0 : -1;
}

static const char *tmp_path(const char *name) {
    static char path[512];
    snprintf(path, sizeof path, "%s/%s", tmp_dir, name);
    return path;
}

static void load_fixture_image(const char *name, clh_image *img) {
    char rel[256];
    snprintf(rel, sizeof rel, "image/%s", name);
    TU_OK(clh_image_load(tu_fixture(rel), img));
}

/* Expected tensor as floats (U8 and F32 tensors); caller frees. */
static float *read_expected(const char *name, clh_st_tensor_info *info) {
    TU_OK(clh_st_info(expected, name, info));
    float *v = malloc(info->numel * sizeof *v);
    assert_non_null(v);
    if (info->dtype == CLH_DTYPE_F32) {
        TU_OK(clh_st_read_f32(expected, name, v, info->numel));
    } else {
        int64_t *iv = malloc(info->numel * sizeof *iv);
        assert_non_null(iv);
        TU_OK(clh_st_read_i64(expected, name, iv, info->numel));
        for (size_t i = 0; i < info->numel; i++)
            v[i] = (float)iv[i];
        free(iv);
    }
    return v;
}

static int starts_with(const char *s, const char *prefix) {
    return strncmp(s, prefix, strlen(prefix)) == 0;
}

/* ------------------------------------------------------------------ loading */

static void test_load_png_modes(void **state) {
    (void)state;
    int checked = 0;
    for (size_t i = 0; i < clh_st_count(expected); i++) {
        clh_st_tensor_info info;
        TU_OK(clh_st_info_at(expected, i, &info));
        if (!starts_with(info.name, "load/"))
            continue;
        clh_image img;
        load_fixture_image(info.name + 5, &img);
        assert_int_equal(info.ndim, 3);
        assert_int_equal(img.height, info.shape[0]);
        assert_int_equal(img.width, info.shape[1]);
        float *want = read_expected(info.name, &info);
        for (size_t k = 0; k < info.numel; k++)
            if (img.data[k] != want[k])
                fail_msg("%s: value %zu is %g, PIL says %g", info.name, k, img.data[k], want[k]);
        free(want);
        clh_image_free(&img);
        assert_null(img.data);
        checked++;
    }
    assert_int_equal(checked, 5); /* 2 synthetic RGB + gray, RGBA, palette */
}

static void test_load_errors(void **state) {
    (void)state;
    clh_image img;
    TU_FAILS(clh_image_load("tests/fixtures/image/no_such_image.png", &img), CLH_ERR_IO,
             "no_such_image.png");
    assert_non_null(strstr(clh_last_error(), strerror(ENOENT)));
    assert_null(img.data);
    const char *not_image = tu_fixture("safetensors/python_dtypes.safetensors");
    TU_FAILS(clh_image_load(not_image, &img), CLH_ERR_FORMAT, "python_dtypes.safetensors");
    assert_null(img.data);
    /* A truncated PNG is a format error too. */
    FILE *in = fopen(tu_fixture("image/synth_50x61.png"), "rb");
    assert_non_null(in);
    char buf[600];
    size_t n = fread(buf, 1, sizeof buf, in);
    fclose(in);
    assert_int_equal(n, sizeof buf);
    FILE *out = fopen(tmp_path("cut.png"), "wb");
    assert_non_null(out);
    assert_int_equal(fwrite(buf, 1, n, out), n);
    fclose(out);
    TU_FAILS(clh_image_load(tmp_path("cut.png"), &img), CLH_ERR_FORMAT, "cut.png");
    TU_FAILS(clh_image_load(NULL, &img), CLH_ERR_INVALID_ARGUMENT, "NULL");
}

/* Real photos from ../shared/data: sizes from the README, pixel content against PIL's
 * decode averaged over an 8x8 grid of blocks. PNG decoding is lossless, so the means must
 * agree to float rounding; JPEG decoders (stb vs libjpeg) differ in IDCT and chroma
 * upsampling, which moves single pixels by a few levels but block means very little. */
static void test_real_images(void **state) {
    (void)state;
    char dir[2048];
    TU_SHARED_OR_SKIP(dir, ".");
    static const struct {
        const char *rel;
        int width, height;
    } sizes[] = {
        {"segmentation/ade20k_sceneparsing/images/ADE_val_00000001.jpg", 683, 512},
        {"segmentation/ade20k_sceneparsing/images/ADE_val_00000002.jpg", 500, 364},
        {"segmentation/ade20k_sceneparsing/images/ADE_val_00000003.jpg", 400, 300},
        {"segmentation/ade20k_sceneparsing/annotations/ADE_val_00000001.png", 683, 512},
        {"segmentation/voc2012_vainf/1_image.png", 513, 513},
        {"segmentation/voc2012_vainf/23_image.png", 513, 513},
    };
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        char path[4096], name[512];
        snprintf(path, sizeof path, "%s/%s", dir, sizes[i].rel);
        clh_image img;
        TU_OK(clh_image_load(path, &img));
        assert_int_equal(img.width, sizes[i].width);
        assert_int_equal(img.height, sizes[i].height);

        snprintf(name, sizeof name, "real_size/%s", sizes[i].rel);
        int64_t pil_size[2];
        TU_OK(clh_st_read_i64(expected, name, pil_size, 2));
        assert_int_equal(pil_size[0], img.width);
        assert_int_equal(pil_size[1], img.height);

        snprintf(name, sizeof name, "real/%s", sizes[i].rel);
        clh_st_tensor_info info;
        float *want = read_expected(name, &info);
        float got[8 * 8 * 3];
        for (int by = 0; by < 8; by++) {
            for (int bx = 0; bx < 8; bx++) {
                double sum[3] = {0, 0, 0};
                int y0 = by * img.height / 8, y1 = (by + 1) * img.height / 8;
                int x0 = bx * img.width / 8, x1 = (bx + 1) * img.width / 8;
                for (int y = y0; y < y1; y++)
                    for (int x = x0; x < x1; x++)
                        for (int c = 0; c < 3; c++)
                            sum[c] += img.data[((size_t)y * img.width + x) * 3 + c];
                for (int c = 0; c < 3; c++)
                    got[(by * 8 + bx) * 3 + c] = (float)(sum[c] / ((y1 - y0) * (x1 - x0)));
            }
        }
        int is_jpeg = strstr(sizes[i].rel, ".jpg") != NULL;
        double err, mag;
        tu_max_errors(got, want, 8 * 8 * 3, &err, &mag);
        print_message("%s: max |block mean - PIL| = %.4f levels\n", sizes[i].rel, err);
        TU_ASSERT_CLOSE(got, want, 8 * 8 * 3, 0.0, is_jpeg ? 1.0 : 1e-3);
        free(want);
        clh_image_free(&img);
    }
}

/* Full CLIP preprocessing of real photos at 224 against HF CLIPImageProcessorPil, compared
 * as 8x8 block means of the normalised HWC output. For the PNG our pixels equal PIL's, so
 * only float rounding remains (1e-5). For the JPEG the decoders differ (block means of the
 * raw pixels by up to 0.2 levels, see test_real_images), i.e. about 0.2/255/0.26 = 0.003
 * after normalisation; we allow 0.01. */
static void test_real_preprocess_matches_hf(void **state) {
    (void)state;
    char dir[2048];
    TU_SHARED_OR_SKIP(dir, ".");
    static const char *rels[] = {"segmentation/ade20k_sceneparsing/images/ADE_val_00000001.jpg",
                                 "segmentation/voc2012_vainf/1_image.png"};
    enum { S = 224 };
    float *chw = malloc(3 * S * S * sizeof *chw);
    assert_non_null(chw);
    for (size_t i = 0; i < 2; i++) {
        char path[4096], name[512];
        snprintf(path, sizeof path, "%s/%s", dir, rels[i]);
        clh_image img;
        TU_OK(clh_image_load(path, &img));
        TU_OK(clh_image_preprocess(&img, S, CLH_PREPROCESS_CENTER_CROP, chw));
        clh_image_free(&img);
        float got[8 * 8 * 3];
        for (int by = 0; by < 8; by++)
            for (int bx = 0; bx < 8; bx++)
                for (int c = 0; c < 3; c++) {
                    double sum = 0;
                    for (int y = by * S / 8; y < (by + 1) * S / 8; y++)
                        for (int x = bx * S / 8; x < (bx + 1) * S / 8; x++)
                            sum += chw[(size_t)c * S * S + y * S + x];
                    got[(by * 8 + bx) * 3 + c] = (float)(sum / ((S / 8) * (S / 8)));
                }
        snprintf(name, sizeof name, "real_clip224/%s", rels[i]);
        clh_st_tensor_info info;
        float *want = read_expected(name, &info);
        double err, mag;
        tu_max_errors(got, want, 8 * 8 * 3, &err, &mag);
        print_message("%s: preprocess 224 block means vs HF: max abs err %.3g\n", rels[i], err);
        TU_ASSERT_CLOSE(got, want, 8 * 8 * 3, 0.0, strstr(rels[i], ".jpg") ? 1e-2 : 1e-5);
        free(want);
    }
    free(chw);
}

/* ------------------------------------------------------------------ resize */

static void test_resize_matches_pil(void **state) {
    (void)state;
    int cases = 0;
    size_t values = 0, exact = 0;
    for (size_t i = 0; i < clh_st_count(expected); i++) {
        clh_st_tensor_info info;
        TU_OK(clh_st_info_at(expected, i, &info));
        char file[128];
        int w, h;
        if (sscanf(info.name, "resize/%127[^/]/%dx%d", file, &w, &h) != 3)
            continue;
        clh_image src, dst;
        load_fixture_image(file, &src);
        TU_OK(clh_image_resize(&src, w, h, &dst));
        assert_int_equal(dst.width, w);
        assert_int_equal(dst.height, h);
        assert_int_equal(info.shape[0], h);
        assert_int_equal(info.shape[1], w);
        float *want = read_expected(info.name, &info);
        double err, mag;
        tu_max_errors(dst.data, want, info.numel, &err, &mag);
        for (size_t k = 0; k < info.numel; k++)
            exact += dst.data[k] == want[k];
        values += info.numel;
        if (err > 1.0)
            fail_msg("%s: max |ours - PIL| = %g levels (> 1)", info.name, err);
        free(want);
        clh_image_free(&src);
        clh_image_free(&dst);
        cases++;
    }
    print_message("resize vs PIL: %d cases, %zu of %zu values identical\n", cases, exact, values);
    assert_int_equal(cases, 15);
    /* Pillow's fixed-point arithmetic is reproduced, so nothing should differ at all. */
    assert_int_equal(exact, values);
}

static void test_resize_properties(void **state) {
    (void)state;
    clh_image src, out;
    load_fixture_image("synth_37x23.png", &src);
    /* Same size: the image comes back unchanged. */
    TU_OK(clh_image_resize(&src, src.width, src.height, &out));
    assert_memory_equal(out.data, src.data, (size_t)src.width * src.height * 3 * sizeof(float));
    clh_image_free(&out);

    /* A constant image stays constant: coefficients are normalised per output pixel. */
    uint8_t flat[20 * 10 * 3];
    for (size_t i = 0; i < sizeof flat; i++)
        flat[i] = (uint8_t)(i % 3 == 0 ? 200 : i % 3 == 1 ? 17 : 255);
    clh_image constant;
    TU_OK(clh_image_from_rgb8(flat, 20, 10, &constant));
    static const int sizes[][2] = {{7, 3}, {41, 29}, {1, 1}, {20, 33}, {3, 10}};
    for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
        TU_OK(clh_image_resize(&constant, sizes[s][0], sizes[s][1], &out));
        for (int k = 0; k < out.width * out.height * 3; k++)
            assert_true(out.data[k] == constant.data[k % 3]);
        clh_image_free(&out);
    }
    clh_image_free(&constant);

    TU_FAILS(clh_image_resize(&src, 0, 5, &out), CLH_ERR_INVALID_ARGUMENT, "0x5");
    TU_FAILS(clh_image_resize(&src, 5, -1, &out), CLH_ERR_INVALID_ARGUMENT, "5x-1");
    TU_FAILS(clh_image_resize(NULL, 5, 5, &out), CLH_ERR_INVALID_ARGUMENT, "NULL");
    clh_image_free(&src);
}

/* ------------------------------------------------------------------ crop / PNG */

static void test_crop(void **state) {
    (void)state;
    clh_image src, out;
    load_fixture_image("synth_50x61.png", &src);
    TU_OK(clh_image_crop(&src, 7, 11, 20, 30, &out));
    assert_int_equal(out.width, 20);
    assert_int_equal(out.height, 30);
    for (int y = 0; y < 30; y++)
        for (int x = 0; x < 20; x++)
            for (int c = 0; c < 3; c++)
                assert_true(out.data[(y * 20 + x) * 3 + c] ==
                            src.data[((y + 11) * 50 + x + 7) * 3 + c]);
    clh_image_free(&out);
    TU_OK(clh_image_crop(&src, 0, 0, 50, 61, &out)); /* the whole image is allowed */
    clh_image_free(&out);
    TU_FAILS(clh_image_crop(&src, 31, 0, 20, 30, &out), CLH_ERR_INVALID_ARGUMENT, "50x61");
    TU_FAILS(clh_image_crop(&src, 0, 32, 20, 30, &out), CLH_ERR_INVALID_ARGUMENT, "y=32");
    TU_FAILS(clh_image_crop(&src, -1, 0, 20, 30, &out), CLH_ERR_INVALID_ARGUMENT, "x=-1");
    TU_FAILS(clh_image_crop(&src, 0, 0, 0, 30, &out), CLH_ERR_INVALID_ARGUMENT, "0x30");
    assert_null(out.data);
    clh_image_free(&src);
}

static void test_png_round_trip(void **state) {
    (void)state;
    enum { W = 13, H = 9 };
    uint8_t rgb[W * H * 3], gray[W * H];
    for (int i = 0; i < W * H * 3; i++)
        rgb[i] = (uint8_t)(i * 37 + i / 7);
    for (int i = 0; i < W * H; i++)
        gray[i] = (uint8_t)(255 - i * 2);
    clh_image img;
    TU_OK(clh_png_write(tmp_path("rgb.png"), rgb, W, H, 3));
    TU_OK(clh_image_load(tmp_path("rgb.png"), &img));
    assert_int_equal(img.width, W);
    assert_int_equal(img.height, H);
    for (int i = 0; i < W * H * 3; i++)
        assert_true(img.data[i] == rgb[i]);
    clh_image_free(&img);

    TU_OK(clh_png_write(tmp_path("gray.png"), gray, W, H, 1));
    TU_OK(clh_image_load(tmp_path("gray.png"), &img));
    for (int i = 0; i < W * H; i++)
        for (int c = 0; c < 3; c++)
            assert_true(img.data[i * 3 + c] == gray[i]);
    clh_image_free(&img);

    TU_FAILS(clh_png_write(tmp_path("x.png"), rgb, W, H, 2), CLH_ERR_INVALID_ARGUMENT, "channels");
    TU_FAILS(clh_png_write(tmp_path("x.png"), NULL, W, H, 3), CLH_ERR_INVALID_ARGUMENT, "x.png");
    TU_FAILS(clh_png_write(tmp_path("no/dir/x.png"), rgb, W, H, 3), CLH_ERR_IO, "no/dir/x.png");
}

static void test_from_rgb8_errors(void **state) {
    (void)state;
    uint8_t px[3] = {1, 2, 3};
    clh_image img;
    TU_FAILS(clh_image_from_rgb8(NULL, 1, 1, &img), CLH_ERR_INVALID_ARGUMENT, "NULL");
    TU_FAILS(clh_image_from_rgb8(px, 0, 1, &img), CLH_ERR_INVALID_ARGUMENT, "0x1");
    TU_OK(clh_image_from_rgb8(px, 1, 1, &img));
    assert_true(img.data[2] == 3.0f);
    clh_image_free(&img);
    clh_image_free(NULL);
}

/* ------------------------------------------------------------------ preprocessing */

static void test_clip_constants(void **state) {
    (void)state;
    const double mean[3] = {0.48145466, 0.4578275, 0.40821073};
    const double std[3] = {0.26862954, 0.26130258, 0.27577711};
    for (int c = 0; c < 3; c++) {
        assert_true(fabs(CLH_CLIP_MEAN[c] - mean[c] * 255) < 1e-4);
        assert_true(fabs(CLH_CLIP_STD[c] - std[c] * 255) < 1e-4);
    }
}

/* Against HF CLIPImageProcessorPil. Our pixels are identical to PIL's (see the resize
 * test); what remains is the float arithmetic of the normalisation: HF computes
 * (x * (1/255) - mean) / std in float32, we compute (x - 255 mean) / (255 std). Both are a
 * few float roundings of values below 2.7, so 1e-5 absolute bounds the difference; one
 * pixel level would be 1/255/0.2613 = 0.015, 1500 times more. */
static void test_preprocess_matches_hf(void **state) {
    (void)state;
    int cases = 0;
    double worst = 0;
    for (size_t i = 0; i < clh_st_count(expected); i++) {
        clh_st_tensor_info info;
        TU_OK(clh_st_info_at(expected, i, &info));
        char kind[32], file[128];
        int size;
        if (sscanf(info.name, "%31[^/]/%127[^/]/%d", kind, file, &size) != 3 ||
            (strcmp(kind, "crop") != 0 && strcmp(kind, "resize_only") != 0))
            continue;
        clh_preprocess_mode mode =
            strcmp(kind, "crop") == 0 ? CLH_PREPROCESS_CENTER_CROP : CLH_PREPROCESS_RESIZE;
        clh_image src;
        load_fixture_image(file, &src);
        float *got = malloc(3 * (size_t)size * size * sizeof *got);
        assert_non_null(got);
        TU_OK(clh_image_preprocess(&src, size, mode, got));
        float *want = read_expected(info.name, &info);
        assert_int_equal(info.numel, 3 * (size_t)size * size);
        double err, mag;
        tu_max_errors(got, want, info.numel, &err, &mag);
        if (err > worst)
            worst = err;
        if (!(err <= 1e-5))
            fail_msg("%s: max |ours - HF| = %g (> 1e-5)", info.name, err);
        free(want);
        free(got);
        clh_image_free(&src);
        cases++;
    }
    print_message("preprocess vs HF CLIPImageProcessorPil: %d cases, max abs err %.3g\n", cases,
                  worst);
    assert_int_equal(cases, 12);
}

/* CENTER_CROP = shortest-side resize (int(size * long / short)), crop at floor offsets,
 * normalise: rebuilt here from the public pieces for a tall and a wide image. */
static void test_preprocess_composition(void **state) {
    (void)state;
    static const struct {
        const char *file;
        int size, rw, rh;
    } cases[] = {{"synth_37x23.png", 13, 20, 13}, {"synth_50x61.png", 32, 32, 39}};
    for (size_t i = 0; i < 2; i++) {
        int s = cases[i].size;
        clh_image src, resized, cropped;
        load_fixture_image(cases[i].file, &src);
        TU_OK(clh_image_resize(&src, cases[i].rw, cases[i].rh, &resized));
        TU_OK(
            clh_image_crop(&resized, (cases[i].rw - s) / 2, (cases[i].rh - s) / 2, s, s, &cropped));
        float *got = malloc(3 * (size_t)s * s * sizeof *got);
        assert_non_null(got);
        TU_OK(clh_image_preprocess(&src, s, CLH_PREPROCESS_CENTER_CROP, got));
        for (int c = 0; c < 3; c++)
            for (int p = 0; p < s * s; p++)
                assert_true(got[c * s * s + p] ==
                            (cropped.data[p * 3 + c] - CLH_CLIP_MEAN[c]) / CLH_CLIP_STD[c]);
        free(got);
        clh_image_free(&src);
        clh_image_free(&resized);
        clh_image_free(&cropped);
    }
}

static void test_preprocess_errors(void **state) {
    (void)state;
    clh_image src;
    load_fixture_image("synth_37x23.png", &src);
    float out[3 * 4 * 4];
    TU_FAILS(clh_image_preprocess(&src, 0, CLH_PREPROCESS_RESIZE, out), CLH_ERR_INVALID_ARGUMENT,
             "size 0");
    TU_FAILS(clh_image_preprocess(&src, 4, CLH_PREPROCESS_RESIZE, NULL), CLH_ERR_INVALID_ARGUMENT,
             "NULL");
    TU_FAILS(clh_image_preprocess(&src, 4, (clh_preprocess_mode)7, out), CLH_ERR_INVALID_ARGUMENT,
             "mode 7");
    TU_FAILS(clh_image_preprocess(NULL, 4, CLH_PREPROCESS_RESIZE, out), CLH_ERR_INVALID_ARGUMENT,
             "NULL");
    clh_image_free(&src);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_load_png_modes),
        cmocka_unit_test(test_load_errors),
        cmocka_unit_test(test_real_images),
        cmocka_unit_test(test_real_preprocess_matches_hf),
        cmocka_unit_test(test_resize_matches_pil),
        cmocka_unit_test(test_resize_properties),
        cmocka_unit_test(test_crop),
        cmocka_unit_test(test_png_round_trip),
        cmocka_unit_test(test_from_rgb8_errors),
        cmocka_unit_test(test_clip_constants),
        cmocka_unit_test(test_preprocess_matches_hf),
        cmocka_unit_test(test_preprocess_composition),
        cmocka_unit_test(test_preprocess_errors),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
