"""Pooling on the cpu backend: max pooling (2x2 / stride 2 compiled or on strided views with bit masks, any other
window by argmax), average pooling and global average pooling.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

from . import _jit as jit
from . import threads as _thr
from ._common import _F, _f32c, _jit_parallel


# --- pooling --------------------------------------------------------------------------------------------------------


def _windows(x, r, s, stride, p, q):
    """Strided view xw[n, c, p, q, i, j] = x[n, c, p*stride + i, q*stride + j] (no copy)."""
    n, c, _, _ = x.shape
    sn, sc, sh, sw = x.strides
    return as_strided(x, (n, c, p, q, r, s), (sn, sc, sh * stride, sw * stride, sh, sw), writeable=False)


def maxpool2d_forward(x, kernel, stride):
    """y[n,c,p,q] = max over the window. The cache says where each window's first maximum (row-major) is, and
    keeps y (the ReLU mask of a backward with relu_mask)."""
    x = _f32c(x)
    n, c, h, w = x.shape
    p = (h - kernel) // stride + 1
    q = (w - kernel) // stride + 1
    if kernel == 2 and stride == 2:
        if jit.available():
            y = np.empty((n, c, p, q), dtype=_F)
            idx = np.empty((n, c, p, q), dtype=np.uint8)
            _jit_parallel(n, 4 * c * h * w, lambda b0, b1, _: maxpool2x2_forward_loop(x[b0:b1], y[b0:b1], idx[b0:b1]))
            return y, ("2x2jit", idx, x.shape, 2, 2, y)
        return _maxpool2x2_forward(x, p, q)
    xw = _windows(x, kernel, kernel, stride, p, q).reshape(n, c, p, q, kernel * kernel)
    arg = xw.argmax(axis=-1)
    y = np.take_along_axis(xw, arg[..., None], axis=-1)[..., 0]
    y = np.ascontiguousarray(y)
    return y, ("general", arg, x.shape, kernel, stride, y)


def _maxpool2x2_forward(x, p, q):
    # Corners a b / c d. Horizontal pairs first (one strided pass over half the data): hm = max of each pair and
    # right = (second > first), for top and bottom rows alike; then rows, contiguous: low = hm(bottom) > hm(top).
    # Comparisons are strict, so ties keep the earlier element: (low, right of the chosen row) is the window's first
    # maximum in row-major order.
    n, c, h, w = x.shape
    y = np.empty((n, c, p, q), dtype=_F)
    right = np.empty((n, c, 2 * p, q), dtype=np.bool_)
    low = np.empty((n, c, p, q), dtype=np.bool_)

    def body(b0, b1, _):
        xb = x[b0:b1, :, :2 * p, :2 * q]
        hm = _thr.scratch("mp_hm", (b1 - b0, c, 2 * p, q))
        np.maximum(xb[..., 0::2], xb[..., 1::2], out=hm)
        np.greater(xb[..., 1::2], xb[..., 0::2], out=right[b0:b1])
        np.greater(hm[:, :, 1::2], hm[:, :, 0::2], out=low[b0:b1])
        np.maximum(hm[:, :, 0::2], hm[:, :, 1::2], out=y[b0:b1])

    _thr.parallel(n, _thr.chunk_size(n, 4 * c * 4 * p * q), body)
    return y, ("2x2", (right, low), x.shape, 2, 2, y)


def maxpool2d_backward(dy, cache, relu_mask=False):
    """dE/dx: dy at each window's first maximum, overlapping windows adding. relu_mask (x was a ReLU output): dy
    where the window's maximum y is > 0 -- the same as dx * (x > 0), since x = y where dx is routed."""
    kind, arg, xshape, kernel, stride, y = cache
    dy = _f32c(dy)
    if relu_mask:
        dy = np.where(y > 0, dy, _F(0))
    n, c, p, q = dy.shape
    if kind == "2x2jit":
        dx = np.empty(xshape, dtype=_F)
        _jit_parallel(n, 4 * xshape[1] * xshape[2] * xshape[3],
                      lambda b0, b1, _: maxpool2x2_backward_loop(dy[b0:b1], arg[b0:b1], dx[b0:b1]))
        return dx
    if kind == "2x2":
        return _maxpool2x2_backward(dy, arg, xshape, p, q)
    dx = np.zeros(xshape, dtype=_F)
    for i in range(kernel):
        for j in range(kernel):
            sel = arg == i * kernel + j
            dst = dx[:, :, i:i + stride * (p - 1) + 1:stride, j:j + stride * (q - 1) + 1:stride]
            dst += dy * sel
    return dx


def _maxpool2x2_backward(dy, masks, xshape, p, q):
    right, low = masks
    n, c, h, w = xshape
    dx = np.empty(xshape, dtype=_F)
    if h != 2 * p:
        dx[:, :, 2 * p:, :] = 0
    if w != 2 * q:
        dx[:, :, :, 2 * q:] = 0

    def body(b0, b1, _):
        nb = b1 - b0
        g = _thr.scratch("mp_g", (nb, c, 2 * p, q))     # dy routed to the chosen row of each window
        np.multiply(dy[b0:b1], low[b0:b1], out=g[:, :, 1::2])
        np.subtract(dy[b0:b1], g[:, :, 1::2], out=g[:, :, 0::2])   # exact: one of the two rows gets 0
        dxb = dx[b0:b1, :, :2 * p, :2 * q]
        np.multiply(g, right[b0:b1], out=dxb[..., 1::2])
        np.subtract(g, dxb[..., 1::2], out=dxb[..., 0::2])

    _thr.parallel(n, _thr.chunk_size(n, 4 * c * 4 * p * q), body)
    return dx



def avgpool2d_forward(x, kernel, stride):
    n, c, h, w = x.shape
    p = (h - kernel) // stride + 1
    q = (w - kernel) // stride + 1
    xw = _windows(x, kernel, kernel, stride, p, q)
    y = xw.mean(axis=(4, 5), dtype=_F)
    return np.ascontiguousarray(y, dtype=_F), (x.shape, kernel, stride)


def avgpool2d_backward(dy, cache):
    xshape, kernel, stride = cache
    n, c, p, q = dy.shape
    dx = np.zeros(xshape, dtype=_F)
    g = dy * _F(1.0 / (kernel * kernel))
    for i in range(kernel):
        for j in range(kernel):
            dx[:, :, i:i + stride * (p - 1) + 1:stride, j:j + stride * (q - 1) + 1:stride] += g
    return dx


def global_avgpool2d_forward(x):
    n, c, h, w = x.shape
    return x.reshape(n, c, h * w).mean(axis=2, dtype=_F), x.shape


def global_avgpool2d_backward(dy, cache):
    n, c, h, w = cache
    dx = np.empty(cache, dtype=_F)
    dx[...] = (dy * _F(1.0 / (h * w)))[:, :, None, None]
    return dx


# --- compiled loops -------------------------------------------------------------------------------------------------

if jit.available():
    _jit = jit.kernel

    # --- 2x2 max pooling, stride 2: window a b / c d; idx = 0..3, the first maximum in row-major order ------------

    @_jit
    def window_max(v0, v1, v2, v3):
        """(the maximum, the position 0..3 of its first occurrence) of a window's values in row-major order."""
        m = v0
        k = 0
        if v1 > m:          # strict: ties keep the earlier element
            m = v1
            k = 1
        if v2 > m:
            m = v2
            k = 2
        if v3 > m:
            m = v3
            k = 3
        return m, k

    @_jit
    def maxpool2x2_forward_loop(x, y, idx):
        n, c, p, q = y.shape
        for b in range(n):
            for ch in range(c):
                for i in range(p):
                    top = x[b, ch, 2 * i]
                    bot = x[b, ch, 2 * i + 1]
                    yr = y[b, ch, i]
                    ir = idx[b, ch, i]
                    for j in range(q):
                        yr[j], ir[j] = window_max(top[2 * j], top[2 * j + 1], bot[2 * j], bot[2 * j + 1])

    @_jit
    def maxpool2x2_backward_loop(dy, idx, dx):
        # dx[window] = dy at the chosen element, 0 elsewhere; rows/columns no window covers (odd H, W) get 0.
        # The inner loop runs over whole output rows (contiguous stores: 3.6x faster than a loop over windows).
        n, c, p, q = dy.shape
        h, w = dx.shape[2], dx.shape[3]
        zero = _F(0)
        for b in range(n):
            for ch in range(c):
                for i in range(p):
                    top = dx[b, ch, 2 * i]
                    bot = dx[b, ch, 2 * i + 1]
                    gr = dy[b, ch, i]
                    ir = idx[b, ch, i]
                    for jj in range(2 * q):
                        g = gr[jj >> 1]
                        k = ir[jj >> 1]
                        top[jj] = g if k == (jj & 1) else zero
                        bot[jj] = g if k == (jj & 1) + 2 else zero
                    for jj in range(2 * q, w):
                        top[jj] = zero
                        bot[jj] = zero
                for r in range(2 * p, h):
                    dx[b, ch, r] = zero

