"""The fp32 Winograd convolutions (backends/cuda/winograd.cu and .py, conv.py's "wino" candidates) on the CPU
emulator: the filter gradient by F(3 x 3, 2 x 2), the forward and the data gradient by F(2 x 2, 3 x 3), their
transforms' kernels and their chunks over images against float64 of the direct sums, with float32 GEMMs in NumPy;
the filter gradient's three transforms against their matrices."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import RTOL_EMULATED, rel_err
from emu_build import EmulatedKernel, build_emulated
from mma_cases import conv_data_expected, conv_expected, conv_filter_expected

from hetnet.backends.cuda import kernels

# the F(3, 2) matrices of winograd.cu's comment
BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float64)
A = np.array([[1, 0], [1, 1], [1, -1], [0, -1]], np.float64)
GT = np.array([[1, .5, .5, 0], [0, .5, -.5, 0], [0, .5, .5, 1]], np.float64)

# (n, C, H, W, O, pad): odd H and W (a half tile of dy at the edges), pad 0 and 2, one channel, a workspace of one
# image a chunk (the GEMMs' sums carried over chunks)
CASES = [((2, 3, 7, 9, 5, 1), None), ((1, 4, 6, 6, 8, 0), None), ((3, 1, 5, 4, 2, 1), 1), ((2, 2, 4, 5, 3, 2), None),
         ((4, 6, 8, 8, 7, 1), 1)]


@pytest.fixture(scope="module")
def wino():
    from hetnet.backends.cuda import winograd
    return winograd


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    text = kernels.cu_text("winograd")
    return build_emulated(tmp_path_factory.mktemp("emu_wino"), "wino_emu", text, launchers_of=text)


def _launch(emu):
    return lambda name, grid, block, args: EmulatedKernel(emu, name)(grid, block, args)


class NanXp:
    """NumPy whose empty arrays are NaN: a workspace element the kernels use before writing it poisons the result."""
    zeros = staticmethod(np.zeros)

    @staticmethod
    def empty(shape, dtype):
        return np.full(shape, np.nan, dtype)


def _gemm(m, u, v, beta):
    """m[xi] = u[xi] v[xi]^T + beta m[xi] in float32 (each sum in float64, rounded once)."""
    prod = u.astype(np.float64) @ v.astype(np.float64).transpose(0, 2, 1)
    m[...] = (prod if beta == 0 else prod + beta * m).astype(np.float32)


def test_the_matrices_give_the_correlation():
    """G^T [(A g A^T) (.) (B^T d B)] G is the 3 x 3 correlation of a 4 x 4 d with a 2 x 2 g (the maths the kernels
    follow); a wrong sign in any matrix breaks it."""
    rng = np.random.default_rng(0)
    d, g = rng.standard_normal((4, 4)), rng.standard_normal((2, 2))
    want = np.array([[np.sum(d[r:r + 2, s:s + 2] * g) for s in range(3)] for r in range(3)])
    np.testing.assert_allclose(GT @ ((A @ g @ A.T) * (BT @ d @ BT.T)) @ GT.T, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("parts", [None, 3])
@pytest.mark.parametrize(("case", "chunk"), CASES, ids=str)
def test_winograd_filter_gradient_emulated(emu, wino, rng, case, chunk, parts):
    """dw (and dw + the gradient, add=True) against float64 of the direct sum (mma_cases.conv_filter_expected), within
    the emulated kernels' tolerance; workspace `chunk` images' worth where given, else all images in one chunk; K in
    filter_parts' runs, or in 3 (a chunk's tiles not a multiple of 3: the last run zero-padded)."""
    n, c, h, w, o, pad = case
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    p, q = h + 2 * pad - 2, w + 2 * pad - 2
    dy = rng.standard_normal((n, o, p, q)).astype(np.float32)
    th, tw = wino.tiles(p, q)
    workspace = chunk * 16 * (c + o) * th * tw * 4 if chunk else wino.WORKSPACE
    shape = (n, c, h, w, o, 3, 3, 1, pad)
    dw0 = rng.standard_normal((o, c, 3, 3)).astype(np.float32)
    for add in (False, True):
        dw = dw0.copy() if add else np.full((o, c, 3, 3), np.nan, np.float32)
        wino.filter_gradient(NanXp, _launch(emu), _gemm, dw, x, dy, pad, add=add, workspace=workspace, sms=2,
                             parts=parts)
        want = conv_filter_expected(dy, x, dw0 if add else np.zeros_like(dw0), shape)
        err = rel_err(dw, want)
        assert err <= RTOL_EMULATED, f"{case} add={add}: relative error {err:.3g}"


def test_transforms_are_the_matrices_emulated(emu, wino, rng):
    """Each kernel's output against its matrix product in float64: V = B^T d B of x's 4 x 4 patches (zero outside the
    image), U = A g A^T of dy's 2 x 2 tiles (zero past P, Q), dw = G^T M G."""
    n, c, h, w, o, pad = 2, 2, 5, 6, 3, 1
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    dy = rng.standard_normal((n, o, h, w)).astype(np.float32)
    th, tw = wino.tiles(h, w)
    t = n * th * tw
    v, u = np.empty(16 * c * t, np.float32), np.empty(16 * o * t, np.float32)
    launch, i32 = _launch(emu), np.int32
    launch("wino_x", (3,), (64,), (x, v, i32(0), i32(n), i32(c), i32(h), i32(w), i32(pad), i32(th), i32(tw), i32(1)))
    launch("wino_dy", (3,), (64,), (dy, u, i32(0), i32(n), i32(o), i32(h), i32(w), i32(th), i32(tw), i32(1)))
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad, pad + 2), (pad, pad + 2)))
    gp = np.pad(dy.astype(np.float64), ((0, 0), (0, 0), (0, 1), (0, 1)))
    v, u = v.reshape(4, 4, c, n, th, tw), u.reshape(4, 4, o, n, th, tw)
    for i in range(n):
        for ty in range(th):
            for tx in range(tw):
                d = xp[i, :, 2 * ty:2 * ty + 4, 2 * tx:2 * tx + 4]
                g = gp[i, :, 2 * ty:2 * ty + 2, 2 * tx:2 * tx + 2]
                np.testing.assert_allclose(v[..., i, ty, tx].transpose(2, 0, 1), BT @ d @ BT.T, rtol=1e-6, atol=1e-6)
                np.testing.assert_allclose(u[..., i, ty, tx].transpose(2, 0, 1), A @ g @ A.T, rtol=1e-6, atol=1e-6)
    m = rng.standard_normal((16, o, c)).astype(np.float32)
    dw = np.empty((o, c, 3, 3), np.float32)
    launch("wino_dw", (1,), (64,), (m, dw, i32(o), i32(c), i32(1), i32(0)))
    want = np.einsum("ax,xyoc,by->ocab", GT, m.astype(np.float64).reshape(4, 4, o, c), GT)
    np.testing.assert_allclose(dw, want, rtol=1e-6, atol=1e-6)


def test_plan_refuses_what_it_does_not_compute(wino):
    assert wino.fits(64, 128, 3, 3, 1, 1) and not wino.fits(64, 128, 3, 3, 2, 1) and not wino.fits(64, 128, 5, 5, 1, 1)
    assert wino.fits(64, 128, 3, 3, 1, 2) and not wino.fits(64, 128, 3, 3, 1, 3)
    with pytest.raises(ValueError, match="do not fit"):
        wino.filter_gradient(np, None, None, np.zeros((2, 3, 3, 3), np.float32), np.zeros((1, 3, 5, 5), np.float32),
                             np.zeros((1, 2, 4, 4), np.float32), 1)
    assert wino.chunk_images(512, 64, 128, 16, 16) == wino.WORKSPACE // (16 * (64 + 128) * 16 * 16 * 4) < 512
    assert wino.chunk_images(4, 64, 128, 16, 16) == 4 and wino.chunk_images(4, 64, 128, 16, 16, workspace=1) == 1
    assert wino.filter_parts(128, 128, 32768, 132) == 9          # 16 x 4 blocks of 64 x 64: 9 runs for 4 an SM
    assert wino.filter_parts(128, 128, 1000, 132) == 1000 // wino.MIN_PART and wino.filter_parts(8, 8, 10, 2) == 1


def _gemm_nn(m, u, v):
    """m[xi] = u[xi] v[xi] in float32 (each sum in float64, rounded once)."""
    m[...] = (u.astype(np.float64) @ v.astype(np.float64)).astype(np.float32)


@pytest.mark.parametrize(("case", "chunk"), CASES, ids=str)
def test_winograd_forward_emulated(emu, wino, rng, case, chunk):
    """y = act(conv(x, w) + b) by F(2 x 2, 3 x 3) against float64 (with bias + ReLU and without; y poisoned with
    NaN, so every output is written): odd P and Q (a half tile at the edges), pads 0 to 2, chunks of one image."""
    n, c, h, w, o, pad = case
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    wt = rng.standard_normal((o, c, 3, 3)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    p, q = h + 2 * pad - 2, w + 2 * pad - 2
    th, tw = wino.tiles(p, q)
    workspace = chunk * 16 * (c + o) * th * tw * 4 if chunk else wino.WORKSPACE
    for bias, act in ((b, 1), (None, 0)):
        y = np.full((n, o, p, q), np.nan, np.float32)
        wino.conv_forward(NanXp, _launch(emu), _gemm_nn, y, x, wt, bias, pad, act, workspace=workspace, sms=2)
        err = rel_err(y, conv_expected(x, wt, bias, 1, pad, act))
        assert err <= RTOL_EMULATED, f"{case} act={act}: relative error {err:.3g}"


@pytest.mark.parametrize(("case", "chunk"), CASES, ids=str)
def test_winograd_data_gradient_emulated(emu, wino, rng, case, chunk):
    """dx by the forward of dy with the weights turned (F(2 x 2, 3 x 3) at padding 2 - pad) against float64, with the
    ReLU mask and without."""
    n, c, h, w, o, pad = case
    p, q = h + 2 * pad - 2, w + 2 * pad - 2
    dy = rng.standard_normal((n, o, p, q)).astype(np.float32)
    wt = rng.standard_normal((o, c, 3, 3)).astype(np.float32)
    th, tw = wino.tiles(h, w)
    workspace = chunk * 16 * (c + o) * th * tw * 4 if chunk else wino.WORKSPACE
    mask = rng.standard_normal((n, c, h, w)).astype(np.float32)
    mask[..., 0] = 0.0                                  # (the mask is relu_x > 0: zero masks)
    for relu_x in (mask, None):
        dx = np.full((n, c, h, w), np.nan, np.float32)
        wino.data_gradient(NanXp, _launch(emu), _gemm_nn, dx, dy, wt, pad, relu_x, workspace=workspace, sms=2)
        err = rel_err(dx, conv_data_expected(dy, wt, relu_x, (n, c, h, w, o, 3, 3, 1, pad)))
        assert err <= RTOL_EMULATED, f"{case} mask={relu_x is not None}: relative error {err:.3g}"


def test_the_backend_runs_the_wino_candidates_emulated(emu, rng, monkeypatch):
    """conv.py's "wino" candidates through the fp32 backend's own ops (an EmulatedBackend whose choices are set to
    "wino", cuBLAS's batched GEMM in NumPy): conv2d_forward with bias, conv2d_backward with the ReLU mask and the
    bias gradient, the filter gradient added to the one there. Each op must run the batched GEMM (the candidate, not
    a fallback) and match float64; a layer they do not compute (stride 2) has no such candidate."""
    from emu_backend import EmulatedBackend, route_kernels

    from hetnet.backends.cuda import conv as C
    route_kernels(monkeypatch, {"winograd": emu})
    # conv.cu's bias gradient (not emulated here): out[k] += the sum over n and hw of x[n, k, hw]
    monkeypatch.setattr(C, "channel_sum", lambda be_, x_, out, n_, k_, hw: out.__iadd__(
        x_.reshape(n_, k_, hw).astype(np.float64).sum(axis=(0, 2)).astype(np.float32)))
    be = EmulatedBackend("fp32")
    calls = []

    def gemm_batched(c, a, trans_a, b, trans_b, alpha=1.0, beta=0.0):
        calls.append(c.shape)
        prod = a.astype(np.float64).transpose(0, 2, 1) if trans_a else a.astype(np.float64)
        prod = prod @ (b.astype(np.float64).transpose(0, 2, 1) if trans_b else b.astype(np.float64))
        c[...] = (alpha * prod + (beta * c if beta else 0)).astype(np.float32)

    be.gemm_batched = gemm_batched
    n, c, h, w, o, pad = 3, 5, 7, 6, 4, 1
    g = C.Geometry(n, c, h, w, o, 3, 3, 1, pad)
    for op in ("fwd", "data", "filter"):
        be._tune[(op, g.key())] = "wino"
    x, wt = rng.standard_normal((n, c, h, w)).astype(np.float32), rng.standard_normal((o, c, 3, 3)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    y, cache = be.conv2d_forward(x, wt, b, 1, pad, relu_mask=True)
    assert calls, "the forward did not run the Winograd candidate"
    assert rel_err(y, conv_expected(x, wt, b, 1, pad, 0)) <= RTOL_EMULATED
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dw0, db0 = rng.standard_normal(wt.shape).astype(np.float32), rng.standard_normal(o).astype(np.float32)
    dw, db = dw0.copy(), db0.copy()
    calls.clear()
    dx = be.conv2d_backward(dy, cache, dw, db, need_dx=True, relu_mask=True)
    assert len(calls) >= 2, "the gradients did not run the Winograd candidates"
    shape = (n, c, h, w, o, 3, 3, 1, pad)
    assert rel_err(dx, conv_data_expected(dy, wt, x, shape)) <= RTOL_EMULATED
    assert rel_err(dw, conv_filter_expected(dy, x, dw0, shape)) <= RTOL_EMULATED
    np.testing.assert_allclose(db, db0 + dy.astype(np.float64).sum(axis=(0, 2, 3)), rtol=1e-5, atol=1e-5)
    assert not C.wino_fits(be, C.Geometry(n, c, h, w, o, 3, 3, 2, pad), x)
    assert not C.wino_fits(EmulatedBackend("tf32"), g, x)

