"""Time the sandbox's float32 Winograd convolutions (winograd.cu / winograd.py: the filter gradient by F(3 x 3, 2 x 2),
the forward and the data gradient by F(2 x 2, 3 x 3); the transforms on CUDA cores, the 16 GEMMs a chunk on cuBLAS in
float32) against the cuda backend's measured fp32 choices (conv.conv_forward / conv_backward, which measure their
candidates on first use), on cifar-wide's 3x3 convolutions at batch 512.
Each layer and op: every side against float64 of the direct sum on the batch's first images (relative error within
float32's tolerance, RTOL_F32; one that fails is reported, never timed), then its median GPU time
(run_conv_variants.time_ms). The Winograd sides run a chunk's GEMMs (the forward's 16; the filter gradient's 16 x
filter_parts, K cut into runs) as one call of the backend's fp32 GEMM each ("winograd") and as one strided-batched
cuBLAS call ("winograd_batched"); each row also gives the workspace, and the filter gradient's transforms alone. The
forward has bias + ReLU, the data gradient the ReLU mask. The JSON names the card, hetnet's commit and the date.

    HETNET_TUNE_CACHE=0 PYTHONPATH=src python benchmarks/kernels/run_winograd.py [--batch 512] [--out wino.json]
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "tests"))   # mma_cases: the float64 convolutions
sys.path.insert(0, str(HERE))

# cifar-wide's 3x3 convolutions (benchmarks/specs/cifar-wide.json): (C, H, W, O), pad 1
LAYERS = [(3, 32, 32, 64), (64, 32, 32, 128), (128, 16, 16, 128), (128, 16, 16, 256), (256, 8, 8, 256),
          (256, 4, 4, 256)]
CHECK_IMAGES = 8     # the float64 check's images (the direct sums on the CPU)


def main(argv=None) -> int:
    import winograd as wino
    from mma_cases import conv_data_expected, conv_expected, conv_filter_expected
    from run_conv_variants import add_row, gpu_runner, time_ms, write_rows

    args, cupy, be, spin = gpu_runner(__doc__, argv, "fp32")
    from hetnet.backends.cuda import conv as C
    from hetnet.bench.common import RTOL_F32

    mod = cupy.RawModule(code=wino.SOURCE.read_text(), options=("-std=c++17",))

    def launch(name, grid, block, kargs):
        mod.get_function(name)(grid, block, kargs)

    def nt_each(m, u, v, beta):            # the filter gradient's: m[i] = u[i] v[i]^T + beta m[i], 16 x parts of them
        for i in range(m.shape[0]):
            be.gemm(m[i], u[i], False, v[i], True, 1.0, beta)

    def nt_batched(m, u, v, beta):
        if beta == 0:
            cupy.matmul(u, v.transpose(0, 2, 1), out=m)
        else:
            m += cupy.matmul(u, v.transpose(0, 2, 1))

    def nn_each(m, u, v):                  # the forward's: m[xi] = u[xi] v[xi]
        for xi in range(16):
            be.gemm(m[xi], u[xi], False, v[xi], False)

    def nn_batched(m, u, v):
        cupy.matmul(u, v, out=m)

    forms = {"filter": {"winograd": nt_each, "winograd_batched": nt_batched},
             "fwd": {"winograd": nn_each, "winograd_batched": nn_batched}}
    rng = np.random.default_rng(0)
    rows = []
    for c, h, w, o in LAYERS:
        n, k = args.batch, CHECK_IMAGES
        x = cupy.asarray(rng.standard_normal((n, c, h, w)).astype(np.float32))
        dy = cupy.asarray(rng.standard_normal((n, o, h, w)).astype(np.float32))
        relu_x = cupy.asarray(rng.standard_normal((n, c, h, w)).astype(np.float32))
        wt = cupy.asarray((rng.standard_normal((o, c, 3, 3)) * 0.1).astype(np.float32))
        b = cupy.asarray(rng.standard_normal(o).astype(np.float32))
        dw = cupy.zeros((o, c, 3, 3), np.float32)
        y, dx = cupy.empty((n, o, h, w), np.float32), cupy.empty((n, c, h, w), np.float32)
        shape = (k, c, h, w, o, 3, 3, 1, 1)
        hx, hdy, hw, hb = (cupy.asnumpy(a) for a in (x[:k], dy[:k], wt, b))
        # op: (float64 result on k images, the Winograd side's output, hetnet's side (returns its output, or None:
        # dw), a Winograd side for a GEMM form)
        ops = {
            "filter": (conv_filter_expected(hdy, hx, np.zeros((o, c, 3, 3)), shape), lambda i: dw,
                       lambda i: C.conv_backward(be, dy[:i], x[:i], wt, dw, None, 1, 1, need_dx=False),
                       lambda i, g: wino.filter_gradient(cupy, launch, g, dw, x[:i], dy[:i], 1, add=True,
                                                         sms=be.sms)),
            "fwd": (conv_expected(hx, hw, hb, 1, 1, 1), lambda i: y[:i],
                    lambda i: C.conv_forward(be, x[:i], wt, b, 1, 1, 1),
                    lambda i, g: wino.conv_forward(cupy, launch, g, y[:i], x[:i], wt, b, 1, 1, sms=be.sms)),
            "data": (conv_data_expected(hdy, hw, cupy.asnumpy(relu_x[:k]), shape), lambda i: dx[:i],
                     lambda i: C.conv_backward(be, dy[:i], x[:i], wt, None, None, 1, 1, relu_x=relu_x[:i]),
                     lambda i, g: wino.data_gradient(cupy, launch, g, dx[:i], dy[:i], wt, 1, relu_x[:i],
                                                     sms=be.sms))}
        th, tw = wino.tiles(h, w)
        for op, (want, out, hetnet_side, wino_side) in ops.items():
            nb = wino.chunk_images(n, c, o, th, tw)
            row = {"layer": f"{c}x{h}x{w}->{o}", "op": op, "batch": n, "winograd_chunk_images": nb,
                   "winograd_workspace_mib": round(16 * (c + o) * nb * th * tw * 4 / 2**20, 1)}
            sides = {"hetnet": hetnet_side}
            for name, gemm in forms["filter" if op == "filter" else "fwd"].items():
                sides[name] = lambda i, gemm=gemm: wino_side(i, gemm)
            for name, run in sides.items():
                out(k).fill(0)
                got = run(k)
                got = out(k) if got is None else got
                err = float(np.linalg.norm(cupy.asnumpy(got) - want) / np.linalg.norm(want))
                row[f"{name}_rel_err"] = err
                if err <= RTOL_F32:
                    row[f"{name}_ms"] = round(time_ms(cupy, spin, lambda run=run: run(n)), 4)
                if name != "hetnet" and f"{name}_ms" in row and "hetnet_ms" in row:
                    row[f"{name}_speedup"] = round(row["hetnet_ms"] / row[f"{name}_ms"], 3)
            if op == "filter" and "winograd_ms" in row:          # the transforms alone
                row["winograd_transforms_ms"] = round(time_ms(cupy, spin, lambda: wino.filter_gradient(
                    cupy, launch, lambda *a: None, dw, x, dy, 1, add=True, sms=be.sms)), 4)
            row["hetnet_choice"] = next((e["choice"] for e in reversed(be.tune_log) if e["op"] == op
                                         and list(e["shape"])[1:5] == [c, h, w, o]), None)
            add_row(rows, row)
    write_rows(args, __doc__, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
