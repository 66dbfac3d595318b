"""Q4_K: super-blocks of 256 four-bit codes in 8 sub-blocks of 32, each with a 6-bit scale
and a 6-bit min under two half super-scales: value = d * scale * code - dmin * min.

Layout (144 bytes): d, dmin (halves), the 12-byte scale/min block (see ``_kquant``), qs[128]:
each run of 64 elements takes 32 bytes, its first 32 in the low nibbles.
"""
from __future__ import annotations

import numpy as np

from . import WeightFormat
from ._blocks import QK_K, chunked, pack_nibbles, quiet, unpack_nibbles
from ._kquant import affine_blocks, affine_blocks_weighted, unpack_scale_min
from .layout import AFFINE_K, BlockLayout, f16, min_dmin_mn, scale_d_sc


def _unpack(b):
    sc, mn = unpack_scale_min(b[:, 4:16])
    return unpack_nibbles(b[:, 16:], group=32), {"sc": sc, "mn": mn, "d": f16(b, 0), "dmin": f16(b, 2)}


class Q4_K(WeightFormat):
    name, block_size, type_size, gguf_type = "q4_k", QK_K, 144, 12

    layout = BlockLayout(group=32, planes=(4,), offset=0, params=AFFINE_K, unpack=_unpack, scale=scale_d_sc,
                         bias=min_dmin_mn, subtract_bias=True)

    @chunked
    @quiet
    def quantize_blocks(self, values):
        # llama.cpp's search parameters for Q4_K: 21 candidate scales from (15 - 1) to (15 + 1)
        head, L = affine_blocks(np.asarray(values, dtype=np.float32), nmax=15, rmin=-1.0, rdelta=0.1, nstep=20)
        return np.concatenate([head, pack_nibbles(L, group=32)], axis=1)

    @quiet
    def quantize_blocks_weighted(self, values, qw, row_sigma2):
        head, L = affine_blocks_weighted(values, qw, nmax=15)
        return np.concatenate([head, pack_nibbles(L, group=32)], axis=1)
