// Batch normalisation over (N, HW) per channel c, for x[N,C] (HW = 1) and x[N,C,H,W].
// Training forward: bn_stats (mean, biased var, running stats update) then bn_apply; backward: bn_bwd_reduce
// (sum dy, sum dy*xhat per channel, also dgamma += and dbeta +=) then bn_bwd_dx.
// The reductions run over a (C, G) grid; each block adds doubles into `acc`, and the last block of a channel
// (counted in `count`) finishes that channel and resets acc and count for the next call (no memset needed).
#include "common.cuh"

__device__ __forceinline__ bool hn_last_block(unsigned* count, int c) {
    __shared__ bool last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(count + c, 1u) == gridDim.y - 1;
    __syncthreads();
    return last;
}

// stats[0:C] = mean, stats[C:2C] = biased variance; running_mean/var updated as PyTorch (unbiased variance).
extern "C" __global__ void bn_stats(const float* __restrict__ x, float* __restrict__ stats,
                                    float* __restrict__ running_mean, float* __restrict__ running_var,
                                    double* __restrict__ acc, unsigned* __restrict__ count, int N, int C, int HW,
                                    float momentum) {
    __shared__ double shm[32];
    const int c = blockIdx.x;
    const long long per = (long long)N * HW;
    double s = 0.0, ss = 0.0;
    for (long long i = (long long)blockIdx.y * blockDim.x + threadIdx.x; i < per; i += (long long)gridDim.y * blockDim.x) {
        const long long n = i / HW, hw = i - n * HW;
        const double v = x[(n * C + c) * HW + hw];
        s += v;
        ss += v * v;
    }
    s = hn_block_sum(s, shm);
    ss = hn_block_sum(ss, shm);
    if (threadIdx.x == 0) {
        atomicAdd(acc + 2 * c, s);
        atomicAdd(acc + 2 * c + 1, ss);
    }
    if (!hn_last_block(count, c)) return;
    if (threadIdx.x == 0) {
        const double tot = atomicAdd(acc + 2 * c, 0.0), tot2 = atomicAdd(acc + 2 * c + 1, 0.0);
        const double mean = tot / per;
        double var = tot2 / per - mean * mean;
        if (var < 0) var = 0;
        stats[c] = (float)mean;
        stats[C + c] = (float)var;
        running_mean[c] = (1.f - momentum) * running_mean[c] + (float)(momentum * mean);
        running_var[c] = (1.f - momentum) * running_var[c] + (float)(momentum * var * per / (per > 1 ? per - 1 : 1));
        acc[2 * c] = 0.0;
        acc[2 * c + 1] = 0.0;
        count[c] = 0u;
    }
}

// y = (x - mean) * rsqrt(var + eps) * gamma + beta, optional ReLU; mean/var from stats (training) or running (eval).
extern "C" __global__ void bn_apply(const float* __restrict__ x, float* __restrict__ y, const float* __restrict__ mean,
                                    const float* __restrict__ var, const float* __restrict__ gamma,
                                    const float* __restrict__ beta, int N, int C, int HW, float eps, int act) {
    HN_GRID_STRIDE(e, (long long)N * C * HW) {
        const int c = (int)((e / HW) % C);
        const float inv = 1.f / sqrtf(var[c] + eps);
        float v = (x[e] - mean[c]) * inv * gamma[c] + beta[c];
        if (act == HN_RELU) v = fmaxf(v, 0.f);
        y[e] = v;
    }
}

// red[0:C] = sum dy, red[C:2C] = sum dy * xhat; dgamma += red[C:], dbeta += red[:C].
extern "C" __global__ void bn_bwd_reduce(const float* __restrict__ dy, const float* __restrict__ x,
                                         const float* __restrict__ mean, const float* __restrict__ var,
                                         float* __restrict__ red, float* __restrict__ dgamma, float* __restrict__ dbeta,
                                         double* __restrict__ acc, unsigned* __restrict__ count, int N, int C, int HW,
                                         float eps) {
    __shared__ double shm[32];
    const int c = blockIdx.x;
    const long long per = (long long)N * HW;
    const float mu = mean[c], inv = 1.f / sqrtf(var[c] + eps);
    double s = 0.0, sx = 0.0;
    for (long long i = (long long)blockIdx.y * blockDim.x + threadIdx.x; i < per; i += (long long)gridDim.y * blockDim.x) {
        const long long n = i / HW, hw = i - n * HW, idx = (n * C + c) * HW + hw;
        const float g = dy[idx];
        s += g;
        sx += (double)g * ((x[idx] - mu) * inv);
    }
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
        dbeta[c] += t1;
        dgamma[c] += t2;
        acc[2 * c] = 0.0;
        acc[2 * c + 1] = 0.0;
        count[c] = 0u;
    }
}

// training: dx = gamma*inv * (dy - sum_dy/m - xhat * sum_dyxhat/m);  eval (red == nullptr): dx = dy * gamma * inv.
extern "C" __global__ void bn_bwd_dx(const float* __restrict__ dy, const float* __restrict__ x,
                                     const float* __restrict__ mean, const float* __restrict__ var,
                                     const float* __restrict__ gamma, const float* __restrict__ red,
                                     float* __restrict__ dx, int N, int C, int HW, float eps) {
    const float inv_m = 1.f / ((float)N * HW);
    HN_GRID_STRIDE(e, (long long)N * C * HW) {
        const int c = (int)((e / HW) % C);
        const float inv = 1.f / sqrtf(var[c] + eps), scale = gamma[c] * inv;
        if (red) {
            const float xhat = (x[e] - mean[c]) * inv;
            dx[e] = scale * (dy[e] - red[c] * inv_m - xhat * red[C + c] * inv_m);
        } else {
            dx[e] = dy[e] * scale;
        }
    }
}

// --- BatchNorm -> ReLU -> MaxPool fused (the fast training step's plan) -------------------------------------------
// z[N,C,H,W] is the BN input; a = relu(bn(z)) is never stored: the forward writes the pooled y[N,C,P,Q] and each
// window's argmax, the backward recomputes a's sign and the pooled gradient g = dE/da from (dy, arg) at each z.

extern "C" __global__ void bn_relu_maxpool_fwd(const float* __restrict__ z, float* __restrict__ y,
                                               unsigned char* __restrict__ arg, const float* __restrict__ mean,
                                               const float* __restrict__ var, const float* __restrict__ gamma,
                                               const float* __restrict__ beta, int N, int C, int H, int W, int P,
                                               int Q, int k, int st, float eps) {
    HN_GRID_STRIDE(e, (long long)N * C * P * Q) {
        const int q = (int)(e % Q), p = (int)((e / Q) % P);
        const long long nc = e / ((long long)P * Q);
        const int c = (int)(nc % C);
        const float inv = 1.f / sqrtf(var[c] + eps);
        const float mu = mean[c], g = gamma[c], b = beta[c];
        const float* zp = z + nc * H * W + (long long)(p * st) * W + q * st;
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

// g at z[e]: the pooled gradient where a = relu(bn(z)) > 0, else 0
__device__ __forceinline__ float hn_bn_pool_grad(const float* __restrict__ dy, const unsigned char* __restrict__ arg,
                                                 float zv, float mu, float inv, float g, float b, long long e, int H,
                                                 int W, int P, int Q, int k, int st) {
    if ((zv - mu) * inv * g + b <= 0.f) return 0.f;
    const int w = (int)(e % W), h = (int)((e / W) % H);
    return hn_pool_grad(dy, arg, e / ((long long)H * W), h, w, P, Q, k, st);
}

// red[0:C] = sum g, red[C:2C] = sum g * xhat; dgamma += red[C:], dbeta += red[:C]  (grid (C, G), last block).
extern "C" __global__ void bn_relu_maxpool_bwd_reduce(const float* __restrict__ dy, const unsigned char* __restrict__ arg,
                                                      const float* __restrict__ z, const float* __restrict__ mean,
                                                      const float* __restrict__ var, const float* __restrict__ gamma,
                                                      const float* __restrict__ beta, float* __restrict__ red,
                                                      float* __restrict__ dgamma, float* __restrict__ dbeta,
                                                      double* __restrict__ acc, unsigned* __restrict__ count, int N,
                                                      int C, int H, int W, int P, int Q, int k, int st, float eps) {
    __shared__ double shm[32];
    const int c = blockIdx.x, HW = H * W;
    const long long per = (long long)N * HW;
    const float mu = mean[c], inv = 1.f / sqrtf(var[c] + eps), g = gamma[c], b = beta[c];
    double s = 0.0, sx = 0.0;
    for (long long i = (long long)blockIdx.y * blockDim.x + threadIdx.x; i < per; i += (long long)gridDim.y * blockDim.x) {
        const long long n = i / HW, hw = i - n * HW, idx = (n * C + c) * HW + hw;
        const float zv = z[idx];
        const float gr = hn_bn_pool_grad(dy, arg, zv, mu, inv, g, b, idx, H, W, P, Q, k, st);
        s += gr;
        sx += (double)gr * ((zv - mu) * inv);
    }
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
        dbeta[c] += t1;
        dgamma[c] += t2;
        acc[2 * c] = 0.0;
        acc[2 * c + 1] = 0.0;
        count[c] = 0u;
    }
}

// dz = gamma*inv * (g - sum_g/m - xhat * sum_gxhat/m). dz may be z itself (in place, after the reduction: each
// thread reads z[e] only, then writes dz[e]), so z and dz are not __restrict__.
extern "C" __global__ void bn_relu_maxpool_bwd_dx(const float* __restrict__ dy, const unsigned char* __restrict__ arg,
                                                  const float* z, const float* __restrict__ mean,
                                                  const float* __restrict__ var, const float* __restrict__ gamma,
                                                  const float* __restrict__ beta, const float* __restrict__ red,
                                                  float* dz, int N, int C, int H, int W, int P, int Q,
                                                  int k, int st, float eps) {
    const float inv_m = 1.f / ((float)N * H * W);
    HN_GRID_STRIDE(e, (long long)N * C * H * W) {
        const int c = (int)((e / ((long long)H * W)) % C);
        const float mu = mean[c], inv = 1.f / sqrtf(var[c] + eps), g = gamma[c];
        const float zv = z[e];
        const float gr = hn_bn_pool_grad(dy, arg, zv, mu, inv, g, beta[c], e, H, W, P, Q, k, st);
        const float xhat = (zv - mu) * inv;
        dz[e] = g * inv * (gr - red[c] * inv_m - xhat * red[C + c] * inv_m);
    }
}
