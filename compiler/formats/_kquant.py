"""Search routines behind the K-quant quantizers, vectorised over sub-blocks.

These render llama.cpp's reference algorithms (``make_qkx2_quants``, ``make_qx_quants``,
``make_q3_quants``): the same candidate scales, the same float32 operations in the same order
(sums included), the same tie-breaking; on the tests' data the bytes equal those of a scalar,
loop-by-loop rendering of the C code. Each routine takes [sub_blocks, n] float32 and loops
only over candidates, elements or sweeps, never over blocks. Internally the data is held
transposed, [n, sub_blocks], so that per-sub-block quantities are plain [S] vectors that
broadcast along rows and sums over a sub-block are n contiguous vector adds.

The searches the K-quants spend their time in, make_qkx2_quants, make_qx_quants and
make_q3_quants, are compiled (``_kquant_native``); the rest stays here in numpy.
"""
from __future__ import annotations

import numpy as np

from ._blocks import F32, f16_bytes, f16_round, nearest_int
# the two searches that take nearly all of a K-quant's time are compiled
from ._kquant_native import affine_search, final_codes, q3_search, symmetric_search  # noqa: F401

GROUP_MAX_EPS = F32(1e-15)  # below this a group counts as all zeros

# Codes are kept as float32 holding small integers: exact, and it keeps every product in
# float32 as in the reference (an int32 operand would promote the arithmetic to float64).
# np.rint rounds half to even, which is what ggml's nearest_int does.
_round = np.rint


def _sum(terms: np.ndarray, from_zero: bool = True) -> np.ndarray:
    """Sums over the n rows of [n, S], accumulated in order in float32 as the reference's
    loops do. A numpy reduction along a contiguous axis adds pairwise, in a machine-dependent
    order; this order makes the codes the same on every machine. ``from_zero=False`` starts
    from the first term rather than from +0, as the reference does for its sums of weights (it
    only decides a zero's sign).

    The reduction over the rows of a C-ordered [n, S] with many columns is the exception: numpy
    runs it as n row additions into an accumulator starting at +0, the loop below in one call
    (three times faster; test_formats_kquant checks the equality on this numpy). With one
    column numpy would sum pairwise, hence the loop for narrow or strided arrays."""
    if from_zero and terms.ndim == 2 and terms.shape[1] >= _REDUCE_MIN_COLUMNS and terms.flags.c_contiguous:
        return np.add.reduce(terms, axis=0)
    acc = terms[0] + F32(0) if from_zero else terms[0].copy()
    for row in terms[1:]:
        acc += row
    return acc


_REDUCE_MIN_COLUMNS = 16


def positive_search(x, nmax: int, weights):
    """Best scale for non-negative x ~ scale * L, L in 0..nmax, by weighted squared error
    (llama.cpp's make_qp_quants, which quantizes the sub-block scales and mins of the
    importance-weighted K-quants): the best of nine inverse scales around nmax / max, then up
    to five sweeps of coordinate descent as in ``q3_search``. Returns (scale [S], L [S, n])."""
    x = np.ascontiguousarray(x.T)
    w = np.ascontiguousarray(weights.T)
    top = np.maximum(x.max(axis=0), F32(0))
    zero = top < GROUP_MAX_EPS
    top = np.where(zero, F32(1), top)

    def mse(iscale, clamp):
        L = _round(iscale * x)
        if clamp:
            L = np.minimum(L, F32(nmax))
        diff = x - (F32(1) / iscale) * L
        return _sum(w * diff * diff)

    iscale = F32(nmax) / top
    best = mse(iscale, clamp=False)
    for step in (*range(-4, 0), *range(1, 5)):
        cand = (F32(0.1) * F32(step) + F32(nmax)) / top
        err = mse(cand, clamp=True)
        take = err < best
        best = np.where(take, err, best)
        iscale = np.where(take, cand, iscale)
    L = np.minimum(_round(iscale * x), F32(nmax))
    L, sumlx, suml2 = _sweeps(x, w, L, lambda v: np.minimum(v, F32(nmax)))
    scale = np.where((suml2 > 0) & ~zero, sumlx / np.where(suml2 > 0, suml2, F32(1)), F32(0))
    return scale, np.where(zero, F32(0), L).T


def _sweeps(x, w, L, clamp):
    """make_qp_quants' five sweeps of coordinate descent over the codes L [n, S] of x [n, S]
    (one sub-block a column) by weights w: element by element, a code moves to its best value
    (``clamp``-ed) whenever that raises sumlx**2 / suml2 and the rest of the sub-block has
    weight (Q3_K's own sweeps are compiled, ``_kquant_native._q3_tile``). The sweeps are sequential within a sub-block, so
    the elements are walked in order for all sub-blocks at once. A sub-block whose sweep
    changed nothing would repeat itself (the reference stops there): it is done, and later
    sweeps run only over the sub-blocks still moving (on random data a fifth of them after
    the first sweep, a twentieth after the second). Returns (L, sumlx, suml2)."""
    wx = w * x
    sumlx = _sum(wx * L)
    suml2 = _sum(w * L * L)
    moving = None                       # the columns still moving; None: all of them
    for sweep in range(5):
        if moving is None:
            xs, ws, wxs, Ls, slx_all, sl2_all = x, w, wx, L, sumlx, suml2
        else:
            xs, ws, wxs, Ls = x[:, moving], w[:, moving], wx[:, moving], L[:, moving]
            slx_all, sl2_all = sumlx[moving], suml2[moving]
        moved = np.zeros(xs.shape[1], dtype=bool)
        for i in range(x.shape[0]):
            li = Ls[i]
            slx = slx_all - wxs[i] * li
            sl2 = sl2_all - ws[i] * li * li
            can = (slx > 0) & (sl2 > 0)
            new = clamp(_round(xs[i] * sl2 / np.where(can, slx, F32(1))))
            slx = slx + wxs[i] * new
            sl2 = sl2 + ws[i] * new * new
            better = can & (new != li) & (sl2 > 0) & (slx * slx * sl2_all > slx_all * slx_all * sl2)
            Ls[i] = np.where(better, new, li)
            slx_all = np.where(better, slx, slx_all)
            sl2_all = np.where(better, sl2, sl2_all)
            moved |= better
        if moving is None:
            sumlx, suml2 = slx_all, sl2_all
            moving = np.flatnonzero(moved)
        else:
            L[:, moving] = Ls
            sumlx[moving] = slx_all
            suml2[moving] = sl2_all
            moving = moving[moved]
        if not len(moving):
            break
    return L, sumlx, suml2


def importance_weights(x: np.ndarray, qw: np.ndarray, sigma2: np.ndarray) -> np.ndarray:
    """llama.cpp's element weights under an importance matrix: qw * sqrt(sigma2 + x**2)."""
    return qw * np.sqrt(sigma2 + x * x)


def mean_square(x: np.ndarray) -> np.ndarray:
    """Per row of [B, n], sum(x**2) / n accumulated in order in float32 (as the reference's
    sigma2): [B, 1]."""
    columns = np.ascontiguousarray(x.T)
    return (_sum(columns * columns) / F32(x.shape[1]))[:, None]


# ---- the 12-byte scale/min block of Q4_K and Q5_K -------------------------------------
# Eight 6-bit scales and eight 6-bit mins. Bytes 0-3 hold scales 0-3 and bytes 4-7 mins 0-3
# in their low six bits; bytes 8-11 hold the low nibbles of scale 4-7 (low) and min 4-7
# (high); the top two bits of scales/mins 4-7 sit in the top two bits of bytes 0-3 / 4-7.

def pack_scale_min(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """uint8 [B, 8] scales and mins (each < 64) -> [B, 12]."""
    ls = ls.astype(np.uint8)
    lm = lm.astype(np.uint8)
    head = np.concatenate([ls[:, :4] | ((ls[:, 4:] >> 4) << 6), lm[:, :4] | ((lm[:, 4:] >> 4) << 6)], axis=1)
    tail = (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)
    return np.concatenate([head, tail], axis=1)


def unpack_scale_min(packed: np.ndarray):
    """[B, 12] -> (scales [B, 8], mins [B, 8]) as uint8."""
    sc_lo, m_lo, tail = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate([sc_lo & 0x3F, (tail & 0x0F) | ((sc_lo >> 6) << 4)], axis=1)
    mins = np.concatenate([m_lo & 0x3F, (tail >> 4) | ((m_lo >> 6) << 4)], axis=1)
    return scales, mins


def super_scale(values: np.ndarray, levels: int):
    """Quantize the per-sub-block scales (or mins, all >= 0) of each super-block to 0..levels
    against one float32 super-scale: returns (codes [B, k] int32, super-scale [B, 1])."""
    top = np.maximum(values.max(axis=1, keepdims=True), F32(0))
    inv = np.where(top > 0, F32(levels) / np.where(top > 0, top, F32(1)), F32(0))
    # the reference stores nearest_int into a uint8 before clamping
    codes = np.minimum(nearest_int(inv * values) & 0xFF, levels)
    return codes, top / F32(levels)


# ---- Q4_K / Q5_K, which differ only in code width and where the codes go --------------

def affine_blocks(x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Quantize [B, 256] as Q4_K/Q5_K do: per 32-element sub-block an affine fit weighted by
    rms(sub-block) + |x|, then the eight scales and mins to 6 bits, then every element again
    against the scales as they will be read back. Returns (the 16 header bytes [B, 16],
    codes [B, 256] uint8)."""
    n = x.shape[0]
    scales, mins, L = affine_search(x.reshape(-1, 32), None, nmax, rmin, rdelta, nstep, use_mad=False)
    ls, d = super_scale(scales.reshape(n, 8), 63)
    lm, dmin = super_scale(mins.reshape(n, 8), 63)
    packed = pack_scale_min(ls, lm)
    sc, m = unpack_scale_min(packed)
    dl = f16_round(d) * sc.astype(np.float32)
    ml = f16_round(dmin) * m.astype(np.float32)
    codes = final_codes(x, dl, L, 0, nmax, ml)
    return np.concatenate([f16_bytes(d), f16_bytes(dmin), packed], axis=1), codes


def affine_blocks_weighted(x: np.ndarray, qw: np.ndarray, nmax: int):
    """Q4_K/Q5_K under an importance matrix (llama.cpp's quantize_row_q4_K_impl): element
    weights qw * sqrt(sigma2 + x**2) with sigma2 = 2 * mean(x**2) of the super-block, a finer
    affine search (37 candidates), the scales and mins quantized by ``positive_search``
    weighted by each sub-block's total weight, then the codes again against the stored scales.
    Returns (the 16 header bytes [B, 16], codes [B, 256] uint8)."""
    n = x.shape[0]
    weights = importance_weights(x, qw, F32(2) * mean_square(x))
    sub = x.reshape(-1, 32)
    sub_w = weights.reshape(-1, 32)
    scales, mins, L = affine_search(sub, sub_w, nmax, rmin=-0.9, rdelta=0.05, nstep=36, use_mad=False)
    sw = _sum(np.ascontiguousarray(sub_w.T)).reshape(n, 8)
    d, ls = positive_search(scales.reshape(n, 8), 63, sw)
    dmin, lm = positive_search(mins.reshape(n, 8), 63, sw)
    packed = pack_scale_min(ls, lm)
    dl = f16_round(d[:, None]) * ls
    ml = f16_round(dmin[:, None]) * lm
    L = final_codes(x, dl, L, 0, nmax, ml)
    return np.concatenate([f16_bytes(d[:, None]), f16_bytes(dmin[:, None]), packed], axis=1), L
