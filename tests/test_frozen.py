"""Frozen parameters (`Parameter.requires_grad = False`), as PyTorch: the layer still passes the gradient to its
input, the frozen parameter's .grad stays zero (the op skips it where it can), model.parameters() still lists it,
and the flag survives moves between devices and the fused step plans. The optimisers' side -- a frozen parameter
never changes, whatever the optimiser -- is stated at the end."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_close

import hetnet as hn
from hetnet import train as T
from hetnet import zoo
from hetnet.device import cuda_available, get_backend
from hetnet.errors import ModelFileError

DEVICES = ["reference", "cpu"] + ([pytest.param("cuda", marks=pytest.mark.gpu)] if cuda_available() else [])


def f32(rng, *shape, scale=1.0):
    return rng.normal(0.0, scale, size=shape).astype(np.float32).astype(np.float64)


def test_parameter_flag_default_settable_and_shown():
    p = hn.Parameter(np.zeros(3))
    assert p.requires_grad is True and "requires_grad" not in repr(p)
    p.requires_grad = False
    assert p.requires_grad is False and "requires_grad=False" in repr(p)
    assert p.grad_target() is None
    p.requires_grad = True
    assert p.grad_target() is p.grad


LAYERS = {  # name: (factory, frozen parameter names, input shape)
    "conv-weight": (lambda: hn.Conv2D(2, 3, 3, padding=1), ["weight"], (2, 2, 5, 4)),
    "conv-bias": (lambda: hn.Conv2D(2, 3, 3, stride=2), ["bias"], (3, 2, 7, 6)),
    "conv-both": (lambda: hn.Conv2D(2, 3, 1), ["weight", "bias"], (2, 2, 3, 3)),
    "dense-weight": (lambda: hn.Dense(6, 4), ["weight"], (5, 6)),
    "dense-bias": (lambda: hn.Dense(6, 4), ["bias"], (1, 6)),
    "bn2d-weight": (lambda: hn.BatchNorm2D(3), ["weight"], (2, 3, 4, 5)),
    "bn2d-bias": (lambda: hn.BatchNorm2D(3), ["bias"], (2, 3, 4, 5)),
    "bn1d-both": (lambda: hn.BatchNorm1D(4), ["weight", "bias"], (6, 4)),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_frozen_layer_gradients(name, device, rng):
    """Against the same layer with nothing frozen: the same output and input gradient (bit for bit) and the same
    gradients for the parameters that train; the frozen ones' .grad stays zero, also after a second backward."""
    make, frozen, shape = LAYERS[name]
    b = get_backend(device)
    hn.seed(3)
    free = make().to(device)
    hn.seed(3)
    layer = make().to(device)
    for k in frozen:
        layer.params[k].requires_grad = False
    x, out = b.asarray(f32(rng, *shape)), []
    for lyr in (free, layer):
        y = lyr.forward(x)
        dy = b.asarray(f32(np.random.default_rng(5), *b.to_numpy(y).shape))
        out.append((b.to_numpy(y), b.to_numpy(lyr.backward(dy))))
    layer.backward(dy)
    np.testing.assert_array_equal(out[1][0], out[0][0])
    np.testing.assert_array_equal(out[1][1], out[0][1])
    for k, p in layer.params.items():
        if k in frozen:
            assert not b.to_numpy(p.grad).any(), f"frozen {k} has a gradient"
        else:
            assert_close(b.to_numpy(p.grad), 2 * b.to_numpy(free.params[k].grad), b.dtype, f"{k} gradient")
    assert [p.shape for p in layer.parameters()] == [p.shape for p in free.parameters()]


@pytest.mark.parametrize("device", DEVICES)
def test_first_layer_with_frozen_weight(device, rng, monkeypatch):
    """airbench's whitening layer: the first layer (no input gradient wanted), weight frozen, bias trained. Its
    backward fills the bias gradient only; with the bias frozen too the backward stops before it (nothing to
    compute there)."""
    b = get_backend(device)
    model = hn.Sequential([hn.Conv2D(3, 24, 2), hn.GELU(), hn.Flatten(), hn.Dense(24 * 4 * 4, 3)]).to(device)
    model[0].weight.requires_grad = False
    x = b.asarray(f32(rng, 2, 3, 5, 5))
    y = model.forward(x)
    assert model.backward(b.asarray(np.ones(b.to_numpy(y).shape)), need_dx=False) is None
    assert not b.to_numpy(model[0].weight.grad).any() and b.to_numpy(model[0].bias.grad).any()
    model[0].bias.requires_grad = False
    model.zero_grad()
    calls, real = [], b.conv2d_backward
    monkeypatch.setattr(b, "conv2d_backward", lambda *a, **k: calls.append(1) or real(*a, **k))
    y = model.forward(x)
    assert model.backward(b.asarray(np.ones(b.to_numpy(y).shape)), need_dx=False) is None
    assert calls == [] and not b.to_numpy(model[0].bias.grad).any() and b.to_numpy(model[3].weight.grad).any()


@pytest.mark.parametrize("path", ["eager", "train-step"])
@pytest.mark.parametrize("device", DEVICES)
def test_frozen_conv_weight_gradient_is_skipped(device, path, rng, monkeypatch):
    """cifar-speed's whitening convolution -- weight frozen, bias trained -- here inside the model, so that its
    input gradient is wanted too. Its backward op gets dw None (no filter gradient computed, not even into
    scratch); the input gradient it passes on and every other gradient are those of the same model with nothing
    frozen; SGD steps (eager, or the train step with the backend's fused plans) train the bias and leave the
    weight and its .grad as they were."""

    def make():
        return hn.Sequential([hn.Conv2D(2, 4, 3, padding=1), hn.ReLU(), hn.Conv2D(4, 6, 3, padding=1), hn.ReLU(),
                              hn.MaxPool2D(2), hn.Flatten(), hn.Dense(6 * 3 * 3, 3)])

    b = get_backend(device)
    x, labels = f32(rng, 5, 2, 6, 6), rng.integers(0, 3, 5)
    hn.seed(6)
    free, model = make().to(device), make()
    model.load_state_dict(free.state_dict())
    model.to(device)
    conv = model[2]
    conv.weight.requires_grad = False
    dw, db = conv.grad_targets()
    assert dw is None and db is conv.bias.grad
    seen = []       # (dw, db) of every conv backward op call

    def spy(real):
        def op(dy, cache, dw, db, *args, **kw):
            seen.append((dw, db))
            return real(dy, cache, dw, db, *args, **kw)
        return op

    for name in ("conv2d_backward", "conv2d_relu_maxpool_backward"):
        monkeypatch.setattr(b, name, spy(getattr(b, name)))
    xd, dy = b.asarray(x), b.asarray(f32(rng, 5, 3))
    dxs = []
    for m in (free, model):
        m.forward(xd)
        dxs.append(b.to_numpy(m.backward(dy)))
    assert_close(dxs[1], dxs[0], b, "dE/dx through the frozen convolution")
    for i, layer in enumerate(model.layers):
        for k, p in layer.params.items():
            if (i, k) == (2, "weight"):
                assert not b.to_numpy(p.grad).any()
            else:
                want = b.to_numpy(free[i].params[k].grad)
                assert np.abs(want).max() > 0
                assert_close(b.to_numpy(p.grad), want, b, f"{i}.{k} gradient")
    before = model.state_dict()
    seen.clear()
    opt = hn.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    step = T.make_train_step(model, opt) if path == "train-step" else None
    for _ in range(3):
        if step is not None:
            step.step(xd, b.labels(labels))
            continue
        model.zero_grad()
        _, d = hn.losses.softmax_cross_entropy(model.forward(xd), labels)
        model.backward(d)
        opt.step()
    if step is not None:
        step.collect()
    after = model.state_dict()
    np.testing.assert_array_equal(after["2.weight"], before["2.weight"], err_msg="the frozen weight changed")
    assert not b.to_numpy(conv.weight.grad).any()
    assert np.any(after["2.bias"] != before["2.bias"]) and np.any(after["0.weight"] != before["0.weight"])
    mine = [dw for dw, db in seen if db is conv.bias.grad]
    assert mine and all(dw is None for dw in mine), "the frozen weight's backward got a gradient array"
    assert any(dw is model[0].weight.grad for dw, _ in seen)


def test_flag_survives_moves(rng):
    model = hn.Sequential([hn.Conv2D(1, 2, 3), hn.BatchNorm2D(2, scale="frozen"), hn.Flatten(), hn.Dense(18, 2)])
    model[0].bias.requires_grad = False
    model.to("reference").to("cpu")
    assert [p.requires_grad for p in model.parameters()] == [True, False, False, True, True, True]
    model.forward(f32(rng, 4, 1, 5, 5))
    model.backward(f32(rng, 4, 2))
    assert not model[0].bias.grad.any() and not model[1].weight.grad.any() and model[0].weight.grad.any()


# --- BatchNorm's scale options -------------------------------------------------------------------------------------


def test_batchnorm_scale_options(rng):
    learned, frozen, none = (hn.BatchNorm2D(3, scale=s) for s in ("learned", "frozen", "none"))
    assert [k for k, _ in learned.named_arrays()] == ["weight", "bias", "running_mean", "running_var"]
    assert [k for k, _ in frozen.named_arrays()] == ["weight", "bias", "running_mean", "running_var"]
    assert [k for k, _ in none.named_arrays()] == ["bias", "running_mean", "running_var"]
    assert learned.weight.requires_grad and not frozen.weight.requires_grad and "weight" not in none.params
    assert (learned.scale, frozen.scale, none.scale) == ("learned", "frozen", "none")
    assert "scale='none'" in repr(none) and "scale" not in repr(learned)
    frozen.weight.requires_grad = True                  # the flag is the truth: now it trains
    assert frozen.scale == "learned"
    x = f32(rng, 4, 3, 2, 2)
    ys = [bn.to("cpu").forward(x) for bn in (learned, none)]
    np.testing.assert_array_equal(ys[0], ys[1])         # gamma = 1 either way
    for bad, msg in (({"scale": "fixed"}, "scale must be one of"), ({"eps": 0.0}, "eps must be > 0"),
                     ({"momentum": 1.5}, "momentum must be in")):
        with pytest.raises(ValueError, match=msg):
            hn.BatchNorm2D(3, **bad)


@pytest.mark.parametrize("device", DEVICES)
def test_batchnorm_without_scale_moves_with_the_layer(device, rng):
    bn = hn.BatchNorm2D(3, scale="none").to(device)
    b = get_backend(device)
    assert type(bn.gamma) is type(b.zeros((1,))) and b.to_numpy(bn.gamma).tolist() == [1.0] * 3
    bn.forward(b.asarray(f32(rng, 2, 3, 2, 2)))
    # dE/dbias = sum of dE/dy over N, H, W. (dE/dy = y would give ~0: a normalised channel sums to zero.)
    dy = f32(rng, 2, 3, 2, 2)
    assert bn.backward(b.asarray(dy)) is not None
    assert_close(b.to_numpy(bn.bias.grad), dy.sum(axis=(0, 2, 3)), b, "BN bias gradient")


# --- specs -----------------------------------------------------------------------------------------------------------


def test_spec_frozen_key():
    spec = {"input_shape": [1, 4, 4], "layers": [
        {"type": "Conv2D", "in_channels": 1, "out_channels": 2, "kernel_size": 3, "frozen": ["weight"]},
        {"type": "BatchNorm2D", "num_features": 2, "scale": "none", "frozen": ["bias"]},
        {"type": "GELU"}, {"type": "Flatten"}, {"type": "Dense", "in_features": 8, "out_features": 3},
        {"type": "Scale", "factor": 0.25}]}
    model, _ = zoo.build_from_spec(spec)
    assert [p.requires_grad for p in model.parameters()] == [False, True, False, True, True]
    assert repr(model[5]) == "Scale(0.25)"
    for frozen, msg in ((["gamma"], "names 'gamma', which is not one of its parameters \\(weight, bias\\)"),
                        ("weight", "must be a list of parameter names")):
        bad = {"input_shape": [1, 4, 4], "layers": [
            {"type": "Conv2D", "in_channels": 1, "out_channels": 2, "kernel_size": 3, "frozen": frozen}]}
        with pytest.raises(ModelFileError, match=msg):
            zoo.build_from_spec(bad)
    with pytest.raises(ModelFileError, match="layer 0 \\(GELU\\): 'frozen' names 'weight'.*none"):
        zoo.build_from_spec({"input_shape": [1, 4, 4], "layers": [{"type": "GELU", "frozen": ["weight"]}]})
    with pytest.raises(ModelFileError, match="Scale: factor must be a finite number"):
        zoo.build_from_spec({"input_shape": [1, 4, 4], "layers": [{"type": "Scale", "factor": "1/9"}]})


# --- the fused step plans --------------------------------------------------------------------------------------------


def frozen_model():
    """The fused patterns (Conv2D -> ReLU -> MaxPool2D(2), BatchNorm2D -> ReLU -> MaxPool2D(2), a Dense chain) with
    frozen and absent parameters in them, and GELU and Scale between."""
    model = hn.Sequential([
        hn.Conv2D(2, 4, 3, padding=1), hn.ReLU(), hn.MaxPool2D(2),
        hn.Conv2D(4, 4, 3, padding=1, bias=False), hn.BatchNorm2D(4, scale="frozen"), hn.ReLU(), hn.MaxPool2D(2),
        hn.Conv2D(4, 5, 3, padding=1, bias=False), hn.BatchNorm2D(5, scale="none"), hn.GELU(), hn.MaxPool2D(2),
        hn.Flatten(), hn.Dense(5, 6), hn.ReLU(), hn.Dense(6, 3), hn.Scale(1 / 9)])
    model[0].weight.requires_grad = False
    model[14].bias.requires_grad = False
    return model


@pytest.mark.parametrize("device", DEVICES[1:])
def test_step_objects_leave_frozen_gradients_at_zero(device, rng):
    """The backend's train step (fused plans) against the generic layer-by-layer step, three SGD steps without
    weight decay: the same weights; the frozen ones unchanged (zero gradients, so no update even today)."""
    x = f32(rng, 6, 2, 8, 8).astype(np.float32)
    y = rng.integers(0, 3, 6)
    hn.seed(4)
    start = frozen_model().state_dict()
    states = []
    for fused in (True, False):
        model = frozen_model()
        model.load_state_dict(start)
        model.to(device)
        b = model.backend
        opt = hn.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        step = T.make_train_step(model, opt) if fused else T.TrainStep(model, opt)
        for _ in range(3):
            step.step(b.asarray(x), b.labels(y))
        step.collect()
        states.append(model.state_dict())
    for k in start:
        assert_close(states[0][k], states[1][k], np.float32, k)
    for k in ("0.weight", "4.weight", "14.bias"):
        np.testing.assert_array_equal(states[0][k], start[k], err_msg=f"frozen {k} changed")
    assert np.any(states[0]["0.bias"] != start["0.bias"]) and np.any(states[0]["8.bias"] != start["8.bias"])


# --- the optimisers ---------------------------------------------------------------------------------------------------

OPTIMISERS = {
    "sgd": lambda ps: hn.optim.SGD(ps, lr=0.1, weight_decay=0.1),
    "nesterov": lambda ps: hn.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1),
    "adam": lambda ps: hn.optim.Adam(ps, lr=0.01, weight_decay=0.1),
    "adamw": lambda ps: hn.optim.AdamW(ps, lr=0.01, weight_decay=0.1),
}


@pytest.mark.parametrize("path", ["eager", "flat", "train-step"])
@pytest.mark.parametrize("opt", sorted(OPTIMISERS))
def test_optimisers_never_change_a_frozen_parameter(opt, path, rng):
    """Weight decay, momentum and Adam's moments included, a frozen parameter keeps its value while the others
    move: updating parameter by parameter (eager: layers outside a model's flat buffer), the fused update of a
    model's flat buffer, and the backend's train step."""
    x = f32(rng, 4, 2, 5, 5).astype(np.float32)
    y = rng.integers(0, 3, 4)
    hn.seed(2)
    model = hn.Sequential([hn.Conv2D(2, 4, 2), hn.BatchNorm2D(4, scale="frozen"), hn.GELU(), hn.Flatten(),
                           hn.Dense(4 * 4 * 4, 3)])
    model[0].weight.requires_grad = False
    model[4].bias.requires_grad = False
    if path == "eager":
        layers = model.layers                    # no .to(): the parameters stay separate arrays
        params = [p for lyr in layers for p in lyr.parameters()]
    else:
        model.to("cpu")
        params = model.parameters()
    before = {id(p): p.data.copy() for p in params}
    optimizer = OPTIMISERS[opt](params)
    if path == "train-step":
        step = T.make_train_step(model, optimizer)
        for _ in range(3):
            step.step(x, y)
    else:
        for _ in range(3):
            model.zero_grad()
            logits = model.forward(x)
            _, d = hn.losses.softmax_cross_entropy(logits, y)
            model.backward(d)
            optimizer.step()
    for p in params:
        if p.requires_grad:
            assert np.any(p.data != before[id(p)])
        else:
            np.testing.assert_array_equal(p.data, before[id(p)], err_msg=f"frozen {p!r} changed under {opt}")


@pytest.mark.parametrize("device", DEVICES[1:])
def test_train_step_follows_flags_flipped_between_steps(device, rng, monkeypatch):
    """airbench's pattern -- the first layer's bias trains, then is frozen -- and back, through the backend's train
    step (cuda: captured and replayed) with parameter groups: each flip resets the step's runner once (the launches
    changed; cuda captures again), a parameter keeps its value bit for bit while frozen, and the weights follow the
    float64 reference's eager steps."""
    x = f32(rng, 6, 2, 6, 6).astype(np.float32)
    y = rng.integers(0, 3, 6)

    def make():
        return hn.Sequential([hn.Conv2D(2, 4, 2), hn.GELU(), hn.Conv2D(4, 4, 3, padding=1, bias=False),
                              hn.BatchNorm2D(4, scale="frozen"), hn.GELU(), hn.Flatten(), hn.Dense(4 * 5 * 5, 3)])

    hn.seed(5)
    start = make().state_dict()
    phases = [0, 0, 1, 1, 1, 2, 2]      # 1: the first bias frozen; 2: it trains again, the dense weight frozen
    finals = []
    for dev in ("reference", device):
        model = make()
        model.load_state_dict(start)
        model.to(dev)
        b = model.backend
        bn_bias = model[3].bias
        opt = hn.optim.SGD([{"params": [p for p in model.parameters() if p is not bn_bias]},
                            {"params": [bn_bias], "lr": 0.5, "weight_decay": 0.0}],
                           lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-3)
        step = T.make_train_step(model, opt, hn.optim.TriangularLR(opt, total_steps=len(phases)))
        resets, real = [], step.runner.reset
        monkeypatch.setattr(step.runner, "reset", lambda real=real, resets=resets: (resets.append(1), real())[1])
        for phase in phases:
            for p, trains in ((model[0].bias, phase != 1), (model[6].weight, phase != 2)):
                if p.requires_grad != trains:
                    p.requires_grad = trains
            frozen = {k: v for k, v in model.state_dict().items() if k in ("0.bias", "6.weight")}
            step.step(b.asarray(x), b.labels(y))
            after = model.state_dict()
            for k, v in frozen.items():
                moved = not np.array_equal(after[k], v)
                assert moved == (k == "0.bias" and phase != 1 or k == "6.weight" and phase != 2), (phase, k)
        step.collect()
        assert len(resets) == 2
        finals.append(model.state_dict())
    for k in start:
        assert_close(finals[1][k], finals[0][k], np.float32, k)
