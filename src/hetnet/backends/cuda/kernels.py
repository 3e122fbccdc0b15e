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

HERE = Path(__file__).resolve().parent
SOURCES = ("conv", "pool", "norm", "elementwise", "loss", "optim", "data")
NULL = np.uint64(0)  # a null pointer argument

_modules: dict[tuple[int, str], object] = {}
_kernels: dict[tuple[int, str, str], object] = {}
_props: dict[int, dict] = {}


def source(name: str) -> str:
    """The .cu text with the shared header inlined (NVRTC has no include path for our folder)."""
    header = (HERE / "common.cuh").read_text()
    return (HERE / f"{name}.cu").read_text().replace('#include "common.cuh"', header)


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


def check(*arrays) -> None:
    """Every kernel takes C-contiguous arrays; catch a bad view before it reads the wrong memory."""
    for a in arrays:
        if a is not None and not a.flags.c_contiguous:
            raise ValueError(f"cuda kernel input of shape {a.shape} is not C-contiguous")
