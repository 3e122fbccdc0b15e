"""The resume guarantee: a `hetnet train` killed with SIGKILL at any moment and resumed ends bit-identical to an
uninterrupted run with the same seed, with the same metrics.jsonl lines (cpu backend)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hetnet import serialize
from hetnet.data.idx import write_idx

# BatchNorm (running statistics), Dropout (masks from hetnet's RNG), Nesterov momentum, cosine schedule with
# warm-up and crop+flip augmentation: every piece of state a resume has to restore. The second block is
# Conv2D -> ReLU -> MaxPool2D(2), which the cpu backend's training step runs as one fused op.
SPEC = {"input_shape": [1, 28, 28], "layers": [
    {"type": "Conv2D", "in_channels": 1, "out_channels": 4, "kernel_size": 3, "padding": 1, "bias": False},
    {"type": "BatchNorm2D", "num_features": 4}, {"type": "ReLU"}, {"type": "MaxPool2D", "kernel_size": 2},
    {"type": "Conv2D", "in_channels": 4, "out_channels": 4, "kernel_size": 3, "padding": 1},
    {"type": "ReLU"}, {"type": "MaxPool2D", "kernel_size": 2},
    {"type": "Flatten"}, {"type": "Dropout", "p": 0.25},
    {"type": "Dense", "in_features": 4 * 7 * 7, "out_features": 10}]}
EPOCHS = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    rng = np.random.default_rng(0)
    data = root / "data"
    data.mkdir()
    for split, n in (("train", 600), ("t10k", 60)):
        y = rng.integers(0, 10, n).astype(np.uint8)
        x = rng.integers(0, 255, (n, 28, 28)).astype(np.uint8)
        write_idx(data / f"{split}-images-idx3-ubyte.gz", x)
        write_idx(data / f"{split}-labels-idx1-ubyte.gz", y)
    spec = root / "spec.json"
    spec.write_text(json.dumps(SPEC))
    return root, data, spec


def _argv(data, spec, out):
    return [sys.executable, "-m", "hetnet", "train", "--model", str(spec), "--data", str(data), "--device", "cpu",
            "--epochs", str(EPOCHS), "--batch-size", "32", "--optimizer", "momentum", "--lr", "0.05",
            "--schedule", "cosine", "--warmup-epochs", "1", "--weight-decay", "5e-4", "--augment", "crop:2,flip",
            "--limit", "400", "--val-fraction", "0.1", "--seed", "7", "--ema", "0.99", "--out", str(out)]


def _run(argv):
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r


def _kill_when(argv, ready, timeout=60.0):
    """Start a run and SIGKILL it as soon as ready() is true; returns True if it was killed mid-run."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    try:
        while proc.poll() is None and time.monotonic() - t0 < timeout:
            if ready():
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.002)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return False


def _epochs_done(out: Path) -> int:
    try:
        return len((out / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def _weights(path: Path) -> dict:
    arrays, _ = serialize.read_safetensors(path)
    return arrays


def test_sigkill_and_resume_is_bit_identical(setup):
    root, data, spec = setup
    _check_kill_and_resume(root / "uninterrupted", root / "killed", lambda out: _argv(data, spec, out))


# airbench's recipe: parameter groups (BatchNorm biases at 64x the learning rate), Nesterov SGD with decoupled
# hyperparameters, the triangular schedule, lookahead every 3 steps (not a divisor of the 13 steps of an epoch), the
# first layer's bias frozen after epoch 2, label smoothing. No flag names these recipe fields: the runs start from
# a config.json (--config), as a rerun does.
AIRBENCH_SPEC = {"input_shape": [1, 28, 28], "layers": [
    {"type": "Conv2D", "in_channels": 1, "out_channels": 4, "kernel_size": 3, "padding": 1},
    {"type": "GELU"}, {"type": "MaxPool2D", "kernel_size": 2},
    {"type": "Conv2D", "in_channels": 4, "out_channels": 4, "kernel_size": 3, "padding": 1, "bias": False},
    {"type": "BatchNorm2D", "num_features": 4, "scale": "frozen", "momentum": 0.4}, {"type": "GELU"},
    {"type": "MaxPool2D", "kernel_size": 2}, {"type": "Flatten"},
    {"type": "Dense", "in_features": 4 * 7 * 7, "out_features": 10, "bias": False}, {"type": "Scale", "factor": 0.25}]}
AIRBENCH_RECIPE = {"epochs": EPOCHS, "batch_size": 32, "lr": 2.0, "optimizer": "nesterov-decoupled",
                   "schedule": "triangular", "weight_decay": 0.05, "warmup_epochs": 0.0, "label_smoothing": 0.2,
                   "ema": 0.0, "augment": ["crop:2", "flip"], "momentum": 0.85,
                   "param_groups": [{"params": "BatchNorm2D.bias", "lr_scale": 64.0}], "lookahead": 3,
                   "lookahead_decay": 0.95, "whiten_bias_epochs": 2}


def _airbench_config(root: Path, data: Path, name: str, **recipe) -> Path:
    cfg = root / f"{name}-config.json"
    cfg.write_text(json.dumps({"model": None, "spec": AIRBENCH_SPEC, "dataset": "fashion-mnist", "data": str(data),
                               "device": "cpu", "recipe": {**AIRBENCH_RECIPE, **recipe}, "val_fraction": 0.1,
                               "seed": 7, "limit": 400, "skip_bad_images": False}))
    return cfg


def _rerun(cfg: Path):
    return lambda o: [sys.executable, "-m", "hetnet", "train", "--config", str(cfg), "--out", str(o), "--no-progress"]


def test_sigkill_and_resume_with_airbench_recipe_is_bit_identical(setup):
    root, data, _ = setup
    cfg = _airbench_config(root, data, "airbench")
    ref, out = root / "airbench-uninterrupted", root / "airbench-killed"
    _check_kill_and_resume(ref, out, _rerun(cfg))
    ck = serialize.read_checkpoint(ref)
    assert [len(g["params"]) for g in ck.optimizer["groups"]] == [1, 5]      # the BN bias, then the rest
    assert ck.optimizer["groups"][0]["lr"] / ck.optimizer["groups"][1]["lr"] == pytest.approx(64.0)
    assert ck.lookahead["steps"] == ck.optimizer["steps"] == EPOCHS * 13
    assert json.loads((ref / "config.json").read_text())["recipe"]["whiten_bias_epochs"] == 2


def test_sigkill_and_resume_of_a_fractional_run_is_bit_identical(setup):
    """5.5 epochs of airbench's recipe with drop_last: 400 images make 12 batches of 32 an epoch, the triangular
    schedule and the lookahead span ceil(5.5 x 12) = 66 steps, and epoch 6 stops after 6 batches."""
    root, data, _ = setup
    cfg = _airbench_config(root, data, "fractional", epochs=EPOCHS - 0.5, drop_last=True)
    ref, out = root / "fractional-uninterrupted", root / "fractional-killed"
    _check_kill_and_resume(ref, out, _rerun(cfg))
    ck = serialize.read_checkpoint(ref)
    assert ck.lookahead["steps"] == ck.optimizer["steps"] == 66
    steps = [json.loads(s)["steps"] for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [12] * (EPOCHS - 1) + [6]


def _check_kill_and_resume(ref: Path, out: Path, argv) -> None:
    """argv(out) trained uninterrupted into ref, and killed twice and resumed into out: the same weights, bit for
    bit, and the same metrics."""
    _run(argv(ref))
    # kill 1: just after the run directory appears (before or during the first epoch)
    assert _kill_when(argv(out), lambda: (out / "config.json").exists())
    assert not (out / "model.safetensors").exists()
    # kill 2: in the middle of the resumed run, once two more epochs have been written
    resume = [sys.executable, "-m", "hetnet", "train", "--resume", str(out)]
    start = _epochs_done(out)
    killed = _kill_when(resume, lambda: _epochs_done(out) >= start + 2)
    assert killed and not (out / "model.safetensors").exists()
    # a partial last line in metrics.jsonl must not survive a resume
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 99, "train_lo')
    r = _run(resume)
    assert "resuming after epoch" in r.stdout

    a, b = _weights(ref / "model.safetensors"), _weights(out / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k       # bit-identical, not close
    assert (ref / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()   # the file too
    ref_lines = [json.loads(s) for s in (ref / "metrics.jsonl").read_text().splitlines()]
    out_lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in out_lines] == list(range(1, EPOCHS + 1)) == [r["epoch"] for r in ref_lines]
    for x, y in zip(ref_lines, out_lines):
        for k in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "test_loss", "test_accuracy"):
            assert x[k] == y[k], k


def test_resume_of_a_finished_run_is_refused(setup):
    root, data, spec = setup
    out = root / "uninterrupted"
    if not (out / "model.safetensors").exists():
        _run(_argv(data, spec, out))
    r = subprocess.run([sys.executable, "-m", "hetnet", "train", "--resume", str(out)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("error: --resume") and "finished" in r.stderr


def test_resume_with_changed_data_is_refused(setup, tmp_path):
    root, data, spec = setup
    out = tmp_path / "run"
    argv = _argv(data, spec, out)
    argv[argv.index("--epochs") + 1] = "1"
    assert _kill_when(argv, lambda: (out / "config.json").exists())
    cfg_changed = root / "data2"
    cfg_changed.mkdir(exist_ok=True)
    for f in data.iterdir():
        (cfg_changed / f.name).write_bytes(f.read_bytes())
    rng = np.random.default_rng(1)
    write_idx(cfg_changed / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, 600).astype(np.uint8))
    # point the checkpoint's config at the changed data, as if the files had been replaced in place
    ck = serialize.read_checkpoint(out)
    ck.state["config"]["data"] = str(cfg_changed)
    arrays, meta = serialize.read_safetensors(ck.path, "checkpoint")
    meta["state"] = ck.state
    serialize.write_safetensors(ck.path, arrays, meta)
    r = subprocess.run([sys.executable, "-m", "hetnet", "train", "--resume", str(out)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "differ" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (out / "model.safetensors").exists()
    os.sync()
