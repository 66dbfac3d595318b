"""Compile the Relax module and write the TVM artifact's files.

The weights are stored once, in ``weights.safetensors`` (blocks as they are, see
:mod:`.quant_kernels`), and passed to the library as one tuple; the library holds the code
only: ``model.so`` for this machine and CUDA (whose device code stays CUDA source, compiled
by NVRTC when loaded on the GPU machine), ``model.tar`` (objects) for Metal and cross-compiled
CPUs, linked on the machine that runs them.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from kiln.ir import Graph

from kiln.runtime.backend_entry import KVCache, TVMEntry

from .targets import for_preset

WEIGHTS = "weights.safetensors"
#: what running the artifact needs
REQUIRES = ["apache-tvm==0.27.0.post1", "apache-tvm-ffi==0.1.14.post0"]


def build(graph: Graph, out_dir, preset, config: dict, *,
          progress: Callable[[str], None] | None = None, stage: Callable[[str], None] | None = None,
          precision: str = "exact", kv_dtype: str = "float32") -> TVMEntry:
    """Compile for ``preset`` (``kiln.targets.presets``) and write the library and weights into
    ``out_dir``; returns the entry naming them. ``kv_dtype`` "float16" halves the bytes
    attention reads per token at long context (as llama.cpp's default cache does); "float32"
    keeps the cache exact."""
    from kiln.frontends.arch import ArchConfig, rope_switch_length

    from .lower import ENTRY_POINTS, Target, lower
    out_dir = Path(out_dir)
    target = for_preset(preset)
    max_length = config.get("max_position_embeddings")
    say = stage or (lambda s: None)
    say("lowering to TVM Relax")
    mod, plan = lower(graph, Target(target.target, target.gpu, exact=precision == "exact", kv_dtype=kv_dtype),
                      max_length)
    compile_s, device = _compile_and_write(mod, plan, target, out_dir, say, progress)
    from .lower import cache_shape
    kv_heads, head_dim = cache_shape(graph)
    layers = sum(1 for n in graph.nodes if n.op == "Attention")
    return TVMEntry(library=target.library, weights=WEIGHTS, params=[p.name for p in plan.params],
                    kv=KVCache(layers, kv_heads, head_dim, plan.mode, kv_dtype), requires=list(REQUIRES),
                    max_length=plan.max_length, recompute_cache_after=rope_switch_length(ArchConfig.from_dict(config)),
                    cpu_features=sorted(preset.cpu_flags), cross_compiled_for=target.cross,
                    why_uniform=plan.why_uniform or None,
                    details={"entry_points": list(ENTRY_POINTS), "target": target.target, "host": target.host,
                             "weight_formats": plan.formats, "tvm_compile_seconds": round(compile_s, 2), **device})


def _compile_and_write(mod, plan, target, out_dir: Path, say, progress):
    """tvm.compile the module, export its library (and a GPU's device source) and write the
    plan's weights; returns the compile's seconds and the device source's manifest fields."""
    import tvm
    say("compiling with TVM")
    t0 = time.perf_counter()
    tvm_target = tvm.target.Target(target.target, host=target.host) if target.host else tvm.target.Target(target.target)
    executable = tvm.compile(mod, target=tvm_target)
    compile_s = time.perf_counter() - t0
    export(executable, out_dir / target.library)
    device = write_device_source(executable, out_dir) if target.gpu else {}
    say("writing weights")
    write_weights(out_dir / WEIGHTS, plan.params, progress)
    return compile_s, device


def build_plain(graph: Graph, out_dir, preset, *, progress: Callable[[str], None] | None = None,
                stage: Callable[[str], None] | None = None, precision: str = "exact") -> dict:
    """A library with one entry point, ``main(*graph inputs, params) -> (outputs...)``, for a
    graph without a KV cache (an embedding model's: token ids and mask in, vectors out);
    returns the manifest's backend entry."""
    from .lower import Target, lower_plain
    out_dir = Path(out_dir)
    target = for_preset(preset)
    say = stage or (lambda s: None)
    say("lowering to TVM Relax")
    mod, plan = lower_plain(graph, Target(target.target, target.gpu, exact=precision == "exact"))
    compile_s, device = _compile_and_write(mod, plan, target, out_dir, say, progress)
    return {"name": "tvm", **({"cross_compiled_for": target.cross} if target.cross else {}),
            **({"cpu_features": sorted(preset.cpu_flags)} if preset.cpu_flags else {}),
            "recompute_cache_after": None, "requires": list(REQUIRES),
            "library": target.library, "weights": WEIGHTS, "params": [p.name for p in plan.params],
            "entry_points": ["main"], "inputs": [v.name for v in graph.inputs],
            "outputs": [v.name for v in graph.outputs], "target": target.target, "host": target.host,
            "weight_formats": plan.formats, "tvm_compile_seconds": round(compile_s, 2), **device}


#: numpy dtype -> safetensors dtype (bf16 weights are stored as their uint16 bits)
SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "int64": "I64", "int32": "I32", "int16": "I16",
                      "int8": "I8", "uint32": "U32", "uint16": "U16", "uint8": "U8", "float64": "F64"}


def write_weights(path: Path, params: list, progress: Callable[[str], None] | None = None) -> None:
    """The weights as safetensors, written one tensor at a time: memory holds what the
    lowering made and nothing more (the safetensors package's writer first joins every tensor
    into one buffer, a second copy of the model). A failed write raises the OSError itself."""
    header, offset = {}, 0
    for p in params:
        header[p.name] = {"dtype": SAFETENSORS_DTYPES[p.array.dtype.name], "shape": list(p.array.shape),
                          "data_offsets": [offset, offset + p.array.nbytes]}
        offset += p.array.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)           # the data section 8-byte aligned, as the format's writer does
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for p in params:
            if p.array.nbytes:
                f.write(memoryview(np.ascontiguousarray(p.array).reshape(-1)).cast("B"))
            if progress:
                progress(p.name)


def export(executable, path: Path) -> None:
    """Write the library. LLVM ends the whole process when it cannot write an object file (a
    full disk: "LLVM ERROR: IO failure on output stream"), which would skip kiln's clean-up of
    the half-built artifact and its one-line error, so on Linux the export runs in a forked
    child and its failure comes back here as the OSError it was."""
    # TVM's object files go beside the library, not to /tmp: a full disk then fails where
    # the artifact is written, and nothing is left elsewhere
    workspace = path.parent / ".tvm-build"
    workspace.mkdir()
    try:
        _export(executable, path, workspace)
    finally:
        shutil.rmtree(workspace, ignore_errors=True)


def _export(executable, path: Path, workspace: Path) -> None:
    if not sys.platform.startswith("linux"):
        # macOS forbids much in a forked child once Objective-C (TVM's Metal runtime) is up
        executable.export_library(str(path), workspace_dir=str(workspace))
        return
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:                                   # the child: its stderr goes to the parent
        code = 0
        try:
            os.close(read_end)
            os.dup2(write_end, 2)
            executable.export_library(str(path), workspace_dir=str(workspace))
        except BaseException as e:                 # noqa: BLE001 - reported through the pipe
            os.write(2, f"{type(e).__name__}: {e}".encode(errors="replace"))
            code = 3
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        message = f.read().decode(errors="replace").strip()
    _, status = os.waitpid(pid, 0)
    if status == 0:
        return
    for code in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EIO):
        if os.strerror(code) in message:
            raise OSError(code, os.strerror(code), str(path))
    last = message.splitlines()[-1] if message else f"exit status {status}"
    raise RuntimeError(f"TVM could not write the library {path.name}: {last[:300]}")


def _device_modules(module):
    """The modules under the executable's library that hold device code (cuda, metal)."""
    found, stack = [], [module]
    while stack:
        m = stack.pop()
        if m.kind in DEVICE_SOURCE:
            found.append(m)
        stack.extend(m.imports)
    return found


#: device-code module kind -> (file written beside the library, kernel declaration pattern)
DEVICE_SOURCE = {"cuda": ("device_code.cu", r"__global__ void(?: __launch_bounds__\(\d+\))? (\w+)\("),
                 "metal": ("device_code.metal", r"kernel void (\w+)\(")}


def write_device_source(executable, out_dir: Path) -> dict:
    """A readable copy of the GPU kernels (the library carries its own) and their names."""
    import re
    out = {}
    for m in _device_modules(executable.mod):
        name, pattern = DEVICE_SOURCE[m.kind]
        src = m.inspect_source("")
        (out_dir / name).write_text(src)
        out = {"device_source": name, "kernels": sorted(set(re.findall(pattern, src)))}
    return out
