"""Compiled loops (Numba) for the cpu backend: ReLU, 2x2 max pooling, BatchNorm, the SGD update, the convolutions,
the dense chains' bias / ReLU passes and the softmax cross-entropy.

NumPy does these as many calls (a mask, a strided maximum, a multiply, an add, one copy per kernel tap ...), each a
pass through memory and, with two threads, a GIL hand-over. Here each op is one call per chunk of the batch that
holds no GIL (`nogil=True`); `cpu.py` hands the chunks to its own thread pool. A convolution chunk works image by
image (im2col into an L2-sized buffer, OpenBLAS's sgemm called from the loop through ctypes, col2im), so its columns
never leave the cache. The loops are serial on purpose: Numba's parallel layer must not be entered from several
threads at once. Compiled code is cached on disk (`cache=True`): the first run on a machine compiles (about 3 s),
later processes load it (about 0.3 s, at the first step). The arithmetic is the same IEEE float32 as the NumPy code
(no fastmath), except that the float64 sums of the BatchNorm statistics may be reassociated (vectorised).
benchmarks/README-cpu.md has the measurements.

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
    from numba import uint64 as _U
except ImportError:     # numba missing or broken: the NumPy paths in cpu.py are used instead
    njit = None

_F = np.float32


def available() -> bool:
    return njit is not None


if njit is not None:
    _jit = njit(nogil=True, cache=True, fastmath=False, error_model="numpy")
    # float64 sums may run in any order (SIMD lanes); nothing else is relaxed
    _jit_sum = njit(nogil=True, cache=True, fastmath={"reassoc"}, error_model="numpy")
    # inlined into its caller at Numba's level, so that sizes the caller passes as constants are constants inside
    _jit_inline = njit(nogil=True, cache=True, fastmath=False, error_model="numpy", inline="always")

    # --- ReLU: y = max(x, 0) (NaN -> 0, like the reference); backward dx = dy where y > 0 (y > 0 iff x > 0) ------

    @_jit
    def relu_forward(x, y):
        zero = _F(0)
        for i in range(x.size):
            v = x[i]
            y[i] = v if v > zero else zero   # noqa: FURB136 - NaN gives 0, as in the reference

    @_jit
    def relu_backward(dy, y, dx):
        zero = _F(0)
        for i in range(dy.size):
            dx[i] = dy[i] if y[i] > zero else zero

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
                        yr[j], ir[j] = window_max(top[2 * j], top[2 * j + 1], bot[2 * j], bot[2 * j + 1])

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

    # --- SGD (torch.optim.SGD), one pass over the flat parameter buffer ----------------------------------------------
    # The float32 operations of cpu.py's NumPy version, in the same order: d = p*wd + g; buf = d (first step) or
    # buf*momentum + (damp1*d, or d without dampening); d = buf*momentum + d (Nesterov) or buf; p = p - d*lr.

    @_jit
    def sgd_update(p, g, buf, has_buf, lr, momentum, damp1, dampening, nesterov, wd, first):
        zero = _F(0)
        for i in range(p.size):
            d = g[i]
            if wd != zero:
                d = p[i] * wd + d
            if has_buf:
                if first:
                    b = d
                else:
                    b = buf[i] * momentum + (damp1 * d if dampening else d)
                buf[i] = b
                d = b * momentum + d if nesterov else b
            p[i] = p[i] - d * lr

    # --- Dense chains in feature-major layout (yT[K, N], one row per output feature; cpu.dense_chain_*) ------------

    @_jit
    def bias_relu_rows(yt, b, has_bias, relu):
        """In place on yT[K', N]: yT[k] += b[k] (one float32 rounding, as NumPy's y += b), then max(., 0)."""
        zero = _F(0)
        for k in range(yt.shape[0]):
            row = yt[k]
            bk = b[k] if has_bias else zero
            for j in range(row.size):
                v = row[j] + bk if has_bias else row[j]
                row[j] = (v if v > zero else zero) if relu else v   # noqa: FURB136 - NaN gives 0

    @_jit_sum
    def relu_mask_rowsum(dht, ht, relu, db, has_db, accumulate):
        """In place on dhT[K', N]: dz = dh where h > 0 (relu), else dh; db[k] (+)= sum_n dz[k, n], summed in
        float64 and rounded once."""
        zero = _F(0)
        for k in range(dht.shape[0]):
            row = dht[k]
            hr = ht[k]
            s = 0.0
            for j in range(row.size):
                v = row[j]
                if relu and not hr[j] > zero:
                    v = zero
                row[j] = v
                s += np.float64(v)
            if has_db:
                db[k] = db[k] + _F(s) if accumulate else _F(s)

    # --- softmax cross-entropy: the NumPy version's float32 operations row by row, in one call -------------------

    @_jit
    def softmax_xent(logits, labels, ls, d):
        """d = (softmax(z) - t) / N for the target t = (1 - ls) one-hot + ls / K; returns the mean loss (float64).
        Per row: z = x - max, e = exp z (one exp per element), softmax = e / sum e, log-softmax z - log(sum e)."""
        n, k = logits.shape
        inv_n = _F(1.0 / max(n, 1))
        off = _F(ls / k)
        hit = _F(1.0 - ls)
        total = 0.0
        for i in range(n):
            row = logits[i]
            out = d[i]
            m = row[0]
            for j in range(1, k):
                m = max(m, row[j])
            s = _F(0)
            for j in range(k):
                e = np.exp(row[j] - m)
                out[j] = e
                s += e
            lse = np.log(s)
            inv_s = _F(1) / s
            for j in range(k):
                out[j] = (out[j] * inv_s - off) * inv_n
            lab = labels[i]
            out[lab] -= hit * inv_n
            nll = -np.float64((row[lab] - m) - lse)
            if ls != 0.0:
                zsum = 0.0
                for j in range(k):
                    zsum += np.float64(row[j] - m)
                nll = (1.0 - ls) * nll + ls * (np.float64(lse) - zsum / k)   # -mean_j logp_j = lse - mean z
            total += nll
        return total / n if n else 0.0

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

    # --- BatchNorm2D -> ReLU -> MaxPool2D(2), fused (the step's op for that chain, see cpu.bn_relu_maxpool_*) -----
    # The same float32 operations as bn_apply, relu_forward and maxpool2x2_forward in turn, and as
    # bn_backward_apply on the gradient max pooling and ReLU pass back, without the full-size intermediates.

    @_jit
    def bn_relu_pool2_forward(x, scale, shift, y, idx):
        """y = max over each 2x2 window of relu(x * scale[c] + shift[c]); idx = the window position (0..3) of the
        first maximum in row-major order."""
        n, c, p, q = y.shape
        zero = _F(0)
        for b in range(n):
            for ch in range(c):
                sc = scale[ch]
                sh = shift[ch]
                for i in range(p):
                    top = x[b, ch, 2 * i]
                    bot = x[b, ch, 2 * i + 1]
                    yr = y[b, ch, i]
                    ir = idx[b, ch, i]
                    for j in range(q):
                        v0 = top[2 * j] * sc + sh
                        v1 = top[2 * j + 1] * sc + sh
                        v2 = bot[2 * j] * sc + sh
                        v3 = bot[2 * j + 1] * sc + sh
                        yr[j], ir[j] = window_max(v0 if v0 > zero else zero, v1 if v1 > zero else zero,
                                                  v2 if v2 > zero else zero, v3 if v3 > zero else zero)

    # The backward passes are branch-free: which element of a window is its maximum, and whether the ReLU let it
    # through, are random from window to window, and as branches they cost a misprediction each (the first version
    # of bn_relu_pool2_backward_apply, with them: 14 ms for 128x32x28x28 against 1.3 ms for the arithmetic alone).

    @_jit_sum
    def bn_relu_pool2_backward_sums(dyp, ypool, idx, x, mean, s, sx):
        """BN's backward sums of the gradient g that max pooling and ReLU pass back (dy at each window's maximum
        where the pooled value is > 0, zero elsewhere): s[c] += sum g, sx[c] += sum g * (x - mean[c]), float64."""
        n, c, p, q = dyp.shape
        zero = _F(0)
        for b in range(n):
            for ch in range(c):
                m = mean[ch]
                a = 0.0
                a2 = 0.0
                for i in range(p):
                    gr = dyp[b, ch, i]
                    yr = ypool[b, ch, i]
                    ir = idx[b, ch, i]
                    top = x[b, ch, 2 * i]
                    bot = x[b, ch, 2 * i + 1]
                    for j in range(q):
                        k = np.int64(ir[j])
                        d = np.float64(gr[j] if yr[j] > zero else zero)
                        col = 2 * j + (k & 1)
                        xv = bot[col] if k >= 2 else top[col]
                        a += d
                        a2 += d * (np.float64(xv) - m)
                s[ch] += a
                sx[ch] += a2

    @_jit
    def bn_relu_pool2_backward_apply(dyp, ypool, idx, x, a, bc, cc, mean, dx):
        """dx = a[c] * g + bc[c] * (x - mean[c]) + cc[c], g as in bn_relu_pool2_backward_sums: first every element
        with g = 0 (a contiguous pass), then each window's maximum again with its g (one store per window, to the
        row and column its idx names; the same value again where the ReLU closed the window). Rows and columns no
        window covers (odd H, W) keep g = 0."""
        n, c, h, w = x.shape
        p, q = dyp.shape[2], dyp.shape[3]
        zero = _F(0)
        for b in range(n):
            for ch in range(c):
                ac = a[ch]
                bcc = bc[ch]
                ccc = cc[ch]
                m = mean[ch]
                for r in range(h):
                    xr = x[b, ch, r]
                    out = dx[b, ch, r]
                    for col in range(w):
                        out[col] = ac * zero + bcc * (xr[col] - m) + ccc
                for i in range(p):
                    gr = dyp[b, ch, i]
                    yr = ypool[b, ch, i]
                    ir = idx[b, ch, i]
                    xp = x[b, ch, 2 * i:2 * i + 2]
                    op = dx[b, ch, 2 * i:2 * i + 2]
                    for j in range(q):
                        k = np.int64(ir[j])
                        g = gr[j] if yr[j] > zero else zero
                        rr = k >> 1
                        col = 2 * j + (k & 1)
                        op[rr, col] = ac * g + bcc * (xp[rr, col] - m) + ccc

    # --- convolution, one image at a time: columns cols[(c, r, s), (p, q)] = xpad[c, p*stride + r, q*stride + s] ---
    # The GEMMs are OpenBLAS's sgemm called from the compiled loop (no GIL, no temporaries); `gemm` is that
    # function as a ctypes object (cblas_sgemm's arguments), found by `_cpu_threads.find_sgemm()`.

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
    def _conv_backward_image(gemm, xb, w2, dyb, r_, s_, stride, pad, cols, dcols, ones, dw, db, dxb, need_dx):
        """One image: dw += dy cols^T, db += dy 1, and (need_dx) dx = col2im(w2^T dy) -- the three conv derivatives
        (terms 1-3 in cpu.py); dw (K, CRS) and db (K,) are float32 partial sums."""
        k, crs = w2.shape
        p, q = dyb.shape[1], dyb.shape[2]
        pq = p * q
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
    def conv_backward(gemm, x, w2, dy, r_, s_, stride, pad, cols, dcols, ones, dw, db, dx, need_dx):
        """_conv_backward_image for each image b of the chunk (dx is a dummy when not need_dx)."""
        for b in range(x.shape[0]):
            _conv_backward_image(gemm, x[b], w2, dy[b], r_, s_, stride, pad, cols, dcols, ones, dw, db,
                                 dx[b if need_dx else 0], need_dx)

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
            maxpool2x2_forward(ybuf.reshape(1, k, p, q), y[b:b + 1], idx[b:b + 1])

    @_jit
    def conv_backward_from_pool(gemm, x, w2, dpool, ypool, idx, r_, s_, stride, pad, cols, dcols, dybuf, ones,
                                dw, db, dx, need_dx):
        """Backward of conv_relu_pool_forward: per image, dy of the conv = dpool routed to each window's chosen
        element where the pooled output is > 0 (ReLU's backward), 0 elsewhere; then _conv_backward_image."""
        nb = x.shape[0]
        k, p, q = dybuf.shape
        pp, qq = dpool.shape[2], dpool.shape[3]
        zero = _F(0)
        for b in range(nb):
            maxpool2x2_backward(dpool[b:b + 1], idx[b:b + 1], dybuf.reshape(1, k, p, q))
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
                                 dx[b if need_dx else 0], need_dx)
