"""Gradients of the core against torch.autograd through
F.scaled_dot_product_attention (float64), every mask kind expressed as the
equivalent torch mask; skipped when torch is not installed."""

import numpy as np
import pytest

import tileattn
from conftest import make_qkv
from grad_reference import attention_grads, check_grad
from reference import visible_keys

torch = pytest.importorskip("torch")
F = torch.nn.functional
sdpa = tileattn.scaled_dot_product_attention
sdpa_bwd = tileattn.scaled_dot_product_attention_backward


def torch_grads(dout, q, k, v, *, attn_mask=None, key_padding_mask=None, is_causal=False,
                window=None, scale=None):
    """(dq, dk, dv, dmask) by torch autograd in float64; tileattn's masks
    become one torch mask (bool, or float with -inf where blocked)."""
    b, hq, lq, _ = q.shape
    lk = k.shape[2]
    ok = np.broadcast_to(visible_keys(lq, lk, is_causal, window), (b, hq, lq, lk))
    if key_padding_mask is not None:
        ok = ok & key_padding_mask[:, None, None, :]
    tmask = None
    leaf = None
    if attn_mask is not None and attn_mask.dtype != bool:
        leaf = torch.tensor(attn_mask.astype(np.float64), requires_grad=True)
        tmask = leaf + torch.from_numpy(np.where(ok, 0.0, -np.inf))
    else:
        if attn_mask is not None:
            ok = ok & attn_mask
        tmask = torch.from_numpy(np.ascontiguousarray(ok))
    t = [torch.tensor(a.astype(np.float64), requires_grad=True) for a in (q, k, v)]
    o = F.scaled_dot_product_attention(*t, attn_mask=tmask, scale=scale,
                                       enable_gqa=q.shape[1] != k.shape[1])
    o.backward(torch.from_numpy(dout.astype(np.float64)))
    grads = [a.grad.numpy() for a in t]
    return grads + ([leaf.grad.numpy()] if leaf is not None else [])


CASES = {
    "none": lambda rng, b, hq, lq, lk: {},
    "causal": lambda rng, b, hq, lq, lk: dict(is_causal=True),
    "window": lambda rng, b, hq, lq, lk: dict(window=(40, 9)),
    "bool_mask": lambda rng, b, hq, lq, lk: dict(attn_mask=rng.random((b, 1, lq, lk)) < 0.7),
    "float_mask": lambda rng, b, hq, lq, lk: dict(
        attn_mask=rng.standard_normal((hq, lq, lk)).astype(np.float32)),
    "key_padding": lambda rng, b, hq, lq, lk: dict(
        key_padding_mask=np.concatenate([np.ones((b, 1), bool), rng.random((b, lk - 1)) < 0.7],
                                        axis=1)),
    "causal_float_mask": lambda rng, b, hq, lq, lk: dict(
        is_causal=True, attn_mask=rng.standard_normal((lq, lk)).astype(np.float32)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("b,hq,hkv,lq,lk", [(2, 4, 2, 97, 193), (1, 3, 1, 65, 65)])
def test_against_torch_autograd(each_isa, rng, case, b, hq, hkv, lq, lk):
    q, k, v = make_qkv(rng, b, hq, hkv, lq, lk, 32)
    kw = CASES[case](rng, b, hq, lq, lk)
    float_mask = "attn_mask" in kw and kw["attn_mask"].dtype != bool
    out, lse = sdpa(q, k, v, return_lse=True, **kw)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    got = sdpa_bwd(dout, q, k, v, out, lse, return_mask_grad=float_mask, **kw)
    want = torch_grads(dout, q, k, v, **kw)
    plain = attention_grads(dout, q, k, v, dtype=np.float32, **kw)
    mags = attention_grads(dout, q, k, v, dtype=np.float64, **kw)[5]
    for name, g, w, p, m in zip(("dq", "dk", "dv"), got, want, plain[1:4], mags):
        check_grad(name, g, w, p, m)
    if float_mask:
        mask_shape = kw["attn_mask"].shape
        lead = 4 - len(mask_shape)

        def reduce(ds):
            return ds.sum(axis=tuple(range(lead))) if lead else ds

        check_grad("dmask", got[3], want[3], reduce(plain[4]), reduce(mags[3]))


def test_torch_training_step_matches(rng):
    """A whole step as a user writes it: loss = sum(out^2) / 2, both ways."""
    q, k, v = make_qkv(rng, 2, 4, 4, 130, 130, 64, dtype=np.float64)
    out, lse = sdpa(q, k, v, is_causal=True, return_lse=True)
    dq, dk, dv = sdpa_bwd(out, q, k, v, out, lse, is_causal=True)
    t = [torch.tensor(a, requires_grad=True) for a in (q, k, v)]
    o = F.scaled_dot_product_attention(*t, is_causal=True)
    (0.5 * (o**2).sum()).backward()
    for a, w in zip((dq, dk, dv), t):
        np.testing.assert_allclose(a, w.grad.numpy(), rtol=0, atol=1e-12)
