"""silu(g) · u, the gated MLP's activation, as one CPU kernel.

Kiln's graphs spell the SwiGLU MLP as ``Split(gate_up) -> g, u``, ``Sigmoid(g)``,
``Mul(g, ·)``, ``Mul(·, u)``. Lowered op by op on the CPU that is four kernels and three
temporaries a layer, and Relax's legalized sigmoid is a serial loop of scalar ``expf`` calls:
on SmolLM2 at 8 decode rows it alone took ~1 ms of an 8.6 ms step. ``match`` finds the pattern
(the Split too, when g and u are its two halves and nothing else reads them) and ``emit``
lowers it to one kernel that reads the matmul's output and writes silu(g)·u, 16 lanes at a
time, parallel over rows in prefill.

The exponential is computed in the kernel (e^x = 2^n · e^r, |r| ≤ ln2/2, e^r by a degree-7
polynomial of the Taylor-like minimax kind every vector math library uses; n and r by the
two-constant split of ln 2), so it vectorizes; its results are within 2 units in the last
place of float32 ``exp``. The products are taken in the graph's order, (g · sigmoid(g)) · u.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from tvm import relax, tirx as tir

LANES = 16
PARALLEL_ROWS = 8       # more rows than this run in parallel (a decode step's few stay serial)
# e^r for |r| ≤ ln2/2: 1 + r + r²·(c0 + r·(c1 + r·(c2 + r·(c3 + r·(c4 + r·c5))))), the
# coefficients of the classic float32 expf minimax fit (1/2, 1/6, 1/24, ... nudged)
_POLY = (5.0000001201e-1, 1.6666665459e-1, 4.1665795894e-2, 8.3334519073e-3, 1.3981999507e-3, 1.9875691500e-4)
_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4      # ln 2 = hi + lo, hi exact in few bits
_LOG2E = 1.44269504088896341
_X_MAX, _X_MIN = 88.3762626647949, -87.3365447504019  # e^x stays a normal float32


@dataclass
class GatedSilu:
    """One matched pattern: the output Mul computes silu(g)·u; ``fused`` the Split's input
    [..., 2F] when g and u are its halves (else None, and g, u are read as they are)."""
    g: object
    u: object
    fused: object | None
    width: int
    folded: list          # the nodes the kernel replaces (not lowered on their own)


def _producer(v, op):
    p = v.producer if v is not None else None
    return p if p is not None and p.op == op else None


def match(graph) -> dict:
    """{id(output Mul node): GatedSilu} for every Mul(Mul(g, Sigmoid(g)), u) over float32
    [.., F] tensors of rank 3 with F a multiple of 16, whose inner nodes feed only it."""
    found = {}
    outputs = {id(v) for v in graph.outputs}

    def only_for(v, n: int) -> bool:
        """v is read by n nodes and is not a graph output."""
        return len(v.uses) == n and id(v) not in outputs
    for node in graph.nodes:
        if node.op != "Mul" or len(node.inputs) != 2:
            continue
        for a, u in (node.inputs, node.inputs[::-1]):
            act = _producer(a, "Mul")
            if act is None or not only_for(a, 1):
                continue
            g = next((x for x, s in (act.inputs, act.inputs[::-1])
                      if (sig := _producer(s, "Sigmoid")) is not None and sig.inputs[0] is x
                      and only_for(s, 1)), None)
            if g is None:
                continue
            sig = next(s.producer for s in act.inputs if _producer(s, "Sigmoid") is not None)
            shape = g.type.shape
            if (len(shape) != 3 or u.type.shape != shape or not isinstance(shape[-1], int) or shape[-1] % LANES
                    or g.type.dtype != "float32" or u.type.dtype != "float32"):
                continue
            folded = [sig, act]
            split = _producer(g, "Split")
            fused = None
            if (split is not None and split is u.producer and len(split.outputs) == 2
                    and split.outputs[0] is g and split.outputs[1] is u
                    and split.attrs["axis"] in (-1, 2) and list(split.attrs["split"]) == [shape[-1]] * 2
                    and only_for(g, 2) and only_for(u, 1)):
                fused = split.inputs[0]
                folded.append(split)
            found[id(node)] = GatedSilu(g, u, fused, int(shape[-1]), folded)
            break
    return found


def _exp(x):
    """e^x of a float32x16 expression (see the module docstring)."""
    f32 = "float32x16"

    def c(v):
        return tir.Broadcast(tir.const(v, "float32"), LANES)
    x = tir.max(tir.min(x, c(_X_MAX)), c(_X_MIN))
    n = tir.floor(x * c(_LOG2E) + c(0.5))
    r = x - n * c(_LN2_HI) - n * c(_LN2_LO)
    p = c(_POLY[-1])
    for coef in reversed(_POLY[:-1]):
        p = p * r + c(coef)
    er = p * r * r + r + c(1.0)
    bits = tir.shift_left(tir.Cast("int32x16", n) + tir.Broadcast(tir.const(127, "int32"), LANES),
                          tir.Broadcast(tir.const(23, "int32"), LANES))
    return er * tir.reinterpret(f32, bits)


@functools.lru_cache(maxsize=None)
def _kernel(width: int, fused: bool):
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T
    one = tir.Broadcast(tir.const(1.0, "float32"), LANES)
    with IRBuilder() as ib:
        with T.prim_func(private=True):
            T.func_name(f"gated_silu_{width}{'_split' if fused else ''}")
            T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
            b, s = T.int64(), T.int64()
            if fused:
                gu = T.arg("gate_up", T.buffer((b, s, 2 * width), "float32"))
                g_at = lambda i, j, cols: gu[i, j, cols]                                  # noqa: E731
                u_at = lambda i, j, cols: gu[i, j, tir.Ramp(cols.base + width, 1, LANES)]  # noqa: E731
            else:
                gb = T.arg("g", T.buffer((b, s, width), "float32"))
                ub = T.arg("u", T.buffer((b, s, width), "float32"))
                g_at = lambda i, j, cols: gb[i, j, cols]       # noqa: E731
                u_at = lambda i, j, cols: ub[i, j, cols]       # noqa: E731
            out = T.arg("out", T.buffer((b, s, width), "float32"))

            def row(loop):
                with loop(0, b * s) as rj:
                    i, j = rj // s, rj % s
                    with T.serial(0, width // LANES) as c:
                        cols = tir.Ramp(c * LANES, 1, LANES)
                        g = g_at(i, j, cols)
                        sig = one / (one + _exp(tir.Broadcast(tir.const(0.0, "float32"), LANES) - g))
                        T.buffer_store(out, (g * sig) * u_at(i, j, cols), [i, j, cols])
            # a root block: Relax's reshape detection inspects one-input kernels and requires it
            with T.sblock("root"):
                with T.If(b * s > PARALLEL_ROWS):
                    with T.Then():
                        row(T.parallel)
                    with T.Else():
                        row(T.serial)
    return ib.get()


def emit(bb, found: GatedSilu, tensor) -> relax.Expr:
    """The kernel's call; ``tensor(value)`` gives a graph value's Relax expression."""
    from .kernel_common import dims
    fused = found.fused is not None
    gv = bb.add_func(_kernel(found.width, fused), f"gated_silu_{found.width}{'_split' if fused else ''}")
    args = [tensor(found.fused)] if fused else [tensor(found.g), tensor(found.u)]
    lead = dims(args[0])[:-1]
    return relax.call_tir(gv, args, relax.TensorType([*lead, tir.IntImm("int64", found.width)], "float32"))
