"""TVM's runtime reached through ``tvm_ffi`` alone: load a compiled library, start its Relax
VM, and move tensors in and out.

Running an artifact needs only TVM's runtime library (``libtvm_runtime``, ~3 MB) and the FFI
it is built on. ``import tvm`` brings ~100 Python modules of the compiler's IR with it,
about 35 MB of memory that a process which only runs artifacts never uses, so on the CPU
this module loads the runtime library itself -- from the same place ``import tvm`` would,
so a later ``import tvm`` in the same process (a test that compiles too) finds it loaded.
Every call then goes through the runtime's registered global functions, which are the same
whichever way the library came in. GPU devices also need TVM's device-runtime sidecars,
which ``import tvm`` loads with its own rules, so for them this module imports TVM.
"""
from __future__ import annotations

import ctypes
import importlib.util
import math
import os
import sys
from pathlib import Path

import numpy as np

from .heap import mapped_zeros, release_free_heap

# DLPack device type codes (dlpack.h)
DEVICE_CODES = {"cpu": 1, "cuda": 2, "metal": 8}
NAIVE_ALLOCATOR, POOLED_ALLOCATOR = 1, 2      # the Relax VM's allocator kinds


class RuntimeMissing(ImportError):
    """Apache TVM (or its runtime library) is not installed."""


def _runtime_library_dirs() -> list[Path]:
    """Where ``import tvm`` looks for its libraries (tvm/libinfo.py), found without importing tvm."""
    spec = importlib.util.find_spec("tvm")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeMissing("tvm")
    pkg = Path(next(iter(spec.submodule_search_locations)))
    dirs = [Path(os.environ["TVM_LIBRARY_PATH"])] if os.environ.get("TVM_LIBRARY_PATH") else []
    return dirs + [pkg / "lib", pkg / ".." / ".." / "build" / "lib", pkg / ".." / ".." / "lib"]


def _load_runtime_library(kind: str) -> None:
    if "tvm" in sys.modules or kind != "cpu":
        import_full_tvm()
        return
    try:
        import tvm_ffi  # noqa: F401  (loads libtvm_ffi, which the runtime library links to)
    except ImportError:
        raise RuntimeMissing("tvm_ffi") from None
    name = {"darwin": "libtvm_runtime.dylib", "win32": "tvm_runtime.dll"}.get(sys.platform, "libtvm_runtime.so")
    for d in _runtime_library_dirs():
        if (d / name).is_file():
            ctypes.CDLL(str((d / name).resolve()), ctypes.RTLD_GLOBAL)
            return
    import_full_tvm()                  # an unusual layout: let TVM find its own library


def import_full_tvm() -> None:
    """``import tvm``: the compiler's library, with the functions the runtime-only library
    lacks (``tvm.contrib.*``, which Relax ops such as ``topk`` lower to)."""
    try:
        import tvm  # noqa: F401
    except ImportError:
        raise RuntimeMissing("tvm") from None


class TVMRuntime:
    """One device's runtime: tensors on it, libraries for it."""

    def __init__(self, kind: str):
        _load_runtime_library(kind)
        import tvm_ffi
        self._ffi = tvm_ffi
        self.kind = kind
        self.code = DEVICE_CODES[kind]
        self.device = tvm_ffi.device(kind, 0)
        get = tvm_ffi.get_global_func
        self._alloc = get("runtime.TVMTensorAllocWithScope")
        self._from_bytes = get("runtime.TVMTensorCopyFromBytes")
        self._to_bytes = get("runtime.TVMTensorCopyToBytes")
        self._view = get("runtime.TVMTensorCreateView")
        self._device_attr = get("runtime.GetDeviceAttr")
        self._clear_pool = get("vm.builtin.memory_manager.clear")

    @property
    def device_exists(self) -> bool:
        try:
            return self._device_attr(self.code, 0, 0) != 0
        except Exception:                 # the device's runtime is not in this build of TVM
            return False

    # ---- libraries ------------------------------------------------------------------------
    def load_vm(self, library: Path):
        """The library's Relax VM, initialized for this device (and the CPU, which runs the
        shape computations), with pooled memory (the naive allocator's malloc and free of every
        buffer on every call made SmolLM2's decode 40% slower)."""
        module = self._ffi.load_module(str(library))
        vm = module["vm_load_executable"]()
        init = [self.code, 0, POOLED_ALLOCATOR]
        if self.kind != "cpu":
            init += [DEVICE_CODES["cpu"], 0, POOLED_ALLOCATOR]
        vm["vm_initialization"](*init)
        return vm

    def release_pooled_memory(self) -> None:
        """Free the blocks the VM's pooled allocator keeps for reuse. It keeps one set per
        distinct size, so prompts of many lengths would each leave their activations behind
        (SmolLM2: ~130 KB a token); decode steps reuse theirs either way."""
        self._clear_pool()
        release_free_heap()         # what the pool gave back to the C heap, to the system

    # ---- tensors --------------------------------------------------------------------------
    def empty(self, shape, dtype: str):
        return self._alloc(self._ffi.Shape([int(d) for d in shape]), self._ffi.dtype(dtype), self.device, None)

    def tensor(self, arr: np.ndarray):
        """A device copy of ``arr``."""
        arr = np.ascontiguousarray(arr)
        t = self.empty(arr.shape, arr.dtype.name)
        self.copy_in(t, arr)
        return t

    def copy_in(self, t, arr: np.ndarray) -> None:
        """``t`` (a tensor or a view, of ``arr``'s shape and dtype) takes ``arr``'s values."""
        arr = np.ascontiguousarray(arr)
        if arr.size:
            self._from_bytes(t, arr.ctypes.data_as(ctypes.c_void_p), arr.nbytes)

    def mapped_zeros(self, shape, dtype: str):
        """A CPU tensor of zeros in its own anonymous memory map: its pages become resident
        only when written and go back to the system when the tensor is freed (memory from the
        C heap can be recycled, already resident, and is kept after a free)."""
        return self._ffi.from_dlpack(mapped_zeros(shape, dtype))   # no copy; the tensor keeps the map alive

    def zeros(self, shape, dtype: str):
        t = self.empty(shape, dtype)
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        if self.kind == "cpu":
            ctypes.memset(t.data_ptr(), 0, nbytes)
        elif nbytes:
            self._from_bytes(t, np.zeros(nbytes, np.uint8).ctypes.data_as(ctypes.c_void_p), nbytes)
        return t

    def host(self, t) -> np.ndarray:
        """``t`` as a numpy array: on the CPU a view of its memory (which it keeps alive), so a
        call's logits are not copied; elsewhere a copy."""
        return np.from_dlpack(t) if self.kind == "cpu" else self.numpy(t)

    def numpy(self, t) -> np.ndarray:
        """A host copy of ``t`` (float32, int64, ... -- not bfloat16)."""
        out = np.empty(tuple(t.shape), dtype=np.dtype(str(t.dtype)))
        if out.size:
            self._to_bytes(t, out.ctypes.data_as(ctypes.c_void_p), out.nbytes)
        return out

    def view(self, t, shape, byte_offset: int):
        """A tensor of ``shape`` over ``t``'s memory from ``byte_offset`` on (no copy)."""
        return self._view(t, self._ffi.Shape([int(d) for d in shape]), t.dtype, byte_offset)

    def array(self, items: list):
        """An FFI array of ``items`` (tensors), to pass to a function as one argument."""
        return self._ffi.convert(list(items))

    def shape(self, values):
        return self._ffi.Shape([int(v) for v in values])

    def read_into(self, f, start: int, nbytes: int, shape, dtype: str):
        """A tensor filled with ``nbytes`` of file ``f`` from ``start``. On the CPU the bytes
        go straight into the tensor's memory; elsewhere through one host buffer per tensor."""
        t = self.empty(shape, dtype)
        if not nbytes:
            return t
        f.seek(start)
        if self.kind == "cpu":
            buf = (ctypes.c_char * nbytes).from_address(t.data_ptr())
            got = f.readinto(memoryview(buf).cast("B"))
        else:
            host = np.empty(nbytes, np.uint8)
            got = f.readinto(memoryview(host))
            self._from_bytes(t, host.ctypes.data_as(ctypes.c_void_p), nbytes)
        if got != nbytes:
            raise EOFError(f"{nbytes - got} bytes short")
        return t

