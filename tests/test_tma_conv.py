"""The bf16 convolutions fed by the Tensor Memory Accelerator (mma.cu HN_CONV16T, mma_tiles.TILES16T). The CPU
emulator has no TMA, so the checks are in two steps. On the CPU: the producer's box coordinates (box_coords, the
kernels' arithmetic) and the im2col box's definition (gather, from the PTX ISA's im2col mode) together make the
convolution. On an sm_90a GPU: the hardware's im2col box (hn_tma_probe) against gather on boxes that cross rows and
images, run past the last image, at stride 2 and 5 x 5; then every TMA tile's forward, data gradient and filter
gradient against float64 of the bf16 inputs within RTOL_TC_ROUNDED, and in a captured graph."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
from conftest import RTOL_TC_ROUNDED, rel_err
from mma_cases import bf16_values, conv_expected, conv_inputs, nhwc_copy
from tma_cases import POOL_SHAPES, SHAPES, box_coords, gather, run_ops

from hetnet.backends.cuda import mma as mm
from hetnet.backends.cuda.mma_tiles import TILES16T, tma_fits, tma_pool_fits


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_boxes_make_the_convolution(rng, shape):
    """The sum over K tiles of gather(box_coords(...)) times the weights' K tile, for blocks of 64 pixels, is the
    convolution in float64 (the inputs bf16 values)."""
    n, c, h, w, o, r, s, stride, pad = shape
    x, wt, _, _ = conv_inputs(rng, shape, bias=False)
    x16, w16 = nhwc_copy(x, "bf16"), nhwc_copy(wt, "bf16")
    p, q = (h + 2 * pad - r) // stride + 1, (w + 2 * pad - s) // stride + 1
    geometry = (c, h, w, r, s, p, q, o, stride, pad)
    wk = bf16_values(w16).reshape(o, r * s * c).astype(np.float64)
    got = np.zeros((o, n * p * q))
    for n0 in range(0, n * p * q, 64):
        cols = min(64, n * p * q - n0)
        for k0 in range(0, r * s * c, 64):
            coords, tap = box_coords(n0, k0, geometry)
            box = bf16_values(gather(x16, r, s, stride, pad, 64, coords, tap)).astype(np.float64)
            got[:, n0:n0 + cols] += wk[:, k0:k0 + 64] @ box[:cols].T
    want = conv_expected(x, wt, None, stride, pad, 0, "bf16")
    np.testing.assert_allclose(got.reshape(o, n, p, q).transpose(1, 0, 2, 3), want, rtol=1e-12, atol=1e-9)


def test_gather_reads_zeros_outside(rng):
    """The model's zeros: a box from the first pixel at the top-left tap reads the padding, and one that runs past the
    last image reads zeros there."""
    x16 = nhwc_copy(rng.standard_normal((1, 64, 4, 4)).astype(np.float32), "bf16")
    box = gather(x16, 3, 3, 1, 1, 32, (0, -1, -1, 0), (0, 0))
    assert not box[0].any() and not box[16:].any() and box[5].any()


def test_tma_tiles_are_planned_only_where_they_fit():
    """A TMA tile's plan needs the gathered channels in whole boxes of 64, and its pooled forward an output that
    tma_pool_fits."""
    assert tma_fits("fwd", 128) and tma_fits("data", 64) and not tma_fits("fwd", 96) and tma_fits("pool", 64)
    wide, narrow = TILES16T["pool"][0], TILES16T["pool"][1]                # warpgroups of 256 and 128 columns
    assert tma_pool_fits(wide, 32, 32) and tma_pool_fits(narrow, 8, 16) and tma_pool_fits(narrow, 2, 8)
    assert not tma_pool_fits(narrow, 32, 64) and not tma_pool_fits(wide, 7, 8) and not tma_pool_fits(wide, 6, 6)
    x16, w16 = np.zeros((2, 5, 5, 96), np.uint16), np.zeros((64, 3, 3, 96), np.uint16)
    with pytest.raises(ValueError, match="TMA tile"):
        mm.plan_conv16(np.zeros((2, 64, 5, 5), np.float32), x16, w16, None, 1, 1, 0, TILES16T["fwd"][0].name)
    x16, w16 = np.zeros((2, 6, 6, 64), np.uint16), np.zeros((64, 3, 3, 64), np.uint16)
    assert mm.plan_conv16(np.zeros((2, 64, 6, 6), np.float32), x16, w16, None, 1, 1, 0,
                          TILES16T["fwd"][0].name).tile is TILES16T["fwd"][0]
    buf = np.zeros(2 * 64 * 9 * 2, np.float32)
    with pytest.raises(ValueError, match="TMA tile"):
        mm.plan_conv16_pool(buf, x16, w16, None, 1, 1, 0, TILES16T["fwd"][0])


def test_pooled_forward_takes_the_forwards_fastest_pooled_tile():
    """Inside a capture the pooled forward is not measured: it runs the forward's choice, or where that is a TMA tile
    (no pooled kernel) the forward's fastest measured tile that has one."""
    from hetnet.backends.cuda import conv as C
    cands = {"tc16": None, "tc16w128x256s4": None, "tc16w128x128s4": None}
    assert C._pool_as_forward("tc16w128x128s4", cands, {}) == "tc16w128x128s4"
    times = {"tc16w128x256s4t": 0.1, "tc16": 0.5, "tc16w128x256s4": 0.3, "tc16w128x128s4": 0.2}
    assert C._pool_as_forward("tc16w128x256s4t", cands, times) == "tc16w128x128s4"


def _gpu():
    cupy = pytest.importorskip("cupy", reason="CuPy not installed")
    from hetnet.backends.cuda.kernels import wgmma_ok
    from hetnet.device import get_backend
    try:
        be = get_backend("cuda", "bf16")
    except Exception as e:      # noqa: BLE001 (no GPU, no driver: the same skip)
        pytest.skip(f"no CUDA device: {e}")
    if not wgmma_ok(be.device_id):
        pytest.skip("TMA and wgmma need sm_90a")
    return cupy, be


def probe(cupy, be, x16, r: int, s: int, stride: int, pad: int, rows: int, coords: tuple, tap: tuple):
    """The hardware's im2col box (mma.cu hn_tma_probe) of x16 (on the device), as [rows][64] bf16 bits with the
    128-byte swizzle undone (chunk j of row i lies at chunk j ^ (i % 8))."""
    out = cupy.zeros((rows, 64), np.uint16)
    smem = 16 + 1024 + rows * 128
    kern = mm._raise_smem(be, "hn_tma_probe", smem)
    mm.launch_raw(be, kern, (1,), (128,), smem,
                  [mm.encode_map(mm.im2col_spec(x16, r, s, stride, pad, rows)), ctypes.c_void_p(out.data.ptr),
                   *(ctypes.c_int32(v) for v in (rows, *coords, *tap))])
    tile = out.get().reshape(rows, 8, 8)
    chunks = np.arange(8)[None, :] ^ (np.arange(rows) % 8)[:, None]
    return np.take_along_axis(tile, chunks[:, :, None], axis=1).reshape(rows, 64)


# (n, C, H, W, R, S, stride, pad), rows, coords, tap: rows 0 .. 63 of image 0; a box across images from mid-row and past
# the last one; past the last image; a 5 x 5 tap at pad 2; stride 2; the second channel block
PROBES = [((2, 64, 6, 7, 3, 3, 1, 1), 64, (0, -1, -1, 0), (0, 0)),
          ((2, 64, 6, 7, 3, 3, 1, 1), 128, (0, 2, 3, 0), (2, 1)),
          ((2, 64, 6, 7, 3, 3, 1, 1), 64, (0, 0, 4, 1), (1, 2)),
          ((1, 64, 9, 8, 5, 5, 1, 2), 256, (0, -2, -2, 0), (4, 3)),
          ((3, 64, 11, 10, 3, 3, 2, 1), 64, (0, 7, 1, 1), (2, 0)),
          ((2, 128, 5, 5, 3, 3, 1, 1), 32, (64, -1, 0, 1), (1, 1))]


@pytest.mark.parametrize(("geo", "rows", "coords", "tap"), PROBES, ids=str)
def test_hardware_im2col_box_is_the_model(rng, geo, rows, coords, tap):
    """The TMA unit's im2col box equals gather's, bit for bit."""
    cupy, be = _gpu()
    n, c, h, w, r, s, stride, pad = geo
    x16 = nhwc_copy(rng.standard_normal((n, c, h, w)).astype(np.float32), "bf16")
    got = probe(cupy, be, cupy.asarray(x16), r, s, stride, pad, rows, coords, tap)
    np.testing.assert_array_equal(got, gather(x16, r, s, stride, pad, rows, coords, tap))


@pytest.mark.parametrize("shape", SHAPES + POOL_SHAPES, ids=str)
def test_tma_tiles_on_the_gpu(rng, shape):
    """Every TMA tile of every op, launched by mma.launch_conv, against float64 (the pooled forward where it fits:
    on POOL_SHAPES, against max pooling of the same tile's forward)."""
    cupy, be = _gpu()
    ran = run_ops(cupy, cupy.asnumpy, rng, shape, TILES16T, lambda call: mm.launch_conv(be, call), be.sms)
    assert ran >= (13 if shape in POOL_SHAPES else 10), ran


def test_tma_persistent_tiles_on_a_grid(rng):
    """The persistent tiles with a grid of several blocks, some taking several tiles: a shape of 1,152 output pixels
    planned for 3 SMs."""
    cupy, be = _gpu()
    persistent = {op: tuple(t for t in ts if t.persistent) for op, ts in TILES16T.items()}
    grids = []

    def launch(call):
        grids.append(call.grid)
        mm.launch_conv(be, call)

    assert run_ops(cupy, cupy.asnumpy, rng, (18, 64, 8, 8, 192, 3, 3, 1, 1), persistent, launch, be.sms,
                   fwd_sms=3) >= 7
    assert (3, 1, 1) in grids


def test_tma_tiles_in_a_captured_graph(rng):
    """The maps are kernel parameters: a launch captured in a CUDA graph and replayed (on inputs rewritten in place)
    gives the eager launch's result."""
    cupy, be = _gpu()
    shape = SHAPES[0]
    x, wt, b, y = conv_inputs(rng, shape)
    x16, w16 = cupy.asarray(nhwc_copy(x, "bf16")), cupy.asarray(nhwc_copy(wt, "bf16"))
    yd, bd = cupy.asarray(y), cupy.asarray(b)
    call = mm.plan_conv16(yd, x16, w16, bd, 1, 1, 1, TILES16T["fwd"][0])
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        mm.launch_conv(be, call)
        graph = stream.end_capture()
    x2 = rng.standard_normal(x.shape).astype(np.float32)
    x16[...] = cupy.asarray(nhwc_copy(x2, "bf16"))
    yd.fill(np.nan)
    graph.launch(stream)
    stream.synchronize()
    err = rel_err(cupy.asnumpy(yd), conv_expected(x2, wt, b, 1, 1, 1, "bf16"))
    assert err <= RTOL_TC_ROUNDED, err
