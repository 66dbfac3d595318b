"""PyTorch checkpoints (``pytorch_model.bin``) read without running any of their pickle code.

A torch checkpoint is a pickle, and a pickle is a program: unpickling may call any importable
function. This reader unpickles with a restricted unpickler whose ``find_class`` answers only
the handful of names torch uses to describe tensors (``collections.OrderedDict``,
``torch._utils._rebuild_tensor_v2`` and friends, storage types, dtypes), each with a harmless
stand-in defined here. Every other global is refused before anything is called, so a
checkpoint that names ``os.system`` fails with a KilnError and nothing runs. torch itself is
never imported.

Two containers are understood:

* the zip format (``torch.save`` default since 1.6): ``<prefix>/data.pkl`` plus one member
  ``<prefix>/data/<key>`` per storage. Stored (uncompressed) members are memory-mapped in
  place; compressed ones are read on demand.
* the legacy format (``_use_new_zipfile_serialization=False``): five pickles in a row (magic
  number, protocol, system info, the object, the list of storage keys) followed by each
  storage as an 8-byte element count and its raw bytes, which are memory-mapped too.

The very old tar format (before torch 0.4) is refused with a clear message.

Tensors come back as lazy ``Weight``s keyed by their path in the saved object: a state dict's
own keys, or dotted paths (``model.0.weight``) when dicts and lists are nested. Entries that
are not tensors (an epoch number, a learning rate) are skipped and listed in ``.skipped``.
A checkpoint that is a single tensor comes back under the name ``""``.
"""
from __future__ import annotations

import collections
import io
import math
import os
import pickle
import reprlib
import zipfile
import zlib
from typing import Callable

import numpy as np

from kiln import formats as _formats
from kiln.errors import KilnError
from kiln.weights import Weight

from .safetensors_file import _LazyMap, show_name

MAX_PICKLE_BYTES = 256 * 1024 * 1024
MAX_NDIM = 64
MAX_DEPTH = 64            # nesting of dicts/lists in the saved object
MAX_NODES = 10_000_000    # objects visited while collecting tensors
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class TorchCheckpoint(dict):
    """``dict[str, Weight]`` of the checkpoint's tensors; ``skipped`` maps other entries to their type."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skipped: dict[str, str] = {}


# ---- the stand-ins the restricted unpickler hands out --------------------------------------

class _Refused(Exception):
    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.module, self.name = module, name


class _Bad(Exception):
    """A structural problem found while unpickling; becomes a KilnError with the message."""


class _Token:
    """Base of every object handed to the pickle. ``__slots__`` and a refusing ``__setstate__``
    keep BUILD from writing attributes onto it (pickle's BUILD otherwise falls back to setattr)."""
    __slots__ = ()

    def __setstate__(self, state):
        raise _Bad(f"the pickle tries to set state on {self!r}, which torch never does")


class _DType(_Token):
    __slots__ = ("torch_name", "format_name", "itemsize")

    def __init__(self, torch_name: str, format_name: str | None, itemsize: int):
        object.__setattr__(self, "torch_name", torch_name)
        object.__setattr__(self, "format_name", format_name)
        object.__setattr__(self, "itemsize", itemsize)

    def __repr__(self):
        return f"torch.{self.torch_name}"


class _StorageType(_Token):
    __slots__ = ("qualname", "dtype")

    def __init__(self, qualname: str, dtype: _DType):
        object.__setattr__(self, "qualname", qualname)
        object.__setattr__(self, "dtype", dtype)

    def __repr__(self):
        return self.qualname


class _TensorType(_Token):
    __slots__ = ("qualname",)

    def __init__(self, qualname: str):
        object.__setattr__(self, "qualname", qualname)

    def __repr__(self):
        return self.qualname


class _Function(_Token):
    __slots__ = ("qualname", "fn", "rebuilds_tensor")

    def __init__(self, qualname: str, fn: Callable, rebuilds_tensor: bool = False):
        object.__setattr__(self, "qualname", qualname)
        object.__setattr__(self, "fn", fn)
        object.__setattr__(self, "rebuilds_tensor", rebuilds_tensor)

    def __call__(self, *args, **kwargs):
        if kwargs:
            raise _Bad(f"{self.qualname} called with keyword arguments")
        return self.fn(*args)

    def __repr__(self):
        return self.qualname


class _Storage(_Token):
    """One storage: a byte range of the checkpoint, loaded through ``load`` on demand."""
    __slots__ = ("key", "dtype", "nbytes", "load")

    def __init__(self, key: str, dtype: _DType, nbytes: int, load):
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "nbytes", nbytes)
        object.__setattr__(self, "load", load)

    def __repr__(self):
        return f"storage {show_name(self.key)}"


class _TensorRef(_Token):
    __slots__ = ("storage", "offset", "size", "stride", "dtype")

    def __init__(self, storage, offset, size, stride, dtype):
        for k, v in (("storage", storage), ("offset", offset), ("size", size), ("stride", stride), ("dtype", dtype)):
            object.__setattr__(self, k, v)

    def __repr__(self):
        return "a tensor"


class _StateDict(dict):
    """Stand-in for ``collections.OrderedDict``; the state torch attaches (``_metadata``) is kept
    aside rather than set as attributes."""
    __slots__ = ("pickle_state",)

    def __setstate__(self, state):
        self.pickle_state = state


# torch dtype name -> (kiln format or None when kiln cannot hold it, bytes per element)
_DTYPES = {
    "float32": ("f32", 4), "float16": ("f16", 2), "bfloat16": ("bf16", 2), "float64": ("f64", 8),
    "int8": ("i8", 1), "int16": ("i16", 2), "int32": ("i32", 4), "int64": ("i64", 8),
    "uint8": (None, 1), "bool": (None, 1), "uint16": (None, 2), "uint32": (None, 4), "uint64": (None, 8),
    "complex32": (None, 4), "complex64": (None, 8), "complex128": (None, 16),
    "float8_e4m3fn": (None, 1), "float8_e5m2": (None, 1), "float8_e4m3fnuz": (None, 1),
    "float8_e5m2fnuz": (None, 1), "float8_e8m0fnu": (None, 1), "float4_e2m1fn_x2": (None, 1),
    "qint8": (None, 1), "quint8": (None, 1), "qint32": (None, 4), "quint4x2": (None, 1), "quint2x4": (None, 1),
    "bits8": (None, 1), "bits16": (None, 2), "bits1x8": (None, 1), "bits2x4": (None, 1), "bits4x2": (None, 1),
}
_DTYPE_ALIASES = {
    "float": "float32", "half": "float16", "double": "float64", "short": "int16", "int": "int32",
    "long": "int64", "cfloat": "complex64", "cdouble": "complex128", "chalf": "complex32",
}
# legacy typed-storage (and tensor-type) class names -> dtype
_STORAGE_DTYPES = {
    "Float": "float32", "Half": "float16", "BFloat16": "bfloat16", "Double": "float64",
    "Char": "int8", "Short": "int16", "Int": "int32", "Long": "int64", "Byte": "uint8", "Bool": "bool",
    "ComplexFloat": "complex64", "ComplexDouble": "complex128", "QInt8": "qint8", "QUInt8": "quint8",
    "QInt32": "qint32", "QUInt4x2": "quint4x2", "QUInt2x4": "quint2x4",
}
# Tensor kinds torch can pickle but kiln cannot represent: refused by name, with a reason.
_SPECIAL_TENSORS = {
    "_rebuild_qtensor": "a quantized tensor", "_rebuild_sparse_tensor": "a sparse tensor",
    "_rebuild_sparse_csr": "a sparse tensor", "_rebuild_nested_tensor": "a nested tensor",
    "_rebuild_wrapper_subclass": "a tensor subclass", "_rebuild_meta_tensor_no_storage": "a meta tensor with no data",
    "_rebuild_device_tensor_from_cpu_tensor": "a device tensor", "_rebuild_device_tensor_from_numpy": "a device tensor",
    "_rebuild_xla_tensor": "an XLA tensor", "_rebuild_mtia_tensor": "a device tensor",
}


def _dtype(name: str) -> _DType:
    fmt, size = _DTYPES[name]
    return _DType(name, fmt, size)


def _args(qualname: str, args: tuple, lo: int, hi: int) -> None:
    if not lo <= len(args) <= hi:
        want = str(lo) if lo == hi else f"{lo} to {hi}"
        raise _Bad(f"{qualname} called with {len(args)} arguments, expected {want}")


def _storage_arg(qualname: str, storage) -> _Storage:
    if not isinstance(storage, _Storage):
        raise _Bad(f"{qualname} was given {type(storage).__name__} where a storage belongs")
    return storage


def _rebuild_tensor(*args):
    _args("torch._utils._rebuild_tensor", args, 4, 4)
    storage = _storage_arg("torch._utils._rebuild_tensor", args[0])
    return _TensorRef(storage, args[1], args[2], args[3], storage.dtype)


def _rebuild_tensor_v2(*args):
    # (storage, offset, size, stride, requires_grad, backward_hooks[, metadata]); grad and hooks
    # mean nothing for inference weights
    _args("torch._utils._rebuild_tensor_v2", args, 6, 7)
    storage = _storage_arg("torch._utils._rebuild_tensor_v2", args[0])
    return _TensorRef(storage, args[1], args[2], args[3], storage.dtype)


def _rebuild_tensor_v3(*args):
    # newer dtypes: an untyped (byte) storage plus an explicit dtype
    _args("torch._utils._rebuild_tensor_v3", args, 7, 8)
    storage = _storage_arg("torch._utils._rebuild_tensor_v3", args[0])
    if not isinstance(args[6], _DType):
        raise _Bad("torch._utils._rebuild_tensor_v3 was given no dtype")
    return _TensorRef(storage, args[1], args[2], args[3], args[6])


def _rebuild_parameter(*args):
    _args("torch._utils._rebuild_parameter", args, 3, 3)
    if not isinstance(args[0], _TensorRef):
        raise _Bad("torch._utils._rebuild_parameter was given something that is not a tensor")
    return args[0]


def _rebuild_parameter_with_state(*args):
    _args("torch._utils._rebuild_parameter_with_state", args, 4, 4)
    return _rebuild_parameter(*args[:3])


def _rebuild_from_type_v2(*args):
    # (func, type, func_args, state): used for tensors carrying Python attributes. Only our own
    # rebuild functions may be called through it, and only for plain tensor or parameter types.
    _args("torch._tensor._rebuild_from_type_v2", args, 4, 4)
    func, new_type, func_args, _state = args
    if not (isinstance(func, _Function) and func.rebuilds_tensor):
        raise _Bad(f"torch._tensor._rebuild_from_type_v2 asked to call {func!r}, which does not rebuild a tensor")
    if not isinstance(new_type, _TensorType):
        raise _Bad("torch._tensor._rebuild_from_type_v2 asked for a type that is not a tensor type")
    if not isinstance(func_args, tuple):
        raise _Bad("torch._tensor._rebuild_from_type_v2 was given arguments that are not a tuple")
    return func(*func_args)


def _make_ordered_dict(*args):
    if len(args) > 1:
        raise _Bad("collections.OrderedDict called with more than one argument")
    out = _StateDict()
    if args:
        items = args[0]
        if not isinstance(items, (list, tuple)) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in items):
            raise _Bad("collections.OrderedDict was given something other than a list of pairs")
        for k, v in items:
            out[k] = v
    return out


def _make_size(*args):
    _args("torch.Size", args, 0, 1)
    if args and not isinstance(args[0], (list, tuple)):
        raise _Bad("torch.Size was given something other than a list")
    return tuple(args[0]) if args else ()


def _globals_table() -> dict[tuple[str, str], Callable[[], object]]:
    """Every (module, name) the unpickler will answer, each with a factory for its stand-in.

    Factories make fresh stand-ins per load, so nothing one hostile file does can be seen by
    the next load."""
    table: dict[tuple[str, str], Callable[[], object]] = {}
    fns = {
        ("collections", "OrderedDict"): (_make_ordered_dict, False),
        ("torch._utils", "_rebuild_tensor"): (_rebuild_tensor, True),
        ("torch._utils", "_rebuild_tensor_v2"): (_rebuild_tensor_v2, True),
        ("torch._utils", "_rebuild_tensor_v3"): (_rebuild_tensor_v3, True),
        ("torch._utils", "_rebuild_parameter"): (_rebuild_parameter, True),
        ("torch._utils", "_rebuild_parameter_with_state"): (_rebuild_parameter_with_state, True),
        ("torch._tensor", "_rebuild_from_type_v2"): (_rebuild_from_type_v2, False),
        ("torch", "Size"): (_make_size, False),
    }
    for (mod, name), (fn, rebuilds) in fns.items():
        table[(mod, name)] = (lambda q=f"{mod}.{name}", f=fn, r=rebuilds: _Function(q, f, r))
    for name in _DTYPES:
        table[("torch", name)] = (lambda n=name: _dtype(n))
    for alias, name in _DTYPE_ALIASES.items():
        table[("torch", alias)] = (lambda n=name: _dtype(n))
    for prefix, name in _STORAGE_DTYPES.items():
        for mod in ("torch", "torch.cuda"):
            for kind in ("Storage", "Tensor"):
                q = f"{mod}.{prefix}{kind}"
                table[(mod, prefix + kind)] = (lambda q=q, n=name: _StorageType(q, _dtype(n)))
    for mod in ("torch", "torch.storage"):
        table[(mod, "UntypedStorage")] = (lambda q=f"{mod}.UntypedStorage": _StorageType(q, _dtype("uint8")))
    for mod, name in (("torch", "Tensor"), ("torch.nn.parameter", "Parameter"), ("torch.nn", "Parameter")):
        table[(mod, name)] = (lambda q=f"{mod}.{name}": _TensorType(q))
    return table


_GLOBALS = _globals_table()


class _RestrictedUnpickler(pickle._Unpickler):
    """The pure-Python unpickler, restricted.

    Pure Python rather than the C one: the C unpickler sizes its memo table from the indices in
    the stream, so a tiny hostile pickle (one PUT at index 2**31) can make it allocate and clear
    gigabytes. Checkpoint pickles are small (about a hundred bytes per tensor), so speed is moot.
    """

    def __init__(self, file, persistent_load: Callable[[object], object]):
        super().__init__(file, fix_imports=False, encoding="utf-8", errors="strict")
        self._persistent = persistent_load
        self._made: dict[tuple[str, str], object] = {}

    def find_class(self, module, name):
        key = (str(module), str(name))
        if not all(part.isidentifier() for part in key[0].split(".") + key[1].split(".")):
            # e.g. a GLOBAL cut short by truncation; not worth calling a reference to code
            raise _Bad(f"malformed global name {_one_line(repr(key[0] + ' ' + key[1]), 80)}")
        if key not in _GLOBALS:
            raise _Refused(*key)
        if key not in self._made:
            self._made[key] = _GLOBALS[key]()
        return self._made[key]

    def persistent_load(self, pid):
        return self._persistent(pid)


def _one_line(text: str, limit: int = 160) -> str:
    text = "".join(c if c.isprintable() else " " for c in str(text)).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unpickle(path: str, data_or_file, persistent_load, what: str, invalid: str | None = None):
    try:
        return _RestrictedUnpickler(data_or_file, persistent_load).load()
    except _Refused as r:
        special = _SPECIAL_TENSORS.get(r.name) if r.module == "torch._utils" else None
        ref = show_name(f"{r.module}.{r.name}")
        if special:
            raise KilnError(path, f"refusing to load: the pickle references {ref} ({special}), which kiln cannot read") from None
        raise KilnError(path, f"refusing to load: the pickle references {ref}, which is not a tensor") from None
    except _Bad as b:
        raise KilnError(path, invalid or f"{what}: {b}") from None
    except KilnError:
        raise
    except EOFError:
        raise KilnError(path, f"{what} is truncated") from None
    except RecursionError:
        raise KilnError(path, f"{what} is nested too deeply") from None
    except MemoryError:
        raise KilnError(path, f"{what} needs more memory than is available") from None
    except Exception as e:   # anything the unpickler or a stand-in raised on bad input
        if invalid:
            raise KilnError(path, invalid) from None
        raise KilnError(path, f"{what} is not a valid pickle ({type(e).__name__}: {_one_line(e)})") from None


# ---- tensors -------------------------------------------------------------------------------

def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _make_weight(path: str, name: str, ref: _TensorRef) -> Weight:
    where = f"tensor {show_name(name)}"
    dtype, storage = ref.dtype, ref.storage
    if dtype.format_name is None:
        raise KilnError(path, f"{where} has dtype {dtype.torch_name}, which kiln does not support "
                              "(supported: float32, float16, bfloat16, float64, int8, int16, int32, int64)")
    size, stride, offset = ref.size, ref.stride, ref.offset
    if not isinstance(size, (tuple, list)) or not all(_is_int(d) and d >= 0 for d in size):
        raise KilnError(path, f"{where}: size is not a list of non-negative integers")
    if not isinstance(stride, (tuple, list)) or not all(_is_int(s) and 0 <= s < 2**63 for s in stride):
        raise KilnError(path, f"{where}: stride is not a list of non-negative integers")
    if len(size) != len(stride):
        raise KilnError(path, f"{where}: size has {len(size)} dimensions but stride has {len(stride)}")
    if len(size) > MAX_NDIM:
        raise KilnError(path, f"{where} has {len(size)} dimensions (at most {MAX_NDIM})")
    if not _is_int(offset) or not 0 <= offset < 2**63:
        raise KilnError(path, f"{where}: storage offset is not a non-negative integer")
    fmt = _formats.get(dtype.format_name)
    size, stride = tuple(size), tuple(stride)
    isz = dtype.itemsize
    numel = 1
    for d in size:
        numel *= d
    if math.prod(d for d in size if d) * max(isz, 4) >= 2**63:
        # an empty tensor ([0, 2**62]) can claim such a size: numpy refuses to shape it, even
        # with no elements, and so would any use of it
        raise KilnError(path, f"{where}: size {reprlib.repr(size)} is too large for 64-bit sizes")
    if numel == 0:
        return Weight(size, fmt, lambda: np.empty(0, dtype=np.uint8), name=name, origin=path)
    last = offset + sum((d - 1) * s for d, s in zip(size, stride))   # highest element touched
    if (last + 1) * isz > storage.nbytes:
        raise KilnError(path, f"{where} reaches byte {(last + 1) * isz} of {storage!r}, which holds only {storage.nbytes}")
    if numel * isz > storage.nbytes:
        # strides that repeat elements (0 for an expanded dimension): a tiny file could claim a
        # tensor of terabytes, and kiln copies a view out into a tensor of its own
        raise KilnError(path, f"{where} has {numel} elements, more than the {storage.nbytes // isz} of {storage!r} "
                              "(overlapping strides, as torch's expand makes, are not supported)")

    contiguous, expect = True, 1
    for d, s in zip(reversed(size), reversed(stride)):
        if d != 1 and s != expect:
            contiguous = False
        expect *= d
    load_storage = storage.load
    if contiguous:
        begin, end = offset * isz, (offset + numel) * isz

        def load():
            return load_storage()[begin:end]
    else:
        # A strided view (a transpose, a column): gather it from the bounds-checked storage.
        # Bytes are viewed as an extra trailing axis so any element type works the same way.
        shape = size + (isz,)
        strides = tuple(s * isz if d > 1 else 0 for d, s in zip(size, stride)) + (1,)
        start = offset * isz

        def load():
            buf = np.asarray(load_storage())[start:]
            view = np.lib.stride_tricks.as_strided(buf, shape=shape, strides=strides, writeable=False)
            return np.ascontiguousarray(view).reshape(-1)
    return Weight(size, fmt, load, name=name, origin=path)


def _describe(obj) -> str:
    if isinstance(obj, _Token):
        return repr(obj)
    return type(obj).__name__


def _collect(path: str, root) -> TorchCheckpoint:
    """Walk the unpickled object, turning tensor stand-ins into Weights keyed by dotted path."""
    out = TorchCheckpoint()
    seen: set[int] = set()
    stack = [("", root, 0)]
    visited = 0
    while stack:
        name, obj, depth = stack.pop()
        visited += 1
        if visited > MAX_NODES:
            raise KilnError(path, f"the saved object has more than {MAX_NODES} entries")
        if isinstance(obj, _TensorRef):
            if name in out:
                raise KilnError(path, f"two tensors are both named {show_name(name)}")
            out[name] = _make_weight(path, name, obj)
            continue
        if isinstance(obj, (dict, list, tuple)):
            if not obj:
                continue   # nothing inside (and CPython shares one empty tuple, so no repeat check)
            if id(obj) in seen:
                # Containers repeated through the pickle memo (or cycles) are walked once:
                # a repeated walk could grow exponentially on a crafted file.
                out.skipped[name] = f"repeat of an earlier {type(obj).__name__}"
                continue
            seen.add(id(obj))
            if depth >= MAX_DEPTH:
                raise KilnError(path, f"the saved object is nested more than {MAX_DEPTH} levels deep")
            if isinstance(obj, dict):
                children = []
                for k, v in obj.items():
                    if not isinstance(k, (str, int)) or isinstance(k, bool):
                        out.skipped[f"{name}[?]" if name else "[?]"] = f"entry with a {_describe(k)} key"
                        continue
                    children.append((f"{name}.{k}" if name else str(k), v))
            else:
                children = [(f"{name}.{i}" if name else str(i), v) for i, v in enumerate(obj)]
            for child_name, child in reversed(children):
                stack.append((child_name, child, depth + 1))
            continue
        out.skipped[name] = _describe(obj)
    return out


# ---- containers ----------------------------------------------------------------------------

def _check_storage_pid(pid, length: int):
    if not isinstance(pid, tuple) or not pid:
        raise _Bad("persistent id is not a tuple")
    if pid[0] == "module":
        raise _Refused("torch.nn", "Module (source code saved with the model)")
    if pid[0] != "storage" or len(pid) != length:
        raise _Bad(f"persistent id {_one_line(repr(pid[0]), 40)} is not a storage reference")
    stype, key, _location, numel = pid[1:5]
    if not isinstance(stype, _StorageType):
        raise _Bad("storage reference has no storage type")
    if not isinstance(key, str) or not _is_int(numel) or numel < 0:
        raise _Bad("storage reference has a malformed key or element count")
    return stype, key, numel


def _read_zip(path: str, size: int) -> TorchCheckpoint:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, OSError) as e:
        raise KilnError(path, f"not a valid zip archive (truncated or corrupt?): {_one_line(e)}") from None
    with zf:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        if len(set(names)) != len(names):
            # two members of one name: readers could disagree on which one holds the data
            dup = next(n for n, c in collections.Counter(names).items() if c > 1)
            raise KilnError(path, f"zip archive lists member {show_name(dup)} twice")
        pkls = [n for n in names if n == "data.pkl" or (n.endswith("/data.pkl") and n.count("/") == 1)]
        if not pkls:
            raise KilnError(path, "zip archive has no data.pkl: not a PyTorch checkpoint")
        if len(pkls) > 1:
            raise KilnError(path, f"zip archive has {len(pkls)} data.pkl members; expected one")
        prefix = pkls[0][: -len("data.pkl")]
        by_name = {i.filename: i for i in infos}

        order = by_name.get(prefix + "byteorder")
        if order is not None:
            text = _read_member(path, zf, order, 16).strip()
            if text != b"little":
                raise KilnError(path, f"checkpoint byte order is {_one_line(text.decode('latin-1'), 20)!r}; kiln reads little-endian only")

        pkl_info = by_name[pkls[0]]
        if pkl_info.file_size > MAX_PICKLE_BYTES:
            raise KilnError(path, f"data.pkl is {pkl_info.file_size} bytes, over the {MAX_PICKLE_BYTES}-byte limit")
        data = _read_member(path, zf, pkl_info, MAX_PICKLE_BYTES)

        mapping = _LazyMap(path, size)
        storages: dict[tuple[str, str], _Storage] = {}

        def persistent_load(pid):
            stype, key, numel = _check_storage_pid(pid, 5)
            cached = storages.get((key, stype.dtype.torch_name))
            if cached is not None:
                return cached
            member = f"{prefix}data/{key}"
            info = by_name.get(member)
            if info is None:
                raise _Bad(f"storage {show_name(key)} has no member {show_name(member)} in the archive")
            nbytes = numel * stype.dtype.itemsize
            if info.file_size != nbytes:
                raise _Bad(f"storage {show_name(key)} should hold {numel} {stype.dtype.torch_name} elements "
                           f"({nbytes} bytes) but its member holds {info.file_size} bytes")
            storage = _Storage(key, stype.dtype, nbytes, _member_loader(path, size, zf.fp, info, mapping))
            storages[(key, stype.dtype.torch_name)] = storage
            return storage

        root = _unpickle(path, io.BytesIO(data), persistent_load, "data.pkl")
    return _collect(path, root)


def _read_member(path: str, zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    try:
        with zf.open(info) as f:
            data = f.read(limit + 1)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError, NotImplementedError, ValueError) as e:
        raise KilnError(path, f"cannot read zip member {show_name(info.filename)}: {_one_line(e)}") from None
    if len(data) > limit:
        raise KilnError(path, f"zip member {show_name(info.filename)} is over the {limit}-byte limit")
    return data


def _member_loader(path: str, size: int, fp, info: zipfile.ZipInfo, mapping: _LazyMap):
    """A load function for one storage member: a slice of the file's memory map when the member
    is stored as is, else a decompressing read on demand."""
    if info.file_size == 0:
        return lambda: np.empty(0, dtype=np.uint8)
    if info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 1:
        # The data starts after the member's local header, whose name and extra field lengths
        # may differ from the central directory's (torch pads the extra field to align data).
        fp.seek(info.header_offset)
        local = fp.read(30)
        if len(local) != 30 or local[:4] != b"PK\x03\x04":
            raise _Bad(f"zip member {show_name(info.filename)} has no valid local header")
        start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
        if info.compress_size != info.file_size or start + info.file_size > size:
            raise _Bad(f"zip member {show_name(info.filename)} runs past the end of the file")
        return mapping.slice(start, start + info.file_size)

    name, expected = info.filename, info.file_size

    def load():
        with zipfile.ZipFile(path) as z:
            raw = _read_member(path, z, z.getinfo(name), expected)
        if len(raw) != expected:
            raise KilnError(path, f"zip member {show_name(name)} holds {len(raw)} bytes, {expected} expected")
        return np.frombuffer(raw, dtype=np.uint8)
    return load


def _read_legacy(path: str, size: int) -> TorchCheckpoint:
    pending: dict[str, list] = {}    # root key -> [dtype, numel, storage objects waiting for an offset]
    offsets: dict[str, int] = {}
    mapping = _LazyMap(path, size)

    def persistent_load(pid):
        stype, key, numel = _check_storage_pid(pid, 6)
        if pid[5] is not None:
            raise _Bad("storage views (saved by PyTorch before 1.0) are not supported")
        entry = pending.setdefault(key, [stype.dtype, numel])
        if entry[1] != numel or entry[0].itemsize != stype.dtype.itemsize:
            raise _Bad(f"storage {show_name(key)} is declared twice with different sizes")
        nbytes = numel * stype.dtype.itemsize

        def load(key=key, nbytes=nbytes):
            start = offsets[key]
            return mapping.slice(start, start + nbytes)()
        return _Storage(key, stype.dtype, nbytes, load)

    try:
        with open(path, "rb") as f:
            magic = _unpickle(path, f, _no_persistent, "file",
                              invalid="not a PyTorch checkpoint (neither a zip archive nor a pickle)")
            if magic != _LEGACY_MAGIC:
                raise KilnError(path, "not a PyTorch checkpoint (a pickle, but without torch's magic number)")
            if _unpickle(path, f, _no_persistent, "protocol header") != _LEGACY_PROTOCOL:
                raise KilnError(path, "unknown PyTorch legacy protocol version")
            info = _unpickle(path, f, _no_persistent, "system info")
            if not isinstance(info, dict) or info.get("little_endian") is not True:
                raise KilnError(path, "checkpoint is big-endian or lacks system info; kiln reads little-endian only")
            root = _unpickle(path, f, persistent_load, "pickle")
            keys = _unpickle(path, f, _no_persistent, "storage key list")
            if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
                raise KilnError(path, "storage key list is not a list of strings")
            for key in keys:
                if key in offsets:
                    raise KilnError(path, f"storage {show_name(key)} is listed twice")
                if key not in pending:
                    raise KilnError(path, f"storage {show_name(key)} is listed but no tensor uses it")
                dtype, numel = pending[key]
                head = f.read(8)
                if len(head) != 8:
                    raise KilnError(path, f"file ends before storage {show_name(key)}")
                count = int.from_bytes(head, "little")
                if count != numel:
                    raise KilnError(path, f"storage {show_name(key)} holds {count} elements but the pickle declares {numel}")
                start = f.tell()
                end = start + numel * dtype.itemsize
                if end > size:
                    raise KilnError(path, f"storage {show_name(key)} runs past the end of the file")
                offsets[key] = start
                f.seek(end)
            missing = [k for k in pending if k not in offsets]
            if missing:
                raise KilnError(path, f"storage {show_name(missing[0])} is used but its data is missing")
    except OSError as e:
        raise KilnError(path, f"cannot read: {e.strerror or e}") from None
    return _collect(path, root)


def _no_persistent(pid):
    raise _Bad("unexpected storage reference")


def read_torch_bin(path) -> TorchCheckpoint:
    """The tensors of a PyTorch checkpoint as lazy Weights, without executing its pickle.

    Raises KilnError for a file that is not a checkpoint, is malformed, references anything but
    tensors in its pickle, or holds tensors of a dtype kiln cannot store.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            if not os.path.isfile(path):
                raise KilnError(path, "not a regular file")
            size = os.fstat(f.fileno()).st_size
            head = f.read(512)
    except KilnError:
        raise
    except OSError as e:
        raise KilnError(path, f"cannot read: {e.strerror or e}") from None
    if size == 0:
        raise KilnError(path, "empty file")
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06") or (head[:1] != b"\x80" and zipfile.is_zipfile(path)):
        return _read_zip(path, size)
    if head[257:262] == b"ustar":
        raise KilnError(path, "tar-format checkpoint (PyTorch before 0.4) is not supported; re-save it with a newer torch")
    # Anything else goes to the restricted unpickler, so a hostile pickle of any protocol is
    # reported as such; a file that is no pickle at all fails on its first opcode.
    return _read_legacy(path, size)
