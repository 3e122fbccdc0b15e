"""Image folders: ROOT/<class>/<image> or ROOT/{train,test}/<class>/<image>, on disk or inside a .tar / .tar.gz.

Images (PNG, JPEG, BMP) are decoded with Pillow, converted to grey or RGB and resized (bilinear) to the model's
input size as they are read, so a 50,000-image archive is read in one sequential pass and kept as uint8. Class names
are the sorted class-folder names; a file with an image extension that Pillow cannot read is an error naming it,
unless `skip_bad_images` is set, when it is skipped and counted.

    >>> d = load_image_folder("cifar10-jpg-train.tar.gz", input_shape=(3, 32, 32))
    >>> d.train_x.shape, d.class_names[:2], d.test_x, d.skipped
    ((50000, 3, 32, 32), ['airplane', 'automobile'], None, 0)
"""
from __future__ import annotations

import gzip
import io
import multiprocessing as mp
import os
import signal
import sys
import tarfile
import zlib
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from ..errors import DataError
from .transforms import Adaptation

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
_FORMAT_OF = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP"}
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
SPLITS = ("train", "test")
_CHUNK = 500                            # images decoded per task
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


@dataclass
class FolderData:
    train_x: np.ndarray                 # (N, C, H, W) uint8
    train_y: np.ndarray                 # (N,) int64
    test_x: np.ndarray | None
    test_y: np.ndarray | None
    class_names: list[str]
    source: Path
    skipped: int = 0                    # unreadable images skipped (skip_bad_images=True)
    skipped_files: list[str] = field(default_factory=list)
    adapted: Adaptation | None = None   # channel conversions and resizes done while reading


class _BadImage(Exception):
    pass


def is_tar(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(TAR_SUFFIXES)


def wanted(parts: tuple[str, ...]) -> bool:
    return (bool(parts) and not any(p.startswith(".") or p == "__MACOSX" for p in parts)
            and parts[-1].lower().endswith(IMAGE_EXTENSIONS))


def _iter_dir(root: Path):
    """(parts relative to root, bytes) for every image-named file under root, in sorted order."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = Path(dirpath).relative_to(root).parts
        for name in sorted(filenames):
            parts = rel + (name,)
            if wanted(parts):
                path = Path(dirpath) / name
                try:
                    data = path.read_bytes()
                except OSError as e:
                    data = e
                yield parts, data, str(path)


class _TarInfo(tarfile.TarInfo):
    """Records why the archive ended: tarfile stops silently at a truncated header, we want to say so."""

    @classmethod
    def fromtarfile(cls, tf):
        try:
            return super().fromtarfile(tf)
        except tarfile.EOFHeaderError:          # a zero block: the proper end-of-archive marker
            tf.hetnet_end = "marker"
            raise
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError):
            tf.hetnet_end = "truncated"
            raise


def _iter_tar(path: Path):
    """(parts, bytes) for every image-named regular file of the archive, in archive order (one streaming pass).
    A truncated archive or gzip stream, or a gzip CRC mismatch, is a DataError."""
    try:
        with open(path, "rb") as raw:
            gz = raw.read(2) == b"\x1f\x8b"
            raw.seek(0)
            stream = gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw
            with tarfile.open(fileobj=stream, mode="r|", tarinfo=_TarInfo) as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    parts = tuple(p for p in m.name.split("/") if p not in ("", "."))
                    if wanted(parts):
                        yield parts, tf.extractfile(m).read(), f"{path}:{m.name}"
                if getattr(tf, "hetnet_end", "marker") != "marker":
                    raise tarfile.ReadError("archive ends without its end-of-archive marker (truncated?)")
            while stream.read(1 << 20):     # the rest of a gzip stream: checks its CRC and that it is complete
                pass
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DataError(f"{path}: corrupt or unreadable tar archive ({e})") from None


def _open(data: bytes, name: str) -> Image.Image:
    # Trying the format the extension names first saves most of Pillow's per-file overhead on small images; a file
    # with the wrong extension is still identified by the second, unrestricted attempt.
    fmt = _FORMAT_OF.get(os.path.splitext(name)[1].lower())
    if fmt is not None:
        try:
            return Image.open(io.BytesIO(data), formats=[fmt])
        except UnidentifiedImageError:
            pass
    return Image.open(io.BytesIO(data))


def decode_image(data, name: str, mode: str | None, size: tuple[int, int] | None) -> tuple[np.ndarray, str, tuple]:
    """(HW (grey) or HWC (RGB) uint8 array, the file's own Pillow mode, its own (H, W)) of the image bytes,
    converted to `mode` ("L" / "RGB"; None: grey stays grey, anything else becomes RGB) and resized to `size`
    (H, W) bilinearly; _BadImage if unreadable."""
    if isinstance(data, OSError):
        raise _BadImage(f"cannot read ({data.strerror or data})")
    if not data:
        raise _BadImage("empty file")
    try:
        with _open(data, name) as im:
            im.load()
            if mode is None:
                mode = "L" if im.mode in _GREY_MODES else "RGB"
            own_mode, own_size = ("L" if im.mode in _GREY_MODES else im.mode), im.size[::-1]
            out = im.convert(mode) if im.mode != mode else im
            if size is not None and out.size != (size[1], size[0]):
                out = out.resize((size[1], size[0]), Image.BILINEAR)
            return np.asarray(out), own_mode, own_size
    except Exception as e:
        raise _BadImage(f"{type(e).__name__}: {e}") from None


def _decode_chunk(chunk: list, mode: str, size: tuple[int, int]) -> list:
    out = []
    for parts, data, name in chunk:
        try:
            out.append((parts, name, decode_image(data, parts[-1], mode, size)))
        except _BadImage as e:
            out.append((parts, name, e))
    return out


def decode_workers() -> int:
    """The CPUs this process may use: how many chunks of images are decoded at once."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:                  # not Linux
        return os.cpu_count() or 1


def _ignore_sigint() -> None:
    # Ctrl-C reaches the whole process group: the parent stops the decoding (and says so once); a worker that
    # raised KeyboardInterrupt itself would print a traceback
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _decode_pool(workers: int):
    """Worker processes where the platform forks (Linux): decoding a small image is mostly Python code in Pillow,
    which holds the GIL, so threads do not add up (two threads decode CIFAR-10 no faster than one). A forked worker
    runs only Pillow and NumPy on the bytes it is sent. Elsewhere (and with one CPU): threads, which still overlap
    Pillow's C decoders (they release the GIL) with reading the files."""
    if workers > 1 and "fork" in mp.get_all_start_methods():
        return ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("fork"), initializer=_ignore_sigint)
    return ThreadPoolExecutor(max_workers=max(1, workers))


def _decode_all(entries, mode: str | None, size: tuple[int, int] | None, skip_bad_images: bool,
                progress: bool | None = None, desc: str = "decoding"):
    """([(parts, image array)], [skipped file names], Adaptation or None) in entry order. Decoding runs on every CPU
    (_decode_pool) in chunks, while this thread keeps reading files or the archive; a progress bar on stderr
    (progress None: when stderr is a terminal and the decoding takes more than a second) counts decoded images."""
    results: list = []          # finished (parts, name, array | _BadImage) and futures of chunks, in order
    chunk: list = []
    bar = tqdm(desc=desc, unit=" images", file=sys.stderr, disable=(None if progress is None else not progress),
               delay=1.0, leave=False, dynamic_ncols=True)

    pool = None             # made at the first full chunk: a folder of a few images is decoded right here

    def submit(chunk: list, last: bool = False) -> None:
        nonlocal pool
        if last and pool is None:
            results.append(_decode_chunk(chunk, mode, size))
            return
        if pool is None:
            pool = _decode_pool(decode_workers())
        results.append(pool.submit(_decode_chunk, chunk, mode, size))
        results[-1].add_done_callback(lambda f: bar.update(0 if f.cancelled() or f.exception() else len(chunk)))

    with bar:
        try:
            for parts, data, name in entries:
                if mode is None:    # the first readable image fixes channels and size for all the others
                    try:
                        a = decode_image(data, parts[-1], None, None)
                        mode, size = ("L" if a[0].ndim == 2 else "RGB"), a[0].shape[:2]
                    except _BadImage as e:
                        a = e
                    results.append([(parts, name, a)])
                    continue
                chunk.append((parts, data, name))
                if len(chunk) == _CHUNK:
                    submit(chunk)
                    chunk = []
            if chunk:
                submit(chunk, last=True)
            images, skipped = [], []
            adapted = Adaptation((1 if mode == "L" else 3, *size)) if mode is not None else None
            for r in results:
                for parts, name, a in (r if isinstance(r, list) else r.result()):
                    if isinstance(a, _BadImage):
                        if not skip_bad_images:
                            raise DataError(f"{name}: not a readable image ({a}); --skip-bad-images skips such "
                                            "files")
                        skipped.append(name)
                    else:
                        images.append((parts, a[0]))
                        adapted.record(a[1], a[2])
        finally:
            if pool is not None:        # the decoding still queued is dropped after an error
                pool.shutdown(wait=True, cancel_futures=True)
    return images, skipped, adapted


def load_image_folder(root: str | os.PathLike, input_shape: tuple[int, int, int] | None = None,
                      skip_bad_images: bool = False, require_train: bool = True,
                      progress: bool | None = None) -> FolderData:
    """Read an image folder or tar archive of one. input_shape (C, H, W) with C in {1, 3} sets the channels and
    size; without it, the first image decides (grey stays grey, anything else becomes RGB) and every other image is
    resized to its size. require_train=False (evaluation) also takes ROOT/test/<class>/<image> alone: train_x is
    then an empty array and the class names are the test folders'. progress: a bar on stderr while decoding (None:
    when stderr is a terminal). hetnet.data.cache keeps what this returns, decoded, for the next time."""
    return check_train(read_image_folder(root, input_shape, skip_bad_images, progress), require_train)


def check_train(d: FolderData, require_train: bool = True) -> FolderData:
    """d, or a DataError when training images are required and d has none (a test split alone)."""
    if require_train and len(d.train_x) == 0:
        raise DataError(f"{d.source}: no training images: expected a train/<class>/ folder")
    return d


def read_image_folder(root: str | os.PathLike, input_shape: tuple[int, int, int] | None = None,
                      skip_bad_images: bool = False, progress: bool | None = None) -> FolderData:
    """load_image_folder without its require_train check (a test split alone gives an empty train_x)."""
    root = Path(root)
    if input_shape is not None:
        c, h, w = (int(v) for v in input_shape)
        if c not in (1, 3):
            raise DataError(f"{root}: images can be read as 1 (grey) or 3 (RGB) channels, the model asks for {c}")
        mode, size = ("L" if c == 1 else "RGB"), (h, w)
    else:
        mode, size = None, None
    if root.is_dir():
        entries = _iter_dir(root)
    elif root.is_file() and is_tar(root):
        entries = _iter_tar(root)
    elif root.exists():
        raise DataError(f"{root}: expected an image folder or a .tar/.tar.gz of one, found a file")
    else:
        raise DataError(f"{root}: no such image folder or archive")

    images, skipped, adapted = _decode_all(entries, mode, size, skip_bad_images, progress,
                                           desc=f"decoding {root.name}")
    if not images:
        raise DataError(f"{root}: no readable images found (expected ROOT/<class>/<image> or "
                        "ROOT/{train,test}/<class>/<image>, PNG/JPEG/BMP)")
    # a single top-level folder (an archive of "mydata/...") is not part of the layout
    while (all(len(p) >= 3 for p, _ in images) and len({p[0] for p, _ in images}) == 1
           and images[0][0][0] not in SPLITS):
        images = [(p[1:], a) for p, a in images]
    split_layout = any(len(p) == 3 and p[0] in SPLITS for p, _ in images)
    depth = 3 if split_layout else 2
    for p, _ in images:
        if len(p) != depth or (split_layout and p[0] not in SPLITS):
            where = "ROOT/{train,test}/<class>/<image>" if split_layout else "ROOT/<class>/<image>"
            raise DataError(f"{root}: image {'/'.join(p)} is not at {where}")

    groups: dict[str, list] = {s: [] for s in SPLITS} if split_layout else {"train": []}
    for p, a in images:
        groups[p[0] if split_layout else "train"].append((p[-2:], a))
    class_names = sorted({cls for (cls, _), _ in groups["train"] or groups["test"]})
    if len(class_names) < 2:
        raise DataError(f"{root}: found {len(class_names)} class folder ({', '.join(class_names)}); "
                        "classification needs at least two")
    index = {c: i for i, c in enumerate(class_names)}

    def stack(items):
        items.sort(key=lambda t: t[0])
        unknown = sorted({cls for (cls, _), _ in items} - set(index))
        if unknown:
            raise DataError(f"{root}: test classes {', '.join(unknown)} have no training folder")
        x = np.stack([a for _, a in items])
        x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
        y = np.array([index[cls] for (cls, _), _ in items], dtype=np.int64)
        return np.ascontiguousarray(x), y

    test_x = test_y = None
    if groups.get("test"):
        test_x, test_y = stack(groups["test"])
    if groups["train"]:
        train_x, train_y = stack(groups["train"])
    else:                                           # a test split alone (require_train=False)
        train_x, train_y = test_x[:0], test_y[:0]
    return FolderData(train_x, train_y, test_x, test_y, class_names, root, len(skipped), skipped, adapted)
