"""Every backend op, forward and backward, against the float64 reference on fresh random inputs at odd shapes.

Each comparison also checks that the op leaves its inputs (x, w, b, dy, g, labels, targets) untouched, and the
parametric ops check that backward *adds* into the gradient arrays it is given.
"""
from __future__ import annotations

import numpy as np
import pytest
from conftest import RTOL, assert_close
from mma_cases import ROUND

from hetnet.backends import reference as ref
from hetnet.device import cuda_available, get_backend
from hetnet.random import counter_uniform

BACKENDS = ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.gpu)] if cuda_available() else [])
# the cuda backend again with tensor-core matrix products ("device@precision"), compared at that precision's tolerance
PRECISION_BACKENDS = [pytest.param(f"cuda@{p}", marks=pytest.mark.gpu) for p in ("tf32", "bf16") if cuda_available()]


@pytest.fixture(params=BACKENDS + PRECISION_BACKENDS)
def bk(request):
    device, _, precision = request.param.partition("@")
    return get_backend(device, precision or None)


def product_inputs(b, *arrays):
    """The arrays as backend b's tensor-core products read them (rounded to bf16 or tf32 values; unchanged at fp32).
    The ops that pool a convolution's output take each window's maximum: from rounded inputs, the float64 reference
    picks the element the backend picks wherever the window's values differ by more than the products' float32 sums
    can move them, and with it the element that takes the window's gradient."""
    precision = getattr(b, "precision", "fp32")
    if precision == "fp32":
        return arrays
    return tuple(None if a is None else ROUND[precision](a).astype(np.float64) for a in arrays)


def f32(rng, *shape, scale=1.0, shift=0.0):
    """Random float64 values that are exact in float32, so backends differ by their arithmetic only."""
    return (rng.normal(shift, scale, size=shape)).astype(np.float32).astype(np.float64)


def run(b, fwd: str, args: list, bwd: str | None, dy_seed=None, accum=(), mutable=(), bwd_kw=None, fwd_kw=None):
    """Run b.<fwd>(*args, **fwd_kw) then b.<bwd>(dy, cache, *accumulators, **bwd_kw). NumPy float64 arrays among
    args are moved to the device; the rest pass through. Returns host arrays: y, dx, accumulator values, final values
    of `mutable` args. Asserts that every non-mutable input and dy are unchanged."""
    dev = [b.asarray(a) if isinstance(a, np.ndarray) else a for a in args]
    before = [b.to_numpy(a).copy() if isinstance(a, np.ndarray) or hasattr(a, "shape") else None for a in dev]
    y, cache = getattr(b, fwd)(*dev, **(fwd_kw or {}))
    out = {"y": b.to_numpy(y)}
    if bwd is not None:
        dy = b.asarray(dy_seed.normal(size=out["y"].shape).astype(np.float32))
        dy_before = b.to_numpy(dy).copy()
        acc = [None if s is None else b.zeros(s) for s in accum]
        dx = getattr(b, bwd)(dy, cache, *acc, **(bwd_kw or {}))
        out["dx"] = None if dx is None else b.to_numpy(dx)
        out["acc"] = [None if a is None else b.to_numpy(a) for a in acc]
        np.testing.assert_array_equal(b.to_numpy(dy), dy_before, err_msg=f"{bwd} modified dy")
    for i, (d, bf) in enumerate(zip(dev, before)):
        if bf is None:
            continue
        if i in mutable:
            out.setdefault("mutable", []).append(b.to_numpy(d))
        else:
            np.testing.assert_array_equal(b.to_numpy(d), bf, err_msg=f"{fwd}/{bwd} modified input {i}")
    return out


def compare(b, fwd, args, bwd, seed, **kw):
    """The same op on the reference and on b, same inputs and same dy; every output compared."""
    got = run(b, fwd, args, bwd, np.random.default_rng(seed), **kw)
    want = run(ref, fwd, args, bwd, np.random.default_rng(seed), **kw)
    assert_close(got["y"], want["y"], b, f"{fwd} y")
    if bwd is not None:
        if want["dx"] is None:
            assert got["dx"] is None, f"{bwd}: need_dx=False must return None"
        else:
            assert_close(got["dx"], want["dx"], b, f"{bwd} dx")
        for i, (g, w) in enumerate(zip(got["acc"], want["acc"])):
            if w is not None:
                assert_close(g, w, b, f"{bwd} gradient {i}")
    for i, (g, w) in enumerate(zip(got.get("mutable", []), want.get("mutable", []))):
        assert_close(g, w, b, f"{fwd} in-place state {i}")
    return got, want


# --- dense -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,f,k,bias", [(1, 1, 1, True), (1, 7, 3, True), (5, 13, 4, False), (8, 31, 10, True)])
def test_dense(bk, rng, n, f, k, bias):
    x, w, b = f32(rng, n, f), f32(rng, k, f), (f32(rng, k) if bias else None)
    compare(bk, "dense_forward", [x, w, b], "dense_backward", rng.integers(1 << 30),
            accum=[(k, f), (k,) if bias else None])


def test_dense_need_dx_false(bk, rng):
    x, w, b = f32(rng, 3, 5), f32(rng, 4, 5), f32(rng, 4)
    compare(bk, "dense_forward", [x, w, b], "dense_backward", rng.integers(1 << 30),
            accum=[(4, 5), (4,)], bwd_kw={"need_dx": False})


# --- conv2d ------------------------------------------------------------------------------------------------------

CONV_CASES = [  # (N, C, H, W, K, kernel, stride, padding, bias)
    (1, 2, 5, 5, 3, 1, 1, 0, True),      # 1x1 kernel (dw of a single channel pair would be one cancelling sum)
    (1, 3, 7, 5, 4, 3, 1, 1, True),      # batch 1, non-square
    (2, 2, 9, 6, 3, 3, 2, 0, True),      # stride 2, padding 0
    (2, 3, 8, 11, 2, 5, 1, 2, True),     # kernel 5, padding 2
    (3, 2, 10, 7, 5, 3, 3, 2, False),    # stride 3, padding 2, no bias
    (2, 4, 6, 9, 3, 1, 2, 1, True),      # 1x1 kernel with stride and padding
    (1, 2, 5, 5, 2, 5, 2, 2, True),      # kernel as big as the input
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "N{}C{}H{}W{}K{}k{}s{}p{}b{:d}".format(*c))
def test_conv2d(bk, rng, case):
    n, c, h, w_, k, ks, stride, pad, bias = case
    x, w, b = f32(rng, n, c, h, w_), f32(rng, k, c, ks, ks), (f32(rng, k) if bias else None)
    got, _ = compare(bk, "conv2d_forward", [x, w, b, stride, pad], "conv2d_backward", rng.integers(1 << 30),
                     accum=[(k, c, ks, ks), (k,) if bias else None])
    assert got["y"].shape == (n, k, (h + 2 * pad - ks) // stride + 1, (w_ + 2 * pad - ks) // stride + 1)


def test_conv2d_need_dx_false(bk, rng):
    x, w, b = f32(rng, 2, 3, 6, 5), f32(rng, 4, 3, 3, 3), f32(rng, 4)
    compare(bk, "conv2d_forward", [x, w, b, 1, 1], "conv2d_backward", rng.integers(1 << 30),
            accum=[(4, 3, 3, 3), (4,)], bwd_kw={"need_dx": False})


def test_reference_conv2d_is_the_definition(rng):
    """The reference conv against its defining sum, written as seven plain loops (tiny shape)."""
    n, c, h, w_, k, ks, stride, pad = 2, 2, 5, 4, 3, 3, 2, 1
    x, w, b = rng.normal(size=(n, c, h, w_)), rng.normal(size=(k, c, ks, ks)), rng.normal(size=k)
    y, _ = ref.conv2d_forward(x, w, b, stride, pad)
    xpad = np.zeros((n, c, h + 2 * pad, w_ + 2 * pad))
    xpad[:, :, pad:pad + h, pad:pad + w_] = x
    want = np.zeros(y.shape)
    for i in range(n):
        for o in range(k):
            for p in range(y.shape[2]):
                for q in range(y.shape[3]):
                    acc = b[o]
                    for ci in range(c):
                        for r in range(ks):
                            for s in range(ks):
                                acc += w[o, ci, r, s] * xpad[i, ci, p * stride + r, q * stride + s]
                    want[i, o, p, q] = acc
    assert_close(y, want, np.float64, "conv2d by definition")


# --- pooling -----------------------------------------------------------------------------------------------------

POOL_CASES = [  # (N, C, H, W, kernel, stride)
    (1, 1, 4, 4, 2, 2),
    (2, 3, 7, 5, 2, 2),       # odd sizes floor
    (2, 2, 9, 8, 3, 2),       # overlapping windows
    (1, 3, 6, 7, 3, 1),       # stride 1, heavy overlap
    (3, 2, 10, 7, 3, 3),
    (2, 2, 9, 6, 3, 3),       # windows tile the input exactly
    (2, 2, 8, 10, 2, 3),      # gaps between windows
    (2, 2, 5, 5, 1, 1),
]


@pytest.mark.parametrize("op", ["maxpool2d", "avgpool2d"])
@pytest.mark.parametrize("case", POOL_CASES, ids=lambda c: "N{}C{}H{}W{}k{}s{}".format(*c))
def test_pool(bk, rng, op, case):
    n, c, h, w, ks, stride = case
    got, _ = compare(bk, f"{op}_forward", [f32(rng, n, c, h, w), ks, stride], f"{op}_backward",
                     rng.integers(1 << 30))
    assert got["y"].shape == (n, c, (h - ks) // stride + 1, (w - ks) // stride + 1)


@pytest.mark.parametrize("name", ["reference"] + BACKENDS)
def test_maxpool_ties_go_to_first_maximum(name):
    """All-equal windows: the whole gradient goes to the first element (row-major) of each window."""
    b = get_backend(name)
    x = np.ones((1, 1, 4, 4))
    _, cache = b.maxpool2d_forward(b.asarray(x), 2, 2)
    dx = b.to_numpy(b.maxpool2d_backward(b.asarray(np.ones((1, 1, 2, 2))), cache))
    want = np.zeros((1, 1, 4, 4))
    want[0, 0, ::2, ::2] = 1
    np.testing.assert_array_equal(dx, want)
    # overlapping windows (kernel 3, stride 1) on a single peak: the peak gets every window's gradient
    x = np.zeros((1, 1, 4, 4))
    x[0, 0, 1, 2] = 5.0
    _, cache = b.maxpool2d_forward(b.asarray(x), 3, 1)
    dx = b.to_numpy(b.maxpool2d_backward(b.asarray(np.ones((1, 1, 2, 2))), cache))
    assert dx[0, 0, 1, 2] == 4 and dx.sum() == 4


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 5, 4), (3, 2, 7, 7)])
def test_global_avgpool(bk, rng, shape):
    compare(bk, "global_avgpool2d_forward", [f32(rng, *shape)], "global_avgpool2d_backward", rng.integers(1 << 30))


# --- activations -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["relu", "sigmoid", "tanh", "gelu"])
@pytest.mark.parametrize("shape", [(1, 3), (3, 7), (2, 3, 5, 4)])
def test_activation(bk, rng, op, shape):
    # scale 1: deep in saturation y(1-y) and 1-y^2 from a float32 y lose all digits (see the test below)
    compare(bk, f"{op}_forward", [f32(rng, *shape)], f"{op}_backward", rng.integers(1 << 30))


@pytest.mark.parametrize("op", ["sigmoid", "tanh"])
def test_activation_saturates_finitely(bk, op):
    x = np.array([[-1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4]])
    y, cache = getattr(bk, f"{op}_forward")(bk.asarray(x))
    dx = getattr(bk, f"{op}_backward")(bk.asarray(np.ones_like(x)), cache)
    y, dx = bk.to_numpy(y), bk.to_numpy(dx)
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(dx))
    lo = 0.0 if op == "sigmoid" else -1.0
    assert y[0, 0] == pytest.approx(lo) and y[0, -1] == pytest.approx(1.0)


def test_gelu_wide_range_and_tails(bk, rng):
    """x from -30 to 30: forward and backward match the reference; far in the negative tail y and dx are the tiny
    values x Phi(x) and Phi(x) + x phi(x), not 0 or garbage (the erfc form), element by element."""
    x = np.concatenate([np.linspace(-30, 30, 121), f32(rng, 39, scale=4.0)]).astype(np.float32).astype(np.float64)
    got, want = compare(bk, "gelu_forward", [x.reshape(4, -1)], "gelu_backward", rng.integers(1 << 30))
    tail = (x.reshape(4, -1) < -3) & (x.reshape(4, -1) > -12)     # beyond -13 y nears float32's smallest normal
    for key in ("y", "dx"):
        assert np.all(np.isfinite(got[key]))
        np.testing.assert_allclose(got[key][tail], want[key][tail], rtol=1e-4, err_msg=f"gelu {key} in the tail")


def test_reference_gelu_is_the_definition(rng):
    """y = x (1 + erf(x / sqrt 2)) / 2 elementwise (math.erf), and dx by its own central difference."""
    import math

    x = rng.normal(0, 2, size=(3, 5))
    y, cache = ref.gelu_forward(x)
    want = np.array([[v * 0.5 * (1 + math.erf(v / math.sqrt(2))) for v in row] for row in x])
    assert_close(y, want, np.float64, "gelu by definition")
    h = 1e-6
    numeric = (ref.gelu_forward(x + h)[0] - ref.gelu_forward(x - h)[0]) / (2 * h)
    np.testing.assert_allclose(ref.gelu_backward(np.ones_like(x), cache), numeric, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("factor", [1 / 9, -2.5, 0.0])
@pytest.mark.parametrize("shape", [(1, 1), (4, 10), (2, 3, 5, 4)])
def test_scale(bk, rng, factor, shape):
    got, _ = compare(bk, "scale_forward", [f32(rng, *shape), factor], "scale_backward", rng.integers(1 << 30))
    if factor == 0.0:
        assert not got["y"].any() and not got["dx"].any()


@pytest.mark.parametrize("shape,scale", [((1, 1), 1.0), ((4, 10), 3.0), ((3, 7), 3.0)])  # larger: see below
def test_softmax(bk, rng, shape, scale):
    got, _ = compare(bk, "softmax_forward", [f32(rng, *shape, scale=scale)], "softmax_backward",
                     rng.integers(1 << 30))
    np.testing.assert_allclose(got["y"].sum(axis=1), 1.0, rtol=1e-5)


def test_softmax_large_logits(bk, rng):
    """Logits of size 1e4 (exp overflows without the max shift): forward still matches and sums to 1. (Backward
    is not compared here: near one-hot rows make y * (dy - sum(dy y)) a cancellation float32 cannot resolve.)"""
    compare(bk, "softmax_forward", [f32(rng, 3, 7, scale=1e4)], None, None)


def test_relu_gradient_is_zero_at_and_below_zero(bk):
    x = bk.asarray(np.array([[-2.0, 0.0, 3.0]]))
    y, cache = bk.relu_forward(x)
    dx = bk.to_numpy(bk.relu_backward(bk.asarray(np.array([[5.0, 5.0, 5.0]])), cache))
    np.testing.assert_array_equal(bk.to_numpy(y), [[0.0, 0.0, 3.0]])
    np.testing.assert_array_equal(dx, [[0.0, 0.0, 5.0]])


# --- batch normalisation -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 3), (7, 5), (1, 2, 3, 4), (3, 4, 5, 2)], ids=str)  # m >= 4: at m = 2 dx is ~0
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batchnorm(bk, rng, shape, training):
    c = shape[1]
    x = f32(rng, *shape, scale=2.0, shift=0.7)
    gamma, beta = f32(rng, c), f32(rng, c)
    rm0, rv0 = f32(rng, c), np.abs(f32(rng, c)) + 0.5
    momentum, eps = 0.1, 1e-5
    got, want = compare(bk, "batchnorm_forward", [x, gamma, beta, rm0, rv0, momentum, eps, training],
                        "batchnorm_backward", rng.integers(1 << 30), accum=[(c,), (c,)], mutable=(3, 4))
    axes = (0,) if len(shape) == 2 else (0, 2, 3)
    if training:
        # running statistics as PyTorch: EMA with the unbiased batch variance
        m = x.size // c
        rm = (1 - momentum) * rm0 + momentum * x.mean(axis=axes)
        rv = (1 - momentum) * rv0 + momentum * x.var(axis=axes) * m / (m - 1)
        y = (x - x.mean(axis=axes, keepdims=True)) / np.sqrt(x.var(axis=axes, keepdims=True) + eps)
    else:
        rm, rv = rm0, rv0       # eval leaves them alone
        bc = (1, c) + (1,) * (len(shape) - 2)
        y = (x - rm0.reshape(bc)) / np.sqrt(rv0.reshape(bc) + eps)
    bc = (1, c) + (1,) * (len(shape) - 2)
    y = y * gamma.reshape(bc) + beta.reshape(bc)
    assert_close(want["y"], y, np.float64, "reference batchnorm y by formula")
    for out, dt in ((want, np.float64), (got, bk.dtype)):
        assert_close(out["mutable"][0], rm, dt, "running_mean")
        assert_close(out["mutable"][1], rv, dt, "running_var")


@pytest.mark.parametrize("skip", ["dgamma", "dbeta", "both"])
@pytest.mark.parametrize("op,shape", [("batchnorm", (5, 3)), ("batchnorm", (1, 2, 3, 4)), ("batchnorm", (3, 4, 5, 2)),
                                      ("bn_gelu", (3, 4, 5, 2)), ("bn_relu", (3, 4, 5, 2)),
                                      ("bn_relu_maxpool", (3, 4, 6, 5))], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batchnorm_without_dgamma_or_dbeta(bk, rng, op, shape, skip, training):
    """dgamma or dbeta None (a frozen or constant parameter): that gradient is not computed; dx and the other
    gradient are those of a backward that computes both, bit for bit on the same backend."""
    c = shape[1]
    args = [f32(rng, *shape, scale=2.0, shift=0.7), np.abs(f32(rng, c)) + 0.5, f32(rng, c), f32(rng, c),
            np.abs(f32(rng, c)) + 0.5, 0.1, 1e-5, training] + ([2, 2] if op == "bn_relu_maxpool" else [])
    seed = rng.integers(1 << 30)
    accum = [None if skip in ("dgamma", "both") else (c,), None if skip in ("dbeta", "both") else (c,)]
    got, _ = compare(bk, f"{op}_forward", args, f"{op}_backward", seed, accum=accum, mutable=(3, 4))
    full = run(bk, f"{op}_forward", args, f"{op}_backward", np.random.default_rng(seed), accum=[(c,), (c,)],
               mutable=(3, 4))
    np.testing.assert_array_equal(got["dx"], full["dx"])
    assert np.any(full["dx"] != 0)
    for i, shape_or_none in enumerate(accum):
        if shape_or_none is None:
            assert got["acc"][i] is None
        else:
            np.testing.assert_array_equal(got["acc"][i], full["acc"][i])


# --- dropout -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9])
@pytest.mark.parametrize("shape", [(1, 1), (4, 33), (2, 3, 5, 4)])
def test_dropout(bk, rng, p, shape):
    seed = int(rng.integers(0, 2**32))
    x = f32(rng, *shape) + 3.0      # no zeros in x, so zeros in y are exactly the dropped elements
    got, want = compare(bk, "dropout_forward", [x, p, seed], "dropout_backward", rng.integers(1 << 30))
    keep = (counter_uniform(seed, x.size) >= p).reshape(shape)
    np.testing.assert_array_equal(got["y"] != 0, keep, err_msg="mask differs from counter_uniform")
    np.testing.assert_array_equal(want["y"] != 0, keep, err_msg="reference mask differs from counter_uniform")
    np.testing.assert_array_equal(got["dx"] == 0, ~keep, err_msg="dropout_backward mask")
    if p == 0.0:
        np.testing.assert_array_equal(got["y"], x.astype(bk.dtype), err_msg="p=0 must be the identity")


def test_dropout_rate_and_scale(bk):
    x = np.ones((100, 100))
    y, _ = bk.dropout_forward(bk.asarray(x), 0.3, 12345)
    y = bk.to_numpy(y)
    assert abs((y == 0).mean() - 0.3) < 0.02
    np.testing.assert_allclose(y[y != 0], 1 / 0.7, rtol=1e-6)


@pytest.mark.parametrize("name", ["reference"] + BACKENDS)
def test_dropout_layer_eval_is_identity(name, rng):
    import hetnet as hn

    b = get_backend(name)
    layer = hn.Dropout(0.5).to(name).eval()
    x = b.asarray(f32(rng, 3, 8))
    y = layer.forward(x)
    np.testing.assert_array_equal(b.to_numpy(y), b.to_numpy(x))
    np.testing.assert_array_equal(b.to_numpy(layer.backward(x)), b.to_numpy(x))


# --- losses ------------------------------------------------------------------------------------------------------


def _loss_both(b, fn, args):
    """fn on b and on the reference with the same arguments (float arrays moved, int arrays as labels); checks
    that no input changed. Returns (b's result, reference result)."""
    out = {}
    for be in (b, ref):
        dev = [be.asarray(a) if isinstance(a, np.ndarray) and a.dtype.kind == "f" else
               (be.labels(a) if isinstance(a, np.ndarray) else a) for a in args]
        before = [be.to_numpy(d).copy() if hasattr(d, "shape") else None for d in dev]
        res = getattr(be, fn)(*dev)
        for d, bf in zip(dev, before):
            if bf is not None:
                np.testing.assert_array_equal(be.to_numpy(d), bf, err_msg=f"{fn} modified an input")
        out[be.name] = res
    return out[b.name], out["reference"]


@pytest.mark.parametrize("n,k", [(1, 2), (5, 10), (16, 3)])
@pytest.mark.parametrize("ls", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("scale", [1.0, 50.0, 1e4])
def test_softmax_cross_entropy(bk, rng, n, k, ls, scale):
    z, lab = f32(rng, n, k, scale=scale), rng.integers(0, k, size=n)
    (loss, dz), (rloss, rdz) = _loss_both(bk, "softmax_cross_entropy", [z, lab, ls])
    assert isinstance(loss, float) and np.isfinite(loss)
    # a confident right answer has a loss below float32 resolution: compare relative to max(loss, 1)
    assert abs(loss - rloss) <= RTOL[np.dtype(bk.dtype)] * max(1.0, abs(rloss)), f"loss {loss} vs {rloss}"
    # dlogits = (softmax - t) / N is a difference of numbers in [0, 1] that may cancel (a near one-hot softmax, or
    # softmax close to a smoothed t), so compare in units of its natural scale 1/N, not relative to its norm
    assert np.abs(bk.to_numpy(dz) - rdz).max() <= RTOL[np.dtype(bk.dtype)] / n, "dlogits"
    # reference by its definition: t = (1-ls) onehot + ls/K; loss = mean -sum t log softmax; dz = (softmax - t)/N
    t = np.full((n, k), ls / k)
    t[np.arange(n), lab] += 1 - ls
    zs = z - z.max(axis=1, keepdims=True)
    logp = zs - np.log(np.exp(zs).sum(axis=1, keepdims=True))
    assert_close(np.array(rloss), np.array(-(t * logp).sum() / n), np.float64, "reference loss by definition")
    assert_close(rdz, (np.exp(logp) - t) / n, np.float64, "reference dlogits by definition")


def test_softmax_cross_entropy_stats(bk, rng):
    z, lab = f32(rng, 13, 6), rng.integers(0, 6, size=13)
    (s, c), (rs, rc) = _loss_both(bk, "softmax_cross_entropy_stats", [z, lab])
    assert isinstance(c, int) and c == rc == int((z.argmax(axis=1) == lab).sum())
    assert_close(np.array(s), np.array(rs), bk, "loss sum")
    rloss, _ = ref.softmax_cross_entropy(z, lab)
    assert_close(np.array(rs), np.array(rloss * 13), np.float64, "stats loss sum = N * mean loss")


@pytest.mark.parametrize("shape", [(1, 1), (6, 1), (4, 5)])
@pytest.mark.parametrize("scale", [1.0, 30.0, 1e4])
def test_binary_cross_entropy_with_logits(bk, rng, shape, scale):
    z, t = f32(rng, *shape, scale=scale), rng.uniform(size=shape).astype(np.float32).astype(np.float64)
    t[..., 0] = np.round(t[..., 0])         # some hard 0/1 targets too
    (loss, dz), (rloss, rdz) = _loss_both(bk, "binary_cross_entropy_with_logits", [z, t])
    assert isinstance(loss, float) and np.isfinite(loss) and np.all(np.isfinite(bk.to_numpy(dz)))
    assert_close(np.array(loss), np.array(rloss), bk, "loss")
    # sigmoid(z) - t may cancel (saturated sigmoids, or sigmoid close to t), so compare in units of the gradient's
    # natural scale 1/size instead of relative to a norm that may itself be ~1e-14
    assert np.abs(bk.to_numpy(dz) - rdz).max() <= RTOL[np.dtype(bk.dtype)] / z.size, "dlogits"


def test_binary_cross_entropy_large_logits_exact(bk):
    """|z| = 1000: the naive formula overflows; the stable one gives max(z,0) - z t exactly."""
    z = np.array([[1000.0, -1000.0, 1000.0, -1000.0]])
    t = np.array([[1.0, 0.0, 0.0, 1.0]])
    loss, dz = bk.binary_cross_entropy_with_logits(bk.asarray(z), bk.asarray(t))
    assert loss == pytest.approx((0 + 0 + 1000 + 1000) / 4)
    np.testing.assert_allclose(bk.to_numpy(dz), [[0.0, 0.0, 0.25, -0.25]], atol=1e-7)


# --- optimiser updates -------------------------------------------------------------------------------------------


def _update_both(b, fn, arrays, n_steps, kwargs_of_step, rng):
    """Apply fn n_steps times on both backends with the same gradients; return the final arrays per backend."""
    grads = [f32(rng, *arrays[0].shape) for _ in range(n_steps)]
    out = {}
    for be in (b, ref):
        dev = [be.asarray(a) if a is not None else None for a in arrays]
        for i, g in enumerate(grads):
            gd = be.asarray(g)
            getattr(be, fn)(dev[0], gd, *dev[1:], **kwargs_of_step(i))
            np.testing.assert_array_equal(be.to_numpy(gd), g.astype(be.dtype), err_msg=f"{fn} modified g")
        out[be.name] = [be.to_numpy(d) for d in dev if d is not None]
    for i, (g, w) in enumerate(zip(out[b.name], out["reference"])):
        assert_close(g, w, b, f"{fn} array {i}")
    return out


@pytest.mark.parametrize("momentum,dampening,nesterov,wd", [
    (0.0, 0.0, False, 0.0), (0.0, 0.0, False, 0.01), (0.9, 0.0, False, 0.0), (0.9, 0.0, True, 5e-4),
    (0.5, 0.3, False, 0.1)])
def test_sgd_update(bk, rng, momentum, dampening, nesterov, wd):
    p = f32(rng, 37)
    buf = np.zeros(37) if momentum else None
    _update_both(bk, "sgd_update", [p, buf], 4,
                 lambda i: {"lr": 0.1, "momentum": momentum, "dampening": dampening, "nesterov": nesterov,
                            "weight_decay": wd, "first_step": i == 0}, rng)


@pytest.mark.parametrize("wd,decoupled", [(0.0, False), (0.1, False), (0.01, True)])
def test_adam_update(bk, rng, wd, decoupled):
    p = f32(rng, 4, 9)
    _update_both(bk, "adam_update", [p, np.zeros((4, 9)), np.zeros((4, 9))], 4,
                 lambda i: {"step": i + 1, "lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8,
                            "weight_decay": wd, "decoupled": decoupled}, rng)


# --- conversions -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["reference"] + BACKENDS)
def test_conversions(name):
    b = get_backend(name)
    a = np.arange(6, dtype=np.int32).reshape(2, 3)
    d = b.asarray(a)
    assert d.dtype == b.dtype and d.shape == (2, 3)
    h = b.to_numpy(d)
    assert isinstance(h, np.ndarray) and h.dtype == b.dtype
    np.testing.assert_array_equal(h, a)
    a[0, 0] = 99                                   # asarray copied
    assert b.to_numpy(d)[0, 0] == 0
    z = b.zeros((3, 2))
    assert z.dtype == b.dtype and not b.to_numpy(z).any()
    lab = b.labels(np.array([1, 0, 2], dtype=np.uint8))
    assert np.dtype(lab.dtype).kind == "i" and b.to_numpy(lab).tolist() == [1, 0, 2]
    b.synchronize()


# --- backward accumulates ----------------------------------------------------------------------------------------


ACCUM_CASES = {
    "dense": (lambda r: [f32(r, 3, 5), f32(r, 4, 5), f32(r, 4)], [(4, 5), (4,)]),
    "conv2d": (lambda r: [f32(r, 2, 3, 6, 5), f32(r, 4, 3, 3, 3), f32(r, 4), 2, 1], [(4, 3, 3, 3), (4,)]),
    "batchnorm": (lambda r: [f32(r, 4, 3, 2, 2), f32(r, 3), f32(r, 3), np.zeros(3), np.ones(3), 0.1, 1e-5, True],
                  [(3,), (3,)]),
}


@pytest.mark.parametrize("name", ["reference"] + BACKENDS)
@pytest.mark.parametrize("op", sorted(ACCUM_CASES))
def test_backward_adds_into_gradients(name, op, rng):
    """Two backward calls on the same cache give twice the gradient (dw += ..., PyTorch semantics), and a
    pre-filled accumulator keeps its value."""
    b = get_backend(name)
    make, shapes = ACCUM_CASES[op]
    args = [b.asarray(a) if isinstance(a, np.ndarray) else a for a in make(rng)]
    y, cache = getattr(b, f"{op}_forward")(*args)
    dy = b.asarray(f32(rng, *b.to_numpy(y).shape))
    once = [b.zeros(s) for s in shapes]
    getattr(b, f"{op}_backward")(dy, cache, *once)
    twice = [b.zeros(s) for s in shapes]
    getattr(b, f"{op}_backward")(dy, cache, *twice)
    getattr(b, f"{op}_backward")(dy, cache, *twice)
    start = [f32(rng, *s) for s in shapes]
    prefilled = [b.asarray(s) for s in start]
    getattr(b, f"{op}_backward")(dy, cache, *prefilled)
    for o, t, s, p in zip(once, twice, start, prefilled):
        o = b.to_numpy(o)
        assert np.abs(o).max() > 0
        assert_close(b.to_numpy(t), 2 * o, b, f"{op}: second backward must add")
        assert_close(b.to_numpy(p), s + o, b, f"{op}: backward must add to the existing gradient")


# --- activations inside ops, ReLU masks, fused ops (backends.compose defines each; see hetnet.plan) -------------


def relu_out(rng, *shape):
    """A ReLU output: float32-exact values, about half of them exact zeros."""
    return np.maximum(f32(rng, *shape), 0.0)


@pytest.mark.parametrize("mask", [False, True], ids=["plain", "relu-input"])
@pytest.mark.parametrize("act", [None, "relu"])
def test_dense_act_and_relu_mask(bk, rng, act, mask):
    x = relu_out(rng, 5, 13) if mask else f32(rng, 5, 13)
    got, _ = compare(bk, "dense_forward", [x, f32(rng, 4, 13), f32(rng, 4)], "dense_backward", rng.integers(1 << 30),
                     accum=[(4, 13), (4,)], fwd_kw={"act": act}, bwd_kw={"relu_mask": mask})
    if act:
        assert got["y"].min() == 0.0 and got["y"].max() > 0
    if mask:
        assert np.all(got["dx"][x == 0] == 0) and np.any(got["dx"] != 0)


@pytest.mark.parametrize("mask", [False, True], ids=["plain", "relu-input"])
@pytest.mark.parametrize("act", [None, "relu"])
@pytest.mark.parametrize("case", [(2, 3, 7, 6, 4, 3, 1, 1), (1, 2, 9, 8, 5, 3, 2, 0), (3, 4, 5, 5, 3, 1, 1, 0)],
                         ids=lambda c: "N{}C{}H{}W{}K{}k{}s{}p{}".format(*c))
def test_conv2d_act_and_relu_mask(bk, rng, case, act, mask):
    n, c, h, w_, k, ks, stride, pad = case
    x = relu_out(rng, n, c, h, w_) if mask else f32(rng, n, c, h, w_)
    got, _ = compare(bk, "conv2d_forward", [x, f32(rng, k, c, ks, ks), f32(rng, k), stride, pad], "conv2d_backward",
                     rng.integers(1 << 30), accum=[(k, c, ks, ks), (k,)], fwd_kw={"act": act},
                     bwd_kw={"relu_mask": mask})
    if mask:
        assert np.all(got["dx"][x == 0] == 0)


@pytest.mark.parametrize("case", POOL_CASES, ids=lambda c: "N{}C{}H{}W{}k{}s{}".format(*c))
def test_maxpool_relu_mask(bk, rng, case):
    n, c, h, w, ks, stride = case
    x = relu_out(rng, n, c, h, w)
    x[0, 0, :ks, :ks] = 0.0                  # a window of zeros: its maximum is 0, its gradient masked
    got, _ = compare(bk, "maxpool2d_forward", [x, ks, stride], "maxpool2d_backward", rng.integers(1 << 30),
                     bwd_kw={"relu_mask": True})
    assert np.all(got["dx"][x == 0] == 0)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(6, 3), (2, 3, 5, 4)], ids=str)
@pytest.mark.parametrize("act,mask,need_dx", [("relu", False, True), (None, True, True), ("relu", True, False)])
def test_batchnorm_act_relu_mask_need_dx(bk, rng, shape, training, act, mask, need_dx):
    c = shape[1]
    x = relu_out(rng, *shape) * 2 if mask else f32(rng, *shape, scale=2.0, shift=0.7)
    compare(bk, "batchnorm_forward", [x, f32(rng, c), f32(rng, c), f32(rng, c), np.abs(f32(rng, c)) + 0.5, 0.1, 1e-5,
                                      training], "batchnorm_backward", rng.integers(1 << 30), accum=[(c,), (c,)],
            mutable=(3, 4), fwd_kw={"act": act}, bwd_kw={"relu_mask": mask, "need_dx": need_dx})


def test_relu_mask_op(bk, rng):
    x, dx = relu_out(rng, 3, 17), f32(rng, 3, 17)
    got = bk.to_numpy(bk.relu_mask(bk.asarray(dx), bk.asarray(x)))
    np.testing.assert_array_equal(got, np.where(x > 0, dx, 0.0).astype(bk.dtype))
    np.testing.assert_array_equal(ref.relu_mask(dx, x), np.where(x > 0, dx, 0.0))


FUSED_CONV_CASES = [  # (N, C, H, W, K, kernel, stride, padding, bias, pool kernel, pool stride)
    (2, 3, 8, 8, 4, 3, 1, 1, True, 2, 2),       # the presets' block
    (1, 2, 9, 11, 3, 3, 1, 1, False, 2, 2),     # odd sizes: the pool floors, a row / column no window covers
    (3, 4, 13, 10, 5, 5, 2, 2, True, 2, 2),     # stride 2, kernel 5
    (2, 1, 12, 12, 3, 1, 1, 0, True, 3, 2),     # 1x1 kernel, overlapping pool windows
    (2, 2, 7, 7, 6, 3, 1, 0, True, 2, 1),       # pool stride 1
    (1, 3, 6, 6, 2, 3, 3, 2, True, 2, 2),       # stride 3, padding 2
    (2, 2, 5, 5, 3, 3, 1, 0, True, 2, 2),       # a 3x3 conv output: one row and column left over
]


@pytest.mark.parametrize("mask,need_dx", [(False, True), (True, True), (False, False)])
@pytest.mark.parametrize("case", FUSED_CONV_CASES, ids=lambda c: "N{}C{}H{}W{}K{}k{}s{}p{}b{:d}-pool{}s{}".format(*c))
def test_conv2d_relu_maxpool(bk, rng, case, mask, need_dx):
    n, c, h, w_, k, ks, stride, pad, bias, pk, ps = case
    x = relu_out(rng, n, c, h, w_) if mask else f32(rng, n, c, h, w_)
    w = f32(rng, k, c, ks, ks) * 0.5
    w[0], w[-1] = -np.abs(w[0]), np.abs(w[-1])     # of a ReLU input: filter 0 is cut everywhere, the last passes
    x, w = product_inputs(bk, x, w)
    b = f32(rng, k) * 0.1
    b[0], b[-1] = -3.0, 1.0
    got, want = compare(bk, "conv2d_relu_maxpool_forward", [x, w, b if bias else None, stride, pad, pk, ps],
                        "conv2d_relu_maxpool_backward", rng.integers(1 << 30),
                        accum=[(k, c, ks, ks), (k,) if bias else None], bwd_kw={"relu_mask": mask, "need_dx": need_dx})
    p = ((h + 2 * pad - ks) // stride + 1 - pk) // ps + 1
    assert got["y"].shape[2] == p and np.any(got["y"] > 0)
    if mask:
        assert np.all(got["y"][:, 0] == 0)


@pytest.mark.parametrize("mask,need_dx", [(False, True), (True, True), (False, False)])
@pytest.mark.parametrize("case", FUSED_CONV_CASES, ids=lambda c: "N{}C{}H{}W{}K{}k{}s{}p{}b{:d}-pool{}s{}".format(*c))
def test_conv2d_maxpool(bk, rng, case, mask, need_dx):
    """maxpool2d(conv2d(x)) against the reference's two ops; relu_mask given to the forward as to the backward."""
    n, c, h, w_, k, ks, stride, pad, bias, pk, ps = case
    x = relu_out(rng, n, c, h, w_) if mask else f32(rng, n, c, h, w_)
    w, b = f32(rng, k, c, ks, ks) * 0.5, f32(rng, k) * 0.1
    x, w = product_inputs(bk, x, w)
    got, _ = compare(bk, "conv2d_maxpool_forward", [x, w, b if bias else None, stride, pad, pk, ps],
                     "conv2d_maxpool_backward", rng.integers(1 << 30), accum=[(k, c, ks, ks), (k,) if bias else None],
                     fwd_kw={"relu_mask": mask}, bwd_kw={"relu_mask": mask, "need_dx": need_dx})
    if mask and need_dx:
        assert np.all(got["dx"][x == 0] == 0)


CONV_GELU_CASES = [  # (N, C, H, W, K, kernel, stride, padding, bias)
    (2, 3, 8, 8, 8, 2, 1, 0, True),             # airbench's whitening layer, small
    (1, 2, 9, 11, 3, 3, 1, 1, False),           # odd sizes, K not a multiple of 8
    (3, 4, 13, 10, 16, 5, 2, 2, True),          # stride 2, kernel 5
]


@pytest.mark.parametrize("mask,need_dx", [(False, True), (True, True), (False, False)])
@pytest.mark.parametrize("case", CONV_GELU_CASES, ids=lambda c: "N{}C{}H{}W{}K{}k{}s{}p{}b{:d}".format(*c))
def test_conv2d_gelu(bk, rng, case, mask, need_dx):
    """gelu(conv2d(x)) against the reference's two ops: y on both sides of GELU's curve, dx, dw, db."""
    n, c, h, w_, k, ks, stride, pad, bias = case
    x = relu_out(rng, n, c, h, w_) if mask else f32(rng, n, c, h, w_)
    w, b = f32(rng, k, c, ks, ks) * 0.5, f32(rng, k) * 0.5
    got, _ = compare(bk, "conv2d_gelu_forward", [x, w, b if bias else None, stride, pad], "conv2d_gelu_backward",
                     rng.integers(1 << 30), accum=[(k, c, ks, ks), (k,) if bias else None],
                     fwd_kw={"relu_mask": mask}, bwd_kw={"relu_mask": mask, "need_dx": need_dx})
    assert np.any(got["y"] < 0) and np.any(got["y"] > 1)
    if mask and need_dx:
        assert np.all(got["dx"][x == 0] == 0)


@pytest.mark.parametrize("mask,need_dx", [(False, True), (True, True), (False, False)])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", [(3, 4, 8, 8, 2, 2), (2, 3, 9, 7, 3, 2), (2, 2, 6, 5, 2, 1), (1, 3, 7, 5, 2, 2)],
                         ids=lambda c: "N{}C{}H{}W{}-pool{}s{}".format(*c))
def test_bn_relu_maxpool(bk, rng, case, training, mask, need_dx):
    n, c, h, w, pk, ps = case
    x = relu_out(rng, n, c, h, w) * 2 if mask else f32(rng, n, c, h, w, scale=2.0, shift=0.5)
    compare(bk, "bn_relu_maxpool_forward",
            [x, np.abs(f32(rng, c)) + 0.5, f32(rng, c) * 0.3, f32(rng, c), np.abs(f32(rng, c)) + 0.5, 0.1, 1e-5,
             training, pk, ps], "bn_relu_maxpool_backward", rng.integers(1 << 30), accum=[(c,), (c,)],
            mutable=(3, 4), bwd_kw={"relu_mask": mask, "need_dx": need_dx})


def _bn_gelu_args(rng, c, training):
    """gamma with a zero, a small and a negative entry, beta shifting z across GELU's curve (channel 0: z = -1,
    where GELU is negative; channel 1: z near 3), running statistics. c >= 3."""
    gamma, beta = f32(rng, c) * 1.5, f32(rng, c) * 0.8
    gamma[0], gamma[1], gamma[-1] = 0.0, 0.125, -abs(gamma[-1]) - 0.5
    beta[0], beta[1] = -1.0, 3.0
    return [beta, f32(rng, c), np.abs(f32(rng, c)) + 0.5, 0.1, 1e-5, training], gamma


@pytest.mark.parametrize("mask,need_dx", [(False, True), (True, True), (False, False)])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(6, 3), (2, 3, 5, 4), (3, 4, 7, 5)], ids=str)
def test_bn_gelu(bk, rng, shape, training, mask, need_dx):
    """gelu(batchnorm(x)) against the reference's two ops: y, dx, dgamma, dbeta, running statistics."""
    c = shape[1]
    x = relu_out(rng, *shape) * 2 if mask else f32(rng, *shape, scale=2.0, shift=0.7)
    rest, gamma = _bn_gelu_args(rng, c, training)
    got, _ = compare(bk, "bn_gelu_forward", [x, gamma, *rest], "bn_gelu_backward", rng.integers(1 << 30),
                     accum=[(c,), (c,)], mutable=(3, 4), bwd_kw={"relu_mask": mask, "need_dx": need_dx})
    assert np.any(got["y"] < 0) and np.any(got["y"] > 1)       # both sides of GELU's curve
    if mask and need_dx:
        assert np.all(got["dx"][x == 0] == 0)


@pytest.mark.parametrize("mask,need_dx", [(False, True), (True, True), (False, False)])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(6, 3), (2, 3, 5, 4), (3, 70, 7, 5)], ids=str)
def test_bn_relu(bk, rng, shape, training, mask, need_dx):
    """relu(batchnorm(x)) owning the ReLU's derivative against the reference's two ops (batchnorm_forward,
    relu_forward): y, dx, dgamma, dbeta, running statistics; both signs of z in every channel but the one whose
    gamma is 0 (z = beta there: -1, all masked)."""
    c = shape[1]
    x = relu_out(rng, *shape) * 2 if mask else f32(rng, *shape, scale=2.0, shift=0.7)
    rest, gamma = _bn_gelu_args(rng, c, training)
    got, _ = compare(bk, "bn_relu_forward", [x, gamma, *rest], "bn_relu_backward", rng.integers(1 << 30),
                     accum=[(c,), (c,)], mutable=(3, 4), bwd_kw={"relu_mask": mask, "need_dx": need_dx})
    assert np.any(got["y"] == 0) and np.any(got["y"] > 1)
    if need_dx:
        assert np.any(got["dx"] != 0)
    if mask and need_dx:
        assert np.all(got["dx"][x == 0] == 0)


@pytest.mark.parametrize("op", ["bn_gelu", "bn_relu"])
@pytest.mark.parametrize("shape", [(5, 3), (3, 4, 7, 5)], ids=str)
def test_bn_act_inplace_and_without_dgamma(bk, rng, shape, op):
    """dgamma None and inplace (dx over x) change nothing else: dx and dbeta bit for bit those of the plain call
    (bn_gelu_backward, bn_relu_backward)."""
    c = shape[1]
    x = f32(rng, *shape, scale=2.0, shift=0.7)
    rest, gamma = _bn_gelu_args(rng, c, True)
    dy = bk.asarray(f32(rng, *shape))
    out = []
    for inplace, with_dgamma in ((False, True), (True, False)):
        xd = bk.asarray(x)
        _, cache = getattr(bk, op + "_forward")(xd, bk.asarray(gamma),
                                                *[bk.asarray(a) if isinstance(a, np.ndarray) else a for a in rest])
        dgamma, dbeta = (bk.zeros((c,)) if with_dgamma else None), bk.zeros((c,))
        dx = getattr(bk, op + "_backward")(dy, cache, dgamma, dbeta, inplace=inplace)
        out.append((bk.to_numpy(dx).copy(), bk.to_numpy(dbeta)))
    np.testing.assert_array_equal(out[1][0], out[0][0])
    np.testing.assert_array_equal(out[1][1], out[0][1])


CHAINS = [  # (batch, [(in, out, bias, ReLU after)])
    (1, [(7, 5, True, True), (5, 3, True, False)]),
    (6, [(9, 8, True, True), (8, 4, False, True), (4, 3, True, False)]),
    (33, [(20, 11, False, False), (11, 6, True, True)]),         # no ReLU between; the chain ends with one
    (70, [(40, 130, True, True), (130, 10, True, False)]),
]


@pytest.mark.parametrize("mask", [False, True], ids=["plain", "relu-input"])
@pytest.mark.parametrize("accumulate", [True, False])
@pytest.mark.parametrize("case", CHAINS, ids=lambda c: f"N{c[0]}-" + "-".join(f"{f}x{k}" for f, k, _, _ in c[1]))
def test_dense_chain(bk, rng, case, accumulate, mask):
    """dense_chain_* against the reference's chain of dense ops; the gradients are added to what the buffers hold
    (accumulate) or written over it (the buffers start non-zero)."""
    n, spec = case
    x = relu_out(rng, n, spec[0][0]) if mask else f32(rng, n, spec[0][0])
    layers = [(f32(rng, k, f) * 0.5, f32(rng, k) * 0.1 if bias else None, relu) for f, k, bias, relu in spec]
    start = [(f32(rng, k, f), f32(rng, k) if bias else None) for f, k, bias, _ in spec]
    dy_rng = np.random.default_rng(int(rng.integers(1 << 30)))
    dy = f32(dy_rng, n, spec[-1][1])
    out = {}
    for be in (bk, ref):
        dev = [(be.asarray(w), None if b is None else be.asarray(b), r) for w, b, r in layers]
        y, cache = be.dense_chain_forward(be.asarray(x), dev)
        grads = [(be.asarray(dw), None if db is None else be.asarray(db)) for dw, db in start]
        dx = be.dense_chain_backward(be.asarray(dy), cache, grads, need_dx=True, relu_mask=mask,
                                     accumulate=accumulate)
        out[be.name] = (be.to_numpy(y), be.to_numpy(dx), [[None if g is None else be.to_numpy(g) for g in pair]
                                                          for pair in grads])
        assert be.dense_chain_backward(be.asarray(dy), cache, grads, need_dx=False) is None
    (y, dx, g), (ry, rdx, rg) = out[bk.name], out["reference"]
    assert_close(y, ry, bk, "y")
    assert_close(dx, rdx, bk, "dx")
    for i, ((dw, db), (rdw, rdb)) in enumerate(zip(g, rg)):
        assert_close(dw, rdw, bk, f"dw{i}")
        if db is not None:
            assert_close(db, rdb, bk, f"db{i}")
    if mask:
        assert np.all(dx[x == 0] == 0)


# --- dw None: a frozen weight's gradient is not computed (layers.base.Parameter.grad_target) --------------------


def same(got, want, b, what: str) -> None:
    """Bit for bit on the deterministic backends; within tolerance on cuda (its split sums add with atomics, and
    the bias gradient may come from another kernel when there is no filter gradient to fuse it with)."""
    if b.name in ("reference", "cpu"):
        np.testing.assert_array_equal(got, want, err_msg=what)
    else:
        assert_close(got, want, b, what)


WITHOUT_DW = {  # name: (op, forward args from rng, dw shape, db shape or None, forward kwargs, backward kwargs)
    "dense": ("dense", lambda r: [f32(r, 5, 13), f32(r, 4, 13), f32(r, 4)], (4, 13), (4,), {}, {}),
    "dense-relu-no-bias": ("dense", lambda r: [relu_out(r, 6, 9), f32(r, 3, 9), None], (3, 9), None,
                           {"act": "relu"}, {"relu_mask": True}),
    "dense-no-dx": ("dense", lambda r: [f32(r, 3, 5), f32(r, 4, 5), f32(r, 4)], (4, 5), (4,), {}, {"need_dx": False}),
    "conv": ("conv2d", lambda r: [f32(r, 1, 3, 7, 5), f32(r, 4, 3, 3, 3), f32(r, 4), 1, 1], (4, 3, 3, 3), (4,), {},
             {}),
    "conv-stride2-no-bias": ("conv2d", lambda r: [f32(r, 2, 2, 9, 6), f32(r, 3, 2, 3, 3), None, 2, 0], (3, 2, 3, 3),
                             None, {}, {}),
    "conv-1x1-relu": ("conv2d", lambda r: [relu_out(r, 3, 4, 5, 5), f32(r, 3, 4, 1, 1), f32(r, 3), 1, 0], (3, 4, 1, 1),
                      (3,), {"act": "relu"}, {"relu_mask": True}),
    "conv-no-dx": ("conv2d", lambda r: [f32(r, 2, 3, 6, 5), f32(r, 4, 3, 3, 3), f32(r, 4), 2, 1], (4, 3, 3, 3), (4,),
                   {}, {"need_dx": False}),
    "conv-relu-pool": ("conv2d_relu_maxpool", lambda r: [f32(r, 2, 3, 8, 8), f32(r, 4, 3, 3, 3) * 0.5,
                                                         f32(r, 4) * 0.1, 1, 1, 2, 2], (4, 3, 3, 3), (4,), {}, {}),
    "conv-relu-pool-masked-no-bias": ("conv2d_relu_maxpool", lambda r: [relu_out(r, 1, 2, 9, 11), f32(r, 3, 2, 3, 3),
                                                                        None, 1, 1, 2, 2], (3, 2, 3, 3), None, {},
                                      {"relu_mask": True}),
    "conv-relu-pool-3s2": ("conv2d_relu_maxpool", lambda r: [f32(r, 2, 1, 12, 12), f32(r, 3, 1, 1, 1), f32(r, 3), 1, 0,
                                                             3, 2], (3, 1, 1, 1), (3,), {}, {}),
    "conv-relu-pool-no-dx": ("conv2d_relu_maxpool", lambda r: [f32(r, 3, 4, 13, 10), f32(r, 5, 4, 5, 5) * 0.5,
                                                               f32(r, 5) * 0.1, 2, 2, 2, 2], (5, 4, 5, 5), (5,), {},
                             {"need_dx": False}),
}


@pytest.mark.parametrize("name", sorted(WITHOUT_DW))
def test_backward_without_dw(bk, rng, name):
    """dw None (a frozen weight): dE/dw is not computed, and dx and db are those of the same backward given a dw
    array -- on this backend and on the reference, which the None run is also compared with."""
    op, make, dw_shape, db_shape, fwd_kw, bwd_kw = WITHOUT_DW[name]
    args, seed = make(rng), rng.integers(1 << 30)
    if op.endswith("maxpool"):
        args[:2] = product_inputs(bk, *args[:2])
    kw = {"fwd_kw": fwd_kw, "bwd_kw": bwd_kw}
    got, want = compare(bk, f"{op}_forward", args, f"{op}_backward", seed, accum=[None, db_shape], **kw)
    for b, skipped in ((bk, got), (ref, want)):
        full = run(b, f"{op}_forward", args, f"{op}_backward", np.random.default_rng(seed),
                   accum=[dw_shape, db_shape], **kw)
        assert skipped["acc"][0] is None and np.abs(full["acc"][0]).max() > 0
        if bwd_kw.get("need_dx", True):
            assert np.any(full["dx"] != 0)
            same(skipped["dx"], full["dx"], b, f"{b.name} {op} dx without dw")
        else:
            assert skipped["dx"] is None
        if db_shape is not None:
            assert np.abs(full["acc"][1]).max() > 0
            same(skipped["acc"][1], full["acc"][1], b, f"{b.name} {op} db without dw")


@pytest.mark.parametrize("accumulate", [True, False])
def test_dense_chain_without_dw(bk, rng, accumulate):
    """grads entries with dw None: layer 0 (bias trained), layer 1 (no bias: nothing of its own computed); the
    chain's dx and the other gradients are those with every dw an array, and accumulate=False leaves alone the
    None entries (it does not try to zero them)."""
    n, spec = 6, [(9, 8, True, True), (8, 4, False, True), (4, 3, True, False)]
    frozen = [True, True, False]
    x = f32(rng, n, 9)
    layers = [(f32(rng, k, f) * 0.5, f32(rng, k) * 0.1 if bias else None, relu) for f, k, bias, relu in spec]
    start = [(f32(rng, k, f), f32(rng, k) if bias else None) for f, k, bias, _ in spec]
    dy = f32(rng, n, spec[-1][1])
    out = {}
    for be in (bk, ref):
        for skip in (False, True):
            dev = [(be.asarray(w), None if b is None else be.asarray(b), r) for w, b, r in layers]
            _, cache = be.dense_chain_forward(be.asarray(x), dev)
            grads = [(None if skip and fr else be.asarray(dw), None if db is None else be.asarray(db))
                     for (dw, db), fr in zip(start, frozen)]
            dx = be.dense_chain_backward(be.asarray(dy), cache, grads, need_dx=True, accumulate=accumulate)
            if skip:
                assert grads[0][0] is None and grads[1][0] is None
            out[be.name, skip] = {"dx": be.to_numpy(dx), "db0": be.to_numpy(grads[0][1]),
                                  "dw2": be.to_numpy(grads[2][0]), "db2": be.to_numpy(grads[2][1])}
    for be in (bk, ref):
        assert np.any(out[be.name, False]["dx"] != 0)
        for k, v in out[be.name, True].items():
            same(v, out[be.name, False][k], be, f"{be.name} chain {k} without dw")
    for k, v in out[bk.name, True].items():
        assert_close(v, out["reference", True][k], bk, f"chain {k} without dw, against the reference")


def test_reference_fused_ops_are_their_chains(rng):
    """The oracle of each fused op is literally its chain of reference ops (relu_forward's mask = relu_mask)."""
    x, w, b = rng.normal(size=(2, 3, 7, 6)), rng.normal(size=(4, 3, 3, 3)), rng.normal(size=4)
    y, cache = ref.conv2d_relu_maxpool_forward(x, w, b, 1, 1, 2, 2)
    z, cz = ref.conv2d_forward(x, w, b, 1, 1)
    r, cr = ref.relu_forward(z)
    want, cp = ref.maxpool2d_forward(r, 2, 2)
    np.testing.assert_array_equal(y, want)
    dy = rng.normal(size=y.shape)
    dw, dw2 = np.zeros(w.shape), np.zeros(w.shape)
    dx = ref.conv2d_relu_maxpool_backward(dy, cache, dw, None)
    dx2 = ref.conv2d_backward(ref.relu_backward(ref.maxpool2d_backward(dy, cp), cr), cz, dw2, None)
    assert_close(dx, dx2, np.float64, "dx")
    assert_close(dw, dw2, np.float64, "dw")
    for name, fused, extra, then, then_back in (        # conv2d, then pooling (its 2, 2) or GELU
            ("conv_pool", "conv2d_maxpool", (2, 2), lambda z: ref.maxpool2d_forward(z, 2, 2), ref.maxpool2d_backward),
            ("conv_gelu", "conv2d_gelu", (), ref.gelu_forward, ref.gelu_backward)):
        y, cache = getattr(ref, fused + "_forward")(x, w, b, 1, 1, *extra)
        z, cz = ref.conv2d_forward(x, w, b, 1, 1)
        want, c2 = then(z)
        np.testing.assert_array_equal(y, want)
        dy = rng.normal(size=y.shape)
        dw, dw2 = np.zeros(w.shape), np.zeros(w.shape)
        assert_close(getattr(ref, fused + "_backward")(dy, cache, dw, None),
                     ref.conv2d_backward(then_back(dy, c2), cz, dw2, None), np.float64, f"{name} dx")
        assert_close(dw, dw2, np.float64, f"{name} dw")
    args = [rng.normal(size=3), rng.normal(size=3), np.zeros(3), np.ones(3), 0.1, 1e-5, True]
    y, cache = ref.bn_gelu_forward(x, *args)
    z, cz = ref.batchnorm_forward(x, *args)
    want, cg = ref.gelu_forward(z)
    np.testing.assert_array_equal(y, want)
    dy = rng.normal(size=y.shape)
    dg, dg2, db, db2 = np.zeros(3), np.zeros(3), np.zeros(3), np.zeros(3)
    assert_close(ref.bn_gelu_backward(dy, cache, dg, db), ref.batchnorm_backward(ref.gelu_backward(dy, cg), cz, dg2,
                                                                                  db2), np.float64, "bn_gelu dx")
    assert_close(dg, dg2, np.float64, "dgamma")


@pytest.mark.parametrize("ls", [0.0, 0.2])
def test_softmax_cross_entropy_into(bk, rng, ls):
    """The steps' loss: sums accumulate across calls; dlogits as softmax_cross_entropy's; None: no gradient."""
    z, lab = f32(rng, 9, 5, scale=3.0), rng.integers(0, 5, size=9)
    loss_sum, correct = bk.zeros((1,), np.float64), bk.zeros((1,), np.int64)
    zd, labd = bk.asarray(z), bk.labels(lab)
    d = bk.xp.empty_like(zd)
    bk.softmax_cross_entropy_into(zd, labd, d, loss_sum, correct, ls)
    bk.softmax_cross_entropy_into(zd, labd, None, loss_sum, correct)
    rloss, rd = ref.softmax_cross_entropy(z, lab, ls)
    r0, _ = ref.softmax_cross_entropy(z, lab)
    assert abs(float(bk.to_numpy(loss_sum)[0]) - 9 * (rloss + r0)) <= RTOL[np.dtype(bk.dtype)] * 9 * (rloss + r0)
    assert int(bk.to_numpy(correct)[0]) == 2 * int((z.argmax(axis=1) == lab).sum())
    assert np.abs(bk.to_numpy(d) - rd).max() <= RTOL[np.dtype(bk.dtype)] / 9


def test_dropout_seed_as_array(bk, rng):
    """A seed held in a backend array (what a replayed step fills) gives the mask of the same int seed."""
    seed = int(rng.integers(0, 2**32))
    x = bk.asarray(f32(rng, 4, 33) + 3.0)
    y1, _ = bk.dropout_forward(x, 0.4, seed)
    y2, c2 = bk.dropout_forward(x, 0.4, bk.upload(np.array([seed], dtype=np.uint32)))
    np.testing.assert_array_equal(bk.to_numpy(y1), bk.to_numpy(y2))
    dx = bk.to_numpy(bk.dropout_backward(bk.asarray(np.ones((4, 33))), c2))
    np.testing.assert_array_equal(dx != 0, bk.to_numpy(y1) != 0)


@pytest.mark.parametrize("name", ["reference"] + BACKENDS)
def test_updates_read_scalars_when_given(name, rng):
    """sgd_update / adam_update with `scalars` take lr, the first-step flag and Adam's bias corrections from that
    array, not from their arguments (which are then placeholders)."""
    b = get_backend(name)
    for fn, extra, scalars, real, fake in (
            ("sgd_update", [np.zeros(11)], [0.1, 1.0],
             {"lr": 0.1, "first_step": True}, {"lr": 9.0, "first_step": False}),
            ("adam_update", [np.zeros(11), np.zeros(11)], [0.01, 0.0, 0.01 / (1 - 0.9 ** 3), 1 / (1 - 0.999 ** 3)],
             {"lr": 0.01, "step": 3}, {"lr": 9.0, "step": 1})):
        fixed = ({"momentum": 0.9, "dampening": 0.0, "nesterov": True, "weight_decay": 0.01} if fn == "sgd_update"
                 else {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01, "decoupled": True})
        p0, g = f32(rng, 11), f32(rng, 11)
        out = []
        for kw, sc in ((real, None), (fake, b.asarray(np.array(scalars, dtype=np.float32)))):
            arrays = [b.asarray(a) for a in [p0] + extra]
            getattr(b, fn)(arrays[0], b.asarray(g), *arrays[1:], **kw, **fixed, scalars=sc)
            out.append(b.to_numpy(arrays[0]))
        assert_close(out[1], out[0], np.float32, fn)
