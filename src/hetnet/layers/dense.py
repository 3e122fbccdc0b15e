"""Dense (fully connected) layer and Flatten.

Dense: y[N,K] = x[N,F] @ w[K,F]^T + b[K]; weight layout (out, in) as PyTorch.
"""
from __future__ import annotations

import numpy as np

from .base import Layer, WeightedLayer


class Dense(WeightedLayer):
    """y = x w^T + b.

        >>> import hetnet as hn, numpy as np
        >>> hn.Dense(3, 2).to("reference").forward(np.ones((4, 3))).shape
        (4, 2)
    """

    op = "dense"

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        if int(in_features) < 1 or int(out_features) < 1:
            raise ValueError(f"Dense: in_features and out_features must be >= 1, got {in_features}, {out_features}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self._make_parameters((self.out_features, self.in_features), bias)

    def output_shape(self, input_shape: tuple) -> tuple:
        if tuple(input_shape) != (self.in_features,):
            raise ValueError(f"{self!r}: expected input of shape (N, {self.in_features}), "
                             f"got (N, {', '.join(map(str, input_shape))})")
        return (self.out_features,)

    def __repr__(self) -> str:
        return f"Dense({self.in_features}, {self.out_features}, bias={self.use_bias})"


class Flatten(Layer):
    """(N, C, H, W) -> (N, C*H*W); a view, no copy."""

    def output_shape(self, input_shape: tuple) -> tuple:
        return (int(np.prod(input_shape)),)

    def forward(self, x):
        self.cache = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dy):
        return dy.reshape(self.cache)
