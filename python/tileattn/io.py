"""Saving and loading modules (.npz, .safetensors) and Keras weight import."""

from __future__ import annotations

import json
import math
import os
import zipfile
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ._budget import BudgetExceeded, parameter_budget
from ._errors import DTypeError, FileFormatError, InvalidParameterError, ShapeError
from ._validate import shape_str
from ._version import __version__
from .attention import MultiHeadAttention
from .module import MODULE_CLASSES, Module

PathLike = Union[str, "os.PathLike[str]"]
_META_KEY = "__tileattn__"   # npz entry / safetensors metadata key with class + config


def _format(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".npz", ".safetensors"):
        raise InvalidParameterError(
            f"path: expected a file name ending in .npz or .safetensors, got {path!r}")
    return ext[1:]


def _safetensors_numpy() -> Any:
    try:
        import safetensors.numpy as st
    except ImportError:
        raise ImportError("saving or loading .safetensors needs the safetensors package: "
                          "pip install safetensors (or tileattn[safetensors])") from None
    return st


def save(module: Module, path: PathLike) -> None:
    """Write ``module``'s parameters and constructor config to ``path``.

    Parameters
    ----------
    module : Module
    path : str or path-like ending in ``.npz`` (always available) or
        ``.safetensors`` (needs the ``safetensors`` package).

    The arrays are stored under their state-dict names, so other tools (and
    PyTorch via safetensors) can read them; ``tileattn.load`` rebuilds the
    module from the stored config.
    """
    if not isinstance(module, Module):
        raise InvalidParameterError(f"module: expected a tileattn Module, got {type(module).__name__}")
    path = os.fspath(path)
    fmt = _format(path)
    meta = json.dumps({"class": type(module).__name__, "config": module.get_config(),
                       "tileattn_version": __version__})
    arrays = {k: np.ascontiguousarray(v) for k, v in module.state_dict().items()}
    if fmt == "npz":
        with open(path, "wb") as f:   # a file object: numpy would append .npz to a name
            # Any-typed: NumPy's stub lets ** keys collide with allow_pickle.
            savez: Any = np.savez
            savez(f, **{_META_KEY: np.array(meta)}, **arrays)
    else:
        _safetensors_numpy().save_file(arrays, path, metadata={_META_KEY: meta})


# Bounds on what a file may claim before it is believed: the stored metadata
# (class and config, a few hundred bytes in practice) and its nesting (a
# TransformerEncoder's config holds its layer's: depth 3).
MAX_METADATA_BYTES = 1 << 20
MAX_METADATA_DEPTH = 16
# A module may allocate, while it is built from a stored config, at most
# this many times the parameter elements the file holds: a
# TransformerEncoder builds its template layer besides its copies.
_BUILD_BUDGET_FACTOR = 2
# What a reader of the file system raises for a path (not for its
# contents): passed on as it is, not as a FileFormatError.
_PATH_ERRORS = (FileNotFoundError, IsADirectoryError, PermissionError)


def _read(path: str) -> Tuple[Dict[str, np.ndarray], Optional[Dict[str, Any]]]:
    """The file's arrays and its tileattn metadata (None when it has none).
    Anything the file's contents make a parser raise becomes a
    FileFormatError naming the file; nothing in it is ever executed."""
    try:
        if _format(path) == "npz":
            arrays, meta = _read_npz(path)
        else:
            arrays, meta = _read_safetensors(path)
    except (FileFormatError,) + _PATH_ERRORS:
        raise
    except Exception as e:   # zipfile, NumPy's header parser, safetensors, ...
        raise FileFormatError(f"{path!r}: unreadable or corrupt ({type(e).__name__}: "
                              f"{e})") from e
    return arrays, None if meta is None else _parse_metadata(path, meta)


def _read_npz(path: str) -> Tuple[Dict[str, np.ndarray], Optional[str]]:
    """An .npz read member by member: each .npy header is checked against the
    bytes the member holds before its data is read, and no member may hold
    Python objects (they would need unpickling)."""
    arrays: Dict[str, np.ndarray] = {}
    meta: Optional[str] = None
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            name = info.filename[:-4] if info.filename.endswith(".npy") else None
            if name is None or name in arrays:
                raise FileFormatError(f"{path!r}: member {info.filename!r} is not a distinct "
                                      f".npy array")
            with zf.open(info) as f:
                a = _read_npy(path, info, f)
            if name == _META_KEY:
                if a.dtype.kind != "U" or a.shape != ():
                    raise FileFormatError(f"{path!r}: {_META_KEY} is not a string")
                meta = str(a[()])
            else:
                arrays[name] = a
    return arrays, meta


def _read_npy(path: str, info: zipfile.ZipInfo, f: Any) -> np.ndarray:
    fmt = np.lib.format
    version = fmt.read_magic(f)
    if version not in ((1, 0), (2, 0)):
        raise FileFormatError(f"{path!r}: {info.filename}: unsupported .npy version {version}")
    read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
    shape, fortran, dtype = read_header(f)
    if dtype.hasobject:
        raise FileFormatError(f"{path!r}: {info.filename} holds Python objects, which "
                              f"tileattn never unpickles")
    nbytes = math.prod(shape) * dtype.itemsize
    if info.filename == _META_KEY + ".npy" and nbytes > 4 * MAX_METADATA_BYTES:
        raise FileFormatError(f"{path!r}: metadata of {nbytes} bytes, more than the "
                              f"{4 * MAX_METADATA_BYTES} allowed")
    stored = info.file_size - f.tell()
    if nbytes != stored:
        raise FileFormatError(f"{path!r}: {info.filename} declares {shape} {dtype} "
                              f"({nbytes} bytes) but holds {stored} bytes")
    # Read as the data arrives (never allocated from a claimed size): a
    # member's stated size is checked by zipfile only as it is read.
    data = bytearray()
    while len(data) < nbytes:
        chunk = f.read(min(nbytes - len(data), 1 << 24))
        if not chunk:
            raise FileFormatError(f"{path!r}: {info.filename} is truncated")
        data += chunk
    a = np.frombuffer(data, dtype)
    return a.reshape(shape[::-1]).T if fortran else a.reshape(shape)


def _read_safetensors(path: str) -> Tuple[Dict[str, np.ndarray], Optional[str]]:
    """The safetensors library checks the header (its size, and each
    tensor's bytes inside the file) before any tensor is read."""
    _safetensors_numpy()   # the ImportError that says what to install
    from safetensors import safe_open
    with safe_open(path, framework="np") as f:
        meta = (f.metadata() or {}).get(_META_KEY)
        arrays = {name: f.get_tensor(name) for name in f.keys()}
    return arrays, meta


def _depth(value: Any) -> int:
    """How deeply lists and dicts nest in a parsed JSON value (iteratively)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (list, dict)):
            deepest = max(deepest, d)
            if d <= MAX_METADATA_DEPTH:
                stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def _parse_metadata(path: str, text: Any) -> Dict[str, Any]:
    """{"class": str, "config": dict, ...} from the stored JSON, bounded in
    size and nesting before and after parsing."""
    if not isinstance(text, str) or len(text) > MAX_METADATA_BYTES:
        size = len(text) if isinstance(text, str) else type(text).__name__
        raise FileFormatError(f"{path!r}: metadata is not a string of at most "
                              f"{MAX_METADATA_BYTES} characters ({size})")
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise FileFormatError(f"{path!r}: metadata is not valid JSON ({type(e).__name__}: "
                              f"{e})") from None
    if _depth(meta) > MAX_METADATA_DEPTH:
        raise FileFormatError(f"{path!r}: metadata nests deeper than {MAX_METADATA_DEPTH}")
    if not (isinstance(meta, dict) and isinstance(meta.get("class"), str)
            and isinstance(meta.get("config"), dict)):
        raise FileFormatError(f"{path!r}: metadata must be an object with a \"class\" name "
                              f"and a \"config\" object")
    return meta


def _build(path: str, meta: Dict[str, Any], arrays: Mapping[str, np.ndarray]) -> Module:
    """The module the stored config describes, built within a parameter
    budget set by the file's own arrays: a config that claims more
    parameters than the file holds fails before they are allocated."""
    name = meta["class"]
    cls = MODULE_CLASSES.get(name)
    if cls is None or not cls.__module__.startswith("tileattn."):
        raise FileFormatError(f"{path!r}: unknown module class {name!r}")
    held = sum(int(a.size) for a in arrays.values())
    try:
        with parameter_budget(_BUILD_BUDGET_FACTOR * held):
            module: Module = cls(**meta["config"])
    except BudgetExceeded as e:
        raise FileFormatError(f"{path!r}: its config describes a {name} with more "
                              f"parameters than the file's {held} array elements ({e})") from None
    except Exception as e:   # unknown keyword, a bad value, a size no memory holds
        raise FileFormatError(f"{path!r}: its config does not build a {name} "
                              f"({type(e).__name__}: {e})") from None
    try:
        module.load_state_dict(arrays)
    except (InvalidParameterError, ShapeError, DTypeError) as e:
        raise FileFormatError(f"{path!r}: its arrays do not fit the {name} its config "
                              f"describes: {e}") from None
    return module


def load(path: PathLike, module: Optional[Module] = None) -> Module:
    """Read a module written by ``save``.

    Parameters
    ----------
    path : .npz or .safetensors file
    module : Module, optional
        Load the weights into this module (strictly) instead of building a
        new one from the stored config; also works for files that hold only
        weights (e.g. a state dict saved by another tool).

    Returns
    -------
    Module

    Raises
    ------
    FileFormatError
        (a ``ValueError``) naming the file and what is wrong, for any file
        that is unreadable, truncated, corrupt or crafted: a bad archive or
        header, an array whose header disagrees with its bytes, Python
        objects (never unpickled), metadata that is not JSON, larger than
        ``MAX_METADATA_BYTES`` or nested deeper than ``MAX_METADATA_DEPTH``,
        an unknown class or config, a config that describes more
        parameters than the file holds (refused before they are
        allocated: memory stays bounded by the file's own arrays), or
        arrays that do not fit the module the config describes.
    InvalidParameterError, ShapeError, DTypeError
        With ``module``: the file's arrays do not fit that module.
    FileNotFoundError, PermissionError
        The path itself.
    """
    path = os.fspath(path)
    arrays, meta = _read(path)
    if module is not None:
        module.load_state_dict(arrays)
        return module
    if meta is None:
        raise InvalidParameterError(
            f"load: {path!r} holds no tileattn config; pass the module to load into")
    return _build(path, meta, arrays)


# -- Keras --------------------------------------------------------------------
_KERAS_PARTS = ("query", "key", "value", "attention_output")
_OWN_NAMES = {"query": "q_proj", "key": "k_proj", "value": "v_proj",
              "attention_output": "out_proj"}


def _keras_entries(weights: Union[Sequence[Any], Mapping[str, Any]]) -> Dict[Tuple[str, str], Any]:
    """{(part, "kernel"|"bias"): array} from get_weights() order or a mapping
    keyed by Keras variable paths ("mha/query/kernel", "query/kernel:0", ...)."""
    if isinstance(weights, Mapping):
        out = {}
        for name, value in weights.items():
            segs = str(name).split("/")
            part = next((s for s in segs if s in _KERAS_PARTS or s == "output"), None)
            kind = segs[-1].split(":")[0]
            if part is None or kind not in ("kernel", "bias"):
                raise InvalidParameterError(f"keras weights: cannot place variable {name!r}")
            out[("attention_output" if part == "output" else part, kind)] = value
        return out
    if isinstance(weights, (str, bytes, np.ndarray)) or not isinstance(weights, Iterable):
        raise InvalidParameterError(
            f"keras weights: expected layer.get_weights() (a list of arrays) or a mapping of "
            f"Keras variable paths to arrays, got {type(weights).__name__}")
    weights = list(weights)
    if len(weights) not in (4, 8):
        raise InvalidParameterError(
            f"keras weights: expected the 8 arrays of layer.get_weights() (4 without bias), "
            f"got {len(weights)}")
    kinds = ("kernel", "bias") if len(weights) == 8 else ("kernel",)
    keys = [(p, k) for p in _KERAS_PARTS for k in kinds]
    return dict(zip(keys, weights))


_KERAS_AXES = {"kernel": "(in, heads, dim)", "bias": "(heads, dim)"}
_KERAS_OUTPUT_AXES = {"kernel": "(heads, dim, out)", "bias": "(out,)"}


def _expected_keras_shapes(mha: MultiHeadAttention) -> Dict[Tuple[str, str], Tuple[int, ...]]:
    """The shape of each Keras array that fits ``mha``, by (part, kind)."""
    hq, hkv, d, dv = mha.num_heads, mha.num_kv_heads, mha.head_dim, mha.value_dim
    return {("query", "kernel"): (mha.embed_dim, hq, d), ("query", "bias"): (hq, d),
            ("key", "kernel"): (mha.kdim, hkv, d), ("key", "bias"): (hkv, d),
            ("value", "kernel"): (mha.vdim, hkv, dv), ("value", "bias"): (hkv, dv),
            ("attention_output", "kernel"): (hq, dv, mha.output_dim),
            ("attention_output", "bias"): (mha.output_dim,)}


def _keras_shape_fits(part: str, kind: str, got: Tuple[int, ...],
                      want: Tuple[int, ...]) -> bool:
    """Whether a Keras array's shape fits the module's. The output's own axes
    may be several (Keras' ``output_shape`` as a tuple): they fit the
    module's output_dim by their product."""
    if part != "attention_output":
        return got == want
    lead = 2 if kind == "kernel" else 0  # the kernel's (heads, value_dim) first
    return (got[:lead] == want[:lead] and len(got) > lead
            and int(np.prod(got[lead:])) == want[lead])


class KerasStateDict(Dict[str, np.ndarray]):
    """What ``keras_state_dict`` returns: a plain state dict that also keeps
    the shape of the Keras array each entry came from. Flattened, 2 heads of
    8 and 4 heads of 4 are the same matrix; loading checks the heads and
    dims against the module's instead of computing another function."""

    def __init__(self, arrays: Dict[str, np.ndarray],
                 keras_shapes: Dict[Tuple[str, str], Tuple[int, ...]]) -> None:
        super().__init__(arrays)
        self.keras_shapes = keras_shapes

    def check_target(self, module: Module) -> None:
        """ShapeError naming each Keras array whose heads or dims differ from
        ``module``'s (a MultiHeadAttention; other modules check shapes only)."""
        if not isinstance(module, MultiHeadAttention):
            return
        want = _expected_keras_shapes(module)
        bad = [f"{part}/{kind} ({_OWN_NAMES[part]}.{'weight' if kind == 'kernel' else kind}) "
               f"has shape {shape_str(got)}, the module expects {shape_str(want[part, kind])} "
               f"{(_KERAS_OUTPUT_AXES if part == 'attention_output' else _KERAS_AXES)[kind]}"
               for (part, kind), got in self.keras_shapes.items()
               if not _keras_shape_fits(part, kind, got, want[part, kind])]
        if bad:
            raise ShapeError(
                f"keras weights do not fit MultiHeadAttention(embed_dim={module.embed_dim}, "
                f"num_heads={module.num_heads}, num_kv_heads={module.num_kv_heads}, "
                f"head_dim={module.head_dim}, value_dim={module.value_dim}, "
                f"kdim={module.kdim}, vdim={module.vdim}, output_dim={module.output_dim}): "
                + "; ".join(bad))


def keras_state_dict(weights: Union[Sequence[Any], Mapping[str, Any]]) -> KerasStateDict:
    """Keras ``MultiHeadAttention`` weights as a tileattn state dict.

    Keras keeps einsum kernels: query/key/value ``(in, heads, dim)`` with
    biases ``(heads, dim)``, and the output ``(heads, value_dim, out)`` with
    bias ``(out,)``. They become ``(out_features, in_features)`` matrices.

    Parameters
    ----------
    weights : list or mapping
        ``layer.get_weights()`` (query, key, value, output; kernel then bias),
        or a mapping from Keras variable paths (``".../query/kernel"``) to arrays.

    Returns
    -------
    dict for ``MultiHeadAttention.load_state_dict``; build the module with
    ``embed_dim=query features, num_heads, head_dim=key_dim, value_dim,
    kdim=key features, vdim=value features, output_dim``. It remembers the
    Keras shapes: loading it into a module with other heads or dims raises
    ``ShapeError`` naming each array and both shapes (flattened, 2 heads of
    8 would fit a 4-head module's matrices and compute another function).

    Note the call order: Keras calls ``layer(query, value, key)``; tileattn
    calls ``mha(query, key, value)``.

    Examples
    --------
    >>> mha = tileattn.MultiHeadAttention(64, 4, head_dim=16)        # doctest: +SKIP
    >>> mha.load_state_dict(tileattn.keras_state_dict(layer.get_weights()))  # doctest: +SKIP
    """
    sd: Dict[str, np.ndarray] = {}
    shapes: Dict[Tuple[str, str], Tuple[int, ...]] = {}
    for (part, kind), value in _keras_entries(weights).items():
        a = np.asarray(value)
        shapes[part, kind] = a.shape
        own = _OWN_NAMES[part]
        if kind == "kernel":
            if a.ndim != 3:
                raise ShapeError(f"keras weights: {part} kernel: expected 3 axes "
                                 f"{'(heads, dim, out)' if part == 'attention_output' else '(in, heads, dim)'}"
                                 f", got shape {a.shape}")
            mat = a.reshape(-1, a.shape[-1]) if part == "attention_output" else a.reshape(a.shape[0], -1)
            # Keras multiplies x @ kernel; PyTorch layout is the transpose.
            sd[f"{own}.weight"] = np.ascontiguousarray(mat.T)
        else:
            sd[f"{own}.bias"] = np.ascontiguousarray(a.reshape(-1))
    return KerasStateDict(sd, shapes)


def load_keras_weights(module: Module, weights: Union[Sequence[Any], Mapping[str, Any]]) -> Module:
    """``module.load_state_dict(keras_state_dict(weights))``; returns module.
    Weights whose heads or dims differ from the module's raise ``ShapeError``
    and load nothing."""
    module.load_state_dict(keras_state_dict(weights))
    return module


__all__: List[str] = ["save", "load", "keras_state_dict", "load_keras_weights", "KerasStateDict"]
