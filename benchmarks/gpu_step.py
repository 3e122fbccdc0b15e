"""hetnet `cuda` backend vs PyTorch on the same GPU: ms per SGD+momentum training step (forward, softmax
cross-entropy, backward, update), same model, weights and batch, float32 with TF32 off on both sides,
torch.backends.cudnn.benchmark=True. Sides, all measured in the same run on the same card:

  hetnet graph   the fast step (backend.make_train_step), whole step captured as a CUDA graph (the default)
  hetnet eager   the same fused plan without the graph (HETNET_CUDA_GRAPH=0)
  torch eager    model(x); F.cross_entropy; backward; optimizer.step()
  torch graph    the same step captured whole with torch.cuda.graph and replayed (PyTorch's fastest mode here)

Timing: CUDA events around `--steps` consecutive steps on the stream the side runs on, after `--warmup` steps;
median of `--reps` such runs. Peak memory, steady state (after the warm-up): torch.cuda.max_memory_allocated over
the timed steps for torch; for hetnet the bytes CuPy's default pool holds (emptied of cached blocks after the
warm-up) plus the private pool of the captured graphs.
Before timing, the first forward pass is checked to give the same logits on both sides.

    PYTHONPATH=src python benchmarks/gpu_step.py --out /tmp/gpu_step.json
    PYTHONPATH=src python benchmarks/gpu_step.py --rows thesis-m1:32 --steps 50
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np

DEFAULT_ROWS = ("thesis-m1:32", "thesis-m1:128", "thesis-m1:1024",
                "fashion-cnn:32", "fashion-cnn:128", "fashion-cnn:1024")
LR, MOMENTUM = 0.01, 0.9


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS), help="MODEL:BATCH pairs (zoo presets)")
    ap.add_argument("--steps", type=int, default=100, help="steps per timed run")
    ap.add_argument("--reps", type=int, default=5, help="timed runs per side (median reported)")
    ap.add_argument("--warmup", type=int, default=20, help="untimed steps per side first")
    ap.add_argument("--sides", nargs="+", default=["hetnet-graph", "hetnet-eager", "torch-eager", "torch-graph"])
    ap.add_argument("--out", default=None, help="JSON file to write")
    return ap.parse_args(argv)


def time_side(fn, clock, steps, reps, warmup, after_warmup=None):
    """Median ms per step of `fn()` (one step): `reps` runs of `steps` consecutive steps, each timed by `clock`
    (hetnet.bench.common.Clock: CUDA events on the side's stream), after `warmup` untimed steps."""
    for _ in range(warmup):
        fn()
    clock.sync()
    if after_warmup is not None:
        after_warmup()
    out = [clock(fn, steps) * 1e3 for _ in range(reps)]
    return statistics.median(out), out


def hetnet_side(name, batch, x_np, y_np, use_graph, steps, reps, warmup):
    import cupy

    import hetnet as hn
    from hetnet import zoo
    from hetnet.bench.common import Clock
    from hetnet.optim import SGD

    cupy.get_default_memory_pool().free_all_blocks()
    hn.seed(0)
    model = zoo.build(name).to("cuda")
    be = model.backend
    opt = SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    be.fresh_step_pool()            # the step pool is shared per device: count this model's only
    step = be.make_train_step(model, opt, None, 0.0)
    step.use_graph = use_graph
    x, y = be.asarray(x_np), be.labels(y_np)
    pool = cupy.get_default_memory_pool()
    ms, runs = time_side(lambda: step.step(x, y), Clock("cupy", be, step.stream), steps, reps, warmup,
                         pool.free_all_blocks)
    step.collect()
    # steady state: what the default pool holds (parameters, gradients, optimizer state, batch, and in eager mode
    # the cached activations) plus the private pool of the captured graphs
    mem = pool.total_bytes() + (step.pool.total_bytes() if use_graph else 0)
    choices = {f"{e['op']} {e['shape']}": e["choice"] for e in be.tune_log}
    return {"ms": ms, "runs_ms": runs, "peak_bytes": int(mem), "conv_choices": choices}


def torch_side(name, batch, x_np, y_np, use_graph, steps, reps, warmup):
    import torch
    import torch.nn.functional as F

    import hetnet as hn
    from hetnet import zoo
    from hetnet.bench.common import Clock, TorchGraphStep
    from hetnet.interop import to_torch

    hn.seed(0)
    tmodel = to_torch(zoo.build(name), device="cuda")
    opt = torch.optim.SGD(tmodel.parameters(), lr=LR, momentum=MOMENTUM)
    x = torch.from_numpy(x_np).cuda()
    y = torch.from_numpy(y_np.astype(np.int64)).cuda()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()

    def eager():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(tmodel(x), y)
        loss.backward()
        opt.step()

    fn = TorchGraphStep(tmodel, opt, x, y).step if use_graph else eager
    ms, runs = time_side(fn, Clock("torch"), steps, reps, warmup, torch.cuda.reset_peak_memory_stats)
    mem = torch.cuda.max_memory_allocated()   # steady state: peak over the timed steps
    return {"ms": ms, "runs_ms": runs, "peak_bytes": int(mem)}


def check_same_logits(name, x_np):
    import torch

    import hetnet as hn
    from hetnet import zoo
    from hetnet.interop import to_torch

    hn.seed(0)
    model = zoo.build(name)
    tmodel = to_torch(model, device="cuda")
    model.to("cuda").eval()
    tmodel.eval()
    a = model.backend.to_numpy(model.forward(model.backend.asarray(x_np))).astype(np.float64)
    with torch.no_grad():
        b = tmodel(torch.from_numpy(x_np).cuda()).cpu().double().numpy()
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def versions():
    import cupy
    import torch

    from hetnet.backends.cuda import describe

    info = describe()
    dev = info.get("devices", [{}])[0]
    return {"card": dev.get("name"), "memory_gib": dev.get("memory_total_gib"), "cupy": cupy.__version__,
            "cuda_runtime": info.get("cuda_runtime"), "cuda_driver": info.get("cuda_driver"),
            "torch": torch.__version__, "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "python": platform.python_version(), "numpy": np.__version__}


def main(argv=None):
    args = parse_args(argv)
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    from hetnet import zoo

    meta = versions()
    meta.update({"tf32": False, "cudnn_benchmark": True, "optimizer": f"SGD lr={LR} momentum={MOMENTUM}",
                 "steps": args.steps, "reps": args.reps, "warmup": args.warmup,
                 "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    rows = []
    for spec in args.rows:
        name, batch = spec.split(":")
        batch = int(batch)
        rng = np.random.default_rng(batch)
        shape = zoo.PRESETS[name].input_shape
        x_np = rng.normal(size=(batch, *shape)).astype(np.float32)
        y_np = rng.integers(0, 10, size=batch).astype(np.int32)
        row = {"model": name, "batch": batch, "logits_rel_err": check_same_logits(name, x_np[:8])}
        for side in args.sides:
            lib, mode = side.split("-")
            fn = hetnet_side if lib == "hetnet" else torch_side
            try:
                row[side] = fn(name, batch, x_np, y_np, mode == "graph", args.steps, args.reps, args.warmup)
            except Exception as e:  # noqa: BLE001 - report and go on with the other sides
                row[side] = {"error": f"{type(e).__name__}: {e}"[:300]}
            print(f"{name} b{batch} {side}: {row[side].get('ms', row[side].get('error'))}", flush=True)
        rows.append(row)
    result = {"meta": meta, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print_table(result)
    return result


def print_table(result):
    m = result["meta"]
    print(f"\n{m['card']} | torch {m['torch']} cuDNN {m['cudnn']} | CuPy {m['cupy']} CUDA {m['cuda_runtime']} | "
          f"fp32, TF32 off | ms/step (median) and peak MiB")
    head = f"{'model':<12}{'batch':>6} {'het-graph':>10}{'het-eager':>10}{'pt-eager':>10}{'pt-graph':>10}" \
           f"{'vs eager':>9}{'vs graph':>9}{'MiB het':>9}{'MiB pt':>8}"
    print(head)
    for r in result["rows"]:
        hg, he, te, tg = (r.get(side, {}).get("ms", float("nan"))
                          for side in ("hetnet-graph", "hetnet-eager", "torch-eager", "torch-graph"))
        mh = r.get("hetnet-graph", {}).get("peak_bytes", 0) / 2**20
        mt = max(r.get("torch-eager", {}).get("peak_bytes", 0), r.get("torch-graph", {}).get("peak_bytes", 0)) / 2**20
        print(f"{r['model']:<12}{r['batch']:>6} {hg:>10.3f}{he:>10.3f}{te:>10.3f}{tg:>10.3f}"
              f"{te / hg:>8.2f}x{tg / hg:>8.2f}x{mh:>9.1f}{mt:>8.1f}")


if __name__ == "__main__":
    main()
