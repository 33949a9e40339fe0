"""MultiHeadAttention against PyTorch's nn.MultiheadAttention (batch_first=True)
with the same weights, loaded through load_state_dict under PyTorch's names.

PyTorch's masks have the opposite polarity (True = ignore): the tests convert.
"""

import numpy as np
import pytest

import tileattn
from conftest import close

torch = pytest.importorskip("torch")

E, H = 48, 4


def pair(dtype=np.float32, kdim=None, vdim=None, bias=True, seed=0):
    """A torch module with random (non-zero) biases and our module loaded from it."""
    torch.manual_seed(seed)
    tm = torch.nn.MultiheadAttention(E, H, bias=bias, kdim=kdim, vdim=vdim, batch_first=True)
    tm = tm.to(torch.float64 if dtype == np.float64 else torch.float32).eval()
    with torch.no_grad():
        for name, p in tm.named_parameters():
            if "bias" in name:
                p.uniform_(-0.5, 0.5)   # torch starts biases at zero: would hide bias bugs
    ours = tileattn.MultiHeadAttention(E, H, kdim=kdim, vdim=vdim, bias=bias, dtype=dtype, seed=1)
    ours.load_state_dict(tm.state_dict())
    return tm, ours


def run_torch(tm, q, k, v, **kw):
    t = {n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in kw.items() if a is not None
         and isinstance(a, np.ndarray)}
    rest = {n: a for n, a in kw.items() if not isinstance(a, np.ndarray)}
    with torch.inference_mode():
        y, w = tm(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v), **t, **rest)
    return y.numpy(), (w.numpy() if w is not None else None)


def data(rng, *shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_self_attention(rng, dtype):
    tm, m = pair(dtype)
    x = data(rng, 3, 37, E, dtype=dtype)
    want, _ = run_torch(tm, x, x, x, need_weights=False)
    close(m(x), want, dtype)


def test_unbatched(rng):
    tm, m = pair()
    x = data(rng, 21, E)
    want, _ = run_torch(tm, x, x, x, need_weights=False)
    close(m(x), want, np.float32)


@pytest.mark.parametrize("form", ["q_kv", "q_k_v"])
def test_cross_attention_different_lengths(rng, form):
    tm, m = pair()
    q, k, v = data(rng, 2, 13, E), data(rng, 2, 41, E), data(rng, 2, 41, E)
    if form == "q_kv":
        want, _ = run_torch(tm, q, k, k, need_weights=False)
        got = m(q, k)
    else:
        want, _ = run_torch(tm, q, k, v, need_weights=False)
        got = m(q, k, v)
    close(got, want, np.float32)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kdim_vdim_separate_weights(rng, dtype):
    """torch stores q_proj_weight/k_proj_weight/v_proj_weight when kdim/vdim differ."""
    tm, m = pair(dtype, kdim=24, vdim=40)
    assert "q_proj_weight" in tm.state_dict()
    q, k, v = data(rng, 2, 9, E, dtype=dtype), data(rng, 2, 17, 24, dtype=dtype), \
        data(rng, 2, 17, 40, dtype=dtype)
    want, _ = run_torch(tm, q, k, v, need_weights=False)
    close(m(q, k, v), want, dtype)


def test_no_bias(rng):
    tm, m = pair(bias=False)
    assert all("bias" not in n for n, _ in m.named_parameters())
    x = data(rng, 2, 19, E)
    want, _ = run_torch(tm, x, x, x, need_weights=False)
    close(m(x), want, np.float32)


def test_bool_mask(rng):
    tm, m = pair()
    q, kv = data(rng, 2, 11, E), data(rng, 2, 23, E)
    allowed = rng.random((11, 23)) < 0.6
    allowed[:, 0] = True                                    # no fully blocked row (torch: NaN)
    want, _ = run_torch(tm, q, kv, kv, attn_mask=~allowed, need_weights=False)
    close(m(q, kv, attn_mask=allowed), want, np.float32)


def test_float_mask_per_batch_and_head(rng):
    tm, m = pair()
    x = data(rng, 2, 16, E)
    fmask = data(rng, 2, H, 16, 16)
    want, _ = run_torch(tm, x, x, x, attn_mask=fmask.reshape(2 * H, 16, 16), need_weights=False)
    close(m(x, attn_mask=fmask), want, np.float32)


def test_key_padding(rng):
    tm, m = pair()
    q, kv = data(rng, 3, 12, E), data(rng, 3, 20, E)
    real = np.ones((3, 20), bool)
    real[1, 14:] = False
    real[2, 5:] = False
    want, _ = run_torch(tm, q, kv, kv, key_padding_mask=~real, need_weights=False)
    close(m(q, kv, key_padding_mask=real), want, np.float32)


def test_causal(rng):
    tm, m = pair()
    x = data(rng, 2, 30, E)
    ignore = np.triu(np.ones((30, 30), bool), k=1)
    want, _ = run_torch(tm, x, x, x, attn_mask=ignore, need_weights=False)
    close(m(x, is_causal=True), want, np.float32)


def test_causal_with_padding_and_weights(rng):
    tm, m = pair()
    x = data(rng, 2, 25, E)
    real = np.ones((2, 25), bool)
    real[0, :3] = False          # left padding; every row still sees a key (itself or later)
    ignore = np.triu(np.ones((25, 25), bool), k=1)
    want, want_w = run_torch(tm, x, x, x, attn_mask=ignore, key_padding_mask=~real,
                             need_weights=True)
    y, w = m(x, is_causal=True, key_padding_mask=real, need_weights=True)
    # rows 0..2 of batch 0 see no key: torch gives NaN, tileattn zeros
    close(y[1], want[1], np.float32)
    close(y[0, 3:], want[0, 3:], np.float32)
    close(w[1], want_w[1], np.float32)
    assert np.all(w[0, :3] == 0)


@pytest.mark.parametrize("average", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_need_weights(rng, average, dtype):
    tm, m = pair(dtype)
    q, kv = data(rng, 2, 10, E, dtype=dtype), data(rng, 2, 14, E, dtype=dtype)
    want, want_w = run_torch(tm, q, kv, kv, need_weights=True, average_attn_weights=average)
    y, w = m(q, kv, need_weights=True, average_attn_weights=average)
    close(y, want, dtype)
    close(w, want_w, dtype)
    assert w.shape == ((2, 10, 14) if average else (2, H, 10, 14))


def test_state_dict_round_trips_to_torch(rng):
    """Our state dict (split names) loads into torch via the packed names."""
    tm, m = pair()
    ours = m.state_dict()
    packed = {"in_proj_weight": np.concatenate([ours[f"{p}_proj.weight"] for p in "qkv"]),
              "in_proj_bias": np.concatenate([ours[f"{p}_proj.bias"] for p in "qkv"]),
              "out_proj.weight": ours["out_proj.weight"], "out_proj.bias": ours["out_proj.bias"]}
    for key, value in tm.state_dict().items():
        np.testing.assert_array_equal(packed[key], value.numpy())


def test_torch_tensors_load_directly():
    tm, _ = pair()
    m = tileattn.MultiHeadAttention(E, H, seed=5)
    m.load_state_dict({k: v for k, v in tm.state_dict().items()})   # tensors, not arrays
    np.testing.assert_array_equal(m.k_proj.weight, tm.in_proj_weight.detach().numpy()[E:2 * E])
