// Batch normalisation over (N, HW) per channel c, for x[N,C] (HW = 1) and x[N,C,H,W].
// Training forward: bn_stats (mean, biased var, running stats update) then bn_apply; backward: bn_bwd_reduce
// (sum dy, sum dy*xhat per channel, also dgamma += and dbeta +=) then bn_bwd_dx.
// act: none, ReLU (HN_RELU: y = relu(bn(x))) or GELU (HN_GELU, the fused BatchNorm -> GELU: y = gelu(z), z = bn(x)
// never stored). The forward's act is `act`; the backward's is the act whose derivative the op owns: GELU's always,
// ReLU's in the fused BatchNorm -> ReLU (bn_relu_*; after batchnorm_forward(act="relu") it is the consumer's, see
// hetnet.backends). The backward kernels take dE/dy and recompute z (hn_bn_z, the forward's arithmetic, so the same
// bits) to form dE/dz = dE/dy * act'(z) wherever the plain backward reads dy.
// The reductions run over a (C, G) grid; each block adds doubles into `acc`, and the last block of a channel
// (counted in `count`) finishes that channel and resets acc and count for the next call (no memset needed).
// Every kernel comes in a 64-bit and a 32-bit index version (common.cuh's HN_TWO_INDEX_KERNELS, HN_BN_KERNELS below:
// the same with another kernel's body and a launch bound).
// The input x of the statistics, apply and backward kernels is float32, or in their "_x16" versions bf16 bits (an
// activation a bf16 step stores in bf16: a convolution's output that only this batch norm reads, conv.Nchw16), read
// as float32 (hn_act) with the same arithmetic after; so is the backward's dy in the "_dy16" versions (the data
// gradient of the convolution after the batch norm).
// Synchronised BatchNorm over several processes (hetnet.parallel) replaces bn_stats by bn_sums, an all-reduce of
// the sums, then bn_stats_synced; its backward all-reduces bn_bwd_reduce's sums before bn_bwd_dx (CudaBackend).
#include "common.cuh"

// The per-channel kernels on a (C, G) grid (the statistics, sums, apply, and the backward's reduction and dx) are
// compiled to fit HN_BN_BLOCKS blocks of 256 threads on an SM (40 registers), and norm.py's _bn_grid launches at most
// that many an SM: one wave, every block's share the same. (bn_relu_maxpool_bwd_reduce_i32, on the same grid, needs
// no bound to fit; its 64-bit index version would spill under one.)
#define HN_BN_BLOCKS 6
// Vectors a take (hn_bn_walk) of a kernel reading one tensor of X: 32 bytes a thread in flight (two kernels reading
// two tensors take one vector each).
template <typename X>
constexpr int hn_bn_vectors = sizeof(X) == 2 ? 2 : 1;
// HN_BN_KERNELS(name, body, (parameter list), (argument list)): both index versions of a kernel whose body is
// body##_body<I> (its parameter types deduced from the arguments: the "_x16" / "_dy16" versions share a body).
#define HN_BN_KERNELS(name, body, params, args) \
    extern "C" __global__ void __launch_bounds__(256, HN_BN_BLOCKS) name params { body##_body<long long> args; } \
    extern "C" __global__ void __launch_bounds__(256, HN_BN_BLOCKS) name##_i32 params { body##_body<unsigned> args; }

__device__ __forceinline__ bool hn_last_block(unsigned* count, int c) {
    __shared__ bool last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(count + c, 1u) == gridDim.y - 1;
    __syncthreads();
    return last;
}

// Channel blockIdx.x's sum x and sum x^2 over its N*HW values, this block's share added into acc[2c], acc[2c+1]
// (double); returns true in the last block of the channel (see hn_last_block), which then reads acc.
template <typename I, typename X>
__device__ __forceinline__ bool hn_bn_channel_sums(const X* __restrict__ x, double* __restrict__ acc,
                                                   unsigned* __restrict__ count, int N, int C, int HW) {
    __shared__ double shm[32];
    const int c = blockIdx.x;
    double s = 0.0, ss = 0.0;
    hn_bn_walk<I, hn_bn_vectors<X>>(N, C, HW, c, hn_bn_vec(HW, x), [&](auto t) {
        float v[decltype(t)::U];
        t.read(x, v);
#pragma unroll
        for (int u = 0; u < t.U; ++u) {
            s += (double)v[u];
            ss += (double)v[u] * v[u];
        }
    });
    s = hn_block_sum(s, shm);
    ss = hn_block_sum(ss, shm);
    if (threadIdx.x == 0) {
        atomicAdd(acc + 2 * c, s);
        atomicAdd(acc + 2 * c + 1, ss);
    }
    return hn_last_block(count, c);
}

// mean and biased variance from sum x and sum x^2 over m values: stats[c], stats[C + c]; the running statistics
// updated as PyTorch's (unbiased variance). M: the count's type (an index type, or double when all-reduced).
template <typename M>
__device__ __forceinline__ void hn_bn_finish_stats(double tot, double tot2, M m, int c, int C,
                                                   float* __restrict__ stats, float* __restrict__ running_mean,
                                                   float* __restrict__ running_var, float momentum) {
    const double mean = tot / m;
    double var = tot2 / m - mean * mean;
    if (var < 0) var = 0;
    stats[c] = (float)mean;
    stats[C + c] = (float)var;
    running_mean[c] = (1.f - momentum) * running_mean[c] + (float)(momentum * mean);
    running_var[c] = (1.f - momentum) * running_var[c] + (float)(momentum * var * m / (m > 1 ? m - 1 : 1));
}

// stats[0:C] = mean, stats[C:2C] = biased variance; running_mean/var updated as PyTorch (unbiased variance).
template <typename I, typename X>
__device__ __forceinline__ void bn_stats_body(const X* __restrict__ x, float* __restrict__ stats,
                                              float* __restrict__ running_mean, float* __restrict__ running_var,
                                              double* __restrict__ acc, unsigned* __restrict__ count, int N, int C,
                                              int HW, float momentum) {
    if (!hn_bn_channel_sums<I>(x, acc, count, N, C, HW)) return;
    const int c = blockIdx.x;
    if (threadIdx.x == 0) {
        const double tot = atomicAdd(acc + 2 * c, 0.0), tot2 = atomicAdd(acc + 2 * c + 1, 0.0);
        const I per = (I)N * HW;
        hn_bn_finish_stats<I>(tot, tot2, per, c, C, stats, running_mean, running_var, momentum);
        acc[2 * c] = 0.0;
        acc[2 * c + 1] = 0.0;
        count[c] = 0u;
    }
}
HN_BN_KERNELS(bn_stats, bn_stats,
    (const float* __restrict__ x, float* __restrict__ stats, float* __restrict__ running_mean,
     float* __restrict__ running_var, double* __restrict__ acc, unsigned* __restrict__ count, int N, int C, int HW,
     float momentum),
    (x, stats, running_mean, running_var, acc, count, N, C, HW, momentum))
HN_BN_KERNELS(bn_stats_x16, bn_stats,
    (const unsigned short* __restrict__ x, float* __restrict__ stats, float* __restrict__ running_mean,
     float* __restrict__ running_var, double* __restrict__ acc, unsigned* __restrict__ count, int N, int C, int HW,
     float momentum),
    (x, stats, running_mean, running_var, acc, count, N, C, HW, momentum))

// Synchronised BatchNorm (a data-parallel job, hetnet.parallel): this process's sums[c] = sum x, sums[C + c] =
// sum x^2 and sums[2C] = N*HW (the count), in double; the caller sums the 2C + 1 values over the processes
// (all-reduce), then bn_stats_synced makes the statistics of all the batches together from them.
template <typename I, typename X>
__device__ __forceinline__ void bn_sums_body(const X* __restrict__ x, double* __restrict__ sums,
                                             double* __restrict__ acc, unsigned* __restrict__ count, int N, int C,
                                             int HW) {
    if (!hn_bn_channel_sums<I>(x, acc, count, N, C, HW)) return;
    const int c = blockIdx.x;
    if (threadIdx.x == 0) {
        sums[c] = atomicAdd(acc + 2 * c, 0.0);
        sums[C + c] = atomicAdd(acc + 2 * c + 1, 0.0);
        if (c == 0) sums[2 * C] = (double)N * HW;
        acc[2 * c] = 0.0;
        acc[2 * c + 1] = 0.0;
        count[c] = 0u;
    }
}
HN_BN_KERNELS(bn_sums, bn_sums,
    (const float* __restrict__ x, double* __restrict__ sums, double* __restrict__ acc, unsigned* __restrict__ count,
     int N, int C, int HW),
    (x, sums, acc, count, N, C, HW))
HN_BN_KERNELS(bn_sums_x16, bn_sums,
    (const unsigned short* __restrict__ x, double* __restrict__ sums, double* __restrict__ acc,
     unsigned* __restrict__ count, int N, int C, int HW),
    (x, sums, acc, count, N, C, HW))

// stats and running statistics (as bn_stats) from sums of `copies` copies of [sum x (C), sum x^2 (C)] and the count
// after them: bn_sums' (copies 1), all-reduced, or a convolution's (HN_SUMS_COPIES); one thread per channel, adding
// the copies in order, 16 copies' loads issued before their additions (a copy at a time waits a round trip to L2
// for each).
extern "C" __global__ void bn_stats_synced(const double* __restrict__ sums, float* __restrict__ stats,
                                           float* __restrict__ running_mean, float* __restrict__ running_var, int C,
                                           int copies, float momentum) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    double s = 0.0, ss = 0.0;
    for (int r0 = 0; r0 < copies; r0 += 16) {
        double a[16], b[16];
#pragma unroll
        for (int u = 0; u < 16; ++u) {
            const bool in = r0 + u < copies;
            a[u] = in ? sums[2LL * C * (r0 + u) + c] : 0.0;
            b[u] = in ? sums[2LL * C * (r0 + u) + C + c] : 0.0;
        }
#pragma unroll
        for (int u = 0; u < 16; ++u) {
            s += a[u];
            ss += b[u];
        }
    }
    hn_bn_finish_stats<double>(s, ss, sums[2LL * C * copies], c, C, stats, running_mean, running_var, momentum);
}

// z = (x - mean) * inv * gamma + beta, inv = 1 / sqrt(var + eps): every kernel's batch-norm output, so that the
// backward's recomputed z has the forward's bits (a ReLU's derivative, z > 0, is then the forward's mask).
__device__ __forceinline__ float hn_bn_z(float x, float mean, float inv, float gamma, float beta) {
    return fmaf((x - mean) * inv, gamma, beta);
}

// act(z) of one element x (act(x) without statistics: stats false): bn_apply's and bn_apply_nhwc16's arithmetic,
// so that the two give the same bits.
__device__ __forceinline__ float hn_bn_value(float x, bool stats, float mean, float inv, float gamma, float beta,
                                             int act) {
    float v = x;
    if (stats) v = hn_bn_z(x, mean, inv, gamma, beta);
    if (act == HN_RELU) v = fmaxf(v, 0.f);
    else if (act == HN_GELU) v = hn_gelu(v);
    return v;
}

// y = act((x - mean) * rsqrt(var + eps) * gamma + beta); mean/var from stats (training) or running (eval). On the
// reductions' (C, G) grid: a block's channel constants read once, four elements' loads in flight.
template <typename I, typename X>
__device__ __forceinline__ void bn_apply_body(const X* __restrict__ x, float* __restrict__ y,
                                              const float* __restrict__ mean, const float* __restrict__ var,
                                              const float* __restrict__ gamma, const float* __restrict__ beta, int N,
                                              int C, int HW, float eps, int act) {
    const int c = blockIdx.x;
    const float mu = mean[c], inv = 1.f / sqrtf(var[c] + eps), ga = gamma[c], be = beta[c];
    hn_bn_walk<I, hn_bn_vectors<X>>(N, C, HW, c, hn_bn_vec(HW, x, y), [&](auto t) {
        float v[decltype(t)::U];
        t.read(x, v);
#pragma unroll
        for (int u = 0; u < t.U; ++u) v[u] = hn_bn_value(v[u], true, mu, inv, ga, be, act);
        t.write(y, v);
    });
}
HN_BN_KERNELS(bn_apply, bn_apply,
    (const float* __restrict__ x, float* __restrict__ y, const float* __restrict__ mean, const float* __restrict__ var,
     const float* __restrict__ gamma, const float* __restrict__ beta, int N, int C, int HW, float eps, int act),
    (x, y, mean, var, gamma, beta, N, C, HW, eps, act))
HN_BN_KERNELS(bn_apply_x16, bn_apply,
    (const unsigned short* __restrict__ x, float* __restrict__ y, const float* __restrict__ mean,
     const float* __restrict__ var, const float* __restrict__ gamma, const float* __restrict__ beta, int N, int C,
     int HW, float eps, int act),
    (x, y, mean, var, gamma, beta, N, C, HW, eps, act))

// bn_apply's y written channels-last in bf16 instead (the copy the next convolution reads, conv.cu's to_nhwc16 of y):
// y16[img][p][c] = bf16(act(bn(x[img][c][p]))) as bf16 pairs [n][HW][C / 2] (C even), in to_nhwc16's tiles of 64
// channels x 32 pixels of the n * HW through shared memory, HN_NHWC16_TILES consecutive tiles a block (all their
// loads in flight at once), each channel's mean, 1 / sqrt(var + eps), gamma and beta read once per block; with mean
// null, bf16(act(x)) (a GELU on its own: elementwise.cu's gelu_fwd, the same hn_gelu). Grid (ceil(n * HW / (32
// HN_NHWC16_TILES)), ceil(C / 64)), 256 threads; n * HW < 2^31. bn_apply_nhwc32: the same in tf32, y as float32
// [n][HW][C] rounded to tf32 (conv.cu's to_nhwc32 of y; any C).
#define HN_NHWC16_TILES 2   // (these kernels and bn_bwd_dx_nhwc16's: bounded to 64 registers, 4+ blocks an SM)
// A channels-last tile's store by the copy's type: bf16 pairs (unsigned) or float32 rounded to tf32.
__device__ __forceinline__ void hn_store_nhwc_tile(const float (&t)[64][33], unsigned* __restrict__ y, int p0,
                                                   int c0, int C, int NP) {
    hn_store_nhwc16_tile(t, y, p0, c0, C, NP);
}
__device__ __forceinline__ void hn_store_nhwc_tile(const float (&t)[64][33], float* __restrict__ y, int p0,
                                                   int c0, int C, int NP) {
    hn_store_nhwc32_tile(t, y, p0, c0, C, NP);
}
template <typename X, typename Y>
__device__ __forceinline__ void bn_apply_nhwc16_body(
    const X* __restrict__ x, Y* __restrict__ y16, const float* __restrict__ mean,
    const float* __restrict__ var, const float* __restrict__ gamma, const float* __restrict__ beta, int n, int C,
    int HW, float eps, int act) {
    constexpr int T = HN_NHWC16_TILES;
    __shared__ float t[T][64][33];
    __shared__ float coef[4][64];      // the block's channels' mean, inv, gamma, beta
    const int c0 = blockIdx.y * 64, lane = threadIdx.x & 31, row = threadIdx.x >> 5, NP = n * HW;
    const bool stats = mean != nullptr;
    float v[T][8];                     // tile k's channels c0 + row + 8u
#pragma unroll
    for (int k = 0; k < T; ++k) {
        const HnTilePixel px(NP, HW, blockIdx.x * T + k);
        hn_load_nhwc16_rows(v[k], x + (long long)px.img * C * HW + px.hw, c0, C, HW, px.in);
    }
    if (stats && threadIdx.x < 64 && c0 + (int)threadIdx.x < C) {
        const int c = c0 + threadIdx.x;
        coef[0][threadIdx.x] = mean[c];
        coef[1][threadIdx.x] = 1.f / sqrtf(var[c] + eps);
        coef[2][threadIdx.x] = gamma[c];
        coef[3][threadIdx.x] = beta[c];
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < T; ++k)
#pragma unroll
        for (int u = 0; u < 8; ++u) {
            const int i = row + 8 * u;
            t[k][i][lane] = c0 + i < C    // (pixels past NP: read as 0, never stored)
                                ? hn_bn_value(v[k][u], stats, stats ? coef[0][i] : 0.f, stats ? coef[1][i] : 0.f,
                                              stats ? coef[2][i] : 0.f, stats ? coef[3][i] : 0.f, act)
                                : 0.f;
        }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < T; ++k) hn_store_nhwc_tile(t[k], y16, (blockIdx.x * T + k) * 32, c0, C, NP);
}
extern "C" __global__ void __launch_bounds__(256, 4) bn_apply_nhwc16(
    const float* __restrict__ x, unsigned* __restrict__ y16, const float* __restrict__ mean,
    const float* __restrict__ var, const float* __restrict__ gamma, const float* __restrict__ beta, int n, int C,
    int HW, float eps, int act) {
    bn_apply_nhwc16_body(x, y16, mean, var, gamma, beta, n, C, HW, eps, act);
}
extern "C" __global__ void __launch_bounds__(256, 4) bn_apply_nhwc32(
    const float* __restrict__ x, float* __restrict__ y32, const float* __restrict__ mean,
    const float* __restrict__ var, const float* __restrict__ gamma, const float* __restrict__ beta, int n, int C,
    int HW, float eps, int act) {
    bn_apply_nhwc16_body(x, y32, mean, var, gamma, beta, n, C, HW, eps, act);
}
extern "C" __global__ void __launch_bounds__(256, 4) bn_apply_nhwc16_x16(
    const unsigned short* __restrict__ x, unsigned* __restrict__ y16, const float* __restrict__ mean,
    const float* __restrict__ var, const float* __restrict__ gamma, const float* __restrict__ beta, int n, int C,
    int HW, float eps, int act) {
    bn_apply_nhwc16_body(x, y16, mean, var, gamma, beta, n, C, HW, eps, act);
}

// The end of a batch-norm backward reduction for channel c: this block's sums s (of the gradient) and sx (of the
// gradient times xhat) are added across the block, then across the channel's blocks in double (acc); the last block
// to finish writes red[c] = s, red[C + c] = sx, adds them to dbeta[c] and dgamma[c] (either may be null: a frozen
// or constant parameter, whose gradient is not wanted), and resets acc and count. A thread adds at most HN_BN_VW
// values in float before it adds their sum into its double s and sx: conversions to double run at 16 a clock on an
// SM, so one a value would bound these bandwidth-bound passes.
__device__ __forceinline__ void hn_bn_bwd_finish(double s, double sx, double* shm, float* __restrict__ red,
                                                 float* __restrict__ dgamma, float* __restrict__ dbeta,
                                                 double* __restrict__ acc, unsigned* __restrict__ count, int c,
                                                 int C) {
    s = hn_block_sum(s, shm);
    sx = hn_block_sum(sx, shm);
    if (threadIdx.x == 0) {
        atomicAdd(acc + 2 * c, s);
        atomicAdd(acc + 2 * c + 1, sx);
    }
    if (!hn_last_block(count, c)) return;
    if (threadIdx.x == 0) {
        const float t1 = (float)atomicAdd(acc + 2 * c, 0.0), t2 = (float)atomicAdd(acc + 2 * c + 1, 0.0);
        red[c] = t1;
        red[C + c] = t2;
        if (dbeta) dbeta[c] += t1;
        if (dgamma) dgamma[c] += t2;
        acc[2 * c] = 0.0;
        acc[2 * c + 1] = 0.0;
        count[c] = 0u;
    }
}

// dE/dz at one element x, z = hn_bn_z(x) the BN output: the gradient g itself, or after the op's own act (g =
// dE/dact(z)): g * gelu'(z) (HN_GELU), g where z > 0 and else 0 (HN_RELU).
__device__ __forceinline__ float hn_bn_out_grad(float g, float x, float mean, float inv, float gamma, float beta,
                                                int act) {
    if (act == HN_GELU) return g * hn_gelu_grad(hn_bn_z(x, mean, inv, gamma, beta));
    if (act == HN_RELU) return hn_bn_z(x, mean, inv, gamma, beta) > 0.f ? g : 0.f;
    return g;
}

// With g = dE/dz (hn_bn_out_grad of dy): red[0:C] = sum g, red[C:2C] = sum g * xhat; dgamma += red[C:] (unless
// null), dbeta += red[:C].
template <typename I, typename D, typename X>
__device__ __forceinline__ void bn_bwd_reduce_body(const D* __restrict__ dy, const X* __restrict__ x,
                                                   const float* __restrict__ mean, const float* __restrict__ var,
                                                   const float* __restrict__ gamma, const float* __restrict__ beta,
                                                   float* __restrict__ red, float* __restrict__ dgamma,
                                                   float* __restrict__ dbeta, double* __restrict__ acc,
                                                   unsigned* __restrict__ count, int N, int C, int HW, float eps,
                                                   int act) {
    __shared__ double shm[32];
    const int c = blockIdx.x;
    const float mu = mean[c], inv = 1.f / sqrtf(var[c] + eps), ga = gamma[c], be = beta[c];
    double s = 0.0, sx = 0.0;
    hn_bn_walk<I, 1>(N, C, HW, c, hn_bn_vec(HW, x, dy), [&](auto t) {
        float xv[decltype(t)::U], dv[decltype(t)::U];
        t.read(x, xv);
        t.read(dy, dv);
        float ts = 0.f, tx = 0.f;       // a take's sums (at most HN_BN_VW values), see hn_bn_bwd_finish
#pragma unroll
        for (int u = 0; u < t.U; ++u) {
            if (!t.ok(u)) continue;
            const float xhat = (xv[u] - mu) * inv, g = hn_bn_out_grad(dv[u], xv[u], mu, inv, ga, be, act);
            ts += g;
            tx += g * xhat;
        }
        s += ts;
        sx += tx;
    });
    hn_bn_bwd_finish(s, sx, shm, red, dgamma, dbeta, acc, count, c, C);
}
HN_BN_KERNELS(bn_bwd_reduce, bn_bwd_reduce,
    (const float* __restrict__ dy, const float* __restrict__ x, const float* __restrict__ mean,
     const float* __restrict__ var, const float* __restrict__ gamma, const float* __restrict__ beta,
     float* __restrict__ red, float* __restrict__ dgamma, float* __restrict__ dbeta, double* __restrict__ acc,
     unsigned* __restrict__ count, int N, int C, int HW, float eps, int act),
    (dy, x, mean, var, gamma, beta, red, dgamma, dbeta, acc, count, N, C, HW, eps, act))
HN_BN_KERNELS(bn_bwd_reduce_x16, bn_bwd_reduce,
    (const float* __restrict__ dy, const unsigned short* __restrict__ x, const float* __restrict__ mean,
     const float* __restrict__ var, const float* __restrict__ gamma, const float* __restrict__ beta,
     float* __restrict__ red, float* __restrict__ dgamma, float* __restrict__ dbeta, double* __restrict__ acc,
     unsigned* __restrict__ count, int N, int C, int HW, float eps, int act),
    (dy, x, mean, var, gamma, beta, red, dgamma, dbeta, acc, count, N, C, HW, eps, act))
HN_BN_KERNELS(bn_bwd_reduce_dy16, bn_bwd_reduce,
    (const unsigned short* __restrict__ dy, const float* __restrict__ x, const float* __restrict__ mean,
     const float* __restrict__ var, const float* __restrict__ gamma, const float* __restrict__ beta,
     float* __restrict__ red, float* __restrict__ dgamma, float* __restrict__ dbeta, double* __restrict__ acc,
     unsigned* __restrict__ count, int N, int C, int HW, float eps, int act),
    (dy, x, mean, var, gamma, beta, red, dgamma, dbeta, acc, count, N, C, HW, eps, act))
HN_BN_KERNELS(bn_bwd_reduce_x16_dy16, bn_bwd_reduce,
    (const unsigned short* __restrict__ dy, const unsigned short* __restrict__ x, const float* __restrict__ mean,
     const float* __restrict__ var, const float* __restrict__ gamma, const float* __restrict__ beta,
     float* __restrict__ red, float* __restrict__ dgamma, float* __restrict__ dbeta, double* __restrict__ acc,
     unsigned* __restrict__ count, int N, int C, int HW, float eps, int act),
    (dy, x, mean, var, gamma, beta, red, dgamma, dbeta, acc, count, N, C, HW, eps, act))

// With g = dE/dz (hn_bn_out_grad of dy), training: dx = gamma*inv * (g - sum_g/m - xhat * sum_gxhat/m); eval
// (red == nullptr): dx = g * gamma * inv. On bn_bwd_reduce's (C, G) grid, so that a block's channel constants are
// computed once. Elementwise after bn_bwd_reduce: dx may be x's own memory (x float32). dx float32, or in the
// "bn_bwd_dx16" versions (below) its bf16 bits.
template <typename I, typename D, typename X, typename O>
__device__ __forceinline__ void bn_bwd_dx_body(const D* __restrict__ dy, const X* x,
                                               const float* __restrict__ mean, const float* __restrict__ var,
                                               const float* __restrict__ gamma, const float* __restrict__ beta,
                                               const float* __restrict__ red, O* dx, int N, int C, int HW,
                                               float eps, int act) {
    const int c = blockIdx.x;
    const float inv_m = 1.f / ((float)N * HW);
    const float mu = mean[c], inv = 1.f / sqrtf(var[c] + eps), ga = gamma[c], be = beta[c], scale = ga * inv;
    const float rs = red ? red[c] * inv_m : 0.f, rx = red ? red[C + c] : 0.f;
    hn_bn_walk<I, 1>(N, C, HW, c, hn_bn_vec(HW, x, dy, dx), [&](auto t) {
        float xv[decltype(t)::U], dv[decltype(t)::U];
        t.read(x, xv);                          // x and dy of all the elements read before dx is written (dx may be x)
        t.read(dy, dv);
#pragma unroll
        for (int u = 0; u < t.U; ++u) {
            const float xhat = (xv[u] - mu) * inv, g = hn_bn_out_grad(dv[u], xv[u], mu, inv, ga, be, act);
            xv[u] = red ? scale * (g - rs - xhat * rx * inv_m) : g * scale;
        }
        t.write(dx, xv);
    });
}
HN_BN_KERNELS(bn_bwd_dx, bn_bwd_dx,
    (const float* __restrict__ dy, const float* x, const float* __restrict__ mean, const float* __restrict__ var,
     const float* __restrict__ gamma, const float* __restrict__ beta, const float* __restrict__ red, float* dx, int N,
     int C, int HW, float eps, int act),
    (dy, x, mean, var, gamma, beta, red, dx, N, C, HW, eps, act))
HN_BN_KERNELS(bn_bwd_dx_x16, bn_bwd_dx,
    (const float* __restrict__ dy, const unsigned short* __restrict__ x, const float* __restrict__ mean,
     const float* __restrict__ var, const float* __restrict__ gamma, const float* __restrict__ beta,
     const float* __restrict__ red, float* __restrict__ dx, int N, int C, int HW, float eps, int act),
    (dy, x, mean, var, gamma, beta, red, dx, N, C, HW, eps, act))
HN_BN_KERNELS(bn_bwd_dx_dy16, bn_bwd_dx,
    (const unsigned short* __restrict__ dy, const float* __restrict__ x, const float* __restrict__ mean,
     const float* __restrict__ var, const float* __restrict__ gamma, const float* __restrict__ beta,
     const float* __restrict__ red, float* __restrict__ dx, int N, int C, int HW, float eps, int act),
    (dy, x, mean, var, gamma, beta, red, dx, N, C, HW, eps, act))
HN_BN_KERNELS(bn_bwd_dx_x16_dy16, bn_bwd_dx,
    (const unsigned short* __restrict__ dy, const unsigned short* __restrict__ x, const float* __restrict__ mean,
     const float* __restrict__ var, const float* __restrict__ gamma, const float* __restrict__ beta,
     const float* __restrict__ red, float* __restrict__ dx, int N, int C, int HW, float eps, int act),
    (dy, x, mean, var, gamma, beta, red, dx, N, C, HW, eps, act))

// bn_bwd_dx with dx stored in bf16 (NCHW), the "bn_bwd_dx16" versions: the gradient the batch norm hands to a
// convolution whose filter gradient reads dy in bf16 (conv.py's takes_dy16_nchw: mma.cu's conv_small_filter_tc_dy16),
// the bits of bf16 of bn_bwd_dx's float32 dx.
HN_BN_KERNELS(bn_bwd_dx16, bn_bwd_dx,
    (const float* __restrict__ dy, const float* __restrict__ x, const float* __restrict__ mean,
     const float* __restrict__ var, const float* __restrict__ gamma, const float* __restrict__ beta,
     const float* __restrict__ red, unsigned short* __restrict__ dx, int N, int C, int HW, float eps, int act),
    (dy, x, mean, var, gamma, beta, red, dx, N, C, HW, eps, act))
HN_BN_KERNELS(bn_bwd_dx16_x16, bn_bwd_dx,
    (const float* __restrict__ dy, const unsigned short* __restrict__ x, const float* __restrict__ mean,
     const float* __restrict__ var, const float* __restrict__ gamma, const float* __restrict__ beta,
     const float* __restrict__ red, unsigned short* __restrict__ dx, int N, int C, int HW, float eps, int act),
    (dy, x, mean, var, gamma, beta, red, dx, N, C, HW, eps, act))
HN_BN_KERNELS(bn_bwd_dx16_dy16, bn_bwd_dx,
    (const unsigned short* __restrict__ dy, const float* __restrict__ x, const float* __restrict__ mean,
     const float* __restrict__ var, const float* __restrict__ gamma, const float* __restrict__ beta,
     const float* __restrict__ red, unsigned short* __restrict__ dx, int N, int C, int HW, float eps, int act),
    (dy, x, mean, var, gamma, beta, red, dx, N, C, HW, eps, act))
HN_BN_KERNELS(bn_bwd_dx16_x16_dy16, bn_bwd_dx,
    (const unsigned short* __restrict__ dy, const unsigned short* __restrict__ x, const float* __restrict__ mean,
     const float* __restrict__ var, const float* __restrict__ gamma, const float* __restrict__ beta,
     const float* __restrict__ red, unsigned short* __restrict__ dx, int N, int C, int HW, float eps, int act),
    (dy, x, mean, var, gamma, beta, red, dx, N, C, HW, eps, act))

// bn_bwd_dx's dx written channels-last in bf16 instead: the copy of dE/dy that the convolution (-> max pool) whose
// output x is reads in its backward (conv.cu's to_nhwc16 of dx), dx16[img][p][c] = bf16(dx[img][c][p]) as bf16 pairs
// [n][HW][C / 2] (C even), in bn_apply_nhwc16's blocks (HN_NHWC16_TILES tiles of 64 channels x 32 pixels through
// shared memory, a channel's constants read once per block). The same arithmetic as bn_bwd_dx, so the two give the
// same bits. Grid (ceil(n * HW / (32 HN_NHWC16_TILES)), ceil(C / 64)), 256 threads; n * HW < 2^31.
// bn_bwd_dx_nhwc32: the same in tf32, dx as float32 [n][HW][C] rounded to tf32 (conv.cu's to_nhwc32 of dx; any C),
// and where yt is given its K-major copy yt [C][ldk] too (to_nhwc32's, for mma.cu's r tiles; ldk = n HW rounded up
// to 4, zeros past n HW).
template <typename D, typename X, typename Y>
__device__ __forceinline__ void bn_bwd_dx_nhwc16_body(
    const D* __restrict__ dy, const X* __restrict__ x, const float* __restrict__ mean,
    const float* __restrict__ var, const float* __restrict__ gamma, const float* __restrict__ beta,
    const float* __restrict__ red, Y* __restrict__ dx16, int n, int C, int HW, float eps, int act,
    float* __restrict__ yt = nullptr, int ldk = 0) {
    constexpr int T = HN_NHWC16_TILES;
    __shared__ float t[T][64][33];
    __shared__ float coef[6][64];      // the block's channels' mean, inv, gamma, beta, sum g / m, sum g xhat
    const int c0 = blockIdx.y * 64, lane = threadIdx.x & 31, row = threadIdx.x >> 5, NP = n * HW;
    const float inv_m = 1.f / ((float)n * HW);
    float xv[T][8], dv[T][8];          // tile k's channels c0 + row + 8u
#pragma unroll
    for (int k = 0; k < T; ++k) {
        const HnTilePixel px(NP, HW, blockIdx.x * T + k);
        const long long at = (long long)px.img * C * HW + px.hw;
        hn_load_nhwc16_rows(xv[k], x + at, c0, C, HW, px.in);
        hn_load_nhwc16_rows(dv[k], dy + at, c0, C, HW, px.in);
    }
    if (threadIdx.x < 64 && c0 + (int)threadIdx.x < C) {
        const int c = c0 + threadIdx.x;
        coef[0][threadIdx.x] = mean[c];
        coef[1][threadIdx.x] = 1.f / sqrtf(var[c] + eps);
        coef[2][threadIdx.x] = gamma[c];
        coef[3][threadIdx.x] = beta[c];
        coef[4][threadIdx.x] = red ? red[c] * inv_m : 0.f;
        coef[5][threadIdx.x] = red ? red[C + c] : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < T; ++k)
#pragma unroll
        for (int u = 0; u < 8; ++u) {
            const int i = row + 8 * u;
            float v = 0.f;
            if (c0 + i < C) {                  // (pixels past NP: read as 0, never stored)
                const float mu = coef[0][i], inv = coef[1][i], ga = coef[2][i], scale = ga * inv;
                const float xhat = (xv[k][u] - mu) * inv;
                const float g = hn_bn_out_grad(dv[k][u], xv[k][u], mu, inv, ga, coef[3][i], act);
                v = red ? scale * (g - coef[4][i] - xhat * coef[5][i] * inv_m) : g * scale;
            }
            t[k][i][lane] = v;
        }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < T; ++k) {
        hn_store_nhwc_tile(t[k], dx16, (blockIdx.x * T + k) * 32, c0, C, NP);
        if (yt) hn_store_kmajor32_tile(t[k], yt, (blockIdx.x * T + k) * 32, c0, C, NP, ldk);
    }
}
extern "C" __global__ void __launch_bounds__(256, 4) bn_bwd_dx_nhwc32(
    const float* __restrict__ dy, const float* __restrict__ x, const float* __restrict__ mean,
    const float* __restrict__ var, const float* __restrict__ gamma, const float* __restrict__ beta,
    const float* __restrict__ red, float* __restrict__ dx32, int n, int C, int HW, float eps, int act,
    float* __restrict__ yt, int ldk) {
    bn_bwd_dx_nhwc16_body(dy, x, mean, var, gamma, beta, red, dx32, n, C, HW, eps, act, yt, ldk);
}
extern "C" __global__ void __launch_bounds__(256, 4) bn_bwd_dx_nhwc16(
    const float* __restrict__ dy, const float* __restrict__ x, const float* __restrict__ mean,
    const float* __restrict__ var, const float* __restrict__ gamma, const float* __restrict__ beta,
    const float* __restrict__ red, unsigned* __restrict__ dx16, int n, int C, int HW, float eps, int act) {
    bn_bwd_dx_nhwc16_body(dy, x, mean, var, gamma, beta, red, dx16, n, C, HW, eps, act);
}
extern "C" __global__ void __launch_bounds__(256, 4) bn_bwd_dx_nhwc16_x16(
    const float* __restrict__ dy, const unsigned short* __restrict__ x, const float* __restrict__ mean,
    const float* __restrict__ var, const float* __restrict__ gamma, const float* __restrict__ beta,
    const float* __restrict__ red, unsigned* __restrict__ dx16, int n, int C, int HW, float eps, int act) {
    bn_bwd_dx_nhwc16_body(dy, x, mean, var, gamma, beta, red, dx16, n, C, HW, eps, act);
}
extern "C" __global__ void __launch_bounds__(256, 4) bn_bwd_dx_nhwc16_dy16(
    const unsigned short* __restrict__ dy, const float* __restrict__ x, const float* __restrict__ mean,
    const float* __restrict__ var, const float* __restrict__ gamma, const float* __restrict__ beta,
    const float* __restrict__ red, unsigned* __restrict__ dx16, int n, int C, int HW, float eps, int act) {
    bn_bwd_dx_nhwc16_body(dy, x, mean, var, gamma, beta, red, dx16, n, C, HW, eps, act);
}
extern "C" __global__ void __launch_bounds__(256, 4) bn_bwd_dx_nhwc16_x16_dy16(
    const unsigned short* __restrict__ dy, const unsigned short* __restrict__ x, const float* __restrict__ mean,
    const float* __restrict__ var, const float* __restrict__ gamma, const float* __restrict__ beta,
    const float* __restrict__ red, unsigned* __restrict__ dx16, int n, int C, int HW, float eps, int act) {
    bn_bwd_dx_nhwc16_body(dy, x, mean, var, gamma, beta, red, dx16, n, C, HW, eps, act);
}

// --- BatchNorm -> ReLU -> MaxPool fused (the fast training step's plan) -------------------------------------------
// z[N,C,H,W] is the BN input; a = relu(bn(z)) is never stored: the forward writes the pooled y[N,C,P,Q] and each
// window's argmax, the backward recomputes a's sign and the pooled gradient g = dE/da from (dy, arg) at each z.

template <typename I>
__device__ __forceinline__ void bn_relu_maxpool_fwd_body(const float* __restrict__ z, float* __restrict__ y,
                                                         unsigned char* __restrict__ arg,
                                                         const float* __restrict__ mean, const float* __restrict__ var,
                                                         const float* __restrict__ gamma,
                                                         const float* __restrict__ beta, int N, int C, int H, int W,
                                                         int P, int Q, int k, int st, float eps) {
    HN_GRID_STRIDE_T(I, e, (I)N * C * P * Q) {
        const I pq = e % (I)(P * Q), nc = e / (I)(P * Q);
        const int p = (int)pq / Q, q = (int)pq - p * Q, c = (int)(nc % (I)C);
        const float inv = 1.f / sqrtf(var[c] + eps);
        const float mu = mean[c], g = gamma[c], b = beta[c];
        const float* zp = z + nc * (I)(H * W) + (I)((p * st) * W + q * st);
        float best = -HN_INF;
        int bi = 0;
        for (int i = 0; i < k; ++i)
            for (int j = 0; j < k; ++j) {
                const float v = fmaxf((zp[i * W + j] - mu) * inv * g + b, 0.f);
                if (v > best) {
                    best = v;
                    bi = i * k + j;
                }
            }
        y[e] = best;
        arg[e] = (unsigned char)bi;
    }
}
HN_TWO_INDEX_KERNELS(bn_relu_maxpool_fwd,
    (const float* __restrict__ z, float* __restrict__ y, unsigned char* __restrict__ arg,
     const float* __restrict__ mean, const float* __restrict__ var, const float* __restrict__ gamma,
     const float* __restrict__ beta, int N, int C, int H, int W, int P, int Q, int k, int st, float eps),
    (z, y, arg, mean, var, gamma, beta, N, C, H, W, P, Q, k, st, eps))

// Whether relu(bn(z)) passes a gradient at z: bn(z) as the forward computes it (the same bits), not <= 0.
__device__ __forceinline__ bool hn_bn_relu_open(float zv, float mu, float inv, float g, float b) {
    return !((zv - mu) * inv * g + b <= 0.f);
}

// red[0:C] = sum g, red[C:2C] = sum g * xhat; dgamma += red[C:], dbeta += red[:C]  (grid (C, G), last block). g is
// dy[o] at the element arg[o] of each window o (where a = relu(bn(z)) > 0 there) and 0 at every other element, so the
// sums run over channel c's N P Q windows, one element of z each (an element that is the maximum of several
// overlapping windows adds each one's dy, as its g is their sum): three divisions a window, not a few an element.
template <typename I>
__device__ __forceinline__ void bn_relu_maxpool_bwd_reduce_body(
        const float* __restrict__ dy, const unsigned char* __restrict__ arg, const float* __restrict__ z,
        const float* __restrict__ mean, const float* __restrict__ var, const float* __restrict__ gamma,
        const float* __restrict__ beta, float* __restrict__ red, float* __restrict__ dgamma, float* __restrict__ dbeta,
        double* __restrict__ acc, unsigned* __restrict__ count, int N, int C, int H, int W, int P, int Q, int k,
        int st, float eps) {
    __shared__ double shm[32];
    const int c = blockIdx.x, PQ = P * Q;
    const I per = (I)N * PQ;
    const float mu = mean[c], inv = 1.f / sqrtf(var[c] + eps), g = gamma[c], b = beta[c];
    double s = 0.0, sx = 0.0;
    float ts = 0.f, tx = 0.f;           // HN_BN_VW windows' sums, see hn_bn_bwd_finish
    int t = 0;
    for (I i = (I)blockIdx.y * blockDim.x + threadIdx.x; i < per; i += (I)gridDim.y * blockDim.x) {
        const I n = i / (I)PQ, nc = n * C + c;
        const int pq = (int)(i - n * (I)PQ), p = pq / Q, q = pq - p * Q;
        const I o = nc * (I)PQ + pq;
        const int a = arg[o], r = a / k;                // the maximum's row and column in its window: (r, a - r k)
        const float zv = z[nc * (I)(H * W) + (I)((p * st + r) * W + q * st + a - r * k)];
        const float gr = hn_bn_relu_open(zv, mu, inv, g, b) ? dy[o] : 0.f;
        ts += gr;
        tx += gr * ((zv - mu) * inv);
        if (++t == HN_BN_VW) {
            s += ts;
            sx += tx;
            ts = tx = 0.f;
            t = 0;
        }
    }
    s += ts;
    sx += tx;
    hn_bn_bwd_finish(s, sx, shm, red, dgamma, dbeta, acc, count, c, C);
}
HN_TWO_INDEX_KERNELS(bn_relu_maxpool_bwd_reduce,
    (const float* __restrict__ dy, const unsigned char* __restrict__ arg, const float* __restrict__ z,
     const float* __restrict__ mean, const float* __restrict__ var, const float* __restrict__ gamma,
     const float* __restrict__ beta, float* __restrict__ red, float* __restrict__ dgamma, float* __restrict__ dbeta,
     double* __restrict__ acc, unsigned* __restrict__ count, int N, int C, int H, int W, int P, int Q, int k, int st,
     float eps),
    (dy, arg, z, mean, var, gamma, beta, red, dgamma, dbeta, acc, count, N, C, H, W, P, Q, k, st, eps))

// One element's dz = gamma*inv * (g - sum_g/m - xhat * sum_gxhat/m), g = dE/da where a = relu(bn(z)) > 0, else 0.
__device__ __forceinline__ float hn_bn_pool_dz(float zv, float g_pooled, float mu, float inv, float g, float b,
                                               float r0, float r1, float inv_m) {
    const float gr = hn_bn_relu_open(zv, mu, inv, g, b) ? g_pooled : 0.f;
    const float xhat = (zv - mu) * inv;
    return g * inv * (gr - r0 * inv_m - xhat * r1 * inv_m);
}

// dz of every element of z (N C H W threads' worth of work). Where the windows do not overlap (k == st) a thread takes
// one row of a window's block, k adjacent elements (h, bq k .. bq k + k - 1) of a plane, so that a warp's accesses are
// contiguous: the window (h / k, bq) gives its maximum arg[o] dy[o], or past the last window the block is margin (g 0);
// with k == 4, W a multiple of 4 and z, dz 16-byte aligned the row is one float4. norm.py launches N C H ceil(W / k)
// of them. Otherwise a thread takes an element (g: hn_pool_grad's sum over the windows whose maximum it is). dz may be
// z itself (in place, after the reduction: each thread reads its elements of z before it writes them), so z and dz are
// not __restrict__.
template <typename I>
__device__ __forceinline__ void bn_relu_maxpool_bwd_dx_body(
        const float* __restrict__ dy, const unsigned char* __restrict__ arg, const float* z,
        const float* __restrict__ mean, const float* __restrict__ var, const float* __restrict__ gamma,
        const float* __restrict__ beta, const float* __restrict__ red, float* dz, int N, int C, int H, int W, int P,
        int Q, int k, int st, float eps) {
    const float inv_m = 1.f / ((float)N * H * W);
    if (k == st) {
        const int BQ = (W + k - 1) / k, HBQ = H * BQ;                   // a plane's rows of blocks: H x BQ
        const bool vec4 = k == 4 && W % 4 == 0 && hn_aligned16(z, dz);
        HN_GRID_STRIDE_T(I, e, (I)N * C * HBQ) {
            const I nc = e / (I)HBQ;
            const int hb = (int)(e - nc * (I)HBQ), h = hb / BQ, bq = hb - h * BQ, c = (int)(nc % (I)C);
            const int bp = h / k, i = h - bp * k;                        // the window's row, and the row within it
            const float mu = mean[c], inv = 1.f / sqrtf(var[c] + eps), g = gamma[c], b = beta[c];
            const float r0 = red[c], r1 = red[C + c];
            const bool win = bp < P && bq < Q;
            const I o = nc * (I)(P * Q) + (I)(bp * Q + bq);
            const int a = win ? arg[o] - i * k : -1;                    // the maximum's column in this row, if here
            const float d = win ? dy[o] : 0.f;
            const I at = nc * (I)(H * W) + (I)(h * W + bq * k);
            if (vec4) {
                const uint4 v = hn_ld16(z + at);
                const unsigned u[4] = {v.x, v.y, v.z, v.w};
                unsigned o4[4];
                for (int j = 0; j < 4; ++j)
                    o4[j] = __float_as_uint(hn_bn_pool_dz(__uint_as_float(u[j]), a == j ? d : 0.f, mu, inv, g, b, r0,
                                                          r1, inv_m));
                hn_st16(dz + at, make_uint4(o4[0], o4[1], o4[2], o4[3]));
            } else {
                const int cols = min(k, W - bq * k);
                for (int j = 0; j < cols; ++j)
                    dz[at + j] = hn_bn_pool_dz(z[at + j], a == j ? d : 0.f, mu, inv, g, b, r0, r1, inv_m);
            }
        }
        return;
    }
    HN_GRID_STRIDE_T(I, e, (I)N * C * H * W) {
        const I nc = e / (I)(H * W);
        const int hw = (int)(e - nc * (I)(H * W)), h = hw / W, w = hw - h * W, c = (int)(nc % (I)C);
        const float mu = mean[c], inv = 1.f / sqrtf(var[c] + eps), g = gamma[c];
        const float zv = z[e];
        dz[e] = hn_bn_pool_dz(zv, hn_pool_grad<I>(dy, arg, nullptr, nc, h, w, P, Q, k, st), mu, inv, g, beta[c],
                              red[c], red[C + c], inv_m);
    }
}
HN_TWO_INDEX_KERNELS(bn_relu_maxpool_bwd_dx,
    (const float* __restrict__ dy, const unsigned char* __restrict__ arg, const float* z,
     const float* __restrict__ mean, const float* __restrict__ var, const float* __restrict__ gamma,
     const float* __restrict__ beta, const float* __restrict__ red, float* dz, int N, int C, int H, int W, int P,
     int Q, int k, int st, float eps),
    (dy, arg, z, mean, var, gamma, beta, red, dz, N, C, H, W, P, Q, k, st, eps))

// --- the channels-last bf16 copies in 16-byte vectors (after the others: ptxas then allocates those as before) ---
// bn_apply_nhwc16 in 16-byte vectors (HnVecTile) where HW and C are multiples of 8 and x, y16 are 16-byte aligned:
// HN_NHWC16_TILES tiles of 64 channels x 64 pixels a block, every load in flight before the first value is used, the
// same arithmetic (hn_bn_value, the same bits). Grid (ceil(n * HW / (64 HN_NHWC16_TILES)), ceil(C / 64)), 256
// threads; n * HW < 2^31.
template <typename X>
__device__ __forceinline__ void bn_apply_nhwc16v_body(
    const X* __restrict__ x, unsigned short* __restrict__ y16, const float* __restrict__ mean,
    const float* __restrict__ var, const float* __restrict__ gamma, const float* __restrict__ beta, int n, int C,
    int HW, float eps, int act) {
    constexpr int T = HN_NHWC16_TILES;
    __shared__ __align__(16) unsigned s[T][64][32];
    const int NP = n * HW;
    const bool stats = mean != nullptr;
    HnRaw8<X> r[T][2];
#pragma unroll
    for (int k = 0; k < T; ++k) HnVecTile(NP, C, HW, blockIdx.x * T + k).load(x, HW, r[k]);
    const HnVecTile me(NP, C, HW, blockIdx.x * T);
    float mu[2], inv[2], ga[2], be[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int c = me.c + h;
        const bool ok = stats && c < C;
        mu[h] = ok ? mean[c] : 0.f, inv[h] = ok ? 1.f / sqrtf(var[c] + eps) : 0.f, ga[h] = ok ? gamma[c] : 0.f;
        be[h] = ok ? beta[c] : 0.f;
    }
#pragma unroll
    for (int k = 0; k < T; ++k) {
        float v[2][8];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            r[k][h].unpack(v[h]);
#pragma unroll
            for (int e = 0; e < 8; ++e) v[h][e] = hn_bn_value(v[h][e], stats, mu[h], inv[h], ga[h], be[h], act);
        }
        me.stage(s[k], v[0], v[1]);
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < T; ++k) hn_store_nhwc16_vec(s[k], y16, (blockIdx.x * T + k) * 64, C, NP);
}
extern "C" __global__ void __launch_bounds__(256, 4) bn_apply_nhwc16v(
    const float* __restrict__ x, unsigned short* __restrict__ y16, const float* __restrict__ mean,
    const float* __restrict__ var, const float* __restrict__ gamma, const float* __restrict__ beta, int n, int C,
    int HW, float eps, int act) {
    bn_apply_nhwc16v_body(x, y16, mean, var, gamma, beta, n, C, HW, eps, act);
}
extern "C" __global__ void __launch_bounds__(256, 4) bn_apply_nhwc16v_x16(
    const unsigned short* __restrict__ x, unsigned short* __restrict__ y16, const float* __restrict__ mean,
    const float* __restrict__ var, const float* __restrict__ gamma, const float* __restrict__ beta, int n, int C,
    int HW, float eps, int act) {
    bn_apply_nhwc16v_body(x, y16, mean, var, gamma, beta, n, C, HW, eps, act);
}

// bn_bwd_dx_nhwc16 in 16-byte vectors (HnVecTile, as bn_apply_nhwc16v) where HW and C are multiples of 8 and dy,
// x, dx16 are 16-byte aligned; the same arithmetic, the same bits. Grid as bn_apply_nhwc16v's. Four blocks an SM
// where both tensors are bf16 (64 registers), three where one is float32, two where both are (their words take
// twice the registers).
template <typename D, typename X>
__device__ __forceinline__ void bn_bwd_dx_nhwc16v_body(
    const D* __restrict__ dy, const X* __restrict__ x, const float* __restrict__ mean,
    const float* __restrict__ var, const float* __restrict__ gamma, const float* __restrict__ beta,
    const float* __restrict__ red, unsigned short* __restrict__ dx16, int n, int C, int HW, float eps, int act) {
    constexpr int T = HN_NHWC16_TILES;
    __shared__ __align__(16) unsigned s[T][64][32];
    const int NP = n * HW;
    const float inv_m = 1.f / ((float)n * HW);
    HnRaw8<X> xr[T][2];
    HnRaw8<D> dr[T][2];
#pragma unroll
    for (int k = 0; k < T; ++k) {
        const HnVecTile t(NP, C, HW, blockIdx.x * T + k);
        t.load(x, HW, xr[k]);
        t.load(dy, HW, dr[k]);
    }
    const HnVecTile me(NP, C, HW, blockIdx.x * T);
    float mu[2], inv[2], ga[2], be[2], s1[2], s2[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int c = me.c + h;
        const bool ok = c < C;
        mu[h] = ok ? mean[c] : 0.f, inv[h] = ok ? 1.f / sqrtf(var[c] + eps) : 0.f, ga[h] = ok ? gamma[c] : 0.f;
        be[h] = ok ? beta[c] : 0.f, s1[h] = ok && red ? red[c] * inv_m : 0.f, s2[h] = ok && red ? red[C + c] : 0.f;
    }
#pragma unroll
    for (int k = 0; k < T; ++k) {
        float v[2][8];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float xv[8];
            xr[k][h].unpack(xv);
            dr[k][h].unpack(v[h]);
            const float scale = ga[h] * inv[h];
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                const float xhat = (xv[e] - mu[h]) * inv[h];
                const float g = hn_bn_out_grad(v[h][e], xv[e], mu[h], inv[h], ga[h], be[h], act);
                v[h][e] = red ? scale * (g - s1[h] - xhat * s2[h] * inv_m) : g * scale;
            }
        }
        me.stage(s[k], v[0], v[1]);
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < T; ++k) hn_store_nhwc16_vec(s[k], dx16, (blockIdx.x * T + k) * 64, C, NP);
}
#define HN_BN_BWD_DX_NHWC16V(name, D, X, MINB)                                                                     \
    extern "C" __global__ void __launch_bounds__(256, MINB) name(                                                \
        const D* __restrict__ dy, const X* __restrict__ x, const float* __restrict__ mean,                       \
        const float* __restrict__ var, const float* __restrict__ gamma, const float* __restrict__ beta,          \
        const float* __restrict__ red, unsigned short* __restrict__ dx16, int n, int C, int HW, float eps,       \
        int act) {                                                                                               \
        bn_bwd_dx_nhwc16v_body(dy, x, mean, var, gamma, beta, red, dx16, n, C, HW, eps, act);                   \
    }
HN_BN_BWD_DX_NHWC16V(bn_bwd_dx_nhwc16v, float, float, 2)
HN_BN_BWD_DX_NHWC16V(bn_bwd_dx_nhwc16v_x16, float, unsigned short, 3)
HN_BN_BWD_DX_NHWC16V(bn_bwd_dx_nhwc16v_dy16, unsigned short, float, 3)
HN_BN_BWD_DX_NHWC16V(bn_bwd_dx_nhwc16v_x16_dy16, unsigned short, unsigned short, 4)
