"""A row, a sequence, a sentence: the same bits alone and inside any batch,
for every module, on every ISA path and thread count.

Every product of a module runs in the core's GEMM, which sums each output
element in one fixed order whatever the rows around it; these tests would
fail with NumPy's BLAS, whose method depends on the shape (measured up to
~5e-7 apart)."""

import numpy as np
import pytest

import tileattn

E, H = 48, 4


def slices(n):
    return [(0, 1), (n - 1, n), (1, n - 2), (2, 5), (0, n)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_linear_rows(each_isa, rng, dtype):
    lin = tileattn.Linear(70, 50, dtype=dtype, rng=rng)
    for rows in (7, 33, 130):                     # skinny, both, blocked
        x = rng.standard_normal((rows, 70)).astype(dtype)
        full = lin(x)
        for a, b in slices(rows):
            np.testing.assert_array_equal(lin(x[a:b]), full[a:b])
        np.testing.assert_array_equal(lin(x[::-1]), full[::-1])


def _sequences_alone(m, x, **kw):
    return np.concatenate([m(x[i:i + 1], **kw) for i in range(x.shape[0])])


@pytest.mark.parametrize("kind", ["mha", "gqa_rope", "encoder_layer", "encoder"])
def test_sequences(each_isa, rng, kind):
    if kind == "mha":
        m = tileattn.MultiHeadAttention(E, H, seed=1)
    elif kind == "gqa_rope":
        m = tileattn.MultiHeadAttention(E, H, num_kv_heads=2, rope=True, qk_norm=True, seed=1)
    elif kind == "encoder_layer":
        m = tileattn.TransformerEncoderLayer(E, H, 96, activation="gelu", seed=1)
    else:
        m = tileattn.TransformerEncoder(
            tileattn.TransformerEncoderLayer(E, H, 96, norm_first=True, seed=1), 2,
            norm=tileattn.LayerNorm(E))
    for batch, length in [(9, 3), (5, 17), (40, 4)]:
        x = rng.standard_normal((batch, length, E)).astype(np.float32)
        full = m(x, is_causal=True)
        np.testing.assert_array_equal(_sequences_alone(m, x, is_causal=True), full)
        np.testing.assert_array_equal(m(x[2:4], is_causal=True), full[2:4])


@pytest.mark.parametrize("kind", ["encoder_layer", "encoder", "gqa_rope_layer"])
@pytest.mark.parametrize("kw", [dict(), dict(is_causal=True), dict(window=(3, 2))])
def test_padded_sequences_equal_the_sequence_alone(each_isa, rng, kind, kw):
    """The padding-skipping path (right padding: sequences packed end to end
    through varlen_attention): each sequence of the batch gives, at its real
    positions, the bits of the sequence alone."""
    extra = dict(num_kv_heads=2, rope=True, qk_norm=True) if kind == "gqa_rope_layer" else {}
    layer = tileattn.TransformerEncoderLayer(E, H, 96, seed=2, **extra)
    m = tileattn.TransformerEncoder(layer, 2) if kind == "encoder" else layer
    lengths = [7, 1, 12, 4, 0, 12, 9]
    x = rng.standard_normal((len(lengths), 12, E)).astype(np.float32)
    real = np.arange(12)[None, :] < np.array(lengths)[:, None]
    got = m(x, key_padding_mask=real, **kw)
    for i, n in enumerate(lengths):
        if n:
            np.testing.assert_array_equal(got[i, :n], m(x[i:i + 1, :n], **kw)[0])


@pytest.mark.parametrize("kw", [dict(), dict(is_causal=True)])
def test_left_padded_sequences_equal_the_sequence_alone(each_isa, rng, kw):
    """Padding before the tokens: packed end to end as well, the same bits
    (no RoPE here: it rotates by a token's place in the padded layout)."""
    m = tileattn.TransformerEncoderLayer(E, H, 96, seed=4)
    lengths = [5, 10, 1, 0]
    x = rng.standard_normal((4, 10, E)).astype(np.float32)
    real = np.arange(10)[None, :] >= 10 - np.array(lengths)[:, None]
    got = m(x, key_padding_mask=real, **kw)
    for i, n in enumerate(lengths):
        if n:
            np.testing.assert_array_equal(got[i, 10 - n:], m(x[i:i + 1, 10 - n:], **kw)[0])


def test_holes_in_the_padding_mask_agree_with_the_reference_path(rng):
    """A mask whose real tokens are not one run takes the scatter/gather
    path; its result matches the full computation on the padded batch."""
    m = tileattn.TransformerEncoderLayer(E, H, 96, seed=5)
    x = rng.standard_normal((2, 8, E)).astype(np.float32)
    real = np.array([[1, 1, 0, 1, 1, 1, 0, 0], [1] * 8], bool)
    got = m(x, key_padding_mask=real)
    full = m(x, attn_mask=np.broadcast_to(real[:, None, None, :], (2, 1, 8, 8)))
    np.testing.assert_allclose(got[real], full[real], rtol=2e-6, atol=2e-6)


def test_same_bits_for_any_thread_count(rng, restore_threads):
    m = tileattn.TransformerEncoder(tileattn.TransformerEncoderLayer(E, H, 96, seed=3), 2)
    x = rng.standard_normal((6, 20, E)).astype(np.float32)
    real = np.arange(20)[None, :] < np.array([20, 3, 11, 20, 1, 8])[:, None]
    outs = []
    for t in (1, 2, 3):
        tileattn.set_num_threads(t)
        outs.append((m(x), m(x, key_padding_mask=real)))
    for a, b in outs[1:]:
        np.testing.assert_array_equal(a, outs[0][0])
        np.testing.assert_array_equal(b, outs[0][1])
