"""Compiled loops (Numba) for the cpu backend: the decorators its op families use, and whether Numba is there.

NumPy does the memory-bound ops as many calls (a mask, a strided maximum, a multiply, an add, one copy per kernel
tap ...), each a pass through memory and, with two threads, a GIL hand-over. A compiled loop does each op as one
call per chunk of the batch that holds no GIL (`nogil=True`); the op families (conv.py, pool.py, norm.py, ...)
define their loops with `kernel` beside their NumPy paths and hand the chunks to the thread pool (threads.py). A
convolution chunk works image by image (im2col into an L2-sized buffer, OpenBLAS's sgemm called from the loop
through ctypes, col2im), so its columns never leave the cache. The loops are serial on purpose: Numba's parallel
layer must not be entered from several threads at once. Compiled code is cached on disk (`cache=True`): the first
run on a machine compiles (a few seconds), later processes load it (about 0.3 s, at the first step). The arithmetic
is the same IEEE float32 as the NumPy code (no fastmath), except that `kernel_sum` loops (float64 sums of the
BatchNorm statistics) may be reassociated (vectorised). benchmarks/README-cpu.md has the measurements.

`available()` is False when Numba cannot be imported (or HETNET_NO_NUMBA=1): the cpu backend then keeps its NumPy
paths. Shape legend as in `hetnet.backends`: N batch (here: the images of one chunk), C channels, H/W, P/Q.
"""
from __future__ import annotations

import os

try:
    if os.environ.get("HETNET_NO_NUMBA", "").strip() not in ("", "0"):
        raise ImportError("HETNET_NO_NUMBA is set")
    from numba import njit
    from numba import uint64 as U  # noqa: F401 - the families index with it (jit.U)
except ImportError:     # numba missing or broken: the NumPy paths of the op families are used instead
    njit = None


def available() -> bool:
    return njit is not None


if njit is not None:
    kernel = njit(nogil=True, cache=True, fastmath=False, error_model="numpy")
    # float64 sums may run in any order (SIMD lanes); nothing else is relaxed
    kernel_sum = njit(nogil=True, cache=True, fastmath={"reassoc"}, error_model="numpy")
    # inlined into its caller at Numba's level, so that sizes the caller passes as constants are constants inside
    kernel_inline = njit(nogil=True, cache=True, fastmath=False, error_model="numpy", inline="always")
