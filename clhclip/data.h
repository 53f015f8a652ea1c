/*
 * Host-side data layer for segmentation training and evaluation: datasets of
 * (image, label) pairs, detectron2-style training augmentation, a prefetching
 * multi-threaded batch loader, detectron2 SemSegEvaluator metrics and a procedural
 * demo dataset. Everything runs on the CPU; nothing here needs an OpenCL context.
 *
 * Conventions as in clhclip.h: functions return clh_status and record a message
 * (clh_last_error, thread-local); nothing prints, aborts or exits.
 */
#ifndef CLHCLIP_DATA_H
#define CLHCLIP_DATA_H

#include <stddef.h>
#include <stdint.h>

#include "clhclip.h"

/* Label value of "ignore" pixels (detectron2 / CAT-Seg convention). */
#define CLH_LABEL_IGNORE 255

/* ------------------------------------------------------------------ label maps */

typedef struct clh_label_map {
    int width;
    int height;
    int32_t *ids; /* height * width class ids, row-major; CLH_LABEL_IGNORE = ignore */
} clh_label_map;

/* How label PNG pixels become class ids. */
typedef enum clh_label_mode {
    /* 8-bit gray PNG (or RGB/palette with R = G = B): value = class id, 255 = ignore.
     * COCO-Stuff as prepared for detectron2, CAT-Seg's prepared sets, our own data. */
    CLH_LABELS_RAW = 0,
    /* ADE20K SceneParsing 8-bit gray: 0 -> ignore, k -> k - 1 (CAT-Seg prepare_ade20k_150). */
    CLH_LABELS_ADE150 = 1,
    /* PASCAL VOC colour-coded RGB (or palette) PNG: standard VOC colour map, (224,224,192)
     * -> ignore; then class k (1..20) -> k - 1 and background 0 -> ignore (voc20) or
     * -> 20 (voc20b, see clh_label_options.voc_background). Unknown colours are an error. */
    CLH_LABELS_VOC_RGB = 2,
} clh_label_mode;

typedef struct clh_label_options {
    clh_label_mode mode;
    int voc_background; /* CLH_LABELS_VOC_RGB only: 0 = voc20 (bg ignored), 1 = voc20b (bg 20) */
} clh_label_options;

/* Read a label PNG into class ids (opt NULL = raw). 16-bit PNGs are CLH_ERR_UNSUPPORTED. */
clh_status clh_label_read(const char *path, const clh_label_options *opt, clh_label_map *out);
/* Write ids (each 0..255) as an 8-bit gray PNG; other values are CLH_ERR_INVALID_ARGUMENT. */
clh_status clh_label_write_png(const char *path, const int32_t *ids, int width, int height);
/* Allocate a width x height map filled with `fill`. */
clh_status clh_label_map_new(int width, int height, int32_t fill, clh_label_map *out);
void clh_label_map_free(clh_label_map *map); /* frees ids, zeroes the struct */
/* The PASCAL VOC colour of class k (0..255), by the usual bit-interleaving formula. */
void clh_voc_color(int k, uint8_t rgb[3]);

/* ------------------------------------------------------------------ datasets */

typedef struct clh_dataset clh_dataset;

typedef struct clh_dataset_options {
    /* Split folder name ("validation", "train2017", ...); NULL or "" = no split. */
    const char *split;
    clh_label_options labels;
} clh_dataset_options;

/*
 * Open a dataset folder and list its (image, label) pairs sorted by image file name
 * (strcmp order). Layouts tried in this order:
 *   with split S:  ROOT/images/S/ + ROOT/annotations_detectron2/S/ (COCO-Stuff, CAT-Seg)
 *                  ROOT/images/S/ + ROOT/annotations/S/            (ADE20K SceneParsing)
 *   without split: ROOT/images/ + ROOT/labels/                     (generic, procedural)
 *                  ROOT/images/ + ROOT/annotations/                (ADE20K sample)
 *                  ROOT/<stem>_image.png + ROOT/<stem>_target.png  (VOC sample pairs)
 * Images are *.jpg, *.jpeg, *.png (any case); the label of image <stem>.<ext> is
 * <labels dir>/<stem>.png. Other files in the image folder are ignored; a folder with no
 * image, an image without label, or a missing root is an error naming the path.
 * Image/label sizes are checked when a sample is read (clh_dataset_read).
 */
clh_status clh_dataset_open(const char *root, const clh_dataset_options *opt, clh_dataset **out);
void clh_dataset_free(clh_dataset *ds);
size_t clh_dataset_count(const clh_dataset *ds);
/* Image file name (without folder) of sample i; NULL when out of range. */
const char *clh_dataset_name(const clh_dataset *ds, size_t i);
const char *clh_dataset_image_path(const clh_dataset *ds, size_t i);
const char *clh_dataset_label_path(const clh_dataset *ds, size_t i);
/* Read sample i; img and/or lab may be NULL. A label whose size differs from the image
 * is CLH_ERR_FORMAT naming both files. */
clh_status clh_dataset_read(const clh_dataset *ds, size_t i, clh_image *img, clh_label_map *lab);

/* ------------------------------------------------------------------ augmentation */

/* 8-bit RGB image (interleaved), the working format of the augmentation pipeline
 * (detectron2 runs it on uint8 arrays, so rounding happens at the same places). */
typedef struct clh_rgb8 {
    int width;
    int height;
    uint8_t *px; /* height * width * 3 */
} clh_rgb8;

typedef struct clh_augment_options {
    int crop;     /* output crop size (e.g. 384) */
    int max_size; /* cap of the long edge after resizing (0 = 1333, detectron2 default) */
    int augment;  /* 1: random crop, photometric distortion, flip; 0: centre crop only */
} clh_augment_options;

/*
 * One training sample, detectron2 mask_former_semantic semantics:
 *  1. ResizeShortestEdge(crop, max_size): image PIL-style bilinear (antialiased when
 *     shrinking, 8-bit rounding), label nearest;
 *  2. crop min(crop, h) x min(crop, w): random offset (augment) or centred;
 *  3. augment: ColorAugSSD (brightness +-32, contrast [0.5,1.5], saturation [0.5,1.5],
 *     hue +-18 on OpenCV's 8-bit HSV, each with probability 1/2, contrast first or last
 *     with probability 1/2), then horizontal flip with probability 1/2;
 *  4. pad bottom/right to crop x crop (image 128, label 255);
 *  5. CLIP normalisation into pixels[3 * crop * crop] (CHW), ids into labels[crop * crop].
 * All randomness comes from `seed` (any 64-bit value), so equal inputs and seeds give
 * equal bytes. lab may be NULL (labels then ignored; `labels` may be NULL too).
 */
clh_status clh_augment_sample(const clh_rgb8 *img, const clh_label_map *lab,
                              const clh_augment_options *opt, uint64_t seed, float *pixels,
                              int32_t *labels);

/* Sample i as 8-bit RGB (img required, lab may be NULL); same checks as clh_dataset_read. */
clh_status clh_dataset_read_rgb8(const clh_dataset *ds, size_t i, clh_rgb8 *img,
                                 clh_label_map *lab);

/* Building blocks (exposed for tests and tools). */
clh_status clh_rgb8_load(const char *path, clh_rgb8 *out);
clh_status clh_rgb8_from_image(const clh_image *img, clh_rgb8 *out); /* rounds, clamps */
void clh_rgb8_free(clh_rgb8 *img);
/* detectron2 ResizeShortestEdge.get_output_shape. */
void clh_shortest_edge_size(int height, int width, int short_edge, int max_size, int *out_h,
                            int *out_w);
clh_status clh_rgb8_resize_bilinear(const clh_rgb8 *in, int width, int height, clh_rgb8 *out);
clh_status clh_label_resize_nearest(const clh_label_map *in, int width, int height,
                                    clh_label_map *out);
/* ColorAugSSD on an 8-bit RGB image in place, random draws from seed. */
void clh_color_aug_ssd(clh_rgb8 *img, uint64_t seed);

/* ------------------------------------------------------------------ loader */

typedef struct clh_loader clh_loader;

typedef struct clh_loader_options {
    int batch;    /* samples per batch (> 0) */
    int crop;     /* crop size (> 0) */
    int max_size; /* 0 = 1333 */
    uint64_t seed;
    int threads;   /* worker threads; 0 = number of online CPUs (at most 8) */
    int prefetch;  /* batches prepared ahead; 0 = 2 */
    int augment;   /* see clh_augment_options */
    int shuffle;   /* shuffle the order every epoch (from seed and epoch) */
    int drop_last; /* 1: skip the last partial batch of an epoch; 0: it comes smaller */
} clh_loader_options;

typedef struct clh_batch {
    int size;        /* samples in this batch (<= batch; smaller only for a last partial) */
    int crop;        /* pixels are [size, 3, crop, crop], labels [size, crop, crop] */
    int64_t step;    /* global step of this batch (0-based) */
    int64_t epoch;   /* epoch it belongs to */
    float *pixels;   /* CLIP-normalised */
    int32_t *labels; /* class ids, CLH_LABEL_IGNORE = ignore */
    size_t *indices; /* dataset index of each sample */
} clh_batch;

/*
 * Batches for global steps 0, 1, 2, ... (epochs follow each other without end). The
 * batch of step s only depends on (dataset, options, s): epoch e = s / steps_per_epoch
 * takes the dataset order shuffled from (seed, e), and the augmentation of dataset
 * sample i in epoch e is seeded from (seed, e, i); thread count and timing do not
 * matter. The dataset must outlive the loader.
 */
clh_status clh_loader_new(const clh_dataset *ds, const clh_loader_options *opt, clh_loader **out);
/* Blocks until the next batch is ready. A failure while preparing it (unreadable file,
 * ...) is returned here with its message; the loader then moves on to the next step. */
clh_status clh_loader_next(clh_loader *loader, clh_batch **out);
/* Make the next batch the one of global step `step` (for resuming). */
clh_status clh_loader_seek(clh_loader *loader, int64_t step);
int64_t clh_loader_steps_per_epoch(const clh_loader *loader);
/* Stops and joins the workers (also mid-epoch) and frees the loader. */
void clh_loader_free(clh_loader *loader);
void clh_batch_free(clh_batch *batch);

/* ------------------------------------------------------------------ metrics */

typedef struct clh_confusion clh_confusion;

typedef struct clh_confusion_options {
    /* PAS-20b (CAT-Seg VOCbEvaluator): predictions >= 20 count as 20 "background". */
    int voc20b_background;
} clh_confusion_options;

/* Results as fractions in [0, 1] (detectron2 prints them x100). Per-class arrays have
 * n entries and are NaN where the class has no ground-truth pixel. */
typedef struct clh_seg_metrics {
    int n;
    double miou;     /* mean IoU over classes with GT pixels */
    double macc;     /* mean class accuracy over classes with GT pixels */
    double fwiou;    /* IoU weighted by GT pixel frequency */
    double pacc;     /* pixel accuracy */
    double *iou;     /* [n] */
    double *acc;     /* [n] */
    uint64_t pixels; /* GT pixels counted (ignore excluded) */
} clh_seg_metrics;

clh_status clh_confusion_new(int n_classes, const clh_confusion_options *opt, clh_confusion **out);
void clh_confusion_free(clh_confusion *c);
/* Count p pixels. gt == CLH_LABEL_IGNORE is skipped; other gt outside [0, n) and pred
 * outside [0, n) (after the voc20b remap) are CLH_ERR_INVALID_ARGUMENT and nothing is
 * counted. detectron2 semantics: predictions on ignored pixels do not count. */
clh_status clh_confusion_add(clh_confusion *c, const int32_t *pred, const int32_t *gt, size_t p);
/* dst += src (same n). */
clh_status clh_confusion_merge(clh_confusion *dst, const clh_confusion *src);
/* Count of pixels with ground truth g predicted as p. */
uint64_t clh_confusion_count(const clh_confusion *c, int pred, int gt);
int clh_confusion_classes(const clh_confusion *c);
clh_status clh_confusion_results(const clh_confusion *c, clh_seg_metrics *out);
void clh_seg_metrics_free(clh_seg_metrics *m);

/* ------------------------------------------------------------------ procedural data */

typedef struct clh_procedural_options {
    int n_images; /* > 0 */
    int size;     /* square images, 16..4096 */
    uint64_t seed;
} clh_procedural_options;

/*
 * Write a synthetic segmentation dataset: dir/images/NNNN.png (RGB), dir/labels/NNNN.png
 * (raw ids, every pixel labelled) and dir/classes.txt (one class name per line). Creates
 * dir (and parents' last level) when missing. Deterministic from the seed.
 */
clh_status clh_procedural_write(const char *dir, const clh_procedural_options *opt);
/* Class names of the procedural dataset, in id order (static strings). */
int clh_procedural_class_count(void);
const char *clh_procedural_class_name(int id);

#endif
