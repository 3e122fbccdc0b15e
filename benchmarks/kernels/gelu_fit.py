"""The polynomial of common.cuh's hn_phi (the GELU's Phi on the GPU), and its float32 error.

For a = |x| >= 0, Q(a) = Phi(-a) = erfc(a / sqrt 2) / 2 = exp(-a^2 / 2) R(a), where R(a) = erfcx(a / sqrt 2) / 2 is
smooth and decreasing (0.5 at 0, about 1 / (a sqrt(2 pi)) for large a). R is fitted on a in [0, 14] (beyond, Q is
below float32's smallest normal) as a polynomial in q = (a - c) / (a + c), c = 2 sqrt 2, which maps [0, 14] onto
[-1, 0.664]: least squares on relative error at Chebyshev nodes, reweighted toward the largest errors (a few rounds
of Lawson's iteration toward the minimax fit). Prints the maximum relative error of each degree, the chosen degree's
float32 coefficients (highest power first, as hn_phi's Horner loop takes them), and the float32 evaluation's error in
ulps against float64: the GELU and its derivative on a dense grid of [-14, 14].

    python3 benchmarks/kernels/gelu_fit.py        # needs SciPy (erfcx), not a hetnet dependency
"""
import numpy as np

C = 2.0 * np.sqrt(2.0)
A_MAX = 14.0
DEGREE = 10


def R(a):
    from scipy.special import erfcx       # SciPy only here: the script imports without it (tests/test_bench.py)

    return 0.5 * erfcx(a / np.sqrt(2.0))


def fit(degree: int) -> np.ndarray:
    qmin, qmax = -1.0, (A_MAX - C) / (A_MAX + C)
    k = np.arange(4000)
    q = np.cos(np.pi * (k + 0.5) / len(k)) * (qmax - qmin) / 2 + (qmax + qmin) / 2
    a = C * (1 + q) / (1 - q)
    y = R(a)
    v = np.vander(q, degree + 1)
    weight = np.ones_like(q)
    for _ in range(30):
        coef, *_ = np.linalg.lstsq(v * (weight / y)[:, None], weight, rcond=None)
        err = np.abs(v @ coef / y - 1)
        weight = weight * (1 + 5 * err / err.max())
    return coef


def max_rel_error(coef) -> float:
    q = np.linspace(-1.0, (A_MAX - C) / (A_MAX + C), 200_001)
    a = C * (1 + q) / (1 - q)
    return float(np.abs(np.polyval(coef, q) / R(a) - 1).max())


def gelu_f32(x, coef):
    """hn_gelu and hn_gelu_grad in float32 (fused multiply-adds as float64 then rounded; exp and the quotient
    correctly rounded, where the GPU's __expf and __fdividef are within 2 ulps)."""
    f = np.float32
    x = x.astype(f)
    a = np.minimum(np.abs(x), f(A_MAX))
    q = ((a - f(C)).astype(np.float64) / (a + f(C)).astype(np.float64)).astype(f)
    r = np.full_like(q, coef[0])
    for k in coef[1:]:
        r = (r.astype(np.float64) * q + np.float64(k)).astype(f)
    e = np.exp((f(-0.5) * x * x).astype(np.float64)).astype(f)
    big_q = (e * r).astype(f)
    phi = np.where(x < 0, big_q, (f(1) - big_q).astype(f))
    return (x * phi).astype(f), (x.astype(np.float64) * (e * f(1 / np.sqrt(2 * np.pi))).astype(f) + phi).astype(f)


def main() -> None:
    from scipy.special import erfc

    for degree in range(8, 13):
        print(f"degree {degree}: max relative error of R {max_rel_error(fit(degree)):.2e}")
    coef = fit(DEGREE).astype(np.float32)
    print(f"degree {DEGREE}, float32, highest power first:")
    print(", ".join(f"{float(v):.9g}f" for v in coef))
    x = np.linspace(-A_MAX, A_MAX, 2_000_001).astype(np.float32)
    y, g = gelu_f32(x, coef)
    xd = x.astype(np.float64)
    phi = 0.5 * erfc(-xd / np.sqrt(2))
    yt, gt = xd * phi, phi + xd * np.exp(-0.5 * xd * xd) / np.sqrt(2 * np.pi)
    ulp = np.spacing(np.abs(yt).astype(np.float32)).astype(np.float64)
    mid = np.abs(x) < 4
    print(f"gelu: {np.max(np.abs(y - yt)[mid] / ulp[mid]):.1f} ulps at most for |x| < 4, relative error "
          f"{np.max(np.abs(y - yt)[np.abs(yt) > 1e-37] / np.abs(yt)[np.abs(yt) > 1e-37]):.1e} at most (the tail)")
    print(f"gelu': absolute error {np.abs(g - gt).max():.1e} at most (it crosses 0 near x = -0.75)")


if __name__ == "__main__":
    main()
