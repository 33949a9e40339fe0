"""Transformer encoder blocks: ``FeedForward``, ``TransformerEncoderLayer`` and
``TransformerEncoder``, laid out (and named) as PyTorch's modules so that
their state dicts move across with ``load_state_dict``.
"""

from __future__ import annotations

import numbers
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import numpy as np

from ._errors import DTypeError, InvalidParameterError, ShapeError
from .activations import activation_, activation_backward, check_activation
from .attention import MultiHeadAttention
from ._padding import RealTokens, padding_rows, scatter_rows
from .functional import Window, _window_bounds
from .linear import Linear, as_2d_rows, grad_input
from .module import Module
from .norm import LayerNorm

_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def check_dropout(value: Any) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) \
            or not 0.0 <= float(value) < 1.0:
        raise InvalidParameterError(f"dropout: expected a number in [0, 1), got {value!r}")
    return float(value)


def check_seed(value: Any) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < 0:
        raise InvalidParameterError(f"seed: expected a non-negative int, got {value!r}")
    return int(value)


def check_pos_int(name: str, value: Any) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < 1:
        raise InvalidParameterError(f"{name}: expected a positive int, got {value!r}")
    return int(value)


def check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise InvalidParameterError(f"{name}: expected a bool, got {value!r}")
    return bool(value)


def dropout_(x: np.ndarray, p: float, rng: np.random.Generator) -> np.ndarray:
    """Inverted dropout in place: zero each element with probability p, scale
    the rest by 1 / (1 - p). Returns x."""
    if p > 0.0:
        keep = rng.random(x.shape, dtype=np.float32 if x.dtype == np.float32 else np.float64) >= p
        x *= keep
        x *= x.dtype.type(1.0 / (1.0 - p))
    return x


def dropout_keep_(x: np.ndarray, p: float, rng: np.random.Generator) -> Optional[np.ndarray]:
    """``dropout_(x, p, rng)`` (the same draws, the same result) that returns
    the bool keep mask for the backward (None when p == 0)."""
    if p <= 0.0:
        return None
    keep = rng.random(x.shape, dtype=np.float32 if x.dtype == np.float32 else np.float64) >= p
    x *= keep
    x *= x.dtype.type(1.0 / (1.0 - p))
    return keep


def dropout_backward(g: np.ndarray, keep: Optional[np.ndarray], p: float) -> np.ndarray:
    """dL/dx of inverted dropout from dL/dy: g * keep / (1 - p) (g when p == 0)."""
    if keep is None:
        return g
    out: np.ndarray = g * keep
    out *= out.dtype.type(1.0 / (1.0 - p))
    return out


def tokens_input(x: Any, name: str, d_model: int) -> np.ndarray:
    """A (B, L, d_model) or (L, d_model) float array (not yet cast)."""
    a = x if isinstance(x, np.ndarray) else np.asarray(x)
    if a.dtype not in _FLOATS:
        raise DTypeError(f"{name}: expected float16, float32 or float64, got {a.dtype} "
                         f"with shape {a.shape}")
    if a.ndim not in (2, 3) or a.shape[-1] != d_model:
        raise ShapeError(f"{name}: expected (B, L, {d_model}) or unbatched (L, {d_model}), "
                         f"got shape {a.shape}")
    return a


def layer_norm_(x: np.ndarray, norm: LayerNorm) -> np.ndarray:
    """``norm(x)`` computed in place in x (C-contiguous, the layer's dtype,
    owned by the caller): the row means by one matrix-vector product, the
    variances by one einsum, then three in-place passes; fewer passes and
    temporaries than ``LayerNorm.forward``, same formula. Use the returned
    array (x itself unless x was not C-contiguous)."""
    if not x.flags.c_contiguous:
        x = np.ascontiguousarray(x)
    rows = as_2d_rows(x)
    _normalize_rows_(rows, norm.eps)
    rows *= norm.weight
    if norm.bias is not None:
        rows += norm.bias
    return x


def _normalize_rows_(rows: np.ndarray, eps: float) -> np.ndarray:
    """rows (N, E) -> (rows - mean) / std in place; returns 1/std (N,). The
    arithmetic both layer-norm forwards share, so they agree bitwise."""
    e = rows.shape[1]
    mean = rows @ np.full(e, 1.0 / e, rows.dtype)
    rows -= mean[:, None]
    inv: np.ndarray = np.einsum("ij,ij->i", rows, rows)
    inv *= rows.dtype.type(1.0 / e)
    inv += rows.dtype.type(eps)
    np.sqrt(inv, out=inv)
    np.divide(rows.dtype.type(1.0), inv, out=inv)
    rows *= inv[:, None]
    return inv


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


class FeedForward(Module):
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

    Parameters (arrays)
    -------------------
    linear1.weight (dim_feedforward, d_model), linear2.weight
    (d_model, dim_feedforward), and their ``.bias`` when ``bias``.
    """

    def __init__(self, d_model: int, dim_feedforward: int = 2048, activation: str = "relu",
                 dropout: float = 0.0, bias: bool = True, dtype: Any = np.float32,
                 seed: Optional[int] = None) -> None:
        super().__init__(dtype)
        self.d_model = check_pos_int("d_model", d_model)
        self.dim_feedforward = check_pos_int("dim_feedforward", dim_feedforward)
        self.activation = check_activation(activation)
        self.dropout = check_dropout(dropout)
        check_flag("bias", bias)
        self.seed = check_seed(seed)
        init_seq, drop_seq = np.random.SeedSequence(self.seed).spawn(2)
        rng = np.random.default_rng(init_seq)
        self._dropout_rng = np.random.default_rng(drop_seq)
        self.linear1 = Linear(self.d_model, self.dim_feedforward, bias, self.dtype, rng)
        self.linear2 = Linear(self.dim_feedforward, self.d_model, bias, self.dtype, rng)

    def forward(self, x: Any, *, training: bool = False) -> np.ndarray:
        """x (..., d_model) -> (..., d_model), in x's dtype."""
        a = x if isinstance(x, np.ndarray) else np.asarray(x)
        if a.dtype not in _FLOATS:
            raise DTypeError(f"x: expected float16, float32 or float64, got {a.dtype}")
        if a.ndim < 1 or a.shape[-1] != self.d_model:
            raise ShapeError(f"x: expected last axis {self.d_model} (d_model), got shape {a.shape}")
        train = check_flag("training", training)
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
                "seed": self.seed}

    def extra_repr(self) -> str:
        return f"{self.d_model}, {self.dim_feedforward}, activation={self.activation!r}"


def feed_forward(x: np.ndarray, linear1: Linear, linear2: Linear, activation: str,
                 p: float, rng: np.random.Generator) -> np.ndarray:
    """The feed-forward block on x (..., E) of the layers' dtype. The hidden
    (N, F) array, the largest of a transformer layer, is made once and then
    updated in place (bias and activation in one chunked pass, dropout)."""
    rows = as_2d_rows(x)
    h = rows @ linear1.weight.T
    activation_(activation, h, linear1.bias)
    dropout_(h, p, rng)
    y: np.ndarray = h @ linear2.weight.T
    if linear2.bias is not None:
        y += linear2.bias
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


# (dropout1's mask, dropout2's, the feed-forward block's state, p)
LayerSaved = Tuple[Optional[np.ndarray], Optional[np.ndarray], FFSaved, float]


class TransformerEncoderLayer(Module):
    """Self-attention and a feed-forward block, each in a residual branch
    (Vaswani et al., 2017), as PyTorch's ``nn.TransformerEncoderLayer``
    (batch_first=True).

    Post-norm (``norm_first=False``, the original and BERT's)::

        x = norm1(x + dropout1(self_attn(x)))
        x = norm2(x + dropout2(linear2(dropout(activation(linear1(x))))))

    Pre-norm (``norm_first=True``)::

        x = x + dropout1(self_attn(norm1(x)))
        x = x + dropout2(linear2(dropout(activation(linear1(norm2(x))))))

    Parameters
    ----------
    d_model : int
        Features E of the tokens.
    nhead : int
        Query heads.
    dim_feedforward : int
        Hidden features of the feed-forward block.
    dropout : float in [0, 1)
        Used for the attention weights and the three dropouts above, only
        in calls with ``training=True``.
    activation : "relu", "gelu" (exact, with erf), "gelu_tanh" or "silu"
    layer_norm_eps : float
    norm_first : bool
    bias : bool
        Biases of the projections, the linear layers and the LayerNorms.
    num_kv_heads : int, optional
        Grouped-query attention when < nhead.
    head_dim : int, optional
        Default d_model // nhead.
    rope, rope_theta, qk_norm
        As in ``MultiHeadAttention``.
    window : int W or (left, right), optional
        Sliding-window attention in every call (a call may pass its own).
    dtype : float32 or float64
    seed : int, optional
        Seeds the initial weights and the dropout masks.

    Parameters (arrays, PyTorch's names)
    ------------------------------------
    self_attn.{q,k,v,out}_proj.weight/bias, linear1.weight/bias,
    linear2.weight/bias, norm1.weight/bias, norm2.weight/bias.
    ``load_state_dict`` also takes PyTorch's ``self_attn.in_proj_weight`` /
    ``self_attn.in_proj_bias``.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048,
                 dropout: float = 0.1, activation: str = "relu", layer_norm_eps: float = 1e-5,
                 norm_first: bool = False, bias: bool = True, *,
                 num_kv_heads: Optional[int] = None, head_dim: Optional[int] = None,
                 rope: bool = False, rope_theta: float = 10000.0, qk_norm: bool = False,
                 window: Window = None, dtype: Any = np.float32,
                 seed: Optional[int] = None) -> None:
        super().__init__(dtype)
        self.d_model = check_pos_int("d_model", d_model)
        self.nhead = check_pos_int("nhead", nhead)
        self.dim_feedforward = check_pos_int("dim_feedforward", dim_feedforward)
        self.dropout = check_dropout(dropout)
        self.activation = check_activation(activation)
        self.norm_first = check_flag("norm_first", norm_first)
        check_flag("bias", bias)
        if window is not None:
            _window_bounds(window, False)       # validate now, not at the first call
        self.window: Window = (int(window[0]), int(window[1])) \
            if isinstance(window, (tuple, list)) else window
        self.seed = check_seed(seed)
        attn_seq, init_seq, drop_seq = np.random.SeedSequence(self.seed).spawn(3)
        rng = np.random.default_rng(init_seq)
        self._dropout_rng = np.random.default_rng(drop_seq)
        self.self_attn = MultiHeadAttention(
            self.d_model, self.nhead, num_kv_heads=num_kv_heads, head_dim=head_dim,
            output_dim=self.d_model, bias=bias, dropout=self.dropout, rope=rope,
            rope_theta=rope_theta, qk_norm=qk_norm, dtype=self.dtype,
            seed=int(attn_seq.generate_state(1, np.uint64)[0] >> np.uint64(1)))
        self.linear1 = Linear(self.d_model, self.dim_feedforward, bias, self.dtype, rng)
        self.linear2 = Linear(self.dim_feedforward, self.d_model, bias, self.dtype, rng)
        self.norm1 = LayerNorm(self.d_model, layer_norm_eps, bias, self.dtype)
        self.norm2 = LayerNorm(self.d_model, layer_norm_eps, bias, self.dtype)

    def reseed(self, seed: Optional[int]) -> None:
        """Restart the dropout masks (of this layer and its attention) from ``seed``."""
        s = check_seed(seed)
        attn_seq, drop_seq = np.random.SeedSequence(s).spawn(2)
        self._dropout_rng = np.random.default_rng(drop_seq)
        self.self_attn.reseed(attn_seq)

    def forward(self, src: Any, *, attn_mask: Any = None, key_padding_mask: Any = None,
                is_causal: bool = False, window: Window = None,
                training: bool = False) -> np.ndarray:
        """Encode ``src``.

        Parameters
        ----------
        src : (B, L, d_model) or unbatched (L, d_model)
        attn_mask : bool or float, broadcastable to (B, nhead, L, L), optional
            Bool True = may attend; a float mask is added to the scores.
        key_padding_mask : bool (B, L), optional
            True = real token (PyTorch's ``src_key_padding_mask`` is the
            opposite: pass ``~mask``).
        is_causal : bool
        window : int W or (left, right), optional
            Overrides the layer's window for this call.
        training : bool
            Apply dropout (only then), and keep the activations for
            ``backward`` (inference calls keep nothing).

        Returns
        -------
        (B, L, d_model) (unbatched: (L, d_model)), src's dtype.

        In inference, with a (B, L) bool ``key_padding_mask`` (and no
        ``attn_mask``) only the real tokens are computed and the padded
        positions output zeros, as PyTorch's nested-tensor path does; the
        real positions are the same either way. Training forwards compute
        every position (as PyTorch in training mode) so that ``backward``
        sees the whole graph.
        """
        x_in = tokens_input(src, "src", self.d_model)
        train = check_flag("training", training)
        p = self.dropout if train else 0.0
        x = x_in.astype(self.dtype, copy=False)
        win = self.window if window is None else window
        attn_kw: Dict[str, Any] = {
            "attn_mask": attn_mask, "key_padding_mask": key_padding_mask,
            "is_causal": is_causal, "window": win, "training": train}
        if train:
            # The plain path (every position computed, as PyTorch in training
            # mode), keeping what backward needs.
            out_t, parts = self._forward_train(x, attn_kw, p)
            self._save((parts, x_in.dtype))
            return out_t.astype(x_in.dtype, copy=False)
        real = padding_rows(x, attn_mask, key_padding_mask, p, [self])
        if real is not None:
            rows = self.forward_rows(as_2d_rows(x)[real[1]], real, is_causal, win)
            return scatter_rows(rows, real, x.shape, x_in.dtype)
        if self.norm_first:
            a = self.self_attn(layer_norm_(np.array(x, order="C"), self.norm1), **attn_kw)
            x = x + dropout_(a, p, self._dropout_rng)
            y = feed_forward(layer_norm_(x.copy(), self.norm2), self.linear1, self.linear2,
                             self.activation, p, self._dropout_rng)
            x += dropout_(y, p, self._dropout_rng)
        else:
            # Post-norm: the residual sums are fresh arrays, normalised in place.
            a = np.ascontiguousarray(self.self_attn(x, **attn_kw))
            dropout_(a, p, self._dropout_rng)
            a += x
            x = layer_norm_(a, self.norm1)
            y = dropout_(feed_forward(x, self.linear1, self.linear2, self.activation, p,
                                      self._dropout_rng), p, self._dropout_rng)
            y += x
            x = layer_norm_(y, self.norm2)
        out: np.ndarray = x.astype(x_in.dtype, copy=False)
        return out

    def _forward_train(self, x: np.ndarray, attn_kw: Dict[str, Any], p: float
                       ) -> Tuple[np.ndarray, "LayerSaved"]:
        """The forward above (the same arithmetic and dropout draws) with the
        children keeping their activations; returns the output and the
        layer's own part (dropout masks, the feed-forward block's)."""
        rng = self._dropout_rng
        if self.norm_first:
            a = np.ascontiguousarray(self.self_attn(layer_norm_train(x, self.norm1), **attn_kw))
            keep1 = dropout_keep_(a, p, rng)
            x1 = x + a
            y, ff = feed_forward_train(layer_norm_train(x1, self.norm2), self.linear1,
                                       self.linear2, self.activation, p, rng)
            keep2 = dropout_keep_(y, p, rng)
            x1 += y
            out = x1
        else:
            a = np.ascontiguousarray(self.self_attn(x, **attn_kw))
            keep1 = dropout_keep_(a, p, rng)
            a += x
            x1 = layer_norm_train(a, self.norm1)
            y, ff = feed_forward_train(x1, self.linear1, self.linear2, self.activation, p, rng)
            keep2 = dropout_keep_(y, p, rng)
            y += x1
            out = layer_norm_train(y, self.norm2)
        return out, (keep1, keep2, ff, p)

    def backward(self, grad_output: Any) -> np.ndarray:
        """Gradient of ``src`` (its shape and dtype) from dL/d(output) of the
        last ``training=True`` forward; adds every parameter's gradient into
        ``grads`` (the attention's through ``self_attn.backward``)."""
        (keep1, keep2, ff, p), dtype = self._take_saved()
        g = grad_input(grad_output, ff[0].shape[:-1] + (self.d_model,), self.dtype)

        def ffn_back(gy: np.ndarray) -> np.ndarray:
            return feed_forward_backward(ff, gy, self.linear1, self.linear2)
        if self.norm_first:
            # out = x1 + drop2(ffn(norm2(x1))), x1 = x + drop1(attn(norm1(x)))
            gx1 = g + self.norm2.backward(ffn_back(dropout_backward(g, keep2, p)))
            ga = self.self_attn.backward(dropout_backward(gx1, keep1, p))
            gx = gx1 + self.norm1.backward(ga)
        else:
            # out = norm2(x1 + drop2(ffn(x1))), x1 = norm1(x + drop1(attn(x)))
            gs = self.norm2.backward(g)
            gx1 = gs + ffn_back(dropout_backward(gs, keep2, p))
            gs1 = self.norm1.backward(gx1)
            gx = gs1 + self.self_attn.backward(dropout_backward(gs1, keep1, p))
        out: np.ndarray = gx.astype(dtype, copy=False)
        return out

    def unpaddable(self) -> bool:
        """Whether ``forward_rows`` applies: Q/K/V packed in one matrix."""
        return bool(self.self_attn.packed)

    def forward_rows(self, rows: np.ndarray, real: RealTokens, is_causal: bool,
                     window: Window) -> np.ndarray:
        """Inference on the real tokens only.

        rows (N, E) are the real tokens of a (B, L) batch; ``real`` is
        (mask, their flat positions, the padding's) from ``padding_rows``.
        Everything position-wise (the projections, the feed-forward block,
        the norms: most of the work) runs on the N rows; Q/K/V are scattered
        into a zeroed (B, L) layout for the QK-norms, RoPE (positions are
        those of the layout) and the attention, and its output gathered back.
        Returns (N, E).
        """
        h = layer_norm_(rows.copy(), self.norm1) if self.norm_first else rows
        att = self.self_attn.forward_rows(h, real, is_causal=is_causal, window=window)
        if self.norm_first:
            att += rows
            y = feed_forward(layer_norm_(att.copy(), self.norm2), self.linear1, self.linear2,
                             self.activation, 0.0, self._dropout_rng)
            y += att
            return y
        att += rows
        x = layer_norm_(att, self.norm1)
        y = feed_forward(x, self.linear1, self.linear2, self.activation, 0.0, self._dropout_rng)
        y += x
        return layer_norm_(y, self.norm2)

    def get_config(self) -> Dict[str, Any]:
        a = self.self_attn
        return {
            "d_model": self.d_model, "nhead": self.nhead,
            "dim_feedforward": self.dim_feedforward, "dropout": self.dropout,
            "activation": self.activation, "layer_norm_eps": self.norm1.eps,
            "norm_first": self.norm_first, "bias": self.linear1.bias is not None,
            "num_kv_heads": a.num_kv_heads, "head_dim": a.head_dim, "rope": a.rope,
            "rope_theta": a.rope_theta, "qk_norm": a.qk_norm,
            "window": list(self.window) if isinstance(self.window, tuple) else self.window,
            "dtype": self.dtype.name, "seed": self.seed,
        }

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, nhead={self.nhead}, "
                f"dim_feedforward={self.dim_feedforward}, activation={self.activation!r}, "
                f"norm_first={self.norm_first}")


class ModuleList(Module):
    """Child modules named ``0``, ``1``, ... (PyTorch's ``layers.N.`` keys)."""

    def __init__(self, modules: List[Module], dtype: Any = np.float32) -> None:
        super().__init__(dtype)
        for i, m in enumerate(modules):
            self.add_module(str(i), m)

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter([m for m in self._modules.values() if m is not None])

    def __getitem__(self, i: int) -> Module:
        m: Optional[Module] = self._modules[str(range(len(self))[i])]
        if m is None:
            raise IndexError(i)
        return m


class TransformerEncoder(Module):
    """A stack of ``num_layers`` copies of ``layer``, then an optional ``norm``,
    as PyTorch's ``nn.TransformerEncoder`` (state-dict keys ``layers.N.…`` and
    ``norm.…``).

    Parameters
    ----------
    layer : TransformerEncoderLayer, or its ``get_config()`` dict
        The template: each copy starts with its weights. Each copy's dropout
        masks come from its own stream (derived from the layer's seed).
    num_layers : int
    norm : LayerNorm, or its ``get_config()`` dict, optional
        Applied to the last layer's output (pre-norm stacks need it).
    """

    def __init__(self, layer: Union[TransformerEncoderLayer, Mapping[str, Any]],
                 num_layers: int, norm: Union[LayerNorm, Mapping[str, Any], None] = None) -> None:
        if isinstance(layer, Mapping):
            layer = TransformerEncoderLayer(**layer)
        if not isinstance(layer, TransformerEncoderLayer):
            raise InvalidParameterError(
                f"layer: expected a TransformerEncoderLayer, got {type(layer).__name__}")
        super().__init__(layer.dtype)
        self.num_layers = check_pos_int("num_layers", num_layers)
        template = layer.get_config()
        weights = layer.state_dict()
        copies: List[Module] = []
        for i in range(self.num_layers):
            c = TransformerEncoderLayer(**template)
            c.load_state_dict(weights)
            base = layer.seed
            c.reseed(None if base is None
                     else int(np.random.SeedSequence([base, i]).generate_state(1)[0]))
            copies.append(c)
        self._template = template
        self.layers = ModuleList(copies, self.dtype)
        if isinstance(norm, Mapping):
            norm = LayerNorm(**norm)
        if norm is not None and not isinstance(norm, LayerNorm):
            raise InvalidParameterError(f"norm: expected a LayerNorm or None, got {type(norm).__name__}")
        if norm is not None and (norm.normalized_shape != layer.d_model or norm.dtype != self.dtype):
            raise ShapeError(f"norm: expected LayerNorm({layer.d_model}) of dtype {self.dtype}, "
                             f"got LayerNorm({norm.normalized_shape}) of dtype {norm.dtype}")
        self.add_module("norm", norm)

    def forward(self, src: Any, *, attn_mask: Any = None, key_padding_mask: Any = None,
                is_causal: bool = False, window: Window = None,
                training: bool = False) -> np.ndarray:
        """Run every layer (same arguments as ``TransformerEncoderLayer``), then the norm."""
        x_in = tokens_input(src, "src", self._template["d_model"])
        x = x_in.astype(self.dtype, copy=False)
        layers: List[TransformerEncoderLayer] = list(self.layers)  # type: ignore[arg-type]
        train = check_flag("training", training)
        p = self._template["dropout"] if train else 0.0
        real = None if train else padding_rows(x, attn_mask, key_padding_mask, p, layers)
        if real is not None:
            # Gather the real tokens once for the whole stack.
            rows = as_2d_rows(x)[real[1]]
            for lay in layers:
                rows = lay.forward_rows(rows, real, is_causal,
                                        lay.window if window is None else window)
            norm = self._modules.get("norm")
            if norm is not None:
                rows = layer_norm_(np.ascontiguousarray(rows), norm)
            return scatter_rows(rows, real, x.shape, x_in.dtype)
        for layer in self.layers:
            x = layer(x, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                      is_causal=is_causal, window=window, training=training)
        norm = self._modules.get("norm")
        if norm is not None:
            x = norm(x, training=train)
        if train:
            self._save(x_in.dtype)
        return x.astype(x_in.dtype, copy=False)

    def backward(self, grad_output: Any) -> np.ndarray:
        """Gradient of ``src`` from dL/d(output) of the last ``training=True``
        forward, through the norm and the layers in reverse; adds every
        parameter's gradient into ``grads``."""
        dtype = self._take_saved()
        g = grad_output
        norm = self._modules.get("norm")
        if norm is not None:
            g = norm.backward(g)
        for layer in reversed(list(self.layers)):
            g = layer.backward(g)
        out: np.ndarray = np.asarray(g).astype(dtype, copy=False)
        return out

    def get_config(self) -> Dict[str, Any]:
        norm = self._modules.get("norm")
        return {"layer": dict(self._template), "num_layers": self.num_layers,
                "norm": None if norm is None else norm.get_config()}

    def extra_repr(self) -> str:
        return f"num_layers={self.num_layers}"


__all__: Tuple[str, ...] = ("FeedForward", "TransformerEncoderLayer", "TransformerEncoder",
                            "ModuleList")
