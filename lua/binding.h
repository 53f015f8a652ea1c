/*
 * Shared pieces of the Lua binding, which is split into one file per area
 * (clhclip_lua.c: contexts, tensors, models; clhclip_data_lua.c: datasets and metrics).
 * Every part only converts types and errors.
 */
#ifndef CLHCLIP_LUA_BINDING_H
#define CLHCLIP_LUA_BINDING_H

#include <stdint.h>

#include <lauxlib.h>
#include <lua.h>

#include "clhclip.h"

/* Raise a Lua error carrying clh_last_error() (or the status name). Does not return. */
int clhl_raise_status(lua_State *L, clh_status st);

#define CLHL_CHECK(L, expr)                                                                        \
    do {                                                                                           \
        clh_status clhl_check_st_ = (expr);                                                        \
        if (clhl_check_st_ != CLH_OK)                                                              \
            clhl_raise_status((L), clhl_check_st_);                                                \
    } while (0)

/* Options tables (clhclip_lua.c): idx may be none/nil (then the defaults apply); a field
 * of the wrong type raises an error naming the option. */
void clhl_check_opt_table(lua_State *L, int idx);
int clhl_opt_bool(lua_State *L, int idx, const char *key, int def);
lua_Integer clhl_opt_int(lua_State *L, int idx, const char *key, lua_Integer def);

/* Register a userdata class: metatable tname with meta (may hold __index) and methods. */
void clhl_new_class(lua_State *L, const char *tname, const luaL_Reg *meta, const luaL_Reg *methods);

/* Buffers of the clhclip.Batch userdata at idx (raises a Lua error if it is not a live
 * batch). Pixels: size * 3 * crop * crop CLIP-normalised floats, layout [size, 3, crop,
 * crop]; labels: size * crop * crop int32 class ids (255 = ignore), [size, crop, crop].
 * The pointers stay valid until the batch is freed or collected (clhclip_data_lua.c). */
const float *clhl_batch_pixels(lua_State *L, int idx, int *size, int *crop);
const int32_t *clhl_batch_labels(lua_State *L, int idx, int *size, int *crop);

/* Push a new empty clhclip.Label userdata (ids NULL, freed with it); fill it with
 * clh_label_map_new. */
struct clh_label_map;
struct clh_label_map *clhl_push_label(lua_State *L);

/* Add the dataset, augmentation and metrics functions to the module table on the stack
 * top (clhclip_data_lua.c). */
void clhl_open_data(lua_State *L);

#endif
