"""Files written whole or not at all: a temporary file in the same folder, fsync, then a rename over the target, so
a crash or a Ctrl-C never leaves a half-written model, checkpoint, metrics file or cache behind."""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path


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
