"""PyTorch's attention layers on NumPy arrays: drop-in for code written
against ``torch.nn`` and ``torch.nn.functional``.

``MultiheadAttention``, ``TransformerEncoderLayer``, ``TransformerEncoder``,
``LayerNorm`` and ``scaled_dot_product_attention`` take PyTorch's
signatures, defaults and conventions, which differ from tileattn's own:
sequence-first (L, B, E) inputs unless ``batch_first=True``; bool masks
with True = *ignore* for the modules but True = *take part* for
``scaled_dot_product_attention``; ``attn_mask`` (L, S) or
(B*num_heads, L, S); ``need_weights=True`` by default (the modules return
``(output, weights)``); top-left aligned ``is_causal``; modules in training
mode (dropout on) until ``eval()``; ``state_dict()``/``load_state_dict``
under PyTorch's names. torch is never imported: pass NumPy arrays (torch
CPU tensors are read with ``np.asarray``; results are NumPy arrays).

A query row that sees no key gives zero attention (and zero weights)
everywhere; torch 2.13 does so in F.scaled_dot_product_attention and its
modules' general path, but gives NaN with need_weights=True and on its
fast paths (eval mode, batch_first). Float masks are always added to the
scores, as PyTorch documents (its encoder fast path reads them as bool).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import numpy as np

from .. import _validate as check
from .._errors import InvalidParameterError, ShapeError
from .._mha_core import attend_heads
from .._mha_saved import cast_inputs, check_features
from ..attention import MultiHeadAttention
from ..encoder import TransformerEncoder as _Encoder
from ..encoder import TransformerEncoderLayer as _EncoderLayer
from ..encoder import tokens_input
from ..functional import scaled_dot_product_attention as _sdpa
from .._state_dict import IncompatibleKeys
from ..norm import LayerNorm as _LayerNorm
from ._torch_masks import Geometry, core_masks, is_causal_mask
from ._torch_state import TorchStyle, activation_name, numpy_dtype, torch_names

__all__ = ["LayerNorm", "MultiheadAttention", "TransformerEncoder", "TransformerEncoderLayer",
           "scaled_dot_product_attention"]


def _batch_major(a: np.ndarray, batched: bool, batch_first: bool) -> np.ndarray:
    """(L, B, F) / (B, L, F) / unbatched (L, F) -> a (B, L, F) view."""
    if not batched:
        return a[None]
    return a if batch_first else a.swapaxes(0, 1)


def _user_layout(y: np.ndarray, batched: bool, batch_first: bool) -> np.ndarray:
    """The inverse of ``_batch_major``."""
    if not batched:
        alone: np.ndarray = y[0]
        return alone
    return y if batch_first else y.swapaxes(0, 1)


class MultiheadAttention(TorchStyle):
    """``torch.nn.MultiheadAttention`` on NumPy arrays.

    Same constructor and call as PyTorch's (see its documentation); the
    weights are a ``tileattn.MultiHeadAttention`` (``self.module``), plus
    ``bias_k``/``bias_v`` (1, 1, embed_dim) with ``add_bias_kv``.
    ``device`` is ignored; ``dtype`` may be float32 (default) or float64,
    given as a NumPy or torch dtype. The initial weights are random (Glorot
    uniform, zero biases, ``bias_k``/``bias_v`` Xavier normal) but not
    PyTorch's draws: load a state dict to reproduce a torch module.

    ``forward(query, key, value, key_padding_mask=None, need_weights=True,
    attn_mask=None, average_attn_weights=True, is_causal=False)`` returns
    ``(output, weights or None)`` with PyTorch's shapes; the weights include
    the columns of the ``bias_k`` and zero-attention keys, as PyTorch's do.
    """

    module: MultiHeadAttention

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False,
                 kdim: Optional[int] = None, vdim: Optional[int] = None,
                 batch_first: bool = False, device: Any = None, dtype: Any = None) -> None:
        self.module = MultiHeadAttention(embed_dim, num_heads, kdim=kdim, vdim=vdim, bias=bias,
                                         dropout=dropout, dtype=numpy_dtype(dtype))
        m = self.module
        self.embed_dim, self.num_heads, self.head_dim = m.embed_dim, m.num_heads, m.head_dim
        self.kdim, self.vdim, self.dropout = m.kdim, m.vdim, m.dropout
        self.batch_first = check.flag("batch_first", batch_first)
        self.add_zero_attn = check.flag("add_zero_attn", add_zero_attn)
        self.bias_k: Optional[np.ndarray] = None
        self.bias_v: Optional[np.ndarray] = None
        if check.flag("add_bias_kv", add_bias_kv):
            # PyTorch's xavier_normal_ of a (1, 1, E) tensor: std sqrt(1 / E).
            rng = np.random.default_rng()
            std = math.sqrt(1.0 / embed_dim)
            self.bias_k, self.bias_v = (rng.normal(0.0, std, (1, 1, embed_dim)).astype(m.dtype)
                                        for _ in range(2))

    @property
    def out_proj(self) -> Any:
        """The output projection (a ``tileattn.Linear``: ``.weight``, ``.bias``)."""
        return self.module.out_proj

    def _extra_keys(self) -> Tuple[Tuple[str, np.ndarray], ...]:
        return tuple((n, a) for n, a in (("bias_k", self.bias_k), ("bias_v", self.bias_v))
                     if a is not None)

    def state_dict(self) -> dict[str, np.ndarray]:
        """PyTorch's names and order: the input projections, ``bias_k``,
        ``bias_v``, then ``out_proj.weight``/``out_proj.bias``."""
        sd = torch_names(self.module.state_dict())
        outs = {k: sd.pop(k) for k in list(sd) if k.startswith("out_proj.")}
        return {**sd, **{n: a.copy() for n, a in self._extra_keys()}, **outs}

    def load_state_dict(self, state_dict: Any, strict: bool = True) -> IncompatibleKeys:
        """A torch module's ``state_dict()`` as it is (tensors or arrays):
        ``in_proj_weight``/``in_proj_bias`` or ``q/k/v_proj_weight``,
        ``out_proj.*``, and ``bias_k``/``bias_v`` with ``add_bias_kv``
        (without it they are unexpected keys). Nothing changes on failure."""
        sd = dict(state_dict)
        values = {}
        missing = []
        for name, own in self._extra_keys():
            if name not in sd:
                missing.append(name)
                continue
            value = np.asarray(sd.pop(name))
            if value.shape != own.shape:
                raise ShapeError(f"load_state_dict: {name}: expected shape {own.shape}, "
                                 f"got {value.shape}")
            values[name] = value
        if strict and missing:
            raise InvalidParameterError(
                f"load_state_dict into MultiheadAttention failed: missing keys: "
                f"{', '.join(missing)}")
        result = self.module.load_state_dict(sd, strict)
        for name, own in self._extra_keys():
            if name in values:
                np.copyto(own, values[name], casting="unsafe")
        return IncompatibleKeys(result.missing_keys + ([] if strict else missing),
                                result.unexpected_keys)

    def _append_keys(self, k: np.ndarray, v: np.ndarray) -> Tuple[np.ndarray, np.ndarray, int]:
        """k, v (B, S, H, D) with ``bias_k``/``bias_v`` and then a zero key
        and value appended (after the projections, as PyTorch does)."""
        b, _, h, d = k.shape
        extra = []
        if self.bias_k is not None and self.bias_v is not None:
            extra.append((self.bias_k.reshape(1, 1, h, d), self.bias_v.reshape(1, 1, h, d)))
        if self.add_zero_attn:
            zero = np.zeros((1, 1, h, d), k.dtype)
            extra.append((zero, zero))
        if not extra:
            return k, v, 0
        ks = [k] + [np.broadcast_to(ek, (b, 1, h, d)) for ek, _ in extra]
        vs = [v] + [np.broadcast_to(ev, (b, 1, h, d)) for _, ev in extra]
        return np.concatenate(ks, axis=1), np.concatenate(vs, axis=1), len(extra)

    def forward(self, query: Any, key: Any, value: Any, key_padding_mask: Any = None,
                need_weights: bool = True, attn_mask: Any = None,
                average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """PyTorch's call: query (L, B, E) ((B, L, E) with batch_first;
        unbatched (L, E)), key (S, B, kdim), value (S, B, vdim).

        Bool masks: True = ignore; float masks are added to the scores.
        ``key_padding_mask`` (B, S); ``attn_mask`` (L, S) or
        (B*num_heads, L, S). ``is_causal`` is PyTorch's hint that attn_mask
        is causal (it needs attn_mask). Dropout applies in training mode.

        Returns (output (L, B, E) (batch_first: (B, L, E)), weights (B, L, S')
        averaged over heads or (B, num_heads, L, S'), or None without
        need_weights), where S' counts the bias_k and zero-attention keys.
        """
        check.flag("need_weights", need_weights)
        check.flag("average_attn_weights", average_attn_weights)
        m = self.module
        q, k, v, self_attn, kv_same, in_dtype = cast_inputs(query, key, value, m.dtype,
                                                            m.packed)
        if q.ndim not in (2, 3) or k.ndim != q.ndim or v.ndim != q.ndim:
            raise ShapeError(
                f"query, key, value: expected three 3-D arrays ((L, B, E), or (B, L, E) with "
                f"batch_first) or three unbatched 2-D arrays, got shapes {q.shape}, "
                f"{k.shape}, {v.shape}")
        batched = q.ndim == 3
        q3, k3, v3 = (_batch_major(a, batched, self.batch_first) for a in (q, k, v))
        check_features(q3, k3, v3, (m.embed_dim, m.kdim, m.vdim), None)
        if k3.shape[:2] != v3.shape[:2] or q3.shape[0] != k3.shape[0]:
            raise ShapeError(f"key, value: expected the query's batch and one sequence length, "
                             f"got shapes {k.shape} and {v.shape} for query {q.shape}")
        qh, kh, vh = m.split_heads(*m.projections.project(q3, k3, v3, self_attn, kv_same))
        kh, vh, extra = self._append_keys(kh, vh)
        geometry = Geometry(q3.shape[0], m.num_heads, q3.shape[1], k3.shape[1], extra, batched)
        masks = core_masks(attn_mask, key_padding_mask, is_causal, need_weights, geometry)
        y, w, _ = attend_heads(qh, kh, vh, False, m.value_dim,
                               dropout=m.dropout_draw(self.training), need_weights=need_weights,
                               training=False,
                               masks={**masks._asdict(), "causal_alignment": "top_left"})
        out = _user_layout(m.out_proj(y), batched, self.batch_first).astype(in_dtype, copy=False)
        if w is None:
            return out, None
        if average_attn_weights:
            w = w.mean(axis=1)
        return out, (w if batched else w[0]).astype(in_dtype, copy=False)


def _encode(module: Any, sizes: Tuple[int, int], batch_first: bool, training: bool, src: Any,
            masks: Tuple[Any, Any], is_causal: Optional[bool], names: Tuple[str, str]
            ) -> np.ndarray:
    """A tileattn encoder layer or stack of (d_model, nhead) ``sizes`` on
    PyTorch-style ``src`` and masks. ``is_causal`` None: detected from the
    mask, as nn.TransformerEncoder does (a causal hint lets the kernel skip
    the hidden blocks; the result is the same)."""
    d_model, nhead = sizes
    x = tokens_input(src, "src", d_model)
    batched = x.ndim == 3
    xb = _batch_major(x, batched, batch_first)
    b, length = xb.shape[:2]
    causal = is_causal_mask(masks[0], length) if is_causal is None else is_causal
    core = core_masks(masks[0], masks[1], causal, False,
                      Geometry(b, nhead, length, length, 0, batched), names)
    # Self-attention is square: top-left and bottom-right causal coincide.
    y = module(xb, attn_mask=core.attn_mask, key_padding_mask=core.key_padding_mask,
               is_causal=core.is_causal, training=training)
    return _user_layout(y, batched, batch_first)


class TransformerEncoderLayer(TorchStyle):
    """``torch.nn.TransformerEncoderLayer`` on NumPy arrays: PyTorch's
    constructor (``activation`` a name or ``F.relu``/``F.gelu``; ``device``
    ignored; ``dtype`` float32 or float64) and
    ``forward(src, src_mask=None, src_key_padding_mask=None, is_causal=False)``
    with src (L, B, E) ((B, L, E) with batch_first). The weights are a
    ``tileattn.TransformerEncoderLayer`` (``self.module``). Dropout applies
    in training mode (the default, as in PyTorch) when ``dropout > 0``.
    """

    module: _EncoderLayer

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048,
                 dropout: float = 0.1, activation: Any = "relu", layer_norm_eps: float = 1e-5,
                 batch_first: bool = False, norm_first: bool = False, bias: bool = True,
                 device: Any = None, dtype: Any = None) -> None:
        self.module = _EncoderLayer(d_model, nhead, dim_feedforward, dropout,
                                    activation_name(activation), layer_norm_eps, norm_first,
                                    bias, dtype=numpy_dtype(dtype))
        self.batch_first = check.flag("batch_first", batch_first)
        self.sizes = (self.module.d_model, self.module.nhead)

    def forward(self, src: Any, src_mask: Any = None, src_key_padding_mask: Any = None,
                is_causal: bool = False) -> np.ndarray:
        """Bool masks True = ignore, float masks added; ``src_mask`` (L, L)
        or (B*nhead, L, L); ``src_key_padding_mask`` (B, L); ``is_causal`` a
        hint that src_mask is causal (it needs src_mask). Outputs at padded
        positions are unspecified (PyTorch's own paths differ there)."""
        return _encode(self.module, self.sizes, self.batch_first,
                       self.training and self.module.dropout > 0,
                       src, (src_mask, src_key_padding_mask), is_causal,
                       ("src_mask", "src_key_padding_mask"))


class TransformerEncoder(TorchStyle):
    """``torch.nn.TransformerEncoder(encoder_layer, num_layers, norm=None)``
    on NumPy arrays: ``num_layers`` copies of a compat
    ``TransformerEncoderLayer`` (its weights and batch_first), then ``norm``
    (``LayerNorm`` of this module or tileattn's). ``forward(src, mask=None,
    src_key_padding_mask=None, is_causal=None)`` as PyTorch's; padded
    positions output zeros (PyTorch: zeros or ``norm`` of zeros on its
    nested-tensor path, computed values elsewhere).
    ``enable_nested_tensor`` and ``mask_check`` are accepted and ignored
    (padding is always skipped when it can be)."""

    def __init__(self, encoder_layer: TransformerEncoderLayer, num_layers: int,
                 norm: Optional[_LayerNorm] = None, enable_nested_tensor: bool = True,
                 mask_check: bool = True) -> None:
        if not isinstance(encoder_layer, TransformerEncoderLayer):
            raise InvalidParameterError(
                f"encoder_layer: expected a tileattn.compat.pytorch.TransformerEncoderLayer, "
                f"got {type(encoder_layer).__name__}")
        self.module = _Encoder(encoder_layer.module, num_layers, norm)
        self.batch_first, self.sizes = encoder_layer.batch_first, encoder_layer.sizes
        self._dropout = encoder_layer.module.dropout

    def forward(self, src: Any, mask: Any = None, src_key_padding_mask: Any = None,
                is_causal: Optional[bool] = None) -> np.ndarray:
        """Masks as ``TransformerEncoderLayer.forward``'s; ``is_causal`` None
        detects a causal ``mask``."""
        return _encode(self.module, self.sizes, self.batch_first, self.training and self._dropout > 0,
                       src, (mask, src_key_padding_mask), is_causal,
                       ("mask", "src_key_padding_mask"))


def LayerNorm(normalized_shape: int, eps: float = 1e-5, elementwise_affine: bool = True,
              bias: bool = True, device: Any = None, dtype: Any = None) -> _LayerNorm:
    """``torch.nn.LayerNorm`` over the last axis, as a ``tileattn.LayerNorm``
    (for ``TransformerEncoder``'s ``norm``); ``elementwise_affine=False``
    is not available."""
    if not check.flag("elementwise_affine", elementwise_affine):
        raise InvalidParameterError("elementwise_affine: only True is available")
    size = normalized_shape[0] if isinstance(normalized_shape, (tuple, list)) and \
        len(normalized_shape) == 1 else normalized_shape
    return _LayerNorm(check.positive_int("normalized_shape", size), eps, bias,
                      numpy_dtype(dtype))


def _heads_for(hq: int, hkv: int, enable_gqa: bool) -> Tuple[int, int]:
    """(query heads, key/value heads) after PyTorch's rule: without
    enable_gqa the head axes broadcast (one side 1 or both equal; one key
    head is multi-query attention, no copy); with it, Hkv divides Hq."""
    if hq == hkv or (hkv == 1 and not enable_gqa):
        return hq, hkv
    if not enable_gqa and hq == 1:
        return hkv, hkv
    if enable_gqa and hq % hkv == 0:
        return hq, hkv
    rule = ("the key/value heads must divide the query heads" if enable_gqa else
            "the head axes must broadcast (equal or 1); pass enable_gqa=True for "
            "grouped-query attention")
    raise ShapeError(f"key, value: {rule}; got {hkv} key/value and {hq} query heads")


def scaled_dot_product_attention(query: Any, key: Any, value: Any, attn_mask: Any = None,
                                 dropout_p: float = 0.0, is_causal: bool = False,
                                 scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> np.ndarray:
    """``torch.nn.functional.scaled_dot_product_attention`` on NumPy arrays.

    query (..., L, E), key (..., S, E), value (..., S, Ev); the leading axes
    broadcast, the third from last being the heads (see ``enable_gqa``).
    ``attn_mask`` broadcastable to (..., L, S): bool True = *take part* (the
    opposite of nn.MultiheadAttention's), float added. ``is_causal``:
    top-left aligned (query i sees keys 0..i), not with ``attn_mask``.
    Dropout (``dropout_p``) always applies when > 0, as in PyTorch.
    Returns (..., L, Ev). A row that sees no key gives zeros (as torch's).
    """
    q, k, v = (check.float_array(a, n) for a, n in ((query, "query"), (key, "key"),
                                                    (value, "value")))
    if min(q.ndim, k.ndim, v.ndim) < 2:
        raise ShapeError(f"query, key, value: expected (..., L, E) arrays, got shapes "
                         f"{q.shape}, {k.shape}, {v.shape}")
    if check.flag("is_causal", is_causal) and attn_mask is not None:
        raise InvalidParameterError(
            "attn_mask: not with is_causal=True (PyTorch refuses the pair too)")
    nd = max(q.ndim, k.ndim, v.ndim)
    full = max(nd, 4)
    q, k, v = (a.reshape((1,) * (full - a.ndim) + a.shape) for a in (q, k, v))
    qs: Tuple[int, ...] = q.shape
    ks: Tuple[int, ...] = k.shape
    vs: Tuple[int, ...] = v.shape
    try:
        lead: Tuple[int, ...] = np.broadcast_shapes(qs[:-3], ks[:-3], vs[:-3])
    except ValueError:
        raise ShapeError(f"query, key, value: leading axes do not broadcast: "
                         f"{q.shape}, {k.shape}, {v.shape}") from None
    if ks[-3] != vs[-3]:
        raise ShapeError(f"key, value: expected one number of heads, got shapes "
                         f"{k.shape} and {v.shape}")
    hq, hkv = _heads_for(qs[-3], ks[-3], check.flag("enable_gqa", enable_gqa))
    batch = int(np.prod(lead, dtype=np.int64))
    q4, k4, v4 = (np.broadcast_to(a, lead + (h,) + a.shape[-2:]).reshape(
        (batch, h) + a.shape[-2:]) for a, h in ((q, hq), (k, hkv), (v, hkv)))
    mask = attn_mask
    if mask is not None:
        target = lead + (hq, qs[-2], ks[-2])
        try:
            mask = np.broadcast_to(np.asarray(mask), target).reshape((batch,) + target[-3:])
        except ValueError:
            raise ShapeError(f"attn_mask: expected a shape broadcastable to {target}, "
                             f"got {np.shape(attn_mask)}") from None
    out = _sdpa(q4, k4, v4, attn_mask=mask, is_causal=is_causal, causal_alignment="top_left",
                scale=scale, dropout_p=dropout_p)
    assert isinstance(out, np.ndarray)
    return out.reshape((lead + (hq,) + out.shape[-2:])[full - nd:])
