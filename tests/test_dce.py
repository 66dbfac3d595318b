"""Dead-code elimination."""
import numpy as np

from kiln.ir import Graph
from kiln.passes.dce import dce
from kiln.verify import verify
from kiln.weights import Weight


def test_removes_unused_nodes_weights_and_consts():
    g = Graph()
    x = g.add_input("x", "float32", (2,))
    unused_w = g.add_weight("unused", Weight.from_array(np.ones(2)))
    dead = g.add_node("Mul", [x, unused_w], name="dead")[0]
    g.add_node("Neg", [dead], name="dead2")
    live = g.add_node("Add", [x, g.const(np.float32(1))], name="live")[0]
    g.outputs = [live]
    r = dce(g)
    assert r.changed and r.stats == {"nodes": 2, "weights": 1}
    assert [n.name for n in g.nodes] == ["live"]
    assert not x.uses[0].node.name.startswith("dead")
    verify(g)
    assert not dce(g).changed
