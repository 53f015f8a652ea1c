/*
 * Lua 5.4 binding of clhclip (`require "clhclip"`).
 *
 * The binding only converts types and errors; the C core knows nothing of Lua.
 *  - A failing clh_status becomes a Lua error whose message is clh_last_error().
 *    Library calls never run while a C temporary could leak: host buffers are Lua
 *    userdata (collected on error) and every library object is stored in its
 *    userdata box before the call that could fail.
 *  - Contexts, tensors, tokenizers, images and models are userdata with __gc,
 *    __close and an idempotent :free(); use after free is a clean Lua error.
 *  - Tensors and models keep their context userdata alive through a user value
 *    and count as "children" of it: a context freed explicitly (or collected)
 *    is destroyed only once its last child is gone, because clh_tensor_release
 *    needs the clh_ctx.
 *  - Device memory is invisible to the Lua GC, so allocations run a full
 *    collection when a context's device bytes pass a soft limit (torch7-style
 *    heap tracking, design-notes 1.1/3.13).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "binding.h"
#include "clhclip.h"
#include "data.h"
#include "hclip.h"
#include "segmodel.h"

#define CTX_MT       "clhclip.Context"
#define TENSOR_MT    "clhclip.Tensor"
#define TOKENIZER_MT "clhclip.Tokenizer"
#define IMAGE_MT     "clhclip.Image"
#define CLIP_MT      "clhclip.CLIP"
#define STFILE_MT    "clhclip.SafetensorsFile"
#define ADAMW_MT     "clhclip.AdamW"
#define HCLIP_MT     "clhclip.HCLIP"
#define SEGMODEL_MT  "clhclip.SegModel"

#define REG_DEFAULT_CTX "clhclip.default_context"
#define REG_DEFAULT_TOK "clhclip.default_tokenizer"
#define REG_MODULE_DIR  "clhclip.module_dir"

#define DEFAULT_VOCAB_NAME "bpe_simple_vocab_16e6.txt.gz"
#define GC_BASE_BYTES      ((size_t)256 << 20)
#define MAX_NUMEL          ((size_t)1 << 40)

/* ================================================================== errors */

int clhl_raise_status(lua_State *L, clh_status st) {
    const char *msg = clh_last_error();
    if (!msg || !*msg)
        msg = clh_status_name(st);
    return luaL_error(L, "%s", msg);
}

#define CHECK(L, expr)  CLHL_CHECK(L, expr)
#define check_opt_table clhl_check_opt_table
#define opt_bool        clhl_opt_bool
#define opt_int         clhl_opt_int

/* A GC-managed scratch buffer on the stack top (freed with the stack on error). */
static void *scratch(lua_State *L, size_t bytes) {
    return lua_newuserdatauv(L, bytes ? bytes : 1, 0);
}

static int file_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

static int dir_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

/* ================================================================== option tables */

void clhl_check_opt_table(lua_State *L, int idx) {
    if (!lua_isnoneornil(L, idx))
        luaL_checktype(L, idx, LUA_TTABLE);
}

/* Boolean field of an optional options table at idx. */
int clhl_opt_bool(lua_State *L, int idx, const char *key, int def) {
    if (lua_isnoneornil(L, idx))
        return def;
    int t = lua_getfield(L, idx, key);
    int v = def;
    if (t == LUA_TBOOLEAN)
        v = lua_toboolean(L, -1);
    else if (t != LUA_TNIL)
        luaL_error(L, "option '%s' must be a boolean (got %s)", key, luaL_typename(L, -1));
    lua_pop(L, 1);
    return v;
}

lua_Integer clhl_opt_int(lua_State *L, int idx, const char *key, lua_Integer def) {
    if (lua_isnoneornil(L, idx))
        return def;
    lua_Integer v = def;
    if (lua_getfield(L, idx, key) != LUA_TNIL) {
        int isnum;
        v = lua_tointegerx(L, -1, &isnum);
        if (!isnum)
            luaL_error(L, "option '%s' must be an integer (got %s)", key, luaL_typename(L, -1));
    }
    lua_pop(L, 1);
    return v;
}

static double opt_num(lua_State *L, int idx, const char *key, double def) {
    if (lua_isnoneornil(L, idx))
        return def;
    double v = def;
    if (lua_getfield(L, idx, key) != LUA_TNIL) {
        int isnum;
        v = lua_tonumberx(L, -1, &isnum);
        if (!isnum)
            luaL_error(L, "option '%s' must be a number (got %s)", key, luaL_typename(L, -1));
    }
    lua_pop(L, 1);
    return v;
}

/* Integer element i (1-based) of the table at idx, with a message naming `what`. */
static lua_Integer table_int(lua_State *L, int idx, lua_Integer i, const char *what) {
    lua_geti(L, idx, i);
    int isnum;
    lua_Integer v = lua_tointegerx(L, -1, &isnum);
    if (!isnum)
        luaL_error(L, "%s[%d] must be an integer (got %s)", what, (int)i, luaL_typename(L, -1));
    lua_pop(L, 1);
    return v;
}

/* ================================================================== contexts */

typedef struct CtxBox {
    clh_ctx *ctx;
    int children; /* live tensors/models made in this context */
    int closed;   /* freed by the user or collected; destroyed when children == 0 */
    size_t gc_threshold;
} CtxBox;

static void ctx_maybe_destroy(CtxBox *c) {
    if (c->closed && c->children == 0 && c->ctx) {
        clh_ctx_destroy(c->ctx);
        c->ctx = NULL;
    }
}

static void ctx_release_child(CtxBox *c) {
    if (!c)
        return;
    c->children--;
    ctx_maybe_destroy(c);
}

static CtxBox *check_ctx(lua_State *L, int idx) {
    CtxBox *c = luaL_checkudata(L, idx, CTX_MT);
    if (c->closed || !c->ctx)
        luaL_error(L, "context was freed");
    return c;
}

/* Run a full GC when device memory passes the soft limit, so that unreachable
 * tensors give their device buffers back (Lua cannot see their size). */
static void gc_pressure(lua_State *L, CtxBox *c) {
    if (!c->ctx)
        return;
    size_t bytes = clh_ctx_device_bytes(c->ctx);
    if (bytes <= c->gc_threshold)
        return;
    lua_gc(L, LUA_GCCOLLECT);
    bytes = c->ctx ? clh_ctx_device_bytes(c->ctx) : 0;
    size_t next = bytes + bytes / 2;
    c->gc_threshold = next > GC_BASE_BYTES ? next : GC_BASE_BYTES;
}

/* Field value of clh.init options as a string (integers are indices). */
static const char *opt_selector(lua_State *L, int idx, const char *key) {
    if (lua_isnoneornil(L, idx))
        return NULL;
    int t = lua_getfield(L, idx, key);
    const char *s = NULL;
    if (t == LUA_TNUMBER || t == LUA_TSTRING)
        s = lua_tostring(L, -1); /* converts numbers in place; stays on the stack */
    else if (t != LUA_TNIL)
        luaL_error(L, "option '%s' must be a string or an index (got %s)", key,
                   luaL_typename(L, -1));
    if (!s)
        lua_pop(L, 1);
    return s; /* the string is kept alive on the stack until the caller returns */
}

/* Create a context from options at opt_idx (may be none) and push it. */
static CtxBox *push_new_ctx(lua_State *L, int opt_idx) {
    clh_ctx_options o;
    memset(&o, 0, sizeof o);
    o.profile = -1;
    if (!lua_isnoneornil(L, opt_idx)) {
        o.platform = opt_selector(L, opt_idx, "platform");
        o.device = opt_selector(L, opt_idx, "device");
        lua_getfield(L, opt_idx, "profile");
        if (lua_isboolean(L, -1))
            o.profile = lua_toboolean(L, -1);
        else if (!lua_isnil(L, -1))
            luaL_error(L, "option 'profile' must be a boolean (got %s)", luaL_typename(L, -1));
        lua_pop(L, 1);
    }
    CtxBox *c = lua_newuserdatauv(L, sizeof *c, 0);
    memset(c, 0, sizeof *c);
    c->closed = 1; /* until the context exists */
    c->gc_threshold = GC_BASE_BYTES;
    luaL_setmetatable(L, CTX_MT);
    clh_ctx *ctx = NULL;
    CHECK(L, clh_ctx_create(&o, &ctx));
    c->ctx = ctx;
    c->closed = 0;
    return c;
}

/* Push the default context, creating it on first use (or after it was freed). */
static CtxBox *push_default_ctx(lua_State *L) {
    if (lua_getfield(L, LUA_REGISTRYINDEX, REG_DEFAULT_CTX) == LUA_TUSERDATA) {
        CtxBox *c = luaL_testudata(L, -1, CTX_MT);
        if (c && !c->closed && c->ctx)
            return c;
    }
    lua_pop(L, 1);
    CtxBox *c = push_new_ctx(L, 0);
    lua_pushvalue(L, -1);
    lua_setfield(L, LUA_REGISTRYINDEX, REG_DEFAULT_CTX);
    return c;
}

/* Push the context at idx (a Context) or the default one when idx is none/nil. */
static CtxBox *push_ctx_arg(lua_State *L, int idx) {
    if (lua_isnoneornil(L, idx))
        return push_default_ctx(L);
    CtxBox *c = check_ctx(L, idx);
    lua_pushvalue(L, idx);
    return c;
}

static void push_device_info(lua_State *L, const clh_device_info *d) {
    lua_createtable(L, 0, 28);
#define SET_INT(f)                                                                                 \
    lua_pushinteger(L, (lua_Integer)d->f);                                                         \
    lua_setfield(L, -2, #f)
#define SET_STR(f)                                                                                 \
    lua_pushstring(L, d->f);                                                                       \
    lua_setfield(L, -2, #f)
#define SET_BOOL(f)                                                                                \
    lua_pushboolean(L, d->f != 0);                                                                 \
    lua_setfield(L, -2, #f)
    SET_INT(platform_index);
    SET_INT(device_index);
    SET_STR(platform_name);
    SET_STR(platform_vendor);
    SET_STR(platform_version);
    SET_STR(name);
    SET_STR(vendor);
    SET_STR(version);
    SET_STR(c_version);
    SET_STR(driver);
    SET_STR(type);
    SET_BOOL(is_gpu);
    SET_BOOL(is_cpu);
    SET_INT(compute_units);
    SET_INT(clock_mhz);
    SET_INT(global_mem);
    SET_INT(max_alloc);
    SET_INT(local_mem);
    SET_INT(max_work_group_size);
    SET_BOOL(has_fp16);
    SET_BOOL(has_fp64);
    SET_BOOL(has_subgroups);
#undef SET_INT
#undef SET_STR
#undef SET_BOOL
    lua_createtable(L, 3, 0);
    for (int i = 0; i < 3; i++) {
        lua_pushinteger(L, (lua_Integer)d->max_work_item_sizes[i]);
        lua_rawseti(L, -2, i + 1);
    }
    lua_setfield(L, -2, "max_work_item_sizes");
    char report[4096];
    clh_device_info_format(d, report, sizeof report);
    lua_pushstring(L, report);
    lua_setfield(L, -2, "report");
}

static int l_devices(lua_State *L) {
    clh_device_info *list = NULL;
    int n = 0;
    CHECK(L, clh_list_devices(&list, &n));
    /* Copy into GC memory first so that no Lua allocation can leak `list`. */
    clh_device_info *copy = lua_newuserdatauv(L, sizeof *copy * (size_t)(n > 0 ? n : 1), 0);
    if (n > 0)
        memcpy(copy, list, sizeof *copy * (size_t)n);
    free(list);
    lua_createtable(L, n, 0);
    for (int i = 0; i < n; i++) {
        push_device_info(L, &copy[i]);
        lua_rawseti(L, -2, i + 1);
    }
    return 1;
}

/* clh.init{platform=, device=, profile=, default=true} -> Context */
static int l_init(lua_State *L) {
    check_opt_table(L, 1);
    int make_default = opt_bool(L, 1, "default", 1);
    push_new_ctx(L, 1);
    if (make_default) {
        lua_pushvalue(L, -1);
        lua_setfield(L, LUA_REGISTRYINDEX, REG_DEFAULT_CTX);
    }
    return 1;
}

static int l_context(lua_State *L) {
    push_default_ctx(L);
    return 1;
}

static int ctx_free(lua_State *L) {
    CtxBox *c = luaL_checkudata(L, 1, CTX_MT);
    c->closed = 1;
    ctx_maybe_destroy(c);
    return 0;
}

static int ctx_device(lua_State *L) {
    CtxBox *c = check_ctx(L, 1);
    push_device_info(L, clh_ctx_device(c->ctx));
    return 1;
}

static int ctx_finish(lua_State *L) {
    CtxBox *c = check_ctx(L, 1);
    CHECK(L, clh_ctx_finish(c->ctx));
    return 0;
}

static int ctx_build_all(lua_State *L) {
    CtxBox *c = check_ctx(L, 1);
    CHECK(L, clh_ctx_build_all(c->ctx));
    return 0;
}

static int ctx_build_seconds(lua_State *L) {
    lua_pushnumber(L, clh_ctx_build_seconds(check_ctx(L, 1)->ctx));
    return 1;
}

static int ctx_device_bytes(lua_State *L) {
    lua_pushinteger(L, (lua_Integer)clh_ctx_device_bytes(check_ctx(L, 1)->ctx));
    return 1;
}

static int ctx_peak_device_bytes(lua_State *L) {
    lua_pushinteger(L, (lua_Integer)clh_ctx_peak_device_bytes(check_ctx(L, 1)->ctx));
    return 1;
}

static int ctx_error(lua_State *L) {
    lua_pushstring(L, clh_ctx_error(check_ctx(L, 1)->ctx));
    return 1;
}

static int ctx_profile(lua_State *L) {
    CtxBox *c = check_ctx(L, 1);
    char *table = NULL;
    CHECK(L, clh_profile_table(c->ctx, &table));
    lua_pushstring(L, table ? table : "");
    free(table);
    return 1;
}

static int ctx_profile_reset(lua_State *L) {
    clh_profile_reset(check_ctx(L, 1)->ctx);
    return 0;
}

/* clh.profile_table([ctx]) */
static int l_profile_table(lua_State *L) {
    lua_settop(L, 1);
    push_ctx_arg(L, 1);
    lua_replace(L, 1);
    return ctx_profile(L);
}

static int ctx_tostring(lua_State *L) {
    CtxBox *c = luaL_checkudata(L, 1, CTX_MT);
    if (c->closed || !c->ctx)
        lua_pushstring(L, "clhclip.Context (freed)");
    else
        lua_pushfstring(L, "clhclip.Context (%s)", clh_ctx_device(c->ctx)->name);
    return 1;
}

/* ================================================================== tensors */

typedef struct TensorBox {
    clh_tensor *t;
    CtxBox *owner;
} TensorBox;

/* Push an empty tensor box whose user value is the context userdata at ctx_idx. */
static TensorBox *push_tensor_box(lua_State *L, int ctx_idx) {
    ctx_idx = lua_absindex(L, ctx_idx);
    TensorBox *b = lua_newuserdatauv(L, sizeof *b, 1);
    b->t = NULL;
    b->owner = NULL;
    luaL_setmetatable(L, TENSOR_MT);
    lua_pushvalue(L, ctx_idx);
    lua_setiuservalue(L, -2, 1);
    return b;
}

static void tensor_adopt(lua_State *L, TensorBox *b, clh_tensor *t, CtxBox *owner) {
    b->t = t;
    b->owner = owner;
    owner->children++;
    gc_pressure(L, owner);
}

static void tensor_release(TensorBox *b) {
    if (b->t) {
        clh_tensor_release(b->t);
        b->t = NULL;
        ctx_release_child(b->owner);
        b->owner = NULL;
    }
}

static TensorBox *check_tensor_box(lua_State *L, int idx) {
    TensorBox *b = luaL_checkudata(L, idx, TENSOR_MT);
    if (!b->t)
        luaL_error(L, "tensor was freed");
    return b;
}

static clh_tensor *check_tensor(lua_State *L, int idx) {
    return check_tensor_box(L, idx)->t;
}

/* Push the context userdata of the tensor at idx; returns its box. */
static CtxBox *push_tensor_ctx(lua_State *L, int idx) {
    TensorBox *b = check_tensor_box(L, idx);
    lua_getiuservalue(L, idx, 1);
    if (b->owner->closed)
        luaL_error(L, "the tensor's context was freed; cannot make new tensors in it");
    return b->owner;
}

/* Shape table at idx -> shape[]; returns ndim. Dimensions must be positive. */
static int check_shape(lua_State *L, int idx, int64_t *shape) {
    luaL_checktype(L, idx, LUA_TTABLE);
    lua_Integer n = luaL_len(L, idx);
    if (n < 1 || n > CLH_MAX_DIMS)
        luaL_error(L, "shape must have 1 to %d dimensions (got %d)", CLH_MAX_DIMS, (int)n);
    size_t numel = 1;
    for (lua_Integer i = 1; i <= n; i++) {
        lua_Integer d = table_int(L, idx, i, "shape");
        if (d < 1)
            luaL_error(L, "shape[%d] must be positive (got %d)", (int)i, (int)d);
        if ((size_t)d > MAX_NUMEL / numel)
            luaL_error(L, "shape is too large");
        numel *= (size_t)d;
        shape[i - 1] = d;
    }
    return (int)n;
}

static size_t shape_numel(int ndim, const int64_t *shape) {
    size_t n = 1;
    for (int i = 0; i < ndim; i++)
        n *= (size_t)shape[i];
    return n;
}

static float table_float(lua_State *L, int idx, lua_Integer i, const char *what) {
    lua_geti(L, idx, i);
    int isnum;
    lua_Number v = lua_tonumberx(L, -1, &isnum);
    if (!isnum)
        luaL_error(L, "%s[%d] must be a number (got %s)", what, (int)i, luaL_typename(L, -1));
    lua_pop(L, 1);
    return (float)v;
}

/* Nested table at idx matching shape[level..] -> dst (advancing *pos). */
static void read_nested(lua_State *L, int idx, int level, int ndim, const int64_t *shape,
                        float *dst, size_t *pos) {
    idx = lua_absindex(L, idx);
    lua_Integer len = luaL_len(L, idx);
    if (len != shape[level])
        luaL_error(L, "data at depth %d has %d entries but the shape wants %d", level + 1, (int)len,
                   (int)shape[level]);
    for (lua_Integer i = 1; i <= len; i++) {
        if (level == ndim - 1) {
            dst[(*pos)++] = table_float(L, idx, i, "data");
        } else {
            if (lua_geti(L, idx, i) != LUA_TTABLE)
                luaL_error(L, "data at depth %d: entry %d must be a table (got %s)", level + 1,
                           (int)i, luaL_typename(L, -1));
            read_nested(L, -1, level + 1, ndim, shape, dst, pos);
            lua_pop(L, 1);
        }
    }
}

/* Flat or nested table of numbers at idx -> dst[numel] (length checked). */
static void read_data_table(lua_State *L, int idx, int ndim, const int64_t *shape, size_t numel,
                            float *dst) {
    idx = lua_absindex(L, idx);
    int first = lua_geti(L, idx, 1);
    lua_pop(L, 1);
    if (first == LUA_TTABLE && ndim > 1) {
        size_t pos = 0;
        read_nested(L, idx, 0, ndim, shape, dst, &pos);
        return;
    }
    lua_Integer len = luaL_len(L, idx);
    if ((size_t)len != numel)
        luaL_error(L, "data has %d numbers but the tensor has %d elements", (int)len, (int)numel);
    for (size_t i = 0; i < numel; i++)
        dst[i] = table_float(L, idx, (lua_Integer)i + 1, "data");
}

/* clh.tensor(shape[, data][, ctx]) : data is a number (fill), a flat or nested table,
 * or a Tensor (device copy). */
static int l_tensor(lua_State *L) {
    int64_t shape[CLH_MAX_DIMS];
    int ndim = check_shape(L, 1, shape);
    size_t numel = shape_numel(ndim, shape);
    int data_type = lua_type(L, 2);
    if (data_type != LUA_TNONE && data_type != LUA_TNIL && data_type != LUA_TNUMBER &&
        data_type != LUA_TTABLE && !luaL_testudata(L, 2, TENSOR_MT))
        luaL_typeerror(L, 2, "table, number or clhclip.Tensor");
    CtxBox *c = push_ctx_arg(L, 3);
    int ctx_idx = lua_gettop(L);
    TensorBox *b = push_tensor_box(L, ctx_idx);
    clh_tensor *t = NULL;
    if (data_type == LUA_TTABLE) {
        float *host = scratch(L, numel * sizeof(float));
        read_data_table(L, 2, ndim, shape, numel, host);
        CHECK(L, clh_tensor_from_host(c->ctx, ndim, shape, host, &t));
        lua_pop(L, 1);
        tensor_adopt(L, b, t, c);
        return 1;
    }
    CHECK(L, clh_tensor_new(c->ctx, ndim, shape, &t));
    tensor_adopt(L, b, t, c);
    if (data_type == LUA_TNUMBER)
        CHECK(L, clh_tensor_fill(t, (float)lua_tonumber(L, 2)));
    else if (data_type == LUA_TUSERDATA)
        CHECK(L, clh_tensor_copy(t, check_tensor(L, 2)));
    return 1;
}

static int t_free(lua_State *L) {
    tensor_release(luaL_checkudata(L, 1, TENSOR_MT));
    return 0;
}

static int t_shape(lua_State *L) {
    clh_tensor *t = check_tensor(L, 1);
    int nd = clh_tensor_ndim(t);
    const int64_t *s = clh_tensor_shape(t);
    lua_createtable(L, nd, 0);
    for (int i = 0; i < nd; i++) {
        lua_pushinteger(L, (lua_Integer)s[i]);
        lua_rawseti(L, -2, i + 1);
    }
    return 1;
}

/* t:size() -> shape table; t:size(i) -> dim i (1-based, negative counts from the end). */
static int t_size(lua_State *L) {
    clh_tensor *t = check_tensor(L, 1);
    if (lua_isnoneornil(L, 2))
        return t_shape(L);
    lua_Integer i = luaL_checkinteger(L, 2);
    int nd = clh_tensor_ndim(t);
    if (i < 0)
        i += nd + 1;
    luaL_argcheck(L, i >= 1 && i <= nd, 2, "dimension out of range");
    lua_pushinteger(L, (lua_Integer)clh_tensor_shape(t)[i - 1]);
    return 1;
}

static int t_dim(lua_State *L) {
    lua_pushinteger(L, clh_tensor_ndim(check_tensor(L, 1)));
    return 1;
}

static int t_numel(lua_State *L) {
    lua_pushinteger(L, (lua_Integer)clh_tensor_numel(check_tensor(L, 1)));
    return 1;
}

static int t_offset(lua_State *L) {
    lua_pushinteger(L, (lua_Integer)clh_tensor_offset(check_tensor(L, 1)));
    return 1;
}

static int t_context(lua_State *L) {
    check_tensor(L, 1);
    lua_getiuservalue(L, 1, 1);
    return 1;
}

/* Download the tensor into a scratch buffer pushed on the stack. */
static float *download(lua_State *L, clh_tensor *t) {
    size_t n = clh_tensor_numel(t);
    float *host = scratch(L, n * sizeof(float));
    CHECK(L, clh_tensor_download(t, host, n));
    return host;
}

static void push_nested(lua_State *L, const float *v, int level, int ndim, const int64_t *shape,
                        size_t *pos) {
    lua_createtable(L, (int)shape[level], 0);
    for (int64_t i = 0; i < shape[level]; i++) {
        if (level == ndim - 1)
            lua_pushnumber(L, v[(*pos)++]);
        else
            push_nested(L, v, level + 1, ndim, shape, pos);
        lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
}

/* t:totable([{nested=false}]) */
static int t_totable(lua_State *L) {
    clh_tensor *t = check_tensor(L, 1);
    check_opt_table(L, 2);
    int nested = opt_bool(L, 2, "nested", 0);
    const float *v = download(L, t);
    size_t n = clh_tensor_numel(t);
    if (nested) {
        size_t pos = 0;
        push_nested(L, v, 0, clh_tensor_ndim(t), clh_tensor_shape(t), &pos);
        return 1;
    }
    lua_createtable(L, (int)n, 0);
    for (size_t i = 0; i < n; i++) {
        lua_pushnumber(L, v[i]);
        lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
    return 1;
}

/* t:copy(table_or_tensor) -> t */
static int t_copy(lua_State *L) {
    clh_tensor *t = check_tensor(L, 1);
    if (lua_istable(L, 2)) {
        size_t n = clh_tensor_numel(t);
        float *host = scratch(L, n * sizeof(float));
        read_data_table(L, 2, clh_tensor_ndim(t), clh_tensor_shape(t), n, host);
        CHECK(L, clh_tensor_upload(t, host, n));
    } else if (luaL_testudata(L, 2, TENSOR_MT)) {
        CHECK(L, clh_tensor_copy(t, check_tensor(L, 2)));
    } else {
        luaL_typeerror(L, 2, "table or clhclip.Tensor");
    }
    lua_settop(L, 1);
    return 1;
}

static int t_fill(lua_State *L) {
    clh_tensor *t = check_tensor(L, 1);
    CHECK(L, clh_tensor_fill(t, (float)luaL_checknumber(L, 2)));
    lua_settop(L, 1);
    return 1;
}

/* t:view(shape[, offset]) : offset is a 0-based element offset into t. */
static int t_view(lua_State *L) {
    clh_tensor *base = check_tensor(L, 1);
    int64_t shape[CLH_MAX_DIMS];
    int ndim = check_shape(L, 2, shape);
    lua_Integer offset = luaL_optinteger(L, 3, 0);
    luaL_argcheck(L, offset >= 0, 3, "offset must be >= 0");
    CtxBox *c = push_tensor_ctx(L, 1);
    TensorBox *b = push_tensor_box(L, -1);
    clh_tensor *v = NULL;
    CHECK(L, clh_tensor_view(base, (size_t)offset, ndim, shape, &v));
    tensor_adopt(L, b, v, c);
    return 1;
}

/* t:clone() -> a new tensor with a copy of the data */
static int t_clone(lua_State *L) {
    clh_tensor *src = check_tensor(L, 1);
    CtxBox *c = push_tensor_ctx(L, 1);
    TensorBox *b = push_tensor_box(L, -1);
    clh_tensor *t = NULL;
    CHECK(L, clh_tensor_new(c->ctx, clh_tensor_ndim(src), clh_tensor_shape(src), &t));
    tensor_adopt(L, b, t, c);
    CHECK(L, clh_tensor_copy(t, src));
    return 1;
}

static int t_tostring(lua_State *L) {
    TensorBox *b = luaL_checkudata(L, 1, TENSOR_MT);
    if (!b->t) {
        lua_pushstring(L, "clhclip.Tensor (freed)");
        return 1;
    }
    luaL_Buffer buf;
    luaL_buffinit(L, &buf);
    luaL_addstring(&buf, "clhclip.Tensor [");
    int nd = clh_tensor_ndim(b->t);
    const int64_t *s = clh_tensor_shape(b->t);
    for (int i = 0; i < nd; i++) {
        char num[32];
        snprintf(num, sizeof num, i ? ", %lld" : "%lld", (long long)s[i]);
        luaL_addstring(&buf, num);
    }
    luaL_addstring(&buf, "]");
    luaL_pushresult(&buf);
    return 1;
}

/* ---------------------------------------------------------------- safetensors */

typedef struct StBox {
    clh_st_file *f;
} StBox;

static StBox *check_st(lua_State *L, int idx) {
    StBox *b = luaL_checkudata(L, idx, STFILE_MT);
    if (!b->f)
        luaL_error(L, "safetensors file was closed");
    return b;
}

/* clh.safetensors(path) -> SafetensorsFile */
static int l_safetensors(lua_State *L) {
    const char *path = luaL_checkstring(L, 1);
    StBox *b = lua_newuserdatauv(L, sizeof *b, 0);
    b->f = NULL;
    luaL_setmetatable(L, STFILE_MT);
    clh_st_file *f = NULL;
    CHECK(L, clh_st_open(path, &f));
    b->f = f;
    return 1;
}

static int st_close(lua_State *L) {
    StBox *b = luaL_checkudata(L, 1, STFILE_MT);
    clh_st_close(b->f);
    b->f = NULL;
    return 0;
}

static void push_st_info(lua_State *L, const clh_st_tensor_info *info) {
    lua_createtable(L, 0, 4);
    lua_pushstring(L, info->name);
    lua_setfield(L, -2, "name");
    lua_pushstring(L, clh_dtype_name(info->dtype));
    lua_setfield(L, -2, "dtype");
    lua_createtable(L, info->ndim, 0);
    for (int i = 0; i < info->ndim; i++) {
        lua_pushinteger(L, (lua_Integer)info->shape[i]);
        lua_rawseti(L, -2, i + 1);
    }
    lua_setfield(L, -2, "shape");
    lua_pushinteger(L, (lua_Integer)info->numel);
    lua_setfield(L, -2, "numel");
}

/* f:names() -> array of names in file order */
static int st_names(lua_State *L) {
    StBox *b = check_st(L, 1);
    size_t n = clh_st_count(b->f);
    lua_createtable(L, (int)n, 0);
    for (size_t i = 0; i < n; i++) {
        clh_st_tensor_info info;
        CHECK(L, clh_st_info_at(b->f, i, &info));
        lua_pushstring(L, info.name);
        lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
    return 1;
}

/* f:info(name) -> {name, dtype, shape, numel} */
static int st_info(lua_State *L) {
    StBox *b = check_st(L, 1);
    clh_st_tensor_info info;
    CHECK(L, clh_st_info(b->f, luaL_checkstring(L, 2), &info));
    push_st_info(L, &info);
    return 1;
}

static int is_int_dtype(clh_dtype d) {
    return d == CLH_DTYPE_I64 || d == CLH_DTYPE_I32 || d == CLH_DTYPE_I16 || d == CLH_DTYPE_I8 ||
           d == CLH_DTYPE_U8;
}

/* f:read(name) -> flat values table (integers for integer dtypes), shape table */
static int st_read(lua_State *L) {
    StBox *b = check_st(L, 1);
    const char *name = luaL_checkstring(L, 2);
    clh_st_tensor_info info;
    CHECK(L, clh_st_info(b->f, name, &info));
    size_t n = info.numel;
    if (is_int_dtype(info.dtype)) {
        int64_t *v = scratch(L, n * sizeof(int64_t));
        CHECK(L, clh_st_read_i64(b->f, name, v, n));
        lua_createtable(L, (int)n, 0);
        for (size_t i = 0; i < n; i++) {
            lua_pushinteger(L, (lua_Integer)v[i]);
            lua_rawseti(L, -2, (lua_Integer)i + 1);
        }
    } else {
        float *v = scratch(L, n * sizeof(float));
        CHECK(L, clh_st_read_f32(b->f, name, v, n));
        lua_createtable(L, (int)n, 0);
        for (size_t i = 0; i < n; i++) {
            lua_pushnumber(L, v[i]);
            lua_rawseti(L, -2, (lua_Integer)i + 1);
        }
    }
    push_st_info(L, &info);
    lua_getfield(L, -1, "shape");
    lua_remove(L, -2);
    return 2;
}

/* Name to read: the given one, or the only tensor of the file. */
static const char *st_pick_name(lua_State *L, StBox *b, int name_idx, clh_st_tensor_info *info) {
    if (!lua_isnoneornil(L, name_idx)) {
        const char *name = luaL_checkstring(L, name_idx);
        CHECK(L, clh_st_info(b->f, name, info));
        return name;
    }
    if (clh_st_count(b->f) != 1)
        luaL_error(L, "the file holds %d tensors; give the name of the one to load",
                   (int)clh_st_count(b->f));
    CHECK(L, clh_st_info_at(b->f, 0, info));
    return info->name;
}

/* f:tensor([name][, ctx]) -> Tensor (float or integer data converted to fp32) */
static int st_tensor(lua_State *L) {
    StBox *b = check_st(L, 1);
    clh_st_tensor_info info;
    const char *name = st_pick_name(L, b, 2, &info);
    if (info.ndim < 1)
        luaL_error(L, "tensor '%s' is a scalar; load it with :read()", name);
    CtxBox *c = push_ctx_arg(L, 3);
    TensorBox *tb = push_tensor_box(L, -1);
    size_t n = info.numel;
    float *v = scratch(L, n * sizeof(float));
    if (is_int_dtype(info.dtype)) {
        int64_t *iv = scratch(L, n * sizeof(int64_t));
        CHECK(L, clh_st_read_i64(b->f, name, iv, n));
        for (size_t i = 0; i < n; i++)
            v[i] = (float)iv[i];
        lua_pop(L, 1);
    } else {
        CHECK(L, clh_st_read_f32(b->f, name, v, n));
    }
    clh_tensor *t = NULL;
    CHECK(L, clh_tensor_from_host(c->ctx, info.ndim, info.shape, v, &t));
    lua_pop(L, 1);
    tensor_adopt(L, tb, t, c);
    return 1;
}

static int st_metadata(lua_State *L) {
    StBox *b = check_st(L, 1);
    const char *v = clh_st_metadata(b->f, luaL_checkstring(L, 2));
    if (v)
        lua_pushstring(L, v);
    else
        lua_pushnil(L);
    return 1;
}

/* clh.load_tensor(path[, name][, ctx]) */
static int l_load_tensor(lua_State *L) {
    lua_settop(L, 3);
    lua_pushcfunction(L, l_safetensors);
    lua_pushvalue(L, 1);
    lua_call(L, 1, 1); /* file at 4 */
    lua_pushcfunction(L, st_tensor);
    lua_pushvalue(L, 4);
    lua_pushvalue(L, 2);
    lua_pushvalue(L, 3);
    lua_call(L, 3, 1);
    lua_pushcfunction(L, st_close);
    lua_pushvalue(L, 4);
    lua_call(L, 1, 0);
    return 1;
}

typedef struct WriterBox {
    clh_st_writer *w;
} WriterBox;

static int writer_gc(lua_State *L) {
    WriterBox *b = lua_touserdata(L, 1);
    if (b) {
        clh_st_writer_free(b->w);
        b->w = NULL;
    }
    return 0;
}

/* Push a writer box that frees its writer when collected. */
static WriterBox *push_writer(lua_State *L) {
    WriterBox *b = lua_newuserdatauv(L, sizeof *b, 0);
    b->w = NULL;
    if (luaL_newmetatable(L, "clhclip.SafetensorsWriter")) {
        lua_pushcfunction(L, writer_gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_setmetatable(L, -2);
    clh_st_writer *w = NULL;
    CHECK(L, clh_st_writer_new(&w));
    b->w = w;
    return b;
}

static void writer_add_tensor(lua_State *L, WriterBox *w, const char *name, int t_idx) {
    clh_tensor *t = check_tensor(L, t_idx);
    float *v = download(L, t);
    CHECK(L, clh_st_writer_add_f32(w->w, name, clh_tensor_ndim(t), clh_tensor_shape(t), v));
    lua_pop(L, 1);
}

static void writer_add_metadata(lua_State *L, WriterBox *w, int meta_idx) {
    if (lua_isnoneornil(L, meta_idx))
        return;
    luaL_checktype(L, meta_idx, LUA_TTABLE);
    lua_pushnil(L);
    while (lua_next(L, meta_idx)) {
        if (lua_type(L, -2) != LUA_TSTRING || lua_type(L, -1) != LUA_TSTRING)
            luaL_error(L, "metadata keys and values must be strings");
        CHECK(L, clh_st_writer_set_metadata(w->w, lua_tostring(L, -2), lua_tostring(L, -1)));
        lua_pop(L, 1);
    }
}

/* t:save(path[, name="tensor"][, metadata]) */
static int t_save(lua_State *L) {
    check_tensor(L, 1);
    const char *path = luaL_checkstring(L, 2);
    const char *name = luaL_optstring(L, 3, "tensor");
    lua_settop(L, 4);
    WriterBox *w = push_writer(L);
    writer_add_tensor(L, w, name, 1);
    writer_add_metadata(L, w, 4);
    CHECK(L, clh_st_writer_save(w->w, path));
    lua_settop(L, 1);
    return 1;
}

/* clh.save_tensors(path, {name = Tensor, ...}[, metadata]) */
static int l_save_tensors(lua_State *L) {
    const char *path = luaL_checkstring(L, 1);
    luaL_checktype(L, 2, LUA_TTABLE);
    lua_settop(L, 3);
    WriterBox *w = push_writer(L);
    lua_pushnil(L);
    while (lua_next(L, 2)) {
        if (lua_type(L, -2) != LUA_TSTRING)
            luaL_error(L, "tensor names must be strings (got %s)", luaL_typename(L, -2));
        writer_add_tensor(L, w, lua_tostring(L, -2), lua_gettop(L));
        lua_pop(L, 1);
    }
    writer_add_metadata(L, w, 3);
    CHECK(L, clh_st_writer_save(w->w, path));
    return 0;
}

/* ================================================================== ops */

/* Push a new tensor of the given shape in x's context; returns it. */
static clh_tensor *push_new_like(lua_State *L, int x_idx, int ndim, const int64_t *shape,
                                 CtxBox **ctx_out) {
    x_idx = lua_absindex(L, x_idx);
    CtxBox *c = push_tensor_ctx(L, x_idx);
    TensorBox *b = push_tensor_box(L, -1);
    lua_remove(L, -2);
    clh_tensor *t = NULL;
    CHECK(L, clh_tensor_new(c->ctx, ndim, shape, &t));
    tensor_adopt(L, b, t, c);
    if (ctx_out)
        *ctx_out = c;
    return t;
}

/* clh.l2_normalize(x) -> new tensor, rows of the last dim scaled to unit length */
static int l_l2_normalize(lua_State *L) {
    clh_tensor *x = check_tensor(L, 1);
    CtxBox *c;
    clh_tensor *y = push_new_like(L, 1, clh_tensor_ndim(x), clh_tensor_shape(x), &c);
    CHECK(L, clh_l2_normalize(c->ctx, x, y));
    return 1;
}

/* clh.softmax(x[, scale=1][, causal=false]) -> new tensor */
static int l_softmax(lua_State *L) {
    clh_tensor *x = check_tensor(L, 1);
    float scale = (float)luaL_optnumber(L, 2, 1.0);
    int causal = lua_toboolean(L, 3);
    CtxBox *c;
    clh_tensor *y = push_new_like(L, 1, clh_tensor_ndim(x), clh_tensor_shape(x), &c);
    CHECK(L, clh_softmax(c->ctx, x, scale, causal, y));
    return 1;
}

static int l_add(lua_State *L) {
    clh_tensor *a = check_tensor(L, 1);
    clh_tensor *b = check_tensor(L, 2);
    CtxBox *c;
    clh_tensor *y = push_new_like(L, 1, clh_tensor_ndim(a), clh_tensor_shape(a), &c);
    CHECK(L, clh_add(c->ctx, a, b, y));
    return 1;
}

static int l_gelu(lua_State *L) {
    clh_tensor *x = check_tensor(L, 1);
    CtxBox *c;
    clh_tensor *y = push_new_like(L, 1, clh_tensor_ndim(x), clh_tensor_shape(x), &c);
    CHECK(L, clh_gelu(c->ctx, x, y));
    return 1;
}

static int l_quick_gelu(lua_State *L) {
    clh_tensor *x = check_tensor(L, 1);
    CtxBox *c;
    clh_tensor *y = push_new_like(L, 1, clh_tensor_ndim(x), clh_tensor_shape(x), &c);
    CHECK(L, clh_quick_gelu(c->ctx, x, y));
    return 1;
}

/* clh.layer_norm(x, gamma, beta[, eps=1e-5]) -> new tensor */
static int l_layer_norm(lua_State *L) {
    clh_tensor *x = check_tensor(L, 1);
    clh_tensor *g = check_tensor(L, 2);
    clh_tensor *b = check_tensor(L, 3);
    float eps = (float)luaL_optnumber(L, 4, 1e-5);
    CtxBox *c;
    clh_tensor *y = push_new_like(L, 1, clh_tensor_ndim(x), clh_tensor_shape(x), &c);
    CHECK(L, clh_layer_norm(c->ctx, x, g, b, eps, y));
    return 1;
}

/* clh.linear(x[R,in], w[out,in][, b[out]]) -> y[R,out] */
static int l_linear(lua_State *L) {
    clh_tensor *x = check_tensor(L, 1);
    clh_tensor *w = check_tensor(L, 2);
    clh_tensor *bias = lua_isnoneornil(L, 3) ? NULL : check_tensor(L, 3);
    if (clh_tensor_ndim(w) != 2)
        luaL_argerror(L, 2, "weight must be 2-D [out, in]");
    size_t rows = clh_tensor_numel(x) / (size_t)clh_tensor_dim(x, -1);
    int64_t shape[2] = {(int64_t)rows, clh_tensor_dim(w, 0)};
    CtxBox *c;
    clh_tensor *y = push_new_like(L, 1, 2, shape, &c);
    CHECK(L, clh_linear(c->ctx, x, w, bias, y));
    return 1;
}

/* clh.matmul(a, b[, {trans_a=false, trans_b=false, alpha=1}]) -> C[M,N] for 2-D a, b */
static int l_matmul(lua_State *L) {
    clh_tensor *a = check_tensor(L, 1);
    clh_tensor *b = check_tensor(L, 2);
    check_opt_table(L, 3);
    int ta = opt_bool(L, 3, "trans_a", 0), tb = opt_bool(L, 3, "trans_b", 0);
    float alpha = (float)opt_num(L, 3, "alpha", 1.0);
    if (clh_tensor_ndim(a) != 2)
        luaL_argerror(L, 1, "matmul needs a 2-D tensor");
    if (clh_tensor_ndim(b) != 2)
        luaL_argerror(L, 2, "matmul needs a 2-D tensor");
    int64_t a0 = clh_tensor_dim(a, 0), a1 = clh_tensor_dim(a, 1);
    int64_t b0 = clh_tensor_dim(b, 0), b1 = clh_tensor_dim(b, 1);
    int64_t m = ta ? a1 : a0, k = ta ? a0 : a1;
    int64_t kb = tb ? b1 : b0, n = tb ? b0 : b1;
    if (k != kb)
        luaL_error(L, "matmul: inner dimensions differ (%d vs %d)", (int)k, (int)kb);
    int64_t shape[2] = {m, n};
    CtxBox *c;
    clh_tensor *y = push_new_like(L, 1, 2, shape, &c);
    CHECK(L, clh_gemm(c->ctx, ta, tb, (size_t)m, (size_t)n, (size_t)k, alpha, a, (size_t)a1, b,
                      (size_t)b1, 0.0f, y, (size_t)n));
    return 1;
}

/* ================================================================== tokenizer */

typedef struct TokBox {
    clh_tokenizer *tok;
} TokBox;

static clh_tokenizer *check_tok(lua_State *L, int idx) {
    TokBox *b = luaL_checkudata(L, idx, TOKENIZER_MT);
    if (!b->tok)
        luaL_error(L, "tokenizer was freed");
    return b->tok;
}

static TokBox *push_tokenizer(lua_State *L, const char *path) {
    TokBox *b = lua_newuserdatauv(L, sizeof *b, 0);
    b->tok = NULL;
    luaL_setmetatable(L, TOKENIZER_MT);
    clh_tokenizer *tok = NULL;
    CHECK(L, clh_tokenizer_load(path, &tok));
    b->tok = tok;
    return b;
}

/* clh.tokenizer(path) */
static int l_tokenizer(lua_State *L) {
    push_tokenizer(L, luaL_checkstring(L, 1));
    return 1;
}

static int tok_free(lua_State *L) {
    TokBox *b = luaL_checkudata(L, 1, TOKENIZER_MT);
    clh_tokenizer_free(b->tok);
    b->tok = NULL;
    return 0;
}

static int tok_sot(lua_State *L) {
    lua_pushinteger(L, clh_tokenizer_sot(check_tok(L, 1)));
    return 1;
}

static int tok_eot(lua_State *L) {
    lua_pushinteger(L, clh_tokenizer_eot(check_tok(L, 1)));
    return 1;
}

static int tok_vocab_size(lua_State *L) {
    lua_pushinteger(L, clh_tokenizer_vocab_size(check_tok(L, 1)));
    return 1;
}

static void push_ids(lua_State *L, const int32_t *ids, size_t n) {
    lua_createtable(L, (int)n, 0);
    for (size_t i = 0; i < n; i++) {
        lua_pushinteger(L, ids[i]);
        lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
}

/* tok:encode(text) -> ids without SOT/EOT */
static int tok_encode(lua_State *L) {
    clh_tokenizer *tok = check_tok(L, 1);
    const char *text = luaL_checkstring(L, 2);
    int32_t *ids = NULL;
    size_t n = 0;
    CHECK(L, clh_tokenizer_encode(tok, text, &ids, &n));
    int32_t *copy = scratch(L, n * sizeof(int32_t));
    if (n)
        memcpy(copy, ids, n * sizeof(int32_t));
    free(ids);
    push_ids(L, copy, n);
    return 1;
}

/* Tokenize the string or array of strings at text_idx with options at opt_idx;
 * pushes an array of id arrays (each `context` long). */
static void tokenize_texts(lua_State *L, clh_tokenizer *tok, int text_idx, int opt_idx,
                           int default_context) {
    text_idx = lua_absindex(L, text_idx);
    check_opt_table(L, opt_idx);
    lua_Integer context = opt_int(L, opt_idx, "context", default_context);
    int truncate = opt_bool(L, opt_idx, "truncate", 0);
    luaL_argcheck(L, context >= 2 && context <= 65536, opt_idx, "context must be 2..65536");
    int32_t *row = scratch(L, (size_t)context * sizeof(int32_t));
    if (lua_type(L, text_idx) == LUA_TSTRING) {
        lua_createtable(L, 1, 0);
        CHECK(L, clh_tokenize(tok, lua_tostring(L, text_idx), (int)context, truncate, row));
        push_ids(L, row, (size_t)context);
        lua_rawseti(L, -2, 1);
        lua_remove(L, -2);
        return;
    }
    if (!lua_istable(L, text_idx))
        luaL_typeerror(L, text_idx, "string or array of strings");
    lua_Integer n = luaL_len(L, text_idx);
    lua_createtable(L, (int)n, 0);
    for (lua_Integer i = 1; i <= n; i++) {
        if (lua_geti(L, text_idx, i) != LUA_TSTRING)
            luaL_error(L, "texts[%d] must be a string (got %s)", (int)i, luaL_typename(L, -1));
        CHECK(L, clh_tokenize(tok, lua_tostring(L, -1), (int)context, truncate, row));
        lua_pop(L, 1);
        push_ids(L, row, (size_t)context);
        lua_rawseti(L, -2, i);
    }
    lua_remove(L, -2);
}

/* tok:tokenize(text_or_texts[, {context=77, truncate=false}]) -> array of id arrays */
static int tok_tokenize(lua_State *L) {
    clh_tokenizer *tok = check_tok(L, 1);
    lua_settop(L, 3);
    tokenize_texts(L, tok, 2, 3, CLH_CONTEXT_LENGTH);
    return 1;
}

/* tok:decode(ids) -> text */
static int tok_decode(lua_State *L) {
    clh_tokenizer *tok = check_tok(L, 1);
    luaL_checktype(L, 2, LUA_TTABLE);
    lua_Integer n = luaL_len(L, 2);
    int32_t *ids = scratch(L, (size_t)n * sizeof(int32_t));
    for (lua_Integer i = 1; i <= n; i++) {
        lua_Integer v = table_int(L, 2, i, "ids");
        if (v < INT32_MIN || v > INT32_MAX)
            luaL_error(L, "ids[%d] is out of range", (int)i);
        ids[i - 1] = (int32_t)v;
    }
    char *text = NULL;
    CHECK(L, clh_tokenizer_decode(tok, ids, (size_t)n, &text));
    lua_pushstring(L, text ? text : "");
    free(text);
    return 1;
}

static int tok_tostring(lua_State *L) {
    TokBox *b = luaL_checkudata(L, 1, TOKENIZER_MT);
    if (b->tok)
        lua_pushfstring(L, "clhclip.Tokenizer (%d tokens)", clh_tokenizer_vocab_size(b->tok));
    else
        lua_pushstring(L, "clhclip.Tokenizer (freed)");
    return 1;
}

/* Push the directory this module was loaded from ("" when unknown). */
static void push_module_dir(lua_State *L) {
    lua_getfield(L, LUA_REGISTRYINDEX, REG_MODULE_DIR);
    if (!lua_isstring(L, -1)) {
        lua_pop(L, 1);
        lua_pushstring(L, "");
    }
}

/* Push the default vocabulary path, or nil and a message. Order: $CLHCLIP_VOCAB,
 * $CLHCLIP_SHARED_DATA/..., <module dir>/../../shared/data/..., ../shared/data/... */
static int push_default_vocab(lua_State *L) {
    const char *env = getenv("CLHCLIP_VOCAB");
    if (env && *env) {
        lua_pushstring(L, env);
        return 1;
    }
    const char *shared = getenv("CLHCLIP_SHARED_DATA");
    push_module_dir(L);
    const char *mdir = lua_tostring(L, -1);
    char cands[3][4096];
    int nc = 0;
    if (shared && *shared)
        snprintf(cands[nc++], sizeof cands[0], "%s/%s", shared, DEFAULT_VOCAB_NAME);
    if (*mdir)
        snprintf(cands[nc++], sizeof cands[0], "%s/../../shared/data/%s", mdir, DEFAULT_VOCAB_NAME);
    snprintf(cands[nc++], sizeof cands[0], "../shared/data/%s", DEFAULT_VOCAB_NAME);
    lua_pop(L, 1);
    for (int i = 0; i < nc; i++) {
        if (file_exists(cands[i])) {
            lua_pushstring(L, cands[i]);
            return 1;
        }
    }
    lua_pushnil(L);
    lua_pushfstring(L,
                    "no default vocabulary: set CLHCLIP_VOCAB (or CLHCLIP_SHARED_DATA) to find "
                    "%s; looked at %s%s%s",
                    DEFAULT_VOCAB_NAME, cands[0], nc > 1 ? ", " : "", nc > 1 ? cands[1] : "");
    return 2;
}

static int l_default_vocab(lua_State *L) {
    return push_default_vocab(L);
}

/* Push the default tokenizer (cached in the registry). */
static clh_tokenizer *push_default_tokenizer(lua_State *L) {
    if (lua_getfield(L, LUA_REGISTRYINDEX, REG_DEFAULT_TOK) == LUA_TUSERDATA) {
        TokBox *b = luaL_testudata(L, -1, TOKENIZER_MT);
        if (b && b->tok)
            return b->tok;
    }
    lua_pop(L, 1);
    if (push_default_vocab(L) == 2)
        lua_error(L);
    TokBox *b = push_tokenizer(L, lua_tostring(L, -1));
    lua_remove(L, -2);
    lua_pushvalue(L, -1);
    lua_setfield(L, LUA_REGISTRYINDEX, REG_DEFAULT_TOK);
    return b->tok;
}

/* clh.default_tokenizer() */
static int l_default_tokenizer(lua_State *L) {
    push_default_tokenizer(L);
    return 1;
}

/* clh.tokenize(texts[, opts]) with the default tokenizer */
static int l_tokenize(lua_State *L) {
    lua_settop(L, 2);
    clh_tokenizer *tok = push_default_tokenizer(L);
    tokenize_texts(L, tok, 1, 2, CLH_CONTEXT_LENGTH);
    return 1;
}

/* ================================================================== images */

typedef struct ImageBox {
    clh_image img;
} ImageBox;

static ImageBox *push_image_box(lua_State *L) {
    ImageBox *b = lua_newuserdatauv(L, sizeof *b, 0);
    memset(b, 0, sizeof *b);
    luaL_setmetatable(L, IMAGE_MT);
    return b;
}

static clh_image *check_image(lua_State *L, int idx) {
    ImageBox *b = luaL_checkudata(L, idx, IMAGE_MT);
    if (!b->img.data)
        luaL_error(L, "image was freed");
    return &b->img;
}

static int img_free(lua_State *L) {
    ImageBox *b = luaL_checkudata(L, 1, IMAGE_MT);
    clh_image_free(&b->img);
    return 0;
}

/* clh.load_image(path) -> Image */
static int l_load_image(lua_State *L) {
    const char *path = luaL_checkstring(L, 1);
    ImageBox *b = push_image_box(L);
    CHECK(L, clh_image_load(path, &b->img));
    return 1;
}

/* clh.image_from_rgb8(bytes, width, height) : bytes = width*height*3 RGB values */
static int l_image_from_rgb8(lua_State *L) {
    size_t len;
    const char *bytes = luaL_checklstring(L, 1, &len);
    lua_Integer w = luaL_checkinteger(L, 2), h = luaL_checkinteger(L, 3);
    luaL_argcheck(L, w > 0 && w <= 1 << 16, 2, "width must be 1..65536");
    luaL_argcheck(L, h > 0 && h <= 1 << 16, 3, "height must be 1..65536");
    if ((size_t)w * (size_t)h * 3 != len)
        luaL_error(L, "image_from_rgb8: %dx%d RGB needs %d bytes, got %d", (int)w, (int)h,
                   (int)(w * h * 3), (int)len);
    ImageBox *b = push_image_box(L);
    CHECK(L, clh_image_from_rgb8((const uint8_t *)bytes, (int)w, (int)h, &b->img));
    return 1;
}

static int img_resize(lua_State *L) {
    clh_image *img = check_image(L, 1);
    lua_Integer w = luaL_checkinteger(L, 2), h = luaL_checkinteger(L, 3);
    luaL_argcheck(L, w > 0 && w <= 1 << 16, 2, "width must be 1..65536");
    luaL_argcheck(L, h > 0 && h <= 1 << 16, 3, "height must be 1..65536");
    ImageBox *b = push_image_box(L);
    CHECK(L, clh_image_resize(img, (int)w, (int)h, &b->img));
    return 1;
}

/* img:crop(x, y, w, h) with a 0-based top-left corner */
static int img_crop(lua_State *L) {
    clh_image *img = check_image(L, 1);
    lua_Integer x = luaL_checkinteger(L, 2), y = luaL_checkinteger(L, 3);
    lua_Integer w = luaL_checkinteger(L, 4), h = luaL_checkinteger(L, 5);
    luaL_argcheck(L, x >= 0 && x < img->width, 2, "x out of range");
    luaL_argcheck(L, y >= 0 && y < img->height, 3, "y out of range");
    luaL_argcheck(L, w > 0 && w <= img->width, 4, "width out of range");
    luaL_argcheck(L, h > 0 && h <= img->height, 5, "height out of range");
    ImageBox *b = push_image_box(L);
    CHECK(L, clh_image_crop(img, (int)x, (int)y, (int)w, (int)h, &b->img));
    return 1;
}

/* img:pixel(x, y) -> r, g, b (0-based coordinates, values 0..255) */
static int img_pixel(lua_State *L) {
    clh_image *img = check_image(L, 1);
    lua_Integer x = luaL_checkinteger(L, 2), y = luaL_checkinteger(L, 3);
    luaL_argcheck(L, x >= 0 && x < img->width, 2, "x out of range");
    luaL_argcheck(L, y >= 0 && y < img->height, 3, "y out of range");
    const float *p = img->data + ((size_t)y * (size_t)img->width + (size_t)x) * 3;
    lua_pushnumber(L, p[0]);
    lua_pushnumber(L, p[1]);
    lua_pushnumber(L, p[2]);
    return 3;
}

/* img:save_png(path) (values rounded and clamped to 0..255) */
static int img_save_png(lua_State *L) {
    clh_image *img = check_image(L, 1);
    const char *path = luaL_checkstring(L, 2);
    size_t n = (size_t)img->width * (size_t)img->height * 3;
    uint8_t *px = scratch(L, n);
    for (size_t i = 0; i < n; i++) {
        float v = roundf(img->data[i]);
        px[i] = (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v);
    }
    CHECK(L, clh_png_write(path, px, img->width, img->height, 3));
    return 0;
}

static int img_index(lua_State *L) {
    ImageBox *b = luaL_checkudata(L, 1, IMAGE_MT);
    const char *key = lua_tostring(L, 2);
    if (key && strcmp(key, "width") == 0) {
        lua_pushinteger(L, b->img.width);
        return 1;
    }
    if (key && strcmp(key, "height") == 0) {
        lua_pushinteger(L, b->img.height);
        return 1;
    }
    luaL_getmetatable(L, IMAGE_MT);
    lua_getfield(L, -1, "methods");
    lua_pushvalue(L, 2);
    lua_rawget(L, -2);
    return 1;
}

static int img_tostring(lua_State *L) {
    ImageBox *b = luaL_checkudata(L, 1, IMAGE_MT);
    if (b->img.data)
        lua_pushfstring(L, "clhclip.Image %dx%d", b->img.width, b->img.height);
    else
        lua_pushstring(L, "clhclip.Image (freed)");
    return 1;
}

static clh_preprocess_mode check_mode(lua_State *L, int idx) {
    const char *mode = luaL_optstring(L, idx, "crop");
    if (strcmp(mode, "crop") == 0 || strcmp(mode, "center_crop") == 0)
        return CLH_PREPROCESS_CENTER_CROP;
    if (strcmp(mode, "resize") == 0)
        return CLH_PREPROCESS_RESIZE;
    luaL_argerror(L, idx, lua_pushfstring(L, "mode must be 'crop' or 'resize' (got '%s')", mode));
    return CLH_PREPROCESS_CENTER_CROP;
}

/* Preprocess the image or path at idx into dst[3*size*size]. */
static void preprocess_one(lua_State *L, int idx, int size, clh_preprocess_mode mode, float *dst) {
    if (lua_type(L, idx) == LUA_TSTRING) {
        ImageBox *b = push_image_box(L);
        CHECK(L, clh_image_load(lua_tostring(L, idx), &b->img));
        CHECK(L, clh_image_preprocess(&b->img, size, mode, dst));
        clh_image_free(&b->img);
        lua_pop(L, 1);
        return;
    }
    if (!luaL_testudata(L, idx, IMAGE_MT))
        luaL_error(L, "preprocess: expected an image path or clhclip.Image (got %s)",
                   luaL_typename(L, idx));
    CHECK(L, clh_image_preprocess(check_image(L, idx), size, mode, dst));
}

/* clh.preprocess(src, size[, mode="crop"][, ctx]) -> Tensor [N,3,size,size];
 * src: a path, an Image, or an array of them. */
static int l_preprocess(lua_State *L) {
    lua_Integer size = luaL_checkinteger(L, 2);
    luaL_argcheck(L, size > 0 && size <= 8192, 2, "size must be 1..8192");
    clh_preprocess_mode mode = check_mode(L, 3);
    int batch = lua_istable(L, 1);
    lua_Integer n = batch ? luaL_len(L, 1) : 1;
    if (batch && n < 1)
        luaL_argerror(L, 1, "empty image list");
    if (!batch && lua_type(L, 1) != LUA_TSTRING && !luaL_testudata(L, 1, IMAGE_MT))
        luaL_typeerror(L, 1, "path, clhclip.Image or array of them");
    CtxBox *c = push_ctx_arg(L, 4);
    TensorBox *tb = push_tensor_box(L, -1);
    size_t per = 3 * (size_t)size * (size_t)size;
    float *host = scratch(L, per * (size_t)n * sizeof(float));
    for (lua_Integer i = 0; i < n; i++) {
        if (batch) {
            lua_geti(L, 1, i + 1);
            preprocess_one(L, lua_gettop(L), (int)size, mode, host + per * (size_t)i);
            lua_pop(L, 1);
        } else {
            preprocess_one(L, 1, (int)size, mode, host);
        }
    }
    int64_t shape[4] = {n, 3, size, size};
    clh_tensor *t = NULL;
    CHECK(L, clh_tensor_from_host(c->ctx, 4, shape, host, &t));
    lua_pop(L, 1);
    tensor_adopt(L, tb, t, c);
    return 1;
}

/* img:preprocess(size[, mode][, ctx]) */
static int img_preprocess(lua_State *L) {
    check_image(L, 1);
    return l_preprocess(L);
}

/* ================================================================== CLIP */

typedef struct ClipBox {
    clh_clip *m;
    CtxBox *owner;
} ClipBox;

enum { CLIP_UV_CTX = 1, CLIP_UV_PATH = 2, CLIP_UV_TOK = 3 };

static ClipBox *check_clip_box(lua_State *L, int idx) {
    ClipBox *b = luaL_checkudata(L, idx, CLIP_MT);
    if (!b->m)
        luaL_error(L, "model was freed");
    return b;
}

/* clh.load_clip(path[, ctx]) -> CLIP */
static int l_load_clip(lua_State *L) {
    const char *path = luaL_checkstring(L, 1);
    CtxBox *c = push_ctx_arg(L, 2);
    int ctx_idx = lua_gettop(L);
    ClipBox *b = lua_newuserdatauv(L, sizeof *b, 3);
    b->m = NULL;
    b->owner = NULL;
    luaL_setmetatable(L, CLIP_MT);
    lua_pushvalue(L, ctx_idx);
    lua_setiuservalue(L, -2, CLIP_UV_CTX);
    lua_pushvalue(L, 1);
    lua_setiuservalue(L, -2, CLIP_UV_PATH);
    clh_clip *m = NULL;
    CHECK(L, clh_clip_load(c->ctx, path, &m));
    b->m = m;
    b->owner = c;
    c->children++;
    gc_pressure(L, c);
    return 1;
}

static int clip_free(lua_State *L) {
    ClipBox *b = luaL_checkudata(L, 1, CLIP_MT);
    if (b->m) {
        clh_clip_free(b->m);
        b->m = NULL;
        ctx_release_child(b->owner);
        b->owner = NULL;
    }
    return 0;
}

static const char *act_name(clh_activation a) {
    return a == CLH_ACT_GELU ? "gelu" : "quick_gelu";
}

static void push_tower_config(lua_State *L, const clh_clip_tower_config *t) {
    lua_createtable(L, 0, 6);
    lua_pushinteger(L, t->hidden);
    lua_setfield(L, -2, "hidden");
    lua_pushinteger(L, t->intermediate);
    lua_setfield(L, -2, "intermediate");
    lua_pushinteger(L, t->layers);
    lua_setfield(L, -2, "layers");
    lua_pushinteger(L, t->heads);
    lua_setfield(L, -2, "heads");
    lua_pushnumber(L, t->eps);
    lua_setfield(L, -2, "eps");
    lua_pushstring(L, act_name(t->act));
    lua_setfield(L, -2, "act");
}

static int clip_config(lua_State *L) {
    const clh_clip_config *cfg = clh_clip_get_config(check_clip_box(L, 1)->m);
    lua_createtable(L, 0, 10);
    push_tower_config(L, &cfg->vision);
    lua_setfield(L, -2, "vision");
    push_tower_config(L, &cfg->text);
    lua_setfield(L, -2, "text");
#define SET_INT(f)                                                                                 \
    lua_pushinteger(L, cfg->f);                                                                    \
    lua_setfield(L, -2, #f)
    SET_INT(image_size);
    SET_INT(patch_size);
    SET_INT(vocab_size);
    SET_INT(max_positions);
    SET_INT(eos_token_id);
    SET_INT(projection_dim);
#undef SET_INT
    lua_pushboolean(L, cfg->eos_argmax);
    lua_setfield(L, -2, "eos_argmax");
    lua_pushnumber(L, cfg->logit_scale);
    lua_setfield(L, -2, "logit_scale");
    return 1;
}

static int clip_logit_scale(lua_State *L) {
    lua_pushnumber(L, clh_clip_get_config(check_clip_box(L, 1)->m)->logit_scale);
    return 1;
}

static int clip_context(lua_State *L) {
    check_clip_box(L, 1);
    lua_getiuservalue(L, 1, CLIP_UV_CTX);
    return 1;
}

static int clip_path(lua_State *L) {
    check_clip_box(L, 1);
    lua_getiuservalue(L, 1, CLIP_UV_PATH);
    return 1;
}

/* Image request from the options table at idx ({pooled=true, dense=false,
 * dense_last_layer=false, hooks={...}}); hooks[] receives the block indices. */
static void read_image_request(lua_State *L, int idx, clh_image_request *req, int *hooks) {
    memset(req, 0, sizeof *req);
    req->want_pooled = opt_bool(L, idx, "pooled", 1);
    req->want_dense = opt_bool(L, idx, "dense", 0);
    req->dense_last_layer = opt_bool(L, idx, "dense_last_layer", 0);
    if (lua_isnoneornil(L, idx))
        return;
    if (lua_getfield(L, idx, "hooks") != LUA_TNIL) {
        if (!lua_istable(L, -1))
            luaL_error(L, "option 'hooks' must be an array of block indices");
        lua_Integer n = luaL_len(L, -1);
        if (n > 64)
            luaL_error(L, "at most 64 hooks (got %d)", (int)n);
        for (lua_Integer i = 1; i <= n; i++) {
            lua_Integer h = table_int(L, lua_gettop(L), i, "hooks");
            if (h < 0 || h > 1 << 20)
                luaL_error(L, "hooks[%d] = %d is not a block index", (int)i, (int)h);
            hooks[i - 1] = (int)h;
        }
        req->n_hooks = (int)n;
        req->hooks = hooks;
    }
    lua_pop(L, 1);
}

/* Push 2 + n_hooks empty tensor boxes (pooled, dense, hooks...) in the context at ctx_idx,
 * so that no output of the call that fills them can leak; returns the first one's index. */
static int push_image_boxes(lua_State *L, int ctx_idx, int n_hooks) {
    ctx_idx = lua_absindex(L, ctx_idx);
    luaL_checkstack(L, n_hooks + 8, "too many hooks");
    int first = lua_gettop(L) + 1;
    for (int i = 0; i < n_hooks + 2; i++)
        push_tensor_box(L, ctx_idx);
    return first;
}

/* Move the outputs into the boxes from `first` (push_image_boxes) and push the result
 * table {pooled=, dense=, hooks={[block]=...}}. */
static void push_image_result(lua_State *L, int first, const clh_image_request *req,
                              const clh_image_outputs *out, CtxBox *c) {
    clh_tensor *ts[66];
    ts[0] = out->pooled;
    ts[1] = out->dense;
    for (int i = 0; i < req->n_hooks; i++)
        ts[2 + i] = out->hooks[i];
    for (int i = 0; i < req->n_hooks + 2; i++)
        if (ts[i])
            tensor_adopt(L, lua_touserdata(L, first + i), ts[i], c);
    lua_createtable(L, 0, 3);
    int res = lua_gettop(L);
    if (out->pooled) {
        lua_pushvalue(L, first);
        lua_setfield(L, res, "pooled");
    }
    if (out->dense) {
        lua_pushvalue(L, first + 1);
        lua_setfield(L, res, "dense");
    }
    lua_createtable(L, 0, req->n_hooks);
    for (int i = 0; i < req->n_hooks; i++) {
        if (out->hooks[i]) {
            lua_pushvalue(L, first + 2 + i);
            lua_rawseti(L, -2, req->hooks[i]);
        }
    }
    lua_setfield(L, res, "hooks");
}

/* model:encode_image(pixels[, {pooled=true, dense=false, dense_last_layer=false,
 * hooks={...}}]) -> {pooled=Tensor|nil, dense=Tensor|nil, hooks={[i]=Tensor}}.
 * Hook indices are 0-based block indices, as in the C API. */
static int clip_encode_image(lua_State *L) {
    ClipBox *mb = check_clip_box(L, 1);
    clh_tensor *pixels = check_tensor(L, 2);
    check_opt_table(L, 3);
    lua_settop(L, 3);
    clh_image_request req;
    int hooks[64];
    read_image_request(L, 3, &req, hooks);
    lua_getiuservalue(L, 1, CLIP_UV_CTX);
    int first = push_image_boxes(L, -1, req.n_hooks);
    clh_image_outputs out;
    memset(&out, 0, sizeof out);
    CHECK(L, clh_clip_encode_image(mb->m, pixels, &req, &out));
    push_image_result(L, first, &req, &out, mb->owner);
    return 1;
}

/* Push the tokenizer for a model's text: opts.tokenizer, else the cached one, else the
 * model directory's vocab.json + merges.txt, else the default vocabulary. */
static clh_tokenizer *push_model_tokenizer(lua_State *L, int model_idx, int opt_idx) {
    if (!lua_isnoneornil(L, opt_idx) && lua_getfield(L, opt_idx, "tokenizer") != LUA_TNIL)
        return check_tok(L, lua_gettop(L));
    if (!lua_isnoneornil(L, opt_idx))
        lua_pop(L, 1);
    if (lua_getiuservalue(L, model_idx, CLIP_UV_TOK) == LUA_TUSERDATA) {
        TokBox *b = luaL_testudata(L, -1, TOKENIZER_MT);
        if (b && b->tok)
            return b->tok;
    }
    lua_pop(L, 1);
    lua_getiuservalue(L, model_idx, CLIP_UV_PATH);
    const char *path = lua_tostring(L, -1);
    char dir[4096];
    snprintf(dir, sizeof dir, "%s", path);
    if (!dir_exists(dir)) {
        char *slash = strrchr(dir, '/');
        if (slash)
            *slash = '\0';
        else
            snprintf(dir, sizeof dir, ".");
    }
    char vocab[4200];
    snprintf(vocab, sizeof vocab, "%s/vocab.json", dir);
    lua_pop(L, 1);
    if (file_exists(vocab))
        push_tokenizer(L, vocab);
    else
        push_default_tokenizer(L);
    lua_pushvalue(L, -1);
    lua_setiuservalue(L, model_idx, CLIP_UV_TOK);
    return ((TokBox *)lua_touserdata(L, -1))->tok;
}

/* model:tokenizer([opts]) -> the tokenizer encode_text uses for strings */
static int clip_tokenizer(lua_State *L) {
    check_clip_box(L, 1);
    check_opt_table(L, 2);
    lua_settop(L, 2);
    push_model_tokenizer(L, 1, 2);
    return 1;
}

/* Array of id arrays at idx -> int32 buffer pushed on the stack; *n rows, *ctx columns. */
static int32_t *read_id_rows(lua_State *L, int idx, int *n_out, int *ctx_out) {
    idx = lua_absindex(L, idx);
    lua_Integer n = luaL_len(L, idx);
    if (n < 1)
        luaL_error(L, "encode_text: no texts or ids given");
    lua_geti(L, idx, 1);
    int single = lua_type(L, -1) == LUA_TNUMBER;
    lua_pop(L, 1);
    if (single) { /* one row of ids */
        int32_t *ids = scratch(L, (size_t)n * sizeof(int32_t));
        for (lua_Integer i = 1; i <= n; i++) {
            lua_Integer v = table_int(L, idx, i, "ids");
            if (v < 0 || v > INT32_MAX)
                luaL_error(L, "ids[%d] = %d is not a token id", (int)i, (int)v);
            ids[i - 1] = (int32_t)v;
        }
        *n_out = 1;
        *ctx_out = (int)n;
        return ids;
    }
    if (lua_geti(L, idx, 1) != LUA_TTABLE)
        luaL_error(L, "encode_text: expected strings or arrays of token ids (got %s)",
                   luaL_typename(L, -1));
    lua_Integer context = luaL_len(L, -1);
    lua_pop(L, 1);
    if (context < 1 || context > 65536)
        luaL_error(L, "encode_text: id rows must have 1..65536 entries");
    int32_t *ids = scratch(L, (size_t)n * (size_t)context * sizeof(int32_t));
    for (lua_Integer r = 1; r <= n; r++) {
        if (lua_geti(L, idx, r) != LUA_TTABLE)
            luaL_error(L, "ids[%d] must be an array of token ids (got %s)", (int)r,
                       luaL_typename(L, -1));
        if (luaL_len(L, -1) != context)
            luaL_error(L, "ids[%d] has %d ids but ids[1] has %d; rows must be equally long", (int)r,
                       (int)luaL_len(L, -1), (int)context);
        for (lua_Integer i = 1; i <= context; i++) {
            lua_Integer v = table_int(L, lua_gettop(L), i, "ids row");
            if (v < 0 || v > INT32_MAX)
                luaL_error(L, "ids[%d][%d] = %d is not a token id", (int)r, (int)i, (int)v);
            ids[(r - 1) * context + (i - 1)] = (int32_t)v;
        }
        lua_pop(L, 1);
    }
    *n_out = (int)n;
    *ctx_out = (int)context;
    return ids;
}

/* model:encode_text(input[, {tokenizer=, context=, truncate=false}]) -> Tensor [n, P].
 * input: a string, an array of strings, an array of id arrays, or one id array. */
static int clip_encode_text(lua_State *L) {
    ClipBox *mb = check_clip_box(L, 1);
    check_opt_table(L, 3);
    lua_settop(L, 3);
    int is_text = lua_type(L, 2) == LUA_TSTRING;
    if (!is_text) {
        luaL_checktype(L, 2, LUA_TTABLE);
        lua_geti(L, 2, 1);
        is_text = lua_type(L, -1) == LUA_TSTRING;
        lua_pop(L, 1);
    }
    if (is_text) {
        clh_tokenizer *tok = push_model_tokenizer(L, 1, 3);
        int max_pos = clh_clip_get_config(mb->m)->max_positions;
        tokenize_texts(L, tok, 2, 3, max_pos < CLH_CONTEXT_LENGTH ? max_pos : CLH_CONTEXT_LENGTH);
        lua_replace(L, 2);
        lua_settop(L, 3);
    }
    int n = 0, context = 0;
    int32_t *ids = read_id_rows(L, 2, &n, &context);
    lua_getiuservalue(L, 1, CLIP_UV_CTX);
    TensorBox *tb = push_tensor_box(L, -1);
    clh_tensor *features = NULL;
    CHECK(L, clh_clip_encode_text(mb->m, ids, n, context, &features));
    tensor_adopt(L, tb, features, mb->owner);
    return 1;
}

static int clip_tostring(lua_State *L) {
    ClipBox *b = luaL_checkudata(L, 1, CLIP_MT);
    if (!b->m) {
        lua_pushstring(L, "clhclip.CLIP (freed)");
        return 1;
    }
    const clh_clip_config *c = clh_clip_get_config(b->m);
    lua_pushfstring(L, "clhclip.CLIP (vision %dx%d/%d @%d, text %dx%d, P=%d)", c->vision.layers,
                    c->vision.hidden, c->patch_size, c->image_size, c->text.layers, c->text.hidden,
                    c->projection_dim);
    return 1;
}

/* ================================================================== random numbers */

/* The process-wide generator of clh.manual_seed / clh.randn (torch's default
 * generator); its whole state is (seed, counter), saved with checkpoints. */
static clh_rng default_rng = {0, 0};

/* clh.manual_seed(n) */
static int l_manual_seed(lua_State *L) {
    clh_rng_seed(&default_rng, (uint64_t)luaL_checkinteger(L, 1));
    return 0;
}

static void push_rng_state(lua_State *L, const clh_rng *rng) {
    lua_createtable(L, 0, 2);
    lua_pushinteger(L, (lua_Integer)rng->seed);
    lua_setfield(L, -2, "seed");
    lua_pushinteger(L, (lua_Integer)rng->counter);
    lua_setfield(L, -2, "counter");
}

/* {seed=, counter=} at idx -> rng (64-bit values as Lua integers, two's complement). */
static void read_rng_state(lua_State *L, int idx, clh_rng *rng) {
    luaL_checktype(L, idx, LUA_TTABLE);
    const char *keys[2] = {"seed", "counter"};
    uint64_t v[2];
    for (int i = 0; i < 2; i++) {
        lua_getfield(L, idx, keys[i]);
        int isnum;
        v[i] = (uint64_t)lua_tointegerx(L, -1, &isnum);
        if (!isnum)
            luaL_error(L, "RNG state field '%s' must be an integer (got %s)", keys[i],
                       luaL_typename(L, -1));
        lua_pop(L, 1);
    }
    rng->seed = v[0];
    rng->counter = v[1];
}

/* clh.rng_state() -> {seed=, counter=} */
static int l_rng_state(lua_State *L) {
    push_rng_state(L, &default_rng);
    return 1;
}

/* clh.set_rng_state{seed=, counter=} */
static int l_set_rng_state(lua_State *L) {
    read_rng_state(L, 1, &default_rng);
    return 0;
}

/* clh.randn(shape[, std=1][, ctx]) -> Tensor of N(0, std^2) values from the default RNG */
static int l_randn(lua_State *L) {
    int64_t shape[CLH_MAX_DIMS];
    int ndim = check_shape(L, 1, shape);
    size_t numel = shape_numel(ndim, shape);
    double std = luaL_optnumber(L, 2, 1.0);
    luaL_argcheck(L, std >= 0 && isfinite(std), 2, "std must be finite and >= 0");
    CtxBox *c = push_ctx_arg(L, 3);
    TensorBox *b = push_tensor_box(L, -1);
    float *host = scratch(L, numel * sizeof(float));
    clh_rng_fill_normal(&default_rng, host, numel, (float)std);
    clh_tensor *t = NULL;
    CHECK(L, clh_tensor_from_host(c->ctx, ndim, shape, host, &t));
    lua_pop(L, 1);
    tensor_adopt(L, b, t, c);
    return 1;
}

/* ================================================================== AdamW */

typedef struct OptBox {
    clh_adamw *opt;
    CtxBox *owner;
    int n_groups;
} OptBox;

static OptBox *check_opt_box(lua_State *L, int idx) {
    OptBox *b = luaL_checkudata(L, idx, ADAMW_MT);
    if (!b->opt)
        luaL_error(L, "optimizer was freed");
    return b;
}

/* A tensor argument that must live in the context `c` (kernels cannot mix contexts). */
static clh_tensor *check_tensor_in(lua_State *L, int idx, CtxBox *c, const char *what) {
    TensorBox *b = luaL_testudata(L, idx, TENSOR_MT);
    if (!b)
        luaL_error(L, "%s must be a clhclip.Tensor (got %s)", what, luaL_typename(L, idx));
    if (!b->t)
        luaL_error(L, "%s: tensor was freed", what);
    if (b->owner != c)
        luaL_error(L, "%s belongs to another context", what);
    return b->t;
}

/* clh.adamw([ctx]) -> AdamW (parameter groups are added with :add_group) */
static int l_adamw(lua_State *L) {
    CtxBox *c = push_ctx_arg(L, 1);
    int ctx_idx = lua_gettop(L);
    OptBox *b = lua_newuserdatauv(L, sizeof *b, 1);
    memset(b, 0, sizeof *b);
    luaL_setmetatable(L, ADAMW_MT);
    lua_pushvalue(L, ctx_idx);
    lua_setiuservalue(L, -2, 1);
    clh_adamw *opt = NULL;
    CHECK(L, clh_adamw_new(c->ctx, &opt));
    b->opt = opt;
    b->owner = c;
    c->children++;
    return 1;
}

static int adamw_free(lua_State *L) {
    OptBox *b = luaL_checkudata(L, 1, ADAMW_MT);
    if (b->opt) {
        clh_adamw_free(b->opt);
        b->opt = NULL;
        ctx_release_child(b->owner);
        b->owner = NULL;
    }
    return 0;
}

/* Group settings from the table at idx over *cfg (fields left out keep their value). */
static void read_adamw_config(lua_State *L, int idx, clh_adamw_config *cfg) {
    cfg->lr = (float)opt_num(L, idx, "lr", cfg->lr);
    cfg->eps = (float)opt_num(L, idx, "eps", cfg->eps);
    cfg->weight_decay = (float)opt_num(L, idx, "weight_decay", cfg->weight_decay);
    int t = lua_getfield(L, idx, "betas");
    if (t == LUA_TTABLE) {
        cfg->beta1 = table_float(L, lua_gettop(L), 1, "betas");
        cfg->beta2 = table_float(L, lua_gettop(L), 2, "betas");
    } else if (t != LUA_TNIL) {
        luaL_error(L, "option 'betas' must be a table {beta1, beta2} (got %s)",
                   luaL_typename(L, -1));
    }
    lua_pop(L, 1);
}

/* 1-based group argument at idx -> 0-based group index. */
static int check_group(lua_State *L, OptBox *b, int idx) {
    lua_Integer g = luaL_checkinteger(L, idx);
    if (g < 1 || g > b->n_groups)
        luaL_error(L, "parameter group %d does not exist (the optimizer has %d)", (int)g,
                   b->n_groups);
    return (int)g - 1;
}

/* opt:add_group{lr=1e-3, betas={0.9, 0.999}, eps=1e-8, weight_decay=1e-2} -> group (1-based).
 * The defaults are torch.optim.AdamW's. */
static int adamw_add_group(lua_State *L) {
    OptBox *b = check_opt_box(L, 1);
    check_opt_table(L, 2);
    lua_settop(L, 2);
    clh_adamw_config cfg = {
        .lr = 1e-3f, .beta1 = 0.9f, .beta2 = 0.999f, .eps = 1e-8f, .weight_decay = 1e-2f};
    if (!lua_isnil(L, 2))
        read_adamw_config(L, 2, &cfg);
    int group = 0;
    CHECK(L, clh_adamw_add_group(b->opt, &cfg, &group));
    b->n_groups = group + 1;
    lua_pushinteger(L, group + 1);
    return 1;
}

/* opt:add(group, param, grad): the optimizer keeps both tensors alive. */
static int adamw_add(lua_State *L) {
    OptBox *b = check_opt_box(L, 1);
    int group = check_group(L, b, 2);
    clh_tensor *p = check_tensor_in(L, 3, b->owner, "param");
    clh_tensor *g = check_tensor_in(L, 4, b->owner, "grad");
    CHECK(L, clh_adamw_add_param(b->opt, group, p, g));
    return 0;
}

/* opt:clip_grad_norm(max_norm) -> norm before clipping */
static int adamw_clip_grad_norm(lua_State *L) {
    OptBox *b = check_opt_box(L, 1);
    double norm = 0;
    CHECK(L, clh_adamw_clip_grad_norm(b->opt, (float)luaL_checknumber(L, 2), &norm));
    lua_pushnumber(L, norm);
    return 1;
}

/* opt:step([lr_scale=1]) */
static int adamw_step(lua_State *L) {
    OptBox *b = check_opt_box(L, 1);
    CHECK(L, clh_adamw_step(b->opt, (float)luaL_optnumber(L, 2, 1.0)));
    return 0;
}

static int adamw_zero_grad(lua_State *L) {
    CHECK(L, clh_adamw_zero_grad(check_opt_box(L, 1)->opt));
    return 0;
}

static int adamw_steps(lua_State *L) {
    lua_pushinteger(L, clh_adamw_steps(check_opt_box(L, 1)->opt));
    return 1;
}

static int adamw_set_steps(lua_State *L) {
    OptBox *b = check_opt_box(L, 1);
    lua_Integer t = luaL_checkinteger(L, 2);
    luaL_argcheck(L, t >= 0, 2, "step count must be >= 0");
    clh_adamw_set_steps(b->opt, (long)t);
    return 0;
}

static int adamw_num_params(lua_State *L) {
    lua_pushinteger(L, clh_adamw_num_params(check_opt_box(L, 1)->opt));
    return 1;
}

static int adamw_num_groups(lua_State *L) {
    lua_pushinteger(L, check_opt_box(L, 1)->n_groups);
    return 1;
}

/* opt:group(g) -> {lr=, betas={b1, b2}, eps=, weight_decay=} */
static int adamw_group(lua_State *L) {
    OptBox *b = check_opt_box(L, 1);
    const clh_adamw_config *c = clh_adamw_group_config(b->opt, check_group(L, b, 2));
    lua_createtable(L, 0, 4);
    lua_pushnumber(L, c->lr);
    lua_setfield(L, -2, "lr");
    lua_createtable(L, 2, 0);
    lua_pushnumber(L, c->beta1);
    lua_rawseti(L, -2, 1);
    lua_pushnumber(L, c->beta2);
    lua_rawseti(L, -2, 2);
    lua_setfield(L, -2, "betas");
    lua_pushnumber(L, c->eps);
    lua_setfield(L, -2, "eps");
    lua_pushnumber(L, c->weight_decay);
    lua_setfield(L, -2, "weight_decay");
    return 1;
}

/* opt:set_group(g, {lr=, betas=, eps=, weight_decay=}): the fields given replace the
 * group's (checked at the next step, as torch would at construction). */
static int adamw_set_group(lua_State *L) {
    OptBox *b = check_opt_box(L, 1);
    clh_adamw_config *c = clh_adamw_group_config(b->opt, check_group(L, b, 2));
    luaL_checktype(L, 3, LUA_TTABLE);
    clh_adamw_config next = *c;
    read_adamw_config(L, 3, &next);
    *c = next;
    return 0;
}

/* opt:set_lr(g, lr) */
static int adamw_set_lr(lua_State *L) {
    OptBox *b = check_opt_box(L, 1);
    clh_adamw_config *c = clh_adamw_group_config(b->opt, check_group(L, b, 2));
    double lr = luaL_checknumber(L, 3);
    luaL_argcheck(L, lr >= 0 && isfinite(lr), 3, "lr must be finite and >= 0");
    c->lr = (float)lr;
    return 0;
}

static int adamw_tostring(lua_State *L) {
    OptBox *b = luaL_checkudata(L, 1, ADAMW_MT);
    if (!b->opt)
        lua_pushstring(L, "clhclip.AdamW (freed)");
    else
        lua_pushfstring(L, "clhclip.AdamW (%d parameters in %d groups, %d steps)",
                        clh_adamw_num_params(b->opt), b->n_groups, (int)clh_adamw_steps(b->opt));
    return 1;
}

/* clh.cosine_schedule(t, total, warmup) -> lr multiplier for 0-based step t */
static int l_cosine_schedule(lua_State *L) {
    lua_Integer t = luaL_checkinteger(L, 1);
    lua_Integer total = luaL_checkinteger(L, 2);
    lua_Integer warmup = luaL_optinteger(L, 3, 0);
    luaL_argcheck(L, total > 0, 2, "total must be > 0");
    luaL_argcheck(L, warmup >= 0 && warmup <= total, 3, "warmup must be in 0..total");
    lua_pushnumber(L, clh_cosine_schedule((long)t, (long)total, (long)warmup));
    return 1;
}

/* ================================================================== H-CLIP */

typedef struct HclipBox {
    clh_hclip *h;
    CtxBox *owner;
    ClipBox *base;          /* kept alive through HCLIP_UV_CLIP */
    int hooks[64], n_hooks; /* hooks of the last training forward (for :backward) */
} HclipBox;

/* User values: the CLIP userdata, its context, and the cached {params, grads} arrays. */
enum { HCLIP_UV_CLIP = 1, HCLIP_UV_CTX = 2, HCLIP_UV_PARAMS = 3 }; /* 1, 2: link_to_clip */

static HclipBox *check_hclip_box(lua_State *L, int idx) {
    HclipBox *b = luaL_checkudata(L, idx, HCLIP_MT);
    if (!b->h)
        luaL_error(L, "H-CLIP was freed");
    if (!b->base->m)
        luaL_error(L, "the H-CLIP's base model was freed");
    return b;
}

static clh_ortho check_ortho(lua_State *L, int idx) {
    static const char *names[] = {"text", "both", "none", "vision"};
    if (lua_isnoneornil(L, idx))
        return CLH_ORTHO_TEXT;
    int t = lua_getfield(L, idx, "ortho");
    if (t == LUA_TNIL) {
        lua_pop(L, 1);
        return CLH_ORTHO_TEXT;
    }
    if (t != LUA_TSTRING)
        luaL_error(L, "option 'ortho' must be a string (got %s)", luaL_typename(L, -1));
    const char *s = lua_tostring(L, -1);
    for (int i = 0; i < 4; i++)
        if (strcmp(s, names[i]) == 0) {
            lua_pop(L, 1);
            return (clh_ortho)i;
        }
    luaL_error(L, "option 'ortho' must be \"text\", \"both\", \"none\" or \"vision\" (got \"%s\")",
               s);
    return CLH_ORTHO_TEXT;
}

static const char *ortho_name(clh_ortho o) {
    static const char *names[] = {"text", "both", "none", "vision"};
    return (unsigned)o <= CLH_ORTHO_VISION ? names[o] : "?";
}

/* Adapter options of the table at idx (none: the defaults), as clh.hclip takes them. */
static void read_adapter_options(lua_State *L, int idx, clh_hclip_options *o) {
    memset(o, 0, sizeof *o);
    lua_Integer q = opt_int(L, idx, "block_size", 128);
    if (q < 1 || q > 1 << 16)
        luaL_error(L, "option 'block_size' must be 1..65536 (got %d)", (int)q);
    o->block_size = (int)q;
    o->ortho = check_ortho(L, idx);
    o->no_modality_map = !opt_bool(L, idx, "modality_map", 1);
    o->no_layer_map = !opt_bool(L, idx, "layer_map", 1);
    o->recompute = opt_bool(L, idx, "recompute", 0);
}

/* The new userdata on the stack top keeps the CLIP at clip_idx (user value 1) and its
 * context (user value 2) alive: models built on a CLIP borrow it. */
static void link_to_clip(lua_State *L, int clip_idx) {
    lua_pushvalue(L, clip_idx);
    lua_setiuservalue(L, -2, 1);
    lua_getiuservalue(L, clip_idx, CLIP_UV_CTX);
    lua_setiuservalue(L, -2, 2);
}

/* clh.hclip(model[, {block_size=128, ortho="text", modality_map=true, layer_map=true,
 * recompute=false}]) -> HCLIP, adapters on `model` initialised to the identity. */
static int l_hclip(lua_State *L) {
    ClipBox *mb = check_clip_box(L, 1);
    check_opt_table(L, 2);
    lua_settop(L, 2);
    clh_hclip_options o;
    read_adapter_options(L, 2, &o);
    HclipBox *b = lua_newuserdatauv(L, sizeof *b, 3);
    memset(b, 0, sizeof *b);
    luaL_setmetatable(L, HCLIP_MT);
    link_to_clip(L, 1);
    b->base = mb;
    clh_hclip *h = NULL;
    CHECK(L, clh_hclip_new(mb->m, &o, &h));
    b->h = h;
    b->owner = mb->owner;
    b->owner->children++;
    gc_pressure(L, b->owner);
    return 1;
}

static int hclip_free(lua_State *L) {
    HclipBox *b = luaL_checkudata(L, 1, HCLIP_MT);
    if (b->h) {
        clh_hclip_free(b->h); /* also gives back a pending forward's workspace */
        b->h = NULL;
        ctx_release_child(b->owner);
        b->owner = NULL;
        lua_pushnil(L);
        lua_setiuservalue(L, 1, HCLIP_UV_PARAMS);
    }
    return 0;
}

/* Is the cached {params, grads} pair on the stack top complete (no tensor freed)? */
static int param_cache_valid(lua_State *L, int n) {
    if (!lua_istable(L, -1))
        return 0;
    for (int k = 1; k <= 2; k++) {
        lua_rawgeti(L, -1, k);
        for (int i = 1; i <= n; i++) {
            lua_rawgeti(L, -1, i);
            TensorBox *tb = luaL_testudata(L, -1, TENSOR_MT);
            lua_pop(L, 1);
            if (!tb || !tb->t) {
                lua_pop(L, 1);
                return 0;
            }
        }
        lua_pop(L, 1);
    }
    return 1;
}

/* Build {params, grads}: Tensor userdata on the library's own tensors (retained), each
 * keeping the HCLIP at idx alive through its second user value. */
static void build_param_cache(lua_State *L, int idx, HclipBox *hb) {
    int n = clh_hclip_num_params(hb->h);
    lua_getiuservalue(L, idx, HCLIP_UV_CTX);
    int ctx_idx = lua_gettop(L);
    lua_createtable(L, 2, 0);
    int cache = lua_gettop(L);
    for (int k = 1; k <= 2; k++) {
        lua_createtable(L, n, 0);
        for (int i = 0; i < n; i++) {
            clh_tensor *p = NULL, *g = NULL;
            CHECK(L, clh_hclip_param(hb->h, i, NULL, &p, &g));
            TensorBox *tb = lua_newuserdatauv(L, sizeof *tb, 2);
            tb->t = NULL;
            tb->owner = NULL;
            luaL_setmetatable(L, TENSOR_MT);
            lua_pushvalue(L, ctx_idx);
            lua_setiuservalue(L, -2, 1);
            lua_pushvalue(L, idx);
            lua_setiuservalue(L, -2, 2);
            clh_tensor *t = k == 1 ? p : g;
            clh_tensor_retain(t);
            tensor_adopt(L, tb, t, hb->owner);
            lua_rawseti(L, -2, i + 1);
        }
        lua_rawseti(L, cache, k);
    }
    lua_pushvalue(L, cache);
    lua_setiuservalue(L, idx, HCLIP_UV_PARAMS);
    lua_remove(L, ctx_idx); /* leaves the cache on the top */
}

/* Push a fresh array holding the entries of the array on the stack top. */
static void push_array_copy(lua_State *L, int src, int n) {
    src = lua_absindex(L, src);
    lua_createtable(L, n, 0);
    for (int i = 1; i <= n; i++) {
        lua_rawgeti(L, src, i);
        lua_rawseti(L, -2, i);
    }
}

/* h:parameters() -> params, grads: arrays of Tensors on the adapters' own memory (P, A, B
 * and their gradients, as nn's parameters()). The same userdata come back on every call. */
static int hclip_parameters(lua_State *L) {
    HclipBox *hb = check_hclip_box(L, 1);
    lua_settop(L, 1);
    int n = clh_hclip_num_params(hb->h);
    lua_getiuservalue(L, 1, HCLIP_UV_PARAMS);
    if (!param_cache_valid(L, n)) {
        lua_pop(L, 1);
        build_param_cache(L, 1, hb);
    }
    int cache = lua_gettop(L);
    lua_rawgeti(L, cache, 1);
    push_array_copy(L, -1, n);
    lua_rawgeti(L, cache, 2);
    push_array_copy(L, -1, n);
    lua_remove(L, -2);
    lua_remove(L, -3);
    return 2;
}

/* h:param_names() -> {"hclip.P", "hclip.A", "hclip.B"} (A/B absent when switched off) */
static int hclip_param_names(lua_State *L) {
    HclipBox *hb = check_hclip_box(L, 1);
    int n = clh_hclip_num_params(hb->h);
    lua_createtable(L, n, 0);
    for (int i = 0; i < n; i++) {
        const char *name = NULL;
        CHECK(L, clh_hclip_param(hb->h, i, &name, NULL, NULL));
        lua_pushstring(L, name);
        lua_rawseti(L, -2, i + 1);
    }
    return 1;
}

/* Drop the activations a pending training forward keeps (hc:discard()). */
static int hclip_discard(lua_State *L) {
    clh_hclip_discard(check_hclip_box(L, 1)->h);
    return 0;
}

static int hclip_zero_grad(lua_State *L) {
    CHECK(L, clh_hclip_zero_grad(check_hclip_box(L, 1)->h));
    return 0;
}

static int hclip_update(lua_State *L) {
    CHECK(L, clh_hclip_update(check_hclip_box(L, 1)->h));
    return 0;
}

/* Token ids for the text input at idx (strings, an array of strings, an array of id
 * arrays or one id array) pushed as a scratch buffer; options at opt_idx. */
static int32_t *hclip_text_ids(lua_State *L, HclipBox *hb, int idx, int opt_idx, int *n,
                               int *context) {
    int is_text = lua_type(L, idx) == LUA_TSTRING;
    if (!is_text) {
        if (!lua_istable(L, idx))
            luaL_error(L,
                       "forward: texts must be a string, an array of strings or of token id "
                       "arrays (got %s)",
                       luaL_typename(L, idx));
        lua_geti(L, idx, 1);
        is_text = lua_type(L, -1) == LUA_TSTRING;
        lua_pop(L, 1);
    }
    if (is_text) {
        lua_getiuservalue(L, 1, HCLIP_UV_CLIP);
        clh_tokenizer *tok = push_model_tokenizer(L, lua_gettop(L), opt_idx);
        int max_pos = clh_clip_get_config(hb->base->m)->max_positions;
        tokenize_texts(L, tok, idx, opt_idx,
                       max_pos < CLH_CONTEXT_LENGTH ? max_pos : CLH_CONTEXT_LENGTH);
        idx = lua_gettop(L);
    }
    return read_id_rows(L, idx, n, context);
}

/* h:forward(pixels|nil[, request][, texts|nil][, {train=true, tokenizer=, context=,
 * truncate=}]) -> {pooled=, dense=, hooks={[block]=...}, text=}. With train (the
 * default) the activations are kept for :backward. */
static int hclip_forward(lua_State *L) {
    HclipBox *hb = check_hclip_box(L, 1);
    lua_settop(L, 5);
    const clh_tensor *pixels = NULL;
    if (!lua_isnil(L, 2))
        pixels = check_tensor_in(L, 2, hb->owner, "forward: pixels");
    if (!lua_isnil(L, 3) && !lua_istable(L, 3))
        luaL_typeerror(L, 3, "table or nil");
    check_opt_table(L, 5);
    if (!pixels && lua_isnil(L, 4))
        luaL_error(L, "forward: give pixels, texts or both");
    int train = opt_bool(L, 5, "train", 1);
    clh_image_request req;
    int hooks[64];
    read_image_request(L, 3, &req, hooks);
    int n_text = 0, context = 0;
    const int32_t *ids = NULL;
    if (!lua_isnil(L, 4))
        ids = hclip_text_ids(L, hb, 4, 5, &n_text, &context);
    lua_getiuservalue(L, 1, HCLIP_UV_CTX);
    int first = push_image_boxes(L, -1, pixels ? req.n_hooks : 0);
    TensorBox *text_box = push_tensor_box(L, first - 1);
    int text_idx = lua_gettop(L);
    if (train) { /* the hooks :backward maps gradOutput.hooks to */
        hb->n_hooks = pixels ? req.n_hooks : 0;
        memcpy(hb->hooks, hooks, sizeof(int) * (size_t)hb->n_hooks);
    }
    clh_image_outputs out;
    memset(&out, 0, sizeof out);
    clh_tensor *text = NULL;
    CHECK(L, clh_hclip_forward(hb->h, train, pixels, pixels ? &req : NULL, pixels ? &out : NULL,
                               ids, n_text, context, n_text > 0 ? &text : NULL));
    if (text)
        tensor_adopt(L, text_box, text, hb->owner);
    if (pixels) {
        push_image_result(L, first, &req, &out, hb->owner);
    } else {
        lua_createtable(L, 0, 1);
    }
    if (text) {
        lua_pushvalue(L, text_idx);
        lua_setfield(L, -2, "text");
    }
    return 1;
}

/* Field `key` of the gradient table at idx: a Tensor in the model's context, or NULL.
 * The value stays on the stack (so the tensor stays alive during the call). */
static const clh_tensor *grad_field(lua_State *L, HclipBox *hb, int idx, const char *key) {
    if (lua_getfield(L, idx, key) == LUA_TNIL)
        return NULL;
    char what[64];
    snprintf(what, sizeof what, "backward: gradOutput.%s", key);
    return check_tensor_in(L, lua_gettop(L), hb->owner, what);
}

/* gradOutput.hooks {[block]=Tensor} -> d_hooks in the order of the forward's hooks. */
static int grad_hooks(lua_State *L, HclipBox *hb, int idx, const clh_tensor **d_hooks) {
    if (lua_getfield(L, idx, "hooks") == LUA_TNIL)
        return 0;
    if (!lua_istable(L, -1))
        luaL_error(L, "backward: gradOutput.hooks must be a table {[block]=Tensor} (got %s)",
                   luaL_typename(L, -1));
    int t = lua_gettop(L), any = 0;
    lua_pushnil(L);
    while (lua_next(L, t)) {
        int isnum;
        lua_Integer block = lua_tointegerx(L, -2, &isnum);
        if (!isnum)
            luaL_error(L, "backward: gradOutput.hooks keys must be block indices (got %s)",
                       luaL_typename(L, -2));
        int slot = -1;
        for (int i = 0; i < hb->n_hooks; i++)
            if (hb->hooks[i] == block)
                slot = i;
        if (slot < 0)
            luaL_error(L,
                       "backward: gradOutput.hooks[%d]: the last training forward did not hook "
                       "block %d",
                       (int)block, (int)block);
        char what[64];
        snprintf(what, sizeof what, "backward: gradOutput.hooks[%d]", (int)block);
        d_hooks[slot] = check_tensor_in(L, -1, hb->owner, what);
        any = 1;
        lua_pop(L, 1); /* the table keeps the tensor alive */
    }
    return any;
}

/* h:backward{pooled=, dense=, hooks={[block]=}, text=}: gradients of the outputs of the
 * last training forward (missing ones count as zero), accumulated into the grads. */
static int hclip_backward(lua_State *L) {
    HclipBox *hb = check_hclip_box(L, 1);
    luaL_checktype(L, 2, LUA_TTABLE);
    lua_settop(L, 2);
    const clh_tensor *dp = grad_field(L, hb, 2, "pooled");
    const clh_tensor *dd = grad_field(L, hb, 2, "dense");
    const clh_tensor *dt = grad_field(L, hb, 2, "text");
    const clh_tensor *dh[64] = {NULL};
    int any_hook = grad_hooks(L, hb, 2, dh);
    CHECK(L, clh_hclip_backward(hb->h, dp, dd, any_hook ? dh : NULL, dt));
    return 0;
}

/* h:export_folded(dir): plain CLIP weights with the transforms folded in */
static int hclip_export_folded(lua_State *L) {
    HclipBox *hb = check_hclip_box(L, 1);
    CHECK(L, clh_hclip_export_folded(hb->h, luaL_checkstring(L, 2)));
    return 0;
}

/* Option 'optimizer' of the table at idx: an AdamW, or a table holding one in its field
 * 'optimizer' (an optim state or optim.AdamW); NULL when absent. Stays on the stack. */
static clh_adamw *opt_optimizer(lua_State *L, int idx, const CtxBox *owner) {
    if (lua_isnoneornil(L, idx) || lua_getfield(L, idx, "optimizer") == LUA_TNIL)
        return NULL;
    if (lua_istable(L, -1))
        lua_getfield(L, -1, "optimizer");
    OptBox *b = luaL_testudata(L, -1, ADAMW_MT);
    if (!b)
        luaL_error(L,
                   "option 'optimizer' must be a clhclip.AdamW or a table holding one in its "
                   "field 'optimizer' (got %s)",
                   luaL_typename(L, -1));
    if (!b->opt)
        luaL_error(L, "option 'optimizer': optimizer was freed");
    if (b->owner != owner)
        luaL_error(L, "option 'optimizer' belongs to another context");
    return b->opt;
}

/* h:save(path[, {optimizer=, step=, rng=true, extra=json}]). The training state (step
 * and an RNG state: the default generator's for rng=true, or a given {seed=, counter=})
 * is written unless rng=false. */
static int hclip_save(lua_State *L) {
    HclipBox *hb = check_hclip_box(L, 1);
    const char *path = luaL_checkstring(L, 2);
    check_opt_table(L, 3);
    lua_settop(L, 3);
    clh_adamw *opt = opt_optimizer(L, 3, hb->owner);
    clh_train_state state = {.step = opt ? clh_adamw_steps(opt) : 0, .rng = default_rng};
    int has_step = 0, with_state = 1;
    const char *extra = NULL;
    if (!lua_isnil(L, 3)) {
        lua_getfield(L, 3, "step");
        has_step = !lua_isnil(L, -1);
        state.step = (long)opt_int(L, 3, "step", state.step);
        int t = lua_getfield(L, 3, "rng");
        if (t == LUA_TTABLE)
            read_rng_state(L, lua_gettop(L), &state.rng);
        else if (t == LUA_TBOOLEAN)
            with_state = lua_toboolean(L, -1);
        else if (t != LUA_TNIL)
            luaL_error(L, "option 'rng' must be a boolean or {seed=, counter=} (got %s)",
                       luaL_typename(L, -1));
        t = lua_getfield(L, 3, "extra");
        if (t == LUA_TSTRING)
            extra = lua_tostring(L, -1);
        else if (t != LUA_TNIL)
            luaL_error(L, "option 'extra' must be a (JSON) string (got %s)", luaL_typename(L, -1));
    }
    if (!with_state && has_step)
        luaL_error(L, "save: a checkpoint stores the step together with an RNG state; "
                      "rng=false cannot be combined with step");
    luaL_argcheck(L, state.step >= 0, 3, "step must be >= 0");
    CHECK(L, clh_hclip_save_checkpoint(hb->h, opt, with_state ? &state : NULL, extra, path));
    return 0;
}

/* h:load(path[, {optimizer=, rng=true}]) -> {step=, rng={seed=, counter=}, extra=,
 * optimizer_steps=}. When the file holds a training state, the default RNG continues
 * from it unless rng=false. */
static int hclip_load(lua_State *L) {
    HclipBox *hb = check_hclip_box(L, 1);
    const char *path = luaL_checkstring(L, 2);
    check_opt_table(L, 3);
    lua_settop(L, 3);
    clh_adamw *opt = opt_optimizer(L, 3, hb->owner);
    int restore_rng = opt_bool(L, 3, "rng", 1);
    /* Peek at the metadata: a training state is optional in the format. */
    StBox *sb = lua_newuserdatauv(L, sizeof *sb, 0);
    sb->f = NULL;
    luaL_setmetatable(L, STFILE_MT);
    clh_st_file *f = NULL;
    CHECK(L, clh_st_open(path, &f));
    sb->f = f;
    int has_state = clh_st_metadata(f, "step") != NULL;
    const char *extra = clh_st_metadata(f, "extra");
    if (extra)
        lua_pushstring(L, extra);
    else
        lua_pushnil(L);
    int extra_idx = lua_gettop(L);
    clh_st_close(sb->f);
    sb->f = NULL;
    clh_train_state state;
    memset(&state, 0, sizeof state);
    CHECK(L, clh_hclip_load_checkpoint(hb->h, opt, has_state ? &state : NULL, path));
    if (has_state && restore_rng)
        default_rng = state.rng;
    lua_createtable(L, 0, 4);
    if (has_state) {
        lua_pushinteger(L, state.step);
        lua_setfield(L, -2, "step");
        push_rng_state(L, &state.rng);
        lua_setfield(L, -2, "rng");
    }
    lua_pushvalue(L, extra_idx);
    lua_setfield(L, -2, "extra");
    if (opt) {
        lua_pushinteger(L, clh_adamw_steps(opt));
        lua_setfield(L, -2, "optimizer_steps");
    }
    return 1;
}

/* 1-based layer option of the table at idx (nil: def) -> 0-based index. */
static int opt_layer(lua_State *L, int idx, const char *key, int def) {
    lua_Integer v = opt_int(L, idx, key, def + 1);
    if (v < 1)
        luaL_error(L, "option '%s' is a 1-based layer number (got %d)", key, (int)v);
    return (int)v - 1;
}

/* h:he_loss{lambda=0, s=1, text=true, vision=true, first=1, last=nil}: the
 * hyperspherical-energy term added by :backward (layers 1-based, inclusive; last=nil
 * means up to each tower's last layer). lambda=0 switches it off. */
static int hclip_he_loss(lua_State *L) {
    HclipBox *hb = check_hclip_box(L, 1);
    luaL_checktype(L, 2, LUA_TTABLE);
    clh_he_options o;
    memset(&o, 0, sizeof o);
    o.lambda = (float)opt_num(L, 2, "lambda", 0.0);
    o.s = (float)opt_num(L, 2, "s", 1.0);
    o.text = opt_bool(L, 2, "text", 1);
    o.vision = opt_bool(L, 2, "vision", 1);
    o.first_layer = opt_layer(L, 2, "first", 0);
    o.last_layer = -1; /* up to each tower's last layer */
    lua_getfield(L, 2, "last");
    if (!lua_isnil(L, -1))
        o.last_layer = opt_layer(L, 2, "last", 0);
    lua_pop(L, 1);
    if (o.last_layer >= 0 && o.last_layer < o.first_layer)
        luaL_error(L, "he_loss: last layer %d is before first layer %d", o.last_layer + 1,
                   o.first_layer + 1);
    CHECK(L, clh_hclip_set_he_loss(hb->h, &o));
    return 0;
}

/* h:he_loss_value() -> the term's value at the last :backward */
static int hclip_he_loss_value(lua_State *L) {
    lua_pushnumber(L, clh_hclip_he_loss(check_hclip_box(L, 1)->h));
    return 1;
}

/* h:he_drift([s=1]) -> {text={[layer]={q, k, v, o}}, vision={...}}: relative drift
 * (HE(W') - HE(W)) / HE(W) of every adapted matrix; layers 1-based. */
static int hclip_he_drift(lua_State *L) {
    HclipBox *hb = check_hclip_box(L, 1);
    double s = luaL_optnumber(L, 2, 1.0);
    luaL_argcheck(L, s >= 0 && isfinite(s), 2, "s must be finite and >= 0");
    const clh_dcrc_layout *lay = clh_hclip_layout(hb->h);
    int lm = lay->text_layers > lay->vision_layers ? lay->text_layers : lay->vision_layers;
    double *drift = scratch(L, (size_t)2 * lm * 4 * sizeof(double));
    CHECK(L, clh_hclip_he_drift(hb->h, (float)s, drift));
    lua_createtable(L, 0, 2);
    const char *towers[2] = {"text", "vision"};
    int layers[2] = {lay->text_layers, lay->vision_layers};
    for (int e = 0; e < 2; e++) {
        lua_createtable(L, layers[e], 0);
        for (int l = 0; l < layers[e]; l++) {
            lua_createtable(L, 4, 0);
            for (int t = 0; t < 4; t++) {
                lua_pushnumber(L, drift[((size_t)e * lm + l) * 4 + t]);
                lua_rawseti(L, -2, t + 1);
            }
            lua_rawseti(L, -2, l + 1);
        }
        lua_setfield(L, -2, towers[e]);
    }
    return 1;
}

/* h:layout() -> {block_size=, text_layers=, vision_layers=, text_blocks=, vision_blocks=,
 * n_blocks=, ortho=, modality_map=, layer_map=, recompute=} */
static int hclip_layout(lua_State *L) {
    HclipBox *hb = check_hclip_box(L, 1);
    const clh_dcrc_layout *lay = clh_hclip_layout(hb->h);
    const clh_hclip_options *o = clh_hclip_get_options(hb->h);
    lua_createtable(L, 0, 10);
#define SET_INT(k, v)                                                                              \
    lua_pushinteger(L, (v));                                                                       \
    lua_setfield(L, -2, k)
#define SET_BOOL(k, v)                                                                             \
    lua_pushboolean(L, (v));                                                                       \
    lua_setfield(L, -2, k)
    SET_INT("block_size", lay->q);
    SET_INT("text_layers", lay->text_layers);
    SET_INT("vision_layers", lay->vision_layers);
    SET_INT("text_blocks", lay->text_blocks);
    SET_INT("vision_blocks", lay->vision_blocks);
    SET_INT("n_blocks", clh_dcrc_num_blocks(lay));
    SET_BOOL("modality_map", !o->no_modality_map);
    SET_BOOL("layer_map", !o->no_layer_map);
    SET_BOOL("recompute", o->recompute != 0);
#undef SET_INT
#undef SET_BOOL
    lua_pushstring(L, ortho_name(o->ortho));
    lua_setfield(L, -2, "ortho");
    return 1;
}

/* h:model() -> the CLIP the adapters sit on */
static int hclip_model(lua_State *L) {
    check_hclip_box(L, 1);
    lua_getiuservalue(L, 1, HCLIP_UV_CLIP);
    return 1;
}

static int hclip_tostring(lua_State *L) {
    HclipBox *b = luaL_checkudata(L, 1, HCLIP_MT);
    if (!b->h) {
        lua_pushstring(L, "clhclip.HCLIP (freed)");
        return 1;
    }
    const clh_dcrc_layout *lay = clh_hclip_layout(b->h);
    lua_pushfstring(L, "clhclip.HCLIP (block %d, %d blocks, ortho %s)", lay->q,
                    clh_dcrc_num_blocks(lay), ortho_name(clh_hclip_get_options(b->h)->ortho));
    return 1;
}

/* ================================================================== safe variants */

/* clh.safe.f(...) calls clh.f(...) and returns nil, message instead of raising. */
static int safe_call(lua_State *L) {
    int nargs = lua_gettop(L);
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    if (lua_pcall(L, nargs, LUA_MULTRET, 0) != LUA_OK) {
        lua_pushnil(L);
        lua_insert(L, -2);
        return 2;
    }
    return lua_gettop(L);
}

/* clh.now() -> monotonic wall-clock seconds (for timing lines in scripts) */
static int l_now(lua_State *L) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    lua_pushnumber(L, (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9);
    return 1;
}

/* ================================================================== registration */

static const luaL_Reg ctx_methods[] = {
    {"device", ctx_device},
    {"finish", ctx_finish},
    {"build_all", ctx_build_all},
    {"build_seconds", ctx_build_seconds},
    {"device_bytes", ctx_device_bytes},
    {"peak_device_bytes", ctx_peak_device_bytes},
    {"error", ctx_error},
    {"profile", ctx_profile},
    {"profile_reset", ctx_profile_reset},
    {"free", ctx_free},
    {NULL, NULL},
};

static const luaL_Reg ctx_meta[] = {
    {"__gc", ctx_free},
    {"__close", ctx_free},
    {"__tostring", ctx_tostring},
    {NULL, NULL},
};

static const luaL_Reg tensor_methods[] = {
    {"shape", t_shape},   {"size", t_size},       {"dim", t_dim},         {"numel", t_numel},
    {"offset", t_offset}, {"context", t_context}, {"totable", t_totable}, {"copy", t_copy},
    {"fill", t_fill},     {"view", t_view},       {"clone", t_clone},     {"save", t_save},
    {"free", t_free},     {NULL, NULL},
};

static const luaL_Reg tensor_meta[] = {
    {"__gc", t_free},           {"__close", t_free}, {"__len", t_numel},
    {"__tostring", t_tostring}, {NULL, NULL},
};

static const luaL_Reg st_methods[] = {
    {"names", st_names},       {"info", st_info},   {"read", st_read}, {"tensor", st_tensor},
    {"metadata", st_metadata}, {"close", st_close}, {NULL, NULL},
};

static const luaL_Reg st_meta[] = {
    {"__gc", st_close},
    {"__close", st_close},
    {NULL, NULL},
};

static const luaL_Reg tok_methods[] = {
    {"encode", tok_encode}, {"tokenize", tok_tokenize},
    {"decode", tok_decode}, {"sot", tok_sot},
    {"eot", tok_eot},       {"vocab_size", tok_vocab_size},
    {"free", tok_free},     {NULL, NULL},
};

static const luaL_Reg tok_meta[] = {
    {"__gc", tok_free},
    {"__close", tok_free},
    {"__tostring", tok_tostring},
    {NULL, NULL},
};

static const luaL_Reg img_methods[] = {
    {"preprocess", img_preprocess},
    {"resize", img_resize},
    {"crop", img_crop},
    {"pixel", img_pixel},
    {"save_png", img_save_png},
    {"free", img_free},
    {NULL, NULL},
};

static const luaL_Reg img_meta[] = {
    {"__gc", img_free},           {"__close", img_free}, {"__index", img_index},
    {"__tostring", img_tostring}, {NULL, NULL},
};

static const luaL_Reg clip_methods[] = {
    {"config", clip_config},
    {"logit_scale", clip_logit_scale},
    {"context", clip_context},
    {"path", clip_path},
    {"tokenizer", clip_tokenizer},
    {"encode_image", clip_encode_image},
    {"encode_text", clip_encode_text},
    {"free", clip_free},
    {NULL, NULL},
};

static const luaL_Reg adamw_methods[] = {
    {"add_group", adamw_add_group},
    {"add", adamw_add},
    {"clip_grad_norm", adamw_clip_grad_norm},
    {"step", adamw_step},
    {"zero_grad", adamw_zero_grad},
    {"steps", adamw_steps},
    {"set_steps", adamw_set_steps},
    {"num_params", adamw_num_params},
    {"num_groups", adamw_num_groups},
    {"group", adamw_group},
    {"set_group", adamw_set_group},
    {"set_lr", adamw_set_lr},
    {"free", adamw_free},
    {NULL, NULL},
};

static const luaL_Reg adamw_meta[] = {
    {"__gc", adamw_free},
    {"__close", adamw_free},
    {"__tostring", adamw_tostring},
    {NULL, NULL},
};

static const luaL_Reg hclip_methods[] = {
    {"parameters", hclip_parameters},
    {"param_names", hclip_param_names},
    {"zero_grad", hclip_zero_grad},
    {"discard", hclip_discard},
    {"update", hclip_update},
    {"forward", hclip_forward},
    {"backward", hclip_backward},
    {"export_folded", hclip_export_folded},
    {"save", hclip_save},
    {"load", hclip_load},
    {"he_loss", hclip_he_loss},
    {"he_loss_value", hclip_he_loss_value},
    {"he_drift", hclip_he_drift},
    {"layout", hclip_layout},
    {"model", hclip_model},
    {"free", hclip_free},
    {NULL, NULL},
};

static const luaL_Reg hclip_meta[] = {
    {"__gc", hclip_free},
    {"__close", hclip_free},
    {"__tostring", hclip_tostring},
    {NULL, NULL},
};

static const luaL_Reg clip_meta[] = {
    {"__gc", clip_free},
    {"__close", clip_free},
    {"__tostring", clip_tostring},
    {NULL, NULL},
};

/* Functions that take an optional trailing context also exist as Context methods
 * (ctx:tensor(shape, data) == clh.tensor(shape, data, ctx)); these wrappers move the
 * context from argument 1 to argument `pos`. */
#define CTX_METHOD(name, fn, pos)                                                                  \
    static int name(lua_State *L) {                                                                \
        check_ctx(L, 1);                                                                           \
        lua_settop(L, pos);                                                                        \
        lua_pushvalue(L, 1);                                                                       \
        lua_remove(L, 1);                                                                          \
        return fn(L);                                                                              \
    }
CTX_METHOD(ctx_tensor, l_tensor, 3)
CTX_METHOD(ctx_load_clip, l_load_clip, 2)
CTX_METHOD(ctx_load_tensor, l_load_tensor, 3)
CTX_METHOD(ctx_preprocess, l_preprocess, 4)
CTX_METHOD(ctx_randn, l_randn, 3)
CTX_METHOD(ctx_adamw, l_adamw, 1)

static const luaL_Reg ctx_ctor_methods[] = {
    {"tensor", ctx_tensor},
    {"load_clip", ctx_load_clip},
    {"load_tensor", ctx_load_tensor},
    {"preprocess", ctx_preprocess},
    {"randn", ctx_randn},
    {"adamw", ctx_adamw},
    {NULL, NULL},
};

/* ================================================================== segmentation model */

typedef struct SegBox {
    clh_segmodel *m;
    CtxBox *owner;
    ClipBox *base; /* kept alive through SEG_UV_CLIP; clip:free() can still destroy it */
} SegBox;

enum { SEG_UV_CLIP = 1, SEG_UV_CTX = 2 }; /* as link_to_clip sets them */

static SegBox *check_seg(lua_State *L, int idx) {
    SegBox *b = luaL_checkudata(L, idx, SEGMODEL_MT);
    if (!b->m)
        luaL_error(L, "segmentation model was freed");
    if (!b->base->m)
        luaL_error(L, "the segmentation model's CLIP was freed");
    return b;
}

static int opt_pair(lua_State *L, int idx, const char *key, int *out) {
    if (lua_getfield(L, idx, key) == LUA_TNIL) {
        lua_pop(L, 1);
        return 0;
    }
    if (!lua_istable(L, -1) || luaL_len(L, -1) != 2)
        luaL_error(L, "option '%s' must be an array of two integers", key);
    for (int i = 0; i < 2; i++)
        out[i] = (int)table_int(L, lua_gettop(L), i + 1, key);
    lua_pop(L, 1);
    return 1;
}

/* Head fields of the table at idx over the defaults in *c (missing keys keep them). */
static void read_head_config(lua_State *L, int idx, clh_cathead_config *c) {
    struct {
        const char *k;
        int *v;
    } ints[] = {{"d_img", &c->d_img},         {"d_vis", &c->d_vis},
                {"n_prompts", &c->n_prompts}, {"hidden", &c->hidden},
                {"heads", &c->heads},         {"appearance_proj", &c->appearance_proj},
                {"text_proj", &c->text_proj}, {"gn_group_size", &c->gn_group_size},
                {"window", &c->window},       {"pad_len", &c->pad_len},
                {"mlp_ratio", &c->mlp_ratio}, {"n_layers", &c->n_layers}};
    for (size_t i = 0; i < sizeof ints / sizeof *ints; i++)
        *ints[i].v = (int)opt_int(L, idx, ints[i].k, *ints[i].v);
    opt_pair(L, idx, "guidance_up", c->guidance_up);
    opt_pair(L, idx, "decoder_guidance_proj", c->decoder_guidance_proj);
    opt_pair(L, idx, "decoder", c->decoder);
}

static void push_int_pair(lua_State *L, const int *v) {
    lua_createtable(L, 2, 0);
    for (int i = 0; i < 2; i++) {
        lua_pushinteger(L, v[i]);
        lua_rawseti(L, -2, i + 1);
    }
}

static void push_head_config(lua_State *L, const clh_cathead_config *c) {
    lua_createtable(L, 0, 16);
    const struct {
        const char *k;
        int v;
    } ints[] = {{"d_img", c->d_img},         {"d_vis", c->d_vis},
                {"n_prompts", c->n_prompts}, {"hidden", c->hidden},
                {"heads", c->heads},         {"appearance_proj", c->appearance_proj},
                {"text_proj", c->text_proj}, {"gn_group_size", c->gn_group_size},
                {"window", c->window},       {"pad_len", c->pad_len},
                {"mlp_ratio", c->mlp_ratio}, {"n_layers", c->n_layers}};
    for (size_t i = 0; i < sizeof ints / sizeof *ints; i++) {
        lua_pushinteger(L, ints[i].v);
        lua_setfield(L, -2, ints[i].k);
    }
    push_int_pair(L, c->guidance_up);
    lua_setfield(L, -2, "guidance_up");
    push_int_pair(L, c->decoder_guidance_proj);
    lua_setfield(L, -2, "decoder_guidance_proj");
    push_int_pair(L, c->decoder);
    lua_setfield(L, -2, "decoder");
}

static void push_seg_options(lua_State *L, const clh_segmodel_options *o) {
    lua_createtable(L, 0, 6);
    lua_pushinteger(L, o->image_size);
    lua_setfield(L, -2, "image_size");
    push_int_pair(L, o->hooks);
    lua_setfield(L, -2, "hooks");
    push_head_config(L, &o->head);
    lua_setfield(L, -2, "head");
    lua_createtable(L, 0, 4);
    lua_pushinteger(L, o->adapter.block_size);
    lua_setfield(L, -2, "block_size");
    lua_pushstring(L, ortho_name(o->adapter.ortho));
    lua_setfield(L, -2, "ortho");
    lua_pushboolean(L, !o->adapter.no_modality_map);
    lua_setfield(L, -2, "modality_map");
    lua_pushboolean(L, !o->adapter.no_layer_map);
    lua_setfield(L, -2, "layer_map");
    lua_setfield(L, -2, "adapter");
}

static void read_seg_options(lua_State *L, int idx, const clh_clip *clip, clh_segmodel_options *o) {
    clh_segmodel_options_default(o);
    clh_cathead_config_for_clip(clh_clip_get_config(clip), &o->head);
    o->adapter.block_size = 128;
    if (lua_isnoneornil(L, idx))
        return;
    o->image_size = (int)opt_int(L, idx, "image_size", 384);
    opt_pair(L, idx, "hooks", o->hooks);
    o->seed = (uint64_t)opt_int(L, idx, "seed", 0);
    if (lua_getfield(L, idx, "head") == LUA_TTABLE)
        read_head_config(L, lua_gettop(L), &o->head);
    lua_pop(L, 1);
    if (lua_getfield(L, idx, "adapter") == LUA_TTABLE)
        read_adapter_options(L, lua_gettop(L), &o->adapter);
    lua_pop(L, 1);
}

/* clh.segmodel(clip[, {image_size=384, hooks={3, 7} (0-based vision blocks; default L/3-1, 2L/3-1),
 * seed=0, head={...}, adapter={...}}]) -> SegModel */
static int l_segmodel(lua_State *L) {
    ClipBox *mb = check_clip_box(L, 1);
    check_opt_table(L, 2);
    lua_settop(L, 2);
    clh_segmodel_options o;
    read_seg_options(L, 2, mb->m, &o);
    SegBox *b = lua_newuserdatauv(L, sizeof *b, 2);
    memset(b, 0, sizeof *b);
    luaL_setmetatable(L, SEGMODEL_MT);
    link_to_clip(L, 1);
    b->base = mb;
    clh_segmodel *m = NULL;
    CHECK(L, clh_segmodel_new(mb->m, &o, &m));
    b->m = m;
    b->owner = mb->owner;
    b->owner->children++;
    gc_pressure(L, b->owner);
    return 1;
}

/* clh.segmodel_options(path) -> options table (as clh.segmodel takes) and the templates,
 * read from a checkpoint or a folded export's head.safetensors. */
static int l_segmodel_options(lua_State *L) {
    const char *path = luaL_checkstring(L, 1);
    clh_segmodel_options o;
    char *templ = NULL;
    CHECK(L, clh_segmodel_checkpoint_options(path, &o, &templ));
    push_seg_options(L, &o);
    if (templ)
        lua_pushstring(L, templ);
    else
        lua_pushnil(L);
    free(templ);
    return 2;
}

static int seg_free(lua_State *L) {
    SegBox *b = luaL_checkudata(L, 1, SEGMODEL_MT);
    if (b->m) {
        clh_segmodel_free(b->m);
        b->m = NULL;
        ctx_release_child(b->owner);
        b->owner = NULL;
    }
    return 0;
}

/* Array of strings at idx -> scratch array of C strings (kept alive by the table). */
static const char **string_array(lua_State *L, int idx, int *n, const char *what) {
    luaL_checktype(L, idx, LUA_TTABLE);
    lua_Integer len = luaL_len(L, idx);
    if (len < 1 || len > 1000000)
        luaL_error(L, "%s must be a non-empty array of strings", what);
    const char **out = scratch(L, (size_t)len * sizeof *out);
    for (lua_Integer i = 1; i <= len; i++) {
        lua_rawgeti(L, idx, i);
        if (lua_type(L, -1) != LUA_TSTRING)
            luaL_error(L, "%s[%d] must be a string (got %s)", what, (int)i, luaL_typename(L, -1));
        out[i - 1] = lua_tostring(L, -1);
        lua_pop(L, 1); /* the string stays referenced by the table */
    }
    *n = (int)len;
    return out;
}

/* m:set_templates{"A photo of a {} in the scene"} */
static int seg_set_templates(lua_State *L) {
    SegBox *b = check_seg(L, 1);
    int n;
    const char **t = string_array(L, 2, &n, "templates");
    CHECK(L, clh_segmodel_set_templates(b->m, t, n));
    return 0;
}

/* m:set_classes(names[, tokenizer]) (default tokenizer: the CLIP vocabulary). */
static int seg_set_classes(lua_State *L) {
    SegBox *b = check_seg(L, 1);
    lua_settop(L, 3); /* the scratch array below must not land in the tokenizer's slot */
    int n;
    const char **names = string_array(L, 2, &n, "classes");
    clh_tokenizer *tok = lua_isnoneornil(L, 3) ? push_default_tokenizer(L) : check_tok(L, 3);
    CHECK(L, clh_segmodel_set_classes(b->m, tok, names, n));
    return 0;
}

static int seg_num_classes(lua_State *L) {
    lua_pushinteger(L, clh_segmodel_num_classes(check_seg(L, 1)->m));
    return 1;
}

/* m:train_step(batch[, {pool=2, ignore=255, exclude_ignored=false}]) -> mean loss */
static int seg_train_step(lua_State *L) {
    SegBox *b = check_seg(L, 1);
    int size, crop;
    const float *px = clhl_batch_pixels(L, 2, &size, &crop);
    const int32_t *labels = clhl_batch_labels(L, 2, &size, &crop);
    check_opt_table(L, 3);
    int want = clh_segmodel_get_options(b->m)->image_size;
    if (crop != want)
        luaL_error(L, "train_step: the batch crop is %d, the model takes %d", crop, want);
    clh_seg_train_options o = {.pool = 2, .loss = {255, 0}};
    if (!lua_isnoneornil(L, 3)) {
        o.pool = (int)opt_int(L, 3, "pool", 2);
        o.loss.ignore_label = (int)opt_int(L, 3, "ignore", 255);
        o.loss.exclude_ignored = opt_bool(L, 3, "exclude_ignored", 0);
    }
    double loss = 0;
    CHECK(L, clh_segmodel_train_step(b->m, px, labels, size, &o, &loss));
    lua_pushnumber(L, loss);
    return 1;
}

/* m:parameters() -> array of {name=, param=Tensor, grad=Tensor, clip=bool, no_decay=bool} */
static int seg_parameters(lua_State *L) {
    SegBox *b = check_seg(L, 1);
    lua_settop(L, 1);
    lua_getiuservalue(L, 1, SEG_UV_CTX);
    int ctx_idx = lua_gettop(L);
    int n = clh_segmodel_num_params(b->m);
    lua_createtable(L, n, 0);
    for (int i = 0; i < n; i++) {
        const char *name;
        clh_tensor *p, *g;
        int is_clip, no_decay;
        CHECK(L, clh_segmodel_param(b->m, i, &name, &p, &g, &is_clip, &no_decay));
        lua_createtable(L, 0, 5);
        lua_pushstring(L, name);
        lua_setfield(L, -2, "name");
        clh_tensor *both[2] = {p, g};
        const char *keys[2] = {"param", "grad"};
        for (int k = 0; k < 2; k++) {
            TensorBox *tb = lua_newuserdatauv(L, sizeof *tb, 2);
            tb->t = NULL;
            tb->owner = NULL;
            luaL_setmetatable(L, TENSOR_MT);
            lua_pushvalue(L, ctx_idx);
            lua_setiuservalue(L, -2, 1);
            lua_pushvalue(L, 1); /* keeps the model alive */
            lua_setiuservalue(L, -2, 2);
            clh_tensor_retain(both[k]);
            tensor_adopt(L, tb, both[k], b->owner);
            lua_setfield(L, -2, keys[k]);
        }
        lua_pushboolean(L, is_clip);
        lua_setfield(L, -2, "clip");
        lua_pushboolean(L, no_decay);
        lua_setfield(L, -2, "no_decay");
        lua_rawseti(L, -2, i + 1);
    }
    return 1;
}

static int seg_zero_grad(lua_State *L) {
    CHECK(L, clh_segmodel_zero_grad(check_seg(L, 1)->m));
    return 0;
}

static int seg_update(lua_State *L) {
    CHECK(L, clh_segmodel_update(check_seg(L, 1)->m));
    return 0;
}

/* m:predict(image[, {sliding=true}]) -> Label map (image size), scores {per class max} */
static int seg_predict(lua_State *L) {
    SegBox *b = check_seg(L, 1);
    clh_image *img = check_image(L, 2);
    check_opt_table(L, 3);
    clh_seg_predict_options o = {.sliding = 1};
    if (!lua_isnoneornil(L, 3))
        o.sliding = opt_bool(L, 3, "sliding", 1);
    int t = clh_segmodel_num_classes(b->m);
    if (t < 1)
        luaL_error(L, "predict: set the classes first (m:set_classes)");
    float *scores = scratch(L, (size_t)t * sizeof *scores);
    clh_label_map *map = clhl_push_label(L);
    CHECK(L, clh_label_map_new(img->width, img->height, 0, map));
    CHECK(L, clh_segmodel_predict(b->m, img, &o, map->ids, scores));
    lua_createtable(L, t, 0);
    for (int i = 0; i < t; i++) {
        lua_pushnumber(L, scores[i]);
        lua_rawseti(L, -2, i + 1);
    }
    return 2;
}

/* m:save(path[, {optimizer=, step=, extra=json}]) (the default RNG state is stored) */
static int seg_save(lua_State *L) {
    SegBox *b = check_seg(L, 1);
    const char *path = luaL_checkstring(L, 2);
    check_opt_table(L, 3);
    lua_settop(L, 3);
    clh_adamw *opt = opt_optimizer(L, 3, b->owner);
    clh_train_state state = {.step = opt ? clh_adamw_steps(opt) : 0, .rng = default_rng};
    const char *extra = NULL;
    if (!lua_isnil(L, 3)) {
        state.step = (long)opt_int(L, 3, "step", state.step);
        int t = lua_getfield(L, 3, "extra");
        if (t == LUA_TSTRING)
            extra = lua_tostring(L, -1);
        else if (t != LUA_TNIL)
            luaL_error(L, "option 'extra' must be a (JSON) string (got %s)", luaL_typename(L, -1));
    }
    luaL_argcheck(L, state.step >= 0, 3, "step must be >= 0");
    CHECK(L, clh_segmodel_save(b->m, opt, &state, extra, path));
    return 0;
}

/* m:load(path[, {optimizer=}]) -> {step=, extra=}; a folded export's head.safetensors
 * loads the head only. */
static int seg_load(lua_State *L) {
    SegBox *b = check_seg(L, 1);
    const char *path = luaL_checkstring(L, 2);
    check_opt_table(L, 3);
    lua_settop(L, 3);
    clh_adamw *opt = opt_optimizer(L, 3, b->owner);
    StBox *sb = lua_newuserdatauv(L, sizeof *sb, 0);
    sb->f = NULL;
    luaL_setmetatable(L, STFILE_MT);
    clh_st_file *f = NULL;
    CHECK(L, clh_st_open(path, &f));
    sb->f = f;
    const char *format = clh_st_metadata(f, "format");
    int head_only = format && strcmp(format, "clhclip-seghead") == 0;
    const char *extra = clh_st_metadata(f, "extra");
    lua_pushstring(L, extra ? extra : "");
    int extra_idx = lua_gettop(L);
    clh_st_close(sb->f);
    sb->f = NULL;
    clh_train_state state;
    memset(&state, 0, sizeof state);
    if (head_only)
        CHECK(L, clh_segmodel_load_head(b->m, path));
    else
        CHECK(L, clh_segmodel_load(b->m, opt, &state, path));
    lua_createtable(L, 0, 2);
    lua_pushinteger(L, state.step);
    lua_setfield(L, -2, "step");
    if (extra) {
        lua_pushvalue(L, extra_idx);
        lua_setfield(L, -2, "extra");
    }
    return 1;
}

static int seg_export(lua_State *L) {
    CHECK(L, clh_segmodel_export(check_seg(L, 1)->m, luaL_checkstring(L, 2)));
    return 0;
}

static int seg_options(lua_State *L) {
    push_seg_options(L, clh_segmodel_get_options(check_seg(L, 1)->m));
    return 1;
}

static int seg_tostring(lua_State *L) {
    SegBox *b = luaL_checkudata(L, 1, SEGMODEL_MT);
    if (!b->m) {
        lua_pushstring(L, "clhclip.SegModel (freed)");
        return 1;
    }
    const clh_segmodel_options *o = clh_segmodel_get_options(b->m);
    lua_pushfstring(L, "clhclip.SegModel (input %d, head hidden %d, %d classes, %d tensors)",
                    o->image_size, o->head.hidden, clh_segmodel_num_classes(b->m),
                    clh_segmodel_num_params(b->m));
    return 1;
}

static const luaL_Reg seg_methods[] = {
    {"set_templates", seg_set_templates},
    {"set_classes", seg_set_classes},
    {"num_classes", seg_num_classes},
    {"train_step", seg_train_step},
    {"parameters", seg_parameters},
    {"zero_grad", seg_zero_grad},
    {"update", seg_update},
    {"predict", seg_predict},
    {"save", seg_save},
    {"load", seg_load},
    {"export", seg_export},
    {"options", seg_options},
    {"free", seg_free},
    {NULL, NULL},
};

static const luaL_Reg seg_meta[] = {
    {"__gc", seg_free},
    {"__close", seg_free},
    {"__tostring", seg_tostring},
    {NULL, NULL},
};

static const luaL_Reg module_funcs[] = {
    {"devices", l_devices},
    {"init", l_init},
    {"context", l_context},
    {"profile_table", l_profile_table},
    {"tensor", l_tensor},
    {"safetensors", l_safetensors},
    {"load_tensor", l_load_tensor},
    {"save_tensors", l_save_tensors},
    {"tokenizer", l_tokenizer},
    {"default_vocab", l_default_vocab},
    {"default_tokenizer", l_default_tokenizer},
    {"tokenize", l_tokenize},
    {"load_image", l_load_image},
    {"image_from_rgb8", l_image_from_rgb8},
    {"preprocess", l_preprocess},
    {"load_clip", l_load_clip},
    {"l2_normalize", l_l2_normalize},
    {"softmax", l_softmax},
    {"add", l_add},
    {"gelu", l_gelu},
    {"quick_gelu", l_quick_gelu},
    {"layer_norm", l_layer_norm},
    {"linear", l_linear},
    {"matmul", l_matmul},
    {"manual_seed", l_manual_seed},
    {"rng_state", l_rng_state},
    {"set_rng_state", l_set_rng_state},
    {"randn", l_randn},
    {"hclip", l_hclip},
    {"adamw", l_adamw},
    {"cosine_schedule", l_cosine_schedule},
    {"segmodel", l_segmodel},
    {"segmodel_options", l_segmodel_options},
    {"now", l_now},
    {NULL, NULL},
};

/* Metatable `tname` with metamethods `meta` and methods `methods` (as __index unless
 * meta sets its own __index, in which case they go to the "methods" field). */
void clhl_new_class(lua_State *L, const char *tname, const luaL_Reg *meta,
                    const luaL_Reg *methods) {
    luaL_newmetatable(L, tname);
    luaL_setfuncs(L, meta, 0);
    lua_newtable(L);
    luaL_setfuncs(L, methods, 0);
    if (lua_getfield(L, -2, "__index") == LUA_TNIL) {
        lua_pop(L, 1);
        lua_setfield(L, -2, "__index");
    } else {
        lua_pop(L, 1);
        lua_setfield(L, -2, "methods");
    }
    lua_pushstring(L, tname);
    lua_setfield(L, -2, "__name");
    lua_pop(L, 1);
}

/* Remember the directory of the loaded .so (require passes its path as argument 2). */
static void store_module_dir(lua_State *L) {
    const char *file = lua_tostring(L, 2);
    if (!file)
        return;
    const char *slash = strrchr(file, '/');
    if (slash)
        lua_pushlstring(L, file, (size_t)(slash - file));
    else
        lua_pushstring(L, ".");
    lua_setfield(L, LUA_REGISTRYINDEX, REG_MODULE_DIR);
}

int luaopen_clhclip(lua_State *L) {
    store_module_dir(L);
    clhl_new_class(L, CTX_MT, ctx_meta, ctx_methods);
    luaL_getmetatable(L, CTX_MT);
    lua_getfield(L, -1, "__index");
    luaL_setfuncs(L, ctx_ctor_methods, 0);
    lua_pop(L, 2);
    clhl_new_class(L, TENSOR_MT, tensor_meta, tensor_methods);
    clhl_new_class(L, STFILE_MT, st_meta, st_methods);
    clhl_new_class(L, TOKENIZER_MT, tok_meta, tok_methods);
    clhl_new_class(L, IMAGE_MT, img_meta, img_methods);
    clhl_new_class(L, CLIP_MT, clip_meta, clip_methods);
    clhl_new_class(L, ADAMW_MT, adamw_meta, adamw_methods);
    clhl_new_class(L, HCLIP_MT, hclip_meta, hclip_methods);
    clhl_new_class(L, SEGMODEL_MT, seg_meta, seg_methods);

    luaL_newlib(L, module_funcs);
    lua_pushstring(L, CLHCLIP_VERSION);
    lua_setfield(L, -2, "version");
    lua_pushstring(L, "clhclip");
    lua_setfield(L, -2, "_NAME");
    lua_pushinteger(L, CLH_CONTEXT_LENGTH);
    lua_setfield(L, -2, "CONTEXT_LENGTH");
    lua_createtable(L, 3, 0);
    lua_createtable(L, 3, 0);
    for (int i = 0; i < 3; i++) {
        lua_pushnumber(L, CLH_CLIP_MEAN[i]);
        lua_rawseti(L, -3, i + 1);
        lua_pushnumber(L, CLH_CLIP_STD[i]);
        lua_rawseti(L, -2, i + 1);
    }
    lua_setfield(L, -3, "CLIP_STD");
    lua_setfield(L, -2, "CLIP_MEAN");

    /* clh.safe: every function above, returning nil, message instead of raising. */
    lua_newtable(L);
    for (const luaL_Reg *r = module_funcs; r->name; r++) {
        lua_pushcfunction(L, r->func);
        lua_pushcclosure(L, safe_call, 1);
        lua_setfield(L, -2, r->name);
    }
    lua_setfield(L, -2, "safe");
    clhl_open_data(L);
    return 1;
}
