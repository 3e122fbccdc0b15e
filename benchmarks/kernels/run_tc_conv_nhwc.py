"""Check, then time, the sandbox's channels-last bf16 convolutions (tc_conv_nhwc.cu) beside the shipped NCHW ones
(mma.conv_tc / conv_filter_tc) on cifar-wide's 3x3 convolutions: what 16-byte gathers from an NHWC input buy in the
forward ("nhwc": x and w in float32, staged and rounded as now), and what storing them in bf16 adds ("nhwc16":
cp.async straight into the bf16 tiles, forward and filter gradient), before the cuda backend's activations change
layout.

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
import math
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

from mma_cases import conv_expected, conv_filter_expected, nhwc16  # noqa: E402
from run_conv_variants import time_ms  # noqa: E402

from hetnet.backends.cuda.kernels import HERE as CUDA_DIR  # noqa: E402
from hetnet.backends.cuda.kernels import NULL, get_kernel, inline_header  # noqa: E402
from hetnet.backends.cuda import kernels  # noqa: E402
from hetnet.backends.cuda.mma_tiles import CONV_CHOICE, TILES, TILES16, TILES16W, Tc16Tile  # noqa: E402

RTOL_TC_ROUNDED = 1e-4          # tests/conftest.py's: float32 sums of bf16-rounded inputs
TILE_NAMES = CONV_CHOICE["bf16"]


class Kernel:
    """A sandbox kernel: its op ("fwd" or "filter"), entry point, block tile, threads, shared memory, input storage
    ("f32": float32, "bf16": bf16 bits) and the channel count C (and O) must be a multiple of."""

    def __init__(self, op: str, name: str, bm: int, bn: int, threads: int, smem_bytes: int, storage: str,
                 multiple: int):
        self.op, self.name, self.bm, self.bn, self.threads, self.smem_bytes = op, name, bm, bn, threads, smem_bytes
        self.storage, self.multiple = storage, multiple


def _kernels() -> list[Kernel]:
    out = [Kernel("fwd", f"hn_conv_nhwc_fwd_bf16_{t.name}", t.bm, t.bn, t.threads, t.smem_bytes, "f32", 4)
           for t in (next(t for t in TILES if t.precision == "bf16" and t.name == n) for n in TILE_NAMES)]
    for op in ("fwd", "filter"):
        for t in (*TILES16[op], *TILES16W.get(op, ()), *SANDBOX16[op]):
            out.append(Kernel(op, t.conv_kernel(op), t.bm, t.bn, t.threads, t.smem_bytes, "bf16", 8))
    return out


# tc_conv_nhwc.cu's HN_CONV16 tiles that do not ship: the forward on one block per SM, BK = 64, 128 x 256
SANDBOX16 = {"fwd": (Tc16Tile(128, 128, 32, 64, 32, 4), Tc16Tile(128, 128, 64, 64, 32, 3),
                     Tc16Tile(128, 128, 64, 64, 32, 3, 2), Tc16Tile(128, 256, 32, 64, 64, 3)),
             "filter": (Tc16Tile(128, 128, 64, 64, 32, 3),)}


def source_text() -> str:
    """The sandbox with mma.cu as the backend compiles it (its generated entry points included)."""
    return SOURCE.read_text().replace('#include "mma.cu"', kernels.cu_text("mma"))


KERNELS = _kernels()
# cifar-wide's 3x3 convolutions at pad 1 (benchmarks/specs/cifar-wide.json): (C, H, W, O)
SHAPES = {"conv2": (64, 32, 32, 128), "conv3": (128, 16, 16, 128), "conv4": (128, 16, 16, 256),
          "conv5": (256, 8, 8, 256), "conv6": (256, 4, 4, 256)}
# small shapes for the emulator, (n, C, H, W, O, R, S, stride, pad) (each kernel takes those whose C and O it can):
# tails in M, N and K, stride 2, 1x1, 5x5
EMU_SHAPES = [(2, 8, 5, 7, 12, 3, 3, 1, 1), (1, 4, 6, 6, 70, 1, 1, 1, 0), (3, 12, 9, 8, 20, 3, 3, 2, 1),
              (3, 16, 9, 8, 24, 3, 3, 2, 1), (2, 16, 7, 7, 32, 5, 5, 1, 2), (1, 36, 4, 4, 130, 3, 3, 1, 1),
              (1, 40, 4, 4, 136, 3, 3, 1, 1), (4, 8, 6, 6, 8, 3, 3, 1, 1)]


def _nhwc(k: Kernel, a: np.ndarray) -> np.ndarray:
    """a [n][C][H][W] (or w [O][C][R][S]) channels last, as kernel k reads it: float32 or bf16 bits."""
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1)) if k.storage == "f32" else nhwc16(a)


def fits(k: Kernel, shape) -> bool:
    _, c, _, _, o, *_ = shape
    return c % k.multiple == 0 and (k.op == "fwd" or o % k.multiple == 0)


class Case:
    """One launch of kernel k on shape (n, C, H, W, O, R, S, stride, pad) from float32 NCHW x, w (fwd: y = act(conv(x,
    w) + b)) or x, dy, dw0 (filter: dw = dw0 + dE/dw, K split in `splits` parts): the arguments, the output, the
    float64 result of the bf16-rounded inputs (`expected()`, in the output's layout)."""

    def __init__(self, k: Kernel, shape, x, w=None, b=None, act=0, dy=None, dw0=None, splits=1):
        n, c, h, wd, o, r, s, stride, pad = shape
        p, q = (h + 2 * pad - r) // stride + 1, (wd + 2 * pad - s) // stride + 1
        self.k, self.shape, self.x, self.w, self.b, self.act, self.dy, self.dw0 = k, shape, x, w, b, act, dy, dw0
        if k.op == "fwd":
            m, nn, kk = o, n * p * q, r * s * c
            self.ins = (_nhwc(k, x), _nhwc(k, w), b)
            self.out0 = np.full((n, o, p, q), np.nan, np.float32)
            parts, kchunk = 1, kk
        else:
            m, nn, kk = o, r * s * c, n * p * q
            self.ins = (_nhwc(k, x), _nhwc(k, dy), None)
            self.out0 = np.ascontiguousarray(dw0.transpose(0, 2, 3, 1))
            kchunk = math.ceil(math.ceil(kk / splits) / 32) * 32      # whole K tiles per part
            parts = math.ceil(kk / kchunk)
        self.grid = (-(-nn // k.bn), -(-m // k.bm), parts)
        self.ints = (m, nn, kk, c, h, wd, r, s, p, q, o, stride, pad, act, parts, kchunk)

    def expected(self) -> np.ndarray:
        stride, pad = self.shape[7:]
        if self.k.op == "fwd":
            return conv_expected(self.x, self.w, self.b, stride, pad, self.act, "bf16")
        return conv_filter_expected(self.dy, self.x, self.dw0, self.shape, "bf16").transpose(0, 2, 3, 1)


def random_case(rng, k: Kernel, shape, bias: bool = False, act: int = 0, splits: int = 1, scale: float = 1.0) -> Case:
    n, c, h, w, o, r, s, stride, pad = shape
    p, q = (h + 2 * pad - r) // stride + 1, (w + 2 * pad - s) // stride + 1
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    if k.op == "fwd":
        return Case(k, shape, x, (rng.standard_normal((o, c, r, s)) * scale).astype(np.float32),
                    rng.standard_normal(o).astype(np.float32) if bias else None, act)
    return Case(k, shape, x, dy=(rng.standard_normal((n, o, p, q)) * scale).astype(np.float32),
                dw0=rng.standard_normal((o, c, r, s)).astype(np.float32), splits=splits)


def _rel(got, want) -> float:
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def emulate() -> int:
    """Compile the sandbox against the CPU emulator and check every kernel on EMU_SHAPES; 0 when all agree."""
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        lib, src = Path(tmp) / "libnhwc.so", Path(tmp) / "nhwc.cc"
        src.write_text(source_text())
        cmd = ["g++", "-std=c++17", "-O1", "-shared", "-fPIC", "-Wno-unknown-pragmas", "-include",
               str(EMU_DIR / "cuda_emu.h"), "-DHN_EMULATE", "-I", str(CUDA_DIR), "-x", "c++", str(src),
               str(EMU_DIR / "gemm_launch.cpp"), "-o", str(lib)]
        subprocess.run(cmd, check=True)
        emu = ctypes.CDLL(str(lib))
        c_ = ctypes

        def buf(a):
            return (c_.c_void_p(None), c_.c_longlong(0)) if a is None else (c_.c_void_p(a.ctypes.data),
                                                                           c_.c_longlong(a.nbytes))

        failed = checked = 0
        for shape in EMU_SHAPES:
            for k in KERNELS:
                if not fits(k, shape):
                    continue
                variants = ((True, 1, 1), (False, 0, 1)) if k.op == "fwd" else ((False, 0, 1), (False, 0, 3))
                for bias, act, splits in variants:
                    case = random_case(rng, k, shape, bias, act, splits)
                    out = case.out0.copy()
                    err = c_.create_string_buffer(1024)
                    rc = emu.emu_conv(c_.cast(getattr(emu, k.name), c_.c_void_p), *(c_.c_uint(v) for v in case.grid),
                                      c_.c_uint(k.threads), c_.c_int(k.smem_bytes), *buf(case.ins[0]),
                                      *buf(case.ins[1]), *buf(case.ins[2]), *buf(out),
                                      *(c_.c_int(v) for v in case.ints), c_.c_uint(1), err, c_.c_int(len(err)))
                    where = f"{k.name} {shape} bias {bias} act {act} splits {case.grid[2]}"
                    checked += 1
                    if rc != 0:
                        print(f"{where}: emulator error: {err.value.decode()}")
                        failed += 1
                        continue
                    rel = _rel(out, case.expected())
                    ok = bool(np.all(np.isfinite(out))) and rel <= RTOL_TC_ROUNDED
                    failed += not ok
                    print(f"{where}: relative error {rel:.2e} {'ok' if ok else 'FAILED'}")
        print(f"all {checked} agree" if not failed else f"{failed} of {checked} failed")
        return 1 if failed else 0


def on_gpu(batch: int, out: str | None) -> int:
    import cupy

    from hetnet.backends.cuda import mma
    from hetnet.bench.common import environment
    from hetnet.device import get_backend

    be = get_backend("cuda", "bf16")
    spin = get_kernel(be.device_id, "elementwise", "hn_spin")

    def _time(launch) -> float:       # us per launch
        return 1000 * time_ms(cupy, spin, launch)

    text = inline_header(source_text())
    module = kernels.compile_module(be.device_id, text, sm90a=True)
    wgmma = kernels.built_for_sm90a(module)
    rng = np.random.default_rng(0)
    rows, failed = [], 0
    print(f"{be.gpu_name}, bf16, batch {batch}: us per call; NCHW = mma.conv_tc's (conv_filter_tc's) best tile; ratio "
          "= NCHW / kernel (in brackets with its inputs' layout change: the NCHW -> NHWC transpose, and for nhwc16 "
          "a write of 2 bytes per element)")
    for layer, (c, h, w, o) in SHAPES.items():
        shape = (batch, c, h, w, o, 3, 3, 1, 1)
        for op in ("fwd", "filter"):
            ks = [k for k in KERNELS if k.op == op and fits(k, shape) and (wgmma or "_w" not in k.name)]
            case = random_case(rng, ks[0], shape, scale=0.05)
            gx = cupy.asarray(case.x)
            if op == "fwd":
                gw, gy = cupy.asarray(case.w), cupy.empty(case.out0.shape, np.float32)
                nchw = min(_time(lambda t=t: mma.conv_tc(be, gy, gx, gw, None, 1, 1, 0, t)) for t in TILE_NAMES)
                inputs = [gx]
            else:
                gdy, gdw = cupy.asarray(case.dy), cupy.asarray(case.dw0)
                nchw = min(_time(lambda t=t: mma.conv_filter_tc(be, gdw, gdy, gx, 1, 1, t)) for t in TILE_NAMES)
                inputs = [gx, gdy]
            small = Case(ks[0], (2, *shape[1:]), case.x[:2], case.w, None, 0,
                         None if case.dy is None else case.dy[:2], case.dw0)
            want = small.expected()
            for k in ks:
                if k.storage == "f32":
                    layout = sum(_time(lambda a=a: cupy.ascontiguousarray(a.transpose(0, 2, 3, 1))) for a in inputs)
                else:
                    layout = sum(_time(lambda a=a: cupy.ascontiguousarray(a.transpose(0, 2, 3, 1)).astype(cupy.float16))
                                 for a in inputs)
                kern = module.get_function(k.name)
                kern.max_dynamic_shared_size_bytes = k.smem_bytes
                # the filter gradient's K split so that about two blocks per SM run (its M x N grid is small)
                blocks = math.ceil(9 * c / k.bn) * math.ceil(o / k.bm)
                splits = max(1, 2 * be.sms // blocks) if op == "filter" else 1

                def launcher(c_, kern=kern, k=k):
                    """A launch of case c_ on GPU copies of its inputs and output (returned with it)."""
                    gins = [None if a is None else cupy.asarray(a) for a in c_.ins]
                    gout = cupy.asarray(c_.out0)
                    args = (gins[0], gins[1], NULL, gout, *(np.int32(v) for v in c_.ints))
                    return (lambda: kern(c_.grid, (k.threads,), args, shared_mem=k.smem_bytes)), gout

                check = Case(k, small.shape, small.x, small.w, None, 0, small.dy, small.dw0, splits)
                run_check, gout = launcher(check)
                run_check()
                got = gout.get()
                rel = _rel(got, want)
                if not (np.all(np.isfinite(got)) and rel <= RTOL_TC_ROUNDED):
                    print(f"  {layer} {k.name}: relative error {rel:.2e} against float64: FAILED, not timed")
                    failed += 1
                    continue
                full = Case(k, shape, case.x, case.w, None, 0, case.dy, case.dw0, splits)
                launch, _ = launcher(full)
                t = _time(launch)
                row = {"layer": layer, "op": op, "shape": [batch, c, h, w, o], "kernel": k.name,
                       "splits": full.grid[2], "nchw_us": nchw, "us": t, "layout_us": layout, "check_rel_err": rel,
                       "tflops": 2 * batch * h * w * o * c * 9 / t / 1e6}
                rows.append(row)
                print(f"  {layer} {op:6s} {k.name:38s} NCHW {nchw:8.1f}  {t:8.1f} ({t + layout:8.1f})  "
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
