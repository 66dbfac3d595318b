"""K-quant quantizers against a scalar, loop-by-loop rendering of llama.cpp's reference
algorithms (quantize_row_q*_K_ref with make_qkx2_quants / make_qx_quants / make_q3_quants),
written here with float32 scalars in the C code's order of operations.

The gguf package cannot quantize K-types, so this literal version is the oracle: the
vectorised quantizers must produce the same bytes. (llama.cpp itself gives these bytes when
built without FMA contraction; with it, last-bit differences in sums can flip a near-tie.)
"""
from __future__ import annotations

import numpy as np
import pytest

from kiln import formats

F = np.float32
EPS = F(1e-15)


def nearest_int(v) -> int:
    # ggml's trick: adding 1.5 * 2**23 leaves the rounded integer in the low mantissa bits
    bits = np.array([F(v) + F(12582912.0)], dtype=np.float32).view(np.int32)[0]
    return int((bits & 0x007FFFFF) - 0x00400000)


def f16(v) -> F:
    return F(np.float16(v))


def f16b(v) -> list[int]:
    return list(np.array([v], dtype=np.float16).view(np.uint8))


def qkx2(x, w, nmax, rmin, rdelta, nstep, use_mad):
    n = len(x)
    lo, hi = x[0], x[0]
    sum_w = w[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        lo = min(lo, x[i])
        hi = max(hi, x[i])
        sum_w += w[i]
        sum_x += w[i] * x[i]
    if lo > 0:
        lo = F(0)
    if hi == lo:
        return F(0), -lo, [0] * n
    iscale = F(nmax) / (hi - lo)
    scale = F(1) / iscale
    L = [max(0, min(nmax, nearest_int(iscale * (x[i] - lo)))) for i in range(n)]
    best = F(0)
    for i in range(n):
        diff = scale * F(L[i]) + lo - x[i]
        best += w[i] * (abs(diff) if use_mad else diff * diff)
    for step in range(nstep + 1):
        iscale = (F(rmin) + F(rdelta) * F(step) + F(nmax)) / (hi - lo)
        aux = [max(0, min(nmax, nearest_int(iscale * (x[i] - lo)))) for i in range(n)]
        sl = sl2 = sxl = F(0)
        for i in range(n):
            wl = w[i] * F(aux[i])
            sl += wl
            sl2 += wl * F(aux[i])
            sxl += wl * x[i]
        D = sum_w * sl2 - sl * sl
        if D > 0:
            this_scale = (sum_w * sxl - sum_x * sl) / D
            this_min = (sl2 * sum_x - sl * sxl) / D
            if this_min > 0:
                this_min = F(0)
                this_scale = sxl / sl2
            err = F(0)
            for i in range(n):
                diff = this_scale * F(aux[i]) + this_min - x[i]
                err += w[i] * (abs(diff) if use_mad else diff * diff)
            if err < best:
                L, best, scale, lo = aux, err, this_scale, this_min
    return scale, -lo, L


def qx(x, nmax):
    amax, peak = F(0), F(0)
    for v in x:
        if abs(v) > amax:
            amax, peak = abs(v), v
    if amax < EPS:
        return F(0), [0] * len(x)

    def fit(iscale):
        ls = [max(-nmax, min(nmax - 1, nearest_int(iscale * v))) for v in x]
        slx = sl2 = F(0)
        for v, l in zip(x, ls):
            w = v * v
            slx += w * v * F(l)
            sl2 += w * F(l) * F(l)
        return ls, slx, sl2

    L, slx, sl2 = fit(F(-nmax) / peak)
    scale = slx / sl2 if sl2 else F(0)
    best = scale * slx
    for step in range(-9, 10):
        if step == 0:
            continue
        cand, slx, sl2 = fit(-(F(nmax) + F(0.1) * F(step)) / peak)
        if sl2 > 0 and slx * slx > best * sl2:
            L, scale = cand, slx / sl2
            best = scale * slx
    return scale, [l + nmax for l in L]


def q3(x, nmax):
    amax, peak = F(0), F(0)
    for v in x:
        if abs(v) > amax:
            amax, peak = abs(v), v
    if amax < EPS:
        return F(0), [0] * len(x)
    iscale = F(-nmax) / peak
    L = [max(-nmax, min(nmax - 1, nearest_int(iscale * v))) for v in x]
    slx = sl2 = F(0)
    for v, l in zip(x, L):
        w = v * v
        slx += w * v * F(l)
        sl2 += w * F(l) * F(l)
    for _ in range(5):
        changed = 0
        for i, v in enumerate(x):
            w = v * v
            s1 = slx - w * v * F(L[i])
            if s1 > 0:
                s2 = sl2 - w * F(L[i]) * F(L[i])
                new = max(-nmax, min(nmax - 1, nearest_int(v * s2 / s1)))
                if new != L[i]:
                    s1 += w * v * F(new)
                    s2 += w * F(new) * F(new)
                    if s2 > 0 and s1 * s1 * sl2 > slx * slx * s2:
                        L[i], slx, sl2 = new, s1, s2
                        changed += 1
        if not changed:
            break
    return (slx / sl2 if sl2 > 0 else F(0)), [l + nmax for l in L]


def ref_q4_q5_k(x, nmax):
    rmin, nstep = (-1.0, 20) if nmax == 15 else (-0.5, 15)
    scales, mins, L = [], [], []
    for j in range(8):
        sub = x[32 * j: 32 * j + 32]
        s2 = F(0)
        for v in sub:
            s2 += v * v
        av = np.sqrt(s2 / F(32))
        sc, mn, l = qkx2(sub, [av + abs(v) for v in sub], nmax, rmin, 0.1, nstep, False)
        scales.append(sc)
        mins.append(mn)
        L += l
    max_scale = max([F(0)] + scales)
    max_min = max([F(0)] + mins)
    inv_s = F(63) / max_scale if max_scale > 0 else F(0)
    inv_m = F(63) / max_min if max_min > 0 else F(0)
    ls = [min(63, nearest_int(inv_s * s) & 0xFF) for s in scales]
    lm = [min(63, nearest_int(inv_m * m) & 0xFF) for m in mins]
    packed = [0] * 12
    for j in range(8):
        if j < 4:
            packed[j], packed[j + 4] = ls[j], lm[j]
        else:
            packed[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4)
            packed[j - 4] |= (ls[j] >> 4) << 6
            packed[j] |= (lm[j] >> 4) << 6
    d, dmin = max_scale / F(63), max_min / F(63)
    for j in range(8):
        dl = f16(d) * F(ls[j])
        if not dl:
            continue
        ml = f16(dmin) * F(lm[j])
        for i in range(32 * j, 32 * j + 32):
            L[i] = max(0, min(nmax, nearest_int((x[i] + ml) / dl)))
    qs = [0] * 128
    qh = [0] * 32
    for g in range(4):
        for l in range(32):
            a, b = L[64 * g + l], L[64 * g + 32 + l]
            qs[32 * g + l] = (a & 0xF) | ((b & 0xF) << 4)
            qh[l] |= ((a >> 4) << (2 * g)) | ((b >> 4) << (2 * g + 1))
    body = qs if nmax == 15 else qh + qs
    return f16b(d) + f16b(dmin) + packed + body


def ref_q6_k(x):
    scales, L = [], []
    for j in range(16):
        s, l = qx(x[16 * j: 16 * j + 16], 32)
        scales.append(s)
        L += l
    amax, peak = F(0), F(0)
    for s in scales:
        if abs(s) > amax:
            amax, peak = abs(s), s
    if amax < EPS:
        return [0] * 210
    iscale = F(-128) / peak
    sc = [min(127, nearest_int(iscale * s)) for s in scales]
    for j in range(16):
        dl = f16(F(1) / iscale) * F(sc[j])
        if not dl:
            continue
        for i in range(16 * j, 16 * j + 16):
            L[i] = max(-32, min(31, nearest_int(x[i] / dl))) + 32
    ql, qh = [0] * 128, [0] * 64
    for h in range(2):
        for l in range(32):
            q = [L[128 * h + 32 * k + l] for k in range(4)]
            ql[64 * h + l] = (q[0] & 0xF) | ((q[2] & 0xF) << 4)
            ql[64 * h + 32 + l] = (q[1] & 0xF) | ((q[3] & 0xF) << 4)
            qh[32 * h + l] = sum((q[k] >> 4) << (2 * k) for k in range(4))
    return ql + qh + [s & 0xFF for s in sc] + f16b(F(1) / iscale)


def ref_q3_k(x):
    scales, L = [], []
    for j in range(16):
        s, l = q3(x[16 * j: 16 * j + 16], 4)
        scales.append(s)
        L += l
    amax, peak = F(0), F(0)
    for s in scales:
        if abs(s) > amax:
            amax, peak = abs(s), s
    packed = [0] * 12
    d = F(0)
    if peak:
        iscale = F(-32) / peak
        for j in range(16):
            code = max(-32, min(31, nearest_int(iscale * scales[j]))) + 32
            if j < 8:
                packed[j] = code & 0xF
            else:
                packed[j - 8] |= (code & 0xF) << 4
            packed[8 + j % 4] |= (code >> 4) << (2 * (j // 4))
        d = F(1) / iscale
    for j in range(16):
        low = packed[j] & 0xF if j < 8 else packed[j - 8] >> 4
        sc = (low | (((packed[8 + j % 4] >> (2 * (j // 4))) & 3) << 4)) - 32
        dl = f16(d) * F(sc)
        if not dl:
            continue
        for i in range(16 * j, 16 * j + 16):
            L[i] = max(-4, min(3, nearest_int(x[i] / dl))) + 4
    hmask = [0] * 32
    for i in range(256):
        if L[i] > 3:
            hmask[i % 32] |= 1 << (i // 32)
            L[i] -= 4
    qs = [0] * 64
    for h in range(2):
        for l in range(32):
            qs[32 * h + l] = sum(L[128 * h + 32 * k + l] << (2 * k) for k in range(4))
    return hmask + qs + packed + f16b(d)


def ref_q2_k(x):
    scales, mins, L = [], [], []
    for j in range(16):
        sub = x[16 * j: 16 * j + 16]
        s, m, l = qkx2(sub, [abs(v) for v in sub], 3, -0.5, 0.1, 15, True)
        scales.append(s)
        mins.append(m)
        L += l
    max_scale = max([F(0)] + scales)
    max_min = max([F(0)] + mins)
    packed = [0] * 16
    d = dmin = F(0)
    if max_scale > 0:
        packed = [nearest_int(F(15) / max_scale * s) & 0xFF for s in scales]
        d = max_scale / F(15)
    if max_min > 0:
        packed = [(p | (nearest_int(F(15) / max_min * m) << 4)) & 0xFF for p, m in zip(packed, mins)]
        dmin = max_min / F(15)
    for j in range(16):
        dl = f16(d) * F(packed[j] & 0xF)
        if not dl:
            continue
        ml = f16(dmin) * F(packed[j] >> 4)
        for i in range(16 * j, 16 * j + 16):
            L[i] = max(0, min(3, nearest_int((x[i] + ml) / dl)))
    qs = [0] * 64
    for h in range(2):
        for l in range(32):
            qs[32 * h + l] = sum(L[128 * h + 32 * k + l] << (2 * k) for k in range(4))
    return packed + qs + f16b(d) + f16b(dmin)


REFERENCES = {
    "q2_k": ref_q2_k,
    "q3_k": ref_q3_k,
    "q4_k": lambda x: ref_q4_q5_k(x, 15),
    "q5_k": lambda x: ref_q4_q5_k(x, 31),
    "q6_k": ref_q6_k,
}


def awkward_blocks(seed: int) -> np.ndarray:
    """Super-blocks that exercise the special cases of the reference as well as plain data."""
    rng = np.random.default_rng(seed)
    b = rng.standard_normal((6, 256))
    b[1, :32] = 0                       # zero sub-blocks inside a live super-block
    b[1, 100:116] = -0.75               # a constant negative run (flat after min <= 0)
    b[2] = np.abs(b[2]) + 0.5           # all positive: the min is pinned at zero
    b[3] *= 1e-3
    b[3, 7] = 40                        # one outlier dominating its super-block
    b[4] = np.round(b[4] * 4) / 4       # many exact ties
    b[5] = rng.standard_t(3, 256) * 0.02  # heavy tails, small scale
    plain = rng.standard_normal((10, 256))
    return np.concatenate([b, plain]).astype(np.float32)


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_vectorised_quantizer_follows_the_reference_algorithm(name):
    fmt = formats.get(name)
    blocks = awkward_blocks(7)
    ours = fmt.quantize_blocks(blocks)
    ref = np.array([REFERENCES[name](list(row)) for row in blocks], dtype=np.uint8)
    same = np.all(ours == ref, axis=1)
    assert same.all(), f"{name}: super-blocks differing from the reference: {np.flatnonzero(~same)}"


@pytest.mark.parametrize("name", ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"])
def test_compiled_searches_give_each_block_its_own_bytes(name):
    """The compiled searches run sub-blocks side by side in tiles of 64, padding the last one:
    a super-block's bytes must not depend on its neighbours or on where a tile ends (each
    block quantized alone, and 19 together with a partial tile, importance-weighted too)."""
    from kiln.formats import _kquant_native
    fmt = formats.get(name)
    rng = np.random.default_rng(12)
    blocks = np.concatenate([awkward_blocks(9), rng.standard_normal((3, 256)).astype(F)])
    assert (blocks.size // 16) % _kquant_native._TILE
    together = fmt.quantize_blocks(blocks)
    alone = np.concatenate([fmt.quantize_blocks(b[None]) for b in blocks])
    assert np.array_equal(together, alone)
    qw = rng.uniform(0.1, 2.0, blocks.shape).astype(F)
    sigma2 = (blocks * blocks).mean(axis=1, keepdims=True).astype(F)
    together = fmt.quantize_blocks_weighted(blocks, qw, sigma2)
    alone = np.concatenate([fmt.quantize_blocks_weighted(b[None], w[None], s[None])
                            for b, w, s in zip(blocks, qw, sigma2)])
    assert np.array_equal(together, alone)


def test_kiln_nearest_int_is_ggmls():
    """kiln's vectorised nearest_int against ggml's float trick (this file's scalar rendering),
    on ties, near-ties and the range codes and scales take."""
    from kiln.formats._blocks import nearest_int as kiln_nearest_int
    ties = np.arange(-300, 301, dtype=np.float32) + F(0.5)
    near = np.concatenate([np.nextafter(ties, F(np.inf)), np.nextafter(ties, F(-np.inf))])
    rng = np.random.default_rng(8)
    values = np.concatenate([ties, near, rng.uniform(-4e6, 4e6, 2000).astype(F), np.array([0.0, -0.0], F)])
    ours = kiln_nearest_int(values)
    assert ours.dtype == np.int32
    assert ours.tolist() == [nearest_int(v) for v in values]


def test_all_zero_and_constant_super_blocks():
    zero = np.zeros((2, 256), np.float32)
    const = np.full((2, 256), -1.25, np.float32)
    const[1] = 2.0
    for name, ref in REFERENCES.items():
        fmt = formats.get(name)
        for x in (zero, const):
            ours = fmt.quantize_blocks(x)
            assert np.array_equal(ours, np.array([ref(list(r)) for r in x], dtype=np.uint8)), name


def test_sums_add_rows_in_order_from_zero():
    """kquant's sums over the rows of [n, S] reduce in one numpy call where that call adds row
    by row from +0: on this numpy it must equal the reference's loop bit for bit, on data whose
    sum depends on the order (wide magnitudes, cancellations, all-negative-zero columns)."""
    from kiln.formats._kquant import _sum
    rng = np.random.default_rng(11)
    for n in (1, 2, 8, 16, 32, 33):
        for columns in (1, 15, 16, 17, 100, 4096):
            terms = (rng.standard_normal((n, columns)) * 10.0 ** rng.integers(-8, 9, (n, columns))).astype(F)
            terms[:, 0] = F(-0.0)
            loop = terms[0] + F(0)
            for row in terms[1:]:
                loop = loop + row
            for layout in (terms, np.asfortranarray(terms)):
                got = _sum(layout)
                assert got.view(np.uint32).tolist() == loop.view(np.uint32).tolist(), (n, columns)


@pytest.mark.parametrize("name", ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q4_0", "q5_1"])
def test_threads_do_not_change_the_bytes(name, monkeypatch):
    """The quantizers' chunks on several threads give the bytes of one thread, joined in
    order; a quantizer called from a worker (nested) runs in place rather than waiting on the
    pool it occupies."""
    from kiln.formats import _blocks
    monkeypatch.setattr(_blocks, "CHUNK_ELEMENTS", 4 * 256)
    fmt = formats.get(name)
    rng = np.random.default_rng(3)
    x = np.concatenate([awkward_blocks(5), rng.standard_normal((48, 256)).astype(F)]).reshape(-1, 1024)
    importance = rng.uniform(0.1, 2.0, 1024).astype(F)
    try:
        _blocks.set_threads(1)
        serial = fmt.quantize(x), fmt.quantize(x, importance)
        _blocks.set_threads(3)
        threaded = fmt.quantize(x), fmt.quantize(x, importance)
        nested = _blocks.map_chunks(lambda _: fmt.quantize(x), range(4))
    finally:
        _blocks.set_threads(None)
    assert np.array_equal(serial[0], threaded[0]) and np.array_equal(serial[1], threaded[1])
    assert all(np.array_equal(serial[0], r) for r in nested)


def test_thread_count_must_be_positive():
    with pytest.raises(ValueError, match="at least 1"):
        formats.set_threads(0)
