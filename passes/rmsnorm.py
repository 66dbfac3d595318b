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
from kiln.passes.match import NoMatch, Refused, apply_rule, constant_operand, made_by, producer
from kiln.passes_base import PassResult, decompose_op


def match(mul: Node) -> dict:
    """The parts of an RMSNorm ending at this Mul, or Refused with the reason (NoMatch where
    nothing of one ends here)."""
    normed_mul, scale = mul.inputs
    if made_by(normed_mul, "Mul") is None:
        normed_mul, scale = scale, normed_mul
    if made_by(normed_mul, "Mul") is None:
        raise NoMatch()
    x, rstd = normed_mul.producer.inputs
    if made_by(rstd, "Reciprocal") is None:
        x, rstd = rstd, x
    if made_by(rstd, "Reciprocal") is None:
        raise NoMatch()
    sqrt = producer(rstd.producer.inputs[0], "Sqrt", "the deviation")
    var, eps = constant_operand(producer(sqrt.inputs[0], "Add", "variance + epsilon"))
    if eps is None:
        raise Refused("epsilon is not a constant")
    mean = producer(var, "ReduceMean", "the variance")
    if mean.attrs.get("axes") != [-1] or not mean.attrs.get("keepdims", 1):
        raise Refused(f"the mean runs over axes {mean.attrs.get('axes')}, not the last one")
    pow_ = producer(mean.inputs[0], "Pow", "the square")
    if pow_.inputs[0] is not x or scalar_value(pow_.inputs[1]) != 2.0:
        raise Refused("the square is not x ** 2 of the normalized x")
    offset = 0.0
    if (plus := made_by(scale, "Add")) is not None:
        scale, offset = constant_operand(plus)
    if not scale.is_weight or offset is None:
        raise Refused("the scale is not a weight (plus a constant)")
    if scale.type.shape != x.type.shape[-1:]:
        raise Refused(f"the scale has shape {scale.type.shape}, the normalized axis {x.type.shape[-1:]}")
    return {"x": x, "w": scale, "epsilon": float(eps), "offset": float(offset)}


def fuse_rmsnorm(graph: Graph) -> PassResult:
    def rewrite(node):
        m = match(node)
        y = graph.add_node("RMSNorm", [m["x"], m["w"]], {"epsilon": m["epsilon"], "offset": m["offset"]},
                           name=node.name, output_names=[node.outputs[0].name + ".rms"])[0]
        graph.replace_all_uses_with(node.outputs[0], y)
    return apply_rule(graph, "Mul", rewrite, "rmsnorm")


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
