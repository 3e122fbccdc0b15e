"""One entry point for every data set: `load_dataset(name, ...)` -> Dataset (uint8 NCHW images, int64 labels).

    >>> from hetnet.data import load_dataset, split_train_val
    >>> d = load_dataset("fashion-mnist")                        # Debian package, cache folder, or download
    >>> d.train_x.shape, d.test_x.shape, d.class_names[0]
    ((60000, 1, 28, 28), (10000, 1, 28, 28), 'T-shirt/top')
    >>> tx, ty, vx, vy = split_train_val(d.train_x, d.train_y, 0.1, seed=0)
    >>> d = load_dataset("cifar10", "cifar10-jpg-train.tar.gz", input_shape=(3, 40, 40))   # resized on reading
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError, UsageError
from . import cifar, folder, idx
from .cache import cached_image_folder
from .transforms import Adaptation, convert_channels, resize_batch

DATASETS = ("fashion-mnist", "mnist", "cifar10", "folder")


@dataclass
class Dataset:
    name: str
    train_x: np.ndarray                     # (N, C, H, W) uint8
    train_y: np.ndarray                     # (N,) int64
    test_x: np.ndarray | None               # None when the source has no test split
    test_y: np.ndarray | None
    class_names: list[str]
    source: str                             # the folder or file the data came from
    skipped: int = 0                        # unreadable images skipped (skip_bad_images=True)
    adapted: Adaptation | None = None       # channel conversions and resizes made to fit input_shape

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.train_x.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __repr__(self) -> str:
        test = "no test split" if self.test_x is None else f"{len(self.test_x)} test"
        return (f"Dataset({self.name!r}, {len(self.train_x)} train, {test}, shape {self.input_shape}, "
                f"{self.num_classes} classes, from {self.source})")


def _shared_cifar_jpg() -> Path:
    """The CIFAR-10 JPEG archive this project's workspace keeps next to the repository (../shared/datasets)."""
    return Path(__file__).resolve().parents[4] / "shared" / "datasets" / "cifar10-jpg-train.tar.gz"


def cifar10_candidates() -> list[Path]:
    """Places searched for CIFAR-10 when no path is given, in order."""
    cache = idx.cache_dir("cifar10")
    return [cache, cache / "cifar-10-python.tar.gz", cache / "cifar-10-binary.tar.gz",
            cache / "cifar10-jpg-train.tar.gz", _shared_cifar_jpg()]


def _locate_cifar10() -> Path | None:
    for p in cifar10_candidates():
        if (p.is_dir() and cifar.detect_format(p)) or (p.is_file() and folder.is_tar(p)):
            return p
    return None


def _conform(x: np.ndarray | None, input_shape, adapted: Adaptation | None = None) -> np.ndarray | None:
    """Images converted to input_shape's channels and resized to its H x W (recorded in `adapted`)."""
    if x is None or input_shape is None:
        return x
    c, h, w = (int(v) for v in input_shape)
    if c not in (1, 3):
        raise UsageError(f"input shape {tuple(input_shape)}: images can be given 1 (grey) or 3 (RGB) channels")
    if adapted is not None:
        adapted.record(x.shape[1], x.shape[2:], n=len(x))
    if c > x.shape[1]:          # resize the fewer channels, then repeat them
        return convert_channels(resize_batch(x, (h, w)), c)
    return resize_batch(convert_channels(x, c), (h, w))


def load_dataset(name: str, path: str | os.PathLike | None = None, input_shape: tuple[int, int, int] | None = None,
                 skip_bad_images: bool = False, download: bool = True, require_train: bool = True,
                 cache: bool = True, progress: bool | None = None) -> Dataset:
    """Load a data set by name: "fashion-mnist", "mnist" (IDX files), "cifar10" (python or binary batches, a folder
    of them or the official .tar.gz, or an image folder/tar; detected), "folder" (any image folder or tar of one;
    `path` required).

    input_shape (C, H, W): convert channels and resize every image to it (`Dataset.adapted` says what was done).
    require_train=False (evaluation): a test split alone will do (IDX t10k files, ROOT/test/<class>/...); train_x
    is then empty. Raises DataError for missing or bad data.

    Image folders and archives (JPEG/PNG) are decoded on every CPU with a progress bar on stderr (progress None:
    when stderr is a terminal) and kept decoded in a cache (hetnet.data.cache) that later calls read instead;
    cache=False decodes every time and leaves the cache alone.
    """
    if name not in DATASETS:
        raise UsageError(f"--dataset {name!r}: expected one of {', '.join(DATASETS)}")
    adapted = Adaptation(input_shape) if input_shape is not None else None
    if name in ("fashion-mnist", "mnist"):
        tx, ty, vx, vy, src = idx.load(name, path, download_ok=download, require_train=require_train)
        if tx is None:
            tx, ty = vx[:0], vy[:0]
        return Dataset(name, _conform(tx, input_shape, adapted), ty, _conform(vx, input_shape, adapted), vy,
                       list(idx.SOURCES[name]["classes"]), str(src), adapted=adapted)
    if name == "cifar10":
        p = Path(path) if path is not None else _locate_cifar10()
        if p is None:
            raise DataError(f"cifar10: data not found in {' or '.join(map(str, cifar10_candidates()))}; put the "
                            "official cifar-10-python.tar.gz or cifar-10-binary.tar.gz (or their extracted "
                            f"cifar-10-batches-py/ or -bin/ folder) in {idx.cache_dir('cifar10')}, or pass --data "
                            "PATH (batches, an image folder, or a tar of either)")
        batches = p.is_dir() and cifar.detect_format(p)
        if batches or (p.is_file() and folder.is_tar(p) and cifar.tar_format(p)):
            d = cifar.load_cifar10(p) if batches else cifar.load_cifar10_tar(p)
            return Dataset(name, _conform(d["train_x"], input_shape, adapted), d["train_y"],
                           _conform(d["test_x"], input_shape, adapted), d["test_y"], d["class_names"],
                           str(d["source"]), adapted=adapted)
    elif path is None:
        raise UsageError("--dataset folder needs --data PATH (an image folder, or a .tar/.tar.gz of one)")
    else:
        p = Path(path)
    read = cached_image_folder if cache else folder.load_image_folder
    f = read(p, input_shape, skip_bad_images, require_train, progress)
    return Dataset(name, f.train_x, f.train_y, f.test_x, f.test_y, f.class_names, str(f.source), f.skipped,
                   f.adapted)


def split_train_val(x: np.ndarray, y: np.ndarray, val_fraction: float, seed: int = 0):
    """(train_x, train_y, val_x, val_y): a stratified split, round(n_c * val_fraction) examples of each class c to
    validation, chosen by a generator seeded with `seed`. Both parts come in a seeded random order (so taking the
    first N training examples gives a mix of classes). val_fraction 0 gives an empty validation set."""
    if not 0 <= val_fraction < 1:
        raise UsageError(f"validation fraction must be in [0, 1), got {val_fraction}")
    y = np.asarray(y)
    rng = np.random.default_rng([int(seed), 7])
    val_idx = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        k = round(len(members) * val_fraction)
        val_idx.append(rng.permutation(members)[:k])
    val = np.concatenate(val_idx) if val_idx else np.zeros(0, dtype=np.int64)
    mask = np.ones(len(y), dtype=bool)
    mask[val] = False
    train = rng.permutation(np.flatnonzero(mask))
    val = rng.permutation(val)
    return x[train], y[train], x[val], y[val]


def held_out_split(x: np.ndarray, y: np.ndarray, count: int = 5000, seed: int = 0):
    """(train_x, train_y, held_x, held_y): about `count` examples held out, stratified (round(n_c * count / N) of
    each class c), chosen with a fixed seed -- the split of the CIFAR-10 peer benchmark (hetnet.bench.speedrun),
    used by both sides. It is split_train_val(x, y, count / N, seed), so `hetnet train --val-fraction 0.1 --seed 0`
    on CIFAR-10's 50,000 training images validates on exactly these 5,000.

        >>> tx, ty, hx, hy = held_out_split(d.train_x, d.train_y, 5000, seed=0)       # doctest: +SKIP
    """
    n = len(y)
    if not 0 < int(count) < n:
        raise UsageError(f"held-out split: {count} of {n} examples cannot be held out")
    return split_train_val(x, y, int(count) / n, seed)


def describe_data_locations() -> list[tuple[str, str | None]]:
    """(data set, where it would be loaded from, or None) for `hetnet info`; touches no network."""
    out = []
    for name in ("fashion-mnist", "mnist"):
        found = idx.locate(name)
        out.append((name, str(found) if found else None))
    found = _locate_cifar10()
    out.append(("cifar10", str(found) if found else None))
    return out
