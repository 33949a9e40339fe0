"""Parameter management: named_parameters, state_dict round trips, strict
loading errors, pickling and tileattn.save/load (.npz, .safetensors)."""

import copy
import pickle

import numpy as np
import pytest

import tileattn
from tileattn import InvalidParameterError, ShapeError


def make(**kw):
    opts = dict(num_kv_heads=2, value_dim=6, rope=True, qk_norm=True, output_dim=20, seed=11)
    opts.update(kw)
    return tileattn.MultiHeadAttention(32, 4, **opts)


def assert_same_outputs(a, b, rng):
    x = rng.standard_normal((2, 9, 32)).astype(np.float32)
    np.testing.assert_array_equal(a(x, is_causal=True), b(x, is_causal=True))


def test_named_parameters_recurse_with_dotted_names():
    m = make()
    names = [n for n, _ in m.named_parameters()]
    assert names == ["q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias",
                     "v_proj.weight", "v_proj.bias", "out_proj.weight", "out_proj.bias",
                     "q_norm.weight", "q_norm.bias", "k_norm.weight", "k_norm.bias"]
    shapes = dict((n, p.shape) for n, p in m.named_parameters())
    assert shapes["k_proj.weight"] == (16, 32) and shapes["v_proj.weight"] == (12, 32)
    assert shapes["out_proj.weight"] == (20, 24)
    assert m.parameters()[0] is m.q_proj.weight          # the module's own arrays
    assert all(p.dtype == np.float32 for p in m.parameters())
    assert m.num_parameters() == sum(p.size for p in m.parameters())


def test_state_dict_round_trip(rng):
    a, b = make(seed=1), make(seed=2)
    sd = a.state_dict()
    sd["q_proj.weight"][:] = 0                            # state_dict returns copies
    assert not np.all(a.q_proj.weight == 0)
    b.load_state_dict(a.state_dict())
    assert_same_outputs(a, b, rng)


def test_strict_errors_name_every_bad_key():
    m = make()
    sd = m.state_dict()
    del sd["k_proj.bias"], sd["q_norm.weight"]
    sd["extra.weight"] = np.zeros(3)
    sd["v_proj.weight"] = np.zeros((12, 31))
    sd["out_proj.bias"] = np.zeros(21)
    before = m.state_dict()
    with pytest.raises(InvalidParameterError) as e:
        m.load_state_dict(sd)
    msg = str(e.value)
    for part in ("missing keys (2): k_proj.bias, q_norm.weight", "unexpected keys (1): extra.weight",
                 "v_proj.weight: expected (12, 32), got (12, 31)",
                 "out_proj.bias: expected (20,), got (21,)"):
        assert part in msg
    for k, v in m.state_dict().items():                   # nothing was loaded
        np.testing.assert_array_equal(v, before[k])


def test_misshaped_only_is_shape_error_even_when_not_strict():
    m = make()
    with pytest.raises(ShapeError, match=r"q_proj.bias: expected \(32,\), got \(3,\)"):
        m.load_state_dict({"q_proj.bias": np.zeros(3)}, strict=False)


def test_non_strict_reports_missing_and_unexpected():
    m = make()
    res = m.load_state_dict({"q_proj.bias": np.ones(32), "foo": np.ones(2)}, strict=False)
    assert "k_proj.weight" in res.missing_keys and res.unexpected_keys == ["foo"]
    np.testing.assert_array_equal(m.q_proj.bias, 1)


def test_torch_packed_names_from_numpy(rng):
    """PyTorch's names as plain arrays; a wrong in_proj size is named with its numbers."""
    a, b = tileattn.MultiHeadAttention(16, 2, seed=0), tileattn.MultiHeadAttention(16, 2, seed=1)
    sd = a.state_dict()
    packed = {"in_proj_weight": np.concatenate([sd.pop(f"{p}_proj.weight") for p in "qkv"]).tolist(),
              "in_proj_bias": np.concatenate([sd.pop(f"{p}_proj.bias") for p in "qkv"])}
    b.load_state_dict({**sd, **packed})
    x = rng.standard_normal((1, 5, 16)).astype(np.float32)
    np.testing.assert_array_equal(a(x), b(x))
    with pytest.raises(ShapeError, match=r"in_proj_weight: expected 48 rows .* got shape \(47, 16\)"):
        b.load_state_dict({**sd, **packed, "in_proj_weight": np.zeros((47, 16))})


def test_assignment_checks_shape():
    m = make()
    with pytest.raises(ShapeError, match=r"weight: expected shape \(16, 32\), got \(32, 16\)"):
        m.k_proj.weight = np.zeros((32, 16))


def test_unpickles_attention_pickled_before_its_projections_were_a_child(rng):
    """Pickles of the layout before AttentionProjections: the four Linear
    layers were the attention's own children (and unpacked in the pickle)."""
    m = make(bias=True)
    state = m.__getstate__()
    state["_modules"] = children = dict(state["_modules"])     # not m's own dict
    projections = children.pop("projections")
    old_children = {n: copy.deepcopy(getattr(projections, n))
                    for n in ("q_proj", "k_proj", "v_proj", "out_proj")}
    state["_modules"] = {**old_children, **children}
    m2 = tileattn.MultiHeadAttention.__new__(tileattn.MultiHeadAttention)
    m2.__setstate__(state)
    assert list(m2.state_dict()) == list(m.state_dict())
    assert np.shares_memory(m2.v_proj.weight, m2.projections.in_weight)
    assert_same_outputs(m, m2, rng)


def test_pickle_round_trip(rng):
    m = make(dropout=0.2)
    m2 = pickle.loads(pickle.dumps(m))
    assert_same_outputs(m, m2, rng)
    # the packing is rebuilt: the separate weights are views of one matrix again
    assert np.shares_memory(m2.q_proj.weight, m2.projections.in_weight)
    m2.k_proj.weight = np.zeros_like(m2.k_proj.weight)
    x = rng.standard_normal((1, 4, 32)).astype(np.float32)
    assert not np.array_equal(m(x), m2(x))
    # dropout continues the same sequence of masks
    m3 = pickle.loads(pickle.dumps(m))
    np.testing.assert_array_equal(m(x, training=True), m3(x, training=True))


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_save_load(tmp_path, rng, suffix):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    m = make(dtype=np.float64, attention_axes=None)
    m.load_state_dict({k: rng.standard_normal(v.shape) for k, v in m.state_dict().items()})
    path = tmp_path / f"mha{suffix}"
    tileattn.save(m, path)
    m2 = tileattn.load(path)
    assert isinstance(m2, tileattn.MultiHeadAttention)
    assert m2.get_config() == m.get_config()
    x = rng.standard_normal((2, 9, 32))
    np.testing.assert_array_equal(m(x, is_causal=True), m2(x, is_causal=True))
    m3 = tileattn.load(path, module=make(dtype=np.float64, seed=99))
    np.testing.assert_array_equal(m(x), m3(x))


def test_save_load_errors(tmp_path):
    m = make()
    with pytest.raises(InvalidParameterError, match=r"\.npz or \.safetensors.*mha\.pt"):
        tileattn.save(m, tmp_path / "mha.pt")
    np.savez(tmp_path / "raw.npz", **m.state_dict())
    with pytest.raises(InvalidParameterError, match="no tileattn config"):
        tileattn.load(tmp_path / "raw.npz")
    m2 = tileattn.load(tmp_path / "raw.npz", module=make(seed=5))   # weights only: fine
    np.testing.assert_array_equal(m2.q_proj.weight, m.q_proj.weight)
