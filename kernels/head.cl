/* Kernels of the CAT-Seg head layers (clhclip/head_ops.c): im2col / col2im for
 * convolutions, the pixel scatter of kernel == stride transposed convolutions, group
 * norm, bilinear resize, average pooling, ReLU / ELU, Swin window partition and cyclic
 * roll. All tensors are NCHW (or [N, H, W, C] for the Swin ops) fp32 with an element
 * offset per tensor.
 *
 * Determinism: no atomics. Every backward is a gather (each input element sums its
 * contributions in a fixed order); reductions use a fixed tree over a work-group. */

/* Sum of v over the work-group (fixed tree order); the local size is a power of two. */
static float head_group_sum(__local float *scratch, float v) {
    int lid = get_local_id(0);
    scratch[lid] = v;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int stride = get_local_size(0) / 2; stride > 0; stride >>= 1) {
        if (lid < stride)
            scratch[lid] += scratch[lid + stride];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    float total = scratch[0];
    barrier(CLK_LOCAL_MEM_FENCE); /* scratch is reused by the next reduction */
    return total;
}

/* ------------------------------------------------------------------ convolution */

/* col[(c*kh + i)*kw + j, oh*ow_n + ow] = x[c, oh*stride - pad + i, ow*stride - pad + j]
 * (0 outside) for one image. 1-D range over C*kh*kw*OH*OW. */
__kernel void head_im2col(__global const float *x, const int x_off, const int channels,
                          const int height, const int width, const int kh, const int kw,
                          const int stride, const int pad, const int out_h, const int out_w,
                          __global float *col, const int col_off) {
    int idx = get_global_id(0);
    int pixels = out_h * out_w;
    if (idx >= channels * kh * kw * pixels)
        return;
    int p = idx % pixels, row = idx / pixels;
    int j = row % kw, i = (row / kw) % kh, c = row / (kw * kh);
    int ih = (p / out_w) * stride - pad + i, iw = (p % out_w) * stride - pad + j;
    float v = 0.0f;
    if (ih >= 0 && ih < height && iw >= 0 && iw < width)
        v = x[x_off + (c * height + ih) * width + iw];
    col[col_off + idx] = v;
}

/* The adjoint of head_im2col as a gather: dx[c, ih, iw] = sum over (i, j) of
 * dcol[(c, i, j), (oh, ow)] with oh*stride - pad + i = ih (and the same for w).
 * Overwrites dx. 1-D range over C*H*W. */
__kernel void head_col2im(__global const float *dcol, const int dcol_off, const int channels,
                          const int height, const int width, const int kh, const int kw,
                          const int stride, const int pad, const int out_h, const int out_w,
                          __global float *dx, const int dx_off) {
    int idx = get_global_id(0);
    if (idx >= channels * height * width)
        return;
    int iw = idx % width, ih = (idx / width) % height, c = idx / (width * height);
    float acc = 0.0f;
    for (int i = 0; i < kh; i++) {
        int th = ih + pad - i;
        if (th < 0 || th % stride != 0 || th / stride >= out_h)
            continue;
        for (int j = 0; j < kw; j++) {
            int tw = iw + pad - j;
            if (tw < 0 || tw % stride != 0 || tw / stride >= out_w)
                continue;
            int row = (c * kh + i) * kw + j;
            acc += dcol[dcol_off + row * out_h * out_w + (th / stride) * out_w + tw / stride];
        }
    }
    dx[dx_off + idx] = acc;
}

/* y[n, c, p] += bias[c] for y [N, C, P]. 1-D range over N*C*P. */
__kernel void head_add_channel_bias(__global float *y, const int y_off, const int channels,
                                    const int pixels, const int total, __global const float *bias,
                                    const int bias_off) {
    int idx = get_global_id(0);
    if (idx >= total)
        return;
    y[y_off + idx] += bias[bias_off + (idx / pixels) % channels];
}

/* out[c] += sum over n, p of a[n, c, p] (times b[n, c, p] when use_b) for [N, C, P]:
 * one work-group per channel, each work-item a fixed strided subset, then a fixed tree. */
__kernel void head_channel_sums(__global const float *a, const int a_off,
                                __global const float *b, const int b_off, const int use_b,
                                const int batch, const int channels, const int pixels,
                                __global float *out, const int out_off, __local float *scratch) {
    int c = get_group_id(0);
    if (c >= channels)
        return; /* uniform over the work-group */
    int count = batch * pixels;
    float acc = 0.0f;
    for (int e = get_local_id(0); e < count; e += get_local_size(0)) {
        int at = ((e / pixels) * channels + c) * pixels + e % pixels;
        float v = a[a_off + at];
        acc += use_b ? v * b[b_off + at] : v;
    }
    float total = head_group_sum(scratch, acc);
    if (get_local_id(0) == 0)
        out[out_off + c] += total;
}

/* ------------------------------------------------------------------ transposed conv (k == s) */

/* z [O*k*k, H*W] (one image, from the GEMM) -> y[o, h*k + i, w*k + j] = z[(o*k + i)*k + j,
 * h*W + w] + bias[o] (when use_bias). 1-D range over O*(H*k)*(W*k). */
__kernel void head_convt_scatter(__global const float *z, const int z_off, const int out_ch,
                                 const int height, const int width, const int k,
                                 __global const float *bias, const int bias_off,
                                 const int use_bias, __global float *y, const int y_off) {
    int idx = get_global_id(0);
    int oh_n = height * k, ow_n = width * k;
    if (idx >= out_ch * oh_n * ow_n)
        return;
    int ow = idx % ow_n, oh = (idx / ow_n) % oh_n, o = idx / (ow_n * oh_n);
    int row = (o * k + oh % k) * k + ow % k;
    float v = z[z_off + row * height * width + (oh / k) * width + ow / k];
    y[y_off + idx] = use_bias ? v + bias[bias_off + o] : v;
}

/* The inverse rearrangement: dz[(o*k + i)*k + j, h*W + w] = dy[o, h*k + i, w*k + j].
 * 1-D range over O*k*k*H*W. */
__kernel void head_convt_gather(__global const float *dy, const int dy_off, const int out_ch,
                                const int height, const int width, const int k,
                                __global float *dz, const int dz_off) {
    int idx = get_global_id(0);
    int pixels = height * width;
    if (idx >= out_ch * k * k * pixels)
        return;
    int p = idx % pixels, row = idx / pixels;
    int j = row % k, i = (row / k) % k, o = row / (k * k);
    int oh = (p / width) * k + i, ow = (p % width) * k + j;
    dz[dz_off + idx] = dy[dy_off + (o * height * k + oh) * width * k + ow];
}

/* ------------------------------------------------------------------ group norm */

/* Mean and 1/std of the count elements at xg (two passes, biased variance, as torch). */
static float2 head_group_stats(__global const float *xg, const int count, const float eps,
                               __local float *scratch) {
    int lid = get_local_id(0), lsize = get_local_size(0);
    float acc = 0.0f;
    for (int e = lid; e < count; e += lsize)
        acc += xg[e];
    float mean = head_group_sum(scratch, acc) / count;
    acc = 0.0f;
    for (int e = lid; e < count; e += lsize) {
        float d = xg[e] - mean;
        acc += d * d;
    }
    return (float2)(mean, rsqrt(head_group_sum(scratch, acc) / count + eps));
}

/* One work-group per (n, g): the group's count = (C/G)*H*W elements are contiguous.
 * y = (x - mean) * rstd * gamma[c] + beta[c]. */
__kernel void head_group_norm_forward(__global const float *x, const int x_off,
                                      __global const float *gamma, const int gamma_off,
                                      __global const float *beta, const int beta_off,
                                      __global float *y, const int y_off, const int groups_total,
                                      const int count, const int channels, const int pixels,
                                      const float eps, __local float *scratch) {
    int grp = get_group_id(0);
    if (grp >= groups_total)
        return; /* uniform over the work-group */
    __global const float *xg = x + x_off + grp * count;
    float2 st = head_group_stats(xg, count, eps, scratch);
    for (int e = get_local_id(0); e < count; e += get_local_size(0)) {
        int c = ((grp * count + e) / pixels) % channels;
        y[y_off + grp * count + e] =
            (xg[e] - st.x) * st.y * gamma[gamma_off + c] + beta[beta_off + c];
    }
}

/* One work-group per (n, g): stats[grp] = (mean, rstd) for the parameter gradients and,
 * when write_dx, dx = rstd * (t - mean(t) - xhat * mean(t * xhat)), t = dy * gamma[c],
 * xhat = (x - mean) * rstd, the means over the group. */
__kernel void head_group_norm_backward(__global const float *x, const int x_off,
                                       __global const float *gamma, const int gamma_off,
                                       __global const float *dy, const int dy_off,
                                       __global float *dx, const int dx_off,
                                       __global float *stats, const int stats_off,
                                       const int groups_total, const int count,
                                       const int channels, const int pixels, const float eps,
                                       const int write_dx, __local float *scratch) {
    int grp = get_group_id(0);
    if (grp >= groups_total)
        return; /* uniform over the work-group */
    int lid = get_local_id(0), lsize = get_local_size(0);
    __global const float *xg = x + x_off + grp * count;
    __global const float *dyg = dy + dy_off + grp * count;
    float2 st = head_group_stats(xg, count, eps, scratch);
    if (lid == 0) {
        stats[stats_off + 2 * grp] = st.x;
        stats[stats_off + 2 * grp + 1] = st.y;
    }
    if (!write_dx)
        return;
    float sum_t = 0.0f, sum_tx = 0.0f;
    for (int e = lid; e < count; e += lsize) {
        int c = ((grp * count + e) / pixels) % channels;
        float t = dyg[e] * gamma[gamma_off + c];
        sum_t += t;
        sum_tx += t * (xg[e] - st.x) * st.y;
    }
    float mean_t = head_group_sum(scratch, sum_t) / count;
    float mean_tx = head_group_sum(scratch, sum_tx) / count;
    for (int e = lid; e < count; e += lsize) {
        int c = ((grp * count + e) / pixels) % channels;
        float t = dyg[e] * gamma[gamma_off + c];
        float xhat = (xg[e] - st.x) * st.y;
        dx[dx_off + grp * count + e] = st.y * (t - mean_t - xhat * mean_tx);
    }
}

/* dgamma[c] += sum over n, p of dy * xhat and dbeta[c] += sum of dy, one work-group per
 * channel (either output may be skipped with its flag). stats from the kernel above. */
__kernel void head_group_norm_params(__global const float *x, const int x_off,
                                     __global const float *dy, const int dy_off,
                                     __global const float *stats, const int stats_off,
                                     const int batch, const int channels, const int pixels,
                                     const int group_ch, __global float *dgamma,
                                     const int dgamma_off, const int want_dgamma,
                                     __global float *dbeta, const int dbeta_off,
                                     const int want_dbeta, __local float *scratch) {
    /* no early return before the barriers of the sums: with one, PoCL 3.1 (pthread device)
     * compiled this kernel into an endless loop; a group past the channels sums nothing */
    int c = get_group_id(0);
    int groups = channels / group_ch;
    int count = c < channels ? batch * pixels : 0;
    float acc_g = 0.0f, acc_b = 0.0f;
    for (int e = get_local_id(0); e < count; e += get_local_size(0)) {
        int n = e / pixels;
        int at = (n * channels + c) * pixels + e % pixels;
        int s = stats_off + 2 * (n * groups + c / group_ch);
        float g = dy[dy_off + at];
        acc_g += g * (x[x_off + at] - stats[s]) * stats[s + 1];
        acc_b += g;
    }
    float total_g = head_group_sum(scratch, acc_g);
    float total_b = head_group_sum(scratch, acc_b);
    if (get_local_id(0) == 0 && c < channels) {
        if (want_dgamma)
            dgamma[dgamma_off + c] += total_g;
        if (want_dbeta)
            dbeta[dbeta_off + c] += total_b;
    }
}

/* ------------------------------------------------------------------ bilinear resize */

/* Source taps of output index d along one axis, as torch's upsample_bilinear2d:
 * align_corners: src = d * (in - 1) / (out - 1) (0 when out == 1); otherwise
 * src = max((d + 0.5) * in / out - 0.5, 0). i0 = floor(src), i1 = min(i0 + 1, in - 1),
 * weights (1 - l, l) with l = src - i0. */
static void head_bilinear_taps(int d, int in, int out, int align, int *i0, int *i1, float *l) {
    float src;
    if (align)
        src = out > 1 ? (float)d * ((float)(in - 1) / (float)(out - 1)) : 0.0f;
    else
        src = fmax(((float)d + 0.5f) * ((float)in / (float)out) - 0.5f, 0.0f);
    int lo = min((int)src, in - 1);
    *i0 = lo;
    *i1 = min(lo + 1, in - 1);
    *l = src - (float)lo;
}

/* y [P, H2, W2] from x [P, H, W] (P = N*C planes). 1-D range over P*H2*W2. */
__kernel void head_bilinear_forward(__global const float *x, const int x_off, const int planes,
                                    const int in_h, const int in_w, const int out_h,
                                    const int out_w, const int align, __global float *y,
                                    const int y_off) {
    int idx = get_global_id(0);
    if (idx >= planes * out_h * out_w)
        return;
    int ow = idx % out_w, oh = (idx / out_w) % out_h, p = idx / (out_w * out_h);
    int h0, h1, w0, w1;
    float lh, lw;
    head_bilinear_taps(oh, in_h, out_h, align, &h0, &h1, &lh);
    head_bilinear_taps(ow, in_w, out_w, align, &w0, &w1, &lw);
    __global const float *xp = x + x_off + p * in_h * in_w;
    float top = (1.0f - lw) * xp[h0 * in_w + w0] + lw * xp[h0 * in_w + w1];
    float bottom = (1.0f - lw) * xp[h1 * in_w + w0] + lw * xp[h1 * in_w + w1];
    y[y_off + idx] = (1.0f - lh) * top + lh * bottom;
}

/* Weight of input index i in output index d along one axis (0 when no tap hits it; both
 * taps add when they coincide at the border). */
static float head_bilinear_weight(int d, int i, int in, int out, int align) {
    int i0, i1;
    float l;
    head_bilinear_taps(d, in, out, align, &i0, &i1, &l);
    return (i0 == i ? 1.0f - l : 0.0f) + (i1 == i ? l : 0.0f);
}

/* Gather backward: dx[p, ih, iw] = sum over output (oh, ow) of wh(oh, ih) ww(ow, iw)
 * dy[p, oh, ow]. The taps are monotonic in the output index, so the outputs that touch an
 * input index form one contiguous range per axis; it is found by a scan of that axis.
 * 1-D range over P*H*W. Overwrites dx. */
__kernel void head_bilinear_backward(__global const float *dy, const int dy_off,
                                     const int planes, const int in_h, const int in_w,
                                     const int out_h, const int out_w, const int align,
                                     __global float *dx, const int dx_off) {
    int idx = get_global_id(0);
    if (idx >= planes * in_h * in_w)
        return;
    int iw = idx % in_w, ih = (idx / in_w) % in_h, p = idx / (in_w * in_h);
    int w_first = out_w, w_last = -1;
    for (int ow = 0; ow < out_w; ow++) {
        int i0, i1;
        float l;
        head_bilinear_taps(ow, in_w, out_w, align, &i0, &i1, &l);
        if (i0 == iw || i1 == iw) {
            w_first = min(w_first, ow);
            w_last = ow;
        }
    }
    __global const float *dyp = dy + dy_off + p * out_h * out_w;
    float acc = 0.0f;
    for (int oh = 0; oh < out_h; oh++) {
        int i0, i1;
        float l;
        head_bilinear_taps(oh, in_h, out_h, align, &i0, &i1, &l);
        if (i0 != ih && i1 != ih)
            continue;
        float wh = (i0 == ih ? 1.0f - l : 0.0f) + (i1 == ih ? l : 0.0f);
        float row = 0.0f;
        for (int ow = w_first; ow <= w_last; ow++)
            row += head_bilinear_weight(ow, iw, in_w, out_w, align) * dyp[oh * out_w + ow];
        acc += wh * row;
    }
    dx[dx_off + idx] = acc;
}

/* ------------------------------------------------------------------ average pooling */

/* y[p, oh, ow] = mean of the k x k window at (oh*k, ow*k); OH = H / k (floor). */
__kernel void head_avg_pool_forward(__global const float *x, const int x_off, const int planes,
                                    const int in_h, const int in_w, const int k, const int out_h,
                                    const int out_w, __global float *y, const int y_off) {
    int idx = get_global_id(0);
    if (idx >= planes * out_h * out_w)
        return;
    int ow = idx % out_w, oh = (idx / out_w) % out_h, p = idx / (out_w * out_h);
    __global const float *xp = x + x_off + p * in_h * in_w;
    float acc = 0.0f;
    for (int i = 0; i < k; i++)
        for (int j = 0; j < k; j++)
            acc += xp[(oh * k + i) * in_w + ow * k + j];
    y[y_off + idx] = acc / (float)(k * k);
}

/* dx[p, ih, iw] = dy[p, ih/k, iw/k] / k^2 (0 for the rows/columns the floor drops). */
__kernel void head_avg_pool_backward(__global const float *dy, const int dy_off,
                                     const int planes, const int in_h, const int in_w,
                                     const int k, const int out_h, const int out_w,
                                     __global float *dx, const int dx_off) {
    int idx = get_global_id(0);
    if (idx >= planes * in_h * in_w)
        return;
    int iw = idx % in_w, ih = (idx / in_w) % in_h, p = idx / (in_w * in_h);
    int oh = ih / k, ow = iw / k;
    float v = 0.0f;
    if (oh < out_h && ow < out_w)
        v = dy[dy_off + (p * out_h + oh) * out_w + ow] / (float)(k * k);
    dx[dx_off + idx] = v;
}

/* ------------------------------------------------------------------ activations */

/* op 0: relu, 1: elu (alpha 1). */
__kernel void head_act_forward(__global const float *x, const int x_off, const int n,
                               const int op, __global float *y, const int y_off) {
    int i = get_global_id(0);
    if (i >= n)
        return;
    float v = x[x_off + i];
    y[y_off + i] = v > 0.0f ? v : (op == 0 ? 0.0f : expm1(v));
}

/* dx = dy * f'(x): relu' = (x > 0), elu' = 1 (x > 0) or exp(x). */
__kernel void head_act_backward(__global const float *x, const int x_off,
                                __global const float *dy, const int dy_off, const int n,
                                const int op, __global float *dx, const int dx_off) {
    int i = get_global_id(0);
    if (i >= n)
        return;
    float v = x[x_off + i];
    float g = v > 0.0f ? 1.0f : (op == 0 ? 0.0f : exp(v));
    dx[dx_off + i] = dy[dy_off + i] * g;
}

/* ------------------------------------------------------------------ Swin window ops */

/* Window partition ([N, H, W, C] <-> [N*nW, ws*ws, C]); one work-item per element of the
 * windowed layout. direction 0: win = partition(x); 1: x = reverse(win). */
__kernel void head_window_permute(__global const float *src, const int src_off, const int height,
                                  const int width, const int chans, const int ws,
                                  const int total, const int direction, __global float *dst,
                                  const int dst_off) {
    int idx = get_global_id(0);
    if (idx >= total)
        return;
    int c = idx % chans, t = (idx / chans) % (ws * ws), win = idx / (chans * ws * ws);
    int nw_w = width / ws, nw = (height / ws) * nw_w;
    int n = win / nw, wh = (win % nw) / nw_w, ww = win % nw_w;
    int h = wh * ws + t / ws, w = ww * ws + t % ws;
    int plain = ((n * height + h) * width + w) * chans + c;
    if (direction == 0)
        dst[dst_off + idx] = src[src_off + plain];
    else
        dst[dst_off + plain] = src[src_off + idx];
}

/* torch.roll over dims 1, 2 of [N, H, W, C]: y[n, (h + sh) mod H, (w + sw) mod W] = x[n, h, w]
 * (shifts already reduced to [0, H) and [0, W)). One work-item per output element. */
__kernel void head_roll2d(__global const float *x, const int x_off, const int height,
                          const int width, const int chans, const int shift_h,
                          const int shift_w, const int total, __global float *y,
                          const int y_off) {
    int idx = get_global_id(0);
    if (idx >= total)
        return;
    int c = idx % chans, w = (idx / chans) % width, h = (idx / (chans * width)) % height;
    int n = idx / (chans * width * height);
    int sh = (h - shift_h + height) % height, sw = (w - shift_w + width) % width;
    y[y_off + idx] = x[x_off + ((n * height + sh) * width + sw) * chans + c];
}

/* head_im2col for `images` consecutive images at once. One work-item per (image, row of the
 * column matrix, output line) walks the output line, so that the index arithmetic (integer
 * division is slow on CPU devices) is paid once per line. col[img * img_stride +
 * row * row_stride + pixel]: [images, C kh kw, P] with (C kh kw P, P), or [C kh kw, images P]
 * with (P, images P). 1-D range over images * C kh kw * out_h. */
__kernel void head_im2col_batch(__global const float *x, const int x_off, const int channels,
                                const int height, const int width, const int kh, const int kw,
                                const int stride, const int pad, const int out_h,
                                const int out_w, const int images, const int img_stride,
                                const int row_stride, __global float *col, const int col_off) {
    int gid = get_global_id(0);
    int rows = channels * kh * kw;
    if (gid >= images * rows * out_h)
        return;
    int oh = gid % out_h, r = gid / out_h;
    int img = r / rows, row = r - img * rows;
    int c = row / (kh * kw), ij = row - c * (kh * kw);
    int i = ij / kw, j = ij - i * kw;
    int ih = oh * stride - pad + i;
    __global float *dst = col + col_off + img * img_stride + row * row_stride + oh * out_w;
    if (ih < 0 || ih >= height) {
        for (int ow = 0; ow < out_w; ow++)
            dst[ow] = 0.0f;
        return;
    }
    __global const float *src = x + x_off + ((img * channels + c) * height + ih) * width;
    for (int ow = 0; ow < out_w; ow++) {
        int iw = ow * stride - pad + j;
        dst[ow] = iw >= 0 && iw < width ? src[iw] : 0.0f;
    }
}

/* head_col2im for `images` consecutive images: dcol [images, C kh kw, out_h out_w] ->
 * dx [images, C, H, W] (overwritten). One work-item per (image, channel, input line).
 * 1-D range over images * C * H. */
__kernel void head_col2im_batch(__global const float *dcol, const int dcol_off,
                                const int channels, const int height, const int width,
                                const int kh, const int kw, const int stride, const int pad,
                                const int out_h, const int out_w, const int images,
                                __global float *dx, const int dx_off) {
    int gid = get_global_id(0);
    if (gid >= images * channels * height)
        return;
    int ih = gid % height, r = gid / height;
    int img = r / channels, c = r - img * channels;
    int pixels = out_h * out_w;
    __global const float *base =
        dcol + dcol_off + ((size_t)img * channels + c) * kh * kw * pixels;
    __global float *dst = dx + dx_off + gid * width;
    for (int iw = 0; iw < width; iw++)
        dst[iw] = 0.0f;
    for (int i = 0; i < kh; i++) {
        int th = ih + pad - i;
        if (th < 0 || th % stride != 0 || th / stride >= out_h)
            continue;
        for (int j = 0; j < kw; j++) {
            __global const float *line = base + (i * kw + j) * pixels + (th / stride) * out_w;
            if (stride == 1) { /* the common case: a contiguous, branch-free run */
                int lo = max(0, j - pad), hi = min(width, out_w + j - pad);
                for (int iw = lo; iw < hi; iw++)
                    dst[iw] += line[iw + pad - j];
                continue;
            }
            for (int iw = 0; iw < width; iw++) {
                int tw = iw + pad - j;
                if (tw >= 0 && tw % stride == 0 && tw / stride < out_w)
                    dst[iw] += line[tw / stride];
            }
        }
    }
}
