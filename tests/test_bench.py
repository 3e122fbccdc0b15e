"""`hetnet bench` on tiny sizes: the JSON it writes (machine, commit, date), the gate that refuses to time
disagreeing models, the precision table's rows, the FLOP count, cifar-wide, and the scripts in benchmarks/ that wrap
the harness. GPU paths: tests/test_bench_gpu.py."""
from __future__ import annotations

import importlib.util
import json
import re
import sys
import types
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from conftest import RTOL, torch_or_skip

import hetnet as hn
from hetnet import bench, interop
from hetnet.bench import common, models, pair, precision, sides, train_step
from hetnet.errors import UsageError

REPO = Path(__file__).resolve().parents[1]

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


def test_full_batch_float32_disagreement_is_judged_against_float64(monkeypatch):
    """An fp32 row whose whole-batch updates are further from PyTorch float32's than FULL_BATCH_RTOL (here the float32
    comparison is made to say 5%; on a GPU a float32 algorithm's rounding flips max-pool near-ties) stands where
    hetnet's updates against float64 are within max(FULL_BATCH_RTOL, PEER_FACTOR x PyTorch float32's own error), and
    is refused where they are not."""
    torch_or_skip()
    cpu = hn.device.get_backend("cpu")
    real = pair.Pair.check_full_batch
    apart = {"float64": None}

    def checked(self, float64=False):
        errs = real(self, float64)
        if float64 and apart["float64"] is not None:
            return {k: apart["float64"] for k in errs}
        return errs if float64 else {k: 0.05 for k in errs}

    monkeypatch.setattr(pair.Pair, "check_full_batch", checked)
    make = lambda seed: pair.Pair("mlp", 40, cpu, "cpu", seed, "fp32")         # noqa: E731
    _, info, reason = pair.gate(make, 40, bench.RTOL_F32)
    assert reason is None, reason
    assert info["check_full_batch_max_rel_err"] == 0.05
    judged = info["check_full_batch_float64"]
    assert judged["rel_err"] <= judged["bound"] == pytest.approx(
        max(common.FULL_BATCH_RTOL, common.PEER_FACTOR * judged["peer_rel_err"]), rel=1e-2)
    apart["float64"] = 0.05
    _, info, reason = pair.gate(make, 40, bench.RTOL_F32)
    assert reason and "further from float64" in reason and "each of 2 batches" in reason
    assert info["check_full_batch_float64"]["rel_err"] == 0.05
    assert info["check_full_batch_first_failed"]["data_seed"] + 1 == info["check_full_batch_float64"]["data_seed"]


def test_full_batch_float64_disagreement_on_one_batch_only_leaves_the_row(monkeypatch):
    """An fp32 row whose whole-batch updates are off float64 past their bound on the first batch only (a max-pool
    near-tie routed the other way, which the next batch does not repeat) stands, recording the first batch's
    figures; off on both it is refused (test above)."""
    torch_or_skip()
    cpu = hn.device.get_backend("cpu")
    real = pair.Pair.check_full_batch
    calls = []

    def checked(self, float64=False):
        errs = real(self, float64)
        if not float64:
            return {k: 0.05 for k in errs}
        calls.append(self)
        return {k: 0.05 for k in errs} if len(calls) == 1 else errs

    monkeypatch.setattr(pair.Pair, "check_full_batch", checked)
    make = lambda seed: pair.Pair("mlp", 40, cpu, "cpu", seed, "fp32")         # noqa: E731
    timed, info, reason = pair.gate(make, 40, bench.RTOL_F32)
    assert reason is None, reason
    first, judged = info["check_full_batch_first_failed"], info["check_full_batch_float64"]
    assert first["rel_err"] == 0.05 > first["bound"] and judged["rel_err"] <= judged["bound"]
    assert judged["data_seed"] == first["data_seed"] + 1 and len(calls) == 2 and timed is not calls[-1]


def test_reduced_precision_gate_holds_hetnet_to_pytorchs_own_error():
    """tf32 / bf16 rows: hetnet against float64 within max(tolerance, PEER_FACTOR x PyTorch's error at the row's
    precision against float64). On a CPU the peer runs bf16 autocast and hetnet float32: hetnet passes a tolerance
    it could not meet alone only through the peer's bound, and an update 10% off is refused though within it."""
    torch_or_skip()
    cpu = hn.device.get_backend("cpu")

    def make(lr_scale):
        def make_pair(seed):
            p = pair.Pair("mlp", 40, cpu, "cpu", seed, "bf16")
            p.hopt.lr *= lr_scale
            return p
        return make_pair

    tight = 1e-9
    _, info, reason = pair.gate(make(1.0), 40, tight, float32_first=False)
    assert reason is None, reason
    assert info["check_max_rel_err"] > tight and info["check_reference"] == "float64"
    assert info["check_bound"] == pytest.approx(common.PEER_FACTOR * info["check_peer_rel_err"], rel=1e-2)
    assert info["check_full_batch_peer_rel_err"] > 0
    _, info, reason = pair.gate(make(1.1), 40, 2e-2, float32_first=False)
    assert reason and "further from float64" in reason and info["check_max_rel_err"] > info["check_bound"]
    assert info["check_first_batch_failed"]["data_seed"] == 1


def test_reduced_precision_gate_refuses_only_a_quantity_off_on_every_batch(monkeypatch):
    """tf32 / bf16 rows: a quantity over its bound on one batch only (a ReLU input near 0 decided differently on one
    side, which the next batch does not repeat) leaves the row standing, as do two quantities each over it on a
    different batch; one quantity over its bound on every batch of PEER_BATCHES refuses the row, naming it with each
    batch's figures."""
    torch_or_skip()
    cpu = hn.device.get_backend("cpu")
    real = pair.Pair.check
    off = {}                                  # data seed -> the quantity whose error the check reports as 0.5

    def check(self, n=None, float64=False):
        errs = real(self, n, float64)
        assert {grad, update} <= set(errs), sorted(errs)
        if self.data_seed in off:
            errs[off[self.data_seed]] = 0.5
        return errs

    monkeypatch.setattr(pair.Pair, "check", check)
    make = lambda seed: pair.Pair("mlp", 40, cpu, "cpu", seed, "bf16")          # noqa: E731
    grad, update = "grad 1.weight", "step 2 update 3.bias"
    for case, batches in (({1: grad}, 2), ({1: grad, 2: update, 3: grad}, 2)):
        off.clear()
        off.update(case)
        _, info, reason = pair.gate(make, 40, 2e-2, float32_first=False)
        assert reason is None, (case, reason)
        assert info["check_batches"] == batches and info["check_first_batch_failed"]["worst"] == grad, info
    off.update({seed: grad for seed in pair.PEER_BATCHES})
    _, info, reason = pair.gate(make, 40, 2e-2, float32_first=False)
    assert info["check_batches"] == len(pair.PEER_BATCHES) == 3
    assert reason and f"on each of 3 batches: {grad} relative error 0.5 > " in reason and reason.count("0.5 >") == 3


def test_time_sides_settles_each_block_for_a_while(monkeypatch):
    """CPU blocks start after untimed calls lasting SETTLE_SECONDS (at least one call): the other side's threads
    may still be spinning when a side takes over. The clock is the test's own (each call 2 ms of it), so that the
    count of settling calls does not depend on how long a sleep lasts on a busy machine."""
    monkeypatch.setattr(common, "SETTLE_SECONDS", 0.02)
    now = [0.0]
    monkeypatch.setattr(common, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    calls = {"a": 0, "b": 0}
    timed = {"a": 0, "b": 0}

    def side(name):
        def fn():
            calls[name] += 1
            now[0] += 0.002

        def clock(f, inner):
            timed[name] += inner
            for _ in range(inner):
                f()
            return 0.002
        return fn, clock

    med = common.time_sides({"a": side("a"), "b": side("b")}, reps=3, inner=2, settle=True)
    assert med == {"a": 0.002, "b": 0.002} and timed == {"a": 6, "b": 6}
    for name in calls:       # 3 blocks, each after 20 ms of 2 ms calls: 10 untimed calls per block (11 if the
        assert 3 * 10 <= calls[name] - timed[name] <= 3 * 11, calls    # sum of 2 ms steps rounds below 20 ms)
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
                                        (["--devices", "tpu"], "--devices"), (["--precision", "fp16"], "--precision"),
                                        (["--rows", "mlp"], "--rows"), (["--rows", "nope:32"], "--rows"),
                                        (["--rows", "mlp:0"], "--rows"), (["--layer-batch", "0"], "--layer-batch")])
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


# --- the result files: machine, commit, date ----------------------------------------------------------------------


def _check_environment(env: dict) -> None:
    assert env["host"] and "card" in env
    assert re.fullmatch(r"[0-9a-f]{7,40}(-dirty)?|unknown", env["commit"]), env["commit"]
    assert datetime.strptime(env["time_utc"], "%Y-%m-%dT%H:%M:%SZ")


def test_every_result_json_names_machine_commit_and_date(tmp_path):
    torch_or_skip()
    rc = bench.main(["--rows", "thesis-m0:3", "--devices", "cpu", "--layers", "--layer-batch", "2",
                     "--models", "thesis-m0", "--out", str(tmp_path), *TINY[2:]])
    assert rc == 0
    files = sorted(p.name for p in tmp_path.glob("*.json"))
    assert files == ["layers.json", "train_step.json"]
    for name in files:
        _check_environment(json.loads((tmp_path / name).read_text())["environment"])
    assert not list(tmp_path.glob(".*.tmp"))          # no temporary file left behind


def test_commit_is_the_checkouts_or_the_environments(tmp_path, monkeypatch):
    if (REPO / ".git").exists():
        assert re.fullmatch(r"[0-9a-f]{7,40}(-dirty)?", common.git_commit())
    monkeypatch.setattr(common, "REPO_ROOT", tmp_path)     # not a checkout
    monkeypatch.setenv("HETNET_GIT_COMMIT", "abc1234")
    assert common.git_commit() == "abc1234"
    monkeypatch.delenv("HETNET_GIT_COMMIT")
    assert common.git_commit() == "unknown"


def test_write_result_refuses_a_document_without_machine_commit_or_date(tmp_path):
    env = common.environment(1, False)
    common.write_result(tmp_path / "ok.json", {"environment": env, "rows": []})
    assert json.loads((tmp_path / "ok.json").read_text())["environment"]["commit"] == env["commit"]
    for key in common.ENVIRONMENT_KEYS:
        with pytest.raises(ValueError, match=key):
            common.write_result(tmp_path / "bad.json", {"environment": {**env, key: None}, "rows": []})
    assert not (tmp_path / "bad.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ok.json"]


# --- models, FLOPs, cifar-wide --------------------------------------------------------------------------------------


def test_cifar_wide_has_2_29_million_parameters():
    model, shape = models.resolve_model("cifar-wide")
    assert shape == (3, 32, 32) and model.output_shape(shape) == (10,)
    assert models.parameter_count(model) == 2_292_544      # convs 2,287,296 + BN 2,688 + dense 2,560
    assert round(models.parameter_count(model) / 1e6, 2) == 2.29
    convs = [(m.in_channels, m.out_channels) for m in model.layers if isinstance(m, hn.Conv2D)]
    assert convs == [(3, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256), (256, 256)]
    assert not any(m.use_bias for m in model.layers if isinstance(m, (hn.Conv2D, hn.Dense)))
    assert models.resolve_model(str(REPO / "benchmarks" / "specs" / "cifar-wide.json"))[1] == shape


def test_flops_of_a_tiny_model_by_hand():
    model = hn.Sequential([hn.Conv2D(1, 2, 3, padding=1), hn.ReLU(), hn.MaxPool2D(2), hn.Flatten(), hn.Dense(8, 3)])
    # conv: output 2x4x4, each 1*3*3 multiply-adds: 2*32*9 = 576; dense: 2*8*3 = 48; pooling and ReLU not counted
    assert models.forward_flops(model, (1, 4, 4)) == 576 + 48
    assert models.train_step_flops(model, (1, 4, 4), batch=5) == 3 * 5 * 624


def test_models_resolve_by_preset_spec_name_or_path():
    assert models.resolve_model("mlp")[1] == (1, 28, 28)
    assert models.resolve_model("fashion-2conv")[1] == (1, 28, 28)
    assert models.model_label("benchmarks/specs/fashion-2conv.json") == "fashion-2conv"
    with pytest.raises(UsageError, match="nope"):
        models.resolve_model("nope")
    args = bench.parse_args(["--model", "cifar-wide", "--devices", "cpu"])
    assert args.models == ["cifar-wide"]


def test_section_rows_defaults_and_overrides():
    defaults = [("a", 1), ("a", 2), ("b", 1)]
    args = bench.parse_args(["--devices", "cpu"])
    assert train_step.section_rows(args, defaults) == defaults
    args = bench.parse_args(["--devices", "cpu", "--models", "mlp"])
    assert train_step.section_rows(args, defaults) == [("mlp", 1), ("mlp", 2)]
    args = bench.parse_args(["--devices", "cpu", "--rows", "mlp:4,thesis-m0:8", "--models", "mlp"])
    assert train_step.section_rows(args, defaults) == [("mlp", 4), ("thesis-m0", 8)]


# --- the precision table -------------------------------------------------------------------------------------------


def test_tolerances_are_stated_once_and_loosen_with_the_precision():
    assert precision.PRECISIONS == ("fp32", "tf32", "bf16")
    assert common.RTOL_PRECISION["fp32"] == bench.RTOL_F32
    assert bench.RTOL_F32 < common.RTOL_PRECISION["tf32"] < common.RTOL_PRECISION["bf16"]


def test_hetnet_to_passes_a_precision_only_to_a_model_that_takes_one():
    class Takes:
        def __init__(self):
            self.calls = []

        def to(self, device, precision="fp32"):
            self.calls.append((device, precision))
            return self

    class Plain(Takes):
        def to(self, device):
            self.calls.append((device,))
            return self

    t, p_ = Takes(), Plain()
    assert sides.hetnet_to(t, "cuda", "bf16") is None and t.calls == [("cuda", "bf16")]
    assert sides.hetnet_to(t, "cuda", "fp32") is None and t.calls[-1] == ("cuda", "fp32")   # fp32: plain to()
    assert sides.hetnet_to(p_, "cuda", "tf32") == sides.HETNET_PRECISION_UNSUPPORTED and p_.calls == [("cuda",)]
    assert sides.hetnet_to(p_, "cuda", "fp32") is None


def test_precision_rows_and_files_on_the_cpu(tmp_path, monkeypatch):
    """fp32 rows are timed against PyTorch eager (no CUDA graph on a CPU); tf32 and bf16 rows are GPU rows and
    skipped here; the per-layer precision table has four ops per convolution, hetnet's data gradient derived, and
    names the algorithms a backend that chooses them chose (here a stand-in conv_choice on the cpu backend, which
    chooses none: the first layer's forward and filter gradient only)."""
    torch_or_skip()
    from hetnet.device import get_backend

    def conv_choice(op, shape):
        return f"{op}-algo" if shape[1] == 3 and op != "data" else None

    monkeypatch.setattr(get_backend("cpu"), "conv_choice", conv_choice, raising=False)
    rc = bench.main(["--devices", "cpu", "--precision", "fp32,bf16", "--rows", "thesis-m0:3", "--layers",
                     "--layer-batch", "2", "--out", str(tmp_path), *TINY[2:]])
    assert rc == 0
    doc = json.loads((tmp_path / "precision_step.json").read_text())
    _check_environment(doc["environment"])
    assert doc["tolerances"] == common.RTOL_PRECISION and "partial" not in doc      # (written after each row)
    fp32, bf16 = doc["rows"]
    assert set(precision.ROW_KEYS) <= set(fp32) and set(precision.ROW_KEYS) <= set(bf16)
    assert (fp32["status"], fp32["precision"], bf16["status"], bf16["precision"]) == ("ok", "fp32", "skipped", "bf16")
    assert fp32["hetnet_img_per_s"] > 0 and fp32["torch_eager_img_per_s"] > 0 and fp32["hetnet_tflops"] > 0
    assert fp32["torch_graph_img_per_s"] is None and fp32["torch_compile_img_per_s"] is None
    assert fp32["torch_compile_note"].startswith("not asked")
    assert fp32["check_max_rel_err"] <= fp32["check_tolerance"] == common.RTOL_PRECISION["fp32"]
    net, shape = models.resolve_model("thesis-m0")
    assert fp32["step_gflop"] == round(models.train_step_flops(net, shape, 3) / 1e9, 3)
    assert fp32["hetnet_peak_mib"] is not None and fp32["torch_peak_mib"] is not None
    assert "| thesis-m0 | 3 | fp32 |" in (tmp_path / "precision_step.md").read_text()

    layers = json.loads((tmp_path / "precision_layers.json").read_text())
    _check_environment(layers["environment"])
    (sec,) = layers["sections"]             # fp32 only: bf16 is a GPU table
    assert (sec["model"], sec["batch"], sec["precision"]) == ("thesis-m0", 2, "fp32")
    rows = sec["rows"]
    assert [(r["layer"], r["op"]) for r in rows[:4]] == [("conv1", op) for op in
                                                          ("forward", "data gradient", "filter gradient",
                                                           "data + filter gradient")]
    assert all(r["status"] == "ok" and r["torch_ms"] > 0 for r in rows), rows
    assert all(r["hetnet_ms"] > 0 for r in rows if not r.get("hetnet_derived")), rows
    assert all(r["check_max_rel_err"] <= common.RTOL_PRECISION["fp32"] for r in rows)
    assert [r["op"] for r in rows if r.get("hetnet_derived")] == ["data gradient", "data gradient"]
    assert [(r["layer"], r["op"], r["hetnet_algorithms"]) for r in rows if "hetnet_algorithms" in r] == [
        ("conv1", "forward", {"fwd": "fwd-algo"}), ("conv1", "filter gradient", {"filter": "filter-algo"}),
        ("conv1", "data + filter gradient", {"filter": "filter-algo"})]
    assert any("bf16" in e and "skipped" in e for e in layers["errors"])
    assert "| conv2 | 2x16x6x6 |" in (tmp_path / "precision_layers.md").read_text()


def test_precision_row_is_refused_when_hetnet_disagrees(monkeypatch):
    torch = torch_or_skip()
    real = interop.to_torch

    def perturbed(model, *a, **k):      # float32 and float64 alike: a real disagreement
        tm = real(model, *a, **k)
        with torch.no_grad():
            next(iter(tm.parameters())).mul_(1.01)
        return tm

    monkeypatch.setattr(interop, "to_torch", perturbed)
    args = bench.parse_args(["--devices", "cpu", "--precision", "fp32", *TINY])
    row = precision.bench_precision_step("mlp", 3, "cpu", "fp32", args)
    assert row["status"] == "refused" and "disagree" in row["reason"]
    assert row["check_float64"]["rel_err"] > common.RTOL_PRECISION["fp32"]
    assert row["hetnet_img_per_s"] is None and "repeats" not in row            # never timed


def test_precision_row_without_hetnet_support_times_pytorch_alone(monkeypatch):
    """A model whose `to` takes no precision: the row records why, leaves hetnet's columns empty (no fp32 time
    passed off as another precision's) and still measures PyTorch."""
    torch_or_skip()

    def unsupported(model, device, precision_):
        model.to(device)
        return sides.HETNET_PRECISION_UNSUPPORTED

    monkeypatch.setattr(pair, "hetnet_to", unsupported)
    args = bench.parse_args(["--devices", "cpu", "--precision", "fp32", *TINY])
    row = precision.bench_precision_step("mlp", 3, "cpu", "fp32", args)
    assert row["status"] == "torch only" and row["reason"] == "hetnet precision not supported"
    assert row["hetnet_img_per_s"] is None and row["hetnet_tflops"] is None and row["hetnet_peak_mib"] is None
    assert row["torch_eager_img_per_s"] > 0 and row["torch_peak_mib"] is not None


def test_precision_targets_judge_gpu_rows_only():
    def row(p, b, vs, dev="cuda:0"):
        return {"model": "cifar-wide", "batch_size": b, "precision": p, "status": "ok", "hetnet_img_per_s": 1.0,
                "speedup_vs_torch_graph": vs, "hetnet_backend": dev, "hetnet_peak_mib": 1.0, "torch_peak_mib": 2.0}

    t = precision.precision_targets([row("bf16", 512, 1.4), row("bf16", 1024, 1.2), row("fp32", 512, 1.3),
                                     row("tf32", 512, 0.5, dev="cpu")])
    by = {x["target"].split(",")[0]: x for x in t}
    assert by["cifar-wide bf16"]["missed"] == ["1024: 1.20x"] and by["cifar-wide fp32"]["met"]
    assert "cifar-wide tf32" not in by


def test_precision_rows_merge_into_an_earlier_table(tmp_path, capsys):
    """--merge FILE: the written table has this run's rows and FILE's rows it did not measure, in the tables'
    order, each naming the commit it was measured at (FILE's own, or its table's); the targets are judged on all of
    them. A file that is not a precision_step.json, or one measured on another card, is one error naming the flag
    and the file."""
    def row(m, b, p, vs):
        return dict(dict.fromkeys(precision.ROW_KEYS), model=m, batch_size=b, precision=p, status="ok",
                    hetnet_backend="cuda:0", hetnet_img_per_s=2.0, speedup_vs_torch_graph=vs)

    old = {"environment": {"commit": "aaa1111", "time_utc": "2026-12-01T00:00:00Z", "card": "X"},
           "rows": [row("cifar-wide", 512, "bf16", 1.0), row("cifar-wide", 512, "fp32", 1.3),
                    dict(row("thesis-m1", 128, "fp32", 2.0), measured={"commit": "bbb2222"})]}
    new = [row("cifar-wide", 512, "bf16", 1.4), row("cifar-wide", 1024, "bf16", 1.5),
           dict(row("cifar-wide", 512, "fp32", None), status="skipped")]          # (the old row stays)
    env = {"commit": "ccc3333", "time_utc": "2026-12-04T00:00:00Z", "card": "X", "host": "h", "cpu": "c",
           "threads": 1, "cpus_available": 1, "blas": "b"}
    rows = precision.merged_rows(new, old, env)
    assert [(r["model"], r["batch_size"], r["precision"], r["measured"]["commit"]) for r in rows] == [
        ("thesis-m1", 128, "fp32", "bbb2222"), ("cifar-wide", 512, "fp32", "aaa1111"),
        ("cifar-wide", 512, "bf16", "ccc3333"), ("cifar-wide", 1024, "bf16", "ccc3333")]
    by = {t["target"].split(",")[0]: t for t in precision.precision_targets(rows)}
    assert by["cifar-wide bf16"]["met"] and by["cifar-wide fp32"]["met"]
    doc = {"environment": env, "method": "m", "rows": rows, "targets": [], "merged_from": "aaa1111"}
    assert "| 1.30x | — | — | — | — | — | aaa1111 |" in precision.precision_markdown(doc)
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    assert bench.parse_args(["--precision", "bf16", "--merge", str(path)]).merge == old
    precision.check_merge_card(old, env, str(path))             # the same card
    with pytest.raises(UsageError, match=f"--merge: {path} was measured on X, this run is on Y"):
        precision.check_merge_card(old, dict(env, card="Y"), str(path))
    for text in ("{", json.dumps({"rows": []})):
        path.write_text(text)
        with pytest.raises(UsageError, match=f"--merge: {path}"):
            bench.parse_args(["--precision", "bf16", "--merge", str(path)])
    with pytest.raises(UsageError, match="--merge: merges precision rows"):
        bench.parse_args(["--merge", str(path)])


# --- the scripts in benchmarks/ ------------------------------------------------------------------------------------


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"bench_script_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_scripts_import_without_a_gpu_and_wrap_the_harness(monkeypatch):
    """Every script in benchmarks/ imports here (CUDA, CuPy and torch only inside main) and has a main; the
    whole-model ones are hetnet bench flags or wrappers over it."""
    scripts = sorted(p.relative_to(REPO / "benchmarks").as_posix() for p in (REPO / "benchmarks").rglob("*.py"))
    assert scripts == ["cifar_speedrun.py", "conv_algos.py", "cpu_step.py", "fashion_recipes.py", "kernels/ab_step.py",
                       "kernels/conv16_halo.py", "kernels/conv16_mc.py", "kernels/conv16_ws.py",
                       "kernels/conv32_fv.py", "kernels/conv32_fx.py", "kernels/conv_variants.py",
                       "kernels/gelu_fit.py", "kernels/host_overhead.py", "kernels/ncu_table.py",
                       "kernels/profile_step.py",
                       "kernels/run_conv_small.py", "kernels/run_conv_variants.py", "kernels/run_tc_conv_nhwc.py",
                       "kernels/run_tc_gemm.py", "kernels/time_cl_tiles.py", "kernels/time_pool_grad.py",
                       "kernels/wgmma_sandbox.py", "precision_accuracy.py", "relu_flips.py", "scaling.py"]
    libraries = ("kernels/conv_variants.py", "kernels/conv16_ws.py", "kernels/conv16_halo.py", "kernels/conv16_mc.py",
                 "kernels/conv32_fv.py", "kernels/conv32_fx.py", "kernels/wgmma_sandbox.py")
    for name in scripts:
        if name in libraries:              # the sandbox's tile tables and their module builder, read by runners
            continue
        monkeypatch.setattr(sys, "path", [str((REPO / "benchmarks" / name).parent), *sys.path])
        assert callable(_load(REPO / "benchmarks" / name).main), name
    cpu_step = _load(REPO / "benchmarks" / "cpu_step.py")
    argv = cpu_step.bench_argv(*cpu_step.parse_args(["--threads", "1", "--", "--side-seconds", "1"]))
    args = bench.parse_args(argv)          # a command line the harness accepts
    assert args.devices == ["cpu"] and args.layer_by_layer and args.threads == 1 and args.side_seconds == 1
    assert args.rows == [("thesis-m1", 32), ("thesis-m1", 128), ("fashion-2conv", 128), ("fashion-cnn", 128)]
    assert argv[argv.index("--out") + 1].endswith("-1thread")
    speedrun = _load(REPO / "benchmarks" / "cifar_speedrun.py")
    args = bench.parse_args(speedrun.bench_argv(*speedrun.parse_args(["--runs", "7", "--", "--speedrun-epochs", "1"])))
    assert args.cifar_speedrun and args.speedrun_runs == 7 and args.speedrun_epochs == 1


def test_ncu_table_sums_each_kernels_launches():
    """benchmarks/kernels/ncu_table.py: ncu's CSV (after the program's own output) to one line a kernel, its launches
    and summed time in microseconds whatever the unit, largest first; other metrics ignored."""
    ncu_table = _load(REPO / "benchmarks" / "kernels" / "ncu_table.py")
    head = '"ID","Kernel Name","Metric Name","Metric Unit","Metric Value"\n'
    rows = ['"0","void conv(int)","gpu__time_duration.sum","ns","1,500"', '"1","bn","gpu__time_duration.sum","us","3"',
            '"2","void conv(int)","gpu__time_duration.sum","usecond","0.5"', '"3","bn","dram__bytes.sum","byte","9"']
    times = ncu_table.kernel_times("program output\n==PROF== profiling\n" + head + "\n".join(rows) + "\n")
    assert times == {"conv(int)": (2, 2.0), "bn": (1, 3.0)}
    lines = ncu_table.table(times, "title").splitlines()
    assert lines[0] == "title" and lines[2].startswith("bn ") and lines[-1].split()[1:] == ["3", "5.0"]
    with pytest.raises(ValueError):
        ncu_table.kernel_times("no csv here")


def test_ncu_pipe_table_reads_each_launch():
    """ncu_table.py --pipe: ncu's plain metric output (after the program's own lines) to a row a launch in launch
    order, n/a kept as n/a, the stall reasons largest first."""
    ncu_table = _load(REPO / "benchmarks" / "kernels" / "ncu_table.py")
    text = """==PROF== Connected to process 1
[1] python3@127.0.0.1
  hn_conv16_pool_w128x128s3b2 (8192, 1, 1)x(256, 1, 1), Context 1, Stream 13, Device 0, CC 9.0
    Section: Command line profiler metrics
    ------------------------------------------------------ ----------- ------------
    gpu__time_duration.sum                                          us     1,472.29
    lts__throughput.avg.pct_of_peak_sustained_elapsed                %        75.11
    sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active  %  34.07
    smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio  inst   0.35
    smsp__average_warps_issue_stalled_wait_per_issue_active.ratio   inst         1.77
    smsp__average_warps_issue_stalled_drain_per_issue_active.ratio  inst            0
  void sm90_xmma_fprop(int) (15, 8, 1)x(384, 1, 1), Context 1, Stream 7, Device 0, CC 9.0
    gpu__time_duration.sum                                          us       251.42
    sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active   (!) n/a
"""
    launches = ncu_table.pipe_launches(text)
    assert [(r["kernel"], r["launch"]) for r in launches] == [
        ("hn_conv16_pool_w128x128s3b2", "(8192, 1, 1)x(256, 1, 1)"), ("sm90_xmma_fprop", "(15, 8, 1)x(384, 1, 1)")]
    assert launches[0]["metrics"]["gpu__time_duration.sum"] == 1472.29
    assert launches[1]["metrics"]["sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active"] is None
    rows = ncu_table.pipe_table(launches, "title").splitlines()
    assert rows[0] == "title"
    assert rows[4].startswith("| hn_conv16_pool_w128x128s3b2 | (8192, 1, 1)x(256, 1, 1) | 1472.3 |")
    assert rows[4].endswith("| 34.1 | n/a | 75.1 | wait 1.77, barrier 0.35 |"), rows[4]
    assert rows[5].split(" | ")[3] == "n/a"


def test_ncu_source_table_sums_samples_by_opcode():
    """ncu_table.py --source: ncu's per-instruction CSV (a block a profiled launch, a kernel's repeated block read
    once) to each kernel's samples by opcode, predicates dropped, and its hottest instructions, largest first."""
    ncu_table = _load(REPO / "benchmarks" / "kernels" / "ncu_table.py")
    cols = '"Address","Source","Warp Stall Sampling (All Samples)","Instructions Executed","stall_long_sb",' \
           '"stall_wait","stall_long_sb (Not Issued)"'
    body = ['"0x10","      HGMMA.64x128x16.F32.BF16 R24, gdesc[UR20], R24","5","8","0","5","7"',
            '"0x20","      @!P0  BRA 0x30","30","8","29","1","9"',
            '"0x30","      BRA 0x10","2","1","0","2","0"']
    block = '"Kernel Name","k1",\n' + cols + "\n" + "\n".join(body) + "\n"
    kernels = ncu_table.source_kernels("==PROF== x\n" + block + block.replace("30", "99"))
    assert list(kernels) == ["k1"] and len(kernels["k1"]) == 3
    lines = ncu_table.source_table(kernels, "T").splitlines()
    assert lines[2] == "## k1: 37 samples, 3 instructions"
    assert lines[6] == "| BRA | 32 | 86.5 | long_sb 29, wait 3 |" and lines[7].startswith("| HGMMA | 5 |")
    hot = [line for line in lines if line.startswith("| `")]
    assert hot[0] == "| `@!P0  BRA 0x30` | 8 | 30 | 81.1 | long_sb 29, wait 1 |", hot


def test_profile_step_sums_torch_profilers_kernels_a_step():
    """profile_step.kernel_times: torch.profiler's device events (CUDA kernels) summed by name over the steps, CPU
    events left out."""
    from types import SimpleNamespace as NS
    profile_step = _load(REPO / "benchmarks" / "kernels" / "profile_step.py")

    def event(name, device, us):
        return NS(name=name, device_type=NS(name=device), time_range=NS(elapsed_us=lambda: us))

    events = [event("triton_conv", "CUDA", 30.0), event("aten::conv2d", "CPU", 500.0),
              event("triton_conv", "CUDA", 10.0), event("sm90_xmma_fprop", "CUDA", 4.0)]
    assert profile_step.kernel_times(events, 2) == {"triton_conv": 20.0, "sm90_xmma_fprop": 2.0}


def test_gpu_check_calls_the_harness():
    text = (REPO / "scripts" / "gpu-check").read_text()
    assert "hetnet bench" in text and "--precision fp32,tf32,bf16" in text and "--loader-epochs" in text
    for gone in ("gpu_step.py", "gpu_epoch.py", "gpu_profile.py"):
        assert gone not in text


def test_readme_results_table_is_generated_from_the_results_json():
    """The README's table is exactly what the committed results JSON give (hetnet bench --readme --write)."""
    from hetnet.bench import readme

    table = readme.results_table(REPO / "benchmarks" / "results")
    assert readme.readme_block(REPO / "README.md") == table
    assert table.count("\n| ") >= 5 and "PyTorch CUDA graph" in table and "PyTorch CPU" in table


def test_readme_precision_rows_come_from_the_newest_table_that_has_them(tmp_path):
    """cifar-wide's row per precision: from the newest precision_step*.json holding it, of any card (a later run of
    bf16 alone, here on another card, replaces only the bf16 row, which names that card), each source named once."""
    from hetnet.bench import readme

    def doc(time, *rows):
        return {"environment": {"time_utc": time}, "rows": [
            {"model": "cifar-wide", "batch_size": 512, "status": "ok", "precision": p, "hetnet_img_per_s": h,
             "torch_graph_img_per_s": 100.0} for p, h in rows]}

    for card in ("NVIDIA-H200", "NVIDIA-H100"):
        (tmp_path / card).mkdir()
    (tmp_path / "NVIDIA-H200" / "precision_step_old.json").write_text(
        json.dumps(doc("2026-01-01T00:00:00Z", ("fp32", 1.0), ("bf16", 2.0))))
    (tmp_path / "NVIDIA-H200" / "precision_step.json").write_text(json.dumps(doc("2026-01-15T00:00:00Z")))
    (tmp_path / "NVIDIA-H100" / "precision_step_bf16.json").write_text(
        json.dumps(doc("2026-02-01T00:00:00Z", ("bf16", 3.0))))
    rows, sources = readme._precision_rows(tmp_path)
    assert [(card, r["precision"], r["hetnet_img_per_s"]) for card, r in rows] == [("H200", "fp32", 1.0),
                                                                                   ("H100", "bf16", 3.0)]
    assert sources == ["NVIDIA-H200/precision_step_old.json (2026-01-01)",
                       "NVIDIA-H100/precision_step_bf16.json (2026-02-01)"]
    assert "| GPU training, cifar-wide, batch 512, bf16, H100 (images/s) | 3 | 100 PyTorch CUDA graph | 0.03x |" \
        in readme.results_table(tmp_path)


def test_readme_update_replaces_only_the_block(tmp_path):
    from hetnet.bench import readme

    p = tmp_path / "README.md"
    p.write_text(f"# x\n\n{readme.BEGIN}\nold\n{readme.END}\n\nafter\n")
    assert readme.update_readme(p, "| new |\n")
    assert p.read_text() == f"# x\n\n{readme.BEGIN}\n| new |\n{readme.END}\n\nafter\n"
    assert not readme.update_readme(p, "| new |\n")
    p.write_text("no markers")
    with pytest.raises(ValueError, match="no <!-- results -->"):
        readme.update_readme(p, "x")


def test_kernel_table_counts_copies_and_the_gaps_after_each_kernel():
    """kernel_table from profiler events: kernel time per step by name; memcpy / memset apart ("copies_us"); the
    idle time between one event's end and the next start, charged to the event before ("gaps_us"); the span."""
    from hetnet.bench.profile import kernel_table

    class Range:
        def __init__(self, start, dur):
            self.start, self.dur = start, dur

        def elapsed_us(self):
            return self.dur

    class Event:
        device_type = "DeviceType.CUDA"

        def __init__(self, name, start, dur):
            self.name, self.time_range = name, Range(start, dur)

    class Prof:
        def events(self):
            return [Event("k1", 0, 10), Event("k2", 15, 5), Event("Memset (Device)", 22, 2), Event("k1", 30, 10),
                    Event("k3", 40, 4), Event("k1", 60, 10)]

    t = kernel_table(Prof(), 2)
    assert t["kernels_us"] == {"k1": 15.0, "k2": 2.5, "k3": 2.0} and t["kernel_sum_us"] == 19.5
    assert t["copies_us"] == 1.0 and t["span_us"] == 35.0
    assert t["gaps_us"] == {"k3": 8.0, "Memset (Device)": 3.0, "k1": 2.5, "k2": 1.0} and t["gap_sum_us"] == 14.5
