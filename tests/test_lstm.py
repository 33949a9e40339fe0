"""LSTM against torch.nn.LSTM with the same weights (PyTorch's names), and
against a float64 NumPy transcription of the equations where torch is absent."""

import pickle

import numpy as np
import pytest

import tileattn
from conftest import close
from tileattn.lstm import LSTM


def ref_lstm(sd, x, num_layers, h0=None, c0=None):
    """float64, batch first, the equations of torch.nn.LSTM's documentation."""
    x = x.astype(np.float64)
    b, length, _ = x.shape
    hs = sd["weight_hh_l0"].shape[1]
    hn, cn = [], []
    for k in range(num_layers):
        w_ih, w_hh = sd[f"weight_ih_l{k}"].astype(np.float64), sd[f"weight_hh_l{k}"].astype(np.float64)
        bias = sd.get(f"bias_ih_l{k}", 0.0) + sd.get(f"bias_hh_l{k}", 0.0)
        h = np.zeros((b, hs)) if h0 is None else h0[k].astype(np.float64)
        c = np.zeros((b, hs)) if c0 is None else c0[k].astype(np.float64)
        outs = []
        for t in range(length):
            z = x[:, t] @ w_ih.T + h @ w_hh.T + bias
            i, f, g, o = np.split(z, 4, axis=1)
            sig = lambda v: 1.0 / (1.0 + np.exp(-v))  # noqa: E731
            c = sig(f) * c + sig(i) * np.tanh(g)
            h = sig(o) * np.tanh(c)
            outs.append(h)
        x = np.stack(outs, axis=1)
        hn.append(h)
        cn.append(c)
    return x, np.stack(hn), np.stack(cn)


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_torch(rng, num_layers, dtype):
    torch = pytest.importorskip("torch")
    torch.manual_seed(num_layers)
    tm = torch.nn.LSTM(12, 20, num_layers, batch_first=True)
    tm = tm.to(torch.float64 if dtype == np.float64 else torch.float32).eval()
    m = LSTM(12, 20, num_layers, dtype=dtype)
    m.load_state_dict(tm.state_dict())
    x = rng.standard_normal((3, 9, 12)).astype(dtype)
    h0 = rng.standard_normal((num_layers, 3, 20)).astype(dtype)
    c0 = rng.standard_normal((num_layers, 3, 20)).astype(dtype)
    for hx in (None, (h0, c0)):
        with torch.inference_mode():
            args = () if hx is None else (tuple(torch.from_numpy(a) for a in hx),)
            ty, (th, tc) = tm(torch.from_numpy(x), *args)
        y, (h, c) = m(x, hx)
        close(y, ty.numpy(), dtype)
        close(h, th.numpy(), dtype)
        close(c, tc.numpy(), dtype)


def test_time_major_and_unbatched_match_torch(rng):
    torch = pytest.importorskip("torch")
    torch.manual_seed(3)
    tm = torch.nn.LSTM(6, 8, 2).eval()     # PyTorch's default: (L, B, F)
    m = LSTM(6, 8, 2, batch_first=False)
    m.load_state_dict(tm.state_dict())
    x = rng.standard_normal((11, 2, 6)).astype(np.float32)
    with torch.inference_mode():
        ty, (th, tc) = tm(torch.from_numpy(x))
        uy, (uh, uc) = tm(torch.from_numpy(x[:, 0]))
    y, (h, c) = m(x)
    close(y, ty.numpy(), np.float32)
    close(h, th.numpy(), np.float32)
    y1, (h1, c1) = m(x[:, 0])
    close(y1, uy.numpy(), np.float32)
    close(h1, uh.numpy(), np.float32)
    close(c1, uc.numpy(), np.float32)


@pytest.mark.parametrize("bias", [True, False])
def test_matches_float64_reference(rng, bias):
    m = LSTM(5, 7, 2, bias=bias, dtype=np.float64, seed=0)
    x = rng.standard_normal((2, 13, 5))
    y, (h, c) = m(x)
    ry, rh, rc = ref_lstm(m.state_dict(), x, 2)
    close(y, ry, np.float64)
    close(h, rh, np.float64)
    close(c, rc, np.float64)


def test_large_inputs_saturate_without_warnings(rng):
    m = LSTM(4, 3, seed=1)
    x = (rng.standard_normal((1, 5, 4)) * 1e4).astype(np.float32)
    y, _ = m(x)                 # filterwarnings=error: an exp overflow would raise
    assert np.all(np.isfinite(y)) and np.all(np.abs(y) <= 1.0)


def test_state_dict_names_save_load_pickle(tmp_path, rng):
    m = LSTM(4, 6, 2, seed=5)
    assert list(m.state_dict()) == [f"{w}_l{k}" for k in range(2)
                                    for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    assert m.weight_ih_l1.shape == (24, 6)
    x = rng.standard_normal((2, 5, 4)).astype(np.float32)
    tileattn.save(m, tmp_path / "lstm.npz")
    back = tileattn.load(tmp_path / "lstm.npz")
    assert np.array_equal(back(x)[0], m(x)[0])
    assert np.array_equal(pickle.loads(pickle.dumps(m))(x)[0], m(x)[0])
    assert not np.array_equal(LSTM(4, 6, 2, seed=6)(x)[0], m(x)[0])


def test_dropout_between_layers_only_in_training(rng):
    m = LSTM(4, 6, 2, dropout=0.5, seed=2)
    x = rng.standard_normal((2, 5, 4)).astype(np.float32)
    assert np.array_equal(m(x)[0], m(x)[0])
    assert not np.array_equal(m(x, training=True)[0], m(x)[0])


def test_errors():
    m = LSTM(4, 6, 2)
    with pytest.raises(tileattn.ShapeError, match=r"x: expected \(B, L, 4\)"):
        m(np.zeros((2, 3, 5), np.float32))
    with pytest.raises(tileattn.ShapeError, match="time step"):
        m(np.zeros((2, 0, 4), np.float32))
    with pytest.raises(tileattn.DTypeError, match="x"):
        m(np.zeros((2, 3, 4), np.int64))
    with pytest.raises(tileattn.ShapeError, match="h_0"):
        m(np.zeros((2, 3, 4), np.float32), (np.zeros((1, 2, 6)), np.zeros((2, 2, 6))))
    with pytest.raises(tileattn.InvalidParameterError, match="hx"):
        m(np.zeros((2, 3, 4), np.float32), np.zeros((2, 2, 6)))
    with pytest.raises(tileattn.InvalidParameterError, match="hidden_size"):
        LSTM(4, 0)
