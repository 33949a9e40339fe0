"""Module backward passes against float64 central finite differences, and the
bookkeeping around them: accumulation, zero_grad, errors, no saved state in
inference, optimisers reading a module's gradients."""

import contextlib
import pickle

import numpy as np
import pytest

import tileattn
from tileattn import optim

F64 = np.float64
EPS = 1e-6
# Central differences in float64 with EPS = 1e-6 are good to ~1e-9 of the
# gradient's scale; a wrong term is off by O(1) of it.
RTOL = 1e-6
ATOL = 1e-8
SAMPLES = 12      # entries probed per array (small shapes: a few hundred forwards)


def dropout_rngs(module):
    return [m._dropout_rng for _, m in module.named_modules() if hasattr(m, "_dropout_rng")]


def make_loss(module, args, kwargs, weights):
    """loss(args) = sum(y * weights), with every dropout stream rewound to the
    same state first so that each evaluation draws the same masks."""
    states = [r.bit_generator.state for r in dropout_rngs(module)]

    def loss():
        for r, st in zip(dropout_rngs(module), states):
            r.bit_generator.state = st
        y = module(*args, **kwargs)
        return float(np.sum(y * weights))
    return loss


def fd_entries(loss, array, rng, owner=None):
    """(flat indices, central differences of loss) at a few entries of array
    (a parameter of ``owner``, which is then edited through it)."""
    idx = rng.choice(array.size, size=min(SAMPLES, array.size), replace=False)
    out = []

    def put(i, value):
        with owner.editing() if owner is not None else contextlib.nullcontext():
            array.reshape(-1)[i] = value

    for i in idx:
        old = array.reshape(-1)[i]
        put(i, old + EPS)
        up = loss()
        put(i, old - EPS)
        down = loss()
        put(i, old)
        out.append((up - down) / (2 * EPS))
    return idx, np.array(out)


def assert_close(name, got, idx, want):
    got = got.reshape(-1)[idx]
    scale = float(np.max(np.abs(want)))
    err = float(np.max(np.abs(got - want)))
    # + ATOL: the differences' own round-off, |loss| * 1e-16 / EPS, matters
    # for gradients that are exactly zero (e.g. the key bias: softmax ignores
    # a shift of all scores).
    assert err <= RTOL * scale + ATOL, f"{name}: max error {err:.3g} vs scale {scale:.3g}"


def check_module(module, inputs, rng, n_grads=None, **kwargs):
    """Backward of module(*inputs, training=True, **kwargs) vs finite
    differences for each input (or the first n_grads) and each parameter."""
    kwargs = dict(kwargs, training=True)
    w = rng.standard_normal(module(*inputs, **kwargs).shape)
    module.zero_grad()
    loss = make_loss(module, inputs, kwargs, w)
    loss()                       # the training forward whose masks every evaluation redraws
    d = module.backward(w)
    d = d if isinstance(d, tuple) else (d,)
    n = len(d) if n_grads is None else n_grads
    for i in range(n):
        if d[i] is None:
            continue
        assert d[i].shape == inputs[i].shape and d[i].dtype == inputs[i].dtype
        idx, want = fd_entries(loss, inputs[i], rng)
        assert_close(f"input {i}", d[i], idx, want)
    grads = module.grads
    assert grads.keys() == dict(module.named_parameters()).keys()
    for name, p in module.named_parameters():
        idx, want = fd_entries(loss, p, rng, owner=module)
        assert_close(name, grads[name], idx, want)
    return d


def x64(rng, *shape):
    return rng.standard_normal(shape)


# -- the small modules --------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
def test_linear(rng, bias):
    m = tileattn.Linear(5, 7, bias=bias, dtype=F64, rng=rng)
    if bias:
        m.bias = rng.standard_normal(7)
    check_module(m, (x64(rng, 2, 3, 5),), rng)


@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm(rng, bias):
    m = tileattn.LayerNorm(6, bias=bias, dtype=F64)
    m.weight = 1 + 0.3 * rng.standard_normal(6)
    if bias:
        m.bias = rng.standard_normal(6)
    check_module(m, (3 * x64(rng, 2, 4, 6) + 1,), rng)


@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "silu"])
def test_feed_forward(rng, activation):
    m = tileattn.FeedForward(6, 10, activation, dtype=F64, seed=1)
    m.linear1.bias = 0.3 * rng.standard_normal(10)
    check_module(m, (x64(rng, 2, 5, 6),), rng)


def test_feed_forward_dropout(rng):
    m = tileattn.FeedForward(6, 10, "gelu", dropout=0.4, dtype=F64, seed=1)
    check_module(m, (x64(rng, 2, 5, 6),), rng)


# -- attention ----------------------------------------------------------------------
E = 8


def mha(**kw):
    m = tileattn.MultiHeadAttention(E, kw.pop("num_heads", 2), dtype=F64, seed=3, **kw)
    rng = np.random.default_rng(9)
    with m.editing():
        for name, p in m.named_parameters():     # non-trivial biases and norm weights
            if name.endswith("bias"):
                p[:] = 0.3 * rng.standard_normal(p.shape)
            elif "norm" in name:
                p[:] = 1 + 0.3 * rng.standard_normal(p.shape)
    return m


SELF_CASES = {
    "plain": ({}, {}),
    "causal": ({}, {"is_causal": True}),
    "gqa_rope_qknorm": ({"num_heads": 4, "num_kv_heads": 2, "head_dim": 4, "rope": True,
                         "qk_norm": True}, {"is_causal": True}),
    "mqa_no_bias": ({"num_heads": 4, "num_kv_heads": 1, "bias": False}, {}),
    "window": ({}, {"window": (2, 1)}),
    "value_dim_output_dim": ({"value_dim": 3, "output_dim": 5}, {}),
    "dropout": ({"dropout": 0.3}, {}),
}


@pytest.mark.parametrize("case", sorted(SELF_CASES))
def test_self_attention(rng, case):
    ctor, call = SELF_CASES[case]
    d = check_module(mha(**ctor), (x64(rng, 2, 6, E),), rng, **call)
    assert len(d) == 1                       # one array for self-attention


def test_self_attention_masks(rng):
    pad = np.ones((2, 6), bool)
    pad[1, 4:] = False
    check_module(mha(), (x64(rng, 2, 6, E),), rng, key_padding_mask=pad)
    bool_mask = rng.random((2, 1, 6, 6)) < 0.7
    bool_mask[..., 0] = True
    check_module(mha(), (x64(rng, 2, 6, E),), rng, attn_mask=bool_mask)
    check_module(mha(), (x64(rng, 2, 6, E),), rng, attn_mask=rng.standard_normal((6, 6)))


def test_unbatched(rng):
    m = mha(rope=True)
    d = check_module(m, (x64(rng, 5, E),), rng, is_causal=True)
    assert d[0].shape == (5, E)


def test_cross_attention_kdim_vdim(rng):
    m = mha(kdim=5, vdim=3, num_heads=4, num_kv_heads=2, qk_norm=True)
    q, k, v = x64(rng, 2, 4, E), x64(rng, 2, 7, 5), x64(rng, 2, 7, 3)
    pad = np.ones((2, 7), bool)
    pad[0, 5:] = False
    dq, dk, dv = check_module(m, (q, k, v), rng, key_padding_mask=pad)
    assert dk is not None and dv is not None


def test_cross_attention_packed_separate_inputs(rng):
    q, k, v = x64(rng, 2, 4, E), x64(rng, 2, 7, E), x64(rng, 2, 7, E)
    check_module(mha(rope=True), (q, k, v), rng, is_causal=True)


def test_cross_attention_shared_key_value(rng):
    q, kv = x64(rng, 2, 4, E), x64(rng, 2, 7, E)
    dq, dkv, dnone = check_module(mha(num_kv_heads=1), (q, kv), rng, n_grads=2)
    assert dnone is None                     # value is key: its gradient is in d_key
    # mha(q, kv, kv) is the same call: the same gradients.
    w = rng.standard_normal((2, 4, E))
    m = mha(num_kv_heads=1)
    m(q, kv, training=True)
    a = m.backward(w)
    m(q, kv, kv, training=True)
    b = m.backward(w)
    assert b[2] is None
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_key_is_query(rng):
    x, v = x64(rng, 2, 5, E), x64(rng, 2, 5, E)
    m = mha()
    m(x, x, v, training=True)
    w = rng.standard_normal((2, 5, E))
    dx, dnone, dv = m.backward(w)
    assert dnone is None
    # Equals the sum of the gradients for two distinct copies of x.
    m2 = mha()
    m2(x, x.copy(), v, training=True)
    a, b, c = m2.backward(w)
    np.testing.assert_allclose(dx, a + b, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dv, c, rtol=1e-12, atol=1e-12)


def test_attention_axes(rng):
    m = tileattn.MultiHeadAttention(E, 2, attention_axes=(1, 2), dtype=F64, seed=3)
    check_module(m, (x64(rng, 2, 3, 2, E),), rng)


# -- encoder ------------------------------------------------------------------------
def randomise(module, seed):
    r = np.random.default_rng(seed)
    with module.editing():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p[:] = 0.3 * r.standard_normal(p.shape)
            elif "norm" in name:
                p[:] = 1 + 0.3 * r.standard_normal(p.shape)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_encoder_layer(rng, norm_first, activation):
    m = tileattn.TransformerEncoderLayer(E, 2, 12, dropout=0.0, activation=activation,
                                         norm_first=norm_first, dtype=F64, seed=4)
    randomise(m, 1)
    check_module(m, (x64(rng, 2, 5, E),), rng, is_causal=True)


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layer_dropout_gqa_rope(rng, norm_first):
    m = tileattn.TransformerEncoderLayer(E, 4, 12, dropout=0.2, activation="silu",
                                         norm_first=norm_first, num_kv_heads=2, head_dim=2,
                                         rope=True, qk_norm=True, dtype=F64, seed=4)
    randomise(m, 2)
    pad = np.ones((2, 5), bool)
    pad[1, 3:] = False
    check_module(m, (x64(rng, 2, 5, E),), rng, key_padding_mask=pad)


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder(rng, norm_first):
    layer = tileattn.TransformerEncoderLayer(E, 2, 12, dropout=0.0, norm_first=norm_first,
                                             activation="gelu_tanh", dtype=F64, seed=4)
    randomise(layer, 3)
    norm = tileattn.LayerNorm(E, dtype=F64)
    norm.bias = np.full(E, 0.2)
    enc = tileattn.TransformerEncoder(layer, 2, norm=norm if norm_first else None)
    lin = enc.layers[1].linear1
    lin.weight = lin.weight * 1.5           # the copies start equal: make them differ
    check_module(enc, (x64(rng, 2, 5, E),), rng, is_causal=True)


def test_encoder_padding_trains_on_the_plain_path(rng):
    # Inference with a padding mask runs on the real tokens only (zeros at the
    # padding); training computes every position, as PyTorch in training mode.
    layer = tileattn.TransformerEncoderLayer(E, 2, 12, dropout=0.0, dtype=F64, seed=4)
    enc = tileattn.TransformerEncoder(layer, 2)
    x = x64(rng, 2, 5, E)
    pad = np.ones((2, 5), bool)
    pad[0, 3:] = False
    y_inf = enc(x, key_padding_mask=pad)
    y_tr = enc(x, key_padding_mask=pad, training=True)
    np.testing.assert_allclose(y_tr[pad], y_inf[pad], rtol=1e-12, atol=1e-12)
    assert np.all(y_inf[~pad] == 0) and np.all(y_tr[~pad] != 0)
    check_module(enc, (x,), rng, key_padding_mask=pad)


# -- float32 against float64 ----------------------------------------------------------
def test_float32_gradients_follow_float64(rng):
    layer64 = tileattn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, norm_first=True,
                                               dtype=F64, seed=4)
    randomise(layer64, 5)
    layer32 = tileattn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, norm_first=True, seed=4)
    layer32.load_state_dict(layer64.state_dict())
    x = x64(rng, 2, 9, 16)
    w = rng.standard_normal((2, 9, 16))
    layer64(x, is_causal=True, training=True)
    d64 = layer64.backward(w)
    layer32(x.astype(np.float32), is_causal=True, training=True)
    d32 = layer32.backward(w.astype(np.float32))
    assert d32.dtype == np.float32
    for got, want in [(d32, d64)] + [(layer32.grads[n], g) for n, g in layer64.grads.items()]:
        assert got.dtype == np.float32
        # float32 round-off: ~1e-6 of the terms summed, also in gradients that
        # are exactly zero (the key bias's).
        scale = float(np.max(np.abs(want)))
        assert float(np.max(np.abs(got - want))) <= 1e-4 * scale + 1e-5


# -- bookkeeping -----------------------------------------------------------------------
def test_training_forward_equals_inference_without_dropout(rng):
    x = rng.standard_normal((2, 7, 16)).astype(np.float32)
    for nf in (False, True):
        layer = tileattn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, norm_first=nf, seed=1)
        enc = tileattn.TransformerEncoder(layer, 2, norm=tileattn.LayerNorm(16))
        for m in (layer, enc, layer.self_attn):
            assert np.array_equal(m(x, is_causal=True, training=True), m(x, is_causal=True))


def test_accumulates_and_zero_grad(rng):
    m = mha(qk_norm=True)
    x = x64(rng, 2, 5, E)
    w = rng.standard_normal((2, 5, E))
    m(x, training=True)
    m.backward(w)
    once = {n: g.copy() for n, g in m.grads.items()}
    assert all(np.any(g != 0) for g in once.values())
    m(x, training=True)
    m.backward(w)
    for n, g in m.grads.items():
        np.testing.assert_allclose(g, 2 * once[n], rtol=1e-12, atol=1e-14)
    m.zero_grad()
    assert all(np.all(g == 0) for g in m.grads.values())
    assert m.grads.keys() == dict(m.named_parameters()).keys()


def test_grads_property_is_the_accumulator(rng):
    m = tileattn.Linear(3, 2, dtype=F64, rng=rng)
    g = m.grads["weight"]
    m(np.ones((4, 3)), training=True)
    m.backward(np.ones((4, 2)))
    assert np.all(g == 4.0)                   # the same array, updated in place


@pytest.mark.parametrize("make", [
    lambda: tileattn.Linear(E, E, dtype=F64),
    lambda: tileattn.LayerNorm(E, dtype=F64),
    lambda: tileattn.FeedForward(E, 12, dtype=F64),
    lambda: mha(),
    lambda: tileattn.TransformerEncoderLayer(E, 2, 12, dtype=F64),
    lambda: tileattn.TransformerEncoder(tileattn.TransformerEncoderLayer(E, 2, 12, dtype=F64), 2),
])
def test_backward_needs_a_training_forward(rng, make):
    m = make()
    x = x64(rng, 2, 3, E)
    w = np.ones((2, 3, E))
    with pytest.raises(tileattn.InvalidParameterError, match="training=True"):
        m.backward(w)
    m(x)                                      # inference keeps nothing
    assert all(mod._saved is None for _, mod in m.named_modules())
    with pytest.raises(tileattn.InvalidParameterError, match="training=True"):
        m.backward(w)
    m(x, training=True)
    with pytest.raises(tileattn.ShapeError, match="grad_output"):
        m.backward(np.ones((2, 4, E)))
    m(x, training=True)
    m.backward(w)
    with pytest.raises(tileattn.InvalidParameterError, match="once per training forward"):
        m.backward(w)                         # the saved state is released


def test_cached_forward_keeps_nothing(rng):
    m = tileattn.MultiHeadAttention(E, 2, dtype=F64)
    cache = tileattn.KVCache(1, 2, 8, 4, dtype=F64)
    m(x64(rng, 1, 2, E), training=True)
    m(x64(rng, 1, 2, E), is_causal=True, cache=cache, training=True)
    with pytest.raises(tileattn.InvalidParameterError):
        m.backward(np.ones((1, 2, E)))


def test_pickle_drops_saved_activations(rng):
    m = tileattn.TransformerEncoderLayer(E, 2, 12, dtype=F64)
    m(x64(rng, 2, 3, E), training=True)
    m2 = pickle.loads(pickle.dumps(m))
    assert all(mod._saved is None for _, mod in m2.named_modules())


def test_optimiser_from_a_module(rng):
    m = tileattn.Linear(3, 2, dtype=F64, rng=rng)
    before = m.weight.copy()
    opt = optim.SGD(m, lr=0.5)
    m(np.ones((1, 3)), training=True)
    m.backward(np.ones((1, 2)))
    opt.step()                                # reads m.grads
    np.testing.assert_allclose(m.weight, before - 0.5)
    opt.zero_grad()
    assert all(np.all(g == 0) for g in m.grads.values())
    with pytest.raises(tileattn.InvalidParameterError, match="grads"):
        optim.SGD(m.named_parameters(), lr=0.5).step()


def test_fit_a_linear_layer_with_adamw(rng):
    m = tileattn.Linear(4, 1, dtype=F64, rng=rng)
    x = rng.standard_normal((64, 4))
    target = x @ np.array([[1.0], [-2.0], [0.5], [3.0]]) + 0.7
    opt = optim.AdamW(m, lr=0.05, weight_decay=0.0)
    first = None
    for _ in range(300):
        y = m(x, training=True)
        loss = float(np.mean((y - target) ** 2))
        first = loss if first is None else first
        opt.zero_grad()
        m.backward(2 * (y - target) / y.size)
        opt.step()
    assert loss < 1e-4 * first
