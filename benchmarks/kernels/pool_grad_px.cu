// Sandbox: the pooling gradient to a bf16 channels-last copy, one block per 32 pixels of z (the input of the pooling)
// x 64 channels: the kernel conv.cu's pool_grad16_nhwc16 replaced (that one takes 32 pooled pixels x 64 channels and
// writes their windows). Kept to be timed beside it (time_pool_grad.py). It uses conv.cu's HnPoolWindow and
// common.cuh's HnTilePixel.
#include "conv.cu"

// pool_grad_nhwc16 from the pooled gradient already channels-last in bf16 (dy16 [n][P][Q][C / 2] bf16 pairs, the batch
// norm's hand-over, norm.cu's bn_bwd_dx_nhwc16): the same dz16 [n][H][W][C / 2] bits, since a bf16 value or zero
// moves unchanged. A block's 32 pixels x 64 channels in two passes through shared memory: lanes along the pixels
// test the argmax bytes (arg [n][C][P][Q], coalesced along the pixels), each thread 4 channel pairs of its pixel
// (one 32-bit word of 2-bit flags, rows of 9 words so that the 32 pixels' words fall in 32 banks); then lanes along
// the channel pairs copy each pixel's 64 channels of dy16 where they won (coalesced along the channels, the flags
// read as bytes of one row). Grid (ceil(n * H * W / 32), ceil(C / 64)), 256 threads; n * H * W < 2^31, C even.
extern "C" __global__ void __launch_bounds__(256) pool_grad16_nhwc16_px(const unsigned* __restrict__ dy16,
                                                                     const unsigned char* __restrict__ arg,
                                                                     unsigned* __restrict__ y, int n, int C, int H,
                                                                     int W, int P, int Q, int k) {
    __shared__ unsigned hit[32][9];            // [pixel][word]: byte b of word w, bit e: channel 2 (4 w + b) + e won
    __shared__ int src[32];                    // the pixel's pooled output img P Q + p Q + q in dy16, -1 if none
    const int c0 = blockIdx.y * 64, lane = threadIdx.x & 31, row = threadIdx.x >> 5, NP = n * H * W;
    const HnTilePixel px(NP, H * W);
    const HnPoolWindow win(px, C, W, P, Q, k);     // arg[img][c][p][q] = arg[win.pq + c * P * Q]
    unsigned char a[8];                        // channels c0 + 8 row + u, all eight loaded before any is tested
#pragma unroll
    for (int u = 0; u < 8; ++u) {
        const int c = c0 + 8 * row + u;
        a[u] = win.covered && c < C ? arg[win.pq + (long long)c * P * Q] : 0xff;
    }
    unsigned flags = 0u;
#pragma unroll
    for (int u = 0; u < 8; ++u) flags |= (a[u] == win.at ? 1u : 0u) << (8 * (u >> 1) + (u & 1));
    hit[lane][row] = flags;
    if (row == 0) src[lane] = win.covered ? (px.img * P + win.p) * Q + win.q : -1;
    __syncthreads();
    const int half = C / 2, cp = c0 / 2 + lane;                        // this lane's channel pair
    unsigned d[4];                             // pixels row + 8u: the four loads issued before any store
#pragma unroll
    for (int u = 0; u < 4; ++u) {
        const int from = src[row + 8 * u];
        d[u] = from >= 0 && cp < half ? dy16[(long long)from * half + cp] : 0u;
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
        const int j = row + 8 * u, pix = blockIdx.x * 32 + j;
        const unsigned f = hit[j][lane >> 2] >> (8 * (lane & 3));
        if (pix < NP && cp < half) y[(long long)pix * half + cp] = (f & 1u ? d[u] & 0xffffu : 0u) |
                                                                    (f & 2u ? d[u] & 0xffff0000u : 0u);
    }
}
