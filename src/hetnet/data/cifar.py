"""CIFAR-10 in its two official formats: python batches (pickles) and binary batches (3073-byte records).

The python batches are pickles, and unpickling runs whatever code a file names. They are therefore read with a
restricted unpickler that knows only the plain containers pickle builds by itself (dict, list, str, bytes, int,
float, tuple) plus the handful of NumPy functions needed to rebuild a plain numeric array; anything else (os.system,
builtins.eval, an object-dtype array, ...) is refused before it is called.

    >>> from hetnet.data import cifar
    >>> x, y = cifar.load_python_batch("cifar-10-batches-py/data_batch_1")      # (10000, 3, 32, 32) uint8, int64
    >>> d = cifar.load_cifar10("cifar-10-batches-bin")                          # either format, detected
    >>> d["train_x"].shape, d["class_names"][:2]
    ((50000, 3, 32, 32), ['airplane', 'automobile'])
"""
from __future__ import annotations

import io
import os
import pickle
import tarfile
import zlib
from pathlib import Path

import numpy as np

from ..errors import DataError

try:  # NumPy >= 2 keeps the array machinery in numpy._core; pickles written by NumPy 1 name numpy.core
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # pragma: no cover - NumPy 1.x
    from numpy.core import multiarray as _multiarray
    from numpy.core import numeric as _numeric

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
IMAGE_BYTES = 3 * 32 * 32
RECORD_BYTES = 1 + IMAGE_BYTES


# --- the restricted unpickler -------------------------------------------------------------------------------
# Each allowed global is a small wrapper that checks its arguments, so even the allowed functions can only build a
# plain numeric array from bytes.

class Refused(pickle.UnpicklingError):
    """The pickle asked for something other than plain data."""

def _plain_dtype(*args):
    dt = np.dtype(*args)
    if dt.hasobject or dt.fields is not None or dt.subdtype is not None:
        raise Refused(f"dtype {dt} is not a plain numeric dtype")
    return dt


def _reconstruct(subtype, shape, dtype):
    if subtype is not np.ndarray:
        raise Refused(f"array subtype {subtype!r} is not numpy.ndarray")
    return _multiarray._reconstruct(np.ndarray, shape, _plain_dtype(dtype))


def _frombuffer(buf, dtype, shape, order):
    if not isinstance(buf, (bytes, bytearray, pickle.PickleBuffer)):
        raise Refused("array buffer is not bytes")
    return _numeric._frombuffer(buf, _plain_dtype(dtype), shape, order)


def _encode(obj, encoding="utf-8"):
    # protocol-2 pickles written by Python 3 store bytes as _codecs.encode(str, 'latin1')
    if not isinstance(obj, str) or encoding.replace("-", "").replace("_", "").lower() != "latin1":
        raise Refused("_codecs.encode is allowed only for latin1 text")
    return obj.encode("latin1")


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _plain_dtype,
    ("_codecs", "encode"): _encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain data and plain NumPy arrays only; any other global raises pickle.UnpicklingError."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise Refused(f"refused to load global {module}.{name}") from None

    def persistent_load(self, pid):
        raise Refused("persistent ids are not allowed")


def restricted_load(data: bytes, name: str = "<bytes>"):
    """Unpickle `data` with RestrictedUnpickler (Python 2 strings read as bytes); any failure is a DataError."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Refused as e:
        raise DataError(f"{name}: not a plain-data pickle: {e}") from None
    except Exception as e:  # noqa: BLE001 - truncated or garbled pickles raise EOFError, ValueError, ...
        raise DataError(f"{name}: unreadable pickle ({type(e).__name__}: {e})") from None


def _get(d: dict, key: str):
    """d[key] whether the pickle stored the key as str (Python 3) or bytes (Python 2)."""
    if key in d:
        return d[key]
    return d.get(key.encode())


def _read(path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def _check_labels(labels: np.ndarray, path) -> np.ndarray:
    if len(labels) and (labels.min() < 0 or labels.max() >= len(CIFAR10_CLASSES)):
        bad = int(np.argmax((labels < 0) | (labels >= len(CIFAR10_CLASSES))))
        raise DataError(f"{path}: label {int(labels[bad])} at index {bad} is out of range: expected 0..9")
    return labels.astype(np.int64)


# --- python batches -----------------------------------------------------------------------------------------

def load_python_batch(path: str | os.PathLike, raw: bytes | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 from one python batch (a dict with 'data': N x 3072
    uint8 and 'labels': N ints in 0..9; N is 10000 in the official files). `raw`: the file's bytes, when they
    come from elsewhere (an archive); `path` then only names it in messages."""
    d = restricted_load(_read(path) if raw is None else raw, str(path))
    if not isinstance(d, dict):
        raise DataError(f"{path}: expected a dict with 'data' and 'labels', found {type(d).__name__}")
    data, labels = _get(d, "data"), _get(d, "labels")
    if data is None or labels is None:
        raise DataError(f"{path}: expected keys 'data' and 'labels', found {sorted(map(str, d))}")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != IMAGE_BYTES:
        what = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' must be a uint8 array of shape (N, {IMAGE_BYTES}), found {what}")
    if not isinstance(labels, (list, tuple, np.ndarray)) or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in labels):
        raise DataError(f"{path}: 'labels' must be a list of integers")
    if len(labels) != len(data):
        raise DataError(f"{path}: {len(data)} images but {len(labels)} labels")
    y = _check_labels(np.asarray(labels, dtype=np.int64), path)
    x = data.reshape(-1, 3, 32, 32)
    return (x if x.flags.writeable and x.flags.c_contiguous else x.copy()), y


def load_python_meta(path: str | os.PathLike, raw: bytes | None = None) -> list[str]:
    """Class names from batches.meta (a dict with 'label_names')."""
    d = restricted_load(_read(path) if raw is None else raw, str(path))
    names = _get(d, "label_names") if isinstance(d, dict) else None
    if not isinstance(names, list) or len(names) != len(CIFAR10_CLASSES) or not all(
            isinstance(n, (str, bytes)) for n in names):
        raise DataError(f"{path}: expected 'label_names', a list of {len(CIFAR10_CLASSES)} strings")
    return [n.decode("latin1") if isinstance(n, bytes) else n for n in names]


# --- binary batches -----------------------------------------------------------------------------------------

def load_binary_batch(path: str | os.PathLike, raw: bytes | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 from one binary batch (N records of 1 label byte + 3072
    pixel bytes, red then green then blue planes)."""
    raw = _read(path) if raw is None else raw
    if len(raw) == 0 or len(raw) % RECORD_BYTES:
        raise DataError(f"{path}: size {len(raw)} bytes is not a positive multiple of the {RECORD_BYTES}-byte "
                        "CIFAR-10 record")
    rec = np.frombuffer(raw, dtype=np.uint8).reshape(-1, RECORD_BYTES)
    y = _check_labels(rec[:, 0], path)
    return np.ascontiguousarray(rec[:, 1:].reshape(-1, 3, 32, 32)), y


def load_text_meta(path: str | os.PathLike, raw: bytes | None = None) -> list[str]:
    """Class names from batches.meta.txt (one per line; blank lines ignored)."""
    raw = _read(path) if raw is None else raw
    names = [line.strip() for line in raw.decode("utf-8", "replace").splitlines() if line.strip()]
    if len(names) != len(CIFAR10_CLASSES):
        raise DataError(f"{path}: expected {len(CIFAR10_CLASSES)} class names, found {len(names)}")
    return names


# --- a whole folder -----------------------------------------------------------------------------------------

def detect_format(folder: str | os.PathLike) -> tuple[str, Path] | None:
    """("python" | "binary", folder holding the batches) for `folder` or its cifar-10-batches-py/-bin subfolder."""
    folder = Path(folder)
    for d in (folder, folder / "cifar-10-batches-py", folder / "cifar-10-batches-bin"):
        if (d / "data_batch_1").is_file():
            return "python", d
        if (d / "data_batch_1.bin").is_file():
            return "binary", d
    return None


_READERS = {"python": ("", load_python_batch, "batches.meta", load_python_meta),
            "binary": (".bin", load_binary_batch, "batches.meta.txt", load_text_meta)}


def _assemble(fmt: str, files: dict, where) -> dict:
    """The data set from `files` (file name -> Path or bytes) of the given format."""
    suffix, reader, meta_name, meta_reader = _READERS[fmt]
    names = [n + suffix for n in TRAIN_BATCHES + (TEST_BATCH,)]
    missing = [n for n in names if n not in files]
    if missing:
        raise DataError(f"{where}: missing CIFAR-10 {fmt} batches: {', '.join(missing)}")

    def read(fn, name):
        f = files[name]
        return fn(f) if isinstance(f, Path) else fn(f"{where}:{name}", f)
    parts = [read(reader, n) for n in names]
    class_names = read(meta_reader, meta_name) if meta_name in files else list(CIFAR10_CLASSES)
    return {"train_x": np.concatenate([p[0] for p in parts[:-1]]),
            "train_y": np.concatenate([p[1] for p in parts[:-1]]),
            "test_x": parts[-1][0], "test_y": parts[-1][1], "class_names": class_names, "source": where}


def load_cifar10(folder: str | os.PathLike) -> dict:
    """{"train_x", "train_y", "test_x", "test_y", "class_names", "source"} from a folder of CIFAR-10 batches in
    either official format. All five training batches and the test batch must be there."""
    found = detect_format(folder)
    if found is None:
        raise DataError(f"{folder}: no CIFAR-10 batches found: expected data_batch_1..5 and test_batch (python "
                        "version) or data_batch_1..5.bin and test_batch.bin (binary version)")
    fmt, d = found
    return _assemble(fmt, {p.name: p for p in d.iterdir() if p.is_file()}, d)


_BATCH_NAMES = {n + s for n in TRAIN_BATCHES + (TEST_BATCH,) for s in ("", ".bin")}


def tar_format(path: str | os.PathLike, peek: int = 12) -> str | None:
    """"python" / "binary" if the first members of the archive are CIFAR-10 batches (the official
    cifar-10-python.tar.gz / cifar-10-binary.tar.gz), else None (an image archive, or not a tar at all)."""
    try:
        with tarfile.open(path, mode="r|*") as tf:
            for k, m in enumerate(tf):
                base = m.name.rsplit("/", 1)[-1]
                if m.isfile() and base in _BATCH_NAMES:
                    return "binary" if base.endswith(".bin") else "python"
                if k >= peek:
                    break
    except (tarfile.TarError, EOFError, zlib.error, OSError):
        return None
    return None


def load_cifar10_tar(path: str | os.PathLike) -> dict:
    """Like load_cifar10, from the official archive itself (read in one pass, nothing extracted to disk)."""
    path = Path(path)
    fmt = tar_format(path)
    if fmt is None:
        raise DataError(f"{path}: not a CIFAR-10 batches archive (expected cifar-10-python.tar.gz or "
                        "cifar-10-binary.tar.gz)")
    wanted = {n + _READERS[fmt][0] for n in TRAIN_BATCHES + (TEST_BATCH,)} | {_READERS[fmt][2]}
    files = {}
    try:
        with tarfile.open(path, mode="r|*") as tf:
            for m in tf:
                base = m.name.rsplit("/", 1)[-1]
                if m.isfile() and base in wanted:
                    files[base] = tf.extractfile(m).read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DataError(f"{path}: corrupt or unreadable tar archive ({e})") from None
    return _assemble(fmt, files, path)
