"""The CPU emulator's tensor maps (tests/cuda_emu/cuda_emu.h, "TMA"): mma.map_specs' parameters encoded in the
emulator's own layout of a 128-byte HnTensorMap, as the driver's encoders (mma.rows_map, mma.im2col_map) take them."""
from __future__ import annotations

import numpy as np


def emu_map(spec: tuple) -> np.ndarray:
    """One map as 16 uint64 words: ("tile", a, cols, box_rows) or ("im2col", x16, r, s, stride, pad, pixels)."""
    bits = np.zeros(16, np.uint64)
    if spec[0] == "tile":
        _, a, cols, box_rows = spec
        rows = a.size // cols
        bits[:4] = (1, a.ctypes.data, cols, rows)
        bits[6] = 2 * cols
        bits[9:11] = (64, box_rows)
        return bits
    _, x16, r, s, stride, pad, pixels = spec
    n, h, w, c = x16.shape
    bits[:6] = (2, x16.ctypes.data, c, w, h, n)
    bits[6:9] = (2 * c, 2 * c * w, 2 * c * w * h)
    bits[9:11] = (64, pixels)
    bits[11:15] = np.array([-pad, -pad, pad - (s - 1), pad - (r - 1)], np.int64).view(np.uint64)
    bits[15] = stride | (stride << 32)
    return bits
