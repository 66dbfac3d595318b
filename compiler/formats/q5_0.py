"""Q5_0: 32 five-bit codes (value = d * (code - 16)), a half scale, and the codes' fifth bits
gathered into one little-endian uint32 (bit i belongs to element i)."""
from __future__ import annotations

import numpy as np

from . import WeightFormat
from ._blocks import (
    bits_to_u32_bytes, chunked, f16_at, f16_bytes, pack_nibbles, quiet, u32_bytes_to_bits,
    unpack_nibbles,
)
from ._legacy import symmetric_codes, weighted_symmetric_codes


class Q5_0(WeightFormat):
    name, block_size, type_size, gguf_type = "q5_0", 32, 22, 6

    @quiet
    def dequantize_blocks(self, blocks):
        codes = unpack_nibbles(blocks[:, 6:]) | (u32_bytes_to_bits(blocks[:, 2:6]) << 4)
        return f16_at(blocks, 0) * (codes.astype(np.int8) - np.int8(16)).astype(np.float32)

    @chunked
    @quiet
    def quantize_blocks(self, values):
        d, codes = symmetric_codes(np.asarray(values, dtype=np.float32), 5)
        return np.concatenate([f16_bytes(d), bits_to_u32_bytes(codes >> 4), pack_nibbles(codes)], axis=-1)

    @quiet
    def quantize_blocks_weighted(self, values, qw, row_sigma2):
        d, codes = weighted_symmetric_codes(values, qw, row_sigma2, 5)
        return np.concatenate([f16_bytes(d), bits_to_u32_bytes(codes >> 4), pack_nibbles(codes)], axis=-1)
