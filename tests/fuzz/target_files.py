"""Fuzz target: tileattn.load on damaged and crafted files. A module is
saved (.npz or .safetensors), then its bytes are mutated (bit flips,
truncation, edits of the archive and array headers, crafted metadata); the
load must either give a module whose arrays are exactly the file's (as an
independent reader sees them) or raise tileattn.FileFormatError naming the
file. Any other error, a crash or a hang fails the target."""

from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile

import numpy as np
import tileattn
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

from .harness import Fail, start_case

META = "__tileattn__"

MODULES = {
    "linear": lambda: tileattn.Linear(3, 4, rng=np.random.default_rng(0)),
    "norm": lambda: tileattn.LayerNorm(5, dtype=np.float64),
    "mha": lambda: tileattn.MultiHeadAttention(8, 2, num_kv_heads=1, seed=1),
    "lstm": lambda: tileattn.LSTM(3, 2, num_layers=2, seed=2),
    "encoder": lambda: tileattn.TransformerEncoder(
        tileattn.TransformerEncoderLayer(4, 2, 8, seed=3), 2),
}

CRAFTED = [
    {"embed_dim": 4096}, {"embed_dim": 10**13, "num_heads": 1}, {"num_layers": 10**9},
    {"hidden_size": 10**6}, {"in_features": -3}, {"in_features": 1.5}, {"bogus": 1},
    {"dtype": "int8"}, {"dtype": ["float32"]}, {"seed": 10**30}, {"layer": {"d_model": 10**7}},
    {"normalized_shape": "5"}, {"layer": [[[[]]]]}, {"num_layers": None},
]

MUTATIONS = ["none", "flip", "flip", "truncate", "header", "crafted", "meta_json", "meta_deep",
             "class", "extra_array", "drop_array", "dtype"]


@st.composite
def file_cases(draw):
    return {
        "module": draw(st.sampled_from(sorted(MODULES))),
        "fmt": draw(st.sampled_from(["npz", "safetensors"])),
        "mutation": draw(st.sampled_from(MUTATIONS)),
        "where": draw(st.floats(0.0, 1.0)),
        "bit": draw(st.integers(0, 7)),
        "crafted": draw(st.integers(0, len(CRAFTED) - 1)),
        "text": draw(st.text(max_size=20)),
    }


def _npy(a) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.asarray(a), allow_pickle=False)
    return buf.getvalue()


def _rewrite_npz(path, edit):
    with zipfile.ZipFile(path) as z:
        members = {i.filename: z.read(i) for i in z.infolist()}
    members = edit(members)
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)


def _write(path, fmt, arrays, meta):
    if fmt == "npz":
        with open(path, "wb") as f:
            np.savez(f, **{META: np.array(meta)}, **arrays)
    else:
        save_file(arrays, path, metadata={META: meta})


def mutate(c, path, module):
    """Damage the saved file at `path` as the case says."""
    kind, fmt = c["mutation"], c["fmt"]
    arrays = module.state_dict()
    config = {"class": type(module).__name__, "config": module.get_config()}
    if kind in ("flip", "truncate", "header"):
        data = bytearray(open(path, "rb").read())
        # "header": the first 160 bytes (zip local header / .npy header, or
        # the safetensors JSON header), else anywhere.
        span = min(len(data), 160) if kind == "header" else len(data)
        at = min(int(c["where"] * span), len(data) - 1)
        if kind == "truncate":
            data = data[:at]
        else:
            data[at] ^= 1 << c["bit"]
        open(path, "wb").write(bytes(data))
    elif kind == "crafted":
        config["config"] = dict(config["config"], **CRAFTED[c["crafted"]])
        _write(path, fmt, arrays, json.dumps(config))
    elif kind == "meta_json":
        _write(path, fmt, arrays, json.dumps(config)[:int(c["where"] * 50)] + c["text"])
    elif kind == "meta_deep":
        depth = 1 + int(c["where"] * 5000)
        _write(path, fmt, arrays, "[" * depth + "]" * depth)
    elif kind == "class":
        config["class"] = c["text"] or "Module"
        _write(path, fmt, arrays, json.dumps(config))
    elif kind == "extra_array":
        _write(path, fmt, dict(arrays, extra=np.zeros(3, np.float32)), json.dumps(config))
    elif kind == "drop_array":
        arrays.pop(sorted(arrays)[int(c["where"] * (len(arrays) - 1))])
        _write(path, fmt, arrays, json.dumps(config))
    elif kind == "dtype":
        name = sorted(arrays)[0]
        kinds = [np.int8, np.complex64, np.bool_, np.float16]
        arrays[name] = arrays[name].astype(kinds[c["bit"] % len(kinds)])
        if fmt == "npz" and c["bit"] >= 4:   # an .npy of another dtype under the same name
            _rewrite_npz(path, lambda m: dict(m, **{name + ".npy": _npy(
                np.array(["x"] * arrays[name].size))}))
            return
        if fmt == "safetensors" and arrays[name].dtype == np.complex64:
            arrays[name] = arrays[name].real.astype(np.int32)
        _write(path, fmt, arrays, json.dumps(config))


def independent_arrays(path, fmt):
    """The file's arrays as NumPy / safetensors themselves read them (or None)."""
    try:
        if fmt == "npz":
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files if k != META}
        return load_file(path)
    except Exception:
        return None


def target_files(c):
    start_case(c)
    module = MODULES[c["module"]]()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"m.{c['fmt']}")
        tileattn.save(module, path)
        mutate(c, path, module)
        try:
            loaded = tileattn.load(path)
        except tileattn.FileFormatError as e:
            if path not in str(e):
                raise Fail(f"FileFormatError does not name the file: {e}") from e
            if c["mutation"] == "none":
                raise Fail(f"an undamaged file was refused: {e}") from e
            return
        except tileattn.InvalidParameterError as e:
            # A damaged metadata key leaves a weights-only file: documented.
            if "holds no tileattn config" not in str(e) or c["mutation"] == "none":
                raise Fail(f"load raised InvalidParameterError: {e}") from e
            return
        except Exception as e:
            raise Fail(f"load raised {type(e).__name__}, not FileFormatError: {e}") from e
        want = independent_arrays(path, c["fmt"])
        if want is None:
            raise Fail("tileattn loaded a file that NumPy / safetensors cannot read")
        got = loaded.state_dict()
        if set(got) != set(want):
            raise Fail(f"loaded names {sorted(got)} differ from the file's {sorted(want)}")
        for name, a in want.items():
            if not np.array_equal(got[name], a.astype(got[name].dtype), equal_nan=True):
                raise Fail(f"loaded {name} differs from the file's array")
        if c["mutation"] == "none":
            for name, a in module.state_dict().items():
                if not np.array_equal(got[name], a):
                    raise Fail(f"round trip changed {name}")
