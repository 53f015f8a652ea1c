/* Internals of the CAT-Seg head shared by cathead.c (parameters, cost volume, guidance,
 * decoder, top level) and cathead_agg.c (aggregator layers). */
#ifndef CLHCLIP_CATHEAD_INTERNAL_H
#define CLHCLIP_CATHEAD_INTERNAL_H

#include <string.h>

#include "cathead.h"
#include "clip_internal.h"
#include "hclip.h"
#include "head_ops.h"
#include "internal.h"

#define CATHEAD_MAX_LAYERS 8
#define CATHEAD_LN_EPS     1e-5f
#define CATHEAD_GN_EPS     1e-5f
#define CATHEAD_LA_EPS     1e-6f

/* "DIMS(a, b, c)" -> "3, (int64_t[]){a, b, c}" for (ndim, shape) argument pairs. */
#define DIMS(...)                                                                                  \
    (int)(sizeof((int64_t[]){__VA_ARGS__}) / sizeof(int64_t)), (int64_t[]) {                       \
        __VA_ARGS__                                                                                \
    }

/* A weight and its bias with their gradients (b, db NULL when there is no bias). */
typedef struct ch_pw {
    clh_tensor *w, *b, *dw, *db;
} ch_pw;

typedef struct ch_swin_params {
    ch_pw norm1, q, k, v, proj, norm2, fc1, fc2;
} ch_swin_params;

typedef struct ch_cls_params {
    ch_pw norm1, q, k, v, norm2, fc1, fc2;
    clh_tensor *pad, *dpad, *padg, *dpadg; /* pad token [h], pad guidance [Tp] */
} ch_cls_params;

typedef struct ch_layer_params {
    ch_pw guidance_norm;
    ch_swin_params spatial[2];
    ch_cls_params cls;
} ch_layer_params;

/* Saved activations of one Swin block (slots reused across forwards). */
typedef struct ch_swin_tape {
    const clh_tensor *x; /* input (borrowed: the previous stage's output) */
    clh_tensor *xn, *cat, *q, *k, *v, *att, *x1, *x1n, *f1, *act, *y;
} ch_swin_tape;

/* Saved activations of one class-attention step. */
typedef struct ch_cls_tape {
    clh_tensor *planes, *pooled, *ptok, *seq, *padrows, *padgrows, *xp, *u, *tgp, *cat, *q, *k, *v,
        *la, *xp1, *u2, *f1, *act, *xp2, *xd, *back, *planes2, *up, *uptok;
} ch_cls_tape;

typedef struct ch_layer_tape {
    clh_tensor *gnorm; /* guidance_norm(appearance tokens) [B*S, A] */
    ch_swin_tape spatial[2];
    ch_cls_tape cls;
    clh_tensor *out; /* layer output [N, S, h] */
} ch_layer_tape;

/* Geometry of one forward. */
typedef struct ch_geom {
    int batch, grid, tokens;  /* B, g, S = g*g */
    int classes_all, classes; /* T before and after top-k */
    int prompts;              /* P */
    int pool, pgrid, ptokens; /* pooling, g' = g / pool, S' */
    int seq;                  /* class-attention length max(T, pad_len) */
    int window;               /* effective Swin window */
    int shift;                /* shift of the second block (0: none) */
    int64_t n;                /* B * T */
} ch_geom;

/* Aggregator layer l forward on x [N, S, h] (tape->spatial[0].x holds the input),
 * with appearance tokens app [B*S, A] and text guidance tg [B*T, Tp]; output in tape->out.
 * lean != 0 (inference): activations are released as soon as they are used, so that the
 * memory peak is one stage's working set instead of the whole tape. */
clh_status ch_layer_forward(clh_ctx *ctx, const clh_cathead_config *cfg, const ch_geom *g,
                            const ch_layer_params *p, ch_layer_tape *tape, const clh_tensor *x,
                            const clh_tensor *app, const clh_tensor *tg, int lean);
/* Release the activations of a Swin block except its output y. */
void ch_swin_tape_drop(ch_swin_tape *t);
/* Backward of ch_layer_forward: dx [N, S, h] is the gradient of the layer output on entry and
 * of its input on return (in place); d_app and d_tg are accumulated. */
clh_status ch_layer_backward(clh_ctx *ctx, const clh_cathead_config *cfg, const ch_geom *g,
                             ch_layer_params *p, ch_layer_tape *tape, const clh_tensor *app,
                             const clh_tensor *tg, clh_tensor *dx, clh_tensor *d_app,
                             clh_tensor *d_tg);
void ch_layer_tape_free(ch_layer_tape *tape);

/* Reuse *slot when it already has this shape, otherwise replace it by a new tensor. */
clh_status ch_slot(clh_ctx *ctx, clh_tensor **slot, int ndim, const int64_t *shape);
/* A stack copy of t with another shape of the same size (numel 0 on a mismatch, which the
 * receiving op rejects), or a sub-range at an element offset. Never released. */
clh_tensor ch_shaped(const clh_tensor *t, int ndim, const int64_t *shape);
clh_tensor ch_part(const clh_tensor *t, size_t offset, int ndim, const int64_t *shape);
#define RS(t, ...)          ((clh_tensor[]){ch_shaped((t), DIMS(__VA_ARGS__))})
#define PART(t, off, ...)   ((clh_tensor[]){ch_part((t), (off), DIMS(__VA_ARGS__))})
#define SLOT(ctx, s, ...)   ch_slot((ctx), &(s), DIMS(__VA_ARGS__))
#define SCR(ctx, s, t, ...) clip_ws((ctx), (s), DIMS(__VA_ARGS__), &(t))

/* Release a slot tensor (inside a lean forward it is kept for reuse by ch_slot). */
void ch_discard(clh_tensor *t);
/* Release every owned tensor of a tape struct made only of clh_tensor pointers. */
void ch_release_slots(clh_tensor **slots, size_t count);

#endif
