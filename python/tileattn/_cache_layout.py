"""Where a ``KVCache`` keeps each position: the layout interface and its layouts.

A layout owns the key/value storage and each item's length (positions
appended so far), and answers what ``KVCache`` and the attention strategies
(``_cache_attend``) need to know, so that neither tests which layout it holds:

* ``write``: store new rows at each item's next positions, advance lengths.
* ``recent(b, n)``: copies of item b's last n positions, in position order.
* ``ordered_rows(lengths)``: storage views in which item b's positions
  ``[0, lengths[b])`` are rows ``[0, lengths[b])``, or None when the layout
  cannot show them so (the kernel's masks compare row indices).
* ``span`` and ``kept_rows(lengths)``: a layout that keeps only each item's
  last ``span`` positions, and views whose first rows hold exactly those
  (in any order), or None.
* ``check_trim``, ``state``/``restore`` (pickling), ``nbytes``.

Two layouts exist: ``LinearLayout`` (position p in row p) and ``RingLayout``
(only the last W positions, position p in row p % W).

Adding a paged layout
---------------------
A ``PagedLayout(CacheLayout)`` (fixed-size pages from a shared pool and a
page table per item) subclasses ``CacheLayout`` directly and implements
``write``, ``recent``, ``ordered_rows`` (None: pages are not rows),
``state`` and ``restore``; ``span`` stays None and ``kept_rows`` the
default. The attention then takes its gathering path (``recent`` copies of
each item's history into a scratch buffer), with no edit to it; a
page-table kernel would be a fourth strategy asked for by a new method.
``make_layout`` is the one place that chooses it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Dict, Optional, Tuple

import numpy as np

from ._errors import InvalidParameterError
from ._memory import check_fits

Arrays = Tuple[np.ndarray, np.ndarray]


class CacheLayout(ABC):
    """The storage of a batch's cached keys/values and each item's length."""

    # A layout that keeps only each item's last `span` positions sets it.
    span: Optional[int] = None
    # The storage; its shape is the layout's own (rows, pages, ...).
    k: np.ndarray
    v: np.ndarray

    def __init__(self, batch: int, heads: int, head_dim: int, value_dim: int,
                 dtype: np.dtype[Any]) -> None:
        self.batch, self.heads = batch, heads
        self.head_dim, self.value_dim, self.dtype = head_dim, value_dim, dtype
        self.lengths = np.zeros(batch, np.int64)

    @property
    def nbytes(self) -> int:
        return int(self.k.nbytes + self.v.nbytes)

    @abstractmethod
    def write(self, k: np.ndarray, v: np.ndarray, counts: np.ndarray) -> None:
        """Store item b's first counts[b] rows of k (B, H, T, D) and v at its
        next positions and advance the lengths. The counts fit (checked)."""

    @abstractmethod
    def recent(self, b: int, n: int) -> Arrays:
        """Copies (H, n, D) and (H, n, Dv) of item b's last n positions, in
        position order; n is at most the positions it keeps."""

    @abstractmethod
    def ordered_rows(self, lengths: np.ndarray) -> Optional[Arrays]:
        """Views (B, H, rows, D) of the storage in which item b's positions
        [0, lengths[b]) are rows [0, lengths[b]), once `lengths` is reached;
        None if the layout does not hold them so at those lengths."""

    def kept_rows(self, lengths: np.ndarray) -> Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """For a layout with a `span`: views whose rows [0, kept[b]) hold
        exactly item b's last kept[b] = min(lengths[b], span) positions, in
        some order, and `kept`. None: the layout cannot show them so."""
        return None

    def check_trim(self, counts: np.ndarray) -> None:
        """Raise InvalidParameterError if the last counts[b] positions cannot
        be rolled back (counts <= lengths is already checked)."""

    def trim(self, counts: np.ndarray) -> None:
        self.lengths -= counts

    def reset(self) -> None:
        self.lengths[:] = 0

    @abstractmethod
    def state(self) -> Dict[str, np.ndarray]:
        """What pickling must keep of the storage (lengths are kept apart)."""

    @abstractmethod
    def restore(self, state: Dict[str, np.ndarray], lengths: np.ndarray) -> None:
        """Refill a freshly made layout from `state` and the lengths."""


class RowLayout(CacheLayout):
    """Layouts with one row per kept position in (B, H, rows, D) arrays."""

    def __init__(self, batch: int, heads: int, head_dim: int, value_dim: int,
                 dtype: np.dtype[Any], rows: int) -> None:
        super().__init__(batch, heads, head_dim, value_dim, dtype)
        check_fits("KVCache", (batch, heads, rows, max(head_dim, value_dim)), dtype.itemsize)
        self.rows = rows
        self.k = np.zeros((batch, heads, rows, head_dim), dtype)
        self.v = np.zeros((batch, heads, rows, value_dim), dtype)

    def ordered_rows(self, lengths: np.ndarray) -> Optional[Arrays]:
        n = int(lengths.max(initial=0))
        if n > self.rows:
            return None
        return self.k[:, :, :n], self.v[:, :, :n]

    def state(self) -> Dict[str, np.ndarray]:
        # Only the rows that hold something: a mostly empty cache pickles small.
        used = int(min(self.lengths.max(initial=0), self.rows))
        return {"k": self.k[:, :, :used].copy(), "v": self.v[:, :, :used].copy()}

    def restore(self, state: Dict[str, np.ndarray], lengths: np.ndarray) -> None:
        k, v = state["k"], state["v"]
        self.lengths[:] = lengths
        self.k[:, :, :k.shape[2]] = k
        self.v[:, :, :v.shape[2]] = v


class LinearLayout(RowLayout):
    """Position p of item b in row p; as many rows as positions allowed."""

    def write(self, k: np.ndarray, v: np.ndarray, counts: np.ndarray) -> None:
        for b in range(self.batch):
            n = int(counts[b])
            start = int(self.lengths[b])
            self.k[b, :, start:start + n] = k[b, :, :n]
            self.v[b, :, start:start + n] = v[b, :, :n]
            self.lengths[b] = start + n

    def recent(self, b: int, n: int) -> Arrays:
        length = int(self.lengths[b])
        return self.k[b, :, length - n:length].copy(), self.v[b, :, length - n:length].copy()


class RingLayout(RowLayout):
    """Only each item's last `rows` positions, position p in row p % rows:
    fixed memory however long the stream. Until an item passes `rows`
    positions its rows are still in position order."""

    def __init__(self, batch: int, heads: int, head_dim: int, value_dim: int,
                 dtype: np.dtype[Any], rows: int) -> None:
        super().__init__(batch, heads, head_dim, value_dim, dtype, rows)
        self.span = rows

    def write(self, k: np.ndarray, v: np.ndarray, counts: np.ndarray) -> None:
        cap = self.rows
        for b in range(self.batch):
            n = int(counts[b])
            if n == 0:
                continue
            start = int(self.lengths[b])
            skip = max(0, n - cap)          # a chunk longer than the ring keeps its tail
            pos = start + skip
            left = n - skip
            while left:                     # at most two slices: up to the end, then from 0
                row = pos % cap
                step = min(left, cap - row)
                src = slice(pos - start, pos - start + step)
                self.k[b, :, row:row + step] = k[b, :, src]
                self.v[b, :, row:row + step] = v[b, :, src]
                pos += step
                left -= step
            self.lengths[b] = start + n

    def recent(self, b: int, n: int) -> Arrays:
        length = int(self.lengths[b])
        rows = np.arange(length - n, length) % self.rows
        return self.k[b][:, rows], self.v[b][:, rows]

    def kept_rows(self, lengths: np.ndarray) -> Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
        kept = np.minimum(lengths, self.rows)
        n = int(kept.max(initial=0))
        return self.k[:, :, :n], self.v[:, :, :n], kept

    def check_trim(self, counts: np.ndarray) -> None:
        bad = np.flatnonzero((counts > 0) & (self.lengths > self.rows))
        if bad.size:
            i = int(bad[0])
            raise InvalidParameterError(
                f"n: sequence {i} has {int(self.lengths[i])} positions in a ring buffer of "
                f"window={self.rows}; the oldest were overwritten, so rolling back would "
                f"leave its window incomplete (a ring can roll back only while "
                f"length <= window)")


def make_layout(batch: int, heads: int, head_dim: int, value_dim: int, dtype: np.dtype[Any],
                max_len: int, capacity: int) -> CacheLayout:
    """The layout for a cache of `capacity` rows per item: a ring when it
    holds fewer rows than positions allowed (a window), else linear."""
    kind = RingLayout if capacity < max_len else LinearLayout
    return kind(batch, heads, head_dim, value_dim, dtype, capacity)
