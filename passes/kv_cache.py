"""KV-cache insertion: turn full-sequence attention into one graph for prefill and decode.

For every attention (MatMul -> Mul(scale) -> Add(mask) -> Softmax -> MatMul) the pass finds the
key and value tensors before any GQA head repetition, adds inputs ``past_key.{i}`` /
``past_value.{i}`` of shape [batch, kv_heads, past, head_dim], concatenates them in front of
the new keys/values along the sequence axis, and exposes the results as ``present_key.{i}`` /
``present_value.{i}`` outputs (the growing layout ONNX Runtime uses). The builder's
``past_length`` constant becomes the cached length read off ``past_key.0``, so positions and the
causal mask follow.
"""
from __future__ import annotations

from kiln.ir import Graph, Node, Value
from kiln.ops import scalar_value
from kiln.passes.match import Refused, constant_operand, made_by, producer, sole_user, strip_repeat
from kiln.passes_base import PassResult


class NotAttention(Refused):
    """A Softmax that is not the attention pattern; the message says why."""


def softcapped(scores: Value) -> tuple[Value, float]:
    """(the scores before gemma2's soft cap, the cap) for Mul(Tanh(Div(x, c)), c); else (scores, 0.0)."""
    mul = made_by(scores, "Mul")
    if mul is None:
        return scores, 0.0
    a, cap = constant_operand(mul)
    tanh = made_by(a, "Tanh")
    div = made_by(tanh.inputs[0], "Div") if tanh is not None and cap is not None else None
    if div is None or scalar_value(div.inputs[1]) != cap:
        return scores, 0.0
    return div.inputs[0], float(cap)


def sink_parts(softmax: Node) -> tuple[Value, Value | None, Value]:
    """(the softmax's input before gpt-oss's sink column, the sinks [heads] or None, the
    probabilities over the keys) for Slice(Softmax(Concat(x, Expand(Reshape(sinks)))), ..-1)."""
    cat = made_by(softmax.inputs[0], "Concat")
    if cat is None:
        return softmax.inputs[0], None, softmax.outputs[0]
    if len(cat.inputs) != 2 or cat.attrs.get("axis") not in (-1, 3):
        raise NotAttention("the softmax input is a concatenation, not scores and a sink column")
    heads = producer(producer(cat.inputs[1], "Expand", "the sink column is not broadcast", NotAttention).inputs[0],
                     "Reshape", "the sinks are not one per head", NotAttention)
    sinks = heads.inputs[0]
    if sinks.type.rank != 1:
        raise NotAttention("the sinks are not one logit per head")
    cut = sole_user(softmax.outputs[0])
    if cut is None or cut.op != "Slice" or cut.attrs.get("ends") != [-1] or cut.attrs.get("starts") != [0] \
            or cut.attrs.get("axes") not in ([-1], [3]):
        raise NotAttention("the sink's probability is not dropped after the softmax")
    return cat.inputs[0], sinks, cut.outputs[0]


def match_attention(softmax: Node) -> tuple[Value, Value]:
    """(keys, values) feeding this attention softmax, each [batch, kv_heads, seq, head_dim]."""
    masked, _, probs = sink_parts(softmax)
    add = producer(masked, "Add", "softmax input is not scores + mask", NotAttention)
    scores = softcapped(add.inputs[0])[0]
    if (mul := made_by(scores, "Mul")) is not None:
        scores = mul.inputs[0]
    qk = producer(scores, "MatMul", "scores are not a matrix product", NotAttention)
    kt = producer(qk.inputs[1], "Transpose", "keys are not transposed", NotAttention)
    if kt.attrs.get("perm") != [0, 1, 3, 2]:
        raise NotAttention(f"key transpose has perm {kt.attrs.get('perm')}, not [0, 1, 3, 2]")
    pv = [u.node for u in probs.uses if u.node.op == "MatMul" and u.index == 0]
    if len(pv) != 1:
        raise NotAttention("softmax output does not feed exactly one probs @ values product")
    return strip_repeat(kt.inputs[0]), strip_repeat(pv[0].inputs[1])


def insert_kv_cache(graph: Graph) -> PassResult:
    if any(v.name.startswith("past_key") for v in graph.inputs):
        return PassResult(graph, False, {})
    layers = []
    refused = []
    for node in graph.nodes:
        if node.op == "Softmax":
            try:
                layers.append(match_attention(node))
            except NotAttention as e:
                refused.append(f"{node.name}: {e}")
    if not layers:
        return PassResult(graph, False, {"refused": len(refused)} if refused else {})
    past_inputs = []
    for i, (k, v) in enumerate(layers):
        for kind, cur in (("key", k), ("value", v)):
            batch, heads, _, dim = cur.type.shape
            past = graph.add_input(f"past_{kind}.{i}", cur.type.dtype, ("batch", heads, "past", dim))
            past_inputs.append(past)
            present = graph.add_node("Concat", [past, cur], {"axis": 2}, name=f"present_{kind}.{i}",
                                     output_names=[f"present_{kind}.{i}"])[0]
            graph.replace_all_uses_with(cur, present, except_node=present.producer)
            graph.outputs.append(present)
    past_len_name = graph.meta.get("past_length")
    past_len = next((c for c in graph.consts if c.name == past_len_name), None)
    if past_len is not None:
        shape = graph.add_node("Shape", [past_inputs[0]], name="past_shape")[0]
        cached = graph.add_node("Gather", [shape, graph.const(2, "int64", name="seq_axis")], name="past_length_from_cache")[0]
        graph.replace_all_uses_with(past_len, cached)
        graph.meta["past_length"] = cached.name
    graph.toposort()
    graph.meta["kv_cache"] = {"layout": "concat", "layers": len(layers)}
    stats = {"attention_layers": len(layers)}
    if refused:
        stats["refused"] = len(refused)
    return PassResult(graph, True, stats)
