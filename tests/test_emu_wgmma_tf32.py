"""The emulator's wgmma m64nNk8 .tf32 (tests/cuda_emu/cuda_emu.h hn_wgmma_tf32) on its own: one warpgroup stores
A [64, 32] and B [64, 32] (K-major float32 words, full mantissas) in shared memory with the 128-byte swizzle or in
8 x 4 core matrices, runs 4 m64n64k8 (K steps by the descriptors' start address) into accumulators loaded from D and
writes them back by the accumulator fragment layout: D + A B^T of the inputs with their low 13 bits dropped.
Needs g++ (skipped without); no GPU."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
from emu_build import build_emulated

KERNEL = """
// byte offset of element (row, k) of a K-major 64 x 32 float32 tile: 128-byte swizzle (mode 1), or core matrices of
// 8 rows x 16 bytes, 128 bytes apart along K (leading byte offset) and 1024 along rows (stride byte offset)
static unsigned tile_at(int mode, int row, int k) {
    if (mode == 0) return (row / 8) * 1024 + (k / 4) * 128 + (row % 8) * 16 + (k % 4) * 4;
    const unsigned a = (row / 8) * 1024 + (row % 8) * 128 + k * 4;
    return a ^ (((a >> 7) & 7) << 4);
}
static unsigned long long desc(unsigned start, int mode) {
    return (start >> 4) | (128ull >> 4) << 16 | (1024ull >> 4) << 32 | (unsigned long long)mode << 62;
}
__global__ void wgmma_tf32(const float* a, const float* b, float* d, int mode, int fence) {
    HN_DYNAMIC_SMEM(smem);
    const int t = threadIdx.x, warp = t / 32, ln = t % 32;
    for (int c = t; c < 2 * 64 * 8; c += 128) {   // 16-byte chunks: A's then B's (at 8192)
        const float* src = (c < 512 ? a : b) + (c % 512) * 4;
        hn_sts4(smem + (c < 512 ? 0 : 8192) + tile_at(mode, c % 512 / 8, c % 8 * 4), hn_bits(src[0]), hn_bits(src[1]),
                hn_bits(src[2]), hn_bits(src[3]));
    }
    if (fence) hn_fence_proxy_async();
    __syncthreads();
    float acc[8][4];   // d_i at row 16 warp + lane / 4 + 8 ((i / 2) % 2), column 8 (i / 4) + 2 (lane % 4) + i % 2
    auto at = [&](int i) { return (16 * warp + ln / 4 + 8 * ((i / 2) % 2)) * 64 + 8 * (i / 4) + 2 * (ln % 4) + i % 2; };
    for (int i = 0; i < 32; ++i) acc[i / 4][i % 4] = hn_ldg(d + at(i));
    hn_wgmma_fence();
    for (int j = 0; j < 4; ++j)   // K step j: the tiles' start addresses at element (0, 8 j)
        hn_wgmma_tf32<64>(acc, desc(tile_at(mode, 0, 8 * j), mode), desc(8192 + tile_at(mode, 0, 8 * j), mode));
    hn_wgmma_commit();
    hn_wgmma_wait<0>();
    for (int i = 0; i < 32; ++i) hn_st(d + at(i), acc[i / 4][i % 4]);
}
extern "C" int emu_wgmma_tf32(const float* a, const float* b, float* d, int mode, int fence, char* err, int len) {
    emu::S().ranges = {{(const unsigned char*)a, 64 * 32 * 4, false}, {(const unsigned char*)b, 64 * 32 * 4, false},
                       {(const unsigned char*)d, 64 * 64 * 4, true}};
    std::string msg = emu::launch({1, 1, 1}, {128, 1, 1}, 16384, [=] { wgmma_tf32(a, b, d, mode, fence); }, 1);
    snprintf(err, len, "%s", msg.c_str());
    return msg.empty() ? 0 : 1;
}
"""


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    return build_emulated(tmp_path_factory.mktemp("emu"), "wgmma_tf32", KERNEL)


def _run(emu, a, b, d, mode, fence):
    err = ctypes.create_string_buffer(512)
    p = lambda x: ctypes.c_void_p(x.ctypes.data)  # noqa: E731
    rc = emu.emu_wgmma_tf32(p(a), p(b), p(d), mode, fence, err, len(err))
    return rc, err.value.decode()


def _tf32(x):
    return (x.view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32).astype(np.float64)


@pytest.mark.parametrize("mode", [0, 1], ids=["no-swizzle", "swizzle128"])
def test_wgmma_tf32(emu, rng, mode):
    a = rng.standard_normal((64, 32)).astype(np.float32)
    b = rng.standard_normal((64, 32)).astype(np.float32)
    d = rng.standard_normal((64, 64)).astype(np.float32)
    want = d.astype(np.float64) + _tf32(a) @ _tf32(b).T
    rc, msg = _run(emu, a, b, d, mode, 1)
    assert rc == 0, msg
    assert np.abs(d - want).max() <= 1e-5 * np.abs(want).max()


def test_wgmma_tf32_missing_fence(emu, rng):
    a, b, d = (np.ones((64, n), np.float32) for n in (32, 32, 64))
    rc, msg = _run(emu, a, b, d, 1, 0)
    assert rc == 1 and "no fence.proxy.async" in msg, msg
