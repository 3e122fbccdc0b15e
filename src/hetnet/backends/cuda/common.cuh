// Shared helpers for hetnet's CUDA kernels (compiled by NVRTC through cupy.RawModule, and by nvcc in the compile test).
// Shape legend as in hetnet/backends/__init__.py: N batch, C in-channels, K out-channels, H/W input, P/Q output,
// R/S kernel. All tensors are float32, NCHW, C-contiguous.
#pragma once

#define HN_RELU 1
#define HN_INF __int_as_float(0x7f800000)  // NVRTC has no math.h, so no INFINITY

// Block-wide sum of a double (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ __forceinline__ double hn_block_sum(double v, double* shm /* >= 32 doubles */) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) shm[warp] = v;
    __syncthreads();
    v = lane < nw ? shm[lane] : 0.0;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float hn_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float hn_warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// "lowbias32" (Chris Wellons); the same hash as hetnet.random.lowbias32.
__device__ __forceinline__ unsigned hn_lowbias32(unsigned x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    x ^= x >> 16;
    return x;
}

// Element i of the counter-based uniform stream of `seed`, as the raw 32-bit hash (uniform = hash / 2^32).
__device__ __forceinline__ unsigned hn_counter_hash(unsigned seed, unsigned i) {
    return hn_lowbias32((i * 0x9E3779B1u) ^ seed);
}

#define HN_GRID_STRIDE(i, n) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (long long)(n); \
         i += (long long)gridDim.x * blockDim.x)

// Max-pooling backward at one input element (n*C + c = nc, h, w): the sum of dy over the windows whose first
// maximum is this element (arg holds each window's argmax position, row-major). Windows p with p*st <= h < p*st+k.
__device__ __forceinline__ float hn_pool_grad(const float* __restrict__ dy, const unsigned char* __restrict__ arg,
                                              long long nc, int h, int w, int P, int Q, int k, int st) {
    const int p_lo = h >= k ? (h - k) / st + 1 : 0, p_hi = min(P - 1, h / st);
    const int q_lo = w >= k ? (w - k) / st + 1 : 0, q_hi = min(Q - 1, w / st);
    float v = 0.f;
    for (int p = p_lo; p <= p_hi; ++p)
        for (int q = q_lo; q <= q_hi; ++q) {
            const long long o = nc * P * Q + (long long)p * Q + q;
            if (arg[o] == (h - p * st) * k + (w - q * st)) v += dy[o];
        }
    return v;
}
