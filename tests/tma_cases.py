"""The checks of the TMA-fed convolutions (mma.cu HN_CONV16T, mma_tiles.TILES16T), shared by the GPU
(test_tma_conv) and the CPU emulator (test_mma_emulated): the model of the im2col box (box_coords, gather) and each
op of each tile on a shape against float64 (run_ops)."""
from __future__ import annotations

import numpy as np
from conftest import RTOL_TC_ROUNDED, rel_err
from mma_cases import (bf16_bits, bf16_values, conv_data_expected, conv_data_inputs, conv_expected, conv_filter_expected,
                       conv_filter_inputs, conv_inputs, max_pool_2x2, nhwc_copy, turned_copy)

from hetnet.backends.cuda import mma as mm
from hetnet.backends.cuda.mma_tiles import tma_fits, tma_pool_fits

# (n, C, H, W, O, R, S, stride, pad): blocks across images and past the last one; O past a block's rows; two channel
# blocks a tap; 5 x 5 at pad 2; stride 2 (the forward and filter gradient: the data gradient is a stride-1 forward).
# The third's and fifth's planes (9 x 8, 8 x 8) are whole multiples of 8 pixels, so their forward and unmasked data
# gradient take the epilogue staged in shared memory; the others' do not. The fifth, 1 x 1, has fewer K tiles than a
# tile has stages: nothing but the epilogue's own barrier orders a persistent block's next tile after the last one.
SHAPES = [(3, 64, 7, 9, 64, 3, 3, 1, 1), (1, 128, 5, 6, 192, 3, 3, 1, 0), (2, 64, 9, 8, 64, 5, 5, 1, 2),
          (2, 64, 11, 10, 128, 3, 3, 2, 1), (4, 64, 8, 8, 192, 1, 1, 1, 0)]
# the pooled forward's: outputs of 16 and 8 columns (O past a block's rows; one image), 32 columns at stride 2, and
# 16 columns of a 1 x 1 convolution (one K tile)
POOL_SHAPES = [(2, 64, 8, 16, 96, 3, 3, 1, 1), (1, 128, 6, 8, 64, 3, 3, 1, 1), (2, 64, 8, 64, 64, 3, 3, 2, 1),
               (2, 64, 8, 16, 64, 1, 1, 1, 0)]
# The forwards' and data gradient's plans for a device of one SM: a persistent tile's one block takes every tile in turn
# (its stages' phases carried across tiles, the next tile's loads under the last one's epilogue).
ONE_SM = 1



def box_coords(n0: int, k0: int, geometry: tuple) -> tuple:
    """(coords, tap) of the im2col box whose first output pixel is n0, at K offset k0 (a tap's channel block), as
    hn_convt_fwd's producer computes them: coords (c0, w0, h0, image) the channel offset and the pixel's input corner,
    tap (s, r)."""
    c, h, w, r, s, p, q, o, stride, pad = geometry
    img, pq = divmod(n0, p * q)
    p0, q0 = divmod(pq, q)
    rs, c0 = divmod(k0, c)
    return (c0, q0 * stride - pad, p0 * stride - pad, img), (rs % s, rs // s)


def gather(x16: np.ndarray, r: int, s: int, stride: int, pad: int, rows: int, coords: tuple, tap: tuple):
    """The im2col box of `rows` pixels x 64 channels by its definition: from the output pixel whose input corner is
    (w0, h0) of image n, the pixels walked q fastest, then p, then the image, each read at its corner + tap (s, r),
    channels c0 .. c0 + 63; zeros outside the image and past the last image."""
    n_img, h, w, _ = x16.shape
    p_out, q_out = (h + 2 * pad - r) // stride + 1, (w + 2 * pad - s) // stride + 1
    c0, w0, h0, n0 = coords
    first = n0 * p_out * q_out + (h0 + pad) // stride * q_out + (w0 + pad) // stride
    out = np.zeros((rows, 64), np.uint16)
    for i in range(rows):
        img, pq = divmod(first + i, p_out * q_out)
        p, q = divmod(pq, q_out)
        ih, iw = p * stride - pad + tap[1], q * stride - pad + tap[0]
        if img < n_img and 0 <= ih < h and 0 <= iw < w:
            got = x16[img, ih, iw, c0:c0 + 64]
            out[i, :got.shape[0]] = got
    return out


def _check_sums(xp, host, launch, call, where: str) -> int:
    """Where the call's staged epilogue makes its bf16 output's batch-norm statistics (mma.with_sums), run it again
    with them: the output unchanged, and each channel's sum and sum of squares of its values as stored (bf16) and
    their count, as NumPy adds them in float64 (within 1e-12 of the sum of magnitudes: the order differs). Returns the
    checks run (0 or 1)."""
    before = host(call.out).copy()
    if mm.with_sums(xp, call).sums is None:
        return 0
    launch(call)
    np.testing.assert_array_equal(host(call.out), before, err_msg=f"{where}: the output with sums")
    n, m, plane = call.src.shape[0], call.m, call.geometry[5] * call.geometry[6]
    y = bf16_values(before.reshape(-1)[:n * m * plane]).astype(np.float64).reshape(n, m, plane)
    sums = host(call.sums)
    used = int((sums[:-1].reshape(mm.SUMS_COPIES, 2 * m) != 0).any(axis=1).sum())   # a tile column's: its index mod 32
    assert used == min(-(-call.n // call.tile.bn), mm.SUMS_COPIES), f"{where}: {used} copies of the sums used"
    got = mm.folded_sums(sums, m)
    assert got[2 * m] == n * plane, f"{where}: count {got[2 * m]}, not {n * plane}"
    for part, values in (("sums", y), ("sums of squares", y * y)):
        got_part = got[:m] if part == "sums" else got[m:2 * m]
        np.testing.assert_allclose(got_part, values.sum(axis=(0, 2)), rtol=0,
                                   atol=1e-12 * np.abs(values).sum(), err_msg=f"{where}: {part}")
    return 1


def run_ops(xp, host, rng, shape, tiles: dict, launch, sms: int, fwd_sms: int = ONE_SM) -> int:
    """Each tile of tiles[op] on shape through mma.py's plans and launch(call), arrays made by xp.asarray and read
    back by host(): the forward (bias + ReLU; y in float32, and in bf16 exactly its values rounded), the pooled
    forward where it fits (y in float32 and bf16, and the argmax bytes, exactly those of max pooling of the forward),
    the stride-1 data gradient (with the ReLU mask and without; dx in float32, and in bf16 exactly the unmasked one
    rounded) and the filter gradient (added into dw, in one K part and in three), against float64 of the bf16 inputs
    within RTOL_TC_ROUNDED, outputs poisoned first; the forwards and data gradient planned for fwd_sms SMs, the
    filter gradient's K parts for sms. The bf16 forwards, where their staged epilogues make them, once more with their
    outputs' batch-norm statistics (_check_sums). Returns the outputs checked."""
    n, c, h, w, o, r, s, stride, pad = shape
    ran = 0
    for tile in tiles["fwd"]:
        x, wt, b, y = conv_inputs(rng, shape)
        x16, w16, bd, yd = (xp.asarray(a) for a in (nhwc_copy(x, "bf16"), nhwc_copy(wt, "bf16"), b, y))
        launch(mm.plan_conv16(yd, x16, w16, bd, stride, pad, 1, tile, fwd_sms))
        y = host(yd)
        err = rel_err(y, conv_expected(x, wt, b, stride, pad, 1, "bf16"))
        assert err <= RTOL_TC_ROUNDED, f"fwd {shape} {tile.name}: {err:.3g}"
        # stored as bf16: the same sums rounded (the epilogue staged in shared memory where the plane allows)
        y16 = xp.asarray(np.full(y.shape, 0xFFFF, np.uint16))
        launch(mm.plan_conv16(y16, x16, w16, bd, stride, pad, 1 | mm.OUT16, tile, fwd_sms))
        np.testing.assert_array_equal(host(y16), bf16_bits(y), err_msg=f"{shape} {tile.name}: bf16 y")
        ran += 2 + _check_sums(xp, host, launch, mm.plan_conv16(y16, x16, w16, bd, stride, pad, 1 | mm.OUT16, tile,
                                                                 fwd_sms), f"{shape} {tile.name}")
        if tile not in tiles["pool"] or not tma_pool_fits(tile, *y.shape[2:]):
            continue
        # the pooled forward: max pooling of the same tile's forward (the same sums), its argmax bytes; bf16 too
        want_y, want_arg = max_pool_2x2(y)
        for out16 in (False, True):
            buf, py, parg = mm.pooled_outputs(xp, n, o, *want_y.shape[2:], out16)
            buf[:] = 0xFFFF if out16 else np.nan
            launch(mm.plan_conv16_pool(buf, x16, w16, bd, stride, pad, 1 | (mm.OUT16 if out16 else 0), tile, fwd_sms))
            np.testing.assert_array_equal(host(py), bf16_bits(want_y) if out16 else want_y,
                                          err_msg=f"{shape} {tile.name}: pooled y")
            np.testing.assert_array_equal(host(parg), want_arg, err_msg=f"{shape} {tile.name}: argmax")
            ran += 1
            if out16:
                ran += _check_sums(xp, host, launch, mm.plan_conv16_pool(buf, x16, w16, bd, stride, pad, 1 | mm.OUT16,
                                                                         tile, fwd_sms), f"{shape} {tile.name} pooled")
    for tile in tiles["data"] if stride == 1 and tma_fits("data", o) else ():
        dy, wt, relu_x, dx = conv_data_inputs(rng, shape)
        dy16, wt16 = xp.asarray(nhwc_copy(dy, "bf16")), xp.asarray(turned_copy(wt, "bf16"))
        for mask in (relu_x, None):
            dxd = xp.asarray(dx)
            launch(mm.plan_conv16_data(dxd, dy16, wt16, None if mask is None else xp.asarray(mask), pad, tile,
                                       sms=fwd_sms))
            got = host(dxd)
            err = rel_err(got, conv_data_expected(dy, wt, mask, shape, "bf16"))
            assert err <= RTOL_TC_ROUNDED, f"data {shape} {tile.name} mask {mask is not None}: {err:.3g}"
            ran += 1
        dx16 = xp.asarray(np.full(dx.shape, 0xFFFF, np.uint16))
        launch(mm.plan_conv16_data(dx16, dy16, wt16, None, pad, tile, out16=True, sms=fwd_sms))
        np.testing.assert_array_equal(host(dx16), bf16_bits(got), err_msg=f"{shape} {tile.name}: bf16 dx")
        ran += 1
    for tile in tiles["filter"]:
        dy, x, dw0 = conv_filter_inputs(rng, shape)
        part0 = np.ascontiguousarray(dw0.transpose(0, 2, 3, 1))
        want = conv_filter_expected(dy, x, dw0, shape, "bf16").transpose(0, 2, 3, 1)
        for splits in (1, 3):
            partd = xp.array(part0)             # (a copy: the kernel adds into it)
            call = mm.plan_conv16_filter(partd, xp.asarray(nhwc_copy(dy, "bf16")),
                                         xp.asarray(nhwc_copy(x, "bf16")), stride, pad, sms, tile, splits)
            launch(call)
            err = rel_err(host(partd) - part0, want - part0)
            assert err <= RTOL_TC_ROUNDED, f"filter {shape} {tile.name} splits {call.splits}: {err:.3g}"
            ran += 1
    return ran
