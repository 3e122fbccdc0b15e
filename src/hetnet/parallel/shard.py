"""Per-rank shards of one seeded batch plan: N ranks at batch B see exactly the batches of one process at N*B.

Every rank draws the same epoch plan (hetnet.data.BatchLoader.plan: the permutation and the augmentation offsets
come from (seed, epoch) only) for the *global* batch N*B, and rank r takes rows r*B .. (r+1)*B of each global batch
(the batch's examples sorted by index, as the single-process loader serves them). The union of the ranks' batches
is then the single-process batch, and the averaged gradient is its gradient.

Training batches must be the same size on every rank (each step all-reduces). A last, partial global batch of n
examples is cut to n - n % N (those few examples sit out this epoch: the order changes every epoch) and dropped when
that leaves fewer than two per rank (BatchNorm needs two values to normalise; one process drops a last batch of
one). Evaluation shards may differ by one example (their sums are added up).

    >>> shard_rows(10, 1, 4)            # rank 1 of 4 in a batch of 10 examples
    (2, 5)
    >>> train_batch_sizes(1000, 128, 4)[-1]     # 1000 = 7 * 128 + 104: the last global batch keeps 104
    104
"""
from __future__ import annotations

import numpy as np

from ..data.loader import BatchLoader, ResidentLoader
from ..data.transforms import normalize_coefficients
from ..device import get_backend


def shard_rows(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [lo, hi) of a batch of n examples that rank takes: contiguous, in rank order, sizes n // world or one
    more (rank * n // world .. (rank + 1) * n // world)."""
    return rank * n // world, (rank + 1) * n // world


def train_batch_sizes(num_examples: int, batch: int, world: int) -> list[int]:
    """Global sizes of an epoch's training batches: full batches of `batch` (a multiple of world), then the rest cut
    to a multiple of world, kept when that gives each rank at least two examples."""
    full, rest = divmod(int(num_examples), int(batch))
    rest -= rest % world
    return [batch] * full + ([rest] if rest >= 2 * world else [])


class ShardedLoader:
    """This rank's part of every batch of a BatchLoader or ResidentLoader built for the global batch.

    train=True: equal shards, batches cut as train_batch_sizes says; train=False (evaluation): every example once,
    shards may differ by one and a rank may get none of a tiny last batch (it skips that batch). `whole` is the
    loader being sharded (rank 0 draws the confusion matrix from it)."""

    def __init__(self, loader, rank: int, world: int, train: bool):
        if not isinstance(loader, (BatchLoader, ResidentLoader)):
            raise TypeError(f"ShardedLoader: expected a BatchLoader or ResidentLoader, got {type(loader).__name__}")
        self.whole, self.rank, self.world, self.train = loader, int(rank), int(world), bool(train)
        self.host = loader.host if isinstance(loader, ResidentLoader) else loader
        self.on_device = isinstance(loader, ResidentLoader)
        if self.train and self.host.batch_size % self.world:
            raise ValueError(f"a global batch of {self.host.batch_size} does not split evenly over {self.world} ranks")
        self._fixed_plan = None                 # evaluation order: the same plan every epoch
        self._fixed_device_plan = None          # ... and its copy on the device
        self._coefficients = normalize_coefficients(self.host.mean, self.host.std, self.host.x.shape[1])

    @property
    def batch_size(self) -> int:
        """This rank's full batch (the global batch / world for training)."""
        return self.host.batch_size // self.world

    def sizes(self) -> list[int]:
        """Global batch sizes of an epoch."""
        if self.train:
            return train_batch_sizes(self.host.num_examples, self.host.batch_size, self.world)
        n, b = self.host.num_examples, self.host.batch_size
        return [min(b, n - lo) for lo in range(0, n, b)]

    def skipped(self) -> int:
        """Training examples per epoch that the cut of the last batch leaves out."""
        return self.host.num_examples - sum(self.sizes())

    def __len__(self) -> int:
        return len(self.sizes())

    def _plan(self, epoch: int) -> np.ndarray | None:
        """The epoch's plan (host int32), or None when the augmentation does not fit one."""
        if not self.host.plannable:
            return None
        if self.host.shuffle or self.host.augment:
            return self.host.plan(epoch)
        if self._fixed_plan is None:
            self._fixed_plan = self.host.plan(0)
        return self._fixed_plan

    def epoch(self, epoch: int):
        """(xb, yb) of this rank for each batch of `epoch` (device arrays for a ResidentLoader, else host arrays as
        BatchLoader serves them)."""
        plan = self._plan(epoch)
        if self.on_device:
            ld = self.whole
            if plan is not self._fixed_plan:
                dplan = ld.backend.upload(plan)
            else:
                if self._fixed_device_plan is None:
                    self._fixed_device_plan = ld.backend.upload(plan)
                dplan = self._fixed_device_plan
        start = 0
        order = None
        for b, n in enumerate(self.sizes()):
            lo, hi = shard_rows(n, self.rank, self.world)
            if hi > lo:
                if self.on_device:
                    yield ld.backend.gather_images(ld.images, ld.labels, dplan, start + lo, hi - lo, ld.scale,
                                                   ld.shift, reflect=self.host.reflect)
                elif plan is not None:
                    yield get_backend("cpu").gather_images(self.host.x, self.host.y, plan, start + lo, hi - lo, *self._coefficients,
                                            reflect=self.host.reflect)
                else:       # several crops or flips: the whole global batch as BatchLoader makes it, then our rows
                    order = self.host.order(epoch) if order is None else order
                    xb, yb = self.host.batch(epoch, b, order)
                    yield xb[lo:hi], yb[lo:hi]
            start += self.host.batch_size
