"""Check, then time, the sandbox's channels-last bf16 convolution forwards (tc_conv_nhwc.cu) beside the shipped NCHW
one (mma.conv_tc, hn_conv_fwd_bf16_*) on cifar-wide's 3x3 convolutions: what 16-byte gathers from an NHWC input buy
("nhwc": x and w in float32, staged and rounded as now), and what storing them in bf16 adds ("nhwc16": cp.async
straight into the bf16 tiles), before the cuda backend's activations change layout.

Each kernel first runs once against float64 of the bf16-rounded inputs (hetnet.backends.reference) within
RTOL_TC_ROUNDED of ||y|| (a candidate that fails is reported, never timed); then it is timed as
run_conv_variants.py times (time_ms: CUDA events around back-to-back launches queued behind a ~1 ms spin kernel,
median of several samples). Each sandbox kernel is timed without and with what its input's layout would cost while
the rest of the backend stays NCHW float32 (x NCHW -> NHWC; for nhwc16 also rounded to 2 bytes); the weights'
permutation [O][C][R][S] -> [O][R][S][C] is per step, not per layer call, and is left out.

    PYTHONPATH=src python benchmarks/kernels/run_tc_conv_nhwc.py [--batch 512] [--out nhwc.json]   # on a GPU
    PYTHONPATH=src python benchmarks/kernels/run_tc_conv_nhwc.py --emulate     # the CPU emulator (g++), no GPU
"""
from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SOURCE = HERE / "tc_conv_nhwc.cu"
EMU_DIR = ROOT / "tests" / "cuda_emu"
sys.path.insert(0, str(ROOT / "tests"))        # mma_cases: the bf16 rounding and float64 expectations
sys.path.insert(0, str(HERE))                   # run_conv_variants: the timing

from mma_cases import conv_expected, round_bf16  # noqa: E402
from run_conv_variants import time_ms  # noqa: E402

from hetnet.backends.cuda.kernels import HERE as CUDA_DIR  # noqa: E402
from hetnet.backends.cuda.kernels import NULL, get_kernel, inline_header  # noqa: E402
from hetnet.backends.cuda.mma_tiles import CONV_CHOICE, TILES  # noqa: E402

RTOL_TC_ROUNDED = 1e-4          # tests/conftest.py's: float32 sums of bf16-rounded inputs
TILE_NAMES = CONV_CHOICE["bf16"]


class Kernel:
    """A sandbox kernel: its entry point, block tile, threads, shared memory, input storage ("f32": float32, "bf16":
    bf16 bits) and the channel count C must be a multiple of."""

    def __init__(self, name: str, bm: int, bn: int, threads: int, smem_bytes: int, storage: str, c_multiple: int):
        self.name, self.bm, self.bn, self.threads, self.smem_bytes = name, bm, bn, threads, smem_bytes
        self.storage, self.c_multiple = storage, c_multiple


def _kernels() -> list[Kernel]:
    out = [Kernel(f"hn_conv_nhwc_fwd_bf16_{t.name}", t.bm, t.bn, t.threads, t.smem_bytes, "f32", 4)
           for t in (next(t for t in TILES if t.precision == "bf16" and t.name == n) for n in TILE_NAMES)]
    for name, bm, bn, threads in (("128x128x32s4", 128, 128, 256), ("128x128x32s4b2", 128, 128, 256),
                                  ("64x64x32s4", 64, 64, 128)):
        out.append(Kernel(f"hn_conv_nhwc16_fwd_{name}", bm, bn, threads, 4 * (bm + bn) * (32 + 8) * 2, "bf16", 8))
    return out


KERNELS = _kernels()
# cifar-wide's 3x3 convolutions at pad 1 (benchmarks/specs/cifar-wide.json): (C, H, W, O)
SHAPES = {"conv2": (64, 32, 32, 128), "conv3": (128, 16, 16, 128), "conv4": (128, 16, 16, 256),
          "conv5": (256, 8, 8, 256), "conv6": (256, 4, 4, 256)}
# small shapes for the emulator (each kernel takes those whose C it can): tails in M, N and K, stride 2, 1x1, 5x5
EMU_SHAPES = [(2, 8, 5, 7, 12, 3, 3, 1, 1), (1, 4, 6, 6, 70, 1, 1, 1, 0), (3, 12, 9, 8, 20, 3, 3, 2, 1),
              (3, 16, 9, 8, 20, 3, 3, 2, 1), (2, 16, 7, 7, 33, 5, 5, 1, 2), (1, 36, 4, 4, 130, 3, 3, 1, 1),
              (1, 40, 4, 4, 130, 3, 3, 1, 1)]


def bf16_bits(a: np.ndarray) -> np.ndarray:
    """The bf16 (round to nearest even) of float32 values, as their 16 bits."""
    return (round_bf16(a).view(np.uint32) >> 16).astype(np.uint16)


def _stored(k: Kernel, x: np.ndarray, w: np.ndarray):
    """x [n][C][H][W] and w [O][C][R][S] as kernel k reads them: channels last, float32 or bf16 bits."""
    x_nhwc, w_ohwi = np.ascontiguousarray(x.transpose(0, 2, 3, 1)), np.ascontiguousarray(w.transpose(0, 2, 3, 1))
    return (x_nhwc, w_ohwi) if k.storage == "f32" else (bf16_bits(x_nhwc), bf16_bits(w_ohwi))


def _sizes(x_shape, w_shape, stride: int, pad: int):
    n, c, h, w = x_shape
    o, _, r, s = w_shape
    p, q = (h + 2 * pad - r) // stride + 1, (w + 2 * pad - s) // stride + 1
    return n, c, h, w, o, r, s, p, q


def _args(x_shape, w_shape, stride: int, pad: int, act: int) -> tuple:
    """The kernel's integer arguments after its four pointers (mma.cu's HN_CONV_PARAMS)."""
    n, c, h, w, o, r, s, p, q = _sizes(x_shape, w_shape, stride, pad)
    return (o, n * p * q, r * s * c, c, h, w, r, s, p, q, o, stride, pad, act, 1, r * s * c)


def _grid(tile: Kernel, x_shape, w_shape, stride: int, pad: int) -> tuple:
    n, _, _, _, o, _, _, p, q = _sizes(x_shape, w_shape, stride, pad)
    return (-(-n * p * q // tile.bn), -(-o // tile.bm), 1)


def emulate() -> int:
    """Compile the sandbox against the CPU emulator and check both tiles on EMU_SHAPES; 0 when all agree."""
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        lib = Path(tmp) / "libnhwc.so"
        cmd = ["g++", "-std=c++17", "-O1", "-shared", "-fPIC", "-Wno-unknown-pragmas", "-include",
               str(EMU_DIR / "cuda_emu.h"), "-DHN_EMULATE", "-I", str(CUDA_DIR), "-x", "c++", str(SOURCE),
               str(EMU_DIR / "gemm_launch.cpp"), "-o", str(lib)]
        subprocess.run(cmd, check=True)
        emu = ctypes.CDLL(str(lib))
        failed = 0
        for shape in EMU_SHAPES:
            n, c, h, w, o, r, s, stride, pad = shape
            for k in KERNELS:
                if c % k.c_multiple:
                    continue
                for bias, act in ((True, 1), (False, 0)):
                    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
                    wt = rng.standard_normal((o, c, r, s)).astype(np.float32)
                    b = rng.standard_normal(o).astype(np.float32) if bias else None
                    _, _, _, _, _, _, _, p, q = _sizes(x.shape, wt.shape, stride, pad)
                    y = np.full((n, o, p, q), np.nan, np.float32)
                    xs, ws = _stored(k, x, wt)
                    err = ctypes.create_string_buffer(1024)
                    c_ = ctypes

                    def buf(a):
                        return ((c_.c_void_p(None), c_.c_longlong(0)) if a is None else
                                (c_.c_void_p(a.ctypes.data), c_.c_longlong(a.nbytes)))

                    rc = emu.emu_conv(c_.cast(getattr(emu, k.name), c_.c_void_p),
                                      *(c_.c_uint(v) for v in _grid(k, x.shape, wt.shape, stride, pad)),
                                      c_.c_uint(k.threads), c_.c_int(k.smem_bytes), *buf(xs), *buf(ws), *buf(b),
                                      *buf(y), *(c_.c_int(v) for v in _args(x.shape, wt.shape, stride, pad, act)),
                                      c_.c_uint(1), err, c_.c_int(len(err)))
                    where = f"{k.name} {shape} bias {bias} act {act}"
                    if rc != 0:
                        print(f"{where}: emulator error: {err.value.decode()}")
                        failed += 1
                        continue
                    want = conv_expected(x, wt, b, stride, pad, act, "bf16")
                    rel = float(np.linalg.norm(y - want) / max(np.linalg.norm(want), 1e-30))
                    ok = np.all(np.isfinite(y)) and rel <= RTOL_TC_ROUNDED
                    failed += not ok
                    print(f"{where}: relative error {rel:.2e} {'ok' if ok else 'FAILED'}")
        print("all agree" if not failed else f"{failed} failed")
        return 1 if failed else 0


def on_gpu(batch: int, out: str | None) -> int:
    import cupy

    from hetnet.backends.cuda import mma
    from hetnet.bench.common import environment
    from hetnet.device import get_backend

    be = get_backend("cuda", "bf16")
    spin = get_kernel(be.device_id, "elementwise", "hn_spin")

    def _time(cupy, launch) -> float:       # us per launch
        return 1000 * time_ms(cupy, spin, launch)

    text = SOURCE.read_text().replace('#include "mma.cu"', inline_header((CUDA_DIR / "mma.cu").read_text()))
    module = cupy.RawModule(code=text, options=("-std=c++17",))
    rng = np.random.default_rng(0)
    rows, failed = [], 0
    print(f"{be.gpu_name}, bf16, batch {batch}: us per call; NCHW = mma.conv_tc's best tile; ratio = NCHW / "
          "kernel (with the input's transpose and, for nhwc16, its rounding to bf16, in brackets)")
    for layer, (c, h, w, o) in SHAPES.items():
        x = cupy.asarray(rng.standard_normal((batch, c, h, w)).astype(np.float32))
        wt = cupy.asarray((rng.standard_normal((o, c, 3, 3)) * 0.05).astype(np.float32))
        y_ref = cupy.empty((batch, o, h, w), np.float32)
        nchw = min(_time(cupy, lambda name=name: mma.conv_tc(be, y_ref, x, wt, None, 1, 1, 0, name))
                   for name in TILE_NAMES)
        host_x, host_w = x.get(), wt.get()
        want = conv_expected(host_x[:2], host_w, None, 1, 1, 0, "bf16")
        for k in KERNELS:
            if c % k.c_multiple:
                continue
            xs, ws = (cupy.asarray(a) for a in _stored(k, host_x, host_w))
            if k.storage == "f32":
                layout = _time(cupy, lambda: cupy.ascontiguousarray(x.transpose(0, 2, 3, 1)))
            else:       # a stand-in for a transpose that rounds: read float32, write 2 bytes per element
                layout = _time(cupy, lambda: cupy.ascontiguousarray(x.transpose(0, 2, 3, 1)).astype(cupy.float16))
            kern = module.get_function(k.name)
            kern.max_dynamic_shared_size_bytes = k.smem_bytes
            y = cupy.full((batch, o, h, w), np.nan, np.float32)
            args = (xs, ws, NULL, y, *(np.int32(v) for v in _args(x.shape, wt.shape, 1, 1, 0)))

            def launch(kern=kern, k=k, args=args):
                kern(_grid(k, x.shape, wt.shape, 1, 1), (k.threads,), args, shared_mem=k.smem_bytes)

            launch()
            got = y[:2].get()
            rel = float(np.linalg.norm(got - want) / np.linalg.norm(want))
            if not (np.all(np.isfinite(got)) and rel <= RTOL_TC_ROUNDED):
                print(f"  {layer} {k.name}: relative error {rel:.2e} against float64: FAILED, not timed")
                failed += 1
                continue
            t = _time(cupy, launch)
            row = {"layer": layer, "shape": [batch, c, h, w, o], "kernel": k.name, "nchw_us": nchw, "us": t,
                   "layout_us": layout, "check_rel_err": rel, "tflops": 2 * batch * h * w * o * c * 9 / t / 1e6}
            rows.append(row)
            print(f"  {layer} {k.name:36s} NCHW {nchw:8.1f}  {t:8.1f} ({t + layout:8.1f})  "
                  f"{nchw / t:5.2f}x ({nchw / (t + layout):5.2f}x)  {row['tflops']:6.1f} TFLOP/s")
    if out:
        Path(out).write_text(json.dumps({"environment": environment(threads=1, want_gpu=True), "method": __doc__,
                                         "rows": rows}, indent=1, default=str) + "\n")
    return 1 if failed else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--emulate", action="store_true", help="check on the CPU emulator (g++), no GPU")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--out", default=None, help="JSON of the GPU rows")
    args = ap.parse_args(argv)
    return emulate() if args.emulate else on_gpu(args.batch, args.out)


if __name__ == "__main__":
    sys.exit(main())
