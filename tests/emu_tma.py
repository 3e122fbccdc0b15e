"""The CPU emulator's tensor maps (tests/cuda_emu/cuda_emu.h, "TMA"): a spec of mma.py (rows_spec, im2col_spec, as
mma.map_specs makes them; the driver encodes the same with mma.encode_map) in the emulator's own layout of a
128-byte HnTensorMap."""
from __future__ import annotations

import numpy as np


def emu_map(spec: dict) -> np.ndarray:
    """One map as 16 uint64 words."""
    bits = np.zeros(16, np.uint64)
    dims, strides = spec["dims"], spec["strides"]
    bits[0], bits[1] = (1 if spec["mode"] == "tile" else 2), spec["array"].ctypes.data
    bits[2:2 + len(dims)] = dims
    bits[6:6 + len(strides)] = strides
    if spec["mode"] == "tile":
        bits[9:11] = spec["box"]
        return bits
    bits[9:11] = (spec["channels"], spec["pixels"])
    bits[11:15] = np.array([*spec["lower"], *spec["upper"]], np.int64).view(np.uint64)
    _, sw, sh, _ = spec["element_strides"]
    bits[15] = sw | (sh << 32)
    return bits
