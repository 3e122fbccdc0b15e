"""The precision setting (hetnet.device): where it is taken (model.to, get_backend, hetnet train / evaluate
--precision, a preset's default), and that cpu and reference compute in float32 / float64 whatever is asked, saying
so once. The cuda backend's tensor-core products are checked against float64 in test_ops.py (cuda@tf32, ...) and
tests/test_cuda.py. And benchmarks/precision_accuracy.py, the sweep that measures a precision's accuracy against
fp32's."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

import hetnet as hn
from hetnet import device as D
from hetnet import zoo
from hetnet.errors import DeviceError


def test_parse_precision():
    assert [D.parse_precision(p) for p in (None, "fp32", "TF32", " bf16 ")] == ["fp32", "fp32", "tf32", "bf16"]
    with pytest.raises(DeviceError, match="unknown precision 'fp16'"):
        D.parse_precision("fp16")


def test_cpu_and_reference_ignore_the_setting_with_one_note(capsys, monkeypatch):
    monkeypatch.setattr(D, "_noted", set())
    for _ in range(2):
        assert D.get_backend("cpu", "bf16") is D.get_backend("cpu") and D.get_backend("cpu", "tf32").precision == "fp32"
        assert D.get_backend("reference", "bf16") is D.get_backend("reference")
    err = capsys.readouterr().err
    assert err.count("note: precision") == 2 and "cpu backend computes in float32" in err
    assert "reference backend computes in float64" in err


def test_model_to_takes_a_precision(rng, capsys):
    model = hn.Sequential([hn.Flatten(), hn.Dense(6, 3)]).to("cpu", precision="tf32")
    assert model.backend.precision == "fp32" and model.backend is D.get_backend("cpu")
    with pytest.raises(DeviceError, match="unknown precision"):
        model.to("cpu", precision="int8")


def test_presets_name_their_precision():
    assert all(p.precision in D.PRECISIONS for p in zoo.PRESETS.values())
    assert zoo.PRESETS["thesis-m1"].precision == "fp32"


def test_train_records_precision_and_evaluate_takes_it(tmp_path, capsys, monkeypatch):
    from hetnet.cli import main

    monkeypatch.setattr(D, "_noted", set())
    rc = main(["train", "--model", "mlp", "--dataset", "folder", "--data", str(_tiny_folder(tmp_path)), "--device",
               "cpu", "--precision", "bf16", "--epochs", "1", "--batch-size", "8", "--out", str(tmp_path / "run"),
               "--no-progress"])
    assert rc == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["precision"] == "bf16"        # as asked: it applies where the run goes to a GPU
    assert "note: precision bf16" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "run"), "--device", "cpu", "--precision", "tf32"]) == 0
    with pytest.raises(SystemExit) as e:
        main(["train", "--precision", "fp8"])
    assert e.value.code == 2


def _tiny_folder(tmp_path):
    from PIL import Image

    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_a_presets_precision_is_its_cuda_default(capsys, monkeypatch):
    from hetnet import runs

    monkeypatch.setattr(D, "_noted", set())
    assert zoo.PRESETS["cifar-speed"].precision == "bf16"
    config = runs.make_config(runs.RunConfig(model="cifar-speed", dataset="folder", device="cpu"))
    assert config["precision"] == "fp32" and "note:" not in capsys.readouterr().err      # on the CPU: no notice
    asked = runs.make_config(runs.RunConfig(model="cifar-speed", dataset="folder", device="cpu", precision="tf32"))
    assert asked["precision"] == "tf32"                                                    # a flag is kept as asked


# --- benchmarks/precision_accuracy.py: the accuracy target's sweep ----------------------------------------------------

def _accuracy_script():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "precision_accuracy.py"
    spec = importlib.util.spec_from_file_location("precision_accuracy", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_precision_accuracy_pairs_runs_of_one_commit_and_seed():
    """The summary pairs each bf16 run with the fp32 run of the same job, commit and seed only, and judges the mean
    paired difference (points) against the target, with its standard error; runs go seed-major, fp32 first."""
    pa = _accuracy_script()
    assert pa.plan([3, 1], ["bf16"]) == [(3, "fp32"), (3, "bf16"), (1, "fp32"), (1, "bf16")]

    def row(precision, seed, acc, commit="a"):
        return {"job": "cifar-wide", "precision": precision, "seed": seed, "accuracy": acc, "commit": commit}

    rows = [row("fp32", 0, 0.890), row("bf16", 0, 0.886), row("fp32", 1, 0.880), row("bf16", 1, 0.882),
            row("fp32", 2, 0.885), row("bf16", 3, 0.7),                       # seed 3: no fp32 pair
            row("fp32", 0, 0.95, "b"), row("bf16", 0, 0.90, "b")]             # another commit
    a, b = pa.summary(rows)
    assert a["seeds"] == [0, 1] and a["differences"] == [-0.4, 0.2] and a["mean_difference"] == -0.1
    assert a["standard_error"] == 0.3 and a["within_target"] and a["fp32_mean"] == 88.5 and a["mean"] == 88.4
    assert b["commit"] == "b" and b["mean_difference"] == -5.0 and b["standard_error"] is None
    assert not b["within_target"]


def test_precision_accuracy_refuses_a_file_it_did_not_write(tmp_path, capsys):
    pa = _accuracy_script()
    bad = tmp_path / "other.json"
    bad.write_text('{"rows": [{"model": "x"}]}')
    assert pa.main(["--job", "fashion-cnn", "--device", "cpu", "--out", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --out") and "other.json" in err[0]
    assert pa.main(["--job", "fashion-cnn", "--seeds", "1,x", "--out", str(tmp_path / "a.json")]) == 2
    assert capsys.readouterr().err.startswith("error: --seeds")


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists(),
                    reason="dataset-fashion-mnist not installed")
def test_precision_accuracy_runs_and_adds_to_its_json(tmp_path):
    """A CPU smoke sweep (one epoch on 300 images): a row per run as `hetnet train` scores it, the JSON naming the
    host, commit and date; a second sweep adds its rows to the same file. (The cpu backend computes bf16's runs in
    float32: the pair is equal.)"""
    pa = _accuracy_script()
    out = tmp_path / "acc.json"
    argv = ["--job", "fashion-cnn", "--device", "cpu", "--epochs", "1", "--limit", "300", "--out", str(out)]
    assert pa.main([*argv, "--seeds", "0"]) == 0
    assert pa.main([*argv, "--seeds", "1"]) == 0
    doc = json.loads(out.read_text())
    assert [(r["seed"], r["precision"]) for r in doc["rows"]] == [(0, "fp32"), (0, "bf16"), (1, "fp32"), (1, "bf16")]
    assert doc["environment"]["host"] and doc["environment"]["commit"] and doc["environment"]["time_utc"]
    assert all(0 < r["accuracy"] <= 1 and r["epochs"] == 1 for r in doc["rows"])
    (s,) = doc["summary"]
    assert s["seeds"] == [0, 1] and s["differences"] == [0.0, 0.0] and s["within_target"]
