/*
 * clhclip training API: layer backward functions, H-CLIP adapter math (block-diagonal
 * transforms, DCRC relation maps, batched Cayley), hyperspherical energy, RNG, AdamW,
 * checkpoints. See clhclip.h for the conventions (status codes, row-major fp32 tensors).
 *
 * Backward conventions (THNN's updateGradInput / accGradParameters split):
 *  - gradients of INPUTS (dx, dq, ...) are OVERWRITTEN;
 *  - gradients of PARAMETERS (dw, db, dgamma, dblocks, dP, ...) are ACCUMULATED (+=), so a
 *    parameter used several times sums its gradients; zero them before a step.
 *  - a NULL gradient output is skipped.
 */
#ifndef CLHCLIP_HCLIP_H
#define CLHCLIP_HCLIP_H

#include "clhclip.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------ layers (backward) */

/* y = x W^T + b:  dx = dy W;  dw += dy^T x;  db += sum over rows of dy. */
clh_status clh_linear_backward(clh_ctx *ctx, const clh_tensor *x, const clh_tensor *w,
                               const clh_tensor *dy, clh_tensor *dx, clh_tensor *dw,
                               clh_tensor *db);
/* Layer norm over the last dim of x[R,D] (same eps as the forward). */
clh_status clh_layer_norm_backward(clh_ctx *ctx, const clh_tensor *x, const clh_tensor *gamma,
                                   float eps, const clh_tensor *dy, clh_tensor *dx,
                                   clh_tensor *dgamma, clh_tensor *dbeta);
/* Softmax backward from its output y = softmax(scale * x [+ mask]): dx = scale * y * (dy -
 * sum(dy*y)). dx may alias dy. */
clh_status clh_softmax_backward(clh_ctx *ctx, const clh_tensor *y, const clh_tensor *dy,
                                float scale, clh_tensor *dx);
/* Backward of clh_attention: recomputes the attention probabilities from q and k (nothing
 * but q, k, v is stored), then dq, dk, dv [N, L, D] (overwritten). Temporaries come from
 * the workspace. */
clh_status clh_attention_backward(clh_ctx *ctx, const clh_tensor *q, const clh_tensor *k,
                                  const clh_tensor *v, int heads, int causal,
                                  const clh_tensor *dout, clh_tensor *dq, clh_tensor *dk,
                                  clh_tensor *dv);
/* Activation backward from the activation's input x: dx = dy * f'(x). dx may alias dy. */
clh_status clh_quick_gelu_backward(clh_ctx *ctx, const clh_tensor *x, const clh_tensor *dy,
                                   clh_tensor *dx);
clh_status clh_gelu_backward(clh_ctx *ctx, const clh_tensor *x, const clh_tensor *dy,
                             clh_tensor *dx);
/* Backward of clh_l2_normalize (rows of x [R, D]). */
clh_status clh_l2_normalize_backward(clh_ctx *ctx, const clh_tensor *x, const clh_tensor *dy,
                                     clh_tensor *dx);
/* Backward of clh_gather_rows: dx[index[i], :] += dy[i, :] (host indices; repeated indices
 * accumulate; deterministic order). */
clh_status clh_scatter_add_rows(clh_ctx *ctx, const clh_tensor *dy, const int32_t *index, size_t n,
                                clh_tensor *dx);
/* y += alpha * x elementwise (same numel); the accumulation helper of backward passes. */
clh_status clh_axpy(clh_ctx *ctx, float alpha, const clh_tensor *x, clh_tensor *y);
/* Sum of squares of all elements into a host double (for gradient-norm clipping). */
clh_status clh_sum_squares(clh_ctx *ctx, const clh_tensor *x, double *out);
/* x *= alpha. */
clh_status clh_scale(clh_ctx *ctx, clh_tensor *x, float alpha);

/* ------------------------------------------------------------------ adapter math */

/* Block-diagonal transform with b = D / q blocks R_j [q, q] stored as blocks [b, q, q]:
 *   y[R, D] = x · BD^T, i.e. y_j = x_j R_j^T for every column block j (x_j = x[:, qj:qj+q]).
 * Input-side q/k/v transforms (W' = W·BD) apply it to the layer input; the output-side
 * out-proj transform (W' = BD·W) applies it to the projection's output.
 * y must not alias x. */
clh_status clh_blockdiag_forward(clh_ctx *ctx, const clh_tensor *x, const clh_tensor *blocks,
                                 clh_tensor *y);
/* dx = dy · BD (overwritten; may be NULL); dblocks_j += dy_j^T x_j (may be NULL). */
clh_status clh_blockdiag_backward(clh_ctx *ctx, const clh_tensor *x, const clh_tensor *blocks,
                                  const clh_tensor *dy, clh_tensor *dx, clh_tensor *dblocks);
/* Fold: w_out = w · BD (input side, side = 0) or BD · w (output side, side = 1); w [D, D]. */
clh_status clh_blockdiag_fold(clh_ctx *ctx, const clh_tensor *w, const clh_tensor *blocks, int side,
                              clh_tensor *w_out);

/* Batched inverse of a [n, m, m] by Gauss-Jordan elimination with partial pivoting, one
 * work-group per matrix. A pivot of magnitude below 1e-30 is CLH_ERR_INVALID_ARGUMENT
 * naming the matrix index. */
clh_status clh_batched_inverse(clh_ctx *ctx, const clh_tensor *a, clh_tensor *inv);
/* Cayley map of raw [n, m, m]: S = (raw - raw^T)/2, R = (I - S)(I + S)^{-1}. inv receives
 * (I + S)^{-1} for the backward (may be NULL when no backward is needed). */
clh_status clh_cayley_forward(clh_ctx *ctx, const clh_tensor *raw, clh_tensor *r, clh_tensor *inv);
/* draw (overwritten) from dR, using inv from the forward and the same raw. */
clh_status clh_cayley_backward(clh_ctx *ctx, const clh_tensor *raw, const clh_tensor *inv,
                               const clh_tensor *dr, clh_tensor *draw);

/* DCRC layout (hclip-spec 3.2). P [q, q, S, M] (row-major), one modality map A_l [M, M]
 * per layer l < L = max(text_layers, vision_layers) stored as A [L, M, M], one layer map
 * B [S, S] with S = 4 L slots (slot 4l + t, t = q, k, v, out). M = bt + bv blocks: text
 * blocks 0..bt-1, vision blocks bt..M-1 (bt = text width / q, bv = vision width / q).
 * Layer l of an encoder uses A_l and slots 4l..4l+3 (for ViT-L/14 the 12 text layers use
 * the first 12 of the 24 layer slots). */
typedef struct clh_dcrc_layout {
    int q;
    int text_layers, vision_layers;
    int text_blocks, vision_blocks; /* bt, bv */
} clh_dcrc_layout;

/* Number of raw blocks: 4 * (text_layers * bt + vision_layers * bv). Raw block order:
 * all text blocks first, index (l * 4 + t) * bt + j; then vision blocks at offset
 * 4 * text_layers * bt, index (l * 4 + t) * bv + j. */
int clh_dcrc_num_blocks(const clh_dcrc_layout *layout);
/* raw [n_blocks, q, q] from P, A, B (A or B may be NULL: identity, i.e. that map switched
 * off). raw block (e, l, t, j) = sum_{s, m} B[4l + t, s] A_l[m_e(j), m] P[:, :, s, m],
 * m_e(j) = j (text) or bt + j (vision). */
clh_status clh_dcrc_forward(clh_ctx *ctx, const clh_dcrc_layout *layout, const clh_tensor *p,
                            const clh_tensor *a, const clh_tensor *b, clh_tensor *raw);
/* dP, dA, dB accumulated (each may be NULL) from draw. */
clh_status clh_dcrc_backward(clh_ctx *ctx, const clh_dcrc_layout *layout, const clh_tensor *p,
                             const clh_tensor *a, const clh_tensor *b, const clh_tensor *draw,
                             clh_tensor *dp, clh_tensor *da, clh_tensor *db);

/* Hyperspherical energy of the rows (axis = 0) or columns (axis = 1) of w [n, d] after
 * normalising them: sum over i != j of f_s(|w_i - w_j|), f_s(z) = z^-s (s > 0) or
 * log(1/z) (s = 0). Computed in tiles, so 3072 x 768 fits any device. */
clh_status clh_hyperspherical_energy(clh_ctx *ctx, const clh_tensor *w, int axis, float s,
                                     double *energy);
/* dw += scale * dHE/dw (same axis and s). */
clh_status clh_hyperspherical_energy_backward(clh_ctx *ctx, const clh_tensor *w, int axis, float s,
                                              float scale, clh_tensor *dw);

/* ------------------------------------------------------------------ RNG */

/* Counter-based generator (deterministic on every device and thread count). */
typedef struct clh_rng {
    uint64_t seed;
    uint64_t counter;
} clh_rng;

void clh_rng_seed(clh_rng *rng, uint64_t seed);
uint64_t clh_rng_next_u64(clh_rng *rng);
double clh_rng_uniform(clh_rng *rng); /* [0, 1) */
double clh_rng_normal(clh_rng *rng);  /* N(0, 1) */
/* Fill a host array with N(0, std) values. */
void clh_rng_fill_normal(clh_rng *rng, float *x, size_t n, float std);

/* ------------------------------------------------------------------ AdamW */

typedef struct clh_adamw_config {
    float lr;
    float beta1, beta2, eps;
    float weight_decay; /* decoupled: p -= lr * wd * p */
} clh_adamw_config;

/* One parameter tensor with its gradient and state, in a parameter group. */
typedef struct clh_adamw_param {
    clh_tensor *param, *grad;
    clh_tensor *m, *v; /* created by clh_adamw_add_param */
    int group;
} clh_adamw_param;

typedef struct clh_adamw clh_adamw;

clh_status clh_adamw_new(clh_ctx *ctx, clh_adamw **out);
void clh_adamw_free(clh_adamw *opt);
/* Add a parameter group; returns its index in *group. */
clh_status clh_adamw_add_group(clh_adamw *opt, const clh_adamw_config *config, int *group);
clh_adamw_config *clh_adamw_group_config(clh_adamw *opt, int group);
/* Register a parameter (retains param and grad). */
clh_status clh_adamw_add_param(clh_adamw *opt, int group, clh_tensor *param, clh_tensor *grad);
/* Global L2 norm of all gradients (as torch.nn.utils.clip_grad_norm_): when max_norm > 0
 * and max_norm / (norm + 1e-6) < 1, all gradients are scaled by that factor. A non-finite
 * norm leaves the gradients alone (the caller can skip the step). *norm receives the norm
 * before clipping (may be NULL). */
clh_status clh_adamw_clip_grad_norm(clh_adamw *opt, float max_norm, double *norm);
/* One step with each group's lr multiplied by lr_scale (schedules); t increments. */
clh_status clh_adamw_step(clh_adamw *opt, float lr_scale);
clh_status clh_adamw_zero_grad(clh_adamw *opt);
long clh_adamw_steps(const clh_adamw *opt);
void clh_adamw_set_steps(clh_adamw *opt, long t);
int clh_adamw_num_params(const clh_adamw *opt);
clh_adamw_param *clh_adamw_param_at(clh_adamw *opt, int i);

/* Cosine schedule multiplier for step t (0-based) of total: linear warm-up from 0 over
 * warmup steps, then 0.5 (1 + cos(pi * (t - warmup) / (total - warmup))), ending at 0. */
float clh_cosine_schedule(long t, long total, long warmup);

/* ------------------------------------------------------------------ H-CLIP model */

/* Where the Cayley map (orthogonality) applies (hclip-spec 3-4; the released code: text). */
typedef enum clh_ortho {
    CLH_ORTHO_TEXT = 0,
    CLH_ORTHO_BOTH = 1,
    CLH_ORTHO_NONE = 2,
    CLH_ORTHO_VISION = 3,
} clh_ortho;

typedef struct clh_hclip_options {
    int block_size;      /* q; 0: 128. Both tower widths must be multiples of it. */
    clh_ortho ortho;     /* default CLH_ORTHO_TEXT */
    int no_modality_map; /* 1: A_l fixed to I (not trainable) */
    int no_layer_map;    /* 1: B fixed to I (not trainable) */
    int recompute;       /* 1: keep only block inputs, recompute blocks in the backward */
} clh_hclip_options;

typedef struct clh_hclip clh_hclip;

/* Adapters on a loaded CLIP (which must outlive them), initialised to the identity:
 * P blocks of orthogonal towers 0 (Cayley(0) = I), of unconstrained towers I; A_l = I,
 * B = I. The adapted model's outputs then equal the plain model's. */
clh_status clh_hclip_new(clh_clip *base, const clh_hclip_options *options, clh_hclip **out);
void clh_hclip_free(clh_hclip *h);
const clh_dcrc_layout *clh_hclip_layout(const clh_hclip *h);
const clh_hclip_options *clh_hclip_get_options(const clh_hclip *h);
clh_clip *clh_hclip_base(const clh_hclip *h);
/* Trainable tensors, in order "hclip.P" [q,q,S,M], "hclip.A" [L,M,M], "hclip.B" [S,S]
 * (A/B left out when switched off), with their gradients (borrowed references). */
int clh_hclip_num_params(const clh_hclip *h);
clh_status clh_hclip_param(clh_hclip *h, int i, const char **name, clh_tensor **param,
                           clh_tensor **grad);
clh_status clh_hclip_zero_grad(clh_hclip *h);
/* Rebuild the block transforms from P, A, B: call after changing them (optimiser step,
 * loading). */
clh_status clh_hclip_update(clh_hclip *h);
/* The current transforms [n_blocks, q, q] in the raw-block order of clh_dcrc_num_blocks. */
const clh_tensor *clh_hclip_blocks(const clh_hclip *h);

/* Forward with the adapted weights. With train != 0 it keeps what clh_hclip_backward
 * needs; a new training forward (of any model on the context) replaces a pending one,
 * both towers, and so do clh_hclip_update and loading a checkpoint.
 * Image and text are independent: pass pixels == NULL or n_text == 0 to skip a tower. */
clh_status clh_hclip_forward(clh_hclip *h, int train, const clh_tensor *pixels,
                             const clh_image_request *request, clh_image_outputs *image,
                             const int32_t *ids, int n_text, int context, clh_tensor **text);
/* Backward from the gradients of the outputs of the last training forward (each may be
 * NULL: zero; d_hooks[i] belongs to request->hooks[i]), accumulated into the parameter
 * gradients. Releases the saved activations. */
clh_status clh_hclip_backward(clh_hclip *h, const clh_tensor *d_pooled, const clh_tensor *d_dense,
                              const clh_tensor *const *d_hooks, const clh_tensor *d_text);
/* Drop the activations kept by a pending training forward (no gradients). The workspace is
 * one stack per context: keep at most one H-CLIP with a pending training forward per
 * context at a time. */
void clh_hclip_discard(clh_hclip *h);
/* Write the adapted CLIP as plain CLIP weights (W·BD, BD·W folded in) with HF names into
 * dir/model.safetensors plus dir/config.json. */
clh_status clh_hclip_export_folded(clh_hclip *h, const char *dir);

/* Training state saved with a checkpoint besides the tensors. */
typedef struct clh_train_state {
    long step;
    clh_rng rng;
} clh_train_state;

/* One safetensors file (written atomically: temporary file, fsync, rename) holding P, A, B,
 * the AdamW state of opt (may be NULL) and metadata: format and version, the adapter and
 * model configuration, step, RNG state, optimiser step count and group settings, and the
 * hash of the base weights. extra_json (may be NULL) is stored as metadata "extra". */
clh_status clh_hclip_save_checkpoint(clh_hclip *h, clh_adamw *opt, const clh_train_state *state,
                                     const char *extra_json, const char *path);
/* More tensors (e.g. a segmentation head) saved and restored with the adapters, and more
 * metadata entries (saved only). Loading checks their shapes and restores all of them or
 * none. */
typedef struct clh_ckpt_more {
    int n;
    const char *const *names;
    clh_tensor *const *tensors;
    int n_meta;
    const char *const *meta_keys;
    const char *const *meta_values;
} clh_ckpt_more;

clh_status clh_hclip_save_checkpoint_more(clh_hclip *h, clh_adamw *opt,
                                          const clh_train_state *state, const char *extra_json,
                                          const clh_ckpt_more *more, const char *path);
clh_status clh_hclip_load_checkpoint_more(clh_hclip *h, clh_adamw *opt, clh_train_state *state,
                                          const clh_ckpt_more *more, const char *path);

/* Restore P, A, B (and opt's state when given, and *state when non-NULL), then
 * clh_hclip_update. A checkpoint made for other base weights or another adapter
 * configuration is CLH_ERR_INVALID_ARGUMENT with a message naming the difference. */
clh_status clh_hclip_load_checkpoint(clh_hclip *h, clh_adamw *opt, clh_train_state *state,
                                     const char *path);

/* Hyperspherical-energy term (hclip-spec 4): lambda * |HE(W') - HE(W)| summed over the
 * q, k, v (HE over rows: W' = W·BD rotates rows) and out-proj (HE over columns) weights of
 * the chosen layers and towers; added by clh_hclip_backward with its gradient through the
 * adapters. The released code has no such term (lambda = 0, the default). */
typedef struct clh_he_options {
    float lambda;                /* 0: off */
    float s;                     /* Riesz s-energy; 0: log energy */
    int text, vision;            /* towers included */
    int first_layer, last_layer; /* inclusive range; last_layer < 0: up to the last layer */
} clh_he_options;

clh_status clh_hclip_set_he_loss(clh_hclip *h, const clh_he_options *options);
/* Value of the term at the last clh_hclip_backward (0 when off). */
double clh_hclip_he_loss(const clh_hclip *h);
/* Relative drift (HE(W') - HE(W)) / HE(W) for every tower, layer and matrix with the
 * current adapters: drift[(tower * layers_max + l) * 4 + t], tower 0 text / 1 vision,
 * layers_max = max(text_layers, vision_layers); unused entries are 0. */
clh_status clh_hclip_he_drift(clh_hclip *h, float s, double *drift);

#ifdef __cplusplus
}
#endif
#endif
