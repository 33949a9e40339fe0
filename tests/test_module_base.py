"""The Module base class as later layers will use it: nesting, foreign names
under a prefix, gradient storage; Linear and LayerNorm against PyTorch."""

import numpy as np
import pytest

import tileattn
from tileattn import InvalidParameterError, Module


class Block(Module):
    """A layer holding an attention and a norm, like an encoder layer will."""

    def __init__(self, seed=0):
        super().__init__()
        self.self_attn = tileattn.MultiHeadAttention(16, 2, seed=seed)
        self.norm1 = tileattn.LayerNorm(16)
        self.scale = 2.0                                     # a plain attribute

    def forward(self, x):
        return self.norm1(x + self.self_attn(x))


def test_nested_names_and_torch_names_under_a_prefix(rng):
    a, b = Block(0), Block(1)
    names = [n for n, _ in a.named_parameters()]
    assert names[0] == "self_attn.q_proj.weight" and names[-1] == "norm1.bias"
    assert [n for n, _ in a.named_modules()][:2] == ["", "self_attn"]
    sd = a.state_dict()
    torch_style = {k: v for k, v in sd.items() if not k.startswith("self_attn.") or "out_proj" in k}
    torch_style["self_attn.in_proj_weight"] = np.concatenate(
        [sd[f"self_attn.{p}_proj.weight"] for p in "qkv"])
    torch_style["self_attn.in_proj_bias"] = np.concatenate(
        [sd[f"self_attn.{p}_proj.bias"] for p in "qkv"])
    b.load_state_dict(torch_style)
    x = rng.standard_normal((2, 5, 16)).astype(np.float32)
    np.testing.assert_array_equal(a(x), b(x))
    with pytest.raises(InvalidParameterError, match=r"missing keys \(1\): norm1.weight"):
        b.load_state_dict({k: v for k, v in sd.items() if k != "norm1.weight"})


def test_inline_child_names_are_its_parents():
    """An inline child (the attention's projections) adds no name segment:
    keys, attribute lookup and foreign-name conversion work as if its
    children were the parent's."""
    a = Block()
    names = [n for n, _ in a.named_parameters()]
    assert names[:8] == [f"self_attn.{p}_proj.{w}" for p in ("q", "k", "v", "out")
                         for w in ("weight", "bias")]
    assert not any("projections" in n for n in names)
    assert a.self_attn.q_proj is a.self_attn.projections.q_proj
    assert [n for n, _ in a.self_attn.named_children()] == ["q_proj", "k_proj", "v_proj",
                                                             "out_proj"]


def test_grads_storage_and_zero_grad():
    m = Block()
    grads = dict(m.named_grads())
    assert grads.keys() == dict(m.named_parameters()).keys()
    assert all(g.shape == p.shape for (_, g), (_, p) in zip(m.named_grads(), m.named_parameters()))
    grads["norm1.weight"][:] = 3.0
    assert dict(m.named_grads())["norm1.weight"][0] == 3.0  # the same arrays persist
    m.zero_grad()
    assert all(np.all(g == 0) for _, g in m.named_grads())


def test_repr_lists_children():
    text = repr(Block())
    assert "(self_attn): MultiHeadAttention(" in text and "(norm1): LayerNorm(16" in text


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_linear_and_layer_norm_match_torch(rng, dtype):
    torch = pytest.importorskip("torch")
    tdt = torch.float64 if dtype == np.float64 else torch.float32
    lin_t, ln_t = torch.nn.Linear(12, 7).to(tdt), torch.nn.LayerNorm(7, eps=1e-6).to(tdt)
    with torch.no_grad():
        ln_t.weight.uniform_(0.5, 1.5)
        ln_t.bias.uniform_(-1, 1)
    lin, ln = tileattn.Linear(12, 7, dtype=dtype), tileattn.LayerNorm(7, eps=1e-6, dtype=dtype)
    lin.load_state_dict(lin_t.state_dict())
    ln.load_state_dict(ln_t.state_dict())
    x = rng.standard_normal((3, 4, 12)).astype(dtype)
    with torch.no_grad():
        want = ln_t(lin_t(torch.from_numpy(x))).numpy()
    got = ln(lin(x))
    assert got.dtype == dtype
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 if dtype == np.float32 else 1e-12)


def test_read_only_parameters_and_every_write_is_seen(rng):
    """Parameters are read-only outside the module; each way of writing them
    (assignment, load_state_dict, an optimiser from the module or from
    model.parameters(), editing()) reaches the packed weight, also in a
    shallow copy that shares the arrays."""
    import copy

    lin = tileattn.Linear(6, 5, rng=rng)
    x = rng.standard_normal((3, 6)).astype(np.float32)

    def fresh(w, b):
        ref = tileattn.Linear(6, 5)
        ref.load_state_dict({"weight": w, "bias": b})
        return ref(x)

    lin(x)                                              # packs the weight
    with pytest.raises(ValueError, match="read-only"):
        lin.weight[0, 0] = 1.0
    lin.weight = lin.weight * 2
    np.testing.assert_array_equal(lin(x), fresh(lin.weight, lin.bias))
    lin.load_state_dict({"weight": np.ones((5, 6)), "bias": np.zeros(5)})
    np.testing.assert_array_equal(lin(x), fresh(lin.weight, lin.bias))
    with lin.editing():
        lin.weight[1] = -3.0
    np.testing.assert_array_equal(lin(x), fresh(lin.weight, lin.bias))
    twin = copy.copy(lin)
    twin(x)
    g = [np.full((5, 6), 0.5, np.float32), np.ones(5, np.float32)]
    tileattn.optim.SGD(lin.parameters(), lr=0.1).step(g)   # PyTorch's spelling
    assert not lin.weight.flags.writeable
    want = fresh(lin.weight, lin.bias)
    np.testing.assert_array_equal(lin(x), want)
    np.testing.assert_array_equal(twin(x), want)            # the copy sees it too
    tileattn.optim.SGD(twin, lr=0.1).step({"weight": g[0], "bias": g[1]})
    np.testing.assert_array_equal(lin(x), fresh(lin.weight, lin.bias))
    with pytest.raises(tileattn.InvalidParameterError, match="read-only"):
        ro = np.ones(3)
        ro.flags.writeable = False
        tileattn.optim.SGD([ro])
