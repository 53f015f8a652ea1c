/* CLIP model internals shared by the loader and the forward passes. */
#ifndef CLHCLIP_CLIP_INTERNAL_H
#define CLHCLIP_CLIP_INTERNAL_H

#include "internal.h"

/* One pre-LN transformer block. w[0..3]/b[0..3] are q, k, v, out-proj in nn.Linear
 * layout W[out, in]; q, k and v are views into qkv_w / qkv_b ([3D, D] / [3D]). */
typedef struct clip_layer {
    clh_tensor *ln1_w, *ln1_b;
    clh_tensor *qkv_w, *qkv_b;
    clh_tensor *w[4], *b[4];
    clh_tensor *ln2_w, *ln2_b;
    clh_tensor *fc1_w, *fc1_b, *fc2_w, *fc2_b;
} clip_layer;

struct clh_clip {
    clh_ctx *ctx;
    clh_clip_config cfg;
    /* vision tower */
    clh_tensor *patch_w;   /* [D, 3, p, p] */
    clh_tensor *class_emb; /* [D] */
    clh_tensor *vis_pos;   /* [1 + g*g, D] at the native grid */
    clh_tensor *pre_ln_w, *pre_ln_b, *post_ln_w, *post_ln_b;
    clh_tensor *vis_proj; /* [P, D] */
    clip_layer *vis_layers;
    /* position embeddings resized for the last grid used (gh x gw) */
    clh_tensor *pos_cache;
    int pos_cache_h, pos_cache_w;
    /* text tower */
    clh_tensor *tok_emb; /* [V, D] */
    clh_tensor *txt_pos; /* [max_positions, D] */
    clh_tensor *final_ln_w, *final_ln_b;
    clh_tensor *txt_proj; /* [P, D] */
    clip_layer *txt_layers;
};

#endif
