"""Running layers on the real tokens of a padded batch only: which tokens
are real, and putting their rows back in the (B, L) layout."""

from __future__ import annotations

from typing import Any, Iterable, Optional, Protocol, Tuple

import numpy as np

from . import _core

# (the (B, L) bool mask, flat indices of the real tokens, of the padding)
RealTokens = Tuple[np.ndarray, np.ndarray, np.ndarray]


class Unpaddable(Protocol):
    def unpaddable(self) -> bool:
        """Whether the layer can run on the real tokens only."""


def padding_rows(x: np.ndarray, attn_mask: Any, key_padding_mask: Any, p: float,
                 layers: Iterable[Unpaddable]) -> Optional[RealTokens]:
    """(mask, flat indices of the real tokens, of the padding) when the layers
    may run on the real tokens only (a (B, L) bool key padding mask, nothing
    else that looks at positions, no dropout), else None."""
    if key_padding_mask is None or attn_mask is not None or p > 0.0 or x.ndim != 3:
        return None
    mask = key_padding_mask if isinstance(key_padding_mask, np.ndarray) else None
    if mask is None or mask.dtype != np.bool_ or mask.shape != x.shape[:2]:
        return None
    if not all(layer.unpaddable() for layer in layers):
        return None
    flat = mask.reshape(-1)
    return mask, np.flatnonzero(flat), np.flatnonzero(~flat)


def token_runs(mask: np.ndarray) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """(first position, length) of each row's real tokens when they form one
    unbroken run (right or left padding), else None."""
    lengths = mask.sum(axis=1, dtype=np.int64)
    first = np.where(lengths > 0, mask.argmax(axis=1), 0).astype(np.int64)
    pos = np.arange(mask.shape[1])[None, :]
    if not np.array_equal(mask, (pos >= first[:, None]) & (pos < (first + lengths)[:, None])):
        return None
    return first, lengths


def scatter_rows(rows: np.ndarray, real: RealTokens, shape: Tuple[int, ...],
                 dtype: Any) -> np.ndarray:
    """(N, F) real-token rows into a (B * L, F) array (or ``shape``), zeros at
    the padding. (np.empty and zeroing the padded rows: np.zeros of a large
    array maps fresh pages, and faulting them in cost 2x here.)"""
    _, idx, pad = real
    out = np.empty((shape[0] * shape[1], rows.shape[1]), dtype)
    if rows.dtype == out.dtype and _contiguous_rows(rows):   # on tileattn's pool
        _core.move_rows(rows, None, out, idx, pad)
    else:
        out[idx] = rows
        out[pad] = 0
    return out.reshape(shape)


def take_rows(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """a[idx] for a 2-D array and an int64 index vector, on tileattn's pool
    (NumPy's fancy indexing copies on one core)."""
    if not _contiguous_rows(a):
        out: np.ndarray = a[idx]
        return out
    rows = np.empty((idx.shape[0], a.shape[1]), a.dtype)
    _core.move_rows(a, idx, rows, None)
    return rows


def _contiguous_rows(a: np.ndarray) -> bool:
    return a.ndim == 2 and (a.shape[1] <= 1 or a.strides[1] == a.itemsize) \
        and a.strides[0] >= 0 and a.strides[0] % a.itemsize == 0
