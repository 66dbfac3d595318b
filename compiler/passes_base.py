"""The pass contract and the pass manager.

A pass is a callable ``pass_(graph) -> PassResult``. It does one thing and says what it did in
``stats`` (e.g. ``{"attention_layers": 30}``). The manager runs a named, flat list of passes,
reports each one's stats, optionally verifies the graph between passes and dumps the IR.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .ir import Graph


@dataclass
class PassResult:
    graph: Graph
    changed: bool
    stats: dict = field(default_factory=dict)


Pass = Callable[[Graph], PassResult]


@dataclass
class PassRecord:
    name: str
    changed: bool
    stats: dict
    seconds: float


def run_passes(graph: Graph, passes: list[tuple[str, Pass]], *, verify: bool = False,
               dump_dir: str | None = None, report: Callable[[PassRecord], None] | None = None) -> tuple[Graph, list[PassRecord]]:
    from .verify import verify as verify_graph
    records = []
    if dump_dir:
        Path(dump_dir).mkdir(parents=True, exist_ok=True)
        (Path(dump_dir) / "00-input.txt").write_text(str(graph))
    for i, (name, p) in enumerate(passes, 1):
        t = time.perf_counter()
        result = p(graph)
        graph = result.graph
        rec = PassRecord(name, result.changed, dict(result.stats), time.perf_counter() - t)
        records.append(rec)
        if verify:
            verify_graph(graph)
        if dump_dir:
            (Path(dump_dir) / f"{i:02d}-{name}.txt").write_text(str(graph))
        if report:
            report(rec)
    return graph, records


def decompose_op(graph: Graph, op: str, expand: Callable, *, keep_names: bool = False) -> PassResult:
    """Replace every ``op`` node by the primitives ``expand(node, add)`` builds.

    ``add(op, inputs, attrs=None, suffix="")`` appends a node named after the one it replaces
    and returns its output; ``expand`` returns the values that stand for the node's outputs.
    ``keep_names`` moves the old output names to the new values (graph outputs the runtime
    binds by name).
    """
    n = 0
    for node in list(graph.nodes):
        if node.op != op:
            continue

        def add(op_, inputs, attrs=None, suffix="", _node=node):
            return graph.add_node(op_, inputs, attrs or {}, name=f"{_node.name}.{suffix or op_.lower()}")[0]
        for old, new in zip(node.outputs, expand(node, add)):
            graph.replace_all_uses_with(old, new)
            if keep_names:
                old.name, new.name = new.name, old.name
        graph.remove_node(node)
        n += 1
    if n:
        graph.toposort()
    return PassResult(graph, bool(n), {"decomposed": n} if n else {})
