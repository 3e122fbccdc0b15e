"""The NumPy twin of the device kernel backends/cuda/data.cu gather_images: one batch of a data set's uint8 images,
cropped or translated, flipped and normalised as a plan says, in float32. The cpu backend serves it as its
gather_images op; the reference backend widens it to float64, so both host backends see the batch the GPU builds.
Shapes: images (N, C, H, W) uint8, plan (4, M) int32 rows (image index, row offset, column offset, flip)."""
from __future__ import annotations

import numpy as np


def _reflect(i: np.ndarray, n: int) -> np.ndarray:
    """Indices reflected into [0, n) without repeating the edge (period 2(n-1); n = 1: 0), as np.pad's 'reflect'."""
    if n == 1:
        return np.zeros_like(i)
    m = np.mod(i, 2 * (n - 1))
    return np.where(m < n, m, 2 * (n - 1) - m)


def gather_images(images, labels, plan, start, count, scale, shift, reflect=False):
    """Columns start .. start+count of `plan` as a normalised float32 batch (count, C, H, W) and its labels: the
    NumPy version of the device kernel (backends/cuda/data.cu, gather_images), what hetnet.data's host loader
    serves for the same plan. Outside the image: zeros, or (reflect) the image mirrored at its border."""
    start, count = int(start), int(count)
    idx, oy, ox, flip = (np.asarray(plan[k, start:start + count], dtype=np.int64) for k in range(4))
    _, c, h, w = images.shape
    rows = np.arange(h)[None, :] + oy[:, None]                                   # (B, H) source rows
    cols = np.where(flip[:, None] != 0, w - 1 - np.arange(w)[None, :], np.arange(w)[None, :]) + ox[:, None]
    if reflect:
        rows, cols = _reflect(rows, h), _reflect(cols, w)
    inside = ((rows >= 0) & (rows < h))[:, None, :, None] & ((cols >= 0) & (cols < w))[:, None, None, :]
    v = images[idx[:, None, None, None], np.arange(c)[None, :, None, None],
               np.clip(rows, 0, h - 1)[:, None, :, None], np.clip(cols, 0, w - 1)[:, None, None, :]]
    v = np.where(inside, v, np.uint8(0))
    out = np.multiply(v, scale.reshape(1, c, 1, 1), dtype=np.float32)
    out += shift.reshape(1, c, 1, 1)
    return out, labels[idx]
