"""Q3_K: super-blocks of 256 three-bit codes in 16 sub-blocks of 16, each with a signed 6-bit
scale under one half super-scale: value = d * (scale - 32) * (code - 4).

Layout (110 bytes): hmask[32], qs[64], scales[12], d. The low two bits of each code are
packed as in Q2_K; bit e // 32 of hmask[e % 32] is the third bit of element e. Scales: the low
nibbles of 0-7 and 8-15 share bytes 0-7 (low/high nibble); bytes 8-11 hold the top two bits,
scale j at byte 8 + j % 4, bit 2 * (j // 4).
"""
from __future__ import annotations

import numpy as np

from . import WeightFormat
from ._blocks import (
    F32, QK_K, chunked, crumbs, f16_bytes, f16_round, nearest_int, pack_crumbs, quiet, signed_absmax,
)
from ._kquant import _sum, final_codes, importance_weights, mean_square, q3_search, symmetric_search
from .layout import BlockLayout, f16, scale_d_sc

_TOP_SHIFTS = np.repeat(np.arange(0, 8, 2, dtype=np.uint8), 4)  # scale j: bit 2 * (j // 4)


def _unpack_scales(packed: np.ndarray) -> np.ndarray:
    """[B, 12] -> the 16 six-bit scales minus 32, int8 [B, 16]."""
    low = np.concatenate([packed[:, :8] & 0x0F, packed[:, :8] >> 4], axis=1)
    top = (np.tile(packed[:, 8:12], 4) >> _TOP_SHIFTS) & 0x03
    return (low | (top << 4)).astype(np.int8) - np.int8(32)


def _pack_scales(codes: np.ndarray) -> np.ndarray:
    """uint8 [B, 16] (each < 64) -> [B, 12]."""
    low = (codes[:, :8] & 0x0F) | ((codes[:, 8:] & 0x0F) << 4)
    top = ((codes >> 4) << _TOP_SHIFTS).reshape(-1, 4, 4)
    return np.concatenate([low, top[:, 0] | top[:, 1] | top[:, 2] | top[:, 3]], axis=1)


def _unpack(b):
    # code = low two bits + 4 · mask bit; value = d · (scale − 32) · (code − 4)
    codes = crumbs(b[:, 32:96], 2) | (crumbs(b[:, :32], 1) << 2)
    return codes, {"sc": _unpack_scales(b[:, 96:108]), "d": f16(b, 108)}


class Q3_K(WeightFormat):
    name, block_size, type_size, gguf_type = "q3_k", QK_K, 110, 11

    layout = BlockLayout(group=16, planes=(2, 1), offset=4, params=(("sc", "int8", 16), ("d", "float16", 256)),
                         unpack=_unpack, scale=scale_d_sc)

    @chunked
    @quiet
    def quantize_blocks(self, values):
        x = np.asarray(values, dtype=np.float32)
        n = x.shape[0]
        scales, L = q3_search(x.reshape(-1, 16), 4)
        scales = scales.reshape(n, 16)
        L = L.reshape(n, QK_K)

        peak = signed_absmax(scales)
        live_block = peak != 0
        iscale = F32(-32) / np.where(live_block, peak, F32(1))
        codes = np.clip(nearest_int(iscale * scales).astype(np.int8), -32, 31) + 32
        packed = np.where(live_block, _pack_scales(codes.astype(np.uint8)), np.uint8(0))
        d = np.where(live_block, F32(1) / iscale, F32(0))

        L = final_codes(x, f16_round(d) * _unpack_scales(packed).astype(np.float32), L.reshape(-1, 16), -4, 3)
        return _pack(L, packed, d)

    @quiet
    def quantize_blocks_weighted(self, values, qw, row_sigma2):
        # llama.cpp's quantize_row_q3_K_impl: importance-weighted sub-block searches, then the
        # 16 scales by a search weighted by each sub-block's total weight
        x = values
        n = x.shape[0]
        weights = importance_weights(x, qw, F32(2) * mean_square(x)).reshape(-1, 16)
        scales, L = symmetric_search(x.reshape(-1, 16), 4, weights)
        sw = _sum(np.ascontiguousarray(weights.T)).reshape(n, 16)
        d, codes = symmetric_search(scales.reshape(n, 16), 32, sw)
        packed = _pack_scales(codes.astype(np.uint8))
        d = d[:, None]
        L = final_codes(x, f16_round(d) * _unpack_scales(packed).astype(np.float32), L, -4, 3)
        return _pack(L, packed, d)


def _pack(L, packed, d):
    return np.concatenate([pack_crumbs(L >> 2, 1), pack_crumbs(L & 3, 2), packed, f16_bytes(d)], axis=1)
