/* Segmentation datasets: folder layouts, label PNG decoding (raw, ADE-150, VOC colours)
 * and sample reading. */
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>

#include "data.h"
#include "internal.h"

/* Declarations only: the stb implementation is compiled (hidden) in image.c. */
#include <stb/stb_image.h>

#define VOC_CLASSES    21 /* background + 20 */
#define VOC_VOID_COLOR 255

/* ------------------------------------------------------------------ label maps */

void clh_voc_color(int k, uint8_t rgb[3]) {
    int r = 0, g = 0, b = 0, c = k;
    for (int j = 0; j < 8; j++) {
        r |= (c & 1) << (7 - j);
        g |= ((c >> 1) & 1) << (7 - j);
        b |= ((c >> 2) & 1) << (7 - j);
        c >>= 3;
    }
    rgb[0] = (uint8_t)r;
    rgb[1] = (uint8_t)g;
    rgb[2] = (uint8_t)b;
}

clh_status clh_label_map_new(int width, int height, int32_t fill, clh_label_map *out) {
    if (!out)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "clh_label_map_new: out is NULL");
    memset(out, 0, sizeof *out);
    if (width <= 0 || height <= 0 || width > (1 << 16) || height > (1 << 16))
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "clh_label_map_new: bad size %dx%d", width,
                        height);
    size_t n = (size_t)width * (size_t)height;
    out->ids = malloc(n * sizeof *out->ids);
    if (!out->ids)
        return clh_fail(NULL, CLH_ERR_OUT_OF_MEMORY, "out of host memory for a %dx%d label map",
                        width, height);
    for (size_t i = 0; i < n; i++)
        out->ids[i] = fill;
    out->width = width;
    out->height = height;
    return CLH_OK;
}

void clh_label_map_free(clh_label_map *map) {
    if (!map)
        return;
    free(map->ids);
    memset(map, 0, sizeof *map);
}

/* Class id of a VOC colour, or -1. The last hit is cached: labels are large flat areas. */
static int voc_class_of(const uint8_t *p, int *cache_key, int *cache_id) {
    int key = (p[0] << 16) | (p[1] << 8) | p[2];
    if (key == *cache_key)
        return *cache_id;
    int id = -1;
    uint8_t rgb[3];
    for (int k = 0; k < VOC_CLASSES && id < 0; k++) {
        clh_voc_color(k, rgb);
        if (rgb[0] == p[0] && rgb[1] == p[1] && rgb[2] == p[2])
            id = k;
    }
    clh_voc_color(VOC_VOID_COLOR, rgb);
    if (id < 0 && rgb[0] == p[0] && rgb[1] == p[1] && rgb[2] == p[2])
        id = CLH_LABEL_IGNORE;
    *cache_key = key;
    *cache_id = id;
    return id;
}

static clh_status decode_voc(const char *path, const uint8_t *px, size_t n, int width,
                             int background, int32_t *ids) {
    int cache_key = -1, cache_id = -1;
    for (size_t i = 0; i < n; i++) {
        const uint8_t *p = px + 3 * i;
        int k = voc_class_of(p, &cache_key, &cache_id);
        if (k < 0)
            return clh_fail(NULL, CLH_ERR_FORMAT,
                            "label '%s': colour (%d,%d,%d) at x=%d y=%d is not a PASCAL VOC "
                            "class colour",
                            path, p[0], p[1], p[2], (int)(i % (size_t)width),
                            (int)(i / (size_t)width));
        if (k == CLH_LABEL_IGNORE)
            ids[i] = CLH_LABEL_IGNORE;
        else if (k == 0)
            ids[i] = background ? 20 : CLH_LABEL_IGNORE;
        else
            ids[i] = k - 1;
    }
    return CLH_OK;
}

/* Gray values from 1- or 3-channel pixels; RGB must have R = G = B. */
static clh_status decode_gray(const char *path, const uint8_t *px, int channels, size_t n,
                              int width, int ade, int32_t *ids) {
    for (size_t i = 0; i < n; i++) {
        const uint8_t *p = px + (size_t)channels * i;
        if (channels == 3 && (p[0] != p[1] || p[0] != p[2]))
            return clh_fail(NULL, CLH_ERR_FORMAT,
                            "label '%s': colour (%d,%d,%d) at x=%d y=%d in a gray-id label "
                            "(use the VOC colour mode for colour-coded labels)",
                            path, p[0], p[1], p[2], (int)(i % (size_t)width),
                            (int)(i / (size_t)width));
        int v = p[0];
        ids[i] = ade ? (v == 0 ? CLH_LABEL_IGNORE : v - 1) : v;
    }
    return CLH_OK;
}

clh_status clh_label_read(const char *path, const clh_label_options *opt, clh_label_map *out) {
    if (!out)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "clh_label_read: out is NULL");
    memset(out, 0, sizeof *out);
    if (!path)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "clh_label_read: path is NULL");
    clh_label_options def = {CLH_LABELS_RAW, 0};
    if (!opt)
        opt = &def;
    if (opt->mode != CLH_LABELS_RAW && opt->mode != CLH_LABELS_ADE150 &&
        opt->mode != CLH_LABELS_VOC_RGB)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "clh_label_read('%s'): unknown mode %d",
                        path, (int)opt->mode);
    FILE *fp = fopen(path, "rb");
    if (!fp)
        return clh_fail(NULL, CLH_ERR_IO, "cannot open label '%s': %s", path, strerror(errno));
    int w, h, comp;
    if (!stbi_info_from_file(fp, &w, &h, &comp)) {
        fclose(fp);
        return clh_fail(NULL, CLH_ERR_FORMAT, "cannot decode label '%s': %s", path,
                        stbi_failure_reason());
    }
    if (stbi_is_16_bit_from_file(fp)) {
        fclose(fp);
        return clh_fail(NULL, CLH_ERR_UNSUPPORTED, "label '%s' is a 16-bit image (only 8-bit)",
                        path);
    }
    int channels = (comp <= 2 && opt->mode != CLH_LABELS_VOC_RGB) ? 1 : 3;
    uint8_t *px = stbi_load_from_file(fp, &w, &h, &comp, channels);
    fclose(fp);
    if (!px)
        return clh_fail(NULL, CLH_ERR_FORMAT, "cannot decode label '%s': %s", path,
                        stbi_failure_reason());
    clh_status st = clh_label_map_new(w, h, 0, out);
    if (st == CLH_OK) {
        size_t n = (size_t)w * (size_t)h;
        if (opt->mode == CLH_LABELS_VOC_RGB)
            st = decode_voc(path, px, n, w, opt->voc_background, out->ids);
        else
            st = decode_gray(path, px, channels, n, w, opt->mode == CLH_LABELS_ADE150, out->ids);
    }
    stbi_image_free(px);
    if (st != CLH_OK)
        clh_label_map_free(out);
    return st;
}

clh_status clh_label_write_png(const char *path, const int32_t *ids, int width, int height) {
    if (!path || !ids || width <= 0 || height <= 0)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT,
                        "clh_label_write_png: need a path, ids and a positive size (got %dx%d)",
                        width, height);
    size_t n = (size_t)width * (size_t)height;
    uint8_t *px = malloc(n);
    if (!px)
        return clh_fail(NULL, CLH_ERR_OUT_OF_MEMORY, "clh_label_write_png: out of host memory");
    for (size_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] > 255) {
            int v = ids[i];
            free(px);
            return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT,
                            "clh_label_write_png('%s'): id %d at index %zu does not fit 8 bits",
                            path, v, i);
        }
        px[i] = (uint8_t)ids[i];
    }
    clh_status st = clh_png_write(path, px, width, height, 1);
    free(px);
    return st;
}

/* ------------------------------------------------------------------ datasets */

typedef struct sample {
    char *name; /* image file name */
    char *image;
    char *label;
} sample;

struct clh_dataset {
    clh_label_options labels;
    size_t count;
    sample *samples;
};

static int is_dir(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

static int is_file(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

static char *join(const char *a, const char *b) {
    size_t n = strlen(a) + strlen(b) + 2;
    char *s = malloc(n);
    if (s)
        snprintf(s, n, "%s/%s", a, b);
    return s;
}

static int has_suffix(const char *s, const char *suffix) {
    size_t n = strlen(s), m = strlen(suffix);
    return n > m && strcasecmp(s + n - m, suffix) == 0;
}

static int is_image_name(const char *name) {
    return name[0] != '.' &&
           (has_suffix(name, ".jpg") || has_suffix(name, ".jpeg") || has_suffix(name, ".png"));
}

static int cmp_names(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Sorted names in dir accepted by keep (regular files only). */
static clh_status list_dir(const char *dir, int (*keep)(const char *), char ***names,
                           size_t *count) {
    *names = NULL;
    *count = 0;
    DIR *d = opendir(dir);
    if (!d)
        return clh_fail(NULL, CLH_ERR_IO, "cannot open folder '%s': %s", dir, strerror(errno));
    size_t cap = 0;
    clh_status st = CLH_OK;
    for (struct dirent *e; st == CLH_OK && (e = readdir(d));) {
        if (!keep(e->d_name))
            continue;
        char *full = join(dir, e->d_name);
        int regular = full && is_file(full);
        free(full);
        if (!regular)
            continue;
        if (*count == cap) {
            cap = cap ? 2 * cap : 64;
            char **grown = realloc(*names, cap * sizeof *grown);
            if (!grown) {
                st = clh_fail(NULL, CLH_ERR_OUT_OF_MEMORY, "listing '%s': out of memory", dir);
                break;
            }
            *names = grown;
        }
        if (!((*names)[*count] = strdup(e->d_name)))
            st = clh_fail(NULL, CLH_ERR_OUT_OF_MEMORY, "listing '%s': out of memory", dir);
        else
            (*count)++;
    }
    closedir(d);
    if (st == CLH_OK && *count)
        qsort(*names, *count, sizeof **names, cmp_names);
    return st;
}

static void free_names(char **names, size_t n) {
    for (size_t i = 0; i < n; i++)
        free(names[i]);
    free(names);
}

void clh_dataset_free(clh_dataset *ds) {
    if (!ds)
        return;
    for (size_t i = 0; i < ds->count; i++) {
        free(ds->samples[i].name);
        free(ds->samples[i].image);
        free(ds->samples[i].label);
    }
    free(ds->samples);
    free(ds);
}

/* Label file of an image: <label_dir>/<stem><label_suffix>. */
static char *label_path_for(const char *label_dir, const char *image_name, size_t strip,
                            const char *label_suffix) {
    size_t stem = strlen(image_name) - strip;
    size_t n = strlen(label_dir) + stem + strlen(label_suffix) + 2;
    char *s = malloc(n);
    if (s)
        snprintf(s, n, "%s/%.*s%s", label_dir, (int)stem, image_name, label_suffix);
    return s;
}

static size_t extension_length(const char *name) {
    const char *dot = strrchr(name, '.');
    return dot ? strlen(dot) : 0;
}

static int is_voc_pair_image(const char *name) {
    return has_suffix(name, "_image.png");
}

/* Fill ds from the image names: label = label_dir/<name minus strip chars><suffix>. */
static clh_status add_samples(clh_dataset *ds, const char *image_dir, const char *label_dir,
                              char **names, size_t count, int voc_pairs) {
    ds->samples = calloc(count, sizeof *ds->samples);
    if (!ds->samples)
        return clh_fail(NULL, CLH_ERR_OUT_OF_MEMORY, "dataset: out of host memory");
    for (size_t i = 0; i < count; i++) {
        sample *s = &ds->samples[ds->count++];
        size_t strip = voc_pairs ? strlen("_image.png") : extension_length(names[i]);
        s->name = strdup(names[i]);
        s->image = join(image_dir, names[i]);
        s->label = label_path_for(label_dir, names[i], strip, voc_pairs ? "_target.png" : ".png");
        if (!s->name || !s->image || !s->label)
            return clh_fail(NULL, CLH_ERR_OUT_OF_MEMORY, "dataset: out of host memory");
        if (!is_file(s->label))
            return clh_fail(NULL, CLH_ERR_NOT_FOUND, "dataset: image '%s' has no label file '%s'",
                            s->image, s->label);
    }
    return CLH_OK;
}

/* First existing folder among root/<cands[i]>[/split]; NULL when none (paths malloc'd). */
static char *first_dir(const char *root, const char *const *cands, const char *split) {
    for (int i = 0; cands[i]; i++) {
        char *d = join(root, cands[i]);
        if (d && split) {
            char *ds = join(d, split);
            free(d);
            d = ds;
        }
        if (d && is_dir(d))
            return d;
        free(d);
    }
    return NULL;
}

static clh_status open_folders(clh_dataset *ds, const char *root, const char *split) {
    static const char *const image_dirs[] = {"images", NULL};
    static const char *const label_dirs_split[] = {"annotations_detectron2", "annotations", NULL};
    static const char *const label_dirs_plain[] = {"labels", "annotations", NULL};
    char *image_dir = first_dir(root, image_dirs, split);
    char *label_dir = NULL;
    char **names = NULL;
    size_t count = 0;
    clh_status st = CLH_OK;
    int voc_pairs = 0;
    if (image_dir) {
        label_dir = first_dir(root, split ? label_dirs_split : label_dirs_plain, split);
        if (!label_dir)
            st = clh_fail(
                NULL, CLH_ERR_NOT_FOUND, "dataset '%s': no label folder (%s%s) next to '%s'", root,
                split ? "annotations_detectron2/ or annotations/" : "labels/ or annotations/",
                split ? split : "", image_dir);
        else
            st = list_dir(image_dir, is_image_name, &names, &count);
    } else if (split) {
        st = clh_fail(NULL, CLH_ERR_NOT_FOUND, "dataset '%s': no folder images/%s", root, split);
    } else {
        /* VOC sample layout: N_image.png + N_target.png side by side. */
        voc_pairs = 1;
        if (!(image_dir = strdup(root)) || !(label_dir = strdup(root)))
            st = clh_fail(NULL, CLH_ERR_OUT_OF_MEMORY, "dataset: out of host memory");
        else
            st = list_dir(root, is_voc_pair_image, &names, &count);
    }
    if (st == CLH_OK && count == 0)
        st = clh_fail(NULL, CLH_ERR_NOT_FOUND,
                      voc_pairs ? "dataset '%s': no images/ folder and no *_image.png files"
                      : split   ? "dataset '%s': no .jpg/.jpeg/.png images in '%s'"
                                : "dataset '%s': no .jpg/.jpeg/.png images in '%s' (split layouts "
                                  "need the split name)",
                      root, image_dir);
    if (st == CLH_OK)
        st = add_samples(ds, image_dir, label_dir, names, count, voc_pairs);
    free_names(names, count);
    free(image_dir);
    free(label_dir);
    return st;
}

clh_status clh_dataset_open(const char *root, const clh_dataset_options *opt, clh_dataset **out) {
    if (!out)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "clh_dataset_open: out is NULL");
    *out = NULL;
    if (!root)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "clh_dataset_open: root is NULL");
    clh_dataset_options def = {NULL, {CLH_LABELS_RAW, 0}};
    if (!opt)
        opt = &def;
    if (opt->labels.mode != CLH_LABELS_RAW && opt->labels.mode != CLH_LABELS_ADE150 &&
        opt->labels.mode != CLH_LABELS_VOC_RGB)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT,
                        "clh_dataset_open('%s'): unknown label mode %d", root,
                        (int)opt->labels.mode);
    if (!is_dir(root))
        return clh_fail(NULL, CLH_ERR_IO, "dataset folder '%s' does not exist", root);
    clh_dataset *ds = calloc(1, sizeof *ds);
    if (!ds)
        return clh_fail(NULL, CLH_ERR_OUT_OF_MEMORY, "dataset: out of host memory");
    ds->labels = opt->labels;
    const char *split = opt->split && opt->split[0] ? opt->split : NULL;
    clh_status st = open_folders(ds, root, split);
    if (st != CLH_OK) {
        clh_dataset_free(ds);
        return st;
    }
    *out = ds;
    return CLH_OK;
}

size_t clh_dataset_count(const clh_dataset *ds) {
    return ds ? ds->count : 0;
}

const char *clh_dataset_name(const clh_dataset *ds, size_t i) {
    return ds && i < ds->count ? ds->samples[i].name : NULL;
}

const char *clh_dataset_image_path(const clh_dataset *ds, size_t i) {
    return ds && i < ds->count ? ds->samples[i].image : NULL;
}

const char *clh_dataset_label_path(const clh_dataset *ds, size_t i) {
    return ds && i < ds->count ? ds->samples[i].label : NULL;
}

static clh_status check_index(const clh_dataset *ds, size_t i, const char *fn) {
    if (!ds)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "%s: dataset is NULL", fn);
    if (i >= ds->count)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "%s: index %zu out of range (%zu samples)",
                        fn, i, ds->count);
    return CLH_OK;
}

static clh_status read_label_checked(const clh_dataset *ds, size_t i, int width, int height,
                                     clh_label_map *lab) {
    const sample *s = &ds->samples[i];
    CLH_TRY(clh_label_read(s->label, &ds->labels, lab));
    if (lab->width != width || lab->height != height) {
        clh_status st =
            clh_fail(NULL, CLH_ERR_FORMAT, "label '%s' is %dx%d but image '%s' is %dx%d", s->label,
                     lab->width, lab->height, s->image, width, height);
        clh_label_map_free(lab);
        return st;
    }
    return CLH_OK;
}

clh_status clh_dataset_read(const clh_dataset *ds, size_t i, clh_image *img, clh_label_map *lab) {
    if (img)
        memset(img, 0, sizeof *img);
    if (lab)
        memset(lab, 0, sizeof *lab);
    CLH_TRY(check_index(ds, i, "clh_dataset_read"));
    clh_rgb8 rgb;
    CLH_TRY(clh_dataset_read_rgb8(ds, i, &rgb, lab));
    clh_status st = CLH_OK;
    if (img) {
        st = clh_image_from_rgb8(rgb.px, rgb.width, rgb.height, img);
        if (st != CLH_OK && lab)
            clh_label_map_free(lab);
    }
    clh_rgb8_free(&rgb);
    return st;
}

clh_status clh_rgb8_load(const char *path, clh_rgb8 *out) {
    memset(out, 0, sizeof *out);
    FILE *fp = fopen(path, "rb");
    if (!fp)
        return clh_fail(NULL, CLH_ERR_IO, "cannot open image '%s': %s", path, strerror(errno));
    int w, h, comp;
    uint8_t *px = stbi_load_from_file(fp, &w, &h, &comp, 3);
    fclose(fp);
    if (!px)
        return clh_fail(NULL, CLH_ERR_FORMAT, "cannot decode image '%s': %s", path,
                        stbi_failure_reason());
    out->width = w;
    out->height = h;
    size_t n = (size_t)w * (size_t)h * 3;
    /* Own the pixels with malloc so clh_rgb8_free does not depend on stb's allocator. */
    out->px = malloc(n);
    if (!out->px) {
        stbi_image_free(px);
        memset(out, 0, sizeof *out);
        return clh_fail(NULL, CLH_ERR_OUT_OF_MEMORY, "image '%s': out of host memory", path);
    }
    memcpy(out->px, px, n);
    stbi_image_free(px);
    return CLH_OK;
}

clh_status clh_dataset_read_rgb8(const clh_dataset *ds, size_t i, clh_rgb8 *img,
                                 clh_label_map *lab) {
    if (!img)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "clh_dataset_read_rgb8: img is NULL");
    memset(img, 0, sizeof *img);
    if (lab)
        memset(lab, 0, sizeof *lab);
    CLH_TRY(check_index(ds, i, "clh_dataset_read_rgb8"));
    CLH_TRY(clh_rgb8_load(ds->samples[i].image, img));
    if (lab) {
        clh_status st = read_label_checked(ds, i, img->width, img->height, lab);
        if (st != CLH_OK) {
            clh_rgb8_free(img);
            return st;
        }
    }
    return CLH_OK;
}
