"""Q4_0: 32 four-bit codes (value = d * (code - 8)) and one half scale."""
from __future__ import annotations

import numpy as np

from . import WeightFormat
from ._blocks import chunked, f16_bytes, pack_nibbles, quiet, unpack_nibbles
from ._legacy import symmetric_codes, weighted_symmetric_codes
from .layout import LEGACY_D, BlockLayout, f16, scale_d


def _unpack(b):
    return unpack_nibbles(b[:, 2:]), {"d": f16(b, 0)}


class Q4_0(WeightFormat):
    name, block_size, type_size, gguf_type = "q4_0", 32, 18, 2

    layout = BlockLayout(group=32, planes=(4,), offset=8, params=LEGACY_D, unpack=_unpack, scale=scale_d)

    @chunked
    @quiet
    def quantize_blocks(self, values):
        d, codes = symmetric_codes(np.asarray(values, dtype=np.float32), 4)
        return np.concatenate([f16_bytes(d), pack_nibbles(codes)], axis=-1)

    @quiet
    def quantize_blocks_weighted(self, values, qw, row_sigma2):
        d, codes = weighted_symmetric_codes(values, qw, row_sigma2, 4)
        return np.concatenate([f16_bytes(d), pack_nibbles(codes)], axis=-1)
