"""The one place that chooses a device: maps "reference" | "cpu" | "cuda" | "cuda:N" to a backend.

    >>> from hetnet.device import get_backend
    >>> get_backend("cpu").name
    'cpu'
"""
from __future__ import annotations

import importlib
import re

import numpy as np

from .backends import cpu, reference
from .errors import DeviceError

_cache: dict[str, object] = {}


def parse_device(device: str) -> tuple[str, int]:
    """("cpu", 0), ("cuda", 1), ... ; DeviceError for anything else."""
    if not isinstance(device, str):
        raise DeviceError(f"device must be a string like 'cpu', 'reference', 'cuda' or 'cuda:0', got {device!r}")
    m = re.fullmatch(r"(reference|cpu|cuda)(?::(\d+))?", device.strip().lower())
    if not m or (m.group(2) is not None and m.group(1) != "cuda"):
        raise DeviceError(f"unknown device {device!r}: expected 'reference', 'cpu', 'cuda' or 'cuda:N'")
    return m.group(1), int(m.group(2) or 0)


def get_backend(device: str = "cpu"):
    """The backend for a device string (created once and cached)."""
    kind, index = parse_device(device)
    key = f"cuda:{index}" if kind == "cuda" else kind
    if key not in _cache:
        if kind == "reference":
            backend = reference
        elif kind == "cpu":
            backend = cpu
        else:
            cuda = importlib.import_module("hetnet.backends.cuda")     # only here: it needs CuPy
            backend = cuda.CudaBackend(index)  # raises DeviceError with a one-line reason when CUDA is unusable
        _cache[key] = backend
    return _cache[key]


def cuda_available() -> bool:
    """True when CuPy imports and sees at least one GPU."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def best_device() -> str:
    """'cuda' when a usable GPU is present, else 'cpu'."""
    return "cuda" if cuda_available() else "cpu"


def backend_of(array):
    """The backend that owns an array: NumPy float64 -> reference, other NumPy -> cpu, CuPy -> cuda:<its device>."""
    if isinstance(array, np.ndarray):
        return get_backend("reference" if array.dtype == np.float64 else "cpu")
    dev = getattr(array, "device", None)
    if dev is not None and type(array).__module__.startswith("cupy"):
        return get_backend(f"cuda:{dev.id}")
    raise TypeError(f"expected a NumPy or CuPy array, got {type(array).__name__}")
