/*
 * Open-vocabulary segmentation model: a CLIP with H-CLIP adapters and a CAT-Seg head
 * (hclip-spec 5). Class names become prompts, the text embeddings are cached per class list
 * at inference, training runs adapters + head on image crops with per-class sigmoid BCE,
 * and inference follows the released sliding-window procedure (spec 5.7).
 *
 * Checkpoints are one safetensors file: the adapters (hclip.P/A/B), every head parameter
 * ("head.*"), optionally the AdamW state, and metadata (see models/README.md).
 */
#ifndef CLHCLIP_SEGMODEL_H
#define CLHCLIP_SEGMODEL_H

#include "cathead.h"
#include "hclip.h"

#ifdef __cplusplus
extern "C" {
#endif

#define CLH_SEG_MAX_PROMPTS      96
#define CLH_SEG_DEFAULT_TEMPLATE "A photo of a {} in the scene"

typedef struct clh_segmodel_options {
    int image_size; /* crop / model input size; 0: 384 */
    int hooks[2];   /* vision blocks guiding the decoder; {-1, -1}: (L/3-1, 2L/3-1) */
    clh_hclip_options adapter;
    clh_cathead_config head; /* head.hidden == 0: clh_cathead_config_for_clip */
    uint64_t seed;           /* head initialisation */
} clh_segmodel_options;

void clh_segmodel_options_default(clh_segmodel_options *o);

typedef struct clh_segmodel clh_segmodel;

/* A model on a loaded CLIP (borrowed; it must outlive the model), adapters at identity,
 * head freshly initialised. */
clh_status clh_segmodel_new(clh_clip *clip, const clh_segmodel_options *options,
                            clh_segmodel **out);
void clh_segmodel_free(clh_segmodel *m);
clh_hclip *clh_segmodel_hclip(clh_segmodel *m);
clh_cathead *clh_segmodel_head(clh_segmodel *m);
const clh_segmodel_options *clh_segmodel_get_options(const clh_segmodel *m);

/* Prompt templates ("{}" is replaced by the class name); their count must equal the head's
 * n_prompts. Default: CLH_SEG_DEFAULT_TEMPLATE. */
clh_status clh_segmodel_set_templates(clh_segmodel *m, const char *const *templates, int n);
/* The class vocabulary. Only the first synonym of a name ("cat, kitty" -> "cat") is used,
 * as the released code does. Tokenised with tok (borrowed only during the call); a prompt
 * longer than the context is CLH_ERR_TOO_LONG naming the class. Drops the text cache. */
clh_status clh_segmodel_set_classes(clh_segmodel *m, clh_tokenizer *tok, const char *const *names,
                                    int n);
int clh_segmodel_num_classes(const clh_segmodel *m);

/* Logits [B, T, 4g, 4g] for normalised pixels [B, 3, S, S] (train = 0: text cached, pool 1).
 * The tensor is new (release it). */
clh_status clh_segmodel_logits(clh_segmodel *m, const clh_tensor *pixels, clh_tensor **logits);

typedef struct clh_seg_train_options {
    int pool; /* class-attention pooling in training (2) */
    clh_seg_loss_options loss;
} clh_seg_train_options;

/* One training step's forward and backward on a batch: pixels host [B, 3, S, S] (normalised),
 * labels host [B, S, S] (class ids or loss.ignore_label). Gradients of adapters and head are
 * ACCUMULATED (zero them and step the optimiser outside). Images go through the head one at
 * a time (the head's activations are the memory peak). *loss = mean over the batch. */
clh_status clh_segmodel_train_step(clh_segmodel *m, const float *pixels, const int32_t *labels,
                                   int batch, const clh_seg_train_options *options, double *loss);

typedef struct clh_seg_predict_options {
    int sliding;     /* 1: spec 5.7 sliding window (resize to 5/3 S, 2x2 crops + global) */
    int batch_crops; /* reserved (crops run one at a time) */
} clh_seg_predict_options;

/* Per-pixel labels [H*W] in [0, T) for an image (argmax of the averaged sigmoid scores).
 * scores (may be NULL) receives the per-class maximum score over the image [T]. */
clh_status clh_segmodel_predict(clh_segmodel *m, const clh_image *image,
                                const clh_seg_predict_options *options, int32_t *labels,
                                float *scores);

/* Call after changing adapter tensors (optimiser step): rebuilds the transforms and drops
 * the text cache. */
clh_status clh_segmodel_update(clh_segmodel *m);

/* Every trainable tensor: adapters first, then the head. */
int clh_segmodel_num_params(const clh_segmodel *m);
clh_status clh_segmodel_param(clh_segmodel *m, int i, const char **name, clh_tensor **param,
                              clh_tensor **grad, int *is_clip, int *no_decay);
clh_status clh_segmodel_zero_grad(clh_segmodel *m);

/* Checkpoint (adapters + head + optional AdamW state + train state); extra_json is stored
 * as metadata "extra". Loading checks the base weights, adapter and head configuration. */
clh_status clh_segmodel_save(clh_segmodel *m, clh_adamw *opt, const clh_train_state *state,
                             const char *extra_json, const char *path);
clh_status clh_segmodel_load(clh_segmodel *m, clh_adamw *opt, clh_train_state *state,
                             const char *path);
/* Read the model configuration a checkpoint was made with (head, adapters, image size,
 * hooks, templates as a JSON array in *templates_json, malloc'd, may be NULL). */
clh_status clh_segmodel_checkpoint_options(const char *path, clh_segmodel_options *options,
                                           char **templates_json);
/* Load the head parameters of a folded export's head.safetensors (the configuration must
 * match: read it with clh_segmodel_checkpoint_options, which reads both file kinds). */
clh_status clh_segmodel_load_head(clh_segmodel *m, const char *path);
/* Folded export: dir/config.json + dir/model.safetensors (CLIP with the adapters folded in,
 * HF names) + dir/head.safetensors (head parameters and configuration). */
clh_status clh_segmodel_export(clh_segmodel *m, const char *dir);

#ifdef __cplusplus
}
#endif
#endif
