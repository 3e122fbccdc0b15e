// The tf32 filter gradient on wgmma, its operands transposed in shared memory ("fx" tiles, sm_90a; sandbox,
// conv32_fx.py): C[M = O, N = R S C] += A[M, K] B[K, N] over K = images x P x Q, A = dy ([k][o] as stored) and B = x
// gathered ([k][(r, s, c)]), from the tf32 channels-last copies (float32 already rounded to tf32: conv.cu's
// to_nhwc32). wgmma reads tf32 operands K-major only, and both tiles arrive MN-major (rows k), so each K tile goes
// through two buffers:
//   - STAGES stages of two staging tiles, [BK = 32 rows k][BM] and [32][BN] (rows padded by 4 floats), filled by
//     cp.async as hn_conv_filter_sync fills its own (hn_copy16_tile, hn_nhwc_copy_x_taps);
//   - 1 + INFLIGHT K-major stages, [BM rows o][32 k] and [BN rows n][32 k] with the 128-byte swizzle
//     (HnSwizzle128T<float>), which wgmma reads; K tile kt's is kt % (1 + INFLIGHT).
// K tile kt: wait for its copies, barrier (every copy of kt landed; every warp done moving kt-1 out of its staging
// tile, which is refilled next; every warpgroup's wgmma of kt-1-INFLIGHT retired, so K-major stage kt's is free),
// copies of kt + STAGES - 1, every warp moves units of 32 rows k x 4 columns of the staging tile into the K-major
// stage (a lane a row k: one 16-byte read, four 4-byte writes to rows c..c+3 at column k; a warp's 32 writes of one
// row fall in 32 banks under the swizzle), fence.proxy.async, barrier, then the warpgroup's 4 wgmma m64nBNk8 and a
// wait until INFLIGHT groups are pending. With INFLIGHT 1 the moves of kt + 1 overlap the products of kt. The last
// K tile waits for all its wgmma inside the loop: a wait<0> after it, where the path of no K tiles (the accumulators
// zeroed) meets the loop's, makes ptxas serialise every wgmma (C7515). WGM warpgroups of 64 rows of M each take all
// BN columns; the K sum split over blockIdx.z and added with atomics (hn_conv16w_filter's epilogue).
#include "mma.cu"

// Units of 32 rows x 4 columns of a staging tile ([32][SROW], COLS columns) into K-major rows (HnSwizzle128T<float>):
// column c of the staging tile is row c of kmaj. Warp w of NWARPS takes units w, w + NWARPS, ...
template <int COLS, int SROW, int NWARPS>
__device__ __forceinline__ void hn_fx_transpose(const float* st, float* kmaj, int warp, int lane) {
    using L = HnSwizzle128T<float>;
#pragma unroll
    for (int u = warp; u < COLS / 4; u += NWARPS) {
        const float4 v = hn_lds4(st + lane * SROW + 4 * u);
        hn_sts1(kmaj + L::at(4 * u, lane), hn_bits(v.x));
        hn_sts1(kmaj + L::at(4 * u + 1, lane), hn_bits(v.y));
        hn_sts1(kmaj + L::at(4 * u + 2, lane), hn_bits(v.z));
        hn_sts1(kmaj + L::at(4 * u + 3, lane), hn_bits(v.w));
    }
}

template <int WGM, int BN, int STAGES, int INFLIGHT>
__device__ __forceinline__ void hn_conv32_filter_fx(unsigned char* smem, const float* dy, const float* x, float* dw,
                                                    int M, int N, int K, int splits, int kchunk, const HnConv& cv) {
    constexpr int BM = 64 * WGM, BK = 32, THREADS = 128 * WGM, NWARPS = THREADS / 32;
    constexpr int RA = BM + 4, RB = BN + 4;               // staging rows, 16 bytes of padding: row k's chunk j in
                                                          // bank group (k + j) % 8, so 8 lanes' rows k read apart
    constexpr int SA = BK * RA, SS = SA + BK * RB;        // a stage: A's staging tile, then B's
    constexpr int EA = BM * BK;                           // the K-major A tile (a multiple of 1024 bytes), then B
    constexpr int EK = EA + BN * BK;                      // a K-major stage
    static_assert(BN % 64 == 0 && BN <= 256 && (BK * BM / 4) % THREADS == 0 && THREADS % (BN / 4) == 0, "tile");
    static_assert(STAGES >= 2 && (INFLIGHT == 0 || INFLIGHT == 1), "a staging tile filled, one moved");
    float* ka = reinterpret_cast<float*>(hn_smem_align1024(smem));    // (1 + INFLIGHT) x EK: the K-major stages
    float* st = ka + (1 + INFLIGHT) * EK;                              // STAGES x SS: the staging tiles

    const HnBlock blk = hn_block(nullptr, nullptr, dw, M, N, K, 0, 0, N, 0, 0, 0, 1.f, 1.f, splits, kchunk, BM, BN, BK);
    const int tid = threadIdx.x, gm = tid / 128, warp = tid / 32, lane = tid & 31;
    float acc[1][BN / 8][4];
    hn_zero(acc);
    const HnTapDivs dv = {hn_div_of(cv.c), hn_div_of(cv.s), hn_div_of(cv.p * cv.q), hn_div_of(cv.q)};

    auto issue = [&](int kt) {
        const int k0 = blk.kbeg + kt * BK;
        float* s = st + (kt % STAGES) * SS;
        hn_copy16_tile<BK, BM / 4, HnRowTile<RA>, THREADS>(s, dy, cv.o, k0, blk.kend, blk.m0, M, tid);
        hn_nhwc_copy_x_taps<BK, BN / 4, HnRowTile<RB>, THREADS>(s + SA, x, cv, blk.n0, N, dv, k0, blk.kend, tid);
    };
    hn_pipeline_fill<STAGES>(blk.tiles, issue);
#pragma unroll 1
    for (int kt = 0; kt < blk.tiles; ++kt) {
        hn_cp_async_wait<STAGES - 2>();
        __syncthreads();
        if (kt + STAGES - 1 < blk.tiles) issue(kt + STAGES - 1);
        hn_cp_async_commit();
        const float* s = st + (kt % STAGES) * SS;
        float* kb = ka + (INFLIGHT ? (kt & 1) * EK : 0);
        hn_fx_transpose<BM, RA, NWARPS>(s, kb, warp, lane);
        hn_fx_transpose<BN, RB, NWARPS>(s + SA, kb + EA, warp, lane);
        hn_fence_proxy_async();
        __syncthreads();
        const unsigned long long da = hn_wgmma_desc(kb + gm * 64 * BK), db = hn_wgmma_desc(kb + EA);
        hn_wgmma_fence();
        hn_wgmma_ktile<float, BN>(acc[0], da, db, 2);    // 8 tf32 (32 bytes, 2 units) a K step
        hn_wgmma_commit();
        if (INFLIGHT == 1 && kt + 1 < blk.tiles)
            hn_wgmma_wait<1>();
        else
            hn_wgmma_wait<0>();
    }
    hn_cp_async_wait<0>();
    hn_epilogue<1, BN / 8>(blk, acc, M, N, N, 1.f, 1.f, 64 * gm + 16 * ((tid >> 5) & 3), 0, tid & 31);
}

// HN_CONV32FX(hn_conv32_filter_w128x128s3x, 2, 128, 3, 1): the fx filter gradient with HN_CONV32F's arguments
// (B = x, Wt = dy), WGM warpgroups of 64 x BN, ST staging tiles, INFL wgmma groups in flight over the next moves.
#define HN_CONV32FX(name, WGM, BN, ST, INFL)                                                                      \
    extern "C" __global__ void __launch_bounds__(128 * WGM, 1) name(                                             \
        const float* __restrict__ B, const float* __restrict__ Wt, const float* __restrict__ AUX,                 \
        float* __restrict__ Y, int M, int N, int K, int C, int H, int W, int R, int S, int P, int Q, int O,         \
        int stride, int pad, int act, int splits, int kchunk) {                                                   \
        HN_DYNAMIC_SMEM(hn_smem);                                                                              \
        const HnConv cv = hn_conv_of<3>(AUX, C, H, W, R, S, P, Q, O, stride, pad, act);                         \
        hn_conv32_filter_fx<WGM, BN, ST, INFL>(hn_smem, Wt, B, Y, M, N, K, splits, kchunk, cv);                   \
    }
