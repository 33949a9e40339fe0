"""Request bodies to lists of texts, or a RequestError that names the field.

Two shapes: the service's own ``{"texts": [...]}`` / ``{"text": "..."}`` and
OpenAI's embeddings request ``{"input": ..., "model": ..., "encoding_format":
...}``. JSON that Python's parser cannot take safely (nesting past its
recursion limit, integers of thousands of digits) is a 400 like any other
malformed body, never an exception escaping to the server.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, List

from .limits import Limits, RequestError


def json_object(body: bytes) -> Dict[str, Any]:
    """The body as a JSON object (400 for anything else)."""
    try:
        payload = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise RequestError(400, "body: expected UTF-8 encoded JSON") from None
    except json.JSONDecodeError as e:
        raise RequestError(400, f"body: malformed JSON ({e.msg} at line {e.lineno} "
                                f"column {e.colno})") from None
    except RecursionError:
        raise RequestError(400, "body: JSON nested too deeply") from None
    except ValueError as e:       # e.g. an integer past Python's digit limit
        raise RequestError(400, f"body: JSON value refused ({e})") from None
    if not isinstance(payload, dict):
        raise RequestError(400, "body: expected a JSON object, got "
                                f"{_json_type(payload)}")
    return payload


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def check_texts(texts: List[Any], field: str, limits: Limits) -> List[str]:
    """Each item a non-blank string of valid Unicode within max_chars; at most
    max_texts of them."""
    if not texts:
        raise RequestError(400, f"{field}: expected at least one text, got an empty list", field)
    if len(texts) > limits.max_texts:
        raise RequestError(413, f"{field}: at most {limits.max_texts} texts per request "
                                f"(max_texts), got {len(texts)}", field)
    for i, t in enumerate(texts):
        name = f"{field}[{i}]"
        if not isinstance(t, str):
            raise RequestError(400, f"{name}: expected a string, got {_json_type(t)}", field)
        if len(t) > limits.max_chars:
            raise RequestError(413, f"{name}: at most {limits.max_chars} characters "
                                    f"(max_chars), got {len(t)}", field)
        if not t.strip():
            raise RequestError(400, f"{name}: expected a non-empty text", field)
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as e:     # JSON "\ud800": a lone surrogate
            raise RequestError(400, f"{name}: not valid Unicode (lone surrogate "
                                    f"{t[e.start]!r} at character {e.start})", field) from None
    return texts


def embed_request(body: bytes, limits: Limits) -> List[str]:
    """``{"texts": [str, ...]}`` or ``{"text": str}``: the texts."""
    payload = json_object(body)
    if len(payload) != 1 or not set(payload) <= {"texts", "text"}:
        raise RequestError(400, "body: expected exactly one of the keys 'texts' (a list of "
                                f"strings) or 'text' (a string), got keys {sorted(payload)}")
    if "text" in payload:
        if not isinstance(payload["text"], str):
            raise RequestError(400, f"text: expected a string, got {_json_type(payload['text'])}")
        return check_texts([payload["text"]], "text", limits)
    if not isinstance(payload["texts"], list):
        raise RequestError(400, "texts: expected a list of strings, got "
                                f"{_json_type(payload['texts'])}")
    return check_texts(payload["texts"], "texts", limits)


ENCODING_FORMATS = ("float", "base64")


@dataclass(frozen=True)
class OpenAIRequest:
    texts: List[str]
    encoding_format: str      # "float" or "base64"


def openai_request(body: bytes, limits: Limits, dim: int) -> OpenAIRequest:
    """OpenAI's ``POST /v1/embeddings`` body. ``model`` may be any name (one
    model is served; the response names it), ``dimensions`` must be the
    model's, ``user`` is accepted and ignored; token-id arrays are refused."""
    payload = json_object(body)
    unknown = sorted(set(payload) - {"input", "model", "encoding_format", "dimensions", "user"})
    if unknown:
        raise RequestError(400, f"body: unknown field(s) {unknown}", unknown[0])
    if "input" not in payload:
        raise RequestError(400, "input: required (a string or a list of strings)", "input")
    for name in ("model", "user"):
        if name in payload and not isinstance(payload[name], str):
            raise RequestError(400, f"{name}: expected a string, got "
                                    f"{_json_type(payload[name])}", name)
    fmt = payload.get("encoding_format", "float")
    if fmt not in ENCODING_FORMATS:
        raise RequestError(400, f"encoding_format: expected one of {list(ENCODING_FORMATS)}, "
                                f"got {fmt!r}", "encoding_format")
    dims = payload.get("dimensions", dim)
    if dims != dim or isinstance(dims, bool):
        raise RequestError(422, f"dimensions: this model gives {dim}-dimensional embeddings, "
                                f"got {dims!r}", "dimensions")
    raw = payload["input"]
    texts = [raw] if isinstance(raw, str) else raw
    if not isinstance(texts, list):
        raise RequestError(400, f"input: expected a string or a list of strings, got "
                                f"{_json_type(raw)}", "input")
    if texts and all(isinstance(t, int) for t in texts) or \
            any(isinstance(t, list) for t in texts):
        raise RequestError(422, "input: token-id arrays are not accepted; send the texts",
                           "input")
    return OpenAIRequest(check_texts(texts, "input", limits), fmt)
