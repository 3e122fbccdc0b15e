"""The cuda backend on the CPU, for tests without a GPU: CudaBackend's own Python (its ops, launchers, choices and the
plan's hand-overs) on NumPy arrays, its kernels run by the emulator (tests/cuda_emu) from their CUDA text. norm.cu,
pool.cu, loss.cu, elementwise.cu and optim.cu compile whole; of conv.cu, the channels-last copies, turned weights,
pooling gradients, small forward and their helpers (test_cu_emulated's pieces; its implicit-GEMM tiles have PTX of
their own); mma.cu whole, its convolutions launched through gemm_launch.cpp's emu_conv. Nothing is measured: a
test sets each convolution's choice in `_tune` (the channels-last tensor-core ones, the NCHW "tc", "small"); cuBLAS
is not there."""
from __future__ import annotations

import contextlib
import ctypes
import re

import numpy as np

from emu_build import EMU_DIR, EmulatedKernel, build_emulated
from emu_tma import emu_map

from hetnet.backends.cuda import CudaBackend, kernels
from hetnet.backends.cuda import mma as mm
from hetnet.backends.cuda.mma_tiles import TmaTile

WHOLE = ("norm", "pool", "loss", "elementwise", "optim")


def whole_module_text(module: str) -> str:
    """A .cu file with common.cuh inlined, as the emulator compiles it: its bf16 conversion (the same rounding),
    `__shared__` arrays static (one block runs at a time)."""
    text = kernels.inline_header(kernels.cu_text(module)).replace("#pragma once\n", "")
    text, n = re.subn(r"__device__ __forceinline__ unsigned hn_bf16x2_bits\(float lo, float hi\) \{.*?\n\}\n", "",
                      text, flags=re.S)
    assert n == 1, "common.cuh's hn_bf16x2_bits"
    return "#define __shared__ static\n" + re.sub(r"\bhn_bf16x2_bits\b", "hn_pack_bf16x2", text)


def _buffer(a) -> tuple:
    """An emulated launch's (pointer, bytes) of an array argument: (null, 0) for anything not a NumPy array."""
    if not isinstance(a, np.ndarray):
        return ctypes.c_void_p(None), ctypes.c_longlong(0)
    return ctypes.c_void_p(a.ctypes.data), ctypes.c_longlong(a.nbytes)


class EmulatedConvKernel:
    """get_kernel's stand-in for an mma.cu convolution kernel: a launch with a ConvCall's (grid, block, args) runs
    it on the emulator (gemm_launch.cpp's emu_conv, every buffer registered with its size)."""

    max_dynamic_shared_size_bytes = 0

    def __init__(self, lib, name: str):
        self.lib, self.name = lib, name

    def __call__(self, grid, block, args, shared_mem=0):
        c = ctypes
        src, w, aux, out, *ints = args
        err = c.create_string_buffer(1024)
        rc = self.lib.emu_conv(c.cast(getattr(self.lib, self.name), c.c_void_p), *(c.c_uint(int(v)) for v in grid),
                               c.c_uint(int(block[0])), c.c_int(int(shared_mem)), *_buffer(src), *_buffer(w),
                               *_buffer(aux), *_buffer(out), *(c.c_int(int(v)) for v in ints), c.c_uint(3), err,
                               c.c_int(len(err)))
        assert rc == 0, f"{self.name} grid {grid}: {err.value.decode()}"


def run_conv(emu, call: mm.ConvCall, seed: int = 0) -> None:
    """Execute a convolution plan on the emulator (NumPy arrays), as mma.launch_conv does on a GPU: a TMA tile's
    through emu_conv_tma with its sums and its two maps in the emulator's encoding of mma.map_specs."""
    args = call.args(lambda a: a.ctypes.data, None)
    err = ctypes.create_string_buffer(1024)
    kernel = ctypes.cast(getattr(emu, call.kernel), ctypes.c_void_p)
    c = ctypes
    tma = isinstance(call.tile, TmaTile)
    maps = [np.ascontiguousarray(emu_map(spec)) for spec in mm.map_specs(call)] if tma else []
    rc = (emu.emu_conv_tma if tma else emu.emu_conv)(
        kernel, *(c.c_uint(v) for v in call.grid), c.c_uint(call.tile.threads), c.c_int(call.tile.smem_bytes),
        *_buffer(call.src), *_buffer(call.w), *_buffer(call.aux), *_buffer(call.out),
        *(c.c_int(int(v)) for v in args[4:]), *(_buffer(call.sums) if tma else ()),
        *(c.c_void_p(m.ctypes.data) for m in maps), c.c_uint(seed), err, c.c_int(len(err)))
    assert rc == 0, f"{call.kernel} grid {call.grid}: {err.value.decode()}"


def build_libraries(folder, mma_lib=None, whole=WHOLE) -> dict:
    """{module: emulated library} of conv, mma (mma_lib: one built already) and the `whole` modules."""
    from test_cu_emulated import emulated_kernels_text

    libs = {m: build_emulated(folder, m + "_emu", t, launchers_of=t) for m, t in
            ((m, whole_module_text(m)) for m in whole)}
    conv = emulated_kernels_text()
    libs["conv"] = build_emulated(folder, "conv_emu", conv, launchers_of=conv)
    libs["mma"] = mma_lib or build_mma(folder)
    return libs


def small_tc_text() -> str:
    """mma.cu's small convolutions on tensor cores (conv_small_fwd_tc, conv_small_filter_tc and its add), the part of
    it whose kernels EmulatedKernel launches by name."""
    text = kernels.cu_text("mma")
    return text[text.index("// --- a small convolution on bf16 tensor cores"):]


def build_mma(folder):
    """mma.cu compiled whole for the emulator: its convolutions launched through gemm_launch.cpp's emu_conv
    (EmulatedConvKernel), its small convolutions by name (EmulatedKernel)."""
    return build_emulated(folder, "mma_emu", kernels.cu_text("mma"), EMU_DIR / "gemm_launch.cpp",
                          launchers_of=small_tc_text())


def route_kernels(monkeypatch, libs: dict, wgmma: bool = False) -> None:
    """Every get_kernel of the cuda backend's modules to the emulated libraries, and mma.launch_conv's TMA tiles to
    run_conv; the wgmma tiles (the TMA ones among them) offered or not (the emulator runs both), no tuning cache."""
    import hetnet.backends.cuda as cuda_pkg
    from hetnet.backends.cuda import conv, elementwise, loss, mma, norm, pool, tune_cache

    def get_kernel(device, module, name):
        if module == "mma" and name not in libs["mma"].entries:
            return EmulatedConvKernel(libs["mma"], name)
        return EmulatedKernel(libs[module], name)

    for mod in (cuda_pkg, conv, mma, norm, elementwise, pool, loss):
        monkeypatch.setattr(mod, "get_kernel", get_kernel)
    real_launch = mma.launch_conv

    def launch_conv(be, call):
        if call is not None and isinstance(call.tile, TmaTile):
            run_conv(libs["mma"], call)
        else:
            real_launch(be, call)

    for mod in (conv, mma):
        monkeypatch.setattr(mod, "wgmma_ok", lambda device: wgmma)
    monkeypatch.setattr(mma, "launch_conv", launch_conv)
    monkeypatch.setattr(tune_cache, "for_backend", lambda be: None)


class EmulatedBackend(CudaBackend):
    """CudaBackend on NumPy arrays (route_kernels first). Steps run eagerly (no CUDA graph)."""

    step_runner = None

    def __init__(self, precision: str = "bf16", sms: int = 4):
        self.cupy, self.xp, self.device_id, self.name = None, np, 0, "cuda:0"
        self.dtype, self.gpu_name, self.sms, self.precision = np.dtype(np.float32), "emulator", sms, precision
        self.cuda_graph, self.force_conv_algo, self.capturing, self.index64, self.graph_cublas = False, None, None, \
            False, True
        self._cache, self._tune, self._tune_times, self.tune_log, self._alpha_beta = {}, {}, {}, [], {}
        self._stream = self._step_pool = self._tune_pool = self._tune_file = None

    def __repr__(self) -> str:
        return "EmulatedBackend()"

    def asarray(self, a):
        return np.array(a, dtype=np.float32, order="C", copy=True)

    def to_numpy(self, arr) -> np.ndarray:
        return np.array(arr, copy=True)

    def zeros(self, shape, dtype=None):
        return np.zeros(shape, dtype=np.float32 if dtype is None else dtype)

    def labels(self, a):
        return np.ascontiguousarray(a, dtype=np.int32)

    def synchronize(self) -> None:
        pass

    def _c(self, a):
        return np.ascontiguousarray(a)

    def persistent(self):
        return contextlib.nullcontext()

    def tune_pool(self):
        raise AssertionError("the emulated backend measures nothing: set the choice in _tune")
