// The tf32 filter gradient on mma.sync, x gathered from row tables, A's fragments read by 8-byte loads ("fv" tiles;
// sandbox, conv32_fv.py): hn_conv_filter_sync's tf32 tile (C[M = O, N = R S C] += A[M, K] B[K, N] over K = images x
// P x Q, A = dy [k][o] and B = x gathered [k][(r, s, c)], both tiles MN-major, rows k) with two changes: how B's
// chunks find their rows, and which of the warp's rows the mma tiles' rows stand for.
//   The shipped tile reads each fragment register by a 4-byte LDS: a K step of a 64 x 64 warp tile is 16 LDS for A
// and 16 for B, for 32 mma. Here mma row g + 8h of m tile i is the warp's row 16i + 2g + h, so lane (g, t)'s a[i][0]
// and a[i][1] (rows g and g + 8 at k = t) are adjacent floats, as are a[i][2] and a[i][3] (k = t + 4): two 8-byte
// loads a m tile, landing in the registers mma.sync reads (4 in a row), 8 LDS for A a K step. B's pair (k = t and
// t + 4 at one column) spans two rows of the tile, so B stays 16 4-byte LDS: 24 loads a K step instead of 32.
// (Reading 16 bytes for A and B alike takes 8 loads, but mma.sync's operands must be consecutive registers, and
// putting the values there cost ptxas about 500 register moves a K tile: slower than the loads saved.)
//   Rows of MN + 8 floats as hn_conv_filter_sync's (stride == 8 mod 32 words): a half warp's 8-byte A loads (g = 0..3
// or 4..7, t = 0..3) start at words 8t + 2g + const mod 32, 16 distinct bank pairs, so no bank conflicts.
//   The products are the same; only the epilogue knows the layout: acc[i][j][2h + e] (mma row g + 8h, column 2t + e)
// is C's element (wm + 16i + 2g + h, wn + 8j + 2t + e), added a pair of columns at a time, as hn_epilogue adds them.
//   B's gather from a table of its rows: hn_nhwc_copy_x_taps works out each 16-byte chunk's row k = (img, p, q) by two
// divisions, its bounds and its offset, about 20 instructions a chunk and 8 chunks a thread a K tile at 128 threads.
// Here warp 0 writes each K tile's 32 rows once, a K tile ahead, into one of two slots of a shared table (int4 a row:
// the offset of the window's corner ((img H + ih0) W + iw0) C, ih0 = p stride - pad, iw0 = q stride - pad; ih0 far
// below zero for rows from kend on), and a chunk is then one 16-byte load, two unsigned bound compares and an add of
// its tap's offset (r W + s) C + c, which is the thread's for every K tile. The first STAGES - 1 tiles, issued before
// the loop, gather as hn_nhwc_copy_x_taps does; the table of tile STAGES - 1 is written then, and K tile kt's
// iteration writes that of kt + STAGES into slot (kt + STAGES) % 2, read after the next barrier by the copies of
// kt + STAGES (issued at kt + 1); the slot's last reads, tile kt + STAGES - 2's copies, were before this iteration's
// barrier.
#include "mma.cu"

// Two floats from shared memory (8-byte aligned), one ld.shared.v2 (the emulator's: checked as hn_lds4 is).
#ifndef HN_EMULATE
__device__ __forceinline__ float2 hn_lds2(const float* p) {
    float2 v;
    asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n" : "=f"(v.x), "=f"(v.y) : "r"(hn_smem_addr(p)) : "memory");
    return v;
}
#else
inline float2 hn_lds2(const float* p) {
    emu::aligned(p, 8, "ld.shared.v2");
    emu::smem_read(p, 8, emu::me().linear, "ld.shared.v2");
    float2 v;
    std::memcpy(&v, p, 8);
    return v;
}
#endif

// One K step (8 of K, from kk) of a warp tile of MT x NT mma tiles from MN-major tiles of rows k (stride SA, SB
// floats; the warp's rows from wm, columns from wn), A's fragments by 8-byte loads in the fv layout above.
template <int SA, int SB, int MT, int NT>
__device__ __forceinline__ void hn_fv_kstep(const float* sa, const float* sb, float (&acc)[MT][NT][4], int wm, int wn,
                                            int kk, int lane) {
    const int g = lane >> 2, t = lane & 3;
    unsigned a[MT][4], b[NT][2];
#pragma unroll
    for (int i = 0; i < MT; ++i) {
        const float* pa = sa + (kk + t) * SA + wm + 16 * i + 2 * g;
        const float2 lo = hn_lds2(pa), hi = hn_lds2(pa + 4 * SA);
        a[i][0] = hn_bits(lo.x);      // (row g, k t)
        a[i][1] = hn_bits(lo.y);      // (row g + 8, k t)
        a[i][2] = hn_bits(hi.x);      // (row g, k t + 4)
        a[i][3] = hn_bits(hi.y);      // (row g + 8, k t + 4)
    }
#pragma unroll
    for (int j = 0; j < NT; ++j) {
        const int n = wn + 8 * j + g;
        b[j][0] = hn_bits(hn_lds(sb + (kk + t) * SB + n));
        b[j][1] = hn_bits(hn_lds(sb + (kk + t + 4) * SB + n));
    }
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j) hn_mma_tf32(acc[i][j], a[i], b[j]);
}

// Tile kt's row table (BK rows k from k0, int4 each as above) into `tab`, by threads 0 .. BK - 1.
template <int BK>
__device__ __forceinline__ void hn_fv_rows(int* tab, const HnConv& cv, const HnTapDivs& dv, int k0, int kend,
                                           int tid) {
    if (tid >= BK) return;
    const int k = k0 + tid;
    int off = 0, ih0 = -(1 << 30), iw0 = 0;
    if (k < kend) {
        const int img = hn_div(k, dv.pq), t = k - img * dv.pq.d, p = hn_div(t, dv.q), q = t - p * cv.q;
        ih0 = p * cv.stride - cv.pad;
        iw0 = q * cv.stride - cv.pad;
        off = ((img * cv.h + ih0) * cv.w + iw0) * cv.c;
    }
    hn_sts4(tab + 4 * tid, off, ih0, iw0, 0);
}

// B's tile from the row table `tab` (hn_nhwc_copy_x_taps's tile: rows k, CPR chunks of 4 channels of one tap a row,
// layout L); r, sx: this thread's tap, tap: its offset (r W + sx) C + c, in: its column n < N.
template <int ROWS, int CPR, class L, int THREADS>
__device__ __forceinline__ void hn_fv_copy_x(float* s, const float* x, const int* tab, const HnConv& cv, int r,
                                             int sx, int tap, bool in, int tid) {
    const int col = (tid % CPR) * 4;
#pragma unroll
    for (int i = 0; i < ROWS * CPR / THREADS; ++i) {
        const int row = tid / CPR + i * (THREADS / CPR);
        const float4 e = hn_lds4(reinterpret_cast<const float*>(tab + 4 * row));
        const int off = static_cast<int>(hn_bits(e.x)), ih0 = static_cast<int>(hn_bits(e.y));
        const int iw0 = static_cast<int>(hn_bits(e.z));
        const bool ok = in && static_cast<unsigned>(ih0 + r) < static_cast<unsigned>(cv.h) &&
                        static_cast<unsigned>(iw0 + sx) < static_cast<unsigned>(cv.w);
        hn_cp_chunk<0>(s + L::at(row, col), x, ok ? off + tap : 0, ok ? 16 : 0);
    }
}

// EARLY: the K steps of tile kt issued before the copies of tile kt + STAGES - 1 (0: all after them, as the shipped
// tile does), so that the tensor pipe has work while the copies' address arithmetic issues.
template <int BM, int BN, int WM, int WN, int STAGES, int EARLY>
__device__ __forceinline__ void hn_conv32_filter_fv(unsigned char* smem, const float* dy, const float* x, float* dw,
                                                    int M, int N, int K, int splits, int kchunk, const HnConv& cv) {
    constexpr int BK = 32, WARPS_N = BN / WN, THREADS = 32 * (BM / WM) * WARPS_N, MT = WM / 16, NT = WN / 8;
    constexpr int CPA = BM / 4, CPB = BN / 4, SA = BM + 8, SB = BN + 8;   // rows of MN + 8 floats
    static_assert(BM % WM == 0 && BN % WN == 0 && WM % 16 == 0 && WN % 8 == 0 && STAGES >= 2 && THREADS % CPB == 0 &&
                  (BK * CPA) % THREADS == 0 && (BK * CPB) % THREADS == 0 && EARLY >= 0 && EARLY <= BK / 8, "tile");
    float* sa = reinterpret_cast<float*>(smem);   // STAGES x BK x SA
    float* sb = sa + STAGES * BK * SA;            // STAGES x BK x SB
    int* tab = reinterpret_cast<int*>(sb + STAGES * BK * SB);   // 2 x BK x int4: the row tables

    const HnBlock blk = hn_block(nullptr, nullptr, dw, M, N, K, 0, 0, N, 0, 0, 0, 1.f, 1.f, splits, kchunk, BM, BN, BK);
    const HnThread th = hn_thread<WM, WN, WARPS_N>();
    const int tid = th.tid;
    float acc[MT][NT][4];
    hn_zero(acc);
    const HnTapDivs dv = {hn_div_of(cv.c), hn_div_of(cv.s), hn_div_of(cv.p * cv.q), hn_div_of(cv.q)};

    // this thread's column of B: tap (r, sx), channel c, all K tiles
    const int n = blk.n0 + (tid % CPB) * 4, rs = hn_div(n, dv.c), c = n - rs * cv.c, r = hn_div(rs, dv.s);
    const int sx = rs - r * cv.s, tap = (r * cv.w + sx) * cv.c + c;
    auto copy_a = [&](int kt) {
        hn_copy16_tile<BK, CPA, HnRowTile<SA>, THREADS>(sa + (kt % STAGES) * BK * SA, dy, cv.o, blk.kbeg + kt * BK,
                                                        blk.kend, blk.m0, M, tid);
    };
    hn_pipeline_fill<STAGES>(blk.tiles, [&](int kt) {      // tiles 0 .. STAGES - 2, B by divisions
        copy_a(kt);
        hn_nhwc_copy_x_taps<BK, CPB, HnRowTile<SB>, THREADS>(sb + (kt % STAGES) * BK * SB, x, cv, blk.n0, N, dv,
                                                             blk.kbeg + kt * BK, blk.kend, tid);
    });
    hn_fv_rows<BK>(tab + ((STAGES - 1) & 1) * 4 * BK, cv, dv, blk.kbeg + (STAGES - 1) * BK, blk.kend, tid);
    for (int kt = 0; kt < blk.tiles; ++kt) {
        hn_cp_async_wait<STAGES - 2>();
        __syncthreads();
        const int s = kt % STAGES;
        auto ksteps = [&](int from, int to) {
#pragma unroll
            for (int kk = 8 * from; kk < 8 * to; kk += 8)
                hn_fv_kstep<SA, SB, MT, NT>(sa + s * BK * SA, sb + s * BK * SB, acc, th.wm, th.wn, kk, th.lane);
        };
        ksteps(0, EARLY);
        const int next = kt + STAGES - 1;
        if (next < blk.tiles) {
            copy_a(next);
            hn_fv_copy_x<BK, CPB, HnRowTile<SB>, THREADS>(sb + (next % STAGES) * BK * SB, x, tab + (next & 1) * 4 * BK,
                                                          cv, r, sx, tap, n < N, tid);
        }
        hn_cp_async_commit();
        if (next + 1 < blk.tiles)
            hn_fv_rows<BK>(tab + ((next + 1) & 1) * 4 * BK, cv, dv, blk.kbeg + (next + 1) * BK, blk.kend, tid);
        ksteps(EARLY, BK / 8);
    }
    hn_cp_async_wait<0>();

    // C's elements (the layout above), a pair of columns at a time: added (split over K) or added into dw (beta 1)
    const int g = th.lane >> 2, t = th.lane & 3;
    const bool pair = (reinterpret_cast<unsigned long long>(blk.C) & 7) == 0 && (N & 1) == 0;
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int m = blk.m0 + th.wm + 16 * i + 2 * g + h;
            if (m >= M) continue;
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                const int col = blk.n0 + th.wn + 8 * j + 2 * t;     // even
                if (col >= N) continue;
                float* p = blk.C + (static_cast<long long>(m) * N + col);
                const float x0 = acc[i][j][2 * h], x1 = acc[i][j][2 * h + 1];
                const bool two = col + 1 < N;
                if (blk.atomic) {
                    if (two && pair) {
                        hn_atomic_add2(p, x0, x1);
                    } else {
                        hn_atomic_add(p, x0);
                        if (two) hn_atomic_add(p + 1, x1);
                    }
                } else {
                    hn_st(p, x0 + hn_ld_c(p));
                    if (two) hn_st(p + 1, x1 + hn_ld_c(p + 1));
                }
            }
        }
}

// HN_CONV32FV(hn_conv32_filter_128x128x32s4v, 128, 128, 64, 64, 4, 0): the fv filter gradient with HN_CONV32F's
// arguments (B = x, Wt = dy), warps of WM x WN, ST stages, EARLY K steps before the copies; shared memory
// ST x 32 x ((BM + 8) + (BN + 8)) x 4 bytes and 1 KB of row tables.
#define HN_CONV32FV(name, BM, BN, WM, WN, ST, EARLY)                                                              \
    extern "C" __global__ void __launch_bounds__(32 * (BM / WM) * (BN / WN), 1) name(                             \
        const float* __restrict__ B, const float* __restrict__ Wt, const float* __restrict__ AUX,                 \
        float* __restrict__ Y, int M, int N, int K, int C, int H, int W, int R, int S, int P, int Q, int O,         \
        int stride, int pad, int act, int splits, int kchunk) {                                                   \
        HN_DYNAMIC_SMEM(hn_smem);                                                                              \
        const HnConv cv = hn_conv_of<3>(AUX, C, H, W, R, S, P, Q, O, stride, pad, act);                         \
        hn_conv32_filter_fv<BM, BN, WM, WN, ST, EARLY>(hn_smem, Wt, B, Y, M, N, K, splits, kchunk, cv);         \
    }
