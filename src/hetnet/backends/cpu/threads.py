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
_workers: list | None = None
_local = threading.local()


def threads() -> int:
    return _threads


def set_threads(n: int) -> None:
    """Change the number of threads the cpu backend uses (BLAS inside a single-threaded op keeps its own)."""
    global _threads
    n = max(1, int(n))
    if n != _threads:
        _stop_workers()
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


def find_sgemm():
    """OpenBLAS's cblas_sgemm as a ctypes function (for compiled loops that call it without the GIL), or None."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower() and ".so" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name, int_t in (("scipy_cblas_sgemm64_", ctypes.c_int64), ("cblas_sgemm64_", ctypes.c_int64),
                            ("scipy_cblas_sgemm", ctypes.c_int), ("cblas_sgemm", ctypes.c_int)):
            if hasattr(lib, name):
                fn = getattr(lib, name)
                # (order, transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc)
                fn.argtypes = [ctypes.c_int] * 3 + [int_t] * 3 + [ctypes.c_float, ctypes.c_void_p, int_t,
                                                                    ctypes.c_void_p, int_t, ctypes.c_float,
                                                                    ctypes.c_void_p, int_t]
                fn.restype = None
                return fn
    return None
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
# threads() - 1 persistent workers, each woken by releasing its `go` lock and reporting through its `done` lock: about
# 15 us per parallel() call against about 70 us for a ThreadPoolExecutor's submit + result (it matters at batch 32,
# where a step makes some 20 parallel calls of a few hundred microseconds each).


class _Worker:
    def __init__(self):
        self.go = threading.Lock()
        self.go.acquire()
        self.done = threading.Lock()
        self.done.acquire()
        self.task = None
        self.result = self.error = None
        self.thread = threading.Thread(target=self._loop, name="hetnet-cpu", daemon=True)
        self.thread.start()

    def _loop(self):
        while True:
            self.go.acquire()
            task = self.task
            if task is None:          # asked to stop
                self.done.release()
                return
            try:
                self.result, self.error = task(), None
            except BaseException as e:  # noqa: BLE001 - handed to the caller of parallel()
                self.result, self.error = None, e
            self.task = None
            self.done.release()

    def start(self, task):
        self.task = task
        self.go.release()

    def join(self):
        self.done.acquire()
        err, self.error = self.error, None
        if err is not None:
            raise err
        return self.result


_pool_lock = threading.Lock()   # one parallel() at a time uses the workers; a concurrent caller runs inline


def _get_workers() -> list:
    global _workers
    if _workers is None or len(_workers) != _threads - 1:
        _stop_workers()
        _workers = [_Worker() for _ in range(_threads - 1)]
    return _workers


def _stop_workers() -> None:
    global _workers
    for w in _workers or ():
        w.start(None)
        w.done.acquire()
        w.thread.join()
    _workers = None


def _forget_workers_after_fork() -> None:
    global _workers, _pool_lock
    _workers = None               # the child has none of the parent's threads
    _pool_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_workers_after_fork)


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

    make_acc() gives each *chunk* its own accumulator (for partial sums such as weight gradients); they are returned
    in chunk order. Which thread runs a chunk depends on timing, so per-chunk partial sums, added up by the caller in
    chunk order, are what keeps results bit-identical from run to run. Chunks must write disjoint outputs.
    """
    starts = list(range(0, n, chunk))
    accs = [make_acc() if make_acc else None for _ in starts]
    nthreads = min(_threads, len(starts))
    pooled = nthreads > 1 and _pool_lock.acquire(blocking=False)
    _blas_single_enter()  # also when running inline: hetnet never wakes OpenBLAS's own threads
    try:
        if not pooled:
            for i, s in enumerate(starts):
                body(s, min(s + chunk, n), accs[i])
            return accs
        counter = itertools.count()

        def runner():
            while True:
                i = next(counter)
                if i >= len(starts):
                    return
                s = starts[i]
                body(s, min(s + chunk, n), accs[i])

        workers = _get_workers()[:nthreads - 1]
        for w in workers:
            w.start(runner)
        errors = []
        try:
            runner()
        finally:
            for w in workers:  # always wait for every worker: they write into our outputs
                try:
                    w.join()
                except BaseException as e:  # noqa: BLE001 - re-raised below, after all have stopped
                    errors.append(e)
        if errors:
            raise errors[0]
        return accs
    finally:
        _blas_single_exit()
        if pooled:
            _pool_lock.release()


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
