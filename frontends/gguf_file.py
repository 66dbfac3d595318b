"""The GGUF container: header, metadata and tensor layout (reading here, writing in gguf_writer).

Layout (the GGUF spec, versions 2 and 3, little-endian)::

    "GGUF" | u32 version | u64 tensor_count | u64 kv_count
    kv_count     x (string key, u32 value_type, value)
    tensor_count x (string name, u32 n_dims, u64 dims[n_dims], u32 ggml_type, u64 offset)
    zero padding to the alignment | tensor data, tensor i at data_offset + offset_i

A string is a u64 byte length and UTF-8 bytes; an array is a u32 item type, a u64 count and the
items. GGUF lists dimensions innermost first, kiln's shapes are numpy order: one is the other
reversed (token_embd.weight is ``[576, 49152]`` in the file and ``(49152, 576)`` here).

Files are hostile. Every count and length is checked against the bytes actually left before
anything is allocated or sliced, and every problem is one ``KilnError(path, message)``.
"""
from __future__ import annotations

import codecs
import math
import os
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, NamedTuple, Union

import numpy as np

from kiln import formats as _formats
from kiln.errors import KilnError
from kiln.weights import Weight

from .byte_range import ByteRangeReader
from .safetensors_file import show_name

MAGIC = b"GGUF"
VERSIONS = (2, 3)          # 1 used 32-bit counts and is long gone; 3 only added big-endian files
WRITE_VERSION = 3
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4               # GGML_MAX_DIMS
MAX_KEY_BYTES = 65535      # the spec's limit on key length
MAX_NAME_BYTES = 63        # llama.cpp refuses tensor names of GGML_MAX_NAME (64) bytes or more
MAX_ARRAY_DEPTH = 8        # arrays of arrays; llama.cpp reads none, the gguf package any depth
_I64_MAX = 2**63 - 1


class ValueType(IntEnum):
    """GGUF metadata value types; the ids equal ``gguf.GGUFValueType``'s."""
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12

    def __str__(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class ArrayType:
    """The type of an array value: GGUF arrays carry one item type for all their items."""
    item: "ValueType | ArrayType"

    def __str__(self) -> str:
        return f"array[{self.item}]"


GGUFType = Union[ValueType, ArrayType]


class Typed(NamedTuple):
    """A metadata value with its GGUF type stated, for ``write_gguf``: ``typed(7, "uint64")``."""
    value: Any
    type: GGUFType


def parse_type(spec) -> GGUFType:
    """``ValueType``/``ArrayType``, a type id, or a name: ``"uint32"``, ``"array[string]"``."""
    if isinstance(spec, (ValueType, ArrayType)) and spec != ValueType.ARRAY:
        return spec
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text.startswith("array[") and text.endswith("]"):
            return ArrayType(parse_type(text[6:-1]))
        if text.upper() in ValueType.__members__ and text != "array":
            return ValueType[text.upper()]
        raise ValueError(f"unknown GGUF value type {spec!r} (use e.g. 'uint32', 'float32', 'string', 'array[int32]')")
    if isinstance(spec, int) and not isinstance(spec, bool):
        try:
            vt = ValueType(int(spec))
        except ValueError:
            raise ValueError(f"unknown GGUF value type id {int(spec)}") from None
        if vt is ValueType.ARRAY:
            raise ValueError("an array type needs its item type: ArrayType(ValueType.X) or 'array[x]'")
        return vt
    raise ValueError(f"not a GGUF value type: {spec!r}")


def typed(value, vtype) -> Typed:
    """Pin the GGUF type of one metadata value (otherwise ``write_gguf`` infers it)."""
    return Typed(value, parse_type(vtype))


# GGML type ids -> names, so a message can name a type kiln lacks (ids 4, 5, 31-33, 36-38 are retired)
GGML_TYPE_NAMES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 4: "Q4_2", 5: "Q4_3", 6: "Q5_0", 7: "Q5_1",
    8: "Q8_0", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K",
    16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S",
    22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64",
    29: "IQ1_M", 30: "BF16", 31: "Q4_0_4_4", 32: "Q4_0_4_8", 33: "Q4_0_8_8", 34: "TQ1_0",
    35: "TQ2_0", 36: "IQ4_NL_4_4", 37: "IQ4_NL_4_8", 38: "IQ4_NL_8_8", 39: "MXFP4",
    40: "NVFP4", 41: "Q1_0",
}

_SCALAR = {   # fixed-size value types: struct code, numpy dtype, (min, max) for integers
    ValueType.UINT8: ("<B", "<u1", (0, 2**8 - 1)),
    ValueType.INT8: ("<b", "<i1", (-2**7, 2**7 - 1)),
    ValueType.UINT16: ("<H", "<u2", (0, 2**16 - 1)),
    ValueType.INT16: ("<h", "<i2", (-2**15, 2**15 - 1)),
    ValueType.UINT32: ("<I", "<u4", (0, 2**32 - 1)),
    ValueType.INT32: ("<i", "<i4", (-2**31, 2**31 - 1)),
    ValueType.UINT64: ("<Q", "<u8", (0, 2**64 - 1)),
    ValueType.INT64: ("<q", "<i8", (-2**63, 2**63 - 1)),
    ValueType.FLOAT32: ("<f", "<f4", None),
    ValueType.FLOAT64: ("<d", "<f8", None),
}
_STRUCTS = {vt: struct.Struct(code) for vt, (code, _, _) in _SCALAR.items()}
_U32, _U64 = _STRUCTS[ValueType.UINT32], _STRUCTS[ValueType.UINT64]
# the fewest bytes one item of each type can take: what a claimed count is checked against
_MIN_ITEM_BYTES = {**{vt: s.size for vt, s in _STRUCTS.items()},
                   ValueType.BOOL: 1, ValueType.STRING: 8, ValueType.ARRAY: 12}
_MIN_KV_BYTES = 8 + 1 + 4 + 1            # key length, a 1-byte key, value type, a 1-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8


def _align(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


# ==========================================================================================
# reading
# ==========================================================================================

class GGUFFile:
    """One parsed GGUF file.

    ``metadata`` holds Python values (int, float, bool, str, nested lists) and ``metadata_types``
    their GGUF types, so ``write_gguf(p, f.metadata, f.tensors.items(),
    metadata_types=f.metadata_types)`` reproduces the file. ``tensors`` are lazy ``Weight``s in
    file order that read their bytes only when asked; ``tensor_offsets`` gives each one's
    absolute position in the file.
    """

    def __init__(self, path, version, alignment, metadata, metadata_types, tensors,
                 tensor_offsets, data_offset, file_size):
        self.path: str = path
        self.version: int = version
        self.alignment: int = alignment
        self.metadata: dict[str, Any] = metadata
        self.metadata_types: dict[str, GGUFType] = metadata_types
        self.tensors: dict[str, Weight] = tensors
        self.tensor_offsets: dict[str, int] = tensor_offsets
        self.data_offset: int = data_offset
        self.file_size: int = file_size

    def __repr__(self) -> str:
        return (f"GGUFFile({self.path!r}, version {self.version}, {len(self.metadata)} keys, "
                f"{len(self.tensors)} tensors)")


class _Parser:
    """A cursor over the mapped file that refuses to step past its end."""

    def __init__(self, path: str, buf: memoryview, size: int):
        self.path, self.buf, self.size, self.pos = path, buf, size, 0

    def fail(self, message: str) -> KilnError:
        return KilnError(self.path, message)

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.fail(f"{what} runs past the end of the file (needs {n} bytes at offset "
                            f"{self.pos}, file has {self.size})")

    def scalar(self, vt: ValueType, what: str):
        s = _STRUCTS[vt]
        self.need(s.size, what)
        value = s.unpack_from(self.buf, self.pos)[0]
        self.pos += s.size
        return value

    def raw_string(self, what: str) -> memoryview:
        n = self.scalar(ValueType.UINT64, f"the length of {what}")
        self.need(n, what)
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def name(self, what: str, limit: int | None = None) -> str:
        """A key or tensor name: these must be real UTF-8 (they are looked up by text)."""
        raw = self.raw_string(what)
        if len(raw) == 0:
            raise self.fail(f"{what} is empty")
        if limit is not None and len(raw) > limit:
            raise self.fail(f"{what} is {len(raw)} bytes long (at most {limit} allowed)")
        try:
            return codecs.utf_8_decode(raw, "strict", True)[0]
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8: {bytes(raw[:40])!r}") from None

    def value_type(self, what: str) -> ValueType:
        at = self.pos
        type_id = self.scalar(ValueType.UINT32, f"the value type of {what}")
        try:
            return ValueType(type_id)
        except ValueError:
            raise self.fail(f"{what} has unknown value type {type_id} at offset {at} "
                            f"(known: 0 to {max(ValueType)})") from None

    def value(self, vt: ValueType, what: str):
        """The value of type ``vt`` of ``what`` ("metadata key x") -> (python value, GGUFType)."""
        if vt in _STRUCTS:
            return self.scalar(vt, f"the value of {what}"), vt
        if vt is ValueType.BOOL:
            b = self.scalar(ValueType.UINT8, f"the value of {what}")
            if b > 1:
                raise self.fail(f"{what} is a bool stored as {b} (only 0 and 1 are valid)")
            return bool(b), vt
        if vt is ValueType.STRING:
            # Values keep any bytes (surrogateescape): llama.cpp never checks them, and a
            # byte-level token that is not UTF-8 must survive a read and a write unchanged.
            raw = self.raw_string(f"the value of {what}")
            return codecs.utf_8_decode(raw, "surrogateescape", True)[0], vt
        return self.array(what, 0)

    def array(self, what: str, depth: int):
        if depth >= MAX_ARRAY_DEPTH:
            raise self.fail(f"{what} nests arrays more than {MAX_ARRAY_DEPTH} deep")
        at = self.pos
        item_id = self.scalar(ValueType.UINT32, f"the item type of {what}")
        try:
            item = ValueType(item_id)
        except ValueError:
            raise self.fail(f"{what} is an array of unknown value type {item_id} at offset {at} "
                            f"(known: 0 to {max(ValueType)})") from None
        count = self.scalar(ValueType.UINT64, f"the item count of {what}")
        left = self.size - self.pos
        if count > left // _MIN_ITEM_BYTES[item]:
            raise self.fail(f"{what} claims {count} {item} items, more than the {left} bytes "
                            f"left in the file can hold")
        if item in _STRUCTS:
            dtype = np.dtype(_SCALAR[item][1])
            values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
            self.pos += count * dtype.itemsize
            return values.tolist(), ArrayType(item)
        if item is ValueType.BOOL:
            values = np.frombuffer(self.buf, dtype=np.uint8, count=count, offset=self.pos)
            if count and int(values.max()) > 1:
                bad = int(np.argmax(values > 1))
                raise self.fail(f"{what}[{bad}] is a bool stored as {int(values[bad])} "
                                f"(only 0 and 1 are valid)")
            self.pos += count
            return values.astype(bool).tolist(), ArrayType(item)
        if item is ValueType.STRING:
            return self.strings(count, what), ArrayType(item)
        # Arrays of arrays (items carry no type prefix; each inner array states its own item
        # type). One ArrayType must describe them all, so the inner item types must agree.
        out, inner_type = [], None
        for j in range(count):
            value, vtype = self.array(f"{what}[{j}]", depth + 1)
            if inner_type is None:
                inner_type = vtype
            elif vtype != inner_type:
                raise self.fail(f"{what} mixes inner arrays of {inner_type} and {vtype} "
                                f"(kiln needs one item type per nested array)")
            out.append(value)
        return out, ArrayType(inner_type or ArrayType(ValueType.UINT8))

    def strings(self, count: int, what: str) -> list[str]:
        # Vocabularies hold 50k-500k strings, so this is the one hot loop of the reader. The
        # length prefixes chain each string to the next and must be walked one by one, but
        # that walk does nothing else; the decoding is then one C call over all the text.
        buf, pos, size = self.buf, self.pos, self.size
        unpack = _U64.unpack_from
        begin = pos
        starts = [0] * count
        for j in range(count):
            if pos + 8 > size:
                self.pos = pos
                self.need(8, f"the length of {what}[{j}]")
            n = unpack(buf, pos)[0]
            pos += 8
            if n > size - pos:
                self.pos = pos
                self.need(n, f"{what}[{j}]")
            starts[j] = pos
            pos += n
        self.pos = pos
        if count == 0:
            return []
        return _split_strings(buf, begin, pos, np.array(starts, dtype=np.int64))


def _split_strings(buf, begin: int, end: int, starts: np.ndarray) -> list[str]:
    """Decode the strings at ``starts`` (each after its 8-byte length, the last ending at ``end``)."""
    region = np.frombuffer(buf, dtype=np.uint8, count=end - begin, offset=begin)
    keep = np.ones(end - begin, dtype=bool)
    prefix = starts - 8 - begin
    for k in range(8):
        keep[prefix + k] = False
    data = region[keep]                                   # the strings back to back
    ends = np.append(starts[1:] - 8, end)
    bstart = starts - begin - 8 * np.arange(1, len(starts) + 1)   # offsets into ``data``
    bend = bstart + (ends - starts)
    try:
        text = codecs.utf_8_decode(data, "strict", True)[0]
    except UnicodeDecodeError:
        text = None
    if text is not None and len(text) != len(data):
        # Non-ASCII: character offsets count the bytes that start a character. That holds for
        # each string alone only if none starts inside another's character.
        nonempty = bend > bstart
        if (data[bstart[nonempty]] & 0xC0 == 0x80).any():
            text = None
        else:
            chars = np.concatenate(([0], np.cumsum(data & 0xC0 != 0x80)))
            bstart, bend = chars[bstart], chars[bend]
    if text is None:   # some string is not UTF-8 on its own: decode each, keeping its bytes
        raw = data.tobytes()
        return [codecs.utf_8_decode(raw[a:b], "surrogateescape", True)[0]
                for a, b in zip(bstart.tolist(), bend.tolist())]
    return [text[a:b] for a, b in zip(bstart.tolist(), bend.tolist())]


def read_gguf(path) -> GGUFFile:
    """Parse and validate a GGUF file; tensor data stays on disk until a Weight is read."""
    path = os.fspath(path)
    try:
        if os.path.isdir(path):
            raise KilnError(path, "is a folder, not a GGUF file")
        size = os.path.getsize(path)
    except OSError as e:
        raise KilnError(path, f"cannot read: {e.strerror or e}") from None
    if size < 4 + 4 + 8 + 8:
        raise KilnError(path, f"file is {size} bytes, too small to be a GGUF file")
    # The header is parsed in place through a map: only its own pages are touched, nothing the
    # parser returns refers to the map, and it is dropped when this function returns.
    try:
        mm = np.memmap(path, dtype=np.uint8, mode="r", shape=(size,))
    except (OSError, ValueError) as e:
        raise KilnError(path, f"cannot map the file: {getattr(e, 'strerror', None) or e}") from None
    p = _Parser(path, memoryview(mm), size)

    magic = bytes(p.buf[:4])
    if magic != MAGIC:
        raise p.fail(f"not a GGUF file (starts with {magic!r}, expected {MAGIC!r})")
    p.pos = 4
    version = p.scalar(ValueType.UINT32, "the version")
    if version not in VERSIONS:
        if int.from_bytes(version.to_bytes(4, "little"), "big") in VERSIONS:
            raise p.fail("big-endian GGUF files are not supported")
        raise p.fail(f"GGUF version {version} is not supported (kiln reads versions 2 and 3)")
    n_tensors = p.scalar(ValueType.UINT64, "the tensor count")
    n_kv = p.scalar(ValueType.UINT64, "the metadata count")
    left = size - p.pos
    if n_kv > left // _MIN_KV_BYTES:
        raise p.fail(f"header claims {n_kv} metadata entries, more than the {left} bytes left can hold")
    if n_tensors > left // _MIN_TENSOR_INFO_BYTES:
        raise p.fail(f"header claims {n_tensors} tensors, more than the {left} bytes left can hold")

    metadata: dict[str, Any] = {}
    types: dict[str, GGUFType] = {}
    for i in range(n_kv):
        key = p.name(f"metadata key #{i}", MAX_KEY_BYTES)
        shown = f"metadata key {show_name(key)}"
        if key in metadata:
            raise p.fail(f"{shown} appears twice")
        vt = p.value_type(shown)
        metadata[key], types[key] = p.value(vt, shown)

    alignment = _file_alignment(p, metadata, types)
    left = size - p.pos
    if n_tensors > left // _MIN_TENSOR_INFO_BYTES:
        raise p.fail(f"header claims {n_tensors} tensors, more than the {left} bytes left can hold")

    infos = []   # (name, shape, fmt, relative offset, nbytes)
    seen: set[str] = set()
    for i in range(n_tensors):
        name = p.name(f"the name of tensor #{i}")
        shown = f"tensor {show_name(name)}"
        if name in seen:
            raise p.fail(f"{shown} appears twice")
        seen.add(name)
        n_dims = p.scalar(ValueType.UINT32, f"the dimension count of {shown}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise p.fail(f"{shown} has {n_dims} dimensions (GGUF allows 1 to {MAX_DIMS})")
        p.need(8 * n_dims, f"the dimensions of {shown}")
        dims = struct.unpack_from(f"<{n_dims}Q", p.buf, p.pos)
        p.pos += 8 * n_dims
        shape = tuple(reversed(dims))
        if any(d == 0 for d in dims):
            raise p.fail(f"{shown} has an empty dimension in its shape {list(shape)}")
        numel = math.prod(dims)
        if numel > _I64_MAX:
            raise p.fail(f"{shown} shape {list(shape)} has {numel} elements, more than a "
                         f"64-bit size can hold")
        type_id = p.scalar(ValueType.UINT32, f"the type of {shown}")
        offset = p.scalar(ValueType.UINT64, f"the data offset of {shown}")
        fmt = _formats.from_gguf_type(type_id)
        if fmt is None:
            if type_id in GGML_TYPE_NAMES:
                raise p.fail(f"{shown} has GGML type {GGML_TYPE_NAMES[type_id]} (id {type_id}), "
                             f"which kiln does not support")
            raise p.fail(f"{shown} has unknown GGML type id {type_id}")
        if not fmt.row_ok(shape):
            raise p.fail(f"{shown} rows of {shape[-1]} elements are not a whole number of "
                         f"{fmt.name} blocks of {fmt.block_size}")
        if offset % alignment:
            raise p.fail(f"{shown} data offset {offset} is not a multiple of the alignment {alignment}")
        infos.append((name, shape, fmt, offset, numel // fmt.block_size * fmt.type_size))

    data_offset = _align(p.pos, alignment)
    tensors: dict[str, Weight] = {}
    offsets: dict[str, int] = {}
    reader = ByteRangeReader(path, size)
    for name, shape, fmt, offset, nbytes in infos:
        start = data_offset + offset
        if start + nbytes > size:
            raise p.fail(f"tensor {show_name(name)} ends past the end of the file (needs {nbytes} "
                         f"bytes at offset {start}, file has {size})")
        offsets[name] = start
        row_bytes = fmt.nbytes(shape[-1:])
        tensors[name] = Weight(shape, fmt, reader.slice(start, start + nbytes), name=name, origin=path,
                               load_rows=reader.rows(start, row_bytes) if row_bytes else None)
    _check_overlaps(p, infos, offsets)
    return GGUFFile(path, version, alignment, metadata, types, tensors, offsets, data_offset, size)


def _file_alignment(p: _Parser, metadata, types) -> int:
    if "general.alignment" not in metadata:
        return DEFAULT_ALIGNMENT
    value, vt = metadata["general.alignment"], types["general.alignment"]
    if vt is not ValueType.UINT32:
        raise p.fail(f"general.alignment is a {vt}, the spec requires a uint32")
    if value <= 0 or value & (value - 1):
        raise p.fail(f"general.alignment is {value}, not a power of two")
    return value


def _check_overlaps(p: _Parser, infos, offsets) -> None:
    spans = sorted((offsets[name], offsets[name] + nbytes, name) for name, _, _, _, nbytes in infos)
    for (s0, e0, a), (s1, e1, b) in zip(spans, spans[1:]):
        if s1 < e0:
            raise p.fail(f"tensors {show_name(a)} (bytes {s0}..{e0}) and {show_name(b)} "
                         f"(bytes {s1}..{e1}) overlap")


# the writer lives in its own module; importing it last lets it use everything above
from .gguf_writer import write_gguf  # noqa: E402,F401
