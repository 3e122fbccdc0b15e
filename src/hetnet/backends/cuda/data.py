"""The data-set launchers of the cuda backend (data.cu): uint8 images kept on the GPU and batches gathered
from a per-epoch plan (hetnet.data.ResidentLoader)."""
from __future__ import annotations

import numpy as np

from ...errors import DeviceError
from .kernels import check


class DataOps:
    """CudaBackend's data-set ops (hetnet.backends: gather_images)."""

    resident_data = True     # train from uint8 images in device memory: no host copy per batch

    def upload(self, a):
        """a copied to the GPU with its dtype (uint8 images, int32 plans); running out of memory is one line."""
        a = np.ascontiguousarray(a)
        try:
            with self.device:
                return self.cupy.asarray(a)
        except self.cupy.cuda.memory.OutOfMemoryError:
            free, total = self.cupy.cuda.runtime.memGetInfo()
            raise DeviceError(f"out of GPU memory on {self.name} copying {a.nbytes / 2**20:.1f} MiB of data to "
                              f"the GPU ({free / 2**20:.0f} MiB free of {total / 2**20:.0f} MiB)") from None

    def gather_images(self, images, labels, plan, start, count, scale, shift, reflect=False):
        """One batch from the plan, as the op interface says: one launch of data.cu's gather_images."""
        cp = self.cupy
        _, c, h, w = images.shape
        if images.dtype != cp.uint8 or plan.dtype != cp.int32 or labels.dtype != cp.int32:
            raise ValueError(f"gather_images: expected uint8 images, int32 plan and labels, got {images.dtype}, "
                             f"{plan.dtype}, {labels.dtype}")
        check(images, labels, plan, scale, shift)
        with self.device, self.compute_stream():
            x = cp.empty((int(count), c, h, w), dtype=cp.float32)
            y = cp.empty((int(count),), dtype=cp.int32)
            self.launch("data", self.ix("gather_images", x.size), x.size, images, labels, plan, np.int64(plan.shape[1]),
                        np.int64(start), scale, shift, x, y, np.int32(count), np.int32(c), np.int32(h), np.int32(w),
                        np.int32(1 if reflect else 0))
        return x, y
