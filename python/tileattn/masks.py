"""Dense boolean masks (True = may attend) for code that passes masks around
as arrays, as Edifice's ``causal_mask`` and ``window_mask`` build them.

tileattn's own calls need none of them: ``is_causal=True`` and ``window=W``
describe the same masks to the kernel, which then skips the hidden key
blocks instead of reading an (L, L) array. ``attn_mask=window_mask(L, W)``
gives the result of ``window=W`` (for L == Lq == Lk).
"""

from __future__ import annotations

import numbers
from typing import Any, List

import numpy as np

from ._errors import InvalidParameterError
from ._memory import check_fits
from ._validate import is_bool, positive_int


def _sequence_length(seq_len: Any) -> int:
    if is_bool(seq_len) or not isinstance(seq_len, numbers.Integral) or seq_len < 0:
        raise InvalidParameterError(f"seq_len: expected a non-negative int, got {seq_len!r}")
    n = int(seq_len)
    check_fits("mask", (n, n), 1)
    return n


def causal_mask(seq_len: int) -> np.ndarray:
    """(seq_len, seq_len) bool: position i may attend to j iff j <= i (itself
    and the earlier positions), Edifice's ``causal_mask``."""
    n = _sequence_length(seq_len)
    i = np.arange(n)
    mask: np.ndarray = i[:, None] >= i[None, :]
    return mask


def window_mask(seq_len: int, window_size: int) -> np.ndarray:
    """(seq_len, seq_len) bool, Edifice's ``window_mask``: position i may
    attend to j iff ``i - window_size + 1 <= j <= i``, the last
    ``window_size`` positions including itself (causal). ``window_size`` >= 1
    (tileattn's ``window=window_size``); Edifice's 0 would hide every key."""
    n = _sequence_length(seq_len)
    w = positive_int("window_size", window_size)
    i = np.arange(n)
    offset = i[:, None] - i[None, :]
    mask: np.ndarray = (offset >= 0) & (offset <= w - 1)
    return mask


__all__: List[str] = ["causal_mask", "window_mask"]
