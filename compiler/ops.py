"""The op registry: one definition per op with its attributes, type inference and numpy reference.

Primitive ops follow ONNX semantics (broadcasting, Reshape's 0 = copy and -1 = infer, Gather,
Slice, Expand), so a primitive graph lowers to standard ONNX node by node and the numpy
reference is the oracle for every backend. Adding an op is one ``@op`` definition here (or in a
module that imports ``op`` from here).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .ir import TensorType, Value

REGISTRY: dict[str, "OpDef"] = {}


@dataclass
class OpDef:
    name: str
    attrs: dict                      # attribute name -> default (``REQUIRED`` when mandatory)
    infer: Callable                  # (inputs: list[Value], attrs) -> list[TensorType]
    compute: Callable                # (arrays: list[np.ndarray], attrs) -> list[np.ndarray]
    doc: str = ""


REQUIRED = object()


def op(name: str, attrs: dict | None = None):
    """Register an op: decorate a class with ``infer`` and ``compute`` static methods."""
    def deco(cls):
        REGISTRY[name] = OpDef(name, attrs or {}, cls.infer, cls.compute, (cls.__doc__ or "").strip())
        return cls
    return deco


def get(name: str) -> OpDef:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown op {name}") from None


def full_attrs(opdef: OpDef, attrs: dict) -> dict:
    out = {}
    for k, default in opdef.attrs.items():
        if k in attrs:
            out[k] = attrs[k]
        elif default is REQUIRED:
            raise ValueError(f"{opdef.name}: attribute {k} is required")
        else:
            out[k] = default
    unknown = set(attrs) - set(opdef.attrs)
    if unknown:
        raise ValueError(f"{opdef.name}: unknown attributes {sorted(unknown)}")
    return out


def infer_types(name: str, inputs: list[Value], attrs: dict) -> list[TensorType]:
    opdef = get(name)
    return opdef.infer(inputs, full_attrs(opdef, attrs))


def compute(name: str, arrays: list, attrs: dict) -> list[np.ndarray]:
    opdef = get(name)
    return opdef.compute(arrays, full_attrs(opdef, attrs))


# ---- shape helpers ------------------------------------------------------------------------

def broadcast_dims(a, b):
    if a == 1:
        return b
    if b == 1 or a == b:
        return a
    if a is None or b is None:
        return a if b is None else b
    if isinstance(a, str) and isinstance(b, int):
        return b          # a symbol broadcast against a concrete size must be that size
    if isinstance(b, str) and isinstance(a, int):
        return a
    return None


def broadcast_shapes(*shapes):
    rank = max(len(s) for s in shapes)
    padded = [(1,) * (rank - len(s)) + tuple(s) for s in shapes]
    out = []
    for dims in zip(*padded):
        d = dims[0]
        for e in dims[1:]:
            d = broadcast_dims(d, e)
        out.append(d)
    return tuple(out)


def _norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _const(v: Value):
    return None if v is None else v.const


# ---- elementwise --------------------------------------------------------------------------

def _binary(name, fn, out_dtype=None):
    @op(name)
    class _Op:
        @staticmethod
        def infer(inputs, attrs):
            a, b = inputs
            return [TensorType(out_dtype or a.type.dtype, broadcast_shapes(a.type.shape, b.type.shape))]

        @staticmethod
        def compute(x, attrs):
            r = fn(x[0], x[1])
            return [np.asarray(r, dtype=out_dtype or x[0].dtype)]


_binary("Add", np.add)
_binary("Sub", np.subtract)
_binary("Mul", np.multiply)
_binary("Div", lambda a, b: np.floor_divide(a, b) if a.dtype.kind in "iu" else np.divide(a, b))
_binary("Pow", np.power)
_binary("Max", np.maximum)
_binary("Min", np.minimum)
_binary("Less", np.less, "bool")
_binary("LessOrEqual", np.less_equal, "bool")
_binary("Greater", np.greater, "bool")
_binary("GreaterOrEqual", np.greater_equal, "bool")
_binary("Equal", np.equal, "bool")
_binary("And", np.logical_and, "bool")
_binary("Or", np.logical_or, "bool")


def _erf(x):
    from math import erf
    return np.vectorize(erf, otypes=[np.float64])(x).astype(x.dtype)


def _unary(name, fn):
    @op(name)
    class _Op:
        @staticmethod
        def infer(inputs, attrs):
            return [inputs[0].type]

        @staticmethod
        def compute(x, attrs):
            return [np.asarray(fn(x[0]), dtype=x[0].dtype)]


_unary("Neg", np.negative)
_unary("Sqrt", np.sqrt)
_unary("Reciprocal", np.reciprocal)
_unary("Exp", np.exp)
_unary("Log", np.log)
_unary("Tanh", np.tanh)
_unary("Sigmoid", lambda x: 1.0 / (1.0 + np.exp(-x)))
_unary("Erf", _erf)
_unary("Cos", np.cos)
_unary("Sin", np.sin)
_unary("Abs", np.abs)
_unary("Relu", lambda x: np.maximum(x, 0))
_unary("Not", np.logical_not)


@op("Where")
class Where:
    """Where(cond, a, b): a where cond else b, broadcasting all three."""
    @staticmethod
    def infer(inputs, attrs):
        c, a, b = inputs
        return [TensorType(a.type.dtype, broadcast_shapes(c.type.shape, a.type.shape, b.type.shape))]

    @staticmethod
    def compute(x, attrs):
        return [np.where(x[0], x[1], x[2]).astype(x[1].dtype)]


@op("Cast", {"to": REQUIRED})
class Cast:
    @staticmethod
    def infer(inputs, attrs):
        return [TensorType(attrs["to"], inputs[0].type.shape)]

    @staticmethod
    def compute(x, attrs):
        return [x[0].astype(attrs["to"])]


# ---- linear algebra and reductions --------------------------------------------------------

@op("MatMul")
class MatMul:
    """numpy.matmul semantics: batch dims broadcast, the last two multiply."""
    @staticmethod
    def infer(inputs, attrs):
        a, b = (v.type.shape for v in inputs)
        if len(a) == 1 or len(b) == 1:
            raise ValueError("MatMul with 1-D operands is not used by kiln")
        batch = broadcast_shapes(a[:-2], b[:-2])
        return [TensorType(inputs[0].type.dtype, batch + (a[-2], b[-1]))]

    @staticmethod
    def compute(x, attrs):
        return [np.matmul(x[0], x[1])]


@op("Softmax", {"axis": -1})
class Softmax:
    @staticmethod
    def infer(inputs, attrs):
        return [inputs[0].type]

    @staticmethod
    def compute(x, attrs):
        a = x[0]
        m = np.max(a, axis=attrs["axis"], keepdims=True)
        m = np.where(np.isfinite(m), m, 0)
        e = np.exp(a - m)
        return [(e / np.sum(e, axis=attrs["axis"], keepdims=True)).astype(a.dtype)]


def _reduce(name, fn):
    @op(name, {"axes": REQUIRED, "keepdims": 1})
    class _Op:
        @staticmethod
        def infer(inputs, attrs):
            shape = inputs[0].type.shape
            axes = {_norm_axis(a, len(shape)) for a in attrs["axes"]}
            if attrs["keepdims"]:
                out = tuple(1 if i in axes else d for i, d in enumerate(shape))
            else:
                out = tuple(d for i, d in enumerate(shape) if i not in axes)
            return [TensorType(inputs[0].type.dtype, out)]

        @staticmethod
        def compute(x, attrs):
            return [np.asarray(fn(x[0], axis=tuple(attrs["axes"]), keepdims=bool(attrs["keepdims"])), dtype=x[0].dtype)]


_reduce("ReduceMean", np.mean)
_reduce("ReduceSum", np.sum)
_reduce("ReduceMax", np.max)


# ---- shape manipulation -------------------------------------------------------------------

def _symbolic_numel(shape):
    """(int part, sorted symbols) of a product of dims, or None if a dim is unknown."""
    n, syms = 1, []
    for d in shape:
        if d is None:
            return None
        if isinstance(d, str):
            syms.append(d)
        else:
            n *= d
    return n, sorted(syms)


@op("Reshape")
class Reshape:
    """Reshape(x, shape): ONNX semantics, 0 copies the input dimension, -1 is inferred."""
    @staticmethod
    def infer(inputs, attrs):
        x, shape_v = inputs
        target = _const(shape_v)
        if target is None:
            n = shape_v.type.shape[0]
            return [TensorType(x.type.dtype, (None,) * n if isinstance(n, int) else ())]
        in_shape = x.type.shape
        out = [in_shape[i] if int(d) == 0 else int(d) for i, d in enumerate(target)]
        if -1 in out:
            i = out.index(-1)
            total = _symbolic_numel(in_shape)
            known = _symbolic_numel([d for j, d in enumerate(out) if j != i])
            out[i] = None
            if total and known:
                syms = list(total[1])
                ok = all(s in syms and not syms.remove(s) for s in known[1])
                if ok and total[0] % known[0] == 0:
                    rest = total[0] // known[0]
                    if not syms:
                        out[i] = rest
                    elif len(syms) == 1 and rest == 1:
                        out[i] = syms[0]
        return [TensorType(x.type.dtype, tuple(out))]

    @staticmethod
    def compute(x, attrs):
        a, shape = x
        target = [a.shape[i] if int(d) == 0 else int(d) for i, d in enumerate(shape)]
        return [a.reshape(target)]


@op("Transpose", {"perm": REQUIRED})
class Transpose:
    @staticmethod
    def infer(inputs, attrs):
        s = inputs[0].type.shape
        return [TensorType(inputs[0].type.dtype, tuple(s[p] for p in attrs["perm"]))]

    @staticmethod
    def compute(x, attrs):
        return [np.ascontiguousarray(np.transpose(x[0], attrs["perm"]))]


@op("Gather", {"axis": 0})
class Gather:
    @staticmethod
    def infer(inputs, attrs):
        data, idx = inputs
        s = data.type.shape
        ax = _norm_axis(attrs["axis"], len(s))
        return [TensorType(data.type.dtype, s[:ax] + idx.type.shape + s[ax + 1:])]

    @staticmethod
    def compute(x, attrs):
        data, idx = x
        ax = _norm_axis(attrs["axis"], data.ndim)
        idx = np.where(idx < 0, idx + data.shape[ax], idx)
        return [np.take(data, idx, axis=ax)]


@op("Concat", {"axis": REQUIRED})
class Concat:
    @staticmethod
    def infer(inputs, attrs):
        shapes = [v.type.shape for v in inputs]
        ax = _norm_axis(attrs["axis"], len(shapes[0]))
        dims = [s[ax] for s in shapes]
        if all(isinstance(d, int) for d in dims):
            cat = sum(dims)
        else:
            nonzero = [d for d in dims if d != 0]
            cat = nonzero[0] if len(nonzero) == 1 else None
        out = list(shapes[0])
        for i in range(len(out)):
            if i != ax:
                for s in shapes[1:]:
                    out[i] = broadcast_dims(out[i], s[i]) if out[i] != s[i] else out[i]
        out[ax] = cat
        return [TensorType(inputs[0].type.dtype, tuple(out))]

    @staticmethod
    def compute(x, attrs):
        return [np.concatenate(x, axis=attrs["axis"])]


@op("Slice", {"starts": REQUIRED, "ends": REQUIRED, "axes": REQUIRED, "steps": None})
class Slice:
    """Static slice along ``axes`` (ONNX Slice with constant starts/ends)."""
    @staticmethod
    def infer(inputs, attrs):
        shape = list(inputs[0].type.shape)
        steps = attrs["steps"] or [1] * len(attrs["axes"])
        for st, en, ax, sp in zip(attrs["starts"], attrs["ends"], attrs["axes"], steps):
            ax = _norm_axis(ax, len(shape))
            d = shape[ax]
            shape[ax] = len(range(*slice(st, en, sp).indices(d))) if isinstance(d, int) else None
        return [TensorType(inputs[0].type.dtype, tuple(shape))]

    @staticmethod
    def compute(x, attrs):
        a = x[0]
        idx = [slice(None)] * a.ndim
        steps = attrs["steps"] or [1] * len(attrs["axes"])
        for st, en, ax, sp in zip(attrs["starts"], attrs["ends"], attrs["axes"], steps):
            idx[_norm_axis(ax, a.ndim)] = slice(st, en, sp)
        return [a[tuple(idx)]]


@op("Split", {"axis": REQUIRED, "split": REQUIRED})
class Split:
    """Split(x) into consecutive parts of ``split`` sizes along ``axis`` (ONNX Split)."""
    @staticmethod
    def infer(inputs, attrs):
        shape = inputs[0].type.shape
        ax = _norm_axis(attrs["axis"], len(shape))
        if isinstance(shape[ax], int) and shape[ax] != sum(attrs["split"]):
            raise ValueError(f"Split: parts {attrs['split']} do not add up to {shape[ax]}")
        return [TensorType(inputs[0].type.dtype, shape[:ax] + (int(n),) + shape[ax + 1:]) for n in attrs["split"]]

    @staticmethod
    def compute(x, attrs):
        return np.split(x[0], np.cumsum(attrs["split"])[:-1], axis=attrs["axis"])


@op("Unsqueeze", {"axes": REQUIRED})
class Unsqueeze:
    @staticmethod
    def infer(inputs, attrs):
        shape = list(inputs[0].type.shape)
        rank = len(shape) + len(attrs["axes"])
        for ax in sorted(_norm_axis(a, rank) for a in attrs["axes"]):
            shape.insert(ax, 1)
        return [TensorType(inputs[0].type.dtype, tuple(shape))]

    @staticmethod
    def compute(x, attrs):
        rank = x[0].ndim + len(attrs["axes"])
        return [np.expand_dims(x[0], tuple(_norm_axis(a, rank) for a in attrs["axes"]))]


@op("Squeeze", {"axes": REQUIRED})
class Squeeze:
    @staticmethod
    def infer(inputs, attrs):
        shape = inputs[0].type.shape
        axes = {_norm_axis(a, len(shape)) for a in attrs["axes"]}
        return [TensorType(inputs[0].type.dtype, tuple(d for i, d in enumerate(shape) if i not in axes))]

    @staticmethod
    def compute(x, attrs):
        return [np.squeeze(x[0], tuple(attrs["axes"]))]


@op("Expand")
class Expand:
    """Expand(x, shape): bidirectional broadcast of x against a constant shape."""
    @staticmethod
    def infer(inputs, attrs):
        target = _const(inputs[1])
        if target is None:
            return [TensorType(inputs[0].type.dtype, (None,) * inputs[1].type.shape[0])]
        return [TensorType(inputs[0].type.dtype, broadcast_shapes(inputs[0].type.shape, tuple(int(d) for d in target)))]

    @staticmethod
    def compute(x, attrs):
        shape = np.broadcast_shapes(x[0].shape, tuple(int(d) for d in x[1]))
        return [np.ascontiguousarray(np.broadcast_to(x[0], shape))]


@op("Shape")
class Shape:
    @staticmethod
    def infer(inputs, attrs):
        return [TensorType("int64", (inputs[0].type.rank,))]

    @staticmethod
    def compute(x, attrs):
        return [np.asarray(x[0].shape, dtype=np.int64)]


@op("Range")
class Range:
    """Range(start, limit, delta) of scalars."""
    @staticmethod
    def infer(inputs, attrs):
        return [TensorType(inputs[0].type.dtype, (None,))]

    @staticmethod
    def compute(x, attrs):
        return [np.arange(x[0], x[1], x[2], dtype=x[0].dtype)]


@op("TopK", {"k": REQUIRED, "axis": -1})
class TopK:
    """TopK(x) -> (values, indices): the k largest along ``axis``, largest first (ONNX TopK,
    ``largest=1, sorted=1``; k is an attribute here, an input in ONNX). Ties: the lower index first."""
    @staticmethod
    def infer(inputs, attrs):
        shape = list(inputs[0].type.shape)
        shape[_norm_axis(attrs["axis"], len(shape))] = int(attrs["k"])
        return [TensorType(inputs[0].type.dtype, tuple(shape)), TensorType("int64", tuple(shape))]

    @staticmethod
    def compute(x, attrs):
        a, k, axis = x[0], int(attrs["k"]), attrs["axis"]
        idx = np.take(np.argsort(-a, axis=axis, kind="stable"), np.arange(k), axis=axis)
        return [np.take_along_axis(a, idx, axis=axis), idx.astype(np.int64)]


def scalar_value(v: Value):
    """The Python number held by a constant scalar value, or None."""
    if v is not None and v.const is not None and v.const.size == 1:
        return v.const.reshape(()).item()
    return None




# ---- composite ops (produced by fusion passes; each has a decomposition) -------------------

@op("QuantMatMul")
class QuantMatMul:
    """QuantMatMul(x [..., K], w [N, K]) = x @ wᵀ with w kept in its stored block format.

    Decomposes to MatMul(x, Transpose(w)); backends that take the blocks (ONNX Runtime's
    MatMulNBits) read ``w.weight`` directly instead of a dequantized copy.
    """
    @staticmethod
    def infer(inputs, attrs):
        x, w = inputs
        return [TensorType(x.type.dtype, x.type.shape[:-1] + (w.type.shape[0],))]

    @staticmethod
    def compute(x, attrs):
        return [np.matmul(x[0], x[1].T)]




@op("RMSNorm", {"epsilon": REQUIRED, "offset": 0.0})
class RMSNorm:
    """RMSNorm(x, w) = x / sqrt(mean(x², last axis) + epsilon) * (w + offset).

    ``offset`` is gemma's 1 (its checkpoints store w where the model multiplies by 1 + w).
    Decomposes to Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul, Mul (and Add for the offset).
    """
    @staticmethod
    def infer(inputs, attrs):
        return [inputs[0].type]

    @staticmethod
    def compute(x, attrs):
        a, w = x
        var = np.mean(np.power(a, np.float32(2.0)), axis=-1, keepdims=True)
        inv = np.reciprocal(np.sqrt(var + np.float32(attrs["epsilon"])))
        scale = w + np.float32(attrs["offset"]) if attrs["offset"] else w
        return [((a * inv) * scale).astype(a.dtype)]




@op("Rotary")
class Rotary:
    """Rotary(x [b, h, s, d], cos [s, d/2], sin [s, d/2]): rotate-half rotary embedding.

    x·[cos, cos] + rotate_half(x)·[sin, sin], rotate_half(x) = [-x₂, x₁]. Decomposes to
    Slice, Neg, Concat, Mul, Add; ONNX Runtime runs it as RotaryEmbedding (opset 23).
    """
    @staticmethod
    def infer(inputs, attrs):
        return [inputs[0].type]

    @staticmethod
    def compute(x, attrs):
        a, cos, sin = x
        half = a.shape[-1] // 2
        c, s_ = np.concatenate([cos, cos], -1), np.concatenate([sin, sin], -1)
        rotated = np.concatenate([-a[..., half:], a[..., :half]], -1)
        return [(a * c + rotated * s_).astype(a.dtype)]




@op("Attention", {"scale": REQUIRED, "window": 0, "softcap": 0.0})
class Attention:
    """Causal grouped-query attention with a growing KV cache.

    Attention(q [b, H, s, d], k [b, KV, s, d], v [b, KV, s, d], past_k [b, KV, p, d],
    past_v [b, KV, p, d]) -> (out [b, s, H·d], present_k [b, KV, p+s, d], present_v).
    Query i (position p+i) sees keys j ≤ p+i, and with ``window`` only j > p+i-window. With
    ``softcap`` c (gemma2), the scaled scores become c·tanh(scores / c) before the mask. An
    optional sixth input, sinks [H] (gpt-oss), is a logit per head that joins each query's
    softmax as one more key with no value: it adds e^sink to the denominator.
    Decomposes to Concat, GQA repetition, MatMul, Mul, [Div, Tanh, Mul,] Add(mask), [Concat(sink),]
    Softmax, [Slice,] MatMul.
    """
    @staticmethod
    def infer(inputs, attrs):
        if len(inputs) not in (5, 6):
            raise ValueError(f"Attention takes 5 inputs (6 with sinks), not {len(inputs)}")
        q, k, v, pk, pv = inputs[:5]
        b, h, s, d = q.type.shape
        hd = h * d if isinstance(h, int) and isinstance(d, int) else None
        total = None
        present = TensorType(k.type.dtype, (pk.type.shape[0], pk.type.shape[1], total, pk.type.shape[3]))
        return [TensorType(q.type.dtype, (b, s, hd)), present, present]

    @staticmethod
    def compute(x, attrs):
        q, k, v, pk, pv = x[:5]
        b, h, s, d = q.shape
        kv = k.shape[1]
        pres_k = np.concatenate([pk, k], axis=2)
        pres_v = np.concatenate([pv, v], axis=2)
        p = pk.shape[2]
        rk = np.repeat(pres_k, h // kv, axis=1)
        rv = np.repeat(pres_v, h // kv, axis=1)
        scores = np.matmul(q, np.swapaxes(rk, -1, -2)) * np.float32(attrs["scale"])
        if attrs.get("softcap"):
            cap = np.float32(attrs["softcap"])
            scores = np.tanh(scores / cap) * cap
        qpos = p + np.arange(s)[:, None]
        kpos = np.arange(p + s)[None, :]
        allowed = kpos <= qpos
        if attrs["window"]:
            allowed &= kpos > qpos - attrs["window"]
        scores = np.where(allowed, scores, np.float32(np.finfo(np.float32).min))
        if len(x) == 6:
            # the sink: one more column per head, dropped after the softmax
            sink = np.broadcast_to(x[5].astype(scores.dtype).reshape(1, h, 1, 1), (b, h, s, 1))
            scores = np.concatenate([scores, sink], axis=-1)
        m = scores.max(-1, keepdims=True)
        e = np.exp(scores - m)
        probs = (e / e.sum(-1, keepdims=True))[..., :p + s]
        out = np.matmul(probs, rv).transpose(0, 2, 1, 3).reshape(b, s, h * d)
        return [out.astype(q.dtype), pres_k, pres_v]




@op("SkipRMSNorm", {"epsilon": REQUIRED, "offset": 0.0})
class SkipRMSNorm:
    """SkipRMSNorm(a, b, w) -> (RMSNorm(a + b, w), a + b): a residual add and the norm after it.

    Decomposes to Add and RMSNorm.
    """
    @staticmethod
    def infer(inputs, attrs):
        return [inputs[0].type, inputs[0].type]

    @staticmethod
    def compute(x, attrs):
        a, b, w = x
        total = (a + b).astype(a.dtype)
        return [RMSNorm.compute([total, w], attrs)[0], total]


# composite ops kept in their own modules register themselves on import
from . import ops_moe  # noqa: E402,F401

__all__ = ["REGISTRY", "OpDef", "op", "get", "infer_types", "compute", "broadcast_shapes", "scalar_value", "math"]
