"""A small bf16 CNN through hetnet's plan and training steps on the cuda backend, on the CPU: CudaBackend's own
ops, launchers and hand-overs with its kernels emulated (tests/emu_backend.py), every convolution on the channels-last
tensor-core kernels (set as if measured): the hand-overs around the batch norms happen as the plan says and store
exactly the values they stand for. Needs g++ (skipped without); no GPU. On a GPU, test_mma.py's
test_training_with_batch_norm_inputs_in_bf16 runs the same hand-overs in captured training steps."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
from conftest import RTOL, RTOL_PRECISION, RTOL_TC, rel_err
from emu_backend import EmulatedBackend, build_libraries, route_kernels
from mma_cases import plan_step, pooled_cnn, round_bf16, tma_choices

from hetnet import plan as P
from hetnet.backends.cuda import conv as C

BATCH = 4
# the model's convolutions (N, C, H, W, K, R, S, stride, padding) and their choices, as if measured
CHOICES = {(BATCH, 3, 8, 8, 16, 3, 3, 1, 1): ("fwd", "filter"),
           (BATCH, 16, 8, 8, 32, 3, 3, 1, 1): ("fwd", "pool", "filter", "data"),
           (BATCH, 32, 4, 4, 32, 3, 3, 1, 1): ("fwd", "filter", "data")}
DENSE = (BATCH, 32, 1, 1, 16, 1, 1, 1, 0)           # the dense layer as the 1 x 1 convolution it runs as


@pytest.fixture(scope="module")
def libs(tmp_path_factory):
    return build_libraries(tmp_path_factory.mktemp("emu_cuda"))


@pytest.fixture
def be(libs, monkeypatch):
    route_kernels(monkeypatch, libs)
    be = EmulatedBackend("bf16")
    for shape, ops in CHOICES.items():
        be._tune.update({(op, C.Geometry(*shape).key()): "tc16" for op in ops})
    be._tune.update({(op, C.Geometry(*DENSE).key()): "tc" for op in ("fwd", "data", "filter")})
    return be


def _model(device):
    return pooled_cnn(device, (16, 32, 32), 5)


@pytest.mark.parametrize("first", ["tc16", "small", "small_tc"])
def test_bf16_plan_on_the_emulated_cuda_backend(be, rng, monkeypatch, first):
    """The plan's hand-overs on the cuda backend at bf16. Each batch norm (-> ReLU) gets its input and its gradient
    stored in bf16 from the convolutions around it (Node.to_norm, grad_to_norm; conv.Nchw16) and hands its output
    and input gradient to them channels-last (feeds, grad_feeds; conv.Nhwc16). The logits and every gradient are
    bit for bit those of the same step without the hand-overs to batch norms whose batch norms round their float32
    input and gradient to bf16 themselves: the hand-overs store exactly those values, and the emulator adds in a
    fixed order. The logits are within 2 RTOL_TC["bf16"] of the reference backend's float64 step. The first
    convolution's forward on the channels-last tiles, on conv_small_fwd ("small") or on mma.cu's conv_small_fwd_tc
    (with its filter gradient on conv_small_filter_tc: "small_tc", which the batch norm after it hands dE/dy in
    bf16)."""
    first_key = C.Geometry(*next(iter(CHOICES))).key()
    be._tune[("fwd", first_key)] = first
    if first == "small_tc":
        be._tune[("filter", first_key)] = first
    x = rng.standard_normal((BATCH, 3, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, size=BATCH)
    seen = []
    forward, backward = be.bn_relu_forward, be.bn_relu_backward

    def spy(x_, *a, **kw):
        y_, cache = forward(x_, *a, **kw)
        seen.append(("fwd", isinstance(x_, C.Nchw16), isinstance(y_, C.Nhwc16)))
        return y_, cache

    def spy_back(dy_, *a, **kw):
        dx = backward(dy_, *a, **kw)
        seen.append(("bwd", isinstance(dy_, C.Nchw16), isinstance(dx, C.Nhwc16)))
        forms.append(type(dx).__name__)
        return dx

    forms = []
    monkeypatch.setattr(be, "bn_relu_forward", spy)
    monkeypatch.setattr(be, "bn_relu_backward", spy_back)
    logits, grads = plan_step(_model(be), x, y)
    # the first two batch norms (-> ReLU); the last runs fused with its ReLU and max pooling (bn_relu_pool), which
    # takes no hand-over. The first one's gradient goes to the first convolution, whose data gradient does not run
    # (need_dx False): float32, or stored in bf16 where its filter gradient runs "small_tc" (takes_dy16_nchw)
    assert seen == [("fwd", True, True), ("fwd", True, True), ("bwd", True, True), ("bwd", True, False)], seen
    assert forms[-1] == ("Nchw16" if first == "small_tc" else "ndarray"), forms
    if first == "small_tc":              # the same gradients from float32 dE/dy (conv_small_filter_tc rounds it)
        from hetnet.backends.cuda import norm as N

        with monkeypatch.context() as m:
            m.setattr(N, "takes_dy16_nchw", lambda *a: False)
            logits32, grads32 = plan_step(_model(be), x, y)
        assert forms[-1] == "ndarray", forms
        np.testing.assert_array_equal(logits, logits32)
        for i, g in grads.items():
            np.testing.assert_array_equal(g, grads32[i], err_msg=f"parameter {i} (float32 dE/dy)")
    monkeypatch.setattr(P, "_to_norm", lambda node, be, grad=False: {})
    monkeypatch.setattr(be, "bn_relu_forward", lambda x_, *a, **kw: forward(round_bf16(x_), *a, **kw))
    monkeypatch.setattr(be, "bn_relu_backward", lambda dy_, *a, **kw: backward(round_bf16(dy_), *a, **kw))
    rounded_logits, rounded_grads = plan_step(_model(be), x, y)
    np.testing.assert_array_equal(logits, rounded_logits)
    for i, g in grads.items():
        np.testing.assert_array_equal(g, rounded_grads[i], err_msg=f"parameter {i}")
    ref_logits, _ = plan_step(_model("reference"), x, y)
    assert rel_err(logits, ref_logits) <= 2 * RTOL_TC["bf16"], rel_err(logits, ref_logits)


def test_bf16_training_steps_on_the_emulated_cuda_backend(be, rng, monkeypatch):
    """Two SGD training steps (hetnet.train's step: the plan, the loss into the step's sums, the optimiser's update
    kernel) with the hand-overs around the batch norms give weights bit for bit those of the steps whose batch norms
    round their float32 input and gradient to bf16 themselves, and the same loss sums."""
    from hetnet import train as T

    x = rng.standard_normal((2 * BATCH, 3, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, size=2 * BATCH)
    forward, backward = be.bn_relu_forward, be.bn_relu_backward
    results, bf16_inputs = [], []

    def spy(x_, *a, **kw):
        bf16_inputs.append(isinstance(x_, C.Nchw16))
        return forward(x_, *a, **kw)

    monkeypatch.setattr(be, "bn_relu_forward", spy)
    for handed in (True, False):
        if not handed:
            monkeypatch.setattr(P, "_to_norm", lambda node, be, grad=False: {})
            monkeypatch.setattr(be, "bn_relu_forward", lambda x_, *a, **kw: forward(round_bf16(x_), *a, **kw))
            monkeypatch.setattr(be, "bn_relu_backward", lambda dy_, *a, **kw: backward(round_bf16(dy_), *a, **kw))
        model = _model(be)
        step = T.make_train_step(model, T.make_optimizer("sgd", model.parameters(), lr=0.05, momentum=0.9))
        for i in range(2):
            step.step(be.asarray(x[i * BATCH:(i + 1) * BATCH]), be.labels(y[i * BATCH:(i + 1) * BATCH]))
        results.append((step.collect(), {k: be.to_numpy(v) for k, v in model.state_dict().items()}))
    (sums, weights), (sums32, weights32) = results
    assert bf16_inputs == [True, True] * 2, bf16_inputs              # the handed steps' two batch norms (-> ReLU)
    assert sums == sums32, (sums, sums32)
    for k, v in weights.items():
        np.testing.assert_array_equal(v, weights32[k], err_msg=k)


# each precision's channels-last tiles on wgmma (the emulator runs them) and its filter gradient's mma.sync tile
WGMMA_TILE = {"bf16": "w128x128s4", "tf32": "w128x128s4", "fp32": "w64x128s4"}


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_plan_at_each_precision_on_the_emulated_cuda_backend(libs, rng, monkeypatch, precision):
    """The same CNN's forward and backward at each precision with every convolution and the dense layer on the
    channels-last tiles, the wgmma ones for the forwards and data gradients: fp32 (split copies, three products)
    gives float32's accuracy against the reference backend's float64, logits and every gradient; tf32 and bf16 give
    logits within their tolerance (their gradients through batch norms of a few values a channel move by more than
    their rounding, see test_bf16_plan_on_the_emulated_cuda_backend). Only bf16 stores batch-norm inputs in bf16."""
    route_kernels(monkeypatch, libs, wgmma=True)
    be = EmulatedBackend(precision)
    prefix, tile = C.CL_PREFIX[precision], WGMMA_TILE[precision]
    for shape, ops in [*CHOICES.items(), (DENSE, ("fwd", "data", "filter"))]:
        be._tune.update({(op, C.Geometry(*shape).key()): prefix + ("" if op == "filter" else tile) for op in ops})
    stored = []
    forward = be.bn_relu_forward
    monkeypatch.setattr(be, "bn_relu_forward", lambda x_, *a, **kw: stored.append(isinstance(x_, C.Nchw16))
                        or forward(x_, *a, **kw))
    x = rng.standard_normal((BATCH, 3, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, size=BATCH)
    logits, grads = plan_step(_model(be), x, y)
    assert stored == [precision == "bf16"] * 2, stored
    ref_logits, ref_grads = plan_step(_model("reference"), x, y)
    if precision == "fp32":
        bound = RTOL[np.dtype(np.float32)]
        assert rel_err(logits, ref_logits) <= bound
        for i, g in grads.items():
            assert rel_err(g, ref_grads[i]) <= bound, (i, rel_err(g, ref_grads[i]))
    else:
        assert rel_err(logits, ref_logits) <= RTOL_PRECISION[precision], rel_err(logits, ref_logits)


def _tf32_launches(monkeypatch, libs) -> list:
    """The kernels routed to the emulator (wgmma included) and a list that gets the name of every kernel mma.py and
    norm.py launch."""
    from hetnet.backends.cuda import mma as M
    from hetnet.backends.cuda import norm as N

    route_kernels(monkeypatch, libs, wgmma=True)
    launches = []
    for mod in (M, N):
        monkeypatch.setattr(mod, "get_kernel", lambda d, m, name, get=mod.get_kernel: launches.append(name)
                            or get(d, m, name))
    return launches


def test_tf32_filter_gradient_on_the_r_tiles_in_the_plan_emulated(libs, rng, monkeypatch):
    """The tf32 plan of test_plan_at_each_precision with every filter gradient on an r tile (wgmma, dy's K-major copy)
    gives the gradients of the same plan on the mma.sync tile within float32's tolerance (the same tf32 products
    summed in another order; nothing else differs); each r tile's dy_t comes from the launch that writes dy's
    channels-last copy (to_nhwc32, or pool_grad_nhwc32 after the pooling), never from a transpose (nhwc32_t); the
    batch norms hand the convolutions after them their tf32 copies (bn_apply_nhwc32)."""
    launches = _tf32_launches(monkeypatch, libs)
    x = rng.standard_normal((BATCH, 3, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, size=BATCH)
    runs = {}
    for flt in ("", "w128x128s3b2r"):
        be = EmulatedBackend("tf32")
        for shape, ops in [*CHOICES.items(), (DENSE, ("fwd", "data", "filter"))]:
            be._tune.update({(op, C.Geometry(*shape).key()): "tc32" + (flt if op == "filter" else "w128x128s4")
                             for op in ops})
        launches.clear()
        runs[flt] = plan_step(_model(be), x, y)
        runs[flt] += (list(launches),)
    (logits, grads, _), (logits_r, grads_r, made) = runs[""], runs["w128x128s3b2r"]
    np.testing.assert_array_equal(logits_r, logits)
    for i, g in grads.items():
        assert rel_err(grads_r[i], g) <= RTOL[np.dtype(np.float32)], (i, rel_err(grads_r[i], g))
    assert "nhwc32_t" not in made and "pool_grad_nhwc32" in made, made
    assert made.count("hn_conv32_filter_w128x128s3b2r") == len(CHOICES) + 1, made
    assert made.count("bn_apply_nhwc32") == 2, made          # both batch norms hand over their outputs


@pytest.mark.parametrize("flt", ["", "w128x128s3b2r"], ids=["sync", "r"])
def test_tf32_hand_overs_change_nothing_emulated(libs, rng, monkeypatch, flt):
    """At tf32 the batch norms' hand-overs give the logits and gradients of the same plan without them bit for bit
    (the same values rounded the same way): their outputs written as the tf32 copies the convolutions read
    (bn_apply_nhwc32; without: bn_apply, then to_nhwc32), and the input gradient of the one batch norm after an
    unpooled convolution with a backward on channels-last copies (the third's; the fourth's runs fused with its
    ReLU and pooling) written as that convolution's copy of dE/dy (bn_bwd_dx_nhwc32; without: bn_bwd_dx, then
    to_nhwc32), with its K-major copy where the filter gradient runs an r tile (flt "w128x128s3b2r", else the
    mma.sync tile)."""
    from hetnet.backends.cuda import norm as N

    launches = _tf32_launches(monkeypatch, libs)
    x = rng.standard_normal((BATCH, 3, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, size=BATCH)
    runs = []
    for hand_over in (True, False):
        if not hand_over:
            monkeypatch.setattr(N, "takes_nhwc16", lambda *a: False)
            monkeypatch.setattr(N, "takes_dy16", lambda *a: False)
        be = EmulatedBackend("tf32")
        for shape, ops in [*CHOICES.items(), (DENSE, ("fwd", "data", "filter"))]:
            be._tune.update({(op, C.Geometry(*shape).key()): "tc32" + (flt if op == "filter" else "w128x128s4")
                             for op in ops})
        launches.clear()
        runs.append(plan_step(pooled_cnn(be, (16, 32, 32, 32), 5), x, y))
        assert launches.count("bn_apply_nhwc32") == (3 if hand_over else 0), launches
        assert launches.count("bn_bwd_dx_nhwc32") == (1 if hand_over else 0), launches
        assert "nhwc32_t" not in launches, launches
    (logits, grads), (logits0, grads0) = runs
    np.testing.assert_array_equal(logits, logits0)
    for i, g in grads.items():
        np.testing.assert_array_equal(g, grads0[i], err_msg=str(i))


def test_trial_outputs_are_made_once_and_dropped_by_release():
    """conv._TrialOutputs makes the trials' outputs at the first trial, hands every trial the same ones, and drops
    them at release(), which conv._choose calls before it empties the trial pool they come from (the GPU test
    test_trial_runs_use_their_own_pool_emptied_after sees that pool empty afterwards)."""
    made = []
    run = C._TrialOutputs(lambda: made.append(1) or (np.zeros(3),))
    seen = []
    for _ in range(2):
        run(lambda y: seen.append(y))
    assert made == [1] and seen[0] is seen[1]
    run.release()
    assert run.out == []
    run(lambda y: seen.append(y))
    assert made == [1, 1]


@pytest.mark.parametrize(("o", "c", "rs", "cp", "blocks"), [(3, 600, 9, 608, 2), (5, 7, 25, 8, 3), (40, 33, 1, 40, 1),
                                                          (2, 5000, 1, 5000, 4), (2, 3, 361, 8, 3)])
def test_add_from_nhwc_emulated(libs, rng, o, c, rs, cp, blocks):
    """conv.cu's add_from_nhwc (a filter gradient summed channels-last over Cp >= C channels, added into the weights'
    layout): dw[o][c][rs] + t[o][rs][c] bit for bit, the channels past C dropped, on grids shorter than its elements
    (a grid-stride loop)."""
    from emu_build import EmulatedKernel

    t = rng.standard_normal((o, rs, cp)).astype(np.float32)
    dw = rng.standard_normal((o, c, rs)).astype(np.float32)
    want = dw + t[:, :, :c].transpose(0, 2, 1)
    EmulatedKernel(libs["conv"], "add_from_nhwc")((blocks,), (256,), [dw, t, *map(np.int32, (o, c, rs, cp))])
    np.testing.assert_array_equal(dw, want)


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_weight_copies_in_one_launch_emulated(libs, rng, monkeypatch, precision):
    """A step's weight copies (the op contract's weight_copies; mma.StepCopies, conv.cu's weight_copies<s>): the
    copies asked for in one scope are made on demand and remembered; the next scope makes them all in one launch, bit
    for bit to_nhwc's and turn_weights' (channels past C zero, any C, R, S, a weight with only one of its copies
    asked for; O past one 32 x 32 tile of the turned copy, C R S past one chunk of the channels-last one, a 17 x 17
    filter), over copies overwritten with garbage in between. An array that is not a parameter is copied where asked,
    every time."""
    from hetnet.backends.cuda import mma as M

    route_kernels(monkeypatch, libs)
    be = EmulatedBackend(precision, sms=2)
    ws = [rng.standard_normal(shape).astype(np.float32) for shape in ((8, 3, 3, 3), (4, 10, 5, 5), (12, 8, 1, 1),
                                                                      (16, 6, 3, 3), (40, 33, 3, 3), (4, 600, 3, 3),
                                                                      (4, 2, 17, 17))]
    other = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    asks = [(0, False), (0, True), (1, False), (2, True), (3, False), (3, True), (4, False), (4, True), (5, False),
            (5, True), (6, False), (6, True)]
    store: dict = {}
    launches = []
    get_kernel = M.get_kernel
    monkeypatch.setattr(M, "get_kernel", lambda d, m, name: launches.append(name) or get_kernel(d, m, name))
    with be.weight_copies(store, ws):
        first = [M.weight_copy(be, ws[i], turned) for i, turned in asks]
        M.weight_copy(be, other)
    assert not [n for n in launches if n.startswith("weight_copies")]
    for out in first:
        out.view(np.uint8)[...] = 0xFF                   # NaN and garbage: the launch must write every element
    launches.clear()
    with be.weight_copies(store, ws):
        again = [M.weight_copy(be, ws[i], turned) for i, turned in asks]
        assert M.weight_copy(be, other) is not M.weight_copy(be, other)
    assert launches.count("weight_copies" + M.COPIES[precision][0]) == 1, launches
    assert not [n for n in launches if n.startswith("turn_weights")], launches
    for (i, turned), a, b in zip(asks, first, again):
        assert a is b
        want = M.turn_weights(be, ws[i]) if turned else M.to_nhwc(be, ws[i])
        np.testing.assert_array_equal(b.view(np.uint8), want.view(np.uint8), err_msg=f"weight {i} turned {turned}")


def test_weight_copies_outlive_the_step_pool_emulated(libs, rng, monkeypatch):
    """The copies a step's weight_copies scope keeps for later steps (a parameter's) and the launch's table come
    from be.persistent(), never from the step pool, whose free blocks a graph captured earlier may still use as its
    temporaries; a copy of an array that is not a parameter is the step's own (the step pool)."""
    from hetnet.backends.cuda import mma as M

    route_kernels(monkeypatch, libs)
    be = EmulatedBackend("bf16", sms=2)
    depth = [0]

    @contextlib.contextmanager
    def persistent():
        depth[0] += 1
        try:
            yield
        finally:
            depth[0] -= 1

    made = []                                   # (what, made inside persistent())

    def recorded(name, f):
        return lambda be_, w: made.append((name, depth[0] > 0)) or f(be_, w)

    monkeypatch.setattr(be, "persistent", persistent)
    for name in ("to_nhwc", "turn_weights"):
        monkeypatch.setattr(M, name, recorded(name, getattr(M, name)))

    class Xp:                                   # NumPy, with asarray recording where it ran
        def __getattr__(self, name):
            return getattr(np, name)

        def asarray(self, a, *args, **kw):
            made.append(("asarray", depth[0] > 0))
            return np.asarray(a, *args, **kw)

    monkeypatch.setattr(be, "xp", Xp())
    ws = [rng.standard_normal(shape).astype(np.float32) for shape in ((8, 3, 3, 3), (4, 10, 5, 5))]
    store: dict = {}
    with be.weight_copies(store, ws):
        M.weight_copy(be, ws[0])
        M.weight_copy(be, ws[1], True)
        assert made == [("to_nhwc", True), ("turn_weights", True)], made
        M.weight_copy(be, rng.standard_normal((8, 3, 3, 3)).astype(np.float32))
        assert made[2:] == [("to_nhwc", False)], made
    assert made[3:] == [("asarray", True)], made         # the table, as the scope closes


def test_filters_past_the_weight_copies_launch_emulated(libs, rng, monkeypatch):
    """A filter of more taps than a unit of conv.cu's weight copies holds in shared memory (R S > WC_CHUNK): its
    copies are made where asked, every time, outside the step's launch, bit for bit to_nhwc's and turn_weights'; and
    conv16_filter adds its gradient into dw as it adds a small filter's."""
    from hetnet.backends.cuda import mma as M

    route_kernels(monkeypatch, libs)
    be = EmulatedBackend("bf16", sms=2)
    big = rng.standard_normal((8, 3, 65, 65)).astype(np.float32)            # 4225 taps
    launches = []
    get_kernel = M.get_kernel
    monkeypatch.setattr(M, "get_kernel", lambda d, m, name: launches.append(name) or get_kernel(d, m, name))
    store: dict = {}
    made = []
    for _ in range(2):
        with be.weight_copies(store, [big]):
            made.append([M.weight_copy(be, big, turned) for turned in (False, True)])
    assert made[0][0] is not made[1][0] and made[0][1] is not made[1][1]
    assert not [n for n in launches if n.startswith("weight_copies")], launches
    for copies in made:
        np.testing.assert_array_equal(copies[0].view(np.uint8), M.to_nhwc(be, big).view(np.uint8))
        np.testing.assert_array_equal(copies[1].view(np.uint8), M.turn_weights(be, big).view(np.uint8))
    x = rng.standard_normal((1, 3, 65, 65)).astype(np.float32)
    dy = rng.standard_normal((1, 8, 1, 1)).astype(np.float32)
    small_x, small_w = x[:, :, :5, :5].copy(), np.zeros((8, 3, 5, 5), np.float32)
    for xs, dw in ((x, rng.standard_normal(big.shape).astype(np.float32)), (small_x, small_w)):
        want = dw.copy()
        M.conv16_filter(be, dw, M.to_nhwc(be, dy), M.to_nhwc(be, xs), 1, 0)
        got = dw - want                          # the gradient of one pixel: dy[o] x[c] in bf16, summed in float32
        expect = (round_bf16(dy[0, :, 0, 0])[:, None, None, None] * round_bf16(xs[0])[None]).astype(np.float32)
        np.testing.assert_allclose(got, expect, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_training_steps_with_weight_copies_emulated(libs, rng, monkeypatch, precision):
    """Three SGD training steps whose weight copies are made in one launch as each step starts (hetnet.plan's steps
    open the backend's weight_copies) give the weights and loss sums of the same steps with every convolution
    copying its weights itself, bit for bit; the first step copies each weight on demand (the dense layer's as the
    1 x 1 convolution's view of it), the next two copy none (the launch did), and each launches weight_copies<s>
    once."""
    from hetnet import train as T
    from hetnet.backends.cuda import mma as M

    route_kernels(monkeypatch, libs, wgmma=True)
    be = EmulatedBackend(precision)
    prefix, tile = C.CL_PREFIX[precision], WGMMA_TILE[precision]
    for shape, ops in [*CHOICES.items(), (DENSE, ("fwd", "data", "filter"))]:
        be._tune.update({(op, C.Geometry(*shape).key()): prefix + ("" if op == "filter" else tile) for op in ops})
    x = rng.standard_normal((3 * BATCH, 3, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, size=3 * BATCH)
    shapes = {(16, 3, 3, 3), (32, 16, 3, 3), (32, 32, 3, 3), (16, 32, 1, 1)}     # (the dense layer's view)
    seen = []
    to_nhwc, turn_weights, get_kernel = M.to_nhwc, M.turn_weights, M.get_kernel
    monkeypatch.setattr(M, "to_nhwc", lambda be_, a: seen.append(("copy", a.shape in shapes)) or to_nhwc(be_, a))
    monkeypatch.setattr(M, "turn_weights",
                        lambda be_, a: seen.append(("copy", a.shape in shapes)) or turn_weights(be_, a))
    monkeypatch.setattr(M, "get_kernel", lambda d, m, name: seen.append((name, False)) or get_kernel(d, m, name))
    results = []
    for scoped in (True, False):
        if not scoped:
            monkeypatch.setattr(be, "weight_copies", None)
        model = _model(be)
        step = T.make_train_step(model, T.make_optimizer("sgd", model.parameters(), lr=0.05, momentum=0.9))
        counts = []
        for i in range(3):
            seen.clear()
            step.step(be.asarray(x[i * BATCH:(i + 1) * BATCH]), be.labels(y[i * BATCH:(i + 1) * BATCH]))
            counts.append((seen.count(("copy", True)), seen.count(("weight_copies" + M.COPIES[precision][0], False))))
        results.append((counts, step.collect(), {k: be.to_numpy(v) for k, v in model.state_dict().items()}))
    (counts, sums, weights), (counts_each, sums_each, weights_each) = results
    made = counts_each[0][0]
    assert made >= 5 and counts == [(made, 0), (0, 1), (0, 1)] and counts_each == [(made, 0)] * 3, results
    assert sums == sums_each, (sums, sums_each)
    for k, v in weights.items():
        np.testing.assert_array_equal(v, weights_each[k], err_msg=k)


def _tma_model(device):
    return pooled_cnn(device, (64, 64, 64, 64), 9)


def test_batch_norm_statistics_from_the_tma_tiles_emulated(libs, rng, monkeypatch):
    """At bf16, the TMA tiles' forward and pooled forward (the persistent one) hand the batch norm after them their
    output's statistics (mma.with_sums: Nchw16.sums), and the batch norm reads them instead of making its own pass:
    the logits and every gradient are bit for bit those of the same step whose batch norms make their statistics
    themselves (float64 sums of the same bf16 values in another order differ by float64's rounding at most, far
    below the float32 statistics' own), and within 2 RTOL_TC["bf16"] of the reference backend's float64 logits."""
    from hetnet.backends.cuda import mma as M

    route_kernels(monkeypatch, libs, wgmma=True)
    be = EmulatedBackend("bf16")
    for shape, ops in tma_choices(2).items():
        be._tune.update({(op, C.Geometry(*shape).key()): choice for op, choice in ops.items()})
    dense = (2, 64, 1, 1, 16, 1, 1, 1, 0)
    be._tune.update({(op, C.Geometry(*dense).key()): "tc" for op in ("fwd", "data", "filter")})
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, size=2)
    forward, stats = be.bn_relu_forward, []
    monkeypatch.setattr(be, "bn_relu_forward", lambda x_, *a, **kw: stats.append(
        isinstance(x_, C.Nchw16) and x_.sums is not None) or forward(x_, *a, **kw))
    logits, grads = plan_step(_tma_model(be), x, y)
    # the first batch norm's input comes from the small channels-last tile (no sums), the next two from the TMA tiles
    assert stats == [False, True, True], stats
    with monkeypatch.context() as m:
        m.setattr(M, "with_sums", lambda xp, call: call)
        stats.clear()
        plain_logits, plain_grads = plan_step(_tma_model(be), x, y)
    assert stats == [False, False, False], stats
    np.testing.assert_array_equal(logits, plain_logits)
    for i, g in grads.items():
        np.testing.assert_array_equal(g, plain_grads[i], err_msg=f"parameter {i}")
    ref_logits, _ = plan_step(_tma_model("reference"), x, y)
    assert rel_err(logits, ref_logits) <= 2 * RTOL_TC["bf16"], rel_err(logits, ref_logits)


@pytest.mark.parametrize("sync", [False, True])
def test_batch_norm_reads_a_convolutions_sums_in_copies_emulated(be, rng, sync):
    """A batch norm whose bf16 input came with a convolution's sums (Nchw16.sums: mma.zeroed_sums' copies, here
    with each channel's values spread over the copies by pixel) makes the statistics of its own pass from them: the
    output, running statistics and, in the backward, dx and the parameters' gradients equal to those without sums
    to float32 rounding; also synchronised (a world of one, whose all-reduce leaves the sums as they are), where the
    backward takes the count from after the copies."""
    from hetnet.backends.cuda import mma as M
    from mma_cases import bf16_bits, bf16_values

    n, c, h, w = 3, 5, 6, 7
    bits = bf16_bits(rng.normal(1.0, 2.0, (n, c, h, w)).astype(np.float32))
    v = bf16_values(bits).astype(np.float64).transpose(1, 0, 2, 3).reshape(c, -1)
    sums = M.zeroed_sums(np, c)
    copies = sums[:-1].reshape(M.SUMS_COPIES, 2, c)
    for copy in range(M.SUMS_COPIES):                 # pixel j of each channel into copy j mod SUMS_COPIES
        part = v[:, copy::M.SUMS_COPIES]
        copies[copy, 0], copies[copy, 1] = part.sum(axis=1), (part * part).sum(axis=1)
    sums[-1] = n * h * w
    gamma, beta = rng.uniform(0.5, 1.5, c).astype(np.float32), rng.normal(0, 0.5, c).astype(np.float32)
    dy = rng.standard_normal((n, c, h, w)).astype(np.float32)
    out = []
    for with_sums in (True, False):
        rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
        dg, db = np.zeros(c, np.float32), np.zeros(c, np.float32)
        x16 = C.Nchw16(bits.copy(), sums.copy() if with_sums else None)
        kw = {"reduce": lambda a: None} if sync else {}
        y, cache = be.batchnorm_forward(x16, gamma, beta, rm, rv, 0.1, 1e-5, True, **kw)
        dx = be.batchnorm_backward(dy, cache, dg, db)
        out.append([be.to_numpy(a) for a in (y, rm, rv, dx, dg, db)])
    for name, got, want in zip(("y", "running mean", "running var", "dx", "dgamma", "dbeta"), *out):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)
