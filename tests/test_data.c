/* Datasets (layouts, label modes, errors), augmentation invariants, the prefetching
 * loader (determinism across thread counts, seek, worker errors) and the procedural
 * dataset. Real annotations come from ../shared/data/segmentation. */
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "testutil.h"

#include "data.h"

static char tmp_buf[600];

/* Copy of tu_tmp_path (its buffer is static and reused). */
static const char *tmp(const char *name) {
    snprintf(tmp_buf, sizeof tmp_buf, "%s", tu_tmp_path(name));
    return tmp_buf;
}

static void make_dirs(const char *rel) {
    char path[600], *p;
    snprintf(path, sizeof path, "%s", tu_tmp_path(rel));
    for (p = path + strlen(tu_tmp_dir_) + 1; *p; p++)
        if (*p == '/') {
            *p = 0;
            mkdir(path, 0777);
            *p = '/';
        }
    mkdir(path, 0777);
}

/* A w x h RGB PNG with a recognisable pattern. */
static void write_rgb(const char *rel, int w, int h, int seed) {
    uint8_t *px = malloc((size_t)w * h * 3);
    assert_non_null(px);
    for (int i = 0; i < w * h * 3; i++)
        px[i] = (uint8_t)(i * 7 + seed * 31);
    TU_OK(clh_png_write(tu_tmp_path(rel), px, w, h, 3));
    free(px);
}

/* A w x h gray label PNG filled with `value`. */
static void write_label(const char *rel, int w, int h, int value) {
    int32_t *ids = malloc((size_t)w * h * sizeof *ids);
    assert_non_null(ids);
    for (int i = 0; i < w * h; i++)
        ids[i] = value;
    TU_OK(clh_label_write_png(tu_tmp_path(rel), ids, w, h));
    free(ids);
}

static void write_text(const char *rel, const char *text) {
    FILE *fp = fopen(tu_tmp_path(rel), "wb");
    assert_non_null(fp);
    fputs(text, fp);
    fclose(fp);
}

/* Which ids in [0, 256) occur in a label map. */
static void id_set(const clh_label_map *lab, int present[256]) {
    memset(present, 0, 256 * sizeof *present);
    for (int i = 0; i < lab->width * lab->height; i++) {
        assert_true(lab->ids[i] >= 0 && lab->ids[i] < 256);
        present[lab->ids[i]] = 1;
    }
}

/* Index of a class name in a classnames file (trailing spaces ignored), or -1. */
static int class_index(const char *file, const char *name) {
    FILE *fp = fopen(file, "r");
    assert_non_null(fp);
    char line[256];
    int k = 0, found = -1;
    while (found < 0 && fgets(line, sizeof line, fp)) {
        size_t n = strlen(line);
        while (n && (line[n - 1] == '\n' || line[n - 1] == ' '))
            line[--n] = 0;
        if (strcmp(line, name) == 0)
            found = k;
        k++;
    }
    fclose(fp);
    return found;
}

/* ------------------------------------------------------------------ real samples */

static void ade_val1_has_the_documented_classes(void **state) {
    (void)state;
    char root[512], names[512];
    TU_SHARED_OR_SKIP(root, "segmentation/ade20k_sceneparsing");
    TU_SHARED_OR_SKIP(names, "classnames/ade20k_150.txt");
    clh_dataset_options opt = {NULL, {CLH_LABELS_ADE150, 0}};
    clh_dataset *ds;
    TU_OK(clh_dataset_open(root, &opt, &ds));
    assert_int_equal(clh_dataset_count(ds), 3);
    assert_string_equal(clh_dataset_name(ds, 0), "ADE_val_00000001.jpg");
    assert_string_equal(clh_dataset_name(ds, 2), "ADE_val_00000003.jpg");
    assert_null(clh_dataset_name(ds, 3));
    clh_image img;
    clh_label_map lab;
    TU_OK(clh_dataset_read(ds, 0, &img, &lab));
    assert_int_equal(img.width, 683);
    assert_int_equal(img.height, 512);
    assert_int_equal(lab.width, 683);
    assert_int_equal(lab.height, 512);
    int present[256], want[256] = {0};
    id_set(&lab, present);
    const char *classes[] = {"sky", "building", "grass", "wall", "plant", "tree", "road"};
    for (size_t k = 0; k < sizeof classes / sizeof *classes; k++) {
        int id = class_index(names, classes[k]);
        assert_true(id >= 0);
        want[id] = 1;
    }
    want[CLH_LABEL_IGNORE] = 1; /* raw 0 "other" */
    for (int k = 0; k < 256; k++)
        if (present[k] != want[k])
            fail_msg("class %d: present %d, expected %d", k, present[k], want[k]);
    clh_image_free(&img);
    clh_label_map_free(&lab);
    clh_dataset_free(ds);
}

static void ade_mode_is_raw_minus_one(void **state) {
    (void)state;
    char path[512];
    TU_SHARED_OR_SKIP(path, "segmentation/ade20k_sceneparsing/annotations/ADE_val_00000003.png");
    clh_label_map raw, ade;
    clh_label_options o_raw = {CLH_LABELS_RAW, 0}, o_ade = {CLH_LABELS_ADE150, 0};
    TU_OK(clh_label_read(path, &o_raw, &raw));
    TU_OK(clh_label_read(path, &o_ade, &ade));
    int zeros = 0;
    for (int i = 0; i < raw.width * raw.height; i++) {
        zeros += raw.ids[i] == 0;
        assert_int_equal(ade.ids[i], raw.ids[i] == 0 ? CLH_LABEL_IGNORE : raw.ids[i] - 1);
    }
    assert_true(zeros > 0);
    int present[256];
    id_set(&raw, present);
    assert_true(present[97]); /* escalator, as the data README lists */
    clh_label_map_free(&raw);
    clh_label_map_free(&ade);
}

static void voc_pairs_decode_colours(void **state) {
    (void)state;
    char root[512];
    TU_SHARED_OR_SKIP(root, "segmentation/voc2012_vainf");
    clh_dataset_options o20 = {NULL, {CLH_LABELS_VOC_RGB, 0}},
                        o20b = {NULL, {CLH_LABELS_VOC_RGB, 1}};
    clh_dataset *ds, *dsb;
    TU_OK(clh_dataset_open(root, &o20, &ds));
    TU_OK(clh_dataset_open(root, &o20b, &dsb));
    assert_int_equal(clh_dataset_count(ds), 3);
    assert_string_equal(clh_dataset_name(ds, 0), "114_image.png");
    assert_string_equal(clh_dataset_name(ds, 1), "1_image.png");
    assert_string_equal(clh_dataset_name(ds, 2), "23_image.png");
    /* sample 1: aeroplane (VOC 1 -> 0), background, void; sample 23: sheep (17 -> 16);
     * sample 114: bird (3 -> 2). */
    const int index[3] = {1, 2, 0}, object[3] = {0, 16, 2};
    for (int s = 0; s < 3; s++) {
        clh_image img;
        clh_label_map lab, labb;
        int p[256], pb[256];
        TU_OK(clh_dataset_read(ds, (size_t)index[s], &img, &lab));
        TU_OK(clh_dataset_read(dsb, (size_t)index[s], NULL, &labb));
        assert_int_equal(img.width, 513);
        assert_int_equal(lab.height, 513);
        id_set(&lab, p);
        id_set(&labb, pb);
        for (int k = 0; k < 256; k++) {
            assert_int_equal(p[k], k == object[s] || k == CLH_LABEL_IGNORE);
            assert_int_equal(pb[k], k == object[s] || k == 20 || k == CLH_LABEL_IGNORE);
        }
        for (int i = 0; i < lab.width * lab.height; i++)
            if (labb.ids[i] == 20)
                assert_int_equal(lab.ids[i], CLH_LABEL_IGNORE);
        clh_image_free(&img);
        clh_label_map_free(&lab);
        clh_label_map_free(&labb);
    }
    clh_dataset_free(ds);
    clh_dataset_free(dsb);
}

static void voc_colour_map(void **state) {
    (void)state;
    const int want[][4] = {{0, 0, 0, 0},        {1, 128, 0, 0},   {3, 128, 128, 0},
                           {15, 192, 128, 128}, {17, 128, 64, 0}, {255, 224, 224, 192}};
    for (size_t i = 0; i < sizeof want / sizeof *want; i++) {
        uint8_t rgb[3];
        clh_voc_color(want[i][0], rgb);
        assert_int_equal(rgb[0], want[i][1]);
        assert_int_equal(rgb[1], want[i][2]);
        assert_int_equal(rgb[2], want[i][3]);
    }
}

/* ------------------------------------------------------------------ layouts */

static void split_layouts_pick_the_right_folders(void **state) {
    (void)state;
    make_dirs("coco/images/train2017");
    make_dirs("coco/annotations_detectron2/train2017");
    make_dirs("coco/annotations/train2017"); /* decoy: detectron2 folder wins */
    make_dirs("coco/images/val2017");
    write_rgb("coco/images/train2017/b.jpg.png", 6, 4, 1);
    write_rgb("coco/images/train2017/a.png", 6, 4, 2);
    write_label("coco/annotations_detectron2/train2017/a.png", 6, 4, 7);
    write_label("coco/annotations_detectron2/train2017/b.jpg.png", 6, 4, 9);
    write_label("coco/annotations/train2017/a.png", 6, 4, 1);
    clh_dataset_options opt = {"train2017", {CLH_LABELS_RAW, 0}};
    clh_dataset *ds;
    TU_OK(clh_dataset_open(tmp("coco"), &opt, &ds));
    assert_int_equal(clh_dataset_count(ds), 2);
    assert_string_equal(clh_dataset_name(ds, 0), "a.png");
    clh_label_map lab;
    TU_OK(clh_dataset_read(ds, 0, NULL, &lab));
    assert_int_equal(lab.ids[0], 7);
    clh_label_map_free(&lab);
    TU_OK(clh_dataset_read(ds, 1, NULL, &lab));
    assert_int_equal(lab.ids[5], 9);
    clh_label_map_free(&lab);
    clh_dataset_free(ds);

    opt.split = "val2017"; /* images but no label folder */
    TU_FAILS(clh_dataset_open(tmp("coco"), &opt, &ds), CLH_ERR_NOT_FOUND, "no label folder");
    opt.split = "test";
    TU_FAILS(clh_dataset_open(tmp("coco"), &opt, &ds), CLH_ERR_NOT_FOUND, "images/test");

    make_dirs("ade/images/validation");
    make_dirs("ade/annotations/validation");
    write_rgb("ade/images/validation/ADE_val_2.jpg", 5, 3, 3);
    write_label("ade/annotations/validation/ADE_val_2.png", 5, 3, 0);
    opt.split = "validation";
    opt.labels.mode = CLH_LABELS_ADE150;
    /* a PNG written under a .jpg name decodes all the same (stb sniffs the format) */
    TU_OK(clh_dataset_open(tmp("ade"), &opt, &ds));
    TU_OK(clh_dataset_read(ds, 0, NULL, &lab));
    assert_int_equal(lab.ids[0], CLH_LABEL_IGNORE);
    clh_label_map_free(&lab);
    clh_dataset_free(ds);
    TU_FAILS(clh_dataset_open(tmp("ade"), NULL, &ds), CLH_ERR_NOT_FOUND, "need the split name");
}

static void generic_layout_sorted_and_skips_other_files(void **state) {
    (void)state;
    make_dirs("gen/images");
    make_dirs("gen/labels");
    write_rgb("gen/images/z.PNG", 4, 4, 1);
    write_rgb("gen/images/m.jpeg", 4, 4, 2);
    write_rgb("gen/images/a.jpg", 4, 4, 3);
    write_text("gen/images/README.txt", "not an image");
    make_dirs("gen/images/sub.png"); /* a folder named like an image */
    write_label("gen/labels/z.png", 4, 4, 3);
    write_label("gen/labels/m.png", 4, 4, 2);
    write_label("gen/labels/a.png", 4, 4, 1);
    clh_dataset *ds;
    TU_OK(clh_dataset_open(tmp("gen"), NULL, &ds));
    assert_int_equal(clh_dataset_count(ds), 3);
    const char *want[] = {"a.jpg", "m.jpeg", "z.PNG"};
    for (int i = 0; i < 3; i++) {
        assert_string_equal(clh_dataset_name(ds, (size_t)i), want[i]);
        clh_label_map lab;
        clh_image img;
        TU_OK(clh_dataset_read(ds, (size_t)i, &img, &lab));
        assert_int_equal(lab.ids[0], i + 1);
        assert_true(tu_contains(clh_dataset_label_path(ds, (size_t)i), "gen/labels/"));
        clh_image_free(&img);
        clh_label_map_free(&lab);
    }
    TU_FAILS(clh_dataset_read(ds, 3, NULL, NULL), CLH_ERR_INVALID_ARGUMENT, "out of range");
    clh_dataset_free(ds);
}

/* ------------------------------------------------------------------ errors */

static void dataset_errors(void **state) {
    (void)state;
    clh_dataset *ds;
    TU_FAILS(clh_dataset_open(tmp("nope"), NULL, &ds), CLH_ERR_IO, "does not exist");
    assert_null(ds);
    make_dirs("empty");
    TU_FAILS(clh_dataset_open(tmp("empty"), NULL, &ds), CLH_ERR_NOT_FOUND, "no images/ folder");
    make_dirs("noimg/images");
    make_dirs("noimg/labels");
    write_text("noimg/images/notes.txt", "x");
    TU_FAILS(clh_dataset_open(tmp("noimg"), NULL, &ds), CLH_ERR_NOT_FOUND, "no .jpg/.jpeg/.png");
    make_dirs("nolab/images");
    make_dirs("nolab/labels");
    write_rgb("nolab/images/a.png", 4, 4, 1);
    write_rgb("nolab/images/b.png", 4, 4, 1);
    write_label("nolab/labels/a.png", 4, 4, 1);
    TU_FAILS(clh_dataset_open(tmp("nolab"), NULL, &ds), CLH_ERR_NOT_FOUND, "nolab/labels/b.png");

    /* Problems found when reading: truncated image, non-image with an image name, size
     * mismatch, colour labels in raw mode, unknown VOC colour. */
    make_dirs("bad/images");
    make_dirs("bad/labels");
    write_rgb("bad/images/0trunc.png", 16, 16, 1);
    write_label("bad/labels/0trunc.png", 16, 16, 1);
    assert_int_equal(truncate(tu_tmp_path("bad/images/0trunc.png"), 60), 0);
    write_text("bad/images/1text.png", "hello, I am not a PNG");
    write_label("bad/labels/1text.png", 4, 4, 1);
    write_rgb("bad/images/2size.png", 8, 6, 1);
    write_label("bad/labels/2size.png", 6, 8, 1);
    write_rgb("bad/images/3colour.png", 4, 4, 1);
    uint8_t colour[4 * 4 * 3];
    for (int i = 0; i < 48; i++)
        colour[i] = (uint8_t)(i % 3 + 1); /* (1,2,3) */
    TU_OK(clh_png_write(tu_tmp_path("bad/labels/3colour.png"), colour, 4, 4, 3));
    TU_OK(clh_dataset_open(tmp("bad"), NULL, &ds));
    clh_image img;
    clh_label_map lab;
    TU_FAILS(clh_dataset_read(ds, 0, &img, &lab), CLH_ERR_FORMAT, "0trunc.png");
    assert_null(img.data);
    assert_null(lab.ids);
    TU_FAILS(clh_dataset_read(ds, 1, &img, &lab), CLH_ERR_FORMAT, "1text.png");
    TU_FAILS(clh_dataset_read(ds, 2, &img, &lab), CLH_ERR_FORMAT, "is 6x8 but image");
    TU_FAILS(clh_dataset_read(ds, 3, &img, &lab), CLH_ERR_FORMAT, "colour (1,2,3)");
    clh_dataset_free(ds);
    clh_label_options voc = {CLH_LABELS_VOC_RGB, 0};
    TU_FAILS(clh_label_read(tu_tmp_path("bad/labels/3colour.png"), &voc, &lab), CLH_ERR_FORMAT,
             "colour (1,2,3) at x=0 y=0 is not a PASCAL VOC");
    TU_FAILS(clh_label_read(tu_tmp_path("bad/labels/missing.png"), NULL, &lab), CLH_ERR_IO,
             "missing.png");
    int32_t big[4] = {1, 2, 300, 4};
    TU_FAILS(clh_label_write_png(tu_tmp_path("x.png"), big, 2, 2), CLH_ERR_INVALID_ARGUMENT,
             "id 300");
    clh_dataset_options badmode = {NULL, {(clh_label_mode)9, 0}};
    TU_FAILS(clh_dataset_open(tmp("gen"), &badmode, &ds), CLH_ERR_INVALID_ARGUMENT, "label mode");
}

static void label_png_round_trip(void **state) {
    (void)state;
    int32_t ids[15];
    for (int i = 0; i < 15; i++)
        ids[i] = (i * 37) % 256;
    TU_OK(clh_label_write_png(tu_tmp_path("rt.png"), ids, 5, 3));
    clh_label_map lab;
    TU_OK(clh_label_read(tu_tmp_path("rt.png"), NULL, &lab));
    assert_int_equal(lab.width, 5);
    assert_int_equal(lab.height, 3);
    for (int i = 0; i < 15; i++)
        assert_int_equal(lab.ids[i], ids[i]);
    clh_label_map_free(&lab);
}

/* ------------------------------------------------------------------ augmentation */

static void resize_building_blocks(void **state) {
    (void)state;
    int h, w;
    clh_shortest_edge_size(512, 683, 384, 1333, &h, &w);
    assert_int_equal(h, 384);
    assert_int_equal(w, 512); /* 512.25 rounds down */
    clh_shortest_edge_size(10, 100, 32, 64, &h, &w);
    assert_int_equal(w, 64); /* long edge capped */
    assert_int_equal(h, 6);
    /* PIL bilinear 4 -> 2 is antialiased: taps 3/7, 3/7, 1/7 (worked out by hand). */
    uint8_t row[12] = {0, 0, 0, 70, 70, 70, 140, 140, 140, 210, 210, 210};
    clh_rgb8 in = {4, 1, row}, out;
    TU_OK(clh_rgb8_resize_bilinear(&in, 2, 1, &out));
    assert_int_equal(out.px[0], 50);
    assert_int_equal(out.px[3], 160);
    clh_rgb8_free(&out);
    int32_t ids[4] = {5, 6, 7, 8};
    clh_label_map lab = {4, 1, ids}, small;
    TU_OK(clh_label_resize_nearest(&lab, 2, 1, &small));
    assert_int_equal(small.ids[0], 6);
    assert_int_equal(small.ids[1], 8);
    clh_label_map_free(&small);
}

static float normalised(int c, float v) {
    return (v - CLH_CLIP_MEAN[c]) / CLH_CLIP_STD[c];
}

static clh_rgb8 pattern_rgb8(int w, int h, int seed) {
    clh_rgb8 img = {w, h, malloc((size_t)w * h * 3)};
    assert_non_null(img.px);
    for (int i = 0; i < w * h * 3; i++)
        img.px[i] = (uint8_t)((i * 13 + seed * 101 + (i / 7) * (i / 11)) & 255);
    return img;
}

static void padding_when_image_is_smaller(void **state) {
    (void)state;
    clh_rgb8 img = pattern_rgb8(100, 10, 1);
    clh_label_map lab;
    TU_OK(clh_label_map_new(100, 10, 3, &lab));
    int crop = 32;
    float *px = tu_alloc_floats(3 * 32 * 32);
    int32_t *ids = malloc(32 * 32 * sizeof *ids);
    for (int aug = 0; aug < 2; aug++)
        for (uint64_t seed = 0; seed < 4; seed++) {
            clh_augment_options opt = {crop, 64, aug};
            TU_OK(clh_augment_sample(&img, &lab, &opt, seed, px, ids));
            for (int y = 0; y < crop; y++)
                for (int x = 0; x < crop; x++) {
                    int inside = y < 6; /* resized to 64x6, crop 32x6 */
                    assert_int_equal(ids[y * crop + x], inside ? 3 : CLH_LABEL_IGNORE);
                    if (!inside)
                        for (int c = 0; c < 3; c++)
                            assert_true(px[c * crop * crop + y * crop + x] == normalised(c, 128));
                }
        }
    free(px);
    free(ids);
    free(img.px);
    clh_label_map_free(&lab);
}

/* The mirror image with the same seed gives the mirrored sample (the crop covers the
 * whole resized square, photometric ops are per pixel). */
static void flip_symmetry_and_determinism(void **state) {
    (void)state;
    int s = 48, crop = 24;
    clh_rgb8 a = pattern_rgb8(s, s, 2), m = pattern_rgb8(s, s, 0);
    clh_label_map la, lm;
    TU_OK(clh_label_map_new(s, s, 0, &la));
    TU_OK(clh_label_map_new(s, s, 0, &lm));
    for (int y = 0; y < s; y++)
        for (int x = 0; x < s; x++) {
            memcpy(m.px + (y * s + (s - 1 - x)) * 3, a.px + (y * s + x) * 3, 3);
            la.ids[y * s + x] = x < s / 2 ? 1 : 2;
            lm.ids[y * s + (s - 1 - x)] = la.ids[y * s + x];
        }
    size_t np = 3 * (size_t)crop * crop, nl = (size_t)crop * crop;
    float *pa = tu_alloc_floats(np), *pm = tu_alloc_floats(np), *p2 = tu_alloc_floats(np);
    int32_t *ia = malloc(nl * 4), *im = malloc(nl * 4), *i2 = malloc(nl * 4);
    clh_augment_options opt = {crop, 0, 1};
    int flipped = 0, plain = 0, changed = 0;
    for (uint64_t seed = 0; seed < 16; seed++) {
        TU_OK(clh_augment_sample(&a, &la, &opt, seed, pa, ia));
        TU_OK(clh_augment_sample(&m, &lm, &opt, seed, pm, im));
        TU_OK(clh_augment_sample(&a, &la, &opt, seed, p2, i2));
        assert_memory_equal(pa, p2, np * sizeof *pa); /* same seed, same bytes */
        assert_memory_equal(ia, i2, nl * sizeof *ia);
        for (int c = 0; c < 3; c++)
            for (int y = 0; y < crop; y++)
                for (int x = 0; x < crop; x++)
                    assert_true(pa[(c * crop + y) * crop + x] ==
                                pm[(c * crop + y) * crop + crop - 1 - x]);
        for (int y = 0; y < crop; y++)
            for (int x = 0; x < crop; x++)
                assert_int_equal(ia[y * crop + x], im[y * crop + crop - 1 - x]);
        flipped += ia[0] == 2;
        plain += ia[0] == 1;
        clh_augment_options off = {crop, 0, 0};
        TU_OK(clh_augment_sample(&a, &la, &off, seed, p2, i2));
        changed += memcmp(pa, p2, np * sizeof *pa) != 0;
    }
    assert_true(flipped >= 2 && plain >= 2); /* p = 1/2 over 16 seeds */
    assert_true(changed >= 8);               /* photometric distortion acts */
    free(pa), free(pm), free(p2), free(ia), free(im), free(i2);
    free(a.px), free(m.px);
    clh_label_map_free(&la);
    clh_label_map_free(&lm);
}

/* Gray stays gray (saturation and hue cannot colour it); values stay in the normalised
 * 0..255 range; different seeds give different samples. */
static void photometric_keeps_gray_and_range(void **state) {
    (void)state;
    int s = 40, crop = 32;
    clh_rgb8 g = pattern_rgb8(s, s, 5);
    for (int i = 0; i < s * s; i++)
        g.px[3 * i + 1] = g.px[3 * i + 2] = g.px[3 * i];
    clh_rgb8 col = pattern_rgb8(s, s, 6);
    float *p = tu_alloc_floats(3 * crop * crop), *q = tu_alloc_floats(3 * crop * crop);
    clh_augment_options opt = {crop, 0, 1};
    int differ = 0;
    for (uint64_t seed = 0; seed < 24; seed++) {
        TU_OK(clh_augment_sample(&g, NULL, &opt, seed, p, NULL));
        for (int i = 0; i < crop * crop; i++) {
            float v0 = p[i] * CLH_CLIP_STD[0] + CLH_CLIP_MEAN[0];
            float v1 = p[crop * crop + i] * CLH_CLIP_STD[1] + CLH_CLIP_MEAN[1];
            float v2 = p[2 * crop * crop + i] * CLH_CLIP_STD[2] + CLH_CLIP_MEAN[2];
            assert_true(fabsf(v0 - v1) < 1e-3f && fabsf(v0 - v2) < 1e-3f);
        }
        TU_OK(clh_augment_sample(&col, NULL, &opt, seed, p, NULL));
        for (int c = 0; c < 3; c++)
            for (int i = 0; i < crop * crop; i++) {
                float v = p[c * crop * crop + i];
                assert_true(v >= normalised(c, 0) - 1e-5f && v <= normalised(c, 255) + 1e-5f);
            }
        TU_OK(clh_augment_sample(&col, NULL, &opt, seed + 1000, q, NULL));
        differ += memcmp(p, q, 3 * (size_t)crop * crop * sizeof *p) != 0;
    }
    assert_true(differ >= 20);
    clh_augment_options bad = {0, 0, 1};
    TU_FAILS(clh_augment_sample(&col, NULL, &bad, 0, p, NULL), CLH_ERR_INVALID_ARGUMENT, "crop");
    clh_label_map wrong;
    TU_OK(clh_label_map_new(s - 1, s, 0, &wrong));
    TU_FAILS(clh_augment_sample(&col, &wrong, &opt, 0, p, NULL), CLH_ERR_SHAPE, "does not match");
    clh_label_map_free(&wrong);
    free(p), free(q), free(g.px), free(col.px);
}

/* ------------------------------------------------------------------ loader */

static clh_dataset *procedural_dataset(const char *name, int n, int size) {
    clh_procedural_options po = {n, size, 7};
    TU_OK(clh_procedural_write(tu_tmp_path(name), &po));
    clh_dataset *ds;
    TU_OK(clh_dataset_open(tu_tmp_path(name), NULL, &ds));
    return ds;
}

#define REF_STEPS 9

static void read_batches(clh_loader *ld, clh_batch **out, int n) {
    for (int i = 0; i < n; i++)
        TU_OK(clh_loader_next(ld, &out[i]));
}

static void assert_same_batch(const clh_batch *a, const clh_batch *b) {
    assert_int_equal(a->size, b->size);
    assert_int_equal(a->step, b->step);
    size_t plane = (size_t)a->crop * a->crop;
    assert_memory_equal(a->indices, b->indices, (size_t)a->size * sizeof *a->indices);
    assert_memory_equal(a->pixels, b->pixels, (size_t)a->size * 3 * plane * sizeof *a->pixels);
    assert_memory_equal(a->labels, b->labels, (size_t)a->size * plane * sizeof *a->labels);
}

static void loader_deterministic_across_threads_and_seek(void **state) {
    (void)state;
    clh_dataset *ds = procedural_dataset("proc10", 10, 40);
    clh_loader_options opt = {.batch = 3,
                              .crop = 32,
                              .seed = 11,
                              .threads = 1,
                              .prefetch = 1,
                              .augment = 1,
                              .shuffle = 1};
    clh_loader *ld1, *ld3, *lds;
    TU_OK(clh_loader_new(ds, &opt, &ld1));
    assert_int_equal(clh_loader_steps_per_epoch(ld1), 4);
    opt.threads = 3;
    opt.prefetch = 3;
    TU_OK(clh_loader_new(ds, &opt, &ld3));
    clh_batch *a[REF_STEPS], *b[REF_STEPS];
    read_batches(ld1, a, REF_STEPS);
    read_batches(ld3, b, REF_STEPS);
    for (int i = 0; i < REF_STEPS; i++) {
        assert_same_batch(a[i], b[i]);
        assert_int_equal(a[i]->step, i);
        assert_int_equal(a[i]->size, i % 4 == 3 ? 1 : 3); /* last of epoch is partial */
    }
    /* each epoch visits every sample once; epochs are shuffled differently */
    int seen[2][10] = {{0}};
    for (int i = 0; i < 8; i++)
        for (int j = 0; j < a[i]->size; j++)
            seen[i / 4][a[i]->indices[j]]++;
    for (int k = 0; k < 10; k++)
        assert_true(seen[0][k] == 1 && seen[1][k] == 1);
    assert_true(memcmp(a[0]->indices, a[4]->indices, 3 * sizeof(size_t)) != 0 ||
                memcmp(a[1]->indices, a[5]->indices, 3 * sizeof(size_t)) != 0);
    /* seek forward on a fresh loader, then back after reading */
    opt.threads = 2;
    TU_OK(clh_loader_new(ds, &opt, &lds));
    TU_OK(clh_loader_seek(lds, 5));
    clh_batch *c;
    TU_OK(clh_loader_next(lds, &c));
    assert_same_batch(c, a[5]);
    clh_batch_free(c);
    TU_OK(clh_loader_next(lds, &c));
    assert_same_batch(c, a[6]);
    clh_batch_free(c);
    TU_OK(clh_loader_seek(lds, 2));
    TU_OK(clh_loader_next(lds, &c));
    assert_same_batch(c, a[2]);
    clh_batch_free(c);
    TU_FAILS(clh_loader_seek(lds, -1), CLH_ERR_INVALID_ARGUMENT, "step");
    for (int i = 0; i < REF_STEPS; i++) {
        clh_batch_free(a[i]);
        clh_batch_free(b[i]);
    }
    clh_loader_free(ld1);
    clh_loader_free(ld3);
    clh_loader_free(lds); /* with prefetched work pending */
    clh_dataset_free(ds);
}

static void loader_reports_worker_errors_and_options(void **state) {
    (void)state;
    make_dirs("lerr/images");
    make_dirs("lerr/labels");
    for (int i = 0; i < 6; i++) {
        char im[64], lb[64];
        snprintf(im, sizeof im, "lerr/images/%d.png", i);
        snprintf(lb, sizeof lb, "lerr/labels/%d.png", i);
        write_rgb(im, 20, 20, i);
        write_label(lb, 20, 20, i);
    }
    write_text("lerr/images/4.png", "broken");
    clh_dataset *ds;
    TU_OK(clh_dataset_open(tmp("lerr"), NULL, &ds));
    clh_loader_options opt = {.batch = 2,
                              .crop = 16,
                              .seed = 1,
                              .threads = 3,
                              .augment = 0,
                              .shuffle = 0,
                              .drop_last = 1};
    clh_loader *ld;
    TU_OK(clh_loader_new(ds, &opt, &ld));
    clh_batch *b;
    TU_OK(clh_loader_next(ld, &b));
    assert_int_equal(b->indices[1], 1);
    assert_int_equal(b->labels[16 * 16], 1); /* unshuffled, unaugmented: sample 1's label */
    clh_batch_free(b);
    TU_OK(clh_loader_next(ld, &b));
    clh_batch_free(b);
    TU_FAILS(clh_loader_next(ld, &b), CLH_ERR_FORMAT, "4.png");
    assert_null(b);
    TU_OK(clh_loader_next(ld, &b)); /* next epoch goes on */
    assert_int_equal(b->epoch, 1);
    clh_batch_free(b);
    clh_loader_free(ld);

    opt.batch = 0;
    TU_FAILS(clh_loader_new(ds, &opt, &ld), CLH_ERR_INVALID_ARGUMENT, "batch > 0");
    opt.batch = 7;
    TU_FAILS(clh_loader_new(ds, &opt, &ld), CLH_ERR_INVALID_ARGUMENT, "do not fill");
    opt.drop_last = 0; /* one partial batch of 6 per epoch */
    TU_OK(clh_loader_new(ds, &opt, &ld));
    assert_int_equal(clh_loader_steps_per_epoch(ld), 1);
    clh_loader_free(ld); /* freed before any next(): workers are mid-batch */
    clh_dataset_free(ds);
}

/* ------------------------------------------------------------------ procedural */

static void procedural_dataset_is_fast_exact_and_deterministic(void **state) {
    (void)state;
    clh_procedural_options po = {300, 96, 42};
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    TU_OK(clh_procedural_write(tu_tmp_path("p300"), &po));
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double secs = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
    print_message("procedural: 300 images of 96x96 in %.3f s\n", secs);
    assert_true(secs < 10.0); /* generous: the machine is shared */
    clh_dataset *ds;
    TU_OK(clh_dataset_open(tmp("p300"), NULL, &ds));
    assert_int_equal(clh_dataset_count(ds), 300);
    assert_string_equal(clh_dataset_name(ds, 0), "0000.png");
    int n = clh_procedural_class_count(), counts[256] = {0};
    for (size_t i = 0; i < 300; i += 3) {
        clh_label_map lab;
        TU_OK(clh_dataset_read(ds, i, NULL, &lab));
        for (int p = 0; p < 96 * 96; p++) {
            assert_true(lab.ids[p] >= 0 && lab.ids[p] < n);
            counts[lab.ids[p]]++;
        }
        clh_label_map_free(&lab);
    }
    for (int k = 0; k < n; k++)
        if (counts[k] < 500)
            fail_msg("class %d (%s) covers only %d pixels", k, clh_procedural_class_name(k),
                     counts[k]);
    clh_dataset_free(ds);
    /* classes.txt lists the names in id order */
    FILE *fp = fopen(tu_tmp_path("p300/classes.txt"), "r");
    assert_non_null(fp);
    char line[128];
    for (int k = 0; k < n; k++) {
        assert_non_null(fgets(line, sizeof line, fp));
        line[strcspn(line, "\n")] = 0;
        assert_string_equal(line, clh_procedural_class_name(k));
    }
    assert_null(fgets(line, sizeof line, fp));
    fclose(fp);
    /* same seed: same pixels; other seed: different */
    clh_procedural_options again = {3, 96, 42}, other = {3, 96, 43};
    TU_OK(clh_procedural_write(tu_tmp_path("p3a"), &again));
    TU_OK(clh_procedural_write(tu_tmp_path("p3b"), &other));
    clh_image x, y, z;
    TU_OK(clh_image_load(tu_tmp_path("p300/images/0002.png"), &x));
    TU_OK(clh_image_load(tu_tmp_path("p3a/images/0002.png"), &y));
    TU_OK(clh_image_load(tu_tmp_path("p3b/images/0002.png"), &z));
    assert_memory_equal(x.data, y.data, 96 * 96 * 3 * sizeof(float));
    assert_true(memcmp(x.data, z.data, 96 * 96 * 3 * sizeof(float)) != 0);
    clh_image_free(&x), clh_image_free(&y), clh_image_free(&z);
    clh_procedural_options bad = {0, 96, 1};
    TU_FAILS(clh_procedural_write(tu_tmp_path("pbad"), &bad), CLH_ERR_INVALID_ARGUMENT, "n_images");
    write_text("afile", "x");
    TU_FAILS(clh_procedural_write(tu_tmp_path("afile"), &po), CLH_ERR_IO, "not a folder");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(ade_val1_has_the_documented_classes),
        cmocka_unit_test(ade_mode_is_raw_minus_one),
        cmocka_unit_test(voc_pairs_decode_colours),
        cmocka_unit_test(voc_colour_map),
        cmocka_unit_test(split_layouts_pick_the_right_folders),
        cmocka_unit_test(generic_layout_sorted_and_skips_other_files),
        cmocka_unit_test(dataset_errors),
        cmocka_unit_test(label_png_round_trip),
        cmocka_unit_test(resize_building_blocks),
        cmocka_unit_test(padding_when_image_is_smaller),
        cmocka_unit_test(flip_symmetry_and_determinism),
        cmocka_unit_test(photometric_keeps_gray_and_range),
        cmocka_unit_test(loader_deterministic_across_threads_and_seek),
        cmocka_unit_test(loader_reports_worker_errors_and_options),
        cmocka_unit_test(procedural_dataset_is_fast_exact_and_deterministic),
    };
    return cmocka_run_group_tests(tests, tu_setup_tmp, tu_teardown_tmp);
}
