"""runtime/safetensors_index.py: the byte range of every tensor, read from the header alone,
against the safetensors package's own reading of the same file; bad headers are one-line
ArtifactErrors naming the file."""
import json
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from kiln.artifact import ArtifactError
from kiln.runtime.safetensors_index import read_index

TENSORS = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.arange(5, dtype=np.uint32),
           "c": np.zeros((2, 0), dtype=np.float16), "d": np.arange(7, dtype=np.int8)}


def test_ranges_hold_the_tensors_bytes(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(TENSORS, str(path), metadata={"k": "v"})
    index = read_index(path)
    assert set(index) == set(TENSORS)
    raw = path.read_bytes()
    for name, arr in load_file(str(path)).items():
        e = index[name]
        assert e.shape == arr.shape and e.dtype == arr.dtype.name and e.nbytes == arr.nbytes
        assert raw[e.start:e.start + e.nbytes] == arr.tobytes()


def _file(tmp_path, header: dict, data: bytes = b"\0" * 16, length: int | None = None):
    raw = json.dumps(header).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


@pytest.mark.parametrize("header, length, message", [
    ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 1 << 40, "does not fit"),
    ({"x": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}}, None, "outside"),
    ({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, None, "needs 12"),
    ({"x": {"dtype": "Q9", "shape": [3], "data_offsets": [0, 12]}}, None, "malformed"),
    ({"x": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, None, "malformed"),
    ({"x": {"dtype": "F32", "shape": [4]}}, None, "malformed"),
])
def test_bad_headers_name_the_file(tmp_path, header, length, message):
    path = _file(tmp_path, header, length=length)
    with pytest.raises(ArtifactError, match=message) as e:
        read_index(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_not_json_and_too_short(tmp_path):
    p = tmp_path / "t.safetensors"
    p.write_bytes(b"\x05\0\0")
    with pytest.raises(ArtifactError, match="too short"):
        read_index(p)
    p.write_bytes(struct.pack("<Q", 5) + b"{nope")
    with pytest.raises(ArtifactError, match="not JSON"):
        read_index(p)
