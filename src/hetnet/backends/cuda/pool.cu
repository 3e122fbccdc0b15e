// Pooling: max and average over k x k windows with stride st (no padding, floor output), and global average.
// x[N,C,H,W] -> y[N,C,P,Q]. Backward kernels run one thread per *input* element and gather from the windows that
// cover it (deterministic, no atomics, overlapping windows add), except max pooling with st == k, where the windows
// tile the input and one thread per *output* element writes its whole window. Each kernel with image-size index
// arithmetic comes in a 64-bit and a 32-bit index version (common.cuh, HN_TWO_INDEX_KERNELS).
#include "common.cuh"

// Max pooling keeps, per output, the position of the first maximum of its window (row-major) as one byte.
template <typename I>
__device__ __forceinline__ void maxpool_fwd_body(const float* __restrict__ x, float* __restrict__ y,
                                                 unsigned char* __restrict__ arg, int NC, int H, int W, int P, int Q,
                                                 int k, int st) {
    HN_GRID_STRIDE_T(I, e, (I)NC * P * Q) {
        const I pq = e % (I)(P * Q), nc = e / (I)(P * Q);
        const int p = (int)pq / Q, q = (int)pq - p * Q;
        const float* xp = x + nc * (I)(H * W) + (I)((p * st) * W + q * st);
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
HN_TWO_INDEX_KERNELS(maxpool_fwd,
    (const float* __restrict__ x, float* __restrict__ y, unsigned char* __restrict__ arg, int NC, int H, int W, int P,
     int Q, int k, int st),
    (x, y, arg, NC, H, W, P, Q, k, st))

// dx[n,c,h,w] = sum over windows (p,q) whose first maximum is (h,w) of dy[n,c,p,q], read from the pooled output y
// and the argmax bytes, so that x need not be kept: dx is zero except at a window's first maximum, where x == y[p,q]
// (NaN included). When relu_mask is set, x is a ReLU output and dx = 0 where x <= 0 (the ReLU's backward fused
// here), which reads y[p,q] <= 0 window by window.
template <typename I>
__device__ __forceinline__ void maxpool_bwd_pooled_body(const float* __restrict__ dy,
                                                        const unsigned char* __restrict__ arg,
                                                        const float* __restrict__ y, float* __restrict__ dx, int NC,
                                                        int H, int W, int P, int Q, int k, int st, int relu_mask) {
    HN_GRID_STRIDE_T(I, e, (I)NC * H * W) {
        const I hw = e % (I)(H * W), nc = e / (I)(H * W);
        const int h = (int)hw / W, w = (int)hw - h * W;
        dx[e] = hn_pool_grad<I>(dy, arg, relu_mask ? y : nullptr, nc, h, w, P, Q, k, st);
    }
}
HN_TWO_INDEX_KERNELS(maxpool_bwd_pooled,
    (const float* __restrict__ dy, const unsigned char* __restrict__ arg, const float* __restrict__ y,
     float* __restrict__ dx, int NC, int H, int W, int P, int Q, int k, int st, int relu_mask),
    (dy, arg, y, dx, NC, H, W, P, Q, k, st, relu_mask))

// The same dx when st == k: the windows tile the input without overlap, so one thread per output (nc, p, q) writes
// dx[nc, p*k + i, q*k + j] = dy[nc,p,q] at (i, j) = (arg / k, arg % k), 0 at the window's other elements (and at its
// maximum too when relu_mask is set and y[nc,p,q] <= 0, hn_pool_grad's test). The floor output leaves rows P*k..H-1
// and columns Q*k..W-1 (fewer than k of each) in no window; their dx = 0 is written by the last window row and
// column, whose windows reach to the edge: rows [p*k, p == P-1 ? H : p*k + k), columns likewise. Every element of
// dx is written exactly once; for k = 2 and W even, each window row of two as one 8-byte store.
template <typename I>
__device__ __forceinline__ void maxpool_bwd_tiled_body(const float* __restrict__ dy,
                                                       const unsigned char* __restrict__ arg,
                                                       const float* __restrict__ y, float* __restrict__ dx, int NC,
                                                       int H, int W, int P, int Q, int k, int relu_mask) {
    HN_GRID_STRIDE_T(I, e, (I)NC * P * Q) {
        const I pq = e % (I)(P * Q), nc = e / (I)(P * Q);
        const int p = (int)pq / Q, q = (int)pq - p * Q;
        const int a = arg[e], ai = a / k, aj = a - ai * k;
        const float g = (relu_mask && y[e] <= 0.f) ? 0.f : dy[e];
        const int rows = p == P - 1 ? H - p * k : k, cols = q == Q - 1 ? W - q * k : k;
        float* dxp = dx + nc * (I)(H * W) + (I)(p * k * W + q * k);
        if (k == 2 && cols == 2 && (W & 1) == 0) {     // W even: every row pair starts 8-byte aligned
            for (int i = 0; i < rows; ++i)
                *reinterpret_cast<float2*>(dxp + i * W) =
                    make_float2(i == ai && aj == 0 ? g : 0.f, i == ai && aj == 1 ? g : 0.f);
        } else {
            for (int i = 0; i < rows; ++i)
                for (int j = 0; j < cols; ++j) dxp[i * W + j] = (i == ai && j == aj) ? g : 0.f;
        }
    }
}
HN_TWO_INDEX_KERNELS(maxpool_bwd_tiled,
    (const float* __restrict__ dy, const unsigned char* __restrict__ arg, const float* __restrict__ y,
     float* __restrict__ dx, int NC, int H, int W, int P, int Q, int k, int relu_mask),
    (dy, arg, y, dx, NC, H, W, P, Q, k, relu_mask))

template <typename I>
__device__ __forceinline__ void avgpool_fwd_body(const float* __restrict__ x, float* __restrict__ y, int NC, int H,
                                                 int W, int P, int Q, int k, int st) {
    const float inv = 1.f / (k * k);
    HN_GRID_STRIDE_T(I, e, (I)NC * P * Q) {
        const I pq = e % (I)(P * Q), nc = e / (I)(P * Q);
        const int p = (int)pq / Q, q = (int)pq - p * Q;
        const float* xp = x + nc * (I)(H * W) + (I)((p * st) * W + q * st);
        float s = 0.f;
        for (int i = 0; i < k; ++i)
            for (int j = 0; j < k; ++j) s += xp[i * W + j];
        y[e] = s * inv;
    }
}
HN_TWO_INDEX_KERNELS(avgpool_fwd,
    (const float* __restrict__ x, float* __restrict__ y, int NC, int H, int W, int P, int Q, int k, int st),
    (x, y, NC, H, W, P, Q, k, st))

template <typename I>
__device__ __forceinline__ void avgpool_bwd_body(const float* __restrict__ dy, float* __restrict__ dx, int NC, int H,
                                                 int W, int P, int Q, int k, int st) {
    const float inv = 1.f / (k * k);
    HN_GRID_STRIDE_T(I, e, (I)NC * H * W) {
        const I hw = e % (I)(H * W), nc = e / (I)(H * W);
        const int h = (int)hw / W, w = (int)hw - h * W;
        const int p_lo = h >= k ? (h - k) / st + 1 : 0, p_hi = min(P - 1, h / st);
        const int q_lo = w >= k ? (w - k) / st + 1 : 0, q_hi = min(Q - 1, w / st);
        float v = 0.f;
        for (int p = p_lo; p <= p_hi; ++p)
            for (int q = q_lo; q <= q_hi; ++q) v += dy[nc * (I)(P * Q) + (I)(p * Q + q)];
        dx[e] = v * inv;
    }
}
HN_TWO_INDEX_KERNELS(avgpool_bwd,
    (const float* __restrict__ dy, float* __restrict__ dx, int NC, int H, int W, int P, int Q, int k, int st),
    (dy, dx, NC, H, W, P, Q, k, st))

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
