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
          progress: Callable[[str], None] | None = None, stage: Callable[[str], None] | None = None) -> dict:
    import tvm
    from safetensors.numpy import save_file

    from .lower import ENTRY_POINTS, Target, lower
    out_dir = Path(out_dir)
    say = stage or (lambda s: None)
    say("lowering to TVM Relax")
    mod, plan = lower(graph, Target(target.target, target.gpu), max_length)
    say("compiling with TVM")
    t0 = time.perf_counter()
    tvm_target = tvm.target.Target(target.target, host=target.host) if target.host else tvm.target.Target(target.target)
    executable = tvm.compile(mod, target=tvm_target)
    compile_s = time.perf_counter() - t0
    executable.export_library(str(out_dir / target.library))
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
            "kv_cache": {"mode": plan.mode, "layers": layers, "kv_heads": kv_heads,
                         "head_dim": head_dim, **({"why_uniform": plan.why_uniform} if plan.why_uniform else {})},
            "max_length": plan.max_length, "weight_formats": plan.formats,
            "tvm_compile_seconds": round(compile_s, 2), "kernels": _kernel_names(executable)}


def _kernel_names(executable) -> list:
    """The compiled functions' names, for inspect and the tests."""
    try:
        lib = executable.mod if hasattr(executable, "mod") else executable
        names = set()
        for m in [lib] + list(getattr(lib, "imported_modules", [])):
            for n in getattr(m, "get_function_names", lambda: [])() or []:
                names.add(str(n))
        return sorted(names)
    except Exception:           # a listing only; a module kind without one lists nothing
        return []
