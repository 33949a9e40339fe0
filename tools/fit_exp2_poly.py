"""Derive the float32 polynomials for 2^r on [-1/2, 1/2] used by simd_exp.h.

    python tools/fit_exp2_poly.py [degree]

Degree 6 (the default) for the softmax; degree 4 for the exponentials that
feed probabilities rounded to bf16. A polynomial with p(0) = 1 fixed, fitted for minimal *relative*
error by Remez-style exchange on a fine grid (iteratively reweighted least
squares converging to the equioscillating solution). Prints the
coefficients as float32 literals and the achieved max relative error when
evaluated in float32 with Horner's rule.
"""

import sys

import numpy as np

DEGREE = int(sys.argv[1]) if len(sys.argv) > 1 else 6
r = np.linspace(-0.5, 0.5, 20001)
target = np.exp2(r)
A = np.stack([r**k for k in range(1, DEGREE + 1)], axis=1)
w = np.ones_like(r)
for _ in range(200):
    # minimise max |(1 + A c - 2^r) / 2^r| via Lawson's reweighting
    W = w / target
    c, *_ = np.linalg.lstsq(A * W[:, None], (target - 1) * W, rcond=None)
    err = (1 + A @ c - target) / target
    w = w * np.abs(err) ** 1.0
    w /= w.sum()
coef = np.concatenate([[1.0], c]).astype(np.float32)

# evaluate in float32 exactly as the kernel does (Horner, fused multiply-add)
rf = r.astype(np.float32)
p = np.float32(coef[-1])
for k in range(DEGREE - 1, -1, -1):
    p = (p.astype(np.float64) * rf + coef[k]).astype(np.float32)
rel = np.abs(p.astype(np.float64) - target) / target
print("coefficients:", ", ".join(f"{x:.9e}f" for x in coef))
print(f"max relative error in float32: {rel.max():.3e} ({rel.max() / 2**-24:.2f} half-ulps)")
