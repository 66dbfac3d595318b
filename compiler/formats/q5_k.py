"""Q5_K: Q4_K with a fifth bit per code: value = d * scale * code - dmin * min, code 0..31.

Layout (176 bytes): d, dmin, the 12-byte scale/min block, qh[32], qs[128]. qs holds the low
four bits as in Q4_K; bit e // 32 of qh[e % 32] is the fifth bit of element e.
"""
from __future__ import annotations

import numpy as np

from . import WeightFormat
from ._blocks import QK_K, chunked, crumbs, pack_crumbs, pack_nibbles, quiet, unpack_nibbles
from ._kquant import affine_blocks, affine_blocks_weighted, unpack_scale_min
from .layout import AFFINE_K, BlockLayout, f16, min_dmin_mn, scale_d_sc


def _unpack(b):
    sc, mn = unpack_scale_min(b[:, 4:16])
    codes = unpack_nibbles(b[:, 48:], group=32) | (crumbs(b[:, 16:48], 1) << 4)
    return codes, {"sc": sc, "mn": mn, "d": f16(b, 0), "dmin": f16(b, 2)}


class Q5_K(WeightFormat):
    name, block_size, type_size, gguf_type = "q5_k", QK_K, 176, 13

    layout = BlockLayout(group=32, planes=(4, 1), offset=0, params=AFFINE_K, unpack=_unpack, scale=scale_d_sc,
                         bias=min_dmin_mn, subtract_bias=True)

    @chunked
    @quiet
    def quantize_blocks(self, values):
        # llama.cpp's search parameters for Q5_K: 16 candidate scales from (31 - 0.5) to (31 + 1)
        head, L = affine_blocks(np.asarray(values, dtype=np.float32), nmax=31, rmin=-0.5, rdelta=0.1, nstep=15)
        return np.concatenate([head, pack_crumbs(L >> 4, 1), pack_nibbles(L, group=32)], axis=1)

    @quiet
    def quantize_blocks_weighted(self, values, qw, row_sigma2):
        head, L = affine_blocks_weighted(values, qw, nmax=31)
        return np.concatenate([head, pack_crumbs(L >> 4, 1), pack_nibbles(L, group=32)], axis=1)
