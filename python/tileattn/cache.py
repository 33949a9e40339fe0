"""``KVCache``: preallocated keys and values for incremental decoding.

A cache holds, for a batch of sequences, the keys and values of every
position decoded so far, ``(B, Hkv, capacity, D)`` and ``(B, Hkv, capacity,
Dv)``, and one length per sequence. ``attend`` appends the keys/values of
new tokens and runs attention of the new queries over everything cached, in
one kernel call that reads the cache in place: float16 storage is widened by
the kernel as it reads, so no float32 copy of the cache is ever made.

Where the positions live is a layout object (``_cache_layout``): a linear
cache (``window=None``) keeps position ``p`` in row ``p``; a ring buffer
(``window=W``) keeps only the last ``W`` positions, in row ``p % W``, in
fixed memory. ``KVCache`` checks every argument before anything is written
(a refused call leaves the cache as it was), picks the layout from its
constructor arguments and hands the kernel call to ``_cache_attend``, which
asks the layout how its rows may be read (in place, in order or not, or
gathered into position order). A paged layout would be one more class
there (see ``_cache_layout``); here only the constructor argument asking
for it would be added.
"""

from __future__ import annotations

import numbers
import threading
from contextlib import contextmanager
from typing import Any, Dict, Iterator, Optional, Tuple

import numpy as np

from ._cache_attend import attend_and_write
from ._cache_layout import make_layout
from ._errors import DTypeError, InvalidParameterError, ShapeError
from ._call_checks import (check_out, dropout_and_seed, kernel_array, kernel_can_write,
                           scale_value, window_bounds)
from ._overlap import may_overlap
from ._validate import (FLOAT_NAMES, INPUT_DTYPES, bf16_products, dtype_in, entries_within,
                        is_bool, native_byte_order, optional_positive_int, positive_int,
                        shape_str)

# The storage dtypes (float16 and bfloat16 widened by the kernel as it reads).
CACHE_DTYPES = INPUT_DTYPES

# The constructor's settings, as pickled (with the layout's rows and the lengths).
_SETTINGS = ("batch", "num_kv_heads", "max_len", "head_dim", "value_dim", "dtype", "window",
             "capacity")


def _counts(name: str, counts: Any, batch: int, upper: np.ndarray,
            what: str) -> np.ndarray:
    """counts as an int64 (batch,) array with 0 <= counts[b] <= upper[b]."""
    if is_bool(counts):
        raise InvalidParameterError(f"{name}: expected an int or a (B,) int array, got {counts!r}")
    c = np.asarray(counts)
    if c.dtype.kind not in "iu":
        raise DTypeError(f"{name}: expected an int or a ({batch},) int array, got dtype {c.dtype}")
    if c.ndim == 0:
        c = np.full(batch, int(c), np.int64)
    elif c.shape != (batch,):
        raise ShapeError(
            f"{name}: expected an int or shape ({batch},), got shape {shape_str(c.shape)}")
    c = c.astype(np.int64)
    entries_within(c, upper, lambda i: f"{name}: entry {i} is {int(c[i])}, "
                   f"expected 0 <= {name} <= {int(upper[i])} ({what})")
    return c


def prefix_lengths(mask: Any, name: str, shape: Tuple[int, int]) -> np.ndarray:
    """Lengths (B,) int64 of a (B, L) mask of prefix form (True... then False...).

    Raises ShapeError for another shape, DTypeError for a non-bool (and not
    0/1 integer) mask and InvalidParameterError when a row is not a prefix.
    """
    m = np.asarray(mask)
    if m.dtype != np.bool_:
        if m.dtype.kind in "iu" and (not m.size or np.all((m == 0) | (m == 1))):
            m = m.astype(bool)
        else:
            raise DTypeError(f"{name}: expected bool (True = real token) or 0/1 integers, "
                             f"got {m.dtype}")
    if m.shape != shape:
        raise ShapeError(f"{name}: expected shape (B, T) = {shape}, got {shape_str(m.shape)}")
    n: np.ndarray = m.sum(axis=1, dtype=np.int64)
    if not np.array_equal(m, np.arange(shape[1])[None, :] < n[:, None]):
        bad = int(np.flatnonzero((m != (np.arange(shape[1])[None, :] < n[:, None])).any(1))[0])
        raise InvalidParameterError(
            f"{name}: with a cache each row must be real tokens then padding (True... then "
            f"False...); row {bad} is not")
    return n


class KVCache:
    """Keys and values of the positions decoded so far, for a batch of sequences.

    Parameters
    ----------
    batch : int
        Sequences B decoded together. Each has its own length.
    num_kv_heads : int
        Key/value heads Hkv (the module's ``num_kv_heads``).
    max_len : int
        Most positions a sequence may reach; appending past it raises
        ``InvalidParameterError``. A linear cache allocates ``max_len`` rows;
        a ring buffer only ``min(window, max_len)`` and ``max_len`` just
        bounds the positions (it may be huge).
    head_dim : int
        Key size D per head.
    value_dim : int, optional
        Value size Dv per head. Default head_dim.
    dtype : float32, float16, bfloat16 or float64
        Storage. float16 and bfloat16 (``ml_dtypes.bfloat16`` or
        "bfloat16") halve the memory and the bytes each decoding step
        reads; the kernel widens them to float32 as it reads (queries and
        outputs stay float32). New keys/values are rounded to it as they
        are appended. bfloat16 keeps float32's range (float16 overflows
        past 65504) with fewer significant bits. float64 pairs with float64
        modules.
    window : int, optional
        Keep only the last ``window`` positions (a ring buffer in fixed
        memory) and let each query see only the last ``window`` positions
        including itself (``window=W`` of the attention functions).

    Attributes
    ----------
    k : array (B, Hkv, capacity, D) and v : (B, Hkv, capacity, Dv)
        The storage (row order is rotated in a ring buffer; see ``contents``).
    lengths : int64 array (B,)
        Positions appended so far per sequence (a read-only copy).

    Notes
    -----
    A cache belongs to one stream of calls: it may be used from any thread,
    but not from two at once. Pickling stores only the filled rows.
    """

    def __init__(self, batch: int, num_kv_heads: int, max_len: int, head_dim: int,
                 value_dim: Optional[int] = None, dtype: Any = np.float32,
                 window: Optional[int] = None) -> None:
        self.batch = positive_int("batch", batch)
        self.num_kv_heads = positive_int("num_kv_heads", num_kv_heads)
        self.max_len = positive_int("max_len", max_len)
        self.head_dim = positive_int("head_dim", head_dim)
        self.value_dim = optional_positive_int("value_dim", value_dim, self.head_dim)
        self.dtype: np.dtype[Any] = dtype_in("dtype", dtype, CACHE_DTYPES,
                                             "float32, float16, bfloat16 or float64")
        self.window = None if window is None else positive_int("window", window)
        self.capacity = self.max_len if self.window is None else min(self.window, self.max_len)
        self._busy = threading.Lock()
        self._layout = make_layout(self.batch, self.num_kv_heads, self.head_dim, self.value_dim,
                                   self.dtype, self.max_len, self.capacity)

    @contextmanager
    def _in_use(self) -> Iterator[None]:
        """Refuse a second concurrent call instead of interleaving two streams'
        writes (the GIL is released while the kernel runs)."""
        if not self._busy.acquire(blocking=False):
            raise InvalidParameterError(
                "cache: already in use by a call in another thread; a KVCache holds one "
                "stream of calls at a time (give each thread or request its own)")
        try:
            yield
        finally:
            self._busy.release()

    # -- state ----------------------------------------------------------------
    @property
    def k(self) -> np.ndarray:
        return self._layout.k

    @property
    def v(self) -> np.ndarray:
        return self._layout.v

    @property
    def lengths(self) -> np.ndarray:
        out: np.ndarray = self._layout.lengths.copy()
        out.flags.writeable = False
        return out

    @property
    def ring(self) -> bool:
        """True for a sliding-window ring buffer (``window`` < ``max_len``)."""
        return self.capacity < self.max_len

    @property
    def nbytes(self) -> int:
        return self._layout.nbytes

    def reset(self) -> None:
        """Forget every position (all lengths back to 0); the memory is kept."""
        with self._in_use():
            self._layout.reset()

    def trim(self, n: Any) -> None:
        """Roll back the last ``n`` positions (speculative decoding, beam search).

        Parameters
        ----------
        n : int, or int array (B,)
            Positions to drop from every sequence, or per sequence;
            ``0 <= n[b] <= lengths[b]``.

        Raises
        ------
        InvalidParameterError
            n out of range, or a ring buffer whose sequence has already
            overwritten positions that would be back inside the window after
            the rollback (possible only while ``lengths[b] <= window``).
        """
        with self._in_use():
            c = _counts("n", n, self.batch, self._layout.lengths, "the positions cached")
            self._layout.check_trim(c)
            self._layout.trim(c)

    def contents(self, b: int) -> Tuple[np.ndarray, np.ndarray]:
        """Copies of sequence ``b``'s retained keys and values in position order.

        Returns
        -------
        k : (Hkv, n, D), v : (Hkv, n, Dv)
            n = lengths[b] (linear) or min(lengths[b], window) (ring): the
            positions ``lengths[b] - n .. lengths[b] - 1``.
        """
        if is_bool(b) or not isinstance(b, numbers.Integral) or not 0 <= b < self.batch:
            raise InvalidParameterError(f"b: expected an int in [0, {self.batch}), got {b!r}")
        b = int(b)
        return self._layout.recent(b, min(int(self._layout.lengths[b]), self.capacity))

    # Pickles hold the settings, the layout's state (for a linear or ring
    # cache its filled rows "k" and "v") and "_lengths": the format of the
    # single-class cache, so pickles of either version load in the other.
    def __getstate__(self) -> Dict[str, Any]:
        state = {name: getattr(self, name) for name in _SETTINGS}
        state.update(self._layout.state())
        state["_lengths"] = self._layout.lengths.copy()
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        state = dict(state)
        lengths = state.pop("_lengths")
        for name in _SETTINGS:
            setattr(self, name, state.pop(name))
        self._busy = threading.Lock()
        self._layout = make_layout(self.batch, self.num_kv_heads, self.head_dim, self.value_dim,
                                   self.dtype, self.max_len, self.capacity)
        self._layout.restore(state, lengths)

    def __repr__(self) -> str:
        win = "" if self.window is None else f", window={self.window}"
        return (f"KVCache(batch={self.batch}, num_kv_heads={self.num_kv_heads}, "
                f"max_len={self.max_len}, head_dim={self.head_dim}, value_dim={self.value_dim}, "
                f"dtype={self.dtype.name}{win}; lengths={self._layout.lengths.tolist()})")

    # -- appending --------------------------------------------------------------
    def _storage(self) -> Tuple[np.ndarray, np.ndarray]:
        return self._layout.k, self._layout.v

    def _check_new(self, k: Any, v: Any) -> Tuple[np.ndarray, np.ndarray]:
        arrays = []
        for name, x, dim, dname in (("k", k, self.head_dim, "head_dim"),
                                    ("v", v, self.value_dim, "value_dim")):
            a = native_byte_order(x if isinstance(x, np.ndarray) else np.asarray(x))
            if a.dtype not in INPUT_DTYPES:
                raise DTypeError(f"{name}: expected {FLOAT_NAMES}, got {a.dtype}")
            want = (self.batch, self.num_kv_heads)
            if a.ndim != 4 or a.shape[:2] != want or a.shape[3] != dim:
                raise ShapeError(
                    f"{name}: expected (B, Hkv, T, {dname}) = ({self.batch}, "
                    f"{self.num_kv_heads}, T, {dim}), got shape {shape_str(a.shape)}")
            # New rows read from the cache's own storage are copied first:
            # the write would otherwise move rows it still has to read.
            arrays.append(a.copy() if may_overlap(a, self._storage()) else a)
        if arrays[0].shape[2] != arrays[1].shape[2]:
            raise ShapeError(f"k and v: expected the same number of new positions T, got "
                             f"k {shape_str(arrays[0].shape)}, v {shape_str(arrays[1].shape)}")
        return arrays[0], arrays[1]

    def _new_counts(self, counts: Any, t: int) -> np.ndarray:
        if counts is None:
            c = np.full(self.batch, t, np.int64)
        else:
            c = _counts("counts", counts, self.batch, np.full(self.batch, t), "the new positions T")
        lengths = self._layout.lengths
        over = np.flatnonzero(c > self.max_len - lengths)
        if over.size:
            i = int(over[0])
            raise InvalidParameterError(
                f"max_len: appending {int(c[i])} positions to sequence {i} (length "
                f"{int(lengths[i])}) overflows the cache's max_len={self.max_len}; "
                f"reset, trim or use a larger cache")
        return c

    def append(self, k: Any, v: Any, counts: Any = None) -> np.ndarray:
        """Append new keys and values (cast to the cache's dtype).

        Parameters
        ----------
        k : array (B, Hkv, T, D)
        v : array (B, Hkv, T, Dv)
        counts : int or int array (B,), optional
            Sequence b appends its first counts[b] (<= T) rows; the rest is
            padding. Default: all T.

        Returns
        -------
        positions : int64 array (B,)
            The position of each sequence's first new row (its length before).

        Raises
        ------
        ShapeError, DTypeError : k or v.  InvalidParameterError : counts out of
        range or a sequence would pass ``max_len`` (nothing is written then).
        """
        k4, v4 = self._check_new(k, v)
        with self._in_use():
            c = self._new_counts(counts, k4.shape[2])
            before: np.ndarray = self._layout.lengths.copy()
            self._layout.write(k4, v4, c)
        return before

    # -- attention ----------------------------------------------------------------
    def _bounds(self, left: int, right: int) -> Tuple[int, int]:
        """The (left, right) window of the kernel call; a ring implies (W-1, 0)
        or narrower (it has no older keys to show)."""
        if self.window is None:
            return left, right
        w = self.window
        if left == -1:
            left = w - 1
        elif left > w - 1:
            raise InvalidParameterError(
                f"window: the cache keeps only the last {w} positions (window={w}); "
                f"an attention window reaching {left} positions back needs keys it dropped")
        return left, (0 if right == -1 else min(right, 0))

    def attend(self, q: Any, k: Any, v: Any, *, counts: Any = None, is_causal: bool = True,
               window: Any = None, scale: Optional[float] = None, dropout_p: float = 0.0,
               seed: Optional[int] = None, out: Optional[np.ndarray] = None,
               compute_dtype: Any = None) -> np.ndarray:
        """Append the new tokens' keys/values and attend their queries over the cache.

        Parameters
        ----------
        q : array (B, Hq, T, D), Hq a multiple of Hkv
            float32 (any storage but float64) or float64 (float64 storage).
        k : array (B, Hkv, T, D), v : array (B, Hkv, T, Dv)
            The new tokens' keys and values; appended as by ``append``.
        counts : int or int array (B,), optional
            Real new tokens per sequence, first in each row (right padding).
        is_causal : bool
            New query i of sequence b (position lengths[b] + i) sees the
            positions up to its own. False lets it see the whole chunk.
        window : int W or (left, right), optional
            As in ``scaled_dot_product_attention``, aligned at each
            sequence's own positions. A ring cache implies its ``window``.
        scale : float, optional
            Default 1/sqrt(D).
        dropout_p, seed
            Dropout on the attention weights, as in the functional API.
        out : array (B, Hq, T, Dv) of q's dtype, optional
            Where to write (may be a strided or unaligned view). One that
            overlaps q, k or v is filled after the kernel from a temporary;
            one that overlaps the cache's own storage is refused
            (``InvalidParameterError``).
        compute_dtype : None or "bfloat16"
            As in ``scaled_dot_product_attention``: both products on bf16
            operands (q and the cached keys/values rounded to bf16, P
            rounded before P V), float32 sums and softmax. Caches of any
            storage but float64.

        Returns
        -------
        out : array (B, Hq, T, Dv)
            Rows past counts[b] (padding) are zero.

        Raises
        ------
        ShapeError, DTypeError, InvalidParameterError
            Bad input, or max_len would be passed: every argument is checked
            before anything is written, so nothing is appended and the
            cache (lengths and contents) is exactly as it was.
        KeyboardInterrupt
            Ctrl-C during the kernel; the new tokens may or may not have been
            appended then (``lengths`` says), the cache stays consistent.
        """
        qa = native_byte_order(q if isinstance(q, np.ndarray) else np.asarray(q))
        k4, v4 = self._check_new(k, v)
        t = k4.shape[2]
        qdt = np.dtype(np.float64) if self.dtype == np.float64 else np.dtype(np.float32)
        if qa.dtype != qdt:
            raise DTypeError(f"q: expected {qdt} for a {self.dtype} cache, got {qa.dtype}")
        if qa.ndim != 4 or qa.shape[0] != self.batch or qa.shape[2] != t \
                or qa.shape[3] != self.head_dim or qa.shape[1] % self.num_kv_heads:
            raise ShapeError(
                f"q: expected (B, Hq, T, D) = ({self.batch}, a multiple of {self.num_kv_heads}, "
                f"{t}, {self.head_dim}), got shape {shape_str(qa.shape)}")
        hq = qa.shape[1]
        left, right = self._bounds(*window_bounds(window, is_causal))
        scale_v = scale_value(scale, self.head_dim)
        p, seed_v = dropout_and_seed(dropout_p, seed)
        bf16 = bf16_products(compute_dtype, qdt)
        out_shape = (self.batch, hq, t, self.value_dim)
        if out is not None:
            out = check_out(out, out_shape, qdt)
            if may_overlap(out, self._storage()):
                raise InvalidParameterError(
                    "out: overlaps the cache's storage (cache.k or cache.v); writing the "
                    "output there would overwrite cached keys or values")
        # The kernel's q: aligned, and a copy when it lives in the storage
        # that the call writes before it reads q.
        qk = kernel_array(qa, qdt)
        qk = qk.copy() if qk is qa and may_overlap(qa, self._storage()) else qk
        direct = out is not None and kernel_can_write(out, qdt, (qa, k4, v4))
        result = out if direct and out is not None else np.empty(out_shape, qdt)
        with self._in_use():
            c = self._new_counts(counts, t)
            attend_and_write(self._layout, qk, k4, v4, result, c, left, right,
                             dict(scale=scale_v, dropout_p=p, seed=seed_v, bf16=bf16))
        if out is not None and result is not out:
            out[...] = result  # (an unaligned out, or one over q, k or v)
            result = out
        return result
