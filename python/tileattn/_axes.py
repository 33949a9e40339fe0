"""Keras' ``attention_axes``: attention over several axes of (B, *axes, E)
inputs, reduced to the (B', L, E) problem the core solves.

Axes that are not attended over become batch axes (next to B), and the
attended axes are flattened into one sequence axis in row-major order, so the
softmax runs jointly over all of them, as in Keras.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Tuple

import numpy as np

from ._errors import InvalidParameterError, ShapeError

Axes = Optional[Tuple[int, ...]]


def check_attention_axes(axes: Any) -> Axes:
    """The constructor's ``attention_axes`` as a tuple of ints (or None)."""
    if axes is None:
        return None
    if isinstance(axes, numbers.Integral) and not isinstance(axes, (bool, np.bool_)):
        axes = (axes,)
    try:
        out = tuple(axes)
    except TypeError:
        raise InvalidParameterError(
            f"attention_axes: expected None, an int or a sequence of ints, got {axes!r}") from None
    if not out or not all(isinstance(a, numbers.Integral) and not isinstance(a, (bool, np.bool_))
                          for a in out):
        raise InvalidParameterError(
            f"attention_axes: expected None, an int or a non-empty sequence of ints, got {axes!r}")
    return tuple(int(a) for a in out)


class SequenceLayout:
    """Maps a (B, *S, F) array to (B', L, F) and results back.

    Attributes
    ----------
    perm : axis order (B, non-attended..., attended..., F)
    batch_shape : (B, non-attended sizes...)
    pos_shape : sizes of the attended axes
    """

    def __init__(self, shape: Tuple[int, ...], axes: Axes, name: str) -> None:
        ndim = len(shape)
        inner = list(range(1, ndim - 1))
        if axes is None:
            attn = inner
        else:
            attn = []
            for a in axes:
                if not -ndim <= a < ndim or (a % ndim) not in inner:
                    raise InvalidParameterError(
                        f"attention_axes: axis {a} is not an inner axis of {name} with shape "
                        f"{shape}; expected axes in 1..{ndim - 2} (or negative)")
                attn.append(a % ndim)
            if len(set(attn)) != len(attn):
                raise InvalidParameterError(f"attention_axes: repeated axis in {axes}")
            attn.sort()
        non = [a for a in inner if a not in attn]
        self.perm = (0, *non, *attn, ndim - 1)
        self.batch_shape = tuple(shape[a] for a in (0, *non))
        self.pos_shape = tuple(shape[a] for a in attn)

    @property
    def identity(self) -> bool:
        return self.perm == tuple(range(len(self.perm)))

    def to_sequence(self, x: np.ndarray) -> np.ndarray:
        """(B, *S, F) -> (B', L, F); a view when no axis has to move."""
        xt = x if self.identity else x.transpose(self.perm)
        return xt.reshape(math.prod(self.batch_shape), math.prod(self.pos_shape), x.shape[-1])

    def from_sequence(self, y: np.ndarray) -> np.ndarray:
        """(B', L, F') -> (B, *S, F')."""
        y = y.reshape(self.batch_shape + self.pos_shape + (y.shape[-1],))
        return y if self.identity else y.transpose(np.argsort(self.perm))

    def weights_shape(self, key: "SequenceLayout", heads: Tuple[int, ...]) -> Tuple[int, ...]:
        """Keras' score shape: (B, non-attended..., [H,] query axes..., key axes...)."""
        return self.batch_shape + heads + self.pos_shape + key.pos_shape


def layouts(query: np.ndarray, key: np.ndarray, value: np.ndarray,
            axes: Axes) -> Tuple[SequenceLayout, SequenceLayout]:
    """Layouts of the query and of key/value; their batch axes must agree."""
    if key.ndim != query.ndim or value.ndim != query.ndim:
        raise ShapeError(f"query, key and value must have the same rank; got shapes "
                         f"{query.shape}, {key.shape}, {value.shape}")
    q = SequenceLayout(query.shape, axes, "query")
    k = SequenceLayout(key.shape, axes, "key")
    v = SequenceLayout(value.shape, axes, "value")
    if k.batch_shape != q.batch_shape or v.batch_shape != q.batch_shape:
        raise ShapeError(
            f"query, key and value must agree on the batch and non-attended axes "
            f"{q.batch_shape}; got shapes {query.shape}, {key.shape}, {value.shape}")
    if k.pos_shape != v.pos_shape:
        raise ShapeError(f"key and value must have the same positions; got shapes "
                         f"{key.shape} and {value.shape}")
    return q, k
