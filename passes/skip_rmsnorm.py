"""Fusion: a residual Add feeding an RMSNorm becomes one SkipRMSNorm with both results.

Rule: ``RMSNorm(Add(a, b), w)`` where a and b have the same shape (no broadcasting). The sum
stays an output, since the residual stream goes on to the next layer.
"""
from __future__ import annotations

from kiln.ir import Graph
from kiln.passes.match import NoMatch, apply_rule, made_by
from kiln.passes_base import PassResult, decompose_op


def fuse_skip_rmsnorm(graph: Graph) -> PassResult:
    def rewrite(node):
        add = made_by(node.inputs[0], "Add")
        if add is None:
            raise NoMatch()
        a, b = add.inputs
        if a.type.shape != b.type.shape or a.is_const or b.is_const:
            raise NoMatch()
        y, total = graph.add_node("SkipRMSNorm", [a, b, node.inputs[1]], dict(node.attrs), name=node.name,
                                  output_names=[node.outputs[0].name + ".skip", add.outputs[0].name + ".skip"])
        graph.replace_all_uses_with(node.outputs[0], y)
        graph.replace_all_uses_with(add.outputs[0], total)
        graph.remove_node(node)
        graph.remove_node(add)
    return apply_rule(graph, "RMSNorm", rewrite, "skip_rmsnorm")


def decompose(graph: Graph) -> PassResult:
    """SkipRMSNorm back to Add + RMSNorm."""
    def expand(node, add):
        a, b, w = node.inputs
        total = add("Add", [a, b], suffix="sum")
        return [add("RMSNorm", [total, w], dict(node.attrs), "norm"), total]
    return decompose_op(graph, "SkipRMSNorm", expand)
