"""The K-quants' hot loops compiled to machine code (numba): llama.cpp's
``make_qkx2_quants`` (Q4_K, Q5_K, Q2_K, weighted Q4_1/Q5_1), ``make_qx_quants`` with
rmse_type 1 (Q6_K, weighted Q3_K and the legacy types), ``make_q3_quants`` (Q3_K), and the
last pass that codes every element again against the scales as stored (``final_codes``).

Why compiled: in numpy each candidate scale is a dozen passes over the data through memory;
here one pass per candidate does the codes, the three sums and the error while the data sits
in L1, and the sub-blocks run side by side in SIMD lanes.

Why the bytes stay llama.cpp's: every sub-block's arithmetic is the reference's, float32
scalar by scalar in the C code's order, sums accumulated element by element from the same
start. The lanes of a vector are different sub-blocks, never different terms of one sum, so
vectorizing reorders nothing; and numba compiles without fast-math, so LLVM neither
reassociates nor contracts a multiply and an add into one FMA. Rounding is ggml's
``nearest_int`` trick (adding 1.5 * 2**23 leaves the rounded value), exact for the
|v| < 2**22 the reference asserts and, once clamped, equal to it beyond.

The callers hold sub-blocks as rows, [S, n]. The kernels take ``_TILE`` rows at a time and
transpose them into a column buffer [n, _TILE], so that one sub-block is one SIMD lane and a
candidate's codes for the tile stay in L1 for its error pass; the codes go back as rows.
"""
from __future__ import annotations

import numpy as np
from numba import njit

F32 = np.float32
_MAGIC = F32(12582912.0)          # 1.5 * 2**23
_EPS = F32(1e-15)                 # GROUP_MAX_EPS
_TILE = 64


@njit(cache=True, nogil=True, fastmath=False, error_model="numpy")
def _load_tile(rows, s0, buf):
    """rows [s0, s0 + T) of [S, n] into buf [n, T] as columns; columns past S are zeros (a
    flat sub-block, which no search moves). Returns how many are real."""
    S, n = rows.shape
    T = buf.shape[1]
    m = min(T, S - s0)
    for j in range(m):
        for i in range(n):
            buf[i, j] = rows[s0 + j, i]
    for j in range(m, T):
        for i in range(n):
            buf[i, j] = F32(0.0)
    return m


@njit(cache=True, nogil=True, fastmath=False, error_model="numpy", inline="always")
def _store_tile(Lg, scales, s0, m, L, scale_out):
    """The first m columns of a tile's codes Lg [n, T] back as rows s0.. of L [S, n], and
    their scales into scale_out."""
    n = Lg.shape[0]
    for j in range(m):
        scale_out[s0 + j] = scales[j]
        for i in range(n):
            L[s0 + j, i] = Lg[i, j]


@njit(cache=True, nogil=True, fastmath=False, error_model="numpy")
def _rms_weights(xg, wg):
    """Q4_K's and Q5_K's element weights without an importance matrix: rms(sub-block) + |x|,
    the sum of squares taken in order from +0 as the reference's loop."""
    n, T = xg.shape
    acc = np.zeros(T, np.float32)
    for i in range(n):
        for j in range(T):
            acc[j] += xg[i, j] * xg[i, j]
    for j in range(T):
        acc[j] = np.sqrt(acc[j] / F32(n))
    for i in range(n):
        for j in range(T):
            wg[i, j] = acc[j] + abs(xg[i, j])


@njit(cache=True, nogil=True, fastmath=False, error_model="numpy")
def _affine_tile(xg, wg, Lg, nmax, rmin, rdelta, nstep, use_mad, st, Laux, flags):
    """make_qkx2_quants on every column of xg [n, T] with weights wg: the winners' codes go to
    Lg [n, T]; st[0] / st[1] get the scales / mins (as subtracted: >= 0). ``st`` [>= 18, T] and
    ``Laux`` [n, T] are scratch; ``flags`` [2, T] booleans."""
    n, T = xg.shape
    zero = F32(0.0)
    one = F32(1.0)
    scale_out, min_out, lo, hi, sum_w, sum_x, origin, span, best, scale = (
        st[0], st[1], st[2], st[3], st[4], st[5], st[6], st[7], st[8], st[9])
    isc, best_isc, best_org, sl, sl2, sxl, ts, tm = st[10], st[11], st[12], st[13], st[14], st[15], st[16], st[17]
    err = scale_out                     # the scales are only written at the end
    ok, flat = flags[0], flags[1]
    for j in range(T):
        v = xg[0, j]
        lo[j] = v
        hi[j] = v
        sum_w[j] = wg[0, j]
        sum_x[j] = sum_w[j] * v
    for i in range(1, n):
        for j in range(T):
            v = xg[i, j]
            wv = wg[i, j]
            lo[j] = v if v < lo[j] else lo[j]
            hi[j] = v if v > hi[j] else hi[j]
            sum_w[j] += wv
            sum_x[j] += wv * v
    for j in range(T):
        if lo[j] > zero:
            lo[j] = zero
        origin[j] = lo[j]
        flat[j] = hi[j] == lo[j]
        span[j] = hi[j] - lo[j] if not flat[j] else one
        isc[j] = nmax / span[j]
        scale[j] = one / isc[j]
        best[j] = zero
    # the first guess: nmax over the range
    for i in range(n):
        for j in range(T):
            v = xg[i, j]
            l = isc[j] * (v - origin[j])
            l = (l + _MAGIC) - _MAGIC
            l = min(max(l, zero), nmax)
            d = scale[j] * l + origin[j] - v
            d = abs(d) if use_mad else d * d
            best[j] += wg[i, j] * d
    for j in range(T):
        best_isc[j] = isc[j]
        best_org[j] = origin[j]
    for step in range(nstep + 1):
        num = rmin + rdelta * F32(step) + nmax
        for j in range(T):
            isc[j] = num / span[j]
            sl[j] = zero
            sl2[j] = zero
            sxl[j] = zero
        for i in range(n):
            for j in range(T):
                v = xg[i, j]
                l = isc[j] * (v - origin[j])
                l = (l + _MAGIC) - _MAGIC
                l = min(max(l, zero), nmax)
                Laux[i, j] = l
                wl = wg[i, j] * l
                sl[j] += wl
                sl2[j] += wl * l
                sxl[j] += wl * v
        for j in range(T):
            D = sum_w[j] * sl2[j] - sl[j] * sl[j]
            ok[j] = D > zero and not flat[j]
            if not ok[j]:
                D = one
            a = (sum_w[j] * sxl[j] - sum_x[j] * sl[j]) / D
            b = (sl2[j] * sum_x[j] - sl[j] * sxl[j]) / D
            if b > zero:
                # a positive min would need negative codes: pin it at zero, refit the scale
                b = zero
                a = sxl[j] / (sl2[j] if sl2[j] > zero else one)
            ts[j] = a
            tm[j] = b
            err[j] = zero
        for i in range(n):
            for j in range(T):
                d = ts[j] * Laux[i, j] + tm[j] - xg[i, j]
                d = abs(d) if use_mad else d * d
                err[j] += wg[i, j] * d
        for j in range(T):
            if ok[j] and err[j] < best[j]:
                best[j] = err[j]
                scale[j] = ts[j]
                best_isc[j] = isc[j]
                best_org[j] = origin[j]
                origin[j] = tm[j]
                # later candidates spread over the range above the best origin so far
                span[j] = hi[j] - origin[j]
    # the winners' codes, as their candidate computed them
    for i in range(n):
        for j in range(T):
            l = best_isc[j] * (xg[i, j] - best_org[j])
            l = (l + _MAGIC) - _MAGIC
            l = min(max(l, zero), nmax)
            Lg[i, j] = zero if flat[j] else l
    for j in range(T):
        scale_out[j] = zero if flat[j] else scale[j]
        min_out[j] = -origin[j]


@njit(cache=True, nogil=True, fastmath=False, error_model="numpy")
def _affine_rows(x, w, rms_weights, nmax_i, rmin, rdelta, nstep, use_mad, scale_out, min_out, L):
    """``_affine_tile`` over x [S, n] a tile at a time; weights from w [S, n], or rms + |x|
    when ``rms_weights``. Codes to L [S, n]."""
    S, n = x.shape
    T = _TILE
    nmax = F32(nmax_i)
    xg = np.empty((n, T), np.float32)
    wg = np.empty((n, T), np.float32)
    Lg = np.empty((n, T), np.float32)
    Laux = np.empty((n, T), np.float32)
    st = np.empty((18, T), np.float32)
    flags = np.empty((2, T), np.bool_)
    for s0 in range(0, S, T):
        m = _load_tile(x, s0, xg)
        if rms_weights:
            _rms_weights(xg, wg)
        else:
            _load_tile(w, s0, wg)
        _affine_tile(xg, wg, Lg, nmax, rmin, rdelta, nstep, use_mad, st, Laux, flags)
        _store_tile(Lg, st[0], s0, m, L, scale_out)
        min_out[s0:s0 + m] = st[1, :m]


def affine_search(x, weights, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool):
    """Best (scale, min) per row of x [S, n] with x ~ scale * L - min, L in 0..nmax, by
    weighted least squares over the first guess and ``nstep + 1`` candidate inverse scales
    (make_qkx2_quants). ``weights`` [S, n], or None for Q4_K's and Q5_K's rms(row) + |x|.
    Returns (scale [S], min [S] (>= 0, subtracted), L [S, n] float32)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    rms = weights is None
    w = x if rms else np.ascontiguousarray(weights, dtype=np.float32)
    S = x.shape[0]
    scale = np.empty(S, np.float32)
    the_min = np.empty(S, np.float32)
    L = np.empty_like(x)
    _affine_rows(x, w, rms, nmax, F32(rmin), F32(rdelta), nstep, bool(use_mad), scale, the_min, L)
    return scale, the_min, L


@njit(cache=True, nogil=True, fastmath=False, error_model="numpy")
def _final_codes(x, dl, ml, L, lo_i, hi_i, out):
    """The K-quants' last pass: every element again against its sub-block's scale (and min) as
    they will be read back, x [B, k] with dl, ml [B, k / n] (n = L's row length), keeping the
    search's code L [B * k / n, n] where the stored scale is zero. Codes - lo to out [B, k]."""
    B, k = x.shape
    n = L.shape[1]
    lo = F32(lo_i)
    hi = F32(hi_i)
    zero = F32(0.0)
    for b in range(B):
        for s in range(k // n):
            d = dl[b, s]
            mm = ml[b, s]
            row = b * (k // n) + s
            for i in range(n):
                if d == zero:
                    out[b, s * n + i] = np.uint8(L[row, i])
                else:
                    l = (x[b, s * n + i] + mm) / d
                    l = (l + _MAGIC) - _MAGIC
                    out[b, s * n + i] = np.uint8(min(max(l, lo), hi) - lo)


def final_codes(x, dl, L, lo: int, hi: int, ml=None) -> np.ndarray:
    """clip(rint((x + ml) / dl), lo, hi) - lo per element of x [B, k], with dl (and ml, default
    0) per sub-block [B, k / n]; where dl is 0, the search's own code from L [B * k / n, n]
    (already offset). uint8 [B, k]. (x + 0 is x but for a zero's sign, which rounds away.)"""
    out = np.empty(x.shape, np.uint8)
    dl = np.ascontiguousarray(dl, dtype=np.float32)
    ml = np.zeros_like(dl) if ml is None else np.ascontiguousarray(np.broadcast_to(ml, dl.shape), dtype=np.float32)
    _final_codes(np.ascontiguousarray(x, dtype=np.float32), dl, ml, np.ascontiguousarray(L, dtype=np.float32),
                 lo, hi, out)
    return out


@njit(cache=True, nogil=True, fastmath=False, error_model="numpy", inline="always")
def _signed_peak(xg, peak, amax):
    """Per column of xg [n, T]: amax, the largest magnitude, and peak, the first element that
    has it, with its sign (0 and 0 for a column of zeros)."""
    n, T = xg.shape
    for j in range(T):
        amax[j] = F32(0.0)
        peak[j] = F32(0.0)
    for i in range(n):
        for j in range(T):
            v = xg[i, j]
            a = abs(v)
            first = a > amax[j]
            peak[j] = v if first else peak[j]
            amax[j] = a if first else amax[j]


@njit(cache=True, nogil=True, fastmath=False, error_model="numpy", inline="always")
def _weighted_sums(xg, wg, isc, slx, sl2, lo_code, hi_code):
    """make_qx_quants' sums for one inverse scale per column: l = clamp(nearest(isc · x)),
    slx = Σ w·x·l and sl2 = Σ w·l·l, element by element from +0."""
    n, T = xg.shape
    for j in range(T):
        slx[j] = F32(0.0)
        sl2[j] = F32(0.0)
    for i in range(n):
        for j in range(T):
            v = xg[i, j]
            l = isc[j] * v
            l = (l + _MAGIC) - _MAGIC
            l = min(max(l, lo_code), hi_code)
            wv = wg[i, j]
            slx[j] += wv * v * l
            sl2[j] += wv * l * l


@njit(cache=True, nogil=True, fastmath=False, error_model="numpy")
def _symmetric_tile(xg, wg, Lg, nmax, st):
    """make_qx_quants (rmse_type 1) on every column of xg [n, T] with weights wg: codes + nmax
    to Lg, scales to st[0]; st [>= 7, T] is scratch."""
    n, T = xg.shape
    lo_code = -nmax
    hi_code = nmax - F32(1.0)
    zero = F32(0.0)
    one = F32(1.0)
    tenth = F32(0.1)
    scale_out, peak, amax, isc, best_isc, slx, sl2, best = st[0], st[1], st[2], st[3], st[4], st[5], st[6], st[7]
    scale = scale_out
    _signed_peak(xg, peak, amax)
    for j in range(T):
        if amax[j] < _EPS:
            peak[j] = one
        isc[j] = -nmax / peak[j]
    _weighted_sums(xg, wg, isc, slx, sl2, lo_code, hi_code)
    for j in range(T):
        scale[j] = slx[j] / sl2[j] if sl2[j] != zero else zero
        best[j] = scale[j] * slx[j]
        best_isc[j] = isc[j]
    for step in range(-9, 10):
        if step == 0:
            continue
        num = -(nmax + tenth * F32(step))
        for j in range(T):
            isc[j] = num / peak[j]
        _weighted_sums(xg, wg, isc, slx, sl2, lo_code, hi_code)
        for j in range(T):
            if sl2[j] > zero and slx[j] * slx[j] > best[j] * sl2[j]:
                scale[j] = slx[j] / sl2[j]
                best[j] = scale[j] * slx[j]
                best_isc[j] = isc[j]
    for i in range(n):
        for j in range(T):
            l = best_isc[j] * xg[i, j]
            l = (l + _MAGIC) - _MAGIC
            l = min(max(l, lo_code), hi_code) + nmax
            Lg[i, j] = zero if amax[j] < _EPS else l
    for j in range(T):
        if amax[j] < _EPS:
            scale[j] = zero


@njit(cache=True, nogil=True, fastmath=False, error_model="numpy")
def _symmetric_rows(x, w, square_weights, nmax_i, scale_out, L):
    S, n = x.shape
    T = _TILE
    nmax = F32(nmax_i)
    xg = np.empty((n, T), np.float32)
    wg = np.empty((n, T), np.float32)
    Lg = np.empty((n, T), np.float32)
    st = np.empty((8, T), np.float32)
    for s0 in range(0, S, T):
        m = _load_tile(x, s0, xg)
        if square_weights:
            for i in range(n):
                for j in range(T):
                    wg[i, j] = xg[i, j] * xg[i, j]
        else:
            _load_tile(w, s0, wg)
        _symmetric_tile(xg, wg, Lg, nmax, st)
        _store_tile(Lg, st[0], s0, m, L, scale_out)


def symmetric_search(x, nmax: int, weights=None):
    """Best scale per row of x [S, n] with x ~ scale * (L - nmax), L in 0..2*nmax-1, weighting
    each element by ``weights`` (default x**2), over the first guess nmax / absmax and 18
    candidates around it (make_qx_quants, rmse_type 1). Returns (scale [S], L [S, n] float32)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    square = weights is None
    w = x if square else np.ascontiguousarray(weights, dtype=np.float32)
    scale = np.empty(x.shape[0], np.float32)
    L = np.empty_like(x)
    _symmetric_rows(x, w, square, nmax, scale, L)
    return scale, L


@njit(cache=True, nogil=True, fastmath=False, error_model="numpy", inline="always")
def _q3_step(xg, L_in, L_out, i, slx_in, sl2_in, slx_out, sl2_out, lo_code, hi_code):
    """One element of a coordinate-descent sweep, in every lane: its code moves to the best
    value when that raises sumlx**2 / suml2; code and sums go from *_in to *_out."""
    zero = F32(0.0)
    one = F32(1.0)
    for j in range(xg.shape[1]):
        v = xg[i, j]
        li = L_in[i, j]
        w = v * v
        slx_all = slx_in[j]
        sl2_all = sl2_in[j]
        slx = slx_all - w * v * li
        sl2 = sl2_all - w * li * li
        can = slx > zero
        new = v * sl2 / (slx if can else one)
        new = (new + _MAGIC) - _MAGIC
        new = min(max(new, lo_code), hi_code)
        slx = slx + w * v * new
        sl2 = sl2 + w * new * new
        better = can & (new != li) & (sl2 > zero) & (slx * slx * sl2_all > slx_all * slx_all * sl2)
        slx_out[j] = slx if better else slx_all
        sl2_out[j] = sl2 if better else sl2_all
        L_out[i, j] = new if better else li


@njit(cache=True, nogil=True, fastmath=False, error_model="numpy")
def _q3_tile(xg, Lg, Lb, nmax, st):
    """make_q3_quants with do_rmse on every column of xg [n, T]: codes + nmax to Lg, scales to
    st[0]; st [>= 7, T] and Lb [n, T] are scratch. The reference stops sweeping a sub-block
    once a sweep changed nothing; a further sweep would change nothing either, so every lane
    runs all five."""
    n, T = xg.shape
    lo_code = -nmax
    hi_code = nmax - F32(1.0)
    zero = F32(0.0)
    one = F32(1.0)
    scale, peak, amax, slx_all, sl2_all, slx_b, sl2_b = st[0], st[1], st[2], st[3], st[4], st[5], st[6]
    _signed_peak(xg, peak, amax)
    for j in range(T):
        if amax[j] < _EPS:
            peak[j] = one
        peak[j] = -nmax / peak[j]          # the inverse scale
        slx_all[j] = zero
        sl2_all[j] = zero
    for i in range(n):
        for j in range(T):
            v = xg[i, j]
            l = peak[j] * v
            l = (l + _MAGIC) - _MAGIC
            l = min(max(l, lo_code), hi_code)
            Lg[i, j] = l
            w = v * v
            slx_all[j] += w * v * l
            sl2_all[j] += w * l * l
    # A sweep's state (each lane's two sums, each element's code) is read from one buffer and
    # written to the other, so every store is a plain store of a select: stored back where it
    # was read, LLVM made it a masked store (vmaskmovps), microcoded and slow on AMD.
    src, dst = Lg, Lb
    for sweep in range(5):
        for i in range(0, n - 1, 2):
            _q3_step(xg, src, dst, i, slx_all, sl2_all, slx_b, sl2_b, lo_code, hi_code)
            _q3_step(xg, src, dst, i + 1, slx_b, sl2_b, slx_all, sl2_all, lo_code, hi_code)
        if n % 2:
            _q3_step(xg, src, dst, n - 1, slx_all, sl2_all, slx_b, sl2_b, lo_code, hi_code)
            slx_all[:] = slx_b
            sl2_all[:] = sl2_b
        src, dst = dst, src
    if sweep % 2 == 0:                  # the last sweep wrote Lb
        Lg[:, :] = Lb
    for i in range(n):
        for j in range(T):
            Lg[i, j] = zero if amax[j] < _EPS else Lg[i, j] + nmax
    for j in range(T):
        ok = sl2_all[j] > zero and amax[j] >= _EPS
        scale[j] = slx_all[j] / (sl2_all[j] if ok else one) if ok else zero


@njit(cache=True, nogil=True, fastmath=False, error_model="numpy")
def _q3_rows(x, nmax_i, scale_out, L):
    S, n = x.shape
    T = _TILE
    nmax = F32(nmax_i)
    xg = np.empty((n, T), np.float32)
    Lg = np.empty((n, T), np.float32)
    Lb = np.empty((n, T), np.float32)
    st = np.empty((7, T), np.float32)
    for s0 in range(0, S, T):
        m = _load_tile(x, s0, xg)
        _q3_tile(xg, Lg, Lb, nmax, st)
        _store_tile(Lg, st[0], s0, m, L, scale_out)


def q3_search(x, nmax: int):
    """Q3_K's sub-block search (make_q3_quants with do_rmse) per row of x [S, n]: start from
    nmax / absmax, then five sweeps of coordinate descent, element by element, moving a code
    whenever that raises sumlx**2 / suml2 (x**2-weighted). Returns (scale [S], L + nmax)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    scale = np.empty(x.shape[0], np.float32)
    L = np.empty_like(x)
    _q3_rows(x, nmax, scale, L)
    return scale, L
