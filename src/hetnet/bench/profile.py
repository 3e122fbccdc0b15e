"""Where a training step's GPU time goes: every kernel of hetnet's step and of PyTorch's captured step, from CUPTI
(torch.profiler sees CuPy's kernels too, being process-wide), same model, weights and batch -> profile.json / .txt.

For each model and batch: --profile-steps steps of each side under the profiler; per side the GPU time of each
kernel (summed over its launches, divided by the steps), the sum of kernel time per step, and the span per step
between the first kernel's start and the last one's end (kernel time + the gaps between dependent kernels). The
text file lists the top kernels (--profile-top); the JSON keeps all of them.

    hetnet bench --devices cuda --no-train-step --profile --rows fashion-cnn:32,thesis-m4:1024
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from ..device import get_backend
from .common import LR, MOMENTUM, load_average, short_error, write_result, write_text
from .models import model_label
from .pair import Pair
from .sides import TorchGraphStep, torch_flags

PROFILE_ROWS = (("fashion-cnn", 32), ("fashion-cnn", 1024), ("thesis-m4", 1024))


def kernel_table(prof, steps: int, top_gaps: int = 12) -> dict:
    """{name: GPU us per step}, plus the span of all kernels, from a torch.profiler run; and where the span's idle
    time lies: "copies_us" (memcpy and memset per step, which the kernel sum leaves out) and "gaps_us" (the idle
    time after each kernel before the next kernel or copy starts, per step, summed by the kernel before it: the
    `top_gaps` largest)."""
    per, first, last = defaultdict(float), None, None
    copies, spans = 0.0, []
    for ev in prof.events():
        if "CUDA" not in str(ev.device_type):
            continue
        start, dur = ev.time_range.start, ev.time_range.elapsed_us()
        spans.append((start, start + dur, ev.name))
        if "memcpy" in ev.name.lower() or "memset" in ev.name.lower():
            copies += dur / steps
            continue
        per[ev.name] += dur / steps
        first = start if first is None else min(first, start)
        last = start + dur if last is None else max(last, start + dur)
    gaps: dict = defaultdict(float)
    spans.sort()
    end, before = None, None
    for s, e, name in spans:
        if end is not None and s > end:
            gaps[before] += (s - end) / steps
        if end is None or e >= end:
            end, before = e, name
    top = dict(sorted(gaps.items(), key=lambda kv: -kv[1])[:top_gaps])
    return {"kernels_us": dict(sorted(per.items(), key=lambda kv: -kv[1])),
            "kernel_sum_us": round(sum(per.values()), 2), "span_us": round((last - first) / steps, 2) if per else 0.0,
            "copies_us": round(copies, 2), "gaps_us": {k: round(v, 2) for k, v in top.items()},
            "gap_sum_us": round(sum(gaps.values()), 2)}


def profile_row(model_name: str, batch: int, device: str, steps: int) -> dict:
    """Both sides' kernels over `steps` steps after 10 untimed ones (capture, algorithm choice)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch_flags(False)
    backend = get_backend(device)
    pair = Pair(model_name, batch, backend, "cuda", data_seed=1)
    gm, gopt, gx = pair.torch_copy()
    tstep = TorchGraphStep(gm, gopt, gx, pair.ty)
    hstep, hx, hy = pair.hstep, pair.hx, pair.hy
    for _ in range(10):
        hstep.step(hx, hy)
        tstep.step()
    hstep.collect()
    torch.cuda.synchronize()
    out = {"model": model_label(model_name), "batch_size": batch, "hetnet_backend": backend.name, "steps": steps,
           "optimizer": f"SGD lr={LR} momentum={MOMENTUM}", "status": "ok", "reason": None}
    for side, fn in (("hetnet", lambda: hstep.step(hx, hy)), ("torch_graph", tstep.step)):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                fn()
            backend.synchronize()
            torch.cuda.synchronize()
        out[side] = kernel_table(prof, steps)
    hstep.collect()
    return out


def profile_text(doc: dict, top: int) -> str:
    lines = []
    for r in doc["rows"]:
        if r["status"] != "ok":
            lines.append(f"{r['model']} batch {r['batch_size']}: {r['status']}: {r['reason']}")
            continue
        lines.append(f"\n{r['model']} batch {r['batch_size']}: GPU time per step, kernels summed / first kernel start "
                     "to last kernel end")
        for side in ("hetnet", "torch_graph"):
            s = r[side]
            lines.append(f"  {side:12s} {s['kernel_sum_us']:8.1f} us in {len(s['kernels_us'])} kernels / span "
                         f"{s['span_us']:8.1f} us")
            lines += [f"      {us:8.1f} us  {k[:100]}" for k, us in list(s["kernels_us"].items())[:top]]
    return "\n".join(lines) + "\n"


def run_profile(args, devices: list[str], env: dict, out: Path, rows_to_run) -> dict:
    rows, errors = [], []
    for device in devices:
        if not device.startswith("cuda"):
            errors.append(f"{device}: the kernel profile is a GPU table")
            continue
        for model_name, batch in rows_to_run:
            try:
                rows.append(profile_row(model_name, batch, device, args.profile_steps))
            except Exception as e:
                rows.append({"model": model_label(model_name), "batch_size": batch, "hetnet_backend": device,
                             "status": "error", "reason": short_error(e)})
    doc = {"environment": env, "method": __doc__.split("\n\n")[1].replace("\n", " "), "errors": errors, "rows": rows,
           "load_average_at_end": load_average()}
    write_result(out / "profile.json", doc)
    text = profile_text(doc, args.profile_top)
    write_text(out / "profile.txt", text)
    print(text, flush=True)
    return doc


__all__ = ["run_profile", "profile_row", "kernel_table", "PROFILE_ROWS"]
