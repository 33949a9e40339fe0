"""TransformerEncoderLayer / TransformerEncoder against PyTorch's modules
(batch_first=True) with the same weights, loaded under PyTorch's names.

PyTorch's padding mask is True = ignore; ours is True = real token: the tests
convert. Biases and LayerNorm affine parameters are randomised (PyTorch starts
them at 0 / 1, which would hide bugs in their use).
"""

import functools

import numpy as np
import pytest

import tileattn
from conftest import close

torch = pytest.importorskip("torch")

E, H, F, L = 48, 4, 96, 23
TORCH_ACT = {"relu": "relu", "gelu": "gelu",
             "gelu_tanh": functools.partial(torch.nn.functional.gelu, approximate="tanh"),
             "silu": torch.nn.functional.silu}


def torch_dtype(dtype):
    return torch.float64 if dtype == np.float64 else torch.float32


def randomise(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) - 0.5)
            elif "norm" in name:
                p.copy_(1.0 + 0.5 * (torch.rand(p.shape, generator=g, dtype=p.dtype) - 0.5))


def torch_layer(activation="relu", norm_first=False, dtype=np.float32, bias=True, seed=0,
                eps=1e-5):
    torch.manual_seed(seed)
    tl = torch.nn.TransformerEncoderLayer(E, H, F, dropout=0.0, activation=TORCH_ACT[activation],
                                          layer_norm_eps=eps, batch_first=True,
                                          norm_first=norm_first, bias=bias)
    tl = tl.to(torch_dtype(dtype)).eval()
    randomise(tl, seed)
    return tl


def ours_layer(activation="relu", norm_first=False, dtype=np.float32, bias=True, eps=1e-5):
    return tileattn.TransformerEncoderLayer(E, H, F, dropout=0.0, activation=activation,
                                            layer_norm_eps=eps, norm_first=norm_first,
                                            bias=bias, dtype=dtype, seed=7)


def run_torch(module, x, pad=None, causal=False):
    kw = {}
    if pad is not None:
        kw["src_key_padding_mask"] = torch.from_numpy(~pad)
    if causal:
        name = "mask" if isinstance(module, torch.nn.TransformerEncoder) else "src_mask"
        n = x.shape[-2]   # bool, True = ignore, as the padding mask (torch wants one type)
        kw[name] = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
        kw["is_causal"] = True
    with torch.inference_mode():
        return module(torch.from_numpy(x), **kw).numpy()


def tokens(rng, *shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def padding(b, lk, lengths):
    pad = np.zeros((b, lk), bool)
    for i, n in enumerate(lengths):
        pad[i, :n] = True
    return pad


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("masks", ["none", "padding", "causal", "padding+causal"])
def test_layer_matches_torch(rng, dtype, norm_first, activation, masks):
    tl = torch_layer(activation, norm_first, dtype)
    m = ours_layer(activation, norm_first, dtype)
    m.load_state_dict(tl.state_dict())
    x = tokens(rng, 3, L, E, dtype=dtype)
    pad = padding(3, L, [L, 11, 17]) if "padding" in masks else None
    causal = "causal" in masks
    want = run_torch(tl, x, pad, causal)
    got = m(x, key_padding_mask=pad, is_causal=causal)
    if pad is not None:   # padded rows are not defined by either side's contract
        got, want = got[pad], want[pad]
    close(got, want, dtype)


@pytest.mark.parametrize("activation", ["gelu_tanh", "silu"])
@pytest.mark.parametrize("norm_first", [False, True])
def test_other_activations_match_torch(rng, activation, norm_first):
    tl = torch_layer(activation, norm_first)
    m = ours_layer(activation, norm_first)
    m.load_state_dict(tl.state_dict())
    x = tokens(rng, 2, L, E)
    close(m(x), run_torch(tl, x), np.float32)


def test_no_bias_and_eps(rng):
    tl = torch_layer("gelu", bias=False, eps=1e-12)
    m = ours_layer("gelu", bias=False, eps=1e-12)
    m.load_state_dict(tl.state_dict())
    assert not any(k.endswith("bias") for k in m.state_dict())
    x = tokens(rng, 2, L, E)
    close(m(x), run_torch(tl, x), np.float32)


def test_unbatched(rng):
    tl = torch_layer("gelu")
    m = ours_layer("gelu")
    m.load_state_dict(tl.state_dict())
    x = tokens(rng, L, E)
    close(m(x), run_torch(tl, x), np.float32)


def test_state_dict_names_and_round_trip_to_torch(rng):
    tl = torch_layer("relu", seed=3)
    m = ours_layer("relu")
    m.load_state_dict(tl.state_dict())
    names = set(m.state_dict())
    for part in ("linear1", "linear2", "norm1", "norm2"):
        assert {f"{part}.weight", f"{part}.bias"} <= names
    assert {f"self_attn.{p}_proj.weight" for p in "qkv"} <= names
    assert "self_attn.out_proj.weight" in names
    # Our names back into a fresh torch layer (q/k/v re-packed as in_proj_weight).
    sd = m.state_dict()
    packed = {
        "self_attn.in_proj_weight": np.concatenate([sd.pop(f"self_attn.{p}_proj.weight") for p in "qkv"]),
        "self_attn.in_proj_bias": np.concatenate([sd.pop(f"self_attn.{p}_proj.bias") for p in "qkv"]),
    }
    sd.update(packed)
    t2 = torch_layer("relu", seed=99)
    t2.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    x = tokens(rng, 2, L, E)
    close(m(x), run_torch(t2, x), np.float32)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("final_norm", [False, True])
@pytest.mark.parametrize("masks", ["padding", "causal"])
def test_encoder_matches_torch(rng, norm_first, final_norm, masks):
    torch.manual_seed(5)
    tlayer = torch_layer("gelu", norm_first, seed=5)
    tnorm = torch.nn.LayerNorm(E) if final_norm else None
    te = torch.nn.TransformerEncoder(tlayer, 3, norm=tnorm, enable_nested_tensor=False).eval()
    randomise(te, 11)   # the copies start equal; make them differ
    layer = ours_layer("gelu", norm_first)
    ours = tileattn.TransformerEncoder(layer, 3, norm=tileattn.LayerNorm(E) if final_norm else None)
    ours.load_state_dict(te.state_dict())
    assert {"layers.0.linear1.weight", "layers.2.norm2.bias"} <= set(ours.state_dict())
    assert ("norm.weight" in ours.state_dict()) == final_norm
    x = tokens(rng, 3, L, E)
    pad = padding(3, L, [L, 9, 20]) if masks == "padding" else None
    want = run_torch(te, x, pad, masks == "causal")
    got = ours(x, key_padding_mask=pad, is_causal=masks == "causal")
    if pad is not None:
        got, want = got[pad], want[pad]
    close(got, want, np.float32)
