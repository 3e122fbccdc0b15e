"""Runs: `--config` reruns exactly, `--resume --epochs N` extends a finished run, model-best.safetensors,
`hetnet runs`, `hetnet info PRESET`, recipes in `train --help`, notes when the data are adapted to the model, and
honest speed figures (warm-up steps timed apart, one line per epoch from fit)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from test_cli import TINY_SPEC, make_idx

import hetnet as hn
from hetnet import serialize, train, zoo
from hetnet.cli import main
from hetnet.runs import evaluate_model

EXACT = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "test_loss", "test_accuracy")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    data = make_idx(root / "data", n_train=240, n_test=60)
    spec = root / "tiny.json"
    spec.write_text(json.dumps(TINY_SPEC))
    return root, data, spec


def _train(*argv) -> None:
    assert main(["train", "--device", "cpu", "--no-progress", *argv]) == 0


def _metrics(run):
    return [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(path):
    return serialize.read_safetensors(path)[0]


def _same_weights(a, b) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def first(setup):
    """A finished 2-epoch run: the spec's default recipe (plain SGD, constant learning rate), dropout and BN."""
    root, data, spec = setup
    out = root / "runs" / "a"
    _train("--model", str(spec), "--data", str(data), "--epochs", "2", "--lr", "0.05", "--augment", "crop:1",
           "--out", str(out))
    return out


def test_config_reruns_exactly_and_flags_override(setup, first):
    root = setup[0]
    again = root / "runs" / "b"
    _train("--config", str(first / "config.json"), "--out", str(again))
    for x, y in zip(_metrics(first), _metrics(again), strict=True):
        assert all(x[k] == y[k] for k in EXACT)
    assert _same_weights(first / "model.safetensors", again / "model.safetensors")
    cfg_a, cfg_b = (json.loads((d / "config.json").read_text()) for d in (first, again))
    assert cfg_b["spec"] == cfg_a["spec"] and cfg_b["recipe"] == cfg_a["recipe"] and cfg_b["seed"] == cfg_a["seed"]
    assert cfg_b["rerun_of"] == str(first / "config.json")
    # a flag beside it changes that and nothing else: one epoch, the same first epoch
    one = root / "runs" / "c"
    _train("--config", str(first), "--epochs", "1", "--out", str(one))
    assert len(_metrics(one)) == 1 and all(_metrics(one)[0][k] == _metrics(first)[0][k] for k in EXACT)
    # a different seed gives a different run
    seeded = root / "runs" / "d"
    _train("--config", str(first / "config.json"), "--seed", "5", "--epochs", "1", "--out", str(seeded))
    assert _metrics(seeded)[0]["train_loss"] != _metrics(first)[0]["train_loss"]


@pytest.mark.parametrize("case", ["missing", "not-json", "not-a-run", "bad-flag"])
def test_config_bad_input(setup, first, tmp_path, capsys, case):
    path = tmp_path / "config.json"
    argv = ["train", "--config", str(path), "--out", str(tmp_path / "out")]
    needle = str(path)
    if case == "not-json":
        path.write_text("{oops")
    elif case == "not-a-run":
        path.write_text(json.dumps({"model": "mlp"}))
    elif case == "bad-flag":
        argv[2] = str(first / "config.json")
        argv += ["--device", "tpu"]
        needle = "tpu"
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "out").exists()


def test_resume_epochs_extends_a_finished_run_as_if_planned(setup, first, tmp_path, capsys):
    ext = tmp_path / "extended"
    shutil.copytree(first, ext)
    rc = main(["train", "--resume", str(ext)])
    err = capsys.readouterr().err
    assert rc == 2 and "already finished" in err and "--epochs" in err
    rc = main(["train", "--resume", str(ext), "--epochs", "2"])
    assert rc == 2 and "--epochs" in capsys.readouterr().err
    assert main(["train", "--resume", str(ext), "--epochs", "3", "--no-progress"]) == 0
    assert [r["epoch"] for r in _metrics(ext)] == [1, 2, 3]
    assert json.loads((ext / "config.json").read_text())["recipe"]["epochs"] == 3
    # with a constant learning rate, 2 epochs extended to 3 are the 3-epoch run (cpu backend: bit-identical)
    planned = tmp_path / "planned"
    _train("--config", str(first), "--epochs", "3", "--out", str(planned))
    for x, y in zip(_metrics(ext), _metrics(planned), strict=True):
        assert all(x[k] == y[k] for k in EXACT)
    assert _same_weights(ext / "model.safetensors", planned / "model.safetensors")


def test_extending_a_cosine_schedule_says_where_it_restarts(setup, tmp_path, capsys):
    _, data, spec = setup
    out = tmp_path / "cos"
    _train("--model", str(spec), "--data", str(data), "--epochs", "1", "--schedule", "cosine", "--limit", "64",
           "--out", str(out))
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--epochs", "2", "--no-progress"]) == 0
    notes = [s for s in capsys.readouterr().err.splitlines() if s.startswith("note:")]
    assert len(notes) == 1 and "cosine schedule now spans 2 epochs instead of 1" in notes[0]


# --- fractional epochs and drop_last ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fractional(setup):
    """--epochs 1.5 --drop-last on the 240 training images at batch 32: 7 batches an epoch (the partial one of 16
    dropped), ceil(1.5 x 7) = 11 steps, the second epoch cut after 4; a cosine schedule, so that its span shows."""
    root, data, spec = setup
    out = root / "runs" / "fractional"
    assert main(["train", "--device", "cpu", "--model", str(spec), "--data", str(data), "--epochs", "1.5",
                 "--drop-last", "--batch-size", "32", "--schedule", "cosine", "--lr", "0.05", "--out",
                 str(out)]) == 0
    return out


def test_fractional_epochs_with_drop_last(fractional, tmp_path, capsys):
    cfg = json.loads((fractional / "config.json").read_text())
    assert cfg["recipe"]["epochs"] == 1.5 and cfg["recipe"]["drop_last"] is True
    assert [(r["epoch"], r["steps"]) for r in _metrics(fractional)] == [(1, 7), (2, 4)]
    ck = serialize.read_checkpoint(fractional)
    # the schedule spans the 11 steps: the cosine ends at 0 on the last one
    assert ck.optimizer["steps"] == ck.schedule["t"] == 11 and ck.optimizer["hyper"]["lr"] == 0.0
    again = tmp_path / "again"
    capsys.readouterr()
    _train("--config", str(fractional), "--out", str(again))
    out = capsys.readouterr().out
    assert "1.5 epochs (11 steps, 7 per epoch), batch 32 (a partial batch of 16 left out each epoch)," in out
    assert "\nepoch 2/1.5 (partial: 4 batches)  train loss" in out and "\ndone: 1.5/1.5 epochs in" in out
    assert _same_weights(fractional / "model.safetensors", again / "model.safetensors")
    assert main(["runs", str(fractional)]) == 0
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row[row.index("1.5/1.5") + 1] == "finished"
    assert main(["runs", str(fractional), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)[0]
    assert (listed["epochs"], listed["planned"], listed["status"]) == (1.5, 1.5, "finished")


def test_a_cut_last_epoch_is_extended_into_the_next_ones(fractional, tmp_path, capsys):
    """A run that stopped part-way through epoch 2 extends to more than 2 epochs only; the schedule then spans the
    11 steps trained and the 7 of epoch 3 (not ceil(3 x 7) = 21)."""
    ext = tmp_path / "ext"
    shutil.copytree(fractional, ext)
    for epochs, needle in ((None, "already finished (1.5 epochs"), ("1.2", "already trained 1.5 epochs"),
                           ("1.5", "already trained 1.5 epochs"), ("2", "part-way through epoch 2 (1.5 epochs)")):
        rc = main(["train", "--resume", str(ext)] + (["--epochs", epochs] if epochs else []))
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1 and needle in err, err
    for bad in ("0", "nan"):
        with pytest.raises(SystemExit) as e:
            main(["train", "--resume", str(ext), "--epochs", bad])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: argument --epochs") and len(err.splitlines()) == 1
    assert main(["train", "--resume", str(ext), "--epochs", "3", "--no-progress"]) == 0
    assert "cosine schedule now spans 3 epochs instead of 1.5" in capsys.readouterr().err
    assert [(r["epoch"], r["steps"]) for r in _metrics(ext)] == [(1, 7), (2, 4), (3, 7)]
    ck = serialize.read_checkpoint(ext)
    assert ck.optimizer["steps"] == 18 and ck.optimizer["hyper"]["lr"] == 0.0


def test_extending_a_whole_run_to_a_fraction_is_the_planned_run(setup, first, tmp_path):
    """2 epochs (8 batches each, the last of 16) extended to 2.5 train epoch 3's first 4 batches: the run planned
    for 2.5 epochs, bit for bit; and --epochs 2.0 is the 2-epoch run itself."""
    ext = tmp_path / "ext"
    shutil.copytree(first, ext)
    assert main(["train", "--resume", str(ext), "--epochs", "2.5", "--no-progress"]) == 0
    planned = tmp_path / "planned"
    _train("--config", str(first), "--epochs", "2.5", "--out", str(planned))
    assert [r["steps"] for r in _metrics(planned)] == [8, 8, 4]
    for x, y in zip(_metrics(ext), _metrics(planned), strict=True):
        assert all(x[k] == y[k] for k in EXACT + ("steps",))
    assert _same_weights(ext / "model.safetensors", planned / "model.safetensors")
    whole = tmp_path / "whole"
    _train("--config", str(first), "--epochs", "2.0", "--out", str(whole))
    assert json.loads((whole / "config.json").read_text())["recipe"]["epochs"] == 2
    assert _same_weights(first / "model.safetensors", whole / "model.safetensors")


def test_drop_last_is_a_recipe_field_with_a_flag(setup):
    from hetnet.runs import RunConfig, _recipe, make_training, train_drop_last

    preset = zoo.Preset((1, 28, 28), [], drop_last=True)
    assert _recipe(RunConfig(), preset)["drop_last"] is True
    assert _recipe(RunConfig(drop_last=False), preset)["drop_last"] is False
    assert _recipe(RunConfig(model="mlp"), zoo.PRESETS["mlp"])["drop_last"] is False
    # (examples, batch, drop_last) -> dropped: as asked, always a last batch of one, never the only batch
    for n, bs, asked, dropped in ((45_000, 1024, True, True), (45_000, 1024, False, False), (2049, 1024, False, True),
                                  (2048, 1024, True, True), (500, 1024, True, False), (1, 8, False, False)):
        assert train_drop_last({"batch_size": bs, "drop_last": asked}, n) is dropped, (n, bs, asked)
    # the schedule and the lookahead span ceil(epochs x batches) steps, less those a resumed run is short
    hn.seed(0)
    model = zoo.build("thesis-m0")
    recipe = _recipe(RunConfig(model="x", epochs=9.9, schedule="cosine", lookahead=5), None)
    _, schedule, _, lookahead, _ = make_training(recipe, model, 43)
    assert schedule.total_steps == lookahead.total_steps == 426
    _, schedule, _, lookahead, _ = make_training({**recipe, "epochs": 12}, model, 43, steps_short=4)
    assert schedule.total_steps == lookahead.total_steps == 512


def test_model_best_is_the_best_epoch(setup, tmp_path):
    _, data, spec = setup
    for flags, key in (([], "test_accuracy"), (["--val-fraction", "0.25"], "val_accuracy")):
        out = tmp_path / key
        _train("--model", str(spec), "--data", str(data), "--epochs", "3", "--lr", "0.2", "--out", str(out), *flags)
        lines = _metrics(out)
        best = max(lines, key=lambda r: r[key])
        lm = hn.load(out / "model-best.safetensors")
        assert lm.info["epoch"] == best["epoch"] and lm.info["selected_by"] == key
        if key == "test_accuracy":            # its weights are that epoch's: scoring it again gives that accuracy
            res = evaluate_model(out / "model-best.safetensors", device="cpu", log=None)
            assert res["accuracy"] == pytest.approx(best["test_accuracy"], abs=1e-12)
        if best["epoch"] == lines[-1]["epoch"]:
            assert _same_weights(out / "model-best.safetensors", out / "model.safetensors")


def test_hetnet_runs_lists_runs(setup, first, tmp_path, capsys):
    runs = tmp_path / "runs"
    runs.mkdir()
    shutil.copytree(first, runs / "20260101-finished")
    shutil.copytree(first, runs / "20260102-stopped")
    (runs / "20260102-stopped" / "model.safetensors").unlink()
    (runs / "20260103-broken").mkdir()
    (runs / "20260103-broken" / "config.json").write_text("{")
    (runs / "not-a-run").mkdir()
    assert main(["runs", str(runs)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and lines[0].split()[:3] == ["run", "model", "data"]
    m = _metrics(first)
    best = max(r["test_accuracy"] for r in m)
    assert "20260101-finished" in lines[1] and "finished" in lines[1] and "2/2" in lines[1]
    assert f"{100 * best:.2f}%" in lines[1] and f"{100 * m[-1]['test_accuracy']:.2f}%" in lines[1]
    assert "stopped" in lines[2] and "unreadable" in lines[3]
    assert main(["runs", str(runs), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["status"] for r in rows][:2] == ["finished", "stopped"] and rows[0]["best"] == best
    assert rows[0]["model"] == str(setup[2]) and rows[0]["split"] == "test"
    rc = main(["runs", str(tmp_path / "absent")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error:") and str(tmp_path / "absent") in err


def test_info_preset_and_train_help(capsys):
    assert main(["info", "fashion-cnn"]) == 0
    out = capsys.readouterr().out
    n = sum(int(np.prod(p.shape)) for p in zoo.build("fashion-cnn").parameters())
    assert f"parameters: {n:,}" in out and "BatchNorm2D" in out and "64x3x3" in out
    assert "15 epochs, batch 128, momentum lr 0.1, onecycle schedule" in out
    rc = main(["info", "resnet50"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error:") and "resnet50" in err
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in zoo.PRESETS) and "sgd lr 1e-05" in out


def test_info_of_a_run_and_of_a_model_file(setup, first, tmp_path, capsys):
    """`hetnet info RUN_DIR|MODEL_FILE`: the saved model's layers, parameter count, classes, normalisation and what
    it was trained on; a directory that is no run is one error line."""
    for target in (first, first / "model.safetensors"):
        assert main(["info", str(target)]) == 0
        out = capsys.readouterr().out
        lm = serialize.load_model(first / "model.safetensors")
        n = sum(int(np.prod(p.shape)) for p in lm.model.parameters())
        assert out.splitlines()[0] == str(first / "model.safetensors") and f"parameters: {n:,}" in out
        assert f"classes ({len(lm.class_names)}): " + ", ".join(lm.class_names) in out
        assert "trained: " in out and "epochs 2" in out and "fashion-mnist" in out
    rc = main(["info", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error:") and "not a hetnet run directory" in err


def test_one_note_when_the_data_are_adapted_to_the_model(setup, tmp_path, capsys):
    data = setup[1]
    _train("--model", "thesis-m0", "--data", str(data), "--epochs", "1", "--limit", "64", "--out",
           str(tmp_path / "m0"))
    notes = [s for s in capsys.readouterr().err.splitlines() if s.startswith("note:")]
    assert notes == [("note: images adapted to the model's input 3x12x12: 300 converted from grey to RGB; "
                      "300 resized from 28x28 to 12x12 (bilinear)")]
    assert main(["info", str(tmp_path / "m0")]) == 0       # what it was trained on names the limit
    trained = [s for s in capsys.readouterr().out.splitlines() if s.startswith("trained: ")]
    assert len(trained) == 1 and "limit 64" in trained[0]


# --- speed figures --------------------------------------------------------------------------------------------


def _fit_data():
    rng = np.random.default_rng(0)
    return rng.random((64, 1, 6, 6)).astype(np.float32), rng.integers(0, 3, 64)


def _model():
    hn.seed(0)
    return zoo.layers_from_specs([{"type": "Conv2D", "in_channels": 1, "out_channels": 2, "kernel_size": 3},
                                  {"type": "BatchNorm2D", "num_features": 2}, {"type": "ReLU"}, {"type": "Flatten"},
                                  {"type": "Dropout", "p": 0.2}, {"type": "Dense", "in_features": 32,
                                                                  "out_features": 3}]).to("cpu")


def test_warmup_steps_are_timed_apart_and_change_nothing():
    x, y = _fit_data()
    runs = []
    for untimed in (False, True):
        model = _model()
        opt = train.make_optimizer("momentum", model.parameters(), 0.1)
        trainer = train.Trainer(model, opt, log=None, progress=False)
        if untimed:      # as if the shape had been seen: no step is timed apart
            trainer._steps_at_shape[(16, 1, 6, 6)] = train.WARMUP_STEPS_PER_SHAPE
        warm = []
        def record(rec, hist, trainer=trainer, warm=warm):
            warm.append(trainer.last_warmup)

        hist = trainer.fit(train.ArrayLoader(x, y, 16), 3, on_epoch_end=record)
        runs.append((hist, model.state_dict(), warm))
    (h1, w1, warm), (h2, w2, none) = runs
    assert [r["train_loss"] for r in h1] == [r["train_loss"] for r in h2]          # bit-identical training
    assert all(np.array_equal(w1[k], w2[k]) for k in w1)
    assert [n for _, n in warm] == [16 * train.WARMUP_STEPS_PER_SHAPE, 0, 0] and [n for _, n in none] == [0, 0, 0]
    assert h1[0]["warmup_seconds"] == pytest.approx(warm[0][0]) and h1[1]["warmup_seconds"] is None
    assert h2[0]["warmup_seconds"] is None and all(r["images_per_second"] > 0 for r in h1 + h2)


def test_fit_prints_one_line_per_epoch(capsys):
    x, y = _fit_data()
    _model().fit(x, y, epochs=2, batch_size=16, progress=False)
    lines = capsys.readouterr().out.splitlines()
    assert [s.split("  ")[0] for s in lines] == ["epoch 1/2", "epoch 2/2"] and "img/s" in lines[0]
    _model().fit(x, y, epochs=2, batch_size=16, progress=False, verbose=False)
    assert capsys.readouterr().out == ""


def test_recipe_fields_of_airbench_recipes(setup, first, tmp_path):
    """momentum, param_groups, lookahead, lookahead_decay and whiten_bias_epochs: set in a recipe (a preset's or a
    config's; no flags), checked, stored in config.json and built by prepare; generic defaults otherwise, also
    for a config written before they existed."""
    from hetnet.errors import UsageError
    from hetnet.runs import RECIPE_EXTRA, RunConfig, make_config, prepare, rerun_config

    _, data, spec = setup
    base = {"model": str(spec), "data": str(data), "device": "cpu", "limit": 64}
    cfg = make_config(RunConfig(**base, optimizer="nesterov-decoupled", lr=4.0, momentum=0.85,
                                schedule="triangular:peak=0.3", param_groups=[{"params": "BatchNorm2D.bias",
                                                                               "lr_scale": 64}],
                                lookahead=5, lookahead_decay=0.9))
    r = cfg["recipe"]
    assert r["param_groups"] == [{"params": ["BatchNorm2D.bias"], "lr_scale": 64.0, "weight_decay_scale": 1.0}]
    assert (r["momentum"], r["lookahead"], r["lookahead_decay"], r["whiten_bias_epochs"]) == (0.85, 5, 0.9, 0)
    p = prepare(json.loads(json.dumps(cfg)))
    lrs = [g["lr"] for g in p.optimizer.param_groups]
    assert len(lrs) == 2 and lrs[0] / lrs[1] == pytest.approx(64.0) and p.schedule.peak == 0.3
    assert (p.lookahead.every, p.lookahead.decay, p.frozen_after) == (5, 0.9, [])
    defaults = make_config(RunConfig(**base))["recipe"]
    assert {k: defaults[k] for k in RECIPE_EXTRA} == {"momentum": 0.9, "param_groups": [], "lookahead": 0,
                                                       "lookahead_decay": 0.95, "whiten_bias_epochs": 0,
                                                       "drop_last": False}
    for kw, msg in (({"lookahead": -1}, "recipe field lookahead: expected a whole number"),
                    ({"lookahead_decay": 0.0}, "recipe field lookahead_decay: expected a number in \\(0, 1\\]"),
                    ({"momentum": 1.0}, "recipe field momentum: expected a number in \\[0, 1\\)"),
                    ({"optimizer": "momentum", "momentum": 0.0}, "momentum needs momentum > 0"),
                    ({"param_groups": [{"params": 3}]}, "param_groups, rule 0: 'params' must be"),
                    ({"schedule": "triangular:top=1"}, "--schedule: triangular takes"),
                    ({"whiten_bias_epochs": 1.5}, "recipe field whiten_bias_epochs"),
                    ({"drop_last": 1}, "recipe field drop_last: expected true or false")):
        with pytest.raises(UsageError, match=msg):
            make_config(RunConfig(**base, **kw))
    for kw, msg in (({"whiten_bias_epochs": 2}, "whiten_bias_epochs: the model's first layer, Conv2D.*no bias"),
                    ({"param_groups": [{"params": "Dense.gamma"}]}, "Dense.gamma matches none")):
        with pytest.raises(UsageError, match=msg):
            prepare(make_config(RunConfig(**base, **kw)))
    old = json.loads((first / "config.json").read_text())
    for k in RECIPE_EXTRA:
        del old["recipe"][k]
    path = tmp_path / "old-config.json"
    path.write_text(json.dumps(old))
    assert rerun_config(path)["recipe"] == json.loads((first / "config.json").read_text())["recipe"]


def test_limit_without_a_split_draws_from_every_class(tmp_path):
    """A folder with a test split is read class by class and needs no validation split: --limit N takes a seeded
    draw of N (every class here), not the first classes' images."""
    from test_data_folder import classes_tree, make_tree

    from hetnet.runs import RunConfig, make_config, prepare
    root = make_tree(tmp_path / "imgs", {**classes_tree(8, prefix="train/"), **classes_tree(2, prefix="test/")})
    cfg = make_config(RunConfig(model="mlp", dataset="folder", data=str(root), device="cpu", limit=9))
    p = prepare(cfg, cache=False)
    assert p.counts["train"] == 9 and p.config["val_fraction"] == 0.0
    assert set(p.train_loader.y.tolist()) == {0, 1, 2}
