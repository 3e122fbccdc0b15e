"""Files written whole or not at all: a temporary file in the same folder, fsync, then a rename over the target, so
a crash or a Ctrl-C never leaves a half-written model, checkpoint, metrics file or cache behind; and the safetensors
bytes that models, checkpoints and the image cache are written as (safetensors_bytes)."""
from __future__ import annotations

import errno
import json
import os
import struct
import tempfile
from pathlib import Path

import numpy as np


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()   # what open() would give; mkstemp's 0600 is too strict for run artefacts


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write data to path atomically: temporary file in the same folder, fsync, os.replace."""
    path = Path(path)
    for folder in (path.parent, *path.parent.parents):     # mkdir would say only "File exists"
        if folder.exists():
            if not folder.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, f"{folder} is a file, not a folder")
            break
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def cache_dir() -> Path:
    """hetnet's cache folder (decoded images, measured kernel choices): $HETNET_CACHE_DIR, else
    $XDG_CACHE_HOME/hetnet, else ~/.cache/hetnet."""
    if os.environ.get("HETNET_CACHE_DIR"):
        return Path(os.environ["HETNET_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "hetnet"


# safetensors' dtype codes (https://github.com/huggingface/safetensors, "Format")
_SAFETENSORS_DTYPES = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
                       np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.int16): "I16",
                       np.dtype(np.int8): "I8", np.dtype(np.uint64): "U64", np.dtype(np.uint32): "U32",
                       np.dtype(np.uint16): "U16", np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL"}


def safetensors_bytes(arrays: dict, metadata: dict) -> bytes:
    """A safetensors file of NumPy arrays and str -> str metadata, the same bytes for the same contents: the header's
    keys in sorted order (the safetensors package writes its metadata in a hash map's order, which changes from
    call to call). Layout: the header's length (8 bytes, little-endian), the JSON header padded with spaces to
    a multiple of 8 bytes, then the arrays' little-endian bytes back to back, the widest element types first (each
    array starts at a multiple of its element size), names in sorted order within a width."""
    header: dict = {"__metadata__": {k: str(metadata[k]) for k in sorted(metadata)}} if metadata else {}
    blobs, offset = [], 0
    for name in sorted(arrays, key=lambda k: (-np.asarray(arrays[k]).dtype.itemsize, k)):
        a = np.asarray(arrays[name])
        code = _SAFETENSORS_DTYPES.get(a.dtype.newbyteorder("="))
        if code is None:
            raise TypeError(f"safetensors: array {name!r} has dtype {a.dtype}, which the format does not hold")
        data = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": code, "shape": [int(n) for n in a.shape], "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)
