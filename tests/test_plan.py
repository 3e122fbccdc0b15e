"""hetnet.plan: a Sequential compiled into nodes (fusions by isinstance, ReLU derivatives folded into the next node),
and the training / evaluation steps that run it.

On the cpu backend the conv fusions must give exactly the layer-by-layer outputs and gradients (the same float32
operations in the same order); the batch-norm fusion its outputs exactly and its gradients within the float32
tolerance (float64 sums in another order), the dense chain within the float32 tolerance (GEMMs in another
orientation). On the reference backend (every fusion composed of reference ops) plan and layers agree to float64
rounding. Each fused op against the float64 reference is in test_ops.py.
"""
from __future__ import annotations

import numpy as np
import pytest
from conftest import RTOL, assert_close

import hetnet as hn
from hetnet import plan as P
from hetnet.backends import cpu, reference
from hetnet.backends.cpu import _jit as cpu_jit
from hetnet.train import make_eval_step, make_train_step

needs_jit = pytest.mark.skipif(cpu._common.SGEMM is None, reason="compiled cpu paths unavailable (Numba or OpenBLAS)")
needs_numba = pytest.mark.skipif(not cpu_jit.available(), reason="Numba unavailable: no fused batch norm")


def _model(c_in, conv_args, tail_in, extra_first=(), device="cpu"):
    """extra_first: layers put before the first conv (so that its d(input) is needed)."""
    layers = list(extra_first) + [hn.Conv2D(c_in, 6, **conv_args), hn.ReLU(), hn.MaxPool2D(2),
                                  hn.Conv2D(6, 5, 3, padding=1, bias=False), hn.ReLU(), hn.MaxPool2D(2),
                                  hn.Flatten(), hn.Dense(tail_in, 7), hn.ReLU(), hn.Dense(7, 3)]
    return hn.Sequential(layers).to(device)


CASES = [  # (batch, C, H, W, conv args, flattened features after the two pools)
    (1, 3, 8, 8, dict(kernel_size=3, padding=1), 5 * 2 * 2),
    (5, 2, 9, 11, dict(kernel_size=3, padding=1), 5 * 2 * 2),                  # odd sizes: pools floor
    (4, 3, 13, 10, dict(kernel_size=5, stride=2, padding=2), 5 * 1 * 1),      # stride 2, kernel 5
    (3, 1, 12, 12, dict(kernel_size=1, padding=0), 5 * 3 * 3),                # 1x1 kernel
    (6, 2, 10, 10, dict(kernel_size=3, stride=3, padding=2), 5 * 1 * 1),      # stride 3, padding 2
]


def _layers_pass(model, x, y):
    """Forward and backward through each layer's own forward / backward (no plan): the definition."""
    h = x
    for layer in model.layers:
        h = layer.forward(h)
    _, d = hn.losses.softmax_cross_entropy(h, y)
    for layer in reversed(model.layers):
        d = layer.backward(d)
    return h, d


def _plan_pass(model, x, y, fuse=True):
    model.plan = P.Plan(model, fuse=fuse)
    logits = model.forward(x)
    _, d = hn.losses.softmax_cross_entropy(logits, y)
    return logits, model.backward(d, need_dx=True)


def _grads(model):
    out = [p.grad.copy() for p in model.parameters()]
    model.zero_grad()
    return out


@pytest.fixture
def no_dense_chain(monkeypatch):
    """Plans without dense chains (their bias gradients are float64 sums: not the layers' bits)."""
    monkeypatch.setattr(P, "DENSE_CHAIN_MIN", 10**9)


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
    out1, dx1 = _layers_pass(model, x, y)
    g1 = _grads(model)
    x_copy = x.copy()
    for fuse in (True, False):
        out2, dx2 = _plan_pass(model, x, y, fuse)
        g2 = _grads(model)
        kinds = [type(nd).__name__ for nd in model.plan.nodes]
        assert kinds.count("ConvReluPoolNode") == (2 if fuse else 0), kinds
        np.testing.assert_array_equal(x, x_copy)                 # the input is not modified
        np.testing.assert_array_equal(out2, out1)
        np.testing.assert_array_equal(dx2, dx1)
        for a, b in zip(g2, g1):
            np.testing.assert_array_equal(a, b)
        assert any(np.any(g != 0) for g in g2)


@pytest.mark.parametrize("make", [
    lambda d: _model(3, dict(kernel_size=3, padding=1), 5 * 2 * 2, device=d),
    lambda d: hn.Sequential([hn.Conv2D(3, 4, 3, padding=1, bias=False), hn.BatchNorm2D(4), hn.ReLU(),
                             hn.MaxPool2D(3, 2), hn.Conv2D(4, 4, 3), hn.ReLU(), hn.Dropout(0.3), hn.Flatten(),
                             hn.Dense(4, 6), hn.ReLU(), hn.Dropout(0.2), hn.Dense(6, 5), hn.BatchNorm1D(5),
                             hn.ReLU(), hn.Dense(5, 3), hn.ReLU()]).to(d),
], ids=["thesis-like", "every-node"])
def test_reference_plan_equals_layers(rng, make):
    """On the reference backend every fusion is its chain of reference ops: plan and layers agree to float64
    rounding (a ReLU after the logits, ReLUs into BatchNorm and through Dropout and Flatten included)."""
    hn.seed(4)
    model = make("reference")
    x = rng.standard_normal((4, 3, 8, 8))
    y = rng.integers(0, 3, 4)
    hn.seed(9)
    out1, dx1 = _layers_pass(model, x, y)
    g1 = _grads(model)
    hn.seed(9)          # the same dropout seeds
    out2, dx2 = _plan_pass(model, x, y)
    g2 = _grads(model)
    assert len(model.plan.nodes) < len(model.layers)
    for got, want, what in [(out2, out1, "logits"), (dx2, dx1, "dx")] + [(a, b, "grad") for a, b in zip(g2, g1)]:
        assert_close(got, want, np.float64, what)


def test_fusions_by_isinstance_and_backend_choice():
    """A subclass of a layer keeps its fusions; a backend fuses only what it lists (reference: everything)."""
    class MyConv(hn.Conv2D):
        pass

    class MyReLU(hn.ReLU):
        pass

    layers = [MyConv(1, 2, 3, padding=1), MyReLU(), hn.MaxPool2D(2), hn.BatchNorm2D(2), hn.ReLU(), hn.MaxPool2D(2),
              hn.Flatten(), hn.Dense(8, 4), hn.ReLU(), hn.Dense(4, 3), hn.Dense(3, 2), hn.Sigmoid()]
    kinds = lambda fusions: [type(n).__name__ for n in P.compile_nodes(layers, fusions)]  # noqa: E731
    assert kinds(P.FUSION_NAMES) == ["ConvReluPoolNode", "BNReluPoolNode", "FlattenNode", "DenseChainNode",
                                     "LayerNode"]
    assert kinds(frozenset()) == ["ConvNode", "ReluNode", "MaxPoolNode", "BatchNormNode", "ReluNode", "MaxPoolNode",
                                  "FlattenNode", "DenseNode", "ReluNode", "DenseNode", "DenseNode", "LayerNode"]
    assert kinds({"conv_act", "dense_act", "bn_act"}) == ["ConvNode", "MaxPoolNode", "BatchNormNode", "MaxPoolNode",
                                                         "FlattenNode", "DenseNode", "DenseNode", "DenseNode",
                                                         "LayerNode"]
    model = hn.Sequential(layers)
    assert cpu.fusions <= P.FUSION_NAMES and reference.fusions == P.FUSION_NAMES
    assert [type(n).__name__ for n in model.to("cpu").plan.nodes_for((1, 8, 8))][:2] == ["ConvReluPoolNode",
                                                                                       "BNReluPoolNode"]


def test_relu_masks_follow_the_relus():
    """mask_input marks the nodes whose input is a ReLU output; Flatten and Dropout pass the property on; the
    fused BN pooling may overwrite its input only when that is a fresh output nobody else reads."""
    layers = [hn.Conv2D(1, 2, 3, padding=1), hn.ReLU(), hn.Dropout(0.1), hn.MaxPool2D(2), hn.Conv2D(2, 2, 1),
              hn.BatchNorm2D(2), hn.ReLU(), hn.MaxPool2D(2), hn.Flatten(), hn.Dense(2, 2)]
    nodes = P.compile_nodes(layers, {"conv_act", "bn_relu_pool"})
    assert [(type(n).__name__, n.mask_input, n.pos_out) for n in nodes] == [
        ("ConvNode", False, True), ("DropoutNode", False, True), ("MaxPoolNode", True, False),
        ("ConvNode", False, False), ("BNReluPoolNode", False, False), ("FlattenNode", False, False),
        ("DenseNode", False, False)]
    assert nodes[4].inplace and not nodes[2].inplace
    gelu = P.compile_nodes([hn.Conv2D(1, 2, 3), hn.BatchNorm2D(2), hn.GELU(), hn.MaxPool2D(2), hn.BatchNorm2D(2),
                            hn.GELU()], {"bn_gelu"})
    assert [type(n).__name__ for n in gelu] == ["ConvNode", "BNGeluNode", "MaxPoolNode", "BNGeluNode"]
    assert gelu[1].inplace and not gelu[3].inplace      # after a convolution's fresh output; not after a pooling
    pooled = P.compile_nodes([hn.Conv2D(1, 2, 3), hn.MaxPool2D(2), hn.Conv2D(2, 2, 3), hn.ReLU(), hn.MaxPool2D(2)],
                             {"conv_pool", "conv_relu_pool"})
    assert [type(n).__name__ for n in pooled] == ["ConvPoolNode", "ConvReluPoolNode"]
    relu_first = P.compile_nodes([hn.ReLU(), hn.BatchNorm2D(2), hn.ReLU(), hn.MaxPool2D(2)], {"bn_relu_pool"})
    assert relu_first[1].mask_input and not relu_first[1].inplace     # masking reads the input: not in place


def test_batch_norms_that_feed_a_convolution():
    """A batch norm (-> GELU), GELU or conv -> GELU whose output only a convolution's forward reads, not as a ReLU
    output, names that convolution (Node.feeds), and the plan hands it to a backend that takes it (`takes_feeds`) as
    feeds=(weight shape, stride, padding); not before a ReLU, a pooling, a conv -> ReLU -> pool, or at the end."""
    c1, c2, c3 = hn.Conv2D(2, 4, 3, padding=1), hn.Conv2D(4, 4, 3, stride=2), hn.Conv2D(4, 4, 1)
    layers = [hn.BatchNorm2D(2), hn.GELU(), c1, hn.MaxPool2D(2), hn.BatchNorm2D(4), c2, hn.BatchNorm2D(4), hn.ReLU(),
              c3, hn.BatchNorm2D(4), hn.GELU(), hn.Conv2D(4, 4, 3), hn.ReLU(), hn.MaxPool2D(2), hn.BatchNorm2D(4),
              hn.GELU(), hn.MaxPool2D(2), hn.BatchNorm2D(4)]
    nodes = P.compile_nodes(layers, {"bn_gelu", "conv_pool", "bn_act", "conv_relu_pool"})
    assert [(type(n).__name__, n.feeds) for n in nodes] == [
        ("BNGeluNode", c1), ("ConvPoolNode", None), ("BatchNormNode", c2), ("ConvNode", None),
        ("BatchNormNode", None), ("ConvNode", None), ("BNGeluNode", None), ("ConvReluPoolNode", None),
        ("BNGeluNode", None), ("MaxPoolNode", None), ("BatchNormNode", None)]

    class Takes:
        takes_feeds = True

    assert P._feeds(nodes[0], Takes()) == {"feeds": ((4, 2, 3, 3), 1, 1)}
    assert P._feeds(nodes[2], Takes()) == {"feeds": ((4, 4, 3, 3), 2, 0)}
    assert P._feeds(nodes[0], reference) == {} and P._feeds(nodes[4], Takes()) == {}
    c4 = hn.Conv2D(3, 4, 3)
    gelu = P.compile_nodes([hn.Conv2D(1, 3, 2), hn.GELU(), c4, hn.GELU(), hn.Flatten()], {"bn_gelu"})
    assert [(type(n).__name__, n.feeds) for n in gelu] == [("ConvNode", None), ("GeluNode", c4), ("ConvNode", None),
                                                           ("GeluNode", None), ("FlattenNode", None)]
    fused = P.compile_nodes([hn.Conv2D(1, 3, 2), hn.GELU(), c4, hn.Conv2D(4, 3, 2), hn.GELU(), hn.Conv2D(3, 3, 1),
                             hn.GELU()], {"conv_gelu"})
    assert [(type(n).__name__, n.feeds) for n in fused] == [("ConvGeluNode", c4), ("ConvNode", None),
                                                            ("ConvGeluNode", None), ("ConvGeluNode", None)]
    assert P._feeds(fused[0], Takes()) == {"feeds": ((4, 3, 3, 3), 1, 0)}
    # the fused BN -> ReLU owns its ReLU's derivative: its output is no ReLU output, so it feeds the convolution
    # after it (where bn_act, not bn_relu, runs, the convolution masks by its input: no hand-over)
    c5 = hn.Conv2D(4, 4, 3)
    layers = [hn.BatchNorm2D(4), hn.ReLU(), c5, hn.BatchNorm2D(4), hn.ReLU(), hn.Flatten()]
    own = P.compile_nodes(layers, {"bn_relu"})
    assert [(type(n).__name__, n.feeds, n.mask_input) for n in own] == [
        ("BNReluNode", c5, False), ("ConvNode", None, False), ("BNReluNode", None, False), ("FlattenNode", None, False)]
    assert P._feeds(own[0], Takes()) == {"feeds": ((4, 4, 3, 3), 1, 0)}
    left = P.compile_nodes(layers, {"bn_act", "bn_relu"})
    assert [(type(n).__name__, n.feeds, n.mask_input) for n in left] == [
        ("BatchNormNode", None, False), ("ConvNode", None, True), ("BatchNormNode", None, False),
        ("FlattenNode", None, False)]
    assert [n.pos_out for n in left] == [True, False, True, True] and not any(n.pos_out for n in own)


def test_convolutions_that_hand_their_output_to_a_batch_norm():
    """A convolution (-> max pool) without act whose output only the batch norm (-> GELU, -> own ReLU) after it reads,
    not for a ReLU mask, is told so (Node.to_norm), bias or not; the plan passes to_norm=True to a backend that
    takes hand-overs (`takes_feeds`) only. Not a conv -> ReLU (-> pool), nor a convolution before anything else.
    Backwards, a convolution (-> max pool) right after a batch norm is told that its input gradient goes to that
    batch norm's backward (Node.grad_to_norm, grad_to_norm=True)."""
    layers = [hn.Conv2D(1, 4, 3, bias=False), hn.BatchNorm2D(4), hn.ReLU(), hn.Conv2D(4, 4, 3), hn.MaxPool2D(2),
              hn.BatchNorm2D(4), hn.GELU(), hn.Conv2D(4, 4, 1), hn.ReLU(), hn.BatchNorm2D(4), hn.Conv2D(4, 4, 1),
              hn.MaxPool2D(2), hn.Conv2D(4, 4, 1), hn.Flatten()]
    nodes = P.compile_nodes(layers, {"bn_relu", "bn_gelu", "conv_pool", "conv_act", "conv_relu_pool"})
    assert [(type(n).__name__, n.to_norm) for n in nodes] == [
        ("ConvNode", True), ("BNReluNode", False), ("ConvPoolNode", True), ("BNGeluNode", False),
        ("ConvNode", False), ("BatchNormNode", False), ("ConvPoolNode", False), ("ConvNode", False),
        ("FlattenNode", False)]
    # backwards: a convolution (-> pool) right after a batch norm hands its input gradient to that batch norm
    assert [n.grad_to_norm for n in nodes] == [False, False, True, False, True, False, True, False, False]

    class Takes:
        takes_feeds = True

    assert P._to_norm(nodes[0], Takes()) == {"to_norm": True} and P._to_norm(nodes[0], reference) == {}
    assert P._to_norm(nodes[4], Takes()) == {}
    assert P._to_norm(nodes[2], Takes(), grad=True) == {"grad_to_norm": True} == P._to_norm(nodes[6], Takes(), True)
    assert P._to_norm(nodes[0], Takes(), grad=True) == {} and P._to_norm(nodes[2], reference, grad=True) == {}
    # a conv -> ReLU's output, which the batch norm after it masks its gradient by: no hand-over
    masked = P.compile_nodes([hn.Conv2D(1, 4, 3), hn.ReLU(), hn.BatchNorm2D(4)], {"conv_act"})
    assert [(type(n).__name__, n.to_norm, n.mask_input) for n in masked] == [
        ("ConvNode", False, False), ("BatchNormNode", False, True)]


def test_batch_norms_that_hand_their_gradient_to_a_convolution():
    """A batch norm (-> GELU) right after a convolution (-> max pool) without bias or ReLU names that node
    (Node.grad_feeds), and its backward gets grad_feeds=(weight shape, stride, padding, the convolution's input
    shape in the last forward, the pool's (kernel, stride) or None) on a backend that takes hand-overs; not after a
    convolution with a bias or a ReLU, or when the batch norm masks its input."""
    c1, c2, c3 = (hn.Conv2D(2, 4, 3, padding=1, bias=False), hn.Conv2D(4, 4, 3, stride=2, bias=False),
                  hn.Conv2D(4, 4, 1, bias=False))
    layers = [c1, hn.BatchNorm2D(4), hn.GELU(), c2, hn.BatchNorm2D(4), hn.ReLU(), hn.Conv2D(4, 4, 1),
              hn.BatchNorm2D(4), hn.Conv2D(4, 4, 1, bias=False), hn.ReLU(), hn.BatchNorm2D(4), c3, hn.MaxPool2D(2),
              hn.BatchNorm2D(4), hn.Conv2D(4, 4, 1), hn.MaxPool2D(2), hn.BatchNorm2D(4)]
    nodes = P.compile_nodes(layers, {"bn_gelu", "conv_pool", "bn_act", "conv_act"})
    assert [(type(n).__name__, n.grad_feeds) for n in nodes] == [
        ("ConvNode", None), ("BNGeluNode", nodes[0]), ("ConvNode", None), ("BatchNormNode", nodes[2]),
        ("ConvNode", None), ("BatchNormNode", None), ("ConvNode", None), ("BatchNormNode", None),
        ("ConvPoolNode", None), ("BatchNormNode", nodes[8]), ("ConvPoolNode", None), ("BatchNormNode", None)]

    class Takes:
        takes_feeds = True

    nodes[0].x_shape, nodes[2].x_shape, nodes[8].x_shape = (5, 2, 8, 8), (5, 4, 8, 8), (5, 4, 3, 3)
    assert P._feeds(nodes[1], Takes(), grad=True) == {"grad_feeds": ((4, 2, 3, 3), 1, 1, (5, 2, 8, 8), None)}
    assert P._feeds(nodes[3], Takes(), grad=True) == {"grad_feeds": ((4, 4, 3, 3), 2, 0, (5, 4, 8, 8), None)}
    assert P._feeds(nodes[9], Takes(), grad=True) == {"grad_feeds": ((4, 4, 1, 1), 1, 0, (5, 4, 3, 3), (2, 2))}
    assert P._feeds(nodes[1], reference, grad=True) == {} and P._feeds(nodes[5], Takes(), grad=True) == {}
    model = hn.Sequential([hn.Conv2D(1, 2, 3, bias=False), hn.BatchNorm2D(2)]).to("cpu")
    model.plan.forward(np.zeros((3, 1, 6, 6), np.float32))
    assert model.plan.nodes[0].x_shape == (3, 1, 6, 6) and model.plan.nodes[1].x_shape == (3, 2, 4, 4)


@needs_jit
def test_plan_falls_back_inside_the_ops(rng):
    """A pool other than 2x2 / stride 2 still makes a fused node; the cpu op composes its own ops then."""
    model = hn.Sequential([hn.Conv2D(2, 3, 3), hn.ReLU(), hn.MaxPool2D(3), hn.Flatten(), hn.Dense(3, 2)]).to("cpu")
    x = rng.standard_normal((2, 2, 5, 5)).astype(np.float32)
    y = rng.integers(0, 2, 2)
    out1, dx1 = _layers_pass(model, x, y)
    g1 = _grads(model)
    out2, dx2 = _plan_pass(model, x, y)
    assert type(model.plan.nodes[0]).__name__ == "ConvReluPoolNode"
    np.testing.assert_array_equal(out2, out1)
    np.testing.assert_array_equal(dx2, dx1)
    for a, b in zip(_grads(model), g1):
        np.testing.assert_array_equal(a, b)


def test_plan_reports_bad_input_shape():
    model = _model(3, dict(kernel_size=3, padding=1), 5 * 2 * 2)
    with pytest.raises(ValueError, match="Conv2D"):
        model.forward(np.zeros((2, 4, 8, 8), np.float32))


# --- steps ------------------------------------------------------------------------------------------------------


def _fused_and_unfused(make_model, x, y, seed):
    """Three SGD+momentum steps, then an evaluation pass, through a fused and an unfused plan from the same start:
    ([state_dict] * 2, [(train sums, eval sums)] * 2, fused node list), fused first."""
    states, sums, nodes = [], [], None
    for fuse in (True, False):
        hn.seed(seed)
        model = make_model()
        model.plan = P.Plan(model, fuse=fuse)
        opt = hn.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        step = make_train_step(model, opt)
        for _ in range(3):
            step.step(x, y)
        if fuse:
            nodes = model.plan.nodes
        model.eval()
        ev = make_eval_step(model)
        ev.step(x, y)
        states.append(model.state_dict())
        sums.append((step.collect(), ev.collect()))
    return states, sums, nodes


@needs_jit
def test_train_step_fused_equals_unfused(rng, no_dense_chain):
    x = rng.standard_normal((8, 3, 12, 12)).astype(np.float32)
    y = rng.integers(0, 3, 8)
    states, sums, _ = _fused_and_unfused(lambda: _model(3, dict(kernel_size=3, padding=1), 5 * 3 * 3), x, y, 7)
    for k in states[0]:
        np.testing.assert_array_equal(states[0][k], states[1][k], err_msg=k)
    assert sums[0] == sums[1]


def _bn_model():
    return hn.Sequential([hn.Conv2D(2, 4, 3, padding=1, bias=False), hn.BatchNorm2D(4), hn.ReLU(), hn.MaxPool2D(2),
                          hn.Conv2D(4, 5, 3, padding=1, bias=False), hn.BatchNorm2D(5), hn.ReLU(), hn.MaxPool2D(2),
                          hn.Flatten(), hn.Dense(5 * 2 * 2, 3)]).to("cpu")


@needs_numba
def test_train_step_with_batch_norm_pools_matches_unfused(rng):
    """fashion-cnn's pattern: each BatchNorm2D -> ReLU -> MaxPool2D(2) one fused op; three SGD steps and an
    evaluation pass agree with the unfused plan within float32 rounding."""
    x = rng.standard_normal((6, 2, 9, 11)).astype(np.float32)
    y = rng.integers(0, 3, 6)
    states, sums, nodes = _fused_and_unfused(_bn_model, x, y, 5)
    assert sum(isinstance(nd, P.BNReluPoolNode) for nd in nodes) == 2
    for k in states[0]:
        assert_close(states[0][k], states[1][k], np.float32, k)
    (t0, e0), (t1, e1) = sums
    assert t0[2] == t1[2] and e0[2] == e1[2] and abs(t0[0] - t1[0]) <= RTOL[np.dtype(np.float32)] * abs(t1[0])


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
    out1, dx1 = _layers_pass(model, x, y)
    g1 = _grads(model)
    out2, dx2 = _plan_pass(model, x, y)
    nodes = model.plan.nodes
    assert [type(nd).__name__ for nd in nodes] == ["ConvReluPoolNode", "FlattenNode", "DenseChainNode"]
    assert len(nodes[-1].layers) == 3 and nodes[-1].relus == [True, True, False]
    assert_close(out2, out1, np.float32, "logits")
    assert_close(dx2, dx1, np.float32, "dx")
    for i, (p, g) in enumerate(zip(model.parameters(), g1)):
        assert_close(p.grad, g, np.float32, f"grad {i}")


def _steps(model, opt, x, y, shortcut, n=3):
    step = make_train_step(model, opt)
    step.written_grads = shortcut
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
    """The step's shortcut (the chain writes its gradients, nothing zeroes them first) gives the bits of
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


def test_optimizer_without_own_update_still_trains(rng, capsys):
    """An optimiser that overrides only step() runs it after each forward and backward, and the step says so
    once; the result equals the same update done by hand."""
    class HalfSGD(hn.optim.Optimizer):
        def step(self):
            for p in self.params:
                p.data = self.backend.to_numpy(p.data) - 0.5 * self.backend.to_numpy(p.grad)
            self.steps += 1

    x = rng.standard_normal((6, 1, 4, 4)).astype(np.float32)
    y = rng.integers(0, 2, 6)
    results = []
    for custom in (True, False):
        hn.seed(2)
        model = hn.Sequential([hn.Flatten(), hn.Dense(16, 2)]).to("cpu")
        opt = HalfSGD(model.parameters(), lr=0.5) if custom else hn.optim.SGD(model.parameters(), lr=0.5)
        step = make_train_step(model, opt)
        step.step(x, y)
        step.step(x, y)
        results.append(model.state_dict())
    assert capsys.readouterr().err.count("HalfSGD has no update() of its own") == 1
    for k in results[0]:
        assert_close(results[0][k], results[1][k], np.float32, k)
