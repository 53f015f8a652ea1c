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
    uint64_t weights_hash; /* FNV-1a over the fp32 weights in loading order */
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

/* Workspace tensors and views of one scope, released together. */
typedef struct clip_scratch {
    clh_tensor *t[48];
    int n;
} clip_scratch;

clh_status clip_keep(clh_ctx *ctx, clip_scratch *s, clh_tensor *t);
void clip_release_all(clip_scratch *s);
/* Workspace tensor kept in s (s == NULL: the caller owns it). */
clh_status clip_ws(clh_ctx *ctx, clip_scratch *s, int ndim, const int64_t *shape, clh_tensor **out);
clh_status clip_ws2(clh_ctx *ctx, clip_scratch *s, int64_t a, int64_t b, clh_tensor **out);
clh_status clip_ws3(clh_ctx *ctx, clip_scratch *s, int64_t a, int64_t b, int64_t c,
                    clh_tensor **out);
/* [..., D] viewed as [rows, D], kept in s. */
clh_status clip_as2(clh_ctx *ctx, clip_scratch *s, const clh_tensor *t, clh_tensor **out);

/* H-CLIP block-diagonal transforms of one layer: r[t] = [b, q, q] blocks for t = q, k, v,
 * out-proj, or NULL for no transform. */
typedef struct clip_adapter {
    const clh_tensor *r[4];
} clip_adapter;

/* Activations a block's backward needs (workspace tensors owned by this struct). */
typedef struct clip_block_acts {
    int keep;
    clh_tensor *x_in, *h1, *xt[3], *qkv[3], *att, *yt, *x_mid, *h2, *m_pre;
} clip_block_acts;

void clip_block_acts_release(clip_block_acts *a);

/* One pre-LN block in place on x [N, T, D] (ad may be NULL). With save != NULL the
 * activations are kept there, on the workspace stack: the caller releases them and resets
 * the workspace below them after the backward. */
clh_status clip_block_forward(clh_ctx *ctx, const clip_layer *L, const clh_clip_tower_config *t,
                              const clip_adapter *ad, clh_tensor *x, int causal,
                              clip_block_acts *save);
/* dx [N, T, D]: in the gradient of the block output, out that of its input. dblocks[t]
 * (NULL or entries NULL to skip) accumulate the transforms' gradients. */
clh_status clip_block_backward(clh_ctx *ctx, const clip_layer *L, const clh_clip_tower_config *t,
                               const clip_adapter *ad, int causal, const clip_block_acts *a,
                               clh_tensor *dx, clh_tensor *const *dblocks);
/* CAT-Seg dense last block: y [N, T, D] from x (not modified). */
clh_status clip_dense_block_forward(clh_ctx *ctx, const clip_layer *L,
                                    const clh_clip_tower_config *t, const clip_adapter *ad,
                                    const clh_tensor *x, clh_tensor *y, clip_block_acts *save);
/* dy is consumed (overwritten); dx += gradient of x. */
clh_status clip_dense_block_backward(clh_ctx *ctx, const clip_layer *L,
                                     const clh_clip_tower_config *t, const clip_adapter *ad,
                                     const clip_block_acts *a, clh_tensor *dy, clh_tensor *dx,
                                     clh_tensor *const *dblocks);

/* What a training forward of one tower keeps for the backward. Adapter arrays give the
 * transforms per layer (NULL: plain CLIP). With recompute, only each block's input is kept
 * (x_in[l]) and the block is run again in the backward; otherwise acts[l]. */
typedef struct clip_tower_tape {
    const clip_adapter *ad; /* [layers] or NULL */
    int record;             /* keep what the backward needs */
    int recompute;
    int layers;
    clip_block_acts *acts; /* [layers] */
    clh_tensor **x_in;     /* [layers] with recompute */
    int *ran;              /* [layers]: block l ran as a normal block */
    /* vision */
    int catseg;            /* the CAT-Seg dense last block ran */
    clip_block_acts dense; /* its activations */
    clh_tensor *dense_src; /* [N, T, D] input of ln_post for the dense output */
    clh_tensor *cls;       /* [N, D] CLS rows, input of ln_post for the pooled output */
    /* text */
    clh_tensor *pooled; /* [n, D] pooled rows, input of ln_final */
    int32_t *pool_rows; /* [n] */
    int n_pool;
    /* shapes */
    int64_t n, len;
} clip_tower_tape;

void clip_tower_tape_release(clip_tower_tape *tape);

/* The forward passes of clip.c with an optional tape (NULL: inference). With a recording
 * tape, workspace allocations are NOT reset at the end: the caller resets the workspace
 * to a mark taken before the call once the backward is done. */
clh_status clip_encode_image_taped(clh_clip *m, const clh_tensor *pixels,
                                   const clh_image_request *req, clh_image_outputs *out,
                                   clip_tower_tape *tape);
clh_status clip_encode_text_taped(clh_clip *m, const int32_t *ids, int n, int context,
                                  clh_tensor **features, clip_tower_tape *tape);

#endif
