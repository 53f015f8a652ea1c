/* Kernels specific to the CLIP encoders. */

/* x[n, l, :] += src[n, token, :] for every l: the CAT-Seg dense last layer adds the
 * CLS token's residual to every token (hclip-spec 2.3). src rows have length D and
 * sequences of src_len tokens. */
__kernel void clip_add_token_broadcast(__global float *x, const int x_off, const int n_seq,
                                       const int len, const int dim, __global const float *src,
                                       const int src_off, const int src_len, const int token) {
    const int i = get_global_id(0);
    if (i >= n_seq * len * dim)
        return;
    const int d = i % dim;
    const int n = i / (len * dim);
    x[x_off + i] += src[src_off + (n * src_len + token) * dim + d];
}
