// Shared helpers for hetnet's CUDA kernels (compiled by NVRTC through cupy.RawModule, and by nvcc in the compile test).
// Shape legend as in hetnet/backends/__init__.py: N batch, C in-channels, K out-channels, H/W input, P/Q output,
// R/S kernel. All tensors are float32, NCHW, C-contiguous.
#pragma once

#define HN_RELU 1
#define HN_GELU 2  // only batch normalisation's epilogue takes it (the fused BatchNorm -> GELU, norm.cu)
#define HN_INF __int_as_float(0x7f800000)  // NVRTC has no math.h, so no INFINITY

// GELU, exact form: gelu(x) = x * Phi(x), Phi the standard normal CDF, Phi(x) = erfc(-x / sqrt 2) / 2. Its
// derivative, by the product rule on x * Phi(x): gelu'(x) = Phi(x) + x * phi(x), phi(x) = exp(-x^2 / 2) / sqrt(2 pi).
// Phi without erfcf (about 45 instructions, and gelu' needed a second exponential): for a = |x|,
// Q(a) = Phi(-a) = exp(-a^2 / 2) R(a), R(a) = erfcx(a / sqrt 2) / 2 smooth and decreasing (0.5 at 0, ~1 / (a sqrt(2
// pi)) far out), R a degree-10 polynomial in q = (a - 2 sqrt 2) / (a + 2 sqrt 2) (relative error 5.6e-9 on [0, 14],
// beyond which Q is below float32's smallest normal: a is clamped there). Phi(x) = Q for x < 0 -- relative accuracy
// in the negative tail, where 1 - Q would cancel -- and 1 - Q otherwise; gelu' reuses the exponential. In float32:
// within 7 ulps of the exact GELU for |x| < 4, 4.3e-6 relative in the tail (exp of -a^2 / 2, a large), gelu' within
// 1.4e-7 (benchmarks/kernels/gelu_fit.py fits the polynomial and measures these).
#define HN_INV_SQRT_2PI 0.39894228040143268f
struct HnPhi {
    float phi, e;        // Phi(x), exp(-x^2 / 2)
};
__device__ __forceinline__ HnPhi hn_phi(float x) {
    const float a = fminf(fabsf(x), 14.f), q = __fdividef(a - 2.82842712f, a + 2.82842712f);
    float r = 1.36912731e-05f;
    r = fmaf(r, q, 6.9651971e-05f);
    r = fmaf(r, q, 1.60506152e-05f);
    r = fmaf(r, q, -0.000481939234f);
    r = fmaf(r, q, -0.000420353521f);
    r = fmaf(r, q, 0.00349644967f);
    r = fmaf(r, q, 0.00186583993f);
    r = fmaf(r, q, -0.0394890308f);
    r = fmaf(r, q, 0.120829135f);
    r = fmaf(r, q, -0.213592932f);
    r = fmaf(r, q, 0.12769784f);
    const float e = __expf(-0.5f * x * x), tail = e * r;
    return {x < 0.f ? tail : 1.f - tail, e};
}
__device__ __forceinline__ float hn_gelu(float x) { return x * hn_phi(x).phi; }
__device__ __forceinline__ float hn_gelu_grad(float x) {
    const HnPhi p = hn_phi(x);
    return fmaf(x, HN_INV_SQRT_2PI * p.e, p.phi);
}

// The batch-norm kernels' walk over channel c's N * HW values of x[N, C, HW] (blocks along gridDim.y, a grid-stride
// loop): i runs over [0, N * HW), idx = (n * C + c) * HW + hw its element, without dividing per element: the stride S
// moves hw = i % HW on by S % HW and n by S / HW, plus a carry.
template <typename I>
struct HnPlaneWalk {
    I i, step, end, idx, didx, wrap;
    int hw, dhw, HW;
    __device__ __forceinline__ HnPlaneWalk(int N, int C, int HW_, int c) : HW(HW_) {
        i = (I)blockIdx.y * blockDim.x + threadIdx.x;
        step = (I)gridDim.y * blockDim.x;
        end = (I)N * HW;
        const I n = i / (I)HW, dn = step / (I)HW;
        hw = (int)(i - n * (I)HW);
        dhw = (int)(step - dn * (I)HW);
        idx = (n * C + c) * (I)HW + hw;
        didx = dn * C * (I)HW + dhw;
        wrap = (I)C * HW - HW;
    }
    __device__ __forceinline__ bool more() const { return i < end; }
    __device__ __forceinline__ void next() {
        i += step;
        idx += didx;
        hw += dhw;
        if (hw >= HW) { hw -= HW; idx += wrap; }
    }
    // The walk's next U elements (ok[u] false past the end), the walk moved past them: a loop over these issues U
    // loads before it uses one (one load per step left the batch-norm kernels latency-bound).
    template <int U>
    __device__ __forceinline__ void take(I (&at)[U], bool (&ok)[U]) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
            ok[u] = more();
            at[u] = idx;
            next();
        }
    }
};

// Element i of an activation as a float32: stored as float32, or as bf16 bits (the upper half of a float32; an
// activation a bf16 step stores in bf16, the cuda backend's conv.Nchw16).
__device__ __forceinline__ float hn_act(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float hn_act(const unsigned short* p, long long i) {
    return __uint_as_float(static_cast<unsigned>(p[i]) << 16);
}

// bf16 values as their bits (round to nearest even, cvt.rn.bf16x2.f32 puts its first source in the high half).
__device__ __forceinline__ unsigned hn_bf16x2_bits(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
// One value's bf16 bits.
__device__ __forceinline__ unsigned short hn_bf16_bits(float v) {
    return static_cast<unsigned short>(hn_bf16x2_bits(v, 0.f) & 0xffffu);
}

// HN_BN_ILP elements of a walk, taken at once (HnPlaneWalk::take): whether they exist (ok(u)), read(p, v) their
// values in p (float32 or bf16 bits: hn_act; 0 past the end), all loads in flight before any is used, and
// write(p, v) stores the values where they exist (float32, or bf16 bits: round to nearest even).
#define HN_BN_ILP 4
template <typename I>
struct HnTaken {
    static constexpr int U = HN_BN_ILP;
    I at_[U];
    bool ok_[U];
    __device__ __forceinline__ explicit HnTaken(HnPlaneWalk<I>& w) { w.take(at_, ok_); }
    __device__ __forceinline__ bool ok(int u) const { return ok_[u]; }
    template <typename X>
    __device__ __forceinline__ void read(const X* p, float (&v)[U]) const {
#pragma unroll
        for (int u = 0; u < U; ++u) v[u] = ok_[u] ? hn_act(p, at_[u]) : 0.f;
    }
    __device__ __forceinline__ void write(float* p, const float (&v)[U]) const {
#pragma unroll
        for (int u = 0; u < U; ++u)
            if (ok_[u]) p[at_[u]] = v[u];
    }
    __device__ __forceinline__ void write(unsigned short* p, const float (&v)[U]) const {
#pragma unroll
        for (int u = 0; u < U; ++u)
            if (ok_[u]) p[at_[u]] = hn_bf16_bits(v[u]);
    }
};

// One 16-byte global load or store (p 16-byte aligned); the CPU emulator's versions check the alignment.
#ifndef HN_EMULATE
__device__ __forceinline__ uint4 hn_ld16(const void* p) { return *reinterpret_cast<const uint4*>(p); }
__device__ __forceinline__ void hn_st16(void* p, uint4 v) { *reinterpret_cast<uint4*>(p) = v; }
#endif

// VW consecutive elements of a plane as float32, from element i on (i a multiple of VW, p 16-byte aligned), in
// 16-byte loads: 4 float32 a load, or 8 bf16 (the low half of a word first).
template <int VW>
__device__ __forceinline__ void hn_act_vec(const float* p, long long i, float (&v)[VW]) {
#pragma unroll
    for (int k = 0; k < VW; k += 4) {
        const uint4 q = hn_ld16(p + i + k);
        v[k] = __uint_as_float(q.x), v[k + 1] = __uint_as_float(q.y);
        v[k + 2] = __uint_as_float(q.z), v[k + 3] = __uint_as_float(q.w);
    }
}
template <int VW>
__device__ __forceinline__ void hn_act_vec(const unsigned short* p, long long i, float (&v)[VW]) {
#pragma unroll
    for (int k = 0; k < VW; k += 8) {
        const uint4 q = hn_ld16(p + i + k);
        const unsigned w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            v[k + 2 * j] = __uint_as_float(w[j] << 16);
            v[k + 2 * j + 1] = __uint_as_float(w[j] & 0xFFFF0000u);
        }
    }
}

// A walk in vectors (HnPlaneWalk over HW / VW vectors a plane, hn_bn_vec true): its next VN vectors of VW elements,
// HnTaken's interface with one 16-byte load (or store) a vector and tensor in place of one an element.
template <typename I, int VW, int VN>
struct HnVecTaken {
    static constexpr int U = VW * VN;
    I base[VN];
    bool there[VN];
    __device__ __forceinline__ explicit HnVecTaken(HnPlaneWalk<I>& w) {
#pragma unroll
        for (int k = 0; k < VN; ++k) {
            base[k] = w.idx * VW;
            there[k] = w.more();
            w.next();
        }
    }
    __device__ __forceinline__ bool ok(int u) const { return there[u / VW]; }
    template <typename X>
    __device__ __forceinline__ void read(const X* p, float (&v)[U]) const {
#pragma unroll
        for (int k = 0; k < VN; ++k) {
            float q[VW];
            if (there[k]) {
                hn_act_vec<VW>(p, base[k], q);
            } else {
#pragma unroll
                for (int j = 0; j < VW; ++j) q[j] = 0.f;
            }
#pragma unroll
            for (int j = 0; j < VW; ++j) v[k * VW + j] = q[j];
        }
    }
    __device__ __forceinline__ void write(float* p, const float (&v)[U]) const {
#pragma unroll
        for (int k = 0; k < VN; ++k) {
            if (!there[k]) continue;
#pragma unroll
            for (int j = 0; j < VW; j += 4)
                hn_st16(p + base[k] + j, make_uint4(__float_as_uint(v[k * VW + j]), __float_as_uint(v[k * VW + j + 1]),
                                                    __float_as_uint(v[k * VW + j + 2]),
                                                    __float_as_uint(v[k * VW + j + 3])));
        }
    }
    __device__ __forceinline__ void write(unsigned short* p, const float (&v)[U]) const {
        static_assert(VW % 8 == 0, "whole 16-byte words of bf16");
#pragma unroll
        for (int k = 0; k < VN; ++k) {
            if (!there[k]) continue;
            const float* q = v + k * VW;
#pragma unroll
            for (int j = 0; j < VW; j += 8)
                hn_st16(p + base[k] + j, make_uint4(hn_bf16x2_bits(q[j], q[j + 1]), hn_bf16x2_bits(q[j + 2], q[j + 3]),
                                                    hn_bf16x2_bits(q[j + 4], q[j + 5]),
                                                    hn_bf16x2_bits(q[j + 6], q[j + 7])));
        }
    }
};

// The batch-norm kernels' vectors: HN_BN_VW elements of a plane (one 16-byte load of bf16, two of float32), the same
// for every storage, so that a kernel's versions for bf16 and float32 tensors add their values in the same order.
#define HN_BN_VW 8
// Whether every tensor (null: none) is 16-byte aligned.
__device__ __forceinline__ bool hn_aligned16(const void* a, const void* b = nullptr, const void* c = nullptr) {
    const unsigned long long bits = reinterpret_cast<unsigned long long>(a) | reinterpret_cast<unsigned long long>(b) |
                                    reinterpret_cast<unsigned long long>(c);
    return (bits & 15ull) == 0;
}
// Whether a batch-norm kernel may walk planes of HW elements in vectors (hn_bn_walk): HW a multiple of HN_BN_VW and
// every tensor 16-byte aligned.
__device__ __forceinline__ bool hn_bn_vec(int HW, const void* a, const void* b = nullptr, const void* c = nullptr) {
    return HW % HN_BN_VW == 0 && hn_aligned16(a, b, c);
}

// A batch-norm kernel's walk over channel c's N * HW values (HnPlaneWalk; blocks along gridDim.y), handing each take
// to f: VN vectors of HN_BN_VW elements (HnVecTaken) where `vec` (hn_bn_vec), else HN_BN_ILP single elements
// (HnTaken). Either way a thread takes its HnPlaneWalk steps in order, one element after another within a take, so
// the order in which a thread meets the elements does not depend on VN.
template <typename I, int VN, typename F>
__device__ __forceinline__ void hn_bn_walk(int N, int C, int HW, int c, bool vec, F&& f) {
    if (vec) {
        for (HnPlaneWalk<I> w(N, C, HW / HN_BN_VW, c); w.more();) f(HnVecTaken<I, HN_BN_VW, VN>(w));
    } else {
        for (HnPlaneWalk<I> w(N, C, HW, c); w.more();) f(HnTaken<I>(w));
    }
}

// Block-wide sum of a double (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ __forceinline__ double hn_block_sum(double v, double* shm /* >= 32 doubles */) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) shm[warp] = v;
    __syncthreads();
    v = lane < nw ? shm[lane] : 0.0;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float hn_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float hn_warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// "lowbias32" (Chris Wellons); the same hash as hetnet.random.lowbias32.
__device__ __forceinline__ unsigned hn_lowbias32(unsigned x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    x ^= x >> 16;
    return x;
}

// Element i of the counter-based uniform stream of `seed`, as the raw 32-bit hash (uniform = hash / 2^32).
__device__ __forceinline__ unsigned hn_counter_hash(unsigned seed, unsigned i) {
    return hn_lowbias32((i * 0x9E3779B1u) ^ seed);
}

#define HN_GRID_STRIDE(i, n) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (long long)(n); \
         i += (long long)gridDim.x * blockDim.x)

// Index types. The pooling and batch-norm kernels come twice: "<name>" with 64-bit indices and "<name>_i32" with
// unsigned 32-bit ones, for tensors under 2^31 elements (CudaBackend.launch_ix picks). Their index arithmetic divides
// by image sizes, and a 64-bit integer division costs several times a 32-bit one: with 64-bit indices, max-pool and
// BN -> ReLU -> pool backward were bound by those divisions (~0.6 and ~0.14 TB/s on an H200).
#define HN_GRID_STRIDE_T(I, i, n) \
    for (I i = (I)blockIdx.x * blockDim.x + threadIdx.x; i < (I)(n); i += (I)gridDim.x * blockDim.x)

// Both versions of a kernel whose body is the template function name##_body<I>:
// HN_TWO_INDEX_KERNELS(name, (parameter list), (argument list))
#define HN_TWO_INDEX_KERNELS(name, params, args) \
    extern "C" __global__ void name params { name##_body<long long> args; } \
    extern "C" __global__ void name##_i32 params { name##_body<unsigned> args; }

// Max-pooling backward at one input element (n*C + c = nc, h, w): the sum of dy over the windows whose first
// maximum is this element (arg holds each window's argmax position, row-major), skipping windows whose pooled
// value y is <= 0 when y is given (the ReLU mask read from the pooled output). Windows p with p*st <= h < p*st+k;
// exactly one (or none, past the last window) when the windows do not overlap (k == st), found without a loop.
template <typename I>
__device__ __forceinline__ float hn_pool_grad(const float* __restrict__ dy, const unsigned char* __restrict__ arg,
                                              const float* __restrict__ y, I nc, int h, int w, int P, int Q, int k,
                                              int st) {
    if (k == st) {
        const int p = h / k, q = w / k;
        if (p >= P || q >= Q) return 0.f;
        const I o = nc * (I)(P * Q) + (I)(p * Q + q);
        return (arg[o] == (h - p * k) * k + (w - q * k) && !(y && y[o] <= 0.f)) ? dy[o] : 0.f;
    }
    const int p_lo = h >= k ? (h - k) / st + 1 : 0, p_hi = min(P - 1, h / st);
    const int q_lo = w >= k ? (w - k) / st + 1 : 0, q_hi = min(Q - 1, w / st);
    float v = 0.f;
    for (int p = p_lo; p <= p_hi; ++p)
        for (int q = q_lo; q <= q_hi; ++q) {
            const I o = nc * (I)(P * Q) + (I)(p * Q + q);
            if (arg[o] == (h - p * st) * k + (w - q * st) && !(y && y[o] <= 0.f)) v += dy[o];
        }
    return v;
}

// --- channels-last bf16 copies (conv.cu's to_nhwc16, norm.cu's bn_apply_nhwc16): the operands of mma.cu's HN_CONV16 ---

// x rounded to tf32 (to nearest, ties away from zero: cvt.rna.tf32.f32) as a float32 with its low 13 bits zero: the
// operands of mma.cu's tf32 channels-last convolutions (HN_CONV32W, HN_CONV32F). NaN stays NaN, overflow goes to inf.
__device__ __forceinline__ float hn_tf32_round(float x) {
    return x != x ? x : __uint_as_float((__float_as_uint(x) + 0x1000u) & 0xffffe000u);
}

// x as two tf32 values, hi = tf32(x) and lo = tf32(x - hi) (x - hi is exact in float32): hi + lo is x to 2^-22 of it,
// and hi hi' + hi lo' + lo hi' its product with another to about 3 x 2^-22 (the split copies of the fp32 convolutions,
// mma.cu's SPLIT kernels). A split copy stores each 16-byte chunk of 4 consecutive floats (element e of the unsplit
// tensor, e a multiple of 4 apart) as its hi chunk, then its lo chunk: hi at hn_split_at(e), lo 4 floats on.
__device__ __forceinline__ float2 hn_split_tf32(float x) {
    const float hi = hn_tf32_round(x);
    return make_float2(hi, hn_tf32_round(x - hi));
}
__device__ __forceinline__ long long hn_split_at(long long e) {
    return 2 * (e & ~3LL) + (e & 3);
}

// The pixels of a channels-last tile: 32 consecutive pixels of the n * HW (image-major, all images' pixels in a row:
// the NHWC copy's rows), so that a tile never straddles idle lanes past an image's end (HW = 9 would leave 23 of 32).
// This lane's pixel pix (of NP = n * HW < 2^31) is image img, position hw; x[img][c][hw] = xc[c * HW].
struct HnTilePixel {
    int pix, img, hw;
    bool in;
    __device__ __forceinline__ HnTilePixel(int NP, int HW) : HnTilePixel(NP, HW, blockIdx.x) {}
    // the pixel of tile `tile` (a block of several tiles)
    __device__ __forceinline__ HnTilePixel(int NP, int HW, int tile) {
        pix = tile * 32 + (threadIdx.x & 31);
        in = pix < NP;
        img = in ? pix / HW : 0;
        hw = in ? pix - img * HW : 0;
    }
};

// The load half of a 64-channel x 32-pixel tile: thread (row, lane)'s channels c0 + row + 8u (u < 8) at its pixel,
// xc = x + img C HW + hw of x [n][C][HW] (HnTilePixel; float32 or bf16 bits, hn_act), 0 past C or the pixels (in
// false): the eight loads issued before any is used.
template <typename X>
__device__ __forceinline__ void hn_load_nhwc16_rows(float (&v)[8], const X* __restrict__ xc, int c0, int C, int HW,
                                                    bool in) {
    const int row = threadIdx.x >> 5;
#pragma unroll
    for (int u = 0; u < 8; ++u) {
        const int c = c0 + row + 8 * u;
        v[u] = c < C && in ? hn_act(xc, (long long)c * HW) : 0.f;
    }
}

// The whole load half of a channels-last copy's tile: t[c - c0][p - p0] = x[img][c][hw] for the block's 64 channels
// from c0 and the 32 pixels of px's tile (0 past C or the pixels), published by a barrier.
__device__ __forceinline__ void hn_load_nhwc_tile(float (&t)[64][33], const float* __restrict__ x, const HnTilePixel& px,
                                                  int c0, int C, int HW) {
    const int lane = threadIdx.x & 31, row = threadIdx.x >> 5;
    float v[8];                        // channels c0 + row + 8u
    hn_load_nhwc16_rows(v, x + (long long)px.img * C * HW + px.hw, c0, C, HW, px.in);
#pragma unroll
    for (int u = 0; u < 8; ++u) t[row + 8 * u][lane] = v[u];
    __syncthreads();
}

// The store half of a 64-channel x 32-pixel tile moved channels-last: t[c - c0][p - p0] (float, in shared memory)
// to y[p][c / 2] as bf16 pairs (C even), p < NP the tile's pixels (HnTilePixel); each warp writes 64 consecutive
// channels (32 pairs) of a pixel. 256 threads.
__device__ __forceinline__ void hn_store_nhwc16_tile(const float (&t)[64][33], unsigned* __restrict__ y, int p0, int c0,
                                                     int C, int NP) {
    const int lane = threadIdx.x & 31, row = threadIdx.x >> 5, c = c0 + 2 * lane;
    for (int j = row; j < 32; j += 8) {
        const int p = p0 + j;
        if (p < NP && c < C) y[(long long)p * (C / 2) + c / 2] = hn_bf16x2_bits(t[2 * lane][j], t[2 * lane + 1][j]);
    }
}

// 8 consecutive elements of a plane as their 16-byte words, loaded (from element i, p 16-byte aligned; zeros where
// `in` is false) before they are used: one word of 8 bf16, or two of 4 float32; unpack gives them as float32 (bf16:
// the low half of a word first, as hn_act_vec).
template <typename X>
struct HnRaw8 {
    static constexpr int W = 16 / sizeof(X) == 8 ? 1 : 2;
    uint4 q[W];
    __device__ __forceinline__ void load(const X* __restrict__ p, long long i, bool in) {
#pragma unroll
        for (int k = 0; k < W; ++k) q[k] = in ? hn_ld16(p + i + k * (8 / W)) : make_uint4(0, 0, 0, 0);
    }
    __device__ __forceinline__ void unpack(float (&v)[8]) const {
#pragma unroll
        for (int k = 0; k < W; ++k) {
            const unsigned w[4] = {q[k].x, q[k].y, q[k].z, q[k].w};
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                if constexpr (W == 1) {
                    v[2 * j] = __uint_as_float(w[j] << 16);
                    v[2 * j + 1] = __uint_as_float(w[j] & 0xFFFF0000u);
                } else {
                    v[4 * k + j] = __uint_as_float(w[j]);
                }
            }
        }
    }
};

// The channels-last bf16 copies in 16-byte vectors (norm.cu's bn_apply_nhwc16v, bn_bwd_dx_nhwc16v), where HW and C
// are multiples of 8 and every tensor is 16-byte aligned: a tile of 64 channels from c0 = 64 blockIdx.y x 64 pixels
// of the n * HW from p0 = 64 tile. Thread tid takes channels c = c0 + 2 (tid / 8) and c + 1 at the 8 pixels p = p0 +
// 8 (tid % 8) .. p + 7 (one image, as HW % 8 == 0): one vector of each channel (HnRaw8; a warp's loads are 4 rows x
// 128 bytes of bf16 [n][C][HW]). Its values go to the tile's words s[pixel][channel pair] (bf16 pairs, channel
// c in the low half), the pair columns XOR 4 (pixel / 8 % 8), so that a warp's stores of one pixel offset k fall in
// 32 banks (pairs 4w .. 4w + 3 at 8 pixel groups); after a barrier each thread stores two 16-byte chunks of 8
// channels of a pixel (the swizzle keeps a chunk's 4 words together), a warp 4 pixels x 128 bytes of y [n HW][C].
struct HnVecTile {
    int c, p;                  // the thread's first channel and pixel
    bool in;                   // c < C and p < NP (so c + 1 < C and p + 7 < NP: C and NP multiples of 8)
    long long at;              // the offset of (c, p) in [n][C][HW]
    __device__ __forceinline__ HnVecTile(int NP, int C, int HW, int tile) {
        c = blockIdx.y * 64 + 2 * (threadIdx.x >> 3);
        p = tile * 64 + 8 * (threadIdx.x & 7);
        in = c < C && p < NP;
        const int img = in ? p / HW : 0;
        at = in ? ((long long)img * C + c) * HW + (p - img * HW) : 0;
    }
    // r[0], r[1]: channels c and c + 1 at the 8 pixels (zeros outside)
    template <typename X>
    __device__ __forceinline__ void load(const X* __restrict__ x, int HW, HnRaw8<X> (&r)[2]) const {
        r[0].load(x, at, in);
        r[1].load(x, at + HW, in);
    }
    // the thread's 8 pixels of channels c, c + 1 (v0, v1 rounded to bf16 pairs) into the tile s
    __device__ __forceinline__ void stage(unsigned (&s)[64][32], const float (&v0)[8], const float (&v1)[8]) const {
        const int pv = threadIdx.x & 7, cp = (threadIdx.x >> 3) ^ (4 * pv);
#pragma unroll
        for (int k = 0; k < 8; ++k) s[8 * pv + k][cp] = hn_bf16x2_bits(v0[k], v1[k]);
    }
};

// The store half of HnVecTile: tile s (16-byte aligned, published by a barrier) to y [NP][C] bf16 channels-last,
// pixels p0 .. p0 + 63.
__device__ __forceinline__ void hn_store_nhwc16_vec(const unsigned (&s)[64][32], unsigned short* __restrict__ y,
                                                    int p0, int C, int NP) {
    const int c0 = blockIdx.y * 64;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int i = threadIdx.x + 256 * h, r = i >> 3, j = i & 7, p = p0 + r, c = c0 + 8 * j;
        if (p >= NP || c >= C) continue;
        hn_st16(y + (long long)p * C + c, *reinterpret_cast<const uint4*>(&s[r][4 * (j ^ ((r >> 3) & 7))]));
    }
}

// The same tile as mma.cu's r tiles read dy (their K-major copy): yt[c][p] = tf32(t[c - c0][p - p0]) as float32
// [C][ldk] for the NP pixels, ldk >= NP the pixels rounded up to 4, zeros in the columns NP..ldk-1; each warp writes
// 32 consecutive pixels of a channel at a time.
__device__ __forceinline__ void hn_store_kmajor32_tile(const float (&t)[64][33], float* __restrict__ yt, int p0,
                                                       int c0, int C, int NP, int ldk) {
    const int lane = threadIdx.x & 31, row = threadIdx.x >> 5, p = p0 + lane;
    if (p >= ldk) return;
    for (int j = row; j < 64 && c0 + j < C; j += 8)
        yt[(long long)(c0 + j) * ldk + p] = p < NP ? hn_tf32_round(t[j][lane]) : 0.f;
}

// The same tile moved channels-last in tf32: y[p][c] = tf32(t[c - c0][p - p0]) as float32 [NP][C] (any C); each warp
// writes 32 consecutive channels of a pixel at a time.
// SPLIT: the split copy (hn_split_tf32; C a multiple of 4), y [NP][2 C].
template <int SPLIT = 0>
__device__ __forceinline__ void hn_store_nhwc32_tile(const float (&t)[64][33], float* __restrict__ y, int p0, int c0,
                                                     int C, int NP) {
    const int lane = threadIdx.x & 31, row = threadIdx.x >> 5;
    for (int j = row; j < 64; j += 8) {          // (pixel j % 32, channel half j / 32)
        const int p = p0 + (j & 31), c = c0 + 32 * (j >> 5) + lane;
        if (p >= NP || c >= C) continue;
        const float v = t[c - c0][j & 31];
        if constexpr (SPLIT) {
            const float2 s = hn_split_tf32(v);
            const long long at = hn_split_at((long long)p * C + c);
            y[at] = s.x;
            y[at + 4] = s.y;
        } else {
            y[(long long)p * C + c] = hn_tf32_round(v);
        }
    }
}
