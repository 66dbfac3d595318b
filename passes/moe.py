"""MoE back to primitives, for backends without a mixture-of-experts kernel.

The decomposition is dense: every expert's MLP runs on every token and a routing matrix
[tokens, experts] (the top-k weights where chosen, 0 elsewhere) weights their sum. It computes
what the op computes (the unchosen experts add exact zeros) with nothing beyond ONNX's standard
ops, at the cost of reading every expert's weights: the correct baseline a sparse kernel must
match, not a fast path.
"""
from __future__ import annotations

import numpy as np

from kiln.ir import Graph
from kiln.ops import full_attrs, get
from kiln.ops_moe import parts
from kiln.passes_base import PassResult, decompose_op


def decompose(graph: Graph) -> PassResult:
    def expand(node, add):
        attrs = full_attrs(get("MoE"), node.attrs)
        (x, router, gate, up, down), bias, shared_in = parts(node.inputs, attrs)
        n_experts = gate.type.shape[0]
        k = int(attrs["top_k"])

        def linear(v, w, suffix, perm=(1, 0)):
            return add("MatMul", [v, add("Transpose", [w], {"perm": list(perm)}, f"{suffix}.wt")], suffix=suffix)

        def silu(v, suffix):
            return add("Mul", [v, add("Sigmoid", [v], suffix=f"{suffix}.sigmoid")], suffix=suffix)

        def per_expert(b, suffix):
            """a bias [X, n] as [X, 1, n], added to every expert's [b, X, s, n] rows"""
            return add("Unsqueeze", [b], {"axes": [1]}, suffix)

        def glu(g, u):
            if attrs["activation"] == "silu":
                return add("Mul", [silu(g, "act"), u], suffix="gated")
            # gpt-oss: (clip(u, -limit, limit) + 1) * g * sigmoid(alpha * g), g = min(gate, limit)
            limit, alpha = graph.const(np.float32(attrs["limit"])), graph.const(np.float32(attrs["alpha"]))
            g = add("Min", [g, limit], suffix="gate_clamped")
            u = add("Min", [add("Max", [u, graph.const(np.float32(-attrs["limit"]))], suffix="up_floor"), limit],
                    suffix="up_clamped")
            act = add("Mul", [g, add("Sigmoid", [add("Mul", [g, alpha], suffix="gate_alpha")], suffix="gate_sigmoid")],
                      suffix="act")
            return add("Mul", [add("Add", [u, graph.const(np.float32(1))], suffix="up_plus_one"), act], suffix="gated")

        logits = linear(x, router, "router")                                         # [b, s, X]
        if bias:
            logits = add("Add", [logits, bias[0]], suffix="router_biased")
        if attrs["scoring"] == "softmax":
            scores = add("Softmax", [logits], {"axis": -1}, "scores")
        else:
            scores = add("Sigmoid", [logits], suffix="scores")
        top = graph.add_node("TopK", [scores], {"k": k, "axis": -1}, name=f"{node.name}.topk")
        weights, chosen = top                                                        # [b, s, k] each
        if attrs["normalize"]:
            total = add("ReduceSum", [weights], {"axes": [-1], "keepdims": 1}, "top_sum")
            weights = add("Div", [weights, total], suffix="top_normalized")
        # routing matrix: one-hot rows of the chosen experts, weighted and summed over the k slots
        experts = graph.const(np.arange(n_experts, dtype=np.int64), name=f"{node.name}.expert_ids")
        hot = add("Equal", [add("Unsqueeze", [chosen], {"axes": [-1]}, "chosen_col"), experts], suffix="one_hot")
        hot = add("Cast", [hot], {"to": "float32"}, "one_hot_f")                      # [b, s, k, X]
        spread = add("Mul", [hot, add("Unsqueeze", [weights], {"axes": [-1]}, "weights_col")], suffix="spread")
        route = add("ReduceSum", [spread], {"axes": [2], "keepdims": 0}, "route")     # [b, s, X]
        # every expert on every token: [b, 1, s, E] x [X, E, F] -> [b, X, s, F]
        xe = add("Unsqueeze", [x], {"axes": [1]}, "x_experts")
        g, u = linear(xe, gate, "gate", (0, 2, 1)), linear(xe, up, "up", (0, 2, 1))   # [b, X, s, F]
        if bias:
            g = add("Add", [g, per_expert(bias[1], "gate_bias")], suffix="gate_biased")
            u = add("Add", [u, per_expert(bias[2], "up_bias")], suffix="up_biased")
        y = linear(glu(g, u), down, "down", (0, 2, 1))                               # [b, X, s, E]
        if bias:
            y = add("Add", [y, per_expert(bias[3], "down_bias")], suffix="down_biased")
        route = add("Unsqueeze", [add("Transpose", [route], {"perm": [0, 2, 1]}, "route_t")], {"axes": [-1]},
                    "route_col")                                                     # [b, X, s, 1]
        out = add("ReduceSum", [add("Mul", [y, route], suffix="weighted")], {"axes": [1], "keepdims": 0}, "sum")
        if shared_in:
            sg, su, sd, sr = shared_in
            shared = linear(add("Mul", [silu(linear(x, sg, "shared_gate"), "shared_act"),
                                        linear(x, su, "shared_up")], suffix="shared_gated"), sd, "shared_down")
            shared = add("Mul", [shared, add("Sigmoid", [linear(x, sr, "shared_router")], suffix="shared_score")],
                         suffix="shared_weighted")
            out = add("Add", [out, shared], suffix="with_shared")
        return [out]
    return decompose_op(graph, "MoE", expand)
