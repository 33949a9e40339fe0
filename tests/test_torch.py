"""Cross-check with torch.nn.functional.scaled_dot_product_attention on the
cases it supports (skipped when torch is not installed)."""

import numpy as np
import pytest

import tileattn
from conftest import make_qkv

torch = pytest.importorskip("torch")
F = torch.nn.functional
sdpa = tileattn.scaled_dot_product_attention


def torch_sdpa(q, k, v, **kw):
    t = [torch.from_numpy(np.ascontiguousarray(a)) for a in (q, k, v)]
    mask = kw.pop("attn_mask", None)
    if mask is not None:
        kw["attn_mask"] = torch.from_numpy(np.ascontiguousarray(mask))
    with torch.no_grad():
        return F.scaled_dot_product_attention(*t, **kw).numpy()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("causal", [False, True])
def test_plain_and_causal(rng, dtype, causal):
    q, k, v = make_qkv(rng, 2, 4, 4, 130, 130, 64, dtype=dtype)
    tol = 2e-6 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(sdpa(q, k, v, is_causal=causal),
                               torch_sdpa(q, k, v, is_causal=causal), atol=tol, rtol=0)


def test_gqa(rng):
    q, k, v = make_qkv(rng, 1, 8, 2, 70, 90, 32)
    np.testing.assert_allclose(sdpa(q, k, v), torch_sdpa(q, k, v, enable_gqa=True),
                               atol=2e-6, rtol=0)


def test_bool_and_float_masks(rng):
    q, k, v = make_qkv(rng, 2, 2, 2, 40, 300, 16)
    bmask = rng.random((2, 1, 40, 300)) < 0.7
    fmask = rng.standard_normal((40, 300)).astype(np.float32)
    for m in (bmask, fmask):
        np.testing.assert_allclose(sdpa(q, k, v, attn_mask=m), torch_sdpa(q, k, v, attn_mask=m),
                                   atol=2e-6, rtol=0)


def test_scale_and_value_dim(rng):
    q, k, v = make_qkv(rng, 1, 3, 3, 20, 33, 16, dv=40)
    np.testing.assert_allclose(sdpa(q, k, v, scale=0.3), torch_sdpa(q, k, v, scale=0.3),
                               atol=2e-6, rtol=0)


def test_causal_alignment_differs_from_torch_for_lq_lt_lk(rng):
    """torch's is_causal is top-left aligned; ours is bottom-right (decoding).
    With the explicit bottom-right mask they agree."""
    q, k, v = make_qkv(rng, 1, 2, 2, 10, 30, 16)
    mask = np.tril(np.ones((10, 30), bool), k=20)
    np.testing.assert_allclose(sdpa(q, k, v, is_causal=True), torch_sdpa(q, k, v, attn_mask=mask),
                               atol=2e-6, rtol=0)
