"""The KVCache layout interface: a layout that is neither linear nor a ring
(pages from a pool, never in position order) plugs in as one added class
and decodes exactly like a linear cache. It exercises the attention's
gathering path with unbounded windows, which the ring never takes."""

import numpy as np
import pytest

from tileattn import KVCache
from tileattn._cache_layout import CacheLayout


class PagedLayout(CacheLayout):
    """Pages of `page` positions from a shared pool and a page table per
    item, handed out in reverse so the rows are never in position order."""

    def __init__(self, batch, heads, head_dim, value_dim, dtype, max_len, page=4):
        super().__init__(batch, heads, head_dim, value_dim, dtype)
        per_item = -(-max_len // page)
        self.page = page
        self.k = np.zeros((batch * per_item, heads, page, head_dim), dtype)
        self.v = np.zeros((batch * per_item, heads, page, value_dim), dtype)
        self.table = np.arange(batch * per_item)[::-1].reshape(batch, per_item)

    def _slots(self, b, start, stop):
        p = np.arange(start, stop)
        return self.table[b, p // self.page], p % self.page

    def write(self, k, v, counts):
        for b in range(self.batch):
            n, start = int(counts[b]), int(self.lengths[b])
            pages, offsets = self._slots(b, start, start + n)
            self.k[pages, :, offsets] = k[b, :, :n].transpose(1, 0, 2)
            self.v[pages, :, offsets] = v[b, :, :n].transpose(1, 0, 2)
            self.lengths[b] = start + n

    def recent(self, b, n):
        length = int(self.lengths[b])
        pages, offsets = self._slots(b, length - n, length)
        return (self.k[pages, :, offsets].transpose(1, 0, 2),
                self.v[pages, :, offsets].transpose(1, 0, 2))

    def ordered_rows(self, lengths):
        return None

    def state(self):
        return {"k": self.k.copy(), "v": self.v.copy()}

    def restore(self, state, lengths):
        self.k[...], self.v[...] = state["k"], state["v"]
        self.lengths[:] = lengths


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("kw", [dict(), dict(is_causal=False), dict(window=3),
                                dict(window=(2, 1))])
@pytest.mark.parametrize("ragged", [False, True])
def test_a_paged_layout_decodes_like_a_linear_cache(rng, dtype, kw, ragged):
    b, hq, hkv, d, dv, max_len = 3, 4, 2, 8, 5, 30
    linear = KVCache(b, hkv, max_len, d, value_dim=dv, dtype=dtype)
    paged = KVCache(b, hkv, max_len, d, value_dim=dv, dtype=dtype)
    paged._layout = PagedLayout(b, hkv, d, dv, paged.dtype, max_len)
    for t in [5, 1, 1, 7, 3, 1]:
        q = rng.standard_normal((b, hq, t, d)).astype(np.float32)
        k = rng.standard_normal((b, hkv, t, d)).astype(np.float32)
        v = rng.standard_normal((b, hkv, t, dv)).astype(np.float32)
        counts = rng.integers(0, t + 1, b) if ragged else None
        want = linear.attend(q, k, v, counts=counts, **kw)
        got = paged.attend(q, k, v, counts=counts, **kw)
        # The same keys in the same order, but from a scratch copy whose
        # length (max(lengths) + T rows) differs in ragged batches: the
        # kernel's tiling, and so its rounding, may differ.
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(paged.lengths, linear.lengths)
    paged.trim(1)
    linear.trim(1)
    for i in range(b):
        for got, want in zip(paged.contents(i), linear.contents(i)):
            np.testing.assert_array_equal(got, want)
