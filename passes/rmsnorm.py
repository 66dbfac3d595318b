"""Fusion: the RMSNorm the frontends write in primitives becomes one RMSNorm op.

Pattern (transformers' LlamaRMSNorm, gemma's with ``1 + w``, qwen3's per-head q/k norms):

    y = Mul(Mul(x, Reciprocal(Sqrt(Add(ReduceMean(Pow(x, 2), axes=[-1]), eps)))), scale)
    scale = w  |  Add(w, offset)

The check refuses, with the reason, anything that differs: another exponent or axis, a
non-constant epsilon, a scale that is not a weight, two different x.
"""
from __future__ import annotations

from kiln.ir import Graph, Node
from kiln.ops import scalar_value
from kiln.passes_base import PassResult, decompose_op


class NotRMSNorm(Exception):
    """Nothing like an RMSNorm ends here."""


class Refused(Exception):
    """Starts like an RMSNorm but differs; the message says how."""


def _producer(v, op: str, what: str) -> Node:
    n = v.producer if v is not None else None
    if n is None or n.op != op:
        raise Refused(f"{what} is not {op}")
    return n


def match(mul: Node) -> dict:
    """The parts of an RMSNorm ending at this Mul, or Refused with the reason."""
    normed_mul, scale = mul.inputs
    if normed_mul.producer is None or normed_mul.producer.op != "Mul":
        normed_mul, scale = scale, normed_mul
    if normed_mul.producer is None or normed_mul.producer.op != "Mul":
        raise NotRMSNorm()
    x, rstd = normed_mul.producer.inputs
    if rstd.producer is None or rstd.producer.op != "Reciprocal":
        x, rstd = rstd, x
    if rstd.producer is None or rstd.producer.op != "Reciprocal":
        raise NotRMSNorm()
    sqrt = _producer(rstd.producer.inputs[0], "Sqrt", "the deviation")
    add = _producer(sqrt.inputs[0], "Add", "variance + epsilon")
    var, eps = add.inputs
    if scalar_value(eps) is None:
        var, eps = eps, var
    eps_value = scalar_value(eps)
    if eps_value is None:
        raise Refused("epsilon is not a constant")
    mean = _producer(var, "ReduceMean", "the variance")
    if mean.attrs.get("axes") != [-1] or not mean.attrs.get("keepdims", 1):
        raise Refused(f"the mean runs over axes {mean.attrs.get('axes')}, not the last one")
    pow_ = _producer(mean.inputs[0], "Pow", "the square")
    if pow_.inputs[0] is not x or scalar_value(pow_.inputs[1]) != 2.0:
        raise Refused("the square is not x ** 2 of the normalized x")
    offset = 0.0
    if scale.producer is not None and scale.producer.op == "Add":
        w, off = scale.producer.inputs
        if scalar_value(off) is None:
            w, off = off, w
        offset = scalar_value(off)
        scale = w
    if not scale.is_weight or offset is None:
        raise Refused("the scale is not a weight (plus a constant)")
    if scale.type.shape != x.type.shape[-1:]:
        raise Refused(f"the scale has shape {scale.type.shape}, the normalized axis {x.type.shape[-1:]}")
    return {"x": x, "w": scale, "epsilon": float(eps_value), "offset": float(offset)}


def fuse_rmsnorm(graph: Graph) -> PassResult:
    fused, refused = 0, 0
    for node in list(graph.nodes):
        if node.op != "Mul":
            continue
        try:
            m = match(node)
        except NotRMSNorm:
            continue
        except Refused:
            refused += 1
            continue
        y = graph.add_node("RMSNorm", [m["x"], m["w"]], {"epsilon": m["epsilon"], "offset": m["offset"]},
                           name=node.name, output_names=[node.outputs[0].name + ".rms"])[0]
        graph.replace_all_uses_with(node.outputs[0], y)
        fused += 1
    if not fused:
        return PassResult(graph, False, {"refused": refused} if refused else {})
    graph.toposort()
    return PassResult(graph, True, {"rmsnorm": fused, **({"refused": refused} if refused else {})})


def decompose(graph: Graph) -> PassResult:
    """RMSNorm back to primitives, for a backend without it."""
    import numpy as np

    def expand(node, add):
        x, w = node.inputs
        var = add("ReduceMean", [add("Pow", [x, graph.const(np.float32(2.0))])], {"axes": [-1], "keepdims": 1})
        rstd = add("Reciprocal", [add("Sqrt", [add("Add", [var, graph.const(np.float32(node.attrs["epsilon"]))])])])
        scale = w
        if node.attrs.get("offset"):
            scale = add("Add", [w, graph.const(np.float32(node.attrs["offset"]))], suffix="scale")
        return [add("Mul", [add("Mul", [x, rstd], suffix="normed"), scale], suffix="out")]
    return decompose_op(graph, "RMSNorm", expand)
