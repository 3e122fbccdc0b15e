"""Every convolution algorithm hetnet's cuda backend tries, per layer shape, beside cuDNN's time for the same op.

For the 3x3 (padding 1) convolutions of thesis-m4, thesis-m1 and fashion-cnn at batch 32 and 1024, run the forward
and the backward once through hetnet's launchers, which measure each candidate (conv._choose: median of 3 samples of
4 back-to-back launches, GPU time) and keep the fastest; the table shows the five fastest of each trial. cuDNN's
time for the same op (PyTorch, TF32 off, cudnn.benchmark on) is the mean of 20 launches captured in one CUDA graph,
median of 5 replays: the forward, the data gradient alone and the filter gradient alone
(aten.convolution_backward with one output mask each). Both sides count GPU time only, so the ratio compares
kernels; `hetnet bench --layers` compares whole layers of thesis-m4 the same way. The per-kernel tier: it calls the
cuda backend's launchers directly, and takes its cuDNN timing, machine description and JSON writer from hetnet.bench.

    PYTHONPATH=src python benchmarks/conv_algos.py --out /tmp/conv_algos.json
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

# name: (C, H, W, K), all 3x3 with padding 1 and stride 1 (each model's convolutions in order)
SHAPES = {"thesis-m4 conv1": (3, 50, 50, 32), "thesis-m4 conv2": (32, 25, 25, 32),
          "thesis-m4 conv3": (32, 12, 12, 32), "thesis-m1 conv1": (3, 32, 32, 16),
          "thesis-m1 conv2": (16, 16, 16, 32), "fashion-cnn conv1": (1, 28, 28, 32),
          "fashion-cnn conv2": (32, 14, 14, 64)}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 1024])
    ap.add_argument("--out", default=None)
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import cupy
    import torch

    from hetnet.backends.cuda import conv as C
    from hetnet.bench.common import environment, write_result
    from hetnet.bench.sides import torch_graph_ms
    from hetnet.device import get_backend

    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    be = get_backend("cuda")
    rows, rng = [], np.random.default_rng(0)
    print(f"{be.gpu_name}: hetnet's algorithm trials (us, fastest five) vs cuDNN; ratio = cuDNN / hetnet's best")
    for name, (c, h, w, k) in SHAPES.items():
        for n in args.batches:
            x = rng.standard_normal((n, c, h, w), dtype=np.float32)
            wt = rng.standard_normal((k, c, 3, 3), dtype=np.float32) * 0.1
            xd, wd = be.asarray(x), be.asarray(wt)
            first = len(be.tune_log)
            y = C.conv_forward(be, xd, wd, be.zeros((k,)), 1, 1)
            C.conv_backward(be, cupy.ones_like(y), xd, wd, be.zeros(wt.shape), be.zeros((k,)), 1, 1, True)
            tx = torch.from_numpy(x).cuda().requires_grad_()
            tw = torch.from_numpy(wt).cuda().requires_grad_()
            tdy = torch.ones(n, k, h, w, device="cuda")

            def grad(mask):
                return lambda: torch.ops.aten.convolution_backward(tdy, tx, tw, None, [1, 1], [1, 1], [1, 1], False,
                                                                    [0, 0], 1, mask)

            cudnn = {"fwd": torch_graph_ms(lambda: torch.nn.functional.conv2d(tx, tw, None, 1, 1)),
                     "data": torch_graph_ms(grad([True, False, False])),
                     "filter": torch_graph_ms(grad([False, True, False]))}
            for e in be.tune_log[first:]:
                best = sorted(e["ms"].items(), key=lambda kv: kv[1])
                ratio = cudnn[e["op"]] / best[0][1]
                rows.append({"layer": name, "batch_size": n, "op": e["op"], "shape": e["shape"],
                             "cudnn_ms": cudnn[e["op"]], "hetnet_ms": dict(best), "choice": e["choice"],
                             "ratio": ratio})
                print(f"{name:18s} n={n:5d} {e['op']:6s} cuDNN {cudnn[e['op']] * 1000:7.1f} | "
                      + "  ".join(f"{a} {t * 1000:.1f}" for a, t in best[:5]) + f" | {ratio:.2f}x", flush=True)
    if args.out:
        write_result(Path(args.out), {"environment": environment(torch.get_num_threads(), True), "tf32": False,
                                      "rows": rows})


if __name__ == "__main__":
    main()
