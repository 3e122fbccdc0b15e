"""The precision table (issue 14): one SGD+momentum training step per model x batch x precision (fp32, tf32, bf16),
hetnet at that precision against PyTorch at the same precision the way its users run it, captured as a CUDA graph,
and optionally torch.compile(mode="max-autotune") -> precision_step.json / .md.

    hetnet bench --devices cuda --precision fp32,tf32,bf16 --no-extras        # thesis-m1, fashion-cnn, cifar-wide
    hetnet bench --devices cuda --precision bf16 --models cifar-wide --batch-sizes 512 --torch-compile

Each row: {"model", "batch_size", "precision", "hetnet_img_per_s", "torch_graph_img_per_s",
"torch_compile_img_per_s", "hetnet_peak_mib", "torch_peak_mib", "hetnet_tflops"} and how it was made (the check's
errors, the flags each side ran with, the step's GFLOP, repetitions). A side that did not run has None and says
why: hetnet without a `model.to(device, precision=...)` ("hetnet precision not supported", sides.hetnet_to), a
compile that failed, a CPU row at tf32 or bf16 (the cpu backends compute in float32).
"""
from __future__ import annotations

import functools
import gc
import json
import time
from pathlib import Path

from ..device import get_backend
from ..errors import UsageError
from .common import (
    FULL_BATCH_RTOL,
    LR,
    MOMENTUM,
    PEER_FACTOR,
    PRECISIONS,
    RTOL_GPU_MAXPOOL,
    RTOL_PRECISION,
    Clock,
    fmt,
    load_average,
    md_header,
    measure,
    short_error,
    sig,
    targets_markdown,
    write_result,
    write_text,
)
from .models import model_label, train_step_flops
from .pair import PEER_BATCHES, Pair, gate, peak_memory
from .sides import TorchCompileStep, TorchGraphStep, torch_flags, torch_precision

PRECISION_MODELS = ("thesis-m1", "fashion-cnn", "cifar-wide")
PRECISION_BATCHES = (128, 512, 1024)
ROW_KEYS = ("model", "batch_size", "precision", "hetnet_img_per_s", "torch_graph_img_per_s",
            "torch_compile_img_per_s", "hetnet_peak_mib", "torch_peak_mib", "hetnet_tflops")
# issue 14's targets: hetnet / PyTorch graph img/s, cifar-wide at batch 512 and 1024
TARGETS = {"bf16": 1.3, "tf32": 1.3, "fp32": 1.2}


def bench_precision_step(model_name: str, batch: int, device: str, precision: str, args) -> dict:
    """One row of precision_step.json; never raises for a side that fails (the row says why)."""
    import torch.nn.functional as F

    backend = get_backend(device)
    gpu = device.startswith("cuda")
    tdev = "cuda" if gpu else "cpu"
    row = dict.fromkeys(ROW_KEYS)
    row.update(model=model_label(model_name), batch_size=batch, precision=precision, hetnet_backend=backend.name,
               torch_device=tdev, status="ok", reason=None)
    if not gpu and precision != "fp32":
        row.update(status="skipped", reason="tf32 and bf16 rows are GPU rows (the cpu backends compute in float32)")
        return row
    if gpu:
        row["torch_flags"] = torch_precision(precision)
    tol = max(RTOL_PRECISION[precision], RTOL_GPU_MAXPOOL) if gpu else RTOL_PRECISION[precision]
    row["check_tolerance"] = tol

    def make_pair(seed):
        return Pair(model_name, batch, backend, tdev, seed, precision)

    pair = make_pair(1)
    flops = train_step_flops(pair.hmodel, pair.input_shape, batch)
    row["step_gflop"] = round(flops / 1e9, 3)
    row["hetnet_precision"] = getattr(pair.hmodel, "precision", precision)
    if pair.hetnet_note is None:
        pair, info, reason = gate(make_pair, batch, tol, float32_first=precision == "fp32",
                                  full_tol=max(FULL_BATCH_RTOL, tol))
        row.update(info)
        if reason:
            row.update(status="refused", reason=reason)
            return row
    else:
        row.update(status="torch only", reason=pair.hetnet_note, hetnet_precision=None)

    sides: dict = {}
    tclock = Clock("torch") if gpu else Clock("cpu")
    if pair.hetnet_note is None:
        hstep, hx, hy = pair.hstep, pair.hx, pair.hy
        hclock = Clock("cupy", backend, getattr(hstep, "stream", None)) if gpu else Clock("cpu", backend)
        sides["hetnet"] = (lambda: hstep.step(hx, hy), hclock)
        row["hetnet_path"] = pair.path
    ty = pair.ty
    if gpu:
        try:
            gm, gopt, gx = pair.torch_copy(precision)
            sides["torch_graph"] = (TorchGraphStep(gm, gopt, gx, ty, precision=precision).step, tclock)
        except Exception as e:
            row["torch_graph_error"] = short_error(e)
    else:   # no CUDA graph on a CPU: PyTorch eager is the peer
        em, eopt, ex = pair.torch_copy(precision)

        def torch_eager():
            eopt.zero_grad(set_to_none=True)
            F.cross_entropy(em(ex), ty).backward()
            eopt.step()

        sides["torch_eager"] = (torch_eager, tclock)
    if getattr(args, "torch_compile", False):
        try:
            cm, copt, cx = pair.torch_copy(precision)
            cstep = TorchCompileStep(cm, copt, cx, ty, precision)
            row["torch_compile_seconds"] = cstep.compile_seconds
            sides["torch_compile"] = (cstep.step, tclock)
        except Exception as e:   # torch.compile's failures are its own: the row records and goes on
            row["torch_compile_note"] = f"failed: {short_error(e)}"
    else:
        row["torch_compile_note"] = "not asked for (--torch-compile)"
    if not sides:
        row.update(status="error", reason=row.get("reason") or "no side could run")
        return row

    med, timing = measure(sides, gpu, args)
    row["repeats"], row["steps_per_repeat"] = timing["repeats"], timing["steps_per_repeat"]

    def ips(name):
        return round(batch / med[name], 1) if name in med else None

    row.update(hetnet_img_per_s=ips("hetnet"), torch_graph_img_per_s=ips("torch_graph"),
               torch_compile_img_per_s=ips("torch_compile"))
    if not gpu:
        row["torch_eager_img_per_s"] = ips("torch_eager")
    for name in ("hetnet", "torch_graph", "torch_compile", "torch_eager"):
        if name in med:
            row[f"{name}_ms_per_step"] = round(med[name] * 1e3, 4)
            row[f"{name}_tflops"] = sig(flops / med[name] / 1e12)
    peer = "torch_graph" if gpu else "torch_eager"
    if "hetnet" in med and peer in med:
        row[f"speedup_vs_{peer}"] = round(med[peer] / med["hetnet"], 3)
    if "hetnet" in med and "torch_compile" in med:
        row["speedup_vs_torch_compile"] = round(med["torch_compile"] / med["hetnet"], 3)

    # peak memory: fresh models, hetnet through the trainer's step at this precision, PyTorch on the side it is
    # timed on (the CUDA graph on a GPU), training steps only
    mem = peak_memory(model_name, backend, pair.x, pair.y, tdev, gpu, precision, torch_graph=gpu, with_eval=False)
    row.update(mem)
    return row


def precision_targets(rows: list[dict]) -> list[dict]:
    """Issue 14's speed and memory targets, judged on the GPU rows measured (a target with no rows is left out)."""
    ok = [r for r in rows if r.get("status") == "ok" and r.get("hetnet_img_per_s")
          and str(r.get("hetnet_backend", "")).startswith("cuda")]
    out = []
    for p, need in TARGETS.items():
        sel = [r for r in ok if r["model"] == "cifar-wide" and r["batch_size"] in (512, 1024) and r["precision"] == p
               and r.get("speedup_vs_torch_graph")]
        if sel:
            missed = [f"{r['batch_size']}: {r['speedup_vs_torch_graph']:.2f}x" for r in sel
                      if r["speedup_vs_torch_graph"] < need]
            out.append({"target": f"cifar-wide {p}, batch 512 and 1024: hetnet >= {need}x PyTorch's CUDA graph",
                        "rows": len(sel), "met": not missed, "missed": missed})
    sel = [r for r in ok if r["model"] == "cifar-wide" and r["batch_size"] in (512, 1024)
           and r.get("speedup_vs_torch_compile")]
    if sel:
        missed = [f"{r['precision']}@{r['batch_size']}: {r['speedup_vs_torch_compile']:.2f}x" for r in sel
                  if r["speedup_vs_torch_compile"] < 1.0]
        out.append({"target": "cifar-wide, batch 512 and 1024: hetnet ahead of torch.compile", "rows": len(sel),
                    "met": not missed, "missed": missed})
    sel = [r for r in ok if r.get("hetnet_peak_mib") and r.get("torch_peak_mib")]
    if sel:
        missed = [f"{r['model']}@{r['batch_size']} {r['precision']}: {r['hetnet_peak_mib']} > {r['torch_peak_mib']} MiB"
                  for r in sel if r["hetnet_peak_mib"] > r["torch_peak_mib"]]
        out.append({"target": "peak memory <= PyTorch's (CUDA graph side)", "rows": len(sel), "met": not missed,
                    "missed": missed})
    return out


def gemm_ceilings(precisions) -> dict:
    """The card's measured dense GEMM rate per precision (torch.mm 8192^3; bf16 operands for bf16, TF32 switches
    for tf32), in TFLOP/s: the roof beside hetnet_tflops."""
    import torch

    n, out, clock = 8192, {}, Clock("torch")
    for p in precisions:
        torch_flags(p == "tf32")
        dtype = torch.bfloat16 if p == "bf16" else torch.float32
        a = torch.randn(n, n, device="cuda", dtype=dtype)
        b = torch.randn(n, n, device="cuda", dtype=dtype)
        mm = functools.partial(torch.mm, a, b)
        clock(mm, 2)
        t = min(clock(mm, 5) for _ in range(3))
        out[p] = round(2 * n**3 / t / 1e12, 1)
        del a, b, mm
    torch_flags(False)
    torch.cuda.empty_cache()
    return out


def method_text(gpu: bool) -> str:
    tols = ", ".join(f"{p} {t:g}" for p, t in RTOL_PRECISION.items())
    text = (f"One step = forward, softmax cross-entropy, backward, SGD (lr {LR}, momentum {MOMENTUM}) update, "
            "same weights and inputs on both sides. hetnet runs the model moved with `model.to(device, "
            "precision=...)` (fp32: `model.to(device)`); a model that takes no precision leaves the row's hetnet "
            "side empty ('hetnet precision not supported'). Before timing, on up to 32 images, hetnet's logits, "
            "loss, every gradient and the updates of two timed steps must agree within the precision's relative "
            f"tolerance ({tols}): fp32 against PyTorch float32, judged against PyTorch float64 when that fails "
            f"(as in train_step.json), then the timed step's updates on the whole batch within "
            f"max({FULL_BATCH_RTOL:g}, the tolerance) or, both sides against float64, within the larger of that and "
            f"{PEER_FACTOR:g}x PyTorch float32's own error, on that batch or a second one; tf32 and bf16 against PyTorch float64, the exact result, each "
            f"quantity within the larger of the tolerance and {PEER_FACTOR:g}x PyTorch's own error at the same "
            "precision against float64 on the same images (check_bound, check_peer_rel_err), on up to "
            f"{len(PEER_BATCHES)} batches: a row is refused only where one quantity is over its bound on each of "
            "them (a ReLU input within the precision's rounding of 0 flips on one batch, a defect repeats; "
            "check_batches), then the update of all parameters on the whole batch the same way. A row failing is "
            "refused and not timed. hetnet_tflops = the step's dense FLOPs (3 x the forward's Conv2D and Dense "
            "multiply-adds x 2, step_gflop) / hetnet's time. Median over repetitions after warm-up, sides "
            "alternating. ")
    if gpu:
        text += ("GPU: CUDA events around blocks of steps. PyTorch as its users run each precision: fp32 with TF32 "
                 "off; tf32 with torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True; "
                 "bf16 under torch.autocast(dtype=torch.bfloat16) with the model and input channels_last; "
                 "cudnn.benchmark on; the whole step captured as a CUDA graph (torch_graph). torch_compile: the "
                 "model compiled with torch.compile(mode='max-autotune'), SGD eager (only with --torch-compile). "
                 "Peak memory: a fresh model per side, its first two training steps (hetnet: the trainer's step "
                 "object; PyTorch: the CUDA-graph step, its warm-up included), the high-water mark of bytes "
                 "allocated and live.")
    else:
        text += ("CPU: fp32 rows only, PyTorch eager (no CUDA graph) with the same thread count, perf_counter per "
                 "block of steps after settling steps; peak memory: the rise of the RSS high-water mark.")
    return text


def precision_markdown(doc: dict) -> str:
    lines = ["# One training step per precision: hetnet vs PyTorch", ""] + md_header(doc["environment"])
    lines += [doc["method"], ""]
    if doc.get("gemm_tflops"):
        lines += ["Measured dense GEMM ceilings (torch.mm 8192^3): " + ", ".join(
            f"{p} {v} TFLOP/s" for p, v in doc["gemm_tflops"].items()) + ".", ""]
    if doc.get("partial"):
        lines += ["**Partial**: the rows measured before the run stopped (the table is written again after each row).",
                  ""]
    merged = "merged_from" in doc
    if merged:
        lines += ["Rows from several runs (--merge): each names the commit it was measured at; the ratios of a row "
                  "are from its own run.", ""]
    lines += ["| model | batch | precision | hetnet img/s | torch graph img/s | torch compile img/s | vs graph | "
              "vs compile | hetnet TFLOP/s | hetnet peak MiB | torch peak MiB | check rel. err |"
              + (" commit |" if merged else ""),
              "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---|" if merged else "")]
    notes = []
    for r in doc["rows"]:
        if r.get("status") not in ("ok", "torch only"):
            notes.append(r)
            continue
        vs_g, vs_c = r.get("speedup_vs_torch_graph"), r.get("speedup_vs_torch_compile")
        lines.append(f"| {r['model']} | {r['batch_size']} | {r['precision']} | {fmt(r['hetnet_img_per_s'], 0)} | "
                     f"{fmt(r['torch_graph_img_per_s'], 0)} | {fmt(r['torch_compile_img_per_s'], 0)} | "
                     f"{fmt(vs_g) + 'x' if vs_g else '—'} | {fmt(vs_c) + 'x' if vs_c else '—'} | "
                     f"{fmt(r['hetnet_tflops'])} | {fmt(r['hetnet_peak_mib'], 1)} | {fmt(r['torch_peak_mib'], 1)} | "
                     + (f"{r['check_max_rel_err']:.1e} |" if r.get("check_max_rel_err") is not None else "— |")
                     + (f" {(r.get('measured') or {}).get('commit') or '—'} |" if merged else ""))
    partial = [r for r in doc["rows"] if r.get("status") == "torch only"]
    if partial:
        lines += ["", "No hetnet side (PyTorch measured alone):", ""]
        lines += [f"- {r['model']} batch {r['batch_size']} {r['precision']}: {r['reason']}" for r in partial]
    failed = [r for r in doc["rows"] if str(r.get("torch_compile_note", "")).startswith("failed")]
    if failed:
        lines += ["", "torch.compile side missing:", ""]
        lines += [f"- {r['model']} batch {r['batch_size']} {r['precision']}: {r['torch_compile_note']}"
                  for r in failed]
    lines += targets_markdown(doc.get("targets"), "Targets (issue 14):")
    if notes:
        lines += ["", "Rows not timed:", ""]
        lines += [f"- {r['model']} batch {r['batch_size']} {r['precision']} on {r.get('hetnet_backend')}: "
                  f"{r['status']}: {r.get('reason')}" for r in notes]
    for e in doc.get("errors", []):
        lines.append(f"- {e}")
    return "\n".join(lines) + "\n"


def run_precision_step(args, devices: list[str], env: dict, out: Path, deadline: float, rows_to_run) -> dict:
    """Every (model, batch) of rows_to_run x args.precision on each device -> precision_step.json / .md, written
    again after each row (marked "partial" until the last), so that a run cut short keeps the rows it measured."""
    rows, errors = [], []
    gpu = any(d.startswith("cuda") for d in devices)
    doc = {"environment": env, "method": method_text(gpu), "tolerances": dict(RTOL_PRECISION),
           "optimizer": f"SGD lr={LR} momentum={MOMENTUM}", "precisions": list(args.precision), "errors": errors}
    for device in devices:
        if device == "reference":
            continue   # the float64 oracle has no precision to compare
        try:
            get_backend(device)
        except Exception as e:
            errors.append(f"{device}: backend unavailable: {short_error(e)}")
            continue
        for model_name, batch in rows_to_run:
            for precision in args.precision:
                if time.monotonic() > deadline:
                    row = dict.fromkeys(ROW_KEYS)
                    row.update(model=model_label(model_name), batch_size=batch, precision=precision,
                               hetnet_backend=device, status="skipped",
                               reason="the run's time budget (--time-budget) was spent")
                else:
                    row = _safe_row(model_name, batch, device, precision, args)
                rows.append(row)
                _progress(row)
                _write_precision(dict(doc, partial=True), rows, args, env, out)
        if device.startswith("cuda"):
            try:
                torch_flags(False)
            except Exception:
                pass
    if gpu:
        try:
            doc["gemm_tflops"] = gemm_ceilings(args.precision)
        except Exception as e:
            errors.append(f"GEMM ceilings: {short_error(e)}")
    doc["load_average_at_end"] = load_average()
    return _write_precision(doc, rows, args, env, out)


def _write_precision(doc: dict, rows: list[dict], args, env: dict, out: Path) -> dict:
    """doc with rows (merged into args.merge's, when given) and their targets -> out/precision_step.json / .md."""
    rows = [dict(r) for r in rows]
    if args.merge is not None:
        rows = merged_rows(rows, args.merge, env)
        doc["merged_from"] = args.merge["environment"].get("commit")
    doc["targets"] = precision_targets(rows)
    doc["rows"] = rows
    write_result(out / "precision_step.json", doc)
    write_text(out / "precision_step.md", precision_markdown(doc))
    return doc


def _row_key(row: dict) -> tuple:
    return row.get("model"), row.get("batch_size"), row.get("precision"), row.get("hetnet_backend")


def _measured(env: dict) -> dict:
    return {"commit": env.get("commit"), "time_utc": env.get("time_utc"), "card": env.get("card") or env.get("host")}


def load_merge(path: str, flag: str) -> dict:
    """The precision_step.json at path (JSON only, never unpickled), checked to be one: a UsageError naming flag and
    the file otherwise."""
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as e:
        raise UsageError(f"{flag}: cannot read {path}: {e.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{flag}: {path} is not JSON: {e}") from None
    if (not isinstance(doc, dict) or not isinstance(doc.get("environment"), dict)
            or not isinstance(doc.get("rows"), list) or not all(isinstance(r, dict) for r in doc["rows"])):
        raise UsageError(f"{flag}: {path} is not a precision_step.json (an object with environment and rows)")
    return doc


def check_merge_card(old: dict, env: dict, path: str) -> None:
    """A UsageError naming --merge and the file where its table was measured on another card (or host) than this
    run: a table of one card's rows, so that every ratio in it is of the same card."""
    was, now = _measured(old["environment"])["card"], _measured(env)["card"]
    if was != now:
        raise UsageError(f"--merge: {path} was measured on {was}, this run is on {now}")


def merged_rows(rows: list[dict], old: dict, env: dict) -> list[dict]:
    """This run's rows, then the rows of the earlier table `old` that it did not measure (same model, batch,
    precision and backend; a row this run skipped for its time budget is not measured), in the tables' order (model,
    batch, precision); each row names where it was measured (`measured`: commit, time, card), an old row its own or
    its table's."""
    def order(r):
        m, p = r.get("model"), r.get("precision")
        return (PRECISION_MODELS.index(m) if m in PRECISION_MODELS else len(PRECISION_MODELS), str(m),
                r.get("batch_size") or 0, PRECISIONS.index(p) if p in PRECISIONS else len(PRECISIONS))

    old_keys = {_row_key(r) for r in old["rows"]}
    rows = [r for r in rows if r.get("status") != "skipped" or _row_key(r) not in old_keys]
    new = {_row_key(r) for r in rows}
    for r in rows:
        r["measured"] = _measured(env)
    kept = [dict(r, measured=r.get("measured") or _measured(old["environment"]))
            for r in old["rows"] if _row_key(r) not in new]
    return sorted(rows + kept, key=order)


def _safe_row(model_name, batch, device, precision, args) -> dict:
    try:
        return bench_precision_step(model_name, batch, device, precision, args)
    except Exception as e:
        row = dict.fromkeys(ROW_KEYS)
        row.update(model=model_label(model_name), batch_size=batch, precision=precision, hetnet_backend=device,
                   status="error", reason=short_error(e))
        return row
    finally:
        gc.collect()


def _progress(row: dict) -> None:
    head = f"  {row['model']:<12} batch {row['batch_size']:>5} {row['precision']:<5} {row.get('hetnet_backend')}"
    if row.get("status") in ("ok", "torch only"):
        parts = [f"{k.replace('_img_per_s', '')} {row[k]:,.0f} img/s" for k in
                 ("hetnet_img_per_s", "torch_graph_img_per_s", "torch_compile_img_per_s", "torch_eager_img_per_s")
                 if row.get(k)]
        print(head + ": " + ", ".join(parts) + (f"  ({row['reason']})" if row.get("reason") else ""), flush=True)
    else:
        print(f"{head}: {row['status']}: {row.get('reason')}", flush=True)


__all__ = ["bench_precision_step", "run_precision_step", "precision_targets", "load_merge", "merged_rows", "PRECISIONS",
           "PRECISION_MODELS", "PRECISION_BATCHES", "ROW_KEYS"]
