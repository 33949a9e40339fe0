"""TransformerEncoderLayer / TransformerEncoder without PyTorch: the
activations against math.erfc / math.tanh, the options PyTorch's layer lacks
(GQA, RoPE, window) against a dense float64 reference layer, dropout,
save/load/pickle and the errors."""

import math
import pickle

import numpy as np
import pytest

import tileattn
from tileattn.activations import activation, activation_

import reference

E, H, F = 32, 4, 64


# -- activations ----------------------------------------------------------------
def gelu_exact(x):
    return np.array([v * 0.5 * math.erfc(-v / math.sqrt(2.0)) for v in x.astype(np.float64)])


POINTS = np.concatenate([np.linspace(-30, 30, 60001),
                         np.random.default_rng(0).standard_normal(20000) * 3])


@pytest.mark.parametrize("dtype, tol", [(np.float32, 2.5e-7), (np.float64, 5e-16)])
def test_gelu_is_exact_to_round_off(each_isa, dtype, tol):
    x = POINTS.astype(dtype)
    got = activation("gelu", x)
    assert got.dtype == dtype
    want = gelu_exact(x)
    err = np.abs(got - want) / np.maximum(1.0, np.abs(x.astype(np.float64)))
    assert err.max() <= tol, (err.max(), x[np.argmax(err)])


@pytest.mark.parametrize("name", ["gelu", "gelu_tanh", "silu"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_huge_inputs_without_warnings(each_isa, dtype, name):
    x = np.array([1e30, -1e30, 1e5, -1e5, 3e38 if dtype == np.float32 else 1e300, np.inf],
                 dtype=dtype)
    y = activation(name, x)            # filterwarnings=error: an overflow warning fails
    np.testing.assert_array_equal(y[[0, 2, 4, 5]], x[[0, 2, 4, 5]])
    np.testing.assert_array_equal(y[[1, 3]], 0.0)


def test_gelu_float64_keeps_relative_precision_in_the_tails():
    x = np.linspace(-36, -1, 3501)
    want = gelu_exact(x)
    rel = np.abs(activation("gelu", x) - want) / np.abs(want)
    # The tail's condition number is ~1 + x^2 (d log gelu / d log x): that
    # many ulps is the round-off of the input itself.
    assert np.max(rel / (1.0 + x * x)) <= 4 * np.finfo(np.float64).eps


@pytest.mark.parametrize("dtype, tol", [(np.float32, 2.5e-7), (np.float64, 5e-16)])
@pytest.mark.parametrize("name", ["relu", "gelu_tanh", "silu"])
def test_other_activations(each_isa, name, dtype, tol):
    x = POINTS.astype(dtype)
    v = x.astype(np.float64)
    want = {"relu": np.maximum(v, 0.0),
            "gelu_tanh": 0.5 * v * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3))),
            "silu": v / (1.0 + np.exp(-np.clip(v, -700, 700)))}[name]
    err = np.abs(activation(name, x) - want) / np.maximum(1.0, np.abs(v))
    assert err.max() <= tol


def test_activation_is_threaded_bitwise_the_same(restore_threads):
    x = np.random.default_rng(1).standard_normal((300, 1000)).astype(np.float32)
    tileattn.set_num_threads(1)
    one = activation("gelu", x)
    tileattn.set_num_threads(2)
    assert np.array_equal(activation("gelu", x), one)


@pytest.mark.parametrize("shape", [(), (0,), (0, 7), (5,), (3, 40000), (2, 3, 7)])
def test_activation_in_place_shapes_and_bias(shape):
    rng = np.random.default_rng(2)
    x = rng.standard_normal(shape).astype(np.float32)
    want = gelu_exact(x.reshape(-1)).reshape(shape)
    y = x.copy()
    assert activation_("gelu", y) is y
    np.testing.assert_allclose(y, want, rtol=0, atol=5e-7 * max(1.0, np.abs(x).max(initial=0)))
    if len(shape) >= 1 and shape[-1] > 0:
        bias = rng.standard_normal(shape[-1]).astype(np.float32)
        y = x.copy()
        activation_("gelu", y, bias)
        want = gelu_exact((x + bias).reshape(-1)).reshape(shape)
        np.testing.assert_allclose(y, want, rtol=0,
                                   atol=5e-7 * max(1.0, np.abs(x + bias).max(initial=0)))


def test_activation_errors():
    with pytest.raises(tileattn.InvalidParameterError, match="C-contiguous"):
        activation_("relu", np.zeros((4, 4), np.float32).T)
    with pytest.raises(tileattn.DTypeError, match="float32 or float64"):
        activation_("relu", np.zeros(4, np.float16))
    with pytest.raises(tileattn.InvalidParameterError, match="bias"):
        activation_("relu", np.zeros((2, 4), np.float32), np.zeros(3, np.float32))
    with pytest.raises(tileattn.InvalidParameterError, match="activation"):
        activation_("elu", np.zeros(4, np.float32))


def test_activation_from_many_threads_and_after_fork(restore_threads):
    import os
    import threading
    tileattn.set_num_threads(2)
    x = np.random.default_rng(3).standard_normal((50, 20000)).astype(np.float32)
    want = activation("gelu", x)
    same = []

    def work():
        for _ in range(3):
            same.append(np.array_equal(activation("gelu", x), want))
    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert same == [True] * 12
    if not hasattr(os, "fork"):
        return
    import warnings
    with warnings.catch_warnings():     # 3.12+ warns about fork() with threads alive
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:        # the child's pool must be its own (the parent's threads are gone)
        os._exit(0 if np.array_equal(activation("gelu", x), want) else 1)
    assert os.waitpid(pid, 0)[1] == 0


# -- a dense float64 reference layer ----------------------------------------------
def ref_layernorm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def ref_rope(x, theta=10000.0):
    """x (B, H, L, D): rotate pairs (i, i + D/2) by position * theta^(-2i/D)."""
    d = x.shape[-1]
    pos = np.arange(x.shape[-2])[:, None]
    ang = pos * theta ** (-np.arange(d // 2) * 2.0 / d)
    c, s = np.cos(ang), np.sin(ang)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def ref_layer(sd, x, *, nhead, nkv, norm_first, rope=False, eps=1e-5, **attn):
    sd = {k: v.astype(np.float64) for k, v in sd.items()}
    x = x.astype(np.float64)
    b, l, e = x.shape
    d = sd["self_attn.q_proj.weight"].shape[0] // nhead

    def lin(name, a):
        return a @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]

    def sa(a):
        q = lin("self_attn.q_proj", a).reshape(b, l, nhead, d).transpose(0, 2, 1, 3)
        k = lin("self_attn.k_proj", a).reshape(b, l, nkv, d).transpose(0, 2, 1, 3)
        v = lin("self_attn.v_proj", a).reshape(b, l, nkv, d).transpose(0, 2, 1, 3)
        if rope:
            q, k = ref_rope(q), ref_rope(k)
        o, _ = reference.attention(q, k, v, **attn)
        return lin("self_attn.out_proj", o.transpose(0, 2, 1, 3).reshape(b, l, nhead * d))

    def ff(a):
        h = lin("linear1", a)
        return lin("linear2", h * 0.5 * np.vectorize(math.erfc)(-h / math.sqrt(2.0)))

    def norm(i, a):
        return ref_layernorm(a, sd[f"norm{i}.weight"], sd[f"norm{i}.bias"], eps)

    if norm_first:
        x = x + sa(norm(1, x))
        return x + ff(norm(2, x))
    x = norm(1, x + sa(x))
    return norm(2, x + ff(x))


def randomised(m, seed=3):
    rng = np.random.default_rng(seed)
    sd = {k: v + rng.uniform(-0.3, 0.3, v.shape) for k, v in m.state_dict().items()}
    m.load_state_dict(sd)
    return m


def close(got, want, tol=1e-5):
    scale = max(float(np.max(np.abs(want))), 1.0)
    err = float(np.max(np.abs(got.astype(np.float64) - want)))
    assert err <= tol * scale, f"max error {err:.3g} > {tol:g} x {scale:.3g}"


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("opts", [
    dict(num_kv_heads=2), dict(num_kv_heads=1, rope=True), dict(rope=True),
    dict(window=5), dict(window=(3, 2)), dict(num_kv_heads=2, window=4, rope=True)])
def test_layer_options_match_reference(rng, norm_first, opts):
    m = randomised(tileattn.TransformerEncoderLayer(
        E, H, F, dropout=0.0, activation="gelu", norm_first=norm_first, seed=1, **opts))
    x = rng.standard_normal((2, 19, E)).astype(np.float32)
    window = opts.get("window")
    want = ref_layer(m.state_dict(), x, nhead=H, nkv=opts.get("num_kv_heads", H),
                     norm_first=norm_first, rope=opts.get("rope", False), window=window)
    close(m(x), want)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("opts, call", [
    (dict(), dict()), (dict(num_kv_heads=2), dict(is_causal=True)),
    (dict(window=(3, 2)), dict()), (dict(), dict(window=4)),
    (dict(rope=True, num_kv_heads=1), dict(is_causal=True)), (dict(qk_norm=True), dict()),
    (dict(rope=True, qk_norm=True), dict())])
def test_real_token_path_equals_the_padded_path(rng, norm_first, opts, call):
    """A bool (B, L) key padding mask runs the layers on the real tokens only;
    the same mask as 0/1 ints takes the padded path. Real rows agree, padded
    rows are zeros on the first."""
    layer = randomised(tileattn.TransformerEncoderLayer(
        E, H, F, dropout=0.0, activation="gelu", norm_first=norm_first, seed=6, **opts))
    enc = tileattn.TransformerEncoder(layer, 2, norm=tileattn.LayerNorm(E))
    x = rng.standard_normal((3, 17, E)).astype(np.float32)
    pad = np.zeros((3, 17), bool)
    pad[0, :17] = pad[1, :5] = True            # item 2 has no real token at all
    pad[2, [3, 9]] = True                      # and a non-prefix mask
    for m in (layer, enc):
        fast = m(x, key_padding_mask=pad, **call)
        slow = m(x, key_padding_mask=pad.astype(np.int8), **call)
        close(fast[pad], slow[pad].astype(np.float64))    # float32 round-off apart
        assert np.all(fast[~pad] == 0)
        assert not np.all(slow[~pad] == 0)
    if not norm_first and not opts and not call:   # and against the float64 reference
        want = ref_layer(layer.state_dict(), x, nhead=H, nkv=H, norm_first=False,
                         key_padding_mask=pad)
        close(layer(x, key_padding_mask=pad)[pad], want[pad])


def test_call_window_overrides_and_masks(rng):
    m = randomised(tileattn.TransformerEncoderLayer(E, H, F, dropout=0.0, activation="gelu",
                                                    window=3, seed=2))
    x = rng.standard_normal((2, 15, E)).astype(np.float32)
    pad = np.ones((2, 15), bool)
    pad[1, 9:] = False
    bias = rng.standard_normal((1, 1, 15, 15)).astype(np.float32)
    want = ref_layer(m.state_dict(), x, nhead=H, nkv=H, norm_first=False, window=(2, 2),
                     key_padding_mask=pad, attn_mask=bias)
    got = m(x, window=(2, 2), key_padding_mask=pad, attn_mask=bias)
    close(got[pad], want[pad])


def test_float64_layer_to_round_off(rng):
    m = randomised(tileattn.TransformerEncoderLayer(E, H, F, dropout=0.0, activation="gelu",
                                                    dtype=np.float64, seed=4))
    x = rng.standard_normal((2, 11, E))
    close(m(x, is_causal=True), ref_layer(m.state_dict(), x, nhead=H, nkv=H, norm_first=False,
                                          is_causal=True), tol=1e-12)


def test_dtypes_in_and_out(rng):
    m = tileattn.TransformerEncoderLayer(E, H, F, seed=0)
    x = rng.standard_normal((2, 7, E))
    for dt in (np.float16, np.float32, np.float64):
        assert m(x.astype(dt)).dtype == dt


# -- dropout ------------------------------------------------------------------------
def test_dropout_only_in_training_and_reproducible(rng):
    def make():
        return tileattn.TransformerEncoderLayer(E, H, F, dropout=0.3, seed=11)
    x = rng.standard_normal((2, 9, E)).astype(np.float32)
    a, b = make(), make()
    assert np.array_equal(a(x), a(x))           # eval: deterministic, no dropout
    ta1, ta2 = a(x, training=True), a(x, training=True)
    tb1 = b(x, training=True)
    assert np.array_equal(ta1, tb1)             # same seed, same masks
    assert not np.array_equal(ta1, ta2)         # the stream moves on
    assert not np.allclose(ta1, a(x), atol=1e-3)
    c = tileattn.TransformerEncoderLayer(E, H, F, dropout=0.3, seed=12)
    c.load_state_dict(a.state_dict())
    assert not np.array_equal(c(x, training=True), tileattn.TransformerEncoderLayer(
        E, H, F, dropout=0.3, seed=11)(x, training=True))


def test_encoder_layers_draw_different_dropout_masks(rng):
    layer = tileattn.TransformerEncoderLayer(E, H, F, dropout=0.5, seed=5)
    enc = tileattn.TransformerEncoder(layer, 2)
    x = rng.standard_normal((1, 64, E)).astype(np.float32)
    l0, l1 = enc.layers[0], enc.layers[1]
    assert not np.array_equal(l0(x, training=True), l1(x, training=True))
    assert np.array_equal(l0(x), l1(x))          # same weights (copies of the template)


# -- modules ------------------------------------------------------------------------
def test_encoder_copies_the_layer_and_applies_the_norm(rng):
    layer = randomised(tileattn.TransformerEncoderLayer(E, H, F, dropout=0.0, activation="gelu",
                                                        seed=8))
    norm = tileattn.LayerNorm(E)
    norm.weight = rng.uniform(0.5, 1.5, E)
    enc = tileattn.TransformerEncoder(layer, 2, norm=norm)
    x = rng.standard_normal((2, 10, E)).astype(np.float32)
    want = ref_layer(layer.state_dict(), ref_layer(layer.state_dict(), x, nhead=H, nkv=H,
                                                   norm_first=False), nhead=H, nkv=H,
                     norm_first=False)
    want = ref_layernorm(want, norm.weight, norm.bias, 1e-5)
    close(enc(x), want)
    layer.linear1.weight = np.zeros_like(layer.linear1.weight)   # copies are independent
    close(enc(x), want)


@pytest.mark.parametrize("ext", [".npz", ".safetensors"])
def test_save_load_round_trip(tmp_path, rng, ext):
    if ext == ".safetensors":
        pytest.importorskip("safetensors")
    layer = randomised(tileattn.TransformerEncoderLayer(
        E, H, F, activation="silu", norm_first=True, num_kv_heads=2, rope=True, window=(4, 1),
        dtype=np.float64, seed=3))
    enc = tileattn.TransformerEncoder(layer, 3, norm=tileattn.LayerNorm(E, dtype=np.float64))
    enc = randomised(enc, 9)
    x = rng.standard_normal((2, 12, E))
    for m in (layer, enc):
        tileattn.save(m, tmp_path / f"m{ext}")
        back = tileattn.load(tmp_path / f"m{ext}")
        assert type(back) is type(m)
        assert back.get_config() == m.get_config()
        assert np.array_equal(back(x), m(x))
        again = pickle.loads(pickle.dumps(m))
        assert np.array_equal(again(x), m(x))


def test_feed_forward(rng):
    ff = randomised(tileattn.FeedForward(E, F, activation="gelu", seed=0))
    x = rng.standard_normal((3, 5, E)).astype(np.float32)
    sd = {k: v.astype(np.float64) for k, v in ff.state_dict().items()}
    h = x.astype(np.float64) @ sd["linear1.weight"].T + sd["linear1.bias"]
    want = (h * 0.5 * np.vectorize(math.erfc)(-h / math.sqrt(2.0))) @ sd["linear2.weight"].T \
        + sd["linear2.bias"]
    close(ff(x), want)
    assert ff(x[0, 0]).shape == (E,)


# -- errors -------------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    (dict(activation="tanh"), "activation"),
    (dict(dropout=1.0), "dropout"),
    (dict(norm_first=1), "norm_first"),
    (dict(dim_feedforward=0), "dim_feedforward"),
    (dict(window=0), "window"),
    (dict(num_kv_heads=3), "num_kv_heads"),
    (dict(seed=-1), "seed"),
])
def test_bad_options(kw, match):
    with pytest.raises(tileattn.InvalidParameterError, match=match):
        tileattn.TransformerEncoderLayer(E, H, **kw)


def test_bad_inputs():
    m = tileattn.TransformerEncoderLayer(E, H, F)
    with pytest.raises(tileattn.ShapeError, match=r"src: expected \(B, L, 32\)"):
        m(np.zeros((2, 3, E + 1), np.float32))
    with pytest.raises(tileattn.ShapeError, match="src"):
        m(np.zeros((E,), np.float32))
    with pytest.raises(tileattn.DTypeError, match="src"):
        m(np.zeros((2, 3, E), np.int32))
    with pytest.raises(tileattn.InvalidParameterError, match="training"):
        m(np.zeros((2, 3, E), np.float32), training=None)
    with pytest.raises(tileattn.InvalidParameterError, match="layer"):
        tileattn.TransformerEncoder(tileattn.LayerNorm(E), 2)
    with pytest.raises(tileattn.InvalidParameterError, match="num_layers"):
        tileattn.TransformerEncoder(m, 0)
    with pytest.raises(tileattn.ShapeError, match="norm"):
        tileattn.TransformerEncoder(m, 2, norm=tileattn.LayerNorm(E + 1))
