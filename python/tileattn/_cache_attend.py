"""How ``KVCache.attend`` runs the kernel over a cache layout.

The kernel's causal/window masks compare key *row indices*, so the keys must
be in position order for them, unless the mask is not needed at all. Three
strategies, tried in order, each chosen by asking the layout:

* In place, in order (``layout.ordered_rows``): item b's positions are rows
  ``[0, length)`` (a linear cache, or a ring that has not wrapped yet).
  Write the new rows, then attend with the mask over the storage itself:
  rows ``[0, max(lengths))`` with each item's length as its key length, so
  the kernel stops at each item's end (ragged batches cost nothing for
  their padding).
* In place, unordered (``layout.span`` and ``layout.kept_rows``): one new
  query per item whose window is exactly the positions a ring keeps. After
  its key is written, the ring holds exactly the ``min(length, W)`` keys
  its window ``(W - 1, 0)`` lets it see, and nothing else. Softmax attention
  is invariant under a permutation of the keys (each key's weight depends
  only on its own score), so attending *unmasked* over the kept rows gives
  the windowed result directly, with no copy.
* Gathered: several new queries see different sets of keys (the later ones
  later chunk keys, the earlier ones older positions), so visibility is per
  query and the order matters. The chunk is attended against a scratch
  buffer holding, in position order, the item's last ``min(length, left)``
  positions (``layout.recent``, at most ``W - 1`` rows of a ring) followed
  by the chunk, with the ordinary window mask; only then are the chunk's
  keys written (so they cannot overwrite rows the chunk still needed).

Ragged chunks (items appending different counts) keep their real tokens
first (right padding, as tokenizers produce) in the caller's arrays. The
kernel aligns causal masks bottom-right to each item's own key length, which
matches the *last* query row; so the real queries are moved to the last rows
of the query block (left padding) for the call and moved back afterwards.
"""

from __future__ import annotations

from typing import Any, Dict

import numpy as np

from . import _core
from ._cache_layout import CacheLayout


def attend_and_write(layout: CacheLayout, q: np.ndarray, k: np.ndarray, v: np.ndarray,
                     out: np.ndarray, counts: np.ndarray, left: int, right: int,
                     run: Dict[str, Any]) -> None:
    """Attend q (B, Hq, T, D) over each item's cached positions plus its
    first counts[b] new keys/values (window (left, right), kernel options
    `run`) into out, and append those new rows to the layout. q and out are
    ready for the kernel (aligned, apart from the storage and each other):
    every allocation is made before the layout is written, and a kernel
    that fails after an in-place write takes the write back, so a failed
    call leaves the cache as it was wherever the layout allows it."""
    t = k.shape[2]
    new = layout.lengths + counts
    # Cast the new rows to the storage dtype first: every path must attend
    # to exactly the values a later step will read back from the cache.
    k = k.astype(layout.dtype, copy=False)
    v = v.astype(layout.dtype, copy=False)
    block = QueryBlock(q, out, counts)

    ordered = layout.ordered_rows(new)
    if ordered is not None:
        # Views of the storage: they show the rows written next. The write
        # only fills rows past each item's length, so trimming undoes it.
        layout.write(k, v, counts)
        try:
            block.run(ordered[0], ordered[1], new, left, right, run)
        except BaseException:
            layout.trim(counts)
            raise
        return
    kept = layout.kept_rows(new) if t == 1 and left + 1 == layout.span else None
    if kept is not None:
        layout.write(k, v, counts)
        block.run(kept[0], kept[1], kept[2], -1, -1, run)
        return
    # left == -1 (unbounded) sees every cached position; a ring's window
    # is always bounded, so it gathers at most W - 1 of them.
    old = layout.lengths
    m = old.copy() if left < 0 else np.minimum(old, left)
    mx = int(m.max(initial=0))
    batch, heads = k.shape[:2]
    kb = np.empty((batch, heads, mx + t, k.shape[3]), layout.dtype)
    vb = np.empty((batch, heads, mx + t, v.shape[3]), layout.dtype)
    for b in range(batch):
        mb, nb = int(m[b]), int(counts[b])
        kb[b, :, :mb], vb[b, :, :mb] = layout.recent(b, mb)
        kb[b, :, mb:mb + nb] = k[b, :, :nb]
        vb[b, :, mb:mb + nb] = v[b, :, :nb]
    block.run(kb, vb, m + counts, left, right, run)
    layout.write(k, v, counts)


class QueryBlock:
    """The queries and output of one kernel call, made up front (before the
    cache is written). Items with fewer than T new tokens get their queries
    moved to the last rows of a scratch block (see the module notes) and
    their results moved back."""

    def __init__(self, q: np.ndarray, out: np.ndarray, counts: np.ndarray) -> None:
        t = q.shape[2]
        self.out, self.counts = out, counts
        self.ragged = bool(np.any(counts != t))
        if not self.ragged:
            self.q, self.result = q, out
            return
        self.q = np.zeros(q.shape, q.dtype)
        self.result = np.empty(out.shape, out.dtype)
        for b, n in enumerate(counts.tolist()):
            if n:
                self.q[b, :, t - n:] = q[b, :, :n]

    def run(self, k: np.ndarray, v: np.ndarray, key_lengths: np.ndarray, left: int,
            right: int, run: Dict[str, Any]) -> None:
        _core.attention_forward(self.q, k, v, self.result, _core.AttentionOptions(
            window_left=left, window_right=right, key_lengths=key_lengths, **run))
        if not self.ragged:
            return
        t = self.q.shape[2]
        self.out[...] = 0
        for b, n in enumerate(self.counts.tolist()):
            if n:
                self.out[b, :, :n] = self.result[b, :, t - n:]
