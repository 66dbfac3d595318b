"""The TVM backend's float-weight matmuls (targets/tvm/float_kernels.py) against numpy and
ONNX Runtime, on SmolLM2-135M's matmul shapes (random values; only the shapes matter).

Shapes (N x K): merged q/k/v 960x576, o 576x576, merged gate/up 3072x576, down 576x1536, the
LM head 49152x576; row counts 1 (a decode step) and 130 (a prefill). Engines:

* ``tvm``: float_kernels.matmul on a bf16 weight (stored as bf16, widened in the kernel)
* ``tvm-relax``: what the lowering did before, ``relax.op.matmul`` on a float32 [K, N] copy
* ``numpy``: ``x @ w32.T`` with a float32 weight, one BLAS thread
* ``ort``: ONNX Runtime's MatMul on a float32 [K, N] initializer (there is no bf16 MatMul
  on its CPU provider), input and outputs bound once (IOBinding)

Each engine runs in a process of its own (engines sharing a process fight over 2 cores). One
call applies ``copies`` different weight copies, at least 64 MB of them (more than this
machine's 32 MB last-level cache), so weights stream from memory as they do in a decode step;
the time per product is the best of several rounds.

    .venv/bin/python benchmarks/tvm_float_matmul.py [--engines tvm,numpy,ort] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576)}
ROWS = (1, 130)
STREAM_BYTES = 64 << 20


def _copies(n: int, k: int, itemsize: int) -> int:
    return max(1, min(128, -(-STREAM_BYTES // (n * k * itemsize))))


def _weights(n: int, k: int, copies: int):
    rng = np.random.default_rng(0)
    return [rng.standard_normal((n, k)).astype(np.float32) for _ in range(copies)]


def _best(fn, budget_s: float = 1.0) -> float:
    fn()
    t0 = time.perf_counter()
    fn()
    one = time.perf_counter() - t0
    reps = max(3, min(50, int(budget_s / max(one, 1e-6))))
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def run_tvm(n: int, k: int, m: int, relax_matmul: bool = False) -> float:
    import tvm
    from tvm import relax

    from kiln.targets.tvm import float_kernels as F
    from kiln.weights import Weight
    target = {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()}
    copies = _copies(n, k, 4 if relax_matmul else 2)
    if relax_matmul:
        arrays = [[np.ascontiguousarray(w.T)] for w in _weights(n, k, copies)]
    else:
        arrays = [list(F.pack(Weight.from_array(w, "bf16")).values()) for w in _weights(n, k, copies)]
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([tvm.tirx.Var("m", "int64"), k], "float32"))
    params = [[relax.Var(f"w{c}_{i}", relax.TensorType(list(a.shape), str(a.dtype))) for i, a in enumerate(arrs)]
              for c, arrs in enumerate(arrays)]
    with bb.function("main", [x, *[p for ps in params for p in ps]]):
        with bb.dataflow():
            outs = [F.matmul(bb, x, ps, "bf16", n, k, target) if not relax_matmul
                    else bb.emit(relax.op.matmul(x, ps[0])) for ps in params]
            out = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(out)
    ex = tvm.compile(bb.get(), target=tvm.target.Target(target))
    dev = tvm.cpu()
    vm = relax.VirtualMachine(ex, dev)
    args = [tvm.runtime.tensor(np.random.default_rng(1).standard_normal((m, k)).astype(np.float32))]
    args += [tvm.runtime.tensor(a) for arrs in arrays for a in arrs]
    vm.set_input("main", *args)
    return _best(lambda: vm.invoke_stateful("main")) / copies


def run_numpy(n: int, k: int, m: int) -> float:
    ws = _weights(n, k, _copies(n, k, 4))
    x = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
    return _best(lambda: [x @ w.T for w in ws]) / len(ws)


def run_ort(n: int, k: int, m: int, threads: int) -> float:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    ws = _weights(n, k, _copies(n, k, 4))
    inits = [numpy_helper.from_array(np.ascontiguousarray(w.T), f"w{i}") for i, w in enumerate(ws)]
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]) for i in range(len(ws))]
    graph = helper.make_graph(nodes, "mm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
                              [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["m", n]) for i in range(len(ws))],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
    # inputs and outputs bound once: sess.run would copy every product's output to numpy
    io = sess.io_binding()
    io.bind_cpu_input("x", x)
    for i in range(len(ws)):
        io.bind_ortvalue_output(f"y{i}", ort.OrtValue.ortvalue_from_numpy(np.empty((m, n), np.float32)))
    return _best(lambda: sess.run_with_iobinding(io)) / len(ws)


def child(engine: str, threads: int) -> None:
    out = {}
    for name, (n, k) in SHAPES.items():
        for m in ROWS:
            if engine == "tvm-relax" and (m > 1 or name == "lm_head"):
                continue            # unscheduled loops: seconds per product
            if engine in ("tvm", "tvm-relax"):
                s = run_tvm(n, k, m, relax_matmul=engine == "tvm-relax")
            elif engine == "numpy":
                s = run_numpy(n, k, m)
            else:
                s = run_ort(n, k, m, threads)
            out[f"{name} {m}"] = s * 1e6
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engines", default="tvm,numpy,ort")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child")
    a = ap.parse_args()
    if a.child:
        child(a.child, a.threads)
        return
    results = {}
    for engine in a.engines.split(","):
        env = dict(os.environ, TVM_NUM_THREADS=str(a.threads), OMP_NUM_THREADS="1",
                   OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        p = subprocess.run([sys.executable, __file__, "--child", engine, "--threads", str(a.threads)],
                           env=env, capture_output=True, text=True)
        if p.returncode:
            sys.exit(f"{engine} failed:\n{p.stderr[-2000:]}")
        results[engine] = json.loads(p.stdout.strip().splitlines()[-1])
    engines = list(results)
    print("| shape (N x K) | M | " + " | ".join(f"{e} µs" for e in engines) + " |")
    print("|---|---|" + "---|" * len(engines))
    for name, (n, k) in SHAPES.items():
        for m in ROWS:
            cells = [f"{results[e][f'{name} {m}']:.1f}" if f"{name} {m}" in results[e] else "—" for e in engines]
            print(f"| {name} {n}x{k} | {m} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
