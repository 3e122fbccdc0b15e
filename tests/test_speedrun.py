"""The CIFAR-10 peer run's pieces that run without a GPU (hetnet.bench.speedrun): the held-out split both sides use,
the data airbench is fed (its ./cifar10/*.pt files), reading airbench's printed table, the airbench wrapper around a
stand-in module, a hetnet run of the preset on the cpu backend, and the JSON written from stand-in sides."""
from __future__ import annotations

import io
import json
import sys
import tarfile
import types
from pathlib import Path

import numpy as np
import pytest
from conftest import torch_or_skip
from PIL import Image

from hetnet import data as hdata
from hetnet.bench import speedrun as S
from hetnet.bench.common import environment
from hetnet.data import folder
from hetnet.errors import UsageError

CLASSES = [f"c{k}" for k in range(10)]

# airbench 0.1.8's train() printout (utils.print_columns / print_training_details), two epochs and the final row
AIRBENCH_TABLE = """\
------------------------------------------------------------------------------------------------------
|  run     |  epoch  |  train_loss  |  train_acc  |  val_acc  |  tta_val_acc  |  total_time_seconds  |
------------------------------------------------------------------------------------------------------
|       0  |      0  |      0.8123  |     0.7000  |   0.7123  |               |              1.2346  |
|          |      1  |      0.8123  |     0.7000  |   0.7123  |               |              1.2346  |
|          |   eval  |      0.5000  |     0.9000  |   0.9000  |       0.9051  |              2.2179  |
------------------------------------------------------------------------------------------------------
"""


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """A CIFAR-like archive: train/<class>/<n>.png, 10 classes x 8 images of 32x32 (PNG: lossless)."""
    path = tmp_path_factory.mktemp("speedrun") / "cifar-like.tar.gz"
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:gz") as tf:
        for c in CLASSES:
            for i in range(8):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
                info = tarfile.TarInfo(f"train/{c}/{i:04d}.png")
                info.size = buf.tell()
                tf.addfile(info, io.BytesIO(buf.getvalue()))
    return path


def test_held_out_split_is_hetnet_trains_validation_split():
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(10), 5000)
    rng.shuffle(y)
    x = np.arange(len(y))
    tx, ty, hx, hy = hdata.held_out_split(x, y, 5000, seed=0)
    assert len(hx) == 5000 and np.bincount(hy).tolist() == [500] * 10             # stratified
    assert sorted(np.concatenate([tx, hx]).tolist()) == list(range(50000))          # disjoint, complete
    for a, b in zip((tx, ty, hx, hy), hdata.split_train_val(x, y, 0.1, seed=0)):    # --val-fraction 0.1 --seed 0
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(hdata.held_out_split(x, y, 5000, seed=0)[2], hx)  # a fixed seed
    with pytest.raises(UsageError):
        hdata.held_out_split(x, y, 50000)


def test_prepare_data_reads_the_cache_the_second_time(archive, monkeypatch):
    d = S.prepare_data(archive, held_out=20)
    assert d.train_x.shape == (60, 3, 32, 32) and d.held_x.shape == (20, 3, 32, 32)
    assert np.bincount(d.held_y).tolist() == [2] * 10 and d.class_names == CLASSES and d.held_fraction == 0.25

    def no_decoding(*a, **k):
        raise AssertionError("decoded again")

    monkeypatch.setattr(folder, "read_image_folder", no_decoding)
    again = S.prepare_data(archive, held_out=20, limit=30)
    np.testing.assert_array_equal(again.held_x, d.held_x)
    np.testing.assert_array_equal(again.train_x, d.train_x[:30])


def test_airbench_is_fed_our_images(archive, tmp_path):
    torch = torch_or_skip()
    d = S.prepare_data(archive, held_out=20)
    root = S.write_airbench_data(d, tmp_path)
    for name, x, y in (("train.pt", d.train_x, d.train_y), ("test.pt", d.held_x, d.held_y)):
        saved = torch.load(root / name, weights_only=True)          # how airbench's CifarLoader can read it
        assert saved["images"].dtype == torch.uint8 and saved["labels"].dtype == torch.int64
        np.testing.assert_array_equal(saved["images"].numpy(), x.transpose(0, 2, 3, 1))   # N x H x W x C
        np.testing.assert_array_equal(saved["labels"].numpy(), y)
        assert saved["classes"] == CLASSES


def test_parse_airbench_table():
    assert S.parse_airbench_table(AIRBENCH_TABLE) == (0.9051, 2.2179)
    with pytest.raises(ValueError, match="no final evaluation row"):
        S.parse_airbench_table(AIRBENCH_TABLE.replace("eval", "   9"))


def test_airbench_side_wraps_the_module_unmodified(archive, tmp_path, monkeypatch):
    """A stand-in for the airbench package: train94 reads ./cifar10/test.pt where airbench's CifarLoader does and
    prints its table; the wrapper warms up once, then parses one row per run."""
    torch = torch_or_skip()
    calls = []

    def train94(run=0):
        test = torch.load(Path("cifar10") / "test.pt", weights_only=True)
        calls.append((run, len(test["labels"])))
        print(AIRBENCH_TABLE.replace("0.9051", f"{0.5 + run / 100:.4f}"))

    fake = types.SimpleNamespace(train94=train94, warmup94=lambda: train94(run=-1))
    monkeypatch.setitem(sys.modules, "airbench", fake)
    d = S.prepare_data(archive, held_out=20)
    side = S.AirbenchSide(d, tmp_path)
    assert [side.run(i) for i in range(2)] == [{"run": 0, "accuracy": 0.5, "seconds": 2.2179},
                                               {"run": 1, "accuracy": 0.51, "seconds": 2.2179}]
    assert calls == [(-1, 20), (0, 20), (1, 20)] and len(side.log_lines) == 3


def test_airbench_missing_is_one_line(archive, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "airbench", None)
    with pytest.raises(UsageError, match="airbench 0.1.8 is not importable"):
        S.AirbenchSide(S.prepare_data(archive, held_out=20), tmp_path)


def test_hetnet_side_runs_the_preset_on_cpu(archive):
    d = S.prepare_data(archive, held_out=10, limit=24)
    side = S.HetnetSide(d, "cpu", epochs=1)
    row = side.run(0)
    assert row["run"] == 0 and 0 <= row["accuracy"] <= 1 and row["seconds"] > 0
    assert side.config["recipe"]["tta"] == 2 and side.config["recipe"]["epochs"] == 1


def test_run_speedrun_writes_the_result(archive, tmp_path):
    rows = {"hetnet": [(0.91, 2.0), (0.93, 1.0)], "airbench94": [(0.90, 2.2), (0.90, 2.4)]}
    sides = {name: (lambda i, name=name: {"run": i, "accuracy": rows[name][i][0], "seconds": rows[name][i][1]})
             for name in rows}
    sides["end_to_end"] = lambda: {"seconds": 9.5, "val_accuracy": 0.92, "command": "hetnet train ...",
                                   "start_seconds": 1.5, "epochs_seconds": 6.0, "finish_seconds": 2.0,
                                   "warmup_seconds": 0.5}
    sides["profile"] = lambda: {"steps": 44, "kernels_us": {"hn_conv_fwd_bf16_128x128x32s3a": 900.0, "bn": 50.0},
                                "kernel_sum_us": 950.0, "span_us": 1000.0}
    lines = []
    env = environment(threads=1, want_gpu=False)
    doc = S.run_speedrun(archive, "cpu", env, tmp_path, runs_each=2, log=lines.append, sides=sides, held_out=20,
                         precision="bf16")
    written = json.loads((tmp_path / "cifar_speedrun.json").read_text())
    assert written == json.loads(json.dumps(doc, default=str))
    for side in ("hetnet", "airbench94"):
        assert set(written[side]) == {"accuracy_mean", "accuracy_std", "seconds_mean", "runs"}
    assert written["hetnet"]["accuracy_mean"] == pytest.approx(0.92)
    assert written["hetnet"]["accuracy_std"] == pytest.approx(np.std([0.91, 0.93], ddof=1))
    assert written["hetnet"]["seconds_mean"] == pytest.approx(1.5) and len(written["hetnet"]["runs"]) == 2
    assert written["airbench94"]["seconds_mean"] == pytest.approx(2.3)
    assert written["hetnet_end_to_end_seconds"] == 9.5
    assert written["hetnet_seconds_over_airbench94"] == pytest.approx(1.5 / 2.3)
    assert written["environment"]["commit"] and written["data"]["held_out_images"] == 20
    md = (tmp_path / "cifar_speedrun.md").read_text()
    assert "airbench94 | 2 | 90.00 %" in md
    assert "9.5 s (start 1.5 s, epochs 6.0 s of which warm-up 0.5 s, finish 2.0 s)" in md
    assert written["hetnet_recipe"]["precision"] == "bf16" and "hetnet in bf16" in md
    # the preset's 9.9 epochs over the 60 training images (one batch of 60: no full batch of 1024 to keep)
    assert {k: written["hetnet_recipe"][k] for k in ("epochs", "batches_per_epoch", "train_steps")} == \
        {"epochs": 9.9, "batches_per_epoch": 1, "train_steps": 10} and "9.9 epochs = 10 steps" in md
    assert written["hetnet_profile"]["kernel_sum_us"] == 950.0
    assert "| 900.0 | hn_conv_fwd_bf16_128x128x32s3a |" in md and "44 steps profiled" in md
    assert any("hetnet run 1" in s for s in lines)
    with pytest.raises(UsageError, match="--speedrun-runs"):
        S.run_speedrun(archive, "cpu", env, tmp_path, runs_each=0, sides=sides, held_out=20)


def test_end_to_end_is_the_hetnet_train_command(archive, tmp_path):
    S.prepare_data(archive, held_out=20)                                   # the cache warm, as in the bench
    e2e = S.end_to_end_seconds(archive, "cpu", tmp_path, held_fraction=0.25, epochs=1)
    assert e2e["seconds"] > 0 and 0 <= e2e["val_accuracy"] <= 1
    phases = [e2e[k] for k in ("start_seconds", "epochs_seconds", "finish_seconds")]
    assert all(v > 0 for v in phases) and abs(sum(phases) - e2e["seconds"]) < 1e-6
    assert 0 <= e2e["warmup_seconds"] <= e2e["epochs_seconds"]
    assert "train --model cifar-speed" in e2e["command"] and "--val-fraction 0.25 --seed 0" in e2e["command"]
    config = json.loads((tmp_path / "hetnet-train-run" / "config.json").read_text())
    assert config["counts"] == {"train": 60, "val": 20, "test": 0}           # the held-out split's sizes


def test_bench_flag_names_a_missing_archive(tmp_path):
    torch_or_skip()
    from hetnet import bench

    with pytest.raises(UsageError, match="--cifar-tar: .*missing.tar.gz not found"):
        bench.main(["--cifar-speedrun", "--cifar-tar", str(tmp_path / "missing.tar.gz"), "--devices", "cpu",
                    "--out", str(tmp_path)])
    with pytest.raises(UsageError, match="--precision: --cifar-speedrun takes one precision"):
        bench.main(["--cifar-speedrun", "--precision", "fp32,bf16", "--devices", "cpu", "--out", str(tmp_path)])
