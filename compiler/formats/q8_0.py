"""Q8_0: 32 int8 codes and one half scale (d = absmax / 127)."""
from __future__ import annotations

import numpy as np

from . import WeightFormat
from ._blocks import F32, chunked, f16_bytes, quiet, reciprocal_or_zero, round_half_away
from .layout import LEGACY_D, BlockLayout, f16, scale_d


def _unpack(b):
    # signed codes stored shifted by 128, so every code is unsigned
    return (b[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8), {"d": f16(b, 0)}


class Q8_0(WeightFormat):
    name, block_size, type_size, gguf_type = "q8_0", 32, 34, 8

    layout = BlockLayout(group=32, planes=(8,), offset=128, params=LEGACY_D, unpack=_unpack, scale=scale_d)

    @chunked
    @quiet
    def quantize_blocks(self, values):
        values = np.asarray(values, dtype=np.float32)
        d = np.abs(values).max(axis=-1, keepdims=True) / F32(127)
        # the reference scales by the float32 d, not by the half it stores
        codes = round_half_away(values * reciprocal_or_zero(d)).astype(np.int8)
        return np.concatenate([f16_bytes(d), codes.view(np.uint8)], axis=-1)
