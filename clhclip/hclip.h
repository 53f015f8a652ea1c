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
/* Softmax backward from its output y = softmax(scale * x [+ mask]): dx = scale * y * (dy - sum(dy*y)).
 * dx may alias dy. */
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
clh_status clh_scatter_add_rows(clh_ctx *ctx, const clh_tensor *dy, const int32_t *index,
                                size_t n, clh_tensor *dx);
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
clh_status clh_blockdiag_fold(clh_ctx *ctx, const clh_tensor *w, const clh_tensor *blocks,
                              int side, clh_tensor *w_out);

/* Batched inverse of a [n, m, m] by Gauss-Jordan elimination with partial pivoting, one
 * work-group per matrix. A pivot of magnitude below 1e-30 is CLH_ERR_INVALID_ARGUMENT
 * naming the matrix index. */
clh_status clh_batched_inverse(clh_ctx *ctx, const clh_tensor *a, clh_tensor *inv);
/* Cayley map of raw [n, m, m]: S = (raw - raw^T)/2, R = (I - S)(I + S)^{-1}. inv receives
 * (I + S)^{-1} for the backward (may be NULL when no backward is needed). */
clh_status clh_cayley_forward(clh_ctx *ctx, const clh_tensor *raw, clh_tensor *r,
                              clh_tensor *inv);
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
clh_status clh_hyperspherical_energy_backward(clh_ctx *ctx, const clh_tensor *w, int axis,
                                              float s, float scale, clh_tensor *dw);

/* ------------------------------------------------------------------ RNG */

/* Counter-based generator (deterministic on every device and thread count). */
typedef struct clh_rng {
    uint64_t seed;
    uint64_t counter;
} clh_rng;

void clh_rng_seed(clh_rng *rng, uint64_t seed);
uint64_t clh_rng_next_u64(clh_rng *rng);
double clh_rng_uniform(clh_rng *rng);            /* [0, 1) */
double clh_rng_normal(clh_rng *rng);             /* N(0, 1) */
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
/* Global L2 norm of all gradients; when max_norm > 0 and the norm exceeds it, scale all
 * gradients by max_norm / norm. *norm receives the norm before clipping (may be NULL). */
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

#ifdef __cplusplus
}
#endif
#endif
