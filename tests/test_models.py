"""tileattn.models: SlidingWindowModel and HybridLSTMAttention (Edifice's
sliding-window and hybrid models): shapes, what they compute (against float64
compositions of independently tested parts), determinism, dropout, state-dict
round trips."""

import pickle

import numpy as np
import pytest

import tileattn
from tileattn.models import HybridLSTMAttention, SlidingWindowModel

EMB = 12


def frames(rng, *shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def small_sliding(**kw):
    opts = dict(window_size=4, num_heads=2, head_dim=8, num_layers=2, ffn_dim=24, seed=0)
    opts.update(kw)
    return SlidingWindowModel(EMB, **opts)


def small_hybrid(**kw):
    opts = dict(lstm_hidden=20, num_heads=2, head_dim=8, seed=0)
    opts.update(kw)
    return HybridLSTMAttention(EMB, **opts)


def test_defaults_follow_edifice():
    m = SlidingWindowModel(EMB)
    assert (m.window_size, m.num_heads, m.head_dim, m.num_layers, m.ffn_dim, m.dropout) == \
        (60, 4, 64, 2, 256, 0.1)
    assert m.output_size == 256
    h = HybridLSTMAttention(EMB)
    assert (h.lstm_hidden, h.lstm_layers, h.num_heads, h.head_dim, h.dropout, h.mlp_sizes) == \
        (256, 1, 4, 64, 0.1, None)
    assert h.output_size == 256


@pytest.mark.parametrize("make, width", [(small_sliding, 16), (small_hybrid, 20),
                                         (lambda: small_hybrid(mlp=[32, 6]), 6),
                                         (lambda: small_sliding(hidden_size=12), 12)])
def test_output_shapes(rng, make, width):
    m = make()
    x = frames(rng, 3, 9, EMB)
    assert m(x).shape == (3, width)
    assert m(x[0]).shape == (width,)
    assert m(x, return_sequence=True).shape == (3, 9, width)
    for dt in (np.float16, np.float64):
        assert m(x.astype(dt)).dtype == dt


@pytest.mark.parametrize("make", [small_sliding, small_hybrid])
def test_last_position_is_the_sequence_end_and_batch_independent(rng, make):
    m = make()
    x = frames(rng, 3, 9, EMB)
    out = m(x)
    np.testing.assert_array_equal(out, m(x, return_sequence=True)[:, -1])
    # The attention is bitwise batch-independent; BLAS GEMMs of other row
    # counts (the LSTM's per-step (B, H) x (H, 4H)) may round differently.
    np.testing.assert_allclose(out[1], m(x[1]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("make", [small_sliding, small_hybrid])
def test_deterministic_for_a_seed(rng, make):
    x = frames(rng, 2, 7, EMB)
    a, b = make(), make()
    np.testing.assert_array_equal(a(x), b(x))
    np.testing.assert_array_equal(a(x), a(x))
    assert not np.array_equal(a(x), make(seed=1)(x))


@pytest.mark.parametrize("make", [small_sliding, small_hybrid])
def test_dropout_only_in_training_and_reproducible(rng, make):
    x = frames(rng, 2, 7, EMB)
    a, b = make(dropout=0.3), make(dropout=0.3)
    first = a(x, training=True)
    np.testing.assert_array_equal(first, b(x, training=True))
    assert not np.array_equal(first, a(x))
    assert not np.array_equal(first, a(x, training=True))   # the stream moves on


@pytest.mark.parametrize("make", [small_sliding, lambda **kw: small_hybrid(mlp=[16, 5], lstm_layers=2, **kw)])
def test_state_dict_round_trip(rng, tmp_path, make):
    m = make()
    x = frames(rng, 2, 10, EMB)
    fresh = make(seed=123)
    assert not np.array_equal(fresh(x), m(x))
    fresh.load_state_dict(m.state_dict())
    np.testing.assert_array_equal(fresh(x), m(x))
    tileattn.save(m, tmp_path / "m.npz")
    back = tileattn.load(tmp_path / "m.npz")
    assert type(back) is type(m) and back.get_config() == m.get_config()
    np.testing.assert_array_equal(back(x), m(x))
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(m))(x), m(x))


def test_sliding_window_names_and_window_reach():
    m = small_sliding()
    names = set(m.state_dict())
    assert {"input_proj.weight", "encoder.layers.1.self_attn.q_proj.weight",
            "encoder.layers.0.linear1.weight", "encoder.norm.weight"} <= names
    layer = m.encoder.layers[0]
    assert layer.window == 4 and layer.norm_first and layer.activation == "gelu"


def test_sliding_window_computes_its_definition(rng):
    """Input projection + sinusoidal table -> the encoder (tested against
    PyTorch elsewhere) -> last position; and frames older than the receptive
    field (num_layers * (window - 1) + 1 frames) do not change the output."""
    m = small_sliding()
    x = frames(rng, 2, 11, EMB)
    h = m.input_proj(x) + tileattn.sinusoidal_positions(11, 16).astype(np.float32)
    np.testing.assert_allclose(m(x), m.encoder(h, window=4)[:, -1], rtol=0, atol=1e-6)
    first = 11 - (2 * 3 + 1)            # the oldest frame the last position can see
    y = x.copy()
    y[:, :first] = rng.standard_normal((2, first, EMB))
    np.testing.assert_allclose(m(y), m(x), rtol=0, atol=1e-6)
    y[:, first] += 1.0
    assert np.max(np.abs(m(y) - m(x))) > 1e-3


def ref_hybrid(m, x):
    """float64: LSTM (tested against torch) states -> dense causal attention
    from the last state -> residual, LayerNorm -> MLP head."""
    sd = {k: v.astype(np.float64) for k, v in m.state_dict().items()}
    m64 = type(m)(**dict(m.get_config(), dtype="float64"))
    m64.load_state_dict(sd)
    h, _ = m64.lstm(x.astype(np.float64))
    b, length, e = h.shape
    hd, nh = m.head_dim, m.num_heads

    def lin(name, a):
        return a @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]
    q = lin("attn.q_proj", h[:, -1:]).reshape(b, 1, nh, hd).transpose(0, 2, 1, 3)
    k = lin("attn.k_proj", h).reshape(b, length, nh, hd).transpose(0, 2, 1, 3)
    v = lin("attn.v_proj", h).reshape(b, length, nh, hd).transpose(0, 2, 1, 3)
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    a = lin("attn.out_proj", (w @ v).transpose(0, 2, 1, 3).reshape(b, 1, nh * hd))
    y = h[:, -1:] + a
    mu, var = y.mean(-1, keepdims=True), y.var(-1, keepdims=True)
    y = (y - mu) / np.sqrt(var + 1e-5) * sd["norm.weight"] + sd["norm.bias"]
    for i in range(len(m.mlp_sizes or [])):
        y = np.maximum(lin(f"mlp.layers.{i}", y), 0.0)
    return y[:, 0]


@pytest.mark.parametrize("mlp", [None, [16, 7]])
def test_hybrid_computes_its_definition(rng, mlp):
    m = small_hybrid(mlp=mlp, lstm_layers=2)
    x = frames(rng, 3, 8, EMB)
    want = ref_hybrid(m, x)
    np.testing.assert_allclose(m(x), want, rtol=0, atol=1e-5 * max(1.0, np.abs(want).max()))


def test_hybrid_lstm_names_are_torchs():
    m = small_hybrid(lstm_layers=2)
    names = list(m.state_dict())
    assert [n for n in names if n.startswith("lstm.")] == [
        f"lstm.{w}_l{k}" for k in range(2) for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]


def test_padding_mask_reaches_the_attention(rng):
    m = small_hybrid()
    x = frames(rng, 2, 8, EMB)
    pad = np.ones((2, 8), bool)
    pad[0, :3] = False                  # left padding: the last frame is real
    assert not np.array_equal(m(x, key_padding_mask=pad)[0], m(x)[0])
    np.testing.assert_array_equal(m(x, key_padding_mask=pad)[1], m(x)[1])


def test_sliding_window_left_padding(rng):
    m = small_sliding()
    x = frames(rng, 2, 9, EMB)
    pad = np.ones((2, 9), bool)
    pad[0, :4] = False
    got = m(x, key_padding_mask=pad)
    np.testing.assert_allclose(got[1], m(x)[1], rtol=0, atol=1e-6)
    assert not np.allclose(got[0], m(x)[0], atol=1e-3)
    # The padded frames' contents do not matter.
    y = x.copy()
    y[0, :4] = 100.0
    np.testing.assert_allclose(m(y, key_padding_mask=pad), got, rtol=0, atol=1e-6)


@pytest.mark.parametrize("make, kw, match", [
    (SlidingWindowModel, dict(window_size=0), "window_size"),
    (SlidingWindowModel, dict(hidden_size=10, num_heads=4), "hidden_size"),
    (SlidingWindowModel, dict(dropout=-0.1), "dropout"),
    (HybridLSTMAttention, dict(mlp=[8, 0]), "mlp"),
    (HybridLSTMAttention, dict(mlp="8"), "mlp"),
    (HybridLSTMAttention, dict(lstm_layers=0), "lstm_layers"),
    (HybridLSTMAttention, dict(mlp_activation="tanh"), "activation"),
])
def test_bad_options(make, kw, match):
    with pytest.raises(tileattn.InvalidParameterError, match=match):
        make(EMB, **kw)


@pytest.mark.parametrize("make", [small_sliding, small_hybrid])
def test_bad_inputs(make):
    m = make()
    with pytest.raises(tileattn.ShapeError, match=r"x: expected \(B, L, 12\)"):
        m(np.zeros((2, 3, EMB + 1), np.float32))
    with pytest.raises(tileattn.ShapeError, match="L >= 1"):
        m(np.zeros((2, 0, EMB), np.float32))
    with pytest.raises(tileattn.DTypeError, match="x"):
        m(np.zeros((2, 3, EMB), np.int8))
