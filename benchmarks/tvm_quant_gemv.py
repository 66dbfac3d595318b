"""The TVM backend's quantized matmuls against ONNX Runtime's, on SmolLM2-135M's own weights.

For each of the model's matmul shapes (merged q/k/v, o, merged gate/up, down: Q4_1; the Q8_0
LM head) and a row count (1 = a decode step, 130 = a prefill), each engine runs one function
that applies the weight several times to one input, so call overheads spread out the way they
do inside a model; the time per product is reported. By default it is the same weight each
time (it stays in cache: the kernels' compute); ``--cold`` gives every product its own copy,
64 MB of them in all, so the weights stream from memory as a decode step's do (the model's
weights are ~100 MB; this machine's last-level cache 32 MB). ONNX Runtime runs what
kiln's ORT backend emits in exact mode (targets/onnxrt/lower.py ``_quant_matmul``): MatMulNBits at
accuracy level 0 plus the block-minimum product for Q4_1, Q8_0 as two exact 4-bit planes.

Each engine times in a process of its own (2 threads: ``TVM_NUM_THREADS``, ORT's intra-op
pool), in interleaved rounds; the table gives each one's best round and the median round.
Run:

    .venv/bin/python benchmarks/tvm_quant_gemv.py [--rows 1] [--rounds 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

SHAPES = ["qkv", "o", "gate_up", "down", "lm_head"]


def weights():
    """name -> Weight, from the real model (q/k/v and gate/up merged along rows, as kiln's
    merge pass does)."""
    from kiln.frontends.detect import read_model
    from kiln.frontends.known_models import resolve
    from kiln.weights import Weight
    ws = read_model(resolve("smollm2")).weights

    def rows(*names):
        parts = [ws[n] for n in names]
        fmt = parts[0].format
        shape = (sum(p.shape[0] for p in parts), parts[0].shape[1])
        return Weight(shape, fmt, lambda: np.concatenate([p.raw() for p in parts]), name="+".join(names))
    return {"qkv": rows("layers.0.q.weight", "layers.0.k.weight", "layers.0.v.weight"),
            "o": ws["layers.0.o.weight"],
            "gate_up": rows("layers.0.gate.weight", "layers.0.up.weight"),
            "down": ws["layers.0.down.weight"],
            "lm_head": ws["embed"]}


def _time(fn, repeat: int, budget_s: float = 1.5) -> float:
    """Best of several timed batches, µs per product."""
    fn()
    t0 = time.perf_counter()
    fn()
    one = time.perf_counter() - t0
    calls = max(3, int(budget_s / 5 / max(one, 1e-6)))
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best / repeat * 1e6


COLD_BYTES = 64 << 20


def repeat_for(w, cold: bool) -> int:
    if cold:
        return max(3, -(-COLD_BYTES // w.nbytes))
    return 4 if w.shape[0] > 10000 else 16


def run_tvm(rows: int, cold: bool) -> dict:
    import tvm
    from tvm import relax

    from kiln.targets.tvm import quant_kernels as Q
    target = {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(), "num-cores": 2}
    out = {}
    for name, w in weights().items():
        n, k = w.shape
        arrays = Q.pack(w)
        bb = relax.BlockBuilder()
        x = relax.Var("x", relax.TensorType([1, rows, k], "float32"))
        r = repeat_for(w, cold)
        copies = r if cold else 1
        params = [[relax.Var(f"{a}{c}", relax.TensorType(list(v.shape), str(v.dtype))) for a, v in arrays.items()]
                  for c in range(copies)]
        with bb.function("main", [x, *[p for ps in params for p in ps]]):
            with bb.dataflow():
                ys = [Q.matmul(bb, x, params[i % copies], w.format.name, n, k, target) for i in range(r)]
                o = bb.emit_output(relax.Tuple(ys))
            bb.emit_func_output(o)
        vm = relax.VirtualMachine(tvm.compile(bb.get(), target=tvm.target.Target(target)), tvm.cpu())
        xs = tvm.runtime.tensor(np.random.default_rng(0).standard_normal((1, rows, k)).astype(np.float32))
        dev = [tvm.runtime.tensor(a.copy()) for _ in range(copies) for a in arrays.values()]
        f = vm["main"]
        out[name] = _time(lambda: f(xs, *dev), r)
    return out


def _ort_model(w, rows: int, r: int, cold: bool) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    from kiln.targets.onnxrt import quant as Q
    n, k = w.shape
    op = Q.operands(w.format.name, w.raw(), n, k)
    inits, nodes, outputs = {}, [], []

    def nbits(o, suffix, x, result):
        if f"B{suffix}" not in inits:
            inits[f"B{suffix}"] = Q.pack_codes(o.bits, o.codes)
            inits[f"S{suffix}"] = o.scales.reshape(-1)
            if o.zero_points is not None:
                inits[f"Z{suffix}"] = Q.pack_zero_points(o.bits, o.zero_points)
        ins = [x, f"B{suffix}", f"S{suffix}"]
        if o.zero_points is not None:
            ins.append(f"Z{suffix}")
        nodes.append(helper.make_node("MatMulNBits", ins, [result], domain="com.microsoft", K=k, N=n, bits=o.bits,
                                      block_size=o.block, accuracy_level=0))
    if op.mins is not None:
        inits["blocks_shape"] = np.array([0, 0, k // Q.BLOCK, Q.BLOCK], np.int64)
        inits["axes"] = np.array([-1], np.int64)
        nodes += [helper.make_node("Reshape", ["x", "blocks_shape"], ["xb"]),
                  helper.make_node("ReduceSum", ["xb", "axes"], ["sums"], keepdims=0)]
    planes = Q.as_two_4bit_planes(op) if op.bits == 8 else None
    for i in range(r):
        y = f"y{i}"
        copy = f"#{i}" if cold else ""
        partial = y if op.mins is None else f"p{i}"
        if planes:
            nbits(planes[0], f".high{copy}", "x", f"h{i}")
            nbits(planes[1], f".low{copy}", "x", f"l{i}")
            nodes.append(helper.make_node("Add", [f"h{i}", f"l{i}"], [partial]))
        else:
            nbits(op, copy, "x", partial)
        if op.mins is not None:
            inits.setdefault(f"mins_t{copy}", np.ascontiguousarray(op.mins.T))
            nodes += [helper.make_node("MatMul", ["sums", f"mins_t{copy}"], [f"c{i}"]),
                      helper.make_node("Add", [partial, f"c{i}"], [y])]
        outputs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, rows, n]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows, k])], outputs,
                          initializer=[numpy_helper.from_array(np.ascontiguousarray(a), name) for name, a in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 11
    return m.SerializeToString()


def run_ort(rows: int, threads: int, cold: bool) -> dict:
    import onnxruntime as ort
    out = {}
    for name, w in weights().items():
        r = repeat_for(w, cold)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        sess = ort.InferenceSession(_ort_model(w, rows, r, cold), so, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).standard_normal((1, rows, w.shape[1])).astype(np.float32)
        # outputs bound to buffers allocated once: nothing is copied out per run
        io = sess.io_binding()
        io.bind_cpu_input("x", x)
        for o in sess.get_outputs():
            io.bind_ortvalue_output(o.name, ort.OrtValue.ortvalue_from_shape_and_type([1, rows, w.shape[0]], np.float32))
        out[name] = _time(lambda: sess.run_with_iobinding(io), r)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cold", action="store_true", help="a copy of the weight per product (64 MB in all)")
    ap.add_argument("--engine", choices=["tvm", "ort"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.engine:
        res = run_tvm(args.rows, args.cold) if args.engine == "tvm" else run_ort(args.rows, args.threads, args.cold)
        print(json.dumps(res))
        return
    env = dict(os.environ, TVM_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
    rounds = {"tvm": [], "ort": []}
    for _ in range(args.rounds):
        for engine in rounds:
            proc = subprocess.run([sys.executable, __file__, "--engine", engine, "--rows", str(args.rows),
                                   "--threads", str(args.threads)] + (["--cold"] if args.cold else []), env=env, capture_output=True, text=True, check=True)
            rounds[engine].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    ws = weights()
    print(f"rows={args.rows}, {args.threads} threads, {'a weight copy per product' if args.cold else 'one weight, in cache'}, "
          f"µs per product (best / median of {args.rounds} rounds)")
    print("| shape | N×K | format | TVM | ORT | TVM/ORT time |")
    print("|---|---|---|---|---|---|")
    for name in SHAPES:
        t = [r[name] for r in rounds["tvm"]]
        o = [r[name] for r in rounds["ort"]]
        n, k = ws[name].shape
        print(f"| {name} | {n}×{k} | {ws[name].format.name} | {min(t):.1f} / {statistics.median(t):.1f} "
              f"| {min(o):.1f} / {statistics.median(o):.1f} | {min(t) / min(o):.2f} |")


if __name__ == "__main__":
    main()
