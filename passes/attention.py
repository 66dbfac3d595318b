"""Fusion: cached causal attention in primitives becomes one Attention op (after the KV pass).

Pattern, per layer, from the Softmax:

    probs  = Softmax(Add(Mul(MatMul(q, Transpose(rep(Concat(past_k, k)))), scale), MASK))
    out    = Reshape(Transpose(MatMul(probs, rep(Concat(past_v, v))), [0, 2, 1, 3]), [0, 0, H·d])

where rep is the GQA head repetition (or nothing) and MASK is the model's causal mask
(one of ``graph.meta["causal_masks"]``, written by the builder with each mask's sliding window);
gemma2's soft cap, Mul(Tanh(Div(scores, cap)), cap), may sit between the scaling and the mask;
gpt-oss's sinks join the masked scores as one more column (Concat) that a Slice drops after
the softmax. The rewrite takes q, k, v, past_k, past_v (and the sinks) and yields out,
present_k, present_v; the present outputs keep their names.
"""
from __future__ import annotations

import itertools

from kiln.ir import Graph, Node
from kiln.passes.kv_cache import NotAttention, sink_parts, softcapped
from kiln.passes.match import apply_rule, constant_operand, producer, sole_user, strip_repeat
from kiln.passes_base import PassResult, decompose_op


def _cached(present, graph: Graph):
    cat = producer(present, "Concat", "keys/values are not cached", NotAttention)
    past, new = cat.inputs
    if cat.attrs.get("axis") != 2 or past not in graph.inputs:
        raise NotAttention("the cache is not a graph input concatenated on the sequence axis")
    return cat, past, new


def match(softmax: Node, graph: Graph) -> dict:
    masks = graph.meta.get("causal_masks") or {}
    masked, sinks, probs = sink_parts(softmax)
    add = producer(masked, "Add", "softmax input is not scores + mask", NotAttention)
    scores, mask = add.inputs
    if mask.name not in masks:
        raise NotAttention("the mask is not one of the model's causal masks")
    scores, softcap = softcapped(scores)
    raw, scale = constant_operand(producer(scores, "Mul", "scores are not scaled", NotAttention))
    if scale is None:
        raise NotAttention("the scale is not a constant")
    qk = producer(raw, "MatMul", "scores are not a matrix product", NotAttention)
    kt = producer(qk.inputs[1], "Transpose", "keys are not transposed", NotAttention)
    if kt.attrs.get("perm") != [0, 1, 3, 2]:
        raise NotAttention("keys are transposed the wrong way")
    kcat, past_k, k = _cached(strip_repeat(kt.inputs[0]), graph)
    pv = sole_user(probs)
    if pv is None or pv.op != "MatMul":
        raise NotAttention("probabilities do not feed one product with the values")
    vcat, past_v, v = _cached(strip_repeat(pv.inputs[1]), graph)
    t = sole_user(pv.outputs[0])
    if t is None or t.op != "Transpose" or t.attrs.get("perm") != [0, 2, 1, 3]:
        raise NotAttention("the context is not moved back to [batch, seq, heads, dim]")
    merge = sole_user(t.outputs[0])
    if merge is None or merge.op != "Reshape":
        raise NotAttention("the context heads are not merged")
    q = qk.inputs[0]
    if q.type.rank != 4 or k.type.rank != 4:
        raise NotAttention("q/k are not [batch, heads, seq, dim]")
    return {"q": q, "k": k, "v": v, "past_k": past_k, "past_v": past_v, "scale": float(scale),
            "window": masks[mask.name], "softcap": softcap, "sinks": sinks, "out": merge.outputs[0],
            "present_k": kcat.outputs[0], "present_v": vcat.outputs[0]}


def fuse_attention(graph: Graph, head_dim_multiple: int = 1) -> PassResult:
    """``head_dim_multiple``: the target's kernel needs the head size to be a multiple of it
    (ONNX Runtime's GroupQueryAttention: 8); other attentions stay in primitives."""
    numbers = itertools.count()

    def rewrite(node):
        m = match(node, graph)
        if m["q"].type.shape[-1] % head_dim_multiple:
            raise NotAttention(f"head size {m['q'].type.shape[-1]} is not a multiple of {head_dim_multiple}")
        ins = [m["q"], m["k"], m["v"], m["past_k"], m["past_v"]] + ([m["sinks"]] if m["sinks"] is not None else [])
        out, pk, pv = graph.add_node("Attention", ins,
                                     {"scale": m["scale"], "window": m["window"], "softcap": m["softcap"]},
                                     name=f"attention.{next(numbers)}",
                                     output_names=[m["out"].name + ".attn", m["present_k"].name + ".attn",
                                                   m["present_v"].name + ".attn"])
        for old, new in ((m["out"], out), (m["present_k"], pk), (m["present_v"], pv)):
            graph.replace_all_uses_with(old, new)
        # the cache outputs keep the names the runtime binds
        for old, new in ((m["present_k"], pk), (m["present_v"], pv)):
            old.name, new.name = new.name, old.name
    return apply_rule(graph, "Softmax", rewrite, "attention")


def decompose(graph: Graph) -> PassResult:
    """Attention back to primitives (cache concat, GQA repetition, masked softmax)."""
    import numpy as np

    def expand(node, add):
        q, k, v, past_k, past_v = node.inputs[:5]
        _, heads, _, dim = q.type.shape
        kv = k.type.shape[1]

        def i64(x):
            return graph.const(np.asarray(x, dtype=np.int64))

        def repeat(x, suffix):
            if heads == kv:
                return x
            x = add("Unsqueeze", [x], {"axes": [2]}, f"{suffix}.unsqueeze")
            x = add("Expand", [x, i64([1, 1, heads // kv, 1, 1])], suffix=f"{suffix}.expand")
            return add("Reshape", [x, i64([0, heads, -1, dim])], suffix=f"{suffix}.repeat")
        present_k = add("Concat", [past_k, k], {"axis": 2}, "present_k")
        present_v = add("Concat", [past_v, v], {"axis": 2}, "present_v")
        past = add("Gather", [add("Shape", [past_k], suffix="past_shape"), i64(2)], suffix="past_len")
        total = add("Add", [past, add("Gather", [add("Shape", [q], suffix="q_shape"), i64(2)], suffix="seq_len")],
                    suffix="total_len")
        qpos = add("Unsqueeze", [add("Range", [past, total, i64(1)], suffix="q_range")], {"axes": [1]}, "qpos")
        kpos = add("Unsqueeze", [add("Range", [i64(0), total, i64(1)], suffix="k_range")], {"axes": [0]}, "kpos")
        allowed = add("LessOrEqual", [kpos, qpos], suffix="causal")
        if node.attrs.get("window"):
            recent = add("Greater", [kpos, add("Sub", [qpos, i64(node.attrs["window"])], suffix="window_start")],
                         suffix="in_window")
            allowed = add("And", [allowed, recent], suffix="causal_window")
        mask = add("Where", [allowed, graph.const(np.float32(0)), graph.const(np.float32(np.finfo(np.float32).min))],
                   suffix="mask")
        kt = add("Transpose", [repeat(present_k, "k")], {"perm": [0, 1, 3, 2]}, "k_t")
        scores = add("Mul", [add("MatMul", [q, kt], suffix="scores"), graph.const(np.float32(node.attrs["scale"]))],
                     suffix="scaled")
        if node.attrs.get("softcap"):
            cap = graph.const(np.float32(node.attrs["softcap"]))
            scores = add("Mul", [add("Tanh", [add("Div", [scores, cap], suffix="softcap_div")], suffix="softcap_tanh"),
                                 cap], suffix="softcapped")
        scores = add("Add", [scores, mask], suffix="masked")
        if len(node.inputs) == 6:
            col = add("Reshape", [node.inputs[5], i64([1, heads, 1, 1])], suffix="sinks_heads")
            lead = add("Slice", [add("Shape", [scores], suffix="scores_shape")],
                       {"starts": [0], "ends": [3], "axes": [0]}, "sinks_lead")
            col = add("Expand", [col, add("Concat", [lead, i64([1])], {"axis": 0}, "sinks_shape")], suffix="sinks_col")
            scores = add("Concat", [scores, col], {"axis": -1}, "with_sinks")
        probs = add("Softmax", [scores], {"axis": -1}, "probs")
        if len(node.inputs) == 6:
            probs = add("Slice", [probs], {"starts": [0], "ends": [-1], "axes": [-1]}, "probs_keys")
        ctx = add("Transpose", [add("MatMul", [probs, repeat(present_v, "v")], suffix="context")],
                  {"perm": [0, 2, 1, 3]}, "context_t")
        return [add("Reshape", [ctx, i64([0, 0, heads * dim])], suffix="out"), present_k, present_v]
    # the present outputs keep the names the runtime binds
    return decompose_op(graph, "Attention", expand, keep_names=True)
