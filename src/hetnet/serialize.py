"""Model files and checkpoints: safetensors for arrays, JSON in the safetensors metadata for everything else.

Never pickle. Every write is atomic (a temporary file in the same folder, fsync, os.replace), so a reader (or a run
killed at any moment) sees either the old file or the new one. Every read checks that the file is a safetensors file,
that it is hetnet's, and that its arrays fit the model spec it carries; anything else is a ModelFileError naming the
file.

    >>> import hetnet as hn
    >>> from hetnet import serialize, zoo
    >>> model, shape, spec = zoo.resolve("mlp")
    >>> serialize.save_model("m.safetensors", model, spec, mean=[72.9], std=[90.0],
    ...                      class_names=[str(i) for i in range(10)])                    # doctest: +SKIP
    >>> loaded = serialize.load_model("m.safetensors", device="cpu")                       # doctest: +SKIP
    >>> loaded.model, loaded.class_names, loaded.mean                                      # doctest: +SKIP
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import safetensors.numpy as stnp

from . import random as hrandom
from .errors import ModelFileError, UsageError
from .files import atomic_write_bytes, safetensors_bytes
from .model import Sequential
from .version import __version__
from .zoo import build_from_spec

MODEL_FORMAT = "hetnet-model"
CHECKPOINT_FORMAT = "hetnet-checkpoint"
FORMAT_VERSION = "1"
_MAX_HEADER = 100 * 1024 * 1024


# --- raw safetensors I/O ---------------------------------------------------------------------------------------


def write_safetensors(path: str | Path, arrays: dict, metadata: dict) -> None:
    """arrays: name -> NumPy array; metadata: name -> JSON-serialisable value (stored as JSON strings)."""
    meta = {k: json.dumps(v) for k, v in metadata.items()}
    atomic_write_bytes(path, safetensors_bytes(arrays, meta))


def read_safetensors(path: str | Path, what: str = "model file") -> tuple[dict, dict]:
    """(arrays, metadata with JSON values decoded); ModelFileError naming the file for anything unreadable."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ModelFileError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise ModelFileError(f"{path}: expected a {what}, found a directory") from None
    except OSError as e:
        raise ModelFileError(f"{path}: cannot read {what}: {e.strerror}") from None
    # header: 8-byte little-endian length, then that many bytes of JSON
    if len(data) < 8:
        raise ModelFileError(f"{path}: not a safetensors {what} (only {len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > _MAX_HEADER or 8 + n > len(data):
        raise ModelFileError(f"{path}: not a safetensors {what}, or truncated (header length {n}, "
                             f"file size {len(data)})")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelFileError(f"{path}: not a safetensors {what} (unreadable header)") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{path}: not a safetensors {what} (header is not a JSON object)")
    raw_meta = header.get("__metadata__") or {}
    try:
        arrays = stnp.load(data)
    except Exception as e:  # SafetensorError and friends: truncated data, bad offsets, unknown dtypes
        raise ModelFileError(f"{path}: corrupt or truncated safetensors {what}: {e}") from None
    meta = {}
    for k, v in raw_meta.items():
        try:
            meta[k] = json.loads(v)
        except (TypeError, json.JSONDecodeError):
            meta[k] = v
    return arrays, meta


def _expect_format(path: Path, meta: dict, fmt: str, what: str) -> None:
    found = meta.get("format")
    if found != fmt:
        if found in (MODEL_FORMAT, CHECKPOINT_FORMAT):
            raise ModelFileError(f"{path}: expected a {what}, found a {found} file")
        raise ModelFileError(f"{path}: a safetensors file, but not a hetnet {what} (no 'format: {fmt}' metadata)")
    if str(meta.get("format_version")) != FORMAT_VERSION:
        raise ModelFileError(f"{path}: {what} format version {meta.get('format_version')!r} is not supported "
                             f"(expected {FORMAT_VERSION})")


def _model_from_spec(path: Path, spec, arrays: dict, prefix: str, device: str | None):
    """Build the model its spec describes and load its arrays (names `prefix + state_dict name`)."""

    model, input_shape = build_from_spec(spec, f"{path}: spec")
    own = dict(model.named_arrays())
    stored = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
    missing = sorted(set(own) - set(stored))
    unexpected = sorted(set(stored) - set(own))
    if missing or unexpected:
        raise ModelFileError(f"{path}: arrays do not match the model spec (missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]})")
    for k, arr in own.items():
        if tuple(stored[k].shape) != tuple(arr.shape):
            raise ModelFileError(f"{path}: array {k!r} has shape {tuple(stored[k].shape)}, the spec needs "
                                 f"{tuple(arr.shape)}")
        if stored[k].dtype.kind != "f":
            raise ModelFileError(f"{path}: array {k!r} has dtype {stored[k].dtype}, expected floating point")
        if not np.all(np.isfinite(stored[k])):
            raise ModelFileError(f"{path}: array {k!r} holds NaN or infinite values")
    if device is not None:
        model.to(device)
    model.load_state_dict(stored)
    return model, input_shape


# --- model files -----------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A model read from a model file, with everything needed to feed it images."""
    model: object
    input_shape: tuple
    spec: dict
    mean: list
    std: list
    class_names: list
    info: dict = field(default_factory=dict)   # dataset, data path, split, recipe: whatever the writer stored
    path: Path | None = None


def save_model(path: str | Path, model, spec: dict, mean, std, class_names, info: dict | None = None) -> None:
    """Write final weights (+ BN statistics), normalisation and class names atomically. Everything is checked
    first (the spec rebuilds a model whose arrays are the model's, one class name per output, one mean and one
    std > 0 per input channel): a file that could not be loaded back is never written (UsageError naming it)."""

    mean, std, class_names = _check_saveable(Path(path), model, spec, mean, std, class_names)
    metadata = {"format": MODEL_FORMAT, "format_version": FORMAT_VERSION, "hetnet_version": __version__,
                "spec": spec, "mean": [float(v) for v in mean], "std": [float(v) for v in std],
                "class_names": [str(c) for c in class_names], "info": info or {}}
    write_safetensors(path, model.state_dict(), metadata)


def _check_saveable(path: Path, model, spec, mean, std, class_names) -> tuple[list, list, list]:
    """(mean, std, class names) as plain lists, or UsageError("<path>: cannot save the model: ...")."""

    def refuse(why: str):
        return UsageError(f"{path}: cannot save the model: {why}")

    if not isinstance(spec, dict) or not spec:
        raise refuse(f"expected a model spec {{'input_shape': [C, H, W], 'layers': [...]}}, got {spec!r:.60}")
    try:
        with hrandom.preserved():       # building the check model draws initial weights: not from the run's sequence
            twin, shape = build_from_spec(spec, "spec")
    except ModelFileError as e:
        raise refuse(str(e)) from None
    try:
        own = {k: tuple(v.shape) for k, v in model.named_arrays()}
    except AttributeError:
        raise refuse(f"expected a hetnet model, got {type(model).__name__}") from None
    want = {k: tuple(v.shape) for k, v in twin.named_arrays()}
    if own != want:
        diff = sorted(set(own.items()) ^ set(want.items()))[:3]
        raise refuse(f"the spec does not describe this model (arrays differ: {diff})")
    c, out = shape[0], twin.output_shape(shape)
    values = []
    for name, v in (("mean", mean), ("std", std)):
        try:
            v = [float(x) for x in np.asarray(v, dtype=np.float64).reshape(-1)]
        except (TypeError, ValueError):
            v = None
        if v is None or len(v) != c or not all(np.isfinite(v)) or (name == "std" and min(v) <= 0):
            raise refuse(f"{name} must be {c} finite number(s){' > 0' if name == 'std' else ''}, one per input "
                         f"channel, got {v if v is not None else mean if name == 'mean' else std!r}")
        values.append(v)
    if isinstance(class_names, (str, bytes)) or not hasattr(class_names, "__len__") or len(out) != 1 \
            or len(class_names) != out[0]:
        raise refuse(f"expected {out[0] if len(out) == 1 else 'one per output'} class names, got {class_names!r:.80}")
    return values[0], values[1], [str(name) for name in class_names]


def save(model, path: str | Path, classes=None, mean=None, std=None, input_shape=None, info: dict | None = None):
    """Save any Sequential as a model file that `hetnet evaluate / predict / export` and `load` read.

    input_shape (C, H, W): the images the model takes (default: the shape it last ran on); classes: one name per
    output (default "0", "1", ...); mean / std: per-channel normalisation of images scaled to [0, 1] (default 0 and
    1: images are fed as x / 255). Nothing is written if any of it does not fit the model.

        >>> import hetnet as hn
        >>> hn.save(model, "shoes.safetensors", classes=["boot", "sandal"], mean=[0.29], std=[0.35],
        ...         input_shape=(1, 28, 28))                                                   # doctest: +SKIP
        >>> m = hn.load("shoes.safetensors")                                                  # doctest: +SKIP
        >>> m.model, m.class_names, m.input_shape                                              # doctest: +SKIP
    """

    path = Path(path)
    if not isinstance(model, Sequential):
        raise UsageError(f"{path}: cannot save the model: expected a hetnet Sequential, got {type(model).__name__}")
    if input_shape is None:
        input_shape = model.input_shape
        if input_shape is None:
            raise UsageError(f"{path}: cannot save the model: pass input_shape=(C, H, W) (the model has not run "
                             f"on any input yet)")
    try:
        spec = model.spec(input_shape)
    except UsageError as e:
        raise UsageError(f"{path}: cannot save the model: {str(e).removeprefix('spec: ')}") from None
    c = spec["input_shape"][0]
    out = model.output_shape(tuple(spec["input_shape"]))
    if classes is None and len(out) == 1:
        classes = [str(i) for i in range(out[0])]
    save_model(path, model, spec, [0.0] * c if mean is None else mean, [1.0] * c if std is None else std,
               classes, info)


def load(path: str | Path, device: str | None = "cpu") -> LoadedModel:
    """A model file as a LoadedModel: .model (in eval mode, on `device`), .input_shape, .class_names, .mean,
    .std, .spec, .info. ModelFileError naming the file if it is missing, corrupt or not hetnet's."""
    return load_model(path, device)


def load_model(path: str | Path, device: str | None = "cpu") -> LoadedModel:
    """Read a model file written by save_model; ModelFileError naming the file if it is corrupt or foreign."""
    path = Path(path)
    arrays, meta = read_safetensors(path, "model file")
    _expect_format(path, meta, MODEL_FORMAT, "model file")
    model, input_shape = _model_from_spec(path, meta.get("spec"), arrays, "", device)
    mean, std, names = meta.get("mean"), meta.get("std"), meta.get("class_names")
    c = input_shape[0]
    if not (_floats(mean, c) and _floats(std, c) and all(s > 0 for s in std)):
        raise ModelFileError(f"{path}: normalisation mean/std must be {c} numbers each (std > 0), "
                             f"found {mean!r} / {std!r}")
    n_out = model.output_shape(input_shape)
    if not (isinstance(names, list) and all(isinstance(s, str) for s in names) and len(n_out) == 1
            and len(names) == n_out[0]):
        raise ModelFileError(f"{path}: expected {n_out[0] if len(n_out) == 1 else '?'} class names, "
                             f"found {names!r:.80}")
    model.eval()
    info = meta.get("info") if isinstance(meta.get("info"), dict) else {}
    return LoadedModel(model, input_shape, meta["spec"], list(mean), list(std), names, info, path)


def _floats(v, n: int) -> bool:
    return isinstance(v, list) and len(v) == n and all(isinstance(x, (int, float)) and np.isfinite(x) for x in v)


# --- checkpoints -----------------------------------------------------------------------------------------------

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "state.safetensors"


def checkpoint_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / CHECKPOINT_FILE


def save_checkpoint(run_dir: str | Path, model, optimizer, schedule, state: dict, average=None,
                    lookahead=None) -> Path:
    """Latest resumable state, atomically: model arrays ('model.*'), optimiser arrays ('optim.*'), the weight
    average's and the lookahead's arrays ('average.*', 'lookahead.*', if any) and, as JSON, optimiser step count
    and hyperparameters (per parameter group), schedule position, the rest of the average's and lookahead's
    state, plus `state` (epoch, RNG state, metrics lines, config, normalisation...)."""
    opt = optimizer.state_dict()
    arrays = {f"model.{k}": v for k, v in model.state_dict().items()}
    arrays.update({f"optim.{k}": v for k, v in opt["arrays"].items()})
    shadows = {}
    for key, obj in (("average", average), ("lookahead", lookahead)):
        st = obj.state_dict() if obj is not None else None
        if st is not None:
            arrays.update({f"{key}.{k}": v for k, v in st["arrays"].items()})
        shadows[key] = None if st is None else {k: v for k, v in st.items() if k != "arrays"}
    metadata = {"format": CHECKPOINT_FORMAT, "format_version": FORMAT_VERSION,
                "optimizer": {k: v for k, v in opt.items() if k != "arrays"},
                "schedule": schedule.state_dict() if schedule is not None else None,
                **shadows, "state": state}
    path = checkpoint_path(run_dir)
    write_safetensors(path, arrays, metadata)
    return path


@dataclass
class Checkpoint:
    path: Path
    arrays: dict
    optimizer: dict
    schedule: dict | None
    state: dict
    average: dict | None = None
    lookahead: dict | None = None


def read_checkpoint(run_dir: str | Path) -> Checkpoint:
    """The checkpoint of a run directory (format checked; arrays not yet matched to a model)."""
    path = checkpoint_path(run_dir)
    arrays, meta = read_safetensors(path, "checkpoint")
    _expect_format(path, meta, CHECKPOINT_FORMAT, "checkpoint")
    opt, state = meta.get("optimizer"), meta.get("state")
    if not (isinstance(opt, dict) and isinstance(state, dict) and isinstance(opt.get("hyper"), dict)):
        raise ModelFileError(f"{path}: checkpoint metadata is incomplete (optimizer/state missing)")
    return Checkpoint(path, arrays, opt, meta.get("schedule"), state, meta.get("average"), meta.get("lookahead"))


def restore_checkpoint(ckpt: Checkpoint, model, optimizer, schedule, average=None, lookahead=None) -> None:
    """Load a checkpoint's arrays into an already built model/optimizer/schedule; ModelFileError if they differ."""
    path = ckpt.path
    own = dict(model.named_arrays())
    stored = {k[6:]: v for k, v in ckpt.arrays.items() if k.startswith("model.")}
    if set(own) != set(stored) or any(tuple(stored[k].shape) != tuple(a.shape) for k, a in own.items()):
        raise ModelFileError(f"{path}: checkpoint arrays do not match the run's model spec")
    model.load_state_dict(stored)
    opt_arrays = {k[6:]: v for k, v in ckpt.arrays.items() if k.startswith("optim.")}
    try:
        optimizer.load_state_dict({**ckpt.optimizer, "arrays": opt_arrays})
        if schedule is not None and ckpt.schedule is not None:
            schedule.load_state_dict(ckpt.schedule)
        for key, obj, saved in (("average", average, ckpt.average), ("lookahead", lookahead, ckpt.lookahead)):
            if (obj is None) != (saved is None):
                raise ValueError(f"{'weight averaging' if key == 'average' else key} is configured differently")
            if obj is not None:
                prefix = key + "."
                obj.load_state_dict({**saved, "arrays": {k[len(prefix):]: v for k, v in ckpt.arrays.items()
                                                         if k.startswith(prefix)}})
    except (KeyError, ValueError, TypeError) as e:
        raise ModelFileError(f"{path}: optimiser/schedule state does not fit the run's recipe: {e}") from None
