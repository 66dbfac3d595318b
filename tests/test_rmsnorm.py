"""RMSNorm fusion: the expected graph, the same numbers, refusals with reasons, decomposition."""
import numpy as np
import pytest

from kiln.frontends import hf
from kiln.interp import run
from kiln.ir import Graph
from kiln.passes.dce import dce
from kiln.passes.rmsnorm import decompose, fuse_rmsnorm, match, Refused
from kiln.verify import verify
from kiln.weights import Weight

# fused and decomposed graphs against the unfused one: measured 0 (the same float32
# operations); bound 1e-6, about 8 float32 ulps at these logits' magnitude (up to 1.5)
SAME = 1e-6


@pytest.mark.parametrize("family,count,offset", [("llama", 5, 0.0), ("gemma", 5, 1.0), ("qwen2", 5, 0.0)])
def test_fuses_every_norm_of_a_model(hf_fixture, family, count, offset):
    folder = hf_fixture(family)
    g = hf.read(folder).graph
    ref = np.load(folder / "reference.npz")
    before = run(g, {"input_ids": ref["input_ids"]})[g.outputs[0].name]
    r = fuse_rmsnorm(g)
    assert r.stats == {"rmsnorm": count}
    dce(g)
    verify(g)
    norms = [n for n in g.nodes if n.op == "RMSNorm"]
    assert len(norms) == count and all(n.attrs["offset"] == offset for n in norms)
    assert not any(n.op in ("Sqrt", "Reciprocal") for n in g.nodes)
    np.testing.assert_allclose(run(g, {"input_ids": ref["input_ids"]})[g.outputs[0].name], before, rtol=0, atol=SAME)
    decompose(g)
    verify(g)
    np.testing.assert_allclose(run(g, {"input_ids": ref["input_ids"]})[g.outputs[0].name], before, rtol=0, atol=SAME)


def test_qwen3_head_norms_are_fused_too():
    from conftest import REPO
    g = hf.read(REPO / "tests" / "data" / "hf_variants" / "qwen3").graph
    assert fuse_rmsnorm(g).stats == {"rmsnorm": 2 * 2 + 2 * 2 + 1}     # attn/mlp + q/k per layer, final


def _near_miss(exponent=2.0, axes=(-1,)):
    g = Graph()
    x = g.add_input("x", "float32", (2, 8))
    w = g.add_weight("w", Weight.from_array(np.ones(8)))
    sq = g.add_node("Pow", [x, g.const(np.float32(exponent))])[0]
    var = g.add_node("ReduceMean", [sq], {"axes": list(axes), "keepdims": 1})[0]
    rstd = g.add_node("Reciprocal", [g.add_node("Sqrt", [g.add_node("Add", [var, g.const(np.float32(1e-5))])[0]])[0]])[0]
    y = g.add_node("Mul", [g.add_node("Mul", [x, rstd])[0], w], name="out")[0]
    g.outputs = [y]
    return g, y.producer


@pytest.mark.parametrize("kwargs,reason", [({"exponent": 3.0}, "square"), ({"axes": (0,)}, "axes")])
def test_near_misses_are_refused_with_a_reason(kwargs, reason):
    g, last = _near_miss(**kwargs)
    with pytest.raises(Refused, match=reason):
        match(last)
    r = fuse_rmsnorm(g)
    assert not r.changed and r.stats == {"refused": 1}


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_the_op_is_the_formula_and_onnx_runtimes_rmsnormalization(offset):
    # small activations, where the epsilon matters: an epsilon moved outside the root, or
    # applied twice, changes these results by far more than the bound
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from kiln import ops
    rng = np.random.default_rng(0)
    x = (1e-3 * rng.standard_normal((2, 3, 16))).astype(np.float32)
    w = rng.standard_normal(16).astype(np.float32)
    eps = 1e-5
    [got] = ops.compute("RMSNorm", [x, w], {"epsilon": eps, "offset": offset})
    x64 = x.astype(np.float64)
    want = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + eps) * (w + offset)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=0)
    node = helper.make_node("RMSNormalization", ["x", "w"], ["y"], axis=-1, epsilon=eps)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, x.shape)],
                              initializer=[onnx.numpy_helper.from_array((w + offset).astype(np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=11)
    [y] = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(got, y, rtol=2e-6, atol=0)
