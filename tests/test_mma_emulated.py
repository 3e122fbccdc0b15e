"""mma.cu's tensor-core GEMM kernels run on the CPU: tests/cuda_emu executes each CUDA thread as a fiber with the
PTX instructions (mma.sync, ldmatrix, cp.async) emulated from the PTX ISA's fragment tables, and checks every
shared-memory access for races, reads of unwritten words and cp.async data read before it landed, and every global
access against the launch's buffers. The launches are mma.py's own plans (views, tile choice, split-K, batching),
so this covers the launcher too. Results must match float64 of the inputs rounded as the kernels round them
(tf32 / bf16) within RTOL_EMULATED: only float32 accumulation order remains.

Needs g++ (skipped without); no GPU. The GPU versions of these checks are tests/test_mma.py.
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
from conftest import RTOL_EMULATED, RTOL_TC, rel_err
from emu_backend import EmulatedBackend, build_libraries, route_kernels, run_conv, small_tc_text
from emu_build import EMU_DIR, build_emulated
from halo_cases import HALO_CASES, check_halo, sandbox
from tma_cases import POOL_SHAPES as TMA_POOL_SHAPES
from tma_cases import SHAPES as TMA_SHAPES
from tma_cases import run_ops as run_tma_ops
from mma_cases import (CONV16_SHAPES, CONV32_SHAPES, CONV_SHAPES, POOL16_SHAPES, POOL32_SHAPES, SHAPES,
                       conv_data_expected, conv_data_inputs, conv_expected, conv_filter_expected, conv_filter_inputs,
                       bf16_bits, conv_inputs, dy_t_host, expected, max_pool_2x2, nhwc16, nhwc_copy, stored,
                       turned_copy)

from hetnet.backends.cuda import kernels
from hetnet.backends.cuda import mma as mm
from hetnet.backends.cuda.mma_tiles import LAYOUTS, TILES, TILES16, TILES16T, TILES16W
from hetnet.bench.common import GEMM_RTOL

SMS = 4      # a small "GPU", so that split-K and the choice between tiles happen at emulator sizes


# mma.cu's division by a launch-invariant divisor (HnDiv), called from Python on arrays of dividends
EMU_DIV = """
extern "C" void emu_div(const int* x, int n, int d, int* q) {
    const HnDiv v = hn_div_of(d);
    for (int i = 0; i < n; ++i) q[i] = hn_div(x[i], v);
}
"""


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    """mma.cu with its entry points, compiled as C++ against the emulator into a shared library."""
    return build_emulated(tmp_path_factory.mktemp("emu"), "mma_emu", kernels.cu_text("mma") + EMU_DIV,
                          EMU_DIR / "gemm_launch.cpp", launchers_of=small_tc_text())


def _span(x, items: int, stride: int) -> tuple[int, int]:
    """(address, bytes) of every element of `items` copies of the 2-D view x, `stride` elements apart."""
    if x.size == 0:
        return x.ctypes.data, 0
    last = sum((n - 1) * s for n, s in zip(x.shape, x.strides)) + x.itemsize
    return x.ctypes.data, last + (items - 1) * stride * x.itemsize


def run(emu, call: mm.GemmCall, seed: int = 0) -> None:
    """Execute a plan on the emulator (NumPy arrays), as mma.launch does on a GPU; fails the test on any error the
    emulator reports."""
    if call is None:
        return
    if call.prescale is not None:
        if call.prescale == 0.0:
            call.c_all[...] = 0
        else:
            call.c_all *= np.float32(call.prescale)
    items = call.grid[2] // call.splits
    spans = [_span(x, items, s) for x, s in ((call.a, call.stride_a), (call.b, call.stride_b),
                                              (call.c, call.stride_c))]
    args = call.args(lambda x: x.ctypes.data)
    err = ctypes.create_string_buffer(1024)
    kernel = ctypes.cast(getattr(emu, call.kernel), ctypes.c_void_p)
    c = ctypes
    rc = emu.emu_gemm(kernel, c.c_uint(call.grid[0]), c.c_uint(call.grid[1]), c.c_uint(call.grid[2]),
                      c.c_uint(call.tile.threads), c.c_int(call.tile.smem_bytes),
                      c.c_void_p(spans[0][0]), c.c_longlong(spans[0][1]), c.c_void_p(spans[1][0]),
                      c.c_longlong(spans[1][1]), c.c_void_p(spans[2][0]), c.c_longlong(spans[2][1]),
                      *(c.c_int(int(v)) for v in args[3:9]), *(c.c_longlong(int(v)) for v in args[9:12]),
                      c.c_float(float(args[12])), c.c_float(float(args[13])), c.c_int(int(args[14])),
                      c.c_int(int(args[15])), c.c_uint(seed), err, c.c_int(len(err)))
    assert rc == 0, f"{call.kernel} grid {call.grid}: {err.value.decode()}"


def check(emu, rng, precision, layout, m, n, k, alpha=1.0, beta=0.0, tile=None, splits=None, pad=0, what=""):
    """One GEMM through plan + emulator: c (a column slice of a NaN-poisoned parent when beta == 0) against the
    float64 result of the rounded inputs; the parent outside c is unchanged."""
    ta, tb = layout[0] == "t", layout[1] == "t"
    a, _ = stored(rng, m, k, ta, pad)
    b, _ = stored(rng, k, n, tb, pad)
    c, parent = stored(rng, m, n, False, pad + 2)
    if beta == 0:
        parent[...] = np.nan
    c0, before = c.copy(), parent.copy()
    call = mm.plan(c, a, ta, b, tb, alpha, beta, precision, SMS, tile, splits)
    run(emu, call, seed=int(rng.integers(2**31)))
    err = rel_err(c, expected(a, ta, b, tb, c0, alpha, beta, precision))
    assert err <= RTOL_EMULATED, f"{what} {precision} {layout} {(m, n, k)} tile {tile}: relative error {err:.3g}"
    outside = np.ones(parent.shape, bool)
    outside[:, 1 + pad // 2: 1 + pad // 2 + n] = False
    np.testing.assert_array_equal(parent[outside], before[outside], f"{what}: wrote outside c")
    return call


def test_tolerances_agree():
    assert GEMM_RTOL == RTOL_TC


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("tile", TILES, ids=lambda t: f"{t.precision}-{t.name}")
def test_every_tile_and_layout(emu, rng, tile, layout):
    """Each entry point at shapes with tails in M, N and K, more than one block, beta 0 (C poisoned) and not."""
    check(emu, rng, tile.precision, layout, 33, 19, 45, alpha=0.7, tile=tile.name)
    check(emu, rng, tile.precision, layout, 130, 70, 100, alpha=-1.5, beta=0.5, tile=tile.name)


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES)
def test_odd_shapes(emu, rng, precision, shape):
    """Sizes 1 and odd, K = 1 and long K (several pipeline rounds), through the launcher's own tile choice, in a
    layout that varies with the shape."""
    layout = LAYOUTS[SHAPES.index(shape) % 4]
    check(emu, rng, precision, layout, *shape, alpha=1.0, beta=1.0 if shape[2] % 2 else 0.0)


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_unaligned_views(emu, rng, precision):
    """Row strides that are not multiples of 4 floats and views that start off 16-byte boundaries take the
    4-byte copy / scalar load paths, and odd ldc the scalar stores."""
    for layout in LAYOUTS:
        check(emu, rng, precision, layout, 37, 21, 43, beta=2.0, pad=1, what="pad 1")
        check(emu, rng, precision, layout, 20, 22, 36, pad=3, what="pad 3")


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_split_k(emu, rng, precision):
    """K split over blockIdx.z with atomics into C, which the launcher zeroes (beta 0) or scales (beta != 0)
    first; the last part shorter than the others."""
    for beta in (0.0, 1.0, -0.5):
        call = check(emu, rng, precision, "nt", 40, 24, 610, alpha=0.5, beta=beta, splits=3, what="split")
        assert call.splits == 3 and call.kchunk * 2 < 610 <= call.kchunk * 3
    call = check(emu, rng, precision, "tn", 17, 9, 1000, what="automatic split")   # few tiles, long K
    assert call.splits > 1, "the launcher did not split K for a problem with fewer tiles than SMs"


def test_k_zero_and_empty(emu, rng):
    """K = 0 gives beta * C (alpha * an empty sum); an empty C launches nothing."""
    check(emu, rng, "tf32", "nn", 9, 5, 0, beta=0.5)
    check(emu, rng, "bf16", "tt", 9, 5, 0)
    assert mm.plan(np.zeros((0, 4), np.float32), np.zeros((0, 3), np.float32), False, np.zeros((3, 4), np.float32),
                   False) is None


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_batched(emu, rng, precision):
    """grid.z over a batch: per-item strides, the same A for every item (stride 0), a transposed B per item, C
    items as slices of a larger array."""
    n_items, m, n, k = 3, 21, 35, 70
    a = rng.standard_normal((1, m, k)).astype(np.float32)
    b = rng.standard_normal((n_items, n, k)).astype(np.float32).transpose(0, 2, 1)     # items [k, n], transposed
    parent = rng.standard_normal((n_items, m, n + 5)).astype(np.float32)
    c = parent[:, :, 2:2 + n]
    for beta, splits in ((0.0, None), (1.0, None), (0.5, 2)):
        c0 = c.copy()
        if beta == 0:
            c[...] = np.nan
        call = mm.plan_batched(c, a, False, b, False, 1.0, beta, precision, SMS, splits=splits)
        assert call.layout == "nt" and call.stride_a == 0 and call.grid[2] == n_items * call.splits
        assert call.splits == (splits or 1) and call.c_all is c
        run(emu, call)
        for i in range(n_items):
            want = expected(a[0], False, b[i], False, c0[i], 1.0, beta, precision)
            assert rel_err(c[i], want) <= RTOL_EMULATED, f"item {i}, beta {beta}, splits {splits}"


def test_launcher_checks():
    """Wrong dtype, shapes that do not chain, rows that are not contiguous either way, an unknown precision or
    tile: ValueError before any launch."""
    f32 = np.zeros((4, 6), np.float32)
    with pytest.raises(ValueError, match="float32"):
        mm.plan(np.zeros((4, 4)), f32, False, f32, True)
    with pytest.raises(ValueError, match="does not give"):
        mm.plan(np.zeros((4, 5), np.float32), f32, False, f32, True)
    with pytest.raises(ValueError, match="contiguous rows"):
        mm.plan(np.zeros((4, 4), np.float32), np.zeros((4, 12), np.float32)[:, ::2], False, f32, True)
    with pytest.raises(ValueError, match="precision"):
        mm.plan(np.zeros((4, 4), np.float32), f32, False, f32, True, precision="fp16")
    with pytest.raises(ValueError, match="no tf32 tile"):
        mm.plan(np.zeros((4, 4), np.float32), f32, False, f32, True, tile="1x1")
    with pytest.raises(ValueError, match="overlap"):
        mm.plan_batched(np.broadcast_to(np.zeros((1, 4, 4), np.float32), (3, 4, 4)), np.zeros((3, 4, 6), np.float32),
                        False, np.zeros((3, 4, 6), np.float32), True)


def test_views_as_cuda_backend_gemm_takes_them(emu, rng):
    """The conv launcher's calls: a transposed view for a (dyk as dy.T), a column slice for c (yk[:, n0:n1])."""
    dy = rng.standard_normal((10, 6)).astype(np.float32)        # [N, K]: dyk = dy.T, a [K, N] view
    w2 = rng.standard_normal((6, 27)).astype(np.float32)
    dcol = np.full((27, 10), np.nan, np.float32)
    run(emu, mm.plan(dcol, w2, True, dy.T, False, precision="tf32", sms=SMS))     # dcol = w2^T @ dyk
    assert rel_err(dcol, expected(w2, True, dy.T, False, None, 1.0, 0.0, "tf32")) <= RTOL_EMULATED
    yk = np.full((6, 40), np.nan, np.float32)
    col = rng.standard_normal((27, 16)).astype(np.float32)
    run(emu, mm.plan(yk[:, 8:24], w2, False, col, False, precision="bf16", sms=SMS))
    assert rel_err(yk[:, 8:24], expected(w2, False, col, False, None, 1.0, 0.0, "bf16")) <= RTOL_EMULATED
    assert np.isnan(yk[:, :8]).all() and np.isnan(yk[:, 24:]).all()


def test_choice():
    """M or N within the small tile: the small tile; otherwise the large one, its K sum split only when its blocks
    do not fill the SMs and K is long (a filter gradient: 128 filters x 576 taps, K = the batch's pixels)."""
    large, small = (mm.tile_named("bf16", name) for name in mm.CHOICE["bf16"])
    assert all(mm.tile_named(p, name) for p in mm.CHOICE for name in mm.CHOICE[p])
    assert mm.choose("bf16", 64, 64) is small
    assert mm.choose("bf16", 64, 512 * 1024) is small                 # the first convolution: 64 filters
    assert mm.choose("bf16", 256, 512 * 1024) is large
    assert mm.choose("tf32", 128, 576) is mm.tile_named("tf32", mm.CHOICE["tf32"][0])
    assert mm.split_k(large, 256, 512 * 1024, 2304, 1, 132) == 1
    assert mm.split_k(large, 128, 576, 512 * 1024, 1, 132) > 1
    assert mm.split_k(small, 64, 64, 64, 1, 132) == 1


def test_split_k_waves():
    """A convolution filter gradient's K parts fill whole waves of blocks (t.min_blocks on each SM): cifar-speed's
    [256, 7x7] gradient at batch 1024 on the H200's 132 SMs (18 blocks of 128 x 256, 784 K tiles) in 7 parts, one
    wave, not 15 (270 blocks: two waves and 6 blocks, a third wave for 2% of the work); on two blocks per SM the
    wave is twice as large; a part never shorter than MIN_SPLIT_TILES tiles, never more than MAX_SPLITS parts."""
    w = {t.name: t for t in mm.TILES16W["filter"]}
    assert mm.split_k_waves(w["w128x256s4"], 256, 2304, 49 * 1024, 132) == 7
    assert mm.split_k_waves(w["w128x128s3b2"], 256, 2304, 9 * 1024, 132) == 7        # 252 of 264 blocks
    assert mm.split_k_waves(w["w128x256s4"], 64, 216, 961 * 1024, 132) == mm.MAX_SPLITS
    assert mm.split_k_waves(w["w128x256s4"], 256, 2304, 8 * 64 * 3, 132) == 3        # 24 K tiles: parts of 8
    assert mm.split_k_waves(w["w128x256s4"], 256, 2304, 64, 132) == 1
    for k in (1, 64 * 7, 64 * 100, 64 * 10_000):
        parts = mm.split_k_waves(w["w128x128s4"], 200, 900, k, 132)
        assert 1 <= parts <= mm.MAX_SPLITS and (parts == 1 or -(-k // 64) // parts >= mm.MIN_SPLIT_TILES)


def test_split_k_parts_at_fp32_are_short():
    """At fp32 (split copies) every part of the filter gradient's K sum is at most FP32_PART terms, however many
    parts that takes (cifar-wide's conv2 at batch 512: 524,288 terms, 256 parts, where the waves alone would take
    26); tf32's tiles, which round their inputs anyway, keep the waves' count."""
    split, tf32 = mm.TILES32X3["filter"][0], mm.TILES32["filter"][0]
    assert (split.split, tf32.split) == (1, 0)
    k = 512 * 32 * 32
    assert mm.split_k_waves(tf32, 128, 576, k, 132) <= mm.MAX_SPLITS
    for kk in (k, 3 * mm.FP32_PART + 1, 100):
        parts = mm.split_k_waves(split, 128, 576, kk, 132)
        assert -(-kk // parts) <= mm.FP32_PART and parts >= -(-kk // mm.FP32_PART), (kk, parts)
    assert mm.split_k_waves(split, 128, 576, k, 132) == k // mm.FP32_PART


def test_runner_without_a_gpu(capsys):
    """benchmarks/kernels/run_tc_gemm.py imports without CuPy, lists its problems (cifar-wide's convolutions from
    the spec: 6 distinct shapes, 3 GEMMs each), and a bad --layers is a one-line error with status 2."""
    run_tc = sandbox("run_tc_gemm")
    assert run_tc.main(["--list", "--sets", "conv"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 18 and "conv2 64->128 32x32" in lines[3] and "nn 128 x 524288 x 576" in lines[3]
    assert run_tc.main(["--list", "--layers", "7"]) == 2
    assert capsys.readouterr().err.startswith("error: --layers")


# --- the implicit-GEMM forward convolution (mma.cu HN_CONV, mma.plan_conv) -------------------------------------------

def check_conv(emu, rng, precision, shape, bias=True, act=0, tile=None):
    """One convolution through plan_conv + emulator: y (NaN-poisoned) against float64 of the rounded x and w."""
    stride, pad = shape[7:]
    x, wt, b, y = conv_inputs(rng, shape, bias)
    call = mm.plan_conv(y, x, wt, b, stride, pad, act, precision, tile)
    run_conv(emu, call, seed=int(rng.integers(2**31)))
    err = rel_err(y, conv_expected(x, wt, b, stride, pad, act, precision))
    assert err <= RTOL_EMULATED, f"{precision} {shape} tile {call.tile.name}: relative error {err:.3g}"
    return call


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
@pytest.mark.parametrize("shape", CONV_SHAPES)
def test_conv_forward(emu, rng, precision, shape):
    """Every shape through the launcher's tile choice, with a bias and ReLU on every other shape, and without."""
    k = CONV_SHAPES.index(shape)
    check_conv(emu, rng, precision, shape, bias=k % 2 == 0, act=k % 2)
    check_conv(emu, rng, precision, shape, bias=k % 2 == 1, act=0)


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_conv_forward_each_tile(emu, rng, precision):
    """Both tiles of CONV_CHOICE on a shape with tails in M, N and K, more than one block each way."""
    for name in mm.CONV_CHOICE[precision]:
        call = check_conv(emu, rng, precision, (2, 7, 10, 13, 140, 3, 3, 1, 1), act=1, tile=name)
        assert call.tile.name == name and call.grid[0] > 1 and call.grid[1] > 1


def check_conv_data(emu, rng, precision, shape, mask=True, tile=None):
    """One data gradient through plan_conv_data + emulator: dx (NaN-poisoned) against float64 of the rounded dy, w."""
    stride, pad = shape[7:]
    dy, w, relu_x, dx = conv_data_inputs(rng, shape, mask)
    call = mm.plan_conv_data(dx, dy, w, relu_x, stride, pad, precision, tile)
    run_conv(emu, call, seed=int(rng.integers(2**31)))
    err = rel_err(dx, conv_data_expected(dy, w, relu_x, shape, precision))
    assert err <= RTOL_EMULATED, f"data {precision} {shape} tile {call.tile.name}: relative error {err:.3g}"
    return call


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
@pytest.mark.parametrize("shape", CONV_SHAPES)
def test_conv_data_gradient(emu, rng, precision, shape):
    """Every shape through the launcher's tile choice, with the ReLU mask and without: taps between stride
    positions and past the output add nothing, pixels no window reads get zero."""
    check_conv_data(emu, rng, precision, shape, mask=True)
    check_conv_data(emu, rng, precision, shape, mask=False)


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_conv_data_gradient_each_tile(emu, rng, precision):
    """Both tiles of CONV_CHOICE on a shape with tails in M (input channels), N and K, more than one block each way."""
    for name in mm.CONV_CHOICE[precision]:
        call = check_conv_data(emu, rng, precision, (2, 140, 10, 7, 9, 3, 3, 1, 1), tile=name)
        assert call.tile.name == name and call.grid[0] > 1 and call.grid[1] > 1


def check_conv_filter(emu, rng, precision, shape, tile=None, splits=None):
    """One filter gradient through plan_conv_filter + emulator: dw (which it adds into) against float64 of the
    rounded dy and x."""
    stride, pad = shape[7:]
    dy, x, dw0 = conv_filter_inputs(rng, shape)
    dw = dw0.copy()
    call = mm.plan_conv_filter(dw, dy, x, stride, pad, precision, SMS, tile, splits)
    run_conv(emu, call, seed=int(rng.integers(2**31)))
    err = rel_err(dw, conv_filter_expected(dy, x, dw0, shape, precision))
    assert err <= RTOL_EMULATED, (f"filter {precision} {shape} tile {call.tile.name} splits {call.splits}: relative "
                                  f"error {err:.3g}")
    return call


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
@pytest.mark.parametrize("shape", CONV_SHAPES)
def test_conv_filter_gradient(emu, rng, precision, shape):
    """Every shape through the launcher's tile and split choice (a small emulated GPU: K is split where it is long
    enough), added into dw."""
    call = check_conv_filter(emu, rng, precision, shape)
    assert call.splits == mm.split_k_waves(call.tile, call.m, call.n, call.k, SMS)


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_conv_filter_gradient_each_tile_and_split(emu, rng, precision):
    """Both tiles of CONV_CHOICE unsplit and in three K parts (atomics into dw), the last part shorter; tails in M,
    N and K."""
    shape = (3, 9, 9, 11, 70, 3, 3, 1, 1)
    for name in mm.CONV_CHOICE[precision]:
        for splits in (1, 3):
            call = check_conv_filter(emu, rng, precision, shape, tile=name, splits=splits)
            assert call.tile.name == name and call.splits == splits
            if splits == 3:
                assert call.kchunk * 2 < call.k <= call.kchunk * 3
    call = check_conv_filter(emu, rng, precision, (8, 3, 12, 12, 5, 3, 3, 1, 1))      # 8 x 144 pixels: split
    assert call.splits > 1, "the launcher did not split a long K over the idle SMs"


def test_conv_launcher():
    """The tile choice by size; shapes that do not fit, other dtypes and unknown tiles: ValueError."""
    large, small = (mm.tile_named("bf16", name) for name in mm.CONV_CHOICE["bf16"])
    assert mm.choose("bf16", 64, 512 * 1024, mm.CONV_CHOICE) is small
    assert mm.choose("bf16", 256, 512 * 1024, mm.CONV_CHOICE) is large
    x, w = np.zeros((2, 3, 8, 8), np.float32), np.zeros((4, 3, 3, 3), np.float32)
    with pytest.raises(ValueError, match="fit together"):
        mm.plan_conv(np.zeros((2, 4, 8, 8), np.float32), x, w, None, 1, 0)
    with pytest.raises(ValueError, match="contiguous float32"):
        mm.plan_conv(np.zeros((2, 4, 6, 6)), x, w, None, 1, 0)
    with pytest.raises(ValueError, match="no convolution kernel"):
        mm.plan_conv(np.zeros((2, 4, 6, 6), np.float32), x, w, None, 1, 0, tile="128x128x32s2a", precision="bf16")
    assert mm.plan_conv(np.zeros((0, 4, 6, 6), np.float32), x[:0], w, None, 1, 0) is None


# --- the channels-last bf16 convolutions (mma.cu HN_CONV16, mma.plan_conv16 / _data / _filter) --------------------

def _fits16(op, shape, precision="bf16"):
    n, c, h, w, o, r, s, stride, pad = shape
    return mm.conv16_fits(op, c, o, r, s, stride, pad, precision)


CL_CASES = [("bf16", s) for s in CONV16_SHAPES] + [(p, s) for p in ("tf32", "fp32") for s in CONV32_SHAPES]


@pytest.mark.parametrize(("precision", "shape"), CL_CASES, ids=str)
def test_conv16(emu, rng, precision, shape):
    """Each op of each channels-last tile (bf16: HN_CONV16, HN_CONV16W; tf32 and fp32: HN_CONV32W, HN_CONV32F, fp32
    on split copies; data gradient with and without the mask, forward with bias + ReLU and without, filter gradient
    added into dw, split and not) on the channels-last copies of NCHW inputs (bf16, float32 rounded to tf32, or split
    into two tf32 parts), against float64 of the rounded inputs (fp32: of the inputs themselves); outputs poisoned with
    NaN where they are written, not read."""
    check_cl_ops(emu, rng, precision, shape, {op: mm.tiles16(op, precision) for op in ("fwd", "filter")})


def check_cl_ops(emu, rng, precision, shape, tiles: dict, by_name: bool = True):
    """test_conv16's checks of the "fwd" tiles (forward and data gradient) and "filter" tiles of `tiles`, each planned
    by its name (by_name: the tables' tiles) or given itself (a sandbox's); an r tile reads dy_t's copy of dy."""
    stride, pad = shape[7:]
    for k, tile in enumerate(tiles["fwd"]):
        arg = tile.name if by_name else tile
        if _fits16("fwd", shape, precision):
            x, w, b, y = conv_inputs(rng, shape, bias=k % 2 == 0)
            run_conv(emu, mm.plan_conv16(y, nhwc_copy(x, precision), nhwc_copy(w, precision), b, stride, pad,
                                         1 - k % 2, arg))
            err = rel_err(y, conv_expected(x, w, b, stride, pad, 1 - k % 2, precision))
            assert err <= RTOL_EMULATED, f"fwd {shape} {tile.name}: relative error {err:.3g}"
        if _fits16("data", shape, precision):
            dy, w, relu_x, dx = conv_data_inputs(rng, shape, mask=k % 2 == 0)
            run_conv(emu, mm.plan_conv16_data(dx, nhwc_copy(dy, precision), turned_copy(w, precision), relu_x, pad,
                                              arg))
            err = rel_err(dx, conv_data_expected(dy, w, relu_x, shape, precision))
            assert err <= RTOL_EMULATED, f"data {shape} {tile.name}: relative error {err:.3g}"
    for tile in tiles["filter"]:
        arg = tile.name if by_name else tile
        for splits in (1, 3):
            if _fits16("filter", shape, precision):
                dy, x, dw0 = conv_filter_inputs(rng, shape)
                c = shape[1]
                part0 = np.zeros((*dw0.shape[:1], *dw0.shape[2:], mm.padded_channels(c, precision)), np.float32)
                part0[..., :c] = dw0.transpose(0, 2, 3, 1)              # [O, R, S, Cp] (x's copy padded), added into
                part = part0.copy()
                dy16 = nhwc_copy(dy, precision)
                call = mm.plan_conv16_filter(part, dy16, nhwc_copy(x, precision), stride, pad, SMS, arg, splits,
                                             lambda dy16=dy16: dy_t_host(dy16))
                run_conv(emu, call)
                want = conv_filter_expected(dy, x, dw0, shape, precision).transpose(0, 2, 3, 1)
                err = rel_err(part[..., :c] - part0[..., :c], want - part0[..., :c])
                assert err <= RTOL_EMULATED, f"filter {shape} {tile.name} splits {call.splits}: {err:.3g}"
                assert not part[..., c:].any(), "the padded channels' gradient"


@pytest.mark.parametrize(("precision", "shape"), [("bf16", s) for s in POOL16_SHAPES]
                         + [(p, s) for p in ("tf32", "fp32") for s in POOL32_SHAPES], ids=str)
def test_conv16_pool(emu, rng, precision, shape):
    """The pooled forward (HN_CONV16 / HN_CONV16W EPI 4) of each tile, with bias + ReLU and without: y and the
    argmax bytes exactly max_pool_2x2 of the same tile's forward (each output's sum in the same order), y within the
    emulated tolerance of float64 too; both poisoned first (the bytes as NaN's), so every element is written.
    Shapes: odd P and Q (a row and column in no window), pooled counts that are not a multiple of 4, M over one
    tile, N over several."""
    check_pool(emu, rng, precision, shape, mm.tiles16("pool", precision))


def check_pool(emu, rng, precision, shape, tiles, by_name: bool = True):
    """test_conv16_pool's checks of `tiles`, each planned by its name (by_name) or given itself (a sandbox's)."""
    n, c, h, w_, o, r, s, stride, pad = shape
    for k, tile in enumerate(tiles):
        arg = tile.name if by_name else tile
        act = k % 2
        x, w, b, y = conv_inputs(rng, shape, bias=act == 1)
        x[0, 0, 0, :3] = x[0, 0, 0, 0]                      # equal inputs: ties inside some windows
        x16, w16 = nhwc_copy(x, precision), nhwc_copy(w, precision)
        run_conv(emu, mm.plan_conv16(y, x16, w16, b, stride, pad, act, arg))
        want_y, want_arg = max_pool_2x2(y)
        buf, py, parg = mm.pooled_outputs(np, n, o, *want_y.shape[2:])
        buf[:] = np.nan
        call = mm.plan_conv16_pool(buf, x16, w16, b, stride, pad, act, arg)
        assert call.tile is tile and call.kchunk == n * want_y.shape[2] * want_y.shape[3]
        run_conv(emu, call)
        np.testing.assert_array_equal(py, want_y, err_msg=f"{shape} {tile.name}: y")
        np.testing.assert_array_equal(parg, want_arg, err_msg=f"{shape} {tile.name}: argmax")
        err = rel_err(py, max_pool_2x2(conv_expected(x, w, b, stride, pad, act, precision))[0])
        assert err <= RTOL_EMULATED, f"{shape} {tile.name}: relative error {err:.3g}"


@pytest.mark.parametrize("tile", [t.name for t in mm.tiles16("fwd", "bf16")])
def test_conv16_out16(emu, rng, tile):
    """The forward, the pooled forward and the data gradient (with and without the mask) with the output stored in
    bf16 (mma.OUT16, the hand-overs to a batch norm): its bits are bf16 (round to nearest even) of the same tile's
    float32 output, every element written (poisoned first), the argmax bytes the same. Planes odd (one bf16 store
    at a time) and even (pairs)."""
    for shape in ((2, 8, 7, 9, 16, 3, 3, 1, 1), (4, 8, 16, 18, 16, 3, 3, 1, 1)):
        n, c, h, w_, o, r, s, stride, pad = shape
        x, w, b, y = conv_inputs(rng, shape, bias=True)
        x16, w16 = nhwc16(x, 8), nhwc16(w, 8)
        run_conv(emu, mm.plan_conv16(y, x16, w16, b, stride, pad, 1, tile))
        y16 = np.full(y.shape, 0xFFFF, np.uint16)
        run_conv(emu, mm.plan_conv16(y16, x16, w16, b, stride, pad, 1 | mm.OUT16, tile))
        np.testing.assert_array_equal(y16, bf16_bits(y), err_msg=f"{shape} {tile}: forward")
        buf, py, parg = mm.pooled_outputs(np, n, o, h // 2, w_ // 2)
        buf[:] = np.nan
        run_conv(emu, mm.plan_conv16_pool(buf, x16, w16, b, stride, pad, 0, tile))
        buf16, py16, parg16 = mm.pooled_outputs(np, n, o, h // 2, w_ // 2, out16=True)
        buf16[:] = 0xFFFF
        run_conv(emu, mm.plan_conv16_pool(buf16, x16, w16, b, stride, pad, mm.OUT16, tile))
        np.testing.assert_array_equal(py16, bf16_bits(py), err_msg=f"{shape} {tile}: pooled")
        np.testing.assert_array_equal(parg16, parg, err_msg=f"{shape} {tile}: argmax")
        for mask in (False, True):
            dy, wd, relu_x, dx = conv_data_inputs(rng, shape, mask=mask)
            dy16, wt16 = nhwc_copy(dy, "bf16"), turned_copy(wd, "bf16")
            run_conv(emu, mm.plan_conv16_data(dx, dy16, wt16, relu_x, pad, tile))
            dx16 = np.full(dx.shape, 0xFFFF, np.uint16)
            run_conv(emu, mm.plan_conv16_data(dx16, dy16, wt16, relu_x, pad, tile, out16=True))
            np.testing.assert_array_equal(dx16, bf16_bits(dx), err_msg=f"{shape} {tile}: data gradient, mask {mask}")
    with pytest.raises(ValueError, match="contiguous uint16"):
        mm.plan_conv16(y, x16, w16, b, stride, pad, mm.OUT16, tile)


def test_conv16_pool_nan(emu, rng):
    """A NaN input poisons the outputs whose windows read it: the pooled forward takes maxpool_fwd's rule (NaN wins,
    the first NaN of the window), as max_pool_2x2 of the forward does (NumPy's argmax: the first NaN)."""
    shape = (2, 8, 7, 9, 16, 3, 3, 1, 1)
    n, c, h, w_, o, r, s, stride, pad = shape
    for tile in (TILES16["pool"][1], TILES16W["pool"][0]):
        x, w, b, y = conv_inputs(rng, shape, bias=True)
        x[0, 3, 2, 4] = np.nan
        x16, w16 = nhwc16(x, 8), nhwc16(w, 8)
        run_conv(emu, mm.plan_conv16(y, x16, w16, b, stride, pad, 0, tile.name))
        want_y, want_arg = max_pool_2x2(y)
        assert np.isnan(want_y).any() and not np.isnan(want_y).all()
        buf, py, parg = mm.pooled_outputs(np, n, o, *want_y.shape[2:])
        buf[:] = 7.0
        run_conv(emu, mm.plan_conv16_pool(buf, x16, w16, b, stride, pad, 0, tile.name))
        np.testing.assert_array_equal(py, want_y, err_msg=tile.name)
        np.testing.assert_array_equal(parg, want_arg, err_msg=tile.name)


def test_conv16_launcher():
    """Which shapes HN_CONV16 takes, the tile by size, and what does not fit: ValueError."""
    assert mm.conv16_fits("fwd", 8, 12, 3, 3, 2, 1) and mm.conv16_fits("fwd", 3, 8, 3, 3, 1, 1)   # (x padded)
    assert not mm.conv16_fits("filter", 8, 12, 3, 3, 1, 1) and mm.conv16_fits("filter", 3, 16, 3, 3, 2, 1)
    assert mm.conv16_fits("data", 3, 16, 3, 3, 1, 2) and not mm.conv16_fits("data", 8, 16, 3, 3, 2, 1)
    assert not mm.conv16_fits("data", 8, 16, 3, 3, 1, 3) and not mm.conv16_fits("data", 8, 16, 3, 1, 1, 0)
    large, small = TILES16["fwd"]
    x16, w16 = np.zeros((1, 8, 8, 16), np.uint16), np.zeros((256, 3, 3, 16), np.uint16)
    assert mm.plan_conv16(np.zeros((1, 256, 8, 8), np.float32), x16, w16, None, 1, 1).tile is small   # N = 64
    x16 = np.zeros((4, 8, 8, 16), np.uint16)
    assert mm.plan_conv16(np.zeros((4, 256, 8, 8), np.float32), x16, w16, None, 1, 1).tile is large
    with pytest.raises(ValueError, match="fit together"):
        mm.plan_conv16(np.zeros((4, 256, 6, 6), np.float32), x16, w16, None, 1, 1)
    with pytest.raises(ValueError, match="contiguous float32"):        # a tf32 input with bf16 weights
        mm.plan_conv16(np.zeros((4, 256, 8, 8), np.float32), x16.astype(np.float32), w16, None, 1, 1)
    with pytest.raises(ValueError, match="uint16 .bf16. or float32 .tf32."):
        mm.plan_conv16(np.zeros((4, 256, 8, 8), np.float32), x16.astype(np.int16), w16, None, 1, 1)
    with pytest.raises(ValueError, match="no bf16 fwd tile"):
        mm.plan_conv16(np.zeros((4, 256, 8, 8), np.float32), x16, w16, None, 1, 1, tile="128x128x32s2a")
    # tf32: O in chunks of 4 (C padded); the forward only on wgmma, so a tile is named, never chosen by size
    assert mm.conv16_fits("fwd", 6, 8, 3, 3, 1, 1, "tf32") and not mm.conv16_fits("filter", 6, 6, 3, 3, 1, 1, "tf32")
    assert mm.padded_channels(3, "bf16") == 8 and mm.padded_channels(6, "tf32") == mm.padded_channels(8, "fp32") == 8
    assert mm.conv16_fits("filter", 4, 12, 3, 3, 2, 1, "tf32") and not mm.conv16_fits("data", 4, 6, 3, 3, 1, 1, "tf32")
    x32, w32 = x16.astype(np.float32), w16.astype(np.float32)
    with pytest.raises(ValueError, match="no tf32 fwd tile by size"):
        mm.plan_conv16(np.zeros((4, 256, 8, 8), np.float32), x32, w32, None, 1, 1)
    assert mm.plan_conv16(np.zeros((4, 256, 8, 8), np.float32), x32, w32, None, 1, 1, tile="w128x256s4").tile \
        is mm.TILES32W["fwd"][0]


# --- the warp-specialised tiles that do not ship (benchmarks/kernels/conv16_ws.py, HN_CONV16WS) --------------------

@pytest.fixture(scope="module")
def ws():
    """benchmarks/kernels/conv16_ws.py as a module."""
    return sandbox("conv16_ws")


@pytest.fixture(scope="module")
def emu_ws(tmp_path_factory, ws):
    """conv16_ws.cu (mma.cu and the ws tiles' entry points only), compiled as C++ against the emulator."""
    return build_emulated(tmp_path_factory.mktemp("emu_ws"), "ws_emu", ws.source_text(),
                          EMU_DIR / "gemm_launch.cpp")


@pytest.mark.parametrize("shape", CONV16_SHAPES, ids=str)
def test_conv16_ws(emu_ws, ws, rng, shape):
    """The sandbox's warp-specialised tiles (a producer warpgroup copying through mbarriers, no block barrier in the
    K loop) pass test_conv16's checks, the emulator's happens-before checks of every shared-memory access included:
    a kept variant stays correct."""
    check_cl_ops(emu_ws, rng, "bf16", shape, ws.TILES16WS, by_name=False)


@pytest.mark.parametrize("shape", POOL16_SHAPES, ids=str)
def test_conv16_ws_pool(emu_ws, ws, rng, shape):
    """The same for the pooled forward (test_conv16_pool's checks)."""
    check_pool(emu_ws, rng, "bf16", shape, ws.TILES16WS["pool"], by_name=False)


def test_conv16_ws_tiles_do_not_ship(ws):
    """The ws tiles are none of the package's: their names are not the tables' (by name a plan refuses them), and
    the package's mma.cu text has none of their kernels. A plan given a tile itself takes it only at its precision."""
    text = kernels.cu_text("mma")
    for op, tiles in ws.TILES16WS.items():
        names = {t.name for t in mm.tiles16(op, "bf16")}
        for t in tiles:
            assert t.name not in names and t.name.endswith("ws"), t
            assert t.conv_kernel(op) not in text and t.conv_kernel(op) in ws.source_text()
    assert "HN_CONV16WS" not in text
    with pytest.raises(ValueError, match="no bf16 fwd tile"):
        mm.plan_conv16(np.zeros((4, 256, 8, 8), np.float32), np.zeros((4, 8, 8, 16), np.uint16),
                       np.zeros((256, 3, 3, 16), np.uint16), None, 1, 1, tile=ws.TILES16WS["fwd"][0].name)
    with pytest.raises(ValueError, match="is bf16, the copies tf32"):
        mm.plan_conv16(np.zeros((4, 256, 8, 8), np.float32), np.zeros((4, 8, 8, 16), np.float32),
                       np.zeros((256, 3, 3, 16), np.float32), None, 1, 1, tile=ws.TILES16WS["fwd"][0])


# --- the tf32 filter gradient on wgmma through a transposing stage (benchmarks/kernels/conv32_fx.py) ---------------

@pytest.fixture(scope="module")
def fx():
    """benchmarks/kernels/conv32_fx.py as a module."""
    return sandbox("conv32_fx")


@pytest.fixture(scope="module")
def emu_fx(tmp_path_factory, fx):
    """conv32_fx.cu (mma.cu and the fx tiles' entry points only), compiled as C++ against the emulator."""
    return build_emulated(tmp_path_factory.mktemp("emu_fx"), "fx_emu", fx.source_text(), EMU_DIR / "gemm_launch.cpp")


@pytest.mark.parametrize("shape", CONV32_SHAPES, ids=str)
def test_conv32_fx(emu_fx, fx, rng, shape):
    """The sandbox's fx tiles (cp.async staging, every warp moving its units K-major, wgmma m64nNk8 tf32) pass
    test_conv16's filter-gradient checks at tf32, split and not, the emulator's checks of every shared-memory access
    and of wgmma's async-proxy reads included."""
    check_cl_ops(emu_fx, rng, "tf32", shape, {"fwd": (), "filter": fx.TILES32FX["filter"]}, by_name=False)


def _tf32_filter_tiles_do_not_ship(mod, tiles, macro: str) -> None:
    """A sandbox's tf32 filter tiles are none of the package's: not in its tables, their kernels (macro's) in the
    sandbox's source and not in the package's mma.cu, each within a block's shared memory (227 KB)."""
    text = kernels.cu_text("mma")
    names = {t.name for t in mm.tiles16("filter", "tf32")}
    for t in tiles:
        assert t.name not in names and t.smem_bytes <= 227 * 1024, t
        assert t.conv_kernel("filter") not in text and t.conv_kernel("filter") in mod.source_text()
    assert macro not in text and macro in mod.source_text()


def test_conv32_fx_tiles_do_not_ship(fx):
    """The fx tiles (named "...x") are none of the package's (_tf32_filter_tiles_do_not_ship)."""
    assert all(t.name.endswith("x") for t in fx.TILES32FX["filter"])
    _tf32_filter_tiles_do_not_ship(fx, fx.TILES32FX["filter"], "HN_CONV32FX")


# --- the tf32 filter gradient on mma.sync from a row table, A by 8-byte loads (benchmarks/kernels/conv32_fv.py) -----

@pytest.fixture(scope="module")
def fv():
    """benchmarks/kernels/conv32_fv.py as a module."""
    return sandbox("conv32_fv")


@pytest.fixture(scope="module")
def emu_fv(tmp_path_factory, fv):
    """conv32_fv.cu (mma.cu and the fv tiles' entry points only), compiled as C++ against the emulator."""
    return build_emulated(tmp_path_factory.mktemp("emu_fv"), "fv_emu", fv.source_text(), EMU_DIR / "gemm_launch.cpp")


@pytest.mark.parametrize("shape", CONV32_SHAPES, ids=str)
def test_conv32_fv(emu_fv, fv, rng, shape):
    """The sandbox's fv tiles (x gathered from per-K-tile row tables, A's fragments by 8-byte loads in their own row
    order) pass test_conv16's filter-gradient checks at tf32, split and not, the emulator's checks of every
    shared-memory access included (the row tables' slots written a K tile ahead)."""
    check_cl_ops(emu_fv, rng, "tf32", shape, {"fwd": (), "filter": fv.TILES32FV["filter"]}, by_name=False)


def test_conv32_fv_tiles_do_not_ship(fv):
    """The fv tiles (named "...v", "...ve1") are none of the package's (_tf32_filter_tiles_do_not_ship)."""
    assert all("v" in t.name for t in fv.TILES32FV["filter"])
    _tf32_filter_tiles_do_not_ship(fv, fv.TILES32FV["filter"], "HN_CONV32FV")


# --- the halo tiles that do not ship (benchmarks/kernels/conv16_halo.py, HN_CONV16H) -------------------------------

@pytest.fixture(scope="module")
def halo():
    """benchmarks/kernels/conv16_halo.py as a module."""
    return sandbox("conv16_halo")


@pytest.fixture(scope="module")
def emu_halo(tmp_path_factory, halo):
    """conv16_halo.cu (mma.cu and the h tiles' entry points only), compiled as C++ against the emulator."""
    return build_emulated(tmp_path_factory.mktemp("emu_halo"), "halo_emu", halo.source_text(),
                          EMU_DIR / "gemm_launch.cpp")


@pytest.mark.parametrize(("precision", "shape"), HALO_CASES, ids=str)
def test_conv16_halo(emu_halo, halo, rng, precision, shape):
    """The sandbox's halo tiles (the input read once a block as the frame's rows, each tap a shifted wgmma descriptor
    without swizzle) pass halo_cases.check_halo on the emulator, its checks of every shared-memory access included."""
    ran = check_halo(halo, rng, shape, lambda call: run_conv(emu_halo, call), RTOL_EMULATED, precision=precision)
    assert ran >= 2, shape


def test_sandbox_launch_raises_the_shared_memory_limit_only():
    """A sandbox kernel launched with less shared memory after more keeps the larger limit (a halo tile's size
    depends on the frame, so one kernel is launched with several sizes)."""
    from types import SimpleNamespace

    class Function:
        def __init__(self):
            self.limits, self.launches, self._limit = [], [], 0

        @property
        def max_dynamic_shared_size_bytes(self):
            return self._limit

        @max_dynamic_shared_size_bytes.setter
        def max_dynamic_shared_size_bytes(self, v):
            self._limit = v
            self.limits.append(v)

        def __call__(self, grid, block, args, shared_mem):
            assert shared_mem <= self._limit
            self.launches.append(shared_mem)

    fn = Function()
    box = sandbox("wgmma_sandbox").WgmmaSandbox("test", lambda: "")
    box.module = lambda device_id: SimpleNamespace(get_function=lambda name: fn)
    for smem in (150_000, 100_000, 150_000, 200_000, 120_000):
        call = SimpleNamespace(tile=SimpleNamespace(smem_bytes=smem), kernel="k", grid=(1,), block=(128,),
                               args=lambda ptr, null: ())
        box.launch(SimpleNamespace(device_id=0), call)
    assert fn.launches == [150_000, 100_000, 150_000, 200_000, 120_000] and fn.limits == [150_000, 200_000]


def test_conv16_halo_plans_only_what_it_runs(halo):
    """The halo plan takes the stride-1 forward and data gradient of C (O) a multiple of 64 and R S >= STAGES - 1
    only, and its tiles are none of the package's."""
    tile = halo.TILES16H["fwd"][0]
    x16, w16 = np.zeros((2, 8, 8, 64), np.uint16), np.zeros((64, 3, 3, 64), np.uint16)
    call = halo.plan(mm.plan_conv16(np.zeros((2, 64, 8, 8), np.float32), x16, w16, None, 1, 1, 0, tile))
    assert call.grid == (1, 1, 1) and call.tile.rows == 281          # 2 x 9 x 9 columns; 256 + 2 x 9 + 2 = 276 rows
    assert call.tile.smem_bytes == 4 * 128 * 128 + 2 * 8 * 281 * 16 + 1024
    for y, x, w, stride in ((np.zeros((2, 64, 4, 4), np.float32), x16, w16, 2),
                            (np.zeros((2, 64, 8, 8), np.float32), np.zeros((2, 8, 8, 32), np.uint16),
                             np.zeros((64, 3, 3, 32), np.uint16), 1),
                            (np.zeros((2, 64, 8, 8), np.float32), x16, np.zeros((64, 1, 1, 64), np.uint16), 1)):
        with pytest.raises(ValueError, match="does not run"):
            halo.plan(mm.plan_conv16(y, x, w, None, stride, 1 if w.shape[1] == 3 else 0, 0, tile))
    with pytest.raises(ValueError, match="not a halo convolution"):
        halo.plan(mm.plan_conv16(np.zeros((2, 64, 8, 8), np.float32), x16, w16, None, 1, 1, 0, "w128x256s4"))
    names = {t.name for t in mm.tiles16("fwd", "bf16")}
    assert not names & {t.name for t in halo.TILES16H["fwd"]} and "HN_CONV16H" not in kernels.cu_text("mma")


def test_division_by_an_invariant_divisor(emu, rng):
    """hn_div(x, hn_div_of(d)) == x // d for 0 <= x < 2^31 and 1 <= d < 2^31: every small divisor, powers of two and
    their neighbours, random large ones; dividends at the edges, around multiples of d, and random."""
    divisors = [*range(1, 1100), *(2**k + e for k in range(1, 31) for e in (-1, 0, 1) if 2**k + e < 2**31),
                *rng.integers(1, 2**31, 300)]
    for d in divisors:
        d = int(d)
        near = np.array([m * d + e for m in (1, 2, 3, 1000, (2**31 - 1) // d) for e in (-1, 0, 1)], dtype=np.int64)
        x = np.concatenate([[0, 1, 2**31 - 1, 2**31 - 2], near, rng.integers(0, 2**31, 64)])
        x = x[(x >= 0) & (x < 2**31)].astype(np.int32)
        q = np.empty_like(x)
        emu.emu_div(ctypes.c_void_p(x.ctypes.data), ctypes.c_int(len(x)), ctypes.c_int(d), ctypes.c_void_p(q.ctypes.data))
        np.testing.assert_array_equal(q, x.astype(np.int64) // d, err_msg=f"divisor {d}")


def test_takes_dy16_asks_for_both_gradients_measured_on_channels_last_copies(monkeypatch):
    """conv.takes_dy16, the backward hand-over's test (no GPU: a backend's precision and measured choices): True at
    bf16 where the convolution's filter and data gradients were both measured on "tc16" candidates and the gradient's
    shape is the convolution's output (or its 2 x 2 pooled output); False for anything else: not measured, one
    gradient measured otherwise, another precision, a shape that does not chain, an odd channel count, overlapping
    pooling windows, an algorithm forced by HETNET_CONV_ALGO, no grad_feeds."""
    from types import SimpleNamespace

    from hetnet.backends.cuda import conv as C

    tune = {}                                                      # (op, shape) -> the measured choice
    be = SimpleNamespace(precision="bf16", _tune=tune, force_conv_algo=None,
                         conv_choice=lambda op, shape: tune.get((op, tuple(shape))))
    shape = (4, 16, 15, 13, 32, 3, 3, 1, 1)
    key = C.Geometry(*shape).key()
    feeds = ((32, 16, 3, 3), 1, 1, (4, 16, 15, 13), None)
    pooled = ((32, 16, 3, 3), 1, 1, (4, 16, 15, 13), (2, 2))
    y, y_pooled = (4, 32, 15, 13), (4, 32, 7, 6)
    assert not C.takes_dy16(be, y, feeds)
    be._tune[("filter", key)] = "tc16"
    assert not C.takes_dy16(be, y, feeds)                          # the data gradient not measured yet
    be._tune[("data", key)] = "tc16w128x256s4"
    assert C.takes_dy16(be, y, feeds) and C.takes_dy16(be, y_pooled, pooled)
    assert not C.takes_dy16(be, y, None) and not C.takes_dy16(be, y_pooled, feeds)
    assert not C.takes_dy16(be, (4, 32, 15, 12), feeds) and not C.takes_dy16(be, y, pooled)
    assert not C.takes_dy16(be, y_pooled, ((32, 16, 3, 3), 1, 1, (4, 16, 15, 13), (3, 2)))
    be._tune[("data", key)] = "im2col"
    assert not C.takes_dy16(be, y, feeds)                          # measured, but not on channels-last copies
    be._tune[("data", key)] = "tc16"
    monkeypatch.setenv("HETNET_CONV_ALGO", "im2col")
    assert not C.takes_dy16(be, y, feeds)
    monkeypatch.delenv("HETNET_CONV_ALGO")
    assert C.takes_dy16(be, y, feeds) and not C.takes_dy16(SimpleNamespace(**{**vars(be), "precision": "tf32"}), y,
                                                            feeds)
    odd = C.Geometry(4, 16, 15, 13, 31, 3, 3, 1, 1).key()
    be._tune.update({("filter", odd): "tc16", ("data", odd): "tc16"})
    assert not C.takes_dy16(be, (4, 31, 15, 13), ((31, 16, 3, 3), 1, 1, (4, 16, 15, 13), None))


# --- conv.py's ops on the emulated kernels -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def emu_libs(emu, tmp_path_factory):
    """The emulated libraries of the cuda backend's convolutions: mma.cu (emu) and conv.cu's pieces."""
    return build_libraries(tmp_path_factory.mktemp("emu_libs"), mma_lib=emu, whole=())


@pytest.fixture
def conv_ops(emu_libs, monkeypatch):
    """The cuda backend at bf16 on NumPy arrays, its convolution kernels emulated (tests/emu_backend.py): the mma.sync
    tiles only (no wgmma), nothing measured (the choices are set by the test), no tuning cache."""
    route_kernels(monkeypatch, emu_libs)
    return EmulatedBackend("bf16", sms=SMS)


@pytest.mark.parametrize("pooled", [False, True], ids=["conv", "conv_pool"])
def test_conv_ops_hand_over_to_batch_norms_emulated(conv_ops, rng, pooled):
    """conv2d_forward / conv2d_maxpool_forward told to_norm, and their backwards told grad_to_norm, with the choices
    set to the channels-last "tc16" candidates: the output and the input gradient come as conv.Nchw16, the bits of
    bf16 of the float32 ones of the same calls without the hand-over (the argmax bytes and dw the same); dx within
    the emulated tolerance of float64 of the rounded operands. Where the data gradient runs another kernel (the NCHW
    "tc"), it stays float32."""
    from hetnet.backends.cuda import conv as C

    be = conv_ops
    shape = (2, 16, 8, 6, 24, 3, 3, 1, 1)
    n, c, h, w_, o = shape[:5]
    x, w, _, _ = conv_inputs(rng, shape, bias=False)
    key = C.Geometry(*shape).key()
    be._tune.update({(op, key): "tc16" for op in ("fwd", "pool", "filter", "data")})
    if pooled:
        fwd = be.conv2d_maxpool_forward
        args, back = (x, w, None, 1, 1, 2, 2), be.conv2d_maxpool_backward
    else:
        fwd, args, back = be.conv2d_forward, (x, w, None, 1, 1), be.conv2d_backward
    (y32, cache32), (y16, cache16) = fwd(*args, relu_mask=False), fwd(*args, relu_mask=False, to_norm=True)
    assert isinstance(y32, np.ndarray) and isinstance(y16, C.Nchw16) and y16.shape == y32.shape
    np.testing.assert_array_equal(y16.data, bf16_bits(y32))
    if pooled:
        np.testing.assert_array_equal(cache16[1][2], cache32[1][2], err_msg="argmax bytes")
    dy = rng.standard_normal(y32.shape).astype(np.float32)
    dw32, dw16 = np.zeros_like(w), np.zeros_like(w)
    dx32 = back(dy, cache32, dw32, None, need_dx=True)
    dx16 = back(dy, cache16, dw16, None, need_dx=True, grad_to_norm=True)
    assert isinstance(dx32, np.ndarray) and isinstance(dx16, C.Nchw16) and dx16.shape == (n, c, h, w_)
    np.testing.assert_array_equal(dx16.data, bf16_bits(dx32))
    np.testing.assert_array_equal(dw16, dw32)
    if not pooled:
        want = conv_data_expected(dy, w, None, shape, "bf16")
        assert rel_err(dx32, want) <= RTOL_EMULATED
    if not pooled:        # where the data gradient runs the NCHW tensor-core kernels instead, it stays float32
        be._tune[("data", key)] = "tc"
        dx = back(dy, cache16, np.zeros_like(w), None, need_dx=True, grad_to_norm=True)
        assert isinstance(dx, np.ndarray) and dx.dtype == np.float32
        assert rel_err(dx, want) <= RTOL_EMULATED


def test_small_forward_hands_over_to_a_batch_norm_emulated(conv_ops, rng):
    """A forward measured to run "small" (conv_small_fwd) and told to_norm returns conv.Nchw16, the bits of bf16 of
    its float32 output; the float32 output within the emulated tolerance of float64."""
    from hetnet.backends.cuda import conv as C

    be = conv_ops
    shape = (2, 3, 9, 7, 16, 3, 3, 1, 1)
    x = rng.standard_normal(shape[:4]).astype(np.float32)
    w = (rng.standard_normal((16, 3, 3, 3)) * 0.3).astype(np.float32)
    be._tune[("fwd", C.Geometry(*shape).key())] = "small"
    y32 = be.conv2d_forward(x, w, None, 1, 1, relu_mask=False)[0]
    y16 = be.conv2d_forward(x, w, None, 1, 1, relu_mask=False, to_norm=True)[0]
    assert isinstance(y16, C.Nchw16)
    np.testing.assert_array_equal(y16.data, bf16_bits(y32))
    assert rel_err(y32, conv_expected(x, w, None, 1, 1, 0, "fp32")) <= RTOL_EMULATED


# --- the TMA-fed convolutions (mma.cu HN_CONV16T), the copies by the emulator's model of TMA --------------------------

@pytest.mark.parametrize("shape", TMA_SHAPES + TMA_POOL_SHAPES, ids=str)
def test_tma_tiles_emulated(emu, rng, shape):
    """Every TMA tile of every op (tma_cases.run_ops: the forward, the pooled forward where it fits, the data and
    filter gradients) on the emulator, against float64; the emulator checks the producer's and consumers'
    synchronisation (the mbarriers' arrivals and transaction bytes) as it runs."""
    def launch(call):
        run_conv(emu, call, int(rng.integers(2**31)))

    ran = run_tma_ops(np, lambda a: a, rng, shape, TILES16T, launch, SMS)
    assert ran >= (13 if shape in TMA_POOL_SHAPES else 10), ran



def test_tma_persistent_grid_emulated(emu, rng):
    """The persistent TMA tiles on a grid of several blocks (SMS SMs): the forward's 2 x 3 tiles of 128 x 256 (M
    fastest), so that some blocks take two tiles and others one (tiles blockIdx.x, blockIdx.x + gridDim.x, ...), every
    op against float64 as test_tma_tiles_emulated's."""
    persistent = {op: tuple(t for t in ts if t.persistent) for op, ts in TILES16T.items()}
    assert persistent["fwd"] and not persistent["filter"]
    shape = (9, 64, 8, 8, 192, 3, 3, 1, 1)           # N = 576 pixels, M = 192 channels; planes of 64 (staged)
    shared = []

    def launch(call):
        if call.op != "filter":
            tiles = -(-call.n // call.tile.bn) * -(-call.m // call.tile.bm)
            assert call.grid == (min(tiles, SMS), 1, 1), (call.tile.name, call.grid)
            shared.append(tiles > SMS)
        run_conv(emu, call, int(rng.integers(2**31)))

    assert run_tma_ops(np, lambda a: a, rng, shape, persistent, launch, SMS, fwd_sms=SMS) >= 7
    assert sum(shared) >= 3, shared
