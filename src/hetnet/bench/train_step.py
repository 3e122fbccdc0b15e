"""The train-step table: one SGD+momentum step and one inference pass per model x batch x backend, hetnet vs
PyTorch, gated on agreement before it is timed -> train_step.json / .md and speedup.png."""
from __future__ import annotations

import gc
import json
import statistics
import time
from pathlib import Path

from .. import optim
from .. import seed as hn_seed
from ..device import get_backend
from ..train import make_eval_step
from .common import (
    LR,
    MOMENTUM,
    RTOL_F32,
    RTOL_TF32,
    Clock,
    TorchCudaPeak,
    fmt,
    fmt_ms,
    load_average,
    md_header,
    measure,
    short_error,
    targets_markdown,
    threads_text,
    wait_quiet,
    write_result,
    write_text,
)
from .models import model_label, resolve_model
from .pair import Pair, gate, peak_memory
from .sides import LayerByLayerStep, TorchGraphStep, torch_flags

MODELS = ("thesis-m0", "thesis-m1", "thesis-m2", "thesis-m3", "thesis-m4", "fashion-cnn", "mlp")
BATCHES = (32, 128, 1024)
QUICK_MODELS = ("thesis-m1", "fashion-cnn", "mlp")
QUICK_BATCHES = (32, 128)
# the float64 reference backend is an oracle, not a fast path: it is timed only at these (model, batch) pairs
REFERENCE_ROWS = ("thesis-m0:32", "mlp:32")
TF32_ROW = ("thesis-m1", 1024)


def layer_by_layer_step(model_name: str, backend) -> LayerByLayerStep:
    """A fresh copy of the model (seed 0) and its optimiser, stepped through the public layer API."""

    hn_seed(0)
    model, _ = resolve_model(model_name)
    model.to(backend).train()
    return LayerByLayerStep(model, optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM))


def bench_train_step(model_name: str, batch: int, device: str, args, tf32: bool = False) -> dict:
    """One row of train_step.json. Raises nothing a caller must handle except programming errors in hetnet."""
    import torch
    import torch.nn.functional as F


    backend = get_backend(device, "tf32" if tf32 else None)     # the TF32 row: hetnet's tensor-core products too
    gpu = device.startswith("cuda")
    tdev = "cuda" if gpu else "cpu"
    row = {"model": model_label(model_name), "batch_size": batch, "hetnet_backend": backend.name,
           "torch_device": tdev, "tf32": tf32, "status": "ok", "reason": None}
    if gpu:
        torch_flags(tf32)
        row["hetnet_precision"] = backend.precision
        row["torch_tf32"] = {"matmul": bool(torch.backends.cuda.matmul.allow_tf32),
                             "cudnn": bool(torch.backends.cudnn.allow_tf32),
                             "cudnn_benchmark": bool(torch.backends.cudnn.benchmark)}
    elif getattr(args, "quiet_wait", 0) > 0:
        row["cpu_busy_before"] = round(wait_quiet(args.quiet_wait), 3)
    tol = RTOL_TF32 if (gpu or tf32) else RTOL_F32
    row["check_tolerance"] = tol
    pair, info, reason = gate(lambda seed: Pair(model_name, batch, backend, tdev, seed), batch, tol)
    row.update(info)
    if reason:
        row.update(status="refused", reason=reason)
        return row
    hmodel, tmodel, hx, hy, tx, ty = pair.hmodel, pair.tmodel, pair.hx, pair.hy, pair.tx, pair.ty
    hstep, topt = pair.hstep, pair.topt

    def hetnet_train():
        hstep.step(hx, hy)

    def torch_train():
        topt.zero_grad(set_to_none=True)
        F.cross_entropy(tmodel(tx), ty).backward()
        topt.step()

    def torch_infer():
        with torch.inference_mode():
            tmodel(tx)

    hclock = Clock("cupy", backend, getattr(hstep, "stream", None)) if gpu else Clock("cpu", backend)
    tclock = Clock("torch") if gpu else Clock("cpu")
    sides = {"hetnet": (hetnet_train, hclock), "torch_eager": (torch_train, tclock)}
    if getattr(args, "layer_by_layer", False):    # its own model: the step object keeps state of its own
        layered = layer_by_layer_step(model_name, backend)
        sides["hetnet_layers"] = (lambda: layered.step(hx, hy), Clock("cupy", backend) if gpu else hclock)
    if gpu:
        try:
            gmodel, gopt, gx = pair.torch_copy()
            with TorchCudaPeak() as gm:
                tgraph = TorchGraphStep(gmodel, gopt, gx, ty)
                tgraph.step()
            row["torch_graph_peak_mib"] = gm.mib
            sides["torch_graph"] = (tgraph.step, tclock)
        except Exception as e:  # a capture that fails is recorded, the rest of the row still runs
            row["torch_graph_error"] = short_error(e)

    med, timing = measure(sides, gpu, args)
    row["repeats"], row["steps_per_repeat"] = timing["repeats"], timing["steps_per_repeat"]
    s = timing["samples"]
    # each repetition's hetnet and PyTorch blocks ran back to back, under the same load
    row["pair_median_speedup_vs_torch_eager"] = round(statistics.median(
        t / h for h, t in zip(s["hetnet"], s["torch_eager"], strict=True)), 3)

    # inference (eval mode; PyTorch under inference_mode): the trainer's evaluation step (hetnet.train.make_eval_step:
    # on the GPU a captured graph, with loss and accuracy accumulated on the device)
    hmodel.eval()
    tmodel.eval()
    try:
        ev = make_eval_step(hmodel)
        row["hetnet_infer_path"] = f"{type(ev).__module__}.{type(ev).__qualname__}"
        iclock = Clock("cupy", backend, getattr(ev, "stream", None)) if gpu else hclock
        isides = {"hetnet": (lambda: ev.step(hx, hy), iclock), "torch": (torch_infer, tclock)}
        # a fast path's first call of a shape tunes, the second captures
        imed, _ = measure(isides, gpu, args, seconds_scale=0.5, warmup=max(3, args.warmup))
    finally:
        hmodel.train()
        tmodel.train()

    if hclock.fallbacks or iclock.fallbacks:
        row["hetnet_timer"] = "wall clock (CuPy events were not on the backend's stream)"

    # peak memory, each side on its own fresh model; ratio > 1: hetnet needs less
    row.update(peak_memory(model_name, backend, pair.x, pair.y, tdev, gpu))
    for kind in ("peak", "reserved"):
        h, t = row.get(f"hetnet_{kind}_mib"), row.get(f"torch_{kind}_mib")
        if h and t:
            row[f"{kind}_memory_ratio"] = round(t / h, 3)

    def ms(s):
        return round(s * 1e3, 4)

    def ips(s):
        return round(batch / s, 1)

    row.update({"hetnet_ms_per_step": ms(med["hetnet"]), "hetnet_img_per_s": ips(med["hetnet"]),
                "torch_eager_ms_per_step": ms(med["torch_eager"]), "torch_eager_img_per_s": ips(med["torch_eager"]),
                "torch_graph_ms_per_step": ms(med["torch_graph"]) if "torch_graph" in med else None,
                "torch_graph_img_per_s": ips(med["torch_graph"]) if "torch_graph" in med else None,
                "hetnet_infer_img_per_s": ips(imed["hetnet"]), "torch_infer_img_per_s": ips(imed["torch"]),
                "speedup_vs_torch_eager": round(med["torch_eager"] / med["hetnet"], 3)})
    row["speedup_vs_torch_graph"] = (round(med["torch_graph"] / med["hetnet"], 3) if "torch_graph" in med else None)
    if "hetnet_layers" in med:
        row.update(hetnet_layers_ms_per_step=ms(med["hetnet_layers"]),
                   hetnet_layers_img_per_s=ips(med["hetnet_layers"]),
                   layers_speedup_vs_torch_eager=round(med["torch_eager"] / med["hetnet_layers"], 3))
    return row


def targets(rows: list[dict]) -> list[dict]:
    """The issues' performance targets, judged on the rows measured (a target with no rows is left out)."""
    ok = [r for r in rows if r.get("status") == "ok" and not r.get("tf32")]
    gpu = [r for r in ok if r["hetnet_backend"].startswith("cuda") and r["model"] in ("thesis-m1", "fashion-cnn")]
    checks = [
        ("GPU: hetnet >= 2x PyTorch eager at batch <= 128 (thesis-m1, fashion-cnn)",
         [r for r in gpu if r["batch_size"] <= 128], "speedup_vs_torch_eager", 2.0),
        ("GPU: hetnet >= 1x PyTorch CUDA graph at every batch size (thesis-m1, fashion-cnn)",
         [r for r in gpu if r.get("speedup_vs_torch_graph")], "speedup_vs_torch_graph", 1.0),
        ("CPU: hetnet cpu step time <= PyTorch CPU's", [r for r in ok if r["hetnet_backend"] == "cpu"],
         "speedup_vs_torch_eager", 1.0),
        ("GPU: hetnet peak memory allocated <= PyTorch eager's (thesis-m1, fashion-cnn; torch/hetnet)",
         [r for r in gpu if r.get("peak_memory_ratio")], "peak_memory_ratio", 1.0),
        ("GPU, indicative: hetnet memory reserved <= PyTorch eager's (thesis-m1, fashion-cnn; torch/hetnet; "
         "PyTorch's rise is a lower bound: it can reuse segments held for live tensors)",
         [r for r in gpu if r.get("reserved_memory_ratio")], "reserved_memory_ratio", 1.0),
    ]
    out = []
    for text, sel, key, need in checks:
        if sel:
            missed = [f"{r['model']}@{r['batch_size']}: {r[key]:.2f}x" for r in sel if r[key] < need]
            out.append({"target": text, "rows": len(sel), "met": not missed, "missed": missed})
    return out


def train_step_markdown(doc: dict) -> str:
    lines = ["# One training step: hetnet vs PyTorch", ""] + md_header(doc["environment"])
    lines += [doc["method"], "",
              "| model | batch | hetnet backend | hetnet ms/step | torch eager ms/step | torch graph ms/step | "
              "speed-up vs eager | vs graph | hetnet img/s | hetnet infer img/s | torch infer img/s | "
              "hetnet peak MiB | torch peak MiB | check rel. err |",
              "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    bad = []
    for r in doc["rows"]:
        if r.get("status") != "ok":
            bad.append(r)
            continue
        name = r["model"] + (" (TF32)" if r.get("tf32") else "")
        lines.append(f"| {name} | {r['batch_size']} | {r['hetnet_backend']} | {fmt_ms(r['hetnet_ms_per_step'])} | "
                     f"{fmt_ms(r['torch_eager_ms_per_step'])} | {fmt_ms(r.get('torch_graph_ms_per_step'))} | "
                     f"{fmt(r['speedup_vs_torch_eager'])}x | "
                     f"{fmt(r.get('speedup_vs_torch_graph')) + 'x' if r.get('speedup_vs_torch_graph') else '—'} | "
                     f"{fmt(r['hetnet_img_per_s'], 0)} | {fmt(r['hetnet_infer_img_per_s'], 0)} | "
                     f"{fmt(r['torch_infer_img_per_s'], 0)} | {fmt(r.get('hetnet_peak_mib'), 1)} | "
                     f"{fmt(r.get('torch_peak_mib'), 1)} | {r['check_max_rel_err']:.1e} |")
    retried = [r for r in doc["rows"] if r.get("status") == "ok" and r.get("check_first_batch_failed")
               and not r.get("check_float64")]
    if retried:
        lines += ["", "Checked on a second batch (the first one's check failed; see `check_first_batch_failed`, and "
                  "the method: a float32 max-pool near-tie can route a gradient differently from PyTorch):", ""]
        lines += [f"- {r['model']} batch {r['batch_size']} on {r['hetnet_backend']}: first batch "
                  f"{r['check_first_batch_failed']['worst']} {r['check_first_batch_failed']['rel_err']:.2g}"
                  for r in retried]
    judged = [r for r in doc["rows"] if r.get("status") == "ok" and r.get("check_float64")]
    if judged:
        lines += ["", "Checked against PyTorch in float64 (both batches' float32 checks failed; hetnet agrees with the "
                  "float64 result within the tolerance, as when PyTorch's float32 rounds a max-pool near-tie the "
                  "other way; see `check_float64`):", ""]
        lines += [f"- {r['model']} batch {r['batch_size']} on {r['hetnet_backend']}: float32 "
                  f"{r['check_float64']['against_float32']['worst']} "
                  f"{r['check_float64']['against_float32']['rel_err']:.2g}; float64 "
                  f"{r['check_float64']['worst']} {r['check_float64']['rel_err']:.2g}" for r in judged]
    lines += targets_markdown(doc.get("targets"), "Targets:")
    if bad:
        lines += ["", "Rows not timed:", ""]
        lines += [f"- {r['model']} batch {r['batch_size']} on {r['hetnet_backend']}: {r['status']}: {r['reason']}"
                  for r in bad]
    for e in doc.get("errors", []):
        lines.append(f"- {e}")
    return "\n".join(lines) + "\n"


def speedup_chart(rows: list[dict], path: Path, title: str) -> bool:
    """Bars of PyTorch time / hetnet time per model, one bar per batch size; one panel per (backend, baseline)."""
    ok = [r for r in rows if r.get("status") == "ok" and not r.get("tf32")]
    if not ok:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for be in dict.fromkeys(r["hetnet_backend"] for r in ok):
        for key, label in (("speedup_vs_torch_eager", "PyTorch eager"), ("speedup_vs_torch_graph",
                                                                          "PyTorch CUDA graph")):
            if any(r.get(key) for r in ok if r["hetnet_backend"] == be):
                panels.append((be, key, label))
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 3.2 * len(panels)), squeeze=False)
    for ax, (be, key, label) in zip(axes[:, 0], panels, strict=True):
        sel = [r for r in ok if r["hetnet_backend"] == be and r.get(key)]
        models = list(dict.fromkeys(r["model"] for r in sel))
        batches = sorted({r["batch_size"] for r in sel})
        width = 0.8 / max(1, len(batches))
        for j, b in enumerate(batches):
            vals = [next((r[key] for r in sel if r["model"] == m and r["batch_size"] == b), 0.0) for m in models]
            xs = [i + (j - (len(batches) - 1) / 2) * width for i in range(len(models))]
            bars = ax.bar(xs, vals, width, label=f"batch {b}")
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(models)), models, fontsize=8)
        ax.set_ylabel("speed-up (x)")
        ax.set_title(f"hetnet {be} vs {label}: training step (higher is faster)", fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def section_rows(args, default_rows) -> list[tuple[str, int]]:
    """(model, batch) pairs of a table: --rows as given; else --models x --batch-sizes, each defaulting to the
    models / batch sizes of the table's default rows; else the default rows."""
    if args.rows:
        return list(args.rows)
    if args.models or args.batch_sizes:
        models = args.models or list(dict.fromkeys(m for m, _ in default_rows))
        batches = args.batch_sizes or sorted({b for _, b in default_rows})
        return [(m, b) for m in models for b in batches]
    return list(default_rows)


def default_rows(quick: bool) -> list[tuple[str, int]]:
    models, batches = (QUICK_MODELS, QUICK_BATCHES) if quick else (MODELS, BATCHES)
    return [(m, b) for m in models for b in batches]


def run_train_step(args, devices: list[str], env: dict, out: Path, deadline: float) -> dict:
    rows, errors = [], []
    reference_rows = set(args.reference_rows)
    for device in devices:
        try:
            get_backend(device)
        except Exception as e:
            errors.append(f"{device}: backend unavailable: {short_error(e)}")
            continue
        for model_name, batch in section_rows(args, default_rows(args.quick)):
            if device == "reference" and f"{model_label(model_name)}:{batch}" not in reference_rows:
                continue
            if time.monotonic() > deadline:
                rows.append({"model": model_label(model_name), "batch_size": batch, "hetnet_backend": device,
                             "status": "skipped", "reason": "the run's time budget (--time-budget) was spent"})
                continue
            rows.append(_safe_row(model_name, batch, device, args, False))
            _progress(rows[-1])
        if device.startswith("cuda") and args.tf32_row and time.monotonic() <= deadline:
            rows.append(_safe_row(TF32_ROW[0], TF32_ROW[1], device, args, True))
            _progress(rows[-1])
            torch_flags(False)
    gpu = any(d.startswith("cuda") for d in devices)
    doc = {"environment": env, "method": method_text(gpu), "tolerances": {"float32": RTOL_F32, "tf32": RTOL_TF32},
           "optimizer": f"SGD lr={LR} momentum={MOMENTUM}", "errors": errors, "targets": targets(rows), "rows": rows}
    doc["load_average_at_end"] = load_average()
    for device in devices:  # the cuda backend's convolution-algorithm measurements, when it keeps them
        try:
            log = getattr(get_backend(device), "tune_log", None) if device.startswith("cuda") else None
            if log:
                doc.setdefault("tune_log", {})[device] = json.loads(json.dumps(list(log)[:300], default=str))
        except Exception as e:
            errors.append(f"tune_log of {device}: {short_error(e)}")
    try:
        where = env.get("card") or env["host"]
        if speedup_chart(rows, out / "speedup.png", f"{where} — {env['cpu']}, {threads_text(env['threads'])}"):
            doc["chart"] = "speedup.png"
    except Exception as e:
        errors.append(f"chart: {short_error(e)}")
    write_result(out / "train_step.json", doc)
    write_text(out / "train_step.md", train_step_markdown(doc))
    return doc


def method_text(gpu: bool) -> str:
    text = (f"One step = forward, softmax cross-entropy, backward, SGD (lr {LR}, momentum {MOMENTUM}) update, "
            "float32. "
            "Same weights and inputs on both sides; before timing, on up to 32 images, logits, loss, every gradient "
            "and the updates of two timed steps must agree with PyTorch within the tolerance in the row (float32 "
            "1e-4 relative; 1e-2 where TF32 may be in use: GPU rows), on the first batch drawn or, failing that, on "
            "a second one, or, failing that too, with PyTorch's side in float64 (`check_float64`); then the timed "
            "step's updates on the whole batch within 1e-2 (float32 max-pool "
            "near-ties, more of them the larger the batch, route a few gradients differently from PyTorch without "
            "either being wrong), or, both sides against float64, within the larger of 1e-2 and 2x PyTorch "
            "float32's own error, on that batch or a second one. A row failing is refused. Median over repetitions after warm-up, sides "
            "alternating (`pair_median_speedup_vs_torch_eager`: the median of each repetition's own ratio). "
            "hetnet's step is the trainer's (hetnet.train.make_train_step), its inference pass the trainer's "
            "evaluation step (make_eval_step: forward plus loss and accuracy sums); `hetnet_layers_*` (with "
            "--layer-by-layer): the same SGD step through model.forward / model.backward, layer after layer. ")
    if gpu:
        text += ("GPU: CUDA events around blocks of steps; PyTorch with cudnn.benchmark on and TF32 off except in "
                 "the row marked TF32; 'graph' = the whole PyTorch step captured as a CUDA graph. Peak memory, over a "
                 "fresh model's first two training steps and two evaluation passes on the paths timed here (hetnet: "
                 "the trainer's step objects and their CUDA graphs; PyTorch: eager), as the high-water mark of "
                 "bytes allocated and live (torch.cuda.max_memory_allocated; hetnet: CuPy's default pool plus its "
                 "private step pool) and, in the JSON, of bytes reserved (cached blocks included; "
                 "max_memory_reserved). Neither side counts its one-time algorithm measurement: PyTorch's "
                 "cudnn.benchmark cache is warm from the timing, and hetnet's trial runs use a pool of their own, "
                 "emptied after each measurement.")
    else:
        text += ("CPU: perf_counter per step, each block after untimed steps for at least 15 ms (the other side's "
                 "threads may still be spinning, or one's own asleep); PyTorch with the same thread count. Peak "
                 "memory: rise of the RSS high-water mark (VmHWM) over a fresh model's build, one step and one "
                 "evaluation pass.")
    return text


def _safe_row(model_name, batch, device, args, tf32) -> dict:
    try:
        return bench_train_step(model_name, batch, device, args, tf32)
    except Exception as e:
        return {"model": model_label(model_name), "batch_size": batch, "hetnet_backend": device, "tf32": tf32,
                "status": "error", "reason": short_error(e)}
    finally:
        gc.collect()


def _progress(row: dict) -> None:
    if row.get("status") == "ok":
        g = row.get("torch_graph_ms_per_step")
        print(f"  {row['model']:<12} batch {row['batch_size']:>5} {row['hetnet_backend']:<9}"
              f"{' TF32' if row.get('tf32') else ''}: hetnet {row['hetnet_ms_per_step']:9.3f} ms, "
              f"torch eager {row['torch_eager_ms_per_step']:9.3f} ms"
              + (f", graph {g:8.3f} ms" if g else "") + f"  (x{row['speedup_vs_torch_eager']:.2f} vs eager)",
              flush=True)
    else:
        print(f"  {row['model']:<12} batch {row['batch_size']:>5} {row['hetnet_backend']:<9}: "
              f"{row['status']}: {row.get('reason')}", flush=True)
