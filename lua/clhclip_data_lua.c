/*
 * Lua binding of datasets, the augmenting batch loader, label maps, segmentation
 * metrics and the procedural demo dataset (clhclip/data.h). Only type and error
 * conversion happens here.
 *
 * Index conventions: dataset samples and batch samples are 1-based (Lua style); global
 * loader steps are 0-based (as in the C API and the training step counter); label
 * coordinates are 0-based like Image:pixel.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "binding.h"
#include "data.h"

#define DATASET_MT   "clhclip.Dataset"
#define LOADER_MT    "clhclip.Loader"
#define BATCH_MT     "clhclip.Batch"
#define LABEL_MT     "clhclip.Label"
#define CONFUSION_MT "clhclip.Confusion"
#define IMAGE_MT     "clhclip.Image" /* defined in clhclip_lua.c; its userdata is a clh_image */

/* ------------------------------------------------------------------ options */

/* Field as a string (NULL when absent); the string stays valid while the table lives. */
static const char *field_str(lua_State *L, int idx, const char *key) {
    if (lua_isnoneornil(L, idx))
        return NULL;
    const char *s = NULL;
    int t = lua_getfield(L, idx, key);
    if (t == LUA_TSTRING)
        s = lua_tostring(L, -1);
    else if (t != LUA_TNIL)
        luaL_error(L, "option '%s' must be a string (got %s)", key, luaL_typename(L, -1));
    lua_pop(L, 1);
    return s;
}

/* "raw" | "ade150" | "voc20" | "voc20b" */
static clh_label_options label_mode(lua_State *L, const char *name) {
    clh_label_options o = {CLH_LABELS_RAW, 0};
    if (!name || strcmp(name, "raw") == 0)
        return o;
    if (strcmp(name, "ade150") == 0)
        o.mode = CLH_LABELS_ADE150;
    else if (strcmp(name, "voc20") == 0 || strcmp(name, "voc20b") == 0) {
        o.mode = CLH_LABELS_VOC_RGB;
        o.voc_background = strcmp(name, "voc20b") == 0;
    } else
        luaL_error(L, "unknown label mode '%s' (raw, ade150, voc20, voc20b)", name);
    return o;
}

/* ------------------------------------------------------------------ labels */

clh_label_map *clhl_push_label(lua_State *L) {
    clh_label_map *m = lua_newuserdatauv(L, sizeof *m, 0);
    memset(m, 0, sizeof *m);
    luaL_setmetatable(L, LABEL_MT);
    return m;
}

static clh_label_map *check_label(lua_State *L, int idx) {
    clh_label_map *m = luaL_checkudata(L, idx, LABEL_MT);
    if (!m->ids)
        luaL_error(L, "label map was freed");
    return m;
}

static int label_free(lua_State *L) {
    clh_label_map_free(luaL_checkudata(L, 1, LABEL_MT));
    return 0;
}

/* label:get(x, y) with 0-based coordinates */
static int label_get(lua_State *L) {
    clh_label_map *m = check_label(L, 1);
    lua_Integer x = luaL_checkinteger(L, 2), y = luaL_checkinteger(L, 3);
    luaL_argcheck(L, x >= 0 && x < m->width, 2, "x out of range");
    luaL_argcheck(L, y >= 0 && y < m->height, 3, "y out of range");
    lua_pushinteger(L, m->ids[(size_t)y * m->width + x]);
    return 1;
}

/* label:totable() -> flat row-major array of ids */
static int label_totable(lua_State *L) {
    clh_label_map *m = check_label(L, 1);
    int n = m->width * m->height;
    lua_createtable(L, n, 0);
    for (int i = 0; i < n; i++) {
        lua_pushinteger(L, m->ids[i]);
        lua_rawseti(L, -2, i + 1);
    }
    return 1;
}

/* label:bytes() -> the ids as a string of native int32 */
static int label_bytes(lua_State *L) {
    clh_label_map *m = check_label(L, 1);
    lua_pushlstring(L, (const char *)m->ids, (size_t)m->width * m->height * sizeof *m->ids);
    return 1;
}

/* label:counts() -> {[id] = pixels} */
static int label_counts(lua_State *L) {
    clh_label_map *m = check_label(L, 1);
    lua_newtable(L);
    for (int i = 0; i < m->width * m->height; i++) {
        lua_rawgeti(L, -1, m->ids[i]);
        lua_Integer c = lua_tointeger(L, -1);
        lua_pop(L, 1);
        lua_pushinteger(L, c + 1);
        lua_rawseti(L, -2, m->ids[i]);
    }
    return 1;
}

static int label_save_png(lua_State *L) {
    clh_label_map *m = check_label(L, 1);
    CLHL_CHECK(L, clh_label_write_png(luaL_checkstring(L, 2), m->ids, m->width, m->height));
    return 0;
}

static int label_index(lua_State *L) {
    clh_label_map *m = luaL_checkudata(L, 1, LABEL_MT);
    const char *key = lua_tostring(L, 2);
    if (key && strcmp(key, "width") == 0) {
        lua_pushinteger(L, m->width);
        return 1;
    }
    if (key && strcmp(key, "height") == 0) {
        lua_pushinteger(L, m->height);
        return 1;
    }
    luaL_getmetatable(L, LABEL_MT);
    lua_getfield(L, -1, "methods");
    lua_getfield(L, -1, key ? key : "");
    return 1;
}

static int label_tostring(lua_State *L) {
    clh_label_map *m = luaL_checkudata(L, 1, LABEL_MT);
    lua_pushfstring(L, "clhclip.Label %dx%d", m->width, m->height);
    return 1;
}

/* Ids from a Label or a flat table; *owned tells whether to free() the result. */
static const int32_t *ids_arg(lua_State *L, int idx, size_t *n, int32_t **owned) {
    *owned = NULL;
    if (lua_type(L, idx) == LUA_TUSERDATA) {
        clh_label_map *m = check_label(L, idx);
        *n = (size_t)m->width * m->height;
        return m->ids;
    }
    luaL_checktype(L, idx, LUA_TTABLE);
    *n = lua_rawlen(L, idx);
    int32_t *v = malloc((*n ? *n : 1) * sizeof *v);
    if (!v)
        luaL_error(L, "out of memory");
    for (size_t i = 0; i < *n; i++) {
        lua_rawgeti(L, idx, (lua_Integer)i + 1);
        int ok;
        lua_Integer x = lua_tointegerx(L, -1, &ok);
        lua_pop(L, 1);
        if (!ok || x < INT32_MIN || x > INT32_MAX) {
            free(v);
            luaL_error(L, "argument #%d: entry %d is not a 32-bit integer", idx, (int)i + 1);
        }
        v[i] = (int32_t)x;
    }
    *owned = v;
    return v;
}

/* clh.read_label(path [, mode]) -> Label */
static int l_read_label(lua_State *L) {
    const char *path = luaL_checkstring(L, 1);
    clh_label_options o = label_mode(L, luaL_optstring(L, 2, "raw"));
    clh_label_map *m = clhl_push_label(L);
    CLHL_CHECK(L, clh_label_read(path, &o, m));
    return 1;
}

/* clh.write_label_png(path, ids, width, height); ids = Label or flat table */
static int l_write_label_png(lua_State *L) {
    const char *path = luaL_checkstring(L, 1);
    lua_Integer w = luaL_checkinteger(L, 3), h = luaL_checkinteger(L, 4);
    luaL_argcheck(L, w > 0 && w <= 65536, 3, "width must be 1..65536");
    luaL_argcheck(L, h > 0 && h <= 65536, 4, "height must be 1..65536");
    size_t n;
    int32_t *owned;
    const int32_t *ids = ids_arg(L, 2, &n, &owned);
    if (n != (size_t)(w * h)) {
        free(owned);
        return luaL_error(L, "write_label_png: %dx%d needs %d ids, got %d", (int)w, (int)h,
                          (int)(w * h), (int)n);
    }
    clh_status st = clh_label_write_png(path, ids, (int)w, (int)h);
    free(owned);
    CLHL_CHECK(L, st);
    return 0;
}

/* ------------------------------------------------------------------ datasets */

typedef struct DatasetBox {
    clh_dataset *ds;
} DatasetBox;

static clh_dataset *check_dataset(lua_State *L, int idx) {
    DatasetBox *b = luaL_checkudata(L, idx, DATASET_MT);
    if (!b->ds)
        luaL_error(L, "dataset was freed");
    return b->ds;
}

/* clh.dataset(root, {split=, labels=}) -> Dataset */
static int l_dataset(lua_State *L) {
    const char *root = luaL_checkstring(L, 1);
    clhl_check_opt_table(L, 2);
    clh_dataset_options o = {field_str(L, 2, "split"), label_mode(L, field_str(L, 2, "labels"))};
    DatasetBox *b = lua_newuserdatauv(L, sizeof *b, 0);
    b->ds = NULL;
    luaL_setmetatable(L, DATASET_MT);
    CLHL_CHECK(L, clh_dataset_open(root, &o, &b->ds));
    return 1;
}

static int ds_free(lua_State *L) {
    DatasetBox *b = luaL_checkudata(L, 1, DATASET_MT);
    clh_dataset_free(b->ds);
    b->ds = NULL;
    return 0;
}

static int ds_count(lua_State *L) {
    lua_pushinteger(L, (lua_Integer)clh_dataset_count(check_dataset(L, 1)));
    return 1;
}

static size_t sample_arg(lua_State *L, int idx, const clh_dataset *ds) {
    lua_Integer i = luaL_checkinteger(L, idx);
    luaL_argcheck(L, i >= 1 && (size_t)i <= clh_dataset_count(ds), idx,
                  "sample index out of range (1-based)");
    return (size_t)(i - 1);
}

static int ds_name(lua_State *L) {
    clh_dataset *ds = check_dataset(L, 1);
    lua_pushstring(L, clh_dataset_name(ds, sample_arg(L, 2, ds)));
    return 1;
}

/* ds:paths(i) -> image path, label path */
static int ds_paths(lua_State *L) {
    clh_dataset *ds = check_dataset(L, 1);
    size_t i = sample_arg(L, 2, ds);
    lua_pushstring(L, clh_dataset_image_path(ds, i));
    lua_pushstring(L, clh_dataset_label_path(ds, i));
    return 2;
}

/* ds:read(i) -> Image, Label. The Image is the clhclip.Image userdata of the main binding,
 * whose block is a bare clh_image. */
static int ds_read(lua_State *L) {
    clh_dataset *ds = check_dataset(L, 1);
    size_t i = sample_arg(L, 2, ds);
    clh_image *img = lua_newuserdatauv(L, sizeof *img, 0);
    memset(img, 0, sizeof *img);
    luaL_setmetatable(L, IMAGE_MT);
    clh_label_map *lab = clhl_push_label(L);
    CLHL_CHECK(L, clh_dataset_read(ds, i, img, lab));
    return 2;
}

/* ------------------------------------------------------------------ loader and batches */

typedef struct LoaderBox {
    clh_loader *ld;
} LoaderBox;

static clh_loader *check_loader(lua_State *L, int idx) {
    LoaderBox *b = luaL_checkudata(L, idx, LOADER_MT);
    if (!b->ld)
        luaL_error(L, "loader was freed");
    return b->ld;
}

/* ds:loader{batch=, crop=, max_size=, seed=, threads=, prefetch=, augment=, shuffle=,
 * drop_last=} -> Loader (keeps the dataset alive) */
static int ds_loader(lua_State *L) {
    clh_dataset *ds = check_dataset(L, 1);
    clhl_check_opt_table(L, 2);
    clh_loader_options o = {0};
    o.batch = (int)clhl_opt_int(L, 2, "batch", 1);
    o.crop = (int)clhl_opt_int(L, 2, "crop", 384);
    o.max_size = (int)clhl_opt_int(L, 2, "max_size", 0);
    o.seed = (uint64_t)clhl_opt_int(L, 2, "seed", 0);
    o.threads = (int)clhl_opt_int(L, 2, "threads", 0);
    o.prefetch = (int)clhl_opt_int(L, 2, "prefetch", 0);
    o.augment = clhl_opt_bool(L, 2, "augment", 1);
    o.shuffle = clhl_opt_bool(L, 2, "shuffle", 1);
    o.drop_last = clhl_opt_bool(L, 2, "drop_last", 1);
    LoaderBox *b = lua_newuserdatauv(L, sizeof *b, 1);
    b->ld = NULL;
    luaL_setmetatable(L, LOADER_MT);
    lua_pushvalue(L, 1);
    lua_setiuservalue(L, -2, 1);
    CLHL_CHECK(L, clh_loader_new(ds, &o, &b->ld));
    return 1;
}

static int loader_free(lua_State *L) {
    LoaderBox *b = luaL_checkudata(L, 1, LOADER_MT);
    clh_loader_free(b->ld);
    b->ld = NULL;
    return 0;
}

typedef struct BatchBox {
    clh_batch *b;
} BatchBox;

static clh_batch *check_batch(lua_State *L, int idx) {
    BatchBox *b = luaL_checkudata(L, idx, BATCH_MT);
    if (!b->b)
        luaL_error(L, "batch was freed");
    return b->b;
}

const float *clhl_batch_pixels(lua_State *L, int idx, int *size, int *crop) {
    clh_batch *b = check_batch(L, idx);
    *size = b->size;
    *crop = b->crop;
    return b->pixels;
}

const int32_t *clhl_batch_labels(lua_State *L, int idx, int *size, int *crop) {
    clh_batch *b = check_batch(L, idx);
    *size = b->size;
    *crop = b->crop;
    return b->labels;
}

/* loader:next() -> Batch (blocks) */
static int loader_next(lua_State *L) {
    clh_loader *ld = check_loader(L, 1);
    BatchBox *bb = lua_newuserdatauv(L, sizeof *bb, 0);
    bb->b = NULL;
    luaL_setmetatable(L, BATCH_MT);
    CLHL_CHECK(L, clh_loader_next(ld, &bb->b));
    return 1;
}

/* loader:seek(step): the next batch is the one of 0-based global step `step` */
static int loader_seek(lua_State *L) {
    clh_loader *ld = check_loader(L, 1);
    lua_Integer step = luaL_checkinteger(L, 2);
    CLHL_CHECK(L, clh_loader_seek(ld, (int64_t)step));
    return 0;
}

static int loader_steps_per_epoch(lua_State *L) {
    lua_pushinteger(L, (lua_Integer)clh_loader_steps_per_epoch(check_loader(L, 1)));
    return 1;
}

static int batch_free(lua_State *L) {
    BatchBox *b = luaL_checkudata(L, 1, BATCH_MT);
    clh_batch_free(b->b);
    b->b = NULL;
    return 0;
}

/* batch:pixels() -> string of native float32, [size, 3, crop, crop] */
static int batch_pixels(lua_State *L) {
    clh_batch *b = check_batch(L, 1);
    lua_pushlstring(L, (const char *)b->pixels,
                    (size_t)b->size * 3 * b->crop * b->crop * sizeof *b->pixels);
    return 1;
}

/* batch:labels() -> string of native int32, [size, crop, crop] */
static int batch_labels(lua_State *L) {
    clh_batch *b = check_batch(L, 1);
    lua_pushlstring(L, (const char *)b->labels,
                    (size_t)b->size * b->crop * b->crop * sizeof *b->labels);
    return 1;
}

static int batch_sample_arg(lua_State *L, int idx, const clh_batch *b) {
    lua_Integer j = luaL_checkinteger(L, idx);
    luaL_argcheck(L, j >= 1 && j <= b->size, idx, "batch sample out of range (1-based)");
    return (int)(j - 1);
}

/* batch:label(j) -> Label (copy) of sample j */
static int batch_label(lua_State *L) {
    clh_batch *b = check_batch(L, 1);
    int j = batch_sample_arg(L, 2, b);
    clh_label_map *m = clhl_push_label(L);
    CLHL_CHECK(L, clh_label_map_new(b->crop, b->crop, 0, m));
    size_t plane = (size_t)b->crop * b->crop;
    memcpy(m->ids, b->labels + (size_t)j * plane, plane * sizeof *m->ids);
    return 1;
}

/* batch:pixel(j, c, x, y) -> normalised value (1-based sample, 0-based c, x, y) */
static int batch_pixel(lua_State *L) {
    clh_batch *b = check_batch(L, 1);
    int j = batch_sample_arg(L, 2, b);
    lua_Integer c = luaL_checkinteger(L, 3), x = luaL_checkinteger(L, 4),
                y = luaL_checkinteger(L, 5);
    luaL_argcheck(L, c >= 0 && c < 3, 3, "channel must be 0..2");
    luaL_argcheck(L, x >= 0 && x < b->crop, 4, "x out of range");
    luaL_argcheck(L, y >= 0 && y < b->crop, 5, "y out of range");
    size_t plane = (size_t)b->crop * b->crop;
    lua_pushnumber(L, b->pixels[((size_t)j * 3 + (size_t)c) * plane + (size_t)y * b->crop + x]);
    return 1;
}

/* batch:indices() -> 1-based dataset indices */
static int batch_indices(lua_State *L) {
    clh_batch *b = check_batch(L, 1);
    lua_createtable(L, b->size, 0);
    for (int j = 0; j < b->size; j++) {
        lua_pushinteger(L, (lua_Integer)b->indices[j] + 1);
        lua_rawseti(L, -2, j + 1);
    }
    return 1;
}

static int batch_index(lua_State *L) {
    BatchBox *bb = luaL_checkudata(L, 1, BATCH_MT);
    const char *key = lua_tostring(L, 2);
    if (bb->b && key) {
        lua_Integer v = -1;
        if (strcmp(key, "size") == 0)
            v = bb->b->size;
        else if (strcmp(key, "crop") == 0)
            v = bb->b->crop;
        else if (strcmp(key, "step") == 0)
            v = bb->b->step;
        else if (strcmp(key, "epoch") == 0)
            v = bb->b->epoch;
        if (v >= 0) {
            lua_pushinteger(L, v);
            return 1;
        }
    }
    luaL_getmetatable(L, BATCH_MT);
    lua_getfield(L, -1, "methods");
    lua_getfield(L, -1, key ? key : "");
    return 1;
}

/* ------------------------------------------------------------------ metrics */

typedef struct ConfusionBox {
    clh_confusion *c;
} ConfusionBox;

static clh_confusion *check_confusion(lua_State *L, int idx) {
    ConfusionBox *b = luaL_checkudata(L, idx, CONFUSION_MT);
    if (!b->c)
        luaL_error(L, "confusion was freed");
    return b->c;
}

/* clh.confusion(n, {voc20b=}) -> Confusion */
static int l_confusion(lua_State *L) {
    lua_Integer n = luaL_checkinteger(L, 1);
    clhl_check_opt_table(L, 2);
    clh_confusion_options o = {clhl_opt_bool(L, 2, "voc20b", 0)};
    luaL_argcheck(L, n > 0 && n <= 65536, 1, "class count must be 1..65536");
    ConfusionBox *b = lua_newuserdatauv(L, sizeof *b, 0);
    b->c = NULL;
    luaL_setmetatable(L, CONFUSION_MT);
    CLHL_CHECK(L, clh_confusion_new((int)n, &o, &b->c));
    return 1;
}

static int conf_free(lua_State *L) {
    ConfusionBox *b = luaL_checkudata(L, 1, CONFUSION_MT);
    clh_confusion_free(b->c);
    b->c = NULL;
    return 0;
}

/* conf:add(pred, gt): Labels or flat tables of equal length */
static int conf_add(lua_State *L) {
    clh_confusion *c = check_confusion(L, 1);
    size_t np, ng;
    int32_t *own_p, *own_g;
    const int32_t *p = ids_arg(L, 2, &np, &own_p);
    const int32_t *g = ids_arg(L, 3, &ng, &own_g);
    clh_status st = np == ng ? clh_confusion_add(c, p, g, np) : CLH_OK;
    free(own_p);
    free(own_g);
    if (np != ng)
        return luaL_error(L, "confusion:add: %d predictions but %d ground-truth pixels", (int)np,
                          (int)ng);
    CLHL_CHECK(L, st);
    return 0;
}

static int conf_merge(lua_State *L) {
    CLHL_CHECK(L, clh_confusion_merge(check_confusion(L, 1), check_confusion(L, 2)));
    return 0;
}

/* conf:count(pred, gt) -> pixels of class gt predicted as pred (0-based class ids) */
static int conf_count(lua_State *L) {
    clh_confusion *c = check_confusion(L, 1);
    lua_pushinteger(L, (lua_Integer)clh_confusion_count(c, (int)luaL_checkinteger(L, 2),
                                                        (int)luaL_checkinteger(L, 3)));
    return 1;
}

static void push_doubles(lua_State *L, const double *v, int n) {
    lua_createtable(L, n, 0);
    for (int i = 0; i < n; i++) {
        lua_pushnumber(L, v[i]);
        lua_rawseti(L, -2, i + 1);
    }
}

/* conf:results() -> {miou=, macc=, fwiou=, pacc=, pixels=, iou={...}, acc={...}}: fractions
 * in [0, 1]; iou[k + 1] / acc[k + 1] belong to class k and are NaN without ground truth. */
static int conf_results(lua_State *L) {
    clh_seg_metrics m;
    CLHL_CHECK(L, clh_confusion_results(check_confusion(L, 1), &m));
    lua_createtable(L, 0, 7);
    lua_pushnumber(L, m.miou);
    lua_setfield(L, -2, "miou");
    lua_pushnumber(L, m.macc);
    lua_setfield(L, -2, "macc");
    lua_pushnumber(L, m.fwiou);
    lua_setfield(L, -2, "fwiou");
    lua_pushnumber(L, m.pacc);
    lua_setfield(L, -2, "pacc");
    lua_pushinteger(L, (lua_Integer)m.pixels);
    lua_setfield(L, -2, "pixels");
    push_doubles(L, m.iou, m.n);
    lua_setfield(L, -2, "iou");
    push_doubles(L, m.acc, m.n);
    lua_setfield(L, -2, "acc");
    clh_seg_metrics_free(&m);
    return 1;
}

/* ------------------------------------------------------------------ procedural */

/* clh.procedural_classes() -> class names in id order (ids are 0-based: names[id + 1]) */
static int l_procedural_classes(lua_State *L) {
    int n = clh_procedural_class_count();
    lua_createtable(L, n, 0);
    for (int k = 0; k < n; k++) {
        lua_pushstring(L, clh_procedural_class_name(k));
        lua_rawseti(L, -2, k + 1);
    }
    return 1;
}

/* clh.make_procedural_dataset{dir=, n=, size=, seed=} -> class names */
static int l_make_procedural_dataset(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    const char *dir = field_str(L, 1, "dir");
    if (!dir)
        return luaL_error(L, "make_procedural_dataset: option 'dir' is required");
    clh_procedural_options o = {(int)clhl_opt_int(L, 1, "n", 300),
                                (int)clhl_opt_int(L, 1, "size", 128),
                                (uint64_t)clhl_opt_int(L, 1, "seed", 0)};
    CLHL_CHECK(L, clh_procedural_write(dir, &o));
    return l_procedural_classes(L);
}

/* ------------------------------------------------------------------ registration */

static const luaL_Reg label_meta[] = {{"__gc", label_free},
                                      {"__close", label_free},
                                      {"__index", label_index},
                                      {"__tostring", label_tostring},
                                      {NULL, NULL}};
static const luaL_Reg label_methods[] = {{"free", label_free},
                                         {"get", label_get},
                                         {"totable", label_totable},
                                         {"bytes", label_bytes},
                                         {"counts", label_counts},
                                         {"save_png", label_save_png},
                                         {NULL, NULL}};

static const luaL_Reg ds_meta[] = {{"__gc", ds_free}, {"__close", ds_free}, {NULL, NULL}};
static const luaL_Reg ds_methods[] = {
    {"free", ds_free}, {"count", ds_count},   {"name", ds_name}, {"paths", ds_paths},
    {"read", ds_read}, {"loader", ds_loader}, {NULL, NULL}};

static const luaL_Reg loader_meta[] = {
    {"__gc", loader_free}, {"__close", loader_free}, {NULL, NULL}};
static const luaL_Reg loader_methods[] = {{"free", loader_free},
                                          {"next", loader_next},
                                          {"seek", loader_seek},
                                          {"steps_per_epoch", loader_steps_per_epoch},
                                          {NULL, NULL}};

static const luaL_Reg batch_meta[] = {
    {"__gc", batch_free}, {"__close", batch_free}, {"__index", batch_index}, {NULL, NULL}};
static const luaL_Reg batch_methods[] = {{"free", batch_free},
                                         {"pixels", batch_pixels},
                                         {"labels", batch_labels},
                                         {"label", batch_label},
                                         {"pixel", batch_pixel},
                                         {"indices", batch_indices},
                                         {NULL, NULL}};

static const luaL_Reg conf_meta[] = {{"__gc", conf_free}, {"__close", conf_free}, {NULL, NULL}};
static const luaL_Reg conf_methods[] = {{"free", conf_free},       {"add", conf_add},
                                        {"merge", conf_merge},     {"count", conf_count},
                                        {"results", conf_results}, {NULL, NULL}};

static const luaL_Reg data_funcs[] = {{"dataset", l_dataset},
                                      {"read_label", l_read_label},
                                      {"write_label_png", l_write_label_png},
                                      {"confusion", l_confusion},
                                      {"make_procedural_dataset", l_make_procedural_dataset},
                                      {"procedural_classes", l_procedural_classes},
                                      {NULL, NULL}};

void clhl_open_data(lua_State *L) {
    clhl_new_class(L, LABEL_MT, label_meta, label_methods);
    clhl_new_class(L, DATASET_MT, ds_meta, ds_methods);
    clhl_new_class(L, LOADER_MT, loader_meta, loader_methods);
    clhl_new_class(L, BATCH_MT, batch_meta, batch_methods);
    clhl_new_class(L, CONFUSION_MT, conf_meta, conf_methods);
    luaL_setfuncs(L, data_funcs, 0);
}
