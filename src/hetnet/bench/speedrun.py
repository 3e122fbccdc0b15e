"""The CIFAR-10 peer run: airbench94 -- Keller Jordan's published recipe, PyPI airbench 0.1.8, its code untouched -- and
hetnet's cifar-speed preset, trained on the same card, from the same decoded images, with the same held-out split,
`runs` times each -> cifar_speedrun.json (and cifar_speedrun_airbench.log, airbench's own printout).

Data. hetnet.data.load_dataset decodes the JPEG archive (or reads its cached decoding, hetnet.data.cache);
hetnet.data.held_out_split holds out 5,000 images, stratified, seed 0 -- the validation split of `hetnet train
--val-fraction 0.1 --seed 0` -- and the other 45,000 train both sides. airbench reads CIFAR-10 from
./cifar10/train.pt and ./cifar10/test.pt (torch files it writes from torchvision's download when they are missing);
we write those two files from our arrays (images uint8 N x 32 x 32 x 3, labels int64, the class names) in a scratch
folder and call `airbench.train94(run=i)` there: it trains on our 45,000 and evaluates on our 5,000 with its own
loader, augmentation, network, optimiser, timing and test-time augmentation.

Steps. airbench drops each epoch's last partial batch and trains ceil(9.9 x 43) = 426 steps of 1024 images; hetnet's
side trains what the preset's recipe says (its epochs and drop_last: the same 426 steps), or --speedrun-epochs.

Time. airbench times itself with CUDA events around the whitening initialisation, each epoch's training and the
final TTA evaluation, summed (the per-epoch evaluations it prints are outside), and prints the sum in the last row
of its table as total_time_seconds, beside tta_val_acc; both are read from that row. hetnet's runs are timed over
the same span by the host clock between two device synchronisations: whitening (hetnet.init.data_init), every epoch
(no per-epoch evaluation), the TTA evaluation of the held-out images. Building the model and optimiser and copying
the uint8 images to the GPU come before, as airbench builds its network and loader before its clock starts. Each
side warms up once, untimed (airbench: warmup94(), one step; hetnet: a one-epoch run, which also measures the
convolution algorithms). Runs alternate between the sides, so drift in the machine falls on both.
hetnet_end_to_end_seconds: the wall time of the whole command `hetnet train --model cifar-speed --dataset folder
--data ARCHIVE --val-fraction 0.1 --seed 0 --device DEVICE` with the caches warm (the decoded images, and the
convolution choices the runs before measured, hetnet.backends.cuda.tune_cache), as a user's second run of the command
has them: start-up, reading the cache, every epoch with its validation, the artefacts; hetnet_end_to_end says where it
went, from when the command's lines appeared: start_seconds (until "run directory:", training about to begin),
epochs_seconds (until the last epoch's line), finish_seconds (plots, model file, exit), and warmup_seconds (the
epochs' warm-up steps, metrics.jsonl).

    hetnet bench --cifar-speedrun [--cifar-tar PATH] [--speedrun-runs 5]          # on a GPU machine
    python benchmarks/cifar_speedrun.py
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import data as hdata
from .. import init as hinit
from .. import random as hrandom
from .. import runs, zoo
from ..device import get_backend
from ..errors import UsageError
from ..train import Trainer, format_epochs, total_steps
from .common import write_result, write_text
from .profile import kernel_table

PRESET = "cifar-speed"
HELD_OUT = 5000
SPLIT_SEED = 0
RUNS = 5
AIRBENCH_VERSION = "0.1.8"
PROFILE_TOP = 15             # kernels listed in cifar_speedrun.md (the JSON keeps all)
# airbench's printed table: the columns of utils.logging_columns_list, and the row of the final (TTA) evaluation
AIRBENCH_COLUMNS = ("run", "epoch", "train_loss", "train_acc", "val_acc", "tta_val_acc", "total_time_seconds")


@dataclass
class SpeedrunData:
    """The images both sides see: training and held-out uint8 (N, 3, 32, 32) with int64 labels."""
    train_x: np.ndarray
    train_y: np.ndarray
    held_x: np.ndarray
    held_y: np.ndarray
    class_names: list
    source: str
    held_fraction: float            # held-out share of the archive: hetnet train's --val-fraction for this split


def prepare_data(archive: str | Path, held_out: int = HELD_OUT, seed: int = SPLIT_SEED, limit: int | None = None,
                 cache: bool = True) -> SpeedrunData:
    """The decoded archive (through the cache: a second call reads it back) split by hetnet.data.held_out_split;
    limit: only the first `limit` training images (smoke runs)."""
    shape = zoo.PRESETS[PRESET].input_shape
    ds = hdata.load_dataset("folder", archive, input_shape=shape, cache=cache)
    tx, ty, hx, hy = hdata.held_out_split(ds.train_x, ds.train_y, held_out, seed)
    if limit is not None:
        tx, ty = tx[:limit], ty[:limit]
    return SpeedrunData(tx, ty, hx, hy, list(ds.class_names), str(ds.source), held_out / len(ds.train_y))


# --- airbench94, unmodified, on our images ----------------------------------------------------------------------


def write_airbench_data(data: SpeedrunData, folder: Path) -> Path:
    """folder/cifar10/train.pt and test.pt as airbench.CifarLoader reads them (torch.load of {'images': uint8
    N x H x W x C, 'labels': int64 N, 'classes': [names]}): our training images and our held-out ones. Returns
    folder/cifar10."""
    import torch

    root = Path(folder) / "cifar10"
    root.mkdir(parents=True, exist_ok=True)
    for name, x, y in (("train.pt", data.train_x, data.train_y), ("test.pt", data.held_x, data.held_y)):
        torch.save({"images": torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 3, 1))),
                    "labels": torch.from_numpy(np.asarray(y, dtype=np.int64)), "classes": list(data.class_names)},
                   root / name)
    return root


def parse_airbench_table(text: str) -> tuple[float, float]:
    """(tta_val_acc, total_time_seconds) from the last 'eval' row of the table airbench's train() prints
    (| cell | cell | ... |, the columns of AIRBENCH_COLUMNS); ValueError when there is none."""
    found = None
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == len(AIRBENCH_COLUMNS) and cells[1] == "eval":
            found = cells
    if found is None:
        tail = "\n".join(text.strip().splitlines()[-5:])
        raise ValueError(f"airbench printed no final evaluation row; its output ended with:\n{tail}")
    return float(found[AIRBENCH_COLUMNS.index("tta_val_acc")]), float(found[AIRBENCH_COLUMNS.index(
        "total_time_seconds")])


@contextlib.contextmanager
def _cwd(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


class AirbenchSide:
    """airbench.train94 on our data: warm-up once, then one run per call. Its printout goes to `log_lines`."""

    def __init__(self, data: SpeedrunData, workdir: Path):
        try:
            import airbench
        except ImportError as e:
            raise UsageError(f"--cifar-speedrun: airbench {AIRBENCH_VERSION} is not importable ({e}); install it "
                             f"with pip install 'hetnet[bench]' (it needs torch and torchvision)") from None
        self.airbench, self.workdir, self.log_lines = airbench, Path(workdir), []
        write_airbench_data(data, self.workdir)
        self._call(self.airbench.warmup94)

    def _call(self, fn, **kwargs) -> str:
        buf = io.StringIO()
        with _cwd(self.workdir), contextlib.redirect_stdout(buf):
            fn(**kwargs)
        text = buf.getvalue()
        self.log_lines.append(text)
        return text

    def run(self, i: int) -> dict:
        accuracy, seconds = parse_airbench_table(self._call(self.airbench.train94, run=i))
        return {"run": i, "accuracy": accuracy, "seconds": seconds}


# --- hetnet's cifar-speed ------------------------------------------------------------------------------------------


class HetnetSide:
    """The cifar-speed preset as `hetnet train` builds it (runs.make_config / make_training, the same loaders and
    trainer), on the fixed split; run i uses seed i for the weights, the batch order and the augmentation."""

    def __init__(self, data: SpeedrunData, device: str, epochs: int | float | None = None,
                 precision: str | None = None):
        self.config = runs.make_config(runs.RunConfig(model=PRESET, dataset="folder", device=device, epochs=epochs,
                                                      precision=precision))
        self.data, self.backend = data, get_backend(device, self.config["precision"])
        self.spec = runs.adapt_classes(self.config["spec"], len(data.class_names))
        self.mean, self.std = hdata.channel_stats(data.train_x)

    def run(self, i: int, epochs: int | float | None = None) -> dict:
        trainer, train, held, recipe = self._build(i, epochs)
        d, be = self.data, self.backend
        be.synchronize()
        t0 = time.perf_counter()
        hinit.data_init(trainer.model, d.train_x, self.mean, self.std)   # whitening: airbench times it too
        trainer.fit(train, recipe["epochs"])
        _, accuracy = trainer.evaluate(held, recipe["tta"])
        be.synchronize()
        return {"run": i, "accuracy": float(accuracy), "seconds": time.perf_counter() - t0}

    def profile(self, i: int) -> dict:
        """Every kernel of one training epoch (torch.profiler through CUPTI, which sees CuPy's kernels), per step:
        {"steps", "kernels_us" (name -> GPU us per step, largest first), "kernel_sum_us", "span_us", "conv_choices"
        (the backend's tune_log: this process's measurements)}."""
        from torch.profiler import ProfilerActivity, profile

        trainer, train, _, _ = self._build(i, 2)
        hinit.data_init(trainer.model, self.data.train_x, self.mean, self.std)
        trainer.fit(train, 1)               # the first epoch captures and measures; the profiled one only replays
        self.backend.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            trainer.fit(train, 2, start_epoch=1)
            self.backend.synchronize()
        # with which algorithm each convolution shape was run, and every candidate's time (ms) behind the choice
        return {"steps": len(train), **kernel_table(prof, len(train)),
                "conv_choices": list(getattr(self.backend, "tune_log", []))}

    def _build(self, i: int, epochs: int | float | None):
        recipe = dict(self.config["recipe"])
        if epochs is not None:
            recipe["epochs"] = epochs
        d, be = self.data, self.backend
        hrandom.seed(i)
        model, _ = zoo.build_from_spec(self.spec, PRESET)
        model.to(be)
        bs = recipe["batch_size"]
        train = hdata.on_device(hdata.BatchLoader(d.train_x, d.train_y, bs, self.mean, self.std, shuffle=True,
                                                  augment=tuple(recipe["augment"]), seed=i,
                                                  drop_last=runs.train_drop_last(recipe, len(d.train_x))), be)
        held = hdata.on_device(hdata.BatchLoader(d.held_x, d.held_y, runs.EVAL_BATCH, self.mean, self.std,
                                                 shuffle=False), be)
        optimizer, schedule, average, lookahead, frozen_after = runs.make_training(recipe, model, len(train))
        trainer = Trainer(model, optimizer, schedule, recipe["label_smoothing"], progress=False, log=None,
                          average=average, lookahead=lookahead, frozen_after=frozen_after, tta=recipe["tta"])
        return trainer, train, held, recipe


def end_to_end_seconds(archive: str | Path, device: str, workdir: Path, held_fraction: float = 0.1,
                       epochs: int | float | None = None, limit: int | None = None,
                       precision: str | None = None) -> dict:
    """Wall time of the whole `hetnet train` command for cifar-speed, validating on the held-out split
    (--val-fraction held_fraction --seed 0), and the accuracy it reports."""
    out = Path(workdir) / "hetnet-train-run"
    cmd = [sys.executable, "-m", "hetnet", "train", "--model", PRESET, "--dataset", "folder", "--data", str(archive),
           "--val-fraction", repr(held_fraction), "--seed", str(SPLIT_SEED), "--device", device, "--no-progress",
           "--out", str(out)]
    cmd += ["--epochs", str(epochs)] if epochs else []
    cmd += ["--limit", str(limit)] if limit else []
    cmd += ["--precision", precision] if precision else []
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    started = last_epoch = None
    with tempfile.TemporaryFile("w+") as err, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True,
                                                                env=env) as proc:
        for line in proc.stdout:        # each line as it is printed: when training began and when it ended
            if line.startswith("run directory:"):
                started = time.perf_counter() - t0
            elif line.startswith("epoch "):
                last_epoch = time.perf_counter() - t0
        rc = proc.wait()
        seconds = time.perf_counter() - t0
        if rc != 0:
            err.seek(0)
            raise RuntimeError(f"{' '.join(cmd)} failed ({rc}): {err.read().strip()[-2000:]}")
    records = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    phases = {}
    if started is not None and last_epoch is not None:
        phases = {"start_seconds": started, "epochs_seconds": last_epoch - started,
                  "finish_seconds": seconds - last_epoch,
                  "warmup_seconds": sum(r.get("warmup_seconds") or 0.0 for r in records)}
    return {"seconds": seconds, "val_accuracy": records[-1].get("val_accuracy"), "command": " ".join(cmd[1:]),
            **phases}


# --- the table --------------------------------------------------------------------------------------------------


def summarize(rows: list[dict]) -> dict:
    """accuracy_mean, accuracy_std (sample standard deviation; 0 for one run), seconds_mean and the runs."""
    acc = [r["accuracy"] for r in rows]
    sec = [r["seconds"] for r in rows]
    return {"accuracy_mean": statistics.fmean(acc), "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "seconds_mean": statistics.fmean(sec), "runs": rows}


def run_speedrun(archive: str | Path, device: str, env: dict, out: Path, runs_each: int = RUNS,
                 epochs: int | float | None = None, limit: int | None = None, log: Callable[[str], None] = print,
                 sides: dict | None = None, held_out: int = HELD_OUT, precision: str | None = None) -> dict:
    """Both sides, `runs_each` runs each, alternating; writes out/cifar_speedrun.json / .md (and airbench's log) and
    returns the document. precision: hetnet's (default: the preset's). sides: {"hetnet": f(i) -> row,
    "airbench94": f(i) -> row, "end_to_end": f() -> dict, "profile": f() -> dict} replaces the real ones (tests); a
    side that cannot run on this machine (airbench needs CUDA) is recorded with the reason. On cuda, the kernels of
    one hetnet epoch are profiled last (hetnet_profile)."""
    if runs_each < 1:
        raise UsageError(f"--speedrun-runs: expected a positive integer, got {runs_each}")
    t_data = time.perf_counter()
    data = prepare_data(archive, held_out=held_out, limit=limit)
    log(f"cifar speedrun: {len(data.train_x)} training and {len(data.held_x)} held-out images from {data.source} "
        f"({time.perf_counter() - t_data:.1f} s to decode or read the cache)")
    notes, airbench = [], None
    preset = zoo.PRESETS[PRESET]
    het_precision = runs.run_precision(PRESET, device, precision)
    with tempfile.TemporaryDirectory(prefix="hetnet-speedrun-") as tmp:
        workdir = Path(tmp)
        if sides is None:
            het = HetnetSide(data, device, epochs, het_precision)
            log("hetnet: warm-up run (one epoch, untimed)")
            het.run(10_000, epochs=1)
            sides = {"hetnet": het.run,
                     "end_to_end": lambda: end_to_end_seconds(archive, device, workdir, data.held_fraction,
                                                              epochs, limit, het_precision)}
            if device.startswith("cuda"):
                log(f"airbench94 {AIRBENCH_VERSION}: warm-up (one step, untimed)")
                airbench = AirbenchSide(data, workdir)
                sides["airbench94"] = airbench.run
                sides["profile"] = lambda: het.profile(0)
            else:
                notes.append(f"airbench94 not run: it needs CUDA, and the device is {device}")
        rows: dict = {"hetnet": [], "airbench94": []}
        for i in range(runs_each):
            for name in ("airbench94", "hetnet"):
                if name in sides:
                    row = sides[name](i)
                    rows[name].append(row)
                    log(f"{name} run {i}: held-out accuracy {100 * row['accuracy']:.2f}% in {row['seconds']:.3f} s")
        e2e = sides["end_to_end"]() if "end_to_end" in sides else None
        if e2e is not None:
            log(f"hetnet train end to end (warm cache): {e2e['seconds']:.1f} s")
        kernels = sides["profile"]() if "profile" in sides else None
        if airbench is not None:
            write_text(Path(out) / "cifar_speedrun_airbench.log", "".join(airbench.log_lines))
    doc = {
        "environment": env,
        "method": __doc__.split("\n\n", 1)[1].split("\n\n    hetnet bench")[0],
        "data": {"archive": str(Path(archive).resolve()), "train_images": len(data.train_x),
                 "held_out_images": len(data.held_x),
                 "split": f"hetnet.data.held_out_split(count={held_out}, seed={SPLIT_SEED}), stratified",
                 "limit": limit},
        "hetnet_recipe": {"preset": PRESET, "recipe": zoo.recipe_line(preset), "epochs": epochs or preset.epochs,
                          **_steps(preset, epochs, data), "device": device, "precision": het_precision},
        "airbench_version": AIRBENCH_VERSION,
        "hetnet": summarize(rows["hetnet"]) if rows["hetnet"] else None,
        "airbench94": summarize(rows["airbench94"]) if rows["airbench94"] else None,
        "hetnet_end_to_end_seconds": e2e["seconds"] if e2e else None,
        "hetnet_end_to_end": e2e,
        "hetnet_profile": kernels,
        "notes": notes,
    }
    doc["hetnet_seconds_over_airbench94"] = ratio(doc)
    write_result(Path(out) / "cifar_speedrun.json", doc)
    write_text(Path(out) / "cifar_speedrun.md", speedrun_markdown(doc))
    return doc


def _steps(preset: zoo.Preset, epochs: int | float | None, data: SpeedrunData) -> dict:
    """{"batches_per_epoch", "train_steps"} of hetnet's runs: as its loader and Trainer.fit count them."""
    recipe = {"batch_size": preset.batch_size, "drop_last": preset.drop_last}
    per_epoch = len(hdata.BatchLoader(data.train_x, data.train_y, preset.batch_size,
                                      drop_last=runs.train_drop_last(recipe, len(data.train_x))))
    return {"batches_per_epoch": per_epoch, "train_steps": total_steps(epochs or preset.epochs, per_epoch)}


def speedrun_markdown(doc: dict) -> str:
    """The result as a short table."""
    env = doc["environment"]
    het = doc["hetnet_recipe"]
    steps = f", {format_epochs(het['epochs'])} epochs = {het['train_steps']} steps" if "train_steps" in het else ""
    title = (f"CIFAR-10 peer run on {env.get('card') or env.get('host')}, hetnet {env.get('commit')}, "
             f"{env.get('time_utc')}: {doc['data']['train_images']} training images, "
             f"{doc['data']['held_out_images']} held out; hetnet in {het['precision']}{steps}.\n")
    lines = [title, "| side | runs | held-out accuracy | seconds (airbench's clock) |", "|---|---|---|---|"]
    for name in ("airbench94", "hetnet"):
        s = doc.get(name)
        if s:
            lines.append(f"| {name} | {len(s['runs'])} | {100 * s['accuracy_mean']:.2f} % +- "
                         f"{100 * s['accuracy_std']:.2f} | {s['seconds_mean']:.3f} |")
    if doc.get("hetnet_end_to_end_seconds") is not None:
        e2e = doc.get("hetnet_end_to_end") or {}
        parts = (f" (start {e2e['start_seconds']:.1f} s, epochs {e2e['epochs_seconds']:.1f} s of which warm-up "
                 f"{e2e['warmup_seconds']:.1f} s, finish {e2e['finish_seconds']:.1f} s)" if "start_seconds" in e2e
                 else "")
        lines.append(f"\n`hetnet train` end to end, warm cache: {doc['hetnet_end_to_end_seconds']:.1f} s{parts}")
    prof = doc.get("hetnet_profile")
    if prof:
        lines.append(f"\nhetnet's kernels per training step (one epoch of {prof['steps']} steps profiled): "
                     f"{prof['kernel_sum_us']:.0f} us summed, {prof['span_us']:.0f} us first start to last end\n")
        lines += ["| us / step | kernel |", "|---:|---|"]
        lines += [f"| {us:.1f} | {k[:90]} |" for k, us in list(prof["kernels_us"].items())[:PROFILE_TOP]]
        if prof.get("gaps_us"):
            lines.append(f"\nThe rest of the span: copies {prof['copies_us']:.0f} us, idle {prof['gap_sum_us']:.0f} us "
                         "a step, the largest shares by the kernel before the idle time:\n")
            lines += ["| idle us / step | after |", "|---:|---|"]
            lines += [f"| {us:.1f} | {k[:90]} |" for k, us in prof["gaps_us"].items()]
    return "\n".join(lines) + "\n"


def ratio(doc: dict) -> float | None:
    """hetnet's mean seconds over airbench94's (below 1: hetnet is faster), when both ran."""
    if doc.get("hetnet") and doc.get("airbench94"):
        return doc["hetnet"]["seconds_mean"] / doc["airbench94"]["seconds_mean"]
    return None

