"""Decoded image folders kept on disk: a JPEG/PNG folder or archive is decoded once, and later runs read the uint8
arrays back instead (CIFAR-10's 50,000 JPEGs: seconds to decode, a fraction of a second to read).

    >>> from hetnet.data.cache import cached_image_folder
    >>> d = cached_image_folder("cifar10-jpg-train.tar.gz", (3, 32, 32))    # decodes, writes   # doctest: +SKIP
    >>> d = cached_image_folder("cifar10-jpg-train.tar.gz", (3, 32, 32))    # reads it back     # doctest: +SKIP
    >>> cache_path("cifar10-jpg-train.tar.gz", (3, 32, 32))                                      # doctest: +SKIP
    PosixPath('/home/me/.cache/hetnet/decoded/cifar10-jpg-train.tar.gz-3x32x32-1f0c9a8e2b7d4c61.safetensors')

Where: $HETNET_CACHE_DIR, else $XDG_CACHE_HOME/hetnet, else ~/.cache/hetnet; the files are in its decoded/ folder,
one per source (resolved path) and decoding (channels and size), so a source that changes replaces its entry.

Format: safetensors -- a JSON header and raw arrays; reading it runs no code (never pickle). Tensors train_x, train_y
(and test_x, test_y when the source has a test split); the header's metadata holds the format version, the source's
path, size and content key, the decoding, the class names, the skipped files, what was adapted, and the sha256 of
the arrays (checked on every read, so a damaged file is noticed). Written atomically (hetnet.files).

The content key: for an archive, the sha256 of its bytes (10 ms for CIFAR-10's 16 MB); for a folder, the sha256 of
the sorted list of (relative path, size, modification time in ns) of its image files -- reading every file would
cost about as much as decoding it, and an edited file gets a new size or time.

A cache file that cannot be read, or whose arrays do not match their checksum, is decoded again (a note says so);
a cache that cannot be written is a note too. Neither is an error.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from safetensors import safe_open

from ..errors import DataError
from ..files import atomic_write_bytes, cache_dir, safetensors_bytes
from . import folder
from .transforms import Adaptation

FORMAT = "hetnet-decoded-1"
NOTE_AFTER_S = 1.0          # a first decoding longer than this says where its cache went
_ARRAYS = ("train_x", "train_y", "test_x", "test_y")


def _decoding(input_shape) -> str:
    """How the images are decoded, as text: '3x32x32', or 'auto' (the first image decides)."""
    return "auto" if input_shape is None else "x".join(str(int(v)) for v in input_shape)


def cache_path(root: str | os.PathLike, input_shape=None) -> Path:
    """The cache file of a source decoded to input_shape (C, H, W) (None: as its first image)."""
    root = Path(root).resolve()
    decoding = _decoding(input_shape)
    tag = hashlib.sha256(f"{root}\0{decoding}".encode()).hexdigest()[:16]
    return cache_dir() / "decoded" / f"{root.name}-{decoding}-{tag}.safetensors"


def source_key(root: str | os.PathLike) -> tuple[int, str]:
    """(size in bytes, content key) of an archive or folder (the module docstring says what the key covers)."""
    root = Path(root)
    h = hashlib.sha256()
    if root.is_dir():
        size = 0
        listing = []
        for dirpath, _, filenames in os.walk(root):
            rel = Path(dirpath).relative_to(root).parts
            for name in filenames:
                if folder.wanted(rel + (name,)):
                    try:
                        st = os.stat(os.path.join(dirpath, name))
                    except OSError:
                        continue            # the decoder names an unreadable file
                    listing.append(("/".join(rel + (name,)), st.st_size, st.st_mtime_ns))
                    size += st.st_size
        for rel, n, mtime in sorted(listing):
            h.update(f"{rel}\0{n}\0{mtime}\n".encode())
        return size, "files:" + h.hexdigest()
    with open(root, "rb") as f:
        size = 0
        while block := f.read(1 << 20):
            h.update(block)
            size += len(block)
    return size, "sha256:" + h.hexdigest()


def _arrays_digest(arrays: dict) -> str:
    h = hashlib.sha256()
    for name in _ARRAYS:
        if name in arrays:
            a = np.ascontiguousarray(arrays[name])
            h.update(f"{name}\0{a.dtype.str}\0{a.shape}\n".encode())
            h.update(a.tobytes() if a.size == 0 else memoryview(a).cast("B"))
    return h.hexdigest()


def _note(line: str) -> None:
    print(f"note: {line}", file=sys.stderr, flush=True)


def _adaptation_json(a: Adaptation | None):
    if a is None:
        return None
    return {"to": list(a.to), "converted": a.converted, "resized": [[*k, n] for k, n in a.resized.items()]}


def _adaptation(d) -> Adaptation | None:
    if d is None:
        return None
    a = Adaptation(d["to"])
    a.converted = {str(k): int(n) for k, n in d["converted"].items()}
    a.resized = {(int(h), int(w)): int(n) for h, w, n in d["resized"]}
    return a


def save(path: Path, d: folder.FolderData, input_shape, key: tuple[int, str]) -> None:
    """Write d's arrays and description to path (atomically)."""
    arrays = {"train_x": d.train_x, "train_y": d.train_y}
    if d.test_x is not None:
        arrays.update(test_x=d.test_x, test_y=d.test_y)
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    meta = {"format": FORMAT, "source": str(Path(d.source).resolve()), "source_size": str(key[0]),
            "source_key": key[1], "decoding": _decoding(input_shape), "class_names": json.dumps(d.class_names),
            "skipped_files": json.dumps(d.skipped_files), "adapted": json.dumps(_adaptation_json(d.adapted)),
            "arrays_sha256": _arrays_digest(arrays)}
    atomic_write_bytes(path, safetensors_bytes(arrays, meta))


class _Stale(Exception):
    """The cache file is fine but describes another version of the source (or another decoding)."""


def load(path: Path, root: Path, input_shape, key: tuple[int, str]) -> folder.FolderData:
    """The FolderData kept in path; _Stale when it was made from other contents or another decoding; any other
    exception when the file is damaged (the caller decodes again)."""
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT}")
        if (meta.get("source") != str(root.resolve()) or meta.get("decoding") != _decoding(input_shape)
                or meta.get("source_size") != str(key[0]) or meta.get("source_key") != key[1]):
            raise _Stale
        names = set(f.keys())
        arrays = {name: f.get_tensor(name) for name in _ARRAYS if name in names}
    if _arrays_digest(arrays) != meta.get("arrays_sha256"):
        raise ValueError("the arrays do not match their checksum")
    skipped = json.loads(meta["skipped_files"])
    return folder.FolderData(arrays["train_x"], arrays["train_y"], arrays.get("test_x"), arrays.get("test_y"),
                             list(json.loads(meta["class_names"])), root, len(skipped), skipped,
                             _adaptation(json.loads(meta["adapted"])))


def cached_image_folder(root: str | os.PathLike, input_shape=None, skip_bad_images: bool = False,
                        require_train: bool = True, progress: bool | None = None) -> folder.FolderData:
    """hetnet.data.folder.load_image_folder through the cache: read the decoded arrays when the cache holds this
    source's current contents decoded the same way, else decode (on every CPU, with a progress bar) and keep the
    result. A cached decoding that skipped unreadable images serves only skip_bad_images=True (otherwise the
    decoder runs again and names the bad file)."""
    root = Path(root)
    if not root.exists() or not (root.is_dir() or folder.is_tar(root)):
        return folder.load_image_folder(root, input_shape, skip_bad_images, require_train, progress)  # its error
    try:
        key = source_key(root)
    except OSError as e:
        raise DataError(f"{root}: cannot read ({e.strerror or e})") from None
    path = cache_path(root, input_shape)
    if path.is_file():
        try:
            d = load(path, root, input_shape, key)
            if skip_bad_images or not d.skipped:
                return folder.check_train(d, require_train)
        except _Stale:
            pass
        except Exception as e:  # noqa: BLE001 - whatever a damaged file makes the reader raise: decode again
            _note(f"the cached decoding of {root} in {path} is unreadable ({type(e).__name__}: {e}); decoding again")
    t0 = time.perf_counter()
    d = folder.read_image_folder(root, input_shape, skip_bad_images, progress)
    seconds = time.perf_counter() - t0
    try:
        save(path, d, input_shape, key)
    except OSError as e:
        _note(f"cannot keep the decoded images of {root} in {path} ({e.strerror or e}); the next run decodes again")
    else:
        if seconds >= NOTE_AFTER_S:
            _note(f"decoded {len(d.train_x) + (len(d.test_x) if d.test_x is not None else 0)} images of {root} in "
                  f"{seconds:.1f} s; kept in {path} for the next run (--no-cache: decode every time)")
    return folder.check_train(d, require_train)
