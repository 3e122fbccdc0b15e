"""Dense layers on the cpu backend: y = x w^T + b, and chains of Dense layers (ReLUs between) kept
feature-major (dense_chain_*). GEMMs are BLAS calls split over the thread pool.
"""
from __future__ import annotations

import numpy as np

from .. import compose
from . import _jit as jit
from . import threads as _thr
from . import _common as _c
from ._common import _F, _f32c
from .elementwise import relu_inplace, relu_mask as _masked

_GEMM_SPLIT = 1 << 40          # GEMMs: no cache chunking, just one share per thread
# GEMMs smaller than this (multiply-adds) run on one thread: a second one only re-reads the weights (measured
# thesis-m1 batch 32, 2 threads: step 6.3 -> 5.7 ms with its 2048x100 dense layer on one thread)
_DENSE_PARALLEL_MIN_MACS = 1 << 25


# --- dense ----------------------------------------------------------------------------------------------------------


def _dense_chunk(n: int, f: int, k: int, split: int) -> int:
    """Chunk of the `split` axis (batch rows or output features) for an (N, F) x (F, K) GEMM."""
    if n * f * k < _DENSE_PARALLEL_MIN_MACS:
        return max(1, split)
    other = (f + k) if split == n else (n + f)
    return _thr.chunk_size(split, 4 * other * 4, target=_GEMM_SPLIT)


# With the compiled paths' sgemm (_c.SGEMM) the three GEMMs are split over the threads by *columns of the output*:
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


def dense_forward(x, w, b, act=None):
    """y[N,K] = act(x[N,F] @ w[K,F]^T + b[K])."""
    x = _f32c(x)
    n, f = x.shape
    k = w.shape[0]
    y = np.empty((n, k), dtype=_F)
    if _c.SGEMM is not None and w.flags.c_contiguous and w.dtype == _F:

        def jbody(s, e, _):   # y[:, s:e] = x @ w[s:e]^T
            _c.SGEMM(101, 111, 112, n, e - s, f, _F(1), x.ctypes.data, f, w.ctypes.data + 4 * s * f, f, _F(0),
                   y.ctypes.data + 4 * s, k)

        _thr.parallel(k, _dense_share(k, n * f * k), jbody)
        if b is not None:
            y += b
        relu_inplace(y, act)
        return y, (x, w)
    wt = w.T

    def body(s, e, _):
        np.matmul(x[s:e], wt, out=y[s:e])
        if b is not None:
            y[s:e] += b

    _thr.parallel(n, _dense_chunk(n, f, k, n), body)
    relu_inplace(y, act)
    return y, (x, w)


def dense_backward(dy, cache, dw, db, need_dx=True, relu_mask=False):
    """Adds dE/dw, dE/db (each unless None); returns dE/dx (times (x > 0) with relu_mask: x was a ReLU output) or
    None."""
    x, w = cache
    dy = _f32c(dy)
    n, f = x.shape
    k = w.shape[0]
    if _c.SGEMM is not None and w.flags.c_contiguous and w.dtype == _F and (
            dw is None or (dw.flags.c_contiguous and dw.dtype == _F)):
        macs = n * f * k

        def jbody_dw(s, e, _):   # dw[s:e] += dy[:, s:e]^T x
            _c.SGEMM(101, 112, 111, e - s, f, n, _F(1), dy.ctypes.data + 4 * s, k, x.ctypes.data, f, _F(1),
                   dw.ctypes.data + 4 * s * f, f)

        if dw is not None:
            _thr.parallel(k, _dense_share(k, macs), jbody_dw)
        if db is not None:
            db += dy.sum(axis=0)
        if not need_dx:
            return None
        dx = np.empty((n, f), dtype=_F)

        def jbody_dx(s, e, _):   # dx[:, s:e] = dy @ w[:, s:e]
            _c.SGEMM(101, 111, 111, n, e - s, k, _F(1), dy.ctypes.data, k, w.ctypes.data + 4 * s, f, _F(0),
                   dx.ctypes.data + 4 * s, f)

        _thr.parallel(f, _dense_share(f, macs), jbody_dx)
        return _masked(dx, x) if relu_mask else dx

    def body_dw(s, e, _):
        dw[s:e] += dy[:, s:e].T @ x                   # dE/dw[k,f] = sum_n dy[n,k] x[n,f]

    if dw is not None:
        _thr.parallel(k, _dense_chunk(n, f, k, k), body_dw)
    if db is not None:
        db += dy.sum(axis=0)                          # dE/db[k] = sum_n dy[n,k]
    if not need_dx:
        return None
    dx = np.empty((n, f), dtype=_F)

    def body_dx(s, e, _):
        np.matmul(dy[s:e], w, out=dx[s:e])            # dE/dx[n,f] = sum_k dy[n,k] w[k,f]

    _thr.parallel(n, _dense_chunk(n, f, k, n), body_dx)
    return _masked(dx, x) if relu_mask else dx


# --- chains of Dense layers, ReLUs between, feature-major (the plan's dense_chain fusion) --------------------------
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


def _chain_native(layers) -> bool:
    """Whether the feature-major chain can run: OpenBLAS's sgemm with the compiled paths, and float32 C-contiguous
    weights (sgemm reads them, and writes the gradients, in place)."""
    return _c.SGEMM is not None and all(a.flags.c_contiguous and a.dtype == _F for w, b, _ in layers
                                        for a in ((w,) if b is None else (w, b)))


def _chain_forward_layer(h, first: bool, w, b, relu: bool):
    """yT[K,N] = act(w h^T + b) for h = x (N, F) when first, else act(w hT + b) for hT (F, N)."""
    k, f = w.shape
    n = h.shape[0] if first else h.shape[1]
    yt = np.empty((k, n), dtype=_F)
    bias = _NO_BIAS if b is None else b

    def body(s, e, _):   # yT[s:e] = w[s:e] hT, bias and ReLU on those rows
        _c.SGEMM(101, 111, 112 if first else 111, e - s, n, f, _F(1), w.ctypes.data + 4 * s * f, f, h.ctypes.data,
               f if first else n, _F(0), yt.ctypes.data + 4 * s * n, n)
        if b is not None or relu:
            bias_relu_rows(yt[s:e], bias[s:e] if b is not None else bias, b is not None, relu)

    _thr.parallel(k, _dense_share(k, n * f * k), body)
    return yt


def dense_chain_forward(x, layers):
    """y[N, K_last] of the chain layers = [(w[K,F], b[K] or None, relu after it)] applied to x[N, F0]; cache. The
    chain owns its ReLUs, the last one too (backends.compose)."""
    if not _chain_native(layers):
        return compose.dense_chain_forward(_c.backend(), x, layers)
    x = _f32c(x)
    ins = [x]       # layer j's input ins[j]: x (N, F0), then hT (F_j, N); ins[-1] the chain's output, transposed
    for j, (w, b, relu) in enumerate(layers):
        ins.append(_chain_forward_layer(ins[j], j == 0, w, b, relu))
    return np.ascontiguousarray(ins[-1].T), ("native", ins, layers)


def _chain_layer_grads(dzt, j, s: int, e: int, ins, layers, grads, accumulate: bool) -> None:
    """Rows s:e of layer j's gradients from dzt = its output's gradient, transposed (K_j, N), in place:
    dz = dzt where the ReLU passed (y > 0), db[k] = sum_n dz[k, n], dw[s:e] = dz[s:e] in_j (dE/dw[k,f] =
    sum_n dz[k,n] in[n,f]); a gradient that is None is not computed."""
    w, _, relu = layers[j]
    dw, db = grads[j]
    f = w.shape[1]
    n = dzt.shape[1]
    if relu or db is not None:
        relu_mask_rowsum(dzt[s:e], ins[j + 1][s:e], relu, _NO_BIAS if db is None else db[s:e], db is not None,
                              accumulate)
    if dw is None:
        return
    first = j == 0  # ins[0] is x (N, F): dw = dz x; later inputs are hT (F, N): dw = dz hT^T
    _c.SGEMM(101, 111, 111 if first else 112, e - s, f, n, _F(1), dzt.ctypes.data + 4 * s * n, n, ins[j].ctypes.data,
           f if first else n, _F(1 if accumulate else 0), dw.ctypes.data + 4 * s * f, f)


def dense_chain_backward(dy, cache, grads, need_dx=True, relu_mask=False, accumulate=True):
    """dy[N, K_last] back through the chain: grads = [(dw or None, db or None)] per layer, added to (or written,
    accumulate False; None: not computed); returns dE/dx[N, F0] (times (x > 0) with relu_mask) or None."""
    if cache[0] != "native" or not all(a is None or (a.flags.c_contiguous and a.dtype == _F) for g in grads for a in g):
        if cache[0] == "native":
            raise ValueError("dense_chain_backward: the gradients must be float32 C-contiguous arrays")
        return compose.dense_chain_backward(_c.backend(), dy, cache, grads, need_dx, relu_mask, accumulate)
    _, ins, layers = cache
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
            _c.SGEMM(101, 112, 111, e - s, n, k, _F(1), w.ctypes.data + 4 * s, f, dzt.ctypes.data, n, _F(0),
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
        _c.SGEMM(101, 112, 111, n, e - s, k, _F(1), dzt.ctypes.data, n, w.ctypes.data + 4 * s, f, _F(0),
               dx.ctypes.data + 4 * s, f)

    _thr.parallel(f, _dense_share(f, n * f * k), jbody_dx)
    return _masked(dx, ins[0]) if relu_mask else dx


# --- compiled loops -------------------------------------------------------------------------------------------------

if jit.available():
    _jit, _jit_sum = jit.kernel, jit.kernel_sum

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

