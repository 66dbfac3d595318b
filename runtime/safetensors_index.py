"""Where each tensor of a safetensors file lies, read from its header alone.

The TVM session reads every weight straight from the file into the memory TVM allocated for
it (one copy, no second buffer and no mapping of the whole file), so it needs the byte range
of each tensor rather than arrays. The header is the file's first 8 bytes (its length,
little-endian) and then that many bytes of JSON: ``name -> {dtype, shape, data_offsets}``,
offsets counted from the end of the header. Everything is checked before anything is read:
a header that does not fit in the file, offsets outside the data, or a byte count that does
not match the shape and dtype raise :class:`kiln.artifact.ArtifactError` naming the file.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

from kiln.artifact import ArtifactError

# safetensors dtype -> (TVM dtype name, bytes per element)
DTYPES = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
    "U64": ("uint64", 8), "U32": ("uint32", 4), "U16": ("uint16", 2), "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}
MAX_HEADER = 100 << 20          # the format's own limit on the JSON header


@dataclass(frozen=True)
class TensorEntry:
    dtype: str                   # TVM's name for it
    shape: tuple[int, ...]
    start: int                   # absolute byte offset in the file
    nbytes: int


def read_index(path) -> dict[str, TensorEntry]:
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ArtifactError(path, "is too short to be a safetensors file")
            n = struct.unpack("<Q", head)[0]
            if n > MAX_HEADER or 8 + n > size:
                raise ArtifactError(path, f"has a header length ({n} bytes) that does not fit in the file")
            raw = f.read(n)
    except OSError as e:
        raise ArtifactError(path, f"cannot be read ({e.strerror or e})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(path, f"has a header that is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise ArtifactError(path, "has a header that is not a JSON object")
    data_start, data_size = 8 + n, size - 8 - n
    index = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        index[name] = _entry(path, name, e, data_start, data_size)
    return index


def _entry(path, name, e, data_start: int, data_size: int) -> TensorEntry:
    try:
        dtype, width = DTYPES[e["dtype"]]
        shape = tuple(e["shape"])
        begin, end = e["data_offsets"]
        if not all(isinstance(d, int) and d >= 0 for d in shape) or not isinstance(begin, int) \
                or not isinstance(end, int):
            raise TypeError
    except (KeyError, TypeError, ValueError):
        raise ArtifactError(path, f"has a malformed header entry for tensor {name!r}") from None
    if not 0 <= begin <= end <= data_size:
        raise ArtifactError(path, f"puts tensor {name!r} at bytes {begin}..{end}, outside its {data_size} bytes of data")
    if end - begin != math.prod(shape) * width:
        raise ArtifactError(path, f"gives tensor {name!r} {end - begin} bytes, but shape {list(shape)} "
                                  f"of {e['dtype']} needs {math.prod(shape) * width}")
    return TensorEntry(dtype, shape, data_start + begin, end - begin)
