"""What the data-parallel tests share (tests/test_parallel*.py): the two small models their `hetnet train` runs
train, the folder that holds them and their data, and how to start and read those runs."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
from test_cli import make_idx

from hetnet import serialize

ROOT = Path(__file__).resolve().parents[1]

# no BatchNorm: N ranks at batch B train exactly (up to rounding) as one process at N*B
SPEC = {"input_shape": [1, 28, 28], "layers": [
    {"type": "Conv2D", "in_channels": 1, "out_channels": 4, "kernel_size": 3, "padding": 1},
    {"type": "ReLU"}, {"type": "MaxPool2D", "kernel_size": 2}, {"type": "Flatten"},
    {"type": "Dense", "in_features": 4 * 14 * 14, "out_features": 32}, {"type": "ReLU"},
    {"type": "Dense", "in_features": 32, "out_features": 10}]}
# BatchNorm: so with synchronised statistics (--sync-bn)
BN_SPEC = {"input_shape": [1, 28, 28], "layers": [
    {"type": "Conv2D", "in_channels": 1, "out_channels": 4, "kernel_size": 3, "padding": 1, "bias": False},
    {"type": "BatchNorm2D", "num_features": 4}, {"type": "ReLU"}, {"type": "MaxPool2D", "kernel_size": 2},
    {"type": "Flatten"}, {"type": "Dense", "in_features": 4 * 14 * 14, "out_features": 10}]}
TRAIN_IMAGES = 512


def make_work(root: Path) -> Path:
    """root/data (IDX files: TRAIN_IMAGES training, 64 test images), root/spec.json, root/bn.json."""
    make_idx(root / "data", n_train=TRAIN_IMAGES, n_test=64)
    (root / "spec.json").write_text(json.dumps(SPEC))
    (root / "bn.json").write_text(json.dumps(BN_SPEC))
    return root


def train_args(work: Path, batch: int, out: str, epochs: int, spec: str = "spec.json") -> list[str]:
    """`hetnet train` arguments: momentum SGD, crop and flip, seed 5, no progress bar."""
    return ["train", "--model", str(work / spec), "--data", str(work / "data"), "--epochs", str(epochs),
            "--batch-size", str(batch), "--optimizer", "momentum", "--lr", "0.05", "--augment", "crop:2,flip",
            "--seed", "5", "--no-progress", "--out", out]


def child_env(**extra) -> dict:
    """The environment of a hetnet process started by a test: this checkout's sources first, no fault hook unless
    given."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    env.pop("HETNET_TEST_FAULT", None)
    env.update(extra)
    return env


def hetnet_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "hetnet", *args]


def final_weights(run: Path) -> np.ndarray:
    """Every array of a run's model.safetensors, in one float64 vector."""
    arrays, _ = serialize.read_safetensors(run / "model.safetensors")
    return np.concatenate([np.asarray(arrays[k], np.float64).ravel() for k in sorted(arrays)])


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


RUN_FILES = sorted(["checkpoint", "config.json", "confusion.png", "curves.png", "metrics.jsonl", "model.safetensors",
                    "model-best.safetensors"])
