"""Check, then time, the tensor-core GEMM tiles (src/hetnet/backends/cuda/mma.cu via mma.gemm_tc) on a GPU, beside
cuBLAS (CudaBackend.gemm in float32 and with TF32 allowed) and, where torch is installed, torch.matmul in bf16.

Two sets of problems, each in the four operand orders and both precisions:
  small: every (M, N, K) from {1, 7, 33, 127, 128, 129, 1000}^3, each tile and the launcher's choice: checked only
         (a table of failures, none expected);
  conv:  the GEMMs of cifar-wide's convolutions (benchmarks/specs/cifar-wide.json) through im2col at --batch
         (default 512), as conv.py issues them: forward yk[K, NPQ] = w[K, CRS] col[CRS, NPQ] (nn), data gradient
         dcol[CRS, NPQ] = w^T dyk (tn), filter gradient dw[K, CRS] += dyk col^T (nt, beta = 1): checked, then timed.
Each check draws fresh random inputs, poisons C with NaN when beta = 0, and compares with float64 (NumPy for the
small set; CuPy float64 on the GPU for the conv set) within GEMM_RTOL (hetnet.bench.common: tf32 1e-3, bf16 1e-2)
of ||C|| for the conv set, and of || |op(A)| |op(B)| || for the small set (a single dot product of a few random
terms can cancel to far below its terms, and its rounding error is relative to the terms; any wrong index is an
error of order 1 either way). A candidate that fails is reported and never timed. Timing: CUDA events around REPS back-to-back calls
queued behind a ~1 ms spin kernel (GPU time only), after WARMUP calls, median of SAMPLES. Our kernels read float32
and write float32; torch's bf16 peer reads and writes bf16 (half the bytes), as a PyTorch user's autocast GEMM does.

    PYTHONPATH=src python benchmarks/kernels/run_tc_gemm.py                          # both sets, JSON to --out
    PYTHONPATH=src python benchmarks/kernels/run_tc_gemm.py --sets conv --precisions bf16 --layers 2 3
    PYTHONPATH=src python benchmarks/kernels/run_tc_gemm.py --list                   # the problems; no GPU needed
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

from hetnet.backends.cuda.mma_tiles import LAYOUTS, PRECISIONS, TILES
from hetnet.bench.common import GEMM_RTOL, environment, write_result

WARMUP, REPS, SAMPLES = 3, 5, 7
SMALL_SIZES = (1, 7, 33, 127, 128, 129, 1000)
SPEC = ROOT / "benchmarks" / "specs" / "cifar-wide.json"


def conv_layers(spec_path: Path = SPEC) -> list[dict]:
    """The 3x3 convolutions of a Sequential spec as {name, c, k, hw} (the input's spatial size, tracked through the
    max-pools; stride 1, padding 1 keep it), distinct shapes only."""
    spec = json.loads(spec_path.read_text())
    hw, seen, out = spec["input_shape"][1], set(), []
    for layer in spec["layers"]:
        if layer["type"] == "Conv2D":
            assert layer["kernel_size"] == 3 and layer.get("padding") == 1 and layer.get("stride", 1) == 1, layer
            key = (layer["in_channels"], layer["out_channels"], hw)
            if key not in seen:
                seen.add(key)
                out.append({"name": f"conv{len(out) + 1} {key[0]}->{key[1]} {hw}x{hw}", "c": key[0], "k": key[1],
                            "hw": hw})
        elif layer["type"] == "MaxPool2D":
            hw //= layer["kernel_size"]
    return out


def conv_gemms(batch: int, layers: list[dict]) -> list[dict]:
    """conv.py's im2col GEMMs of each layer: (op, layout, M, N, K, beta)."""
    rows = []
    for i, lay in enumerate(layers):
        crs, npq, k = lay["c"] * 9, batch * lay["hw"] ** 2, lay["k"]
        for op, layout, m, n, kk, beta in (("fwd", "nn", k, npq, crs, 0.0), ("data", "tn", crs, npq, k, 0.0),
                                           ("filter", "nt", k, crs, npq, 1.0)):
            rows.append({"layer": i + 1, "name": lay["name"], "op": op, "layout": layout, "m": m, "n": n, "k": kk,
                         "beta": beta, "gflop": 2e-9 * m * n * kk})
    return rows


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", nargs="+", choices=["small", "conv"], default=["small", "conv"])
    ap.add_argument("--precisions", nargs="+", choices=list(PRECISIONS), default=list(PRECISIONS))
    ap.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS),
                    help="operand orders of the small set (the conv set has its own)")
    ap.add_argument("--batch", type=int, default=512, help="batch size of the conv set (default 512)")
    ap.add_argument("--layers", type=int, nargs="+", default=None, metavar="I", help="conv layers (1-based)")
    ap.add_argument("--no-torch", action="store_true", help="leave out torch's bf16 peer")
    ap.add_argument("--out", default=None, help="write the rows as JSON (card, commit, date)")
    ap.add_argument("--list", action="store_true", help="print the problems and stop (no GPU needed)")
    args = ap.parse_args(argv)
    if args.batch < 1:
        ap.error("--batch: must be >= 1")
    return args


def selected_gemms(args) -> list[dict]:
    layers = conv_layers()
    rows = conv_gemms(args.batch, layers)
    if args.layers:
        bad = [i for i in args.layers if not 1 <= i <= len(layers)]
        if bad:
            raise ValueError(f"--layers: {bad} not in 1..{len(layers)}")
        rows = [r for r in rows if r["layer"] in args.layers]
    return rows


class Gpu:
    """The GPU side: backend, spin kernel, timing, random data, float64 references."""

    def __init__(self):
        import cupy

        from hetnet.backends.cuda.kernels import get_kernel
        from hetnet.device import get_backend

        self.cp, self.be = cupy, get_backend("cuda")
        self.spin = get_kernel(self.be.device_id, "elementwise", "hn_spin")
        self.rng = cupy.random.default_rng(int(time.time()))

    def time_ms(self, fn) -> float:
        cp = self.cp
        for _ in range(WARMUP):
            fn()
        times = []
        for _ in range(SAMPLES):
            self.spin((1,), (1,), (np.int64(2_000_000),))
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record()
            for _ in range(REPS):
                fn()
            end.record()
            end.synchronize()
            times.append(cp.cuda.get_elapsed_time(start, end) / REPS)
        return float(np.median(times))

    def rand(self, *shape):
        return self.rng.standard_normal(shape, dtype=np.float32)

    def operands(self, layout, m, n, k):
        """Fresh stored matrices for op(a) [m, k] and op(b) [k, n] in `layout`."""
        ta, tb = layout[0] == "t", layout[1] == "t"
        return self.rand(*((k, m) if ta else (m, k))), self.rand(*((n, k) if tb else (k, n))), ta, tb

    def reference(self, a, ta, b, tb, c0, beta):
        cp = self.cp
        a64, b64 = a.astype(cp.float64), b.astype(cp.float64)
        out = (a64.T if ta else a64) @ (b64.T if tb else b64)
        return out + beta * c0.astype(cp.float64) if beta else out

    def error(self, got, want) -> float:
        cp = self.cp
        if not bool(cp.isfinite(got).all()):
            return math.inf
        return float(cp.linalg.norm(got.astype(cp.float64) - want) / max(float(cp.linalg.norm(want)), 1e-30))


def run_small(gpu, args) -> list[dict]:
    """Every tile (and the launcher's choice) on every small shape: checked against NumPy float64."""
    from hetnet.backends.cuda import mma as mm

    cp, rows, rng = gpu.cp, [], np.random.default_rng()
    for precision, layout in itertools.product(args.precisions, args.layouts):
        ta, tb = layout[0] == "t", layout[1] == "t"
        names = [None] + [t.name for t in mm.tiles_of(precision)]
        for m, n, k in itertools.product(SMALL_SIZES, repeat=3):
            a = rng.standard_normal((k, m) if ta else (m, k)).astype(np.float32)
            b = rng.standard_normal((n, k) if tb else (k, n)).astype(np.float32)
            a64, b64 = (a.T if ta else a).astype(np.float64), (b.T if tb else b).astype(np.float64)
            want, scale = a64 @ b64, max(float(np.linalg.norm(np.abs(a64) @ np.abs(b64))), 1e-30)
            ga, gb = cp.asarray(a), cp.asarray(b)
            for tile in names:
                gc = cp.full((m, n), np.nan, np.float32)
                mm.gemm_tc(gpu.be, gc, ga, ta, gb, tb, precision=precision, tile=tile)
                got = cp.asnumpy(gc).astype(np.float64)
                err = float(np.linalg.norm(got - want)) / scale if np.isfinite(got).all() else math.inf
                rows.append({"set": "small", "precision": precision, "layout": layout, "m": m, "n": n, "k": k,
                             "tile": tile or "choice", "rel_err": err, "ok": err <= GEMM_RTOL[precision]})
    return rows


def torch_peer(gpu, layout, a, b, c):
    """torch.matmul in bf16 on copies of a, b (same orientation, transposes as views), writing a bf16 c."""
    import torch

    def bf(x):
        return torch.as_tensor(x, device="cuda").to(torch.bfloat16)

    ta, tb, tc = bf(a), bf(b), torch.empty(c.shape, device="cuda", dtype=torch.bfloat16)
    opa = ta.t() if layout[0] == "t" else ta
    opb = tb.t() if layout[1] == "t" else tb
    return lambda: torch.matmul(opa, opb, out=tc)


def run_conv(gpu, args) -> list[dict]:
    """Each conv GEMM (conv_rows), its arrays freed before the next."""
    use_torch = not args.no_torch
    if use_torch:
        try:
            import torch

            use_torch = torch.cuda.is_available()
        except ImportError:
            use_torch = False
    rows = []
    for g in selected_gemms(args):
        rows += conv_rows(gpu, g, args.precisions, use_torch)
        gpu.cp.get_default_memory_pool().free_all_blocks()
    return rows


def conv_rows(gpu, g: dict, precisions, use_torch: bool) -> list[dict]:
    """One conv GEMM: our tiles (each, and the launcher's choice with its split-K), cuBLAS fp32 and TF32, torch
    bf16; checked, then timed."""
    from hetnet.backends.cuda import mma as mm

    cp, be, rows = gpu.cp, gpu.be, []
    layout, m, n, k, beta = g["layout"], g["m"], g["n"], g["k"], g["beta"]
    a, b, ta, tb = gpu.operands(layout, m, n, k)
    c0 = gpu.rand(m, n)
    c = cp.empty_like(c0)
    want = gpu.reference(a, ta, b, tb, c0, beta)

    def ours(precision, tile):
        return lambda: mm.gemm_tc(be, c, a, ta, b, tb, 1.0, beta, precision, tile)

    def cublas(tf32):
        def run():
            be.tf32 = tf32
            be.gemm(c, a, ta, b, tb, 1.0, beta)
        return run

    cands = {(f"tc-{p}", t or "choice"): (p, ours(p, t)) for p in precisions
             for t in [None] + [x.name for x in mm.tiles_of(p)]}
    cands[("cublas-fp32", "")] = ("fp32", cublas(False))
    cands[("cublas-tf32", "")] = ("tf32", cublas(True))
    for (side, tile), (precision, fn) in cands.items():
        c[...] = c0 if beta else np.nan
        fn()
        err = gpu.error(c, want)
        row = {"set": "conv", **g, "side": side, "tile": tile, "precision": precision, "rel_err": err,
               "ok": err <= GEMM_RTOL.get(precision, 1e-4)}
        if side.startswith("tc-") and tile == "choice":
            call = mm.plan(c, a, ta, b, tb, 1.0, beta, precision, be.sms)
            row["choice"] = f"{call.tile.name}/{call.splits}"
        if row["ok"]:
            c[...] = c0    # beta = 1 rows accumulate into c while timed: keep its values bounded
            row["ms"] = gpu.time_ms(fn)
            row["tflops"] = g["gflop"] / row["ms"]
        rows.append(row)
    be.tf32 = False
    if use_torch:
        ms = gpu.time_ms(torch_peer(gpu, layout, a, b, c))
        rows.append({"set": "conv", **g, "side": "torch-bf16", "tile": "", "precision": "bf16", "ok": True,
                     "ms": ms, "tflops": g["gflop"] / ms})
    return rows


def summary(rows: list[dict]) -> str:
    """The short table: per conv GEMM, TFLOP/s of cuBLAS, torch and, per precision, our best tile and the launcher's
    choice (tile/splits); failures of either set."""
    out = []
    conv = [r for r in rows if r["set"] == "conv"]
    if conv:
        cols = [("cublas-fp32", "best"), ("cublas-tf32", "best"), ("torch-bf16", "best")]
        cols = [c for c in cols if any(r["side"] == c[0] for r in conv)]
        for side in sorted({r["side"] for r in conv if r["side"].startswith("tc-")}):
            cols += [(side, "best"), (side, "choice")]
        out.append("TFLOP/s per conv GEMM (tc-<precision>: the fastest tile, and the launcher's choice)")
        out.append(f"{'layer':<24s}{'op':<7s}{'M x N x K':>20s}" + "".join(
            f"{s + (' choice' if what == 'choice' else ''):>26s}" for s, what in cols))
        order = {"fwd": 0, "data": 1, "filter": 2}
        keys = sorted({(r["layer"], r["name"], r["op"], r["m"], r["n"], r["k"]) for r in conv},
                      key=lambda key: (key[0], order[key[2]]))
        for key in keys:
            mine = [r for r in conv if (r["layer"], r["name"], r["op"], r["m"], r["n"], r["k"]) == key]
            cells = []
            for side, what in cols:
                cand = [r for r in mine if r["side"] == side and (what == "best" or r["tile"] == "choice")]
                bad = [r["tile"] or side for r in cand if not r["ok"]]
                if bad:
                    cells.append("FAIL " + ",".join(bad))
                elif not cand:
                    cells.append("-")
                else:
                    best = max(cand, key=lambda r: r["tflops"])
                    label = best.get("choice", best["tile"])
                    cells.append(f"{best['tflops']:.1f}" + (f" {label}" if label else ""))
            out.append(f"{key[1]:<24s}{key[2]:<7s}{f'{key[3]}x{key[4]}x{key[5]}':>20s}"
                       + "".join(f"{x:>26s}" for x in cells))
    small = [r for r in rows if r["set"] == "small"]
    if small:
        bad = [r for r in small if not r["ok"]]
        out.append(f"small set: {len(small)} checks, {len(bad)} over tolerance")
        for r in bad[:20]:
            out.append(f"  FAIL {r['precision']} {r['layout']} {r['tile']} {r['m']}x{r['n']}x{r['k']} "
                       f"err {r['rel_err']:.2e}")
    return "\n".join(out)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        selected_gemms(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.list:
        if "small" in args.sets:
            print(f"small: {len(SMALL_SIZES) ** 3} shapes x {len(args.layouts)} layouts x {len(args.precisions)} "
                  f"precisions x {1 + len(TILES) // len(PRECISIONS)} candidates, checked only")
        if "conv" in args.sets:
            for g in selected_gemms(args):
                print(f"conv: {g['name']:<24s} {g['op']:<7s} {g['layout']} {g['m']} x {g['n']} x {g['k']} "
                      f"beta {g['beta']:g}  {g['gflop']:.1f} GFLOP")
        return 0
    gpu = Gpu()
    print(f"{gpu.be.gpu_name}: tiles {', '.join(sorted({t.precision + ' ' + t.name for t in TILES}))}", flush=True)
    rows = []
    if "conv" in args.sets:
        rows += run_conv(gpu, args)
    if "small" in args.sets:
        rows += run_small(gpu, args)
    if args.out:
        doc = {"environment": environment(threads=1, want_gpu=True), "method": __doc__.split("\n\n")[1],
               "tolerance": GEMM_RTOL, "rows": rows}
        write_result(Path(args.out), doc)
    print(summary(rows))
    return 1 if any(not r["ok"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
