"""QuantMatMul fusion and its lowering to ONNX Runtime's MatMulNBits."""
import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kiln import formats
from kiln.interp import run
from kiln.ir import Graph
from kiln.passes.dce import dce
from kiln.passes.quant_matmul import decompose, fuse_quant_matmul
from kiln.targets import fusions, onnxrt
from kiln.targets.onnxrt.quant import REPACK
from kiln.verify import verify
from kiln.weights import Weight

#: the block formats ONNX Runtime takes as they are, as the pipeline asks its target
ORT = fusions.of("onnxrt").quant_matmul


def linear_graph(fmt: str, n=64, k=None, seed=0):
    k = k or (256 if fmt.endswith("_k") or formats.get(fmt).block_size > 32 else 96)
    rng = np.random.default_rng(seed)
    g = Graph("linear")
    x = g.add_input("x", "float32", ("batch", "seq", k))
    w = g.add_weight("w", Weight.from_array(rng.standard_normal((n, k)).astype(np.float32), fmt, name="w"))
    wt = g.add_node("Transpose", [w], {"perm": [1, 0]})[0]
    y = g.add_node("MatMul", [x, wt], name="proj")[0]
    g.outputs = [g.add_node("Relu", [y], name="out")[0]]
    return g


@pytest.mark.parametrize("fmt", sorted(REPACK))
def test_fuses_block_weights_and_keeps_numbers(fmt):
    g = linear_graph(fmt)
    k = g.inputs[0].type.shape[-1]
    x = np.random.default_rng(1).standard_normal((2, 3, k)).astype(np.float32)
    before = run(g, {"x": x})["out"]
    r = fuse_quant_matmul(g, ORT)
    assert r.stats == {f"quant_matmul_{fmt}": 1}
    dce(g)
    verify(g)
    assert [n.op for n in g.nodes] == ["QuantMatMul", "Relu"]
    # measured 0 for every format (the same dequantized weights, the same product); bound
    # 1e-6 of the largest output (~30)
    np.testing.assert_allclose(run(g, {"x": x})["out"], before, rtol=0, atol=1e-6 * float(np.abs(before).max()))
    decompose(g)
    verify(g)
    assert [n.op for n in g.nodes] == ["Transpose", "MatMul", "Relu"]


def test_float_weights_and_untaken_formats_are_left_alone():
    g = linear_graph("f32")
    assert not fuse_quant_matmul(g, ORT).changed
    g = linear_graph("q8_0")
    r = fuse_quant_matmul(g, formats={"q4_0"})
    assert not r.changed and r.stats == {"kept_float": 1}


# Per format rather than drawn among them, so that none goes untested in a run.
@pytest.mark.parametrize("fmt", sorted(REPACK))
@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 40), blocks=st.integers(1, 6), seq=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_matmulnbits_lowering_equals_the_interpreter(tmp_path_factory, fmt, n, blocks, seq, seed):
    width = 256 if fmt.endswith("_k") else max(32, formats.get(fmt).block_size)     # int4_gN: N
    blocks = 1 + blocks % 2 if width == 256 else blocks
    g = linear_graph(fmt, n=n, k=width * blocks, seed=seed)
    fuse_quant_matmul(g, ORT)
    dce(g)
    out = tmp_path_factory.mktemp("q")
    onnxrt.lower(g, out)
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(seed).standard_normal((1, seq, width * blocks)).astype(np.float32)
    want = run(g, {"x": x})["out"]
    got = sess.run(None, {"x": x})[0]
    # max |got - want| / max(1, max |want|) measured over 300 drawings per format: 4.6e-7 (q5_1) to
    # 1.2e-6 (q4_k), float32 sums of up to 512 terms in another order; bound ~10x the worst
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * max(1.0, float(np.abs(want).max())))


@pytest.mark.parametrize("fmt", ["q8_0", "q5_0", "q5_1", "q5_k", "q6_k"])
def test_8bit_operands_as_two_4bit_planes_are_exact(fmt):
    from kiln.targets.onnxrt.quant import as_two_4bit_planes, operands
    rng = np.random.default_rng(3)
    k = 256 if fmt.endswith("_k") else 64
    w = Weight.from_array(rng.standard_normal((16, k)).astype(np.float32) * 3, fmt)
    high, low = as_two_4bit_planes(operands(fmt, w.raw(), 16, k))
    assert max(high.codes.max(), low.codes.max(), high.zero_points.max(), low.zero_points.max()) <= 15

    def plane(p):
        return (p.codes.astype(np.float32) - p.zero_points[..., None]) * p.scales[..., None]
    value = plane(high) + plane(low)
    if low.mins is not None:
        value = value + low.mins[..., None]
    np.testing.assert_array_equal(value.reshape(16, k), w.numpy())
