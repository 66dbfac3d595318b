"""The reference interpreter: runs any graph with numpy, one registered op at a time.

It is the oracle every pass and lowering is checked against, so it stays simple: no fusion,
no caching beyond the weights it has already materialised.
"""
from __future__ import annotations

import numpy as np

from . import ops
from .ir import Graph


class Interpreter:
    def __init__(self, graph: Graph):
        self.graph = graph
        self._weights: dict[str, np.ndarray] = {}

    def weight(self, name: str) -> np.ndarray:
        if name not in self._weights:
            v = self.graph.weights[name]
            self._weights[name] = v.weight.numpy().astype(v.type.dtype, copy=False)
        return self._weights[name]

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None,
            observe=None) -> dict[str, np.ndarray]:
        """``observe(node, args)``, when given, sees every node's input arrays before it runs
        (``kiln imatrix`` reads the activations entering each matmul this way)."""
        g = self.graph
        env: dict[int, np.ndarray] = {}
        for v in g.inputs:
            if v.name not in feeds:
                raise KeyError(f"missing input {v.name}")
            env[id(v)] = np.asarray(feeds[v.name], dtype=v.type.dtype)
        for v in g.consts:
            env[id(v)] = v.const
        for name, v in g.weights.items():
            if v.uses or v in g.outputs:
                env[id(v)] = self.weight(name)
        # free intermediates once their last use has run, so big graphs fit in memory
        last_use: dict[int, int] = {}
        for i, node in enumerate(g.nodes):
            for x in node.inputs:
                if x is not None:
                    last_use[id(x)] = i
        keep = {id(v) for v in g.outputs}
        for i, node in enumerate(g.nodes):
            args = [None if x is None else env[id(x)] for x in node.inputs]
            if observe is not None:
                observe(node, args)
            results = ops.compute(node.op, args, node.attrs)
            for out, r in zip(node.outputs, results):
                env[id(out)] = r
            for x in node.inputs:
                if x is not None and last_use.get(id(x)) == i and id(x) not in keep and x.producer is not None:
                    env.pop(id(x), None)
        wanted = outputs or [v.name for v in g.outputs]
        by_name = {v.name: v for v in g.outputs}
        return {n: env[id(by_name[n])] for n in wanted}


def run(graph: Graph, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return Interpreter(graph).run(feeds)
