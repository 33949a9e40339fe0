"""``LayerNorm`` over the last axis (PyTorch's ``nn.LayerNorm`` semantics), and
its in-place and training variants that the encoder layers run."""

from __future__ import annotations

from typing import Any, Dict, cast

import numpy as np

from . import _core
from ._budget import charge
from ._errors import InvalidParameterError, ShapeError
from ._memory import check_fits
from ._validate import COMPUTE_DTYPES, flag, float_array, positive_int, positive_real, shape_str
from .linear import as_2d_rows, grad_input
from .module import Module


class LayerNorm(Module):
    """``(x - mean) / sqrt(var + eps) * weight + bias`` over the last axis.

    Parameters
    ----------
    normalized_shape : int
        Size of the last axis (positive).
    eps : float
        Positive and finite.
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
        self.normalized_shape = positive_int("normalized_shape", normalized_shape)
        self.eps = positive_real("eps", eps)
        bias = flag("bias", bias)
        check_fits("LayerNorm", (self.normalized_shape,), self.dtype.itemsize)
        charge("LayerNorm", (self.normalized_shape * (1 + bias),))
        self.register_parameter("weight", np.ones(self.normalized_shape, self.dtype))
        self.register_parameter("bias", np.zeros(self.normalized_shape, self.dtype) if bias else None)

    def forward(self, x: Any, *, training: bool = False) -> np.ndarray:
        """x (..., normalized_shape), float16/32/64, -> same shape, a new
        array. With ``training=True`` the normalised x and 1/std are kept
        for ``backward``."""
        x = float_array(x, "x")
        if x.ndim < 1 or x.shape[-1] != self.normalized_shape:
            raise ShapeError(f"x: expected last axis {self.normalized_shape}, got shape "
                             f"{shape_str(x.shape)}")
        training = flag("training", training)
        if x.dtype == self.dtype:   # the core's row-wise pass (training: the same bits)
            return (layer_norm_train(x, self) if training
                    else layer_norm_(np.array(x, order="C"), self))
        mean = x.mean(axis=-1, keepdims=True)
        y = x - mean
        var = np.mean(np.square(y), axis=-1, keepdims=True)
        inv = (1.0 / np.sqrt(var + self.eps)).astype(y.dtype, copy=False)
        y *= inv
        if training:
            self.save_stats(y.copy(), inv, x.dtype)
        y *= self.weight
        if self.bias is not None:
            y += self.bias
        return cast(np.ndarray, y)

    def save_stats(self, xhat: np.ndarray, inv: np.ndarray, dtype: np.dtype) -> None:
        """Keep xhat = (x - mean) * inv (..., E) and inv = 1/std (..., 1) for
        ``backward`` (also by ``layer_norm_train`` below); ``dtype`` is
        the input's."""
        self._save((xhat, inv, dtype))

    def backward(self, grad_output: Any) -> np.ndarray:
        """grad_output (..., E) -> dL/dx (..., E) in x's dtype; adds dL/dweight
        and dL/dbias into ``grads``."""
        xhat, inv, dtype = self._take_saved()
        g = grad_input(grad_output, xhat.shape, xhat.dtype)
        rows, grows = as_2d_rows(xhat), as_2d_rows(g)
        self._accumulate("weight", np.einsum("ij,ij->j", grows, rows))
        if self.bias is not None:
            self._accumulate("bias", grows.sum(axis=0))
        # dx = inv * (gh - mean(gh) - xhat * mean(gh * xhat)), gh = g * weight
        gh = g * self.weight.astype(g.dtype, copy=False)
        dx = gh - gh.mean(axis=-1, keepdims=True)
        dx -= xhat * np.mean(gh * xhat, axis=-1, keepdims=True)
        dx *= inv
        out: np.ndarray = dx.astype(dtype, copy=False)
        return out

    def get_config(self) -> Dict[str, Any]:
        return {"normalized_shape": self.normalized_shape, "eps": self.eps,
                "bias": self.bias is not None, "dtype": self.dtype.name}

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}"


def layer_norm_(x: np.ndarray, norm: LayerNorm) -> np.ndarray:
    """``norm(x)`` computed in place in x (C-contiguous, the layer's dtype,
    owned by the caller) by the core, on tileattn's pool, one pass per row
    for the statistics and one for the result; same formula as
    ``LayerNorm.forward``. Each row is reduced in one fixed order, so its
    bits do not depend on the rows around it or the thread count. Use the
    returned array (x itself unless x was not C-contiguous)."""
    if not x.flags.c_contiguous:
        x = np.ascontiguousarray(x)
    _core.layer_norm_rows(as_2d_rows(x), norm.weight, norm.bias, norm.eps)
    return x


def _normalize_rows_(rows: np.ndarray, eps: float) -> np.ndarray:
    """rows (N, E) -> (rows - mean) / std in place; returns 1/std (N,). The
    core's arithmetic of ``layer_norm_`` (which then computes
    ``xhat * weight + bias``, unfused, as NumPy does), so training and
    inference agree bitwise."""
    inv = np.empty(rows.shape[0], rows.dtype)
    _core.layer_norm_rows(rows, None, None, eps, inv)
    return inv


def qk_layer_norm(x: Any, eps: float = 1e-6) -> np.ndarray:
    """Edifice's QK LayerNorm: ``(x - mean) / sqrt(var + eps)`` over the last
    axis (the head's features), with no learnable parameters.

    Parameters
    ----------
    x : float16, float32 or float64 array (..., D), e.g. q or k heads
    eps : float > 0
        Edifice's 1e-6 by default (``LayerNorm``'s is PyTorch's 1e-5).

    Returns
    -------
    A new array of x's shape and dtype (float16 is computed in float32). The
    variance is the mean square deviation (no Bessel correction), as in
    Edifice and ``LayerNorm``, whose arithmetic this shares.
    ``MultiHeadAttention(qk_norm=True)`` also learns a weight (and bias).
    """
    a = float_array(x, "x")
    eps = positive_real("eps", eps)
    if a.ndim == 0:
        raise ShapeError("x: expected at least one axis (the features), got a scalar")
    compute = a.dtype if a.dtype in COMPUTE_DTYPES else np.dtype(np.float32)
    y = np.array(a, dtype=compute, order="C")
    if y.shape[-1]:
        _normalize_rows_(as_2d_rows(y), eps)
    out: np.ndarray = y.astype(a.dtype, copy=False)
    return out


def layer_norm_train(x: np.ndarray, norm: LayerNorm) -> np.ndarray:
    """``layer_norm_(copy of x, norm)`` (the same arithmetic, so training and
    inference forwards agree bitwise) that keeps xhat and 1/std in ``norm``
    for ``norm.backward``. x (..., E) of the layer's dtype; a new array."""
    rows = as_2d_rows(np.array(x, order="C"))
    inv = _normalize_rows_(rows, norm.eps)
    norm.save_stats(rows.reshape(x.shape).copy(), inv.reshape(x.shape[:-1] + (1,)), x.dtype)
    rows *= norm.weight
    if norm.bias is not None:
        rows += norm.bias
    return rows.reshape(x.shape)
