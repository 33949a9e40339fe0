"""tileattn.rope and tileattn.sinusoidal_positions against float64 references."""

import numpy as np
import pytest

import tileattn
from tileattn import DTypeError, InvalidParameterError, ShapeError


def ref_rope_last2(x, theta=10000.0, offset=0):
    """(..., L, D): pairs (i, i + D/2) rotated as a complex number by p * theta^(-2i/D)."""
    d, length = x.shape[-1], x.shape[-2]
    w = theta ** (-np.arange(d // 2) * 2.0 / d)
    p = np.arange(offset, offset + length)[:, None]
    z = (x[..., : d // 2] + 1j * x[..., d // 2:]) * np.exp(1j * p * w)
    return np.concatenate([z.real, z.imag], axis=-1)


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 2e-6)])
def test_rope_matches_reference(rng, dtype, tol):
    x = rng.standard_normal((2, 3, 50, 16)).astype(dtype)
    got = tileattn.rope(x, theta=500.0, offset=7)
    assert got.dtype == dtype and got.shape == x.shape
    np.testing.assert_allclose(got, ref_rope_last2(x.astype(np.float64), 500.0, 7), atol=tol, rtol=0)


def test_rope_seq_dim():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 9, 3, 8))                   # (B, L, H, D)
    want = np.swapaxes(ref_rope_last2(np.swapaxes(x, 1, 2)), 1, 2)
    np.testing.assert_allclose(tileattn.rope(x, seq_dim=1), want, atol=1e-12, rtol=0)
    np.testing.assert_allclose(tileattn.rope(x, seq_dim=-3), want, atol=1e-12, rtol=0)
    y = rng.standard_normal((9, 8))                          # (L, D), seq_dim 0 == -2
    np.testing.assert_array_equal(tileattn.rope(y, seq_dim=0), tileattn.rope(y))


def test_rope_scores_depend_on_relative_position_only(rng):
    q, k = rng.standard_normal(8), rng.standard_normal(8)

    def score(m, n):
        qs = tileattn.rope(np.tile(q, (m + 1, 1)))[m]
        ks = tileattn.rope(np.tile(k, (n + 1, 1)))[n]
        return qs @ ks

    assert score(5, 2) == pytest.approx(score(13, 10), abs=1e-12)
    assert score(0, 0) == pytest.approx(q @ k, abs=1e-12)


def test_rope_leaves_input_and_handles_float16(rng):
    x = rng.standard_normal((4, 6)).astype(np.float16)
    before = x.copy()
    y = tileattn.rope(x)
    np.testing.assert_array_equal(x, before)
    assert y.dtype == np.float16
    np.testing.assert_allclose(y, ref_rope_last2(x.astype(np.float64)), atol=4e-3, rtol=0)


@pytest.mark.parametrize("x, kw, err, pattern", [
    (np.zeros((4, 7)), {}, InvalidParameterError, r"head_dim .* even.*got 7"),
    (np.zeros((4, 8)), dict(seq_dim=-1), InvalidParameterError, r"seq_dim.*rank 2, got -1"),
    (np.zeros((4, 8)), dict(seq_dim=1), InvalidParameterError, r"seq_dim.*got 1"),
    (np.zeros((2, 4, 8)), dict(seq_dim=3), InvalidParameterError, r"seq_dim: expected an axis in \[-3, 1\]"),
    (np.zeros((2, 4, 8)), dict(seq_dim=-4), InvalidParameterError, r"seq_dim"),
    (np.zeros((2, 4, 8)), dict(seq_dim=True), InvalidParameterError, r"seq_dim"),
    (np.zeros(8), {}, ShapeError, r"rank >= 2.*\(8,\)"),
    (np.zeros((4, 8), np.int32), {}, DTypeError, r"int32"),
    (np.zeros((4, 8)), dict(theta=0.0), InvalidParameterError, r"theta"),
    (np.zeros((4, 8)), dict(offset=-1), InvalidParameterError, r"offset.*-1"),
])
def test_rope_errors(x, kw, err, pattern):
    with pytest.raises(err, match=pattern):
        tileattn.rope(x, **kw)


@pytest.mark.parametrize("dim", [1, 6, 7, 64])
def test_sinusoidal_positions(dim):
    table = tileattn.sinusoidal_positions(20, dim, dtype=np.float64)
    assert table.shape == (20, dim)
    for p in (0, 1, 19):
        for i in range(dim):
            f = p / 10000.0 ** ((i - i % 2) / dim)
            assert table[p, i] == pytest.approx(np.sin(f) if i % 2 == 0 else np.cos(f), abs=1e-12)
    assert tileattn.sinusoidal_positions(3, 4).dtype == np.float32
    assert tileattn.sinusoidal_positions(0, 4).shape == (0, 4)


@pytest.mark.parametrize("args, kw, pattern", [
    ((-1, 4), {}, r"length: expected an int >= 0, got -1"),
    ((4, 0), {}, r"dim: expected an int >= 1, got 0"),
    ((4, 2.5), {}, r"dim"),
    ((4, 4), dict(base=0), r"base"),
])
def test_sinusoidal_errors(args, kw, pattern):
    with pytest.raises(InvalidParameterError, match=pattern):
        tileattn.sinusoidal_positions(*args, **kw)
