"""Whole training steps (forward, loss, backward, SGD + momentum update) give the same weights on every backend as
on the float64 reference, starting from identical weights."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_close

import hetnet as hn
from hetnet import zoo
from hetnet.device import cuda_available, get_backend

BACKENDS = ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.gpu)] if cuda_available() else [])


def bn_dropout_model():
    return hn.Sequential([
        hn.Conv2D(3, 8, 3, padding=1, bias=False), hn.BatchNorm2D(8), hn.ReLU(), hn.MaxPool2D(2),
        hn.Conv2D(8, 8, 3, stride=2, padding=1), hn.ReLU(), hn.Flatten(),
        hn.Dense(8 * 4 * 3, 16, bias=False), hn.BatchNorm1D(16), hn.ReLU(), hn.Dropout(0.3), hn.Dense(16, 5),
    ])


MODELS = {  # name: (builder, input shape, classes)
    "thesis-m1": (lambda: zoo.build("thesis-m1"), (3, 32, 32), 10),
    "bn-dropout": (bn_dropout_model, (3, 15, 13), 5),
}


def train(model, device, batches, steps_seed, opt_kw):
    """SGD + momentum steps on the given batches; returns per-step (loss, dlogits, grads) and the final state."""
    b = get_backend(device)
    model.to(device).train()
    opt = hn.optim.SGD(model.parameters(), **opt_kw)
    trace = []
    for i, (x, y) in enumerate(batches):
        hn.seed(steps_seed + i)                  # the same dropout masks on every backend
        logits = model.forward(b.asarray(x))
        loss, dlogits = hn.losses.softmax_cross_entropy(logits, y, label_smoothing=0.05)
        opt.zero_grad()
        model.backward(dlogits, need_dx=False)
        trace.append((loss, b.to_numpy(logits), [b.to_numpy(p.grad).copy() for p in model.parameters()]))
        opt.step()
    return trace, model.state_dict()


@pytest.mark.parametrize("device", BACKENDS)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_training_steps_match_reference(name, device, rng):
    build, shape, classes = MODELS[name]
    hn.seed(int(rng.integers(1 << 30)))
    model = build()
    start = model.state_dict()
    other = build()
    other.load_state_dict(start)
    batches = [(rng.normal(size=(4,) + shape).astype(np.float32), rng.integers(0, classes, size=4))
               for _ in range(3)]
    seed = int(rng.integers(1 << 30))
    opt_kw = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4}
    ref_trace, ref_state = train(model, "reference", batches, seed, opt_kw)
    got_trace, got_state = train(other, device, batches, seed, opt_kw)
    dtype = get_backend(device).dtype
    for step, ((rl, rz, rg), (gl, gz, gg)) in enumerate(zip(ref_trace, got_trace)):
        assert_close(np.array(gl), np.array(rl), dtype, f"step {step + 1} loss")
        assert_close(gz, rz, dtype, f"step {step + 1} logits")
        for k, (a, e) in enumerate(zip(gg, rg)):
            assert_close(a, e, dtype, f"step {step + 1} gradient {k}")
    for k in ref_state:
        # the weights, and what the three steps changed (the update, so small differences are not hidden)
        assert_close(got_state[k], ref_state[k], dtype, f"final {k}")
        moved = ref_state[k] - start[k]
        if np.abs(moved).max() > 0:
            assert_close(got_state[k] - start[k], moved, dtype, f"update of {k}")
    if name == "bn-dropout":
        assert not np.array_equal(ref_state["1.running_mean"], start["1.running_mean"])
