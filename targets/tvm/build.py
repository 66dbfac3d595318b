"""Compile the Relax module and write the TVM artifact's files.

The weights are stored once, in ``weights.safetensors`` (blocks as they are, see
:mod:`.quant_kernels`), and passed to the library as one tuple; the library holds the code
only: ``model.so`` for this machine and CUDA (whose device code stays CUDA source, compiled
by NVRTC when loaded on the GPU machine), ``model.tar`` (objects) for Metal and cross-compiled
CPUs, linked on the machine that runs them.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from kiln.ir import Graph

from .targets import TVMTarget

WEIGHTS = "weights.safetensors"


def build(graph: Graph, out_dir, target: TVMTarget, *, max_length: int | None = None,
          progress: Callable[[str], None] | None = None, stage: Callable[[str], None] | None = None,
          precision: str = "exact", kv_dtype: str = "float32") -> dict:
    """``kv_dtype`` "float16" halves the bytes attention reads per token at long context (as
    llama.cpp's default cache does); "float32" keeps the cache exact."""
    import tvm
    from safetensors.numpy import save_file

    from .lower import ENTRY_POINTS, Target, lower
    out_dir = Path(out_dir)
    say = stage or (lambda s: None)
    say("lowering to TVM Relax")
    mod, plan = lower(graph, Target(target.target, target.gpu, exact=precision == "exact", kv_dtype=kv_dtype),
                      max_length)
    say("compiling with TVM")
    t0 = time.perf_counter()
    tvm_target = tvm.target.Target(target.target, host=target.host) if target.host else tvm.target.Target(target.target)
    executable = tvm.compile(mod, target=tvm_target)
    compile_s = time.perf_counter() - t0
    executable.export_library(str(out_dir / target.library))
    device = write_device_source(executable, out_dir) if target.gpu else {}
    say("writing weights")
    tensors = {}
    for p in plan.params:
        tensors[p.name] = p.array
        if progress:
            progress(p.name)
    save_file(tensors, str(out_dir / WEIGHTS))
    from .lower import cache_shape
    kv_heads, head_dim = cache_shape(graph)
    layers = sum(1 for n in graph.nodes if n.op == "Attention")
    return {"library": target.library, "weights": WEIGHTS, "params": [p.name for p in plan.params],
            "entry_points": list(ENTRY_POINTS), "target": target.target, "host": target.host,
            "kv_cache": {"mode": plan.mode, "dtype": kv_dtype, "layers": layers, "kv_heads": kv_heads,
                         "head_dim": head_dim, **({"why_uniform": plan.why_uniform} if plan.why_uniform else {})},
            "max_length": plan.max_length, "weight_formats": plan.formats,
            "tvm_compile_seconds": round(compile_s, 2), **device}


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
