"""Fusion: rotate-half rotary embedding in primitives becomes one Rotary op.

Pattern (transformers' apply_rotary_pos_emb on [b, h, s, d], full head rotated):

    Add(Mul(x, C), Mul(Concat(Neg(Slice(x, d/2..d)), Slice(x, 0..d/2)), S))
    C = Cos(Concat(f, f)) [· a],  S = Sin(Concat(f, f)) [· a]

The rewrite keeps the half tables, Cos(f) [· a] and Sin(f) [· a], shared by all layers.
With partial rotary, x is the rotated slice of each head; the pass-through part stays as it is.
"""
from __future__ import annotations

from kiln.ir import Graph, Node
from kiln.ops import scalar_value
from kiln.passes.match import NoMatch, apply_rule, constant_operand, made_by, producer
from kiln.passes_base import PassResult, decompose_op


class NotRotary(NoMatch):
    pass


def _op(v, op):
    return producer(v, op, "rotary", NotRotary)


def _half_table(v, trig: str):
    """(freqs, factor) when v is trig(Concat(freqs, freqs)) [* factor]."""
    factor = None
    if (n := made_by(v, "Mul")) is not None:
        v, value = constant_operand(n)
        if value is None:
            raise NotRotary("table scaled by a non-constant")
        factor = n.inputs[1] if n.inputs[0] is v else n.inputs[0]
    cat = _op(_op(v, trig).inputs[0], "Concat")
    f1, f2 = cat.inputs
    if f1 is not f2 or cat.attrs.get("axis") not in (-1, len(f1.type.shape) - 1):
        raise NotRotary("table is not a doubled frequency table")
    return f1, factor


def match(add: Node) -> dict:
    m1, m2 = (_op(v, "Mul") for v in add.inputs)
    for direct, rot in ((m1, m2), (m2, m1)):
        try:
            x, c = direct.inputs
            r, s = rot.inputs
            if made_by(r, "Concat") is None:
                r, s = s, r
            if made_by(c, "Cos", "Mul") is None:
                x, c = c, x
            cat = _op(r, "Concat")
            neg, x1 = cat.inputs
            x2 = _op(neg, "Neg").inputs[0]
            s1, s2 = _op(x1, "Slice"), _op(x2, "Slice")
            d = x.type.shape[-1]
            if not isinstance(d, int) or s1.inputs[0] is not x or s2.inputs[0] is not x:
                continue
            half = d // 2
            if (s1.attrs["starts"], s1.attrs["ends"], s2.attrs["starts"], s2.attrs["ends"]) != ([0], [half], [half], [d]) \
                    or s1.attrs["axes"] != [-1] or s2.attrs["axes"] != [-1]:
                continue
            fc, ac = _half_table(c, "Cos")
            fs, as_ = _half_table(s, "Sin")
            if fc is not fs or scalar_value(ac) != scalar_value(as_):
                continue
            return {"x": x, "freqs": fc, "factor": ac}
        except NotRotary:
            continue
    raise NotRotary("not a rotate-half rotary")


def fuse_rotary(graph: Graph) -> PassResult:
    tables: dict[tuple, tuple] = {}

    def rewrite(node):
        m = match(node)
        key = (id(m["freqs"]), scalar_value(m["factor"]))
        if key not in tables:
            # one pair of tables per frequency table (gemma3's sliding and global layers differ);
            # node names must be unique in an ONNX graph
            tag = f".{len(tables)}" if tables else ""
            cos = graph.add_node("Cos", [m["freqs"]], name=f"rotary_cos_half{tag}")[0]
            sin = graph.add_node("Sin", [m["freqs"]], name=f"rotary_sin_half{tag}")[0]
            if m["factor"] is not None:
                cos = graph.add_node("Mul", [cos, m["factor"]], name=f"rotary_cos_half_scaled{tag}")[0]
                sin = graph.add_node("Mul", [sin, m["factor"]], name=f"rotary_sin_half_scaled{tag}")[0]
            tables[key] = (cos, sin)
        cos, sin = tables[key]
        y = graph.add_node("Rotary", [m["x"], cos, sin], name=node.name,
                           output_names=[node.outputs[0].name + ".rot"])[0]
        graph.replace_all_uses_with(node.outputs[0], y)
    return apply_rule(graph, "Add", rewrite, "rotary")


def decompose(graph: Graph) -> PassResult:
    """Rotary back to Slice, Neg, Concat, Mul, Add."""
    def expand(node, add):
        x, cos, sin = node.inputs
        d = x.type.shape[-1]
        half = d // 2
        c = add("Concat", [cos, cos], {"axis": -1}, "cos")
        s = add("Concat", [sin, sin], {"axis": -1}, "sin")
        x1 = add("Slice", [x], {"starts": [0], "ends": [half], "axes": [-1]}, "x1")
        x2 = add("Slice", [x], {"starts": [half], "ends": [d], "axes": [-1]}, "x2")
        rotated = add("Concat", [add("Neg", [x2]), x1], {"axis": -1}, "rotate_half")
        return [add("Add", [add("Mul", [x, c], suffix="xcos"), add("Mul", [rotated, s], suffix="rsin")])]
    return decompose_op(graph, "Rotary", expand)
