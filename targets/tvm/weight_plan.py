"""How the TVM lowering stores each weight: the Plan, decided before any function is written.

Block weights read by a fused kernel stay blocks (``quant_kernels.pack``), MoE experts stay
blocks or their own float type where the CPU kernels read them, float weights read only as
matmul operands, embedding tables or MoE router/shared matrices are tiled for
``float_kernels``, and everything else becomes an array of the graph's type (transposes and
norm offsets folded in). The KV mode (rows or uniform) comes from :mod:`kiln.targets.kv_plan`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kiln.ir import Graph, Value


@dataclass
class Param:
    name: str
    array: np.ndarray


@dataclass
class Plan:
    """What the lowering decided before it wrote any function."""
    mode: str                                           # rows | uniform
    max_length: int
    why_uniform: str = ""
    rotations: dict = field(default_factory=dict)       # id(Rotary) -> (cos name, sin name)
    params: list = field(default_factory=list)          # [Param]
    index: dict = field(default_factory=dict)           # key -> [param positions]
    formats: dict = field(default_factory=dict)         # weight name -> how it is stored

    def add(self, key: str, arrays: dict) -> None:
        if key in self.index:
            return
        self.index[key] = []
        for suffix, arr in arrays.items():
            self.index[key].append(len(self.params))
            self.params.append(Param(f"{key}{'.' + suffix if suffix else ''}", np.ascontiguousarray(arr)))


def plan_graph(graph: Graph, max_length: int | None, quant_formats: frozenset, *, expert_blocks: bool = True) -> Plan:
    """Decide the KV mode and how every weight is stored (blocks kept, transposes folded).
    ``expert_blocks``: MoE experts may stay blocks (the CPU has kernels for them, GPUs not yet)."""
    from kiln.targets import kv_plan
    shared, why = kv_plan.plan(graph, max_length, rotary_head_multiple=1)
    if shared is not None:
        plan = Plan("rows", shared.max_length, rotations=dict(shared.rotations))
        for (cos, sin), (c, s) in shared.tables.items():
            plan.add(f"rope.{cos}", {"": c})
            plan.add(f"rope.{sin}", {"": s})
    else:
        plan = Plan("uniform", int(max_length or kv_plan.MAX_TABLE_POSITIONS), why_uniform=why)
    from . import float_kernels, quant_kernels
    from . import moe
    blocked = moe.blocked_experts(graph, quant_formats) if expert_blocks else set()
    for v in graph.weights.values():
        w = v.weight
        if v.name in blocked:
            # an expert tensor kept in its GGUF blocks: [experts·out, in] as one block weight
            plan.add(v.name, moe.pack_blocks(w))
            plan.formats[v.name] = w.format.name
            continue
        if moe.stored_as_is(v):
            # an expert tensor in its own float type (bf16 stays 2 bytes), widened in the kernel
            plan.add(v.name, {"": moe.storage(w)})
            plan.formats[v.name] = w.format.name
            continue
        if _float_kernel_weight(v, float_kernels.SUPPORTED):
            # kept in its own type (bf16 stays 2 bytes), tiled for float_kernels
            plan.add(v.name, float_kernels.pack(w))
            plan.formats[v.name] = w.format.name
            continue
        for u in v.uses:
            node = u.node
            blocks = w.format.is_block and w.format.name in quant_formats and len(w.shape) == 2
            if blocks and ((node.op == "QuantMatMul" and u.index == 1)
                           or (node.op == "Gather" and u.index == 0 and node.attrs.get("axis", 0) == 0)
                           or (node.op == "MoE" and u.index in moe.linear_inputs(node))):
                plan.add(v.name, quant_kernels.pack(w))
                plan.formats[v.name] = w.format.name
            elif node.op == "QuantMatMul":
                # a block type without a fused kernel: a float32 copy, transposed for MatMul
                plan.add(f"{v.name}.T", {"": w.numpy().astype(np.float32).T})
                plan.formats[v.name] = "f32 (dequantized)"
            elif node.op == "Transpose" and u.index == 0:
                plan.add(f"{v.name}.T", {"": np.transpose(w.numpy().astype(v.type.dtype), node.attrs["perm"])})
                plan.formats.setdefault(v.name, "f32")
            elif node.op in ("RMSNorm", "SkipRMSNorm") and node.attrs.get("offset"):
                plan.add(f"{v.name}.plus_{node.attrs['offset']:g}",
                         {"": w.numpy().astype(np.float32) + np.float32(node.attrs["offset"])})
            else:
                plan.add(v.name, {"": w.numpy().astype(v.type.dtype)})
                plan.formats.setdefault(v.name, v.type.dtype)
    return plan


def _float_kernel_weight(v: Value, formats: frozenset) -> bool:
    """Whether a float weight (f32, f16, bf16) is read only as the right operand of MatMuls
    through ``Transpose(perm=[1, 0])``, as the table of a row Gather (an embedding, tied or
    not) or as an MoE router or shared-expert matrix: then one packed copy in its own type
    serves every use."""
    from . import moe
    w = v.weight
    if w.format.name not in formats or len(w.shape) != 2 or not v.uses:
        return False
    for u in v.uses:
        node = u.node
        if not ((node.op == "Transpose" and u.index == 0 and list(node.attrs["perm"]) == [1, 0]
                 and all(t.node.op == "MatMul" and t.index == 1 for t in node.outputs[0].uses))
                or (node.op == "Gather" and u.index == 0 and node.attrs.get("axis", 0) == 0)
                or (node.op == "MoE" and u.index in moe.linear_inputs(node))):
            return False
    return True
