/*
 * The CAT-Seg segmentation head (hclip-spec 5.2-5.5): cost volume between dense CLIP image
 * features and class text embeddings, top-k class pre-selection, cost embedding, guidance
 * projections, aggregator (Swin spatial blocks + linear class attention), upsampling decoder,
 * and the per-class sigmoid BCE loss; forward and backward, every parameter trainable.
 *
 * Parameter names, layouts and the exact computation are documented in
 * tests/reference/README.md ("CAT-Seg head fixtures"); names are those of the fixtures
 * ("head.cost_embed.weight", ...). Conventions as in hclip.h: parameter gradients are
 * accumulated, input gradients overwritten.
 */
#ifndef CLHCLIP_CATHEAD_H
#define CLHCLIP_CATHEAD_H

#include "clhclip.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct clh_cathead_config {
    int d_img;                    /* Dimg: dense CLIP feature width (ViT-B: 512) */
    int d_vis;                    /* Dv: width of the hooked vision blocks (768) */
    int n_prompts;                /* P: prompts per class (1) */
    int hidden;                   /* h: aggregator width (128) */
    int heads;                    /* attention heads of both attentions (4) */
    int appearance_proj;          /* A: projected appearance guidance (128) */
    int text_proj;                /* Tp: projected text guidance (128) */
    int guidance_up[2];           /* G0, G1: ConvTranspose k2 / k4 outputs (256, 128) */
    int decoder_guidance_proj[2]; /* Q0, Q1 (32, 16) */
    int decoder[2];               /* D0, D1: DoubleConv widths (64, 32) */
    int gn_group_size;            /* GroupNorm groups = width / this (16) */
    int window;                   /* Swin window (12) */
    int pad_len;                  /* class-attention length (256) */
    int mlp_ratio;                /* (4) */
    int n_layers;                 /* aggregator layers (2) */
} clh_cathead_config;

/* The ViT-B/16 configuration of the released code (vitb_384_oft.yaml). */
void clh_cathead_config_vitb(clh_cathead_config *cfg);
/* ViT-B values adapted to CLIP widths: d_img = projection dim, d_vis = vision width. */
void clh_cathead_config_for_clip(const clh_clip_config *clip, clh_cathead_config *cfg);
/* Check a configuration (positive sizes, divisibility); the message names the field. */
clh_status clh_cathead_config_check(const clh_cathead_config *cfg);

typedef struct clh_cathead clh_cathead;

/* A head with PyTorch-default initialisation from seed (kaiming-uniform weights and biases
 * bound 1/sqrt(fan_in), norms 1/0, pad tokens 0 as in CAT-Seg). */
clh_status clh_cathead_new(clh_ctx *ctx, const clh_cathead_config *cfg, uint64_t seed,
                           clh_cathead **out);
void clh_cathead_free(clh_cathead *head);
const clh_cathead_config *clh_cathead_get_config(const clh_cathead *head);

int clh_cathead_num_params(const clh_cathead *head);
/* Parameter i with its name and gradient (borrowed). */
clh_status clh_cathead_param(clh_cathead *head, int i, const char **name, clh_tensor **param,
                             clh_tensor **grad);
/* 1 for parameters exempt from weight decay (norms, pad tokens: detectron2's defaults). */
int clh_cathead_param_no_decay(const clh_cathead *head, int i);
/* Index of a parameter by name, or -1. */
int clh_cathead_find_param(const clh_cathead *head, const char *name);
clh_status clh_cathead_zero_grad(clh_cathead *head);
/* Copy every parameter from an open safetensors file (names as above, shapes checked;
 * a missing or extra "head." tensor is an error naming it). */
clh_status clh_cathead_load_params(clh_cathead *head, const clh_st_file *file);
/* Add every parameter to a safetensors writer. */
clh_status clh_cathead_add_params(clh_cathead *head, clh_st_writer *writer);

typedef struct clh_cathead_inputs {
    const clh_tensor *dense;    /* [B, 1+g*g, d_img]: CAT-Seg dense image features */
    const clh_tensor *hooks[2]; /* [B, 1+g*g, d_vis]: block outputs -> guidance_up.0 / .1 */
    const clh_tensor *text;     /* [T, P, d_img]: class text embeddings (any length) */
    int pool;                   /* class-attention average pooling (2 train, 1 test) */
} clh_cathead_inputs;

/* Forward. logits [B, T, 4g, 4g] is a new tensor (classes dropped by top-k hold -100).
 * With train != 0 the activations are kept for clh_cathead_backward; a later forward
 * replaces them. The inputs must stay unchanged until the backward. */
clh_status clh_cathead_forward(clh_cathead *head, int train, const clh_cathead_inputs *in,
                               clh_tensor **logits);
/* Kept classes of image b after the last forward ([0, T) in ascending order; all classes
 * when T <= pad_len). Returns their count; *classes is borrowed. */
int clh_cathead_kept_classes(const clh_cathead *head, int b, const int32_t **classes);

/* Backward from d logits of the last training forward: parameter gradients accumulated;
 * d_dense, d_hooks[i], d_text (each may be NULL) overwritten, shaped like the inputs
 * (CLS rows 0; d_text summed over the batch). The activations stay allocated for the next
 * forward of the same shape. */
clh_status clh_cathead_backward(clh_cathead *head, const clh_tensor *d_logits, clh_tensor *d_dense,
                                clh_tensor *const d_hooks[2], clh_tensor *d_text);
/* Drop the activations of a pending training forward. */
void clh_cathead_discard(clh_cathead *head);

typedef struct clh_seg_loss_options {
    int ignore_label;    /* 255 */
    int exclude_ignored; /* 0: ignored pixels are negatives for every class (released code) */
} clh_seg_loss_options;

/* Spec 5.5: logits [B, T, h, w] bilinearly upsampled (align_corners = False) to the label
 * size, then per-class sigmoid BCE against one-hot labels (host int32 [B, H, W]), mean over
 * B*H*W*T. d_logits (may be NULL) is overwritten with d loss / d logits. */
clh_status clh_seg_loss(clh_ctx *ctx, const clh_tensor *logits, const int32_t *labels, int height,
                        int width, const clh_seg_loss_options *options, double *loss,
                        clh_tensor *d_logits);

#ifdef __cplusplus
}
#endif
#endif
