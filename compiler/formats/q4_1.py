"""Q4_1: 32 four-bit codes (value = d * code + m), half scale d and half offset m."""
from __future__ import annotations

import numpy as np

from . import WeightFormat
from ._blocks import chunked, f16_at, f16_bytes, pack_nibbles, quiet, unpack_nibbles
from ._legacy import affine_codes, weighted_affine_codes


class Q4_1(WeightFormat):
    name, block_size, type_size, gguf_type = "q4_1", 32, 20, 3

    @quiet
    def dequantize_blocks(self, blocks):
        codes = unpack_nibbles(blocks[:, 4:]).astype(np.float32)
        return f16_at(blocks, 0) * codes + f16_at(blocks, 2)

    @chunked
    @quiet
    def quantize_blocks(self, values):
        d, m, codes = affine_codes(np.asarray(values, dtype=np.float32), 4)
        return np.concatenate([f16_bytes(d), f16_bytes(m), pack_nibbles(codes)], axis=-1)

    @quiet
    def quantize_blocks_weighted(self, values, qw, row_sigma2):
        d, m, codes = weighted_affine_codes(values, qw, row_sigma2, 4)
        return np.concatenate([f16_bytes(d), f16_bytes(m), pack_nibbles(codes)], axis=-1)
