"""Lowering kiln's IR to a TVM Relax module: one readable function per op.

The module has two entry points over the same weights, ``prefill`` (any number of new tokens)
and ``decode`` (one new token per row, so the matmuls compile as GEMVs):

    fn(input_ids int64 [batch, seq], lengths int32 [batch], logits_positions int64 [batch, n],
       caches (k.0, v.0, k.1, ...: [batch, kv_heads, capacity, head_dim], float32 or float16),
       params (the weights, in the manifest's order)[, past: Shape([past])])
       -> logits float32 [batch, n, vocab]

``lengths`` holds each row's cached tokens before the call; the new keys and values are
written into the caches in place, right after them. ``logits_positions`` picks the positions
whose logits are computed, so a prefill pays for the LM head on its last token only.

Positions come from one of two places (``KVMode``):

* ``rows``: each row's own length. The rotary tables are precomputed for every position (as
  the ONNX Runtime lowering does for its shared cache, :mod:`kiln.targets.kv_plan`), so
  rows of different lengths run together. Used wherever positions reach nothing but rotations
  and attention masks.
* ``uniform``: the graph computes positions itself from the cache length (learned position
  embeddings, longrope); every row then has the same length, passed as the shape ``past``.

Primitive ops become Relax operators (legalized to TIR by TVM's pipeline); the fused ops get
kernels of their own: RMSNorm and SkipRMSNorm and Rotary as TE computations, attention and the
cache update as TIR (:mod:`.attention`), quantized matmuls and embedding lookups over their
blocks (:mod:`.quant_kernels`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax, te, tirx as tir, topi

from kiln.ir import Graph, Node, Value

from . import attention as attn_kernels
from .attention_blocked import attention_prefill_cpu
from .weight_plan import Plan, plan_graph


ENTRY_POINTS = ("prefill", "decode")


class Sym:
    """An integer tensor known as symbolic expressions (a shape, an index computed from one):
    shape arithmetic stays in Relax's shape language instead of becoming tensors."""

    def __init__(self, values, scalar: bool = False):
        self.values = list(values)
        self.scalar = scalar

    def tensor(self) -> relax.Expr:
        t = relax.op.shape_to_tensor(relax.ShapeExpr(self.values))
        return relax.op.reshape(t, []) if self.scalar else t


@dataclass
class Target:
    """What the lowering needs to know of the device."""
    tvm: dict               # the TVM target dict
    gpu: bool
    exact: bool = True      # False: quantized matmuls may use int8 activations (--precision fast)
    kv_dtype: str = "float32"   # the KV cache's element type (float16 halves its memory traffic)


class FunctionLowering:
    """Lowers the graph once, into one entry point of the module."""

    def __init__(self, bb: relax.BlockBuilder, graph: Graph, plan: Plan, target: Target, decode: bool,
                 kernels: dict, layers: int, head_input: Value | None):
        self.bb, self.graph, self.plan, self.target = bb, graph, plan, target
        self.batch = tir.Var("batch", "int64")
        self.seq = tir.IntImm("int64", 1) if decode else tir.Var("seq", "int64")
        self.past = tir.Var("past", "int64")
        self.n_logits = tir.Var("n_logits", "int64")
        self.kernels = kernels
        self.layers = layers
        self.head_input = head_input
        self.env: dict = {}            # id(Value) -> Relax expression or Sym; also shared rows
        self._param_vars: dict[int, relax.Expr] = {}
        self._positions = None
        from . import gated_silu
        # silu(g)·u patterns lowered as one kernel (CPU; GPUs keep TVM's own elementwise ops)
        self.gated = {} if target.gpu else gated_silu.match(graph)

    # ---- values ---------------------------------------------------------------------------
    def dim(self, d):
        if isinstance(d, int):
            return tir.IntImm("int64", d)
        return {"batch": self.batch, "seq": self.seq, "past": self.past}.get(d)

    def tensor(self, v: Value) -> relax.Expr:
        x = self.env.get(id(v))
        if x is None and v.const is not None:
            x = self.env[id(v)] = relax.const(np.asarray(v.const), str(np.asarray(v.const).dtype))
        if x is None and v.is_weight:
            x = self.env[id(v)] = self.param(v.name)
        if isinstance(x, Sym):
            x = self.env[id(v)] = self.bb.emit(x.tensor())
        if x is None:
            raise ValueError(f"the TVM lowering has no value for {v.name}")
        return x

    def sym(self, v: Value) -> Sym | None:
        """v as symbolic integers, when it is a small constant or a shape computation."""
        x = self.env.get(id(v))
        if isinstance(x, Sym):
            return x
        if v.const is not None:
            arr = np.asarray(v.const)
            if arr.dtype.kind in "iu" and arr.ndim <= 1 and arr.size <= 8:
                return Sym([tir.IntImm("int64", int(a)) for a in arr.reshape(-1)], scalar=arr.ndim == 0)
        return None

    def param(self, key: str, part: int = 0) -> relax.Expr:
        index = self.plan.index[key][part]
        if index not in self._param_vars:
            # read through the runtime's tuple_getitem with the weight's type declared rather
            # than from a typed tuple argument: the VM then does not check every weight's dtype
            # and shape on every call (~1,000 of its ~6,100 instructions per SmolLM2 decode
            # step); each kernel still checks the buffers it is given, in compiled code
            p = self.plan.params[index]
            ty = relax.TensorType(list(p.array.shape), str(p.array.dtype))
            self._param_vars[index] = self.bb.emit(relax.op.call_pure_packed(
                "vm.builtin.tuple_getitem", self.params, relax.prim_value(tir.IntImm("int64", index)), ty_args=ty))
        return self._param_vars[index]

    def params_of(self, key: str) -> list:
        return [self.param(key, i) for i in range(len(self.plan.index[key]))]

    # ---- the function ---------------------------------------------------------------------
    def build(self, name: str) -> None:
        bb, graph = self.bb, self.graph
        ids = relax.Var("input_ids", relax.TensorType([self.batch, self.seq], "int64"))
        self.lengths = relax.Var("lengths", relax.TensorType([self.batch], "int32"))
        self.logits_positions = relax.Var("logits_positions", relax.TensorType([self.batch, self.n_logits], "int64"))
        cap = tir.Var("capacity", "int64")
        kv_heads, head_dim = cache_shape(graph)
        cache_type = relax.TensorType([self.batch, kv_heads, cap, head_dim], self.target.kv_dtype)
        self.caches = relax.Var("caches", relax.TupleType([cache_type] * (2 * self.layers)))
        args = [ids, self.lengths, self.logits_positions, self.caches, self._params_var()]
        if self.plan.mode == "uniform":
            args.append(relax.Var("past", relax.ShapeType([self.past])))
        with bb.function(name, args):
            with bb.dataflow():
                self.env[id(graph.inputs[0])] = ids
                for v in graph.inputs[1:]:
                    if not v.name.startswith(("past_key.", "past_value.")):
                        raise ValueError(f"the TVM lowering does not know the graph input {v.name}")
                self._lower_nodes([graph.outputs[0]])
                logits = bb.emit_output(self.tensor(graph.outputs[0]))
            bb.emit_func_output(logits)

    def build_plain(self, name: str) -> None:
        """A function of the graph's own inputs returning all its outputs (no KV cache): for
        graphs without attention, such as the one-op graphs of the op tests."""
        bb, graph = self.bb, self.graph
        inputs = [relax.Var(v.name, relax.TensorType([self.dim(d) if d is not None else tir.Var(f"{v.name}_{i}", "int64")
                                                      for i, d in enumerate(v.type.shape)], v.type.dtype))
                  for v in graph.inputs]
        with bb.function(name, inputs + [self._params_var()]):
            with bb.dataflow():
                for v, var in zip(graph.inputs, inputs):
                    self.env[id(v)] = var
                self._lower_nodes(graph.outputs)
                out = bb.emit_output(relax.Tuple([self.tensor(v) for v in graph.outputs]))
            bb.emit_func_output(out)

    def _params_var(self):
        self.params = relax.Var("params", relax.ObjectType())
        return self.params

    def _lower_nodes(self, outputs: list) -> None:
        needed = self._needed(outputs)
        for node in self.graph.nodes:
            if id(node) in needed:
                self.lower(node)

    def _needed(self, outputs: list) -> set:
        """The nodes the outputs depend on (an attention's cache outputs are written in place)."""
        need = {id(v) for v in outputs}
        nodes = set()
        for n in reversed(self.graph.nodes):
            if any(id(o) in need for o in n.outputs):
                nodes.add(id(n))
                ins = n.inputs[:3] + n.inputs[5:] if n.op == "Attention" else n.inputs
                if id(n) in self.gated:
                    found = self.gated[id(n)]
                    ins = [found.fused] if found.fused is not None else [found.g, found.u]
                if id(n) in self.plan.rotations:
                    ins = n.inputs[:1]
                need.update(id(x) for x in ins if x is not None)
        return nodes

    def lower(self, node: Node) -> None:
        fn = getattr(self, f"op_{node.op}", None)
        if fn is None:
            raise ValueError(f"{node.name}: the TVM backend has no lowering for {node.op}")
        outs = fn(node)
        if not isinstance(outs, (list, tuple)):
            outs = [outs]
        for v, x in zip(node.outputs, outs):
            if x is not None:
                self.env[id(v)] = x if isinstance(x, Sym) else self.bb.emit(x)
        if self.head_input is not None and node.outputs and node.outputs[0] is self.head_input:
            self.env[id(self.head_input)] = self.bb.emit_te(_rows_at, self.tensor(self.head_input),
                                                            self.logits_positions, primfunc_name_hint="logits_rows")

    # ---- elementwise ----------------------------------------------------------------------
    def _binary(self, node, relax_op, sym_op=None):
        a, b = node.inputs
        sa, sb = self.sym(a), self.sym(b)
        if sym_op is not None and sa is not None and sb is not None and isinstance(self.env.get(id(a)) or self.env.get(id(b)), Sym):
            n = max(len(sa.values), len(sb.values))
            va = sa.values * n if len(sa.values) == 1 else sa.values
            vb = sb.values * n if len(sb.values) == 1 else sb.values
            return Sym([sym_op(x, y) for x, y in zip(va, vb)], scalar=sa.scalar and sb.scalar)
        return relax_op(self.tensor(a), self.tensor(b))

    def op_Add(self, n): return self._binary(n, relax.op.add, lambda x, y: x + y)
    def op_Sub(self, n): return self._binary(n, relax.op.subtract, lambda x, y: x - y)
    def op_Mul(self, n):
        if id(n) in self.gated:
            from . import gated_silu
            return gated_silu.emit(self.bb, self.gated[id(n)], self.tensor)
        return self._binary(n, relax.op.multiply, lambda x, y: x * y)
    def op_Div(self, n): return self._binary(n, relax.op.divide, tir.floordiv)
    def op_Pow(self, n):
        # a small whole exponent as products: pow() of a negative base is a trap in C
        e = n.inputs[1].const
        if e is not None and np.asarray(e).size == 1 and float(np.asarray(e)) in (2.0, 3.0):
            x = self.tensor(n.inputs[0])
            sq = self.bb.emit(relax.op.multiply(x, x))
            return sq if float(np.asarray(e)) == 2.0 else relax.op.multiply(sq, x)
        return self._binary(n, relax.op.power)
    def op_Max(self, n): return self._binary(n, relax.op.maximum, tir.max)
    def op_Min(self, n): return self._binary(n, relax.op.minimum, tir.min)
    def op_Equal(self, n): return self._binary(n, relax.op.equal)
    def op_Greater(self, n): return self._binary(n, relax.op.greater)
    def op_GreaterOrEqual(self, n): return self._binary(n, relax.op.greater_equal)
    def op_Less(self, n): return self._binary(n, relax.op.less)
    def op_LessOrEqual(self, n): return self._binary(n, relax.op.less_equal)
    def op_And(self, n): return self._binary(n, relax.op.logical_and)
    def op_Or(self, n): return self._binary(n, relax.op.logical_or)

    def _unary(self, node, relax_op):
        return relax_op(self.tensor(node.inputs[0]))

    def op_Neg(self, n): return self._unary(n, relax.op.negative)
    def op_Abs(self, n): return self._unary(n, relax.op.abs)
    def op_Sqrt(self, n): return self._unary(n, relax.op.sqrt)
    def op_Exp(self, n): return self._unary(n, relax.op.exp)
    def op_Log(self, n): return self._unary(n, relax.op.log)
    def op_Tanh(self, n): return self._unary(n, relax.op.tanh)
    def op_Sigmoid(self, n): return self._unary(n, relax.op.sigmoid)
    def op_Cos(self, n): return self._unary(n, relax.op.cos)
    def op_Sin(self, n): return self._unary(n, relax.op.sin)
    def op_Erf(self, n): return self._unary(n, relax.op.erf)
    def op_Not(self, n): return self._unary(n, relax.op.logical_not)
    def op_Relu(self, n): return relax.op.maximum(self.tensor(n.inputs[0]), relax.const(0, n.inputs[0].type.dtype))
    def op_Reciprocal(self, n): return relax.op.divide(relax.const(1, n.inputs[0].type.dtype), self.tensor(n.inputs[0]))

    def op_Where(self, n):
        c, a, b = (self.tensor(x) for x in n.inputs)
        return relax.op.where(c, a, b)

    def op_Cast(self, n):
        s = self.sym(n.inputs[0])
        if isinstance(self.env.get(id(n.inputs[0])), Sym) and n.attrs["to"] in ("int64", "int32"):
            return s
        return relax.op.astype(self.tensor(n.inputs[0]), n.attrs["to"])

    # ---- reductions and products ----------------------------------------------------------
    def op_MatMul(self, n):
        a, b = n.inputs
        w = self._float_weight(b.producer.inputs[0]) if b.producer is not None and b.producer.op == "Transpose" else None
        if w is not None:
            rows, cols = w.weight.shape
            return self.kernels["float"].matmul(self.bb, self.tensor(a), self.params_of(w.name), w.weight.format.name,
                                                rows, cols, self.target.tvm, exact=self.target.exact)
        return relax.op.matmul(self.tensor(a), self.tensor(b))

    def linear(self, x: relax.Expr, w: Value) -> relax.Expr:
        """x @ wᵀ for a [n, k] weight, through the GEMV kernels where the plan packed it for them."""
        if w.is_weight and w.name in self.plan.index:
            fmt = self.plan.formats.get(w.name)
            n, k = w.weight.shape
            if fmt in self.kernels["float"].SUPPORTED:
                return self.kernels["float"].matmul(self.bb, x, self.params_of(w.name), fmt, n, k, self.target.tvm,
                                                    exact=self.target.exact)
            if fmt in self.kernels["quant"].SUPPORTED and w.weight.format.is_block:
                return self.kernels["quant"].matmul(self.bb, x, self.params_of(w.name), fmt, n, k, self.target.tvm,
                                                    exact=self.target.exact)
        return relax.op.matmul(x, relax.op.permute_dims(self.tensor(w), [1, 0]))

    def _float_weight(self, v: Value) -> Value | None:
        """v, when it is a weight stored for the float kernels."""
        if v.is_weight and self.plan.formats.get(v.name) in self.kernels["float"].SUPPORTED and v.name in self.plan.index:
            return v
        return None

    def op_TopK(self, n):
        both = self.bb.emit(relax.op.topk(self.tensor(n.inputs[0]), k=int(n.attrs["k"]), axis=n.attrs["axis"],
                                          ret_type="both", largest=True, dtype="int64"))
        return [relax.TupleGetItem(both, 0), relax.TupleGetItem(both, 1)]

    def op_MoE(self, n):
        from . import moe
        return moe.lower(self, n)

    def op_Softmax(self, n):
        return relax.op.nn.softmax(self.tensor(n.inputs[0]), axis=n.attrs["axis"])

    def _reduce(self, n, relax_op):
        return relax_op(self.tensor(n.inputs[0]), axis=list(n.attrs["axes"]), keepdims=bool(n.attrs["keepdims"]))

    def op_ReduceMean(self, n): return self._reduce(n, relax.op.mean)
    def op_ReduceSum(self, n): return self._reduce(n, relax.op.sum)
    def op_ReduceMax(self, n): return self._reduce(n, relax.op.max)

    # ---- shapes ---------------------------------------------------------------------------
    def shape_of(self, v: Value) -> list:
        sinfo = self.tensor(v).ty
        return list(sinfo.shape.values)

    def op_Shape(self, n):
        x = n.inputs[0]
        if x.name.startswith(("past_key.", "past_value.")):
            kv_heads, head_dim = cache_shape(self.graph)
            return Sym([self.batch, tir.IntImm("int64", kv_heads), self.past, tir.IntImm("int64", head_dim)])
        return Sym(self.shape_of(x))

    def op_Reshape(self, n):
        x, shape = n.inputs
        src = self.shape_of(x)
        target = self.sym(shape).values
        out = []
        for i, d in enumerate(target):
            if isinstance(d, tir.IntImm) and d.value == 0:
                out.append(src[i])
            else:
                out.append(d)
        for i, d in enumerate(out):
            if isinstance(d, tir.IntImm) and d.value == -1:
                known = self.dim_list(n.outputs[0])
                out[i] = known[i] if known[i] is not None else _infer_minus_one(src, out, i)
        return relax.op.reshape(self.tensor(x), out)

    def dim_list(self, v: Value) -> list:
        return [self.dim(d) for d in v.type.shape]

    def op_Transpose(self, n):
        x = n.inputs[0]
        if x.is_weight and self._float_weight(x) is not None:
            return None
        if x.is_weight:
            return self.param(f"{x.name}.T")
        return relax.op.permute_dims(self.tensor(x), list(n.attrs["perm"]))

    def op_Unsqueeze(self, n):
        s = self.sym(n.inputs[0])
        if isinstance(self.env.get(id(n.inputs[0])), Sym) and s.scalar and list(n.attrs["axes"]) == [0]:
            return Sym(s.values)
        x = self.tensor(n.inputs[0])
        for a in sorted(n.attrs["axes"]):
            x = self.bb.emit(relax.op.expand_dims(x, a))
        return x

    def op_Squeeze(self, n):
        return relax.op.squeeze(self.tensor(n.inputs[0]), list(n.attrs["axes"]))

    def op_Concat(self, n):
        syms = [self.sym(x) for x in n.inputs]
        if all(s is not None for s in syms) and any(isinstance(self.env.get(id(x)), Sym) for x in n.inputs):
            return Sym([d for s in syms for d in s.values])
        return relax.op.concat([self.tensor(x) for x in n.inputs], axis=n.attrs["axis"])

    def op_Gather(self, n):
        table, idx = n.inputs
        axis = n.attrs.get("axis", 0)
        s, si = self.sym(table), self.sym(idx)
        if isinstance(self.env.get(id(table)), Sym) and si is not None and si.scalar:
            return Sym([s.values[int(si.values[0])]], scalar=True)
        if table.is_weight and self._float_weight(table) is not None and axis == 0:
            w = table.weight
            return self.kernels["float"].gather(self.bb, self.tensor(idx), self.params_of(table.name),
                                                w.format.name, w.shape[0], w.shape[1], self.target.tvm)
        if table.is_weight and table.name in self.plan.formats and self.plan.formats[table.name] in self.kernels["quant"].SUPPORTED:
            w = table.weight
            return self.kernels["quant"].gather(self.bb, self.tensor(idx), self.params_of(table.name),
                                                w.format.name, w.shape[0], w.shape[1], self.target.tvm)
        return relax.op.take(self.tensor(table), self.tensor(idx), axis=axis, mode="clip")

    def op_Slice(self, n):
        x = self.tensor(n.inputs[0])
        shape = self.shape_of(n.inputs[0])
        axes = [a % len(shape) for a in n.attrs["axes"]]
        steps = n.attrs.get("steps") or [1] * len(axes)
        begin, end = [], []
        for a, b, e, st in zip(axes, n.attrs["starts"], n.attrs["ends"], steps):
            dim = shape[a]
            begin.append(_clamp_index(b, dim, st))
            end.append(_clamp_index(e, dim, st))
        return relax.op.strided_slice(x, axes, begin, end, steps)

    def op_Split(self, n):
        x = self.tensor(n.inputs[0])
        cuts = list(np.cumsum(n.attrs["split"])[:-1])
        parts = self.bb.emit(relax.op.split(x, [int(c) for c in cuts], axis=n.attrs["axis"]))
        return [relax.TupleGetItem(parts, i) for i in range(len(n.outputs))]

    def op_Expand(self, n):
        x, shape = n.inputs
        return relax.op.broadcast_to(self.tensor(x), self.dim_list(n.outputs[0]))

    def op_Range(self, n):
        start, limit, delta = (self.sym(x) for x in n.inputs)
        if start is None or limit is None or delta is None:
            raise ValueError(f"{n.name}: Range of computed tensors is not supported by the TVM backend")
        return relax.op.arange(start.values[0], limit.values[0], delta.values[0], n.outputs[0].type.dtype)

    # ---- fused ops ------------------------------------------------------------------------
    def op_RMSNorm(self, n):
        x, w = n.inputs
        return self.bb.emit_te(_rms_norm, self.tensor(x), self._norm_weight(n, w), n.attrs["epsilon"],
                               primfunc_name_hint="rms_norm")

    def op_SkipRMSNorm(self, n):
        a, b, w = n.inputs
        out = self.bb.emit_te(_skip_rms_norm, self.tensor(a), self.tensor(b), self._norm_weight(n, w),
                              n.attrs["epsilon"], primfunc_name_hint="skip_rms_norm")
        return [relax.TupleGetItem(out, 0), relax.TupleGetItem(out, 1)]

    def _norm_weight(self, n, w):
        offset = n.attrs.get("offset", 0.0)
        return self.param(f"{w.name}.plus_{offset:g}") if offset else self.tensor(w)

    def op_Rotary(self, n):
        x, cos, sin = n.inputs
        if id(n) in self.plan.rotations:
            c, s = (self.table_rows(name) for name in self.plan.rotations[id(n)])
        else:
            c, s = self.tensor(cos), self.tensor(sin)
        return self.bb.emit_te(_rotary, self.tensor(x), c, s, primfunc_name_hint="rotary")

    def table_rows(self, name: str):
        """A rotary table's rows at each new token's position, [batch, seq, d/2]; gathered once
        per function and shared by every layer's q and k."""
        key = f"rows.{name}"
        if key not in self.env:
            table = self.param(f"rope.{name}")
            self.env[key] = self.bb.emit(relax.op.take(table, self.positions(), axis=0, mode="clip"))
        return self.env[key]

    def positions(self):
        """Each new token's absolute position, int64 [batch, seq]: its row's length onward."""
        if self._positions is None:
            ids = self.tensor(self.graph.inputs[0])
            self._positions = self.bb.emit_te(_positions, self.lengths, ids, primfunc_name_hint="positions")
        return self._positions

    def op_Attention(self, n):
        q, k, v, pk, pv = n.inputs[:5]
        layer = int(pk.name.rsplit(".", 1)[1])
        heads, head_dim = q.type.shape[1], q.type.shape[3]
        kv_heads = k.type.shape[1]
        kc = self.bb.emit(relax.TupleGetItem(self.caches, 2 * layer))
        vc = self.bb.emit(relax.TupleGetItem(self.caches, 2 * layer + 1))
        append = self.kernel("kv_append", kv_heads, head_dim)
        caches = self.bb.emit(relax.call_tir_inplace(
            append, [kc, vc, self.tensor(k), self.tensor(v), self.lengths], [0, 1],
            [kc.ty, vc.ty]))
        kc2 = self.bb.emit(relax.TupleGetItem(caches, 0))
        vc2 = self.bb.emit(relax.TupleGetItem(caches, 1))
        # the decode function's one new token a row keeps the per-query kernel; a prefill's
        # blocks of queries take the blocked one (CPU)
        decode = isinstance(self.seq, tir.IntImm)
        kind = "attention" if self.target.gpu or decode else "attention_prefill"
        sinks = len(n.inputs) == 6
        att = self.kernel(kind, heads, kv_heads, head_dim, n.attrs["scale"], n.attrs["window"],
                          n.attrs.get("softcap") or 0.0, sinks)
        # a model without sinks passes zeros the kernel does not read
        sink = self.tensor(n.inputs[5]) if sinks else relax.const(np.zeros(heads, np.float32))
        out_type = relax.TensorType([self.batch, self.shape_of(q)[2], tir.IntImm("int64", heads * head_dim)], "float32")
        return [relax.call_tir(att, [self.tensor(q), kc2, vc2, self.lengths, sink], out_type), None, None]

    def kernel(self, kind: str, *args):
        key = (kind, *args)
        if key not in self.kernels:
            make = {"kv_append": attn_kernels.kv_append, "attention": attn_kernels.attention,
                    "attention_prefill": _attention_prefill}[kind]
            self.kernels[key] = self.bb.add_func(make(*args, gpu=self.target.gpu, cache_dtype=self.target.kv_dtype), kind)
        return self.kernels[key]

    def op_QuantMatMul(self, n):
        x, w = n.inputs
        fmt = self.plan.formats.get(w.name)
        if fmt in self.kernels["quant"].SUPPORTED:
            rows, cols = w.weight.shape
            return self.kernels["quant"].matmul(self.bb, self.tensor(x), self.params_of(w.name), fmt, rows, cols,
                                                self.target.tvm, exact=self.target.exact)
        return relax.op.matmul(self.tensor(x), self.param(f"{w.name}.T"))


def _attention_prefill(*args, gpu: bool, cache_dtype: str):
    assert not gpu, "the blocked prefill attention is a CPU schedule"
    return attention_prefill_cpu(*args, cache_dtype=cache_dtype)


# ---- TE computations of the fused ops -------------------------------------------------------

def _rms_norm(x: te.Tensor, w: te.Tensor, eps: float):
    k = x.shape[-1]
    r = te.reduce_axis((0, k), name="k")
    sq = te.compute(x.shape[:-1], lambda *i: te.sum(x[(*i, r)] * x[(*i, r)], axis=r), name="sum_sq")
    inv = te.compute(x.shape[:-1], lambda *i: tir.const(1.0, "float32") / tir.sqrt(
        sq[i] / tir.Cast("float32", k) + tir.const(eps, "float32")), name="inv_rms")
    return te.compute(x.shape, lambda *i: x[i] * inv[i[:-1]] * w[i[-1]], name="rms_norm")


def _skip_rms_norm(a: te.Tensor, b: te.Tensor, w: te.Tensor, eps: float):
    total = te.compute(a.shape, lambda *i: a[i] + b[i], name="residual")
    return _rms_norm(total, w, eps), total


def _rotary(x: te.Tensor, cos: te.Tensor, sin: te.Tensor):
    """x [b, h, s, d]; cos/sin [s, d/2] (shared by rows) or [b, s, d/2] (per row)."""
    half = x.shape[-1] // 2
    per_row = len(cos.shape) == 3

    def table(t, b, s, j):
        return t[b, s, j] if per_row else t[s, j]

    def f(b, h, s, d):
        j = tir.if_then_else(d < half, d, d - half)
        rotated = tir.if_then_else(d < half, -x[b, h, s, d + half], x[b, h, s, d - half])
        return x[b, h, s, d] * table(cos, b, s, j) + rotated * table(sin, b, s, j)
    return te.compute(x.shape, f, name="rotary")


def _positions(lengths: te.Tensor, ids: te.Tensor):
    return te.compute(ids.shape, lambda b, i: tir.Cast("int64", lengths[b]) + i, name="positions")


def _rows_at(x: te.Tensor, positions: te.Tensor):
    """x [b, s, h] at positions [b, n] -> [b, n, h]."""
    return te.compute((x.shape[0], positions.shape[1], x.shape[2]),
                      lambda b, i, j: x[b, positions[b, i], j], name="rows")


def cache_shape(graph: Graph) -> tuple[int, int]:
    """(kv_heads, head_dim) of the cache, read off the first cache input [b, KV, past, D]."""
    past = next(v for v in graph.inputs if v.name.startswith("past_key."))
    return int(past.type.shape[1]), int(past.type.shape[3])


def _clamp_index(i: int, dim, step: int):
    """An ONNX Slice bound as a Relax one: negative counts from the end, huge means the end."""
    if isinstance(dim, tir.IntImm):
        n = dim.value
        if i < 0:
            i += n
        return max(0, min(i, n)) if step > 0 else max(-1, min(i, n - 1))
    if i >= 1 << 30:
        return dim
    if i < 0:
        return dim + i
    return tir.min(tir.IntImm("int64", i), dim)


def _infer_minus_one(src: list, out: list, i: int):
    total = 1
    for d in src:
        total = total * d
    rest = 1
    for j, d in enumerate(out):
        if j != i:
            rest = rest * d
    return tir.floordiv(total, rest)


def lower_plain(graph: Graph, target: Target):
    """(IRModule with ``main(*graph inputs, params) -> (outputs...)``, Plan) for a graph
    without a KV cache."""
    from . import float_kernels, quant_kernels
    plan = plan_graph(graph, None, quant_kernels.SUPPORTED, expert_blocks=not target.gpu)
    bb = relax.BlockBuilder()
    kernels = {"quant": quant_kernels, "float": float_kernels}
    FunctionLowering(bb, graph, plan, target, False, kernels, 0, None).build_plain("main")
    return bb.get(), plan


def lower(graph: Graph, target: Target, max_length: int | None):
    """(IRModule with prefill and decode, Plan) for the graph after kiln's passes."""
    from kiln.targets.lm_head import lm_head_input

    from . import float_kernels, quant_kernels
    attentions = [n for n in graph.nodes if n.op == "Attention"]
    if not attentions or "kv_cache" not in graph.meta:
        raise ValueError("the TVM backend needs the fused attention with a KV cache")
    plan = plan_graph(graph, max_length, quant_kernels.SUPPORTED, expert_blocks=not target.gpu)
    head_input = lm_head_input(graph)
    bb = relax.BlockBuilder()
    kernels: dict = {"quant": quant_kernels, "float": float_kernels}
    for name in ENTRY_POINTS:
        FunctionLowering(bb, graph, plan, target, name == "decode", kernels, len(attentions), head_input).build(name)
    return bb.get(), plan
