"""Time the bf16 pooling gradient of cifar-wide's three pooled convolutions (2 x 2 windows, batch 512): conv.cu's
pool_grad16_nhwc16 (blocks of 32 pooled pixels x 64 channels writing their windows, launched by the package's
mma.pool_grad16_nhwc16) against the sandbox's pool_grad16_nhwc16_px (pool_grad_px.cu: blocks of 32 pixels of the
pooling's input). Each output is first checked bit for bit against the other (one that differs is reported, never
timed), then its median GPU time (run_conv_variants.time_ms) and the bytes it moves over that time. The JSON names the
card, hetnet's commit and the date.

    PYTHONPATH=src python benchmarks/kernels/time_pool_grad.py [--batch 512] [--out pool_grad.json]   # on a GPU
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# z = the pooling's input [n, C, H, W] per pooled convolution of cifar-wide (benchmarks/specs/cifar-wide.json)
SHAPES = ((128, 32, 32), (256, 16, 16), (256, 8, 8))


def main(argv=None) -> int:
    from run_conv_variants import add_row, gpu_runner, time_ms, write_rows

    args, cupy, be, spin = gpu_runner(__doc__, argv, "bf16")
    from hetnet.backends.cuda import kernels, mma

    conv_cu = (kernels.HERE / "conv.cu").read_text()           # (none of the tiles' entry points)
    text = kernels.inline_header((HERE / "pool_grad_px.cu").read_text().replace('#include "conv.cu"', conv_cu))
    px = kernels.compile_module(be.device_id, text).get_function("pool_grad16_nhwc16_px")
    rng = np.random.default_rng(0)
    rows = []
    for c, h, w in SHAPES:
        n, p, q = args.batch, h // 2, w // 2
        z_shape = (n, c, h, w)
        arg = cupy.asarray(rng.integers(0, 4, (n, c, p, q), dtype=np.uint8))
        dy16 = cupy.asarray(rng.integers(0, 2**16, (n, p, q, c), dtype=np.uint16))
        ints = tuple(np.int32(v) for v in (n, c, h, w, p, q, 2))

        def package():
            return mma.pool_grad16_nhwc16(be, dy16, arg, z_shape, 2)

        def sandbox(out):
            px((math.ceil(n * h * w / 32), math.ceil(c / 64)), (256,), (dy16, arg, out, *ints))

        want = cupy.asnumpy(package())
        out = cupy.full((n, h, w, c), 0xBEEF, np.uint16)
        sandbox(out)
        differ = int((cupy.asnumpy(out) != want).sum())
        moved = dy16.nbytes + arg.nbytes + out.nbytes      # read once each, written once
        for name, fn in (("pool_grad16_nhwc16", package), ("sandbox pool_grad16_nhwc16_px", lambda: sandbox(out))):
            row = {"z": list(z_shape), "kernel": name, "check_bits_differ": 0 if fn is package else differ}
            if row["check_bits_differ"] == 0:
                ms = time_ms(cupy, spin, fn)
                row.update(ms=round(ms, 4), gb_per_s=round(moved / ms / 1e6, 1))
            add_row(rows, row)
    write_rows(args, __doc__, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
