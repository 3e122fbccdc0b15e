"""The `hetnet` command: train | evaluate | predict | export | runs | info | bench.

    hetnet train                                   # fashion-cnn on Fashion-MNIST on the best device
    hetnet train --model thesis-m1 --dataset folder --data cifar10-jpg-train.tar.gz --epochs 10
    hetnet train --resume runs/20261127-031500-fashion-cnn-fashion-mnist [--epochs 30]
    hetnet train --epochs 7.5 --drop-last         # ceil(7.5 x full batches per epoch) steps, the eighth epoch cut
    hetnet train --config runs/20261127-031500-fashion-cnn-fashion-mnist/config.json --seed 1
    hetnet train --gpus 4 --model benchmarks/specs/cifar-wide.json --dataset cifar10   # data parallel, a process a GPU
    mpirun -n 2 hetnet train --device cpu --batch-size 64                # data parallel over MPI (hetnet.parallel)
    hetnet runs
    hetnet evaluate runs/20261127-031500-fashion-cnn-fashion-mnist
    hetnet predict runs/.../model.safetensors shoe.png --top-k 3
    hetnet export runs/20261127-031500-fashion-cnn-fashion-mnist --format onnx --out fashion.onnx
    hetnet info

Bad input (a missing or corrupt file, a bad flag) ends with one line `error: ...` on stderr and exit status 2;
Ctrl-C ends with exit status 130. Tracebacks are for bugs.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
from pathlib import Path

from tqdm import tqdm

from . import data, parallel, zoo
from .device import PRECISIONS, best_device, cuda_available
from .errors import HetnetError, UsageError
from .optim import SCHEDULES
from .predict import predict_images
from .runs import (
    DATASETS,
    RunConfig,
    default_run_dir,
    describe_model_file,
    evaluate_model,
    export_model_file,
    format_runs,
    list_runs,
    rerun_config,
    resume_run,
    start_run,
    train_run,
    versions,
)
from .serialize import checkpoint_path
from .train import OPTIMIZERS, TTA_LEVELS, default_log, interruptible

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse with bad-flag errors as one line `error: ...` (exit 2) instead of usage + message."""

    def error(self, message: str):
        sys.stderr.write(f"error: {message} (see `{self.prog} --help`)\n")
        raise SystemExit(EXIT_USAGE)


def _number(parse, ok, what: str):
    """An argparse type: parse the text (int or float), then check it; both failures say what was expected."""
    def convert(text: str):
        try:
            v = parse(text)
        except ValueError:
            v = None
        if v is None or not ok(v):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v
    convert.__name__ = what  # argparse names the type in some messages
    return convert


_positive_int = _number(int, lambda v: v > 0, "a positive integer")
_int = _number(int, lambda v: True, "an integer")
_positive_float = _number(float, lambda v: math.isfinite(v) and v > 0, "a positive finite number")
_epochs = _number(float, lambda v: math.isfinite(v) and v > 0, "a positive number of epochs (whole or fractional)")
_nonneg_float = _number(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
_fraction = _number(float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def build_parser() -> argparse.ArgumentParser:

    parser = _Parser(prog="hetnet", description="A readable deep-learning engine for image classification.")
    sub = parser.add_subparsers(dest="command", metavar="{train,evaluate,predict,export,runs,info,bench}",
                                parser_class=_Parser)
    parser.commands = sub.choices     # name -> the subcommand's parser


    width = max(map(len, zoo.PRESETS))
    t = sub.add_parser("train", help="train a model (no flags: fashion-cnn on Fashion-MNIST, the main job)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train a model into a run directory. Flags not given come from the model "
                                   "preset's recipe\n(`hetnet info PRESET` shows its layers). Images are converted "
                                   "to the model's channels and resized\nto its input when they differ (a note says "
                                   "so).",
                       epilog="preset recipes:\n" + "\n".join(f"  {name:<{width}}  {zoo.recipe_line(pr)}"
                                                              for name, pr in zoo.PRESETS.items()))
    t.add_argument("--model", help="preset name (see `hetnet info`) or a SPEC.json file (default: fashion-cnn)")
    t.add_argument("--dataset", choices=DATASETS, help="default: fashion-mnist")
    t.add_argument("--data", metavar="PATH", help="data folder (IDX files, CIFAR-10 batches, class folders) or "
                                                   ".tar/.tar.gz of class folders")
    t.add_argument("--device", help="cpu | reference | cuda | cuda:N (default: the best available)")
    t.add_argument("--precision", choices=PRECISIONS,
                   help="matrix products on the cuda backend: fp32, tf32 or bf16 tensor cores (default: the model's "
                        "preset, else fp32; cpu and reference compute in float32 / float64)")
    t.add_argument("--epochs", type=_epochs, help="whole or fractional: 9.9 trains ceil(9.9 x batches per epoch) "
                                                   "steps, the tenth epoch cut short")
    t.add_argument("--batch-size", type=_positive_int)
    t.add_argument("--drop-last", action=argparse.BooleanOptionalAction, default=None,
                   help="leave out each epoch's last partial training batch (default: the preset's recipe)")
    t.add_argument("--lr", type=_positive_float, help="learning rate (peak, for schedules)")
    t.add_argument("--optimizer", choices=OPTIMIZERS, help="sgd (plain), momentum (Nesterov 0.9), adam, adamw")
    t.add_argument("--schedule", choices=tuple(SCHEDULES), help="learning-rate schedule, stepped per batch")
    t.add_argument("--weight-decay", type=_nonneg_float)
    t.add_argument("--warmup-epochs", type=_nonneg_float, help="linear warm-up length, in epochs")
    t.add_argument("--label-smoothing", type=_fraction)
    t.add_argument("--ema", type=_fraction, metavar="DECAY", help="evaluate and keep an exponential moving average "
                                                                  "of the weights with this decay (0: off)")
    aug = t.add_mutually_exclusive_group()
    aug.add_argument("--augment", metavar="LIST",
                     help="comma-separated: crop[:PAD] (zero padding), translate[:PAD] (reflect padding), flip, "
                          "altflip (each image mirrored every other epoch) (e.g. crop:2,flip)")
    aug.add_argument("--no-augment", action="store_true", help="no augmentation")
    t.add_argument("--tta", type=int, choices=TTA_LEVELS,
                   help="test-time augmentation of the last epoch's evaluation: 0 none, 1 mirror, 2 mirror + "
                        "translate (airbench's levels), 3 shift (the image and its four one-pixel shifts)")
    t.add_argument("--val-fraction", type=_fraction, help="held-out stratified validation share (default 0.1 "
                                                          "for data sets without a test split, else 0)")
    t.add_argument("--seed", type=_int, help="default: 0")
    t.add_argument("--limit", type=_positive_int, metavar="N",
                   help="use only N training examples (the first N of the seeded split; without one, N drawn with "
                        "--seed)")
    t.add_argument("--skip-bad-images", action="store_true", help="skip unreadable image files (and count them)")
    t.add_argument("--no-cache", action="store_true", help="decode image folders and archives again instead of "
                                                           "reading their decoded copy (kept in ~/.cache/hetnet, "
                                                           "or $HETNET_CACHE_DIR)")
    t.add_argument("--out", metavar="DIR", help="run directory (default runs/<UTC time>-<model>-<dataset>)")
    again = t.add_mutually_exclusive_group()
    again.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its checkpoint; with "
                                                           "--epochs N, train on to N epochs (extends a finished run)")
    again.add_argument("--config", metavar="CONFIG_JSON", help="rerun a run exactly from its config.json (or run "
                                                               "directory) into a new run directory; flags given "
                                                               "beside it override")
    t.add_argument("--no-progress", action="store_true", help="no progress bar, even on a terminal")
    t.add_argument("--no-cuda-graph", action="store_true",
                   help="cuda: run the training step eagerly instead of replaying a captured CUDA graph")
    t.add_argument("--tf32", action="store_true", help="the same as --precision tf32")
    d = t.add_argument_group("data parallel (hetnet.parallel; also under mpirun, srun or torchrun-style variables)")
    d.add_argument("--gpus", type=_positive_int, metavar="N", help="train on N GPUs of this host, one process each; "
                   "--batch-size is per GPU")
    d.add_argument("--sync-bn", action="store_true", help="BatchNorm statistics over every rank's batch (default: "
                   "each rank's own)")
    d.add_argument("--dist-timeout", type=_positive_float, metavar="SECONDS",
                   default=float(os.environ.get("HETNET_DIST_TIMEOUT") or parallel.DEFAULT_TIMEOUT_S),
                   help="end the job when a rank makes no progress for this long while the others wait for it "
                        "(default 120; a rank that dies ends it at once)")

    e = sub.add_parser("evaluate", help="loss, accuracy and per-class accuracy of a saved model",
                       description="Score a saved model: on its own data set's test split (or the validation split "
                                   "it was trained with), or on any data given with --dataset/--data, where every "
                                   "image is scored. Classes are matched by name.")
    e.add_argument("model", metavar="RUN_DIR|MODEL_FILE")
    e.add_argument("--dataset", choices=DATASETS, help="default: the data set the model was trained on")
    e.add_argument("--data", metavar="PATH", help="folder or .tar/.tar.gz of <class>/..., test/<class>/... or both; "
                                                   "an IDX folder (the t10k files will do); CIFAR-10 batches")
    e.add_argument("--split", choices=("train", "test", "all"),
                   help="which images when the data have both splits (default: test)")
    e.add_argument("--device")
    e.add_argument("--precision", choices=PRECISIONS, help="default: the one the model was trained with")
    e.add_argument("--tta", type=int, choices=TTA_LEVELS,
                   help="test-time augmentation: 0 none, 1 mirror, 2 mirror + translate, 3 shift (default: the "
                        "level the model's run evaluated with)")
    e.add_argument("--no-cache", action="store_true", help="decode image folders again instead of reading their "
                                                           "decoded copy")
    e.add_argument("--json", action="store_true", help="print the result as JSON")

    p = sub.add_parser("predict", help="top-k classes of images (files, folders, .tar/.tar.gz archives)",
                       description="The top-k classes of each image. Images are converted to the model's channels "
                                   "and resized to its input as in training (a note says so). An unreadable image "
                                   "gets its own `error:` line and the others still get answers; the exit status "
                                   "is then 2.")
    p.add_argument("model", metavar="RUN_DIR|MODEL_FILE")
    p.add_argument("images", metavar="IMAGE", nargs="+", help="image file, folder of images, or .tar/.tar.gz")
    p.add_argument("--top-k", type=_positive_int, default=3)
    p.add_argument("--device", help="cpu (default) | reference | cuda | cuda:N")
    p.add_argument("--json", action="store_true",
                   help='one JSON object per line and image: {"path": ..., "top_k": [[class, probability], ...]}')

    x = sub.add_parser("export", help="write a saved model as an ONNX graph",
                       description="Write a saved model as an ONNX graph (opset 17): input `images` float32 "
                                   "N x C x H x W in [0, 1] (normalised inside the graph), output `logits`. Needs "
                                   "the onnx package: pip install 'hetnet[export]'.")
    x.add_argument("model", metavar="RUN_DIR|MODEL_FILE")
    x.add_argument("--format", default="onnx", choices=("onnx",), help="default: onnx")
    x.add_argument("--out", metavar="FILE", help="default: the model file's name with .onnx")

    r = sub.add_parser("runs", help="list the runs in a directory (default: runs/)",
                       description="One line per run directory: model, data, epochs, status, the accuracy split "
                                   "(val if there is one, else test), best accuracy and its epoch, final accuracy, "
                                   "training time.")
    r.add_argument("dir", metavar="DIR", nargs="?", default="runs")
    r.add_argument("--json", action="store_true", help="print the list as JSON")

    i = sub.add_parser("info", help="versions, devices, models and where data sets were found; or one model",
                       description="Without MODEL: versions, devices, presets and where data sets were found. With "
                                   "MODEL (a preset name or SPEC.json): its layers, output shapes, parameter count "
                                   "and recipe; with a run directory or model file: its layers, classes, "
                                   "normalisation and what it was trained on.")
    i.add_argument("name", metavar="MODEL|RUN_DIR|MODEL_FILE", nargs="?")
    sub.add_parser("bench", help="benchmarks (arguments go to hetnet.bench)", add_help=False)
    return parser


# --- commands --------------------------------------------------------------------------------------------------


def _print(line: str) -> None:
    print(line, flush=True)


def cmd_train(args, argv: list[str] | None = None) -> int:
    if args.gpus is not None and os.environ.get("HETNET_LAUNCHER") != "1":
        return _launch_gpus(args, argv or [])
    dist = parallel.start(args.device, args.dist_timeout, args.sync_bn)
    if dist is None:
        return _train(args, None)
    return parallel.run(dist, lambda: _train(args, dist))


def _launch_gpus(args, argv: list[str]) -> int:
    """`--gpus N`: this process starts and watches N ranks (hetnet.parallel.launch)."""
    if args.device not in (None, "cuda"):
        raise UsageError(f"--device {args.device}: --gpus N gives each rank its own GPU (cuda:0 .. cuda:N-1); leave "
                         f"--device out (CPUs: mpirun -n N hetnet train --device cpu ...)")
    if not cuda_available():
        raise UsageError(f"--gpus {args.gpus}: no CUDA GPU found (CuPy missing or no driver); CPUs train data "
                         f"parallel under mpirun -n N")
    import cupy

    found = cupy.cuda.runtime.getDeviceCount()
    if args.gpus > found:
        raise UsageError(f"--gpus {args.gpus}: only {found} GPU(s) on this host")
    child = _without_gpus(argv)
    if not args.resume and not args.out:        # one run directory for every rank, named now
        child += ["--out", str(_default_out(args))]
    return parallel.launch(child, args.gpus, args.dist_timeout)


def _without_gpus(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--gpus":
            skip = True
        elif not a.startswith("--gpus="):
            out.append(a)
    return out


def _default_out(args) -> Path:
    if args.config:
        path = Path(args.config)
        path = path / "config.json" if path.is_dir() else path
        try:
            model = json.loads(path.read_text()).get("model") or "spec"
            dataset = args.dataset or json.loads(path.read_text()).get("dataset") or "data"
        except (OSError, ValueError, AttributeError):
            model, dataset = "spec", args.dataset or "data"     # the ranks say what is wrong with the file
        return default_run_dir(str(args.model or model), str(dataset))
    return default_run_dir(args.model or "fashion-cnn", args.dataset or "fashion-mnist")


def _train(args, dist) -> int:
    root = dist is None or dist.is_root
    progress = False if args.no_progress or not root else None
    log = default_log if root else None
    # tqdm makes its write lock on first use (importing multiprocessing); a Ctrl-C in the middle of that left it
    # half-made and ended in a traceback, so it is made here, before any run starts

    tqdm.get_lock()
    # The cuda backend reads these switches when it is created (hetnet.backends.cuda.CudaBackend).
    if args.no_cuda_graph:
        os.environ["HETNET_CUDA_GRAPH"] = "0"
    if args.tf32 and args.precision not in (None, "tf32"):
        raise UsageError(f"--tf32 and --precision {args.precision} contradict each other")
    augment = [] if args.no_augment else (None if args.augment is None else
                                          [s for s in args.augment.split(",") if s.strip()])
    flags = {"model": args.model, "dataset": args.dataset, "data": args.data, "device": args.device,
             "precision": "tf32" if args.tf32 else args.precision,
             "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "optimizer": args.optimizer,
             "schedule": args.schedule, "weight_decay": args.weight_decay, "warmup_epochs": args.warmup_epochs,
             "label_smoothing": args.label_smoothing, "ema": args.ema, "augment": augment, "tta": args.tta,
             "drop_last": args.drop_last,
             "val_fraction": args.val_fraction, "seed": args.seed, "limit": args.limit,
             "skip_bad_images": args.skip_bad_images or None}
    if args.resume:
        given = [f for f, v in flags.items() if v is not None and f != "epochs"] + (["out"] if args.out else [])
        if given and root:
            print(f"note: --resume continues the run as configured; ignoring --{given[0].replace('_', '-')}"
                  + (" and others" if len(given) > 1 else ""), file=sys.stderr)
        run_dir = Path(args.resume)
        try:
            with interruptible():
                resume_run(run_dir, log=log, progress=progress, epochs=args.epochs, cache=not args.no_cache)
        except KeyboardInterrupt:
            return _interrupted(run_dir, root)
        return 0
    if dist is not None:
        flags["device"] = dist.device       # this rank's GPU (cuda:LOCAL_RANK), or the CPU
    if args.config:

        config = rerun_config(args.config, flags)
        out = Path(args.out or default_run_dir(config["model"] or "spec", config["dataset"]))

        def run():
            start_run(config, out, log=log, progress=progress, cache=not args.no_cache)
    else:
        model, dataset = args.model or "fashion-cnn", args.dataset or "fashion-mnist"
        cfg = RunConfig(**{**{k: v for k, v in flags.items() if v is not None}, "model": model, "dataset": dataset,
                           "seed": 0 if args.seed is None else args.seed, "skip_bad_images": args.skip_bad_images,
                           "cache": not args.no_cache,
                           "out": args.out or str(default_run_dir(model, dataset))})
        out = Path(cfg.out)

        def run():
            train_run(cfg, log=log, progress=progress)
    try:
        with interruptible():
            run()
    except KeyboardInterrupt:
        return _interrupted(out, root)
    return 0


def _interrupted(run_dir: Path, say: bool = True) -> int:

    if not say:
        return EXIT_INTERRUPTED
    if checkpoint_path(run_dir).exists():
        sys.stderr.write(f"\ninterrupted: continue with `hetnet train --resume {run_dir}`\n")
    else:
        sys.stderr.write("\ninterrupted\n")
    return EXIT_INTERRUPTED


def cmd_evaluate(args) -> int:

    result = evaluate_model(args.model, dataset=args.dataset, data=args.data, device=args.device,
                            log=None if args.json else _print, split=args.split, precision=args.precision,
                            tta=args.tta, cache=not args.no_cache)
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


def cmd_predict(args) -> int:

    def show(name: str, top: list) -> None:
        if args.json:
            _print(json.dumps({"path": name, "top_k": [[c, p] for c, p in top]}))
        else:
            _print(f"{name}: " + ", ".join(f"{c} {p:.3f}" for c, p in top))

    def error(message: str) -> None:
        sys.stderr.write("error: " + " ".join(message.split("\n")) + "\n")
        sys.stderr.flush()

    _, failed = predict_images(args.model, args.images, top_k=args.top_k, device=args.device, on_result=show,
                               on_error=error)
    return EXIT_USAGE if failed else 0


def cmd_export(args) -> int:

    _, line = export_model_file(args.model, args.out, args.format)
    print(line)
    return 0


def cmd_runs(args) -> int:

    rows = list_runs(args.dir)
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"no runs in {args.dir} (a run is a directory holding config.json)")
    else:
        for line in format_runs(rows):
            print(line)
    return 0


def cmd_info(args) -> int:

    if args.name is not None:
        if not zoo.names_a_model(args.name):           # (a run directory or model file exists)
            raise UsageError(f"info: {args.name!r} is not a preset ({', '.join(zoo.PRESETS)}), a SPEC.json, a run "
                             "directory or a model file")
        saved = Path(args.name).is_dir() or args.name.endswith(".safetensors")
        for line in describe_model_file(args.name) if saved else zoo.describe(args.name):
            print(line)
        return 0

    print("hetnet " + versions()["hetnet"])
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions().items() if k != "hetnet"))
    print("devices:")
    print(f"  cpu        fast CPU backend, float32 ({os.cpu_count()} logical cores)")
    print("  reference  float64 oracle (slow; for tests)")
    print("  cuda       " + _cuda_description())
    try:

        print(f"best device: {best_device()}")
    except Exception as e:  # info must never crash
        print(f"best device: cpu ({type(e).__name__}: {e})")
    print("data sets:")
    for line in _data_locations():
        print("  " + line)
    print("models: " + ", ".join(zoo.PRESETS))
    return 0


def _cuda_description() -> str:
    """The CUDA backend's own description, or why there is none; never raises."""
    try:

        cuda = importlib.import_module("hetnet.backends.cuda")
    except Exception as e:
        return f"unavailable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'import failed'})"
    describe = getattr(cuda, "describe", None)
    if describe is None:
        return "unavailable (hetnet.backends.cuda has no describe())"
    try:
        text = describe()
    except Exception as e:
        return f"unavailable ({type(e).__name__}: {e})"
    if isinstance(text, (list, tuple)):
        text = "\n             ".join(map(str, text))
    elif isinstance(text, dict):
        if text.get("available") is False:
            return f"unavailable ({text.get('reason', 'no reason given')})"
        devices = text.get("devices") if isinstance(text.get("devices"), list) else []
        lines = [", ".join(f"{k} {v}" for k, v in text.items() if k not in ("available", "devices"))]
        for d in devices:
            if isinstance(d, dict):
                lines.append(f"cuda:{d.get('index', '?')}  " +
                             ", ".join(f"{k} {v}" for k, v in d.items() if k != "index"))
        text = "\n             ".join(lines)
    return str(text)


def _data_locations() -> list[str]:
    try:

        found = data.describe_data_locations()
    except Exception as e:  # info must never crash
        return [f"(could not look: {type(e).__name__}: {e})"]
    if isinstance(found, str):
        return found.splitlines()
    if isinstance(found, dict):
        found = list(found.items())
    return [f"{x[0]}: {x[1] or 'not found'}" if isinstance(x, tuple) and len(x) == 2 else str(x) for x in found]


def cmd_bench(argv: list[str]) -> int:
    try:

        bench = importlib.import_module("hetnet.bench")
    except ModuleNotFoundError as e:
        if e.name in ("hetnet.bench",):
            sys.stderr.write("error: hetnet bench: the benchmark module hetnet.bench is not installed\n")
            return EXIT_USAGE
        raise
    rc = bench.main(argv)
    return int(rc or 0)


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict, "export": cmd_export,
            "runs": cmd_runs, "info": cmd_info}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `hetnet` command and `python -m hetnet`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "bench":
            return cmd_bench(argv[1:])
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if extra:       # said by the subcommand's parser, so that the line points at its --help
            parser.commands.get(args.command, parser).error(f"unrecognized arguments: {' '.join(extra)}")
        if args.command is None:
            parser.print_help()
            return 0
        if args.command == "train":
            return cmd_train(args, argv)
        return COMMANDS[args.command](args)
    except HetnetError as e:
        if os.environ.get("HETNET_LAUNCHER") == "1" and os.environ.get("RANK", "0") != "0":
            return EXIT_USAGE       # a rank of `--gpus N` before it joined: rank 0 says it, the launcher too
        msg = " ".join(str(e).split("\n"))
        sys.stderr.write(f"error: {msg}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `hetnet info | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
