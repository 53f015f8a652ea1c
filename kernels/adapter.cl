/* H-CLIP adapter math (clhclip/adapter_ops.c): Cayley helpers, batched Gauss-Jordan
 * inverse, DCRC relation maps, hyperspherical energy. Tensors are (buffer, element
 * offset) pairs; every kernel bounds-checks its ids because clh_launch rounds global
 * sizes up. Reductions run in a fixed order, without atomics, so results are
 * reproducible from run to run. */

/* ------------------------------------------------------------------ Cayley */

/* a[b] = I + (raw[b] - raw[b]^T) / 2 for n matrices of m x m; 2-D range (m*m, n).
 * S_ij = (r_ij - r_ji)/2 and S_ji = (r_ji - r_ij)/2 are exact negatives in floating
 * point, so I + S and I - S = (I + S)^T hold exactly. */
__kernel void cayley_one_plus_skew(__global const float *raw, const int raw_off,
                                   __global float *a, const int a_off, const int n, const int m) {
    int e = get_global_id(0);
    int b = get_global_id(1);
    if (e >= m * m || b >= n)
        return;
    int i = e / m, j = e % m;
    __global const float *r = raw + raw_off + b * m * m;
    float s = (r[i * m + j] - r[j * m + i]) * 0.5f;
    a[a_off + b * m * m + e] = (i == j ? 1.0f : 0.0f) + s;
}

/* y[b] = (x[b] - x[b]^T) / 2; 2-D range (m*m, n). y must not alias x. */
__kernel void cayley_skew_part(__global const float *x, const int x_off, __global float *y,
                               const int y_off, const int n, const int m) {
    int e = get_global_id(0);
    int b = get_global_id(1);
    if (e >= m * m || b >= n)
        return;
    int i = e / m, j = e % m;
    __global const float *xb = x + x_off + b * m * m;
    y[y_off + b * m * m + e] = (xb[i * m + j] - xb[j * m + i]) * 0.5f;
}

/* ------------------------------------------------------------------ batched inverse
 * Gauss-Jordan elimination with partial pivoting on [W | V], W = A, V = I, one
 * work-group per matrix (local size a power of two). After step k, columns 0..k of
 * W are unit vectors and are never read again, so the updates of W touch columns
 * > k only. The same algorithm runs on local memory (when 2 m^2 floats fit) or on
 * global memory; GJ_DEFINE instantiates it for one address space, because OpenCL
 * 1.2 has no generic pointers. Returns 0, or k + 1 when no usable pivot exists in
 * column k (|pivot| < 1e-30, or not a number). */
#define GJ_PIVOT_MIN 1e-30f

#define GJ_DEFINE(NAME, SPACE, FENCE)                                                              \
    static int NAME(SPACE float *w, SPACE float *v, const int m, __local float *best_val,         \
                    __local int *best_row, __local float *factor) {                                \
        const int lid = get_local_id(0), lsize = get_local_size(0);                               \
        for (int k = 0; k < m; k++) {                                                              \
            /* pivot: largest |w[i][k]| over rows i >= k, smallest row on ties */                 \
            float bv = -1.0f;                                                                      \
            int br = m;                                                                            \
            for (int i = k + lid; i < m; i += lsize) {                                             \
                float a = fabs(w[i * m + k]);                                                      \
                if (a > bv) {                                                                      \
                    bv = a;                                                                        \
                    br = i;                                                                        \
                }                                                                                  \
            }                                                                                      \
            best_val[lid] = bv;                                                                    \
            best_row[lid] = br;                                                                    \
            barrier(CLK_LOCAL_MEM_FENCE);                                                          \
            for (int stride = lsize / 2; stride > 0; stride >>= 1) {                               \
                if (lid < stride) {                                                                \
                    float ov = best_val[lid + stride];                                             \
                    int orow = best_row[lid + stride];                                             \
                    if (ov > best_val[lid] || (ov == best_val[lid] && orow < best_row[lid])) {     \
                        best_val[lid] = ov;                                                        \
                        best_row[lid] = orow;                                                      \
                    }                                                                              \
                }                                                                                  \
                barrier(CLK_LOCAL_MEM_FENCE);                                                      \
            }                                                                                      \
            const int p = best_row[0];                                                             \
            const float pmag = best_val[0];                                                        \
            /* uniform over the group: every item read the same best_val[0] */                    \
            if (!(pmag >= GJ_PIVOT_MIN) || p >= m)                                                 \
                return k + 1;                                                                      \
            /* swap rows k and p of W (columns >= k) and V */                                     \
            if (p != k) {                                                                          \
                for (int c = lid; c < 2 * m; c += lsize) {                                         \
                    SPACE float *mat = c < m ? w : v;                                              \
                    int col = c < m ? c : c - m;                                                   \
                    if (c < m && col < k)                                                          \
                        continue;                                                                  \
                    float t = mat[k * m + col];                                                    \
                    mat[k * m + col] = mat[p * m + col];                                           \
                    mat[p * m + col] = t;                                                          \
                }                                                                                  \
            }                                                                                      \
            barrier(FENCE | CLK_LOCAL_MEM_FENCE);                                                  \
            const float inv_pivot = 1.0f / w[k * m + k];                                           \
            /* elimination factors: column k of the other rows (never written below) */            \
            for (int i = lid; i < m; i += lsize)                                                   \
                factor[i] = i == k ? 0.0f : w[i * m + k];                                          \
            barrier(CLK_LOCAL_MEM_FENCE);                                                          \
            /* one work-item per column (W columns > k, then all of V): scale the entry of         \
             * row k, then subtract factor_i times it from row i (factor_k = 0 keeps row k);       \
             * neighbouring items touch neighbouring addresses of each row */                      \
            const int wcols = m - k - 1;                                                           \
            for (int c = lid; c < wcols + m; c += lsize) {                                         \
                SPACE float *col = c < wcols ? w + k + 1 + c : v + (c - wcols);                    \
                float pivot_entry = col[k * m] * inv_pivot;                                        \
                col[k * m] = pivot_entry;                                                          \
                for (int i = 0; i < m; i++)                                                        \
                    col[i * m] -= factor[i] * pivot_entry;                                         \
            }                                                                                      \
            barrier(FENCE | CLK_LOCAL_MEM_FENCE);                                                  \
        }                                                                                          \
        return 0;                                                                                  \
    }

GJ_DEFINE(gj_invert_local, __local, CLK_LOCAL_MEM_FENCE)
GJ_DEFINE(gj_invert_global, __global, CLK_GLOBAL_MEM_FENCE)

/* One group per matrix: inv[g] = a[g]^-1 with W and V in local memory (2 m^2 floats
 * in `mats`). status[g] = 0, or k + 1 when column k had no usable pivot. */
__kernel void gj_inverse_local(__global const float *a, const int a_off, __global float *inv,
                               const int inv_off, __global float *status, const int status_off,
                               const int n, const int m, __local float *mats,
                               __local float *best_val, __local int *best_row,
                               __local float *factor) {
    int g = get_group_id(0);
    if (g >= n)
        return;
    int lid = get_local_id(0), lsize = get_local_size(0);
    __global const float *src = a + a_off + g * m * m;
    __local float *w = mats, *v = mats + m * m;
    for (int e = lid; e < m * m; e += lsize) {
        w[e] = src[e];
        v[e] = e / m == e % m ? 1.0f : 0.0f;
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    int st = gj_invert_local(w, v, m, best_val, best_row, factor);
    __global float *dst = inv + inv_off + g * m * m;
    for (int e = lid; e < m * m; e += lsize)
        dst[e] = v[e];
    if (lid == 0)
        status[status_off + g] = (float)st;
}

/* The same on global memory: W is a scratch copy of a (work), V is inv itself. */
__kernel void gj_inverse_global(__global const float *a, const int a_off, __global float *work,
                                const int work_off, __global float *inv, const int inv_off,
                                __global float *status, const int status_off, const int n,
                                const int m, __local float *best_val, __local int *best_row,
                                __local float *factor) {
    int g = get_group_id(0);
    if (g >= n)
        return;
    int lid = get_local_id(0), lsize = get_local_size(0);
    __global const float *src = a + a_off + g * m * m;
    __global float *w = work + work_off + g * m * m;
    __global float *v = inv + inv_off + g * m * m;
    for (int e = lid; e < m * m; e += lsize) {
        w[e] = src[e];
        v[e] = e / m == e % m ? 1.0f : 0.0f;
    }
    barrier(CLK_GLOBAL_MEM_FENCE);
    int st = gj_invert_global(w, v, m, best_val, best_row, factor);
    if (lid == 0)
        status[status_off + g] = (float)st;
}

/* ------------------------------------------------------------------ DCRC
 * Raw block rows: text blocks first, row (4 l + t) * bt + j for l < text_layers, then
 * vision blocks at 4 * text_layers * bt + (4 l + t) * bv + j. Block row j of an
 * encoder is modality row m_e(j) = j (text) or bt + j (vision). */

/* Decode raw block `row` into its slot 4 l + t, its layer l and modality row. */
static void dcrc_decode(int row, int text_layers, int bt, int bv, int *slot, int *mrow) {
    int text_rows = 4 * text_layers * bt;
    if (row < text_rows) {
        *slot = row / bt;
        *mrow = row % bt;
    } else {
        *slot = (row - text_rows) / bv;
        *mrow = bt + (row - text_rows) % bv;
    }
}

/* k[row, s*M + mm] = B[slot, s] * A_l[mrow, mm]; has_a / has_b = 0 use the identity.
 * 2-D range (S*M, n_blocks). */
__kernel void dcrc_build_k(__global const float *a, const int a_off, const int has_a,
                           __global const float *b, const int b_off, const int has_b,
                           __global float *k, const int k_off, const int n_blocks,
                           const int text_layers, const int bt, const int bv, const int slots,
                           const int mods) {
    int col = get_global_id(0);
    int row = get_global_id(1);
    if (col >= slots * mods || row >= n_blocks)
        return;
    int slot, mrow;
    dcrc_decode(row, text_layers, bt, bv, &slot, &mrow);
    int s = col / mods, mm = col % mods, l = slot / 4;
    float bval = has_b ? b[b_off + slot * slots + s] : (slot == s ? 1.0f : 0.0f);
    float aval = has_a ? a[a_off + (l * mods + mrow) * mods + mm] : (mrow == mm ? 1.0f : 0.0f);
    k[k_off + row * slots * mods + col] = bval * aval;
}

/* db[slot, s] += sum over the blocks of that slot (both encoders), over mm, of
 * dk[row, s*M + mm] * A_l[mrow, mm]. 2-D range (S, S). */
__kernel void dcrc_grad_b(__global const float *dk, const int dk_off, __global const float *a,
                          const int a_off, const int has_a, __global float *db, const int db_off,
                          const int text_layers, const int vision_layers, const int bt,
                          const int bv, const int slots, const int mods) {
    int s = get_global_id(0);
    int slot = get_global_id(1);
    if (s >= slots || slot >= slots)
        return;
    int l = slot / 4, width = slots * mods;
    float acc = 0.0f;
    for (int e = 0; e < 2; e++) {
        int layers = e == 0 ? text_layers : vision_layers;
        int nb = e == 0 ? bt : bv;
        int base = e == 0 ? 0 : 4 * text_layers * bt;
        if (l >= layers)
            continue;
        for (int j = 0; j < nb; j++) {
            int mrow = e == 0 ? j : bt + j;
            __global const float *dkr = dk + dk_off + (base + slot * nb + j) * width + s * mods;
            if (!has_a) {
                acc += dkr[mrow];
                continue;
            }
            __global const float *ar = a + a_off + (l * mods + mrow) * mods;
            for (int mm = 0; mm < mods; mm++)
                acc += dkr[mm] * ar[mm];
        }
    }
    db[db_off + slot * slots + s] += acc;
}

/* da[l, r, mm] += sum over t, s of dk[row(e, l, t, j), s*M + mm] * B[4l + t, s], where
 * r = m_e(j); rows of A_l that no block of layer l uses get nothing. 2-D range (M*M, L). */
__kernel void dcrc_grad_a(__global const float *dk, const int dk_off, __global const float *b,
                          const int b_off, const int has_b, __global float *da, const int da_off,
                          const int text_layers, const int vision_layers, const int bt,
                          const int bv, const int slots, const int mods) {
    int e_id = get_global_id(0);
    int l = get_global_id(1);
    if (e_id >= mods * mods || l >= slots / 4)
        return;
    int r = e_id / mods, mm = e_id % mods, width = slots * mods;
    int text = r < bt;
    if (l >= (text ? text_layers : vision_layers))
        return;
    int nb = text ? bt : bv, j = text ? r : r - bt, base = text ? 0 : 4 * text_layers * bt;
    float acc = 0.0f;
    for (int t = 0; t < 4; t++) {
        int slot = 4 * l + t;
        __global const float *dkr = dk + dk_off + (base + slot * nb + j) * width;
        if (!has_b) {
            acc += dkr[slot * mods + mm];
            continue;
        }
        __global const float *br = b + b_off + slot * slots;
        for (int s = 0; s < slots; s++)
            acc += dkr[s * mods + mm] * br[s];
    }
    da[da_off + (l * mods + r) * mods + mm] += acc;
}

/* ------------------------------------------------------------------ hyperspherical energy
 * Vectors i < nv of length len are read from w at w[i * rs + k * cs] (rows: rs = len,
 * cs = 1; columns: rs = 1, cs = nv). One work-group per vector or Gram row; the local
 * size is a power of two and `scratch` holds one float per work-item. */

#define HE_NORM_MIN 1e-12f /* as torch.nn.functional.normalize */
#define HE_DIST2_MIN 1e-12f

/* Sum over the work-group in a fixed tree order. */
static float he_group_sum(__local float *scratch, float v) {
    int lid = get_local_id(0);
    scratch[lid] = v;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int stride = get_local_size(0) / 2; stride > 0; stride >>= 1) {
        if (lid < stride)
            scratch[lid] += scratch[lid + stride];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    float total = scratch[0];
    barrier(CLK_LOCAL_MEM_FENCE);
    return total;
}

/* what[i] = w_i / max(|w_i|, 1e-12); norms[i] = |w_i|; sq[i] = |what_i|^2 (1, or 0 for
 * a zero vector), so that |what_i - what_j|^2 = sq_i + sq_j - 2 what_i.what_j exactly. */
__kernel void he_normalize(__global const float *w, const int w_off, const int rs, const int cs,
                           const int nv, const int len, __global float *what, const int what_off,
                           __global float *norms, const int norms_off, __global float *sq,
                           const int sq_off, __local float *scratch) {
    int i = get_group_id(0);
    if (i >= nv)
        return;
    int lid = get_local_id(0), lsize = get_local_size(0);
    __global const float *src = w + w_off + i * rs;
    __global float *dst = what + what_off + i * len;
    float acc = 0.0f;
    for (int k = lid; k < len; k += lsize)
        acc += src[k * cs] * src[k * cs];
    float norm = sqrt(he_group_sum(scratch, acc));
    float inv = 1.0f / fmax(norm, HE_NORM_MIN);
    acc = 0.0f;
    for (int k = lid; k < len; k += lsize) {
        float u = src[k * cs] * inv;
        dst[k] = u;
        acc += u * u;
    }
    acc = he_group_sum(scratch, acc);
    if (lid == 0) {
        norms[norms_off + i] = norm;
        sq[sq_off + i] = acc;
    }
}

/* Distance of vectors i and j from their Gram entry, floored so that coinciding
 * vectors give a large finite energy instead of inf. */
static float he_dist(float sq_i, float sq_j, float gram) {
    return sqrt(fmax(sq_i + sq_j - 2.0f * gram, HE_DIST2_MIN));
}

/* f_s(d) = d^-s (s > 0), -log d (s = 0) */
static float he_f(float d, float s) {
    if (s == 0.0f)
        return -log(d);
    if (s == 1.0f)
        return 1.0f / d;
    if (s == 2.0f)
        return 1.0f / (d * d);
    return exp(-s * log(d));
}

/* 2 f_s'(d) / d: -2 s d^(-s-2) (s > 0), -2 / d^2 (s = 0) */
static float he_coeff(float d, float s) {
    float inv2 = 1.0f / (d * d);
    if (s == 0.0f)
        return -2.0f * inv2;
    if (s == 1.0f)
        return -2.0f * inv2 / d;
    if (s == 2.0f)
        return -4.0f * inv2 * inv2;
    return -2.0f * s * exp(-s * log(d)) * inv2;
}

/* partial[i0 + r] = sum over j != i0 + r of f_s(d_ij), from the Gram tile rows
 * gram[r, 0..nv) for r < rows. One group per tile row. */
__kernel void he_energy_rows(__global const float *gram, const int gram_off,
                             __global const float *sq, const int sq_off, const int i0,
                             const int rows, const int nv, const float s,
                             __global float *partial, const int partial_off,
                             __local float *scratch) {
    int r = get_group_id(0);
    if (r >= rows)
        return;
    int lid = get_local_id(0), lsize = get_local_size(0), i = i0 + r;
    __global const float *g = gram + gram_off + r * nv;
    float sq_i = sq[sq_off + i], acc = 0.0f;
    for (int j = lid; j < nv; j += lsize)
        if (j != i)
            acc += he_f(he_dist(sq_i, sq[sq_off + j], g[j]), s);
    acc = he_group_sum(scratch, acc);
    if (lid == 0)
        partial[partial_off + i] = acc;
}

/* Turn Gram tile rows into coefficients C_ij = 2 f_s'(d_ij) / d_ij (0 on the diagonal)
 * in place, and csum[i0 + r] = sum_j C_ij. */
__kernel void he_coeff_rows(__global float *gram, const int gram_off, __global const float *sq,
                            const int sq_off, const int i0, const int rows, const int nv,
                            const float s, __global float *csum, const int csum_off,
                            __local float *scratch) {
    int r = get_group_id(0);
    if (r >= rows)
        return;
    int lid = get_local_id(0), lsize = get_local_size(0), i = i0 + r;
    __global float *g = gram + gram_off + r * nv;
    float sq_i = sq[sq_off + i], acc = 0.0f;
    for (int j = lid; j < nv; j += lsize) {
        float c = j == i ? 0.0f : he_coeff(he_dist(sq_i, sq[sq_off + j], g[j]), s);
        g[j] = c;
        acc += c;
    }
    acc = he_group_sum(scratch, acc);
    if (lid == 0)
        csum[csum_off + i] = acc;
}

/* Gradient of vector i w.r.t. its normalised form, gh = csum_i what_i + y_i (y = -C What),
 * taken through the normalisation: dw_i += scale (gh - what_i (what_i.gh)) / |w_i|, or
 * scale * gh / 1e-12 below the norm floor (where what = w / 1e-12 is linear). */
__kernel void he_backward_rows(__global const float *what, const int what_off,
                               __global const float *y, const int y_off,
                               __global const float *csum, const int csum_off,
                               __global const float *norms, const int norms_off, const int nv,
                               const int len, const float scale, __global float *dw,
                               const int dw_off, const int rs, const int cs,
                               __local float *scratch) {
    int i = get_group_id(0);
    if (i >= nv)
        return;
    int lid = get_local_id(0), lsize = get_local_size(0);
    __global const float *u = what + what_off + i * len;
    __global const float *yi = y + y_off + i * len;
    float ci = csum[csum_off + i], norm = norms[norms_off + i];
    float acc = 0.0f;
    for (int k = lid; k < len; k += lsize)
        acc += u[k] * (ci * u[k] + yi[k]);
    float dot = he_group_sum(scratch, acc);
    int floored = !(norm > HE_NORM_MIN);
    float factor = scale / (floored ? HE_NORM_MIN : norm);
    __global float *dst = dw + dw_off + i * rs;
    for (int k = lid; k < len; k += lsize) {
        float gh = ci * u[k] + yi[k];
        dst[k * cs] += factor * (floored ? gh : gh - u[k] * dot);
    }
}
