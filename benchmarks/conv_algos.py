"""Every convolution algorithm hetnet's cuda backend tries, per layer shape, beside cuDNN's time for the same op.

For the 3x3 (padding 1) convolutions of thesis-m4, thesis-m1 and fashion-cnn at batch 32 and 1024 (--shapes
cifar-wide: cifar-wide's six), at a precision (--precision fp32: TF32 off on both sides; tf32: hetnet's tf32 backend
and PyTorch's allow_tf32; bf16: hetnet's bf16 backend and PyTorch on bfloat16 channels_last tensors), run the
forward and the backward once through hetnet's launchers, which measure each candidate (conv._choose: median of 3
samples of 4 back-to-back launches, GPU time) and keep the fastest; the table shows the five fastest of each trial.
cuDNN's time for the same op (PyTorch at the same precision, cudnn.benchmark on) is the mean of 20 launches captured
in one CUDA graph, median of 5 replays: the forward, the data gradient alone and the filter gradient alone
(aten.convolution_backward with one output mask each). Both sides count GPU time only, so the ratio compares
kernels; `hetnet bench --layers` compares whole layers of thesis-m4 the same way. The per-kernel tier: it calls the
cuda backend's launchers directly, and takes its cuDNN timing, machine description and JSON writer from hetnet.bench.

    PYTHONPATH=src python benchmarks/conv_algos.py --out /tmp/conv_algos.json
    PYTHONPATH=src python benchmarks/conv_algos.py --shapes cifar-wide --batches 512 --precision bf16
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

# name: (C, H, W, K), all 3x3 with padding 1 and stride 1 (each model's convolutions in order)
SHAPES = {"thesis-m4 conv1": (3, 50, 50, 32), "thesis-m4 conv2": (32, 25, 25, 32),
          "thesis-m4 conv3": (32, 12, 12, 32), "thesis-m1 conv1": (3, 32, 32, 16),
          "thesis-m1 conv2": (16, 16, 16, 32), "fashion-cnn conv1": (1, 28, 28, 32),
          "fashion-cnn conv2": (32, 14, 14, 64)}
CIFAR_WIDE = {"cifar-wide conv1": (3, 32, 32, 64), "cifar-wide conv2": (64, 32, 32, 128),
              "cifar-wide conv3": (128, 16, 16, 128), "cifar-wide conv4": (128, 16, 16, 256),
              "cifar-wide conv5": (256, 8, 8, 256), "cifar-wide conv6": (256, 4, 4, 256)}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 1024])
    ap.add_argument("--shapes", choices=["thesis", "cifar-wide"], default="thesis")
    ap.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default="fp32")
    ap.add_argument("--out", default=None)
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    os.environ["HETNET_TUNE_CACHE"] = "0"      # every trial measured here, none taken from an earlier process
    import cupy
    import torch

    from hetnet.backends.cuda import conv as C
    from hetnet.bench.common import environment, write_result
    from hetnet.bench.sides import torch_graph_ms
    from hetnet.device import get_backend

    from hetnet.bench.sides import torch_precision

    torch_precision(args.precision)              # allow_tf32 as PyTorch's users set it, cudnn.benchmark on
    tdtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    layout = torch.channels_last if args.precision == "bf16" else torch.contiguous_format
    be = get_backend("cuda", args.precision)
    rows, rng = [], np.random.default_rng(0)
    print(f"{be.gpu_name}, {args.precision}: hetnet's algorithm trials (us, fastest five) vs cuDNN; ratio = cuDNN / "
          f"hetnet's best")
    for name, (c, h, w, k) in (SHAPES if args.shapes == "thesis" else CIFAR_WIDE).items():
        for n in args.batches:
            x = rng.standard_normal((n, c, h, w), dtype=np.float32)
            wt = rng.standard_normal((k, c, 3, 3), dtype=np.float32) * 0.1
            xd, wd = be.asarray(x), be.asarray(wt)
            first = len(be.tune_log)
            y = C.conv_forward(be, xd, wd, be.zeros((k,)), 1, 1)
            C.conv_backward(be, cupy.ones_like(y), xd, wd, be.zeros(wt.shape), be.zeros((k,)), 1, 1, True)
            tx = torch.from_numpy(x).cuda().to(tdtype).contiguous(memory_format=layout).requires_grad_()
            tw = torch.from_numpy(wt).cuda().to(tdtype).contiguous(memory_format=layout).requires_grad_()
            tdy = torch.ones(n, k, h, w, device="cuda", dtype=tdtype).contiguous(memory_format=layout)

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
        write_result(Path(args.out), {"environment": environment(torch.get_num_threads(), True),
                                      "precision": args.precision, "tf32": args.precision == "tf32",
                                      "rows": rows})


if __name__ == "__main__":
    main()
