"""The gradient all-reduce of a data-parallel training step, in buckets that start while the backward goes on.

A Sequential's gradients are one flat buffer (layers.base.FlatPack): its parameters in model order, each a
contiguous range. The plan's backward runs the nodes last to first, so the buffer fills from its end. The buffer is
cut, from the end, into buckets of about `bucket_bytes` on parameter boundaries; bucket k is complete once the
backward has run the lowest node that owns one of its parameters (`ready[k]`), and hetnet.plan calls `after_node(i)`
after node i, where every bucket that is complete then starts its all-reduce (NCCL: on the communication stream,
overlapping the rest of the backward; MPI: a non-blocking Iallreduce). `finish()` starts the buckets no hook started
(the parameters before the first trainable node, which a backward without d(input) never reaches), waits for all of
them and leaves the mean over the ranks in the buffer, before the optimiser's update.

    >>> reducer = GradReducer(comm, model)                       # doctest: +SKIP
    >>> step = TrainStep(model, optimizer, reducer=reducer)      # doctest: +SKIP

Every rank starts the same buckets in the same order (the same model, the same hooks), as NCCL requires.
Gradients are float32 in the buffer; where the step computes in bf16 (`--precision bf16`, the cuda backend's
tensor-core products) they travel as bfloat16 (bf16=True: half the bytes; each bucket rounded to bfloat16, reduced
by NCCL as ncclBfloat16, widened back, all on the communication stream), as PyTorch DDP's bf16_compress_hook.
"""
from __future__ import annotations

import os

import numpy as np

from ..errors import UsageError

BUCKET_MB = 4.0     # default bucket size (HETNET_BUCKET_MB overrides)


def bucket_bounds(sizes: list[int], cap: int) -> list[tuple[int, int, int, int]]:
    """Buckets over a flat buffer of parameters with `sizes` elements (in buffer order), cut from the end on
    parameter boundaries once a bucket holds at least `cap` elements: (lo, hi, first parameter, last parameter + 1)
    per bucket, the end of the buffer first.

        >>> bucket_bounds([4, 4, 4], 6)
        [(4, 12, 1, 3), (0, 4, 0, 1)]
    """
    out, hi, last = [], sum(sizes), len(sizes)
    lo, first = hi, last
    for i in range(len(sizes) - 1, -1, -1):
        lo, first = lo - sizes[i], i
        if hi - lo >= cap or i == 0:
            out.append((lo, hi, first, last))
            hi, last = lo, first
    return out


class GradReducer:
    """Averages a model's flat gradient buffer over the ranks of `comm` (hetnet.parallel.comm), bucket by bucket;
    see the module docstring. on_step: called by step_started() (the watchdog's progress count)."""

    def __init__(self, comm, model, bucket_bytes: int | None = None, bf16: bool = False, on_step=None):
        pack = getattr(model, "_pack", None)
        if pack is None or pack.params != model.parameters():
            raise UsageError("data-parallel training needs a Sequential whose parameters are one flat buffer "
                             "(call model.to(device) first)")
        if bucket_bytes is None:
            bucket_bytes = int(float(os.environ.get("HETNET_BUCKET_MB", BUCKET_MB)) * 2**20)
        self.comm, self.grad, self.bf16, self.on_step = comm, pack.grad, bool(bf16), on_step
        self.params = pack.params
        sizes = [int(np.prod(p.shape)) for p in self.params]
        cap = max(1, bucket_bytes // self.grad.itemsize)
        self.bounds = bucket_bounds(sizes, cap) if sizes else []
        self.views = [self.grad[lo:hi] for lo, hi, _, _ in self.bounds]        # made once, outside any capture
        comm.prepare(max((hi - lo for lo, hi, _, _ in self.bounds), default=0), self.bf16)
        self.scale = None if comm.average_op or comm.size == 1 else 1.0 / comm.size
        self._ready: dict = {}          # id(node list) -> (node list, ready node index per bucket)
        self._now: list = []
        self._next = 0
        self._handles: list = []

    def ready_nodes(self, nodes) -> list[int]:
        """Per bucket: the node after whose backward it is complete (-1: none of the nodes; finish() starts it)."""
        entry = self._ready.get(id(nodes))
        if entry is None:
            owner = {}                  # id(parameter) -> the lowest node index that uses it
            for i, node in enumerate(nodes):
                for p in node.params.values():
                    owner.setdefault(id(p), i)
            ready, low = [], len(nodes)
            for _, _, first, last in self.bounds:
                low = min([low] + [owner.get(id(self.params[j]), -1) for j in range(first, last)])
                ready.append(low)       # non-increasing: a bucket waits for every node the ones after it wait for
            entry = self._ready[id(nodes)] = (nodes, ready)
        return entry[1]

    def step_started(self) -> None:
        """A training step begins (called outside any captured graph)."""
        if self.on_step is not None:
            self.on_step()

    def begin(self, nodes) -> None:
        """Before the backward through `nodes`."""
        self._now, self._next, self._handles = self.ready_nodes(nodes), 0, []

    def _start(self, k: int) -> None:
        self._handles.append(self.comm.start_allreduce(self.views[k], self.bf16))

    def after_node(self, i: int) -> None:
        """After node i's backward: start the buckets complete now (when the transport may overlap them with the
        rest of the backward; else finish() starts them all)."""
        while self.comm.overlap and self._next < len(self._now) and self._now[self._next] >= i:
            self._start(self._next)
            self._next += 1

    def finish(self) -> None:
        """Start the remaining buckets, wait for all of them; the buffer then holds the mean over the ranks."""
        while self._next < len(self._now):
            self._start(self._next)
            self._next += 1
        self.comm.wait(self._handles)
        self._handles = []
        if self.scale is not None:
            self.grad *= self.grad.dtype.type(self.scale)
