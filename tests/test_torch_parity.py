"""Every layer and both losses against PyTorch on copied weights, forward and backward: float64 on the reference
backend, float32 on cpu (torch in the same dtype). Skipped when torch is not installed."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_close, torch_or_skip

import hetnet as hn
from hetnet import zoo
from hetnet.device import cuda_available, get_backend
from hetnet.interop import to_torch, torch_grads, torch_state

torch = torch_or_skip()

DEVICES = ["reference", "cpu"] + ([pytest.param("cuda", marks=pytest.mark.gpu)] if cuda_available() else [])


def f32(rng, *shape, scale=1.0):
    return rng.normal(0.0, scale, size=shape).astype(np.float32).astype(np.float64)


def torch_dtype(b):
    return torch.float64 if np.dtype(b.dtype) == np.float64 else torch.float32


def parity(model: hn.Sequential, x: np.ndarray, device: str, rng) -> None:
    """Forward, backward (input and parameter gradients) and BN running statistics of model vs its torch copy."""
    b = get_backend(device)
    model.to(device)
    tm = to_torch(model, dtype=torch_dtype(b))
    model.zero_grad()
    y = model.forward(b.asarray(x))
    dy = f32(rng, *b.to_numpy(y).shape)
    dx = model.backward(b.asarray(dy))

    tx = torch.tensor(x, dtype=torch_dtype(b), requires_grad=True)
    ty = tm(tx)
    ty.backward(torch.tensor(dy, dtype=torch_dtype(b)))

    assert_close(b.to_numpy(y), ty.detach().double().numpy(), b.dtype, "forward")
    assert_close(b.to_numpy(dx), tx.grad.double().numpy(), b.dtype, "d input")
    tgrads = torch_grads(tm)
    params = {f"{i}.{k}": p for i, lyr in enumerate(model.layers) for k, p in lyr.params.items()}
    ours = {k: p for k, p in params.items() if p.requires_grad}
    assert set(ours) == set(tgrads), f"trained parameters {sorted(ours)} vs torch {sorted(tgrads)}"
    for k, p in ours.items():
        assert_close(b.to_numpy(p.grad), tgrads[k], b.dtype, f"gradient {k}")
    for k, p in params.items():
        if not p.requires_grad:
            assert not b.to_numpy(p.grad).any(), f"{k} is frozen but has a gradient"
    state, tstate = model.state_dict(), torch_state(tm)
    for k in tstate:
        assert_close(state[k], tstate[k], b.dtype, f"state {k} after the step")


LAYERS = {  # name: (layer factory, input shape, train mode)
    "dense": (lambda: hn.Dense(7, 3), (4, 7), True),
    "dense-nobias-batch1": (lambda: hn.Dense(5, 2, bias=False), (1, 5), True),
    "conv-k1": (lambda: hn.Conv2D(3, 4, 1), (2, 3, 5, 4), True),
    "conv-k3-p1": (lambda: hn.Conv2D(3, 4, 3, padding=1), (1, 3, 7, 5), True),
    "conv-k3-s2-p0": (lambda: hn.Conv2D(2, 3, 3, stride=2), (2, 2, 9, 6), True),
    "conv-k5-s1-p2": (lambda: hn.Conv2D(2, 3, 5, padding=2), (2, 2, 8, 11), True),
    "conv-k3-s3-p2-nobias": (lambda: hn.Conv2D(2, 5, 3, stride=3, padding=2, bias=False), (3, 2, 10, 7), True),
    "maxpool-2": (lambda: hn.MaxPool2D(2), (2, 3, 7, 5), True),
    "maxpool-3s2": (lambda: hn.MaxPool2D(3, stride=2), (2, 2, 9, 8), True),
    "avgpool-2": (lambda: hn.AvgPool2D(2), (2, 3, 7, 5), True),
    "avgpool-3s2": (lambda: hn.AvgPool2D(3, stride=2), (2, 2, 9, 8), True),
    "global-avgpool": (lambda: hn.GlobalAvgPool2D(), (2, 3, 5, 4), True),
    "flatten": (lambda: hn.Flatten(), (2, 3, 2, 2), True),
    "relu": (lambda: hn.ReLU(), (3, 2, 4, 5), True),
    "gelu": (lambda: hn.GELU(), (3, 2, 4, 5), True),
    "scale": (lambda: hn.Scale(1 / 9), (3, 9), True),
    "conv-frozen-weight": (lambda: _frozen(hn.Conv2D(3, 4, 3, padding=1), "weight"), (2, 3, 5, 4), True),
    "sigmoid": (lambda: hn.Sigmoid(), (3, 9), True),
    "tanh": (lambda: hn.Tanh(), (3, 9), True),
    "softmax": (lambda: hn.Softmax(), (4, 6), True),
    "batchnorm1d-train": (lambda: hn.BatchNorm1D(5), (6, 5), True),
    "batchnorm2d-train": (lambda: hn.BatchNorm2D(3), (2, 3, 4, 5), True),
    "batchnorm1d-eval": (lambda: hn.BatchNorm1D(5), (6, 5), False),
    "batchnorm2d-eval": (lambda: hn.BatchNorm2D(3), (2, 3, 4, 5), False),
    "batchnorm2d-frozen-scale-train": (lambda: hn.BatchNorm2D(3, momentum=0.4, eps=1e-12, scale="frozen"),
                                       (2, 3, 4, 5), True),
    "batchnorm2d-no-scale-train": (lambda: hn.BatchNorm2D(3, scale="none"), (2, 3, 4, 5), True),
    "batchnorm1d-no-scale-eval": (lambda: hn.BatchNorm1D(5, scale="none"), (6, 5), False),
    "dropout-eval": (lambda: hn.Dropout(0.5), (4, 6), False),
}


def _frozen(layer, *names):
    for name in names:
        layer.params[name].requires_grad = False
    return layer


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_vs_torch(name, device, rng):
    make, shape, training = LAYERS[name]
    layer = make()
    if "batchnorm" in name:       # non-trivial gamma (where it is a parameter), beta and running statistics
        c = shape[1]
        if layer.scale != "none":
            layer.weight.data = rng.normal(size=c)
        layer.bias.data = rng.normal(size=c)
        layer.running_mean = rng.normal(size=c)
        layer.running_var = rng.uniform(0.5, 2.0, size=c)
    model = hn.Sequential([layer]).train(training)
    parity(model, f32(rng, *shape, scale=2.0 if "batchnorm" in name else 1.0), device, rng)


@pytest.mark.parametrize("device", DEVICES)
def test_small_models_vs_torch(device, rng):
    """thesis-m0 and a BN model, forward and backward, as whole networks."""
    hn.seed(int(rng.integers(1 << 30)))
    parity(zoo.build("thesis-m0"), f32(rng, 2, 3, 12, 12), device, rng)
    bn = hn.Sequential([hn.Conv2D(2, 4, 3, padding=1, bias=False), hn.BatchNorm2D(4), hn.ReLU(), hn.AvgPool2D(2),
                        hn.Flatten(), hn.Dense(4 * 3 * 2, 5, bias=False), hn.BatchNorm1D(5), hn.Tanh(), hn.Dense(5, 3)])
    parity(bn, f32(rng, 3, 2, 7, 5), device, rng)


@pytest.mark.parametrize("device", DEVICES)
def test_airbench_like_model_vs_torch(device, rng):
    """airbench94's layer pattern at a small size: whitening conv (frozen weight), GELU, Dirac-initialised convs,
    max pooling, BatchNorm with a frozen scale (momentum 0.4, eps 1e-12) and with none, a bias-free Dense and the
    logit Scale, against its torch twin, forward, backward and running statistics."""
    from hetnet import init

    hn.seed(int(rng.integers(1 << 30)))
    spec = {"input_shape": [3, 9, 9], "layers": [
        {"type": "Conv2D", "in_channels": 3, "out_channels": 24, "kernel_size": 2, "init": "whitening"},
        {"type": "GELU"},
        {"type": "Conv2D", "in_channels": 24, "out_channels": 32, "kernel_size": 3, "padding": 1, "bias": False,
         "init": "dirac"},
        {"type": "MaxPool2D", "kernel_size": 2},
        {"type": "BatchNorm2D", "num_features": 32, "momentum": 0.4, "eps": 1e-12, "scale": "frozen"},
        {"type": "GELU"},
        {"type": "Conv2D", "in_channels": 32, "out_channels": 16, "kernel_size": 3, "padding": 1, "bias": False,
         "init": "dirac"},
        {"type": "BatchNorm2D", "num_features": 16, "momentum": 0.4, "eps": 1e-12, "scale": "none"},
        {"type": "GELU"},
        {"type": "MaxPool2D", "kernel_size": 3},
        {"type": "Flatten"},
        {"type": "Dense", "in_features": 16, "out_features": 10, "bias": False},
        {"type": "Scale", "factor": 1 / 9},
    ]}
    model, _ = zoo.build_from_spec(spec)
    init.data_init(model, rng.integers(0, 256, size=(20, 3, 9, 9), dtype=np.uint8), [0.5, 0.4, 0.45],
                   [0.25, 0.25, 0.3])
    parity(model, f32(rng, 4, 3, 9, 9), device, rng)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ls", [0.0, 0.1])
@pytest.mark.parametrize("n,k", [(1, 3), (8, 10)])
def test_softmax_cross_entropy_vs_torch(device, ls, n, k, rng):
    b = get_backend(device)
    z, lab = f32(rng, n, k, scale=3.0), rng.integers(0, k, size=n)
    loss, dz = hn.losses.softmax_cross_entropy(b.asarray(z), lab, label_smoothing=ls)
    tz = torch.tensor(z, dtype=torch_dtype(b), requires_grad=True)
    tl = torch.nn.functional.cross_entropy(tz, torch.tensor(lab), label_smoothing=ls)
    tl.backward()
    assert_close(np.array(loss), np.array(tl.item()), b.dtype, "loss")
    assert_close(b.to_numpy(dz), tz.grad.double().numpy(), b.dtype, "dlogits")
    s, correct = hn.losses.softmax_cross_entropy_stats(b.asarray(z), lab)
    tsum = torch.nn.functional.cross_entropy(tz.detach(), torch.tensor(lab), reduction="sum").item()
    assert_close(np.array(s), np.array(tsum), b.dtype, "loss sum")
    assert correct == int((tz.detach().argmax(dim=1) == torch.tensor(lab)).sum())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale", [1.0, 20.0])
def test_binary_cross_entropy_vs_torch(device, scale, rng):
    b = get_backend(device)
    z, t = f32(rng, 5, 3, scale=scale), rng.uniform(size=(5, 3))
    loss, dz = hn.losses.binary_cross_entropy_with_logits(b.asarray(z), b.asarray(t))
    tz = torch.tensor(z, dtype=torch_dtype(b), requires_grad=True)
    tl = torch.nn.functional.binary_cross_entropy_with_logits(tz, torch.tensor(t, dtype=torch_dtype(b)))
    tl.backward()
    assert_close(np.array(loss), np.array(tl.item()), b.dtype, "loss")
    assert_close(b.to_numpy(dz), tz.grad.double().numpy(), b.dtype, "dlogits")
