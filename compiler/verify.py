"""Checks a graph's invariants: SSA, topological order, use lists, and types against inference."""
from __future__ import annotations

from . import ops
from .ir import Graph, Usage


class VerifyError(Exception):
    pass


def verify(g: Graph) -> None:
    defined: set[int] = {id(v) for v in g.inputs} | {id(v) for v in g.weights.values()} | {id(v) for v in g.consts}
    names: set[str] = set()
    for v in g.values():
        if v.name in names:
            raise VerifyError(f"value name {v.name} is defined twice")
        names.add(v.name)
    for node in g.nodes:
        if node.op not in ops.REGISTRY:
            raise VerifyError(f"node {node.name}: unknown op {node.op}")
        for i, x in enumerate(node.inputs):
            if x is None:
                continue
            if id(x) not in defined:
                raise VerifyError(f"node {node.name} ({node.op}) uses %{x.name} before it is defined")
            if Usage(node, i) not in x.uses:
                raise VerifyError(f"%{x.name} does not list its use by {node.name}")
        try:
            expected = ops.infer_types(node.op, node.inputs, node.attrs)
        except Exception as e:
            raise VerifyError(f"node {node.name} ({node.op}): type inference failed: {e}") from e
        for out, t in zip(node.outputs, expected):
            if out.producer is not node:
                raise VerifyError(f"%{out.name} has the wrong producer")
            if out.type.dtype != t.dtype or out.type.rank != t.rank:
                raise VerifyError(f"node {node.name} ({node.op}): %{out.name} is {out.type}, inference says {t}")
            for a, b in zip(out.type.shape, t.shape):
                if a is not None and b is not None and a != b:
                    raise VerifyError(f"node {node.name} ({node.op}): %{out.name} is {out.type}, inference says {t}")
        defined.update(id(o) for o in node.outputs)
    in_graph = {id(n) for n in g.nodes}
    for v in g.values():
        for use in v.uses:
            if id(use.node) not in in_graph and use.node.inputs[use.index] is v:
                raise VerifyError(f"%{v.name} lists a use by {use.node.name}, which is not in the graph")
    for o in g.outputs:
        if id(o) not in defined:
            raise VerifyError(f"graph output %{o.name} is never defined")
