// The C entry point the tests call through ctypes: run one of mma.cu's GEMM kernels (compiled into the same library,
// see tests/test_mma_emulated.py) on the CPU emulator (cuda_emu.h, forced in front of this file with -include).
typedef void (*HnGemmKernel)(const float*, const float*, float*, int, int, int, int, int, int, long long, long long,
                             long long, float, float, int, int);

// kernel: the address of the entry point (ctypes finds it by name); buffers: the byte ranges of A, B (read-only) and C (written); returns 0 and writes "" to err, or 1 and a message.
extern "C" int emu_gemm(void* kernel, unsigned gx, unsigned gy, unsigned gz, unsigned threads, int smem_bytes,
                        const float* A, long long a_bytes, const float* B, long long b_bytes, float* C,
                        long long c_bytes, int M, int N, int K, int lda, int ldb, int ldc, long long sA, long long sB,
                        long long sC, float alpha, float beta, int splits, int kchunk, unsigned seed, char* err,
                        int err_len) {
    HnGemmKernel fn = reinterpret_cast<HnGemmKernel>(kernel);
    std::string msg;
    {
        emu::S().ranges = {{reinterpret_cast<const unsigned char*>(A), static_cast<size_t>(a_bytes), false},
                           {reinterpret_cast<const unsigned char*>(B), static_cast<size_t>(b_bytes), false},
                           {reinterpret_cast<const unsigned char*>(C), static_cast<size_t>(c_bytes), true}};
        msg = emu::launch({gx, gy, gz}, {threads, 1, 1}, smem_bytes,
                          [=] { fn(A, B, C, M, N, K, lda, ldb, ldc, sA, sB, sC, alpha, beta, splits, kchunk); }, seed);
    }
    snprintf(err, err_len, "%s", msg.c_str());
    return msg.empty() ? 0 : 1;
}

// One of mma.cu's implicit-GEMM convolution kernels (HN_CONV) on the emulator: B (x or dy), W (w or dy) and AUX (the
// bias or the mask, may be null) read-only, Y written; the same error convention as emu_gemm.
typedef void (*HnConvKernel)(const float*, const float*, const float*, float*, int, int, int, int, int, int, int, int,
                             int, int, int, int, int, int, int, int);

// A convolution's global buffers as the launch's ranges: B and W (and AUX, unless null) read-only, Y written.
static void conv_ranges(const void* B, long long b_bytes, const void* W, long long w_bytes, const void* aux,
                        long long aux_bytes, const void* Y, long long y_bytes) {
    emu::S().ranges = {{static_cast<const unsigned char*>(B), static_cast<size_t>(b_bytes), false},
                       {static_cast<const unsigned char*>(W), static_cast<size_t>(w_bytes), false},
                       {static_cast<const unsigned char*>(Y), static_cast<size_t>(y_bytes), true}};
    if (aux != nullptr)
        emu::S().ranges.push_back({static_cast<const unsigned char*>(aux), static_cast<size_t>(aux_bytes), false});
}

extern "C" int emu_conv(void* kernel, unsigned gx, unsigned gy, unsigned gz, unsigned threads, int smem_bytes,
                        const float* B, long long b_bytes, const float* W, long long w_bytes, const float* aux,
                        long long aux_bytes,
                        float* Y, long long y_bytes, int M, int N, int K, int C, int H, int Wd, int R, int S, int P,
                        int Q, int O, int stride, int pad, int act, int splits, int kchunk, unsigned seed, char* err,
                        int err_len) {
    HnConvKernel fn = reinterpret_cast<HnConvKernel>(kernel);
    conv_ranges(B, b_bytes, W, w_bytes, aux, aux_bytes, Y, y_bytes);
    const std::string msg = emu::launch(
        {gx, gy, gz}, {threads, 1, 1}, smem_bytes,
        [=] { fn(B, W, aux, Y, M, N, K, C, H, Wd, R, S, P, Q, O, stride, pad, act, splits, kchunk); }, seed);
    snprintf(err, err_len, "%s", msg.c_str());
    return msg.empty() ? 0 : 1;
}

// One of mma.cu's TMA-fed convolution kernels (HN_CONV16T) on the emulator: emu_conv's arguments, its sums (the
// forwards' batch-norm statistics, written; may be null), then its two tensor maps (the emulator's encoding,
// tests/emu_tma.py) passed by value as the kernel takes them. B and W are read only through the maps, whose tensors
// must lie inside those two buffers.
struct __attribute__((aligned(64))) HnTensorMap {   // mma.cu's, the same layout
    unsigned long long bits[16];
};
typedef void (*HnConvTmaKernel)(const unsigned short*, const unsigned short*, const float*, float*, int, int, int, int,
                                int, int, int, int, int, int, int, int, int, int, int, int, double*, HnTensorMap,
                                HnTensorMap);

extern "C" int emu_conv_tma(void* kernel, unsigned gx, unsigned gy, unsigned gz, unsigned threads, int smem_bytes,
                            const unsigned short* B, long long b_bytes, const unsigned short* W, long long w_bytes,
                            const float* aux, long long aux_bytes, float* Y, long long y_bytes, int M, int N, int K,
                            int C, int H, int Wd, int R, int S, int P, int Q, int O, int stride, int pad, int act,
                            int splits, int kchunk, double* sums, long long sums_bytes, const HnTensorMap* amap,
                            const HnTensorMap* bmap, unsigned seed, char* err, int err_len) {
    HnConvTmaKernel fn = reinterpret_cast<HnConvTmaKernel>(kernel);
    const HnTensorMap a = *amap, b = *bmap;
    conv_ranges(B, b_bytes, W, w_bytes, aux, aux_bytes, Y, y_bytes);
    if (sums != nullptr)
        emu::S().ranges.push_back({reinterpret_cast<const unsigned char*>(sums), static_cast<size_t>(sums_bytes), true});
    const std::string msg = emu::launch(
        {gx, gy, gz}, {threads, 1, 1}, smem_bytes,
        [=] { fn(B, W, aux, Y, M, N, K, C, H, Wd, R, S, P, Q, O, stride, pad, act, splits, kchunk, sums, a, b); },
        seed);
    snprintf(err, err_len, "%s", msg.c_str());
    return msg.empty() ? 0 : 1;
}
