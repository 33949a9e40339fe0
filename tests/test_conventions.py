"""The conventions of the libraries tileattn's users come from (Keras 3,
PyTorch, Kaun, Edifice, R's ag_multihead_attention, deepbox), each against
the real library on the same inputs and weights, the float64 reference or
the other library's formula written out here."""

import os
import pickle

import numpy as np
import pytest

import tileattn
from conftest import close
from reference import attention
from tileattn import DTypeError, InvalidParameterError, ShapeError

sdpa = tileattn.scaled_dot_product_attention


@pytest.fixture(scope="module")
def keras():
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":
        pytest.skip("these comparisons run Keras on its torch backend")
    return keras


def keras_mha(keras, rng, x, heads, key_dim):
    """A built Keras MultiHeadAttention with random biases (Keras starts them
    at zero, which would hide bias bugs) and its weights as NumPy arrays."""
    layer = keras.layers.MultiHeadAttention(num_heads=heads, key_dim=key_dim)
    layer(x, x)
    weights = [rng.uniform(-0.5, 0.5, v.shape).astype(np.float32) for v in layer.weights]
    layer.set_weights(weights)
    return layer, weights


def run_keras(layer, x, mask):
    return layer(x, x, attention_mask=mask).detach().numpy()


# -- 3-D attn_mask: three readings, refused -----------------------------------

def test_keras_mask_with_batch_equal_heads_is_refused_and_its_4d_spelling_matches_keras(keras, rng):
    """B == heads: NumPy broadcasting read Keras' (B, T, S) mask as (heads, T, S)
    and silently gave another function; now the 3-D mask is refused, and the
    fix the message names gives Keras' result."""
    b = heads = 2
    x = rng.standard_normal((b, 7, 16)).astype(np.float32)
    mask = rng.random((b, 7, 7)) < 0.6
    mask[..., 0] = True
    layer, weights = keras_mha(keras, rng, x, heads, 8)
    want = run_keras(layer, x, mask)
    m = tileattn.MultiHeadAttention(16, heads, head_dim=8)
    tileattn.load_keras_weights(m, weights)
    with pytest.raises(ShapeError) as err:
        m(x, attn_mask=mask)
    msg = str(err.value)
    for reading in ("attn_mask", "(heads, Lq, Lk)", "(B, Lq, Lk)", "(B*heads, Lq, Lk)",
                    "mask[:, None]", "mask.reshape(2, 2, 7, 7)"):
        assert reading in msg, (reading, msg)
    close(m(x, attn_mask=mask[:, None]), want, np.float32)
    # What the 3-D mask used to mean (per head) is another function:
    assert np.abs(m(x, attn_mask=mask[None]) - want).max() > 1e-2


def test_pytorch_3d_mask_reshaped_as_the_message_says_matches_torch(rng):
    torch = pytest.importorskip("torch")
    b, heads, lq, e = 3, 2, 6, 16
    torch.manual_seed(0)
    tm = torch.nn.MultiheadAttention(e, heads, batch_first=True).eval()
    m = tileattn.MultiHeadAttention(e, heads)
    m.load_state_dict(tm.state_dict())
    x = rng.standard_normal((b, lq, e)).astype(np.float32)
    ignore = rng.random((b * heads, lq, lq)) < 0.4
    ignore[..., 0] = False
    with torch.inference_mode():
        want = tm(*(torch.from_numpy(x),) * 3, attn_mask=torch.from_numpy(ignore),
                  need_weights=False)[0].numpy()
    with pytest.raises(ShapeError, match=r"attn_mask: a 3-D mask \(6, 6, 6\) is ambiguous"):
        m(x, attn_mask=~ignore)
    close(m(x, attn_mask=~ignore.reshape(b, heads, lq, lq)), want, np.float32)


def test_unbatched_3d_mask_stays_per_head(rng):
    """Unbatched, a 3-D mask is (Hq, Lq, Lk), as PyTorch reads it: kept."""
    m = tileattn.MultiHeadAttention(8, 2, dtype=np.float64, seed=0)
    x = rng.standard_normal((5, 8))
    mask = rng.random((2, 5, 5)) < 0.6
    mask[..., 0] = True
    y = m(x, attn_mask=mask)
    y_batched = m(x[None], attn_mask=mask[None])[0]
    np.testing.assert_allclose(y, y_batched, rtol=0, atol=1e-14)


def test_refused_3d_mask_computes_and_keeps_nothing(rng):
    m = tileattn.MultiHeadAttention(8, 2, seed=0)
    x = rng.standard_normal((2, 5, 8)).astype(np.float32)
    before = {k: v.copy() for k, v in m.state_dict().items()}
    with pytest.raises(ShapeError):
        m(x, attn_mask=np.ones((2, 5, 5), bool), training=True)
    with pytest.raises(InvalidParameterError, match="nothing to differentiate"):
        m.backward(np.ones((2, 5, 8), np.float32))
    assert all(np.array_equal(before[k], v) for k, v in m.state_dict().items())


# -- integer masks: nonzero = may attend / real token -------------------------

def test_integer_attn_mask_is_nonzero_may_attend(rng):
    q, k, v = (rng.standard_normal((2, 3, 9, 8)) for _ in range(3))
    ints = rng.integers(-2, 3, (2, 1, 9, 9)).astype(np.int32)
    ints[..., 0] = 5
    want, _ = attention(q, k, v, attn_mask=ints != 0)
    got = sdpa(q, k, v, attn_mask=ints)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-13)
    np.testing.assert_array_equal(got, sdpa(q, k, v, attn_mask=ints != 0))


def test_keras_int_attention_mask_matches_keras(keras, rng):
    """Keras masks are often 0/1 integers (1 = attend); tileattn refused them."""
    x = rng.standard_normal((3, 8, 12)).astype(np.float32)
    mask = (rng.random((3, 8, 8)) < 0.6).astype(np.int32)
    mask[..., 0] = 1
    layer, weights = keras_mha(keras, rng, x, 3, 4)
    want = run_keras(layer, x, mask)
    m = tileattn.MultiHeadAttention(12, 3, head_dim=4)
    tileattn.load_keras_weights(m, weights)
    close(m(x, attn_mask=mask[:, None]), want, np.float32)


def test_kaun_nonzero_keeps_padding_mask(rng):
    """Kaun: an int32 (B, Lk) mask, nonzero keeps the position (any nonzero)."""
    m = tileattn.MultiHeadAttention(16, 4, dtype=np.float64, seed=3)
    q, kv = rng.standard_normal((2, 5, 16)), rng.standard_normal((2, 9, 16))
    kaun = np.array([[3, 1, 0, 7, 0, -1, 2, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0, 0]], np.int32)
    want = m(q, kv, key_padding_mask=kaun != 0)
    np.testing.assert_array_equal(m(q, kv, key_padding_mask=kaun), want)
    assert np.abs(want - m(q, kv, key_padding_mask=kaun == 1)).max() > 1e-3
    # the functional API too, against the reference
    qh, kh, vh = (rng.standard_normal((2, 2, 9, 4)) for _ in range(3))
    ref, _ = attention(qh, kh, vh, key_padding_mask=kaun != 0)
    np.testing.assert_allclose(sdpa(qh, kh, vh, key_padding_mask=kaun), ref, rtol=0, atol=1e-13)


def test_integer_padding_mask_with_a_cache(rng):
    m = tileattn.MultiHeadAttention(16, 2, seed=0)
    x = rng.standard_normal((2, 4, 16)).astype(np.float32)
    real = np.array([[2, 5, 1, 0], [1, 0, 0, 0]])
    c1, c2 = tileattn.KVCache(2, 2, 8, 8), tileattn.KVCache(2, 2, 8, 8)
    np.testing.assert_array_equal(m(x, cache=c1, key_padding_mask=real),
                                  m(x, cache=c2, key_padding_mask=real != 0))
    np.testing.assert_array_equal(c1.lengths, [3, 1])


def test_float_padding_mask_still_refused(rng):
    q = rng.standard_normal((2, 2, 4, 4)).astype(np.float32)
    with pytest.raises(DTypeError, match=r"key_padding_mask: expected bool or integers "
                                         r"\(True / nonzero = real token\), got float32"):
        sdpa(q, q, q, key_padding_mask=np.ones((2, 4), np.float32))


# -- Keras weights must fit the module's heads and dims ------------------------

def test_keras_weights_with_other_heads_are_refused(keras, rng):
    """2 heads of 8 flatten to the matrices of 4 heads of 4: they loaded and
    computed another function. Now a typed error names the array and shapes."""
    x = rng.standard_normal((2, 6, 16)).astype(np.float32)
    layer, weights = keras_mha(keras, rng, x, 2, 8)
    m = tileattn.MultiHeadAttention(16, 4, seed=0)          # head_dim 4
    before = m.state_dict()
    for load in (lambda: tileattn.load_keras_weights(m, weights),
                 lambda: m.load_state_dict(tileattn.keras_state_dict(weights))):
        with pytest.raises(ShapeError) as err:
            load()
        msg = str(err.value)
        assert "query/kernel (q_proj.weight) has shape (16, 2, 8), the module expects " \
               "(16, 4, 4)" in msg, msg
        assert "attention_output/kernel (out_proj.weight) has shape (2, 8, 16)" in msg, msg
        assert "num_heads=4" in msg and "head_dim=4" in msg
        assert all(np.array_equal(before[k], v) for k, v in m.state_dict().items())
    # The module that fits gives Keras' result; the misfit would not have.
    fits = tileattn.MultiHeadAttention(16, 2, head_dim=8)
    tileattn.load_keras_weights(fits, weights)
    close(fits(x), run_keras(layer, x, None), np.float32)
    m.load_state_dict(dict(tileattn.keras_state_dict(weights)))   # a plain dict: shapes only
    assert np.abs(m(x) - run_keras(layer, x, None)).max() > 1e-2


def test_keras_weights_with_other_value_dim_or_kv_heads_are_refused(rng):
    w = [rng.standard_normal(s) for s in ((8, 2, 4), (2, 4), (8, 2, 4), (2, 4),
                                          (8, 2, 4), (2, 4), (2, 4, 8), (8,))]
    gqa = tileattn.MultiHeadAttention(8, 2, num_kv_heads=1, head_dim=4, value_dim=8)
    with pytest.raises(ShapeError, match=r"key/kernel \(k_proj.weight\) has shape \(8, 2, 4\), "
                                         r"the module expects \(8, 1, 4\)"):
        tileattn.load_keras_weights(gqa, w)
    tileattn.load_keras_weights(tileattn.MultiHeadAttention(8, 2, head_dim=4), w)  # fits


# -- deepbox: train() / eval() ---------------------------------------------------

def dropout_mha(seed=0):
    return tileattn.MultiHeadAttention(16, 2, dropout=0.5, seed=seed)


def test_train_mode_is_the_default_of_training_and_an_explicit_argument_wins(rng):
    x = rng.standard_normal((2, 6, 16)).astype(np.float32)
    m = dropout_mha()
    assert m.training is False and m.projections.q_proj.training is False
    assert m.train() is m
    assert m.training and all(c.training for _, c in m.named_modules())
    # same dropout stream as an explicit training=True call on a twin
    np.testing.assert_array_equal(m(x), dropout_mha()(x, training=True))
    np.testing.assert_array_equal(m(x, training=False), dropout_mha()(x))
    m.backward(np.ones((2, 6, 16), np.float32))          # the train-mode call kept its state
    assert m.eval() is m and not any(c.training for _, c in m.named_modules())
    np.testing.assert_array_equal(m(x), dropout_mha()(x))
    twin = dropout_mha()
    twin(x, training=True)                               # one draw, as m's train-mode call
    twin(x)
    np.testing.assert_array_equal(m(x, training=True), twin(x, training=True))
    with pytest.raises(InvalidParameterError, match="mode: expected a bool"):
        m.train(1)


def test_train_mode_reaches_children_called_without_the_argument(rng):
    """A LayerNorm inside a model: its own mode decides when it is called
    alone; an explicit training=False on the parent keeps nothing anywhere."""
    enc = tileattn.TransformerEncoder(tileattn.TransformerEncoderLayer(16, 2, 32, dropout=0.3,
                                                                       seed=0), 2)
    x = rng.standard_normal((2, 5, 16)).astype(np.float32)
    want_train = tileattn.TransformerEncoder(
        tileattn.TransformerEncoderLayer(16, 2, 32, dropout=0.3, seed=0), 2)(x, training=True)
    enc.train()
    np.testing.assert_array_equal(enc(x), want_train)
    enc.backward(np.ones_like(x))
    enc(x, training=False)
    assert [n for n, c in enc.named_modules() if c.__dict__.get("_saved") is not None] == []
    norm = tileattn.LayerNorm(16).train()
    norm(x)
    assert norm.backward(np.ones_like(x)).shape == x.shape


def test_models_follow_the_mode(rng):
    frames = rng.standard_normal((2, 7, 12)).astype(np.float32)
    for make in (lambda: tileattn.models.SlidingWindowModel(12, 3, 2, 4, ffn_dim=8, dropout=0.4,
                                                            seed=1),
                 lambda: tileattn.models.HybridLSTMAttention(12, 8, 1, 2, 4, dropout=0.4,
                                                             mlp=[4], seed=1)):
        m = make().train()
        np.testing.assert_array_equal(m(frames), make()(frames, training=True))
        np.testing.assert_array_equal(m.eval()(frames), make()(frames))
        fresh = make().train()
        fresh(frames, training=False)
        kept = [n for n, c in fresh.named_modules() if c.__dict__.get("_saved") is not None]
        assert kept == []


def test_unfused_projections_keep_nothing_after_an_explicit_inference_call(rng):
    m = tileattn.MultiHeadAttention(16, 2, kdim=8, vdim=8, seed=0).train()
    x, kv = rng.standard_normal((2, 6, 16)), rng.standard_normal((2, 4, 8))
    m(x, kv, kv.copy(), training=False)
    assert [n for n, c in m.named_modules() if c.__dict__.get("_saved") is not None] == []


def test_mode_is_not_state_and_old_pickles_load(rng, tmp_path):
    x = rng.standard_normal((2, 6, 16)).astype(np.float32)
    m = dropout_mha().train()
    assert "training" not in " ".join(m.state_dict())
    tileattn.save(m, tmp_path / "m.npz")
    assert tileattn.load(tmp_path / "m.npz").training is False   # rebuilt from its config
    assert pickle.loads(pickle.dumps(m)).training is True        # a pickle keeps the object
    # A module pickled before the modes existed has no "training" entry.
    state = dropout_mha().__getstate__()
    for key in [k for k in state if k == "training"]:
        del state[key]
    old = tileattn.MultiHeadAttention.__new__(tileattn.MultiHeadAttention)
    old.__setstate__(state)
    assert old.training is False
    np.testing.assert_array_equal(old(x), dropout_mha()(x))
    np.testing.assert_array_equal(old.train()(x), dropout_mha()(x, training=True))


# -- Edifice: the models' last REAL position; causal/window masks; QK norm ----

def sliding(**kw):
    return tileattn.models.SlidingWindowModel(12, window_size=3, num_heads=2, head_dim=4,
                                              ffn_dim=8, seed=0, **kw)


def hybrid(**kw):
    return tileattn.models.HybridLSTMAttention(12, lstm_hidden=8, num_heads=2, head_dim=4,
                                               mlp=[5], seed=0, **kw)


@pytest.mark.parametrize("make", [sliding, hybrid])
def test_right_padded_sequences_give_what_they_give_alone(rng, make):
    """Position -1 of a right-padded row is padding: the models returned its
    state. Now each row's last real position: the sequence alone."""
    m = make()
    x = rng.standard_normal((3, 9, 12)).astype(np.float32)
    n = np.array([9, 5, 1])
    real = np.arange(9) < n[:, None]
    x[~real] = rng.standard_normal((int((~real).sum()), 12)) * 50   # padding: anything
    alone = np.stack([m(x[b, :n[b]]) for b in range(3)])
    got = m(x, key_padding_mask=real)
    close(got, alone.astype(np.float64), np.float32)
    np.testing.assert_array_equal(m(x, lengths=n), got)
    np.testing.assert_array_equal(m(x, key_padding_mask=real.astype(np.int8) * 3), got)
    # (GEMMs of other row counts may round differently: not bitwise)
    np.testing.assert_allclose(m(x[1], lengths=5), got[1], rtol=0, atol=1e-6)
    np.testing.assert_allclose(m(x[1], key_padding_mask=real[1]), got[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("make", [sliding, hybrid])
def test_left_padding_still_ends_at_the_last_position(rng, make):
    m = make()
    x = rng.standard_normal((2, 8, 12)).astype(np.float32)
    real = np.ones((2, 8), bool)
    real[0, :3] = False
    got = m(x, key_padding_mask=real)
    np.testing.assert_array_equal(got, m(x, key_padding_mask=real, return_sequence=True)[:, -1])
    np.testing.assert_allclose(got[1], m(x[1]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("make", [sliding, hybrid])
def test_model_padding_errors(rng, make):
    m = make()
    x = rng.standard_normal((2, 4, 12)).astype(np.float32)
    real = np.ones((2, 4), bool)
    with pytest.raises(InvalidParameterError, match="key_padding_mask, lengths: pass one"):
        m(x, key_padding_mask=real, lengths=[4, 4])
    real[1] = False
    with pytest.raises(InvalidParameterError, match="key_padding_mask: sequence 1 has no real"):
        m(x, key_padding_mask=real)
    with pytest.raises(InvalidParameterError, match=r"lengths: entry 1 is 0, expected 1 <= "):
        m(x, lengths=[4, 0])
    with pytest.raises(InvalidParameterError, match=r"lengths: entry 0 is 5"):
        m(x, lengths=[5, 1])
    with pytest.raises(ShapeError, match=r"lengths: expected shape \(B,\) = \(2,\)"):
        m(x, lengths=[4])
    with pytest.raises(DTypeError, match="lengths: expected integers"):
        m(x, lengths=[4.0, 2.0])
    with pytest.raises(DTypeError, match="key_padding_mask: expected bool or integers"):
        m(x, key_padding_mask=np.ones((2, 4), np.float32))


def edifice_window_mask(seq_len, window_size):
    """Edifice's window_mask, as its source writes it with Nx.iota."""
    rows = np.broadcast_to(np.arange(seq_len)[:, None], (seq_len, seq_len))
    cols = np.broadcast_to(np.arange(seq_len)[None, :], (seq_len, seq_len))
    return (rows >= cols) & (cols >= rows - (window_size - 1))


@pytest.mark.parametrize("n", [0, 1, 7, 130])
def test_causal_and_window_masks_are_edifices(rng, n):
    rows, cols = np.indices((n, n))
    assert tileattn.causal_mask(n).dtype == bool
    np.testing.assert_array_equal(tileattn.causal_mask(n), rows >= cols)
    for w in (1, 3, n + 5):
        got = tileattn.window_mask(n, w)
        assert got.dtype == bool and got.shape == (n, n)
        np.testing.assert_array_equal(got, edifice_window_mask(n, w))


def test_masks_as_attn_mask_equal_the_described_masks(rng):
    q, k, v = (rng.standard_normal((2, 2, 37, 8)) for _ in range(3))
    want, _ = attention(q, k, v, attn_mask=edifice_window_mask(37, 5))
    np.testing.assert_allclose(sdpa(q, k, v, attn_mask=tileattn.window_mask(37, 5)), want,
                               rtol=0, atol=1e-13)
    np.testing.assert_allclose(sdpa(q, k, v, window=5), want, rtol=0, atol=1e-13)
    np.testing.assert_allclose(sdpa(q, k, v, attn_mask=tileattn.causal_mask(37)),
                               sdpa(q, k, v, is_causal=True), rtol=0, atol=1e-13)


def test_mask_helper_errors():
    for bad in (-1, 2.0, True, "4"):
        with pytest.raises(InvalidParameterError, match="seq_len: expected a non-negative int"):
            tileattn.causal_mask(bad)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(InvalidParameterError, match="window_size: expected a positive int"):
            tileattn.window_mask(4, bad)
    with pytest.raises(MemoryError, match="mask"):
        tileattn.causal_mask(2**40)


def edifice_qk_layer_norm(x, eps=1e-6):
    """Edifice's qk_layer_norm in float64: Nx.mean and Nx.variance (population)
    over the last axis."""
    x = np.asarray(x, np.float64)
    mean = x.mean(axis=-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(variance + eps)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_qk_layer_norm_is_edifices(rng, dtype):
    # Rows of small spread, where eps (1e-6, not LayerNorm's 1e-5) shows; an
    # offset only in float64 (in float32 the mean's rounding over a 1e-3
    # spread is a 1e-4 error, a property of the arithmetic, not of the rule).
    offset = 2.0 if dtype == np.float64 else 0.0
    x = (rng.standard_normal((2, 3, 5, 16)) * np.array([1.0, 1e-3, 3e-3, 10.0, 0.0])[:, None]
         + offset).astype(dtype)
    before = x.copy()
    got = tileattn.qk_layer_norm(x)
    assert got.dtype == dtype and got.shape == x.shape
    np.testing.assert_array_equal(x, before)
    tol = {np.float16: 2e-3, np.float32: 1e-5, np.float64: 1e-12}[dtype]
    want = edifice_qk_layer_norm(x)
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * 4)
    assert np.abs(edifice_qk_layer_norm(x, 1e-5) - want).max() > 0.1   # eps matters here
    np.testing.assert_allclose(tileattn.qk_layer_norm(x, eps=1e-5),
                               edifice_qk_layer_norm(x, 1e-5), rtol=0, atol=tol * 4)


def test_qk_layer_norm_errors_and_empty():
    with pytest.raises(DTypeError, match="x: expected float16, bfloat16, float32 or float64"):
        tileattn.qk_layer_norm(np.ones((2, 4), np.int32))
    with pytest.raises(InvalidParameterError, match="eps"):
        tileattn.qk_layer_norm(np.ones((2, 4)), eps=0.0)
    with pytest.raises(ShapeError, match="x: expected at least one axis"):
        tileattn.qk_layer_norm(np.float64(1.0))
    assert tileattn.qk_layer_norm(np.ones((3, 0))).shape == (3, 0)
    assert tileattn.qk_layer_norm(np.ones((0, 4))).shape == (0, 4)


# -- R's ag_multihead_attention: output-only bias, [d_model, seq_len] data -----

def r_multihead_attention(sd, x, n_heads):
    """ag_multihead_attention's forward on [d_model, seq_len] data (columns
    are tokens), in float64: Q = W_q q, K = W_k k, V = W_v v (no biases),
    per head A_h = softmax(t(q_h) k_h / sqrt(d_k)) over the keys, each
    token's head output the A_h-weighted sum of v_h's columns, then
    out = W_o rbind(heads) + b_o. (The seed writes ``v_h %*% A_h``; with
    A_h[i, j] = query i's weight of key j, token i's output is v_h t(A_h)'s
    column i.)"""
    q, k, v = (sd[f"{n}_proj.weight"] @ x for n in ("q", "k", "v"))
    d_k = q.shape[0] // n_heads
    heads = []
    for h in range(n_heads):
        rows = slice(h * d_k, (h + 1) * d_k)
        s = q[rows].T @ k[rows] / np.sqrt(d_k)                       # [seq_len, seq_len]
        a = np.exp(s - s.max(axis=1, keepdims=True))
        a /= a.sum(axis=1, keepdims=True)
        heads.append(v[rows] @ a.T)                                   # [d_v, seq_len]
    return sd["out_proj.weight"] @ np.vstack(heads) + sd["out_proj.bias"][:, None]


def test_output_only_bias_and_r_layout_match_r(rng):
    d_model, n_heads, seq_len = 16, 4, 10
    mha = tileattn.MultiHeadAttention(d_model, n_heads, bias="output", seed=0)
    assert sorted(mha.state_dict()) == ["k_proj.weight", "out_proj.bias", "out_proj.weight",
                                        "q_proj.weight", "v_proj.weight"]
    mha.out_proj.bias = rng.uniform(-0.5, 0.5, d_model)              # zero at first
    x_r = rng.standard_normal((d_model, seq_len)).astype(np.float32)  # R's [d_model, seq_len]
    y_r = mha(x_r.T).T                                                # views, no copy
    assert y_r.shape == (d_model, seq_len)
    sd = {n: p.astype(np.float64) for n, p in mha.state_dict().items()}
    close(y_r, r_multihead_attention(sd, x_r.astype(np.float64), n_heads), np.float32)
    np.testing.assert_array_equal(y_r, mha(np.ascontiguousarray(x_r.T)).T)
    # Cross-attention R's way: mha$forward(q, kv, kv)
    kv_r = rng.standard_normal((d_model, 15)).astype(np.float32)
    np.testing.assert_array_equal(mha(x_r.T, kv_r.T).T,
                                  mha(np.ascontiguousarray(x_r.T), np.ascontiguousarray(kv_r.T)).T)


def test_output_only_bias_options_and_round_trips(rng, tmp_path):
    m = tileattn.MultiHeadAttention(8, 2, bias="output", qk_norm=True, seed=0)
    assert m.q_proj.bias is None and m.k_norm.bias is None and m.out_proj.bias is not None
    assert m.get_config()["bias"] == "output"
    for bias in (True, False):
        assert tileattn.MultiHeadAttention(8, 2, bias=bias).get_config()["bias"] is bias
    m.out_proj.bias = rng.standard_normal(8)
    tileattn.save(m, tmp_path / "m.npz")
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    np.testing.assert_array_equal(tileattn.load(tmp_path / "m.npz")(x), m(x))
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(m))(x), m(x))
    for bad in ("input", "yes", 1, None):
        with pytest.raises(InvalidParameterError, match=r"bias: expected True, False or 'output'"):
            tileattn.MultiHeadAttention(8, 2, bias=bad)


def test_output_only_bias_gradients(rng):
    """backward with bias="output": the output bias' gradient is the sum of
    dL/dy, the other gradients agree with finite differences."""
    m = tileattn.MultiHeadAttention(8, 2, bias="output", dtype=np.float64, seed=0)
    x = rng.standard_normal((2, 5, 8))
    g = rng.standard_normal((2, 5, 8))
    m(x, training=True)
    dx = m.backward(g)
    assert sorted(m.grads) == ["k_proj.weight", "out_proj.bias", "out_proj.weight",
                               "q_proj.weight", "v_proj.weight"]
    np.testing.assert_allclose(m.grads["out_proj.bias"], g.sum(axis=(0, 1)), rtol=1e-12)
    h = 1e-6
    for idx in [(0, 1, 2), (1, 4, 7)]:
        e = np.zeros_like(x)
        e[idx] = h
        fd = ((m(x + e) * g).sum() - (m(x - e) * g).sum()) / (2 * h)
        np.testing.assert_allclose(dx[idx], fd, rtol=1e-6, atol=1e-8)
    w = m.q_proj.weight
    old = w[1, 3]
    with m.editing():
        w[1, 3] = old + h
    up = (m(x) * g).sum()
    with m.editing():
        w[1, 3] = old - h
    down = (m(x) * g).sum()
    with m.editing():
        w[1, 3] = old
    np.testing.assert_allclose(m.grads["q_proj.weight"][1, 3], (up - down) / (2 * h),
                               rtol=1e-6, atol=1e-8)
