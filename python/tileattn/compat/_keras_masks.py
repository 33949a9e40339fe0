"""Keras' attention masks, read as Keras reads them, as the core's masks.

Keras combines ``attention_mask`` (B, T, S) with the query's (B, T) and
value's / key's (B, S) masks by logical AND, casts to bool (nonzero = may
attend), and inserts missing axes just before the query and key axes of its
scores (B, <non-attended axes>, heads, <query axes>, <key axes>). So a
(B, T, S) mask is per batch item, never per head, even when B equals the
number of heads. Causal and sliding-window masks compare the positions
along axis 1 of the query and of the value, aligned top-left.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .._axes import SequenceLayout
from .._errors import DTypeError, InvalidParameterError, ShapeError
from .._validate import shape_str


def as_bool(mask: Any, name: str) -> np.ndarray:
    """A Keras mask as bool: True, or any nonzero number, may attend."""
    m = mask if isinstance(mask, np.ndarray) else np.asarray(mask)
    if m.dtype.kind not in "biuf":
        raise DTypeError(f"{name}: expected a bool, int or float mask (nonzero = may attend), "
                         f"got dtype {m.dtype}")
    return m if m.dtype == np.bool_ else m != 0


def combine(attention_mask: Any, query_mask: Any, value_mask: Any,
            key_mask: Any) -> Optional[np.ndarray]:
    """The AND of the given masks in Keras' layout: query_mask (B, T) as
    (B, T, 1), value_mask and key_mask (B, S) as (B, 1, S)."""
    parts = []
    for name, mask, axis in (("attention_mask", attention_mask, None),
                             ("query_mask", query_mask, -1), ("value_mask", value_mask, -2),
                             ("key_mask", key_mask, -2)):
        if mask is not None:
            m = as_bool(mask, name)
            parts.append((name, m if axis is None else np.expand_dims(m, axis)))
    if not parts:
        return None
    try:
        shape = np.broadcast_shapes(*(m.shape for _, m in parts))
    except ValueError:
        given = ", ".join(f"{n} {shape_str(np.shape(m))}" for n, m in parts)
        raise ShapeError(f"attention_mask: the masks do not broadcast together: {given} "
                         f"(query_mask (B, T), value_mask and key_mask (B, S), "
                         f"attention_mask (B, T, S))") from None
    if len(parts) == 1:
        return parts[0][1]
    out = np.ones(shape, bool)
    for _, m in parts:
        out &= m
    return out


def to_core(mask: np.ndarray, lays: Tuple[SequenceLayout, SequenceLayout],
            heads: int) -> np.ndarray:
    """A combined Keras mask as the (B', 1 or heads, Lq, Lk) mask of the
    flattened problem the core solves (a view where no axes merge)."""
    q_lay, k_lay = lays
    n, nb = len(q_lay.pos_shape), len(q_lay.batch_shape)
    scores = q_lay.batch_shape + (heads,) + q_lay.pos_shape + k_lay.pos_shape
    if not 2 * n <= mask.ndim <= len(scores):
        raise ShapeError(f"attention_mask: expected at most {len(scores)} and at least {2 * n} "
                         f"axes broadcastable to Keras' scores {shape_str(scores)}, "
                         f"got shape {shape_str(mask.shape)}")
    split = mask.ndim - 2 * n
    m = mask.reshape(mask.shape[:split] + (1,) * (len(scores) - mask.ndim) + mask.shape[split:])
    sizes: Tuple[int, ...] = m.shape
    if any(size not in (1, want) for size, want in zip(sizes, scores)):
        raise ShapeError(
            f"attention_mask: shape {shape_str(mask.shape)} does not broadcast to Keras' scores "
            f"{shape_str(scores)} (axes are added before the query axes; for (B, T, dim) "
            f"inputs pass (B, T, S))")
    groups = (slice(0, nb), slice(nb, nb + 1), slice(nb + 1, nb + 1 + n), slice(nb + 1 + n, None))
    target: List[Tuple[int, ...]] = []
    for g in groups:   # a group stays 1 only where the mask broadcasts over all of it
        part: Tuple[int, ...] = m.shape[g]
        target.append(part if all(size == 1 for size in part) else scores[g])
    full = sum(target, ())
    return np.broadcast_to(m, full).reshape(tuple(math.prod(t) for t in target))


def structural(use_causal_mask: bool, sliding_window: Optional[int],
               axes: Tuple[int, ...]) -> Dict[str, Any]:
    """Keras' causal (key j <= query i) and sliding-window (|i - j| < W)
    masks as the core's top-left aligned ``is_causal`` and ``window``: no
    (T, S) mask is built, and hidden key blocks are skipped."""
    if not use_causal_mask and sliding_window is None:
        return {}
    if axes != (1,):
        raise InvalidParameterError(
            f"use_causal_mask / sliding_window: Keras builds these masks over axis 1 of the "
            f"query and value, which is not the attended axis set {axes}; attend over axis 1 "
            f"alone, or pass the mask as attention_mask")
    w = sliding_window
    return {"is_causal": use_causal_mask, "window": None if w is None else (w - 1, w - 1),
            "causal_alignment": "top_left"}
