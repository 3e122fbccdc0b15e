"""norm.cu's batch-norm kernels run on the CPU, the whole file compiled as C++ against tests/cuda_emu (each CUDA thread
a fiber, the blocks of the (C, G) grid one after another, so the last block of a channel finishes it as on a GPU):
the statistics (bn_stats, bn_sums), the apply (+ ReLU, GELU) and the backward's reduction and dx, each against NumPy
in float64 of the same expressions, in their 32- and 64-bit index versions; and their "_x16" versions, which read x
stored in bf16 (a convolution's output handed to the batch norm, conv.Nchw16), bit for bit the float32 versions given
the values those bits stand for. And the cuda backend's batch-norm ops themselves (norm.py's NormOps) on a stand-in
backend whose arrays are NumPy's and whose kernels are these emulated ones, launched by name with the launchers'
grids and arguments (each argument checked against the kernel's parameter): float32 and bf16 inputs and gradients,
the channels-last hand-overs, against the reference backend. Needs g++ (skipped without); no GPU. On a GPU the same
kernels run in tests/test_ops.py (every batch-norm op) and tests/test_mma.py (the bf16 hand-overs)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from emu_backend import EmulatedBackend, route_kernels, whole_module_text
from emu_build import EmulatedKernel, build_emulated
from mma_cases import bf16_bits, bf16_values

from hetnet.backends import reference as ref
from hetnet.backends.cuda.kernels import NULL
from hetnet.backends.cuda import norm as norm_ops
from hetnet.backends.cuda.conv import Nchw16, Nhwc16

f32 = np.float32

@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    text = whole_module_text("norm")
    return build_emulated(tmp_path_factory.mktemp("emu_norm"), "norm_emu", text, launchers_of=text)


def _launch(emu, name: str, grid, *args) -> None:
    """norm.cu's kernel `name` on the emulator (256 threads a block), as the backend launches it: arrays, None for
    the null pointer, Python ints and floats for its int and float parameters."""
    types = emu.entries[name]
    args = [NULL if a is None else a if isinstance(a, np.ndarray) else np.int32(a) if t == "int" else np.float32(a)
            for a, t in zip(args, types)]
    EmulatedKernel(emu, name)(grid, (256,), args)


def _version(name: str, x16, dy16, wide) -> str:
    """The name of a batch-norm kernel's version for x (and dy) stored in bf16 or float32, 64- or 32-bit indices."""
    return name + ("_x16" if x16 else "") + ("_dy16" if dy16 else "") + ("" if wide else "_i32")


def _inputs(rng, shape):
    """(x's bf16 bits, their values, dy's bf16 bits, their values, gamma, beta)."""
    n, c = shape[:2]
    bits = bf16_bits((rng.standard_normal(shape) * 3 + 1).astype(f32))
    dbits = bf16_bits(rng.standard_normal(shape).astype(f32))
    gamma, beta = rng.uniform(0.5, 1.5, c).astype(f32), rng.standard_normal(c).astype(f32)
    return bits, bf16_values(bits), dbits, bf16_values(dbits), gamma, beta


def _shifted(a):
    """A copy of a one element past a 16-byte boundary (so that no kernel may read it in 16-byte vectors)."""
    out = np.empty(a.size + 16, a.dtype)
    skip = (-out.ctypes.data % 16) // a.itemsize + 1
    out = out[skip:skip + a.size].reshape(a.shape)
    out[...] = a
    assert out.ctypes.data % 16
    return out


def _kernels(emu, x16, wide, xs, dy, gamma, beta, act, train, G, dy16=0, shift_out=False):
    """Every kernel on x (float32 values, or their bf16 bits with x16) and dy (the same with dy16): (stats, running
    stats, sums, y, red, dgamma, dbeta, dx, dx channels-last in bf16, dx in bf16) as NumPy arrays. shift_out: y and
    both NCHW dx written one element past a 16-byte boundary (_shifted)."""
    out = _shifted if shift_out else (lambda a: a)
    n, c = xs.shape[:2]
    hw = xs.size // (n * c)
    acc, cnt = np.zeros(2 * c), np.zeros(c, np.uint32)
    stats, rm, rv = np.full(2 * c, np.nan, f32), np.zeros(c, f32), np.ones(c, f32)
    _launch(emu, _version("bn_stats", x16, 0, wide), (c, G), xs, stats, rm, rv, acc, cnt, n, c, hw, 0.1)
    assert not acc.any() and not cnt.any(), "the last block resets acc and count"
    sums = np.full(2 * c + 1, np.nan)
    _launch(emu, _version("bn_sums", x16, 0, wide), (c, G), xs, sums, acc, cnt, n, c, hw)
    mean, var = (stats[:c], stats[c:]) if train else (rm, rv)
    y = out(np.full(xs.shape, np.nan, f32))
    _launch(emu, _version("bn_apply", x16, 0, wide), (c, G), xs, y, mean, var, gamma, beta, n, c, hw, 1e-5, act)
    red, dg, db = np.full(2 * c, np.nan, f32), np.ones(c, f32), np.ones(c, f32)
    _launch(emu, _version("bn_bwd_reduce", x16, dy16, wide), (c, G), dy, xs, mean, var, gamma, beta, red, dg, db, acc,
            cnt, n, c, hw, 1e-5, act)
    dx = out(np.full(xs.shape, np.nan, f32))
    _launch(emu, _version("bn_bwd_dx", x16, dy16, wide), (c, G), dy, xs, mean, var, gamma, beta,
            red if train else None, dx, n, c, hw, 1e-5, act)
    dx16 = np.full((n, *xs.shape[2:], c + c % 2), 0xDEAD, np.uint16)
    if c % 2 == 0:                                          # (its bf16 pairs need C even)
        _launch(emu, _version("bn_bwd_dx_nhwc16", x16, dy16, True), norm_ops._nhwc16_grid(n * hw, c), dy, xs, mean,
                var, gamma, beta, red if train else None, dx16, n, c, hw, 1e-5, act)
    dxb = out(np.full(xs.shape, 0xDEAD, np.uint16))
    _launch(emu, _version("bn_bwd_dx16", x16, dy16, wide), (c, G), dy, xs, mean, var, gamma, beta,
            red if train else None, dxb, n, c, hw, 1e-5, act)
    return stats, rm, rv, sums, y, red, dg, db, dx, dx16, dxb


# Planes of HW a multiple of 8 are walked in vectors of 8 elements (common.cuh's hn_bn_walk: (4, 2, 16, 16), (5, 3,
# 4, 8), (4, 2, 48, 48), whose threads take two or three vectors on grids of 2 and 3 blocks, so that the bf16
# statistics' takes of two vectors are whole and cut short), the others element by element ((3, 2, 45, 61): several
# takes of four a thread).
SHAPES = [(3, 5, 7, 9), (2, 3, 1, 1), (4, 2, 16, 16), (1, 6, 5, 3), (3, 4, 6, 2), (5, 3, 4, 8), (4, 2, 48, 48),
          (3, 2, 45, 61)]


@pytest.mark.parametrize("act", [0, 1, 2], ids=["none", "relu", "gelu"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_batch_norm_kernels_emulated(emu, rng, shape, act):
    """Training: statistics and running statistics, the sums of a synchronised batch norm, y = act(z) and the
    backward (g = dE/dz after act's derivative; red = (sum g, sum g xhat), dgamma and dbeta added into, dx) against
    NumPy in float64 of the float32 kernels' expressions, on grids of 2 blocks and of 3 (or 1: another order of the
    sums); the 64-bit index versions bit for bit the 32-bit ones on the same grid."""
    _, x, _, dy, gamma, beta = _inputs(rng, shape)
    n, c = shape[:2]
    m = x.size // c
    got = _kernels(emu, 0, 0, x, dy, gamma, beta, act, True, 2)
    wide = _kernels(emu, 0, 1, x, dy, gamma, beta, act, True, 2)
    for i, (a, b) in enumerate(zip(got, wide)):
        np.testing.assert_array_equal(a, b, err_msg=f"output {i}")
    other_grid = _kernels(emu, 0, 1, x, dy, gamma, beta, act, True, 3 if m > 256 else 1)
    for run in (got, other_grid):
        _check_batch_norm_kernels(run, x, dy, gamma, beta, act, m)


def _check_backward(red, dg, db, dx, g, xhat, gamma, inv, m, tol):
    """A batch-norm backward's kernels against NumPy in float64, given g = dE/dz and xhat over m values a channel:
    red = (sum g, sum g xhat), dgamma and dbeta (1 before) added into, and dx; each within tol (rtol and atol)."""
    c = red.size // 2
    bc = (1, c, 1, 1)
    want_red = np.concatenate([g.sum((0, 2, 3)), (g * xhat).sum((0, 2, 3))])
    np.testing.assert_allclose(red, want_red, rtol=tol, atol=tol)
    np.testing.assert_allclose(dg, 1 + want_red[c:], rtol=tol, atol=tol)
    np.testing.assert_allclose(db, 1 + want_red[:c], rtol=tol, atol=tol)
    want_dx = (gamma.reshape(bc) * inv.reshape(bc)) * (g - (want_red[:c] / m).reshape(bc)
                                                       - xhat * (want_red[c:] / m).reshape(bc))
    np.testing.assert_allclose(dx, want_dx, rtol=tol, atol=tol)


def _check_batch_norm_kernels(got, x, dy, gamma, beta, act, m):
    """_kernels' training outputs against NumPy in float64 (test_batch_norm_kernels_emulated)."""
    c = x.shape[1]
    stats, rm, rv, sums, y, red, dg, db, dx, dx16, dxb = got
    xd = x.astype(np.float64).transpose(1, 0, 2, 3).reshape(c, -1)
    mean, var = xd.mean(1), xd.var(1)
    np.testing.assert_allclose(stats[:c], mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(stats[c:], var, rtol=1e-5)
    np.testing.assert_allclose(rm, 0.1 * mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(rv, 0.9 + 0.1 * var * m / max(m - 1, 1), rtol=1e-5)
    np.testing.assert_allclose(sums, [*xd.sum(1), *(xd * xd).sum(1), m], rtol=1e-12)
    bc = (1, c, 1, 1)
    inv = 1 / np.sqrt(stats[c:].astype(np.float64) + 1e-5)
    xhat = (x - stats[:c].reshape(bc)) * inv.reshape(bc)
    z = xhat * gamma.reshape(bc) + beta.reshape(bc)
    phi = np.vectorize(lambda v: 0.5 * math.erfc(-v / math.sqrt(2)))(z)
    act_z = [z, np.maximum(z, 0), z * phi][act]
    np.testing.assert_allclose(y, act_z, rtol=1e-5, atol=1e-5)
    dact = [np.ones_like(z), (z > 0) * 1.0, phi + z * np.exp(-z * z / 2) / math.sqrt(2 * math.pi)][act]
    _check_backward(red, dg, db, dx, dy * dact, xhat, gamma, inv, m, 1e-4)
    if c % 2 == 0:
        np.testing.assert_array_equal(dx16, bf16_bits(dx.transpose(0, 2, 3, 1)), "dx channels-last: bf16 of dx")
    np.testing.assert_array_equal(dxb, bf16_bits(dx), "dx in bf16: bf16 of dx")


@pytest.mark.parametrize("shifted", ["x", "dy", "outputs"])
def test_batch_norm_kernels_off_16_byte_boundaries_emulated(emu, rng, shifted):
    """A plane that could be walked in vectors, with one tensor not 16-byte aligned: the kernels walk it element by
    element (the emulator fails a misaligned 16-byte access) and give the aligned run's outputs, bit for bit where
    the order of the sums does not change them (y; dx given the same statistics)."""
    bits, x, dbits, dy, gamma, beta = _inputs(rng, (4, 2, 16, 16))
    for x16 in (0, 1):
        xs, dys = (bits if x16 else x), (dbits if x16 else dy)
        want = _kernels(emu, x16, 0, xs, dys, gamma, beta, 2, False, 2, x16)
        got = _kernels(emu, x16, 0, _shifted(xs) if shifted == "x" else xs, _shifted(dys) if shifted == "dy" else dys,
                       gamma, beta, 2, False, 2, x16, shift_out=shifted == "outputs")
        for i in (4, 8, 9, 10):                                 # y and the dx (eval: no batch sums)
            np.testing.assert_array_equal(got[i], want[i], err_msg=f"x16 {x16}: output {i}")
        for i in (0, 1, 2, 3, 5, 6, 7):                         # the sums, in another order
            np.testing.assert_allclose(got[i], want[i], rtol=1e-6, atol=1e-6, err_msg=f"x16 {x16}: output {i}")


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("act", [0, 1, 2], ids=["none", "relu", "gelu"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_batch_norm_kernels_on_bf16_inputs_emulated(emu, rng, shape, act, train):
    """The "_x16", "_dy16" and "_x16_dy16" kernels given x's and / or dy's bf16 bits: every output bit for bit the
    float32 kernels' given the values those bits stand for, in both index versions."""
    bits, x, dbits, dy, gamma, beta = _inputs(rng, shape)
    for wide in (0, 1):
        want = _kernels(emu, 0, wide, x, dy, gamma, beta, act, train, 2)
        for x16, dy16 in ((1, 0), (0, 1), (1, 1)):
            got = _kernels(emu, x16, wide, bits if x16 else x, dbits if dy16 else dy, gamma, beta, act, train, 2,
                           dy16)
            for i, (a, b) in enumerate(zip(got, want)):
                np.testing.assert_array_equal(a, b, err_msg=f"wide {wide}, x16 {x16}, dy16 {dy16}: output {i}")


POOL_CASES = [  # (N, C, H, W, kernel, stride)
    (2, 3, 8, 8, 2, 2),         # windows tile the plane: a thread a row of a 2 x 2 block
    (3, 2, 4, 4, 4, 4),         # one window a plane (cifar-wide's last block: MaxPool 4 at 4 x 4): a float4 a row
    (1, 2, 9, 12, 4, 4),        # a margin row past the last window, float4 rows
    (2, 1, 8, 10, 4, 4),        # a margin column of 2: rows of 4 elements and of 2, no float4
    (1, 2, 9, 7, 2, 2),         # a row and a column past the last window: blocks of the margin, g 0
    (2, 2, 9, 8, 3, 2),         # overlapping windows: an element the maximum of two adds both dy
    (1, 2, 6, 7, 3, 1),
    (2, 2, 8, 10, 2, 3),        # gaps between windows: a thread an element
    (1, 2, 2, 5, 3, 3),         # no window (H < k): dz from the sums of nothing
]


@pytest.mark.parametrize("case", POOL_CASES, ids=str)
def test_bn_relu_maxpool_kernels_emulated(emu, rng, case):
    """The fused BatchNorm -> ReLU -> MaxPool's kernels given the statistics: the forward's pooled output and argmax,
    the backward's sums (over windows) and dz (a thread a row of a window's block where the windows do not overlap,
    else an element), against NumPy in float64 of the same expressions; the 64-bit index versions bit for bit the
    32-bit ones; dz written over z, and dz from z and into dz 4 bytes past 16-byte alignment (no float4), equal to
    dz beside it."""
    n, c, h, w, k, st = case
    p, q = max(0, (h - k) // st + 1), max(0, (w - k) // st + 1)
    z = (rng.standard_normal((n, c, h, w)) * 2).astype(f32)
    dy = rng.standard_normal((n, c, p, q)).astype(f32)
    mean, var = rng.standard_normal(c).astype(f32), rng.uniform(0.5, 2.0, c).astype(f32)
    gamma, beta = rng.uniform(0.5, 1.5, c).astype(f32), (rng.standard_normal(c) * 0.5).astype(f32)
    dims = (n, c, h, w, p, q, k, st, 1e-5)
    steps = n * c * h * -(-w // k) if k == st else z.size
    grid = (max(1, -(-steps // 512)),)
    runs = []
    for wide in (0, 1):
        suffix = "" if wide else "_i32"
        y, arg = np.full((n, c, p, q), np.nan, f32), np.full((n, c, p, q), 255, np.uint8)
        _launch(emu, "bn_relu_maxpool_fwd" + suffix, (2,), z, y, arg, mean, var, gamma, beta, *dims)
        red, dg, db = np.full(2 * c, np.nan, f32), np.ones(c, f32), np.ones(c, f32)
        acc, cnt = np.zeros(2 * c), np.zeros(c, np.uint32)
        _launch(emu, "bn_relu_maxpool_bwd_reduce" + suffix, (c, 2), dy, arg, z, mean, var, gamma, beta, red, dg, db,
                acc, cnt, *dims)
        assert not acc.any() and not cnt.any(), "the last block resets acc and count"
        dz = np.full(z.shape, np.nan, f32)
        _launch(emu, "bn_relu_maxpool_bwd_dx" + suffix, grid, dy, arg, z, mean, var, gamma, beta, red, dz, *dims)
        inplace = z.copy()
        _launch(emu, "bn_relu_maxpool_bwd_dx" + suffix, grid, dy, arg, inplace, mean, var, gamma, beta, red, inplace,
                *dims)
        np.testing.assert_array_equal(inplace, dz, err_msg="dz over z")
        z1, dz1 = (np.empty(z.size + 4, f32)[1:z.size + 1].reshape(z.shape) for _ in range(2))
        z1[...] = z
        assert z1.ctypes.data % 16 == dz1.ctypes.data % 16 == 4
        _launch(emu, "bn_relu_maxpool_bwd_dx" + suffix, grid, dy, arg, z1, mean, var, gamma, beta, red, dz1, *dims)
        np.testing.assert_array_equal(dz1, dz, err_msg="dz at 4 bytes past 16-byte alignment")
        runs.append((y, arg, red, dg, db, dz))
    for i, (a, b) in enumerate(zip(*runs)):
        np.testing.assert_array_equal(a, b, err_msg=f"64-bit index version: output {i}")
    y, arg, red, dg, db, dz = runs[0]
    bc = (1, c, 1, 1)
    inv = 1 / np.sqrt(var.astype(np.float64) + 1e-5)
    xhat = (z - mean.reshape(bc)) * inv.reshape(bc)
    a = np.maximum(xhat * gamma.reshape(bc) + beta.reshape(bc), 0)
    g = np.zeros(z.shape)
    for i in range(p):
        for j in range(q):
            win = a[:, :, i * st:i * st + k, j * st:j * st + k].reshape(n, c, k * k)
            first = win.argmax(-1)                               # the first maximum, row-major
            np.testing.assert_array_equal(arg[:, :, i, j], first, err_msg=f"argmax of window ({i}, {j})")
            np.testing.assert_allclose(y[:, :, i, j], win.max(-1), rtol=1e-6, atol=1e-6)
            nn, cc = np.indices((n, c))
            hit = np.take_along_axis(win, first[..., None], -1)[..., 0] > 0
            np.add.at(g, (nn, cc, i * st + first // k, j * st + first % k), dy[:, :, i, j] * hit)
    _check_backward(red, dg, db, dz, g, xhat, gamma, inv, n * h * w, 1e-5)
    assert np.count_nonzero(g) > 0 or p == 0, "some window's maximum took its gradient"


def test_batch_norm_grid_is_one_wave():
    """norm.py's per-channel grid puts at most BN_BLOCKS blocks an SM (norm.cu's launch bound), so that no block of
    equal share waits for a second wave (on 132 SMs ceil(8 x 132 / 64) = 17 blocks a channel was 1088 for 1056
    places); a channel always gets a block, and small planes no more blocks than their values need."""
    class Card:
        sms = 132
    for n, c, hw in ((512, 64, 1024), (512, 128, 256), (512, 256, 64), (512, 256, 16), (2, 3, 5), (64, 2048, 49)):
        grid = norm_ops.NormOps._bn_grid(Card(), n, c, hw)
        assert grid[0] == c and grid[1] >= 1 and grid[1] <= max(1, math.ceil(n * hw / 1024))
        assert grid[1] == 1 or c * grid[1] <= norm_ops.BN_BLOCKS * Card.sms, (n, c, hw, grid)


# --- norm.py's ops on the emulated kernels --------------------------------------------------------------------------

@pytest.fixture
def ops(emu, monkeypatch):
    """The cuda backend at bf16 on NumPy arrays (tests/emu_backend.py), its batch-norm kernels this module's
    emulated norm.cu, the channels-last hand-overs wherever the caller asks for them (on a GPU: where measured)."""
    route_kernels(monkeypatch, {"norm": emu})
    monkeypatch.setattr(norm_ops, "takes_nhwc16", lambda be, shape, feeds: feeds is not None)
    monkeypatch.setattr(norm_ops, "takes_dy16", lambda be, shape, grad_feeds: grad_feeds is not None)
    return EmulatedBackend("bf16", sms=2)


def _channels_last(a):
    return a.data if isinstance(a, Nhwc16) else a


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("op", ["batchnorm", "bn_relu", "bn_gelu"])
def test_batch_norm_ops_on_bf16_inputs_emulated(ops, rng, op, train):
    """norm.py's forward and backward given x and dy as float32, or stored in bf16 (conv.Nchw16: the hand-overs from
    the convolutions around the batch norm), with and without the channels-last hand-overs to the next convolution
    (feeds) and to the one before (grad_feeds): every output, running statistic and parameter gradient bit for bit
    the float32 run's on the same values; that run within float32's rounding of the reference backend. A bf16 x is
    never written over (inplace) and gives no ReLU mask."""
    shape = (3, 4, 6, 5)
    bits, x, dbits, dy, gamma, beta = _inputs(rng, shape)
    c = shape[1]
    forward, backward = getattr(ops, op + "_forward"), getattr(ops, op + "_backward")
    runs = {}
    for x16, dy16, handed in ((0, 0, False), (1, 0, False), (0, 1, False), (1, 1, False), (0, 0, True), (1, 1, True)):
        xin = Nchw16(bits.copy()) if x16 else x.copy()
        rm, rv = np.zeros(c, f32), np.ones(c, f32)
        feeds = {"feeds": ((8, c, 3, 3), 1, 1)} if handed else {}
        y, cache = forward(xin, gamma, beta, rm, rv, 0.1, 1e-5, train, **feeds)
        dg, db = np.zeros(c, f32), np.zeros(c, f32)
        grad_feeds = {"grad_feeds": ((c, 2, 3, 3), 1, 1, (3, 2, 6, 5), None)} if handed else {}
        inplace = {} if op == "batchnorm" else {"inplace": True}
        dx = backward(Nchw16(dbits.copy()) if dy16 else dy.copy(), cache, dg, db, need_dx=True, **grad_feeds,
                      **inplace)
        assert isinstance(y, Nhwc16) == handed and isinstance(dx, Nhwc16) == handed
        if x16:
            np.testing.assert_array_equal(xin.data, bits)                    # not written over
            with pytest.raises(ValueError, match="relu_mask"):
                backward(dy, cache, None, None, need_dx=True, relu_mask=True)
        runs[(x16, dy16, handed)] = [_channels_last(y), rm, rv, _channels_last(dx), dg, db]
    for key, got in runs.items():
        want = runs[(0, 0, key[2])]
        for i, (a, b) in enumerate(zip(got, want)):
            np.testing.assert_array_equal(a, b, err_msg=f"{key}: output {i}")
    for i in (0, 3):                                                        # the hand-overs: bf16 of the float32
        np.testing.assert_array_equal(runs[(0, 0, True)][i], bf16_bits(runs[(0, 0, False)][i].transpose(0, 2, 3, 1)))
    y, rm, rv, dx, dg, db = runs[(0, 0, False)]
    act = {"batchnorm": None, "bn_relu": "relu", "bn_gelu": "gelu"}[op]
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    rm64, rv64 = np.zeros(c), np.ones(c)
    z, zc = ref.batchnorm_forward(x64, gamma.astype(np.float64), beta.astype(np.float64), rm64, rv64, 0.1, 1e-5,
                                  train)
    if act == "relu":
        g = dy64 * (z > 0)
    elif act == "gelu":
        _, gc = ref.gelu_forward(z)
        g = ref.gelu_backward(dy64, gc)
    else:
        g = dy64
    want_y = {None: z, "relu": np.maximum(z, 0), "gelu": ref.gelu_forward(z)[0]}[act]
    dg64, db64 = np.zeros(c), np.zeros(c)
    want_dx = ref.batchnorm_backward(g, zc, dg64, db64)
    for name, a, b in (("y", y, want_y), ("running mean", rm, rm64), ("running var", rv, rv64), ("dx", dx, want_dx),
                       ("dgamma", dg, dg64), ("dbeta", db, db64)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("case", [(2, 3, 8, 8, 2, 2), (3, 2, 4, 4, 4, 4), (1, 2, 9, 7, 2, 2), (2, 2, 9, 8, 3, 2)],
                         ids=str)
def test_bn_relu_maxpool_op_emulated(ops, rng, case):
    """norm.py's fused BatchNorm -> ReLU -> MaxPool (training) on the emulated kernels, as the launchers size their
    grids (the backward's dz a k x k block a thread where the windows do not overlap): y, dx (also written over x,
    inplace), dgamma and dbeta within float32's rounding of the reference backend's."""
    n, c, h, w, k, st = case
    x = (rng.standard_normal((n, c, h, w)) * 2 + 0.5).astype(f32)
    gamma, beta = rng.uniform(0.5, 1.5, c).astype(f32), (rng.standard_normal(c) * 0.5).astype(f32)
    x64 = x.astype(np.float64)
    want_y, cache = ref.bn_relu_maxpool_forward(x64, gamma.astype(np.float64), beta.astype(np.float64), np.zeros(c),
                                                np.ones(c), 0.1, 1e-5, True, k, st)
    dy = rng.standard_normal(want_y.shape).astype(f32)
    dg64, db64 = np.zeros(c), np.zeros(c)
    want_dx = ref.bn_relu_maxpool_backward(dy.astype(np.float64), cache, dg64, db64)
    for inplace in (False, True):
        xin = x.copy()
        y, cache = ops.bn_relu_maxpool_forward(xin, gamma, beta, np.zeros(c, f32), np.ones(c, f32), 0.1, 1e-5, True, k,
                                               st)
        dg, db = np.zeros(c, f32), np.zeros(c, f32)
        dx = ops.bn_relu_maxpool_backward(dy, cache, dg, db, inplace=inplace)
        assert (dx is xin) == inplace
        for name, a, b in (("y", y, want_y), ("dx", dx, want_dx), ("dgamma", dg, dg64), ("dbeta", db, db64)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=f"inplace {inplace}: {name}")
