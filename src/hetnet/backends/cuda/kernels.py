"""The CUDA source files of this package, compiled once per device through `cupy.RawModule` and cached.

    >>> from hetnet.backends.cuda.kernels import get_kernel          # doctest: +SKIP
    >>> relu = get_kernel(0, "elementwise", "relu_fwd")             # doctest: +SKIP
    >>> launch(relu, n, x, y, np.int64(n))                          # doctest: +SKIP

Launchers pass sizes as NumPy scalars of the exact C type (a raw kernel checks neither types nor strides), and
check dtype and contiguity of arrays before a launch (`check`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import conv_tiles, mma_tiles

HERE = Path(__file__).resolve().parent
SOURCES = ("conv", "pool", "norm", "elementwise", "loss", "optim", "data", "mma")
NULL = np.uint64(0)  # a null pointer argument

_modules: dict[tuple[int, str], object] = {}
_kernels: dict[tuple[int, str, str], object] = {}
_props: dict[int, dict] = {}


def cu_text(name: str) -> str:
    """A source's CUDA text as nvcc compiles it (with -I this folder): the .cu file, and for conv the entry points of
    the tiles that ship, generated from their table (conv_tiles.py); for mma those of its tiles (mma_tiles.py)."""
    text = (HERE / f"{name}.cu").read_text()
    if name == "conv":
        text += "\n" + conv_tiles.instantiations(conv_tiles.TILES)
    elif name == "mma":
        text += "\n" + mma_tiles.instantiations(mma_tiles.TILES)
    return text


def inline_header(text: str) -> str:
    """CUDA text with the shared header inlined (NVRTC has no include path for our folder)."""
    return text.replace('#include "common.cuh"', (HERE / "common.cuh").read_text())


def source(name: str) -> str:
    """The text NVRTC compiles for a source."""
    return inline_header(cu_text(name))


def get_module(device_id: int, name: str):
    import cupy

    key = (device_id, name)
    mod = _modules.get(key)
    if mod is None:
        with cupy.cuda.Device(device_id):
            mod = cupy.RawModule(code=source(name), options=("-std=c++17",))
            mod.compile()
        _modules[key] = mod
    return mod


def get_kernel(device_id: int, module: str, name: str):
    key = (device_id, module, name)
    k = _kernels.get(key)
    if k is None:
        k = _kernels[key] = get_module(device_id, module).get_function(name)
    return k


def device_props(device_id: int) -> dict:
    p = _props.get(device_id)
    if p is None:
        import cupy

        raw = cupy.cuda.runtime.getDeviceProperties(device_id)
        name = raw["name"]
        p = _props[device_id] = {"name": name.decode() if isinstance(name, bytes) else str(name),
                                 "sms": int(raw["multiProcessorCount"]), "memory": int(raw["totalGlobalMem"]),
                                 "cc": f"{raw['major']}.{raw['minor']}"}
    return p


def grid_for(n: int, sms: int, block: int = 256) -> int:
    """Blocks for a grid-stride loop over n elements: enough to fill the GPU, no more."""
    return int(max(1, min((n + block - 1) // block, sms * 16)))


def rows_contiguous(m) -> bool:
    """A 2-D view whose rows are contiguous (any row stride at least the row length)."""
    return m.ndim == 2 and (m.flags.c_contiguous or (m.strides[1] == m.itemsize and m.strides[0] >= m.shape[1]
                                                     * m.itemsize and m.strides[0] % m.itemsize == 0))


def leading_dim(m) -> int:
    """Leading dimension (elements between rows) of a row-major view with contiguous rows."""
    return max(1, m.shape[1], m.strides[0] // m.itemsize if m.shape[0] > 1 else 0)


def check(*arrays) -> None:
    """Every kernel takes C-contiguous arrays; catch a bad view before it reads the wrong memory."""
    for a in arrays:
        if a is not None and not a.flags.c_contiguous:
            raise ValueError(f"cuda kernel input of shape {a.shape} is not C-contiguous")
