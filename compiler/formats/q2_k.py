"""Q2_K: super-blocks of 256 two-bit codes in 16 sub-blocks of 16, each with a 4-bit scale and
a 4-bit min under two half super-scales: value = d * scale * code - dmin * min.

Layout (84 bytes): scales[16] (scale in the low nibble, min in the high), qs[64], d, dmin.
Each run of 128 elements takes 32 bytes of qs; byte l holds elements l, l+32, l+64, l+96 in
its bit pairs, lowest first.
"""
from __future__ import annotations

import numpy as np

from . import WeightFormat
from ._blocks import QK_K, chunked, crumbs, f16_bytes, f16_round, pack_crumbs, quiet
from ._kquant import _sum, affine_search, final_codes, importance_weights, mean_square, positive_search, super_scale
from .layout import BlockLayout, f16


def _unpack(b):
    # sc keeps GGUF's byte: scale in the low nibble, min in the high one
    return crumbs(b[:, 16:80], 2), {"sc": b[:, :16], "d": f16(b, 80), "dmin": f16(b, 82)}


def _scale(get, f32):
    return f32(get("d")) * f32(get("sc") & 15)


def _min(get, f32):
    return f32(get("dmin")) * f32(get("sc") >> 4)


class Q2_K(WeightFormat):
    name, block_size, type_size, gguf_type = "q2_k", QK_K, 84, 10

    layout = BlockLayout(group=16, planes=(2,), offset=0, unpack=_unpack, scale=_scale, bias=_min, subtract_bias=True,
                         params=(("sc", "uint8", 16), ("d", "float16", 256), ("dmin", "float16", 256)))

    @chunked
    @quiet
    def quantize_blocks(self, values):
        x = np.asarray(values, dtype=np.float32)
        n = x.shape[0]
        sub = x.reshape(-1, 16)
        # llama.cpp's Q2_K search: |x| weights, absolute (not squared) error, 16 candidates
        scales, mins, L = affine_search(sub, np.abs(sub), 3, rmin=-0.5, rdelta=0.1, nstep=15, use_mad=True)
        ls, d = super_scale(scales.reshape(n, 16), 15)
        lm, dmin = super_scale(mins.reshape(n, 16), 15)
        return _requantized(x, L, (ls | (lm << 4)).astype(np.uint8), d, dmin)

    @quiet
    def quantize_blocks_weighted(self, values, qw, row_sigma2):
        # llama.cpp's quantize_row_q2_K_impl: weights qw * sqrt(mean(x**2) + x**2), squared
        # error, 37 candidates; scales and mins by a search weighted by sub-block totals
        x = values
        n = x.shape[0]
        weights = importance_weights(x, qw, mean_square(x)).reshape(-1, 16)
        scales, mins, L = affine_search(x.reshape(-1, 16), weights, 3, rmin=-0.9, rdelta=0.05, nstep=36, use_mad=False)
        sw = _sum(np.ascontiguousarray(weights.T)).reshape(n, 16)
        d, ls = positive_search(scales.reshape(n, 16), 15, sw)
        dmin, lm = positive_search(mins.reshape(n, 16), 15, sw)
        packed = (ls.astype(np.uint8) | (lm.astype(np.uint8) << 4)).astype(np.uint8)
        return _requantized(x, L, packed, d[:, None], dmin[:, None])


def _requantized(x, L, packed, d, dmin):
    """Every code again against the scales and mins as they will be read back, then the block."""
    dl = f16_round(d) * (packed & 0x0F).astype(np.float32)
    ml = f16_round(dmin) * (packed >> 4).astype(np.float32)
    L = final_codes(x, dl, L, 0, 3, ml)
    return np.concatenate([packed, pack_crumbs(L, 2), f16_bytes(d), f16_bytes(dmin)], axis=1)
