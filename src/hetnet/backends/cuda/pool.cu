// Pooling: max and average over k x k windows with stride st (no padding, floor output), and global average.
// x[N,C,H,W] -> y[N,C,P,Q]. Backward kernels run one thread per *input* element and gather from the windows that
// cover it (deterministic, no atomics, overlapping windows add).
#include "common.cuh"

// Max pooling keeps, per output, the position of the first maximum of its window (row-major) as one byte.
extern "C" __global__ void maxpool_fwd(const float* __restrict__ x, float* __restrict__ y,
                                       unsigned char* __restrict__ arg, int NC, int H, int W, int P, int Q, int k,
                                       int st) {
    HN_GRID_STRIDE(e, (long long)NC * P * Q) {
        const int q = (int)(e % Q), p = (int)((e / Q) % P);
        const long long nc = e / ((long long)P * Q);
        const float* xp = x + nc * H * W + (long long)(p * st) * W + q * st;
        float best = xp[0];
        int bi = 0;
        for (int i = 0; i < k; ++i)
            for (int j = 0; j < k; ++j) {
                const float v = xp[i * W + j];
                if (v > best || (v != v && best == best)) {  // NaN wins, as NumPy's argmax
                    best = v;
                    bi = i * k + j;
                }
            }
        y[e] = best;
        arg[e] = (unsigned char)bi;
    }
}

// dx[n,c,h,w] = sum over windows (p,q) whose first maximum is (h,w) of dy[n,c,p,q]; when relu_mask is set, x is a
// ReLU output and dx = 0 where x <= 0 (the ReLU's backward fused here). dx may be x itself (the fast step writes
// the gradient over the pooled input, which nothing reads afterwards): each thread reads x[e] only, then writes
// dx[e], so x and dx are not __restrict__.
extern "C" __global__ void maxpool_bwd(const float* __restrict__ dy, const unsigned char* __restrict__ arg,
                                       const float* x, float* dx, int NC, int H, int W,
                                       int P, int Q, int k, int st, int relu_mask) {
    HN_GRID_STRIDE(e, (long long)NC * H * W) {
        const int w = (int)(e % W), h = (int)((e / W) % H);
        const long long nc = e / ((long long)H * W);
        dx[e] = (relu_mask && x[e] <= 0.f) ? 0.f : hn_pool_grad(dy, arg, nc, h, w, P, Q, k, st);
    }
}

extern "C" __global__ void avgpool_fwd(const float* __restrict__ x, float* __restrict__ y, int NC, int H, int W,
                                       int P, int Q, int k, int st) {
    const float inv = 1.f / (k * k);
    HN_GRID_STRIDE(e, (long long)NC * P * Q) {
        const int q = (int)(e % Q), p = (int)((e / Q) % P);
        const long long nc = e / ((long long)P * Q);
        const float* xp = x + nc * H * W + (long long)(p * st) * W + q * st;
        float s = 0.f;
        for (int i = 0; i < k; ++i)
            for (int j = 0; j < k; ++j) s += xp[i * W + j];
        y[e] = s * inv;
    }
}

extern "C" __global__ void avgpool_bwd(const float* __restrict__ dy, float* __restrict__ dx, int NC, int H, int W,
                                       int P, int Q, int k, int st) {
    const float inv = 1.f / (k * k);
    HN_GRID_STRIDE(e, (long long)NC * H * W) {
        const int w = (int)(e % W), h = (int)((e / W) % H);
        const long long nc = e / ((long long)H * W);
        const int p_lo = h >= k ? (h - k) / st + 1 : 0, p_hi = min(P - 1, h / st);
        const int q_lo = w >= k ? (w - k) / st + 1 : 0, q_hi = min(Q - 1, w / st);
        float v = 0.f;
        for (int p = p_lo; p <= p_hi; ++p)
            for (int q = q_lo; q <= q_hi; ++q) v += dy[nc * P * Q + (long long)p * Q + q];
        dx[e] = v * inv;
    }
}

// y[nc] = mean over HW of x[nc, :]: one warp per (n, c) row.
extern "C" __global__ void global_avgpool_fwd(const float* __restrict__ x, float* __restrict__ y, int NC, int HW) {
    const long long row = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (row >= NC) return;
    float s = 0.f;
    for (int i = lane; i < HW; i += 32) s += x[row * HW + i];
    s = hn_warp_sum(s);
    if (lane == 0) y[row] = s / HW;
}

extern "C" __global__ void global_avgpool_bwd(const float* __restrict__ dy, float* __restrict__ dx, int NC, int HW) {
    const float inv = 1.f / HW;
    HN_GRID_STRIDE(e, (long long)NC * HW) dx[e] = dy[e / HW] * inv;
}
