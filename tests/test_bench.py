"""`hetnet bench` on tiny sizes: the JSON it writes, and the gate that refuses to time disagreeing models."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
from conftest import RTOL, torch_or_skip

from hetnet import bench, interop
from hetnet.bench import common
from hetnet.errors import UsageError

ROW_KEYS = {"model", "batch_size", "hetnet_backend", "status", "hetnet_img_per_s", "hetnet_ms_per_step",
            "torch_eager_img_per_s", "torch_eager_ms_per_step", "torch_graph_img_per_s", "hetnet_peak_mib",
            "torch_peak_mib", "hetnet_infer_img_per_s", "torch_infer_img_per_s", "check_max_rel_err",
            "check_tolerance", "speedup_vs_torch_eager"}
TINY = ["--batch-sizes", "3", "--repeats", "1", "--warmup", "1", "--side-seconds", "0.001", "--block-ms", "0"]


def test_gate_tolerance_is_the_tests_float32_tolerance():
    assert bench.RTOL_F32 == RTOL[np.dtype(np.float32)]


def test_train_step_rows_and_files(tmp_path):
    torch_or_skip()
    rc = bench.main(["--models", "thesis-m0", "--devices", "reference,cpu", "--reference-rows", "thesis-m0:3",
                     "--out", str(tmp_path), *TINY])
    assert rc == 0
    doc = json.loads((tmp_path / "train_step.json").read_text())
    env = doc["environment"]
    for k in ("host", "cpu", "threads", "torch", "numpy", "python"):
        assert env.get(k), k
    rows = doc["rows"]
    assert [(r["model"], r["hetnet_backend"]) for r in rows] == [("thesis-m0", "cpu"), ("thesis-m0", "reference")]
    for r in rows:
        assert r["status"] == "ok", r
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        assert r["batch_size"] == 3
        assert r["torch_graph_img_per_s"] is None  # CPU: no graph side
        assert r["hetnet_img_per_s"] > 0 and r["torch_eager_img_per_s"] > 0
        assert r["check_max_rel_err"] <= r["check_tolerance"] == bench.RTOL_F32
    md = (tmp_path / "train_step.md").read_text()
    assert "| thesis-m0 | 3 | cpu |" in md
    assert (tmp_path / "speedup.png").read_bytes()[:4] == b"\x89PNG"


def test_gate_refuses_a_row_whose_outputs_disagree(monkeypatch):
    torch = torch_or_skip()
    real = interop.to_torch

    def perturbed(model, *a, **k):
        tm = real(model, *a, **k)
        with torch.no_grad():
            next(iter(tm.parameters())).mul_(1.01)  # a 1% change in the first layer's weights
        return tm

    monkeypatch.setattr(interop, "to_torch", perturbed)
    args = bench.parse_args(["--models", "mlp", "--devices", "cpu", *TINY])
    row = bench.bench_train_step("mlp", 3, "cpu", args)
    assert row["status"] == "refused"
    assert "disagree" in row["reason"] and row["check_max_rel_err"] > bench.RTOL_F32
    assert "hetnet_ms_per_step" not in row  # never timed


def test_float64_check_judges_a_float32_disagreement(monkeypatch):
    """When PyTorch's float32 side disagrees on both batches (here its float32 model is perturbed; in real runs a
    max-pool near-tie it rounds the other way), the row stands if hetnet agrees with PyTorch in float64 -- which must
    start from the same weights, with a fresh optimiser, and compare real updates."""
    torch = torch_or_skip()
    real = interop.to_torch

    def perturbed_f32(model, *a, dtype=None, **k):
        tm = real(model, *a, dtype=dtype, **k)
        if dtype in (None, torch.float32):
            with torch.no_grad():
                next(iter(tm.parameters())).mul_(1.01)
        return tm

    monkeypatch.setattr(interop, "to_torch", perturbed_f32)
    args = bench.parse_args(["--models", "mlp", "--devices", "cpu", *TINY])
    row = bench.bench_train_step("mlp", 3, "cpu", args)
    assert row["status"] == "ok", row.get("reason")
    judged = row["check_float64"]
    assert judged["against_float32"]["rel_err"] > bench.RTOL_F32
    assert judged["rel_err"] <= bench.RTOL_F32 and row["check_max_rel_err"] == judged["rel_err"]
    assert row["hetnet_ms_per_step"] > 0


def test_time_sides_settles_each_block_for_a_while(monkeypatch):
    """CPU blocks start after untimed calls lasting SETTLE_SECONDS (at least one call): the other side's threads
    may still be spinning when a side takes over."""
    monkeypatch.setattr(common, "SETTLE_SECONDS", 0.02)
    calls = {"a": 0, "b": 0}
    timed = {"a": 0, "b": 0}

    def side(name):
        def fn():
            calls[name] += 1
            time.sleep(0.002)

        def clock(f, inner):
            timed[name] += inner
            for _ in range(inner):
                f()
            return 0.002
        return fn, clock

    med = common.time_sides({"a": side("a"), "b": side("b")}, reps=3, inner=2, settle=True)
    assert med == {"a": 0.002, "b": 0.002} and timed == {"a": 6, "b": 6}
    for name in calls:       # 3 blocks, each after >= 20 ms of 2 ms calls: at least ~10 untimed calls per block
        assert calls[name] - timed[name] >= 3 * 8, calls
    calls.update(a=0, b=0)
    timed.update(a=0, b=0)
    common.time_sides({"a": side("a"), "b": side("b")}, reps=3, inner=2, settle=False)
    assert calls == timed


def test_layers_table(tmp_path):
    torch_or_skip()
    rc = bench.main(["--devices", "cpu", "--no-train-step", "--layers", "--layer-batch", "2", "--out", str(tmp_path),
                     *TINY])
    assert rc == 0
    doc = json.loads((tmp_path / "layers.json").read_text())
    c = doc["devices"][0]["ceilings"]
    assert c["gemm_gflops"] > 0 and c["copy_gbps"] > 0
    rows = doc["devices"][0]["rows"]
    assert {(r["layer"], r["op"].split()[0]) for r in rows} >= {("conv1", "forward"), ("conv3", "backward"),
                                                               ("pool2", "backward"), ("dense1", "forward")}
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    assert "| conv1 |" in (tmp_path / "layers.md").read_text()


@pytest.mark.parametrize("argv, flag", [(["--models", "nope"], "--models"), (["--batch-sizes", "0"], "--batch-sizes"),
                                        (["--devices", "tpu"], "--devices")])
def test_bad_flags_are_usage_errors(argv, flag):
    with pytest.raises(UsageError, match=flag):
        bench.parse_args(argv)


def test_gpu_shaped_rows_render(tmp_path):
    """The markdown, targets and chart of a GPU run (made up numbers: no GPU here)."""
    from hetnet.bench import train_step

    rows = [dict(model=m, batch_size=b, hetnet_backend="cuda:0", status="ok", tf32=False, hetnet_ms_per_step=0.2,
                 torch_eager_ms_per_step=2.0, torch_graph_ms_per_step=0.25, speedup_vs_torch_eager=10.0,
                 speedup_vs_torch_graph=1.25 if b < 1024 else 0.9, hetnet_img_per_s=1e5, hetnet_infer_img_per_s=3e5,
                 torch_infer_img_per_s=2e5, hetnet_peak_mib=12.0, torch_peak_mib=20.0, check_max_rel_err=3e-6)
            for m in ("thesis-m1", "fashion-cnn") for b in (32, 128, 1024)]
    rows.append({"model": "mlp", "batch_size": 32, "hetnet_backend": "cuda:0", "status": "error", "reason": "Boom"})
    env = {"host": "h", "card": "NVIDIA H100", "cpu": "x", "threads": 16, "cpus_available": 16, "blas": "b",
           "time_utc": "t", "torch": "2.11", "load_average_at_start": [0.1, 0.1, 0.1]}
    t = {x["target"][:40]: x for x in train_step.targets(rows)}
    assert [x["met"] for x in t.values()] == [True, False]
    doc = {"environment": env, "method": train_step.method_text(True), "rows": rows,
           "targets": train_step.targets(rows), "errors": []}
    md = train_step.train_step_markdown(doc)
    assert "| thesis-m1 | 1024 | cuda:0 | 0.200 | 2.00 | 0.250 | 10.00x | 0.90x |" in md
    assert "4 of 6 rows reach it (short: thesis-m1@1024: 0.90x, fashion-cnn@1024: 0.90x)" in md
    assert "mlp batch 32 on cuda:0: error: Boom" in md
    assert train_step.speedup_chart(rows, tmp_path / "s.png", "NVIDIA H100")
