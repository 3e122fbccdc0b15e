"""cpu-backend internals: its code paths (threaded chunks, per-image vs batched GEMM, the 2x2 max-pool fast path, the
centred BatchNorm statistics, the Numba-compiled loops and the NumPy fallback used without Numba) agree with each
other and with the float64 reference. The general cpu-vs-reference op tests are in test_ops.py."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from hetnet.backends.cpu import _jit as jit
from hetnet.backends.cpu import threads as thr
from hetnet.backends import cpu, reference as ref

from conftest import assert_close

F32 = np.float32


@pytest.fixture
def many_chunks(monkeypatch):
    """Force tiny chunks on two threads, so every op runs its multi-chunk, multi-thread path."""
    monkeypatch.setattr(thr, "CHUNK_BYTES", 1)
    monkeypatch.setattr(thr, "ELEMENTWISE_CHUNK_BYTES", 1)
    monkeypatch.setattr(thr, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(cpu.dense, "_DENSE_PARALLEL_MIN_MACS", 0)
    monkeypatch.setattr(cpu.dense, "_DENSE_SPLIT_MIN_MACS", 0)
    old = thr.threads()
    thr.set_threads(2)
    yield
    thr.set_threads(old)


@pytest.fixture(params=["compiled", "numpy"])
def path(request, monkeypatch):
    """Run a test on the Numba-compiled loops (when Numba is installed) and on the NumPy fallback."""
    if request.param == "numpy":
        monkeypatch.setattr(jit, "available", lambda: False)
        monkeypatch.setattr(cpu._common, "SGEMM", None)
    elif not jit.available():
        pytest.skip("numba not installed: only the NumPy paths exist")
    return request.param


def _conv_all(x, w, b, stride, pad, dy):
    y, cache = cpu.conv2d_forward(cpu.asarray(x), cpu.asarray(w), None if b is None else cpu.asarray(b), stride, pad)
    dw, db = cpu.zeros(w.shape), None if b is None else cpu.zeros(b.shape)
    dx = cpu.conv2d_backward(cpu.asarray(dy), cache, dw, db)
    return y, dx, dw, db


@pytest.mark.parametrize("case", [(5, 3, 9, 7, 4, 3, 1, 1), (3, 16, 8, 8, 8, 3, 2, 0), (4, 2, 11, 6, 3, 5, 3, 2),
                                  (6, 9, 6, 6, 5, 1, 1, 0), (2, 3, 7, 9, 4, 5, 1, 2), (3, 2, 5, 1, 3, 3, 1, 1)])
def test_conv_chunked_threads_match_reference(path, rng, many_chunks, case):
    n, c, h, w_, k, r, stride, pad = case
    x = rng.standard_normal((n, c, h, w_))
    w = rng.standard_normal((k, c, r, r))
    b = rng.standard_normal(k)
    yr, cr = ref.conv2d_forward(x, w, b, stride, pad)
    dy = rng.standard_normal(yr.shape)
    dwr, dbr = np.zeros(w.shape), np.zeros(k)
    dxr = ref.conv2d_backward(dy, cr, dwr, dbr)
    y, dx, dw, db = _conv_all(x, w, b, stride, pad, dy)
    for got, want, what in ((y, yr, "y"), (dx, dxr, "dx"), (dw, dwr, "dw"), (db, dbr, "db")):
        assert_close(got, want, F32, f"conv {case} {what}")


@pytest.mark.parametrize("crs_limit", [0, 10**9])
@pytest.mark.parametrize("stride, pad", [(1, 1), (2, 0)])
def test_conv_backward_per_image_and_batched_gemm_agree(rng, monkeypatch, crs_limit, stride, pad):
    """Backward has two GEMM layouts: per-image GEMMs (short columns) and one GEMM over the chunk."""
    monkeypatch.setattr(cpu.conv, "_PER_IMAGE_GEMM_MAX_CRS", crs_limit)
    x = rng.standard_normal((3, 4, 7, 6))
    w = rng.standard_normal((5, 4, 3, 3))
    b = rng.standard_normal(5)
    yr, cr = ref.conv2d_forward(x, w, b, stride, pad)
    dy = rng.standard_normal(yr.shape)
    dwr, dbr = np.zeros(w.shape), np.zeros(5)
    dxr = ref.conv2d_backward(dy, cr, dwr, dbr)
    y, dx, dw, db = _conv_all(x, w, b, stride, pad, dy)
    for got, want, what in ((y, yr, "y"), (dx, dxr, "dx"), (dw, dwr, "dw"), (db, dbr, "db")):
        assert_close(got, want, F32, f"conv {what}, per-image limit {crs_limit}")


@pytest.mark.parametrize("crs_limit", [0, 10**9])
def test_backward_without_dw_on_every_path(path, rng, many_chunks, monkeypatch, crs_limit):
    """dw None (a frozen weight) on the compiled loops and the NumPy fallback, both conv GEMM layouts, several
    chunks on two threads: conv2d, the fused conv + ReLU + 2x2 pool and dense return the dx and db of the backward
    that computes dw, bit for bit, with need_dx and without (db alone)."""
    monkeypatch.setattr(cpu.conv, "_PER_IMAGE_GEMM_MAX_CRS", crs_limit)
    x, w, b = rng.standard_normal((3, 4, 8, 6)), rng.standard_normal((5, 4, 3, 3)), rng.standard_normal(5)
    xd, wd, bd = rng.standard_normal((9, 6)), rng.standard_normal((4, 6)), rng.standard_normal(4)
    for op, args in (("conv2d", [x, w, b, 1, 1]), ("conv2d", [x, w, b, 2, 0]),
                     ("conv2d_relu_maxpool", [x, w, b, 1, 1, 2, 2]), ("dense", [xd, wd, bd])):
        dev = [cpu.asarray(a) if isinstance(a, np.ndarray) else a for a in args]
        y, cache = getattr(cpu, f"{op}_forward")(*dev)
        dy = cpu.asarray(rng.standard_normal(y.shape))
        for need_dx in (True, False):
            out = []
            for dw in (cpu.zeros(args[1].shape), None):
                db = cpu.zeros(args[2].shape)
                out.append((getattr(cpu, f"{op}_backward")(dy, cache, dw, db, need_dx=need_dx), db, dw))
            (dx, db, dw), (dx0, db0, _) = out
            assert np.any(dw != 0) and np.any(db != 0), op
            np.testing.assert_array_equal(db0, db, err_msg=f"{op} db without dw, need_dx={need_dx}")
            if need_dx:
                assert np.any(dx != 0), op
                np.testing.assert_array_equal(dx0, dx, err_msg=f"{op} dx without dw")
            else:
                assert dx is None and dx0 is None


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (3, 2, 9, 7), (1, 1, 2, 2), (4, 5, 7, 10)])
def test_maxpool_2x2_fast_path_ties_and_odd_sizes(path, rng, many_chunks, shape):
    # small integers: many ties, including whole windows of equal values (as after a ReLU)
    x = rng.integers(-1, 2, size=shape).astype(np.float64)
    yr, cr = ref.maxpool2d_forward(x, 2, 2)
    dy = rng.standard_normal(yr.shape)
    dxr = ref.maxpool2d_backward(dy, cr)
    y, c = cpu.maxpool2d_forward(cpu.asarray(x), 2, 2)
    dx = cpu.maxpool2d_backward(cpu.asarray(dy), c)
    np.testing.assert_array_equal(y, yr.astype(F32))
    assert_close(dx, dxr, F32, "maxpool 2x2 dx")
    assert np.count_nonzero(dx) == np.count_nonzero(dxr)  # exactly one position per window


@pytest.mark.parametrize("offset", [0.0, 100.0])
@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_both_statistics_paths(path, rng, many_chunks, offset, training):
    # offset 100: mean^2 >> var, so the backend switches to its exact centred sums
    shape = (6, 5, 4, 3)
    x = rng.standard_normal(shape) * 0.5 + offset
    g, b = rng.standard_normal(5), rng.standard_normal(5)
    rm, rv = rng.standard_normal(5) + offset, rng.random(5) + 0.5
    rm32, rv32 = cpu.asarray(rm), cpu.asarray(rv)
    yr, cr = ref.batchnorm_forward(x, g, b, rm, rv, 0.1, 1e-5, training)
    y, c = cpu.batchnorm_forward(cpu.asarray(x), cpu.asarray(g), cpu.asarray(b), rm32, rv32, 0.1, 1e-5, training)
    assert_close(y, yr, F32, "bn y")
    assert_close(rm32, rm, F32, "bn running_mean")
    assert_close(rv32, rv, F32, "bn running_var")
    dy = rng.standard_normal(shape)
    dgr, dbr = np.zeros(5), np.zeros(5)
    dxr = ref.batchnorm_backward(dy, cr, dgr, dbr)
    dg, db = cpu.zeros(5), cpu.zeros(5)
    dx = cpu.batchnorm_backward(cpu.asarray(dy), c, dg, db)
    assert_close(dx, dxr, F32, "bn dx")
    assert_close(dg, dgr, F32, "bn dgamma")
    assert_close(db, dbr, F32, "bn dbeta")


def test_threaded_elementwise_and_dense_match(path, rng, many_chunks):
    x = rng.standard_normal((7, 3, 5, 4))
    y, c = cpu.relu_forward(cpu.asarray(x))
    np.testing.assert_array_equal(y, np.maximum(x, 0).astype(F32))
    dy = rng.standard_normal(x.shape)
    np.testing.assert_array_equal(cpu.relu_backward(cpu.asarray(dy), c), (dy * (x > 0)).astype(F32))
    a, w, bias = rng.standard_normal((9, 6)), rng.standard_normal((4, 6)), rng.standard_normal(4)
    yr, cr = ref.dense_forward(a, w, bias)
    yd, cd = cpu.dense_forward(cpu.asarray(a), cpu.asarray(w), cpu.asarray(bias))
    assert_close(yd, yr, F32, "dense y")
    g = rng.standard_normal(yr.shape)
    dwr, dbr = np.zeros(w.shape), np.zeros(4)
    dxr = ref.dense_backward(g, cr, dwr, dbr)
    dwc, dbc = cpu.zeros(w.shape), cpu.zeros(4)
    dxc = cpu.dense_backward(cpu.asarray(g), cd, dwc, dbc)
    assert_close(dxc, dxr, F32, "dense dx")
    assert_close(dwc, dwr, F32, "dense dw")


@pytest.mark.parametrize("momentum,dampening,nesterov,wd", [
    (0.0, 0.0, False, 0.0), (0.9, 0.0, False, 0.0), (0.9, 0.0, True, 5e-4), (0.5, 0.3, False, 0.1)])
def test_sgd_compiled_and_numpy_bit_identical(rng, monkeypatch, many_chunks, momentum, dampening, nesterov, wd):
    """The compiled SGD pass (split over two threads here) does the NumPy version's float32 operations in the same
    order: the same bits after a few steps, first step included."""
    if not jit.available():
        pytest.skip("numba not installed: only the NumPy path exists")
    p0 = rng.standard_normal((37, 11)).astype(F32)
    grads = [rng.standard_normal(p0.shape).astype(F32) for _ in range(3)]
    out = []
    for compiled in (True, False):
        if not compiled:
            monkeypatch.setattr(jit, "available", lambda: False)
        p, buf = p0.copy(), np.zeros_like(p0)
        for i, g in enumerate(grads):
            cpu.sgd_update(p, g, buf if momentum else None, 0.05, momentum, dampening, nesterov, wd, i == 0)
        out.append((p, buf))
    np.testing.assert_array_equal(out[0][0], out[1][0])
    np.testing.assert_array_equal(out[0][1], out[1][1])
    assert not np.array_equal(out[0][0], p0)


def test_results_are_fresh_float32_arrays(path, rng):
    """Scratch buffers are reused between calls; nothing returned may alias them or an earlier result."""
    x = cpu.asarray(rng.standard_normal((4, 3, 8, 8)))
    w = cpu.asarray(rng.standard_normal((5, 3, 3, 3)))
    y1, c1 = cpu.conv2d_forward(x, w, None, 1, 1)
    keep = y1.copy()
    y2, _ = cpu.conv2d_forward(x * 2, w, None, 1, 1)
    np.testing.assert_array_equal(y1, keep)
    for arr in (y1, y2, cpu.maxpool2d_forward(y1, 2, 2)[0], cpu.relu_forward(y1)[0]):
        assert arr.dtype == F32 and arr.flags.c_contiguous
    dx1 = cpu.conv2d_backward(y1, c1, cpu.zeros(w.shape), None)
    keep = dx1.copy()
    cpu.conv2d_backward(y1 * 3, c1, cpu.zeros(w.shape), None)
    np.testing.assert_array_equal(dx1, keep)


def test_blas_thread_setting_is_restored():
    if thr._blas_get is None:
        pytest.skip("NumPy is not linked to a recognised OpenBLAS")
    before = thr._blas_get()
    x = cpu.asarray(np.ones((64, 8, 16, 16)))
    cpu.conv2d_forward(x, cpu.asarray(np.ones((8, 8, 3, 3))), None, 1, 1)
    assert thr._blas_get() == before


@pytest.mark.parametrize("shape", [(7, 3, 5, 4), (1, 1)])
def test_gelu_compiled_and_numpy_paths(path, rng, many_chunks, shape):
    """Both paths evaluate Phi in float64 (the C library's erfc, or a rational erfc with relative error < 1.2e-7)
    and round once: each y within a few float32 ulps of the reference, not only in norm; each dx within a few ulps
    of its terms' size |dy| (Phi + |x| phi) (the two terms cancel near x = -0.75, where GELU has its minimum)."""
    x = (rng.standard_normal(shape) * 3).astype(F32).astype(np.float64)
    dy = rng.standard_normal(shape).astype(F32).astype(np.float64)
    yr, cr = ref.gelu_forward(x)
    y, c = cpu.gelu_forward(cpu.asarray(x))
    dx = cpu.gelu_backward(cpu.asarray(dy), c)
    assert y.dtype == F32 and dx.dtype == F32
    np.testing.assert_allclose(y, yr, rtol=4e-7, atol=1e-37, err_msg="gelu y")
    terms = np.abs(dy) * (ref._normal_cdf(x) + np.abs(x) * np.exp(-x * x / 2) / np.sqrt(2 * np.pi))
    err = np.abs(dx - ref.gelu_backward(dy, cr))
    assert np.all(err <= 4e-7 * terms + 1e-37), f"gelu dx: worst error {np.max(err / (terms + 1e-37)):.3g} of its terms"


# --- BatchNorm2D -> ReLU -> MaxPool2D(2), fused ----------------------------------------------------------------------

needs_numba = pytest.mark.skipif(not jit.available(), reason="Numba unavailable: no fused batch norm")


def _bn_chain(be, x, gamma, beta, rm, rv, training, dy, dgamma, dbeta):
    """batchnorm -> relu -> maxpool 2x2 forward and backward through backend `be`'s own ops, one after the other."""
    yb, cb = be.batchnorm_forward(x, gamma, beta, rm, rv, 0.1, 1e-5, training)
    yr, cr = be.relu_forward(yb)
    yp, cp = be.maxpool2d_forward(yr, 2, 2)
    dx = be.batchnorm_backward(be.relu_backward(be.maxpool2d_backward(dy, cp), cr), cb, dgamma, dbeta)
    return yp, dx


@needs_numba
@pytest.mark.parametrize("shape", [(1, 3, 4, 4), (3, 2, 7, 5), (2, 4, 6, 9), (4, 1, 4, 3)])
@pytest.mark.parametrize("training", [True, False])
def test_fused_bn_relu_pool_matches_the_three_ops_and_reference(rng, shape, training):
    """The compiled fused op (2x2 windows): odd sizes leave a row / column no window covers (its gradient comes from
    batch norm's sums alone). The output and running statistics are the three cpu ops' bits; the gradients are
    within float32 rounding of them (the sums run in another order) and of the float64 reference."""
    n, c, h, w = shape
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(np.float32)
    x[:, :, :2, :2] = -20                # each channel's first window: the ReLU closes it
    gamma = (np.abs(rng.standard_normal(c)) + 0.5).astype(np.float32)
    beta = (rng.standard_normal(c) * 0.3).astype(np.float32)
    dy = rng.standard_normal((n, c, h // 2, w // 2)).astype(np.float32)
    stats = [(rng.random(c).astype(np.float32), (rng.random(c) + 0.5).astype(np.float32)) for _ in range(3)]
    stats[1] = (stats[0][0].copy(), stats[0][1].copy())
    stats[2] = (stats[0][0].astype(np.float64), stats[0][1].astype(np.float64))
    grads = [(np.zeros(c, np.float32) + 0.5, np.zeros(c, np.float32) - 0.25) for _ in range(2)]
    grads.append((np.zeros(c) + 0.5, np.zeros(c) - 0.25))
    x_copy = x.copy()
    y1, dx1 = _bn_chain(cpu, x, gamma, beta, *stats[0], training, dy, *grads[0])
    y2, cache = cpu.bn_relu_maxpool_forward(x, gamma, beta, *stats[1], 0.1, 1e-5, training, 2, 2)
    dx2 = cpu.bn_relu_maxpool_backward(dy, cache, *grads[1])
    yr, dxr = _bn_chain(ref, x.astype(np.float64), gamma.astype(np.float64), beta.astype(np.float64),
                        *stats[2], training, dy.astype(np.float64), *grads[2])
    np.testing.assert_array_equal(x, x_copy)
    np.testing.assert_array_equal(y2, y1)
    for a, b in zip(stats[1], stats[0]):
        np.testing.assert_array_equal(a, b)
    assert_close(y2, yr, np.float32, "y vs reference")
    for j, against in ((0, "the three cpu ops"), (2, "reference")):
        want_dx = dx1 if j == 0 else dxr
        for got, want, what in ((dx2, want_dx, "dx"), (grads[1][0], grads[j][0], "dgamma"),
                                (grads[1][1], grads[j][1], "dbeta")):
            assert_close(got, want, np.float32, f"{what} vs {against}")
    assert np.any(dx2 != 0) and np.any(y2 > 0) and np.all(y2[:, :, 0, 0] == 0)   # both sides of the ReLU
    dg = np.zeros(c, np.float32) + 0.5          # as grads[1][0] started
    assert cpu.bn_relu_maxpool_backward(dy, cache, dg, np.zeros(c, np.float32), need_dx=False) is None
    np.testing.assert_array_equal(dg, grads[1][0])
    db = np.zeros(c, np.float32) - 0.25         # dgamma None (a frozen scale): the same dx and dbeta
    np.testing.assert_array_equal(cpu.bn_relu_maxpool_backward(dy, cache, None, db), dx2)
    np.testing.assert_array_equal(db, grads[1][1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page-fault counts from getrusage (Linux)")
def test_a_warm_training_step_reuses_freed_memory():
    """A step frees its activations at its end; the next step should get the same memory back rather than fresh
    pages from the kernel (without _common.keep_freed_memory, fashion-cnn at batch 32 takes ~2,000 page faults a
    step here)."""
    import resource

    import hetnet as hn
    from hetnet import train, zoo
    from hetnet.optim import SGD

    hn.seed(0)
    model = zoo.build("fashion-cnn").to("cpu")
    step = train.make_train_step(model, SGD(model.parameters(), lr=0.01, momentum=0.9))
    rng = np.random.default_rng(0)
    x = cpu.asarray(rng.standard_normal((32, 1, 28, 28)).astype(np.float32))
    y = cpu.labels(rng.integers(0, 10, 32))
    for _ in range(3):
        step.step(x, y)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        step.step(x, y)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 100, f"{faults} page faults in 3 warm steps"
