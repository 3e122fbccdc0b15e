"""2-D convolution on the cpu backend: im2col + GEMM + col2im per image (compiled loops with OpenBLAS's sgemm, or
NumPy over chunks of images), and convolution + ReLU + 2x2 max pooling fused (conv2d_relu_maxpool_*).
"""
from __future__ import annotations

import numpy as np

from .. import compose
from . import _jit as jit
from . import threads as _thr
from . import _common as _c
from ._common import _F, _f32c, _per_channel, _per_thread
from .elementwise import relu_inplace, relu_mask as _masked

_PER_IMAGE_GEMM_MAX_CRS = 64   # backward: per-image GEMMs (no transposed copy of dy) when C*R*S <= this
_CONV_FORWARD_CHUNK_BYTES = 1 << 20   # forward columns + outputs per chunk: per-image GEMMs like them in L2


# --- convolution ----------------------------------------------------------------------------------------------------
# Per chunk of B images, im2col writes columns in layout cols[c, r, s, b, p, q] = xpad[b, c, p*stride + r,
# q*stride + s] straight from x (the zero padding is the never-written border of a reused, zero-filled buffer).
# Forward: y[b] = w2[k, (c,r,s)] @ cols[(c,r,s), b, (p,q)], one GEMM per image straight into NCHW.
# Backward recomputes the chunk's columns (cheaper than keeping 9x the input in memory) and does
#   dw += dy cols^T,  db += sum(dy),  dcols = w2^T dy,  dx = col2im(dcols)   (the three conv derivatives).


class _ConvGeom:
    __slots__ = ("c", "h", "w", "k", "r", "s", "stride", "pad", "p", "q", "taps", "full_tap", "same")

    def __init__(self, xshape, wshape, stride, pad):
        _, self.c, self.h, self.w = xshape
        self.k, _, self.r, self.s = wshape
        self.stride, self.pad = stride, pad
        self.p = (self.h + 2 * pad - self.r) // stride + 1
        self.q = (self.w + 2 * pad - self.s) // stride + 1
        # for each kernel tap (i, j): the output rows/cols whose input is inside the image, and the input slices
        taps = []
        for i in range(self.r):
            plo, phi = _valid(self.p, self.h, i, stride, pad)
            for j in range(self.s):
                qlo, qhi = _valid(self.q, self.w, j, stride, pad)
                if plo < phi and qlo < qhi:
                    hs, ws = plo * stride + i - pad, qlo * stride + j - pad
                    taps.append((i, j, plo, phi, qlo, qhi,
                                 slice(hs, hs + (phi - plo - 1) * stride + 1, stride),
                                 slice(ws, ws + (qhi - qlo - 1) * stride + 1, stride)))
        self.taps = taps
        self.same = stride == 1 and self.p == self.h and self.q == self.w   # output the size of the input
        # a tap whose input slice is the whole image (stride 1 and the centre tap, typically), or None
        self.full_tap = next((t for t in taps if t[6] == slice(0, self.h, stride) and t[7] == slice(0, self.w, stride)
                              and stride == 1), None)

    def key(self):
        return (self.c, self.h, self.w, self.r, self.s, self.stride, self.pad)


def _valid(out: int, size: int, tap: int, stride: int, pad: int) -> tuple[int, int]:
    """Output positions o in [lo, hi) with 0 <= o*stride + tap - pad < size."""
    lo = max(0, -(-(pad - tap) // stride))
    hi = min(out, (size - 1 + pad - tap) // stride + 1)
    return lo, max(lo, hi)


def _im2col(x, b0, b1, g: _ConvGeom) -> np.ndarray:
    """Columns (C*R*S, B*P*Q) of images b0..b1 (a per-thread buffer, valid until the next call on this thread)."""
    nb = b1 - b0
    cols = _thr.scratch(("cols",) + g.key(), (g.c, g.r, g.s, nb, g.p, g.q), zero=True)
    xb = x[b0:b1]
    if g.same:
        # "same" stride-1 conv: each tap is a flat shift of whole images (long contiguous copies); the few pixels
        # that wrap around a row end are zeroed afterwards
        hw = g.h * g.w
        xf, cf = xb.reshape(nb, g.c, hw), cols.reshape(g.c, g.r, g.s, nb, hw)
        for i, j, plo, phi, qlo, qhi, _, _ in g.taps:
            (d0, d1), (s0, s1) = _flat_ranges(plo * g.w, phi * g.w, (i - g.pad) * g.w + j - g.pad, hw)
            np.copyto(cf[:, i, j, :, d0:d1], xf[:, :, s0:s1].transpose(1, 0, 2))
            _zero_wrapped(cols[:, i, j, :, plo:phi], qlo, qhi, g.q)
        return cols.reshape(g.c * g.r * g.s, nb * g.p * g.q)
    for i, j, plo, phi, qlo, qhi, hsl, wsl in g.taps:
        np.copyto(cols[:, i, j, :, plo:phi, qlo:qhi], xb[:, :, hsl, wsl].transpose(1, 0, 2, 3))
    return cols.reshape(g.c * g.r * g.s, nb * g.p * g.q)


def _flat_ranges(a: int, e: int, off: int, size: int):
    """Column range [a, e) shifted by off into pixel range [a+off, e+off), both clipped to [0, size)."""
    s0, s1 = a + off, e + off
    lo, hi = max(0, -s0), max(0, s1 - size)
    return (a + lo, e - hi), (s0 + lo, s1 - hi)


def _zero_wrapped(block, qlo: int, qhi: int, q: int) -> None:
    """Zero the columns outside [qlo, qhi) of block[..., P', Q] (the ones a flat shift wrapped to another row)."""
    if qlo > 0:
        block[..., :qlo] = 0
    if qhi < q:
        block[..., qhi:] = 0


def _conv_setup(x, w, stride, padding):
    """x as float32 C-contiguous, its geometry, and the weight as a (K, C*R*S) matrix."""
    x = _f32c(x)
    g = _ConvGeom(x.shape, w.shape, stride, padding)
    return x, g, np.ascontiguousarray(w, dtype=_F).reshape(g.k, -1)


def conv2d_forward(x, w, b, stride, padding, act=None, relu_mask=None):
    """y[n,k,p,q] = act(b[k] + sum_{c,r,s} w[k,c,r,s] xpad[n,c,p*stride+r,q*stride+s]) (relu_mask: the contract's
    hint, not needed here)."""
    x, g, w2 = _conv_setup(x, w, stride, padding)
    n, k, pq, crs = x.shape[0], g.k, g.p * g.q, w2.shape[1]
    y = np.empty((n, k, g.p, g.q), dtype=_F)
    if _c.SGEMM is not None:
        bias = np.zeros(k, dtype=_F) if b is None else _f32c(b)
        cols_shape = (crs, pq)

        def jbody(b0, b1, _):
            cols = _thr.scratch("jit_cols", cols_shape)
            conv_forward(_c.SGEMM, x[b0:b1], w2, bias, b is not None, g.r, g.s, stride, padding, cols, y[b0:b1])

        _thr.parallel(n, _per_thread(n, 4 * (crs + k) * pq), jbody)
        relu_inplace(y, act)
        return y, (x, w2, g)
    bias = None if b is None else _per_channel(b, k, pq)

    def body(b0, b1, _):
        nb = b1 - b0
        cols = _im2col(x, b0, b1, g)
        dst = y[b0:b1].reshape(nb, k, pq)
        # one GEMM per image, y[b] = w2 @ cols[:, b], straight into NCHW (measured faster than one GEMM over the
        # chunk followed by a transposing copy)
        np.matmul(w2, cols.reshape(crs, nb, pq).transpose(1, 0, 2), out=dst)
        if bias is not None:
            dst += bias

    _thr.parallel(n, _thr.chunk_size(n, 4 * (crs + k) * pq, target=_CONV_FORWARD_CHUNK_BYTES), body)
    relu_inplace(y, act)
    return y, (x, w2, g)


def _conv_backward_compiled(x, w2, g, dw, db, need_dx, body):
    """The compiled backward's driver, shared by conv2d_backward and conv2d_relu_maxpool_backward: one chunk of
    images per thread, body(b0, b1, cols, dcols, ones, acc, dx) with this thread's scratch columns and a per-chunk
    float32 accumulator acc = [dw (K, CRS), db (K,)], added up in chunk order (bit-identical from run to run). dw
    None (a frozen weight): acc[0] is a dummy the body leaves alone (it gets need_dw False)."""
    n = x.shape[0]
    k, crs, pq = g.k, w2.shape[1], g.p * g.q
    dx = np.empty(x.shape, dtype=_F) if need_dx else None
    dxa = dx if need_dx else np.empty((n, 1, 1, 1), dtype=_F)     # a dummy the compiled loop can index
    ones = np.ones(pq, dtype=_F)

    def make_acc():
        return [np.zeros((k, crs) if dw is not None else (1, 1), dtype=_F), np.zeros(k, dtype=_F)]

    def chunk(b0, b1, acc):
        body(b0, b1, _thr.scratch("jit_cols", (crs, pq)), _thr.scratch("jit_dcols", (crs, pq)), ones, acc, dxa)

    accs = _thr.parallel(n, _per_thread(n, 4 * (2 * crs + k) * pq), chunk, make_acc)
    if dw is not None:
        dw += sum(a[0] for a in accs).reshape(dw.shape)
    if db is not None:
        db += sum(a[1] for a in accs)
    return dx


def conv2d_backward(dy, cache, dw, db, need_dx=True, relu_mask=False):
    """Adds dE/dw, dE/db (each unless None); returns dE/dx (times (x > 0) with relu_mask: x was a ReLU output) or
    None."""
    x, w2, g = cache
    dx = _conv_backward(dy, x, w2, g, dw, db, need_dx)
    return _masked(dx, x) if relu_mask and dx is not None else dx


def _conv_backward(dy, x, w2, g, dw, db, need_dx):
    dy = _f32c(dy)
    n = x.shape[0]
    k, crs, pq = g.k, w2.shape[1], g.p * g.q
    if _c.SGEMM is not None:
        def jbody(b0, b1, cols, dcols, ones, acc, dxa):
            conv_backward(_c.SGEMM, x[b0:b1], w2, dy[b0:b1], g.r, g.s, g.stride, g.pad, cols, dcols, ones,
                               acc[0], acc[1], dxa[b0:b1], need_dx, dw is not None)

        return _conv_backward_compiled(x, w2, g, dw, db, need_dx, jbody)   # allocates its own dx
    dx = np.empty(x.shape, dtype=_F) if need_dx else None
    w2t = w2.T
    per_image = crs <= _PER_IMAGE_GEMM_MAX_CRS
    ones = np.ones(pq, dtype=_F)

    def make_acc():
        return [np.zeros((k, crs), dtype=_F) if dw is not None else None,
                np.zeros(k, dtype=_F) if db is not None else None]

    def body(b0, b1, acc):
        nb = b1 - b0
        dyb = dy[b0:b1].reshape(nb, k, pq)
        if acc[1] is not None:
            acc[1] += (dyb.reshape(-1, pq) @ ones).reshape(nb, k).sum(axis=0)   # term 2: dE/db = sum of dy
        cols = _im2col(x, b0, b1, g) if acc[0] is not None else None        # the columns serve term 1 only
        if cols is None and dx is None:
            return
        if per_image:
            # short columns: per-image GEMMs on dy as it is, no transposed copy of dy
            if cols is not None:                             # term 1: dE/dw = sum_b dy_b cols_b^T
                acc[0] += np.matmul(dyb, cols.reshape(crs, nb, pq).transpose(1, 2, 0)).sum(axis=0)
            if dx is None:
                return
            dcols = _thr.scratch(("conv_dcols_img",) + g.key(), (nb, crs, pq))
            np.matmul(w2t, dyb, out=dcols)                   # term 3: dE/dcols = w^T dy, then col2im
            _col2im(dcols.reshape(nb, g.c, g.r, g.s, g.p, g.q), dx[b0:b1], g, image_major=True)
            return
        dyt = _thr.scratch("conv_dyt", (k, nb * pq))
        np.copyto(dyt.reshape(k, nb, pq), dyb.transpose(1, 0, 2))
        if cols is not None:
            part = _thr.scratch("conv_dw", (crs, k))
            np.matmul(cols, dyt.T, out=part)                 # term 1: dE/dw = (cols dy^T)^T (BLAS likes this way)
            acc[0] += part.T
        if dx is None:
            return
        dcols = _thr.scratch(("conv_dcols",) + g.key(), (crs, nb * pq))
        np.matmul(w2t, dyt, out=dcols)                       # term 3: dE/dcols = w^T dy, then col2im
        _col2im(dcols.reshape(g.c, g.r, g.s, nb, g.p, g.q), dx[b0:b1], g, image_major=False)

    accs = _thr.parallel(n, _thr.chunk_size(n, 4 * (2 * crs + k) * pq), body, make_acc)
    if dw is not None:
        dw += sum(a[0] for a in accs).reshape(dw.shape)
    if db is not None:
        db += sum(a[1] for a in accs)
    return dx


def _col2im(d6, dxb, g: _ConvGeom, image_major: bool) -> None:
    """dxb[B, C, H, W] = sum over kernel taps of the column gradients d6, laid out (B, C, R, S, P, Q) when
    image_major else (C, R, S, B, P, Q). d6 is scratch and may be overwritten."""
    taps = g.taps
    full = g.full_tap
    if full is None:
        dxb.fill(0)
    else:   # a tap that reaches every input pixel (the centre, for stride 1): copy it instead of zero + add
        taps = [full] + [t for t in taps if t is not full]
    nb = dxb.shape[0]
    hw = g.h * g.w
    for n_tap, (i, j, plo, phi, qlo, qhi, hsl, wsl) in enumerate(taps):
        first = n_tap == 0 and full is not None
        if g.same:
            # flat shifted adds over whole images; the source columns that would wrap around a row are zeroed first
            if image_major:
                block, flat = d6[:, :, i, j], d6[:, :, i, j].reshape(nb, g.c, hw)
            else:
                block, flat = d6[:, i, j], d6[:, i, j].reshape(g.c, nb, hw).transpose(1, 0, 2)
            _zero_wrapped(block[..., plo:phi, :], qlo, qhi, g.q)
            (s0, s1), (d0, d1) = _flat_ranges(plo * g.w, phi * g.w, (i - g.pad) * g.w + j - g.pad, hw)
            dst, src = dxb.reshape(nb, g.c, hw)[:, :, d0:d1], flat[:, :, s0:s1]
        else:
            dst = dxb[:, :, hsl, wsl]
            if image_major:
                src = d6[:, :, i, j, plo:phi, qlo:qhi]
            else:
                src = d6[:, i, j, :, plo:phi, qlo:qhi].transpose(1, 0, 2, 3)
        if first:
            np.copyto(dst, src)
        else:
            np.add(dst, src, out=dst)


# --- convolution + ReLU + max pooling, fused --------------------------------------------------------------------


def conv2d_maxpool_forward(x, w, b, stride, padding, pool_kernel, pool_stride, relu_mask=None):
    """maxpool2d(conv2d(x)) as the two ops (this backend has no kernel that joins them)."""
    return compose.conv2d_maxpool_forward(_c.backend(), x, w, b, stride, padding, pool_kernel, pool_stride, relu_mask)


def conv2d_maxpool_backward(dy, cache, dw, db, need_dx=True, relu_mask=False):
    return compose.conv2d_maxpool_backward(_c.backend(), dy, cache, dw, db, need_dx, relu_mask)


def conv2d_gelu_forward(x, w, b, stride, padding, relu_mask=None):
    """gelu(conv2d(x)) as the two ops (this backend has no kernel that joins them)."""
    return compose.conv2d_gelu_forward(_c.backend(), x, w, b, stride, padding, relu_mask)


def conv2d_gelu_backward(dy, cache, dw, db, need_dx=True, relu_mask=False):
    return compose.conv2d_gelu_backward(_c.backend(), dy, cache, dw, db, need_dx, relu_mask)


def conv2d_relu_maxpool_forward(x, w, b, stride, padding, pool_kernel, pool_stride):
    """maxpool2d(relu(conv2d(x))): y[N,K,P',Q'], cache. With 2x2 windows, stride 2 (and the compiled paths) one pass
    per image, bit-identical to the three ops: the full-size conv output is never stored (backward needs only x,
    the pooled output and each window's choice); other windows run the three ops (backends.compose)."""
    x, g, w2 = _conv_setup(x, w, stride, padding)
    if not (pool_kernel == 2 and pool_stride == 2 and _c.SGEMM is not None and g.p >= 2 and g.q >= 2):
        return compose.conv2d_relu_maxpool_forward(_c.backend(), x, w, b, stride, padding, pool_kernel, pool_stride)
    n, k, pq, crs = x.shape[0], g.k, g.p * g.q, w2.shape[1]
    y = np.empty((n, k, g.p // 2, g.q // 2), dtype=_F)
    idx = np.empty(y.shape, dtype=np.uint8)
    bias = np.zeros(k, dtype=_F) if b is None else _f32c(b)

    def body(b0, b1, _):
        cols = _thr.scratch("jit_cols", (crs, pq))
        ybuf = _thr.scratch("jit_conv_out", (k, g.p, g.q))
        conv_relu_pool_forward(_c.SGEMM, x[b0:b1], w2, bias, b is not None, g.r, g.s, stride, padding, cols,
                                    ybuf, y[b0:b1], idx[b0:b1])

    _thr.parallel(n, _per_thread(n, 4 * (crs + k) * pq), body)
    return y, ("native", x, w2, g, y, idx)


def conv2d_relu_maxpool_backward(dy, cache, dw, db, need_dx=True, relu_mask=False):
    """Backward of conv2d_relu_maxpool_forward (dy: the pooled output's gradient); same sums, in the same chunks, as
    maxpool2d_backward -> relu_backward -> conv2d_backward."""
    if cache[0] != "native":
        return compose.conv2d_relu_maxpool_backward(_c.backend(), dy, cache, dw, db, need_dx, relu_mask)
    _, x, w2, g, ypool, idx = cache
    dy = _f32c(dy)

    def body(b0, b1, cols, dcols, ones, acc, dxa):
        dybuf = _thr.scratch("jit_conv_dy", (g.k, g.p, g.q))
        conv_backward_from_pool(_c.SGEMM, x[b0:b1], w2, dy[b0:b1], ypool[b0:b1], idx[b0:b1], g.r, g.s,
                                     g.stride, g.pad, cols, dcols, dybuf, ones, acc[0], acc[1], dxa[b0:b1], need_dx,
                                     dw is not None)

    dx = _conv_backward_compiled(x, w2, g, dw, db, need_dx, body)
    return _masked(dx, x) if relu_mask and dx is not None else dx


# --- compiled loops -------------------------------------------------------------------------------------------------

if jit.available():
    from .pool import maxpool2x2_backward_loop, maxpool2x2_forward_loop

    _jit, _jit_inline, _U = jit.kernel, jit.kernel_inline, jit.U

    # --- convolution, one image at a time: columns cols[(c, r, s), (p, q)] = xpad[c, p*stride + r, q*stride + s] ---
    # The GEMMs are OpenBLAS's sgemm called from the compiled loop (no GIL, no temporaries); `gemm` is that
    # function as a ctypes object (cblas_sgemm's arguments), found by `threads.find_sgemm()`.

    # Indices are unsigned (`_U`): Numba then drops its negative-index wrap-around and LLVM vectorises the copies
    # (measured 3.5 -> 1.1 ms for fashion-cnn conv2's columns at batch 128; NumPy's per-chunk copies took 1.6).

    # Both take the kernel size, stride and padding as constants for the 3x3 / stride 1 / padding 1 convolution of
    # every preset (the tap loops' bounds are then known and LLVM unrolls and vectorises them), as arguments
    # otherwise. Same arithmetic either way. One thread, thesis-m0's conv2 (6x6 images, 16 -> 32 channels): im2col
    # 3.8 -> 2.4 us, col2im 3.9 -> 2.1 us per image.

    @_jit
    def _im2col_image(xb, r_, s_, stride, pad, p, q, cols):
        if r_ == 3 and s_ == 3 and stride == 1 and pad == 1:
            _im2col_taps(xb, 3, 3, 1, 1, p, q, cols)
        else:
            _im2col_taps(xb, r_, s_, stride, pad, p, q, cols)

    @_jit
    def _col2im_image(dcols, r_, s_, stride, pad, p, q, dxb):
        """dxb[c, h, w] = sum over taps of dcols[(c, r, s), (p, q)] with h = p*stride + r - pad (and w); dcols is
        scratch and may be overwritten."""
        if r_ == 3 and s_ == 3 and stride == 1 and pad == 1:
            _col2im_taps(dcols, 3, 3, 1, 1, p, q, dxb)
        else:
            _col2im_taps(dcols, r_, s_, stride, pad, p, q, dxb)

    @_jit_inline
    def _im2col_taps(xb, r_, s_, stride, pad, p, q, cols):
        c, h, w = xb.shape
        hw, pq = h * w, p * q
        xf = xb.reshape(c * hw)
        cf = cols.reshape(cols.size)
        zero = _F(0)
        same = stride == 1 and p == h and q == w
        for ch in range(c):
            for i in range(r_):
                for j in range(s_):
                    d0 = _U(((ch * r_ + i) * s_ + j) * pq)
                    qlo = max(0, -((j - pad) // stride))
                    qhi = max(qlo, min(q, (w - 1 + pad - j) // stride + 1))
                    if same:
                        # a flat shift of the whole image, then the pixels that wrapped around a row end are zeroed
                        off = (i - pad) * w + (j - pad)
                        lo = max(0, -off)
                        hi = max(lo, min(hw, hw - off))
                        s0 = ch * hw + off
                        for f in range(lo):
                            cf[d0 + _U(f)] = zero
                        for f in range(lo, hi):
                            cf[d0 + _U(f)] = xf[_U(s0 + f)]
                        for f in range(hi, hw):
                            cf[d0 + _U(f)] = zero
                        for pp in range(p):
                            for qq in range(qlo):
                                cf[d0 + _U(pp * q + qq)] = zero
                            for qq in range(qhi, q):
                                cf[d0 + _U(pp * q + qq)] = zero
                        continue
                    for pp in range(p):
                        o = d0 + _U(pp * q)
                        hh = pp * stride + i - pad
                        if hh < 0 or hh >= h:
                            for qq in range(q):
                                cf[o + _U(qq)] = zero
                            continue
                        s0 = ch * hw + hh * w + j - pad
                        for qq in range(qlo):
                            cf[o + _U(qq)] = zero
                        for qq in range(qlo, qhi):
                            cf[o + _U(qq)] = xf[_U(s0 + qq * stride)]
                        for qq in range(qhi, q):
                            cf[o + _U(qq)] = zero

    @_jit_inline
    def _col2im_taps(dcols, r_, s_, stride, pad, p, q, dxb):
        c, h, w = dxb.shape
        hw, pq = h * w, p * q
        img = dxb.reshape(c * hw)
        sf = dcols.reshape(dcols.size)
        zero = _F(0)
        same = stride == 1 and p == h and q == w
        for ch in range(c):
            i0 = _U(ch * hw)
            for f in range(hw):
                img[i0 + _U(f)] = zero
            for i in range(r_):
                for j in range(s_):
                    d0 = _U(((ch * r_ + i) * s_ + j) * pq)
                    qlo = max(0, -((j - pad) // stride))
                    qhi = max(qlo, min(q, (w - 1 + pad - j) // stride + 1))
                    if same:
                        # flat shifted add; the source pixels that would wrap around a row end are zeroed first
                        for pp in range(p):
                            for qq in range(qlo):
                                sf[d0 + _U(pp * q + qq)] = zero
                            for qq in range(qhi, q):
                                sf[d0 + _U(pp * q + qq)] = zero
                        off = (i - pad) * w + (j - pad)
                        lo = max(0, -off)
                        hi = max(lo, min(hw, hw - off))
                        t0 = ch * hw + off
                        for f in range(lo, hi):
                            img[_U(t0 + f)] += sf[d0 + _U(f)]
                        continue
                    for pp in range(p):
                        hh = pp * stride + i - pad
                        if hh < 0 or hh >= h:
                            continue
                        o = d0 + _U(pp * q)
                        t0 = ch * hw + hh * w + j - pad
                        for qq in range(qlo, qhi):
                            img[_U(t0 + qq * stride)] += sf[o + _U(qq)]

    @_jit
    def conv_forward(gemm, x, w2, bias, has_bias, r_, s_, stride, pad, cols, y):
        """y[b] (K, P*Q) = w2 (K, C*R*S) @ cols_b (+ bias[k]) for each image b of the chunk; cols: (CRS, PQ) scratch."""
        nb = x.shape[0]
        k, crs = w2.shape
        p, q = y.shape[2], y.shape[3]
        pq = p * q
        for b in range(nb):
            _im2col_image(x[b], r_, s_, stride, pad, p, q, cols)
            yb = y[b]
            gemm(101, 111, 111, k, pq, crs, _F(1), w2.ctypes.data, crs, cols.ctypes.data, pq, _F(0),
                 yb.ctypes.data, pq)
            if has_bias:
                yf = yb.reshape(k, pq)
                for kk in range(k):
                    bk = bias[kk]
                    for f in range(pq):
                        yf[kk, f] += bk

    @_jit
    def _conv_backward_image(gemm, xb, w2, dyb, r_, s_, stride, pad, cols, dcols, ones, dw, db, dxb, need_dx,
                             need_dw):
        """One image: (need_dw) dw += dy cols^T, db += dy 1, and (need_dx) dx = col2im(w2^T dy) -- the three conv
        derivatives (terms 1-3 in cpu.py); dw (K, CRS) and db (K,) are float32 partial sums."""
        k, crs = w2.shape
        p, q = dyb.shape[1], dyb.shape[2]
        pq = p * q
        if need_dw:
            _im2col_image(xb, r_, s_, stride, pad, p, q, cols)
            gemm(101, 111, 112, k, crs, pq, _F(1), dyb.ctypes.data, pq, cols.ctypes.data, pq, _F(1),
                 dw.ctypes.data, crs)
        gemm(101, 111, 111, k, 1, pq, _F(1), dyb.ctypes.data, pq, ones.ctypes.data, 1, _F(1),
             db.ctypes.data, 1)
        if need_dx:
            gemm(101, 112, 111, crs, pq, k, _F(1), w2.ctypes.data, crs, dyb.ctypes.data, pq, _F(0),
                 dcols.ctypes.data, pq)
            _col2im_image(dcols, r_, s_, stride, pad, p, q, dxb)

    @_jit
    def conv_backward(gemm, x, w2, dy, r_, s_, stride, pad, cols, dcols, ones, dw, db, dx, need_dx, need_dw):
        """_conv_backward_image for each image b of the chunk (dx, dw are dummies when not need_dx, need_dw)."""
        for b in range(x.shape[0]):
            _conv_backward_image(gemm, x[b], w2, dy[b], r_, s_, stride, pad, cols, dcols, ones, dw, db,
                                 dx[b if need_dx else 0], need_dx, need_dw)

    # --- convolution + ReLU + 2x2 max pooling fused, one image at a time (the cpu step's fast path) -----------------
    # Same arithmetic as the three ops one after the other (gemm, += bias, max(v, 0), first maximum), so results are
    # bit-identical; the conv output (K, P, Q) of one image lives only in an L2-sized scratch buffer, and the ReLU's
    # mask is not stored: at a window's chosen element the ReLU output is the pooled value.

    @_jit
    def conv_relu_pool_forward(gemm, x, w2, bias, has_bias, r_, s_, stride, pad, cols, ybuf, y, idx):
        """y[b] = maxpool2x2(relu(conv(x[b]))), idx[b] = the windows' first maxima (0..3); ybuf: (K, P, Q) scratch."""
        nb = x.shape[0]
        k, crs = w2.shape
        p, q = ybuf.shape[1], ybuf.shape[2]
        pq = p * q
        zero = _F(0)
        for b in range(nb):
            _im2col_image(x[b], r_, s_, stride, pad, p, q, cols)
            gemm(101, 111, 111, k, pq, crs, _F(1), w2.ctypes.data, crs, cols.ctypes.data, pq, _F(0),
                 ybuf.ctypes.data, pq)
            yf = ybuf.reshape(k, pq)
            for kk in range(k):
                bk = bias[kk] if has_bias else zero
                row = yf[kk]
                for f in range(pq):
                    v = row[f] + bk if has_bias else row[f]
                    row[f] = v if v > zero else zero   # noqa: FURB136 - NaN gives 0, as relu_forward
            maxpool2x2_forward_loop(ybuf.reshape(1, k, p, q), y[b:b + 1], idx[b:b + 1])

    @_jit
    def conv_backward_from_pool(gemm, x, w2, dpool, ypool, idx, r_, s_, stride, pad, cols, dcols, dybuf, ones,
                                dw, db, dx, need_dx, need_dw):
        """Backward of conv_relu_pool_forward: per image, dy of the conv = dpool routed to each window's chosen
        element where the pooled output is > 0 (ReLU's backward), 0 elsewhere; then _conv_backward_image."""
        nb = x.shape[0]
        k, p, q = dybuf.shape
        pp, qq = dpool.shape[2], dpool.shape[3]
        zero = _F(0)
        for b in range(nb):
            maxpool2x2_backward_loop(dpool[b:b + 1], idx[b:b + 1], dybuf.reshape(1, k, p, q))
            for kk in range(k):
                for i in range(pp):
                    gr = dybuf[kk, 2 * i]
                    gr2 = dybuf[kk, 2 * i + 1]
                    yr = ypool[b, kk, i]
                    for j in range(qq):
                        if not yr[j] > zero:
                            gr[2 * j] = zero
                            gr[2 * j + 1] = zero
                            gr2[2 * j] = zero
                            gr2[2 * j + 1] = zero
            _conv_backward_image(gemm, x[b], w2, dybuf, r_, s_, stride, pad, cols, dcols, ones, dw, db,
                                 dx[b if need_dx else 0], need_dx, need_dw)
