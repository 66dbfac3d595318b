"""The matcher toolkit the fusion passes share, in the style of onnxscript's rewriter: a rule
is a ``match`` (walk from the node where a pattern ends to the producers it names, with
:func:`made_by` for optional steps such as a scaling or a GQA repetition) with its checks,
and a rewrite; :func:`apply_rule` runs one over a graph and counts what it fused and
what it refused.

A match says why it fails by what it raises: :class:`NoMatch` for nothing of the pattern
(not counted), :class:`Refused` for something that starts like it but differs (counted, and
the message says how: a near miss is worth a look).
"""
from __future__ import annotations

from typing import Callable

from kiln.ir import Graph, Node, Value
from kiln.ops import scalar_value
from kiln.passes_base import PassResult


class NoMatch(Exception):
    """Nothing of the pattern ends here."""


class Refused(Exception):
    """Starts like the pattern but differs; the message says how."""


def producer(v: Value | None, op: str, what: str, error: type[Exception] = Refused) -> Node:
    """The node of kind ``op`` that makes ``v``, else ``error`` naming ``what`` was expected."""
    n = v.producer if v is not None else None
    if n is None or n.op != op:
        raise error(f"{what}: expected {op}, found {n.op if n else 'a graph input'}")
    return n


def made_by(v: Value | None, *ops: str) -> Node | None:
    """The node that makes ``v`` when it is one of ``ops``, else None (an optional step)."""
    n = v.producer if v is not None else None
    return n if n is not None and n.op in ops else None


def linear_weight(node: Node) -> Value | None:
    """``w`` when ``node`` is a linear layer ``MatMul(x, Transpose(w, perm=[1, 0]))`` over a
    weight, else None."""
    t = made_by(node.inputs[1], "Transpose") if node.op == "MatMul" else None
    if t is None or t.attrs.get("perm") != [1, 0] or not t.inputs[0].is_weight:
        return None
    return t.inputs[0]


def strip_repeat(v: Value) -> Value:
    """The tensor before GQA head repetition (Unsqueeze -> Expand -> Reshape), or v itself."""
    reshape = made_by(v, "Reshape")
    expand = made_by(reshape.inputs[0], "Expand") if reshape else None
    unsqueeze = made_by(expand.inputs[0], "Unsqueeze") if expand else None
    return unsqueeze.inputs[0] if unsqueeze else v


def constant_operand(node: Node) -> tuple[Value, float | None]:
    """(the other operand, the constant) of a binary op with one scalar constant operand, in
    either order; the constant is None when neither operand is one."""
    a, c = node.inputs
    if scalar_value(c) is None:
        a, c = c, a
    return a, scalar_value(c)


def sole_user(v: Value) -> Node | None:
    """The one node that reads ``v``, None when there are none or several."""
    users = [u.node for u in v.uses]
    return users[0] if len(users) == 1 else None


def apply_rule(graph: Graph, op: str, rewrite: Callable[[Node], None], stat: str) -> PassResult:
    """``rewrite(node)`` for every node of kind ``op`` (it matches, checks and rewrites, or
    raises NoMatch or Refused); stats ``{stat: fused, "refused": n}``."""
    fused, refused = 0, 0
    for node in list(graph.nodes):
        if node.op != op:
            continue
        try:
            rewrite(node)
        except NoMatch:
            continue
        except Refused:
            refused += 1
            continue
        fused += 1
    counted = {"refused": refused} if refused else {}
    if not fused:
        return PassResult(graph, False, counted)
    graph.toposort()
    return PassResult(graph, True, {stat: fused, **counted})
