"""Q5_1: 32 five-bit codes (value = d * code + m), half d and m, fifth bits as in Q5_0."""
from __future__ import annotations

import numpy as np

from . import WeightFormat
from ._blocks import bits_to_u32_bytes, chunked, f16_bytes, pack_nibbles, quiet, u32_bytes_to_bits, unpack_nibbles
from ._legacy import affine_codes, weighted_affine_codes
from .layout import LEGACY_DM, BlockLayout, bias_m, f16, scale_d


def _unpack(b):
    return unpack_nibbles(b[:, 8:]) | (u32_bytes_to_bits(b[:, 4:8]) << 4), {"d": f16(b, 0), "m": f16(b, 2)}


class Q5_1(WeightFormat):
    name, block_size, type_size, gguf_type = "q5_1", 32, 24, 7

    layout = BlockLayout(group=32, planes=(4, 1), offset=0, params=LEGACY_DM, unpack=_unpack, scale=scale_d, bias=bias_m)

    @chunked
    @quiet
    def quantize_blocks(self, values):
        d, m, codes = affine_codes(np.asarray(values, dtype=np.float32), 5)
        return np.concatenate([f16_bytes(d), f16_bytes(m), bits_to_u32_bytes(codes >> 4), pack_nibbles(codes)], axis=-1)

    @quiet
    def quantize_blocks_weighted(self, values, qw, row_sigma2):
        d, m, codes = weighted_affine_codes(values, qw, row_sigma2, 5)
        return np.concatenate([f16_bytes(d), f16_bytes(m), bits_to_u32_bytes(codes >> 4), pack_nibbles(codes)], axis=-1)
