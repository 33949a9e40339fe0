"""``AttentionProjections``: the four linear maps of multi-head attention.

The Q, K and V projections and the output projection, with the packing of
the Q/K/V weights into one matrix, their forward, their backward and the
conversion of PyTorch's ``nn.MultiheadAttention`` names. The attention
around them (heads, norms, RoPE, the core) is ``MultiHeadAttention``'s.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from . import _core
from ._errors import DTypeError, InvalidParameterError, ShapeError
from ._frozen import PackedRows
from .linear import Linear, affine, as_2d_rows, linear_backward
from .module import Module

PROJECTION_NAMES = ("q_proj", "k_proj", "v_proj", "out_proj")
_IN_NAMES = PROJECTION_NAMES[:3]
_TORCH_IN_PROJ = ("in_proj_weight", "in_proj_bias")
_TORCH_SEPARATE = {"q_proj_weight": "q_proj.weight", "k_proj_weight": "k_proj.weight",
                   "v_proj_weight": "v_proj.weight"}

Triple = Tuple[np.ndarray, np.ndarray, np.ndarray]


class AttentionProjections(Module):
    """``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` of an attention.

    Its names are its parent's (``inline_names``): the parameters stay
    ``q_proj.weight`` … in the attention's state dict, as in PyTorch.

    When the three input projections read inputs of one width their weights
    (and biases) are views into one packed (rows, E) matrix: self-attention
    projects with a single matrix multiply. That matrix is kept packed for
    the core's GEMM too, and packed again when a projection's ``version``
    moved (a load, an assignment, an optimiser step).

    Parameters
    ----------
    q_proj, k_proj, v_proj, out_proj : Linear
        Of one dtype; they become this module's children.
    """

    inline_names = True

    def __init__(self, q_proj: Linear, k_proj: Linear, v_proj: Linear,
                 out_proj: Linear) -> None:
        super().__init__(q_proj.dtype)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = q_proj, k_proj, v_proj, out_proj
        self._pack()

    @property
    def packed(self) -> bool:
        """True when Q/K/V weights share one packed matrix (one input width)."""
        return self.q_proj.in_features == self.k_proj.in_features == self.v_proj.in_features

    @property
    def in_weight(self) -> Optional[np.ndarray]:
        """The packed (q rows + k rows + v rows, E) weight (None unless
        packed); read-only, as the parameters are (frozen: unpacked, a copy)."""
        store: Optional[PackedRows] = self.__dict__.get("_in_store")
        if store is not None:
            values = store.values()
            values.flags.writeable = False
            return values
        w: Optional[np.ndarray] = self.__dict__["_in_weight"]
        if w is None:
            return None
        view: np.ndarray = w.view()
        view.flags.writeable = False
        return view

    def _in_packed(self) -> "_core.PackedLinear":
        """``in_weight`` packed for the core's GEMM, remade when a projection's
        parameters changed or the ISA path did (frozen: the one copy)."""
        store: Optional[PackedRows] = self.__dict__.get("_in_store")
        if store is not None:
            return store.packed()
        key = (tuple(p.version for p in self._in_projs()), _core.isa())
        cached = self.__dict__.get("_in_packed_cache")
        if cached is None or cached[0] != key:
            cached = (key, _core.pack_linear(self.__dict__["_in_weight"], bf16=self.q_proj.bf16))
            self.__dict__["_in_packed_cache"] = cached
        packed: _core.PackedLinear = cached[1]
        return packed

    @property
    def in_bias(self) -> Optional[np.ndarray]:
        """The packed bias (None unless packed with biases)."""
        b: Optional[np.ndarray] = self.__dict__["_in_bias"]
        return b

    def _in_projs(self) -> Tuple[Linear, Linear, Linear]:
        return self.q_proj, self.k_proj, self.v_proj

    def _pack(self) -> None:
        """Put the Q, K, V weights (and biases) into one buffer and make the
        projections' parameters views of it (see the class notes). Frozen,
        the weights are one ``PackedRows`` already: only the biases."""
        self.__dict__["_in_weight"] = self.__dict__["_in_bias"] = None
        if not self.packed:
            return
        projs = self._in_projs()
        for attr in ("bias",) if self.frozen else ("weight", "bias"):
            if getattr(self.q_proj, attr) is None:
                continue
            packed = np.concatenate([getattr(p, attr) for p in projs])
            start = 0
            for p in projs:
                n = p.out_features
                p.share_storage(attr, packed[start:start + n])
                start += n
            self.__dict__[f"_in_{attr}"] = packed

    def add_module(self, name: str, module: Optional[Module]) -> None:
        """Replacing a projection after construction (``mha.q_proj = Linear(...)``)
        must keep its shape, and re-packs Q/K/V so the fused GEMM sees it."""
        built = "_in_weight" in self.__dict__
        if built and name in PROJECTION_NAMES:
            self._refuse_if_frozen(f"{name} (replacing a projection)")
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
        if built and name in _IN_NAMES:
            self._pack()

    def __getstate__(self) -> Dict[str, Any]:
        state = super().__getstate__()
        # The packed buffers are rebuilt on unpickling; don't store weights twice.
        state.pop("_in_weight", None)
        state.pop("_in_bias", None)
        state.pop("_in_packed_cache", None)
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        self._pack()

    def _packed_nbytes(self) -> int:
        store: Optional[PackedRows] = self.__dict__.get("_in_store")
        if store is not None:
            return store.nbytes
        cached = self.__dict__.get("_in_packed_cache")
        return int(cached[1].nbytes) if cached else 0

    def _freeze_parameters(self) -> None:
        """The fused Q/K/V matrix becomes one ``PackedRows`` whose row
        ranges are the three weights (before the projections freeze on
        their own, which would pack each apart)."""
        w = self.__dict__["_in_weight"]
        if w is None:
            return
        cached = self.__dict__.get("_in_packed_cache")
        key = (tuple(p.version for p in self._in_projs()), _core.isa())
        store = PackedRows(w, self.q_proj.bf16,
                           cached[1] if cached and cached[0] == key else None)
        start = 0
        for proj in self._in_projs():
            proj.hold_packed(store, start)
            start += proj.out_features
        self.__dict__["_in_store"] = store
        self.__dict__["_in_weight"] = None
        self.__dict__.pop("_in_packed_cache", None)

    def _convert_state_dict(self, sd: Dict[str, Any]) -> Dict[str, Any]:
        """Accept nn.MultiheadAttention's names: packed ``in_proj_weight`` /
        ``in_proj_bias`` (split into q/k/v by rows) and ``q_proj_weight`` etc."""
        out = dict(sd)
        sizes = [p.out_features for p in self._in_projs()]
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
            for name, part in zip(_IN_NAMES, parts):
                out.setdefault(f"{name}.{attr}", part)
        for torch_key, own in _TORCH_SEPARATE.items():
            if torch_key in out:
                out.setdefault(own, out.pop(torch_key))
        return out

    # -- forward --------------------------------------------------------------
    def project(self, q3: np.ndarray, k3: np.ndarray, v3: np.ndarray, self_attn: bool,
                kv_same: bool) -> Triple:
        """(B, L, F) inputs -> q (B, Lq, q rows), k, v (B, Lk, k / v rows):
        views of one GEMM's output where the inputs allow (self-attention:
        q3 is k3 is v3; ``kv_same``: k3 is v3), which needs ``packed``."""
        nq, nk = self.q_proj.out_features, self.k_proj.out_features
        if self_attn:
            qkv = self.project_rows(as_2d_rows(q3))
            qkv = qkv.reshape(q3.shape[:2] + qkv.shape[-1:])
            return qkv[..., :nq], qkv[..., nq:nq + nk], qkv[..., nq + nk:]
        # training=False: the attention's own backward differentiates the
        # projections from its saved inputs, so they keep nothing themselves
        # (in a module's train mode they would otherwise hold their inputs).
        # With k3 is v3 (``kv_same``) two products as well: in the core every
        # column has its bits whatever columns are computed beside it.
        return (self.q_proj(q3, training=False), self.k_proj(k3, training=False),
                self.v_proj(v3, training=False))

    def project_rows(self, rows: np.ndarray) -> np.ndarray:
        """Self-attention's Q/K/V of token rows (N, E) -> (N, q + k + v rows):
        one GEMM with the packed matrix. Needs ``packed``."""
        assert self.packed
        return affine(rows, self._in_packed(), self.__dict__["_in_bias"])

    def output_rows(self, rows: np.ndarray) -> np.ndarray:
        """``out_proj`` of rows (N, Hq*Dv) (the companion of ``project_rows``)."""
        out = self.out_proj
        return affine(rows, out.packed_weight(), out.bias)

    # -- backward -------------------------------------------------------------
    def output_backward(self, attn_out: np.ndarray, g: np.ndarray) -> np.ndarray:
        """dL/d(out_proj's input) from g = dL/dy; adds out_proj's gradients."""
        return linear_backward(self.out_proj, attn_out, g)

    def input_backward(self, inputs: Triple, fused: Tuple[bool, bool], dq: np.ndarray,
                       dk: np.ndarray, dv: np.ndarray) -> List[Optional[np.ndarray]]:
        """The backward of ``project(*inputs, *fused)``: dL/d(q, k, v) (B, L, rows)
        -> the gradients of q3, k3, v3 (None where the forward fused an input
        into an earlier one); the weights' gradients are accumulated."""
        q3, k3, v3 = inputs
        self_attn, kv_same = fused
        if self_attn:
            return [self._packed_backward(q3, np.concatenate((dq, dk, dv), axis=-1), 0),
                    None, None]
        gq = linear_backward(self.q_proj, q3, dq)
        if kv_same:
            nq = self.q_proj.out_features
            return [gq, self._packed_backward(k3, np.concatenate((dk, dv), axis=-1), nq), None]
        return [gq, linear_backward(self.k_proj, k3, dk), linear_backward(self.v_proj, v3, dv)]

    def _packed_backward(self, x3: np.ndarray, d: np.ndarray, row0: int) -> np.ndarray:
        """The backward of ``_packed_matmul(x3, row0)``: d (B, L, rows) ->
        dL/dx3 (B, L, E) with one GEMM per direction; the weight gradient is
        split among the projections the rows belong to."""
        packed = self.in_weight
        assert packed is not None
        rows, drows = as_2d_rows(x3), as_2d_rows(d)
        dw = drows.T @ rows
        db = drows.sum(axis=0) if self.in_bias is not None else None
        start = 0
        for proj in self._in_projs()[1 if row0 else 0:]:
            n = proj.out_features
            proj.add_grads(dw[start:start + n], None if db is None else db[start:start + n])
            start += n
        dx: np.ndarray = drows @ packed[row0:]
        return dx.reshape(x3.shape)

    def extra_repr(self) -> str:
        return f"packed={self.packed}"
