"""Shared test helpers. Tolerances are stated once here, per dtype, and used by every comparison."""
from __future__ import annotations

import numpy as np
import pytest

# Relative error ||a - b|| / ||b|| allowed when comparing a result against the float64 reference:
RTOL = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-4}

# Float64 central-difference gradient check: step H has truncation error O(H^2) and rounding error O(eps/H); at
# H = 1e-6 both stay near 1e-9 relative, so analytic and numerical gradients must agree to GRADCHECK_RTOL.
GRADCHECK_H = 1e-6
GRADCHECK_RTOL = 1e-6


def rel_err(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, f"shape {a.shape} != {b.shape}"
    assert np.all(np.isfinite(a)), "non-finite values"
    denom = max(np.linalg.norm(b), 1e-30)
    return float(np.linalg.norm(a - b) / denom)


def assert_close(actual, expected, dtype, what: str = "") -> None:
    """actual (from a backend of `dtype`) is within that dtype's tolerance of `expected`."""
    tol = RTOL[np.dtype(dtype)]
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.0e}"


@pytest.fixture
def rng():
    """A fresh, differently seeded generator per test (the seed is printed on failure)."""
    seed = int(np.random.SeedSequence().entropy % 2**32)
    print(f"rng seed {seed}")
    return np.random.default_rng(seed)


def torch_or_skip():
    return pytest.importorskip("torch", reason="torch not installed (optional cross-check)")
