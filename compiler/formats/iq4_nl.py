"""IQ4_NL: Q4_0's layout (half d, 32 nibbles) with a non-linear codebook: value = d * K[code],
K an int8 table denser near zero, where weights cluster."""
from __future__ import annotations

import numpy as np

from . import WeightFormat
from ._blocks import f16_at, quiet, unpack_nibbles

CODEBOOK = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8)


class IQ4_NL(WeightFormat):
    name, block_size, type_size, gguf_type = "iq4_nl", 32, 18, 20

    @quiet
    def dequantize_blocks(self, blocks):
        values = CODEBOOK[unpack_nibbles(blocks[:, 2:])].astype(np.float32)
        return f16_at(blocks, 0) * values
