"""Where the time of one fast training step goes: per-node CUDA-event times of the fused plan (no graph, so each
node's kernels run back to back), and an NVTX range "prof" around one step for Nsight Compute.

    PYTHONPATH=src python benchmarks/kernels/profile_step.py --model fashion-cnn --batch 32
    export HETNET_CACHE_DIR=/tmp/hc         # the choices of a run without ncu, read by the run under it
    python benchmarks/kernels/profile_step.py --model thesis-m1 --batch 1024 --quiet
    ncu --profile-from-start off --metrics gpu__time_duration.sum --csv \\
        python benchmarks/kernels/profile_step.py --model thesis-m1 --batch 1024 --quiet
    ncu --profile-from-start off --clock-control none --cache-control none \\
        --section SpeedOfLight --section WarpStateStats --print-details all -k regex:conv16 \\
        python benchmarks/kernels/profile_step.py --model cifar-speed --batch 1024 --quiet
    ncu --profile-from-start off --metrics gpu__time_duration.sum --csv \\
        python benchmarks/kernels/profile_step.py --model cifar-wide --batch 512 --precision bf16 --torch --quiet

--torch: PyTorch's step of the same model instead (interop.to_torch of hetnet's, SGD with momentum, eager), as
`hetnet bench` runs it at that precision (bf16: autocast + channels_last; tf32: the allow_tf32 switches;
cudnn.benchmark on), one step in the profiler range after three: which cuDNN and cuBLAS kernels it runs.
--torch-compile: the same with the model compiled as `hetnet bench --torch-compile` compiles it (bench.sides
.TorchCompileStep: inductor's kernels and CUDA graphs; its autotuning runs under ncu too, so its choices may differ
from an unprofiled run's, and the compile under ncu took more than 250 s for cifar-wide at 1024). Without --quiet
(and without ncu) either PyTorch step then prints its kernels' time a step over --reps steps from torch.profiler,
largest first (--json: written there); under ncu pass --quiet (ncu and torch.profiler both hook CUPTI).

(--clock-control none: the card's own clocks; --cache-control none: the L2 as the step leaves it, where ncu would
flush it before each kernel; the whitening layer of cifar-speed is filled from the random images.
The convolutions' algorithms are measured on first use (hetnet.backends.cuda.tune_cache). Measured under ncu, which
intercepts every launch, candidates of several launches lose to one-launch ones that a timed step never picks: run
the step once without ncu first, so that the run under it reads those choices from the cache folder.)
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="thesis-m1", help="a preset, or a bench spec (cifar-wide, or SPEC.json)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--precision", default=None, choices=("fp32", "tf32", "bf16"),
                    help="default: the preset's own (fp32 where it names none)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--quiet", action="store_true", help="only the NVTX-marked step (for ncu)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--torch", action="store_true", help="PyTorch's step of the model instead, for ncu")
    ap.add_argument("--torch-compile", action="store_true",
                    help="PyTorch's step (as --torch) of torch.compile(mode='max-autotune')'s model (minutes)")
    args = ap.parse_args(argv)
    if args.torch or args.torch_compile:
        return torch_step(args)

    import cupy

    import hetnet as hn
    from hetnet import zoo
    from hetnet.bench.common import environment, write_result
    from hetnet.bench.models import resolve_model
    from hetnet.optim import SGD
    from hetnet.train import make_train_step

    hn.seed(0)
    precision = args.precision or getattr(zoo.PRESETS.get(args.model), "precision", None) or "fp32"
    model, input_shape = resolve_model(args.model)       # a preset, or a bench spec ("cifar-wide")
    model = model.to("cuda", precision=precision)
    be = model.backend
    step = make_train_step(model, SGD(model.parameters(), lr=0.01, momentum=0.9))
    step.runner.use_graph = False
    rng = np.random.default_rng(0)
    images = rng.normal(size=(args.batch, *input_shape)).astype(np.float32)
    hn.init.data_init(model, images)        # a whitening first layer (cifar-speed) is filled from images first
    x = be.asarray(images)
    y = be.labels(rng.integers(0, 10, size=args.batch))
    for _ in range(3):
        step.step(x, y)
    cupy.cuda.runtime.deviceSynchronize()
    cupy.cuda.profiler.start()          # for `ncu --profile-from-start off`
    cupy.cuda.nvtx.RangePush("prof")
    step.step(x, y)
    cupy.cuda.runtime.deviceSynchronize()
    cupy.cuda.nvtx.RangePop()
    cupy.cuda.profiler.stop()
    if args.quiet:
        return

    # per-node times: wrap each node's fwd/bwd with events on the step's stream
    times: dict[str, list] = {}

    def wrap(node, name, kind):
        orig = getattr(node, kind)

        def timed(*a, **k):
            s, e = cupy.cuda.Event(), cupy.cuda.Event()
            s.record(step.runner.stream)
            out = orig(*a, **k)
            e.record(step.runner.stream)
            times.setdefault(f"{name} {kind}", []).append((s, e))
            return out

        setattr(node, kind, timed)

    for i, node in enumerate(model.plan.nodes):
        name = f"{i}:{type(node).__name__.strip('_')}"
        wrap(node, name, "forward")
        wrap(node, name, "backward")
    s_all, e_all = cupy.cuda.Event(), cupy.cuda.Event()
    s_all.record(step.runner.stream)
    for _ in range(args.reps):
        step.step(x, y)
    e_all.record(step.runner.stream)
    e_all.synchronize()
    total = cupy.cuda.get_elapsed_time(s_all, e_all) / args.reps
    rows = {k: float(np.median([cupy.cuda.get_elapsed_time(s, e) for s, e in v])) * 1000 for k, v in times.items()}
    print(f"{args.model} batch {args.batch} {precision}, eager plan, {be.gpu_name}: {total * 1000:.1f} us/step "
          f"(nodes below; the rest is loss, zeroing, update and launch gaps)")
    for k, v in sorted(rows.items(), key=lambda kv: -kv[1]):
        print(f"  {k:<28} {v:8.1f} us")
    if args.json:
        write_result(Path(args.json), {"environment": environment(1, True), "model": args.model, "batch": args.batch,
                                       "precision": precision,
                                       "us_per_step": total * 1000, "nodes_us": rows,
                                       "conv_choices": {f"{e['op']} {e['shape']}": e["choice"] for e in be.tune_log},
                                       "conv_trials": be.tune_log})


def torch_step(args) -> None:
    """One PyTorch training step of args.model in a profiler range, at the precision as `hetnet bench`'s torch side
    runs it (hetnet.bench.sides), after three uncaptured ones (cuDNN's algorithm search); args.torch_compile: of
    the compiled model."""
    import torch
    import torch.nn.functional as F

    import hetnet as hn
    from hetnet import interop
    from hetnet.bench.models import resolve_model
    from hetnet.bench.sides import TorchCompileStep, autocast_for, for_precision, torch_precision

    hn.seed(0)
    precision = args.precision or "fp32"
    model, input_shape = resolve_model(args.model)
    torch_precision(precision)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(args.batch, *input_shape)).astype(np.float32)).cuda()
    y = torch.from_numpy(rng.integers(0, 10, size=args.batch)).cuda()
    tmodel, x = for_precision(interop.to_torch(model, device="cuda"), x, precision)
    opt = torch.optim.SGD(tmodel.parameters(), lr=0.01, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast_for(precision, "cuda"):
            loss = F.cross_entropy(tmodel(x), y)
        loss.backward()
        opt.step()

    if args.torch_compile:                 # its three warm-up steps compile and autotune
        step = TorchCompileStep(tmodel, opt, x, y, precision).step
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    step()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    if args.quiet:
        return
    # the kernels of args.reps steps through torch.profiler (CUPTI): no ncu around the compile and its autotuning
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.reps):
            step()
        torch.cuda.synchronize()
    kernels = kernel_times(prof.events(), args.reps)
    print(f"{args.model} batch {args.batch} {precision}, PyTorch{' torch.compile' if args.torch_compile else ''}: "
          f"{sum(kernels.values()):.1f} us of kernels a step")
    for name, us in sorted(kernels.items(), key=lambda kv: -kv[1]):
        print(f"  {us:9.1f} us  {name}")
    if args.json:
        from hetnet.bench.common import environment, write_result
        write_result(Path(args.json), {"environment": environment(1, True), "model": args.model, "batch": args.batch,
                                       "precision": precision, "torch_compile": bool(args.torch_compile),
                                       "kernels_us_per_step": kernels})


def kernel_times(events, steps: int) -> dict[str, float]:
    """{kernel name (first 100 characters): microseconds a step} summed over torch.profiler's device events of
    `steps` steps."""
    out: dict[str, float] = {}
    for e in events:
        if e.device_type.name == "CUDA":
            out[e.name[:100]] = out.get(e.name[:100], 0.0) + e.time_range.elapsed_us() / steps
    return out


if __name__ == "__main__":
    main()
