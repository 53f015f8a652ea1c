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

/* ------------------------------------------------------------------ fused attention
 * Flash-style attention for CPU-class devices: softmax(q k^T * scale [causal]) v without
 * writing the score matrix. Each work-item owns FA_TQ query rows of one (batch, head) and
 * walks the keys in blocks of 16 with an online softmax: per block, the scores are one
 * float16 per row (from K transposed to [N*H, HD, Lpad], so 16 keys are one vector load),
 * then the running maximum, the rescale of the accumulator and the weighted sum of the 16
 * value rows. q, v and out stay in the [N, L, H*HD] layout (no head permutes).
 * The loops over the tile's rows and chunks are unrolled so the FA_TQ x FA_HC
 * accumulators and the FA_TQ score vectors live in registers (PoCL's compiler leaves them on
 * the stack otherwise: 3x slower); clh_attention (layers.c) launches work-groups of one
 * item on CPUs, because PoCL's work-group vectoriser slows this explicitly vectorised code
 * down (measured 2x at ViT-B/16 384). */

#define FA_TQ 4
#define FA_HD 64
#define FA_HC (FA_HD / 16)

/* kt[nh][d][j] = k[n][j][h*hd + d] for j < lk, 0 for lk <= j < lpad. Dimension 0 runs along
 * j (contiguous writes). */
__kernel void attention_k_transpose(__global const float *k, const int k_off, __global float *kt,
                                    const int kt_off, const int lk, const int lpad,
                                    const int heads, const int head_dim) {
    int j = get_global_id(0), d = get_global_id(1), nh = get_global_id(2);
    if (j >= lpad || d >= head_dim)
        return;
    int n = nh / heads, h = nh - n * heads;
    float v = 0.0f;
    if (j < lk)
        v = k[k_off + (n * lk + j) * heads * head_dim + h * head_dim + d];
    kt[kt_off + (nh * head_dim + d) * lpad + j] = v;
}

static float lanes_max16(float16 v) {
    float8 a = fmax(v.lo, v.hi);
    float4 b = fmax(a.lo, a.hi);
    float2 c = fmax(b.lo, b.hi);
    return fmax(c.x, c.y);
}

static float lanes_sum16(float16 v) {
    float8 a = v.lo + v.hi;
    float4 b = a.lo + a.hi;
    float2 c = b.lo + b.hi;
    return c.x + c.y;
}

/* q, v, out: [N, Lq or Lk, heads * 64]; kt from attention_k_transpose. Global range:
 * (ceil(lq / FA_TQ), N * heads). */
__kernel void attention_fused_hd64(__global const float *q, const int q_off,
                                   __global const float *kt, const int kt_off,
                                   __global const float *v, const int v_off, __global float *out,
                                   const int out_off, const int lq, const int lk, const int lpad,
                                   const int heads, const int causal, const float scale) {
    int i0 = get_global_id(0) * FA_TQ, nh = get_global_id(1);
    if (i0 >= lq)
        return;
    int n = nh / heads, h = nh - n * heads, dim = heads * FA_HD;
    __global const float *ktb = kt + kt_off + nh * FA_HD * lpad;
    __global const float *vb = v + v_off + n * lk * dim + h * FA_HD;

    float qs[FA_TQ][FA_HD]; /* scaled query rows (rows past lq repeat the last one) */
#pragma unroll
    for (int r = 0; r < FA_TQ; r++) {
        __global const float *qr = q + q_off + (n * lq + min(i0 + r, lq - 1)) * dim + h * FA_HD;
        for (int d = 0; d < FA_HD; d++)
            qs[r][d] = qr[d] * scale;
    }
    float16 acc[FA_TQ][FA_HC];
    float m[FA_TQ], l[FA_TQ];
#pragma unroll
    for (int r = 0; r < FA_TQ; r++) {
        m[r] = -INFINITY;
        l[r] = 0.0f;
#pragma unroll
        for (int c = 0; c < FA_HC; c++)
            acc[r][c] = (float16)(0.0f);
    }
    const int16 lane = (int16)(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    /* causal: row i sees keys j <= i, so the block's last row bounds the keys */
    int kend = causal ? min(lk, i0 + FA_TQ) : lk;
    for (int j0 = 0; j0 < kend; j0 += 16) {
        float16 s[FA_TQ];
#pragma unroll
        for (int r = 0; r < FA_TQ; r++)
            s[r] = (float16)(0.0f);
        for (int d = 0; d < FA_HD; d++) {
            float16 kd = vload16(0, ktb + d * lpad + j0);
#pragma unroll
            for (int r = 0; r < FA_TQ; r++)
                s[r] = fma((float16)(qs[r][d]), kd, s[r]);
        }
        int16 key = lane + j0;
        float p[FA_TQ][16];
#pragma unroll
        for (int r = 0; r < FA_TQ; r++) {
            int16 ok = key < lk;
            if (causal)
                ok = ok & (key <= i0 + r);
            float16 sr = select((float16)(-INFINITY), s[r], ok);
            float m_new = fmax(m[r], lanes_max16(sr));
            float corr = exp(m[r] - m_new); /* 0 on the first block (m = -inf) */
            float16 e = exp(sr - m_new);    /* masked keys: exp(-inf) = 0 */
            l[r] = l[r] * corr + lanes_sum16(e);
            m[r] = m_new;
#pragma unroll
            for (int c = 0; c < FA_HC; c++)
                acc[r][c] *= corr;
            vstore16(e, 0, p[r]);
        }
        /* rows past lk are clamped to the last key (their weights are 0) */
        /* not unrolled: same speed, 0.3 s less compile time on PoCL */
        for (int jj = 0; jj < 16; jj++) {
            __global const float *vr = vb + min(j0 + jj, lk - 1) * dim;
#pragma unroll
            for (int c = 0; c < FA_HC; c++) {
                float16 vv = vload16(c, vr);
#pragma unroll
                for (int r = 0; r < FA_TQ; r++)
                    acc[r][c] = fma((float16)(p[r][jj]), vv, acc[r][c]);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < FA_TQ; r++) {
        __global float *o = out + out_off + (n * lq + i0 + r) * dim + h * FA_HD;
        float inv = 1.0f / l[r];
#pragma unroll
        for (int c = 0; c < FA_HC; c++)
            if (i0 + r < lq)
                vstore16(acc[r][c] * inv, c, o);
    }
}
