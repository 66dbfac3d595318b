"""Merging linear layers that read the same activation: the expected graph, the same numbers
(interpreter and ONNX Runtime), blocks kept bit for bit and unread, refusals, the inverse."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import ALL_FAMILIES
from kiln.interp import run
from kiln.ir import Graph
from kiln.passes.dce import dce
from kiln.passes.merge_matmul import decompose, merge_matmul
from kiln.passes.quant_matmul import fuse_quant_matmul
from kiln.targets import fusions, onnxrt
from kiln.verify import verify
from kiln.weights import Weight

# one wider product against several narrow ones: numpy's float32 matmul may block the sums
# differently (measured up to 2.1e-7 on the fixtures' logits, |logits| <= 1.5); ~2 ulps at 1.0
SAME = 5e-7


def projections(formats, ns=(32, 16, 16), k=64, biases=False, seed=0, loads=None):
    """x -> one linear layer per format (each with a bias when asked) -> outputs ``out.i``."""
    rng = np.random.default_rng(seed)
    g = Graph("proj")
    x = g.add_input("x", "float32", ("batch", "seq", k))
    outs = []
    for i, (fmt, n) in enumerate(zip(formats, ns)):
        w = Weight.from_array(rng.standard_normal((n, k)).astype(np.float32), fmt, name=f"l.{i}.weight")
        if loads is not None:
            raw = w._load_raw

            def counted(raw=raw, name=w.name):
                loads.append(name)
                return raw()
            w._load_raw = counted
        wv = g.add_weight(f"l.{i}.weight", w)
        y = g.add_node("MatMul", [x, g.add_node("Transpose", [wv], {"perm": [1, 0]})[0]], name=f"proj{i}")[0]
        if biases:
            b = g.add_weight(f"l.{i}.bias", Weight.from_array(rng.standard_normal(n).astype(np.float32)))
            y = g.add_node("Add", [y, b], name=f"proj{i}.bias")[0]
        outs.append(g.add_node("Relu", [y], name=f"out.{i}")[0])
    g.outputs = outs
    return g


def _feeds(g, seed=1, seq=3):
    k = g.inputs[0].type.shape[-1]
    return {"x": np.random.default_rng(seed).standard_normal((2, seq, k)).astype(np.float32)}


def test_expected_graph_with_biases():
    g = projections(["q4_1"] * 3, biases=True)
    feeds = _feeds(g)
    before = run(g, feeds)
    r = merge_matmul(g)
    assert r.stats == {"merged": 1, "matmuls": 3}
    verify(g)
    assert [n.op for n in g.nodes] == ["Transpose", "MatMul", "Add", "Split", "Relu", "Relu", "Relu"]
    assert sorted(g.weights) == ["l.0_1_2.bias", "l.0_1_2.weight"]
    split = g.nodes[3]
    assert split.attrs == {"axis": -1, "split": [32, 16, 16]}
    assert [u.node.name for o in split.outputs for u in o.uses] == ["out.0", "out.1", "out.2"]
    after = run(g, feeds)
    for name in before:
        np.testing.assert_allclose(after[name], before[name], rtol=0, atol=SAME * 10)


def test_blocks_are_concatenated_bit_for_bit_and_not_read_by_the_pass():
    loads = []
    g = projections(["q4_k", "q4_k"], ns=(8, 24), k=256, loads=loads)
    parts = [g.weights["l.0.weight"].weight, g.weights["l.1.weight"].weight]
    merge_matmul(g)
    assert loads == []                             # lazy: nothing read while rewriting
    merged = g.weights["l.0_1.weight"].weight
    assert merged.format.name == "q4_k" and merged.shape == (32, 256)
    assert np.array_equal(merged.raw(), np.concatenate([p.raw() for p in parts]))


def test_only_weights_of_one_format_merge():
    # a Q4_K_M file stores some v projections as Q6_K: q and k still merge, v stays alone
    g = projections(["q4_0", "q8_0", "q4_0"])
    feeds = _feeds(g)
    before = run(g, feeds)
    r = merge_matmul(g)
    assert r.stats == {"merged": 1, "matmuls": 2, "refused": 1}
    verify(g)
    assert g.op_counts()["MatMul"] == 2 and sorted(g.weights) == ["l.0_2.weight", "l.1.weight"]
    after = run(g, feeds)
    for name in before:
        np.testing.assert_allclose(after[name], before[name], rtol=0, atol=SAME * 10)


def test_a_weight_read_elsewhere_is_not_merged():
    g = projections(["f32", "f32"])
    w = g.weights["l.0.weight"]
    g.outputs.append(g.add_node("Neg", [w], name="tied")[0])
    r = merge_matmul(g)
    assert not r.changed and r.stats == {"refused": 2}     # the tied one, and so the other


def test_unrelated_matmuls_are_left_alone():
    g = projections(["f32"])
    assert merge_matmul(g).stats == {} and not merge_matmul(g).changed


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_every_family_merges_and_decomposes(hf_fixture, family):
    from kiln.frontends import hf
    folder = hf_fixture(family)
    g = hf.read(folder).graph
    ids = {"input_ids": np.load(folder / "reference.npz")["input_ids"]}
    before = run(g, ids)[g.outputs[0].name]
    matmuls = g.op_counts()["MatMul"]
    r = merge_matmul(g)
    layers = sum(1 for n in g.nodes if n.op == "Softmax")
    gated = family != "gpt2"
    # q/k/v per layer, gate/up per gated MLP
    assert r.stats == {"merged": layers * (1 + gated), "matmuls": layers * (3 + 2 * gated)}
    verify(g)
    assert g.op_counts()["MatMul"] == matmuls - layers * (2 + gated)
    np.testing.assert_allclose(run(g, ids)[g.outputs[0].name], before, rtol=0, atol=SAME)
    d = decompose(g)
    assert d.stats == {"unmerged": r.stats["merged"]}
    verify(g)
    assert g.op_counts()["MatMul"] == matmuls and "Split" not in g.op_counts()
    np.testing.assert_array_equal(run(g, ids)[g.outputs[0].name], before)


@settings(max_examples=25, deadline=None)
@given(fmt=st.sampled_from(["f32", "f16", "q4_0", "q4_1", "q8_0", "q5_1", "q4_k", "q6_k"]),
       ns=st.lists(st.integers(1, 24), min_size=2, max_size=4), blocks=st.integers(1, 3), biases=st.booleans(),
       seq=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_merged_products_equal_the_separate_ones(tmp_path_factory, fmt, ns, blocks, biases, seq, seed):
    """Interpreter before vs after, and the ONNX Runtime lowering (MatMulNBits over the merged
    blocks, then the Split) against the interpreter."""
    width = 256 if fmt.endswith("_k") else 32
    k = width * (1 + blocks % 2 if width == 256 else blocks)
    g = projections([fmt] * len(ns), ns=ns, k=k, biases=biases, seed=seed)
    feeds = _feeds(g, seed, seq)
    before = run(g, feeds)
    assert merge_matmul(g).stats == {"merged": 1, "matmuls": len(ns)}
    verify(g)
    after = run(g, feeds)
    scale = max(1.0, max(float(np.abs(v).max()) for v in before.values()))
    for name in before:
        np.testing.assert_allclose(after[name], before[name], rtol=0, atol=1e-6 * scale)
    fuse_quant_matmul(g, fusions.of("onnxrt").quant_matmul)
    dce(g)
    out = tmp_path_factory.mktemp("merge")
    onnxrt.lower(g, out)
    ops = [n.op_type for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node]
    assert ops.count("Split") == 1 and ops.count("MatMulNBits" if fmt not in ("f32", "f16") else "MatMul") >= 1
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    for name in before:
        np.testing.assert_allclose(got[name], after[name], rtol=0, atol=2e-5 * scale)


def test_smollm2_lowers_to_four_products_per_layer_and_keeps_its_attention(smollm2_gguf, tmp_path):
    """Merged q/k/v still reach GroupQueryAttention through their head split, with no transposes:
    in the growing-cache layout q/k are rotated by RotaryEmbedding on the Split's [b, s, n·d]
    parts; 4 MatMulNBits per layer plus the Q8_0 head's two planes."""
    from kiln.driver import compile as kiln_compile
    art = kiln_compile(smollm2_gguf, output=tmp_path / "s.kiln", kv_layout="concat", backend="onnxrt")
    nodes = onnx.load(str(art / "model.onnx"), load_external_data=False).graph.node
    ops = [n.op_type for n in nodes]
    assert ops.count("MatMulNBits") == 4 * 30 + 2 and ops.count("Split") == 60
    assert ops.count("GroupQueryAttention") == 30 and "Transpose" not in ops
    made_by = {o: n.op_type for n in nodes for o in n.output}
    rotary_inputs = {made_by[n.input[0]] for n in nodes if n.op_type == "RotaryEmbedding"}
    assert len([n for n in nodes if n.op_type == "RotaryEmbedding"]) == 60 and rotary_inputs == {"Split"}
    gqa_values = {made_by[n.input[2]] for n in nodes if n.op_type == "GroupQueryAttention"}
    assert gqa_values == {"Split"}
