"""Merge: linear layers that read the same activation become one wider MatMul and a Split.

Rule: ``MatMul(x, Transpose(w_i, perm=[1, 0]))`` for i = 1..n over the same ``x`` (q/k/v of an
attention, gate/up of a gated MLP), each ``w_i`` a 2-D weight of one storage format (for block
formats: the same blocks along the same K), become

    y = MatMul(x, Transpose(concat_rows(w_1..w_n)))  [+ concat(b_1..b_n)]
    y_1..y_n = Split(y, axis=-1, split=[N_1..N_n])

The merged weight stacks the weights' rows (N) lazily (``kiln.weights.concat_rows``): block
formats keep every block bit for bit and nothing is read until the lowering asks. When every
member is followed by a bias ``Add`` of a 1-D weight, the biases are stacked the same way and
added once before the Split. The consumers then read the same [b, s, N_i] values as before, so
the attention lowering still finds the Reshape → Transpose head split of each projection.

Refused (``match`` says why; ``refused`` counts the linear layers that share their input with
another and still stay alone): a weight stored in another format than the rest (a Q4_K_M
file's Q6_K ``v``: q and k still merge), a weight or transpose also read elsewhere (a tied
embedding: merging would copy it). The result is primitive ops, which every backend runs;
``decompose`` splits a merged product back into one MatMul per part.
"""
from __future__ import annotations

from kiln.ir import Graph, Node, Value
from kiln.passes.match import linear_weight
from kiln.passes_base import PassResult
from kiln.weights import concat_rows


class NotLinear(Exception):
    """Not a linear layer ``MatMul(x, Transpose(w))`` over a 2-D weight."""


class Refused(Exception):
    """A linear layer that cannot join a merge; the message says why."""


def match(node: Node) -> tuple[Value, Value]:
    """(x, w) of a linear layer that may merge; NotLinear, or Refused with the reason."""
    w = linear_weight(node)
    if w is None or len(w.weight.shape) != 2:
        raise NotLinear()
    if len(node.inputs[1].uses) != 1 or len(w.uses) != 1:
        raise Refused("the weight is also read elsewhere (tied)")
    return node.inputs[0], w


def _bias(y: Value) -> tuple[Node, Value] | None:
    """The ``Add(y, b)`` of a 1-D bias weight that is y's only use, with b."""
    if len(y.uses) != 1 or y.uses[0].node.op != "Add":
        return None
    add = y.uses[0].node
    b = add.inputs[1 - y.uses[0].index]
    if b is None or not b.is_weight or b.type.shape != y.type.shape[-1:] or len(b.uses) != 1:
        return None
    return add, b


def _merged_name(names: list[str]) -> str:
    """``layers.0.q.weight`` + ``layers.0.k.weight`` -> ``layers.0.q_k.weight``."""
    parts = [n.split(".") for n in names]
    head = 0
    while all(len(p) > head + 1 and p[head] == parts[0][head] for p in parts):
        head += 1
    tail = 0
    while all(len(p) > head + tail + 1 and p[-1 - tail] == parts[0][-1 - tail] for p in parts):
        tail += 1
    middles = ["_".join(p[head:len(p) - tail]) for p in parts]
    return ".".join(parts[0][:head] + ["_".join(middles)] + (parts[0][len(parts[0]) - tail:] if tail else []))


def _add_weight(graph: Graph, name: str, weight, dtype: str) -> Value:
    return graph.add_weight(graph.fresh_name(name) if name in graph.weights else name, weight, dtype)


def _merge(graph: Graph, x: Value, members: list[tuple[Node, Value]]) -> None:
    ws = [w for _, w in members]
    name = _merged_name([w.name for w in ws])
    wv = _add_weight(graph, name, concat_rows([w.weight for w in ws], name=name), ws[0].type.dtype)
    y = graph.add_node("MatMul", [x, graph.add_node("Transpose", [wv], {"perm": [1, 0]}, name=f"{wv.name}.wt")[0]],
                       name=wv.name.removesuffix(".weight"))[0]
    outs = [node.outputs[0] for node, _ in members]
    biases = [_bias(o) for o in outs]
    if all(biases) and len({(b.weight.format.name, b.type.dtype) for _, b in biases}) == 1:
        bname = _merged_name([b.name for _, b in biases])
        bv = _add_weight(graph, bname, concat_rows([b.weight for _, b in biases], name=bname), biases[0][1].type.dtype)
        y = graph.add_node("Add", [y, bv], name=f"{y.producer.name}.bias")[0]
        outs = [add.outputs[0] for add, _ in biases]
    parts = graph.add_node("Split", [y], {"axis": -1, "split": [w.type.shape[0] for w in ws]},
                           name=f"{y.producer.name}.split", output_names=[f"{o.name}.part" for o in outs])
    for old, new in zip(outs, parts):
        graph.replace_all_uses_with(old, new)
    for (node, w), old in zip(members, outs):
        if old is not node.outputs[0]:           # its bias went into the merged Add
            add, b = _bias(node.outputs[0])
            graph.remove_node(add)
            graph.weights.pop(b.name, None)
        t = node.inputs[1].producer
        graph.remove_node(node)
        graph.remove_node(t)
        graph.weights.pop(w.name, None)


def merge_matmul(graph: Graph) -> PassResult:
    # linear layers by the activation they read; a refused one is kept with its reason
    groups: dict[int, list[tuple[Node, Value | Refused]]] = {}
    for node in graph.nodes:
        try:
            m = match(node)[1]
        except NotLinear:
            continue
        except Refused as e:
            m = e
        groups.setdefault(id(node.inputs[0]), []).append((node, m))
    merged = parts = refused = 0
    for members in groups.values():
        if len(members) < 2:
            continue
        by_format: dict[tuple, list] = {}
        for node, w in members:
            if isinstance(w, Refused):
                refused += 1
                continue
            by_format.setdefault((w.weight.format.name, w.type.dtype), []).append((node, w))
        for same in by_format.values():
            if len(same) < 2:
                refused += 1                        # alone in its storage format
                continue
            _merge(graph, same[0][0].inputs[0], same)
            merged += 1
            parts += len(same)
    stats = {k: v for k, v in (("merged", merged), ("matmuls", parts), ("refused", refused)) if v}
    if merged:
        graph.toposort()
    return PassResult(graph, bool(merged), stats)


def decompose(graph: Graph) -> PassResult:
    """A merged product back to one MatMul per part (rows of the merged weight, still lazy)."""
    n = 0
    for split in [s for s in graph.nodes if s.op == "Split"]:
        y = split.inputs[0]
        add = y.producer if y.producer is not None and y.producer.op == "Add" else None
        mm = (add.inputs[0] if add is not None else y).producer
        if mm is None or len(mm.outputs[0].uses) != 1 or len(y.uses) != 1 \
                or split.attrs["axis"] not in (-1, y.type.rank - 1):
            continue
        try:
            x, w = match(mm)
        except (NotLinear, Refused):
            continue
        bias = add.inputs[1] if add is not None else None
        if bias is not None and not bias.is_weight:
            continue
        start = 0
        for i, (size, out) in enumerate(zip(split.attrs["split"], split.outputs)):
            rows = range(start, start + size)
            start += size
            wi = _add_weight(graph, f"{w.name}.part{i}", w.weight.take_rows(list(rows)), w.type.dtype)
            yi = graph.add_node("MatMul", [x, graph.add_node("Transpose", [wi], {"perm": [1, 0]})[0]],
                                name=f"{mm.name}.part{i}")[0]
            if bias is not None:
                bi = _add_weight(graph, f"{bias.name}.part{i}", bias.weight.take_rows(list(rows)), bias.type.dtype)
                yi = graph.add_node("Add", [yi, bi], name=f"{mm.name}.part{i}.bias")[0]
            graph.replace_all_uses_with(out, yi)
        for dead in (split, add, mm, mm.inputs[1].producer):
            if dead is not None:
                graph.remove_node(dead)
        graph.weights.pop(w.name, None)
        if bias is not None:
            graph.weights.pop(bias.name, None)
        n += 1
    if n:
        graph.toposort()
    return PassResult(graph, bool(n), {"unmerged": n} if n else {})
