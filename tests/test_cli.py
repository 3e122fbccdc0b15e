"""The `hetnet` command end to end on tiny IDX files, and every bad input: exit 2, one `error:` line, no traceback,
no model.safetensors."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hetnet.cli import build_parser, main
from hetnet.data.idx import write_idx

TINY_SPEC = {"input_shape": [1, 28, 28], "layers": [
    {"type": "Conv2D", "in_channels": 1, "out_channels": 4, "kernel_size": 3, "padding": 1, "bias": False},
    {"type": "BatchNorm2D", "num_features": 4}, {"type": "ReLU"}, {"type": "MaxPool2D", "kernel_size": 4},
    {"type": "Flatten"}, {"type": "Dropout", "p": 0.2},
    {"type": "Dense", "in_features": 4 * 7 * 7, "out_features": 10}]}


def make_idx(folder: Path, n_train: int = 300, n_test: int = 100, seed: int = 0) -> Path:
    """Fashion-MNIST-shaped IDX files: class c is a bright block at a class-dependent place, plus noise."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        y = rng.integers(0, 10, n).astype(np.uint8)
        x = rng.integers(0, 90, (n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(y):
            r, q = divmod(int(c), 5)
            x[i, 4 + 10 * r:10 + 10 * r, 2 + 5 * q:6 + 5 * q] += 120
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", x)
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", y)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_idx(tmp_path_factory.mktemp("idx") / "fashion")


@pytest.fixture(scope="module")
def spec_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("spec") / "tiny.json"
    p.write_text(json.dumps(TINY_SPEC))
    return p


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data, spec_file) -> Path:
    """One finished run, trained by a real `hetnet train` subprocess."""
    out = tmp_path_factory.mktemp("runs") / "run"
    r = _hetnet("train", "--model", str(spec_file), "--data", str(data), "--epochs", "2", "--batch-size", "32",
                "--device", "cpu", "--out", str(out), "--augment", "crop:1", "--lr", "0.1")
    assert r.returncode == 0, r.stderr
    assert "epoch 2/2" in r.stdout and "test accuracy" in r.stdout and str(out) in r.stdout
    return out


def _hetnet(*args, timeout=120):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "hetnet", *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def _assert_usage_error(rc, err: str, *needles: str) -> None:
    lines = [s for s in err.splitlines() if s.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


# --- the happy path ------------------------------------------------------------------------------------------


def test_train_writes_a_complete_run_directory(trained):
    for name in ("config.json", "metrics.jsonl", "model.safetensors", "curves.png", "confusion.png",
                 "checkpoint/state.safetensors"):
        assert (trained / name).is_file(), name
    lines = [json.loads(s) for s in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    assert list(lines[0]) == ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "test_loss",
                              "test_accuracy", "seconds", "images_per_second", "warmup_seconds", "tta", "steps"]
    assert [r["steps"] for r in lines] == [10, 10]                  # 300 images, batches of 32
    assert lines[0]["val_loss"] is None and lines[-1]["test_accuracy"] > 0.5
    cfg = json.loads((trained / "config.json").read_text())
    assert cfg["spec"] == TINY_SPEC and cfg["seed"] == 0 and cfg["device"] == "cpu"
    assert cfg["recipe"]["epochs"] == 2 and cfg["recipe"]["augment"] == ["crop:1"]
    assert cfg["versions"]["numpy"] and cfg["dataset"] == "fashion-mnist"
    assert not [p for p in trained.rglob("*") if p.name.endswith(".tmp")]


def test_evaluate_run_dir_and_model_file(trained, capsys):
    assert main(["evaluate", str(trained), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "test set (100 images" in out and "accuracy" in out and "Ankle boot" in out
    assert main(["evaluate", str(trained / "model.safetensors"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    metrics = [json.loads(s) for s in (trained / "metrics.jsonl").read_text().splitlines()]
    assert res["accuracy"] == pytest.approx(metrics[-1]["test_accuracy"])
    assert res["images"] == 100 and len(res["confusion"]) == 10


def test_predict_top_k(trained, tmp_path, capsys):
    img = np.zeros((28, 28), np.uint8)
    img[4:10, 7:11] = 200                                 # class 1's block
    Image.fromarray(img).save(tmp_path / "a.png")
    Image.fromarray(np.stack([img] * 3, -1)).resize((60, 50)).save(tmp_path / "b.jpg")   # RGB, other size
    assert main(["predict", str(trained), str(tmp_path / "a.png"), str(tmp_path / "b.jpg"), "--top-k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    probs = [float(part.rsplit(" ", 1)[1]) for part in lines[0].split(": ", 1)[1].split(", ")]
    assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001


def test_info_never_crashes(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "numpy" in out and "cpu" in out and "cuda" in out and "fashion-mnist" in out


@pytest.mark.parametrize("argv, points_at", [(["train", "--bogus-flag"], "hetnet train --help"),
                                              (["info", "a", "b"], "hetnet info --help"),
                                              (["--bogus"], "hetnet --help")])
def test_an_unknown_flag_points_at_its_commands_help(argv, points_at, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    _assert_usage_error(e.value.code, capsys.readouterr().err, "unrecognized arguments", f"(see `{points_at}`)")


@pytest.mark.parametrize("name", ["fashon-cnn", "nosuchdir/"])
def test_info_of_an_unknown_name_is_one_error_line(name, capsys):
    rc = main(["info", name])
    _assert_usage_error(rc, capsys.readouterr().err, f"info: {name!r} is not a preset", "run directory")


def test_bench_forwards_or_says_one_line(capsys, monkeypatch):
    import types

    got = {}
    fake = types.ModuleType("hetnet.bench")
    fake.main = lambda argv: got.setdefault("argv", argv) and 0
    monkeypatch.setitem(sys.modules, "hetnet.bench", fake)
    assert main(["bench", "--models", "x", "-n", "3"]) == 0
    assert got["argv"] == ["--models", "x", "-n", "3"]


def test_python_dash_m_and_help():
    r = _hetnet("--help")
    assert r.returncode == 0 and "train" in r.stdout and "predict" in r.stdout


# --- bad input -----------------------------------------------------------------------------------------------


def _train_fails(capsys, tmp_path, *args, needles=()):
    out = tmp_path / "out"
    rc = main(["train", "--device", "cpu", "--out", str(out), *args])
    err = capsys.readouterr().err
    _assert_usage_error(rc, err, *needles)
    assert not (out / "model.safetensors").exists()
    return err


@pytest.mark.parametrize("flag,value", [("--epochs", "0"), ("--epochs", "-3"), ("--epochs", "two"),
                                        ("--epochs", "0.0"), ("--epochs", "-0.5"), ("--epochs", "nan"),
                                        ("--epochs", "inf"),
                                        ("--batch-size", "0"), ("--batch-size", "-1"),
                                        ("--lr", "nan"), ("--lr", "inf"), ("--lr", "0"), ("--lr", "-1"),
                                        ("--lr", "abc"), ("--limit", "0"), ("--val-fraction", "1.5"),
                                        ("--optimizer", "rmsprop"), ("--dataset", "imagenet")])
def test_bad_flags(capsys, tmp_path, data, flag, value):
    with pytest.raises(SystemExit) as e:
        main(["train", "--device", "cpu", "--data", str(data), "--out", str(tmp_path / "out"), flag, value])
    _assert_usage_error(e.value.code, capsys.readouterr().err, flag)
    assert not (tmp_path / "out").exists()


def test_epochs_and_drop_last_flags():
    """--epochs takes a whole or fractional number; --drop-last / --no-drop-last set the recipe field, and
    leaving both out keeps the preset's (None)."""
    parse = build_parser().parse_args
    assert parse(["train", "--epochs", "9.9"]).epochs == 9.9 and parse(["train", "--epochs", "3"]).epochs == 3
    assert [parse(["train", *flag]).drop_last for flag in (["--drop-last"], ["--no-drop-last"], [])] == \
        [True, False, None]


def test_missing_data(capsys, tmp_path):
    _train_fails(capsys, tmp_path, "--data", str(tmp_path / "nowhere"), needles=[str(tmp_path / "nowhere")])


def test_corrupt_data(capsys, tmp_path):
    d = make_idx(tmp_path / "bad", 50, 20)
    raw = gzip.decompress((d / "train-images-idx3-ubyte.gz").read_bytes())
    (d / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw[:-100]))          # truncated
    _train_fails(capsys, tmp_path, "--data", str(d), needles=["train-images-idx3-ubyte.gz"])


def test_unknown_model(capsys, tmp_path, data):
    _train_fails(capsys, tmp_path, "--data", str(data), "--model", "resnet9000", needles=["--model", "resnet9000"])


def test_spec_that_does_not_chain(capsys, tmp_path, data):
    spec = json.loads(json.dumps(TINY_SPEC))
    spec["layers"][-1]["in_features"] = 123
    p = tmp_path / "broken.json"
    p.write_text(json.dumps(spec))
    _train_fails(capsys, tmp_path, "--data", str(data), "--model", str(p), needles=[str(p), "chain"])


def test_spec_not_json(capsys, tmp_path, data):
    p = tmp_path / "spec.json"
    p.write_text("{not json")
    _train_fails(capsys, tmp_path, "--data", str(data), "--model", str(p), needles=[str(p)])


def test_spec_input_channels_do_not_fit_the_data(capsys, tmp_path, data):
    spec = json.loads(json.dumps(TINY_SPEC))
    spec["input_shape"] = [2, 28, 28]
    spec["layers"][0]["in_channels"] = 2
    p = tmp_path / "two-channel.json"
    p.write_text(json.dumps(spec))
    _train_fails(capsys, tmp_path, "--data", str(data), "--model", str(p), needles=["--model", str(p), "[2, 28, 28]"])


def test_spec_with_wrong_number_of_classes(capsys, tmp_path, data):
    spec = json.loads(json.dumps(TINY_SPEC))
    spec["layers"][-1]["out_features"] = 7
    p = tmp_path / "seven.json"
    p.write_text(json.dumps(spec))
    _train_fails(capsys, tmp_path, "--data", str(data), "--model", str(p), needles=["10 classes"])


def test_unknown_device(capsys, tmp_path, data):
    rc = main(["train", "--device", "tpu:0", "--data", str(data), "--out", str(tmp_path / "out")])
    _assert_usage_error(rc, capsys.readouterr().err, "tpu:0")
    assert not (tmp_path / "out").exists()


def test_cuda_without_a_gpu_is_one_line(capsys, tmp_path, data):
    from hetnet.device import cuda_available

    cuda = pytest.importorskip("hetnet.backends.cuda")
    if cuda_available() or not hasattr(cuda, "CudaBackend"):
        pytest.skip("a GPU is present, or the cuda backend is not there yet")
    rc = main(["train", "--device", "cuda", "--data", str(data), "--out", str(tmp_path / "out")])
    _assert_usage_error(rc, capsys.readouterr().err)


def test_resume_without_checkpoint(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    for target in (tmp_path / "empty", tmp_path / "absent"):
        rc = main(["train", "--resume", str(target)])
        _assert_usage_error(rc, capsys.readouterr().err, "--resume", str(target))


def test_resume_with_corrupt_checkpoint(capsys, tmp_path):
    ck = tmp_path / "run" / "checkpoint" / "state.safetensors"
    ck.parent.mkdir(parents=True)
    ck.write_bytes(b"garbage" * 10)
    rc = main(["train", "--resume", str(tmp_path / "run")])
    _assert_usage_error(rc, capsys.readouterr().err, str(ck))


def test_out_dir_holding_a_run_is_refused(capsys, trained, data):
    rc = main(["train", "--device", "cpu", "--data", str(data), "--out", str(trained)])
    _assert_usage_error(rc, capsys.readouterr().err, "--out")


@pytest.mark.parametrize("kind", ["corrupt", "foreign", "truncated", "missing", "unfinished-run"])
def test_evaluate_and_predict_reject_bad_model_files(capsys, tmp_path, trained, kind):
    path = tmp_path / "model.safetensors"
    if kind == "corrupt":
        path.write_bytes(os.urandom(300))
    elif kind == "foreign":
        import safetensors.numpy as stnp

        stnp.save_file({"w": np.zeros(3, np.float32)}, str(path))
    elif kind == "truncated":
        path.write_bytes((trained / "model.safetensors").read_bytes()[:-64])
    elif kind == "unfinished-run":
        (tmp_path / "checkpoint").mkdir()
        (tmp_path / "checkpoint" / "state.safetensors").write_bytes(b"x")
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(img)
    for argv in (["evaluate", str(path)], ["predict", str(path), str(img)]):
        if kind == "unfinished-run":
            argv[1] = str(tmp_path)
        rc = main(argv)
        _assert_usage_error(rc, capsys.readouterr().err, str(path))


def test_predict_bad_image(capsys, tmp_path, trained):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    for img in (bad, tmp_path / "absent.png"):
        rc = main(["predict", str(trained), str(img)])
        _assert_usage_error(rc, capsys.readouterr().err, str(img))


def test_divergence_exits_2_and_keeps_the_last_good_checkpoint(tmp_path, data, spec_file):
    out = tmp_path / "run"
    r = _hetnet("train", "--model", "mlp", "--data", str(data), "--epochs", "2", "--optimizer", "sgd", "--lr", "1e30",
                "--device", "cpu", "--out", str(out), "--no-augment")
    _assert_usage_error(r.returncode, r.stderr, "diverged", "checkpoint")
    assert (out / "checkpoint" / "state.safetensors").is_file() and not (out / "model.safetensors").exists()


def test_subprocess_bad_input_has_no_traceback(tmp_path):
    r = _hetnet("train", "--data", str(tmp_path / "nowhere"), "--device", "cpu", "--out", str(tmp_path / "o"))
    _assert_usage_error(r.returncode, r.stderr, str(tmp_path / "nowhere"))
    assert not (tmp_path / "o").exists()


def test_ctrl_c_exits_130_with_one_line(tmp_path, data, spec_file):
    import signal
    import time

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "hetnet", "train", "--model", str(spec_file), "--data", str(data),
                             "--epochs", "200", "--device", "cpu", "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    while not (out / "metrics.jsonl").exists() and time.monotonic() - t0 < 60:
        time.sleep(0.01)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130, err
    lines = [s for s in err.splitlines() if s.strip()]
    assert len(lines) == 1 and "--resume" in lines[0] and "Traceback" not in err
    assert not (out / "model.safetensors").exists()
