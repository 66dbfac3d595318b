"""Per-row positions and a padding mask, for a standalone decoder graph (the ONNX export in
optimum's layout).

kiln's own runtimes keep each row's cache length themselves; a standalone model is called as
optimum's decoders are, with a left-padded batch described by two inputs:

* ``position_ids`` [batch, seq]: the positions the rotations (or learned position embeddings)
  use for each row's new tokens, in place of the positions counted from the cache length;
* ``attention_mask`` [batch, past + seq]: 0 for a padded key. It is combined with the causal
  mask, which stays by index (as transformers': a query sees the keys at or before it).

A padded query then sees no key at all; its scores are all the mask's large negative value, so
its softmax is uniform rather than NaN, and its logits are meaningless, as in transformers.
Runs after the KV-cache pass (``total`` is then past + seq), on a graph from
:func:`kiln.frontends.builder.build_graph`, which names the values this rewires in ``meta``.
"""
from __future__ import annotations

import numpy as np

from kiln.ir import Graph, Value
from kiln.passes_base import PassResult

NEG_INF = float(np.finfo(np.float32).min)       # the builder's masked value


def _values(graph: Graph, names) -> list[Value]:
    wanted = set(names)
    return [o for n in graph.nodes for o in n.outputs if o.name in wanted]


def padded_batch(graph: Graph) -> PassResult:
    if any(v.name == "attention_mask" for v in graph.inputs):
        return PassResult(graph, False, {})
    ids = graph.inputs[0]
    batch, seq = ids.type.shape
    positions = graph.add_input("position_ids", "int64", (batch, seq))
    mask = graph.add_input("attention_mask", "int64", (batch, "total"))
    stats = {}
    rotary = _values(graph, graph.meta.get("rotary_positions", ()))
    if rotary:
        # [seq, 1] -> [batch, 1, seq, 1]: the tables become per row, broadcast over the heads
        col = graph.add_node("Unsqueeze", [positions], {"axes": [1, 3]}, name="position_ids.col")[0]
        for v in rotary:
            graph.replace_all_uses_with(v, col)
        stats["rotary_tables"] = len(rotary)
    for v in _values(graph, [graph.meta.get("position_embeddings")]):
        graph.set_input(v.producer, 1, positions)           # Gather(table, positions): per row
        stats["position_embeddings"] = 1
    masks = _values(graph, graph.meta.get("causal_masks", {}))
    if masks:
        rows = graph.add_node("Unsqueeze", [mask], {"axes": [1, 2]}, name="attention_mask.rows")[0]
        keep = graph.add_node("Greater", [rows, graph.const(0, "int64", name="zero")], name="attention_mask.keep")[0]
        masked = graph.const(NEG_INF, "float32", name="attention_mask.masked")
        for v in masks:
            # [seq, total] -> [batch, 1, seq, total]
            padded = graph.add_node("Where", [keep, v, masked], name=f"{v.name}.padded")[0]
            graph.replace_all_uses_with(v, padded, except_node=padded.producer)
        stats["masks"] = len(masks)
    graph.toposort()
    return PassResult(graph, True, stats)
