"""Ready-made sequence models (after Edifice's ``Edifice.Attention.MultiHead``).

``SlidingWindowModel``
    input projection -> + sinusoidal positions -> ``num_layers`` pre-norm
    encoder layers with causal sliding-window attention (each position sees
    the last ``window_size`` positions) -> final LayerNorm -> last position.
``HybridLSTMAttention``
    LSTM -> self-attention over its hidden states (residual, LayerNorm) ->
    last position -> optional MLP head.

Both map (B, L, embed_dim) frames to one (B, features) vector per sequence
(the state after the last frame), the shape a policy or value head takes.
They have no backward, so their own layers are called with training=False
(nothing kept), whatever their mode; ``training`` switches the dropout.
"""

from __future__ import annotations

import numbers
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import _validate as check
from ._call_checks import check_key_padding
from ._errors import DTypeError, InvalidParameterError, ShapeError
from ._validate import shape_str
from .activations import activation_, check_activation
from .attention import MultiHeadAttention
from .dropout import dropout_
from .encoder import TransformerEncoder, TransformerEncoderLayer
from .linear import Linear
from .lstm import LSTM
from ._compute_dtype import ComputeDtypeOption
from .module import Module, ModuleList
from .norm import LayerNorm
from .positional import sinusoidal_positions


def _frames(x: Any, embed_dim: int) -> np.ndarray:
    a = check.float_array(x, "x")
    if a.ndim not in (2, 3) or a.shape[-1] != embed_dim or a.shape[-2] == 0:
        raise ShapeError(f"x: expected (B, L, {embed_dim}) or unbatched (L, {embed_dim}) "
                         f"with L >= 1, got shape {a.shape}")
    return a


def _real_frames(key_padding_mask: Any, lengths: Any, b: int, length: int,
                 batched: bool) -> Optional[np.ndarray]:
    """The (B, L) bool mask of the real frames from either argument (None
    when neither is given); every sequence needs a real frame."""
    if key_padding_mask is not None and lengths is not None:
        raise InvalidParameterError("key_padding_mask, lengths: pass one of them, not both")
    if lengths is not None:
        n = np.asarray(lengths)
        if n.dtype.kind not in "iu":
            raise DTypeError(f"lengths: expected integers, got dtype {n.dtype}")
        if n.shape != ((b,) if batched else ()):
            raise ShapeError(f"lengths: expected shape {'(B,) = ' + str((b,)) if batched else '()'}"
                             f" (one length per sequence), got {shape_str(n.shape)}")
        n = n.reshape(b).astype(np.int64)
        check.entries_within(n - 1, length - 1, lambda i: (
            f"lengths: entry {i} is {int(n[i])}, expected 1 <= length <= L = {length}"))
        return np.arange(length) < n[:, None]
    if key_padding_mask is None:
        return None
    mask = np.ascontiguousarray(check_key_padding(key_padding_mask, b, length, batched))
    empty = np.flatnonzero(~mask.any(axis=1))
    if empty.size:
        raise InvalidParameterError(
            f"key_padding_mask: sequence {int(empty[0])} has no real frame (no True / nonzero "
            f"entry), so it has no last real position")
    return mask


def _last_real(rows: np.ndarray, real: Optional[np.ndarray]) -> np.ndarray:
    """(B, L, F) -> (B, F): each sequence's last real position (the last
    position without a mask; right- and left-padded batches alike)."""
    if real is None:
        return rows[:, -1]
    last = real.shape[1] - 1 - np.argmax(real[:, ::-1], axis=1)
    out: np.ndarray = rows[np.arange(rows.shape[0]), last]
    return out


def _positive_ints(**values: Any) -> Tuple[int, ...]:
    """Each keyword argument checked as a positive int, in the order given:
    the error names the first bad one, as the caller spelled it."""
    return tuple(check.positive_int(name, value) for name, value in values.items())


def _seeds(seed: Optional[int], n: int) -> List[int]:
    """n independent int seeds for the parts of a model (None stays random)."""
    ss = np.random.SeedSequence(seed)
    return [int(s) >> 1 for s in ss.generate_state(n, np.uint64)]


class _FrameEncoder(Module):
    """The Edifice models' calling convention: frames in, each sequence's
    representation at its last real frame out (or every position). A model
    supplies ``embed_dim``, ``dtype`` and ``_encode``."""

    embed_dim: int

    def forward(self, x: Any, *, key_padding_mask: Any = None, lengths: Any = None,
                return_sequence: bool = False, training: bool = False) -> np.ndarray:
        """Encode frames.

        Parameters
        ----------
        x : (B, L, embed_dim) or unbatched (L, embed_dim)
        key_padding_mask : bool or int (B, L), True / nonzero = real frame, optional
            The output is each sequence's last real position (see the
            model's notes on padding).
        lengths : int (B,) (unbatched: an int), optional
            Instead of a mask: sequence b is frames ``[0, lengths[b])``
            (right padding), 1 <= lengths[b] <= L.
        return_sequence : bool
            Return every position (B, L, output_size) instead of the last.
        training : bool
            Apply dropout (only then).

        Returns
        -------
        (B, output_size) (unbatched: (output_size,)), x's dtype: the
        representation after each sequence's last real frame.
        """
        a = _frames(x, self.embed_dim)
        train = check.flag("training", training)
        full = check.flag("return_sequence", return_sequence)
        a3 = a if a.ndim == 3 else a[None]
        real = _real_frames(key_padding_mask, lengths, a3.shape[0], a3.shape[1], a.ndim == 3)
        out = self._encode(a3.astype(self.dtype, copy=False), real, full, train)
        return np.ascontiguousarray(out if a.ndim == 3 else out[0], dtype=a.dtype)

    def _encode(self, frames: np.ndarray, real: Optional[np.ndarray], full: bool,
                training: bool) -> np.ndarray:
        """frames (B, L, embed_dim) in the model's dtype -> (B, L, out) with
        full, else (B, out) at each sequence's last real frame."""
        raise NotImplementedError


class MLPHead(ComputeDtypeOption, Module):
    """``Linear -> activation`` for each size in ``sizes`` (the last Linear too:
    Edifice's head is a stack of dense layers with an activation each).

    Parameters (arrays): ``layers.N.weight`` / ``layers.N.bias``.
    ``compute_dtype="bfloat16"``: the layers' products on bf16 operands.
    """

    def __init__(self, in_features: int, sizes: Sequence[int], activation: str = "relu",
                 dtype: Any = np.float32, seed: Optional[int] = None,
                 compute_dtype: Any = None) -> None:
        super().__init__(dtype)
        compute = self._set_compute_dtype(compute_dtype, self.dtype)
        if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence) or not sizes:
            raise InvalidParameterError(f"mlp: expected a non-empty sequence of layer sizes, "
                                        f"got {sizes!r}")
        self.in_features = check.positive_int("in_features", in_features)
        self.sizes = [check.positive_int("mlp", s) for s in sizes]
        self.activation = check_activation(activation)
        self.seed = check.seed(seed)
        rng = np.random.default_rng(seed)
        dims = [self.in_features] + self.sizes
        self.layers = ModuleList([Linear(dims[i], dims[i + 1], True, self.dtype, rng, compute)
                                  for i in range(len(self.sizes))], self.dtype)

    @property
    def out_features(self) -> int:
        return self.sizes[-1]

    def forward(self, x: np.ndarray) -> np.ndarray:
        for lin in self.layers:
            x = activation_(self.activation, np.ascontiguousarray(lin(x, training=False)))
        return x

    def get_config(self) -> Dict[str, Any]:
        return {"in_features": self.in_features, "sizes": list(self.sizes),
                "activation": self.activation, "dtype": self.dtype.name, "seed": self.seed,
                "compute_dtype": self.compute_dtype_option}


class SlidingWindowModel(ComputeDtypeOption, _FrameEncoder):
    """Stacked causal sliding-window attention over a frame sequence.

    Parameters
    ----------
    embed_dim : int
        Features of each input frame.
    window_size : int
        Each position attends to itself and the ``window_size - 1`` before it.
    num_heads, head_dim : int
        Attention heads and their size; the model width is
        ``hidden_size = num_heads * head_dim``.
    num_layers : int
        Encoder layers (pre-norm: ``x + attn(norm(x))``, ``x + ffn(norm(x))``).
    ffn_dim : int
        Hidden features of each feed-forward block (GELU).
    dropout : float in [0, 1)
        In the encoder layers, only with ``training=True``.
    hidden_size : int, optional
        Overrides ``num_heads * head_dim`` (then ``head_dim = hidden_size // num_heads``).
    dtype : float32 or float64
    seed : int, optional
        Seeds the weights and the dropout masks.
    compute_dtype : None or "bfloat16"
        Every product (input projection, attention, feed-forward) on bf16
        operands with float32 sums (``TransformerEncoderLayer``'s option).

    Parameters (arrays)
    -------------------
    ``input_proj.weight (hidden_size, embed_dim)`` (+ bias), then
    ``encoder.layers.N.…`` (PyTorch's ``nn.TransformerEncoderLayer`` names)
    and ``encoder.norm.weight`` / ``.bias``.
    """

    def __init__(self, embed_dim: int, window_size: int = 60, num_heads: int = 4,
                 head_dim: int = 64, num_layers: int = 2, ffn_dim: int = 256,
                 dropout: float = 0.1, *, hidden_size: Optional[int] = None,
                 dtype: Any = np.float32, seed: Optional[int] = None,
                 compute_dtype: Any = None) -> None:
        super().__init__(dtype)
        compute = self._set_compute_dtype(compute_dtype, self.dtype)
        (self.embed_dim, self.window_size, self.num_heads, self.head_dim, self.num_layers,
         self.ffn_dim) = _positive_ints(embed_dim=embed_dim, window_size=window_size,
                                        num_heads=num_heads, head_dim=head_dim,
                                        num_layers=num_layers, ffn_dim=ffn_dim)
        self.dropout = check.dropout_rate(dropout)
        self.seed = check.seed(seed)
        if hidden_size is None:
            self.hidden_size = self.num_heads * self.head_dim
        else:
            self.hidden_size = check.positive_int("hidden_size", hidden_size)
            if self.hidden_size % self.num_heads:
                raise InvalidParameterError(
                    f"hidden_size ({self.hidden_size}) must be divisible by num_heads "
                    f"({self.num_heads})")
            self.head_dim = self.hidden_size // self.num_heads
        self._args = {"head_dim": int(head_dim), "hidden_size": hidden_size}
        s_proj, s_enc = _seeds(self.seed, 2)
        self.input_proj = Linear(self.embed_dim, self.hidden_size, True, self.dtype,
                                 np.random.default_rng(s_proj), compute)
        layer = TransformerEncoderLayer(
            self.hidden_size, self.num_heads, self.ffn_dim, self.dropout, activation="gelu",
            norm_first=True, head_dim=self.head_dim, window=self.window_size,
            dtype=self.dtype, seed=None if self.seed is None else s_enc, compute_dtype=compute)
        self.encoder = TransformerEncoder(layer, self.num_layers,
                                          norm=LayerNorm(self.hidden_size, dtype=self.dtype))

    @property
    def output_size(self) -> int:
        return self.hidden_size

    def _encode(self, frames: np.ndarray, real: Optional[np.ndarray], full: bool,
                training: bool) -> np.ndarray:
        # Padding anywhere: padded positions output zeros, and a
        # right-padded sequence gives what it gives alone.
        h = self.input_proj(frames, training=False)
        h += sinusoidal_positions(h.shape[-2], self.hidden_size).astype(self.dtype, copy=False)
        h = self.encoder(h, key_padding_mask=real, training=training)
        return h if full else _last_real(h, real)

    def get_config(self) -> Dict[str, Any]:
        return {"embed_dim": self.embed_dim, "window_size": self.window_size,
                "num_heads": self.num_heads,
                "head_dim": self._args["head_dim"],
                "num_layers": self.num_layers, "ffn_dim": self.ffn_dim,
                "dropout": self.dropout, "hidden_size": self._args["hidden_size"],
                "dtype": self.dtype.name, "seed": self.seed,
                "compute_dtype": self.compute_dtype_option}

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, hidden_size={self.hidden_size}, "
                f"window_size={self.window_size}, num_layers={self.num_layers}"
                + self._compute_dtype_repr())


class HybridLSTMAttention(ComputeDtypeOption, _FrameEncoder):
    """An LSTM over the frames, then self-attention over its hidden states.

    ``h = LSTM(x)``; ``y = norm(h + dropout(attn(h)))`` with causal attention
    (each state sees itself and the earlier ones); the output is ``y`` at the
    last position, through the MLP head when ``mlp`` is given. Only the last
    query is computed unless ``return_sequence``.

    Parameters
    ----------
    embed_dim : int
        Features of each input frame.
    lstm_hidden : int
        LSTM hidden size; also the attention's input/output width.
    lstm_layers : int
    num_heads, head_dim : int
        Attention heads and their size (the attention projects
        lstm_hidden -> num_heads * head_dim per q/k/v and back).
    dropout : float in [0, 1)
        On the attention weights and its residual branch, between LSTM
        layers, only with ``training=True``.
    mlp : sequence of int, optional
        Sizes of the dense layers of an MLP head on the output (Edifice's
        ``build_hybrid_mlp``), each followed by ``mlp_activation``.
    mlp_activation : "relu", "gelu", "gelu_tanh" or "silu"
    dtype : float32 or float64
    seed : int, optional
    compute_dtype : None or "bfloat16"
        Every product (the LSTM's, the attention's, the MLP's) on bf16
        operands with float32 sums (float32 models).

    Parameters (arrays)
    -------------------
    ``lstm.weight_ih_l0`` … (PyTorch's ``nn.LSTM`` names), ``attn.q_proj.weight``
    … (``MultiHeadAttention``), ``norm.weight`` / ``.bias``,
    ``mlp.layers.N.weight`` / ``.bias``.
    """

    def __init__(self, embed_dim: int, lstm_hidden: int = 256, lstm_layers: int = 1,
                 num_heads: int = 4, head_dim: int = 64, dropout: float = 0.1,
                 mlp: Optional[Sequence[int]] = None, *, mlp_activation: str = "relu",
                 dtype: Any = np.float32, seed: Optional[int] = None,
                 compute_dtype: Any = None) -> None:
        super().__init__(dtype)
        compute = self._set_compute_dtype(compute_dtype, self.dtype)
        self.embed_dim, self.lstm_hidden, self.lstm_layers, self.num_heads, self.head_dim = \
            _positive_ints(embed_dim=embed_dim, lstm_hidden=lstm_hidden,
                           lstm_layers=lstm_layers, num_heads=num_heads, head_dim=head_dim)
        self.dropout = check.dropout_rate(dropout)
        self.mlp_activation = check_activation(mlp_activation)
        self.seed = check.seed(seed)
        s_lstm, s_attn, s_mlp, s_drop = _seeds(self.seed, 4)
        self._dropout_rng = np.random.default_rng(None if self.seed is None else s_drop)
        pick = (lambda s: None) if self.seed is None else (lambda s: s)
        self.lstm = LSTM(self.embed_dim, self.lstm_hidden, self.lstm_layers,
                         dropout=self.dropout, dtype=self.dtype, seed=pick(s_lstm),
                         compute_dtype=compute)
        self.attn = MultiHeadAttention(self.lstm_hidden, self.num_heads, head_dim=self.head_dim,
                                       dropout=self.dropout, dtype=self.dtype, seed=pick(s_attn),
                                       compute_dtype=compute)
        self.norm = LayerNorm(self.lstm_hidden, dtype=self.dtype)
        self.mlp_sizes = None if mlp is None else [int(s) for s in _check_sizes(mlp)]
        if self.mlp_sizes is not None:
            self.mlp = MLPHead(self.lstm_hidden, self.mlp_sizes, self.mlp_activation,
                               self.dtype, pick(s_mlp), compute)

    @property
    def output_size(self) -> int:
        return self.lstm_hidden if self.mlp_sizes is None else self.mlp_sizes[-1]

    def _encode(self, frames: np.ndarray, real: Optional[np.ndarray], full: bool,
                train: bool) -> np.ndarray:
        # The mask keeps padded states out of the attention. Right-padded, a
        # sequence gives what it gives alone (the LSTM runs forward, so
        # padding after a frame does not reach its state); left padding runs
        # through the LSTM first.
        h, _ = self.lstm(frames, training=train)
        # The last real state's query is that row of the causal pass: it sees
        # every state up to it, and the ones after it are padding (masked).
        q = h if full else _last_real(h, real)[:, None]
        y = self.attn(q, h, is_causal=True, key_padding_mask=real, training=train)
        if train:
            dropout_(y, self.dropout, self._dropout_rng)
        y += q
        y = self.norm(y, training=False)
        if self.mlp_sizes is not None:
            y = self.mlp(y)
        out: np.ndarray = y if full else y[:, 0]
        return out

    def get_config(self) -> Dict[str, Any]:
        return {"embed_dim": self.embed_dim, "lstm_hidden": self.lstm_hidden,
                "lstm_layers": self.lstm_layers, "num_heads": self.num_heads,
                "head_dim": self.head_dim, "dropout": self.dropout, "mlp": self.mlp_sizes,
                "mlp_activation": self.mlp_activation, "dtype": self.dtype.name,
                "seed": self.seed, "compute_dtype": self.compute_dtype_option}

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, lstm_hidden={self.lstm_hidden}, "
                f"lstm_layers={self.lstm_layers}, mlp={self.mlp_sizes}"
                + self._compute_dtype_repr())


def _check_sizes(mlp: Any) -> Tuple[int, ...]:
    if isinstance(mlp, (str, bytes)) or not isinstance(mlp, Sequence) or not mlp or not all(
            isinstance(s, numbers.Integral) and not isinstance(s, bool) and int(s) >= 1 for s in mlp):
        raise InvalidParameterError(f"mlp: expected None or a non-empty sequence of positive "
                                    f"ints (layer sizes), got {mlp!r}")
    return tuple(int(s) for s in mlp)


__all__: List[str] = ["SlidingWindowModel", "HybridLSTMAttention", "MLPHead"]
