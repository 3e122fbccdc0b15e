"""Mini-batches from uint8 images kept in memory, assembled by a background thread.

A worker thread indexes, augments, converts to float32 and normalises the next few batches while the model computes
on the current one (NumPy releases the GIL for the copies and arithmetic). Everything random about an epoch, its
order and its augmentation, comes from generators seeded by (seed, epoch[, batch]), so epoch e is the same whether
it runs after epoch e-1 or first thing after a resume.

    >>> loader = BatchLoader(train_x, train_y, 32, mean, std, augment=("crop", "flip"), seed=0)
    >>> for xb, yb in loader.epoch(3):      # xb float32 (B, C, H, W) C-contiguous, yb int64 (B,)
    ...     ...
    >>> len(loader)                          # batches per epoch
"""
from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterator

import numpy as np

from .transforms import apply_augment, normalize, parse_augment

_DONE = object()


class BatchLoader:
    """Batches (xb float32 normalised, yb int64) over uint8 images x (N, C, H, W) and labels y (N,).

    mean/std: per-channel statistics in [0, 1] units (None: scale to [0, 1] only). augment: names from
    transforms.AUGMENTATIONS ("crop" / "crop:P" pads P pixels, default 4; "flip"), applied to training batches.
    prefetch: how many finished batches may wait in the queue; 0 assembles batches in the caller's thread.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, mean=None, std=None, shuffle: bool = True,
                 augment=(), seed: int = 0, drop_last: bool = False, prefetch: int = 3):
        if x.ndim != 4 or x.dtype != np.uint8:
            raise ValueError(f"BatchLoader: x must be uint8 (N, C, H, W), got {x.dtype} {x.shape}")
        if len(x) != len(y):
            raise ValueError(f"BatchLoader: {len(x)} images but {len(y)} labels")
        if int(batch_size) <= 0:
            raise ValueError(f"BatchLoader: batch_size must be positive, got {batch_size}")
        self.x, self.y = x, np.asarray(y, dtype=np.int64)
        self.batch_size = int(batch_size)
        self.mean = None if mean is None else np.asarray(mean, dtype=np.float32)
        self.std = None if std is None else np.asarray(std, dtype=np.float32)
        self.shuffle = shuffle
        self.augment = parse_augment(augment)
        self.seed = int(seed)
        self.drop_last = drop_last
        self.prefetch = int(prefetch)

    def __len__(self) -> int:
        n = len(self.x) / self.batch_size
        return math.floor(n) if self.drop_last else math.ceil(n)

    @property
    def num_examples(self) -> int:
        """Examples seen per epoch (fewer than len(x) when drop_last cuts a partial batch)."""
        return min(len(self.x), len(self) * self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        """The example indices of `epoch`; batch b holds order[b*B:(b+1)*B] (served sorted by index, which makes
        the gather faster and changes nothing for a mean over the batch). A function of (seed, epoch) only."""
        if not self.shuffle:
            return np.arange(len(self.x))
        return np.random.default_rng([self.seed, int(epoch), 0]).permutation(len(self.x))

    def batch(self, epoch: int, b: int, order: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Batch b of `epoch`, assembled in the calling thread (epoch() serves the same arrays)."""
        order = self.order(epoch) if order is None else order
        idx = order[b * self.batch_size:(b + 1) * self.batch_size]
        if self.shuffle:
            idx = np.sort(idx)          # gathers in memory order (faster); the batch's content is what matters
        xb = self.x[idx]
        if self.augment:
            xb = apply_augment(xb, self.augment, np.random.default_rng([self.seed, int(epoch), 1, b]))
        return normalize(xb, self.mean, self.std), self.y[idx]

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Iterate over the batches of `epoch` from batch `start` on. Stopping early (break, exception, close())
        stops and joins the worker thread."""
        order = self.order(epoch)
        batches = range(int(start), len(self))
        if self.prefetch <= 0:
            for b in batches:
                yield self.batch(epoch, b, order)
            return
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            return False

        def work():
            try:
                for b in batches:
                    if not put(self.batch(epoch, b, order)):
                        return
                put(_DONE)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, re-raised there
                put(e)

        t = threading.Thread(target=work, name=f"hetnet-loader-epoch{epoch}", daemon=True)
        t.start()
        try:
            while True:
                item = q.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            t.join()
