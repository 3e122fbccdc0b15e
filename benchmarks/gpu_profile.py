"""Where a training step's GPU time goes: every kernel of hetnet's captured step and of PyTorch's captured step,
from CUPTI (torch.profiler sees CuPy's kernels too, being process-wide), same model, weights and batch.

For each MODEL:BATCH: `--steps` replays of each side's CUDA graph under the profiler; per side the GPU time of each
kernel (summed over its launches, divided by the steps), the sum of kernel time per step, and the wall time per step
between the first kernel's start and the last one's end (kernel time + the gaps between dependent kernels). The
top kernels are printed; the JSON keeps all of them.

    PYTHONPATH=src python benchmarks/gpu_profile.py --rows fashion-cnn:32 thesis-m4:1024 --out /tmp/profile.json
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import numpy as np

LR, MOMENTUM = 0.01, 0.9


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", nargs="+", default=["fashion-cnn:32", "fashion-cnn:1024", "thesis-m4:1024"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--out", default=None)
    return ap.parse_args(argv)


def _kernels(prof, steps: int) -> dict:
    """{name: GPU us per step}, plus the span of all kernels, from a torch.profiler run."""
    per, first, last = defaultdict(float), None, None
    for ev in prof.events():
        if "CUDA" not in str(ev.device_type) or "memcpy" in ev.name.lower() or "memset" in ev.name.lower():
            continue
        start, dur = ev.time_range.start, ev.time_range.elapsed_us()
        per[ev.name] += dur / steps
        first = start if first is None else min(first, start)
        last = start + dur if last is None else max(last, start + dur)
    return {"kernels_us": dict(sorted(per.items(), key=lambda kv: -kv[1])),
            "kernel_sum_us": sum(per.values()), "span_us": ((last - first) / steps) if per else 0.0}


def profile_row(model_name: str, batch: int, steps: int) -> dict:
    import torch
    import torch.nn.functional as F  # noqa: F401  (TorchGraphStep's loss)
    from torch.profiler import ProfilerActivity, profile

    import hetnet as hn
    from hetnet import zoo
    from hetnet.bench.common import TorchGraphStep, torch_flags
    from hetnet.interop import to_torch
    from hetnet.optim import SGD

    torch_flags(False)
    torch.backends.cudnn.benchmark = True
    shape = zoo.PRESETS[model_name].input_shape
    rng = np.random.default_rng(1)
    x_np = rng.standard_normal((batch, *shape)).astype(np.float32)
    y_np = rng.integers(0, 10, size=batch)
    hn.seed(0)
    model = zoo.build(model_name).to("cuda")
    be = model.backend
    step = be.make_train_step(model, SGD(model.parameters(), lr=LR, momentum=MOMENTUM), None, 0.0)
    hx, hy = be.asarray(x_np), be.labels(y_np)
    hn.seed(0)
    tmodel = to_torch(zoo.build(model_name), device="cuda")
    tx, ty = torch.from_numpy(x_np).cuda(), torch.from_numpy(y_np.astype(np.int64)).cuda()
    tstep = TorchGraphStep(tmodel, torch.optim.SGD(tmodel.parameters(), lr=LR, momentum=MOMENTUM), tx, ty)
    for _ in range(10):
        step.step(hx, hy)
        tstep.step()
    step.collect()
    torch.cuda.synchronize()
    out = {"model": model_name, "batch_size": batch, "steps": steps}
    for side, fn in (("hetnet", lambda: step.step(hx, hy)), ("torch_graph", tstep.step)):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                fn()
            be.synchronize()
            torch.cuda.synchronize()
        out[side] = _kernels(prof, steps)
    step.collect()
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    from hetnet.backends.cuda import describe

    info = describe()
    rows = []
    for spec in args.rows:
        name, _, b = spec.partition(":")
        r = profile_row(name, int(b), args.steps)
        rows.append(r)
        print(f"\n{name} batch {b}: GPU time per step, kernels summed / first kernel start to last kernel end")
        for side in ("hetnet", "torch_graph"):
            s = r[side]
            print(f"  {side:12s} {s['kernel_sum_us']:8.1f} us in {len(s['kernels_us'])} kernels / span "
                  f"{s['span_us']:8.1f} us")
            for k, us in list(s["kernels_us"].items())[:args.top]:
                print(f"      {us:8.1f} us  {k[:100]}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"gpu": info["devices"][0]["name"] if info.get("devices") else None,
                       "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
