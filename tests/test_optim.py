"""Optimisers on NumPy arrays against torch.optim (steps equal PyTorch's to
round-off), their interface and errors."""

import numpy as np
import pytest

import tileattn
from tileattn.optim import SGD, AdamW


def make_params(rng, dtype):
    return {"w": rng.standard_normal((5, 7)).astype(dtype),
            "b": rng.standard_normal(7).astype(dtype)}


def run_ours(opt_cls, params, grads_seq, **kw):
    params = {n: p.copy() for n, p in params.items()}
    opt = opt_cls(params.items(), **kw)
    for grads in grads_seq:
        opt.step(grads)
    return params


def run_torch(torch_cls, params, grads_seq, **kw):
    import torch
    tp = {n: torch.nn.Parameter(torch.from_numpy(p.copy())) for n, p in params.items()}
    opt = torch_cls(list(tp.values()), foreach=False, **kw)
    for grads in grads_seq:
        for n, t in tp.items():
            t.grad = torch.from_numpy(grads[n].copy())
        opt.step()
    return {n: t.detach().numpy() for n, t in tp.items()}


SGD_CASES = [dict(lr=0.1), dict(lr=0.05, momentum=0.9), dict(lr=0.05, momentum=0.9, dampening=0.3),
             dict(lr=0.05, momentum=0.8, nesterov=True),
             dict(lr=0.05, momentum=0.9, weight_decay=0.01),
             dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1)]
ADAMW_CASES = [dict(), dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
               dict(lr=0.003, weight_decay=0.0), dict(lr=0.01, amsgrad=True)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("steps", [1, 4])
@pytest.mark.parametrize("opt,kw", [("sgd", c) for c in SGD_CASES] +
                         [("adamw", c) for c in ADAMW_CASES])
def test_steps_equal_pytorch(rng, dtype, steps, opt, kw):
    torch = pytest.importorskip("torch")
    params = make_params(rng, dtype)
    grads_seq = [{n: rng.standard_normal(p.shape).astype(dtype) for n, p in params.items()}
                 for _ in range(steps)]
    ours_cls, torch_cls = (SGD, torch.optim.SGD) if opt == "sgd" else (AdamW, torch.optim.AdamW)
    got = run_ours(ours_cls, params, grads_seq, **kw)
    want = run_torch(torch_cls, params, grads_seq, **kw)
    # A few roundings of each parameter's size: the formulas are the same,
    # the order of some multiplications may differ.
    eps = np.finfo(dtype).eps
    for n in params:
        assert got[n].dtype == dtype
        np.testing.assert_allclose(got[n], want[n], rtol=8 * eps, atol=8 * eps)


def test_updates_in_place_and_skips_missing_grads(rng):
    params = make_params(rng, np.float32)
    w, b = params["w"], params["b"]
    b0 = b.copy()
    opt = AdamW(params, lr=0.1)
    opt.step({"w": np.ones_like(w)})          # no gradient for "b": left alone
    assert params["w"] is w and not np.array_equal(w, make_params(
        np.random.default_rng(12345), np.float32)["w"])
    np.testing.assert_array_equal(b, b0)
    assert "b" not in opt.state and opt.state["w"]["step"] == 1


def test_list_of_arrays_and_list_of_grads(rng):
    a, b = rng.standard_normal(3), rng.standard_normal(4)
    opt = SGD([a, b], lr=0.5)
    a0, b0 = a.copy(), b.copy()
    opt.step([np.ones(3), None])
    np.testing.assert_array_equal(a, a0 - 0.5)
    np.testing.assert_array_equal(b, b0)


def test_named_parameters_of_a_module():
    mha = tileattn.MultiHeadAttention(16, 2, seed=0)
    named = list(mha.named_parameters())
    opt = SGD(named, lr=1.0)
    before = {n: p.copy() for n, p in named}
    opt.step({n: np.ones_like(p) for n, p in named})
    for n, p in mha.named_parameters():
        np.testing.assert_allclose(p, before[n] - 1.0, rtol=1e-6, atol=1e-6)


def test_state_dict_round_trip(rng):
    params = make_params(rng, np.float64)
    grads = {n: rng.standard_normal(p.shape) for n, p in params.items()}
    opt = AdamW(params)
    opt.step(grads)
    saved = opt.state_dict()
    copy = {n: p.copy() for n, p in params.items()}
    opt2 = AdamW(copy)
    opt2.load_state_dict(saved)
    opt.step(grads)
    opt2.step(grads)
    for n in params:
        np.testing.assert_array_equal(params[n], copy[n])


def test_errors_name_the_problem(rng):
    params = make_params(rng, np.float32)
    with pytest.raises(tileattn.InvalidParameterError, match="lr"):
        SGD(params, lr=-1)
    with pytest.raises(tileattn.InvalidParameterError, match="nesterov"):
        SGD(params, nesterov=True)
    with pytest.raises(tileattn.InvalidParameterError, match="betas"):
        AdamW(params, betas=(0.9, 1.0))
    with pytest.raises(tileattn.InvalidParameterError, match="params"):
        AdamW([])
    with pytest.raises(tileattn.DTypeError, match="'i'"):
        SGD({"i": np.arange(3)})
    ro = np.zeros(3)
    ro.flags.writeable = False
    with pytest.raises(tileattn.InvalidParameterError, match="read-only"):
        SGD([ro])
    opt = SGD(params, lr=0.1)
    with pytest.raises(tileattn.ShapeError, match="'w'"):
        opt.step({"w": np.zeros(3)})
    with pytest.raises(tileattn.InvalidParameterError, match="nope"):
        opt.step({"nope": np.zeros(3)})
    with pytest.raises(tileattn.ShapeError, match="expected 2"):
        opt.step([np.zeros((5, 7))])


def test_fitting_attention_inputs_lowers_the_loss():
    """The backward and AdamW together: fit q, k, v of a causal attention to
    a target output; the loss must fall clearly."""
    rng = np.random.default_rng(0)
    params = {n: rng.standard_normal((2, 4, 48, 16)).astype(np.float32) for n in "qkv"}
    target = rng.standard_normal((2, 4, 48, 16)).astype(np.float32)
    opt = AdamW(params, lr=0.05, weight_decay=0.0)
    losses = []
    for _ in range(60):
        out, lse = tileattn.scaled_dot_product_attention(
            params["q"], params["k"], params["v"], is_causal=True, return_lse=True)
        diff = out - target
        losses.append(float(0.5 * np.sum(diff * diff)))
        dq, dk, dv = tileattn.scaled_dot_product_attention_backward(
            diff, params["q"], params["k"], params["v"], out, lse, is_causal=True)
        opt.step({"q": dq, "k": dk, "v": dv})
    assert losses[-1] < 0.2 * losses[0], losses[::10]
