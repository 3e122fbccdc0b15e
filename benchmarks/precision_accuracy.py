"""A reduced precision's training runs against fp32's: one job trained at several seeds in each precision, in one
process -> precision_accuracy.json (one row per run, and per commit the paired differences to fp32), issue 14's
accuracy target ("a whole bf16 training run reaches the fp32 run's test accuracy within 0.3 points") as one command.

The jobs are the issue's two:
- fashion-cnn: the preset as `hetnet train` runs it (15 epochs, its test-time augmentation), scored on Fashion-MNIST's
  10,000 test images.
- cifar-wide: benchmarks/specs/cifar-wide.json with the recipe of the bf16 accuracy runs (16 epochs, batch 512,
  momentum, lr 0.2 one-cycle, weight decay 5e-4, label smoothing 0.2, crop:4 + flip), scored on 5,000 images of the
  CIFAR-10 JPEG training archive held out (--val-fraction 0.1).

Each run is `hetnet train` with the job's flags, --precision and --seed (runs.train_run, its run directory under
--out), so a row's accuracy is the number `hetnet train` prints at the end. Runs go seed-major, fp32 first at each
seed, so a sweep cut short (--max-seconds, or a kill: the JSON is rewritten after every run) leaves pairs. Each row
names its commit; the summary pairs runs of the same commit and seed only. One run's accuracy on 5,000 held-out
images has a standard error of about 0.45 points by itself, so the target is judged on the mean paired difference
over seeds (with its standard error), not on one pair.

    PYTHONPATH=src python benchmarks/precision_accuracy.py --job cifar-wide --data cifar10-jpg-train.tar.gz \\
        --seeds 0,1,2,3,4 --out precision_accuracy.json                                      # on a GPU
    python benchmarks/precision_accuracy.py --job fashion-cnn --device cpu --epochs 1 --limit 500 --seeds 0 \\
        --out /tmp/acc.json                                                                    # a CPU smoke run
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
if SRC.is_dir() and str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

from hetnet import runs  # noqa: E402
from hetnet.bench.common import environment, git_commit, write_result  # noqa: E402
from hetnet.errors import HetnetError, UsageError  # noqa: E402

TARGET_POINTS = 0.3          # the issue's: a reduced precision's accuracy at most this far under fp32's
JOBS = {
    "fashion-cnn": {"flags": {"model": "fashion-cnn", "dataset": "fashion-mnist"},
                    "split": "Fashion-MNIST test (10,000)"},
    "cifar-wide": {"flags": {"model": str(HERE / "specs" / "cifar-wide.json"), "dataset": "folder", "epochs": 16,
                             "batch_size": 512, "optimizer": "momentum", "lr": 0.2, "schedule": "onecycle",
                             "weight_decay": 5e-4, "label_smoothing": 0.2, "augment": ["crop:4", "flip"],
                             "val_fraction": 0.1},
                   "split": "5,000 held out of the CIFAR-10 JPEG training archive"},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--job", required=True, choices=sorted(JOBS))
    ap.add_argument("--data", default=None, help="the job's data (default: where `hetnet train` looks)")
    ap.add_argument("--device", default="cuda", help="cpu | cuda | cuda:N (default cuda)")
    ap.add_argument("--precisions", default="bf16", help="comma-separated, each run beside fp32 (default bf16)")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated (default 0,1,2)")
    ap.add_argument("--out", required=True, type=Path,
                    help="the JSON; rows already there (an earlier sweep of the same job) are kept and added to")
    ap.add_argument("--runs", type=Path, default=None, help="folder for the run directories (default: a temporary "
                                                            "one, removed at the end)")
    ap.add_argument("--max-seconds", type=float, default=math.inf,
                    help="start no run that would end past this many seconds from the start")
    ap.add_argument("--epochs", type=int, default=None, help="instead of the job's (smoke runs)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N training images (smoke runs)")
    return ap.parse_args(argv)


def _list(text: str, what: str, convert) -> list:
    try:
        items = [convert(s.strip()) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--{what}: cannot read {text!r}") from None
    if not items:
        raise UsageError(f"--{what}: empty list")
    return list(dict.fromkeys(items))


ROW_KEYS = {"job", "precision", "seed", "accuracy", "commit"}


def load_rows(path: Path) -> list[dict]:
    """The rows of an earlier sweep's JSON at path (none if there is no file)."""
    if not path.exists():
        return []
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"--out {path}: cannot read it as JSON ({e})") from None
    rows = doc.get("rows") if isinstance(doc, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and ROW_KEYS <= r.keys() for r in rows):
        raise UsageError(f"--out {path}: not a precision_accuracy.py result (no rows with {', '.join(sorted(ROW_KEYS))})")
    return rows


def plan(seeds: list[int], precisions: list[str]) -> list[tuple[int, str]]:
    """(seed, precision) in the order they run: seed-major, fp32 first at each seed."""
    order = ["fp32", *(p for p in precisions if p != "fp32")]
    return [(seed, p) for seed in seeds for p in order]


def run_once(job: str, precision: str, seed: int, args: argparse.Namespace, run_dir: Path) -> dict:
    """One `hetnet train` run of the job; its row."""
    flags = {**JOBS[job]["flags"], "data": args.data, "device": args.device, "precision": precision, "seed": seed,
             "limit": args.limit, "out": str(run_dir)}
    if args.epochs is not None:
        flags["epochs"] = args.epochs
    t0 = time.perf_counter()
    result = runs.train_run(runs.RunConfig(**flags), log=None, progress=False)
    last = result.history[-1]
    split = "test" if last.get("test_accuracy") is not None else "val"
    return {"job": job, "precision": precision, "seed": seed, "accuracy": last[f"{split}_accuracy"],
            "split": JOBS[job]["split"] if args.limit is None else f"{split} (training limited to {args.limit})",
            "epochs": len(result.history), "seconds": round(time.perf_counter() - t0, 1), "device": args.device,
            "commit": git_commit()}


def summary(rows: list[dict]) -> list[dict]:
    """Per (job, commit, precision other than fp32): the runs and mean accuracy (%) of each side over the seeds both
    have, the paired differences (points), their mean and its standard error, and whether the mean is within
    TARGET_POINTS under fp32."""
    out = []
    keys = dict.fromkeys((r["job"], r["commit"], r["precision"]) for r in rows if r["precision"] != "fp32")
    for job, commit, precision in keys:
        base = {r["seed"]: r["accuracy"] for r in rows
                if (r["job"], r["commit"], r["precision"]) == (job, commit, "fp32")}
        other = {r["seed"]: r["accuracy"] for r in rows
                 if (r["job"], r["commit"], r["precision"]) == (job, commit, precision)}
        seeds = sorted(set(base) & set(other))
        diffs = [100 * (other[s] - base[s]) for s in seeds]
        mean = statistics.fmean(diffs) if diffs else math.nan
        se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
        out.append({"job": job, "commit": commit, "precision": precision, "seeds": seeds,
                    "fp32_mean": round(statistics.fmean(100 * base[s] for s in seeds), 3) if seeds else None,
                    "mean": round(statistics.fmean(100 * other[s] for s in seeds), 3) if seeds else None,
                    "differences": [round(d, 3) for d in diffs],
                    "mean_difference": round(mean, 3) if diffs else None,
                    "standard_error": round(se, 3) if len(diffs) > 1 else None,
                    "within_target": bool(diffs) and mean >= -TARGET_POINTS})
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        seeds = _list(args.seeds, "seeds", int)
        precisions = _list(args.precisions, "precisions", str)
        bad = [p for p in precisions if p not in ("fp32", "tf32", "bf16")]
        if bad:
            raise UsageError(f"--precisions: unknown {', '.join(bad)} (fp32, tf32, bf16)")
        rows = load_rows(args.out)
    except HetnetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    method = " ".join(__doc__.split("\n\n")[:3]).replace("\n", " ")
    env = environment(threads=1, want_gpu=args.device.startswith("cuda"))
    with tempfile.TemporaryDirectory(prefix="precision-accuracy-") as tmp:
        folder = args.runs or Path(tmp)
        todo = plan(seeds, precisions)
        for i, (seed, precision) in enumerate(todo):
            took = [r["seconds"] for r in rows[-i:]] if i else []
            if time.perf_counter() - t_start + (max(took) if took else 0.0) > args.max_seconds:
                print(f"stopping: --max-seconds {args.max_seconds:g}; {len(todo) - i} runs not started", flush=True)
                break
            try:
                row = run_once(args.job, precision, seed, args, folder / f"{args.job}-{precision}-seed{seed}")
            except HetnetError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            rows.append(row)
            write_result(args.out, {"environment": env, "method": method, "target_points": TARGET_POINTS,
                                    "rows": rows, "summary": summary(rows)})
            print(f"[{i + 1}/{len(todo)}] {args.job} {precision} seed {seed}: {100 * row['accuracy']:.2f}% "
                  f"({row['seconds']:.0f} s)", flush=True)
    for s in summary(rows):
        print(f"{s['job']} {s['precision']} at {s['commit']}, seeds {','.join(map(str, s['seeds']))}: "
              f"{s['mean']}% against fp32 {s['fp32_mean']}%, mean difference {s['mean_difference']} points "
              f"(standard error {s['standard_error']}); within {TARGET_POINTS}: {s['within_target']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
