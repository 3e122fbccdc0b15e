// Data-set batches on the GPU (hetnet.data.ResidentLoader): the uint8 images stay in device memory and one kernel
// per batch gathers the examples, applies the crop (or translate) and flip of the epoch's plan, normalises, and
// gathers the labels.
#include "common.cuh"

// k reflected into [0, n) without repeating the edge: ... 2 1 | 0 1 .. n-1 | n-2 ..., the periodic extension of
// period 2(n-1) that np.pad's / torch's 'reflect' give (n = 1: always 0).
__device__ __forceinline__ int hn_reflect(int k, int n) {
    if (n == 1) return 0;
    const int period = 2 * (n - 1);
    int m = k % period;
    if (m < 0) m += period;
    return m < n ? m : period - m;
}

// plan: int32 (4, M), one column per example served in the epoch; rows: 0 index into the data set, 1 oy, 2 ox,
// 3 flip. This batch is columns start .. start + B - 1. For output pixel (i, j) of example b:
//     jj = flip ? W-1-j : j;   sy = i + oy;   sx = jj + ox
//     reflect == 0: v = images[idx, c, sy, sx], 0 outside the image (zero padding: a crop)
//     reflect != 0: v = images[idx, c, r(sy), r(sx)], r = hn_reflect (reflect padding: a translate)
//     out = (v * scale[c]) + shift[c]   rounded after the product and after the sum, as the NumPy loader does
//     (x * scale in float32, then += shift), so both paths give identical bits; __fmul_rn/__fadd_rn forbid a FMA.
// images (N, C, H, W) uint8; labels (N,) int32; out (B, C, H, W) float32; out_labels (B,) int32.
extern "C" __global__ void gather_images(const unsigned char* __restrict__ images, const int* __restrict__ labels,
                                         const int* __restrict__ plan, long long M, long long start,
                                         const float* __restrict__ scale, const float* __restrict__ shift,
                                         float* __restrict__ out, int* __restrict__ out_labels,
                                         int B, int C, int H, int W, int reflect) {
    const long long n = (long long)B * C * H * W;
    HN_GRID_STRIDE(t, n) {
        const int j = (int)(t % W);
        long long r = t / W;
        const int i = (int)(r % H);
        r /= H;
        const int c = (int)(r % C);
        const int b = (int)(r / C);
        const long long col = start + b;
        const int idx = plan[col], oy = plan[M + col], ox = plan[2 * M + col], flip = plan[3 * M + col];
        int sy = i + oy, sx = (flip ? W - 1 - j : j) + ox;
        if (reflect) {
            sy = hn_reflect(sy, H);
            sx = hn_reflect(sx, W);
        }
        float v = 0.f;
        if (sy >= 0 && sy < H && sx >= 0 && sx < W) v = (float)images[(((long long)idx * C + c) * H + sy) * W + sx];
        out[t] = __fadd_rn(__fmul_rn(v, scale[c]), shift[c]);
        if (c == 0 && i == 0 && j == 0) out_labels[b] = labels[idx];
    }
}
