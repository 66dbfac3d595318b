"""Dead-code elimination: drop nodes, weights and constants that no graph output depends on."""
from __future__ import annotations

from kiln.ir import Graph
from kiln.passes_base import PassResult


def dce(graph: Graph) -> PassResult:
    live = {id(v) for v in graph.outputs}
    keep = []
    for node in reversed(graph.nodes):
        if any(id(o) in live for o in node.outputs):
            keep.append(node)
            live.update(id(x) for x in node.inputs if x is not None)
    kept_ids = {id(n) for n in keep}
    removed = [n for n in graph.nodes if id(n) not in kept_ids]
    for node in reversed(removed):
        graph.remove_node(node)
    weights, consts = graph.prune_unused()
    stats = {k: v for k, v in (("nodes", len(removed)), ("weights", weights), ("consts", consts)) if v}
    return PassResult(graph, bool(stats), stats)
