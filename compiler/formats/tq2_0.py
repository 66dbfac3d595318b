"""TQ2_0: ternary weights (BitNet b1.58 style), 256 per block as 2-bit codes 0..2 meaning
-1, 0, +1, times one half scale d = absmax. Layout (66 bytes): qs[64] in the K-quant 2-bit
order (byte l of each 32-byte group holds elements l, l+32, l+64, l+96), then d.
"""
from __future__ import annotations

import numpy as np

from . import WeightFormat
from ._blocks import QK_K, chunked, crumbs, f16_at, f16_bytes, pack_crumbs, quiet
from ._ternary import ternary_codes


class TQ2_0(WeightFormat):
    name, block_size, type_size, gguf_type = "tq2_0", QK_K, 66, 35

    @quiet
    def dequantize_blocks(self, blocks):
        trits = crumbs(blocks[:, :64], 2).astype(np.int8) - np.int8(1)
        return f16_at(blocks, 64) * trits.astype(np.float32)

    @chunked
    @quiet
    def quantize_blocks(self, values):
        d, codes = ternary_codes(np.asarray(values, dtype=np.float32))
        return np.concatenate([pack_crumbs(codes, 2), f16_bytes(d)], axis=1)
