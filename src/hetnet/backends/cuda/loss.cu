// Losses with their gradient in one kernel. Sums go to device accumulators (double loss sum, 64-bit correct count),
// so a training step never waits for the host.
#include "common.cuh"

// Softmax cross-entropy over logits[N, K], one warp per row:
//   t = (1 - ls) * onehot(label) + ls / K;  loss_n = -sum_k t_k log softmax_k;  dlogits = (softmax - t) / N
// loss_acc += sum_n loss_n * loss_scale; correct += [argmax_n == label_n] (first maximum, as NumPy).
// dlogits may be nullptr (evaluation).
extern "C" __global__ void softmax_xent(const float* __restrict__ logits, const int* __restrict__ labels,
                                        float* __restrict__ dlogits, double* __restrict__ loss_acc,
                                        unsigned long long* __restrict__ correct, int N, int K, float ls,
                                        float grad_scale) {
    const long long row = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (row >= N) return;
    const float* z = logits + row * K;
    float mx = -HN_INF;
    int arg = 0x7fffffff;
    for (int k = lane; k < K; k += 32) {
        const float v = z[k];
        if (v > mx || (v == mx && k < arg)) {
            mx = v;
            arg = k;
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        const float om = __shfl_xor_sync(0xffffffffu, mx, o);
        const int oa = __shfl_xor_sync(0xffffffffu, arg, o);
        if (om > mx || (om == mx && oa < arg)) {
            mx = om;
            arg = oa;
        }
    }
    float s = 0.f, zsum = 0.f;
    for (int k = lane; k < K; k += 32) {
        s += expf(z[k] - mx);
        zsum += z[k] - mx;
    }
    s = hn_warp_sum(s);
    zsum = hn_warp_sum(zsum);
    const float lse = logf(s);
    const int label = labels[row];
    const float logp_label = z[label] - mx - lse;
    if (lane == 0) {
        float loss = -logp_label;
        if (ls != 0.f) loss = (1.f - ls) * loss + ls * -(zsum / K - lse);
        if (loss_acc) atomicAdd(loss_acc, (double)loss);
        if (correct && arg == label) atomicAdd(correct, 1ull);
    }
    if (dlogits) {
        const float inv = 1.f / s, off = ls / K;
        for (int k = lane; k < K; k += 32) {
            float d = expf(z[k] - mx) * inv - off;
            if (k == label) d -= 1.f - ls;
            dlogits[row * K + k] = d * grad_scale;
        }
    }
}

// Binary cross-entropy with logits, element-wise: loss += max(z,0) - z*t + log1p(exp(-|z|));
// dlogits = (sigmoid(z) - t) * grad_scale.
extern "C" __global__ void bce_logits(const float* __restrict__ z, const float* __restrict__ t,
                                      float* __restrict__ dz, double* __restrict__ loss_acc, long long n,
                                      float grad_scale) {
    __shared__ double shm[32];
    double acc = 0.0;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float v = z[i], tv = t[i], e = expf(-fabsf(v));
        acc += fmaxf(v, 0.f) - v * tv + log1pf(e);
        const float sig = (v >= 0.f ? 1.f : e) / (1.f + e);
        dz[i] = (sig - tv) * grad_scale;
    }
    acc = hn_block_sum(acc, shm);
    if (threadIdx.x == 0) atomicAdd(loss_acc, acc);
}
