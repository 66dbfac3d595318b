"""Which activation feeds a graph's LM head: both backends compute the logits only at the
positions a caller asks for (``logits_positions``), by taking those rows of this value."""
from __future__ import annotations

from kiln.ir import Graph, Value


def lm_head_input(graph: Graph) -> Value | None:
    """The activation entering the matmul that makes the logits (elementwise ops with
    constants may follow it, as gemma's soft-capping does), when nothing else reads it."""
    v = graph.outputs[0]
    while v.producer is not None:
        n = v.producer
        if n.op in ("MatMul", "QuantMatMul"):
            x = n.inputs[0]
            return x if len(x.uses) == 1 and x.type.rank == 3 else None
        acts = [x for x in n.inputs if x is not None and not (x.is_const or x.is_weight)]
        if n.op not in ("Mul", "Div", "Add", "Tanh", "Cast") or len(acts) != 1:
            return None
        v = acts[0]
    return None
