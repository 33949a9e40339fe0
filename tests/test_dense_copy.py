"""The core's parallel copy of strided K/V views to dense rows (used by the
attention functions when rows are far apart): bitwise NumPy's copy for
every kind of view, whatever the thread count, and typed checks."""

import numpy as np
import pytest

import tileattn

core = tileattn._core


def views(rng):
    """(name, 4-D view) pairs: heads of a fused projection, transposes,
    reversed axes, a strided last axis, a broadcast last axis, float16."""
    fused = rng.standard_normal((2, 300, 3, 4, 40)).astype(np.float32)
    yield "fused heads", fused[:, :, 1].transpose(0, 2, 1, 3)
    base = rng.standard_normal((3, 5, 70, 24))
    yield "transposed", base.transpose(1, 0, 2, 3)
    yield "reversed", base[::-1, :, ::-2, :]
    yield "strided last axis", base[:, :, :, ::3]
    yield "broadcast last axis", np.broadcast_to(base[..., :1], (3, 5, 70, 9))
    yield "float16", fused.astype(np.float16)[:, :, 2].transpose(0, 2, 1, 3)
    yield "empty", base[:, :, :0]


@pytest.mark.parametrize("threads", [1, 2])
def test_copy_equals_numpy(rng, threads):
    before = tileattn.get_num_threads()
    tileattn.set_num_threads(threads)
    try:
        for name, a in views(rng):
            dst = np.empty(a.shape, a.dtype)
            core.copy_dense(a, dst)
            np.testing.assert_array_equal(dst, np.ascontiguousarray(a), err_msg=name)
    finally:
        tileattn.set_num_threads(before)


def test_strided_keys_give_the_contiguous_result(rng):
    """The copy is what the attention core reads for far-apart K/V rows."""
    qkv = rng.standard_normal((1, 250, 3, 2, 32)).astype(np.float32)
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
    got = tileattn.scaled_dot_product_attention(q, k, v, is_causal=True)
    want = tileattn.scaled_dot_product_attention(*map(np.ascontiguousarray, (q, k, v)),
                                                 is_causal=True)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dst,match", [
    (np.empty((2, 3, 4, 5), np.float64), "dst: expected dtype"),
    (np.empty((2, 3, 4, 6), np.float32), "dst: expected shape"),
    (np.empty((2, 3, 5, 4), np.float32).transpose(0, 1, 3, 2), "dst: expected a C-contiguous"),
    (np.empty((2, 3, 4), np.float32), "dst: expected a 4-D"),
])
def test_bad_destination_is_a_value_error(dst, match):
    with pytest.raises(ValueError, match=match):
        core.copy_dense(np.zeros((2, 3, 4, 5), np.float32), dst)
