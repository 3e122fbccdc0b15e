"""Helpers every op family of the cpu backend shares: float32 coercion, per-channel broadcasts, how a pass is cut
into chunks for the thread pool, OpenBLAS's sgemm for the compiled loops, and the heap setting of the process."""
from __future__ import annotations

import ctypes
import sys

import numpy as np

from . import _jit as jit
from . import threads as _thr

_F = np.float32


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep the memory a training step frees for the next step, as the CUDA backend's memory
    pool does. A step allocates its activations and gradients (megabytes each) and frees them all at its end;
    by default glibc then hands the freed top of the heap back to the kernel (trim) and serves arrays above a
    moving threshold with fresh mmap()s, so the next step takes a page fault on every 4 KiB it writes again
    (fashion-cnn at batch 128: ~4,700 faults, ~20% of the step). Here arrays up to 32 MiB (glibc's largest
    threshold) come from the heap and up to 1 GiB of freed heap is kept. Process-wide; False where the C library
    is not glibc (nothing changed)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))


KEEPS_FREED_MEMORY = sys.platform == "linux" and keep_freed_memory()
# compiled convolution and dense paths (im2col, sgemm, col2im per image in one call per thread), when Numba and
# OpenBLAS's sgemm are both found; None: the NumPy paths
SGEMM = _thr.find_sgemm() if jit.available() else None


def _per_channel(v, c: int, hw: int) -> np.ndarray:
    """Per-channel values v[C] spread to a contiguous (1, C, HW) float32 array: NumPy's loops run about twice as
    fast on it as on a (1, C, 1) broadcast."""
    out = np.empty((1, c, hw), dtype=_F)
    out[...] = np.asarray(v, dtype=_F).reshape(1, c, 1)
    return out


def _f32c(a) -> np.ndarray:
    """a as C-contiguous float32 (no copy when it already is)."""
    return np.ascontiguousarray(a, dtype=_F)


def _elementwise(n_items: int, bytes_per_item: int, body) -> None:
    """Element-wise passes: chunks small enough that a chain of ops on one chunk stays in L2."""
    _thr.parallel(n_items, _thr.chunk_size(n_items, bytes_per_item, target=_thr.ELEMENTWISE_CHUNK_BYTES), body)


def _per_thread(n_items: int, bytes_per_item: int) -> int:
    """Chunk size for compiled passes: one chunk per thread (one call each, no GIL held inside), or one chunk when
    the work is too small to share."""
    small = n_items * bytes_per_item < _thr.PARALLEL_MIN_BYTES
    return max(1, n_items if small else -(-n_items // _thr.threads()))


def _jit_parallel(n_items: int, bytes_per_item: int, body) -> None:
    _thr.parallel(n_items, _per_thread(n_items, bytes_per_item), body)


def backend():
    """The cpu backend module itself (this package), for the composed fallbacks: backends.compose calls its ops."""
    return sys.modules[__package__]
