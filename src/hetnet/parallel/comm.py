"""The transports of a data-parallel job: MPI (mpi4py) between CPU processes, NCCL (CuPy's cupy.cuda.nccl) between
GPUs. Both offer what hetnet.parallel needs, on the backend's arrays:

    start_allreduce(buf) -> handle      sum (MPI) or average (NCCL, `average_op`) buf over the ranks in place,
                                        asynchronously (a gradient bucket)
    wait(handles)                       until those sums are in place (GPU: the current stream waits for them)
    allreduce(buf)                      sum in place now, in stream order (BatchNorm statistics)
    broadcast(buf)                      rank 0's values everywhere
    host_sum(values) -> np.ndarray      float64 numbers summed over the ranks (metrics), on the host
    barrier()

Host-side waits are reported to the watchdog (`progress.waiting()`, hetnet.parallel.watchdog), so that a rank
stuck elsewhere is noticed.

NCCL and CUDA graphs. A training step on the GPU is captured once per batch shape and replayed
(backends/cuda/graph.py); the gradient buckets' all-reduces are part of it. What this relies on:
1. NCCL >= 2.9.6 records collectives into a stream capture (CuPy passes the stream through to ncclAllReduce).
2. The communication stream joins the capture through an event recorded on the capturing stream (the step's
   stream) and leaves it through an event the step's stream waits for before the optimiser's update: the standard
   fork / join of a capture. The events are made once, before any capture; recording and waiting on them are legal
   while capturing.
3. Each communicator has run collectives eagerly before its first capture (the parameter broadcast at start, and
   GraphRunner runs every batch shape once eagerly before capturing it), so NCCL's lazy connection setup never
   happens inside a capture.
4. Every rank issues the same collectives in the same order, replayed or not (the same model, buckets and sync-BN
   calls each step); mixing graph-launched and eagerly launched collectives on one communicator is allowed
   (NCCL_GRAPH_MIXING_SUPPORT, on by default).
"""
from __future__ import annotations

import json

import numpy as np

# ncclDataType_t values (nccl.h), for the dtypes gradients and statistics travel in
_NCCL_TYPES = {"float16": 6, "float32": 7, "float64": 8, "bfloat16": 9}
_NCCL_SUM, _NCCL_AVG = 0, 4

# float32 <-> bfloat16 (held as uint16: CuPy has no bfloat16 dtype): the top 16 bits, rounded to nearest even
# (NaNs stay NaNs); back: those bits with 16 zero bits below.
_TO_BF16 = ("float32 x", "uint16 y", """
    const unsigned int u = __float_as_uint(x);
    y = (u & 0x7fffffffu) > 0x7f800000u ? (unsigned short)((u >> 16) | 0x40u)
                                        : (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);""",
            "hetnet_to_bf16")
_FROM_BF16 = ("uint16 y", "float32 x", "x = __uint_as_float(((unsigned int)y) << 16);", "hetnet_from_bf16")


class MPIComm:
    """Collectives over MPI.COMM_WORLD on NumPy arrays (the cpu and reference backends)."""

    # buckets may start while the backward is still running (host arrays: each node's backward has finished when
    # its hook runs)
    overlap = True
    average_op = False          # start_allreduce sums; the gradient reducer divides by the world size

    def __init__(self, progress):
        from mpi4py import MPI

        self.MPI, self.comm, self.progress = MPI, MPI.COMM_WORLD, progress
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()

    def prepare(self, largest: int, bf16: bool) -> None:
        """Before the first start_allreduce (the CPU backends compute and reduce in float32)."""

    def start_allreduce(self, buf, bf16: bool = False):
        return self.comm.Iallreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)

    def wait(self, handles: list) -> None:
        with self.progress.waiting():
            self.MPI.Request.Waitall(handles)

    def allreduce(self, buf) -> None:
        with self.progress.waiting():
            self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)

    def broadcast(self, buf) -> None:
        with self.progress.waiting():
            self.comm.Bcast(buf, root=0)

    def host_sum(self, values) -> np.ndarray:
        out = np.array(values, dtype=np.float64)
        self.allreduce(out)
        return out

    def barrier(self) -> None:
        with self.progress.waiting():
            self.comm.Barrier()

    def close(self) -> None:
        pass


def mpi_bcast_json(comm, value):
    """rank 0's JSON-able value on every rank of an mpi4py communicator (as bytes, no pickle)."""
    data = np.frombuffer(json.dumps(value).encode(), dtype=np.uint8) if comm.Get_rank() == 0 else None
    n = np.array([0 if data is None else data.size], dtype=np.int64)
    comm.Bcast(n, root=0)
    buf = data.copy() if data is not None else np.empty(int(n[0]), dtype=np.uint8)
    comm.Bcast(buf, root=0)
    return json.loads(buf.tobytes().decode())


def nccl_unique_id() -> list:
    """A new NCCL unique id as a JSON-able list (rank 0 makes it; the others rebuild it with nccl_id_from)."""
    from cupy.cuda import nccl

    uid = nccl.get_unique_id()
    return ["bytes" if isinstance(uid, bytes) else "tuple", [int(v) for v in uid]]


def nccl_id_from(value: list):
    kind, values = value
    return bytes(v & 0xFF for v in values) if kind == "bytes" else tuple(values)


class NcclComm:
    """Collectives over one NCCL communicator, one GPU per process (the cuda backend), with a communication stream
    for the gradient buckets (see the module docstring for what graph capture relies on)."""
    # Buckets start after the whole backward, on the communication stream: the overlapping version (a bucket's
    # all-reduce beside the rest of the backward, in the captured graph) gave wrong gradients in its world-of-one GPU
    # test (tests/test_parallel_gpu.py, H200, 2 Dec) and awaits a fix; this order is right by construction.
    overlap = False

    def __init__(self, backend, rank: int, size: int, uid, progress):
        import cupy
        from cupy.cuda import nccl

        self.cp, self.be, self.progress = cupy, backend, progress
        self.rank, self.size = int(rank), int(size)
        # ncclAvg came with NCCL 2.10; before it, start_allreduce sums and the gradient reducer divides
        self.average_op = nccl.get_version() >= 21000
        with backend.device:
            self.comm = nccl.NcclCommunicator(self.size, nccl_id_from(uid), self.rank)
            self.stream = cupy.cuda.Stream(non_blocking=True)        # the buckets' all-reduces
            # made here, never inside a capture; a wait binds to the record before it, so one of each will do
            self.ready = cupy.cuda.Event(disable_timing=True)
            self.done = cupy.cuda.Event(disable_timing=True)
        self.wire = None            # bfloat16 copy of the bucket on its way (see prepare)

    @staticmethod
    def _type(buf, bf16: bool = False) -> int:
        """NCCL's type for buf; bf16: a uint16 array holding bfloat16 values (CuPy has no bfloat16 dtype)."""
        name = "bfloat16" if bf16 and buf.dtype.name == "uint16" else buf.dtype.name
        if name not in _NCCL_TYPES:
            raise TypeError(f"NCCL all-reduce of {buf.dtype} arrays is not supported")
        return _NCCL_TYPES[name]

    def prepare(self, largest: int, bf16: bool) -> None:
        """Before the first start_allreduce, outside any capture: with bf16, the buffer of the buckets' bfloat16
        copies (`largest` elements; the buckets pass through it one after the other, in the stream's order) and
        the two conversion kernels."""
        if bf16 and (self.wire is None or self.wire.size < largest):
            with self.be.device, self.be.persistent():
                self.wire = self.cp.empty((largest,), dtype=self.cp.uint16)
            self._to_bf16 = self.cp.ElementwiseKernel(*_TO_BF16)
            self._from_bf16 = self.cp.ElementwiseKernel(*_FROM_BF16)

    def start_allreduce(self, buf, bf16: bool = False):
        """Average buf over the ranks (sum it when not average_op) on the communication stream, after the work
        queued so far on the current stream (the backward that wrote it). bf16 (a float32 buf of a bf16 step): it
        travels as bfloat16, half the bytes: rounded into the wire buffer, reduced there, widened back into buf."""
        self.ready.record(self.cp.cuda.get_current_stream())
        self.stream.wait_event(self.ready)
        op = _NCCL_AVG if self.average_op else _NCCL_SUM
        if not bf16:
            self.comm.allReduce(buf.data.ptr, buf.data.ptr, buf.size, self._type(buf), op, self.stream.ptr)
            return
        wire = self.wire[:buf.size]
        with self.stream:
            self._to_bf16(buf, wire)
            self.comm.allReduce(wire.data.ptr, wire.data.ptr, wire.size, self._type(wire, True), op,
                                self.stream.ptr)
            self._from_bf16(wire, buf)

    def wait(self, handles: list) -> None:
        """The current stream waits for every all-reduce started so far (the join of the capture's fork)."""
        self.done.record(self.stream)
        self.cp.cuda.get_current_stream().wait_event(self.done)

    def allreduce(self, buf) -> None:
        """Sum in place on the current stream (in a captured step: part of the graph)."""
        self.comm.allReduce(buf.data.ptr, buf.data.ptr, buf.size, self._type(buf), _NCCL_SUM,
                            self.cp.cuda.get_current_stream().ptr)

    def broadcast(self, buf) -> None:
        with self.be.device:
            cs = self.cp.cuda.get_current_stream()
            self.comm.broadcast(buf.data.ptr, buf.data.ptr, buf.size, self._type(buf), 0, cs.ptr)
            with self.progress.waiting():
                cs.synchronize()

    def host_sum(self, values) -> np.ndarray:
        with self.be.device:
            d = self.cp.asarray(np.array(values, dtype=np.float64))
            self.allreduce(d)
            with self.progress.waiting():
                return self.cp.asnumpy(d)

    def barrier(self) -> None:
        self.host_sum([0.0])

    def close(self) -> None:
        self.comm.destroy()
