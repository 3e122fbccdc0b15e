"""A training run on disk: from flags to a run directory holding everything about one trained model.

    runs/20261127-031500-fashion-cnn-fashion-mnist/
        config.json         everything needed to rebuild the run (model spec, data, recipe, seed, device, versions)
        metrics.jsonl       one JSON object per finished epoch
        checkpoint/         the latest resumable state (rewritten atomically after every epoch)
        model.safetensors   final weights + normalisation + class names (only when training completes)
        model-best.safetensors  the epoch with the best validation (else test) accuracy, as evaluated
        curves.png          loss and accuracy per epoch
        confusion.png       confusion matrix on the test (else validation) set

Resuming (`--resume DIR`) rebuilds the model, data split and loaders from the checkpoint's copy of the config,
restores weights, optimiser, schedule and hetnet's RNG state, rewrites metrics.jsonl from the checkpoint's lines and
carries on at the next epoch. Batch order and augmentation depend only on (seed, epoch), so on the cpu backend a
resumed run ends bit-identical to an uninterrupted one. `--resume DIR --epochs N` trains on to N epochs, also past
the end of a finished run (the schedule is rebuilt for N epochs and continues from its position).

Epochs may be fractional (hetnet.train.total_steps): a run of 9.9 epochs over 43 batches an epoch trains
ceil(9.9 * 43) = 426 steps, the tenth epoch stopping after 39 batches; it is recorded as epoch 10 (its "steps" in
metrics.jsonl say how many batches it trained), and its schedules span the 426 steps. A run whose last epoch was cut
short extends only into epochs after it (`--epochs N`, N above its count of epochs); its schedule then spans the
steps it trained plus those still to come.

`--config RUN/config.json` (rerun_config) starts a new run with the same spec, data, split, recipe, seed and
device: on the cpu backend it ends with the same weights and metrics; flags given beside it change what they name.

    >>> from hetnet.runs import RunConfig, train_run
    >>> result = train_run(RunConfig(model="mlp", dataset="fashion-mnist", epochs=1, limit=1000))   # doctest: +SKIP
    >>> result.run_dir, result.history[-1]["test_accuracy"]                                           # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np

from . import data as hdata
from . import export, parallel, plots, serialize, zoo
from . import init as hinit
from . import random as hrandom
from .data import transforms
from .data.transforms import channel_stats, parse_augment
from .device import best_device, get_backend, parse_device, parse_precision
from .errors import ModelFileError, TrainingDiverged, UsageError
from .files import atomic_write_text
from .train import (
    OPTIMIZERS,
    TTA_NAMES,
    Lookahead,
    Trainer,
    WeightAverage,
    check_lr,
    check_epochs,
    check_param_groups,
    check_positive_int,
    check_tta,
    confusion_matrix,
    default_log,
    evaluate,
    format_epochs,
    group_parameters,
    make_optimizer,
    make_schedule,
    parse_schedule,
    predict_labels,
    records_iter,
    total_steps,
)
from .version import __version__

DATASETS = ("fashion-mnist", "mnist", "cifar10", "folder")
EVAL_BATCH = 500
BEST_MODEL = "model-best.safetensors"


@dataclass
class RunConfig:
    """A run's flags. None means "the model preset's recipe" (or the data set's default for val_fraction)."""
    model: str = "fashion-cnn"
    dataset: str = "fashion-mnist"
    data: str | None = None
    device: str | None = None
    precision: str | None = None
    epochs: int | float | None = None   # a fraction trains ceil(epochs * batches) steps (hetnet.train.total_steps)
    batch_size: int | None = None
    lr: float | None = None
    optimizer: str | None = None
    schedule: str | None = None
    weight_decay: float | None = None
    warmup_epochs: float | None = None
    label_smoothing: float | None = None
    ema: float | None = None
    augment: list | None = None
    tta: int | None = None
    momentum: float | None = None
    param_groups: list | None = None
    lookahead: int | None = None
    lookahead_decay: float | None = None
    whiten_bias_epochs: int | None = None
    drop_last: bool | None = None       # the training loader drops its last partial batch
    val_fraction: float | None = None
    seed: int = 0
    limit: int | None = None
    skip_bad_images: bool = False
    out: str | None = None
    cache: bool = True                  # read image folders through the cache of decoded images (not a recipe value)


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
    lookahead: object | None = None
    frozen_after: list = field(default_factory=list)
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
        "tta": base.tta if cfg.tta is None else cfg.tta,
    }
    for key in RECIPE_EXTRA:
        v = getattr(cfg, key)
        r[key] = getattr(base, key) if v is None else v
    r["param_groups"] = check_param_groups(list(r["param_groups"]))
    r["epochs"] = check_epochs(r["epochs"])
    r["batch_size"] = check_positive_int(r["batch_size"], "batch_size")
    r["lr"] = check_lr(r["lr"], "lr")
    if r["optimizer"] not in OPTIMIZERS:
        raise UsageError(f"--optimizer: unknown optimizer {r['optimizer']!r} (expected one of {', '.join(OPTIMIZERS)})")
    parse_schedule(r["schedule"])
    for key, lo, hi in (("weight_decay", 0.0, math.inf), ("warmup_epochs", 0.0, math.inf),
                        ("label_smoothing", 0.0, 1.0), ("ema", 0.0, 1.0)):
        v = _number(r[key], key)
        if not (lo <= v < hi) or (hi == math.inf and not math.isfinite(v)):
            raise UsageError(f"--{key.replace('_', '-')}: expected a number in [{lo:g}, {hi:g}), got {r[key]!r}")
        r[key] = v
    _check_extra(r)

    try:
        parse_augment(r["augment"])
    except ValueError as e:
        raise UsageError(f"--augment: {e}") from None
    r["tta"] = check_tta(r["tta"])
    return r


# recipe keys added after the first run configs were written: a config without them gets the generic defaults
RECIPE_EXTRA = ("momentum", "param_groups", "lookahead", "lookahead_decay", "whiten_bias_epochs", "drop_last")


def _check_extra(r: dict) -> None:
    """The RECIPE_EXTRA fields of a recipe, checked and normalised in place (errors name the recipe field: a value
    that a flag can give is never wrong)."""
    for key, lo, hi in (("momentum", 0.0, 1.0), ("lookahead_decay", 0.0, 1.0)):
        v = r[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not \
                (lo <= v < hi if key == "momentum" else lo < v <= hi):
            interval = f"[{lo:g}, {hi:g})" if key == "momentum" else f"({lo:g}, {hi:g}]"
            raise UsageError(f"recipe field {key}: expected a number in {interval}, got {v!r}")
        r[key] = float(v)
    if r["optimizer"] in ("momentum", "nesterov-decoupled") and r["momentum"] == 0:
        raise UsageError(f"recipe field momentum: {r['optimizer']} needs momentum > 0")
    for key in ("lookahead", "whiten_bias_epochs"):
        if isinstance(r[key], bool) or not isinstance(r[key], int) or r[key] < 0:
            raise UsageError(f"recipe field {key}: expected a whole number >= 0, got {r[key]!r}")
    if not isinstance(r["drop_last"], bool):
        raise UsageError(f"recipe field drop_last: expected true or false, got {r['drop_last']!r}")


def _number(v, key: str) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        raise UsageError(f"--{key.replace('_', '-')}: expected a number, got {v!r}") from None


# layers that keep their input's shape: a Dense layer followed only by these still sets the number of classes
_SHAPE_KEEPING = ("Scale", "Softmax", "ReLU", "GELU", "Sigmoid", "Tanh", "Dropout")


def _classifier_index(spec: dict) -> int | None:
    """Index of the Dense layer whose outputs are the model's (the last layer, or followed by shape-keeping layers
    only, such as airbench's Scale), or None."""
    for i in range(len(spec["layers"]) - 1, -1, -1):
        kind = spec["layers"][i].get("type")
        if kind == "Dense":
            return i
        if kind not in _SHAPE_KEEPING:
            return None
    return None


def adapt_classes(spec: dict, num_classes: int) -> dict:
    """A preset's spec with its classifier (the last Dense layer) resized to num_classes (presets are built for
    10)."""
    i = _classifier_index(spec)
    if i is not None and spec["layers"][i].get("out_features") != num_classes:
        spec = json.loads(json.dumps(spec))
        spec["layers"][i]["out_features"] = num_classes
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
    out = {"hetnet": __version__, "python": platform.python_version()}
    for dist in ("numpy", "safetensors", "pillow", "tqdm", "matplotlib", "cupy-cuda12x", "cupy-cuda13x",
                 "cupy", "torch"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def note(line: str) -> None:
    """A `note: ...` line on stderr: said once per command, never mixed into results on stdout (by rank 0 alone in
    a data-parallel job)."""
    dist = parallel.current()
    if dist is None or dist.is_root:
        print(f"note: {line}", file=sys.stderr, flush=True)


def load_data(dataset: str, data: str | None, input_shape: tuple, skip_bad_images: bool = False,
              model: str = "the model", require_train: bool = True, cache: bool = True,
              progress: bool | None = None):
    """hetnet.data.load_dataset, images converted to the model's channels (grey <-> RGB) and resized to its input
    (a note says so when they were). require_train=False: a test split alone will do (evaluation). cache=False:
    image folders are decoded without the cache of decoded images (hetnet.data.cache)."""

    if input_shape[0] not in (1, 3):
        raise UsageError(f"--model: {model} has input_shape {list(input_shape)}, but images can only be fed as 1 "
                         f"(grey) or 3 (RGB) channels")
    if dataset not in DATASETS:
        raise UsageError(f"--dataset: unknown data set {dataset!r} (expected one of {', '.join(DATASETS)})")
    if dataset == "folder" and data is None:
        raise UsageError("--data: --dataset folder needs --data ROOT (a folder or .tar/.tar.gz of class folders)")
    ds = hdata.load_dataset(dataset, path=data, input_shape=tuple(input_shape), skip_bad_images=skip_bad_images,
                            require_train=require_train, cache=cache, progress=progress)
    if ds.adapted:
        note(ds.adapted.note())
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


def prepare(config: dict, log: Callable[[str], None] | None = None, cache: bool = True,
            progress: bool | None = None, trained: tuple[int, int] = (0, 0)) -> _Prepared:
    """Build model, data split, loaders, optimiser and schedule from a config dict (see RunConfig/config.json).
    cache / progress: how image folders are read (load_data). trained: (epochs, steps) a resumed run has done
    (make_training).

    Raises HetnetError subclasses for bad input, before anything is written."""

    recipe = config["recipe"]
    dist = parallel.current()
    backend = get_backend(config["device"] if dist is None else dist.device, config.get("precision"))
    hrandom.seed(config["seed"])
    spec = config["spec"]
    model, input_shape = zoo.build_from_spec(spec, config.get("model") or "spec")

    def load():
        return load_data(config["dataset"], config.get("data"), input_shape, config.get("skip_bad_images", False),
                         config.get("model") or "the model", cache=cache, progress=progress)

    if dist is not None and config["dataset"] == "folder" and cache:
        # rank 0 decodes the images into the cache (hetnet.data.cache) while the others wait, then they read it
        if dist.is_root:
            with dist.solo():
                ds = load()
        dist.barrier()
        if not dist.is_root:
            ds = load()
    else:
        ds = load()
    class_names = [str(c) for c in ds.class_names]
    k = len(class_names)
    if k < 2:
        raise UsageError(f"--data: {config['dataset']} at {ds.source} has {k} class(es); need at least two")
    out_shape = model.output_shape(input_shape)
    if out_shape != (k,):
        if config.get("adapt_classes") and _classifier_index(spec) is not None:
            spec = adapt_classes(spec, k)
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
        if vx is None and limit < len(tx):   # no split put them in a seeded order: a folder's would be by class
            keep = np.sort(np.random.default_rng(config["seed"]).permutation(len(tx))[:limit])
            tx, ty = tx[keep], ty[keep]
        else:
            tx, ty = tx[:limit], ty[:limit]
    if len(tx) == 0:
        raise UsageError("--val-fraction: no training examples left after the split")
    # the data's fingerprint (checked on --resume) hashed on a thread beside what follows: sha256 releases the GIL
    pool = ThreadPoolExecutor(1)
    fingerprint = pool.submit(_fingerprint, tx, ty)
    pool.shutdown(wait=False)
    mean, std = channel_stats(tx)
    if hinit.needs_data(model):     # a whitening first layer: from the first 5,000 training images, as airbench
        hinit.data_init(model, tx, mean, std)
    bs = recipe["batch_size"]
    if dist is not None and bs % dist.world:
        raise UsageError(f"--batch-size: the run's global batch of {bs} does not split evenly over {dist.world} "
                         f"ranks")
    if recipe.get("drop_last") and len(tx) < bs:
        note(f"drop_last: the {len(tx)} training examples are less than one batch of {bs}; that partial batch is "
             f"kept")
    train_loader = hdata.BatchLoader(tx, ty, bs, mean, std, shuffle=True, augment=tuple(recipe["augment"]),
                                     seed=config["seed"], drop_last=train_drop_last(recipe, len(tx)))
    val_loader = (hdata.BatchLoader(vx, vy, EVAL_BATCH, mean, std, shuffle=False)
                  if vx is not None and len(vx) else None)
    test_loader = (hdata.BatchLoader(ds.test_x, ds.test_y, EVAL_BATCH, mean, std, shuffle=False)
                   if has_test else None)

    model.to(backend)
    # on the GPU the uint8 sets go to device memory once, and batches are assembled there (hetnet.data.on_device)
    train_loader, val_loader, test_loader = (hdata.on_device(ld, backend) if ld is not None else None
                                             for ld in (train_loader, val_loader, test_loader))
    if dist is not None:        # each rank: its part of every batch, its own start from rank 0's weights
        train_loader = dist.shard(train_loader, train=True)
        val_loader, test_loader = dist.shard(val_loader, train=False), dist.shard(test_loader, train=False)
        if train_loader.skipped():
            note(f"with {dist.world} ranks the last batch of each epoch is cut to a multiple of {dist.world}: "
                 f"{train_loader.skipped()} training example(s) per epoch sit out (a different few each epoch)")
        dist.sync_bn = bool((config.get("parallel") or {}).get("sync_bn"))
        config.update(_parallel_entry(dist))        # a resume may run on another number of ranks
        dist.prepare_model(model)
    steps_short = trained[0] * len(train_loader) - trained[1]
    optimizer, schedule, average, lookahead, frozen_after = make_training(recipe, model, len(train_loader),
                                                                          steps_short)
    counts = {"train": int(len(tx)), "val": int(len(vx)) if vx is not None else 0,
              "test": int(len(ds.test_x)) if has_test else 0}
    return _Prepared(config, model, spec, tuple(input_shape), class_names, [float(v) for v in mean],
                     [float(v) for v in std], train_loader, val_loader, test_loader, optimizer, schedule,
                     fingerprint.result(), average, lookahead, frozen_after, counts, str(ds.source),
                     int(getattr(ds, "skipped", 0) or 0))


def train_drop_last(recipe: dict, n: int) -> bool:
    """Whether a training loader over n examples drops its last partial batch: when the recipe's drop_last asks,
    and always when that batch holds one example (it would break batch normalisation in training); never when it is
    the only batch."""
    full, rest = divmod(n, recipe["batch_size"])
    return full > 0 and (rest == 1 or bool(recipe.get("drop_last")))


def _optimisation(recipe: dict, model, steps: int) -> tuple:
    """(optimiser, lookahead or None, frozen_after) of a recipe for a model on its device, `steps` batches in the
    whole run. Recipes written before a key existed get its generic default (zoo.Preset's)."""
    defaults = zoo.Preset(input_shape=(1, 1, 1), layers=[])
    r = {k: recipe.get(k, getattr(defaults, k)) for k in RECIPE_EXTRA}
    params = group_parameters(model, r["param_groups"]) if r["param_groups"] else model.parameters()
    optimizer = make_optimizer(recipe["optimizer"], params, recipe["lr"], recipe["weight_decay"], r["momentum"],
                               recipe["batch_size"])
    lookahead = (Lookahead(model, steps, every=r["lookahead"], decay=r["lookahead_decay"])
                 if r["lookahead"] else None)
    frozen_after = []
    if r["whiten_bias_epochs"]:
        first = model.layers[0]
        if "bias" not in first.params:
            raise UsageError(f"recipe field whiten_bias_epochs: the model's first layer, {first!r}, has no bias to "
                             f"freeze")
        frozen_after.append((first.params["bias"], r["whiten_bias_epochs"]))
    return optimizer, lookahead, frozen_after


def make_training(recipe: dict, model, steps_per_epoch: int, steps_short: int = 0) -> tuple:
    """(optimizer, schedule, weight average or None, lookahead or None, frozen_after) of a recipe for a model on its
    device, with steps_per_epoch batches per epoch: what `hetnet train` trains with (hetnet.bench.speedrun builds
    its runs with it too); the last four go to Trainer(..., average=, lookahead=, frozen_after=).

    The schedule and lookahead span total_steps(epochs, steps_per_epoch) - steps_short steps. steps_short: how many
    steps fewer than whole epochs a resumed run has trained (epochs done x steps_per_epoch - steps done): 0, but
    for a run extended after a cut last epoch (9.9 epochs of 43 batches are 426 steps, 4 short of 10 epochs; on to
    12 epochs, it spans 426 + 2 x 43 = 516 - 4 steps)."""
    steps = total_steps(recipe["epochs"], steps_per_epoch) - steps_short
    optimizer, lookahead, frozen_after = _optimisation(recipe, model, steps)
    schedule = make_schedule(recipe["schedule"], optimizer, steps,
                             int(round(recipe["warmup_epochs"] * steps_per_epoch)))
    average = WeightAverage(model, recipe["ema"]) if recipe.get("ema") else None
    return optimizer, schedule, average, lookahead, frozen_after


def run_precision(model: str, device: str, asked: str | None = None) -> str:
    """A run's precision: as asked, else the preset's on cuda (its default there), else fp32 (the cpu and reference
    backends compute in float32 / float64 whatever is asked); DeviceError for an unknown name."""
    preset = zoo.PRESETS.get(model)
    on_cuda = parse_device(device)[0] == "cuda"
    return parse_precision(asked or (preset.precision if preset and on_cuda else None))


def make_config(cfg: RunConfig) -> dict:
    """The config dict of a new run: flags resolved against the model preset; checked, nothing loaded yet."""
    preset = zoo.PRESETS.get(cfg.model)
    device = cfg.device or best_device()
    precision = run_precision(cfg.model, device, cfg.precision)
    get_backend(device, precision)  # DeviceError now, not after loading the data
    if cfg.limit is not None:
        check_positive_int(cfg.limit, "limit")
    if cfg.dataset not in DATASETS:
        raise UsageError(f"--dataset: unknown data set {cfg.dataset!r} (expected one of {', '.join(DATASETS)})")
    recipe = _recipe(cfg, preset)
    hrandom.seed(cfg.seed)
    spec = zoo.resolve(cfg.model)[2]
    dist = parallel.current()
    if dist is not None:          # --batch-size and the presets' batches are per rank; the recipe holds the global
        recipe["batch_size"] *= dist.world
    return {
        **_parallel_entry(dist),
        "model": cfg.model, "spec": spec, "adapt_classes": preset is not None,
        "dataset": cfg.dataset, "data": None if cfg.data is None else str(Path(cfg.data).resolve()),
        "device": device, "precision": precision, "recipe": recipe, "val_fraction": cfg.val_fraction,
        "seed": int(cfg.seed),
        "limit": cfg.limit, "skip_bad_images": bool(cfg.skip_bad_images),
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join(sys.argv), "versions": versions(),
    }


def _parallel_entry(dist, sync_bn: bool | None = None) -> dict:
    """config.json's "parallel": how many ranks run it (the recipe's batch_size is the global batch, each rank
    takes batch_size / world_size) and whether BatchNorm is synchronised (nothing for a single process)."""
    if dist is None:
        return {}
    return {"parallel": {"world_size": dist.world, "sync_bn": dist.sync_bn if sync_bn is None else bool(sync_bn)}}


def default_run_dir(model: str, dataset: str) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    name = Path(model).stem if model.endswith(".json") else model
    return Path("runs") / f"{stamp}-{name}-{dataset}"


# --- writing the run directory ---------------------------------------------------------------------------------


def _write_metrics(run_dir: Path, history: list) -> None:
    lines = "".join(json.dumps(r) + "\n" for r in records_iter(history))
    atomic_write_text(run_dir / "metrics.jsonl", lines)


def _checkpoint(run_dir: Path, p: _Prepared, epoch: int, history: list) -> None:
    state = {"epoch": epoch, "rng": hrandom.get_state(), "metrics": records_iter(history), "config": p.config,
             "mean": p.mean, "std": p.std, "class_names": p.class_names, "fingerprint": p.fingerprint}
    serialize.save_checkpoint(run_dir, p.model, p.optimizer, p.schedule, state, p.average, p.lookahead)


def _ranks(batch: int) -> str:
    """' (4 ranks x 128, synchronised BatchNorm)' in a data-parallel job, else ''."""
    dist = parallel.current()
    if dist is None:
        return ""
    ranks = f"{dist.world} rank{'s' if dist.world > 1 else ''}"
    return f" ({ranks} x {batch // dist.world}{', synchronised BatchNorm' if dist.sync_bn else ''})"


def _describe(p: _Prepared, run_dir: Path) -> str:
    r, c = p.config["recipe"], p.config
    split = f"{p.counts['train']} train"
    if p.counts["val"]:
        split += f", {p.counts['val']} val"
    if p.counts["test"]:
        split += f", {p.counts['test']} test"
    skipped = f" ({p.skipped} unreadable images skipped)" if p.skipped else ""
    per_epoch, n = len(p.train_loader), p.counts["train"]
    steps = (f" ({total_steps(r['epochs'], per_epoch)} steps, {per_epoch} per epoch)"
             if r["epochs"] != math.ceil(r["epochs"]) else "")
    dropped = (f" (a partial batch of {n % r['batch_size']} left out each epoch)"
               if train_drop_last(r, n) and n % r["batch_size"] else "")
    return (f"training {c['model']} on {c['dataset']} ({split} from {p.data_source}){skipped} on {c['device']}: "
            f"{format_epochs(r['epochs'])} epochs{steps}, batch {r['batch_size']}{_ranks(r['batch_size'])}{dropped}, "
            f"{r['optimizer']} lr {r['lr']:g} {r['schedule']}, "
            f"weight decay {r['weight_decay']:g}, augment {','.join(r['augment']) or 'none'}"
            + (f", weight average {r['ema']:g}" if r.get("ema") else "")
            + (f", lookahead every {r['lookahead']} steps" if r.get("lookahead") else "")
            + (f", {len(r['param_groups'])} parameter group rule(s)" if r.get("param_groups") else "")
            + (f", first bias frozen after epoch {r['whiten_bias_epochs']}" if r.get("whiten_bias_epochs") else "")
            + (f", test-time augmentation {r['tta']} ({TTA_NAMES[r['tta']]})" if r.get("tta") else "")
            + f", seed {c['seed']}"
            f"\nrun directory: {run_dir}")


def train_run(cfg: RunConfig, log: Callable[[str], None] | None = default_log, progress: bool | None = None,
              on_epoch: Callable[[dict], None] | None = None) -> RunResult:
    """Train a new run into cfg.out (default runs/<UTC time>-<model>-<dataset>)."""
    config = make_config(cfg)
    run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg.model, cfg.dataset)
    return start_run(config, run_dir, log, progress, on_epoch, cache=cfg.cache)


RERUN_KEYS = ("model", "spec", "dataset", "data", "device", "recipe", "val_fraction", "seed", "limit",
              "skip_bad_images")


def rerun_config(path: str | Path, flags: dict | None = None) -> dict:
    """The config of a new run repeating the run whose config.json is `path` (or a run directory holding one): the
    same spec, data, split, recipe, seed and device, so that on the cpu backend it trains to the same weights and
    metrics. `flags` (RunConfig field -> value, only the flags given) change what they name; a new --model brings
    its spec (the recipe stays the run's)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        old = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"--config: {path}: no such file (expected a run's config.json)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"--config: {path}: not a readable run config ({e})") from None
    missing = [k for k in ("spec", "dataset", "device", "recipe", "seed", "val_fraction") if
               not isinstance(old, dict) or k not in old]
    if missing:
        raise UsageError(f"--config: {path}: not a hetnet run config (missing {', '.join(missing)})")
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    config = {k: json.loads(json.dumps(old.get(k))) for k in RERUN_KEYS}
    config["adapt_classes"] = False             # the spec was fitted to the data's classes when the run was made
    if "model" in flags:
        hrandom.seed(int(flags.get("seed", config["seed"])))
        config["model"], config["spec"] = flags["model"], zoo.resolve(flags["model"])[2]
        config["adapt_classes"] = flags["model"] in zoo.PRESETS
    else:
        try:
            zoo.build_from_spec(config["spec"], f"--config: {path}: spec")
        except ModelFileError as e:
            raise UsageError(str(e)) from None
    recipe_keys = ("epochs", "batch_size", "lr", "optimizer", "schedule", "weight_decay", "warmup_epochs",
                   "label_smoothing", "ema", "augment", "tta")
    if not isinstance(config["recipe"], dict):
        raise UsageError(f"--config: {path}: incomplete recipe (expected {', '.join(recipe_keys)})")
    recipe = {"tta": 0, **config["recipe"],             # tta: configs written before it existed had none
              **{k: flags[k] for k in recipe_keys + RECIPE_EXTRA if k in flags}}
    if any(k not in recipe for k in recipe_keys):
        raise UsageError(f"--config: {path}: incomplete recipe (expected {', '.join(recipe_keys)})")
    config["recipe"] = _recipe(RunConfig(**{k: recipe[k] for k in recipe_keys + RECIPE_EXTRA if k in recipe}), None)
    dist = parallel.current()
    if dist is not None:
        if "batch_size" in flags:       # per rank, as for a new run
            config["recipe"]["batch_size"] *= dist.world
        config.update(_parallel_entry(dist, dist.sync_bn or (old.get("parallel") or {}).get("sync_bn")))
    for k in ("dataset", "device", "precision", "seed", "limit", "val_fraction", "skip_bad_images"):
        if k in flags:
            config[k] = flags[k]
    if "data" in flags:
        config["data"] = str(Path(flags["data"]).resolve())
    elif "dataset" in flags and flags["dataset"] != old.get("dataset"):
        config["data"] = None
    if ("dataset" in flags or "data" in flags) and "val_fraction" not in flags:
        config["val_fraction"] = None           # the new data's default
    if config["dataset"] not in DATASETS:
        raise UsageError(f"--dataset: unknown data set {config['dataset']!r} (expected one of {', '.join(DATASETS)})")
    get_backend(config["device"], config.get("precision"))
    if config.get("limit") is not None:
        check_positive_int(config["limit"], "limit")
    config.update({"created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                   "command": " ".join(sys.argv), "versions": versions(), "rerun_of": str(path)})
    return config


def start_run(config: dict, run_dir: str | Path, log: Callable[[str], None] | None = default_log,
              progress: bool | None = None, on_epoch: Callable[[dict], None] | None = None,
              cache: bool = True) -> RunResult:
    """Train a new run from a config dict (make_config, rerun_config) into run_dir (cache: see prepare). In a
    data-parallel job rank 0 alone checks and writes the directory (hetnet.parallel)."""
    run_dir = Path(run_dir)
    root = _is_root()
    if root and run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--out: {run_dir} exists and is not a directory")
    if root and ((run_dir / "config.json").exists() or serialize.checkpoint_path(run_dir).exists() or
                 (run_dir / "model.safetensors").exists()):
        raise UsageError(f"--out: {run_dir} already holds a run; continue it with --resume {run_dir} or choose "
                         f"another --out")
    p = prepare(config, log, cache=cache, progress=progress)
    config["run_dir"] = str(run_dir)
    config["data_source"] = p.data_source
    config["input_shape"] = list(p.input_shape)
    config["class_names"] = p.class_names
    config["counts"] = p.counts
    if root:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"--out: cannot create {run_dir}: {e.strerror}") from None
        with _solo():
            # the epoch-0 checkpoint first: a directory with a config.json always has a checkpoint to resume from
            _checkpoint(run_dir, p, 0, [])
            atomic_write_text(run_dir / "config.json", json.dumps(config, indent=2) + "\n")
            _write_metrics(run_dir, [])
    if log:
        log(_describe(p, run_dir))
    return _run_epochs(run_dir, p, 0, [], log, progress, on_epoch)


def resume_run(run_dir: str | Path, log: Callable[[str], None] | None = default_log, progress: bool | None = None,
               on_epoch: Callable[[dict], None] | None = None, epochs: int | float | None = None,
               cache: bool = True) -> RunResult:
    """Continue an interrupted run from its checkpoint (see the module docstring). epochs: train to this many
    epochs instead of the configured number, which also extends a finished run (its schedule is rebuilt for the
    new length and continues from where it was); after a cut last epoch, only to more epochs than it has begun."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"--resume: {run_dir} is not a run directory")
    if not serialize.checkpoint_path(run_dir).exists():
        raise UsageError(f"--resume: {run_dir} has no checkpoint ({serialize.checkpoint_path(run_dir)} missing)")
    ckpt = serialize.read_checkpoint(run_dir)
    state = ckpt.state
    config = state.get("config")
    needed = ("spec", "dataset", "device", "recipe", "seed", "val_fraction")
    if not isinstance(config, dict) or any(k not in config for k in needed) or \
            not isinstance(state.get("epoch"), int) or not isinstance(state.get("metrics"), list):
        raise ModelFileError(f"{ckpt.path}: checkpoint metadata is incomplete (config/epoch/metrics missing)")
    if not isinstance(ckpt.optimizer.get("steps"), int):
        raise ModelFileError(f"{ckpt.path}: checkpoint metadata is incomplete (the optimiser's step count missing)")
    done, planned = state["epoch"], config["recipe"].get("epochs")
    if not _is_epochs(planned):
        raise ModelFileError(f"{ckpt.path}: the checkpoint's recipe has no valid epochs (got {planned!r})")
    trained = epochs_trained(done, planned)         # below done when the last epoch done was cut short
    finished = (run_dir / "model.safetensors").exists()
    if epochs is None and finished and done >= planned:
        raise UsageError(f"--resume: the run in {run_dir} has already finished ({format_epochs(trained)} epochs; "
                         f"model.safetensors is there); extend it with --resume {run_dir} --epochs N, N > {done}")
    if epochs is not None:
        epochs = check_epochs(epochs)
        if epochs < trained or (epochs == trained and finished):
            raise UsageError(f"--epochs: the run in {run_dir} has already trained {format_epochs(trained)} epochs; "
                             f"give more to extend it")
        if trained < epochs <= done:
            raise UsageError(f"--epochs: the run in {run_dir} stopped part-way through epoch {done} "
                             f"({format_epochs(trained)} epochs); give more than {done} to extend it")
    if epochs is not None and epochs != planned:
        config["recipe"]["epochs"] = epochs
        config.setdefault("epochs_before", []).append(planned)
    root = _is_root()
    for stale in [*run_dir.glob(".*.tmp"), *run_dir.glob(".*.tmp.png"), *ckpt.path.parent.glob(".*.tmp")]:
        if root:
            stale.unlink(missing_ok=True)   # left by a kill in the middle of an atomic write
    p = prepare(config, log, cache=cache, progress=progress, trained=(done, ckpt.optimizer["steps"]))
    if p.fingerprint != state.get("fingerprint"):
        raise UsageError(f"--resume: the training data at {p.data_source} differ from the data this run started "
                         f"with")
    serialize.restore_checkpoint(ckpt, p.model, p.optimizer, p.schedule, p.average, p.lookahead)
    try:
        hrandom.set_state(state["rng"])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFileError(f"{ckpt.path}: bad RNG state in checkpoint: {e}") from None
    p.mean, p.std = state.get("mean", p.mean), state.get("std", p.std)
    history = list(state["metrics"])[:state["epoch"]]
    if config["recipe"]["epochs"] != planned:
        if root:
            with _solo():
                atomic_write_text(run_dir / "config.json", json.dumps(config, indent=2) + "\n")
        if config["recipe"]["schedule"] != "constant" or config["recipe"]["warmup_epochs"]:
            note(f"the {config['recipe']['schedule']} schedule now spans {format_epochs(config['recipe']['epochs'])} "
                 f"epochs instead of {format_epochs(planned)}: epoch {done + 1} starts at learning rate "
                 f"{p.optimizer.lr:.4g}")
    if root:
        with _solo():
            _write_metrics(run_dir, history)
    if log:
        log(_describe(p, run_dir) + f"\nresuming after epoch {done}/{format_epochs(config['recipe']['epochs'])}")
    return _run_epochs(run_dir, p, state["epoch"], history, log, progress, on_epoch)


def _is_root() -> bool:
    """Whether this process writes the run directory: a single process, or rank 0 of a data-parallel job."""
    dist = parallel.current()
    return dist is None or dist.is_root


def _solo():
    """A block of rank 0's own work (files) that the data-parallel watchdog does not time."""
    dist = parallel.current()
    return dist.solo() if dist is not None else contextlib.nullcontext()


def _run_epochs(run_dir: Path, p: _Prepared, start: int, history: list, log, progress, on_epoch) -> RunResult:
    epochs = p.config["recipe"]["epochs"]
    dist = parallel.current()
    if dist is not None:
        dist.fork_random()
    trainer = Trainer(p.model, p.optimizer, p.schedule, p.config["recipe"]["label_smoothing"], progress=progress,
                      log=log, average=p.average, lookahead=p.lookahead, frozen_after=p.frozen_after,
                      tta=p.config["recipe"].get("tta", 0), dist=dist)
    t0 = time.perf_counter()

    best_key = "val_accuracy" if p.val_loader is not None else ("test_accuracy" if p.test_loader is not None else None)

    def after_epoch(rec: dict, hist: list) -> None:
        if _is_root():
            with _solo():
                _after_epoch(rec, hist)

    def _after_epoch(rec: dict, hist: list) -> None:
        # the best epoch's weights (as evaluated: the average, if any) first, then the checkpoint; a kill between
        # the two repeats the epoch on resume and writes the same file again
        if best_key is not None and rec[best_key] > max((r[best_key] for r in hist[:-1]), default=-math.inf):
            info = {**_model_info(p), "epoch": rec["epoch"], "selected_by": best_key, best_key: rec[best_key]}
            if p.average is not None:
                with p.average.applied():
                    serialize.save_model(run_dir / BEST_MODEL, p.model, p.spec, p.mean, p.std, p.class_names, info)
            else:
                serialize.save_model(run_dir / BEST_MODEL, p.model, p.spec, p.mean, p.std, p.class_names, info)
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
    model_path = run_dir / "model.safetensors"   # written last: its presence marks a finished run
    if not _is_root():
        return RunResult(run_dir, history, model_path, seconds)
    info = _model_info(p)
    with _solo():
        _plots(run_dir, p, history, trainer.final_predictions)
        serialize.save_model(model_path, p.model, p.spec, p.mean, p.std, p.class_names, info)
    summary = _summary(run_dir, history, epochs)
    if log:
        log(summary)
    return RunResult(run_dir, history, model_path, seconds, summary)


def _model_info(p: _Prepared) -> dict:
    """What a model file of this run says about where it came from (evaluate reads dataset, data, split)."""
    return {"dataset": p.config["dataset"], "data": p.config.get("data"), "val_fraction": p.config["val_fraction"],
            "seed": p.config["seed"], "limit": p.config.get("limit"), "model": p.config.get("model"),
            "epochs": p.config["recipe"]["epochs"], "precision": p.config.get("precision", "fp32"),
            "tta": p.config["recipe"].get("tta", 0)}


def _plots(run_dir: Path, p: _Prepared, history: list, evaluated: dict | None = None) -> None:
    """curves.png, and confusion.png of the test split (else validation, else training): from the predictions of the
    last epoch's evaluation when the trainer kept them (`evaluated`, Trainer.final_predictions), else predicted
    again as that evaluation did."""
    plots.curves(history, run_dir / "curves.png")
    loader, split = (p.test_loader, "test") if p.test_loader is not None else (
        (p.val_loader, "validation") if p.val_loader is not None else (p.train_loader, "training"))
    tta = p.config["recipe"].get("tta", 0)      # as the last epoch was evaluated
    kept = (evaluated or {}).get({"test": "test", "validation": "val"}.get(split))
    if kept is not None:
        pred, true = kept
    else:
        loader = getattr(loader, "whole", loader)           # a rank's shard: the whole set (hetnet.parallel)
        if split == "training":
            host = getattr(loader, "host", loader)          # a ResidentLoader's BatchLoader
            loader = hdata.BatchLoader(host.x, host.y, EVAL_BATCH, host.mean, host.std, shuffle=False)
        pred, true = predict_labels(p.model, loader, tta)
    plots.confusion(confusion_matrix(pred, true, len(p.class_names)), p.class_names, run_dir / "confusion.png",
                    title=f"confusion matrix, {split} set ({len(true)} images)" + (f", TTA {tta}" if tta else ""))


def _summary(run_dir: Path, history: list, epochs) -> str:
    last = history[-1] if history else {}
    split = "test" if last.get("test_accuracy") is not None else ("val" if last.get("val_accuracy") is not None
                                                                  else "train")
    key = f"{split}_accuracy"
    total = sum(r["seconds"] for r in history)
    best = max(history, key=lambda r: r[key]) if history else None
    # model-best.safetensors is chosen on the validation split when there is one (see _run_epochs)
    sel = "val_accuracy" if last.get("val_accuracy") is not None else key
    chosen = max(history, key=lambda r: r[sel]) if history else None
    done = format_epochs(epochs_trained(len(history), epochs))
    lines = [f"done: {done}/{format_epochs(epochs)} epochs in {int(total) // 60}:{int(total) % 60:02d}; "
             f"{split} accuracy {100 * last.get(key, float('nan')):.2f}%"
             + (f" with test-time augmentation {last['tta']}" if last.get("tta") and split != "train" else "")
             + (f" (best {100 * best[key]:.2f}% at epoch {best['epoch']})" if best else ""),
             (f"artefacts in {run_dir}/: model.safetensors"
              + (f", {BEST_MODEL} (epoch {chosen['epoch']}, best {sel.replace('_', ' ')})"
                 if (run_dir / BEST_MODEL).exists() and chosen else "")
              + ", metrics.jsonl, curves.png, confusion.png, config.json, checkpoint/")]
    return "\n".join(lines)


# --- listing runs ---------------------------------------------------------------------------------------------


def _is_epochs(v) -> bool:
    """Whether v is a number of epochs that check_epochs accepts (a config read back from disk)."""
    try:
        check_epochs(v)
    except UsageError:
        return False
    return True


def epochs_trained(records: int, planned) -> int | float:
    """The epochs a run has trained after `records` epochs of a plan of `planned`: the plan itself once its last
    epoch is done (a cut one, for a fractional plan: 10 records of 9.9 are 9.9 epochs), else `records`."""
    return planned if planned is not None and records >= math.ceil(planned) else records


def list_runs(root: str | Path = "runs") -> list[dict]:
    """One summary per run directory under root (or root itself, if it is one), oldest name first: run, model,
    data, epochs done / planned, status, the accuracy split, best accuracy and its epoch, final accuracy, seconds
    of training. A run whose files cannot be read is listed with the reason as its status."""
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"{root}: no such directory of runs")
    dirs = [root] if (root / "config.json").is_file() else \
        sorted(d for d in root.iterdir() if d.is_dir() and (d / "config.json").is_file())
    return [_run_summary(d) for d in dirs]


def _run_summary(run_dir: Path) -> dict:
    row = {"run": str(run_dir), "model": "?", "data": "?", "epochs": 0, "planned": None, "status": "?",
           "split": None, "best": None, "best_epoch": None, "final": None, "seconds": 0.0}
    try:
        cfg = json.loads((run_dir / "config.json").read_text())
        lines = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines() if s.strip()]
    except FileNotFoundError as e:
        return {**row, "status": f"no {Path(e.filename).name}"}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {**row, "status": "unreadable config.json or metrics.jsonl"}
    recipe = cfg.get("recipe") if isinstance(cfg.get("recipe"), dict) else {}
    planned = recipe.get("epochs")
    if not _is_epochs(planned):
        planned = None
    data = cfg.get("data")
    row.update(model=str(cfg.get("model") or "spec"), planned=planned, epochs=epochs_trained(len(lines), planned),
               data=str(cfg.get("dataset")) + (f" ({Path(data).name})" if data else ""),
               seconds=float(sum(r.get("seconds") or 0 for r in lines)))
    finished = (run_dir / "model.safetensors").is_file() and row["planned"] is not None and \
        row["epochs"] >= row["planned"]
    row["status"] = "finished" if finished else "stopped"
    for split in ("val", "test", "train"):
        values = [(r.get(f"{split}_accuracy"), r.get("epoch")) for r in lines if r.get(f"{split}_accuracy") is not None]
        if values:
            best = max(values, key=lambda v: v[0])
            row.update(split=split, best=best[0], best_epoch=best[1], final=values[-1][0])
            break
    return row


def format_runs(rows: list[dict]) -> list[str]:
    """`hetnet runs` as a table, one line per run."""
    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}%"

    table = [("run", "model", "data", "epochs", "status", "split", "best (epoch)", "final", "time")]
    for r in rows:
        t = int(r["seconds"])
        table.append((Path(r["run"]).name, r["model"], r["data"],
                      f"{format_epochs(r['epochs'])}/{'?' if r['planned'] is None else format_epochs(r['planned'])}",
                      r["status"],
                      r["split"] or "-", f"{pct(r['best'])} ({r['best_epoch']})" if r["best"] is not None else "-",
                      pct(r["final"]), f"{t // 60}:{t % 60:02d}"))
    widths = [max(len(str(row[i])) for row in table) for i in range(len(table[0]))]
    return ["  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in table]


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


def describe_model_file(target: str | Path) -> list[str]:
    """`hetnet info RUN_DIR|MODEL_FILE`: a saved model's layers (zoo.describe_layers), its classes, normalisation
    and what it was trained on."""
    path = resolve_model_path(target)
    lm = serialize.load_model(path, device="cpu")
    info = lm.info
    lines = [str(path)] + zoo.describe_layers(lm.model, lm.input_shape)
    lines.append(f"classes ({len(lm.class_names)}): {', '.join(lm.class_names)}")
    lines.append("normalisation: mean " + ", ".join(f"{v:.4g}" for v in lm.mean) + "; std "
                 + ", ".join(f"{v:.4g}" for v in lm.std))
    trained = [f"{k} {info[k]}" for k in ("model", "dataset", "data", "limit", "epochs", "precision", "tta")
               if info.get(k) is not None]
    if trained:
        lines.append("trained: " + ", ".join(trained))
    return lines


def evaluate_model(target: str | Path, dataset: str | None = None, data: str | None = None,
                   device: str | None = None, log: Callable[[str], None] | None = default_log,
                   split: str | None = None, precision: str | None = None, tta: int | None = None,
                   cache: bool = True) -> dict:
    """Loss, accuracy, per-class accuracy and confusion matrix of a saved model.

    On the data the model was trained on (no `data` / `dataset` given): its test split, else the validation split
    it was trained with. On other data (a folder or archive of <class>/..., test/<class>/... or both, an IDX folder
    with only the t10k files, ...): every image, or the split named by `split` ("train", "test", "all") when both
    exist (default: test). Classes are matched by name: a class the model does not know is an error; data holding
    only some of the model's classes are scored on those, with a note.

    tta: test-time augmentation level (hetnet.train.tta_logits: 0 none, 1 mirror, 2 mirror + translate, 3 shift);
    None: the level the model's run evaluated its last epoch with (0 for models saved without one). cache=False: image
    folders are decoded without the cache of decoded images."""

    path = resolve_model_path(target)
    device = device or best_device()
    get_backend(device, precision)
    if split not in (None, "train", "test", "all"):
        raise UsageError(f"--split: expected train, test or all, got {split!r}")
    lm = serialize.load_model(path, device=device)
    if precision is None:
        precision = lm.info.get("precision")
    lm.model.to(device, precision)
    info = lm.info
    tta = check_tta(int(info.get("tta") or 0) if tta is None else tta)
    name = dataset or info.get("dataset") or "fashion-mnist"
    trained_on = name == info.get("dataset") and (data is None or _same_path(data, info.get("data")))
    if data is None and dataset in (None, info.get("dataset")):
        data = info.get("data")
    ds = load_data(name, data, lm.input_shape, require_train=False, cache=cache)
    has = {"train": len(ds.train_x) > 0, "test": ds.test_x is not None and len(ds.test_x) > 0}
    where = f"{name} at {ds.source}"
    if split is not None and split != "all" and not has[split]:
        raise UsageError(f"--split: {where} has no {split} split")
    if split == "all" or (split is None and not has["test"] and not trained_on):
        parts = [(getattr(ds, f"{s}_x"), getattr(ds, f"{s}_y")) for s in ("train", "test") if has[s]]
        x = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
        y = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
        kind = "train and test sets" if has["train"] and has["test"] else "images"
    elif split == "train":
        x, y, kind = ds.train_x, ds.train_y, "train set"
    elif has["test"]:
        x, y, kind = ds.test_x, ds.test_y, "test set"
    else:   # the model's own training data, which has no test split: the validation split it was trained with
        vf, seed = float(info.get("val_fraction") or 0.0), int(info.get("seed") or 0)
        if vf > 0:
            _, _, x, y = hdata.split_train_val(ds.train_x, ds.train_y, vf, seed)
            kind = "validation set"
        else:
            x, y, kind = ds.train_x, ds.train_y, "images (the training data: no test or validation split)"
    y, scored = _match_classes(ds.class_names, y, lm.class_names, where, path)
    notes = []
    if len(scored) < len(lm.class_names):
        missing = [c for c in lm.class_names if c not in scored]
        notes.append(f"{where} holds {len(scored)} of the model's {len(lm.class_names)} classes: accuracy is over "
                     f"images of those (none of {', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''})")
        note(notes[-1])
    loader = hdata.on_device(hdata.BatchLoader(x, y, EVAL_BATCH, lm.mean, lm.std, shuffle=False), lm.model.backend)
    loss, acc = evaluate(lm.model, loader, tta=tta)
    pred, true = predict_labels(lm.model, loader, tta)
    cm = confusion_matrix(pred, true, len(lm.class_names))
    per_class = {c: (float(cm[i, i] / cm[i].sum()) if cm[i].sum() else None) for i, c in enumerate(lm.class_names)}
    result = {"model": str(path), "dataset": name, "source": str(ds.source), "split": kind, "images": int(len(y)),
              "tta": tta, "loss": loss, "accuracy": acc, "per_class_accuracy": per_class, "confusion": cm.tolist(),
              "classes_scored": scored, "notes": notes + ([ds.adapted.note()] if ds.adapted else [])}
    if log:
        log(f"{path} on {name} {kind} ({len(y)} images from {ds.source}): loss {loss:.4f}, "
            f"accuracy {100 * acc:.2f}%" + (f" (test-time augmentation {tta}: {TTA_NAMES[tta]})" if tta else ""))
        width = max(len(c) for c in lm.class_names)
        for c, a in per_class.items():
            log(f"  {c:<{width}}  {'-' if a is None else f'{100 * a:6.2f}%'}")
    return result


def _same_path(a, b) -> bool:
    return b is not None and Path(a).resolve() == Path(b).resolve()


def _match_classes(data_names: list, y: np.ndarray, model_names: list, where: str, path: Path):
    """Labels y (indices into data_names) as indices into model_names, matched by name, and the model's classes
    that have images, in the model's order; UsageError for a class the model does not know."""
    index = {c: i for i, c in enumerate(model_names)}
    present = [str(data_names[i]) for i in np.unique(y)]
    unknown = [c for c in present if c not in index]
    if unknown:
        raise UsageError(f"--data: {where} has classes the model in {path} does not know: "
                         f"{', '.join(unknown[:5])}{', ...' if len(unknown) > 5 else ''} (its classes: "
                         f"{', '.join(model_names[:10])}{', ...' if len(model_names) > 10 else ''})")
    if not present:
        raise UsageError(f"--data: {where} holds no images to score")
    to_model = np.array([index.get(str(c), -1) for c in data_names], dtype=np.int64)
    scored = [c for c in model_names if c in set(present)]
    return to_model[y], scored


def export_model_file(target: str | Path, out: str | Path | None = None, fmt: str = "onnx") -> tuple[Path, str]:
    """`hetnet export`: the model file (or run directory) `target` as ONNX at `out` (default: beside the model file,
    same name, .onnx). Returns (written path, one line describing the graph)."""
    if fmt != "onnx":
        raise UsageError(f"--format: unknown format {fmt!r} (expected onnx)")
    export.import_onnx()                                  # before reading anything: say what to install first
    path = resolve_model_path(target)
    lm = serialize.load_model(path, device="cpu")
    out = Path(out) if out is not None else path.with_suffix(".onnx")
    if out.is_dir():
        raise UsageError(f"--out: {out} is a directory; expected a file name such as {out / 'model.onnx'}")
    export.export_onnx(lm.model, out, lm.input_shape, lm.mean, lm.std, lm.class_names)
    k = lm.model.output_shape(lm.input_shape)
    shape = ", ".join(map(str, lm.input_shape))
    return out, (f"wrote {out} (ONNX opset {export.OPSET}): input {export.INPUT_NAME} float32 [N, {shape}] in [0, 1], "
                 f"normalised inside the graph; output {export.OUTPUT_NAME} [N, {', '.join(map(str, k))}] "
                 f"for {len(lm.class_names)} classes")
