// Tensor-core GEMMs through mma.sync (sm_80 and sm_90): C[M,N] = alpha * op(A) @ op(B) + beta * C, with A, B and C
// float32 matrices in global memory and every product accumulated in float32. Two compute precisions:
//   tf32: mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32, each operand rounded by cvt.rna.tf32.f32 (10 mantissa
//         bits, to nearest, ties away from zero) as it is read from shared memory;
//   bf16: mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32, each operand rounded to bf16 (8 mantissa bits, to
//         nearest even) as it is written to shared memory.
// Launched by mma.py (gemm_tc), whose tile table (TILES) writes the extern "C" entry points at the end of this text
// (HN_GEMM lines). Compiled by NVRTC through cupy.RawModule, by nvcc in tests/test_cu_compile.py, and on the CPU by
// tests/cuda_emu (a warp emulator that runs these kernels against the fragment layouts of the PTX ISA, with a
// shared-memory race check), where HN_EMULATE replaces the PTX wrappers below.
//
// Matrices are row-major with leading dimension ld (elements between rows); "n"/"t" say whether op() is the
// identity or the transpose, first letter A, second B (BLAS's names, on row-major storage):
//   A n: op(A)[m][k] = A[m*lda + k]   (K contiguous: "K-major")    A t: op(A)[m][k] = A[k*lda + m]   (M contiguous)
//   B n: op(B)[k][n] = B[k*ldb + n]   (N contiguous)               B t: op(B)[k][n] = B[n*ldb + k]   (K contiguous)
//
// Block tile BM x BN, K in steps of BK; (BM/WM) x (BN/WN) warps, each computing a WM x WN warp tile as
// (WM/16) x (WN/8) mma tiles of 16 x 8. Shared memory keeps each operand's tile in its global layout (rows along the
// global tile's strided dimension, so global -> shared copies move whole 16-byte chunks) with each row padded; the
// padding makes every fragment read conflict-free (derivations at HnOperand). Grid: x over N tiles, y over M tiles,
// z over batch x split-K parts. Any M, N, K: rows and columns past the matrix are zero-filled in shared memory, and
// the epilogue writes only elements inside C. beta == 0 never reads C (C may be uninitialised).

#ifndef HN_EMULATE
// --- PTX wrappers (the emulator defines the same functions on the CPU) --------------------------------------------

#define HN_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]

__device__ __forceinline__ unsigned hn_smem_addr(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// cp.async (PTX ISA 9.7.9.25.3.1, "cp.async"): copy cp-size bytes global -> shared, reading only src_bytes of them
// and zero-filling the rest (src_bytes = 0: reads nothing, writes zeros). 16-byte copies need 16-byte aligned
// addresses; .cg (L2 only) exists for 16 bytes only, 4-byte copies use .ca.
__device__ __forceinline__ void hn_cp_async16(void* dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(hn_smem_addr(dst)), "l"(src),
                 "r"(src_bytes)
                 : "memory");
}
__device__ __forceinline__ void hn_cp_async4(void* dst, const void* src, int src_bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(hn_smem_addr(dst)), "l"(src),
                 "r"(src_bytes)
                 : "memory");
}
// Close the group of this thread's cp.async issued since the last commit; wait until at most N groups are pending.
__device__ __forceinline__ void hn_cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void hn_cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ float hn_lds(const float* p) { return *p; }   // p points into shared memory
__device__ __forceinline__ float4 hn_lds4(const float* p) {               // 16-byte aligned
    float4 v;
    asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];\n"
                 : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
                 : "r"(hn_smem_addr(p))
                 : "memory");
    return v;
}
__device__ __forceinline__ void hn_sts2(void* p, unsigned x, unsigned y) {
    asm volatile("st.shared.v2.b32 [%0], {%1, %2};\n" ::"r"(hn_smem_addr(p)), "r"(x), "r"(y) : "memory");
}
__device__ __forceinline__ void hn_sts1(void* p, unsigned x) {
    asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(hn_smem_addr(p)), "r"(x) : "memory");
}
__device__ __forceinline__ void hn_sts4(void* p, unsigned x, unsigned y, unsigned z, unsigned w) {
    asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(hn_smem_addr(p)), "r"(x), "r"(y), "r"(z),
                 "r"(w)
                 : "memory");
}
__device__ __forceinline__ unsigned hn_bits(float x) { return __float_as_uint(x); }

// ldmatrix (PTX ISA 9.7.14.5.15): four 8x8 matrices of 16-bit elements; lanes 8j..8j+7 give the addresses of rows
// 0..7 of matrix j (16 contiguous, 16-byte aligned bytes each); register j of lane l receives row l/4, elements
// 2(l%4) and 2(l%4)+1 of matrix j (the lower-addressed one in the low half). .trans: it receives rows 2(l%4) and
// 2(l%4)+1 of column l/4 instead (low half from row 2(l%4)).
__device__ __forceinline__ void hn_ldmatrix_x4(unsigned (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(hn_smem_addr(p))
                 : "memory");
}
__device__ __forceinline__ void hn_ldmatrix_x4_trans(unsigned (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(hn_smem_addr(p))
                 : "memory");
}

// d += a b for one 16x8 tile (fragment layouts at hn_gemm_tf32_tile / hn_gemm_bf16_tile).
__device__ __forceinline__ void hn_mma_tf32(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void hn_mma_bf16(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// x rounded to tf32 (a .b32 whose low 13 bits are zero).
__device__ __forceinline__ unsigned hn_tf32(float x) {
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
    return r;
}
// lo and hi rounded to bf16 (nearest even) and packed, lo in the low half. cvt.rn.bf16x2.f32 d, a, b puts a in the
// upper half of d and b in the lower (PTX ISA 9.7.9.21, "cvt").
__device__ __forceinline__ unsigned hn_pack_bf16x2(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ float4 hn_ldg4(const float* p) { return __ldg(reinterpret_cast<const float4*>(p)); }
__device__ __forceinline__ float hn_ldg(const float* p) { return __ldg(p); }
__device__ __forceinline__ float hn_ld_c(const float* p) { return *p; }     // C, read before it is written
__device__ __forceinline__ void hn_st(float* p, float v) { *p = v; }
__device__ __forceinline__ void hn_st_byte(unsigned char* p, unsigned char v) { *p = v; }
__device__ __forceinline__ void hn_st_u16(unsigned short* p, unsigned short v) { *p = v; }
__device__ __forceinline__ void hn_st_u32(unsigned short* p, unsigned v) { *reinterpret_cast<unsigned*>(p) = v; }
__device__ __forceinline__ void hn_st2(float* p, float x, float y) { *reinterpret_cast<float2*>(p) = make_float2(x, y); }
__device__ __forceinline__ void hn_st_v4(void* p, uint4 v) { *reinterpret_cast<uint4*>(p) = v; }   // 16-byte aligned
// Named barrier `id` (1..15; 0 is __syncthreads') of the first `count` threads (whole warps) to reach it.
__device__ __forceinline__ void hn_bar_sync(int id, int count) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
__device__ __forceinline__ void hn_atomic_add(float* p, float v) { atomicAdd(p, v); }
// p[0] += x, p[1] += y, p 8-byte aligned: one vector reduction from sm_90 (PTX ISA 9.7.13.6, red .v2.f32), two
// before it.
__device__ __forceinline__ void hn_atomic_add2(float* p, float x, float y) {
#if __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(p), "f"(x), "f"(y) : "memory");
#else
    atomicAdd(p, x);
    atomicAdd(p + 1, y);
#endif
}
__device__ __forceinline__ unsigned hn_umulhi(unsigned a, unsigned b) { return __umulhi(a, b); }
// --- wgmma (sm_90a: PTX ISA 9.7.15, "Asynchronous warpgroup level matrix multiply-accumulate") ----------------------
// Compiled only where the module is built for sm_90a (kernels.py); elsewhere these trap, and mma.launch_conv refuses
// a kernel that calls them.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define HN_SM90A(...) __VA_ARGS__
#else
#define HN_SM90A(...) __trap()
#endif

// This thread's writes to shared memory (cp.async included, once waited for) made visible to the async proxy that
// wgmma reads through; a barrier after it makes every thread's.
__device__ __forceinline__ void hn_fence_proxy_async() {
    HN_SM90A(asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"));
}
__device__ __forceinline__ void hn_wgmma_fence() { HN_SM90A(asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory")); }
__device__ __forceinline__ void hn_wgmma_commit() {
    HN_SM90A(asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"));
}
// Wait until at most N of this warpgroup's committed wgmma groups are pending.
template <int N>
__device__ __forceinline__ void hn_wgmma_wait() {
    HN_SM90A(asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"));
}
// The accumulator operands of hn_wgmma_bf16's asm, d[j][0..3] 16 columns at a time.
#define HN_D4(j) "+f"(d[j][0]), "+f"(d[j][1]), "+f"(d[j][2]), "+f"(d[j][3])
#define HN_D16(j) HN_D4(j), HN_D4(j + 1), HN_D4(j + 2), HN_D4(j + 3)
// Their names in the asm text: %0 .. %31, then %32 .. %63, %64 .. %127 for the wider tiles.
#define HN_R32                                                                                                  \
    "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                                    \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define HN_R64                                                                                                  \
    HN_R32 ", %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "                 \
    "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define HN_R128                                                                                                 \
    HN_R64 ", %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "                 \
    "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "                          \
    "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "              \
    "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
// d += A B for the warpgroup's 64 x N tile, K = 16: A 64 x 16 and B 16 x N bf16 in shared memory (descriptors da,
// db), both K-major (MN = 0: hn_wgmma_desc) or both MN-major (MN = 1, the instruction's transpose flags:
// hn_wgmma_desc_mn). d is the accumulator in mma.sync's m16n8 fragment order per warp (warp w of the group holds rows
// 16w .. 16w + 15; d[j] columns 8j .. 8j + 7), so hn_each_pair reads it as acc[1][N / 8][4].
template <int N, int MN>
__device__ __forceinline__ void hn_wgmma_bf16(float (&d)[N / 8][4], unsigned long long da, unsigned long long db) {
    static_assert(N == 64 || N == 128 || N == 256, "wgmma tile");
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    if constexpr (N == 64) {
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {" HN_R32
                     "}, %32, %33, p, 1, 1, %35, %35;\n}\n"
                     : HN_D16(0), HN_D16(4)
                     : "l"(da), "l"(db), "r"(1), "n"(MN));
    }
    if constexpr (N == 128) {
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {" HN_R64
                     "}, %64, %65, p, 1, 1, %67, %67;\n}\n"
                     : HN_D16(0), HN_D16(4), HN_D16(8), HN_D16(12)
                     : "l"(da), "l"(db), "r"(1), "n"(MN));
    }
    if constexpr (N == 256) {
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {" HN_R128
                     "}, %128, %129, p, 1, 1, %131, %131;\n}\n"
                     : HN_D16(0), HN_D16(4), HN_D16(8), HN_D16(12), HN_D16(16), HN_D16(20), HN_D16(24), HN_D16(28)
                     : "l"(da), "l"(db), "r"(1), "n"(MN));
    }
#else
    __trap();
#endif
}
// d += A B for the warpgroup's 64 x N tile, K = 8, in tf32: A 64 x 8 and B 8 x N float32 words in shared memory, both
// K-major (tf32 has no transpose flags: hn_wgmma_desc), each read as tf32 (its low 13 bits ignored); d as
// hn_wgmma_bf16's.
template <int N>
__device__ __forceinline__ void hn_wgmma_tf32(float (&d)[N / 8][4], unsigned long long da, unsigned long long db) {
    static_assert(N == 64 || N == 128 || N == 256, "wgmma tile");
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    if constexpr (N == 64) {
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n64k8.f32.tf32.tf32 {" HN_R32 "}, %32, %33, p, 1, 1;\n}\n"
                     : HN_D16(0), HN_D16(4)
                     : "l"(da), "l"(db), "r"(1));
    }
    if constexpr (N == 128) {
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n128k8.f32.tf32.tf32 {" HN_R64 "}, %64, %65, p, 1, 1;\n}\n"
                     : HN_D16(0), HN_D16(4), HN_D16(8), HN_D16(12)
                     : "l"(da), "l"(db), "r"(1));
    }
    if constexpr (N == 256) {
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n256k8.f32.tf32.tf32 {" HN_R128 "}, %128, %129, p, 1, 1;\n}\n"
                     : HN_D16(0), HN_D16(4), HN_D16(8), HN_D16(12), HN_D16(16), HN_D16(20), HN_D16(24), HN_D16(28)
                     : "l"(da), "l"(db), "r"(1));
    }
#else
    __trap();
#endif
}
// hn_wgmma_tf32 with A from registers: a[0..3] in mma.sync m16n8k8's A fragment order per warp (warp w of the group:
// a[0] at row 16w + g, column t (lane = 4g + t); a[1] row + 8; a[2] column + 4; a[3] both; PTX ISA 9.7.15.5.2), each
// read as tf32; B 8 x N K-major in shared memory (db). a may not be written until the wgmma's group is retired.
template <int N>
__device__ __forceinline__ void hn_wgmma_tf32_ra(float (&d)[N / 8][4], const unsigned (&a)[4],
                                                 unsigned long long db) {
    static_assert(N == 64 || N == 128 || N == 256, "wgmma tile");
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    if constexpr (N == 64) {
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n64k8.f32.tf32.tf32 {" HN_R32
                     "}, {%32, %33, %34, %35}, %36, p, 1, 1;\n}\n"
                     : HN_D16(0), HN_D16(4)
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
    }
    if constexpr (N == 128) {
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n128k8.f32.tf32.tf32 {" HN_R64
                     "}, {%64, %65, %66, %67}, %68, p, 1, 1;\n}\n"
                     : HN_D16(0), HN_D16(4), HN_D16(8), HN_D16(12)
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
    }
    if constexpr (N == 256) {
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n256k8.f32.tf32.tf32 {" HN_R128
                     "}, {%128, %129, %130, %131}, %132, p, 1, 1;\n}\n"
                     : HN_D16(0), HN_D16(4), HN_D16(8), HN_D16(12), HN_D16(16), HN_D16(20), HN_D16(24), HN_D16(28)
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
    }
#else
    __trap();
#endif
}
#undef HN_R128
#undef HN_R64
#undef HN_R32
#undef HN_D16
#undef HN_D4
#endif  // HN_EMULATE

// --- wgmma's shared-memory operands (mma.cu's own arithmetic: the emulator runs it, giving hn_smem_addr) -------------
// The smem operand descriptor (PTX ISA 9.7.15.5.1) of a bf16 tile stored with the 128-byte swizzle (HnSwizzle128,
// HnSwizzle128MN), its start 1024-byte aligned. Bits: start >> 4 at 0, leading byte offset >> 4 at 16, stride byte
// offset >> 4 at 32 (here 1024: groups of 8 rows of 128 bytes), swizzle mode at 62 (1: 128 bytes).
__device__ __forceinline__ unsigned long long hn_wgmma_desc128(const void* p, unsigned leading_bytes) {
    return static_cast<unsigned long long>((hn_smem_addr(p) & 0x3FFFF) >> 4) |
           (static_cast<unsigned long long>(leading_bytes >> 4) << 16) |
           (static_cast<unsigned long long>(1024 >> 4) << 32) | (1ull << 62);
}
// A K-major tile (HnSwizzle128): rows of 64 elements (128 bytes); p is where the instruction's 16-wide K slice starts
// (the tile start + 32 bytes per K step of 16). The leading byte offset is unused for this layout (1).
__device__ __forceinline__ unsigned long long hn_wgmma_desc(const void* p) { return hn_wgmma_desc128(p, 16); }
// An MN-major tile of 64 K rows (HnSwizzle128MN): a K row holds 64 elements of M or N (128 bytes), and the next 64 of
// M or N lie 64 rows on (8192 bytes, the leading byte offset); p is where the instruction's 16 K rows start (the tile
// start + 2048 bytes per step).
__device__ __forceinline__ unsigned long long hn_wgmma_desc_mn(const void* p) { return hn_wgmma_desc128(p, 8192); }
// The descriptor of the operand `units` 16-byte units after d's: only the start field changes, and it never carries
// out of its 14 bits (shared memory lies below 2^18 bytes), so a 32-bit add of the low word.
__device__ __forceinline__ unsigned long long hn_wgmma_desc_add(unsigned long long d, unsigned units) {
    return (d & 0xFFFFFFFF00000000ull) | (static_cast<unsigned>(d) + units);
}
// p rounded up to the next 1024-byte boundary of shared memory (the swizzle's pattern repeats every 1024 bytes).
__device__ __forceinline__ unsigned char* hn_smem_align1024(unsigned char* p) {
    return p + ((1024u - (hn_smem_addr(p) & 1023u)) & 1023u);
}

__device__ __forceinline__ int hn_imin(int a, int b) { return a < b ? a : b; }
__device__ __forceinline__ int hn_imax(int a, int b) { return a > b ? a : b; }

// Division by a divisor d fixed for the whole launch (1 <= d < 2^31) as one multiply-high, shift and add, for
// dividends 0 <= x < 2^31 (Granlund and Montgomery, "Division by invariant integers using multiplication", 1994):
// with l = ceil(log2 d) and m = floor(2^32 (2^l - d) / d) + 1 < 2^32, x / d = (umulhi(x, m) + x) >> l, the sum below
// 2^32 since umulhi(x, m) <= x. The gathers divide every K tile's row and column indices this way instead of by the
// hardware's ~20-instruction integer division.
struct HnDiv {
    unsigned m;
    int l, d;
};
__device__ __forceinline__ HnDiv hn_div_of(int d) {
    int l = 0;
    while ((1ll << l) < d) ++l;
    return {static_cast<unsigned>(((1ull << 32) * ((1ull << l) - static_cast<unsigned long long>(d))) / d + 1), l, d};
}
__device__ __forceinline__ int hn_div(int x, const HnDiv& v) {
    return static_cast<int>((hn_umulhi(static_cast<unsigned>(x), v.m) + static_cast<unsigned>(x)) >> v.l);
}

// Where channel m of pixel n (n over images x plane pixels) lies in an NCHW tensor of M channels.
__device__ __forceinline__ long long hn_nchw_at(const HnDiv& plane, int M, int m, int n) {
    const int img = hn_div(n, plane);
    return (static_cast<long long>(img) * M + m) * plane.d + (n - img * plane.d);
}

// v rounded to bf16 (nearest even), its bits.
__device__ __forceinline__ unsigned short hn_bf16_of(float v) {
    return static_cast<unsigned short>(hn_pack_bf16x2(v, 0.f) & 0xffffu);
}

// --- shared-memory tiles ---------------------------------------------------------------------------------------------

// One operand's tile in shared memory, elements of any size: MN x BK of op(A) (MN = BM) or of op(B)^T (MN = BN), kept
// in the global layout: K-major (A n, B t) as MN rows of BK, else BK rows of MN; rows padded by PAD_K / PAD_MN
// elements. ELEMS is the larger of the two layouts, so a stage's size does not depend on the layout (mma.py computes
// the same number, smem_bytes).
// Bank conflicts (32 banks of 4 bytes; lane l = 4g + t, g = l/4, t = l%4):
//   tf32 scalar fragment reads (hn_gemm_tf32_tile) touch element (mn0 + g, k0 + t) in all 32 lanes at once:
//     K-major, stride BK + 4 = 36 words: word 36g + t = bank 4g + t, 32 distinct;
//     MN-major, stride MN + 8 words (MN = 64 or 128, so == 8 mod 32): word (MN + 8)t + g = bank 8t + g, 32 distinct.
//   bf16 ldmatrix reads 8 rows of 16 bytes per 8x8 matrix:
//     K-major, stride (BK + 8) * 2 = 80 bytes (BK = 32): rows start at banks 20r mod 32 = 0, 20, 8, 28, 16, 4, 24,
//     12, 4 banks each, 32 distinct; MN-major, stride (MN + 8) * 2 bytes == 16 mod 128: banks 4r, distinct.
//   Row starts stay 16-byte aligned (cp.async, ldmatrix): 36 and MN + 8 floats, 40 and MN + 8 bf16.
template <bool KMAJ_, int MN, int BK, int PAD_K, int PAD_MN>
struct HnOperand {
    static constexpr bool KMAJ = KMAJ_;
    static constexpr int ROWS = KMAJ ? MN : BK, COLS = KMAJ ? BK : MN;
    static constexpr int STRIDE = COLS + (KMAJ ? PAD_K : PAD_MN);
    static constexpr int ELEMS = MN * (BK + PAD_K) > BK * (MN + PAD_MN) ? MN * (BK + PAD_K) : BK * (MN + PAD_MN);
    // the offset of element (mn, k) of the operand's tile
    static __device__ __forceinline__ int at(int mn, int k) { return KMAJ ? mn * STRIDE + k : k * STRIDE + mn; }
};

// Where one block's tile of an operand lies in global memory: the tile's rows are the global rows r0 .. r0+ROWS-1,
// its columns c0 .. c0+COLS-1; rows from rlim on and columns from clim on are outside (read as zeros).
struct HnSrc {
    const float* p;
    int ld, r0, c0, rlim, clim;
    bool vec;   // 16-byte chunks: p and ld are multiples of 4 floats
};

// The operand tile (mn0, k0) of a matrix whose op() is MN x K (op(A), or op(B)^T for B): K-major storage has rows
// along MN, else along K. kend: where this block's K range ends (zeros from there).
template <bool KMAJ>
__device__ __forceinline__ HnSrc hn_src(const float* p, int ld, int mn0, int k0, int mn_lim, int kend) {
    HnSrc s;
    s.p = p;
    s.ld = ld;
    s.r0 = KMAJ ? mn0 : k0;
    s.c0 = KMAJ ? k0 : mn0;
    s.rlim = KMAJ ? mn_lim : kend;
    s.clim = KMAJ ? kend : mn_lim;
    s.vec = (reinterpret_cast<unsigned long long>(p) & 15) == 0 && (ld & 3) == 0;
    return s;
}

// The ROWS x COLS tile copied global -> shared with cp.async (float32 in shared memory, row stride STRIDE): THREADS
// threads take 16-byte chunks (4 floats) in row-major order, consecutive threads along a row (coalesced). A chunk
// inside the matrix is one 16-byte copy when the source allows it; a chunk at the right edge copies its valid floats
// and zero-fills the rest (src-size < 16); a row past the bottom edge copies nothing and is zero-filled (src-size 0;
// the address given is the matrix start, never read). Without 16-byte alignment: four 4-byte copies.
template <int ROWS, int COLS, int STRIDE, int THREADS>
__device__ __forceinline__ void hn_copy_tile_async(float* s, const HnSrc& g, int tid) {
    constexpr int CPR = COLS / 4, CHUNKS = ROWS * CPR;
    static_assert(COLS % 4 == 0 && CHUNKS % THREADS == 0, "tile must split into whole chunks per thread");
#pragma unroll
    for (int i = 0; i < CHUNKS / THREADS; ++i) {
        const int q = tid + i * THREADS, r = q / CPR, c = (q % CPR) * 4;
        const int gr = g.r0 + r, gc = g.c0 + c;
        float* dst = s + r * STRIDE + c;
        const float* src = g.p + (static_cast<long long>(gr) * g.ld + gc);
        if (g.vec) {
            const int n = gr < g.rlim ? hn_imax(0, hn_imin(4, g.clim - gc)) : 0;
            hn_cp_async16(dst, n > 0 ? src : g.p, 4 * n);
        } else {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const bool ok = gr < g.rlim && gc + e < g.clim;
                hn_cp_async4(dst + e, ok ? src + e : g.p, ok ? 4 : 0);
            }
        }
    }
}

// The same tile through registers, for bf16: load() reads a thread's chunks into float4s (zeros outside the
// matrix), store() rounds them to bf16 and writes 8 bytes per chunk (row stride STRIDE bf16 elements).
template <int ROWS, int COLS, int STRIDE, int THREADS>
struct HnRegTile {
    static constexpr int CPR = COLS / 4, PER = ROWS * CPR / THREADS;
    static_assert(COLS % 4 == 0 && ROWS * CPR % THREADS == 0, "tile must split into whole chunks per thread");
    float4 v[PER];

    __device__ __forceinline__ void load(const HnSrc& g, int tid) {
#pragma unroll
        for (int i = 0; i < PER; ++i) {
            const int q = tid + i * THREADS, r = q / CPR, c = (q % CPR) * 4;
            const int gr = g.r0 + r, gc = g.c0 + c;
            const float* src = g.p + (static_cast<long long>(gr) * g.ld + gc);
            if (g.vec && gr < g.rlim && gc + 3 < g.clim) {
                v[i] = hn_ldg4(src);
            } else {
                const bool row = gr < g.rlim;
                v[i].x = row && gc < g.clim ? hn_ldg(src) : 0.f;
                v[i].y = row && gc + 1 < g.clim ? hn_ldg(src + 1) : 0.f;
                v[i].z = row && gc + 2 < g.clim ? hn_ldg(src + 2) : 0.f;
                v[i].w = row && gc + 3 < g.clim ? hn_ldg(src + 3) : 0.f;
            }
        }
    }

    __device__ __forceinline__ void store(unsigned short* s, int tid) const {
#pragma unroll
        for (int i = 0; i < PER; ++i) {
            const int q = tid + i * THREADS, r = q / CPR, c = (q % CPR) * 4;
            hn_sts2(s + r * STRIDE + c, hn_pack_bf16x2(v[i].x, v[i].y), hn_pack_bf16x2(v[i].z, v[i].w));
        }
    }
};

// --- one block's problem ------------------------------------------------------------------------------------------

#define HN_GEMM_PARAMS                                                                                         \
    const float *__restrict__ A, const float *__restrict__ B, float *__restrict__ C, int M, int N, int K, int lda, \
        int ldb, int ldc, long long strideA, long long strideB, long long strideC, float alpha, float beta,     \
        int splits, int kchunk
#define HN_GEMM_ARGS A, B, C, M, N, K, lda, ldb, ldc, strideA, strideB, strideC, alpha, beta, splits, kchunk

// blockIdx.z = batch * splits + split: matrices of batch item `batch`, K range [split * kchunk, + kchunk) (kchunk a
// multiple of BK). With splits > 1 the parts add alpha * (their product) into C with atomics (the launcher has
// scaled C by beta before); otherwise the epilogue writes alpha * acc + beta * C.
struct HnBlock {
    const float* A;
    const float* B;
    float* C;
    int kbeg, kend, m0, n0;
    int tiles;      // BK steps in [kbeg, kend)
    bool atomic;
};

__device__ __forceinline__ HnBlock hn_block(HN_GEMM_PARAMS, int BM, int BN, int BK) {
    HnBlock b;
    const int z = blockIdx.z, batch = z / splits, split = z - batch * splits;
    b.A = A + batch * strideA;
    b.B = B + batch * strideB;
    b.C = C + batch * strideC;
    b.kbeg = split * kchunk;
    b.kend = hn_imin(K, b.kbeg + kchunk);
    b.m0 = blockIdx.y * BM;
    b.n0 = blockIdx.x * BN;
    b.tiles = b.kend > b.kbeg ? (b.kend - b.kbeg + BK - 1) / BK : 0;
    b.atomic = splits > 1;
    return b;
}

// A thread of a block of (BM/WM) x (BN/WN) warps, numbered row-major: its lane, and its warp tile's origin (wm, wn)
// inside the block tile.
struct HnThread {
    int tid, lane, wm, wn;
};

template <int WM, int WN, int WARPS_N>
__device__ __forceinline__ HnThread hn_thread() {
    HnThread t;
    t.tid = threadIdx.x;
    t.lane = t.tid & 31;
    t.wm = (t.tid >> 5) / WARPS_N * WM;
    t.wn = (t.tid >> 5) % WARPS_N * WN;
    return t;
}

template <int MT, int NT>
__device__ __forceinline__ void hn_zero(float (&acc)[MT][NT][4]) {
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;
}

// Accumulator fragment (the same for m16n8k8 and m16n8k16, PTX ISA 9.7.14.5.7 / 9.7.14.5.8, "Accumulators"):
// lane l = 4g + t holds c0, c1 at row g, columns 2t, 2t+1 and c2, c3 at row g+8, columns 2t, 2t+1. So acc[i][j] of a
// warp whose tile starts at (wm, wn) covers rows m = m0 + wm + 16i + g (+8), columns n = n0 + wn + 8j + 2t (+1).
// hn_each_row calls f(i, h, m) for each of a thread's rows m = m0 + wm + 16i + g + 8h inside C (its values are
// acc[i][j][2h] and acc[i][j][2h + 1]); hn_each_pair calls f(m, n, x, y, two) for each pair inside C: x at (m, n),
// y at (m, n + 1), two = n + 1 < N.
template <int MT, class F>
__device__ __forceinline__ void hn_each_row(const HnBlock& b, int M, int wm, int lane, F&& f) {
    const int g = lane >> 2;
#pragma unroll
    for (int i = 0; i < MT; ++i) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int m = b.m0 + wm + 16 * i + g + 8 * h;
            if (m < M) f(i, h, m);
        }
    }
}

template <int MT, int NT, class F>
__device__ __forceinline__ void hn_each_pair(const HnBlock& b, float (&acc)[MT][NT][4], int M, int N, int wm, int wn,
                                             int lane, F&& f) {
    const int t = lane & 3;
    hn_each_row<MT>(b, M, wm, lane, [&](int i, int h, int m) {
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            const int n = b.n0 + wn + 8 * j + 2 * t;   // even
            if (n >= N) continue;
            f(m, n, acc[i][j][2 * h], acc[i][j][2 * h + 1], n + 1 < N);
        }
    });
}

// The GEMM's epilogue: C = alpha * acc + beta * C (C never read when beta == 0), or, split over K, atomics adding
// alpha * acc (a pair of columns in one where C allows 8-byte accesses).
template <int MT, int NT>
__device__ __forceinline__ void hn_epilogue(const HnBlock& b, float (&acc)[MT][NT][4], int M, int N, int ldc,
                                            float alpha, float beta, int wm, int wn, int lane) {
    // n even: with `pair`, &C[m][n] is 8-byte aligned (8-byte stores and reductions)
    const bool pair = (reinterpret_cast<unsigned long long>(b.C) & 7) == 0 && (ldc & 1) == 0;
    hn_each_pair(b, acc, M, N, wm, wn, lane, [&](int m, int n, float x, float y, bool two) {
        float* p = b.C + (static_cast<long long>(m) * ldc + n);
        x *= alpha;
        y *= alpha;
        if (b.atomic) {
            if (two && pair) {
                hn_atomic_add2(p, x, y);
            } else {
                hn_atomic_add(p, x);
                if (two) hn_atomic_add(p + 1, y);
            }
            return;
        }
        if (beta != 0.f) {
            x += beta * hn_ld_c(p);
            if (two) y += beta * hn_ld_c(p + 1);
        }
        if (two && pair) {
            hn_st2(p, x, y);
        } else {
            hn_st(p, x);
            if (two) hn_st(p + 1, y);
        }
    });
}

// --- convolutions as implicit GEMMs ---------------------------------------------------------------------------------

// MODE 1, the forward: y[img][o][p][q] = act(b[o] + sum_k W[o][k] x(k; img, p, q)). The GEMM C[M,N] = A[M,K] B[K,N]
// with M = output channels O, N = images x P x Q (n = (img * P + p) * Q + q), K = C x R x S (k = (c * R + r) * S + s,
// a conv weight's order), A = W as stored ("A n", lda = K), and B never stored: B[k][n] = x[img][c][p*stride - pad +
// r][q*stride - pad + s], zero outside the image.
// MODE 2, the data gradient: dx[img][c][h][w] = sum over (o, r, s) of W[o][c][r][s] dy[img][o][ph][pw] where
// h + pad - r = ph * stride and w + pad - s = pw * stride (taps that are not whole output positions, or fall
// outside P x Q, add nothing); times (relu_x > 0) when a mask is given. The GEMM has M = C, N = images x H x W,
// K = O x R x S (k = (o * R + r) * S + s); A[c][k] = W[o][c][r][s] and B[k][n] = dy[img][o][ph][pw] are both gathered.
// MODE 3, the filter gradient: dw[o][c][r][s] += sum over (img, p, q) of dy[img][o][p][q] x[img][c][p*stride - pad +
// r][q*stride - pad + s]. The GEMM has M = O, N = C x R x S, K = images x P x Q (k = (img * P + p) * Q + q), A[o][k] =
// dy[img][o][p][q] and B[k][n] = x(...) gathered, C = dw as stored (ldc = N) with beta = 1, the K sum split over
// blockIdx.z with atomics where the tiles leave SMs idle (the GEMM's split-K).
// Gathered tiles are copied straight into shared memory by 4-byte cp.async (zero-filled where a tap adds nothing), in
// the GEMM's chunk order, so the pipelines, fragments and roundings are the GEMM's. The forward's and data gradient's
// C is their output in NCHW: element (m, n) at (img * M + m) * plane + pixel, plane = P x Q or H x W.
struct HnConv {
    const float* aux;    // forward: the bias [O] or null; data gradient: the mask relu_x [n, C, H, W] or null
                         // (filter gradient: null)
    int c, h, w, r, s, p, q, o, stride, pad;
    int act;             // forward: kernels.py's ACTS, 0 none, 1 ReLU (the act word's bits below HN_OUT16)
    // the divisors of the K loop and the epilogue (hn_conv_of): B's row k = (ch, rr, ss) over kb_plane = rows x
    // kb_inner; A's column k = (k / ka_plane, k % ka_plane) (data and filter gradients); the stride (data gradient);
    // the output's plane (forward: P x Q, data gradient: H x W)
    HnDiv kb_plane, kb_inner, ka_plane, by_stride, out_plane;
    int pooled;          // the pooled forward (EPI 4): images x P x Q pooled outputs (P, Q the pooled sizes here)
    bool out16;          // forward, pooled forward, data gradient: the output stored as bf16 bits (HN_OUT16)
};

// The act word of the convolution kernels: the forward's ACTS code, plus HN_OUT16 where the output (the forward's y,
// NCHW, and the pooled forward's y before its argmax bytes; the data gradient's dx) is stored as bf16 bits (round to
// nearest even) instead of float32: an activation or its gradient a bf16 step stores in bf16 (conv.Nchw16), the
// input of the batch norm after the convolution or the gradient of the one before it.
#define HN_OUT16 16

template <int MODE>
__device__ __forceinline__ HnConv hn_conv_of(const float* aux, int c, int h, int w, int r, int s, int p, int q, int o,
                                             int stride, int pad, int act) {
    return {aux, c, h, w, r, s, p, q, o, stride, pad, act & (HN_OUT16 - 1),
            hn_div_of(MODE == 3 ? p * q : r * s), hn_div_of(MODE == 3 ? q : s), hn_div_of(MODE == 2 ? r * s : p * q),
            hn_div_of(stride), hn_div_of(MODE == 1 ? p * q : h * w), 0, (act & HN_OUT16) != 0};
}

// The four columns n0 + c0 .. n0 + c0 + 3 of B that one thread copies in every K tile (hn_copy_tile_async's chunk
// order keeps a thread's columns fixed when THREADS is a multiple of the chunks per row): where each column's image
// starts in B's source (elements; fewer than 2^31), and a corner its taps are found from (ih0 out of range past N):
// forward, the window's top left (p*stride - pad, q*stride - pad); data gradient, (h + pad, w + pad); filter gradient
// (columns (c, r, s)), the channel's offset in an image and the tap's offset (r - pad, s - pad).
struct HnConvCols {
    int base[4], ih0[4], iw0[4];
};

template <int MODE, int COLS, int THREADS>
__device__ __forceinline__ HnConvCols hn_conv_cols(const HnConv& cv, int n0, int N, int tid) {
    constexpr int CPR = COLS / 4;
    static_assert(THREADS % CPR == 0, "a thread's B columns must be the same in every row it copies");
    HnConvCols k;
    // n = (img, a, b) over planes of ph x pw (forward: P x Q, data gradient: H x W), or (c, a, b) over R x S (filter)
    const int ph = MODE == 1 ? cv.p : MODE == 2 ? cv.h : cv.r, pw = MODE == 1 ? cv.q : MODE == 2 ? cv.w : cv.s;
    const int plane = ph * pw;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        const int n = n0 + (tid % CPR) * 4 + e;
        const int img = n / plane, t = n - img * plane, a = t / pw, b = t - a * pw;
        k.base[e] = MODE == 1 ? img * cv.c * cv.h * cv.w : MODE == 2 ? img * cv.o * cv.p * cv.q : img * cv.h * cv.w;
        k.ih0[e] = n >= N ? -(1 << 30) : MODE == 1 ? a * cv.stride - cv.pad : MODE == 2 ? a + cv.pad : a - cv.pad;
        k.iw0[e] = MODE == 1 ? b * cv.stride - cv.pad : MODE == 2 ? b + cv.pad : b - cv.pad;
    }
    return k;
}

// B's BK x BN tile (rows k0 .. k0+BK-1, columns n0 ..) gathered into shared memory (row stride STRIDE), in
// hn_copy_tile_async's chunk order: rows from kend on, and taps that add nothing, are zero-filled. src: x (forward,
// filter gradient) or dy (data gradient).
template <int MODE, int ROWS, int COLS, int STRIDE, int THREADS>
__device__ __forceinline__ void hn_conv_copy_b(float* s, const float* src, const HnConv& cv, const HnConvCols& cols,
                                               int k0, int kend, int tid) {
    constexpr int CPR = COLS / 4, CHUNKS = ROWS * CPR;
    static_assert(CHUNKS % THREADS == 0, "tile must split into whole chunks per thread");
    // a row k = (ch, rr, ss): (c, r, s) forward, (o, r, s) data gradient, (img, p, q) filter gradient
#pragma unroll
    for (int i = 0; i < CHUNKS / THREADS; ++i) {
        const int q = tid + i * THREADS, row = q / CPR, c = (q % CPR) * 4, k = k0 + row;
        const int ch = hn_div(k, cv.kb_plane), t = k - ch * cv.kb_plane.d, rr = hn_div(t, cv.kb_inner);
        const int ss = t - rr * cv.kb_inner.d;
        float* dst = s + row * STRIDE + c;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            bool ok;
            int at;
            if (MODE == 1) {
                const int ih = cols.ih0[e] + rr, iw = cols.iw0[e] + ss;
                ok = k < kend && ih >= 0 && ih < cv.h && iw >= 0 && iw < cv.w;
                at = ok ? cols.base[e] + (ch * cv.h + ih) * cv.w + iw : 0;
            } else if (MODE == 3) {
                const int ih = rr * cv.stride + cols.ih0[e], iw = ss * cv.stride + cols.iw0[e];
                ok = k < kend && ih >= 0 && ih < cv.h && iw >= 0 && iw < cv.w;
                at = ok ? ch * cv.c * cv.h * cv.w + cols.base[e] + ih * cv.w + iw : 0;
            } else {
                const int th = cols.ih0[e] - rr, tw = cols.iw0[e] - ss;     // ph * stride, pw * stride if whole
                const int ph = cv.stride == 1 ? th : hn_div(hn_imax(th, 0), cv.by_stride);
                const int pw = cv.stride == 1 ? tw : hn_div(hn_imax(tw, 0), cv.by_stride);
                ok = k < kend && th >= 0 && tw >= 0 && ph * cv.stride == th && pw * cv.stride == tw && ph < cv.p &&
                     pw < cv.q;
                at = ok ? cols.base[e] + (ch * cv.p + ph) * cv.q + pw : 0;
            }
            hn_cp_async4(dst + e, src + at, ok ? 4 : 0);
        }
    }
}

// A's BM x BK tile (K-major: rows m, columns k) gathered, rows from M on and columns from kend on zero-filled. Data
// gradient: A[c][k = (o, t)] = W[o][c][t], t = (r, s) over R x S; filter gradient: A[o][k = (img, t)] = dy[img][o][t],
// t = (p, q) over P x Q. Both are src[(k / T) * outer + m * T + k % T], T the inner plane and outer = (C or O) * T.
// A thread's four columns are fixed (THREADS a multiple of the chunks per row), so their offsets are found once per
// tile.
template <int MODE, int ROWS, int COLS, int STRIDE, int THREADS>
__device__ __forceinline__ void hn_conv_copy_a(float* s, const float* src, const HnConv& cv, int m0, int M, int k0,
                                               int kend, int tid) {
    constexpr int CPR = COLS / 4, CHUNKS = ROWS * CPR;
    static_assert(CHUNKS % THREADS == 0 && THREADS % CPR == 0, "a thread's A columns must be fixed");
    const int plane = cv.ka_plane.d, outer = (MODE == 2 ? cv.c : cv.o) * plane;
    const int c0 = (tid % CPR) * 4;
    int off[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        const int k = k0 + c0 + e, a = hn_div(k, cv.ka_plane);
        off[e] = k < kend ? a * outer + (k - a * plane) : -1;
    }
#pragma unroll
    for (int i = 0; i < CHUNKS / THREADS; ++i) {
        const int q = tid + i * THREADS, row = q / CPR, m = m0 + row;
        float* dst = s + row * STRIDE + c0;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const bool ok = m < M && off[e] >= 0;
            hn_cp_async4(dst + e, src + (ok ? off[e] + m * plane : 0), ok ? 4 : 0);
        }
    }
}

// One pair of a convolution's outputs finished and stored: x at `at` and (two) y at `at1` of C (NCHW); MODE 1, the
// forward: + the bias of channel m, then the activation; MODE 2, the data gradient: times (mask > 0) where a mask is
// given; stored as float32 or (cv.out16) bf16 bits, the pair as one 8- or 4-byte store where `pair` (at1 = at + 1,
// at even, C 8-byte aligned).
template <int MODE>
__device__ __forceinline__ void hn_conv_store(float* C, const HnConv& cv, int m, float x, float y, long long at,
                                              long long at1, bool two, bool pair) {
    if (MODE == 1) {
        const float bias = cv.aux ? hn_ldg(cv.aux + m) : 0.f;
        x += bias;
        y += bias;
        if (cv.act == 1) {
            x = x > 0.f ? x : 0.f;
            y = y > 0.f ? y : 0.f;
        }
    } else if (cv.aux) {
        x = hn_ldg(cv.aux + at) > 0.f ? x : 0.f;
        if (two) y = hn_ldg(cv.aux + at1) > 0.f ? y : 0.f;
    }
    if (cv.out16) {
        unsigned short* c16 = reinterpret_cast<unsigned short*>(C);
        if (two && pair) {
            hn_st_u32(c16 + at, hn_pack_bf16x2(x, y));
        } else {
            hn_st_u16(c16 + at, hn_bf16_of(x));
            if (two) hn_st_u16(c16 + at1, hn_bf16_of(y));
        }
    } else if (two && pair) {
        hn_st2(C + at, x, y);
    } else {
        hn_st(C + at, x);
        if (two) hn_st(C + at1, y);
    }
}

// The forward's and data gradient's epilogue: the output (M channels of `plane` pixels per image, NCHW) = acc,
// finished and stored by hn_conv_store.
template <int MODE, int MT, int NT>
__device__ __forceinline__ void hn_conv_epilogue(const HnBlock& b, float (&acc)[MT][NT][4], int M, int N,
                                                 const HnConv& cv, int wm, int wn, int lane) {
    // n even and the plane even: n and n+1 lie in one image, and the pair's offset is even (8-byte stores)
    const bool pair = (cv.out_plane.d & 1) == 0 && (reinterpret_cast<unsigned long long>(b.C) & 7) == 0;
    hn_each_pair(b, acc, M, N, wm, wn, lane, [&](int m, int n, float x, float y, bool two) {
        hn_conv_store<MODE>(b.C, cv, m, x, y, hn_nchw_at(cv.out_plane, M, m, n),
                            hn_nchw_at(cv.out_plane, M, m, n + 1), two, pair);
    });
}

// One K tile (from k0) of both operands copied by cp.async into their float32 shared tiles of layouts SA and SB: A and
// B as stored (MODE 0), or gathered (the convolutions: B always, A in the gradients).
template <int MODE, bool TA, bool TB, class SA, class SB, int THREADS>
__device__ __forceinline__ void hn_issue_tile(float* sa, float* sb, const HnBlock& blk, const HnConv& cv,
                                              const HnConvCols& cols, int lda, int ldb, int M, int N, int k0, int tid) {
    if (MODE >= 2)
        hn_conv_copy_a<MODE, SA::ROWS, SA::COLS, SA::STRIDE, THREADS>(sa, blk.A, cv, blk.m0, M, k0, blk.kend, tid);
    else
        hn_copy_tile_async<SA::ROWS, SA::COLS, SA::STRIDE, THREADS>(
            sa, hn_src<!TA>(blk.A, lda, blk.m0, k0, M, blk.kend), tid);
    if (MODE)
        hn_conv_copy_b<MODE, SB::ROWS, SB::COLS, SB::STRIDE, THREADS>(sb, blk.B, cv, cols, k0, blk.kend, tid);
    else
        hn_copy_tile_async<SB::ROWS, SB::COLS, SB::STRIDE, THREADS>(
            sb, hn_src<TB>(blk.B, ldb, blk.n0, k0, N, blk.kend), tid);
}

// --- tf32: cp.async pipeline of STAGES float32 tiles, operands rounded to tf32 as fragments are read ---------------

// One BK slice of a stage: (WM/16) x (WN/8) mma tiles per warp, BK/8 steps of m16n8k8.
// Fragments of mma.m16n8k8 .tf32 (PTX ISA 9.7.14.5.7, "Matrix Fragments for mma.m16n8k8"), lane l = 4g + t:
//   A (16 x 8, row): a0 = (g, t), a1 = (g+8, t), a2 = (g, t+4), a3 = (g+8, t+4)          (row, col) = (m, k)
//   B (8 x 8, col):  b0 = (t, g), b1 = (t+4, g)                                          (row, col) = (k, n)
// so for the mma tile (i, j) of the warp: a from op(A) rows wm + 16i + g (+8), columns kk + t (+4); b from op(B)
// rows kk + t (+4), column wn + 8j + g; the operand tiles are read through HnOperand::at(mn, k) in either layout.
// LANDED: the tile already holds tf32 values (converted where it landed, hn_convert_tf32), and a K-major operand's
// fragments come by ldmatrix, whose 8x8 matrices of 16-bit elements are 8 rows of 4 floats here: lane l = 4g + t
// receives row g, 16-bit elements 2t, 2t+1 = float t. One ldmatrix.x4 gives A's four registers from the 8 x 4
// float matrices (m 0-7 | 8-15) x (k 0-3 | 4-7) in the order a0..a3 (lane l = 8j + r: row m = l % 16, k = 4 (l / 16)),
// and B's (b0, b1) of two n-tiles from (n 0-7 | 8-15) x (k 0-3 | 4-7) (n = l % 8 + 8 (l / 16), k = 4 ((l / 8) % 2)).
// ALO, BLO > 0 (LANDED, MN-major operands only): split operands (hn_cp_chunk), their lo tiles ALO and BLO floats
// after the hi ones; each mma tile is three products, a_hi b_hi + a_hi b_lo + a_lo b_hi.
template <bool LANDED, class OA, class OB, int MT, int NT, int BK, int ALO = 0, int BLO = 0>
__device__ __forceinline__ void hn_gemm_tf32_tile(const float* sa, const float* sb, float (&acc)[MT][NT][4], int wm,
                                                  int wn, int lane) {
    static_assert((ALO == 0 && BLO == 0) || (LANDED && !OA::KMAJ && !OB::KMAJ && ALO > 0 && BLO > 0), "split");
    const int g = lane >> 2, t = lane & 3;
    auto word = [](const float* p) { return LANDED ? hn_bits(hn_lds(p)) : hn_tf32(hn_lds(p)); };
#pragma unroll
    for (int kk = 0; kk < BK; kk += 8) {
        unsigned a[MT][4], b[NT][2];
#pragma unroll
        for (int i = 0; i < MT; ++i) {
            const int m = wm + 16 * i + g;
            if (LANDED && OA::KMAJ) {
                hn_ldmatrix_x4(a[i], sa + OA::at(wm + 16 * i + (lane & 15), kk + 4 * (lane >> 4)));
            } else {
                a[i][0] = word(sa + OA::at(m, kk + t));
                a[i][1] = word(sa + OA::at(m + 8, kk + t));
                a[i][2] = word(sa + OA::at(m, kk + t + 4));
                a[i][3] = word(sa + OA::at(m + 8, kk + t + 4));
            }
        }
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            if (LANDED && OB::KMAJ) {
                if (j % 2 == 0) {
                    unsigned r[4];
                    hn_ldmatrix_x4(r, sb + OB::at(wn + 8 * j + (lane & 7) + 8 * (lane >> 4), kk + 4 * ((lane >> 3) & 1)));
                    b[j][0] = r[0];
                    b[j][1] = r[1];
                    b[j + 1][0] = r[2];
                    b[j + 1][1] = r[3];
                }
            } else {
                const int n = wn + 8 * j + g;
                b[j][0] = word(sb + OB::at(n, kk + t));
                b[j][1] = word(sb + OB::at(n, kk + t + 4));
            }
        }
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
            for (int j = 0; j < NT; ++j) hn_mma_tf32(acc[i][j], a[i], b[j]);
        if constexpr (ALO > 0) {
            unsigned lo[4];
#pragma unroll
            for (int j = 0; j < NT; ++j) {           // a_hi b_lo
                const int n = wn + 8 * j + g;
                const unsigned bl[2] = {hn_bits(hn_lds(sb + BLO + OB::at(n, kk + t))),
                                        hn_bits(hn_lds(sb + BLO + OB::at(n, kk + t + 4)))};
#pragma unroll
                for (int i = 0; i < MT; ++i) hn_mma_tf32(acc[i][j], a[i], bl);
            }
#pragma unroll
            for (int i = 0; i < MT; ++i) {           // a_lo b_hi
                const int m = wm + 16 * i + g;
                lo[0] = hn_bits(hn_lds(sa + ALO + OA::at(m, kk + t)));
                lo[1] = hn_bits(hn_lds(sa + ALO + OA::at(m + 8, kk + t)));
                lo[2] = hn_bits(hn_lds(sa + ALO + OA::at(m, kk + t + 4)));
                lo[3] = hn_bits(hn_lds(sa + ALO + OA::at(m + 8, kk + t + 4)));
#pragma unroll
                for (int j = 0; j < NT; ++j) hn_mma_tf32(acc[i][j], lo, b[j]);
            }
        }
    }
}

// A thread's own chunks of a tile (as hn_copy_tile_async assigned them) rounded to tf32 in place, once their
// cp.async has completed for this thread; the barrier that follows publishes them.
template <int ROWS, int COLS, int STRIDE, int THREADS>
__device__ __forceinline__ void hn_convert_tf32(float* s, int tid) {
    constexpr int CPR = COLS / 4;
#pragma unroll
    for (int i = 0; i < ROWS * CPR / THREADS; ++i) {
        const int q = tid + i * THREADS;
        float* p = s + (q / CPR) * STRIDE + (q % CPR) * 4;
        const float4 v = hn_lds4(p);
        hn_sts4(p, hn_tf32(v.x), hn_tf32(v.y), hn_tf32(v.z), hn_tf32(v.w));
    }
}

// A cp.async pipeline's first STAGES - 1 K tiles in flight (issue(kt) starts tile kt's copies; one commit group per
// tile, empty past the last, so that cp.async.wait_group<STAGES - 2> always means "tile kt has landed").
template <int STAGES, class Issue>
__device__ __forceinline__ void hn_pipeline_fill(int tiles, const Issue& issue) {
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < tiles) issue(s);
        hn_cp_async_commit();
    }
}

// Pipeline (STAGES buffers, one cp.async group per K tile, empty groups past the end so the count stays uniform):
// the prologue issues tiles 0 .. STAGES-2; iteration kt waits until at most STAGES-2 groups are pending (so group kt,
// tile kt, has landed for this thread), then a barrier makes every thread's copies visible and also ends every
// warp's reads of tile kt-1, whose buffer ((kt-1) % STAGES = (kt+STAGES-1) % STAGES) is refilled next with tile
// kt+STAGES-1 while tile kt is multiplied. LANDED: before that barrier each thread rounds its own chunks of tile kt
// to tf32 in place (once per element, where otherwise every warp that reads a fragment would round it again).
template <bool LANDED, bool TA, bool TB, int BM, int BN, int BK, int WM, int WN, int STAGES, int MODE = 0>
__device__ __forceinline__ void hn_gemm_tf32_body(unsigned char* smem, HN_GEMM_PARAMS, const HnConv& cv = HnConv{}) {
    constexpr int WARPS_N = BN / WN, THREADS = 32 * (BM / WM) * WARPS_N, MT = WM / 16, NT = WN / 8;
    static_assert(BM % WM == 0 && BN % WN == 0 && WM % 16 == 0 && WN % 8 == 0 && BK % 8 == 0 && STAGES >= 2, "tile");
    using OA = HnOperand<!TA, BM, BK, 4, 8>;
    using OB = HnOperand<TB, BN, BK, 4, 8>;
    float* sa = reinterpret_cast<float*>(smem);           // STAGES x OA::ELEMS
    float* sb = sa + STAGES * OA::ELEMS;                  // STAGES x OB::ELEMS

    const HnBlock blk = hn_block(HN_GEMM_ARGS, BM, BN, BK);
    const HnThread th = hn_thread<WM, WN, WARPS_N>();
    const int tid = th.tid, tiles = blk.tiles;
    float acc[MT][NT][4];
    hn_zero(acc);
    static_assert(MODE == 0 || (!TA && !TB), "the convolutions are A n, B n");
    const HnConvCols cols = MODE ? hn_conv_cols<MODE, OB::COLS, THREADS>(cv, blk.n0, N, tid) : HnConvCols{};

    auto issue = [&](int kt) {   // cp.async of K tile kt into its buffer kt % STAGES
        const int k0 = blk.kbeg + kt * BK, s = kt % STAGES;
        hn_issue_tile<MODE, TA, TB, OA, OB, THREADS>(sa + s * OA::ELEMS, sb + s * OB::ELEMS, blk, cv, cols, lda,
                                                      ldb, M, N, k0, tid);
    };
    hn_pipeline_fill<STAGES>(tiles, issue);
    for (int kt = 0; kt < tiles; ++kt) {
        const int s = kt % STAGES;
        hn_cp_async_wait<STAGES - 2>();
        if (LANDED) {
            hn_convert_tf32<OA::ROWS, OA::COLS, OA::STRIDE, THREADS>(sa + s * OA::ELEMS, tid);
            hn_convert_tf32<OB::ROWS, OB::COLS, OB::STRIDE, THREADS>(sb + s * OB::ELEMS, tid);
        }
        __syncthreads();
        if (kt + STAGES - 1 < tiles) issue(kt + STAGES - 1);
        hn_cp_async_commit();
        hn_gemm_tf32_tile<LANDED, OA, OB, MT, NT, BK>(sa + s * OA::ELEMS, sb + s * OB::ELEMS, acc, th.wm, th.wn, th.lane);
    }
    hn_cp_async_wait<0>();   // only empty groups remain
    if (MODE == 1 || MODE == 2)
        hn_conv_epilogue<MODE, MT, NT>(blk, acc, M, N, cv, th.wm, th.wn, th.lane);
    else
        hn_epilogue<MT, NT>(blk, acc, M, N, ldc, alpha, beta, th.wm, th.wn, th.lane);
}

// --- bf16: float32 tiles read into registers, rounded, stored as bf16 (two buffers), fragments by ldmatrix -------------

// One BK slice of a buffer: BK/16 steps of m16n8k16 per mma tile.
// Fragments of mma.m16n8k16 .bf16 (PTX ISA 9.7.14.5.8, "Matrix Fragments for mma.m16n8k16 with floating point
// type"), lane l = 4g + t, two bf16 per register (the first in the low half):
//   A (16 x 16, row): reg0 = (g, 2t..2t+1), reg1 = (g+8, 2t..2t+1), reg2 = (g, 2t+8..2t+9), reg3 = (g+8, 2t+8..2t+9)
//   B (16 x 8, col):  reg0 = (2t..2t+1, g), reg1 = (2t+8..2t+9, g)                       (row, col) = (k, n)
// A's registers are the four 8x8 quarters (m 0-7 | 8-15) x (k 0-7 | 8-15) in the order (0,0), (1,0), (0,1), (1,1),
// each as ldmatrix delivers a matrix stored with rows along m (row g, elements 2t, 2t+1), or, stored with rows along k,
// as ldmatrix.trans delivers it (rows 2t, 2t+1 of column g). B's reg0 / reg1 are its k 0-7 / 8-15 halves, as
// ldmatrix delivers a matrix stored with rows along n, or ldmatrix.trans one stored with rows along k. So with lane
// l = 8j + r giving row r of matrix j (one ldmatrix.x4 per 16 x 16 of A, and per 16 k x 16 n = two mma tiles of B):
//   A n (rows m):  m = l % 16,             k = 8 (l / 16)              (matrix j: m-half j % 2, k-half j / 2)
//   A t (rows k):  k = l % 8 + 8 (l / 16), m = 8 ((l / 8) % 2)         .trans
//   B t (rows n):  n = l % 8 + 8 (l / 16), k = 8 ((l / 8) % 2)         regs: (n-tile 0: k 0-7, 8-15), (n-tile 1: ...)
//   B n (rows k):  k = l % 16,             n = 8 (l / 16)              .trans, same register order
template <bool TA, bool TB, class OA, class OB, int MT, int NT, int BK>
__device__ __forceinline__ void hn_gemm_bf16_tile(const unsigned short* sa, const unsigned short* sb,
                                                  float (&acc)[MT][NT][4], int wm, int wn, int lane) {
    static_assert(NT % 2 == 0, "B fragments come in pairs of n-tiles");
#pragma unroll
    for (int ks = 0; ks < BK; ks += 16) {
        unsigned a[MT][4], b[NT][2];
#pragma unroll
        for (int i = 0; i < MT; ++i) {
            const int m = wm + 16 * i;
            if (!TA)
                hn_ldmatrix_x4(a[i], sa + OA::at(m + (lane & 15), ks + 8 * (lane >> 4)));
            else
                hn_ldmatrix_x4_trans(a[i], sa + OA::at(m + 8 * ((lane >> 3) & 1), ks + (lane & 7) + 8 * (lane >> 4)));
        }
#pragma unroll
        for (int j = 0; j < NT; j += 2) {
            const int n = wn + 8 * j;
            unsigned r[4];
            if (TB)
                hn_ldmatrix_x4(r, sb + OB::at(n + (lane & 7) + 8 * (lane >> 4), ks + 8 * ((lane >> 3) & 1)));
            else
                hn_ldmatrix_x4_trans(r, sb + OB::at(n + 8 * (lane >> 4), ks + (lane & 15)));
            b[j][0] = r[0];
            b[j][1] = r[1];
            b[j + 1][0] = r[2];
            b[j + 1][1] = r[3];
        }
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
            for (int j = 0; j < NT; ++j) hn_mma_bf16(acc[i][j], a[i], b[j]);
    }
}

// Two buffers: tile kt+1 is read from global memory into registers while tile kt is multiplied from buffer kt % 2,
// then rounded and stored into the other buffer, whose last readers (tile kt-1) finished before the barrier that
// ended the previous iteration; the barrier at the end of this iteration publishes it.
template <bool TA, bool TB, int BM, int BN, int BK, int WM, int WN, int STAGES>
__device__ __forceinline__ void hn_gemm_bf16_regs(unsigned char* smem, HN_GEMM_PARAMS) {
    constexpr int WARPS_N = BN / WN, THREADS = 32 * (BM / WM) * WARPS_N, MT = WM / 16, NT = WN / 8;
    static_assert(BM % WM == 0 && BN % WN == 0 && WM % 16 == 0 && WN % 16 == 0 && BK % 16 == 0 && STAGES == 2,
                  "tile");
    using OA = HnOperand<!TA, BM, BK, 8, 8>;
    using OB = HnOperand<TB, BN, BK, 8, 8>;
    unsigned short* sa = reinterpret_cast<unsigned short*>(smem);   // 2 x OA::ELEMS bf16
    unsigned short* sb = sa + 2 * OA::ELEMS;                          // 2 x OB::ELEMS bf16

    const HnBlock blk = hn_block(HN_GEMM_ARGS, BM, BN, BK);
    const HnThread th = hn_thread<WM, WN, WARPS_N>();
    const int tid = th.tid, tiles = blk.tiles;
    float acc[MT][NT][4];
    hn_zero(acc);

    HnRegTile<OA::ROWS, OA::COLS, OA::STRIDE, THREADS> ra;
    HnRegTile<OB::ROWS, OB::COLS, OB::STRIDE, THREADS> rb;
    auto load = [&](int kt) {
        const int k0 = blk.kbeg + kt * BK;
        ra.load(hn_src<!TA>(blk.A, lda, blk.m0, k0, M, blk.kend), tid);
        rb.load(hn_src<TB>(blk.B, ldb, blk.n0, k0, N, blk.kend), tid);
    };
    if (tiles > 0) {
        load(0);
        ra.store(sa, tid);
        rb.store(sb, tid);
    }
    __syncthreads();
    for (int kt = 0; kt < tiles; ++kt) {
        const int s = kt & 1;
        if (kt + 1 < tiles) load(kt + 1);
        hn_gemm_bf16_tile<TA, TB, OA, OB, MT, NT, BK>(sa + s * OA::ELEMS, sb + s * OB::ELEMS, acc, th.wm, th.wn, th.lane);
        if (kt + 1 < tiles) {
            ra.store(sa + (s ^ 1) * OA::ELEMS, tid);
            rb.store(sb + (s ^ 1) * OB::ELEMS, tid);
        }
        __syncthreads();
    }
    hn_epilogue<MT, NT>(blk, acc, M, N, ldc, alpha, beta, th.wm, th.wn, th.lane);
}

// A thread's own chunks of a float32 tile (as hn_copy_tile_async assigned them, row stride S32) rounded to bf16 and
// written to the bf16 tile (row stride S16) at the same place.
template <int ROWS, int COLS, int S32, int S16, int THREADS>
__device__ __forceinline__ void hn_convert_bf16(const float* src, unsigned short* dst, int tid) {
    constexpr int CPR = COLS / 4;
#pragma unroll
    for (int i = 0; i < ROWS * CPR / THREADS; ++i) {
        const int q = tid + i * THREADS, r = q / CPR, c = (q % CPR) * 4;
        const float4 v = hn_lds4(src + r * S32 + c);
        hn_sts2(dst + r * S16 + c, hn_pack_bf16x2(v.x, v.y), hn_pack_bf16x2(v.z, v.w));
    }
}

// bf16 through a cp.async pipeline: STAGES float32 tiles in flight (unpadded: each thread reads back only the chunks
// it copied, so these buffers need no barrier), converted by their own threads into one of two bf16 tiles. Iteration
// kt: wait for tile kt (this thread's chunks), round them into bf16 buffer kt % 2, barrier (buffer kt % 2 complete;
// every warp done with buffer (kt-1) % 2 and tile kt-1), refill float32 buffer (kt-1) % STAGES with tile
// kt+STAGES-1, multiply from bf16 buffer kt % 2. The next write to that buffer (iteration kt+2) comes after the
// barrier of iteration kt+1, which every warp reaches only after this multiply.
// hn_bf16_async_loop is that K loop for any copy of the float32 tiles (the GEMM's, the convolutions' gathers):
// issue(kt) starts the cp.async of K tile kt into stage kt % STAGES of fa / fb (FA / FB layouts), each thread its
// chunks in hn_copy_tile_async's order; OA / OB are the bf16 tiles' layouts in sa / sb (two buffers each). It ends
// with every copy retired; hn_gemm_bf16_async lays out shared memory, copies and writes the result around it.
template <bool TA, bool TB, class FA, class FB, class OA, class OB, int STAGES, int THREADS, int BK, int MT, int NT,
          class Issue>
__device__ __forceinline__ void hn_bf16_async_loop(const float* fa, const float* fb, unsigned short* sa,
                                                   unsigned short* sb, int tiles, const HnThread& th,
                                                   float (&acc)[MT][NT][4], const Issue& issue) {
    const int tid = th.tid;
    hn_pipeline_fill<STAGES>(tiles, issue);
    for (int kt = 0; kt < tiles; ++kt) {
        const int s = kt % STAGES, h = kt & 1;
        hn_cp_async_wait<STAGES - 2>();
        hn_convert_bf16<FA::ROWS, FA::COLS, FA::STRIDE, OA::STRIDE, THREADS>(fa + s * FA::ELEMS, sa + h * OA::ELEMS,
                                                                           tid);
        hn_convert_bf16<FB::ROWS, FB::COLS, FB::STRIDE, OB::STRIDE, THREADS>(fb + s * FB::ELEMS, sb + h * OB::ELEMS,
                                                                           tid);
        __syncthreads();
        if (kt + STAGES - 1 < tiles) issue(kt + STAGES - 1);
        hn_cp_async_commit();
        hn_gemm_bf16_tile<TA, TB, OA, OB, MT, NT, BK>(sa + h * OA::ELEMS, sb + h * OB::ELEMS, acc, th.wm, th.wn, th.lane);
    }
    hn_cp_async_wait<0>();
}

template <bool TA, bool TB, int BM, int BN, int BK, int WM, int WN, int STAGES, int MODE = 0>
__device__ __forceinline__ void hn_gemm_bf16_async(unsigned char* smem, HN_GEMM_PARAMS, const HnConv& cv = HnConv{}) {
    constexpr int WARPS_N = BN / WN, THREADS = 32 * (BM / WM) * WARPS_N, MT = WM / 16, NT = WN / 8;
    static_assert(BM % WM == 0 && BN % WN == 0 && WM % 16 == 0 && WN % 16 == 0 && BK % 16 == 0 && STAGES >= 2,
                  "tile");
    using FA = HnOperand<!TA, BM, BK, 0, 0>;   // float32 staging
    using FB = HnOperand<TB, BN, BK, 0, 0>;
    using OA = HnOperand<!TA, BM, BK, 8, 8>;   // bf16 tiles
    using OB = HnOperand<TB, BN, BK, 8, 8>;
    float* fa = reinterpret_cast<float*>(smem);                     // STAGES x FA::ELEMS
    float* fb = fa + STAGES * FA::ELEMS;                            // STAGES x FB::ELEMS
    unsigned short* sa = reinterpret_cast<unsigned short*>(fb + STAGES * FB::ELEMS);   // 2 x OA::ELEMS
    unsigned short* sb = sa + 2 * OA::ELEMS;                        // 2 x OB::ELEMS

    const HnBlock blk = hn_block(HN_GEMM_ARGS, BM, BN, BK);
    const HnThread th = hn_thread<WM, WN, WARPS_N>();
    const int tid = th.tid, tiles = blk.tiles;
    float acc[MT][NT][4];
    hn_zero(acc);
    static_assert(MODE == 0 || (!TA && !TB), "the convolutions are A n, B n");
    const HnConvCols cols = MODE ? hn_conv_cols<MODE, FB::COLS, THREADS>(cv, blk.n0, N, tid) : HnConvCols{};

    auto issue = [&](int kt) {
        const int k0 = blk.kbeg + kt * BK, s = kt % STAGES;
        hn_issue_tile<MODE, TA, TB, FA, FB, THREADS>(fa + s * FA::ELEMS, fb + s * FB::ELEMS, blk, cv, cols, lda,
                                                      ldb, M, N, k0, tid);
    };
    hn_bf16_async_loop<TA, TB, FA, FB, OA, OB, STAGES, THREADS, BK>(fa, fb, sa, sb, tiles, th, acc, issue);
    if (MODE == 1 || MODE == 2)
        hn_conv_epilogue<MODE, MT, NT>(blk, acc, M, N, cv, th.wm, th.wn, th.lane);
    else
        hn_epilogue<MT, NT>(blk, acc, M, N, ldc, alpha, beta, th.wm, th.wn, th.lane);
}

// The kernels' bodies by the variant letter of their name (mma_tiles.TcTile.variant).
template <bool TA, bool TB, int BM, int BN, int BK, int WM, int WN, int ST>
__device__ __forceinline__ void hn_gemm_tf32(unsigned char* smem, HN_GEMM_PARAMS) {
    hn_gemm_tf32_body<false, TA, TB, BM, BN, BK, WM, WN, ST>(smem, HN_GEMM_ARGS);
}
template <bool TA, bool TB, int BM, int BN, int BK, int WM, int WN, int ST>
__device__ __forceinline__ void hn_gemm_tf32_l(unsigned char* smem, HN_GEMM_PARAMS) {
    hn_gemm_tf32_body<true, TA, TB, BM, BN, BK, WM, WN, ST>(smem, HN_GEMM_ARGS);
}
template <bool TA, bool TB, int BM, int BN, int BK, int WM, int WN, int ST>
__device__ __forceinline__ void hn_gemm_bf16(unsigned char* smem, HN_GEMM_PARAMS) {
    hn_gemm_bf16_regs<TA, TB, BM, BN, BK, WM, WN, ST>(smem, HN_GEMM_ARGS);
}
template <bool TA, bool TB, int BM, int BN, int BK, int WM, int WN, int ST>
__device__ __forceinline__ void hn_gemm_bf16_a(unsigned char* smem, HN_GEMM_PARAMS) {
    hn_gemm_bf16_async<TA, TB, BM, BN, BK, WM, WN, ST>(smem, HN_GEMM_ARGS);
}

// The convolutions' bodies (MODE 1 forward, 2 data gradient, 3 filter gradient): the tf32 and bf16 "a" pipelines
// with gathered tiles.
template <int MODE, int BM, int BN, int BK, int WM, int WN, int ST>
__device__ __forceinline__ void hn_conv_tf32(unsigned char* smem, HN_GEMM_PARAMS, const HnConv& cv) {
    hn_gemm_tf32_body<false, false, false, BM, BN, BK, WM, WN, ST, MODE>(smem, HN_GEMM_ARGS, cv);
}
template <int MODE, int BM, int BN, int BK, int WM, int WN, int ST>
__device__ __forceinline__ void hn_conv_tf32_l(unsigned char* smem, HN_GEMM_PARAMS, const HnConv& cv) {
    hn_gemm_tf32_body<true, false, false, BM, BN, BK, WM, WN, ST, MODE>(smem, HN_GEMM_ARGS, cv);
}
template <int MODE, int BM, int BN, int BK, int WM, int WN, int ST>
__device__ __forceinline__ void hn_conv_bf16_a(unsigned char* smem, HN_GEMM_PARAMS, const HnConv& cv) {
    hn_gemm_bf16_async<false, false, BM, BN, BK, WM, WN, ST, MODE>(smem, HN_GEMM_ARGS, cv);
}

// --- the channels-last bf16 convolutions ("tc16": operands stored as bf16 bits, NHWC) ------------------------------
//
// The forward: y[img][o][p][q] = act(b[o] + sum_k W[o][k] x(k; img, p, q)), the GEMM C[M, N] = A[M, K] B[K, N] with
// M = O, N = images x P x Q (n = (img * P + p) * Q + q), K = R x S x C (k = (r * S + s) * C + c: channels innermost),
// A = W stored bf16 [O][R][S][C] (K-major rows, lda = K) and B gathered from x stored bf16 [n][H][W][C]:
// B[k][n] = x[img][p*stride - pad + r][q*stride - pad + s][c], zero outside the image; y as the NCHW kernels write
// it (hn_conv_epilogue). B's tile is kept as its transpose (rows n, columns k: "B t"), so eight consecutive k of one
// row are eight consecutive channels of one pixel: one 16-byte cp.async when C is a multiple of 8. A thread's chunk
// column (k offset) is the same in all its rows and its rows (pixels) are the same in every K tile, so per K tile it
// divides one k (by C, then by S) and per chunk it adds and compares. Both tiles go by cp.async straight into the
// bf16 tiles the fragments are read from (no float32 staging, no conversion), STAGES deep.
// The data gradient at stride 1 is this forward (EPI 2: hn_conv_epilogue's mask by relu_x instead of bias and
// activation) over dy stored [n][P][Q][O] with the turned weights w'[c][r][s][o] = w[o][c][R-1-r][S-1-s] and padding
// R - 1 - pad: dx[img][c][h][w] = sum over (o, r, s) of w[o][c][r][s] dy[img][o][h + pad - r][w + pad - s].
// The filter gradient: dw[o][(r, s, c)] += sum over k = (img, p, q) of dy[img][p][q][o] x[img][p*stride - pad +
// r][q*stride - pad + s][c], the GEMM C[M, N] += A[M, K] B[K, N] with M = O, N = R x S x C (dw stored float32
// [O][R][S][C]), K = images x P x Q. A is dy as stored ([k][o]: rows k, eight o per chunk, O a multiple of 8) and B is
// x gathered (rows k, eight channels per chunk of one tap), both kept with rows along k ("A t", "B n") and read by
// ldmatrix.trans. A thread's B chunk columns (taps) are fixed, its rows k move by BK per tile: per tile it divides its
// rows' k (by P x Q, then Q). K is split over blockIdx.z (kchunk each), the parts added into dw with atomics as the
// GEMM's split-K (beta 1).

// The pooled forward (EPI 4): max_pool(act(conv(x, w) + b)) over 2 x 2 windows at stride 2, the pooled output y [n][O]
// [P][Q] (P, Q the pooled sizes: the convolution's output rows and columns past 2P and 2Q, which no window reads,
// are not computed) and the argmax byte of each (maxpool_fwd's: 2 dr + ds for window pixel (dr, ds), the first
// maximum in that order, NaN winning). The GEMM is the forward's with its columns in window order: column n = 16 G
// + 8 dr + 2 u + ds is pixel (dr, ds) of pooled output 4 G + u (u < 4), so N = 16 ceil(pooled / 4), and an
// accumulator fragment's acc[i][j] and acc[i][j + 1] (j even: columns 8j + 2t, + 1 and 8j + 8 + 2t, + 1) hold the
// four pixels of pooled output 4 (n0 + wn + 8j) / 16 + t in one thread. The argmax bytes follow y in its buffer.

// The output pixel of GEMM column n (the forward: n = (img P + p) Q + q; the pooled forward: as above, with a pooled
// output past cv.pooled out of range): its image, row and column; false when out of range.
template <int EPI>
__device__ __forceinline__ bool hn_out_pixel(const HnConv& cv, int n, int N, int& img, int& p, int& q) {
    int at = n, dr = 0, ds = 0;
    if (EPI == 4) {
        at = (n >> 4) * 4 + ((n >> 1) & 3);
        dr = (n >> 3) & 1;
        ds = n & 1;
    }
    img = hn_div(at, cv.out_plane);
    const int t = at - img * cv.out_plane.d;
    p = t / cv.q;
    q = t - p * cv.q;
    if (EPI == 4) {
        p = 2 * p + dr;
        q = 2 * q + ds;
    }
    return n < N && (EPI != 4 || at < cv.pooled);
}

// The pixels of the ROWS / (THREADS / CPR) chunk rows a thread copies (rows tid / CPR + i * THREADS / CPR): their
// window's top-left corner (ih0, iw0; ih0 out of range past N), and where that corner's channel 0 lies in x
// (elements: off = image start + (ih0 W + iw0) C, 0 past N), so that tap (r, s) channel c of the row is element
// off + (r W + s) C + c, the tap's part the same for every row.
template <int NROWS>
struct HnNhwcRows {
    static constexpr int N = NROWS;
    int off[NROWS], ih0[NROWS], iw0[NROWS];
};

template <int EPI, int ROWS, int COLS, int THREADS>
__device__ __forceinline__ HnNhwcRows<ROWS * (COLS / 4) / THREADS> hn_nhwc_rows(const HnConv& cv, int n0, int N,
                                                                                 int tid) {
    constexpr int CPR = COLS / 4, NROWS = ROWS * CPR / THREADS;
    static_assert(THREADS % CPR == 0, "a thread's chunk column must be the same in every row it copies");
    HnNhwcRows<NROWS> rows;
#pragma unroll
    for (int i = 0; i < NROWS; ++i) {
        int img, p, q;
        const bool in = hn_out_pixel<EPI>(cv, n0 + (tid + i * THREADS) / CPR, N, img, p, q);
        rows.ih0[i] = in ? p * cv.stride - cv.pad : -(1 << 30);
        rows.iw0[i] = q * cv.stride - cv.pad;
        rows.off[i] = in ? (img * cv.h * cv.w + rows.ih0[i] * cv.w + rows.iw0[i]) * cv.c : 0;
    }
    return rows;
}

// One 2 x 2 window of the pooled forward: its four pixels' act(v + bias) in window order compared (hn_window_max: the
// maximum, and in bi its position, the first maximum, NaN winning: maxpool_fwd's argmax byte); hn_window_store
// stores the maximum at y's offset `out` (float32, or bf16 bits with cv.out16) and the position at arg + out.
__device__ __forceinline__ float hn_window_max(const float (&v)[4], float bias, const HnConv& cv, int& bi) {
    float best = 0.f;
    bi = 0;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        float z = v[e] + bias;
        if (cv.act == 1) z = z > 0.f ? z : 0.f;
        if (e == 0 || z > best || (z != z && best == best)) {
            best = z;
            bi = e;
        }
    }
    return best;
}
__device__ __forceinline__ void hn_window_store(float* y, unsigned char* arg, long long out, const float (&v)[4],
                                                float bias, const HnConv& cv) {
    int bi;
    const float best = hn_window_max(v, bias, cv, bi);
    if (cv.out16)
        hn_st_u16(reinterpret_cast<unsigned short*>(y) + out, hn_bf16_of(best));
    else
        hn_st(y + out, best);
    hn_st_byte(arg + out, static_cast<unsigned char>(bi));
}

// The pooled forward's epilogue (EPI 4, above): per pooled output, the four pixels' act(acc + bias) compared in
// window order, the maximum written to y (NCHW, cv.out_plane pixels a channel; float32, or bf16 bits with cv.out16)
// and its position to the bytes after y.
template <int MT, int NT>
__device__ __forceinline__ void hn_conv_pool_epilogue(const HnBlock& b, float (&acc)[MT][NT][4], int M,
                                                      const HnConv& cv, int wm, int wn, int lane) {
    static_assert(NT % 2 == 0, "a window's two rows are fragments j and j + 1");
    const int t = lane & 3;
    unsigned char* arg =
        reinterpret_cast<unsigned char*>(b.C) + static_cast<long long>(cv.pooled) * M * (cv.out16 ? 2 : 4);
    hn_each_row<MT>(b, M, wm, lane, [&](int i, int h, int m) {
        const float bias = cv.aux ? hn_ldg(cv.aux + m) : 0.f;
#pragma unroll
        for (int j = 0; j < NT; j += 2) {
            const int at = (b.n0 + wn + 8 * j) / 4 + t;      // the pooled output
            if (at >= cv.pooled) continue;
            const float v[4] = {acc[i][j][2 * h], acc[i][j][2 * h + 1], acc[i][j + 1][2 * h], acc[i][j + 1][2 * h + 1]};
            hn_window_store(b.C, arg, hn_nchw_at(cv.out_plane, M, m, at), v, bias, cv);
        }
    });
}

// Where element (row, col) of a shared tile lies (in elements), for the copies below: HnRowTile, rows STRIDE
// elements apart (the mma.sync tiles, HnOperand's K-major layout); HnSwizzle128T<T>, wgmma's 128-byte swizzle of rows
// of 128 bytes (64 bf16 or 32 float32 elements T; hn_wgmma_desc): the 16-byte chunk j of a row (CE = 8 or 4 elements
// a chunk) stored at chunk j ^ (row % 8), so that the 8 chunks of one row land in 8 different bank groups and so do
// the same chunk of 8 consecutive rows.
template <int STRIDE>
struct HnRowTile {
    static __device__ __forceinline__ int at(int row, int col) { return row * STRIDE + col; }
};
template <class T>
struct HnSwizzle128T {
    static constexpr int CE = 16 / static_cast<int>(sizeof(T));
    static __device__ __forceinline__ int at(int row, int col) {
        return row * 8 * CE + ((((col / CE) ^ row) & 7) * CE) + (col % CE);
    }
};
using HnSwizzle128 = HnSwizzle128T<unsigned short>;
// HnSwizzle128MN: the MN-major tile of 64 rows k (hn_wgmma_desc_mn): column col (of M or N) in block col / 64 of 64
// rows x 64 elements, in it as HnSwizzle128.
struct HnSwizzle128MN {
    static __device__ __forceinline__ int at(int row, int col) {
        return (col >> 6) * 4096 + row * 64 + (((((col & 63) >> 3) ^ row) & 7) << 3) + (col & 7);
    }
};

// One 16-byte chunk, element `off` of a channels-last copy, into shared memory at s (cp.async, src-size `bytes`). LO
// > 0: the copy is split (fp32 as two tf32 parts, hi + lo: hn_split_tf32), each 16-byte chunk of 4 floats stored as
// its hi chunk then its lo chunk, so element off of the tensor lies at 2 off (hi) and 2 off + 4 (lo), off a multiple
// of 4; the lo chunk goes LO elements after s.
template <int LO, class T>
__device__ __forceinline__ void hn_cp_chunk(T* s, const T* src, long long off, int bytes) {
    if constexpr (LO == 0) {
        hn_cp_async16(s, src + off, bytes);
    } else {
        hn_cp_async16(s, src + 2 * off, bytes);
        hn_cp_async16(s + LO, src + 2 * off + 4, bytes);
    }
}

// B^T's BN x BK tile (rows n, columns k0 .. k0+BK-1) gathered into shared memory (layout L) in hn_copy_tile_async's
// chunk order, CPR 16-byte chunks a row (4 float32 or 8 bf16 channels of one tap); columns from kend on, and taps
// outside the image, zero-filled.
template <class T, int CPR, class L, int THREADS, int NROWS, int LO = 0>
__device__ __forceinline__ void hn_nhwc_copy_b(T* s, const T* x, const HnConv& cv, const HnNhwcRows<NROWS>& rows,
                                               const HnDiv& by_c, int k0, int kend, int tid) {
    const int col = (tid % CPR) * (16 / static_cast<int>(sizeof(T))), k = k0 + col;
    const int rs = hn_div(k, by_c), c = k - rs * cv.c, r = hn_div(rs, cv.kb_inner), sx = rs - r * cv.s;
    const int tap = (r * cv.w + sx) * cv.c + c;                 // the same for each of this thread's rows
    const bool in_k = k < kend;
#pragma unroll
    for (int i = 0; i < NROWS; ++i) {            // 0 <= ih < H and 0 <= iw < W as one unsigned compare each
        const bool ok = in_k && static_cast<unsigned>(rows.ih0[i] + r) < static_cast<unsigned>(cv.h) &&
                        static_cast<unsigned>(rows.iw0[i] + sx) < static_cast<unsigned>(cv.w);
        const unsigned at = ok ? rows.off[i] + tap : 0;       // x's element: >= 0 where ok
        hn_cp_chunk<LO>(s + L::at((tid + i * THREADS) / CPR, col), x, at, ok ? 16 : 0);
    }
}

// A ROWS x CPR-chunk tile of a row-major bf16 or float32 matrix (leading dimension ld) from (row0, col0), in 16-byte
// chunks (8 or 4 elements T) into shared memory (layout L); rows from row_end on and columns from col_end on
// zero-filled. The forward's A (w: rows m, columns k) and the filter gradient's A (dy: rows k, columns o).
template <int ROWS, int CPR, class L, int THREADS, int LO = 0, class T>
__device__ __forceinline__ void hn_copy16_tile(T* s, const T* src, int ld, int row0, int row_end, int col0,
                                               int col_end, int tid) {
    constexpr int CE = 16 / static_cast<int>(sizeof(T));
#pragma unroll
    for (int i = 0; i < ROWS * CPR / THREADS; ++i) {
        const int q = tid + i * THREADS, row = q / CPR, col = (q % CPR) * CE, gr = row0 + row, gc = col0 + col;
        const bool ok = gr < row_end && gc < col_end;
        hn_cp_chunk<LO>(s + L::at(row, col), src, ok ? static_cast<long long>(gr) * ld + gc : 0, ok ? 16 : 0);
    }
}

// The K loop when both tiles are copied as the products read them (bf16, or float32 already tf32; issue(kt): K tile
// kt's cp.async into stage kt % STAGES; multiply(s): the products of the tiles in stage s). Iteration kt: wait for tile
// kt, barrier (tile kt visible to all; every warp done with tile kt-1), refill buffer (kt-1) % STAGES with tile
// kt+STAGES-1, multiply tile kt. Ends with every copy retired.
template <int STAGES, class Issue, class Multiply>
__device__ __forceinline__ void hn_direct_loop(int tiles, const Issue& issue, const Multiply& multiply) {
    hn_pipeline_fill<STAGES>(tiles, issue);
    for (int kt = 0; kt < tiles; ++kt) {
        hn_cp_async_wait<STAGES - 2>();
        __syncthreads();
        if (kt + STAGES - 1 < tiles) issue(kt + STAGES - 1);
        hn_cp_async_commit();
        multiply(kt % STAGES);
    }
    hn_cp_async_wait<0>();
}

// The forward (EPI 1) or the stride-1 data gradient as a forward (EPI 2), as described above.
template <int EPI, int BM, int BN, int BK, int WM, int WN, int STAGES>
__device__ __forceinline__ void hn_conv16_fwd(unsigned char* smem, const unsigned short* W, const unsigned short* x,
                                              float* y, int M, int N, int K, const HnConv& cv) {
    constexpr int WARPS_N = BN / WN, THREADS = 32 * (BM / WM) * WARPS_N, MT = WM / 16, NT = WN / 8, CPR = BK / 8;
    static_assert(BM % WM == 0 && BN % WN == 0 && WM % 16 == 0 && WN % 16 == 0 && BK % 16 == 0 && STAGES >= 2 &&
                  THREADS % CPR == 0 && (BN * CPR) % THREADS == 0 && (BM * CPR) % THREADS == 0, "tile");
    using OA = HnOperand<true, BM, BK, 8, 8>;
    using OB = HnOperand<true, BN, BK, 8, 8>;
    unsigned short* sa = reinterpret_cast<unsigned short*>(smem);   // STAGES x OA::ELEMS
    unsigned short* sb = sa + STAGES * OA::ELEMS;                    // STAGES x OB::ELEMS

    const HnBlock blk = hn_block(nullptr, nullptr, y, M, N, K, K, 0, 0, 0, 0, 0, 1.f, 0.f, 1, K, BM, BN, BK);
    const HnThread th = hn_thread<WM, WN, WARPS_N>();
    const int tid = th.tid, tiles = blk.tiles;
    float acc[MT][NT][4];
    hn_zero(acc);
    const auto rows = hn_nhwc_rows<EPI, BN, BK / 2, THREADS>(cv, blk.n0, N, tid);   // chunks of 8: CPR = (BK / 2) / 4
    const HnDiv by_c = hn_div_of(cv.c);

    auto issue = [&](int kt) {
        const int k0 = kt * BK, s = kt % STAGES;
        hn_copy16_tile<BM, CPR, HnRowTile<OA::STRIDE>, THREADS>(sa + s * OA::ELEMS, W, K, blk.m0, M, k0, K, tid);
        hn_nhwc_copy_b<unsigned short, CPR, HnRowTile<OB::STRIDE>, THREADS>(sb + s * OB::ELEMS, x, cv, rows, by_c,
                                                                            k0, K, tid);
    };
    hn_direct_loop<STAGES>(tiles, issue, [&](int s) {
        hn_gemm_bf16_tile<false, true, OA, OB, MT, NT, BK>(sa + s * OA::ELEMS, sb + s * OB::ELEMS, acc, th.wm, th.wn,
                                                           th.lane);
    });
    if constexpr (EPI == 4)
        hn_conv_pool_epilogue<MT, NT>(blk, acc, M, cv, th.wm, th.wn, th.lane);
    else
        hn_conv_epilogue<EPI, MT, NT>(blk, acc, M, N, cv, th.wm, th.wn, th.lane);
}

// The K loop of the wgmma convolutions (HN_CONV16W, HN_CONV32W), over STAGES shared buffers with one wgmma group in
// flight (issue(kt): K tile kt's cp.async into buffer kt % STAGES). Iteration kt waits for tile kt's copies, fences
// them to the async proxy, meets the other threads at a barrier (so every thread has also finished waiting for the
// wgmma group of tile kt-2), refills tile kt-2's buffer with tile kt + STAGES - 2, issues tile kt's 4 wgmma (bf16
// m64nWNk16, or tf32 m64nWNk8 for T = float: 32 bytes of K each) on this warpgroup's operands (a and b in buffer 0,
// buffers `ea` and `eb` elements apart, K steps `kstep` elements apart, described by desc) and waits until only they
// are pending (so tile kt-1's have finished). Ends with every wgmma and copy retired. ALO, BLO > 0 (tf32 only): the
// operands are split copies (hn_cp_chunk), their lo tiles ALO and BLO elements after the hi ones, and each K step
// is three products, a_hi b_hi + a_hi b_lo + a_lo b_hi (a_lo b_lo, 2^-22 of the product, left out). INFLIGHT 0:
// each iteration ends waiting for all its wgmma, so that the copies run STAGES - 1 tiles ahead instead of STAGES - 2
// (the buffer refilled is tile kt-1's), at the cost of the tensor pipe idling from that wait to the next issue.
// hn_wgmma_loop's pipeline with the products given: multiply(kt) issues K tile kt's wgmma (between the fence and the
// commit), issue(kt) starts its copies.
template <int STAGES, int INFLIGHT = 1, class Issue, class Multiply>
__device__ __forceinline__ void hn_wgmma_pipeline(int tiles, const Issue& issue, const Multiply& multiply) {
    constexpr int AHEAD = STAGES - 1 - INFLIGHT;          // tiles in flight ahead of the one multiplied
    static_assert((INFLIGHT == 0 || INFLIGHT == 1) && AHEAD >= 1, "a buffer being filled, one read by wgmma");
    hn_pipeline_fill<AHEAD + 1>(tiles, issue);            // tiles 0 .. AHEAD - 1 in flight
    for (int kt = 0; kt < tiles; ++kt) {
        hn_cp_async_wait<AHEAD - 1>();
        hn_fence_proxy_async();
        __syncthreads();
        if (kt + AHEAD < tiles) issue(kt + AHEAD);
        hn_cp_async_commit();
        hn_wgmma_fence();
        multiply(kt);
        hn_wgmma_commit();
        hn_wgmma_wait<INFLIGHT>();
    }
    hn_wgmma_wait<0>();
    hn_cp_async_wait<0>();
}

// A K tile's 4 wgmma (bf16 m64nWNk16, MN as hn_wgmma_bf16's, or tf32 m64nWNk8 for T = float: 32 bytes of K each)
// from its stage's descriptors da and db, each K step `step` 16-byte units further (hn_wgmma_desc_add).
template <class T, int WN, int MN = 0>
__device__ __forceinline__ void hn_wgmma_ktile(float (&acc)[WN / 8][4], unsigned long long da, unsigned long long db,
                                               unsigned step) {
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
        if constexpr (sizeof(T) == 4)
            hn_wgmma_tf32<WN>(acc, hn_wgmma_desc_add(da, kk * step), hn_wgmma_desc_add(db, kk * step));
        else
            hn_wgmma_bf16<WN, MN>(acc, hn_wgmma_desc_add(da, kk * step), hn_wgmma_desc_add(db, kk * step));
    }
}

template <int STAGES, int WN, int MN, int ALO = 0, int BLO = 0, int INFLIGHT = 1, class T, class Issue, class Desc>
__device__ __forceinline__ void hn_wgmma_loop(int tiles, const Issue& issue, const T* a, int ea, const T* b, int eb,
                                              int kstep, float (&acc)[WN / 8][4], const Desc& desc) {
    static_assert(sizeof(T) == 2 || MN == 0, "tf32 operands are K-major");
    static_assert((ALO == 0 && BLO == 0) || (sizeof(T) == 4 && ALO > 0 && BLO > 0), "split copies are tf32");
    // the stage's descriptors once a K tile, each K step's and lo tile's from them (hn_wgmma_desc_add)
    const unsigned step = kstep * static_cast<unsigned>(sizeof(T)) / 16;
    constexpr unsigned alo = ALO * sizeof(T) / 16, blo = BLO * sizeof(T) / 16;
    hn_wgmma_pipeline<STAGES, INFLIGHT>(tiles, issue, [&](int kt) {
        const int s = kt % STAGES;
        const unsigned long long da0 = desc(a + s * ea), db0 = desc(b + s * eb);
        if constexpr (ALO == 0) {
            hn_wgmma_ktile<T, WN, MN>(acc, da0, db0, step);
        } else {                           // three products a K step: a_hi b_hi + a_hi b_lo + a_lo b_hi
#pragma unroll
            for (int kk = 0; kk < 4; ++kk) {
                const unsigned long long da = hn_wgmma_desc_add(da0, kk * step);
                const unsigned long long db = hn_wgmma_desc_add(db0, kk * step);
                hn_wgmma_tf32<WN>(acc, da, db);
                hn_wgmma_tf32<WN>(acc, da, hn_wgmma_desc_add(db, blo));
                hn_wgmma_tf32<WN>(acc, hn_wgmma_desc_add(da, alo), db);
            }
        }
    });
}

// The forward (EPI 1) or stride-1 data gradient (EPI 2) of hn_conv16_fwd on wgmma (sm_90a): the same GEMM, C[M, N]
// = A[M, K] B[K, N] with A = w [M][K] and B^T = x gathered [N][K], both K-major, in K tiles of 128 bytes (64 bf16, or
// 32 float32 read as tf32: T; one K tile row a 128-byte row, stored with the 128-byte swizzle, HnSwizzle128T). WGM x
// WGN warpgroups of 128 threads; warpgroup (gm, gn) computes rows 64 gm .. 64 gm + 63, columns WN gn .. WN gn + WN - 1
// of the block tile (BM = 64 WGM, BN = WN WGN) as 4 wgmma per K tile into 64 x WN / 128 float32 accumulators per
// thread (mma.sync's fragment order: hn_conv_epilogue writes them). Every thread copies (cp.async, as hn_conv16_fwd);
// hn_wgmma_loop. SPLIT (T float): W and x are split copies (fp32 as hi + lo tf32, hn_cp_chunk), each stage holds both
// parts of both tiles and each K step is three products (hn_wgmma_loop).
template <class T, int EPI, int WGM, int WGN, int WN, int STAGES, int SPLIT = 0, int INFLIGHT = 1>
__device__ __forceinline__ void hn_convw_fwd(unsigned char* smem, const T* W, const T* x, float* y, int M, int N,
                                             int K, const HnConv& cv) {
    constexpr int BM = 64 * WGM, BN = WN * WGN, BK = 128 / sizeof(T), THREADS = 128 * WGM * WGN, CPR = 8;
    constexpr int EA = BM * BK, EB = BN * BK;     // elements of a stage's A and B tiles (multiples of 1024 bytes)
    constexpr int ALO = SPLIT * EA, BLO = SPLIT * EB, SA = EA + ALO, SB = EB + BLO;   // a stage: hi (and lo) tiles
    static_assert((BN * CPR) % THREADS == 0 && (BM * CPR) % THREADS == 0, "tile");
    using L = HnSwizzle128T<T>;
    T* sa = reinterpret_cast<T*>(hn_smem_align1024(smem));   // STAGES x SA
    T* sb = sa + STAGES * SA;                                // STAGES x SB

    const HnBlock blk = hn_block(nullptr, nullptr, y, M, N, K, K, 0, 0, 0, 0, 0, 1.f, 0.f, 1, K, BM, BN, BK);
    const int tid = threadIdx.x, gm = tid / 128 / WGN, gn = tid / 128 % WGN;
    float acc[1][WN / 8][4];
    hn_zero(acc);
    const auto rows = hn_nhwc_rows<EPI, BN, 32, THREADS>(cv, blk.n0, N, tid);   // 8 chunks a row: 32 words
    const HnDiv by_c = hn_div_of(cv.c);

    auto issue = [&](int kt) {
        const int k0 = kt * BK, s = kt % STAGES;
        hn_copy16_tile<BM, CPR, L, THREADS, ALO>(sa + s * SA, W, K, blk.m0, M, k0, K, tid);
        hn_nhwc_copy_b<T, CPR, L, THREADS, decltype(rows)::N, BLO>(sb + s * SB, x, cv, rows, by_c, k0, K, tid);
    };
    hn_wgmma_loop<STAGES, WN, 0, ALO, BLO, INFLIGHT>(blk.tiles, issue, sa + gm * 64 * BK, SA, sb + gn * WN * BK, SB,
                                                     32 / sizeof(T), acc[0],
                                                     [](const T* p) { return hn_wgmma_desc(p); });
    if constexpr (EPI == 4)
        hn_conv_pool_epilogue<1, WN / 8>(blk, acc, M, cv, 64 * gm + 16 * ((tid >> 5) & 3), WN * gn, tid & 31);
    else
        hn_conv_epilogue<EPI, 1, WN / 8>(blk, acc, M, N, cv, 64 * gm + 16 * ((tid >> 5) & 3), WN * gn, tid & 31);
}

// The divisors of the filter gradient's gathers: a column n = (r, s, c) by C and S, a row k = (img, p, q) by P x Q
// and Q.
struct HnTapDivs {
    HnDiv c, s, pq, q;
};

// The filter gradient's B tile: rows k = (img, p, q) k0 .. k0 + ROWS - 1, columns n = (r, s, c) in 16-byte chunks (one
// tap, 8 bf16 or 4 float32 channels T), CPR chunks a row, from x [n][H][W][C] channels-last; taps outside the image,
// rows from kend on and columns from N on zero-filled.
template <int ROWS, int CPR, class L, int THREADS, int LO = 0, class T>
__device__ __forceinline__ void hn_nhwc_copy_x_taps(T* s, const T* x, const HnConv& cv, int n0, int N,
                                                    const HnTapDivs& dv, int k0, int kend, int tid) {
    const int col = (tid % CPR) * (16 / static_cast<int>(sizeof(T))), n = n0 + col;   // this thread's columns
    const int rs = hn_div(n, dv.c), c = n - rs * cv.c, r = hn_div(rs, dv.s), sx = rs - r * cv.s;
#pragma unroll
    for (int i = 0; i < ROWS * CPR / THREADS; ++i) {
        const int row = (tid + i * THREADS) / CPR, k = k0 + row;
        const int img = hn_div(k, dv.pq), t = k - img * dv.pq.d, p = hn_div(t, dv.q), q = t - p * cv.q;
        const int ih = p * cv.stride - cv.pad + r, iw = q * cv.stride - cv.pad + sx;
        const bool ok = k < kend && n < N && ih >= 0 && ih < cv.h && iw >= 0 && iw < cv.w;
        const int at = ok ? ((img * cv.h + ih) * cv.w + iw) * cv.c + c : 0;
        hn_cp_chunk<LO>(s + L::at(row, col), x, at, ok ? 16 : 0);
    }
}

// The filter gradient on mma.sync: C[M = O, N = R x S x C] += A[M, K] B[K, N] over K = images x P x Q, A = dy as
// stored ([k][o]) and B = x gathered ([k][(r, s, c)]), both MN-major tiles (rows k) of 16-byte chunks (8 bf16 or 4
// float32 channels T: O and C multiples of 8 or 4); K split over blockIdx.z, added with atomics. bf16: fragments by
// ldmatrix.trans (hn_gemm_bf16_tile); float32 copies already rounded to tf32 (conv.cu's to_nhwc32): scalar fragments
// (hn_gemm_tf32_tile; tf32 wgmma has no MN-major operands). SPLIT (float32): dy and x are split copies (fp32 as hi +
// lo tf32, hn_cp_chunk): a stage holds both parts of both tiles and each mma tile is three products.
template <class T, int BM, int BN, int BK, int WM, int WN, int STAGES, int SPLIT = 0>
__device__ __forceinline__ void hn_conv_filter_sync(unsigned char* smem, const T* dy, const T* x, float* dw, int M,
                                                    int N, int K, int splits, int kchunk, const HnConv& cv) {
    constexpr bool BF16 = sizeof(T) == 2;
    constexpr int WARPS_N = BN / WN, THREADS = 32 * (BM / WM) * WARPS_N, MT = WM / 16, NT = WN / 8;
    constexpr int CE = 16 / sizeof(T), CPA = BM / CE, CPB = BN / CE, STEP = BF16 ? 16 : 8;
    static_assert(BM % WM == 0 && BN % WN == 0 && WM % 16 == 0 && WN % STEP == 0 && BK % STEP == 0 && STAGES >= 2 &&
                  THREADS % CPB == 0 && (BK * CPA) % THREADS == 0 && (BK * CPB) % THREADS == 0, "tile");
    static_assert(SPLIT == 0 || !BF16, "split copies are float32");
    using OA = HnOperand<false, BM, BK, BF16 ? 8 : 4, 8>;   // rows k
    using OB = HnOperand<false, BN, BK, BF16 ? 8 : 4, 8>;
    constexpr int ALO = SPLIT * OA::ELEMS, BLO = SPLIT * OB::ELEMS, SA = OA::ELEMS + ALO, SB = OB::ELEMS + BLO;
    T* sa = reinterpret_cast<T*>(smem);   // STAGES x SA
    T* sb = sa + STAGES * SA;             // STAGES x SB

    const HnBlock blk = hn_block(nullptr, nullptr, dw, M, N, K, 0, 0, N, 0, 0, 0, 1.f, 1.f, splits, kchunk, BM, BN, BK);
    const HnThread th = hn_thread<WM, WN, WARPS_N>();
    const int tid = th.tid;
    float acc[MT][NT][4];
    hn_zero(acc);
    const HnTapDivs dv = {hn_div_of(cv.c), hn_div_of(cv.s), hn_div_of(cv.p * cv.q), hn_div_of(cv.q)};

    auto issue = [&](int kt) {
        const int k0 = blk.kbeg + kt * BK, s = kt % STAGES;
        hn_copy16_tile<BK, CPA, HnRowTile<OA::STRIDE>, THREADS, ALO>(sa + s * SA, dy, cv.o, k0, blk.kend, blk.m0, M,
                                                                     tid);
        hn_nhwc_copy_x_taps<BK, CPB, HnRowTile<OB::STRIDE>, THREADS, BLO>(sb + s * SB, x, cv, blk.n0, N, dv, k0,
                                                                          blk.kend, tid);
    };
    hn_direct_loop<STAGES>(blk.tiles, issue, [&](int s) {
        if constexpr (BF16)
            hn_gemm_bf16_tile<true, false, OA, OB, MT, NT, BK>(sa + s * SA, sb + s * SB, acc, th.wm, th.wn, th.lane);
        else
            hn_gemm_tf32_tile<true, OA, OB, MT, NT, BK, ALO, BLO>(sa + s * SA, sb + s * SB, acc, th.wm, th.wn,
                                                                  th.lane);
    });
    hn_epilogue<MT, NT>(blk, acc, M, N, N, 1.f, 1.f, th.wm, th.wn, th.lane);
}

// The bf16 filter gradient of hn_conv_filter_sync on wgmma (sm_90a): C[M = O, N = R x S x C] += A[M, K] B[K, N] over K =
// images x P x Q, A = dy as stored ([k][o]) and B = x gathered ([k][(r, s, c)]), both MN-major: K tiles of 64 rows k
// stored with the 128-byte swizzle per 64 columns (HnSwizzle128MN) and read by wgmma with its transpose flags.
// Warpgroups and tiles as hn_convw_fwd's; K split over blockIdx.z, added with atomics.
template <int WGM, int WGN, int WN, int STAGES>
__device__ __forceinline__ void hn_conv16w_filter(unsigned char* smem, const unsigned short* dy,
                                                  const unsigned short* x, float* dw, int M, int N, int K, int splits,
                                                  int kchunk, const HnConv& cv) {
    constexpr int BM = 64 * WGM, BN = WN * WGN, BK = 64, THREADS = 128 * WGM * WGN, CPA = BM / 8, CPB = BN / 8;
    constexpr int EA = BM * BK, EB = BN * BK;
    static_assert(THREADS % CPB == 0 && (BK * CPA) % THREADS == 0 && (BK * CPB) % THREADS == 0, "tile");
    unsigned short* sa = reinterpret_cast<unsigned short*>(hn_smem_align1024(smem));
    unsigned short* sb = sa + STAGES * EA;

    const HnBlock blk = hn_block(nullptr, nullptr, dw, M, N, K, 0, 0, N, 0, 0, 0, 1.f, 1.f, splits, kchunk, BM, BN, BK);
    const int tid = threadIdx.x, gm = tid / 128 / WGN, gn = tid / 128 % WGN;
    float acc[1][WN / 8][4];
    hn_zero(acc);
    const HnTapDivs dv = {hn_div_of(cv.c), hn_div_of(cv.s), hn_div_of(cv.p * cv.q), hn_div_of(cv.q)};

    auto issue = [&](int kt) {
        const int k0 = blk.kbeg + kt * BK, s = kt % STAGES;
        hn_copy16_tile<BK, CPA, HnSwizzle128MN, THREADS>(sa + s * EA, dy, cv.o, k0, blk.kend, blk.m0, M, tid);
        hn_nhwc_copy_x_taps<BK, CPB, HnSwizzle128MN, THREADS>(sb + s * EB, x, cv, blk.n0, N, dv, k0, blk.kend, tid);
    };
    // a warpgroup's columns start 64 gm (A) and WN gn (B) columns in: whole blocks of 64 x 64 (HnSwizzle128MN)
    hn_wgmma_loop<STAGES, WN, 1>(blk.tiles, issue, sa + gm * 64 * BK, EA, sb + gn * WN * BK, EB, 16 * 64, acc[0],
                                 [](const unsigned short* p) { return hn_wgmma_desc_mn(p); });
    hn_epilogue<1, WN / 8>(blk, acc, M, N, N, 1.f, 1.f, 64 * gm + 16 * ((tid >> 5) & 3), WN * gn, tid & 31);
}

// The tf32 filter gradient on wgmma with x's fragments in registers ("r" tiles, mma_tiles.FrTile; sm_90a):
// C[M = O, N = R S C] += dy^T x over K = images x P x Q, computed as its transpose C^T[(r, s, c)][o] = sum_k X[k][(r,
// s, c)] dy[k][o] on wgmma m64nBMk8 .tf32:
//   - wgmma's A (64 rows (r, s, c) a warpgroup x 8 k) from registers. x is gathered as hn_conv_filter_sync gathers it
//     (hn_nhwc_copy_x_taps: rows k of BN + 8 floats, MN-major), and each thread reads its fragments with scalar LDS:
//     a warp's rows 16w + g (+8) at k = t (+4), words 8 (k + ...) + g + const mod 32 under the row stride of
//     BN + 8 = 8 mod 32 words, so no bank conflicts; 16 LDS a K tile of 32, for 4 wgmma.
//   - wgmma's B from a K-major copy of dy, dyt [O][ldk] (ldk = K rounded up to 4, zeros past K; float32 already
//     rounded to tf32; mma.to_nhwc k_major), copied by cp.async in 16-byte chunks under the 128-byte swizzle
//     (HnSwizzle128T<float>, rows o of 32 k). wgmma reads tf32 operands K-major only, and the channels-last dy is
//     MN-major: dyt is the one operand stored the other way.
// So a K tile has no transposing pass and a quarter of the mma.sync tile's loads (hn_gemm_tf32_tile reads 128 for 128
// mma.sync of a 64 x 64 warp tile).
// Pipeline (hn_wgmma_pipeline's with one wgmma group in flight): K tile kt waits for its copies, fences the async
// proxy, waits until one wgmma group is pending, meets the barrier (every warpgroup's wgmma of kt - 2 retired, so
// stage (kt - 2) % STAGES is free) and issues the copies of kt + STAGES - 2 into it. Its 4 K steps run as two groups
// of 2 wgmma, each reading its own register set, loaded once the group that read that set before (the previous
// tile's same half) has retired: 16 registers of fragments, the wait the same at every K tile (no branch for ptxas
// to join with a group pending, where it would wait for all, C7517). WGN warpgroups take 64 rows (r, s, c) each and
// all BM columns o; the K sum split over blockIdx.z and added with atomics. hn_block's m0 / n0 are the o / (r, s, c)
// starts (the planner's M = O, N = R S C).
template <int WGN, int BM, int STAGES>
__device__ __forceinline__ void hn_conv32_filter_fr(unsigned char* smem, const float* dyt, const float* x, float* dw,
                                                    int M, int N, int K, int splits, int kchunk, const HnConv& cv) {
    constexpr int BN = 64 * WGN, BK = 32, THREADS = 128 * WGN, AHEAD = STAGES - 2;
    constexpr int RX = BN + 8;                  // x's staging rows k (fragment reads conflict-free: RX = 8 mod 32)
    constexpr int EB = BM * BK, SS = EB + BK * RX;   // a stage: dyt's K-major tile [BM][32], then x's [32][RX]
    static_assert(BM % 64 == 0 && BM <= 256 && (BM * 8) % THREADS == 0 && (SS * 4) % 1024 == 0 && AHEAD >= 1,
                  "tile: stages 1024-byte aligned, a stage filled while one is read by wgmma");
    float* st = reinterpret_cast<float*>(hn_smem_align1024(smem));

    const HnBlock blk = hn_block(nullptr, nullptr, dw, M, N, K, 0, 0, N, 0, 0, 0, 1.f, 1.f, splits, kchunk, BM, BN, BK);
    const int tid = threadIdx.x, gn = tid / 128, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int row = 64 * gn + 16 * ((tid >> 5) & 3) + g;     // this thread's fragment rows row, row + 8 of the tile
    const int ldk = (K + 3) & ~3;
    float acc[1][BM / 8][4];
    hn_zero(acc);
    unsigned a[2][2][4];                                     // register set (half tile), K step, fragment
    const HnTapDivs dv = {hn_div_of(cv.c), hn_div_of(cv.s), hn_div_of(cv.p * cv.q), hn_div_of(cv.q)};

    auto issue = [&](int kt) {
        const int k0 = blk.kbeg + kt * BK;
        float* s = st + (kt % STAGES) * SS;
        hn_copy16_tile<BM, 8, HnSwizzle128T<float>, THREADS>(s, dyt, ldk, blk.m0, M, k0, blk.kend, tid);
        hn_nhwc_copy_x_taps<BK, BN / 4, HnRowTile<RX>, THREADS>(s + EB, x, cv, blk.n0, N, dv, k0, blk.kend, tid);
    };
    hn_pipeline_fill<AHEAD + 1>(blk.tiles, issue);
    // K tile kt: two halves h of 2 K steps, each its own wgmma group reading register set a[h]; before a set is
    // loaded, the group that read it last (the previous tile's half h) has retired: at most one group is pending.
#pragma unroll 1
    for (int kt = 0; kt < blk.tiles; ++kt) {
        hn_cp_async_wait<AHEAD - 1>();
        hn_fence_proxy_async();
        hn_wgmma_wait<1>();
        __syncthreads();
        if (kt + AHEAD < blk.tiles) issue(kt + AHEAD);
        hn_cp_async_commit();
        const float* s = st + (kt % STAGES) * SS;
        const float* xs = s + EB + t * RX + row;
        const unsigned long long db = hn_wgmma_desc(s);   // K step kk 32 bytes (2 units) on
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            if (h) hn_wgmma_wait<1>();
#pragma unroll
            for (int u = 0; u < 2; ++u) {
                const int kk = 2 * h + u;
                a[h][u][0] = hn_bits(hn_lds(xs + 8 * kk * RX));
                a[h][u][1] = hn_bits(hn_lds(xs + 8 * kk * RX + 8));
                a[h][u][2] = hn_bits(hn_lds(xs + (8 * kk + 4) * RX));
                a[h][u][3] = hn_bits(hn_lds(xs + (8 * kk + 4) * RX + 8));
            }
            hn_wgmma_fence();
#pragma unroll
            for (int u = 0; u < 2; ++u) hn_wgmma_tf32_ra<BM>(acc[0], a[h][u], hn_wgmma_desc_add(db, 2 * (2 * h + u)));
            hn_wgmma_commit();
        }
    }
    hn_wgmma_wait<0>();
    hn_cp_async_wait<0>();
    // acc[0][j][2h + e]: C^T's row row + 8h (n), column 8j + 2t + e (m), added into C [M][N]
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int n = blk.n0 + row + 8 * h;
        if (n >= N) continue;
#pragma unroll
        for (int j = 0; j < BM / 8; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int m = blk.m0 + 8 * j + 2 * t + e;
                if (m >= M) continue;
                float* p = blk.C + (static_cast<long long>(m) * N + n);
                if (blk.atomic)
                    hn_atomic_add(p, acc[0][j][2 * h + e]);
                else
                    *p = acc[0][j][2 * h + e] + hn_ld_c(p);
            }
    }
}

// The HnConv of a channels-last kernel's arguments (HN_CONV16 and its kin): EPI 3 the filter gradient's; 1, 2 and 4
// the forward's, with kchunk the pooled forward's count of pooled outputs (EPI 4).
template <int EPI>
__device__ __forceinline__ HnConv hn_conv16_of(const float* aux, int C, int H, int W, int R, int S, int P, int Q,
                                               int O, int stride, int pad, int act, int kchunk) {
    HnConv cv = hn_conv_of<EPI == 3 ? 3 : 1>(aux, C, H, W, R, S, P, Q, O, stride, pad, act);
    if constexpr (EPI != 3) cv.pooled = kchunk;
    return cv;
}

// HN_CONV16's body: EPI 1, 2 or 4, hn_conv16_fwd; 3, hn_conv_filter_sync (arguments as HN_CONV16 says).
template <int EPI, int BM, int BN, int BK, int WM, int WN, int ST>
__device__ __forceinline__ void hn_conv16(unsigned char* smem, const unsigned short* B, const unsigned short* Wt,
                                          const float* aux, float* Y, int M, int N, int K, int C, int H, int W, int R,
                                          int S, int P, int Q, int O, int stride, int pad, int act, int splits,
                                          int kchunk) {
    const HnConv cv = hn_conv16_of<EPI>(aux, C, H, W, R, S, P, Q, O, stride, pad, act, kchunk);
    if constexpr (EPI == 3)
        hn_conv_filter_sync<unsigned short, BM, BN, BK, WM, WN, ST>(smem, Wt, B, Y, M, N, K, splits, kchunk, cv);
    else
        hn_conv16_fwd<EPI, BM, BN, BK, WM, WN, ST>(smem, Wt, B, Y, M, N, K, cv);
}

// --- convolutions fed by the Tensor Memory Accelerator (sm_90a; HN_CONV16T) --------------------------------------
// A producer warp has the TMA unit copy each K tile's operands into shared memory, where the tensor maps (built on
// the host, mma.py: tensor_maps) say: the weights or dy as boxes of a 2D tensor, the channels-last input as im2col
// boxes (the hardware walks the block's output pixels, q fastest, then p, then the image, from the first one's input
// corner, adds the tap's offsets and fills what lies outside the image, and past the last image, with zeros). The
// consumer warpgroups only wait, multiply and write the epilogue. The CPU emulator runs them with its own model of the
// two copies (cuda_emu.h, from the PTX ISA's tile and im2col modes; its maps are its own encoding of the same
// parameters), and the GPU tests check the hardware's im2col box against that model (hn_tma_probe).

// A CUtensorMap (cuda.h: 128 bytes, 64-byte aligned), passed by value as a __grid_constant__ kernel parameter: the
// copies read it at its parameter address.
struct __align__(64) HnTensorMap {
    unsigned long long bits[16];
};

#ifndef HN_EMULATE   // (the emulator defines the same functions on the CPU)

// mbarrier (PTX ISA 9.7.13.15), an 8-byte object in shared memory: init with the count of arrivals that complete a
// phase; arrive (a release); arrive.expect_tx: one arrival and `bytes` more of asynchronous copies that the phase
// also waits for (their complete_tx); try_wait.parity: whether the phase of that parity has completed (the current
// one's parity differs; an acquire; a kernel loops on it).
__device__ __forceinline__ void hn_mbar_init(void* bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(hn_smem_addr(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ unsigned long long hn_mbar_arrive(void* bar) {
    unsigned long long state;
    asm volatile("mbarrier.arrive.shared::cta.b64 %0, [%1];\n" : "=l"(state) : "r"(hn_smem_addr(bar)) : "memory");
    return state;
}
__device__ __forceinline__ void hn_mbar_arrive_tx(void* bar, unsigned bytes) {
    HN_SM90A(asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(hn_smem_addr(bar)),
                          "r"(bytes)
                          : "memory"));
}
__device__ __forceinline__ bool hn_mbar_try_wait(void* bar, unsigned parity) {
    unsigned done = 0;
    HN_SM90A(asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
                          "selp.u32 %0, 1, 0, p;\n}\n"
                          : "=r"(done)
                          : "r"(hn_smem_addr(bar)), "r"(parity)
                          : "memory"));
    return done != 0;
}
// The mbarriers' initialisation made visible to the async proxy (the TMA unit); a barrier after it.
__device__ __forceinline__ void hn_fence_mbar_init() {
    HN_SM90A(asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"));
}
// A tiled 2D box of `map` (coordinates innermost first: column, row) into shared memory, completing on `bar`.
__device__ __forceinline__ void hn_tma_tile2d(void* dst, const HnTensorMap& map, int col, int row, void* bar) {
    HN_SM90A(asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
                          " [%0], [%1, {%2, %3}], [%4];\n" ::"r"(hn_smem_addr(dst)),
                          "l"(reinterpret_cast<unsigned long long>(&map)), "r"(col), "r"(row), "r"(hn_smem_addr(bar))
                          : "memory"));
}
// An im2col box of a 4D channels-last map ({c, w, h, n}: the first pixel's channel offset and input corner; {s, r}:
// the tap's offsets, 16-bit) into shared memory, completing on `bar`.
__device__ __forceinline__ void hn_tma_im2col4d(void* dst, const HnTensorMap& map, int c, int w, int h, int n, int s,
                                                int r, void* bar) {
    HN_SM90A(asm volatile("cp.async.bulk.tensor.4d.shared::cluster.global.im2col.mbarrier::complete_tx::bytes"
                          " [%0], [%1, {%2, %3, %4, %5}], [%6], {%7, %8};\n" ::"r"(hn_smem_addr(dst)),
                          "l"(reinterpret_cast<unsigned long long>(&map)), "r"(c), "r"(w), "r"(h), "r"(n),
                          "r"(hn_smem_addr(bar)), "h"(static_cast<unsigned short>(s)),
                          "h"(static_cast<unsigned short>(r))
                          : "memory"));
}

#endif

// The consumer side of a warp-specialised K loop (hn_tma_loop; the ws sandbox's hn_wgmma_ws_loop): for K tiles i =
// first .. first + tiles - 1 of the block's sequence (stage i % STAGES, phase parity (i / STAGES) & 1), wait on the
// stage's "full" mbarrier, issue the tile's 4 bf16 wgmma (this warpgroup's operands a and b in stage 0, stages ea and
// eb elements apart, K steps kstep apart, described by desc, MN as hn_wgmma_bf16's) into acc, and once the previous
// tile's group has finished release that tile's stage: release(stage), an arrival on its "empty" mbarrier (the
// cluster sandbox's on a block of its cluster). Ends with every wgmma retired and the last tile's stage released.
template <int STAGES, int WN, int MN, class Desc, class Release>
__device__ __forceinline__ void hn_ws_consume(unsigned long long* full, int first, int tiles, const unsigned short* a,
                                              int ea, const unsigned short* b, int eb, int kstep,
                                              float (&acc)[WN / 8][4], const Desc& desc, const Release& release) {
    for (int kt = 0; kt < tiles; ++kt) {
        const int i = first + kt, s = i % STAGES;
        while (!hn_mbar_try_wait(full + s, (i / STAGES) & 1)) {}
        hn_wgmma_fence();
        hn_wgmma_ktile<unsigned short, WN, MN>(acc, desc(a + s * ea), desc(b + s * eb), kstep * 2 / 16);
        hn_wgmma_commit();
        hn_wgmma_wait<1>();
        if (kt > 0) release((i - 1) % STAGES);
    }
    hn_wgmma_wait<0>();
    if (tiles > 0) release((first + tiles - 1) % STAGES);
}

// The K loops shared by the TMA kernels, with one wgmma group in flight: the block's `count` output tiles, `ktiles` K
// tiles each, one sequence of K tiles i = t ktiles + kt through the stages. Shared memory at `bars`: STAGES "full"
// mbarriers (count 1: the producer's arrive.expect_tx of tx bytes; the phase completes when the stage's boxes have
// landed) and STAGES "empty" ones (count CONSUMERS: every consumer thread once its wgmma on the stage finished),
// initialised here (then a barrier). The producer (thread CONSUMERS, the first of the last warp) waits for a stage's
// "empty", arms its "full" and issues copy(t, kt, s, full + s); the rest of its warp returns at once. So while the
// consumers finish tile t (epi(t, acc), acc float[1][WN / 8][4]), the producer already fills the freed stages with
// tile t + 1's first K tiles. The consumers run hn_ws_consume into acc, zeroed for each tile.
template <int STAGES, int CONSUMERS, int WN, int MN, class Copy, class Desc, class Epi>
__device__ __forceinline__ void hn_tma_loop(unsigned char* bars, int count, int ktiles, unsigned tx, const Copy& copy,
                                            const unsigned short* a, int ea, const unsigned short* b, int eb,
                                            int kstep, const Desc& desc, const Epi& epi) {
    unsigned long long* full = reinterpret_cast<unsigned long long*>(bars);
    unsigned long long* empty = full + STAGES;
    const int tid = threadIdx.x;
    if (tid == 0) {
        for (int s = 0; s < STAGES; ++s) {
            hn_mbar_init(full + s, 1);
            hn_mbar_init(empty + s, CONSUMERS);
        }
        hn_fence_mbar_init();
    }
    __syncthreads();
    if (tid >= CONSUMERS) {
        if (tid == CONSUMERS)
            for (int t = 0, i = 0; t < count; ++t)
                for (int kt = 0; kt < ktiles; ++kt, ++i) {
                    const int s = i % STAGES;
                    // (a fresh barrier passes parity 1)
                    while (!hn_mbar_try_wait(empty + s, ((i / STAGES) & 1) ^ 1)) {}
                    hn_mbar_arrive_tx(full + s, tx);
                    copy(t, kt, s, full + s);
                }
        return;
    }
    float acc[1][WN / 8][4];
    for (int t = 0; t < count; ++t) {
        hn_zero(acc);
        hn_ws_consume<STAGES, WN, MN>(full, t * ktiles, ktiles, a, ea, b, eb, kstep, acc[0], desc,
                                      [&](int stage) { hn_mbar_arrive(empty + stage); });
        epi(t, acc);
    }
}

// The pooled forward's epilogue on row-order columns (hn_convt_fwd's EPI 4): the GEMM's columns are the convolution's
// output pixels (Qu = 8 D to a row, Qu = 2 cv.q), and each warpgroup's WN columns start at a multiple of 2 Qu (the
// plan checks 2 Qu | WN), so a window's two rows lie in fragments j (row 2i: (j / D) even) and j + D of one thread:
// acc[j][2h], acc[j][2h + 1], acc[j + D][2h], acc[j + D][2h + 1] are its pixels in window order (hn_window_store).
template <int D, int NT>
__device__ __forceinline__ void hn_convt_pool_epilogue(const HnBlock& b, float (&acc)[1][NT][4], int M, int N,
                                                       const HnConv& cv, int wm, int wn, int lane) {
    static_assert(NT % (2 * D) == 0, "whole pairs of rows");
    constexpr int QU = 8 * D;
    const int t = lane & 3, plane = cv.out_plane.d, uplane = 4 * plane;
    unsigned char* arg =
        reinterpret_cast<unsigned char*>(b.C) + static_cast<long long>(cv.pooled) * M * (cv.out16 ? 2 : 4);
    hn_each_row<1>(b, M, wm, lane, [&](int, int h, int m) {
        const float bias = cv.aux ? hn_ldg(cv.aux + m) : 0.f;
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            if ((j / D) % 2) continue;                         // (row 2i + 1: the window's bottom row)
            const int n = b.n0 + wn + 8 * j + 2 * t;           // the window's top-left pixel
            if (n >= N) continue;
            const int img = n / uplane, pq = n - img * uplane, p = pq / QU, q = pq - p * QU;
            const float v[4] = {acc[0][j][2 * h], acc[0][j][2 * h + 1], acc[0][j + D][2 * h], acc[0][j + D][2 * h + 1]};
            hn_window_store(b.C, arg, (static_cast<long long>(img) * M + m) * plane + (p / 2) * cv.q + q / 2, v, bias,
                            cv);
        }
    });
}

// A batch norm's sums as the kernel that writes its input adds them (conv_small_fwd_tc, the TMA tiles' staged
// epilogues; norm.cu's bn_stats_synced reads them): HN_SUMS_COPIES copies of [sum x (M channels), sum x^2 (M)], then
// the count, zeroed HN_SUMS_COPIES * 2 M + 1 doubles. A block adds its tile's sums into copy (its tile's index modulo
// HN_SUMS_COPIES), so that the float64 atomics of the blocks in flight spread over that many addresses a channel (and
// L2 slices) instead of queueing on one; bn_stats_synced adds the copies up. (mma.py's SUMS_COPIES: the same number.)
#define HN_SUMS_COPIES 32

// The copy of a batch norm's sums (of M channels) that the tile of index `tile` adds into.
__device__ __forceinline__ double* hn_sums_copy(double* sums, int M, int tile) {
    return sums + 2LL * M * (tile % HN_SUMS_COPIES);
}

// A batch norm's statistics from a staged epilogue (sums: HN_SUMS_COPIES copies of 2 M doubles and the count): the G
// consecutive lanes of a warp (G | 32) that hold output row m's values add their sums s and sums of squares ss (in
// double) by shuffles, and the first adds them into row m of the tile's copy (tile: the tile's index; two atomics a
// row and tile). The whole warp calls this; a lane with no values passes zeros.
template <int G>
__device__ __forceinline__ void hn_add_row_sums(double* sums, int M, int m, double s, double ss, int lane, int tile) {
    static_assert(G > 0 && 32 % G == 0, "a row's lanes within one warp");
#pragma unroll
    for (int o = G / 2; o > 0; o >>= 1) {
        s += __shfl_xor_sync(0xffffffffu, s, o);
        ss += __shfl_xor_sync(0xffffffffu, ss, o);
    }
    if (lane % G == 0 && m < M) {
        double* copy = hn_sums_copy(sums, M, tile);
        atomicAdd(copy + m, s);
        atomicAdd(copy + M + m, ss);
    }
}

// Where a convolution's batch-norm count goes: after the HN_SUMS_COPIES copies of 2 M sums.
__device__ __forceinline__ double* hn_sums_count(double* sums, int M) { return sums + 2LL * M * HN_SUMS_COPIES; }

// The value of one bf16 (its bits), in double.
__device__ __forceinline__ double hn_bf16_value(unsigned bits) { return __uint_as_float(bits << 16); }

// The pooled forward's epilogue through shared memory (hn_convt_fwd's EPI 4 where the pooled planes are whole
// multiples of 16 outputs and y is 16-byte aligned): the block's columns are whole pairs of rows, so its windows are
// the BN / 4 consecutive pooled outputs from n0 / 4 on, and window (row pair k, column q / 2) is the tile's pooled
// column k Q + q / 2. Once every warpgroup's wgmma has retired, each thread pools its windows in registers (as
// hn_convt_pool_epilogue) and writes each maximum (float32) and position (a word) to the block's two BM x BN / 4 tiles
// at `tile` (rows BN / 4 + 4 words apart: a warp's 8 rows x 4 windows in distinct banks); after a second barrier,
// consecutive threads store a row's 16-byte chunks: 8 bf16 or 4 float32 maxima, 16 position bytes (never across an
// image: the pooled plane is a multiple of 16). sums (bf16 only; null: none): the pooled outputs' batch-norm
// statistics (hn_add_row_sums), and their count (hn_sums_count).
template <int D, bool B16, int BM, int BN, int CONSUMERS, int NT>
__device__ __forceinline__ void hn_convt_pool_staged(const HnBlock& b, float (&acc)[1][NT][4], int M, const HnConv& cv,
                                                     int wm, int wn, int lane, float* tile, double* sums) {
    constexpr int QU = 8 * D, PW = BN / 4, LD = PW + 4, VY = B16 ? 8 : 4;
    static_assert(NT % (2 * D) == 0 && PW % 16 == 0, "whole pairs of rows, whole chunks of positions");
    float* ty = tile;
    float* targ = tile + BM * LD;
    const int g = lane >> 2, t = lane & 3, tid = threadIdx.x;
    hn_bar_sync(1, CONSUMERS);                   // every warpgroup done reading the stages
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int r = wm + g + 8 * h;
        const float bias = cv.aux && b.m0 + r < M ? hn_ldg(cv.aux + b.m0 + r) : 0.f;
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            if ((j / D) % 2) continue;                          // (row 2i + 1: the window's bottom row)
            const int c = wn + 8 * j + 2 * t, col = c / (2 * QU) * (QU / 2) + (c % QU) / 2;
            const float v[4] = {acc[0][j][2 * h], acc[0][j][2 * h + 1], acc[0][j + D][2 * h], acc[0][j + D][2 * h + 1]};
            int bi;
            const float best = hn_window_max(v, bias, cv, bi);
            hn_sts1(ty + r * LD + col, hn_bits(best));
            hn_sts1(targ + r * LD + col, static_cast<unsigned>(bi));
        }
    }
    hn_bar_sync(1, CONSUMERS);
    const int first = b.n0 / 4;
    unsigned char* arg = reinterpret_cast<unsigned char*>(b.C) + static_cast<long long>(cv.pooled) * M * (B16 ? 2 : 4);
    auto offset = [&](int r, int c, long long& o) {        // the output of tile row r, pooled column c (if any)
        const int m = b.m0 + r, at = first + c;
        if (m >= M || at >= cv.pooled) return false;
        o = hn_nchw_at(cv.out_plane, M, m, at);
        return true;
    };
    for (int i = tid; i < BM * (PW / VY); i += CONSUMERS) {
        const int r = i / (PW / VY), c = (i - r * (PW / VY)) * VY;
        long long o;
        if (!offset(r, c, o)) continue;
        const float4 lo = hn_lds4(ty + r * LD + c);
        if constexpr (B16) {
            const float4 hi = hn_lds4(ty + r * LD + c + 4);
            hn_st_v4(reinterpret_cast<unsigned short*>(b.C) + o,
                     make_uint4(hn_pack_bf16x2(lo.x, lo.y), hn_pack_bf16x2(lo.z, lo.w), hn_pack_bf16x2(hi.x, hi.y),
                                hn_pack_bf16x2(hi.z, hi.w)));
        } else {
            hn_st_v4(b.C + o, make_uint4(hn_bits(lo.x), hn_bits(lo.y), hn_bits(lo.z), hn_bits(lo.w)));
        }
    }
    if (B16 && sums) {          // a warp a row at a time, its lanes its outputs as stored (a pass of its own: fewer
        for (int r = tid >> 5; r < BM; r += CONSUMERS / 32) {     // registers than in the loop above)
            double s = 0.0, ss = 0.0;
            for (int c = lane; c < PW; c += 32) {
                long long o;
                if (!offset(r, c, o)) continue;
                const double v = hn_bf16_value(hn_bf16_of(hn_lds(ty + r * LD + c)));
                s += v;
                ss += v * v;
            }
            hn_add_row_sums<32>(sums, M, b.m0 + r, s, ss, lane, b.n0 / BN);
        }
        if (b.m0 == 0 && b.n0 == 0 && tid == 0) *hn_sums_count(sums, M) = static_cast<double>(cv.pooled);
    }
    for (int i = tid; i < BM * (PW / 16); i += CONSUMERS) {
        const int r = i / (PW / 16), c = (i - r * (PW / 16)) * 16;
        long long o;
        if (!offset(r, c, o)) continue;
        unsigned w[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const float4 p = hn_lds4(targ + r * LD + c + 4 * q);
            w[q] = hn_bits(p.x) | hn_bits(p.y) << 8 | hn_bits(p.z) << 16 | hn_bits(p.w) << 24;
        }
        hn_st_v4(arg + o, make_uint4(w[0], w[1], w[2], w[3]));
    }
}

// The forward's and data gradient's epilogue through shared memory (hn_convt_fwd's EPI 1 and 2 where the output's
// planes are whole multiples of 8 pixels, C is 16-byte aligned and there is no mask): the NCHW output's row m holds a
// tile row's pixels of one image contiguously, where a fragment's stores cover 8 rows x 16 or 32 bytes (half a 32-byte
// sector each in bf16). Once every consumer's wgmma has retired (named barrier 1: the producer warp has left), each
// finishes its values (MODE 1: + bias, then the activation) and writes them to the block's BM x BN tile at `tile`
// (bf16 or float32 pairs; rows BN + 8 elements apart, so that the 8 rows x 4 pairs a warp (bf16) or half-warp
// (float32) stores fall in distinct banks); after a second barrier, consecutive threads take consecutive 16-byte
// chunks of a row and store them: a warp writes whole sectors (8 bf16 or 4 float32 pixels a chunk, never across an
// image: the plane is a multiple of 8). sums (bf16 only; null: none): the outputs' batch-norm statistics
// (hn_add_row_sums), and their count N (hn_sums_count).
template <int MODE, typename T, int BM, int BN, int CONSUMERS, int NT>
__device__ __forceinline__ void hn_conv_staged_epilogue(const HnBlock& b, float (&acc)[1][NT][4], int M, int N,
                                                        const HnConv& cv, int wm, int wn, int lane, T* tile,
                                                        double* sums = nullptr) {
    constexpr bool B16 = sizeof(T) == 2;
    constexpr int LD = BN + 8, VEC = 16 / sizeof(T), CPR = BN / VEC;
    static_assert(BM * CPR % CONSUMERS == 0 && (CPR % 32 == 0 || 32 % CPR == 0),
                  "every consumer thread the same number of chunks, a row's chunks whole warps or within one");
    const int g = lane >> 2, t = lane & 3, tid = threadIdx.x;
    hn_bar_sync(1, CONSUMERS);                   // every warpgroup done reading the stages
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int r = wm + g + 8 * h;
        const float bias = MODE == 1 && cv.aux && b.m0 + r < M ? hn_ldg(cv.aux + b.m0 + r) : 0.f;
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            float x = acc[0][j][2 * h] + bias, y = acc[0][j][2 * h + 1] + bias;
            if (MODE == 1 && cv.act == 1) {
                x = x > 0.f ? x : 0.f;
                y = y > 0.f ? y : 0.f;
            }
            T* at = tile + r * LD + wn + 8 * j + 2 * t;
            if constexpr (B16)
                hn_sts1(at, hn_pack_bf16x2(x, y));
            else
                hn_sts2(at, hn_bits(x), hn_bits(y));
        }
    }
    hn_bar_sync(1, CONSUMERS);
    T* out = reinterpret_cast<T*>(b.C);
    for (int i = tid; i < BM * CPR; i += CONSUMERS) {
        const int r = i / CPR, c = (i - r * CPR) * VEC, m = b.m0 + r, n = b.n0 + c;
        const bool in = m < M && n < N;
        unsigned w[4] = {0u, 0u, 0u, 0u};
        if (in) {
            const float4 v = hn_lds4(reinterpret_cast<const float*>(tile + r * LD + c));
            w[0] = hn_bits(v.x);
            w[1] = hn_bits(v.y);
            w[2] = hn_bits(v.z);
            w[3] = hn_bits(v.w);
            hn_st_v4(out + hn_nchw_at(cv.out_plane, M, m, n), make_uint4(w[0], w[1], w[2], w[3]));
        }
        if (B16 && sums) {           // the chunk's 8 values as stored; a row's CPR lanes (or whole warps) together
            double s = 0.0, ss = 0.0;
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const double lo = hn_bf16_value(w[e] & 0xffffu), hi = hn_bf16_value(w[e] >> 16);
                s += lo + hi;
                ss += lo * lo + hi * hi;
            }
            hn_add_row_sums<(CPR < 32 ? CPR : 32)>(sums, M, m, s, ss, lane, b.n0 / BN);
        }
    }
    if (B16 && sums && b.m0 == 0 && b.n0 == 0 && tid == 0) *hn_sums_count(sums, M) = static_cast<double>(N);
}

// The pooled forward's epilogue for D = Q / 8: staged (hn_convt_pool_staged) where it can be, else
// hn_convt_pool_epilogue.
template <int D, int BM, int BN, int CONSUMERS, int NT>
__device__ __forceinline__ void hn_convt_pool_epilogue_of(const HnBlock& b, float (&acc)[1][NT][4], int M, int N,
                                                          const HnConv& cv, int wm, int wn, int lane,
                                                          unsigned short* stages, const float* y, double* sums) {
    if (cv.out_plane.d % 16 || (reinterpret_cast<unsigned long long>(y) & 15))
        hn_convt_pool_epilogue<D, NT>(b, acc, M, N, cv, wm, wn, lane);
    else if (cv.out16)
        hn_convt_pool_staged<D, true, BM, BN, CONSUMERS>(b, acc, M, cv, wm, wn, lane, reinterpret_cast<float*>(stages),
                                                         sums);
    else
        hn_convt_pool_staged<D, false, BM, BN, CONSUMERS>(b, acc, M, cv, wm, wn, lane,
                                                          reinterpret_cast<float*>(stages), nullptr);
}

// The forward (EPI 1), stride-1 data gradient (EPI 2) or pooled forward (EPI 4: cv.p, cv.q the pooled sizes, the
// convolution's output 2 cv.p x 2 cv.q with 2 cv.q in 8, 16, 32; N its pixels, in rows) of hn_convw_fwd fed by TMA:
// C[M, N] = A[M, K] B[K, N], A = w [O][R][S][C] as [M = O][K = R S C] (amap: boxes of 64 K x BM rows), B^T = x
// gathered [N = n P Q][K] (bmap: im2col boxes of BN pixels x 64 channels, element strides {1, stride, stride, 1},
// corners {-pad, -pad} and {pad - (S-1), pad - (R-1)}), both K-major in K tiles of 64 bf16 -- one tap r, s and
// channels c0 .. c0 + 63 (C a multiple of 64) -- stored with the 128-byte swizzle (HnSwizzle128: TMA's
// CU_TENSOR_MAP_SWIZZLE_128B on 1024-byte aligned tiles). WGM x WGN consumer warpgroups of 64 x WN as
// hn_convw_fwd's, one producer warp (hn_tma_loop). Shared memory: 2 STAGES mbarriers, then the stages (A tiles,
// then B tiles) aligned to 1024 bytes. A block computes the BM x BN tile at (blockIdx.y, blockIdx.x); PERSIST, the
// tiles blockIdx.x, blockIdx.x + gridDim.x, ... of the (M / BM) x (N / BN) in order (M fastest: blocks side by side
// read the same pixels), its producer loading the next tile while the consumers store the last, and the staged
// epilogue in its own tile after the stages (the larger of hn_conv_staged_epilogue's bf16 BM x (BN + 8) and
// hn_convt_pool_staged's two float32 BM x (BN / 4 + 4): mma_tiles.TmaTile.staged_tile_bytes; bf16 outputs only).
// sums (null: none): the batch-norm statistics of the forward's or pooled forward's bf16 output, added by the staged
// epilogues (hn_add_row_sums); the host passes them only where those run (mma.py: epilogue_sums_fit).
template <int EPI, int WGM, int WGN, int WN, int STAGES, bool PERSIST>
__device__ __forceinline__ void hn_convt_fwd(unsigned char* smem, const HnTensorMap& amap, const HnTensorMap& bmap,
                                             float* y, int M, int N, int K, const HnConv& cv, double* sums) {
    using T = unsigned short;
    constexpr int CONSUMERS = 128 * WGM * WGN, BM = 64 * WGM, BN = WN * WGN, BK = 64, EA = BM * BK, EB = BN * BK;
    static_assert(STAGES >= 2 && BN <= 256 && BM <= 256, "a box holds at most 256 rows");
    static_assert(PERSIST || BM * (BN + 8) * 4 <= STAGES * (EA + EB) * 2,
                  "the staged epilogue's tile fits in the stages");
    T* sa = reinterpret_cast<T*>(hn_smem_align1024(smem + 16 * STAGES));   // STAGES x EA
    T* sb = sa + STAGES * EA;                                                // STAGES x EB
    T* staged = PERSIST ? sb + STAGES * EB : sa;                             // (PERSIST: after the stages)
    const int mtiles = (M + BM - 1) / BM, tiles = mtiles * ((N + BN - 1) / BN);
    const int count = PERSIST ? (tiles - static_cast<int>(blockIdx.x) + gridDim.x - 1) / gridDim.x : 1;
    auto block_of = [&](int t) {                 // the HnBlock of the block's t-th tile
        HnBlock blk = hn_block(nullptr, nullptr, y, M, N, K, K, 0, 0, 0, 0, 0, 1.f, 0.f, 1, K, BM, BN, BK);
        if (PERSIST) {
            const int i = blockIdx.x + t * gridDim.x;
            blk.m0 = i % mtiles * BM;
            blk.n0 = i / mtiles * BN;
        }
        return blk;
    };
    const int tid = threadIdx.x, gm = tid / 128 / WGN, gn = tid / 128 % WGN;
    const int P = EPI == 4 ? 2 * cv.p : cv.p, Q = EPI == 4 ? 2 * cv.q : cv.q;
    auto copy = [&](int t, int kt, int s, void* bar) {
        // the tile's first output pixel: its image and input corner (over the convolution's output P x Q)
        const HnBlock blk = block_of(t);
        const int img = blk.n0 / (P * Q), pq = blk.n0 - img * P * Q, p0 = pq / Q,
                  w0 = (pq - p0 * Q) * cv.stride - cv.pad, h0 = p0 * cv.stride - cv.pad;
        const int k0 = kt * BK, rs = k0 / cv.c, r = rs / cv.s;
        hn_tma_tile2d(sa + s * EA, amap, k0, blk.m0, bar);
        hn_tma_im2col4d(sb + s * EB, bmap, k0 - rs * cv.c, w0, h0, img, rs - r * cv.s, r, bar);
    };
    const int wm = 64 * gm + 16 * ((tid >> 5) & 3), wn = WN * gn, lane = tid & 31;
    auto epilogue = [&](int t, float(&acc)[1][WN / 8][4]) {
        const HnBlock blk = block_of(t);
        if constexpr (EPI == 4) {
            if (Q == 8)
                hn_convt_pool_epilogue_of<1, BM, BN, CONSUMERS>(blk, acc, M, N, cv, wm, wn, lane, staged, y, sums);
            else if (Q == 16)
                hn_convt_pool_epilogue_of<2, BM, BN, CONSUMERS>(blk, acc, M, N, cv, wm, wn, lane, staged, y, sums);
            else
                hn_convt_pool_epilogue_of<4, BM, BN, CONSUMERS>(blk, acc, M, N, cv, wm, wn, lane, staged, y, sums);
        } else if (cv.out_plane.d % 8 == 0 && (reinterpret_cast<unsigned long long>(y) & 15) == 0 &&
                   (EPI == 1 || !cv.aux) && (cv.out16 || !PERSIST)) {
            if (cv.out16)
                hn_conv_staged_epilogue<EPI, T, BM, BN, CONSUMERS, WN / 8>(blk, acc, M, N, cv, wm, wn, lane, staged,
                                                                            EPI == 1 ? sums : nullptr);
            else if constexpr (!PERSIST)
                hn_conv_staged_epilogue<EPI, float, BM, BN, CONSUMERS, WN / 8>(blk, acc, M, N, cv, wm, wn, lane,
                                                                                reinterpret_cast<float*>(staged));
        } else {
            hn_conv_epilogue<EPI, 1, WN / 8>(blk, acc, M, N, cv, wm, wn, lane);
        }
    };
    hn_tma_loop<STAGES, CONSUMERS, WN, 0>(smem, count, K / BK, 2u * (EA + EB), copy, sa + gm * 64 * BK, EA,
                                          sb + gn * WN * BK, EB, 16, [](const T* p) { return hn_wgmma_desc(p); },
                                          epilogue);
}

// The filter gradient's B boxes of the K tile from pixel k0 (hn_convt_filter): BN / 64 im2col boxes of x (bmap: 64
// pixels x 64 channels) into the stage at sb, column block j the tap (r, s) and channels c0 .. c0 + 63 of column n0 +
// 64 j (past N: column 0, any tap, never written), completing on bar.
template <int BN>
__device__ __forceinline__ void hn_convt_filter_x_boxes(unsigned short* sb, const HnTensorMap& bmap, int n0, int N,
                                                        int k0, const HnConv& cv, void* bar) {
    const int plane = cv.p * cv.q, img = k0 / plane, pq = k0 - img * plane, p0 = pq / cv.q,
              w0 = (pq - p0 * cv.q) * cv.stride - cv.pad, h0 = p0 * cv.stride - cv.pad;
#pragma unroll
    for (int j = 0; j < BN / 64; ++j) {
        const int n = n0 + 64 * j < N ? n0 + 64 * j : 0;
        const int rs = n / cv.c, r = rs / cv.s;
        hn_tma_im2col4d(sb + j * 4096, bmap, n - rs * cv.c, w0, h0, img, rs - r * cv.s, r, bar);
    }
}

// The filter gradient of hn_conv16w_filter fed by TMA: C[M = O, N = R S C] += A[M, K] B[K, N] over K = images x P x
// Q (the block's part, kbeg .. kend, whole K tiles of 64), A = dy [k][o] and B = x gathered [k][(r, s, c)], both
// MN-major in blocks of 64 k rows x 64 columns (HnSwizzle128MN). Per K tile the producer issues BM / 64 boxes of dy
// (amap: the 2D tensor [n P Q][O], boxes of 64 o x 64 k) and BN / 64 im2col boxes of x (bmap: 64 pixels x 64
// channels), each box one block: column block j of B is the tap (r, s) and channels c0 .. c0 + 63 of column n0 + 64 j
// (C a multiple of 64), read at the K tile's 64 pixels. Rows past the last pixel are zeros; a part's boxes never
// reach another part's pixels. Shared memory as hn_convt_fwd's.
template <int WGM, int WGN, int WN, int STAGES>
__device__ __forceinline__ void hn_convt_filter(unsigned char* smem, const HnTensorMap& amap, const HnTensorMap& bmap,
                                                float* dw, int M, int N, int K, int splits, int kchunk,
                                                const HnConv& cv) {
    using T = unsigned short;
    constexpr int CONSUMERS = 128 * WGM * WGN, BM = 64 * WGM, BN = WN * WGN, BK = 64, EA = BM * BK, EB = BN * BK;
    static_assert(STAGES >= 2 && WN % 64 == 0, "64-column blocks");
    T* sa = reinterpret_cast<T*>(hn_smem_align1024(smem + 16 * STAGES));
    T* sb = sa + STAGES * EA;
    const HnBlock blk = hn_block(nullptr, nullptr, dw, M, N, K, 0, 0, N, 0, 0, 0, 1.f, 1.f, splits, kchunk, BM, BN, BK);
    const int tid = threadIdx.x, gm = tid / 128 / WGN, gn = tid / 128 % WGN;
    auto copy = [&](int, int kt, int s, void* bar) {
        const int k0 = blk.kbeg + kt * BK;
#pragma unroll
        for (int j = 0; j < BM / 64; ++j) hn_tma_tile2d(sa + s * EA + j * 4096, amap, blk.m0 + 64 * j, k0, bar);
        hn_convt_filter_x_boxes<BN>(sb + s * EB, bmap, blk.n0, N, k0, cv, bar);
    };
    // a warpgroup's columns start 64 gm (A) and WN gn (B) columns in: whole blocks of 64 x 64 (HnSwizzle128MN)
    hn_tma_loop<STAGES, CONSUMERS, WN, 1>(
        smem, 1, blk.tiles, 2u * (EA + EB), copy, sa + gm * 64 * BK, EA, sb + gn * WN * BK, EB, 16 * 64,
        [](const T* p) { return hn_wgmma_desc_mn(p); }, [&](int, float(&acc)[1][WN / 8][4]) {
            hn_epilogue<1, WN / 8>(blk, acc, M, N, N, 1.f, 1.f, 64 * gm + 16 * ((tid >> 5) & 3), WN * gn, tid & 31);
        });
}

// HN_CONV16T(hn_conv16_fwd_w128x256s4t, 1, 2, 1, 256, 4, 1, 0): HN_CONV16W's forward (EPI 1), data gradient (EPI 2),
// filter gradient (EPI 3) or pooled forward (EPI 4, its N the convolution's output pixels in rows), its arguments
// followed by sums (hn_convt_fwd's; null for the gradients) and the two tensor maps (the weights' and the input's for
// EPI 1, 2 and 4, dy's and x's for EPI 3), on hn_convt_fwd (PERSIST 1: persistent) or hn_convt_filter: WGM x WGN
// consumer warpgroups and a producer warp, 128 WGM WGN + 32 threads, MINB blocks an SM; shared memory HN_CONV16W's,
// 16 ST bytes of mbarriers and, PERSIST, the staged epilogue's tile (mma_tiles.TmaTile.staged_tile_bytes).
#define HN_CONV16T(name, EPI, WGM, WGN, WN, ST, MINB, PERSIST)                                                    \
    extern "C" __global__ void __launch_bounds__(128 * WGM * WGN + 32, MINB) name(                              \
        const unsigned short* __restrict__ B, const unsigned short* __restrict__ Wt, const float* __restrict__ AUX,  \
        float* __restrict__ Y, int M, int N, int K, int C, int H, int W, int R, int S, int P, int Q, int O,         \
        int stride, int pad, int act, int splits, int kchunk, double* __restrict__ sums,                          \
        const __grid_constant__ HnTensorMap amap, const __grid_constant__ HnTensorMap bmap) {                    \
        HN_DYNAMIC_SMEM(hn_smem);                                                                              \
        const HnConv cv = hn_conv16_of<EPI>(AUX, C, H, W, R, S, P, Q, O, stride, pad, act, kchunk);            \
        static_assert(EPI != 3 || !PERSIST, "the filter gradient's parts are its blocks");                      \
        if constexpr (EPI == 3)                                                                                \
            hn_convt_filter<WGM, WGN, WN, ST>(hn_smem, amap, bmap, Y, M, N, K, splits, kchunk, cv);             \
        else                                                                                                   \
            hn_convt_fwd<EPI, WGM, WGN, WN, ST, PERSIST>(hn_smem, amap, bmap, Y, M, N, K, cv, sums);           \
    }

// The hardware's im2col copy on its own, for its test (tests/test_tma_conv.py): one box of `rows` pixels x 64 channels
// from (c, w, h, n) at tap (s, r) into shared memory, written out as it lies there (swizzled) to out[rows][64].
extern "C" __global__ void hn_tma_probe(const __grid_constant__ HnTensorMap map, unsigned short* out, int rows,
                                        int c, int w, int h, int n, int s, int r) {
    HN_DYNAMIC_SMEM(hn_smem);
    unsigned long long* bar = reinterpret_cast<unsigned long long*>(hn_smem);
    unsigned short* tile = reinterpret_cast<unsigned short*>(hn_smem_align1024(hn_smem + 16));
    if (threadIdx.x == 0) {
        hn_mbar_init(bar, 1);
        hn_fence_mbar_init();
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        hn_mbar_arrive_tx(bar, rows * 128u);
        hn_tma_im2col4d(tile, map, c, w, h, n, s, r, bar);
    }
    while (!hn_mbar_try_wait(bar, 0)) {}
    for (int i = threadIdx.x; i < rows * 64; i += blockDim.x) out[i] = tile[i];
}

// --- entry points ---------------------------------------------------------------------------------------------------

// HN_GEMM(hn_gemm_tf32_nn_128x128x32s3, hn_gemm_tf32, false, false, 128, 128, 32, 64, 32, 3, 1) defines the
// kernel hn_gemm_tf32_nn_128x128x32s3 with body hn_gemm_tf32: name, body, TA, TB, block tile BM x BN x BK, warp
// tile WM x WN, stages, blocks per SM for __launch_bounds__. mma_tiles.py writes these lines from its table (TILES)
// and mma.py launches (BM/WM)(BN/WN) warps with the table's smem_bytes of dynamic shared memory.
#define HN_GEMM(name, body, TA, TB, BM, BN, BK, WM, WN, ST, MINB)                                              \
    extern "C" __global__ void __launch_bounds__(32 * (BM / WM) * (BN / WN), MINB) name(HN_GEMM_PARAMS) {        \
        HN_DYNAMIC_SMEM(hn_smem);                                                                              \
        body<TA, TB, BM, BN, BK, WM, WN, ST>(hn_smem, HN_GEMM_ARGS);                                           \
    }

// HN_CONV(hn_conv_fwd_bf16_128x128x32s3a, hn_conv_bf16_a, 1, 128, 128, 32, 64, 32, 3, 1): a convolution kernel on a
// tile of mma_tiles.CONV_TILES, MODE 1 (the forward, y = act(conv(x, w) + b): B = x, AUX = b, Y = y), 2 (the data
// gradient, dx = conv_backward_data(dy, w) * (relu_x > 0): B = dy, AUX = relu_x, Y = dx) or 3 (the filter gradient,
// dw += conv_backward_filter(dy, x): Wt = dy, B = x, Y = dw); every tensor contiguous; GEMM sizes M, N, K as above.
// Grid as the GEMM's: K in `splits` parts of `kchunk` over blockIdx.z (MODE 3; 1 and K otherwise).
#define HN_CONV_PARAMS                                                                                              \
    const float *__restrict__ B, const float *__restrict__ Wt, const float *__restrict__ AUX, float *__restrict__ Y, \
        int M, int N, int K, int C, int H, int W, int R, int S, int P, int Q, int O, int stride, int pad, int act,  \
        int splits, int kchunk
#define HN_CONV(name, body, MODE, BM, BN, BK, WM, WN, ST, MINB)                                                   \
    extern "C" __global__ void __launch_bounds__(32 * (BM / WM) * (BN / WN), MINB) name(HN_CONV_PARAMS) {        \
        HN_DYNAMIC_SMEM(hn_smem);                                                                              \
        const HnConv cv = hn_conv_of<MODE>(AUX, C, H, W, R, S, P, Q, O, stride, pad, act);                      \
        body<MODE, BM, BN, BK, WM, WN, ST>(hn_smem, Wt, B, Y, M, N, K, K, 0, MODE == 3 ? N : 0, 0, 0, 0, 1.f,     \
                                           MODE == 3 ? 1.f : 0.f, splits, kchunk, cv);                            \
    }

// HN_CONV16(hn_conv16_fwd_128x128x32s4b2, 1, 128, 128, 32, 64, 32, 4, 2): a channels-last bf16 convolution on a tile of
// mma_tiles.TILES16, with HN_CONV's parameters but B and Wt bf16 bits: EPI 1, the forward (B = x [n][H][W][C],
// Wt = w [O][R][S][C], AUX = b, Y = y [n][O][P][Q]); EPI 2, the stride-1 data gradient as that forward (B = dy
// [n][P][Q][O], Wt = the turned weights [C][R][S][O], AUX = relu_x or null, Y = dx; sizes as the forward's over dy);
// EPI 3, the filter gradient (B = x [n][H][W][C], Wt = dy [n][P][Q][O], Y = dw [O][R][S][C] added into, K in
// `splits` parts of `kchunk` over blockIdx.z); EPI 4, the pooled forward (the forward's arguments with P, Q the pooled
// sizes, N = 16 ceil(kchunk / 4), kchunk = the pooled outputs n x P x Q, Y = y [n][O][P][Q] followed by its argmax
// bytes). Shared memory STAGES x (BM + BN) x (BK + 8) x 2 bytes.
#define HN_CONV16(name, EPI, BM, BN, BK, WM, WN, ST, MINB)                                                        \
    extern "C" __global__ void __launch_bounds__(32 * (BM / WM) * (BN / WN), MINB) name(                         \
        const unsigned short* __restrict__ B, const unsigned short* __restrict__ Wt, const float* __restrict__ AUX,  \
        float* __restrict__ Y, int M, int N, int K, int C, int H, int W, int R, int S, int P, int Q, int O,         \
        int stride, int pad, int act, int splits, int kchunk) {                                                   \
        HN_DYNAMIC_SMEM(hn_smem);                                                                              \
        hn_conv16<EPI, BM, BN, BK, WM, WN, ST>(hn_smem, B, Wt, AUX, Y, M, N, K, C, H, W, R, S, P, Q, O, stride,    \
                                               pad, act, splits, kchunk);                                       \
    }

// HN_CONV16W(hn_conv16_fwd_w128x256s4, 1, 2, 1, 256, 4, 1): HN_CONV16's forward (EPI 1), data gradient (EPI 2),
// filter gradient (EPI 3) or pooled forward (EPI 4) with its arguments, on wgmma (hn_convw_fwd, hn_conv16w_filter:
// WGM x WGN warpgroups of 64 x WN each, block tile 64 WGM x WN WGN x 64, ST buffers, MINB blocks per SM for
// __launch_bounds__); 128 WGM WGN threads, shared memory ST x (64 WGM + WN WGN) x 64 x 2 + 1024 bytes (the 1024-byte
// alignment of the swizzled tiles).
#define HN_CONV16W(name, EPI, WGM, WGN, WN, ST, MINB)                                                             \
    extern "C" __global__ void __launch_bounds__(128 * WGM * WGN, MINB) name(                                  \
        const unsigned short* __restrict__ B, const unsigned short* __restrict__ Wt, const float* __restrict__ AUX,  \
        float* __restrict__ Y, int M, int N, int K, int C, int H, int W, int R, int S, int P, int Q, int O,         \
        int stride, int pad, int act, int splits, int kchunk) {                                                   \
        HN_DYNAMIC_SMEM(hn_smem);                                                                              \
        const HnConv cv = hn_conv16_of<EPI>(AUX, C, H, W, R, S, P, Q, O, stride, pad, act, kchunk);            \
        if constexpr (EPI == 3)                                                                                \
            hn_conv16w_filter<WGM, WGN, WN, ST>(hn_smem, Wt, B, Y, M, N, K, splits, kchunk, cv);                \
        else                                                                                                   \
            hn_convw_fwd<unsigned short, EPI, WGM, WGN, WN, ST>(hn_smem, Wt, B, Y, M, N, K, cv);               \
    }

// HN_CONV32W(hn_conv32_fwd_w128x256s4, 1, 2, 1, 256, 4, 1, 0, 1): HN_CONV16W's forward (EPI 1), data gradient (EPI 2)
// or pooled forward (EPI 4) in tf32: B and Wt float32 channels-last copies rounded to tf32 (conv.cu's to_nhwc32,
// turn_weights32), K tiles of 32 (C of the forward, O of the data gradient a multiple of 4). Shared memory ST x (64 WGM
// + WN WGN) x 32 x 4 + 1024 bytes. SPLIT 1: fp32 from split copies (hi + lo tf32, conv.cu's to_nhwc32x3,
// turn_weights32x3), twice the shared memory, three products a K step. INFLIGHT: wgmma groups left pending at the end
// of a K tile (hn_wgmma_loop; 0: the copies one tile further ahead).
#define HN_CONV32W(name, EPI, WGM, WGN, WN, ST, MINB, SPLIT, INFLIGHT)                                            \
    extern "C" __global__ void __launch_bounds__(128 * WGM * WGN, MINB) name(                                  \
        const float* __restrict__ B, const float* __restrict__ Wt, const float* __restrict__ AUX,                 \
        float* __restrict__ Y, int M, int N, int K, int C, int H, int W, int R, int S, int P, int Q, int O,         \
        int stride, int pad, int act, int splits, int kchunk) {                                                   \
        HN_DYNAMIC_SMEM(hn_smem);                                                                              \
        const HnConv cv = hn_conv16_of<EPI>(AUX, C, H, W, R, S, P, Q, O, stride, pad, act, kchunk);            \
        hn_convw_fwd<float, EPI, WGM, WGN, WN, ST, SPLIT, INFLIGHT>(hn_smem, Wt, B, Y, M, N, K, cv);             \
    }

// HN_CONV32F(hn_conv32_filter_128x128x32s3, 128, 128, 32, 64, 32, 3, 1, 0): HN_CONV16's filter gradient (EPI 3) in
// tf32 on mma.sync (hn_conv_filter_sync: B = x, Wt = dy float32 channels-last copies rounded to tf32, Y = dw [O][R][S][C]
// added into). Shared memory ST x ((BM + 8) + (BN + 8)) x BK x 4 bytes; SPLIT 1 (fp32 from split copies) twice that.
#define HN_CONV32F(name, BM, BN, BK, WM, WN, ST, MINB, SPLIT)                                                     \
    extern "C" __global__ void __launch_bounds__(32 * (BM / WM) * (BN / WN), MINB) name(                         \
        const float* __restrict__ B, const float* __restrict__ Wt, const float* __restrict__ AUX,                 \
        float* __restrict__ Y, int M, int N, int K, int C, int H, int W, int R, int S, int P, int Q, int O,         \
        int stride, int pad, int act, int splits, int kchunk) {                                                   \
        HN_DYNAMIC_SMEM(hn_smem);                                                                              \
        const HnConv cv = hn_conv_of<3>(AUX, C, H, W, R, S, P, Q, O, stride, pad, act);                         \
        hn_conv_filter_sync<float, BM, BN, BK, WM, WN, ST, SPLIT>(hn_smem, Wt, B, Y, M, N, K, splits, kchunk, cv); \
    }

// HN_CONV32FR(hn_conv32_filter_w128x128s3b2r, 2, 128, 3, 2): the r filter gradient (hn_conv32_filter_fr) with
// HN_CONV32F's arguments but Wt = dyt [O][ldk] (mma.to_nhwc k_major, or mma.dy_t), WGN warpgroups of 64 rows (r, s,
// c) x BM columns o, ST stages, MINB blocks an SM; shared memory ST x (BM + 64 WGN + 8) x 32 x 4 bytes and 1 KB to
// align them.
#define HN_CONV32FR(name, WGN, BM, ST, MINB)                                                                      \
    extern "C" __global__ void __launch_bounds__(128 * WGN, MINB) name(                                          \
        const float* __restrict__ B, const float* __restrict__ Wt, const float* __restrict__ AUX,                 \
        float* __restrict__ Y, int M, int N, int K, int C, int H, int W, int R, int S, int P, int Q, int O,         \
        int stride, int pad, int act, int splits, int kchunk) {                                                   \
        HN_DYNAMIC_SMEM(hn_smem);                                                                              \
        const HnConv cv = hn_conv_of<3>(AUX, C, H, W, R, S, P, Q, O, stride, pad, act);                         \
        hn_conv32_filter_fr<WGN, BM, ST>(hn_smem, Wt, B, Y, M, N, K, splits, kchunk, cv);                       \
    }

// --- a small convolution on bf16 tensor cores: the first layer of an image model at bf16 (conv.py's "small_tc") ------
// The convolutions conv.cu's conv_small_fwd takes (C R S <= 32 taps a pixel, K <= 64 outputs), cifar-wide's 3 -> 64 at
// 3 x 3, from x and w rounded to bf16 (as autocast rounds a convolution's inputs), sums in float32, on mma.sync
// m16n8k16. Their bound is the bytes they move, not their few multiply-adds.
//
// conv_small_fwd_tc: y = act(conv2d(x, w) + b): x [n][C][H][W], w [K][C][R][S], b [K] or null, float32; y = out
// [n][K][P][Q], float32 (out16 = 0) or bf16 bits (out16 = 1). A block's pixels are 128 consecutive output pixels of
// the n * P * Q (img, p, q) (n P Q + 128 <= 2^31), tap j = (c, r, s) in that order. The GEMM per block: D [64 k][128
// pixels] = W [64][32] X^T [32][128], K = 32 taps (zero for j >= CRS, and weights zero for k >= K), both operands
// staged in shared memory as bf16 rows of 32 taps (ws[k][j], xs[pixel][j], rows padded to 40 so that a fragment's rows
// fall in different banks). Warp w: rows 16 (w % 4) .. + 15, pixels 64 (w / 4) .. + 63: eight m16n8k16 tiles, two K
// steps. The outputs go through shared memory (ys[k][pixel], float32, over the staged operands once the products are
// done) so that each thread stores 4 consecutive pixels of one channel: one 16-byte (float32) or 8-byte (bf16) store
// where they are 4-aligned in one image (P Q a multiple of 4), else one at a time. act: 1 ReLU (kernels.py's ACTS).
// sums (null: none), zeroed HN_SUMS_COPIES copies of 2 K doubles and the count (above): in the block's copy
// (blockIdx.x modulo HN_SUMS_COPIES) [k] += the sum of channel k's outputs as stored (bf16 values with out16),
// [K + k] += the sum of their squares; the count n P Q after the copies: the batch norm's statistics of y (norm.py:
// bn_stats_synced), added in double after the stores: a thread's 32 pixels of one channel, then the channel's four
// quarters through shared memory, one atomic add a block and channel. Grid ceil(n P Q / 128), 256 threads,
// HN_SMALL_TC_SMEM bytes of dynamic shared memory.
#define HN_SMALL_TC_ROW 40       // bf16 elements a staged row: 32 taps + 8, 80 bytes (a fragment's 8 rows, 8 banks)
#define HN_SMALL_TC_YS 132       // floats a row of ys: 128 pixels + 4 (rows 16-byte aligned)
#define HN_SMALL_TC_SMEM (64 * HN_SMALL_TC_YS * 4)      // dynamic shared memory a block: ys (ws and xs before it)

extern "C" __global__ void __launch_bounds__(256) conv_small_fwd_tc(const float* __restrict__ x,
                                                                    const float* __restrict__ w,
                                                                    const float* __restrict__ b, void* __restrict__ out,
                                                                    int n, int C, int H, int W, int K, int R, int S,
                                                                    int stride, int pad, int P, int Q, int act,
                                                                    int out16, double* __restrict__ sums) {
    HN_DYNAMIC_SMEM(hn_smem);                                       // HN_SMALL_TC_SMEM bytes: ws and xs, then ys
    float* smem = reinterpret_cast<float*>(hn_smem);
    unsigned short* ws = reinterpret_cast<unsigned short*>(smem);   // [64][ROW]
    unsigned short* xs = ws + 64 * HN_SMALL_TC_ROW;                  // [128][ROW]
    float* ys = smem;                                               // [64][YS]
    int* taps = reinterpret_cast<int*>(xs + 128 * HN_SMALL_TC_ROW);   // [32][4], after xs
    const int tid = threadIdx.x, RS = R * S, CRS = C * RS, PQ = P * Q, NP = n * PQ, p0 = blockIdx.x * 128;
    // the taps j < 32 as x's offset of (c, r, s) from a pixel's window (c H + r) W + s, r and s (r = -2^29 for j >=
    // C R S: no row in range)
    if (tid < 32) {
        const int c = tid / RS, r = (tid - c * RS) / S, s = tid - c * RS - r * S;
        hn_sts4(taps + 4 * tid, static_cast<unsigned>(tid < CRS ? (c * H + r) * W + s : 0),
                static_cast<unsigned>(tid < CRS ? r : -(1 << 29)), static_cast<unsigned>(s), 0u);
    }
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
    __syncthreads();                                  // (the taps written)
    {
        const int pl = tid & 127, j0 = 16 * (tid >> 7), pix = p0 + pl;
        const bool in = pix < NP;
        const int img = in ? pix / PQ : 0, pq = in ? pix - img * PQ : 0, p = pq / Q, q = pq - p * Q;
        const int h0 = p * stride - pad, w0 = q * stride - pad, hw0 = h0 * W + w0;
        const int hb = in ? h0 : -(1 << 29);           // the window's first row (past the pixels: none in range)
        const float* xi = x + static_cast<long long>(img) * C * H * W;    // (C H W < 2^31: small_tc_fits)
        float v[16];
#pragma unroll
        for (int u = 0; u < 16; ++u) {
            const float4 tp = hn_lds4(reinterpret_cast<const float*>(taps + 4 * (j0 + u)));   // (a broadcast)
            const int off = static_cast<int>(hn_bits(tp.x)), ih = hb + static_cast<int>(hn_bits(tp.y)),
                      iw = w0 + static_cast<int>(hn_bits(tp.z));
            const bool ok = static_cast<unsigned>(ih) < static_cast<unsigned>(H) &&
                            static_cast<unsigned>(iw) < static_cast<unsigned>(W);
            v[u] = ok ? xi[off + hw0] : 0.f;
        }
#pragma unroll
        for (int u = 0; u < 16; u += 8)
            hn_sts4(xs + pl * HN_SMALL_TC_ROW + j0 + u, hn_pack_bf16x2(v[u], v[u + 1]),
                    hn_pack_bf16x2(v[u + 2], v[u + 3]), hn_pack_bf16x2(v[u + 4], v[u + 5]),
                    hn_pack_bf16x2(v[u + 6], v[u + 7]));
    }
    __syncthreads();
    // products: fragments by ldmatrix as the bf16 tiles above read them (A: rows m0 + lane % 16, taps kk + 8 (lane /
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
    // channel k's outputs at pixels pl .. pl + 3 of the block as stored: + bias, then the activation
    auto outputs = [&](int k, int pl, float (&v)[4]) {
        const float bias = b ? b[k] : 0.f;
        const float4 d = hn_lds4(ys + k * HN_SMALL_TC_YS + pl);
        v[0] = d.x + bias;
        v[1] = d.y + bias;
        v[2] = d.z + bias;
        v[3] = d.w + bias;
#pragma unroll
        for (int e = 0; e < 4; ++e)
            if (act == 1) v[e] = v[e] > 0.f ? v[e] : 0.f;
    };
    // stores: thread t channel k = t / 32 + 8 i (one channel a warp), pixels 4 (t % 32) .. + 3, for i < 8
    const int pl = 4 * (tid & 31), pix = p0 + pl, img = pix < NP ? pix / PQ : 0;
    const long long base = static_cast<long long>(img) * K * PQ + (pix - img * PQ);   // y's offset of channel 0
    const bool vec = PQ % 4 == 0 && pix + 3 < NP;         // 4 pixels of one image, 4-aligned
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const int k = (tid >> 5) + 8 * i;
        if (k >= K) continue;                         // (the whole warp)
        float v[4];
        outputs(k, pl, v);
        if (pix >= NP) continue;
        const long long at = base + static_cast<long long>(k) * PQ;
        if (vec) {
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
    if (sums) {
        // the batch norm's sums: thread t adds channel k = t % 64's outputs at pixels 32 (t / 64) .. + 31 as stored
        // (a warp's lanes 32 channels: their 16-byte reads of ys in distinct banks), then the four quarters of a
        // channel meet in shared memory (over ys, once every thread has read it) and thread k adds them into the
        // block's copy
        const int k = tid & 63, q = tid >> 6;
        double s = 0.0, ss = 0.0;
        if (k < K) {
#pragma unroll 2
            for (int j = 32 * q; j < 32 * q + 32; j += 4) {
                float v[4];
                outputs(k, j, v);
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    if (p0 + j + e >= NP) continue;
                    const double r = out16 ? hn_bf16_value(hn_bf16_of(v[e])) : v[e];
                    s += r;
                    ss += r * r;
                }
            }
        }
        __syncthreads();                              // (every thread done with ys)
        double* quarter = reinterpret_cast<double*>(smem);              // [4][64][2]
        quarter[2 * tid] = s;
        quarter[2 * tid + 1] = ss;
        __syncthreads();
        if (tid < K) {
            double* copy = hn_sums_copy(sums, K, blockIdx.x);
            atomicAdd(copy + tid, quarter[2 * tid] + quarter[2 * (tid + 64)] + quarter[2 * (tid + 128)] +
                                      quarter[2 * (tid + 192)]);
            atomicAdd(copy + K + tid, quarter[2 * tid + 1] + quarter[2 * (tid + 64) + 1] +
                                          quarter[2 * (tid + 128) + 1] + quarter[2 * (tid + 192) + 1]);
        }
    }
    if (sums && blockIdx.x == 0 && tid == 0) *hn_sums_count(sums, K) = static_cast<double>(NP);
}

// conv_small_filter_tc: the filter gradient of the same convolutions, part[block][k][j] = the sum over the block's
// pixels of dy[img][k][p][q] * tap j of x at (img, p, q), dy and x rounded to bf16 (a bf16 step's gradient and input),
// sums in float32; conv_small_filter_tc_add then adds the blocks' parts into dw in block order: deterministic. Blocks
// take 128 pixels at a time in a grid-stride loop over the n P Q. Per 128 pixels the GEMM D [64 k][32 j] += dy^T
// [64][128] X [128][32], K = the pixels: dy^T staged as ds[k][pixel], the taps as xs[j][pixel] (bf16 rows of 128
// pixels, padded to 136: ldmatrix's 8 rows in different banks); warp w takes taps 16 (w % 2) .. + 15 over pixels 32
// (w / 2) .. + 31 (8 tiles of D, 32 float32 sums a thread), and the four warps of each half of the taps add their sums
// in warp order through shared memory at the end. A thread loads the next 128 pixels' dy and x into registers (a
// HnSmallFilterTile) before the products of these: the loads of one tile are in flight while the block multiplies the
// last. dy [n][K][P][Q] float32, or its bf16 bits in conv_small_filter_tc_dy16 (the batch norm's hand-over,
// conv.Nchw16: the same bf16 values the float32 version rounds to), x [n][C][H][W] float32; K <= 64, C R S <= 32,
// C H W < 2^31; part [blocks][64][32]. 256 threads, HN_SMALL_TC_FSMEM bytes of dynamic shared memory.
#define HN_SMALL_TC_PROW 136                                        // bf16 elements a staged row of pixels
#define HN_SMALL_TC_FSMEM ((64 + 32) * HN_SMALL_TC_PROW * 2)        // dynamic shared memory a block: ds, xs

// Four consecutive pixels of one channel of dy as loaded: float32 (float4) or bf16 bits (uint2, already the staged
// row's layout); one vector where the four are 4-aligned in one image, else one element at a time (zero outside).
__device__ __forceinline__ void hn_small_dy4(const float* dy, const long long (&at)[4], bool vec, float4& v) {
    if (vec) {
        v = hn_ldg4(dy + at[0]);
    } else {
        v.x = at[0] >= 0 ? dy[at[0]] : 0.f;
        v.y = at[1] >= 0 ? dy[at[1]] : 0.f;
        v.z = at[2] >= 0 ? dy[at[2]] : 0.f;
        v.w = at[3] >= 0 ? dy[at[3]] : 0.f;
    }
}
__device__ __forceinline__ void hn_small_dy4(const unsigned short* dy, const long long (&at)[4], bool vec, uint2& v) {
    if (vec) {
        v = *reinterpret_cast<const uint2*>(dy + at[0]);
    } else {
        unsigned e[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) e[i] = at[i] >= 0 ? dy[at[i]] : 0u;
        v = make_uint2(e[0] | e[1] << 16, e[2] | e[3] << 16);
    }
}
__device__ __forceinline__ uint2 hn_small_dy_bf16(const float4& v) {
    return make_uint2(hn_pack_bf16x2(v.x, v.y), hn_pack_bf16x2(v.z, v.w));
}
__device__ __forceinline__ uint2 hn_small_dy_bf16(const uint2& v) { return v; }

// A thread's share of one 128-pixel tile (pixels 4 (t % 32) .. + 3 of it): dy of channels t / 32 + 8 u (u < 8), x of
// taps t / 32 + 8 u (u < 4), as loaded.
template <typename D> struct HnSmallDy4 { using T = float4; };
template <> struct HnSmallDy4<unsigned short> { using T = uint2; };
template <typename D>
struct HnSmallFilterTile {
    typename HnSmallDy4<D>::T dy[8];
    float x[4][4];
};

template <typename D>
__device__ __forceinline__ void hn_small_filter_load(HnSmallFilterTile<D>& f, const D* __restrict__ dy,
                                                     const float* __restrict__ x, int pix, int NP, int P, int Q,
                                                     int K, int C, int H, int W, int stride, int pad,
                                                     const int (&tc)[4], const int (&tr)[4], const int (&ts)[4]) {
    // the four pixels' (img, p, q): the first by division, the next three stepped along q, p, img
    const int PQ = P * Q;
    int img = pix < NP ? pix / PQ : 0, pq = pix - img * PQ, p = pq / Q, q = pq - p * Q;
    long long at[4], xo[4];                               // dy's offset of pixel e at channel 0 (-1 outside), x's
    int h0[4], w0[4];                                     // the window's top-left
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        const bool in = pix + e < NP;
        at[e] = in ? static_cast<long long>(img) * K * PQ + p * Q + q : -1;
        xo[e] = static_cast<long long>(img) * C * H * W;
        h0[e] = in ? p * stride - pad : -(1 << 30);      // (outside: every tap's row out of range)
        w0[e] = q * stride - pad;
        if (++q == Q) {
            q = 0;
            if (++p == P) p = 0, ++img;
        }
    }
    const bool vec = PQ % 4 == 0 && pix + 3 < NP;
#pragma unroll
    for (int u = 0; u < 8; ++u) {
        const int k = (threadIdx.x >> 5) + 8 * u;
        long long a[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) a[e] = at[e] >= 0 && k < K ? at[e] + static_cast<long long>(k) * PQ : -1;
        hn_small_dy4(dy, a, vec && k < K, f.dy[u]);
    }
#pragma unroll
    for (int u = 0; u < 4; ++u)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int ih = h0[e] + tr[u], iw = w0[e] + ts[u];
            const bool ok = tc[u] < C && static_cast<unsigned>(ih) < static_cast<unsigned>(H) &&
                            static_cast<unsigned>(iw) < static_cast<unsigned>(W);
            f.x[u][e] = ok ? x[xo[e] + (tc[u] * H + ih) * W + iw] : 0.f;
        }
}

template <typename D>
__device__ __forceinline__ void hn_conv_small_filter_tc(unsigned char* hn_smem, const D* __restrict__ dy,
                                                        const float* __restrict__ x, float* __restrict__ part, int n,
                                                        int C, int H, int W, int K, int R, int S, int stride, int pad,
                                                        int P, int Q) {
    unsigned short* ds = reinterpret_cast<unsigned short*>(hn_smem);   // [64][PROW]
    unsigned short* xs = ds + 64 * HN_SMALL_TC_PROW;                    // [32][PROW]
    float* red = reinterpret_cast<float*>(hn_smem);                     // [64][32], over ds once the products end
    const int tid = threadIdx.x, RS = R * S, CRS = C * RS, PQ = P * Q, NP = n * PQ;
    const int warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3, quad = 4 * (tid & 31);
    const int half = warp & 1;                            // this warp's taps 16 half .. + 15: D's tiles 2 half, + 1
    int tc[4], tr[4], ts[4];                              // this thread's taps t / 32 + 8 u as (c, r, s); c = C: none
#pragma unroll
    for (int u = 0; u < 4; ++u) {
        const int j = (tid >> 5) + 8 * u, c = j / RS, rs = j - c * RS;
        tc[u] = j < CRS ? c : C;
        tr[u] = rs / S;
        ts[u] = rs - tr[u] * S;
    }
    float acc[4][2][4] = {};
    HnSmallFilterTile<D> f;
    const int step = gridDim.x * 128, first = blockIdx.x * 128;
    if (first < NP)
        hn_small_filter_load(f, dy, x, first + quad, NP, P, Q, K, C, H, W, stride, pad, tc, tr, ts);
    for (int p0 = first; p0 < NP; p0 += step) {
        const bool more = step < NP - p0;                 // a next tile (p0 + step may pass 2^31)
        // stage this tile from the registers, then load the next one's while the products run
#pragma unroll
        for (int u = 0; u < 8; ++u) {
            const uint2 d = hn_small_dy_bf16(f.dy[u]);
            hn_sts2(ds + ((tid >> 5) + 8 * u) * HN_SMALL_TC_PROW + quad, d.x, d.y);
        }
#pragma unroll
        for (int u = 0; u < 4; ++u)
            hn_sts2(xs + ((tid >> 5) + 8 * u) * HN_SMALL_TC_PROW + quad, hn_pack_bf16x2(f.x[u][0], f.x[u][1]),
                    hn_pack_bf16x2(f.x[u][2], f.x[u][3]));
        __syncthreads();
        if (more)
            hn_small_filter_load(f, dy, x, p0 + step + quad, NP, P, Q, K, C, H, W, stride, pad, tc, tr, ts);
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
        if (!more) break;
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
extern "C" __global__ void __launch_bounds__(256, 2) conv_small_filter_tc(const float* __restrict__ dy,
                                                                       const float* __restrict__ x,
                                                                       float* __restrict__ part, int n, int C, int H,
                                                                       int W, int K, int R, int S, int stride,
                                                                       int pad, int P, int Q) {
    HN_DYNAMIC_SMEM(hn_smem);
    hn_conv_small_filter_tc(hn_smem, dy, x, part, n, C, H, W, K, R, S, stride, pad, P, Q);
}
extern "C" __global__ void __launch_bounds__(256, 2) conv_small_filter_tc_dy16(const unsigned short* __restrict__ dy,
                                                                            const float* __restrict__ x,
                                                                            float* __restrict__ part, int n, int C,
                                                                            int H, int W, int K, int R, int S,
                                                                            int stride, int pad, int P, int Q) {
    HN_DYNAMIC_SMEM(hn_smem);
    hn_conv_small_filter_tc(hn_smem, dy, x, part, n, C, H, W, K, R, S, stride, pad, P, Q);
}

// dw[k][j] += the sum of the G blocks' parts part[g][k][j] in block order (conv_small_filter_tc's), k < K, j < CRS.
extern "C" __global__ void conv_small_filter_tc_add(const float* __restrict__ part, float* __restrict__ dw, int G,
                                                    int K, int CRS) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x, k = i / 32, j = i - k * 32;
    if (k >= K || j >= CRS) return;
    float s = 0.f;
    for (int g = 0; g < G; ++g) s += part[(long long)g * 2048 + i];
    dw[k * CRS + j] += s;
}
