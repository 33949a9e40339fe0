"""The models behind the service: tileattn's MiniLM (the example's subject)
and the same model on sentence-transformers (PyTorch), the peer the load
test compares it with. Both take a list of texts and give unit-norm float32
rows; the service calls ``embed`` from one worker thread at a time."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Protocol

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sentence_embeddings import load_minilm, model_dir  # noqa: E402

MODEL_NAME = "all-MiniLM-L6-v2"


class Backend(Protocol):
    name: str          # what the responses say computed them
    dim: int           # embedding width
    max_length: int    # tokens per text the model takes (longer ones it truncates)

    def embed(self, texts: List[str]) -> np.ndarray:
        """(len(texts), dim) float32, each row the text's unit-norm embedding."""
        ...


class TileattnBackend:
    """MiniLM on tileattn. A text's embedding has the same bits alone and in
    any batch (the encoder's rows are batch independent), so the service may
    coalesce requests and still answer each with a direct call's bits."""

    name = MODEL_NAME

    def __init__(self, compute_dtype: Optional[str] = None) -> None:
        """compute_dtype "bfloat16": the encoder's products on bf16 operands
        (``--precision bf16``)."""
        self.model = load_minilm(compute_dtype=compute_dtype)
        self.dim = self.model.dim
        self.max_length = self.model.max_length

    def embed(self, texts: List[str]) -> np.ndarray:
        return self.model.embed(texts)


class SentenceTransformersBackend:
    """The same model on sentence-transformers (PyTorch, float32, CPU)."""

    name = MODEL_NAME

    def __init__(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import sentence_transformers

            model: Any = sentence_transformers.SentenceTransformer(str(model_dir()),
                                                                     device="cpu")
        self.model = model
        self.dim = int(model.get_embedding_dimension() if hasattr(model, "get_embedding_dimension")
                       else model.get_sentence_embedding_dimension())
        self.max_length = int(model.max_seq_length)

    def embed(self, texts: List[str]) -> np.ndarray:
        out = self.model.encode(texts, batch_size=len(texts), convert_to_numpy=True,
                                normalize_embeddings=True)
        return np.ascontiguousarray(out, dtype=np.float32)


BACKENDS: Dict[str, Callable[[], Backend]] = {"tileattn": TileattnBackend, "sentence-transformers": SentenceTransformersBackend}


def make_backend(name: str, precision: str = "fp32") -> Backend:
    """The backend called `name`; precision "bf16" (tileattn only) runs its
    products on bf16 operands."""
    if precision == "bf16":
        if name != "tileattn":
            raise ValueError(f"--precision bf16: only the tileattn backend computes in bf16, "
                             f"not {name}")
        return TileattnBackend("bfloat16")
    return BACKENDS[name]()


class TokenCounter:
    """Tokens per text before any truncation ([CLS] and [SEP] included), with
    the model's own tokenizer: what the service's token limits count."""

    def __init__(self) -> None:
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()

    def __call__(self, texts: List[str]) -> List[int]:
        return [len(e.ids) for e in self._tokenizer.encode_batch(texts)]
