"""Recipe trials for the default Fashion-MNIST job: fashion-cnn (the preset's layers, so the same cost per image)
trained with the preset's recipe and with VARIANTS of it, each for several seeds, all in one process ->
fashion_recipes.json (one row per run) and fashion_recipes.txt (mean and std of the final test accuracy per variant
over its seeds, best first).

A run is built as `hetnet train` builds it -- the recipe resolved and checked by runs.make_config, the model seeded
and built from its spec, the same loaders (normalised by the training images' statistics, the recipe's augmentation
seeded by the run's seed), runs.make_training, and Trainer.fit evaluating the test split after every epoch -- so a
row's test_accuracy is the number `hetnet train` prints at the end ("done: ... test accuracy ..."): the 10,000 test
images after the last epoch, with the recipe's weight average or lookahead applied and its test-time augmentation.
The data are read once and no run directory is written (no checkpoints, plots or model files). On the cpu backend
a row is the run `hetnet train` makes with the same recipe and seed; on cuda the sums round differently from the
CPU's, so the 2-core job's own numbers sit within seed noise of these, not on them.

Runs go seed-major (every variant at seed 0, then every variant at seed 1, ...), and both files are rewritten after
every run, so a sweep cut short -- by --max-seconds, after which no new run starts, or by a kill -- leaves rows that
compare like with like.

    PYTHONPATH=src python benchmarks/fashion_recipes.py --data .gpu/fashion --out runs/fashion-recipes   # the GPU
    python benchmarks/fashion_recipes.py --list                             # the variants and why each is tried
    python benchmarks/fashion_recipes.py --device cpu --epochs 1 --limit 2000 --seeds 0 \\
        --variants preset,altflip-tta2 --out /tmp/fashion-recipes                               # a CPU smoke run
"""
from __future__ import annotations

import argparse
import json
import math
import socket
import statistics
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
if SRC.is_dir() and str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

from hetnet import data as hdata
from hetnet import random as hrandom
from hetnet import runs, zoo
from hetnet.bench.common import git_commit, short_error, write_result
from hetnet.device import get_backend
from hetnet.errors import HetnetError, UsageError
from hetnet.files import atomic_write_text
from hetnet.train import Trainer

PRESET = "fashion-cnn"
SEEDS = "0,1,2"
MAX_SECONDS = 330.0        # the whole sweep must end within 6 minutes on the H200: no run starts past this
JSON_NAME, TABLE_NAME = "fashion_recipes.json", "fashion_recipes.txt"

# Overrides a variant may give: the recipe fields of runs.RunConfig (what `hetnet train`'s flags and a preset's
# recipe set), and two edits of the preset's layers that keep its cost: "dropout" (p of its Dropout layer) and
# "activation" (the layer type that replaces every ReLU).
RECIPE_KEYS = ("batch_size", "lr", "optimizer", "schedule", "weight_decay", "warmup_epochs", "label_smoothing", "ema",
               "augment", "tta", "momentum", "param_groups", "lookahead", "lookahead_decay")
SPEC_KEYS = ("dropout", "activation")

NO_DECAY_BN_BIAS = [{"params": ["BatchNorm2D.*", "Dense.bias"], "weight_decay_scale": 0.0}]
LOOKAHEAD = {"lookahead": 5, "lookahead_decay": 0.95}
ALTFLIP = ["crop:1", "altflip"]

# (name, overrides of the preset's recipe / layers, why it is tried): each keeps the job's CPU cost (GELU for ReLU
# does not: its layers have no fused CPU kernel), chosen against the trials benchmarks/HISTORY.md records.
VARIANTS: list[tuple[str, dict, str]] = [
    ("preset", {}, "the preset's recipe: the baseline every variant is held against"),
    ("lr0.1", {"lr": 0.1},
     "the best single-seed trial so far (93.39%): is it more than seed noise over three seeds?"),
    ("dropout0.1", {"dropout": 0.1},
     "the net is capacity-bound at 15 epochs (training accuracy 94.5% under dropout): give the dense layer back"),
    ("dropout0", {"dropout": 0.0},
     "the same at the extreme: no dropout, crop and weight decay as the only regularisers"),
    ("no-decay-bn-bias", {"param_groups": NO_DECAY_BN_BIAS},
     "no weight decay on BatchNorm scales/shifts and the dense biases ('bag of tricks'): decay there only shrinks"),
    ("lookahead", dict(LOOKAHEAD),
     "airbench's lookahead (every 5 steps to an EMA, decay 0.95): averages the late noisy weights, costs ~nothing"),
    ("linear-decay", {"schedule": "triangular:start=0.04,peak=0.033,end=0"},
     "the same half-epoch warm-up, then linear decay to zero: fewer steps wasted near zero lr than cosine's tail"),
    ("onecycle-lr0.1", {"schedule": "onecycle", "lr": 0.1},
     "one-cycle (30% warm-up from lr/25 to 0.1, then linear to ~0): the super-convergence shape at the best lr"),
    ("flip-tta2", {"augment": ["crop:1", "flip"], "tta": 2},
     "random mirrors (flip + TTA 1 was 93.29%) with TTA 2: the mirror and 1-pixel shifts crop:1 trained for"),
    ("altflip-tta1", {"augment": ALTFLIP, "tta": 1},
     "airbench's alternating flip (each image mirrored on every other epoch: both views, less noise) + mirror TTA"),
    ("altflip-tta2", {"augment": ALTFLIP, "tta": 2},
     "the same with TTA 2 (6 views of each test image, at the final evaluation only)"),
    ("bs64", {"batch_size": 64},
     "twice the steps at the same lr: more gradient noise, often better generalisation in few epochs"),
    ("lr0.1-dropout0.1-nodecay", {"lr": 0.1, "dropout": 0.1, "param_groups": NO_DECAY_BN_BIAS},
     "the capacity side together: higher lr, less dropout, no decay on BatchNorm and biases"),
    ("lr0.1-altflip-tta2-lookahead", {"lr": 0.1, "augment": ALTFLIP, "tta": 2, **LOOKAHEAD},
     "the augmentation side together, lookahead to calm the higher lr"),
    ("dropout0.1-altflip-tta2", {"dropout": 0.1, "augment": ALTFLIP, "tta": 2},
     "less dropout where flips add data: the two families at the preset's lr"),
    ("bs64-altflip-tta2", {"batch_size": 64, "augment": ALTFLIP, "tta": 2},
     "the smaller batch with the flips: both free on the CPU, what would be adopted if each helps"),
    ("all", {"lr": 0.1, "dropout": 0.1, "param_groups": NO_DECAY_BN_BIAS, "augment": ALTFLIP, "tta": 2, **LOOKAHEAD},
     "every cheap change above at once"),
    # second round, around the first round's best mean (onecycle-lr0.1, 93.46%): which additions stack on it
    ("label-smoothing0.1", {"label_smoothing": 0.1},
     "label smoothing 0.1 (airbench uses 0.2): softer targets, calibrated logits, no cost"),
    ("oc-lr0.1-ls0.1", {"schedule": "onecycle", "lr": 0.1, "label_smoothing": 0.1},
     "one-cycle at 0.1 with label smoothing 0.1"),
    ("oc-lr0.1-bs64", {"schedule": "onecycle", "lr": 0.1, "batch_size": 64},
     "one-cycle at 0.1 with the smaller batch (the two best single changes of the first round)"),
    ("oc-lr0.1-altflip-tta2", {"schedule": "onecycle", "lr": 0.1, "augment": ALTFLIP, "tta": 2},
     "one-cycle at 0.1 with alternating flips and TTA 2 (+0.06 to +0.11 on the preset)"),
    ("oc-lr0.1-dropout0.1", {"schedule": "onecycle", "lr": 0.1, "dropout": 0.1},
     "one-cycle at 0.1 with less dropout"),
    ("oc-lr0.15", {"schedule": "onecycle", "lr": 0.15},
     "one-cycle at a higher peak: is 0.1 the top of the curve?"),
    ("oc-lr0.1-wd1e-3", {"schedule": "onecycle", "lr": 0.1, "weight_decay": 1e-3},
     "one-cycle at 0.1 with twice the weight decay"),
    ("oc-lr0.1-ls0.1-altflip-tta2", {"schedule": "onecycle", "lr": 0.1, "label_smoothing": 0.1, "augment": ALTFLIP,
                                     "tta": 2},
     "one-cycle at 0.1, label smoothing and the flips together"),
    # the preset is one-cycle at 0.1 with dropout 0.1 since the second round (7364359); its recipe before that:
    ("cosine-lr0.05-dropout0.3", {"schedule": "cosine", "lr": 0.05, "dropout": 0.3, "warmup_epochs": 0.5},
     "the preset's recipe before 7364359 (cosine at lr 0.05 after half an epoch of warm-up, dropout 0.3)"),
    ("ema0.998", {"ema": 0.998}, "the preset evaluated with an average of its weights (about the last 500 steps)"),
    ("ema0.9995", {"ema": 0.9995}, "the same over about the last 2,000 steps (four of the 15 epochs)"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=None, help="folder of the Fashion-MNIST IDX files (.gz or raw; default: where "
                                                 "`hetnet train` looks)")
    ap.add_argument("--device", default="cuda", help="cpu | cuda | cuda:N (default cuda)")
    ap.add_argument("--precision", default=None, choices=("fp32", "tf32", "bf16"),
                    help="matrix products on cuda (default: the preset's, fp32)")
    ap.add_argument("--out", default=None, help="folder for the two files (default runs/fashion-recipes-<UTC time>)")
    ap.add_argument("--seeds", default=SEEDS, help=f"comma-separated (default {SEEDS})")
    ap.add_argument("--variants", default=None, help="comma-separated names (default: all; see --list)")
    ap.add_argument("--max-seconds", type=float, default=MAX_SECONDS,
                    help=f"start no run that would end past this many seconds from the start (default {MAX_SECONDS:g})")
    ap.add_argument("--epochs", type=int, default=None, help="instead of the preset's 15 (smoke runs)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N training images (smoke runs)")
    ap.add_argument("--list", action="store_true", help="print the variants and why each is tried, then exit")
    return ap.parse_args(argv)


# --- one run -------------------------------------------------------------------------------------------------------


def variant_spec(overrides: dict) -> dict:
    """fashion-cnn's spec with a variant's layer edits ("dropout", "activation")."""
    spec = zoo.spec_of(PRESET)
    for layer in spec["layers"]:
        if layer["type"] == "Dropout" and "dropout" in overrides:
            layer["p"] = float(overrides["dropout"])
        if layer["type"] == "ReLU" and "activation" in overrides:
            layer["type"] = overrides["activation"]
    return spec


def run_config(overrides: dict, seed: int, args: argparse.Namespace) -> dict:
    """The config `hetnet train` would make for the preset with the variant's recipe overrides (resolved, checked),
    with the variant's layers as its spec."""
    unknown = sorted(set(overrides) - set(RECIPE_KEYS) - set(SPEC_KEYS))
    if unknown:
        raise UsageError(f"variant overrides {', '.join(unknown)}: expected some of {', '.join(RECIPE_KEYS + SPEC_KEYS)}")
    recipe = {k: v for k, v in overrides.items() if k in RECIPE_KEYS}
    cfg = runs.RunConfig(model=PRESET, data=args.data, device=args.device, precision=args.precision,
                         epochs=args.epochs, seed=seed, limit=args.limit, **recipe)
    config = runs.make_config(cfg)
    config["spec"] = variant_spec(overrides)
    zoo.build_from_spec(config["spec"], PRESET)     # a bad layer edit fails here, before any training
    return config


class Data:
    """Fashion-MNIST read once, as `hetnet train` reads it (runs.load_data), and the training images' mean and
    std (channel statistics of the first `limit` images, as runs.prepare takes them)."""

    def __init__(self, path: str | None, limit: int | None):
        shape = zoo.PRESETS[PRESET].input_shape
        ds = runs.load_data("fashion-mnist", path, shape)
        self.source, self.class_names = str(ds.source), ds.class_names
        self.train_x, self.train_y = ds.train_x[:limit], ds.train_y[:limit]
        self.test_x, self.test_y = ds.test_x, ds.test_y
        self.mean, self.std = hdata.channel_stats(self.train_x)


def train_once(config: dict, data: Data) -> dict:
    """Train one config as runs.prepare + runs._run_epochs do (without the run directory); the history's last record
    and the test accuracy of every epoch."""
    recipe, seed = config["recipe"], config["seed"]
    backend = get_backend(config["device"], config["precision"])
    hrandom.seed(seed)
    model, _ = zoo.build_from_spec(config["spec"], PRESET)
    bs, n = recipe["batch_size"], len(data.train_x)
    train = hdata.BatchLoader(data.train_x, data.train_y, bs, data.mean, data.std, shuffle=True,
                              augment=tuple(recipe["augment"]), seed=seed, drop_last=runs.train_drop_last(recipe, n))
    test = hdata.BatchLoader(data.test_x, data.test_y, runs.EVAL_BATCH, data.mean, data.std, shuffle=False)
    model.to(backend)
    train, test = hdata.on_device(train, backend), hdata.on_device(test, backend)
    optimizer, schedule, average, lookahead, frozen_after = runs.make_training(recipe, model, len(train))
    trainer = Trainer(model, optimizer, schedule, recipe["label_smoothing"], progress=False, log=None,
                      average=average, lookahead=lookahead, frozen_after=frozen_after, tta=recipe["tta"])
    history = trainer.fit(train, recipe["epochs"], None, test)
    backend.synchronize()
    return {**history[-1], "by_epoch": [round(r["test_accuracy"], 4) for r in history]}


def run_row(name: str, overrides: dict, seed: int, args: argparse.Namespace, data: Data) -> dict:
    row = {"variant": name, "flags": overrides, "seed": seed, "test_accuracy": None, "seconds": None}
    t0 = time.perf_counter()
    try:
        config = run_config(overrides, seed, args)
        last = train_once(config, data)
    except Exception as e:          # one failed variant (a diverged run, a bug) must not end the sweep
        if not isinstance(e, HetnetError):
            traceback.print_exc()
        return {**row, "seconds": round(time.perf_counter() - t0, 2), "error": short_error(e)}
    r = config["recipe"]
    return {**row, "test_accuracy": last["test_accuracy"], "seconds": round(time.perf_counter() - t0, 2),
            "test_loss": round(last["test_loss"], 5), "train_accuracy": round(last["train_accuracy"], 5),
            "test_accuracy_by_epoch": last["by_epoch"], "tta": last["tta"], "epochs": r["epochs"],
            "batch_size": r["batch_size"], "device": config["device"], "precision": config["precision"],
            "train_images": len(data.train_x), "test_images": len(data.test_x)}


# --- the sweep -----------------------------------------------------------------------------------------------------


def select(names: str | None) -> list[tuple[str, dict, str]]:
    if names is None:
        return list(VARIANTS)
    known = {v[0]: v for v in VARIANTS}
    wanted = [s.strip() for s in names.split(",") if s.strip()]
    bad = [s for s in wanted if s not in known]
    if bad or not wanted:
        raise UsageError(f"--variants: unknown {', '.join(bad) or 'empty list'} (known: {', '.join(known)})")
    return [known[s] for s in wanted]


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--seeds: expected comma-separated whole numbers, got {text!r}") from None
    if not seeds:
        raise UsageError("--seeds: empty list")
    return seeds


def summary(rows: list[dict]) -> list[dict]:
    """Per variant: runs, mean / std / min / max of the test accuracy (%), the mean paired difference to the
    preset over the seeds both have (points), seconds per run; best mean first."""
    ok = [r for r in rows if r["test_accuracy"] is not None]
    preset = {r["seed"]: r["test_accuracy"] for r in ok if r["variant"] == "preset"}
    out = []
    for name in dict.fromkeys(r["variant"] for r in rows):
        accs = [100 * r["test_accuracy"] for r in ok if r["variant"] == name]
        diffs = [100 * (r["test_accuracy"] - preset[r["seed"]]) for r in ok
                 if r["variant"] == name and r["seed"] in preset]
        secs = [r["seconds"] for r in ok if r["variant"] == name]
        failed = sum(1 for r in rows if r["variant"] == name and r["test_accuracy"] is None)
        out.append({"variant": name, "runs": len(accs), "failed": failed,
                    "mean": statistics.fmean(accs) if accs else math.nan,
                    "std": statistics.stdev(accs) if len(accs) > 1 else math.nan,
                    "min": min(accs, default=math.nan), "max": max(accs, default=math.nan),
                    "vs_preset": statistics.fmean(diffs) if diffs else math.nan,
                    "seconds": statistics.fmean(secs) if secs else math.nan})
    return sorted(out, key=lambda s: -s["mean"] if not math.isnan(s["mean"]) else math.inf)


def table(rows: list[dict], head: list[str]) -> str:
    def f(v, spec):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)

    lines = [*head, ""]
    cols = [("variant", "<"), ("runs", ">"), ("mean %", ">"), ("std", ">"), ("min", ">"), ("max", ">"),
            ("vs preset", ">"), ("s/run", ">")]
    body = [[s["variant"], f"{s['runs']}" + (f" ({s['failed']} failed)" if s["failed"] else ""), f(s["mean"], ".2f"),
             f(s["std"], ".2f"), f(s["min"], ".2f"), f(s["max"], ".2f"), f(s["vs_preset"], "+.2f"),
             f(s["seconds"], ".1f")] for s in summary(rows)]
    widths = [max(len(c[0]), *(len(b[i]) for b in body)) if body else len(c[0]) for i, c in enumerate(cols)]
    for cells in [[c[0] for c in cols], *body]:
        lines.append("  ".join(format(v, f"{a}{w}") for v, (_, a), w in zip(cells, cols, widths)).rstrip())
    lines += ["", "mean, std (sample, over seeds), min, max: final test accuracy in %; vs preset: mean paired "
              "difference to the preset at the same seeds, in points; s/run: wall seconds of a run (building, "
              "training, the per-epoch test evaluations; the first run of a shape also compiles and tunes)."]
    return "\n".join(lines) + "\n"


def write(out: Path, env: dict, rows: list[dict], head: list[str]) -> None:
    """fashion_recipes.json = {"environment": the machine (its card on a GPU), commit and date, "command", "rows"}."""
    write_result(out / JSON_NAME, {"environment": env, "command": head[1].removeprefix("command: "), "rows": rows})
    atomic_write_text(out / TABLE_NAME, table(rows, head))


def card_name(device: str) -> str:
    """The GPU's name, from CuPy (torch is not imported: its CUDA context would take memory and time)."""
    try:
        import cupy

        index = int(device.partition(":")[2] or 0)
        name = cupy.cuda.runtime.getDeviceProperties(index)["name"]
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception as e:
        return f"unknown GPU ({type(e).__name__})"


def main(argv: list[str] | None = None) -> int:
    t_start = time.perf_counter()
    args = parse_args(argv)
    try:
        variants, seeds = select(args.variants), parse_seeds(args.seeds)
        if args.list:
            for name, overrides, why in variants:
                print(f"{name:<30} {json.dumps(overrides)}\n{'':<30} {why}")
            return 0
        for _, overrides, _ in variants:            # every variant checked before the first run
            run_config(overrides, seeds[0], args)
        data = Data(args.data, args.limit)
    except HetnetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stamp = datetime.now(timezone.utc)
    env = {"host": socket.gethostname(), "card": card_name(args.device) if args.device.startswith("cuda") else None,
           "commit": git_commit(), "time_utc": f"{stamp:%Y-%m-%dT%H:%M:%SZ}", "device": args.device}
    out = Path(args.out) if args.out else Path("runs") / f"fashion-recipes-{stamp:%Y%m%d-%H%M%S}"
    device = args.device + (f" ({card_name(args.device)})" if args.device.startswith("cuda") else "")
    head = [f"fashion-cnn recipe trials on Fashion-MNIST ({len(data.train_x)} training images, {len(data.test_x)} "
            f"test images from {data.source}), epochs {args.epochs or zoo.PRESETS[PRESET].epochs}; device {device}, "
            f"precision {args.precision or 'the preset default'}; hetnet {git_commit()}; {stamp:%Y-%m-%dT%H:%M:%SZ}",
            f"command: {' '.join(sys.argv)}"]
    plan = [(seed, v) for seed in seeds for v in variants]         # seed-major: a cut leaves comparable rows
    rows: list[dict] = []
    print(f"{len(plan)} runs ({len(variants)} variants x seeds {','.join(map(str, seeds))}) -> {out}/", flush=True)
    for i, (seed, (name, overrides, _)) in enumerate(plan):
        elapsed = time.perf_counter() - t_start
        done = [r["seconds"] for r in rows if r["seconds"] is not None]
        same = [r["seconds"] for r in rows if r["variant"] == name and r["seconds"] is not None]
        expect = same[-1] if same else (statistics.median(done) if done else 0.0)
        if elapsed + expect > args.max_seconds:
            print(f"stopping: {elapsed:.0f} s gone, the next run ({name}, seed {seed}) would end past "
                  f"--max-seconds {args.max_seconds:g}; {len(plan) - i} runs not started", flush=True)
            head.append(f"cut by --max-seconds {args.max_seconds:g}: {len(plan) - i} of {len(plan)} runs not started")
            break
        row = run_row(name, overrides, seed, args, data)
        rows.append(row)
        write(out, env, rows, head)
        acc = f"{100 * row['test_accuracy']:.2f}%" if row["test_accuracy"] is not None else row["error"]
        print(f"[{i + 1}/{len(plan)} {time.perf_counter() - t_start:5.0f} s] seed {seed} {name}: test {acc} "
              f"({row['seconds']:.1f} s)", flush=True)
    write(out, env, rows, head)
    print(table(rows, head), end="", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
