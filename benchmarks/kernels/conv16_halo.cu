// Sandbox: the stride-1 convolution forward (EPI 1), data gradient as a forward (EPI 2), pooled forward (EPI 4) and
// filter gradient (EPI 3, below) on wgmma with the input read once per block as a halo instead of gathered once per
// tap ("h" and "hf" tiles, conv16_halo.py; bf16, and tf32 / fp32 but for the filter gradient). Correct on the H200 and
// 1.2-2.3x slower than the package's tiles there (NOTES.md); time_cl_tiles.py times them beside the shipped tiles.
//
// The shipped forward (mma.cu hn_convw_fwd) gathers B = x im2col-style: every K tile is one tap's 64 channels of the
// block's 256 output pixels, so each input pixel is copied from L2 once per tap (9 times for 3 x 3), each chunk's
// address computed by the threads that also issue the products. Here the output pixels are numbered in a frame: the
// images one after another, each Hp = H + pad rows of Wp = W + pad columns, pixel (h, w) at frame row pad + h, column
// pad + w and zeros elsewhere, so that one image's padding on the right (bottom) is the next row's (image's) on the
// left (top). Output (img, p, q) is virtual column v = (img Hp + p) Wp + q and its tap (r, s) reads the frame at
// u = v + r Wp + s, the same shift for every column: q + s < Wp + pad, so a read past a row's end lands in the next
// row's zeros (pad <= S - 1 keeps Q <= Wp; likewise the rows). So a block of BN consecutive columns v0 .. v0 + BN - 1
// reads the frame's rows u in [v0, v0 + BN + (R - 1) Wp + S - 1) (the halo), and tap (r, s)'s B tile is the halo from
// row r Wp + s on. Columns with p >= P or q >= Q ((Hp Wp - P Q) / Hp Wp of the GEMM: 6% at 32 x 32, 11% at 16 x 16,
// 21% at 8 x 8, 36% at 4 x 4 for 3 x 3 at pad 1) are computed and dropped.
//
// Warpgroup (gm, gn) of WGM x WGN computes rows 64 gm .., columns WN gn .. of the block's BM x BN tile.
// Shared memory (bf16; tf32 and fp32 alike with 32 float32 channels in place of 64 bf16, hn_conv_halo): STAGES A
// tiles (the weights' 64 channels of one tap, BM rows, the 128-byte swizzle as mma.cu's) and two halo buffers (channel
// chunk cc's in buffer cc % 2), each 8 regions of `rows` x 16 bytes: region j holds channels 8 j .. 8 j + 7 of every
// halo row, row i at 16 i. That is wgmma's K-major layout without swizzle (core matrices of 8 rows x 16 bytes, rows 16
// bytes apart: stride byte offset 128 between groups of 8 rows, leading byte offset rows x 16 between the two
// 8-channel halves of a K step of 16), so a tap's tile starting at any halo row is a descriptor whose start moves by
// 16 bytes a row. rows = the halo rounded up to 1 mod 8, so that the 8 regions' same
// row falls in 8 different 16-byte bank groups for the copies (8 lanes a halo row).
//
// The K loop runs over (cc, tap), taps inner: K tile kt = cc R S + tap is w[m][tap][64 cc ..] against halo cc
// shifted by the tap. Its copies (issue(kt)): the A tile, and at tap 0 the halo of chunk cc (each halo row's 8 chunks
// by 8 threads, the padding zero-filled). The pipeline is hn_wgmma_loop's (hn_wgmma_pipeline: STAGES - 2 tiles ahead,
// one wgmma group in flight); the halo buffer refilled at kt = cc R S was last read by tile kt - R S - 1, finished by
// then when R S >= STAGES - 1. Requires stride 1, pad < R and pad < S, C a multiple of 64 (32 in tf32 / fp32),
// n Hp Wp < 2^31.
#include "mma.cu"

// The smem descriptor (PTX ISA 9.7.15.5.1) of a K-major bf16 tile without swizzle whose rows lie 16 bytes apart (8
// rows a core matrix: stride byte offset 128) and whose two 8-element halves of a K step lie `lbo` bytes apart.
__device__ __forceinline__ unsigned long long hn_wgmma_desc_rows(const void* p, unsigned lbo) {
    return static_cast<unsigned long long>((hn_smem_addr(p) & 0x3FFFF) >> 4) |
           (static_cast<unsigned long long>(lbo >> 4) << 16) | (static_cast<unsigned long long>(128 >> 4) << 32);
}

// The halo's rows for BN columns of an R x S convolution over a frame Wp wide, and its buffer's rows (1 mod 8).
__device__ __forceinline__ int hn_halo_need(int bn, int r, int s, int wp) { return bn + (r - 1) * wp + s - 1; }
__device__ __forceinline__ int hn_halo_rows(int need) { return need + (9 - need % 8) % 8; }

// The frame of `images` images of H + pad rows x W + pad columns (above): column u as (image, row, column) of it.
struct HnFrame {
    int wp, size;        // the columns of a row, of an image
    HnDiv by_size, by_wp;
    __device__ __forceinline__ HnFrame(int h, int w, int pad)
        : wp(w + pad), size((h + pad) * (w + pad)), by_size(hn_div_of(size)), by_wp(hn_div_of(wp)) {}
    __device__ __forceinline__ void at(int u, int& img, int& fh, int& fw) const {
        img = hn_div(u, by_size);
        const int t = u - img * size;
        fh = hn_div(t, by_wp);
        fw = t - fh * wp;
    }
};

// The pooled forward's epilogue on the halo (EPI 4): max_pool(act(conv + b)) over 2 x 2 windows at stride 2 and each
// window's argmax byte, as mma.cu's hn_conv_pool_epilogue writes them (y [n][O][P'][Q'] float32 or bf16 bits, the
// bytes after y; the first maximum in window order, NaN winning). A window's four pixels are frame columns v, v + 1,
// v + Wp, v + Wp + 1 (v its top left: frame row and column even, p' < P', q' < Q'), so blocks start STEP = BN - Wp - 1
// columns apart (their last Wp + 1 columns computed twice) and a block owns the windows whose top left lies in its
// first STEP columns, all four pixels inside its BN. acc goes through shared memory (the pipeline's, free after the
// K loop: st [BM][BN + 8] float32, rows 8 banks apart for the accumulators' pair stores), the owned windows are
// listed in column order (ballot and prefix: win[i] the column in the block, at[i] y's offset of its channel 0), then
// each warp takes rows m and its lanes the windows (hn_window_store: act(acc + b), the first maximum).
template <int WGM, int WGN, int WN>
__device__ __forceinline__ void hn_halo_pool_epilogue(float* st, float (&acc)[1][WN / 8][4], float* y, int M,
                                                      const HnConv& cv, int m0, int v0, int step, int nv, int images,
                                                      const HnFrame& fr) {
    constexpr int BM = 64 * WGM, BN = WN * WGN, LD = BN + 8, THREADS = 128 * WGM * WGN, WARPS = THREADS / 32;
    int* win = reinterpret_cast<int*>(st + BM * LD);        // BN
    int* at = win + BN;                                      // BN
    int* count = at + BN;                                    // WARPS
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, gm = tid / 128 / WGN, gn = tid / 128 % WGN;
    const int PQ = cv.p * cv.q;
    __syncthreads();                                         // every warpgroup done reading the pipeline's buffers
    {
        const int g = lane >> 2, t = lane & 3, row0 = 64 * gm + 16 * (warp & 3) + g;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int ml = row0 + 8 * h;
#pragma unroll
            for (int j = 0; j < WN / 8; ++j)
                *reinterpret_cast<float2*>(st + ml * LD + WN * gn + 8 * j + 2 * t) =
                    make_float2(acc[0][j][2 * h], acc[0][j][2 * h + 1]);
        }
    }
    int total = 0;
    for (int base = 0; base < step; base += THREADS) {     // the owned windows, in column order
        const int c = base + tid, v = v0 + c;
        int img = 0, p = 1, q = 1;
        if (c < step && v < nv) fr.at(v, img, p, q);
        const bool top = c < step && v < nv && ((p | q) & 1) == 0 && (p >> 1) < cv.p && (q >> 1) < cv.q;
        const unsigned ballot = __ballot_sync(0xffffffffu, top);
        if (lane == 0) count[warp] = __popc(ballot);
        __syncthreads();
        int before = total, all = total;
        for (int w = 0; w < WARPS; ++w) {
            before += w < warp ? count[w] : 0;
            all += count[w];
        }
        if (top) {
            const int i = before + __popc(ballot & ((1u << lane) - 1u));
            win[i] = c;
            at[i] = img * M * PQ + (p >> 1) * cv.q + (q >> 1);
        }
        total = all;
        __syncthreads();
    }
    unsigned char* arg =
        reinterpret_cast<unsigned char*>(y) + static_cast<long long>(cv.pooled) * M * (cv.out16 ? 2 : 4);
    for (int ml = warp; ml < BM; ml += WARPS) {
        const int m = m0 + ml;
        if (m >= M) break;
        const float* r = st + ml * LD;
        const float bias = cv.aux ? hn_ldg(cv.aux + m) : 0.f;
        for (int i = lane; i < total; i += 32) {
            const int c = win[i];
            const float v[4] = {r[c], r[c + 1], r[c + fr.wp], r[c + fr.wp + 1]};
            hn_window_store(y, arg, at[i] + static_cast<long long>(m) * PQ, v, bias, cv);
        }
    }
}

// T: unsigned short (bf16 copies) or float (tf32 copies; SPLIT 1: fp32 as split copies, hi + lo tf32, each 16-byte
// chunk of 4 channels as its hi chunk then its lo chunk: hn_cp_chunk). A K tile is 128 bytes of channels (BK = 64
// bf16 or 32 float32), 8 chunks of CE = 8 or 4; with SPLIT each stage and each halo buffer holds the lo parts after
// the hi ones, and each K step is three products, a_hi b_hi + a_hi b_lo + a_lo b_hi (hn_wgmma_loop's).
template <class T, int EPI, int WGM, int WGN, int WN, int STAGES, int SPLIT = 0>
__device__ __forceinline__ void hn_conv_halo(unsigned char* smem, const T* W, const T* x, float* y, int M, int N, int K,
                                             const HnConv& cv) {
    constexpr int CE = 16 / static_cast<int>(sizeof(T)), BK = 8 * CE;
    constexpr int BM = 64 * WGM, BN = WN * WGN, THREADS = 128 * WGM * WGN, EA = BM * BK, ALO = SPLIT * EA;
    constexpr int SA = EA + ALO;
    static_assert(SPLIT == 0 || sizeof(T) == 4, "split copies are float32");
    static_assert(EPI == 1 || EPI == 2 || EPI == 4, "the forward, the stride-1 data gradient, the pooled forward");
    // EPI 4: cv.p, cv.q are the pooled sizes and cv.pooled the pooled outputs; blocks STEP columns apart
    const int images = EPI == 4 ? cv.pooled / (cv.p * cv.q) : N / (cv.p * cv.q);
    const HnFrame fr(cv.h, cv.w, cv.pad);
    const int wp = fr.wp, step = EPI == 4 ? BN - wp - 1 : BN;
    const int nv = images * fr.size, need = hn_halo_need(BN, cv.r, cv.s, wp), rows = hn_halo_rows(need);
    const int rs = cv.r * cv.s, tiles = cv.c / BK * rs, tid = threadIdx.x;
    const int hlo = SPLIT * 8 * rows * CE, hb = 8 * rows * CE + hlo;      // a halo buffer: hi regions, then lo
    const int gm = tid / 128 / WGN, gn = tid / 128 % WGN;                  // this warpgroup's rows and columns
    T* sa = reinterpret_cast<T*>(hn_smem_align1024(smem));   // STAGES x SA
    T* sh = sa + STAGES * SA;                                 // 2 x hb
    const HnBlock blk = hn_block(nullptr, nullptr, y, M, nv, K, K, 0, 0, 0, 0, 0, 1.f, 0.f, 1, K, BM, BN, BK);
    const int v0 = blockIdx.x * step;                       // the block's first column (blk.n0 but for EPI 4)
    float acc[1][WN / 8][4];
    hn_zero(acc);

    auto issue = [&](int kt) {
        const int cc = kt / rs, tap = kt - cc * rs;
        hn_copy16_tile<BM, 8, HnSwizzle128T<T>, THREADS, ALO>(sa + (kt % STAGES) * SA, W, K, blk.m0, M,
                                                              tap * cv.c + BK * cc, K, tid);
        if (tap != 0) return;
        T* h = sh + (cc & 1) * hb;
        const int j = tid & 7;
        for (int i = tid >> 3; i < need; i += THREADS / 8) {
            int img, fh, fw;
            fr.at(v0 + i, img, fh, fw);
            const int ih = fh - cv.pad, iw = fw - cv.pad;
            const bool ok = img < images && ih >= 0 && ih < cv.h && iw >= 0 && iw < cv.w;
            const int at = ok ? ((img * cv.h + ih) * cv.w + iw) * cv.c + BK * cc + CE * j : 0;
            if constexpr (SPLIT) {          // element at of the split copy: hi chunk at 2 at, lo chunk at 2 at + 4
                hn_cp_async16(h + (j * rows + i) * CE, x + 2LL * at, ok ? 16 : 0);
                hn_cp_async16(h + hlo + (j * rows + i) * CE, x + 2LL * at + 4, ok ? 16 : 0);
            } else {
                hn_cp_async16(h + (j * rows + i) * CE, x + at, ok ? 16 : 0);
            }
        }
    };

    hn_wgmma_pipeline<STAGES>(tiles, issue, [&](int kt) {
        const int cc = kt / rs, tap = kt - cc * rs, r = tap / cv.s, s = tap - r * cv.s;
        const T* a = sa + (kt % STAGES) * SA + gm * 64 * BK;
        const T* b = sh + (cc & 1) * hb + (r * wp + s + WN * gn) * CE;      // this group's columns
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {     // 32 bytes of K a step: two regions of B, rows x 16 bytes apart
            const T *ak = a + 2 * CE * kk, *bk = b + 2 * kk * rows * CE;
            if constexpr (sizeof(T) == 2) {
                hn_wgmma_bf16<WN, 0>(acc[0], hn_wgmma_desc(ak), hn_wgmma_desc_rows(bk, rows * 16));
            } else {
                hn_wgmma_tf32<WN>(acc[0], hn_wgmma_desc(ak), hn_wgmma_desc_rows(bk, rows * 16));
                if constexpr (SPLIT) {
                    hn_wgmma_tf32<WN>(acc[0], hn_wgmma_desc(ak), hn_wgmma_desc_rows(bk + hlo, rows * 16));
                    hn_wgmma_tf32<WN>(acc[0], hn_wgmma_desc(ak + ALO), hn_wgmma_desc_rows(bk, rows * 16));
                }
            }
        }
    });

    if constexpr (EPI == 4) {
        hn_halo_pool_epilogue<WGM, WGN, WN>(reinterpret_cast<float*>(sa), acc, y, M, cv, blk.m0, v0, step, nv, images,
                                            fr);
        return;
    }
    // hn_conv_epilogue's outputs at the virtual columns that are pixels (p < P, q < Q), by hn_conv_store; a pair of
    // neighbours in one output row at an even offset as one store
    const int PQ = cv.p * cv.q;
    hn_each_pair(blk, acc, M, nv, 64 * gm + 16 * ((tid >> 5) & 3), WN * gn, tid & 31,
                 [&](int m, int v, float z0, float z1, bool two) {
        long long at[2];
        bool in[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {            // v + 1 may lie in the next frame row (wp odd)
            int img, p, q;
            fr.at(v + e, img, p, q);
            in[e] = (e == 0 || two) && img < images && p < cv.p && q < cv.q;
            at[e] = (static_cast<long long>(img) * M + m) * PQ + p * cv.q + q;
        }
        if (in[0])
            hn_conv_store<EPI>(y, cv, m, z0, z1, at[0], at[1], in[1], at[1] == at[0] + 1 && (at[0] & 1) == 0);
        else if (in[1])
            hn_conv_store<EPI>(y, cv, m, z1, 0.f, at[1], 0, false, false);
    });
}

// The smem descriptor of an MN-major bf16 tile without swizzle whose K rows lie 16 bytes apart (8 elements of M or N a
// core matrix row: leading byte offset 128 between groups of 8 K rows) and whose 8-element groups of M or N lie `sbo`
// bytes apart (the ISA's canonical ((T,1,m),(8,k)):((1,T,SBO),(1T,LBO))).
__device__ __forceinline__ unsigned long long hn_wgmma_desc_mn_rows(const void* p, unsigned sbo) {
    return static_cast<unsigned long long>((hn_smem_addr(p) & 0x3FFFF) >> 4) |
           (static_cast<unsigned long long>(128 >> 4) << 16) | (static_cast<unsigned long long>(sbo >> 4) << 32);
}

// d += A B for N = 8, 16 or 32 (hn_wgmma_bf16's narrow shapes; the filter gradient of a few input channels), both
// operands MN-major.
template <int N>
__device__ __forceinline__ void hn_wgmma_bf16_narrow(float (&d)[N / 8][4], unsigned long long da,
                                                     unsigned long long db) {
    static_assert(N == 8 || N == 16 || N == 32, "a narrow wgmma tile");
#if defined(HN_EMULATE)
    hn_wgmma_bf16<N, 1>(d, da, db);
#elif defined(__CUDA_ARCH_FEAT_SM90_ALL)
    if constexpr (N == 8) {
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %6, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n8k16.f32.bf16.bf16 {%0, %1, %2, %3}, %4, %5, p, 1, 1, 1, 1;\n}\n"
                     : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3])
                     : "l"(da), "l"(db), "r"(1));
    }
    if constexpr (N == 16) {
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %10, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7}, %8, %9, "
                     "p, 1, 1, 1, 1;\n}\n"
                     : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]),
                       "+f"(d[1][2]), "+f"(d[1][3])
                     : "l"(da), "l"(db), "r"(1));
    }
    if constexpr (N == 32) {
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, "
                     "%10, %11, %12, %13, %14, %15}, %16, %17, p, 1, 1, 1, 1;\n}\n"
                     : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]),
                       "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),
                       "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3])
                     : "l"(da), "l"(db), "r"(1));
    }
#else
    __trap();
#endif
}

// The filter gradient on the halo (EPI 3): dw[o][(r, s, c)] += sum over the frame's columns v of dyf[v][o] xf[v + r Wp
// + s][c], xf the frame of x above and dyf the frame of dy (dy at the columns that are output pixels, 0 elsewhere). A
// block takes 64 output channels from o0 = 64 blockIdx.y (M), CB input channels from c0 = CB blockIdx.x and every tap,
// over the columns of its K part (blockIdx.z, kchunk each) in K tiles of 64 columns. WGS warpgroups, warpgroup g the
// taps g TPW .. g TPW + TPW - 1 (R S = WGS TPW), a tap 64 x CB accumulators. A stage holds dyf's tile (64 columns x 64
// o, MN-major in the 128-byte swizzle, hn_conv16w_filter's) and xf's halo for it, rows v0 .. v0 + 64 + (R - 1) Wp + S -
// 1, as CB / 8 regions (channels c0 + 8 j ..) of `rows` x 16 bytes; tap (r, s)'s B (K rows v, N = CB channels) is the
// halo from row r Wp + s on, MN-major without swizzle (hn_wgmma_desc_mn_rows with the regions `rows` x 16 bytes
// apart). So a stage's copies are 64 + (R - 1) Wp + S - 1 halo rows for the 9 taps' 576 gathered rows of
// hn_conv16w_filter. The parts are added into dw with atomics (beta 1 when there is one part). CB = 64, or 8 .. 32 for
// a layer of a few input channels (the first: x's copy padded to 8).
template <int WGS, int TPW, int CB, int STAGES>
__device__ __forceinline__ void hn_conv16_halo_filter(unsigned char* smem, const unsigned short* dy,
                                                      const unsigned short* x, float* dw, int M, int N, int K,
                                                      int splits, int kchunk, const HnConv& cv) {
    constexpr int BK = 64, THREADS = 128 * WGS, EA = 64 * BK;
    const HnFrame fr(cv.h, cv.w, cv.pad);
    const int images = K / (cv.p * cv.q), wp = fr.wp;
    const int nv = images * fr.size, need = hn_halo_need(BK, cv.r, cv.s, wp), rows = hn_halo_rows(need);
    constexpr int NR = CB / 8;                                      // the halo's regions
    const int EH = NR * rows * 8, tid = threadIdx.x, g = tid / 128, o0 = 64 * blockIdx.y, c0 = CB * blockIdx.x;
    const int kbeg = blockIdx.z * kchunk, kend = hn_imin(nv, kbeg + kchunk);
    const int tiles = kend > kbeg ? (kend - kbeg + BK - 1) / BK : 0;
    unsigned short* sa = reinterpret_cast<unsigned short*>(hn_smem_align1024(smem));   // STAGES x EA
    unsigned short* sh = sa + STAGES * EA;                                              // STAGES x EH
    int off[TPW];                                                  // this warpgroup's taps' first halo rows
#pragma unroll
    for (int t = 0; t < TPW; ++t) {
        const int tap = g * TPW + t, r = tap / cv.s;
        off[t] = r * wp + tap - r * cv.s;
    }
    float acc[TPW][1][CB / 8][4];
#pragma unroll
    for (int t = 0; t < TPW; ++t) hn_zero(acc[t]);

    auto issue = [&](int kt) {
        const int v0 = kbeg + kt * BK, st = kt % STAGES;
        for (int i = tid; i < BK * 8; i += THREADS) {              // dyf: row v, chunk j of 8 o
            const int row = i >> 3, j = i & 7, v = v0 + row;
            int img, p, q;
            fr.at(v, img, p, q);
            const bool ok = v < kend && img < images && p < cv.p && q < cv.q && o0 + 8 * j < M;
            const int at = ok ? ((img * cv.p + p) * cv.q + q) * M + o0 + 8 * j : 0;
            hn_cp_async16(sa + st * EA + HnSwizzle128MN::at(row, 8 * j), dy + at, ok ? 16 : 0);
        }
        unsigned short* h = sh + st * EH;
        for (int i = tid; i < need * NR; i += THREADS) {           // xf: halo row u, channels c0 + 8 j ..
            const int row = i / NR, j = i % NR;
            int img, fh, fw;
            fr.at(v0 + row, img, fh, fw);
            const int ih = fh - cv.pad, iw = fw - cv.pad;
            const bool ok = img < images && ih >= 0 && ih < cv.h && iw >= 0 && iw < cv.w && c0 + 8 * j < cv.c;
            const int at = ok ? ((img * cv.h + ih) * cv.w + iw) * cv.c + c0 + 8 * j : 0;
            hn_cp_async16(h + (j * rows + row) * 8, x + at, ok ? 16 : 0);
        }
    };

    hn_wgmma_pipeline<STAGES>(tiles, issue, [&](int kt) {
        const unsigned short *a = sa + kt % STAGES * EA, *h = sh + kt % STAGES * EH;
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            const unsigned long long da = hn_wgmma_desc_mn(a + kk * 16 * 64);   // K rows 16 kk .. of dyf's tile
#pragma unroll
            for (int t = 0; t < TPW; ++t) {
                const unsigned long long db = hn_wgmma_desc_mn_rows(h + (off[t] + 16 * kk) * 8, rows * 16);
                if constexpr (CB >= 64)
                    hn_wgmma_bf16<CB, 1>(acc[t][0], da, db);
                else
                    hn_wgmma_bf16_narrow<CB>(acc[t][0], da, db);
            }
        }
    });

    // tap (r, s)'s 64 x 64 block of dw [O][R S][C]: rows o0 .., columns c0 .. of the [O][C] matrix at dw + tap C with
    // leading dimension R S C
#pragma unroll
    for (int t = 0; t < TPW; ++t) {
        HnBlock b;
        b.C = dw + (g * TPW + t) * cv.c;
        b.m0 = o0;
        b.n0 = c0;
        b.atomic = splits > 1;
        hn_epilogue<1, CB / 8>(b, acc[t], M, cv.c, N, 1.f, 1.f, 16 * ((tid >> 5) & 3), 0, tid & 31);
    }
}

// The filter gradient on the halo in tf32 or fp32 (tf32 wgmma has no MN-major operands: mma.sync m16n8k8 with scalar
// fragment loads, as hn_conv_filter_sync's): dw[o][(r, s, c)] += sum over frame columns v of dyf[v][o] xf[v + r Wp +
// s][c], as hn_conv16_halo_filter. A block takes BM = WM WARPS_M output channels from o0 = BM blockIdx.y, BN = WN
// WARPS_N input channels from c0 = BN blockIdx.x and all TAPS taps, over its K part (blockIdx.z) in K tiles of BK
// frame columns; a warp's WM x WN tile of every tap (TAPS x MT x NT x 4 accumulators a thread, MT = WM / 16, NT = WN
// / 8). A stage holds dyf's tile (rows v, BM columns, HnOperand's MN-major layout) and xf's halo (up to HROWS rows v0
// .. of BN columns in the same layout), each with its lo parts after it in fp32 (SPLIT: the split copies, three
// products a step). Tap (r, s)'s B is the halo from row r Wp + s on: its fragments are read HnOperand::at(n, k + r Wp
// + s), and the A fragments of a K step serve all taps.
template <int WM, int WN, int WARPS_M, int WARPS_N, int BK, int STAGES, int HROWS, int TAPS, int SPLIT>
__device__ __forceinline__ void hn_conv32_halo_filter(unsigned char* smem, const float* dy, const float* x, float* dw,
                                                      int M, int N, int K, int splits, int kchunk, const HnConv& cv) {
    constexpr int BM = WM * WARPS_M, BN = WN * WARPS_N, THREADS = 32 * WARPS_M * WARPS_N, MT = WM / 16, NT = WN / 8;
    using OA = HnOperand<false, BM, BK, 4, 8>;   // rows k (v), BM columns o
    using OB = HnOperand<false, BN, BK, 4, 8>;   // rows k, BN columns c: the halo's rows at the same stride
    constexpr int EA = OA::ELEMS, ALO = SPLIT * EA, SA = EA + ALO, EB = HROWS * OB::STRIDE, BLO = SPLIT * EB;
    constexpr int SB = EB + BLO;
    static_assert(BK % 8 == 0 && BM % 4 == 0 && BN % 4 == 0 && WM % 16 == 0 && WN % 8 == 0, "tile");
    const HnFrame fr(cv.h, cv.w, cv.pad);
    const int images = K / (cv.p * cv.q), nv = images * fr.size, need = hn_halo_need(BK, cv.r, cv.s, fr.wp);
    const int o0 = BM * blockIdx.y, c0 = BN * blockIdx.x;
    const int kbeg = blockIdx.z * kchunk, kend = hn_imin(nv, kbeg + kchunk);
    const int tiles = kend > kbeg ? (kend - kbeg + BK - 1) / BK : 0;
    float* sa = reinterpret_cast<float*>(smem);   // STAGES x SA
    float* sb = sa + STAGES * SA;                 // STAGES x SB
    const HnThread th = hn_thread<WM, WN, WARPS_N>();
    const int g = th.lane >> 2, t = th.lane & 3;
    int off[TAPS];                                // each tap's first halo row
#pragma unroll
    for (int tap = 0; tap < TAPS; ++tap) {
        const int r = tap / cv.s;
        off[tap] = r * fr.wp + tap - r * cv.s;
    }
    float acc[TAPS][MT][NT][4];
#pragma unroll
    for (int tap = 0; tap < TAPS; ++tap) hn_zero(acc[tap]);

    // one 16-byte chunk (4 channels) of a copy: element e at e (tf32), or hi chunk at 2 e and lo chunk at 2 e + 4
    // (fp32's split copy), into s and s + lo
    auto chunk = [&](float* s, int lo, const float* src, int e, bool ok) {
        if constexpr (SPLIT) {
            hn_cp_async16(s, src + 2LL * e, ok ? 16 : 0);
            hn_cp_async16(s + lo, src + 2LL * e + 4, ok ? 16 : 0);
        } else {
            hn_cp_async16(s, src + e, ok ? 16 : 0);
        }
    };
    auto issue = [&](int kt) {
        const int v0 = kbeg + kt * BK, st = kt % STAGES;
        for (int i = threadIdx.x; i < BK * (BM / 4); i += THREADS) {     // dyf: row v, chunk j of 4 o
            const int row = i / (BM / 4), j = i % (BM / 4), v = v0 + row;
            int img, p, q;
            fr.at(v, img, p, q);
            const bool ok = v < kend && img < images && p < cv.p && q < cv.q && o0 + 4 * j < M;
            chunk(sa + st * SA + OA::at(4 * j, row), ALO, dy, ok ? ((img * cv.p + p) * cv.q + q) * M + o0 + 4 * j : 0,
                  ok);
        }
        for (int i = threadIdx.x; i < need * (BN / 4); i += THREADS) {   // xf: halo row u, chunk j of 4 c
            const int row = i / (BN / 4), j = i % (BN / 4);
            int img, fh, fw;
            fr.at(v0 + row, img, fh, fw);
            const int ih = fh - cv.pad, iw = fw - cv.pad;
            const bool ok = img < images && ih >= 0 && ih < cv.h && iw >= 0 && iw < cv.w && c0 + 4 * j < cv.c;
            chunk(sb + st * SB + OB::at(4 * j, row), BLO, x, ok ? ((img * cv.h + ih) * cv.w + iw) * cv.c + c0 + 4 * j : 0,
                  ok);
        }
    };
    hn_direct_loop<STAGES>(tiles, issue, [&](int st) {
        const float *a = sa + st * SA, *b = sb + st * SB;
#pragma unroll
        for (int kk = 0; kk < BK; kk += 8) {
            unsigned fa[MT][4], fal[MT][4];
#pragma unroll
            for (int i = 0; i < MT; ++i) {
                const int m = th.wm + 16 * i + g;
                const int at[4] = {OA::at(m, kk + t), OA::at(m + 8, kk + t), OA::at(m, kk + t + 4),
                                   OA::at(m + 8, kk + t + 4)};
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    fa[i][e] = hn_bits(hn_lds(a + at[e]));
                    if constexpr (SPLIT) fal[i][e] = hn_bits(hn_lds(a + ALO + at[e]));
                }
            }
#pragma unroll
            for (int tap = 0; tap < TAPS; ++tap) {
#pragma unroll
                for (int j = 0; j < NT; ++j) {
                    const int n = th.wn + 8 * j + g;
                    const int b0 = OB::at(n, kk + t + off[tap]), b1 = OB::at(n, kk + t + 4 + off[tap]);
                    const unsigned fb[2] = {hn_bits(hn_lds(b + b0)), hn_bits(hn_lds(b + b1))};
#pragma unroll
                    for (int i = 0; i < MT; ++i) {
                        hn_mma_tf32(acc[tap][i][j], fa[i], fb);
                        if constexpr (SPLIT) {
                            const unsigned fbl[2] = {hn_bits(hn_lds(b + BLO + b0)), hn_bits(hn_lds(b + BLO + b1))};
                            hn_mma_tf32(acc[tap][i][j], fa[i], fbl);
                            hn_mma_tf32(acc[tap][i][j], fal[i], fb);
                        }
                    }
                }
            }
        }
    });
#pragma unroll
    for (int tap = 0; tap < TAPS; ++tap) {
        HnBlock blk;
        blk.C = dw + tap * cv.c;
        blk.m0 = o0;
        blk.n0 = c0;
        blk.atomic = splits > 1;
        hn_epilogue<MT, NT>(blk, acc[tap], M, cv.c, N, 1.f, 1.f, th.wm, th.wn, th.lane);
    }
}

// HN_CONV16H(hn_conv16_fwd_h128x256s4, 1, 2, 1, 256, 4): HN_CONV16W's forward (EPI 1), stride-1 data gradient (EPI
// 2) or pooled forward (EPI 4) with its arguments, on the halo (hn_conv_halo): WGM x WGN warpgroups of 64 x WN, block
// tile BM x BN x 64 (BM = 64 WGM, BN = WN WGN), ST A buffers; 128 WGM WGN threads, grid (ceil(n Hp Wp / STEP), ceil(M
// / BM)) with STEP = BN, or BN - Wp - 1 for EPI 4; shared memory the larger of ST x BM x 128 + 2 x 8 x rows x 16 and
// (EPI 4's staging) BM x (BN + 8) x 4 + BN x 8 + 4 WGM WGN x 4, plus 1024 bytes (conv16_halo.py's
// HaloTile.smem_bytes).
#define HN_CONV16H(name, EPI, WGM, WGN, WN, ST)                                                                   \
    extern "C" __global__ void __launch_bounds__(128 * WGM * WGN, 1) name(                                      \
        const unsigned short* __restrict__ B, const unsigned short* __restrict__ Wt, const float* __restrict__ AUX,  \
        float* __restrict__ Y, int M, int N, int K, int C, int H, int W, int R, int S, int P, int Q, int O,         \
        int stride, int pad, int act, int splits, int kchunk) {                                                   \
        HN_DYNAMIC_SMEM(hn_smem);                                                                              \
        const HnConv cv = hn_conv16_of<EPI>(AUX, C, H, W, R, S, P, Q, O, stride, pad, act, kchunk);            \
        hn_conv_halo<unsigned short, EPI, WGM, WGN, WN, ST>(hn_smem, Wt, B, Y, M, N, K, cv);                   \
    }

// HN_CONV32H(hn_conv32_fwd_h128x256s4, 1, 2, 1, 256, 4, 0): HN_CONV16H in tf32 on float32 copies rounded to tf32
// (conv.cu's to_nhwc32, turn_weights32; C a multiple of 32), or with SPLIT 1 in fp32 on split copies (to_nhwc32x3,
// turn_weights32x3): twice the shared memory, three products a step (HN_CONV32W's). Shared memory as HN_CONV16H's with
// (1 + SPLIT) times the pipeline's buffers.
#define HN_CONV32H(name, EPI, WGM, WGN, WN, ST, SPLIT)                                                            \
    extern "C" __global__ void __launch_bounds__(128 * WGM * WGN, 1) name(                                      \
        const float* __restrict__ B, const float* __restrict__ Wt, const float* __restrict__ AUX,                 \
        float* __restrict__ Y, int M, int N, int K, int C, int H, int W, int R, int S, int P, int Q, int O,         \
        int stride, int pad, int act, int splits, int kchunk) {                                                   \
        HN_DYNAMIC_SMEM(hn_smem);                                                                              \
        const HnConv cv = hn_conv16_of<EPI>(AUX, C, H, W, R, S, P, Q, O, stride, pad, act, kchunk);            \
        hn_conv_halo<float, EPI, WGM, WGN, WN, ST, SPLIT>(hn_smem, Wt, B, Y, M, N, K, cv);                     \
    }

// HN_CONV16HF(hn_conv16_filter_hf3x3s4, 3, 3, 64, 4): HN_CONV16W's filter gradient (EPI 3) with its arguments on the
// halo (hn_conv16_halo_filter): WGS warpgroups of TPW taps each (R S = WGS TPW), CB input channels a block, 128 WGS
// threads, grid (ceil(C / CB), ceil(O / 64), splits), kchunk a multiple of 64 columns of the frame, shared memory ST x
// (64 x 128 + CB x rows x 2) + 1024 bytes (conv16_halo.py's HaloFilterTile.smem_bytes).
#define HN_CONV16HF(name, WGS, TPW, CB, ST)                                                                       \
    extern "C" __global__ void __launch_bounds__(128 * WGS, 1) name(                                            \
        const unsigned short* __restrict__ B, const unsigned short* __restrict__ Wt, const float* __restrict__ AUX,  \
        float* __restrict__ Y, int M, int N, int K, int C, int H, int W, int R, int S, int P, int Q, int O,         \
        int stride, int pad, int act, int splits, int kchunk) {                                                   \
        HN_DYNAMIC_SMEM(hn_smem);                                                                              \
        const HnConv cv = hn_conv_of<3>(AUX, C, H, W, R, S, P, Q, O, stride, pad, act);                         \
        hn_conv16_halo_filter<WGS, TPW, CB, ST>(hn_smem, Wt, B, Y, M, N, K, splits, kchunk, cv);               \
    }

// HN_CONV32HF(hn_conv32_filter_hf64x32s4, 16, 16, 4, 2, 32, 4, 128, 9, 0): HN_CONV16W's filter gradient (EPI 3) in
// tf32 (SPLIT 0: B = x, Wt = dy float32 copies rounded to tf32) or fp32 (SPLIT 1: their split copies) on the halo
// (hn_conv32_halo_filter): WARPS_M x WARPS_N warps of WM x WN, TAPS = R S taps, halos of up to HROWS rows; grid
// (ceil(C / BN), ceil(O / BM), splits), kchunk a multiple of BK; shared memory ST x (OA::ELEMS + HROWS (BN + 8)) x 4
// x (1 + SPLIT) bytes (conv16_halo.py's HaloSyncFilterTile.smem_bytes).
#define HN_CONV32HF(name, WM, WN, WARPS_M, WARPS_N, BK, ST, HROWS, TAPS, SPLIT)                                  \
    extern "C" __global__ void __launch_bounds__(32 * WARPS_M * WARPS_N, 1) name(                               \
        const float* __restrict__ B, const float* __restrict__ Wt, const float* __restrict__ AUX,                 \
        float* __restrict__ Y, int M, int N, int K, int C, int H, int W, int R, int S, int P, int Q, int O,         \
        int stride, int pad, int act, int splits, int kchunk) {                                                   \
        HN_DYNAMIC_SMEM(hn_smem);                                                                              \
        const HnConv cv = hn_conv_of<3>(AUX, C, H, W, R, S, P, Q, O, stride, pad, act);                         \
        hn_conv32_halo_filter<WM, WN, WARPS_M, WARPS_N, BK, ST, HROWS, TAPS, SPLIT>(hn_smem, Wt, B, Y, M, N, K,   \
                                                                                    splits, kchunk, cv);         \
    }
