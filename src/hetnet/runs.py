"""A training run on disk: from flags to a run directory holding everything about one trained model.

    runs/20261127-031500-fashion-cnn-fashion-mnist/
        config.json         everything needed to rebuild the run (model spec, data, recipe, seed, device, versions)
        metrics.jsonl       one JSON object per finished epoch
        checkpoint/         the latest resumable state (rewritten atomically after every epoch)
        model.safetensors   final weights + normalisation + class names (only when training completes)
        curves.png          loss and accuracy per epoch
        confusion.png       confusion matrix on the test (else validation) set

Resuming (`--resume DIR`) rebuilds the model, data split and loaders from the checkpoint's copy of the config,
restores weights, optimiser, schedule and hetnet's RNG state, rewrites metrics.jsonl from the checkpoint's lines and
carries on at the next epoch. Batch order and augmentation depend only on (seed, epoch), so on the cpu backend a
resumed run ends bit-identical to an uninterrupted one.

    >>> from hetnet.runs import RunConfig, train_run
    >>> result = train_run(RunConfig(model="mlp", dataset="fashion-mnist", epochs=1, limit=1000))   # doctest: +SKIP
    >>> result.run_dir, result.history[-1]["test_accuracy"]                                           # doctest: +SKIP
"""
from __future__ import annotations

import hashlib
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from . import init as hinit
from . import random as hrandom
from . import serialize, zoo
from .device import best_device, get_backend
from .errors import ModelFileError, TrainingDiverged, UsageError
from .train import (OPTIMIZERS, Trainer, WeightAverage, check_lr, check_positive_int, confusion_matrix, default_log,
                    make_optimizer, make_schedule, predict_labels, records_iter)

DATASETS = ("fashion-mnist", "mnist", "cifar10", "folder")
EVAL_BATCH = 500


@dataclass
class RunConfig:
    """A run's flags. None means "the model preset's recipe" (or the data set's default for val_fraction)."""
    model: str = "fashion-cnn"
    dataset: str = "fashion-mnist"
    data: str | None = None
    device: str | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    optimizer: str | None = None
    schedule: str | None = None
    weight_decay: float | None = None
    warmup_epochs: float | None = None
    label_smoothing: float | None = None
    ema: float | None = None
    augment: list | None = None
    val_fraction: float | None = None
    seed: int = 0
    limit: int | None = None
    skip_bad_images: bool = False
    out: str | None = None


@dataclass
class RunResult:
    run_dir: Path
    history: list
    model_path: Path
    seconds: float
    summary: str = ""


@dataclass
class _Prepared:
    """Everything built from a config: model, data, loaders, optimiser; nothing written yet."""
    config: dict
    model: object
    spec: dict
    input_shape: tuple
    class_names: list
    mean: list
    std: list
    train_loader: object
    val_loader: object | None
    test_loader: object | None
    optimizer: object
    schedule: object
    fingerprint: str
    average: object | None = None
    counts: dict = field(default_factory=dict)
    data_source: str = ""
    skipped: int = 0


# --- building a run --------------------------------------------------------------------------------------------


def _recipe(cfg: RunConfig, preset: zoo.Preset | None) -> dict:
    """The full recipe: flags where given, else the preset's, else generic defaults; every value checked."""
    base = preset or zoo.Preset(input_shape=(1, 1, 1), layers=[])
    r = {
        "epochs": base.epochs if cfg.epochs is None else cfg.epochs,
        "batch_size": base.batch_size if cfg.batch_size is None else cfg.batch_size,
        "lr": base.lr if cfg.lr is None else cfg.lr,
        "optimizer": base.optimizer if cfg.optimizer is None else cfg.optimizer,
        "schedule": base.schedule if cfg.schedule is None else cfg.schedule,
        "weight_decay": base.weight_decay if cfg.weight_decay is None else cfg.weight_decay,
        "warmup_epochs": base.warmup_epochs if cfg.warmup_epochs is None else cfg.warmup_epochs,
        "label_smoothing": base.label_smoothing if cfg.label_smoothing is None else cfg.label_smoothing,
        "ema": base.ema if cfg.ema is None else cfg.ema,
        "augment": list(base.augment) if cfg.augment is None else list(cfg.augment),
    }
    r["epochs"] = check_positive_int(r["epochs"], "epochs")
    r["batch_size"] = check_positive_int(r["batch_size"], "batch_size")
    r["lr"] = check_lr(r["lr"], "lr")
    if r["optimizer"] not in OPTIMIZERS:
        raise UsageError(f"--optimizer: unknown optimizer {r['optimizer']!r} (expected one of {', '.join(OPTIMIZERS)})")
    from .optim import SCHEDULES

    if r["schedule"] not in SCHEDULES:
        raise UsageError(f"--schedule: unknown schedule {r['schedule']!r} (expected one of {', '.join(SCHEDULES)})")
    for key, lo, hi in (("weight_decay", 0.0, math.inf), ("warmup_epochs", 0.0, math.inf),
                        ("label_smoothing", 0.0, 1.0), ("ema", 0.0, 1.0)):
        v = _number(r[key], key)
        if not (lo <= v < hi) or (hi == math.inf and not math.isfinite(v)):
            raise UsageError(f"--{key.replace('_', '-')}: expected a number in [{lo:g}, {hi:g}), got {r[key]!r}")
        r[key] = v
    from .data.transforms import parse_augment

    try:
        parse_augment(r["augment"])
    except ValueError as e:
        raise UsageError(f"--augment: {e}") from None
    return r


def _number(v, key: str) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        raise UsageError(f"--{key.replace('_', '-')}: expected a number, got {v!r}") from None


def _adapt_classes(spec: dict, num_classes: int) -> dict:
    """A preset's spec with its last Dense layer resized to num_classes (presets are built for 10)."""
    last = spec["layers"][-1]
    if last.get("type") == "Dense" and last.get("out_features") != num_classes:
        spec = json.loads(json.dumps(spec))
        spec["layers"][-1]["out_features"] = num_classes
    return spec


def _fingerprint(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()[:32]


def versions() -> dict:
    """Versions of Python, hetnet and the libraries it uses (installed ones; nothing is imported)."""
    from importlib import metadata

    from . import __version__

    out = {"hetnet": __version__, "python": platform.python_version()}
    for dist in ("numpy", "safetensors", "pillow", "tqdm", "matplotlib", "cupy-cuda12x", "cupy-cuda13x",
                 "cupy", "torch"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def load_data(dataset: str, data: str | None, input_shape: tuple, skip_bad_images: bool = False,
              model: str = "the model"):
    """hetnet.data.load_dataset, images converted to the model's channels (grey <-> RGB) and resized to its input."""
    from . import data as hdata
    from .data import transforms

    if input_shape[0] not in (1, 3):
        raise UsageError(f"--model: {model} has input_shape {list(input_shape)}, but images can only be fed as 1 "
                         f"(grey) or 3 (RGB) channels")
    if dataset not in DATASETS:
        raise UsageError(f"--dataset: unknown data set {dataset!r} (expected one of {', '.join(DATASETS)})")
    if dataset == "folder" and data is None:
        raise UsageError("--data: --dataset folder needs --data ROOT (a folder or .tar/.tar.gz of class folders)")
    ds = hdata.load_dataset(dataset, path=data, input_shape=tuple(input_shape), skip_bad_images=skip_bad_images)
    c, h, w = input_shape
    for split in ("train", "test"):
        x = getattr(ds, f"{split}_x")
        if x is None:
            continue
        if x.shape[1] != c:
            raise UsageError(f"--model: the model expects {c}-channel input {tuple(input_shape)} but {dataset} "
                             f"({ds.source}) has {x.shape[1]}-channel images {tuple(x.shape[1:])}")
        if x.shape[2:] != (h, w):
            setattr(ds, f"{split}_x", transforms.resize_batch(x, (h, w)))
    return ds


def prepare(config: dict, log: Callable[[str], None] | None = None) -> _Prepared:
    """Build model, data split, loaders, optimiser and schedule from a config dict (see RunConfig/config.json).

    Raises HetnetError subclasses for bad input, before anything is written."""
    from . import data as hdata
    from .data.transforms import channel_stats

    recipe = config["recipe"]
    backend = get_backend(config["device"])
    hrandom.seed(config["seed"])
    spec = config["spec"]
    model, input_shape = zoo.build_from_spec(spec, config.get("model") or "spec")
    ds = load_data(config["dataset"], config.get("data"), input_shape, config.get("skip_bad_images", False),
                   config.get("model") or "the model")
    class_names = [str(c) for c in ds.class_names]
    k = len(class_names)
    if k < 2:
        raise UsageError(f"--data: {config['dataset']} at {ds.source} has {k} class(es); need at least two")
    out_shape = model.output_shape(input_shape)
    if out_shape != (k,):
        if config.get("adapt_classes") and spec["layers"][-1].get("type") == "Dense":
            spec = _adapt_classes(spec, k)
            config["spec"] = spec
            hrandom.seed(config["seed"])
            model, input_shape = zoo.build_from_spec(spec, config.get("model") or "spec")
        else:
            raise UsageError(f"--model: the model has output shape {out_shape} but {config['dataset']} has {k} "
                             f"classes")
    config["adapt_classes"] = False   # the spec now fits; a resume must rebuild exactly this spec

    has_test = ds.test_x is not None and len(ds.test_x) > 0
    vf = config["val_fraction"]
    if vf is None:
        vf = 0.0 if has_test else 0.1
    vf = float(vf)
    if not 0.0 <= vf < 1.0:
        raise UsageError(f"--val-fraction: expected a number in [0, 1), got {vf}")
    config["val_fraction"] = vf
    if vf > 0:
        try:
            tx, ty, vx, vy = hdata.split_train_val(ds.train_x, ds.train_y, vf, config["seed"])
        except ValueError as e:
            raise UsageError(f"--val-fraction: {e}") from None
    else:
        tx, ty, vx, vy = ds.train_x, ds.train_y, None, None
    limit = config.get("limit")
    if limit is not None:
        limit = check_positive_int(limit, "limit")
        tx, ty = tx[:limit], ty[:limit]
    if len(tx) == 0:
        raise UsageError("--val-fraction: no training examples left after the split")
    mean, std = channel_stats(tx)
    if hinit.needs_data(model):     # a whitening first layer: from the first 5,000 training images, as airbench
        hinit.data_init(model, tx, mean, std)
    bs = recipe["batch_size"]
    # a last batch of one example would break batch normalisation in training: drop it in that case only
    train_loader = hdata.BatchLoader(tx, ty, bs, mean, std, shuffle=True, augment=tuple(recipe["augment"]),
                                     seed=config["seed"], drop_last=(len(tx) % bs == 1 and len(tx) > 1))
    val_loader = (hdata.BatchLoader(vx, vy, EVAL_BATCH, mean, std, shuffle=False)
                  if vx is not None and len(vx) else None)
    test_loader = (hdata.BatchLoader(ds.test_x, ds.test_y, EVAL_BATCH, mean, std, shuffle=False)
                   if has_test else None)

    model.to(backend)
    # on the GPU the uint8 sets go to device memory once, and batches are assembled there (hetnet.data.on_device)
    train_loader, val_loader, test_loader = (hdata.on_device(ld, backend) if ld is not None else None
                                             for ld in (train_loader, val_loader, test_loader))
    optimizer = make_optimizer(recipe["optimizer"], model.parameters(), recipe["lr"], recipe["weight_decay"])
    steps = len(train_loader)
    schedule = make_schedule(recipe["schedule"], optimizer, steps * recipe["epochs"],
                             int(round(recipe["warmup_epochs"] * steps)))
    average = WeightAverage(model, recipe["ema"]) if recipe.get("ema") else None
    counts = {"train": int(len(tx)), "val": int(len(vx)) if vx is not None else 0,
              "test": int(len(ds.test_x)) if has_test else 0}
    return _Prepared(config, model, spec, tuple(input_shape), class_names, [float(v) for v in mean],
                     [float(v) for v in std], train_loader, val_loader, test_loader, optimizer, schedule,
                     _fingerprint(tx, ty), average, counts, str(ds.source), int(getattr(ds, "skipped", 0) or 0))


def make_config(cfg: RunConfig) -> dict:
    """The config dict of a new run: flags resolved against the model preset; checked, nothing loaded yet."""
    preset = zoo.PRESETS.get(cfg.model)
    device = cfg.device or best_device()
    get_backend(device)  # DeviceError now, not after loading the data
    if cfg.limit is not None:
        check_positive_int(cfg.limit, "limit")
    if cfg.dataset not in DATASETS:
        raise UsageError(f"--dataset: unknown data set {cfg.dataset!r} (expected one of {', '.join(DATASETS)})")
    recipe = _recipe(cfg, preset)
    hrandom.seed(cfg.seed)
    spec = zoo.resolve(cfg.model)[2]
    return {
        "model": cfg.model, "spec": spec, "adapt_classes": preset is not None,
        "dataset": cfg.dataset, "data": None if cfg.data is None else str(Path(cfg.data).resolve()),
        "device": device, "recipe": recipe, "val_fraction": cfg.val_fraction, "seed": int(cfg.seed),
        "limit": cfg.limit, "skip_bad_images": bool(cfg.skip_bad_images),
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join(sys.argv), "versions": versions(),
    }


def default_run_dir(model: str, dataset: str) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    name = Path(model).stem if model.endswith(".json") else model
    return Path("runs") / f"{stamp}-{name}-{dataset}"


# --- writing the run directory ---------------------------------------------------------------------------------


def _write_metrics(run_dir: Path, history: list) -> None:
    lines = "".join(json.dumps(r) + "\n" for r in records_iter(history))
    serialize.atomic_write_text(run_dir / "metrics.jsonl", lines)


def _checkpoint(run_dir: Path, p: _Prepared, epoch: int, history: list) -> None:
    state = {"epoch": epoch, "rng": hrandom.get_state(), "metrics": records_iter(history), "config": p.config,
             "mean": p.mean, "std": p.std, "class_names": p.class_names, "fingerprint": p.fingerprint}
    serialize.save_checkpoint(run_dir, p.model, p.optimizer, p.schedule, state, p.average)


def _describe(p: _Prepared, run_dir: Path) -> str:
    r, c = p.config["recipe"], p.config
    split = f"{p.counts['train']} train"
    if p.counts["val"]:
        split += f", {p.counts['val']} val"
    if p.counts["test"]:
        split += f", {p.counts['test']} test"
    skipped = f" ({p.skipped} unreadable images skipped)" if p.skipped else ""
    return (f"training {c['model']} on {c['dataset']} ({split} from {p.data_source}){skipped} on {c['device']}: "
            f"{r['epochs']} epochs, batch {r['batch_size']}, {r['optimizer']} lr {r['lr']:g} {r['schedule']}, "
            f"weight decay {r['weight_decay']:g}, augment {','.join(r['augment']) or 'none'}"
            + (f", weight average {r['ema']:g}" if r.get("ema") else "") + f", seed {c['seed']}"
            f"\nrun directory: {run_dir}")


def train_run(cfg: RunConfig, log: Callable[[str], None] | None = default_log, progress: bool | None = None,
              on_epoch: Callable[[dict], None] | None = None) -> RunResult:
    """Train a new run into cfg.out (default runs/<UTC time>-<model>-<dataset>)."""
    config = make_config(cfg)
    run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg.model, cfg.dataset)
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--out: {run_dir} exists and is not a directory")
    if (run_dir / "config.json").exists() or serialize.checkpoint_path(run_dir).exists() or \
            (run_dir / "model.safetensors").exists():
        raise UsageError(f"--out: {run_dir} already holds a run; continue it with --resume {run_dir} or choose "
                         f"another --out")
    p = prepare(config, log)
    config["run_dir"] = str(run_dir)
    config["data_source"] = p.data_source
    config["input_shape"] = list(p.input_shape)
    config["class_names"] = p.class_names
    config["counts"] = p.counts
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out: cannot create {run_dir}: {e.strerror}") from None
    # the epoch-0 checkpoint first: a directory with a config.json always has a checkpoint to resume from
    _checkpoint(run_dir, p, 0, [])
    serialize.atomic_write_text(run_dir / "config.json", json.dumps(config, indent=2) + "\n")
    _write_metrics(run_dir, [])
    if log:
        log(_describe(p, run_dir))
    return _run_epochs(run_dir, p, 0, [], log, progress, on_epoch)


def resume_run(run_dir: str | Path, log: Callable[[str], None] | None = default_log, progress: bool | None = None,
               on_epoch: Callable[[dict], None] | None = None) -> RunResult:
    """Continue an interrupted run from its checkpoint (see the module docstring)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"--resume: {run_dir} is not a run directory")
    if not serialize.checkpoint_path(run_dir).exists():
        raise UsageError(f"--resume: {run_dir} has no checkpoint ({serialize.checkpoint_path(run_dir)} missing)")
    ckpt = serialize.read_checkpoint(run_dir)
    state = ckpt.state
    if (run_dir / "model.safetensors").exists():
        raise UsageError(f"--resume: the run in {run_dir} has already finished (model.safetensors is there)")
    config = state.get("config")
    needed = ("spec", "dataset", "device", "recipe", "seed", "val_fraction")
    if not isinstance(config, dict) or any(k not in config for k in needed) or \
            not isinstance(state.get("epoch"), int) or not isinstance(state.get("metrics"), list):
        raise ModelFileError(f"{ckpt.path}: checkpoint metadata is incomplete (config/epoch/metrics missing)")
    for stale in [*run_dir.glob(".*.tmp"), *run_dir.glob(".*.tmp.png"), *ckpt.path.parent.glob(".*.tmp")]:
        stale.unlink(missing_ok=True)   # left by a kill in the middle of an atomic write
    p = prepare(config, log)
    if p.fingerprint != state.get("fingerprint"):
        raise UsageError(f"--resume: the training data at {p.data_source} differ from the data this run started "
                         f"with")
    serialize.restore_checkpoint(ckpt, p.model, p.optimizer, p.schedule, p.average)
    try:
        hrandom.set_state(state["rng"])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFileError(f"{ckpt.path}: bad RNG state in checkpoint: {e}") from None
    p.mean, p.std = state.get("mean", p.mean), state.get("std", p.std)
    history = list(state["metrics"])[:state["epoch"]]
    _write_metrics(run_dir, history)
    if log:
        log(_describe(p, run_dir) + f"\nresuming after epoch {state['epoch']}/{config['recipe']['epochs']}")
    return _run_epochs(run_dir, p, state["epoch"], history, log, progress, on_epoch)


def _run_epochs(run_dir: Path, p: _Prepared, start: int, history: list, log, progress, on_epoch) -> RunResult:
    epochs = p.config["recipe"]["epochs"]
    trainer = Trainer(p.model, p.optimizer, p.schedule, p.config["recipe"]["label_smoothing"], progress=progress,
                      log=log, average=p.average)
    t0 = time.perf_counter()

    def after_epoch(rec: dict, hist: list) -> None:
        _checkpoint(run_dir, p, rec["epoch"], hist)
        _write_metrics(run_dir, hist)
        if on_epoch is not None:
            on_epoch(rec)

    try:
        history = trainer.fit(p.train_loader, epochs, p.val_loader, p.test_loader, start_epoch=start,
                              history=history, on_epoch_end=after_epoch)
    except TrainingDiverged as e:
        last = len(history)
        raise TrainingDiverged(f"{e}; the last good checkpoint (epoch {last}) is in "
                               f"{serialize.checkpoint_path(run_dir).parent}, no model.safetensors written") from None
    seconds = time.perf_counter() - t0
    info = {"dataset": p.config["dataset"], "data": p.config.get("data"), "val_fraction": p.config["val_fraction"],
            "seed": p.config["seed"], "limit": p.config.get("limit"), "model": p.config.get("model"),
            "epochs": epochs}
    _plots(run_dir, p, history)
    model_path = run_dir / "model.safetensors"   # written last: its presence marks a finished run
    serialize.save_model(model_path, p.model, p.spec, p.mean, p.std, p.class_names, info)
    summary = _summary(run_dir, history, epochs)
    if log:
        log(summary)
    return RunResult(run_dir, history, model_path, seconds, summary)


def _plots(run_dir: Path, p: _Prepared, history: list) -> None:
    from . import plots

    plots.curves(history, run_dir / "curves.png")
    loader, split = (p.test_loader, "test") if p.test_loader is not None else (
        (p.val_loader, "validation") if p.val_loader is not None else (p.train_loader, "training"))
    if loader is p.train_loader:
        from . import data as hdata

        host = getattr(loader, "host", loader)          # a ResidentLoader's BatchLoader
        loader = hdata.BatchLoader(host.x, host.y, EVAL_BATCH, host.mean, host.std, shuffle=False)
    pred, true = predict_labels(p.model, loader)
    plots.confusion(confusion_matrix(pred, true, len(p.class_names)), p.class_names, run_dir / "confusion.png",
                    title=f"confusion matrix, {split} set ({len(true)} images)")


def _summary(run_dir: Path, history: list, epochs: int) -> str:
    last = history[-1] if history else {}
    split = "test" if last.get("test_accuracy") is not None else ("val" if last.get("val_accuracy") is not None
                                                                  else "train")
    key = f"{split}_accuracy"
    total = sum(r["seconds"] for r in history)
    best = max(history, key=lambda r: r[key]) if history else None
    lines = [f"done: {len(history)}/{epochs} epochs in {int(total) // 60}:{int(total) % 60:02d}; "
             f"{split} accuracy {100 * last.get(key, float('nan')):.2f}%"
             + (f" (best {100 * best[key]:.2f}% at epoch {best['epoch']})" if best else ""),
             (f"artefacts in {run_dir}/: model.safetensors, metrics.jsonl, curves.png, confusion.png, "
              f"config.json, checkpoint/")]
    return "\n".join(lines)


# --- evaluating a saved model ----------------------------------------------------------------------------------


def resolve_model_path(target: str | Path) -> Path:
    """A model file, or the model.safetensors of a run directory."""
    target = Path(target)
    if target.is_dir():
        path = target / "model.safetensors"
        if not path.exists():
            if serialize.checkpoint_path(target).exists():
                raise ModelFileError(f"{path}: not found: the run has not finished (continue it with "
                                     f"`hetnet train --resume {target}`)")
            raise ModelFileError(f"{path}: not found: {target} is not a hetnet run directory")
        return path
    return target


def evaluate_model(target: str | Path, dataset: str | None = None, data: str | None = None,
                   device: str | None = None, log: Callable[[str], None] | None = default_log) -> dict:
    """Loss, accuracy, per-class accuracy and confusion matrix of a saved model on its test set (or, for data sets
    without one, the validation split it was trained with; or all images when there was none)."""
    from . import data as hdata
    from .train import evaluate

    path = resolve_model_path(target)
    device = device or best_device()
    get_backend(device)
    lm = serialize.load_model(path, device=device)
    info = lm.info
    name = dataset or info.get("dataset") or "fashion-mnist"
    if data is None and dataset in (None, info.get("dataset")):
        data = info.get("data")
    ds = load_data(name, data, lm.input_shape)
    if len(ds.class_names) != len(lm.class_names):
        raise UsageError(f"--dataset: {name} has {len(ds.class_names)} classes but the model in {path} was trained "
                         f"on {len(lm.class_names)}")
    if ds.test_x is not None and len(ds.test_x):
        x, y, split = ds.test_x, ds.test_y, "test"
    else:
        vf, seed = float(info.get("val_fraction") or 0.0), int(info.get("seed") or 0)
        if vf > 0 and name == info.get("dataset"):
            _, _, x, y = hdata.split_train_val(ds.train_x, ds.train_y, vf, seed)
            split = "validation"
        else:
            x, y, split = ds.train_x, ds.train_y, "all"
    loader = hdata.on_device(hdata.BatchLoader(x, y, EVAL_BATCH, lm.mean, lm.std, shuffle=False), lm.model.backend)
    loss, acc = evaluate(lm.model, loader)
    pred, true = predict_labels(lm.model, loader)
    cm = confusion_matrix(pred, true, len(lm.class_names))
    per_class = {c: (float(cm[i, i] / cm[i].sum()) if cm[i].sum() else None) for i, c in enumerate(lm.class_names)}
    result = {"model": str(path), "dataset": name, "source": str(ds.source), "split": split, "images": int(len(y)),
              "loss": loss, "accuracy": acc, "per_class_accuracy": per_class, "confusion": cm.tolist()}
    if log:
        log(f"{path} on {name} {split} set ({len(y)} images from {ds.source}): loss {loss:.4f}, "
            f"accuracy {100 * acc:.2f}%")
        width = max(len(c) for c in lm.class_names)
        for c, a in per_class.items():
            log(f"  {c:<{width}}  {'-' if a is None else f'{100 * a:6.2f}%'}")
    return result


# --- predicting single images ----------------------------------------------------------------------------------


def load_image(path: str | Path, input_shape: tuple) -> np.ndarray:
    """An image file as uint8 (C, H, W) fitted to the model input (grey or RGB, resized bilinearly)."""
    from PIL import Image, UnidentifiedImageError

    from .errors import DataError

    path = Path(path)
    c, h, w = input_shape
    try:
        with Image.open(path) as im:
            im = im.convert("L" if c == 1 else "RGB")
            if im.size != (w, h):
                im = im.resize((w, h), Image.BILINEAR)
            a = np.asarray(im, dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"{path}: image not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: expected an image file, found a directory") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: not a readable image ({e})") from None
    if c == 1:
        return a[None]
    if c == 3:
        return np.ascontiguousarray(a.transpose(2, 0, 1))
    raise UsageError(f"the model expects {c} input channels; only 1 (grey) or 3 (RGB) images can be predicted")


def predict_images(model_path: str | Path, images: list, top_k: int = 3, device: str | None = None,
                   log: Callable[[str], None] | None = default_log) -> list:
    """[(image, [(class name, probability), ...]), ...] for the top_k classes of each image."""
    from . import losses
    from .data.transforms import normalize

    top_k = check_positive_int(top_k, "top_k")
    path = resolve_model_path(model_path)
    device = device or "cpu"
    get_backend(device)
    lm = serialize.load_model(path, device=device)
    batch = np.stack([load_image(p, lm.input_shape) for p in images])
    x = normalize(batch, lm.mean, lm.std)
    backend = lm.model.backend
    probs = backend.to_numpy(losses.softmax(lm.model.forward(backend.asarray(x))))
    k = min(top_k, probs.shape[1])
    out = []
    for img, pr in zip(images, probs):
        order = np.argsort(-pr, kind="stable")[:k]
        top = [(lm.class_names[i], float(pr[i])) for i in order]
        out.append((str(img), top))
        if log:
            log(f"{img}: " + ", ".join(f"{name} {p:.3f}" for name, p in top))
    return out
