/* AdamW update, gradient sum of squares and gradient scaling (clhclip/optim.c).
 * The update follows torch.optim.AdamW's single-tensor path operation by operation,
 * with every intermediate rounded to fp32 as torch does on the CPU, so contraction
 * into fused multiply-adds is switched off. */
#pragma OPENCL FP_CONTRACT OFF

/* One element per work-item:
 *   p *= decay                                (decay = 1 - lr * wd)
 *   m  = lerp(m, g, w1)                       (w1 = 1 - beta1, torch's lerp formula)
 *   v  = v * beta2 + w2 * g * g               (w2 = 1 - beta2)
 *   p += neg_step * (m / (sqrt(v) / bc2_sqrt + eps))
 * neg_step = -lr / (1 - beta1^t) and bc2_sqrt = sqrt(1 - beta2^t) come from the host. */
__kernel void adamw_update(__global float *p, const int p_off, __global const float *g,
                           const int g_off, __global float *m, const int m_off,
                           __global float *v, const int v_off, const int n, const float decay,
                           const float w1, const float beta2, const float w2,
                           const float neg_step, const float bc2_sqrt, const float eps) {
    int i = get_global_id(0);
    if (i >= n)
        return;
    float grad = g[g_off + i];
    float param = p[p_off + i] * decay;

    float mean = m[m_off + i];
    float diff = grad - mean;
    mean = w1 < 0.5f ? mean + w1 * diff : grad - diff * (1.0f - w1);

    float var = v[v_off + i] * beta2;
    float sq = w2 * grad;
    sq = sq * grad;
    var = var + sq;

    float denom = sqrt(var) / bc2_sqrt;
    denom = denom + eps;
    float ratio = mean / denom;
    param = param + neg_step * ratio;

    m[m_off + i] = mean;
    v[v_off + i] = var;
    p[p_off + i] = param;
}

/* partials[out_off + group] = sum of x[i]^2 over the elements this work-group visits
 * (grid-stride loop over n, Kahan-compensated per work-item, then a tree in local
 * memory). The local size is a power of two. The host adds the partials in double. */
__kernel void adamw_sum_squares(__global const float *x, const int x_off, const int n,
                                __global float *partials, const int out_off,
                                __local float *scratch) {
    int lid = get_local_id(0);
    uint stride = (uint)get_global_size(0);
    float sum = 0.0f, carry = 0.0f;
    /* unsigned: n <= INT_MAX and the stride is small, so i + stride cannot wrap */
    for (uint i = (uint)get_global_id(0); i < (uint)n; i += stride) {
        float value = x[x_off + i];
        float term = value * value - carry;
        float next = sum + term;
        carry = (next - sum) - term;
        sum = next;
    }
    scratch[lid] = sum;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int width = (int)get_local_size(0) / 2; width > 0; width /= 2) {
        if (lid < width)
            scratch[lid] += scratch[lid + width];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    if (lid == 0)
        partials[out_off + get_group_id(0)] = scratch[0];
}

/* x *= alpha */
__kernel void adamw_scale_grad(__global float *x, const int x_off, const int n,
                               const float alpha) {
    int i = get_global_id(0);
    if (i >= n)
        return;
    x[x_off + i] = x[x_off + i] * alpha;
}
