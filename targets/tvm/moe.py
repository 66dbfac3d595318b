"""The MoE op on TVM: routing in Relax ops, then a kernel that reads only the chosen experts.

The decomposition (``kiln.passes.moe``) runs every expert on every token; here each token's
k chosen experts are indexed inside the kernel (``w[chosen[t, j], f, r]``), so a decode step
reads k experts' weights per layer, not all of them: its cost follows the active parameters.
Expert weights are stored ``[experts, out, in]`` in their own float type (f32, f16, or bf16 as
its uint16 bits, widened exactly in the kernels, as ``float_kernels`` does); block-quantized
experts are read as blocks by the CPU kernels where ``blocked_experts`` allows (gate and up of
one block type), else dequantized to float32 when the artifact is built. Each token's chosen
experts are its own dot products, in prefill too (no GEMM over the tokens sharing an expert).

On the CPU the experts run as two hand-written kernels: ``moe_up`` computes
silu(gate_e·x) ⊙ up_e·x for every (token, chosen slot, output row), one parallel item each, a
dot product over contiguous rows in 16-lane vectors; ``moe_down`` computes each output feature
of a token, one parallel item each, summing its k experts' rows of ``down`` weighted by the
routing. A decode step thus spreads k·F dot products over the cores. GPU targets take the TE
computation below (the same arithmetic, TVM's schedule). gpt-oss's variant (``glu``): its
router bias is added to the logits in Relax, ``moe_up`` adds the gate and up biases and
applies the clamped SwiGLU, and the chosen experts' down biases, weighted by the routing, are
added in Relax after ``moe_down``.
"""
from __future__ import annotations

import functools

from tvm import relax, te, tirx as tir

from .kernel_common import dims, is_gpu

LANES = 16
_STORAGE = {"f32": "float32", "f16": "float16", "bf16": "uint16"}     # as float_kernels stores them


def stored_as_is(v) -> bool:
    """Whether weight ``v`` is an expert tensor (MoE inputs 2-4) in a plain float type, read
    only by MoE ops: the artifact then keeps its stored bits and the kernels widen them."""
    return (v.weight.format.name in _STORAGE and len(v.weight.shape) == 3 and bool(v.uses)
            and all(u.node.op == "MoE" and u.index in (2, 3, 4) for u in v.uses))


def storage(w):
    """The expert tensor's stored bits as an array of its storage type."""
    return w.raw().view(_STORAGE[w.format.name]).reshape(w.shape)


def blocked_experts(graph, quant_formats) -> set:
    """Expert tensors the CPU kernels read as blocks: gate and up of one block type (and down
    on its own) whose rows are whole tiles of 16 and whole chunks of k; the rest are float."""
    from .quant_layout import CHUNK
    out = set()
    for node in graph.nodes:
        if node.op != "MoE":
            continue
        gate, up, down = node.inputs[2:5]

        def fits(v):
            w = v.weight if v.is_weight else None
            return (w is not None and w.format.is_block and w.format.name in quant_formats and len(w.shape) == 3
                    and w.shape[1] % LANES == 0 and w.shape[2] % CHUNK == 0
                    and all(u.node.op == "MoE" and u.index in (2, 3, 4) for u in v.uses))
        if fits(gate) and fits(up) and gate.weight.format is up.weight.format:
            out |= {gate.name, up.name}
        if fits(down):
            out.add(down.name)
    return out


def pack_blocks(w) -> dict:
    """quant_layout's arrays for the [experts, out, in] block weight viewed as [experts·out, in]."""
    from .quant_layout import pack
    return pack(w.reshape((w.shape[0] * w.shape[1], w.shape[2])))


def _widen(fmt: str, value):
    from .float_kernels import _widen as widen
    return widen(fmt, value)


def _glu(g, u, clamp, exp):
    """silu(g)·u, or with ``clamp`` = (alpha, limit) gpt-oss's (clip(u, ±limit) + 1)·g'·sigmoid(alpha·g'),
    g' = min(g, limit); ``exp`` the exponential of the caller's IR."""
    one, zero = tir.const(1.0, "float32"), tir.const(0.0, "float32")
    if clamp is None:
        return g / (one + exp(zero - g)) * u
    alpha, limit = (tir.const(float(c), "float32") for c in clamp)
    g = tir.min(g, limit)
    return (tir.max(tir.min(u, limit), zero - limit) + one) * (g / (one + exp(zero - g * alpha)))


def _experts(x: te.Tensor, chosen: te.Tensor, weights: te.Tensor, gate: te.Tensor, up: te.Tensor,
             down: te.Tensor, fmt: str = "f32", clamp=None, gate_bias=None, up_bias=None):
    """x [n, E], chosen [n, k] int64, weights [n, k] -> [n, E]: Σ_j weights[t, j] · down_e(glu(gate_e x, up_e x))
    for e = chosen[t, j] (gate and up plus their biases [X, F] when given)."""
    n, hidden = x.shape
    k = chosen.shape[1]
    inner = gate.shape[1]
    r = te.reduce_axis((0, hidden), name="r")
    g = te.compute((n, k, inner), lambda t, j, f: te.sum(x[t, r] * _widen(fmt, gate[chosen[t, j], f, r]), axis=r), name="moe_gate")
    r2 = te.reduce_axis((0, hidden), name="r2")
    u = te.compute((n, k, inner), lambda t, j, f: te.sum(x[t, r2] * _widen(fmt, up[chosen[t, j], f, r2]), axis=r2), name="moe_up")

    def biased(a, b, t, j, f):
        return a[t, j, f] + b[chosen[t, j], f] if b is not None else a[t, j, f]
    h = te.compute((n, k, inner), lambda t, j, f: _glu(biased(g, gate_bias, t, j, f), biased(u, up_bias, t, j, f),
                                                        clamp, te.exp), name="moe_act")
    rf = te.reduce_axis((0, inner), name="rf")
    y = te.compute((n, k, hidden), lambda t, j, e: te.sum(h[t, j, rf] * _widen(fmt, down[chosen[t, j], e, rf]), axis=rf),
                   name="moe_down")
    rj = te.reduce_axis((0, k), name="rj")
    return te.compute((n, hidden), lambda t, e: te.sum(y[t, rj, e] * weights[t, rj], axis=rj), name="moe_sum")


def _dot(T, acc, a, b, length: int, zero):
    """Σ a(r)·b(r) for r < length, in LANES accumulators (then summed pairwise), plus the tail."""
    with T.vectorized(0, LANES) as lane:
        T.buffer_store(acc, zero, [lane])
    if length >= LANES:
        with T.serial(0, length // LANES) as c:
            with T.vectorized(0, LANES) as lane:
                T.buffer_store(acc, acc[lane] + a(c * LANES + lane) * b(c * LANES + lane), [lane])
    for r in range(length - length % LANES, length):
        T.buffer_store(acc, acc[0] + a(r) * b(r), [0])
    parts = [acc[i] for i in range(LANES)]
    while len(parts) > 1:
        parts = [parts[i] + parts[i + 1] for i in range(0, len(parts), 2)]
    return parts[0]


def up_name(fmt: str, experts: int, inner: int, hidden: int, k: int, glu) -> str:
    """``glu``: None (silu(gate)·up) or (alpha, limit), gpt-oss's clamped SwiGLU with biases."""
    return f"moe_up_{fmt}_{experts}x{inner}x{hidden}_k{k}" + ("_oai" if glu else "")


def _up_args(T, fmt: str, experts: int, inner: int, hidden: int, k: int, weight, glu=None):
    """A moe_up kernel's name, attributes and arguments, in order: (n, x, chosen, gate, up,
    biases, h), biases (gate's and up's [X, F]) only with gpt-oss's ``glu``, else None;
    ``weight(name)`` declares gate's and up's (their own float type, or blocks)."""
    T.func_name(up_name(fmt, experts, inner, hidden, k, glu))
    T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
    n = T.int64()
    x = T.arg("x", T.buffer((n, hidden), "float32"))
    chosen = T.arg("chosen", T.buffer((n, k), "int64"))
    gate = weight("gate")
    up = weight("up")
    biases = None
    if glu:
        biases = tuple(T.arg(f"{name}_bias", T.buffer((experts, inner), "float32")) for name in ("gate", "up"))
    return n, x, chosen, gate, up, biases, T.arg("h", T.buffer((n, k, inner), "float32"))


def _down_args(T, fmt: str, experts: int, hidden: int, inner: int, k: int, weight):
    """A moe_down kernel's name, attributes and arguments, in order: (n, h, chosen, weights,
    down, out); ``weight(name)`` declares down's."""
    T.func_name(f"moe_down_{fmt}_{experts}x{hidden}x{inner}_k{k}")
    T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
    n = T.int64()
    h = T.arg("h", T.buffer((n, k, inner), "float32"))
    chosen = T.arg("chosen", T.buffer((n, k), "int64"))
    weights = T.arg("weights", T.buffer((n, k), "float32"))
    down = weight("down")
    return n, h, chosen, weights, down, T.arg("out", T.buffer((n, hidden), "float32"))


def _biased(value, biases, which: int, e, f):
    """``value`` plus gpt-oss's gate (0) or up (1) bias of expert e, row f; as it is without biases."""
    return value + biases[which][e, f] if biases else value


@functools.lru_cache(maxsize=None)
def _cpu_up_func(experts: int, inner: int, hidden: int, k: int, fmt: str, glu=None):
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T
    zero = tir.const(0, "float32")
    with IRBuilder() as ib:
        with T.prim_func(private=True):
            n, x, chosen, gate, up, biases, h = _up_args(
                T, fmt, experts, inner, hidden, k,
                lambda name: T.arg(name, T.buffer((experts, inner, hidden), _STORAGE[fmt])), glu)
            with T.parallel(0, n * (k * inner)) as i:
                t, j, f = i // (k * inner), (i // inner) % k, i % inner
                e = T.max(T.min(chosen[t, j], experts - 1), 0)
                acc = T.alloc_buffer((LANES,), "float32")
                res = T.alloc_buffer((2,), "float32")
                T.buffer_store(res, _biased(_dot(T, acc, lambda r: x[t, r], lambda r: _widen(fmt, gate[e, f, r]), hidden,
                                                 zero), biases, 0, e, f), [0])
                T.buffer_store(res, _biased(_dot(T, acc, lambda r: x[t, r], lambda r: _widen(fmt, up[e, f, r]), hidden,
                                                 zero), biases, 1, e, f), [1])
                T.buffer_store(h, _glu(res[0], res[1], glu, tir.exp), [t, j, f])
    return ib.get()


@functools.lru_cache(maxsize=None)
def _cpu_down_func(experts: int, hidden: int, inner: int, k: int, fmt: str):
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T
    zero = tir.const(0, "float32")
    with IRBuilder() as ib:
        with T.prim_func(private=True):
            n, h, chosen, weights, down, out = _down_args(
                T, fmt, experts, hidden, inner, k,
                lambda name: T.arg(name, T.buffer((experts, hidden, inner), _STORAGE[fmt])))
            with T.parallel(0, n * hidden) as i:
                t, o = i // hidden, i % hidden
                acc = T.alloc_buffer((LANES,), "float32")
                total = T.alloc_buffer((1,), "float32")
                T.buffer_store(total, zero, [0])
                for j in range(k):
                    e = T.max(T.min(chosen[t, j], experts - 1), 0)
                    d = _dot(T, acc, lambda r: h[t, j, r], lambda r: _widen(fmt, down[e, o, r]), inner, zero)
                    T.buffer_store(total, total[0] + weights[t, j] * d, [0])
                T.buffer_store(out, total[0], [t, o])
    return ib.get()


def _block_weights(T, fmt: str, rows: int, k: int, name: str):
    """The kernel arguments and quant_layout reader of a [rows, k] block weight."""
    from .quant_layout import _FORMATS, _Weights, _array_dtypes, _array_names, _array_shapes
    spec = _FORMATS[fmt]
    bufs = [T.arg(f"{name}_{a}", T.buffer(s, d)) for a, s, d in
            zip(_array_names(spec), _array_shapes(spec, rows, k), _array_dtypes(spec))]
    return _Weights(spec, bufs)


@functools.lru_cache(maxsize=None)
def _cpu_up_blocks_func(experts: int, inner: int, hidden: int, k: int, fmt: str, glu=None):
    """moe_up over block weights: per (token, slot, 16-row tile of the chosen expert) a vector
    of 16 rows, dequantized as quant_kernels does."""
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    from .quant_layout import CHUNK
    zero = tir.const(0, "float32")
    tiles = inner // LANES
    with IRBuilder() as ib:
        with T.prim_func(private=True):
            n, x, chosen, gate, up, biases, h = _up_args(
                T, fmt, experts, inner, hidden, k, lambda name: _block_weights(T, fmt, experts * inner, hidden, name),
                glu)
            with T.parallel(0, n * (k * tiles)) as i:
                t, j, ft = i // (k * tiles), (i // tiles) % k, i % tiles
                e = T.max(T.min(chosen[t, j], experts - 1), 0)
                tile = e * tiles + ft
                ag = T.alloc_buffer((LANES,), "float32")
                au = T.alloc_buffer((LANES,), "float32")
                with T.vectorized(0, LANES) as lane:
                    T.buffer_store(ag, zero, [lane])
                    T.buffer_store(au, zero, [lane])
                with T.serial(0, hidden // CHUNK) as c:
                    for kk in range(CHUNK):
                        with T.vectorized(0, LANES) as lane:
                            xv = x[t, c * CHUNK + kk]
                            T.buffer_store(ag, ag[lane] + xv * gate.value(tile, c, CHUNK, kk, lane), [lane])
                            T.buffer_store(au, au[lane] + xv * up.value(tile, c, CHUNK, kk, lane), [lane])
                with T.vectorized(0, LANES) as lane:
                    f = ft * LANES + lane
                    T.buffer_store(h, _glu(_biased(ag[lane], biases, 0, e, f), _biased(au[lane], biases, 1, e, f),
                                           glu, tir.exp), [t, j, f])
    return ib.get()


@functools.lru_cache(maxsize=None)
def _cpu_down_blocks_func(experts: int, hidden: int, inner: int, k: int, fmt: str):
    """moe_down over block weights: per (token, 16 output features) the k chosen experts' tiles."""
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    from .quant_layout import CHUNK
    zero = tir.const(0, "float32")
    tiles = hidden // LANES
    with IRBuilder() as ib:
        with T.prim_func(private=True):
            n, h, chosen, weights, down, out = _down_args(
                T, fmt, experts, hidden, inner, k, lambda name: _block_weights(T, fmt, experts * hidden, inner, name))
            with T.parallel(0, n * tiles) as i:
                t, ot = i // tiles, i % tiles
                acc = T.alloc_buffer((LANES,), "float32")
                total = T.alloc_buffer((LANES,), "float32")
                with T.vectorized(0, LANES) as lane:
                    T.buffer_store(total, zero, [lane])
                for j in range(k):
                    tile = T.max(T.min(chosen[t, j], experts - 1), 0) * tiles + ot
                    with T.vectorized(0, LANES) as lane:
                        T.buffer_store(acc, zero, [lane])
                    with T.serial(0, inner // CHUNK) as c:
                        for kk in range(CHUNK):
                            with T.vectorized(0, LANES) as lane:
                                T.buffer_store(acc, acc[lane] + h[t, j, c * CHUNK + kk]
                                               * down.value(tile, c, CHUNK, kk, lane), [lane])
                    with T.vectorized(0, LANES) as lane:
                        T.buffer_store(total, total[lane] + weights[t, j] * acc[lane], [lane])
                with T.vectorized(0, LANES) as lane:
                    T.buffer_store(out, total[lane], [t, ot * LANES + lane])
    return ib.get()


def _cpu_experts(bb, flat, chosen, weights, gate, up, down, shape, fmt, glu=None, biases=()):
    """``glu`` and ``biases`` (gate's and up's): gpt-oss's clamped SwiGLU, else silu and none."""
    experts, inner, hidden, k = shape
    n = dims(flat, "the MoE kernels")[0]
    i64 = functools.partial(tir.IntImm, "int64")
    fmt_gu, fmt_d = fmt
    make = _cpu_up_blocks_func if isinstance(gate, list) else _cpu_up_func
    gv = bb.add_func(make(experts, inner, hidden, k, fmt_gu, glu), up_name(fmt_gu, experts, inner, hidden, k, glu))
    args = [flat, chosen] + (gate + up if isinstance(gate, list) else [gate, up]) + list(biases)
    h = bb.emit(relax.call_tir(gv, args, relax.TensorType([n, i64(k), i64(inner)], "float32")))
    make = _cpu_down_blocks_func if isinstance(down, list) else _cpu_down_func
    gv = bb.add_func(make(experts, hidden, inner, k, fmt_d), f"moe_down_{fmt_d}_{experts}x{hidden}x{inner}_k{k}")
    args = [h, chosen, weights] + (down if isinstance(down, list) else [down])
    return bb.emit(relax.call_tir(gv, args, relax.TensorType([n, i64(hidden)], "float32")))


def lower(low, node) -> relax.Expr:
    """``low``: the FunctionLowering (its block builder, values and parameters)."""
    from kiln.ops import full_attrs, get
    from kiln.ops_moe import parts
    bb = low.bb
    attrs = full_attrs(get("MoE"), node.attrs)
    experts_in, bias_in, shared_in = parts(node.inputs, attrs)
    x = low.tensor(node.inputs[0])
    router = low.tensor(node.inputs[1])
    blocks = [v.is_weight and v.name in low.plan.index and v.weight.format.is_block
              and low.plan.formats.get(v.name) == v.weight.format.name for v in experts_in[2:5]]
    gate, up, down = (low.params_of(v.name) if b else low.tensor(v) for v, b in zip(experts_in[2:5], blocks))
    biases = [low.tensor(v) for v in bias_in] if bias_in else None
    glu = (float(attrs["alpha"]), float(attrs["limit"])) if attrs["activation"] == "swiglu_oai" else None
    if (glu is None) != (biases is None):
        raise ValueError(f"{node.name}: the TVM kernels take gpt-oss's clamped SwiGLU with its biases, "
                         f"not one without the other")
    hidden = int(node.inputs[0].type.shape[-1])
    flat = bb.emit(relax.op.reshape(x, [-1, hidden]))
    logits = bb.emit(relax.op.matmul(flat, relax.op.permute_dims(router, [1, 0])))
    if biases:
        logits = bb.emit(relax.op.add(logits, biases[0]))
    if attrs.get("scoring", "softmax") == "softmax":
        scores = bb.emit(relax.op.nn.softmax(logits, axis=-1))
    else:
        scores = bb.emit(relax.op.sigmoid(logits))
    top = bb.emit(relax.op.topk(scores, k=int(attrs["top_k"]), axis=-1, ret_type="both", largest=True, dtype="int64"))
    weights, chosen = bb.emit(relax.TupleGetItem(top, 0)), bb.emit(relax.TupleGetItem(top, 1))
    if attrs.get("normalize"):
        weights = bb.emit(relax.op.divide(weights, relax.op.sum(weights, axis=[-1], keepdims=True)))
    experts, inner, _ = (int(d) for d in node.inputs[2].type.shape)
    # each tensor's storage: its block type (kept as blocks), its float type, or float32
    fmts = [v.weight.format.name if b or (v.is_weight and stored_as_is(v)) else "f32"
            for v, b in zip(experts_in[2:5], blocks)]
    if fmts[0] != fmts[1] or blocks[0] != blocks[1]:
        raise ValueError(f"{node.name}: gate and up experts stored differently ({fmts[0]}, {fmts[1]})")
    if is_gpu(low.target.tvm):
        if any(blocks):
            raise ValueError(f"{node.name}: block-quantized experts have no GPU kernel yet")
        fmt = fmts[0]
        if fmts[2] != fmt:
            raise ValueError(f"{node.name}: expert tensors in different types ({', '.join(fmts)})")
        out = bb.emit_te(_experts, flat, chosen, weights, gate, up, down, fmt, glu,
                         *(biases[1:3] if biases else ()), primfunc_name_hint="moe_experts")
    else:
        out = _cpu_experts(bb, flat, chosen, weights, gate, up, down, (experts, inner, hidden, int(attrs["top_k"])),
                           (fmts[0], fmts[2]), glu, biases[1:3] if biases else ())
    if biases:
        # the chosen experts' down biases, weighted as their outputs are: [n, k, E] summed over k
        picked = bb.emit(relax.op.take(biases[3], chosen, axis=0))
        out = bb.emit(relax.op.add(out, relax.op.sum(relax.op.multiply(picked, relax.op.expand_dims(weights, -1)),
                                                     axis=[1])))
    if shared_in:
        sg, su, sd, sr = (low.tensor(v) for v in shared_in)

        def linear(a, w):
            return bb.emit(relax.op.matmul(a, relax.op.permute_dims(w, [1, 0])))
        g = linear(flat, sg)
        act = bb.emit(relax.op.multiply(relax.op.multiply(g, relax.op.sigmoid(g)), linear(flat, su)))
        shared = bb.emit(relax.op.multiply(linear(act, sd), relax.op.sigmoid(linear(flat, sr))))
        out = bb.emit(relax.op.add(out, shared))
    return relax.op.reshape(out, low.shape_of(node.inputs[0]))
