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

#ifdef __cplusplus
}
#endif
#endif
