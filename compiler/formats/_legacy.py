"""The two code-making rules of the 32-element GGUF formats (Q4_0/Q5_0 and Q4_1/Q5_1).

They follow the gguf package's quantizers (themselves the C reference's float32 arithmetic)
step for step, casts included, so the bytes match exactly even for zero, constant, huge and
tiny blocks. Callers run them under ``_blocks.quiet``.
"""
from __future__ import annotations

import numpy as np

from ._blocks import F32, reciprocal_or_zero, signed_absmax


def symmetric_codes(values: np.ndarray, bits: int):
    """Scale so that the largest-magnitude element maps to -2**(bits-1); codes are offset by
    2**(bits-1). Returns (d [n, 1] float32, codes [n, k] uint8)."""
    half = 1 << (bits - 1)
    d = signed_absmax(values) / F32(-half)
    codes = np.trunc(values * reciprocal_or_zero(d) + F32(half + 0.5)).astype(np.uint8)
    return d, np.minimum(codes, np.uint8(2 * half - 1))


def affine_codes(values: np.ndarray, bits: int):
    """Codes 0..2**bits-1 spanning [min, max]. Returns (d, min, codes)."""
    top = (1 << bits) - 1
    lo = values.min(axis=-1, keepdims=True)
    hi = values.max(axis=-1, keepdims=True)
    d = (hi - lo) / F32(top)
    codes = np.trunc((values - lo) * reciprocal_or_zero(d) + F32(0.5)).astype(np.uint8)
    return d, lo, np.minimum(codes, np.uint8(top))


# ---- under an importance matrix (llama.cpp's quantize_row_q4_0_impl and its siblings) ----
# Element weights are qw * sqrt(sigma2 + x**2), sigma2 the mean square of the whole row; the
# scale is searched (not simply absmax / range) and the codes are the search's own.

def weighted_symmetric_codes(values, qw, row_sigma2, bits: int):
    """Q4_0/Q5_0: make_qx_quants with nmax 2**(bits-1). Returns (d [n, 1], codes [n, k])."""
    from ._kquant import importance_weights, symmetric_search
    d, L = symmetric_search(values, 1 << (bits - 1), importance_weights(values, qw, row_sigma2))
    return d[:, None], L.astype(np.uint8)


def weighted_affine_codes(values, qw, row_sigma2, bits: int):
    """Q4_1/Q5_1: make_qkx3_quants over codes 0..2**bits-1. Returns (d, m, codes)."""
    from ._kquant import affine_search, importance_weights
    d, the_min, L = affine_search(values, importance_weights(values, qw, row_sigma2), (1 << bits) - 1,
                                  rmin=-0.9, rdelta=0.05, nstep=36, use_mad=False)
    return d[:, None], -the_min[:, None], L.astype(np.uint8)
