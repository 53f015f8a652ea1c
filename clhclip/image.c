/* Host image I/O (stb), PIL-compatible bicubic resize, crop and CLIP preprocessing. */
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* The stb implementations are compiled in this file only. Hidden visibility keeps their
 * symbols out of libclhclip.so's exports; the libc headers stb uses are included above so
 * their declarations stay outside the hidden region. (STB_IMAGE_STATIC is unusable with
 * stb_image 2.27: it declares a static function it never defines, which -Werror rejects.)
 * The library never aborts, so stb's internal consistency asserts are compiled out. */
#define STBI_ASSERT(x)  ((void)sizeof(x))
#define STBIW_ASSERT(x) ((void)sizeof(x))
#pragma GCC visibility push(hidden)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#pragma GCC diagnostic ignored "-Wsign-compare"
#pragma GCC diagnostic ignored "-Wimplicit-fallthrough"
#pragma GCC diagnostic ignored "-Wunused-parameter"
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#define STB_IMAGE_IMPLEMENTATION
#define STB_IMAGE_WRITE_IMPLEMENTATION
#include <stb/stb_image.h>
#include <stb/stb_image_write.h>
#pragma GCC diagnostic pop
#pragma GCC visibility pop

/* OpenAI CLIP mean/std (0..1 scale) times 255, for pixels in 0..255. */
const float CLH_CLIP_MEAN[3] = {0.48145466f * 255.0f, 0.4578275f * 255.0f, 0.40821073f * 255.0f};
const float CLH_CLIP_STD[3] = {0.26862954f * 255.0f, 0.26130258f * 255.0f, 0.27577711f * 255.0f};

/* Images larger than this per side are rejected (stb's own limit is 2^24). */
#define MAX_IMAGE_SIDE (1 << 24)

/* ------------------------------------------------------------------ basics */

static clh_status alloc_image(int width, int height, const char *fn, clh_image *out) {
    memset(out, 0, sizeof *out);
    if (width <= 0 || height <= 0 || width > MAX_IMAGE_SIDE || height > MAX_IMAGE_SIDE)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "%s: bad image size %dx%d", fn, width,
                        height);
    size_t n = (size_t)width * (size_t)height * 3;
    if (n / 3 / (size_t)width != (size_t)height)
        return clh_fail(NULL, CLH_ERR_OUT_OF_MEMORY, "%s: image %dx%d is too large", fn, width,
                        height);
    out->data = malloc(n * sizeof *out->data);
    if (!out->data)
        return clh_fail(NULL, CLH_ERR_OUT_OF_MEMORY, "%s: out of host memory for %dx%d image", fn,
                        width, height);
    out->width = width;
    out->height = height;
    return CLH_OK;
}

static clh_status check_image(const clh_image *img, const char *fn) {
    if (!img || !img->data || img->width <= 0 || img->height <= 0)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "%s: input image is NULL or empty", fn);
    return CLH_OK;
}

void clh_image_free(clh_image *img) {
    if (!img)
        return;
    free(img->data);
    memset(img, 0, sizeof *img);
}

clh_status clh_image_from_rgb8(const uint8_t *rgb, int width, int height, clh_image *out) {
    if (!out)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "clh_image_from_rgb8: out is NULL");
    if (!rgb) {
        memset(out, 0, sizeof *out);
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "clh_image_from_rgb8: pixels are NULL");
    }
    CLH_TRY(alloc_image(width, height, "clh_image_from_rgb8", out));
    size_t n = (size_t)width * (size_t)height * 3;
    for (size_t i = 0; i < n; i++)
        out->data[i] = rgb[i];
    return CLH_OK;
}

clh_status clh_image_load(const char *path, clh_image *out) {
    if (!out)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "clh_image_load: out is NULL");
    memset(out, 0, sizeof *out);
    if (!path)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "clh_image_load: path is NULL");
    /* Open it ourselves so a missing file (IO) is told apart from a bad one (FORMAT). */
    FILE *fp = fopen(path, "rb");
    if (!fp)
        return clh_fail(NULL, CLH_ERR_IO, "cannot open image '%s': %s", path, strerror(errno));
    int width, height, channels;
    uint8_t *rgb = stbi_load_from_file(fp, &width, &height, &channels, 3);
    fclose(fp);
    if (!rgb)
        return clh_fail(NULL, CLH_ERR_FORMAT, "cannot decode image '%s': %s", path,
                        stbi_failure_reason());
    clh_status st = clh_image_from_rgb8(rgb, width, height, out);
    stbi_image_free(rgb);
    return st;
}

clh_status clh_png_write(const char *path, const uint8_t *pixels, int width, int height,
                         int channels) {
    if (!path || !pixels || width <= 0 || height <= 0 || (channels != 1 && channels != 3))
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT,
                        "clh_png_write('%s'): need pixels, a positive size (got %dx%d) and 1 or "
                        "3 channels (got %d)",
                        path ? path : "(null)", width, height, channels);
    errno = 0;
    if (!stbi_write_png(path, width, height, channels, pixels, width * channels))
        return clh_fail(NULL, CLH_ERR_IO, "cannot write PNG '%s': %s", path,
                        errno ? strerror(errno) : "stb_image_write failed");
    return CLH_OK;
}

clh_status clh_image_crop(const clh_image *in, int x, int y, int width, int height,
                          clh_image *out) {
    if (!out)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "clh_image_crop: out is NULL");
    memset(out, 0, sizeof *out);
    CLH_TRY(check_image(in, "clh_image_crop"));
    if (x < 0 || y < 0 || width <= 0 || height <= 0 || width > in->width - x ||
        height > in->height - y)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT,
                        "clh_image_crop: box x=%d y=%d %dx%d is outside the %dx%d image", x, y,
                        width, height, in->width, in->height);
    CLH_TRY(alloc_image(width, height, "clh_image_crop", out));
    for (int r = 0; r < height; r++)
        memcpy(out->data + (size_t)r * width * 3, in->data + ((size_t)(y + r) * in->width + x) * 3,
               (size_t)width * 3 * sizeof(float));
    return CLH_OK;
}

/* ------------------------------------------------------------------ PIL-compatible resize
 *
 * Pillow's 8-bit resampler (libImaging/Resample.c): a separable convolution, horizontal
 * pass first. Per output pixel the filter (cubic, a = -0.5, support 2 widened by the
 * downscale factor) is sampled at the input pixel centres, normalised to sum 1, then
 * turned into fixed-point integers with 22 fraction bits. Each pass accumulates
 * pixel * coefficient in integers starting from a half, shifts the fraction out and clamps
 * to 0..255, so the intermediate image is 8-bit as well. Reproducing this integer
 * arithmetic gives bit-identical results. */

#define PRECISION_BITS 22

typedef struct resample_coeffs {
    int ksize;   /* coefficients stored per output pixel */
    int *first;  /* first input index per output pixel */
    int *count;  /* number of taps per output pixel */
    int32_t *kk; /* out_size * ksize fixed-point coefficients */
} resample_coeffs;

static double bicubic_kernel(double x) {
    const double a = -0.5;
    x = fabs(x);
    if (x < 1.0)
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
    if (x < 2.0)
        return (((x - 5.0) * x + 8.0) * x - 4.0) * a;
    return 0.0;
}

static void free_coeffs(resample_coeffs *c) {
    free(c->first);
    free(c->count);
    free(c->kk);
    memset(c, 0, sizeof *c);
}

/* Double-precision weights for one output pixel, normalised; returns the tap count. */
static int pixel_weights(int in_size, double center, double support, double inv_scale, int *first,
                         double *w) {
    int lo = (int)(center - support + 0.5); /* truncation, as Pillow does */
    int hi = (int)(center + support + 0.5);
    if (lo < 0)
        lo = 0;
    if (hi > in_size)
        hi = in_size;
    int n = hi - lo;
    double sum = 0.0;
    for (int i = 0; i < n; i++) {
        w[i] = bicubic_kernel((i + lo - center + 0.5) * inv_scale);
        sum += w[i];
    }
    for (int i = 0; i < n && sum != 0.0; i++)
        w[i] /= sum;
    *first = lo;
    return n;
}

static clh_status compute_coeffs(int in_size, int out_size, resample_coeffs *c) {
    memset(c, 0, sizeof *c);
    double scale = (double)in_size / out_size;
    double filter_scale = scale < 1.0 ? 1.0 : scale; /* widen only when shrinking */
    double support = 2.0 * filter_scale;
    c->ksize = (int)ceil(support) * 2 + 1;
    c->first = malloc((size_t)out_size * sizeof *c->first);
    c->count = malloc((size_t)out_size * sizeof *c->count);
    c->kk = calloc((size_t)out_size * (size_t)c->ksize, sizeof *c->kk);
    double *w = malloc((size_t)c->ksize * sizeof *w);
    if (!c->first || !c->count || !c->kk || !w) {
        free(w);
        free_coeffs(c);
        return clh_fail(NULL, CLH_ERR_OUT_OF_MEMORY, "clh_image_resize: out of host memory");
    }
    for (int o = 0; o < out_size; o++) {
        double center = (o + 0.5) * scale;
        int n = pixel_weights(in_size, center, support, 1.0 / filter_scale, &c->first[o], w);
        c->count[o] = n;
        for (int i = 0; i < n; i++) /* round half away from zero into fixed point */
            c->kk[(size_t)o * c->ksize + i] =
                (int32_t)(w[i] < 0 ? -0.5 + w[i] * (1 << PRECISION_BITS)
                                   : 0.5 + w[i] * (1 << PRECISION_BITS));
    }
    free(w);
    return CLH_OK;
}

static uint8_t clip8(int64_t acc) {
    if (acc < 0)
        return 0;
    acc >>= PRECISION_BITS;
    return (uint8_t)(acc > 255 ? 255 : acc);
}

/* Horizontal pass: each of the h rows of w RGB pixels becomes ow pixels. */
static void resample_rows(const uint8_t *in, int w, int h, uint8_t *out, int ow,
                          const resample_coeffs *c) {
    for (int y = 0; y < h; y++) {
        const uint8_t *src = in + (size_t)y * w * 3;
        uint8_t *dst = out + (size_t)y * ow * 3;
        for (int o = 0; o < ow; o++) {
            const int32_t *k = &c->kk[(size_t)o * c->ksize];
            const uint8_t *p = src + (size_t)c->first[o] * 3;
            int64_t acc[3] = {1 << (PRECISION_BITS - 1), 1 << (PRECISION_BITS - 1),
                              1 << (PRECISION_BITS - 1)};
            for (int i = 0; i < c->count[o]; i++, p += 3)
                for (int ch = 0; ch < 3; ch++)
                    acc[ch] += (int64_t)p[ch] * k[i];
            for (int ch = 0; ch < 3; ch++)
                dst[o * 3 + ch] = clip8(acc[ch]);
        }
    }
}

/* Vertical pass over rows of `row` bytes: output row o mixes input rows first[o]...
 * Whole rows are accumulated at once (acc holds `row` sums) to stay cache friendly. */
static void resample_columns(const uint8_t *in, size_t row, uint8_t *out, int oh,
                             const resample_coeffs *c, int64_t *acc) {
    for (int o = 0; o < oh; o++) {
        const int32_t *k = &c->kk[(size_t)o * c->ksize];
        for (size_t j = 0; j < row; j++)
            acc[j] = 1 << (PRECISION_BITS - 1);
        for (int i = 0; i < c->count[o]; i++) {
            const uint8_t *src = in + (size_t)(c->first[o] + i) * row;
            for (size_t j = 0; j < row; j++)
                acc[j] += (int64_t)src[j] * k[i];
        }
        uint8_t *dst = out + (size_t)o * row;
        for (size_t j = 0; j < row; j++)
            dst[j] = clip8(acc[j]);
    }
}

/* Horizontal pass: (w x h) -> (ow x h), into a new buffer. */
static clh_status pass_horizontal(const uint8_t *in, int w, int h, int ow, uint8_t **out) {
    resample_coeffs c;
    CLH_TRY(compute_coeffs(w, ow, &c));
    *out = malloc((size_t)ow * 3 * (size_t)h);
    if (*out)
        resample_rows(in, w, h, *out, ow, &c);
    free_coeffs(&c);
    if (!*out)
        return clh_fail(NULL, CLH_ERR_OUT_OF_MEMORY, "clh_image_resize: out of host memory");
    return CLH_OK;
}

/* Vertical pass: (w x h) -> (w x oh), into a new buffer. */
static clh_status pass_vertical(const uint8_t *in, int w, int h, int oh, uint8_t **out) {
    size_t row = (size_t)w * 3;
    resample_coeffs c;
    CLH_TRY(compute_coeffs(h, oh, &c));
    int64_t *acc = malloc(row * sizeof *acc);
    *out = acc ? malloc(row * (size_t)oh) : NULL;
    if (*out)
        resample_columns(in, row, *out, oh, &c, acc);
    free(acc);
    free_coeffs(&c);
    if (!*out)
        return clh_fail(NULL, CLH_ERR_OUT_OF_MEMORY, "clh_image_resize: out of host memory");
    return CLH_OK;
}

/* Resize 8-bit RGB (w x h) -> (ow x oh); *out is malloc'd. Each pass rounds to 8 bits,
 * so the pass order changes results. Pillow < 13 always went horizontal first; Pillow 13
 * (PR #9549) goes vertical first when the height shrinks by more than twice as many
 * pixels as the width does. We follow Pillow 13, checked against it on 250 random size
 * pairs; older Pillow differs from us only in that case. */
static clh_status resize_rgb8(const uint8_t *in, int w, int h, int ow, int oh, uint8_t **out) {
    *out = NULL;
    int vertical_first = oh < h && (long long)(h - oh) > 2LL * (w - ow);
    uint8_t *owned = NULL; /* result of the latest pass */
    int cw = w, ch = h;    /* current size */
    for (int pass = 0; pass < 2; pass++) {
        int vertical = (pass == 0) == vertical_first;
        const uint8_t *src = owned ? owned : in;
        uint8_t *next = NULL;
        clh_status st;
        if (vertical && ch != oh) {
            st = pass_vertical(src, cw, ch, oh, &next);
            ch = oh;
        } else if (!vertical && cw != ow) {
            st = pass_horizontal(src, cw, ch, ow, &next);
            cw = ow;
        } else {
            continue; /* Pillow skips a pass whose size does not change */
        }
        free(owned);
        if (st != CLH_OK)
            return st;
        owned = next;
    }
    if (!owned) {
        size_t bytes = (size_t)w * 3 * (size_t)h;
        owned = malloc(bytes);
        if (!owned)
            return clh_fail(NULL, CLH_ERR_OUT_OF_MEMORY, "clh_image_resize: out of host memory");
        memcpy(owned, in, bytes);
    }
    *out = owned;
    return CLH_OK;
}

/* Float image -> 8-bit, rounding and clamping (Pillow resizes 8-bit images). */
static uint8_t *image_to_rgb8(const clh_image *img) {
    size_t n = (size_t)img->width * (size_t)img->height * 3;
    uint8_t *rgb = malloc(n);
    if (!rgb)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        float v = img->data[i];
        rgb[i] = !(v > 0.0f) ? 0 : v >= 255.0f ? 255 : (uint8_t)lrintf(v);
    }
    return rgb;
}

clh_status clh_image_resize(const clh_image *in, int width, int height, clh_image *out) {
    if (!out)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "clh_image_resize: out is NULL");
    memset(out, 0, sizeof *out);
    CLH_TRY(check_image(in, "clh_image_resize"));
    if (width <= 0 || height <= 0 || width > MAX_IMAGE_SIDE || height > MAX_IMAGE_SIDE)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "clh_image_resize: bad target size %dx%d",
                        width, height);
    uint8_t *rgb = image_to_rgb8(in);
    if (!rgb)
        return clh_fail(NULL, CLH_ERR_OUT_OF_MEMORY, "clh_image_resize: out of host memory");
    uint8_t *resized = NULL;
    clh_status st = resize_rgb8(rgb, in->width, in->height, width, height, &resized);
    free(rgb);
    if (st != CLH_OK)
        return st;
    st = clh_image_from_rgb8(resized, width, height, out);
    free(resized);
    return st;
}

/* ------------------------------------------------------------------ CLIP preprocessing */

/* HF CLIPImageProcessor / torchvision Resize(int): the short side becomes `size`, the long
 * side int(size * long / short) (truncated, computed in double like Python). */
static void shortest_side_size(int w, int h, int size, int *ow, int *oh) {
    if (w <= h) {
        *ow = size;
        *oh = (int)((double)size * h / w);
    } else {
        *oh = size;
        *ow = (int)((double)size * w / h);
    }
}

/* (x - mean) / std into CHW. */
static void normalize_chw(const clh_image *img, float *out) {
    size_t plane = (size_t)img->width * (size_t)img->height;
    for (int ch = 0; ch < 3; ch++) {
        float mean = CLH_CLIP_MEAN[ch], std = CLH_CLIP_STD[ch];
        for (size_t i = 0; i < plane; i++)
            out[ch * plane + i] = (img->data[i * 3 + ch] - mean) / std;
    }
}

clh_status clh_image_preprocess(const clh_image *in, int size, clh_preprocess_mode mode,
                                float *out) {
    CLH_TRY(check_image(in, "clh_image_preprocess"));
    if (!out || size <= 0 || size > MAX_IMAGE_SIDE)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT,
                        "clh_image_preprocess: out is NULL or bad size %d", size);
    if (mode != CLH_PREPROCESS_CENTER_CROP && mode != CLH_PREPROCESS_RESIZE)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "clh_image_preprocess: unknown mode %d",
                        (int)mode);
    clh_image resized, cropped;
    if (mode == CLH_PREPROCESS_RESIZE) {
        CLH_TRY(clh_image_resize(in, size, size, &resized));
        normalize_chw(&resized, out);
        clh_image_free(&resized);
        return CLH_OK;
    }
    int rw, rh;
    shortest_side_size(in->width, in->height, size, &rw, &rh);
    CLH_TRY(clh_image_resize(in, rw, rh, &resized));
    /* HF's center_crop offsets are floor((dim - size) / 2). torchvision's CenterCrop
     * rounds half to even instead; the two differ by one pixel when dim - size is
     * 3 mod 4. We follow HF (the numerical reference of this library). */
    clh_status st =
        clh_image_crop(&resized, (rw - size) / 2, (rh - size) / 2, size, size, &cropped);
    clh_image_free(&resized);
    CLH_TRY(st);
    normalize_chw(&cropped, out);
    clh_image_free(&cropped);
    return CLH_OK;
}
