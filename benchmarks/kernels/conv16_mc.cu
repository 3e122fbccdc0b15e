// The bf16 filter gradient fed by TMA in clusters of two blocks that share dy's tiles ("mc" tiles, sm_90a; sandbox,
// conv16_mc.py): hn_convt_filter's GEMM, C[M = O, N = R S C] += A[M, K] B[K, N] over K = images x P x Q, where the two
// blocks of a cluster (blockIdx.x 2 i and 2 i + 1: the same rows m0 of dw and the same K part, columns n0 and n0 + BN)
// read the same A = dy tile of each K tile. Each block's producer loads half of A's BM / 64 boxes with TMA multicast,
// which writes a box into both blocks' shared memory at the same offset and completes its bytes on both blocks' "full"
// mbarriers, and its own B boxes alone: a K tile then reads BM x 64 / 2 + BN x 64 bf16 from L2 a block instead of
// (BM + BN) x 64. A stage is refilled only when both blocks' consumers are done with it (the peer's multicast writes
// into it too): consumer thread t arrives on the "empty" mbarrier of the block of rank t % 2, so each block's barrier
// counts half of every warpgroup of both blocks (a warpgroup's wgmma has finished reading once any of its threads has
// seen it retire). The blocks meet at a cluster barrier after the mbarriers' initialisation (no multicast into an
// uninitialised barrier) and before they exit (no arrival on, or copy into, a block that has left).
// Not in the emulator (it has no clusters); time_cl_tiles.py checks each output against the first shipped tile's.
#include "mma.cu"

#ifndef HN_EMULATE

// This block's rank in its cluster.
__device__ __forceinline__ unsigned hn_cluster_rank() {
    unsigned r = 0;
    HN_SM90A(asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r)));
    return r;
}
// Every thread of the cluster that has not exited arrives, then waits for the others (release / acquire).
__device__ __forceinline__ void hn_cluster_sync() {
    HN_SM90A(asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" :::
                              "memory"));
}
// The shared::cluster address of this block's shared-memory object p in the block of rank `rank`.
__device__ __forceinline__ unsigned hn_mapa(const void* p, unsigned rank) {
    unsigned r = 0;
    HN_SM90A(asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(r) : "r"(hn_smem_addr(p)), "r"(rank)));
    return r;
}
// One arrival (a release at cluster scope) on the mbarrier at shared::cluster address `bar`.
__device__ __forceinline__ void hn_mbar_arrive_cluster(unsigned bar) {
    HN_SM90A(asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];\n" ::"r"(bar) : "memory"));
}
// hn_tma_tile2d multicast to the blocks of `mask` (bit r: rank r): the box lands at dst's offset in each, its bytes
// completing on the mbarrier at bar's offset in each.
__device__ __forceinline__ void hn_tma_tile2d_mc(void* dst, const HnTensorMap& map, int col, int row, void* bar,
                                                 unsigned short mask) {
    HN_SM90A(asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
                          ".multicast::cluster [%0], [%1, {%2, %3}], [%4], %5;\n" ::"r"(hn_smem_addr(dst)),
                          "l"(reinterpret_cast<unsigned long long>(&map)), "r"(col), "r"(row), "r"(hn_smem_addr(bar)),
                          "h"(mask)
                          : "memory"));
}

#endif

// hn_convt_filter in a cluster of two along N (see above): WGM x WGN consumer warpgroups of 64 x WN and a producer
// warp, STAGES stages, shared memory as hn_convt_filter's. The grid's x is even (a block past N loads its share of A
// for its peer and writes nothing).
template <int WGM, int WGN, int WN, int STAGES>
__device__ __forceinline__ void hn_convt_filter_mc(unsigned char* smem, const HnTensorMap& amap,
                                                   const HnTensorMap& bmap, float* dw, int M, int N, int K, int splits,
                                                   int kchunk, const HnConv& cv) {
    using T = unsigned short;
    constexpr int CONSUMERS = 128 * WGM * WGN, BM = 64 * WGM, BN = WN * WGN, BK = 64, EA = BM * BK, EB = BN * BK;
    static_assert(STAGES >= 2 && WN % 64 == 0 && BM % 128 == 0, "64-column blocks, A's boxes in pairs");
    unsigned long long* full = reinterpret_cast<unsigned long long*>(smem);
    unsigned long long* empty = full + STAGES;
    T* sa = reinterpret_cast<T*>(hn_smem_align1024(smem + 16 * STAGES));
    T* sb = sa + STAGES * EA;
    const HnBlock blk = hn_block(nullptr, nullptr, dw, M, N, K, 0, 0, N, 0, 0, 0, 1.f, 1.f, splits, kchunk, BM, BN, BK);
    const int tid = threadIdx.x, gm = tid / 128 / WGN, gn = tid / 128 % WGN;
    const unsigned rank = hn_cluster_rank();
    if (tid == 0) {
        for (int s = 0; s < STAGES; ++s) {
            hn_mbar_init(full + s, 1);
            hn_mbar_init(empty + s, CONSUMERS);      // half of this block's consumers and half of its peer's
        }
        hn_fence_mbar_init();
    }
    hn_cluster_sync();
    if (tid >= CONSUMERS) {
        if (tid == CONSUMERS)
            for (int kt = 0; kt < blk.tiles; ++kt) {
                const int s = kt % STAGES, k0 = blk.kbeg + kt * BK;
                while (!hn_mbar_try_wait(empty + s, ((kt / STAGES) & 1) ^ 1)) {}   // (a fresh barrier passes parity 1)
                hn_mbar_arrive_tx(full + s, 2u * (EA + EB));
#pragma unroll
                for (int j = rank; j < BM / 64; j += 2)      // this block's half of A, into both blocks
                    hn_tma_tile2d_mc(sa + s * EA + j * 4096, amap, blk.m0 + 64 * j, k0, full + s, 3);
                hn_convt_filter_x_boxes<BN>(sb + s * EB, bmap, blk.n0, N, k0, cv, full + s);
            }
        return;
    }
    // the consumers: hn_ws_consume, each thread releasing a stage in the block of rank tid % 2
    const unsigned release = hn_mapa(empty, tid & 1);
    float acc[1][WN / 8][4];
    hn_zero(acc);
    hn_ws_consume<STAGES, WN, 1>(full, 0, blk.tiles, sa + gm * 64 * BK, EA, sb + gn * WN * BK, EB, 16 * 64, acc[0],
                                 [](const T* p) { return hn_wgmma_desc_mn(p); },
                                 [&](int stage) { hn_mbar_arrive_cluster(release + 8 * stage); });
    hn_epilogue<1, WN / 8>(blk, acc, M, N, N, 1.f, 1.f, 64 * gm + 16 * ((tid >> 5) & 3), WN * gn, tid & 31);
    hn_cluster_sync();
}

// HN_CONV16MC(name, WGM, WGN, WN, ST, MINB): HN_CONV16T's filter gradient (EPI 3) on hn_convt_filter_mc, in clusters
// of two blocks along x.
#define HN_CONV16MC(name, WGM, WGN, WN, ST, MINB)                                                                 \
    extern "C" __global__ void __cluster_dims__(2, 1, 1) __launch_bounds__(128 * WGM * WGN + 32, MINB) name(      \
        const unsigned short* __restrict__ B, const unsigned short* __restrict__ Wt, const float* __restrict__ AUX,  \
        float* __restrict__ Y, int M, int N, int K, int C, int H, int W, int R, int S, int P, int Q, int O,         \
        int stride, int pad, int act, int splits, int kchunk, const __grid_constant__ HnTensorMap amap,            \
        const __grid_constant__ HnTensorMap bmap) {                                                              \
        HN_DYNAMIC_SMEM(hn_smem);                                                                              \
        const HnConv cv = hn_conv16_of<3>(AUX, C, H, W, R, S, P, Q, O, stride, pad, act, kchunk);              \
        hn_convt_filter_mc<WGM, WGN, WN, ST>(hn_smem, amap, bmap, Y, M, N, K, splits, kchunk, cv);              \
    }
