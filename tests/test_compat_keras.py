"""tileattn.compat.keras against Keras 3.15 itself (torch backend): the same
weights (set_weights from Keras' get_weights), inputs and masks give the
same outputs and scores to float32 round-off; initializers have Keras'
distributions on the same shapes; the cases where tileattn's own module
silently computed something else now agree with Keras."""

import os
import subprocess
import sys

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")

import tileattn  # noqa: E402
from conftest import close  # noqa: E402
from tileattn.compat import keras as tk  # noqa: E402


def to_numpy(x):
    """A torch-backend tensor as NumPy (not through keras.ops.convert_to_numpy,
    whose np.array(tensor) warns under NumPy 2)."""
    return x.detach().cpu().numpy()


def twins(keras_cls, ours_cls, kwargs, shapes, rng):
    """A Keras layer built for `shapes` (query, value, key) with random
    weights (biases included), and our layer loaded with its get_weights()."""
    theirs = keras_cls(**kwargs)
    theirs.build(*shapes)
    theirs.set_weights([rng.standard_normal(w.shape).astype(np.float32) * 0.3
                        for w in theirs.get_weights()])
    ours = ours_cls(**kwargs)
    ours.build(*shapes)
    ours.set_weights(theirs.get_weights())
    return theirs, ours


def assert_same(theirs, ours, query, value, key=None, **call):
    """The same call on both layers gives the same output (and scores)."""
    got = ours(query, value, key, **call)
    want = theirs(query, value, key, **call)
    if call.get("return_attention_scores"):
        assert len(got) == len(want) == 2
        for g, w in zip(got, want):
            close(g, to_numpy(w), np.float32)
    else:
        close(got, to_numpy(want), np.float32)


def normal(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def mask_bsts(rng, b, t, s, dtype=bool):
    """A random (B, T, S) mask in which every query row sees key 0 and the key
    at its own position (no row fully hidden under causal or a window)."""
    m = rng.random((b, t, s)) < 0.6
    m[..., 0] = True
    i = np.arange(t)
    m[:, i, np.minimum(i, s - 1)] = True
    return m.astype(dtype)


MHA_CONFIGS = {
    "basic": dict(num_heads=2, key_dim=8),
    "value_dim": dict(num_heads=3, key_dim=4, value_dim=6),
    "no_bias": dict(num_heads=2, key_dim=8, use_bias=False),
    "output_int": dict(num_heads=2, key_dim=8, output_shape=12),
    "output_tuple": dict(num_heads=2, key_dim=8, output_shape=(3, 4)),
    "gate": dict(num_heads=2, key_dim=4, value_dim=6, use_gate=True),
    "gate_no_bias": dict(num_heads=2, key_dim=4, use_gate=True, use_bias=False),
    "window": dict(num_heads=2, key_dim=8, sliding_window=3),
}
MASKS = ["none", "bool", "int", "causal", "causal_and_bool"]


def mask_call(kind, rng, b, t, s):
    if kind == "none":
        return {}
    if kind == "causal":
        return {"use_causal_mask": True}
    m = mask_bsts(rng, b, t, s, np.int32 if kind == "int" else bool)
    return {"attention_mask": m, "use_causal_mask": kind == "causal_and_bool"}


@pytest.mark.parametrize("scores", [False, True])
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("config", sorted(MHA_CONFIGS))
def test_mha_matches_keras(rng, config, mask, scores):
    """Cross-attention with separate key and value, T = 5 < S = 9 (causal
    then top-left), and self-attention, T = S = 7."""
    kwargs = MHA_CONFIGS[config]
    b, t, s = 2, 5, 9
    query, value, key = normal(rng, b, t, 10), normal(rng, b, s, 6), normal(rng, b, s, 7)
    theirs, ours = twins(keras.layers.MultiHeadAttention, tk.MultiHeadAttention, kwargs,
                         ((b, t, 10), (b, s, 6), (b, s, 7)), rng)
    assert_same(theirs, ours, query, value, key, return_attention_scores=scores,
                **mask_call(mask, rng, b, t, s))
    x = normal(rng, b, 7, 10)
    theirs, ours = twins(keras.layers.MultiHeadAttention, tk.MultiHeadAttention, kwargs,
                         ((b, 7, 10), (b, 7, 10)), rng)
    assert_same(theirs, ours, x, x, return_attention_scores=scores,
                **mask_call(mask, rng, b, 7, 7))


@pytest.mark.parametrize("scores", [False, True])
@pytest.mark.parametrize("axes, mask_shape", [
    ((2,), (2, 3, 5, 6)),          # (B, X, T, S): per non-attended index
    ((2,), (2, 5, 6)),             # (B, T, S): broadcast over X
    ((1, 2), (2, 4, 5, 3, 6)),     # (B, T1, T2, S1, S2)
    ((-3, -2), None),
])
def test_mha_attention_axes_match_keras(rng, axes, mask_shape, scores):
    b = 2
    q_shape = (b, 3, 5, 8) if axes == (2,) else (b, 4, 5, 8)
    kv_shape = (b, 3, 6, 8) if axes == (2,) else (b, 3, 6, 8)
    kwargs = dict(num_heads=2, key_dim=4, attention_axes=axes, output_shape=(2, 5))
    theirs, ours = twins(keras.layers.MultiHeadAttention, tk.MultiHeadAttention, kwargs,
                         (q_shape, kv_shape), rng)
    query, value = normal(rng, *q_shape), normal(rng, *kv_shape)
    call = {"return_attention_scores": scores}
    if mask_shape is not None:
        m = rng.random(mask_shape) < 0.6
        m[..., 0] = True
        call["attention_mask"] = m
    assert_same(theirs, ours, query, value, **call)


GQA_CONFIGS = {
    "mqa": dict(head_dim=8, num_query_heads=4, num_key_value_heads=1),
    "gqa": dict(head_dim=8, num_query_heads=4, num_key_value_heads=2),
    "mha": dict(head_dim=8, num_query_heads=4, num_key_value_heads=4),
    "no_bias": dict(head_dim=6, num_query_heads=4, num_key_value_heads=2, use_bias=False),
    "window": dict(head_dim=8, num_query_heads=4, num_key_value_heads=2, sliding_window=4),
    "gate": dict(head_dim=8, num_query_heads=4, num_key_value_heads=2, use_gate=True),
}


@pytest.mark.parametrize("scores", [False, True])
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("config", sorted(GQA_CONFIGS))
def test_gqa_matches_keras(rng, config, mask, scores):
    b, t, s = 3, 6, 8
    query, value, key = normal(rng, b, t, 12), normal(rng, b, s, 5), normal(rng, b, s, 9)
    theirs, ours = twins(keras.layers.GroupQueryAttention, tk.GroupQueryAttention,
                         GQA_CONFIGS[config], ((b, t, 12), (b, s, 5), (b, s, 9)), rng)
    assert_same(theirs, ours, query, value, key, return_attention_scores=scores,
                **mask_call(mask, rng, b, t, s))


@pytest.mark.parametrize("cls", ["MultiHeadAttention", "GroupQueryAttention"])
def test_value_and_key_masks_match_keras(rng, cls):
    kwargs = (dict(num_heads=2, key_dim=4) if cls == "MultiHeadAttention"
              else dict(head_dim=4, num_query_heads=2, num_key_value_heads=1))
    b, t, s = 2, 4, 7
    query, value, key = normal(rng, b, t, 8), normal(rng, b, s, 8), normal(rng, b, s, 8)
    theirs, ours = twins(getattr(keras.layers, cls), getattr(tk, cls), kwargs,
                         ((b, t, 8), (b, s, 8), (b, s, 8)), rng)
    vm = np.ones((b, s), bool)
    vm[0, 5:] = False
    km = np.ones((b, s), np.int64)
    km[1, 2] = 0
    assert_same(theirs, ours, query, value, key, value_mask=vm, key_mask=km,
                attention_mask=mask_bsts(rng, b, t, s), return_attention_scores=True)


def test_silent_differences_are_gone(rng):
    """What tileattn's own MultiHeadAttention computed differently from
    Keras, now equal to Keras; each case is shown to be live (the naive
    reading gives another result)."""
    b = heads = 2
    t, s = 4, 6
    kwargs = dict(num_heads=heads, key_dim=4)
    query, value = normal(rng, b, t, 8), normal(rng, b, s, 8)
    theirs, ours = twins(keras.layers.MultiHeadAttention, tk.MultiHeadAttention, kwargs,
                         ((b, t, 8), (b, s, 8)), rng)
    naive = tileattn.MultiHeadAttention(8, heads, head_dim=4)
    naive.load_state_dict(tileattn.keras_state_dict(theirs.get_weights()))
    want = to_numpy(theirs(query, value, use_causal_mask=True))

    # Causal with T != S: top-left, not bottom-right.
    close(ours(query, value, use_causal_mask=True), want, np.float32)
    assert np.abs(naive(query, value, value, is_causal=True) - want).max() > 1e-2

    # A (B, T, S) mask with B == heads: per batch item, not per head.
    m = mask_bsts(rng, b, t, s)
    m[0, :, 1:] = False                    # item 0 sees key 0 only, item 1 more
    want = to_numpy(theirs(query, value, attention_mask=m))
    close(ours(query, value, attention_mask=m), want, np.float32)
    with pytest.raises(tileattn.ShapeError, match="ambiguous"):
        naive(query, value, value, attn_mask=m)      # tileattn's own layer refuses to guess

    # An int 0/1 mask reads as the bool mask.
    close(ours(query, value, attention_mask=m.astype(np.int8)), want, np.float32)


def test_other_head_split_refused(rng):
    """Keras weights of 2 heads of 8 into a 4-head layer of 4: refused with
    a ShapeError naming the argument, and the layer's weights unchanged."""
    theirs = keras.layers.MultiHeadAttention(num_heads=2, key_dim=8)
    theirs.build((1, 5, 16), (1, 5, 16))
    ours = tk.MultiHeadAttention(num_heads=4, key_dim=4, seed=0)
    ours.build((1, 5, 16), (1, 5, 16))
    before = ours.get_weights()
    with pytest.raises(tileattn.ShapeError, match=r"weights\[0\] \(query/kernel\).*num_heads=4"):
        ours.set_weights(theirs.get_weights())
    for a, b in zip(before, ours.get_weights()):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(tileattn.InvalidParameterError, match="weights: expected 8 arrays"):
        ours.set_weights(theirs.get_weights()[:6])


VARIANCE_SCALING = ["glorot_uniform", "glorot_normal", "he_uniform", "he_normal",
                    "lecun_uniform", "lecun_normal"]
RANDOM = ["random_normal", "random_uniform", "truncated_normal"]


def assert_same_distribution(got, want, name, rel=0.04):
    """Mean, standard deviation and (for bounded distributions) extent of two
    samples of one shape agree within sampling error (16k values: the std to
    ~1%; a wrong fan moves it by a factor of 2 or more)."""
    assert got.shape == want.shape
    std = float(want.std())
    assert abs(float(got.mean())) < 5 * std / np.sqrt(got.size)
    assert float(got.std()) == pytest.approx(std, rel=rel)
    if "uniform" in name or "glorot_normal" in name or name.endswith(
            ("he_normal", "lecun_normal", "truncated_normal")):
        # uniform: the limit; truncated normal: two standard deviations
        assert float(np.abs(got).max()) == pytest.approx(float(np.abs(want).max()), rel=0.05)


@pytest.mark.parametrize("name", VARIANCE_SCALING + RANDOM)
def test_initializers_match_keras(name):
    """Ours, on the layer's kernels, against Keras' initializer (seeded) on
    the same shapes: the input kernels (E, H, D) and the output kernel
    (H, Dv, out), whose fans Keras computes as convolutions'."""
    layer = tk.MultiHeadAttention(num_heads=8, key_dim=32, kernel_initializer=name,
                                  bias_initializer=name, seed=1)
    layer.build((1, 2, 64), (1, 2, 48))
    weights = layer.get_weights()
    init = keras.initializers.get(name)
    init = type(init).from_config({**init.get_config(), "seed": 0})
    for i in (0, 4, 6):     # query kernel (64, 8, 32), value (48, 8, 32), output (8, 32, 64)
        assert_same_distribution(weights[i], to_numpy(init(weights[i].shape)), name)
    if name in RANDOM:      # a bias initializer has Keras' parameters too (832 values)
        bias = np.concatenate([w.ravel() for w in weights[1::2]])
        assert_same_distribution(bias, to_numpy(init(bias.shape)), name, rel=0.1)


def test_initializer_forms():
    """Names in both spellings, serialised initializers and callables; the
    seed makes the draw reproducible."""
    def build(**kw):
        layer = tk.MultiHeadAttention(num_heads=2, key_dim=4, seed=3, **kw)
        layer.build((1, 3, 8), (1, 3, 8))
        return layer.get_weights()
    a, b = build(kernel_initializer="GlorotUniform"), build(kernel_initializer="glorot_uniform")
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    ones = build(kernel_initializer=keras.initializers.serialize(keras.initializers.Ones()),
                 bias_initializer=lambda shape, dtype=None: np.full(shape, 2.0))
    assert all((w == 1).all() for w in ones[0::2]) and all((w == 2).all() for w in ones[1::2])
    keras_obj = build(kernel_initializer=keras.initializers.Constant(0.5))
    assert (keras_obj[0] == 0.5).all()
    with pytest.raises(tileattn.InvalidParameterError, match="kernel_initializer: unknown"):
        tk.MultiHeadAttention(num_heads=2, key_dim=4, kernel_initializer="glorot_sideways")


def test_from_keras_config_and_lazy_build(rng):
    """A Keras layer's get_config() builds ours; weights come at the first call."""
    theirs = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4, value_dim=3,
                                             output_shape=(2, 3), use_bias=False)
    x = normal(rng, 2, 5, 8)
    theirs(x, x)
    ours = tk.MultiHeadAttention.from_config(theirs.get_config())
    assert not ours.built
    with pytest.raises(tileattn.InvalidParameterError, match="not built"):
        ours.set_weights(theirs.get_weights())
    ours.build((None, None, 8), (None, None, 8))
    ours.set_weights(theirs.get_weights())
    close(ours(x, x), to_numpy(theirs(x, x)), np.float32)
    lazy = tk.GroupQueryAttention(head_dim=4, num_query_heads=2, num_key_value_heads=1)
    assert lazy(x, x).shape == (2, 5, 8) and lazy.built


def test_failed_first_call_leaves_layer_unbuilt(rng):
    layer = tk.MultiHeadAttention(num_heads=2, key_dim=4)
    x = normal(rng, 2, 5, 8)
    with pytest.raises(tileattn.ShapeError, match="attention_mask"):
        layer(x, x, attention_mask=np.ones((2, 5, 4), bool))
    assert not layer.built
    with pytest.raises(tileattn.InvalidParameterError, match="use_causal_mask"):
        tk.MultiHeadAttention(num_heads=2, key_dim=4, attention_axes=(2,))(
            normal(rng, 2, 3, 5, 8), normal(rng, 2, 3, 5, 8), use_causal_mask=True)


def test_dropout_only_in_training(rng):
    """No random-number parity with Keras: inference equals Keras, training
    drops weights, reproducibly for a seed."""
    kwargs = dict(num_heads=2, key_dim=4, dropout=0.5, seed=7)
    theirs, ours = twins(keras.layers.MultiHeadAttention, tk.MultiHeadAttention, kwargs,
                         ((2, 5, 8), (2, 5, 8)), rng)
    x = normal(rng, 2, 5, 8)
    close(ours(x, x), to_numpy(theirs(x, x)), np.float32)
    again = tk.MultiHeadAttention(**kwargs)
    again.build((2, 5, 8), (2, 5, 8))
    again.set_weights(ours.get_weights())
    y1, y2 = ours(x, x, training=True), again(x, x, training=True)
    np.testing.assert_array_equal(y1, y2)
    assert np.abs(y1 - ours(x, x)).max() > 1e-3


def test_imports_without_keras():
    """The module needs NumPy and tileattn only."""
    code = ("import sys; sys.modules['keras'] = None\n"
            "import numpy as np\n"
            "from tileattn.compat import keras as tk\n"
            "x = np.ones((1, 3, 4), np.float32)\n"
            "assert tk.MultiHeadAttention(2, 2)(x, x).shape == (1, 3, 4)\n")
    subprocess.run([sys.executable, "-c", code], check=True, env=os.environ.copy())


def test_arguments_checked_with_their_names():
    with pytest.raises(tileattn.InvalidParameterError, match=r"unknown arguments \['output_shape'\]"):
        tk.GroupQueryAttention(8, 4, 2, output_shape=16)
    with pytest.raises(tileattn.InvalidParameterError, match="num_query_heads .3. must be divisible"):
        tk.GroupQueryAttention(8, 3, 2)
    with pytest.raises(tileattn.InvalidParameterError, match="sliding_window"):
        tk.MultiHeadAttention(2, 4, sliding_window=0)
    with pytest.raises(tileattn.InvalidParameterError, match="attention_axes: .*increasing"):
        tk.MultiHeadAttention(2, 4, attention_axes=(2, 1)).build((1, 3, 4, 8), (1, 3, 4, 8))
    with pytest.raises(tileattn.DTypeError, match="attention_mask"):
        x = np.ones((1, 3, 8), np.float32)
        tk.MultiHeadAttention(2, 4)(x, x, attention_mask=np.array([["a"] * 3] * 3))


def test_fully_masked_row_gives_zeros_as_keras_scoring_path(rng):
    """A query row that sees no key: zero attention (the output is the
    output bias), as Keras computes it when it returns the scores."""
    theirs, ours = twins(keras.layers.MultiHeadAttention, tk.MultiHeadAttention,
                         dict(num_heads=2, key_dim=4), ((2, 4, 8), (2, 6, 8)), rng)
    query, value = normal(rng, 2, 4, 8), normal(rng, 2, 6, 8)
    m = mask_bsts(rng, 2, 4, 6)
    m[1, 2] = False
    assert_same(theirs, ours, query, value, attention_mask=m, return_attention_scores=True)
    y, scores = ours(query, value, attention_mask=m, return_attention_scores=True)
    assert (scores[1, :, 2] == 0).all()
    np.testing.assert_array_equal(y[1, 2], ours.get_weights()[-1])
