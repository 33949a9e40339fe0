"""The argument checks of an attention call, each naming the argument it
refuses: q/k/v, the window and causal flag, scale, dropout and seed, the
masks, key lengths and a caller's ``out``. ``_call.describe`` runs them once
at the edge; nothing further in checks them again."""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any, Callable, Optional, Tuple, Union, cast

import numpy as np

from . import _core
from ._errors import DTypeError, InvalidParameterError, ShapeError
from ._overlap import may_overlap
from ._validate import (INPUT_DTYPES, FLOAT_NAMES, entries_within, flag, is_bfloat16,
                        native_byte_order, shape_str)

ArrayLike = Any
Window = Union[int, Tuple[int, int], None]

# The dtypes the kernel computes in, and those it also takes (float16 and
# bfloat16 are computed in float32).
NATIVE = (np.dtype(np.float32), np.dtype(np.float64))
FLOAT_INPUTS = INPUT_DTYPES


def as_input(x: ArrayLike, name: str) -> np.ndarray:
    a = native_byte_order(x if isinstance(x, np.ndarray) else np.asarray(x))
    if a.dtype not in FLOAT_INPUTS:
        raise DTypeError(
            f"{name}: expected {FLOAT_NAMES}, got {a.dtype} with shape "
            f"{shape_str(a.shape)}"
        )
    return a


def kernel_array(a: np.ndarray, dtype: np.dtype) -> np.ndarray:
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
DENSE_COPY_MIN_QUERIES = 2 * 96


def dense_rows(a: np.ndarray) -> np.ndarray:
    """a itself if each (batch, head) is one dense (L, D) block, else a copy."""
    item = a.itemsize
    if a.strides[-1] == item and a.strides[-2] == a.shape[-1] * item:
        return a
    if a.strides[-2] == 0:
        return a  # a broadcast: every row is the same memory (a copy could be huge)
    dense = np.empty(a.shape, a.dtype)
    _core.copy_dense(a, dense)
    return dense


def check_qkv(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
    if q.ndim not in (3, 4):
        raise ShapeError(
            f"q: expected (B, Hq, Lq, D) or unbatched (Hq, Lq, D), got shape {shape_str(q.shape)}"
        )
    for name, a in (("k", k), ("v", v)):
        if a.ndim != q.ndim:
            raise ShapeError(
                f"{name}: expected a {q.ndim}-D array like q {shape_str(q.shape)}, got shape {shape_str(a.shape)}"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise DTypeError(
            f"q, k and v must share one dtype; got q {q.dtype}, k {k.dtype}, v {v.dtype}"
        )
    if q.ndim == 4 and not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ShapeError(
            f"q, k, v: batch sizes differ: q {shape_str(q.shape)}, k {shape_str(k.shape)}, v {shape_str(v.shape)}"
        )
    if k.shape[:-1] != v.shape[:-1]:
        raise ShapeError(
            f"k and v must agree on all but the last axis: k {shape_str(k.shape)}, v {shape_str(v.shape)}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ShapeError(
            f"q and k must share the head size D (last axis): q {shape_str(q.shape)}, k {shape_str(k.shape)}"
        )
    hq, hkv = q.shape[-3], k.shape[-3]
    if hkv == 0 and hq != 0 or hkv != 0 and hq % hkv != 0:
        raise ShapeError(
            f"q has {hq} heads and k/v have {hkv}: the query heads must be a whole multiple "
            f"of the key/value heads (grouped-query attention); q {shape_str(q.shape)}, k {shape_str(k.shape)}"
        )


WINDOW_MAX = 2**62  # more keys than any array can hold


def window_bounds(window: Window, is_causal: bool) -> tuple[int, int]:
    """(left, right) key offsets around the aligned query; -1 = unbounded."""
    flag("is_causal", is_causal)
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
    left, right = min(left, WINDOW_MAX), min(right, WINDOW_MAX)
    if is_causal:
        right = 0 if right == -1 else min(right, 0)
    return left, right


CAUSAL_ALIGNMENTS = ("bottom_right", "top_left")


def top_left_alignment(causal_alignment: Any) -> bool:
    """Whether causal/window bounds align top-left (query i at key i) rather
    than bottom-right (the last query at the last key)."""
    if causal_alignment not in CAUSAL_ALIGNMENTS or not isinstance(causal_alignment, str):
        raise InvalidParameterError(
            f"causal_alignment: expected 'bottom_right' or 'top_left', got {causal_alignment!r}"
        )
    return bool(causal_alignment == "top_left")


def scale_value(scale: Optional[float], d: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(d) if d > 0 else 1.0
    if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, numbers.Real):
        raise InvalidParameterError(f"scale: expected a real number, got {scale!r}")
    s = float(scale)
    if not math.isfinite(s):
        raise InvalidParameterError(f"scale: expected a finite number, got {s}")
    return s


def dropout_and_seed(dropout_p: float, seed: Optional[int]) -> tuple[float, int]:
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


def integers_as_bool(m: np.ndarray) -> np.ndarray:
    """An integer mask as bool, nonzero = True (may attend / real token), the
    rule of every mask: a tokenizer's or Keras' 0/1 masks and Kaun's
    "nonzero keeps" masks mean the same as their bool. Other dtypes as is."""
    return m != 0 if m.dtype.kind in "iu" else m


def _broadcast_or_raise(m: np.ndarray, full: tuple[int, ...],
                        message: Callable[[], str]) -> np.ndarray:
    """m broadcast (a read-only view) to full, or ShapeError(message())."""
    try:
        return np.broadcast_to(m, full)
    except ValueError:
        raise ShapeError(message()) from None


def broadcast_attn_mask(mask: ArrayLike, target: tuple[int, ...], dtype: np.dtype[Any],
               batched: bool) -> np.ndarray:
    m = integers_as_bool(mask if isinstance(mask, np.ndarray) else np.asarray(mask))
    if m.dtype == np.bool_:
        kind = "bool"
    elif m.dtype.kind == "f" or is_bfloat16(m.dtype):
        kind = "float"
    else:
        raise DTypeError(
            f"attn_mask: expected bool or integers (True / nonzero = may attend) or float "
            f"(added to the scores), got {m.dtype}"
        )
    full = target if batched else target[1:]
    if m.ndim > len(full):
        raise ShapeError(
            f"attn_mask: shape {shape_str(m.shape)} has more axes than the scores {full}"
        )
    view = _broadcast_or_raise(m, full, lambda: (
        f"attn_mask: shape {shape_str(m.shape)} does not broadcast to the scores "
        f"{'(B, Hq, Lq, Lk)' if batched else '(Hq, Lq, Lk)'} = {full}"))
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


def check_key_padding(mask: ArrayLike, b: int, lk: int, batched: bool) -> np.ndarray:
    m = integers_as_bool(mask if isinstance(mask, np.ndarray) else np.asarray(mask))
    if m.dtype != np.bool_:
        raise DTypeError(
            f"key_padding_mask: expected bool or integers (True / nonzero = real token), "
            f"got {m.dtype}"
        )
    full = (b, lk) if batched else (lk,)
    view = _broadcast_or_raise(m, full, lambda: (
        f"key_padding_mask: expected shape {'(B, Lk)' if batched else '(Lk,)'} = {full}, "
        f"got {shape_str(m.shape)}"))
    return view if batched else view[np.newaxis]


def check_key_lengths(lengths: ArrayLike, b: int, lk: int, batched: bool) -> np.ndarray:
    """Validated key lengths as the kernel takes them: contiguous int64 (B,)."""
    if isinstance(lengths, (bool, np.bool_)):
        raise DTypeError(f"key_lengths: expected integers, got {lengths!r}")
    n = lengths if isinstance(lengths, np.ndarray) else np.asarray(lengths)
    if n.dtype.kind not in "iu":
        raise DTypeError(f"key_lengths: expected integers, got dtype {n.dtype}")
    want = (b,) if batched else ()
    if n.shape != want:
        names = "(B,)" if batched else "a scalar (unbatched)"
        raise ShapeError(f"key_lengths: expected shape {names} = {want}, got {shape_str(n.shape)}")
    n = np.ascontiguousarray(n.reshape(b), dtype=np.int64)
    entries_within(n, lk, lambda i: f"key_lengths: entry {i} is {int(n[i])}, "
                   f"expected 0 <= length <= Lk = {lk}")
    return n


def prefix_lengths(kpm: np.ndarray) -> Optional[np.ndarray]:
    """The lengths of a (B, Lk) padding mask of prefix form (real tokens,
    then padding, in every row), or None when it has another form."""
    n = kpm.sum(axis=1, dtype=np.int64)
    if np.array_equal(kpm, np.arange(kpm.shape[1])[None, :] < n[:, None]):
        return np.ascontiguousarray(n)
    return None


def kernel_can_write(out: np.ndarray, dtype: np.dtype[Any],
                      inputs: Tuple[np.ndarray, ...]) -> bool:
    """Whether the kernel may write into a caller's (checked) array as it is:
    its compute dtype, aligned whole-element strides, and no overlap with an
    input (the kernel reads those while it writes)."""
    return (
        out.dtype == dtype
        and out.flags.aligned
        and not any(s % out.itemsize for s in out.strides)
        and not may_overlap(out, inputs)
    )


def check_out(out: Any, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    if not isinstance(out, np.ndarray):
        raise InvalidParameterError(f"out: expected a numpy array, got {type(out).__name__}")
    if out.shape != shape:
        raise ShapeError(f"out: expected shape {shape}, got {shape_str(out.shape)}")
    if out.dtype != dtype:
        raise DTypeError(f"out: expected dtype {dtype} (the inputs' dtype), got {out.dtype}")
    if not out.flags.writeable:
        raise InvalidParameterError("out: array is read-only")
    return out


