// Convolution (and dense layers, as 1x1 convolutions on 1x1 images): forward, backward-data, backward-filter.
//
// Two algorithms (chosen per layer shape by a one-time measurement in conv.py):
//  1. implicit GEMM (conv_fwd_*, conv_bwd_data_*, conv_bwd_filter_*): tiled, shared memory, the "column matrix"
//     is gathered on the fly from x (or dy) into shared memory, never materialised.
//  2. im2col + cuBLAS GEMM: im2col / col2im / layout kernels below, the GEMM is cuBLAS through CuPy.
//
// Shapes: x[N,C,H,W], w[K,C,R,S], y[N,K,P,Q]; CRS = C*R*S, PQ = P*Q.
// Gather tables (built once per shape on the host): tab[j] for j over CRS (forward / filter gradient)
//   .x = c*H*W + r*W + s   (offset into one image of x)   .y = r << 16 | s
// and for j over K*R*S (data gradient)
//   .x = k*P*Q             (offset into one image of dy)  .y = r << 16 | s   .z = (k*C)*R*S + r*S + s (into w, + c*R*S)
#include "common.cuh"

#define BK 16

// --- the main loop all three implicit-GEMM kernels share ------------------------------------------------------------
// acc[TM][TN] (this thread's TM x TN outputs of the block's BM x BN tile) += A[m, kk] * B[kk, n] over the reduction
// range [k_begin, k_end), BK at a time. Double-buffered: while the block multiplies the tile in shared memory, the
// thread's global loads of the next tile are in flight into registers (`fetch`), and are written to the other
// shared buffer afterwards (`put`), so one __syncthreads per tile suffices and load latency hides behind the FMAs.
// fetch(k0) loads tile k0 into the caller's staging registers; put(As, Bs) stores them; on_tile(As) sees each
// A tile before it is used (the filter gradient sums db there). Thread t computes rows tm + i*DM, columns tn + j*DN.
template <int BM, int BN, int TM, int TN>
__device__ __forceinline__ void hn_tile_mma(float (&acc)[TM][TN], const float (&As)[BK][BM + 1],
                                            const float (&Bs)[BK][BN + 1], int tm, int tn) {
    constexpr int DM = BM / TM, DN = BN / TN;
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
        float a[TM], b[TN];
#pragma unroll
        for (int i = 0; i < TM; ++i) a[i] = As[kk][tm + i * DM];
#pragma unroll
        for (int j = 0; j < TN; ++j) b[j] = Bs[kk][tn + j * DN];
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
            for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
}

template <int BM, int BN, int TM, int TN, class Fetch, class Put, class OnTile>
__device__ __forceinline__ void hn_pipelined_gemm(float (&acc)[TM][TN], int k_begin, int k_end, int tm, int tn,
                                                  Fetch fetch, Put put, OnTile on_tile) {
    __shared__ float As[2][BK][BM + 1];
    __shared__ float Bs[2][BK][BN + 1];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = 0.f;
    if (k_begin >= k_end) return;      // the same for the whole block
    fetch(k_begin);
    put(As[0], Bs[0]);
    __syncthreads();
    int buf = 0;
    for (int k0 = k_begin; k0 < k_end; k0 += BK) {
        const bool more = k0 + BK < k_end;
        if (more) fetch(k0 + BK);      // in flight during the multiply below
        on_tile(As[buf]);
        hn_tile_mma<BM, BN, TM, TN>(acc, As[buf], Bs[buf], tm, tn);
        if (more) put(As[buf ^ 1], Bs[buf ^ 1]);   // that buffer was last read before the previous barrier
        __syncthreads();
        buf ^= 1;
    }
}

// --- forward: y[m = (n,p,q), k] = sum_{j=(c,r,s)} A[m, j] * w[k, j], epilogue bias + activation --------------------
template <int BM, int BN, int TM, int TN>
__device__ __forceinline__ void conv_fwd_impl(const float* __restrict__ x, const float* __restrict__ w,
                                              const float* __restrict__ bias, float* __restrict__ y,
                                              const int4* __restrict__ tab, int N, int C, int H, int W, int K,
                                              int P, int Q, int CRS, int stride, int pad, int act) {
    constexpr int DM = BM / TM, DN = BN / TN, NT = DM * DN;
    static_assert(NT % BM == 0, "A loads assume each thread keeps one row");
    const int t = threadIdx.x, tm = t % DM, tn = t / DM;
    const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
    const int PQ = P * Q, M = N * PQ, HW = H * W;

    // the one output pixel this thread gathers A for
    const int ml = t % BM, kl0 = t / BM;
    const int m = m0 + ml;
    const bool mvalid = m < M;
    int h0 = 0, w0 = 0;
    long long base = 0;
    if (mvalid) {
        const int img = m / PQ, pq = m - img * PQ, p = pq / Q, q = pq - p * Q;
        h0 = p * stride - pad;
        w0 = q * stride - pad;
        base = (long long)img * C * HW + (long long)h0 * W + w0;
    }

    constexpr int LA = BM * BK / NT, LB = (BN * BK + NT - 1) / NT;   // values each thread stages per tile
    float ra[LA], rb[LB];
    auto fetch = [&](int k0) {
#pragma unroll
        for (int i = 0; i < LA; ++i) {              // A: column kg of this thread's output pixel, gathered from x
            const int kg = k0 + kl0 + i * (NT / BM);
            float v = 0.f;
            if (mvalid && kg < CRS) {
                const int4 tb = tab[kg];
                const int h = h0 + (tb.y >> 16), ww = w0 + (tb.y & 0xffff);
                if (h >= 0 && h < H && ww >= 0 && ww < W) v = x[base + tb.x];
            }
            ra[i] = v;
        }
#pragma unroll
        for (int i = 0; i < LB; ++i) {              // B: w[n, kg], consecutive threads along kg
            const int e = t + i * NT, kg = k0 + e % BK, n = n0 + e / BK;
            rb[i] = (e < BN * BK && n < K && kg < CRS) ? w[(long long)n * CRS + kg] : 0.f;
        }
    };
    auto put = [&](float (&As)[BK][BM + 1], float (&Bs)[BK][BN + 1]) {
#pragma unroll
        for (int i = 0; i < LA; ++i) As[kl0 + i * (NT / BM)][ml] = ra[i];
#pragma unroll
        for (int i = 0; i < LB; ++i) {
            const int e = t + i * NT;
            if (e < BN * BK) Bs[e % BK][e / BK] = rb[i];
        }
    };
    float acc[TM][TN];
    hn_pipelined_gemm<BM, BN, TM, TN>(acc, 0, CRS, tm, tn, fetch, put, [](const float (&)[BK][BM + 1]) {});
#pragma unroll
    for (int i = 0; i < TM; ++i) {
        const int mm = m0 + tm + i * DM;
        if (mm >= M) continue;
        const int img = mm / PQ, pq = mm - img * PQ;
        float* yrow = y + (long long)img * K * PQ + pq;
#pragma unroll
        for (int j = 0; j < TN; ++j) {
            const int n = n0 + tn + j * DN;
            if (n >= K) continue;
            float v = acc[i][j];
            if (bias) v += bias[n];
            if (act == HN_RELU) v = fmaxf(v, 0.f);
            yrow[(long long)n * PQ] = v;
        }
    }
}

// --- backward data: dx[m = (n,h,w), c] = sum_{j=(k,r,s)} dy[n,k,(h+pad-r)/st,(w+pad-s)/st] * w[k,c,r,s] -----------
// Epilogue: when relu_x is given (the input x of this layer is a ReLU output), dx = 0 where relu_x <= 0, so the
// ReLU's backward is fused here.
template <int BM, int BN, int TM, int TN>
__device__ __forceinline__ void conv_bwd_data_impl(const float* __restrict__ dy, const float* __restrict__ w,
                                                   const float* __restrict__ relu_x, float* __restrict__ dx,
                                                   const int4* __restrict__ tab, int N, int C, int H, int W, int K,
                                                   int P, int Q, int KRS, int stride, int pad) {
    constexpr int DM = BM / TM, DN = BN / TN, NT = DM * DN;
    static_assert(NT % BM == 0, "A loads assume each thread keeps one row");
    const int t = threadIdx.x, tm = t % DM, tn = t / DM;
    const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
    const int PQ = P * Q, HW = H * W, M = N * HW, RS = KRS / K;

    const int ml = t % BM, kl0 = t / BM;
    const int m = m0 + ml;
    const bool mvalid = m < M;
    int hp = 0, wp = 0;
    long long base = 0;
    if (mvalid) {
        const int img = m / HW, hw = m - img * HW, h = hw / W, ww = hw - h * W;
        hp = h + pad;
        wp = ww + pad;
        base = (long long)img * K * PQ;
    }

    constexpr int LA = BM * BK / NT, LB = (BN * BK + NT - 1) / NT;
    float ra[LA], rb[LB];
    auto fetch = [&](int k0) {
#pragma unroll
        for (int i = 0; i < LA; ++i) {              // A: dy at the output pixel that tap (k, r, s) reads from here
            const int kg = k0 + kl0 + i * (NT / BM);
            float v = 0.f;
            if (mvalid && kg < KRS) {
                const int4 tb = tab[kg];
                int ph = hp - (tb.y >> 16), pw = wp - (tb.y & 0xffff);
                if (ph >= 0 && pw >= 0) {
                    bool ok = true;
                    if (stride != 1) {      // one division each (no remainder): keeps sm_80 free of spills
                        const int qh = ph / stride, qw = pw / stride;
                        ok = qh * stride == ph && qw * stride == pw;
                        ph = qh;
                        pw = qw;
                    }
                    if (ok && ph < P && pw < Q) v = dy[base + tb.x + ph * Q + pw];
                }
            }
            ra[i] = v;
        }
#pragma unroll
        for (int i = 0; i < LB; ++i) {              // B: w[k, n, r, s] for kg = (k, r, s)
            const int e = t + i * NT, kg = k0 + e % BK, n = n0 + e / BK;
            rb[i] = (e < BN * BK && n < C && kg < KRS) ? w[tab[kg].z + (long long)n * RS] : 0.f;
        }
    };
    auto put = [&](float (&As)[BK][BM + 1], float (&Bs)[BK][BN + 1]) {
#pragma unroll
        for (int i = 0; i < LA; ++i) As[kl0 + i * (NT / BM)][ml] = ra[i];
#pragma unroll
        for (int i = 0; i < LB; ++i) {
            const int e = t + i * NT;
            if (e < BN * BK) Bs[e % BK][e / BK] = rb[i];
        }
    };
    float acc[TM][TN];
    hn_pipelined_gemm<BM, BN, TM, TN>(acc, 0, KRS, tm, tn, fetch, put, [](const float (&)[BK][BM + 1]) {});
#pragma unroll
    for (int i = 0; i < TM; ++i) {
        const int mm = m0 + tm + i * DM;
        if (mm >= M) continue;
        const int img = mm / HW, hw = mm - img * HW;
        const long long row = (long long)img * C * HW + hw;
#pragma unroll
        for (int j = 0; j < TN; ++j) {
            const int n = n0 + tn + j * DN;
            if (n >= C) continue;
            const long long idx = row + (long long)n * HW;
            float v = acc[i][j];
            if (relu_x && relu_x[idx] <= 0.f) v = 0.f;
            dx[idx] = v;
        }
    }
}

// --- backward filter: dw[k, j=(c,r,s)] += sum_{i=(n,p,q)} dy[n,k,p,q] * x[n,c,p*st-pad+r,q*st-pad+s] ---------------
// Split over i (blockIdx.z): each block adds its partial sums with atomics, so the result accumulates into dw as the
// interface asks. db[k] += sum_i dy[n,k,p,q] is added by the blocks of the first column tile.
template <int BM, int BN, int TM, int TN>
__device__ __forceinline__ void conv_bwd_filter_impl(const float* __restrict__ dy, const float* __restrict__ x,
                                                     float* __restrict__ dw, float* __restrict__ db,
                                                     const int4* __restrict__ tab, int N, int C, int H, int W,
                                                     int K, int P, int Q, int CRS, int stride, int pad, int chunk) {
    constexpr int DM = BM / TM, DN = BN / TN, NT = DM * DN;
    static_assert(NT % BK == 0, "loads assume each thread keeps one reduction index");
    const int t = threadIdx.x, tm = t % DM, tn = t / DM;
    const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
    const int PQ = P * Q, HW = H * W, NPQ = N * PQ;
    const int i_begin = blockIdx.z * chunk, i_end = min(NPQ, i_begin + chunk);
    const bool do_db = db != nullptr && blockIdx.y == 0;
    const int kl = t % BK, r0 = t / BK;

    constexpr int LA = (BM * BK + NT - 1) / NT, LB = (BN * BK + NT - 1) / NT;
    float ra[LA], rb[LB];
    auto fetch = [&](int k0) {                      // this thread's reduction index: output pixel ig = (img, p, q)
        const int ig = k0 + kl;
        const bool ivalid = ig < i_end;
        int img = 0, p = 0, q = 0;
        if (ivalid) {
            img = ig / PQ;
            const int pq = ig - img * PQ;
            p = pq / Q;
            q = pq - p * Q;
        }
        const long long dybase = (long long)img * K * PQ + p * Q + q;
        const int h0 = p * stride - pad, w0 = q * stride - pad;
        const long long xbase = (long long)img * C * HW + (long long)h0 * W + w0;
#pragma unroll
        for (int i = 0; i < LA; ++i) {              // A: dy[img, k, p, q] for the block's filters k
            const int ml = r0 + i * (NT / BK), mg = m0 + ml;
            ra[i] = (ml < BM && ivalid && mg < K) ? dy[dybase + (long long)mg * PQ] : 0.f;
        }
#pragma unroll
        for (int i = 0; i < LB; ++i) {              // B: x under tap ng = (c, r, s)
            const int nl = r0 + i * (NT / BK), ng = n0 + nl;
            float v = 0.f;
            if (nl < BN && ivalid && ng < CRS) {
                const int4 tb = tab[ng];
                const int h = h0 + (tb.y >> 16), ww = w0 + (tb.y & 0xffff);
                if (h >= 0 && h < H && ww >= 0 && ww < W) v = x[xbase + tb.x];
            }
            rb[i] = v;
        }
    };
    auto put = [&](float (&As)[BK][BM + 1], float (&Bs)[BK][BN + 1]) {
#pragma unroll
        for (int i = 0; i < LA; ++i) {
            const int ml = r0 + i * (NT / BK);
            if (ml < BM) As[kl][ml] = ra[i];
        }
#pragma unroll
        for (int i = 0; i < LB; ++i) {
            const int nl = r0 + i * (NT / BK);
            if (nl < BN) Bs[kl][nl] = rb[i];
        }
    };
    float dbacc = 0.f;
    auto sum_db = [&](const float (&As)[BK][BM + 1]) {
        if (do_db && t < BM) {
#pragma unroll
            for (int kk = 0; kk < BK; ++kk) dbacc += As[kk][t];
        }
    };
    float acc[TM][TN];
    hn_pipelined_gemm<BM, BN, TM, TN>(acc, i_begin, i_end, tm, tn, fetch, put, sum_db);
#pragma unroll
    for (int i = 0; i < TM; ++i) {
        const int mm = m0 + tm + i * DM;
        if (mm >= K) continue;
#pragma unroll
        for (int j = 0; j < TN; ++j) {
            const int n = n0 + tn + j * DN;
            if (n < CRS) atomicAdd(dw + (long long)mm * CRS + n, acc[i][j]);
        }
    }
    if (do_db && t < BM && m0 + t < K) atomicAdd(db + m0 + t, dbacc);
}

// Tile configurations <BM, BN, TM, TN>, all 256 threads: the launcher picks one per shape (by measurement).
#define HN_FWD(name, BM_, BN_, TM_, TN_)                                                                           \
    extern "C" __global__ void __launch_bounds__(256) conv_fwd_##name(                                             \
        const float* x, const float* w, const float* bias, float* y, const int4* tab, int N, int C, int H, int W, \
        int K, int P, int Q, int CRS, int stride, int pad, int act) {                                              \
        conv_fwd_impl<BM_, BN_, TM_, TN_>(x, w, bias, y, tab, N, C, H, W, K, P, Q, CRS, stride, pad, act);         \
    }
// BOUNDS_: the __launch_bounds__ arguments; (256, 3) makes ptxas budget 85 registers for the 64x64 data kernel, which
// it otherwise squeezes into 64 on sm_80, with a spill
#define HN_BWD_DATA(name, BM_, BN_, TM_, TN_, BOUNDS_)                                                             \
    extern "C" __global__ void __launch_bounds__ BOUNDS_ conv_bwd_data_##name(                                     \
        const float* dy, const float* w, const float* relu_x, float* dx, const int4* tab, int N, int C, int H,     \
        int W, int K, int P, int Q, int KRS, int stride, int pad) {                                                \
        conv_bwd_data_impl<BM_, BN_, TM_, TN_>(dy, w, relu_x, dx, tab, N, C, H, W, K, P, Q, KRS, stride, pad);     \
    }
#define HN_BWD_FILTER(name, BM_, BN_, TM_, TN_)                                                                    \
    extern "C" __global__ void __launch_bounds__(256) conv_bwd_filter_##name(                                      \
        const float* dy, const float* x, float* dw, float* db, const int4* tab, int N, int C, int H, int W, int K, \
        int P, int Q, int CRS, int stride, int pad, int chunk) {                                                   \
        conv_bwd_filter_impl<BM_, BN_, TM_, TN_>(dy, x, dw, db, tab, N, C, H, W, K, P, Q, CRS, stride, pad, chunk); \
    }

HN_FWD(64x64, 64, 64, 4, 4)
HN_FWD(128x32, 128, 32, 4, 4)
HN_FWD(128x16, 128, 16, 4, 2)
HN_FWD(256x16, 256, 16, 8, 2)
HN_FWD(64x32, 64, 32, 4, 2)     // smaller tiles: more blocks for small batches
HN_FWD(64x16, 64, 16, 4, 1)
HN_BWD_DATA(64x64, 64, 64, 4, 4, (256, 3))
HN_BWD_DATA(128x32, 128, 32, 4, 4, (256))
HN_BWD_DATA(128x16, 128, 16, 4, 2, (256))
HN_BWD_DATA(64x32, 64, 32, 2, 4, (256))
HN_BWD_DATA(64x16, 64, 16, 2, 2, (256))
HN_BWD_FILTER(32x64, 32, 64, 2, 4)
HN_BWD_FILTER(16x64, 16, 64, 1, 4)
HN_BWD_FILTER(64x64, 64, 64, 4, 4)
HN_BWD_FILTER(16x32, 16, 32, 1, 2)  // short filters (C*R*S = 9, 27)
HN_BWD_FILTER(32x32, 32, 32, 2, 2)

// --- im2col path ---------------------------------------------------------------------------------------------------

// col[j, m] = xpad[n, c, p*st - pad + r, q*st - pad + s] for j = (c,r,s), m = (n,p,q); col is [CRS, N*P*Q].
extern "C" __global__ void im2col(const float* __restrict__ x, float* __restrict__ col, const int4* __restrict__ tab,
                                  int N, int C, int H, int W, int P, int Q, int CRS, int stride, int pad) {
    const long long PQ = (long long)P * Q, M = N * PQ;
    HN_GRID_STRIDE(e, M * CRS) {
        const int j = (int)(e / M);
        const long long m = e - j * M;
        const int img = (int)(m / PQ), pq = (int)(m - img * PQ), p = pq / Q, q = pq - p * Q;
        const int4 tb = tab[j];
        const int h0 = p * stride - pad, w0 = q * stride - pad;
        const int h = h0 + (tb.y >> 16), ww = w0 + (tb.y & 0xffff);
        float v = 0.f;
        if (h >= 0 && h < H && ww >= 0 && ww < W) v = x[(long long)img * C * H * W + (long long)h0 * W + w0 + tb.x];
        col[e] = v;
    }
}

// y[n, k, pq] = act(yk[k, n*PQ + pq] + b[k])     (GEMM output [K, NPQ] to NCHW, bias and activation fused)
extern "C" __global__ void km_to_nchw_bias_act(const float* __restrict__ yk, const float* __restrict__ bias,
                                               float* __restrict__ y, int N, int K, int PQ, int act) {
    const long long total = (long long)N * K * PQ;
    HN_GRID_STRIDE(e, total) {
        const int pq = (int)(e % PQ);
        const long long nk = e / PQ;
        const int k = (int)(nk % K), n = (int)(nk / K);
        float v = yk[(long long)k * N * PQ + (long long)n * PQ + pq];
        if (bias) v += bias[k];
        if (act == HN_RELU) v = fmaxf(v, 0.f);
        y[e] = v;
    }
}

// dyk[k, n*PQ + pq] = dy[n, k, pq]
extern "C" __global__ void nchw_to_km(const float* __restrict__ dy, float* __restrict__ dyk, int N, int K, int PQ) {
    const long long total = (long long)N * K * PQ;
    HN_GRID_STRIDE(e, total) {
        const int pq = (int)(e % PQ);
        const long long nk = e / PQ;
        const int k = (int)(nk % K), n = (int)(nk / K);
        dyk[(long long)k * N * PQ + (long long)n * PQ + pq] = dy[e];
    }
}

// dx[n,c,h,w] = sum_{r,s: (h+pad-r) % st == 0, ...} dcol[(c,r,s), (n,p,q)]  (gather form: deterministic),
// then the fused ReLU mask as in conv_bwd_data.
extern "C" __global__ void col2im(const float* __restrict__ dcol, const float* __restrict__ relu_x,
                                  float* __restrict__ dx, int N, int C, int H, int W, int P, int Q, int R, int S,
                                  int stride, int pad) {
    const long long HW = (long long)H * W, total = (long long)N * C * HW, M = (long long)N * P * Q;
    HN_GRID_STRIDE(e, total) {
        const int w = (int)(e % W), h = (int)((e / W) % H), c = (int)((e / HW) % C), n = (int)(e / (HW * C));
        float v = 0.f;
        if (!(relu_x && relu_x[e] <= 0.f)) {
            for (int r = 0; r < R; ++r) {
                int ph = h + pad - r;
                if (ph < 0 || ph % stride) continue;
                ph /= stride;
                if (ph >= P) continue;
                for (int s = 0; s < S; ++s) {
                    int pw = w + pad - s;
                    if (pw < 0 || pw % stride) continue;
                    pw /= stride;
                    if (pw >= Q) continue;
                    v += dcol[(long long)((c * R + r) * S + s) * M + (long long)n * P * Q + ph * Q + pw];
                }
            }
        }
        dx[e] = v;
    }
}

// out[c] += sum over n and hw of x[n, c, hw]  (bias gradients); grid (C, splits), float atomics.
extern "C" __global__ void channel_sum(const float* __restrict__ x, float* __restrict__ out, int N, int C, int HW) {
    __shared__ double shm[32];
    const int c = blockIdx.x;
    const long long per = (long long)N * HW;
    double acc = 0.0;
    for (long long i = (long long)blockIdx.y * blockDim.x + threadIdx.x; i < per; i += (long long)gridDim.y * blockDim.x) {
        const long long n = i / HW, hw = i - n * HW;
        acc += x[(n * C + c) * HW + hw];
    }
    acc = hn_block_sum(acc, shm);
    if (threadIdx.x == 0) atomicAdd(out + c, (float)acc);
}

// y[n, k] = act(y[n, k] + b[k]) in place (after a cuBLAS GEMM)
extern "C" __global__ void bias_act_rows(float* __restrict__ y, const float* __restrict__ b, int N, int K, int act) {
    HN_GRID_STRIDE(e, (long long)N * K) {
        float v = y[e];
        if (b) v += b[e % K];
        if (act == HN_RELU) v = fmaxf(v, 0.f);
        y[e] = v;
    }
}

// dx = 0 where relu_x <= 0, in place
extern "C" __global__ void relu_mask_inplace(float* __restrict__ dx, const float* __restrict__ relu_x, long long n) {
    HN_GRID_STRIDE(e, n) {
        if (relu_x[e] <= 0.f) dx[e] = 0.f;
    }
}
