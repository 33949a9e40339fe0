"""Keras 3's attention layers on NumPy arrays, computed by tileattn.

``MultiHeadAttention`` and ``GroupQueryAttention`` take Keras 3.15's
constructor and call arguments, defaults and mask conventions, and
``get_weights()`` / ``set_weights()`` in Keras' order and shapes, so code
written for ``keras.layers`` (and weights saved from it) runs unchanged on
NumPy inputs, without importing Keras:

- ``layer(query, value, key=None, ...)``: Keras' argument order.
- ``attention_mask`` (B, T, S), bool or 0/1 (nonzero = may attend), per
  batch item (never read as per head); masks in Keras' layout with
  ``attention_axes``; ``query_mask`` (B, T), ``value_mask`` / ``key_mask``
  (B, S).
- ``use_causal_mask=True`` aligns top-left (key j visible from query i iff
  j <= i) when T != S; ``sliding_window=W`` is Keras' symmetric band
  |i - j| < W. Neither builds a (T, S) mask: tileattn skips hidden blocks.
- ``output_shape`` an int or a tuple; Keras' initializers by name.
- Weights for another head split are refused (``ShapeError`` naming
  ``weights[i]``), not loaded into a different function.

Differences from Keras: a query row that sees no key gives zeros (Keras
gives zeros when it returns scores or applies dropout, the mean of the
values otherwise); dropout (``training=True``) draws other masks than
Keras, and the returned scores are then the dropped-out weights (Keras
returns them before dropout); an explicit ``query_mask`` is applied
(MultiHeadAttention in Keras 3.15 ignores one passed by hand); regularizers,
constraints and ``flash_attention`` are accepted and have no effect.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from .._errors import ShapeError
from ._keras_layer import KerasAttention

__all__ = ["GroupQueryAttention", "GroupedQueryAttention", "MultiHeadAttention"]


class MultiHeadAttention(KerasAttention):
    """``keras.layers.MultiHeadAttention`` (Keras 3.15) on NumPy arrays.

    Parameters
    ----------
    num_heads, key_dim : int
        Heads, and the query/key size per head.
    value_dim : int, optional
        Value size per head; default key_dim.
    dropout : float in [0, 1)
        On the attention weights, only with ``training=True``.
    use_bias : bool
    output_shape : int or tuple of int, optional
        The output's trailing shape; default the query's last axis.
    attention_axes : int or tuple of int, optional
        The axes attended over (jointly), in increasing order; default all
        axes between the batch and the features.
    sliding_window : int, optional
        Keras' symmetric band: query i sees key j iff |i - j| < W (with
        ``use_causal_mask``: i - W < j <= i).

    Keyword-only options (Keras also takes them by position, after
    sliding_window and flash_attention; an unknown name raises
    InvalidParameterError):

    use_gate : bool
        Keras' gated attention: the heads' output is multiplied by
        sigmoid(query @ gate kernel + gate bias) before the output projection.
    kernel_initializer, bias_initializer : str, dict or callable
        Keras' names (``glorot_uniform``, ``he_normal``, ``zeros``,
        ``random_normal``...; fans as Keras computes them for these kernels),
        serialised initializers, or ``fn(shape, dtype)``.
    seed : int, optional
        Seeds the initial weights and the dropout masks.
    dtype : float32 (default) or float64, or a Keras dtype policy config
    name : str, optional
    flash_attention, kernel_regularizer, bias_regularizer,
    activity_regularizer, kernel_constraint, bias_constraint
        Accepted, without effect (tileattn always computes tile by tile and
        can still return scores; the others act in Keras' training).

    The weights are created at the first call, or by ``build``; ``module``
    is then the ``tileattn.MultiHeadAttention`` that holds them.
    """

    def __init__(self, num_heads: int, key_dim: int, value_dim: Optional[int] = None,
                 dropout: float = 0.0, use_bias: bool = True, output_shape: Any = None,
                 attention_axes: Any = None, sliding_window: Optional[int] = None,
                 **options: Any) -> None:
        super().__init__((num_heads, num_heads, key_dim, value_dim),
                         ("num_heads", "num_heads", "key_dim"),
                         {"dropout": dropout, "use_bias": use_bias, "output_shape": output_shape,
                          "attention_axes": attention_axes, "sliding_window": sliding_window},
                         options)

    def get_config(self) -> Dict[str, Any]:
        """The constructor arguments, as Keras' ``get_config`` names them."""
        return {"num_heads": self.num_heads, "key_dim": self.key_dim,
                "value_dim": self.value_dim, "output_shape": self.output_shape,
                "attention_axes": self.attention_axes, **self._shared_config()}


class GroupQueryAttention(KerasAttention):
    """``keras.layers.GroupQueryAttention`` (Keras 3.15) on NumPy arrays.

    Query head h uses key/value head ``h // (num_query_heads //
    num_key_value_heads)``, as Keras' ``ops.repeat`` of the key/value heads
    gives (tileattn reads them in place instead of repeating them). Values
    have ``head_dim`` per head and the output has the query's features.
    Inputs are (B, T, features). The other parameters are
    ``MultiHeadAttention``'s.
    """

    def __init__(self, head_dim: int, num_query_heads: int, num_key_value_heads: int,
                 dropout: float = 0.0, use_bias: bool = True,
                 sliding_window: Optional[int] = None, **options: Any) -> None:
        super().__init__((num_query_heads, num_key_value_heads, head_dim, head_dim),
                         ("num_query_heads", "num_key_value_heads", "head_dim"),
                         {"dropout": dropout, "use_bias": use_bias,
                          "sliding_window": sliding_window}, options)

    def _check_rank(self, rank: int) -> None:
        if rank != 3:
            raise ShapeError(f"query: GroupQueryAttention takes (batch, positions, features) "
                             f"inputs, got rank {rank}")

    def get_config(self) -> Dict[str, Any]:
        """The constructor arguments, as Keras' ``get_config`` names them."""
        return {"head_dim": self.key_dim, "num_query_heads": self.num_heads,
                "num_key_value_heads": self.num_kv_heads, **self._shared_config()}


# Keras' class name (keras.layers exports it as GroupQueryAttention).
GroupedQueryAttention = GroupQueryAttention
