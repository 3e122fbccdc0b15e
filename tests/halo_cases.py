"""The checks of the sandbox's halo convolutions (benchmarks/kernels/conv16_halo.py), shared by the emulator
(test_mma_emulated) and the GPU (test_mma): each op of each tile on a shape, planned by mma.py then conv16_halo.plan,
run by `run(call)` on arrays made by `xp`, against float64 of the inputs rounded as the precision's copies round them
(bf16, tf32; fp32's split copies: the inputs themselves); and the loader of the sandbox's modules."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
from conftest import rel_err
from mma_cases import (bf16_bits, conv_data_expected, conv_data_inputs, conv_expected, conv_filter_expected,
                       conv_filter_inputs, conv_inputs, max_pool_2x2, nhwc_copy, turned_copy)

from hetnet.backends.cuda import mma as mm

# (n, C, H, W, O, R, S, stride, pad): one block short of its columns; two and three channel chunks (the halo's two
# buffers, the first refilled), O past a block's rows, pad 0; 5 x 5 over blocks that span images; a wide frame;
# channels that are not a multiple of 64, and 3 channels as in a first layer (the filter gradient only)
HALO_SHAPES = [(2, 64, 6, 7, 64, 3, 3, 1, 1), (1, 128, 5, 5, 192, 3, 3, 1, 0), (3, 64, 9, 9, 64, 5, 5, 1, 2),
               (2, 64, 3, 40, 64, 3, 3, 1, 1), (3, 24, 7, 5, 40, 3, 3, 1, 1), (2, 3, 9, 10, 16, 3, 3, 1, 1)]
# tf32 and fp32 (32-channel chunks): three chunks with pad 0 and O past a block, two chunks across images at 5 x 5,
# 12 channels (the filter gradient only)
HALO32_SHAPES = [(1, 96, 5, 6, 136, 3, 3, 1, 0), (3, 64, 7, 7, 32, 5, 5, 1, 2), (2, 12, 6, 9, 24, 3, 3, 1, 1)]
HALO_CASES = ([("bf16", s) for s in HALO_SHAPES]
              + [(p, s) for p in ("tf32", "fp32") for s in HALO32_SHAPES])


def sandbox(name: str):
    """benchmarks/kernels/<name>.py as a module (the sandbox's tile modules import no GPU library), its folder on
    sys.path for the modules it imports."""
    folder = Path(__file__).resolve().parents[1] / "benchmarks" / "kernels"
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    path = folder / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod                    # (dataclasses resolve the module's string annotations through it)
    spec.loader.exec_module(mod)
    return mod


def check_halo(halo, rng, shape, run, rtol: float, xp=np, sms=(1, 64), precision: str = "bf16") -> int:
    """Every halo tile of `precision` where it runs on `shape`: the forward with bias + ReLU and without, at bf16 also
    stored in bf16 (the bits of the same tile's float32 output), the pooled forward (y and the argmax bytes those of
    max pooling of that output; at bf16 y in float32 and in bf16), the data gradient with the mask and without, and
    the filter gradient added into dw (planned for each of `sms`: one K part, several); outputs poisoned where they
    are written. Returns how many outputs it checked."""
    stride, pad = shape[7:]
    dev = xp.array                 # (a copy: the filter gradient adds into its own)

    def host(a):
        return a.get() if hasattr(a, "get") else a

    ran, bf16 = 0, precision == "bf16"
    tiles = halo.TILES16H["fwd"] if bf16 else [t for t in halo.TILES32H["fwd"] if t.precision == precision]
    for k, tile in enumerate(tiles):
        x, w, b, y = conv_inputs(rng, shape, bias=k % 2 == 0)
        x16, w16, act = dev(nhwc_copy(x, precision)), dev(nhwc_copy(w, precision)), 1 - k % 2
        bd, yd = (None if b is None else dev(b)), dev(y)
        call = mm.plan_conv16(yd, x16, w16, bd, stride, pad, act, tile)
        if halo.fits(call):
            call = halo.plan(call)
            frame = shape[0] * (shape[2] + pad) * (shape[3] + pad)
            assert call.tile.rows % 8 == 1 and call.grid[0] == -(-frame // tile.bn)
            run(call)
            y = host(yd)
            err = rel_err(y, conv_expected(x, w, b, stride, pad, act, precision))
            assert err <= rtol, f"fwd {shape} {tile.name}: relative error {err:.3g}"
            if bf16:
                y16 = dev(np.full(y.shape, 0xFFFF, np.uint16))
                run(halo.plan(mm.plan_conv16(y16, x16, w16, bd, stride, pad, act | mm.OUT16, tile)))
                np.testing.assert_array_equal(host(y16), bf16_bits(y), err_msg=f"{shape} {tile.name}: out16")
            ran += 1
            # the pooled forward: max pooling of the same forward (the same sums), its argmax bytes; bf16 too
            want_y, want_arg = max_pool_2x2(y)
            for out16 in (False, True) if bf16 else (False,):
                buf, py, parg = mm.pooled_outputs(xp, shape[0], shape[4], *want_y.shape[2:], out16)
                buf[:] = 0xFFFF if out16 else np.nan
                call = mm.plan_conv16_pool(buf, x16, w16, bd, stride, pad, act | (mm.OUT16 if out16 else 0), tile)
                if want_y.size and halo.fits(call):
                    run(halo.plan(call))
                    np.testing.assert_array_equal(host(py), bf16_bits(want_y) if out16 else want_y,
                                                  err_msg=f"{shape} {tile.name}: pooled y")
                    np.testing.assert_array_equal(host(parg), want_arg, err_msg=f"{shape} {tile.name}: argmax")
                    ran += 1
        dy, w, relu_x, dx = conv_data_inputs(rng, shape, mask=k % 2 == 0)
        dxd = dev(dx)
        call = mm.plan_conv16_data(dxd, dev(nhwc_copy(dy, precision)), dev(turned_copy(w, precision)),
                                   None if relu_x is None else dev(relu_x), pad, tile)
        if halo.fits(call):
            run(halo.plan(call))
            err = rel_err(host(dxd), conv_data_expected(dy, w, relu_x, shape, precision))
            assert err <= rtol, f"data {shape} {tile.name}: relative error {err:.3g}"
            ran += 1
    filter_tiles = halo.TILES16H["filter"] if bf16 else [t for t in halo.TILES32H["filter"] if t.precision == precision]
    for tile in filter_tiles:
        dy, x, dw0 = conv_filter_inputs(rng, shape)
        c = shape[1]
        part0 = np.zeros((*dw0.shape[:1], *dw0.shape[2:], mm.padded_channels(c, precision)), np.float32)
        part0[..., :c] = dw0.transpose(0, 2, 3, 1)
        want = conv_filter_expected(dy, x, dw0, shape, precision).transpose(0, 2, 3, 1)
        for n_sms in sms:
            partd = dev(part0)
            call = mm.plan_conv16_filter(partd, dev(nhwc_copy(dy, precision)), dev(nhwc_copy(x, precision)), stride,
                                         pad, n_sms, tile, 1)
            if not halo.fits(call):
                continue
            call = halo.plan(call, n_sms)
            run(call)
            part = host(partd)
            err = rel_err(part[..., :c] - part0[..., :c], want - part0[..., :c])
            assert err <= rtol, f"filter {shape} {tile.name} splits {call.splits}: {err:.3g}"
            assert not part[..., c:].any(), "the padded channels' gradient"
            ran += 1
    return ran
