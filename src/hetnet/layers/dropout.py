"""Inverted dropout: in training, zero each element with probability p and scale the rest by 1/(1-p); identity in
eval. The mask comes from a counter-based hash of (seed, element index), the same on every backend."""
from __future__ import annotations

from ..random import generator
from .base import Layer


class Dropout(Layer):
    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= float(p) < 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1), got {p}")
        self.p = float(p)

    def forward(self, x):
        if not self.training or self.p == 0.0:
            self.cache = None
            return x
        seed = int(generator().integers(0, 2**32))
        y, self.cache = self.backend.dropout_forward(x, self.p, seed)
        return y

    def backward(self, dy):
        if self.cache is None:
            return dy
        return self.backend.dropout_backward(dy, self.cache)

    def __repr__(self) -> str:
        return f"Dropout(p={self.p})"
