"""One seeded generator for everything random in hetnet (initialisation, shuffling, dropout seeds).

    >>> import hetnet as hn
    >>> hn.seed(0)          # makes runs reproducible
"""
from __future__ import annotations

import contextlib

import numpy as np

_generator = np.random.default_rng(0)


def seed(n: int) -> None:
    """Reseed hetnet's generator."""
    global _generator
    _generator = np.random.default_rng(int(n))


def generator() -> np.random.Generator:
    """The generator in use (re-fetch it after `seed`)."""
    return _generator


def get_state() -> dict:
    return _generator.bit_generator.state


def set_state(state: dict) -> None:
    _generator.bit_generator.state = state


@contextlib.contextmanager
def preserved():
    """A block that leaves hetnet's generator as it found it (e.g. building a throwaway model to check a spec).

        >>> with preserved():
        ...     zoo.build_from_spec(spec)          # draws initial weights; the run's sequence is unchanged
    """
    global _generator
    gen, state = _generator, _generator.bit_generator.state
    try:
        yield
    finally:
        _generator = gen
        gen.bit_generator.state = state


# --- counter-based random numbers (dropout) -------------------------------------------------------------------
# Element i of a dropout mask is kept iff uniform(seed, i) >= p. The hash is the same on every backend (NumPy here,
# the CUDA kernel in backends/cuda/dropout.cu), so masks are identical across devices for the same seed.
# hash: "lowbias32" (Chris Wellons) applied to (i * 0x9E3779B1) ^ seed, all uint32 arithmetic.


def lowbias32(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint32, copy=True)
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return x


def counter_uniform(seed_value: int, n: int) -> np.ndarray:
    """n uniforms in [0, 1) as float64, element i = lowbias32((i * 0x9E3779B1) ^ seed) / 2**32."""
    with np.errstate(over="ignore"):
        i = np.arange(n, dtype=np.uint32) * np.uint32(0x9E3779B1)
        u = lowbias32(i ^ np.uint32(seed_value & 0xFFFFFFFF))
    return u.astype(np.float64) * (1.0 / 4294967296.0)
