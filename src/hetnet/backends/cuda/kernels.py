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
SOURCES = ("conv", "pool", "norm", "elementwise", "loss", "optim", "data", "mma", "winograd")
NULL = np.uint64(0)  # a null pointer argument

_modules: dict[tuple[int, str], object] = {}
_kernels: dict[tuple[int, str, str], object] = {}
_props: dict[int, dict] = {}
_wgmma: dict[int, bool] = {}


def cu_text(name: str) -> str:
    """A source's CUDA text as nvcc compiles it (with -I this folder): the .cu file, and for conv the entry points of
    the tiles that ship, generated from their table (conv_tiles.py); for mma those of its tiles and of its
    convolution (mma_tiles.py)."""
    text = (HERE / f"{name}.cu").read_text()
    if name == "conv":
        text += "\n" + conv_tiles.instantiations(conv_tiles.TILES)
    elif name == "mma":
        text += "\n" + mma_tiles.instantiations(mma_tiles.TILES, mma_tiles.conv_tiles())
    return text


def inline_header(text: str) -> str:
    """CUDA text with the shared header inlined (NVRTC has no include path for our folder)."""
    return text.replace('#include "common.cuh"', (HERE / "common.cuh").read_text())


def source(name: str) -> str:
    """The text NVRTC compiles for a source."""
    return inline_header(cu_text(name))


# Compiled into every module built for sm_90a (compile_module): its presence says the wgmma kernels can run.
SM90A_MARKER = "hn_sm90a_marker"
_SM90A_TEXT = f"""
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
extern "C" __global__ void {SM90A_MARKER}() {{}}
#endif
"""


def built_for_sm90a(mod) -> bool:
    """Whether a compiled module has SM90A_MARKER, i.e. was built for sm_90a (compile_module)."""
    try:
        mod.get_function(SM90A_MARKER)
        return True
    except Exception:        # CuPy raises its driver error for a missing function
        return False


def compile_module(device_id: int, text: str, sm90a: bool = False):
    """`text` compiled by NVRTC for the device; with `sm90a` on compute capability 9.0 for sm_90a (the arch-specific
    features: wgmma), checked by SM90A_MARKER, else (or if NVRTC refuses it) for the device's own architecture."""
    import cupy

    with cupy.cuda.Device(device_id):
        if sm90a and device_props(device_id)["cc"] == "9.0":
            try:
                # CuPy adds an -arch of its own for the device: the marker says whether sm_90a took effect
                mod = cupy.RawModule(code=text + _SM90A_TEXT, options=("-std=c++17", "-arch=sm_90a"))
                mod.compile()
                if built_for_sm90a(mod):
                    return mod
            except Exception:    # this NVRTC or CuPy refuses the option: the plain build
                pass
        mod = cupy.RawModule(code=text, options=("-std=c++17",))
        mod.compile()
        return mod


def get_module(device_id: int, name: str):
    key = (device_id, name)
    mod = _modules.get(key)
    if mod is None:
        mod = _modules[key] = compile_module(device_id, source(name), sm90a=name == "mma")
    return mod


def wgmma_ok(device_id: int) -> bool:
    """Whether the mma module of this device was built for sm_90a, so that its HN_CONV16W kernels run."""
    ok = _wgmma.get(device_id)
    if ok is None:
        ok = _wgmma[device_id] = built_for_sm90a(get_module(device_id, "mma"))
    return ok


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


def address(a) -> int:
    """The address of an array's first element: a CuPy array's on the device, a NumPy array's on the host (the
    emulated backend's arrays); for the alignment the 16-byte vector kernels need."""
    face = getattr(a, "__cuda_array_interface__", None) or a.__array_interface__
    return int(face["data"][0])


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


def gemm_operands(c, a, trans_a: bool, b, trans_b: bool, who: str = "gemm"):
    """The views a GEMM c[M,N] = op(a) @ op(b) takes, as (a, trans_a, b, trans_b, m, n, k) of row-major float32
    matrices with contiguous rows and any row stride: a or b whose rows are not contiguous is taken as the transpose
    of its transpose. Raises ValueError (naming `who`) for anything else, or shapes that do not chain."""
    if not rows_contiguous(a):
        a, trans_a = a.T, not trans_a
    if not rows_contiguous(b):
        b, trans_b = b.T, not trans_b
    for name, mat in (("a", a), ("b", b), ("c", c)):
        if mat.dtype != np.float32 or not rows_contiguous(mat):
            raise ValueError(f"{who}: {name} of shape {mat.shape}, strides {mat.strides} is not a float32 matrix "
                             "with contiguous rows")
    m, n = c.shape
    k = a.shape[0] if trans_a else a.shape[1]
    op_a = a.shape[::-1] if trans_a else a.shape
    op_b = b.shape[::-1] if trans_b else b.shape
    if op_a != (m, k) or op_b != (k, n):
        raise ValueError(f"{who}: op(a) {op_a} @ op(b) {op_b} does not give c {c.shape}")
    return a, bool(trans_a), b, bool(trans_b), m, n, k


def check(*arrays) -> None:
    """Every kernel takes C-contiguous arrays; catch a bad view before it reads the wrong memory."""
    for a in arrays:
        if a is not None and not a.flags.c_contiguous:
            raise ValueError(f"cuda kernel input of shape {a.shape} is not C-contiguous")


ACTS = {None: 0, "relu": 1}     # the activation code of the kernels' epilogues (common.cuh's HN_RELU)


def act_code(act) -> int:
    """The kernels' code for a forward op's activation (None or "relu", as the op contract names it)."""
    if act not in ACTS:
        raise ValueError(f"unknown activation {act!r} (expected None or 'relu')")
    return ACTS[act]
