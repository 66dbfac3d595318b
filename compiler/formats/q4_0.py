"""Q4_0: 32 four-bit codes (value = d * (code - 8)) and one half scale."""
from __future__ import annotations

import numpy as np

from . import WeightFormat
from ._blocks import chunked, f16_at, f16_bytes, pack_nibbles, quiet, unpack_nibbles
from ._legacy import symmetric_codes, weighted_symmetric_codes


class Q4_0(WeightFormat):
    name, block_size, type_size, gguf_type = "q4_0", 32, 18, 2

    @quiet
    def dequantize_blocks(self, blocks):
        codes = unpack_nibbles(blocks[:, 2:]).astype(np.int8) - np.int8(8)
        return f16_at(blocks, 0) * codes.astype(np.float32)

    @chunked
    @quiet
    def quantize_blocks(self, values):
        d, codes = symmetric_codes(np.asarray(values, dtype=np.float32), 4)
        return np.concatenate([f16_bytes(d), pack_nibbles(codes)], axis=-1)

    @quiet
    def quantize_blocks_weighted(self, values, qw, row_sigma2):
        d, codes = weighted_symmetric_codes(values, qw, row_sigma2, 4)
        return np.concatenate([f16_bytes(d), pack_nibbles(codes)], axis=-1)
