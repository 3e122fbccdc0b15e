"""`hetnet bench`: hetnet against PyTorch on the same model, weights, inputs and machine, checked before timed.

Three tables, each written to --out as JSON (the record) and markdown (to read), plus one chart:

- train_step.json / .md / speedup.png: for each model x batch size x hetnet backend, one SGD+momentum training step
  (forward, softmax cross-entropy, backward, update) and one inference pass, against PyTorch on the same device
  (CPU with the same thread count; on a GPU: eager and the whole step captured as a CUDA graph), float32 with TF32 off
  on both sides (plus one TF32 row with --tf32-row). Before timing, the logits, the loss, every parameter gradient
  and the update made by the timed step must agree with PyTorch's within the float32 tolerance; a row that does not
  is refused (kept in the JSON with its reason, never timed).
- layers.json / .md (--layers): thesis-m4's layers at batch 32, hetnet's kernels vs PyTorch's (cuDNN/cuBLAS on a
  GPU), with achieved GFLOP/s or GB/s beside this machine's measured GEMM and copy ceilings.
- thesis_epochs.json / .md (--thesis-epochs): seconds per training epoch of thesis models 0-4 on 1000/1000/1000/
  2000/2500 CIFAR-10 images, every backend and PyTorch, beside the thesis's own figures.

    hetnet bench --quick                                  # a minute on a laptop: 3 models, batch 32 and 128
    hetnet bench --devices cpu,reference --out benchmarks/results/$(hostname)
    hetnet bench --devices cuda --all --out DIR           # on a GPU machine: everything, about 6 minutes

Timing: median over repetitions after warm-up; sides alternate within each repetition so that drift in a shared
machine's load falls on both. CPU: time.perf_counter per step. GPU: CUDA events around blocks of steps (block >= 10
ms), synchronized. Peak memory, CPU: the rise of the process's resident-set high-water mark (VmHWM, reset through
/proc/self/clear_refs) over the RSS just before the side's model is built, through one training step and one
inference pass; glibc is told to return large blocks to the system so that one side's freed memory does not hide
the next side's. GPU: hetnet, bytes held by CuPy's memory pool (freed before, so it is the pool's high-water mark);
PyTorch, torch.cuda.max_memory_allocated over the same span.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from . import interop, optim, zoo
from .device import cuda_available, get_backend
from .errors import DeviceError, UsageError

# Tolerances of the correctness gate: relative error ||a - b|| / ||b||, the float32 value of tests/conftest.py's RTOL
# (tests/test_bench.py checks that the two agree). Rows where either side may use TF32 (the cuda backend, whose
# GEMMs can, and the TF32 row) are gated at the TF32 tolerance, and each row records the error it actually had.
RTOL_F32 = 1e-4
RTOL_TF32 = 1e-2

LR, MOMENTUM = 0.01, 0.9
MODELS = ("thesis-m0", "thesis-m1", "thesis-m2", "thesis-m3", "thesis-m4", "fashion-cnn", "mlp")
BATCHES = (32, 128, 1024)
QUICK_MODELS = ("thesis-m1", "fashion-cnn", "mlp")
QUICK_BATCHES = (32, 128)
# the float64 reference backend is an oracle, not a fast path: it is timed only at these (model, batch) pairs
REFERENCE_ROWS = ("thesis-m0:32", "mlp:32")
TF32_ROW = ("thesis-m1", 1024)

# the thesis's experiment: model, number of CIFAR-10 training images, and its own figures (seconds per epoch)
THESIS_EPOCHS = (("thesis-m0", 1000), ("thesis-m1", 1000), ("thesis-m2", 1000), ("thesis-m3", 2000),
                 ("thesis-m4", 2500))
THESIS_FIGURES = {
    "thesis-m0": {"sequential_s": 101.0, "openmp_8_threads_s": 12.76,
                  "machine": "Intel Xeon Silver 4214R (sequential; OpenMP with 8 threads)"},
}
THESIS_NOTE = ("The thesis timed model 0 at 101 s per epoch sequentially and 12.76 s with 8 OpenMP threads on a Xeon "
               "Silver 4214R; its CUDA and cuDNN runs were on an RTX 2080 Ti. Only these figures are recorded here.")
CIFAR_TAR = "cifar10-jpg-train.tar.gz"

FILES_LIMIT_CHARS = 400  # longest error text kept in a JSON row


# --- the machine ----------------------------------------------------------------------------------------------------


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


def environment(threads: int, want_gpu: bool) -> dict:
    """Host, CPU, GPU and library versions for the top of every JSON file."""
    from . import __version__

    env = {"host": socket.gethostname(), "cpu": cpu_model(), "cpus_available": cpu_count(), "threads": threads,
           "card": _gpu_name() if want_gpu else None, "python": platform.python_version(), "hetnet": __version__,
           "numpy": np.__version__, "blas": _blas(),
           "thread_env": {k: os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                                                         "MKL_NUM_THREADS", "HETNET_NUM_THREADS")},
           "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "load_average_at_start": _load()}
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


def _load() -> list | None:
    """1, 5 and 15 minute load averages: other work on the machine while it was measured."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _slug(text: str) -> str:
    keep = "".join(c if c.isalnum() else "-" for c in text.lower())
    return "-".join(p for p in keep.split("-") if p) or "unknown"


# --- memory ---------------------------------------------------------------------------------------------------------


def _libc():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _glibc_return_big_blocks() -> None:
    """Serve blocks >= 64 KiB by mmap (freed straight back to the system), so freed memory of one side does not
    make the next side's RSS rise look smaller. mallopt(M_MMAP_THRESHOLD = -3)."""
    libc = _libc()
    if libc is not None:
        try:
            libc.mallopt(-3, 64 * 1024)
        except AttributeError:
            pass


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


class CupyPoolPeak:
    """Bytes CuPy's default pool holds after the span, having been emptied before it (its high-water mark)."""

    def __enter__(self):
        import cupy

        self.pool = cupy.get_default_memory_pool()
        cupy.cuda.Device().synchronize()
        gc.collect()
        self.pool.free_all_blocks()
        self.start = self.pool.total_bytes()
        self.mib = None
        return self

    def __exit__(self, *exc):
        import cupy

        cupy.cuda.Device().synchronize()
        self.mib = round((self.pool.total_bytes() - self.start) / 2**20, 1)
        return False


class TorchCudaPeak:
    def __enter__(self):
        import torch

        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        self.start = torch.cuda.memory_allocated()
        self.mib = None
        return self

    def __exit__(self, *exc):
        import torch

        torch.cuda.synchronize()
        self.mib = round((torch.cuda.max_memory_allocated() - self.start) / 2**20, 1)
        return False


# --- timing ---------------------------------------------------------------------------------------------------------


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


def plan(seconds_per_call: float, gpu: bool, repeats: int, side_seconds: float) -> tuple[int, int]:
    """(repetitions, calls per repetition): GPU blocks last >= 10 ms; total time per side about side_seconds, never
    fewer than min(3, repeats) repetitions nor more than `repeats`."""
    t = max(seconds_per_call, 1e-6)
    inner = min(50, max(1, math.ceil(0.01 / t))) if gpu else 1
    reps = max(min(3, repeats), min(repeats, int(side_seconds / (t * inner))))
    return reps, inner


def time_sides(sides: dict[str, tuple[Callable, Clock]], reps: int, inner: int) -> dict[str, float]:
    """Median seconds per call for each side; within a repetition the sides take turns, each time starting one
    later."""
    names = list(sides)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for n in names[r % len(names):] + names[:r % len(names)]:
            fn, clock = sides[n]
            samples[n].append(clock(fn, inner))
    return {n: statistics.median(v) for n, v in samples.items()}


# --- one model, two frameworks --------------------------------------------------------------------------------------


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return math.inf
    if not np.all(np.isfinite(a)):
        return math.inf
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _set_dropout(hmodel, tmodels, p_or_saved):
    """Set every dropout probability to p (a float), or restore saved values (a list); returns the old values."""
    import torch

    hd = [m for m in hmodel.layers if type(m).__name__ == "Dropout"]
    td = [[m for m in t.modules() if isinstance(m, torch.nn.Dropout)] for t in tmodels]
    old = [m.p for m in hd]
    new = p_or_saved if isinstance(p_or_saved, list) else [p_or_saved] * len(hd)
    for i, m in enumerate(hd):
        m.p = new[i]
        for t in td:
            t[i].p = new[i]
    return old


def _named_grads(model) -> dict:
    out = {}
    for i, layer in enumerate(model.layers):
        for k, p in layer.params.items():
            out[f"{i}.{k}"] = model.backend.to_numpy(p.grad)
    return out


def _named_weights(model) -> dict:
    out = {}
    for i, layer in enumerate(model.layers):
        for k, p in layer.params.items():
            out[f"{i}.{k}"] = np.array(model.backend.to_numpy(p.data), dtype=np.float64)
    return out


def _torch_weights(tmodel) -> dict:
    return {k: v for k, v in interop.torch_state(tmodel).items() if not k.endswith(("running_mean", "running_var"))}


def _make_step(model, opt):
    """The step the trainer would use: hetnet.train.make_train_step (a backend's fast path when it has one)."""
    try:
        from .train import make_train_step

        ts = make_train_step(model, opt, None, 0.0)
        path = "backend.make_train_step" if hasattr(model.backend, "make_train_step") else "train.TrainStep"
        return ts, path
    except ImportError:
        return _PlainStep(model, opt), "forward/backward/step"


class _PlainStep:
    """forward, softmax cross-entropy, backward, SGD update (used when hetnet.train is unavailable)."""

    def __init__(self, model, opt):
        self.model, self.opt = model, opt

    def step(self, x, y):
        self.opt.zero_grad()
        logits = self.model.forward(x)
        _, dlogits = self.model.backend.softmax_cross_entropy(logits, y, 0.0)
        self.model.backward(dlogits, need_dx=False)
        self.opt.step()

    def collect(self):
        return (0.0, 0, 0)


class TorchGraphStep:
    """PyTorch's fastest mode for these models: forward, loss, backward and SGD step captured once as a CUDA graph
    (static input tensors; warmed up on a side stream first, as the torch.cuda.graphs documentation shows; SGD keeps
    no step counter, so it needs no `capturable` flag) and replayed."""

    def __init__(self, tmodel, topt, x, y, warmup: int = 3):
        import torch
        import torch.nn.functional as F

        self.sx, self.sy = x.clone(), y.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(warmup):
                topt.zero_grad(set_to_none=True)
                F.cross_entropy(tmodel(self.sx), self.sy).backward()
                topt.step()
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        topt.zero_grad(set_to_none=True)
        with torch.cuda.graph(self.graph):
            self.loss = F.cross_entropy(tmodel(self.sx), self.sy)
            self.loss.backward()
            topt.step()

    def step(self):
        self.graph.replay()


def _torch_flags(tf32: bool) -> None:
    import torch

    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cudnn.benchmark = True


def _hetnet_tf32(backend, on: bool) -> str:
    """Ask the hetnet backend for TF32 GEMMs; says what happened."""
    for name in ("set_tf32",):
        fn = getattr(backend, name, None)
        if callable(fn):
            fn(on)
            return "on" if on else "off"
    if hasattr(backend, "tf32"):
        backend.tf32 = on
        return "on" if on else "off"
    return "off (backend has no TF32 switch)" if on else "off"


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"[:FILES_LIMIT_CHARS]


def bench_train_step(model_name: str, batch: int, device: str, args, tf32: bool = False) -> dict:
    """One row of train_step.json. Raises nothing a caller must handle except programming errors in hetnet."""
    import torch
    import torch.nn.functional as F

    backend = get_backend(device)
    gpu = device.startswith("cuda")
    tdev = "cuda" if gpu else "cpu"
    row = {"model": model_name, "batch_size": batch, "hetnet_backend": backend.name, "torch_device": tdev,
           "tf32": tf32, "status": "ok", "reason": None}
    if gpu:
        _torch_flags(tf32)
        row["hetnet_tf32"] = _hetnet_tf32(backend, tf32)
    tol = RTOL_TF32 if (gpu or tf32) else RTOL_F32
    row["check_tolerance"] = tol

    # same weights, same inputs
    from . import seed as hn_seed

    hn_seed(0)
    hmodel, shape, _ = zoo.resolve(model_name)
    hmodel.to(backend).train()
    tmodel = interop.to_torch(hmodel, device=tdev)
    tmodel.train()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((batch,) + tuple(shape)).astype(np.float32)
    y = rng.integers(0, hmodel.output_shape(tuple(shape))[0], batch)
    hx, hy = backend.asarray(x), backend.labels(y)
    tx, ty = torch.from_numpy(x).to(tdev), torch.from_numpy(y.astype(np.int64)).to(tdev)
    hopt = optim.SGD(hmodel.parameters(), lr=LR, momentum=MOMENTUM)
    topt = torch.optim.SGD(tmodel.parameters(), lr=LR, momentum=MOMENTUM)
    hstep, row["hetnet_path"] = _make_step(hmodel, hopt)
    tgraph_model = copy.deepcopy(tmodel) if gpu else None

    # --- the gate: logits, loss, gradients, then the update made by the timed step, dropout off
    saved = _set_dropout(hmodel, [tmodel] + ([tgraph_model] if gpu else []), 0.0)
    try:
        hmodel.zero_grad()
        logits = hmodel.forward(hx)
        hloss, dlogits = backend.softmax_cross_entropy(logits, hy, 0.0)
        hmodel.backward(dlogits, need_dx=False)
        topt.zero_grad(set_to_none=True)
        tlogits = tmodel(tx)
        tloss = F.cross_entropy(tlogits, ty)
        tloss.backward()
        errs = {"logits": _rel(backend.to_numpy(logits), tlogits.detach().cpu().numpy()),
                "loss": abs(float(hloss) - tloss.item()) / max(abs(tloss.item()), 1e-30)}
        tg = interop.torch_grads(tmodel)
        for k, g in _named_grads(hmodel).items():
            errs[f"grad {k}"] = _rel(g, tg[k])
        hmodel.zero_grad()
        topt.zero_grad(set_to_none=True)
        # the updates of the first two timed steps from equal weights (the first SGD step, then one with momentum;
        # a fast path that runs its first batch eagerly and replays a captured graph after is checked both ways)
        for s in (1, 2):
            w0, tw0 = _named_weights(hmodel), _torch_weights(tmodel)
            hstep.step(hx, hy)
            hstep.collect()
            backend.synchronize()
            topt.zero_grad(set_to_none=True)
            F.cross_entropy(tmodel(tx), ty).backward()
            topt.step()
            w1, tw1 = _named_weights(hmodel), _torch_weights(tmodel)
            for k in w0:
                errs[f"step {s} update {k}"] = _rel(w1[k] - w0[k], tw1[k] - tw0[k])
    finally:
        _set_dropout(hmodel, [tmodel] + ([tgraph_model] if gpu else []), saved)
    worst = max(errs, key=errs.get)
    row["check_max_rel_err"] = float(f"{errs[worst]:.3g}")
    row["check_worst"] = worst
    if not errs[worst] <= tol:
        row["status"] = "refused"
        row["reason"] = (f"hetnet and PyTorch disagree before timing: {worst} relative error {errs[worst]:.3g} "
                         f"> {tol:g}")
        return row

    def hetnet_train():
        hstep.step(hx, hy)

    def torch_train():
        topt.zero_grad(set_to_none=True)
        F.cross_entropy(tmodel(tx), ty).backward()
        topt.step()

    def hetnet_infer():
        hmodel.forward(hx)

    def torch_infer():
        with torch.inference_mode():
            tmodel(tx)

    hclock = Clock("cupy", backend, getattr(hstep, "stream", None)) if gpu else Clock("cpu", backend)
    iclock = Clock("cupy", backend) if gpu else hclock
    tclock = Clock("torch") if gpu else Clock("cpu")
    sides = {"hetnet": (hetnet_train, hclock), "torch_eager": (torch_train, tclock)}

    if gpu:
        try:
            gopt = torch.optim.SGD(tgraph_model.parameters(), lr=LR, momentum=MOMENTUM)
            with TorchCudaPeak() as gm:
                tgraph = TorchGraphStep(tgraph_model, gopt, tx, ty)
                tgraph.step()
            row["torch_graph_peak_mib"] = gm.mib
            sides["torch_graph"] = (tgraph.step, tclock)
        except Exception as e:  # a capture that fails is recorded, the rest of the row still runs
            row["torch_graph_error"] = _short(e)

    # warm-up (also gives the per-step estimate that sets the number of repetitions)
    est = 0.0
    for fn, clock in sides.values():
        for _ in range(max(0, args.warmup - 1)):
            fn()
        est = max(est, clock(fn, 1))
    reps, inner = plan(est, gpu, args.repeats, args.side_seconds)
    med = time_sides(sides, reps, inner)
    row["repeats"], row["steps_per_repeat"] = reps, inner
    if hclock.fallbacks or iclock.fallbacks:
        row["hetnet_timer"] = "wall clock (CuPy events were not on the backend's stream)"

    # inference (eval mode; PyTorch under inference_mode)
    hmodel.eval()
    tmodel.eval()
    try:
        isides = {"hetnet": (hetnet_infer, iclock), "torch": (torch_infer, tclock)}
        iest = max(clock(fn, 1) for fn, clock in isides.values())
        ireps, iinner = plan(iest, gpu, args.repeats, args.side_seconds / 2)
        imed = time_sides(isides, ireps, iinner)
    finally:
        hmodel.train()
        tmodel.train()

    # peak memory, each side on its own fresh model
    row["hetnet_peak_mib"], row["torch_peak_mib"] = _peak_memory(model_name, backend, x, y, tdev, gpu)

    def ms(s):
        return round(s * 1e3, 4)

    def ips(s):
        return round(batch / s, 1)

    row.update({"hetnet_ms_per_step": ms(med["hetnet"]), "hetnet_img_per_s": ips(med["hetnet"]),
                "torch_eager_ms_per_step": ms(med["torch_eager"]), "torch_eager_img_per_s": ips(med["torch_eager"]),
                "torch_graph_ms_per_step": ms(med["torch_graph"]) if "torch_graph" in med else None,
                "torch_graph_img_per_s": ips(med["torch_graph"]) if "torch_graph" in med else None,
                "hetnet_infer_img_per_s": ips(imed["hetnet"]), "torch_infer_img_per_s": ips(imed["torch"]),
                "speedup_vs_torch_eager": round(med["torch_eager"] / med["hetnet"], 3)})
    row["speedup_vs_torch_graph"] = (round(med["torch_graph"] / med["hetnet"], 3) if "torch_graph" in med else None)
    return row


def _peak_memory(model_name, backend, x, y, tdev, gpu) -> tuple:
    """(hetnet MiB, torch MiB): a fresh model per side, one training step and one inference pass."""
    import torch
    import torch.nn.functional as F

    from . import seed as hn_seed

    hpeak = tpeak = None
    try:
        with (CupyPoolPeak() if gpu else RssPeak()) as m:
            hn_seed(0)
            hm, _, _ = zoo.resolve(model_name)
            hm.to(backend).train()
            hx, hy = backend.asarray(x), backend.labels(y)
            st, _ = _make_step(hm, optim.SGD(hm.parameters(), lr=LR, momentum=MOMENTUM))
            for _ in range(2 if gpu else 1):  # on the GPU the second step is the captured graph's first replay
                st.step(hx, hy)
            st.collect()
            hm.eval()
            hm.forward(hx)
            backend.synchronize()
        hpeak = m.mib
        pool = getattr(st, "pool", None)  # a step object's private pool for its CUDA graphs
        if gpu and hpeak is not None and hasattr(pool, "total_bytes"):
            hpeak = round(hpeak + pool.total_bytes() / 2**20, 1)
        del hm, st, hx, hy
        with (TorchCudaPeak() if gpu else RssPeak()) as m:
            hn_seed(0)
            tm = interop.to_torch(zoo.resolve(model_name)[0], device=tdev)
            tx, ty = torch.from_numpy(x).to(tdev), torch.from_numpy(y.astype(np.int64)).to(tdev)
            to = torch.optim.SGD(tm.parameters(), lr=LR, momentum=MOMENTUM)
            to.zero_grad(set_to_none=True)
            F.cross_entropy(tm(tx), ty).backward()
            to.step()
            with torch.inference_mode():
                tm.eval()(tx)
        tpeak = m.mib
    except Exception:
        pass
    return hpeak, tpeak


# --- the train-step table -------------------------------------------------------------------------------------------


def _parse_list(text: str, flag: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UsageError(f"{flag}: expected a comma-separated list, got {text!r}")
    return items


def _fmt(v, digits: int = 2) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}f}"
    return str(v)


def _header(env: dict) -> list[str]:
    where = f"**{env['card']}** (GPU), host `{env['host']}`" if env.get("card") else f"host `{env['host']}`"
    libs = ", ".join(f"{k} {env[k]}" for k in ("torch", "numpy", "cupy", "cudnn") if env.get(k))
    load = env.get("load_average_at_start")
    return [(f"Machine: {where}; CPU: {env['cpu']}, {env['threads']} threads of {env['cpus_available']}; "
             f"{libs}; BLAS {env['blas']}; measured {env['time_utc']}"
             + (f", load average {load[0]} at the start." if load else ".")), ""]


def train_step_markdown(doc: dict) -> str:
    lines = ["# One training step: hetnet vs PyTorch", ""] + _header(doc["environment"])
    lines += [doc["method"], "",
              "| model | batch | hetnet backend | hetnet ms/step | torch eager ms/step | torch graph ms/step | "
              "speed-up vs eager | vs graph | hetnet img/s | hetnet infer img/s | torch infer img/s | "
              "hetnet peak MiB | torch peak MiB | check rel. err |",
              "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    bad = []
    for r in doc["rows"]:
        if r.get("status") != "ok":
            bad.append(r)
            continue
        name = r["model"] + (" (TF32)" if r.get("tf32") else "")
        lines.append(f"| {name} | {r['batch_size']} | {r['hetnet_backend']} | {_fmt(r['hetnet_ms_per_step'])} | "
                     f"{_fmt(r['torch_eager_ms_per_step'])} | {_fmt(r.get('torch_graph_ms_per_step'))} | "
                     f"{_fmt(r['speedup_vs_torch_eager'])}x | "
                     f"{_fmt(r.get('speedup_vs_torch_graph')) + 'x' if r.get('speedup_vs_torch_graph') else '—'} | "
                     f"{_fmt(r['hetnet_img_per_s'])} | {_fmt(r['hetnet_infer_img_per_s'])} | "
                     f"{_fmt(r['torch_infer_img_per_s'])} | {_fmt(r.get('hetnet_peak_mib'), 1)} | "
                     f"{_fmt(r.get('torch_peak_mib'), 1)} | {r['check_max_rel_err']:.1e} |")
    if bad:
        lines += ["", "Rows not timed:", ""]
        lines += [f"- {r['model']} batch {r['batch_size']} on {r['hetnet_backend']}: {r['status']}: {r['reason']}"
                  for r in bad]
    for e in doc.get("errors", []):
        lines.append(f"- {e}")
    return "\n".join(lines) + "\n"


def speedup_chart(rows: list[dict], path: Path, title: str) -> bool:
    """Bars of PyTorch time / hetnet time per model, one bar per batch size; one panel per (backend, baseline)."""
    ok = [r for r in rows if r.get("status") == "ok" and not r.get("tf32")]
    if not ok:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for be in dict.fromkeys(r["hetnet_backend"] for r in ok):
        for key, label in (("speedup_vs_torch_eager", "PyTorch eager"), ("speedup_vs_torch_graph",
                                                                          "PyTorch CUDA graph")):
            if any(r.get(key) for r in ok if r["hetnet_backend"] == be):
                panels.append((be, key, label))
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 3.2 * len(panels)), squeeze=False)
    for ax, (be, key, label) in zip(axes[:, 0], panels, strict=True):
        sel = [r for r in ok if r["hetnet_backend"] == be and r.get(key)]
        models = list(dict.fromkeys(r["model"] for r in sel))
        batches = sorted({r["batch_size"] for r in sel})
        width = 0.8 / max(1, len(batches))
        for j, b in enumerate(batches):
            vals = [next((r[key] for r in sel if r["model"] == m and r["batch_size"] == b), 0.0) for m in models]
            xs = [i + (j - (len(batches) - 1) / 2) * width for i in range(len(models))]
            bars = ax.bar(xs, vals, width, label=f"batch {b}")
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(models)), models, fontsize=8)
        ax.set_ylabel("speed-up (x)")
        ax.set_title(f"hetnet {be} vs {label}: training step (higher is faster)", fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run_train_step(args, devices: list[str], env: dict, out: Path, deadline: float) -> dict:
    rows, errors = [], []
    reference_rows = set(args.reference_rows)
    for device in devices:
        try:
            get_backend(device)
        except Exception as e:
            errors.append(f"{device}: backend unavailable: {_short(e)}")
            continue
        for model_name in args.models:
            for batch in args.batch_sizes:
                if device == "reference" and f"{model_name}:{batch}" not in reference_rows:
                    continue
                if time.monotonic() > deadline:
                    rows.append({"model": model_name, "batch_size": batch, "hetnet_backend": device,
                                 "status": "skipped", "reason": "the run's time budget (--time-budget) was spent"})
                    continue
                rows.append(_safe_row(model_name, batch, device, args, False))
                _progress(rows[-1])
        if device.startswith("cuda") and args.tf32_row and time.monotonic() <= deadline:
            rows.append(_safe_row(TF32_ROW[0], TF32_ROW[1], device, args, True))
            _progress(rows[-1])
            try:
                _torch_flags(False)
                _hetnet_tf32(get_backend(device), False)
            except Exception:
                pass
    gpu = any(d.startswith("cuda") for d in devices)
    doc = {"environment": env, "method": method_text(gpu), "tolerances": {"float32": RTOL_F32, "tf32": RTOL_TF32},
           "optimizer": f"SGD lr={LR} momentum={MOMENTUM}", "errors": errors, "rows": rows}
    doc["load_average_at_end"] = _load()
    (out / "train_step.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "train_step.md").write_text(train_step_markdown(doc))
    try:
        where = env.get("card") or env["host"]
        if speedup_chart(rows, out / "speedup.png", f"{where} — {env['cpu']}, {env['threads']} threads"):
            doc["chart"] = "speedup.png"
    except Exception as e:
        errors.append(f"chart: {_short(e)}")
    return doc


def method_text(gpu: bool) -> str:
    text = (f"One step = forward, softmax cross-entropy, backward, SGD (lr {LR}, momentum {MOMENTUM}) update, "
            "float32. "
            "Same weights and inputs on both sides; before timing, logits, loss, every gradient and the first "
            "update must agree with PyTorch within the tolerance in the row (float32 1e-4 relative; 1e-2 where TF32 "
            "may be in use: GPU rows). Median over repetitions after warm-up, sides alternating. ")
    if gpu:
        text += ("GPU: CUDA events around blocks of steps; PyTorch with cudnn.benchmark on and TF32 off except in "
                 "the row marked TF32; 'graph' = the whole PyTorch step captured as a CUDA graph. Peak memory: "
                 "CuPy pool high-water mark (hetnet) and torch.cuda.max_memory_allocated (PyTorch eager).")
    else:
        text += ("CPU: perf_counter per step; PyTorch with the same thread count. Peak memory: rise of the RSS "
                 "high-water mark (VmHWM) over a fresh model's build, one step and one inference pass.")
    return text


def _safe_row(model_name, batch, device, args, tf32) -> dict:
    try:
        return bench_train_step(model_name, batch, device, args, tf32)
    except Exception as e:
        return {"model": model_name, "batch_size": batch, "hetnet_backend": device, "tf32": tf32,
                "status": "error", "reason": _short(e)}
    finally:
        gc.collect()


def _progress(row: dict) -> None:
    if row.get("status") == "ok":
        g = row.get("torch_graph_ms_per_step")
        print(f"  {row['model']:<12} batch {row['batch_size']:>5} {row['hetnet_backend']:<9}"
              f"{' TF32' if row.get('tf32') else ''}: hetnet {row['hetnet_ms_per_step']:9.3f} ms, "
              f"torch eager {row['torch_eager_ms_per_step']:9.3f} ms"
              + (f", graph {g:8.3f} ms" if g else "") + f"  (x{row['speedup_vs_torch_eager']:.2f} vs eager)",
              flush=True)
    else:
        print(f"  {row['model']:<12} batch {row['batch_size']:>5} {row['hetnet_backend']:<9}: "
              f"{row['status']}: {row.get('reason')}", flush=True)


# --- per-layer table ------------------------------------------------------------------------------------------------


def layer_shapes(model_name: str = "thesis-m4", batch: int = 32) -> list[dict]:
    """The conv, pool and dense layers of a model with their input shapes at a batch size."""
    model, shape, _ = zoo.resolve(model_name)
    out, cur = [], tuple(shape)
    counts: dict[str, int] = {}
    for layer in model.layers:
        t = type(layer).__name__
        if t in ("Conv2D", "MaxPool2D", "Dense"):
            counts[t] = counts.get(t, 0) + 1
            out.append({"name": f"{t.lower().replace('maxpool2d', 'pool').replace('conv2d', 'conv')}{counts[t]}",
                        "type": t, "input": (batch,) + cur, "layer": layer})
        cur = layer.output_shape(cur)
    return out


def ceilings(gpu: bool) -> dict:
    """This machine's measured GEMM rate (float32) and copy bandwidth, the roofs the layer numbers sit under."""
    import torch

    res = {}
    if gpu:
        n, nbytes = 8192, 1 << 30
        _torch_flags(False)
        a = torch.randn(n, n, device="cuda")
        b = torch.randn(n, n, device="cuda")
        clock = Clock("torch")
        clock(lambda: a @ b, 2)
        t = min(clock(lambda: a @ b, 5) for _ in range(3))
        res["gemm_gflops"] = round(2 * n**3 / t / 1e9, 1)
        res["gemm"] = f"torch.mm {n}x{n}x{n} float32, TF32 off"
        src = torch.empty(nbytes // 4, device="cuda")
        dst = torch.empty_like(src)
        clock(lambda: dst.copy_(src), 2)
        t = min(clock(lambda: dst.copy_(src), 10) for _ in range(3))
        res["copy_gbps"] = round(2 * nbytes / t / 1e9, 1)
        res["copy"] = "device-to-device copy of 1 GiB (read + write bytes)"
        del a, b, src, dst
        torch.cuda.empty_cache()
    else:
        n = 1024
        a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
        ta = torch.from_numpy(a)
        clock = Clock("cpu")
        t_np = min(clock(lambda: a @ a, 1) for _ in range(5))
        t_t = min(clock(lambda: ta @ ta, 1) for _ in range(5))
        res["gemm_gflops"] = round(2 * n**3 / min(t_np, t_t) / 1e9, 1)
        res["gemm"] = (f"best of NumPy ({2 * n**3 / t_np / 1e9:.1f} GFLOP/s) and torch "
                       f"({2 * n**3 / t_t / 1e9:.1f} GFLOP/s) {n}x{n}x{n} float32 matmul")
        src = np.ones(64 * 2**20 // 4, dtype=np.float32)
        dst = np.empty_like(src)
        t = min(clock(lambda: np.copyto(dst, src), 1) for _ in range(5))
        res["copy_gbps"] = round(2 * src.nbytes / t / 1e9, 1)
        res["copy"] = "np.copyto of 64 MiB (read + write bytes)"
    return res


def _conv_ops(layer, shape, backend, tdev, rng) -> list[tuple]:
    """(op, hetnet fn, torch fn, hetnet check fn, torch check fn, FLOPs, bytes) for a Conv2D layer."""
    import torch
    import torch.nn.functional as F

    x = rng.standard_normal(shape).astype(np.float32)
    w = (rng.standard_normal(layer.weight.shape) * 0.1).astype(np.float32)
    b = rng.standard_normal(layer.out_channels).astype(np.float32)
    hx, hw, hb = backend.asarray(x), backend.asarray(w), backend.asarray(b)
    tx, tw, tb = (torch.from_numpy(a).to(tdev) for a in (x, w, b))
    st, pad = layer.stride, layer.padding
    y, cache = backend.conv2d_forward(hx, hw, hb, st, pad)
    dy = rng.standard_normal(tuple(y.shape)).astype(np.float32)
    hdy, tdy = backend.asarray(dy), torch.from_numpy(dy).to(tdev)
    hdw, hdb = backend.zeros(w.shape), backend.zeros(b.shape)
    n, k, p, q = y.shape
    flops = 2.0 * n * k * p * q * layer.in_channels * layer.kernel_size ** 2

    def hfwd():
        return backend.conv2d_forward(hx, hw, hb, st, pad)[0]

    def tfwd():
        return F.conv2d(tx, tw, tb, st, pad)

    def hbwd():  # dw, db accumulate: their values matter only in the check below
        return backend.conv2d_backward(hdy, cache, hdw, hdb, need_dx=True)

    def tbwd():
        return torch.ops.aten.convolution_backward(tdy, tx, tw, [layer.out_channels], [st, st], [pad, pad],
                                                   [1, 1], False, [0, 0], 1, [True, True, True])

    def hbwd_check():
        hdw[...] = 0
        hdb[...] = 0
        return [hbwd(), hdw, hdb]

    return [("forward", hfwd, tfwd, lambda: [hfwd()], lambda: [tfwd()], flops, None),
            ("backward (data + filter)", hbwd, tbwd, hbwd_check, lambda: list(tbwd()), 2 * flops, None)]


def _pool_ops(layer, shape, backend, tdev, rng) -> list[tuple]:
    import torch
    import torch.nn.functional as F

    aten = torch.ops.aten
    x = rng.standard_normal(shape).astype(np.float32)
    hx, tx = backend.asarray(x), torch.from_numpy(x).to(tdev)
    kk, st = layer.kernel_size, layer.stride
    y, cache = backend.maxpool2d_forward(hx, kk, st)
    dy = rng.standard_normal(tuple(y.shape)).astype(np.float32)
    hdy, tdy = backend.asarray(dy), torch.from_numpy(dy).to(tdev)
    _, tidx = aten.max_pool2d_with_indices(tx, [kk, kk], [st, st])
    nbytes = 4.0 * (x.size + dy.size)

    def hfwd():
        return backend.maxpool2d_forward(hx, kk, st)[0]

    def tfwd():
        return F.max_pool2d(tx, kk, st)

    def hbwd():
        return backend.maxpool2d_backward(hdy, cache)

    def tbwd():
        return aten.max_pool2d_with_indices_backward(tdy, tx, [kk, kk], [st, st], [0, 0], [1, 1], False, tidx)

    return [("forward", hfwd, tfwd, lambda: [hfwd()], lambda: [tfwd()], None, nbytes),
            ("backward", hbwd, tbwd, lambda: [hbwd()], lambda: [tbwd()], None, nbytes)]


def _dense_ops(layer, shape, backend, tdev, rng) -> list[tuple]:
    import torch
    import torch.nn.functional as F

    x = rng.standard_normal((shape[0], int(np.prod(shape[1:])))).astype(np.float32)
    w = (rng.standard_normal(layer.weight.shape) * 0.05).astype(np.float32)
    b = rng.standard_normal(layer.out_features).astype(np.float32)
    hx, hw, hb = backend.asarray(x), backend.asarray(w), backend.asarray(b)
    tx, tw, tb = (torch.from_numpy(a).to(tdev) for a in (x, w, b))
    y, cache = backend.dense_forward(hx, hw, hb)
    dy = rng.standard_normal(tuple(y.shape)).astype(np.float32)
    hdy, tdy = backend.asarray(dy), torch.from_numpy(dy).to(tdev)
    hdw, hdb = backend.zeros(w.shape), backend.zeros(b.shape)
    flops = 2.0 * x.shape[0] * layer.in_features * layer.out_features

    def hfwd():
        return backend.dense_forward(hx, hw, hb)[0]

    def tfwd():
        return F.linear(tx, tw, tb)

    def hbwd():
        return backend.dense_backward(hdy, cache, hdw, hdb, True)

    def tbwd():  # what autograd runs for nn.Linear: dx = dy w, dw = dy^T x, db = sum_n dy
        return tdy.mm(tw), tdy.t().mm(tx), tdy.sum(0)

    def hbwd_check():
        hdw[...] = 0
        hdb[...] = 0
        return [hbwd(), hdw, hdb]

    return [("forward", hfwd, tfwd, lambda: [hfwd()], lambda: [tfwd()], flops, None),
            ("backward (data + weights)", hbwd, tbwd, hbwd_check, lambda: list(tbwd()), 2 * flops, None)]


def bench_layers(device: str, args) -> dict:
    """Each of thesis-m4's conv, pool and dense layers at batch 32, forward and backward, hetnet vs PyTorch."""
    backend = get_backend(device)
    gpu = device.startswith("cuda")
    tdev = "cuda" if gpu else "cpu"
    if gpu:
        _torch_flags(False)
    tol = RTOL_TF32 if gpu else RTOL_F32
    hclock = Clock("cupy", backend) if gpu else Clock("cpu", backend)
    tclock = Clock("torch") if gpu else Clock("cpu")
    rng = np.random.default_rng(2)
    rows = []
    make = {"Conv2D": _conv_ops, "MaxPool2D": _pool_ops, "Dense": _dense_ops}
    for spec in layer_shapes("thesis-m4", args.layer_batch):
        shape = spec["input"]
        ops = make[spec["type"]](spec["layer"], shape, backend, tdev, rng)
        for op_name, hfn, tfn, hcheck, tcheck, flops, nbytes in ops:
            r = {"layer": spec["name"], "op": op_name, "input_shape": list(shape)}
            try:
                pairs = zip(hcheck(), tcheck(), strict=True)
                err = max(_rel(backend.to_numpy(h), t.detach().cpu().numpy()) for h, t in pairs)
                r["check_max_rel_err"] = float(f"{err:.3g}")
                if not err <= tol:
                    r.update(status="refused", reason=f"outputs disagree: relative error {err:.3g} > {tol:g}")
                    rows.append(r)
                    continue
                for _ in range(2):
                    hfn(), tfn()
                est = max(hclock(hfn, 1), tclock(tfn, 1))
                reps, inner = plan(est, gpu, args.repeats, args.side_seconds / 2)
                med = time_sides({"hetnet": (hfn, hclock), "torch": (tfn, tclock)}, reps, inner)
                r.update(status="ok", hetnet_ms=round(med["hetnet"] * 1e3, 4), torch_ms=round(med["torch"] * 1e3, 4),
                         hetnet_vs_torch=round(med["torch"] / med["hetnet"], 3), repeats=reps)
                if flops:
                    r.update(gflop=round(flops / 1e9, 4), hetnet_gflops=round(flops / med["hetnet"] / 1e9, 1),
                             torch_gflops=round(flops / med["torch"] / 1e9, 1))
                if nbytes:
                    r.update(mbytes=round(nbytes / 1e6, 2), hetnet_gbps=round(nbytes / med["hetnet"] / 1e9, 1),
                             torch_gbps=round(nbytes / med["torch"] / 1e9, 1))
            except Exception as e:
                r.update(status="error", reason=_short(e))
            rows.append(r)
    return {"device": backend.name, "torch_device": tdev, "batch": args.layer_batch, "model": "thesis-m4",
            "check_tolerance": tol, "rows": rows}


def layers_markdown(doc: dict) -> str:
    lines = ["# thesis-m4's layers at batch 32: hetnet kernels vs PyTorch", ""] + _header(doc["environment"])
    lines += [("Each op is checked against PyTorch's before it is timed. Pool GB/s count input + output bytes "
               "(forward: x read, y written; backward: dy read, dx written)."), ""]
    for sec in doc["devices"]:
        lines += [f"## hetnet `{sec['device']}` vs PyTorch {sec['torch_device']}", ""]
        c = sec.get("ceilings", {})
        if c:
            lines += [(f"Measured ceilings: GEMM {c.get('gemm_gflops')} GFLOP/s ({c.get('gemm')}); copy "
                       f"{c.get('copy_gbps')} GB/s ({c.get('copy')})."), ""]
        lines += [("| layer | input | op | hetnet ms | torch ms | torch/hetnet | hetnet GFLOP/s or GB/s | "
                   "torch GFLOP/s or GB/s |"), "|---|---|---|---:|---:|---:|---:|---:|"]
        for r in sec["rows"]:
            shape = "x".join(map(str, r["input_shape"]))
            if r.get("status") != "ok":
                lines.append(f"| {r['layer']} | {shape} | {r['op']} | {r.get('status')}: {r.get('reason')} "
                             "| | | | |")
                continue
            unit = "GFLOP/s" if "hetnet_gflops" in r else "GB/s"
            hv = r.get("hetnet_gflops", r.get("hetnet_gbps"))
            tv = r.get("torch_gflops", r.get("torch_gbps"))
            lines.append(f"| {r['layer']} | {shape} | {r['op']} | {r['hetnet_ms']:.3f} | {r['torch_ms']:.3f} | "
                         f"{r['hetnet_vs_torch']:.2f}x | {hv} {unit} | {tv} {unit} |")
        lines.append("")
    for e in doc.get("errors", []):
        lines.append(f"- {e}")
    return "\n".join(lines) + "\n"


def run_layers(args, devices: list[str], env: dict, out: Path) -> dict:
    doc = {"environment": env, "devices": [], "errors": []}
    for device in devices:
        if device == "reference":
            continue  # the oracle's speed is not the point of this table
        try:
            sec = bench_layers(device, args)
            try:
                sec["ceilings"] = ceilings(device.startswith("cuda"))
            except Exception as e:
                doc["errors"].append(f"ceilings on {device}: {_short(e)}")
            doc["devices"].append(sec)
            print(f"  layers on {device}: done", flush=True)
        except Exception as e:
            doc["errors"].append(f"{device}: {_short(e)}")
    doc["load_average_at_end"] = _load()
    (out / "layers.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "layers.md").write_text(layers_markdown(doc))
    return doc


# --- the thesis's experiment ----------------------------------------------------------------------------------------


def find_cifar_tar(explicit: str | None) -> Path | None:
    cands = [explicit] if explicit else []
    cands += [os.environ.get("HETNET_CIFAR_TAR"), f"../shared/datasets/{CIFAR_TAR}", f"shared/datasets/{CIFAR_TAR}",
              f"/work/shared/datasets/{CIFAR_TAR}"]
    for c in cands:
        if c and Path(c).is_file():
            return Path(c)
    return None


def cifar_subset(tar_path: Path, n: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The first n/10 images of each class in the archive's order (train/<class>/<image>.jpg), resized to size
    (bilinear), as uint8 NHWC and int labels."""
    import io
    import tarfile

    from PIL import Image

    per_class = math.ceil(n / 10)
    found: dict[str, list[bytes]] = {}
    with tarfile.open(tar_path, "r:*") as tf:
        for m in tf:
            if not m.isfile() or not m.name.lower().endswith((".jpg", ".jpeg", ".png")):
                continue
            parts = m.name.split("/")
            if len(parts) < 2:
                continue
            cls = parts[-2]
            lst = found.setdefault(cls, [])
            if len(lst) < per_class:
                lst.append(tf.extractfile(m).read())
            if len(found) >= 10 and all(len(v) >= per_class for v in found.values()):
                break
    classes = sorted(found)
    imgs, labels = [], []
    for i in range(per_class):
        for k, cls in enumerate(classes):
            if i < len(found[cls]) and len(imgs) < n:
                im = Image.open(io.BytesIO(found[cls][i])).convert("RGB")
                if im.size != (size[1], size[0]):
                    im = im.resize((size[1], size[0]), Image.BILINEAR)
                imgs.append(np.asarray(im, dtype=np.uint8))
                labels.append(k)
    return np.stack(imgs), np.array(labels, dtype=np.int64), classes


def thesis_data(model_name: str, n: int, tar: Path | None) -> tuple[np.ndarray, np.ndarray, str]:
    """Float32 NCHW images normalised per channel, labels, and where they came from."""
    shape = zoo.PRESETS[model_name].input_shape
    if tar is not None:
        try:
            imgs, labels, _ = cifar_subset(tar, n, shape[1:])
            x = imgs.astype(np.float32).transpose(0, 3, 1, 2) / 255.0
            mean, std = x.mean(axis=(0, 2, 3), keepdims=True), x.std(axis=(0, 2, 3), keepdims=True) + 1e-6
            return np.ascontiguousarray((x - mean) / std, dtype=np.float32), labels, f"CIFAR-10 JPEG ({tar.name})"
        except Exception as e:
            src = f"random images: reading {tar} failed ({_short(e)})"
    else:
        src = f"random images: {CIFAR_TAR} not found (pass --cifar-tar)"
    rng = np.random.default_rng(3)
    return rng.standard_normal((n,) + tuple(shape)).astype(np.float32), rng.integers(0, 10, n), src


def _epoch_sides(model_name: str, device: str, x: np.ndarray, y: np.ndarray, batch: int):
    """(name, run(n_steps or None) -> seconds, steps) for hetnet on `device` and its PyTorch peers."""
    import torch
    import torch.nn.functional as F

    from . import seed as hn_seed

    lr = zoo.PRESETS[model_name].lr
    backend = get_backend(device)
    gpu = device.startswith("cuda")
    n = x.shape[0]
    bounds = [(i, min(n, i + batch)) for i in range(0, n, batch)]
    hn_seed(0)
    hm, _, _ = zoo.resolve(model_name)
    hm.to(backend).train()
    hx, hy = backend.asarray(x), backend.labels(y)
    st, _ = _make_step(hm, optim.SGD(hm.parameters(), lr=lr))
    hb = [(hx[a:b], hy[a:b]) for a, b in bounds]

    def hetnet_epoch(limit=None):
        backend.synchronize()
        t0 = time.perf_counter()
        for xb, yb in hb[:limit]:
            st.step(xb, yb)
        st.collect()
        backend.synchronize()
        return time.perf_counter() - t0

    sides = [(f"hetnet {backend.name}", hetnet_epoch)]
    tdev = "cuda" if gpu else "cpu"
    tm = interop.to_torch(hm, device=tdev)
    topt = torch.optim.SGD(tm.parameters(), lr=lr)
    tx, ty = torch.from_numpy(x).to(tdev), torch.from_numpy(y).to(tdev)
    tb = [(tx[a:b], ty[a:b]) for a, b in bounds]
    sync = torch.cuda.synchronize if gpu else (lambda: None)

    def torch_epoch(limit=None):
        sync()
        t0 = time.perf_counter()
        for xb, yb in tb[:limit]:
            topt.zero_grad(set_to_none=True)
            F.cross_entropy(tm(xb), yb).backward()
            topt.step()
        sync()
        return time.perf_counter() - t0

    sides.append((f"torch {tdev}" + (" eager" if gpu else ""), torch_epoch))
    if gpu:
        gm = copy.deepcopy(tm)
        gopt = torch.optim.SGD(gm.parameters(), lr=lr)
        graphs = {}
        for xb, yb in tb:  # one graph per batch shape (the last batch may be short)
            if xb.shape[0] not in graphs:
                graphs[xb.shape[0]] = TorchGraphStep(gm, gopt, xb, yb, warmup=2)

        def graph_epoch(limit=None):
            sync()
            t0 = time.perf_counter()
            for xb, yb in tb[:limit]:
                g = graphs[xb.shape[0]]
                g.sx.copy_(xb)
                g.sy.copy_(yb)
                g.step()
            sync()
            return time.perf_counter() - t0

        sides.append(("torch cuda graph", graph_epoch))
    return sides, len(bounds)


def run_thesis_epochs(args, devices: list[str], env: dict, out: Path, deadline: float) -> dict:
    tar = find_cifar_tar(args.cifar_tar)
    rows, errors, sources = [], [], {}
    torch_cpu_done = set()
    for model_name, n in THESIS_EPOCHS:
        if model_name not in args.thesis_models:
            continue
        x, y, src = thesis_data(model_name, n, tar)
        sources[model_name] = src
        for device in devices:
            if time.monotonic() > deadline:
                errors.append(f"{model_name} on {device}: skipped, the run's time budget was spent")
                continue
            try:
                sides, steps = _epoch_sides(model_name, device, x, y, 32)
            except Exception as e:
                errors.append(f"{model_name} on {device}: {_short(e)}")
                continue
            for name, run in sides:
                if name == "torch cpu" and model_name in torch_cpu_done:
                    continue  # the reference and cpu backends share one PyTorch CPU peer
                try:
                    limit = None
                    if name == "hetnet reference" and steps > args.reference_epoch_steps:
                        limit = args.reference_epoch_steps
                    if device.startswith("cuda"):
                        run(None)  # warm-up: the first batch of each shape runs eagerly (and tunes), ...
                        run(None)  # ... the second is captured; then the median of 3 epochs
                        secs = statistics.median(run(None) for _ in range(3))
                    else:
                        run(2)  # warm-up
                        secs = run(limit)
                    per_epoch = secs * steps / limit if limit else secs
                    rows.append({"model": model_name, "images": n, "input_shape": list(x.shape[1:]), "side": name,
                                 "batch_size": 32, "steps": steps, "seconds_per_epoch": round(per_epoch, 4),
                                 "images_per_s": round(n / per_epoch, 1),
                                 "extrapolated_from_steps": limit})
                    if name == "torch cpu":
                        torch_cpu_done.add(model_name)
                    print(f"  {model_name} ({n} images) {name}: {per_epoch:.3f} s/epoch"
                          + (f" (from {limit} steps)" if limit else ""), flush=True)
                except Exception as e:
                    errors.append(f"{model_name} {name}: {_short(e)}")
            gc.collect()
    experiment = ("one training epoch at batch 32, plain SGD at the preset's learning rate, images already in memory "
                  "(on the device); CPU: one epoch after a 2-step warm-up; GPU: median of 3 epochs after 2 warm-up "
                  "epochs")
    doc = {"environment": env, "experiment": experiment,
           "data": sources, "thesis": THESIS_FIGURES, "thesis_note": THESIS_NOTE, "errors": errors, "rows": rows}
    doc["load_average_at_end"] = _load()
    (out / "thesis_epochs.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "thesis_epochs.md").write_text(thesis_markdown(doc))
    return doc


def thesis_markdown(doc: dict) -> str:
    sides = list(dict.fromkeys(r["side"] for r in doc["rows"]))
    lines = ["# The thesis's experiment: seconds per training epoch", ""] + _header(doc["environment"])
    lines += [doc["experiment"] + ". " + doc["thesis_note"], "",
              "| model | images | input | " + " | ".join(sides) + " | thesis sequential | thesis OpenMP 8 thr |",
              "|---|---:|---|" + "---:|" * (len(sides) + 2)]
    for model_name, n in THESIS_EPOCHS:
        rs = {r["side"]: r for r in doc["rows"] if r["model"] == model_name}
        if not rs:
            continue
        shape = "x".join(map(str, next(iter(rs.values()))["input_shape"]))
        cells = []
        for s in sides:
            r = rs.get(s)
            cells.append("—" if r is None else f"{r['seconds_per_epoch']:.3f}"
                         + ("*" if r.get("extrapolated_from_steps") else ""))
        th = doc["thesis"].get(model_name, {})
        lines.append(f"| {model_name} | {n} | {shape} | " + " | ".join(cells) +
                     f" | {_fmt(th.get('sequential_s'))} | {_fmt(th.get('openmp_8_threads_s'))} |")
    lines += ["", "Data: " + "; ".join(f"{k}: {v}" for k, v in doc["data"].items())]
    if any(r.get("extrapolated_from_steps") for r in doc["rows"]):
        lines.append("\n\\* extrapolated from the first steps of the epoch (the float64 reference backend is slow).")
    for e in doc.get("errors", []):
        lines.append(f"- {e}")
    return "\n".join(lines) + "\n"


# --- command line ---------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hetnet bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None, help=f"comma-separated presets (default: {','.join(MODELS)})")
    p.add_argument("--batch-sizes", default=None, help="comma-separated (default: 32,128,1024)")
    p.add_argument("--devices", default=None,
                   help="comma-separated hetnet backends (default: reference,cpu, and cuda when a GPU is usable)")
    p.add_argument("--out", default=None,
                   help="folder for the results (default: benchmarks/results/<GPU card or host name>)")
    p.add_argument("--repeats", type=int, default=None, help="most timed repetitions per side (default 30; quick 8)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per side before timing (default 3)")
    p.add_argument("--side-seconds", type=float, default=None,
                   help="about how long each side of a row is timed (default 4 on CPU, 1 on GPU; quick 1)")
    p.add_argument("--quick", action="store_true",
                   help=f"models {','.join(QUICK_MODELS)}, batches 32,128, few repetitions")
    p.add_argument("--layers", action="store_true", help="also the per-layer table (layers.json / .md)")
    p.add_argument("--layer-batch", type=int, default=32, help=argparse.SUPPRESS)
    p.add_argument("--thesis-epochs", action="store_true", help="also the thesis's epoch timings (thesis_epochs.*)")
    p.add_argument("--thesis-models", default=",".join(m for m, _ in THESIS_EPOCHS), help=argparse.SUPPRESS)
    p.add_argument("--cifar-tar", default=None, help=f"path of {CIFAR_TAR} for --thesis-epochs")
    p.add_argument("--reference-epoch-steps", type=int, default=8, help=argparse.SUPPRESS)
    p.add_argument("--tf32-row", action="store_true", help=f"also one TF32 row on the GPU ({TF32_ROW[0]}, batch "
                                                           f"{TF32_ROW[1]})")
    p.add_argument("--all", action="store_true", help="--layers --thesis-epochs --tf32-row")
    p.add_argument("--no-train-step", action="store_true", help="skip the train-step table")
    p.add_argument("--reference-rows", default=",".join(REFERENCE_ROWS),
                   help="MODEL:BATCH pairs at which the slow float64 reference backend is timed")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for PyTorch and hetnet's cpu backend (default: the CPUs this process may use)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds after which remaining rows are skipped (default: 330 with cuda, none otherwise)")
    return p


def _positive_ints(text: str, flag: str) -> list[int]:
    out = []
    for t in _parse_list(text, flag):
        try:
            v = int(t)
        except ValueError:
            raise UsageError(f"{flag}: expected positive integers, got {t!r}") from None
        if v < 1:
            raise UsageError(f"{flag}: expected positive integers, got {v}")
        out.append(v)
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.all:
        args.layers = args.thesis_epochs = args.tf32_row = True
    args.models = (_parse_list(args.models, "--models") if args.models
                   else list(QUICK_MODELS if args.quick else MODELS))
    for m in args.models:
        if m not in zoo.PRESETS:
            raise UsageError(f"--models: unknown model {m!r} (presets: {', '.join(zoo.PRESETS)})")
    args.thesis_models = _parse_list(args.thesis_models, "--thesis-models")
    args.batch_sizes = (_positive_ints(args.batch_sizes, "--batch-sizes") if args.batch_sizes
                        else list(QUICK_BATCHES if args.quick else BATCHES))
    if args.devices:
        args.devices = _parse_list(args.devices, "--devices")
        for d in args.devices:
            try:
                from .device import parse_device

                parse_device(d)
            except DeviceError as e:
                raise UsageError(f"--devices: {e}") from None
    else:
        args.devices = ["reference", "cpu"] + (["cuda"] if cuda_available() else [])
    gpu = any(d.startswith("cuda") for d in args.devices)
    if args.repeats is None:
        args.repeats = 8 if args.quick else 30
    if args.repeats < 1:
        raise UsageError(f"--repeats: expected a positive integer, got {args.repeats}")
    if args.side_seconds is None:
        args.side_seconds = 1.0 if (args.quick or gpu) else 4.0
    if args.time_budget is None:
        args.time_budget = 330.0 if gpu else 0.0
    args.reference_rows = _parse_list(args.reference_rows, "--reference-rows") if args.reference_rows else []
    return args


def main(argv: list[str] | None = None) -> int:
    """`hetnet bench ARGS`; returns the exit status (0 when every section ran, even with refused rows)."""
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        import torch
    except ImportError:
        raise UsageError("hetnet bench: PyTorch is the peer every number is measured against and is not installed "
                         "(pip install 'hetnet[bench]')") from None
    threads = args.threads or cpu_count()
    torch.set_num_threads(threads)
    hetnet_threads = None
    try:  # the cpu backend's own pool (hetnet.backends._cpu_threads), when it has one
        from .backends import _cpu_threads

        if args.threads:
            _cpu_threads.set_threads(threads)
        hetnet_threads = _cpu_threads.threads()
    except (ImportError, AttributeError):
        pass
    _glibc_return_big_blocks()
    gpu = any(d.startswith("cuda") for d in args.devices)
    env = environment(threads, gpu)
    env["hetnet_cpu_threads"] = hetnet_threads
    out = Path(args.out) if args.out else Path("benchmarks") / "results" / _slug(env.get("card") or env["host"])
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out: cannot create {out}: {e.strerror}") from None
    deadline = time.monotonic() + args.time_budget if args.time_budget > 0 else math.inf
    print(f"hetnet bench: {env.get('card') or env['host']} ({env['cpu']}, {threads} threads), devices "
          f"{','.join(args.devices)} -> {out}", flush=True)
    if not args.no_train_step:
        print("train step:", flush=True)
        run_train_step(args, args.devices, env, out, deadline)
    if args.layers:
        print(f"layers (thesis-m4, batch {args.layer_batch}):", flush=True)
        run_layers(args, args.devices, env, out)
    if args.thesis_epochs:
        print("thesis epochs:", flush=True)
        run_thesis_epochs(args, args.devices, env, out, deadline)
    print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
