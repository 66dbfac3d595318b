"""The IR: building, use lists, rewriting, verification, text and JSON forms."""
import json

import numpy as np
import pytest

from kiln.interp import run
from kiln.ir import Graph
from kiln.irtext import from_json, to_json, to_text
from kiln.verify import VerifyError, verify
from kiln.weights import Weight


def small_graph():
    g = Graph("small")
    x = g.add_input("x", "float32", ("batch", "seq", 4))
    w = g.add_weight("w", Weight.from_array(np.arange(12, dtype=np.float32).reshape(3, 4), name="w"))
    y = g.add_node("MatMul", [x, g.add_node("Transpose", [w], {"perm": [1, 0]})[0]], name="proj")[0]
    z = g.add_node("Add", [y, g.const(np.float32(1.0))], name="shift")[0]
    g.outputs = [z]
    return g, x, y, z


def test_types_are_inferred_with_symbols():
    g, x, y, z = small_graph()
    assert str(z.type) == "float32[batch,seq,3]"
    verify(g)


def test_uses_track_rewrites():
    g, x, y, z = small_graph()
    neg = g.add_node("Neg", [y])[0]
    assert len(y.uses) == 2
    g.replace_all_uses_with(y, neg, except_node=neg.producer)
    assert [u.node.op for u in y.uses] == ["Neg"]
    assert z.producer.inputs[0] is neg
    g.toposort()
    verify(g)


def test_verifier_reports_use_before_definition():
    g, x, y, z = small_graph()
    g.nodes.reverse()
    with pytest.raises(VerifyError, match="before it is defined"):
        verify(g)


def test_verifier_reports_wrong_type():
    g, x, y, z = small_graph()
    from kiln.ir import TensorType
    z.type = TensorType("float32", ("batch", "seq", 5))
    with pytest.raises(VerifyError, match="inference says"):
        verify(g)


def test_text_form_is_one_node_per_line():
    g, *_ = small_graph()
    text = to_text(g)
    assert "%proj = MatMul(%x, %transpose) : float32[batch,seq,3]" in text
    # header, one weight, one constant, three nodes, closing brace
    assert len(text.splitlines()) == 7


def test_json_round_trip_keeps_structure_and_numbers():
    g, *_ = small_graph()
    data = json.loads(json.dumps(to_json(g)))
    g2 = from_json(data, weights={"w": g.weights["w"].weight})
    assert to_text(g2) == to_text(g)
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 5, 4)).astype(np.float32)}
    np.testing.assert_array_equal(run(g, feeds)[g.outputs[0].name], run(g2, feeds)[g2.outputs[0].name])


def test_reshape_infers_symbolic_dims():
    g = Graph()
    x = g.add_input("x", "float32", ("batch", "seq", 64))
    y = g.add_node("Reshape", [x, np.array([0, 0, 4, 16], dtype=np.int64)])[0]
    assert y.type.shape == ("batch", "seq", 4, 16)
    t = g.add_node("Transpose", [y], {"perm": [0, 2, 1, 3]})[0]
    z = g.add_node("Reshape", [t, np.array([0, 4, -1, 16], dtype=np.int64)])[0]
    assert z.type.shape == ("batch", 4, "seq", 16)


def test_toposort_orders_appended_producers():
    g, x, y, z = small_graph()
    # insert a producer at the end that an earlier node then uses
    late = g.add_node("Neg", [x])[0]
    g.set_input(y.producer, 0, late)
    with pytest.raises(VerifyError):
        verify(g)
    g.toposort()
    verify(g)
