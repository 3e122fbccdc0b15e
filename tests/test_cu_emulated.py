"""Kernels outside mma.cu run on the CPU, compiled as C++ against tests/cuda_emu (each CUDA thread a fiber resumed
in a shuffled order between barriers, over the whole grid): the channels-last copies, conv.cu's to_nhwc16 and
pool_grad_nhwc16 (from float32 or channels-last bf16), to_nhwc32 and pool_grad_nhwc32 (tf32) and norm.cu's bn_apply_nhwc16 and bn_bwd_dx_nhwc16 (with the
store half they share), NumPy's bf16 bits (round to nearest even) of the float32 tensor they stand for -- x, the max
pooling's input gradient, the batch norm's (+ GELU's) output or its input gradient; conv.cu's conv_gelu_nhwc16 and
conv_small_fwd (float32 and bf16 output) and mma.cu's small convolutions on tensor cores (conv_small_fwd_tc,
conv_small_filter_tc); the kernel sandbox's small-convolution variant (conv_small.cu); and common.cuh's HnPlaneWalk, which the batch-norm kernels and channel_sum loop with, each element visited once with its
channel.
Needs g++ (skipped without); no GPU. On a GPU the copies are also checked by tests/test_mma.py's
test_channels_last_copies and test_pool_grad_nhwc16, the walks by every batch-norm test of tests/test_ops.py."""
from __future__ import annotations

import ctypes
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import RTOL_EMULATED
from emu_build import build_emulated
from mma_cases import batch_norm_sums, bf16_bits, bf16_values, dy_t_host, nhwc16, nhwc_copy

from hetnet.backends import reference as ref
from hetnet.backends.cuda import kernels, mma

SANDBOX = Path(__file__).resolve().parent.parent / "benchmarks" / "kernels"

# the two kernels' launches as C entry points; `__shared__` arrays are per block (the emulator runs one block at a
# time), the PTX conversion is the emulator's hn_pack_bf16x2 (the same rounding, same halves), and a vector access
# through a cast pointer is checked for its alignment (hn_vec)
ENTRY = """
extern "C" int emu_to_nhwc16(const float* x, unsigned* y, int n, int C, int HW, int Cp, unsigned seed, char* err,
                             int len) {
    std::string msg = emu::launch({(unsigned)((n * HW + 31) / 32), (unsigned)((Cp + 63) / 64), 1}, {256, 1, 1}, 0,
                                  [=] { to_nhwc16(x, y, n, C, HW, Cp); }, seed);
    snprintf(err, len, "%s", msg.c_str());
    return msg.empty() ? 0 : 1;
}
template <typename I>
__global__ void walk_plane(int* out, int N, int C, int HW, int take) {
    if (!take) {
        for (HnPlaneWalk<I> w(N, C, HW, blockIdx.x); w.more(); w.next()) out[w.idx] += 1 + (int)blockIdx.x;
        return;
    }
    for (HnPlaneWalk<I> w(N, C, HW, blockIdx.x); w.more();) {
        I at[3];
        bool ok[3];
        w.take(at, ok);
        for (int u = 0; u < 3; ++u)
            if (ok[u]) out[at[u]] += 1 + (int)blockIdx.x;
    }
}
// out[e] += 1 + the channel of element e of [N, C, HW], as the plane walk finds it (grid (C, blocks)), wide: the
// 64-bit index version; take: in steps of 3 (take<3>), as the batch-norm kernels walk, else one element a step.
extern "C" int emu_walk(int wide, int take, int* out, int N, int C, int HW, unsigned blocks, unsigned threads,
                        unsigned seed, char* err, int len) {
    std::string msg = emu::launch({(unsigned)C, blocks, 1}, {threads, 1, 1}, 0, [=] {
        wide ? walk_plane<long long>(out, N, C, HW, take) : walk_plane<unsigned>(out, N, C, HW, take);
    }, seed);
    snprintf(err, len, "%s", msg.c_str());
    return msg.empty() ? 0 : 1;
}
// x16: x is bf16 bits (the "_x16" kernels), else float32; vec: the 16-byte vector versions (bn_apply_nhwc16v, tiles
// of 64 pixels)
extern "C" int emu_bn_apply16(const void* x, int x16, void* y, const float* mean, const float* var,
                               const float* gamma, const float* beta, int n, int C, int HW, float eps, int act,
                               int vec, unsigned seed, char* err, int len) {
    const unsigned px = (vec ? 64 : 32) * HN_NHWC16_TILES;
    std::string msg = emu::launch({(unsigned)((n * HW + px - 1) / px), (unsigned)((C + 63) / 64), 1}, {256, 1, 1}, 0,
                                  [=] {
        const unsigned short* xb = static_cast<const unsigned short*>(x);
        const float* xf = static_cast<const float*>(x);
        unsigned short* yv = static_cast<unsigned short*>(y);
        unsigned* yp = static_cast<unsigned*>(y);
        if (vec && x16) bn_apply_nhwc16v_x16(xb, yv, mean, var, gamma, beta, n, C, HW, eps, act);
        else if (vec) bn_apply_nhwc16v(xf, yv, mean, var, gamma, beta, n, C, HW, eps, act);
        else if (x16) bn_apply_nhwc16_x16(xb, yp, mean, var, gamma, beta, n, C, HW, eps, act);
        else bn_apply_nhwc16(xf, yp, mean, var, gamma, beta, n, C, HW, eps, act);
    }, seed);
    snprintf(err, len, "%s", msg.c_str());
    return msg.empty() ? 0 : 1;
}
// bn_apply_nhwc32: the tf32 copy, float32 [n][HW][C]
extern "C" int emu_bn_apply32(const float* x, float* y, const float* mean, const float* var, const float* gamma,
                               const float* beta, int n, int C, int HW, float eps, int act, unsigned seed, char* err,
                               int len) {
    const unsigned px = 32 * HN_NHWC16_TILES;
    std::string msg = emu::launch({(unsigned)((n * HW + px - 1) / px), (unsigned)((C + 63) / 64), 1}, {256, 1, 1}, 0,
                                  [=] { bn_apply_nhwc32(x, y, mean, var, gamma, beta, n, C, HW, eps, act); }, seed);
    snprintf(err, len, "%s", msg.c_str());
    return msg.empty() ? 0 : 1;
}
// dy16, x16: dy, x as bf16 bits (the "_dy16", "_x16" kernels); vec as emu_bn_apply16's
extern "C" int emu_bn_bwd_dx16(const void* dy, int dy16, const void* x, int x16, const float* mean, const float* var,
                                const float* gamma, const float* beta, const float* red, void* dx, int n, int C,
                                int HW, float eps, int act, int vec, unsigned seed, char* err, int len) {
    const unsigned px = (vec ? 64 : 32) * HN_NHWC16_TILES;
    std::string msg = emu::launch({(unsigned)((n * HW + px - 1) / px), (unsigned)((C + 63) / 64), 1}, {256, 1, 1}, 0,
                                  [=] {
        const unsigned short *xb = static_cast<const unsigned short*>(x), *db = static_cast<const unsigned short*>(dy);
        const float *xf = static_cast<const float*>(x), *df = static_cast<const float*>(dy);
        unsigned short* dv = static_cast<unsigned short*>(dx);
        unsigned* dp = static_cast<unsigned*>(dx);
        const int k = 4 * vec + 2 * dy16 + x16;
        if (k == 7) bn_bwd_dx_nhwc16v_x16_dy16(db, xb, mean, var, gamma, beta, red, dv, n, C, HW, eps, act);
        else if (k == 6) bn_bwd_dx_nhwc16v_dy16(db, xf, mean, var, gamma, beta, red, dv, n, C, HW, eps, act);
        else if (k == 5) bn_bwd_dx_nhwc16v_x16(df, xb, mean, var, gamma, beta, red, dv, n, C, HW, eps, act);
        else if (k == 4) bn_bwd_dx_nhwc16v(df, xf, mean, var, gamma, beta, red, dv, n, C, HW, eps, act);
        else if (k == 3) bn_bwd_dx_nhwc16_x16_dy16(db, xb, mean, var, gamma, beta, red, dp, n, C, HW, eps, act);
        else if (k == 2) bn_bwd_dx_nhwc16_dy16(db, xf, mean, var, gamma, beta, red, dp, n, C, HW, eps, act);
        else if (k == 1) bn_bwd_dx_nhwc16_x16(df, xb, mean, var, gamma, beta, red, dp, n, C, HW, eps, act);
        else bn_bwd_dx_nhwc16(df, xf, mean, var, gamma, beta, red, dp, n, C, HW, eps, act);
    }, seed);
    snprintf(err, len, "%s", msg.c_str());
    return msg.empty() ? 0 : 1;
}
// bn_bwd_dx_nhwc32: the tf32 copy, float32 [n][HW][C]; yt (or null): its K-major copy [C][ldk]
extern "C" int emu_bn_bwd_dx32(const float* dy, const float* x, const float* mean, const float* var,
                                const float* gamma, const float* beta, const float* red, float* dx, float* yt, int ldk,
                                int n, int C, int HW, float eps, int act, unsigned seed, char* err, int len) {
    const unsigned px = 32 * HN_NHWC16_TILES;
    std::string msg = emu::launch({(unsigned)((n * HW + px - 1) / px), (unsigned)((C + 63) / 64), 1}, {256, 1, 1}, 0,
                                  [=] {
        bn_bwd_dx_nhwc32(dy, x, mean, var, gamma, beta, red, dx, n, C, HW, eps, act, yt, ldk);
    }, seed);
    snprintf(err, len, "%s", msg.c_str());
    return msg.empty() ? 0 : 1;
}
extern "C" int emu_pool_grad16(const unsigned* dy16, const unsigned char* arg, unsigned* y, int n, int C, int H,
                               int W, int P, int Q, int k, unsigned seed, char* err, int len) {
    std::string msg = emu::launch({(unsigned)((n * P * Q + 31) / 32), (unsigned)((C + 63) / 64), 1},
                                  {256, 1, 1}, 0, [=] { pool_grad16_nhwc16(dy16, arg, y, n, C, H, W, P, Q, k); }, seed);
    snprintf(err, len, "%s", msg.c_str());
    return msg.empty() ? 0 : 1;
}
extern "C" int emu_pool_grad16v(const unsigned short* dy16, const unsigned char* arg, unsigned short* y, int n,
                                int C, int H, int W, int P, int Q, int k, unsigned seed, char* err, int len) {
    std::string msg = emu::launch({(unsigned)((n * P * Q + 63) / 64), (unsigned)((C + 63) / 64), 1},
                                  {256, 1, 1}, 0, [=] { pool_grad16_nhwc16v(dy16, arg, y, n, C, H, W, P, Q, k); },
                                  seed);
    snprintf(err, len, "%s", msg.c_str());
    return msg.empty() ? 0 : 1;
}
extern "C" int emu_conv_gelu(const float* x, const float* w, const float* b, float* z, unsigned* y, int n, int C,
                             int H, int W, int K, int R, int S, int stride, int pad, int P, int Q, unsigned blocks,
                             unsigned seed, char* err, int len) {
    std::string msg = emu::launch({blocks, 1, 1}, {256, 1, 1}, 0, [=] {
        conv_gelu_nhwc16(x, w, b, z, reinterpret_cast<uint4*>(y), n, C, H, W, K, R, S, stride, pad, P, Q);
    }, seed);
    snprintf(err, len, "%s", msg.c_str());
    return msg.empty() ? 0 : 1;
}
// conv_small_fwd on its grid (128 output pixels a block); y float32 [n][K][P][Q], or bf16 bits there (out16)
extern "C" int emu_conv_small(const float* x, const float* w, const float* b, void* y, int n, int C, int H, int W,
                              int K, int R, int S, int stride, int pad, int P, int Q, int act, int out16,
                              unsigned seed, char* err, int len) {
    std::string msg = emu::launch({(unsigned)((n * P * Q + 127) / 128), 1, 1}, {256, 1, 1}, 0, [=] {
        conv_small_fwd(x, w, b, y, n, C, H, W, K, R, S, stride, pad, P, Q, act, out16);
    }, seed);
    snprintf(err, len, "%s", msg.c_str());
    return msg.empty() ? 0 : 1;
}
extern "C" int emu_to_nhwc32(const float* x, float* y, int n, int C, int HW, int Cp, int split, float* yt, int ldk,
                             unsigned seed, char* err, int len) {
    std::string msg = emu::launch({(unsigned)((n * HW + 31) / 32), (unsigned)((Cp + 63) / 64), 1}, {256, 1, 1}, 0,
                                  [=] {
                                      split ? to_nhwc32x3(x, y, n, C, HW, Cp) : to_nhwc32(x, y, n, C, HW, Cp, yt, ldk);
                                  }, seed);
    snprintf(err, len, "%s", msg.c_str());
    return msg.empty() ? 0 : 1;
}
extern "C" int emu_nhwc32_t(const float* x, float* y, int K, int O, int ldk, unsigned seed, char* err, int len) {
    std::string msg = emu::launch({(unsigned)((ldk + 31) / 32), (unsigned)((O + 31) / 32), 1}, {256, 1, 1}, 0,
                                  [=] { nhwc32_t(x, y, K, O, ldk); }, seed);
    snprintf(err, len, "%s", msg.c_str());
    return msg.empty() ? 0 : 1;
}
extern "C" int emu_pool_grad32(const float* dy, const unsigned char* arg, float* y, int n, int C, int H, int W,
                               int P, int Q, int k, int split, float* yt, int ldk, unsigned seed, char* err, int len) {
    std::string msg = emu::launch({(unsigned)((n * H * W + 31) / 32), (unsigned)((C + 63) / 64), 1}, {256, 1, 1}, 0,
                                  [=] {
                                      split ? pool_grad_nhwc32x3(dy, arg, y, n, C, H, W, P, Q, k)
                                            : pool_grad_nhwc32(dy, arg, y, n, C, H, W, P, Q, k, yt, ldk);
                                  }, seed);
    snprintf(err, len, "%s", msg.c_str());
    return msg.empty() ? 0 : 1;
}
extern "C" int emu_pool_grad(const float* dy, const unsigned char* arg, unsigned* y, int n, int C, int H, int W,
                             int P, int Q, int k, unsigned seed, char* err, int len) {
    std::string msg = emu::launch({(unsigned)((n * H * W + 31) / 32), (unsigned)((C + 63) / 64), 1},
                                  {256, 1, 1}, 0, [=] { pool_grad_nhwc16(dy, arg, y, n, C, H, W, P, Q, k); }, seed);
    snprintf(err, len, "%s", msg.c_str());
    return msg.empty() ? 0 : 1;
}
"""


def _kernels_text() -> str:
    """The walks, GELU and hn_store_nhwc16_tile as common.cuh has them; to_nhwc16, pool_grad_nhwc16,
    pool_grad16_nhwc16, conv_gelu_nhwc16, conv_small_fwd, the turned weights, a step's weight copies, add_from_nhwc
    and relu_mask_inplace as conv.cu,
    hn_bn_z, hn_bn_value, bn_apply_nhwc16, hn_bn_out_grad and bn_bwd_dx_nhwc16 as norm.cu has them."""
    common, conv, norm = ((kernels.HERE / "common.cuh").read_text(), kernels.cu_text("conv"), kernels.cu_text("norm"))
    parts = [line for line in common.splitlines() if line.startswith(("#define HN_RELU", "#define HN_GELU",
                                                                       "#define HN_INV_SQRT"))]
    parts += [line for line in norm.splitlines() if line.startswith("#define HN_NHWC16_TILES")]
    parts += [line for line in conv.splitlines() if line.startswith("#define HN_WC_CHUNK")]
    i = common.index("#define HN_GRID_STRIDE(i, n)")
    parts.append(common[i:common.index("\n\n", i) + 1])
    for start in ("template <typename I>\nstruct HnPlaneWalk {", "struct HnTilePixel {"):
        i = common.index(start)
        parts.append(common[i:common.index("\n};\n", i) + 4])
    i = conv.index("struct HnPoolWindow {")
    parts.append(conv[i:conv.index("\n};\n", i) + 4])
    i = common.index("struct HnPhi {")                                  # through hn_gelu_grad
    j = common.index("__device__ __forceinline__ float hn_gelu_grad(")
    parts.append(common[i:common.index("\n}\n", j) + 3])
    for text, start in ((common, "__device__ __forceinline__ float hn_act(const float* p"),     # (both hn_act)
                        (common, "template <typename X>\n__device__ __forceinline__ void hn_load_nhwc16_rows("),
                        (common, "__device__ __forceinline__ void hn_load_nhwc_tile("),
                        (common, "__device__ __forceinline__ void hn_store_nhwc16_tile("),
                        (common, "__device__ __forceinline__ unsigned short hn_bf16_bits(float v) {"),
                        (common, "__device__ __forceinline__ float hn_tf32_round("),
                        (common, "__device__ __forceinline__ float2 hn_split_tf32("),
                        (common, "__device__ __forceinline__ long long hn_split_at("),
                        (common, "template <int SPLIT = 0>\n__device__ __forceinline__ void hn_store_nhwc32_tile("),
                        (common, "__device__ __forceinline__ void hn_store_kmajor32_tile("),
                        (conv, 'extern "C" __global__ void __launch_bounds__(256) to_nhwc16('),
                        (conv, "template <int SPLIT>\n__device__ __forceinline__ void hn_to_nhwc32("),
                        (conv, 'extern "C" __global__ void __launch_bounds__(256) to_nhwc32('),
                        (conv, 'extern "C" __global__ void __launch_bounds__(256) to_nhwc32x3('),
                        (conv, 'extern "C" __global__ void __launch_bounds__(256) nhwc32_t('),
                        (conv, "__device__ __forceinline__ void hn_pool_grad_tile("),
                        (conv, 'extern "C" __global__ void __launch_bounds__(256) pool_grad_nhwc16('),
                        (conv, "template <int SPLIT>\n__device__ __forceinline__ void hn_pool_grad_nhwc32("),
                        (conv, 'extern "C" __global__ void __launch_bounds__(256) pool_grad_nhwc32('),
                        (conv, 'extern "C" __global__ void __launch_bounds__(256) pool_grad_nhwc32x3('),
                        (conv, "template <class F>\n__device__ __forceinline__ void hn_each_window_pixel("),
                        (conv, "__device__ __forceinline__ void hn_stage_argmax8("),
                        (conv, 'extern "C" __global__ void __launch_bounds__(256) pool_grad16_nhwc16('),
                        (conv, 'extern "C" __global__ void __launch_bounds__(256) pool_grad16_nhwc16v('),
                        (conv, 'extern "C" __global__ void __launch_bounds__(256) conv_gelu_nhwc16('),
                        (conv, 'extern "C" __global__ void __launch_bounds__(256, 3) conv_small_fwd('),
                        (conv, 'extern "C" __global__ void turn_weights16('),
                        (conv, 'extern "C" __global__ void turn_weights32('),
                        (conv, 'extern "C" __global__ void turn_weights32x3('),
                        (conv, "template <class Put>\n__device__ __forceinline__ void hn_weight_copies("),
                        (conv, 'extern "C" __global__ void weight_copies16('),
                        (conv, 'extern "C" __global__ void weight_copies32('),
                        (conv, 'extern "C" __global__ void weight_copies32x3('),
                        (conv, 'extern "C" __global__ void add_from_nhwc('),
                        (conv, 'extern "C" __global__ void relu_mask_inplace('),
                        (norm, "__device__ __forceinline__ float hn_bn_z("),
                        (norm, "__device__ __forceinline__ float hn_bn_value("),
                        (norm, "__device__ __forceinline__ void hn_store_nhwc_tile(const float (&t)[64][33], unsigned"),
                        (norm, "__device__ __forceinline__ void hn_store_nhwc_tile(const float (&t)[64][33], float"),
                        (norm, "template <typename X, typename Y>\n__device__ __forceinline__ void bn_apply_nhwc16_body("),
                        (norm, 'extern "C" __global__ void __launch_bounds__(256, 4) bn_apply_nhwc16('),
                        (norm, 'extern "C" __global__ void __launch_bounds__(256, 4) bn_apply_nhwc32('),
                        (norm, 'extern "C" __global__ void __launch_bounds__(256, 4) bn_apply_nhwc16_x16('),
                        (norm, "__device__ __forceinline__ float hn_bn_out_grad("),
                        (norm, "template <typename D, typename X, typename Y>\n__device__ __forceinline__ void "
                               "bn_bwd_dx_nhwc16_body("),
                        (norm, 'extern "C" __global__ void __launch_bounds__(256, 4) bn_bwd_dx_nhwc32('),
                        (norm, 'extern "C" __global__ void __launch_bounds__(256, 4) bn_bwd_dx_nhwc16('),
                        (norm, 'extern "C" __global__ void __launch_bounds__(256, 4) bn_bwd_dx_nhwc16_x16('),
                        (norm, 'extern "C" __global__ void __launch_bounds__(256, 4) bn_bwd_dx_nhwc16_dy16('),
                        (norm, 'extern "C" __global__ void __launch_bounds__(256, 4) bn_bwd_dx_nhwc16_x16_dy16(')):
        i = text.index(start)
        parts.append(text[i:text.index("\n}\n", i) + 3])
    # the 16-byte vector versions: their helpers (common.cuh), and norm.cu's last section (their bodies and kernels)
    for start in ("template <typename X>\nstruct HnRaw8 {", "struct HnVecTile {"):
        i = common.index(start)
        parts.append(common[i:common.index("\n};\n", i) + 4])
    i = common.index("__device__ __forceinline__ void hn_store_nhwc16_vec(")
    parts.append(common[i:common.index("\n}\n", i) + 3])
    parts.append(norm[norm.index("// --- the channels-last bf16 copies in 16-byte vectors"):])
    return "\n".join(parts)


def emulated_kernels_text() -> str:
    """_kernels_text as the emulator compiles it: its bf16 conversion, vector accesses checked for alignment
    (hn_vec), `__shared__` arrays static (one block runs at a time)."""
    body = re.sub(r"\bhn_bf16x2_bits\b", "hn_pack_bf16x2", _kernels_text())
    body = re.sub(r"reinterpret_cast<((?:const )?(?:float4|uint2|uint4))\*>\(", r"hn_vec<\1>(", body)
    return "#define __shared__ static\n" + body


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    return build_emulated(tmp_path_factory.mktemp("emu_cu"), "cu_emu", emulated_kernels_text() + ENTRY)


def _ptr(a: np.ndarray):
    return a.ctypes.data_as(ctypes.c_void_p)


def _check(rc: int, err) -> None:
    assert rc == 0, err.value.decode()


@pytest.mark.parametrize("shape", [(2, 6, 37), (1, 70, 5, 7), (2, 64, 3, 3), (7, 6, 3, 3), (3, 3, 5, 7)], ids=str)
def test_to_nhwc16_emulated(emu, rng, shape):
    """Every element, bf16-rounded to nearest even (the first values sit on rounding ties); tiles of 32 pixels that
    end inside an image and that hold several images (HW = 9); the copy of C channels (C even) and the copy padded
    with zeros to a multiple of 8 (Cp: to_nhwc's, 3 channels as 8)."""
    x = (rng.standard_normal(shape) * 100).astype(np.float32)
    x.reshape(-1)[:4] = np.array([0x3F808000, 0x3F818000, 0xBF808000, 0x3F80FFFF], np.uint32).view(np.float32)
    n, c = shape[:2]
    hw = x.size // (n * c)
    err = ctypes.create_string_buffer(512)
    for chunk in ((1, 8) if c % 2 == 0 else (8,)):
        cp = -(-c // chunk) * chunk
        y = np.full((n, *shape[2:], cp), 0xDEAD, np.uint16)
        _check(emu.emu_to_nhwc16(_ptr(x), _ptr(y), n, c, hw, cp, 7, err, 512), err)
        np.testing.assert_array_equal(y, nhwc16(x, chunk))
    # to_nhwc32: the float32 copy rounded to tf32 (to nearest, ties away: the first values are ties), padded to a
    # multiple of 4 (the kernel takes any Cp >= C)
    x.reshape(-1)[:4] = np.array([0x3F801000, 0x3F803000, 0xBF801000, 0x3F80FFFF], np.uint32).view(np.float32)
    # multiple of 4 (the kernel takes any Cp >= C); then with the K-major copy beside it (the r tiles' dy_t: every
    # element written, zeros past the n HW pixels)
    want = nhwc_copy(x, "tf32")
    want_t = dy_t_host(want)
    for yt in (None, np.full(want_t.shape, np.nan, np.float32)):
        y32 = np.full(want.shape, np.nan, np.float32)
        _check(emu.emu_to_nhwc32(_ptr(x), _ptr(y32), n, c, hw, want.shape[-1], 0, yt if yt is None else _ptr(yt),
                                 want_t.shape[1], 5, err, 512), err)
        np.testing.assert_array_equal(y32.view(np.uint32), want.view(np.uint32))
    np.testing.assert_array_equal(yt.view(np.uint32), want_t.view(np.uint32))
    want = nhwc_copy(x, "fp32")             # to_nhwc32x3: the split copy of fp32 [..., Cp / 4, 2, 4]
    ys = np.full(want.shape, np.nan, np.float32)
    _check(emu.emu_to_nhwc32(_ptr(x), _ptr(ys), n, c, hw, 4 * want.shape[-3], 1, None, 0, 5, err, 512), err)
    np.testing.assert_array_equal(ys.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("k,o", [(45, 12), (64, 32), (100, 68), (3, 4)], ids=str)
def test_nhwc32_t_emulated(emu, rng, k, o):
    """nhwc32_t, the r tiles' K-major copy of dy: y[o][k] = x[k][o], every element of [O, ldk] written (poisoned
    first), zeros past K; partial 32 x 32 blocks in both directions."""
    x = rng.standard_normal((k, o)).astype(np.float32)
    want = dy_t_host(x.reshape(1, k, 1, o))
    y = np.full(want.shape, np.nan, np.float32)
    err = ctypes.create_string_buffer(512)
    _check(emu.emu_nhwc32_t(_ptr(x), _ptr(y), k, o, want.shape[1], 3, err, 512), err)
    np.testing.assert_array_equal(y, want)


@pytest.mark.parametrize("shape,k", [((2, 6, 11, 9), 2), ((1, 70, 7, 7), 2), ((2, 8, 8, 11), 3), ((1, 66, 4, 4), 2),
                                     ((5, 6, 5, 5), 2), ((3, 72, 9, 10), 2), ((4, 16, 16, 16), 2)], ids=str)
def test_pool_grad_nhwc16_emulated(emu, rng, shape, k):
    """Every element of the copy: the gradient at each window's first maximum (ties in the first window), 0 at the
    window's other elements and at the rows and columns no window covers; partial 64 x 32 tiles; from the pooled
    gradient in float32 NCHW (pool_grad_nhwc16) and in bf16 channels-last (pool_grad16_nhwc16; where C is a
    multiple of 8 also pool_grad16_nhwc16v, in 16-byte vectors: a partial block and a second block of channels, four
    blocks of whole tiles)."""
    z = rng.standard_normal(shape).astype(np.float32)
    z[:, :, :k, :k] = 1.0
    y, cache = ref.maxpool2d_forward(z.astype(np.float64), k, k)
    n, c, h, w = shape
    p, q = y.shape[2:]
    wins = z[:, :, :p * k, :q * k].reshape(n, c, p, k, q, k).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, p, q, k * k)
    arg = np.ascontiguousarray(wins.argmax(axis=-1).astype(np.uint8))      # the first maximum, as maxpool_fwd's byte
    dy = rng.standard_normal((n, c, p, q)).astype(np.float32)
    want = nhwc16(ref.maxpool2d_backward(dy.astype(np.float64), cache).astype(np.float32))
    out = np.full((n, h, w, c), 0xDEAD, np.uint16)
    err = ctypes.create_string_buffer(512)
    _check(emu.emu_pool_grad(_ptr(dy), _ptr(arg), _ptr(out), n, c, h, w, p, q, k, 11, err, 512), err)
    np.testing.assert_array_equal(out, want)
    # pool_grad16_nhwc16: the same bits from the pooled gradient already channels-last in bf16
    out16 = np.full((n, h, w, c), 0xBEEF, np.uint16)
    _check(emu.emu_pool_grad16(_ptr(nhwc16(dy)), _ptr(arg), _ptr(out16), n, c, h, w, p, q, k, 13, err, 512), err)
    np.testing.assert_array_equal(out16, want)
    if c % 8 == 0:
        outv = np.full((n, h, w, c), 0xBEEF, np.uint16)
        _check(emu.emu_pool_grad16v(_ptr(nhwc16(dy)), _ptr(arg), _ptr(outv), n, c, h, w, p, q, k, 17, err, 512), err)
        np.testing.assert_array_equal(outv, want)
    # pool_grad_nhwc32: the same gradient as the tf32 copy, then with its K-major copy (as to_nhwc32's)
    dz = ref.maxpool2d_backward(dy.astype(np.float64), cache).astype(np.float32)
    want32 = nhwc_copy(dz, "tf32", padded=False)
    want_t = dy_t_host(want32)
    for yt in (None, np.full(want_t.shape, np.nan, np.float32)):
        out32 = np.full((n, h, w, c), np.nan, np.float32)
        _check(emu.emu_pool_grad32(_ptr(dy), _ptr(arg), _ptr(out32), n, c, h, w, p, q, k, 0,
                                   yt if yt is None else _ptr(yt), want_t.shape[1], 17, err, 512), err)
        np.testing.assert_array_equal(out32, want32)
    np.testing.assert_array_equal(yt, want_t)
    if c % 4 == 0:   # pool_grad_nhwc32x3: the split copy of fp32
        outs = np.full(nhwc_copy(dz, "fp32").shape, np.nan, np.float32)
        _check(emu.emu_pool_grad32(_ptr(dy), _ptr(arg), _ptr(outs), n, c, h, w, p, q, k, 1, None, 0, 19, err, 512),
               err)
        np.testing.assert_array_equal(outs, nhwc_copy(dz, "fp32", padded=False))


def _small_conv(rng, case):
    """(x, w, b, the reference backend's float64 conv2d_forward (+ b where case's bias)) for case = (N, C, H, W, K,
    kernel, stride, padding, bias, ...), float32 inputs."""
    n, c, h, w_, k, ks, stride, pad, bias = case[:9]
    x = rng.standard_normal((n, c, h, w_)).astype(np.float32)
    w = (rng.standard_normal((k, c, ks, ks)) * 0.5).astype(np.float32)
    b = (rng.standard_normal(k) * 0.5).astype(np.float32)
    want, _ = ref.conv2d_forward(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64) if bias else None,
                                 stride, pad)
    return x, w, b, want


@pytest.mark.parametrize("case", [(3, 3, 9, 9, 24, 2, 1, 0, True, 2), (2, 2, 7, 6, 8, 3, 2, 1, False, 1),
                                  (1, 2, 5, 5, 64, 4, 1, 2, True, 3), (2, 3, 6, 7, 16, 3, 1, 1, True, 1)],
                         ids=lambda c: "N{}C{}H{}W{}K{}k{}s{}p{}b{:d}-blocks{}".format(*c))
def test_conv_gelu_nhwc16_emulated(emu, rng, case):
    """conv_gelu_nhwc16: z = conv2d(x, w) + b in float32 (NumPy's float64 convolution, float32 rounding apart) and
    the copy bit for bit bf16(gelu(z)) channels-last of that z (NumPy's erfc-form GELU in float64 rounded to float32:
    within one bf16 step, nearly all equal); padding, stride 2, K = 64, 32 taps (C R S's limit) and 27 (3 x 3 x 3),
    grids smaller than the pixels (grid-stride loop)."""
    import math

    n, c, h, w_, k, ks, stride, pad, bias, blocks = case
    x, w, b, want = _small_conv(rng, case)
    p, q = want.shape[2:]
    z = np.full((n, k, p, q), np.nan, np.float32)
    out = np.full((n, p, q, k), 0xDEAD, np.uint16)
    err = ctypes.create_string_buffer(512)
    _check(emu.emu_conv_gelu(_ptr(x), _ptr(w), _ptr(b) if bias else None, _ptr(z), _ptr(out), n, c, h, w_, k, ks,
                             ks, stride, pad, p, q, blocks, 13, err, 512), err)
    np.testing.assert_allclose(z, want, rtol=1e-5, atol=1e-5)
    phi = np.vectorize(lambda v: 0.5 * math.erfc(-v / math.sqrt(2)))(z.astype(np.float64))
    steps = _bf16_ulps(out, nhwc16((z * phi).astype(np.float32)))
    assert steps.max() <= 1 and (steps == 0).mean() > 0.99, steps.max()


SMALL_CASES = [  # (N, C, H, W, K, kernel, stride, padding, bias)
    (3, 3, 9, 9, 64, 3, 1, 1, True),      # the first layer of an image model (27 taps); P Q = 81: single stores
    (1, 1, 7, 6, 8, 5, 2, 2, False),      # batch 1, one channel, 5 x 5 at stride 2 (P Q = 12: vector stores)
    (2, 3, 11, 10, 24, 1, 2, 0, True),    # 1 x 1 at stride 2 (P Q = 30)
    (2, 2, 5, 5, 16, 4, 1, 2, True),      # 32 taps, the kernel's limit
    (3, 3, 16, 12, 64, 3, 1, 1, True),    # N P Q = 576: blocks across images, a partial last block
    (1, 3, 9, 7, 8, 3, 2, 1, False),      # stride 2, batch 1, N P Q = 20
]


@pytest.mark.parametrize("case", SMALL_CASES, ids=lambda c: "N{}C{}H{}W{}K{}k{}s{}p{}b{:d}".format(*c))
def test_conv_small_fwd_emulated(emu, rng, case):
    """conv_small_fwd: y = act(conv2d(x, w) + b) (no activation and ReLU) against NumPy's float64 convolution within
    float32's rounding of a sum of at most 32 terms; with out16 the bf16 bits (round to nearest even) of that float32
    output bit for bit, at the same NCHW positions. Nothing written past y (guard elements)."""
    n, c, h, w_, k, ks, stride, pad, bias = case
    x, w, b, want = _small_conv(rng, case)
    p, q = want.shape[2:]
    size, guard = want.size, 64
    err = ctypes.create_string_buffer(512)
    for act in (0, 1):
        y = np.full(size + guard, np.nan, np.float32)
        _check(emu.emu_conv_small(_ptr(x), _ptr(w), _ptr(b) if bias else None, _ptr(y), n, c, h, w_, k, ks, ks,
                                  stride, pad, p, q, act, 0, 3 + act, err, 512), err)
        assert np.isnan(y[size:]).all(), "written past y"
        y = y[:size].reshape(want.shape)
        np.testing.assert_allclose(y, np.maximum(want, 0) if act else want, rtol=RTOL_EMULATED, atol=RTOL_EMULATED)
        y16 = np.full(size + guard, 0xDEAD, np.uint16)
        _check(emu.emu_conv_small(_ptr(x), _ptr(w), _ptr(b) if bias else None, _ptr(y16), n, c, h, w_, k, ks, ks,
                                  stride, pad, p, q, act, 1, 5 + act, err, 512), err)
        assert (y16[size:] == 0xDEAD).all(), "written past y"
        np.testing.assert_array_equal(y16[:size].reshape(want.shape), bf16_bits(y))


@pytest.mark.parametrize("q", [8, 7], ids=["vector", "single"])
def test_conv_small_fwd_bf16_ties_emulated(emu, q):
    """conv_small_fwd's out16 rounds to nearest even: a 1 x 1 convolution with weights 1 and no bias passes x
    through exactly (y = fmaf(x, 1, 0)), so y16 is the bf16 of x, here values on rounding ties (to even: down and
    up, positive and negative), one float32 step either side of a tie, and one that carries into the exponent's
    bits, through the 8-byte stores (P Q a multiple of 4) and the single ones."""
    ties = np.array([0x3F808000, 0x3F818000, 0xBF808000, 0xBF818000, 0x3F808001, 0x3F807FFF, 0xBF808001, 0x3FFFFFFF],
                    np.uint32).view(np.float32)
    x = np.resize(ties, (2, 1, 3, q)).astype(np.float32)
    k = 8
    w = np.ones((k, 1, 1, 1), np.float32)
    y16 = np.full((2, k, 3, q), 0xDEAD, np.uint16)
    err = ctypes.create_string_buffer(512)
    _check(emu.emu_conv_small(_ptr(x), _ptr(w), None, _ptr(y16), 2, 1, 3, q, k, 1, 1, 1, 0, 3, q, 0, 1, 9, err, 512),
           err)
    np.testing.assert_array_equal(y16, np.broadcast_to(bf16_bits(x), y16.shape))
    assert bf16_bits(ties[:4]).tolist() == [0x3F80, 0x3F82, 0xBF80, 0xBF82]      # the ties, to even


def _bf16_ulps(bits_a, bits_b):
    """How many bf16 steps apart two arrays of bf16 bits are: the distance of the bit patterns on a line where
    negative values count down from zero (so -0 and +0 are 0 apart, and -x and x twice x's steps)."""
    def line(bits):
        b = bits.astype(np.int32)
        return np.where(b & 0x8000, -(b & 0x7FFF), b)

    return np.abs(line(bits_a) - line(bits_b))


def _bn_z(x, mean, inv, gamma, beta):
    """norm.cu's hn_bn_z in NumPy: fmaf((x - mean) * inv, gamma, beta) (the product of two float32 is exact in
    float64, so one rounding of the float64 sum to float32 stands for the fused multiply-add)."""
    f64 = np.float64
    return (((x - mean) * inv).astype(f64) * gamma.astype(f64) + beta.astype(f64)).astype(np.float32)


def _stored(x, x16: bool):
    """(the x a kernel is given, the float32 values it stands for): x itself, or (x16) its bf16 bits (an Nchw16's
    data) and their values."""
    if not x16:
        return x, x
    bits = bf16_bits(x)
    return bits, bf16_values(bits)


# The channels-last kernels' shapes: in elements (partial 64 x 32 tiles), and (vec) in 16-byte vectors where planes
# and channels are multiples of 8: a partial second tile of pixels and a second block of 8 channels; 8 channels of
# planes of 8, a tile across five images; two blocks of two whole tiles; a 3-D input.
NHWC16_CASES = ([(shape, False) for shape in [(2, 6, 37), (1, 70, 5, 7), (3, 64, 3, 3), (9, 6, 1, 3)]]
                + [(shape, True) for shape in [(3, 72, 4, 6), (5, 8, 2, 4), (2, 64, 16, 8), (3, 16, 40)]])


@pytest.mark.parametrize("x16", [False, True], ids=["x32", "x16"])
@pytest.mark.parametrize("act", [0, 1, 2], ids=["none", "relu", "gelu"])
@pytest.mark.parametrize(("shape", "vec"), NHWC16_CASES, ids=str)
def test_bn_apply_nhwc16_emulated(emu, rng, shape, vec, act, x16):
    """bn_apply_nhwc16: act(fmaf((x - mean) / sqrt(var + eps), gamma, beta)) channels-last in bf16, every element of
    partial tiles; NumPy's float32 of the same expression, rounded to bf16: equal bits without an activation and with
    the ReLU, within one bf16 step with the GELU (erfc's float32 rounding may differ by an ulp from math.erfc's).
    x16: x stored in bf16 (bn_apply_nhwc16_x16), the same of its values; vec: the vector versions
    (bn_apply_nhwc16v)."""
    given, x = _stored(rng.standard_normal(shape).astype(np.float32) * 3 + 1, x16)
    n, c = shape[:2]
    hw = x.size // (n * c)
    z, (mean, var, gamma, beta, eps) = _bn_apply_want(rng, x, act)
    out = np.full((n, *shape[2:], c), 0xDEAD, np.uint16)
    err = ctypes.create_string_buffer(512)
    _check(emu.emu_bn_apply16(_ptr(given), int(x16), _ptr(out), _ptr(mean), _ptr(var), _ptr(gamma), _ptr(beta), n, c,
                              hw, ctypes.c_float(eps), act, int(vec), 5, err, 512), err)
    steps = _bf16_ulps(out, nhwc16(z))
    assert steps.max() <= (1 if act == 2 else 0), f"{steps.max()} bf16 steps apart"
    assert (steps == 0).mean() > 0.99


@pytest.mark.parametrize(("act", "stats"), [(0, True), (1, True), (2, True), (2, False)],
                         ids=["none", "relu", "gelu", "gelu_alone"])
@pytest.mark.parametrize("shape", [s for s, _ in NHWC16_CASES] + [(2, 7, 5, 3)], ids=str)
def test_bn_apply_nhwc32_emulated(emu, rng, shape, act, stats):
    """bn_apply_nhwc32: bn_apply_nhwc16's value as the tf32 copy (float32 rounded to tf32, to_nhwc32's rounding),
    every element of partial tiles (poisoned first), any C: equal bits to NumPy's float32 of the same expression so
    rounded without an activation and with the ReLU, within one tf32 step with the GELU (erfc's float32 rounding);
    stats False: a GELU on its own (mean null: elementwise.py's hand-over)."""
    x = rng.standard_normal(shape).astype(np.float32) * 3 + 1
    n, c = shape[:2]
    hw = x.size // (n * c)
    z, (mean, var, gamma, beta, eps) = _bn_apply_want(rng, x, act, stats)
    want = nhwc_copy(z, "tf32", padded=False)
    out = np.full(want.shape, np.nan, np.float32)
    err = ctypes.create_string_buffer(512)
    _check(emu.emu_bn_apply32(_ptr(x), _ptr(out), *((_ptr(a) for a in (mean, var, gamma, beta)) if stats else
                                                    (None,) * 4), n, c, hw, ctypes.c_float(eps), act, 5, err, 512),
           err)
    steps = np.abs(out.view(np.int32).astype(np.int64) - want.view(np.int32).astype(np.int64)) >> 13
    assert steps.max() <= (1 if act == 2 else 0), f"{steps.max()} tf32 steps apart"
    assert (steps == 0).mean() > 0.99


def _bn_apply_want(rng, x, act: int, stats: bool = True):
    """NumPy's float32 of norm.cu's bn_apply of x (float32 [n, C, *spatial]) with random statistics:
    act(fmaf((x - mean) / sqrt(var + eps), gamma, beta)), or act(x) without stats; act none, ReLU (both signs
    present) or GELU from math.erfc; and the kernels' other arguments (mean, var, gamma, beta, eps)."""
    import math

    c = x.shape[1]
    mean, var = rng.standard_normal(c).astype(np.float32), rng.uniform(0.5, 2, c).astype(np.float32)
    gamma, beta = rng.standard_normal(c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    eps = np.float32(1e-5)
    bc = (1, c) + (1,) * (x.ndim - 2)
    inv = (np.float32(1) / np.sqrt(var + eps)).reshape(bc)
    z = _bn_z(x, mean.reshape(bc), inv, gamma.reshape(bc), beta.reshape(bc)) if stats else x
    if act == 1:
        assert (z < 0).any() and (z > 0).any()
        z = np.maximum(z, 0)
    if act == 2:
        phi = np.vectorize(lambda v: 0.5 * math.erfc(-v / math.sqrt(2)))(z.astype(np.float64))
        z = (z * phi).astype(np.float32)
    return z, (mean, var, gamma, beta, eps)


@pytest.mark.parametrize(("x16", "dy16"), [(False, False), (True, False), (True, True)], ids=["x32", "x16", "x16dy16"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("act", [0, 1, 2], ids=["none", "relu", "gelu"])
@pytest.mark.parametrize(("shape", "vec"), NHWC16_CASES, ids=str)
def test_bn_bwd_dx_nhwc16_emulated(emu, rng, shape, vec, act, train, x16, dy16):
    """bn_bwd_dx_nhwc16: the batch norm's (+ ReLU's or GELU's) input gradient channels-last in bf16, every element
    of partial tiles; NumPy's float32 of bn_bwd_dx's expression (g = dy; dy where z > 0; dy gelu'(z) from math.erfc;
    training: scale (g - sum g / m - xhat sum g xhat / m), eval: g scale), rounded to bf16: equal bits without the
    GELU, within one bf16 step with it. x16, dy16: x, dy stored in bf16 (bn_bwd_dx_nhwc16_x16, _x16_dy16), the same
    of their values; vec: the vector versions (bn_bwd_dx_nhwc16v)."""
    given, x = _stored(rng.standard_normal(shape).astype(np.float32) * 3 + 1, x16)
    dy_given, dy = _stored(rng.standard_normal(shape).astype(np.float32), dy16)
    n, c = shape[:2]
    hw = x.size // (n * c)
    want, args = _bn_bwd_dx_want(rng, x, dy, act, train)
    out = np.full((n, *shape[2:], c), 0xDEAD, np.uint16)
    err = ctypes.create_string_buffer(512)
    _check(emu.emu_bn_bwd_dx16(_ptr(dy_given), int(dy16), _ptr(given), int(x16), *map(_ptr, args[:4]),
                               _ptr(args[4]) if train else None, _ptr(out), n, c, hw, ctypes.c_float(args[5]), act,
                               int(vec), 7, err, 512), err)
    steps = _bf16_ulps(out, nhwc16(want))
    assert steps.max() <= (1 if act == 2 else 0), f"{steps.max()} bf16 steps apart"
    assert (steps == 0).mean() > 0.98


@pytest.mark.parametrize("k_major", [False, True], ids=["nhwc", "k_major"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("act", [0, 1, 2], ids=["none", "relu", "gelu"])
@pytest.mark.parametrize("shape", [s for s, _ in NHWC16_CASES] + [(2, 68, 5, 3)], ids=str)
def test_bn_bwd_dx_nhwc32_emulated(emu, rng, shape, act, train, k_major):
    """bn_bwd_dx_nhwc32: bn_bwd_dx_nhwc16's value as the tf32 copy (to_nhwc32's rounding), every element of partial
    tiles (poisoned first), any C: equal bits to NumPy's float32 of bn_bwd_dx's expression so rounded without the
    GELU, within one tf32 step (or 2^-20 of the largest, where gelu' crosses 0) with it; k_major: its K-major copy too (the r tiles' dy_t, mma.dy_t's layout), every
    element, zeros past the n HW pixels (partial last tiles: n HW 74, 105, 27 ...)."""
    x = rng.standard_normal(shape).astype(np.float32) * 3 + 1
    dy = rng.standard_normal(shape).astype(np.float32)
    n, c = shape[:2]
    hw = x.size // (n * c)
    want, args = _bn_bwd_dx_want(rng, x, dy, act, train)
    want = nhwc_copy(want, "tf32", padded=False)
    want_t = dy_t_host(want)
    out = np.full(want.shape, np.nan, np.float32)
    yt = np.full(want_t.shape, np.nan, np.float32) if k_major else None
    err = ctypes.create_string_buffer(512)
    _check(emu.emu_bn_bwd_dx32(_ptr(dy), _ptr(x), *map(_ptr, args[:4]), _ptr(args[4]) if train else None, _ptr(out),
                               None if yt is None else _ptr(yt), want_t.shape[1], n, c, hw, ctypes.c_float(args[5]),
                               act, 5, err, 512), err)
    if act == 2:        # gelu'(z) crosses 0: float32's erfc against float64's, within a tf32 step or 2^-20 of the scale
        np.testing.assert_allclose(out, want, rtol=2**-10, atol=2**-20 * np.abs(want).max())
    else:
        np.testing.assert_array_equal(out.view(np.uint32), want.view(np.uint32))
    if k_major:
        np.testing.assert_array_equal(yt.view(np.uint32), dy_t_host(out).view(np.uint32))


def _bn_bwd_dx_want(rng, x, dy, act: int, train: bool):
    """NumPy's float32 of norm.cu's bn_bwd_dx of x, dy (float32 [n, C, *spatial]) with random statistics: g = dy;
    dy where z > 0; dy gelu'(z) from math.erfc; training: scale (g - sum g / m - xhat sum g xhat / m), eval: g scale;
    and the kernels' other arguments (mean, var, gamma, beta, red, eps)."""
    import math

    n, c = x.shape[:2]
    hw = x.size // (n * c)
    mean, var = rng.standard_normal(c).astype(np.float32), rng.uniform(0.5, 2, c).astype(np.float32)
    gamma, beta = rng.standard_normal(c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    red = (rng.standard_normal(2 * c) * 10).astype(np.float32)
    eps, f = np.float32(1e-5), np.float32
    bc = (1, c) + (1,) * (x.ndim - 2)
    inv = (f(1) / np.sqrt(var + eps)).reshape(bc)
    ga = gamma.reshape(bc)
    xhat = (x - mean.reshape(bc)) * inv
    g = dy
    z = _bn_z(x, mean.reshape(bc), inv, ga, beta.reshape(bc))
    if act == 1:
        assert (z < 0).any() and (z > 0).any()
        g = np.where(z > 0, dy, np.float32(0))
    if act == 2:
        z = z.astype(np.float64)
        d = np.vectorize(lambda v: (0.5 * math.erfc(-v / math.sqrt(2))
                                    + v * math.exp(-v * v / 2) / math.sqrt(2 * math.pi)))
        g = (dy * d(z)).astype(np.float32)
    inv_m = f(1) / (f(n) * f(hw))
    if train:
        want = ga * inv * (g - (red[:c] * inv_m).reshape(bc) - xhat * red[c:].reshape(bc) * inv_m)
    else:
        want = g * (ga * inv)
    return want.astype(np.float32), (mean, var, gamma, beta, red, eps)


@pytest.mark.parametrize("wide", [False, True], ids=["i32", "i64"])
@pytest.mark.parametrize("take", [False, True], ids=["step", "take3"])
@pytest.mark.parametrize("n,c,hw,blocks,threads", [(3, 5, 7, 2, 32), (2, 64, 9, 3, 64), (16, 2, 7, 1, 32),
                                                   (9, 2, 49, 1, 32), (6, 3, 25, 2, 32), (1, 7, 225, 1, 64),
                                                   (40, 2, 1, 1, 32), (3, 3, 64, 1, 32)])
def test_plane_walk_emulated(emu, wide, take, n, c, hw, blocks, threads):
    """Every element of x[N, C, HW] visited exactly once, by its channel's blocks, a step at a time or three (take):
    strides that wrap hw (landing on HW exactly, too), several visits per thread, more threads than elements,
    HW = 1, HW a multiple of the stride, counts not a multiple of three."""
    out = np.zeros(n * c * hw, np.int32)
    err = ctypes.create_string_buffer(512)
    _check(emu.emu_walk(int(wide), int(take), _ptr(out), n, c, hw, blocks, threads, 3, err, 512), err)
    np.testing.assert_array_equal(out, 1 + (np.arange(n * c * hw) // hw) % c)


# The kernel sandbox's direct filter gradient for small convolutions (benchmarks/kernels/conv_small.cu, timed by
# run_conv_small.py), checked here so that the variant stays correct while it is kept
SMALL_ENTRY = """
extern "C" int emu_filter(const float* dy, const float* x, float* part, float* dw, int n, int C, int H, int W, int K,
                          int R, int S, int st, int pad, int P, int Q, unsigned blocks, unsigned seed, char* err,
                          int len) {
    std::string msg = emu::launch({blocks, 1, 1}, {256, 1, 1}, 0, [=] {
        conv_small_filter2(dy, x, part, n, C, H, W, K, R, S, st, pad, P, Q);
    }, seed);
    if (msg.empty())
        msg = emu::launch({(unsigned)((K * 32 + 255) / 256), 1, 1}, {256, 1, 1}, 0, [=] {
            conv_small_filter2_add(part, dw, (int)blocks, K, C * R * S);
        }, seed + 1);
    snprintf(err, len, "%s", msg.c_str());
    return msg.empty() ? 0 : 1;
}
"""


@pytest.fixture(scope="module")
def emu_small(tmp_path_factory):
    text = (SANDBOX / "conv_small.cu").read_text()
    return build_emulated(tmp_path_factory.mktemp("emu_small"), "conv_small", "#define __shared__ static\n" + text
                          + SMALL_ENTRY)


@pytest.mark.parametrize("case", [(3, 3, 9, 9, 64, 3, 1, 1, 2), (2, 2, 7, 6, 8, 3, 2, 1, 1), (1, 2, 5, 5, 16, 4, 1, 2, 3),
                                  (2, 1, 6, 7, 24, 5, 1, 2, 7), (2, 3, 8, 8, 64, 3, 1, 1, 2)],
                         ids=lambda c: "N{}C{}H{}W{}K{}k{}s{}p{}-blocks{}".format(*c))
def test_sandbox_conv_small_emulated(emu_small, rng, case):
    """conv_small_filter2 + conv_small_filter2_add: dw += dE/dw against float64, within float32's summation error,
    on grids with more and fewer blocks than 64-pixel tiles, 32 taps. (The forward of the same study ships as
    conv.cu's conv_small_fwd: test_conv_small_fwd_emulated.)"""
    n, c, h, w_, k, ks, stride, pad, blocks = case
    x = rng.standard_normal((n, c, h, w_)).astype(np.float32)
    w = (rng.standard_normal((k, c, ks, ks)) * 0.5).astype(np.float32)
    want, cache = ref.conv2d_forward(x.astype(np.float64), w.astype(np.float64), None, stride, pad)
    p, q = want.shape[2:]
    err = ctypes.create_string_buffer(512)
    dy = rng.standard_normal(want.shape).astype(np.float32)
    dw_want = np.ones(w.shape)
    ref.conv2d_backward(dy.astype(np.float64), cache, dw_want, None)
    part = np.full((blocks, 64, 32), np.nan, np.float32)
    dw = np.ones_like(w)
    _check(emu_small.emu_filter(_ptr(dy), _ptr(x), _ptr(part), _ptr(dw), n, c, h, w_, k, ks, ks, stride, pad, p, q,
                                blocks, 7, err, 512), err)
    np.testing.assert_allclose(dw, dw_want, rtol=0, atol=RTOL_EMULATED * np.sqrt(n * p * q))


# mma.cu's tensor-core forward and filter gradient for small convolutions (conv.py's "small_tc" at bf16)
SMALL_TC_ENTRY = """
extern "C" int emu_small_tc(const float* x, const float* w, const float* b, void* y, int n, int C, int H, int W, int K,
                            int R, int S, int st, int pad, int P, int Q, int act, int out16, double* sums,
                            unsigned seed, char* err, int len) {
    const unsigned blocks = (unsigned)((n * P * Q + 127) / 128);
    std::string msg = emu::launch({blocks, 1, 1}, {256, 1, 1}, HN_SMALL_TC_SMEM, [=] {
        conv_small_fwd_tc(x, w, b, y, n, C, H, W, K, R, S, st, pad, P, Q, act, out16, sums);
    }, seed);
    snprintf(err, len, "%s", msg.c_str());
    return msg.empty() ? 0 : 1;
}
extern "C" int emu_small_filter_tc(const void* dy, int dy16, const float* x, float* part, float* dw, int n, int C,
                                   int H, int W, int K, int R, int S, int st, int pad, int P, int Q, unsigned blocks,
                                   unsigned seed, char* err, int len) {
    // the buffers that vector loads (hn_ldg4) are checked against: dy and x read, part written
    const size_t npq = (size_t)n * P * Q;
    emu::S().ranges = {{static_cast<const unsigned char*>(dy), npq * K * (dy16 ? 2 : 4), false},
                       {reinterpret_cast<const unsigned char*>(x), (size_t)n * C * H * W * 4, false},
                       {reinterpret_cast<const unsigned char*>(part), (size_t)blocks * 64 * 32 * 4, true}};
    std::string msg = emu::launch({blocks, 1, 1}, {256, 1, 1}, HN_SMALL_TC_FSMEM, [=] {
        if (dy16)
            conv_small_filter_tc_dy16(static_cast<const unsigned short*>(dy), x, part, n, C, H, W, K, R, S, st, pad,
                                      P, Q);
        else
            conv_small_filter_tc(static_cast<const float*>(dy), x, part, n, C, H, W, K, R, S, st, pad, P, Q);
    }, seed);
    if (msg.empty())
        msg = emu::launch({(unsigned)((K * 32 + 255) / 256), 1, 1}, {256, 1, 1}, 0, [=] {
            conv_small_filter_tc_add(part, dw, (int)blocks, K, C * R * S);
        }, seed + 1);
    snprintf(err, len, "%s", msg.c_str());
    return msg.empty() ? 0 : 1;
}
"""


@pytest.fixture(scope="module")
def emu_small_tc(tmp_path_factory):
    return build_emulated(tmp_path_factory.mktemp("emu_small_tc"), "conv_small_tc", kernels.cu_text("mma") +
                          SMALL_TC_ENTRY)


@pytest.mark.parametrize("case", SMALL_CASES, ids=lambda c: "N{}C{}H{}W{}K{}k{}s{}p{}b{:d}".format(*c))
def test_conv_small_tc_emulated(emu_small_tc, rng, case):
    """conv_small_fwd_tc: y = act(conv2d(x, w) + b) on bf16 tensor cores against float64 of the bf16-rounded x and w
    (the bias not rounded) within the emulator's tolerance, no activation and ReLU; with out16 the bf16 bits of that
    float32 output, bit for bit. Nothing written past y (guard elements). The sums it adds for a batch norm: each
    channel's sum and sum of squares of y as stored (float32, or the bf16 values), in float64, and the count."""
    n, c, h, w_, k, ks, stride, pad, bias = case
    x, w, b, _ = _small_conv(rng, case)
    xr, wr = bf16_values(bf16_bits(x)), bf16_values(bf16_bits(w))
    want, _ = ref.conv2d_forward(xr.astype(np.float64), wr.astype(np.float64), b.astype(np.float64) if bias else None,
                                 stride, pad)
    p, q = want.shape[2:]
    size, guard = want.size, 64
    err = ctypes.create_string_buffer(512)
    def copies_used(sums):            # the copies a block's sums went to: one a block (blockIdx.x modulo the copies)
        return int((sums[:-1].reshape(mma.SUMS_COPIES, 2 * k) != 0).any(axis=1).sum())

    for act in (0, 1):
        y, sums = np.full(size + guard, np.nan, np.float32), mma.zeroed_sums(np, k)
        _check(emu_small_tc.emu_small_tc(_ptr(x), _ptr(w), _ptr(b) if bias else None, _ptr(y), n, c, h, w_, k, ks,
                                         ks, stride, pad, p, q, act, 0, _ptr(sums), 3 + act, err, 512), err)
        assert np.isnan(y[size:]).all(), "written past y"
        y = y[:size].reshape(want.shape)
        np.testing.assert_allclose(y, np.maximum(want, 0) if act else want, rtol=RTOL_EMULATED, atol=RTOL_EMULATED)
        np.testing.assert_allclose(mma.folded_sums(sums, k), batch_norm_sums(y), rtol=1e-12, atol=1e-12)
        assert copies_used(sums) == min(-(-n * p * q // 128), mma.SUMS_COPIES)
        y16, sums = np.full(size + guard, 0xDEAD, np.uint16), mma.zeroed_sums(np, k)
        _check(emu_small_tc.emu_small_tc(_ptr(x), _ptr(w), _ptr(b) if bias else None, _ptr(y16), n, c, h, w_, k, ks,
                                         ks, stride, pad, p, q, act, 1, _ptr(sums), 5 + act, err, 512), err)
        assert (y16[size:] == 0xDEAD).all(), "written past y"
        np.testing.assert_array_equal(y16[:size].reshape(want.shape), bf16_bits(y))
        np.testing.assert_allclose(mma.folded_sums(sums, k), batch_norm_sums(bf16_values(y16[:size].reshape(
            want.shape))), rtol=1e-12, atol=1e-12)
        _check(emu_small_tc.emu_small_tc(_ptr(x), _ptr(w), _ptr(b) if bias else None, _ptr(y16), n, c, h, w_, k, ks,
                                         ks, stride, pad, p, q, act, 1, None, 7 + act, err, 512), err)     # no sums


@pytest.mark.parametrize("case", [(3, 3, 9, 9, 64, 3, 1, 1, 2), (2, 2, 7, 6, 8, 3, 2, 1, 1), (1, 2, 5, 5, 16, 4, 1, 2, 3),
                                  (2, 1, 6, 7, 24, 5, 1, 2, 2), (2, 3, 8, 8, 64, 3, 1, 1, 1),
                                  (4, 3, 12, 12, 64, 3, 1, 1, 2)],
                         ids=lambda c: "N{}C{}H{}W{}K{}k{}s{}p{}-blocks{}".format(*c))
def test_conv_small_filter_tc_emulated(emu_small_tc, rng, case):
    """conv_small_filter_tc + conv_small_filter_tc_add: dw += dE/dw against float64 of the bf16-rounded dy and x,
    within the emulator's tolerance; every part written (poisoned with NaN first); grids with fewer blocks than
    128-pixel tiles (the grid-stride loop: the last case's blocks take 3 and 2 tiles, each loaded while the last one
    is multiplied, tiles across images, a partial last one) and with more (blocks with no pixels), 32 taps; P Q a
    multiple of 4 (dy read 4 pixels a vector) or not. conv_small_filter_tc_dy16 on dy's bf16 bits: the same dw, bit
    for bit."""
    n, c, h, w_, k, ks, stride, pad, blocks = case
    x = rng.standard_normal((n, c, h, w_)).astype(np.float32)
    w = np.zeros((k, c, ks, ks))
    _, cache = ref.conv2d_forward(bf16_values(bf16_bits(x)).astype(np.float64), w, None, stride, pad)
    p, q = (h + 2 * pad - ks) // stride + 1, (w_ + 2 * pad - ks) // stride + 1
    dy = rng.standard_normal((n, k, p, q)).astype(np.float32)
    want = np.zeros(w.shape)
    ref.conv2d_backward(bf16_values(bf16_bits(dy)).astype(np.float64), cache, want, None, need_dx=False)
    err = ctypes.create_string_buffer(512)
    out = []
    for dy16, dys in ((0, dy), (1, bf16_bits(dy))):
        part = np.full((blocks, 64, 32), np.nan, np.float32)
        out.append(np.ones(w.shape, np.float32))
        _check(emu_small_tc.emu_small_filter_tc(_ptr(dys), dy16, _ptr(x), _ptr(part), _ptr(out[-1]), n, c, h, w_, k,
                                                ks, ks, stride, pad, p, q, blocks, 9, err, 512), err)
    np.testing.assert_allclose(out[0], want + 1, rtol=0, atol=RTOL_EMULATED * np.sqrt(n * p * q) * np.abs(want).max())
    np.testing.assert_array_equal(out[1], out[0])
