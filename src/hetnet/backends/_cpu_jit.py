"""Compiled loops (Numba) for the cpu backend's memory-bound ops: ReLU, 2x2 max pooling, BatchNorm.

NumPy does these as several whole-array passes (a mask, a strided maximum, a multiply, an add ...), each a round trip
through memory and, with two threads, a GIL hand-over per call. Here each op is one or two passes over a chunk of the
batch in one call that holds no GIL (`nogil=True`); `cpu.py` hands the chunks to its own thread pool, as for the
GEMMs. The loops are serial on purpose: Numba's parallel layer must not be entered from several threads at once.
Compiled code is cached on disk (`cache=True`), so only the very first run on a machine pays the compile.
The arithmetic is the same IEEE float32 as the NumPy code it replaces (no fastmath), except that the float64 sums of
the BatchNorm statistics may be reassociated (vectorised); benchmarks/README-cpu.md has the measurements.

`available()` is False when Numba cannot be imported (or HETNET_NO_NUMBA=1): the cpu backend then keeps its NumPy
paths. Shape legend as in `hetnet.backends`: N batch (here: the images of one chunk), C channels, H/W, P/Q.
"""
from __future__ import annotations

import os

import numpy as np

try:
    if os.environ.get("HETNET_NO_NUMBA", "").strip() not in ("", "0"):
        raise ImportError("HETNET_NO_NUMBA is set")
    from numba import njit
except ImportError:     # numba missing or broken: the NumPy paths in cpu.py are used instead
    njit = None

_F = np.float32


def available() -> bool:
    return njit is not None


if njit is not None:
    _jit = njit(nogil=True, cache=True, fastmath=False, error_model="numpy")
    # float64 sums may run in any order (SIMD lanes); nothing else is relaxed
    _jit_sum = njit(nogil=True, cache=True, fastmath={"reassoc"}, error_model="numpy")

    # --- ReLU: y = max(x, 0) (NaN -> 0, like the reference); backward dx = dy where y > 0 (y > 0 iff x > 0) ------

    @_jit
    def relu_forward(x, y):
        zero = _F(0)
        for i in range(x.size):
            v = x[i]
            y[i] = v if v > zero else zero

    @_jit
    def relu_backward(dy, y, dx):
        zero = _F(0)
        for i in range(dy.size):
            dx[i] = dy[i] if y[i] > zero else zero

    # --- 2x2 max pooling, stride 2: window a b / c d; idx = 0..3, the first maximum in row-major order ------------

    @_jit
    def maxpool2x2_forward(x, y, idx):
        n, c, p, q = y.shape
        for b in range(n):
            for ch in range(c):
                for i in range(p):
                    top = x[b, ch, 2 * i]
                    bot = x[b, ch, 2 * i + 1]
                    yr = y[b, ch, i]
                    ir = idx[b, ch, i]
                    for j in range(q):
                        m = top[2 * j]
                        k = 0
                        v = top[2 * j + 1]
                        if v > m:          # strict: ties keep the earlier element
                            m = v
                            k = 1
                        v = bot[2 * j]
                        if v > m:
                            m = v
                            k = 2
                        v = bot[2 * j + 1]
                        if v > m:
                            m = v
                            k = 3
                        yr[j] = m
                        ir[j] = k

    @_jit
    def maxpool2x2_backward(dy, idx, dx):
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

    # --- BatchNorm (x viewed as (N, C, HW)) -------------------------------------------------------------------------

    @_jit_sum
    def bn_sums(x3, centre, s, ss):
        """s[c] += sum x, ss[c] += sum (x - centre[c])^2, over the chunk's images and pixels, in float64."""
        n, c, hw = x3.shape
        for b in range(n):
            for ch in range(c):
                row = x3[b, ch]
                m = centre[ch]
                a = 0.0
                a2 = 0.0
                for i in range(hw):
                    v = np.float64(row[i])
                    a += v
                    d = v - m
                    a2 += d * d
                s[ch] += a
                ss[ch] += a2

    @_jit_sum
    def bn_backward_sums(dy3, x3, mean, s, sx):
        """s[c] += sum dy, sx[c] += sum dy * (x - mean[c]), in float64."""
        n, c, hw = x3.shape
        for b in range(n):
            for ch in range(c):
                g = dy3[b, ch]
                row = x3[b, ch]
                m = mean[ch]
                a = 0.0
                a2 = 0.0
                for i in range(hw):
                    d = np.float64(g[i])
                    a += d
                    a2 += d * (np.float64(row[i]) - m)
                s[ch] += a
                sx[ch] += a2

    @_jit
    def bn_apply(x3, scale, shift, y3):
        """y = x * scale[c] + shift[c] (two float32 roundings, as NumPy's multiply then add)."""
        n, c, hw = x3.shape
        for b in range(n):
            for ch in range(c):
                sc = scale[ch]
                sh = shift[ch]
                xr = x3[b, ch]
                yr = y3[b, ch]
                for i in range(hw):
                    yr[i] = xr[i] * sc + sh

    @_jit
    def bn_backward_apply(dy3, x3, a, bc, cc, mean, dx3):
        """dx = a[c] * dy + bc[c] * (x - mean[c]) + cc[c] in float32."""
        n, c, hw = x3.shape
        for b in range(n):
            for ch in range(c):
                ac = a[ch]
                bcc = bc[ch]
                ccc = cc[ch]
                m = mean[ch]
                g = dy3[b, ch]
                xr = x3[b, ch]
                out = dx3[b, ch]
                for i in range(hw):
                    out[i] = ac * g[i] + bcc * (xr[i] - m) + ccc
