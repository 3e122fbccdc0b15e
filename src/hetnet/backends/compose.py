"""Fused ops composed from a backend's own primitive ops: the definition of every fused op of the contract.

The float64 reference backend runs these as its fused ops (so a fused op's oracle is literally its chain of
reference ops), and a fast backend uses them wherever it has no kernel of its own for a case (the cpu backend's
fused convolution + ReLU + max pooling covers 2x2 windows only, say). Each function takes the backend module or
object first and calls only contract ops on it.

    >>> import numpy as np
    >>> from hetnet.backends import compose, reference as ref
    >>> x, w = np.ones((1, 1, 4, 4)), np.ones((2, 1, 3, 3))
    >>> y, cache = compose.conv2d_relu_maxpool_forward(ref, x, w, None, 1, 1, 2, 2)
    >>> y.shape
    (1, 2, 2, 2)

ReLU derivatives. A forward op given act="relu" returns relu(op(x)); its backward takes dE/d(op(x)), the gradient
already multiplied by the ReLU's derivative, which is the consumer's job: every backward that can says so through
`relu_mask` (its input x was a ReLU output, so it returns dE/dx * (x > 0)), and `relu_mask(dx, x)` does it for the
others. Max pooling commutes with that mask (a window's maximum is > 0 exactly where the ReLU passed it), which is
why the fused ops below hand `relu_mask=True` to the pooling's backward.
"""
from __future__ import annotations


def conv2d_relu_maxpool_forward(be, x, w, b, stride, padding, pool_kernel, pool_stride):
    """maxpool2d(relu(conv2d(x))): y[N, K, P', Q'] with P' = (P - pool_kernel)//pool_stride + 1."""
    z, conv_cache = be.conv2d_forward(x, w, b, stride, padding, act="relu")
    y, pool_cache = be.maxpool2d_forward(z, pool_kernel, pool_stride)
    return y, (conv_cache, pool_cache)


def conv2d_relu_maxpool_backward(be, dy, cache, dw, db, need_dx=True, relu_mask=False):
    conv_cache, pool_cache = cache
    dz = be.maxpool2d_backward(dy, pool_cache, relu_mask=True)     # the pooling, then the ReLU's derivative
    return be.conv2d_backward(dz, conv_cache, dw, db, need_dx=need_dx, relu_mask=relu_mask)


def conv2d_maxpool_forward(be, x, w, b, stride, padding, pool_kernel, pool_stride, relu_mask=None):
    """maxpool2d(conv2d(x)); relu_mask: the conv2d_backward's, passed to conv2d_forward."""
    z, conv_cache = be.conv2d_forward(x, w, b, stride, padding, relu_mask=relu_mask)
    y, pool_cache = be.maxpool2d_forward(z, pool_kernel, pool_stride)
    return y, (conv_cache, pool_cache)


def conv2d_maxpool_backward(be, dy, cache, dw, db, need_dx=True, relu_mask=False):
    conv_cache, pool_cache = cache
    dz = be.maxpool2d_backward(dy, pool_cache)
    return be.conv2d_backward(dz, conv_cache, dw, db, need_dx=need_dx, relu_mask=relu_mask)


def conv2d_gelu_forward(be, x, w, b, stride, padding, relu_mask=None, feeds=None):
    """gelu(conv2d(x)) (airbench's whitening layer and its GELU); relu_mask as conv2d_forward's, feeds the GELU's
    hand-over (gelu_forward's; passed on only when given)."""
    z, conv_cache = be.conv2d_forward(x, w, b, stride, padding, relu_mask=relu_mask)
    y, gelu_cache = be.gelu_forward(z, **({} if feeds is None else {"feeds": feeds}))
    return y, (conv_cache, gelu_cache)


def conv2d_gelu_backward(be, dy, cache, dw, db, need_dx=True, relu_mask=False):
    conv_cache, gelu_cache = cache
    dz = be.gelu_backward(dy, gelu_cache)
    return be.conv2d_backward(dz, conv_cache, dw, db, need_dx=need_dx, relu_mask=relu_mask)


def bn_relu_maxpool_forward(be, x, gamma, beta, running_mean, running_var, momentum, eps, training, pool_kernel,
                            pool_stride, reduce=None):
    """maxpool2d(relu(batchnorm(x))); running statistics updated as batchnorm_forward does (synchronised over
    processes with `reduce`, see batchnorm_forward)."""
    z, bn_cache = be.batchnorm_forward(x, gamma, beta, running_mean, running_var, momentum, eps, training,
                                       act="relu", reduce=reduce)
    y, pool_cache = be.maxpool2d_forward(z, pool_kernel, pool_stride)
    return y, (bn_cache, pool_cache)


def bn_relu_maxpool_backward(be, dy, cache, dgamma, dbeta, need_dx=True, relu_mask=False, inplace=False):
    bn_cache, pool_cache = cache
    dz = be.maxpool2d_backward(dy, pool_cache, relu_mask=True)
    return be.batchnorm_backward(dz, bn_cache, dgamma, dbeta, need_dx=need_dx, relu_mask=relu_mask)


def _bn_act_forward(be, act: str, x, gamma, beta, running_mean, running_var, momentum, eps, training, reduce):
    """act(batchnorm(x)) for act "relu" or "gelu" (that op's forward), the activation's derivative the op's own."""
    z, bn_cache = be.batchnorm_forward(x, gamma, beta, running_mean, running_var, momentum, eps, training,
                                       reduce=reduce)
    y, act_cache = getattr(be, act + "_forward")(z)
    return y, (bn_cache, act_cache)


def _bn_act_backward(be, act: str, dy, cache, dgamma, dbeta, need_dx, relu_mask):
    bn_cache, act_cache = cache
    dz = getattr(be, act + "_backward")(dy, act_cache)
    return be.batchnorm_backward(dz, bn_cache, dgamma, dbeta, need_dx=need_dx, relu_mask=relu_mask)


def bn_relu_forward(be, x, gamma, beta, running_mean, running_var, momentum, eps, training, reduce=None):
    """relu(batchnorm(x)), the ReLU's derivative the op's own; running statistics updated as batchnorm_forward does."""
    return _bn_act_forward(be, "relu", x, gamma, beta, running_mean, running_var, momentum, eps, training, reduce)


def bn_relu_backward(be, dy, cache, dgamma, dbeta, need_dx=True, relu_mask=False, inplace=False):
    return _bn_act_backward(be, "relu", dy, cache, dgamma, dbeta, need_dx, relu_mask)


def bn_gelu_forward(be, x, gamma, beta, running_mean, running_var, momentum, eps, training, reduce=None):
    """gelu(batchnorm(x)); running statistics updated as batchnorm_forward does."""
    return _bn_act_forward(be, "gelu", x, gamma, beta, running_mean, running_var, momentum, eps, training, reduce)


def bn_gelu_backward(be, dy, cache, dgamma, dbeta, need_dx=True, relu_mask=False, inplace=False):
    return _bn_act_backward(be, "gelu", dy, cache, dgamma, dbeta, need_dx, relu_mask)


def dense_chain_forward(be, x, layers):
    """Dense layers one after the other: layers = [(w[K,F], b[K] or None, relu after it: bool)]; y[N, K_last]. The
    chain owns all its ReLUs, the last one too: its backward takes dE/dy."""
    caches = []
    for w, b, relu in layers:
        x, cache = be.dense_forward(x, w, b, act="relu" if relu else None)
        caches.append(cache)
    return x, (caches, [relu for _, _, relu in layers], x)


def dense_chain_backward(be, dy, cache, grads, need_dx=True, relu_mask=False, accumulate=True):
    """grads = [(dw or None, db or None)] per layer, added to (accumulate) or written (None: not computed); returns
    dE/dx or None. Each layer's backward masks its input gradient with the ReLU before it; the last ReLU's
    derivative is applied first."""
    caches, relus, y = cache
    if not accumulate:
        for g in grads:
            for a in g:
                if a is not None:
                    a[...] = 0
    if relus[-1]:
        dy = be.relu_mask(dy.copy(), y)
    for j in range(len(caches) - 1, -1, -1):
        dw, db = grads[j]
        first = j == 0
        dy = be.dense_backward(dy, caches[j], dw, db, need_dx=need_dx or not first,
                               relu_mask=relu_mask if first else relus[j - 1])
    return dy
