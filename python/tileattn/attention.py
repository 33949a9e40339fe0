"""``MultiHeadAttention``: projections in NumPy, attention in tileattn's core."""

from __future__ import annotations

import math
import numbers
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ._axes import SequenceLayout, check_attention_axes, layouts
from ._errors import DTypeError, InvalidParameterError, ShapeError
from .cache import KVCache, prefix_lengths
from .backward import scaled_dot_product_attention_backward
from .functional import scaled_dot_product_attention
from .linear import Linear, affine, as_2d_rows, grad_input, linear_backward
from .module import Module
from .norm import LayerNorm
from ._mha_saved import AttentionSaved, CoreSaved, dtypes_of, same_inputs, seq_shape
from .positional import apply_rope, rope_tables

_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
_TORCH_IN_PROJ = ("in_proj_weight", "in_proj_bias")
_TORCH_SEPARATE = {"q_proj_weight": "q_proj.weight", "k_proj_weight": "k_proj.weight",
                   "v_proj_weight": "v_proj.weight"}


def _pos_int(name: str, value: Any) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < 1:
        raise InvalidParameterError(f"{name}: expected a positive int, got {value!r}")
    return int(value)


def _opt_pos_int(name: str, value: Any, default: int) -> int:
    return default if value is None else _pos_int(name, value)


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise InvalidParameterError(f"{name}: expected a bool, got {value!r}")
    return bool(value)


def _input(x: Any, name: str) -> np.ndarray:
    a = x if isinstance(x, np.ndarray) else np.asarray(x)
    if a.dtype not in _FLOATS:
        raise DTypeError(f"{name}: expected float16, float32 or float64, got {a.dtype} "
                         f"with shape {a.shape}")
    return a


def _heads_first(a: np.ndarray, unbatched: bool) -> np.ndarray:
    """(B, L, H, D) -> the (B, H, L, D) view the core takes ((H, L, D) unbatched)."""
    a = a.transpose(0, 2, 1, 3)
    return a[0] if unbatched else a


class MultiHeadAttention(Module):
    """Multi-head attention (Vaswani et al., 2017) with GQA, RoPE and QK-norm.

    ``y = out_proj(concat_h attention(q_proj(query)_h, k_proj(key)_g, v_proj(value)_g))``
    where query head ``h`` uses key/value head ``g = h // (num_heads // num_kv_heads)``.

    Parameters
    ----------
    embed_dim : int
        Feature size E of the query input.
    num_heads : int
        Query heads Hq.
    num_kv_heads : int, optional
        Key/value heads Hkv (grouped-query attention when < num_heads,
        multi-query when 1). Must divide num_heads. Default num_heads.
    head_dim : int, optional
        Query/key size D per head (Keras' ``key_dim``). Default
        ``embed_dim // num_heads``, which then must divide evenly.
    value_dim : int, optional
        Value size Dv per head. Default head_dim.
    kdim, vdim : int, optional
        Feature sizes of the key and value inputs. Default embed_dim.
    output_dim : int, optional
        Output features. Default embed_dim.
    bias : bool
        Biases in the four projections (and the QK-norms).
    dropout : float in [0, 1)
        Dropout on the attention weights, applied only with ``training=True``.
    rope : bool
        Rotary position embedding of q and k (positions 0..L-1 of each input),
        after the QK-norm. Needs an even head_dim.
    rope_theta : float
    qk_norm : bool
        LayerNorm over head_dim of every q and k head (weights shared across
        heads: ``q_norm.weight``, ``k_norm.weight`` (+ ``.bias``)).
    attention_axes : int or tuple of int, optional
        Keras' option: for (B, *S, E) inputs, attend jointly over these axes
        of S; the other axes of S act as batch axes. Default: all of S.
    dtype : float32 or float64
        Dtype of the parameters and of the computation.
    seed : int, optional
        Seeds the Glorot-uniform kernels (biases start at zero) and the
        sequence of dropout masks.

    Parameters (arrays, PyTorch layout (out_features, in_features))
    ---------------------------------------------------------------
    q_proj.weight (Hq*D, E), k_proj.weight (Hkv*D, kdim),
    v_proj.weight (Hkv*Dv, vdim), out_proj.weight (output_dim, Hq*Dv), and
    the ``.bias`` of each when ``bias``.

    Notes
    -----
    When kdim == vdim == embed_dim the Q, K and V weights are views into one
    packed (Hq*D + Hkv*D + Hkv*Dv, E) matrix: self-attention projects with a
    single matrix multiply, and loads, assignments and in-place edits of the
    separate weights are seen by it with no cache to invalidate.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, num_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, value_dim: Optional[int] = None,
                 kdim: Optional[int] = None, vdim: Optional[int] = None,
                 output_dim: Optional[int] = None, bias: bool = True, dropout: float = 0.0,
                 rope: bool = False, rope_theta: float = 10000.0, qk_norm: bool = False,
                 attention_axes: Any = None, dtype: Any = np.float32,
                 seed: Optional[int] = None) -> None:
        super().__init__(dtype)
        self._check_sizes(embed_dim, num_heads, num_kv_heads, head_dim, value_dim,
                          kdim, vdim, output_dim)
        self._check_options(bias, dropout, rope, rope_theta, qk_norm, attention_axes, seed)
        init_seq, drop_seq = np.random.SeedSequence(seed).spawn(2)
        self._dropout_rng = np.random.default_rng(drop_seq)
        rng = np.random.default_rng(init_seq)
        hq, hkv, d, dv = self.num_heads, self.num_kv_heads, self.head_dim, self.value_dim
        self.q_proj = Linear(self.embed_dim, hq * d, bias, self.dtype, rng)
        self.k_proj = Linear(self.kdim, hkv * d, bias, self.dtype, rng)
        self.v_proj = Linear(self.vdim, hkv * dv, bias, self.dtype, rng)
        self.out_proj = Linear(hq * dv, self.output_dim, bias, self.dtype, rng)
        if self.qk_norm:
            self.q_norm = LayerNorm(d, bias=bias, dtype=self.dtype)
            self.k_norm = LayerNorm(d, bias=bias, dtype=self.dtype)
        self._pack()

    # -- construction ---------------------------------------------------------
    def _check_sizes(self, embed_dim: Any, num_heads: Any, num_kv_heads: Any, head_dim: Any,
                     value_dim: Any, kdim: Any, vdim: Any, output_dim: Any) -> None:
        self.embed_dim = _pos_int("embed_dim", embed_dim)
        self.num_heads = _pos_int("num_heads", num_heads)
        self.num_kv_heads = _opt_pos_int("num_kv_heads", num_kv_heads, self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise InvalidParameterError(
                f"num_heads ({self.num_heads}) must be divisible by num_kv_heads "
                f"({self.num_kv_heads})")
        if head_dim is None and self.embed_dim % self.num_heads:
            raise InvalidParameterError(
                f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads}), "
                f"or pass head_dim")
        self.head_dim = _opt_pos_int("head_dim", head_dim, self.embed_dim // self.num_heads)
        self.value_dim = _opt_pos_int("value_dim", value_dim, self.head_dim)
        self.kdim = _opt_pos_int("kdim", kdim, self.embed_dim)
        self.vdim = _opt_pos_int("vdim", vdim, self.embed_dim)
        self.output_dim = _opt_pos_int("output_dim", output_dim, self.embed_dim)

    def _check_options(self, bias: Any, dropout: Any, rope: Any, rope_theta: Any,
                       qk_norm: Any, attention_axes: Any, seed: Any) -> None:
        _flag("bias", bias)
        if isinstance(dropout, (bool, np.bool_)) or not isinstance(dropout, numbers.Real) \
                or not 0.0 <= float(dropout) < 1.0:
            raise InvalidParameterError(f"dropout: expected a number in [0, 1), got {dropout!r}")
        self.dropout = float(dropout)
        self.rope = _flag("rope", rope)
        if self.rope and self.head_dim % 2:
            raise InvalidParameterError(
                f"rope: head_dim must be even for rotary embeddings, got head_dim={self.head_dim}")
        if isinstance(rope_theta, (bool, np.bool_)) or not isinstance(rope_theta, numbers.Real) \
                or not (math.isfinite(rope_theta) and float(rope_theta) > 0):
            raise InvalidParameterError(f"rope_theta: expected a positive number, got {rope_theta!r}")
        self.rope_theta = float(rope_theta)
        self.qk_norm = _flag("qk_norm", qk_norm)
        self.attention_axes = check_attention_axes(attention_axes)
        if self.rope and self.attention_axes is not None and len(self.attention_axes) > 1:
            raise InvalidParameterError(
                f"rope: positions over several attention_axes {self.attention_axes} are not "
                f"defined; use one attention axis with rope")
        if seed is not None and (isinstance(seed, (bool, np.bool_))
                                 or not isinstance(seed, numbers.Integral) or seed < 0):
            raise InvalidParameterError(f"seed: expected a non-negative int, got {seed!r}")
        self.seed = None if seed is None else int(seed)

    @property
    def packed(self) -> bool:
        """True when Q/K/V weights share one packed matrix (kdim == vdim == embed_dim)."""
        return self.kdim == self.embed_dim and self.vdim == self.embed_dim

    def _pack(self) -> None:
        """Put the Q, K, V weights (and biases) into one buffer and make the
        projections' parameters views of it (see the class notes)."""
        self._in_weight: Optional[np.ndarray] = None
        self._in_bias: Optional[np.ndarray] = None
        if not self.packed:
            return
        projs = (self.q_proj, self.k_proj, self.v_proj)
        for attr in ("weight", "bias"):
            if getattr(self.q_proj, attr) is None:
                continue
            packed = np.concatenate([getattr(p, attr) for p in projs])
            start = 0
            for p in projs:
                n = p.out_features
                p._rebind(attr, packed[start:start + n])
                start += n
            object.__setattr__(self, f"_in_{attr}", packed)

    def add_module(self, name: str, module: Optional[Module]) -> None:
        """Replacing a projection after construction (``mha.q_proj = Linear(...)``)
        must keep its shape, and re-packs Q/K/V so the fused GEMM sees it."""
        built = "_in_weight" in self.__dict__
        if built and name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            old = self._modules[name]
            if not isinstance(module, Linear):
                raise InvalidParameterError(f"{name}: expected a Linear, got {type(module).__name__}")
            if (module.in_features, module.out_features, module.bias is None) != \
                    (old.in_features, old.out_features, old.bias is None):
                raise ShapeError(
                    f"{name}: expected Linear({old.in_features}, {old.out_features}, "
                    f"bias={old.bias is not None}), got Linear({module.in_features}, "
                    f"{module.out_features}, bias={module.bias is not None})")
            if module.dtype != self.dtype:
                raise DTypeError(f"{name}: expected dtype {self.dtype}, got {module.dtype}")
        super().add_module(name, module)
        if built and name != "out_proj" and name.endswith("_proj"):
            self._pack()

    def __getstate__(self) -> Dict[str, Any]:
        state = super().__getstate__()
        # The packed buffers are rebuilt on unpickling; don't store weights twice.
        state.pop("_in_weight", None)
        state.pop("_in_bias", None)
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        self._pack()

    def _convert_state_dict(self, sd: Dict[str, Any]) -> Dict[str, Any]:
        """Accept nn.MultiheadAttention's names: packed ``in_proj_weight`` /
        ``in_proj_bias`` (split into q/k/v by rows) and ``q_proj_weight`` etc."""
        out = dict(sd)
        sizes = [p.out_features for p in (self.q_proj, self.k_proj, self.v_proj)]
        for key, attr in zip(_TORCH_IN_PROJ, ("weight", "bias")):
            if key not in out:
                continue
            value = np.asarray(out[key])
            if value.ndim < 1 or value.shape[0] != sum(sizes):
                raise ShapeError(
                    f"load_state_dict: {key}: expected {sum(sizes)} rows "
                    f"(q {sizes[0]} + k {sizes[1]} + v {sizes[2]}), got shape {value.shape}")
            del out[key]
            parts = np.split(value, np.cumsum(sizes)[:-1])
            for name, part in zip(("q_proj", "k_proj", "v_proj"), parts):
                out.setdefault(f"{name}.{attr}", part)
        for torch_key, own in _TORCH_SEPARATE.items():
            if torch_key in out:
                out.setdefault(own, out.pop(torch_key))
        return out

    def get_config(self) -> Dict[str, Any]:
        return {
            "embed_dim": self.embed_dim, "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim,
            "value_dim": self.value_dim, "kdim": self.kdim, "vdim": self.vdim,
            "output_dim": self.output_dim, "bias": self.q_proj.bias is not None,
            "dropout": self.dropout, "rope": self.rope, "rope_theta": self.rope_theta,
            "qk_norm": self.qk_norm,
            "attention_axes": list(self.attention_axes) if self.attention_axes else None,
            "dtype": self.dtype.name, "seed": self.seed,
        }

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"value_dim={self.value_dim}, rope={self.rope}, qk_norm={self.qk_norm}")

    # -- forward --------------------------------------------------------------
    def forward(self, query: Any, key: Any = None, value: Any = None, *,
                attn_mask: Any = None, key_padding_mask: Any = None, is_causal: bool = False,
                window: Any = None, need_weights: bool = False,
                average_attn_weights: bool = True, training: bool = False,
                cache: Any = None) -> Any:
        """Attend from ``query`` to ``key``/``value``.

        Parameters
        ----------
        query : (B, Lq, E) or unbatched (Lq, E); (B, *S, E) with attention_axes
        key : (B, Lk, kdim), optional
            None: self-attention (key = value = query).
        value : (B, Lk, vdim), optional
            None: value = key (``mha(q, kv)``).
        attn_mask : bool or float, broadcastable (NumPy rules) to (B, Hq, Lq, Lk)
            Bool True = may attend; float is added to the scores. A (B, Lq, Lk)
            mask (Keras' layout) needs a head axis: ``mask[:, None]``.
        key_padding_mask : bool (B, Lk), True = real token
            The opposite of PyTorch's polarity (there True = ignore).
        is_causal, window
            As in ``scaled_dot_product_attention`` (bottom-right aligned).
        need_weights : bool
            Also return the attention weights.
        average_attn_weights : bool
            Weights averaged over heads (B, Lq, Lk), else (B, Hq, Lq, Lk).
        training : bool
            Apply dropout (only then), and keep what ``backward`` needs
            (not with ``cache``; inference calls keep nothing).
        cache : KVCache, optional
            Incremental decoding (self-attention only): ``query`` holds the
            new tokens (a prompt chunk or one step), their keys/values are
            appended to the cache (after QK-norm and RoPE at the cache's
            positions, per sequence) and the queries attend over everything
            cached; causal (and window) masks align with each sequence's
            positions. A ``key_padding_mask`` (B, T) of prefix form then marks
            how many of the T new tokens each sequence really appends
            (right padding); their outputs are meaningless. ``attn_mask``,
            ``need_weights``, separate ``key``/``value`` and
            ``attention_axes`` are not available with a cache.

        Returns
        -------
        y : (B, Lq, output_dim) (unbatched: (Lq, output_dim)), the query's dtype
        weights : only with need_weights, see average_attn_weights

        With attention_axes, masks and weights refer to the flattened problem:
        batch B * (non-attended sizes), positions the attended axes in
        row-major order; the weights are returned in Keras' shape
        (B, *non-attended, [Hq,] *query axes, *key axes).
        """
        for name, flag in (("need_weights", need_weights), ("training", training),
                           ("average_attn_weights", average_attn_weights)):
            _flag(name, flag)
        if cache is not None:
            if training:
                self._save(None)     # a cached forward keeps nothing to differentiate
            return self._forward_cached(query, key, value, cache, attn_mask=attn_mask,
                                        key_padding_mask=key_padding_mask, is_causal=is_causal,
                                        window=window, need_weights=need_weights,
                                        training=training)
        q_in, k_in, v_in, self_attn, kv_same, out_dtype = self._inputs(query, key, value)
        unbatched = q_in.ndim == 2 and self.attention_axes is None
        if unbatched:
            q_in, k_in, v_in = q_in[None], k_in[None], v_in[None]
        self._check_features(q_in, k_in, v_in)
        q_lay, k_lay = layouts(q_in, k_in, v_in, self.attention_axes)
        q3 = q_lay.to_sequence(q_in)
        k3 = q3 if self_attn else k_lay.to_sequence(k_in)
        v3 = k3 if kv_same else k_lay.to_sequence(v_in)

        q, k, v = self._project(q3, k3, v3, self_attn, kv_same)
        if self.qk_norm:
            q, k = self.q_norm(q, training=training), self.k_norm(k, training=training)
        if self.rope:
            q, k = self._rope(q), self._rope(k)
        masks = {"attn_mask": attn_mask, "key_padding_mask": key_padding_mask,
                 "is_causal": is_causal, "window": window}
        y, w, core = self._attend(q, k, v, unbatched, need_weights=need_weights,
                                  training=training, **masks)
        if training:
            self._save(AttentionSaved(
                inputs=(q3, k3, v3), layouts=(q_lay, k_lay), dtypes=dtypes_of(query, key, value),
                same=same_inputs(query, key, value), fused=(self_attn, kv_same),
                unbatched=unbatched, core=core, masks=masks, attn_out=y))
        y = self.out_proj(y)
        y = q_lay.from_sequence(y)[0] if unbatched else q_lay.from_sequence(y)
        y = y.astype(out_dtype, copy=False)
        if w is None:
            return y
        return y, self._shape_weights(w, q_lay, k_lay, unbatched, average_attn_weights, out_dtype)

    def _forward_cached(self, query: Any, key: Any, value: Any, cache: Any, *,
                        attn_mask: Any, key_padding_mask: Any, is_causal: bool, window: Any,
                        need_weights: bool, training: bool) -> np.ndarray:
        """Self-attention of new tokens against a KVCache (see ``forward``)."""
        if not isinstance(cache, KVCache):
            raise InvalidParameterError(
                f"cache: expected a tileattn.KVCache, got {type(cache).__name__}")
        for name, given in (("key", key is not None and key is not query),
                            ("value", value is not None and value is not query),
                            ("attn_mask", attn_mask is not None), ("need_weights", need_weights),
                            ("attention_axes", self.attention_axes is not None)):
            if given:
                raise InvalidParameterError(
                    f"{name}: not supported with cache= (incremental self-attention); "
                    f"call without the cache for it")
        if not self.packed:
            raise InvalidParameterError(
                f"cache: incremental self-attention needs kdim == vdim == embed_dim, got kdim="
                f"{self.kdim}, vdim={self.vdim}, embed_dim={self.embed_dim}")
        want = (self.num_kv_heads, self.head_dim, self.value_dim)
        got = (cache.num_kv_heads, cache.head_dim, cache.value_dim)
        if got != want:
            raise ShapeError(
                f"cache: expected (num_kv_heads, head_dim, value_dim) = {want} like the "
                f"module, got {got}")
        if cache.dtype != self.dtype and not (cache.dtype == np.float16
                                              and self.dtype == np.float32):
            raise DTypeError(
                f"cache: a {self.dtype} module needs a {self.dtype} cache"
                + (" or a float16 one" if self.dtype == np.float32 else "")
                + f", got {cache.dtype}")
        x = _input(query, "query")
        in_dtype = x.dtype
        unbatched = x.ndim == 2
        x3 = x[None] if unbatched else x
        if x3.ndim != 3 or x3.shape[-1] != self.embed_dim:
            raise ShapeError(f"query: expected (B, T, {self.embed_dim}) or unbatched "
                             f"(T, {self.embed_dim}), got shape {x.shape}")
        b, t = x3.shape[:2]
        if b != cache.batch:
            raise ShapeError(f"query: batch {b} does not match the cache's batch "
                             f"{cache.batch}; got shape {x.shape}")
        counts = None
        if key_padding_mask is not None:
            kpm = np.asarray(key_padding_mask)
            counts = prefix_lengths(kpm[None] if unbatched else kpm, "key_padding_mask", (b, t))
        x3 = x3.astype(self.dtype, copy=False)
        q, k, v = self._project(x3, x3, x3, self.packed, self.packed)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope:
            # Each sequence's new tokens sit at its own positions lengths[b] + i.
            cos, sin = self._rope_tables_at(cache.lengths[:, None] + np.arange(t))
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        p, seed = 0.0, None
        if training and self.dropout > 0:
            p, seed = self.dropout, int(self._dropout_rng.integers(0, 2**63))
        buf = np.empty((b, t, self.num_heads, self.value_dim), self.dtype)
        cache.attend(_heads_first(q, False), _heads_first(k, False), _heads_first(v, False),
                     counts=counts, is_causal=is_causal, window=window, dropout_p=p, seed=seed,
                     out=_heads_first(buf, False))
        y: np.ndarray = self.out_proj(buf.reshape(b, t, self.num_heads * self.value_dim))
        out: np.ndarray = (y[0] if unbatched else y).astype(in_dtype, copy=False)
        return out

    def _rope_tables_at(self, positions: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """cos, sin (B, T, 1, D/2) for (B, T, H, D) heads at positions (B, T):
        the angles of ``rope_tables`` (the same float64 formula, so a position
        gets the same rotation whether it is decoded alone or in a full pass)."""
        half = self.head_dim // 2
        inv_freq = self.rope_theta ** (-np.arange(half, dtype=np.float64) * 2.0 / self.head_dim)
        angles = positions.astype(np.float64)[..., None] * inv_freq
        return (np.cos(angles).astype(self.dtype)[:, :, None, :],
                np.sin(angles).astype(self.dtype)[:, :, None, :])

    def _inputs(self, query: Any, key: Any, value: Any
                ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, bool, bool, np.dtype[Any]]:
        """Arrays in the module's dtype, and whether the projection can be
        fused: self-attention (Q, K, V from one input) or K and V from one."""
        self_attn = (key is None or key is query) and (value is None or value is query)
        if key is None:
            key = value if value is not None else query
        if value is None:
            value = key
        kv_same = key is value
        q = _input(query, "query")
        k = q if key is query else _input(key, "key")
        v = k if kv_same else _input(value, "value")
        in_dtype = q.dtype
        q, k, v = (a.astype(self.dtype, copy=False) for a in (q, k, v))
        if not self.packed:
            self_attn = kv_same = False  # different in_features: nothing to fuse
        return q, k, v, self_attn, kv_same, in_dtype

    def _check_features(self, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
        if q.ndim < 3:
            layout = (f"(B, *axes, {self.embed_dim}) with attention_axes" if self.attention_axes
                      else f"(B, L, {self.embed_dim}) or unbatched (L, {self.embed_dim})")
            raise ShapeError(f"query: expected {layout}, got shape {q.shape}")
        for name, a, want in (("query", q, self.embed_dim), ("key", k, self.kdim),
                              ("value", v, self.vdim)):
            if a.shape[-1] != want:
                what = "embed_dim" if name == "query" else ("kdim" if name == "key" else "vdim")
                raise ShapeError(f"{name}: expected last axis {want} ({what}), got shape {a.shape}")

    def _project(self, q3: np.ndarray, k3: np.ndarray, v3: np.ndarray, self_attn: bool,
                 kv_same: bool) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(B, L, F) inputs -> q (B, Lq, Hq, D), k (B, Lk, Hkv, D),
        v (B, Lk, Hkv, Dv): views of the projections' outputs, fused when
        the inputs allow (one GEMM for all three in self-attention)."""
        nq = self.q_proj.out_features
        if self_attn:
            qkv = self._packed_matmul(q3, 0)
            q, k, v = qkv[..., :nq], qkv[..., nq:nq + self.k_proj.out_features], \
                qkv[..., nq + self.k_proj.out_features:]
        elif kv_same:
            q = self.q_proj(q3)
            kv = self._packed_matmul(k3, nq)
            k, v = kv[..., :self.k_proj.out_features], kv[..., self.k_proj.out_features:]
        else:
            q, k, v = self.q_proj(q3), self.k_proj(k3), self.v_proj(v3)
        hq, hkv, d, dv = self.num_heads, self.num_kv_heads, self.head_dim, self.value_dim
        return (q.reshape(q.shape[:2] + (hq, d)), k.reshape(k.shape[:2] + (hkv, d)),
                v.reshape(v.shape[:2] + (hkv, dv)))

    def _packed_matmul(self, x3: np.ndarray, row0: int) -> np.ndarray:
        """x3 @ packed[row0:].T (+ bias): one GEMM over rows row0.. of the
        packed Q/K/V matrix; returns (B, L, rows)."""
        packed = self._in_weight
        assert packed is not None
        w = packed[row0:]
        y = affine(as_2d_rows(x3), w, None if self._in_bias is None else self._in_bias[row0:])
        return y.reshape(x3.shape[:2] + (w.shape[0],))

    def _rope(self, x: np.ndarray, inverse: bool = False) -> np.ndarray:
        """RoPE of x (B, L, H, D) along L, positions 0..L-1. ``inverse``
        rotates back (the backward: a rotation's transpose is its inverse)."""
        cos, sin = rope_tables(x.shape[1], self.head_dim, self.rope_theta, 0, self.dtype)
        return apply_rope(x, cos[:, None, :], -sin[:, None, :] if inverse else sin[:, None, :])

    def _attend(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, unbatched: bool, *,
                need_weights: bool, training: bool, **masks: Any
                ) -> Tuple[np.ndarray, Optional[np.ndarray], Optional[CoreSaved]]:
        """The core on (B, H, L, D) views; the output lands in a (B, Lq, Hq*Dv)
        buffer ready for out_proj (no transposing copy)."""
        b, lq, hq, _ = q.shape
        buf = np.empty((b, lq, hq, self.value_dim), self.dtype)
        p, seed = 0.0, None
        if training and self.dropout > 0:
            p, seed = self.dropout, int(self._dropout_rng.integers(0, 2**63))
        # Unbatched inputs go to the core unbatched, so that its mask rules
        # (and error messages) are the ones the user's shapes call for.
        q, k, v, out = (_heads_first(a, unbatched) for a in (q, k, v, buf))
        res = scaled_dot_product_attention(q, k, v, out=out, dropout_p=p, seed=seed,
                                           return_weights=need_weights, return_lse=training,
                                           **masks)
        w = res[1] if need_weights else None
        if w is not None and unbatched:
            w = w[None]
        # What the core's backward takes (only kept by training forwards).
        core = CoreSaved(q, k, v, out, res[-1], p, seed) if training else None
        return buf.reshape(b, lq, hq * self.value_dim), w, core

    def _shape_weights(self, w: np.ndarray, q_lay: SequenceLayout, k_lay: SequenceLayout,
                       unbatched: bool, average: bool, dtype: np.dtype[Any]) -> np.ndarray:
        if average:
            w = w.mean(axis=1)
        heads: Tuple[int, ...] = () if average else (self.num_heads,)
        w = w.reshape(q_lay.weights_shape(k_lay, heads))
        out: np.ndarray = (w[0] if unbatched else w).astype(dtype, copy=False)
        return out

    # -- backward -------------------------------------------------------------
    def backward(self, grad_output: Any) -> Any:
        """Gradients of the inputs of the last ``training=True`` forward.

        Parameters
        ----------
        grad_output : dL/dy, shaped like the forward's ``y``

        Returns
        -------
        Self-attention (``mha(x)``, or key and value the query array
        itself): dL/dx, one array shaped like x. Otherwise the tuple
        ``(d_query, d_key, d_value)``, each shaped like its input; when two
        arguments are the same array (``mha(q, kv)`` or ``mha(q, kv, kv)``)
        its whole gradient is at the first of them and the other is None.
        Gradients have the inputs' dtypes. Every parameter's gradient
        (projections, QK-norms) is added into ``grads``; the attention's comes
        from the fused core backward (same masks, the forward's dropout).
        """
        s: AttentionSaved = self._take_saved()
        q_lay, k_lay = s.layouts
        q3, k3, v3 = s.inputs
        shape = seq_shape(q_lay, self.output_dim)
        g = grad_input(grad_output, shape[1:] if s.unbatched else shape, self.dtype)
        g3 = q_lay.to_sequence(g[None] if s.unbatched else g)
        d_attn = linear_backward(self.out_proj, s.attn_out, g3)      # (B', Lq, Hq*Dv)
        dq, dk, dv = self._core_backward(s, d_attn, k3.shape[1])     # (B', L, H, D)
        if self.rope:
            dq, dk = self._rope(dq, inverse=True), self._rope(dk, inverse=True)
        if self.qk_norm:
            dq, dk = self.q_norm.backward(dq), self.k_norm.backward(dk)
        grads = self._project_backward(s, dq, dk, dv)
        for i in (1, 2):                   # one gradient per distinct input array
            j = s.same[i]
            if j != i and grads[i] is not None:
                gj, gi = grads[j], grads[i]
                grads[j] = gi if gj is None else gj + gi
                grads[i] = None
        out: List[Optional[np.ndarray]] = []
        for i, gr in enumerate(grads):
            if gr is not None:
                gr = (q_lay if i == 0 else k_lay).from_sequence(gr)
                gr = (gr[0] if s.unbatched else gr).astype(s.dtypes[i], copy=False)
            out.append(gr)
        if s.same == (0, 0, 0):
            return out[0]
        return tuple(out)

    def _core_backward(self, s: AttentionSaved, d_attn: np.ndarray, lk: int
                       ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """dL/d(attention output) (B', Lq, Hq*Dv) -> dq (B', Lq, Hq, D),
        dk (B', Lk, Hkv, D), dv (B', Lk, Hkv, Dv) by the fused core backward."""
        c = s.core
        assert c is not None
        b, lq = d_attn.shape[:2]
        hq, hkv, d, dv_ = self.num_heads, self.num_kv_heads, self.head_dim, self.value_dim
        dq = np.empty((b, lq, hq, d), self.dtype)
        dk = np.empty((b, lk, hkv, d), self.dtype)
        dv = np.empty((b, lk, hkv, dv_), self.dtype)
        u = s.unbatched
        dout = _heads_first(d_attn.reshape(b, lq, hq, dv_), u)
        scaled_dot_product_attention_backward(
            dout, c.q, c.k, c.v, c.out, c.lse, dropout_p=c.dropout_p, seed=c.seed,
            grads_out=(_heads_first(dq, u), _heads_first(dk, u), _heads_first(dv, u)),
            **s.masks)
        return dq, dk, dv

    def _project_backward(self, s: AttentionSaved, dq: np.ndarray, dk: np.ndarray,
                          dv: np.ndarray) -> List[Optional[np.ndarray]]:
        """Through the in-projections: gradients of q3, k3, v3 (None where the
        forward fused an input into an earlier one) and the weights'."""
        q3, k3, v3 = s.inputs
        self_attn, kv_same = s.fused
        flat = [a.reshape(a.shape[:2] + (-1,)) for a in (dq, dk, dv)]
        if self_attn:
            return [self._packed_backward(q3, np.concatenate(flat, axis=-1), 0), None, None]
        gq = linear_backward(self.q_proj, q3, flat[0])
        if kv_same:
            nq = self.q_proj.out_features
            return [gq, self._packed_backward(k3, np.concatenate(flat[1:], axis=-1), nq), None]
        return [gq, linear_backward(self.k_proj, k3, flat[1]),
                linear_backward(self.v_proj, v3, flat[2])]

    def _packed_backward(self, x3: np.ndarray, d: np.ndarray, row0: int) -> np.ndarray:
        """The backward of ``_packed_matmul(x3, row0)``: d (B, L, rows) ->
        dL/dx3 (B, L, E) with one GEMM per direction; the weight gradient is
        split among the projections the rows belong to."""
        packed = self._in_weight
        assert packed is not None
        rows, drows = as_2d_rows(x3), as_2d_rows(d)
        dw = drows.T @ rows
        db = drows.sum(axis=0) if self._in_bias is not None else None
        start = 0
        for proj in (self.q_proj, self.k_proj, self.v_proj)[1 if row0 else 0:]:
            n = proj.out_features
            proj._accumulate("weight", dw[start:start + n])
            if db is not None:
                proj._accumulate("bias", db[start:start + n])
            start += n
        dx: np.ndarray = drows @ packed[row0:]
        return dx.reshape(x3.shape)
