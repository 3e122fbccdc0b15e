"""Time the small-convolution kernels on cifar-wide's first layer (3 -> 64, 3 x 3, pad 1, 32 x 32) against the cuda
backend's own candidates for that shape (conv.py's implicit-GEMM tiles at their splits): the forward that ships
(conv.cu's conv_small_fwd, conv.py's candidate "small", compiled by the package's kernel loader; also with its bf16
output, out16) and the sandbox's filter gradients (conv_small.cu: conv_small_filter2 + conv_small_filter2_add; and
conv16_halo.py's hf tiles on bf16 copies, checked against float64 of the rounded inputs, halo_filter_rows). Each
output is first checked against the first shipped candidate's (relative error of the largest value within RTOL; the
bf16 output: equal bits to the bf16 of the float32 "small" output; one that fails is reported, never timed), then its
median GPU time (run_conv_variants.time_ms). Also the tensor-core forward (float32 and bf16 output) and filter
gradient that conv.py runs at bf16 ("small_tc": mma.cu's conv_small_fwd_tc, conv_small_filter_tc; x, w and dy
rounded to bf16: checked against float64 of the rounded inputs). The JSON names the card, hetnet's commit and the
date.

    PYTHONPATH=src python benchmarks/kernels/run_conv_small.py [--batch 512] [--out conv_small.json]   # on a GPU
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "tests"))   # mma_cases: the bf16 rounding
sys.path.insert(0, str(HERE))

RTOL = 1e-5          # float32 sums of 27 (forward) or n P Q (filter) terms in another order
CHECK_IMAGES = 8     # the tensor-core forward's float64 check (on the CPU)
GRID_PER_SM = 4      # conv_small_filter2's blocks per SM (its grid-stride loop over 64-pixel tiles)


def out16_row(cupy, spin, launch16, y32: np.ndarray) -> dict:
    """The row of conv_small_fwd with bf16 output, launch16(y16) on uint16 of y32's shape: checked (bits equal to
    the bf16 of y32, the float32 output), then timed."""
    from mma_cases import bf16_bits
    from run_conv_variants import time_ms

    y16 = cupy.zeros(y32.shape, np.uint16)
    launch16(y16)
    differ = int((cupy.asnumpy(y16) != bf16_bits(y32)).sum())
    row = {"op": "fwd", "candidate": "small out16", "check_bits_differ": differ}
    if differ == 0:
        row["ms"] = round(time_ms(cupy, spin, lambda: launch16(y16)), 4)
    return row


def halo_filter_rows(cupy, spin, be, x, dy, shape) -> list[dict]:
    """The sandbox's halo filter gradients (conv16_halo.py's hf tiles) on bf16 channels-last copies of dy and x made
    once (x's 3 channels padded to 8), summed [O][R][S][Cp] and added into dw by add_from_nhwc as mma.conv16_filter
    does: checked against float64 of the bf16-rounded inputs (within RTOL_TC_ROUNDED), then timed."""
    import conv16_halo as halo
    from mma_cases import conv_filter_expected
    from run_conv_variants import add_row, time_ms
    from run_tc_conv_nhwc import RTOL_TC_ROUNDED

    from hetnet.backends.cuda import mma
    from hetnet.device import get_backend

    be16 = get_backend("cuda", "bf16")
    o, c, r, s = shape
    x16, dy16 = mma.to_nhwc(be16, x), mma.to_nhwc(be16, dy)
    cp = x16.shape[3]
    part = cupy.zeros((o, r, s, cp), np.float32)
    dw = cupy.zeros(shape, np.float32)
    want = conv_filter_expected(cupy.asnumpy(dy), cupy.asnumpy(x), np.zeros(shape, np.float32),
                                (x.shape[0], c, *x.shape[2:], o, r, s, 1, 1), "bf16")
    rows = []
    for tile in halo.TILES16H["filter"]:
        call = halo.plan(mma.plan_conv16_filter(part, dy16, x16, 1, 1, be16.sms, tile, 1), be16.sms)

        def run(call=call):
            part.fill(0)
            halo.launch(be16, call)
            be16.launch("conv", "add_from_nhwc", dw.size, dw, part, np.int32(o), np.int32(c), np.int32(r * s),
                        np.int32(cp))

        dw.fill(0)
        run()
        got = cupy.asnumpy(dw)
        err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
        row = {"op": "filter", "candidate": f"sandbox {tile.name} (bf16)", "check_rel_err": err}
        if err <= RTOL_TC_ROUNDED:
            row["ms"] = round(time_ms(cupy, spin, run), 4)
        add_row(rows, row)
    return rows


def small_tc_rows(cupy, spin, be, x, w, dy) -> list[dict]:
    """The tensor-core forward and filter gradient (mma.cu's conv_small_fwd_tc, conv_small_filter_tc: conv.py's
    "small_tc" at bf16; x, w and dy rounded to bf16, sums in float32), launched by conv.py. The forward's float32
    output and the filter gradient checked against float64 of the rounded inputs on the first CHECK_IMAGES images
    (within RTOL_TC_ROUNDED), the forward's bf16 output against the bf16 of its float32 output (bits equal), and with
    the batch norm's sums; then each timed."""
    from mma_cases import batch_norm_sums, bf16_bits, bf16_values
    from run_conv_variants import add_row, time_ms
    from run_tc_conv_nhwc import RTOL_TC_ROUNDED

    from hetnet.backends import reference
    from hetnet.backends.cuda import conv as C
    from hetnet.backends.cuda import mma

    n, c, h, wd = x.shape
    k = w.shape[0]
    m = CHECK_IMAGES
    g, gm = (C.Geometry(i, c, h, wd, k, 3, 3, 1, 1) for i in (n, m))
    y, y16 = cupy.zeros((n, k, h, wd), np.float32), cupy.zeros((n, k, h, wd), np.uint16)
    C._fwd_small(be, g, x, w, None, y, 0, tc=True)
    C._fwd_small(be, g, x, w, None, y16, 0, out16=True, tc=True)
    xr, wr = (bf16_values(bf16_bits(cupy.asnumpy(a))).astype(np.float64) for a in (x[:m], w))
    want, _ = reference.conv2d_forward(xr, wr, None, 1, 1)
    got = cupy.asnumpy(y[:m])
    rows = []
    err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    row = {"op": "fwd", "candidate": "small_tc (bf16 inputs)", "check_rel_err": err}
    if err <= RTOL_TC_ROUNDED:
        row["ms"] = round(time_ms(cupy, spin, lambda: C._fwd_small(be, g, x, w, None, y, 0, tc=True)), 4)
    add_row(rows, row)
    differ = int((cupy.asnumpy(y16) != bf16_bits(cupy.asnumpy(y))).sum())
    row = {"op": "fwd", "candidate": "small_tc out16", "check_bits_differ": differ}
    if differ == 0:
        row["ms"] = round(time_ms(cupy, spin, lambda: C._fwd_small(be, g, x, w, None, y16, 0, out16=True, tc=True)), 4)
    add_row(rows, row)
    # with the batch norm's sums, as the bf16 step runs it (conv.conv_forward's out16 + mma.zeroed_sums): the folded
    # sums against NumPy's float64 of the stored values (1e-12 of the sum of magnitudes), then timed (each launch
    # adding into the same sums: the same atomics)
    sums = mma.zeroed_sums(cupy, k)
    C._fwd_small(be, g, x, w, None, y16, 0, out16=True, tc=True, sums=sums)
    got = mma.folded_sums(cupy.asnumpy(sums), k)
    want = batch_norm_sums(bf16_values(cupy.asnumpy(y16)))
    err = float(np.abs(got - want).max() / np.abs(want).sum())
    row = {"op": "fwd", "candidate": "small_tc out16 + sums", "check_rel_err": err}
    if err <= 1e-12:
        row["ms"] = round(time_ms(cupy, spin, lambda: C._fwd_small(be, g, x, w, None, y16, 0, out16=True, tc=True,
                                                                    sums=sums)), 4)
    add_row(rows, row)

    dw = cupy.zeros((k, c, 3, 3), np.float32)
    C._filter_small_tc(be, gm, dy[:m], x[:m], dw, None)
    dyr = bf16_values(bf16_bits(cupy.asnumpy(dy[:m]))).astype(np.float64)
    _, cache = reference.conv2d_forward(xr, np.zeros((k, c, 3, 3)), None, 1, 1)
    want_dw = np.zeros((k, c, 3, 3))
    reference.conv2d_backward(dyr, cache, want_dw, None, need_dx=False)
    err = float(np.linalg.norm(cupy.asnumpy(dw) - want_dw) / np.linalg.norm(want_dw))
    row = {"op": "filter", "candidate": "small_tc (bf16 inputs)", "check_rel_err": err}
    if err <= RTOL_TC_ROUNDED:
        row["ms"] = round(time_ms(cupy, spin, lambda: C._filter_small_tc(be, g, dy, x, dw, None)), 4)
    add_row(rows, row)
    return rows


def main(argv=None) -> int:
    from run_conv_variants import add_row, gpu_runner, time_ms, write_rows

    args, cupy, be, spin = gpu_runner(__doc__, argv, "fp32")
    from hetnet.backends.cuda import conv as C

    mod = cupy.RawModule(code=(HERE / "conv_small.cu").read_text(), options=("-std=c++17",))
    filt2, add2 = (mod.get_function(f) for f in ("conv_small_filter2", "conv_small_filter2_add"))
    n, c, h, w_, k = args.batch, 3, 32, 32, 64
    g = C.Geometry(n, c, h, w_, k, 3, 3, 1, 1)
    ints = tuple(np.int32(v) for v in (n, c, h, w_, k, 3, 3, 1, 1, g.p, g.q))
    rng = np.random.default_rng(0)
    x = cupy.asarray(rng.standard_normal((n, c, h, w_)).astype(np.float32))
    w = cupy.asarray((rng.standard_normal((k, c, 3, 3)) * 0.2).astype(np.float32))
    dy = cupy.asarray(rng.standard_normal((n, k, g.p, g.q)).astype(np.float32))
    blocks = max(1, min(GRID_PER_SM * be.sms, math.ceil(g.npq / 64)))
    part = cupy.empty((blocks, 64, 32), np.float32)

    fwd = C._split_cands(be, C.FWD_CFGS, g, lambda cfg, sp, y: C._fwd_implicit(be, cfg, sp, g, x, w, None, y, 0))
    fwd["small"] = lambda y: C._fwd_small(be, g, x, w, None, y, 0)
    filt = C._split_cands(be, C.FILTER_CFGS, g, lambda cfg, sp, dw: C._filter_implicit(be, cfg, g, dy, x, dw, None,
                                                                                          sp))

    def small_filter(dw):
        filt2((blocks,), (256,), (dy, x, part, *ints))
        add2((math.ceil(k * 32 / 256),), (256,), (part, dw, np.int32(blocks), np.int32(k), np.int32(g.crs)))

    filt["sandbox conv_small_filter2"] = small_filter
    rows = []
    rows += halo_filter_rows(cupy, spin, be, x, dy, (k, c, 3, 3))
    rows += small_tc_rows(cupy, spin, be, x, w, dy)
    for op, cands, shape in (("fwd", fwd, (n, k, g.p, g.q)), ("filter", filt, (k, c, 3, 3))):
        out = cupy.zeros(shape, np.float32)
        first = None
        for name, fn in cands.items():
            out.fill(0)
            fn(out)
            got = cupy.asnumpy(out)
            first = got if first is None else first
            err = float(np.abs(got - first).max() / np.abs(first).max())
            row = {"op": op, "candidate": name, "check_rel_err": err}
            if err <= RTOL:
                row["ms"] = round(time_ms(cupy, spin, lambda fn=fn, out=out: fn(out)), 4)
            add_row(rows, row)
            if name == "small":
                add_row(rows, out16_row(cupy, spin, lambda y16: C._fwd_small(be, g, x, w, None, y16, 0, out16=True),
                                        got))
    write_rows(args, __doc__, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
