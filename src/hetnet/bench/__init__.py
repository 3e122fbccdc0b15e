"""`hetnet bench`: hetnet against PyTorch on the same model, weights, inputs and machine, checked before timed.

Three tables, each written to --out as JSON (the record) and markdown (to read), plus one chart:

- train_step.json / .md / speedup.png: for each model x batch size x hetnet backend, one SGD+momentum training step
  (forward, softmax cross-entropy, backward, update) and one inference pass, against PyTorch on the same device
  (CPU with the same thread count; on a GPU: eager and the whole step captured as a CUDA graph), float32 with TF32 off
  on both sides (plus one TF32 row on the GPU). Before timing, the logits, the loss, every parameter gradient
  and the update made by the timed step must agree with PyTorch's within the float32 tolerance; a row that does not
  is refused (kept in the JSON with its reason, never timed).
- layers.json / .md (--layers): thesis-m4's layers at batch 32, hetnet's kernels vs PyTorch's (cuDNN/cuBLAS on a
  GPU), with achieved GFLOP/s or GB/s beside this machine's measured GEMM and copy ceilings.
- thesis_epochs.json / .md (--thesis-epochs): seconds per training epoch of thesis models 0-4 on 1000/1000/1000/
  2000/2500 CIFAR-10 images, every backend and PyTorch, beside the thesis's own figures.

    hetnet bench --quick                                  # a minute on a laptop: 3 models, batch 32 and 128
    hetnet bench --devices cpu,reference --out benchmarks/results/$(hostname)
    hetnet bench --devices cuda --out DIR                 # on a GPU machine: all three tables, about 6 minutes

Timing: median over repetitions after warm-up; sides alternate within each repetition so that drift in a shared
machine's load falls on both. CPU: time.perf_counter per step. GPU: CUDA events around blocks of steps (block >= 10
ms), synchronized. Peak memory, CPU: the rise of the process's resident-set high-water mark (VmHWM, reset through
/proc/self/clear_refs) over the RSS just before the side's model is built, through one training step and one
inference pass; glibc is told to return large blocks to the system so that one side's freed memory does not hide
the next side's. GPU: hetnet, bytes held by CuPy's memory pool (freed before, so it is the pool's high-water mark);
PyTorch, torch.cuda.max_memory_allocated over the same span.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from .. import zoo
from ..device import cuda_available, parse_device
from ..errors import DeviceError, UsageError
from .common import (
    RTOL_F32,
    RTOL_TF32,
    cpu_count,
    environment,
    parse_list,
    slug,
    threads_text,
)
from .layers import bench_layers, run_layers
from .thesis import CIFAR_TAR, THESIS_EPOCHS, run_thesis_epochs
from .train_step import (
    BATCHES,
    MODELS,
    QUICK_BATCHES,
    QUICK_MODELS,
    REFERENCE_ROWS,
    TF32_ROW,
    bench_train_step,
    run_train_step,
)

__all__ = ["main", "parse_args", "build_parser", "bench_train_step", "bench_layers", "run_train_step", "run_layers",
           "run_thesis_epochs", "RTOL_F32", "RTOL_TF32"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hetnet bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None, help=f"comma-separated presets (default: {','.join(MODELS)})")
    p.add_argument("--batch-sizes", default=None, help="comma-separated (default: 32,128,1024)")
    p.add_argument("--devices", default=None,
                   help="comma-separated hetnet backends (default: cuda when a GPU is usable, cpu, reference)")
    p.add_argument("--out", default=None,
                   help="folder for the results (default: benchmarks/results/<GPU card or host name>)")
    p.add_argument("--repeats", type=int, default=None, help="most timed repetitions per side (default 30; quick 8)")
    p.add_argument("--block-ms", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per side before timing (default 3)")
    p.add_argument("--side-seconds", type=float, default=None,
                   help="about how long each side of a row is timed (default 4 on CPU, 1 on GPU; quick 1)")
    p.add_argument("--quick", action="store_true",
                   help=f"models {','.join(QUICK_MODELS)}, batches 32,128, few repetitions")
    p.add_argument("--layers", action="store_true", default=None,
                   help="also the per-layer table (layers.json / .md); on by default when cuda is among --devices")
    p.add_argument("--layer-batch", type=int, default=32, help=argparse.SUPPRESS)
    p.add_argument("--thesis-epochs", action="store_true", default=None,
                   help="also the thesis's epoch timings (thesis_epochs.*); on by default when cuda is among --devices")
    p.add_argument("--thesis-models", default=",".join(m for m, _ in THESIS_EPOCHS), help=argparse.SUPPRESS)
    p.add_argument("--cifar-tar", default=None, help=f"path of {CIFAR_TAR} for --thesis-epochs")
    p.add_argument("--reference-epoch-steps", type=int, default=8, help=argparse.SUPPRESS)
    p.add_argument("--tf32-row", action="store_true", default=None,
                   help=f"also one TF32 row on the GPU ({TF32_ROW[0]}, batch {TF32_ROW[1]}); on by default with cuda")
    p.add_argument("--all", action="store_true", help="--layers --thesis-epochs --tf32-row")
    p.add_argument("--no-extras", action="store_true",
                   help="the train-step table only, also on a GPU (the GPU's default adds the three tables above)")
    p.add_argument("--no-train-step", action="store_true", help="skip the train-step table")
    p.add_argument("--reference-rows", default=",".join(REFERENCE_ROWS),
                   help="MODEL:BATCH pairs at which the slow float64 reference backend is timed")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for PyTorch and hetnet's cpu backend (default: the CPUs this process may use)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds after which remaining rows are skipped (default: 330 with cuda, none otherwise)")
    return p


def _positive_ints(text: str, flag: str) -> list[int]:
    out = []
    for t in parse_list(text, flag):
        try:
            v = int(t)
        except ValueError:
            raise UsageError(f"{flag}: expected positive integers, got {t!r}") from None
        if v < 1:
            raise UsageError(f"{flag}: expected positive integers, got {v}")
        out.append(v)
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    args.models = (parse_list(args.models, "--models") if args.models
                   else list(QUICK_MODELS if args.quick else MODELS))
    for m in args.models:
        if m not in zoo.PRESETS:
            raise UsageError(f"--models: unknown model {m!r} (presets: {', '.join(zoo.PRESETS)})")
    args.thesis_models = parse_list(args.thesis_models, "--thesis-models")
    args.batch_sizes = (_positive_ints(args.batch_sizes, "--batch-sizes") if args.batch_sizes
                        else list(QUICK_BATCHES if args.quick else BATCHES))
    if args.devices:
        args.devices = parse_list(args.devices, "--devices")
        for d in args.devices:
            try:
                parse_device(d)
            except DeviceError as e:
                raise UsageError(f"--devices: {e}") from None
    else:
        args.devices = (["cuda"] if cuda_available() else []) + ["cpu", "reference"]
    # GPU rows first, so that a time budget spent on slow CPU rows never costs the GPU's
    args.devices.sort(key=lambda d: {"cuda": 0, "cpu": 1, "reference": 2}[parse_device(d)[0]])
    gpu = any(d.startswith("cuda") for d in args.devices)
    # GPU time is the scarce kind: a plain `hetnet bench --devices cuda` measures everything in one go
    for extra in ("layers", "thesis_epochs", "tf32_row"):
        if args.all:
            setattr(args, extra, True)
        elif getattr(args, extra) is None:
            setattr(args, extra, gpu and not args.quick and not args.no_extras)
    if args.repeats is None:
        args.repeats = 8 if args.quick else 30
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads: expected a positive integer, got {args.threads}")
    if args.repeats < 1:
        raise UsageError(f"--repeats: expected a positive integer, got {args.repeats}")
    if args.side_seconds is None:
        args.side_seconds = 1.0 if (args.quick or gpu) else 4.0
    if args.time_budget is None:
        args.time_budget = 330.0 if gpu else 0.0
    args.reference_rows = parse_list(args.reference_rows, "--reference-rows") if args.reference_rows else []
    return args


def main(argv: list[str] | None = None) -> int:
    """`hetnet bench ARGS`; returns the exit status (0 when every section ran, even with refused rows)."""
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        import torch
    except ImportError:
        raise UsageError("hetnet bench: PyTorch is the peer every number is measured against and is not installed "
                         "(pip install 'hetnet[bench]')") from None
    threads = args.threads or cpu_count()
    torch.set_num_threads(threads)
    hetnet_threads = None
    try:  # the cpu backend's own pool (hetnet.backends._cpu_threads), when it has one
        from ..backends.cpu import threads as _cpu_threads

        if args.threads:
            _cpu_threads.set_threads(threads)
            if getattr(_cpu_threads, "_blas_set", None) is not None:
                _cpu_threads._blas_set(threads)  # OpenBLAS's own count, for GEMMs outside hetnet's pool
        hetnet_threads = _cpu_threads.threads()
    except (ImportError, AttributeError):
        pass
    gpu = any(d.startswith("cuda") for d in args.devices)
    env = environment(threads, gpu)
    env["hetnet_cpu_threads"] = hetnet_threads
    out = Path(args.out) if args.out else Path("benchmarks") / "results" / slug(env.get("card") or env["host"])
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out: cannot create {out}: {e.strerror}") from None
    deadline = time.monotonic() + args.time_budget if args.time_budget > 0 else math.inf
    print(f"hetnet bench: {env.get('card') or env['host']} ({env['cpu']}, {threads_text(threads)}), devices "
          f"{','.join(args.devices)} -> {out}", flush=True)
    if not args.no_train_step:
        print("train step:", flush=True)
        run_train_step(args, args.devices, env, out, deadline)
    if args.layers and time.monotonic() <= deadline:
        print(f"layers (thesis-m4, batch {args.layer_batch}):", flush=True)
        run_layers(args, args.devices, env, out)
    if args.thesis_epochs:
        print("thesis epochs:", flush=True)
        run_thesis_epochs(args, args.devices, env, out, deadline)
    print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
