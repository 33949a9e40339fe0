"""tileattn.load on files nobody vouches for: every unreadable, truncated,
corrupt or crafted file raises tileattn.FileFormatError (a ValueError)
naming the file, never the parser's own error; nothing in a file is
executed; and a config that claims more than the file's arrays is refused
before the module is allocated."""

from __future__ import annotations

import io
import json
import pickle
import tracemalloc
import zipfile

import numpy as np
import pytest
from safetensors.numpy import save_file

import tileattn
from tileattn import FileFormatError

META = "__tileattn__"


def small_module():
    return tileattn.MultiHeadAttention(8, 2, seed=3)


def npz_members(path):
    with zipfile.ZipFile(path) as z:
        return {i.filename: z.read(i) for i in z.infolist()}


def write_npz(path, members):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)


def npy_bytes(array):
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.asarray(array), allow_pickle=True)
    return buf.getvalue()


def with_meta(path, meta, fmt="npz"):
    """A copy of a saved small module whose metadata is `meta` (str)."""
    m = small_module()
    if fmt == "npz":
        tileattn.save(m, path)
        members = npz_members(path)
        members[META + ".npy"] = npy_bytes(np.array(meta))
        write_npz(path, members)
    else:
        save_file(m.state_dict(), str(path), metadata={META: meta})
    return path


def config_meta(**config):
    base = small_module().get_config()
    base.update(config)
    return json.dumps({"class": "MultiHeadAttention", "config": base})


def test_round_trips_still_load(tmp_path):
    m = small_module()
    for ext in ("npz", "safetensors"):
        tileattn.save(m, tmp_path / f"m.{ext}")
        back = tileattn.load(tmp_path / f"m.{ext}")
        for (n, a), (n2, b) in zip(m.state_dict().items(), back.state_dict().items()):
            assert n == n2
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("fmt", ["npz", "safetensors"])
def test_a_config_claiming_a_huge_module_is_refused_before_it_is_built(tmp_path, fmt):
    """Bug: a 590-byte .npz claiming embed_dim=4096 made load allocate
    ~450 MB before failing. Now the config is held to the file's arrays."""
    path = with_meta(tmp_path / f"big.{fmt}", config_meta(embed_dim=4096), fmt)
    tracemalloc.start()
    try:
        with pytest.raises(FileFormatError, match="more parameters than") as e:
            tileattn.load(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(path) in str(e.value)
    assert peak < 4 * 2**20, peak


def _truncated(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _garbage(path):
    path.write_bytes(b"not an archive at all" * 10)


def _empty(path):
    path.write_bytes(b"")


@pytest.mark.parametrize("fmt", ["npz", "safetensors"])
@pytest.mark.parametrize("damage", [_truncated, _garbage, _empty])
def test_truncated_or_garbage_files(tmp_path, fmt, damage):
    """Bug: zipfile.BadZipFile, EOFError, SafetensorError escaped."""
    path = tmp_path / f"m.{fmt}"
    tileattn.save(small_module(), path)
    damage(path)
    with pytest.raises(FileFormatError, match="m." + fmt):
        tileattn.load(path)


@pytest.mark.parametrize("fmt", ["npz", "safetensors"])
@pytest.mark.parametrize("meta, what", [
    ("{not json", "not valid JSON"),
    ("[" * 100000 + "]" * 100000, "JSON|nests"),          # RecursionError in json
    ("[" * 40 + "]" * 40, "nests deeper"),
    ('"just a string"', "must be an object"),
    ('{"class": "MultiHeadAttention"}', "must be an object"),
    ('{"class": 5, "config": {}}', "must be an object"),
    ('{"class": "NoSuchModule", "config": {}}', "unknown module class"),
    ('{"class": "MultiHeadAttention", "config": {"embed_dim": 8, "num_heads": 2, '
     '"no_such_keyword": 1}}', "does not build"),          # TypeError
    ('{"class": "MultiHeadAttention", "config": {"embed_dim": -8, "num_heads": 2}}',
     "does not build"),
    ('{"class": "MultiHeadAttention", "config": {"embed_dim": 10000000000000, '
     '"num_heads": 1}}', "more parameters|does not build"),
    ('{"class": "MultiHeadAttention", "config": {"embed_dim": 4, "num_heads": 2}}',
     "do not fit"),                                         # arrays of an 8-wide module
    ('{"class": "TransformerEncoder", "config": {"layer": {"d_model": 8, "nhead": 2}, '
     '"num_layers": 1000000000}}', "more parameters"),
])
def test_crafted_metadata(tmp_path, fmt, meta, what):
    path = with_meta(tmp_path / f"m.{fmt}", meta, fmt)
    with pytest.raises(FileFormatError, match=what) as e:
        tileattn.load(path)
    assert str(path) in str(e.value)


def test_metadata_past_the_size_bound(tmp_path):
    meta = json.dumps({"class": "MultiHeadAttention", "config": {}, "pad": "x" * (2 << 20)})
    path = with_meta(tmp_path / "m.safetensors", meta, "safetensors")
    with pytest.raises(FileFormatError, match="at most"):
        tileattn.load(path)


def test_a_test_module_class_is_not_a_stored_class(tmp_path):
    """Only tileattn's own classes are rebuilt: a subclass defined anywhere
    else (it registers itself by name) is not looked up by a file."""
    class Sneaky(tileattn.Linear):
        pass
    path = with_meta(tmp_path / "m.npz", json.dumps({"class": "Sneaky", "config": {}}))
    with pytest.raises(FileFormatError, match="unknown module class 'Sneaky'"):
        tileattn.load(path)


class _Payload:
    ran = False

    def __reduce__(self):
        return (_mark_ran, ())


def _mark_ran():
    _Payload.ran = True
    return np.zeros(3)


def test_pickled_members_are_never_unpickled(tmp_path):
    path = tmp_path / "m.npz"
    tileattn.save(small_module(), path)
    members = npz_members(path)
    members["q_proj.weight.npy"] = npy_bytes(np.array([_Payload()], dtype=object))
    write_npz(path, members)
    with pytest.raises(FileFormatError, match="Python objects"):
        tileattn.load(path)
    assert not _Payload.ran


def test_array_headers_that_disagree_with_their_bytes(tmp_path):
    """A header claiming 10**12 elements over a few bytes is refused without
    allocating them, as is one claiming fewer bytes than it holds."""
    path = tmp_path / "m.npz"
    tileattn.save(small_module(), path)
    members = npz_members(path)
    raw = members["q_proj.weight.npy"]
    header = raw[:raw.index(b"\n") + 1]
    for claim in ("(1000000, 1000000)", "(8, 7)"):
        forged = header.replace(b"(8, 8)", claim.encode())
        forged = forged[:-1].ljust(len(header) - 1) + b"\n"   # same header length
        members["q_proj.weight.npy"] = forged + raw[len(header):]
        write_npz(path, members)
        with pytest.raises(FileFormatError, match="declares"):
            tileattn.load(path)


def test_a_flipped_data_byte_fails_the_zip_checksum(tmp_path):
    path = tmp_path / "m.npz"
    tileattn.save(small_module(), path)
    data = bytearray(path.read_bytes())
    at = data.index(b"q_proj.weight.npy") + 300   # inside the member's data
    data[at] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(FileFormatError, match="m.npz"):
        tileattn.load(path)


def test_a_missing_file_is_still_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        tileattn.load(tmp_path / "absent.npz")


def test_file_format_error_is_exported_and_a_value_error():
    assert issubclass(tileattn.FileFormatError, ValueError)
    assert "FileFormatError" in tileattn.__all__
