"""The functional attention API: validation and shaping in Python, the
computation in C++ (``tileattn._core``) with the GIL released."""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass
from typing import Any, Optional, Tuple, Union, cast

import numpy as np

from . import _core
from ._errors import DTypeError, InvalidParameterError, ShapeError

ArrayLike = Any
Window = Union[int, Tuple[int, int], None]

_NATIVE = (np.dtype(np.float32), np.dtype(np.float64))
_FLOAT_INPUTS = (np.dtype(np.float16),) + _NATIVE


def _shape(a: np.ndarray) -> str:
    return "(" + ", ".join(str(s) for s in a.shape) + ("," if a.ndim == 1 else "") + ")"


def _as_input(x: ArrayLike, name: str) -> np.ndarray:
    a = x if isinstance(x, np.ndarray) else np.asarray(x)
    if a.dtype not in _FLOAT_INPUTS:
        raise DTypeError(
            f"{name}: expected float16, float32 or float64, got {a.dtype} with shape {_shape(a)}"
        )
    return a


def _kernel_array(a: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """a in the compute dtype, aligned, with strides in whole elements (copying
    only when one of those does not hold already; strided views pass as is)."""
    if a.dtype != dtype:
        return a.astype(dtype)
    if not a.flags.aligned or any(s % a.itemsize for s in a.strides):
        return np.array(a, dtype=dtype, copy=True)
    return a


# The kernel takes queries in blocks of 96 rows and reads all of K and V
# once per block. When K or V rows are not dense (e.g. head views of a fused
# (B, L, 3 * H * D) projection, rows kilobytes apart) those repeated reads
# defeat the hardware prefetchers and collide in a few cache sets; a single
# dense copy (O(K + V) memory, never O(L^2)) is then much cheaper. The copy
# runs in the core on the pool: NumPy's, one thread gathering 256-byte rows,
# took 9-25 ms per 17 MB array, up to a quarter of the attention's time at
# (1, 16, 4096, 4096, 64) causal.
_DENSE_COPY_MIN_QUERIES = 2 * 96


def _dense_rows(a: np.ndarray) -> np.ndarray:
    """a itself if each (batch, head) is one dense (L, D) block, else a copy."""
    item = a.itemsize
    if a.strides[-1] == item and a.strides[-2] == a.shape[-1] * item:
        return a
    if a.strides[-2] == 0:
        return a  # a broadcast: every row is the same memory (a copy could be huge)
    dense = np.empty(a.shape, a.dtype)
    _core.copy_dense(a, dense)
    return dense


def _check_qkv(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
    if q.ndim not in (3, 4):
        raise ShapeError(
            f"q: expected (B, Hq, Lq, D) or unbatched (Hq, Lq, D), got shape {_shape(q)}"
        )
    for name, a in (("k", k), ("v", v)):
        if a.ndim != q.ndim:
            raise ShapeError(
                f"{name}: expected a {q.ndim}-D array like q {_shape(q)}, got shape {_shape(a)}"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise DTypeError(
            f"q, k and v must share one dtype; got q {q.dtype}, k {k.dtype}, v {v.dtype}"
        )
    if q.ndim == 4 and not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ShapeError(
            f"q, k, v: batch sizes differ: q {_shape(q)}, k {_shape(k)}, v {_shape(v)}"
        )
    if k.shape[:-1] != v.shape[:-1]:
        raise ShapeError(
            f"k and v must agree on all but the last axis: k {_shape(k)}, v {_shape(v)}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ShapeError(
            f"q and k must share the head size D (last axis): q {_shape(q)}, k {_shape(k)}"
        )
    hq, hkv = q.shape[-3], k.shape[-3]
    if hkv == 0 and hq != 0 or hkv != 0 and hq % hkv != 0:
        raise ShapeError(
            f"q has {hq} heads and k/v have {hkv}: the query heads must be a whole multiple "
            f"of the key/value heads (grouped-query attention); q {_shape(q)}, k {_shape(k)}"
        )


@dataclass(frozen=True)
class _QKV:
    """q, k, v checked, with what the forward and the backward derive from
    them: one place, so that both passes accept exactly the same inputs."""

    q: np.ndarray  # as given (unbatched: 3-D)
    k: np.ndarray
    v: np.ndarray
    q4: np.ndarray  # with the batch axis, as the kernel takes them
    k4: np.ndarray
    v4: np.ndarray
    batched: bool
    in_dtype: np.dtype[Any]
    dtype: np.dtype[Any]  # the kernel's: float16 is computed in float32

    @property
    def scores_shape(self) -> tuple[int, int, int, int]:
        """(B, Hq, Lq, Lk), with B = 1 for unbatched inputs."""
        b, hq, lq, _ = self.q4.shape
        return b, hq, lq, self.k4.shape[2]

    @property
    def out_shape4(self) -> tuple[int, int, int, int]:
        """(B, Hq, Lq, Dv), with B = 1 for unbatched inputs."""
        b, hq, lq, _ = self.scores_shape
        return b, hq, lq, self.v4.shape[3]

    @property
    def out_shape(self) -> tuple[int, ...]:
        """The output's shape as the caller sees it (no B when unbatched)."""
        return self.out_shape4 if self.batched else self.out_shape4[1:]

    def attn_mask(self, mask: Optional[ArrayLike]) -> Optional[np.ndarray]:
        """The checked mask broadcast to the scores, or None without one."""
        if mask is None:
            return None
        return _attn_mask(mask, self.scores_shape, self.dtype, self.batched)

    def key_padding(self, mask: Optional[ArrayLike]) -> Optional[np.ndarray]:
        """The checked (B, Lk) padding mask, or None without one."""
        if mask is None:
            return None
        b, _, _, lk = self.scores_shape
        return _key_padding(mask, b, lk, self.batched)


def _qkv(q: ArrayLike, k: ArrayLike, v: ArrayLike) -> _QKV:
    """Checks q, k, v (dtypes, ranks, matching shapes) as both passes take them."""
    qa, ka, va = _as_input(q, "q"), _as_input(k, "k"), _as_input(v, "v")
    _check_qkv(qa, ka, va)
    batched = qa.ndim == 4
    q4, k4, v4 = (a if batched else a[np.newaxis] for a in (qa, ka, va))
    dtype = qa.dtype if qa.dtype in _NATIVE else np.dtype(np.float32)
    return _QKV(qa, ka, va, q4, k4, v4, batched, qa.dtype, dtype)


_WINDOW_MAX = 2**62  # more keys than any array can hold


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise InvalidParameterError(f"{name}: expected a bool, got {value!r}")


def _window_bounds(window: Window, is_causal: bool) -> tuple[int, int]:
    """(left, right) key offsets around the aligned query; -1 = unbounded."""
    _check_bool("is_causal", is_causal)
    left, right = -1, -1
    if window is not None:
        if isinstance(window, (bool, np.bool_)):
            raise InvalidParameterError(
                f"window: expected an int W >= 1 or a pair (left, right), got {window!r}"
            )
        if isinstance(window, numbers.Integral):
            w = int(window)
            if w < 1:
                raise InvalidParameterError(f"window: an int window must be >= 1, got {w}")
            left, right = w - 1, 0
        else:
            try:
                pair = cast(Tuple[Any, Any], window)
                left, right = (operator.index(x) for x in pair)
            except (TypeError, ValueError):
                raise InvalidParameterError(
                    f"window: expected an int W >= 1 or a pair of ints (left, right), "
                    f"got {window!r}"
                ) from None
            if left < -1 or right < -1:
                raise InvalidParameterError(
                    f"window: (left, right) must each be >= 0, or -1 for unbounded; "
                    f"got ({left}, {right})"
                )
    # A bound past any sequence length is no bound at all; clamping keeps the
    # kernel's int64 index arithmetic (i + Lk - Lq + right) from overflowing
    # and lets windows >= 2**63 pass to it at all.
    left, right = min(left, _WINDOW_MAX), min(right, _WINDOW_MAX)
    if is_causal:
        right = 0 if right == -1 else min(right, 0)
    return left, right


def _scale_value(scale: Optional[float], d: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(d) if d > 0 else 1.0
    if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, numbers.Real):
        raise InvalidParameterError(f"scale: expected a real number, got {scale!r}")
    s = float(scale)
    if not math.isfinite(s):
        raise InvalidParameterError(f"scale: expected a finite number, got {s}")
    return s


def _dropout(dropout_p: float, seed: Optional[int]) -> tuple[float, int]:
    if isinstance(dropout_p, (bool, np.bool_)) or not isinstance(dropout_p, numbers.Real):
        raise InvalidParameterError(f"dropout_p: expected a number in [0, 1], got {dropout_p!r}")
    p = float(dropout_p)
    if not 0.0 <= p <= 1.0:
        raise InvalidParameterError(f"dropout_p: expected a number in [0, 1], got {p}")
    if seed is None:
        seed = int(np.random.SeedSequence().generate_state(1, np.uint64)[0]) if p > 0 else 0
    elif isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral):
        raise InvalidParameterError(f"seed: expected an int in [0, 2**64), got {seed!r}")
    seed = int(seed)
    if not 0 <= seed < 2**64:
        raise InvalidParameterError(f"seed: expected an int in [0, 2**64), got {seed}")
    return p, seed


@dataclass(frozen=True)
class _Options:
    """The checked scalar options, in the form the kernel takes them."""

    left: int  # window bounds; -1 = unbounded
    right: int
    scale: float
    dropout_p: float
    seed: int


def _options(window: Window, is_causal: bool, scale: Optional[float], d: int,
             dropout_p: float, seed: Optional[int]) -> _Options:
    """Checks the options that the forward and the backward share, in the
    order both report them (window and is_causal, scale, dropout_p and seed)."""
    left, right = _window_bounds(window, is_causal)
    scale_v = _scale_value(scale, d)
    p, seed_v = _dropout(dropout_p, seed)
    return _Options(left, right, scale_v, p, seed_v)


def _attn_mask(mask: ArrayLike, target: tuple[int, ...], dtype: np.dtype[Any],
               batched: bool) -> np.ndarray:
    m = mask if isinstance(mask, np.ndarray) else np.asarray(mask)
    if m.dtype == np.bool_:
        kind = "bool"
    elif m.dtype.kind == "f":
        kind = "float"
    else:
        raise DTypeError(
            f"attn_mask: expected bool (True = may attend) or float (added to the scores), "
            f"got {m.dtype}"
        )
    full = target if batched else target[1:]
    if m.ndim > len(full):
        raise ShapeError(
            f"attn_mask: shape {_shape(m)} has more axes than the scores {full}"
        )
    try:
        view = np.broadcast_to(m, full)
    except ValueError:
        names = "(B, Hq, Lq, Lk)" if batched else "(Hq, Lq, Lk)"
        raise ShapeError(
            f"attn_mask: shape {_shape(m)} does not broadcast to the scores {names} = {full}"
        ) from None
    if not batched:
        view = view[np.newaxis]
    if kind == "float":
        if m.dtype != dtype or not m.flags.aligned:
            # Cast the mask at its own (small) shape, then broadcast again.
            view = np.broadcast_to(m.astype(dtype), full)
            view = view if batched else view[np.newaxis]
    elif not m.flags.aligned:
        view = np.broadcast_to(m.copy(), full)
        view = view if batched else view[np.newaxis]
    return view


def _key_padding(mask: ArrayLike, b: int, lk: int, batched: bool) -> np.ndarray:
    m = mask if isinstance(mask, np.ndarray) else np.asarray(mask)
    if m.dtype != np.bool_:
        if m.dtype.kind in "iu" and m.size and np.all((m == 0) | (m == 1)):
            m = m.astype(bool)  # a tokenizer's 1/0 attention mask
        elif m.dtype.kind in "iu" and not m.size:
            m = m.astype(bool)
        else:
            raise DTypeError(
                f"key_padding_mask: expected bool (True = real token) or 0/1 integers, "
                f"got {m.dtype}"
            )
    full = (b, lk) if batched else (lk,)
    try:
        view = np.broadcast_to(m, full)
    except ValueError:
        names = "(B, Lk)" if batched else "(Lk,)"
        raise ShapeError(
            f"key_padding_mask: expected shape {names} = {full}, got {_shape(m)}"
        ) from None
    return view if batched else view[np.newaxis]


def _key_lengths(lengths: ArrayLike, b: int, lk: int, batched: bool) -> np.ndarray:
    """Validated key lengths as the kernel takes them: contiguous int64 (B,)."""
    if isinstance(lengths, (bool, np.bool_)):
        raise DTypeError(f"key_lengths: expected integers, got {lengths!r}")
    n = lengths if isinstance(lengths, np.ndarray) else np.asarray(lengths)
    if n.dtype.kind not in "iu":
        raise DTypeError(f"key_lengths: expected integers, got dtype {n.dtype}")
    want = (b,) if batched else ()
    if n.shape != want:
        names = "(B,)" if batched else "a scalar (unbatched)"
        raise ShapeError(f"key_lengths: expected shape {names} = {want}, got {_shape(n)}")
    n = np.ascontiguousarray(n.reshape(b), dtype=np.int64)
    bad = np.flatnonzero((n < 0) | (n > lk))
    if bad.size:
        i = int(bad[0])
        raise InvalidParameterError(
            f"key_lengths: entry {i} is {int(n[i])}, expected 0 <= length <= Lk = {lk}")
    return n


def _prefix_lengths(kpm: np.ndarray) -> Optional[np.ndarray]:
    """The lengths of a (B, Lk) padding mask of prefix form (real tokens,
    then padding, in every row), or None when it has another form."""
    n = kpm.sum(axis=1, dtype=np.int64)
    if np.array_equal(kpm, np.arange(kpm.shape[1])[None, :] < n[:, None]):
        return np.ascontiguousarray(n)
    return None


def _kernel_can_write(out: np.ndarray, dtype: np.dtype[Any],
                      inputs: Tuple[np.ndarray, ...]) -> bool:
    """Whether the kernel may write into a caller's (checked) array as it is:
    its compute dtype, aligned whole-element strides, and no overlap with an
    input (the kernel reads those while it writes)."""
    return (
        out.dtype == dtype
        and out.flags.aligned
        and not any(s % out.itemsize for s in out.strides)
        and not any(np.may_share_memory(out, a) for a in inputs)
    )


def _check_out(out: Any, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    if not isinstance(out, np.ndarray):
        raise InvalidParameterError(f"out: expected a numpy array, got {type(out).__name__}")
    if out.shape != shape:
        raise ShapeError(f"out: expected shape {shape}, got {_shape(out)}")
    if out.dtype != dtype:
        raise DTypeError(f"out: expected dtype {dtype} (the inputs' dtype), got {out.dtype}")
    if not out.flags.writeable:
        raise InvalidParameterError("out: array is read-only")
    return out


def scaled_dot_product_attention(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    *,
    attn_mask: Optional[ArrayLike] = None,
    key_padding_mask: Optional[ArrayLike] = None,
    key_lengths: Optional[ArrayLike] = None,
    is_causal: bool = False,
    window: Window = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    seed: Optional[int] = None,
    return_weights: bool = False,
    return_lse: bool = False,
    out: Optional[np.ndarray] = None,
) -> Union[np.ndarray, Tuple[np.ndarray, np.ndarray], Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Multi-head scaled dot-product attention, ``softmax(q k^T * scale + mask) v``.

    Parameters
    ----------
    q : array, shape (B, Hq, Lq, D) or unbatched (Hq, Lq, D)
    k : array, shape (B, Hkv, Lk, D) or (Hkv, Lk, D)
        ``Hq`` must be a multiple of ``Hkv``: query head ``h`` uses key/value
        head ``h // (Hq // Hkv)`` (grouped-query / multi-query attention).
    v : array, shape (B, Hkv, Lk, Dv) or (Hkv, Lk, Dv)
    attn_mask : bool or float array broadcastable to (B, Hq, Lq, Lk), optional
        Bool: True means "may attend". Float: added to the scaled scores
        (``-inf`` blocks). Broadcast by strides, never expanded in memory.
    key_padding_mask : bool array (B, Lk) (or (Lk,) unbatched), optional
        True marks a real token, False padding. 0/1 integer masks (as
        tokenizers return) are accepted. Note: PyTorch's polarity is the
        opposite (True = ignore). A mask of prefix form (each row all True,
        then all False) without causal/window options is passed to the
        kernel as key lengths, so it stops at each sequence's end.
    key_lengths : int array (B,) (a scalar unbatched), optional
        Ragged batches: item b has only keys ``[0, key_lengths[b])``; the
        keys past it are never read (no time is spent on padding). Causal
        and window masks align with each item's own length: query ``i``
        sees key ``j`` iff ``j <= i + key_lengths[b] - Lq``, as if the item
        were alone with ``Lk = key_lengths[b]``.
    is_causal : bool
        Bottom-right aligned: query ``i`` sees key ``j`` iff ``j <= i + Lk - Lq``.
    window : int W or (left, right), optional
        Query ``i`` (aligned as above) sees keys ``i' - left <= j <= i' + right``;
        -1 is unbounded. An int ``W`` means ``(W - 1, 0)`` and implies causal.
        Key blocks outside the window are never computed.
    scale : float, optional
        Default ``1 / sqrt(D)``.
    dropout_p : float in [0, 1]
        Dropout on the attention weights (kept weights scaled by 1/(1-p)).
    seed : int, optional
        Makes dropout reproducible; drawn at random when omitted.
    return_weights : bool
        Also return the (B, Hq, Lq, Lk) attention weights (after dropout).
        This materialises the full matrix; the output alone never does.
    return_lse : bool
        Also return the per-row log-sum-exp of the scaled, masked scores
        (natural log; ``-inf`` for a row that sees no key), shape (B, Hq, Lq).
        It is what ``scaled_dot_product_attention_backward`` needs to
        recompute the weights. Always float64: rounded to float32 it would
        cost the recomputed weights digits when the scores are large.
    out : array (B, Hq, Lq, Dv), optional
        Preallocated output of the inputs' dtype; may be a strided view.

    Returns
    -------
    out : array (B, Hq, Lq, Dv), the inputs' dtype
    weights : array (B, Hq, Lq, Lk), only with ``return_weights=True``
    lse : array (B, Hq, Lq), only with ``return_lse=True`` (always last)

    A query row that can see no key gives zeros (and zero weights).
    float16 inputs are computed in float32 and returned as float16.
    """
    qkv = _qkv(q, k, v)
    b, hq, lq, lk = qkv.scores_shape

    opts = _options(window, is_causal, scale, qkv.q.shape[-1], dropout_p, seed)
    _check_bool("return_weights", return_weights)
    _check_bool("return_lse", return_lse)

    mask = qkv.attn_mask(attn_mask)
    kpm = qkv.key_padding(key_padding_mask)
    lengths = None
    if key_lengths is not None:
        lengths = _key_lengths(key_lengths, b, lk, qkv.batched)
    elif kpm is not None and opts.left == -1 and opts.right == -1:
        # Same keys either way, and with lengths the kernel stops reading at
        # each sequence's end. (With causal/window options the two differ:
        # lengths also move the diagonal, so the mask is kept as it is.)
        lengths = _prefix_lengths(kpm)
        kpm = None if lengths is not None else kpm
    if out is not None:
        out = _check_out(out, qkv.out_shape, qkv.in_dtype)

    # The weights first: when they cannot be had (MemoryError), nothing else
    # has been allocated or copied yet.
    weights = np.zeros((b, hq, lq, lk), qkv.dtype) if return_weights else None
    q4, k4, v4 = (_kernel_array(a, qkv.dtype) for a in (qkv.q4, qkv.k4, qkv.v4))
    if lq >= _DENSE_COPY_MIN_QUERIES:
        k4, v4 = _dense_rows(k4), _dense_rows(v4)
    # Compute into `out` directly when we can; otherwise into a fresh array.
    direct = out is not None and _kernel_can_write(out, qkv.dtype, (qkv.q, qkv.k, qkv.v))
    if direct:
        assert out is not None
        result = out if qkv.batched else out[np.newaxis]
    else:
        result = np.empty(qkv.out_shape4, qkv.dtype)
    lse = np.full((b, hq, lq, 1), -np.inf, np.float64) if return_lse else None

    _core.attention_forward(
        q4, k4, v4, result,
        scale=opts.scale, window_left=opts.left, window_right=opts.right,
        mask=mask, key_padding=kpm, dropout_p=opts.dropout_p, seed=opts.seed,
        weights=weights, lse=lse, key_lengths=lengths,
    )

    if not qkv.batched:
        result = result[0]
        weights = weights[0] if weights is not None else None
    if out is not None:
        if not direct:
            out[...] = result
        result = out  # (unbatched, direct: result was a view of it)
    elif result.dtype != qkv.in_dtype:
        result = result.astype(qkv.in_dtype)
    extra: list[np.ndarray] = []
    if weights is not None:
        extra.append(weights if weights.dtype == qkv.in_dtype else weights.astype(qkv.in_dtype))
    if lse is not None:
        extra.append(lse[..., 0] if qkv.batched else lse[0, ..., 0])
    if extra:
        return cast(Tuple[np.ndarray, np.ndarray], (result, *extra))
    return result
