"""The precision setting (hetnet.device): where it is taken (model.to, get_backend, hetnet train / evaluate
--precision, a preset's default), and that cpu and reference compute in float32 / float64 whatever is asked, saying
so once. The cuda backend's tensor-core products are checked against float64 in test_ops.py (cuda@tf32, ...) and
tests/test_cuda.py."""
from __future__ import annotations

import json

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
