"""Q6_K: super-blocks of 256 six-bit codes in 16 sub-blocks of 16, each with an int8 scale
under one half super-scale: value = d * scale * (code - 32).

Layout (210 bytes): ql[128] low nibbles, qh[64] high crumbs, scales[16] int8, d (half).
Each half of 128 elements uses 64 bytes of ql (elements 0-63 in the low nibbles, 64-127 in
the high) and 32 bytes of qh (byte l holds the top two bits of elements l, l+32, l+64, l+96).
"""
from __future__ import annotations

import numpy as np

from . import WeightFormat
from ._blocks import (
    F32, QK_K, chunked, crumbs, f16_bytes, f16_round, nearest_int, pack_crumbs, pack_nibbles, quiet,
    signed_absmax, unpack_nibbles,
)
from ._kquant import GROUP_MAX_EPS, final_codes, symmetric_search
from .layout import BlockLayout, f16, scale_d_sc


def _unpack(b):
    codes = unpack_nibbles(b[:, :128], group=64) | (crumbs(b[:, 128:192], 2) << 4)
    return codes, {"sc": b[:, 192:208].view(np.int8), "d": f16(b, 208)}


class Q6_K(WeightFormat):
    name, block_size, type_size, gguf_type = "q6_k", QK_K, 210, 14

    layout = BlockLayout(group=16, planes=(4, 2), offset=32, params=(("sc", "int8", 16), ("d", "float16", 256)),
                         unpack=_unpack, scale=scale_d_sc)

    @chunked
    @quiet
    def quantize_blocks(self, values):
        x = np.asarray(values, dtype=np.float32)
        return _blocks_from(x, *symmetric_search(x.reshape(-1, 16), 32))

    @quiet
    def quantize_blocks_weighted(self, values, qw, row_sigma2):
        # llama.cpp weights Q6_K's sub-block search by the importance alone (no sigma2 term)
        return _blocks_from(values, *symmetric_search(values.reshape(-1, 16), 32, qw.reshape(-1, 16)))


def _blocks_from(x, sub_scales, L):
    """The 16 sub-block scales under one super-scale, then every code again against them."""
    n = x.shape[0]
    sub_scales = sub_scales.reshape(n, 16)

    peak = signed_absmax(sub_scales)
    empty = np.abs(peak) < GROUP_MAX_EPS
    iscale = F32(-128) / np.where(empty, F32(1), peak)
    d = F32(1) / iscale
    scale_codes = np.minimum(nearest_int(iscale * sub_scales), 127).astype(np.int8)

    # requantize every element against the scales as they will be read back
    L = final_codes(x, f16_round(d) * scale_codes.astype(np.float32), L.reshape(-1, 16), -32, 31)

    out = np.concatenate([
        pack_nibbles(L, group=64),
        pack_crumbs(L >> 4, 2),
        scale_codes.view(np.uint8),
        f16_bytes(d),
    ], axis=1)
    out[empty[:, 0]] = 0
    return out
