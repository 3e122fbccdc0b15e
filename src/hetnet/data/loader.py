"""Mini-batches from uint8 images kept in memory, assembled by a background thread.

A worker thread indexes, augments, converts to float32 and normalises the next few batches while the model computes
on the current one (NumPy releases the GIL for the copies and arithmetic). Everything random about an epoch, its
order and its augmentation, comes from generators seeded by (seed, epoch[, batch]), so epoch e is the same whether
it runs after epoch e-1 or first thing after a resume.

    >>> loader = BatchLoader(train_x, train_y, 32, mean, std, augment=("crop", "flip"), seed=0)
    >>> for xb, yb in loader.epoch(3):      # xb float32 (B, C, H, W) C-contiguous, yb int64 (B,)
    ...     ...
    >>> len(loader)                          # batches per epoch

On a device that keeps data sets in its own memory (the cuda backend), `on_device(loader, backend)` returns a
`ResidentLoader`: the uint8 images and labels are copied to the device once, and each batch is gathered, cropped,
flipped and normalised there by one kernel, from a per-epoch plan (indices and augmentation offsets, one upload per
epoch) drawn from the same generators as here, so both paths serve identical batches.

    >>> loader = on_device(BatchLoader(train_x, train_y, 128, mean, std, augment="crop,flip"), backend)
    >>> for xb, yb in loader.epoch(3):      # device arrays: float32 (B, C, H, W), labels in the backend's int type
    ...     ...
"""
from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterator

import numpy as np

from .transforms import altflip_coins, apply_augment, normalize, normalize_coefficients, parse_augment

_DONE = object()


class BatchLoader:
    """Batches (xb float32 normalised, yb int64) over uint8 images x (N, C, H, W) and labels y (N,).

    mean/std: per-channel statistics in [0, 1] units (None: scale to [0, 1] only). augment: names from
    transforms.AUGMENTATIONS, applied in order to training batches: "crop[:P]" (pad P zeros, default 4, crop at a
    random offset), "translate[:P]" (the same with the border mirrored, default 2), "flip" (each image mirrored
    with probability 1/2), "altflip" (each image mirrored every other epoch, transforms.altflip_mask).
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
        self._coins = None                  # altflip's coin per image, drawn when first needed

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
            xb = apply_augment(xb, self.augment, np.random.default_rng([self.seed, int(epoch), 1, b]),
                               self._altflip(epoch, idx))
        return normalize(xb, self.mean, self.std), self.y[idx]

    def _altflip(self, epoch: int, idx: np.ndarray) -> np.ndarray | None:
        """The mask of the images idx that "altflip" mirrors in `epoch` (transforms.altflip_coins); None without it."""
        if not any(name == "altflip" for name, _ in self.augment):
            return None
        if self._coins is None:
            self._coins = altflip_coins(self.seed, len(self.x))
        return self._coins[idx] ^ bool(int(epoch) % 2)

    @property
    def plannable(self) -> bool:
        """Whether the augmentation fits a plan: at most one crop or translate (and any flips; see the backends'
        gather_images)."""
        return sum(1 for name, pad in self.augment if name in ("crop", "translate") and pad > 0) <= 1

    @property
    def reflect(self) -> bool:
        """Whether the plan's padding is reflected (a translate) rather than zeros (a crop)."""
        return any(name == "translate" and pad > 0 for name, pad in self.augment)

    def plan(self, epoch: int) -> np.ndarray:
        """The batches of `epoch` as an int32 plan (4, num_examples): rows index, oy, ox, flip, batch b in columns
        b*B .. (b+1)*B. Draws the same random numbers as batch() (apply_augment), so a backend's
        gather_images(plan) gives the same arrays as batch()."""
        if not self.plannable:
            raise ValueError(f"augmentation {self.augment} does not fit a plan (at most one crop or translate)")
        order = self.order(epoch)
        m, bs = self.num_examples, self.batch_size
        out = np.zeros((4, m), dtype=np.int32)
        for b in range(len(self)):
            lo, hi = b * bs, min((b + 1) * bs, m)
            idx = order[lo:hi]
            out[0, lo:hi] = np.sort(idx) if self.shuffle else idx
            if not self.augment:
                continue
            rng, n = np.random.default_rng([self.seed, int(epoch), 1, b]), hi - lo
            flipped = np.zeros(n, dtype=bool)
            for name, pad in self.augment:           # the draws of apply_augment, in order
                if name in ("crop", "translate") and pad > 0:
                    dy = rng.integers(0, 2 * pad + 1, size=n)
                    dx = rng.integers(0, 2 * pad + 1, size=n)
                    out[1, lo:hi] = dy - pad
                    out[2, lo:hi] = np.where(flipped, pad - dx, dx - pad)   # flipped before the crop: mirror ox
                elif name == "flip":
                    flipped ^= rng.random(n) < 0.5                          # two mirrors undo each other
                elif name == "altflip":
                    flipped ^= self._altflip(epoch, out[0, lo:hi].astype(np.int64))
            out[3, lo:hi] = flipped
        return out

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


class ResidentLoader:
    """The batches of a BatchLoader, assembled on the backend's device from a copy of its uint8 images kept there.

    Per epoch: the plan (BatchLoader.plan, int32 (4, M)) is uploaded once; each batch is then one
    `backend.gather_images` call (on the GPU: one kernel that gathers, crops or translates, flips, normalises and
    gathers the labels). Nothing comes back to the host. Batches are the arrays BatchLoader.epoch serves, on the
    device.
    """

    on_device = True        # batches are already device arrays in the backend's dtype (hetnet.train skips asarray)

    def __init__(self, host: BatchLoader, backend):
        if not host.plannable:
            raise ValueError(f"augmentation {host.augment} does not fit a plan (at most one crop or translate)")
        self.host, self.backend = host, backend
        self.images = backend.upload(host.x)                      # (N, C, H, W) uint8 on the device
        self.labels = backend.labels(host.y)
        scale, shift = normalize_coefficients(host.mean, host.std, host.x.shape[1])
        self.scale, self.shift = backend.upload(scale), backend.upload(shift)
        self._fixed_plan = None                                  # evaluation order: the same plan every epoch

    def __len__(self) -> int:
        return len(self.host)

    @property
    def batch_size(self) -> int:
        return self.host.batch_size

    @property
    def num_examples(self) -> int:
        return self.host.num_examples

    def _plan(self, epoch: int):
        if self.host.shuffle or self.host.augment:
            return self.backend.upload(self.host.plan(epoch))
        if self._fixed_plan is None:
            self._fixed_plan = self.backend.upload(self.host.plan(0))
        return self._fixed_plan

    def epoch(self, epoch: int, start: int = 0):
        """(xb, yb) device arrays for the batches of `epoch` from batch `start` on."""
        plan, bs, m = self._plan(epoch), self.host.batch_size, self.host.num_examples
        for b in range(int(start), len(self)):
            lo = b * bs
            yield self.backend.gather_images(self.images, self.labels, plan, lo, min(bs, m - lo), self.scale,
                                             self.shift, reflect=self.host.reflect)


def on_device(loader, backend):
    """`loader` as the backend wants it: a ResidentLoader where the backend keeps data on its device
    (backend.resident_data) and the augmentation fits a plan; otherwise `loader` itself (host batches)."""
    if isinstance(loader, BatchLoader) and getattr(backend, "resident_data", False) and loader.plannable:
        return ResidentLoader(loader, backend)
    return loader
