"""Element-wise ops on the cpu backend: ReLU (compiled, or NumPy with a byte mask), GELU (compiled with the C
library's erfc, or NumPy with a rational erfc), sigmoid, tanh, softmax, the constant scale and dropout.
"""
from __future__ import annotations

import math

import numpy as np

from ...random import counter_uniform
from . import _jit as jit
from ._common import _F, _elementwise, _f32c, _jit_parallel


# --- activations ----------------------------------------------------------------------------------------------------


def relu_inplace(y, act) -> None:
    """Apply a forward op's activation (None or "relu", see backends.compose) to its fresh output y, in place."""
    if act is None:
        return
    if act != "relu":
        raise ValueError(f"unknown activation {act!r} (expected None or 'relu')")
    yf = y.reshape(-1)
    if jit.available():
        _jit_parallel(yf.size, 8, lambda s, e, _: relu_forward_loop(yf[s:e], yf[s:e]))
    else:
        _elementwise(yf.size, 4, lambda s, e, _: np.maximum(yf[s:e], _F(0), out=yf[s:e]))


def relu_mask(dx, x):
    """dE/d(the ReLU's input) = dx * (x > 0) where x is a ReLU output; written over dx (a fresh gradient that only
    the caller holds) and returned."""
    dxf, xf = dx.reshape(-1), _f32c(x).reshape(-1)
    if jit.available():
        _jit_parallel(dxf.size, 12, lambda s, e, _: relu_backward_loop(dxf[s:e], xf[s:e], dxf[s:e]))
    else:
        _elementwise(dxf.size, 8, lambda s, e, _: np.multiply(dxf[s:e], xf[s:e] > 0, out=dxf[s:e]))
    return dx


def relu_forward(x):
    """y = max(x, 0); the cache is y itself (compiled path: dx = dy where y > 0) or the mask x > 0 (one byte per
    element, NumPy path)."""
    x = _f32c(x)
    y = np.empty_like(x)
    xf, yf = x.reshape(-1), y.reshape(-1)
    if jit.available():
        _jit_parallel(x.size, 8, lambda s, e, _: relu_forward_loop(xf[s:e], yf[s:e]))
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
        _jit_parallel(dy.size, 12, lambda s, e, _: relu_backward_loop(dyf[s:e], mf[s:e], dxf[s:e]))
        return dx

    def body(s, e, _):
        np.multiply(dyf[s:e], mf[s:e], out=dxf[s:e])

    _elementwise(dy.size, 9, body)
    return dx


# GELU (exact form): y = x * Phi(x), Phi(x) = erfc(-x / sqrt 2) / 2; dx = dy * (Phi(x) + x * phi(x)),
# phi(x) = exp(-x^2 / 2) / sqrt(2 pi). Phi and phi are evaluated in float64 and each result rounded once to
# float32. The erfc form keeps Phi's relative accuracy where it is tiny (x << 0); 1 + erf(x / sqrt 2) would cancel.
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _erfc(u):
    """erfc of a float64 array, relative error below 1.2e-7 everywhere (Numerical Recipes' erfcc, a Chebyshev
    fit of erfc(z) exp(z^2) in t = 1 / (1 + z/2) for z = |u| >= 0; erfc(-z) = 2 - erfc(z)); the NumPy path's
    stand-in for the C library's erfc, which NumPy lacks."""
    z = np.abs(u)
    t = 1.0 / (1.0 + 0.5 * z)
    poly = 0.17087277
    for c in (-0.82215223, 1.48851587, -1.13520398, 0.27886807, -0.18628806, 0.09678418, 0.37409196, 1.00002368,
              -1.26551223):
        poly = c + t * poly
    r = t * np.exp(-z * z + poly)
    return np.where(u >= 0, r, 2.0 - r)


def gelu_forward(x):
    """y = x * Phi(x); the cache is x."""
    x = _f32c(x)
    y = np.empty_like(x)
    xf, yf = x.reshape(-1), y.reshape(-1)
    if jit.available():
        _jit_parallel(x.size, 8, lambda s, e, _: gelu_forward_loop(xf[s:e], yf[s:e]))
        return y, x

    def body(s, e, _):
        v = xf[s:e].astype(np.float64)
        yf[s:e] = v * (0.5 * _erfc(-_INV_SQRT2 * v))

    _elementwise(x.size, 64, body)
    return y, x


def gelu_backward(dy, cache):
    """dx = dy * (Phi(x) + x * phi(x))."""
    x = cache
    dy = _f32c(dy)
    dx = np.empty_like(dy)
    xf, dyf, dxf = x.reshape(-1), dy.reshape(-1), dx.reshape(-1)
    if jit.available():
        _jit_parallel(dy.size, 12, lambda s, e, _: gelu_backward_loop(dyf[s:e], xf[s:e], dxf[s:e]))
        return dx

    def body(s, e, _):
        v = xf[s:e].astype(np.float64)
        dxf[s:e] = dyf[s:e] * (0.5 * _erfc(-_INV_SQRT2 * v) + v * (_INV_SQRT_2PI * np.exp(-0.5 * v * v)))

    _elementwise(dy.size, 72, body)
    return dx


def scale_forward(x, factor):
    """y = factor * x (factor rounded to float32 once); the cache is that factor."""
    f = _F(factor)
    return _f32c(x) * f, f


def scale_backward(dy, cache):
    return _f32c(dy) * cache


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


# --- dropout --------------------------------------------------------------------------------------------------------


def _seed(seed) -> int:
    """A seed given as an int or as an array of one uint32 (read now: a replayed step fills it each time)."""
    return int(np.asarray(seed).reshape(-1)[0]) if hasattr(seed, "shape") else int(seed)


def dropout_forward(x, p, seed):
    seed = _seed(seed)
    keep = (counter_uniform(seed, x.size) >= p).reshape(x.shape)
    scale = _F(1.0 / (1.0 - p))
    mask = keep.astype(_F)
    mask *= scale
    return x * mask, mask


def dropout_backward(dy, cache):
    return dy * cache


# --- compiled loops -------------------------------------------------------------------------------------------------

if jit.available():
    _jit = jit.kernel

    # --- ReLU: y = max(x, 0) (NaN -> 0, like the reference); backward dx = dy where y > 0 (y > 0 iff x > 0) ------

    @_jit
    def relu_forward_loop(x, y):
        zero = _F(0)
        for i in range(x.size):
            v = x[i]
            y[i] = v if v > zero else zero   # noqa: FURB136 - NaN gives 0, as in the reference

    @_jit
    def relu_backward_loop(dy, y, dx):
        zero = _F(0)
        for i in range(dy.size):
            dx[i] = dy[i] if y[i] > zero else zero

    # --- GELU: Phi and phi in float64 (the C library's erfc and exp), one rounding to float32 per result -------

    @_jit
    def gelu_forward_loop(x, y):
        for i in range(x.size):
            v = np.float64(x[i])
            y[i] = v * (0.5 * math.erfc(-_INV_SQRT2 * v))

    @_jit
    def gelu_backward_loop(dy, x, dx):
        for i in range(dy.size):
            v = np.float64(x[i])
            cdf = 0.5 * math.erfc(-_INV_SQRT2 * v)
            pdf = _INV_SQRT_2PI * math.exp(-0.5 * v * v)
            dx[i] = np.float64(dy[i]) * (cdf + v * pdf)
