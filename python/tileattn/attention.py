"""``MultiHeadAttention``: its configuration, QK-norm, RoPE and the call;
the projections are an ``AttentionProjections`` child, the attention itself
tileattn's core."""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import numpy as np

from . import _validate as check
from ._axes import layouts
from ._errors import InvalidParameterError
from ._mha_config import bias_option, check_options, check_sizes
from ._mha_core import Heads, attend_heads, core_backward, heads_first, refuse_ambiguous_mask
from ._mha_decode import check_cached_call, forward_cached
from ._mha_saved import (AttentionSaved, cast_inputs, check_features, dtypes_of, input_grads,
                         same_inputs, seq_shape, shape_weights)
from ._padding import RealTokens, scatter_rows, take_rows, token_runs
from .functional import scaled_dot_product_attention
from .linear import Linear, grad_input
from ._compute_dtype import ComputeDtypeOption
from .module import Module
from .norm import LayerNorm
from .positional import apply_rope, rope_tables
from .projections import PROJECTION_NAMES, AttentionProjections
from .varlen import varlen_attention


class MultiHeadAttention(ComputeDtypeOption, Module):
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
    bias : bool or "output"
        Biases in the four projections (and the QK-norms); ``"output"``: in
        the output projection only (R's ``ag_multihead_attention``).
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
    compute_dtype : None or "bfloat16"
        "bfloat16" (float32 modules): every product (the four projections,
        ``q k^T`` and ``P v``) on bf16 operands with float32 sums; the
        softmax, norms, RoPE and the output stay float32. The projection
        weights are packed once in bf16; the float32 parameters stay the
        master copy. Steps over a ``KVCache`` use bf16 products too.

    Parameters (arrays, PyTorch layout (out_features, in_features))
    ---------------------------------------------------------------
    q_proj.weight (Hq*D, E), k_proj.weight (Hkv*D, kdim),
    v_proj.weight (Hkv*Dv, vdim), out_proj.weight (output_dim, Hq*Dv), and
    the ``.bias`` of each when ``bias``.

    Notes
    -----
    The four projections are the ``projections`` child
    (``AttentionProjections``), named as this module's own. When kdim ==
    vdim == embed_dim the Q, K and V weights are views into one packed
    (Hq*D + Hkv*D + Hkv*Dv, E) matrix: self-attention projects with a single
    matrix multiply, and loads, assignments and in-place edits of the
    separate weights are seen by it with no cache to invalidate.
    """


    def __init__(self, embed_dim: int, num_heads: int, *, num_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, value_dim: Optional[int] = None,
                 kdim: Optional[int] = None, vdim: Optional[int] = None,
                 output_dim: Optional[int] = None, bias: Any = True, dropout: float = 0.0,
                 rope: bool = False, rope_theta: float = 10000.0, qk_norm: bool = False,
                 attention_axes: Any = None, dtype: Any = np.float32,
                 seed: Optional[int] = None, compute_dtype: Any = None) -> None:
        super().__init__(dtype)
        compute = self._set_compute_dtype(compute_dtype, self.dtype)
        (self.embed_dim, self.num_heads, self.num_kv_heads, self.head_dim, self.value_dim,
         self.kdim, self.vdim, self.output_dim) = check_sizes(
            embed_dim, num_heads, num_kv_heads, head_dim, value_dim, kdim, vdim, output_dim)
        (in_bias, out_bias, self.dropout, self.rope, self.rope_theta, self.qk_norm,
         self.attention_axes, self.seed) = check_options(
            self.head_dim, bias, dropout, rope, rope_theta, qk_norm, attention_axes, seed)
        init_seq, drop_seq = np.random.SeedSequence(seed).spawn(2)
        self._dropout_rng = np.random.default_rng(drop_seq)
        rng = np.random.default_rng(init_seq)
        hq, hkv, d, dv = self.num_heads, self.num_kv_heads, self.head_dim, self.value_dim
        self.projections = AttentionProjections(
            Linear(self.embed_dim, hq * d, in_bias, self.dtype, rng, compute),
            Linear(self.kdim, hkv * d, in_bias, self.dtype, rng, compute),
            Linear(self.vdim, hkv * dv, in_bias, self.dtype, rng, compute),
            Linear(hq * dv, self.output_dim, out_bias, self.dtype, rng, compute))
        if self.qk_norm:
            self.q_norm = LayerNorm(d, bias=in_bias, dtype=self.dtype)
            self.k_norm = LayerNorm(d, bias=in_bias, dtype=self.dtype)

    # -- construction ---------------------------------------------------------
    @property
    def packed(self) -> bool:
        """True when Q/K/V weights share one packed matrix (kdim == vdim == embed_dim)."""
        return bool(self.projections.packed)

    def add_module(self, name: str, module: Optional[Module]) -> None:
        # ``mha.q_proj = Linear(...)`` replaces a projection: the projections'
        # child, whose names are this module's (see AttentionProjections).
        if name in PROJECTION_NAMES and "projections" in self._modules:
            self.projections.add_module(name, module)
        else:
            super().add_module(name, module)

    def __setstate__(self, state: Dict[str, Any]) -> None:
        mods = state["_modules"]
        if "projections" not in mods:
            # Pickled before the projections were their own module: same names.
            projs = AttentionProjections(*(mods.pop(n) for n in PROJECTION_NAMES))
            state["_modules"] = {"projections": projs, **mods}
        super().__setstate__(state)

    def reseed(self, seed: Any) -> None:
        """Restart the dropout masks from ``seed`` (an int, a SeedSequence or
        None for fresh entropy: anything ``np.random.default_rng`` takes)."""
        self._dropout_rng = np.random.default_rng(seed)

    def get_config(self) -> Dict[str, Any]:
        return {
            "embed_dim": self.embed_dim, "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim,
            "value_dim": self.value_dim, "kdim": self.kdim, "vdim": self.vdim,
            "output_dim": self.output_dim,
            "bias": bias_option(self.q_proj.bias is not None, self.out_proj.bias is not None),
            "dropout": self.dropout, "rope": self.rope, "rope_theta": self.rope_theta,
            "qk_norm": self.qk_norm,
            "attention_axes": list(self.attention_axes) if self.attention_axes else None,
            "dtype": self.dtype.name, "seed": self.seed,
            "compute_dtype": self.compute_dtype_option,
        }

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"value_dim={self.value_dim}, rope={self.rope}, qk_norm={self.qk_norm}"
                + self._compute_dtype_repr())

    # -- forward --------------------------------------------------------------
    def forward(self, query: Any, key: Any = None, value: Any = None, *,
                attn_mask: Any = None, key_padding_mask: Any = None, is_causal: bool = False,
                window: Any = None, causal_alignment: str = "bottom_right",
                need_weights: bool = False, average_attn_weights: bool = True,
                training: bool = False, cache: Any = None) -> Any:
        """Attend from ``query`` to ``key``/``value``.

        Parameters
        ----------
        query : (B, Lq, E) or unbatched (Lq, E); (B, *S, E) with attention_axes
        key : (B, Lk, kdim), optional
            None: self-attention (key = value = query).
        value : (B, Lk, vdim), optional
            None: value = key (``mha(q, kv)``).
        attn_mask : bool, int or float: (Lq, Lk) or (B, Hq, Lq, Lk) (NumPy broadcasting)
            Bool True (int nonzero) = may attend; float is added to the
            scores. A 3-D mask is refused when the input is batched (NumPy,
            Keras and PyTorch each read it differently): Keras' (B, Lq, Lk)
            is ``mask[:, None]``, PyTorch's (B*Hq, Lq, Lk) is
            ``mask.reshape(B, Hq, Lq, Lk)``. Unbatched, (Hq, Lq, Lk) as in PyTorch.
        key_padding_mask : bool or int (B, Lk), True (nonzero) = real token
            The opposite of PyTorch's polarity (there True = ignore).
        is_causal, window, causal_alignment
            As in ``scaled_dot_product_attention``: bottom-right aligned by
            default, ``causal_alignment="top_left"`` for PyTorch's and Keras'
            causal masks when Lq != Lk. A cache always aligns bottom-right
            (its queries are the newest tokens).
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
        for name, option in (("need_weights", need_weights), ("training", training),
                             ("average_attn_weights", average_attn_weights)):
            check.flag(name, option)
        if cache is not None:
            if training:
                self._save(None)     # a cached forward keeps nothing to differentiate
            if causal_alignment != "bottom_right":
                raise InvalidParameterError(
                    "causal_alignment: a cache's queries are its newest tokens, so its causal "
                    f"and window masks align bottom-right; got {causal_alignment!r}")
            cache = check_cached_call(self, cache, query, key, value, attn_mask, need_weights)
            return forward_cached(self, query, cache, key_padding_mask=key_padding_mask,
                                  is_causal=is_causal, window=window, training=training)
        q_in, k_in, v_in, self_attn, kv_same, out_dtype = cast_inputs(
            query, key, value, self.dtype, self.packed)
        unbatched = q_in.ndim == 2 and self.attention_axes is None
        if unbatched:
            q_in, k_in, v_in = q_in[None], k_in[None], v_in[None]
        check_features(q_in, k_in, v_in, (self.embed_dim, self.kdim, self.vdim),
                       self.attention_axes)
        q_lay, k_lay = layouts(q_in, k_in, v_in, self.attention_axes)
        q3 = q_lay.to_sequence(q_in)
        k3 = q3 if self_attn else k_lay.to_sequence(k_in)
        v3 = k3 if kv_same else k_lay.to_sequence(v_in)
        if not unbatched:
            refuse_ambiguous_mask(attn_mask, q3.shape[0], self.num_heads, q3.shape[1], k3.shape[1])

        q, k, v = self.split_heads(*self.projections.project(q3, k3, v3, self_attn, kv_same))
        q, k = self.norm_and_rotate(q, k, training=training)
        masks = {"attn_mask": attn_mask, "key_padding_mask": key_padding_mask,
                 "is_causal": is_causal, "window": window,
                 "causal_alignment": causal_alignment}
        y, w, core = attend_heads(q, k, v, unbatched, self.value_dim,
                                  dropout=self.dropout_draw(training),
                                  need_weights=need_weights, training=training, masks=masks,
                                  compute_dtype=self.compute_dtype_option)
        if training:
            self._save(AttentionSaved(
                inputs=(q3, k3, v3), layouts=(q_lay, k_lay), dtypes=dtypes_of(query, key, value),
                same=same_inputs(query, key, value), fused=(self_attn, kv_same),
                unbatched=unbatched, core=core, masks=masks, attn_out=y))
        y = self.out_proj(y, training=False)   # its backward runs in self.projections
        y = q_lay.from_sequence(y)[0] if unbatched else q_lay.from_sequence(y)
        y = y.astype(out_dtype, copy=False)
        if w is None:
            return y
        heads = None if average_attn_weights else self.num_heads
        return y, shape_weights(w, (q_lay, k_lay), unbatched, heads, out_dtype)

    def forward_rows(self, rows: np.ndarray, real: RealTokens, *, is_causal: bool = False,
                     window: Any = None) -> np.ndarray:
        """Self-attention (inference) of the real tokens of a padded batch.

        rows (N, E) are the real tokens of a (B, L) batch; ``real`` is (mask,
        their flat positions, the padding's) as ``padding_rows`` gives it. The
        projections run on the N rows. When each sequence's real tokens form
        one run (right or left padding), the attention core takes them
        packed end to end (``varlen_attention``): nothing is computed or
        moved for the padding, and a sequence has the same bits in any
        batch. Otherwise Q/K/V are scattered into a
        zeroed (B, L) layout for the QK-norms, RoPE (positions are those of
        the layout) and the core, and its output gathered back. Needs
        ``packed``. Returns (N, output_dim).
        """
        mask, idx, _ = real
        b, length = mask.shape
        qkv_rows = self.projections.project_rows(rows)
        runs = token_runs(mask)
        if runs is not None:
            return self._attend_packed(qkv_rows, runs, is_causal, window)
        # Zeros, not garbage, at the padding: masked keys' values still meet
        # zero weights (0 * NaN would not be 0).
        qkv = scatter_rows(qkv_rows, real, (b, length, qkv_rows.shape[1]), self.dtype)
        q, k, v = self._split_fused(qkv)
        q, k = self.norm_and_rotate(q, k)
        out = np.empty((b, length, self.num_heads, self.value_dim), self.dtype)
        scaled_dot_product_attention(heads_first(q), heads_first(k), heads_first(v),
                                     key_padding_mask=mask, is_causal=is_causal, window=window,
                                     out=heads_first(out), compute_dtype=self.compute_dtype_option)
        return self.projections.output_rows(
            take_rows(out.reshape(b * length, self.num_heads * self.value_dim), idx))

    def _attend_packed(self, qkv_rows: np.ndarray, runs: Tuple[np.ndarray, np.ndarray],
                       is_causal: bool, window: Any) -> np.ndarray:
        """forward_rows for sequences packed end to end: qkv_rows (N, nq+nk+nv)
        holds sequence i's tokens, at positions first[i] .. first[i] +
        lengths[i] - 1 of the padded layout, one sequence after another.
        Returns (N, output_dim)."""
        first, lengths = runs
        n = qkv_rows.shape[0]
        q, k, v = self._split_fused(qkv_rows[np.newaxis])
        offsets = np.concatenate(([0], np.cumsum(lengths)))
        positions = None
        if self.rope:     # each token's place in the padded layout, as the scatter path has it
            positions = (np.arange(n) + np.repeat(first - offsets[:-1], lengths))[np.newaxis]
        q, k = self.norm_and_rotate(q, k, positions=positions)
        out = varlen_attention(q[0], k[0], v[0], offsets, is_causal=is_causal, window=window,
                               compute_dtype=self.compute_dtype_option)
        return self.projections.output_rows(out.reshape(n, self.num_heads * self.value_dim))

    def _split_fused(self, qkv: np.ndarray) -> Heads:
        """The fused projection's (B, L, nq + nk + nv) columns as heads (views)."""
        nq, nk = self.q_proj.out_features, self.k_proj.out_features
        return self.split_heads(qkv[..., :nq], qkv[..., nq:nq + nk], qkv[..., nq + nk:])

    def split_heads(self, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> Heads:
        """Projections (B, L, H*D) -> q (B, Lq, Hq, D), k (B, Lk, Hkv, D),
        v (B, Lk, Hkv, Dv) (views)."""
        hq, hkv, d, dv = self.num_heads, self.num_kv_heads, self.head_dim, self.value_dim
        return (q.reshape(q.shape[:2] + (hq, d)), k.reshape(k.shape[:2] + (hkv, d)),
                v.reshape(v.shape[:2] + (hkv, dv)))

    def norm_and_rotate(self, q: np.ndarray, k: np.ndarray, *, training: bool = False,
                         positions: Optional[np.ndarray] = None
                         ) -> Tuple[np.ndarray, np.ndarray]:
        """The QK-norms, then RoPE at positions 0..L-1 (or at ``positions``
        (B, L)) of (B, L, H, D) heads, as configured."""
        if self.qk_norm:
            q, k = self.q_norm(q, training=training), self.k_norm(k, training=training)
        if self.rope:
            q, k = self._rope(q, positions), self._rope(k, positions)
        return q, k

    def _rope(self, x: np.ndarray, positions: Optional[np.ndarray] = None,
              inverse: bool = False) -> np.ndarray:
        """RoPE of x (B, L, H, D) at positions 0..L-1 of L, or at ``positions``
        (B, L) (read from the one table that spans them: a position gets the
        same rotation in every call). ``inverse`` rotates back (the
        backward: a rotation's transpose is its inverse)."""
        if positions is None:
            cos, sin = rope_tables(x.shape[1], self.head_dim, self.rope_theta, 0, self.dtype)
        else:
            lo = int(positions.min())
            cos, sin = rope_tables(int(positions.max()) - lo + 1, self.head_dim,
                                   self.rope_theta, lo, self.dtype)
            cos, sin = cos[positions - lo], sin[positions - lo]
        cos, sin = cos[..., None, :], sin[..., None, :]
        return apply_rope(x, cos, -sin if inverse else sin)

    def dropout_draw(self, training: bool) -> Tuple[float, Optional[int]]:
        """The attention dropout's rate and core seed for one call (draws
        from the module's dropout stream only when it applies)."""
        if training and self.dropout > 0:
            return self.dropout, int(self._dropout_rng.integers(0, 2**63))
        return 0.0, None

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
        shape = seq_shape(q_lay, self.output_dim)
        g = grad_input(grad_output, shape[1:] if s.unbatched else shape, self.dtype)
        g3 = q_lay.to_sequence(g[None] if s.unbatched else g)
        d_attn = self.projections.output_backward(s.attn_out, g3)    # (B', Lq, Hq*Dv)
        dq, dk, dv = core_backward(s, d_attn)                            # (B', L, H, D)
        if self.rope:
            dq, dk = self._rope(dq, inverse=True), self._rope(dk, inverse=True)
        if self.qk_norm:
            dq, dk = self.q_norm.backward(dq), self.k_norm.backward(dk)
        # Explicit sizes: an empty batch has no -1 to infer.
        flat = [a.reshape(a.shape[:2] + (a.shape[2] * a.shape[3],)) for a in (dq, dk, dv)]
        return input_grads(self.projections.input_backward(s.inputs, s.fused, *flat), s)
