"""Ternary codes for TQ1_0/TQ2_0, as the gguf package (and ggml's reference) make them."""
from __future__ import annotations

import numpy as np

from ._blocks import reciprocal_or_zero, round_half_away


def ternary_codes(values: np.ndarray):
    """d = absmax per block; codes round(x / d) + 1 in 0..2. Returns (d [n, 1], codes uint8).
    The int8 step mirrors the reference's casts, which decides what NaNs turn into."""
    d = np.abs(values).max(axis=-1, keepdims=True)
    codes = round_half_away(values * reciprocal_or_zero(d)).astype(np.int8) + np.int8(1)
    return d, codes.astype(np.uint8)
