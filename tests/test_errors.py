"""Bad input raises the typed errors, naming the argument and what was expected."""

import numpy as np
import pytest

import tileattn
from tileattn import DTypeError, InvalidParameterError, ShapeError

sdpa = tileattn.scaled_dot_product_attention


def qkv(b=2, hq=4, hkv=2, lq=5, lk=6, d=8, dv=8, dtype=np.float32):
    z = np.zeros
    return z((b, hq, lq, d), dtype), z((b, hkv, lk, d), dtype), z((b, hkv, lk, dv), dtype)


def test_error_classes_subclass_builtins():
    assert issubclass(ShapeError, ValueError)
    assert issubclass(DTypeError, TypeError)
    assert issubclass(InvalidParameterError, ValueError)


@pytest.mark.parametrize(
    "change, pattern",
    [
        (lambda q, k, v: (q[0, 0], k, v), r"q: expected \(B, Hq, Lq, D\)"),
        (lambda q, k, v: (q[None], k, v), r"q: expected"),
        (lambda q, k, v: (q, k[0], v), r"k: expected a 4-D array"),
        (lambda q, k, v: (q, k, v[0]), r"v: expected a 4-D array"),
        (lambda q, k, v: (q[:1], k, v), r"batch sizes differ"),
        (lambda q, k, v: (q, k, v[:, :, :3]), r"k and v must agree"),
        (lambda q, k, v: (q, k, v[:, :1]), r"k and v must agree"),
        (lambda q, k, v: (q[..., :4], k, v), r"share the head size D"),
        (lambda q, k, v: (q[:, :3], k, v), r"whole multiple"),
        (lambda q, k, v: (q, k[:, :0], v[:, :0]), r"whole multiple"),
    ],
)
def test_shape_errors(change, pattern):
    with pytest.raises(ShapeError, match=pattern):
        sdpa(*change(*qkv()))


@pytest.mark.parametrize("bad", [np.int32, np.int64, np.complex64, np.bool_, object])
def test_dtype_errors(bad):
    q, k, v = qkv()
    with pytest.raises(DTypeError, match="q: expected float16, bfloat16, float32 or float64"):
        sdpa(q.astype(bad), k, v)


def test_mixed_dtypes():
    q, k, v = qkv()
    with pytest.raises(DTypeError, match="share one dtype.*q float32, k float64"):
        sdpa(q, k.astype(np.float64), v)


def test_attn_mask_errors():
    q, k, v = qkv()
    with pytest.raises(ShapeError, match=r"attn_mask: shape \(5, 7\) does not broadcast"):
        sdpa(q, k, v, attn_mask=np.ones((5, 7), bool))
    with pytest.raises(ShapeError, match="attn_mask: .*more axes"):
        sdpa(q, k, v, attn_mask=np.ones((1, 1, 1, 5, 6), bool))
    with pytest.raises(DTypeError, match="attn_mask: expected bool or integers .* or float"):
        sdpa(q, k, v, attn_mask=np.ones((5, 6), np.complex64))   # (integers mean nonzero = attend)


def test_key_padding_mask_errors():
    q, k, v = qkv()
    with pytest.raises(ShapeError, match=r"key_padding_mask: expected shape \(B, Lk\) = \(2, 6\)"):
        sdpa(q, k, v, key_padding_mask=np.ones((2, 5), bool))
    with pytest.raises(DTypeError, match="key_padding_mask"):
        sdpa(q, k, v, key_padding_mask=np.ones((2, 6), np.float32))
    with pytest.raises(DTypeError, match="key_padding_mask: expected bool or integers"):
        sdpa(q, k, v, key_padding_mask=np.full((2, 6), "1"))    # (integers: nonzero = real)


@pytest.mark.parametrize(
    "kw, pattern",
    [
        (dict(window=0), "window: an int window must be >= 1"),
        (dict(window=-3), "window"),
        (dict(window=(-2, 0)), r"window: \(left, right\)"),
        (dict(window=(1, 2, 3)), "window: expected"),
        (dict(window="big"), "window: expected"),
        (dict(window=True), "window: expected"),
        (dict(window=1.5), "window: expected"),
        (dict(scale=float("nan")), "scale: expected a finite"),
        (dict(scale="1"), "scale: expected a real"),
        (dict(dropout_p=1.5), r"dropout_p: expected a number in \[0, 1\]"),
        (dict(dropout_p=-0.1), "dropout_p"),
        (dict(dropout_p=0.1, seed=-1), "seed"),
        (dict(dropout_p=0.1, seed=2**64), "seed"),
        (dict(dropout_p=0.1, seed=1.5), "seed"),
        (dict(is_causal="yes"), "is_causal"),
        (dict(return_weights=1), "return_weights"),
    ],
)
def test_invalid_parameters(kw, pattern):
    with pytest.raises(InvalidParameterError, match=pattern):
        sdpa(*qkv(), **kw)


def test_out_errors():
    q, k, v = qkv()
    with pytest.raises(ShapeError, match=r"out: expected shape \(2, 4, 5, 8\)"):
        sdpa(q, k, v, out=np.empty((2, 4, 5, 7), np.float32))
    ro = np.empty((2, 4, 5, 8), np.float32)
    ro.flags.writeable = False
    with pytest.raises(InvalidParameterError, match="out: array is read-only"):
        sdpa(q, k, v, out=ro)
    with pytest.raises(InvalidParameterError, match="out: expected a numpy array"):
        sdpa(q, k, v, out=[0.0])


def test_core_rejects_inconsistent_arrays():
    """The private extension checks what it relies on, even when called directly."""
    q, k, v = qkv()
    out = np.empty((2, 4, 5, 8), np.float32)
    core = tileattn._core
    options = core.AttentionOptions(scale=1.0)
    with pytest.raises(ValueError, match="k: expected shape"):
        core.attention_forward(q, k[..., :4], v, out, options)
    with pytest.raises(ValueError, match="out: expected shape"):
        core.attention_forward(q, k, v, out[:, :2], options)
    with pytest.raises(ValueError, match="attn_mask: expected shape"):
        core.attention_forward(q, k, v, out, core.AttentionOptions(scale=1.0,
                                                                   mask=np.ones((5, 6), bool)))
    with pytest.raises(ValueError, match="v: expected dtype"):
        core.attention_forward(q, k, v.astype(np.float64), out, options)
    with pytest.raises(TypeError):
        core.AttentionOptions(scale=1.0, window=3)  # not a field
