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


# --- parameter groups ----------------------------------------------------------------------------------------------
# Groups that interleave in the flat buffer (params 0 and 2, params 1 and 3), so a group's update is several runs.

GROUP_CASES = [
    ("SGD", {"lr": 0.1, "momentum": 0.85, "nesterov": True, "weight_decay": 5e-3},
     [{"lr": 0.05}, {"lr": 3.2, "weight_decay": 0.0}]),
    ("SGD", {"lr": 0.1, "momentum": 0.9, "dampening": 0.2},
     [{"weight_decay": 0.01}, {"lr": 0.3, "momentum": 0.0, "dampening": 0.0}]),
    ("Adam", {"lr": 1e-2, "weight_decay": 0.01}, [{}, {"lr": 3e-2, "betas": (0.8, 0.95), "eps": 1e-6}]),
    ("AdamW", {"lr": 1e-2, "weight_decay": 0.1}, [{"weight_decay": 0.0}, {"lr": 5e-3}]),
]
GROUP_OF = [[0, 2], [1, 3]]


def group_id(c):
    return f"{c[0]}-" + "-".join(f"{k}{v}" for k, v in c[1].items())


def grouped(params, extras):
    return [{"params": [params[i] for i in idx], **extra} for idx, extra in zip(GROUP_OF, extras)]


def triangle_factor(steps, start, end, peak):
    """airbench's triangle (utils.train), in float64 NumPy: the factor for steps 0..steps."""
    xp = np.array([0, int(peak * steps), steps], dtype=np.float64)
    fp = np.array([start, 1, end], dtype=np.float64)
    x = np.arange(1 + steps, dtype=np.float64)
    m = (fp[1:] - fp[:-1]) / (xp[1:] - xp[:-1])
    b = fp[:-1] - (m * xp[:-1])
    indices = np.clip(np.sum(x[:, None] >= xp[None, :], 1) - 1, 0, len(m) - 1)
    return m[indices] * x + b[indices]


def frozen_plan(step: int, n: int) -> list[bool]:
    """requires_grad per parameter at a step: parameter 1 frozen for steps 2-3, parameter 2 from step 4 on."""
    return [True, not 2 <= step < 4, step < 4, True][:n]


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "per-param"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", GROUP_CASES, ids=group_id)
def test_groups_and_frozen_parameters_vs_torch(case, device, flat, rng):
    """Two interleaved groups with their own hyperparameters under a triangular schedule (torch: LambdaLR), with
    parameters frozen for some steps (torch: no gradient): the same weights as torch.optim step by step, and a
    frozen parameter bit for bit unchanged. Adam's bias corrections count the optimiser's steps, torch's those of
    each parameter, so for Adam the frozen ones stay frozen to the end."""
    torch = torch_or_skip()
    name, hyper, extras = case
    b = get_backend(device)
    tdtype = torch.float64 if np.dtype(b.dtype) == np.float64 else torch.float32
    steps = 6
    init = [f32(rng, *s) for s in SHAPES]
    grads = [[f32(rng, *s) for s in SHAPES] for _ in range(steps)]
    plan = (lambda t: [True, t < 2, False, True]) if name != "SGD" else (lambda t: frozen_plan(t, 4))

    params = make_params(device, flat, init)
    opt = getattr(hn.optim, name)(grouped(params, extras), **hyper)
    assert opt._flat == flat and opt.n_scalars == 2 * opt.n_group_scalars
    sched = hn.optim.TriangularLR(opt, total_steps=steps, peak=0.4, start=0.3, end=0.1)
    tparams = [torch.tensor(a, dtype=tdtype, requires_grad=True) for a in init]
    topt = getattr(torch.optim, name)(grouped(tparams, extras), **hyper)
    factors = triangle_factor(steps, 0.3, 0.1, 0.4)
    tsched = torch.optim.lr_scheduler.LambdaLR(topt, lambda i: float(factors[min(i, steps)]))
    for t, gs in enumerate(grads):
        for p, tp, g, trains in zip(params, tparams, gs, plan(t)):
            p.requires_grad = trains
            p.grad = g if trains else np.zeros_like(g)
            tp.grad = torch.tensor(g, dtype=tdtype) if trains else None
        before = [b.to_numpy(p.data).copy() for p in params]
        for g, tg in zip(opt.param_groups, topt.param_groups):
            assert g["lr"] == pytest.approx(tg["lr"], rel=1e-12), f"step {t + 1}: lr"
        opt.step()
        sched.step()
        topt.step()
        tsched.step()
        for i, (p, tp) in enumerate(zip(params, tparams)):
            got = b.to_numpy(p.data)
            if not p.requires_grad:
                np.testing.assert_array_equal(got, before[i], err_msg=f"step {t + 1}: frozen param {i} changed")
            assert_close(got - init[i], tp.detach().double().numpy() - init[i], b.dtype, f"step {t + 1} param {i}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", GROUP_CASES, ids=group_id)
def test_update_reads_each_groups_block_of_scalars(case, device, rng):
    """update(scalars) -- the replayed step's path, reading the learning rates and corrections from a device array
    -- equals update() from the groups' own values, group k reading block k of scalars()."""
    name, hyper, extras = case
    b = get_backend(device)
    init = [f32(rng, *s) for s in SHAPES]
    grads = [[f32(rng, *s) for s in SHAPES] for _ in range(3)]
    runs = []
    for from_array in (False, True):
        params = make_params(device, True, init)
        opt = getattr(hn.optim, name)(grouped(params, extras), **hyper)
        sched = hn.optim.CosineLR(opt, total_steps=4)
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g
            values = opt.scalars()
            assert len(values) == opt.n_scalars
            for k, g in enumerate(opt.param_groups):
                assert values[k * opt.n_group_scalars] == g["lr"]
            opt.update(b.asarray(np.array(values)) if from_array else None)
            opt.count_step()
            sched.step()
        runs.append([b.to_numpy(p.data) for p in params])
    for i, (x, y) in enumerate(zip(*runs)):
        assert_close(x, y, b.dtype, f"param {i}")


def test_group_arguments_and_attributes():
    ps = [hn.Parameter(np.zeros(2)) for _ in range(3)]
    opt = hn.optim.SGD([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.5, "momentum": 0.0}], lr=0.1, momentum=0.9)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.5] and opt.param_groups[1]["nesterov"] is False
    assert opt.lr == 0.1 and opt.momentum == 0.9          # attributes read the first group
    assert opt.state_names == ("momentum_buffer",)
    with pytest.raises(ValueError, match="2 parameter groups: set param_groups\\[i\\]\\['lr'\\]"):
        opt.lr = 0.2
    single = hn.optim.SGD(ps, lr=0.1)
    single.lr = 0.2
    assert single.param_groups[0]["lr"] == 0.2
    for groups, kw, msg in (
            ([{"params": ps[:1]}, {"params": ps[:2]}], {}, "more than one parameter group"),
            ([{"params": ps, "beta": 0.9}], {}, "unknown key\\(s\\) beta"),
            ([{"params": ps[:1]}, ps[1]], {}, "not a mix"),
            ([{"params": ps, "lr": -1.0}], {}, "lr must be a positive"),
            ([{"params": ps[:1]}, {"params": ps[1:], "nesterov": True, "momentum": 0.0}], {},
             "parameter group 1\\): Nesterov")):
        with pytest.raises(ValueError, match=msg):
            hn.optim.SGD(groups, lr=0.1, **kw)
    with pytest.raises(TypeError, match="needs 'params'"):
        hn.optim.SGD([{"lr": 0.1}], lr=0.1)
    shared = hn.Parameter(np.zeros(2))
    assert hn.optim.SGD([shared, shared], lr=0.1).params == [shared]      # a layer used twice


def test_signature_follows_flags_and_hyperparameters_not_lr():
    ps = [hn.Parameter(np.zeros(2)) for _ in range(2)]
    opt = hn.optim.SGD([{"params": ps[:1]}, {"params": ps[1:]}], lr=0.1, momentum=0.9)
    sched = hn.optim.TriangularLR(opt, total_steps=10)
    sig = opt.signature()
    sched.step()
    assert opt.signature() == sig
    ps[1].requires_grad = False
    assert opt.signature() != sig
    ps[1].requires_grad = True
    assert opt.signature() == sig
    opt.param_groups[1]["weight_decay"] = 1e-4
    assert opt.signature() != sig


@pytest.mark.parametrize("device", DEVICES)
def test_groups_state_dict_round_trip_continues_exactly(device, rng):
    """Groups, a frozen parameter and a schedule: 3 steps, state saved (through JSON, as a checkpoint stores it),
    loaded into fresh objects, 3 more steps: bit for bit the 6 uninterrupted steps. Loading into other groups is
    refused."""
    import json

    _, hyper, extras = GROUP_CASES[0]
    init = [f32(rng, *s) for s in SHAPES]
    grads = [[f32(rng, *s) for s in SHAPES] for _ in range(6)]

    def build(values):
        params = make_params(device, True, values)
        params[2].requires_grad = False
        opt = hn.optim.SGD(grouped(params, extras), **hyper)
        return params, opt, hn.optim.TriangularLR(opt, total_steps=6)

    def run(params, opt, sched, gs):
        for g_step in gs:
            for p, g in zip(params, g_step):
                p.grad = g
            opt.step()
            sched.step()
        return [p.backend.to_numpy(p.data).copy() for p in params]

    straight = run(*build(init), grads)
    params, opt, sched = build(init)
    half = run(params, opt, sched, grads[:3])
    state = opt.state_dict()
    meta = json.loads(json.dumps({k: v for k, v in state.items() if k != "arrays"}))
    assert [g["params"] for g in meta["groups"]] == [[0, 1], [2, 3]] and meta["groups"][1]["lr"] != hyper["lr"]
    sched_state = json.loads(json.dumps(sched.state_dict()))
    params2, opt2, sched2 = build(half)
    opt2.load_state_dict({**meta, "arrays": state["arrays"]})
    sched2.load_state_dict(sched_state)
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
    resumed = run(params2, opt2, sched2, grads[3:])
    for i, (x, y) in enumerate(zip(resumed, straight)):
        np.testing.assert_array_equal(x, y, err_msg=f"param {i}")
    np.testing.assert_array_equal(resumed[2], init[2].astype(resumed[2].dtype))

    one = hn.optim.SGD(make_params(device, True, init), **hyper)
    with pytest.raises(ValueError, match="groups of sizes \\[2, 2\\], this SGD \\[4\\]"):
        one.load_state_dict(state)
    with pytest.raises(ValueError, match="2 base learning rates, the optimiser 1"):
        hn.optim.ConstantLR(one).load_state_dict(sched_state)
    legacy = {k: v for k, v in one.state_dict().items() if k != "groups"}      # before groups: 'hyper' only
    one.load_state_dict(legacy)


# --- airbench's decoupled hyperparameters and triangular schedule ---------------------------------------------------


def test_triangular_schedule():
    """airbench94's triangle(total, start=0.2, end=0.07, peak=0.23) step by step, then flat at its end."""
    total = 97
    got = lrs(lambda o: hn.optim.TriangularLR(o, total_steps=total), total + 3)
    want = triangle_factor(total, 0.2, 0.07, 0.23)
    assert got[:total + 1] == pytest.approx(list(want), rel=1e-12, abs=1e-15)
    assert got[total:] == pytest.approx([0.07] * 3)
    up = int(0.23 * total)
    assert got[0] == pytest.approx(0.2) and got[up] == 1.0 and max(got) == 1.0
    assert lrs(lambda o: hn.optim.TriangularLR(o, total_steps=4, peak=0.0, start=0.5, end=0.0), 5) == \
        pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    with pytest.raises(ValueError, match="peak must be in"):
        hn.optim.TriangularLR(hn.optim.SGD([hn.Parameter(np.zeros(1))], lr=1.0), total_steps=4, peak=1.0)


def test_decoupled_hyperparameters_by_hand():
    # kilostep = 1024 * (1 + 1/(1 - 0.75)) = 5120; lr' = s lr B / 5120; wd' = wd / (s lr)
    assert hn.optim.decoupled_sgd(10.0, 0.02, 0.75, 512) == pytest.approx({"lr": 1.0, "weight_decay": 0.002})
    assert hn.optim.decoupled_sgd(10.0, 0.02, 0.75, 512, lr_scale=64.0) == \
        pytest.approx({"lr": 64.0, "weight_decay": 0.002 / 64})
    for kw, msg in (({"momentum": 1.0}, "momentum"), ({"batch_size": 0}, "batch_size"), ({"lr": 0.0}, "lr"),
                    ({"weight_decay": -1.0}, "weight_decay")):
        with pytest.raises(ValueError, match=msg):
            hn.optim.decoupled_sgd(**{"lr": 1.0, "weight_decay": 0.0, "momentum": 0.5, "batch_size": 8, **kw})


def test_decoupled_sgd_equals_airbench_step_by_step():
    """airbench's optimiser (utils.train: torch.optim.SGD, Nesterov, on a loss summed over the batch, groups
    lr = s * lr / kilostep and weight_decay = wd * B / kilostep / lr_group, BatchNorm biases at s = 64, LambdaLR
    over its triangle) against hetnet's SGD with decoupled_sgd's groups on the gradient of the batch mean (sum / B)
    and TriangularLR: the same weights at every step, float64."""
    torch = torch_or_skip()
    rng = np.random.default_rng(0)
    lr, wd, momentum, batch, bias_scaler, steps = 11.5, 0.0153, 0.85, 64, 64.0, 12
    shapes = [(6, 3, 2, 2), (6,), (5, 6)]        # a conv weight, BatchNorm biases, a dense weight
    init = [rng.normal(size=s) for s in shapes]
    sums = [[batch * rng.normal(size=s) for s in shapes] for _ in range(steps)]   # d(summed loss)/dw

    kilostep = 1024 * (1 + 1 / (1 - momentum))
    t_lr = lr / kilostep
    t_wd = wd * batch / kilostep
    tp = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in init]
    lr_bias = t_lr * bias_scaler
    topt = torch.optim.SGD([{"params": [tp[1]], "lr": lr_bias, "weight_decay": t_wd / lr_bias},
                            {"params": [tp[0], tp[2]], "lr": t_lr, "weight_decay": t_wd / t_lr}],
                           momentum=momentum, nesterov=True)
    factors = triangle_factor(steps, 0.2, 0.07, 0.23)
    tsched = torch.optim.lr_scheduler.LambdaLR(topt, lambda i: float(factors[i]))

    ref = get_backend("reference")
    ps = [hn.Parameter(a, ref) for a in init]
    groups = [{"params": [ps[1]], **hn.optim.decoupled_sgd(lr, wd, momentum, batch, lr_scale=bias_scaler)},
              {"params": [ps[0], ps[2]], **hn.optim.decoupled_sgd(lr, wd, momentum, batch)}]
    opt = hn.optim.SGD(groups, lr=1.0, momentum=momentum, nesterov=True)
    sched = hn.optim.TriangularLR(opt, total_steps=steps)
    for t, gs in enumerate(sums):
        for p, q, g in zip(ps, tp, gs):
            p.grad = g / batch
            q.grad = torch.tensor(g)
        opt.step()
        sched.step()
        topt.step()
        tsched.step()
        for i, (p, q) in enumerate(zip(ps, tp)):
            assert_close(p.data - init[i], q.detach().numpy() - init[i], np.float64, f"step {t + 1} param {i}")
