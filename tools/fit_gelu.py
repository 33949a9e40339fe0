"""Fit the coefficients of tileattn's exact GELU (python/tileattn/activations.py).

NumPy has no erf. float32: the exact GELU ``x * Phi(x)`` is written as

    Phi(x) = (1 + tanh(g(x))) / 2,   g(x) = atanh(erf(x / sqrt(2))) = x * G(x**2),

(the tanh approximation of GELU takes G(s) = sqrt(2/pi) (1 + 0.044715 s)), and
G is fitted by a degree-6 polynomial on |x| <= 6 by least squares weighted by
how much an error in G moves GELU (x**2 sech(g)**2 / 2), reweighted towards the
minimax error: 19 NumPy passes, max |error| ~7e-8 (in float64 arithmetic).

float64: ``x * Phi(x)`` is evaluated through

    Phi(-|x|) = 0.5 * erfc(z),  z = |x| / sqrt(2),
    erfc(z)   = t * exp(-z**2 + P(u)),  t = 1 / (1 + z / 2),

(float64 only) with ``u`` the affine map of ``t`` from [t_min, 1] onto [-1, 1] and ``P`` a
polynomial. The function ``log(erfc(z) / t) + z**2`` is smooth in ``t`` on the
whole half line z >= 0, so a least-squares Chebyshev fit at Chebyshev nodes
(reference values from mpmath at 40 digits) converges; z is clamped at
z_max, beyond which Phi underflows in the target dtype.

Run ``python tools/fit_gelu.py`` to reprint the tables (needs mpmath).
"""

import mpmath as mp
import numpy as np

mp.mp.dps = 40
C = np.polynomial.chebyshev


def fit_tanh_form(degree: int = 6, x_max: float = 6.0, nodes: int = 3000):
    x = np.linspace(1e-3, x_max, nodes)
    g = np.array([float(mp.atanh(mp.erf(mp.mpf(v) / mp.sqrt(2)))) for v in x])
    s = x * x
    weight = 0.5 * s / np.cosh(g) ** 2 + 1e-12
    w = weight.copy()
    for _ in range(30):
        coef = np.polynomial.polynomial.polyfit(s, g / x, degree, w=w)
        err = np.abs(np.polynomial.polynomial.polyval(s, coef) - g / x) * weight
        w = w * np.sqrt(err / err.max() + 1e-3)
    return coef, float(err.max())


def fit(z_max: float, degree: int, nodes: int = 3000):
    t_min = 1.0 / (1.0 + 0.5 * z_max)
    u = np.cos(np.pi * (np.arange(nodes) + 0.5) / nodes)
    t = t_min + (u + 1.0) * 0.5 * (1.0 - t_min)
    f = []
    for ti in t:
        tm = mp.mpf(ti)
        z = 2 * (1 - tm) / tm
        f.append(float(mp.log(mp.erfc(z) / tm) + z * z))
    f = np.array(f)
    cheb = C.chebfit(u, f, degree)
    err = np.max(np.abs(C.chebval(u, cheb) - f))
    power = C.cheb2poly(cheb)
    # u = t * scale + shift
    scale, shift = 2.0 / (1.0 - t_min), -1.0 - 2.0 * t_min / (1.0 - t_min)
    return power, scale, shift, err


if __name__ == "__main__":
    coef, err = fit_tanh_form()
    print(f"# float32 tanh form: degree 6 in x**2, weighted max error {err:.2e}")
    print("coefficients (highest power first):")
    print(",\n".join(repr(float(c)) for c in coef[::-1]))
    for name, z_max, degree in (("float64", 27.0, 24),):
        power, scale, shift, err = fit(z_max, degree)
        print(f"# {name}: z_max={z_max}, degree {degree}, max fit error {err:.2e}")
        print(f"scale={scale!r}, shift={shift!r}")
        print("coefficients (highest power first):")
        print(",\n".join(repr(float(c)) for c in power[::-1]))
