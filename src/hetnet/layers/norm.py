"""Batch normalisation with running statistics, train/eval behaviour as PyTorch's BatchNorm1d/2d, with a learned,
frozen or absent scale.

    >>> import hetnet as hn
    >>> bn = hn.BatchNorm2D(64, momentum=0.4, eps=1e-12, scale="frozen")     # airbench's BatchNorm
    >>> [k for k, _ in bn.named_arrays()]
    ['weight', 'bias', 'running_mean', 'running_var']
"""
from __future__ import annotations

import numpy as np

from .base import Layer, Parameter

SCALES = ("learned", "frozen", "none")


class _BatchNorm(Layer):
    """y = gamma * (x - mean) / sqrt(var + eps) + beta per channel.

    momentum and eps as PyTorch: running = (1 - momentum) * running + momentum * batch statistic.
    scale (gamma):
      "learned"  a trained parameter `weight`, initially 1 (PyTorch's default)
      "frozen"   the parameter `weight` kept at its value (1 unless loaded), weight.requires_grad = False: exactly
                 airbench's BatchNorm (weight.requires_grad = False; its momentum m is PyTorch's 1 - m, so
                 airbench's 0.6 is momentum=0.4 here, with eps=1e-12); state_dict as PyTorch's
      "none"     no `weight` parameter: gamma is the constant 1 (the same function as "frozen" at 1, without the
                 array; state_dict holds bias, running_mean, running_var)
    The shift `bias` (beta) is always a parameter.
    """

    ndim = 0  # per-sample rank: 1 for (C,), 3 for (C, H, W)

    def __init__(self, num_features: int, momentum: float = 0.1, eps: float = 1e-5, scale: str = "learned"):
        super().__init__()
        name = type(self).__name__
        if int(num_features) < 1:
            raise ValueError(f"{name}: num_features must be >= 1, got {num_features}")
        if not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"{name}: momentum must be in [0, 1], got {momentum}")
        if not float(eps) > 0.0:
            raise ValueError(f"{name}: eps must be > 0, got {eps}")
        if scale not in SCALES:
            raise ValueError(f"{name}: scale must be one of {', '.join(SCALES)}, got {scale!r}")
        self.num_features, self.momentum, self.eps = int(num_features), float(momentum), float(eps)
        if scale != "none":
            self.params["weight"] = Parameter(np.ones(self.num_features), self.backend,          # gamma
                                              requires_grad=scale == "learned")
        self.params["bias"] = Parameter(np.zeros(self.num_features), self.backend)    # beta
        self.buffers["running_mean"] = self.backend.asarray(np.zeros(self.num_features))
        self.buffers["running_var"] = self.backend.asarray(np.ones(self.num_features))
        self._ones = None if scale != "none" else self.backend.asarray(np.ones(self.num_features))  # its gamma

    @property
    def scale(self) -> str:
        """'learned', 'frozen' (a weight with requires_grad False) or 'none' (no weight)."""
        w = self.params.get("weight")
        return "none" if w is None else "learned" if w.requires_grad else "frozen"

    @property
    def gamma(self):
        """The scale the ops use: the weight's data, or a constant 1 per channel (scale "none")."""
        return self.weight.data if "weight" in self.params else self._ones

    def to(self, device) -> _BatchNorm:
        super().to(device)
        if self._ones is not None:      # made here, not at the first forward (which may be a captured step)
            self._ones = self.backend.asarray(np.ones(self.num_features))
        return self

    def grad_targets(self) -> tuple:
        """(dgamma, dbeta) for the backward op: None for a frozen parameter and for an absent scale (not computed,
        see Parameter.grad_target)."""
        w = self.params.get("weight")
        return w.grad_target() if w is not None else None, self.bias.grad_target()

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
            x, self.gamma, self.bias.data, self.running_mean, self.running_var,
            self.momentum, self.eps, self.training)
        return y

    def backward(self, dy):
        return self.backend.batchnorm_backward(dy, self.cache, *self.grad_targets())

    def __repr__(self) -> str:
        scale = "" if self.scale == "learned" else f", scale={self.scale!r}"
        return f"{type(self).__name__}({self.num_features}, momentum={self.momentum}, eps={self.eps}{scale})"


class BatchNorm1D(_BatchNorm):
    """Normalises each feature of (N, C) over the batch."""
    ndim = 1


class BatchNorm2D(_BatchNorm):
    """Normalises each channel of (N, C, H, W) over N, H and W."""
    ndim = 3


for _cls in (BatchNorm1D, BatchNorm2D):
    _cls.__doc__ = f"{_cls.__doc__}\n\n    {_BatchNorm.__doc__}"
