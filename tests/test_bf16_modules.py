"""compute_dtype="bfloat16" through the modules: every product of
MultiHeadAttention and TransformerEncoderLayer on bf16 operands, composed of
the same pieces as the functional calls (so the same bits), float32 around
them."""

import numpy as np
import pytest

import tileattn
from tileattn._errors import DTypeError


def test_mha_is_bf16_projections_and_bf16_attention(rng, each_isa):
    e, h = 64, 4
    mha = tileattn.MultiHeadAttention(e, h, compute_dtype="bfloat16", seed=1)
    x = rng.standard_normal((2, 30, e)).astype(np.float32)
    y = mha(x, is_causal=True)
    lin = {}
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        lin[name] = tileattn.Linear(e, e, compute_dtype="bfloat16")
        lin[name].load_state_dict(getattr(mha, name).state_dict())
    q, k, v = (lin[n](x).reshape(2, 30, h, e // h).transpose(0, 2, 1, 3)
               for n in ("q_proj", "k_proj", "v_proj"))
    o = tileattn.scaled_dot_product_attention(q, k, v, is_causal=True, compute_dtype="bfloat16")
    want = lin["out_proj"](o.transpose(0, 2, 1, 3).reshape(2, 30, e))
    np.testing.assert_array_equal(y, want)
    f32 = tileattn.MultiHeadAttention(e, h, seed=1)
    assert not np.array_equal(f32(x, is_causal=True), y)


def test_encoder_layer_padded_batch_bits_and_accuracy(rng, each_isa):
    layer = tileattn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, activation="gelu",
                                             seed=3, compute_dtype="bfloat16")
    ref = tileattn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, activation="gelu",
                                           seed=3, dtype=np.float64)
    ref.load_state_dict(layer.state_dict())
    x = rng.standard_normal((3, 25, 64)).astype(np.float32)
    mask = np.ones((3, 25), bool)
    mask[1, 17:] = False
    mask[2, 5:] = False
    y = layer(x, key_padding_mask=mask)
    for b in range(3):           # a sequence alone gives the same bits
        n = int(mask[b].sum())
        np.testing.assert_array_equal(layer(x[b:b + 1, :n])[0], y[b, :n])
    want = ref(x.astype(np.float64), key_padding_mask=mask)
    err = np.abs(y - want)[mask].max()
    assert 1e-4 < err < 0.1   # bf16 products: errors at bf16's scale, not float32's


def test_encoder_copies_compute_dtype_and_config_round_trips(tmp_path):
    layer = tileattn.TransformerEncoderLayer(32, 2, 64, compute_dtype="bfloat16")
    enc = tileattn.TransformerEncoder(layer, 2)
    assert all(lay.self_attn.bf16 and lay.linear2.bf16 for lay in enc.layers)
    tileattn.save(enc, tmp_path / "enc.npz")
    back = tileattn.load(tmp_path / "enc.npz")
    assert back.layers[1].self_attn.bf16 and back.layers[0].linear1.bf16
    ff = tileattn.FeedForward(16, 32, compute_dtype="bfloat16")
    assert ff.get_config()["compute_dtype"] == "bfloat16" and ff.linear1.bf16


@pytest.mark.parametrize("cls,args", [
    (tileattn.MultiHeadAttention, (16, 2)),
    (tileattn.TransformerEncoderLayer, (16, 2, 32)),
])
def test_float64_modules_refuse_bf16(cls, args):
    with pytest.raises(DTypeError, match="take float32 computations"):
        cls(*args, dtype=np.float64, compute_dtype="bfloat16")


def test_edifice_sliding_window_model_bf16(rng):
    kw = dict(embed_dim=12, window_size=5, num_heads=2, head_dim=8, num_layers=2, ffn_dim=16,
              dropout=0.0, seed=4)
    f32 = tileattn.models.SlidingWindowModel(**kw)
    b16 = tileattn.models.SlidingWindowModel(**kw, compute_dtype="bfloat16")
    assert b16.input_proj.bf16 and b16.encoder.layers[0].self_attn.bf16
    frames = rng.standard_normal((2, 20, 12)).astype(np.float32)
    a, b = f32(frames), b16(frames)
    assert 0 < np.abs(a - b).max() < 0.1
    head = tileattn.models.MLPHead(8, [6, 3], compute_dtype="bfloat16")
    assert all(lin.bf16 for lin in head.layers)


def _bf16(a):
    """Round-to-nearest-even bf16 values, in float64 (ml_dtypes rounds so)."""
    import ml_dtypes
    return np.asarray(a, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)


def test_lstm_bf16_products_are_float32_sums_of_bf16_operands(rng):
    """Each step's two products on bf16 operands (x, h and the weights
    rounded), float32 sums: against a float64 LSTM on those rounded operands
    the output is off by float32 round-off only, while float32 products
    land ~1e-3 away."""
    lstm = tileattn.LSTM(12, 16, num_layers=2, seed=3, compute_dtype="bfloat16")
    x = rng.standard_normal((3, 9, 12)).astype(np.float32)
    got, _ = lstm(x)

    def reference(x, bf16):
        rnd = _bf16 if bf16 else (lambda a: np.asarray(a, np.float64))
        seq = x.transpose(1, 0, 2).astype(np.float64)
        for k in range(2):
            w_ih, w_hh = (rnd(lstm.state_dict()[f"weight_{n}_l{k}"]) for n in ("ih", "hh"))
            b = (lstm.state_dict()[f"bias_ih_l{k}"].astype(np.float64)
                 + lstm.state_dict()[f"bias_hh_l{k}"])
            h = np.zeros((seq.shape[1], 16))
            c = np.zeros_like(h)
            out = []
            for t in range(seq.shape[0]):
                z = rnd(seq[t]) @ w_ih.T + rnd(h) @ w_hh.T + b
                i, f, g, o = np.split(z, 4, axis=1)
                sig = (lambda a: 1 / (1 + np.exp(-a)))
                c = sig(f) * c + sig(i) * np.tanh(g)
                h = sig(o) * np.tanh(c)
                out.append(h)
            seq = np.stack(out)
        return seq.transpose(1, 0, 2)

    assert np.abs(got - reference(x, True)).max() < 2e-6
    assert np.abs(got - reference(x, False)).max() > 1e-4
    assert lstm.get_config()["compute_dtype"] == "bfloat16"


def test_hybrid_lstm_attention_bf16(rng):
    kw = dict(lstm_hidden=16, num_heads=2, head_dim=8, dropout=0.0, mlp=[6], seed=5)
    f32 = tileattn.models.HybridLSTMAttention(10, **kw)
    b16 = tileattn.models.HybridLSTMAttention(10, **kw, compute_dtype="bfloat16")
    assert b16.lstm.bf16 and b16.attn.bf16 and all(lin.bf16 for lin in b16.mlp.layers)
    frames = rng.standard_normal((2, 14, 10)).astype(np.float32)
    a, b = f32(frames), b16(frames)
    assert 0 < np.abs(a - b).max() < 0.1
    with pytest.raises(DTypeError, match="take float32 computations"):
        tileattn.models.HybridLSTMAttention(10, dtype=np.float64, compute_dtype="bfloat16")


def test_numpy_bf16_rounding_is_ml_dtypes_rounding(rng):
    import ml_dtypes
    from tileattn._compute_dtype import bf16_values
    bits = rng.integers(0, 2**32, 100_000, dtype=np.uint64).astype(np.uint32)
    ties = (np.arange(1000, dtype=np.uint32) << 16) | np.uint32(0x8000)   # exact halfway
    x = np.concatenate([bits.view(np.float32), ties.view(np.float32),
                        np.array([np.inf, -np.inf, np.nan, 0.0, -0.0, 3.4e38, -3.4e38],
                                 np.float32)])
    with np.errstate(invalid="ignore"):      # (the NaNs among the random bits)
        want = x.astype(ml_dtypes.bfloat16).astype(np.float32)
    got = bf16_values(x)
    same = (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))
    assert same.all()


def test_training_keeps_float32_masters_and_repacks_bf16_after_each_step(rng):
    """A bf16 layer being trained: the optimiser updates float32 master
    weights (not bf16 values), and the next forward's products use the bf16
    rounding of the updated weights (the packing is remade), exactly as a
    fresh layer loaded with those weights computes."""
    layer = tileattn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, seed=1,
                                             compute_dtype="bfloat16")
    opt = tileattn.optim.AdamW(layer, lr=1e-2)
    x = rng.standard_normal((2, 10, 32)).astype(np.float32)
    for _ in range(2):
        y = layer(x, training=True)
        layer.backward(np.ones_like(y))
        opt.step()
        opt.zero_grad()
        w = layer.linear1.weight
        assert w.dtype == np.float32 and not np.array_equal(w, _bf16(w).astype(np.float32))
        fresh = tileattn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, seed=2,
                                                 compute_dtype="bfloat16")
        fresh.load_state_dict(layer.state_dict())
        np.testing.assert_array_equal(layer(x), fresh(x))
