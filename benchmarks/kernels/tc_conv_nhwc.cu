// Sandbox (not shipped): bf16 tensor-core convolutions on channels-last tensors that lost to what ships, kept for
// benchmarks/kernels/run_tc_conv_nhwc.py, which checks each against float64 (on a GPU, or --emulate) and times it
// beside the shipped ones (mma.cu's NCHW hn_conv_*_bf16_* and channels-last hn_conv16_*):
//   hn_conv_nhwc_fwd_bf16_*          the forward with x and w in float32 channels-last (staged and rounded as mma.cu's
//                                    "a" pipeline): 16-byte gathers, but float32 staging;
//   hn_conv16_fwd_128x128x32s4       the shipped channels-last bf16 forward (HN_CONV16) on one block per SM;
//   hn_conv16_*_128x128x64s3*, hn_conv16_fwd_128x256x32s3   HN_CONV16 on other block tiles (not yet timed).
//
// The forward in float32: y[img][o][p][q] = act(b[o] + sum_k W[o][k] x(k; img, p, q)), the GEMM of mma.cu's HN_CONV16
// forward (K = R x S x C, channels innermost; A = W stored [O][R][S][C], B gathered from x stored [n][H][W][C] by
// hn_nhwc_copy_b, four float32 channels per 16-byte chunk: C a multiple of 4), through mma.cu's bf16 "a" K loop
// (hn_bf16_async_loop: STAGES float32 tiles by cp.async, rounded into two bf16 tiles, fragments by ldmatrix); the
// epilogue is the NCHW forward's.
#include "mma.cu"

template <int BM, int BN, int BK, int WM, int WN, int STAGES>
__device__ __forceinline__ void hn_conv_nhwc_bf16(unsigned char* smem, const float* W, const float* x, float* y, int M,
                                                  int N, int K, const HnConv& cv) {
    constexpr int WARPS_N = BN / WN, THREADS = 32 * (BM / WM) * WARPS_N, MT = WM / 16, NT = WN / 8;
    static_assert(BM % WM == 0 && BN % WN == 0 && WM % 16 == 0 && WN % 16 == 0 && BK % 16 == 0 && STAGES >= 2,
                  "tile");
    using FA = HnOperand<true, BM, BK, 0, 0>;    // float32 staging: A as stored (rows m), B^T (rows n)
    using FB = HnOperand<true, BN, BK, 0, 0>;
    using OA = HnOperand<true, BM, BK, 8, 8>;    // bf16 tiles
    using OB = HnOperand<true, BN, BK, 8, 8>;
    float* fa = reinterpret_cast<float*>(smem);
    float* fb = fa + STAGES * FA::ELEMS;
    unsigned short* sa = reinterpret_cast<unsigned short*>(fb + STAGES * FB::ELEMS);
    unsigned short* sb = sa + 2 * OA::ELEMS;

    const HnBlock blk = hn_block(W, x, y, M, N, K, K, 0, 0, 0, 0, 0, 1.f, 0.f, 1, K, BM, BN, BK);
    const HnThread th = hn_thread<WM, WN, WARPS_N>();
    const int tid = th.tid, tiles = blk.tiles;
    float acc[MT][NT][4];
    hn_zero(acc);
    const auto rows = hn_nhwc_rows<1, FB::ROWS, FB::COLS, THREADS>(cv, blk.n0, N, tid);
    const HnDiv by_c = hn_div_of(cv.c);

    auto issue = [&](int kt) {
        const int k0 = blk.kbeg + kt * BK, s = kt % STAGES;
        hn_copy_tile_async<FA::ROWS, FA::COLS, FA::STRIDE, THREADS>(fa + s * FA::ELEMS,
                                                                     hn_src<true>(W, K, blk.m0, k0, M, blk.kend), tid);
        hn_nhwc_copy_b<float, FB::COLS / 4, HnRowTile<FB::STRIDE>, THREADS>(fb + s * FB::ELEMS, x, cv, rows, by_c, k0, blk.kend,
                                                                 tid);
    };
    hn_bf16_async_loop<false, true, FA, FB, OA, OB, STAGES, THREADS, BK>(fa, fb, sa, sb, tiles, th, acc, issue);
    hn_conv_epilogue<1, MT, NT>(blk, acc, M, N, cv, th.wm, th.wn, th.lane);
}

// The kernel, with mma.cu's HN_CONV parameters: B = x [n][H][W][C], Wt = w [O][R][S][C], AUX = bias or null, Y = y
// [n][O][P][Q]; splits and kchunk unused (1 and K).
#define HN_CONV_NHWC(name, BM, BN, BK, WM, WN, ST, MINB)                                                          \
    extern "C" __global__ void __launch_bounds__(32 * (BM / WM) * (BN / WN), MINB) name(HN_CONV_PARAMS) {        \
        HN_DYNAMIC_SMEM(hn_smem);                                                                              \
        const HnConv cv = hn_conv_of<1>(AUX, C, H, W, R, S, P, Q, O, stride, pad, act);                         \
        hn_conv_nhwc_bf16<BM, BN, BK, WM, WN, ST>(hn_smem, Wt, B, Y, M, N, K, cv);                              \
    }

HN_CONV_NHWC(hn_conv_nhwc_fwd_bf16_128x128x32s3a, 128, 128, 32, 64, 32, 3, 1)
HN_CONV_NHWC(hn_conv_nhwc_fwd_bf16_64x64x32s4a, 64, 64, 32, 32, 32, 4, 1)


// --- the channels-last bf16 forward (mma.cu's HN_CONV16) on one block per SM --------------------------------------

HN_CONV16(hn_conv16_fwd_128x128x32s4, 1, 128, 128, 32, 64, 32, 4, 1)

// --- HN_CONV16 on other block tiles, for the next measurement (not yet timed) ----------------------------------------
// BK = 64: half the barriers and K-tile starts per product, four chunk rows per thread (more gather registers);
// 3 stages of 110.6 KB, one or (within 227 KB per SM) two blocks per SM. 128 x 256: each gathered B row feeds twice
// the products (warp tile 64 x 64, 128 accumulators a thread), one block per SM.
HN_CONV16(hn_conv16_fwd_128x128x64s3, 1, 128, 128, 64, 64, 32, 3, 1)
HN_CONV16(hn_conv16_fwd_128x128x64s3b2, 1, 128, 128, 64, 64, 32, 3, 2)
HN_CONV16(hn_conv16_fwd_128x256x32s3, 1, 128, 256, 32, 64, 64, 3, 1)
HN_CONV16(hn_conv16_filter_128x128x64s3, 3, 128, 128, 64, 64, 32, 3, 1)
