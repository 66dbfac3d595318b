"""The GGUF container: header, metadata and tensor layout, read and written. No model logic.

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
import secrets
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Union

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


# ==========================================================================================
# writing
# ==========================================================================================

# llama.cpp's writer stores counts, lengths, sizes and token ids as uint32; keys are matched on
# their last dotted part so every architecture prefix ({arch}.block_count) is covered.
_UINT32_SUFFIXES = ("_count", "_length", "_size", "_token_id", "_rank", "_dim")
_UINT32_NAMES = {
    "alignment", "file_type", "quantization_version", "head_count_kv", "sliding_window",
    "pooling_type", "expert_gating_func", "groupnorm_groups", "conv_kernel", "n_wa_pattern",
}
# array keys whose item type llama.cpp fixes, whatever the Python items look like
_ARRAY_ITEM_TYPES = {
    "tokenizer.ggml.tokens": ValueType.STRING,
    "tokenizer.ggml.merges": ValueType.STRING,
    "tokenizer.ggml.token_type": ValueType.INT32,
    "tokenizer.ggml.scores": ValueType.FLOAT32,
    "tokenizer.ggml.precompiled_charsmap": ValueType.UINT8,
    "tokenizer.chat_templates": ValueType.STRING,
    "general.tags": ValueType.STRING,
    "general.languages": ValueType.STRING,
}
_DTYPE_TYPES = {np.dtype(dt): vt for vt, (_, dt, _) in _SCALAR.items()}
_DTYPE_TYPES[np.dtype(bool)] = ValueType.BOOL


def _infer_type(key: str, value) -> GGUFType:
    # numpy's default int64/float64 are usually incidental (a config that went through numpy)
    # and are inferred like Python numbers; any other numpy dtype was chosen, so it is kept.
    if isinstance(value, (np.int64, np.float64)):
        value = value.item()
    if isinstance(value, np.ndarray) and value.dtype in (np.int64, np.float64):
        value = value.tolist()
    if isinstance(value, (list, tuple, np.ndarray)) and key in _ARRAY_ITEM_TYPES:
        return ArrayType(_ARRAY_ITEM_TYPES[key])
    if isinstance(value, (bool, np.bool_)):
        return ValueType.BOOL
    if isinstance(value, np.generic):
        vt = _DTYPE_TYPES.get(value.dtype)
        if vt is None:
            raise ValueError(f"numpy {value.dtype} has no GGUF type")
        return vt
    if isinstance(value, int):
        last = key.rsplit(".", 1)[-1]
        unsigned_key = (last in _UINT32_NAMES or last.endswith(_UINT32_SUFFIXES)) \
            and not key.startswith("general.sampling.")
        if unsigned_key and 0 <= value < 2**32:
            return ValueType.UINT32
        return _int_type([value])
    if isinstance(value, float):
        return ValueType.FLOAT32
    if isinstance(value, str):
        return ValueType.STRING
    if isinstance(value, (bytes, bytearray)):
        return ArrayType(ValueType.UINT8)
    if isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.newbyteorder("<") in _DTYPE_TYPES:
        return ArrayType(_DTYPE_TYPES[value.dtype.newbyteorder("<")])
    if isinstance(value, (list, tuple, np.ndarray)):
        return ArrayType(_infer_item_type(list(value)))
    raise ValueError(f"cannot store a {type(value).__name__} in GGUF")


def _int_type(values) -> ValueType:
    lo, hi = min(values), max(values)
    for vt in (ValueType.INT32, ValueType.INT64, ValueType.UINT64):
        vmin, vmax = _SCALAR[vt][2]
        if vmin <= lo and hi <= vmax:
            return vt
    raise ValueError(f"integer {lo if lo < 0 else hi} does not fit 64 bits")


def _infer_item_type(items: list) -> GGUFType:
    if not items:
        return ValueType.INT32      # nothing to go by; the commonest numeric array type
    if all(isinstance(x, (bool, np.bool_)) for x in items):
        return ValueType.BOOL
    if all(isinstance(x, str) for x in items):
        return ValueType.STRING
    if all(isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_)) for x in items):
        return _int_type([int(x) for x in items])
    if all(isinstance(x, (int, float, np.integer, np.floating)) for x in items):
        return ValueType.FLOAT32
    if all(isinstance(x, (list, tuple, np.ndarray)) for x in items):
        inner = {_infer_item_type(list(x)) for x in items if len(x)}
        if len(inner) > 1:
            raise ValueError(f"nested arrays mix item types {', '.join(sorted(map(str, inner)))}")
        return ArrayType(inner.pop() if inner else ValueType.INT32)
    kinds = sorted({type(x).__name__ for x in items})
    raise ValueError(f"array mixes {', '.join(kinds)} items; a GGUF array has one item type")


def _encode_string(value) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if not isinstance(value, str):
        raise ValueError(f"a string value cannot be a {type(value).__name__}")
    try:
        return value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise ValueError("string cannot be encoded as UTF-8") from None


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer))


def _encode_scalar(value, vt: ValueType) -> bytes:
    if vt is ValueType.BOOL:
        if isinstance(value, (bool, np.bool_)) or (_is_int(value) and value in (0, 1)):
            return b"\x01" if value else b"\x00"
        raise ValueError(f"a bool value cannot be {value!r}")
    if vt is ValueType.STRING:
        data = _encode_string(value)
        return _U64.pack(len(data)) + data
    bounds = _SCALAR[vt][2]
    if bounds is not None:
        if not _is_int(value):
            raise ValueError(f"{vt} needs an integer, not {type(value).__name__} {value!r}")
        if not bounds[0] <= int(value) <= bounds[1]:
            raise ValueError(f"{int(value)} does not fit {vt} ({bounds[0]}..{bounds[1]})")
        return _STRUCTS[vt].pack(int(value))
    if not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{vt} needs a number, not {type(value).__name__} {value!r}")
    try:
        return _STRUCTS[vt].pack(float(value))
    except OverflowError:
        raise ValueError(f"{value!r} does not fit {vt}") from None


def _numeric_array(items, vt: ValueType) -> np.ndarray:
    """Items -> a little-endian array of ``vt``, refusing lossy conversions."""
    dtype = np.dtype(_SCALAR[vt][1])
    bounds = _SCALAR[vt][2]
    arr = items if isinstance(items, np.ndarray) else None
    if arr is None:
        try:
            arr = np.asarray(items)
        except (ValueError, TypeError, OverflowError):
            arr = np.asarray(items, dtype=object)
    if arr.ndim != 1:
        raise ValueError(f"array[{vt}] needs a flat list of numbers")
    if arr.size == 0:
        return np.empty(0, dtype)
    kind = arr.dtype.kind
    if bounds is not None:
        if kind not in "biu":
            # numpy turns ints beyond int64 into float64 or object: check the items themselves
            values = list(items)
            if not all(_is_int(x) and not isinstance(x, (bool, np.bool_)) for x in values):
                raise ValueError(f"array[{vt}] needs integers")
            arr = np.array([int(x) for x in values], dtype=object)
        lo, hi = int(arr.min()), int(arr.max())
        if lo < bounds[0] or hi > bounds[1]:
            raise ValueError(f"{lo if lo < bounds[0] else hi} does not fit {vt} ({bounds[0]}..{bounds[1]})")
        return arr.astype(dtype)
    if kind not in "biuf":
        if not all(isinstance(x, (int, float, np.integer, np.floating)) for x in list(items)):
            raise ValueError(f"array[{vt}] needs numbers")
        arr = arr.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        out = arr.astype(dtype)
    if arr.dtype.kind == "f":
        over = np.isinf(out) & np.isfinite(arr)
        if over.any():
            raise ValueError(f"{arr[np.argmax(over)]!r} does not fit {vt}")
    return out


def _encode_array(items, at: ArrayType, out: bytearray, depth: int = 0) -> None:
    if isinstance(items, (str, dict, set)) or not hasattr(items, "__len__"):
        raise ValueError(f"{at} needs a list, not {type(items).__name__}")
    if depth >= MAX_ARRAY_DEPTH:
        raise ValueError(f"arrays nest more than {MAX_ARRAY_DEPTH} deep")
    item = at.item
    out += _U32.pack(ValueType.ARRAY if isinstance(item, ArrayType) else item)
    out += _U64.pack(len(items))
    if isinstance(item, ArrayType):
        for x in items:
            _encode_array(x, item, out, depth + 1)
    elif item is ValueType.STRING:
        pack = _U64.pack
        for x in items:
            data = _encode_string(x)
            out += pack(len(data))
            out += data
    elif item is ValueType.BOOL:
        arr = np.asarray(bytes(items) if isinstance(items, (bytes, bytearray)) else items)
        if arr.size and not (arr.dtype.kind == "b" or (arr.dtype.kind in "iu" and arr.min() >= 0 and arr.max() <= 1)):
            raise ValueError("array[bool] needs True/False items")
        out += arr.astype(np.uint8).tobytes()
    else:
        if isinstance(items, (bytes, bytearray)):
            items = np.frombuffer(bytes(items), dtype=np.uint8)
        out += _numeric_array(items, item).tobytes()


def _encode_kv(key: str, value, declared) -> bytes:
    """One metadata entry, key through value; ValueError says what is wrong with it."""
    if isinstance(value, Typed):
        if declared is not None and parse_type(declared) != value.type:
            raise ValueError(f"typed as {value.type} but metadata_types says {parse_type(declared)}")
        value, vtype = value.value, value.type
    elif declared is not None:
        vtype = parse_type(declared)
    else:
        vtype = _infer_type(key, value)
    out = bytearray(_U64.pack(len(key.encode("utf-8"))) + key.encode("utf-8"))
    if isinstance(vtype, ArrayType):
        out += _U32.pack(ValueType.ARRAY)
        _encode_array(value, vtype, out)
    else:
        out += _U32.pack(vtype)
        out += _encode_scalar(value, vtype)
    return bytes(out)


def _plan_tensors(path: str, tensors, alignment: int):
    """(name, weight, tensor-info bytes, nbytes) per tensor, every check done before any I/O."""
    if isinstance(tensors, Mapping):
        tensors = tensors.items()
    plan, seen, offset = [], set(), 0
    for name, w in tensors:
        if not isinstance(w, Weight):
            raise TypeError(f"tensor {name!r}: expected a kiln Weight, got {type(w).__name__}")
        shown = f"tensor {show_name(name)}"
        if not isinstance(name, str) or not name:
            raise KilnError(path, f"tensor name {name!r} must be a non-empty string")
        if name in seen:
            raise KilnError(path, f"{shown} is given twice")
        seen.add(name)
        try:
            encoded = name.encode("utf-8")
        except UnicodeEncodeError:
            raise KilnError(path, f"{shown} cannot be encoded as UTF-8") from None
        if len(encoded) > MAX_NAME_BYTES:
            raise KilnError(path, f"{shown} is {len(encoded)} bytes long; llama.cpp reads "
                                  f"names of at most {MAX_NAME_BYTES}")
        fmt = w.format
        if fmt.gguf_type is None:
            raise KilnError(path, f"{shown} is stored as {fmt.name}, which GGUF has no type for")
        shape = w.shape or (1,)      # GGUF has no 0-d tensors; a scalar is one element
        if len(shape) > MAX_DIMS:
            raise KilnError(path, f"{shown} has {len(shape)} dimensions (GGUF allows at most {MAX_DIMS})")
        if any(d <= 0 for d in shape):
            raise KilnError(path, f"{shown} has an empty dimension in its shape {list(shape)}")
        if not fmt.row_ok(shape):
            raise KilnError(path, f"{shown} rows of {shape[-1]} elements are not a whole number "
                                  f"of {fmt.name} blocks of {fmt.block_size}")
        nbytes = fmt.nbytes(shape)
        dims = shape[::-1]
        entry = (_U64.pack(len(encoded)) + encoded + _U32.pack(len(dims))
                 + struct.pack(f"<{len(dims)}Q", *dims) + _U32.pack(fmt.gguf_type) + _U64.pack(offset))
        plan.append((name, w, entry, nbytes))
        offset = _align(offset + nbytes, alignment)
    return plan


def write_gguf(path, metadata: Mapping[str, Any], tensors: Iterable[tuple[str, Weight]], *,
               metadata_types: Mapping[str, Any] | None = None, alignment: int | None = None,
               progress: Callable[[str, int], None] | None = None) -> None:
    """Write a GGUF v3 file, streaming one tensor at a time.

    Metadata types come from ``Typed`` values, then ``metadata_types``, then inference
    (llama.cpp's conventions: counts, lengths and token ids uint32, floats float32, the
    tokenizer arrays their fixed types; other ints int32, or int64/uint64 when too big).
    ``alignment`` defaults to the metadata's ``general.alignment``, else 32.

    The file is built under a temporary name in the destination folder and renamed into place
    only once complete; on any failure the temporary file is removed.
    """
    path = os.fspath(path)
    metadata = dict(metadata)
    metadata_types = dict(metadata_types or {})
    declared_alignment = metadata.get("general.alignment")
    if isinstance(declared_alignment, Typed):
        declared_alignment = declared_alignment.value
    if alignment is None:
        alignment = DEFAULT_ALIGNMENT if declared_alignment is None else declared_alignment
    elif declared_alignment is not None and declared_alignment != alignment:
        raise KilnError(path, f"alignment={alignment} contradicts the metadata's "
                              f"general.alignment={declared_alignment}")
    if not _is_int(alignment) or isinstance(alignment, bool) or alignment <= 0 \
            or alignment & (alignment - 1) or alignment >= 2**32:
        raise KilnError(path, f"alignment {alignment!r} is not a power of two below 2**32")
    alignment = int(alignment)
    if declared_alignment is None and alignment != DEFAULT_ALIGNMENT:
        metadata["general.alignment"] = Typed(alignment, ValueType.UINT32)
    elif declared_alignment is not None:
        metadata["general.alignment"] = Typed(alignment, ValueType.UINT32)
        metadata_types.pop("general.alignment", None)

    kv_blobs = []
    for key, value in metadata.items():
        if not isinstance(key, str) or not key:
            raise KilnError(path, f"metadata key {key!r} must be a non-empty string")
        try:
            if len(key.encode("utf-8")) > MAX_KEY_BYTES:
                raise ValueError(f"key is longer than {MAX_KEY_BYTES} bytes")
            kv_blobs.append(_encode_kv(key, value, metadata_types.get(key)))
        except (ValueError, TypeError, UnicodeEncodeError) as e:
            raise KilnError(path, f"metadata key {show_name(key)}: {e}") from None

    plan = _plan_tensors(path, tensors, alignment)
    header = bytearray(MAGIC + _U32.pack(WRITE_VERSION) + _U64.pack(len(plan)) + _U64.pack(len(kv_blobs)))
    for blob in kv_blobs:
        header += blob
    for _, _, entry, _ in plan:
        header += entry
    header += bytes(_align(len(header), alignment) - len(header))

    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise KilnError(path, "is a folder; give a file name for the GGUF file")
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)   # 0o666: honour the umask
    except OSError as e:
        raise KilnError(path, f"cannot write: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            def io(fn, *args):
                # only our own I/O becomes "cannot write"; a loader's OSError stays its own
                try:
                    return fn(*args)
                except OSError as e:
                    raise KilnError(path, f"cannot write: {e.strerror or e}") from None

            io(f.write, header)
            for name, w, _, nbytes in plan:
                written = 0
                for data in w.raw_chunks():
                    io(f.write, memoryview(np.ascontiguousarray(data)))
                    written += data.size
                if written != nbytes:
                    raise ValueError(f"tensor {name}: {written} bytes produced, {nbytes} expected")
                pad = _align(nbytes, alignment) - nbytes
                if pad:
                    io(f.write, bytes(pad))
                if progress is not None:
                    progress(name, nbytes)
            io(f.flush)
            io(os.fsync, f.fileno())
        io(os.replace, tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _remove(tmp: str) -> None:
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
