"""GGUF blocks as ONNX Runtime's MatMulNBits operands, without requantizing.

MatMulNBits computes ``x @ ((code - zero_point) * scale)ᵀ`` per block of K. Each GGUF block of 32
maps onto one MatMulNBits block exactly:

| GGUF | value | MatMulNBits |
|---|---|---|
| q4_0 | d·(q − 8) | 4-bit, scale d, default zero point 8 |
| q8_0 | d·q, q signed | 8-bit, code q + 128, zero point 128 |
| q5_0 | d·(q − 16) | 8-bit, zero point 16 |
| q4_1 | d·q + m | 4-bit, zero point 0, plus m · (block sums of x) |
| q5_1 | d·q + m | 8-bit, zero point 0, plus m · (block sums of x) |
| q4_k | (d·s)·q − dmin·m per 32 | 4-bit, zero point 0, plus the min term |
| q5_k | (d·s)·q − dmin·m per 32, q 5-bit | 8-bit, zero point 0, plus the min term |
| q6_k | (d·s)·(q − 32) per 16 | 8-bit in blocks of 16, zero point 32 |
| int4_gN | s·q − s·z per N (GPTQ/AWQ) | 4-bit, zero point 0, plus −s·z · (block sums of x) |

8-bit operands are lowered as two exact 4-bit planes (``as_two_4bit_planes``). The table is
what each format's layout (``kiln.formats.layout``) gives: :func:`operands` reads the blocks
through it rather than decode them again here.

The ``+ m`` term goes through a small second product rather than float zero points, which
ORT serves on a slow path (DESIGN.md measured ~33× slower). Everything else is dequantized.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kiln.formats import int4_group

BLOCK = 32


@dataclass
class NBitsOperands:
    bits: int
    codes: np.ndarray              # uint8 [N, n_blocks, block], in element order
    scales: np.ndarray             # float32 [N, n_blocks]
    zero_points: np.ndarray | None  # uint8 [N, n_blocks]; None = the operator's default
    mins: np.ndarray | None        # float32 [N, n_blocks] added per block (affine formats)
    block: int = BLOCK             # MatMulNBits block_size (16 for Q6_K's sub-blocks)


#: the formats whose blocks (sub-blocks for the K-quants) map onto MatMulNBits blocks exactly;
#: Q2_K and Q3_K are dequantized for now (16-value sub-blocks with 4-bit scales)
REPACK = frozenset({"q4_0", "q4_1", "q8_0", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k"}) | int4_group.NAMES


def operands(fmt_name: str, raw: np.ndarray, n: int, k: int) -> NBitsOperands:
    """Repack a [n, k] weight's raw GGUF blocks (super-blocks split into their sub-blocks),
    read through the format's layout (``kiln.formats.layout``): codes as stored, one scale per
    group, the offset as zero point (the operator's default where it is 2^(bits-1)) and the
    bias as the min term."""
    from kiln import formats
    fmt = formats.get(fmt_name)
    layout = fmt.layout
    codes, params = layout.unpack(np.ascontiguousarray(raw).reshape(-1, fmt.type_size))
    scales, mins = layout.group_scales(params)
    bits = 4 if layout.bits <= 4 else 8
    block, nb = layout.group, k // layout.group
    zero_points = None if layout.offset == 1 << (bits - 1) else np.full((n, nb), layout.offset, dtype=np.uint8)
    return NBitsOperands(bits, codes.astype(np.uint8).reshape(n, nb, block), scales.astype(np.float32).reshape(n, nb),
                         zero_points, None if mins is None else mins.astype(np.float32).reshape(n, nb), block)


def as_two_4bit_planes(op: NBitsOperands) -> tuple[NBitsOperands, NBitsOperands]:
    """An 8-bit operand d·(c − z) as two exact 4-bit ones.

    With c = 16·hi + lo and z = 16·zh + zl: d·(c − z) = (16d)·(hi − zh) + d·(lo − zl), two
    4-bit products (scales 16d and d) that ORT runs fast at full precision; its 8-bit kernel
    is not. Q8_0 has z = 128 (its signed codes shifted), Q5_0 z = 16, Q5_1 and Q5_K z = 0.
    """
    c = op.codes
    n, nb, _ = c.shape
    z = op.zero_points if op.zero_points is not None else np.full((n, nb), 128, np.uint8)
    high = NBitsOperands(4, (c >> 4).astype(np.uint8), (op.scales * np.float32(16)).astype(np.float32),
                         (z >> 4).astype(np.uint8), None, op.block)
    low = NBitsOperands(4, (c & 15).astype(np.uint8), op.scales, (z & 15).astype(np.uint8), op.mins, op.block)
    return high, low


def min_into_zero_points(op: NBitsOperands) -> NBitsOperands:
    """An affine operand d·q + m (q in 0..15) as one 8-bit operand s·(c − z), for the fast mode.

    With s = d/k, c = k·q + c₀ and z = c₀ − round(k·m/d): s·(c − z) = d·q + (d/k)·round(k·m/d),
    so m moves by at most d/(2k). k is the largest of 16, 8, 4, 2, 1 for which c and z fit a
    byte (k = 16 unless a block's minimum lies far above zero): at most 1/32 of a step, 1/16 of
    the rounding Q4_1 itself makes. No min-term product remains. A block with d = 0 (constant
    m) is exact: scale m, code 1, zero point 0.
    """
    d = op.scales.astype(np.float64)
    m = op.mins.astype(np.float64)
    q = op.codes.astype(np.int32)
    n, nb, blk = q.shape
    safe_d = np.where(d == 0, 1.0, d)
    k = np.zeros((n, nb))
    t = np.zeros((n, nb))
    for cand in (16, 8, 4, 2, 1):
        tc = np.rint(cand * m / safe_d)
        fits = (np.maximum(tc, 0) <= np.minimum(255 + tc, 255 - 15 * cand)) & (k == 0)
        k = np.where(fits, cand, k)
        t = np.where(fits, tc, t)
    if (k == 0).any() & (d != 0).any():
        raise ValueError("a block's minimum lies too far from zero for an 8-bit zero point")
    c0 = np.maximum(t, 0)
    codes = k[..., None] * q + c0[..., None]
    zp = c0 - t
    scales = d / np.where(k == 0, 1, k)
    const = d == 0
    codes = np.where(const[..., None], 1, codes)
    zp = np.where(const, 0, zp)
    scales = np.where(const, m, scales)
    return NBitsOperands(8, codes.astype(np.uint8), scales.astype(np.float32), zp.astype(np.uint8), None, op.block)


def pack_codes(bits: int, codes: np.ndarray) -> np.ndarray:
    """MatMulNBits' B: codes packed low-first along K, [N, n_blocks, 32 * bits / 8]."""
    if bits == 8:
        return codes
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def pack_zero_points(bits: int, zp: np.ndarray) -> np.ndarray:
    """Zero points flattened per row; 4-bit ones two to a byte, low first, rows padded."""
    if bits == 8:
        return zp.reshape(-1)
    n, nb = zp.shape
    if nb % 2:
        zp = np.concatenate([zp, np.zeros((n, 1), np.uint8)], axis=1)
    return (zp[:, 0::2] | (zp[:, 1::2] << 4)).astype(np.uint8).reshape(-1)


def supported(fmt_name: str, k: int) -> bool:
    from kiln import formats
    return fmt_name in REPACK and k % formats.get(fmt_name).block_size == 0
