/* Training augmentation with detectron2 mask_former_semantic semantics (hclip-spec 5.4):
 * ResizeShortestEdge, RandomCrop, ColorAugSSD, RandomFlip, pad, CLIP normalisation. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "data.h"
#include "hclip.h"
#include "internal.h"

#define DEFAULT_MAX_SIZE 1333
#define PAD_PIXEL        128

/* SSD photometric distortion parameters (detectron2 ColorAugSSDTransform defaults). */
#define BRIGHTNESS_DELTA 32.0
#define CONTRAST_LOW     0.5
#define CONTRAST_HIGH    1.5
#define SATURATION_LOW   0.5
#define SATURATION_HIGH  1.5
#define HUE_DELTA        18

/* ------------------------------------------------------------------ rgb8 */

void clh_rgb8_free(clh_rgb8 *img) {
    if (!img)
        return;
    free(img->px);
    memset(img, 0, sizeof *img);
}

static clh_status rgb8_alloc(int width, int height, clh_rgb8 *out) {
    memset(out, 0, sizeof *out);
    if (width <= 0 || height <= 0 || width > (1 << 16) || height > (1 << 16))
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "rgb8 image: bad size %dx%d", width,
                        height);
    out->px = malloc((size_t)width * (size_t)height * 3);
    if (!out->px)
        return clh_fail(NULL, CLH_ERR_OUT_OF_MEMORY, "out of host memory for a %dx%d image", width,
                        height);
    out->width = width;
    out->height = height;
    return CLH_OK;
}

static uint8_t clamp_u8(double v) {
    return (uint8_t)(v <= 0 ? 0 : v >= 255 ? 255 : v);
}

static uint8_t round_u8(double v) {
    return clamp_u8(floor(v + 0.5));
}

clh_status clh_rgb8_from_image(const clh_image *img, clh_rgb8 *out) {
    if (!out)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "clh_rgb8_from_image: out is NULL");
    memset(out, 0, sizeof *out);
    if (!img || !img->data)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "clh_rgb8_from_image: image is empty");
    CLH_TRY(rgb8_alloc(img->width, img->height, out));
    size_t n = (size_t)img->width * (size_t)img->height * 3;
    for (size_t i = 0; i < n; i++)
        out->px[i] = round_u8(img->data[i]);
    return CLH_OK;
}

/* ------------------------------------------------------------------ resizing */

void clh_shortest_edge_size(int height, int width, int short_edge, int max_size, int *out_h,
                            int *out_w) {
    double scale = (double)short_edge / (height < width ? height : width);
    double nh, nw;
    if (height < width) {
        nh = short_edge;
        nw = scale * width;
    } else {
        nh = scale * height;
        nw = short_edge;
    }
    double longest = nh > nw ? nh : nw;
    if (max_size > 0 && longest > max_size) {
        scale = max_size / longest;
        nh *= scale;
        nw *= scale;
    }
    *out_h = (int)(nh + 0.5);
    *out_w = (int)(nw + 0.5);
    if (*out_h < 1)
        *out_h = 1;
    if (*out_w < 1)
        *out_w = 1;
}

/* Taps of one output coordinate of a PIL-style triangle (bilinear) filter. */
typedef struct taps {
    int first, count;
    double *w; /* count weights, normalised to sum 1 */
} taps;

/* PIL's resampling coefficients: the filter is widened by the scale when shrinking
 * (antialiasing) and sampled at input pixel centres. Returns max taps per output. */
static double *bilinear_taps(int in, int out, taps *t, int *max_taps) {
    double scale = (double)in / out;
    double fscale = scale > 1 ? scale : 1;
    double support = fscale;
    int ksize = (int)ceil(support) * 2 + 1;
    double *w = calloc((size_t)out * (size_t)ksize, sizeof *w);
    if (!w)
        return NULL;
    for (int x = 0; x < out; x++) {
        double center = (x + 0.5) * scale;
        int lo = (int)(center - support + 0.5), hi = (int)(center + support + 0.5);
        lo = lo < 0 ? 0 : lo;
        hi = hi > in ? in : hi;
        if (hi - lo > ksize)
            hi = lo + ksize;
        double sum = 0;
        double *wx = w + (size_t)x * ksize;
        for (int j = lo; j < hi; j++) {
            double d = fabs((j - center + 0.5) / fscale);
            wx[j - lo] = d < 1 ? 1 - d : 0;
            sum += wx[j - lo];
        }
        for (int j = lo; j < hi && sum > 0; j++)
            wx[j - lo] /= sum;
        t[x].first = lo;
        t[x].count = hi - lo;
        t[x].w = wx;
    }
    *max_taps = ksize;
    return w;
}

/* One separable pass along x (horizontal) or y, rounding to 8 bits as PIL does. */
static clh_status resize_pass(const clh_rgb8 *in, int out_len, int horizontal, clh_rgb8 *out) {
    int in_len = horizontal ? in->width : in->height;
    taps *t = malloc((size_t)out_len * sizeof *t);
    int ksize;
    double *w = t ? bilinear_taps(in_len, out_len, t, &ksize) : NULL;
    clh_status st =
        w ? rgb8_alloc(horizontal ? out_len : in->width, horizontal ? in->height : out_len, out)
          : clh_fail(NULL, CLH_ERR_OUT_OF_MEMORY, "resize: out of host memory");
    if (st == CLH_OK) {
        size_t row = (size_t)in->width * 3;
        for (int y = 0; y < out->height; y++)
            for (int x = 0; x < out->width; x++) {
                const taps *tp = &t[horizontal ? x : y];
                double acc[3] = {0, 0, 0};
                for (int k = 0; k < tp->count; k++) {
                    const uint8_t *p = horizontal
                                           ? in->px + (size_t)y * row + (size_t)(tp->first + k) * 3
                                           : in->px + (size_t)(tp->first + k) * row + (size_t)x * 3;
                    for (int c = 0; c < 3; c++)
                        acc[c] += tp->w[k] * p[c];
                }
                uint8_t *o = out->px + ((size_t)y * out->width + x) * 3;
                for (int c = 0; c < 3; c++)
                    o[c] = round_u8(acc[c]);
            }
    }
    free(w);
    free(t);
    return st;
}

static clh_status rgb8_copy(const clh_rgb8 *in, clh_rgb8 *out) {
    CLH_TRY(rgb8_alloc(in->width, in->height, out));
    memcpy(out->px, in->px, (size_t)in->width * in->height * 3);
    return CLH_OK;
}

clh_status clh_rgb8_resize_bilinear(const clh_rgb8 *in, int width, int height, clh_rgb8 *out) {
    if (!out)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "clh_rgb8_resize_bilinear: out is NULL");
    memset(out, 0, sizeof *out);
    if (!in || !in->px || width <= 0 || height <= 0)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT,
                        "clh_rgb8_resize_bilinear: empty input or bad size %dx%d", width, height);
    if (width == in->width && height == in->height)
        return rgb8_copy(in, out);
    if (height == in->height)
        return resize_pass(in, width, 1, out);
    if (width == in->width)
        return resize_pass(in, height, 0, out);
    clh_rgb8 mid;
    CLH_TRY(resize_pass(in, width, 1, &mid));
    clh_status st = resize_pass(&mid, height, 0, out);
    clh_rgb8_free(&mid);
    return st;
}

/* PIL NEAREST: source = floor((x + 0.5) * in / out). */
static int nearest_source(int x, int in, int out) {
    int s = (int)((x + 0.5) * in / out);
    return s < in ? s : in - 1;
}

clh_status clh_label_resize_nearest(const clh_label_map *in, int width, int height,
                                    clh_label_map *out) {
    if (!out)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "clh_label_resize_nearest: out is NULL");
    memset(out, 0, sizeof *out);
    if (!in || !in->ids)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "clh_label_resize_nearest: empty input");
    CLH_TRY(clh_label_map_new(width, height, 0, out));
    for (int y = 0; y < height; y++) {
        const int32_t *src = in->ids + (size_t)nearest_source(y, in->height, height) * in->width;
        for (int x = 0; x < width; x++)
            out->ids[(size_t)y * width + x] = src[nearest_source(x, in->width, width)];
    }
    return CLH_OK;
}

/* ------------------------------------------------------------------ ColorAugSSD */

/* Python random.randrange(n) / randint(lo, hi) / uniform(a, b) counterparts. */
static int rand_below(clh_rng *rng, int n) {
    int k = (int)(clh_rng_uniform(rng) * n);
    return k < n ? k : n - 1;
}

static double rand_uniform(clh_rng *rng, double a, double b) {
    return a + (b - a) * clh_rng_uniform(rng);
}

/* numpy: float32(v) * alpha + beta, clipped to 0..255, truncated to uint8. */
static uint8_t convert_u8(uint8_t v, float alpha, float beta) {
    return clamp_u8((float)v * alpha + beta);
}

static void convert_all(clh_rgb8 *img, float alpha, float beta) {
    size_t n = (size_t)img->width * img->height * 3;
    for (size_t i = 0; i < n; i++)
        img->px[i] = convert_u8(img->px[i], alpha, beta);
}

/* OpenCV RGB -> HSV for 8-bit images (H in 0..179, fixed point with 12 fraction bits). */
static void rgb_to_hsv8(const uint8_t *p, int *h, int *s, int *v) {
    int r = p[0], g = p[1], b = p[2];
    int vmax = r > g ? (r > b ? r : b) : (g > b ? g : b);
    int vmin = r < g ? (r < b ? r : b) : (g < b ? g : b);
    int diff = vmax - vmin;
    int sdiv = vmax ? (int)lround(255.0 * 4096 / vmax) : 0;
    int hdiv = diff ? (int)lround(180.0 * 4096 / (6.0 * diff)) : 0;
    int hh;
    if (vmax == r)
        hh = g - b;
    else if (vmax == g)
        hh = b - r + 2 * diff;
    else
        hh = r - g + 4 * diff;
    hh = (hh * hdiv + (1 << 11)) >> 12;
    if (hh < 0)
        hh += 180;
    *h = hh;
    *s = (diff * sdiv + (1 << 11)) >> 12;
    *v = vmax;
}

/* OpenCV HSV -> RGB for 8-bit images: float conversion, then round to nearest. */
static void hsv8_to_rgb(int h, int s, int v, uint8_t *p) {
    float fs = s / 255.0f, fv = v / 255.0f, rgb[3];
    if (fs == 0) {
        rgb[0] = rgb[1] = rgb[2] = fv;
    } else {
        static const int sector_data[6][3] = {{1, 3, 0}, {1, 0, 2}, {3, 0, 1},
                                              {0, 2, 1}, {0, 1, 3}, {2, 1, 0}};
        float fh = h * (6.0f / 180.0f);
        while (fh < 0)
            fh += 6;
        while (fh >= 6)
            fh -= 6;
        int sector = (int)floorf(fh);
        fh -= (float)sector;
        if ((unsigned)sector >= 6u) {
            sector = 0;
            fh = 0;
        }
        float tab[4] = {fv, fv * (1 - fs), fv * (1 - fs * fh), fv * (1 - fs * (1 - fh))};
        /* sector_data holds (b, g, r) indices. */
        rgb[2] = tab[sector_data[sector][0]];
        rgb[1] = tab[sector_data[sector][1]];
        rgb[0] = tab[sector_data[sector][2]];
    }
    for (int c = 0; c < 3; c++)
        p[c] = clamp_u8(rintf(rgb[c] * 255.0f));
}

static void brightness(clh_rgb8 *img, clh_rng *rng) {
    if (rand_below(rng, 2))
        convert_all(img, 1.0f, (float)rand_uniform(rng, -BRIGHTNESS_DELTA, BRIGHTNESS_DELTA));
}

static void contrast(clh_rgb8 *img, clh_rng *rng) {
    if (rand_below(rng, 2))
        convert_all(img, (float)rand_uniform(rng, CONTRAST_LOW, CONTRAST_HIGH), 0.0f);
}

static void saturation(clh_rgb8 *img, clh_rng *rng) {
    if (!rand_below(rng, 2))
        return;
    float alpha = (float)rand_uniform(rng, SATURATION_LOW, SATURATION_HIGH);
    size_t n = (size_t)img->width * img->height;
    for (size_t i = 0; i < n; i++) {
        int h, s, v;
        rgb_to_hsv8(img->px + 3 * i, &h, &s, &v);
        hsv8_to_rgb(h, convert_u8((uint8_t)s, alpha, 0.0f), v, img->px + 3 * i);
    }
}

static void hue(clh_rgb8 *img, clh_rng *rng) {
    if (!rand_below(rng, 2))
        return;
    int delta = rand_below(rng, 2 * HUE_DELTA + 1) - HUE_DELTA;
    size_t n = (size_t)img->width * img->height;
    for (size_t i = 0; i < n; i++) {
        int h, s, v;
        rgb_to_hsv8(img->px + 3 * i, &h, &s, &v);
        hsv8_to_rgb(((h + delta) % 180 + 180) % 180, s, v, img->px + 3 * i);
    }
}

/* detectron2 ColorAugSSDTransform.apply_image, drawing from rng in the same order. */
static void color_aug_ssd(clh_rgb8 *img, clh_rng *rng) {
    brightness(img, rng);
    if (rand_below(rng, 2)) {
        contrast(img, rng);
        saturation(img, rng);
        hue(img, rng);
    } else {
        saturation(img, rng);
        hue(img, rng);
        contrast(img, rng);
    }
}

void clh_color_aug_ssd(clh_rgb8 *img, uint64_t seed) {
    if (!img || !img->px)
        return;
    clh_rng rng;
    clh_rng_seed(&rng, seed);
    color_aug_ssd(img, &rng);
}

/* ------------------------------------------------------------------ one sample */

static clh_status crop_rgb8(const clh_rgb8 *in, int x0, int y0, int w, int h, clh_rgb8 *out) {
    CLH_TRY(rgb8_alloc(w, h, out));
    for (int y = 0; y < h; y++)
        memcpy(out->px + (size_t)y * w * 3, in->px + ((size_t)(y0 + y) * in->width + x0) * 3,
               (size_t)w * 3);
    return CLH_OK;
}

/* Write the (possibly flipped) crop into CHW normalised floats and ids, padding the
 * bottom/right with 128 / ignore. */
static void write_output(const clh_rgb8 *img, const clh_label_map *lab, int x0, int y0, int flip,
                         int crop, float *pixels, int32_t *labels) {
    size_t plane = (size_t)crop * crop;
    for (int y = 0; y < crop; y++)
        for (int x = 0; x < crop; x++) {
            int inside = y < img->height && x < img->width;
            int sx = flip ? img->width - 1 - x : x;
            size_t o = (size_t)y * crop + x;
            for (int c = 0; c < 3; c++) {
                float v = inside ? img->px[((size_t)y * img->width + sx) * 3 + c] : PAD_PIXEL;
                pixels[c * plane + o] = (v - CLH_CLIP_MEAN[c]) / CLH_CLIP_STD[c];
            }
            if (labels)
                labels[o] = inside && lab ? lab->ids[(size_t)(y0 + y) * lab->width + x0 + sx]
                                          : CLH_LABEL_IGNORE;
        }
}

static clh_status check_augment_args(const clh_rgb8 *img, const clh_label_map *lab,
                                     const clh_augment_options *opt, const float *pixels) {
    if (!img || !img->px || !opt || !pixels)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT,
                        "clh_augment_sample: image, options and pixels are required");
    if (opt->crop <= 0 || opt->crop > 8192 || opt->max_size < 0)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT,
                        "clh_augment_sample: crop must be 1..8192 (got %d), max_size >= 0 (got %d)",
                        opt->crop, opt->max_size);
    if (lab && (lab->width != img->width || lab->height != img->height || !lab->ids))
        return clh_fail(NULL, CLH_ERR_SHAPE,
                        "clh_augment_sample: label %dx%d does not match image %dx%d", lab->width,
                        lab->height, img->width, img->height);
    return CLH_OK;
}

clh_status clh_augment_sample(const clh_rgb8 *img, const clh_label_map *lab,
                              const clh_augment_options *opt, uint64_t seed, float *pixels,
                              int32_t *labels) {
    CLH_TRY(check_augment_args(img, lab, opt, pixels));
    clh_rng rng;
    clh_rng_seed(&rng, seed);
    int crop = opt->crop, nh, nw;
    clh_shortest_edge_size(img->height, img->width, crop,
                           opt->max_size ? opt->max_size : DEFAULT_MAX_SIZE, &nh, &nw);
    clh_rgb8 resized = {0}, cropped = {0};
    clh_label_map lab_resized = {0};
    clh_status st = clh_rgb8_resize_bilinear(img, nw, nh, &resized);
    if (st == CLH_OK && lab && labels)
        st = clh_label_resize_nearest(lab, nw, nh, &lab_resized);
    int ch = crop < nh ? crop : nh, cw = crop < nw ? crop : nw;
    int y0 = opt->augment ? rand_below(&rng, nh - ch + 1) : (nh - ch) / 2;
    int x0 = opt->augment ? rand_below(&rng, nw - cw + 1) : (nw - cw) / 2;
    if (st == CLH_OK)
        st = crop_rgb8(&resized, x0, y0, cw, ch, &cropped);
    if (st == CLH_OK) {
        int flip = 0;
        if (opt->augment) {
            color_aug_ssd(&cropped, &rng);
            flip = clh_rng_uniform(&rng) < 0.5;
        }
        write_output(&cropped, lab_resized.ids ? &lab_resized : NULL, x0, y0, flip, crop, pixels,
                     labels);
    }
    clh_rgb8_free(&resized);
    clh_rgb8_free(&cropped);
    clh_label_map_free(&lab_resized);
    return st;
}
