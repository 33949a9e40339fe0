"""Hardening: outputs that overlap inputs (or each other), refused calls
that must leave everything as it was, and the typed errors of the modules.

Each test states the bug it guards against; each compares with the float64
reference (tests/reference.py, tests/grad_reference.py) or with the same
call on separate arrays, which the reference checks elsewhere."""

from __future__ import annotations

import numpy as np
import pytest

import tileattn
from grad_reference import assert_grads_close
from reference import assert_close_to_reference
from tileattn import DTypeError, InvalidParameterError, ShapeError

sdpa = tileattn.scaled_dot_product_attention
sdpa_bwd = tileattn.scaled_dot_product_attention_backward


@pytest.fixture
def rng():
    return np.random.default_rng(20261202)


def unaligned(shape, dtype=np.float32):
    """A writeable array of `shape` whose data starts one byte off alignment."""
    n = int(np.prod(shape))
    raw = bytearray(n * np.dtype(dtype).itemsize + 1)
    return np.frombuffer(raw, dtype, count=n, offset=1).reshape(shape)


# -- aliasing: the functional forward and backward ---------------------------------
def test_out_over_the_mask_gives_the_result_of_separate_arrays(rng):
    """Bug: out=m.T (the float mask's memory) was written while the kernel
    still read the mask (off by up to 1.9 here)."""
    q = rng.standard_normal((8, 8, 8)).astype(np.float32)
    m = rng.standard_normal((8, 8, 8)).astype(np.float32)
    mask = m.copy()
    got = sdpa(q, q, q, attn_mask=m, out=m.T)
    assert got is not None and np.shares_memory(got, m)
    assert_close_to_reference(got, q, q, q, attn_mask=mask)


@pytest.mark.parametrize("arg", ["key_padding_mask", "key_lengths"])
def test_out_over_the_padding_or_lengths_is_computed_apart(rng, arg):
    """out sharing bytes with the int key lengths / 0-1 padding mask."""
    b, h, l, d = 2, 1, 4, 2
    q = rng.standard_normal((b, h, l, d))
    buf = np.zeros(b * h * l * d, np.float64)
    out = buf.reshape(b, h, l, d)
    ints = buf.view(np.int64)
    if arg == "key_lengths":
        given = ints[:b]
        given[:] = [3, 1]
        kw = {"key_lengths": given}
        ref = {"key_lengths": np.array([3, 1])}
    else:
        given = ints[:b * l].reshape(b, l)
        given[:] = [[1, 1, 1, 0], [1, 0, 1, 1]]
        kw = {"key_padding_mask": given}
        ref = {"key_padding_mask": given.astype(bool).copy()}
    got = sdpa(q, q, q, out=out, **kw)
    assert got is out
    want = sdpa(q, q, q, **ref)
    np.testing.assert_array_equal(got, want)
    assert_close_to_reference(got, q, q, q, key_padding_mask=ref.get("key_padding_mask",
                              np.arange(l)[None, :] < np.array([3, 1])[:, None]))


def test_out_interleaved_with_q_in_one_buffer_is_accepted(rng):
    """No false refusal: out and q as non-overlapping halves of one fused
    buffer (their bounds overlap, their bytes do not)."""
    b, h, l, d = 2, 3, 17, 8
    fused = rng.standard_normal((b, h, l, 2 * d)).astype(np.float32)
    q, out = fused[..., :d], fused[..., d:]
    k = rng.standard_normal((b, h, l, d)).astype(np.float32)
    q_before = q.copy()
    got = sdpa(q, k, k, is_causal=True, out=out)
    assert got is out
    np.testing.assert_array_equal(q, q_before)
    assert_close_to_reference(got, q_before, k, k, is_causal=True)


def _backward_case(rng, shape=(2, 3, 12, 8)):
    q, k, v = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
    out, lse = sdpa(q, k, v, is_causal=True, return_lse=True)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    return dout, q, k, v, out, lse


def test_grads_out_sharing_an_array_are_refused_naming_both(rng):
    """Bug: grads_out=(g, g, g) returned wrong dk and dv silently."""
    dout, q, k, v, out, lse = _backward_case(rng)
    g = np.zeros_like(q)
    with pytest.raises(InvalidParameterError, match=r"grads_out: dq and dk share memory"):
        sdpa_bwd(dout, q, k, v, out, lse, is_causal=True, grads_out=(g, g, g))
    assert not g.any()  # refused before the kernel wrote anything
    other = np.zeros_like(q)
    with pytest.raises(InvalidParameterError, match=r"dk and dv"):
        sdpa_bwd(dout, q, k, v, out, lse, is_causal=True, grads_out=(other, g, g[:, :, ::-1]))


def test_grads_out_over_the_inputs_give_the_gradients_of_separate_arrays(rng):
    """dq written over dout, dk over q, dv over out: each is computed into
    a temporary and copied in after the kernel."""
    dout, q, k, v, out, lse = _backward_case(rng)
    copies = [a.copy() for a in (dout, q, k, v, out)]
    grads = sdpa_bwd(dout, q, k, v, out, lse, is_causal=True, grads_out=(dout, q, out))
    assert grads[0] is dout and grads[1] is q and grads[2] is out
    assert_grads_close(grads, copies[0], *copies[1:4], is_causal=True)


def test_backward_reads_a_read_only_out(rng):
    """Bug: the backward refused a read-only out ("array is not writeable")
    although it only reads it."""
    dout, q, k, v, out, lse = _backward_case(rng)
    out.flags.writeable = False
    grads = sdpa_bwd(dout, q, k, v, out, lse, is_causal=True)
    assert_grads_close(grads, dout, q, k, v, is_causal=True)


# -- KVCache: refused calls change nothing -------------------------------------------
def _cache_state(c):
    return (c.lengths.copy(), c.k.copy(), c.v.copy())


def _assert_same_state(c, state):
    lengths, k, v = state
    np.testing.assert_array_equal(c.lengths, lengths)
    np.testing.assert_array_equal(c.k, k)
    np.testing.assert_array_equal(c.v, v)


def _step(rng, b=2, h=2, t=1, d=4):
    q = rng.standard_normal((b, 2 * h, t, d)).astype(np.float32)
    k = rng.standard_normal((b, h, t, d)).astype(np.float32)
    v = rng.standard_normal((b, h, t, d)).astype(np.float32)
    return q, k, v


def _bad_attends(c, q, k, v):
    """(name, error, call) for every way a KVCache.attend / append call can fail."""
    b, hq, t, d = q.shape
    ro = np.zeros((b, hq, t, d), np.float32)
    ro.flags.writeable = False
    f64 = np.zeros((b, hq, t, d))
    return [
        ("q dtype", DTypeError, lambda: c.attend(q.astype(np.float64), k, v)),
        ("q int", DTypeError, lambda: c.attend(q.astype(np.int32), k, v)),
        ("q shape", ShapeError, lambda: c.attend(q[:, :3], k, v)),
        ("q length", ShapeError, lambda: c.attend(np.concatenate([q, q], 2), k, v)),
        ("k dtype", DTypeError, lambda: c.attend(q, k.astype(np.int64), v)),
        ("k shape", ShapeError, lambda: c.attend(q, k[:, :1], v)),
        ("v shape", ShapeError, lambda: c.attend(q, k, v[..., :2])),
        ("T differs", ShapeError, lambda: c.attend(q, k, np.concatenate([v, v], 2))),
        ("counts", InvalidParameterError, lambda: c.attend(q, k, v, counts=t + 1)),
        ("counts dtype", DTypeError, lambda: c.attend(q, k, v, counts=0.5)),
        ("counts shape", ShapeError, lambda: c.attend(q, k, v, counts=[1, 1, 1])),
        ("window", InvalidParameterError, lambda: c.attend(q, k, v, window=0)),
        ("is_causal", InvalidParameterError, lambda: c.attend(q, k, v, is_causal="yes")),
        ("scale", InvalidParameterError, lambda: c.attend(q, k, v, scale=float("nan"))),
        ("dropout_p", InvalidParameterError, lambda: c.attend(q, k, v, dropout_p=2.0)),
        ("seed", InvalidParameterError, lambda: c.attend(q, k, v, seed=-1)),
        ("out shape", ShapeError, lambda: c.attend(q, k, v, out=f64[:, :1].astype(np.float32))),
        ("out dtype", DTypeError, lambda: c.attend(q, k, v, out=f64)),
        ("out read-only", InvalidParameterError, lambda: c.attend(q, k, v, out=ro)),
        ("out not an array", InvalidParameterError, lambda: c.attend(q, k, v, out=[0.0])),
        ("out in storage", InvalidParameterError,
         lambda: c.attend(q, k, v, out=np.lib.stride_tricks.as_strided(
             c.k, (b, hq, t, d), (c.k.strides[0],) + c.k.strides[2:3] * 2 + c.k.strides[3:]))),
        ("append k dtype", DTypeError, lambda: c.append(k.astype(np.complex64), v)),
        ("append counts", InvalidParameterError, lambda: c.append(k, v, counts=-1)),
    ]


@pytest.mark.parametrize("window", [None, 3])
def test_every_refused_cache_call_leaves_the_cache_as_it_was(rng, window):
    """Bug: a failed attend could append its keys first (then a retry
    appended them twice). Every way a call can fail, on a linear and on a
    ring cache: same lengths, same storage bytes, and a retry afterwards
    gives what a fresh cache given the same calls gives."""
    c = tileattn.KVCache(2, 2, 8, 4, window=window)
    twin = tileattn.KVCache(2, 2, 8, 4, window=window)
    for _ in range(4):   # wraps the ring
        q, k, v = _step(rng)
        np.testing.assert_array_equal(c.attend(q, k, v), twin.attend(q, k, v))
    q, k, v = _step(rng)
    cases = _bad_attends(c, q, k, v)
    cases.append(("max_len", InvalidParameterError,
                  lambda: c.attend(*_step(rng, t=5))))
    cases.append(("window too wide", InvalidParameterError,
                  lambda: c.attend(q, k, v, window=(5, 0))) if window else
                 ("busy", InvalidParameterError, lambda: _while_busy(c, q, k, v)))
    for name, error, call in cases:
        state = _cache_state(c)
        with pytest.raises(error):
            call()
        _assert_same_state(c, state)
    np.testing.assert_array_equal(c.attend(q, k, v), twin.attend(q, k, v))
    _assert_same_state(c, _cache_state(twin))


def _while_busy(c, q, k, v):
    with c._in_use():          # another thread's call in progress
        c.attend(q, k, v)


def test_unaligned_q_and_out_are_attended_once(rng):
    """Bug: an unaligned q or out raised an untyped ValueError from the core
    after the keys were appended. They are now accepted (q copied aligned,
    out filled from a temporary), and the keys are appended exactly once."""
    c = tileattn.KVCache(2, 2, 8, 4)
    twin = tileattn.KVCache(2, 2, 8, 4)
    for t in (3, 1):
        q, k, v = _step(rng, t=t)
        qu, out = unaligned(q.shape), unaligned(q.shape)
        qu[...] = q
        got = c.attend(qu, k, v, out=out)
        assert got is out
        np.testing.assert_array_equal(got, twin.attend(q, k, v))
        np.testing.assert_array_equal(c.lengths, twin.lengths)
    np.testing.assert_array_equal(c.contents(1)[0], twin.contents(1)[0])


def test_cache_inputs_from_its_own_storage_and_out_over_q(rng):
    """New keys that are a view of the cache's storage are copied before the
    write moves rows (ring wrap), q read from the storage likewise, and an
    out that overlaps q gets a temporary."""
    c = tileattn.KVCache(1, 1, 16, 4, window=4)
    twin = tileattn.KVCache(1, 1, 16, 4, window=4)
    for _ in range(3):
        q, k, v = _step(rng, b=1, h=1, t=1)
        c.attend(q[:, :1], k, v)
        twin.attend(q[:, :1], k, v)
    k_view, v_view = c.k[:, :, 1:3], c.v[:, :, 1:3]
    k_copy, v_copy = k_view.copy(), v_view.copy()
    q_view = c.k[:, :, :2]
    q_copy = q_view.copy()
    got = c.attend(q_view, k_view, v_view)
    want = twin.attend(q_copy, k_copy, v_copy)
    np.testing.assert_array_equal(got, want)
    _assert_same_state(c, _cache_state(twin))
    q, k, v = _step(rng, b=1, h=1, t=2)
    q1 = q[:, :1].copy()
    want = twin.attend(q1.copy(), k, v)
    np.testing.assert_array_equal(c.attend(q1, k, v, out=q1), want)


# -- typed errors naming the argument -------------------------------------------
T = tileattn


@pytest.mark.parametrize("make, error, name", [
    (lambda: T.Linear(-1, 5), InvalidParameterError, "in_features"),
    (lambda: T.Linear(1.7, 5), InvalidParameterError, "in_features"),
    (lambda: T.Linear(3, True), InvalidParameterError, "out_features"),
    (lambda: T.Linear(3, 5, bias="yes"), InvalidParameterError, "bias"),
    (lambda: T.Linear(3, 5, rng=7), InvalidParameterError, "rng"),
    (lambda: T.Linear(3, 5, dtype="int32"), DTypeError, "dtype"),
    (lambda: T.LayerNorm(-3), InvalidParameterError, "normalized_shape"),
    (lambda: T.LayerNorm(4.5), InvalidParameterError, "normalized_shape"),
    (lambda: T.LayerNorm(4, eps="x"), InvalidParameterError, "eps"),
    (lambda: T.LayerNorm(4, eps=float("inf")), InvalidParameterError, "eps"),
    (lambda: T.LayerNorm(4, bias=None), InvalidParameterError, "bias"),
    (lambda: T.TransformerEncoderLayer(8, 2, 16, layer_norm_eps="x"), InvalidParameterError,
     "layer_norm_eps"),
    (lambda: T.TransformerEncoderLayer(4, 10**19), InvalidParameterError, "nhead"),
    (lambda: T.optim.SGD(None), InvalidParameterError, "params"),
    (lambda: T.optim.AdamW(5), InvalidParameterError, "params"),
    (lambda: T.optim.SGD([np.ones(3)]).step(5), InvalidParameterError, "grads"),
    (lambda: T.optim.SGD([np.ones(3)]).step({5: np.ones(3), "0": np.ones(3)}),
     InvalidParameterError, "grads"),
    (lambda: T.optim.SGD([np.ones(3)]).load_state_dict(5), InvalidParameterError, "state"),
    (lambda: T.optim.SGD([np.ones(3)]).load_state_dict({"0": 5}), InvalidParameterError,
     "state"),
    (lambda: T.Linear(2, 2).load_state_dict({5: 1}), InvalidParameterError, "state_dict"),
    (lambda: T.Linear(2, 2).load_state_dict({}, strict="no"), InvalidParameterError, "strict"),
])
def test_constructor_and_state_errors_are_typed_and_named(make, error, name):
    """Bug: builtin ValueError/TypeError/AttributeError without the argument's
    name (and Linear(1.7, 5) was accepted as Linear(1, 5))."""
    with pytest.raises(error, match=rf"^{name}\b"):
        make()


@pytest.mark.parametrize("x, error", [
    ([1.0, 2.0], None),                              # a list of floats is fine
    (np.float32(1.0), ShapeError),                   # no feature axis
    (np.ones((3, 2), np.int64), DTypeError),         # was float64 silently
    (np.ones((3, 2), np.complex64), DTypeError),     # was complex silently
    (np.full((3, 2), None, object), DTypeError),     # was object silently
    (np.ones((3, 4), np.float32), ShapeError),
])
@pytest.mark.parametrize("module", ["Linear", "LayerNorm"])
def test_call_inputs_are_checked(x, error, module):
    m = T.Linear(2, 3, rng=np.random.default_rng(0)) if module == "Linear" else T.LayerNorm(2)
    if error is None:
        got = m(x)
        a = np.asarray(x, np.float64)
        want = a @ m.weight.T.astype(np.float64) + m.bias if module == "Linear" else \
            (a - a.mean()) / np.sqrt(a.var() + m.eps)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        return
    with pytest.raises(error, match=r"^x\b"):
        m(x)


@pytest.mark.parametrize("make, what", [
    (lambda: T.LayerNorm(10**20), "LayerNorm"),
    (lambda: T.LSTM(10**10, 10**10), "LSTM"),
    (lambda: T.LSTM(4, 3, num_layers=10**19), "LSTM"),      # looped for ever (fuzz)
    (lambda: T.Linear(10**10, 10**10), "Linear"),
    (lambda: T.FeedForward(8, 10**19), "Linear"),
])
def test_sizes_no_memory_holds_raise_memory_error(make, what):
    """Bug: NumPy's "array is too big" / "Maximum allowed dimension" ValueError."""
    with pytest.raises(MemoryError, match=what):
        make()


def test_big_endian_inputs_are_converted_not_refused(rng):
    """Decision: a float array in the other byte order (a big-endian file)
    holds the same values; it is converted, not refused as another dtype."""
    q, k, v = (rng.standard_normal((2, 5, 4)) for _ in range(3))
    big = [a.astype(">f8") for a in (q, k, v)]
    got = sdpa(*big, is_causal=True)
    np.testing.assert_array_equal(got, sdpa(q, k, v, is_causal=True))
    assert_close_to_reference(got, q, k, v, is_causal=True)
    lin = T.Linear(4, 3, dtype=np.float64, rng=np.random.default_rng(1))
    np.testing.assert_array_equal(lin(q.astype(">f8")), lin(q))
    c, twin = T.KVCache(1, 1, 4, 4), T.KVCache(1, 1, 4, 4)
    q4, k4 = q[None, :1, :1].astype(np.float32), k[None, :1, :1].astype(np.float32)
    np.testing.assert_array_equal(c.attend(q4.astype(">f4"), k4.astype(">f4"), k4),
                                  twin.attend(q4, k4, k4))


@pytest.mark.parametrize("shape", [(0, 3), (2, 0)])
@pytest.mark.parametrize("name", ["Linear", "LayerNorm", "FeedForward", "MultiHeadAttention",
                                  "TransformerEncoderLayer", "TransformerEncoder"])
def test_empty_batches_forward_and_backward(shape, name):
    """Bug: MultiHeadAttention's backward (and every layer built on it) of
    an empty batch raised "cannot reshape array of size 0". The forward gives
    an empty output of the right shape, the backward an empty input gradient
    and zero parameter gradients (a sum over no token)."""
    m = {"Linear": lambda: T.Linear(8, 8),
         "LayerNorm": lambda: T.LayerNorm(8),
         "FeedForward": lambda: T.FeedForward(8, 16),
         "MultiHeadAttention": lambda: T.MultiHeadAttention(8, 2),
         "TransformerEncoderLayer": lambda: T.TransformerEncoderLayer(8, 2, 16),
         "TransformerEncoder": lambda: T.TransformerEncoder(
             T.TransformerEncoderLayer(8, 2, 16), 2)}[name]()
    x = np.ones(shape + (8,), np.float32)
    assert m(x).shape == shape + (8,)
    y = m(x, training=True)
    assert y.shape == shape + (8,)
    dx = m.backward(np.ones_like(y))
    assert dx.shape == x.shape and dx.dtype == x.dtype
    for gname, g in m.grads.items():
        assert not g.any(), gname


@pytest.mark.parametrize("weights", [None, 5, "query/kernel", np.zeros(8)])
def test_keras_state_dict_of_no_weights_names_them(weights):
    with pytest.raises(tileattn.InvalidParameterError, match="^keras weights: expected"):
        tileattn.keras_state_dict(weights)
