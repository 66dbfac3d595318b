"""TQ1_0: ternary weights packed five (or four) trits to a byte, 1.6875 bits per weight.

A byte holding trits t0..t4 (t0 most significant, each 0..2 for -1, 0, +1) stores
ceil(256 * sum(t_k * 3**(4-k)) / 243): the base-3 fraction scaled to a byte, so that trit k
comes back as the top "digit" of (byte * 3**k mod 256) * 3 / 256.
Layout (54 bytes): qs[48] (bytes 0-31: elements 32k + l for k < 5; bytes 32-47: elements
160 + 16k + l), qh[4] (elements 240 + 4k + l, four trits each), d (half, = absmax).
"""
from __future__ import annotations

import numpy as np

from . import WeightFormat
from ._blocks import QK_K, chunked, f16_at, f16_bytes, quiet
from ._ternary import ternary_codes

# (trits per byte, bytes in the run) for the three runs of a block
_RUNS = ((5, 32), (5, 16), (4, 4))


def _unpack(run: np.ndarray, trits: int) -> np.ndarray:
    """uint8 [n, m] -> trits 0..2 [n, trits * m], trit k of byte l at k * m + l."""
    powers = (3 ** np.arange(trits)).astype(np.uint8)
    shifted = run[:, None, :] * powers[None, :, None]   # uint8 on purpose: wraps mod 256
    return ((shifted.astype(np.uint16) * 3) >> 8).reshape(run.shape[0], trits * run.shape[1])


def _pack(codes: np.ndarray, trits: int) -> np.ndarray:
    """trits [n, trits * m] (trit k of byte l at k * m + l) -> uint8 [n, m]."""
    n = codes.shape[0]
    weights = (3 ** np.arange(4, 4 - trits, -1)).astype(np.uint8)
    digits = codes.reshape(n, trits, codes.shape[1] // trits) * weights[None, :, None]
    value = digits.sum(axis=1, dtype=np.int64).astype(np.uint16)
    return ((value * 256 + 242) // 243).astype(np.uint8)


class TQ1_0(WeightFormat):
    name, block_size, type_size, gguf_type = "tq1_0", QK_K, 54, 34

    @quiet
    def dequantize_blocks(self, blocks):
        parts, start = [], 0
        for trits, size in _RUNS:
            parts.append(_unpack(blocks[:, start:start + size], trits))
            start += size
        codes = np.concatenate(parts, axis=1).astype(np.int8) - np.int8(1)
        return f16_at(blocks, 52) * codes.astype(np.float32)

    @chunked
    @quiet
    def quantize_blocks(self, values):
        d, codes = ternary_codes(np.asarray(values, dtype=np.float32))
        parts, start = [], 0
        for trits, size in _RUNS:
            parts.append(_pack(codes[:, start:start + trits * size], trits))
            start += trits * size
        return np.concatenate(parts + [f16_bytes(d)], axis=1)
