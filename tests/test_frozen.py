"""Module.freeze(): inference modules holding each weight matrix once,
packed. The outputs keep their bits, the row-major weights are let go, the
state dict reads the weights back exactly, loads and pickles work, and
training is refused with a typed error."""

import copy
import gc
import pickle
import weakref

import numpy as np
import pytest

import tileattn
from tileattn import FrozenModuleError
from tileattn._compute_dtype import bf16_values


def _models(compute_dtype=None):
    """(name, module, inputs) for each kind of layer that holds matrices."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 13, 32)).astype(np.float32)
    kv = rng.standard_normal((2, 9, 24)).astype(np.float32)
    c = {"compute_dtype": compute_dtype}
    mask = np.ones((2, 13), bool)
    mask[1, 6:] = False
    x64 = x.astype(np.float64)
    return [
        ("linear", tileattn.Linear(32, 20, **c), lambda m: m(x)),
        ("float64 mha", tileattn.MultiHeadAttention(32, 4, seed=1, dtype=np.float64),
         lambda m: m(x64)) if compute_dtype is None else
        ("float64 linear", tileattn.Linear(32, 20, dtype=np.float64), lambda m: m(x64)),
        ("mha self", tileattn.MultiHeadAttention(32, 4, seed=1, **c),
         lambda m: m(x, is_causal=True)),
        ("mha cross", tileattn.MultiHeadAttention(32, 4, seed=1, **c),
         lambda m: m(x, x[:, :7], x[:, :7])),
        ("mha kdim", tileattn.MultiHeadAttention(32, 4, kdim=24, vdim=24, seed=1, **c),
         lambda m: m(x, kv, kv)),
        ("encoder padded", tileattn.TransformerEncoder(
            tileattn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, seed=2, **c), 2),
         lambda m: m(x, key_padding_mask=~mask)),
        ("sliding window", tileattn.models.SlidingWindowModel(
            32, window_size=5, num_heads=2, head_dim=8, num_layers=1, ffn_dim=48,
            dropout=0.0, seed=3, **c), lambda m: m(x)),
    ]


@pytest.mark.parametrize("compute_dtype", [None, "bfloat16"])
def test_frozen_modules_keep_their_bits(each_isa, compute_dtype):
    for name, module, run in _models(compute_dtype):
        want = run(module)
        state = module.state_dict()
        assert module.freeze() is module and module.frozen
        assert all(m.frozen for _, m in module.named_modules())
        np.testing.assert_array_equal(run(module), want, err_msg=name)
        # The weights read back as packed: exactly, or their bf16 values.
        for key, value in module.state_dict().items():
            expect = state[key]
            if compute_dtype and module.dtype == np.float32 and key.endswith("weight") \
                    and value.ndim == 2:
                expect = bf16_values(expect)
            np.testing.assert_array_equal(value, expect, err_msg=f"{name}: {key}")


def test_freezing_lets_the_row_major_weights_go():
    """After freeze() no array of the weights' size is left alive: the
    packed copy is the only one."""
    lin = tileattn.Linear(64, 48)
    mha = tileattn.MultiHeadAttention(64, 4)
    refs = [weakref.ref(lin.weight), weakref.ref(mha.out_proj.weight),
            weakref.ref(mha.q_proj.weight.base)]     # the fused Q/K/V matrix
    lin(np.ones((3, 64), np.float32))                 # packed beside the weight
    mha(np.ones((1, 5, 64), np.float32))
    assert all(r() is not None for r in refs)
    lin.freeze()
    mha.freeze()
    gc.collect()
    assert [r() for r in refs] == [None, None, None]
    # Reading a weight gives a fresh read-only copy, not a parameter array.
    w = mha.q_proj.weight
    assert w.shape == (64, 64) and not w.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        w[0, 0] = 1.0


def test_loading_and_assigning_into_a_frozen_module_packs_again(rng):
    frozen = tileattn.MultiHeadAttention(32, 4, seed=1).freeze()
    source = tileattn.MultiHeadAttention(32, 4, seed=9)
    x = rng.standard_normal((2, 11, 32)).astype(np.float32)
    frozen.load_state_dict(source.state_dict())
    assert frozen.frozen
    np.testing.assert_array_equal(frozen(x), source(x))
    for key, value in source.state_dict().items():
        np.testing.assert_array_equal(frozen.state_dict()[key], value)
    # Torch's packed names reach the fused matrix's rows too.
    other = tileattn.MultiHeadAttention(32, 4, seed=4)
    sd = other.state_dict()
    torch_sd = {k: v for k, v in sd.items() if not k.startswith(("q_proj", "k_proj", "v_proj"))}
    torch_sd["in_proj_weight"] = np.concatenate([sd[f"{p}_proj.weight"] for p in "qkv"])
    torch_sd["in_proj_bias"] = np.concatenate([sd[f"{p}_proj.bias"] for p in "qkv"])
    frozen.load_state_dict(torch_sd)
    np.testing.assert_array_equal(frozen(x), other(x))
    # One projection by assignment.
    frozen.k_proj.weight = source.k_proj.weight
    mixed = copy.deepcopy(other)
    mixed.k_proj.weight = source.k_proj.weight
    np.testing.assert_array_equal(frozen(x), mixed(x))
    # A failed load writes nothing.
    before = frozen.state_dict()
    bad = dict(source.state_dict())
    bad["q_proj.weight"] = np.zeros((5, 5), np.float32)
    with pytest.raises(tileattn.ShapeError):
        frozen.load_state_dict(bad)
    for key, value in frozen.state_dict().items():
        np.testing.assert_array_equal(value, before[key])


def test_pickle_copy_and_save_of_a_frozen_module(rng, tmp_path):
    enc = tileattn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, seed=2,
                                           compute_dtype="bfloat16").freeze()
    x = rng.standard_normal((2, 9, 32)).astype(np.float32)
    want = enc(x)
    for clone in (pickle.loads(pickle.dumps(enc)), copy.deepcopy(enc)):
        assert clone.frozen
        np.testing.assert_array_equal(clone(x), want)
    # tileattn.save stores the weights (as the state dict reads them); the
    # loaded module is a plain one, which gives the same bits (its packed
    # bf16 weights are the same) and can be frozen again.
    tileattn.save(enc, tmp_path / "enc.safetensors")
    loaded = tileattn.load(tmp_path / "enc.safetensors")
    assert not loaded.frozen
    np.testing.assert_array_equal(loaded(x), want)
    np.testing.assert_array_equal(loaded.freeze()(x), want)


def test_a_frozen_module_follows_a_change_of_isa_path(rng):
    paths = tileattn.config()["isa_paths_supported"]
    before = tileattn._core.isa()
    x = rng.standard_normal((3, 7, 32)).astype(np.float32)
    try:
        frozen = tileattn.MultiHeadAttention(32, 4, seed=1, compute_dtype="bfloat16").freeze()
        plain = tileattn.MultiHeadAttention(32, 4, seed=1, compute_dtype="bfloat16")
        for path in paths[::-1]:     # packed on the best path, then the others
            tileattn._core.set_isa(path)
            np.testing.assert_array_equal(frozen(x), plain(x), err_msg=path)
    finally:
        tileattn._core.set_isa(before)


def test_decoding_through_a_frozen_module(rng):
    mha = tileattn.MultiHeadAttention(32, 4, num_kv_heads=2, seed=1)
    frozen = copy.deepcopy(mha).freeze()
    x = rng.standard_normal((2, 6, 32)).astype(np.float32)
    cache, frozen_cache = tileattn.KVCache(2, 2, 16, 8), tileattn.KVCache(2, 2, 16, 8)
    np.testing.assert_array_equal(frozen(x[:, :3], cache=frozen_cache, is_causal=True),
                                  mha(x[:, :3], cache=cache, is_causal=True))
    for t in range(3, 6):
        step = x[:, t:t + 1]
        np.testing.assert_array_equal(frozen(step, cache=frozen_cache, is_causal=True),
                                      mha(step, cache=cache, is_causal=True))


def test_training_a_frozen_module_is_refused(rng):
    mha = tileattn.MultiHeadAttention(32, 4).freeze()
    x = rng.standard_normal((1, 5, 32)).astype(np.float32)
    for attempt in (lambda: mha.train(), lambda: mha(x, training=True),
                    lambda: mha.forward(x, training=True), lambda: mha.backward(x),
                    lambda: mha.editing().__enter__(), lambda: tileattn.optim.SGD(mha),
                    lambda: tileattn.optim.AdamW(mha),
                    lambda: setattr(mha, "q_proj", tileattn.Linear(32, 32))):
        with pytest.raises(FrozenModuleError, match="frozen"):
            attempt()
    assert not mha.training
    np.testing.assert_array_equal(mha(x), mha(x))      # and it still serves
    with pytest.raises(FrozenModuleError, match="eval"):
        tileattn.Linear(4, 4).train().freeze()
    assert issubclass(FrozenModuleError, RuntimeError)


@pytest.mark.parametrize("compute_dtype,packed_share", [(None, 1.0), ("bfloat16", 0.5)])
def test_nbytes_counts_each_copy_of_the_weights(compute_dtype, packed_share):
    """Module.nbytes: the arrays, plus the packed copy once made; frozen,
    the packed copy and the biases only (float32: half; bf16 products: a
    third of the unfrozen bytes)."""
    e = 384     # whole panels on every path (48, 24 or 12 columns)
    mha = tileattn.MultiHeadAttention(e, 4, compute_dtype=compute_dtype)
    weights = 4 * e * e * 4
    biases = 4 * e * 4
    assert mha.nbytes == weights + biases
    mha(np.ones((1, 3, e), np.float32))
    packed = weights * packed_share
    assert mha.nbytes == weights + biases + packed
    mha.freeze()
    assert mha.nbytes == biases + packed
    assert mha.num_parameters() == 4 * e * e + 4 * e


def test_pytorch_compat_layers_freeze_in_eval_mode(rng):
    """tileattn.compat.pytorch layers start in train mode, as PyTorch's:
    freeze() asks for eval() first (torch.jit.freeze's rule), then keeps
    the outputs and the state dict under PyTorch's names."""
    from tileattn.compat import pytorch as tp
    x = rng.standard_normal((2, 5, 32)).astype(np.float32)
    mha = tp.MultiheadAttention(32, 4, batch_first=True)
    layer = tp.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
    for m, run in ((mha, lambda m: m(x, x, x)[0]), (layer, lambda m: m(x))):
        with pytest.raises(FrozenModuleError, match="eval"):
            m.freeze()
        m.eval()
        want, state = run(m), m.state_dict()
        assert m.freeze() is m
        np.testing.assert_array_equal(run(m), want)
        got = m.state_dict()
        assert list(got) == list(state)
        for key, value in state.items():
            np.testing.assert_array_equal(got[key], value)
        with pytest.raises(FrozenModuleError, match="frozen"):
            m.train()


def test_a_projection_packed_with_others_is_frozen_through_its_attention(rng):
    """q_proj alone would be packed apart from the fused Q/K/V matrix the
    attention keeps (two copies, and a later write to it unseen by one):
    refused; freezing the attention freezes it."""
    mha = tileattn.MultiHeadAttention(32, 4, seed=1)
    with pytest.raises(FrozenModuleError, match="parent"):
        mha.q_proj.freeze()
    assert not mha.q_proj.frozen
    x = rng.standard_normal((1, 6, 32)).astype(np.float32)
    want = mha(x)
    mha.freeze()
    np.testing.assert_array_equal(mha(x), want)


def test_freezing_a_shallow_copy_leaves_the_original_trainable(rng):
    lin = tileattn.Linear(16, 8)
    twin = copy.copy(lin)
    twin.freeze()
    assert twin.frozen and not lin.frozen
    x = rng.standard_normal((3, 16)).astype(np.float32)
    np.testing.assert_array_equal(twin(x), lin(x))
    assert isinstance(lin.weight, np.ndarray) and lin.weight is not twin.weight
    lin.train()
    lin(x)
    lin.backward(np.ones((3, 8), np.float32))
    assert lin.grads["weight"].any()
    # The two still share the bias array (a shallow copy): updating it would
    # change the frozen copy, so an optimiser refuses it.
    with pytest.raises(FrozenModuleError, match="bias"):
        tileattn.optim.SGD(lin, lr=0.1)


def test_freeze_drops_gradients_and_optimisers_refuse_its_parameters(rng):
    lin = tileattn.Linear(16, 8).train()
    x = rng.standard_normal((3, 16)).astype(np.float32)
    lin(x)
    lin.backward(np.ones((3, 8), np.float32))
    early = tileattn.optim.SGD(lin.parameters(), lr=0.1)
    lin.eval().freeze()
    with pytest.raises(FrozenModuleError):
        lin.grads
    with pytest.raises(FrozenModuleError):
        lin.zero_grad()
    with pytest.raises(FrozenModuleError):
        early.step([np.zeros((8, 16), np.float32), np.zeros(8, np.float32)])
    with pytest.raises(FrozenModuleError):
        tileattn.optim.AdamW(lin.parameters())     # the bias is still the module's array


def test_a_failed_load_into_a_frozen_module_changes_nothing(rng, monkeypatch):
    frozen = tileattn.MultiHeadAttention(32, 4, seed=1).freeze()
    before = frozen.state_dict()
    new = tileattn.MultiHeadAttention(32, 4, seed=2).state_dict()
    calls = []
    real = tileattn._core.pack_linear

    def fail_second(w, bf16=False):
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError("no room for the second store")
        return real(w, bf16=bf16)
    monkeypatch.setattr(tileattn._core, "pack_linear", fail_second)
    with pytest.raises(MemoryError):
        frozen.load_state_dict(new)
    monkeypatch.undo()
    for key, value in frozen.state_dict().items():
        np.testing.assert_array_equal(value, before[key], err_msg=key)


def test_cross_attention_on_a_frozen_attention_counts_its_extra_pack(rng):
    mha = tileattn.MultiHeadAttention(48, 4, seed=1).freeze()
    x = rng.standard_normal((1, 5, 48)).astype(np.float32)
    mha(x)
    self_only = mha.nbytes
    mha(x, x[:, :3], x[:, :3])        # Q, K, V projected apart: each packed once more
    assert mha.nbytes > self_only
