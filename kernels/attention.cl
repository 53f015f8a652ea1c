/* Head permutes for multi-head attention.
 * A sequence tensor [N, L, H*hd] is viewed as [N, L, H, hd]; the per-head layout
 * is [N*H, L, hd] so each head is one contiguous matrix for a batched GEMM.
 * 2-D range: (D = H*hd columns, N*L rows); reads/writes of the [N, L, D] side
 * are contiguous along dimension 0. */

__kernel void split_heads(__global const float *x, const int x_off, __global float *y,
                          const int y_off, const int rows, const int seq_len, const int heads,
                          const int head_dim) {
    int col = get_global_id(0);
    int row = get_global_id(1);
    int dim = heads * head_dim;
    if (col >= dim || row >= rows)
        return;
    int n = row / seq_len;
    int l = row - n * seq_len;
    int h = col / head_dim;
    int d = col - h * head_dim;
    y[y_off + ((n * heads + h) * seq_len + l) * head_dim + d] = x[x_off + row * dim + col];
}

__kernel void merge_heads(__global const float *x, const int x_off, __global float *y,
                          const int y_off, const int rows, const int seq_len, const int heads,
                          const int head_dim) {
    int col = get_global_id(0);
    int row = get_global_id(1);
    int dim = heads * head_dim;
    if (col >= dim || row >= rows)
        return;
    int n = row / seq_len;
    int l = row - n * seq_len;
    int h = col / head_dim;
    int d = col - h * head_dim;
    y[y_off + row * dim + col] = x[x_off + ((n * heads + h) * seq_len + l) * head_dim + d];
}
