"""Inverted dropout on arrays: in place, with or without keeping the mask
for the backward, and that backward."""

from __future__ import annotations

from typing import Optional

import numpy as np


def dropout_(x: np.ndarray, p: float, rng: np.random.Generator) -> np.ndarray:
    """``dropout_keep_`` for a forward with no backward: returns x."""
    dropout_keep_(x, p, rng)
    return x


def dropout_keep_(x: np.ndarray, p: float, rng: np.random.Generator) -> Optional[np.ndarray]:
    """Inverted dropout in place: zero each element of x with probability p,
    scale the rest by 1 / (1 - p). Returns the bool keep mask for the
    backward (None when p == 0: nothing drawn, x unchanged)."""
    if p <= 0.0:
        return None
    keep = rng.random(x.shape, dtype=np.float32 if x.dtype == np.float32 else np.float64) >= p
    x *= keep
    x *= x.dtype.type(1.0 / (1.0 - p))
    return keep


def dropout_backward(g: np.ndarray, keep: Optional[np.ndarray], p: float) -> np.ndarray:
    """dL/dx of inverted dropout from dL/dy: g * keep / (1 - p) (g when p == 0)."""
    if keep is None:
        return g
    out: np.ndarray = g * keep
    out *= out.dtype.type(1.0 / (1.0 - p))
    return out
