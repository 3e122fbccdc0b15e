"""The one place that chooses a device: maps "reference" | "cpu" | "cuda" | "cuda:N" and a precision to a backend.

Precision: "fp32" (float32 everywhere, to float32's accuracy: on the cuda backend a convolution may run on tensor
cores with each operand split into two TF32 parts and three products, where that measures faster), "tf32" (float32
storage, matrix products on tensor cores with TF32 inputs) or "bf16" (matrix products on tensor cores with bfloat16
inputs, float32 accumulation, master weights, optimiser state, batch-norm statistics and loss). tf32 and bf16 are the
cuda backend's; cpu and reference compute in float32 (float64) whatever is asked, and say so once.

    >>> from hetnet.device import get_backend
    >>> get_backend("cpu").name
    'cpu'
"""
from __future__ import annotations

import importlib
import re
import sys

import numpy as np

from .backends import reference
from .errors import DeviceError

_cache: dict[tuple, object] = {}
PRECISIONS = ("fp32", "tf32", "bf16")
_noted: set = set()


def parse_device(device: str) -> tuple[str, int]:
    """("cpu", 0), ("cuda", 1), ... ; DeviceError for anything else."""
    if not isinstance(device, str):
        raise DeviceError(f"device must be a string like 'cpu', 'reference', 'cuda' or 'cuda:0', got {device!r}")
    m = re.fullmatch(r"(reference|cpu|cuda)(?::(\d+))?", device.strip().lower())
    if not m or (m.group(2) is not None and m.group(1) != "cuda"):
        raise DeviceError(f"unknown device {device!r}: expected 'reference', 'cpu', 'cuda' or 'cuda:N'")
    return m.group(1), int(m.group(2) or 0)


def parse_precision(precision) -> str:
    """'fp32' | 'tf32' | 'bf16' (None: 'fp32'); DeviceError for anything else."""
    p = "fp32" if precision is None else str(precision).strip().lower()
    if p not in PRECISIONS:
        raise DeviceError(f"unknown precision {precision!r}: expected {', '.join(PRECISIONS)}")
    return p


def get_backend(device: str = "cpu", precision: str | None = None):
    """The backend for a device string and a precision (created once per pair and cached)."""
    kind, index = parse_device(device)
    precision = parse_precision(precision)
    if kind != "cuda" and precision != "fp32":
        if kind not in _noted:
            _noted.add(kind)
            print(f"note: precision {precision} is the cuda backend's; the {kind} backend computes in "
                  f"{'float64' if kind == 'reference' else 'float32'}", file=sys.stderr)
        precision = "fp32"
    key = (f"cuda:{index}" if kind == "cuda" else kind, precision)
    if key not in _cache:
        if kind == "reference":
            backend = reference
        elif kind == "cpu":
            # imported here: it loads Numba (0.16 s of a start), which a cuda run does not need
            backend = importlib.import_module("hetnet.backends.cpu")
        else:
            cuda = importlib.import_module("hetnet.backends.cuda")     # only here: it needs CuPy
            backend = cuda.CudaBackend(index, precision)  # DeviceError with a one-line reason if CUDA is unusable
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
