"""The training loop: fit on arrays, the step protocol backends plug into, records, divergence, evaluation."""
from __future__ import annotations

import math

import numpy as np
import pytest

import hetnet as hn
from hetnet import train
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
