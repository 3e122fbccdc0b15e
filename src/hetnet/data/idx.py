"""IDX files (MNIST, Fashion-MNIST and their kin): read, write, find on disk, download with SHA-256 checks.

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number of dimensions), one big-endian
uint32 per dimension, then the values in C order. Files may be gzip-compressed (detected by content, not name).

    >>> from hetnet.data import idx
    >>> idx.write_idx("labels-idx1-ubyte", np.array([3, 1, 4], dtype=np.uint8))
    >>> idx.read_idx("labels-idx1-ubyte")
    array([3, 1, 4], dtype=uint8)
    >>> x, y = idx.load_idx_pair("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")   # (N,1,H,W), (N,)
"""
from __future__ import annotations

import gzip
import hashlib
import math
import os
import struct
import threading
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..files import atomic_write_bytes

# type code -> dtype of the stored values (big-endian where it matters)
IDX_TYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
             0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_CODES = {v.newbyteorder(">") if v.itemsize > 1 else v: k for k, v in IDX_TYPES.items()}

# split -> (images file, labels file), without the .gz that downloads and Debian's package carry
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
MNIST_CLASSES = tuple(str(d) for d in range(10))

# Where each set comes from. SHA-256 of the upstream .gz files (Fashion-MNIST: the zalando research S3 bucket and
# GitHub repository serve the same files; MNIST: the ossci-datasets mirror PyTorch uses, same files as LeCun's).
SOURCES = {
    "fashion-mnist": {
        "mirrors": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"),
        "sha256": {
            "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
            "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
            "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
            "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
        },
        "system_dirs": ("/usr/share/datasets/fashion-mnist",),
        "install_hint": "install it with `apt-get install dataset-fashion-mnist`, or ",
        "classes": FASHION_MNIST_CLASSES,
    },
    "mnist": {
        "mirrors": ("https://ossci-datasets.s3.amazonaws.com/mnist/",),
        "sha256": {
            "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        },
        "system_dirs": ("/usr/share/datasets/mnist",),
        "install_hint": "",
        "classes": MNIST_CLASSES,
    },
}

DOWNLOAD_TIMEOUT_S = 5.0


# --- reading and writing ------------------------------------------------------------------------------------

def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read IDX file ({e.strerror or e})") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: corrupt gzip data ({e})") from None
    return raw


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """The array held by the IDX bytes `data` (already decompressed), in native byte order."""
    if len(data) < 4:
        raise DataError(f"{name}: not an IDX file: {len(data)} bytes, expected at least a 4-byte header")
    zero, code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or code not in IDX_TYPES or ndim == 0:
        raise DataError(f"{name}: bad IDX magic number 0x{data[:4].hex()}: expected 0x0000 then a type code in "
                        f"{{{', '.join(f'0x{c:02X}' for c in IDX_TYPES)}}} and 1..255 dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{name}: truncated IDX header: {len(data)} bytes, expected {header} for {ndim} dimensions")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = IDX_TYPES[code]
    expected = math.prod(dims) * dtype.itemsize
    found = len(data) - header
    if found < expected:
        raise DataError(f"{name}: truncated: dimensions {'x'.join(map(str, dims))} need {expected} data bytes, "
                        f"found {found}")
    if found > expected:
        raise DataError(f"{name}: wrongly sized: dimensions {'x'.join(map(str, dims))} need {expected} data bytes, "
                        f"found {found - expected} trailing bytes")
    arr = np.frombuffer(data, dtype=dtype, count=expected // dtype.itemsize, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (raw or gzip) into a NumPy array of its stored dtype and dimensions."""
    path = Path(path)
    return parse_idx(_read_bytes(path), str(path))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write `array` as an IDX file; gzip-compressed when the name ends in .gz. dtype: uint8/int8/int16/int32/
    float32/float64."""
    a = np.asarray(array)
    dt = a.dtype.newbyteorder(">") if a.dtype.itemsize > 1 else a.dtype
    if dt not in _CODES:
        raise ValueError(f"write_idx: dtype {a.dtype} has no IDX type code")
    data = struct.pack(f">HBB{a.ndim}I", 0, _CODES[dt], a.ndim, *a.shape) + a.astype(dt).tobytes()
    path = Path(path)
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)


def load_idx_pair(images_path: str | os.PathLike, labels_path: str | os.PathLike,
                  num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 1, H, W) uint8 and labels (N,) int64 from an idx3-ubyte / idx1-ubyte pair, checked."""
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise DataError(f"{images_path}: expected unsigned-byte images of 3 dimensions (N, H, W), found "
                        f"{images.dtype} with shape {images.shape}")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DataError(f"{labels_path}: expected unsigned-byte labels of 1 dimension (N,), found "
                        f"{labels.dtype} with shape {labels.shape}")
    if len(images) != len(labels):
        raise DataError(f"{images_path}: {len(images)} images but {labels_path} has {len(labels)} labels")
    if len(labels) and int(labels.max()) >= num_classes:
        bad = int(np.argmax(labels >= num_classes))
        raise DataError(f"{labels_path}: label {int(labels[bad])} at index {bad} is out of range: expected "
                        f"0..{num_classes - 1}")
    return images[:, None, :, :], labels.astype(np.int64)


# --- finding the files --------------------------------------------------------------------------------------

def cache_dir(dataset: str) -> Path:
    """$HETNET_DATA/<dataset> if HETNET_DATA is set, else ~/.cache/hetnet/<dataset> (XDG_CACHE_HOME honoured)."""
    if os.environ.get("HETNET_DATA"):
        return Path(os.environ["HETNET_DATA"]).expanduser() / dataset
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hetnet" / dataset


def search_dirs(dataset: str) -> list[Path]:
    """Folders searched, in order, for `dataset`'s four IDX files."""
    return [Path(d) for d in SOURCES[dataset]["system_dirs"]] + [cache_dir(dataset)]


def _find_file(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def missing_files(folder: Path) -> list[str]:
    return [stem + ".gz" for pair in IDX_FILES.values() for stem in pair if _find_file(folder, stem) is None]


def locate(dataset: str) -> Path | None:
    """The first search folder holding all four files of `dataset`, or None."""
    for d in search_dirs(dataset):
        if d.is_dir() and not missing_files(d):
            return d
    return None


# --- downloading --------------------------------------------------------------------------------------------

Fetch = Callable[[str, float], bytes]


def urllib_fetch(url: str, timeout: float) -> bytes:
    """GET `url` (the default fetch function; tests inject their own).

    The socket timeout bounds each read but not the name lookup, which can stall for long on a machine without
    network; so the connection is made in a helper thread that is abandoned after `timeout` seconds."""
    box: dict = {}

    def connect():
        try:
            box["response"] = urllib.request.urlopen(url, timeout=timeout)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e

    t = threading.Thread(target=connect, name="hetnet-download", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"no answer within {timeout:g} s")
    if "error" in box:
        raise box["error"]
    with box["response"] as r:
        return r.read()


def download(dataset: str, dest: str | os.PathLike | None = None, fetch: Fetch | None = None,
             timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Download `dataset`'s four .gz files into `dest` (default: its cache folder), checking each SHA-256 and
    writing each atomically. Files already there with the right checksum are kept. Returns the folder.

    Raises DataError on the first file no mirror could deliver (so an offline machine gives up after one short
    timeout per mirror) or on a checksum mismatch.
    """
    src = SOURCES[dataset]
    dest = Path(dest) if dest is not None else cache_dir(dataset)
    fetch = fetch or urllib_fetch
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{dest}: cannot create the download folder ({e.strerror or e})") from None
    for name, sha in src["sha256"].items():
        target = dest / name
        if target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == sha:
            continue
        errors = []
        for mirror in src["mirrors"]:
            url = mirror + name
            try:
                data = fetch(url, timeout)
            except (OSError, urllib.error.URLError, ValueError) as e:   # socket.timeout is an OSError
                errors.append(f"{url}: {getattr(e, 'reason', None) or e}")
                continue
            got = hashlib.sha256(data).hexdigest()
            if got != sha:
                errors.append(f"{url}: SHA-256 {got[:16]}... does not match the expected {sha[:16]}...")
                continue
            atomic_write_bytes(target, data)
            break
        else:
            raise DataError(f"{dataset}: download of {name} failed ({'; '.join(errors)})")
    return dest


def not_found_message(dataset: str, why: str = "") -> str:
    src = SOURCES[dataset]
    names = ", ".join(f"{s}.gz" for pair in IDX_FILES.values() for s in pair)
    where = " or ".join(str(d) for d in search_dirs(dataset))
    return (f"{dataset}: data not found in {where}{why}; {src['install_hint']}put {names} in "
            f"{cache_dir(dataset)} (or pass --data DIR)")


def load(dataset: str, path: str | os.PathLike | None = None, download_ok: bool = True,
         fetch: Fetch | None = None, timeout: float = DOWNLOAD_TIMEOUT_S, require_train: bool = True):
    """(train_x, train_y, test_x, test_y, source folder) for "mnist" / "fashion-mnist" (or any IDX set in `path`).

    `path` is a folder holding the four files (raw or .gz). Without it, the search folders are tried, then a
    download into the cache folder (when `download_ok`). require_train=False (evaluation): a folder holding only
    one of the two pairs (e.g. the t10k files) will do; the missing split is None.
    """
    splits = tuple(IDX_FILES)
    if path is not None:
        folder = Path(path)
        if not folder.is_dir():
            raise DataError(f"{folder}: not a folder: expected one holding the four IDX files of {dataset}")
        missing = missing_files(folder)
        splits = tuple(s for s in IDX_FILES if all(_find_file(folder, stem) for stem in IDX_FILES[s]))
        if missing and (require_train or not splits):
            raise DataError(f"{folder}: missing {', '.join(missing)} (raw or .gz)")
    else:
        folder = locate(dataset)
        if folder is None:
            if not download_ok:
                raise DataError(not_found_message(dataset, " (download disabled)"))
            try:
                folder = download(dataset, fetch=fetch, timeout=timeout)
            except DataError as e:
                why = str(e).removeprefix(f"{dataset}: ")
                raise DataError(not_found_message(dataset, f", and the {why}")) from None
    out = []
    for split in ("train", "test"):
        if split not in splits:
            out += [None, None]
            continue
        img, lab = (_find_file(folder, stem) for stem in IDX_FILES[split])
        out += load_idx_pair(img, lab, num_classes=len(SOURCES.get(dataset, SOURCES["mnist"])["classes"]))
    return (*out, folder)
