"""Losses, fused with their gradient (the thesis's derivations):

- softmax + cross-entropy: dE/dz = (softmax(z) - y) / N, "O - y" averaged over the batch;
- sigmoid + binary cross-entropy: dE/dz = (sigmoid(z) - t) / size.

    >>> import hetnet as hn, numpy as np
    >>> loss, dlogits = hn.losses.softmax_cross_entropy(np.zeros((2, 4)), np.array([0, 3]))
    >>> round(loss, 6) == round(float(np.log(4)), 6)
    True
"""
from __future__ import annotations

import math

import numpy as np

from .device import backend_of


def _labels(backend, labels, n: int, k: int):
    if isinstance(labels, np.ndarray) or not hasattr(labels, "device"):
        labels = np.asarray(labels)
        if labels.shape != (n,):
            raise ValueError(f"softmax_cross_entropy: expected labels of shape ({n},), got {labels.shape}")
        if labels.dtype.kind not in "iu":
            raise ValueError(f"softmax_cross_entropy: labels must be integer class indices, got {labels.dtype}")
        if n and (labels.min() < 0 or labels.max() >= k):
            raise ValueError(f"softmax_cross_entropy: labels must be in [0, {k}), got range "
                             f"[{labels.min()}, {labels.max()}]")
        return backend.labels(labels)
    return labels  # already on the device (the training loop's own path); checked when loaded


def softmax_cross_entropy(logits, labels, label_smoothing: float = 0.0):
    """Mean softmax cross-entropy over the batch and its gradient: (loss: float, dlogits (N, K))."""
    if logits.ndim != 2:
        raise ValueError(f"softmax_cross_entropy: expected logits of shape (N, K), got {tuple(logits.shape)}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"softmax_cross_entropy: label_smoothing must be in [0, 1), got {label_smoothing}")
    backend = backend_of(logits)
    n, k = logits.shape
    return backend.softmax_cross_entropy(logits, _labels(backend, labels, n, k), float(label_smoothing))


def softmax_cross_entropy_stats(logits, labels) -> tuple[float, int]:
    """(sum of per-example losses, number of correct argmax predictions), without a gradient."""
    backend = backend_of(logits)
    n, k = logits.shape
    return backend.softmax_cross_entropy_stats(logits, _labels(backend, labels, n, k))


def binary_cross_entropy_with_logits(logits, targets):
    """Mean sigmoid + binary cross-entropy, stable for large |z|: (loss: float, dlogits)."""
    backend = backend_of(logits)
    targets = targets if not isinstance(targets, np.ndarray) else backend.asarray(targets)
    if tuple(targets.shape) != tuple(logits.shape):
        raise ValueError(f"binary_cross_entropy_with_logits: targets of shape {tuple(targets.shape)} do not match "
                         f"logits of shape {tuple(logits.shape)}")
    return backend.binary_cross_entropy_with_logits(logits, targets)


def softmax(logits):
    """Row-wise softmax (no cache kept)."""
    y, _ = backend_of(logits).softmax_forward(logits)
    return y


def is_finite(value: float) -> bool:
    return math.isfinite(value)
