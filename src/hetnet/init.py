"""Weight initialisation: He normal for layers followed by ReLU (the thesis's choice), Glorot uniform otherwise.

Both draw from hetnet's one generator (`hetnet.seed`), so a seeded model is reproducible.
"""
from __future__ import annotations

import numpy as np

from .random import generator


def fans(shape: tuple) -> tuple[int, int]:
    """(fan_in, fan_out) for Dense (out, in) and Conv2D (out, in, kh, kw) weights."""
    receptive = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    return shape[1] * receptive, shape[0] * receptive


def he_normal(shape: tuple) -> np.ndarray:
    """N(0, 2 / fan_in)."""
    fan_in, _ = fans(shape)
    return generator().normal(0.0, np.sqrt(2.0 / fan_in), size=shape)


def glorot_uniform(shape: tuple) -> np.ndarray:
    """U(-a, a) with a = sqrt(6 / (fan_in + fan_out))."""
    fan_in, fan_out = fans(shape)
    a = np.sqrt(6.0 / (fan_in + fan_out))
    return generator().uniform(-a, a, size=shape)


def initial_weight(shape: tuple, kind: str) -> np.ndarray:
    if kind == "he":
        return he_normal(shape)
    if kind == "glorot":
        return glorot_uniform(shape)
    raise ValueError(f"unknown initialisation {kind!r}: expected 'he' or 'glorot'")
