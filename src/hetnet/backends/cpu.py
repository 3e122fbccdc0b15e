"""The fast CPU backend: float32, vectorised NumPy with BLAS (the thesis's OpenMP version).

The batch is cut into chunks that a small thread pool works through (`_cpu_threads`). With Numba installed
(`_cpu_jit`), convolution, ReLU, 2x2 max pooling and BatchNorm are compiled loops, one GIL-free call per thread
(convolution: im2col + OpenBLAS sgemm + col2im per image); without it the NumPy paths below do the same arithmetic:
convolution is im2col fused per chunk + BLAS GEMMs, 2x2 max pooling works on strided views with bit masks,
BatchNorm takes its sums from BLAS. benchmarks/README-cpu.md records which variants were measured and why these won.
Every op follows the interface in `hetnet.backends` (shape legend there: N batch, C input channels, K filters, H/W
input, P/Q output, R/S kernel).

    >>> from hetnet.backends import cpu
    >>> import numpy as np
    >>> y, cache = cpu.relu_forward(cpu.asarray(np.array([-1.0, 2.0])))
    >>> y.tolist()
    [0.0, 2.0]
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ..random import counter_uniform
from . import _cpu_jit as _jit
from . import _cpu_threads as _thr

name = "cpu"
dtype = np.dtype(np.float32)
xp = np

_F = np.float32
_GEMM_SPLIT = 1 << 40          # dense GEMMs: no cache chunking, just one share per thread
# dense GEMMs smaller than this (multiply-adds) run on one thread: a second one only re-reads the weights (measured
# thesis-m1 batch 32, 2 threads: step 6.3 -> 5.7 ms with its 2048x100 dense layer on one thread)
_DENSE_PARALLEL_MIN_MACS = 1 << 25
_PER_IMAGE_GEMM_MAX_CRS = 64   # conv backward: per-image GEMMs (no transposed copy of dy) when C*R*S <= this
_CONV_FORWARD_CHUNK_BYTES = 1 << 20   # forward columns + outputs per chunk: per-image GEMMs like them in L2
# compiled convolution (im2col, sgemm, col2im per image in one call per thread), when Numba and OpenBLAS's sgemm are
# both found; None: the NumPy path below
_SGEMM = _thr.find_sgemm() if _jit.available() else None


# --- conversions and allocation -------------------------------------------------------------------------------------


def _per_channel(v, c: int, hw: int) -> np.ndarray:
    """Per-channel values v[C] spread to a contiguous (1, C, HW) float32 array: NumPy's loops run about twice as
    fast on it as on a (1, C, 1) broadcast."""
    out = np.empty((1, c, hw), dtype=_F)
    out[...] = np.asarray(v, dtype=_F).reshape(1, c, 1)
    return out


def _f32c(a) -> np.ndarray:
    """a as C-contiguous float32 (no copy when it already is)."""
    return np.ascontiguousarray(a, dtype=_F)


def asarray(a) -> np.ndarray:
    """A fresh C-contiguous float32 copy of a."""
    return np.array(a, dtype=_F, order="C", copy=True)


def to_numpy(arr) -> np.ndarray:
    return np.array(arr, copy=True)


def zeros(shape) -> np.ndarray:
    return np.zeros(shape, dtype=_F)


def labels(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.int64)


def synchronize() -> None:
    return None


# --- dense ----------------------------------------------------------------------------------------------------------


def _dense_chunk(n: int, f: int, k: int, split: int) -> int:
    """Chunk of the `split` axis (batch rows or output features) for an (N, F) x (F, K) GEMM."""
    if n * f * k < _DENSE_PARALLEL_MIN_MACS:
        return max(1, split)
    other = (f + k) if split == n else (n + f)
    return _thr.chunk_size(split, 4 * other * 4, target=_GEMM_SPLIT)


# With the compiled paths' sgemm (_SGEMM) the three GEMMs are split over the threads by *columns of the output*:
# y[:, K-share] uses that share of w's rows, dx[:, F-share] that share of w's columns, dw[K-share] that share of
# dy's columns. Each thread then reads only its part of the weights, where a split of the batch made every thread
# read all of them (measured on 2 threads, separate processes: mlp step at batch 32 2.25 -> 1.65-2.0 ms, batch 128
# 3.8-4.6 -> 3.3-4.0 ms; the CNNs unchanged). y and dx are the NumPy path's bits (each element is one sgemm dot
# product in the same order); dw is accumulated inside the GEMM (beta = 1) instead of through a temporary, which
# rounds differently once the batch spans several of OpenBLAS's K blocks (batch 1024: up to 1.5e-5 apart).
_DENSE_SPLIT_MIN_MACS = 1 << 20
# ... and only when every share has at least this many rows (a 10-class head's GEMMs at batch 1024 took 0.28 and
# 0.34 ms as two 5-row halves, 0.15 and 0.26 ms on one thread)
_DENSE_SPLIT_MIN_ROWS = 16


def _dense_share(m: int, macs: int) -> int:
    """Chunk of an output axis of length m: one share per thread, or all of it for small GEMMs."""
    split = macs >= _DENSE_SPLIT_MIN_MACS and m >= _DENSE_SPLIT_MIN_ROWS * _thr.threads()
    return max(1, -(-m // _thr.threads())) if split else max(1, m)


def dense_forward(x, w, b):
    """y[N,K] = x[N,F] @ w[K,F]^T + b[K]."""
    x = _f32c(x)
    n, f = x.shape
    k = w.shape[0]
    y = np.empty((n, k), dtype=_F)
    if _SGEMM is not None and w.flags.c_contiguous and w.dtype == _F:

        def jbody(s, e, _):   # y[:, s:e] = x @ w[s:e]^T
            _SGEMM(101, 111, 112, n, e - s, f, _F(1), x.ctypes.data, f, w.ctypes.data + 4 * s * f, f, _F(0),
                   y.ctypes.data + 4 * s, k)

        _thr.parallel(k, _dense_share(k, n * f * k), jbody)
        if b is not None:
            y += b
        return y, (x, w)
    wt = w.T

    def body(s, e, _):
        np.matmul(x[s:e], wt, out=y[s:e])
        if b is not None:
            y[s:e] += b

    _thr.parallel(n, _dense_chunk(n, f, k, n), body)
    return y, (x, w)


def dense_backward(dy, cache, dw, db, need_dx=True):
    x, w = cache
    dy = _f32c(dy)
    n, f = x.shape
    k = w.shape[0]
    if _SGEMM is not None and w.flags.c_contiguous and w.dtype == _F and dw.flags.c_contiguous and dw.dtype == _F:
        macs = n * f * k

        def jbody_dw(s, e, _):   # dw[s:e] += dy[:, s:e]^T x
            _SGEMM(101, 112, 111, e - s, f, n, _F(1), dy.ctypes.data + 4 * s, k, x.ctypes.data, f, _F(1),
                   dw.ctypes.data + 4 * s * f, f)

        _thr.parallel(k, _dense_share(k, macs), jbody_dw)
        if db is not None:
            db += dy.sum(axis=0)
        if not need_dx:
            return None
        dx = np.empty((n, f), dtype=_F)

        def jbody_dx(s, e, _):   # dx[:, s:e] = dy @ w[:, s:e]
            _SGEMM(101, 111, 111, n, e - s, k, _F(1), dy.ctypes.data, k, w.ctypes.data + 4 * s, f, _F(0),
                   dx.ctypes.data + 4 * s, f)

        _thr.parallel(f, _dense_share(f, macs), jbody_dx)
        return dx

    def body_dw(s, e, _):
        dw[s:e] += dy[:, s:e].T @ x                   # dE/dw[k,f] = sum_n dy[n,k] x[n,f]

    _thr.parallel(k, _dense_chunk(n, f, k, k), body_dw)
    if db is not None:
        db += dy.sum(axis=0)                          # dE/db[k] = sum_n dy[n,k]
    if not need_dx:
        return None
    dx = np.empty((n, f), dtype=_F)

    def body_dx(s, e, _):
        np.matmul(dy[s:e], w, out=dx[s:e])            # dE/dx[n,f] = sum_k dy[n,k] w[k,f]

    _thr.parallel(n, _dense_chunk(n, f, k, n), body_dx)
    return dx


# --- chains of Dense layers, ReLUs between, feature-major (the cpu step object's op for them, _cpu_step) -----------
# Inside a chain the activations are kept transposed, hT[F, N] (one row per feature, shape legend: F in, K out).
# OpenBLAS runs that layout's forward GEMM, yT[K,N] = w[K,F] hT[F,N] with neither operand transposed, much faster
# at short batches than y[N,K] = x w^T (one thread, 784 -> 512: batch 32 351 against 561 us, batch 128 765 against
# 904 us); the two backward GEMMs take the same time in either layout. Only the chain's output (N, K) and its
# gradient are transposed (a classifier head's few columns); the first layer reads x (N, F) as its transpose. The
# threads split each GEMM by rows of its output features, so a thread adds the bias and applies the ReLU to its
# rows right after its GEMM, and in backward layer l's dh rows are layer l-1's dz rows: the ReLU mask, the bias
# gradient and layer l-1's dw follow in the same task (one parallel section per layer and direction).
# accumulate=False writes the gradients (GEMMs with beta = 0) instead of adding to them: for a caller that knows
# they are all zero (the step object; the same bits as adding to zeros).

_NO_BIAS = np.zeros(1, dtype=_F)


def dense_chain_available() -> bool:
    """Whether dense_chain_* can run (they call OpenBLAS's sgemm with the compiled paths)."""
    return _SGEMM is not None


def _chain_forward_layer(h, first: bool, w, b, relu: bool):
    """yT[K,N] = act(w h^T + b) for h = x (N, F) when first, else act(w hT + b) for hT (F, N)."""
    k, f = w.shape
    n = h.shape[0] if first else h.shape[1]
    yt = np.empty((k, n), dtype=_F)
    bias = _NO_BIAS if b is None else b

    def body(s, e, _):   # yT[s:e] = w[s:e] hT, bias and ReLU on those rows
        _SGEMM(101, 111, 112 if first else 111, e - s, n, f, _F(1), w.ctypes.data + 4 * s * f, f, h.ctypes.data,
               f if first else n, _F(0), yt.ctypes.data + 4 * s * n, n)
        if b is not None or relu:
            _jit.bias_relu_rows(yt[s:e], bias[s:e] if b is not None else bias, b is not None, relu)

    _thr.parallel(k, _dense_share(k, n * f * k), body)
    return yt


def dense_chain_forward(x, layers):
    """y[N, K_last] of the chain layers = [(w[K,F], b[K] or None, relu after it)] applied to x[N, F0]; cache."""
    x = _f32c(x)
    ins = [x]       # layer j's input ins[j]: x (N, F0), then hT (F_j, N); ins[-1] the chain's output, transposed
    for j, (w, b, relu) in enumerate(layers):
        ins.append(_chain_forward_layer(ins[j], j == 0, w, b, relu))
    return np.ascontiguousarray(ins[-1].T), (ins, layers)


def _chain_layer_grads(dzt, j, s: int, e: int, ins, layers, grads, accumulate: bool) -> None:
    """Rows s:e of layer j's gradients from dzt = its output's gradient, transposed (K_j, N), in place:
    dz = dzt where the ReLU passed (y > 0), db[k] = sum_n dz[k, n], dw[s:e] = dz[s:e] in_j (dE/dw[k,f] =
    sum_n dz[k,n] in[n,f])."""
    w, _, relu = layers[j]
    dw, db = grads[j]
    f = w.shape[1]
    n = dzt.shape[1]
    if relu or db is not None:
        _jit.relu_mask_rowsum(dzt[s:e], ins[j + 1][s:e], relu, _NO_BIAS if db is None else db[s:e], db is not None,
                              accumulate)
    first = j == 0  # ins[0] is x (N, F): dw = dz x; later inputs are hT (F, N): dw = dz hT^T
    _SGEMM(101, 111, 111 if first else 112, e - s, f, n, _F(1), dzt.ctypes.data + 4 * s * n, n, ins[j].ctypes.data,
           f if first else n, _F(1 if accumulate else 0), dw.ctypes.data + 4 * s * f, f)


def dense_chain_backward(dy, cache, grads, need_dx=True, accumulate=True):
    """dy[N, K_last] back through the chain: grads = [(dw, db or None)] per layer, added to (or written, accumulate
    False); returns dE/dx[N, F0] or None."""
    ins, layers = cache
    dzt = np.ascontiguousarray(_f32c(dy).T)
    n = dzt.shape[1]
    top = len(layers) - 1
    k, f = layers[top][0].shape
    _thr.parallel(k, _dense_share(k, n * f * k),
                  lambda s, e, _: _chain_layer_grads(dzt, top, s, e, ins, layers, grads, accumulate))
    for j in range(top, 0, -1):
        w = layers[j][0]
        k, f = w.shape
        kp, fp = layers[j - 1][0].shape
        dht = np.empty((f, n), dtype=_F)

        def body(s, e, _, w=w, k=k, f=f, j=j, dzt=dzt, dht=dht):
            # dh = dz w (dE/dh[n,f] = sum_k dz[n,k] w[k,f]), rows s:e of dhT; they are layer j-1's output rows
            _SGEMM(101, 112, 111, e - s, n, k, _F(1), w.ctypes.data + 4 * s, f, dzt.ctypes.data, n, _F(0),
                   dht.ctypes.data + 4 * s * n, n)
            _chain_layer_grads(dht, j - 1, s, e, ins, layers, grads, accumulate)

        _thr.parallel(f, _dense_share(f, n * (f * k + kp * fp)), body)
        dzt = dht
    if not need_dx:
        return None
    w = layers[0][0]
    k, f = w.shape
    dx = np.empty((n, f), dtype=_F)

    def jbody_dx(s, e, _):   # dx[:, s:e] = dz w[:, s:e]
        _SGEMM(101, 112, 111, n, e - s, k, _F(1), dzt.ctypes.data, n, w.ctypes.data + 4 * s, f, _F(0),
               dx.ctypes.data + 4 * s, f)

    _thr.parallel(f, _dense_share(f, n * f * k), jbody_dx)
    return dx


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


def conv2d_forward(x, w, b, stride, padding):
    """y[n,k,p,q] = b[k] + sum_{c,r,s} w[k,c,r,s] xpad[n,c,p*stride+r,q*stride+s]."""
    x, g, w2 = _conv_setup(x, w, stride, padding)
    n, k, pq, crs = x.shape[0], g.k, g.p * g.q, w2.shape[1]
    y = np.empty((n, k, g.p, g.q), dtype=_F)
    if _SGEMM is not None:
        bias = np.zeros(k, dtype=_F) if b is None else _f32c(b)
        cols_shape = (crs, pq)

        def jbody(b0, b1, _):
            cols = _thr.scratch("jit_cols", cols_shape)
            _jit.conv_forward(_SGEMM, x[b0:b1], w2, bias, b is not None, g.r, g.s, stride, padding, cols, y[b0:b1])

        _thr.parallel(n, _per_thread(n, 4 * (crs + k) * pq), jbody)
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
    return y, (x, w2, g)


def _conv_backward_compiled(x, w2, g, dw, db, need_dx, body):
    """The compiled backward's driver, shared by conv2d_backward and conv2d_relu_maxpool_backward: one chunk of
    images per thread, body(b0, b1, cols, dcols, ones, acc, dx) with this thread's scratch columns and a per-chunk
    float32 accumulator acc = [dw (K, CRS), db (K,)], added up in chunk order (bit-identical from run to run)."""
    n = x.shape[0]
    k, crs, pq = g.k, w2.shape[1], g.p * g.q
    dx = np.empty(x.shape, dtype=_F) if need_dx else None
    dxa = dx if need_dx else np.empty((n, 1, 1, 1), dtype=_F)     # a dummy the compiled loop can index
    ones = np.ones(pq, dtype=_F)

    def make_acc():
        return [np.zeros((k, crs), dtype=_F), np.zeros(k, dtype=_F)]

    def chunk(b0, b1, acc):
        body(b0, b1, _thr.scratch("jit_cols", (crs, pq)), _thr.scratch("jit_dcols", (crs, pq)), ones, acc, dxa)

    accs = _thr.parallel(n, _per_thread(n, 4 * (2 * crs + k) * pq), chunk, make_acc)
    dw += sum(a[0] for a in accs).reshape(dw.shape)
    if db is not None:
        db += sum(a[1] for a in accs)
    return dx


def conv2d_backward(dy, cache, dw, db, need_dx=True):
    x, w2, g = cache
    dy = _f32c(dy)
    n = x.shape[0]
    k, crs, pq = g.k, w2.shape[1], g.p * g.q
    if _SGEMM is not None:
        def jbody(b0, b1, cols, dcols, ones, acc, dxa):
            _jit.conv_backward(_SGEMM, x[b0:b1], w2, dy[b0:b1], g.r, g.s, g.stride, g.pad, cols, dcols, ones,
                               acc[0], acc[1], dxa[b0:b1], need_dx)

        return _conv_backward_compiled(x, w2, g, dw, db, need_dx, jbody)   # allocates its own dx
    dx = np.empty(x.shape, dtype=_F) if need_dx else None
    w2t = w2.T
    per_image = crs <= _PER_IMAGE_GEMM_MAX_CRS
    ones = np.ones(pq, dtype=_F)

    def make_acc():
        return [np.zeros((k, crs), dtype=_F), np.zeros(k, dtype=_F) if db is not None else None]

    def body(b0, b1, acc):
        nb = b1 - b0
        cols = _im2col(x, b0, b1, g)
        dyb = dy[b0:b1].reshape(nb, k, pq)
        if acc[1] is not None:
            acc[1] += (dyb.reshape(-1, pq) @ ones).reshape(nb, k).sum(axis=0)   # term 2: dE/db = sum of dy
        if per_image:
            # short columns: per-image GEMMs on dy as it is, no transposed copy of dy
            part = np.matmul(dyb, cols.reshape(crs, nb, pq).transpose(1, 2, 0))  # term 1: dE/dw = sum_b dy_b cols_b^T
            acc[0] += part.sum(axis=0)
            if dx is None:
                return
            dcols = _thr.scratch(("conv_dcols_img",) + g.key(), (nb, crs, pq))
            np.matmul(w2t, dyb, out=dcols)                   # term 3: dE/dcols = w^T dy, then col2im
            _col2im(dcols.reshape(nb, g.c, g.r, g.s, g.p, g.q), dx[b0:b1], g, image_major=True)
            return
        dyt = _thr.scratch("conv_dyt", (k, nb * pq))
        np.copyto(dyt.reshape(k, nb, pq), dyb.transpose(1, 0, 2))
        part = _thr.scratch("conv_dw", (crs, k))
        np.matmul(cols, dyt.T, out=part)                     # term 1: dE/dw = (cols dy^T)^T (BLAS likes this way)
        acc[0] += part.T
        if dx is None:
            return
        dcols = _thr.scratch(("conv_dcols",) + g.key(), (crs, nb * pq))
        np.matmul(w2t, dyt, out=dcols)                       # term 3: dE/dcols = w^T dy, then col2im
        _col2im(dcols.reshape(g.c, g.r, g.s, nb, g.p, g.q), dx[b0:b1], g, image_major=False)

    accs = _thr.parallel(n, _thr.chunk_size(n, 4 * (2 * crs + k) * pq), body, make_acc)
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


# --- pooling --------------------------------------------------------------------------------------------------------


def _windows(x, r, s, stride, p, q):
    """Strided view xw[n, c, p, q, i, j] = x[n, c, p*stride + i, q*stride + j] (no copy)."""
    n, c, _, _ = x.shape
    sn, sc, sh, sw = x.strides
    return as_strided(x, (n, c, p, q, r, s), (sn, sc, sh * stride, sw * stride, sh, sw), writeable=False)


def maxpool2d_forward(x, kernel, stride):
    """y[n,c,p,q] = max over the window. The cache says where each window's first maximum (row-major) is."""
    x = _f32c(x)
    n, c, h, w = x.shape
    p = (h - kernel) // stride + 1
    q = (w - kernel) // stride + 1
    if kernel == 2 and stride == 2:
        if _jit.available():
            y = np.empty((n, c, p, q), dtype=_F)
            idx = np.empty((n, c, p, q), dtype=np.uint8)
            _jit_parallel(n, 4 * c * h * w, lambda b0, b1, _: _jit.maxpool2x2_forward(x[b0:b1], y[b0:b1], idx[b0:b1]))
            return y, ("2x2jit", idx, x.shape, 2, 2)
        return _maxpool2x2_forward(x, p, q)
    xw = _windows(x, kernel, kernel, stride, p, q).reshape(n, c, p, q, kernel * kernel)
    arg = xw.argmax(axis=-1)
    y = np.take_along_axis(xw, arg[..., None], axis=-1)[..., 0]
    return np.ascontiguousarray(y), ("general", arg, x.shape, kernel, stride)


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
    return y, ("2x2", (right, low), x.shape, 2, 2)


def maxpool2d_backward(dy, cache):
    kind, arg, xshape, kernel, stride = cache
    dy = _f32c(dy)
    n, c, p, q = dy.shape
    if kind == "2x2jit":
        dx = np.empty(xshape, dtype=_F)
        _jit_parallel(n, 4 * xshape[1] * xshape[2] * xshape[3],
                      lambda b0, b1, _: _jit.maxpool2x2_backward(dy[b0:b1], arg[b0:b1], dx[b0:b1]))
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


# --- convolution + ReLU + 2x2 max pooling, fused (used by the cpu step object, hetnet.backends._cpu_step) ----------


def conv_relu_maxpool_available() -> bool:
    """Whether conv2d_relu_maxpool_* can run (they need the compiled paths); the conv output must be >= 2x2."""
    return _SGEMM is not None


def conv2d_relu_maxpool_forward(x, w, b, stride, padding):
    """maxpool2d(relu(conv2d(x)), 2, 2) in one pass per image: y[N,K,P//2,Q//2], cache. Bit-identical to the three ops;
    the full-size conv output is never stored (backward needs only x, the pooled output and each window's choice)."""
    x, g, w2 = _conv_setup(x, w, stride, padding)
    n, k, pq, crs = x.shape[0], g.k, g.p * g.q, w2.shape[1]
    y = np.empty((n, k, g.p // 2, g.q // 2), dtype=_F)
    idx = np.empty(y.shape, dtype=np.uint8)
    bias = np.zeros(k, dtype=_F) if b is None else _f32c(b)

    def body(b0, b1, _):
        cols = _thr.scratch("jit_cols", (crs, pq))
        ybuf = _thr.scratch("jit_conv_out", (k, g.p, g.q))
        _jit.conv_relu_pool_forward(_SGEMM, x[b0:b1], w2, bias, b is not None, g.r, g.s, stride, padding, cols,
                                    ybuf, y[b0:b1], idx[b0:b1])

    _thr.parallel(n, _per_thread(n, 4 * (crs + k) * pq), body)
    return y, (x, w2, g, y, idx)


def conv2d_relu_maxpool_backward(dy, cache, dw, db, need_dx=True):
    """Backward of conv2d_relu_maxpool_forward (dy: the pooled output's gradient); same sums, in the same chunks, as
    maxpool2d_backward -> relu_backward -> conv2d_backward."""
    x, w2, g, ypool, idx = cache
    dy = _f32c(dy)

    def body(b0, b1, cols, dcols, ones, acc, dxa):
        dybuf = _thr.scratch("jit_conv_dy", (g.k, g.p, g.q))
        _jit.conv_backward_from_pool(_SGEMM, x[b0:b1], w2, dy[b0:b1], ypool[b0:b1], idx[b0:b1], g.r, g.s,
                                     g.stride, g.pad, cols, dcols, dybuf, ones, acc[0], acc[1], dxa[b0:b1], need_dx)

    return _conv_backward_compiled(x, w2, g, dw, db, need_dx, body)


def make_train_step(model, optimizer, schedule=None, label_smoothing: float = 0.0):
    """The trainer's step object (hetnet.train): the model with conv + ReLU + 2x2 max pool fused (_cpu_step)."""
    from ._cpu_step import make_train_step as make

    return make(model, optimizer, schedule, label_smoothing)


def make_eval_step(model):
    from ._cpu_step import make_eval_step as make

    return make(model)


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


# --- activations ----------------------------------------------------------------------------------------------------


def _elementwise(n_items: int, bytes_per_item: int, body) -> None:
    """Element-wise passes: chunks small enough that a chain of ops on one chunk stays in L2."""
    _thr.parallel(n_items, _thr.chunk_size(n_items, bytes_per_item, target=_thr.ELEMENTWISE_CHUNK_BYTES), body)


def _per_thread(n_items: int, bytes_per_item: int) -> int:
    """Chunk size for compiled passes: one chunk per thread (one call each, no GIL held inside), or one chunk when
    the work is too small to share."""
    small = n_items * bytes_per_item < _thr.PARALLEL_MIN_BYTES
    return max(1, n_items if small else -(-n_items // _thr.threads()))


def _jit_parallel(n_items: int, bytes_per_item: int, body) -> None:
    _thr.parallel(n_items, _per_thread(n_items, bytes_per_item), body)


def relu_forward(x):
    """y = max(x, 0); the cache is y itself (compiled path: dx = dy where y > 0) or the mask x > 0 (one byte per
    element, NumPy path)."""
    x = _f32c(x)
    y = np.empty_like(x)
    xf, yf = x.reshape(-1), y.reshape(-1)
    if _jit.available():
        _jit_parallel(x.size, 8, lambda s, e, _: _jit.relu_forward(xf[s:e], yf[s:e]))
        return y, ("y", y)
    mask = np.empty(x.shape, dtype=np.bool_)
    mf = mask.reshape(-1)

    def body(s, e, _):
        np.greater(xf[s:e], _F(0), out=mf[s:e])
        np.maximum(xf[s:e], _F(0), out=yf[s:e])

    _elementwise(x.size, 9, body)
    return y, ("mask", mask)


def relu_backward(dy, cache):
    """dx = dy where x > 0, else 0."""
    kind, m = cache
    dy = _f32c(dy)
    dx = np.empty_like(dy)
    mf, dyf, dxf = m.reshape(-1), dy.reshape(-1), dx.reshape(-1)
    if kind == "y":
        _jit_parallel(dy.size, 12, lambda s, e, _: _jit.relu_backward(dyf[s:e], mf[s:e], dxf[s:e]))
        return dx

    def body(s, e, _):
        np.multiply(dyf[s:e], mf[s:e], out=dxf[s:e])

    _elementwise(dy.size, 9, body)
    return dx


def sigmoid_forward(x):
    # stable: e = exp(-|x|); y = 1/(1+e) for x >= 0, e/(1+e) for x < 0
    e = np.exp(-np.abs(x))
    y = np.where(x >= 0, _F(1), e)
    y /= e + _F(1)
    return y, y


def sigmoid_backward(dy, cache):
    y = cache
    return dy * y * (_F(1) - y)


def tanh_forward(x):
    y = np.tanh(x)
    return y, y


def tanh_backward(dy, cache):
    y = cache
    return dy * (_F(1) - y * y)


def softmax_forward(x):
    z = x - x.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z, z


def softmax_backward(dy, cache):
    y = cache
    return y * (dy - (dy * y).sum(axis=1, keepdims=True))


# --- batch normalisation --------------------------------------------------------------------------------------------
# Per-channel sums come from BLAS over the rows (n, c) of x viewed as (N*C, HW): sum(x) = rows @ ones and
# sum(x*x) = a batched row dot, then combined over rows in float64. var = E[x^2] - mean^2 loses digits when
# mean^2 >> var; above _BN_SHIFT_LIMIT the exact centred formulas (x - mean) are used instead (one more pass).
_BN_SHIFT_LIMIT = 10.0


def _rows(a3, b0, b1):
    """Rows (B*C, HW) of images b0..b1 of a (N, C, HW) array."""
    return a3[b0:b1].reshape(-1, a3.shape[2])


def _rowdot(a, b):
    """sum_j a[i, j] * b[i, j] for each row i (float32, BLAS)."""
    return np.matmul(a[:, None, :], b[:, :, None]).reshape(-1)


def _bn_jit_sums(kernel, n, c, hw, *arrays):
    """Per-channel float64 sums from a compiled kernel, one partial per chunk (added in chunk order)."""
    def make_acc():
        return [np.zeros(c), np.zeros(c)]

    def body(b0, b1, acc):
        kernel(*(a[b0:b1] for a in arrays[:-1]), arrays[-1], acc[0], acc[1])

    accs = _thr.parallel(n, max(1, -(-n // _thr.threads())) if n * c * hw * 4 >= _thr.PARALLEL_MIN_BYTES else n,
                         body, make_acc)
    return sum(a[0] for a in accs), sum(a[1] for a in accs)


def _bn_sums(a3, b3=None, centre=None):
    """Per channel, in float64: (sum a, sum a*b) where b defaults to a; with centre (C,), a - centre replaces a in
    the product (and b - centre when b is None)."""
    n, c, hw = a3.shape
    if _jit.available() and b3 is None and hw > 1:
        cen = np.zeros(c) if centre is None else np.asarray(centre, dtype=np.float64)
        return _bn_jit_sums(_jit.bn_sums, n, c, hw, a3, cen)
    ones = np.ones(hw, dtype=_F)
    cen = None if centre is None else _per_channel(centre, c, hw)

    def make_acc():
        return [np.zeros(c), np.zeros(c)]

    def body(b0, b1, acc):
        ra = _rows(a3, b0, b1)
        acc[0] += (ra @ ones).reshape(-1, c).sum(axis=0, dtype=np.float64)
        if cen is not None:
            t = _thr.scratch("bn_centred", (b1 - b0, c, hw))
            np.subtract(a3[b0:b1], cen, out=t)
            ra = t.reshape(-1, hw)
        rb = ra if b3 is None else _rows(b3, b0, b1)
        acc[1] += _rowdot(ra, rb).reshape(-1, c).sum(axis=0, dtype=np.float64)

    accs = _thr.parallel(n, _thr.chunk_size(n, 8 * c * hw), body, make_acc)
    return sum(a[0] for a in accs), sum(a[1] for a in accs)


def _bn_3d(x):
    n, c = x.shape[:2]
    return x.reshape(n, c, -1)


def _bn_statistics(x3, gamma, running_mean, running_var, momentum, eps, training):
    """The batch's (training: updating the running statistics) or the running statistics of x3 (N, C, HW), as
    float64 per channel: (mean, inv_std, scale = gamma * inv_std, centred), where centred says the sums had to be
    taken about the mean (a large mean against the spread)."""
    n, c, hw = x3.shape
    m = n * hw
    centred = False
    if training:
        if hw == 1:   # (N, C): small, plain two-pass statistics
            mean = x3.mean(axis=(0, 2), dtype=np.float64)
            var = ((x3 - mean.astype(_F).reshape(1, c, 1)) ** 2).mean(axis=(0, 2), dtype=np.float64)
        else:
            s, ss = _bn_sums(x3)
            mean = s / m
            var = np.maximum(ss / m - mean * mean, 0.0)
            if np.any(mean * mean > _BN_SHIFT_LIMIT * var):
                centred = True
                var = _bn_sums(x3, centre=mean)[1] / m
        running_mean *= _F(1 - momentum)
        running_mean += (momentum * mean).astype(_F)
        running_var *= _F(1 - momentum)
        running_var += (momentum * var * m / max(m - 1, 1)).astype(_F)
    else:
        mean = running_mean.astype(np.float64)
        var = running_var.astype(np.float64)
        centred = bool(np.any(mean * mean > _BN_SHIFT_LIMIT * var))
    inv_std = 1.0 / np.sqrt(var + eps)
    return mean, inv_std, gamma.astype(np.float64) * inv_std, centred


def batchnorm_forward(x, gamma, beta, running_mean, running_var, momentum, eps, training):
    """y = gamma * (x - mean) / sqrt(var + eps) + beta per channel, computed as y = x * scale + shift."""
    x = _f32c(x)
    x3 = _bn_3d(x)
    n, c, hw = x3.shape
    mean, inv_std, scale, centred = _bn_statistics(x3, gamma, running_mean, running_var, momentum, eps, training)
    shift = beta.astype(np.float64) - mean * scale
    y = np.empty_like(x)
    y3 = _bn_3d(y)
    if _jit.available() and hw > 1:
        sc, sh = scale.astype(_F), shift.astype(_F)
        _jit_parallel(n, 8 * c * hw, lambda b0, b1, _: _jit.bn_apply(x3[b0:b1], sc, sh, y3[b0:b1]))
        return y, (x3, x.shape, mean, inv_std, gamma.astype(np.float64), training, centred)
    sc, sh = _per_channel(scale, c, hw), _per_channel(shift, c, hw)

    def body(b0, b1, _):
        np.multiply(x3[b0:b1], sc, out=y3[b0:b1])
        y3[b0:b1] += sh

    _elementwise(n, 8 * c * hw, body)
    return y, (x3, x.shape, mean, inv_std, gamma.astype(np.float64), training, centred)


def batchnorm_backward(dy, cache, dgamma, dbeta):
    x3, shape, mean, inv_std, gamma, training, centred = cache
    dy3 = _bn_3d(_f32c(dy))
    n, c, hw = x3.shape
    m = n * hw
    jit = _jit.available() and hw > 1
    if jit:
        sum_dy, sum_dy_xc = _bn_jit_sums(_jit.bn_backward_sums, n, c, hw, dy3, x3, mean)
    elif centred or hw == 1:
        sum_dy, sum_dy_xc = _bn_sums_centred(dy3, x3, mean)
    else:
        sum_dy, sum_dy_x = _bn_sums(dy3, x3)
        sum_dy_xc = sum_dy_x - mean * sum_dy
    a, bc, cc = _bn_backward_coefficients(sum_dy, sum_dy_xc, inv_std, gamma, training, m, dgamma, dbeta)
    dx = np.empty(shape, dtype=_F)
    dx3 = _bn_3d(dx)
    if jit:
        af, bf, cf, mf = (np.asarray(v, dtype=_F) for v in (a, bc, cc, mean))
        _jit_parallel(n, 12 * c * hw,
                      lambda b0, b1, _: _jit.bn_backward_apply(dy3[b0:b1], x3[b0:b1], af, bf, cf, mf, dx3[b0:b1]))
        return dx
    if not centred:
        cc = cc - bc * mean                 # fold the centring into the constant: a*dy + bc*x + cc'
    af, bf, cf, mf = (_per_channel(v, c, hw) for v in (a, bc, cc, mean))

    def body(b0, b1, _):
        out = dx3[b0:b1]
        np.multiply(dy3[b0:b1], af, out=out)
        if training:
            t = _thr.scratch("bn_t", out.shape)
            if centred:
                np.subtract(x3[b0:b1], mf, out=t)
                t *= bf
            else:
                np.multiply(x3[b0:b1], bf, out=t)
            out += t
            out += cf

    _elementwise(n, 12 * c * hw, body)
    return dx


# --- BatchNorm2D + ReLU + 2x2 max pooling, fused (the cpu step object's op for that chain, _cpu_step) --------------


def bn_relu_maxpool_available() -> bool:
    """Whether bn_relu_maxpool_* can run (they need the compiled paths); the input must be at least 2x2."""
    return _jit.available()


def bn_relu_maxpool_forward(x, gamma, beta, running_mean, running_var, momentum, eps, training):
    """maxpool2d(relu(batchnorm2d(x)), 2, 2): y[N,C,H//2,W//2], cache. After the statistics, one pass over x; the
    normalised and the ReLU outputs are never stored. y is bit-identical to the three ops one after the other."""
    x = _f32c(x)
    n, c, h, w = x.shape
    mean, inv_std, scale, _ = _bn_statistics(_bn_3d(x), gamma, running_mean, running_var, momentum, eps, training)
    sc, sh = scale.astype(_F), (beta.astype(np.float64) - mean * scale).astype(_F)
    y = np.empty((n, c, h // 2, w // 2), dtype=_F)
    idx = np.empty(y.shape, dtype=np.uint8)
    _jit_parallel(n, 5 * c * h * w, lambda b0, b1, _: _jit.bn_relu_pool2_forward(x[b0:b1], sc, sh, y[b0:b1],
                                                                                  idx[b0:b1]))
    return y, (x, mean, inv_std, gamma.astype(np.float64), training, y, idx)


def bn_relu_maxpool_backward(dy, cache, dgamma, dbeta, need_dx=True):
    """Adds dE/dgamma, dE/dbeta; returns dE/dx (or None). The gradient max pooling and ReLU pass back is dy at each
    window's maximum where the pooled value is > 0; BN's sums visit only those (float64 sums in another order than
    batchnorm_backward's: float32 rounding apart), dx is one pass over x."""
    x, mean, inv_std, gamma, training, y, idx = cache
    dy = _f32c(dy)
    n, c, h, w = x.shape
    sum_dy, sum_dy_xc = _bn_jit_sums(_jit.bn_relu_pool2_backward_sums, n, c, h * w, dy, y, idx, x, mean)
    a, bc, cc = _bn_backward_coefficients(sum_dy, sum_dy_xc, inv_std, gamma, training, n * h * w, dgamma, dbeta)
    if not need_dx:
        return None
    dx = np.empty(x.shape, dtype=_F)
    af, bf, cf, mf = (np.asarray(v, dtype=_F) for v in (a, bc, cc, mean))
    _jit_parallel(n, 12 * c * h * w, lambda b0, b1, _: _jit.bn_relu_pool2_backward_apply(
        dy[b0:b1], y[b0:b1], idx[b0:b1], x[b0:b1], af, bf, cf, mf, dx[b0:b1]))
    return dx


def _bn_backward_coefficients(sum_dy, sum_dy_xc, inv_std, gamma, training, m, dgamma, dbeta):
    """Add dE/dgamma and dE/dbeta; return (a, bc, cc) per channel (float64) with dx = a*dy + bc*(x - mean) + cc."""
    sum_dy_xhat = inv_std * sum_dy_xc
    dgamma += sum_dy_xhat.astype(_F)        # dE/dgamma = sum dy * xhat
    dbeta += sum_dy.astype(_F)              # dE/dbeta = sum dy
    a = gamma * inv_std
    if training:
        # dx = a * (dy - mean(dy) - xhat * mean(dy * xhat)) = a*dy + bc*(x - mean) + cc
        return a, -a * inv_std * sum_dy_xhat / m, -a * sum_dy / m
    # eval: the statistics are constants, dx = a * dy
    return a, np.zeros_like(a), np.zeros_like(a)


def _bn_sums_centred(dy3, x3, mean):
    """(sum dy, sum dy * (x - mean)) per channel, in float64, with the subtraction done on the data."""
    n, c, hw = x3.shape
    ones = np.ones(hw, dtype=_F)
    cen = _per_channel(mean, c, hw)

    def make_acc():
        return [np.zeros(c), np.zeros(c)]

    def body(b0, b1, acc):
        acc[0] += (_rows(dy3, b0, b1) @ ones).reshape(-1, c).sum(axis=0, dtype=np.float64)
        t = _thr.scratch("bn_centred", (b1 - b0, c, hw))
        np.subtract(x3[b0:b1], cen, out=t)
        acc[1] += _rowdot(t.reshape(-1, hw), _rows(dy3, b0, b1)).reshape(-1, c).sum(axis=0, dtype=np.float64)

    accs = _thr.parallel(n, _thr.chunk_size(n, 8 * c * hw), body, make_acc)
    return sum(a[0] for a in accs), sum(a[1] for a in accs)


# --- dropout --------------------------------------------------------------------------------------------------------


def dropout_forward(x, p, seed):
    keep = (counter_uniform(seed, x.size) >= p).reshape(x.shape)
    scale = _F(1.0 / (1.0 - p))
    mask = keep.astype(_F)
    mask *= scale
    return x * mask, mask


def dropout_backward(dy, cache):
    return dy * cache


# --- losses ---------------------------------------------------------------------------------------------------------


def _log_softmax(logits):
    z = logits - logits.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=1, keepdims=True))
    return z - lse


def softmax_cross_entropy(logits, labels, label_smoothing=0.0):
    """(mean loss, dlogits). Compiled: one call, one exp per element (10 classes, batch 32 / 1024: 3 / 63 us, the
    NumPy code below 37 / 174 us); the same operations but softmax as e / sum e instead of exp(log-softmax)."""
    if _jit.available():
        logits = _f32c(logits)
        d = np.empty_like(logits)
        loss = _jit.softmax_xent(logits, np.ascontiguousarray(labels, dtype=np.int64), float(label_smoothing), d)
        return float(loss), d
    n, k = logits.shape
    logp = _log_softmax(logits)
    rows = np.arange(n)
    ls = float(label_smoothing)
    nll = -logp[rows, labels].astype(np.float64)
    if ls:
        smooth = -logp.mean(axis=1, dtype=np.float64)
        loss = float(np.mean((1 - ls) * nll + ls * smooth)) if n else 0.0
    else:
        loss = float(np.mean(nll)) if n else 0.0
    d = np.exp(logp)
    if ls:
        d -= _F(ls / k)
    d[rows, labels] -= _F(1 - ls)
    d *= _F(1.0 / max(n, 1))
    return loss, d


def softmax_cross_entropy_stats(logits, labels):
    n = logits.shape[0]
    logp = _log_softmax(logits)
    loss_sum = float(-logp[np.arange(n), labels].astype(np.float64).sum())
    correct = int((logits.argmax(axis=1) == labels).sum())
    return loss_sum, correct


def binary_cross_entropy_with_logits(logits, targets):
    z = logits
    t = targets.astype(_F, copy=False)
    per = np.maximum(z, _F(0)) - z * t + np.log1p(np.exp(-np.abs(z)))
    loss = float(per.mean(dtype=np.float64)) if z.size else 0.0
    sig, _ = sigmoid_forward(z)
    d = sig - t
    d *= _F(1.0 / max(z.size, 1))
    return loss, d


# --- optimiser updates ----------------------------------------------------------------------------------------------


def sgd_update(p, g, buf, lr, momentum, dampening, nesterov, weight_decay, first_step):
    """torch.optim.SGD, in place on p and buf: compiled, one pass split over the threads (the same float32
    operations as the NumPy version below, which uses one scratch array and a pass per operation)."""
    if _jit.available() and p.flags.c_contiguous and g.flags.c_contiguous and (buf is None or buf.flags.c_contiguous):
        pf, gf = p.reshape(-1), _f32c(g).reshape(-1)
        has_buf = bool(momentum) and buf is not None
        bf = buf.reshape(-1) if has_buf else pf
        args = (has_buf, _F(lr), _F(momentum), _F(1 - dampening), bool(dampening), bool(nesterov),
                _F(weight_decay), bool(first_step))
        _jit_parallel(pf.size, 20, lambda s, e, _: _jit.sgd_update(pf[s:e], gf[s:e], bf[s:e], *args))
        return
    t = _thr.scratch("sgd_t", p.shape)
    if weight_decay:
        np.multiply(p, _F(weight_decay), out=t)
        t += g                                       # d = g + wd * p
        d = t
    else:
        d = g
    if momentum:
        if first_step:
            np.copyto(buf, d)                        # buf = d
        else:
            buf *= _F(momentum)                      # buf = momentum * buf + (1 - dampening) * d
            buf += _F(1 - dampening) * d if dampening else d
        if nesterov:                                 # d = d + momentum * buf
            if d is t:
                t += _F(momentum) * buf
            else:
                np.multiply(buf, _F(momentum), out=t)
                t += d
            d = t
        else:
            d = buf
    if d is t:
        t *= _F(lr)
    else:
        np.multiply(d, _F(lr), out=t)
    p -= t                                           # p = p - lr * d


def adam_update(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay, decoupled):
    """torch Adam / AdamW, in place on p, m and v."""
    if weight_decay and decoupled:
        p *= _F(1 - lr * weight_decay)
        d = g
    elif weight_decay:
        d = g + _F(weight_decay) * p
    else:
        d = g
    m *= _F(beta1)
    m += _F(1 - beta1) * d
    v *= _F(beta2)
    v += _F(1 - beta2) * (d * d)
    bc1 = 1 - beta1 ** step
    bc2 = 1 - beta2 ** step
    denom = np.sqrt(v * _F(1.0 / bc2))
    denom += _F(eps)
    p -= _F(lr / bc1) * (m / denom)


# --- data-set batches from a plan (hetnet.data.ResidentLoader; the host loader is the default on this backend) -----

resident_data = False       # host batches come from BatchLoader's background thread, which is faster here


def upload(a) -> np.ndarray:
    """a as a C-contiguous array of its own dtype (uint8 images, int32 plans)."""
    return np.ascontiguousarray(a)


def gather_images(images, labels, plan, start, count, scale, shift):
    from ..data.transforms import gather_planned

    return gather_planned(images, labels, plan, int(start), int(count), scale, shift)
