"""The convolution algorithms a GPU measured (conv._choose), kept between processes, so that a second `hetnet train`
of the same model on the same card starts without measuring them again (as cuDNN's benchmark mode would, every run).

File: <hetnet's cache folder>/tune/<card>-<precision>-<digest>.json, the digest over the kernel sources and tile
tables of this folder, hetnet's version and CuPy's, CUDA's runtime and driver versions: any change starts a new file.
Content: {"format": FORMAT, "choices": [[op, [shape...], algorithm, {algorithm: ms}], ...]}, JSON written whole
(files.atomic_write_text); the times let a graph capture that cannot use cuBLAS fall back to the fastest own kernel.
A choice is only a decision about speed: every algorithm computes the same result within the precision's tolerance,
so a stale file costs time, never correctness. A choice that is not among the candidates of a call, or (outside a
graph capture, where measuring is possible) was measured without one of them, a kernel added since, is measured
again; an unreadable file is ignored; an unwritable folder costs the next process the measurement. HETNET_TUNE_CACHE=0
turns it off (the test suite does, so that its measurements run).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from ...files import atomic_write_text, cache_dir
from ...version import __version__

FORMAT = "hetnet-tune-2"
_SOURCES = ("*.cu", "*.cuh", "conv_tiles.py", "mma_tiles.py")


def enabled() -> bool:
    return os.environ.get("HETNET_TUNE_CACHE", "1").strip() != "0"


def digest(extra: str = "") -> str:
    """A hash of the kernels that can be chosen between (sources and tile tables), hetnet's version and `extra`."""
    h = hashlib.sha256(f"{__version__}\n{extra}\n".encode())
    here = Path(__file__).resolve().parent
    for pattern in _SOURCES:
        for f in sorted(here.glob(pattern)):
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def path_for(card: str, precision: str, extra: str = "") -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", card).strip("-") or "gpu"
    return cache_dir() / "tune" / f"{safe}-{precision}-{digest(extra)}.json"


class TuneFile:
    """The remembered choices of one card and precision: get(key) -> algorithm or None, times(key) -> {algorithm:
    ms}, put(key, algorithm, times)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.choices: dict = {}         # key -> (algorithm, {algorithm: ms})
        try:
            doc = json.loads(self.path.read_text())
            if doc.get("format") == FORMAT:
                for op, shape, algo, times in doc["choices"]:
                    self.choices[(str(op), tuple(int(v) for v in shape))] = (
                        str(algo), {str(k): float(v) for k, v in times.items()})
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            self.choices = {}           # none yet, or not ours: measured again and rewritten

    def get(self, key) -> str | None:
        return self.choices[key][0] if key in self.choices else None

    def standing(self, key, candidates, capturing: bool) -> str | None:
        """The remembered choice for key where it still stands: one of `candidates` and, unless inside a graph capture
        (where nothing can be measured and it is the best known), measured against every one of them."""
        if key not in self.choices:
            return None
        algorithm, times = self.choices[key]
        if algorithm not in candidates or (not capturing and any(name not in times for name in candidates)):
            return None
        return algorithm

    def times(self, key) -> dict:
        return dict(self.choices[key][1]) if key in self.choices else {}

    def put(self, key, algorithm: str, times: dict | None = None) -> None:
        self.choices[key] = (algorithm, dict(times or {}))
        doc = {"format": FORMAT, "choices": [[op, list(shape), a, t]
                                             for (op, shape), (a, t) in sorted(self.choices.items())]}
        try:
            atomic_write_text(self.path, json.dumps(doc) + "\n")
        except OSError:
            pass                        # the cache folder is not writable: the next process measures again


def for_backend(be) -> TuneFile | None:
    """`be`'s TuneFile (opened once per backend), or None when the cache is off."""
    if not enabled():
        return None
    tf = getattr(be, "_tune_file", None)
    if tf is None:
        cupy = be.cupy
        extra = (f"cupy {cupy.__version__} runtime {cupy.cuda.runtime.runtimeGetVersion()} driver "
                 f"{cupy.cuda.runtime.driverGetVersion()}")
        tf = be._tune_file = TuneFile(path_for(be.gpu_name, be.precision, extra))
    return tf
