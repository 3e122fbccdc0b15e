"""The public API of the core engine (issue 2) exactly as written there: Sequential, layers, parameters, modes,
devices, state_dict, errors, initialisation and seeding."""
from __future__ import annotations

import importlib

import numpy as np
import pytest
from conftest import assert_close

import hetnet as hn
from hetnet.device import cuda_available
from hetnet.errors import DeviceError


def issue_model():
    """The example model of issue 2 (CIFAR-sized)."""
    return hn.Sequential([
        hn.Conv2D(3, 16, kernel_size=3, padding=1), hn.ReLU(), hn.MaxPool2D(2),
        hn.Conv2D(16, 32, 3, padding=1), hn.ReLU(), hn.MaxPool2D(2),
        hn.Flatten(), hn.Dense(32 * 8 * 8, 100), hn.ReLU(), hn.Dense(100, 10),
    ])


def all_layers():
    return [hn.Dense(4, 3), hn.Dense(4, 3, bias=False), hn.Conv2D(2, 3, 3, stride=2, padding=1), hn.MaxPool2D(2),
            hn.MaxPool2D(3, stride=2), hn.AvgPool2D(2), hn.GlobalAvgPool2D(), hn.Flatten(), hn.ReLU(), hn.Sigmoid(),
            hn.Tanh(), hn.Softmax(), hn.BatchNorm1D(3), hn.BatchNorm2D(3), hn.Dropout(0.5)]


def test_issue_example_runs(rng):
    """The snippet of issue 2, line by line, on both CPU backends."""
    for device, dtype in (("cpu", np.float32), ("reference", np.float64)):
        model = issue_model().to(device)
        model.train()
        x = rng.normal(size=(4, 3, 32, 32)).astype(dtype)
        labels = rng.integers(0, 10, size=4)
        logits = model.forward(x)
        assert logits.shape == (4, 10) and logits.dtype == dtype
        loss, dlogits = hn.losses.softmax_cross_entropy(logits, labels)
        assert isinstance(loss, float) and dlogits.shape == (4, 10)
        dx = model.backward(dlogits)
        assert dx.shape == x.shape
        before = [p.data.copy() for p in model.parameters()]
        opt = hn.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        opt.step()
        opt.zero_grad()
        assert all(not np.array_equal(b, p.data) for b, p in zip(before, model.parameters()))
        assert all(not p.grad.any() for p in model.parameters())


def test_sequential_layers_and_indexing():
    layers = [hn.Flatten(), hn.Dense(4, 3), hn.ReLU(), hn.Dense(3, 2)]
    model = hn.Sequential(layers)
    assert model.layers == layers and all(a is b for a, b in zip(model.layers, layers))
    assert len(model) == 4 and model[1] is layers[1]
    with pytest.raises(TypeError, match="item 1"):
        hn.Sequential([hn.ReLU(), "relu"])


@pytest.mark.parametrize("device", ["reference", "cpu"])
def test_to_returns_self_and_moves_everything(device):
    for layer in all_layers():
        assert layer.to(device) is layer, type(layer).__name__
        assert layer.device == device
        for p in layer.parameters():
            assert p.data.dtype == hn.get_backend(device).dtype and p.grad.shape == p.data.shape
    model = issue_model()
    assert model.to(device) is model
    assert all(layer.device == device for layer in model.layers)
    bn = hn.BatchNorm2D(3).to(device)
    assert bn.running_mean.dtype == hn.get_backend(device).dtype


def test_moving_between_devices_keeps_values(rng):
    model = hn.Sequential([hn.Conv2D(2, 3, 3), hn.BatchNorm2D(3), hn.ReLU(), hn.Flatten(), hn.Dense(3 * 2 * 2, 2)])
    state = model.state_dict()
    model.to("reference").to("cpu").to("reference")
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, state[k].astype(np.float64), err_msg=k)


def test_train_eval_modes():
    model = hn.Sequential(all_layers()[:3] + [hn.BatchNorm1D(3), hn.Dropout(0.2)])
    assert model.training and all(layer.training for layer in model.layers)
    assert model.eval() is model
    assert not model.training and not any(layer.training for layer in model.layers)
    assert model.train() is model
    assert model.training and all(layer.training for layer in model.layers)
    for layer in all_layers():
        assert layer.eval() is layer and not layer.training
        assert layer.train() is layer and layer.training


def test_parameters_layouts_and_order():
    model = hn.Sequential([hn.Conv2D(3, 8, 5), hn.BatchNorm2D(8), hn.ReLU(), hn.Flatten(),
                           hn.Dense(8 * 2 * 3, 4), hn.Dense(4, 2, bias=False)])
    params = model.parameters()
    assert all(isinstance(p, hn.Parameter) for p in params)
    assert [p.shape for p in params] == [(8, 3, 5, 5), (8,), (8,), (8,), (4, 48), (4,), (2, 4)]
    conv, bn, dense = model[0], model[1], model[4]
    assert params[0] is conv.weight and params[1] is conv.bias
    assert params[2] is bn.weight and params[3] is bn.bias
    assert params[4] is dense.weight and params[5] is dense.bias and params[6] is model[5].weight
    assert model[5].parameters() == [model[5].weight]
    assert bn.running_mean.shape == (8,) and bn.running_var.shape == (8,)
    assert hn.ReLU().parameters() == [] and hn.MaxPool2D(2).parameters() == []
    for p in params:
        assert p.grad.shape == p.data.shape and not p.grad.any()


@pytest.mark.parametrize("device", ["reference", "cpu"])
def test_backward_accumulates_and_zero_grad(device, rng):
    """backward ADDS into .grad (two passes give twice the gradient); zero_grad clears, on a Sequential (one flat
    buffer) and on a layer used alone."""
    b = hn.get_backend(device)
    model = hn.Sequential([hn.Conv2D(2, 3, 3, padding=1), hn.ReLU(), hn.Flatten(), hn.Dense(3 * 4 * 5, 2)]).to(device)
    x, dy = b.asarray(rng.normal(size=(2, 2, 4, 5))), b.asarray(rng.normal(size=(2, 2)))
    model.forward(x)
    model.backward(dy)
    once = [p.grad.copy() for p in model.parameters()]
    model.forward(x)
    model.backward(dy)
    for o, p in zip(once, model.parameters()):
        assert np.abs(o).max() > 0
        assert_close(p.grad, 2 * o, b.dtype, "second backward adds")
    model.zero_grad()
    assert not any(p.grad.any() for p in model.parameters())

    dense = hn.Dense(3, 2).to(device)
    dense.forward(b.asarray(rng.normal(size=(4, 3))))
    dense.backward(b.asarray(rng.normal(size=(4, 2))))
    assert dense.weight.grad.any() and dense.bias.grad.any()
    dense.zero_grad()
    assert not dense.weight.grad.any() and not dense.bias.grad.any()


@pytest.mark.parametrize("fuse", [False, True], ids=["layer-by-layer", "fused"])
def test_backward_without_dx_stops_at_the_first_layer_with_parameters(rng, monkeypatch, fuse):
    """need_dx=False (the trainer's call): no backward through the parameter-free layers in front (a Flatten),
    no d(input) from the first Dense (or from the dense chain holding it), the same gradients, None returned."""
    from hetnet.plan import Plan

    m = hn.Sequential([hn.Flatten(), hn.Dense(12, 5), hn.ReLU(), hn.Dense(5, 3)]).to("cpu")
    m.plan = Plan(m, fuse=fuse)
    x, dy = rng.normal(size=(4, 3, 2, 2)).astype(np.float32), rng.normal(size=(4, 3)).astype(np.float32)
    m.forward(x)
    assert m.backward(dy).shape == x.shape
    full = [p.grad.copy() for p in m.parameters()]
    calls, flags = [], []
    op = "dense_chain_backward" if fuse else "dense_backward"
    flatten_backward, dense_backward = m.layers[0].backward, getattr(m.backend, op)
    monkeypatch.setattr(m.layers[0], "backward", lambda d: calls.append(1) or flatten_backward(d))
    monkeypatch.setattr(m.backend, op, lambda *a, **k: flags.append(k["need_dx"]) or dense_backward(*a, **k))
    m.zero_grad()
    m.forward(x)
    assert m.backward(dy, need_dx=False) is None
    assert calls == [] and flags == ([False] if fuse else [True, False])
    for p, g in zip(m.parameters(), full):
        np.testing.assert_array_equal(p.grad, g)


def test_state_dict_names_and_round_trip(rng):
    def make():
        return hn.Sequential([hn.Conv2D(1, 2, 3), hn.BatchNorm2D(2), hn.ReLU(), hn.Flatten(),
                              hn.Dense(2 * 3 * 3, 4), hn.BatchNorm1D(4), hn.Dense(4, 3, bias=False)])

    model = make().to("cpu")
    model.forward(rng.normal(size=(3, 1, 5, 5)).astype(np.float32))   # training step: running stats move
    state = model.state_dict()
    assert list(state) == ["0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var",
                           "4.weight", "4.bias", "5.weight", "5.bias", "5.running_mean", "5.running_var",
                           "6.weight"]
    assert all(isinstance(v, np.ndarray) for v in state.values())
    assert state["4.weight"].shape == (4, 18) and state["0.weight"].shape == (2, 1, 3, 3)
    assert state["1.running_mean"].any()
    state["0.weight"][...] = 123.0                       # a copy: the model is untouched
    assert not (model[0].weight.data == 123.0).any()
    state = model.state_dict()

    other = make().to("reference")                       # across devices
    other.load_state_dict(state)
    for k, v in other.state_dict().items():
        np.testing.assert_array_equal(v, state[k].astype(np.float64), err_msg=k)
    x = rng.normal(size=(2, 1, 5, 5)).astype(np.float32)
    model.eval(), other.eval()
    assert_close(model.forward(x), other.forward(x.astype(np.float64)), np.float32, "same function after load")

    bad = dict(state)
    del bad["1.running_var"]
    with pytest.raises(ValueError, match="running_var"):
        make().load_state_dict(bad)
    bad = dict(state, **{"4.weight": np.zeros((3, 18))})
    with pytest.raises(ValueError, match=r"4\.weight"):
        make().load_state_dict(bad)
    bad = dict(state, extra=np.zeros(1))
    with pytest.raises(ValueError, match="extra"):
        make().load_state_dict(bad)


def test_parameter_data_assignment_before_to(rng):
    w = rng.normal(size=(3, 4)).astype(np.float32)
    b = rng.normal(size=3).astype(np.float32)
    dense = hn.Dense(4, 3)
    dense.weight.data = w
    dense.bias.data = b
    model = hn.Sequential([dense]).to("reference")
    np.testing.assert_array_equal(model[0].weight.data, w)
    np.testing.assert_array_equal(model[0].bias.data, b)
    assert model[0].weight.data.dtype == np.float64
    conv = hn.Conv2D(2, 3, 3)
    conv.weight.data = np.ones((3, 2, 3, 3))
    conv.to("cpu")
    np.testing.assert_array_equal(conv.weight.data, np.ones((3, 2, 3, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(3, 4\)"):
        dense.weight.data = np.zeros((4, 3))
    # BN buffers can be assigned like PyTorch's
    bn = hn.BatchNorm1D(2)
    bn.running_mean = np.array([1.0, 2.0])
    bn.to("reference")
    np.testing.assert_array_equal(bn.running_mean, [1.0, 2.0])


def test_shape_error_names_layer_expected_and_received(rng):
    model = issue_model().to("cpu")
    with pytest.raises(ValueError) as e:
        model.forward(np.zeros((2, 1, 32, 32), np.float32))    # 1 channel instead of 3
    msg = str(e.value)
    assert "Conv2D(3, 16" in msg and "(N, 3, H, W)" in msg and "(N, 1, 32, 32)" in msg, msg

    with pytest.raises(ValueError) as e:
        model.forward(np.zeros((2, 3, 28, 28), np.float32))    # right channels, wrong size: Dense(2048) sees 1568
    msg = str(e.value)
    assert "Dense(2048, 100" in msg and "(N, 2048)" in msg and "(N, 1568)" in msg, msg

    with pytest.raises(ValueError) as e:                      # a layer used alone checks too
        hn.Dense(5, 2).to("reference").forward(np.zeros((3, 4)))
    assert "Dense(5, 2" in str(e.value) and "(N, 5)" in str(e.value) and "(N, 4)" in str(e.value)

    with pytest.raises(ValueError, match="BatchNorm2D"):
        hn.Sequential([hn.BatchNorm2D(4)]).forward(np.zeros((2, 3, 4, 4), np.float32))

    # the check comes before any arithmetic: no layer has a cache afterwards
    fresh = issue_model()
    with pytest.raises(ValueError):
        fresh.forward(np.zeros((1, 3, 16, 16), np.float32))
    assert all(layer.cache is None for layer in fresh.layers)


@pytest.mark.parametrize("bad", ["tpu", "gpu", "cpu:1", "reference:0", "cuda:x", "", "CUDA-0"])
def test_unknown_device_is_a_one_line_device_error(bad):
    with pytest.raises(DeviceError) as e:
        hn.Dense(2, 2).to(bad)
    msg = str(e.value)
    assert "\n" not in msg and repr(bad) in msg and "cpu" in msg and "reference" in msg, msg
    with pytest.raises(DeviceError):
        hn.get_backend(bad)
    with pytest.raises(DeviceError):
        hn.Sequential([hn.ReLU()]).to(bad)


@pytest.mark.skipif(cuda_available(), reason="a GPU is present")
def test_missing_cuda_is_a_one_line_device_error():
    if not hasattr(importlib.import_module("hetnet.backends.cuda"), "CudaBackend"):
        pytest.skip("hetnet.backends.cuda.CudaBackend not written yet")
    with pytest.raises(DeviceError) as e:
        hn.Dense(2, 2).to("cuda")
    assert "\n" not in str(e.value).strip() and str(e.value).strip()


def _std_ok(w: np.ndarray, want: float) -> bool:
    return abs(w.std() / want - 1) < 0.03       # sample std of >= 18k values: ~0.5% spread, 3% is 6 sigma


def test_he_init_before_relu_glorot_otherwise():
    hn.seed(3)
    model = hn.Sequential([
        hn.Conv2D(32, 64, 3, padding=1), hn.BatchNorm2D(64), hn.ReLU(),      # He through BN
        hn.Conv2D(64, 32, 3), hn.Tanh(),                                     # Glorot
        hn.Flatten(), hn.Dense(400, 300), hn.Dropout(0.5), hn.ReLU(),        # He through Dropout
        hn.Dense(300, 200),                                                  # last: Glorot
    ])
    w0, w3, w6, w9 = (model[i].weight.data for i in (0, 3, 6, 9))
    assert _std_ok(w0, np.sqrt(2 / (32 * 9))), w0.std()                     # He normal: N(0, 2/fan_in)
    assert _std_ok(w6, np.sqrt(2 / 400)), w6.std()
    for w, fan_in, fan_out in ((w3, 64 * 9, 32 * 9), (w9, 300, 200)):     # Glorot uniform U(-a, a)
        a = np.sqrt(6 / (fan_in + fan_out))
        assert np.abs(w).max() <= a and np.abs(w).max() > 0.99 * a
        assert _std_ok(w, a / np.sqrt(3)), w.std()
    assert np.abs(w0).max() > np.sqrt(6 / (32 * 9 + 64 * 9)) * 1.5       # normal tails: not the uniform
    for i in (0, 3, 6, 9):
        assert not model[i].bias.data.any()                                  # biases zero
    assert _std_ok(hn.Dense(400, 300).weight.data, np.sqrt(2 / 700))       # alone: Glorot
    assert _std_ok(model[0].weight.data, np.sqrt(2 / 288))


def test_seed_makes_runs_reproducible(rng):
    def run(seed):
        hn.seed(seed)
        model = hn.Sequential([hn.Dense(6, 5), hn.ReLU(), hn.Dropout(0.5), hn.Dense(5, 3)]).to("reference")
        y = model.forward(np.ones((4, 6)))
        return model.state_dict(), y

    s1, y1 = run(11)
    s2, y2 = run(11)
    s3, y3 = run(12)
    assert all(np.array_equal(s1[k], s2[k]) for k in s1) and np.array_equal(y1, y2)
    assert not np.array_equal(s1["0.weight"], s3["0.weight"]) and not np.array_equal(y1, y3)
