// Sandbox: the filter gradient of a small convolution (C R S <= 32 taps a pixel, K <= 64 outputs), the first layer of
// an image model (cifar-wide's 3 -> 64 at 3 x 3), by a direct kernel. Timed against the shipped implicit-GEMM tiles
// by run_conv_small.py; it loses to them (NOTES.md). The forward of the same study ships: conv.cu's conv_small_fwd.
// x [n][C][H][W], dy [n][K][P][Q], dw [K][C][R][S], all float32, over the n * P * Q < 2^31 output pixels (img, p, q),
// tap j = (c, r, s) in that order.
//
// conv_small_filter2: part[block][k][j] = sum over the block's pixels of dy[img][k][p][q] * tap j, blocks taking 64
// pixels at a time in a grid-stride loop over the n * P * Q (block g: pixel tiles g, g + G, ...). Per tile: ds[pixel][k]
// and xs[pixel][j] in shared memory; thread t: k = 4 ((t % 64) / 4) .. + 3, taps j = 8 (t % 4) .. + 7, pixels of
// quarter t / 64 of the tile (16 each), 32 sums in registers; the four quarters' sums added at the end, in quarter
// order, through shared memory. conv_small_filter2_add: dw[k][j] += the G blocks' sums in block order (deterministic).
extern "C" __global__ void __launch_bounds__(256, 2) conv_small_filter2(const float* __restrict__ dy,
                                                                     const float* __restrict__ x,
                                                                     float* __restrict__ part, int n, int C, int H,
                                                                     int W, int K, int R, int S, int stride, int pad,
                                                                     int P, int Q) {
    __shared__ __align__(16) float ds[64][68];
    __shared__ __align__(16) float xs[64][36];
    const int RS = R * S, CRS = C * RS, PQ = P * Q, NP = n * PQ;
    const int kq = 4 * ((threadIdx.x & 63) >> 2), jq = 8 * (threadIdx.x & 3), quarter = threadIdx.x >> 6;
    float acc[4][8] = {};
    for (int p0 = blockIdx.x * 64; p0 < NP; p0 += gridDim.x * 64) {
        const int pl = threadIdx.x & 63, pix = p0 + pl;              // loads: pixel pl, rows threadIdx.x / 64 + 4 u
        const bool in = pix < NP;
        const int img = in ? pix / PQ : 0, pq = pix - img * PQ, p = pq / Q, q = pq - p * Q;
        const int h0 = p * stride - pad, w0 = q * stride - pad;
        const float* xi = x + (long long)img * C * H * W;
        const float* dyi = dy + (long long)img * K * PQ + pq;
#pragma unroll
        for (int u = 0; u < 8; ++u) {
            const int j = quarter + 4 * u, c = j / RS, rs = j - c * RS, r = rs / S;
            const int ih = h0 + r, iw = w0 + rs - r * S;
            xs[pl][j] = in && j < CRS && ih >= 0 && ih < H && iw >= 0 && iw < W
                            ? xi[((long long)c * H + ih) * W + iw] : 0.f;
        }
#pragma unroll 8
        for (int u = 0; u < 16; ++u) {
            const int k = quarter + 4 * u;
            ds[pl][k] = in && k < K ? dyi[(long long)k * PQ] : 0.f;
        }
        __syncthreads();
#pragma unroll 4
        for (int i = 16 * quarter; i < 16 * quarter + 16; ++i) {
            const float4 d = *reinterpret_cast<const float4*>(&ds[i][kq]);
            const float4 lo = *reinterpret_cast<const float4*>(&xs[i][jq]);
            const float4 hi = *reinterpret_cast<const float4*>(&xs[i][jq + 4]);
            const float dv[4] = {d.x, d.y, d.z, d.w}, xv[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
            for (int a = 0; a < 4; ++a)
#pragma unroll
                for (int e = 0; e < 8; ++e) acc[a][e] = fmaf(dv[a], xv[e], acc[a][e]);
        }
        __syncthreads();
    }
    float* red = &ds[0][0];                    // [k][j], 2048 of ds's 4352 floats
    for (int turn = 0; turn < 4; ++turn) {
        if (quarter == turn) {
#pragma unroll
            for (int a = 0; a < 4; ++a)
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    float& r = red[(kq + a) * 32 + jq + e];
                    r = turn ? r + acc[a][e] : acc[a][e];
                }
        }
        __syncthreads();
    }
    for (int i = threadIdx.x; i < 64 * 32; i += 256) part[(long long)blockIdx.x * 2048 + i] = red[i];
}
extern "C" __global__ void conv_small_filter2_add(const float* __restrict__ part, float* __restrict__ dw, int G, int K,
                                                  int CRS) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x, k = i / 32, j = i - k * 32;
    if (k >= K || j >= CRS) return;
    float s = 0.f;
    for (int g = 0; g < G; ++g) s += part[(long long)g * 2048 + i];
    dw[k * CRS + j] += s;
}
