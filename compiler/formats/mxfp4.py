"""MXFP4 (OCP microscaling): 32 FP4 (E2M1) values sharing one power-of-two scale.

Layout (17 bytes): e (E8M0 exponent byte), qs[16] (Q4_0 nibble order). ggml keeps the E2M1
values doubled as integers (0, 1, 2, 3, 4, 6, 8, 12 and negatives), so the scale applied is
half of 2**(e - 127).
"""
from __future__ import annotations

import numpy as np

from . import WeightFormat
from ._blocks import chunked, pack_nibbles, quiet, unpack_nibbles

E2M1_DOUBLED = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.int8)


def half_scale(e: np.ndarray) -> np.ndarray:
    """2**(e - 128) as float32, built from bits: exponents 0 and 1 give subnormals."""
    e = e.astype(np.uint32)
    bits = np.where(e < 2, np.uint32(0x00200000) << e, (e - np.uint32(1)) << np.uint32(23))
    return bits.astype(np.uint32).view(np.float32)


class MXFP4(WeightFormat):
    name, block_size, type_size, gguf_type = "mxfp4", 32, 17, 39

    @quiet
    def dequantize_blocks(self, blocks):
        values = E2M1_DOUBLED[unpack_nibbles(blocks[:, 1:])].astype(np.float32)
        return half_scale(blocks[:, :1]) * values

    @chunked
    @quiet
    def quantize_blocks(self, values):
        x = np.asarray(values, dtype=np.float32)
        amax = np.abs(x).max(axis=1, keepdims=True)
        # the OCP rule: shared exponent floor(log2(amax)) minus 2, the largest E2M1 exponent
        e = np.where(amax > 0, np.floor(np.log2(amax)) - 2 + 127, 0).astype(np.uint8)
        d = half_scale(e)
        err = np.abs(d[:, :, None] * E2M1_DOUBLED.astype(np.float32) - x[:, :, None])
        codes = err.argmin(axis=-1).astype(np.uint8)  # first best: +0 over -0, lower over upper
        return np.concatenate([e, pack_nibbles(codes)], axis=1)
