"""What a training forward of MultiHeadAttention keeps for its backward,
and the helpers that describe the forward's inputs."""

from __future__ import annotations

from typing import Any, Dict, NamedTuple, Optional, Tuple

import numpy as np

from ._axes import SequenceLayout


class CoreSaved(NamedTuple):
    """The core's inputs as it got them ((B, H, L, D) views), its output, its
    log-sum-exp and the dropout it drew: what its backward takes."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    out: np.ndarray
    lse: np.ndarray
    dropout_p: float
    seed: Optional[int]


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
