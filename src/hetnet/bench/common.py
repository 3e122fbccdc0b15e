"""What every bench table shares: the tolerances of the check before timing, the machine's description (card or
host, library versions, hetnet's commit, the date), the one writer of result files, clocks and the timing loop,
peak-memory probes, and the pieces of a training step on each side (hetnet's step object, PyTorch's CUDA-graph
step).

    >>> from hetnet.bench.common import environment, write_result
    >>> env = environment(threads=2, want_gpu=False)                      # doctest: +SKIP
    >>> write_result(Path("out/train_step.json"), {"environment": env, "rows": []})   # doctest: +SKIP
"""
from __future__ import annotations

import ctypes
import gc
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import UsageError
from ..files import atomic_write_text
from ..version import __version__

# --- tolerances of the check before timing: relative error ||a - b|| / ||b||, all of them here -------------------
# RTOL_F32 is the float32 value of tests/conftest.py's RTOL (tests/test_bench.py checks that the two agree). In the
# train-step table, rows where either side may use TF32 (the cuda backend, whose GEMMs can, and the TF32 row) are
# gated at RTOL_TF32. The precision table (precision_step.json, the per-layer precision table) gates each row at its
# precision's RTOL_PRECISION, hetnet at that precision against the exact (float64) result of the same step; its
# fp32 rows are first held against PyTorch's float32 and judged in float64 only when that fails, as the train-step
# rows. TF32 rounds each product's inputs to 10 mantissa bits (2^-11 relative), bf16 also stores activations and
# their gradients in 8 (2^-9 per rounding, compounded over the layers). Each row records the error it actually had.
RTOL_F32 = 1e-4
RTOL_TF32 = 1e-2
RTOL_PRECISION = {"fp32": RTOL_F32, "tf32": 1e-3, "bf16": 2e-2}
# On the GPU a wide max-pooling model (cifar-wide: about a million windows per pooling layer at 32 images) has
# windows whose largest two values lie within float32's rounding of each other; hetnet's kernels and PyTorch's (and
# float64) round differently and route those windows' gradients to another element: a few 1e-3 of every gradient
# below that layer (measured node by node, cuda against cpu, 2 Dec). GPU rows are held at RTOL_TF32 for that, as the
# train-step rows are; each row records the error it had.
RTOL_GPU_MAXPOOL = RTOL_TF32
# One tensor-core GEMM (backends/cuda/mma.py, benchmarks/kernels/run_tc_gemm.py) against float64 of its float32
# inputs, relative to ||C||: tf32 and bf16 round each operand to 10 and 7 mantissa bits (tests/conftest.py's RTOL_TC).
GEMM_RTOL = {"tf32": 1e-3, "bf16": 1e-2}
FULL_BATCH_RTOL = 1e-2   # the timed step's updates on the whole batch (float32 max-pool near-ties, see pair.py)
# tf32 and bf16 rows: every quantity checked (logits, loss, gradients, updates) may differ from float64 by its
# precision's tolerance above, or by PEER_FACTOR times PyTorch's own error at that precision on the same batch,
# whichever is larger: a deep batch-normalised net amplifies one rounding of its inputs far past 2^-9 at random
# initialisation, and hetnet is held to the yardstick its peer sets there rather than to a number that no
# implementation at that precision meets.
PEER_FACTOR = 2.0
PEER_BOUND_MAX = 0.999     # ... but below 1 (a relative error of 1 is no agreement, whatever PyTorch's is)
PRECISIONS = tuple(RTOL_PRECISION)

LR, MOMENTUM = 0.01, 0.9
FILES_LIMIT_CHARS = 400  # longest error text kept in a JSON row
REPO_ROOT = Path(__file__).resolve().parents[3]   # src/hetnet/bench/common.py -> the checkout, when run from one


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _blas() -> str:
    try:
        cfg = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{cfg.get('name')} {cfg.get('version', '')}".strip()
    except Exception:
        return "unknown"


def _gpu_name() -> str | None:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:
        pass
    try:
        import cupy

        name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=20,
                             check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def git_commit() -> str:
    """hetnet's commit as a short hash, "-dirty" when tracked files differ from it (benchmarks/results/ aside: a
    run rewrites those). $HETNET_GIT_COMMIT when set (a copied tree, such as a device machine's, whose .git may be
    stale), else "unknown" outside a git checkout (an installed package)."""
    if os.environ.get("HETNET_GIT_COMMIT"):
        return os.environ["HETNET_GIT_COMMIT"]
    if REPO_ROOT.joinpath("src", "hetnet").is_dir() and REPO_ROOT.joinpath(".git").exists():
        head = _git("rev-parse", "--short", "HEAD")
        if head:
            changes = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results")
            return head.strip() + ("-dirty" if changes is None or changes.strip() else "")
    return os.environ.get("HETNET_GIT_COMMIT") or "unknown"


def utc_now() -> str:
    """The date and time in UTC, ISO 8601 (2026-12-01T09:57:00Z)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def environment(threads: int, want_gpu: bool) -> dict:
    """Host, CPU, GPU, library versions, hetnet's commit and the date, for the top of every JSON file."""

    env = {"host": socket.gethostname(), "cpu": cpu_model(), "cpus_available": cpu_count(), "threads": threads,
           "card": _gpu_name() if want_gpu else None, "commit": git_commit(), "time_utc": utc_now(),
           "python": platform.python_version(), "hetnet": __version__, "numpy": np.__version__, "blas": _blas(),
           "thread_env": {k: os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                                                         "MKL_NUM_THREADS", "HETNET_NUM_THREADS")},
           "hetnet_env": {k: os.environ.get(k) for k in ("HETNET_CUDA_GRAPH", "HETNET_TF32")},
           "load_average_at_start": load_average()}
    try:
        import torch

        env["torch"] = torch.__version__
        if want_gpu and torch.cuda.is_available():
            env["torch_cuda"] = torch.version.cuda
            env["cudnn"] = torch.backends.cudnn.version()
    except Exception:
        env["torch"] = None
    if want_gpu:
        try:
            import cupy

            env["cupy"] = cupy.__version__
            env["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
            env["cuda_driver"] = cupy.cuda.runtime.driverGetVersion()
        except Exception as e:
            env["cupy"] = f"unavailable ({type(e).__name__})"
    return env


def load_average() -> list | None:
    """1, 5 and 15 minute load averages: other work on the machine while it was measured."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


ENVIRONMENT_KEYS = ("host", "commit", "time_utc")   # what every result file must name (the card too, on a GPU)


def write_result(path: Path, doc: dict) -> None:
    """The one writer of result JSON: `doc["environment"]` (from `environment`) must name the machine (host; the
    card, when the run used a GPU, is `card`), hetnet's commit and the date."""
    env = doc.get("environment") or {}
    missing = [k for k in ENVIRONMENT_KEYS if not env.get(k)]
    if missing:
        raise ValueError(f"{Path(path).name}: the environment lacks {', '.join(missing)}")
    atomic_write_text(path, json.dumps(doc, indent=1, default=str) + "\n")


def write_text(path: Path, text: str) -> None:
    """A markdown table or a log beside the JSON, written the same way."""
    atomic_write_text(path, text)


def slug(text: str) -> str:
    keep = "".join(c if c.isalnum() else "-" for c in text.lower())
    return "-".join(p for p in keep.split("-") if p) or "unknown"


def _libc():
    try:

        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


class RssPeak:
    """Peak RSS rise over a span, in MiB: `with RssPeak() as m: ...; m.mib`. None where /proc is missing."""

    def __enter__(self):
        gc.collect()
        libc = _libc()
        if libc is not None:
            try:
                libc.malloc_trim(0)
            except AttributeError:
                pass
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.ok = True
        except OSError:
            self.ok = False
        self.start = _status_kib("VmRSS")
        self.mib = None
        return self

    def __exit__(self, *exc):
        hwm = _status_kib("VmHWM")
        if self.ok and hwm is not None and self.start is not None:
            self.mib = round(max(0, hwm - self.start) / 1024, 1)
        return False


_PROBE_POOLS: list = []   # CupyPoolPeak's pools, kept alive for the arrays made in their spans


class CupyPoolPeak:
    """High-water marks over the span, of a fresh CuPy pool that serves every allocation made in it (nothing
    allocated before can be freed into it and hide a rise) together with a backend's private step pool (when
    `backend` has one: a fresh one is started for the span):
    - mib: bytes live (handed out and not yet freed), the same quantity as torch.cuda.max_memory_allocated;
    - reserved_mib: bytes the pools hold (live or cached), as torch.cuda.max_memory_reserved.
    Every allocation in the span goes through a wrapper that records both after it."""

    def __init__(self, backend=None):
        self.backend = backend

    def __enter__(self):
        import cupy

        cupy.cuda.Device().synchronize()
        gc.collect()
        for old in _PROBE_POOLS:
            old.free_all_blocks()
        self.pool = cupy.cuda.MemoryPool()
        _PROBE_POOLS.append(self.pool)
        self.step_pool = None
        fresh = getattr(self.backend, "fresh_step_pool", None)
        if fresh is not None:
            self.step_pool = fresh(on_malloc=self._note)
        self.start, self.start_held = self.pool.used_bytes(), self.pool.total_bytes()
        self.high, self.high_held = self.start, self.start_held
        self.mib = self.reserved_mib = None
        self._previous = cupy.cuda.get_allocator()

        def malloc(nbytes):
            mem = self.pool.malloc(nbytes)
            self._note()
            return mem

        cupy.cuda.set_allocator(malloc)
        return self

    def _note(self):
        live, held = self.pool.used_bytes(), self.pool.total_bytes()
        if self.step_pool is not None:
            live, held = live + self.step_pool.used_bytes(), held + self.step_pool.total_bytes()
        self.high, self.high_held = max(self.high, live), max(self.high_held, held)

    def __exit__(self, *exc):
        import cupy

        cupy.cuda.set_allocator(self._previous)
        cupy.cuda.Device().synchronize()
        self.mib = round((self.high - self.start) / 2**20, 1)
        self.reserved_mib = round((self.high_held - self.start_held) / 2**20, 1)
        return False


class TorchCudaPeak:
    """Rise of torch.cuda.max_memory_allocated (mib) and max_memory_reserved (reserved_mib) over the span."""

    def __enter__(self):
        import torch

        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        self.start, self.start_held = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
        self.mib = self.reserved_mib = None
        return self

    def __exit__(self, *exc):
        import torch

        torch.cuda.synchronize()
        self.mib = round((torch.cuda.max_memory_allocated() - self.start) / 2**20, 1)
        self.reserved_mib = round((torch.cuda.max_memory_reserved() - self.start_held) / 2**20, 1)
        return False


def _wall(fn: Callable, inner: int, sync: Callable | None) -> float:
    if sync:
        sync()
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    if sync:
        sync()
    return (time.perf_counter() - t0) / inner


class Clock:
    """Seconds per call of fn over a block of `inner` calls. kind: 'cpu' (perf_counter), 'torch' (torch.cuda
    events) or 'cupy' (CuPy events on `stream` -- the hetnet step object's own stream when it has one -- else the
    current stream; falling back to synchronized wall time when the events saw less than half of it, which means the
    work ran on a stream the events were not ordered with)."""

    def __init__(self, kind: str, backend=None, stream=None):
        self.kind, self.backend, self.stream, self.fallbacks = kind, backend, stream, 0
        if kind == "torch":
            import torch

            self.sync = torch.cuda.synchronize
        elif kind == "cupy":
            self.sync = backend.synchronize
        else:
            self.sync = backend.synchronize if backend is not None else None

    def __call__(self, fn: Callable, inner: int = 1) -> float:
        if self.kind == "torch":
            import torch

            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / inner
        if self.kind == "cupy":
            import cupy

            stream = self.stream
            if not isinstance(stream, (cupy.cuda.Stream, getattr(cupy.cuda, "ExternalStream", cupy.cuda.Stream))):
                stream = cupy.cuda.get_current_stream()
            self.sync()
            t0 = time.perf_counter()
            try:
                start, end = cupy.cuda.Event(), cupy.cuda.Event()
                start.record(stream)
                for _ in range(inner):
                    fn()
                end.record(stream)
                end.synchronize()
                ev = cupy.cuda.get_elapsed_time(start, end) / 1e3 / inner
            except cupy.cuda.runtime.CUDARuntimeError:
                ev = 0.0  # events unusable here: the synchronized wall time below stands
            self.sync()
            wall = (time.perf_counter() - t0) / inner
            if ev < 0.5 * wall:
                self.fallbacks += 1
                return wall
            return ev
        return _wall(fn, inner, self.sync)


def plan(seconds_per_call: float, gpu: bool, repeats: int, side_seconds: float, block_ms: float | None = None
         ) -> tuple[int, int]:
    """(repetitions, calls per repetition): blocks last >= block_ms (default 10 ms on a GPU; 50 ms on a CPU, so a
    hand-over between two libraries' thread pools falls on few calls), of at most 50 (GPU) or 100 (CPU) calls; total
    time per side about side_seconds, never fewer than min(3, repeats) repetitions nor more than `repeats`."""
    t = max(seconds_per_call, 1e-6)
    block = (block_ms if block_ms is not None else 10.0 if gpu else 50.0) / 1e3
    inner = min(50 if gpu else 100, max(1, math.ceil(block / t)))
    reps = max(min(3, repeats), min(repeats, int(side_seconds / (t * inner))))
    return reps, inner


# CPU: untimed calls for at least this long before each timed block. When one side takes over, the other's threads
# may still be spinning (libgomp's, PyTorch's OpenMP pool, spin for milliseconds after a parallel region) or its own
# may be asleep; either slows the first few milliseconds of calls, which neither library sees in a training loop of
# its own (measured, mlp at batch 32: hetnet's first four steps after a PyTorch block 1.1-2.1x its steady time,
# PyTorch's after a hetnet block 1.2-1.6x).
SETTLE_SECONDS = 0.015


def time_sides(sides: dict[str, tuple[Callable, Clock]], reps: int, inner: int, settle: bool = False,
               samples: dict | None = None) -> dict[str, float]:
    """Median seconds per call for each side; within a repetition the sides take turns, each time starting one
    later. settle: untimed calls for SETTLE_SECONDS (at least one) before each timed block. samples: a dict that
    receives each side's list of block times (seconds per call), in repetition order."""
    names = list(sides)
    samples = {} if samples is None else samples
    samples.update({n: [] for n in names})
    for r in range(reps):
        for n in names[r % len(names):] + names[:r % len(names)]:
            fn, clock = sides[n]
            if settle:
                t0 = time.perf_counter()
                fn()
                while time.perf_counter() - t0 < SETTLE_SECONDS:
                    fn()
            samples[n].append(clock(fn, inner))
    return {n: statistics.median(samples[n]) for n in names}


def measure(sides: dict[str, tuple[Callable, Clock]], gpu: bool, args, seconds_scale: float = 1.0,
            warmup: int | None = None) -> tuple[dict[str, float], dict]:
    """Warm-up, then alternating timed blocks (time_sides): the timing of every table. Returns the median seconds
    per call of each side and {"repeats", "steps_per_repeat", "samples"}. warmup: untimed calls per side (default
    args.warmup); the last one is timed once, and the slowest side's time sets the block length (plan). On a CPU
    each block is settled when calls are short (< 0.25 s)."""
    warmup = args.warmup if warmup is None else warmup
    est = 0.0
    for fn, clock in sides.values():
        for _ in range(max(0, warmup - 1)):
            fn()
        est = max(est, clock(fn, 1))
    reps, inner = plan(est, gpu, args.repeats, args.side_seconds * seconds_scale, args.block_ms)
    samples: dict = {}
    med = time_sides(sides, reps, inner, settle=not gpu and est < 0.25, samples=samples)
    return med, {"repeats": reps, "steps_per_repeat": inner, "samples": samples}


def cpu_busy(interval: float = 0.5) -> float:
    """Fraction of all CPUs busy (any process) over `interval` seconds, from /proc/stat; 0 where unavailable."""
    def snap():
        with open("/proc/stat") as f:
            v = [int(t) for t in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]   # total, idle + iowait
    try:
        t0, i0 = snap()
        time.sleep(interval)
        t1, i1 = snap()
    except (OSError, ValueError, IndexError):
        return 0.0
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


QUIET_THRESHOLD = 0.1


def wait_quiet(limit_s: float, threshold: float = QUIET_THRESHOLD) -> float:
    """Wait (up to limit_s) until other processes use under `threshold` of the CPUs; returns the last reading."""
    deadline = time.monotonic() + limit_s
    busy = cpu_busy()
    while busy > threshold and time.monotonic() < deadline:
        time.sleep(1.0)
        busy = cpu_busy()
    return busy


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return math.inf
    if not np.all(np.isfinite(a)):
        return math.inf
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def sig(v: float, digits: int = 4) -> float:
    """v to `digits` significant figures (TFLOP/s of a tiny CPU row are not 0.0)."""
    return float(f"{v:.{digits}g}")


def short_error(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"[:FILES_LIMIT_CHARS]


def parse_list(text: str, flag: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UsageError(f"{flag}: expected a comma-separated list, got {text!r}")
    return items


def threads_text(n: int) -> str:
    return f"{n} thread" + ("" if n == 1 else "s")


def fmt_ms(v) -> str:
    """Milliseconds to 3 significant figures or so."""
    if v is None:
        return "—"
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 100 else f"{v:,.0f}"


def fmt(v, digits: int = 2) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}f}"
    return str(v)


def targets_markdown(targets: list[dict], title: str = "Targets:") -> list[str]:
    """Markdown lines for judged targets ({"target", "rows", "met", "missed"}); none when there are none."""
    if not targets:
        return []
    return ["", title, ""] + [f"- {t['target']}: {'met' if t['met'] else 'not met'}, {t['rows'] - len(t['missed'])} "
                              f"of {t['rows']} rows reach it"
                              + (f" (short: {', '.join(t['missed'])})" if t["missed"] else "") for t in targets]


def md_header(env: dict) -> list[str]:
    where = f"**{env['card']}** (GPU), host `{env['host']}`" if env.get("card") else f"host `{env['host']}`"
    libs = ", ".join(f"{k} {env[k]}" for k in ("torch", "numpy", "cupy", "cudnn") if env.get(k))
    load = env.get("load_average_at_start")
    return [(f"Machine: {where}; CPU: {env['cpu']}, {threads_text(env['threads'])} of {env['cpus_available']}; "
             f"{libs}; BLAS {env['blas']}; measured {env['time_utc']}"
             + (f", load average {load[0]} at the start." if load else ".")), ""]
