"""The fused backward against the dense oracle (grad_reference.py), torch
autograd, finite differences; determinism, layouts, edge cases, errors."""

import numpy as np
import pytest

import tileattn
from conftest import make_qkv
from grad_reference import ORACLE, assert_grads_close, attention_grads, check_grad
from reference import attention

sdpa = tileattn.scaled_dot_product_attention
sdpa_bwd = tileattn.scaled_dot_product_attention_backward


def run(q, k, v, dout=None, rng=None, **kw):
    """Forward with lse, then the backward; returns (out, dout, grads)."""
    return_mask_grad = kw.pop("return_mask_grad", False)
    out, lse = sdpa(q, k, v, return_lse=True, **kw)
    if dout is None:
        dout = rng.standard_normal(out.shape).astype(out.dtype)
    grads = sdpa_bwd(dout, q, k, v, out, lse, return_mask_grad=return_mask_grad, **kw)
    return out, dout, grads


def random_kpm(rng, b, lk, keep=0.7):
    kpm = rng.random((b, lk)) < keep
    kpm[:, 0] = True
    return kpm


MASK_CASES = {
    "none": lambda rng, b, hq, lq, lk: {},
    "causal": lambda rng, b, hq, lq, lk: dict(is_causal=True),
    "window_int": lambda rng, b, hq, lq, lk: dict(window=70),
    "window_pair": lambda rng, b, hq, lq, lk: dict(window=(40, 9)),
    "window_left_open": lambda rng, b, hq, lq, lk: dict(window=(-1, 5)),
    "bool_mask": lambda rng, b, hq, lq, lk: dict(attn_mask=rng.random((b, 1, lq, lk)) < 0.7),
    "float_mask": lambda rng, b, hq, lq, lk: dict(attn_mask=np.where(
        rng.random((lq, lk)) < 0.2, -np.inf, rng.standard_normal((lq, lk))).astype(np.float32)),
    "key_padding": lambda rng, b, hq, lq, lk: dict(key_padding_mask=random_kpm(rng, b, lk)),
    "combined": lambda rng, b, hq, lq, lk: dict(
        attn_mask=rng.random((hq, lq, lk)) < 0.85, key_padding_mask=random_kpm(rng, b, lk, 0.8),
        is_causal=True, window=(100, 3)),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", sorted(MASK_CASES))
def test_every_mask_against_the_oracle(each_isa, rng, case, dtype):
    b, hq, hkv, lq, lk = 2, 2, 1, 130, 333  # two key segments, GQA
    q, k, v = make_qkv(rng, b, hq, hkv, lq, lk, 32, dtype=dtype)
    kw = MASK_CASES[case](rng, b, hq, lq, lk)
    if "attn_mask" in kw and kw["attn_mask"].dtype != bool:
        kw["attn_mask"] = kw["attn_mask"].astype(dtype)
    _, dout, grads = run(q, k, v, rng=rng, **kw)
    assert_grads_close(grads, dout, q, k, v, **kw)


@pytest.mark.parametrize("lq", [1, 63, 64, 65, 96, 97, 193])
@pytest.mark.parametrize("lk", [1, 64, 97, 193, 257])
def test_tile_boundary_lengths(each_isa, rng, lq, lk):
    q, k, v = make_qkv(rng, 1, 2, 1, lq, lk, 16, dv=24)
    for kw in ({}, dict(is_causal=True)):
        if kw and lk < lq:
            continue  # leading rows see nothing: covered by the fully masked tests
        _, dout, grads = run(q, k, v, rng=rng, **kw)
        assert_grads_close(grads, dout, q, k, v, **kw)


@pytest.mark.parametrize("d,dv", [(1, 1), (8, 3), (17, 33), (64, 64), (80, 48), (128, 128)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_head_sizes(each_isa, rng, d, dv, dtype):
    q, k, v = make_qkv(rng, 1, 2, 2, 70, 130, d, dv=dv, dtype=dtype)
    _, dout, grads = run(q, k, v, rng=rng, is_causal=True, scale=0.3)
    assert_grads_close(grads, dout, q, k, v, is_causal=True, scale=0.3)


@pytest.mark.parametrize("hq,hkv", [(8, 1), (6, 2), (4, 4)])
def test_gqa_sums_the_group(each_isa, rng, hq, hkv):
    q, k, v = make_qkv(rng, 2, hq, hkv, 90, 200, 16)
    _, dout, grads = run(q, k, v, rng=rng, window=50)
    assert grads[1].shape == k.shape and grads[2].shape == v.shape
    assert_grads_close(grads, dout, q, k, v, window=50)


@pytest.mark.parametrize("p", [0.1, 0.5, 1.0])
def test_dropout_uses_the_forward_mask(each_isa, rng, p):
    q, k, v = make_qkv(rng, 2, 2, 1, 100, 270, 16)
    kw = dict(dropout_p=p, seed=7, is_causal=True)
    out, dout, grads = run(q, k, v, rng=rng, **kw)
    oracle = assert_grads_close(grads, dout, q, k, v, **kw)
    # The output the oracle's mask gives is the forward's: the same mask.
    np.testing.assert_allclose(out, oracle[0].astype(np.float64), atol=1e-5)
    if p == 1.0:
        assert not grads[2].any()  # every weight dropped: dV = Pd^T dO = 0


def test_dropout_mask_differs_by_seed(rng):
    q, k, v = make_qkv(rng, 1, 2, 2, 60, 60, 16)
    _, dout, g1 = run(q, k, v, rng=rng, dropout_p=0.3, seed=1)
    _, _, g2 = run(q, k, v, dout=dout, dropout_p=0.3, seed=2)
    assert not np.array_equal(g1[0], g2[0])


def test_dropout_needs_the_seed(rng):
    q, k, v = make_qkv(rng, 1, 1, 1, 8, 8, 4)
    out, lse = sdpa(q, k, v, dropout_p=0.2, seed=3, return_lse=True)
    with pytest.raises(tileattn.InvalidParameterError, match="seed"):
        sdpa_bwd(out, q, k, v, out, lse, dropout_p=0.2)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fully_masked_rows_give_zero_gradients(each_isa, rng, dtype):
    b, h, lq, lk = 2, 2, 120, 300
    q, k, v = make_qkv(rng, b, h, h, lq, lk, 16, dtype=dtype)
    mask = np.ones((lq, lk), bool)
    mask[3] = False
    mask[100:110] = False
    mask[:, 250:] = False    # keys nobody sees
    fmask = np.where(mask, 0.0, -np.inf).astype(dtype)
    kpm = np.ones((b, lk), bool)
    kpm[1] = False           # batch item 1 has no real keys at all
    for kw in (dict(attn_mask=mask), dict(attn_mask=fmask), dict(key_padding_mask=kpm)):
        out, dout, grads = run(q, k, v, rng=rng, **kw)
        for g in grads:
            assert np.isfinite(g).all()
        _, w = attention(q, k, v, **kw)
        dead = ~w.any(axis=-1)
        assert dead.any()
        assert not grads[0][dead].any()
        assert_grads_close(grads, dout, q, k, v, **kw)
    _, _, (dq, dk, dv) = run(q, k, v, rng=rng, attn_mask=mask)
    assert not dk[:, :, 250:].any() and not dv[:, :, 250:].any()


def test_causal_with_more_queries_than_keys(each_isa, rng):
    """Bottom-right alignment: the first Lq - Lk queries see no key."""
    q, k, v = make_qkv(rng, 1, 2, 2, 150, 70, 8)
    _, dout, grads = run(q, k, v, rng=rng, is_causal=True)
    assert not grads[0][:, :, :80].any()
    assert_grads_close(grads, dout, q, k, v, is_causal=True)


@pytest.mark.parametrize("shape", ["LqLk", "B1LqLk", "BHqLqLk", "1Hq1Lk", "Lk"])
def test_float_mask_gradient(each_isa, rng, shape):
    b, hq, hkv, lq, lk = 2, 4, 2, 70, 150
    q, k, v = make_qkv(rng, b, hq, hkv, lq, lk, 16)
    dims = {"LqLk": (lq, lk), "B1LqLk": (b, 1, lq, lk), "BHqLqLk": (b, hq, lq, lk),
            "1Hq1Lk": (1, hq, 1, lk), "Lk": (lk,)}[shape]
    mask = rng.standard_normal(dims).astype(np.float32)
    mask[rng.random(dims) < 0.2] = -np.inf
    kw = dict(attn_mask=mask, is_causal=True)
    _, dout, grads = run(q, k, v, rng=rng, return_mask_grad=True, **kw)
    dq, dk, dv, dmask = grads
    assert dmask.shape == mask.shape and dmask.dtype == mask.dtype
    assert not dmask[np.isneginf(mask)].any()
    oracle = assert_grads_close((dq, dk, dv), dout, q, k, v, **kw)
    plain = attention_grads(dout, q, k, v, dtype=np.float32, **kw)

    def reduce(ds):
        full = np.broadcast_to(ds, (b, hq, lq, lk))
        lead = 4 - len(dims)
        full = full.sum(axis=tuple(range(lead))) if lead else full
        axes = tuple(i for i, n in enumerate(dims) if n == 1)
        return full.sum(axis=axes, keepdims=True).reshape(dims)

    check_grad("dmask", dmask, reduce(oracle[4]), reduce(plain[4]), reduce(oracle[5][3]))


def test_mask_gradient_needs_a_float_mask(rng):
    q, k, v = make_qkv(rng, 1, 1, 1, 8, 8, 4)
    out, lse = sdpa(q, k, v, return_lse=True)
    with pytest.raises(tileattn.InvalidParameterError, match="return_mask_grad"):
        sdpa_bwd(out, q, k, v, out, lse, return_mask_grad=True)
    m = np.ones((8, 8), bool)
    out, lse = sdpa(q, k, v, attn_mask=m, return_lse=True)
    with pytest.raises(tileattn.InvalidParameterError, match="bool"):
        sdpa_bwd(out, q, k, v, out, lse, attn_mask=m, return_mask_grad=True)


def test_finite_differences_float64(rng):
    """Central differences of L = sum(dout * out) at random coordinates of
    q, k, v and a float mask, every mask kind at once, GQA, dropout."""
    b, hq, hkv, lq, lk, d = 1, 4, 2, 40, 70, 8
    q, k, v = make_qkv(rng, b, hq, hkv, lq, lk, d, dtype=np.float64)
    mask = rng.standard_normal((lq, lk))
    kw = dict(key_padding_mask=random_kpm(rng, b, lk, 0.9), window=(30, 2), is_causal=True,
              dropout_p=0.2, seed=11)
    out, dout, (dq, dk, dv, dmask) = run(q, k, v, rng=rng, attn_mask=mask,
                                         return_mask_grad=True, **kw)

    def loss(q_, k_, v_, m_):
        return float(np.sum(dout * sdpa(q_, k_, v_, attn_mask=m_, **kw)))

    h = 1e-6
    for name, arr, grad in (("q", q, dq), ("k", k, dk), ("v", v, dv), ("mask", mask, dmask)):
        for _ in range(6):
            idx = tuple(rng.integers(0, s) for s in arr.shape)
            args = {"q": q, "k": k, "v": v, "mask": mask}
            plus, minus = arr.copy(), arr.copy()
            plus[idx] += h
            minus[idx] -= h
            lp = loss(**{("m_" if n == "mask" else n + "_"): (plus if n == name else a)
                         for n, a in args.items()})
            lm = loss(**{("m_" if n == "mask" else n + "_"): (minus if n == name else a)
                         for n, a in args.items()})
            fd = (lp - lm) / (2 * h)
            assert abs(fd - grad[idx]) <= 1e-6 * max(1.0, abs(fd)), (name, idx, fd, grad[idx])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bitwise_identical_across_thread_counts(each_isa, rng, restore_threads, dtype):
    b, hq, hkv, lq, lk = 2, 4, 2, 300, 1100  # several key segments per head
    q, k, v = make_qkv(rng, b, hq, hkv, lq, lk, 32, dtype=dtype)
    kpm = random_kpm(rng, b, lk, 0.8)
    fmask = rng.standard_normal((lq, lk)).astype(dtype)
    cases = [dict(), dict(is_causal=True), dict(window=(200, 10), key_padding_mask=kpm),
             dict(attn_mask=fmask, dropout_p=0.2, seed=5, return_mask_grad=True)]
    dout = rng.standard_normal((b, hq, lq, 32)).astype(dtype)
    results = {}
    for n in (1, 2, 3):
        tileattn.set_num_threads(n)
        results[n] = [run(q, k, v, dout=dout, **dict(c))[2] for c in cases]
    for n in (2, 3):
        for got, want in zip(results[n], results[1]):
            for a, w in zip(got, want):
                np.testing.assert_array_equal(a, w)


def test_strided_unbatched_and_float16(rng):
    q, k, v = make_qkv(rng, 2, 4, 2, 100, 120, 16)
    # Strided views: heads of a fused projection, a transposed layout.
    big = rng.standard_normal((2, 120, 3, 2, 16)).astype(np.float32)
    ks, vs = big[:, :, 0].transpose(0, 2, 1, 3), big[:, :, 2].transpose(0, 2, 1, 3)
    _, dout, grads = run(q, ks, vs, rng=rng, is_causal=True)
    _, _, dense = run(q, np.ascontiguousarray(ks), np.ascontiguousarray(vs), dout=dout,
                      is_causal=True)
    for a, b_ in zip(grads, dense):
        np.testing.assert_array_equal(a, b_)
    # Unbatched inputs give the batched result without the batch axis.
    _, _, g1 = run(q[0], k[0], v[0], dout=dout[0], window=20)
    _, _, g4 = run(q[:1], k[:1], v[:1], dout=dout[:1], window=20)
    for a, b_ in zip(g1, g4):
        np.testing.assert_array_equal(a, b_[0])
    # float16 in, float16 gradients out, computed in float32.
    h = [a.astype(np.float16) for a in (q, k, v)]
    out, lse = sdpa(*h, return_lse=True, is_causal=True)
    assert lse.dtype == np.float64
    g16 = sdpa_bwd(dout.astype(np.float16), *h, out, lse, is_causal=True)
    assert all(g.dtype == np.float16 for g in g16)
    g32 = run(*(a.astype(np.float32) for a in h), dout=dout.astype(np.float16).astype(np.float32),
              is_causal=True)[2]
    for a, b_ in zip(g16, g32):
        np.testing.assert_allclose(a.astype(np.float32), b_, atol=2e-2, rtol=2e-2)


def test_empty_shapes(rng):
    q, k, v = make_qkv(rng, 1, 2, 2, 5, 0, 8)
    out, dout, (dq, dk, dv) = run(q, k, v, rng=rng)
    assert not dq.any() and dk.shape == k.shape and dv.shape == v.shape
    q, k, v = make_qkv(rng, 1, 2, 2, 0, 7, 8)
    _, _, (dq, dk, dv) = run(q, k, v, rng=rng)
    assert dq.shape == q.shape and not dk.any() and not dv.any()


def test_key_lengths_through_the_core(each_isa, rng):
    """Ragged batches (the KV cache's key_lengths): keys past an item's
    length get zero gradient and the rest equals a call on the short keys."""
    core = tileattn._core
    b, h, lq, lk, d = 2, 2, 30, 300, 16
    q, k, v = make_qkv(rng, b, h, h, lq, lk, d)
    lengths = np.array([300, 131], np.int64)
    scale = 1.0 / np.sqrt(d)
    out = np.empty((b, h, lq, d), np.float32)
    lse = np.empty((b, h, lq, 1), np.float64)
    options = core.AttentionOptions(scale=scale, window_right=0, key_lengths=lengths)
    core.attention_forward(q, k, v, out, options, lse=lse)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    dq, dk, dv = np.empty_like(q), np.full_like(k, np.nan), np.full_like(v, np.nan)
    core.attention_backward(q, k, v, out, lse, dout, dq, dk, dv, options)
    assert not dk[1, :, 131:].any() and not dv[1, :, 131:].any()
    n = 131
    _, _, (dq1, dk1, dv1) = run(q[1:], k[1:, :, :n], v[1:, :, :n], dout=dout[1:], is_causal=True)
    np.testing.assert_array_equal(dq[1:], dq1)
    np.testing.assert_array_equal(dk[1:, :, :n], dk1)
    np.testing.assert_array_equal(dv[1:, :, :n], dv1)


def test_typed_errors_name_the_argument(rng):
    q, k, v = make_qkv(rng, 1, 2, 2, 8, 9, 4)
    out, lse = sdpa(q, k, v, return_lse=True)
    with pytest.raises(tileattn.ShapeError, match="dout"):
        sdpa_bwd(out[:, :, :5], q, k, v, out, lse)
    with pytest.raises(tileattn.DTypeError, match="dout"):
        sdpa_bwd(out.astype(np.float64), q, k, v, out, lse)
    with pytest.raises(tileattn.ShapeError, match="out"):
        sdpa_bwd(out, q, k, v, out[..., :3], lse)
    with pytest.raises(tileattn.ShapeError, match="lse"):
        sdpa_bwd(out, q, k, v, out, lse[..., None])
    with pytest.raises(tileattn.DTypeError, match="lse"):
        sdpa_bwd(out, q, k, v, out, lse.astype(np.int32))
    with pytest.raises(tileattn.DTypeError, match="dout"):
        sdpa_bwd(out.astype(np.int64), q, k, v, out, lse)
    with pytest.raises(tileattn.ShapeError, match="attn_mask"):
        sdpa_bwd(out, q, k, v, out, lse, attn_mask=np.ones((3, 3), bool))
    with pytest.raises(tileattn.InvalidParameterError, match="window"):
        sdpa_bwd(out, q, k, v, out, lse, window=0)
    with pytest.raises(tileattn.ShapeError, match="heads"):
        sdpa_bwd(out, q, k[:, :1].repeat(3, 1), v[:, :1].repeat(3, 1), out, lse)
    with pytest.raises(tileattn.InvalidParameterError, match="return_lse"):
        sdpa(q, k, v, return_lse=1)


def test_forward_lse_is_the_log_sum_exp(each_isa, rng):
    q, k, v = make_qkv(rng, 2, 2, 1, 3, 100, 16, dtype=np.float64)  # decode path
    for lq in (3, 100):                                              # and the blocked one
        q = rng.standard_normal((2, 2, lq, 16))
        out, lse = sdpa(q, k, v, return_lse=True, is_causal=True)
        s = (q @ np.swapaxes(np.repeat(k, 2, axis=1), -1, -2)) / 4.0
        i = np.arange(lq)[:, None] + 100 - lq
        s = np.where(np.arange(100)[None] <= i, s, -np.inf)
        want = np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1)) + s.max(-1)
        np.testing.assert_allclose(lse, want, rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(out, sdpa(q, k, v, is_causal=True))


def test_single_query_forward_with_lse_has_the_backward_bits(each_isa, rng):
    """One query per (batch, head) takes the decode path, whose fast score
    sums round differently from the prefill's chains. With return_lse the
    forward must score as the backward will (the prefill's bits: the same
    row inside a longer query block), or e^(s - lse) misses a dominant
    key's weight by its score's rounding."""
    q, k, v = make_qkv(rng, 2, 3, 3, 1, 64, 16)
    out1, lse1 = sdpa(q, k, v, return_lse=True)
    out8, lse8 = sdpa(np.repeat(q, 8, axis=2), k, v, return_lse=True)
    np.testing.assert_array_equal(out1, out8[:, :, :1])
    np.testing.assert_array_equal(lse1, lse8[:, :, :1])


@pytest.mark.parametrize("seed", [70, 223])
def test_single_query_weights_as_accurate_as_numpy(each_isa, seed):
    """dV = P^T dO with one query is each weight times dO: a direct view of
    the recomputed weights' error. Two draws where it was 1.2x and 1.8x
    over the bound: the forward's single-row scores rounded differently
    from the backward's, and base-2 scores (log2 e folded into the queries
    and the mask) carried each score's rounding at 1.44 times its size."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((2, 3, 1, 16)).astype(np.float32)
    k = rng.standard_normal((2, 3, 64, 16)).astype(np.float32)
    v = rng.standard_normal((2, 3, 64, 80)).astype(np.float32)
    m = rng.standard_normal((2, 1, 1, 64))
    m[rng.random(m.shape) < 0.2] = -np.inf
    kw = dict(attn_mask=m.astype(np.float32), is_causal=bool(seed % 2))
    _, dout, grads = run(q, k, v, rng=np.random.default_rng(q.size), **kw)
    assert_grads_close(grads, dout, q, k, v, **kw)


def test_garbage_in_hidden_keys_stays_out(each_isa, rng):
    """NaN/inf in the K/V rows of padding keys (e.g. an unfilled cache slot)
    do not reach any gradient, as they do not reach the forward's output."""
    q, k, v = make_qkv(rng, 2, 2, 2, 70, 150, 16)
    kpm = np.ones((2, 150), bool)
    kpm[0, 100:] = False
    kpm[1, 3] = False
    clean = run(q, k, v, rng=rng, key_padding_mask=kpm, is_causal=True)
    kg, vg = k.copy(), v.copy()
    kg[0, :, 100:] = np.nan
    kg[1, :, 3] = np.inf
    vg[0, :, 120:] = -np.inf
    vg[1, :, 3] = np.nan
    _, _, grads = run(q, kg, vg, dout=clean[1], key_padding_mask=kpm, is_causal=True)
    for g, want in zip(grads, clean[2]):
        np.testing.assert_array_equal(g, want)


def test_grads_out_writes_into_strided_views(rng):
    """The gradients can land in views of one fused (B, L, 3, H, D) buffer,
    as a fused QKV projection's backward wants them."""
    b, h, l, d = 2, 3, 70, 16
    q, k, v = make_qkv(rng, b, h, h, l, l, d)
    _, dout, want = run(q, k, v, rng=rng, is_causal=True)
    fused = np.full((b, l, 3, h, d), np.nan, np.float32)
    views = tuple(fused[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
    out, lse = sdpa(q, k, v, is_causal=True, return_lse=True)
    got = sdpa_bwd(dout, q, k, v, out, lse, is_causal=True, grads_out=views)
    for g, view, w in zip(got, views, want):
        assert g is view
        np.testing.assert_array_equal(view, w)
    # float16 arrays are filled from the float32 computation.
    h16 = [a.astype(np.float16) for a in (q, k, v)]
    out16, lse16 = sdpa(*h16, is_causal=True, return_lse=True)
    bufs = tuple(np.empty_like(a) for a in h16)
    got16 = sdpa_bwd(dout.astype(np.float16), *h16, out16, lse16, is_causal=True, grads_out=bufs)
    assert all(g is u for g, u in zip(got16, bufs)) and all(np.isfinite(u).all() for u in bufs)
    with pytest.raises(tileattn.ShapeError, match="dk"):
        sdpa_bwd(dout, q, k, v, out, lse, grads_out=(views[0], views[0][:, :1], views[2]))
    with pytest.raises(tileattn.DTypeError, match="dv"):
        sdpa_bwd(dout, q, k, v, out, lse, grads_out=(views[0], views[1], views[2].astype(float)))


def test_large_batches_go_in_chunks_with_the_same_bits(rng):
    """A batch whose dQ buffers exceed the scratch budget is computed in
    chunks of heads; each item gets the bits it gets alone."""
    b, h, lq, lk, d = 5, 4, 4096, 1024, 64  # 10 KV heads x 8 MB of dQ buffers > 64 MB
    q, k, v = make_qkv(rng, b, h, 2, lq, lk, d)
    _, dout, grads = run(q, k, v, rng=rng, is_causal=True)
    for i in (0, 3, 4):
        _, _, alone = run(q[i:i + 1], k[i:i + 1], v[i:i + 1], dout=dout[i:i + 1], is_causal=True)
        for g, a in zip(grads, alone):
            np.testing.assert_array_equal(g[i:i + 1], a)
