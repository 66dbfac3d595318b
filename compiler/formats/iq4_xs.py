"""IQ4_XS: IQ4_NL's codebook in 256-element super-blocks of 8 sub-blocks of 32, each with a
6-bit signed scale: value = d * (scale - 32) * K[code].

Layout (136 bytes): d (half), scales_h (uint16: top two bits of scale j at bit 2j),
scales_l[4] (low nibble of scale j in byte j // 2, low nibble first), qs[128] (16 bytes per
sub-block, its first 16 codes in the low nibbles).
"""
from __future__ import annotations

import numpy as np

from . import WeightFormat
from ._blocks import QK_K, f16_at, quiet, unpack_nibbles
from .iq4_nl import CODEBOOK

_HIGH_SHIFTS = np.arange(0, 16, 2, dtype=np.uint16)


class IQ4_XS(WeightFormat):
    name, block_size, type_size, gguf_type = "iq4_xs", QK_K, 136, 23

    @quiet
    def dequantize_blocks(self, blocks):
        n = blocks.shape[0]
        high = ((np.ascontiguousarray(blocks[:, 2:4]).view(np.uint16) >> _HIGH_SHIFTS) & 3).astype(np.uint8)
        low = unpack_nibbles(blocks[:, 4:8], group=1)
        scales = (low | (high << 4)).astype(np.int8) - np.int8(32)
        dl = (f16_at(blocks, 0) * scales.astype(np.float32))[:, :, None]
        values = CODEBOOK[unpack_nibbles(blocks[:, 8:], group=16)].astype(np.float32)
        return (dl * values.reshape(n, 8, 32)).reshape(n, QK_K)
