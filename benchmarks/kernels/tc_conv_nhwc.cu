// Sandbox (not shipped): bf16 tensor-core convolutions on channels-last tensors, to measure what 16-byte gathers buy
// against mma.cu's NCHW kernels (hn_conv_*_bf16_*) before the cuda backend's activations change layout:
//   hn_conv_nhwc_fwd_bf16_*     the forward, x and w in float32 (staged and rounded as mma.cu's "a" pipeline);
//   hn_conv_nhwc16_fwd_*        the forward, x and w stored in bf16 (cp.async straight into the bf16 tiles);
//   hn_conv_nhwc16_filter_*     the filter gradient, x and dy stored in bf16.
// benchmarks/kernels/run_tc_conv_nhwc.py checks each against float64 (on a GPU, or --emulate) and times it.
//
// The forward in float32:
// y[img][o][p][q] = act(b[o] + sum_k W[o][k] x(k; img, p, q)), the GEMM C[M, N] = A[M, K] B[K, N] with M = O,
// N = images x P x Q (n = (img * P + p) * Q + q), K = R x S x C (k = (r * S + s) * C + c: channels innermost),
// A = W stored [O][R][S][C] (K-major rows, lda = K), and B gathered from x stored [n][H][W][C]:
// B[k][n] = x[img][p*stride - pad + r][q*stride - pad + s][c], zero outside the image. B's tile is kept as its
// transpose (rows n, columns k: "B t"), so four consecutive k of one row are four consecutive channels of one pixel:
// one 16-byte cp.async when C is a multiple of 4 (the runner's condition), where the NCHW kernel issues four
// 4-byte ones. A thread's chunk column (k offset) is the same in all its rows and its rows (pixels) are the same in
// every K tile, so per K tile it divides one k (by C, then by S) and per chunk it adds and compares.
// The pipeline is mma.cu's bf16 "a" K loop (hn_bf16_async_loop: STAGES float32 tiles by cp.async, rounded into two
// bf16 tiles, fragments by ldmatrix) with this gather as its copy; the epilogue is the NCHW forward's.
#include "mma.cu"

// The pixels of the ROWS / (THREADS / CPR) chunk rows a thread copies (rows tid / CPR + i * THREADS / CPR): where
// the pixel's image starts in x (elements), and its window's top-left corner (out of range past N).
template <int NROWS>
struct HnNhwcRows {
    int base[NROWS], ih0[NROWS], iw0[NROWS];
};

template <int ROWS, int COLS, int THREADS>
__device__ __forceinline__ HnNhwcRows<ROWS * (COLS / 4) / THREADS> hn_nhwc_rows(const HnConv& cv, int n0, int N,
                                                                                 int tid) {
    constexpr int CPR = COLS / 4, NROWS = ROWS * CPR / THREADS;
    static_assert(THREADS % CPR == 0, "a thread's chunk column must be the same in every row it copies");
    HnNhwcRows<NROWS> rows;
#pragma unroll
    for (int i = 0; i < NROWS; ++i) {
        const int n = n0 + (tid + i * THREADS) / CPR;
        const int img = hn_div(n, cv.out_plane), t = n - img * cv.out_plane.d, p = t / cv.q, q = t - p * cv.q;
        rows.base[i] = img * cv.h * cv.w * cv.c;
        rows.ih0[i] = n >= N ? -(1 << 30) : p * cv.stride - cv.pad;
        rows.iw0[i] = q * cv.stride - cv.pad;
    }
    return rows;
}

// B^T's BN x BK tile (rows n, columns k0 .. k0+BK-1) gathered into shared memory (row stride STRIDE) in
// hn_copy_tile_async's chunk order, CPR 16-byte chunks a row (4 float32 or 8 bf16 channels of one tap); columns from
// kend on, and taps outside the image, zero-filled.
template <class T, int CPR, int STRIDE, int THREADS, int NROWS>
__device__ __forceinline__ void hn_nhwc_copy_b(T* s, const T* x, const HnConv& cv, const HnNhwcRows<NROWS>& rows,
                                               const HnDiv& by_c, int k0, int kend, int tid) {
    const int col = (tid % CPR) * (16 / static_cast<int>(sizeof(T))), k = k0 + col;
    const int rs = hn_div(k, by_c), c = k - rs * cv.c, r = hn_div(rs, cv.kb_inner), sx = rs - r * cv.s;
#pragma unroll
    for (int i = 0; i < NROWS; ++i) {
        const int ih = rows.ih0[i] + r, iw = rows.iw0[i] + sx;
        const bool ok = k < kend && ih >= 0 && ih < cv.h && iw >= 0 && iw < cv.w;
        const int at = ok ? rows.base[i] + (ih * cv.w + iw) * cv.c + c : 0;
        hn_cp_async16(s + ((tid + i * THREADS) / CPR) * STRIDE + col, x + at, ok ? 16 : 0);
    }
}

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
    const auto rows = hn_nhwc_rows<FB::ROWS, FB::COLS, THREADS>(cv, blk.n0, N, tid);
    const HnDiv by_c = hn_div_of(cv.c);

    auto issue = [&](int kt) {
        const int k0 = blk.kbeg + kt * BK, s = kt % STAGES;
        hn_copy_tile_async<FA::ROWS, FA::COLS, FA::STRIDE, THREADS>(fa + s * FA::ELEMS,
                                                                     hn_src<true>(W, K, blk.m0, k0, M, blk.kend), tid);
        hn_nhwc_copy_b<float, FB::COLS / 4, FB::STRIDE, THREADS>(fb + s * FB::ELEMS, x, cv, rows, by_c, k0, blk.kend,
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

// --- the same forward with x and w stored in bf16 (what activations kept in bf16 would give) -----------------------
//
// x bf16 [n][H][W][C], w bf16 [O][R][S][C] (their bits, as unsigned short): a chunk is 8 channels, and both tiles go
// by cp.async straight into the bf16 tiles the fragments are read from (no float32 staging, no conversion), STAGES
// deep. Iteration kt: wait for tile kt, barrier (tile kt visible to all; every warp done with tile kt-1), refill
// buffer (kt-1) % STAGES with tile kt+STAGES-1, multiply tile kt. C must be a multiple of 8.

// A's BM x BK tile (rows m of w, K-major) in 8-element chunks; rows from M on and columns from kend on zero-filled.
template <int ROWS, int CPR, int STRIDE, int THREADS>
__device__ __forceinline__ void hn_nhwc16_copy_a(unsigned short* s, const unsigned short* w, int K, int m0, int M,
                                                 int k0, int kend, int tid) {
#pragma unroll
    for (int i = 0; i < ROWS * CPR / THREADS; ++i) {
        const int q = tid + i * THREADS, row = q / CPR, col = (q % CPR) * 8, m = m0 + row, k = k0 + col;
        const bool ok = m < M && k < kend;
        hn_cp_async16(s + row * STRIDE + col, w + (ok ? static_cast<long long>(m) * K + k : 0), ok ? 16 : 0);
    }
}

// The K loop when both tiles are copied in bf16 (issue(kt): K tile kt's cp.async into stage kt % STAGES of sa / sb,
// layouts OA / OB), as described above; ends with every copy retired.
template <bool TA, bool TB, class OA, class OB, int STAGES, int BK, int MT, int NT, class Issue>
__device__ __forceinline__ void hn_bf16_direct_loop(const unsigned short* sa, const unsigned short* sb, int tiles,
                                                    const HnThread& th, float (&acc)[MT][NT][4], const Issue& issue) {
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < tiles) issue(s);
        hn_cp_async_commit();
    }
    for (int kt = 0; kt < tiles; ++kt) {
        const int s = kt % STAGES;
        hn_cp_async_wait<STAGES - 2>();
        __syncthreads();
        if (kt + STAGES - 1 < tiles) issue(kt + STAGES - 1);
        hn_cp_async_commit();
        hn_gemm_bf16_tile<TA, TB, OA, OB, MT, NT, BK>(sa + s * OA::ELEMS, sb + s * OB::ELEMS, acc, th.wm, th.wn,
                                                      th.lane);
    }
    hn_cp_async_wait<0>();
}

template <int BM, int BN, int BK, int WM, int WN, int STAGES>
__device__ __forceinline__ void hn_conv_nhwc16(unsigned char* smem, const unsigned short* W, const unsigned short* x,
                                               float* y, int M, int N, int K, const HnConv& cv) {
    constexpr int WARPS_N = BN / WN, THREADS = 32 * (BM / WM) * WARPS_N, MT = WM / 16, NT = WN / 8, CPR = BK / 8;
    static_assert(BM % WM == 0 && BN % WN == 0 && WM % 16 == 0 && WN % 16 == 0 && BK % 16 == 0 && STAGES >= 2 &&
                  THREADS % CPR == 0 && (BN * CPR) % THREADS == 0 && (BM * CPR) % THREADS == 0, "tile");
    using OA = HnOperand<true, BM, BK, 8, 8>;
    using OB = HnOperand<true, BN, BK, 8, 8>;
    constexpr int NROWS = BN * CPR / THREADS;
    unsigned short* sa = reinterpret_cast<unsigned short*>(smem);   // STAGES x OA::ELEMS
    unsigned short* sb = sa + STAGES * OA::ELEMS;                    // STAGES x OB::ELEMS

    const HnBlock blk = hn_block(nullptr, nullptr, y, M, N, K, K, 0, 0, 0, 0, 0, 1.f, 0.f, 1, K, BM, BN, BK);
    const HnThread th = hn_thread<WM, WN, WARPS_N>();
    const int tid = th.tid, tiles = blk.tiles;
    float acc[MT][NT][4];
    hn_zero(acc);
    const auto rows = hn_nhwc_rows<BN, BK / 2, THREADS>(cv, blk.n0, N, tid);   // chunks of 8: CPR = (BK / 2) / 4
    static_assert(sizeof(rows.base) / sizeof(int) == NROWS, "rows per thread");
    const HnDiv by_c = hn_div_of(cv.c);

    auto issue = [&](int kt) {
        const int k0 = kt * BK, s = kt % STAGES;
        hn_nhwc16_copy_a<BM, CPR, OA::STRIDE, THREADS>(sa + s * OA::ELEMS, W, K, blk.m0, M, k0, K, tid);
        hn_nhwc_copy_b<unsigned short, CPR, OB::STRIDE, THREADS>(sb + s * OB::ELEMS, x, cv, rows, by_c, k0, K,
                                                                 tid);
    };
    hn_bf16_direct_loop<false, true, OA, OB, STAGES, BK>(sa, sb, tiles, th, acc, issue);
    hn_conv_epilogue<1, MT, NT>(blk, acc, M, N, cv, th.wm, th.wn, th.lane);
}

// As HN_CONV_NHWC, with B = x and Wt = w as bf16 bits; shared memory STAGES x (BM + BN) x (BK + 8) x 2 bytes.
#define HN_CONV_NHWC16(name, BM, BN, BK, WM, WN, ST, MINB)                                                        \
    extern "C" __global__ void __launch_bounds__(32 * (BM / WM) * (BN / WN), MINB) name(                         \
        const unsigned short* __restrict__ B, const unsigned short* __restrict__ Wt, const float* __restrict__ AUX,  \
        float* __restrict__ Y, int M, int N, int K, int C, int H, int W, int R, int S, int P, int Q, int O,         \
        int stride, int pad, int act, int splits, int kchunk) {                                                   \
        HN_DYNAMIC_SMEM(hn_smem);                                                                              \
        const HnConv cv = hn_conv_of<1>(AUX, C, H, W, R, S, P, Q, O, stride, pad, act);                         \
        hn_conv_nhwc16<BM, BN, BK, WM, WN, ST>(hn_smem, Wt, B, Y, M, N, K, cv);                                 \
    }

HN_CONV_NHWC16(hn_conv_nhwc16_fwd_128x128x32s4, 128, 128, 32, 64, 32, 4, 1)
HN_CONV_NHWC16(hn_conv_nhwc16_fwd_128x128x32s4b2, 128, 128, 32, 64, 32, 4, 2)
HN_CONV_NHWC16(hn_conv_nhwc16_fwd_64x64x32s4, 64, 64, 32, 32, 32, 4, 1)

// --- the filter gradient with x and dy stored in bf16 channels-last ------------------------------------------------
//
// dw[o][(r, s, c)] += sum over k = (img, p, q) of dy[img][p][q][o] x[img][p*stride - pad + r][q*stride - pad + s][c]:
// the GEMM C[M, N] += A[M, K] B[K, N] with M = O, N = R x S x C (channels innermost, dw stored [O][R][S][C]),
// K = images x P x Q. A is dy as stored ([k][o]: rows k, eight o per chunk, O a multiple of 8) and B is x gathered
// (rows k, eight channels per chunk of one tap, C a multiple of 8), both kept with rows along k ("A t", "B n") and
// read by ldmatrix.trans. A thread's B chunk columns (taps) are fixed, its rows k move by BK per tile: per tile it
// divides its rows' k (by P x Q, then Q). K is split over blockIdx.z (kchunk each), the parts added into dw with
// atomics as the GEMM's split-K (dw holds its earlier sum: beta 1).
template <int ROWS, int CPR, int STRIDE, int THREADS>
__device__ __forceinline__ void hn_nhwc16_copy_dy(unsigned short* s, const unsigned short* dy, int O, int m0, int M,
                                                  int k0, int kend, int tid) {
#pragma unroll
    for (int i = 0; i < ROWS * CPR / THREADS; ++i) {
        const int q = tid + i * THREADS, row = q / CPR, col = (q % CPR) * 8, k = k0 + row, m = m0 + col;
        const bool ok = k < kend && m < M;
        hn_cp_async16(s + row * STRIDE + col, dy + (ok ? static_cast<long long>(k) * O + m : 0), ok ? 16 : 0);
    }
}

// The divisors of the filter gradient's gathers: a column n = (r, s, c) by C and S, a row k = (img, p, q) by P x Q
// and Q.
struct HnTapDivs {
    HnDiv c, s, pq, q;
};

template <int ROWS, int CPR, int STRIDE, int THREADS>
__device__ __forceinline__ void hn_nhwc16_copy_x_taps(unsigned short* s, const unsigned short* x, const HnConv& cv,
                                                      int n0, int N, const HnTapDivs& dv, int k0, int kend, int tid) {
    const int col = (tid % CPR) * 8, n = n0 + col;                  // this thread's columns: one tap, 8 channels
    const int rs = hn_div(n, dv.c), c = n - rs * cv.c, r = hn_div(rs, dv.s), sx = rs - r * cv.s;
#pragma unroll
    for (int i = 0; i < ROWS * CPR / THREADS; ++i) {
        const int row = (tid + i * THREADS) / CPR, k = k0 + row;
        const int img = hn_div(k, dv.pq), t = k - img * dv.pq.d, p = hn_div(t, dv.q), q = t - p * cv.q;
        const int ih = p * cv.stride - cv.pad + r, iw = q * cv.stride - cv.pad + sx;
        const bool ok = k < kend && n < N && ih >= 0 && ih < cv.h && iw >= 0 && iw < cv.w;
        const int at = ok ? ((img * cv.h + ih) * cv.w + iw) * cv.c + c : 0;
        hn_cp_async16(s + row * STRIDE + col, x + at, ok ? 16 : 0);
    }
}

template <int BM, int BN, int BK, int WM, int WN, int STAGES>
__device__ __forceinline__ void hn_conv_filter_nhwc16(unsigned char* smem, const unsigned short* dy,
                                                      const unsigned short* x, float* dw, int M, int N, int K,
                                                      int splits, int kchunk, const HnConv& cv) {
    constexpr int WARPS_N = BN / WN, THREADS = 32 * (BM / WM) * WARPS_N, MT = WM / 16, NT = WN / 8;
    constexpr int CPA = BM / 8, CPB = BN / 8;
    static_assert(BM % WM == 0 && BN % WN == 0 && WM % 16 == 0 && WN % 16 == 0 && BK % 16 == 0 && STAGES >= 2 &&
                  THREADS % CPB == 0 && (BK * CPA) % THREADS == 0 && (BK * CPB) % THREADS == 0, "tile");
    using OA = HnOperand<false, BM, BK, 8, 8>;   // rows k
    using OB = HnOperand<false, BN, BK, 8, 8>;
    unsigned short* sa = reinterpret_cast<unsigned short*>(smem);
    unsigned short* sb = sa + STAGES * OA::ELEMS;

    const HnBlock blk = hn_block(nullptr, nullptr, dw, M, N, K, 0, 0, N, 0, 0, 0, 1.f, 1.f, splits, kchunk, BM, BN, BK);
    const HnThread th = hn_thread<WM, WN, WARPS_N>();
    const int tid = th.tid, tiles = blk.tiles;
    float acc[MT][NT][4];
    hn_zero(acc);
    const HnTapDivs dv = {hn_div_of(cv.c), hn_div_of(cv.s), hn_div_of(cv.p * cv.q), hn_div_of(cv.q)};

    auto issue = [&](int kt) {
        const int k0 = blk.kbeg + kt * BK, s = kt % STAGES;
        hn_nhwc16_copy_dy<BK, CPA, OA::STRIDE, THREADS>(sa + s * OA::ELEMS, dy, cv.o, blk.m0, M, k0, blk.kend, tid);
        hn_nhwc16_copy_x_taps<BK, CPB, OB::STRIDE, THREADS>(sb + s * OB::ELEMS, x, cv, blk.n0, N, dv, k0, blk.kend,
                                                            tid);
    };
    hn_bf16_direct_loop<true, false, OA, OB, STAGES, BK>(sa, sb, tiles, th, acc, issue);
    hn_epilogue<MT, NT>(blk, acc, M, N, N, 1.f, 1.f, th.wm, th.wn, th.lane);
}

// B = x and Wt = dy as bf16 bits, Y = dw [O][R][S][C] float32, added into; grid.z = splits parts of kchunk.
#define HN_CONV_FILTER_NHWC16(name, BM, BN, BK, WM, WN, ST, MINB)                                                 \
    extern "C" __global__ void __launch_bounds__(32 * (BM / WM) * (BN / WN), MINB) name(                         \
        const unsigned short* __restrict__ B, const unsigned short* __restrict__ Wt, const float* __restrict__ AUX,  \
        float* __restrict__ Y, int M, int N, int K, int C, int H, int W, int R, int S, int P, int Q, int O,         \
        int stride, int pad, int act, int splits, int kchunk) {                                                   \
        HN_DYNAMIC_SMEM(hn_smem);                                                                              \
        const HnConv cv = hn_conv_of<3>(AUX, C, H, W, R, S, P, Q, O, stride, pad, act);                         \
        hn_conv_filter_nhwc16<BM, BN, BK, WM, WN, ST>(hn_smem, Wt, B, Y, M, N, K, splits, kchunk, cv);          \
    }

HN_CONV_FILTER_NHWC16(hn_conv_nhwc16_filter_128x128x32s4, 128, 128, 32, 64, 32, 4, 1)
HN_CONV_FILTER_NHWC16(hn_conv_nhwc16_filter_64x64x32s4, 64, 64, 32, 32, 32, 4, 1)
