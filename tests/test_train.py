"""The training loop: fit on arrays, the step protocol backends plug into, records, divergence, evaluation."""
from __future__ import annotations

import math

import numpy as np
import pytest

import hetnet as hn
from hetnet import train
from hetnet.device import cuda_available
from hetnet.errors import TrainingDiverged, UsageError


def _toy(n=96, seed=0):
    """Three linearly separable blobs in 2x2 'images'."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = rng.normal(0, 0.3, (n, 1, 2, 2)).astype(np.float32)
    x[:, 0, 0, 0] += (y == 0) * 2
    x[:, 0, 1, 1] += (y == 1) * 2
    return x, y


def _model(device="cpu"):
    hn.seed(0)
    return hn.Sequential([hn.Flatten(), hn.Dense(4, 16), hn.ReLU(), hn.Dense(16, 3)]).to(device)


def test_fit_learns_and_records_every_key():
    x, y = _toy()
    model = _model()
    hist = model.fit(x, y, epochs=4, batch_size=16, optimizer="momentum", lr=0.1, schedule="cosine",
                     validation_data=(x[:30], y[:30]), log=None)
    assert [r["epoch"] for r in hist] == [1, 2, 3, 4]
    assert set(train.METRIC_KEYS) <= set(hist[0])
    assert hist[-1]["test_loss"] is None and hist[-1]["val_accuracy"] is not None
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    loss, acc = model.evaluate(x, y)
    assert acc > 0.9 and math.isfinite(loss)
    assert hist[-1]["images_per_second"] > 0 and hist[-1]["seconds"] > 0


@pytest.mark.parametrize("optimizer", train.OPTIMIZERS)
@pytest.mark.parametrize("schedule", ["constant", "step", "cosine", "onecycle", "triangular"])
def test_every_optimizer_and_schedule_runs(optimizer, schedule):
    x, y = _toy(48)
    model = _model()
    lr = {"sgd": 0.05, "momentum": 0.05, "nesterov-decoupled": 5.0}.get(optimizer, 0.01)
    hist = model.fit(x, y, epochs=2, batch_size=16, optimizer=optimizer, lr=lr, schedule=schedule,
                     warmup_epochs=0.5, weight_decay=1e-4, label_smoothing=0.1, log=None)
    assert all(math.isfinite(r["train_loss"]) for r in hist)


def test_generic_step_matches_a_hand_written_loop():
    """TrainStep is exactly forward, loss, backward, optimiser step, schedule step."""
    x, y = _toy(32)
    a, b = _model(), _model()
    opt_a = train.make_optimizer("momentum", a.parameters(), 0.1)
    sched_a = train.make_schedule("cosine", opt_a, 4, 1)
    step = train.TrainStep(a, opt_a, sched_a)
    opt_b = train.make_optimizer("momentum", b.parameters(), 0.1)
    sched_b = train.make_schedule("cosine", opt_b, 4, 1)
    losses = []
    for i in range(0, 32, 8):
        step.step(x[i:i + 8], y[i:i + 8])
        opt_b.zero_grad()
        logits = b.forward(x[i:i + 8])
        loss, d = hn.losses.softmax_cross_entropy(logits, y[i:i + 8])
        losses.append(loss)
        b.backward(d)
        opt_b.step()
        sched_b.step()
    loss_sum, correct, count = step.collect()
    assert count == 32 and 0 <= correct <= 32
    assert loss_sum == pytest.approx(8 * sum(losses), rel=1e-6)
    assert step.collect() == (0.0, 0, 0)                     # collect() resets the sums
    for (_, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert np.array_equal(pa, pb)


def test_step_objects_made_once_per_trainer(monkeypatch):
    """The trainer makes its train and eval step objects once and reuses them every epoch (a GPU step captures its
    graphs once)."""
    calls = {"train": 0, "eval": 0}
    make_train, make_eval = train.TrainStep, train.EvalStep

    def counting(kind, make):
        def build(*args, **kwargs):
            calls[kind] += 1
            return make(*args, **kwargs)
        return build

    monkeypatch.setattr(train, "TrainStep", counting("train", make_train))
    monkeypatch.setattr(train, "EvalStep", counting("eval", make_eval))
    x, y = _toy(32)
    _model().fit(x, y, epochs=2, batch_size=8, validation_data=(x, y), log=None)
    assert calls == {"train": 1, "eval": 1}


def test_divergence_raises_training_diverged():
    x, y = _toy(64)
    x = x * 1e3
    with pytest.raises(TrainingDiverged, match="epoch"):
        _model().fit(x, y, epochs=3, batch_size=16, optimizer="sgd", lr=1e30, log=None)


def test_divergence_found_at_collect_time():
    """A fast path that does not check per step is caught at the end of the epoch."""
    class NanStep:
        def step(self, xb, yb):
            pass

        def collect(self):
            return float("nan"), 0, 8

    model = _model()
    opt = train.make_optimizer("sgd", model.parameters(), 0.1)
    trainer = train.Trainer(model, opt, log=None, progress=False)
    trainer._train_step = NanStep()
    x, y = _toy(8)
    with pytest.raises(TrainingDiverged, match="epoch 1"):
        trainer.fit(train.ArrayLoader(x, y, 8), epochs=1)


def test_trainer_logs_one_line_per_epoch_with_test_accuracy():
    x, y = _toy(32)
    model = _model()
    opt = train.make_optimizer("sgd", model.parameters(), 0.1)
    lines = []
    trainer = train.Trainer(model, opt, log=lines.append, progress=False)
    loader = train.ArrayLoader(x, y, 8)
    seen = []
    trainer.fit(loader, 3, test_loader=train.ArrayLoader(x, y, 16, shuffle=False),
                on_epoch_end=lambda rec, hist: seen.append(len(hist)))
    assert len(lines) == 3 and all("test loss" in s and "acc" in s and "img/s" in s for s in lines)
    assert seen == [1, 2, 3]


def test_progress_bar_path_runs(capsys):
    x, y = _toy(64)
    model = _model()
    opt = train.make_optimizer("sgd", model.parameters(), 0.1)
    hist = train.Trainer(model, opt, log=None, progress=True).fit(train.ArrayLoader(x, y, 2), 1)
    assert hist[0]["train_accuracy"] >= 0
    assert "epoch 1" in capsys.readouterr().err


def test_predict_labels_and_confusion():
    x, y = _toy(40)
    model = _model()
    model.fit(x, y, epochs=5, batch_size=8, optimizer="momentum", lr=0.1, log=None)
    pred, true = train.predict_labels(model, train.ArrayLoader(x, y, 16, shuffle=False))
    assert np.array_equal(true, y)
    m = train.confusion_matrix(pred, true, 3)
    assert m.sum() == 40 and m.trace() == (pred == y).sum()
    assert model.training                                   # mode restored


def test_array_loader_order_depends_only_on_seed_and_epoch():
    x, _ = _toy(30)
    a = [yb.tolist() for _, yb in train.ArrayLoader(x, np.arange(30), 7, seed=5).epoch(3)]
    b = [yb.tolist() for _, yb in train.ArrayLoader(x, np.arange(30), 7, seed=5).epoch(3)]
    c = [yb.tolist() for _, yb in train.ArrayLoader(x, np.arange(30), 7, seed=5).epoch(4)]
    assert a == b and a != c and sorted(sum(a, [])) == list(range(30))


@pytest.mark.parametrize("bad", [dict(epochs=0), dict(batch_size=-1), dict(lr=float("nan")), dict(lr=0),
                                 dict(lr="abc"), dict(optimizer="rmsprop"), dict(schedule="linear")])
def test_fit_rejects_bad_arguments(bad):
    x, y = _toy(16)
    with pytest.raises(UsageError):
        _model().fit(x, y, **{"log": None, **bad})


def _bn_model():
    hn.seed(0)
    return hn.Sequential([hn.Flatten(), hn.Dense(4, 8), hn.BatchNorm1D(8), hn.ReLU(), hn.Dense(8, 3)]).to("cpu")


def test_weight_average_is_the_ema_of_weights_and_bn_statistics():
    from conftest import assert_close

    x, y = _toy(64)
    model = _bn_model()
    avg = train.WeightAverage(model, 0.9)
    expected = {k: v.astype(np.float64) for k, v in model.state_dict().items()}
    step = train.TrainStep(model, train.make_optimizer("momentum", model.parameters(), 0.1))
    for i in range(4):
        step.step(x[16 * i:16 * (i + 1)], y[16 * i:16 * (i + 1)])
        avg.update()
        d = min(0.9, (1 + i) / (10 + i))
        for k, v in model.state_dict().items():
            expected[k] = d * expected[k] + (1 - d) * v
    live = model.state_dict()
    got = avg.state_dict()["arrays"]
    assert set(got) == set(expected) and "2.running_var" in got
    for k in expected:
        assert_close(got[k], expected[k], np.float32, k)
    with avg.applied():
        assert all(np.array_equal(v, got[k]) for k, v in model.state_dict().items())
    assert all(np.array_equal(v, live[k]) for k, v in model.state_dict().items())


def test_fit_with_weight_average_keeps_the_evaluated_weights():
    x, y = _toy(64)
    model = _bn_model()
    opt = train.make_optimizer("momentum", model.parameters(), 0.1)
    trainer = train.Trainer(model, opt, log=None, progress=False, ema=0.95)
    hist = trainer.fit(train.ArrayLoader(x, y, 16), 3, test_loader=train.ArrayLoader(x, y, 32, shuffle=False))
    avg = trainer.average.state_dict()["arrays"]
    assert all(np.array_equal(v, avg[k]) for k, v in model.state_dict().items())
    assert train.evaluate(model, train.ArrayLoader(x, y, 32, shuffle=False)) == \
        (hist[-1]["test_loss"], hist[-1]["test_accuracy"])


# --- lookahead, parameters frozen after some epochs, optimisers and schedules by name -----------------------------


@pytest.mark.parametrize("device, flat", [("cpu", True), ("cpu", False)]
                         + ([pytest.param("cuda", True, marks=pytest.mark.gpu)] if cuda_available() else []),
                         ids=lambda v: {True: "flat", False: "per-param"}.get(v, v))
def test_lookahead_is_airbenchs_ema_and_reset(device, flat):
    """airbench's LookaheadState, written out in float64: every 3 steps ema.lerp_(w, 1 - d), w = ema, with
    d = decay^3 (t / T)^3 -- BN statistics included; between updates the weights are the optimiser's alone; a
    frozen parameter never changes; finish() sets the weights to the EMA."""
    from conftest import assert_close

    x, y = _toy(64)
    hn.seed(0)
    model = hn.Sequential([hn.Flatten(), hn.Dense(4, 8), hn.BatchNorm1D(8), hn.ReLU(), hn.Dense(8, 3)])
    if flat:
        model.to(device)
    b = model.backend
    model[1].bias.requires_grad = False
    start = model.state_dict()
    total, every, decay = 8, 3, 0.9
    lookahead = train.Lookahead(model, total_steps=total, every=every, decay=decay)
    step = train.TrainStep(model, train.make_optimizer("momentum", model.parameters(), 0.1, 1e-2))
    ema = {k: v.astype(np.float64) for k, v in start.items()}
    for t in range(1, total + 1):
        i = 8 * (t % 8)
        step.step(b.asarray(x[i:i + 8]), b.labels(y[i:i + 8]))
        live = model.state_dict()
        lookahead.step()
        if t % every:
            assert all(np.array_equal(v, live[k]) for k, v in model.state_dict().items()), f"step {t}"
            continue
        d = decay ** every * (t / total) ** 3
        for k, e in ema.items():
            ema[k] = live[k] if k == "1.bias" else e + (1 - d) * (live[k] - e)
        for k, v in model.state_dict().items():
            assert_close(v, ema[k], np.float32, f"step {t}: {k}")
    lookahead.finish()
    for k, v in model.state_dict().items():
        assert_close(v, ema[k], np.float32, f"finish: {k}")
    np.testing.assert_array_equal(model.state_dict()["1.bias"], start["1.bias"])
    assert lookahead.state_dict()["steps"] == total and "2.running_var" in lookahead.state_dict()["arrays"]


def test_trainer_freezes_after_epochs_and_finishes_the_lookahead():
    """frozen_after: the bias trains in epoch 1 only (and the step's warm-up is timed again after the flag
    changed); with a lookahead the weights evaluated in the last epoch and kept are its EMA."""
    x, y = _toy(64)
    model = _bn_model()
    bias = model[4].bias
    start = bias.data.copy()
    opt = train.make_optimizer("momentum", model.parameters(), 0.1)
    lookahead = train.Lookahead(model, total_steps=3 * 4, every=5)
    seen = []
    trainer = train.Trainer(model, opt, log=None, progress=False, lookahead=lookahead, frozen_after=[(bias, 1)])
    hist = trainer.fit(train.ArrayLoader(x, y, 16), 3, test_loader=train.ArrayLoader(x, y, 32, shuffle=False),
                       on_epoch_end=lambda rec, h: seen.append((bias.requires_grad, bias.data.copy())))
    assert [s[0] for s in seen] == [True, False, False] and not bias.requires_grad
    assert not np.array_equal(start, seen[0][1])
    assert np.array_equal(seen[0][1], seen[1][1]) and np.array_equal(seen[1][1], seen[2][1])
    assert [r["warmup_seconds"] is not None for r in hist] == [True, True, False]
    arrays = lookahead.state_dict()["arrays"]
    assert all(np.array_equal(v, arrays[k]) for k, v in model.state_dict().items())
    assert train.evaluate(model, train.ArrayLoader(x, y, 32, shuffle=False)) == \
        (hist[-1]["test_loss"], hist[-1]["test_accuracy"])


def _grouped_model():
    hn.seed(1)
    return hn.Sequential([hn.Conv2D(1, 2, 2), hn.BatchNorm2D(2), hn.Flatten(), hn.Dense(2, 3)]).to("cpu")


def test_group_parameters_from_rules():
    model = _grouped_model()
    conv, bn, dense = model[0], model[1], model[3]
    groups = train.group_parameters(model, [{"params": "BatchNorm*.bias", "lr_scale": 64},
                                            {"params": ["0.*", "BatchNorm2D.bias"], "weight_decay_scale": 0}])
    assert [g["params"] for g in groups] == [[bn.bias], [conv.weight, conv.bias], [bn.weight, dense.weight,
                                                                                   dense.bias]]
    assert groups[0]["lr_scale"] == 64.0 and groups[1] == {**groups[1], "lr_scale": 1.0, "weight_decay_scale": 0.0}
    assert train.group_parameters(model, [{"params": "*"}]) == [{"params": model.parameters(), "lr_scale": 1.0,
                                                                  "weight_decay_scale": 1.0}]
    for rules, msg in (([{"params": "Dense.gamma"}], "param_groups, rule 0: Dense.gamma matches none"),
                       ({"params": "*"}, "expected a list of rules"),
                       ([{"lr_scale": 2}], "rule 0: expected"),
                       ([{"params": "*", "lr": 2}], "unknown key\\(s\\) lr"),
                       ([{"params": []}], "'params' must be a name pattern"),
                       ([{"params": "*", "lr_scale": 0}], "lr_scale must be a finite number > 0"),
                       ([{"params": "*", "weight_decay_scale": float("nan")}], "weight_decay_scale must")):
        with pytest.raises(UsageError, match=msg):
            train.group_parameters(model, rules)


def test_make_optimizer_with_groups():
    """A group's lr and weight decay are the recipe's times its scales; under nesterov-decoupled, the scale moves
    the step and not the decay per step (decoupled_sgd), with Nesterov momentum."""
    model = _grouped_model()
    groups = train.group_parameters(model, [{"params": "BatchNorm2D.bias", "lr_scale": 8, "weight_decay_scale": 0.5}])
    opt = train.make_optimizer("momentum", groups, 0.1, 1e-3, momentum=0.8)
    assert [(g["lr"], g["weight_decay"], g["momentum"]) for g in opt.param_groups] == \
        [(pytest.approx(0.8), pytest.approx(5e-4), 0.8), (0.1, 1e-3, 0.8)]
    opt = train.make_optimizer("nesterov-decoupled", groups, 11.5, 0.0153, momentum=0.85, batch_size=256)
    want = [hn.optim.decoupled_sgd(11.5, 0.0153 * 0.5, 0.85, 256, lr_scale=8),
            hn.optim.decoupled_sgd(11.5, 0.0153, 0.85, 256)]
    assert [{"lr": g["lr"], "weight_decay": g["weight_decay"]} for g in opt.param_groups] == want
    assert all(g["nesterov"] and g["momentum"] == 0.85 for g in opt.param_groups)
    adam = train.make_optimizer("adamw", model.parameters(), 1e-3, 0.01)
    assert len(adam.param_groups) == 1 and adam.weight_decay == 0.01
    for args, kw, msg in ((("nesterov-decoupled", groups, 1.0), {}, "needs the batch size"),
                          (("momentum", groups, 0.1), {"momentum": 1.0}, "--momentum"),
                          (("momentum", [{"params": [], "lr": 1}], 0.1), {}, "unknown key\\(s\\) lr"),
                          (("lion", groups, 0.1), {}, "--optimizer: unknown optimizer 'lion'")):
        with pytest.raises(UsageError, match=msg):
            train.make_optimizer(*args, **kw)


def test_schedules_by_name_with_arguments():
    opt = train.make_optimizer("sgd", _grouped_model().parameters(), 1.0)
    sched = train.make_schedule("triangular:start=0.5,peak=0.5,end=0", opt, 4)
    assert (sched.start, sched.peak, sched.end, opt.lr) == (0.5, 0.5, 0.0, 0.5)
    assert train.make_schedule("triangular", opt, 4).start == 0.2          # airbench94's by default
    for text, msg in (("cosine:min=0.1", "cosine takes no arguments"), ("triangular:top=1", "takes start=X"),
                      ("triangular:end=low", "end must be a number"), ("linear", "unknown schedule 'linear'"),
                      ("triangular:peak=1", "peak must be in")):
        with pytest.raises(UsageError, match=msg):
            train.make_schedule(text, opt, 4)


# --- fractional epochs ----------------------------------------------------------------------------------------


def test_total_steps_of_fractional_epochs():
    assert train.total_steps(9.9, 43) == 426                                  # airbench94's 426 steps
    assert [train.steps_in_epoch(9.9, 43, e) for e in (0, 8, 9)] == [43, 43, 39]
    assert train.total_steps(10, 44) == train.total_steps(10.0, 44) == 440
    assert [train.steps_in_epoch(10, 44, e) for e in (0, 9)] == [44, 44]
    assert train.total_steps(0.14, 100) == 14          # 0.14 as written: the float product is 14.000000000000002
    assert train.total_steps(0.01, 3) == 1
    assert [train.format_epochs(e) for e in (9.9, 10, 10.0, 0.5)] == ["9.9", "10", "10", "0.5"]


@pytest.mark.parametrize("bad", [0, -1, 0.0, -0.5, float("nan"), float("inf"), "3", True, None])
def test_check_epochs_rejects(bad):
    with pytest.raises(UsageError, match="--epochs: expected a positive finite number"):
        train.check_epochs(bad)


def test_check_epochs_keeps_fractions_and_makes_whole_numbers_ints():
    assert train.check_epochs(9.9) == 9.9 and train.check_epochs(np.float32(0.5)) == 0.5
    assert [(v, type(v)) for v in map(train.check_epochs, (10, 10.0, np.int64(3)))] == [(10, int), (10, int),
                                                                                         (3, int)]


def test_fractional_epochs_cut_the_last_one_and_the_schedule_spans_the_steps():
    """2.5 epochs of 4 batches: ceil(2.5 x 4) = 10 steps, epochs 1, 2, 3 of 4, 4 and 2 batches; the cosine schedule
    and the lookahead span the 10 steps (the learning rate ends at 0), the last epoch is evaluated with TTA and
    finishes the lookahead, its line says it is partial."""
    x, y = _toy(64)
    model = _bn_model()
    loader = train.ArrayLoader(x, y, 16)
    total = train.total_steps(2.5, len(loader))
    opt = train.make_optimizer("momentum", model.parameters(), 0.1)
    sched = train.make_schedule("cosine", opt, total)
    lookahead = train.Lookahead(model, total, every=3)
    lines = []
    trainer = train.Trainer(model, opt, sched, log=lines.append, progress=False, lookahead=lookahead, tta=1)
    hist = trainer.fit(loader, 2.5, test_loader=train.ArrayLoader(x, y, 32, shuffle=False))
    assert total == 10 and [(r["epoch"], r["steps"]) for r in hist] == [(1, 4), (2, 4), (3, 2)]
    assert sched.t == opt.steps == lookahead.steps == 10 and opt.lr == 0.0
    assert [r["tta"] for r in hist] == [0, 0, 1]
    assert all(np.array_equal(v, lookahead.state_dict()["arrays"][k]) for k, v in model.state_dict().items())
    assert [s.split("  ")[0] for s in lines] == ["epoch 1/2.5", "epoch 2/2.5", "epoch 3/2.5 (partial: 2 batches)"]


def test_whole_epochs_given_as_a_float_train_the_same_run():
    """epochs=2.0 is the run of epochs=2, bit for bit; a fractional run trains the same whole epochs first."""
    x, y = _toy(48)

    def run(epochs, schedule="cosine"):
        model = _model()
        hist = model.fit(x, y, epochs=epochs, batch_size=10, optimizer="momentum", lr=0.1, schedule=schedule,
                         warmup_epochs=0.5, log=None)
        return hist, model.state_dict()

    (h1, w1), (h2, w2) = run(2), run(2.0)
    assert [r["train_loss"] for r in h1] == [r["train_loss"] for r in h2] and [r["steps"] for r in h2] == [5, 5]
    assert all(np.array_equal(w1[k], w2[k]) for k in w1)
    (hf, _), (h3, _) = run(2.5, "constant"), run(3, "constant")
    assert [r["steps"] for r in hf] == [5, 5, 3] and [r["train_loss"] for r in hf[:2]] == \
        [r["train_loss"] for r in h3[:2]]


def test_ctrl_c_inside_the_jit_loader_is_kept_for_the_next_batch():
    """A SIGINT that arrives while Numba / llvmlite code is on the stack (where a raised KeyboardInterrupt would be
    dropped by a ctypes callback) does not raise there; the training loop raises it after the next batch. Elsewhere
    it raises at once, and outside interruptible() nothing is remembered."""
    import signal

    x, y = _toy()
    model = _model()
    trainer = train.Trainer(model, hn.optim.SGD(model.parameters(), lr=0.1))
    loader = train.ArrayLoader(x, y, batch_size=16, shuffle=False)
    # a frame that looks like llvmlite's object-cache callback
    fake = compile("def callback(h):\n    h(signal.SIGINT, sys._getframe())\n", "/site-packages/llvmlite/binding/x.py",
                   "exec")
    ns = {"signal": signal, "sys": __import__("sys")}
    exec(fake, ns)
    with train.interruptible():
        handler = signal.getsignal(signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            handler(signal.SIGINT, None)              # an ordinary frame: raised at once
        ns["callback"](handler)                       # inside the loader: no exception here ...
        with pytest.raises(KeyboardInterrupt):
            trainer.train_epoch(loader, 0)            # ... but after the first batch
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    trainer.train_epoch(loader, 0)                    # the block's end forgot it
