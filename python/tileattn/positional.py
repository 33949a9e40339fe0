"""Position encodings: rotary embeddings (RoPE) and the sinusoidal table."""

from __future__ import annotations

import numbers
import operator
from typing import Any, Tuple

import numpy as np

from ._errors import DTypeError, InvalidParameterError, ShapeError
from ._memory import check_fits
from ._validate import FLOAT_DTYPES, dtype_in, positive_real


# Lengths, dims and offsets: unlike _validate's int checks this takes any
# __index__ type and names the caller's lower bound in its message; only this
# module reads ints this way, so it stays here.
def _int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise InvalidParameterError(f"{name}: expected an int >= {minimum}, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise InvalidParameterError(f"{name}: expected an int >= {minimum}, got {value!r}") from None
    if v < minimum:
        raise InvalidParameterError(f"{name}: expected an int >= {minimum}, got {v}")
    return v


def _seq_axis(seq_dim: Any, ndim: int) -> int:
    """seq_dim as a non-negative axis; never the last (head_dim) axis."""
    ok = isinstance(seq_dim, numbers.Integral) and not isinstance(seq_dim, (bool, np.bool_))
    if ok:
        sd = int(seq_dim)
        ok = -ndim <= sd < ndim and sd % ndim != ndim - 1
    if not ok:
        raise InvalidParameterError(
            f"seq_dim: expected an axis in [{-ndim}, {ndim - 2}] other than the last "
            f"(head_dim) of an array of rank {ndim}, got {seq_dim!r}")
    return sd % ndim


def rope_tables(length: int, head_dim: int, theta: float = 10000.0, offset: int = 0,
                dtype: Any = np.float32) -> Tuple[np.ndarray, np.ndarray]:
    """cos and sin of the rotation angles, each (length, head_dim // 2).

    Angle of position ``p`` (``offset + 0 .. offset + length - 1``) and pair
    ``i``: ``p * theta ** (-2 i / head_dim)``, computed in float64 so that long
    positions keep their precision, then cast to ``dtype``.
    """
    half = head_dim // 2
    inv_freq = theta ** (-np.arange(half, dtype=np.float64) * 2.0 / head_dim)
    angles = np.arange(offset, offset + length, dtype=np.float64)[:, None] * inv_freq
    return np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate the two halves of x's last axis; cos/sin broadcast against
    x[..., :D/2]. Returns a new array of x's dtype."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = np.empty(x.shape, x.dtype)
    np.multiply(x1, cos, out=out[..., :half])
    out[..., :half] -= x2 * sin
    np.multiply(x2, cos, out=out[..., half:])
    out[..., half:] += x1 * sin
    return out


def rope(x: Any, *, theta: float = 10000.0, seq_dim: int = -2, offset: int = 0) -> np.ndarray:
    """Rotary position embedding (RoPE) of ``x``.

    Uses the "rotate half" pairing of GPT-NeoX and Hugging Face LLaMA:
    feature ``i`` is rotated together with feature ``i + head_dim / 2`` by the
    angle ``position * theta ** (-2 i / head_dim)``.

    Parameters
    ----------
    x : float array, rank >= 2, e.g. (B, H, L, D) or (B, L, H, D)
        The last axis is ``head_dim`` (even).
    theta : float
        Base of the frequencies (10000 in RoFormer and LLaMA).
    seq_dim : int
        Axis holding the sequence positions; negative counts from the end;
        it may not be the last axis. Default -2: (..., L, D).
    offset : int
        Position of the first element along ``seq_dim`` (decoding with a cache).

    Returns
    -------
    array of x's shape and dtype (a new array; x is not modified).

    Raises
    ------
    ShapeError: rank < 2.  DTypeError: not a float array.
    InvalidParameterError: odd head_dim, seq_dim out of range or the last axis,
    theta <= 0, offset < 0.
    """
    a = x if isinstance(x, np.ndarray) else np.asarray(x)
    if a.dtype not in FLOAT_DTYPES:
        raise DTypeError(f"x: expected float16, float32 or float64, got {a.dtype}")
    if a.ndim < 2:
        raise ShapeError(f"x: expected rank >= 2 (..., L, head_dim), got shape {a.shape}")
    d = a.shape[-1]
    if d % 2:
        raise InvalidParameterError(f"x: head_dim (the last axis) must be even for rope, got {d}")
    sd = _seq_axis(seq_dim, a.ndim)
    theta_v = positive_real("theta", theta)
    off = _int("offset", offset, 0)
    dtype = a.dtype if a.dtype != np.float16 else np.dtype(np.float32)
    cos, sin = rope_tables(a.shape[sd], d, theta_v, off, dtype)
    # (L, D/2) -> shape with L on axis sd and D/2 last, ones elsewhere.
    shape = [1] * a.ndim
    shape[sd], shape[-1] = a.shape[sd], d // 2
    out = apply_rope(a.astype(dtype, copy=False), cos.reshape(shape), sin.reshape(shape))
    return out.astype(a.dtype, copy=False)


def sinusoidal_positions(length: int, dim: int, *, base: float = 10000.0,
                         dtype: Any = np.float32) -> np.ndarray:
    """The sinusoidal position table of "Attention Is All You Need".

    ``P[p, 2i] = sin(p / base ** (2i / dim))`` and
    ``P[p, 2i + 1] = cos(p / base ** (2i / dim))``; add it to (L, dim) embeddings.

    Parameters
    ----------
    length : int >= 0
    dim : int >= 1 (an odd dim ends with a sine column)
    base : float > 0
    dtype : float dtype of the table

    Returns
    -------
    array (length, dim)
    """
    n = _int("length", length, 0)
    d = _int("dim", dim, 1)
    check_fits("sinusoidal_positions", (n, d), 8)  # built in float64
    base_v = positive_real("base", base)
    dt = dtype_in("dtype", dtype, FLOAT_DTYPES, "float16, float32 or float64",
                  unparsable="a float dtype")
    i = np.arange(0, d, 2, dtype=np.float64)
    angles = np.arange(n, dtype=np.float64)[:, None] / base_v ** (i / d)
    table = np.empty((n, d), np.float64)
    table[:, 0::2] = np.sin(angles)
    table[:, 1::2] = np.cos(angles[:, : d // 2])
    return table.astype(dt)
