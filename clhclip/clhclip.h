/*
 * clhclip: portable OpenCL CLIP + H-CLIP library.
 *
 * Conventions
 *  - Every function that can fail returns clh_status (CLH_OK == 0). The message
 *    of the last failure is kept per context (clh_ctx_error) and per thread
 *    (clh_last_error); nothing in the library aborts or exits.
 *  - Tensors are fp32, contiguous, row-major ("C order"). A tensor of shape
 *    [d0, d1, ..., dn-1] stores element (i0, ..., in-1) at
 *    offset + ((i0*d1 + i1)*d2 + ...) . Views share a device buffer with an
 *    element offset; there are no arbitrary strides.
 *  - Sequence tensors are batch-first: [N, L, D].
 *  - Objects returned through an out-pointer are owned by the caller and freed
 *    with the matching *_free / *_release / *_destroy function, which accept NULL.
 *    Tensors, models and adapters belong to the context they were made in: release them
 *    before clh_ctx_destroy.
 *  - A context (and everything made in it) is for one thread at a time.
 */
#ifndef CLHCLIP_H
#define CLHCLIP_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define CLHCLIP_VERSION "0.1.0"

/* ------------------------------------------------------------------ status */

typedef enum clh_status {
    CLH_OK = 0,
    CLH_ERR_OPENCL,           /* an OpenCL call failed; the message names it */
    CLH_ERR_CLBLAST,          /* a CLBlast routine failed */
    CLH_ERR_NO_DEVICE,        /* no OpenCL platform/device, or selection matched none */
    CLH_ERR_BUILD,            /* kernel program build failed; message holds the log */
    CLH_ERR_OUT_OF_MEMORY,    /* host or device allocation failed or exceeds a limit */
    CLH_ERR_INVALID_ARGUMENT, /* bad argument (NULL, out of range, empty text, ...) */
    CLH_ERR_SHAPE,            /* tensor shapes do not fit together */
    CLH_ERR_IO,               /* file missing, unreadable or unwritable */
    CLH_ERR_FORMAT,           /* file malformed, truncated, wrong dtype, not an image */
    CLH_ERR_NOT_FOUND,        /* a named tensor/key is missing */
    CLH_ERR_TOO_LONG,         /* text longer than the context length */
    CLH_ERR_UNSUPPORTED,      /* valid request this build/device cannot do */
} clh_status;

/* "CLH_ERR_SHAPE" etc. */
const char *clh_status_name(clh_status status);
/* "CL_INVALID_WORK_GROUP_SIZE" for -54; "CL_UNKNOWN_ERROR" when unknown. */
const char *clh_cl_error_name(int cl_error);
/* Message of the last failure on this thread ("" when none). */
const char *clh_last_error(void);

/* ------------------------------------------------------------------ devices */

typedef struct clh_device_info {
    int platform_index;
    int device_index; /* index within its platform */
    char platform_name[128];
    char platform_vendor[128];
    char platform_version[128];
    char name[128];
    char vendor[128];
    char version[128];   /* CL_DEVICE_VERSION */
    char c_version[128]; /* CL_DEVICE_OPENCL_C_VERSION */
    char driver[128];    /* CL_DRIVER_VERSION */
    char type[16];       /* "GPU", "CPU", "ACCELERATOR", "OTHER" */
    int is_gpu;
    int is_cpu;
    unsigned compute_units;
    unsigned clock_mhz;
    unsigned long long global_mem;
    unsigned long long max_alloc;
    unsigned long long local_mem;
    size_t max_work_group_size;
    size_t max_work_item_sizes[3];
    int has_fp16;
    int has_fp64;
    int has_subgroups;
} clh_device_info;

/* All devices of all platforms. *out is malloc'd; free() it. */
clh_status clh_list_devices(clh_device_info **out, int *count);
/* Multi-line human-readable capability report into buf (always terminated). */
void clh_device_info_format(const clh_device_info *info, char *buf, size_t size);

/* ------------------------------------------------------------------ context */

typedef struct clh_ctx clh_ctx;

typedef struct clh_ctx_options {
    const char *platform; /* index or case-insensitive name substring; NULL: $CLHCLIP_PLATFORM */
    const char *device;   /* index or case-insensitive name substring; NULL: $CLHCLIP_DEVICE */
    int profile;          /* 1: accumulate per-kernel times; -1: $CLHCLIP_PROFILE */
} clh_ctx_options;

/* Default selection: first GPU of any platform, else the first device. */
clh_status clh_ctx_create(const clh_ctx_options *options, clh_ctx **out);
void clh_ctx_destroy(clh_ctx *ctx);
const clh_device_info *clh_ctx_device(const clh_ctx *ctx);
/* Last error message recorded on this context ("" when none). */
const char *clh_ctx_error(const clh_ctx *ctx);
/* Wait for all queued work. */
clh_status clh_ctx_finish(clh_ctx *ctx);
/* Build every embedded program now (warm-up); otherwise they build lazily. */
clh_status clh_ctx_build_all(clh_ctx *ctx);
/* Seconds spent in clBuildProgram so far in this context. */
double clh_ctx_build_seconds(const clh_ctx *ctx);
/* Bytes currently allocated on the device by this context, and the peak. */
size_t clh_ctx_device_bytes(const clh_ctx *ctx);
size_t clh_ctx_peak_device_bytes(const clh_ctx *ctx);

/* Profiling (active when the context was created with profile = 1). The table
 * is malloc'd (free()); one row per kernel name: calls, total ms, mean ms. */
clh_status clh_profile_table(clh_ctx *ctx, char **table);
void clh_profile_reset(clh_ctx *ctx);

/* ------------------------------------------------------------------ tensors */

#define CLH_MAX_DIMS 6

typedef struct clh_tensor clh_tensor;

/* New zero-filled device tensor. */
clh_status clh_tensor_new(clh_ctx *ctx, int ndim, const int64_t *shape, clh_tensor **out);
/* New device tensor holding a copy of numel floats from host memory. */
clh_status clh_tensor_from_host(clh_ctx *ctx, int ndim, const int64_t *shape, const float *data,
                                clh_tensor **out);
/* Contiguous view: elements [offset, offset + prod(shape)) of base, reshaped. */
clh_status clh_tensor_view(clh_tensor *base, size_t offset, int ndim, const int64_t *shape,
                           clh_tensor **out);
void clh_tensor_retain(clh_tensor *t);
void clh_tensor_release(clh_tensor *t); /* frees at refcount 0; NULL is fine */

int clh_tensor_ndim(const clh_tensor *t);
int64_t clh_tensor_dim(const clh_tensor *t, int i); /* negative i counts from the end */
const int64_t *clh_tensor_shape(const clh_tensor *t);
size_t clh_tensor_numel(const clh_tensor *t);
size_t clh_tensor_offset(const clh_tensor *t); /* element offset into its buffer */
clh_ctx *clh_tensor_ctx(const clh_tensor *t);

/* Copy numel floats host->device / device->host (blocking). n must equal numel. */
clh_status clh_tensor_upload(clh_tensor *t, const float *src, size_t n);
clh_status clh_tensor_download(const clh_tensor *t, float *dst, size_t n);
/* Device-side copy; shapes must have equal numel. */
clh_status clh_tensor_copy(clh_tensor *dst, const clh_tensor *src);
clh_status clh_tensor_fill(clh_tensor *t, float value);

/* Workspace: a per-context arena for temporaries. clh_ws_tensor returns a view
 * into the arena (release it as usual); it stays valid until the arena is reset
 * to a mark taken before it was made. The arena grows on demand and is reused,
 * so a repeated forward pass allocates no device memory. */
size_t clh_ws_mark(clh_ctx *ctx);
clh_status clh_ws_tensor(clh_ctx *ctx, int ndim, const int64_t *shape, clh_tensor **out);
void clh_ws_reset(clh_ctx *ctx, size_t mark);

/* ------------------------------------------------------------------ layers (forward)
 * All shapes are checked; in-place use is allowed where noted. */

/* C[M,N] = alpha * op(A) * op(B) + beta * C, row-major; op(X) = X or X^T.
 * A is [M,K] (or [K,M] when trans_a), B is [K,N] (or [N,K] when trans_b),
 * leading dimensions are the row lengths of the stored matrices. */
clh_status clh_gemm(clh_ctx *ctx, int trans_a, int trans_b, size_t m, size_t n, size_t k,
                    float alpha, const clh_tensor *a, size_t lda, const clh_tensor *b, size_t ldb,
                    float beta, clh_tensor *c, size_t ldc);
/* The same for `batch` matrices at element strides stride_a/b/c from each tensor's start. */
clh_status clh_gemm_batched(clh_ctx *ctx, int trans_a, int trans_b, size_t m, size_t n, size_t k,
                            float alpha, const clh_tensor *a, size_t lda, size_t stride_a,
                            const clh_tensor *b, size_t ldb, size_t stride_b, float beta,
                            clh_tensor *c, size_t ldc, size_t stride_c, size_t batch);

/* y[R,out] = x[R,in] * W[out,in]^T + b[out] (b may be NULL). y must not alias x. */
clh_status clh_linear(clh_ctx *ctx, const clh_tensor *x, const clh_tensor *w, const clh_tensor *b,
                      clh_tensor *y);
/* Row-wise layer norm over the last dim D: x[R,D] -> y (y may be x). */
clh_status clh_layer_norm(clh_ctx *ctx, const clh_tensor *x, const clh_tensor *gamma,
                          const clh_tensor *beta, float eps, clh_tensor *y);
/* Softmax over the last dim of x[..., Lq, Lk] after multiplying by scale; with
 * causal != 0, entries with column > (row index within Lq) count as -inf.
 * y may be x. */
clh_status clh_softmax(clh_ctx *ctx, const clh_tensor *x, float scale, int causal, clh_tensor *y);
/* Multi-head attention core on projected q, k, v [N, L, D] (D = heads * head_dim):
 * out[N,L,D] = concat_h softmax(q_h k_h^T / sqrt(head_dim) [+ causal]) v_h.
 * Temporaries come from the workspace. */
clh_status clh_attention(clh_ctx *ctx, const clh_tensor *q, const clh_tensor *k,
                         const clh_tensor *v, int heads, int causal, clh_tensor *out);
/* Elementwise activations (y may be x). */
clh_status clh_quick_gelu(clh_ctx *ctx, const clh_tensor *x, clh_tensor *y);
clh_status clh_gelu(clh_ctx *ctx, const clh_tensor *x, clh_tensor *y); /* exact erf GELU */
/* y = a + b elementwise, same numel (y may alias a or b). */
clh_status clh_add(clh_ctx *ctx, const clh_tensor *a, const clh_tensor *b, clh_tensor *y);
/* x[R,C] += bias[C] broadcast over rows. */
clh_status clh_add_bias(clh_ctx *ctx, clh_tensor *x, const clh_tensor *bias);
/* x[N,L,D] += rows[L,D] broadcast over N (positional embeddings). */
clh_status clh_add_rows(clh_ctx *ctx, clh_tensor *x, const clh_tensor *rows);
/* y[n,D] = table[ids[n],D]; ids are host integers, each in [0, V). */
clh_status clh_embedding(clh_ctx *ctx, const int32_t *ids, size_t n, const clh_tensor *table,
                         clh_tensor *y);
/* Patch embedding (conv, stride = kernel = p, no bias): img[N,C,H,W], weight[D,C,p,p]
 * -> out[N, (H/p)*(W/p), D] (row-major patch order). H and W must be multiples of p. */
clh_status clh_patch_embed(clh_ctx *ctx, const clh_tensor *img, const clh_tensor *weight,
                           clh_tensor *out);
/* Bicubic resize of x[C,H,W] -> y[C,H2,W2], matching torch interpolate(mode="bicubic",
 * align_corners=False) (A = -0.75, border-clamped taps, no antialias). */
clh_status clh_bicubic_resize(clh_ctx *ctx, const clh_tensor *x, clh_tensor *y);
/* Row-wise L2 normalisation over the last dim (y may be x). */
clh_status clh_l2_normalize(clh_ctx *ctx, const clh_tensor *x, clh_tensor *y);
/* Gather rows: y[n,D] = x[index[n],D] for host indices (y must not alias x). */
clh_status clh_gather_rows(clh_ctx *ctx, const clh_tensor *x, const int32_t *index, size_t n,
                           clh_tensor *y);

/* ------------------------------------------------------------------ safetensors */

typedef enum clh_dtype {
    CLH_DTYPE_F32,
    CLH_DTYPE_F16,
    CLH_DTYPE_BF16,
    CLH_DTYPE_F64,
    CLH_DTYPE_I64,
    CLH_DTYPE_I32,
    CLH_DTYPE_I16,
    CLH_DTYPE_I8,
    CLH_DTYPE_U8,
    CLH_DTYPE_BOOL,
} clh_dtype;

const char *clh_dtype_name(clh_dtype dtype); /* "F32", ... */

typedef struct clh_st_file clh_st_file;

typedef struct clh_st_tensor_info {
    const char *name;
    clh_dtype dtype;
    int ndim;
    int64_t shape[CLH_MAX_DIMS];
    size_t numel;
} clh_st_tensor_info;

/* Open and validate a .safetensors file (header, offsets, sizes). */
clh_status clh_st_open(const char *path, clh_st_file **out);
void clh_st_close(clh_st_file *f);
size_t clh_st_count(const clh_st_file *f);
/* Info of the i-th tensor (file order), or by name (CLH_ERR_NOT_FOUND). */
clh_status clh_st_info_at(const clh_st_file *f, size_t i, clh_st_tensor_info *info);
clh_status clh_st_info(const clh_st_file *f, const char *name, clh_st_tensor_info *info);
/* Read a float tensor (F32, F16, BF16, F64) converted to fp32; n must equal numel. */
clh_status clh_st_read_f32(const clh_st_file *f, const char *name, float *dst, size_t n);
/* Read an integer tensor (I64, I32, I16, I8, U8) converted to int64; n must equal numel. */
clh_status clh_st_read_i64(const clh_st_file *f, const char *name, int64_t *dst, size_t n);
/* "__metadata__" string value, or NULL. */
const char *clh_st_metadata(const clh_st_file *f, const char *key);

typedef struct clh_st_writer clh_st_writer;
clh_status clh_st_writer_new(clh_st_writer **out);
void clh_st_writer_free(clh_st_writer *w);
/* Data are copied. Names must be unique. */
clh_status clh_st_writer_add_f32(clh_st_writer *w, const char *name, int ndim, const int64_t *shape,
                                 const float *data);
clh_status clh_st_writer_add_i64(clh_st_writer *w, const char *name, int ndim, const int64_t *shape,
                                 const int64_t *data);
clh_status clh_st_writer_set_metadata(clh_st_writer *w, const char *key, const char *value);
/* Atomic write: temporary file in the same directory, fsync, rename. */
clh_status clh_st_writer_save(clh_st_writer *w, const char *path);

/* ------------------------------------------------------------------ tokenizer */

typedef struct clh_tokenizer clh_tokenizer;

#define CLH_CONTEXT_LENGTH 77

/* path: OpenAI bpe_simple_vocab_16e6.txt.gz (or its gunzipped .txt), a vocab.json
 * whose merges.txt sits beside it, or a directory holding vocab.json + merges.txt. */
clh_status clh_tokenizer_load(const char *path, clh_tokenizer **out);
void clh_tokenizer_free(clh_tokenizer *tok);
int32_t clh_tokenizer_sot(const clh_tokenizer *tok); /* <|startoftext|> */
int32_t clh_tokenizer_eot(const clh_tokenizer *tok); /* <|endoftext|> */
int32_t clh_tokenizer_vocab_size(const clh_tokenizer *tok);
/* BPE ids of text without SOT/EOT. *ids is malloc'd (free()). Empty text -> 0 ids. */
clh_status clh_tokenizer_encode(clh_tokenizer *tok, const char *utf8, int32_t **ids, size_t *n);
/* CLIP tokenize: SOT, ids, EOT, zero padding to context_length into out[context_length].
 * Empty (or whitespace-only) text is CLH_ERR_INVALID_ARGUMENT. Text that does not fit
 * is CLH_ERR_TOO_LONG unless truncate != 0, which cuts it and keeps EOT last.
 * Invalid UTF-8 is CLH_ERR_INVALID_ARGUMENT. */
clh_status clh_tokenize(clh_tokenizer *tok, const char *utf8, int context_length, int truncate,
                        int32_t *out);
/* Decode ids (SOT/EOT/0-padding skipped) to text; *text is malloc'd (free()). */
clh_status clh_tokenizer_decode(const clh_tokenizer *tok, const int32_t *ids, size_t n,
                                char **text);

/* ------------------------------------------------------------------ images */

typedef struct clh_image {
    int width;
    int height;
    float *data; /* height * width * 3, RGB interleaved, values 0..255 */
} clh_image;

/* Load JPEG/PNG/BMP/... as RGB (gray and alpha are converted). */
clh_status clh_image_load(const char *path, clh_image *out);
/* Image from 8-bit RGB pixels (copied). */
clh_status clh_image_from_rgb8(const uint8_t *rgb, int width, int height, clh_image *out);
void clh_image_free(clh_image *img); /* frees data, zeroes the struct */
/* Bicubic resize like PIL's Image.resize(BICUBIC) (a = -0.5, antialiased when
 * shrinking), result rounded and clamped to 0..255 as PIL does for 8-bit images. */
clh_status clh_image_resize(const clh_image *in, int width, int height, clh_image *out);
clh_status clh_image_crop(const clh_image *in, int x, int y, int width, int height, clh_image *out);
/* PNG writer for 8-bit RGB or gray (channels 1 or 3). */
clh_status clh_png_write(const char *path, const uint8_t *pixels, int width, int height,
                         int channels);

typedef enum clh_preprocess_mode {
    CLH_PREPROCESS_CENTER_CROP = 0, /* resize shortest side to size, centre crop size x size */
    CLH_PREPROCESS_RESIZE = 1,      /* resize to size x size */
} clh_preprocess_mode;

/* OpenAI CLIP normalisation (0..255 scale). */
extern const float CLH_CLIP_MEAN[3];
extern const float CLH_CLIP_STD[3];

/* Preprocess to a normalised CHW float array out[3*size*size]. */
clh_status clh_image_preprocess(const clh_image *in, int size, clh_preprocess_mode mode,
                                float *out);

/* ------------------------------------------------------------------ CLIP */

typedef enum clh_activation { CLH_ACT_QUICK_GELU = 0, CLH_ACT_GELU = 1 } clh_activation;

typedef struct clh_clip_tower_config {
    int hidden;
    int intermediate;
    int layers;
    int heads;
    float eps;
    clh_activation act;
} clh_clip_tower_config;

typedef struct clh_clip_config {
    clh_clip_tower_config vision;
    int image_size; /* native input size (position-embedding grid = image_size / patch) */
    int patch_size;
    clh_clip_tower_config text;
    int vocab_size;
    int max_positions; /* text context length */
    int eos_token_id;  /* pooling: first position holding eos_token_id ... */
    int eos_argmax;    /* ... or, if 1 (legacy eos_token_id == 2), argmax of the ids */
    int projection_dim;
    float logit_scale; /* log value as stored */
} clh_clip_config;

/* HF defaults (clip-vit-base-patch32-like, as transformers applies to missing keys). */
void clh_clip_config_defaults(clh_clip_config *cfg);
/* Parse HF config.json text, applying defaults for missing keys. */
clh_status clh_clip_config_parse(const char *json, clh_clip_config *cfg);

typedef struct clh_clip clh_clip;

/* path: a directory (config.json optional + model.safetensors / open_clip_model.safetensors /
 * the single *.safetensors inside) or a .safetensors file. HF and OpenAI/open_clip
 * tensor names are accepted; without config.json the architecture is inferred from
 * the tensor shapes. */
clh_status clh_clip_load(clh_ctx *ctx, const char *path, clh_clip **out);
void clh_clip_free(clh_clip *model);
const clh_clip_config *clh_clip_get_config(const clh_clip *model);
clh_ctx *clh_clip_ctx(const clh_clip *model);
/* 64-bit hash of all weights as loaded (fp32 values, in a fixed order independent of the
 * file's naming style): identifies the base model a checkpoint belongs to. */
uint64_t clh_clip_weights_hash(const clh_clip *model);

typedef struct clh_image_request {
    int want_pooled;      /* pooled: ln_post(CLS) @ proj -> [N, P] */
    int want_dense;       /* dense: ln_post(all tokens) @ proj -> [N, 1+g*g, P] */
    int dense_last_layer; /* CAT-Seg variant of the last block (spec 2.3) for the dense output */
    int n_hooks;          /* outputs of these blocks (0-based) -> [N, 1+g*g, D] each */
    const int *hooks;
} clh_image_request;

typedef struct clh_image_outputs {
    clh_tensor *pooled; /* NULL unless requested */
    clh_tensor *dense;
    clh_tensor *hooks[64];
} clh_image_outputs;

/* pixels: [N, 3, H, W] normalised; H and W multiples of the patch size. Position
 * embeddings are bicubic-resized when the grid differs from the native one. */
clh_status clh_clip_encode_image(clh_clip *model, const clh_tensor *pixels,
                                 const clh_image_request *request, clh_image_outputs *out);
void clh_image_outputs_release(clh_image_outputs *out);

/* ids: [n, context] token ids (context <= max_positions). features: [n, P] (not normalised). */
clh_status clh_clip_encode_text(clh_clip *model, const int32_t *ids, int n, int context,
                                clh_tensor **features);

#ifdef __cplusplus
}
#endif
#endif
