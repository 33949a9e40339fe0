"""``LayerNorm`` over the last axis (PyTorch's ``nn.LayerNorm`` semantics)."""

from __future__ import annotations

from typing import Any, Dict, cast

import numpy as np

from ._errors import InvalidParameterError, ShapeError
from .module import Module


class LayerNorm(Module):
    """``(x - mean) / sqrt(var + eps) * weight + bias`` over the last axis.

    Parameters
    ----------
    normalized_shape : int
        Size of the last axis.
    eps : float
    bias : bool
        Learn a bias (``weight`` is always learnt; it starts at one).
    dtype : float32 or float64

    Parameters (arrays)
    -------------------
    weight : (normalized_shape,), ones
    bias : (normalized_shape,), zeros, or None
    """

    def __init__(self, normalized_shape: int, eps: float = 1e-5, bias: bool = True,
                 dtype: Any = np.float32) -> None:
        super().__init__(dtype)
        if not eps > 0:
            raise InvalidParameterError(f"eps: expected a positive number, got {eps!r}")
        self.normalized_shape = int(normalized_shape)
        self.eps = float(eps)
        self.register_parameter("weight", np.ones(self.normalized_shape, self.dtype))
        self.register_parameter("bias", np.zeros(self.normalized_shape, self.dtype) if bias else None)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """x (..., normalized_shape) -> same shape, a new array."""
        if x.shape[-1] != self.normalized_shape:
            raise ShapeError(f"x: expected last axis {self.normalized_shape}, got shape {x.shape}")
        mean = x.mean(axis=-1, keepdims=True)
        y = x - mean
        var = np.mean(np.square(y), axis=-1, keepdims=True)
        y *= (1.0 / np.sqrt(var + self.eps)).astype(y.dtype, copy=False)
        y *= self.weight
        if self.bias is not None:
            y += self.bias
        return cast(np.ndarray, y)

    def get_config(self) -> Dict[str, Any]:
        return {"normalized_shape": self.normalized_shape, "eps": self.eps,
                "bias": self.bias is not None, "dtype": self.dtype.name}

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}"
