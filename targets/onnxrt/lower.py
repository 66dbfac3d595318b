"""Lowering to ONNX for ONNX Runtime: IR nodes -> ONNX nodes, weights -> external data.

Primitive ops map one to one onto standard ONNX ops (the IR follows ONNX semantics), with
attributes that ONNX takes as inputs (Slice bounds, Unsqueeze/ReduceMean axes) turned into
constant initializers. Weights stream into ``model.onnx.data`` one at a time, so the model is
never held in memory whole; ``Transpose`` of a weight is folded into the stored data.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper

from kiln.ir import Graph, Node, Value
from kiln.targets.lm_head import lm_head_input

OPSET = 23             # RMSNormalization is standard from opset 23
IR_VERSION = 11        # opset 23's IR version; onnxruntime 1.31 reads at most 13, onnx 1.23 writes 14 unless told
DATA_ALIGN = 64
PRECISIONS = ("exact", "fast")

_DTYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "int64": TensorProto.INT64,
           "int32": TensorProto.INT32, "bool": TensorProto.BOOL, "int8": TensorProto.INT8, "uint8": TensorProto.UINT8}

# ops whose IR attributes become ONNX inputs, in ONNX input order
_ATTRS_AS_INPUTS = {
    "Slice": ("starts", "ends", "axes", "steps"),
    "Split": ("split",),
    "Unsqueeze": ("axes",),
    "Squeeze": ("axes",),
    "ReduceMean": ("axes",),
    "ReduceSum": ("axes",),
    "ReduceMax": ("axes",),
    "TopK": ("k",),
}


def _value_info(v: Value):
    dims = [d if isinstance(d, int) else (d or None) for d in v.type.shape]
    return helper.make_tensor_value_info(v.name, _DTYPES[v.type.dtype], dims)


class _DataWriter:
    """Appends tensors to the external data file and returns initializers pointing into it."""

    def __init__(self, path: Path):
        self.path = path
        self.f = open(path, "wb")
        self.offset = 0

    def add(self, name: str, array: np.ndarray) -> TensorProto:
        array = np.ascontiguousarray(array)
        pad = (-self.offset) % DATA_ALIGN
        if pad:
            self.f.write(b"\0" * pad)
            self.offset += pad
        data = array.tobytes()
        self.f.write(data)
        t = TensorProto()
        t.name = name
        t.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        t.dims.extend(array.shape)
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.path.name), ("offset", str(self.offset)), ("length", str(len(data)))):
            e = t.external_data.add()
            e.key, e.value = k, v
        self.offset += len(data)
        return t

    def close(self):
        self.f.close()


def lower(graph: Graph, out_dir, *, model_name: str = "model.onnx",
          progress: Callable[[str], None] | None = None, kv_layout: str = "auto",
          max_length: int | None = None, precision: str = "exact") -> dict:
    """Write ``model.onnx`` + ``model.onnx.data`` into out_dir; returns a summary.

    ``kv_layout`` "shared" keeps the KV cache in one preallocated buffer that attention
    updates in place (see :mod:`kiln.targets.kv_plan`), "concat" grows it by concatenation
    in every step, "auto" takes the shared layout wherever it computes the same thing.
    The model also takes ``logits_positions`` [batch, n]: the positions whose logits it
    computes, so a prefill pays for the LM head on its last position only.
    ``precision`` "exact" keeps every product in float32; "fast" lets quantized matmuls use
    int8 activations (see :func:`_quant_matmul`).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    from kiln.targets import kv_plan
    out_dir = Path(out_dir)
    shared, why_not = (None, "asked for the growing layout") if kv_layout == "concat" \
        else kv_plan.plan(graph, max_length)
    if kv_layout == "shared" and shared is None:
        raise ValueError(f"the shared KV-cache layout does not fit this graph: {why_not}")
    head_input = lm_head_input(graph)
    data = _DataWriter(out_dir / f"{model_name}.data")
    initializers: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    folded: dict[int, str] = {}          # id(Transpose output) -> initializer name
    small_consts: dict[str, TensorProto] = {}
    block_sums: dict[str, str] = {}      # activation -> its per-block sums, shared by q/k/v, gate/up
    # rotary cos/sin [s, d/2] -> [batch, s, d/2], shared by layers; the batch size is read off
    # the token ids, so no layer's activations are kept alive just for their shape
    batched_tables: dict[str, str] = {"__batch_source__": graph.inputs[0].name}
    lengths: dict[str, str] = {}         # GroupQueryAttention's seqlens_k / total length, shared
    if shared is not None:
        lengths.update(total="total_sequence_length", seqlens_k="seqlens_k", shared=shared)

    def weight_init(v: Value, name: str, transform=None):
        arr = v.weight.numpy().astype(v.type.dtype, copy=False)
        if transform is not None:
            arr = transform(arr)
        if progress:
            progress(name)
        initializers.append(data.add(name, arr))

    def const_input(values, dtype=np.int64) -> str:
        arr = np.asarray(values, dtype=dtype)
        key = f"const.{arr.dtype}.{'_'.join(str(x) for x in arr.reshape(-1).tolist())}.{arr.ndim}"
        if key not in small_consts:
            small_consts[key] = helper.make_tensor(key, helper.np_dtype_to_tensor_dtype(arr.dtype), arr.shape, arr.reshape(-1).tolist())
        return key

    try:
        for v in graph.consts:
            if v.uses:
                arr = v.const
                initializers.append(onnx.numpy_helper.from_array(np.asarray(arr), v.name))
        for node in graph.nodes:
            if _gathers_blocks(node):
                nodes.append(_gather_blocks(node, data, initializers, progress))
                continue
            if node.op == "QuantMatMul":
                nodes.extend(_quant_matmul(node, data, initializers, const_input, progress, block_sums, precision))
                continue
            if node.op in ("RMSNorm", "SkipRMSNorm"):
                nodes.append(_rmsnorm(node, weight_init))
                continue
            if node.op == "Rotary":
                nodes.extend(_rotary(node, const_input, batched_tables))
                continue
            if node.op == "Attention":
                nodes.extend(_attention(node, const_input, lengths, batched_tables))
                continue
            # a transposed weight is stored transposed, so MatMul reads it directly
            if node.op == "Transpose" and node.inputs[0].is_weight:
                w = node.inputs[0]
                name = f"{w.name}.T"
                weight_init(w, name, lambda a, p=node.attrs["perm"]: np.transpose(a, p))
                folded[id(node.outputs[0])] = name
                continue
            nodes.append(_lower_node(node, folded, const_input))
        for name, v in graph.weights.items():
            if any(not _consumed_specially(u.node) for u in v.uses) or v in graph.outputs:
                weight_init(v, name)
        if shared is not None:
            for (cos, sin), (cos_table, sin_table) in shared.tables.items():
                initializers += [data.add(f"{cos}.cache", cos_table), data.add(f"{sin}.cache", sin_table)]
    finally:
        data.close()
    extra_inputs = []
    if head_input is not None:
        # every ONNX node reading the LM head's input belongs to the head: give it those rows only
        rows = f"{head_input.name}.rows"
        first = None
        for j, n in enumerate(nodes):
            for i, name in enumerate(n.input):
                if name == head_input.name:
                    n.input[i] = rows
                    first = j if first is None else first
        nodes[first:first] = [
            helper.make_node("Unsqueeze", ["logits_positions", const_input([-1])], ["logits_positions.nd"],
                             name="logits_positions.nd"),
            helper.make_node("GatherND", [head_input.name, "logits_positions.nd"], [rows], name=rows, batch_dims=1)]
        extra_inputs.append(helper.make_tensor_value_info("logits_positions", TensorProto.INT64, ["batch", "logits"]))
    if shared is not None:
        extra_inputs += [helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
                         helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [])]
    initializers.extend(small_consts.values())
    nodes = _live_nodes(nodes, [v.name for v in graph.outputs])
    used = {i for n in nodes for i in n.input}
    initializers = [t for t in initializers if t.name in used]
    g = helper.make_graph(nodes, graph.name, [_value_info(v) for v in graph.inputs] + extra_inputs,
                          [_value_info(v) for v in graph.outputs], initializer=initializers)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)],
                              producer_name="kiln")
    model.ir_version = IR_VERSION
    onnx.save(model, os.fspath(out_dir / model_name))
    onnx.checker.check_model(os.fspath(out_dir / model_name))
    return {"onnx_nodes": len(nodes), "initializers": len(initializers),
            "data_bytes": (out_dir / f"{model_name}.data").stat().st_size,
            "kv_layout": "shared" if shared is not None else "concat",
            **({"max_length": shared.max_length} if shared is not None else {"kv_layout_reason": why_not}),
            "logits_positions": "logits_positions" if head_input is not None else None}


def _live_nodes(nodes: list, outputs: list[str]) -> list:
    """The nodes the outputs depend on. Lowerings that read a value's source directly (a
    fused op taking the projection before its head split) leave the split unused, and ORT
    would still run it."""
    needed = set(outputs)
    keep = []
    for n in reversed(nodes):
        if any(o in needed for o in n.output):
            keep.append(n)
            needed.update(i for i in n.input if i)
    return keep[::-1]


def _consumed_specially(node: Node) -> bool:
    """Whether this use of a weight is served by an initializer of its own, not the plain one."""
    return node.op in ("Transpose", "QuantMatMul") or (node.op in ("RMSNorm", "SkipRMSNorm") and node.attrs.get("offset")) \
        or _gathers_blocks(node)


# block formats whose rows GatherBlockQuantized reads as they are: (bits, zero point)
_GATHER_BLOCKS = {"q8_0": 8, "q5_0": 8, "q4_0": 4}


def _gathers_blocks(node: Node) -> bool:
    """A row lookup (the token embedding) in a weight stored as blocks kiln can gather as they
    are, so the table is never dequantized: a Q8_0 embedding stays 1.06 bytes a value, not 4."""
    if node.op != "Gather" or node.attrs.get("axis", 0) != 0 or not node.inputs[0].is_weight:
        return False
    w = node.inputs[0].weight
    return w.format.name in _GATHER_BLOCKS and len(w.shape) == 2 and w.shape[1] % 32 == 0


def _gather_blocks(node: Node, data: _DataWriter, initializers: list, progress) -> onnx.NodeProto:
    """Gather from blocks -> com.microsoft GatherBlockQuantized over the same codes and scales
    MatMulNBits takes (exact: code − zero point, times the block's scale)."""
    from . import quant as Q
    table, ids = node.inputs
    n, k = table.weight.shape
    op = Q.operands(table.weight.format.name, table.weight.raw(), n, k)
    if progress:
        progress(table.name)
    base = f"{table.name}.gather"
    initializers.append(data.add(f"{base}.codes", Q.pack_codes(op.bits, op.codes).reshape(n, -1)))
    initializers.append(data.add(f"{base}.scales", op.scales))
    inputs = [f"{base}.codes", ids.name, f"{base}.scales"]
    zp = op.zero_points if op.zero_points is not None else (
        np.full(op.scales.shape, 128, np.uint8) if op.bits == 8 else None)
    if zp is not None:
        packed = Q.pack_zero_points(op.bits, zp)
        initializers.append(data.add(f"{base}.zero_points", packed.reshape(n, -1)))
        inputs.append(f"{base}.zero_points")
    return helper.make_node("GatherBlockQuantized", inputs, [node.outputs[0].name], name=node.name,
                            domain="com.microsoft", gather_axis=0, quantize_axis=1, block_size=Q.BLOCK,
                            bits=op.bits)


def _attention(node: Node, const_input, lengths: dict, batched: dict) -> list:
    """Attention -> com.microsoft GroupQueryAttention (causal, growing BNSH cache)."""
    q, k, v, past_k, past_v = node.inputs[:5]
    _, heads, _, dim = q.type.shape
    kv_heads = k.type.shape[1]
    out: list = []

    def heads_source(t):
        """The [b, s, n·d] value a Transpose([0, 2, 1, 3]) of [b, s, n, d] came from, or None."""
        if t is None or t.op != "Transpose" or t.attrs.get("perm") != [0, 2, 1, 3]:
            return None
        r = t.inputs[0].producer
        if r is not None and r.op == "Reshape" and r.inputs[1].const is not None \
                and list(r.inputs[1].const) == [0, 0, t.inputs[0].type.shape[2], dim]:
            return r.inputs[0].name
        return None

    shared = lengths.get("shared")
    rotary_tables = None

    def seq_first(x, n):
        """[b, n, s, d] -> [b, s, n·d]; a value that was just split into heads is used as it was,
        and a rotation of one is done on the unsplit value (RotaryEmbedding takes [b, s, n·d])."""
        nonlocal rotary_tables
        r = x.producer
        if shared is not None and r is not None and id(r) in shared.rotations:
            # the shared-cache attention rotates q and k itself, at each row's own positions
            rotary_tables = shared.rotations[id(r)]
            return heads_source(r.inputs[0].producer)
        if r is not None and r.op == "Rotary" and r.inputs[0].type.shape[-1] == dim:
            src = heads_source(r.inputs[0].producer)
            if src is not None:
                name = f"{node.name}.{x.name}.bsh"
                out.extend(_batched_tables(r, const_input, batched))
                out.append(helper.make_node("RotaryEmbedding", [src, batched[r.inputs[1].name], batched[r.inputs[2].name]],
                                            [name], name=name, interleaved=0, num_heads=n))
                return name
        src = heads_source(x.producer)
        if src is not None:
            return src
        name = f"{node.name}.{x.name}.bsh"
        out.extend([helper.make_node("Transpose", [x.name], [f"{name}.t"], name=f"{name}.t", perm=[0, 2, 1, 3]),
                    helper.make_node("Reshape", [f"{name}.t", const_input([0, 0, n * dim])], [name], name=name)])
        return name

    query, key, value = seq_first(q, heads), seq_first(k, kv_heads), seq_first(v, kv_heads)
    if "total" not in lengths:
        # the lengths every layer shares: total = cached + new, seqlens_k = total - 1 per row
        t = "attention.total_length"
        out += [
            helper.make_node("Shape", [past_k.name], [f"{t}.past"], name=f"{t}.past", start=2, end=3),
            helper.make_node("Shape", [query], [f"{t}.new"], name=f"{t}.new", start=1, end=2),
            helper.make_node("Shape", [query], [f"{t}.batch"], name=f"{t}.batch", start=0, end=1),
            helper.make_node("Add", [f"{t}.past", f"{t}.new"], [f"{t}.i64"], name=f"{t}.i64"),
            helper.make_node("Sub", [f"{t}.i64", const_input([1])], [f"{t}.last"], name=f"{t}.last"),
            helper.make_node("Expand", [f"{t}.last", f"{t}.batch"], [f"{t}.last_rows"], name=f"{t}.last_rows"),
            helper.make_node("Cast", [f"{t}.last_rows"], [f"{t}.seqlens_k"], name=f"{t}.seqlens_k", to=TensorProto.INT32),
            helper.make_node("Squeeze", [f"{t}.i64", const_input([0])], [f"{t}.scalar"], name=f"{t}.scalar"),
            helper.make_node("Cast", [f"{t}.scalar"], [t], name=t, to=TensorProto.INT32),
        ]
        lengths["total"], lengths["seqlens_k"] = t, f"{t}.seqlens_k"
    packed = _packed_qkv(q, k, v, dim) if rotary_tables is not None else None
    if packed is not None:
        # q, k and v are consecutive parts of one merged projection: the kernel reads it packed,
        # and the Split and its copies disappear
        query, key, value = packed, "", ""
    window = node.attrs.get("window") or 0
    inputs = [query, key, value, past_k.name, past_v.name, lengths["seqlens_k"], lengths["total"]]
    rotary = {}
    if rotary_tables is not None:
        inputs += [f"{rotary_tables[0]}.cache", f"{rotary_tables[1]}.cache"]
        rotary = {"do_rotary": 1, "rotary_interleaved": 0}
    if len(node.inputs) == 6:
        # gpt-oss's sinks: GQA's head_sink (input 11), e^sink added to each head's denominator
        inputs += [""] * (11 - len(inputs)) + [node.inputs[5].name]
    out.append(helper.make_node(
        "GroupQueryAttention", inputs,
        [o.name for o in node.outputs], name=node.name, domain="com.microsoft",
        num_heads=heads, kv_num_heads=kv_heads, scale=node.attrs["scale"],
        local_window_size=window if window else -1, **rotary,
        **({"softcap": float(node.attrs["softcap"])} if node.attrs.get("softcap") else {})))
    return out


def _packed_qkv(q: Value, k: Value, v: Value, dim: int) -> str | None:
    """The merged [b, s, (H + 2·KV)·d] projection q, k and v were split from (q and k through the
    rotation the attention applies itself), when nothing else reads the parts."""
    def part(x: Value, rotated: bool) -> Value | None:
        if rotated:
            x = x.producer.inputs[0]
        t = x.producer
        if t is None or t.op != "Transpose" or len(x.uses) != 1:
            return None
        r = t.inputs[0].producer
        if r is None or r.op != "Reshape" or len(t.inputs[0].uses) != 1:
            return None
        src = r.inputs[0]
        return src if len(src.uses) == 1 else None

    parts = [part(q, True), part(k, True), part(v, False)]
    if any(p is None for p in parts):
        return None
    split = parts[0].producer
    if split is None or split.op != "Split" or list(split.outputs) != parts:
        return None
    widths = [q.type.shape[1] * dim, k.type.shape[1] * dim, v.type.shape[1] * dim]
    if split.attrs["axis"] not in (-1, 2) or list(split.attrs["split"]) != widths:
        return None
    return split.inputs[0].name


def _rotary(node: Node, const_input, batched: dict) -> list:
    """Rotary -> RotaryEmbedding (opset 23), whose tables are per batch row: [batch, s, d/2]."""
    x, cos, sin = node.inputs
    out = _batched_tables(node, const_input, batched)
    out.append(helper.make_node("RotaryEmbedding", [x.name, batched[cos.name], batched[sin.name]],
                                [node.outputs[0].name], name=node.name, interleaved=0))
    return out


def _batched_tables(node: Node, const_input, batched: dict) -> list:
    """The nodes making a Rotary's cos/sin [s, d/2] into [batch, s, d/2], once per table."""
    _, cos, sin = node.inputs
    out = []
    for table in (cos, sin):
        if table.name not in batched:
            name = batched[table.name] = f"{table.name}.batched"
            batch = f"{name}.batch"
            out += [
                helper.make_node("Shape", [batched["__batch_source__"]], [f"{batch}.shape"], name=f"{batch}.shape",
                                 start=0, end=1),
                helper.make_node("Concat", [f"{batch}.shape", const_input([1, 1])], [batch], name=batch, axis=0),
                helper.make_node("Unsqueeze", [table.name, const_input([0])], [f"{name}.one"], name=f"{name}.one"),
                helper.make_node("Expand", [f"{name}.one", batch], [name], name=name),
            ]
    return out


def _rmsnorm(node: Node, weight_init) -> onnx.NodeProto:
    """RMSNorm -> ONNX RMSNormalization; SkipRMSNorm -> com.microsoft SkipSimplifiedLayerNormalization."""
    *xs, w = node.inputs
    scale = w.name
    offset = node.attrs.get("offset", 0.0)
    if offset:
        scale = f"{w.name}.plus_{offset:g}"
        weight_init(w, scale, lambda a: a + np.float32(offset))
    if node.op == "SkipRMSNorm":
        y, total = (o.name for o in node.outputs)
        return helper.make_node("SkipSimplifiedLayerNormalization", [xs[0].name, xs[1].name, scale], [y, "", "", total],
                                name=node.name, domain="com.microsoft", epsilon=node.attrs["epsilon"])
    return helper.make_node("RMSNormalization", [xs[0].name, scale], [node.outputs[0].name], name=node.name,
                            axis=-1, epsilon=node.attrs["epsilon"], stash_type=1)


def _quant_matmul(node: Node, data: _DataWriter, initializers: list, const_input, progress,
                  block_sums: dict, precision: str = "exact") -> list:
    """QuantMatMul -> MatMulNBits over the weight's own blocks (+ the block-min correction).

    ``exact`` multiplies in float32 (accuracy level 0), 8-bit blocks as two exact 4-bit planes
    since the 8-bit kernel is slow at that level; ``fast`` lets the kernel quantize the
    activations to int8 per block (accuracy level 4), as llama.cpp does for its dot products,
    runs 8-bit blocks as they are, and folds a 4-bit format's block minimum into 8-bit zero
    points (``quant.min_into_zero_points``) instead of a second product."""
    from . import quant as Q
    x, w = node.inputs
    n, k = w.weight.shape
    y = node.outputs[0].name
    op = Q.operands(w.weight.format.name, w.weight.raw(), n, k)
    if precision == "fast" and op.mins is not None and op.bits == 4:
        # the fast mode approximates anyway: fold the min into 8-bit zero points (1/32 of a step)
        # and drop the min-term product, a quarter of a decode step's kernel time
        op = Q.min_into_zero_points(op)
    if progress:
        progress(w.name)
    base = w.name
    out = []

    def nbits(operands, suffix, result):
        initializers.append(data.add(f"{base}{suffix}.nbits", Q.pack_codes(operands.bits, operands.codes)))
        initializers.append(data.add(f"{base}{suffix}.scales", operands.scales.reshape(-1)))
        inputs = [x.name, f"{base}{suffix}.nbits", f"{base}{suffix}.scales"]
        if operands.zero_points is not None:
            initializers.append(data.add(f"{base}{suffix}.zero_points",
                                         Q.pack_zero_points(operands.bits, operands.zero_points)))
            inputs.append(f"{base}{suffix}.zero_points")
        out.append(helper.make_node("MatMulNBits", inputs, [result], name=f"{node.name}{suffix}", domain="com.microsoft",
                                    K=k, N=n, bits=operands.bits, block_size=operands.block,
                                    accuracy_level=4 if precision == "fast" else 0))
    partial = y if op.mins is None else f"{y}.nbits"
    if op.bits == 8 and precision == "exact":
        high, low = Q.as_two_4bit_planes(op)
        nbits(high, ".high", f"{y}.high")
        nbits(low, ".low", f"{y}.low")
        out.append(helper.make_node("Add", [f"{y}.high", f"{y}.low"], [partial], name=f"{node.name}.planes"))
    else:
        nbits(op, "", partial)
    if op.mins is not None:
        # sum_k x_k (d q_k + m) = MatMulNBits(zero point 0) + (block sums of x) @ mins^T
        initializers.append(data.add(f"{base}.mins_t", np.ascontiguousarray(op.mins.T)))
        if x.name not in block_sums:
            sums = block_sums[x.name] = f"{x.name}.block_sums"
            out += [
                helper.make_node("Reshape", [x.name, const_input([0] * (x.type.rank - 1) + [k // Q.BLOCK, Q.BLOCK])],
                                 [f"{sums}.blocks"], name=f"{sums}.blocks"),
                helper.make_node("ReduceSum", [f"{sums}.blocks", const_input([-1])], [sums], name=sums, keepdims=0),
            ]
        out += [
            helper.make_node("MatMul", [block_sums[x.name], f"{base}.mins_t"], [f"{y}.mins"], name=f"{node.name}.mins"),
            helper.make_node("Add", [f"{y}.nbits", f"{y}.mins"], [y], name=f"{node.name}.add_mins"),
        ]
    return out


def _lower_node(node: Node, folded: dict, const_input) -> onnx.NodeProto:
    inputs = ["" if x is None else folded.get(id(x), x.name) for x in node.inputs]
    attrs = dict(node.attrs)
    if node.op == "TopK":
        attrs["k"] = [attrs["k"]]          # ONNX takes k as a 1-D tensor
    if node.op in _ATTRS_AS_INPUTS:
        for key in _ATTRS_AS_INPUTS[node.op]:
            val = attrs.pop(key, None)
            if val is not None:
                inputs.append(const_input(val))
    if node.op == "Cast":
        attrs["to"] = _DTYPES[attrs["to"]]
    if node.op in ("ReduceMean", "ReduceSum", "ReduceMax"):
        attrs["keepdims"] = int(attrs.get("keepdims", 1))
    return helper.make_node(node.op, inputs, [o.name for o in node.outputs], name=node.name, **attrs)
