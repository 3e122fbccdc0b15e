// The tf32 filter gradient on wgmma with x's fragments in registers ("fr" tiles, sm_90a; sandbox, conv32_fr.py):
// C[M = O, N = R S C] += dy^T x over K = images x P x Q, computed as its transpose C^T[(r, s, c)][o] = sum_k X[k][(r,
// s, c)] dy[k][o] on wgmma m64nBMk8 .tf32:
//   - wgmma's A (64 rows (r, s, c) a warpgroup x 8 k) from registers. x is gathered as hn_conv_filter_sync gathers it
//     (hn_nhwc_copy_x_taps: rows k of BN + 8 floats, MN-major), and each thread reads its fragments with scalar LDS:
//     a warp's rows 16w + g (+8) at k = t (+4), words 8 (k + ...) + g + const mod 32 under the row stride of
//     BN + 8 = 8 mod 32 words, so no bank conflicts; 16 LDS a K tile of 32, for 4 wgmma. A K tile of BK = 64 holds
//     8 K steps: half the barriers and waits a K step, twice the registers of fragments.
//   - wgmma's B from a K-major copy of dy, dyt [O][ldk] (ldk = K rounded up to 4, zeros past K; float32 already
//     rounded to tf32), copied by cp.async in 16-byte chunks under the 128-byte swizzle (HnSwizzle128T<float>, rows o
//     of 32 k; a K tile of 64 as two such halves). wgmma reads tf32 operands K-major only, and the channels-last dy
//     is MN-major: dyt is the one operand stored the other way, a copy the producer of dy would write beside its
//     channels-last one.
// So a K tile has no transposing pass and a quarter of the mma.sync tile's loads (hn_gemm_tf32_tile reads 128 for 128
// mma.sync of a 64 x 64 warp tile).
// Pipeline (hn_wgmma_pipeline's with one wgmma group in flight): K tile kt waits for its copies, fences the async
// proxy, meets the barrier (every warpgroup's wgmma of kt - 2 retired, so stage (kt - 2) % STAGES is free), issues the
// copies of kt + STAGES - 2 into it, loads its fragments into register set kt % 2 (the set of kt - 2, retired), then
// its BK / 8 wgmma and a wait until one group is pending (none after the last tile). The K loop runs two tiles an
// iteration so that the register set is a compile-time index. (ptxas waits for every group before the back edge,
// C7517, where the paths of the conditional second tile join: every other K tile's wgmma does not overlap the next
// tile's loads. Peeling an odd last tile out of the loop removes that wait, but spills at 128 registers.) WGN
// warpgroups take 64 rows (r, s, c) each and all BM columns o; the K sum split over blockIdx.z and added with
// atomics. hn_block's m0 / n0 are the o / (r, s, c) starts (the planner's M = O, N = R S C).
#include "mma.cu"

#ifndef HN_EMULATE
// d += A B for the warpgroup's 64 x N tile, K = 8, tf32: A from registers in mma.sync m16n8k8's A fragment order per
// warp (warp w of the group: a[0] at row 16w + g, column t; a[1] row + 8; a[2] column + 4; a[3] both; PTX ISA
// 9.7.15.5.2), B 8 x N K-major in shared memory (db). a must not be written until the wgmma's group is retired.
#define HN_FR_D4(j) "+f"(d[j][0]), "+f"(d[j][1]), "+f"(d[j][2]), "+f"(d[j][3])
#define HN_FR_D16(j) HN_FR_D4(j), HN_FR_D4(j + 1), HN_FR_D4(j + 2), HN_FR_D4(j + 3)
#define HN_FR_R32                                                                                               \
    "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                                    \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define HN_FR_R64                                                                                               \
    HN_FR_R32 ", %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "              \
    "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define HN_FR_R128                                                                                              \
    HN_FR_R64 ", %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "              \
    "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "                          \
    "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "              \
    "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
template <int N>
__device__ __forceinline__ void hn_wgmma_tf32_ra(float (&d)[N / 8][4], const unsigned (&a)[4],
                                                 unsigned long long db) {
    static_assert(N == 64 || N == 128 || N == 256, "wgmma tile");
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    if constexpr (N == 64) {
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n64k8.f32.tf32.tf32 {" HN_FR_R32
                     "}, {%32, %33, %34, %35}, %36, p, 1, 1;\n}\n"
                     : HN_FR_D16(0), HN_FR_D16(4)
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
    }
    if constexpr (N == 128) {
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n128k8.f32.tf32.tf32 {" HN_FR_R64
                     "}, {%64, %65, %66, %67}, %68, p, 1, 1;\n}\n"
                     : HN_FR_D16(0), HN_FR_D16(4), HN_FR_D16(8), HN_FR_D16(12)
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
    }
    if constexpr (N == 256) {
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n256k8.f32.tf32.tf32 {" HN_FR_R128
                     "}, {%128, %129, %130, %131}, %132, p, 1, 1;\n}\n"
                     : HN_FR_D16(0), HN_FR_D16(4), HN_FR_D16(8), HN_FR_D16(12), HN_FR_D16(16), HN_FR_D16(20),
                       HN_FR_D16(24), HN_FR_D16(28)
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
    }
#else
    __trap();
#endif
}
#undef HN_FR_R128
#undef HN_FR_R64
#undef HN_FR_R32
#undef HN_FR_D16
#undef HN_FR_D4
#else
template <int N>
inline void hn_wgmma_tf32_ra(float (&d)[N / 8][4], const unsigned (&a)[4], unsigned long long db) {
    emu::wgmma<N, 8>(&d[0][0], 0, db, 4, false, "wgmma.mma_async.m64nNk8.tf32 (A in registers)", a);
}
#endif  // HN_EMULATE

// A register set's index as a type, so that a generic lambda's a[P] is a compile-time index.
template <int P>
struct HnFrSet {
    static constexpr int value = P;
};

template <int WGN, int BM, int BK, int STAGES>
__device__ __forceinline__ void hn_conv32_filter_fr(unsigned char* smem, const float* dyt, const float* x, float* dw,
                                                    int M, int N, int K, int splits, int kchunk, const HnConv& cv) {
    constexpr int BN = 64 * WGN, THREADS = 128 * WGN, AHEAD = STAGES - 2, KS = BK / 8;   // KS: K steps a tile
    constexpr int RX = BN + 8;                  // x's staging rows k (fragment reads conflict-free: RX = 8 mod 32)
    constexpr int EH = BM * 32, EB = EH * (BK / 32), SS = EB + BK * RX;   // a stage: dyt's K-major tile as BK / 32
                                                                          // halves [BM][32], then x's [BK][RX]
    static_assert(BM % 64 == 0 && BM <= 256 && (BM * 8) % THREADS == 0 && (SS * 4) % 1024 == 0 && AHEAD >= 1 &&
                  (BK == 32 || BK == 64), "tile: stages 1024-byte aligned, a stage filled while one is read by wgmma");
    float* st = reinterpret_cast<float*>(hn_smem_align1024(smem));

    const HnBlock blk = hn_block(nullptr, nullptr, dw, M, N, K, 0, 0, N, 0, 0, 0, 1.f, 1.f, splits, kchunk, BM, BN, BK);
    const int tid = threadIdx.x, gn = tid / 128, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int row = 64 * gn + 16 * ((tid >> 5) & 3) + g;     // this thread's fragment rows row, row + 8 of the tile
    const int ldk = (K + 3) & ~3;
    float acc[1][BM / 8][4];
    hn_zero(acc);
    unsigned a[2][KS][4];                                    // register set, K step, fragment
    const HnTapDivs dv = {hn_div_of(cv.c), hn_div_of(cv.s), hn_div_of(cv.p * cv.q), hn_div_of(cv.q)};

    auto issue = [&](int kt) {
        const int k0 = blk.kbeg + kt * BK;
        float* s = st + (kt % STAGES) * SS;
#pragma unroll
        for (int h = 0; h < BK / 32; ++h)
            hn_copy16_tile<BM, 8, HnSwizzle128T<float>, THREADS>(s + h * EH, dyt, ldk, blk.m0, M, k0 + 32 * h,
                                                                 blk.kend, tid);
        hn_nhwc_copy_x_taps<BK, BN / 4, HnRowTile<RX>, THREADS>(s + EB, x, cv, blk.n0, N, dv, k0, blk.kend, tid);
    };
    auto step = [&](auto set, int kt) {
        constexpr int P = decltype(set)::value;
        hn_cp_async_wait<AHEAD - 1>();
        hn_fence_proxy_async();
        __syncthreads();
        if (kt + AHEAD < blk.tiles) issue(kt + AHEAD);
        hn_cp_async_commit();
        const float* s = st + (kt % STAGES) * SS;
        const float* xs = s + EB + t * RX + row;
#pragma unroll
        for (int kk = 0; kk < KS; ++kk) {
            a[P][kk][0] = hn_bits(hn_lds(xs + 8 * kk * RX));
            a[P][kk][1] = hn_bits(hn_lds(xs + 8 * kk * RX + 8));
            a[P][kk][2] = hn_bits(hn_lds(xs + (8 * kk + 4) * RX));
            a[P][kk][3] = hn_bits(hn_lds(xs + (8 * kk + 4) * RX + 8));
        }
        const unsigned long long db = hn_wgmma_desc(s);   // half h's K step kk at EH h floats and 32 kk bytes on
        hn_wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < KS; ++kk)
            hn_wgmma_tf32_ra<BM>(acc[0], a[P][kk], hn_wgmma_desc_add(db, kk / 4 * (EH / 4) + 2 * (kk % 4)));
        hn_wgmma_commit();
        if (kt + 1 < blk.tiles)
            hn_wgmma_wait<1>();
        else
            hn_wgmma_wait<0>();
    };
    hn_pipeline_fill<AHEAD + 1>(blk.tiles, issue);
#pragma unroll 1
    for (int kt = 0; kt < blk.tiles; kt += 2) {
        step(HnFrSet<0>{}, kt);
        if (kt + 1 < blk.tiles) step(HnFrSet<1>{}, kt + 1);
    }
    hn_cp_async_wait<0>();
    // acc[0][j][2h + e]: C^T's row row + 8h (n), column 8j + 2t + e (m), added into C [M][N]
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int n = blk.n0 + row + 8 * h;
        if (n >= N) continue;
#pragma unroll
        for (int j = 0; j < BM / 8; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int m = blk.m0 + 8 * j + 2 * t + e;
                if (m >= M) continue;
                float* p = blk.C + (static_cast<long long>(m) * N + n);
                if (blk.atomic)
                    hn_atomic_add(p, acc[0][j][2 * h + e]);
                else
                    *p = acc[0][j][2 * h + e] + hn_ld_c(p);
            }
    }
}

// HN_CONV32FR(hn_conv32_filter_w128x128s4r, 2, 128, 32, 4, 1): the fr filter gradient with HN_CONV32F's arguments
// but Wt = dyt [O][ldk] (conv32_fr.py's dy_t), WGN warpgroups of 64 rows (r, s, c) x BM columns o, K tiles of BK (32
// or 64), ST stages, MINB blocks an SM; shared memory ST x (BM + 64 WGN + 8) x BK x 4 bytes and 1 KB to align them.
#define HN_CONV32FR(name, WGN, BM, BK, ST, MINB)                                                                      \
    extern "C" __global__ void __launch_bounds__(128 * WGN, MINB) name(                                          \
        const float* __restrict__ B, const float* __restrict__ Wt, const float* __restrict__ AUX,                 \
        float* __restrict__ Y, int M, int N, int K, int C, int H, int W, int R, int S, int P, int Q, int O,         \
        int stride, int pad, int act, int splits, int kchunk) {                                                   \
        HN_DYNAMIC_SMEM(hn_smem);                                                                              \
        const HnConv cv = hn_conv_of<3>(AUX, C, H, W, R, S, P, Q, O, stride, pad, act);                         \
        hn_conv32_filter_fr<WGN, BM, BK, ST>(hn_smem, Wt, B, Y, M, N, K, splits, kchunk, cv);                   \
    }
