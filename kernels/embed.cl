/* Input-side kernels: row gathers (token embeddings, pooling), patch im2col,
 * bicubic resize of position-embedding grids. */

/* y[r, :] = x[index[r], :]; 2-D range (cols, rows). Indices were range-checked
 * on the host. */
__kernel void gather_rows(__global const float *x, const int x_off,
                          __global const int *index, __global float *y, const int y_off,
                          const int rows, const int cols) {
    int c = get_global_id(0);
    int r = get_global_id(1);
    if (c >= cols || r >= rows)
        return;
    y[y_off + r * cols + c] = x[x_off + index[r] * cols + c];
}

/* Patch matrix for a stride = kernel = p convolution:
 * cols[(n*gh + py)*gw + px, (c*p + ky)*p + kx] = img[n, c, py*p + ky, px*p + kx],
 * so a row times the flattened weight [D, C*p*p] is one output pixel.
 * 2-D range (C*p*p, N*gh*gw). */
__kernel void im2col_patches(__global const float *img, const int img_off,
                             __global float *cols, const int cols_off, const int batch,
                             const int channels, const int height, const int width,
                             const int patch) {
    int j = get_global_id(0);
    int r = get_global_id(1);
    int gh = height / patch;
    int gw = width / patch;
    int row_len = channels * patch * patch;
    if (j >= row_len || r >= batch * gh * gw)
        return;
    int n = r / (gh * gw);
    int cell = r - n * gh * gw;
    int py = cell / gw;
    int px = cell - py * gw;
    int c = j / (patch * patch);
    int k = j - c * patch * patch;
    int ky = k / patch;
    int kx = k - ky * patch;
    int src = ((n * channels + c) * height + py * patch + ky) * width + px * patch + kx;
    cols[cols_off + r * row_len + j] = img[img_off + src];
}

/* Bicubic interpolation as torch.nn.functional.interpolate(mode="bicubic",
 * align_corners=False) computes it in fp32: A = -0.75, source coordinate
 * (dst + 0.5) * scale - 0.5 with scale = in / out, taps clamped to the border,
 * each of the four rows combined along x, then the row results along y.
 * Contraction is off and the fma() calls are explicit: they follow where torch's
 * x86 CPU build fuses (measured against torch 2.x: max difference 1.5e-7 of
 * max|y|, against 1.4e-6 with no fma), and make every device round alike. */
#pragma OPENCL FP_CONTRACT OFF

static float cubic_near(float x) { /* weight for |x| <= 1 */
    const float a = -0.75f;
    return ((a + 2.0f) * x - (a + 3.0f)) * x * x + 1.0f;
}

static float cubic_far(float x) { /* weight for 1 < |x| < 2 */
    const float a = -0.75f;
    float p = fma(fma(a, x, -5.0f * a), x, 8.0f * a);
    return p * x - 4.0f * a;
}

/* Weights of taps i0-1 .. i0+2 for output index dst; returns i0. */
static int cubic_taps(int dst, float scale, int in_size, float *w) {
    float src = fma(scale, (float)dst + 0.5f, -0.5f);
    int i0 = min((int)floor(src), in_size - 1);
    float t = clamp(src - (float)i0, 0.0f, 1.0f);
    float u = 1.0f - t;
    w[0] = cubic_far(t + 1.0f);
    w[1] = cubic_near(t);
    w[2] = cubic_near(u);
    w[3] = cubic_far(u + 1.0f);
    return i0;
}

/* x[C, H, W] -> y[C, H2, W2]; 2-D range (W2, C*H2). */
__kernel void bicubic_resize(__global const float *x, const int x_off, __global float *y,
                             const int y_off, const int channels, const int in_h,
                             const int in_w, const int out_h, const int out_w,
                             const float scale_h, const float scale_w) {
    int ox = get_global_id(0);
    int row = get_global_id(1);
    if (ox >= out_w || row >= channels * out_h)
        return;
    int c = row / out_h;
    int oy = row - c * out_h;
    float wx[4], wy[4];
    int x0 = cubic_taps(ox, scale_w, in_w, wx);
    int y0 = cubic_taps(oy, scale_h, in_h, wy);
    __global const float *plane = x + x_off + c * in_h * in_w;

    float out = 0.0f;
    for (int i = 0; i < 4; i++) {
        __global const float *src_row = plane + clamp(y0 - 1 + i, 0, in_h - 1) * in_w;
        float acc = src_row[clamp(x0 - 1, 0, in_w - 1)] * wx[0];
        for (int j = 1; j < 4; j++)
            acc = fma(src_row[clamp(x0 - 1 + j, 0, in_w - 1)], wx[j], acc);
        out = i == 0 ? acc * wy[0] : fma(acc, wy[i], out);
    }
    y[y_off + row * out_w + ox] = out;
}
