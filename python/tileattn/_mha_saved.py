"""What a training forward of MultiHeadAttention keeps for its backward,
and the helpers that check and describe the forward's inputs."""

from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Optional, Tuple, Union

import numpy as np

from ._axes import SequenceLayout
from ._call import AttentionCall
from ._errors import ShapeError
from ._validate import float_array


class CoreSaved(NamedTuple):
    """The core's inputs as it got them ((B, H, L, D) views), its output, its
    log-sum-exp and the call it ran: what its backward takes, unchecked."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    out: np.ndarray
    lse: np.ndarray
    call: AttentionCall  # the forward's checked description: masks, options, the seed drawn


class AttentionSaved(NamedTuple):
    """What a training forward of ``MultiHeadAttention`` keeps for ``backward``."""

    inputs: Tuple[np.ndarray, np.ndarray, np.ndarray]   # q3, k3, v3 (B', L, F)
    layouts: Tuple[SequenceLayout, SequenceLayout]      # query's, key/value's
    dtypes: Tuple[np.dtype[Any], np.dtype[Any], np.dtype[Any]]   # of the user's inputs
    same: Tuple[int, int, int]          # same[i]: first argument that is input i's object
    fused: Tuple[bool, bool]            # (self_attn, kv_same) projections of the forward
    unbatched: bool
    core: Optional[CoreSaved]
    masks: Dict[str, Any]
    attn_out: np.ndarray                # out_proj's input (B', Lq, Hq*Dv)


def resolved(query: Any, key: Any, value: Any) -> Tuple[Any, Any, Any]:
    """(query, key, value) with the forward's defaults: key = value = query
    when both are None, value = key when only value is None."""
    if key is None:
        key = value if value is not None else query
    return query, key, key if value is None else value


def same_inputs(query: Any, key: Any, value: Any) -> Tuple[int, int, int]:
    objs = resolved(query, key, value)
    first = [next(j for j in range(i + 1) if objs[j] is objs[i]) for i in range(3)]
    return first[0], first[1], first[2]


def dtypes_of(query: Any, key: Any, value: Any
            ) -> Tuple[np.dtype[Any], np.dtype[Any], np.dtype[Any]]:
    q, k, v = (np.asarray(a).dtype for a in resolved(query, key, value))
    return q, k, v


def seq_shape(lay: SequenceLayout, features: int) -> Tuple[int, ...]:
    """Shape of ``lay.from_sequence`` of a (B', L, features) array."""
    shape = lay.batch_shape + lay.pos_shape + (features,)
    return tuple(shape[i] for i in np.argsort(lay.perm))


def cast_inputs(query: Any, key: Any, value: Any, dtype: np.dtype[Any], packed: bool
                ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, bool, bool, np.dtype[Any]]:
    """The forward's arrays in the module's ``dtype``, whether the projection
    can be fused (self-attention: Q, K, V from one input; K and V from one;
    only ``packed`` projections fuse) and the query's dtype."""
    self_attn = (key is None or key is query) and (value is None or value is query)
    _, key, value = resolved(query, key, value)
    kv_same = key is value
    q = float_array(query, "query")
    k = q if key is query else float_array(key, "key")
    v = k if kv_same else float_array(value, "value")
    in_dtype = q.dtype
    q, k, v = (a.astype(dtype, copy=False) for a in (q, k, v))
    if not packed:
        self_attn = kv_same = False  # different in_features: nothing to fuse
    return q, k, v, self_attn, kv_same, in_dtype


def check_features(q: np.ndarray, k: np.ndarray, v: np.ndarray, widths: Tuple[int, int, int],
                   attention_axes: Any) -> None:
    """The inputs' ranks and last axes against (embed_dim, kdim, vdim)."""
    embed_dim = widths[0]
    if q.ndim < 3:
        layout = (f"(B, *axes, {embed_dim}) with attention_axes" if attention_axes
                  else f"(B, L, {embed_dim}) or unbatched (L, {embed_dim})")
        raise ShapeError(f"query: expected {layout}, got shape {q.shape}")
    for name, a, want, what in zip(("query", "key", "value"), (q, k, v), widths,
                                   ("embed_dim", "kdim", "vdim")):
        if a.shape[-1] != want:
            raise ShapeError(f"{name}: expected last axis {want} ({what}), got shape {a.shape}")


def shape_weights(w: np.ndarray, layouts: Tuple[SequenceLayout, SequenceLayout],
                  unbatched: bool, heads: Optional[int], dtype: np.dtype[Any]) -> np.ndarray:
    """The core's (B', Hq, Lq, Lk) weights in the user's layout: averaged
    over heads when ``heads`` is None, else with that head axis."""
    q_lay, k_lay = layouts
    if heads is None:
        w = w.mean(axis=1)
    w = w.reshape(q_lay.weights_shape(k_lay, () if heads is None else (heads,)))
    out: np.ndarray = (w[0] if unbatched else w).astype(dtype, copy=False)
    return out


def input_grads(grads: List[Optional[np.ndarray]], s: AttentionSaved
                ) -> Union[np.ndarray, Tuple[Optional[np.ndarray], ...]]:
    """The projections' input gradients (B', L, F) as ``backward`` returns
    them: one per distinct input array (the whole gradient at the first
    argument that is that array), in the inputs' layouts and dtypes; one
    array for self-attention."""
    grads = list(grads)
    for i in (1, 2):
        j = s.same[i]
        if j != i and grads[i] is not None:
            gj, gi = grads[j], grads[i]
            grads[j] = gi if gj is None else gj + gi
            grads[i] = None
    out: List[Optional[np.ndarray]] = []
    for i, gr in enumerate(grads):
        if gr is not None:
            gr = s.layouts[0 if i == 0 else 1].from_sequence(gr)
            gr = (gr[0] if s.unbatched else gr).astype(s.dtypes[i], copy=False)
        out.append(gr)
    if s.same == (0, 0, 0):
        assert out[0] is not None
        return out[0]
    return tuple(out)
