"""tileattn.compat.pytorch against torch 2.13 itself: the same inputs, masks
in PyTorch's own conventions (no conversion in the test) and the torch
module's weights copied through its state_dict.

Tolerance: float32 throughout, rtol 1e-5 / atol 1e-6 elementwise. Both
sides round the same products in a different order (the projections are
48-term float32 dot products, the softmax sums up to 20 terms): a few ulps
(~1e-7 relative) per step, well inside 1e-5; atol covers entries that
cancel to near zero. A wrong mask, head order or extra key moves entries
by 1e-2 or more.
"""

import subprocess
import sys
import warnings

import numpy as np
import pytest

import tileattn
from tileattn.compat import pytorch as nn

torch = pytest.importorskip("torch")

E, H, B, L, S = 16, 2, 3, 5, 7
RTOL, ATOL = 1e-5, 1e-6


def close(got, want):
    assert got.shape == want.shape, (got.shape, want.shape)
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def tensor(a):
    return None if a is None else torch.from_numpy(np.ascontiguousarray(a))


def torch_call(fn, *args, general_path=False, **kwargs):
    """fn on tensors, results as arrays. torch's own warnings (its fast-path
    and nested-tensor notices) are not what these tests check.
    ``general_path`` turns torch's MHA/encoder fast path off for the call."""
    args = [tensor(a) if isinstance(a, np.ndarray) else a for a in args]
    kwargs = {n: tensor(a) if isinstance(a, np.ndarray) else a for n, a in kwargs.items()}
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(before and not general_path)
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            out = fn(*args, **kwargs)
    finally:
        torch.backends.mha.set_fastpath_enabled(before)
    if isinstance(out, tuple):
        return tuple(None if o is None else o.numpy() for o in out)
    return out.numpy()


def randomise_biases(module):
    # torch starts biases (and bias_k/bias_v near) at zero-ish: that would hide bias bugs.
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "bias" in name:
                p.uniform_(-0.5, 0.5)


# -- masks in PyTorch's conventions ---------------------------------------------
def padding_mask(rng, b, s, kind):
    """(b, s) key padding, True/-inf = ignore; key 0 always kept (no row
    fully masked: torch's NaN there is the documented difference)."""
    ignore = rng.random((b, s)) < 0.4
    ignore[:, 0] = False
    return ignore if kind == "bool" else np.where(ignore, -np.inf, rng.standard_normal((b, s))
                                                   ).astype(np.float32)


def attention_mask(rng, lead, lq, lk, kind):
    """lead + (lq, lk), True/-inf = ignore, key 0 always visible."""
    ignore = rng.random(lead + (lq, lk)) < 0.4
    ignore[..., 0] = False
    if kind == "bool":
        return ignore
    return np.where(ignore, -np.inf, rng.standard_normal(ignore.shape)).astype(np.float32)


def causal_mask(lq, lk, kind="bool"):
    future = np.triu(np.ones((lq, lk), dtype=bool), k=1)
    return future if kind == "bool" else np.where(future, -np.inf, 0.0).astype(np.float32)


MHA_MASKS = ["none", "kpm_bool", "kpm_float", "attn2_bool", "attn2_float", "attn3_bool",
             "attn3_float", "both_bool", "both_float", "causal_hint", "causal_hint_kpm"]


def mha_masks(rng, kind, b, lq, lk, heads):
    """Keyword arguments of an nn.MultiheadAttention call for mask ``kind``."""
    kw = {}
    dtype = "float" if "float" in kind else "bool"
    if kind.startswith("kpm") or kind.startswith("both") or kind == "causal_hint_kpm":
        kw["key_padding_mask"] = padding_mask(rng, b, lk, dtype)
    if kind.startswith("attn2") or kind.startswith("both"):
        kw["attn_mask"] = attention_mask(rng, (), lq, lk, dtype)
    if kind.startswith("attn3"):
        kw["attn_mask"] = attention_mask(rng, (b * heads,), lq, lk, dtype)
    if kind.startswith("causal_hint"):
        kw["attn_mask"], kw["is_causal"] = causal_mask(lq, lk), True
    return kw


# -- MultiheadAttention ---------------------------------------------------------
MHA_CONFIGS = {
    "default": {},
    "batch_first": {"batch_first": True},
    "kdim_vdim": {"kdim": 5, "vdim": 11},
    "no_bias": {"bias": False},
    "bias_kv": {"add_bias_kv": True},
    "zero_attn": {"add_zero_attn": True},
    "bias_kv_zero_attn_batch_first": {"add_bias_kv": True, "add_zero_attn": True,
                                      "batch_first": True},
}
WEIGHTS = {"no_weights": (False, True), "averaged": (True, True), "per_head": (True, False)}


def mha_pair(seed=0, **config):
    torch.manual_seed(seed)
    tm = torch.nn.MultiheadAttention(E, H, **config).eval()
    randomise_biases(tm)
    ours = nn.MultiheadAttention(E, H, **config)
    ours.load_state_dict(tm.state_dict())
    return tm, ours


def mha_inputs(rng, config, b=B, lq=L, lk=S, self_attention=False):
    def seq(length, features):
        shape = (b, length, features) if config.get("batch_first") else (length, b, features)
        return rng.standard_normal(shape).astype(np.float32)
    q = seq(lq, E)
    if self_attention:
        return q, q, q
    return q, seq(lk, config.get("kdim") or E), seq(lk, config.get("vdim") or E)


@pytest.mark.parametrize("weights", list(WEIGHTS))
@pytest.mark.parametrize("mask", MHA_MASKS)
@pytest.mark.parametrize("config", list(MHA_CONFIGS))
def test_multihead_attention_matches_torch(rng, config, mask, weights):
    cfg = MHA_CONFIGS[config]
    tm, ours = mha_pair(**cfg)
    q, k, v = mha_inputs(rng, cfg)
    need, average = WEIGHTS[weights]
    kw = mha_masks(rng, mask, B, L, S, H)
    kw.update(need_weights=need, average_attn_weights=average)
    want_y, want_w = torch_call(tm, q, k, v, **kw)
    got_y, got_w = ours(q, k, v, **kw)
    close(got_y, want_y)
    if need:
        close(got_w, want_w)
    else:
        assert got_w is None and want_w is None


@pytest.mark.parametrize("mask", ["none", "kpm_bool", "attn2_float", "attn3_bool"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_multihead_self_attention_and_train_mode(rng, batch_first, mask):
    """Self-attention (one array: the fused projection) in the default
    training mode, which with dropout=0 changes nothing; torch in eval()
    takes its fast path for batch_first."""
    tm, ours = mha_pair(batch_first=batch_first)
    assert ours.training
    q, k, v = mha_inputs(rng, {"batch_first": batch_first}, self_attention=True)
    kw = mha_masks(rng, mask, B, L, L, H)
    close(ours(q, q, q, need_weights=False, **kw)[0],
          torch_call(tm, q, q, q, need_weights=False, **kw)[0])


@pytest.mark.parametrize("mask", ["attn3_bool", "attn3_float", "both_bool"])
def test_batch_equal_to_heads(rng, mask):
    """B == num_heads: a (B*H, L, S) mask read in the wrong order would
    still have the right shape; only the values tell."""
    tm, ours = mha_pair()
    q, k, v = mha_inputs(rng, {}, b=H)
    kw = mha_masks(rng, mask, H, L, S, H)
    want = torch_call(tm, q, k, v, average_attn_weights=False, **kw)
    got = ours(q, k, v, average_attn_weights=False, **kw)
    close(got[0], want[0])
    close(got[1], want[1])


@pytest.mark.parametrize("config", ["default", "bias_kv", "zero_attn"])
def test_multihead_unbatched(rng, config):
    cfg = MHA_CONFIGS[config]
    tm, ours = mha_pair(**cfg)
    q, k = rng.standard_normal((L, E), dtype=np.float32), rng.standard_normal((S, E), dtype=np.float32)
    kpm = padding_mask(rng, 1, S, "bool")[0]
    attn = attention_mask(rng, (H,), L, S, "float")
    for kw in ({}, {"key_padding_mask": kpm, "attn_mask": attn}):
        want = torch_call(tm, q, k, k, **kw)
        got = ours(q, k, k, **kw)
        close(got[0], want[0])
        close(got[1], want[1])


def test_float64_module(rng):
    torch.manual_seed(0)
    tm = torch.nn.MultiheadAttention(E, H, add_bias_kv=True, dtype=torch.float64).eval()
    ours = nn.MultiheadAttention(E, H, add_bias_kv=True, dtype=torch.float64)
    ours.load_state_dict(tm.state_dict())
    x = rng.standard_normal((L, B, E))
    want = torch_call(tm, x, x, x)
    got = ours(x, x, x)
    for g, w in zip(got, want):
        assert g.dtype == np.float64
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-13)


def test_state_dict_round_trip_into_torch(rng):
    """Our state_dict has torch's keys, in torch's order, and loads into a
    fresh torch module that then computes what ours computes."""
    for cfg in ({"add_bias_kv": True}, {"kdim": 5, "vdim": 11}, {"bias": False}):
        ours = nn.MultiheadAttention(E, H, **cfg)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tm = torch.nn.MultiheadAttention(E, H, **cfg).eval()
        sd = ours.state_dict()
        assert list(sd) == list(tm.state_dict())
        tm.load_state_dict({n: torch.from_numpy(a) for n, a in sd.items()})
        q, k, v = mha_inputs(rng, cfg)
        close(ours(q, k, v)[0], torch_call(tm, q, k, v)[0])


def test_load_failure_changes_nothing():
    tm, ours = mha_pair(add_bias_kv=True)
    before = ours.state_dict()
    sd = tm.state_dict()
    bad = dict(sd, bias_v=torch.zeros(1, 1, E + 1))
    with pytest.raises(tileattn.ShapeError, match="bias_v"):
        ours.load_state_dict(bad)
    missing = {n: t for n, t in sd.items() if n != "bias_k"}
    with pytest.raises(tileattn.InvalidParameterError, match="bias_k"):
        ours.load_state_dict(missing)
    wrong_in_proj = dict(sd, in_proj_weight=torch.zeros(3 * E, E + 1))
    with pytest.raises(tileattn.ShapeError):
        ours.load_state_dict(wrong_in_proj)
    after = ours.state_dict()
    assert all(np.array_equal(before[n], after[n]) for n in before)
    plain = nn.MultiheadAttention(E, H)
    with pytest.raises(tileattn.InvalidParameterError, match="bias_k"):
        plain.load_state_dict(sd)       # bias_k without add_bias_kv: unexpected


def test_mask_errors_name_the_argument(rng):
    _, ours = mha_pair()
    q, k, v = mha_inputs(rng, {})
    with pytest.raises(tileattn.ShapeError, match="attn_mask"):
        ours(q, k, v, attn_mask=np.zeros((L, S + 1), bool))
    with pytest.raises(tileattn.ShapeError, match="key_padding_mask"):
        ours(q, k, v, key_padding_mask=np.zeros((B, L), bool))
    with pytest.raises(tileattn.DTypeError, match="attn_mask"):
        ours(q, k, v, attn_mask=np.zeros((L, S), np.int64))
    with pytest.raises(tileattn.InvalidParameterError, match="is_causal"):
        ours(q, k, v, is_causal=True)      # torch: RuntimeError, the hint needs the mask


# -- the silent cases of the issue ------------------------------------------------
def test_habit_y_underscore_gives_output_and_weights(rng):
    """``y, _ = mha(x, x, x)``: PyTorch's need_weights=True default returns
    (output, weights). tileattn's own module returns y alone, which the
    same line unpacks along the batch."""
    tm, ours = mha_pair()
    x = rng.standard_normal((L, 2, E)).astype(np.float32)    # two sequences
    y, w = ours(x, x, x)
    want_y, want_w = torch_call(tm, x, x, x)
    close(y, want_y)
    close(w, want_w)
    native = tileattn.MultiHeadAttention(E, H)
    native.load_state_dict(tm.state_dict())
    first, _ = native(x.swapaxes(0, 1))          # the habit on the native module
    assert first.shape == (L, E)                 # the first batch item, not the output


def test_add_zero_attn_state_dict_loads_and_matches(rng):
    """A module trained with add_zero_attn has no extra parameter: its
    state dict loads into any module. Here the compat layer reproduces it,
    while the native module (no zero key) is far off."""
    tm, ours = mha_pair(add_zero_attn=True)
    q, k, v = mha_inputs(rng, {})
    want = torch_call(tm, q, k, v)[0]
    close(ours(q, k, v)[0], want)
    native = tileattn.MultiHeadAttention(E, H)
    native.load_state_dict(tm.state_dict())
    got_native = native(q.swapaxes(0, 1), k.swapaxes(0, 1), v.swapaxes(0, 1)).swapaxes(0, 1)
    assert np.max(np.abs(got_native - want)) > 1e-2


def test_bool_polarity_of_modules_and_functional(rng):
    """One bool mask, two meanings in PyTorch: True = ignore for the module,
    True = take part for F.scaled_dot_product_attention. Both honoured."""
    mask = attention_mask(rng, (), L, S, "bool")
    tm, ours = mha_pair()
    q, k, v = mha_inputs(rng, {})
    close(ours(q, k, v, attn_mask=mask)[0], torch_call(tm, q, k, v, attn_mask=mask)[0])
    qh, kh, vh = (rng.standard_normal((B, H, n, 8)).astype(np.float32) for n in (L, S, S))
    take_part = ~mask
    close(nn.scaled_dot_product_attention(qh, kh, vh, attn_mask=take_part),
          torch_call(torch.nn.functional.scaled_dot_product_attention, qh, kh, vh,
                     attn_mask=take_part))


def test_fully_masked_row_zeros_where_torch_gives_nan(rng):
    """The one documented difference: torch's need_weights=True path gives
    NaN for a query that sees no key, its need_weights=False path zero
    attention (then out_proj's bias), as the compat layer always does."""
    tm, ours = mha_pair()
    q, k, v = mha_inputs(rng, {})
    mask = np.zeros((L, S), bool)
    mask[1] = True                       # query 1 ignores every key
    want_y, want_w = torch_call(tm, q, k, v, attn_mask=mask)
    got_y, got_w = ours(q, k, v, attn_mask=mask)
    assert np.isnan(want_w[:, 1]).all() and np.isnan(want_y[1]).all()
    np.testing.assert_array_equal(got_w[:, 1], 0.0)
    np.testing.assert_array_equal(got_y[1], np.broadcast_to(ours.out_proj.bias, (B, E)))
    keep = np.arange(L) != 1
    close(got_y[keep], want_y[keep])
    close(ours(q, k, v, attn_mask=mask, need_weights=False)[0],
          torch_call(tm, q, k, v, attn_mask=mask, need_weights=False)[0])


# -- TransformerEncoderLayer / TransformerEncoder -----------------------------------
FF = 24
LAYER_CONFIGS = {
    "default": {},
    "batch_first": {"batch_first": True},
    "norm_first_gelu": {"norm_first": True, "activation": "gelu"},
    "no_bias_batch_first": {"bias": False, "batch_first": True},
}
ENCODER_MASKS = ["none", "kpm_bool", "kpm_prefix", "kpm_float", "attn2_bool", "attn2_float",
                 "attn3_bool", "attn3_float", "causal_hint", "causal_hint_kpm",
                 "causal_unhinted_bool", "causal_unhinted_float"]


def encoder_masks(rng, kind, b, length, heads):
    """(attn mask, key padding mask, is_causal) in PyTorch's conventions, and
    the (b, length) positions whose outputs are defined (not padding)."""
    if kind == "kpm_prefix":
        lengths = np.array([length, 2, length - 1][:b])
        padding = np.arange(length)[None] >= lengths[:, None]
        return None, padding, False, ~padding
    if kind.startswith("causal_unhinted"):     # TransformerEncoder detects it (is_causal=None)
        return causal_mask(length, length, kind.split("_")[-1]), None, False, \
            np.ones((b, length), bool)
    kw = mha_masks(rng, kind, b, length, length, heads)
    padding = kw.get("key_padding_mask")
    real = np.ones((b, length), bool)
    if padding is not None:
        real = ~padding if padding.dtype == bool else np.isfinite(padding)
    return kw.get("attn_mask"), padding, kw.get("is_causal", False), real


def layer_pair(seed=0, **config):
    torch.manual_seed(seed)
    tl = torch.nn.TransformerEncoderLayer(E, H, FF, dropout=0.1, **config).eval()
    randomise_biases(tl)
    ours = nn.TransformerEncoderLayer(E, H, FF, dropout=0.1, **config).eval()
    ours.load_state_dict(tl.state_dict())
    return tl, ours


def tokens(rng, b, length, batch_first):
    shape = (b, length, E) if batch_first else (length, b, E)
    return rng.standard_normal(shape).astype(np.float32)


def float_masks(*masks):
    """torch's encoder fast paths (eval, batch_first) read float masks as
    bool (any nonzero value = ignore) where its documentation and general
    path add them to the scores, as the compat layer does: compare with the
    general path then (see test_torch_encoder_fast_path_reads_float_masks_as_bool)."""
    return any(m is not None and m.dtype != bool for m in masks)


def close_real(got, want, real, batch_first):
    """Compare the positions that are not padding (PyTorch's own paths
    differ at padding: computed values, zeros, or the norm of zeros)."""
    if not batch_first:
        got, want = got.swapaxes(0, 1), want.swapaxes(0, 1)
    close(got[real], want[real])


@pytest.mark.parametrize("mask", ENCODER_MASKS)
@pytest.mark.parametrize("config", list(LAYER_CONFIGS))
def test_encoder_layer_matches_torch(rng, config, mask):
    cfg = LAYER_CONFIGS[config]
    tl, ours = layer_pair(**cfg)
    bf = cfg.get("batch_first", False)
    x = tokens(rng, B, L, bf)
    attn, padding, causal, real = encoder_masks(rng, mask, B, L, H)
    kw = {"src_mask": attn, "src_key_padding_mask": padding, "is_causal": causal}
    close_real(ours(x, **kw), torch_call(tl, x, general_path=float_masks(attn, padding), **kw),
               real, bf)


@pytest.mark.parametrize("mask", ENCODER_MASKS)
@pytest.mark.parametrize("config", ["default", "norm_first_gelu", "no_bias_batch_first"])
@pytest.mark.parametrize("with_norm", [False, True])
def test_encoder_matches_torch(rng, config, mask, with_norm):
    cfg = LAYER_CONFIGS[config]
    bias = cfg.get("bias", True)
    torch.manual_seed(1)
    with warnings.catch_warnings():          # torch's nested-tensor notice
        warnings.simplefilter("ignore")
        tl = torch.nn.TransformerEncoderLayer(E, H, FF, **cfg)
        te = torch.nn.TransformerEncoder(
            tl, 2, norm=torch.nn.LayerNorm(E, bias=bias) if with_norm else None).eval()
    randomise_biases(te)
    layer = nn.TransformerEncoderLayer(E, H, FF, **cfg)
    ours = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(E, bias=bias) if with_norm else None)
    ours.load_state_dict(te.state_dict())
    ours.eval()
    bf = cfg.get("batch_first", False)
    x = tokens(rng, B, L, bf)
    attn, padding, causal, real = encoder_masks(rng, mask, B, L, H)
    kw = {"mask": attn, "src_key_padding_mask": padding, "is_causal": causal or None}
    close_real(ours(x, **kw), torch_call(te, x, general_path=float_masks(attn, padding), **kw),
               real, bf)


@pytest.mark.parametrize("argument, shape", [("src_key_padding_mask", (B, L)),
                                             ("src_mask", (L, L))])
def test_torch_encoder_fast_path_reads_float_masks_as_bool(rng, argument, shape):
    """Why the float-mask cases above compare with torch's general path:
    its encoder fast path treats 0.5 as -inf; the compat layer adds 0.5,
    as torch's documentation, general path and nn.MultiheadAttention do."""
    tl, ours = layer_pair(batch_first=True)
    x = tokens(rng, B, L, True)
    half = np.zeros(shape, np.float32)
    half[1, 1] = 0.5
    hidden = np.where(half > 0, -np.inf, 0.0).astype(np.float32)
    fast = torch_call(tl, x, **{argument: half})
    np.testing.assert_array_equal(fast, torch_call(tl, x, **{argument: hidden}))
    general = torch_call(tl, x, general_path=True, **{argument: half})
    close(ours(x, **{argument: half}), general)
    assert np.max(np.abs(fast - general)) > 1e-2


def test_causal_mask_detection():
    from tileattn.compat._torch_masks import is_causal_mask
    assert is_causal_mask(causal_mask(4, 4), 4)
    assert is_causal_mask(causal_mask(4, 4, "float"), 4)
    assert not is_causal_mask(causal_mask(4, 4), 5)
    assert not is_causal_mask(~causal_mask(4, 4), 4)
    assert not is_causal_mask(causal_mask(4, 4, "float") * 2 + 1, 4)
    assert not is_causal_mask(None, 4)


def test_encoder_state_dict_has_torch_names():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        te = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(E, H, FF), 2,
                                         norm=torch.nn.LayerNorm(E))
    ours = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, FF), 2, norm=nn.LayerNorm(E))
    ours.load_state_dict(te.state_dict())
    sd = ours.state_dict()
    want = te.state_dict()
    assert list(sd) == list(want)
    for name, value in sd.items():
        np.testing.assert_array_equal(value, want[name].numpy())


def test_encoder_layer_unbatched_and_activation_function(rng):
    tl, _ = layer_pair(activation="gelu")
    ours = nn.TransformerEncoderLayer(E, H, FF, activation=torch.nn.functional.gelu).eval()
    ours.load_state_dict(tl.state_dict())
    x = rng.standard_normal((L, E)).astype(np.float32)
    padding = padding_mask(rng, 1, L, "bool")[0]
    close(ours(x), torch_call(tl, x))
    close(ours(x, src_key_padding_mask=padding)[~padding],
          torch_call(tl, x, src_key_padding_mask=padding)[~padding])


def test_training_mode_applies_dropout(rng):
    """Modules start in training mode, as PyTorch's: dropout applies until
    eval(), and eval() gives torch's eval output."""
    tl, ours = layer_pair()
    ours.train()
    x = tokens(rng, B, L, False)
    trained = ours(x)
    ours.eval()
    close(ours(x), torch_call(tl, x))
    assert np.max(np.abs(trained - ours(x))) > 1e-2


# -- scaled_dot_product_attention ------------------------------------------------------
SDPA_SHAPES = {
    # name: (q shape, k shape, v shape, enable_gqa)
    "4d": ((2, 4, 5, 8), (2, 4, 7, 8), (2, 4, 7, 6), False),
    "3d": ((4, 5, 8), (4, 7, 8), (4, 7, 8), False),
    "2d": ((5, 8), (7, 8), (7, 3), False),
    "5d": ((2, 3, 2, 5, 8), (2, 3, 2, 7, 8), (2, 3, 2, 7, 8), False),
    "gqa": ((2, 6, 5, 8), (2, 2, 7, 8), (2, 2, 7, 8), True),
    "mqa_broadcast": ((2, 4, 5, 8), (2, 1, 7, 8), (2, 1, 7, 8), False),
    "batch_broadcast": ((2, 4, 5, 8), (1, 4, 7, 8), (1, 4, 7, 8), False),
}
SDPA_MASKS = ["none", "bool_2d", "float_2d", "bool_full", "float_heads", "causal", "scale"]


@pytest.mark.parametrize("mask", SDPA_MASKS)
@pytest.mark.parametrize("shapes", list(SDPA_SHAPES))
def test_sdpa_matches_torch(rng, shapes, mask):
    qs, ks, vs, gqa = SDPA_SHAPES[shapes]
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in (qs, ks, vs))
    lq, lk = qs[-2], ks[-2]
    out_lead = qs[:-2]
    kw = {"enable_gqa": gqa}
    if mask == "causal":
        kw["is_causal"] = True
    elif mask == "scale":
        kw["scale"] = 0.3
    elif mask != "none":
        lead = {"2d": (), "full": out_lead, "heads": out_lead[-1:]}[mask.split("_")[1]]
        ignore = attention_mask(rng, lead, lq, lk, mask.split("_")[0])
        kw["attn_mask"] = ~ignore if ignore.dtype == bool else ignore   # True = take part
    close(nn.scaled_dot_product_attention(q, k, v, **kw),
          torch_call(torch.nn.functional.scaled_dot_product_attention, q, k, v, **kw))


@pytest.mark.parametrize("lq, lk", [(3, 8), (8, 3), (5, 5)])
def test_sdpa_causal_is_top_left(rng, lq, lk):
    """PyTorch's is_causal: query i sees keys 0..i, whatever Lq and Lk."""
    q, k, v = (rng.standard_normal((2, 3, n, 8)).astype(np.float32) for n in (lq, lk, lk))
    got = nn.scaled_dot_product_attention(q, k, v, is_causal=True)
    close(got, torch_call(torch.nn.functional.scaled_dot_product_attention, q, k, v,
                          is_causal=True))
    if lq != lk:                      # tileattn's own default aligns bottom-right
        native = tileattn.scaled_dot_product_attention(q, k, v, is_causal=True)
        assert np.max(np.abs(native - got)) > 1e-2


def test_sdpa_errors_as_torch(rng):
    q = rng.standard_normal((2, 4, 5, 8)).astype(np.float32)
    kv = rng.standard_normal((2, 2, 7, 8)).astype(np.float32)
    with pytest.raises(tileattn.ShapeError, match="enable_gqa"):
        nn.scaled_dot_product_attention(q, kv, kv)
    with pytest.raises(RuntimeError):
        torch_call(torch.nn.functional.scaled_dot_product_attention, q, kv, kv)
    odd = rng.standard_normal((2, 3, 7, 8)).astype(np.float32)
    with pytest.raises(tileattn.ShapeError, match="divide"):
        nn.scaled_dot_product_attention(q, odd, odd, enable_gqa=True)
    k = rng.standard_normal((2, 4, 7, 8)).astype(np.float32)
    with pytest.raises(tileattn.InvalidParameterError, match="attn_mask"):
        nn.scaled_dot_product_attention(q, k, k, attn_mask=np.ones((5, 7), bool), is_causal=True)
    with pytest.raises(tileattn.ShapeError, match="attn_mask"):
        nn.scaled_dot_product_attention(q, k, k, attn_mask=np.ones((5, 6), bool))


def test_sdpa_fully_masked_row_gives_zeros_as_torch(rng):
    """torch 2.13's F.scaled_dot_product_attention gives zeros too."""
    q, k, v = (rng.standard_normal((1, 2, n, 8)).astype(np.float32) for n in (4, 6, 6))
    take_part = np.ones((4, 6), bool)
    take_part[2] = False
    want = torch_call(torch.nn.functional.scaled_dot_product_attention, q, k, v,
                      attn_mask=take_part)
    got = nn.scaled_dot_product_attention(q, k, v, attn_mask=take_part)
    np.testing.assert_array_equal(want[:, :, 2], 0.0)
    np.testing.assert_array_equal(got[:, :, 2], 0.0)
    close(got, want)


# -- torch stays optional ---------------------------------------------------------------
def test_imports_and_runs_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "from tileattn.compat import pytorch as nn\n"
        "m = nn.MultiheadAttention(8, 2, add_zero_attn=True)\n"
        "x = np.ones((3, 2, 8), np.float32)\n"
        "y, w = m(x, x, x)\n"
        "enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dtype='float64'), 2)\n"
        "assert enc(x).dtype == np.float32 and y.shape == (3, 2, 8) and w.shape == (2, 3, 4)\n"
        "assert sys.modules['torch'] is None\n"
        "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
