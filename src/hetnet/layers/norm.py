"""Batch normalisation with running statistics, train/eval behaviour as PyTorch's BatchNorm1d/2d."""
from __future__ import annotations

import numpy as np

from .base import Layer, Parameter


class _BatchNorm(Layer):
    ndim = 0  # per-sample rank: 1 for (C,), 3 for (C, H, W)

    def __init__(self, num_features: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        if int(num_features) < 1:
            raise ValueError(f"{type(self).__name__}: num_features must be >= 1, got {num_features}")
        self.num_features, self.momentum, self.eps = int(num_features), float(momentum), float(eps)
        self.params["weight"] = Parameter(np.ones(self.num_features), self.backend)   # gamma
        self.params["bias"] = Parameter(np.zeros(self.num_features), self.backend)    # beta
        self.buffers["running_mean"] = self.backend.asarray(np.zeros(self.num_features))
        self.buffers["running_var"] = self.backend.asarray(np.ones(self.num_features))

    def output_shape(self, input_shape: tuple) -> tuple:
        if len(input_shape) != self.ndim or input_shape[0] != self.num_features:
            want = "(N, C)" if self.ndim == 1 else "(N, C, H, W)"
            raise ValueError(f"{self!r}: expected input of shape {want} with C = {self.num_features}, "
                             f"got (N, {', '.join(map(str, input_shape))})")
        return tuple(input_shape)

    def check_batch(self, x) -> None:
        """ValueError when training on a batch with one value per channel (no variance to normalise by)."""
        if self.training and x.shape[0] * int(np.prod(x.shape[2:])) < 2:
            raise ValueError(f"{self!r}: training needs more than one value per channel, got input {tuple(x.shape)}")

    def forward(self, x):
        self._check_input(x)
        self.check_batch(x)
        y, self.cache = self.backend.batchnorm_forward(
            x, self.weight.data, self.bias.data, self.running_mean, self.running_var,
            self.momentum, self.eps, self.training)
        return y

    def backward(self, dy):
        return self.backend.batchnorm_backward(dy, self.cache, self.weight.grad, self.bias.grad)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.num_features}, momentum={self.momentum}, eps={self.eps})"


class BatchNorm1D(_BatchNorm):
    """Normalises each feature of (N, C) over the batch."""
    ndim = 1


class BatchNorm2D(_BatchNorm):
    """Normalises each channel of (N, C, H, W) over N, H and W."""
    ndim = 3
