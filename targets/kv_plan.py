"""Can a graph run with one preallocated KV cache whose rows each have their own length?

Shared by both backends (ONNX Runtime's shared layout, TVM's per-row positions).

In the shared layout every layer's keys and values live in one buffer per session,
``[batch, kv_heads, max_length, head_dim]``, that GroupQueryAttention reads and writes in place
(its past and present outputs bound to the same memory), so a decode step moves one token in
and one row of logits out. Each batch row has its own cached length (``seqlens_k``), which
also lets prompts of different lengths prefill as one right-padded batch.

GroupQueryAttention then computes positions itself, from ``seqlens_k``, and applies the
rotary embedding from precomputed ``cos``/``sin`` tables. That is only the same computation
as the IR when positions reach nothing but those rotations and the attention masks, and the
tables depend on a position alone (not, as with longrope's switch, on the sequence's total
length). :func:`plan` checks exactly that and otherwise says why not; the caller then keeps
the growing (concatenating) layout.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kiln import ops
from kiln.ir import Graph, Node, Value

#: Rotary tables are precomputed for this many positions at most (2 x 16 MB for head_dim 128).
MAX_TABLE_POSITIONS = 32768


@dataclass
class SharedCachePlan:
    max_length: int
    #: Rotary node -> the (cos, sin) table key it uses; these rotations move into the attention
    rotations: dict[int, tuple[str, str]] = field(default_factory=dict)
    #: (cos name, sin name) -> ([max_length, rot/2] cos, sin) tables, float32
    tables: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


def heads_split(x: Value, dim: int) -> bool:
    """Whether x is a [b, s, n*d] projection reshaped to [b, s, n, d] and transposed to heads."""
    t = x.producer
    if t is None or t.op != "Transpose" or t.attrs.get("perm") != [0, 2, 1, 3]:
        return False
    r = t.inputs[0].producer
    return (r is not None and r.op == "Reshape" and r.inputs[1].const is not None
            and list(r.inputs[1].const) == [0, 0, t.inputs[0].type.shape[2], dim])


def _absorbable_rotary(x: Value, dim: int) -> Node | None:
    """The Rotary producing x when GroupQueryAttention can apply it itself."""
    r = x.producer
    if r is None or r.op != "Rotary" or r.inputs[0].type.shape[-1] != dim or len(x.uses) != 1:
        return None
    return r if heads_split(r.inputs[0], dim) else None


def plan(graph: Graph, max_length: int | None, *, rotary_head_multiple: int = 16) -> tuple[SharedCachePlan | None, str]:
    """(plan, "") when the shared layout computes what the graph does, else (None, why not).

    ``rotary_head_multiple``: the head sizes whose rotation the attention kernel can apply
    (ORT's CPU kernel: multiples of 16; a backend rotating on its own passes 1)."""
    attentions = [n for n in graph.nodes if n.op == "Attention"]
    if not attentions:
        return None, "the graph has no fused attention"
    past = {v.name: v for v in graph.inputs if v.name.startswith(("past_key.", "past_value."))}
    if len(past) != 2 * len(attentions):
        return None, "not every cache input feeds a fused attention"
    length = min(int(max_length or MAX_TABLE_POSITIONS), MAX_TABLE_POSITIONS)
    result = SharedCachePlan(max_length=length)

    allowed_edges: set[tuple[int, int]] = set()       # (id(node), input index) positions may reach
    for att in attentions:
        q, k = att.inputs[0], att.inputs[1]
        dim = q.type.shape[-1]
        allowed_edges.update({(id(att), 3), (id(att), 4)})
        rq, rk = _absorbable_rotary(q, dim), _absorbable_rotary(k, dim)
        if (rq is None) != (rk is None):
            return None, f"{att.name}: only one of q and k has a rotation the attention can apply"
        if rq is None:
            continue
        if dim % rotary_head_multiple:
            # ORT's CPU kernel rotates only heads whose size is a multiple of 16
            return None, f"{att.name}: head size {dim} is not a multiple of {rotary_head_multiple}"
        if rq.inputs[1] is not rk.inputs[1] or rq.inputs[2] is not rk.inputs[2]:
            return None, f"{att.name}: q and k rotate with different tables"
        key = (rq.inputs[1].name, rq.inputs[2].name)
        for r in (rq, rk):
            result.rotations[id(r)] = key
            allowed_edges.update({(id(r), 1), (id(r), 2)})
        result.tables.setdefault(key, None)

    why = _positions_stay_inside(graph, past, allowed_edges)
    if why:
        return None, why
    for key in list(result.tables):
        tables = _evaluate_tables(graph, key, length)
        if isinstance(tables, str):
            return None, tables
        result.tables[key] = tables
    return result, ""


def _positions_stay_inside(graph: Graph, past: dict, allowed: set) -> str:
    """Everything computed from the cache inputs (their length, hence positions and masks)
    must end in an allowed edge: the attention's own cache inputs or an absorbed rotation's
    tables. Anything else would see the buffer's capacity instead of the cached length."""
    live = _live(graph)
    frontier = list(past.values())
    seen: set[int] = set()
    while frontier:
        v = frontier.pop()
        for u in v.uses:
            n = u.node
            if (id(n), u.index) in allowed or id(n) not in live:
                continue
            if n.op in ("Attention", "Rotary"):
                return f"{n.name} reads a position-dependent value the shared cache cannot give it"
            if any(o in graph.outputs for o in n.outputs):
                return f"{n.name} makes a graph output from the cache length"
            if id(n) not in seen:
                seen.add(id(n))
                frontier.extend(n.outputs)
    return ""


def _live(graph: Graph) -> set[int]:
    needed = {id(v) for v in graph.outputs if not v.name.startswith("present_")}
    live: set[int] = set()
    for n in reversed(graph.nodes):
        if any(id(o) in needed for o in n.outputs):
            # an attention's present outputs are written in place, not computed from past
            live.add(id(n))
            needed.update(id(x) for x in n.inputs if x is not None)
    return live


def _evaluate_tables(graph: Graph, key: tuple[str, str], length: int):
    """The rotary tables for positions 0..length-1, by running the nodes that compute them
    with a prompt of ``length`` tokens and an empty cache. They must depend on the position
    alone: a table whose first row changes with the sequence length (longrope's switch) is
    refused."""
    by_name = {v.name: v for v in graph.values()}
    targets = [by_name[name] for name in key]
    full = _evaluate(graph, targets, length)
    if isinstance(full, str):
        return full
    short = _evaluate(graph, targets, 2)
    if any(not np.array_equal(f[:2], s) for f, s in zip(full, short)):
        return "the rotary tables change with the sequence length (longrope's switch)"
    cos, sin = (np.ascontiguousarray(t, dtype=np.float32) for t in full)
    if cos.shape[0] != length:
        return f"the rotary tables have {cos.shape[0]} rows for {length} positions"
    return cos, sin


def _evaluate(graph: Graph, targets: list[Value], length: int):
    needed = {id(t) for t in targets}
    slice_nodes = []
    for n in reversed(graph.nodes):
        if any(id(o) in needed for o in n.outputs):
            slice_nodes.append(n)
            needed.update(id(x) for x in n.inputs if x is not None)
    env: dict[int, np.ndarray] = {}
    for v in graph.inputs:
        if id(v) in needed:
            shape = [1 if d == "batch" else (length if d == "seq" else (0 if not isinstance(d, int) else d))
                     for d in v.type.shape]
            env[id(v)] = np.zeros(shape, dtype=v.type.dtype)
    for v in graph.consts:
        env[id(v)] = v.const
    if any(id(w) in needed for w in graph.weights.values()):
        return "the rotary tables are computed from weights"
    for n in reversed(slice_nodes):
        results = ops.compute(n.op, [None if x is None else env[id(x)] for x in n.inputs], n.attrs)
        for o, r in zip(n.outputs, results):
            env[id(o)] = r
    return [env[id(t)] for t in targets]
