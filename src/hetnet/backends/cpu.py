"""The fast CPU backend: float32, vectorised NumPy with BLAS (the thesis's OpenMP version).

Convolution is im2col + one GEMM over the whole batch; pooling uses reshapes for non-overlapping windows and strided
window views otherwise. Every op follows the interface in `hetnet.backends` (shape legend there: N batch, C input
channels, K filters, H/W input, P/Q output, R/S kernel).

    >>> from hetnet.backends import cpu
    >>> import numpy as np
    >>> y, cache = cpu.relu_forward(cpu.asarray(np.array([-1.0, 2.0])))
    >>> y.tolist()
    [0.0, 2.0]
"""
from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ..random import counter_uniform

name = "cpu"
dtype = np.dtype(np.float32)
xp = np

_F = np.float32


# --- conversions and allocation -------------------------------------------------------------------------------------


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


def dense_forward(x, w, b):
    """y[N,K] = x[N,F] @ w[K,F]^T + b[K]."""
    y = x @ w.T
    if b is not None:
        y += b
    return y, (x, w)


def dense_backward(dy, cache, dw, db, need_dx=True):
    x, w = cache
    dw += dy.T @ x                      # dE/dw[k,f] = sum_n dy[n,k] x[n,f]
    if db is not None:
        db += dy.sum(axis=0)            # dE/db[k] = sum_n dy[n,k]
    return dy @ w if need_dx else None  # dE/dx[n,f] = sum_k dy[n,k] w[k,f]


# --- convolution ----------------------------------------------------------------------------------------------------


def _windows(xp_, r, s, stride, p, q):
    """Strided view xw[n, c, p, q, r, s] = xp_[n, c, p*stride + r, q*stride + s] (no copy)."""
    n, c, _, _ = xp_.shape
    sn, sc, sh, sw = xp_.strides
    return as_strided(xp_, (n, c, p, q, r, s), (sn, sc, sh * stride, sw * stride, sh, sw), writeable=False)


def _pad(x, padding):
    if padding == 0:
        return x
    n, c, h, w = x.shape
    out = np.zeros((n, c, h + 2 * padding, w + 2 * padding), dtype=x.dtype)
    out[:, :, padding:padding + h, padding:padding + w] = x
    return out


def conv2d_forward(x, w, b, stride, padding):
    """y[n,k,p,q] = b[k] + sum_{c,r,s} w[k,c,r,s] xpad[n,c,p*stride+r,q*stride+s], as cols[NPQ, CRS] @ w2[K, CRS]^T."""
    n, c, h, wd = x.shape
    k, _, r, s = w.shape
    p = (h + 2 * padding - r) // stride + 1
    q = (wd + 2 * padding - s) // stride + 1
    xw = _windows(_pad(x, padding), r, s, stride, p, q)
    cols = np.ascontiguousarray(xw.transpose(0, 2, 3, 1, 4, 5)).reshape(n * p * q, c * r * s)
    w2 = w.reshape(k, c * r * s)
    y = cols @ w2.T                                                  # [NPQ, K]
    if b is not None:
        y += b
    y = np.ascontiguousarray(y.reshape(n, p, q, k).transpose(0, 3, 1, 2))
    return y, (cols, w, x.shape, stride, padding)


def conv2d_backward(dy, cache, dw, db, need_dx=True):
    cols, w, xshape, stride, padding = cache
    n, c, h, wd = xshape
    k, _, r, s = w.shape
    _, _, p, q = dy.shape
    dy2 = np.ascontiguousarray(dy.transpose(0, 2, 3, 1)).reshape(n * p * q, k)
    dw += (dy2.T @ cols).reshape(w.shape)          # dE/dw = dy2^T cols
    if db is not None:
        db += dy2.sum(axis=0)                      # dE/db[k] = sum over n, p, q
    if not need_dx:
        return None
    dcols = (dy2 @ w.reshape(k, -1)).reshape(n, p, q, c, r, s)   # dE/dcols, scattered back (col2im)
    hp, wp = h + 2 * padding, wd + 2 * padding
    dxp = np.zeros((n, c, hp, wp), dtype=_F)
    for i in range(r):
        for j in range(s):
            dxp[:, :, i:i + stride * (p - 1) + 1:stride, j:j + stride * (q - 1) + 1:stride] += \
                dcols[:, :, :, :, i, j].transpose(0, 3, 1, 2)
    if padding:
        return np.ascontiguousarray(dxp[:, :, padding:padding + h, padding:padding + wd])
    return dxp


# --- pooling --------------------------------------------------------------------------------------------------------


def maxpool2d_forward(x, kernel, stride):
    """y[n,c,p,q] = max over the window; the cache holds each window's first argmax (row-major)."""
    n, c, h, w = x.shape
    p = (h - kernel) // stride + 1
    q = (w - kernel) // stride + 1
    xw = _windows(x, kernel, kernel, stride, p, q).reshape(n, c, p, q, kernel * kernel)
    arg = xw.argmax(axis=-1)
    y = np.take_along_axis(xw, arg[..., None], axis=-1)[..., 0]
    return np.ascontiguousarray(y), (arg, x.shape, kernel, stride)


def maxpool2d_backward(dy, cache):
    arg, xshape, kernel, stride = cache
    n, c, p, q = dy.shape
    dx = np.zeros(xshape, dtype=_F)
    for i in range(kernel):
        for j in range(kernel):
            sel = arg == i * kernel + j
            dx[:, :, i:i + stride * (p - 1) + 1:stride, j:j + stride * (q - 1) + 1:stride] += np.where(sel, dy, 0)
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


# --- activations ----------------------------------------------------------------------------------------------------


def relu_forward(x):
    return np.maximum(x, _F(0)), x


def relu_backward(dy, cache):
    return np.where(cache > 0, dy, _F(0))


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


def _bn_axes(x):
    return (0,) if x.ndim == 2 else (0, 2, 3)


def _bn_bcast(v, ndim):
    return v.reshape(1, -1) if ndim == 2 else v.reshape(1, -1, 1, 1)


def batchnorm_forward(x, gamma, beta, running_mean, running_var, momentum, eps, training):
    """y = gamma * (x - mean) / sqrt(var + eps) + beta, per channel."""
    axes = _bn_axes(x)
    m = x.size // x.shape[1]
    if training:
        mean = x.mean(axis=axes, dtype=np.float64)
        var = ((x - _bn_bcast(mean.astype(_F), x.ndim)) ** 2).mean(axis=axes, dtype=np.float64)
        running_mean *= _F(1 - momentum)
        running_mean += (momentum * mean).astype(_F)
        running_var *= _F(1 - momentum)
        running_var += (momentum * var * m / max(m - 1, 1)).astype(_F)
    else:
        mean = running_mean.astype(np.float64)
        var = running_var.astype(np.float64)
    inv_std = (1.0 / np.sqrt(var + eps)).astype(_F)
    xhat = (x - _bn_bcast(mean.astype(_F), x.ndim)) * _bn_bcast(inv_std, x.ndim)
    y = xhat * _bn_bcast(gamma, x.ndim) + _bn_bcast(beta, x.ndim)
    return y, (xhat, inv_std, gamma, training)


def batchnorm_backward(dy, cache, dgamma, dbeta):
    xhat, inv_std, gamma, training = cache
    axes = _bn_axes(dy)
    nd = dy.ndim
    sum_dy = dy.sum(axis=axes)
    sum_dy_xhat = (dy * xhat).sum(axis=axes)
    dgamma += sum_dy_xhat          # dE/dgamma = sum dy * xhat
    dbeta += sum_dy                # dE/dbeta = sum dy
    scale = gamma * inv_std
    if not training:
        return dy * _bn_bcast(scale, nd)
    m = dy.size // dy.shape[1]
    # dx = gamma*inv_std * (dy - mean(dy) - xhat * mean(dy * xhat))
    dx = dy - _bn_bcast(sum_dy / m, nd) - xhat * _bn_bcast(sum_dy_xhat / m, nd)
    dx *= _bn_bcast(scale, nd)
    return dx


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
    """torch.optim.SGD, in place on p and buf."""
    d = g + _F(weight_decay) * p if weight_decay else g
    if momentum:
        if first_step:
            buf[...] = d
        else:
            buf *= _F(momentum)
            buf += _F(1 - dampening) * d if dampening else d
        d = d + _F(momentum) * buf if nesterov else buf
    p -= _F(lr) * d


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
