"""Optimisers and schedules: vs torch.optim step by step (when torch is installed), vs small hand-computed examples
(always), state_dict round trips that continue the exact trajectory, and the flat-buffer path vs the per-parameter
path."""
from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import assert_close, torch_or_skip

import hetnet as hn
from hetnet.device import cuda_available, get_backend

DEVICES = ["reference", "cpu"] + ([pytest.param("cuda", marks=pytest.mark.gpu)] if cuda_available() else [])

SHAPES = [(4, 3), (4,), (2, 4), (2,)]        # Dense(3, 4) -> Dense(4, 2)

CASES = [
    ("SGD", {"lr": 0.1}),
    ("SGD", {"lr": 0.1, "momentum": 0.9}),
    ("SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}),
    ("SGD", {"lr": 0.1, "momentum": 0.8, "dampening": 0.3, "weight_decay": 0.01}),
    ("Adam", {"lr": 1e-2}),
    ("Adam", {"lr": 1e-2, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.01}),
    ("AdamW", {"lr": 1e-2}),
    ("AdamW", {"lr": 1e-2, "betas": (0.85, 0.95), "weight_decay": 0.1}),
]


def case_id(c):
    return c[0] + "-" + "-".join(f"{k}{v}" for k, v in c[1].items())


def f32(rng, *shape):
    return rng.normal(size=shape).astype(np.float32).astype(np.float64)


def make_params(device: str, flat: bool, init: list[np.ndarray]) -> list[hn.Parameter]:
    """Parameters holding `init`: views of one flat buffer (a Sequential after .to) or standalone arrays."""
    if flat:
        model = hn.Sequential([hn.Dense(3, 4), hn.ReLU(), hn.Dense(4, 2)]).to(device)
        params = model.parameters()
        for p, a in zip(params, init):
            p.data = a
        return params
    return [hn.Parameter(a, get_backend(device)) for a in init]


def run_steps(name, hyper, device, flat, init, grads, schedule=None):
    """All steps with the given gradient sequence; returns the parameters (host copies) after every step."""
    params = make_params(device, flat, init)
    opt = getattr(hn.optim, name)(params, **hyper)
    assert opt._flat == flat, "the optimiser did not take the expected path"
    sched = schedule(opt) if schedule else None
    out = []
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g
        opt.step()
        if sched:
            sched.step()
        out.append([p.backend.to_numpy(p.data).copy() for p in params])
    return out


# --- vs PyTorch ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "per-param"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_optimizer_vs_torch(case, device, flat, rng):
    torch = torch_or_skip()
    name, hyper = case
    b = get_backend(device)
    tdtype = torch.float64 if np.dtype(b.dtype) == np.float64 else torch.float32
    init = [f32(rng, *s) for s in SHAPES]
    grads = [[f32(rng, *s) for s in SHAPES] for _ in range(5)]
    ours = run_steps(name, hyper, device, flat, init, grads)
    tparams = [torch.tensor(a, dtype=tdtype, requires_grad=True) for a in init]
    topt = getattr(torch.optim, name)(tparams, **hyper)
    for step, gs in enumerate(grads):
        for tp, g in zip(tparams, gs):
            tp.grad = torch.tensor(g, dtype=tdtype)
        topt.step()
        for i, tp in enumerate(tparams):
            want = tp.detach().double().numpy()
            # compare the change from the start (the update), not just the weights, so errors are not hidden
            assert_close(ours[step][i] - init[i], want - init[i], b.dtype, f"{name} step {step + 1} param {i}")


@pytest.mark.parametrize("schedule", ["step", "cosine"])
def test_schedules_vs_torch(schedule):
    """StepLR and CosineLR (no warm-up, min 0) give torch's learning rates step by step."""
    torch = torch_or_skip()
    tp = torch.zeros(1, requires_grad=True)
    topt = torch.optim.SGD([tp], lr=0.5)
    opt = hn.optim.SGD([hn.Parameter(np.zeros(1), get_backend("reference"))], lr=0.5)
    if schedule == "step":
        ts = torch.optim.lr_scheduler.StepLR(topt, step_size=3, gamma=0.5)
        hs = hn.optim.StepLR(opt, step_size=3, gamma=0.5)
    else:
        ts = torch.optim.lr_scheduler.CosineAnnealingLR(topt, T_max=10)
        hs = hn.optim.CosineLR(opt, total_steps=10)
    for t in range(11):          # torch's cosine is periodic beyond T_max; hetnet's stays at the minimum
        assert opt.lr == pytest.approx(topt.param_groups[0]["lr"], rel=1e-12, abs=1e-15), f"step {t}"
        topt.step()
        ts.step()
        hs.step()


# --- hand-computed examples (no torch) -----------------------------------------------------------------------------


def scalar_run(name, hyper, grads, p0=1.0):
    p = hn.Parameter(np.array([p0]), get_backend("reference"))
    opt = getattr(hn.optim, name)([p], **hyper)
    out = []
    for g in grads:
        p.grad = np.array([g])
        opt.step()
        out.append(float(p.data[0]))
    return out


def test_sgd_by_hand():
    # plain: p -= lr g
    assert scalar_run("SGD", {"lr": 0.1}, [0.5, 0.5]) == pytest.approx([0.95, 0.9])
    # momentum: buf1 = g = 0.5, p = 1 - 0.05 = 0.95; buf2 = 0.9*0.5 + 0.5 = 0.95, p = 0.95 - 0.095 = 0.855
    assert scalar_run("SGD", {"lr": 0.1, "momentum": 0.9}, [0.5, 0.5]) == pytest.approx([0.95, 0.855])
    # nesterov: buf1 = 0.5, d = 0.5 + 0.9*0.5 = 0.95, p = 0.905; buf2 = 0.95, d = 0.5 + 0.855 = 1.355, p = 0.7695
    assert scalar_run("SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True}, [0.5, 0.5]) == \
        pytest.approx([0.905, 0.7695])
    # weight decay: d = 0.5 + 0.1*1 = 0.6, p = 0.94; d = 0.5 + 0.094 = 0.594, p = 0.8806
    assert scalar_run("SGD", {"lr": 0.1, "weight_decay": 0.1}, [0.5, 0.5]) == pytest.approx([0.94, 0.8806])
    # dampening 0.5: buf1 = 0.5 (first step undamped), p = 0.95; buf2 = 0.45 + 0.25 = 0.7, p = 0.88
    assert scalar_run("SGD", {"lr": 0.1, "momentum": 0.9, "dampening": 0.5}, [0.5, 0.5]) == \
        pytest.approx([0.95, 0.88])


def test_adam_by_hand():
    # step 1: m = 0.1 g, v = 0.001 g^2 -> m_hat = g, v_hat = g^2: p -= lr * g / (|g| + eps)
    eps = 1e-8
    first = 1.0 - 0.1 * 0.5 / (0.5 + eps)
    assert scalar_run("Adam", {"lr": 0.1}, [0.5]) == pytest.approx([first], abs=1e-15)
    # step 2 with g = -0.5: m = 0.9*0.05 - 0.05 = -0.005, m_hat = -0.005/0.19; v = 0.999*0.00025 + 0.00025
    m, v = 0.9 * 0.05 + 0.1 * -0.5, 0.999 * 0.00025 + 0.001 * 0.25
    second = first - 0.1 * (m / 0.19) / (math.sqrt(v / (1 - 0.999 ** 2)) + eps)
    assert scalar_run("Adam", {"lr": 0.1}, [0.5, -0.5]) == pytest.approx([first, second], abs=1e-15)
    # Adam's L2: d = g + wd p = 0.6 -> the step is still ~lr
    assert scalar_run("Adam", {"lr": 0.1, "weight_decay": 0.1}, [0.5]) == pytest.approx([0.9], abs=1e-7)
    # AdamW: p *= 1 - lr wd = 0.99, then p -= ~lr
    assert scalar_run("AdamW", {"lr": 0.1, "weight_decay": 0.1}, [0.5]) == pytest.approx([0.89], abs=1e-7)
    # AdamW's default weight decay is 0.01
    assert hn.optim.AdamW([hn.Parameter(np.zeros(1))]).weight_decay == 0.01


def test_optimizer_argument_errors():
    p = [hn.Parameter(np.zeros(2))]
    with pytest.raises(ValueError, match="no parameters"):
        hn.optim.SGD([], lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        hn.optim.SGD(p, lr=-1.0)
    with pytest.raises(ValueError, match="Nesterov"):
        hn.optim.SGD(p, lr=0.1, nesterov=True)


# --- schedules -----------------------------------------------------------------------------------------------------


def lrs(make, n):
    opt = hn.optim.SGD([hn.Parameter(np.zeros(1))], lr=1.0)
    sched = make(opt)
    out = []
    for _ in range(n):
        out.append(opt.lr)
        assert sched.lr == opt.lr
        opt.step()
        sched.step()
    return out


def test_step_schedule():
    assert lrs(lambda o: hn.optim.StepLR(o, step_size=2, gamma=0.5), 6) == pytest.approx(
        [1, 1, 0.5, 0.5, 0.25, 0.25])
    # warm-up: linear (t+1)/warmup for t < warmup, then the schedule starts at its own t = 0
    assert lrs(lambda o: hn.optim.StepLR(o, step_size=2, gamma=0.5, warmup_steps=4), 8) == pytest.approx(
        [0.25, 0.5, 0.75, 1, 1, 1, 0.5, 0.5])


def test_cosine_schedule():
    got = lrs(lambda o: hn.optim.CosineLR(o, total_steps=10), 12)
    want = [0.5 * (1 + math.cos(math.pi * t / 10)) for t in range(11)] + [0.0]
    assert got == pytest.approx(want, abs=1e-12)
    assert got[5] == pytest.approx(0.5) and got[10] == pytest.approx(0.0)
    # warm-up 2 of 10: 0.5, 1, then cosine over the remaining 8 steps down to min_factor
    got = lrs(lambda o: hn.optim.CosineLR(o, total_steps=10, warmup_steps=2, min_factor=0.1), 11)
    assert got[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert got[6] == pytest.approx(0.1 + 0.9 * 0.5)
    assert got[10] == pytest.approx(0.1)


def test_onecycle_schedule():
    got = lrs(lambda o: hn.optim.OneCycleLR(o, total_steps=10, pct_start=0.3, div=25.0, final_div=1e4), 12)
    lo = 1 / 25
    # up for 3 steps from base/div to base, then linear down over 7 steps to base/final_div, then flat
    want = [lo, lo + (1 - lo) / 3, lo + 2 * (1 - lo) / 3, 1.0] + \
        [1 - (1 - 1e-4) * k / 7 for k in range(1, 8)] + [1e-4]
    assert got == pytest.approx(want, abs=1e-12)
    assert max(got) == 1.0 and got.index(1.0) == 3


# --- state round trip ----------------------------------------------------------------------------------------------

SCHEDULES = {
    "cosine-warmup": lambda o: hn.optim.CosineLR(o, total_steps=8, warmup_steps=2),
    "onecycle": lambda o: hn.optim.OneCycleLR(o, total_steps=8),
    "step": lambda o: hn.optim.StepLR(o, step_size=2, gamma=0.7),
}


@pytest.mark.parametrize("sched_name", sorted(SCHEDULES))
@pytest.mark.parametrize("case", [CASES[2], CASES[3], CASES[5], CASES[7]], ids=case_id)
@pytest.mark.parametrize("device", DEVICES)
def test_state_dict_round_trip_continues_exactly(case, sched_name, device, rng):
    """Train 3 steps, save model/optimiser/schedule state, load into fresh objects and train 3 more: the same
    weights, bit for bit, as 6 uninterrupted steps."""
    name, hyper = case
    make_sched = SCHEDULES[sched_name]
    init = [f32(rng, *s) for s in SHAPES]
    grads = [[f32(rng, *s) for s in SHAPES] for _ in range(6)]
    straight = run_steps(name, hyper, device, True, init, grads, make_sched)

    params = make_params(device, True, init)
    opt = getattr(hn.optim, name)(params, **hyper)
    sched = make_sched(opt)
    for gs in grads[:3]:
        for p, g in zip(params, gs):
            p.grad = g
        opt.step()
        sched.step()
    saved_params = [p.backend.to_numpy(p.data).copy() for p in params]
    opt_state, sched_state = opt.state_dict(), sched.state_dict()
    for p in params:            # the saved state must not alias live arrays
        p.data = np.full(p.shape, 7.0)
    opt.step()
    sched.step()

    params2 = make_params(device, True, saved_params)
    opt2 = getattr(hn.optim, name)(params2, **hyper)
    sched2 = make_sched(opt2)
    opt2.load_state_dict(opt_state)
    sched2.load_state_dict(sched_state)
    for step, gs in enumerate(grads[3:], start=3):
        for p, g in zip(params2, gs):
            p.grad = g
        opt2.step()
        sched2.step()
        for i, p in enumerate(params2):
            np.testing.assert_array_equal(p.backend.to_numpy(p.data), straight[step][i],
                                          err_msg=f"step {step + 1} param {i} after resume")


def test_load_state_dict_rejects_other_optimizer():
    p = [hn.Parameter(np.zeros(2))]
    state = hn.optim.Adam(p).state_dict()
    with pytest.raises(ValueError, match="Adam"):
        hn.optim.SGD(p, lr=0.1, momentum=0.9).load_state_dict(state)


# --- flat buffer vs per-parameter ----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_flat_and_per_parameter_paths_agree(case, device, rng):
    name, hyper = case
    init = [f32(rng, *s) for s in SHAPES]
    grads = [[f32(rng, *s) for s in SHAPES] for _ in range(4)]
    flat = run_steps(name, hyper, device, True, init, grads)
    per = run_steps(name, hyper, device, False, init, grads)
    for step, (a, b) in enumerate(zip(flat, per)):
        for i, (x, y) in enumerate(zip(a, b)):
            assert not np.array_equal(x, init[i].astype(x.dtype))
            np.testing.assert_array_equal(x, y, err_msg=f"{name} step {step + 1} param {i}")


def test_flat_path_is_one_update_per_run(monkeypatch, rng):
    """A Sequential after .to() is updated with one backend call per step; a subset of its parameters with one
    call per run of neighbours in the flat buffer; loose parameters with one call each."""
    b = get_backend("reference")
    calls = []
    real = b.sgd_update
    monkeypatch.setattr(b, "sgd_update", lambda *a, **k: (calls.append(a[0].shape), real(*a, **k))[1])
    model = hn.Sequential([hn.Dense(3, 4), hn.ReLU(), hn.Dense(4, 2)]).to("reference")
    ps = model.parameters()
    hn.optim.SGD(ps, lr=0.1, momentum=0.9).step()
    assert calls == [(12 + 4 + 8 + 2,)]
    for subset, want in (([ps[0], ps[1]], [(16,)]), ([ps[3], ps[0]], [(12,), (2,)]), ([ps[1], ps[2]], [(12,)])):
        calls.clear()
        hn.optim.SGD(subset, lr=0.1).step()
        assert calls == want
    calls.clear()
    hn.optim.SGD([hn.Parameter(np.zeros((4, 3)), b), hn.Parameter(np.zeros(4), b)], lr=0.1).step()
    assert calls == [(4, 3), (4,)]
