"""Replayed steps: hetnet.plan's training and evaluation steps captured once per batch shape as a CUDA graph.

`CudaBackend.step_runner(n_scalars, n_seeds)` returns a `GraphRunner`; hetnet.plan's TrainStep / EvalStep hand it
their step function (forward, loss, backward, update: only device work, no host synchronisation).

- The first batch of each shape runs eagerly (this also measures the convolution algorithms, conv._choose), then the
  same function is captured into a CUDA graph and replayed for every later batch of that shape: the batch is copied
  into the graph's static input buffers, and one launch runs the whole step.
- Values that change from step to step -- the optimiser's learning rate, first-step flag and bias corrections, the
  dropout seeds -- live in a small device array (`scalars`, `seeds`) that the kernels read; `set_scalars` fills it
  from a ring of pinned host slots before each replay, so the schedule and hetnet's random generator behave as in
  eager mode.
- Memory: the eager steps and the graphs run in the backend's private step pool (`CudaBackend.step_pool`), which
  every runner of the device shares, so it grows to the largest working set among them, not to their sum.
  im2col's column buffers may fill the room under the eager step's high-water mark while a graph is captured
  (conv._chunks).

HETNET_CUDA_GRAPH=0 (use_graph=False) runs the same function eagerly on the same stream.
"""
from __future__ import annotations

import re

import numpy as np

from ...errors import DeviceError

RING = 64             # pinned host slots for the per-step values


class GraphRunner:
    """run(fn, x, y) / set_scalars / seed / read_and_reset, as hetnet.plan's steps expect (see EagerRunner)."""

    def __init__(self, be, n_scalars: int, n_seeds: int, use_graph: bool = True):
        import cupyx

        cp = be.cupy
        self.be, self.cp, self.use_graph = be, cp, bool(use_graph)
        self.stream = be.compute_stream()    # shared with the batch kernels of hetnet.data.ResidentLoader
        self.n_scalars = int(n_scalars)
        with be.device:
            buf = cp.zeros((self.n_scalars + max(1, n_seeds),), dtype=cp.float32)
        self.buf = buf
        self.scalars = buf[:self.n_scalars]
        self.seeds = buf[self.n_scalars:].view(cp.uint32)
        self.slots = cupyx.empty_pinned((RING, buf.size), dtype=np.float32)
        self.events = [cp.cuda.Event(disable_timing=True) for _ in range(RING)]
        self.recorded = [False] * RING
        self.slot = 0
        self.graphs: dict = {}              # (x shape) -> (graph, static x, static y)
        self.seen: set = set()
        self.eager_high: dict = {}          # (x shape) -> the pool's bytes in use at most in the eager step
        # the backend's private step pool (see CudaBackend.step_pool); never released while this runner lives
        # (its graphs keep using the addresses they were captured with)
        self.pool = be.step_pool()

    def seed(self, slot: int):
        """Dropout node `slot`'s seed: a device array of one uint32, filled before each step."""
        return self.seeds[slot:slot + 1]

    def set_scalars(self, values, seeds) -> None:
        """This step's values into the device array, through the next pinned slot (asynchronously)."""
        if not len(values) and not len(seeds):
            return
        vals = self.slots[self.slot]
        ev = self.events[self.slot]
        if self.recorded[self.slot]:
            ev.synchronize()          # the copy that last read this pinned slot has run
        vals[:self.n_scalars] = values
        vals[self.n_scalars:self.n_scalars + len(seeds)].view(np.uint32)[:] = seeds
        self.cp.cuda.runtime.memcpyAsync(self.buf.data.ptr, vals.ctypes.data, vals.nbytes,
                                         self.cp.cuda.runtime.memcpyHostToDevice, self.stream.ptr)
        ev.record(self.stream)
        self.recorded[self.slot] = True
        self.slot = (self.slot + 1) % RING

    def run(self, fn, xb, yb) -> None:
        """fn(x, y) on the compute stream: eagerly for the first batch of a shape, then captured and replayed."""
        cp, be = self.cp, self.be
        try:
            with be.device, self.stream:
                if xb.dtype != cp.float32 or not xb.flags.c_contiguous:
                    xb = cp.ascontiguousarray(xb, dtype=cp.float32)
                yb = be._labels32(yb)
                key = tuple(xb.shape)
                if not self.use_graph:
                    fn(xb, yb)
                elif key not in self.seen:
                    # eager: its high-water mark in the pool bounds the captured graph's workspaces (see _capture)
                    pool, high = self.pool, [self.pool.used_bytes()]

                    def malloc(size):
                        mem = pool.malloc(size)
                        high[0] = max(high[0], pool.used_bytes())
                        return mem

                    with cp.cuda.using_allocator(malloc):
                        fn(xb, yb)
                    self.seen.add(key)
                    self.eager_high[key] = high[0]
                else:
                    g = self.graphs.get(key)
                    if g is None:
                        g = self.graphs[key] = self._capture(fn, xb, yb, self.eager_high.get(key, 0))
                    graph, sx, sy = g
                    sx.data.copy_from_device_async(xb.data, xb.nbytes, self.stream)
                    sy.data.copy_from_device_async(yb.data, yb.nbytes, self.stream)
                    graph.launch(self.stream)
        except cp.cuda.memory.OutOfMemoryError as e:
            raise _oom_error(be, int(xb.shape[0]), e) from None

    def reset(self) -> None:
        """Drop the captured graphs (the step's launches changed: a parameter was frozen or unfrozen, an optimiser
        hyperparameter outside the scalars changed): the next batch of each shape runs eagerly, then is captured
        again. Waits for queued work first, so no graph is released while it may still run."""
        with self.be.device:
            self.stream.synchronize()
        self.graphs.clear()
        self.seen.clear()
        self.eager_high.clear()

    def _capture(self, fn, xb, yb, high: int):
        """Record fn into a CUDA graph. If a cuBLAS GEMM cannot be recorded, record again with our own kernels only
        (the fastest measured implicit-GEMM variant for each such layer). im2col's column buffers may fill the room
        under `high`, the eager step's high-water mark (conv._chunks)."""
        cp, be = self.cp, self.be
        sx, sy = cp.empty_like(xb), cp.empty_like(yb)
        pool = self.pool
        for attempt in range(2):
            be.prepare_capture(self.stream)
            be.capturing = self.stream
            be.workspace_headroom = lambda: max(0, high - pool.used_bytes())
            graph, error = None, None
            try:
                with cp.cuda.using_allocator(self.pool.malloc):
                    self.stream.begin_capture()
                    try:
                        fn(sx, sy)
                    finally:
                        graph = self.stream.end_capture()
            except (RuntimeError, OSError, NotImplementedError, cp.cuda.runtime.CUDARuntimeError) as e:
                error = e
            finally:
                be.capturing = None
                del be.workspace_headroom       # back to the class default (no headroom)
            if error is None:
                break
            if attempt == 1 or not be.graph_cublas:
                raise error
            be.graph_cublas = False
            be.capture_error = f"{type(error).__name__}: {error}"
        return graph, sx, sy

    def read(self, *arrays) -> list:
        """Host copies of device arrays after the queued steps."""
        with self.be.device:
            self.stream.synchronize()
            return [a.get() for a in arrays]

    def read_and_reset(self, *arrays) -> list:
        """Host copies of device accumulators after the queued steps, which are then zeroed."""
        with self.be.device:
            self.stream.synchronize()
            out = [a.get() for a in arrays]
            with self.stream:
                for a in arrays:
                    a.fill(0)
            self.stream.synchronize()
        return out


def _oom_error(be, batch: int, e) -> DeviceError:
    m = re.search(r"allocating ([\d,]+) bytes", str(e))
    need = f"{int(m.group(1).replace(',', '')) / 2**20:.1f} MiB more" if m else "more memory"
    try:
        free, total = be.cupy.cuda.runtime.memGetInfo()
        have = f" ({free / 2**20:.0f} MiB free of {total / 2**20:.0f} MiB)"
    except be.cupy.cuda.runtime.CUDARuntimeError:
        have = ""
    return DeviceError(f"out of GPU memory on {be.name} at batch size {batch}: needed {need}{have}; "
                       f"try a smaller --batch-size")
