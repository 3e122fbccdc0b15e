"""`hetnet bench`: hetnet against PyTorch on the same model, weights, inputs and machine, checked before timed.

The one benchmark harness: every script in benchmarks/ is a flag of it or a thin wrapper over it. Each table is
written to --out (default benchmarks/results/<card or host>/) as JSON (the record: machine, hetnet's commit, the
date, the method, every row) and markdown (to read):

- train_step.json / .md / speedup.png: for each model x batch size x hetnet backend, one SGD+momentum training step
  (forward, softmax cross-entropy, backward, update) and one inference pass, against PyTorch on the same device
  (CPU with the same thread count; on a GPU: eager and the whole step captured as a CUDA graph), float32 with TF32 off
  on both sides (plus one TF32 row on the GPU). Before timing, the logits, the loss, every parameter gradient
  and the update made by the timed step must agree with PyTorch's within the float32 tolerance; a row that does not
  is refused (kept in the JSON with its reason, never timed). --layer-by-layer adds hetnet through model.forward /
  model.backward, layer after layer.
- precision_step.json / .md (--precision fp32,tf32,bf16): the same step per precision, PyTorch as its users run
  that precision (TF32 switches; bf16 autocast + channels_last), captured as a CUDA graph, optionally compiled
  (--torch-compile), with hetnet's achieved TFLOP/s and both sides' peak memory.
- layers.json / .md (--layers): a model's layers (thesis-m4 at batch 32 by default), hetnet's kernels vs PyTorch's
  (cuDNN/cuBLAS on a GPU), with achieved GFLOP/s or GB/s beside this machine's measured GEMM and copy ceilings;
  with --precision, precision_layers.json / .md: each convolution (cifar-wide at batch 512 by default) per
  precision, forward, data and filter gradient, against cuDNN.
- thesis_epochs.json / .md (--thesis-epochs): seconds per training epoch of thesis models 0-4 on 1000/1000/1000/
  2000/2500 CIFAR-10 images, every backend and PyTorch, beside the thesis's own figures.
- loader_epochs.json / .md (--loader-epochs): whole epochs with the host loader and with the data set kept on the
  device, against the step alone.
- profile.json / .txt (--profile, GPU): every kernel of hetnet's step and PyTorch's captured step.
- cifar_speedrun.json / .md (--cifar-speedrun, GPU): the peer run -- airbench94 (PyPI airbench 0.1.8, unmodified) and
  the cifar-speed preset on the same card, decoded images and held-out split, 5 runs each, timed as airbench times
  itself, and the wall time of the whole `hetnet train` command (hetnet.bench.speedrun says how).

    hetnet bench --quick                                  # a minute on a laptop: 3 models, batch 32 and 128
    hetnet bench --devices cpu,reference --out benchmarks/results/$(hostname)
    hetnet bench --devices cuda --out DIR                 # on a GPU machine: train step, layers, thesis epochs
    hetnet bench --devices cuda --precision fp32,tf32,bf16 --no-extras
    hetnet bench --devices cuda --no-train-step --layers --model cifar-wide --precision fp32,tf32,bf16
    hetnet bench --cifar-speedrun --cifar-tar ../shared/datasets/cifar10-jpg-train.tar.gz

Models: zoo presets, spec files, or the names of specs in benchmarks/specs/ (cifar-wide, fashion-2conv).

Timing: median over repetitions after warm-up; sides alternate within each repetition so that drift in a shared
machine's load falls on both. CPU: time.perf_counter around blocks of steps, each block after untimed settling
steps. GPU: CUDA events around blocks of steps (block >= 10 ms), synchronized. Peak memory, CPU: the rise of the
process's resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs) over the RSS just before the
side's model is built; GPU: hetnet, bytes held by CuPy's memory pools (their high-water mark); PyTorch,
torch.cuda.max_memory_allocated over the same span.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

from ..backends.cpu import threads as _cpu_threads
from ..device import cuda_available, parse_device
from ..errors import DeviceError, UsageError
from ..train import check_epochs
from . import readme
from .common import (
    PRECISIONS,
    RTOL_F32,
    RTOL_PRECISION,
    RTOL_TF32,
    cpu_count,
    environment,
    parse_list,
    slug,
    threads_text,
)
from .layers import PRECISION_LAYER_MODEL, bench_conv_precision, bench_layers, run_conv_precision, run_layers
from .loaders import LOADER_ROWS, run_loader_epochs
from .models import check_model, model_label
from .precision import (PRECISION_BATCHES, PRECISION_MODELS, bench_precision_step, check_merge_card, load_merge,
                        run_precision_step)
from .profile import PROFILE_ROWS, run_profile
from .speedrun import RUNS as SPEEDRUN_RUNS
from .speedrun import run_speedrun
from .thesis import CIFAR_TAR, THESIS_EPOCHS, find_cifar_tar, run_thesis_epochs
from .train_step import (
    BATCHES,
    MODELS,
    QUICK_BATCHES,
    QUICK_MODELS,
    REFERENCE_ROWS,
    TF32_ROW,
    bench_train_step,
    run_train_step,
    section_rows,
)

__all__ = ["main", "parse_args", "build_parser", "bench_train_step", "bench_precision_step", "bench_layers",
           "bench_conv_precision", "run_train_step", "run_precision_step", "run_layers", "run_conv_precision",
           "run_thesis_epochs", "run_loader_epochs", "run_profile", "RTOL_F32", "RTOL_TF32", "RTOL_PRECISION"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hetnet bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", "--model", default=None,
                   help=f"comma-separated presets, spec files or names in benchmarks/specs/ (default: "
                        f"{','.join(MODELS)}; with --precision {','.join(PRECISION_MODELS)})")
    p.add_argument("--batch-sizes", default=None,
                   help=f"comma-separated (default: {','.join(map(str, BATCHES))}; with --precision "
                        f"{','.join(map(str, PRECISION_BATCHES))})")
    p.add_argument("--rows", default=None,
                   help="comma-separated MODEL:BATCH pairs, instead of --models x --batch-sizes")
    p.add_argument("--devices", default=None,
                   help="comma-separated hetnet backends (default: cuda when a GPU is usable, cpu, reference)")
    p.add_argument("--precision", default=None,
                   help=f"comma-separated, of {','.join(PRECISIONS)}: the precision tables instead of the float32 "
                        "ones (precision_step.*; with --layers precision_layers.*); with --cifar-speedrun, one: "
                        "hetnet's side's")
    p.add_argument("--torch-compile", action="store_true",
                   help="precision rows: also torch.compile(mode='max-autotune') of PyTorch's step (minutes per row)")
    p.add_argument("--merge", metavar="FILE",
                   help="precision rows: keep FILE's rows (a precision_step.json) that this run does not measure, "
                        "each with the commit and time it was measured at, in the written table")
    p.add_argument("--out", default=None,
                   help="folder for the results (default: benchmarks/results/<GPU card or host name>)")
    p.add_argument("--repeats", type=int, default=None, help="most timed repetitions per side (default 30; quick 8)")
    p.add_argument("--block-ms", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per side before timing (default 3)")
    p.add_argument("--side-seconds", type=float, default=None,
                   help="about how long each side of a row is timed (default 4 on CPU, 1 on GPU; quick 1)")
    p.add_argument("--quick", action="store_true",
                   help=f"models {','.join(QUICK_MODELS)}, batches {','.join(map(str, QUICK_BATCHES))}, few "
                        "repetitions")
    p.add_argument("--no-graph", action="store_true",
                   help="hetnet's cuda step without CUDA-graph capture (HETNET_CUDA_GRAPH=0, as hetnet train's)")
    p.add_argument("--layer-by-layer", action="store_true",
                   help="train-step rows: also hetnet through model.forward / model.backward, layer after layer")
    p.add_argument("--quiet-wait", type=float, default=0.0,
                   help="CPU rows: wait up to this many seconds for other processes to leave the CPUs idle")
    p.add_argument("--layers", action="store_true", default=None,
                   help="also the per-layer table (layers.* or, with --precision, precision_layers.*); on by "
                        "default when cuda is among --devices")
    p.add_argument("--layer-batch", type=int, default=None,
                   help="batch of the per-layer table (default 32; with --precision 512)")
    p.add_argument("--thesis-epochs", action="store_true", default=None,
                   help="also the thesis's epoch timings (thesis_epochs.*); on by default when cuda is among --devices")
    p.add_argument("--thesis-models", default=",".join(m for m, _ in THESIS_EPOCHS), help=argparse.SUPPRESS)
    p.add_argument("--cifar-tar", default=None, help=f"path of {CIFAR_TAR} for --thesis-epochs and --cifar-speedrun")
    p.add_argument("--cifar-speedrun", action="store_true",
                   help="only the CIFAR-10 peer run: airbench94 and the cifar-speed preset, same card, images and "
                        "split (cifar_speedrun.*; the first of --devices, cuda where there is one)")
    p.add_argument("--speedrun-runs", type=int, default=SPEEDRUN_RUNS,
                   help=f"--cifar-speedrun: runs of each side (default {SPEEDRUN_RUNS})")
    p.add_argument("--speedrun-epochs", type=float, default=None, help="--cifar-speedrun: epochs of hetnet's runs, "
                                                                       "whole or fractional (default: the preset's; "
                                                                       "smoke runs)")
    p.add_argument("--speedrun-limit", type=int, default=None,
                   help="--cifar-speedrun: train on the first N training images only (smoke runs)")
    p.add_argument("--reference-epoch-steps", type=int, default=8, help=argparse.SUPPRESS)
    p.add_argument("--loader-epochs", action="store_true",
                   help="also whole epochs, host loader vs data set on the device (loader_epochs.*; default rows "
                        + ",".join(f"{m}:{b}" for m, b in LOADER_ROWS) + ")")
    p.add_argument("--epochs", type=int, default=3, help="--loader-epochs: timed epochs per loader (default 3)")
    p.add_argument("--loader-images", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--profile", action="store_true",
                   help="also every kernel of both captured steps, GPU (profile.*; default rows "
                        + ",".join(f"{m}:{b}" for m, b in PROFILE_ROWS) + ")")
    p.add_argument("--profile-steps", type=int, default=20, help=argparse.SUPPRESS)
    p.add_argument("--profile-top", type=int, default=12, help=argparse.SUPPRESS)
    p.add_argument("--tf32-row", action="store_true", default=None,
                   help=f"also one TF32 row on the GPU ({TF32_ROW[0]}, batch {TF32_ROW[1]}); on by default with cuda")
    p.add_argument("--all", action="store_true", help="--layers --thesis-epochs --tf32-row")
    p.add_argument("--no-extras", action="store_true",
                   help="the train-step (or precision) table only, also on a GPU (the GPU's default adds the "
                        "per-layer and thesis tables)")
    p.add_argument("--no-train-step", action="store_true", help="skip the train-step (or precision) table")
    p.add_argument("--readme", action="store_true",
                   help="print the README's results table, generated from benchmarks/results/ (no benchmark runs)")
    p.add_argument("--write", action="store_true", help="with --readme: write it into README.md between its markers")
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


def _rows(text: str, flag: str) -> list[tuple[str, int]]:
    out = []
    for item in parse_list(text, flag):
        model, sep, batch = item.rpartition(":")
        if not sep or not model:
            raise UsageError(f"{flag}: expected MODEL:BATCH pairs, got {item!r}")
        out.append((model, _positive_ints(batch, flag)[0]))
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The options, checked: a bad value is a UsageError naming its flag. --models, --batch-sizes and --rows stay
    None when not given (each table has its own default rows: train_step.section_rows)."""
    args = build_parser().parse_args(argv)
    args.models = parse_list(args.models, "--models") if args.models else None
    args.batch_sizes = _positive_ints(args.batch_sizes, "--batch-sizes") if args.batch_sizes else None
    args.rows = _rows(args.rows, "--rows") if args.rows else None
    for m in args.models or []:
        check_model(m, "--models")
    for m in dict.fromkeys(m for m, _ in args.rows or []):
        check_model(m, "--rows")
    args.thesis_models = parse_list(args.thesis_models, "--thesis-models")
    if args.precision:
        args.precision = parse_list(args.precision, "--precision")
        for pr in args.precision:
            if pr not in PRECISIONS:
                raise UsageError(f"--precision: expected {', '.join(PRECISIONS)}, got {pr!r}")
        if args.cifar_speedrun and len(args.precision) > 1:
            raise UsageError("--precision: --cifar-speedrun takes one precision for hetnet's side, "
                             f"got {','.join(args.precision)}")
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
    # GPU time is the scarce kind: a plain `hetnet bench --devices cuda` measures everything in one go (the
    # precision tables are asked for one by one)
    for extra in ("layers", "thesis_epochs", "tf32_row"):
        if args.all:
            setattr(args, extra, True)
        elif getattr(args, extra) is None:
            setattr(args, extra, gpu and not args.quick and not args.no_extras and not args.precision)
    if args.repeats is None:
        args.repeats = 8 if args.quick else 30
    for flag, v in (("--threads", args.threads), ("--repeats", args.repeats), ("--layer-batch", args.layer_batch),
                    ("--epochs", args.epochs), ("--profile-steps", args.profile_steps),
                    ("--speedrun-runs", args.speedrun_runs), ("--speedrun-limit", args.speedrun_limit)):
        if v is not None and v < 1:
            raise UsageError(f"{flag}: expected a positive integer, got {v}")
    if args.speedrun_epochs is not None:
        args.speedrun_epochs = check_epochs(args.speedrun_epochs, "speedrun_epochs")
    if args.quiet_wait < 0:
        raise UsageError(f"--quiet-wait: expected seconds >= 0, got {args.quiet_wait}")
    if args.side_seconds is None:
        args.side_seconds = 1.0 if (args.quick or gpu) else 4.0
    if args.time_budget is None:
        args.time_budget = 330.0 if gpu and not args.precision else 0.0
    args.reference_rows = parse_list(args.reference_rows, "--reference-rows") if args.reference_rows else []
    if args.merge is not None:
        if not args.precision:
            raise UsageError("--merge: merges precision rows; give --precision")
        args.merge_path, args.merge = args.merge, load_merge(args.merge, "--merge")
    return args


def _set_threads(n: int | None) -> int | None:
    """PyTorch's threads, and the cpu backend's pool and OpenBLAS's when --threads is given; returns the pool's
    thread count (None when the backend has no pool)."""
    import torch

    torch.set_num_threads(n or cpu_count())
    try:  # the cpu backend's own pool (hetnet.backends.cpu.threads), when it has one

        if n:
            _cpu_threads.set_threads(n)
            if getattr(_cpu_threads, "_blas_set", None) is not None:
                _cpu_threads._blas_set(n)  # OpenBLAS's own count, for GEMMs outside hetnet's pool
        return _cpu_threads.threads()
    except (ImportError, AttributeError):
        return None


def main(argv: list[str] | None = None) -> int:
    """`hetnet bench ARGS`; returns the exit status (0 when every section ran, even with refused rows)."""
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.readme:
        table = readme.results_table(Path("benchmarks") / "results")
        if args.write:
            changed = readme.update_readme(Path("README.md"), table)
            print(f"README.md: results table {'updated' if changed else 'unchanged'}")
        else:
            print(table, end="")
        return 0
    try:
        import torch  # noqa: F401
    except ImportError:
        raise UsageError("hetnet bench: PyTorch is the peer every number is measured against and is not installed "
                         "(pip install 'hetnet[bench]')") from None
    if args.no_graph:   # read by the cuda backend when it is created (hetnet.backends.cuda)
        os.environ["HETNET_CUDA_GRAPH"] = "0"
    threads = args.threads or cpu_count()
    hetnet_threads = _set_threads(args.threads)
    gpu = any(d.startswith("cuda") for d in args.devices)
    env = environment(threads, gpu)
    env["hetnet_cpu_threads"] = hetnet_threads
    if args.merge is not None:
        check_merge_card(args.merge, env, args.merge_path)
    out = Path(args.out) if args.out else Path("benchmarks") / "results" / slug(env.get("card") or env["host"])
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out: cannot create {out}: {e.strerror}") from None
    deadline = time.monotonic() + args.time_budget if args.time_budget > 0 else math.inf
    print(f"hetnet bench: {env.get('card') or env['host']} ({env['cpu']}, {threads_text(threads)}), commit "
          f"{env['commit']}, devices {','.join(args.devices)} -> {out}", flush=True)
    if args.cifar_speedrun:
        tar = Path(args.cifar_tar) if args.cifar_tar else find_cifar_tar(None)
        if tar is None or not tar.is_file():
            raise UsageError(f"--cifar-tar: {args.cifar_tar or CIFAR_TAR} not found (give its path)")
        print(f"CIFAR-10 peer run on {args.devices[0]}:", flush=True)
        run_speedrun(tar, args.devices[0], env, out, args.speedrun_runs, args.speedrun_epochs, args.speedrun_limit,
                     log=lambda line: print(line, flush=True),
                     precision=args.precision[0] if args.precision else None)
        print(f"wrote {out}", flush=True)
        return 0
    if not args.no_train_step:
        if args.precision:
            print(f"train step per precision ({','.join(args.precision)}):", flush=True)
            rows = section_rows(args, [(m, b) for m in PRECISION_MODELS for b in PRECISION_BATCHES])
            run_precision_step(args, args.devices, env, out, deadline, rows)
        else:
            print("train step:", flush=True)
            run_train_step(args, args.devices, env, out, deadline)
    layer_models = args.models or list(dict.fromkeys(m for m, _ in args.rows or []))
    if args.layers and time.monotonic() <= deadline:
        if args.precision:
            models = layer_models or [PRECISION_LAYER_MODEL]
            print(f"convolutions per precision ({', '.join(map(model_label, models))}):", flush=True)
            run_conv_precision(args, args.devices, env, out, models)
        else:
            models = layer_models or ["thesis-m4"]
            args.layer_batch = args.layer_batch or 32
            print(f"layers ({', '.join(map(model_label, models))}, batch {args.layer_batch}):", flush=True)
            run_layers(args, args.devices, env, out, models)
    if args.thesis_epochs:
        print("thesis epochs:", flush=True)
        run_thesis_epochs(args, args.devices, env, out, deadline)
    if args.loader_epochs:
        print("whole epochs, host loader vs resident data:", flush=True)
        run_loader_epochs(args, args.devices, env, out, section_rows(args, LOADER_ROWS))
    if args.profile:
        print("kernel profile:", flush=True)
        run_profile(args, args.devices, env, out, section_rows(args, PROFILE_ROWS))
    print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
