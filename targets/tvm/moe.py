"""The MoE op on TVM: routing in Relax ops, then kernels that read only the chosen experts.

The decomposition (``kiln.passes.moe``) runs every expert on every token; here each token's
k chosen experts are indexed inside the kernel (``w[chosen[t, j], f, r]``), so a decode step
reads k experts' weights per layer, not all of them: its cost follows the active parameters.
Expert weights are stored ``[experts, out, in]`` in their own float type (f32, f16, or bf16 as
its uint16 bits, widened exactly in the kernels, as ``float_kernels`` does); block-quantized
experts are read as blocks by the CPU kernels where ``blocked_experts`` allows (gate and up of
one block type), else dequantized to float32 when the artifact is built. The router and a
shared expert's matrices are ordinary [n, k] weights and go through the GEMV kernels
(``float_kernels``/``quant_kernels``).

On the CPU the block experts run as two hand-written kernels, each with two paths chosen by
the token count n at run time:

* n ≤ PER_TOKEN_MAX_ROWS (decode, a batch of decode rows): ``moe_up`` computes
  silu(gate_e·x) ⊙ up_e·x per (token, chosen slot, 16-row tile), one parallel item each;
  ``moe_down`` computes 16 output features of a token per item, summing its k experts' tiles
  weighted by the routing. Tiles are read as the dense GEMVs read theirs (``tile_reader``:
  prefetched ahead, the next item's tile included; scales hoisted; independent FMA chains), so
  a token's arithmetic does not depend on n (batch invariance).
* n > PER_TOKEN_MAX_ROWS (prefill): the (token, slot) pairs are counting-sorted by expert, then
  per (expert, tile) the pairs routed to that expert run GROUP_ROWS at a time, each weight
  vector dequantized once for all of them (a grouped GEMM); ``moe_down`` writes each pair's
  weighted output to a scratch row and sums a token's k rows in slot order.

Float experts keep a simpler per-token kernel (``_cpu_up_func``/``_cpu_down_func``). GPU
targets take the TE computation below (the same arithmetic, TVM's schedule). gpt-oss's
variant (``glu``): its router bias is added to the logits in Relax, ``moe_up`` adds the gate
and up biases and applies the clamped SwiGLU, and the chosen experts' down biases, weighted
by the routing, are added in Relax after ``moe_down``.
"""
from __future__ import annotations

import functools

from tvm import relax, te, tirx as tir

from .kernel_common import dims, is_gpu, target_key

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


def linear_inputs(node) -> set:
    """The MoE inputs it multiplies as x·Wᵀ with 2-D weights: the router and the shared
    expert's four (the lowering runs them through the GEMV kernels)."""
    from kiln.ops import full_attrs, get
    from kiln.ops_moe import parts
    _, _, shared = parts(node.inputs, full_attrs(get("MoE"), node.attrs))
    first = len(node.inputs) - (len(shared) if shared else 0)
    return {1} | (set(range(first, len(node.inputs))) if shared else set())


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


def _routing_args(T, n, experts: int, k: int):
    """``_route``'s scratch outputs: (offsets [X + 1], pairs [n·k])."""
    return (T.arg("offsets", T.buffer((experts + 1,), "int32")), T.arg("pairs", T.buffer((n * k,), "int32")))


def _up_args(T, fmt: str, experts: int, inner: int, hidden: int, k: int, weight, glu=None, routing=False):
    """A moe_up kernel's name, attributes and arguments, in order: (n, x, chosen, gate, up,
    biases, h), biases (gate's and up's [X, F]) only with gpt-oss's ``glu``, else None;
    ``weight(name)`` declares gate's and up's (their own float type, or blocks). With
    ``routing`` h becomes (h, offsets, pairs), ``_route``'s scratch outputs."""
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
    h = T.arg("h", T.buffer((n, k, inner), "float32"))
    return n, x, chosen, gate, up, biases, ((h, *_routing_args(T, n, experts, k)) if routing else h)


def _down_args(T, fmt: str, experts: int, hidden: int, inner: int, k: int, weight, routing=False):
    """A moe_down kernel's name, attributes and arguments, in order: (n, h, chosen, weights,
    down, out); ``weight(name)`` declares down's. With ``routing`` out becomes (out, y,
    offsets, pairs): y [n·k, hidden] the weighted output of each (token, slot), and
    ``_route``'s two, prefill's scratch."""
    T.func_name(f"moe_down_{fmt}_{experts}x{hidden}x{inner}_k{k}")
    T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
    n = T.int64()
    h = T.arg("h", T.buffer((n, k, inner), "float32"))
    chosen = T.arg("chosen", T.buffer((n, k), "int64"))
    weights = T.arg("weights", T.buffer((n, k), "float32"))
    down = weight("down")
    out = T.arg("out", T.buffer((n, hidden), "float32"))
    if routing:
        out = (out, T.arg("y", T.buffer((n * k, hidden), "float32")), *_routing_args(T, n, experts, k))
    return n, h, chosen, weights, down, out


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


UP_ACCS, DOWN_ACCS = 2, 4      # partial sums per weight stream: gate and up's 2 each, down's 4
# Up to this many tokens (a decode batch) each token's experts are its own dot products, the
# same arithmetic at every count (batch invariance); past it (prefill) the tokens routed to an
# expert share each dequantized weight vector, GROUP_ROWS of them at a time.
PER_TOKEN_MAX_ROWS = 8
GROUP_ROWS = 6


def _route(T, chosen, offsets, pairs, n, experts: int, k: int):
    """Prefill's routing, serial: the (token, slot) pairs t·k + j sorted by chosen expert into
    ``pairs`` (a counting sort, tokens in order), expert e's at pairs[offsets[e]:offsets[e + 1]]."""
    cursor = T.alloc_buffer((experts,), "int32")

    def expert(p):
        return tir.Cast("int32", T.max(T.min(chosen[p // k, p % k], experts - 1), 0))
    with T.serial(0, experts + 1) as e:
        T.buffer_store(offsets, tir.const(0, "int32"), [e])
    with T.serial(0, n * k) as p:
        T.buffer_store(offsets, offsets[expert(p) + 1] + 1, [expert(p) + 1])
    with T.serial(0, experts) as e:
        T.buffer_store(offsets, offsets[e + 1] + offsets[e], [e + 1])
        T.buffer_store(cursor, offsets[e], [e])
    with T.serial(0, n * k) as p:
        T.buffer_store(pairs, tir.Cast("int32", p), [cursor[expert(p)]])
        T.buffer_store(cursor, cursor[expert(p)] + 1, [expert(p)])


def _grouped(T, offsets, pairs, experts: int, tiles: int, body):
    """Prefill's loop: per (expert e, 16-row tile ft), parallel, the pairs routed to e in
    passes of GROUP_ROWS; ``body(e, ft, rows, live)`` with the pass's pair indices (the last
    repeated past the end) and, per row, whether it is one of e's."""
    with T.parallel(0, experts * tiles) as i:
        e, ft = i // tiles, i % tiles
        start, count = offsets[e], offsets[e + 1] - offsets[e]
        with T.serial(0, (count + GROUP_ROWS - 1) // GROUP_ROWS) as g:
            rows = [pairs[start + T.min(g * GROUP_ROWS + r, count - 1)] for r in range(GROUP_ROWS)]
            body(e, ft, rows, [g * GROUP_ROWS + r < count for r in range(GROUP_ROWS)])


class _row:
    """Row r of a [GROUP_ROWS, LANES] buffer, indexed by lane like a [LANES] buffer."""

    def __init__(self, buf, r):
        self.buf, self.r = buf, r

    def __getitem__(self, lane):
        return self.buf[self.r, lane]


def _group_dot(T, readers, accs, tile, x_at, hidden: int):
    """accs[s][r] (float32 [LANES] buffers) = Σ_k x_at(r, k) · reader s's tile row vector:
    each weight vector dequantized once for the GROUP_ROWS rows."""
    from .quant_layout import CHUNK
    ramp = tir.Ramp(0, 1, LANES)
    zero = tir.Broadcast(tir.const(0, "float32"), LANES)
    wv = [T.alloc_buffer((LANES,), "float32") for _ in readers]
    sc = [(T.alloc_buffer((rd.groups, LANES), "float32"), T.alloc_buffer((rd.groups, LANES), "float32"))
          for rd in readers]
    for acc in accs:
        T.buffer_store(acc, zero, [0, ramp])
        for r in range(1, GROUP_ROWS):
            T.buffer_store(acc, zero, [r, ramp])
    with T.serial(0, hidden // CHUNK) as c:
        for rd, (scb, bib) in zip(readers, sc):
            rd.prefetch(tile, c)
            rd.hoist_scales(tile, c, scb, bib)
        for kk in range(CHUNK):
            for rd, w, (scb, bib) in zip(readers, wv, sc):
                rd.store_weight(w, tile, c, kk, scb, bib)
            for r in range(GROUP_ROWS):
                xv = tir.Broadcast(x_at(r, c * CHUNK + kk), LANES)
                for acc, w in zip(accs, wv):
                    T.buffer_store(acc, acc[r, ramp] + xv * w[ramp], [r, ramp])


@functools.lru_cache(maxsize=None)
def _cpu_up_blocks_func(experts: int, inner: int, hidden: int, k: int, fmt: str, glu=None, target_key: str = ""):
    """moe_up over block weights. Decode (n ≤ PER_TOKEN_MAX_ROWS): per (token, slot, 16-row
    tile of the chosen expert) the gate and up vectors of 16 rows, read as ``tile_reader``
    reads a dense GEMV's tiles (prefetched, scales hoisted, independent FMA chains).
    Prefill: ``_grouped`` over the routed pairs."""
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    from .kernel_common import cpu_shape
    from .quant_layout import CHUNK
    from .tile_reader import TileReader
    wide = cpu_shape(target_key).tiles > 1 if target_key else False
    zero = tir.Broadcast(tir.const(0, "float32"), LANES)
    ramp = tir.Ramp(0, 1, LANES)
    tiles = inner // LANES
    with IRBuilder() as ib:
        with T.prim_func(private=True):
            n, x, chosen, gate, up, biases, (h, offsets, pairs) = _up_args(
                T, fmt, experts, inner, hidden, k, lambda name: _block_weights(T, fmt, experts * inner, hidden, name),
                glu, routing=True)
            readers = [TileReader(T, w, experts * inner, hidden, wide) for w in (gate, up)]
            groups = readers[0].groups

            def tile_of(i):
                i = T.min(i, n * (k * tiles) - 1)
                e = T.max(T.min(chosen[i // (k * tiles), (i // tiles) % k], experts - 1), 0)
                return e * tiles + i % tiles

            def store_h(t, j, e, ft, g, u):
                with T.vectorized(0, LANES) as lane:
                    f = ft * LANES + lane
                    T.buffer_store(h, _glu(_biased(g[lane], biases, 0, e, f), _biased(u[lane], biases, 1, e, f),
                                           glu, tir.exp), [t, j, f])

            def per_token():
                with T.parallel(0, n * (k * tiles)) as i:
                    t, j, ft = i // (k * tiles), (i // tiles) % k, i % tiles
                    e = T.max(T.min(chosen[t, j], experts - 1), 0)
                    tile, following = tile_of(i), tile_of(i + 1)
                    accs = [T.alloc_buffer((LANES,), "float32") for _ in readers]
                    part = T.alloc_buffer((UP_ACCS, LANES), "float32")
                    wv = T.alloc_buffer((LANES,), "float32")
                    scb = T.alloc_buffer((groups, LANES), "float32")
                    bib = T.alloc_buffer((groups, LANES), "float32")
                    for acc in accs:
                        T.buffer_store(acc, zero, [ramp])
                    with T.serial(0, hidden // CHUNK) as c:
                        for reader, acc in zip(readers, accs):
                            reader.prefetch(tile, c, following)
                            reader.accumulate_chunk(acc, part, wv, scb, bib, tile, c,
                                                    lambda kk: x[t, c * CHUNK + kk], UP_ACCS)
                    store_h(t, j, e, ft, *accs)

            def grouped():
                def body(e, ft, rows, live):
                    accs = [T.alloc_buffer((GROUP_ROWS, LANES), "float32") for _ in readers]
                    _group_dot(T, readers, accs, e * tiles + ft, lambda r, kk: x[rows[r] // k, kk], hidden)
                    for r in range(GROUP_ROWS):
                        with T.If(live[r]):
                            with T.Then():
                                store_h(rows[r] // k, rows[r] % k, e, ft, *(_row(a, r) for a in accs))
                _route(T, chosen, offsets, pairs, n, experts, k)
                _grouped(T, offsets, pairs, experts, tiles, body)

            with T.If(n <= PER_TOKEN_MAX_ROWS):
                with T.Then():
                    per_token()
                with T.Else():
                    grouped()
    return ib.get()


@functools.lru_cache(maxsize=None)
def _cpu_down_blocks_func(experts: int, hidden: int, inner: int, k: int, fmt: str, target_key: str = ""):
    """moe_down over block weights. Decode: per (token, 16 output features) the k chosen
    experts' tiles, each read as ``tile_reader`` reads a dense GEMV's (the next expert's tile
    prefetched while the last chunks of this one are summed). Prefill: ``_grouped`` writes
    each pair's weighted output to y, then each token's k rows of y are summed in slot order."""
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    from .kernel_common import cpu_shape
    from .quant_layout import CHUNK
    from .tile_reader import TileReader
    wide = cpu_shape(target_key).tiles > 1 if target_key else False
    zero = tir.Broadcast(tir.const(0, "float32"), LANES)
    ramp = tir.Ramp(0, 1, LANES)
    tiles = hidden // LANES
    with IRBuilder() as ib:
        with T.prim_func(private=True):
            n, h, chosen, weights, down, (out, y, offsets, pairs) = _down_args(
                T, fmt, experts, hidden, inner, k, lambda name: _block_weights(T, fmt, experts * hidden, inner, name),
                routing=True)
            reader = TileReader(T, down, experts * hidden, inner, wide)

            def per_token():
                with T.parallel(0, n * tiles) as i:
                    t, ot = i // tiles, i % tiles
                    acc = T.alloc_buffer((LANES,), "float32")
                    total = T.alloc_buffer((LANES,), "float32")
                    part = T.alloc_buffer((DOWN_ACCS, LANES), "float32")
                    wv = T.alloc_buffer((LANES,), "float32")
                    scb = T.alloc_buffer((reader.groups, LANES), "float32")
                    bib = T.alloc_buffer((reader.groups, LANES), "float32")
                    T.buffer_store(total, zero, [ramp])
                    for j in range(k):
                        tile = T.max(T.min(chosen[t, j], experts - 1), 0) * tiles + ot
                        nxt = T.min(i + 1, n * tiles - 1)
                        following = (T.max(T.min(chosen[t, j + 1], experts - 1), 0) * tiles + ot if j + 1 < k
                                     else T.max(T.min(chosen[nxt // tiles, 0], experts - 1), 0) * tiles + nxt % tiles)
                        T.buffer_store(acc, zero, [ramp])
                        with T.serial(0, inner // CHUNK) as c:
                            reader.prefetch(tile, c, following)
                            reader.accumulate_chunk(acc, part, wv, scb, bib, tile, c,
                                                    lambda kk: h[t, j, c * CHUNK + kk], DOWN_ACCS)
                        T.buffer_store(total, total[ramp] + tir.Broadcast(weights[t, j], LANES) * acc[ramp], [ramp])
                    T.buffer_store(out, total[ramp], [t, tir.Ramp(ot * LANES, 1, LANES)])

            def grouped():
                def body(e, ft, rows, live):
                    acc = T.alloc_buffer((GROUP_ROWS, LANES), "float32")
                    _group_dot(T, [reader], [acc], e * tiles + ft,
                               lambda r, kk: h[rows[r] // k, rows[r] % k, kk], inner)
                    for r in range(GROUP_ROWS):
                        with T.If(live[r]):
                            with T.Then():
                                w = tir.Broadcast(weights[rows[r] // k, rows[r] % k], LANES)
                                T.buffer_store(y, w * acc[r, ramp], [rows[r], tir.Ramp(ft * LANES, 1, LANES)])
                _route(T, chosen, offsets, pairs, n, experts, k)
                _grouped(T, offsets, pairs, experts, tiles, body)
                with T.parallel(0, n * tiles) as i:
                    t, ot = i // tiles, i % tiles
                    cols = tir.Ramp(ot * LANES, 1, LANES)
                    total = y[t * k, cols]
                    for j in range(1, k):
                        total = total + y[t * k + j, cols]
                    T.buffer_store(out, total, [t, cols])

            with T.If(n <= PER_TOKEN_MAX_ROWS):
                with T.Then():
                    per_token()
                with T.Else():
                    grouped()
    return ib.get()


def _cpu_experts(bb, flat, chosen, weights, gate, up, down, shape, fmt, glu=None, biases=(), target_key: str = ""):
    """``glu`` and ``biases`` (gate's and up's): gpt-oss's clamped SwiGLU, else silu and none."""
    experts, inner, hidden, k = shape
    n = dims(flat, "the MoE kernels")[0]
    i64 = functools.partial(tir.IntImm, "int64")
    fmt_gu, fmt_d = fmt
    routing = [relax.TensorType([i64(experts + 1)], "int32"), relax.TensorType([n * i64(k)], "int32")]
    if isinstance(gate, list):
        gv = bb.add_func(_cpu_up_blocks_func(experts, inner, hidden, k, fmt_gu, glu, target_key),
                         up_name(fmt_gu, experts, inner, hidden, k, glu))
        up_out = bb.emit(relax.call_tir(gv, [flat, chosen] + gate + up + list(biases),
                                        [relax.TensorType([n, i64(k), i64(inner)], "float32")] + routing))
        h = bb.emit(relax.TupleGetItem(up_out, 0))
    else:
        gv = bb.add_func(_cpu_up_func(experts, inner, hidden, k, fmt_gu, glu), up_name(fmt_gu, experts, inner, hidden, k, glu))
        h = bb.emit(relax.call_tir(gv, [flat, chosen, gate, up] + list(biases),
                                   relax.TensorType([n, i64(k), i64(inner)], "float32")))
    name = f"moe_down_{fmt_d}_{experts}x{hidden}x{inner}_k{k}"
    if isinstance(down, list):
        gv = bb.add_func(_cpu_down_blocks_func(experts, hidden, inner, k, fmt_d, target_key), name)
        both = bb.emit(relax.call_tir(gv, [h, chosen, weights] + down,
                                      [relax.TensorType([n, i64(hidden)], "float32"),
                                       relax.TensorType([n * i64(k), i64(hidden)], "float32")] + routing))
        return bb.emit(relax.TupleGetItem(both, 0))
    gv = bb.add_func(_cpu_down_func(experts, hidden, inner, k, fmt_d), name)
    return bb.emit(relax.call_tir(gv, [h, chosen, weights, down], relax.TensorType([n, i64(hidden)], "float32")))


def lower(low, node) -> relax.Expr:
    """``low``: the FunctionLowering (its block builder, values and parameters)."""
    from kiln.ops import full_attrs, get
    from kiln.ops_moe import parts
    bb = low.bb
    attrs = full_attrs(get("MoE"), node.attrs)
    experts_in, bias_in, shared_in = parts(node.inputs, attrs)
    x = low.tensor(node.inputs[0])
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
    logits = bb.emit(low.linear(flat, node.inputs[1]))
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
                           (fmts[0], fmts[2]), glu, biases[1:3] if biases else (), target_key(low.target.tvm))
    if biases:
        # the chosen experts' down biases, weighted as their outputs are: [n, k, E] summed over k
        picked = bb.emit(relax.op.take(biases[3], chosen, axis=0))
        out = bb.emit(relax.op.add(out, relax.op.sum(relax.op.multiply(picked, relax.op.expand_dims(weights, -1)),
                                                     axis=[1])))
    if shared_in:
        sg, su, sd, sr = shared_in

        def linear(a, w):
            return bb.emit(low.linear(a, w))
        g = linear(flat, sg)
        act = bb.emit(relax.op.multiply(relax.op.multiply(g, relax.op.sigmoid(g)), linear(flat, su)))
        shared = bb.emit(relax.op.multiply(linear(act, sd), relax.op.sigmoid(linear(flat, sr))))
        out = bb.emit(relax.op.add(out, shared))
    return relax.op.reshape(out, low.shape_of(node.inputs[0]))
