"""Transformer encoder blocks: ``TransformerEncoderLayer`` and
``TransformerEncoder``, laid out (and named) as PyTorch's modules so that
their state dicts move across with ``load_state_dict``. (``FeedForward``
lives in feedforward.py and is importable from here too.)
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np

from . import _validate as check
from ._errors import InvalidParameterError, ShapeError
from ._padding import RealTokens, padding_rows, scatter_rows, take_rows
from .activations import check_activation
from .attention import MultiHeadAttention
from ._call_checks import Window, window_bounds
from .dropout import dropout_backward, dropout_keep_
from .feedforward import (FeedForward, FFSaved, feed_forward, feed_forward_backward,
                          feed_forward_train)
from .linear import Linear, as_2d_rows, grad_input
from ._compute_dtype import ComputeDtypeOption
from .module import Module, ModuleList
from .norm import LayerNorm, layer_norm_, layer_norm_train

# lstm.py still imports its argument checks from here under these names.
check_dropout, check_seed = check.dropout_rate, check.seed
check_pos_int, check_flag = check.positive_int, check.flag

def tokens_input(x: Any, name: str, d_model: int) -> np.ndarray:
    """A (B, L, d_model) or (L, d_model) float array (not yet cast)."""
    a = check.float_array(x, name)
    if a.ndim not in (2, 3) or a.shape[-1] != d_model:
        raise ShapeError(f"{name}: expected (B, L, {d_model}) or unbatched (L, {d_model}), "
                         f"got shape {a.shape}")
    return a


# (dropout1's mask, dropout2's, the feed-forward block's state, p)
LayerSaved = Tuple[Optional[np.ndarray], Optional[np.ndarray], FFSaved, float]


class LayerRun:
    """What differs between an inference and a training forward of an
    encoder layer (``TransformerEncoderLayer._layer``): training keeps the
    norms' statistics, the dropout masks and the feed-forward block's
    activations for the backward; inference normalises in place."""

    def __init__(self, train: bool, p: float, rng: np.random.Generator) -> None:
        self.train, self.p, self.rng = train, p, rng
        self.keeps: List[Optional[np.ndarray]] = []
        self.ff: Optional[FFSaved] = None

    def norm(self, x: np.ndarray, norm: LayerNorm, *, owned: bool) -> np.ndarray:
        """``norm(x)``; in inference x itself is overwritten when ``owned``."""
        if self.train:
            return layer_norm_train(x, norm)
        return layer_norm_(x if owned else np.array(x, order="C"), norm)

    def dropout(self, y: np.ndarray) -> np.ndarray:
        """Dropout of y in place (nothing drawn when p == 0); returns y."""
        self.keeps.append(dropout_keep_(y, self.p, self.rng))
        return y

    def feed_forward(self, layer: "TransformerEncoderLayer", x: np.ndarray) -> np.ndarray:
        if not self.train:
            return feed_forward(x, layer.linear1, layer.linear2, layer.activation, self.p,
                                self.rng)
        y, self.ff = feed_forward_train(x, layer.linear1, layer.linear2, layer.activation,
                                        self.p, self.rng)
        return y

    def saved(self) -> LayerSaved:
        assert self.ff is not None
        keep1, keep2 = self.keeps
        return keep1, keep2, self.ff, self.p


class TransformerEncoderLayer(ComputeDtypeOption, Module):
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
    compute_dtype : None or "bfloat16"
        "bfloat16" (float32 layers): every product (attention and
        feed-forward) on bf16 operands with float32 sums, as in
        ``MultiHeadAttention``; norms, activations and residuals float32.

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
                 seed: Optional[int] = None, compute_dtype: Any = None) -> None:
        super().__init__(dtype)
        compute = self._set_compute_dtype(compute_dtype, self.dtype)
        self.d_model = check.positive_int("d_model", d_model)
        self.nhead = check.positive_int("nhead", nhead)
        if head_dim is None and self.d_model % self.nhead:
            # (MultiHeadAttention would say embed_dim and num_heads)
            raise InvalidParameterError(f"nhead: d_model ({self.d_model}) must be divisible by "
                                        f"nhead ({self.nhead}), or pass head_dim")
        self.dim_feedforward = check.positive_int("dim_feedforward", dim_feedforward)
        self.dropout = check.dropout_rate(dropout)
        self.activation = check_activation(activation)
        check.positive_real("layer_norm_eps", layer_norm_eps)  # (LayerNorm would say "eps")
        self.norm_first = check.flag("norm_first", norm_first)
        check.flag("bias", bias)
        if window is not None:
            window_bounds(window, False)       # validate now, not at the first call
        self.window: Window = (int(window[0]), int(window[1])) \
            if isinstance(window, (tuple, list)) else window
        self.seed = check.seed(seed)
        attn_seq, init_seq, drop_seq = np.random.SeedSequence(self.seed).spawn(3)
        rng = np.random.default_rng(init_seq)
        self._dropout_rng = np.random.default_rng(drop_seq)
        self.self_attn = MultiHeadAttention(
            self.d_model, self.nhead, num_kv_heads=num_kv_heads, head_dim=head_dim,
            output_dim=self.d_model, bias=bias, dropout=self.dropout, rope=rope,
            rope_theta=rope_theta, qk_norm=qk_norm, dtype=self.dtype,
            seed=int(attn_seq.generate_state(1, np.uint64)[0] >> np.uint64(1)),
            compute_dtype=compute)
        self.linear1 = Linear(self.d_model, self.dim_feedforward, bias, self.dtype, rng, compute)
        self.linear2 = Linear(self.dim_feedforward, self.d_model, bias, self.dtype, rng, compute)
        self.norm1 = LayerNorm(self.d_model, layer_norm_eps, bias, self.dtype)
        self.norm2 = LayerNorm(self.d_model, layer_norm_eps, bias, self.dtype)

    def reseed(self, seed: Optional[int]) -> None:
        """Restart the dropout masks (of this layer and its attention) from ``seed``."""
        s = check.seed(seed)
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
        train = check.flag("training", training)
        x = x_in.astype(self.dtype, copy=False)
        win = self.window if window is None else window
        real = None if train else padding_rows(x, attn_mask, key_padding_mask, 0.0, [self])
        if real is not None:
            rows = self.forward_rows(take_rows(as_2d_rows(x), real[1]), real, is_causal, win)
            return scatter_rows(rows, real, x.shape, x_in.dtype)

        def attend(h: np.ndarray) -> np.ndarray:
            # A fresh C-contiguous array: the residual sums are formed in it.
            return np.ascontiguousarray(self.self_attn(
                h, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                is_causal=is_causal, window=win, training=train))
        run = LayerRun(train, self.dropout if train else 0.0, self._dropout_rng)
        out = self._layer(x, attend, run)
        if train:
            self._save((run.saved(), x_in.dtype))
        result: np.ndarray = out.astype(x_in.dtype, copy=False)
        return result

    def _layer(self, x: np.ndarray, attend: Callable[[np.ndarray], np.ndarray],
               run: "LayerRun") -> np.ndarray:
        """The layer's arithmetic, for every way it runs: ``attend`` is the
        self-attention (of all positions, or of the real tokens' rows) and
        ``run`` the norms, dropouts and feed-forward block of an inference or
        a training forward. x (..., E) of the layer's dtype is not modified."""
        if self.norm_first:
            x1: np.ndarray = x + run.dropout(attend(run.norm(x, self.norm1, owned=False)))
            x1 += run.dropout(run.feed_forward(self, run.norm(x1, self.norm2, owned=False)))
            return x1
        # Post-norm: the residual sums are fresh arrays, normalised in place.
        a = run.dropout(attend(x))
        a += x
        x1 = run.norm(a, self.norm1, owned=True)
        y = run.dropout(run.feed_forward(self, x1))
        y += x1
        return run.norm(y, self.norm2, owned=True)

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
        def attend(h: np.ndarray) -> np.ndarray:
            return self.self_attn.forward_rows(h, real, is_causal=is_causal, window=window)
        return self._layer(rows, attend, LayerRun(False, 0.0, self._dropout_rng))

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
            "compute_dtype": self.compute_dtype_option,
        }

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, nhead={self.nhead}, "
                f"dim_feedforward={self.dim_feedforward}, activation={self.activation!r}, "
                f"norm_first={self.norm_first}" + self._compute_dtype_repr())


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
        self.num_layers = check.positive_int("num_layers", num_layers)
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
        train = check.flag("training", training)
        p = self._template["dropout"] if train else 0.0
        real = None if train else padding_rows(x, attn_mask, key_padding_mask, p, layers)
        if real is not None:
            # Gather the real tokens once for the whole stack.
            rows = take_rows(as_2d_rows(x), real[1])
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
