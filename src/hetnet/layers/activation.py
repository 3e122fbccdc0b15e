"""Element-wise activations, the constant scale and the inference softmax."""
from __future__ import annotations

import math
import numbers

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


class GELU(_Activation):
    """y = x * Phi(x), Phi the standard normal CDF: the exact (erf) form, PyTorch's nn.GELU() default and what
    airbench uses; dx = dy * (Phi(x) + x * phi(x)).

        >>> import hetnet as hn, numpy as np
        >>> hn.GELU().to("reference").forward(np.array([[-1.0, 0.0, 1.0]])).round(4).tolist()
        [[-0.1587, 0.0, 0.8413]]
    """
    op = "gelu"

    def __repr__(self) -> str:
        return "GELU()"


class Scale(Layer):
    """y = factor * x with a constant factor (no parameters); dx = factor * dy. airbench multiplies its logits by
    1/9 this way.

        >>> import hetnet as hn, numpy as np
        >>> hn.Scale(0.5).to("reference").forward(np.array([[2.0, -4.0]])).tolist()
        [[1.0, -2.0]]
    """

    def __init__(self, factor: float):
        super().__init__()
        if isinstance(factor, bool) or not isinstance(factor, numbers.Real) or not math.isfinite(factor):
            raise ValueError(f"Scale: factor must be a finite number, got {factor!r}")
        self.factor = float(factor)

    def forward(self, x):
        y, self.cache = self.backend.scale_forward(x, self.factor)
        return y

    def backward(self, dy):
        return self.backend.scale_backward(dy, self.cache)

    def __repr__(self) -> str:
        return f"Scale({self.factor!r})"


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
