"""The tensor-core GEMMs (backends/cuda/mma.cu through mma.gemm_tc) on a GPU: every tile, operand order and precision
against float64 at odd shapes, C poisoned with NaN where beta == 0 (it must not be read), beta == 1 accumulating,
split-K, batched strides, and the views CudaBackend.gemm takes.

Two checks per result: against float64 of the exact float32 inputs within RTOL_TC (what tf32 / bf16 cost), and
against float64 of the inputs rounded as the kernels round them within RTOL_TC_ROUNDED (what is left is the tensor
cores' float32 accumulation; a missing or wrong rounding shows here). Skips without CuPy or a GPU; tests/
test_mma_emulated.py runs the same kernels on the CPU emulator.
"""
from __future__ import annotations

import contextlib

import numpy as np
import pytest

cupy = pytest.importorskip("cupy", reason="CuPy not installed")
try:
    _N_GPUS = cupy.cuda.runtime.getDeviceCount()
except cupy.cuda.runtime.CUDARuntimeError:  # no driver
    _N_GPUS = 0
if _N_GPUS == 0:
    pytest.skip("no CUDA GPU", allow_module_level=True)

from conftest import RTOL_FP32_PARTS, RTOL_TC, RTOL_TC_ROUNDED, rel_err, tolerance
from halo_cases import HALO_CASES, check_halo, sandbox
from mma_cases import (CONV16_SHAPES, CONV32_SHAPES, CONV_SHAPES, POOL16_SHAPES, POOL32_SHAPES, SHAPES,
                       conv_data_expected, conv_data_inputs, conv_expected, conv_filter_expected, conv_filter_inputs,
                       batch_norm_sums, bf16_bits, bf16_values, conv_inputs, dy_t_host, expected, max_pool_2x2, nhwc16,
                       nhwc_copy, plan_step, pooled_cnn, round_bf16, stored, tma_choices, turned16, turned_copy)

import hetnet as hn
from hetnet import plan as P
from hetnet import train as T
from hetnet.backends import compose
from hetnet.backends import reference as reference_backend
from hetnet.backends.cuda import conv as C
from hetnet.backends.cuda import kernels
from hetnet.backends.cuda import mma as mm
from hetnet.backends.cuda.kernels import wgmma_ok
from hetnet.backends.cuda.mma_tiles import LAYOUTS, PRECISIONS, TILES, TILES16W
from hetnet.device import get_backend

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def be():
    return get_backend("cuda")


def check(be, rng, precision, layout, m, n, k, alpha=1.0, beta=0.0, tile=None, splits=None, pad=0, what=""):
    """gemm_tc on GPU copies of `stored` views (column slices of a wider parent when pad > 0); c poisoned with NaN
    (parent too) when beta == 0; the parent outside c must be unchanged."""
    ta, tb = layout[0] == "t", layout[1] == "t"
    a, a_parent = stored(rng, m, k, ta, pad)
    b, b_parent = stored(rng, k, n, tb, pad)
    c, c_parent = stored(rng, m, n, False, pad + 2)
    if beta == 0:
        c_parent[...] = np.nan
    c0 = c.copy()
    lo = (pad + 2) // 2                                   # where stored() sliced each view from its parent
    ga = cupy.asarray(a_parent)[:, pad // 2:pad // 2 + a.shape[1]]
    gb = cupy.asarray(b_parent)[:, pad // 2:pad // 2 + b.shape[1]]
    gc = cupy.asarray(c_parent)
    mm.gemm_tc(be, gc[:, lo:lo + n], ga, ta, gb, tb, alpha, beta, precision, tile, splits)
    out = cupy.asnumpy(gc)
    got = out[:, lo:lo + n]
    where = f"{what} {precision} {layout} {(m, n, k)} tile {tile} splits {splits} beta {beta}"
    err = rel_err(got, expected(a, ta, b, tb, c0, alpha, beta))
    assert err <= RTOL_TC[precision], f"{where}: relative error {err:.3g} against the exact inputs"
    err = rel_err(got, expected(a, ta, b, tb, c0, alpha, beta, precision))
    assert err <= RTOL_TC_ROUNDED, f"{where}: relative error {err:.3g} against the rounded inputs"
    outside = np.ones(out.shape, bool)
    outside[:, lo:lo + n] = False
    np.testing.assert_array_equal(out[outside], c_parent[outside], f"{where}: wrote outside c")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("tile", TILES, ids=lambda t: f"{t.precision}-{t.name}")
def test_every_tile_and_layout(be, rng, tile, layout):
    for m, n, k in SHAPES:
        check(be, rng, tile.precision, layout, m, n, k, alpha=0.7, tile=tile.name)
    check(be, rng, tile.precision, layout, 257, 130, 333, alpha=-1.5, beta=1.0, tile=tile.name)   # accumulates
    check(be, rng, tile.precision, layout, 70, 33, 129, beta=0.5, tile=tile.name, pad=1, what="unaligned")


@pytest.mark.parametrize("precision", PRECISIONS)
def test_launcher_choice_and_split_k(be, rng, precision):
    """The launcher's own tile and split choice on a problem with few tiles and long K (split-K with atomics into
    a zeroed or scaled C), and forced splits."""
    for beta in (0.0, 1.0):
        check(be, rng, precision, "nt", 64, 96, 20000, beta=beta, what="automatic split")
        check(be, rng, precision, "tn", 50, 70, 3001, beta=beta, splits=5, what="5 splits")


@pytest.mark.parametrize("precision", PRECISIONS)
def test_sums_past_half_precision_range(rng, precision):
    """Inputs of 200-400 summed over K = 4608 (a GEMM, and a convolution of 512 channels x 3 x 3): every sum is near
    4e8, far past float16's 65504, and a bf16 accumulator would stop adding (its spacing there, 2^21, exceeds each
    product); within RTOL_TC_ROUNDED of float64 of the rounded inputs, the sums are float32's."""
    be = get_backend("cuda", precision)
    m, n, k = 70, 90, 4608
    a = rng.uniform(200, 400, (m, k)).astype(np.float32)
    b = rng.uniform(200, 400, (k, n)).astype(np.float32)
    gc = cupy.full((m, n), np.nan, np.float32)
    mm.gemm_tc(be, gc, cupy.asarray(a), False, cupy.asarray(b), False, precision=precision)
    got = cupy.asnumpy(gc)
    assert got.min() > 1e8
    assert rel_err(got, expected(a, False, b, False, got, 1.0, 0.0, precision)) <= RTOL_TC_ROUNDED
    x = rng.uniform(200, 400, (2, 512, 6, 5)).astype(np.float32)
    w = rng.uniform(200, 400, (24, 512, 3, 3)).astype(np.float32)
    gy = cupy.full((2, 24, 4, 3), np.nan, np.float32)
    mm.conv_tc(be, gy, cupy.asarray(x), cupy.asarray(w), None, 1, 0)
    got = cupy.asnumpy(gy)
    assert got.min() > 1e8
    assert rel_err(got, conv_expected(x, w, None, 1, 0, 0, precision)) <= RTOL_TC_ROUNDED


@pytest.mark.parametrize("precision", PRECISIONS)
def test_batched(be, rng, precision):
    """gemm_tc_batched: one A for all items (stride 0), transposed B items, C items as slices of a larger array."""
    n_items, m, n, k = 4, 45, 77, 130
    a = rng.standard_normal((1, m, k)).astype(np.float32)
    b = rng.standard_normal((n_items, n, k)).astype(np.float32)
    for beta in (0.0, 1.0):
        parent = rng.standard_normal((n_items, m, n + 6)).astype(np.float32)
        if beta == 0:
            parent[...] = np.nan
        c0 = parent[:, :, 3:3 + n].copy()
        gparent = cupy.asarray(parent)
        mm.gemm_tc_batched(be, gparent[:, :, 3:3 + n], cupy.asarray(a), False,
                           cupy.asarray(b).transpose(0, 2, 1), False, 1.0, beta, precision)
        out = cupy.asnumpy(gparent)
        for i in range(n_items):
            err = rel_err(out[i, :, 3:3 + n], expected(a[0], False, b[i].T, False, c0[i], 1.0, beta, precision))
            assert err <= RTOL_TC_ROUNDED, f"item {i} beta {beta}: {err:.3g}"
        assert np.isnan(out[:, :, :3]).all() if beta == 0 else np.array_equal(out[:, :, :3], parent[:, :, :3])


def test_same_as_cublas_conventions(be, rng):
    """What conv.py passes to CudaBackend.gemm gives gemm_tc's result within tf32's tolerance of cuBLAS (float32):
    a transposed view (dy.T), a column slice of C, beta = 1."""
    dy = cupy.asarray(rng.standard_normal((50, 24)).astype(np.float32))
    w2 = cupy.asarray(rng.standard_normal((24, 72)).astype(np.float32))
    col = cupy.asarray(rng.standard_normal((72, 50)).astype(np.float32))
    for precision in PRECISIONS:
        ref, out = cupy.zeros((72, 50), np.float32), cupy.zeros((72, 50), np.float32)
        be.gemm(ref, w2, True, dy.T, False)
        mm.gemm_tc(be, out, w2, True, dy.T, False, precision=precision)
        assert rel_err(cupy.asnumpy(out), cupy.asnumpy(ref).astype(np.float64)) <= RTOL_TC[precision]
        dw, dw_tc = (cupy.ones((24, 72), np.float32) for _ in range(2))
        be.gemm(dw, dy.T, False, col.T, False, beta=1.0)
        mm.gemm_tc(be, dw_tc, dy.T, False, col.T, False, beta=1.0, precision=precision)
        assert rel_err(cupy.asnumpy(dw_tc), cupy.asnumpy(dw).astype(np.float64)) <= RTOL_TC[precision]


# --- the implicit-GEMM forward convolution (mma.conv_tc) and its place among the convolution algorithms -----------


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("shape", CONV_SHAPES)
def test_conv_forward(rng, precision, shape):
    """Each CONV_CHOICE tile on each shape, with bias and ReLU and without: y (poisoned with NaN) against float64
    of the exact inputs within RTOL_TC and of the rounded inputs within RTOL_TC_ROUNDED."""
    be = get_backend("cuda", precision)
    stride, pad = shape[7:]
    for tile in mm.CONV_CHOICE[precision]:
        for bias, act in ((True, 1), (False, 0)):
            x, w, b, y = conv_inputs(rng, shape, bias)
            gy = cupy.asarray(y)
            mm.conv_tc(be, gy, cupy.asarray(x), cupy.asarray(w), None if b is None else cupy.asarray(b), stride,
                       pad, act, tile)
            got = cupy.asnumpy(gy)
            where = f"{precision} {shape} tile {tile} bias {bias} act {act}"
            err = rel_err(got, conv_expected(x, w, b, stride, pad, act))
            assert err <= RTOL_TC[precision], f"{where}: relative error {err:.3g} against the exact inputs"
            err = rel_err(got, conv_expected(x, w, b, stride, pad, act, precision))
            assert err <= RTOL_TC_ROUNDED, f"{where}: relative error {err:.3g} against the rounded inputs"


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("shape", CONV_SHAPES)
def test_conv_data_gradient(rng, precision, shape):
    """mma.conv_data_tc on each CONV_CHOICE tile and shape, with the ReLU mask and without, as test_conv_forward."""
    be = get_backend("cuda", precision)
    stride, pad = shape[7:]
    for tile in mm.CONV_CHOICE[precision]:
        for mask in (True, False):
            dy, w, relu_x, dx = conv_data_inputs(rng, shape, mask)
            gdx = cupy.asarray(dx)
            mm.conv_data_tc(be, gdx, cupy.asarray(dy), cupy.asarray(w),
                            None if relu_x is None else cupy.asarray(relu_x), stride, pad, tile)
            got = cupy.asnumpy(gdx)
            where = f"data {precision} {shape} tile {tile} mask {mask}"
            err = rel_err(got, conv_data_expected(dy, w, relu_x, shape))
            assert err <= RTOL_TC[precision], f"{where}: relative error {err:.3g} against the exact inputs"
            err = rel_err(got, conv_data_expected(dy, w, relu_x, shape, precision))
            assert err <= RTOL_TC_ROUNDED, f"{where}: relative error {err:.3g} against the rounded inputs"


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("shape", CONV_SHAPES + [(64, 8, 16, 16, 24, 3, 3, 1, 1)])
def test_conv_filter_gradient(rng, precision, shape):
    """mma.conv_filter_tc on each CONV_CHOICE tile and shape, unsplit, in three parts and as the launcher splits it
    (the last shape: 16,384 pixels over a few tiles), added into dw: its increment held as test_conv_forward holds
    y."""
    be = get_backend("cuda", precision)
    stride, pad = shape[7:]
    for tile in mm.CONV_CHOICE[precision]:
        for splits in (1, 3, None):
            dy, x, dw0 = conv_filter_inputs(rng, shape)
            gdw = cupy.asarray(dw0)
            mm.conv_filter_tc(be, gdw, cupy.asarray(dy), cupy.asarray(x), stride, pad, tile, splits)
            got = cupy.asnumpy(gdw)
            where = f"filter {precision} {shape} tile {tile} splits {splits}"
            err = rel_err(got - dw0, conv_filter_expected(dy, x, dw0, shape) - dw0)
            assert err <= RTOL_TC[precision], f"{where}: relative error {err:.3g} against the exact inputs"
            err = rel_err(got - dw0, conv_filter_expected(dy, x, dw0, shape, precision) - dw0)
            assert err <= RTOL_TC_ROUNDED, f"{where}: relative error {err:.3g} against the rounded inputs"


@pytest.mark.parametrize("precision", PRECISIONS)
def test_conv_layer_offers_the_tensor_core_kernels(rng, precision):
    """The backend's convolution at tf32 / bf16 offers "tc" among its forward, data-gradient and filter-gradient
    algorithms (forced here, and in the measured choices' log), and the forced forward's result is the
    convolution's."""
    be = get_backend("cuda", precision)
    x, w, b, _ = conv_inputs(rng, (4, 16, 12, 12, 32, 3, 3, 1, 1))
    be.force_conv_algo = "tc"
    try:
        y, _ = be.conv2d_forward(cupy.asarray(x), cupy.asarray(w), cupy.asarray(b), 1, 1, act="relu")
    finally:
        be.force_conv_algo = None
    assert rel_err(cupy.asnumpy(y), conv_expected(x, w, b, 1, 1, 1)) <= RTOL_TC[precision]
    gx, gw, gb = cupy.asarray(x[:3]), cupy.asarray(w), cupy.asarray(b)
    y, cache = be.conv2d_forward(gx, gw, gb, 1, 1)      # measured, as is the backward
    dw, db = cupy.zeros_like(gw), cupy.zeros_like(gb)
    be.conv2d_backward(cupy.ones_like(y), cache, dw, db, need_dx=True)
    for op in ("fwd", "data", "filter"):
        assert any(r["op"] == op and r["shape"][0] == 3 and "tc" in r["ms"] for r in be.tune_log), op


# --- the channels-last bf16 convolutions: conv.cu's copies, then mma.cu's HN_CONV16 (mma.conv16 / _data / _filter) ---

def test_channels_last_copies(rng):
    """At bf16, to_nhwc16 and turn_weights give exactly the bf16 bits NumPy rounds (to nearest even, ties included),
    at sizes that leave partial 64-channel x 32-pixel tiles; to_nhwc16's channels padded with zeros to a multiple of
    8."""
    be = get_backend("cuda", "bf16")
    for shape in ((3, 6, 37), (2, 70, 5, 7), (130, 8, 3, 3), (2, 64, 32, 32)):
        x = (rng.standard_normal(shape) * 100).astype(np.float32)
        x.reshape(-1)[:4] = np.array([0x3F808000, 0x3F818000, 0xBF808000, 0x3F80FFFF], np.uint32).view(np.float32)
        np.testing.assert_array_equal(cupy.asnumpy(mm.to_nhwc16(be, cupy.asarray(x))), nhwc16(x, 8), f"{shape}")
    w = rng.standard_normal((12, 8, 3, 5)).astype(np.float32)
    np.testing.assert_array_equal(cupy.asnumpy(mm.turn_weights(be, cupy.asarray(w))), turned16(w))


@pytest.mark.parametrize("precision", ["tf32", "fp32"])
def test_channels_last_tf32_copies(rng, precision):
    """At tf32, to_nhwc and turn_weights give exactly the float32 channels-last copies rounded to tf32 (to nearest,
    ties away from zero: cvt.rna) that NumPy makes, C padded with zeros to a multiple of 4 (7 and 70 here), NaN kept
    a NaN; at fp32 the split copies (hi and lo tf32 chunks)."""
    be = get_backend("cuda", precision)
    for shape in ((3, 7, 37), (2, 70, 5, 7), (130, 8, 3, 3), (2, 64, 32, 32)):
        x = (rng.standard_normal(shape) * 100).astype(np.float32)
        x.reshape(-1)[:4] = np.array([0x3F801000, 0x3F803000, 0xBF801000, 0x3F80FFFF], np.uint32).view(np.float32)
        got = cupy.asnumpy(mm.to_nhwc(be, cupy.asarray(x)))
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got.view(np.uint32), nhwc_copy(x, precision).view(np.uint32), f"{shape}")
        if precision == "tf32":     # with the r tiles' K-major copy from the same launch: mma.dy_t's of the copy
            pair = mm.to_nhwc(be, cupy.asarray(x), k_major=True)
            np.testing.assert_array_equal(cupy.asnumpy(pair[0]).view(np.uint32), got.view(np.uint32))
            np.testing.assert_array_equal(cupy.asnumpy(pair[1]), dy_t_host(got), f"{shape}")
    w = rng.standard_normal((12, 8, 3, 5)).astype(np.float32)
    w[0, 0, 0, 0] = np.nan
    got = cupy.asnumpy(mm.turn_weights(be, cupy.asarray(w)))
    assert np.isnan(got).sum() == (1 if precision == "tf32" else 2)
    np.testing.assert_array_equal(got, turned_copy(w, precision))


def _checked16(what, got, exact, rounded, precision="bf16"):
    err = rel_err(got, exact)
    rtol = RTOL_TC.get(precision) or tolerance(np.float32)       # fp32: float32's tolerance (its sums' own rounding)
    assert err <= rtol, f"{what}: relative error {err:.3g} against the exact inputs"
    err = rel_err(got, rounded)
    assert err <= RTOL_TC_ROUNDED, f"{what}: relative error {err:.3g} against the rounded inputs"


CL_CASES = [("bf16", s) for s in CONV16_SHAPES] + [(p, s) for p in ("tf32", "fp32") for s in CONV32_SHAPES]


@pytest.mark.parametrize(("precision", "shape"), CL_CASES, ids=str)
def test_conv16(rng, precision, shape):
    """Each op of each channels-last tile (bf16: HN_CONV16, and HN_CONV16W where the device runs wgmma; tf32 and fp32
    (split copies, three products): HN_CONV32F, and HN_CONV32W where it runs wgmma) from NCHW float32 on the GPU (the
    channels-last copies made there) against float64 (fp32: within float32's tolerance): forward
    with bias + ReLU and without, data gradient with and without the mask, filter gradient added into dw, split and
    not."""
    be = get_backend("cuda", precision)
    n, c, h, w_, o, r, s, stride, pad = shape
    wg = wgmma_ok(be.device_id)
    for k, tile in enumerate(mm.tiles16("fwd", precision, wg)):
        act = 1 - k % 2
        if mm.conv16_fits("fwd", c, o, r, s, stride, pad, precision):
            x, w, b, y = conv_inputs(rng, shape, bias=act == 1)
            gy = cupy.asarray(y)
            mm.conv16(be, gy, cupy.asarray(x), cupy.asarray(w), None if b is None else cupy.asarray(b), stride, pad,
                      act, tile.name)
            _checked16(f"fwd {shape} {tile.name}", cupy.asnumpy(gy), conv_expected(x, w, b, stride, pad, act),
                       conv_expected(x, w, b, stride, pad, act, precision), precision)
        if mm.conv16_fits("data", c, o, r, s, stride, pad, precision):
            dy, w, relu_x, dx = conv_data_inputs(rng, shape, mask=act == 1)
            gdx = cupy.asarray(dx)
            mm.conv16_data(be, gdx, mm.to_nhwc(be, cupy.asarray(dy)), cupy.asarray(w),
                           None if relu_x is None else cupy.asarray(relu_x), pad, tile.name)
            _checked16(f"data {shape} {tile.name}", cupy.asnumpy(gdx), conv_data_expected(dy, w, relu_x, shape),
                       conv_data_expected(dy, w, relu_x, shape, precision), precision)
    for tile in mm.tiles16("filter", precision, wg):
        for splits in (1, 3, None):
            if mm.conv16_fits("filter", c, o, r, s, stride, pad, precision):
                dy, x, dw0 = conv_filter_inputs(rng, shape)
                gdw = cupy.asarray(dw0)
                mm.conv16_filter(be, gdw, mm.to_nhwc(be, cupy.asarray(dy)), mm.to_nhwc(be, cupy.asarray(x)),
                                 stride, pad, tile.name, splits)
                _checked16(f"filter {shape} {tile.name} splits {splits}", cupy.asnumpy(gdw) - dw0,
                           conv_filter_expected(dy, x, dw0, shape) - dw0,
                           conv_filter_expected(dy, x, dw0, shape, precision) - dw0, precision)


@pytest.mark.parametrize("precision", ["tf32", "fp32"])
def test_conv_layer_offers_the_tf32_channels_last_kernels(rng, precision):
    """At tf32 (fp32) the backend's convolution measures the "tc32" ("tc32x3") candidates (the wgmma ones where the
    device runs them) beside its others for the forward, the data and filter gradients and the pooled forward, and
    what it chose gives each result within the precision's tolerance of float64, the pooled forward bit for bit the
    forward's pooling."""
    be = get_backend("cuda", precision)
    rtol = tolerance(be)
    shape = (3, 16, 12, 12, 32, 3, 3, 1, 1)
    x, w, b, _ = conv_inputs(rng, shape)
    dy = rng.standard_normal((3, 32, 12, 12)).astype(np.float32)
    gw, gb = cupy.asarray(w), cupy.asarray(b)
    dw, db = cupy.zeros_like(gw), cupy.zeros_like(gb)
    y, cache = be.conv2d_forward(cupy.asarray(x), gw, gb, 1, 1, act="relu")
    dx = be.conv2d_backward(cupy.asarray(dy), cache, dw, db, need_dx=True, relu_mask=True)
    assert rel_err(cupy.asnumpy(y), conv_expected(x, w, b, 1, 1, 1)) <= rtol
    assert rel_err(cupy.asnumpy(dx), conv_data_expected(dy, w, x, shape)) <= rtol
    assert rel_err(cupy.asnumpy(dw), conv_filter_expected(dy, x, np.zeros_like(w), shape)) <= rtol
    wg = wgmma_ok(be.device_id)
    for op in ("fwd", "data", "filter"):
        for name in C._names16(precision, op, wg):
            assert any(r["op"] == op and r["shape"][0] == 3 and name in r["ms"] for r in be.tune_log), (op, name)
    if C._measured16(be, "fwd", C.Geometry(*shape)):                    # the pooled forward runs where it won
        zy, zcache = be.conv2d_forward(cupy.asarray(x), gw, gb, 1, 1)
        py, _ = be.conv2d_maxpool_forward(cupy.asarray(x), gw, gb, 1, 1, 2, 2)
        np.testing.assert_array_equal(cupy.asnumpy(py), max_pool_2x2(cupy.asnumpy(zy))[0])


def test_conv_layer_offers_the_channels_last_kernels(rng):
    """At bf16 the backend's convolution offers "tc16" for its forward, data and filter gradients (forced here: each
    result against float64; and among the measured choices' candidates, with the wgmma tiles where the device runs
    them)."""
    be = get_backend("cuda", "bf16")
    shape = (4, 16, 12, 12, 32, 3, 3, 1, 1)
    x, w, b, _ = conv_inputs(rng, shape)
    dy = rng.standard_normal((4, 32, 12, 12)).astype(np.float32)
    gw, gb = cupy.asarray(w), cupy.asarray(b)
    dw, db = cupy.zeros_like(gw), cupy.zeros_like(gb)
    be.force_conv_algo = "tc16"
    try:
        y, cache = be.conv2d_forward(cupy.asarray(x), gw, gb, 1, 1, act="relu")
        dx = be.conv2d_backward(cupy.asarray(dy), cache, dw, db, need_dx=True, relu_mask=True)
    finally:
        be.force_conv_algo = None
    assert rel_err(cupy.asnumpy(y), conv_expected(x, w, b, 1, 1, 1)) <= RTOL_TC["bf16"]
    assert rel_err(cupy.asnumpy(dx), conv_data_expected(dy, w, x, shape)) <= RTOL_TC["bf16"]
    assert rel_err(cupy.asnumpy(dw), conv_filter_expected(dy, x, np.zeros_like(w), shape)) <= RTOL_TC["bf16"]
    assert rel_err(cupy.asnumpy(db), dy.sum(axis=(0, 2, 3))) <= 1e-5
    y, cache = be.conv2d_forward(cupy.asarray(x[:3]), gw, gb, 1, 1)      # measured, as is the backward
    be.conv2d_backward(cupy.ones_like(y), cache, dw, db, need_dx=True)
    for op in ("fwd", "data", "filter"):
        names = ["tc16"] + (["tc16" + t.name for t in TILES16W[op]] if wgmma_ok(be.device_id) else [])
        for name in names:
            assert any(r["op"] == op and r["shape"][0] == 3 and name in r["ms"] for r in be.tune_log), (op, name)


# The filter gradient of the same inputs by the same kernel: its split-K parts are added with atomics, in whatever
# order they finish, so two runs agree to float32 rounding of the sum, not bit for bit.
DW_RTOL = 1e-6


@contextlib.contextmanager
def _measured_as(be, shape, choices: dict):
    """The backend's convolution choices for shape set to choices ({op: candidate}) as if measured, then restored."""
    key = C.Geometry(*shape).key()
    saved = {op: be._tune.get((op, key)) for op in choices}
    be._tune.update({(op, key): choice for op, choice in choices.items()})
    try:
        yield
    finally:
        for op, choice in saved.items():
            if choice is None:
                be._tune.pop((op, key), None)
            else:
                be._tune[(op, key)] = choice


@pytest.mark.parametrize("fwd,flt", [("tc16", "tc16s"), ("tc16s", "tc16")], ids=["large-small", "small-large"])
def test_conv_keeps_the_channels_last_copy_for_its_backward(rng, fwd, flt):
    """Where the forward and the filter gradient of a shape run "tc16" candidates (set here as if measured), a
    forward told relu_mask=False keeps only its channels-last copy of x for the backward: y, dx, dw and db are bit
    for bit those of the forward that keeps x; a backward with relu_mask=True after it is refused. (The data
    gradient is set to im2col: a measured choice can be split in parts whose atomics add in any order, as under
    compute-sanitizer's slower launches.)"""
    be = get_backend("cuda", "bf16")
    shape = (5, 16, 9, 11, 32, 3, 3, 1, 1)
    x, w, b, _ = conv_inputs(rng, shape)
    dy = cupy.asarray(rng.standard_normal((5, 32, 9, 11)).astype(np.float32))
    with _measured_as(be, shape, {"fwd": fwd, "filter": flt, "data": "im2col"}):
        out = {}
        for relu_mask in (None, False):
            gx, gw, gb = cupy.asarray(x), cupy.asarray(w), cupy.asarray(b)
            y, cache = be.conv2d_forward(gx, gw, gb, 1, 1, relu_mask=relu_mask)
            assert (cache[0] is None) == (relu_mask is False) and (cache[4] is not None) == (relu_mask is False)
            dw, db = cupy.zeros_like(gw), cupy.zeros_like(gb)
            dx = be.conv2d_backward(dy, cache, dw, db, need_dx=True)
            out[relu_mask] = [cupy.asnumpy(a) for a in (y, dx, dw, db)]
        for name, kept, full in zip(("y", "dx", "dw", "db"), out[False], out[None]):
            np.testing.assert_array_equal(kept, full, err_msg=name)
        assert rel_err(out[False][2], conv_filter_expected(cupy.asnumpy(dy), x, np.zeros_like(w), shape)) \
            <= RTOL_TC["bf16"]
        with pytest.raises(ValueError, match="relu_mask"):
            be.conv2d_backward(dy, cache, cupy.zeros_like(gw), None, relu_mask=True)


def test_tf32_conv_keeps_its_copy_beside_x(rng):
    """At tf32 (conv.KEEP_BESIDE_X), where the forward and the filter gradient run channels-last candidates (set here
    as if measured), a forward whose backward needs x (relu_mask True) keeps x and its copy; the backward's filter
    gradient reads that copy: dx bit for bit and dw within float32 rounding (DW_RTOL) of the backward that copies x
    itself. At bf16 the same forward keeps x alone."""
    shape = (3, 16, 9, 11, 32, 3, 3, 1, 1)
    x, w, b, _ = conv_inputs(rng, shape)
    be16 = get_backend("cuda", "bf16")
    with _measured_as(be16, shape, {"fwd": "tc16", "filter": "tc16"}):
        _, cache = be16.conv2d_forward(cupy.asarray(x), cupy.asarray(w), cupy.asarray(b), 1, 1, relu_mask=True)
        assert cache[0] is not None and cache[4] is None
    be = get_backend("cuda", "tf32")
    if not wgmma_ok(be.device_id):
        pytest.skip("the tf32 channels-last forward runs on wgmma (sm_90a) only")
    dy = cupy.asarray(rng.standard_normal((3, 32, 9, 11)).astype(np.float32))
    with _measured_as(be, shape, {"fwd": "tc32w128x128s4", "filter": "tc32", "data": "tc32w128x128s4"}):
        gx, gw, gb = cupy.asarray(x), cupy.asarray(w), cupy.asarray(b)
        _, cache = be.conv2d_forward(gx, gw, gb, 1, 1, relu_mask=True)
        assert cache[0] is not None and cache[4] is not None and cache[4].dtype == np.float32
        out = []
        for c in (cache, (*cache[:4], None, cache[5])):
            dw, db = cupy.zeros_like(gw), cupy.zeros_like(gb)
            out.append((cupy.asnumpy(be.conv2d_backward(dy, c, dw, db, relu_mask=True)), cupy.asnumpy(dw)))
    np.testing.assert_array_equal(out[0][0], out[1][0], err_msg="dx")
    assert rel_err(out[0][1], out[1][1]) <= DW_RTOL


@pytest.mark.parametrize("precision", ["bf16", "tf32", "fp32"])
@pytest.mark.parametrize("shape,k", [((3, 6, 31, 31), 2), ((2, 70, 15, 9), 2), ((2, 8, 7, 11), 3), ((1, 66, 4, 4), 2),
                                     ((3, 72, 9, 10), 2), ((8, 64, 16, 16), 2)], ids=str)
def test_pool_grad_nhwc16(rng, shape, k, precision):
    """pool_grad_nhwc gives exactly to_nhwc(maxpool2d_backward(dy)) (its C channels, unpadded) for windows that tile z
    (rows and columns no window covers, partial 64-channel x 32-pixel tiles, ties in a window: the first maximum), in
    bf16, tf32 and fp32 (split; C a multiple of 4); at bf16 so does pool_grad16_nhwc16 from dy channels-last in bf16
    (in 16-byte vectors where C is a multiple of 8: the last three shapes)."""
    be = get_backend("cuda", precision)
    if precision == "fp32" and shape[1] % 4:
        pytest.skip("split copies take C in chunks of 4")
    z = rng.standard_normal(shape).astype(np.float32)
    z[:, :, :k, :k] = 1.0                               # a tie in the first window of every plane
    y, cache = be.maxpool2d_forward(cupy.asarray(z), k, k)
    dy = cupy.asarray(rng.standard_normal(y.shape).astype(np.float32))
    want = mm.to_nhwc(be, be.maxpool2d_backward(dy, cache))
    want = want[..., :shape[1]] if want.ndim == 4 else want
    got = mm.pool_grad_nhwc(be, dy, cache[2], shape, k)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(cupy.asnumpy(got), cupy.asnumpy(want))
    if precision == "tf32":         # with the r tiles' K-major copy from the same launch
        got, got_t = mm.pool_grad_nhwc(be, dy, cache[2], shape, k, k_major=True)
        np.testing.assert_array_equal(cupy.asnumpy(got), cupy.asnumpy(want))
        np.testing.assert_array_equal(cupy.asnumpy(got_t), dy_t_host(cupy.asnumpy(want)))
    if precision == "bf16":   # from the pooled gradient already channels-last in bf16 (a batch norm's hand-over)
        got16 = mm.pool_grad16_nhwc16(be, cupy.asarray(nhwc16(cupy.asnumpy(dy))), cache[2], shape, k)
        np.testing.assert_array_equal(cupy.asnumpy(got16), cupy.asnumpy(want))


@pytest.mark.parametrize(("precision", "shape"), [("bf16", s) for s in POOL16_SHAPES]
                         + [(p, s) for p in ("tf32", "fp32") for s in POOL32_SHAPES], ids=str)
def test_conv16_pool(rng, precision, shape):
    """The pooled forward of each tile (the wgmma ones where the device runs them), with bias + ReLU and without: y
    and the argmax bytes exactly max_pool_2x2 of the same tile's forward, y within the precision's tolerances of
    float64."""
    n, c, h, w_, o, r, s, stride, pad = shape
    be = get_backend("cuda", precision)
    tiles = mm.tiles16("pool", precision, wgmma_ok(be.device_id))
    for k, tile in enumerate(tiles):
        act = k % 2
        x, w, b, y = conv_inputs(rng, shape, bias=act == 1)
        gx, gw, gb = cupy.asarray(x), cupy.asarray(w), None if b is None else cupy.asarray(b)
        gy = cupy.asarray(y)
        mm.conv16(be, gy, gx, gw, gb, stride, pad, act, tile.name)
        want_y, want_arg = max_pool_2x2(cupy.asnumpy(gy))
        py, parg, _ = mm.conv16_pool(be, gx, gw, gb, stride, pad, act, tile.name)
        np.testing.assert_array_equal(cupy.asnumpy(py), want_y, err_msg=f"{shape} {tile.name}: y")
        np.testing.assert_array_equal(cupy.asnumpy(parg), want_arg, err_msg=f"{shape} {tile.name}: argmax")
        _checked16(f"{shape} {tile.name}", cupy.asnumpy(py), max_pool_2x2(conv_expected(x, w, b, stride, pad, act))[0],
                   max_pool_2x2(conv_expected(x, w, b, stride, pad, act, precision))[0], precision)


# what each precision's channels-last convolutions are set to have measured (tf32's forward exists on wgmma only)
MEASURED_CL = {"bf16": {"fwd": "tc16", "pool": "tc16", "filter": "tc16s", "data": "tc16"},
               "tf32": {"fwd": "tc32w128x128s4", "pool": "tc32w64x256s4n128", "filter": "tc32s",
                        "data": "tc32w128x128s4"},
               "fp32": {"fwd": "tc32x3w128x128s3", "pool": "tc32x3w64x128s4", "filter": "tc32x3s",
                        "data": "tc32x3w64x128s4"}}


@pytest.mark.parametrize("precision", ["bf16", "tf32", "fp32"])
@pytest.mark.parametrize("relu", [False, True], ids=["conv_pool", "conv_relu_pool"])
def test_conv_maxpool_forward_pools_in_the_epilogue(rng, relu, precision, monkeypatch):
    """Where the forward of a shape was measured on a channels-last candidate (set here), conv2d_maxpool_forward and
    conv2d_relu_maxpool_forward run one pooled kernel: y, the argmax bytes and the backward's dx (the pooled gradient
    straight to the gradients' channels-last copy, mma.pool_grad_nhwc) are bit for bit the two ops' in a row, dw and
    db within float32 rounding (DW_RTOL); the conv_pool forward told relu_mask=False keeps only x's channels-last copy
    where the filter gradient runs on it too."""
    be = get_backend("cuda", precision)
    if precision != "bf16" and not wgmma_ok(be.device_id):
        pytest.skip("the tf32 / fp32 channels-last forward runs on wgmma (sm_90a) only")
    shape = (4, 16, 15, 13, 32, 3, 3, 1, 1)
    x, w, b, _ = conv_inputs(rng, shape)
    calls = []
    pooled = mm.conv16_pool
    monkeypatch.setattr(mm, "conv16_pool", lambda *a, **kw: calls.append(1) or pooled(*a, **kw))
    with _measured_as(be, shape, MEASURED_CL[precision]):
        gx, gw, gb = cupy.asarray(x), cupy.asarray(w), cupy.asarray(b)
        if relu:
            fused = be.conv2d_relu_maxpool_forward(gx, gw, gb, 1, 1, 2, 2)
            two = compose.conv2d_relu_maxpool_forward(be, gx, gw, gb, 1, 1, 2, 2)
            backward, composed = be.conv2d_relu_maxpool_backward, compose.conv2d_relu_maxpool_backward
        else:
            fused = be.conv2d_maxpool_forward(gx, gw, gb, 1, 1, 2, 2, relu_mask=False)
            two = compose.conv2d_maxpool_forward(be, gx, gw, gb, 1, 1, 2, 2, relu_mask=False)
            backward, composed = be.conv2d_maxpool_backward, compose.conv2d_maxpool_backward
        assert calls == [1]
        (y, cache), (y2, cache2) = fused, two
        np.testing.assert_array_equal(cupy.asnumpy(y), cupy.asnumpy(y2), err_msg="y")
        np.testing.assert_array_equal(cupy.asnumpy(cache[1][2]), cupy.asnumpy(cache2[1][2]), err_msg="argmax")
        assert cache[1][0] == cache2[1][0] and (cache[0][0] is None) == (not relu)
        dy = cupy.asarray(rng.standard_normal(y.shape).astype(np.float32))
        out = []
        for bwd, c in ((backward, cache), (lambda *a, **kw: composed(be, *a, **kw), cache2)):
            dw, db = cupy.zeros_like(gw), cupy.zeros_like(gb)
            out.append([cupy.asnumpy(a) for a in (bwd(dy, c, dw, db, need_dx=True), dw)] + [cupy.asnumpy(db)])
        np.testing.assert_array_equal(out[0][0], out[1][0], err_msg="dx")
        assert rel_err(out[0][1], out[1][1]) <= DW_RTOL
        assert rel_err(out[0][2], out[1][2]) <= 1e-5


# The hand-overs' shapes: planes of 15 x 13 (the channels-last kernels in elements), and of 16 x 12 (in 16-byte
# vectors: planes and channels multiples of 8, norm.py's _nhwc16_vectors)
HAND_OVER_SHAPES = [(4, 16, 15, 13, 32, 3, 3, 1, 1), (4, 16, 16, 12, 32, 3, 3, 1, 1)]
# the hand-over tests' cases, (precision, the choices set as if measured): bf16 ("tc16" candidates), tf32
# (MEASURED_CL's, the filter gradient on the mma.sync tile "tc32s" or on an r tile, which reads dy's K-major copy too)
HAND_OVERS = {"bf16": ("bf16", {"fwd": "tc16", "pool": "tc16", "filter": "tc16", "data": "tc16"}),
              "tf32": ("tf32", MEASURED_CL["tf32"]),
              "tf32r": ("tf32", {**MEASURED_CL["tf32"], "filter": "tc32w128x128s3b2r"})}


def _hand_over_backend(case: str):
    """(backend, choices) of a HAND_OVERS case; tf32 skipped where wgmma does not run (its forward's only tiles)."""
    precision, measured = HAND_OVERS[case]
    be = get_backend("cuda", precision)
    if precision == "tf32" and not wgmma_ok(be.device_id):
        pytest.skip("the tf32 channels-last forward runs on wgmma (sm_90a) only")
    return be, measured


@pytest.mark.parametrize("shape", HAND_OVER_SHAPES, ids=["elements", "vectors"])
@pytest.mark.parametrize("op", ["batchnorm", "bn_gelu", "bn_relu", "gelu"])
@pytest.mark.parametrize("case", list(HAND_OVERS))
def test_batch_norm_hands_its_output_over_channels_last(rng, op, shape, case):
    """Where the convolution that alone reads a batch norm's (-> GELU's, -> own ReLU's) or a GELU's output keeps its
    channels-last copy (its ops set here as if measured on channels-last candidates, HAND_OVERS), the forward given
    `feeds` returns that copy (conv.Nhwc16): the bits of mma.to_nhwc of its float32 output; the convolution and the
    pooled one take it: y, dx bit for bit as from the float32 output, dw within DW_RTOL. Where the convolution does
    not keep it, the output is float32."""
    be, measured = _hand_over_backend(case)
    n, c, h, w_, o = shape[:5]
    x = cupy.asarray((rng.standard_normal((n, c, h, w_)) * 2 + 0.5).astype(np.float32))
    gamma = cupy.asarray(rng.uniform(0.5, 1.5, c).astype(np.float32))
    beta = cupy.asarray(rng.standard_normal(c).astype(np.float32))
    w = cupy.asarray((rng.standard_normal((o, c, 3, 3)) * 0.1).astype(np.float32))
    feeds = ((o, c, 3, 3), 1, 1)
    def bn(**kw):
        if op == "gelu":
            return be.gelu_forward(x, **kw)
        forward = getattr(be, op + "_forward")
        return forward(x, gamma, beta, cupy.zeros(c, np.float32), cupy.ones(c, np.float32), 0.1, 1e-5, True, **kw)

    assert isinstance(bn(feeds=feeds)[0], cupy.ndarray)               # not measured: float32
    with _measured_as(be, shape, measured):
        y32, y16 = bn()[0], bn(feeds=feeds)[0]
        assert isinstance(y16, C.Nhwc16) and y16.shape == tuple(x.shape)
        np.testing.assert_array_equal(cupy.asnumpy(y16.data), cupy.asnumpy(mm.to_nhwc(be, y32)))
        dy = cupy.asarray(rng.standard_normal((n, o, h, w_)).astype(np.float32))
        out = []
        for a in (y32, y16):
            z, cache = be.conv2d_forward(a, w, None, 1, 1, relu_mask=False)
            assert cache[0] is None                                      # only the copy kept
            dw = cupy.zeros_like(w)
            dx = be.conv2d_backward(dy, cache, dw, None, need_dx=True)
            pooled, _ = be.conv2d_maxpool_forward(a, w, None, 1, 1, 2, 2, relu_mask=False)
            out.append([cupy.asnumpy(t) for t in (z, dx, pooled, dw)])
        for name, a, b in zip(("y", "dx", "pooled y"), out[0], out[1]):
            np.testing.assert_array_equal(b, a, err_msg=name)
        assert rel_err(out[1][3], out[0][3]) <= DW_RTOL


@pytest.mark.parametrize("shape", HAND_OVER_SHAPES, ids=["elements", "vectors"])
@pytest.mark.parametrize("pooled", [False, True], ids=["conv", "conv_pool"])
@pytest.mark.parametrize("op", ["batchnorm", "bn_gelu", "bn_relu"])
@pytest.mark.parametrize("case", list(HAND_OVERS))
def test_batch_norm_hands_its_gradient_over_channels_last(rng, op, pooled, shape, case):
    """Where the convolution (-> max pool) whose output a batch norm (-> GELU) normalises runs its filter and data
    gradients on channels-last candidates (HAND_OVERS, set here as if measured), the batch norm's backward given
    `grad_feeds` returns dE/dx as their channels-last copy (conv.Nhwc16): the bits of mma.to_nhwc of the float32 dx
    (at tf32 with its K-major copy where the filter gradient runs an r tile); the convolution's (pooled
    convolution's) backward takes it: dx bit for bit as from the float32 dy, dw within DW_RTOL. Where the
    convolution does not run so, or at tf32 after a pooling, the gradient is float32; with a bias gradient the
    hand-over is refused."""
    be, measured = _hand_over_backend(case)
    precision = be.precision
    n, c, h, w_, o = shape[:5]
    x = cupy.asarray(rng.standard_normal((n, c, h, w_)).astype(np.float32))
    w = cupy.asarray((rng.standard_normal((o, c, 3, 3)) * 0.1).astype(np.float32))
    gamma = cupy.asarray(rng.uniform(0.5, 1.5, o).astype(np.float32))
    beta = cupy.asarray(rng.standard_normal(o).astype(np.float32))
    grad_feeds = ((o, c, 3, 3), 1, 1, (n, c, h, w_), (2, 2) if pooled else None)
    forward, backward = getattr(be, op + "_forward"), getattr(be, op + "_backward")
    conv_back = be.conv2d_maxpool_backward if pooled else be.conv2d_backward

    def conv():
        if pooled:
            return be.conv2d_maxpool_forward(x, w, None, 1, 1, 2, 2, relu_mask=False)
        return be.conv2d_forward(x, w, None, 1, 1, relu_mask=False)

    def bn(z):
        return forward(z, gamma, beta, cupy.zeros(o, np.float32), cupy.ones(o, np.float32), 0.1, 1e-5, True)[1]

    def bn_back(dy, cache, **kw):
        return backward(dy, cache, cupy.zeros_like(gamma), cupy.zeros_like(beta), need_dx=True, **kw)

    z, _ = conv()
    dy = cupy.asarray(rng.standard_normal(z.shape).astype(np.float32))
    assert isinstance(bn_back(dy, bn(z), grad_feeds=grad_feeds), cupy.ndarray)    # not measured: float32
    with _measured_as(be, shape, measured):
        z, conv_cache = conv()
        bn_cache = bn(z)
        dz32, dz16 = bn_back(dy, bn_cache), bn_back(dy, bn_cache, grad_feeds=grad_feeds)
        if pooled and precision == "tf32":
            assert isinstance(dz16, cupy.ndarray)
            return
        assert isinstance(dz16, C.Nhwc16) and dz16.shape == tuple(z.shape)
        k_major = case == "tf32r"                   # (the r tile reads dy's K-major copy too)
        want = mm.to_nhwc(be, dz32, k_major=k_major)
        want, want_t = want if k_major else (want, None)
        np.testing.assert_array_equal(cupy.asnumpy(dz16.data), cupy.asnumpy(want))
        assert (dz16.k_major is None) == (want_t is None)
        if want_t is not None:
            np.testing.assert_array_equal(cupy.asnumpy(dz16.k_major), cupy.asnumpy(want_t))
        out = []
        for d in (dz32, dz16):
            dw = cupy.zeros_like(w)
            dx = conv_back(d, conv_cache, dw, None, need_dx=True)
            out.append((cupy.asnumpy(dx), cupy.asnumpy(dw)))
        np.testing.assert_array_equal(out[1][0], out[0][0], err_msg="dx")
        assert rel_err(out[1][1], out[0][1]) <= DW_RTOL
        with pytest.raises(ValueError, match="channels-last dy"):
            conv_back(dz16, conv_cache, cupy.zeros_like(w), cupy.zeros(o, np.float32), need_dx=True)


def _hand_over_models(be, act_layer):
    """({False: model, True: model}, {False: train step, True: train step}): the same conv -> BN -> act -> conv ->
    BN -> act -> conv -> pool -> BN -> act -> dense model (seed 3, act_layer's acts) twice on be, each with an SGD
    step."""
    models, steps = {}, {}
    for key in (False, True):
        hn.seed(3)
        models[key] = hn.Sequential([
            hn.Conv2D(8, 16, 3, padding=1, bias=False), hn.BatchNorm2D(16), act_layer(),
            hn.Conv2D(16, 16, 3, padding=1, bias=False), hn.BatchNorm2D(16), act_layer(),
            hn.Conv2D(16, 16, 3, padding=1, bias=False), hn.MaxPool2D(2), hn.BatchNorm2D(16), act_layer(),
            hn.Flatten(), hn.Dense(16 * 6 * 6, 4)]).to(be)
        steps[key] = T.make_train_step(models[key], T.make_optimizer("sgd", models[key].parameters(), lr=0.05))
    return models, steps


SMALL_TC_CASES = [  # (N, C, H, W, K, kernel, stride, padding): C R S <= 32, K <= 64
    (2, 3, 9, 11, 64, 3, 1, 1),      # cifar-wide's first layer, odd planes (pixels not 4-aligned in an image)
    (3, 1, 28, 28, 32, 3, 1, 1),     # fashion-cnn's
    (1, 2, 7, 6, 8, 4, 2, 1),        # stride 2, 32 taps
    (2, 3, 8, 8, 20, 3, 2, 0),       # K not a multiple of 8
]


@pytest.mark.parametrize("case", SMALL_TC_CASES, ids=lambda c: "N{}C{}H{}W{}K{}k{}s{}p{}".format(*c))
def test_small_convolutions_on_tensor_cores(rng, monkeypatch, case):
    """At bf16 the forward and the filter gradient run as "small_tc" (mma.cu's conv_small_fwd_tc and
    conv_small_filter_tc + conv_small_filter_tc_add, set as the measured choice): y (bias, with and without ReLU)
    and dw (added into a prior gradient) against float64 of x, w and dy rounded to bf16, within RTOL_TC_ROUNDED; the
    bias gradient float32's sum of dy; the forward's bf16 output (to_norm's Nchw16) the bf16 bits of its float32
    output, with each channel's sum and sum of squares of those values (Nchw16.sums, for the batch norm)."""
    be = get_backend("cuda", "bf16")
    n, c, h, w_, k, ks, stride, pad = case
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((n, c, h, w_), (k, c, ks, ks), (k,)))
    xr, wr = round_bf16(x).astype(np.float64), round_bf16(w).astype(np.float64)
    want, cache = reference_backend.conv2d_forward(xr, wr, b.astype(np.float64), stride, pad)
    dy = rng.standard_normal(want.shape).astype(np.float32)
    dw_want, db_want = np.ones(w.shape), np.ones(k)
    reference_backend.conv2d_backward(round_bf16(dy).astype(np.float64), cache, dw_want, None, need_dx=False)
    db_want += dy.astype(np.float64).sum(axis=(0, 2, 3))
    monkeypatch.setattr(C, "_choose", lambda be_, op, g, cands, *run: "small_tc")
    for act in (0, 1):
        y = be.to_numpy(C.conv_forward(be, be.asarray(x), be.asarray(w), be.asarray(b), stride, pad, act))
        assert rel_err(y, np.maximum(want, 0) if act else want) <= RTOL_TC_ROUNDED, act
        y16 = C.conv_forward(be, be.asarray(x), be.asarray(w), be.asarray(b), stride, pad, act, None, True)
        np.testing.assert_array_equal(cupy.asnumpy(y16.data), bf16_bits(y), err_msg=f"act {act}")
        want_sums = batch_norm_sums(bf16_values(bf16_bits(y)))        # of the values stored
        np.testing.assert_allclose(mm.folded_sums(cupy.asnumpy(y16.sums), k), want_sums, rtol=1e-9,
                                   err_msg=f"act {act}")
    dw, db = be.asarray(np.ones(w.shape)), be.asarray(np.ones(k))
    C.conv_backward(be, be.asarray(dy), be.asarray(x), be.asarray(w), dw, db, stride, pad, need_dx=False)
    assert rel_err(be.to_numpy(dw) - 1, dw_want - 1) <= RTOL_TC_ROUNDED
    assert rel_err(be.to_numpy(db), db_want) <= tolerance(np.float32)


def test_batch_norm_hands_a_small_convolution_its_gradient_in_bf16(rng, monkeypatch):
    """At bf16, a convolution whose filter gradient runs "small_tc" (set as if measured) gets dE/dy from the batch norm
    after it stored in bf16 (conv.Nchw16: norm.cu's bn_bwd_dx16, mma.cu's conv_small_filter_tc_dy16); the
    gradients are those of the same step with dE/dy in float32 (which conv_small_filter_tc rounds to the same bf16
    values) within RTOL_TC_ROUNDED."""
    from hetnet.backends.cuda import norm as N

    be = get_backend("cuda", "bf16")
    x = rng.standard_normal((16, 3, 12, 12)).astype(np.float32)
    y = rng.integers(0, 4, size=16)
    forms, back = [], be.bn_relu_backward

    def spy(*a, **kw):
        dx = back(*a, **kw)
        forms.append(type(dx).__name__)
        return dx

    monkeypatch.setattr(be, "bn_relu_backward", spy)
    grads = []
    with _measured_as(be, (16, 3, 12, 12, 16, 3, 3, 1, 1), {"fwd": "small_tc", "filter": "small_tc"}):
        for handed in (True, False):
            if not handed:
                monkeypatch.setattr(N, "takes_dy16_nchw", lambda *a: False)
            hn.seed(3)
            model = hn.Sequential([hn.Conv2D(3, 16, 3, padding=1, bias=False), hn.BatchNorm2D(16), hn.ReLU(),
                                   hn.Flatten(), hn.Dense(16 * 12 * 12, 4)]).to(be)
            grads.append(plan_step(model, x, y)[1])
    assert forms == ["Nchw16", "ndarray"], forms
    for i, g in grads[0].items():
        assert rel_err(g, grads[1][i]) <= RTOL_TC_ROUNDED, (i, rel_err(g, grads[1][i]))


def test_batch_norm_statistics_from_the_tma_tiles(rng, monkeypatch):
    """At bf16 a TMA tile's forward and a persistent one's pooled forward (set as if measured) hand the batch norms
    after them their outputs' statistics (mma.with_sums, Nchw16.sums), which those read instead of making their own:
    the logits and every gradient within 1e-6 of the same step whose batch norms make the statistics themselves
    (float64 sums of the same bf16 values, added in another order). test_cuda_emulated runs the same on the CPU."""
    be = get_backend("cuda", "bf16")
    if not wgmma_ok(be.device_id):
        pytest.skip("the TMA tiles need sm_90a")
    n = 8
    x = rng.standard_normal((n, 3, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, size=n)
    forward, handed = be.bn_relu_forward, []
    monkeypatch.setattr(be, "bn_relu_forward", lambda x_, *a, **kw: handed.append(
        isinstance(x_, C.Nchw16) and x_.sums is not None) or forward(x_, *a, **kw))
    runs = []
    with contextlib.ExitStack() as stack:
        for shape, measured in tma_choices(n).items():
            stack.enter_context(_measured_as(be, shape, measured))
        for sums in (True, False):
            if not sums:
                monkeypatch.setattr(mm, "with_sums", lambda xp, call: call)
            runs.append(plan_step(pooled_cnn(be, (64, 64, 64, 64), 9), x, y))
    assert handed == [False, True, True, False, False, False], handed
    (logits, grads), (plain_logits, plain_grads) = runs
    assert rel_err(logits, plain_logits) <= 1e-6
    for i, g in grads.items():
        assert rel_err(g, plain_grads[i]) <= 1e-6, (i, rel_err(g, plain_grads[i]))


class _RecordingPool:
    """A step pool (CudaBackend.step_pool) that records the blocks it hands out: (address, bytes)."""

    def __init__(self, pool):
        self.pool, self.blocks = pool, []

    def malloc(self, size):
        mem = self.pool.malloc(size)
        self.blocks.append((mem.ptr, size))
        return mem

    def __getattr__(self, name):
        return getattr(self.pool, name)


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_captured_steps_copy_their_weights_in_one_launch(rng, monkeypatch, precision):
    """Training steps (the eager first, then the captured one, then a replay) of a model whose convolutions run on
    channels-last copies (set as if measured), from weights loaded anew before each step: after each step the
    copies the step read (mma.StepCopies, made on demand in the first step, by one launch as each later one starts)
    are bit for bit to_nhwc's and turn_weights' of the weights that step started from, and the weights' updates
    agree with those of the same steps with every convolution copying its weights itself. The copies and the
    launch's table never come from the step pool, whose free blocks an earlier captured graph may still use as its
    temporaries (a graph replayed after another batch shape's eager step overwrote the table)."""
    be = get_backend("cuda", precision)
    if not wgmma_ok(be.device_id):
        pytest.skip("no wgmma on this device")
    pool = _RecordingPool(be.step_pool())
    monkeypatch.setattr(be, "_step_pool", pool)
    x = rng.standard_normal((48, 8, 12, 12)).astype(np.float32)
    y = rng.integers(0, 4, size=48)
    prefix, tile = C.CL_PREFIX[precision], {"bf16": "w128x128s4", "tf32": "w128x128s4", "fp32": "w64x128s4"}[precision]
    measured = {"fwd": prefix + tile, "pool": prefix + tile, "data": prefix + tile, "filter": prefix}
    bound = {"fp32": tolerance(np.float32), **RTOL_TC}[precision]
    with (_measured_as(be, (16, 8, 12, 12, 16, 3, 3, 1, 1), measured),
          _measured_as(be, (16, 16, 12, 12, 16, 3, 3, 1, 1), measured)):
        models, steps = _hand_over_models(be, hn.ReLU)
        steps[False]._weight_copies = contextlib.nullcontext         # each convolution copies its weights
        for i in range(3):
            models[True].load_state_dict(models[False].state_dict())
            before = models[False].state_dict()
            start = {kernels.address(p.data): p.data.copy() for p in models[True].parameters()}
            for copies in (False, True):
                steps[copies].step(be.asarray(x[16 * i:16 * i + 16]), be.labels(y[16 * i:16 * i + 16]))
            cupy.cuda.runtime.deviceSynchronize()          # (the steps run on the backend's compute stream)
            store = steps[True]._copies[(be.name, precision)]
            assert len(store.entries) >= 5 and len(store.kept) == 1, (i, len(store.entries), len(store.kept))
            assert pool.blocks, "the steps ran in the step pool"
            for a in [store.table] + [copy for _, copy in store.entries.values()]:
                assert not any(p <= a.data.ptr < p + n for p, n in pool.blocks), "kept in a block of the step pool"
            for (addr, shape, turned), (_, copy) in store.entries.items():
                w = start[addr].reshape(shape)
                want = mm.turn_weights(be, w) if turned else mm.to_nhwc(be, w)
                np.testing.assert_array_equal(cupy.asnumpy(copy).view(np.uint8), cupy.asnumpy(want).view(np.uint8),
                                              err_msg=f"step {i}: weight of shape {shape}, turned {turned}")
            want, got = models[False].state_dict(), models[True].state_dict()
            for k, v in want.items():
                if not k.endswith(("running_mean", "running_var", "num_batches_tracked")):
                    assert rel_err(got[k] - before[k], v - before[k]) <= bound, (i, k)


@pytest.mark.parametrize(("precision", "act"), [("bf16", "gelu"), ("bf16", "relu"), ("tf32", "relu")])
def test_training_with_hand_overs_equals_training_without(rng, monkeypatch, precision, act):
    """bf16 training steps of conv -> BN -> act -> conv -> BN -> act -> conv -> pool -> BN -> act -> dense (act: GELU,
    or ReLU, run as the fused BN -> ReLU owning its derivative), the
    second and third convolutions' ops set as if measured on "tc16" candidates, with the batch norms handing their
    outputs over channels-last to them (the plan's feeds) and the second and third their gradients to the
    convolutions before them (grad_feeds), and without (takes_feeds off): from the same weights, the eager first
    step and the captured second step give the same weight updates within RTOL_TC["bf16"], and the hand-overs
    happened in both steps of the first model. The updates, and within bf16's tolerance: the two paths run different
    kernels (a hand-over's batch norm writes its bf16 channels-last output or gradient itself), so a float32 value
    summed in another order can round to the other bf16 neighbour; that moved a batch norm's shift (zero at the
    start, so its weight is its update) by 2.9e-4 relative on the H100 for one seed in several, past
    RTOL_TC_ROUNDED. A wrong hand-over moves it by O(1).
    Each step starts both models from the same state: a trajectory cannot be compared, since the filter gradients'
    split-K atomics add in any order and a last-bit change of a convolution's output can move a max pool's argmax
    (bf16 inputs make ties common), which moves the gradients by far more than rounding from the next step on (two
    runs of the same four steps end up 1e-4 to 5e-3 apart on the H200). At tf32 the same (the batch norms' tf32
    copies: bn_apply_nhwc32, bn_bwd_dx_nhwc32), within RTOL_TC["tf32"], except that the batch norm after the pooling
    keeps its float32 gradient (conv.takes_dy16)."""
    be, measured = _hand_over_backend(precision)
    x = rng.standard_normal((32, 8, 12, 12)).astype(np.float32)
    y = rng.integers(0, 4, size=32)
    outputs, grads = [], []
    bn_act, bn_act_back = getattr(be, f"bn_{act}_forward"), getattr(be, f"bn_{act}_backward")
    layer = hn.GELU if act == "gelu" else hn.ReLU

    def spy(*a, **kw):                        # the Python side runs in the eager and captured steps, not replays
        y_, cache = bn_act(*a, **kw)
        outputs.append((be.takes_feeds, y_))
        return y_, cache

    def spy_back(*a, **kw):
        dx = bn_act_back(*a, **kw)
        grads.append((be.takes_feeds, dx))
        return dx

    monkeypatch.setattr(be, f"bn_{act}_forward", spy)
    monkeypatch.setattr(be, f"bn_{act}_backward", spy_back)
    monkeypatch.setattr(P, "_to_norm", lambda node, be, grad=False: {})     # batch norms: float32 x and dy
    with _measured_as(be, (16, 16, 12, 12, 16, 3, 3, 1, 1), measured):
        models, steps = _hand_over_models(be, layer)
        for i in range(2):                    # the eager step, then the captured one
            before = models[False].state_dict()
            models[True].load_state_dict(before)
            for takes in (False, True):
                monkeypatch.setattr(be, "takes_feeds", takes)
                steps[takes].step(be.asarray(x[16 * i:16 * i + 16]), be.labels(y[16 * i:16 * i + 16]))
            want, got = models[False].state_dict(), models[True].state_dict()
            for k, v in want.items():
                if not k.endswith(("running_mean", "running_var", "num_batches_tracked")):
                    err = rel_err(got[k] - before[k], v - before[k])
                    assert err <= RTOL_TC[precision], (i, k, err)
    # per step three BN -> acts: the first two hand their output to a convolution, the last two (the backward
    # meets them first) their gradient to the convolution (-> pool) before them (after the pool: bf16 only)
    handed = {takes: [isinstance(o, C.Nhwc16) for t, o in outputs if t == takes] for takes in (False, True)}
    assert handed[True] == [True, True, False] * 2 and not any(handed[False]), handed
    handed = {takes: [isinstance(d, C.Nhwc16) for t, d in grads if t == takes] for takes in (False, True)}
    assert handed[True] == [precision == "bf16", True, False] * 2 and not any(handed[False]), handed


def _bits_values(a):
    """The float32 values of bf16 bits (uint16, a cupy array)."""
    return (a.astype(cupy.uint32) << 16).view(cupy.float32)


def _conv_bn_inputs(rng, after: bool):
    """(shape, x, w, gamma, beta) of a 16 -> 32 channel 3 x 3 convolution and a batch norm after it (after: of its 32
    output channels) or before it (of its 16 input channels), as cupy float32."""
    shape = (4, 16, 14, 12, 32, 3, 3, 1, 1)
    n, c, h, w_, o = shape[:5]
    x = cupy.asarray(rng.standard_normal((n, c, h, w_)).astype(np.float32))
    w = cupy.asarray((rng.standard_normal((o, c, 3, 3)) * 0.1).astype(np.float32))
    channels = o if after else c
    gamma = cupy.asarray(rng.uniform(0.5, 1.5, channels).astype(np.float32))
    beta = cupy.asarray(rng.standard_normal(channels).astype(np.float32))
    return shape, x, w, gamma, beta


@pytest.mark.parametrize("pooled", [False, True], ids=["conv", "conv_pool"])
@pytest.mark.parametrize("op", ["batchnorm", "bn_gelu", "bn_relu"])
def test_convolution_hands_its_output_over_to_a_batch_norm_in_bf16(rng, op, pooled):
    """At bf16, where a convolution (-> max pool) runs its forward on "tc16" candidates (set here as if measured), the
    forward given to_norm returns y stored in bf16 (conv.Nchw16): the bits of bf16 of its float32 y (the argmax bytes
    the same). The batch norm (-> GELU, -> own ReLU) takes it in every kernel ("_x16"): statistics, running
    statistics, y (float32, and the channels-last copy for `feeds`), dx (float32, and the copy for `grad_feeds`),
    dgamma and dbeta bit for bit as from the float32 of the same values, in training, synchronised (reduce) and in
    evaluation; it is never written over (inplace) and cannot give a ReLU mask. Not measured so: float32."""
    be = get_backend("cuda", "bf16")
    shape, x, w, gamma, beta = _conv_bn_inputs(rng, after=True)
    n, c, h, w_, o = shape[:5]
    forward, backward = getattr(be, op + "_forward"), getattr(be, op + "_backward")

    def conv(**kw):
        if pooled:
            y, cache = be.conv2d_maxpool_forward(x, w, None, 1, 1, 2, 2, relu_mask=False, **kw)
            return y, cache[1][2]
        return be.conv2d_forward(x, w, None, 1, 1, relu_mask=False, **kw)[0], None

    assert isinstance(conv(to_norm=True)[0], cupy.ndarray)                   # not measured: float32
    with _measured_as(be, shape, {"fwd": "tc16", "pool": "tc16", "filter": "tc16", "data": "tc16"}):
        (z32, arg32), (z16, arg16) = conv(), conv(to_norm=True)
        assert isinstance(z16, C.Nchw16) and z16.shape == z32.shape and z16.data.dtype == np.uint16
        np.testing.assert_array_equal(cupy.asnumpy(z16.data), bf16_bits(cupy.asnumpy(z32)))
        if pooled:
            np.testing.assert_array_equal(cupy.asnumpy(arg16), cupy.asnumpy(arg32))
        zv = _bits_values(z16.data)                                          # the values z16 stands for
        p, q = z32.shape[2:]
        feeds = ((o, o, 3, 3), 1, 1)
        grad_feeds = ((o, c, 3, 3), 1, 1, (n, c, h, w_), (2, 2) if pooled else None)
        dy = cupy.asarray(rng.standard_normal(z32.shape).astype(np.float32))
        with _measured_as(be, (n, o, p, q, o, 3, 3, 1, 1), {"fwd": "tc16", "filter": "tc16"}):
            for mode in ("train", "sync", "eval"):
                out = []
                for z in (zv, z16):
                    rm, rv = cupy.zeros(o, np.float32), cupy.ones(o, np.float32)
                    kw = {"reduce": lambda a: None} if mode == "sync" else {}
                    y, cache = forward(z, gamma, beta, rm, rv, 0.1, 1e-5, mode != "eval", **kw)
                    y16 = forward(z, gamma, beta, rm.copy(), rv.copy(), 0.1, 1e-5, mode != "eval", feeds=feeds,
                                  **kw)[0]
                    assert isinstance(y16, C.Nhwc16)
                    grads = []
                    # in place where the op may write dx over its input (not over z16, nor over zv, read again)
                    inplace = {"inplace": True} if z is z16 and op != "batchnorm" else {}
                    for gf in (None, grad_feeds):
                        dg, db = cupy.zeros_like(gamma), cupy.zeros_like(beta)
                        dz = backward(dy, cache, dg, db, need_dx=True, grad_feeds=gf, **inplace)
                        grads += [dz.data if isinstance(dz, C.Nhwc16) else dz, dg, db]
                    out.append([cupy.asnumpy(t) for t in (y, y16.data, rm, rv, *grads)])
                assert cache[0] is z16                                       # kept as given
                for i, (a, b) in enumerate(zip(*out)):
                    np.testing.assert_array_equal(b, a, err_msg=f"{mode}: output {i}")
                np.testing.assert_array_equal(cupy.asnumpy(z16.data), bf16_bits(cupy.asnumpy(z32)))
        with pytest.raises(ValueError, match="relu_mask"):
            backward(dy, cache, None, None, need_dx=True, relu_mask=True)


@pytest.mark.parametrize("pooled", [False, True], ids=["conv", "conv_pool"])
@pytest.mark.parametrize("op", ["batchnorm", "bn_gelu", "bn_relu"])
def test_convolution_hands_its_input_gradient_to_a_batch_norm_in_bf16(rng, op, pooled):
    """At bf16, where a convolution (-> max pool) after a batch norm runs its data gradient on "tc16" candidates (set
    here as if measured), its backward given grad_to_norm returns dE/dx stored in bf16 (conv.Nchw16): the bits of
    bf16 of the float32 dx of the same kernel (dw the same). The batch norm's backward (-> GELU, -> own ReLU) takes it
    ("_dy16" kernels): dx (float32, and the channels-last copy for grad_feeds), dgamma and dbeta bit for bit as from
    the float32 of the same values, with x float32 and stored in bf16 ("_x16_dy16"). dw within DW_RTOL."""
    be = get_backend("cuda", "bf16")
    shape, x, w, gamma, beta = _conv_bn_inputs(rng, after=False)
    n, c, h, w_, o = shape[:5]
    forward, backward = getattr(be, op + "_forward"), getattr(be, op + "_backward")
    conv_fwd = ((lambda a: be.conv2d_maxpool_forward(a, w, None, 1, 1, 2, 2, relu_mask=False)) if pooled
                else (lambda a: be.conv2d_forward(a, w, None, 1, 1, relu_mask=False)))
    conv_back = be.conv2d_maxpool_backward if pooled else be.conv2d_backward
    with _measured_as(be, shape, {"fwd": "tc16", "pool": "tc16", "filter": "tc16", "data": "tc16"}):
        y, conv_cache = conv_fwd(x)
        dy = cupy.asarray(rng.standard_normal(y.shape).astype(np.float32))
        out = []
        for to_norm in (False, True):
            dw = cupy.zeros_like(w)
            dx = conv_back(dy, conv_cache, dw, None, need_dx=True, grad_to_norm=to_norm)
            out.append((dx, cupy.asnumpy(dw)))
        (dx32, dw32), (dx16, dw16) = out
        assert isinstance(dx16, C.Nchw16) and dx16.shape == dx32.shape
        np.testing.assert_array_equal(cupy.asnumpy(dx16.data), bf16_bits(cupy.asnumpy(dx32)))
        assert rel_err(dw16, dw32) <= DW_RTOL                          # (the split filter gradient's atomics)
        dv = _bits_values(dx16.data)
        z16 = C.Nchw16(cupy.asarray(bf16_bits(cupy.asnumpy(x))))
        grad_feeds = ((c, c, 3, 3), 1, 1, (n, c, h, w_), None)          # as if a c -> c convolution made x
        with _measured_as(be, (n, c, h, w_, c, 3, 3, 1, 1), {"filter": "tc16", "data": "tc16"}):
            for xin in (x, z16):
                cache = forward(xin, gamma, beta, cupy.zeros(c, np.float32), cupy.ones(c, np.float32), 0.1, 1e-5,
                                True)[1]
                got = []
                for g in (dv, dx16):
                    for gf in (None, grad_feeds):
                        dg, db = cupy.zeros_like(gamma), cupy.zeros_like(beta)
                        d = backward(g, cache, dg, db, need_dx=True, grad_feeds=gf)
                        got.append([cupy.asnumpy(t) for t in (d.data if isinstance(d, C.Nhwc16) else d, dg, db)])
                for a, b in zip(got[:2], got[2:]):
                    for i in range(3):
                        np.testing.assert_array_equal(b[i], a[i], err_msg=f"x {type(xin).__name__}: output {i}")


def test_training_with_batch_norm_inputs_in_bf16(rng, monkeypatch):
    """bf16 training steps of conv -> BN -> ReLU -> conv -> BN -> ReLU -> conv -> pool -> BN -> ReLU -> dense, the
    second and third convolutions' ops set as if measured on "tc16" candidates: the plan hands their outputs to the
    batch norms after them in bf16 (Node.to_norm, conv.Nchw16) and their input gradients to the batch norms before
    them (Node.grad_to_norm). The eager and captured steps give the same weight updates within RTOL_TC["bf16"] as
    with all of them in float32 (the plan's _to_norm off) and those batch norms' inputs and gradients rounded to bf16
    where they arrive (the pooled one after the pooling, which compares float32 values in both): the hand-overs
    change where the rounding happens, not what is rounded. (Without that rounding the first convolution's update
    moved by 8.5% on the H200: each batch norm's backward takes dy's components along 1 and x-hat out, and what is
    left of a freshly initialised network's gradient is small beside them.)"""
    be = get_backend("cuda", "bf16")
    x = rng.standard_normal((32, 8, 12, 12)).astype(np.float32)
    y = rng.integers(0, 4, size=32)
    inputs, grads = [], []
    bn_relu, bn_relu_back = be.bn_relu_forward, be.bn_relu_backward
    rounding = {"on": False, "fwd": 0, "bwd": 0}      # the float32 run: round where the other gets bf16

    def spy(x_, *a, **kw):
        inputs.append(isinstance(x_, C.Nchw16))
        if rounding["on"]:
            rounding["fwd"] += 1
            if rounding["fwd"] % 3 != 1:              # the second and third batch norms of a step
                x_ = round_bf16(x_)
        return bn_relu(x_, *a, **kw)

    def spy_back(dy_, *a, **kw):
        grads.append(isinstance(dy_, C.Nchw16))
        if rounding["on"]:
            rounding["bwd"] += 1
            if rounding["bwd"] % 3 != 1:              # backwards: the second and first
                dy_ = round_bf16(dy_)
        return bn_relu_back(dy_, *a, **kw)

    monkeypatch.setattr(be, "bn_relu_forward", spy)
    monkeypatch.setattr(be, "bn_relu_backward", spy_back)
    to_norm = P._to_norm
    measured = {"fwd": "tc16", "pool": "tc16", "filter": "tc16", "data": "tc16"}
    with _measured_as(be, (16, 16, 12, 12, 16, 3, 3, 1, 1), measured):
        models, steps = _hand_over_models(be, hn.ReLU)
        for i in range(2):                    # the eager step, then the captured one
            models[True].load_state_dict(models[False].state_dict())
            before = models[False].state_dict()
            for handed in (False, True):
                monkeypatch.setattr(P, "_to_norm", to_norm if handed else (lambda node, be, grad=False: {}))
                rounding["on"] = not handed
                steps[handed].step(be.asarray(x[16 * i:16 * i + 16]), be.labels(y[16 * i:16 * i + 16]))
            want, got = models[False].state_dict(), models[True].state_dict()
            for k, v in want.items():
                if k.endswith(("running_mean", "running_var", "num_batches_tracked")):
                    continue
                err = rel_err(got[k] - before[k], v - before[k])
                assert err <= RTOL_TC["bf16"], (i, k, err)
    # per step the three batch norms of the float32 model, then of the other (the first convolution's choice is
    # measured: either)
    assert inputs[:3] == inputs[6:9] == [False] * 3 and inputs[4:6] == inputs[10:12] == [True] * 2, inputs
    # backwards, the last batch norm first: its dy comes from the dense layer, the other two from the convolutions
    assert grads == [False] * 3 + [False, True, True] + [False] * 3 + [False, True, True], grads
    assert rounding["fwd"] == rounding["bwd"] == 6


@pytest.mark.parametrize("bias", [True, False])
def test_conv_gelu_hands_its_output_over_in_one_kernel(rng, monkeypatch, bias):
    """At bf16, conv2d_gelu_forward told that its output feeds a convolution whose forward and filter gradient run
    on "tc16" candidates (set as if measured) runs conv.cu's conv_gelu_nhwc16, not the two ops: y an Nhwc16 whose
    bits are to_nhwc16(gelu_forward(z)) of the z it keeps, z the float64 convolution's within float32 rounding; the
    backward's dx, dw, db the float64 reference's within RTOL_TC (the convolution's backward runs at bf16)."""
    from hetnet.backends import reference as ref

    be = get_backend("cuda", "bf16")
    x = rng.standard_normal((5, 3, 12, 11)).astype(np.float32)
    w = (rng.standard_normal((24, 3, 2, 2)) * 0.5).astype(np.float32)
    b = (rng.standard_normal(24) * 0.5).astype(np.float32) if bias else None
    dy = rng.standard_normal((5, 24, 11, 10)).astype(np.float32)

    def two_ops(*a, **kw):
        raise AssertionError("the composed ops ran")

    with monkeypatch.context() as patched:
        patched.setattr(compose, "conv2d_gelu_forward", two_ops)
        with _measured_as(be, (5, 24, 11, 10, 16, 3, 3, 1, 1), {"fwd": "tc16", "filter": "tc16"}):
            y, cache = be.conv2d_gelu_forward(cupy.asarray(x), cupy.asarray(w),
                                              None if b is None else cupy.asarray(b), 1, 0, feeds=((16, 24, 3, 3), 1, 1))
    assert isinstance(y, C.Nhwc16) and y.shape == (5, 24, 11, 10)
    z = cache[1]
    np.testing.assert_array_equal(cupy.asnumpy(y.data), cupy.asnumpy(mm.to_nhwc16(be, be.gelu_forward(z)[0])))
    bd = None if b is None else b.astype(np.float64)
    z_ref, _ = ref.conv2d_forward(x.astype(np.float64), w.astype(np.float64), bd, 1, 0)
    assert rel_err(cupy.asnumpy(z), z_ref) <= 1e-6
    dw, db = cupy.zeros(w.shape, cupy.float32), None if b is None else cupy.zeros(24, cupy.float32)
    dx = be.conv2d_gelu_backward(cupy.asarray(dy), cache, dw, db)
    _, rcache = ref.conv2d_gelu_forward(x.astype(np.float64), w.astype(np.float64), bd, 1, 0)
    rdw, rdb = np.zeros(w.shape), None if b is None else np.zeros(24)
    rdx = ref.conv2d_gelu_backward(dy.astype(np.float64), rcache, rdw, rdb)
    for got, want in ((dx, rdx), (dw, rdw)) + (((db, rdb),) if b is not None else ()):
        assert rel_err(cupy.asnumpy(got), want) <= RTOL_TC["bf16"]



def test_pooled_forward_measures_its_own_tile(rng):
    """Where the forward of a shape runs a "tc16" candidate (set here as if measured) and the pooled forward has not
    been measured, conv2d_maxpool_forward measures the pooled forward's own candidates ("pool") and runs the
    fastest: y within RTOL_TC_ROUNDED of the two ops' (another tile may sum the same bf16 products in another
    order)."""
    be = get_backend("cuda", "bf16")
    shape = (4, 16, 15, 13, 32, 3, 3, 1, 1)
    x, w, b, _ = conv_inputs(rng, shape)
    key = C.Geometry(*shape).key()
    be._tune.pop(("pool", key), None)
    with _measured_as(be, shape, {"fwd": "tc16", "filter": "tc16", "data": "tc16"}):
        try:
            gx, gw, gb = cupy.asarray(x), cupy.asarray(w), cupy.asarray(b)
            y, cache = be.conv2d_maxpool_forward(gx, gw, gb, 1, 1, 2, 2, relu_mask=False)
            assert be._tune.get(("pool", key), "").startswith("tc16")
            y2, _ = compose.conv2d_maxpool_forward(be, gx, gw, gb, 1, 1, 2, 2, relu_mask=False)
            assert rel_err(cupy.asnumpy(y), cupy.asnumpy(y2)) <= RTOL_TC_ROUNDED
        finally:
            be._tune.pop(("pool", key), None)


@pytest.mark.parametrize("bias", [False, True])
def test_conv_maxpool_backward_on_the_channels_last_copies(rng, bias, monkeypatch):
    """Where the convolution's forward, filter and data gradients run "tc16" candidates (set here as if measured),
    conv2d_maxpool_backward turns the pooled gradient straight into their channels-last bf16 input: dx bit for bit
    that of the two ops' backward, dw within DW_RTOL; db (the sum of dy instead of dz) within float32 rounding."""
    be = get_backend("cuda", "bf16")
    shape = (4, 16, 15, 15, 32, 3, 3, 1, 1)
    x, w, b, _ = conv_inputs(rng, shape, bias=bias)
    calls = []
    direct = mm.pool_grad_nhwc                  # (conv.py's launcher of the copy at every precision)
    monkeypatch.setattr(mm, "pool_grad_nhwc", lambda *a: calls.append(1) or direct(*a))
    with _measured_as(be, shape, {"fwd": "tc16", "pool": "tc16", "filter": "tc16s", "data": "tc16"}):
        gx, gw, gb = cupy.asarray(x), cupy.asarray(w), None if b is None else cupy.asarray(b)
        y, cache = be.conv2d_maxpool_forward(gx, gw, gb, 1, 1, 2, 2, relu_mask=False)
        dy = cupy.asarray(rng.standard_normal(y.shape).astype(np.float32))
        out = []
        for backward in (be.conv2d_maxpool_backward, lambda *a, **kw: compose.conv2d_maxpool_backward(be, *a, **kw)):
            dw, db = cupy.zeros_like(gw), None if b is None else cupy.zeros_like(gb)
            dx = backward(dy, cache, dw, db, need_dx=True)
            out.append([cupy.asnumpy(a) for a in (dx, dw)] + ([] if db is None else [cupy.asnumpy(db)]))
        assert calls == [1]                      # the fused backward took the direct path, the two ops did not
        np.testing.assert_array_equal(out[0][0], out[1][0], err_msg="dx")
        assert rel_err(out[0][1], out[1][1]) <= DW_RTOL
        if bias:
            assert rel_err(out[0][2], out[1][2]) <= 1e-5


def test_fp32_filter_gradient_of_a_long_sum(rng):
    """fp32's filter gradient on tensor cores (split copies, the launcher's own K split) over 524,288 pixels, the sum
    of cifar-wide's conv2 at batch 512, against float64: within RTOL_FP32_PARTS, its parts being at most
    mma.FP32_PART terms (on conv2 itself, parts of 8192 terms came to 5.5e-5; the waves alone would take 64 here)."""
    be = get_backend("cuda", "fp32")
    shape = (512, 8, 32, 32, 16, 3, 3, 1, 1)
    dy, x, dw0 = conv_filter_inputs(rng, shape)
    gdw = cupy.asarray(dw0)
    mm.conv16_filter(be, gdw, mm.to_nhwc(be, cupy.asarray(dy)), mm.to_nhwc(be, cupy.asarray(x)), 1, 1,
                     mm.tiles16("filter", "fp32", wgmma_ok(be.device_id))[0].name)
    got, want = cupy.asnumpy(gdw) - dw0, conv_filter_expected(dy, x, dw0, shape) - dw0
    err = float(np.abs(got - want).max() / np.abs(want).max())
    assert err <= RTOL_FP32_PARTS, err


# --- the halo tiles that do not ship (benchmarks/kernels/conv16_halo.py) ---------------------------------------------

@pytest.fixture(scope="module")
def halo():
    """benchmarks/kernels/conv16_halo.py, loaded once (its module is compiled once per device)."""
    return sandbox("conv16_halo")


@pytest.mark.parametrize(("precision", "shape"), HALO_CASES, ids=str)
def test_conv16_halo_on_the_gpu(be, halo, rng, precision, shape):
    """The sandbox's halo tiles pass halo_cases.check_halo on an sm_90a GPU (their first run there: wgmma's operands
    without swizzle, K-major and MN-major, as the emulator reads them), within RTOL_TC_ROUNDED of float64 of the
    inputs as the precision's copies round them."""
    if not wgmma_ok(be.device_id):
        pytest.skip("the halo tiles are wgmma's (sm_90a)")
    ran = check_halo(halo, rng, shape, lambda call: halo.launch(be, call), RTOL_TC_ROUNDED, cupy, (1, be.sms),
                     precision)
    assert ran >= 2, shape
