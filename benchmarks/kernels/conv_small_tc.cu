// Sandbox (not shipped): the forward of a small convolution (C R S <= 32 taps a pixel, K <= 64 outputs), the first
// layer of an image model (cifar-wide's 3 -> 64 at 3 x 3), on bf16 tensor cores (mma.sync m16n8k16), for the bf16
// step: x and w rounded to bf16 as autocast rounds a convolution's inputs, sums in float32. conv.cu's conv_small_fwd
// (float32 FMAs, "small") computes the same outputs from the unrounded inputs. run_conv_small.py times both.
//
// y = act(conv2d(x, w) + b): x [n][C][H][W], w [K][C][R][S], b [K] or null, float32; y = out [n][K][P][Q], float32
// (out16 = 0) or bf16 bits (out16 = 1). A block's pixels are 128 consecutive output pixels of the n * P * Q (img, p,
// q) (n P Q + 128 <= 2^31), tap j = (c, r, s) in that order. The GEMM per block: D [64 k][128 pixels] = W [64][32]
// X^T [32][128], K = 32 taps (zero for j >= CRS, and weights zero for k >= K), both operands staged in shared memory
// as bf16 rows of 32 taps (ws[k][j], xs[pixel][j], rows padded to 40 so that a fragment's rows fall in different
// banks). Warp w: rows 16 (w % 4) .. + 15, pixels 64 (w / 4) .. + 63: eight m16n8k16 tiles, two K steps. The
// outputs go through shared memory (ys[k][pixel], float32, over the staged operands once the products are done) so
// that each thread stores 4 consecutive pixels of one channel: one 16-byte (float32) or 8-byte (bf16) store where
// they are 4-aligned in one image (P Q a multiple of 4), else one at a time. act: 1 ReLU (kernels.py's ACTS).
#include "mma.cu"

#define HN_SMALL_TC_ROW 40       // bf16 elements a staged row: 32 taps + 8, 80 bytes (a fragment's 8 rows, 8 banks)
#define HN_SMALL_TC_YS 132       // floats a row of ys: 128 pixels + 4 (rows 16-byte aligned)
#define HN_SMALL_TC_SMEM (64 * HN_SMALL_TC_YS * 4)      // dynamic shared memory a block: ys (ws and xs before it)

extern "C" __global__ void __launch_bounds__(256) conv_small_fwd_tc(const float* __restrict__ x,
                                                                    const float* __restrict__ w,
                                                                    const float* __restrict__ b, void* __restrict__ out,
                                                                    int n, int C, int H, int W, int K, int R, int S,
                                                                    int stride, int pad, int P, int Q, int act,
                                                                    int out16) {
    HN_DYNAMIC_SMEM(hn_smem);                                       // HN_SMALL_TC_SMEM bytes: ws and xs, then ys
    float* smem = reinterpret_cast<float*>(hn_smem);
    unsigned short* ws = reinterpret_cast<unsigned short*>(smem);   // [64][ROW]
    unsigned short* xs = ws + 64 * HN_SMALL_TC_ROW;                  // [128][ROW]
    float* ys = smem;                                               // [64][YS]
    const int tid = threadIdx.x, RS = R * S, CRS = C * RS, PQ = P * Q, NP = n * PQ, p0 = blockIdx.x * 128;
    // stage: thread t the weights of row t / 4, taps 8 (t % 4) .. + 7; and the taps 16 (t / 128) .. + 15 of pixel
    // t % 128
    {
        const int k = tid >> 2, j0 = 8 * (tid & 3);
        float v[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) v[u] = k < K && j0 + u < CRS ? w[static_cast<long long>(k) * CRS + j0 + u] : 0.f;
        hn_sts4(ws + k * HN_SMALL_TC_ROW + j0, hn_pack_bf16x2(v[0], v[1]), hn_pack_bf16x2(v[2], v[3]),
                hn_pack_bf16x2(v[4], v[5]), hn_pack_bf16x2(v[6], v[7]));
    }
    {
        const int pl = tid & 127, j0 = 16 * (tid >> 7), pix = p0 + pl;
        const bool in = pix < NP;
        const int img = in ? pix / PQ : 0, pq = pix - img * PQ, p = pq / Q, q = pq - p * Q;
        const int h0 = p * stride - pad, w0 = q * stride - pad;
        const float* xi = x + static_cast<long long>(img) * C * H * W;
        float v[16];
#pragma unroll
        for (int u = 0; u < 16; ++u) {
            const int j = j0 + u, c = j / RS, rs = j - c * RS, r = rs / S, ih = h0 + r, iw = w0 + rs - r * S;
            const bool ok = in && j < CRS && ih >= 0 && ih < H && iw >= 0 && iw < W;
            v[u] = ok ? xi[(static_cast<long long>(c) * H + ih) * W + iw] : 0.f;
        }
#pragma unroll
        for (int u = 0; u < 16; u += 8)
            hn_sts4(xs + pl * HN_SMALL_TC_ROW + j0 + u, hn_pack_bf16x2(v[u], v[u + 1]),
                    hn_pack_bf16x2(v[u + 2], v[u + 3]), hn_pack_bf16x2(v[u + 4], v[u + 5]),
                    hn_pack_bf16x2(v[u + 6], v[u + 7]));
    }
    __syncthreads();
    // products: fragments by ldmatrix as mma.cu's bf16 tiles read them (A: rows m0 + lane % 16, taps kk + 8 (lane /
    // 16); B: two 8-pixel blocks a load, pixels + lane % 8 + 8 (lane / 16), taps kk + 8 ((lane / 8) % 2)); D (lane =
    // 4 g + t) rows g, g + 8, pixels 2 t, 2 t + 1 of each 8-pixel block)
    const int warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int m0 = 16 * (warp & 3), n0 = 64 * (warp >> 2);
    float acc[8][4] = {};
#pragma unroll
    for (int kk = 0; kk < 32; kk += 16) {
        unsigned a[4];
        hn_ldmatrix_x4(a, ws + (m0 + (lane & 15)) * HN_SMALL_TC_ROW + kk + 8 * (lane >> 4));
#pragma unroll
        for (int nb = 0; nb < 8; nb += 2) {
            unsigned r[4];
            hn_ldmatrix_x4(r, xs + (n0 + 8 * nb + (lane & 7) + 8 * (lane >> 4)) * HN_SMALL_TC_ROW + kk +
                                  8 * ((lane >> 3) & 1));
            const unsigned b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
            hn_mma_bf16(acc[nb], a, b0);
            hn_mma_bf16(acc[nb + 1], a, b1);
        }
    }
    __syncthreads();                                  // (every warp done with ws and xs)
#pragma unroll
    for (int nb = 0; nb < 8; ++nb) {
        float* y0 = ys + (m0 + g) * HN_SMALL_TC_YS + n0 + 8 * nb + 2 * t;
        hn_sts2(y0, hn_bits(acc[nb][0]), hn_bits(acc[nb][1]));
        hn_sts2(y0 + 8 * HN_SMALL_TC_YS, hn_bits(acc[nb][2]), hn_bits(acc[nb][3]));
    }
    __syncthreads();
    // stores: thread t channel k = t / 32 + 8 i, pixels 4 (t % 32) .. + 3, for i < 8
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const int k = (tid >> 5) + 8 * i, pl = 4 * (tid & 31), pix = p0 + pl;
        if (k >= K || pix >= NP) continue;
        const float bias = b ? b[k] : 0.f;
        const float4 d = hn_lds4(ys + k * HN_SMALL_TC_YS + pl);
        float v[4] = {d.x + bias, d.y + bias, d.z + bias, d.w + bias};
#pragma unroll
        for (int e = 0; e < 4; ++e)
            if (act == 1) v[e] = v[e] > 0.f ? v[e] : 0.f;
        const int img = pix / PQ, pq = pix - img * PQ;
        const long long at = (static_cast<long long>(img) * K + k) * PQ + pq;
        if (PQ % 4 == 0 && pix + 3 < NP) {                // 4 pixels of one image, 4-aligned
            if (out16)
                *reinterpret_cast<uint2*>(static_cast<unsigned short*>(out) + at) =
                    make_uint2(hn_pack_bf16x2(v[0], v[1]), hn_pack_bf16x2(v[2], v[3]));
            else
                *reinterpret_cast<float4*>(static_cast<float*>(out) + at) = make_float4(v[0], v[1], v[2], v[3]);
        } else {
            for (int e = 0; e < 4 && pix + e < NP; ++e) {
                const int ie = (pix + e) / PQ;
                const long long ae = (static_cast<long long>(ie) * K + k) * PQ + (pix + e - ie * PQ);
                if (out16)
                    static_cast<unsigned short*>(out)[ae] = hn_bf16_of(v[e]);
                else
                    static_cast<float*>(out)[ae] = v[e];
            }
        }
    }
}

// The filter gradient of the same small convolutions on bf16 tensor cores: part[block][k][j] = sum over the block's
// pixels of dy[img][k][p][q] * tap j of x at (img, p, q), dy and x rounded to bf16 (a bf16 step's gradient and
// input), sums in float32; dw[k][j] is the sum of the blocks' parts in block order (conv_small.cu's
// conv_small_filter2_add, or NumPy in the tests): deterministic. Blocks take 128 pixels at a time in a grid-stride
// loop over the n P Q. Per 128 pixels the GEMM D [64 k][32 j] += dy^T [64][128] X [128][32], K = the pixels: dy^T
// staged as ds[k][pixel], the taps as xs[j][pixel] (bf16 rows of 128 pixels, padded to 136: ldmatrix's 8 rows in
// different banks); warp w takes taps 16 (w % 2) .. + 15 over pixels 32 (w / 2) .. + 31 (8 tiles of D, 32 float32
// sums a thread), and the four warps of each half of the taps add their sums in warp order through shared memory at
// the end. dy [n][K][P][Q], x [n][C][H][W] float32; K <= 64, C R S <= 32.
#define HN_SMALL_TC_PROW 136                                        // bf16 elements a staged row of pixels
#define HN_SMALL_TC_FSMEM ((64 + 32) * HN_SMALL_TC_PROW * 2)        // dynamic shared memory a block: ds, xs

extern "C" __global__ void __launch_bounds__(256, 2) conv_small_filter_tc(const float* __restrict__ dy,
                                                                       const float* __restrict__ x,
                                                                       float* __restrict__ part, int n, int C, int H,
                                                                       int W, int K, int R, int S, int stride,
                                                                       int pad, int P, int Q) {
    HN_DYNAMIC_SMEM(hn_smem);
    unsigned short* ds = reinterpret_cast<unsigned short*>(hn_smem);   // [64][PROW]
    unsigned short* xs = ds + 64 * HN_SMALL_TC_PROW;                    // [32][PROW]
    float* red = reinterpret_cast<float*>(hn_smem);                     // [64][32], over ds once the products end
    const int tid = threadIdx.x, RS = R * S, CRS = C * RS, PQ = P * Q, NP = n * PQ;
    const int warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3, quad = 4 * (tid & 31);
    const int half = warp & 1;                            // this warp's taps 16 half .. + 15: D's tiles 2 half, + 1
    float acc[4][2][4] = {};
    for (int p0 = blockIdx.x * 128; p0 < NP; p0 += gridDim.x * 128) {
        // stage: thread t pixels quad .. quad + 3, dy's channels t / 32 + 8 u (u < 8) and taps t / 32 + 8 u (u < 4)
        int img[4], pq[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int pix = p0 + quad + e;
            img[e] = pix < NP ? pix / PQ : -1;
            pq[e] = pix - (img[e] < 0 ? 0 : img[e]) * PQ;
        }
#pragma unroll 4
        for (int u = 0; u < 8; ++u) {                     // (16 loads in flight: under 128 registers)
            const int k = (tid >> 5) + 8 * u;
            float v[4];
#pragma unroll
            for (int e = 0; e < 4; ++e)
                v[e] = img[e] >= 0 && k < K ? dy[(static_cast<long long>(img[e]) * K + k) * PQ + pq[e]] : 0.f;
            hn_sts2(ds + k * HN_SMALL_TC_PROW + quad, hn_pack_bf16x2(v[0], v[1]), hn_pack_bf16x2(v[2], v[3]));
        }
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const int j = (tid >> 5) + 8 * u, c = j / RS, rs = j - c * RS, r = rs / S, s = rs - r * S;
            float v[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int p = pq[e] / Q, q = pq[e] - p * Q, ih = p * stride - pad + r, iw = q * stride - pad + s;
                const bool ok = img[e] >= 0 && j < CRS && ih >= 0 && ih < H && iw >= 0 && iw < W;
                v[e] = ok ? x[((static_cast<long long>(img[e]) * C + c) * H + ih) * W + iw] : 0.f;
            }
            hn_sts2(xs + j * HN_SMALL_TC_PROW + quad, hn_pack_bf16x2(v[0], v[1]), hn_pack_bf16x2(v[2], v[3]));
        }
        __syncthreads();
#pragma unroll
        for (int ks = 0; ks < 2; ++ks) {
            const int k0 = 32 * (warp >> 1) + 16 * ks;    // 16 of this warp's 32 pixels
            unsigned r[4];
            hn_ldmatrix_x4(r, xs + (16 * half + (lane & 7) + 8 * (lane >> 4)) * HN_SMALL_TC_PROW + k0 +
                                  8 * ((lane >> 3) & 1));
            const unsigned b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
#pragma unroll
            for (int mb = 0; mb < 4; ++mb) {
                unsigned a[4];
                hn_ldmatrix_x4(a, ds + (16 * mb + (lane & 15)) * HN_SMALL_TC_PROW + k0 + 8 * (lane >> 4));
                hn_mma_bf16(acc[mb][0], a, b0);
                hn_mma_bf16(acc[mb][1], a, b1);
            }
        }
        __syncthreads();                                  // (every warp done with ds and xs)
    }
    // each half's four warps' sums added in warp order, round i the warps 2 i and 2 i + 1 (D tile (mb, 2 half + nb):
    // rows 16 mb + g, + 8, taps 16 half + 8 nb + 2 t, + 1)
    for (int i = 0; i < 4; ++i) {
        if (warp >> 1 == i) {
#pragma unroll
            for (int mb = 0; mb < 4; ++mb)
#pragma unroll
                for (int nb = 0; nb < 2; ++nb)
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        float* at = red + (16 * mb + g + 8 * h) * 32 + 16 * half + 8 * nb + 2 * t;
                        const float x0 = i ? hn_lds(at) : 0.f, x1 = i ? hn_lds(at + 1) : 0.f;
                        hn_sts2(at, hn_bits(x0 + acc[mb][nb][2 * h]), hn_bits(x1 + acc[mb][nb][2 * h + 1]));
                    }
        }
        __syncthreads();
    }
    float* out = part + static_cast<long long>(blockIdx.x) * 64 * 32;
#pragma unroll
    for (int u = 0; u < 8; ++u) out[tid + 256 * u] = hn_lds(red + tid + 256 * u);
}
