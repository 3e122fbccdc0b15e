"""Threads for the cpu backend: a small pool that works through the batch in cache-sized chunks.

Each op that is worth it splits its batch into chunks of a few images (sized so one chunk's working set stays in the
L2 cache), and `parallel` lets `threads()` threads pull chunks from a shared counter (dynamic scheduling, so a core
taken by another process slows only its own share). NumPy releases the GIL inside its loops and BLAS calls, so the
threads run at the same time. While they run, OpenBLAS is switched to one thread per call (its thread setting is
process-global), so each chunk's GEMM runs on the thread that owns the chunk; the old setting is restored after.

Thread count: HETNET_NUM_THREADS, else OPENBLAS_NUM_THREADS / OMP_NUM_THREADS, else the CPUs this process may use.
"""
from __future__ import annotations

import ctypes
import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

# Bytes of one chunk's main working set (im2col columns, activations of a few images): well inside a 1-2 MiB L2.
CHUNK_BYTES = 4 * 1024 * 1024
# Chains of element-wise ops: the chunk's operands and temporaries should fit in L2.
ELEMENTWISE_CHUNK_BYTES = 512 * 1024
# Largest chunk when several threads share the work (bounds the per-thread scratch buffers).
MAX_CHUNK_BYTES = 32 * 1024 * 1024
# Work smaller than this runs on the calling thread alone (handing it to the pool costs more than it saves).
PARALLEL_MIN_BYTES = 256 * 1024


def _env_threads() -> int:
    for var in ("HETNET_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        v = os.environ.get(var, "").strip()
        if v.isdigit() and int(v) > 0:
            return int(v)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


_threads = _env_threads()
_executor: ThreadPoolExecutor | None = None
_local = threading.local()


def threads() -> int:
    return _threads


def set_threads(n: int) -> None:
    """Change the number of threads the cpu backend uses (BLAS inside a single-threaded op keeps its own)."""
    global _threads, _executor
    n = max(1, int(n))
    if n != _threads and _executor is not None:
        _executor.shutdown(wait=True)
        _executor = None
    _threads = n


# --- OpenBLAS thread control (process-global; found among the libraries NumPy loaded) ------------------------------


def _find_openblas():
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower() and ".so" in line}
    except OSError:
        return None, None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for get, set_ in (("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
                          ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
                          ("openblas_get_num_threads", "openblas_set_num_threads")):
            if hasattr(lib, get) and hasattr(lib, set_):
                getter, setter = getattr(lib, get), getattr(lib, set_)
                getter.restype, getter.argtypes = ctypes.c_int, []
                setter.restype, setter.argtypes = None, [ctypes.c_int]
                return getter, setter
    return None, None


_blas_get, _blas_set = _find_openblas()
_blas_lock = threading.Lock()
_blas_depth = 0
_blas_saved = 0


def _blas_single_enter() -> None:
    global _blas_depth, _blas_saved
    if _blas_set is None:
        return
    with _blas_lock:
        if _blas_depth == 0:
            _blas_saved = _blas_get()
            if _blas_saved != 1:
                _blas_set(1)
        _blas_depth += 1


def _blas_single_exit() -> None:
    global _blas_depth
    if _blas_set is None:
        return
    with _blas_lock:
        _blas_depth -= 1
        if _blas_depth == 0 and _blas_saved != 1:
            _blas_set(_blas_saved)


# --- the pool ---------------------------------------------------------------------------------------------------


def _pool() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(max_workers=max(1, _threads - 1), thread_name_prefix="hetnet-cpu")
    return _executor


def chunk_size(n: int, bytes_per_item: int, target: int | None = None) -> int:
    """Items per chunk.

    One thread: about `target` (default CHUNK_BYTES) bytes of working set per chunk, so a chunk's chain of ops runs
    in cache. Several threads: one chunk per thread (up to MAX_CHUNK_BYTES), because every NumPy call is a GIL
    hand-over between the threads, and those cost more than the cache misses (measured: chunks this size ran
    thesis-m1 at batch 128 in about 30 ms instead of 35 on two threads, while on one thread cache-sized chunks
    win, about 50 ms against 57).
    """
    if n * bytes_per_item < PARALLEL_MIN_BYTES:
        return max(1, n)
    per = max(1, (target or CHUNK_BYTES) // max(1, bytes_per_item))
    if _threads > 1:
        per = max(per, min(-(-n // _threads), MAX_CHUNK_BYTES // max(1, bytes_per_item)))
    per_thread = -(-n // _threads)
    return max(1, min(per, per_thread))


def parallel(n: int, chunk: int, body, make_acc=None) -> list:
    """Run body(start, stop, acc) over [0, n) in chunks of `chunk` items on up to threads() threads.

    make_acc() gives each thread its own accumulator (for partial sums such as weight gradients); the list of the
    accumulators of the threads that ran is returned. Chunks must write disjoint outputs.
    """
    starts = list(range(0, n, chunk))
    nthreads = min(_threads, len(starts))
    _blas_single_enter()  # also when running inline: hetnet never wakes OpenBLAS's own threads
    try:
        if nthreads <= 1:
            acc = make_acc() if make_acc else None
            for s in starts:
                body(s, min(s + chunk, n), acc)
            return [acc]
        counter = itertools.count()

        def runner():
            acc = make_acc() if make_acc else None
            while True:
                i = next(counter)
                if i >= len(starts):
                    return acc
                s = starts[i]
                body(s, min(s + chunk, n), acc)

        futures = [_pool().submit(runner) for _ in range(nthreads - 1)]
        try:
            accs = [runner()]
        finally:
            accs_rest = [f.result() for f in futures]  # always wait: the workers write into our outputs
        return accs + accs_rest
    finally:
        _blas_single_exit()


def scratch(key, shape, dtype=np.float32, zero: bool = False) -> np.ndarray:
    """A per-thread reusable work array (never returned to callers). zero=True: zero-filled when first made, and the
    caller keeps the parts it never writes zero (e.g. the padding border of im2col columns)."""
    cache = getattr(_local, "cache", None)
    if cache is None:
        cache = _local.cache = {}
    k = (key, tuple(shape), np.dtype(dtype).str)
    buf = cache.get(k)
    if buf is None:
        if len(cache) > 256:
            cache.clear()
        buf = cache[k] = (np.zeros if zero else np.empty)(shape, dtype=dtype)
    return buf
