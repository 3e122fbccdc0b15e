"""The loss launchers of the cuda backend (loss.cu): softmax cross-entropy fused with its gradient and the steps'
sums, sigmoid + binary cross-entropy."""
from __future__ import annotations

import math

import numpy as np

from .kernels import NULL, get_kernel, grid_for

_i32, _i64, _f32 = np.int32, np.int64, np.float32


class LossOps:
    """CudaBackend's losses."""

    def softmax_xent_into(self, logits, labels, dlogits, loss_acc, correct, label_smoothing=0.0):
        """The fused loss kernel: dlogits (or None), loss_acc += sum of losses, correct += right argmaxes."""
        n, k = logits.shape
        get_kernel(self.device_id, "loss", "softmax_xent")((max(1, math.ceil(n * 32 / 256)),), (256,), (
            logits, labels, dlogits if dlogits is not None else NULL, loss_acc if loss_acc is not None else NULL,
            correct if correct is not None else NULL, _i32(n), _i32(k), _f32(label_smoothing),
            _f32(1.0 / max(n, 1))))

    def _labels32(self, labels):
        if isinstance(labels, np.ndarray) or not isinstance(labels, self.cupy.ndarray):
            return self.labels(np.asarray(labels))
        return labels if labels.dtype == self.cupy.int32 and labels.flags.c_contiguous else \
            self.cupy.ascontiguousarray(labels, dtype=self.cupy.int32)

    def softmax_cross_entropy_into(self, logits, labels, dlogits, loss_sum, correct, label_smoothing=0.0):
        self.softmax_xent_into(self._c(logits), self._labels32(labels), dlogits, loss_sum, correct, label_smoothing)

    def softmax_cross_entropy(self, logits, labels, label_smoothing=0.0):
        logits = self._c(logits)
        n = logits.shape[0]
        d = self.xp.empty_like(logits)
        acc = self.xp.zeros((1,), dtype=self.xp.float64)
        self.softmax_xent_into(logits, self._labels32(labels), d, acc, None, label_smoothing)
        return (float(acc.get()[0]) / n if n else 0.0), d

    def softmax_cross_entropy_stats(self, logits, labels):
        logits = self._c(logits)
        acc = self.xp.zeros((1,), dtype=self.xp.float64)
        correct = self.xp.zeros((1,), dtype=self.xp.uint64)
        self.softmax_xent_into(logits, self._labels32(labels), None, acc, correct)
        return float(acc.get()[0]), int(correct.get()[0])

    def binary_cross_entropy_with_logits(self, logits, targets):
        z = self._c(logits)
        t = self.cupy.ascontiguousarray(targets, dtype=self.cupy.float32)
        d = self.xp.empty_like(z)
        acc = self.xp.zeros((1,), dtype=self.xp.float64)
        n = z.size
        get_kernel(self.device_id, "loss", "bce_logits")((grid_for(n, self.sms),), (256,), (
            z, t, d, acc, _i64(n), _f32(1.0 / max(n, 1))))
        return (float(acc.get()[0]) / n if n else 0.0), d
