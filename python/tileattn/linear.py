"""``Linear``: ``y = x W^T + b`` with PyTorch's weight layout."""

from __future__ import annotations

from typing import Any, Dict, Optional, cast

import numpy as np

from ._errors import ShapeError
from .module import Module


def glorot_uniform(rng: np.random.Generator, out_features: int, in_features: int,
                   dtype: np.dtype) -> np.ndarray:
    """Glorot/Xavier uniform: U(-a, a), a = sqrt(6 / (fan_in + fan_out)), the
    kernel initialiser of Keras and of PyTorch's attention in-projection."""
    fans = in_features + out_features
    limit = np.sqrt(6.0 / fans) if fans else 0.0
    return rng.uniform(-limit, limit, (out_features, in_features)).astype(dtype)


def as_2d_rows(x: np.ndarray) -> np.ndarray:
    """(..., F) -> (N, F): one GEMM instead of a batch of small ones (a free
    reshape when x is contiguous)."""
    return x.reshape(-1, x.shape[-1])


class Linear(Module):
    """Affine map of the last axis.

    Parameters
    ----------
    in_features, out_features : int
    bias : bool
    dtype : float32 or float64
    rng : numpy Generator, optional
        Source of the Glorot-uniform weight; the bias starts at zero.

    Parameters (arrays)
    -------------------
    weight : (out_features, in_features)
    bias : (out_features,) or None
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 dtype: Any = np.float32, rng: Optional[np.random.Generator] = None) -> None:
        super().__init__(dtype)
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        rng = np.random.default_rng() if rng is None else rng
        self.register_parameter("weight", glorot_uniform(rng, self.out_features,
                                                          self.in_features, self.dtype))
        self.register_parameter("bias", np.zeros(self.out_features, self.dtype) if bias else None)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """x (..., in_features) -> (..., out_features), in the module's dtype."""
        if x.shape[-1] != self.in_features:
            raise ShapeError(f"x: expected last axis {self.in_features} (in_features), "
                             f"got shape {x.shape}")
        y = as_2d_rows(x) @ self.weight.T
        if self.bias is not None:
            y += self.bias
        return cast(np.ndarray, y.reshape(x.shape[:-1] + (self.out_features,)))

    def get_config(self) -> Dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "dtype": self.dtype.name}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}"
