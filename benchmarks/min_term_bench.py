"""Ways to add the Q4_1 / Q4_K min term to a MatMulNBits product on ONNX Runtime, timed.

Each option computes y = x @ Wᵀ for a Q4_1 weight W [N, K] (value = d·q + m per block of 32)
from the GGUF blocks without requantizing; the option is one small ONNX model, run on the CPU
provider with the given thread count. Options are timed in interleaved rounds (the machine is
shared) and reported as medians with the spread of the rounds, next to their error against a
float64 reference. Run:

    .venv/bin/python benchmarks/min_term_bench.py [--n 1536 --k 576 --rows 1 --threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from kiln import formats
from kiln.targets.onnxrt import quant as Q


def _model(nodes, inits, n, rows, k):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, rows, n])],
                          initializer=[numpy_helper.from_array(np.ascontiguousarray(a), name)
                                       for name, a in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 11
    return m.SerializeToString()


def options(op: Q.NBitsOperands, n: int, k: int, rows: int) -> dict:
    """name -> (serialized model, ONNX node count)."""
    nb = k // Q.BLOCK
    packed, scales = Q.pack_codes(4, op.codes), op.scales.reshape(-1)
    mins_t = np.ascontiguousarray(op.mins.T)                         # [nb, N]
    indicator = np.kron(np.eye(nb, dtype=np.float32), np.ones((Q.BLOCK, 1), np.float32))  # [K, nb]
    i64 = lambda *v: np.asarray(v, np.int64)  # noqa: E731

    def nbits(inputs, out, nn=n, **kw):
        return helper.make_node("MatMulNBits", inputs, [out], domain="com.microsoft", K=k, N=nn, bits=4,
                                block_size=Q.BLOCK, accuracy_level=0, **kw)
    base = {"B": packed, "scales": scales, "zp": np.zeros(n * ((nb + 1) // 2), np.uint8)}
    sums = [helper.make_node("Reshape", ["x", "blocks_shape"], ["xb"]),
            helper.make_node("ReduceSum", ["xb", "axes"], ["s"], keepdims=0)]
    out = {}
    out["nbits only (no min term: not the result)"] = [nbits(["x", "B", "scales", "zp"], "y")], base
    out["current: Reshape+ReduceSum, MatMul+Add"] = sums + [
        nbits(["x", "B", "scales", "zp"], "p"),
        helper.make_node("MatMul", ["s", "mins_t"], ["c"]),
        helper.make_node("Add", ["p", "c"], ["y"])], {**base, "mins_t": mins_t, "blocks_shape": i64(0, 0, nb, Q.BLOCK),
                                                      "axes": i64(-1)}
    out["block sums as one MatMul(x, E)"] = [
        helper.make_node("MatMul", ["x", "E"], ["s"]),
        nbits(["x", "B", "scales", "zp"], "p"),
        helper.make_node("MatMul", ["s", "mins_t"], ["c"]),
        helper.make_node("Add", ["p", "c"], ["y"])], {**base, "mins_t": mins_t, "E": indicator}
    out["dense correction MatMul(x, E·Mᵀ)"] = [
        nbits(["x", "B", "scales", "zp"], "p"),
        helper.make_node("MatMul", ["x", "dense"], ["c"]),
        helper.make_node("Add", ["p", "c"], ["y"])], {**base, "dense": indicator @ mins_t}
    out["Gemm(sums, Mᵀ, C=product), 2-D"] = [
        helper.make_node("Reshape", ["x", "rows_k"], ["x2"]),
        nbits(["x2", "B", "scales", "zp"], "p"),
        helper.make_node("Reshape", ["x", "rows_blocks"], ["xb"]),
        helper.make_node("ReduceSum", ["xb", "axes"], ["s"], keepdims=0),
        helper.make_node("Gemm", ["s", "mins_t", "p"], ["y2"]),
        helper.make_node("Reshape", ["y2", "out_shape"], ["y"])], {
            **base, "mins_t": mins_t, "rows_k": i64(-1, k), "rows_blocks": i64(-1, nb, Q.BLOCK), "axes": i64(-1),
            "out_shape": i64(1, -1, n)}
    # the indicator rows appended to W: the same kernel also yields the block sums
    ones = np.zeros((nb, nb, Q.BLOCK), np.uint8)
    ones[np.arange(nb), np.arange(nb)] = 1
    out["block sums as extra MatMulNBits rows + Split"] = [
        nbits(["x", "BE", "scalesE", "zpE"], "pe", nn=n + nb),
        helper.make_node("Split", ["pe", "split"], ["p", "s"], axis=-1),
        helper.make_node("MatMul", ["s", "mins_t"], ["c"]),
        helper.make_node("Add", ["p", "c"], ["y"])], {
            "BE": np.concatenate([packed, Q.pack_codes(4, ones)]),
            "scalesE": np.concatenate([scales, np.ones(nb * nb, np.float32)]),
            "zpE": np.zeros((n + nb) * ((nb + 1) // 2), np.uint8), "mins_t": mins_t, "split": i64(n, nb)}
    out["float zero points (one op)"] = [nbits(["x", "B", "scales", "fzp"], "y")], {
        "B": packed, "scales": scales, "fzp": (-op.mins / op.scales).reshape(-1).astype(np.float32)}
    return {name: (_model(nodes, inits, n, rows, k), len(nodes)) for name, (nodes, inits) in out.items()}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1536)
    ap.add_argument("--k", type=int, default=576)
    ap.add_argument("--rows", type=int, default=1, help="activation rows (1 = a decode step)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=400)
    ap.add_argument("--cpu", action="store_true",
                    help="time by the calling thread's CPU time (use with --threads 1: ORT then computes on "
                         "that thread, and other processes on a busy machine barely move the figures)")
    a = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    w = rng.standard_normal((a.n, a.k)).astype(np.float32) * 0.05 + 0.01
    fmt = formats.get("q4_1")
    raw = fmt.quantize(w)
    op = Q.operands("q4_1", raw, a.n, a.k)
    wq = fmt.dequantize(raw, (a.n, a.k)).astype(np.float64)
    x = rng.standard_normal((1, a.rows, a.k)).astype(np.float32)
    ref = x.astype(np.float64) @ wq.T
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = a.threads, 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    sessions = {}
    for name, (model, count) in options(op, a.n, a.k, a.rows).items():
        s = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        y = s.run(None, {"x": x})[0]
        err = float(np.max(np.abs(y - ref)) / np.max(np.abs(ref)))
        sessions[name] = (s, count, err)
    times = {name: [] for name in sessions}
    for _ in range(a.rounds):
        for name, (s, _, _) in sessions.items():
            calls = a.calls if "float zero" not in name else max(a.calls // 20, 5)
            clock = time.thread_time if a.cpu else time.perf_counter
            t = clock()
            for _ in range(calls):
                s.run(None, {"x": x})
            times[name].append((clock() - t) / calls * 1e6)
    print(f"{a.n}x{a.k} weight, {a.rows} row(s), {a.threads} threads; µs per call by {'CPU' if a.cpu else 'wall'} "
          f"time (median of {a.rounds} rounds, min-max), ONNX nodes, max |error| / max |y|")
    for name, (s, count, err) in sessions.items():
        ts = times[name]
        print(f"  {name:48s} {statistics.median(ts):8.1f}  ({min(ts):.1f}-{max(ts):.1f})  {count} nodes  {err:.1e}")


if __name__ == "__main__":
    main()
