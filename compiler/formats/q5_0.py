"""Q5_0: 32 five-bit codes (value = d * (code - 16)), a half scale, and the codes' fifth bits
gathered into one little-endian uint32 (bit i belongs to element i)."""
from __future__ import annotations

import numpy as np

from . import WeightFormat
from ._blocks import bits_to_u32_bytes, chunked, f16_bytes, pack_nibbles, quiet, u32_bytes_to_bits, unpack_nibbles
from ._legacy import symmetric_codes, weighted_symmetric_codes
from .layout import LEGACY_D, BlockLayout, f16, scale_d


def _unpack(b):
    return unpack_nibbles(b[:, 6:]) | (u32_bytes_to_bits(b[:, 2:6]) << 4), {"d": f16(b, 0)}


class Q5_0(WeightFormat):
    name, block_size, type_size, gguf_type = "q5_0", 32, 22, 6

    layout = BlockLayout(group=32, planes=(4, 1), offset=16, params=LEGACY_D, unpack=_unpack, scale=scale_d)

    @chunked
    @quiet
    def quantize_blocks(self, values):
        d, codes = symmetric_codes(np.asarray(values, dtype=np.float32), 5)
        return np.concatenate([f16_bytes(d), bits_to_u32_bytes(codes >> 4), pack_nibbles(codes)], axis=-1)

    @quiet
    def quantize_blocks_weighted(self, values, qw, row_sigma2):
        d, codes = weighted_symmetric_codes(values, qw, row_sigma2, 5)
        return np.concatenate([f16_bytes(d), bits_to_u32_bytes(codes >> 4), pack_nibbles(codes)], axis=-1)
