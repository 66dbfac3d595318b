"""Q4_1: 32 four-bit codes (value = d * code + m), half scale d and half offset m."""
from __future__ import annotations

import numpy as np

from . import WeightFormat
from ._blocks import chunked, f16_bytes, pack_nibbles, quiet, unpack_nibbles
from ._legacy import affine_codes, weighted_affine_codes
from .layout import LEGACY_DM, BlockLayout, bias_m, f16, scale_d


def _unpack(b):
    return unpack_nibbles(b[:, 4:]), {"d": f16(b, 0), "m": f16(b, 2)}


class Q4_1(WeightFormat):
    name, block_size, type_size, gguf_type = "q4_1", 32, 20, 3

    layout = BlockLayout(group=32, planes=(4,), offset=0, params=LEGACY_DM, unpack=_unpack, scale=scale_d, bias=bias_m)

    @chunked
    @quiet
    def quantize_blocks(self, values):
        d, m, codes = affine_codes(np.asarray(values, dtype=np.float32), 4)
        return np.concatenate([f16_bytes(d), f16_bytes(m), pack_nibbles(codes)], axis=-1)

    @quiet
    def quantize_blocks_weighted(self, values, qw, row_sigma2):
        d, m, codes = weighted_affine_codes(values, qw, row_sigma2, 4)
        return np.concatenate([f16_bytes(d), f16_bytes(m), pack_nibbles(codes)], axis=-1)
