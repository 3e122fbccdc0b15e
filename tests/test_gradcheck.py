"""Float64 central-difference gradient check of every layer (input and parameter gradients) and both losses on the
reference backend. Objective for a layer: L = sum(y * Rw) with fixed random weights Rw, so dL/dy = Rw."""
from __future__ import annotations

import numpy as np
import pytest

import hetnet as hn
from hetnet.backends import reference as ref

from conftest import GRADCHECK_H as H, GRADCHECK_RTOL


def numerical_grad(f, a: np.ndarray) -> np.ndarray:
    """d f / d a by central differences, one element at a time (a is restored afterwards)."""
    g = np.zeros_like(a)
    flat, gflat = a.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + H
        fp = f()
        flat[i] = old - H
        fm = f()
        flat[i] = old
        gflat[i] = (fp - fm) / (2 * H)
    return g


def check(analytic, numeric, what):
    err = np.linalg.norm(analytic - numeric) / max(np.linalg.norm(numeric), 1e-12)
    assert err <= GRADCHECK_RTOL, f"{what}: analytic vs numerical gradient, relative error {err:.3g}"


def away_from_kinks(x: np.ndarray, margin: float = 1e-3) -> np.ndarray:
    """Move values off the ReLU kink at 0 by at least margin (H << margin), so differences do not straddle it."""
    x = x.copy()
    small = np.abs(x) < margin
    x[small] = np.where(x[small] >= 0, margin, -margin) * 5
    return x


def gradcheck_layer(layer, x: np.ndarray, rng, seed: int = 7):
    """Compare layer.backward with central differences of L = sum(forward(x) * Rw), for x and every trainable
    parameter; a frozen one (requires_grad False) must keep a zero gradient. hn.seed(seed) before each forward keeps
    Dropout's mask fixed."""
    layer = layer.to("reference")
    x = x.copy()

    def forward():
        hn.seed(seed)
        return layer.forward(x)

    rw = rng.normal(size=forward().shape)

    def objective():
        return float((forward() * rw).sum())

    if isinstance(layer, hn.Sequential):
        params = [(f"{i}.{k}", p) for i, lyr in enumerate(layer.layers) for k, p in lyr.params.items()]
    else:
        params = list(layer.params.items())
    layer.zero_grad()
    forward()
    dx = layer.backward(rw.copy())
    grads = {k: p.grad.copy() for k, p in params}
    check(dx, numerical_grad(objective, x), f"{layer!r} input")
    for k, p in params:
        if p.requires_grad:
            check(grads[k], numerical_grad(objective, p.data), f"{type(layer).__name__} {k}")
        else:
            assert not grads[k].any(), f"{type(layer).__name__} {k} is frozen but has a gradient"
    return dx, grads


def _frozen(layer, *names):
    for name in names:
        layer.params[name].requires_grad = False
    return layer


LAYERS = {
    "dense": (lambda: hn.Dense(5, 3), (4, 5)),
    "dense-nobias": (lambda: hn.Dense(4, 2, bias=False), (1, 4)),
    "conv-k3-s1-p1": (lambda: hn.Conv2D(2, 3, 3, padding=1), (2, 2, 5, 4)),
    "conv-k1": (lambda: hn.Conv2D(3, 2, 1), (1, 3, 3, 4)),
    "conv-k5-s2-p2": (lambda: hn.Conv2D(2, 2, 5, stride=2, padding=2), (1, 2, 6, 5)),
    "conv-k3-s3-p0-nobias": (lambda: hn.Conv2D(2, 2, 3, stride=3, bias=False), (2, 2, 7, 8)),
    "maxpool-2": (lambda: hn.MaxPool2D(2), (2, 2, 5, 4)),
    "maxpool-3s2": (lambda: hn.MaxPool2D(3, stride=2), (1, 2, 7, 6)),
    "avgpool-2": (lambda: hn.AvgPool2D(2), (2, 2, 4, 5)),
    "avgpool-3s2": (lambda: hn.AvgPool2D(3, stride=2), (1, 2, 7, 6)),
    "global-avgpool": (lambda: hn.GlobalAvgPool2D(), (2, 3, 3, 2)),
    "flatten": (lambda: hn.Flatten(), (2, 2, 3, 2)),
    "conv-frozen-weight": (lambda: _frozen(hn.Conv2D(2, 3, 3, padding=1), "weight"), (2, 2, 4, 5)),
    "conv-frozen-both": (lambda: _frozen(hn.Conv2D(2, 3, 2), "weight", "bias"), (2, 2, 4, 5)),
    "dense-frozen-bias": (lambda: _frozen(hn.Dense(5, 3), "bias"), (4, 5)),
    "relu": (lambda: hn.ReLU(), (3, 7)),
    "gelu": (lambda: hn.GELU(), (3, 2, 4, 5)),
    "scale": (lambda: hn.Scale(1 / 9), (3, 7)),
    "sigmoid": (lambda: hn.Sigmoid(), (3, 7)),
    "tanh": (lambda: hn.Tanh(), (3, 7)),
    "softmax": (lambda: hn.Softmax(), (3, 5)),
    "batchnorm1d-train": (lambda: hn.BatchNorm1D(3), (5, 3)),
    "batchnorm2d-train": (lambda: hn.BatchNorm2D(2), (2, 2, 3, 3)),
    "batchnorm1d-eval": (lambda: hn.BatchNorm1D(3).eval(), (4, 3)),
    "batchnorm2d-eval": (lambda: hn.BatchNorm2D(2).eval(), (2, 2, 2, 3)),
    "batchnorm2d-frozen-scale-train": (lambda: hn.BatchNorm2D(3, momentum=0.4, eps=1e-12, scale="frozen"),
                                       (2, 3, 3, 3)),
    "batchnorm2d-no-scale-train": (lambda: hn.BatchNorm2D(2, scale="none"), (3, 2, 2, 3)),
    "batchnorm1d-no-scale-eval": (lambda: hn.BatchNorm1D(3, scale="none").eval(), (4, 3)),
    "batchnorm2d-frozen-shift-train": (lambda: _frozen(hn.BatchNorm2D(2), "bias"), (2, 2, 3, 3)),
    "dropout": (lambda: hn.Dropout(0.4), (4, 6)),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_gradient(name, rng):
    make, shape = LAYERS[name]
    layer = make()
    x = away_from_kinks(rng.normal(size=shape))
    if "maxpool" in name:   # values at least 0.09 apart: no two within H of each other
        x = rng.permutation(x.size).reshape(shape) * 0.1 + rng.uniform(0, 0.01, size=shape)
    if "batchnorm" in name:
        layer.to("reference")
        c = shape[1]
        if "weight" in layer.params:
            layer.weight.data = rng.normal(size=c)       # non-trivial gamma, beta and running statistics
        layer.bias.data = rng.normal(size=c)
        layer.running_mean = rng.normal(size=c)
        layer.running_var = rng.uniform(0.5, 2.0, size=c)
    gradcheck_layer(layer, x, rng)


def test_small_network_gradient():
    """A whole Sequential (conv, BN, ReLU, pools, dropout, dense) checked end to end. Fixed seeds: a ReLU input
    within H of 0 or a max-pool near-tie would break the finite differences; these seeds have neither."""
    rng = np.random.default_rng(1234)
    hn.seed(0)
    model = hn.Sequential([
        hn.Conv2D(2, 3, 3, padding=1, bias=False), hn.BatchNorm2D(3), hn.ReLU(), hn.MaxPool2D(2),
        hn.Conv2D(3, 2, 3, stride=2, padding=2), hn.Tanh(), hn.Flatten(),
        hn.Dense(2 * 3 * 2, 4, bias=False), hn.BatchNorm1D(4), hn.Sigmoid(), hn.Dropout(0.3), hn.Dense(4, 3),
    ])
    x = rng.normal(size=(3, 2, 6, 5))
    gradcheck_layer(model, x, rng)


def test_airbench_like_network_gradient():
    """airbench's pieces end to end: a whitened first convolution (frozen weight, trained bias), GELU, a
    Dirac-initialised convolution, BatchNorm with a frozen and with no scale, and the logit Scale. Fixed seeds, as
    above (max pooling: no near-ties)."""
    from hetnet import init

    rng = np.random.default_rng(99)
    hn.seed(1)
    model = hn.Sequential([
        hn.Conv2D(1, 8, 2, init="whitening"), hn.GELU(),
        hn.Conv2D(8, 3, 3, padding=1, bias=False, init="dirac"), hn.MaxPool2D(2),
        hn.BatchNorm2D(3, momentum=0.4, eps=1e-12, scale="frozen"), hn.GELU(),
        hn.Conv2D(3, 3, 3, padding=1, bias=False), hn.BatchNorm2D(3, scale="none"), hn.GELU(),
        hn.Flatten(), hn.Dense(3 * 3 * 3, 3, bias=False), hn.Scale(1 / 9),
    ])
    assert init.data_init(model, rng.normal(size=(16, 1, 7, 7))) == ["0"]
    gradcheck_layer(model, rng.normal(size=(3, 1, 7, 7)), rng)


@pytest.mark.parametrize("ls", [0.0, 0.2])
def test_softmax_cross_entropy_gradient(rng, ls):
    n, k = 4, 5
    z, lab = rng.normal(size=(n, k)) * 2, rng.integers(0, k, size=n)
    loss, dz = ref.softmax_cross_entropy(z, lab, ls)
    check(dz, numerical_grad(lambda: ref.softmax_cross_entropy(z, lab, ls)[0], z), f"softmax CE ls={ls}")
    # the public wrapper computes the same
    loss2, dz2 = hn.losses.softmax_cross_entropy(z, lab, label_smoothing=ls)
    assert loss2 == loss and np.array_equal(dz2, dz)


def test_binary_cross_entropy_gradient(rng):
    z, t = rng.normal(size=(3, 4)) * 3, rng.uniform(size=(3, 4))
    t[0] = np.round(t[0])
    loss, dz = ref.binary_cross_entropy_with_logits(z, t)
    check(dz, numerical_grad(lambda: ref.binary_cross_entropy_with_logits(z, t)[0], z), "BCE with logits")
    loss2, dz2 = hn.losses.binary_cross_entropy_with_logits(z, t)
    assert loss2 == loss and np.array_equal(dz2, dz)


def test_gradcheck_catches_a_wrong_gradient(rng, monkeypatch):
    """The check itself can fail: a 1% error in dw is caught."""
    real = ref.dense_backward

    def wrong(dy, cache, dw, db, need_dx=True):
        tmp = np.zeros_like(dw)
        dx = real(dy, cache, tmp, db, need_dx)
        dw += 1.01 * tmp
        return dx

    monkeypatch.setattr(ref, "dense_backward", wrong)
    with pytest.raises(AssertionError, match="weight"):
        gradcheck_layer(hn.Dense(3, 2), rng.normal(size=(2, 3)), rng)
