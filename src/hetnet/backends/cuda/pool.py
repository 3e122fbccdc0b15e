"""The pooling launchers of the cuda backend (pool.cu): max pooling that keeps its output and argmax bytes (the
backward reads the ReLU mask from them), average and global average pooling."""
from __future__ import annotations

import math

import numpy as np

from .conv import Nchw16
from .kernels import get_kernel

_i32, _i64, _f32 = np.int32, np.int64, np.float32


class PoolOps:
    """CudaBackend's pooling ops (pool.cu)."""

    def maxpool2d_forward(self, x, kernel, stride):
        """The cache keeps (x's shape, y, argmax bytes), not x: the backward reads the ReLU mask from y, and the
        layer before may free its output after the forward."""
        x = self._c(x)
        n, c, h, w = x.shape
        p, q = (h - kernel) // stride + 1, (w - kernel) // stride + 1
        if kernel * kernel > 256:
            raise ValueError(f"maxpool2d: kernel {kernel} too large for the cuda backend (at most 16)")
        y = self.xp.empty((n, c, p, q), dtype=self.xp.float32)
        arg = self.xp.empty((n, c, p, q), dtype=self.xp.uint8)
        self.launch("pool", self.ix("maxpool_fwd", x.size), y.size, x, y, arg, _i32(n * c), _i32(h), _i32(w), _i32(p),
                    _i32(q), _i32(kernel), _i32(stride))
        return y, (x.shape, y, arg, kernel, stride)

    def maxpool2d_backward(self, dy, cache, relu_mask=False):
        """dE/dx from the pooled output y and the argmax bytes; relu_mask: x is a ReLU output (dx = 0 where the
        window's maximum y <= 0)."""
        x_shape, y, arg, kernel, stride = cache
        if isinstance(y, Nchw16):           # a pooled convolution's bf16 output (conv2d_maxpool_forward's to_norm)
            if relu_mask:
                raise ValueError("maxpool2d_backward: relu_mask=True on a pooled output stored in bf16")
            y = y.data                      # (the kernels read y only for the mask)
        dy = self._c(dy)
        n, c, h, w = x_shape
        p, q = y.shape[2], y.shape[3]
        dx = self.xp.empty(x_shape, dtype=self.xp.float32)
        mask = _i32(1 if relu_mask else 0)
        if stride == kernel and y.size > 0:     # windows tile x: one thread per window writes it (pool.cu)
            self.launch("pool", self.ix("maxpool_bwd_tiled", dx.size), y.size, dy, arg, y, dx, _i32(n * c), _i32(h),
                        _i32(w), _i32(p), _i32(q), _i32(kernel), mask)
        else:                                   # overlaps, gaps, or no window at all: one thread per x element
            self.launch("pool", self.ix("maxpool_bwd_pooled", dx.size), dx.size, dy, arg, y, dx, _i32(n * c),
                        _i32(h), _i32(w), _i32(p), _i32(q), _i32(kernel), _i32(stride), mask)
        return dx

    def avgpool2d_forward(self, x, kernel, stride):
        x = self._c(x)
        n, c, h, w = x.shape
        p, q = (h - kernel) // stride + 1, (w - kernel) // stride + 1
        y = self.xp.empty((n, c, p, q), dtype=self.xp.float32)
        self.launch("pool", self.ix("avgpool_fwd", x.size), y.size, x, y, _i32(n * c), _i32(h), _i32(w), _i32(p),
                    _i32(q), _i32(kernel), _i32(stride))
        return y, (x.shape, kernel, stride)

    def avgpool2d_backward(self, dy, cache):
        (n, c, h, w), kernel, stride = cache
        dy = self._c(dy)
        dx = self.xp.empty((n, c, h, w), dtype=self.xp.float32)
        self.launch("pool", self.ix("avgpool_bwd", dx.size), dx.size, dy, dx, _i32(n * c), _i32(h), _i32(w),
                    _i32(dy.shape[2]), _i32(dy.shape[3]), _i32(kernel), _i32(stride))
        return dx

    def global_avgpool2d_forward(self, x):
        x = self._c(x)
        n, c, h, w = x.shape
        y = self.xp.empty((n, c), dtype=self.xp.float32)
        rows = n * c
        get_kernel(self.device_id, "pool", "global_avgpool_fwd")((math.ceil(rows * 32 / 256),), (256,),
                                                                  (x, y, _i32(rows), _i32(h * w)))
        return y, x.shape

    def global_avgpool2d_backward(self, dy, cache):
        n, c, h, w = cache
        dx = self.xp.empty(cache, dtype=self.xp.float32)
        self.launch("pool", "global_avgpool_bwd", dx.size, self._c(dy), dx, _i32(n * c), _i32(h * w))
        return dx
