"""The cpu backend's step objects (hetnet.backends._cpu_step): Conv2D -> ReLU -> MaxPool2D(2) and
BatchNorm2D -> ReLU -> MaxPool2D(2) each fused into one compiled op. The conv fusion must give exactly the
layer-by-layer model's outputs and gradients (same float32 operations in the same order); the batch-norm fusion its
outputs exactly and its gradients within the float32 tolerance (float64 sums in another order); both fused ops must
match the float64 reference within the float32 tolerance."""
from __future__ import annotations

import numpy as np
import pytest

import hetnet as hn
from hetnet.backends import _cpu_step, cpu, reference
from hetnet.backends.cpu import _jit as _cpu_jit
from hetnet.backends._cpu_step import FusedPlan, _FusedConvReluPool
from hetnet.train import EvalStep, TrainStep, make_eval_step, make_train_step

from conftest import assert_close

needs_jit = pytest.mark.skipif(cpu._common.SGEMM is None, reason="compiled cpu paths unavailable (Numba or OpenBLAS)")


def _model(c_in, conv_args, tail_in, extra_first=()):
    """extra_first: layers put before the first conv (so that its d(input) is needed)."""
    layers = list(extra_first) + [hn.Conv2D(c_in, 6, **conv_args), hn.ReLU(), hn.MaxPool2D(2),
                                  hn.Conv2D(6, 5, 3, padding=1, bias=False), hn.ReLU(), hn.MaxPool2D(2),
                                  hn.Flatten(), hn.Dense(tail_in, 7), hn.ReLU(), hn.Dense(7, 3)]
    return hn.Sequential(layers).to("cpu")


CASES = [  # (batch, C, H, W, conv args, flattened features after the two pools)
    (1, 3, 8, 8, dict(kernel_size=3, padding=1), 5 * 2 * 2),
    (5, 2, 9, 11, dict(kernel_size=3, padding=1), 5 * 2 * 2),                  # odd sizes: pools floor
    (4, 3, 13, 10, dict(kernel_size=5, stride=2, padding=2), 5 * 1 * 1),      # stride 2, kernel 5
    (3, 1, 12, 12, dict(kernel_size=1, padding=0), 5 * 3 * 3),                # 1x1 kernel
    (6, 2, 10, 10, dict(kernel_size=3, stride=3, padding=2), 5 * 1 * 1),      # stride 3, padding 2
]


def _pass(net, x, y):
    logits = net.forward(x)
    loss, d = hn.losses.softmax_cross_entropy(logits, y)
    return logits, net.backward(d, need_dx=True)


@pytest.fixture
def no_dense_chain(monkeypatch):
    """Plans without _DenseChain nodes (their bias gradients are float64 sums: not the layers' bits)."""
    monkeypatch.setattr(_cpu_step, "DENSE_CHAIN_MIN", 0)


@needs_jit
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"N{c[0]}C{c[1]}{c[2]}x{c[3]}{c[4]}")
@pytest.mark.parametrize("first", [False, True], ids=["conv-first", "dense-before"])
def test_fused_plan_equals_layer_by_layer(rng, case, first, no_dense_chain):
    n, c, h, w, conv_args, tail = case
    extra = [hn.Conv2D(c, c, 3, padding=1), hn.Tanh()] if first else []
    hn.seed(int(rng.integers(1 << 30)))
    model = _model(c, conv_args, tail, extra)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    y = rng.integers(0, 3, n)
    plan = FusedPlan(model)
    out1, dx1 = _pass(model, x, y)
    g1 = [p.grad.copy() for p in model.parameters()]
    model.zero_grad()
    x_copy = x.copy()
    out2, dx2 = _pass(plan, x, y)
    g2 = [p.grad.copy() for p in model.parameters()]
    assert sum(isinstance(nd, _FusedConvReluPool) for nd in plan.nodes) == 2
    np.testing.assert_array_equal(x, x_copy)                 # the input is not modified
    np.testing.assert_array_equal(out2, out1)
    np.testing.assert_array_equal(dx2, dx1)
    for a, b in zip(g2, g1):
        np.testing.assert_array_equal(a, b)
    assert any(np.any(g != 0) for g in g2)


@needs_jit
@pytest.mark.parametrize("bias", [True, False])
def test_fused_op_matches_reference(rng, bias):
    """conv2d_relu_maxpool_* against the float64 reference's conv -> relu -> maxpool, forward and all gradients."""
    n, c, h, w, k = 3, 4, 11, 9, 5
    x = rng.standard_normal((n, c, h, w))
    wt = rng.standard_normal((k, c, 3, 3)) * 0.3
    b = rng.standard_normal(k) * 0.1 if bias else None
    dy = rng.standard_normal((n, k, h // 2, w // 2))
    y32, cache = cpu.conv2d_relu_maxpool_forward(x.astype(np.float32), wt.astype(np.float32),
                                                 None if b is None else b.astype(np.float32), 1, 1)
    dw32, db32 = np.zeros(wt.shape, np.float32), np.zeros(k, np.float32)
    dx32 = cpu.conv2d_relu_maxpool_backward(dy.astype(np.float32), cache, dw32, db32 if bias else None)
    yc, cc = reference.conv2d_forward(x, wt, b, 1, 1)
    yr, cr = reference.relu_forward(yc)
    yp, cp = reference.maxpool2d_forward(yr, 2, 2)
    dw, db = np.zeros(wt.shape), np.zeros(k)
    dx = reference.conv2d_backward(reference.relu_backward(reference.maxpool2d_backward(dy, cp), cr), cc, dw,
                                   db if bias else None)
    assert_close(y32, yp, np.float32, "forward")
    assert_close(dx32, dx, np.float32, "dx")
    assert_close(dw32, dw, np.float32, "dw")
    if bias:
        assert_close(db32, db, np.float32, "db")
    assert np.any(yc < 0) and np.any(yp > 0)       # the ReLU had something to cut


@needs_jit
def test_fused_backward_without_dx(rng):
    x = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    y, cache = cpu.conv2d_relu_maxpool_forward(x, w, None, 1, 1)
    dw = np.zeros(w.shape, np.float32)
    assert cpu.conv2d_relu_maxpool_backward(np.ones(y.shape, np.float32), cache, dw, None, need_dx=False) is None
    assert np.any(dw != 0)


@needs_jit
def test_train_step_equals_generic_step(rng, no_dense_chain):
    """Three SGD+momentum steps through the cpu step object and through the generic TrainStep: identical weights,
    losses and correct counts; the eval step likewise."""
    x = rng.standard_normal((8, 3, 12, 12)).astype(np.float32)
    y = rng.integers(0, 3, 8)
    states, sums, _ = _fused_and_generic(lambda: _model(3, dict(kernel_size=3, padding=1), 5 * 3 * 3), x, y, 7)
    for k in states[0]:
        np.testing.assert_array_equal(states[0][k], states[1][k], err_msg=k)
    assert sums[0] == sums[1]


def _fused_and_generic(make_model, x, y, seed):
    """Three SGD+momentum steps, then an evaluation pass, through the cpu step objects and through the generic
    (layer-by-layer) ones, from the same start: ([state_dict] * 2, [(train sums, eval sums)] * 2, fused plan's
    node list), fused first."""
    states, sums, nodes = [], [], None
    for fused in (True, False):
        hn.seed(seed)
        model = make_model()
        opt = hn.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        step = make_train_step(model, opt) if fused else TrainStep(model, opt)
        assert isinstance(step.model, FusedPlan) == fused
        for _ in range(3):
            step.step(x, y)
        if fused:
            nodes = step.model.nodes
        model.eval()
        ev = make_eval_step(model) if fused else EvalStep(model)
        ev.step(x, y)
        states.append(model.state_dict())
        sums.append((step.collect(), ev.collect()))
    return states, sums, nodes


def test_plan_falls_back_to_layers(monkeypatch, rng):
    """No compiled paths (or a conv output under 2x2, or a pool other than 2/2): the plan runs the layers."""
    model = hn.Sequential([hn.Conv2D(2, 3, 3), hn.ReLU(), hn.MaxPool2D(3), hn.Flatten(), hn.Dense(3, 2)]).to("cpu")
    plan = FusedPlan(model)
    plan.forward(rng.standard_normal((2, 2, 5, 5)).astype(np.float32))
    assert plan.nodes == list(model.layers)
    monkeypatch.setattr(cpu._common, "SGEMM", None)
    model = _model(3, dict(kernel_size=3, padding=1), 5 * 2 * 2)
    plan = FusedPlan(model)
    plan.forward(rng.standard_normal((2, 3, 8, 8)).astype(np.float32))
    assert plan.nodes == list(model.layers)


def test_plan_reports_bad_input_shape():
    model = _model(3, dict(kernel_size=3, padding=1), 5 * 2 * 2)
    with pytest.raises(ValueError, match="Conv2D"):
        FusedPlan(model).forward(np.zeros((2, 4, 8, 8), np.float32))


def test_jit_module_available_flag_consistent():
    assert (cpu._common.SGEMM is None) or _cpu_jit.available()


# --- BatchNorm2D -> ReLU -> MaxPool2D(2), fused ----------------------------------------------------------------------

needs_numba = pytest.mark.skipif(not _cpu_jit.available(), reason="Numba unavailable: no fused batch norm")


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
    """Odd sizes leave a row / column no window covers (its gradient comes from batch norm's sums alone). The
    output and running statistics are the three cpu ops' bits; the gradients are within float32 rounding of them
    (the sums run in another order) and of the float64 reference."""
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
    y2, cache = cpu.bn_relu_maxpool_forward(x, gamma, beta, *stats[1], 0.1, 1e-5, training)
    dx2 = cpu.bn_relu_maxpool_backward(dy, cache, *grads[1])
    yr, dxr = _bn_chain(reference, x.astype(np.float64), gamma.astype(np.float64), beta.astype(np.float64),
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


def _bn_model():
    return hn.Sequential([hn.Conv2D(2, 4, 3, padding=1, bias=False), hn.BatchNorm2D(4), hn.ReLU(), hn.MaxPool2D(2),
                          hn.Conv2D(4, 5, 3, padding=1, bias=False), hn.BatchNorm2D(5), hn.ReLU(), hn.MaxPool2D(2),
                          hn.Flatten(), hn.Dense(5 * 2 * 2, 3)]).to("cpu")


@needs_numba
def test_train_step_with_batch_norm_pools_matches_generic_step(rng):
    """fashion-cnn's pattern: the cpu step object fuses each BatchNorm2D -> ReLU -> MaxPool2D(2); three SGD steps
    and an evaluation pass agree with the generic (layer-by-layer) step within float32 rounding."""
    from hetnet.backends._cpu_step import _FusedBNReluPool

    x = rng.standard_normal((6, 2, 9, 11)).astype(np.float32)
    y = rng.integers(0, 3, 6)
    states, sums, nodes = _fused_and_generic(_bn_model, x, y, 5)
    assert sum(isinstance(nd, _FusedBNReluPool) for nd in nodes) == 2
    for k in states[0]:
        assert_close(states[0][k], states[1][k], np.float32, k)
    (t0, e0), (t1, e1) = sums
    assert t0[2] == t1[2] and e0[2] == e1[2] and abs(t0[0] - t1[0]) <= 1e-4 * abs(t1[0])


# --- Dense chains (feature-major Dense [ReLU] Dense ... runs) and the step's written gradients ---------------------

CHAINS = [  # (batch, [(in, out, bias, ReLU after)])
    (1, [(7, 5, True, True), (5, 3, True, False)]),
    (6, [(9, 8, True, True), (8, 4, False, True), (4, 3, True, False)]),
    (33, [(20, 11, False, False), (11, 6, True, True)]),         # no ReLU between; the chain ends with one
    (70, [(40, 130, True, True), (130, 10, True, False)]),
]


@needs_jit
@pytest.mark.parametrize("case", CHAINS, ids=lambda c: f"N{c[0]}-" + "-".join(f"{f}x{k}" for f, k, _, _ in c[1]))
@pytest.mark.parametrize("accumulate", [True, False])
def test_dense_chain_matches_reference(rng, case, accumulate):
    """dense_chain_* against the float64 reference's Dense and ReLU ops, forward, dx and every gradient; the
    gradients are added to what the buffers hold (accumulate) or written over it (the buffers start non-zero)."""
    n, spec = case
    x = rng.standard_normal((n, spec[0][0]))
    ws = [(rng.standard_normal((k, f)) * 0.5, rng.standard_normal(k) * 0.1 if bias else None, relu)
          for f, k, bias, relu in spec]
    dy = rng.standard_normal((n, spec[-1][1]))
    h, caches = x, []
    for w, b, relu in ws:
        h, c = reference.dense_forward(h, w, b)
        r = reference.relu_forward(h) if relu else None
        caches.append((c, r and r[1]))
        h = r[0] if relu else h
    start = [(rng.standard_normal(w.shape), None if b is None else rng.standard_normal(b.shape)) for w, b, _ in ws]
    ref = [(np.zeros(w.shape), None if b is None else np.zeros(b.shape)) for w, b, _ in ws]
    d = dy
    for (w, b, relu), (c, rc), (dw, db) in reversed(list(zip(ws, caches, ref))):
        d = reference.relu_backward(d, rc) if relu else d
        d = reference.dense_backward(d, c, dw, db)
    f32 = [(w.astype(np.float32), None if b is None else b.astype(np.float32), r) for w, b, r in ws]
    x32 = x.astype(np.float32)
    y32, cache = cpu.dense_chain_forward(x32, f32)
    grads = [(dw.astype(np.float32), None if db is None else db.astype(np.float32)) for dw, db in start]
    dx32 = cpu.dense_chain_backward(dy.astype(np.float32), cache, grads, need_dx=True, accumulate=accumulate)
    assert_close(y32, h, np.float32, "y")
    assert_close(dx32, d, np.float32, "dx")
    for i, ((dw, db), (dw0, db0), (g, gb)) in enumerate(zip(ref, start, grads)):
        assert_close(g, dw + dw0 if accumulate else dw, np.float32, f"dw{i}")
        if db is not None:
            assert_close(gb, db + db0 if accumulate else db, np.float32, f"db{i}")
    assert cpu.dense_chain_backward(dy.astype(np.float32), cache, grads, need_dx=False) is None


def _mlp(shared=False, conv=True):
    """conv: a conv block first, so the chain's d(input) is needed."""
    d = hn.Dense(12, 12)
    head = [hn.Conv2D(2, 3, 3, padding=1), hn.ReLU(), hn.MaxPool2D(2), hn.Flatten()] if conv else [hn.Flatten()]
    layers = (head + [hn.Dense(3 * 2 * 2 if conv else 2 * 4 * 4, 12), hn.ReLU()]
              + ([d, hn.ReLU(), d] if shared else [hn.Dense(12, 12)]) + [hn.ReLU(), hn.Dense(12, 3)])
    return hn.Sequential(layers).to("cpu")


@needs_jit
def test_plan_uses_dense_chain_and_matches_layer_by_layer(rng):
    hn.seed(3)
    model = _mlp()
    x = rng.standard_normal((9, 2, 4, 4)).astype(np.float32)
    y = rng.integers(0, 3, 9)
    plan = FusedPlan(model)
    out1, dx1 = _pass(model, x, y)
    g1 = [p.grad.copy() for p in model.parameters()]
    model.zero_grad()
    out2, dx2 = _pass(plan, x, y)
    assert [type(nd).__name__ for nd in plan.nodes] == ["_FusedConvReluPool", "Flatten", "_DenseChain"]
    assert len(plan.nodes[-1].denses) == 3 and plan.nodes[-1].relus == [True, True, False]
    assert_close(out2, out1, np.float32, "logits")
    assert_close(dx2, dx1, np.float32, "dx")
    for i, (p, g) in enumerate(zip(model.parameters(), g1)):
        assert_close(p.grad, g, np.float32, f"grad {i}")


def _steps(model, opt, x, y, shortcut, n=3):
    step = make_train_step(model, opt)
    step.overwrite = shortcut
    for _ in range(n):
        step.step(x, y)
    return model.state_dict(), [p.grad.copy() for p in model.parameters()], step.collect()


OPTIMISERS = {
    "momentum-wd": lambda ps: hn.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01),
    "nesterov": lambda ps: hn.optim.SGD(ps, lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.003),
    "dampening": lambda ps: hn.optim.SGD(ps, lr=0.1, momentum=0.5, dampening=0.3),
    "plain": lambda ps: hn.optim.SGD(ps, lr=0.1),
    "adam": lambda ps: hn.optim.Adam(ps, lr=0.01, weight_decay=0.01),
}


@needs_jit
@pytest.mark.parametrize("opt", list(OPTIMISERS))
@pytest.mark.parametrize("which", ["all", "all-no-dx", "last-dense", "shared-layer"])
def test_written_gradients_equal_zeroed_ones(rng, which, opt):
    """The step object's shortcut (the chain writes its gradients, nothing zeroes them first) gives the bits of
    zero_grad + accumulate, under every optimiser (momentum, Nesterov, dampening, weight decay, Adam); parameters
    the optimiser does not own keep accumulating over the steps (so the shortcut must not touch them), and so does
    a layer used twice; with no layer before the chain its d(input) is not computed."""
    conv = which != "all-no-dx"
    x = rng.standard_normal((5, 2, 4, 4)).astype(np.float32)
    y = rng.integers(0, 3, 5)
    out = []
    for shortcut in (True, False):
        hn.seed(11)
        model = _mlp(shared=which == "shared-layer", conv=conv)
        params = model.parameters()[-2:] if which == "last-dense" else model.parameters()
        out.append(_steps(model, OPTIMISERS[opt](params), x, y, shortcut))
    (s0, g0, c0), (s1, g1, c1) = out
    for k in s0:
        np.testing.assert_array_equal(s0[k], s1[k], err_msg=k)
    for a, b in zip(g0, g1):
        np.testing.assert_array_equal(a, b)
    assert c0 == c1
