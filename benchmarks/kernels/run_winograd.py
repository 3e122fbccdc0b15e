"""Time the sandbox's float32 filter gradient by Winograd's F(3 x 3, 2 x 2) (winograd.cu / winograd.py: the transforms
on CUDA cores, the 16 GEMMs on the cuda backend's fp32 GEMM) against the cuda backend's measured fp32 choice
(conv.conv_backward, which measures its candidates on first use), on cifar-wide's 3x3 convolutions at batch 512.
Each layer: both results against float64 of the direct sum on the batch's first images (relative error within
float32's tolerance, RTOL_F32; one that fails is reported, never timed), then the median GPU time of each
(run_conv_variants.time_ms), the Winograd one with its 16 GEMMs a chunk as 16 sgemm calls and as one batched cuBLAS
call, also split into its transforms and its GEMMs, with its workspace.
The JSON names the card, hetnet's commit and the date.

    HETNET_TUNE_CACHE=0 PYTHONPATH=src python benchmarks/kernels/run_winograd.py [--batch 512] [--out wino.json]
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "tests"))   # mma_cases: the float64 filter gradient
sys.path.insert(0, str(HERE))

# cifar-wide's 3x3 convolutions (benchmarks/specs/cifar-wide.json): (C, H, W, O), pad 1
LAYERS = [(3, 32, 32, 64), (64, 32, 32, 128), (128, 16, 16, 128), (128, 16, 16, 256), (256, 8, 8, 256),
          (256, 4, 4, 256)]
CHECK_IMAGES = 8     # the float64 check's images (the direct sum on the CPU)


def main(argv=None) -> int:
    import winograd as wino
    from mma_cases import conv_filter_expected
    from run_conv_variants import add_row, gpu_runner, time_ms, write_rows

    args, cupy, be, spin = gpu_runner(__doc__, argv, "fp32")
    from hetnet.backends.cuda import conv as C
    from hetnet.bench.common import RTOL_F32

    mod = cupy.RawModule(code=wino.SOURCE.read_text(), options=("-std=c++17",))

    def launch(name, grid, block, kargs):
        mod.get_function(name)(grid, block, kargs)

    def gemm_each(m, u, v, beta):          # the backend's fp32 GEMM (cuBLAS sgemm) on each of the 16
        for xi in range(16):
            be.gemm(m[xi], u[xi], False, v[xi], True, 1.0, beta)

    def gemm_batched(m, u, v, beta):       # one strided-batched cuBLAS call (float32 throughout: CUPY_TF32 unset)
        if beta == 0:
            cupy.matmul(u, v.transpose(0, 2, 1), out=m)
        else:
            m += cupy.matmul(u, v.transpose(0, 2, 1))

    gemms = {"winograd": gemm_each, "winograd_batched": gemm_batched}

    rng = np.random.default_rng(0)
    rows = []
    for c, h, w, o in LAYERS:
        n = args.batch
        x = cupy.asarray(rng.standard_normal((n, c, h, w)).astype(np.float32))
        dy = cupy.asarray(rng.standard_normal((n, o, h, w)).astype(np.float32))
        wt = cupy.zeros((o, c, 3, 3), np.float32)              # (its shape only: need_dx is off)
        dw = cupy.zeros((o, c, 3, 3), np.float32)
        k = CHECK_IMAGES
        want = conv_filter_expected(cupy.asnumpy(dy[:k]), cupy.asnumpy(x[:k]), np.zeros((o, c, 3, 3)),
                                    (k, c, h, w, o, 3, 3, 1, 1))
        th, tw = wino.tiles(h, w)
        nb = wino.chunk_images(n, c, o, th, tw)
        sides = {"hetnet": lambda x_, dy_: C.conv_backward(be, dy_, x_, wt, dw, None, 1, 1, need_dx=False)}
        for name, gemm in gemms.items():
            sides[name] = lambda x_, dy_, gemm=gemm: wino.filter_gradient(cupy, launch, gemm, dw, x_, dy_, 1,
                                                                          add=True, sms=be.sms)
        row = {"layer": f"{c}x{h}x{w}->{o}", "batch": n, "winograd_chunk_images": nb,
               "winograd_workspace_mib": round(16 * (c + o) * nb * th * tw * 4 / 2**20, 1)}
        for name, run in sides.items():
            dw.fill(0)
            run(x[:k], dy[:k])
            err = float(np.linalg.norm(cupy.asnumpy(dw) - want) / np.linalg.norm(want))
            row[f"{name}_rel_err"] = err
            if err <= RTOL_F32:
                row[f"{name}_ms"] = round(time_ms(cupy, spin, lambda run=run: run(x, dy)), 4)
        if "winograd_ms" in row:                                # its parts: the transforms alone, the GEMMs alone
            t = nb * th * tw
            v, u = cupy.empty((16, c, t), np.float32), cupy.empty((16, o, t), np.float32)
            m = cupy.zeros((16, o, c), np.float32)
            i32 = np.int32

            def transforms():
                for n0 in range(0, n, nb):
                    kk = min(nb, n - n0)
                    launch("wino_x", wino._grid(c * kk * th * tw, be.sms), (wino.THREADS,),
                           (x, v, i32(n0), i32(kk), i32(c), i32(h), i32(w), i32(1), i32(th), i32(tw)))
                    launch("wino_dy", wino._grid(o * kk * th * tw, be.sms), (wino.THREADS,),
                           (dy, u, i32(n0), i32(kk), i32(o), i32(h), i32(w), i32(th), i32(tw)))

            row["winograd_transforms_ms"] = round(time_ms(cupy, spin, transforms), 4)
            for name, gemm in gemms.items():
                row[f"{name}_gemms_ms"] = round(time_ms(cupy, spin, lambda gemm=gemm: [
                    gemm(m, u, v, 1.0) for _ in range(0, n, nb)]), 4)
        for name in gemms:
            if "hetnet_ms" in row and f"{name}_ms" in row:
                row[f"{name}_speedup"] = round(row["hetnet_ms"] / row[f"{name}_ms"], 3)
        row["hetnet_choice"] = next((e["choice"] for e in reversed(be.tune_log) if e["op"] == "filter"
                                     and list(e["shape"])[1:5] == [c, h, w, o]), None)
        add_row(rows, row)
    write_rows(args, __doc__, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
