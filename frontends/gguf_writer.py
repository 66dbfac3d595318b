"""Writing GGUF files: metadata with llama.cpp's value-type conventions, tensors streamed.

The container's types and constants live in ``gguf_file`` (the reader); this module only
encodes. ``write_gguf`` is re-exported there, so callers import both from one place.
"""
from __future__ import annotations

import os
import struct
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from kiln.atomic import atomic_file
from kiln.errors import KilnError
from kiln.weights import Weight

from .gguf_file import (
    _SCALAR, _STRUCTS, _U32, _U64, DEFAULT_ALIGNMENT, MAGIC, MAX_ARRAY_DEPTH, MAX_DIMS, MAX_KEY_BYTES,
    MAX_NAME_BYTES, WRITE_VERSION, ArrayType, GGUFType, Typed, ValueType, _align, parse_type,
)
from .safetensors_file import show_name


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

    The file is built under a staging name in the destination folder, fsynced and renamed into
    place only once complete (``kiln.atomic.atomic_file``); on any failure it is removed.
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

    if os.path.isdir(path):
        raise KilnError(path, "is a folder; give a file name for the GGUF file")

    def io(fn, *args):
        # only our own I/O becomes "cannot write"; a loader's OSError stays its own
        try:
            return fn(*args)
        except OSError as e:
            raise KilnError(path, f"cannot write: {e.strerror or e}") from None

    with atomic_file(path) as f:
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
