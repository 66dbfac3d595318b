"""The stored layout of a GGUF block weight for the TVM kernels, and the TIR expressions that
read one weight back (:mod:`.quant_kernels` builds the matmuls and lookups on them). What a
block holds and how its values are made is the format's own layout (``kiln.formats.layout``):
this module only tiles it and writes its scale and bias as TIR.

Layout. Rows go in tiles of 16 (the last tile padded with zero rows): every array is
``[tiles, X, 16]`` with entry ``[t, x, l]`` belonging to row ``16·t + l``, so 16 rows' values
for one k are one contiguous vector (and 16 GPU threads read 64 contiguous bytes). A weight's
unsigned codes are split into bit planes, low bits first (``bits4`` + ``bits1`` for five-bit
codes, ``bits4`` + ``bits2`` for Q6_K, ``bits2`` + ``bits1`` for Q3_K, ``bits8`` for Q8_0): a
plane of width b packs the 32/b consecutive k's of a uint32 word, k at bit ``(k mod 32/b)·b``.
The scales stay as GGUF has them: float16 ``d``/``m``/``dmin`` and the integer sub-block scales
(``sc``, ``mn``) unpacked to one byte each. Nothing is dequantized ahead of time; the arrays
are about the size of the GGUF blocks (the unpacked 6-bit K-quant scales add 1/16 to 1/32 bit
per weight).

Arithmetic. Every kernel computes a weight exactly as ``gguf.quants.dequantize`` does, in
float32: ``scale · (code − offset) [+ bias]`` with ``scale = d`` (legacy formats) or
``d · sc`` (K-quants, one float32 product), ``bias = m`` (Q4_1, Q5_1) or ``−(dmin · mn)``
(Q2_K, Q4_K, Q5_K); then multiplies it by x in float32 and sums. Every ``scale · code``
product is exact in float32 (a half's 11 significant bits times at most 13 bits of integers),
so the weight is bit for bit gguf's even where LLVM fuses the bias into a multiply-add (the
lookups are checked for equality). Only the order of the additions of the products (and
LLVM's fused multiply-adds there) differs from numpy's ``x @ dequantize(w).T``. Formats with
no bias and one scale per 32 k's (Q4_0, Q8_0) are the exception on AVX-512: their exact GEMV
sums ``(code − offset) · x`` over the group in float32 and multiplies the sum by the scale
(``scale_after_sum`` in :mod:`.quant_kernels`), one multiply per group instead of one per
weight; the result is the same sum to float32 rounding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from kiln.formats import all_formats

LANES = 16          # rows per tile: the layout's vector
CHUNK = 32          # k's per step of the CPU kernels (a multiple of every plane's and scale's span)


# ---- formats ----------------------------------------------------------------------------

@dataclass(frozen=True)
class _Format:
    """A format's layout (``kiln.formats.layout``) as the kernels read it: its scale and bias
    as TIR expressions of ``get(name)``, the bias always added."""
    name: str
    block: int                          # GGUF block size
    group: int                          # elements sharing one scale (and bias)
    planes: tuple                       # code bit widths, low bits first
    offset: int                         # value = scale · (code − offset) [+ bias]
    params: tuple                       # (name, dtype, elements per entry along k)
    scale: Callable                     # get(name) -> float32 PrimExpr
    bias: Callable | None
    decode: Callable                    # blocks -> (codes uint8 [B, block], {param: [B, block/per]})


def _f32(e):
    from tvm import tirx
    return tirx.Cast("float32", e)


def _of(fmt) -> _Format:
    layout = fmt.layout
    return _Format(fmt.name, fmt.block_size, layout.group, layout.planes, layout.offset, layout.params,
                   lambda get: layout.scale(get, _f32),
                   (lambda get: layout.added_bias(get, _f32)) if layout.bias else None, layout.unpack)


#: every block format with a layout has fused CPU and GPU kernels; the others (iq*, tq*, mxfp4)
#: are not fused: the lowering stores those dequantized.
_FORMATS = {name: _of(fmt) for name, fmt in sorted(all_formats().items()) if fmt.layout is not None}
SUPPORTED = frozenset(_FORMATS)


def _array_names(spec: _Format) -> list[str]:
    return [f"bits{b}" for b in spec.planes] + [p[0] for p in spec.params]


def _array_shapes(spec: _Format, n: int, k: int) -> list[tuple]:
    tiles = _tiles(n)
    return ([(tiles, k * b // 32, LANES) for b in spec.planes]
            + [(tiles, k // per, LANES) for _, _, per in spec.params])


def _array_dtypes(spec: _Format) -> list[str]:
    return ["uint32"] * len(spec.planes) + [p[1] for p in spec.params]


def _tiles(n: int) -> int:
    return -(-n // LANES)


def _check(fmt: str, n: int, k: int, origin=None) -> _Format:
    from kiln.errors import KilnError
    spec = _FORMATS.get(fmt)
    if spec is None:
        raise KilnError(origin, f"no fused TVM kernel for weight format {fmt!r}; fused: {', '.join(sorted(SUPPORTED))}")
    if n <= 0 or k <= 0 or k % spec.block:
        raise KilnError(origin, f"a {fmt} weight of shape [{n}, {k}]: k must be a positive multiple of {spec.block}")
    return spec


# ---- pack ---------------------------------------------------------------------------------

_PACK_ROWS = 4096   # rows repacked at a time: bounds the temporaries for a large embedding


def pack(weight) -> dict[str, np.ndarray]:
    """The arrays stored for a [n, k] block weight: its codes as bit planes and its scales,
    tiled by 16 rows (see the module docstring). Keeps every block quantized."""
    from kiln.errors import KilnError
    if len(weight.shape) != 2:
        raise KilnError(weight.origin or None, f"weight {weight.name or '?'}: fused quantized kernels take 2-D weights, not {list(weight.shape)}")
    n, k = weight.shape
    spec = _check(weight.format.name, n, k, weight.origin or None)
    tiles = _tiles(n)
    out = {name: np.zeros(shape, dtype) for name, shape, dtype
           in zip(_array_names(spec), _array_shapes(spec, n, k), _array_dtypes(spec))}
    raw = weight.raw()
    per_row = k // spec.block
    for a in range(0, n, _PACK_ROWS):
        b = min(n, a + _PACK_ROWS)
        codes, params = spec.decode(np.ascontiguousarray(raw[a:b]).reshape((b - a) * per_row, -1))
        codes = codes.reshape(b - a, k)
        t0, t1 = a // LANES, -(-b // LANES)
        shift = 0
        for width in spec.planes:
            field = (codes >> shift) & ((1 << width) - 1)
            shift += width
            per = 32 // width
            words = field.reshape(b - a, k // per, per).astype(np.uint32) << (np.arange(per, dtype=np.uint32) * width)
            _put_tiles(out[f"bits{width}"], t0, t1, a, np.bitwise_or.reduce(words, axis=-1))
        for name, dtype, per in spec.params:
            _put_tiles(out[name], t0, t1, a, params[name].reshape(b - a, k // per).astype(dtype))
    assert all(v.shape[0] == tiles for v in out.values())
    return out


def _put_tiles(dst: np.ndarray, t0: int, t1: int, row0: int, rows: np.ndarray) -> None:
    """Write rows [row0, row0 + len) (row0 a multiple of 16) into tiles t0..t1 of dst [tiles, X, 16]."""
    padded = np.zeros(((t1 - t0) * LANES, rows.shape[1]), dst.dtype)
    padded[:len(rows)] = rows
    dst[t0:t1] = padded.reshape(t1 - t0, LANES, -1).transpose(0, 2, 1)


# ---- TIR expressions of one weight --------------------------------------------------------

def _split(u, unit: int, kk, per: int):
    """k = u·unit + kk (kk a Python int below unit, or an expression): the index of k's entry
    in an array with ``per`` k's an entry, and k's position in that entry."""
    if isinstance(kk, int) and unit % per == 0:
        return u * (unit // per) + kk // per, kk % per
    if isinstance(kk, int) and per % unit == 0:
        return u // (per // unit), (u % (per // unit)) * unit + kk
    k = u * unit + kk
    return k // per, k % per


class _Weights:
    """TIR expressions for the weights of one format, given the kernel's buffers."""

    def __init__(self, spec: _Format, bufs: list):
        self.spec = spec
        names = _array_names(spec)
        self.bufs = dict(zip(names, bufs))

    def code(self, t, u, unit: int, kk, lane):
        from tvm import tirx
        code, shift = None, 0
        for width in self.spec.planes:
            idx, pos = _split(u, unit, kk, 32 // width)
            word = self.bufs[f"bits{width}"][t, idx, lane]
            amount = tirx.const(pos * width, "uint32") if isinstance(pos, int) else tirx.Cast("uint32", pos * width)
            field = tirx.bitwise_and(tirx.shift_right(word, amount), tirx.const((1 << width) - 1, "uint32"))
            if shift:
                field = tirx.shift_left(field, tirx.const(shift, "uint32"))
            code = field if code is None else tirx.bitwise_or(code, field)
            shift += width
        return code

    def scale_bias(self, t, u, unit: int, kk, lane):
        """(scale, bias or None) of the group that holds k = u·unit + kk."""
        def get(name):
            per = next(p for n_, _, p in self.spec.params if n_ == name)
            return self.bufs[name][t, _split(u, unit, kk, per)[0], lane]
        return self.spec.scale(get), (self.spec.bias(get) if self.spec.bias else None)

    def combine(self, scale, bias, code):
        from tvm import tirx
        q = tirx.Cast("int32", code)
        if self.spec.offset:
            q = q - tirx.const(self.spec.offset, "int32")
        w = scale * tirx.Cast("float32", q)
        return w if bias is None else w + bias

    def value(self, t, u, unit: int, kk, lane):
        scale, bias = self.scale_bias(t, u, unit, kk, lane)
        return self.combine(scale, bias, self.code(t, u, unit, kk, lane))
