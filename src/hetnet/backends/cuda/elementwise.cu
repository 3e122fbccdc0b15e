// Element-wise ops: activations forward/backward, dropout (counter-based hash, the same mask as hetnet.random),
// and the row-wise softmax for inference.
#include "common.cuh"

extern "C" __global__ void relu_fwd(const float* __restrict__ x, float* __restrict__ y, long long n) {
    HN_GRID_STRIDE(i, n) y[i] = fmaxf(x[i], 0.f);
}
// dx = dy where x > 0
extern "C" __global__ void relu_bwd(const float* __restrict__ dy, const float* __restrict__ x, float* __restrict__ dx,
                                    long long n) {
    HN_GRID_STRIDE(i, n) dx[i] = x[i] > 0.f ? dy[i] : 0.f;
}
// stable: e = exp(-|x|); y = 1/(1+e) for x >= 0, e/(1+e) otherwise
extern "C" __global__ void sigmoid_fwd(const float* __restrict__ x, float* __restrict__ y, long long n) {
    HN_GRID_STRIDE(i, n) {
        const float v = x[i], e = expf(-fabsf(v));
        y[i] = (v >= 0.f ? 1.f : e) / (1.f + e);
    }
}
// dx = dy * y * (1 - y)
extern "C" __global__ void sigmoid_bwd(const float* __restrict__ dy, const float* __restrict__ y,
                                       float* __restrict__ dx, long long n) {
    HN_GRID_STRIDE(i, n) dx[i] = dy[i] * y[i] * (1.f - y[i]);
}
extern "C" __global__ void tanh_fwd(const float* __restrict__ x, float* __restrict__ y, long long n) {
    HN_GRID_STRIDE(i, n) y[i] = tanhf(x[i]);
}
// dx = dy * (1 - y^2)
extern "C" __global__ void tanh_bwd(const float* __restrict__ dy, const float* __restrict__ y, float* __restrict__ dx,
                                    long long n) {
    HN_GRID_STRIDE(i, n) dx[i] = dy[i] * (1.f - y[i] * y[i]);
}

// GELU, exact form (common.cuh's hn_gelu): y = x * Phi(x)
extern "C" __global__ void gelu_fwd(const float* __restrict__ x, float* __restrict__ y, long long n) {
    HN_GRID_STRIDE(i, n) y[i] = hn_gelu(x[i]);
}
// dx = dy * gelu'(x) = dy * (Phi(x) + x * phi(x))
extern "C" __global__ void gelu_bwd(const float* __restrict__ dy, const float* __restrict__ x, float* __restrict__ dx,
                                    long long n) {
    HN_GRID_STRIDE(i, n) dx[i] = dy[i] * hn_gelu_grad(x[i]);
}

// y = factor * x: the constant scale layer's forward, and (on dy) its backward
extern "C" __global__ void scale_apply(const float* __restrict__ x, float* __restrict__ y, float factor, long long n) {
    HN_GRID_STRIDE(i, n) y[i] = x[i] * factor;
}

// Dropout: keep element i iff hash(seed, i) >= threshold (= ceil(p * 2^32), so that hash / 2^32 >= p exactly as the
// NumPy backends test it); y = x * scale where kept. The seed comes from device memory when seed_ptr is given
// (a captured CUDA graph reads a fresh one each replay), else from `seed`. Backward applies the same mask to dy.
extern "C" __global__ void dropout_apply(const float* __restrict__ x, float* __restrict__ y,
                                         const unsigned* __restrict__ seed_ptr, unsigned seed,
                                         unsigned long long threshold, float scale, long long n) {
    const unsigned sd = seed_ptr ? *seed_ptr : seed;
    HN_GRID_STRIDE(i, n) {
        const unsigned h = hn_counter_hash(sd, (unsigned)i);
        y[i] = (unsigned long long)h >= threshold ? x[i] * scale : 0.f;
    }
}

// Row-wise softmax of x[N, K], one warp per row.
extern "C" __global__ void softmax_fwd(const float* __restrict__ x, float* __restrict__ y, int N, int K) {
    const long long row = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (row >= N) return;
    const float* xr = x + row * K;
    float* yr = y + row * K;
    float mx = -HN_INF;
    for (int k = lane; k < K; k += 32) mx = fmaxf(mx, xr[k]);
    mx = hn_warp_max(mx);
    float s = 0.f;
    for (int k = lane; k < K; k += 32) s += expf(xr[k] - mx);
    s = hn_warp_sum(s);
    const float inv = 1.f / s;
    for (int k = lane; k < K; k += 32) yr[k] = expf(xr[k] - mx) * inv;
}

// dx = y * (dy - sum(dy * y)), one warp per row.
extern "C" __global__ void softmax_bwd(const float* __restrict__ dy, const float* __restrict__ y,
                                       float* __restrict__ dx, int N, int K) {
    const long long row = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (row >= N) return;
    float d = 0.f;
    for (int k = lane; k < K; k += 32) d += dy[row * K + k] * y[row * K + k];
    d = hn_warp_sum(d);
    for (int k = lane; k < K; k += 32) dx[row * K + k] = y[row * K + k] * (dy[row * K + k] - d);
}

// Keeps one SM busy for about `cycles` clock cycles: the conv algorithm measurement queues the runs it times behind
// this, so the events between them see GPU time only, not Python's launch latency.
extern "C" __global__ void hn_spin(long long cycles) {
    const long long start = clock64();
    while (clock64() - start < cycles) {
    }
}
