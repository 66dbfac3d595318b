"""Safetensors containers: a validating lazy reader, a sharded-index reader and a streaming writer.

Every file is treated as hostile. The reader checks the whole header before it maps the file:
header length, UTF-8, JSON shape, field types, sizes against dtypes, and that the tensors tile
the data section exactly. Any problem is a ``KilnError(path, one line)``. Tensor data is never
read here: each ``Weight`` slices one shared, lazily created memory map of the file.

Layout (the safetensors spec): an 8-byte little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``, then
the data section, with offsets relative to its start.
"""
from __future__ import annotations

import json
import math
import os
import reprlib
import threading
from typing import Callable, Iterable

import numpy as np

from kiln import formats as _formats
from kiln.errors import KilnError
from kiln.weights import Weight

from .byte_range import ByteRangeReader

MAX_HEADER_BYTES = 100_000_000   # the safetensors package's own limit
MAX_DIMS = 64                    # numpy's limit on the dimensions of an array
INDEX_NAME = "model.safetensors.index.json"
MAX_INDEX_BYTES = 100_000_000

# safetensors dtype name -> kiln format name
_DTYPE_TO_FORMAT = {
    "F64": "f64", "F32": "f32", "F16": "f16", "BF16": "bf16",
    "I64": "i64", "I32": "i32", "I16": "i16", "I8": "i8", "U8": "u8",
}
_FORMAT_TO_DTYPE = {v: k for k, v in _DTYPE_TO_FORMAT.items()}
# Known to the format but not to kiln: named so the message can say "unsupported", not "unknown".
_KNOWN_UNSUPPORTED = {
    "BOOL", "U16", "U32", "U64", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4",
    "F6_E2M3", "F6_E3M2", "C64",
}


def show_name(name) -> str:
    """A tensor or file name fit for a one-line message: hostile names are quoted and cut."""
    text = str(name)
    if not text or not text.isprintable() or text != text.strip():
        text = repr(text)
    return text if len(text) <= 200 else text[:197] + "..."


class SafetensorsFile:
    """One parsed safetensors file: ``tensors`` (lazy ``Weight``s, in file order) and ``metadata``."""

    def __init__(self, path: str, tensors: dict[str, Weight], metadata: dict[str, str],
                 header_bytes: int, data_start: int):
        self.path = path
        self.tensors = tensors
        self.metadata = metadata
        self.header_bytes = header_bytes
        self.data_start = data_start   # absolute file offset of the data section

    def __len__(self) -> int:
        return len(self.tensors)

    def __iter__(self):
        return iter(self.tensors)

    def __contains__(self, name) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> Weight:
        return self.tensors[name]

    def __repr__(self) -> str:
        return f"SafetensorsFile({self.path!r}, {len(self.tensors)} tensors)"


class _LazyMap:
    """One read-only memory map of a file, made on first use and shared by all its weights.

    Mapping lazily keeps header-only reads (listing, converting a subset, reading every shard
    of a large model) from holding a mapping per file. The size is checked again at mapping
    time so a file that shrank after validation is refused instead of faulting on access.
    """

    def __init__(self, path: str, expected_size: int):
        self.path = path
        self.expected_size = expected_size
        self._map: np.ndarray | None = None
        self._lock = threading.Lock()

    def get(self) -> np.ndarray:
        if self._map is None:
            with self._lock:
                if self._map is None:
                    try:
                        size = os.path.getsize(self.path)
                    except OSError as e:
                        raise KilnError(self.path, f"cannot read: {e.strerror or e}") from None
                    if size != self.expected_size:
                        raise KilnError(self.path, f"file changed since it was opened ({self.expected_size} bytes then, {size} now)")
                    self._map = np.memmap(self.path, dtype=np.uint8, mode="r", shape=(size,))
        return self._map

    def slice(self, begin: int, end: int) -> Callable[[], np.ndarray]:
        if begin == end:
            # an empty tensor needs no mapping (and numpy cannot map an empty file)
            return lambda: np.empty(0, dtype=np.uint8)
        return lambda: self.get()[begin:end]


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _no_duplicates(path: str, what: str):
    def hook(pairs):
        out = {}
        for key, value in pairs:
            if key in out:
                raise KilnError(path, f"{what} has the key {show_name(key)} twice")
            out[key] = value
        return out
    return hook


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def _parse_json(path: str, raw: bytes, what: str):
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise KilnError(path, f"{what} is not valid UTF-8 (byte {e.start})") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates(path, what),
                          parse_constant=_reject_constant)
    except KilnError:
        raise
    except json.JSONDecodeError as e:
        raise KilnError(path, f"{what} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except (ValueError, RecursionError) as e:
        # int digit limits, NaN/Infinity, nesting too deep
        msg = "nested too deeply" if isinstance(e, RecursionError) else str(e).split(";")[0].splitlines()[0][:120]
        raise KilnError(path, f"{what} is not valid JSON: {msg}") from None


def _parse_entry(path: str, name: str, entry) -> tuple[_formats.WeightFormat, tuple[int, ...], int, int]:
    where = f"tensor {show_name(name)}"
    if not isinstance(entry, dict):
        raise KilnError(path, f"{where}: header entry is a {type(entry).__name__}, not an object")
    for field in ("dtype", "shape", "data_offsets"):
        if field not in entry:
            raise KilnError(path, f"{where}: header entry has no {field!r}")
    # Extra fields are ignored, as the safetensors package ignores them: they cannot move data.
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str):
        raise KilnError(path, f"{where}: dtype is not a string")
    if dtype not in _DTYPE_TO_FORMAT:
        if dtype in _KNOWN_UNSUPPORTED:
            raise KilnError(path, f"{where} has dtype {dtype}, which kiln does not support "
                                  f"(supported: {', '.join(_DTYPE_TO_FORMAT)})")
        raise KilnError(path, f"{where} has unknown dtype {show_name(dtype)}")
    fmt = _formats.get(_DTYPE_TO_FORMAT[dtype])
    if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
        raise KilnError(path, f"{where}: shape is not a list of integers")
    # Shapes and offsets are echoed through reprlib: a hostile header may hold 4000-digit numbers.
    if len(shape) > MAX_DIMS:
        raise KilnError(path, f"{where}: shape has {len(shape)} dimensions (at most {MAX_DIMS})")
    if any(d < 0 for d in shape):
        raise KilnError(path, f"{where}: shape {reprlib.repr(shape)} has a negative dimension")
    if any(d >= 2**64 for d in shape):
        raise KilnError(path, f"{where}: shape {reprlib.repr(shape)} has a dimension past 64 bits")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)):
        raise KilnError(path, f"{where}: data_offsets is not a pair of integers")
    begin, end = offsets
    if begin < 0 or end < begin or end >= 2**64:
        raise KilnError(path, f"{where}: data_offsets {reprlib.repr(offsets)} are not an increasing pair of "
                              "non-negative 64-bit integers")
    # Python integers do not overflow: a shape like [2**62, 4] simply fails the comparison.
    numel = 1
    for d in shape:
        numel *= d
    nbytes = numel * fmt.type_size
    if nbytes != end - begin:
        need = nbytes if nbytes < 10**40 else "more than 10**40"
        raise KilnError(path, f"{where}: shape {reprlib.repr(shape)} of {dtype} needs {need} bytes but "
                              f"data_offsets span {end - begin}")
    if math.prod(d for d in shape if d) * max(fmt.type_size, 4) >= 2**63:
        # only an empty tensor gets here ([2**62, 0]); numpy refuses such a shape even with no
        # elements (as float32 values too), and the safetensors package's checked product as well
        raise KilnError(path, f"{where}: shape {reprlib.repr(shape)} is too large for 64-bit sizes, even with no elements")
    return fmt, tuple(shape), begin, end


def read_safetensors(path) -> SafetensorsFile:
    """Parse and validate a safetensors file's header; tensor data stays on disk until asked for."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if not os.path.isfile(path):
                raise KilnError(path, "not a regular file")
            if size < 8:
                raise KilnError(path, f"too short for a safetensors file ({size} bytes, the header length alone takes 8)")
            n = int.from_bytes(f.read(8), "little")
            if n > size - 8:
                raise KilnError(path, f"header length {n} runs past the end of the file ({size} bytes)")
            if n > MAX_HEADER_BYTES:
                raise KilnError(path, f"header length {n} is over the {MAX_HEADER_BYTES}-byte limit")
            raw = f.read(n)
    except KilnError:
        raise
    except OSError as e:
        raise KilnError(path, f"cannot read: {e.strerror or e}") from None
    if len(raw) != n:
        raise KilnError(path, "file changed while its header was read")

    header = _parse_json(path, raw, "header")
    if not isinstance(header, dict):
        raise KilnError(path, f"header is a JSON {type(header).__name__}, not an object")

    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise KilnError(path, f"__metadata__ is a {type(metadata).__name__}, not an object of strings")
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise KilnError(path, f"__metadata__ value for {show_name(key)} is a {type(value).__name__}, not a string")

    data_start = 8 + n
    data_size = size - data_start
    entries = []
    for name, entry in header.items():
        fmt, shape, begin, end = _parse_entry(path, name, entry)
        if end > data_size:
            raise KilnError(path, f"tensor {show_name(name)} ends past the end of the file "
                                  f"(data_offsets end {end}, data section holds {data_size} bytes)")
        entries.append((begin, end, name, fmt, shape))

    # Exact tiling: sorted by start, each tensor begins where the previous one ended.
    pos, prev = 0, None
    for begin, end, name, _, _ in sorted(entries, key=lambda e: (e[0], e[1])):
        if begin < pos:
            raise KilnError(path, f"tensor {show_name(name)} overlaps tensor {show_name(prev)} "
                                  f"(starts at {begin}, before {pos})")
        if begin > pos:
            after = f"after tensor {show_name(prev)}" if prev is not None else "at the start of the data section"
            raise KilnError(path, f"{begin - pos} unused bytes {after} (tensor {show_name(name)} starts at {begin}, expected {pos})")
        pos, prev = end, name
    if pos != data_size:
        raise KilnError(path, f"{data_size - pos} trailing bytes after the last tensor")

    mapping = ByteRangeReader(path, size)
    tensors = {}
    for begin, end, name, fmt, shape in entries:
        row_bytes = fmt.nbytes(shape[-1:]) if shape else 0
        tensors[name] = Weight(shape, fmt, mapping.slice(data_start + begin, data_start + end),
                               load_rows=mapping.rows(data_start + begin, row_bytes) if row_bytes else None,
                               name=name, origin=path)
    return SafetensorsFile(path, tensors, dict(metadata), n, data_start)


# ---- sharded checkpoints ------------------------------------------------------------------

def _read_index(folder: str) -> tuple[str, dict[str, str]]:
    index_path = os.path.join(folder, INDEX_NAME)
    try:
        with open(index_path, "rb") as f:
            raw = f.read(MAX_INDEX_BYTES + 1)
    except FileNotFoundError:
        raise KilnError(index_path, "no such file") from None
    except OSError as e:
        raise KilnError(index_path, f"cannot read: {e.strerror or e}") from None
    if len(raw) > MAX_INDEX_BYTES:
        raise KilnError(index_path, f"index is over the {MAX_INDEX_BYTES}-byte limit")
    index = _parse_json(index_path, raw, "index")
    if not isinstance(index, dict):
        raise KilnError(index_path, f"index is a JSON {type(index).__name__}, not an object")
    if "weight_map" not in index:
        raise KilnError(index_path, "index has no 'weight_map'")
    weight_map = index["weight_map"]
    if not isinstance(weight_map, dict):
        raise KilnError(index_path, f"weight_map is a {type(weight_map).__name__}, not an object")
    for name, filename in weight_map.items():
        if not isinstance(filename, str):
            raise KilnError(index_path, f"weight_map entry for {show_name(name)} is a {type(filename).__name__}, not a file name")
        _check_shard_name(index_path, name, filename)
    return index_path, weight_map


def _check_shard_name(index_path: str, name: str, filename: str) -> None:
    # Shards are plain file names beside the index. Anything with a separator could climb out of
    # the folder ('../x', '/etc/x', 'C:\\x'); checked lexically so a symlinked shard (as in the
    # Hugging Face cache, where shards link into a blobs folder) still works.
    bad = (not filename or filename in (".", "..") or "/" in filename or "\\" in filename
           or "\x00" in filename or os.path.isabs(filename) or os.sep in filename
           or (os.altsep is not None and os.altsep in filename) or ":" in filename)
    if bad:
        raise KilnError(index_path, f"weight_map sends tensor {show_name(name)} to {show_name(filename)}, "
                                    "which is not a file name inside the model folder")


def _open_shards(folder) -> tuple[dict[str, str], dict[str, SafetensorsFile]]:
    folder = os.fspath(folder)
    index_path, weight_map = _read_index(folder)
    shards: dict[str, SafetensorsFile] = {}
    for filename in dict.fromkeys(weight_map.values()):
        shard_path = os.path.join(folder, filename)
        if not os.path.isfile(shard_path):
            raise KilnError(index_path, f"weight_map names shard {show_name(filename)}, which does not exist")
        shards[filename] = read_safetensors(shard_path)
    for name, filename in weight_map.items():
        if name not in shards[filename].tensors:
            raise KilnError(index_path, f"weight_map puts tensor {show_name(name)} in {show_name(filename)}, which does not hold it")
    return dict(weight_map), shards


def read_sharded_index(folder) -> dict[str, str]:
    """Tensor name -> shard file name, from ``model.safetensors.index.json`` in ``folder``.

    Every shard is checked to exist inside the folder, to be a valid safetensors file, and to
    hold the tensors the index puts in it.
    """
    return _open_shards(folder)[0]


def read_sharded(folder) -> dict[str, Weight]:
    """All tensors of a sharded checkpoint, lazily, in index order."""
    weight_map, shards = _open_shards(folder)
    return {name: shards[filename].tensors[name] for name, filename in weight_map.items()}


# ---- writing ------------------------------------------------------------------------------

def write_safetensors(path, tensors: Iterable[tuple[str, Weight]], metadata: dict[str, str] | None = None,
                      progress: Callable[[str, int, int], None] | None = None) -> None:
    """Write ``tensors`` to ``path`` one at a time, atomically.

    The header is built from shapes and formats alone, then each tensor's bytes are loaded and
    written in turn, so at most one tensor is in memory. Data goes to a staging file in the
    destination folder that is fsynced and renamed over ``path`` only when complete
    (``kiln.atomic.atomic_file``): on any error nothing is left at ``path`` (an existing file
    there is untouched). ``progress(name, done_bytes,
    total_bytes)`` is called after each tensor. Only plain element formats can be stored; a block
    format raises ``ValueError`` naming the tensor.
    """
    path = os.fspath(path)
    items = list(tensors)
    header: dict[str, object] = {}
    if metadata:
        if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("safetensors metadata must map strings to strings")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, weight in items:
        if not isinstance(name, str):
            raise ValueError(f"tensor name {name!r} is not a string")
        if name == "__metadata__":
            raise ValueError("'__metadata__' cannot be a tensor name")
        if name in header:
            raise ValueError(f"tensor {show_name(name)} is given twice")
        dtype = _FORMAT_TO_DTYPE.get(weight.format.name)
        if dtype is None:
            raise ValueError(f"tensor {show_name(name)} is stored as {weight.format.name}, which safetensors cannot hold; "
                             "convert it to a plain format (f32, f16, bf16, ...) first")
        nbytes = weight.nbytes
        header[name] = {"dtype": dtype, "shape": list(weight.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    total = offset
    blob = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    blob += b" " * (-len(blob) % 8)   # keeps the data section 8-byte aligned, as the reference writer does

    from kiln.atomic import atomic_file
    with atomic_file(path) as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        done = 0
        for name, weight in items:
            if weight.nbytes == 0:
                # nothing to write (and Weight.raw cannot shape an empty tensor into rows)
                if progress is not None:
                    progress(name, done, total)
                continue
            written = 0
            for raw in weight.raw_chunks():
                raw = np.ascontiguousarray(raw).reshape(-1)
                f.write(memoryview(raw).cast("B"))
                written += raw.nbytes
            if written != weight.nbytes:
                raise ValueError(f"tensor {show_name(name)}: {written} bytes loaded, {weight.nbytes} expected")
            done += written
            if progress is not None:
                progress(name, done, total)
