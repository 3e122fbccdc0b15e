"""Element-wise activations and the inference softmax."""
from __future__ import annotations

from .base import Layer


class _Activation(Layer):
    op = ""

    def forward(self, x):
        y, self.cache = getattr(self.backend, f"{self.op}_forward")(x)
        return y

    def backward(self, dy):
        return getattr(self.backend, f"{self.op}_backward")(dy, self.cache)


class ReLU(_Activation):
    """y = max(x, 0); dx = dy where x > 0."""
    op = "relu"


class Sigmoid(_Activation):
    """y = 1 / (1 + exp(-x)); dx = dy * y * (1 - y)."""
    op = "sigmoid"


class Tanh(_Activation):
    """y = tanh(x); dx = dy * (1 - y^2)."""
    op = "tanh"


class Softmax(_Activation):
    """Row-wise softmax over the last axis of (N, K) (for inference; train with losses.softmax_cross_entropy on the
    logits instead). dx = y * (dy - sum(dy * y))."""
    op = "softmax"

    def output_shape(self, input_shape: tuple) -> tuple:
        if len(input_shape) != 1:
            raise ValueError(f"{self!r}: expected input of shape (N, K), got (N, {', '.join(map(str, input_shape))})")
        return tuple(input_shape)

    def forward(self, x):
        self._check_input(x)
        return super().forward(x)
