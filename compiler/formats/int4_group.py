"""int4_gN: 4-bit codes with a half scale and a 4-bit-plus integer zero point per N values.

The storage of GPTQ and AWQ checkpoints (``frontends/packed_int4.py`` reads them into it): a
value is ``scale · (code − zero)``. No GGUF type holds that exactly: Q4_1's ``d·q + m`` would
need ``m = −scale·zero`` rounded to a half, which moves every weight of a group by up to half
an ulp of m. Here the zero stays an integer, so every value is exact in float32 (a half's 11
significant bits times a difference of at most 5 bits), and the layout gives it as
``scale·code − scale·zero``: both products exact, their difference exactly the value.

A block is one group: the half scale (2 bytes), the zero (1 byte: GPTQ's v1 checkpoints read
zeros 1..16), then the N codes, two to a byte, the first half of the block in the low nibbles
(as Q4_0 packs its 32). The layout reads it in groups of 32 with the scale and zero spanning N,
as Q4_K spans its super-scale: the backends' kernels and MatMulNBits' blocks are 32 wide, and a
scale repeated over four of them is the same value.
"""
from __future__ import annotations

import numpy as np

from . import WeightFormat
from ._blocks import pack_nibbles, quiet, reciprocal_or_zero, unpack_nibbles
from .layout import BlockLayout, f16

#: the group sizes with a format; a checkpoint's groups of another multiple of 32 (or a row's
#: short last group) are stored in the largest of these that tiles them, each scale repeated
GROUPS = (256, 128, 64, 32)
HEADER = 3      # half scale + zero byte


def _unpack(b):
    return unpack_nibbles(b[:, HEADER:]), {"s": f16(b, 0), "z": np.ascontiguousarray(b[:, 2:3])}


def _scale(get, f32):
    return f32(get("s"))


def _zero_times_scale(get, f32):
    return f32(get("s")) * f32(get("z"))


def encode(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray) -> np.ndarray:
    """Blocks from their parts: codes uint8 [B, N] (0..15), scales float16 [B], zeros [B]
    (0..16, integers) -> uint8 [B, 3 + N/2]."""
    n = codes.shape[0]
    head = np.empty((n, HEADER), np.uint8)
    head[:, :2] = np.ascontiguousarray(scales, dtype=np.float16).reshape(n, 1).view(np.uint8)
    head[:, 2] = np.asarray(zeros).reshape(n).astype(np.uint8)
    return np.concatenate([head, pack_nibbles(codes.astype(np.uint8))], axis=1)


def name_for(group: int) -> str:
    return f"int4_g{group}"


@quiet
def _round_to_nearest(self, values):
    """Blocks by round-to-nearest over [min, max] (AWQ's rule before its search; kiln reads
    these blocks from checkpoints and makes them only for tests and fixtures): a half scale
    (max − min) / 15, the zero round(−min / scale) in 0..15."""
    values = np.asarray(values, dtype=np.float32)
    lo, hi = values.min(axis=1, keepdims=True), values.max(axis=1, keepdims=True)
    scale = ((hi - lo) / np.float32(15)).astype(np.float16)
    inv = reciprocal_or_zero(scale.astype(np.float32))
    zero = np.clip(np.rint(-lo * inv), 0, 15)
    codes = np.clip(np.rint(values * inv) + zero, 0, 15)
    return encode(codes.astype(np.uint8), scale[:, 0], zero[:, 0])


for _g in GROUPS:
    globals()[f"INT4_G{_g}"] = type(f"INT4_G{_g}", (WeightFormat,), {
        "name": name_for(_g), "block_size": _g, "type_size": HEADER + _g // 2, "__module__": __name__,
        "quantize_blocks": _round_to_nearest,
        "layout": BlockLayout(group=32, planes=(4,), offset=0, params=(("s", "float16", _g), ("z", "uint8", _g)),
                              unpack=_unpack, scale=_scale, bias=_zero_times_scale, subtract_bias=True)})

NAMES = frozenset(name_for(g) for g in GROUPS)
