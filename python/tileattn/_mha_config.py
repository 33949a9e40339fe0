"""MultiHeadAttention's constructor arguments, checked and defaulted."""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple, Optional

from . import _validate as check
from ._axes import Axes, check_attention_axes
from ._errors import InvalidParameterError


class HeadSizes(NamedTuple):
    embed_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    value_dim: int
    kdim: int
    vdim: int
    output_dim: int


class Options(NamedTuple):
    in_bias: bool       # biases of the Q/K/V projections (and the QK-norms)
    out_bias: bool      # bias of the output projection
    dropout: float
    rope: bool
    rope_theta: float
    qk_norm: bool
    attention_axes: Axes
    seed: Optional[int]


def check_sizes(embed_dim: Any, num_heads: Any, num_kv_heads: Any, head_dim: Any,
                value_dim: Any, kdim: Any, vdim: Any, output_dim: Any) -> HeadSizes:
    embed = check.positive_int("embed_dim", embed_dim)
    heads = check.positive_int("num_heads", num_heads)
    kv_heads = check.optional_positive_int("num_kv_heads", num_kv_heads, heads)
    if heads % kv_heads:
        raise InvalidParameterError(
            f"num_heads ({heads}) must be divisible by num_kv_heads ({kv_heads})")
    if head_dim is None and embed % heads:
        raise InvalidParameterError(
            f"embed_dim ({embed}) must be divisible by num_heads ({heads}), or pass head_dim")
    d = check.optional_positive_int("head_dim", head_dim, embed // heads)
    return HeadSizes(embed, heads, kv_heads, d,
                     check.optional_positive_int("value_dim", value_dim, d),
                     check.optional_positive_int("kdim", kdim, embed),
                     check.optional_positive_int("vdim", vdim, embed),
                     check.optional_positive_int("output_dim", output_dim, embed))


def check_options(head_dim: int, bias: Any, dropout: Any, rope: Any, rope_theta: Any,
                  qk_norm: Any, attention_axes: Any, seed: Any) -> Options:
    if not (check.is_bool(bias) or isinstance(bias, str) and bias == "output"):
        raise InvalidParameterError(
            f"bias: expected True, False or 'output' (the output projection only), got {bias!r}")
    in_bias, out_bias = (False, True) if isinstance(bias, str) else (bool(bias), bool(bias))
    rate = check.dropout_rate(dropout)
    use_rope = check.flag("rope", rope)
    if use_rope and head_dim % 2:
        raise InvalidParameterError(
            f"rope: head_dim must be even for rotary embeddings, got head_dim={head_dim}")
    # Not check.positive_real: its message for inf/nan differs from this one.
    if check.is_bool(rope_theta) or not isinstance(rope_theta, numbers.Real) \
            or not (math.isfinite(rope_theta) and float(rope_theta) > 0):
        raise InvalidParameterError(f"rope_theta: expected a positive number, got {rope_theta!r}")
    norm = check.flag("qk_norm", qk_norm)
    axes = check_attention_axes(attention_axes)
    if use_rope and axes is not None and len(axes) > 1:
        raise InvalidParameterError(
            f"rope: positions over several attention_axes {axes} are not "
            f"defined; use one attention axis with rope")
    return Options(in_bias, out_bias, rate, use_rope, float(rope_theta), norm, axes,
                   check.seed(seed))


def bias_option(in_bias: bool, out_bias: bool) -> Any:
    """The ``bias`` argument that builds these biases (``get_config``)."""
    return "output" if out_bias and not in_bias else in_bias
