"""The float64 reference backend: every op written straight from its derivation. It is the oracle every other
backend is tested against, so it is meant to be obviously right, never fast.

Loops run over kernel offsets or output pixels and vectorise only over the batch and channel axes, so each line reads
like the formula it implements. Forward returns (y, cache); backward reads the cache, *adds* parameter gradients into
the arrays it is given and returns dx. No function modifies its inputs (x, dy, w, b, labels, targets, g); the only
in-place effects are gradient accumulators, BatchNorm's running statistics and the optimiser's p and state arrays.

Shape legend: N batch, C input channels, K output channels, H/W input height/width, P/Q output height/width,
R/S kernel height/width, F features.

    >>> import numpy as np
    >>> from hetnet.backends import reference as ref
    >>> y, cache = ref.relu_forward(np.array([[-1.0, 2.0]]))
    >>> y.tolist(), ref.relu_backward(np.ones((1, 2)), cache).tolist()
    ([[0.0, 2.0]], [[0.0, 1.0]])
"""
from __future__ import annotations

import math
import sys

import numpy as np

from ..random import counter_uniform
from . import compose
from .gather import gather_images as _gather_float32

name = "reference"
precision = "fp32"          # (float64 throughout: the oracle)
dtype = np.dtype(np.float64)
xp = np
# every fusion of hetnet.plan, each the chain of reference ops it stands for (backends.compose)
fusions = frozenset({"conv_relu_pool", "conv_pool", "conv_gelu", "bn_relu_pool", "bn_gelu", "dense_chain", "conv_act",
                     "bn_act", "bn_relu", "dense_act"})


# --- conversions and allocation ------------------------------------------------------------------------------------


def asarray(a) -> np.ndarray:
    """A float64 copy of a (never a view of the caller's array)."""
    return np.array(a, dtype=np.float64, copy=True)


def to_numpy(arr) -> np.ndarray:
    """A host copy, dtype kept."""
    return np.array(arr, copy=True)


def zeros(shape, dtype=None) -> np.ndarray:
    return np.zeros(shape, dtype=np.float64 if dtype is None else dtype)


def labels(a) -> np.ndarray:
    return np.array(a, dtype=np.int64, copy=True)


def synchronize() -> None:
    return None


resident_data = False       # batches come from the host loader


def upload(a) -> np.ndarray:
    """A copy of a, dtype kept (uint8 images, int32 plans)."""
    return np.array(a, copy=True)


def gather_images(images, labels, plan, start, count, scale, shift, reflect=False):
    """The cpu backend's float32 batch (what the host loader serves), widened to float64."""
    x, y = _gather_float32(images, labels, plan, start, count, scale, shift, reflect)
    return x.astype(np.float64), y


def _f64(a) -> np.ndarray:
    """a as float64 without copying when it already is (read-only use)."""
    return np.asarray(a, dtype=np.float64)


def _act(z, act):
    """The activation a forward op applies to its result: None or "relu"."""
    if act is None:
        return z
    if act != "relu":
        raise ValueError(f"unknown activation {act!r} (expected None or 'relu')")
    return np.maximum(z, 0.0)


def _masked(dx, x):
    """dE/d(the ReLU's input) from dE/dx, where x = relu(z): dx * (x > 0) (see backends.compose)."""
    return np.where(_f64(x) > 0, _f64(dx), 0.0)


relu_mask = _masked     # the contract's name; backward ops take a flag of that name


# --- dense ---------------------------------------------------------------------------------------------------------
# y[n,k] = sum_f x[n,f] w[k,f] + b[k]


def dense_forward(x, w, b, act=None):
    x, w = _f64(x), _f64(w)
    y = np.einsum("nf,kf->nk", x, w)                              # x[N,F] . w[K,F] -> y[N,K]
    if b is not None:
        y = y + _f64(b)[None, :]
    return _act(y, act), (x, w)


def dense_backward(dy, cache, dw, db, need_dx: bool = True, relu_mask: bool = False):
    x, w = cache
    dy = _f64(dy)
    # dL/dw[k,f] = sum_n dL/dy[n,k] * dy[n,k]/dw[k,f] = sum_n dy[n,k] x[n,f]
    if dw is not None:
        dw += np.einsum("nk,nf->kf", dy, x)
    # dL/db[k] = sum_n dy[n,k]                                   (dy[n,k]/db[k] = 1)
    if db is not None:
        db += dy.sum(axis=0)
    if not need_dx:
        return None
    # dL/dx[n,f] = sum_k dy[n,k] w[k,f]
    dx = np.einsum("nk,kf->nf", dy, w)
    return _masked(dx, x) if relu_mask else dx


# --- conv2d --------------------------------------------------------------------------------------------------------
# y[n,k,p,q] = b[k] + sum_{c,r,s} w[k,c,r,s] * xpad[n, c, p*stride + r, q*stride + s]
# Loop over kernel offsets (r, s): for a fixed offset the input pixels that meet w[:,:,r,s] form a strided
# [N,C,P,Q] slice of the padded input, and the sum over c is a small matrix product.


def _window(r: int, s: int, stride: int, p: int, q: int):
    """Index of xpad[:, :, p'*stride + r, q'*stride + s] for all output pixels p' < P, q' < Q."""
    return (slice(None), slice(None), slice(r, r + stride * (p - 1) + 1, stride),
            slice(s, s + stride * (q - 1) + 1, stride))


def conv2d_forward(x, w, b, stride: int, padding: int, act=None, relu_mask=None):
    x, w = _f64(x), _f64(w)
    n, c, h, wd = x.shape
    k, c2, r_, s_ = w.shape
    assert c == c2, f"conv2d: x has {c} channels, w expects {c2}"
    p_ = (h + 2 * padding - r_) // stride + 1
    q_ = (wd + 2 * padding - s_) // stride + 1
    xpad = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))     # [N,C,H+2pad,W+2pad]
    y = np.zeros((n, k, p_, q_))
    for r in range(r_):
        for s in range(s_):
            patch = xpad[_window(r, s, stride, p_, q_)]                               # [N,C,P,Q]
            y += np.einsum("ncpq,kc->nkpq", patch, w[:, :, r, s])
    if b is not None:
        y += _f64(b)[None, :, None, None]
    return _act(y, act), (xpad, w, stride, padding, x.shape)


def conv2d_backward(dy, cache, dw, db, need_dx: bool = True, relu_mask: bool = False):
    xpad, w, stride, padding, xshape = cache
    dy = _f64(dy)
    _, _, p_, q_ = dy.shape
    _, _, r_, s_ = w.shape
    # dL/db[k] = sum_{n,p,q} dy[n,k,p,q]
    if db is not None:
        db += dy.sum(axis=(0, 2, 3))
    dxpad = np.zeros(xpad.shape) if need_dx else None
    for r in range(r_):
        for s in range(s_):
            win = _window(r, s, stride, p_, q_)
            # dL/dw[k,c,r,s] = sum_{n,p,q} dy[n,k,p,q] * xpad[n,c,p*stride+r,q*stride+s]
            if dw is not None:
                dw[:, :, r, s] += np.einsum("nkpq,ncpq->kc", dy, xpad[win])
            # dL/dxpad[n,c,p*stride+r,q*stride+s] += sum_k dy[n,k,p,q] w[k,c,r,s]  (every (p,q,r,s) that reads it)
            if need_dx:
                dxpad[win] += np.einsum("nkpq,kc->ncpq", dy, w[:, :, r, s])
    if not need_dx:
        return None
    # padding is a constant: the gradient of the padded border is dropped
    h, wd = xshape[2], xshape[3]
    dx = dxpad[:, :, padding:padding + h, padding:padding + wd].copy()
    return _masked(dx, xpad[:, :, padding:padding + h, padding:padding + wd]) if relu_mask else dx


# --- pooling -------------------------------------------------------------------------------------------------------
# No padding; P = (H - kernel)//stride + 1. Loop over output pixels.


def maxpool2d_forward(x, kernel: int, stride: int):
    x = _f64(x)
    n, c, h, w = x.shape
    p_, q_ = (h - kernel) // stride + 1, (w - kernel) // stride + 1
    y = np.empty((n, c, p_, q_))
    arg = np.empty((n, c, p_, q_), dtype=np.int64)      # flat index r*kernel + s of the first maximum in the window
    for p in range(p_):
        for q in range(q_):
            win = x[:, :, p * stride:p * stride + kernel, q * stride:q * stride + kernel].reshape(n, c, -1)
            arg[:, :, p, q] = np.argmax(win, axis=2)    # argmax returns the first maximum (row-major)
            y[:, :, p, q] = np.max(win, axis=2)
    return y, (arg, x, kernel, stride)


def maxpool2d_backward(dy, cache, relu_mask: bool = False):
    arg, x, kernel, stride = cache
    xshape = x.shape
    dy = _f64(dy)
    n, c, p_, q_ = dy.shape
    dx = np.zeros(xshape)
    nn_, cc = np.meshgrid(np.arange(n), np.arange(c), indexing="ij")
    for p in range(p_):
        for q in range(q_):
            # y = x[argmax] so dL/dx[argmax] += dy; the other window elements get nothing. Overlapping windows add.
            rr = p * stride + arg[:, :, p, q] // kernel
            ss = q * stride + arg[:, :, p, q] % kernel
            dx[nn_, cc, rr, ss] += dy[:, :, p, q]       # (n, c) pairs are distinct, so += does not lose updates
    return _masked(dx, x) if relu_mask else dx


def avgpool2d_forward(x, kernel: int, stride: int):
    x = _f64(x)
    n, c, h, w = x.shape
    p_, q_ = (h - kernel) // stride + 1, (w - kernel) // stride + 1
    y = np.empty((n, c, p_, q_))
    for p in range(p_):
        for q in range(q_):
            y[:, :, p, q] = x[:, :, p * stride:p * stride + kernel, q * stride:q * stride + kernel].mean(axis=(2, 3))
    return y, (x.shape, kernel, stride)


def avgpool2d_backward(dy, cache):
    xshape, kernel, stride = cache
    dy = _f64(dy)
    _, _, p_, q_ = dy.shape
    dx = np.zeros(xshape)
    for p in range(p_):
        for q in range(q_):
            # y = (1/kernel^2) sum_window x, so each window element gets dy / kernel^2; overlapping windows add
            dx[:, :, p * stride:p * stride + kernel, q * stride:q * stride + kernel] += \
                dy[:, :, p, q][:, :, None, None] / (kernel * kernel)
    return dx


def global_avgpool2d_forward(x):
    x = _f64(x)
    return x.mean(axis=(2, 3)), x.shape            # [N,C,H,W] -> [N,C]


def global_avgpool2d_backward(dy, cache):
    n, c, h, w = cache
    # y[n,c] = (1/(H*W)) sum_{h,w} x[n,c,h,w]  ->  dx[n,c,h,w] = dy[n,c] / (H*W)
    return np.broadcast_to(_f64(dy)[:, :, None, None] / (h * w), (n, c, h, w)).copy()


# --- activations ---------------------------------------------------------------------------------------------------


def relu_forward(x):
    x = _f64(x)
    positive = x > 0
    return np.where(positive, x, 0.0), positive


def relu_backward(dy, cache):
    # dy/dx = 1 where x > 0, else 0
    return np.where(cache, _f64(dy), 0.0)


def sigmoid_forward(x):
    x = _f64(x)
    # 1/(1+exp(-x)) for x >= 0 and exp(x)/(1+exp(x)) for x < 0: the same function, no overflow either side
    e = np.exp(-np.abs(x))
    y = np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return y, y


def sigmoid_backward(dy, cache):
    y = cache
    # d sigmoid/dx = y (1 - y)
    return _f64(dy) * y * (1.0 - y)


def tanh_forward(x):
    y = np.tanh(_f64(x))
    return y, y


def tanh_backward(dy, cache):
    y = cache
    # d tanh/dx = 1 - y^2
    return _f64(dy) * (1.0 - y * y)


# GELU, exact form: y = x * Phi(x) with Phi the standard normal CDF.
# Phi(x) = (1 + erf(x / sqrt 2)) / 2 = erfc(-x / sqrt 2) / 2: the erfc form keeps every digit where Phi is tiny
# (x << 0), where 1 + erf(...) would cancel.


_erfc = np.frompyfunc(math.erfc, 1, 1)            # the C library's erfc, element by element (NumPy has none)


def _normal_cdf(x):
    return 0.5 * np.asarray(_erfc(-x / math.sqrt(2.0)), dtype=np.float64)


def gelu_forward(x):
    x = _f64(x)
    return x * _normal_cdf(x), x.copy()


def gelu_backward(dy, cache):
    x = cache
    # d/dx [x Phi(x)] = Phi(x) + x Phi'(x),  Phi'(x) = phi(x) = exp(-x^2 / 2) / sqrt(2 pi)   (product rule)
    phi = np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    return _f64(dy) * (_normal_cdf(x) + x * phi)


def scale_forward(x, factor: float):
    return _f64(x) * float(factor), float(factor)


def scale_backward(dy, cache):
    # y = factor * x  ->  dx = factor * dy
    return _f64(dy) * cache


def softmax_forward(x):
    x = _f64(x)
    e = np.exp(x - x.max(axis=1, keepdims=True))     # shift by the row maximum: same softmax, no overflow
    y = e / e.sum(axis=1, keepdims=True)
    return y, y


def softmax_backward(dy, cache):
    y = cache
    dy = _f64(dy)
    # Jacobian dy_i/dx_j = y_i (delta_ij - y_j), so dx_j = sum_i dy_i y_i (delta_ij - y_j) = y_j (dy_j - sum_i dy_i y_i)
    return y * (dy - (dy * y).sum(axis=1, keepdims=True))


# --- batch normalisation -------------------------------------------------------------------------------------------
# x [N,C] or [N,C,H,W]; statistics per channel c over the axes A = (0,) or (0, 2, 3), m = number of values per channel.
# xhat = (x - mean) / sqrt(var + eps);  y = gamma * xhat + beta.


def _bn_axes(x) -> tuple:
    return (0,) if x.ndim == 2 else (0, 2, 3)


def _per_channel(v, ndim: int):
    """[C] -> broadcastable against [N,C] or [N,C,H,W]."""
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def batchnorm_forward(x, gamma, beta, running_mean, running_var, momentum: float, eps: float, training: bool,
                      act=None, reduce=None):
    x = _f64(x)
    axes = _bn_axes(x)
    m = x.size // x.shape[1]
    g, bt = _per_channel(_f64(gamma), x.ndim), _per_channel(_f64(beta), x.ndim)
    if training:
        if reduce is None:
            mean = x.mean(axis=axes)                                      # [C]
            var = ((x - _per_channel(mean, x.ndim)) ** 2).mean(axis=axes)  # [C], biased (divide by m)
        else:
            # synchronised: the statistics of every process's batch together, m = their total count M
            s = np.append(x.sum(axis=axes), m)                            # [C + 1]: sum_A x, then the count
            reduce(s)
            m = s[-1]
            mean = s[:-1] / m
            q = ((x - _per_channel(mean, x.ndim)) ** 2).sum(axis=axes)     # sum_A (x - mean)^2 about the global mean
            reduce(q)
            var = q / m
        # running statistics as PyTorch: exponential moving average, unbiased variance m/(m-1)
        running_mean[...] = (1.0 - momentum) * running_mean + momentum * mean
        running_var[...] = (1.0 - momentum) * running_var + momentum * var * (m / (m - 1))
    else:
        mean, var = _f64(running_mean).copy(), _f64(running_var).copy()
    inv_std = 1.0 / np.sqrt(var + eps)                                 # [C]
    xc = x - _per_channel(mean, x.ndim)                                # x - mean
    xhat = xc * _per_channel(inv_std, x.ndim)
    y = g * xhat + bt
    return _act(y, act), (training, x, xc, xhat, inv_std, _f64(gamma), axes, m, reduce if training else None)


def batchnorm_backward(dy, cache, dgamma, dbeta, need_dx: bool = True, relu_mask: bool = False):
    training, x, xc, xhat, inv_std, gamma, axes, m, reduce = cache
    dy = _f64(dy)
    nd = dy.ndim
    # dL/dbeta = sum_A dy;  dL/dgamma = sum_A dy * xhat  (each not computed when None: a frozen parameter). Sums over
    # this process's batch alone when synchronised: the gradient reduction averages them with the other processes'.
    if dbeta is not None:
        dbeta += dy.sum(axis=axes)
    if dgamma is not None:
        dgamma += (dy * xhat).sum(axis=axes)
    if not need_dx:
        return None
    dxhat = dy * _per_channel(gamma, nd)                              # dL/dxhat = dy * gamma
    if not training:
        # mean and var are constants in eval: xhat = (x - rm) * inv_std
        dx = dxhat * _per_channel(inv_std, nd)
        return _masked(dx, x) if relu_mask else dx
    # training: x reaches xhat directly and through mean and var (var = (1/m) sum_A (x - mean)^2); synchronised,
    # mean and var are those of every process's batch, so the three sums below run over all of them (L = the sum of
    # the processes' losses)
    sums = np.concatenate([dxhat.sum(axis=axes), (dxhat * xc).sum(axis=axes), xc.sum(axis=axes)])
    if reduce is not None:
        reduce(sums)
    sum_dxhat, sum_dxhat_xc, sum_xc = np.split(sums, 3)
    # dL/dvar  = sum_A dxhat * (x - mean) * (-1/2) (var + eps)^(-3/2)
    dvar = sum_dxhat_xc * -0.5 * inv_std ** 3
    # dL/dmean = sum_A dxhat * (-inv_std) + dL/dvar * (-2/m) sum_A (x - mean)     (the last sum is 0 in exact maths)
    dmean = -sum_dxhat * inv_std + dvar * (-2.0 / m) * sum_xc
    # term 1: direct path, dxhat * inv_std
    # term 2: through var,  dL/dvar * dvar/dx = dL/dvar * 2 (x - mean) / m
    # term 3: through mean, dL/dmean * dmean/dx = dL/dmean / m
    dx = (dxhat * _per_channel(inv_std, nd)
          + _per_channel(dvar, nd) * 2.0 * xc / m
          + _per_channel(dmean, nd) / m)
    return _masked(dx, x) if relu_mask else dx


# --- dropout -------------------------------------------------------------------------------------------------------


def _seed(seed) -> int:
    """A seed given as an int or as an array of one uint32 (read now: a replayed step fills it each time)."""
    return int(np.asarray(seed).reshape(-1)[0]) if hasattr(seed, "shape") else int(seed)


def dropout_forward(x, p: float, seed):
    x = _f64(x)
    seed = _seed(seed)
    # keep element i (flat C order) iff u_i >= p; the mask is the same on every backend for the same seed
    keep = (counter_uniform(seed, x.size) >= p).reshape(x.shape)
    scale = 1.0 / (1.0 - p)
    return np.where(keep, x * scale, 0.0), (keep, scale)


def dropout_backward(dy, cache):
    keep, scale = cache
    # y = x * keep * scale  ->  dx = dy * keep * scale
    return np.where(keep, _f64(dy) * scale, 0.0)


# --- losses (mean over the batch) ----------------------------------------------------------------------------------


def _log_softmax(z):
    """log softmax_k(z) = z_k - logsumexp(z), with the row maximum subtracted first."""
    shifted = z - z.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def softmax_cross_entropy(logits, labels, label_smoothing: float = 0.0):
    z = _f64(logits)
    lab = np.asarray(labels, dtype=np.int64)
    n, k = z.shape
    logp = _log_softmax(z)                                              # [N,K]
    t = np.full((n, k), label_smoothing / k)                           # target distribution
    t[np.arange(n), lab] += 1.0 - label_smoothing
    loss = float(-(t * logp).sum() / n)
    # d/dz_j of -sum_k t_k log softmax_k = softmax_j sum_k t_k - t_j = softmax_j - t_j (sum_k t_k = 1); mean -> / N
    dlogits = (np.exp(logp) - t) / n
    return loss, dlogits


def softmax_cross_entropy_into(logits, labels, dlogits, loss_sum, correct, label_smoothing: float = 0.0) -> None:
    """Training and evaluation steps' loss: dlogits[...] = the gradient (unless None), loss_sum[0] += the sum of the
    per-example losses, correct[0] += the number of right argmaxes."""
    n = logits.shape[0]
    loss, d = softmax_cross_entropy(logits, labels, label_smoothing)
    if dlogits is not None:
        dlogits[...] = d
    loss_sum[0] += loss * n
    correct[0] += int((np.argmax(_f64(logits), axis=1) == np.asarray(labels)).sum())


def softmax_cross_entropy_stats(logits, labels):
    z = _f64(logits)
    lab = np.asarray(labels, dtype=np.int64)
    n = z.shape[0]
    logp = _log_softmax(z)
    loss_sum = float(-logp[np.arange(n), lab].sum())
    correct = int((np.argmax(z, axis=1) == lab).sum())
    return loss_sum, correct


def binary_cross_entropy_with_logits(logits, targets):
    z, t = _f64(logits), _f64(targets)
    # -t log sigmoid(z) - (1-t) log(1 - sigmoid(z)) = max(z,0) - z t + log(1 + exp(-|z|)), finite for any z
    loss = float(np.mean(np.maximum(z, 0.0) - z * t + np.log1p(np.exp(-np.abs(z)))))
    sig, _ = sigmoid_forward(z)
    # dloss/dz = sigmoid(z) - t; mean over all elements -> / size
    return loss, (sig - t) / z.size


# --- optimiser updates (in place on p and the state arrays) --------------------------------------------------------


def sgd_update(p, g, buf, lr: float, momentum: float, dampening: float, nesterov: bool, weight_decay: float,
               first_step: bool, scalars=None) -> None:
    if scalars is not None:                             # [lr, first step] read now (a replayed step fills them)
        lr, first_step = float(scalars[0]), bool(scalars[1])
    d = _f64(g) + weight_decay * p                      # L2 weight decay adds wd * p to the gradient
    if momentum:
        if first_step:
            buf[...] = d                                # torch: the buffer starts as the first gradient
        else:
            buf[...] = momentum * buf + (1.0 - dampening) * d
        d = d + momentum * buf if nesterov else buf.copy()
    p -= lr * d


def adam_update(p, g, m, v, step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                decoupled: bool, scalars=None) -> None:
    if scalars is not None:   # [lr, -, lr / (1 - beta1^step), 1 / (1 - beta2^step)] read now
        lr, step_size, inv_bc2 = float(scalars[0]), float(scalars[2]), float(scalars[3])
    else:
        step_size, inv_bc2 = lr / (1.0 - beta1 ** step), 1.0 / (1.0 - beta2 ** step)
    d = _f64(g)
    if weight_decay:
        if decoupled:
            p *= 1.0 - lr * weight_decay                # AdamW: decay the weights, not the gradient
        else:
            d = d + weight_decay * p                    # Adam: L2 term in the gradient
    m[...] = beta1 * m + (1.0 - beta1) * d              # first moment
    v[...] = beta2 * v + (1.0 - beta2) * d * d          # second moment
    # bias corrections (step counts from 1): m_hat = m / (1 - beta1^step), v_hat = v / (1 - beta2^step)
    p -= step_size * m / (np.sqrt(v * inv_bc2) + eps)


# --- fused ops: the chains of reference ops they stand for (backends.compose) --------------------------------------

_this = sys.modules[__name__]


def conv2d_relu_maxpool_forward(x, w, b, stride, padding, pool_kernel, pool_stride):
    return compose.conv2d_relu_maxpool_forward(_this, x, w, b, stride, padding, pool_kernel, pool_stride)


def conv2d_relu_maxpool_backward(dy, cache, dw, db, need_dx=True, relu_mask=False):
    return compose.conv2d_relu_maxpool_backward(_this, dy, cache, dw, db, need_dx, relu_mask)


def conv2d_maxpool_forward(x, w, b, stride, padding, pool_kernel, pool_stride, relu_mask=None):
    return compose.conv2d_maxpool_forward(_this, x, w, b, stride, padding, pool_kernel, pool_stride, relu_mask)


def conv2d_maxpool_backward(dy, cache, dw, db, need_dx=True, relu_mask=False):
    return compose.conv2d_maxpool_backward(_this, dy, cache, dw, db, need_dx, relu_mask)


def bn_relu_maxpool_forward(x, gamma, beta, running_mean, running_var, momentum, eps, training, pool_kernel,
                            pool_stride, reduce=None):
    return compose.bn_relu_maxpool_forward(_this, x, gamma, beta, running_mean, running_var, momentum, eps, training,
                                           pool_kernel, pool_stride, reduce)


def bn_relu_maxpool_backward(dy, cache, dgamma, dbeta, need_dx=True, relu_mask=False, inplace=False):
    return compose.bn_relu_maxpool_backward(_this, dy, cache, dgamma, dbeta, need_dx, relu_mask)


def conv2d_gelu_forward(x, w, b, stride, padding, relu_mask=None):
    return compose.conv2d_gelu_forward(_this, x, w, b, stride, padding, relu_mask)


def conv2d_gelu_backward(dy, cache, dw, db, need_dx=True, relu_mask=False):
    return compose.conv2d_gelu_backward(_this, dy, cache, dw, db, need_dx, relu_mask)


def bn_relu_forward(x, gamma, beta, running_mean, running_var, momentum, eps, training, reduce=None):
    return compose.bn_relu_forward(_this, x, gamma, beta, running_mean, running_var, momentum, eps, training, reduce)


def bn_relu_backward(dy, cache, dgamma, dbeta, need_dx=True, relu_mask=False, inplace=False):
    return compose.bn_relu_backward(_this, dy, cache, dgamma, dbeta, need_dx, relu_mask)


def bn_gelu_forward(x, gamma, beta, running_mean, running_var, momentum, eps, training, reduce=None):
    return compose.bn_gelu_forward(_this, x, gamma, beta, running_mean, running_var, momentum, eps, training, reduce)


def bn_gelu_backward(dy, cache, dgamma, dbeta, need_dx=True, relu_mask=False, inplace=False):
    return compose.bn_gelu_backward(_this, dy, cache, dgamma, dbeta, need_dx, relu_mask)


def dense_chain_forward(x, layers):
    return compose.dense_chain_forward(_this, x, layers)


def dense_chain_backward(dy, cache, grads, need_dx=True, relu_mask=False, accumulate=True):
    return compose.dense_chain_backward(_this, dy, cache, grads, need_dx, relu_mask, accumulate)
