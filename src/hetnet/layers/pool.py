"""Pooling: MaxPool2D, AvgPool2D (stride defaults to the kernel; overlapping windows allowed; output floors like
PyTorch, no padding) and GlobalAvgPool2D."""
from __future__ import annotations

from .base import Layer
from .conv import _single, conv_out


class _Pool2D(Layer):
    op = ""

    def __init__(self, kernel_size: int, stride: int | None = None):
        super().__init__()
        self.kernel_size = _single(kernel_size, "kernel_size")
        self.stride = self.kernel_size if stride is None else _single(stride, "stride")
        if self.kernel_size < 1 or self.stride < 1:
            raise ValueError(f"{type(self).__name__}: kernel_size and stride must be >= 1")

    def output_shape(self, input_shape: tuple) -> tuple:
        if len(input_shape) != 3:
            raise ValueError(f"{self!r}: expected input of shape (N, C, H, W), "
                             f"got (N, {', '.join(map(str, input_shape))})")
        c, h, w = input_shape
        if h < self.kernel_size or w < self.kernel_size:
            raise ValueError(f"{self!r}: input of {h}x{w} is smaller than the "
                             f"{self.kernel_size}x{self.kernel_size} window")
        return (c, conv_out(h, self.kernel_size, self.stride, 0), conv_out(w, self.kernel_size, self.stride, 0))

    def forward(self, x):
        self._check_input(x)
        y, self.cache = getattr(self.backend, f"{self.op}_forward")(x, self.kernel_size, self.stride)
        return y

    def backward(self, dy):
        return getattr(self.backend, f"{self.op}_backward")(dy, self.cache)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kernel_size={self.kernel_size}, stride={self.stride})"


class MaxPool2D(_Pool2D):
    """y = max over each window; the gradient flows to the first maximum of each window."""
    op = "maxpool2d"


class AvgPool2D(_Pool2D):
    """y = mean over each window."""
    op = "avgpool2d"


class GlobalAvgPool2D(Layer):
    """(N, C, H, W) -> (N, C): mean over H and W."""

    def output_shape(self, input_shape: tuple) -> tuple:
        if len(input_shape) != 3:
            raise ValueError(f"{self!r}: expected input of shape (N, C, H, W), "
                             f"got (N, {', '.join(map(str, input_shape))})")
        return (input_shape[0],)

    def forward(self, x):
        self._check_input(x)
        y, self.cache = self.backend.global_avgpool2d_forward(x)
        return y

    def backward(self, dy):
        return self.backend.global_avgpool2d_backward(dy, self.cache)
