"""Module gradients against torch.autograd with the same weights: the inputs'
gradients and every parameter's, for Linear, LayerNorm, MultiheadAttention
(PyTorch's module, and a hand-written torch equivalent for GQA, RoPE and
QK-norm), TransformerEncoderLayer (pre- and post-norm) and TransformerEncoder.

The loss is sum(y * W) for a random W, so the incoming gradient is W.
PyTorch's masks have the opposite polarity (True = ignore): the tests convert.
"""

import functools

import numpy as np
import pytest

import tileattn

torch = pytest.importorskip("torch")
F = torch.nn.functional

E, H, FF = 32, 4, 64
# Relative to each gradient's largest entry. float64: both sides round at
# 1e-16 through a dozen GEMMs and reductions. float32: the forward matches to
# 1e-5 (test_encoder_torch.py); gradients pass through about twice as many
# operations, including the softmax backward's cancelling sums.
TOL = {np.float64: 1e-10, np.float32: 1e-4}
# Added to the bound: round-off is relative to the terms summed, which shows in
# gradients that are exactly zero (a key bias: softmax ignores a common shift).
ATOL = {np.float64: 1e-13, np.float32: 1e-5}
TORCH_ACT = {"relu": "relu", "gelu": "gelu",
             "gelu_tanh": functools.partial(F.gelu, approximate="tanh"), "silu": F.silu}


def tdtype(dtype):
    return torch.float64 if dtype == np.float64 else torch.float32


def close(name, got, want, dtype):
    want = want.detach().numpy() if isinstance(want, torch.Tensor) else want
    assert got.shape == want.shape, (name, got.shape, want.shape)
    assert got.dtype == np.dtype(dtype), (name, got.dtype)
    scale = max(float(np.max(np.abs(want))), 1e-6)
    err = float(np.max(np.abs(got.astype(np.float64) - want)))
    print(f"{name}: max error {err:.2e} (relative {err / scale:.1e})")
    assert err <= TOL[dtype] * scale + ATOL[dtype], \
        f"{name}: max error {err:.3g} > {TOL[dtype]:g} x {scale:.3g} + {ATOL[dtype]:g}"


def as_torch_names(ours):
    """Our gradients under PyTorch's names: q/k/v packed into in_proj_*,
    or q_proj_weight etc. when the projections are separate."""
    out = dict(ours)
    for name in list(ours):
        for attr in ("weight", "bias"):
            if name.endswith(f"q_proj.{attr}"):
                prefix = name[: -len(f"q_proj.{attr}")]
                parts = [ours[f"{prefix}{p}_proj.{attr}"] for p in "qkv"]
                if len({a.shape[1:] for a in parts}) == 1:    # kdim == vdim == embed_dim
                    out[f"{prefix}in_proj_{attr}"] = np.concatenate(parts)
                for p, a in zip("qkv", parts):
                    out[f"{prefix}{p}_proj_{attr}"] = a
    return out


def compare_params(tmodule, ours, dtype):
    mine = as_torch_names(ours.grads)
    for name, p in tmodule.named_parameters():
        assert p.grad is not None, name
        close(name, mine[name], p.grad, dtype)


def leaf(a):
    return torch.from_numpy(np.ascontiguousarray(a)).requires_grad_(True)


def randomise(module, seed, weights=False):
    """Random biases and norm weights (PyTorch starts them at 0 / 1, hiding
    bugs in their gradients); optionally perturbed weights too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.rand(p.shape, generator=g, dtype=p.dtype) - 0.5
            if name.endswith("bias"):
                p.copy_(r)
            elif "norm" in name:
                p.copy_(1.0 + 0.5 * r)
            elif weights:
                p.add_(0.1 * r)


DTYPES = [np.float64, np.float32]


# -- Linear, LayerNorm --------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear(rng, dtype):
    tm = torch.nn.Linear(E, 24).to(tdtype(dtype))
    randomise(tm, 1)
    ours = tileattn.Linear(E, 24, dtype=dtype)
    ours.load_state_dict(tm.state_dict())
    x = rng.standard_normal((3, 7, E)).astype(dtype)
    w = rng.standard_normal((3, 7, 24)).astype(dtype)
    xt = leaf(x)
    (tm(xt) * torch.from_numpy(w)).sum().backward()
    ours(x, training=True)
    close("x", ours.backward(w), xt.grad, dtype)
    compare_params(tm, ours, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm(rng, dtype):
    tm = torch.nn.LayerNorm(E, eps=1e-5).to(tdtype(dtype))
    randomise(tm, 2)
    ours = tileattn.LayerNorm(E, dtype=dtype)
    ours.load_state_dict(tm.state_dict())
    x = (2 * rng.standard_normal((3, 7, E)) + 0.5).astype(dtype)
    w = rng.standard_normal((3, 7, E)).astype(dtype)
    xt = leaf(x)
    (tm(xt) * torch.from_numpy(w)).sum().backward()
    ours(x, training=True)
    close("x", ours.backward(w), xt.grad, dtype)
    compare_params(tm, ours, dtype)


# -- MultiheadAttention ---------------------------------------------------------------
def mha_pair(dtype, kdim=None, vdim=None, bias=True):
    torch.manual_seed(0)
    tm = torch.nn.MultiheadAttention(E, H, bias=bias, kdim=kdim, vdim=vdim,
                                     batch_first=True).to(tdtype(dtype))
    randomise(tm, 3)
    ours = tileattn.MultiHeadAttention(E, H, kdim=kdim, vdim=vdim, bias=bias, dtype=dtype)
    ours.load_state_dict(tm.state_dict())
    return tm, ours


def padding(b, length, lengths):
    return np.arange(length)[None, :] < np.asarray(lengths)[:, None]


MHA_CASES = ["self", "self_causal", "self_padding", "self_float_mask", "self_no_bias",
             "cross", "cross_kdim_vdim", "cross_shared_kv"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", MHA_CASES)
def test_multihead_attention(rng, dtype, case):
    kdim, vdim = (12, 20) if case == "cross_kdim_vdim" else (None, None)
    tm, ours = mha_pair(dtype, kdim, vdim, bias=case != "self_no_bias")
    b, lq, lk = 3, 11, 11 if case.startswith("self") else 17
    cross = case.startswith("cross")
    q = rng.standard_normal((b, lq, E)).astype(dtype)
    k = rng.standard_normal((b, lk, kdim or E)).astype(dtype) if cross else q
    v = rng.standard_normal((b, lk, vdim or E)).astype(dtype) if cross else q
    if case == "cross_shared_kv":
        v = k
    w = rng.standard_normal((b, lq, E)).astype(dtype)
    ours_kw, torch_kw = {}, {}
    if case == "self_causal":
        ours_kw["is_causal"] = True
        torch_kw["attn_mask"] = torch.triu(torch.ones(lq, lk, dtype=torch.bool), diagonal=1)
    if case == "self_padding":
        pad = padding(b, lk, [lk, 7, 3])
        ours_kw["key_padding_mask"] = pad
        torch_kw["key_padding_mask"] = torch.from_numpy(~pad)
    if case == "self_float_mask":
        mask = rng.standard_normal((lq, lk)).astype(dtype)
        ours_kw["attn_mask"] = mask
        torch_kw["attn_mask"] = torch.from_numpy(mask)

    qt = leaf(q)
    kt = qt if not cross else leaf(k)
    vt = qt if not cross else (kt if case == "cross_shared_kv" else leaf(v))
    y, _ = tm(qt, kt, vt, need_weights=False, **torch_kw)
    (y * torch.from_numpy(w)).sum().backward()
    if cross:
        ours(q, k, v, training=True, **ours_kw)
    else:
        ours(q, training=True, **ours_kw)
    d = ours.backward(w)
    if not cross:
        close("x", d, qt.grad, dtype)
    else:
        close("query", d[0], qt.grad, dtype)
        close("key", d[1], kt.grad, dtype)
        if case == "cross_shared_kv":
            assert d[2] is None
        else:
            close("value", d[2], vt.grad, dtype)
    compare_params(tm, ours, dtype)


# -- GQA, RoPE, QK-norm: a hand-written torch equivalent -------------------------------
def torch_rope(x, theta):
    """Rotate-half RoPE of x (B, L, H, D) at positions 0..L-1 (float64 angles)."""
    length, d = x.shape[1], x.shape[-1]
    inv = theta ** (-torch.arange(d // 2, dtype=torch.float64) * 2.0 / d)
    ang = torch.arange(length, dtype=torch.float64)[:, None] * inv
    cos, sin = ang.cos().to(x.dtype)[:, None], ang.sin().to(x.dtype)[:, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def torch_attention(m, p, xq, xk, xv, causal):
    """m's forward in torch ops, with its parameters p (name -> leaf tensor)."""
    b, lq, lk = xq.shape[0], xq.shape[1], xk.shape[1]
    hq, hkv, d, dv = m.num_heads, m.num_kv_heads, m.head_dim, m.value_dim
    q = F.linear(xq, p["q_proj.weight"], p.get("q_proj.bias")).view(b, lq, hq, d)
    k = F.linear(xk, p["k_proj.weight"], p.get("k_proj.bias")).view(b, lk, hkv, d)
    v = F.linear(xv, p["v_proj.weight"], p.get("v_proj.bias")).view(b, lk, hkv, dv)
    if m.qk_norm:
        q = F.layer_norm(q, (d,), p["q_norm.weight"], p.get("q_norm.bias"), 1e-5)
        k = F.layer_norm(k, (d,), p["k_norm.weight"], p.get("k_norm.bias"), 1e-5)
    if m.rope:
        q, k = torch_rope(q, m.rope_theta), torch_rope(k, m.rope_theta)
    q, k, v = (a.transpose(1, 2) for a in (q, k, v))
    k, v = (a.repeat_interleave(hq // hkv, dim=1) for a in (k, v))
    s = q @ k.transpose(-1, -2) / d ** 0.5
    if causal:
        s = s.masked_fill(torch.ones(lq, lk, dtype=torch.bool).triu(1 + lk - lq), float("-inf"))
    o = (s.softmax(-1) @ v).transpose(1, 2).reshape(b, lq, hq * dv)
    return F.linear(o, p["out_proj.weight"], p.get("out_proj.bias"))


GQA_CASES = {
    "gqa_rope_qknorm_causal": dict(num_kv_heads=2, rope=True, qk_norm=True),
    "mqa_rope": dict(num_kv_heads=1, rope=True),
    "gqa_qknorm_value_dim": dict(num_kv_heads=2, qk_norm=True, head_dim=6, value_dim=10),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(GQA_CASES))
@pytest.mark.parametrize("cross", [False, True])
def test_gqa_rope_qk_norm(rng, dtype, case, cross):
    ours = tileattn.MultiHeadAttention(E, H, dtype=dtype, seed=4, **GQA_CASES[case])
    r = np.random.default_rng(7)
    with ours.editing():
        for name, a in ours.named_parameters():
            if name.endswith("bias"):
                a[:] = r.uniform(-0.5, 0.5, a.shape)
            elif "norm" in name:
                a[:] = r.uniform(0.75, 1.25, a.shape)
    p = {n: leaf(a.copy()) for n, a in ours.named_parameters()}
    b, lq, lk = 2, 9, (13 if cross else 9)
    q = rng.standard_normal((b, lq, E)).astype(dtype)
    k = rng.standard_normal((b, lk, E)).astype(dtype) if cross else q
    v = rng.standard_normal((b, lk, E)).astype(dtype) if cross else q
    w = rng.standard_normal((b, lq, E)).astype(dtype)
    causal = "causal" in case or not cross
    qt = leaf(q)
    kt, vt = (leaf(k), leaf(v)) if cross else (qt, qt)
    (torch_attention(ours, p, qt, kt, vt, causal) * torch.from_numpy(w)).sum().backward()
    if cross:
        ours(q, k, v, is_causal=causal, training=True)
        dq, dk, dv = ours.backward(w)
        close("key", dk, kt.grad, dtype)
        close("value", dv, vt.grad, dtype)
    else:
        ours(q, is_causal=causal, training=True)
        dq = ours.backward(w)
    close("query", dq, qt.grad, dtype)
    for name, g in ours.grads.items():
        close(name, g, p[name].grad, dtype)


# -- encoder layer and encoder ---------------------------------------------------------
def torch_layer(activation, norm_first, dtype, seed=0):
    torch.manual_seed(seed)
    tl = torch.nn.TransformerEncoderLayer(E, H, FF, dropout=0.0, activation=TORCH_ACT[activation],
                                          batch_first=True, norm_first=norm_first)
    tl = tl.to(tdtype(dtype))
    randomise(tl, seed + 1)
    return tl


def ours_layer(activation, norm_first, dtype):
    return tileattn.TransformerEncoderLayer(E, H, FF, dropout=0.0, activation=activation,
                                            norm_first=norm_first, dtype=dtype, seed=7)


def torch_masks(module, length, pad, causal):
    kw = {}
    if pad is not None:
        kw["src_key_padding_mask"] = torch.from_numpy(~pad)
    if causal:
        name = "mask" if isinstance(module, torch.nn.TransformerEncoder) else "src_mask"
        kw[name] = torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1)
    return kw


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation,masks", [("relu", "causal"), ("gelu", "padding"),
                                              ("gelu_tanh", "causal"), ("silu", "none")])
def test_encoder_layer(rng, dtype, norm_first, activation, masks):
    tl = torch_layer(activation, norm_first, dtype)
    ours = ours_layer(activation, norm_first, dtype)
    ours.load_state_dict(tl.state_dict())
    b, length = 3, 13
    x = rng.standard_normal((b, length, E)).astype(dtype)
    w = rng.standard_normal((b, length, E)).astype(dtype)
    pad = padding(b, length, [length, 8, 4]) if masks == "padding" else None
    causal = masks == "causal"
    xt = leaf(x)
    y = tl(xt, **torch_masks(tl, length, pad, causal))
    (y * torch.from_numpy(w)).sum().backward()
    ours(x, key_padding_mask=pad, is_causal=causal, training=True)
    close("src", ours.backward(w), xt.grad, dtype)
    compare_params(tl, ours, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder(rng, dtype, norm_first):
    tl = torch_layer("gelu", norm_first, dtype, seed=5)
    tnorm = torch.nn.LayerNorm(E).to(tdtype(dtype)) if norm_first else None
    te = torch.nn.TransformerEncoder(tl, 2, norm=tnorm, enable_nested_tensor=False)
    randomise(te, 11, weights=True)       # the copies start equal: make them differ
    ours = tileattn.TransformerEncoder(ours_layer("gelu", norm_first, dtype), 2,
                                       norm=tileattn.LayerNorm(E, dtype=dtype) if norm_first
                                       else None)
    ours.load_state_dict(te.state_dict())
    b, length = 2, 15
    x = rng.standard_normal((b, length, E)).astype(dtype)
    w = rng.standard_normal((b, length, E)).astype(dtype)
    xt = leaf(x)
    y = te(xt, **torch_masks(te, length, None, True), is_causal=True)
    (y * torch.from_numpy(w)).sum().backward()
    ours(x, is_causal=True, training=True)
    close("src", ours.backward(w), xt.grad, dtype)
    compare_params(te, ours, dtype)
