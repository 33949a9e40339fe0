"""Products on bfloat16 operands (compute_dtype="bfloat16") in the core's
GEMM, on every ISA path: against a float64 reference of the rounded
operands, with the same bits for a row whatever the batch and the thread
count, and half the packed bytes."""

import ml_dtypes
import numpy as np
import pytest

import tileattn
from tileattn import _core
from tileattn._errors import DTypeError

BF16 = ml_dtypes.bfloat16
U = 2.0 ** -24  # float32 unit round-off

# (M, N, K): skinny (M <= 32) and blocked paths, odd K (a half-filled last
# pair), N off the 48-column panels, K across several 192-pair slices.
SHAPES = [(1, 100, 37), (5, 96, 64), (8, 49, 1), (32, 200, 129), (33, 130, 300),
          (200, 97, 1000)]


def rounded(a):
    return a.astype(BF16).astype(np.float64)


def product(x, w, b=None, bf16_weight=False):
    packed = _core.pack_linear(w.astype(BF16) if bf16_weight else w, bf16=True)
    out = np.full((x.shape[0], w.shape[0]), np.nan, np.float32)
    _core.linear_forward_packed(x, packed, b, out)
    return out


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_matches_float64_of_rounded_operands(each_isa, rng, m, n, k):
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    out = product(x, w, b)
    ref = rounded(x) @ rounded(w).T + b
    # A float32 sum of K exact products, sliced, plus the bias: at most
    # (K + slices + 1) u of the sum of magnitudes. Operands not rounded to
    # bf16 would be off by ~2^-9 relative instead.
    bound = (k + k // 384 + 2) * U * (np.abs(rounded(x)) @ np.abs(rounded(w)).T + np.abs(b))
    assert np.all(np.abs(out - ref) <= bound)
    # A weight already in bf16 packs to the same operands.
    assert np.array_equal(product(x, w, b, bf16_weight=True), out)


def test_portable_method_has_one_set_of_bits(rng):
    """Paths without bf16 units widen to float32: each product is exact, so
    every path (with or without FMA, any register width) forms the same
    sums in the same order."""
    portable = [i for i in _core.isas_supported() if i != "avx512_bf16"]
    x = rng.standard_normal((40, 515)).astype(np.float32)
    w = rng.standard_normal((77, 515)).astype(np.float32)
    before = _core.isa()
    try:
        outs = []
        for isa in portable:
            _core.set_isa(isa)
            outs.append(product(x, w))
    finally:
        _core.set_isa(before)
    for o in outs[1:]:
        assert np.array_equal(o, outs[0])


def test_row_bits_independent_of_batch_and_threads(each_isa, rng, restore_threads):
    k, n = 700, 150
    x = rng.standard_normal((120, k)).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    lin = tileattn.Linear(k, n, compute_dtype="bfloat16")
    lin.load_state_dict({"weight": w, "bias": b})
    tileattn.set_num_threads(2)
    whole = lin(x)
    tileattn.set_num_threads(1)
    assert np.array_equal(lin(x), whole)
    tileattn.set_num_threads(2)
    for rows in (slice(0, 1), slice(7, 8), slice(3, 12), slice(40, 73), slice(0, 33)):
        assert np.array_equal(lin(x[rows]), whole[rows])


def test_linear_module(rng):
    lin = tileattn.Linear(300, 70, compute_dtype="bfloat16", rng=rng)
    assert lin.compute_dtype == "bfloat16" and "compute_dtype=bfloat16" in repr(lin)
    x = rng.standard_normal((4, 6, 300)).astype(np.float32)
    y = lin(x)
    assert y.dtype == np.float32 and y.shape == (4, 6, 70)
    ref = rounded(x) @ rounded(lin.weight).T + lin.bias
    assert np.max(np.abs(y - ref)) < 1e-4
    # Half the bytes of the float32 packing (up to the 2 MiB rounding of both).
    f32 = tileattn.Linear(300, 70, rng=rng)
    assert lin.packed_weight().bf16 and not f32.packed_weight().bf16
    assert lin.packed_weight().nbytes * 2 == f32.packed_weight().nbytes
    # The float32 weight is the master: a load repacks.
    sd = lin.state_dict()
    assert sd["weight"].dtype == np.float32
    lin.load_state_dict({"weight": sd["weight"] * 2, "bias": sd["bias"]})
    ref2 = rounded(x) @ rounded(lin.weight).T + lin.bias
    assert np.max(np.abs(lin(x) - ref2)) < 2e-4


def test_saved_and_loaded_keeps_compute_dtype(tmp_path, rng):
    lin = tileattn.Linear(20, 10, compute_dtype="bfloat16", rng=rng)
    tileattn.save(lin, tmp_path / "lin.npz")
    back = tileattn.load(tmp_path / "lin.npz")
    x = rng.standard_normal((3, 20)).astype(np.float32)
    assert back.compute_dtype == "bfloat16"
    assert np.array_equal(back(x), lin(x))


@pytest.mark.parametrize("kwargs,match", [
    ({"dtype": np.float64, "compute_dtype": "bfloat16"}, "take float32 computations"),
    ({"compute_dtype": "float16"}, "compute_dtype: expected"),
    ({"compute_dtype": "nonsense"}, "compute_dtype: expected"),
])
def test_bad_compute_dtype(kwargs, match):
    with pytest.raises(DTypeError, match=match):
        tileattn.Linear(3, 4, **kwargs)


def test_own_dtype_is_native():
    assert not tileattn.Linear(3, 4, compute_dtype=np.float32).bf16
    assert tileattn.Linear(3, 4, compute_dtype=BF16).bf16


def test_pack_rejects_other_dtypes():
    with pytest.raises(ValueError, match="w: expected float32 or bfloat16"):
        _core.pack_linear(np.zeros((3, 4), np.float64), bf16=True)


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_unpack_gives_the_bf16_values_widened(each_isa, rng, m, n, k):
    """A bf16 weight unpacked is the rounded weight as float32, exactly
    (odd K: the padding half of the last pair is not read back)."""
    w = rng.standard_normal((n, k)).astype(np.float32)
    for source in (w, w.astype(BF16)):
        got = _core.unpack_linear(_core.pack_linear(source, bf16=True))
        assert got.dtype == np.float32 and got.shape == (n, k)
        np.testing.assert_array_equal(got, w.astype(BF16).astype(np.float32))
