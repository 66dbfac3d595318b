"""Every IR op through the TVM lowering, one op per graph, against kiln's interpreter
(``kiln.ops.compute``, which follows ONNX semantics). Attention needs the KV cache and is
checked on whole models (tests/test_tvm_backend.py)."""
import numpy as np
import pytest
import tvm

from kiln import ops
from kiln.ir import Graph
from kiln.targets.tvm.lower import Target, lower_plain
from kiln.weights import Weight

rng = np.random.default_rng(0)
A = rng.standard_normal((2, 3)).astype(np.float32)
B = rng.standard_normal((3,)).astype(np.float32)
POS = (np.abs(A) + 0.5).astype(np.float32)
BOOL_A, BOOL_B = A > 0, np.array([True, False, True])
X4 = rng.standard_normal((1, 2, 3, 4)).astype(np.float32)

# op, inputs (arrays become graph inputs; ("const", array) constants), attributes
CASES = {
    **{op: (op, [A, B], {}) for op in ("Add", "Sub", "Mul", "Div", "Max", "Min", "Equal", "Greater",
                                       "GreaterOrEqual", "Less", "LessOrEqual")},
    "Pow": ("Pow", [A, ("const", np.float32(2.0))], {}),
    "Pow3": ("Pow", [A, ("const", np.float32(3.0))], {}),
    "PowGeneral": ("Pow", [POS, ("const", np.float32(0.5))], {}),
    "And": ("And", [BOOL_A, BOOL_B], {}),
    "Or": ("Or", [BOOL_A, BOOL_B], {}),
    **{op: (op, [A], {}) for op in ("Neg", "Abs", "Exp", "Tanh", "Sigmoid", "Cos", "Sin", "Erf", "Relu")},
    "Sqrt": ("Sqrt", [POS], {}), "Log": ("Log", [POS], {}), "Reciprocal": ("Reciprocal", [POS], {}),
    "Not": ("Not", [BOOL_A], {}),
    "Where": ("Where", [BOOL_A, A, ("const", np.float32(-1.0))], {}),
    "Cast": ("Cast", [A], {"to": "int64"}),
    "MatMul": ("MatMul", [rng.standard_normal((2, 3, 4)).astype(np.float32),
                          rng.standard_normal((4, 5)).astype(np.float32)], {}),
    "Softmax": ("Softmax", [A], {"axis": -1}),
    "TopK": ("TopK", [X4], {"k": 2, "axis": -1}),
    # 6 experts over hidden 4, MLPs of 5; the shared expert's MLP of 3
    "MoE": ("MoE", [X4[0]] + [("weight", rng.standard_normal(s).astype(np.float32))
                              for s in ((6, 4), (6, 5, 4), (6, 5, 4), (6, 4, 5))], {"top_k": 2, "normalize": 1}),
    "MoEShared": ("MoE", [X4[0]] + [("weight", rng.standard_normal(s).astype(np.float32))
                                    for s in ((6, 4), (6, 5, 4), (6, 5, 4), (6, 4, 5), (3, 4), (3, 4), (4, 3), (1, 4))],
                  {"top_k": 3}),
    "ReduceMean": ("ReduceMean", [A], {"axes": [1], "keepdims": 1}),
    "ReduceSum": ("ReduceSum", [A], {"axes": [0], "keepdims": 0}),
    "ReduceMax": ("ReduceMax", [A], {"axes": [1], "keepdims": 0}),
    "Reshape": ("Reshape", [X4, ("const", np.array([0, -1, 4], np.int64))], {}),
    "Transpose": ("Transpose", [X4], {"perm": [0, 2, 1, 3]}),
    "Unsqueeze": ("Unsqueeze", [A], {"axes": [0, 2]}),
    "Squeeze": ("Squeeze", [X4[:1, :1]], {"axes": [0, 1]}),
    "Concat": ("Concat", [A, A * 2], {"axis": 1}),
    "Gather": ("Gather", [rng.standard_normal((5, 3)).astype(np.float32), ("const", np.array([[4, 0], [2, 2]]))],
               {"axis": 0}),
    "Slice": ("Slice", [X4], {"starts": [1, -3], "ends": [1 << 62, 3], "axes": [2, 3], "steps": None}),
    "Split": ("Split", [X4], {"axis": 3, "split": [1, 3]}),
    "Expand": ("Expand", [B, ("const", np.array([4, 3], np.int64))], {}),
    "Shape": ("Shape", [X4], {}),
    "Range": ("Range", [("const", np.int64(2)), ("const", np.int64(9)), ("const", np.int64(3))], {}),
    "RMSNorm": ("RMSNorm", [A, B], {"epsilon": 1e-5}),
    "RMSNormOffset": ("RMSNorm", [A, ("weight", B)], {"epsilon": 1e-6, "offset": 1.0}),
    "SkipRMSNorm": ("SkipRMSNorm", [A, A * 0.5, ("weight", B)], {"epsilon": 1e-5}),
    "Rotary": ("Rotary", [X4, rng.standard_normal((3, 2)).astype(np.float32),
                          rng.standard_normal((3, 2)).astype(np.float32)], {}),
}


def _graph(op, inputs, attrs):
    g = Graph()
    values, arrays = [], []
    for i, x in enumerate(inputs):
        if isinstance(x, tuple) and x[0] == "const":
            values.append(g.const(x[1]))
        elif isinstance(x, tuple) and x[0] == "weight":
            values.append(g.add_weight(f"w{i}", Weight.from_array(x[1]), "float32"))
            arrays.append(None)
        else:
            values.append(g.add_input(f"in{i}", str(x.dtype), x.shape))
            arrays.append(x)
    g.outputs = list(g.add_node(op, values, attrs, name=op.lower()))
    return g, [a for a in arrays if a is not None], values


def _run(g, feeds):
    mod, plan = lower_plain(g, Target({"kind": "llvm"}, False))
    ex = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"}))
    vm = tvm.runtime.vm.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in feeds],
                     [tvm.runtime.tensor(p.array) for p in plan.params])
    return [o.numpy() for o in out]


def test_every_op_has_a_case():
    assert {c[0] for c in CASES.values()} | {"Attention", "QuantMatMul"} == set(ops.REGISTRY)


@pytest.mark.parametrize("case", sorted(CASES))
def test_op_matches_the_interpreter(case):
    op, inputs, attrs = CASES[case]
    g, feeds, values = _graph(op, inputs, attrs)
    want = ops.compute(op, [v.const if v.const is not None else (v.weight.numpy() if v.is_weight else a)
                            for v, a in zip(values, _feed_list(inputs))], ops.full_attrs(ops.get(op), attrs))
    got = _run(g, feeds)
    assert len(got) == len(want)
    for w, x in zip(want, got):
        w = np.asarray(w)
        assert x.shape == w.shape and x.dtype == w.dtype, (x.shape, w.shape, x.dtype, w.dtype)
        np.testing.assert_allclose(x, w, rtol=2e-6, atol=2e-6)


def _feed_list(inputs):
    return [x[1] if isinstance(x, tuple) else x for x in inputs]


@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q8_0", "q4_k", "q6_k"])
def test_quant_matmul_and_embedding_read_blocks(fmt):
    from kiln import formats
    k = 256
    w = rng.standard_normal((8, k)).astype(np.float32)
    codec = formats.get(fmt)
    weight = Weight(w.shape, codec, lambda: codec.quantize(w), name="w")
    g = Graph()
    x = g.add_input("x", "float32", (1, 3, k))
    ids = g.add_input("ids", "int64", (1, 2))
    wv = g.add_weight("w", weight)
    y = g.add_node("QuantMatMul", [x, wv], {}, name="qmm")[0]
    e = g.add_node("Gather", [wv, ids], {"axis": 0}, name="embed")[0]
    g.outputs = [y, e]
    xa = rng.standard_normal((1, 3, k)).astype(np.float32)
    ia = np.array([[7, 2]])
    y_got, e_got = _run(g, [xa, ia])
    dense = weight.numpy()
    np.testing.assert_allclose(y_got, xa @ dense.T, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(e_got, dense[ia])
