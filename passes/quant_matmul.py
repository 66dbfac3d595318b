"""Fusion: a linear layer over a block-quantized weight becomes one QuantMatMul.

Rule: ``MatMul(x, Transpose(w, perm=[1, 0]))`` where ``w`` is a weight stored in a block format
the target can take as it is. The blocks then reach the backend untouched (no dequantize and
requantize); ``decompose`` turns QuantMatMul back into the primitives for backends without it.
"""
from __future__ import annotations

from kiln.ir import Graph
from kiln.passes.match import linear_weight
from kiln.passes_base import PassResult, decompose_op


def match(node, formats: set[str]) -> tuple[object, object] | str:
    """(x, w) of a quantized linear layer, or the reason this MatMul is not one."""
    w = linear_weight(node)
    if w is None:
        return "right operand is not a transposed weight"
    fmt = w.weight.format
    if not fmt.is_block:
        return "weight is not block-quantized"
    if fmt.name not in formats or w.type.shape[-1] % fmt.block_size:
        return f"the target takes no {fmt.name} blocks of this shape"
    return node.inputs[0], w


def fuse_quant_matmul(graph: Graph, formats: frozenset | set[str]) -> PassResult:
    """``formats``: the block formats the target takes as they are (``kiln.targets.fusions``)."""
    fused, refused = {}, 0
    for node in list(graph.nodes):
        if node.op != "MatMul":
            continue
        m = match(node, formats)
        if isinstance(m, str):
            # weights that stay float here: a plain float weight, or blocks the target cannot take
            refused += m.startswith("the target")
            continue
        x, w = m
        y = graph.add_node("QuantMatMul", [x, w], name=node.name, output_names=[node.outputs[0].name + ".q"])[0]
        graph.replace_all_uses_with(node.outputs[0], y)
        graph.remove_node(node)
        key = w.weight.format.name
        fused[key] = fused.get(key, 0) + 1
    if not fused:
        return PassResult(graph, False, {"kept_float": refused} if refused else {})
    graph.toposort()
    stats = {f"quant_matmul_{k}": v for k, v in sorted(fused.items())}
    if refused:
        stats["kept_float"] = refused
    return PassResult(graph, True, stats)


def decompose(graph: Graph) -> PassResult:
    """QuantMatMul back to MatMul(x, Transpose(w))."""
    def expand(node, add):
        x, w = node.inputs
        return [add("MatMul", [x, add("Transpose", [w], {"perm": [1, 0]}, "wt")], suffix="mm")]
    return decompose_op(graph, "QuantMatMul", expand)
