"""Q5_1: 32 five-bit codes (value = d * code + m), half d and m, fifth bits as in Q5_0."""
from __future__ import annotations

import numpy as np

from . import WeightFormat
from ._blocks import (
    bits_to_u32_bytes, chunked, f16_at, f16_bytes, pack_nibbles, quiet, u32_bytes_to_bits,
    unpack_nibbles,
)
from ._legacy import affine_codes, weighted_affine_codes


class Q5_1(WeightFormat):
    name, block_size, type_size, gguf_type = "q5_1", 32, 24, 7

    @quiet
    def dequantize_blocks(self, blocks):
        codes = unpack_nibbles(blocks[:, 8:]) | (u32_bytes_to_bits(blocks[:, 4:8]) << 4)
        return f16_at(blocks, 0) * codes.astype(np.float32) + f16_at(blocks, 2)

    @chunked
    @quiet
    def quantize_blocks(self, values):
        d, m, codes = affine_codes(np.asarray(values, dtype=np.float32), 5)
        return np.concatenate([f16_bytes(d), f16_bytes(m), bits_to_u32_bytes(codes >> 4), pack_nibbles(codes)], axis=-1)

    @quiet
    def quantize_blocks_weighted(self, values, qw, row_sigma2):
        d, m, codes = weighted_affine_codes(values, qw, row_sigma2, 5)
        return np.concatenate([f16_bytes(d), f16_bytes(m), bits_to_u32_bytes(codes >> 4), pack_nibbles(codes)], axis=-1)
