"""Test-time augmentation (hetnet.train.tta_logits, airbench's infer levels and the shifts of level 3): the averaged
logits against the model run on each view by hand (mirrors from NumPy slicing, translations from np.pad's 'reflect',
as torch's F.pad, shifts from its 'edge'), the evaluation step's loss and accuracy on those logits, the last epoch of
a run evaluated with it, and the flags."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import assert_close
from test_data_folder import classes_tree, make_tree

import hetnet as hn
from hetnet import train as T
from hetnet.cli import main
from hetnet.device import cuda_available
from hetnet.errors import UsageError
from hetnet.runs import evaluate_model


def _model(device="cpu", k=4):
    hn.seed(3)
    # no symmetry: a mirrored or translated input gives other logits
    return hn.Sequential([hn.Conv2D(2, 3, 3, padding=1), hn.BatchNorm2D(3), hn.GELU(), hn.MaxPool2D(2),
                          hn.Flatten(), hn.Dense(3 * 3 * 2, k)]).to(device)


def _views_by_hand(x):
    """airbench's infer_mirror_translate inputs, from np.pad 'reflect' (torch's F.pad(x, (1,) * 4, 'reflect'))."""
    h, w = x.shape[2:]
    p = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    return x, p[:, :, 0:h, 0:w], p[:, :, 2:h + 2, 2:w + 2]


@pytest.mark.parametrize("device", ["cpu", "reference"])
def test_levels_average_the_logits_of_the_views(rng, device):
    model = _model(device)
    model.eval()
    x = rng.standard_normal((5, 2, 6, 5))
    xd = model.backend.asarray(x)

    def f(v):
        return np.asarray(model.forward(model.backend.asarray(np.ascontiguousarray(v))), dtype=np.float64)

    def m(v):
        return 0.5 * f(v) + 0.5 * f(v[..., ::-1])

    x0, t_minus, t_plus = _views_by_hand(x)
    e = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")         # the four shifts, the border repeated
    h, w = x.shape[2:]
    shifts = [e[:, :, 2:h + 2, 1:w + 1], e[:, :, 0:h, 1:w + 1], e[:, :, 1:h + 1, 2:w + 2], e[:, :, 1:h + 1, 0:w]]
    want = {0: f(x0), 1: m(x0), 2: 0.5 * m(x0) + 0.5 * (m(t_minus) + m(t_plus)) / 2,
            3: (f(x0) + sum(f(v) for v in shifts)) / 5}
    dtype = model.backend.dtype
    for level, expected in want.items():
        got = T.tta_logits(model, xd, level)
        assert got.shape == (5, 4) and got.dtype == dtype
        assert_close(got, expected, dtype, f"level {level}")
    assert T.tta_logits(model, xd, 0) is not None and np.array_equal(model.backend.to_numpy(xd), x.astype(dtype))
    assert not np.allclose(want[1], want[0]) and not np.allclose(want[2], want[1])     # the views differ
    assert not np.allclose(want[3], want[0]) and not np.allclose(want[3], want[2])


@pytest.mark.parametrize("shift,mode,error", [(T.reflect_shift, "reflect", "cannot be translated"),
                                              (T.edge_shift, "edge", "cannot be shifted")], ids=["reflect", "edge"])
def test_shifts_match_numpy_pad(rng, shift, mode, error):
    """reflect_shift / edge_shift: x moved by -s along an axis, what comes in mirrored from inside or the border
    repeated, as np.pad's 'reflect' / 'edge'; no move at s = 0; a move of the whole axis refused."""
    x = rng.standard_normal((2, 1, 4, 7))
    for s in (-3, -1, 1, 3):
        for axis in (2, 3):
            n = x.shape[axis]
            pad = [(0, 0)] * 4
            pad[axis] = (abs(s), abs(s))
            want = np.take(np.pad(x, pad, mode=mode), np.arange(n) + abs(s) + s, axis=axis)
            np.testing.assert_array_equal(shift(np, x, axis, s), want)
    assert shift(np, x, 2, 0) is x
    with pytest.raises(UsageError, match=error):
        shift(np, x, 2, 4)


def test_eval_step_scores_the_averaged_logits(rng):
    model = _model()
    model.eval()
    x = rng.standard_normal((12, 2, 6, 5)).astype(np.float32)
    y = rng.integers(0, 4, size=12)
    logits = np.asarray(T.tta_logits(model, x, 2), dtype=np.float64)
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    loss, acc = T.evaluate(model, T.ArrayLoader(x, y, 5, shuffle=False), tta=2)
    assert_close(loss, -logp[np.arange(12), y].mean(), np.float32, "loss")
    assert acc == np.mean(logits.argmax(axis=1) == y)
    pred, true = T.predict_labels(model, T.ArrayLoader(x, y, 5, shuffle=False), tta=2)
    np.testing.assert_array_equal(pred, logits.argmax(axis=1))
    np.testing.assert_array_equal(true, y)
    with pytest.raises(UsageError, match="--tta"):
        T.make_eval_step(model, 4)


def test_trainer_evaluates_the_last_epoch_with_tta(rng):
    x = rng.standard_normal((40, 2, 6, 5)).astype(np.float32)
    y = rng.integers(0, 4, size=40)
    model = _model()
    opt = T.make_optimizer("momentum", model.parameters(), 0.05)
    val = T.ArrayLoader(x[:16], y[:16], 8, shuffle=False)
    hist = T.Trainer(model, opt, progress=False, log=None, tta=2).fit(T.ArrayLoader(x, y, 8), 3, val_loader=val)
    assert [r["tta"] for r in hist] == [0, 0, 2]
    assert (hist[-1]["val_loss"], hist[-1]["val_accuracy"]) == T.evaluate(model, val, tta=2)
    assert "TTA 2" in T.format_epoch(hist[-1], 3) and "TTA" not in T.format_epoch(hist[0], 3)


KEEP_CASES = [("cpu", 0), ("cpu", 2), ("reference", 2)] + (
    [pytest.param("cuda", t, marks=pytest.mark.gpu) for t in (0, 2)] if cuda_available() else [])


@pytest.mark.parametrize("device,tta", KEEP_CASES)
def test_trainer_keeps_the_last_evaluations_predictions(rng, device, tta):
    """The (predicted, true) classes fit's last evaluation kept are those the final model predicts (the confusion
    matrix of `hetnet train` is built from them); earlier epochs keep none."""
    x = rng.standard_normal((43, 2, 6, 5)).astype(np.float32)
    y = rng.integers(0, 4, size=43)
    model = _model(device)
    opt = T.make_optimizer("momentum", model.parameters(), 0.05)
    val, test = T.ArrayLoader(x[:19], y[:19], 8, shuffle=False), T.ArrayLoader(x[19:], y[19:], 8, shuffle=False)
    trainer = T.Trainer(model, opt, progress=False, log=None, tta=tta)
    trainer.fit(T.ArrayLoader(x, y, 8), 1, val_loader=val)
    assert set(trainer.final_predictions) == {"val"}
    hist = trainer.fit(T.ArrayLoader(x, y, 8), 2, val_loader=val, test_loader=test, start_epoch=1)
    for split, loader in (("val", val), ("test", test)):
        pred, true = trainer.final_predictions[split]
        want_pred, want_true = T.predict_labels(model, loader, tta)
        np.testing.assert_array_equal(pred, want_pred)
        np.testing.assert_array_equal(true, want_true)
        assert np.mean(pred == true) == hist[-1][f"{split}_accuracy"]


def test_train_and_evaluate_flags(tmp_path, capsys, monkeypatch):
    from hetnet import runs, train

    def predicted_again(*a, **k):          # the confusion matrix comes from the last evaluation's predictions
        raise AssertionError("hetnet train predicted the evaluated split a second time")

    kept = []
    joined = train.joined_predictions
    files = classes_tree(n_per_class=8)
    root = make_tree(tmp_path / "imgs", files)
    spec = {"input_shape": [3, 6, 6], "layers": [
        {"type": "Conv2D", "in_channels": 3, "out_channels": 4, "kernel_size": 3, "padding": 1}, {"type": "GELU"},
        {"type": "Flatten"}, {"type": "Dense", "in_features": 144, "out_features": 3}]}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(runs, "predict_labels", predicted_again)
        m.setattr(train, "joined_predictions", lambda b: kept.append(joined(b)) or kept[-1])
        assert main(["train", "--model", str(tmp_path / "spec.json"), "--dataset", "folder", "--data", str(root),
                     "--epochs", "2", "--batch-size", "8", "--device", "cpu", "--tta", "1", "--val-fraction", "0.25",
                     "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "test-time augmentation 1 (mirror)" in text and "val accuracy" in text
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["tta"] for r in lines] == [0, 1]
    assert json.loads((out / "config.json").read_text())["recipe"]["tta"] == 1
    assert len(kept) == 1 and np.mean(kept[0][0] == kept[0][1]) == lines[-1]["val_accuracy"]
    assert (out / "confusion.png").is_file()
    # evaluate: the run's level by default, or the one asked for; the run's own validation split
    res = evaluate_model(out, device="cpu", log=None)
    assert res["tta"] == 1 and res["split"] == "validation set"
    assert res["accuracy"] == pytest.approx(lines[-1]["val_accuracy"])
    assert evaluate_model(out, device="cpu", log=None, tta=0)["tta"] == 0
    assert main(["evaluate", str(out), "--tta", "2", "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tta"] == 2
    with pytest.raises(SystemExit):
        main(["evaluate", str(out), "--tta", "4"])
    assert "invalid choice" in capsys.readouterr().err
