"""The projections' GEMM in the C++ core (tileattn.linear.affine, used by
Linear and the attention modules): against a float64 NumPy product on every
ISA path, at tile edges, and bitwise stable across threads and positions."""

import numpy as np
import pytest

import tileattn
from tileattn._compute_dtype import bf16_values
from tileattn.linear import affine

core = tileattn._core


def reference(x, w, b):
    y = x.astype(np.float64) @ w.astype(np.float64).T
    return y if b is None else y + b


def assert_close(got, x, w, b):
    """Within a float32/64 dot product's rounding: K roundings of the terms'
    magnitudes (sum |x_k w_k|), element by element."""
    eps = np.finfo(got.dtype).eps
    bound = (x.shape[1] + 2) * eps * (np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64).T
                                      + (0 if b is None else np.abs(b))) + 1e-300
    err = np.abs(got - reference(x, w, b))
    assert (err <= bound).all(), float((err / bound).max())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m,k,n", [(64, 1, 16), (67, 5, 48), (100, 200, 64), (200, 3, 32),
                                   (129, 385, 80), (96, 192, 144), (1030, 64, 16)])
def test_matches_float64_product(each_isa, rng, dtype, m, k, n):
    x = rng.standard_normal((m, k)).astype(dtype)
    w = rng.standard_normal((n, k)).astype(dtype)
    b = rng.standard_normal(n).astype(dtype)
    for bias in (b, None):
        out = np.full((m, n), np.nan, dtype)
        core.linear_forward(x, w, bias, out)
        assert_close(out, x, w, bias)


def test_zero_inner_dimension_gives_the_bias(rng):
    x = np.empty((70, 0), np.float32)
    w = np.empty((32, 0), np.float32)
    b = rng.standard_normal(32).astype(np.float32)
    out = np.full((70, 32), np.nan, np.float32)
    core.linear_forward(x, w, b, out)
    np.testing.assert_array_equal(out, np.broadcast_to(b, (70, 32)))
    core.linear_forward(x, w, None, out)
    np.testing.assert_array_equal(out, 0.0)


def test_strided_rows_and_output(rng):
    big = rng.standard_normal((150, 300)).astype(np.float32)
    x = big[::2, 10:110]                      # row stride 600 elements
    w = rng.standard_normal((48, 300)).astype(np.float32)[:, :100]
    out_big = np.zeros((75, 100), np.float32)
    out = out_big[:, 20:68]
    core.linear_forward(x, w, None, out)
    assert_close(out, x, w, None)
    assert (out_big[:, :20] == 0).all() and (out_big[:, 68:] == 0).all()


def test_bits_do_not_depend_on_threads_or_row_position(rng):
    x = rng.standard_normal((301, 257)).astype(np.float32)
    w = rng.standard_normal((96, 257)).astype(np.float32)
    b = rng.standard_normal(96).astype(np.float32)
    before = tileattn.get_num_threads()
    try:
        results = []
        for t in (1, 2, 3):
            tileattn.set_num_threads(t)
            results.append(affine(x, w, b))
    finally:
        tileattn.set_num_threads(before)
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])
    np.testing.assert_array_equal(affine(x[7:], w, b), results[0][7:])  # rows move between tiles


def test_affine_runs_every_shape_in_the_core(rng):
    """Any rows, any width, strided operands: the core's bits (a row alone
    equals the row in a batch), within a float32 dot product's rounding."""
    w = rng.standard_normal((20, 8)).astype(np.float32)   # 20 outputs: not a whole register
    b = rng.standard_normal(20).astype(np.float32)
    x = rng.standard_normal((100, 8)).astype(np.float32)
    full = affine(x, w, b)
    assert_close(full, x, w, b)
    for m in (1, 3, 63):
        np.testing.assert_array_equal(affine(x[:m], w, b), full[:m])
    np.testing.assert_array_equal(affine(x[::2], w, b), full[::2])           # strided rows
    np.testing.assert_array_equal(affine(x, np.asfortranarray(w), b), full)  # column-major w
    np.testing.assert_array_equal(affine(x, core.pack_linear(w), b), full)
    mixed = affine(x.astype(np.float64), w, None)         # NumPy's promotion, as before
    assert mixed.dtype == np.float64
    mixed_packed = affine(x.astype(np.float64), core.pack_linear(w), None)
    assert mixed_packed.dtype == np.float64
    np.testing.assert_array_equal(mixed_packed, mixed)


def test_bad_arrays_raise_value_error(rng):
    x = rng.standard_normal((64, 8)).astype(np.float32)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    out = np.zeros((64, 16), np.float32)
    with pytest.raises(ValueError, match="w: expected shape"):
        core.linear_forward(x, w[:, :7], None, out)
    with pytest.raises(ValueError, match="out: expected shape"):
        core.linear_forward(x, w, None, out[:, :8])
    with pytest.raises(ValueError, match="bias: expected shape"):
        core.linear_forward(x, w, np.zeros(15, np.float32), out)
    with pytest.raises(ValueError, match="x: expected contiguous rows"):
        core.linear_forward(np.asfortranarray(x), w, None, out)
    with pytest.raises(ValueError, match="x: expected float32 or float64"):
        core.linear_forward(x.astype(np.int32), w, None, out)
    with pytest.raises(ValueError, match="out: expected dtype"):
        core.linear_forward(x, w, None, out.astype(np.float64))
    with pytest.raises(ValueError, match="out: .*read-only|out: .*writeable"):
        ro = out.copy()
        ro.flags.writeable = False
        core.linear_forward(x, w, None, ro)


# -- any width, and weights packed once ---------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 2, 7, 17, 47, 49, 100, 200])
def test_any_width_matches_float64_product(each_isa, rng, dtype, n):
    """Widths that are not a whole number of registers: the last panel's
    columns are zero-padded when packed and written back trimmed."""
    for m, k in [(1, 9), (5, 64), (70, 33), (197, 200)]:
        x = rng.standard_normal((m, k)).astype(dtype)
        w = rng.standard_normal((n, k)).astype(dtype)
        b = rng.standard_normal(n).astype(dtype)
        for bias in (b, None):
            out_big = np.full((m, n + 3), np.nan, dtype)   # a guard column block past N
            out = out_big[:, :n]
            core.linear_forward(x, w, bias, out)
            assert_close(out, x, w, bias)
            assert np.isnan(out_big[:, n:]).all()           # nothing written past N


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_packed_weight_gives_the_same_bits(each_isa, rng, dtype):
    for m, k, n in [(1, 768, 768), (3, 100, 47), (64, 385, 80), (97, 33, 200), (200, 7, 16)]:
        x = rng.standard_normal((m, k)).astype(dtype)
        w = rng.standard_normal((n, k)).astype(dtype)
        b = rng.standard_normal(n).astype(dtype)
        packed = core.pack_linear(w)
        assert (packed.out_features, packed.in_features) == (n, k)
        assert packed.isa == core.isa() and packed.nbytes >= n * k * x.itemsize
        for bias in (b, None):
            want = np.empty((m, n), dtype)
            core.linear_forward(x, w, bias, want)
            got = np.full((m, n), np.nan, dtype)
            core.linear_forward_packed(x, packed, bias, got)
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_unpack_gives_back_the_weight_that_was_packed(each_isa, rng, dtype):
    """A frozen module keeps only the packed weight, and its state dict
    reads the weight back from it: bit for bit, at panel and register edges
    (N not a multiple of the panel width, K not one of the register's)."""
    for n, k in [(1, 1), (5, 3), (47, 100), (97, 128), (200, 7), (768, 33)]:
        w = rng.standard_normal((n, k)).astype(dtype)
        got = core.unpack_linear(core.pack_linear(w))
        assert got.dtype == dtype and got.flags.c_contiguous
        np.testing.assert_array_equal(got, w)


def test_unpack_of_a_row_range(each_isa, rng):
    """Rows [start, stop) alone (a frozen Q, K or V projection's part of
    the fused matrix), across panel edges, bf16 too; bad ranges refused."""
    w = rng.standard_normal((130, 37)).astype(np.float32)
    # bf16_values: the NumPy rounding (bitwise ml_dtypes' in test_bf16_modules;
    # this file also runs where ml_dtypes is absent, the aarch64 check).
    for bf16, want in ((False, w), (True, bf16_values(w))):
        packed = core.pack_linear(w, bf16=bf16)
        for start, stop in [(0, 130), (0, 1), (5, 53), (47, 49), (48, 96), (129, 130), (7, 7)]:
            got = core.unpack_linear(packed, start, stop)
            assert got.shape == (stop - start, 37) and got.flags.c_contiguous
            np.testing.assert_array_equal(got, want[start:stop])
        np.testing.assert_array_equal(core.unpack_linear(packed, 100), want[100:])
        for start, stop in [(-1, 3), (5, 4), (0, 131)]:
            with pytest.raises(ValueError, match="start, stop"):
                core.unpack_linear(packed, start, stop)


def test_unpack_reads_the_layout_of_the_path_that_packed(rng):
    """The panel width differs between paths: a weight packed on one path
    reads back right while another is active (a frozen module moved to a
    forced path repacks from it)."""
    w = rng.standard_normal((100, 70)).astype(np.float32)
    before = core.isa()
    try:
        for packer in tileattn.config()["isa_paths_supported"]:
            core.set_isa(packer)
            packed = core.pack_linear(w)
            for reader in tileattn.config()["isa_paths_supported"]:
                core.set_isa(reader)
                np.testing.assert_array_equal(core.unpack_linear(packed), w)
    finally:
        core.set_isa(before)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_row_has_the_same_bits_alone_and_in_any_batch(each_isa, rng, dtype):
    """Every row is summed in the same order whatever the rows around it
    (a decode step's few rows take the skinny path, a batch the blocked
    one): the property the modules' batch independence rests on."""
    w = rng.standard_normal((100, 700)).astype(dtype)
    b = rng.standard_normal(100).astype(dtype)
    packed = core.pack_linear(w)
    x = rng.standard_normal((203, 700)).astype(dtype)
    full = np.empty((203, 100), dtype)
    core.linear_forward_packed(x, packed, b, full)
    for start, stop in [(0, 1), (5, 6), (7, 10), (100, 197), (202, 203), (17, 81), (0, 32),
                        (3, 36), (0, 33), (40, 48), (50, 59)]:
        part = np.empty((stop - start, 100), dtype)
        core.linear_forward_packed(x[start:stop], packed, b, part)
        np.testing.assert_array_equal(part, full[start:stop])
        core.linear_forward(x[start:stop], w, b, part)
        np.testing.assert_array_equal(part, full[start:stop])


def test_packed_weight_checks(rng):
    w = rng.standard_normal((32, 16)).astype(np.float32)
    packed = core.pack_linear(w)
    x = rng.standard_normal((4, 16)).astype(np.float32)
    out = np.empty((4, 32), np.float32)
    with pytest.raises(ValueError, match="x: expected shape"):
        core.linear_forward_packed(x[:, :8], packed, None, out)
    with pytest.raises(ValueError, match="x: expected dtype|x: expected float32"):
        core.linear_forward_packed(x.astype(np.float64), packed, None, out.astype(np.float64))
    with pytest.raises(ValueError, match="out: expected shape"):
        core.linear_forward_packed(x, packed, None, out[:, :16])
    others = [isa for isa in tileattn.config()["isa_paths_supported"] if isa != core.isa()]
    if others:
        before = core.isa()
        core.set_isa(others[0])
        try:
            with pytest.raises(ValueError, match="pack it again"):
                core.linear_forward_packed(x, packed, None, out)
        finally:
            core.set_isa(before)
