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
// images (N, C, H, W) uint8; labels (N,) int32; out (B, C, H, W) float32; out_labels (B,) int32. The output's index
// and its split into (b, c, i, j) in I (common.cuh's HN_TWO_INDEX_KERNELS: 32-bit below 2^31 elements); the image's
// offset in 64 bits (the data set may hold more).
template <typename I>
__device__ __forceinline__ void gather_images_body(const unsigned char* __restrict__ images,
                                                   const int* __restrict__ labels, const int* __restrict__ plan,
                                                   long long M, long long start, const float* __restrict__ scale,
                                                   const float* __restrict__ shift, float* __restrict__ out,
                                                   int* __restrict__ out_labels, int B, int C, int H, int W,
                                                   int reflect) {
    HN_GRID_STRIDE_T(I, t, (I)B * C * H * W) {
        const int j = (int)(t % (I)W);
        I r = t / (I)W;
        const int i = (int)(r % (I)H);
        r /= (I)H;
        const int c = (int)(r % (I)C);
        const int b = (int)(r / (I)C);
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
HN_TWO_INDEX_KERNELS(gather_images,
    (const unsigned char* __restrict__ images, const int* __restrict__ labels, const int* __restrict__ plan,
     long long M, long long start, const float* __restrict__ scale, const float* __restrict__ shift,
     float* __restrict__ out, int* __restrict__ out_labels, int B, int C, int H, int W, int reflect),
    (images, labels, plan, M, start, scale, shift, out, out_labels, B, C, H, W, reflect))
