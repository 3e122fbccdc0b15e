"""The element-wise launchers of the cuda backend (elementwise.cu, and conv.cu's ReLU mask): activations, softmax,
dropout."""
from __future__ import annotations

import math

import numpy as np

from .conv import takes_nhwc16
from .kernels import NULL, get_kernel
from .norm import GELU

_i32, _i64, _f32 = np.int32, np.int64, np.float32


class ElementwiseOps:
    """CudaBackend's element-wise ops."""

    def relu_mask(self, dx, x):
        """dx * (x > 0), written over dx."""
        self.launch("conv", "relu_mask_inplace", dx.size, dx, self._c(x), np.int64(dx.size))
        return dx

    def _unary(self, kernel, x):
        x = self._c(x)
        y = self.xp.empty_like(x)
        self.launch("elementwise", kernel, x.size, x, y, _i64(x.size))
        return y

    def _binary(self, kernel, dy, c):
        dy = self._c(dy)
        dx = self.xp.empty_like(dy)
        self.launch("elementwise", kernel, dy.size, dy, c, dx, _i64(dy.size))
        return dx

    def relu_forward(self, x):
        # the cache is y, not x: y > 0 exactly where x > 0, and the layer before may then free its output
        y = self._unary("relu_fwd", self._c(x))
        return y, y

    def relu_backward(self, dy, cache):
        return self._binary("relu_bwd", dy, cache)

    def sigmoid_forward(self, x):
        y = self._unary("sigmoid_fwd", x)
        return y, y

    def sigmoid_backward(self, dy, cache):
        return self._binary("sigmoid_bwd", dy, cache)

    def tanh_forward(self, x):
        y = self._unary("tanh_fwd", x)
        return y, y

    def tanh_backward(self, dy, cache):
        return self._binary("tanh_bwd", dy, cache)

    def gelu_forward(self, x, feeds=None):
        """feeds (the op contract's hand-over): y as the channels-last bf16 copy the convolution reads where it
        takes one (norm.cu's bn_apply_nhwc16 without statistics, NormOps._apply_nhwc16)."""
        x = self._c(x)
        if takes_nhwc16(self, x.shape, feeds):
            return self._apply_nhwc16(x, None, 0.0, GELU), x           # NormOps's, without statistics
        return self._unary("gelu_fwd", x), x

    def gelu_backward(self, dy, cache):
        return self._binary("gelu_bwd", dy, cache)

    def _scaled(self, a, factor):
        a = self._c(a)
        out = self.xp.empty_like(a)
        self.launch("elementwise", "scale_apply", a.size, a, out, _f32(factor), _i64(a.size))
        return out

    def scale_forward(self, x, factor):
        return self._scaled(x, factor), float(factor)

    def scale_backward(self, dy, cache):
        return self._scaled(dy, cache)

    def softmax_forward(self, x):
        x = self._c(x)
        n, k = x.shape
        y = self.xp.empty_like(x)
        get_kernel(self.device_id, "elementwise", "softmax_fwd")((max(1, math.ceil(n * 32 / 256)),), (256,),
                                                                  (x, y, _i32(n), _i32(k)))
        return y, y

    def softmax_backward(self, dy, cache):
        y = cache
        dy = self._c(dy)
        n, k = y.shape
        dx = self.xp.empty_like(y)
        get_kernel(self.device_id, "elementwise", "softmax_bwd")((max(1, math.ceil(n * 32 / 256)),), (256,),
                                                                  (dy, y, dx, _i32(n), _i32(k)))
        return dx

    @staticmethod
    def dropout_threshold(p: float) -> tuple[int, float]:
        """(hash threshold, scale): keep iff hash >= ceil(p * 2^32), i.e. hash / 2^32 >= p exactly."""
        return math.ceil(float(p) * 4294967296.0), float(np.float32(1.0 / (1.0 - p)))

    def dropout_forward(self, x, p, seed):
        """seed: an int, or a device array of one uint32 read when the kernel runs (a replayed step fills it)."""
        x = self._c(x)
        seed_ptr = seed if isinstance(seed, self.cupy.ndarray) else None
        seed = 0 if seed_ptr is not None else seed
        thr, scale = self.dropout_threshold(p)
        y = self.xp.empty_like(x)
        self.launch("elementwise", "dropout_apply", x.size, x, y, seed_ptr if seed_ptr is not None else NULL,
                    np.uint32(int(seed) & 0xFFFFFFFF), np.uint64(thr), _f32(scale), _i64(x.size))
        return y, (int(seed) & 0xFFFFFFFF, thr, scale, seed_ptr)

    def dropout_backward(self, dy, cache):
        seed, thr, scale, seed_ptr = cache
        dy = self._c(dy)
        dx = self.xp.empty_like(dy)
        self.launch("elementwise", "dropout_apply", dy.size, dy, dx, seed_ptr if seed_ptr is not None else NULL,
                    np.uint32(seed), np.uint64(thr), _f32(scale), _i64(dy.size))
        return dx
