"""PyTorch's attention masks, and its ``is_causal`` hint, in tileattn's terms.

``nn.MultiheadAttention`` and the encoder layers take bool masks with True =
*ignore* (tileattn: True = may attend / real token), float masks that are
added, an ``attn_mask`` of shape (L, S) or (B*num_heads, L, S), and a
``key_padding_mask`` (B, S) that is bool or float. Extra keys appended
after the projections (``add_bias_kv``, ``add_zero_attn``) get a column
that hides nothing, as PyTorch pads its masks.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import numpy as np

from .._errors import DTypeError, InvalidParameterError, ShapeError


class CoreMasks(NamedTuple):
    """The masks of one call in tileattn's conventions (``attn_mask``
    broadcastable to (B, H, L, S'), ``key_padding_mask`` (B, S') True = real
    token, ``is_causal`` top-left aligned)."""

    attn_mask: Optional[np.ndarray]
    key_padding_mask: Optional[np.ndarray]
    is_causal: bool


class Geometry(NamedTuple):
    """The sizes a mask must fit: batch, heads, query and key lengths (the
    keys before the extra ones), the appended keys, and whether the user's
    inputs were batched (an unbatched call takes (S,) and (H, L, S) masks)."""

    batch: int
    heads: int
    lq: int
    lk: int
    extra_keys: int
    batched: bool


def _bool_or_float(mask: Any, name: str) -> np.ndarray:
    m = np.asarray(mask)
    if m.dtype != np.bool_ and m.dtype.kind != "f":
        raise DTypeError(f"{name}: expected a bool or floating-point mask (PyTorch's rule), "
                         f"got dtype {m.dtype}")
    return m


def _pad_keys(m: np.ndarray, extra: int, hidden_none: Any) -> np.ndarray:
    """m with ``extra`` key columns that hide nothing appended."""
    if not extra:
        return m
    return np.pad(m, [(0, 0)] * (m.ndim - 1) + [(0, extra)], constant_values=hidden_none)


def _attn_mask(mask: Any, name: str, g: Geometry) -> np.ndarray:
    """A (L, S) or (B*H, L, S) PyTorch mask -> tileattn's polarity, (L, S')
    or (B, H, L, S')."""
    m = _bool_or_float(mask, name)
    stacked = (g.batch * g.heads if g.batched else g.heads, g.lq, g.lk)
    if m.shape == (g.lq, g.lk):
        pass
    elif m.shape == stacked:
        m = m.reshape(g.batch, g.heads, g.lq, g.lk)
    else:
        raise ShapeError(f"{name}: expected shape {(g.lq, g.lk)} or {stacked} "
                         f"((batch * num_heads, L, S)), got {m.shape}")
    if m.dtype == np.bool_:
        return _pad_keys(~m, g.extra_keys, True)
    return _pad_keys(m, g.extra_keys, 0.0)


def _padding_mask(mask: Any, name: str, g: Geometry) -> np.ndarray:
    """A (B, S) PyTorch key padding mask -> (B, S') (bool: True = real token)."""
    m = _bool_or_float(mask, name)
    want = (g.batch, g.lk) if g.batched else (g.lk,)
    if m.shape != want:
        raise ShapeError(f"{name}: expected shape {want} ((batch, S); (S,) unbatched), "
                         f"got {m.shape}")
    m = m.reshape(g.batch, g.lk)
    if m.dtype == np.bool_:
        return _pad_keys(~m, g.extra_keys, True)
    return _pad_keys(m, g.extra_keys, 0.0)


def core_masks(attn_mask: Any, key_padding_mask: Any, is_causal: bool, need_weights: bool,
               g: Geometry, names: tuple[str, str] = ("attn_mask", "key_padding_mask")
               ) -> CoreMasks:
    """PyTorch's masks of one attention call as tileattn's.

    ``is_causal`` follows ``F.multi_head_attention_forward`` (torch 2.x): it
    is a hint that ``attn_mask`` is causal and needs the mask; when there is
    no key padding mask and no weights are asked for, the mask is dropped
    and a top-left causal mask used instead, otherwise the mask is used as
    given. ``names`` are the arguments' names in the caller's signature.
    """
    attn_name, padding_name = names
    if not isinstance(is_causal, (bool, np.bool_)):
        raise InvalidParameterError(f"is_causal: expected a bool, got {is_causal!r}")
    if is_causal and attn_mask is None:
        raise InvalidParameterError(
            f"is_causal: PyTorch takes it as a hint that {attn_name} is a causal mask, "
            f"and needs {attn_name} too (it raises RuntimeError without it)")
    if is_causal and key_padding_mask is None and not need_weights:
        return CoreMasks(None, None, True)
    attn = None if attn_mask is None else _attn_mask(attn_mask, attn_name, g)
    if key_padding_mask is None:
        return CoreMasks(attn, None, False)
    padding = _padding_mask(key_padding_mask, padding_name, g)
    if padding.dtype == np.bool_:
        return CoreMasks(attn, padding, False)
    # A float padding mask is added to the scores: fold it into attn_mask.
    added = padding[:, None, None, :]
    if attn is None:
        return CoreMasks(added, None, False)
    if attn.dtype == np.bool_:
        attn = np.where(attn, 0.0, -np.inf).astype(added.dtype)
    return CoreMasks(attn + added, None, False)


def is_causal_mask(mask: Any, length: int) -> bool:
    """Whether ``mask`` is (length, length) and hides exactly the future (True
    or -inf above the diagonal, False or 0 elsewhere), as
    ``nn.TransformerEncoder`` detects it when ``is_causal`` is None."""
    if mask is None:
        return False
    m = np.asarray(mask)
    if m.shape != (length, length):
        return False
    future = np.triu(np.ones((length, length), dtype=bool), k=1)
    if m.dtype == np.bool_:
        return bool(np.array_equal(m, future))
    if m.dtype.kind != "f":
        return False
    return bool(np.array_equal(m, np.where(future, -np.inf, 0.0)))
