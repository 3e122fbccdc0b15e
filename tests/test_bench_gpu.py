"""`hetnet bench`'s GPU paths on tiny sizes: the train-step row with PyTorch's CUDA-graph side, the precision rows
(PyTorch captured at fp32, tf32 and bf16 + channels_last; hetnet's side, or the reason it has none), the per-layer
precision table against cuDNN, the loader-epoch and kernel-profile tables. Skips without CuPy, a CUDA GPU or a
CUDA build of torch; on a GPU machine: `pytest -q tests/test_bench_gpu.py` (about a minute)."""
from __future__ import annotations

import json

import pytest

cupy = pytest.importorskip("cupy", reason="CuPy not installed")
torch = pytest.importorskip("torch", reason="torch not installed (the peer of every bench row)")
try:
    _N_GPUS = cupy.cuda.runtime.getDeviceCount()
except cupy.cuda.runtime.CUDARuntimeError:  # no driver
    _N_GPUS = 0
if _N_GPUS == 0 or not torch.cuda.is_available():
    pytest.skip("no CUDA GPU for both CuPy and torch", allow_module_level=True)

from hetnet import bench  # noqa: E402
from hetnet.bench import common, precision, sides  # noqa: E402

pytestmark = pytest.mark.gpu
TINY = ["--repeats", "2", "--warmup", "2", "--side-seconds", "0.05"]


def _env_ok(doc: dict) -> None:
    env = doc["environment"]
    assert env["card"] and env["host"] and env["commit"] and env["time_utc"]


def _only_row(path) -> dict:
    """The one row of a result file, which names the card, commit and date and was measured."""
    doc = json.loads(path.read_text())
    _env_ok(doc)
    (row,) = doc["rows"]
    assert row["status"] == "ok", row
    return row


def test_train_step_row_with_the_torch_graph_side(tmp_path):
    rc = bench.main(["--devices", "cuda", "--rows", "thesis-m0:8", "--no-extras", "--out", str(tmp_path), *TINY])
    assert rc == 0
    row = _only_row(tmp_path / "train_step.json")
    assert row["hetnet_img_per_s"] > 0 and row["torch_graph_img_per_s"] > 0 and row["torch_eager_img_per_s"] > 0
    assert row["hetnet_peak_mib"] is not None and row["torch_peak_mib"] is not None


def test_precision_rows(tmp_path):
    """Each precision's row: PyTorch's CUDA graph always timed; hetnet's side timed and checked, or empty with
    "hetnet precision not supported" where the model takes no precision yet."""
    rc = bench.main(["--devices", "cuda", "--precision", "fp32,tf32,bf16", "--rows", "thesis-m0:8",
                     "--out", str(tmp_path), *TINY])
    assert rc == 0
    doc = json.loads((tmp_path / "precision_step.json").read_text())
    _env_ok(doc)
    assert set(doc["gemm_tflops"]) == {"fp32", "tf32", "bf16"}
    rows = {r["precision"]: r for r in doc["rows"]}
    assert set(rows) == {"fp32", "tf32", "bf16"}
    for p, r in rows.items():
        assert set(precision.ROW_KEYS) <= set(r)
        assert r["torch_graph_img_per_s"] > 0, r
        assert r["torch_flags"]["matmul_allow_tf32"] == (p == "tf32")
        assert r["torch_flags"]["channels_last"] == (p == "bf16")
        if r["status"] == "torch only":
            assert p != "fp32" and r["reason"] == sides.HETNET_PRECISION_UNSUPPORTED
            assert r["hetnet_img_per_s"] is None and r["hetnet_tflops"] is None
        else:
            assert r["status"] == "ok", r
            assert r["check_max_rel_err"] <= common.RTOL_PRECISION[p]
            assert r["hetnet_img_per_s"] > 0 and r["hetnet_tflops"] > 0 and r["hetnet_peak_mib"] is not None
    assert rows["fp32"]["status"] == "ok"
    for p in ("tf32", "bf16"):    # the model's activations are float32 at every precision: its step pool is counted
        if rows[p]["status"] == "ok":
            assert rows[p]["hetnet_peak_mib"] >= 0.5 * rows["fp32"]["hetnet_peak_mib"], rows[p]
    assert torch.backends.cuda.matmul.allow_tf32 is False     # switches back off after the table


def test_precision_row_with_torch_compile(tmp_path):
    """The compile side is timed, or its failure is recorded; the row stands either way."""
    args = bench.parse_args(["--devices", "cuda", "--precision", "bf16", "--torch-compile", *TINY])
    row = precision.bench_precision_step("mlp", 16, "cuda", "bf16", args)
    assert row["status"] in ("ok", "torch only"), row
    assert row["torch_compile_img_per_s"] or row["torch_compile_note"].startswith("failed")


def test_conv_precision_table(tmp_path):
    rc = bench.main(["--devices", "cuda", "--no-train-step", "--layers", "--models", "thesis-m0", "--layer-batch",
                     "4", "--precision", "fp32,bf16", "--out", str(tmp_path), *TINY])
    assert rc == 0
    doc = json.loads((tmp_path / "precision_layers.json").read_text())
    _env_ok(doc)
    assert [(s["model"], s["precision"]) for s in doc["sections"]] == [("thesis-m0", "fp32"), ("thesis-m0", "bf16")]
    for sec in doc["sections"]:
        assert len(sec["rows"]) == 8                      # 2 convolutions x 4 ops
        for r in sec["rows"]:
            assert r["status"] in ("ok", "torch only"), r
            assert r["torch_ms"] > 0 and r["torch_rel_err"] < 0.05
            assert r["timing"].startswith("CUDA graph")
    assert all(r["status"] == "ok" and r["check_max_rel_err"] <= common.RTOL_PRECISION["fp32"]
               for r in doc["sections"][0]["rows"])


def test_loader_and_profile_tables(tmp_path):
    rc = bench.main(["--devices", "cuda", "--no-train-step", "--loader-epochs", "--profile", "--rows", "thesis-m0:64",
                     "--epochs", "1", "--loader-images", "640", "--profile-steps", "2", "--out", str(tmp_path)])
    assert rc == 0
    row = _only_row(tmp_path / "loader_epochs.json")
    assert row["steps_only_img_per_s"] > 0 and row["host_img_per_s"] > 0 and row["resident_img_per_s"] > 0
    row = _only_row(tmp_path / "profile.json")
    assert row["hetnet"]["kernel_sum_us"] > 0 and row["torch_graph"]["kernel_sum_us"] > 0
