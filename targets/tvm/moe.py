"""The MoE op on TVM: routing in Relax ops, then a kernel that reads only the chosen experts.

The decomposition (``kiln.passes.moe``) runs every expert on every token; here each token's
k chosen experts are indexed inside the kernel (``w[chosen[t, j], f, r]``), so a decode step
reads k experts' weights per layer, not all of them: its cost follows the active parameters.
Expert weights are stored as float32 ``[experts, out, in]`` (blocks dequantized when the
artifact is built: quantized experts are not kept as blocks yet), and the kernel is TVM's
default schedule of the TE computation, not a tuned one.
"""
from __future__ import annotations

from tvm import relax, te, tirx as tir


def _experts(x: te.Tensor, chosen: te.Tensor, weights: te.Tensor, gate: te.Tensor, up: te.Tensor,
             down: te.Tensor):
    """x [n, E], chosen [n, k] int64, weights [n, k] -> [n, E]: Σ_j weights[t, j] · down_e(silu(gate_e x) ⊙ up_e x)
    for e = chosen[t, j]."""
    n, hidden = x.shape
    k = chosen.shape[1]
    inner = gate.shape[1]
    r = te.reduce_axis((0, hidden), name="r")
    g = te.compute((n, k, inner), lambda t, j, f: te.sum(x[t, r] * gate[chosen[t, j], f, r], axis=r), name="moe_gate")
    r2 = te.reduce_axis((0, hidden), name="r2")
    u = te.compute((n, k, inner), lambda t, j, f: te.sum(x[t, r2] * up[chosen[t, j], f, r2], axis=r2), name="moe_up")
    one = tir.const(1.0, "float32")
    h = te.compute((n, k, inner), lambda t, j, f: g[t, j, f] / (one + te.exp(-g[t, j, f])) * u[t, j, f],
                   name="moe_act")
    rf = te.reduce_axis((0, inner), name="rf")
    y = te.compute((n, k, hidden), lambda t, j, e: te.sum(h[t, j, rf] * down[chosen[t, j], e, rf], axis=rf),
                   name="moe_down")
    rj = te.reduce_axis((0, k), name="rj")
    return te.compute((n, hidden), lambda t, e: te.sum(y[t, rj, e] * weights[t, rj], axis=rj), name="moe_sum")


def lower(low, node) -> relax.Expr:
    """``low``: the FunctionLowering (its block builder, values and parameters)."""
    bb = low.bb
    x = low.tensor(node.inputs[0])
    router, gate, up, down = (low.tensor(v) for v in node.inputs[1:5])
    hidden = int(node.inputs[0].type.shape[-1])
    attrs = node.attrs
    flat = bb.emit(relax.op.reshape(x, [-1, hidden]))
    logits = bb.emit(relax.op.matmul(flat, relax.op.permute_dims(router, [1, 0])))
    if attrs.get("scoring", "softmax") == "softmax":
        scores = bb.emit(relax.op.nn.softmax(logits, axis=-1))
    else:
        scores = bb.emit(relax.op.sigmoid(logits))
    top = bb.emit(relax.op.topk(scores, k=int(attrs["top_k"]), axis=-1, ret_type="both", largest=True, dtype="int64"))
    weights, chosen = bb.emit(relax.TupleGetItem(top, 0)), bb.emit(relax.TupleGetItem(top, 1))
    if attrs.get("normalize"):
        weights = bb.emit(relax.op.divide(weights, relax.op.sum(weights, axis=[-1], keepdims=True)))
    out = bb.emit_te(_experts, flat, chosen, weights, gate, up, down, primfunc_name_hint="moe_experts")
    if len(node.inputs) == 9:
        sg, su, sd, sr = (low.tensor(v) for v in node.inputs[5:])

        def linear(a, w):
            return bb.emit(relax.op.matmul(a, relax.op.permute_dims(w, [1, 0])))
        g = linear(flat, sg)
        act = bb.emit(relax.op.multiply(relax.op.multiply(g, relax.op.sigmoid(g)), linear(flat, su)))
        shared = bb.emit(relax.op.multiply(linear(act, sd), relax.op.sigmoid(linear(flat, sr))))
        out = bb.emit(relax.op.add(out, shared))
    return relax.op.reshape(out, low.shape_of(node.inputs[0]))
