/*
 * clhclip layers of the CAT-Seg segmentation head (hclip-spec 5.3): convolutions, transposed
 * convolutions with kernel == stride, group norm, bilinear resize, average pooling, ReLU / ELU
 * and the Swin window operations, each with its backward. See clhclip.h for the conventions
 * (status codes, row-major fp32 tensors) and hclip.h for the backward conventions:
 *  - gradients of INPUTS (dx) are OVERWRITTEN;
 *  - gradients of PARAMETERS (dw, db, dgamma, dbeta) are ACCUMULATED (+=);
 *  - a NULL gradient output is skipped.
 * Image tensors are NCHW [N, C, H, W]; the Swin operations work on channels-last token grids
 * [N, H, W, C]. All dimensions must be at least 1. Outputs must not alias inputs unless
 * noted. Every result is deterministic (no atomics; fixed reduction orders).
 */
#ifndef CLHCLIP_HEAD_OPS_H
#define CLHCLIP_HEAD_OPS_H

#include "clhclip.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------ convolution */

/* 2-D convolution as torch.nn.functional.conv2d (groups 1, dilation 1, zero padding):
 * x [N, C, H, W], w [O, C, kh, kw], b [O] or NULL -> y [N, O, H', W'] with
 * H' = (H + 2 padding - kh) / stride + 1 (floor). im2col into the workspace + GEMM per image. */
clh_status clh_conv2d_forward(clh_ctx *ctx, const clh_tensor *x, const clh_tensor *w,
                              const clh_tensor *b, int stride, int padding, clh_tensor *y);
/* dx [N, C, H, W] (overwritten); dw [O, C, kh, kw] and db [O] accumulated. */
clh_status clh_conv2d_backward(clh_ctx *ctx, const clh_tensor *x, const clh_tensor *w, int stride,
                               int padding, const clh_tensor *dy, clh_tensor *dx, clh_tensor *dw,
                               clh_tensor *db);

/* Transposed convolution with stride == kernel size k and no padding (torch ConvTranspose2d
 * (C, O, k, stride=k)): x [N, C, H, W], w [C, O, k, k], b [O] or NULL -> y [N, O, H k, W k],
 * y[n, o, h k + i, w k + j] = b[o] + sum_c x[n, c, h, w] w[c, o, i, j]. */
clh_status clh_conv_transpose2d_forward(clh_ctx *ctx, const clh_tensor *x, const clh_tensor *w,
                                        const clh_tensor *b, clh_tensor *y);
/* dx [N, C, H, W] (overwritten); dw [C, O, k, k] and db [O] accumulated. */
clh_status clh_conv_transpose2d_backward(clh_ctx *ctx, const clh_tensor *x, const clh_tensor *w,
                                         const clh_tensor *dy, clh_tensor *dx, clh_tensor *dw,
                                         clh_tensor *db);

/* ------------------------------------------------------------------ normalisation */

/* Group norm as torch.nn.GroupNorm: x [N, C, H, W] in `groups` groups of C / groups channels,
 * mean and biased variance over each (n, group), gamma, beta [C]. y may be x. */
clh_status clh_group_norm_forward(clh_ctx *ctx, const clh_tensor *x, int groups,
                                  const clh_tensor *gamma, const clh_tensor *beta, float eps,
                                  clh_tensor *y);
/* dx (overwritten; must not alias x or dy), dgamma and dbeta [C] accumulated. */
clh_status clh_group_norm_backward(clh_ctx *ctx, const clh_tensor *x, int groups,
                                   const clh_tensor *gamma, float eps, const clh_tensor *dy,
                                   clh_tensor *dx, clh_tensor *dgamma, clh_tensor *dbeta);

/* ------------------------------------------------------------------ resampling */

/* Bilinear resize x [N, C, H, W] -> y [N, C, H2, W2] (the sizes of y), matching
 * torch.nn.functional.interpolate(size=(H2, W2), mode="bilinear", align_corners=...) without
 * antialiasing (up and down). */
clh_status clh_bilinear_resize_forward(clh_ctx *ctx, const clh_tensor *x, int align_corners,
                                       clh_tensor *y);
/* dx [N, C, H, W] (overwritten) from dy [N, C, H2, W2]; each input pixel gathers its
 * contributions. */
clh_status clh_bilinear_resize_backward(clh_ctx *ctx, const clh_tensor *dy, int align_corners,
                                        clh_tensor *dx);

/* Average pooling with a k x k window and stride k (torch AvgPool2d(k), floor mode):
 * x [N, C, H, W] -> y [N, C, H / k, W / k]. */
clh_status clh_avg_pool2d_forward(clh_ctx *ctx, const clh_tensor *x, int k, clh_tensor *y);
/* dx [N, C, H, W] (overwritten; rows/columns the floor drops get 0). */
clh_status clh_avg_pool2d_backward(clh_ctx *ctx, const clh_tensor *dy, int k, clh_tensor *dx);

/* ------------------------------------------------------------------ activations */

/* Elementwise, any shape (y may be x): relu(x) = max(x, 0); elu(x) = x (x > 0) or
 * exp(x) - 1 (alpha 1). */
clh_status clh_relu_forward(clh_ctx *ctx, const clh_tensor *x, clh_tensor *y);
clh_status clh_elu_forward(clh_ctx *ctx, const clh_tensor *x, clh_tensor *y);
/* dx = dy * f'(x) from the activation's input x (relu'(0) = 0, as torch). dx may alias dy. */
clh_status clh_relu_backward(clh_ctx *ctx, const clh_tensor *x, const clh_tensor *dy,
                             clh_tensor *dx);
clh_status clh_elu_backward(clh_ctx *ctx, const clh_tensor *x, const clh_tensor *dy,
                            clh_tensor *dx);

/* ------------------------------------------------------------------ Swin window ops */

/* Window partition of a token grid x [N, H, W, C] (H, W multiples of ws) into
 * win [N nW, ws ws, C], nW = (H / ws)(W / ws), windows in (n, row, column) order and tokens
 * row-major inside a window (Swin's window_partition). */
clh_status clh_window_partition(clh_ctx *ctx, const clh_tensor *x, int ws, clh_tensor *win);
/* The inverse (Swin's window_reverse): win [N nW, ws ws, C] -> x [N, H, W, C] (x's shape
 * gives N, H, W). */
clh_status clh_window_reverse(clh_ctx *ctx, const clh_tensor *win, int ws, clh_tensor *x);
/* Backward of a permutation is the inverse permutation: dx = reverse(dwin) and
 * dwin = partition(dx) (overwritten). */
clh_status clh_window_partition_backward(clh_ctx *ctx, const clh_tensor *dwin, int ws,
                                         clh_tensor *dx);
clh_status clh_window_reverse_backward(clh_ctx *ctx, const clh_tensor *dx, int ws,
                                       clh_tensor *dwin);

/* Cyclic shift torch.roll(x, shifts=(shift_h, shift_w), dims=(1, 2)) of x [N, H, W, C]:
 * y[n, (h + shift_h) mod H, (w + shift_w) mod W, c] = x[n, h, w, c]. Shifts may be negative
 * (Swin shifts by (-s, -s) before the attention and by (s, s) after). */
clh_status clh_roll2d(clh_ctx *ctx, const clh_tensor *x, int shift_h, int shift_w, clh_tensor *y);
/* dx = roll(dy, -shift_h, -shift_w) (overwritten). */
clh_status clh_roll2d_backward(clh_ctx *ctx, const clh_tensor *dy, int shift_h, int shift_w,
                               clh_tensor *dx);

/* ------------------------------------------------------------------ attention (head_attn.c) */

/* Swin (shifted) window attention on tokens in grid order: q, k, v, out [N, grid_h grid_w, D],
 * rows in row-major grid order (not windowed), D = heads hd with head h in columns
 * [h hd, (h + 1) hd) and hd <= 128. The grid is rolled by (-shift, -shift)
 * (rolled[y][x] = grid[(y + shift) % H][(x + shift) % W]), cut into window x window windows,
 * and per window and head out = softmax((q hd^-1/2) k^T + mask) v; the result is written back
 * in the original grid order. shift == 0: no roll, no mask. shift > 0: Swin's mask: each
 * rolled axis is cut into [0, G - window), [G - window, G - shift), [G - shift, G), region =
 * 3 row_part + col_part, and a key in another region than the query gets -100. No relative
 * position bias. grid_h and grid_w must be multiples of window, 0 <= shift < window. Fused
 * kernels (no score matrix is stored); out must not alias q, k, v. */
clh_status clh_window_attention_forward(clh_ctx *ctx, const clh_tensor *q, const clh_tensor *k,
                                        const clh_tensor *v, int grid_h, int grid_w, int window,
                                        int shift, int heads, clh_tensor *out);
/* dq, dk, dv (all required, q's shape) are overwritten from dout; the scores are recomputed.
 * A workspace of 2 N grid_h grid_w heads floats holds the per-query statistics. */
clh_status clh_window_attention_backward(clh_ctx *ctx, const clh_tensor *q, const clh_tensor *k,
                                         const clh_tensor *v, int grid_h, int grid_w, int window,
                                         int shift, int heads, const clh_tensor *dout,
                                         clh_tensor *dq, clh_tensor *dk, clh_tensor *dv);

/* Linear attention ("Transformers are RNNs") with phi(x) = elu(x) + 1: q, k, v, out
 * [N, S, D], heads as above (hd <= 128). Per sequence n and head h:
 * out_s = phi(q_s)^T (sum_j phi(k_j) v_j^T) / (phi(q_s) . sum_j phi(k_j) + eps).
 * eps >= 0 (1e-6 in CAT-Seg). Workspace: N heads hd (hd + 1) floats. */
clh_status clh_linear_attention_forward(clh_ctx *ctx, const clh_tensor *q, const clh_tensor *k,
                                        const clh_tensor *v, int heads, float eps, clh_tensor *out);
/* dq, dk, dv (required) overwritten. Workspace: N heads (hd (hd + 1) + 2 S) floats. */
clh_status clh_linear_attention_backward(clh_ctx *ctx, const clh_tensor *q, const clh_tensor *k,
                                         const clh_tensor *v, int heads, float eps,
                                         const clh_tensor *dout, clh_tensor *dq, clh_tensor *dk,
                                         clh_tensor *dv);

/* ------------------------------------------------------------------ tensor utilities */

/* y[a][c][b][d] = x[a][b][c][d] for x seen as [d0, d1, d2, d3] (x and y need only have
 * d0 d1 d2 d3 elements; their shapes are otherwise free). y must not alias x. d3 == 1 is a
 * batched transpose through local-memory tiles. The backward is the same call with d1 and d2
 * swapped: dx = permute_0213(dy, d0, d2, d1, d3). */
clh_status clh_permute_0213(clh_ctx *ctx, const clh_tensor *x, int64_t d0, int64_t d1, int64_t d2,
                            int64_t d3, clh_tensor *y);

/* Row concatenation with the second operand broadcast: a [R, ca], b [outer inner, cb],
 * y [R, ca + cb] (element counts checked) with R = outer repeat inner; row
 * r = (o repeat + t) inner + i of y is [a row r | b row o inner + i]. ca, cb >= 0 with
 * ca + cb >= 1; an operand with 0 columns may be NULL. E.g. concat(LN(x), guidance repeated
 * over classes) or a channel concat of NCHW [B T, C1, H, W] with [B, C2, H, W]
 * (outer = B, repeat = T, inner = 1, ca = C1 H W, cb = C2 H W). y must not alias a or b. */
clh_status clh_concat_rows(clh_ctx *ctx, const clh_tensor *a, int64_t ca, const clh_tensor *b,
                           int64_t cb, int64_t outer, int64_t repeat, int64_t inner, clh_tensor *y);
/* da [R, ca] = the first ca columns of dy; db [outer inner, cb] = the last cb columns summed
 * over t (both overwritten; NULL skips). */
clh_status clh_concat_rows_backward(clh_ctx *ctx, const clh_tensor *dy, int64_t ca, int64_t cb,
                                    int64_t outer, int64_t repeat, int64_t inner, clh_tensor *da,
                                    clh_tensor *db);

/* y[r] = max of row r of x seen as [R, cols] (x has R cols elements, y has R). */
clh_status clh_row_max(clh_ctx *ctx, const clh_tensor *x, int64_t cols, clh_tensor *y);

/* ------------------------------------------------------------------ loss */

/* Per-class sigmoid BCE with logits (hclip-spec 5.5): logits [batch, classes, pixels]
 * (element count checked); labels are HOST int32 [batch, pixels], each a class in
 * [0, classes) or ignore_label (which must not be a class). target[b, c, p] = (label == c).
 * exclude_ignored == 0 (the spec and the released code): ignored pixels have all-zero
 * targets and count, loss = mean over batch classes pixels of
 * max(x, 0) - x t + log1p(exp(-|x|)). exclude_ignored != 0: ignored pixels contribute
 * nothing and the mean is over batch classes (non-ignored pixels); none -> loss 0 and zero
 * gradients. *loss gets the mean (work-group partial sums, summed in double on the host).
 * dlogits (NULL skips) is overwritten with d loss / d logits. */
clh_status clh_bce_logits_loss(clh_ctx *ctx, const clh_tensor *logits, const int32_t *labels,
                               int batch, int classes, int64_t pixels, int ignore_label,
                               int exclude_ignored, double *loss, clh_tensor *dlogits);

#ifdef __cplusplus
}
#endif
#endif
