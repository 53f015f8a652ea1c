/* Register-tiled SGEMM for CPU-class OpenCL devices (PoCL), the CLHCLIP_GEMM=ocl path.
 *
 * C = alpha * op(A) * op(B) + beta * C, row-major, strided batches along dimension 2.
 * gemm_ocl.c first packs op(B) into the workspace as panels of TN columns: panel q holds
 * op(B)[p, q*TN + c] at q*k*TN + p*TN + c, zero past n (gemm_pack_b). A work-item's strip
 * of B is then one contiguous stream (unpacked, its k rows lie a leading dimension apart,
 * and with leading dimensions of 512 .. 3072 floats they fall into a few L1 sets and evict
 * each other), and a transposed B costs no more than a plain one. op(A) is read in place:
 * A (gemm_tile_an: TM row streams) or A^T (gemm_tile_at: TM consecutive floats per step).
 *
 * Each work-item owns a TM x TN tile of C in TM float16 accumulators: per k step it loads one
 * float16 of B and TM scalars of A, i.e. 2*TM*TN flops for TN+TM loads. PoCL runs the
 * work-items of a group one after the other on one core, so a group is a cache block of C
 * (its rows of A and its panels of B stay in L1/L2 across the group); local-memory copies
 * only add barriers on such devices. Edge tiles clamp the rows of A they read (always in
 * bounds) and store only what lies inside C. Groups run in the order of dimension 0 first,
 * so dimension 0 walks the tiles along the smaller operand: with rows_first = 0 consecutive
 * groups share rows of A and walk across B, with rows_first = 1 they share panels of B. */

#define TM 8
#define TN 16

/* acc_r += a_r * b for the 8 rows of the tile */
#define TILE_UPDATE(a0, a1, a2, a3, a4, a5, a6, a7, bv)                                            \
    do {                                                                                           \
        acc0 = fma((float16)(a0), bv, acc0);                                                       \
        acc1 = fma((float16)(a1), bv, acc1);                                                       \
        acc2 = fma((float16)(a2), bv, acc2);                                                       \
        acc3 = fma((float16)(a3), bv, acc3);                                                       \
        acc4 = fma((float16)(a4), bv, acc4);                                                       \
        acc5 = fma((float16)(a5), bv, acc5);                                                       \
        acc6 = fma((float16)(a6), bv, acc6);                                                       \
        acc7 = fma((float16)(a7), bv, acc7);                                                       \
    } while (0)

/* One row of the tile into C: alpha * acc (+ beta * C when beta != 0, so NaN in an output
 * that beta = 0 overwrites never propagates). */
static void store_row(__global float *crow, float16 acc, int j0, int n, float alpha, float beta) {
    if (j0 + TN <= n) {
        float16 v = alpha * acc;
        if (beta != 0.0f)
            v = fma((float16)(beta), vload16(0, crow + j0), v);
        vstore16(v, 0, crow + j0);
        return;
    }
    float t[TN];
    vstore16(acc, 0, t);
    for (int c = 0; c < TN && j0 + c < n; c++) {
        float v = alpha * t[c];
        crow[j0 + c] = beta != 0.0f ? fma(beta, crow[j0 + c], v) : v;
    }
}

#define STORE_TILE()                                                                               \
    do {                                                                                           \
        __global float *cb = c + c_off + batch * stride_c + i0 * ldc;                              \
        float16 accs[TM] = {acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7};                       \
        for (int r = 0; r < TM && i0 + r < m; r++)                                                 \
            store_row(cb + r * ldc, accs[r], j0, n, alpha, beta);                                  \
    } while (0)

#define TILE_PROLOGUE()                                                                            \
    int g0 = get_global_id(0), g1 = get_global_id(1);                                              \
    int j0 = (rows_first ? g1 : g0) * TN, i0 = (rows_first ? g0 : g1) * TM;                        \
    int batch = get_global_id(2);                                                                  \
    if (j0 >= n || i0 >= m)                                                                        \
        return;                                                                                    \
    __global const float *ab = a + a_off + batch * stride_a;                                       \
    __global const float *bp = b + b_off + batch * stride_b + (j0 / TN) * k * TN;                  \
    float16 acc0 = 0.0f, acc1 = 0.0f, acc2 = 0.0f, acc3 = 0.0f, acc4 = 0.0f, acc5 = 0.0f,          \
            acc6 = 0.0f, acc7 = 0.0f

/* b: op(B) packed by gemm_pack_b, stride_b floats per batch (0: shared). op(A) = A: row r
 * of the tile is row i0+r of A (clamped to m-1 at the bottom edge). */
__kernel void gemm_tile_an(__global const float *a, const int a_off, const int lda,
                           const int stride_a, __global const float *b, const int b_off,
                           const int stride_b, __global float *c, const int c_off,
                           const int ldc, const int stride_c, const int m, const int n, const int k,
                           const float alpha, const float beta, const int rows_first) {
    TILE_PROLOGUE();
    __global const float *a0 = ab + min(i0 + 0, m - 1) * lda, *a1 = ab + min(i0 + 1, m - 1) * lda,
                         *a2 = ab + min(i0 + 2, m - 1) * lda, *a3 = ab + min(i0 + 3, m - 1) * lda,
                         *a4 = ab + min(i0 + 4, m - 1) * lda, *a5 = ab + min(i0 + 5, m - 1) * lda,
                         *a6 = ab + min(i0 + 6, m - 1) * lda, *a7 = ab + min(i0 + 7, m - 1) * lda;
    for (int p = 0; p < k; p++) {
        float16 bv = vload16(p, bp);
        TILE_UPDATE(a0[p], a1[p], a2[p], a3[p], a4[p], a5[p], a6[p], a7[p], bv);
    }
    STORE_TILE();
}

/* As gemm_tile_an with op(A) = A^T: the tile's rows at step p are A[p, i0 .. i0+7], one
 * float8 when the tile lies inside C. */
__kernel void gemm_tile_at(__global const float *a, const int a_off, const int lda,
                           const int stride_a, __global const float *b, const int b_off,
                           const int stride_b, __global float *c, const int c_off,
                           const int ldc, const int stride_c, const int m, const int n, const int k,
                           const float alpha, const float beta, const int rows_first) {
    TILE_PROLOGUE();
    if (i0 + TM <= m) {
        for (int p = 0; p < k; p++) {
            float8 av = vload8(0, ab + p * lda + i0);
            float16 bv = vload16(p, bp);
            TILE_UPDATE(av.s0, av.s1, av.s2, av.s3, av.s4, av.s5, av.s6, av.s7, bv);
        }
    } else {
        int r[TM];
        for (int q = 0; q < TM; q++)
            r[q] = min(i0 + q, m - 1);
        for (int p = 0; p < k; p++) {
            __global const float *ap = ab + p * lda;
            float16 bv = vload16(p, bp);
            TILE_UPDATE(ap[r[0]], ap[r[1]], ap[r[2]], ap[r[3]], ap[r[4]], ap[r[5]], ap[r[6]],
                        ap[r[7]], bv);
        }
    }
    STORE_TILE();
}

/* Packs op(B) (k x n; B stored n x k when trans) of each batch into panels of TN columns:
 * dst[batch * panels * k * TN + (q * k + p) * TN + c] = op(B)[p, q * TN + c], 0 past n.
 * Dimension 0 runs along p, so for a transposed B consecutive work-items read consecutive
 * floats of each of the TN rows. */
__kernel void gemm_pack_b(__global const float *src, const int src_off, const int ld,
                          const int stride_src, __global float *dst, const int dst_off,
                          const int k, const int n, const int trans) {
    int p = get_global_id(0), q = get_global_id(1), batch = get_global_id(2);
    int panels = (n + TN - 1) / TN;
    if (p >= k || q >= panels)
        return;
    __global const float *sb = src + src_off + batch * stride_src;
    int j0 = q * TN;
    float t[TN];
    for (int c = 0; c < TN; c++) {
        int j = min(j0 + c, n - 1);
        float v = trans ? sb[j * ld + p] : sb[p * ld + j];
        t[c] = j0 + c < n ? v : 0.0f;
    }
    vstore16(vload16(0, t), 0, dst + dst_off + (batch * panels + q) * k * TN + p * TN);
}
