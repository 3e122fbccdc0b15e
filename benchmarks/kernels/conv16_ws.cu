// Sandbox (not shipped): the warp-specialised bf16 wgmma convolutions, the "ws" tiles. On the H200 they pass the GPU
// tests and compute-sanitizer's racecheck but lose to mma.cu's plain HN_CONV16W tiles on every layer and op of
// cifar-wide (benchmarks/kernels/NOTES.md, "Warp-specialised bf16 convolutions"; timings in
// benchmarks/results/NVIDIA-H200/cl_tiles_2888ce2.json). conv16_ws.py appends the entry points of its tile table
// (HN_CONV16WS lines) to this text and plans their launches through mma.py; time_cl_tiles.py checks and times them
// beside the shipped tiles, tests/test_mma_emulated.py runs them on the CPU emulator. The mbarrier wrappers (hn_mbar_*)
// are mma.cu's (the emulator defines its own).
//
// One producer warpgroup copies each K tile into a stage and signals it through a "full" mbarrier, while the WGM x WGN
// consumer warpgroups multiply and free the stage through an "empty" one (hn_wgmma_ws_loop): no block-wide barrier in
// the K loop. The gathers, shared tiles, wgmma and epilogues are mma.cu's (hn_convw_fwd, hn_conv16w_filter).
#include "mma.cu"

// The K loop of the warp-specialised bf16 wgmma convolutions (HN_CONV16WS), `consumers` warpgroups multiplying and
// one more, the producer, copying; no block-wide barrier inside it. Shared memory: `bars` holds the STAGES "full"
// then the STAGES "empty" mbarriers (initialised here, then a barrier); the stages as hn_wgmma_loop's. The producer
// (the last 128 threads) builds its copier with make_issue(its thread index 0..127) and for each K tile kt waits on
// stage s = kt % STAGES's "empty" and issues tile kt (issue(kt, s): cp.async into stage s, one group); then it waits
// for its copies of tile kt-1, fences them to the async proxy that wgmma reads through, and arrives on that tile's
// "full" (a release: as the other kernels, each writer fences its own copies before the synchronisation). The
// consumers run mma.cu's hn_ws_consume (wait on "full", the tile's 4 wgmma, "empty" once the previous tile's are done).
// STAGES >= 3: the producer arrives on tile kt's "full" only after issuing tile kt+1, whose stage the consumers free
// after tile kt+1-STAGES. Returns true in the consumers (their acc complete), false in the producer (done).
template <int STAGES, int CONSUMERS, int WN, int MN, class T, class MakeIssue, class Desc>
__device__ __forceinline__ bool hn_wgmma_ws_loop(unsigned char* bars, int tiles, const MakeIssue& make_issue,
                                                 const T* a, int ea, const T* b, int eb, int kstep,
                                                 float (&acc)[WN / 8][4], const Desc& desc) {
    static_assert(STAGES >= 3, "the producer releases a tile one tile later");
    unsigned long long* full = reinterpret_cast<unsigned long long*>(bars);
    unsigned long long* empty = full + STAGES;
    const int tid = threadIdx.x;
    if (tid == 0)
        for (int s = 0; s < STAGES; ++s) {
            hn_mbar_init(full + s, 128);              // every producer thread, its copies landed and fenced
            hn_mbar_init(empty + s, CONSUMERS);       // every consumer thread, the stage's wgmma finished
        }
    __syncthreads();
    if (tid >= CONSUMERS) {
        const auto issue = make_issue(tid - CONSUMERS);
        for (int kt = 0; kt < tiles; ++kt) {
            const int s = kt % STAGES;
            while (!hn_mbar_try_wait(empty + s, ((kt / STAGES) & 1) ^ 1)) {}   // (a fresh barrier passes parity 1)
            issue(kt, s);
            hn_cp_async_commit();
            if (kt > 0) {
                hn_cp_async_wait<1>();
                hn_fence_proxy_async();
                hn_mbar_arrive(full + (kt - 1) % STAGES);
            }
        }
        hn_cp_async_wait<0>();
        hn_fence_proxy_async();
        if (tiles > 0) hn_mbar_arrive(full + (tiles - 1) % STAGES);
        return false;
    }
    hn_ws_consume<STAGES, WN, MN>(full, 0, tiles, a, ea, b, eb, kstep, acc, desc,
                                  [&](int stage) { hn_mbar_arrive(empty + stage); });
    return true;
}

// hn_convw_fwd at bf16, warp-specialised (HN_CONV16WS, hn_wgmma_ws_loop): the WGM x WGN warpgroups multiply and
// write the epilogue, one more warpgroup copies (hn_convw_fwd's gathers spread over its 128 threads). Shared memory:
// the 2 STAGES mbarriers, then the stages (A then B tiles, aligned to 1024 bytes).
template <int EPI, int WGM, int WGN, int WN, int STAGES>
__device__ __forceinline__ void hn_convw_ws_fwd(unsigned char* smem, const unsigned short* W, const unsigned short* x,
                                                float* y, int M, int N, int K, const HnConv& cv) {
    using T = unsigned short;
    constexpr int CONSUMERS = 128 * WGM * WGN, BM = 64 * WGM, BN = WN * WGN, BK = 64, CPR = 8, EA = BM * BK,
                  EB = BN * BK;
    static_assert((BN * CPR) % 128 == 0 && (BM * CPR) % 128 == 0 && STAGES >= 2, "tile");
    using L = HnSwizzle128T<T>;
    T* sa = reinterpret_cast<T*>(hn_smem_align1024(smem + 16 * STAGES));   // STAGES x EA
    T* sb = sa + STAGES * EA;                                                // STAGES x EB
    const HnBlock blk = hn_block(nullptr, nullptr, y, M, N, K, K, 0, 0, 0, 0, 0, 1.f, 0.f, 1, K, BM, BN, BK);
    const int tid = threadIdx.x, gm = tid / 128 / WGN, gn = tid / 128 % WGN;
    auto make_issue = [&](int ptid) {
        const auto rows = hn_nhwc_rows<EPI, BN, 32, 128>(cv, blk.n0, N, ptid);   // 8 chunks a row: 32 words
        const HnDiv by_c = hn_div_of(cv.c);
        return [=](int kt, int s) {
            const int k0 = kt * BK;
            hn_copy16_tile<BM, CPR, L, 128>(sa + s * EA, W, K, blk.m0, M, k0, K, ptid);
            hn_nhwc_copy_b<T, CPR, L, 128, decltype(rows)::N>(sb + s * EB, x, cv, rows, by_c, k0, K, ptid);
        };
    };
    float acc[1][WN / 8][4];
    hn_zero(acc);
    if (!hn_wgmma_ws_loop<STAGES, CONSUMERS, WN, 0>(smem, blk.tiles, make_issue, sa + gm * 64 * BK, EA,
                                                    sb + gn * WN * BK, EB, 16, acc[0],
                                                    [](const T* p) { return hn_wgmma_desc(p); }))
        return;
    if constexpr (EPI == 4)
        hn_conv_pool_epilogue<1, WN / 8>(blk, acc, M, cv, 64 * gm + 16 * ((tid >> 5) & 3), WN * gn, tid & 31);
    else
        hn_conv_epilogue<EPI, 1, WN / 8>(blk, acc, M, N, cv, 64 * gm + 16 * ((tid >> 5) & 3), WN * gn, tid & 31);
}

// hn_conv16w_filter warp-specialised (HN_CONV16WS's EPI 3, hn_wgmma_ws_loop): the same MN-major tiles, gathered by
// the producer warpgroup alone. Shared memory: the 2 STAGES mbarriers, then the stages (aligned to 1024 bytes).
template <int WGM, int WGN, int WN, int STAGES>
__device__ __forceinline__ void hn_conv16w_ws_filter(unsigned char* smem, const unsigned short* dy,
                                                     const unsigned short* x, float* dw, int M, int N, int K,
                                                     int splits, int kchunk, const HnConv& cv) {
    using T = unsigned short;
    constexpr int CONSUMERS = 128 * WGM * WGN, BM = 64 * WGM, BN = WN * WGN, BK = 64, CPA = BM / 8, CPB = BN / 8;
    constexpr int EA = BM * BK, EB = BN * BK;
    static_assert(128 % CPB == 0 && (BK * CPA) % 128 == 0 && (BK * CPB) % 128 == 0 && STAGES >= 2, "tile");
    T* sa = reinterpret_cast<T*>(hn_smem_align1024(smem + 16 * STAGES));
    T* sb = sa + STAGES * EA;
    const HnBlock blk = hn_block(nullptr, nullptr, dw, M, N, K, 0, 0, N, 0, 0, 0, 1.f, 1.f, splits, kchunk, BM, BN, BK);
    const int tid = threadIdx.x, gm = tid / 128 / WGN, gn = tid / 128 % WGN;
    auto make_issue = [&](int ptid) {
        const HnTapDivs dv = {hn_div_of(cv.c), hn_div_of(cv.s), hn_div_of(cv.p * cv.q), hn_div_of(cv.q)};
        return [=](int kt, int s) {
            const int k0 = blk.kbeg + kt * BK;
            hn_copy16_tile<BK, CPA, HnSwizzle128MN, 128>(sa + s * EA, dy, cv.o, k0, blk.kend, blk.m0, M, ptid);
            hn_nhwc_copy_x_taps<BK, CPB, HnSwizzle128MN, 128>(sb + s * EB, x, cv, blk.n0, N, dv, k0, blk.kend, ptid);
        };
    };
    float acc[1][WN / 8][4];
    hn_zero(acc);
    // a warpgroup's columns start 64 gm (A) and WN gn (B) columns in: whole blocks of 64 x 64 (HnSwizzle128MN)
    if (!hn_wgmma_ws_loop<STAGES, CONSUMERS, WN, 1>(smem, blk.tiles, make_issue, sa + gm * 64 * BK, EA,
                                                    sb + gn * WN * BK, EB, 16 * 64, acc[0],
                                                    [](const T* p) { return hn_wgmma_desc_mn(p); }))
        return;
    hn_epilogue<1, WN / 8>(blk, acc, M, N, N, 1.f, 1.f, 64 * gm + 16 * ((tid >> 5) & 3), WN * gn, tid & 31);
}

// HN_CONV16WS(hn_conv16_fwd_w128x128s6ws, 1, 2, 1, 128, 6): HN_CONV16W's forward (EPI 1), data gradient (EPI 2),
// filter gradient (EPI 3) or pooled forward (EPI 4) warp-specialised (hn_convw_ws_fwd, hn_conv16w_ws_filter): the
// WGM x WGN warpgroups and a producer warpgroup; shared memory as HN_CONV16W's and 16 ST bytes of mbarriers.
#define HN_CONV16WS(name, EPI, WGM, WGN, WN, ST)                                                                  \
    extern "C" __global__ void __launch_bounds__(128 * (WGM * WGN + 1), 1) name(                                \
        const unsigned short* __restrict__ B, const unsigned short* __restrict__ Wt, const float* __restrict__ AUX,  \
        float* __restrict__ Y, int M, int N, int K, int C, int H, int W, int R, int S, int P, int Q, int O,         \
        int stride, int pad, int act, int splits, int kchunk) {                                                   \
        HN_DYNAMIC_SMEM(hn_smem);                                                                              \
        const HnConv cv = hn_conv16_of<EPI>(AUX, C, H, W, R, S, P, Q, O, stride, pad, act, kchunk);            \
        if constexpr (EPI == 3)                                                                                \
            hn_conv16w_ws_filter<WGM, WGN, WN, ST>(hn_smem, Wt, B, Y, M, N, K, splits, kchunk, cv);             \
        else                                                                                                   \
            hn_convw_ws_fwd<EPI, WGM, WGN, WN, ST>(hn_smem, Wt, B, Y, M, N, K, cv);                             \
    }
