"""The core's row-wise work around the projections (csrc/row_ops.cpp,
kernel_activation.h): layer norm, activations and row moves, against NumPy
and float64 references, bitwise independent of the rows around a row."""

import numpy as np
import pytest

import tileattn

core = tileattn._core


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("e", [1, 7, 16, 33, 384])
def test_layer_norm_rows_matches_float64(rng, dtype, e):
    x = (rng.standard_normal((50, e)) * 3 + 1).astype(dtype)
    w = rng.standard_normal(e).astype(dtype)
    b = rng.standard_normal(e).astype(dtype)
    x64 = x.astype(np.float64)
    xhat = (x64 - x64.mean(1, keepdims=True)) / np.sqrt(x64.var(1, keepdims=True) + 1e-5)
    for weight, bias, want in [(w, b, xhat * w + b), (w, None, xhat * w), (None, None, xhat)]:
        got = x.copy()
        inv = np.empty(50, dtype)
        core.layer_norm_rows(got, weight, bias, 1e-5, inv)
        eps = np.finfo(dtype).eps
        assert np.abs(got - want).max() <= 64 * eps * (1 + np.abs(want).max())
        np.testing.assert_allclose(inv, 1 / np.sqrt(x64.var(1) + 1e-5), rtol=64 * eps)
        part = x[17:20].copy()                       # a row's bits, alone or not
        core.layer_norm_rows(part, weight, bias, 1e-5)
        np.testing.assert_array_equal(part, got[17:20])


def test_layer_norm_rows_checks(rng):
    x = rng.standard_normal((4, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="weight"):
        core.layer_norm_rows(x, np.ones(7, np.float32), None, 1e-5)
    with pytest.raises(ValueError, match="bias: needs a weight"):
        core.layer_norm_rows(x, None, np.ones(8, np.float32), 1e-5)
    with pytest.raises(ValueError, match="eps"):
        core.layer_norm_rows(x, None, None, float("nan"))
    ro = x.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="rows"):
        core.layer_norm_rows(ro, None, None, 1e-5)


@pytest.mark.parametrize("kind", ["gelu", "gelu_tanh", "silu"])
def test_activation_rows_bias_and_row_independence(each_isa, rng, kind):
    x = rng.standard_normal((37, 45)).astype(np.float32) * 4   # 45: a partial register
    bias = rng.standard_normal(45).astype(np.float32)
    with_bias = x.copy()
    core.activation_rows(with_bias, kind, bias)
    added = x + bias
    core.activation_rows(added, kind)
    np.testing.assert_array_equal(with_bias, added)
    row = x[5:6].copy()
    core.activation_rows(row, kind, bias)
    np.testing.assert_array_equal(row, with_bias[5:6])
    with pytest.raises(ValueError, match="kind"):
        core.activation_rows(x.copy(), "tanh")
    with pytest.raises(ValueError, match="rows"):
        core.activation_rows(x.astype(np.float64), kind)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_move_rows_gathers_and_scatters_like_numpy(rng, dtype):
    src = rng.standard_normal((20, 9)).astype(dtype)
    idx = np.array([3, 0, 19, 7, 7, 12], np.int64)
    got = np.empty((6, 9), dtype)
    core.move_rows(src, idx, got, None)
    np.testing.assert_array_equal(got, src[idx])
    dst = np.full((10, 9), np.nan, dtype)
    put = np.array([9, 2, 4, 0, 1, 5], np.int64)
    zero = np.array([3, 6, 7, 8], np.int64)
    core.move_rows(got, None, dst, put, zero)
    want = np.zeros((10, 9), dtype)
    want[put] = got
    np.testing.assert_array_equal(dst, want)


def test_move_rows_refuses_indices_out_of_range(rng):
    src = rng.standard_normal((5, 3)).astype(np.float32)
    out = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match=r"src_index: entry 1 \(5\) is outside \[0, 5\)"):
        core.move_rows(src, np.array([0, 5], np.int64), out, None)
    with pytest.raises(ValueError, match="dst_index"):
        core.move_rows(src[:2], None, out, np.array([0, -1], np.int64))
    with pytest.raises(ValueError, match="zero_index"):
        core.move_rows(src[:2], None, out, None, np.array([2], np.int64))
    with pytest.raises(ValueError, match="src_index"):
        core.move_rows(src, np.array([0, 1], np.int32), out, None)
    assert (out == 0).all()                          # a refused call wrote nothing
