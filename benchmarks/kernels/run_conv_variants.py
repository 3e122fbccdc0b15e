"""Check, then time, implicit-GEMM convolution tiles on a GPU: the numbered variants that do not ship
(conv_variants.py) beside the tiles that do (src/hetnet/backends/cuda/conv_tiles.py, marked *).

For each layer shape and op (fwd: forward with bias + ReLU; data: data gradient with the ReLU mask; filter: filter
and bias gradients), every tile that fits runs at each reduction split the launcher would try (conv.py's
candidates), first once against the float64 reference (hetnet.backends.reference) within the float32 tolerance (a
candidate that fails is reported, never timed), then timed: CUDA events around REPS back-to-back launches queued
behind a ~1 ms spin kernel (GPU time only, as conv.py's `_choose`), after WARMUP launches, median of SAMPLES; no L2
flush (as in the training step, where a layer's inputs were just written). One table per shape and op, fastest
first, with TFLOP/s (2 * N*P*Q * K * C*R*S per op).

    PYTHONPATH=src python benchmarks/kernels/run_conv_variants.py                     # all tiles, batch 32
    PYTHONPATH=src python benchmarks/kernels/run_conv_variants.py --batch 1024 --ops fwd --only 2 7 13 15
    PYTHONPATH=src python benchmarks/kernels/run_conv_variants.py --out /tmp/conv_variants.json
    PYTHONPATH=src python benchmarks/kernels/run_conv_variants.py --emit /tmp/conv_variants.cu    # no GPU needed

--emit writes the CUDA text of the selected tiles (compile with nvcc -I src/hetnet/backends/cuda -Xptxas -v).
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))            # conv_variants
sys.path.insert(0, str(HERE.parent))     # conv_algos (its layer shapes)

from conv_algos import SHAPES as CONV_SHAPES
from conv_variants import VARIANTS

from hetnet.backends import reference as ref
from hetnet.backends.cuda import conv as C
from hetnet.backends.cuda.conv_tiles import OPS, TILES, Tile, instantiations
from hetnet.backends.cuda.kernels import HERE as CUDA_DIR
from hetnet.backends.cuda.kernels import inline_header
from hetnet.bench.common import RTOL_F32, environment
from hetnet.files import atomic_write_text

WARMUP, REPS, SAMPLES = 3, 10, 9
# name: (C, H, W, K, kernel, padding): conv_algos.py's 3x3 convolutions and the dense layers (1x1 convolutions of
# 1x1 images) of mlp and thesis-m1
SHAPES = {name.replace(" ", "-"): (c, h, w, k, 3, 1) for name, (c, h, w, k) in CONV_SHAPES.items()}
SHAPES.update({"mlp-fc2": (512, 1, 1, 256, 1, 0), "mlp-fc3": (256, 1, 1, 10, 1, 0),
               "thesis-m1-fc1": (2048, 1, 1, 100, 1, 0), "thesis-m1-fc2": (100, 1, 1, 10, 1, 0)})


def all_tiles() -> list[Tile]:
    """The shipped tiles and the variants, by op and number."""
    return sorted(TILES + VARIANTS, key=lambda t: (list(OPS).index(t.op), t.number))


def sandbox_text(tiles) -> str:
    """conv.cu with the entry points of `tiles`, numbered (conv_fwd_v<number>_<name>), as nvcc compiles it (with -I
    the cuda folder); NVRTC gets it with the header inlined."""
    return (CUDA_DIR / "conv.cu").read_text() + "\n" + instantiations(tiles, numbered=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[32], help="batch sizes (default 32)")
    ap.add_argument("--ops", nargs="+", choices=list(OPS), default=list(OPS))
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES), metavar="SHAPE",
                    help="layer shapes (default all): " + ", ".join(SHAPES))
    ap.add_argument("--only", type=int, nargs="+", default=None, metavar="N", help="these variant numbers only")
    ap.add_argument("--variants-only", action="store_true", help="leave out the shipped tiles")
    ap.add_argument("--out", default=None, help="write the rows as JSON (card, commit, date)")
    ap.add_argument("--emit", default=None, help="write the selected tiles' CUDA text to this file and stop")
    args = ap.parse_args(argv)
    if any(b < 1 for b in args.batch):
        ap.error("--batch: batch sizes must be >= 1")
    return args


def select(args) -> list[Tile]:
    return [t for t in all_tiles() if t.op in args.ops and (args.only is None or t.number in args.only)
            and not (args.variants_only and t in TILES)]


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(HERE), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| (as tests/conftest.py), inf for non-finite a."""
    a = np.asarray(a, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)) if np.all(np.isfinite(a)) else math.inf


class Layer:
    """One shape's float32 inputs on the GPU and its float64 reference results."""

    def __init__(self, be, rng, n, c, h, w, k, r, pad):
        self.be, self.g = be, C.Geometry(n, c, h, w, k, r, r, 1, pad)

        def f32(*shape, scale=1.0):
            return (rng.standard_normal(shape) * scale).astype(np.float32)

        x, wt, b = f32(n, c, h, w), f32(k, c, r, r, scale=1 / math.sqrt(c * r * r)), f32(k)
        relu_x = f32(n, c, h, w)
        y, cache = ref.conv2d_forward(x, wt, b, 1, pad)
        dy = f32(*y.shape)
        self.dw_ref, self.db_ref = np.zeros(wt.shape), np.zeros(k)
        self.dx_ref = ref.conv2d_backward(dy, cache, self.dw_ref, self.db_ref) * (relu_x > 0)
        self.y_ref = np.maximum(y, 0)
        self.x, self.w, self.b, self.dy, self.relu_x = (be.asarray(a) for a in (x, wt, b, dy, relu_x))
        self.out = {"fwd": be.xp.empty(y.shape, np.float32), "data": be.xp.empty(x.shape, np.float32)}
        self.dw, self.db = be.xp.zeros(wt.shape, np.float32), be.xp.zeros(k, np.float32)

    def launch(self, t: Tile, kern, splits: int) -> None:
        be, g = self.be, self.g
        if t.op == "fwd":
            C.fwd_implicit(be, t, kern, splits, g, self.x, self.w, self.b, self.out["fwd"], 1)
        elif t.op == "data":
            C.data_implicit(be, t, kern, splits, g, self.dy, self.w, self.out["data"], self.relu_x)
        else:
            C.filter_implicit(be, t, kern, g, self.dy, self.x, self.dw, self.db, splits)

    def candidates(self, t: Tile, kern) -> dict:
        """{label: launch} of tile t at each reduction split conv.py tries ("", then "/<splits>")."""
        return {("" if i == 0 else f"/{sp}"): (lambda sp=sp: self.launch(t, kern, sp))
                for i, sp in enumerate(C.tile_splits(self.be, t, self.g))}

    def error(self, op: str, launch) -> float:
        """The relative error of one launch against the reference (the filter gradient's of dw and db, the
        larger; it accumulates, so from zero)."""
        be = self.be
        if op == "filter":
            self.dw.fill(0)
            self.db.fill(0)
            launch()
            return max(rel_err(be.to_numpy(self.dw), self.dw_ref), rel_err(be.to_numpy(self.db), self.db_ref))
        self.out[op].fill(np.nan)
        launch()
        return rel_err(be.to_numpy(self.out[op]), self.y_ref if op == "fwd" else self.dx_ref)

    def flops(self) -> float:
        g = self.g
        return 2.0 * g.npq * g.k * g.crs


def gpu_runner(doc: str, argv, precision: str):
    """The one-shape sandbox runners' start (run_conv_small.py, time_pool_grad.py): --batch and
    --out parsed (the description: doc's first paragraph), then (args, cupy, the cuda backend at `precision`, the
    spin kernel time_ms queues launches behind)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--out", type=Path, default=None, help="write the times as JSON")
    args = ap.parse_args(argv)
    import cupy

    from hetnet.backends.cuda.kernels import get_kernel
    from hetnet.device import get_backend

    be = get_backend("cuda", precision)
    return args, cupy, be, get_kernel(be.device_id, "elementwise", "hn_spin")


def add_row(rows: list, row: dict) -> None:
    """A runner's row kept for write_rows and printed as key=value pairs."""
    rows.append(row)
    print(" ".join(f"{key}={v}" for key, v in row.items()), flush=True)


def write_rows(args, doc: str, rows: list) -> None:
    """gpu_runner's --out, where given: the rows as JSON beside the card, hetnet's commit and the date, the batch and
    the method (doc's first paragraph)."""
    from hetnet.bench.common import environment, write_result

    if args.out:
        write_result(args.out, {"environment": environment(threads=1, want_gpu=True), "batch": args.batch,
                                "method": " ".join(doc.split("\n\n")[0].split()), "rows": rows})


def time_ms(cupy, spin, launch) -> float:
    """Median GPU ms of one launch (see the module's docstring)."""
    for _ in range(WARMUP):
        launch()
    times = []
    for _ in range(SAMPLES):
        spin((1,), (1,), (np.int64(2_000_000),))
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        for _ in range(REPS):
            launch()
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end) / REPS)
    return float(np.median(times))


def main(argv=None) -> int:
    args = parse_args(argv)
    tiles = select(args)
    if not tiles:
        print("error: --only / --ops / --variants-only leave no tile to run", file=sys.stderr)
        return 2
    if args.emit:
        atomic_write_text(args.emit, sandbox_text(tiles))
        print(f"wrote {len(tiles)} tiles' entry points to {args.emit}")
        return 0
    import cupy

    from hetnet.backends.cuda.kernels import get_kernel
    from hetnet.device import get_backend

    be = get_backend("cuda")
    mod = cupy.RawModule(code=inline_header(sandbox_text(tiles)), options=("-std=c++17",))
    spin = get_kernel(be.device_id, "elementwise", "hn_spin")
    rng, rows, failed = np.random.default_rng(0), [], 0
    print(f"{be.gpu_name}: {len(tiles)} tiles, us per launch (median of {SAMPLES} x {REPS}); * ships; "
          f"err = relative error vs float64 (tolerance {RTOL_F32:g})")
    for name in args.shapes:
        for n in args.batch:
            layer = Layer(be, rng, n, *SHAPES[name])
            for op in args.ops:
                found = []
                for t in (t for t in tiles if t.op == op and t.fits(layer.g.c, layer.g.k)):
                    kern = mod.get_function(t.kernel(numbered=True))
                    for split, launch in layer.candidates(t, kern).items():
                        row = {"shape": name, "batch_size": n, "op": op, "variant": t.number, "tile": t.name + split,
                               "ships": t in TILES, "rel_err": layer.error(op, launch)}
                        row["ok"] = row["rel_err"] <= RTOL_F32
                        if row["ok"]:
                            row["ms"] = time_ms(cupy, spin, launch)
                            row["tflops"] = layer.flops() / row["ms"] / 1e9
                        else:
                            failed += 1
                        found.append(row)
                rows += found
                best = min((r["ms"] for r in found if r["ok"]), default=math.nan)
                print(f"\n{name} n={n} {op}")
                for r in sorted(found, key=lambda r: r.get("ms", math.inf)):
                    mark = "*" if r["ships"] else " "
                    timing = (f"{r['ms'] * 1000:9.1f} us {r['ms'] / best:5.2f}x {r['tflops']:6.2f} TFLOP/s" if r["ok"]
                              else "   FAILED the check: not timed")
                    print(f"  {mark} v{r['variant']:<3d} {r['tile']:16s}{timing}  err {r['rel_err']:.1e}")
    if args.out:
        doc = {"environment": environment(threads=1, want_gpu=True), "commit": _commit(),
               "method": __doc__.split("\n\n")[1].replace("\n", " "), "rows": rows}
        atomic_write_text(args.out, json.dumps(doc, indent=1))
    print(f"\n{len(rows)} candidates checked, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
