"""What an ONNX export stores and how it is called: the weights' element type, and optimum's
decoder I/O layout on top of the lowering's own names.

The two are separate from the lowering (targets/onnxrt), which serves compiled artifacts: an
artifact keeps float32 weights and its ``logits_positions`` input, an export is a file other
tools open.
"""
from __future__ import annotations

import os
import re

import onnx

from kiln.ir import Graph, TensorType

_FORMAT = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
_KV = re.compile(r"(past|present)_(key|value)\.(\d+)$")
# the lowering's symbolic dimensions -> optimum's names for them
_DIMS = {"batch": "batch_size", "seq": "sequence_length", "past": "past_sequence_length",
         "total": "total_sequence_length"}


def store_weights_as(graph: Graph, dtype: str) -> None:
    """Store every matrix (rank >= 2) once, as ``dtype``: the lowering writes each weight in its
    value's type, and a Cast to float32 right where it is read keeps every product float32.

    A row lookup casts the rows it took (the table stays half size in memory), a transposed
    weight casts after the Transpose (which the lowering folds into the stored data), any
    other use casts the weight itself. A table that is both looked up and transposed (tied
    embeddings) is cast before its Transpose, which the lowering then leaves in the graph:
    stored twice, SmolLM2's would add 57 MB to its 269 MB in f16. Block-quantized weights are
    dequantized here: an export holds plain floats, which every ONNX runtime reads."""
    for name, v in list(graph.weights.items()):
        if v.type.rank < 2:
            continue          # norms and biases: small, and kept exact
        v.weight = v.weight.astype(_FORMAT[dtype])
        v.type = TensorType(dtype, v.type.shape)
        ops = {u.node.op for u in v.uses}
        tied = "Transpose" in ops and len(ops) > 1
        for use in list(v.uses):
            node = use.node
            if dtype != "float32" and ((node.op == "Transpose" and not tied) or (node.op == "Gather" and use.index == 0)):
                out = node.outputs[0]
                out.type = TensorType(dtype, out.type.shape)
                cast = graph.add_node("Cast", [out], {"to": "float32"}, name=f"{out.name}.float32")[0]
                graph.replace_all_uses_with(out, cast, except_node=cast.producer)
            elif dtype != "float32" or (tied and node.op == "Transpose"):
                cast = graph.add_node("Cast", [v], {"to": "float32"}, name=f"{name}.float32")[0]
                graph.set_input(node, use.index, cast)
    graph.toposort()


def optimum_name(name: str, logits: str) -> str:
    """kiln's input/output name -> optimum's (``past_key.3`` -> ``past_key_values.3.key``)."""
    if name == logits:
        return "logits"
    m = _KV.match(name)
    if m is None:
        return name
    kind, kv, i = m.groups()
    return f"past_key_values.{i}.{kv}" if kind == "past" else f"present.{i}.{kv}"


def to_optimum(path, graph: Graph, *, logits_positions: str | None) -> dict:
    """Rewrite the lowered model.onnx at ``path`` in place into optimum's decoder layout and
    return its I/O description for kiln_io.json.

    Renamed: the cache inputs and outputs and the logits. Moved after ``input_ids``:
    ``attention_mask`` [batch, total] and ``position_ids`` [batch, seq], which the graph reads
    (kiln.passes.padded_batch) as optimum's do, so a left-padded batch runs. Removed:
    ``logits_positions``, so the model returns every position's logits, as optimum's do."""
    path = os.fspath(path)
    model = onnx.load(path, load_external_data=False)
    g = model.graph
    logits = graph.outputs[0].name
    names = {v.name: optimum_name(v.name, logits) for v in [*graph.inputs, *graph.outputs]}
    if logits_positions:
        _drop_logits_positions(g, logits_positions)
    for n in g.node:
        for i, x in enumerate(n.input):
            if x in names:
                n.input[i] = names[x]
        for i, x in enumerate(n.output):
            if x in names:
                n.output[i] = names[x]
    for v in [*g.input, *g.output]:
        v.name = names.get(v.name, v.name)
        for d in v.type.tensor_type.shape.dim:
            if d.dim_param:
                d.dim_param = _DIMS.get(d.dim_param, d.dim_param)
    order = {"input_ids": 0, "attention_mask": 1, "position_ids": 2}
    inputs = sorted(g.input, key=lambda v: order.get(v.name, len(order)))      # stable: the caches keep theirs
    del g.input[:]
    g.input.extend(inputs)
    onnx.save(model, path)
    onnx.checker.check_model(path)

    def describe(vs):
        return {v.name: {"dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                         "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]} for v in vs}
    io = {"inputs": describe(g.input), "outputs": describe(g.output),
          "kv_cache": {"layout": "concat", "past": "past_key_values.N.key / past_key_values.N.value",
                       "present": "present.N.key / present.N.value"}}
    io["inputs"]["attention_mask"]["meaning"] = "1 for a real token, 0 for padding (past and new tokens)"
    io["inputs"]["position_ids"]["meaning"] = "each new token's position (rotary or learned embeddings)"
    return io


def _drop_logits_positions(g, name: str) -> None:
    """Undo the lowering's row selection before the LM head: its GatherND reads the head's
    input at ``name``'s positions; every reader of the rows reads the whole input instead."""
    nodes = list(g.node)
    selects = [n.output[0] for n in nodes if name in n.input]     # the positions' Unsqueeze
    rows = {n.output[0]: n.input[0] for n in nodes if n.op_type == "GatherND" and n.input[1] in selects}
    kept = [n for n in nodes if name not in n.input and n.output[0] not in rows]
    for n in kept:
        for i, x in enumerate(n.input):
            n.input[i] = rows.get(x, x)
    kept = [onnx.NodeProto.FromString(n.SerializeToString()) for n in kept]
    del g.node[:]
    g.node.extend(kept)
    inputs = [v for v in g.input if v.name != name]
    del g.input[:]
    g.input.extend(inputs)
    used = {x for n in g.node for x in n.input}
    inits = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(inits)
