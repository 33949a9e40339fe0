"""``FeedForward``: the position-wise block of a transformer layer, and the
functions the encoder layers run it with (inference, training, backward)."""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import numpy as np

from . import _validate as check
from ._errors import DTypeError, ShapeError
from .activations import activation_, activation_backward, check_activation
from .dropout import dropout_, dropout_backward, dropout_keep_
from .linear import Linear, affine, as_2d_rows, grad_input
from ._compute_dtype import ComputeDtypeOption
from .module import Module


class FeedForward(ComputeDtypeOption, Module):
    """``linear2(dropout(activation(linear1(x))))``, position-wise.

    Parameters
    ----------
    d_model : int
        Input and output features.
    dim_feedforward : int
        Hidden features.
    activation : "relu", "gelu" (exact, with erf), "gelu_tanh" or "silu"
    dropout : float in [0, 1)
        On the hidden activations, only with ``training=True``.
    bias : bool
    dtype : float32 or float64
    seed : int, optional
        Seeds the weights and the dropout masks.
    compute_dtype : None or "bfloat16"
        As ``Linear``'s: both products on bf16 operands, float32 sums.

    Parameters (arrays)
    -------------------
    linear1.weight (dim_feedforward, d_model), linear2.weight
    (d_model, dim_feedforward), and their ``.bias`` when ``bias``.
    """

    def __init__(self, d_model: int, dim_feedforward: int = 2048, activation: str = "relu",
                 dropout: float = 0.0, bias: bool = True, dtype: Any = np.float32,
                 seed: Optional[int] = None, compute_dtype: Any = None) -> None:
        super().__init__(dtype)
        compute = self._set_compute_dtype(compute_dtype, self.dtype)
        self.d_model = check.positive_int("d_model", d_model)
        self.dim_feedforward = check.positive_int("dim_feedforward", dim_feedforward)
        self.activation = check_activation(activation)
        self.dropout = check.dropout_rate(dropout)
        check.flag("bias", bias)
        self.seed = check.seed(seed)
        init_seq, drop_seq = np.random.SeedSequence(self.seed).spawn(2)
        rng = np.random.default_rng(init_seq)
        self._dropout_rng = np.random.default_rng(drop_seq)
        self.linear1 = Linear(self.d_model, self.dim_feedforward, bias, self.dtype, rng, compute)
        self.linear2 = Linear(self.dim_feedforward, self.d_model, bias, self.dtype, rng, compute)

    def forward(self, x: Any, *, training: bool = False) -> np.ndarray:
        """x (..., d_model) -> (..., d_model), in x's dtype."""
        a = check.native_byte_order(x if isinstance(x, np.ndarray) else np.asarray(x))
        if a.dtype not in check.FLOAT_DTYPES:    # (float_array's message adds the shape)
            raise DTypeError(f"x: expected float16, float32 or float64, got {a.dtype}")
        if a.ndim < 1 or a.shape[-1] != self.d_model:
            raise ShapeError(f"x: expected last axis {self.d_model} (d_model), got shape {a.shape}")
        train = check.flag("training", training)
        p = self.dropout if train else 0.0
        x = a.astype(self.dtype, copy=False)
        if train:
            y, saved = feed_forward_train(x, self.linear1, self.linear2, self.activation, p,
                                          self._dropout_rng)
            self._save((saved, a.dtype))
        else:
            y = feed_forward(x, self.linear1, self.linear2, self.activation, p,
                             self._dropout_rng)
        return y.astype(a.dtype, copy=False)

    def backward(self, grad_output: Any) -> np.ndarray:
        """grad_output (..., d_model) -> dL/dx (..., d_model) in x's dtype;
        adds the linear layers' gradients into ``grads``."""
        saved, dtype = self._take_saved()
        g = grad_input(grad_output, saved[0].shape[:-1] + (self.d_model,), self.dtype)
        return feed_forward_backward(saved, g, self.linear1, self.linear2).astype(dtype, copy=False)

    def get_config(self) -> Dict[str, Any]:
        return {"d_model": self.d_model, "dim_feedforward": self.dim_feedforward,
                "activation": self.activation, "dropout": self.dropout,
                "bias": self.linear1.bias is not None, "dtype": self.dtype.name,
                "seed": self.seed,
                "compute_dtype": self.compute_dtype_option}

    def extra_repr(self) -> str:
        return (f"{self.d_model}, {self.dim_feedforward}, activation={self.activation!r}"
                + self._compute_dtype_repr())


def feed_forward(x: np.ndarray, linear1: Linear, linear2: Linear, activation: str,
                 p: float, rng: np.random.Generator) -> np.ndarray:
    """The feed-forward block on x (..., E) of the layers' dtype. The hidden
    (N, F) array, the largest of a transformer layer, is made once and then
    updated in place (bias and activation in one chunked pass, dropout)."""
    rows = as_2d_rows(x)
    h = affine(rows, linear1.packed_weight(), None)
    activation_(activation, h, linear1.bias)
    dropout_(h, p, rng)
    y = affine(h, linear2.packed_weight(), linear2.bias)
    return y.reshape(x.shape)


FFSaved = Tuple[np.ndarray, Optional[np.ndarray], str, float]


def feed_forward_train(x: np.ndarray, linear1: Linear, linear2: Linear, activation: str,
                       p: float, rng: np.random.Generator) -> Tuple[np.ndarray, FFSaved]:
    """``feed_forward`` (the same arithmetic and dropout draws) that keeps, for
    ``feed_forward_backward``, the pre-activation (..., F) and the dropout
    mask; the linear layers keep their inputs."""
    h = linear1(x, training=True)
    pre = h.copy()
    activation_(activation, h)
    keep = dropout_keep_(h, p, rng)
    y = linear2(h, training=True)
    return y, (pre, keep, activation, p)


def feed_forward_backward(saved: FFSaved, g: np.ndarray, linear1: Linear,
                          linear2: Linear) -> np.ndarray:
    """dL/dx (..., E) of the feed-forward block from g = dL/dy (..., E)."""
    pre, keep, activation, p = saved
    dh = dropout_backward(linear2.backward(g), keep, p)
    return linear1.backward(activation_backward(activation, pre, dh))
