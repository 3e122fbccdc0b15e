// Convolution (and dense layers, as 1x1 convolutions on 1x1 images): forward, backward-data, backward-filter.
//
// Three algorithms (chosen per layer shape by a one-time measurement in conv.py):
//  1. implicit GEMM (conv_fwd_*, conv_bwd_data_*, conv_bwd_filter_*): tiled, shared memory, the "column matrix"
//     is gathered on the fly from x (or dy) into shared memory, never materialised. Each comes in several tile
//     configurations (the table in conv_tiles.py, whose entry points are appended to this text): tile sizes; "v"
//     8x4 (or, 64 threads, 4x4) outputs per thread with float4 shared reads; "a" a cp.async pipeline; "c" a
//     reduction order with the channels inside the taps, which needs no gather table (for layers whose channels
//     fill whole tiles); "s<n>" the block's reduction sliced between n groups of threads and summed in shared
//     memory (hn_pipelined_gemm's KS); and each may split its reduction over blockIdx.z (hn_split_last).
//     benchmarks/conv_algos.py times them per shape; benchmarks/kernels/ keeps the configurations that do not ship.
//  2. im2col + cuBLAS GEMM: im2col / col2im / layout kernels below, the GEMM is cuBLAS through CuPy.
//  3. the forward of a small convolution (C R S <= 32 taps, K <= 64): conv_small_fwd, direct, its taps and weights in
//     shared memory.
//
// Shapes: x[N,C,H,W], w[K,C,R,S], y[N,K,P,Q]; CRS = C*R*S, PQ = P*Q.
// Gather tables (built once per shape on the host; the "c" tiles do without): tab[j] for j over CRS (forward /
// filter gradient)
//   .x = c*H*W + r*W + s   (offset into one image of x)   .y = r << 16 | s
// and for j over K*R*S (data gradient)
//   .x = k*P*Q             (offset into one image of dy)  .y = r << 16 | s   .z = (k*C)*R*S + r*S + s (into w, + c*R*S)
#include "common.cuh"

#define BK 16

// --- the main loop all three implicit-GEMM kernels share ------------------------------------------------------------
// acc[TM][TN] (this thread's TM x TN outputs of the block's BM x BN tile) += A[m, kk] * B[kk, n] over the reduction
// range [k_begin, k_end), BK at a time, the tiles staged in shared memory by one of two pipelines
// (hn_pipelined_gemm below); on_tile(As) sees each A tile before it is used (the filter gradient sums db there).
//
// Which rows thread tm owns (hn_owned; columns likewise with TN, DN, tn). With 32 or more outputs per thread (the
// "v" configurations: 8x4, 4x8), or 4x4 in blocks of 64 threads (the "v" 32x32 ones), and TM a multiple of 4: TM/4 runs of 4 consecutive rows, DM*4 apart, read from
// shared memory as float4 (one LDS.128 feeds 4 rows' FMAs, so the loop is mostly FMAs, as in cuDNN's and CUTLASS's
// SIMT kernels). Otherwise TM single rows, DM apart, read one by one: consecutive threads then also write
// consecutive output rows in the epilogue, which matters when the reduction is short (C*R*S = 27: two tiles).
// Shared rows are padded (hn_ld) so that the scattered stores of the tile loads spread over the banks: by 4 floats
// where rows are read as float4 (keeps the 16-byte alignment), by 1 otherwise.
__host__ __device__ constexpr bool hn_vec(int bm, int bn, int tm, int tn) {
    return tm * tn >= 32 || (tm * tn == 16 && (bm / tm) * (bn / tn) == 64);
}
__host__ __device__ constexpr int hn_ld(int b, int t, bool vec) { return b + (vec && t % 4 == 0 ? 4 : 1); }

template <int T, int D, bool V>
__device__ __forceinline__ int hn_owned(int t, int i) {
    if constexpr (V && T % 4 == 0) return (i / 4) * (D * 4) + t * 4 + (i % 4);
    else return t + i * D;
}

template <int T, int D, bool V, int LD>
__device__ __forceinline__ void hn_read_owned(float (&v)[T], const float (&row)[LD], int t) {
    if constexpr (V && T % 4 == 0) {
#pragma unroll
        for (int g = 0; g < T / 4; ++g) {
            const float4 f = *reinterpret_cast<const float4*>(&row[g * D * 4 + t * 4]);
            v[4 * g] = f.x;
            v[4 * g + 1] = f.y;
            v[4 * g + 2] = f.z;
            v[4 * g + 3] = f.w;
        }
    } else {
#pragma unroll
        for (int i = 0; i < T; ++i) v[i] = row[t + i * D];
    }
}

template <int BM, int BN, int TM, int TN>
__device__ __forceinline__ void hn_tile_mma(float (&acc)[TM][TN],
                                            const float (&As)[BK][hn_ld(BM, TM, hn_vec(BM, BN, TM, TN))],
                                            const float (&Bs)[BK][hn_ld(BN, TN, hn_vec(BM, BN, TM, TN))], int tm,
                                            int tn) {
    constexpr int DM = BM / TM, DN = BN / TN;
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
        float a[TM], b[TN];
        hn_read_owned<TM, DM, hn_vec(BM, BN, TM, TN)>(a, As[kk], tm);
        hn_read_owned<TN, DN, hn_vec(BM, BN, TM, TN)>(b, Bs[kk], tn);
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
            for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
}

// A value a thread moves into a shared tile: where it comes from (global) or goes (shared), and whether there is one
// (ok false: a zero -- padding, beyond the matrix -- or, for a destination, no such value for this thread; p is then
// never dereferenced). A flag rather than a null pointer: a null test of a computed 64-bit address costs two compares
// and a select per value, which had made the loops' address work outweigh their FMAs.
struct hn_src {
    const float* p;
    bool ok;
};
struct hn_dst {
    float* p;
    bool ok;
};

// Copy 4 bytes from global to shared memory without a register (sm_80+), or write 0 when !ok (zero-fill: src-size 0
// reads nothing; `any` is just some valid address to name).
__device__ __forceinline__ void hn_cp_async4(float* dst, hn_src src, const float* any) {
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(d), "l"(src.ok ? src.p : any),
                 "r"(src.ok ? 4 : 0));
}
__device__ __forceinline__ void hn_cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void hn_cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// The tile loads are described once per kernel and used by both pipelines below:
//   begin(k0)            per-thread set-up for tile k0 (the filter gradient decodes its output pixel there);
//   a_src(k0, i) / b_src  the i-th value this thread loads for tile k0 (hn_src: not ok for a zero);
//   a_dst(i, As) / b_dst  where that value goes in the shared tile (hn_dst: not ok when this thread has no i-th value).
// STAGES 2: the values go through registers: while the block multiplies the tile in shared memory, the thread's
//   global loads of the next tile are in flight into registers, written to the other buffer after the multiply, so
//   one __syncthreads per tile suffices and load latency hides behind the FMAs.
// STAGES 3 ("a" configurations): cp.async copies global -> shared directly, two tiles ahead of the multiply, with no
//   staging registers (more blocks per SM) and one __syncthreads per tile (the CUTLASS "multistage" loop).
// hn_gemm_loop is that loop over one slice's tiles As / Bs ([STAGES][BK][LD]), sync() the slice's barrier;
// hn_pipelined_gemm (after it) zeroes acc, runs it and adds up the slices.
template <int BM, int BN, int TM, int TN, int LA, int LB, int STAGES, class Begin, class ASrc, class ADst, class BSrc,
          class BDst, class OnTile, class TA, class TB, class Sync>
__device__ __forceinline__ void hn_gemm_loop(float (&acc)[TM][TN], int k_begin, int k_end, int tm, int tn,
                                             Begin begin, ASrc a_src, ADst a_dst, BSrc b_src, BDst b_dst,
                                             OnTile on_tile, const float* any, TA& As, TB& Bs, Sync sync) {
    if constexpr (STAGES == 2) {
        float ra[LA], rb[LB];
        auto fetch = [&](int k0) {
            begin(k0);
#pragma unroll
            for (int i = 0; i < LA; ++i) {
                const hn_src v = a_src(k0, i);
                ra[i] = v.ok ? *v.p : 0.f;
            }
#pragma unroll
            for (int i = 0; i < LB; ++i) {
                const hn_src v = b_src(k0, i);
                rb[i] = v.ok ? *v.p : 0.f;
            }
        };
        auto put = [&](int buf) {
#pragma unroll
            for (int i = 0; i < LA; ++i)
                if (const hn_dst d = a_dst(i, As[buf]); d.ok) *d.p = ra[i];
#pragma unroll
            for (int i = 0; i < LB; ++i)
                if (const hn_dst d = b_dst(i, Bs[buf]); d.ok) *d.p = rb[i];
        };
        fetch(k_begin);
        put(0);
        sync();
        int buf = 0;
        for (int k0 = k_begin; k0 < k_end; k0 += BK) {
            const bool more = k0 + BK < k_end;
            if (more) fetch(k0 + BK);      // in flight during the multiply below
            on_tile(As[buf]);
            hn_tile_mma<BM, BN, TM, TN>(acc, As[buf], Bs[buf], tm, tn);
            if (more) put(buf ^ 1);        // that buffer was last read before the previous barrier
            sync();
            buf ^= 1;
        }
    } else {
        auto issue = [&](int k0, int st) {
            begin(k0);
#pragma unroll
            for (int i = 0; i < LA; ++i)
                if (const hn_dst d = a_dst(i, As[st]); d.ok) hn_cp_async4(d.p, a_src(k0, i), any);
#pragma unroll
            for (int i = 0; i < LB; ++i)
                if (const hn_dst d = b_dst(i, Bs[st]); d.ok) hn_cp_async4(d.p, b_src(k0, i), any);
        };
#pragma unroll
        for (int st = 0; st < STAGES - 1; ++st) {
            if (k_begin + st * BK < k_end) issue(k_begin + st * BK, st);
            hn_cp_async_commit();          // one group per tile, empty ones included, so the count below holds
        }
        int st = 0;
        for (int k0 = k_begin; k0 < k_end; k0 += BK) {
            hn_cp_async_wait<STAGES - 2>();    // this thread's copies of tile k0 have landed ...
            sync();                            // ... everyone's; and everyone is done with the stage refilled next
            const int kn = k0 + (STAGES - 1) * BK;
            if (kn < k_end) issue(kn, st == 0 ? STAGES - 1 : st - 1);
            hn_cp_async_commit();
            on_tile(As[st]);
            hn_tile_mma<BM, BN, TM, TN>(acc, As[st], Bs[st], tm, tn);
            st = st + 1 == STAGES ? 0 : st + 1;
        }
        hn_cp_async_wait<0>();          // (the groups left are empty: nothing lands in the tiles after this)
    }
}

// KS > 1 (sliced reduction, "s<KS>" configurations): the block is KS slices of (BM/TM)*(BN/TN) threads; slice
// `slice` runs this loop over its own part [k_begin, k_end) of the block's reduction, in its own shared tiles, and
// syncs with a named barrier of its own warps only (slices may run different tile counts). At the end the slices'
// sums are added in shared memory, in slice order (deterministic), into slice 0's acc. For grids too small to fill
// the SMs (thesis-m4's 12x12 convolution at batch 32: 144 tiles of 32x32) this cuts each warp's serial chain of
// tiles by KS without atomics, as CUTLASS's "sliced-k" does.
// Named barrier `id` (1..15; 0 is __syncthreads') for `count` threads, a multiple of 32: one slice's warps.
__device__ __forceinline__ void hn_bar_sync(int id, int count) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}

template <int BM, int BN, int TM, int TN, int LA, int LB, int STAGES, int KS = 1, class Begin, class ASrc, class ADst,
          class BSrc, class BDst, class OnTile>
__device__ __forceinline__ void hn_pipelined_gemm(float (&acc)[TM][TN], int k_begin, int k_end, int tm, int tn,
                                                  Begin begin, ASrc a_src, ADst a_dst, BSrc b_src, BDst b_dst,
                                                  OnTile on_tile, const float* any, int slice = 0) {
    constexpr int LDA = hn_ld(BM, TM, hn_vec(BM, BN, TM, TN)), LDB = hn_ld(BN, TN, hn_vec(BM, BN, TM, TN));
    constexpr int NT = (BM / TM) * (BN / TN);
    static_assert(KS == 1 || (NT % 32 == 0 && KS <= 15), "slices are whole warps, one named barrier each");
    static_assert((KS - 1) * BM * BN <= KS * STAGES * BK * LDA, "the slices' sums are added in the A tiles");
    __shared__ __align__(16) float As_[KS][STAGES][BK][LDA];
    __shared__ __align__(16) float Bs_[KS][STAGES][BK][LDB];
    auto& As = As_[slice];
    auto& Bs = Bs_[slice];
    auto sync = [&] {
        if constexpr (KS == 1) __syncthreads();
        else hn_bar_sync(1 + slice, NT);
    };
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = 0.f;
    if (k_begin < k_end) hn_gemm_loop<BM, BN, TM, TN, LA, LB, STAGES>(acc, k_begin, k_end, tm, tn, begin, a_src,
                                                                       a_dst, b_src, b_dst, on_tile, any, As, Bs,
                                                                       sync);
    if constexpr (KS > 1) {
        float* red = &As_[0][0][0][0];          // [slice - 1][i][j][thread]
        const int t = tm + tn * (BM / TM);      // (any one-to-one numbering of the slice's threads serves)
        __syncthreads();                        // every slice is done with its tiles
        if (slice > 0) {
#pragma unroll
            for (int i = 0; i < TM; ++i)
#pragma unroll
                for (int j = 0; j < TN; ++j) red[(((slice - 1) * TM + i) * TN + j) * NT + t] = acc[i][j];
        }
        __syncthreads();
        if (slice == 0) {
            for (int z = 1; z < KS; ++z)
#pragma unroll
                for (int i = 0; i < TM; ++i)
#pragma unroll
                    for (int j = 0; j < TN; ++j) acc[i][j] += red[(((z - 1) * TM + i) * TN + j) * NT + t];
        }
    }
}

// n / d by a multiply-high instead of a division (Granlund & Montgomery; CUTLASS's FastDivmod), for 0 <= n < 2^31
// and 1 <= d < 2^31: l = ceil(log2 d), m = floor(2^32 (2^l - d) / d) + 1 (< 2^32), n / d = (umulhi(n, m) + n) >> l.
// Set up once per thread (one 64-bit division); each use is three instructions instead of some twenty.
struct hn_divider {
    unsigned mul, shift;
    __device__ explicit hn_divider(int d) : shift(0) {
        while ((1u << shift) < (unsigned)d) ++shift;
        mul = (unsigned)((((1ull << shift) - (unsigned)d) << 32) / (unsigned)d + 1);
    }
    __device__ int operator()(int n) const { return (int)((__umulhi((unsigned)n, mul) + (unsigned)n) >> shift); }
};

// The "c" configurations' reduction order: taps (r, s) outside, channels inside, BK channels per tile. Advance
// (first channel c0, r, s) by one tile (nc channels per tap, a multiple of BK); start from c0 = -BK, r = s = 0.
__device__ __forceinline__ void hn_next_tile_tap(int& c0, int& r, int& s, int nc, int S) {
    c0 += BK;
    if (c0 == nc) {
        c0 = 0;
        if (++s == S) {
            s = 0;
            ++r;
        }
    }
}

// Split reduction ("<cfg>/<splits>" candidates in conv.py: layers whose grid alone would leave the SMs short of
// warps, e.g. thesis-m4's 12x12 convolution at batch 32 has 144 tiles of 32x32). blockIdx.z = split z of gridDim.z,
// each summing `chunk` (a multiple of BK) of the reduction. Every split adds its partial sums into the output, which
// the launcher zeroed, with atomics (so the rounding order may differ between runs, as with the filter gradient's);
// the split that arrives last at the tile's counter applies the epilogue (bias + activation, or the ReLU mask) to the
// sums. No split waits for another, and there is no workspace. `tickets`: one counter per tile, zero before the
// launch and reset to zero by the tile's last split.
__device__ __forceinline__ bool hn_split_last(int* tickets, int tile) {
    __shared__ bool last;
    __threadfence();                    // this block's adds reach L2 before its arrival is counted
    __syncthreads();
    if (threadIdx.x == 0) {
        last = atomicAdd(&tickets[tile], 1) == (int)gridDim.z - 1;
        if (last) tickets[tile] = 0;
    }
    __syncthreads();
    if (last) __threadfence();          // ... and the last one reads the others' adds after their counts (__ldcg)
    return last;
}

// The "c" order's start at reduction index k_begin (a multiple of BK): (c0, r, s) one tile before it, as
// hn_next_tile_tap expects.
__device__ __forceinline__ void hn_tile_tap_at(int k_begin, int nc, int S, int& c0, int& r, int& s) {
    const int t0 = k_begin / BK, per_tap = nc / BK, tap = t0 / per_tap;
    c0 = (t0 - tap * per_tap) * BK - BK;
    r = tap / S;
    s = tap - r * S;
}

// A sliced block's (KS > 1) part of the reduction range [k_begin, k_end): slice `slice` of KS takes the next
// ceil(tiles / KS) whole tiles (the last slices may get fewer, or none).
template <int KS>
__device__ __forceinline__ void hn_slice_range(int& k_begin, int& k_end, int slice) {
    if constexpr (KS > 1) {
        const int per = (k_end - k_begin + KS * BK - 1) / (KS * BK) * BK;
        k_begin = min(k_end, k_begin + slice * per);
        k_end = min(k_end, k_begin + per);
    }
}

// f(&out[img, n, pix], n, acc[i][j]) for each of this thread's outputs of the BM x BN tile at (m0, n0): rows
// m = (img, pix) of M = images x `plane` pixels, columns n < cols; out is NCHW, out[img, n, pix] at
// (img * cols + n) * plane + pix (the forward's y: plane P*Q, cols K; the data gradient's dx: H*W, C).
template <int BM, int BN, int TM, int TN, class F>
__device__ __forceinline__ void hn_each_output(const float (&acc)[TM][TN], float* out, int m0, int n0, int tm, int tn,
                                               int M, int plane, int cols, F f) {
    constexpr int DM = BM / TM, DN = BN / TN;
    constexpr bool V = hn_vec(BM, BN, TM, TN);
#pragma unroll
    for (int i = 0; i < TM; ++i) {
        const int mm = m0 + hn_owned<TM, DM, V>(tm, i);
        if (mm >= M) continue;
        const int img = mm / plane, pix = mm - img * plane;
        float* row = out + (long long)img * cols * plane + pix;
#pragma unroll
        for (int j = 0; j < TN; ++j) {
            const int n = n0 + hn_owned<TN, DN, V>(tn, j);
            if (n < cols) f(row + (long long)n * plane, n, acc[i][j]);
        }
    }
}

// The end of a forward / data-gradient block. outputs(f) calls f(out, column, sum) for each of this thread's outputs
// (out: its address); epilogue(out, column, v) gives the value stored from the total v. Unsplit, slice 0 stores
// epilogue(its sums). Split over blockIdx.z (hn_split_last): every split adds slice 0's sums into the zeroed output
// with atomics, and the last to arrive applies the epilogue to the totals.
template <class Outputs, class Epilogue>
__device__ __forceinline__ void hn_store_outputs(Outputs outputs, Epilogue epilogue, int slice, int* tickets) {
    const bool split = gridDim.z > 1;
    if (split) {
        if (slice == 0) outputs([](float* o, int, float v) { atomicAdd(o, v); });
        if (!hn_split_last(tickets, blockIdx.x + blockIdx.y * gridDim.x)) return;
    }
    if (slice != 0) return;            // slice 0 holds the block's sums
    outputs([&](float* o, int n, float v) { *o = epilogue(o, n, split ? __ldcg(o) : v); });
}

// --- forward: y[m = (n,p,q), k] = sum_{j=(c,r,s)} A[m, j] * w[k, j], epilogue bias + activation --------------------
template <int BM, int BN, int TM, int TN, int STAGES, bool CI, int KS>
__device__ __forceinline__ void conv_fwd_impl(const float* __restrict__ x, const float* __restrict__ w,
                                              const float* __restrict__ bias, float* __restrict__ y,
                                              const int4* __restrict__ tab, int N, int C, int H, int W, int K,
                                              int P, int Q, int CRS, int stride, int pad, int S, int act,
                                              int chunk, int* tickets) {
    constexpr int DM = BM / TM, DN = BN / TN, NT = DM * DN;
    constexpr int LDA = hn_ld(BM, TM, hn_vec(BM, BN, TM, TN)), LDB = hn_ld(BN, TN, hn_vec(BM, BN, TM, TN));
    static_assert(NT % BM == 0, "A loads assume each thread keeps one row");
    const int t = threadIdx.x % NT, slice = threadIdx.x / NT, tm = t % DM, tn = t / DM;   // KS slices of NT
    const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
    const int PQ = P * Q, M = N * PQ, HW = H * W;
    int k_begin = blockIdx.z * chunk, k_end = min(CRS, k_begin + chunk);     // this split's reduction range ...
    hn_slice_range<KS>(k_begin, k_end, slice);                                 // ... and this slice's part of it

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

    constexpr int LA = BM * BK / NT, LB = (BN * BK + NT - 1) / NT;   // values each thread loads per tile
    // CI ("c" configurations, for C % BK == 0): the reduction index runs over the taps (r, s) outside and the
    // channels c inside, j = (r*S + s)*C + c, so a tile's BK columns are one tap and BK consecutive channels: one
    // bounds check per tile instead of one per value, no table, and the values lie H*W apart. begin() advances
    // (c0, r, s) by one tile: it is called once per tile, in order, from the first.
    // B's values in that order: with NT % BK == 0 the thread's i-th value is filter n0 + t/BK + i*NT/BK, channel
    // c0 + t%BK of the tile's tap; w_t (set up once) and tap_w (per tile) keep the address sums out of the loads.
    static_assert(!CI || NT % BK == 0, "channels-inside-taps B loads assume one channel per thread");
    const int RS = CRS / C;
    const float* w_t = w + (long long)(n0 + t / BK) * CRS + (t % BK) * RS;
    int c0, r, s, tap_w = 0;
    hn_tile_tap_at(k_begin, C, S, c0, r, s);
    bool tile_ok = false;
    const float* tile_x = x;
    auto begin = [&](int) {
        if constexpr (CI) {
            hn_next_tile_tap(c0, r, s, C, S);
            tile_ok = mvalid && (unsigned)(h0 + r) < (unsigned)H && (unsigned)(w0 + s) < (unsigned)W;
            tile_x = x + base + (long long)(c0 + kl0) * HW + r * W + s;
            tap_w = c0 * RS + r * S + s;
        }
    };
    auto a_src = [&](int k0, int i) -> hn_src {   // A: column kg of this thread's output pixel, gathered from x
        if constexpr (CI) return {tile_x + i * (NT / BM) * HW, tile_ok};
        const int kg = k0 + kl0 + i * (NT / BM);
        if (mvalid && kg < CRS) {
            const int4 tb = tab[kg];
            const int h = h0 + (tb.y >> 16), ww = w0 + (tb.y & 0xffff);
            return {x + base + tb.x, h >= 0 && h < H && ww >= 0 && ww < W};
        }
        return {x, false};
    };
    auto a_dst = [&](int i, float (&As)[BK][LDA]) -> hn_dst { return {&As[kl0 + i * (NT / BM)][ml], true}; };
    auto b_src = [&](int k0, int i) -> hn_src {   // B: w[n, kg], consecutive threads along kg
        const int e = t + i * NT, kl = e % BK, n = n0 + e / BK;
        if constexpr (CI) return {w_t + (long long)(i * (NT / BK)) * CRS + tap_w, e < BN * BK && n < K};
        const int kg = k0 + kl;
        return {w + (long long)n * CRS + kg, e < BN * BK && n < K && kg < CRS};
    };
    auto b_dst = [&](int i, float (&Bs)[BK][LDB]) -> hn_dst {
        const int e = t + i * NT;
        return {&Bs[e % BK][e / BK], e < BN * BK};
    };
    float acc[TM][TN];
    hn_pipelined_gemm<BM, BN, TM, TN, LA, LB, STAGES, KS>(acc, k_begin, k_end, tm, tn, begin, a_src, a_dst, b_src,
                                                          b_dst, [](const float (&)[BK][LDA]) {}, x, slice);
    auto outputs = [&](auto f) { hn_each_output<BM, BN, TM, TN>(acc, y, m0, n0, tm, tn, M, PQ, K, f); };
    hn_store_outputs(outputs, [&](float*, int n, float v) {
        if (bias) v += bias[n];
        return act == HN_RELU ? fmaxf(v, 0.f) : v;
    }, slice, tickets);
}

// --- backward data: dx[m = (n,h,w), c] = sum_{j=(k,r,s)} dy[n,k,(h+pad-r)/st,(w+pad-s)/st] * w[k,c,r,s] -----------
// Epilogue: when relu_x is given (the input x of this layer is a ReLU output), dx = 0 where relu_x <= 0, so the
// ReLU's backward is fused here.
template <int BM, int BN, int TM, int TN, int STAGES, bool CI, int KS>
__device__ __forceinline__ void conv_bwd_data_impl(const float* __restrict__ dy, const float* __restrict__ w,
                                                   const float* __restrict__ relu_x, float* __restrict__ dx,
                                                   const int4* __restrict__ tab, int N, int C, int H, int W, int K,
                                                   int P, int Q, int KRS, int stride, int pad, int S, int chunk,
                                                   int* tickets) {
    constexpr int DM = BM / TM, DN = BN / TN, NT = DM * DN;
    constexpr int LDA = hn_ld(BM, TM, hn_vec(BM, BN, TM, TN)), LDB = hn_ld(BN, TN, hn_vec(BM, BN, TM, TN));
    static_assert(NT % BM == 0, "A loads assume each thread keeps one row");
    const int t = threadIdx.x % NT, slice = threadIdx.x / NT, tm = t % DM, tn = t / DM;   // as in the forward
    const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
    const int PQ = P * Q, HW = H * W, M = N * HW, RS = KRS / K;
    int k_begin = blockIdx.z * chunk, k_end = min(KRS, k_begin + chunk);     // this split's reduction range ...
    hn_slice_range<KS>(k_begin, k_end, slice);                                 // ... and this slice's part of it

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
    // CI ("c" configurations, for K % BK == 0): as in the forward, taps (r, s) outside and filters k inside,
    // j = (r*S + s)*K + k: one tap per tile, whose source pixel and bounds are worked out once per tile.
    // B's values: the thread's i-th is channel n0 + t%BN of filter k0t + t/BN + i*NT/BN -- consecutive threads
    // along the channels, R*S floats apart in w (along the filters they would be C*R*S apart: 32 cache lines per
    // warp load for 32 channels, against 9 this way)
    static_assert(!CI || NT % BN == 0, "channels-inside-taps B loads assume one channel per thread");
    const float* w_t = w + ((long long)(t / BN) * C + n0 + t % BN) * RS;
    int k0t, r, s, tap_w = 0;
    hn_tile_tap_at(k_begin, K, S, k0t, r, s);
    bool tile_ok = false;
    const float* tile_dy = dy;
    auto begin = [&](int) {
        if constexpr (CI) {
            hn_next_tile_tap(k0t, r, s, K, S);
            int ph = hp - r, pw = wp - s;
            bool ok = mvalid && ph >= 0 && pw >= 0;
            if (ok && stride != 1) {
                const int qh = ph / stride, qw = pw / stride;
                ok = qh * stride == ph && qw * stride == pw;
                ph = qh;
                pw = qw;
            }
            tile_ok = ok && ph < P && pw < Q;
            tile_dy = dy + base + (long long)(k0t + kl0) * PQ + ph * Q + pw;
            tap_w = k0t * C * RS + r * S + s;
        }
    };
    auto a_src = [&](int k0, int i) -> hn_src {   // A: dy at the output pixel that tap (k, r, s) reads from here
        if constexpr (CI) return {tile_dy + i * (NT / BM) * PQ, tile_ok};
        const int kg = k0 + kl0 + i * (NT / BM);
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
                return {dy + base + tb.x + ph * Q + pw, ok && ph < P && pw < Q};
            }
        }
        return {dy, false};
    };
    auto a_dst = [&](int i, float (&As)[BK][LDA]) -> hn_dst { return {&As[kl0 + i * (NT / BM)][ml], true}; };
    auto b_src = [&](int k0, int i) -> hn_src {   // B: w[k, n, r, s] for kg = (k, r, s)
        const int e = t + i * NT;
        if constexpr (CI) return {w_t + (long long)(i * (NT / BN)) * C * RS + tap_w, e < BN * BK && n0 + e % BN < C};
        const int kl = e % BK, n = n0 + e / BK, kg = k0 + kl;
        if (e < BN * BK && n < C && kg < KRS) return {w + tab[kg].z + (long long)n * RS, true};
        return {w, false};
    };
    auto b_dst = [&](int i, float (&Bs)[BK][LDB]) -> hn_dst {
        const int e = t + i * NT;
        if constexpr (CI) return {&Bs[e / BN][e % BN], e < BN * BK};
        return {&Bs[e % BK][e / BK], e < BN * BK};
    };
    float acc[TM][TN];
    hn_pipelined_gemm<BM, BN, TM, TN, LA, LB, STAGES, KS>(acc, k_begin, k_end, tm, tn, begin, a_src, a_dst, b_src,
                                                          b_dst, [](const float (&)[BK][LDA]) {}, dy, slice);
    auto outputs = [&](auto f) { hn_each_output<BM, BN, TM, TN>(acc, dx, m0, n0, tm, tn, M, HW, C, f); };
    hn_store_outputs(outputs, [&](float* o, int, float v) {
        return relu_x && relu_x[o - dx] <= 0.f ? 0.f : v;
    }, slice, tickets);
}

// --- backward filter: dw[k, j=(c,r,s)] += sum_{i=(n,p,q)} dy[n,k,p,q] * x[n,c,p*st-pad+r,q*st-pad+s] ---------------
// Split over i (blockIdx.z): each block adds its partial sums with atomics, so the result accumulates into dw as the
// interface asks. db[k] += sum_i dy[n,k,p,q] is added by the blocks of the first column tile.
template <int BM, int BN, int TM, int TN, int STAGES, bool CI, int KS>
__device__ __forceinline__ void conv_bwd_filter_impl(const float* __restrict__ dy, const float* __restrict__ x,
                                                     float* __restrict__ dw, float* __restrict__ db,
                                                     const int4* __restrict__ tab, int N, int C, int H, int W,
                                                     int K, int P, int Q, int CRS, int stride, int pad, int S,
                                                     int chunk) {
    constexpr int DM = BM / TM, DN = BN / TN, NT = DM * DN;
    constexpr int LDA = hn_ld(BM, TM, hn_vec(BM, BN, TM, TN)), LDB = hn_ld(BN, TN, hn_vec(BM, BN, TM, TN));
    static_assert(NT % BK == 0, "loads assume each thread keeps one reduction index");
    const int t = threadIdx.x % NT, slice = threadIdx.x / NT, tm = t % DM, tn = t / DM;   // as in the forward
    const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
    const int PQ = P * Q, HW = H * W, NPQ = N * PQ;
    int i_begin = blockIdx.z * chunk, i_end = min(NPQ, i_begin + chunk);
    hn_slice_range<KS>(i_begin, i_end, slice);
    const bool do_db = db != nullptr && blockIdx.y == 0;
    const int kl = t % BK, r0 = t / BK;

    constexpr int LA = (BM * BK + NT - 1) / NT, LB = (BN * BK + NT - 1) / NT;
    // CI ("c" configurations, for C % BN == 0): the columns are ordered taps outside, channels inside,
    // j = (r*S + s)*C + c, so all of this block's columns are one tap (r_b, s_b) and BN consecutive channels from
    // c_b: one bounds check per tile, values H*W apart; the epilogue maps j back to dw's (c, r, s) order.
    const int rs_b = CI ? n0 / C : 0, c_b = CI ? n0 - rs_b * C : 0, r_b = CI ? rs_b / S : 0, s_b = rs_b - r_b * S;
    bool ivalid = false, tap_ok = false;             // this thread's reduction index: output pixel ig = (img, p, q)
    long long dybase = 0, xbase = 0;
    int h0 = 0, w0 = 0;
    const hn_divider by_pq(PQ), by_q(Q);                // a new pixel each tile: decoded without divisions
    auto begin = [&](int k0) {
        const int ig = k0 + kl;
        ivalid = ig < i_end;
        int img = 0, p = 0, q = 0;
        if (ivalid) {
            img = by_pq(ig);
            const int pq = ig - img * PQ;
            p = by_q(pq);
            q = pq - p * Q;
        }
        dybase = (long long)img * K * PQ + p * Q + q;
        h0 = p * stride - pad;
        w0 = q * stride - pad;
        xbase = (long long)img * C * HW + (long long)h0 * W + w0;
        if constexpr (CI) tap_ok = ivalid && (unsigned)(h0 + r_b) < (unsigned)H && (unsigned)(w0 + s_b) < (unsigned)W;
    };
    auto a_src = [&](int, int i) -> hn_src {      // A: dy[img, k, p, q] for the block's filters k
        const int mg = m0 + r0 + i * (NT / BK);
        return {dy + dybase + (long long)mg * PQ, ivalid && mg < K};
    };
    auto a_dst = [&](int i, float (&As)[BK][LDA]) -> hn_dst {
        const int ml = r0 + i * (NT / BK);
        return {&As[kl][ml], ml < BM};
    };
    auto b_src = [&](int, int i) -> hn_src {      // B: x under tap ng = (c, r, s)
        if constexpr (CI) {
            const int nl = r0 + i * (NT / BK);
            return {x + xbase + (long long)(c_b + nl) * HW + r_b * W + s_b, nl < BN && tap_ok};
        }
        // (the forward's gather of x, written out again: through a shared helper ptxas allocated the filter
        // kernels' registers differently, 32x32v 96 -> 121)
        const int ng = n0 + r0 + i * (NT / BK);
        if (ivalid && ng < CRS) {
            const int4 tb = tab[ng];
            const int h = h0 + (tb.y >> 16), ww = w0 + (tb.y & 0xffff);
            return {x + xbase + tb.x, h >= 0 && h < H && ww >= 0 && ww < W};
        }
        return {x, false};
    };
    auto b_dst = [&](int i, float (&Bs)[BK][LDB]) -> hn_dst {
        const int nl = r0 + i * (NT / BK);
        return {&Bs[kl][nl], nl < BN};
    };
    float dbacc = 0.f;
    auto sum_db = [&](const float (&As)[BK][LDA]) {
        if (do_db && t < BM) {
#pragma unroll
            for (int kk = 0; kk < BK; ++kk) dbacc += As[kk][t];
        }
    };
    float acc[TM][TN];
    hn_pipelined_gemm<BM, BN, TM, TN, LA, LB, STAGES, KS>(acc, i_begin, i_end, tm, tn, begin, a_src, a_dst, b_src,
                                                          b_dst, sum_db, x, slice);
    if (do_db && t < BM && m0 + t < K) atomicAdd(db + m0 + t, dbacc);     // each slice its own sum
    if (slice != 0) return;            // slice 0 holds the block's dw sums
#pragma unroll
    for (int i = 0; i < TM; ++i) {
        const int mm = m0 + hn_owned<TM, DM, hn_vec(BM, BN, TM, TN)>(tm, i);
        if (mm >= K) continue;
#pragma unroll
        for (int j = 0; j < TN; ++j) {
            const int nl = hn_owned<TN, DN, hn_vec(BM, BN, TM, TN)>(tn, j), n = n0 + nl;
            if constexpr (CI)
                atomicAdd(dw + (long long)mm * CRS + (c_b + nl) * (CRS / C) + rs_b, acc[i][j]);
            else if (n < CRS)
                atomicAdd(dw + (long long)mm * CRS + n, acc[i][j]);
        }
    }
}

// The tile configurations' entry points: one line per tile, HN_FWD(name, BM, BN, TM, TN, STAGES, CI, KS, (launch
// bounds)) and likewise, generated from the table in conv_tiles.py (which also gives conv.py its launch sizes) and
// appended to this file's text when it is compiled (kernels.source); (BM/TM) * (BN/TN) * KS threads.
// The launch bounds' blocks per SM, where the table gives them, set ptxas's register budget: without them it squeezes
// some of these kernels into fewer registers, with spills (the 64x64 data variant: 64 registers and a spill on
// sm_80, 85 with (256, 3); the forward 128x32vc variant: 96 and a spill on sm_90 without its (128, 4)).
#define HN_FWD(name, BM_, BN_, TM_, TN_, ST_, CI_, KS_, BOUNDS_)                                                        \
    extern "C" __global__ void __launch_bounds__ BOUNDS_ conv_fwd_##name(                                          \
        const float* x, const float* w, const float* bias, float* y, const int4* tab, int N, int C, int H, int W, \
        int K, int P, int Q, int CRS, int stride, int pad, int S, int act, int chunk, int* tickets) {              \
        conv_fwd_impl<BM_, BN_, TM_, TN_, ST_, CI_, KS_>(x, w, bias, y, tab, N, C, H, W, K, P, Q, CRS, stride,     \
                                                         pad, S, act, chunk, tickets);                             \
    }
#define HN_BWD_DATA(name, BM_, BN_, TM_, TN_, ST_, CI_, KS_, BOUNDS_)                                                   \
    extern "C" __global__ void __launch_bounds__ BOUNDS_ conv_bwd_data_##name(                                     \
        const float* dy, const float* w, const float* relu_x, float* dx, const int4* tab, int N, int C, int H,     \
        int W, int K, int P, int Q, int KRS, int stride, int pad, int S, int chunk, int* tickets) {                \
        conv_bwd_data_impl<BM_, BN_, TM_, TN_, ST_, CI_, KS_>(dy, w, relu_x, dx, tab, N, C, H, W, K, P, Q, KRS,    \
                                                              stride, pad, S, chunk, tickets);                     \
    }
#define HN_BWD_FILTER(name, BM_, BN_, TM_, TN_, ST_, CI_, KS_, BOUNDS_)                                                 \
    extern "C" __global__ void __launch_bounds__ BOUNDS_ conv_bwd_filter_##name(                                   \
        const float* dy, const float* x, float* dw, float* db, const int4* tab, int N, int C, int H, int W, int K, \
        int P, int Q, int CRS, int stride, int pad, int S, int chunk) {                                            \
        conv_bwd_filter_impl<BM_, BN_, TM_, TN_, ST_, CI_, KS_>(dy, x, dw, db, tab, N, C, H, W, K, P, Q, CRS,      \
                                                                stride, pad, S, chunk);                            \
    }

// --- small convolutions: a direct forward (conv.py's "small") ------------------------------------------------------

// y = act(conv2d(x, w) + b) for C R S <= 32 taps a pixel and K <= 64 outputs, a multiple of 8 (cifar-wide's first
// layer, 3 -> 64 at 3 x 3). x [n][C][H][W], w [K][C][R][S], b [K] or null, all float32; y = out [n][K][P][Q], float32
// (out16 = 0) or, out16 = 1, bf16 bits (round to nearest even), unsigned short.
// A block's pixels are 128 consecutive output pixels of the n * P * Q (img, p, q) (n P Q + 128 <= 2^31), tap j = (c, r,
// s) in that order. The block stages its pixels' taps in shared memory (xs[j][pixel], zero outside x and for
// j >= CRS) and the weights (wt[j][k], zero for k >= K), a thread's 8 weights' and then its 16 taps' loads each
// issued at once (80 registers at three blocks an SM, no spills). Thread t: channels 8 (t / 32) .. + 7 (warp-uniform, so a
// tap's 8 weights are two broadcast reads) and pixels 4 (t % 32) .. + 3 (one 16-byte read of a tap's 4 values):
// 32 sums of 8 channels x 4 pixels, each a float32 fmaf chain over the taps in order, the bias first; then ReLU
// (act = HN_RELU) and the store, 4 pixels of one image as one 16-byte (float32) or 8-byte (bf16) store where they
// are 4-aligned in the image (P Q a multiple of 4), else one at a time.
extern "C" __global__ void __launch_bounds__(256, 3) conv_small_fwd(const float* __restrict__ x,
                                                                 const float* __restrict__ w,
                                                                 const float* __restrict__ b, void* __restrict__ out,
                                                                 int n, int C, int H, int W, int K, int R, int S,
                                                                 int stride, int pad, int P, int Q, int act,
                                                                 int out16) {
    __shared__ __align__(16) float xs[32][128];
    __shared__ __align__(16) float wt[32][64];
    const int RS = R * S, CRS = C * RS, PQ = P * Q, NP = n * PQ, p0 = blockIdx.x * 128;
    {   // a thread's loads in two rounds, all of a round in flight before its first store: the weights i =
        // threadIdx.x + 256 u, then the taps threadIdx.x / 128 + 2 u of pixel threadIdx.x % 128
        float wv[8], tv[16];
#pragma unroll
        for (int u = 0; u < 8; ++u) {
            const int i = threadIdx.x + 256 * u, j = i >> 6, k = i & 63;
            wv[u] = j < CRS && k < K ? w[k * CRS + j] : 0.f;
        }
#pragma unroll
        for (int u = 0; u < 8; ++u) {
            const int i = threadIdx.x + 256 * u;
            wt[i >> 6][i & 63] = wv[u];
        }
        const int pix = p0 + (threadIdx.x & 127);
        const bool in = pix < NP;
        const int img = in ? pix / PQ : 0, pq = pix - img * PQ, p = pq / Q, q = pq - p * Q;
        const int h0 = p * stride - pad, w0 = q * stride - pad;
        const float* xi = x + (long long)img * C * H * W;
#pragma unroll
        for (int u = 0; u < 16; ++u) {
            const int j = (threadIdx.x >> 7) + 2 * u, c = j / RS, rs = j - c * RS, r = rs / S;
            const int ih = h0 + r, iw = w0 + rs - r * S;
            tv[u] = in && j < CRS && ih >= 0 && ih < H && iw >= 0 && iw < W ? xi[((long long)c * H + ih) * W + iw]
                                                                             : 0.f;
        }
#pragma unroll
        for (int u = 0; u < 16; ++u) xs[(threadIdx.x >> 7) + 2 * u][threadIdx.x & 127] = tv[u];
    }
    __syncthreads();
    const int k0 = 8 * (threadIdx.x >> 5), q0 = 4 * (threadIdx.x & 31);
    if (k0 >= K) return;
    float acc[8][4];
#pragma unroll
    for (int u = 0; u < 8; ++u) {
        const float bias = b ? b[k0 + u] : 0.f;
#pragma unroll
        for (int v = 0; v < 4; ++v) acc[u][v] = bias;
    }
    for (int j = 0; j < CRS; ++j) {
        const float4 t = *reinterpret_cast<const float4*>(&xs[j][q0]);
        const float4 lo = *reinterpret_cast<const float4*>(&wt[j][k0]);
        const float4 hi = *reinterpret_cast<const float4*>(&wt[j][k0 + 4]);
        const float wk[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w}, tv[4] = {t.x, t.y, t.z, t.w};
#pragma unroll
        for (int u = 0; u < 8; ++u)
#pragma unroll
            for (int v = 0; v < 4; ++v) acc[u][v] = fmaf(tv[v], wk[u], acc[u][v]);
    }
    if (act == HN_RELU) {
#pragma unroll
        for (int u = 0; u < 8; ++u)
#pragma unroll
            for (int v = 0; v < 4; ++v) acc[u][v] = fmaxf(acc[u][v], 0.f);
    }
    float* y = static_cast<float*>(out);
    unsigned short* y16 = static_cast<unsigned short*>(out);
    const int pix = p0 + q0, img = pix / PQ, pq = pix - img * PQ;
    const bool whole = pix + 3 < NP && pq + 3 < PQ && (PQ & 3) == 0;     // 4 pixels of one image, 4-aligned
#pragma unroll
    for (int u = 0; u < 8; ++u) {
        if (whole) {
            const long long at = ((long long)img * K + k0 + u) * PQ + pq;
            if (out16)
                *reinterpret_cast<uint2*>(&y16[at]) = make_uint2(hn_bf16x2_bits(acc[u][0], acc[u][1]),
                                                                 hn_bf16x2_bits(acc[u][2], acc[u][3]));
            else
                *reinterpret_cast<float4*>(&y[at]) = make_float4(acc[u][0], acc[u][1], acc[u][2], acc[u][3]);
            continue;
        }
#pragma unroll
        for (int v = 0; v < 4; ++v) {
            const int e = pix + v;
            if (e >= NP) break;
            const int im = e / PQ;
            const long long at = ((long long)im * K + k0 + u) * PQ + (e - im * PQ);
            if (out16)
                y16[at] = (unsigned short)hn_bf16x2_bits(acc[u][v], 0.f);      // the low half: bf16(acc)
            else
                y[at] = acc[u][v];
        }
    }
}

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
    double acc = 0.0;
    for (HnPlaneWalk<long long> w(N, C, HW, c); w.more(); w.next()) acc += x[w.idx];
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

// --- channels-last bf16 copies: the operands of mma.cu's HN_CONV16 convolutions (conv.py's "tc16") ------------------
// y[img][p][c] = bf16(x[img][c][p]) for x [n][C][HW] float32, y as bf16 pairs [n][HW][Cp / 2], channels C..Cp-1
// zero (Cp >= C even: the copy padded to whole 16-byte chunks): an activation NCHW -> NHWC, or a weight [O][C][R][S]
// -> [O][R][S][Cp]. A block moves 64 channels x 32 pixels of the n * HW (HnTilePixel) through shared memory: each
// warp reads 32 consecutive pixels of a channel, then writes 64 consecutive channels (32 pairs) of a pixel. Grid
// (ceil(n * HW / 32), ceil(Cp / 64)), 256 threads; n * HW < 2^31.
extern "C" __global__ void __launch_bounds__(256) to_nhwc16(const float* __restrict__ x, unsigned* __restrict__ y,
                                                            int n, int C, int HW, int Cp) {
    __shared__ float t[64][33];
    const HnTilePixel px(n * HW, HW);
    hn_load_nhwc_tile(t, x, px, blockIdx.y * 64, C, HW);         // (0 past C)
    hn_store_nhwc16_tile(t, y, blockIdx.x * 32, blockIdx.y * 64, Cp, n * HW);
}

// to_nhwc16 in tf32: y[img][p][c] = tf32(x[img][c][p]) as float32 [n][HW][Cp] (any Cp >= C, channels past C zero),
// the operands of mma.cu's HN_CONV32W / HN_CONV32F; the same tiles (hn_store_nhwc32_tile). Where yt is given, also
// the K-major copy yt [Cp][ldk] of mma.cu's r tiles, yt[c][img HW + p] = y[img][p][c] (hn_store_kmajor32_tile).
// to_nhwc32x3: the split copy [n][HW][2 Cp] of the fp32 kernels (Cp a multiple of 4).
template <int SPLIT>
__device__ __forceinline__ void hn_to_nhwc32(const float* __restrict__ x, float* __restrict__ y, int n, int C, int HW,
                                             int Cp, float* __restrict__ yt, int ldk) {
    __shared__ float t[64][33];
    const HnTilePixel px(n * HW, HW);
    hn_load_nhwc_tile(t, x, px, blockIdx.y * 64, C, HW);         // (0 past C)
    hn_store_nhwc32_tile<SPLIT>(t, y, blockIdx.x * 32, blockIdx.y * 64, Cp, n * HW);
    if (yt) hn_store_kmajor32_tile(t, yt, blockIdx.x * 32, blockIdx.y * 64, Cp, n * HW, ldk);
}
extern "C" __global__ void __launch_bounds__(256) to_nhwc32(const float* __restrict__ x, float* __restrict__ y, int n,
                                                            int C, int HW, int Cp, float* __restrict__ yt, int ldk) {
    hn_to_nhwc32<0>(x, y, n, C, HW, Cp, yt, ldk);
}
extern "C" __global__ void __launch_bounds__(256) to_nhwc32x3(const float* __restrict__ x, float* __restrict__ y,
                                                              int n, int C, int HW, int Cp) {
    hn_to_nhwc32<1>(x, y, n, C, HW, Cp, nullptr, 0);
}

// The K-major copy of a channels-last tf32 copy, for mma.cu's r tiles (hn_conv32_filter_fr): y[o][k] = x[k][o] for x
// [K][O] (O a multiple of 4: x's rows are whole 16-byte chunks), y [O][ldk], ldk = K rounded up to 4, y[o][k] = 0 for
// K <= k < ldk. A block moves 32 rows k x 32 columns o through shared memory: each warp reads 32 consecutive o of a
// row k, then writes 32 consecutive k of a column o. Grid (ceil(ldk / 32), ceil(O / 32)), 256 threads; K O < 2^31.
extern "C" __global__ void __launch_bounds__(256) nhwc32_t(const float* __restrict__ x, float* __restrict__ y, int K,
                                                           int O, int ldk) {
    __shared__ float t[32][33];
    const int k0 = blockIdx.x * 32, o0 = blockIdx.y * 32, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int i = warp; i < 32; i += 8) {
        const int k = k0 + i, o = o0 + lane;
        t[i][lane] = k < K && o < O ? x[(long long)k * O + o] : 0.f;
    }
    __syncthreads();
    for (int i = warp; i < 32; i += 8) {
        const int o = o0 + i, k = k0 + lane;
        if (o < O && k < ldk) y[(long long)o * ldk + k] = t[lane][i];
    }
}

// The window of a tile's pixel (HnTilePixel) of z [n][C][H][W] under k x k max pooling at stride k: (p, q) the
// window, covered whether the pixel is in one (rows h >= P k and columns w >= Q k are in none), at its position in it
// (maxpool_fwd's argmax byte: (h - p k) k + (w - q k)), pq the pooled element's offset in [n][C][P][Q] at channel 0.
struct HnPoolWindow {
    int p, q, at;
    bool covered;
    long long pq;
    __device__ __forceinline__ HnPoolWindow(const HnTilePixel& px, int C, int W, int P, int Q, int k) {
        const int h = px.hw / W, w = px.hw - h * W;
        p = h / k;
        q = w / k;
        covered = px.in && p < P && q < Q;
        at = (h - p * k) * k + (w - q * k);
        pq = (long long)px.img * C * P * Q + p * Q + q;
    }
};

// The load half of pool_grad_nhwc16 / pool_grad_nhwc32: the tile t[channel - c0][pixel] of dz through shared memory.
__device__ __forceinline__ void hn_pool_grad_tile(float (&t)[64][33], const float* __restrict__ dy,
                                                  const unsigned char* __restrict__ arg, const HnTilePixel& px, int c0,
                                                  int C, int W, int P, int Q, int k) {
    const int lane = threadIdx.x & 31, row = threadIdx.x >> 5;
    const HnPoolWindow win(px, C, W, P, Q, k);     // dy[img][c][p][q] = dy[win.pq + c * P * Q]
    float d[8];                        // channels c0 + row + 8u: dy and arg of all eight loaded before any is tested
    unsigned char a[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) {
        const int c = c0 + row + 8 * u;
        const long long src = win.pq + (long long)c * P * Q;
        const bool in = win.covered && c < C;
        a[u] = in ? arg[src] : 0;
        d[u] = in ? dy[src] : 0.f;
    }
#pragma unroll
    for (int u = 0; u < 8; ++u) t[row + 8 * u][lane] = a[u] == win.at ? d[u] : 0.f;
    __syncthreads();
}

// to_nhwc16 of a max pooling's input gradient, dz = maxpool2d_backward(dy), for windows that tile the input (stride
// == k), without dz in float32: z [n][C][H][W] the pooled tensor, dy and arg [n][C][P][Q] the pooled gradient and
// each window's argmax byte (pool.cu's maxpool_fwd). dz[c][h][w] = dy[c][p][q] where (h, w) is the first maximum of
// window (p, q) = (h / k, w / k), i.e. arg[c][p][q] == (h - p k) k + (w - q k); 0 elsewhere, rows h >= P k and
// columns w >= Q k (in no window) included. Written as bf16 pairs [n][H][W][C / 2] (C even) in to_nhwc16's tiles:
// 64 channels x 32 pixels of z's n * H * W per block, each lane's pixel decoded once. Grid (ceil(n * H * W / 32),
// ceil(C / 64)); n * H * W < 2^31.
extern "C" __global__ void __launch_bounds__(256) pool_grad_nhwc16(const float* __restrict__ dy,
                                                                   const unsigned char* __restrict__ arg,
                                                                   unsigned* __restrict__ y, int n, int C, int H,
                                                                   int W, int P, int Q, int k) {
    __shared__ float t[64][33];
    const HnTilePixel px(n * H * W, H * W);
    hn_pool_grad_tile(t, dy, arg, px, blockIdx.y * 64, C, W, P, Q, k);
    hn_store_nhwc16_tile(t, y, blockIdx.x * 32, blockIdx.y * 64, C, n * H * W);
}

// pool_grad_nhwc16 in tf32: dz as float32 [n][H][W][C] rounded to tf32 (any C), the tf32 convolutions' copy
// (to_nhwc32's layout), and where yt is given its K-major copy yt [C][ldk] too (to_nhwc32's); pool_grad_nhwc32x3,
// the split copy [n][H][W][2 C] (to_nhwc32x3's, C a multiple of 4).
template <int SPLIT>
__device__ __forceinline__ void hn_pool_grad_nhwc32(const float* __restrict__ dy, const unsigned char* __restrict__ arg,
                                                    float* __restrict__ y, int n, int C, int H, int W, int P, int Q,
                                                    int k, float* __restrict__ yt, int ldk) {
    __shared__ float t[64][33];
    const HnTilePixel px(n * H * W, H * W);
    hn_pool_grad_tile(t, dy, arg, px, blockIdx.y * 64, C, W, P, Q, k);
    hn_store_nhwc32_tile<SPLIT>(t, y, blockIdx.x * 32, blockIdx.y * 64, C, n * H * W);
    if (yt) hn_store_kmajor32_tile(t, yt, blockIdx.x * 32, blockIdx.y * 64, C, n * H * W, ldk);
}
extern "C" __global__ void __launch_bounds__(256) pool_grad_nhwc32(const float* __restrict__ dy,
                                                                   const unsigned char* __restrict__ arg,
                                                                   float* __restrict__ y, int n, int C, int H, int W,
                                                                   int P, int Q, int k, float* __restrict__ yt,
                                                                   int ldk) {
    hn_pool_grad_nhwc32<0>(dy, arg, y, n, C, H, W, P, Q, k, yt, ldk);
}
extern "C" __global__ void __launch_bounds__(256) pool_grad_nhwc32x3(const float* __restrict__ dy,
                                                                     const unsigned char* __restrict__ arg,
                                                                     float* __restrict__ y, int n, int C, int H, int W,
                                                                     int P, int Q, int k) {
    hn_pool_grad_nhwc32<1>(dy, arg, y, n, C, H, W, P, Q, k, nullptr, 0);
}

// f(px, e) for each pixel px = (img H + h) W + w of z [n][H][W] whose gradient pooled pixel j of the n * P * Q (k x k
// windows at stride k) writes: its window's pixels, e = their position in the window (the argmax byte that names
// them), and for the last pooled row and column also the rows h >= P k and columns w >= Q k that no window covers,
// e = 0xffff (never an argmax byte: those get 0).
template <class F>
__device__ __forceinline__ void hn_each_window_pixel(int j, int H, int W, int P, int Q, int k, F&& f) {
    const int PQ = P * Q, img = j / PQ, t = j - img * PQ, p = t / Q, q = t - p * Q;
    const int rows = p == P - 1 ? H - p * k : k, cols = q == Q - 1 ? W - q * k : k;
    for (int dr = 0; dr < rows; ++dr) {
        const long long out = ((long long)img * H + p * k + dr) * W + q * k;
        for (int ds = 0; ds < cols; ++ds) f(out + ds, dr < k && ds < k ? (unsigned)(dr * k + ds) : 0xffffu);
    }
}

// The argmax bytes (arg [n][C][P][Q]) of pooled pixel j of the n * P * Q for channels c0 + 8 row .. c0 + 8 row + 7,
// row = the thread's warp, into at_j[2 row] and at_j[2 row + 1] (byte b of word w: channel c0 + 8 row + 4 w + b; 0xff
// past C and past the last pixel): a block of 8 warps stages 64 channels of a pooled pixel a lane.
__device__ __forceinline__ void hn_stage_argmax8(unsigned* at_j, const unsigned char* __restrict__ arg, int j, int c0,
                                                 int C, int PQ, int NPQ) {
    const int row = threadIdx.x >> 5, img = j < NPQ ? j / PQ : 0;
    const long long base = (long long)img * C * PQ + (j - img * PQ);
    unsigned w[2] = {0u, 0u};
#pragma unroll
    for (int u = 0; u < 8; ++u) {
        const int c = c0 + 8 * row + u;
        const unsigned a = j < NPQ && c < C ? arg[base + (long long)c * PQ] : 0xffu;
        w[u >> 2] |= a << (8 * (u & 3));
    }
    at_j[2 * row] = w[0];
    at_j[2 * row + 1] = w[1];
}

// pool_grad_nhwc16 from the pooled gradient already channels-last in bf16 (dy16 [n][P][Q][C / 2] bf16 pairs, the batch
// norm's hand-over, norm.cu's bn_bwd_dx_nhwc16): the same dz16 [n][H][W][C / 2] bits, since a bf16 value or zero
// moves unchanged. A block takes 32 pooled pixels (of the n * P * Q, image-major) x 64 channels and writes their
// windows whole, so that each argmax byte and each dy16 word is read once: lanes along the pooled pixels read the
// argmax bytes (arg [n][C][P][Q], 32 consecutive bytes a warp), each thread 8 channels of its pixel into shared memory
// (rows of 17 words so that the 32 pixels' rows fall in 32 banks); then each warp takes 4 of the pooled pixels, lanes
// along the channel pairs (coalesced dy16 reads and window writes, 128 bytes a warp), and writes the window's k x k
// pixels, the pair's halves where its argmax byte names the pixel and 0 elsewhere. The last pooled row and column own
// the rows h >= P k and columns w >= Q k that no window covers (0). All loads are issued before the barrier. Grid
// (ceil(n * P * Q / 32), ceil(C / 64)), 256 threads; n * H * W < 2^31, C even, P, Q >= 1.
extern "C" __global__ void __launch_bounds__(256) pool_grad16_nhwc16(const unsigned* __restrict__ dy16,
                                                                     const unsigned char* __restrict__ arg,
                                                                     unsigned* __restrict__ y, int n, int C, int H,
                                                                     int W, int P, int Q, int k) {
    __shared__ unsigned at[32][17];            // [pooled pixel][word]: byte b of word w, channel c0 + 4 w + b's argmax
    const int c0 = blockIdx.y * 64, lane = threadIdx.x & 31, row = threadIdx.x >> 5, PQ = P * Q, NPQ = n * PQ;
    const int half = C / 2, cp = c0 / 2 + lane;                        // this lane's channel pair in phase two
    hn_stage_argmax8(at[lane], arg, blockIdx.x * 32 + lane, c0, C, PQ, NPQ);
    unsigned d[4];                                                     // pooled pixels row + 8 u of the block
#pragma unroll
    for (int u = 0; u < 4; ++u) {
        const int j = blockIdx.x * 32 + row + 8 * u;
        d[u] = j < NPQ && cp < half ? dy16[(long long)j * half + cp] : 0u;
    }
    __syncthreads();
#pragma unroll
    for (int u = 0; u < 4; ++u) {
        const int jb = row + 8 * u, j = blockIdx.x * 32 + jb;
        if (j >= NPQ || cp >= half) continue;
        const unsigned pair = at[jb][lane >> 1] >> (16 * (lane & 1));  // the argmax bytes of channels 2 cp, 2 cp + 1
        const unsigned a0 = pair & 0xffu, a1 = (pair >> 8) & 0xffu;
        hn_each_window_pixel(j, H, W, P, Q, k, [&](long long px, unsigned e) {
            y[px * half + cp] = (a0 == e ? d[u] & 0xffffu : 0u) | (a1 == e ? d[u] & 0xffff0000u : 0u);
        });
    }
}

// pool_grad16_nhwc16 in 16-byte vectors, where C is a multiple of 8 and dy16, y are 16-byte aligned: the same bits.
// A block takes 64 pooled pixels x 64 channels: the argmax bytes staged as pool_grad16_nhwc16's (two rounds of 32
// pooled pixels; 8 channels' bytes are two words of a pixel's row), then thread item (pooled pixel jb, chunk u of 8
// channels) -- items tid and tid + 256, jb = item / 8, u = item % 8, a warp 4 pooled pixels x 128 bytes -- reads its
// 8 channels of dy16 as one vector (issued before the barrier) and writes each pixel of the window as one 16-byte
// vector: a channel's value where its argmax byte names the pixel, else 0. Grid (ceil(n * P * Q / 64), ceil(C /
// 64)), 256 threads; n * H * W < 2^31, P, Q >= 1.
extern "C" __global__ void __launch_bounds__(256) pool_grad16_nhwc16v(const unsigned short* __restrict__ dy16,
                                                                      const unsigned char* __restrict__ arg,
                                                                      unsigned short* __restrict__ y, int n, int C,
                                                                      int H, int W, int P, int Q, int k) {
    __shared__ unsigned at[64][17];            // [pooled pixel][word]: byte b of word w, channel c0 + 4 w + b's argmax
    const int c0 = blockIdx.y * 64, lane = threadIdx.x & 31, PQ = P * Q, NPQ = n * PQ;
#pragma unroll
    for (int h = 0; h < 2; ++h)
        hn_stage_argmax8(at[32 * h + lane], arg, blockIdx.x * 64 + 32 * h + lane, c0, C, PQ, NPQ);
    uint4 d[2];                                                        // items tid and tid + 256
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int i = threadIdx.x + 256 * h, j = blockIdx.x * 64 + (i >> 3), c = c0 + 8 * (i & 7);
        d[h] = j < NPQ && c < C ? hn_ld16(dy16 + (long long)j * C + c) : make_uint4(0, 0, 0, 0);
    }
    __syncthreads();
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int i = threadIdx.x + 256 * h, jb = i >> 3, u = i & 7, j = blockIdx.x * 64 + jb, c = c0 + 8 * u;
        if (j >= NPQ || c >= C) continue;
        const unsigned a[2] = {at[jb][2 * u], at[jb][2 * u + 1]};     // channels c .. c + 7's argmax bytes
        const unsigned dw[4] = {d[h].x, d[h].y, d[h].z, d[h].w};       // channels c + 2 m (low), c + 2 m + 1 (high)
        hn_each_window_pixel(j, H, W, P, Q, k, [&](long long px, unsigned e) {
            unsigned v[4];
#pragma unroll
            for (int m = 0; m < 4; ++m) {
                const unsigned bytes = a[m >> 1] >> (16 * (m & 1));          // channels c + 2 m, c + 2 m + 1
                v[m] = ((bytes & 0xffu) == e ? dw[m] & 0xffffu : 0u) |
                       (((bytes >> 8) & 0xffu) == e ? dw[m] & 0xffff0000u : 0u);
            }
            hn_st16(y + px * C + c, make_uint4(v[0], v[1], v[2], v[3]));
        });
    }
}

// A small convolution and its GELU in one pass, the GELU's output handed over channels-last in bf16 (airbench's
// whitening layer: C = 3, 2 x 2, K = 24): z = conv2d(x, w) + b and y16 = bf16(gelu(z)), x [n][C][H][W], w [K][C][R][S]
// (CRS = C R S <= 32 taps a pixel), b [K] or null, K <= 64 a multiple of 8. One thread per output pixel (img, p, q) of
// the n * P * Q < 2^31, its K channels 8 at a time (four taps' loads in flight): z [n][K][P][Q] float32 (the GELU's
// backward reads it), y16 as the channels-last copy [n][P][Q][K / 2] bf16 pairs, each thread's 8 channels one
// 16-byte store. The weights sit in shared memory as wt[j][k] (j = (c, r, s): a tap's 8 channels two float4 reads,
// the same for every thread) with each tap's offset and (r, s); zero padding outside x. The sum runs bias first, then
// the taps in (c, r, s) order.
extern "C" __global__ void __launch_bounds__(256) conv_gelu_nhwc16(const float* __restrict__ x,
                                                                   const float* __restrict__ w,
                                                                   const float* __restrict__ b, float* __restrict__ z,
                                                                   uint4* __restrict__ y16, int n, int C, int H, int W,
                                                                   int K, int R, int S, int stride, int pad, int P,
                                                                   int Q) {
    __shared__ __align__(16) float wt[32 * 64];
    __shared__ int tap[32], tr[32], ts[32];
    const int RS = R * S, CRS = C * RS, PQ = P * Q, NP = n * PQ;
    for (int i = threadIdx.x; i < K * CRS; i += blockDim.x) {
        const int k = i / CRS, j = i - k * CRS;
        wt[j * K + k] = w[i];
    }
    for (int j = threadIdx.x; j < CRS; j += blockDim.x) {
        const int c = j / RS, rs = j - c * RS, r = rs / S, sx = rs - r * S;
        tap[j] = (c * H + r) * W + sx;
        tr[j] = r;
        ts[j] = sx;
    }
    __syncthreads();
    for (int pix = blockIdx.x * blockDim.x + threadIdx.x; pix < NP; pix += gridDim.x * blockDim.x) {
        const int img = pix / PQ, pq = pix - img * PQ, p = pq / Q, q = pq - p * Q;
        const int h0 = p * stride - pad, w0 = q * stride - pad;
        const float* xi = x + (long long)img * C * H * W + (h0 * W + w0);     // + tap[j]: tap j of this pixel
        for (int k0 = 0; k0 < K; k0 += 8) {
            float acc[8];
#pragma unroll
            for (int u = 0; u < 8; ++u) acc[u] = b ? b[k0 + u] : 0.f;
#pragma unroll 4
            for (int j = 0; j < CRS; ++j) {
                const int ih = h0 + tr[j], iw = w0 + ts[j];
                const float v = ih >= 0 && ih < H && iw >= 0 && iw < W ? xi[tap[j]] : 0.f;
                const float4 lo = *reinterpret_cast<const float4*>(&wt[j * K + k0]);
                const float4 hi = *reinterpret_cast<const float4*>(&wt[j * K + k0 + 4]);
                acc[0] = fmaf(v, lo.x, acc[0]);
                acc[1] = fmaf(v, lo.y, acc[1]);
                acc[2] = fmaf(v, lo.z, acc[2]);
                acc[3] = fmaf(v, lo.w, acc[3]);
                acc[4] = fmaf(v, hi.x, acc[4]);
                acc[5] = fmaf(v, hi.y, acc[5]);
                acc[6] = fmaf(v, hi.z, acc[6]);
                acc[7] = fmaf(v, hi.w, acc[7]);
            }
            float* zk = z + ((long long)img * K + k0) * PQ + pq;
#pragma unroll
            for (int u = 0; u < 8; ++u) zk[(long long)u * PQ] = acc[u];
            unsigned pair[4];
#pragma unroll
            for (int u = 0; u < 4; ++u) pair[u] = hn_bf16x2_bits(hn_gelu(acc[2 * u]), hn_gelu(acc[2 * u + 1]));
            y16[((long long)pix * K + k0) / 8] = make_uint4(pair[0], pair[1], pair[2], pair[3]);
        }
    }
}

// The data gradient's turned weights: wt[c][rs][o] = bf16(w[o][c][RS - 1 - rs]) for w [O][C][R][S] float32 (rs = r *
// S + s, so RS - 1 - rs is (R - 1 - r, S - 1 - s)), as bf16 bits.
extern "C" __global__ void turn_weights16(const float* __restrict__ w, unsigned short* __restrict__ wt, int O, int C,
                                          int RS) {
    HN_GRID_STRIDE(e, (long long)O * C * RS) {
        const int o = (int)(e % O), t = (int)(e / O), rs = t % RS, c = t / RS;
        wt[e] = hn_bf16_bits(w[((long long)o * C + c) * RS + (RS - 1 - rs)]);
    }
}

// turn_weights16 in tf32: wt[c][rs][o] = tf32(w[o][c][RS - 1 - rs]) as float32; turn_weights32x3, as the split copy
// [C][RS][2 O] (O a multiple of 4).
extern "C" __global__ void turn_weights32(const float* __restrict__ w, float* __restrict__ wt, int O, int C, int RS) {
    HN_GRID_STRIDE(e, (long long)O * C * RS) {
        const int o = (int)(e % O), t = (int)(e / O), rs = t % RS, c = t / RS;
        wt[e] = hn_tf32_round(w[((long long)o * C + c) * RS + (RS - 1 - rs)]);
    }
}
extern "C" __global__ void turn_weights32x3(const float* __restrict__ w, float* __restrict__ wt, int O, int C,
                                            int RS) {
    HN_GRID_STRIDE(e, (long long)O * C * RS) {
        const int o = (int)(e % O), t = (int)(e / O), rs = t % RS, c = t / RS;
        const float2 s = hn_split_tf32(w[((long long)o * C + c) * RS + (RS - 1 - rs)]);
        const long long at = hn_split_at(e);
        wt[at] = s.x;
        wt[at + 4] = s.y;
    }
}

// A step's weight copies in one launch (mma.StepCopies): row j of table [rows][8] (int64) is a weight w [O][C][R][S]
// float32 (row[0]), where to write its channels-last copy [O][RS][Cp] (row[1], to_nhwc's: channels C..Cp-1 zero) and
// its turned copy [C][RS][O] (row[2], turn_weights'), 0 for a copy not wanted, then O, C, RS and Cp. Grid (any,
// rows), 256 threads: blockIdx.y the weight, the x blocks striding over its units of work, each a transpose through
// shared memory so that both the reads of w and the writes of the copies are contiguous across a warp:
// - channels-last: a unit is HN_WC_CHUNK / RS channels c0.. of one o (RS <= HN_WC_CHUNK: mma.StepCopies copies larger
//   filters where they are asked for): w[o][c0..][0..RS) is contiguous (read into s),
//   fwd[o][rs][c0..] is contiguous for each rs (written from s[c RS + rs], RS apart: no bank conflicts for odd RS);
// - turned: w as [O][C RS] and turned as [C RS][O], a unit a 32 x 32 tile of (k = c RS + rs, o): read along k (the
//   column c RS + RS - 1 - rs, a permutation within each channel's RS), written along o.
// put(y, e, v) stores element e of a copy as to_nhwc<s> / turn_weights<s> store it, so the copies are those kernels'
// bit for bit.
#define HN_WC_CHUNK 4096      // the floats of w a channels-last unit reads at most (mma.WC_CHUNK)
template <class Put>
__device__ __forceinline__ void hn_weight_copies(const long long* __restrict__ table, Put put) {
    __shared__ float s[HN_WC_CHUNK];
    float (*tile)[33] = reinterpret_cast<float (*)[33]>(s);          // the turned copy's 32 x 32 tiles (+1: banks)
    const long long* row = table + 8 * blockIdx.y;
    const float* __restrict__ w = reinterpret_cast<const float*>(row[0]);
    void* fwd = reinterpret_cast<void*>(row[1]);
    void* turned = reinterpret_cast<void*>(row[2]);
    const int O = (int)row[3], C = (int)row[4], RS = (int)row[5], Cp = (int)row[6];
    const int ch = max(1, HN_WC_CHUNK / RS), chunks = (Cp + ch - 1) / ch;   // channels a unit, units an o
    const int KT = (C * RS + 31) / 32, OT = (O + 31) / 32;                  // the turned copy's tiles
    const long long nf = fwd ? (long long)O * chunks : 0, n = nf + (turned ? (long long)KT * OT : 0);
    const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
    for (long long u = blockIdx.x; u < n; u += gridDim.x) {             // the same trip count in every thread
        if (u < nf) {
            const int o = (int)(u / chunks), c0 = (int)(u - (long long)o * chunks) * ch;
            const int cw = min(ch, C - c0), cn = min(ch, Cp - c0);      // channels read (cw <= 0: padding only)
            const float* src = w + ((long long)o * C + c0) * RS;
            for (int t = threadIdx.x; t < cw * RS; t += blockDim.x)
                s[t] = src[t];
            __syncthreads();
            for (int t = threadIdx.x; t < cn * RS; t += blockDim.x) {   // fwd[o][rs][c0 + c]
                const int rs = t / cn, c = t - rs * cn;
                put(fwd, ((long long)o * RS + rs) * Cp + c0 + c, c < cw ? s[c * RS + rs] : 0.f);
            }
        } else {
            const long long v = u - nf;
            const int k0 = (int)(v / OT) * 32, o0 = (int)(v % OT) * 32, CRS = C * RS;
            for (int r = ty; r < 32; r += blockDim.x >> 5) {            // tile[o - o0][k - k0], k along the warp
                const int o = o0 + r, k = k0 + tx;
                if (o < O && k < CRS) {
                    const int c = k / RS, rs = k - c * RS;
                    tile[r][tx] = w[(long long)o * CRS + c * RS + (RS - 1 - rs)];
                }
            }
            __syncthreads();
            for (int r = ty; r < 32; r += blockDim.x >> 5) {            // turned[k][o], o along the warp
                const int k = k0 + r, o = o0 + tx;
                if (o < O && k < CRS)
                    put(turned, (long long)k * O + o, tile[tx][r]);
            }
        }
        __syncthreads();                                                // s is the next unit's
    }
}
extern "C" __global__ void weight_copies16(const long long* __restrict__ table) {
    hn_weight_copies(table, [](void* y, long long e, float v) {
        static_cast<unsigned short*>(y)[e] = hn_bf16_bits(v);
    });
}
extern "C" __global__ void weight_copies32(const long long* __restrict__ table) {
    hn_weight_copies(table, [](void* y, long long e, float v) { static_cast<float*>(y)[e] = hn_tf32_round(v); });
}
extern "C" __global__ void weight_copies32x3(const long long* __restrict__ table) {
    hn_weight_copies(table, [](void* y, long long e, float v) {
        const float2 s = hn_split_tf32(v);
        const long long at = hn_split_at(e);
        static_cast<float*>(y)[at] = s.x;
        static_cast<float*>(y)[at + 4] = s.y;
    });
}

// dw[o][c][rs] += t[o][rs][c]: a filter gradient computed channels-last over Cp >= C channels (those of a padded
// copy of x, to_nhwc16), added into the weights' layout.
extern "C" __global__ void add_from_nhwc(float* __restrict__ dw, const float* __restrict__ t, int O, int C, int RS,
                                         int Cp) {
    HN_GRID_STRIDE(e, (long long)O * C * RS) {
        const int rs = (int)(e % RS), u = (int)(e / RS), c = u % C, o = u / C;
        dw[e] += t[((long long)o * RS + rs) * Cp + c];
    }
}
