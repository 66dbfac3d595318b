"""The CPU attention kernel for prefill (more than one new token a row), written as TIR.

The decode kernel in :mod:`.attention` runs one task per (row, head, query) and walks the keys
one at a time: a 16-lane dot product, a horizontal sum and a libm ``expf`` call per key and
query. At a prompt's depth that is most of a chunk's time (SmolLM2, a 256-token chunk 7,000
tokens deep: 3.8 s, where ONNX Runtime takes 0.8 s), so a long prompt stalls the rows that
wait on its chunks.

Here a task holds a block of ``QB`` consecutive queries of one head and walks the keys ``KB``
at a time, as flash attention does:

- the query block is kept transposed, ``[head_dim, QB]``, so a block of scores is ``head_dim``
  vector multiply-adds per key with each key's element broadcast: no horizontal sums;
- the running maximum, sum and rescaling are vectors over the block's queries, and the
  exponentials use :func:`_exp` (a polynomial that vectorizes; LLVM turns a vector ``exp``
  into one ``expf`` call per lane);
- the keys and values of a block are read once into float32 scratch (a float16 cache is
  widened there), then serve every query of the block.

A key is visible to query i (absolute position ``lengths[row] + i``) when it is not after it and,
for sliding-window models, within the window; masked scores count as exactly zero weight.
The float32 sums run in another order than the decode kernel's: the two agree to rounding.
"""
from __future__ import annotations

from tvm.script import tirx as T

QB = 16      # queries a task holds: the lanes of its score, maximum and sum vectors
KB = 16      # keys per online-softmax update
NEG = -3.4028234663852886e38
LOG2E = 1.4426950408889634
LN2_HI, LN2_LO = 0.693359375, -2.12194440e-4     # ln 2 split so n·LN2_HI is exact
# e^r - 1 - r = r²·P(r) for |r| <= ln2/2: the minimax coefficients of Cephes' expf
EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
            5.0000001201e-1)


def _exp(x):
    """e^x for x <= 0, to about one float32 ulp, from +-*/, floor and an exponent shift, so a
    loop of them vectorizes. Inputs below -87 give 2^-126-ish, not zero: callers mask."""
    x = T.max(x, T.float32(-87.0))
    n = T.floor(x * T.float32(LOG2E) + T.float32(0.5))
    r = x - n * T.float32(LN2_HI) - n * T.float32(LN2_LO)
    p = T.float32(EXP_POLY[0])
    for c in EXP_POLY[1:]:
        p = p * r + T.float32(c)
    two_n = T.reinterpret("float32", T.shift_left(T.Cast("int32", n) + 127, 23))
    return (p * r * r + r + T.float32(1.0)) * two_n


def _sum(terms: list):
    """One expression adding the terms pairwise: a sum written as a loop of buffer updates is
    stored and reloaded every step (the scratch buffers live in the workspace, which LLVM must
    assume may alias), a chain of store-to-load latencies; this is one store at the end and a
    tree of independent multiply-adds."""
    while len(terms) > 1:
        terms = [terms[i] + terms[i + 1] if i + 1 < len(terms) else terms[i] for i in range(0, len(terms), 2)]
    return terms[0]


def attention_prefill_cpu(heads: int, kv_heads: int, head_dim: int, scale: float, window: int,
                          softcap: float = 0.0, sinks: bool = False, cache_dtype: str = "float32"):
    """(q [b, H, s, D], k_cache, v_cache, lengths int32 [b], sinks [H]) -> out [b, s, H*D], as
    :func:`.attention.attention` (sinks included); for any s >= 1, fastest when s is a multiple of QB."""
    H, KV, D, CD = heads, kv_heads, head_dim, cache_dtype
    group = H // KV
    scale, softcap, window = float(scale), float(softcap), int(window)
    windowed = window > 0

    def capped(score):
        return T.tanh(score / T.float32(softcap)) * T.float32(softcap) if softcap else score

    def visible(j, pos, k, kn):
        seen = T.And(k < kn, j <= pos)
        return T.And(seen, j > pos - window) if windowed else seen

    @T.prim_func(private=True)
    def attention_prefill(q_h: T.handle, kc_h: T.handle, vc_h: T.handle, len_h: T.handle, s_h: T.handle,
                          o_h: T.handle):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        b, s, cap = T.int64(), T.int64(), T.int64()
        Q = T.match_buffer(q_h, (b, H, s, D), "float32")
        KC = T.match_buffer(kc_h, (b, KV, cap, D), CD, offset_factor=1)
        VC = T.match_buffer(vc_h, (b, KV, cap, D), CD, offset_factor=1)
        L = T.match_buffer(len_h, (b,), "int32")
        S = T.match_buffer(s_h, (H,), "float32")
        O = T.match_buffer(o_h, (b, s, H * D), "float32")
        blocks = (s + QB - 1) // QB
        for task in T.parallel(b * H * blocks):
            # default scope: stack buffers (see attention.py)
            qt = T.alloc_buffer((D, QB), "float32")       # the queries, transposed and scaled
            kb = T.alloc_buffer((KB, D), "float32")
            vb = T.alloc_buffer((KB, D), "float32")
            sc = T.alloc_buffer((KB, QB), "float32")      # scores, then weights
            acc = T.alloc_buffer((QB, D), "float32")
            mx = T.alloc_buffer((QB,), "float32")
            sm = T.alloc_buffer((QB,), "float32")
            alpha = T.alloc_buffer((QB,), "float32")
            r = task // (H * blocks)
            h = task // blocks % H
            g = h // group
            i0 = task % blocks * QB
            qn = T.min(T.int64(QB), s - i0)
            first = T.Cast("int64", L[r]) + i0            # the block's first query's position
            start = T.max(first - window + 1, T.int64(0)) if windowed else T.int64(0)
            end = first + qn                               # keys [start, end) can be visible
            for d in range(D):
                for q in T.vectorized(T.int64(QB)):
                    qt[d, q] = T.float32(0)
            for q in range(qn):
                for d in range(D):
                    qt[d, q] = Q[r, h, i0 + q, d] * T.float32(scale)
            for q in T.vectorized(T.int64(QB)):
                # gpt-oss's sink: a key of logit S[h] and no value, counted before the first key
                mx[q] = S[h] if sinks else T.float32(NEG)
                sm[q] = T.float32(1) if sinks else T.float32(0)
            for q in range(T.int64(QB)):
                for d in T.vectorized(D):
                    acc[q, d] = T.float32(0)
            for blk in range((end - start + KB - 1) // KB):
                j0 = start + blk * KB
                kn = T.min(T.int64(KB), end - j0)
                for k in range(T.int64(KB)):
                    for d in T.vectorized(D):
                        kb[k, d] = T.if_then_else(k < kn, T.Cast("float32", KC[r, g, T.min(j0 + k, end - 1), d]),
                                                  T.float32(0))
                        vb[k, d] = T.if_then_else(k < kn, T.Cast("float32", VC[r, g, T.min(j0 + k, end - 1), d]),
                                                  T.float32(0))
                for k in range(T.int64(KB)):
                    for q in T.vectorized(T.int64(QB)):
                        sc[k, q] = _sum([qt[d, q] * kb[k, d] for d in range(D)])
                for q in T.vectorized(T.int64(QB)):
                    alpha[q] = mx[q]
                for k in range(T.int64(KB)):
                    for q in T.vectorized(T.int64(QB)):
                        sc[k, q] = T.if_then_else(visible(j0 + k, first + q, k, kn), capped(sc[k, q]), T.float32(NEG))
                        mx[q] = T.max(mx[q], sc[k, q])
                for q in T.vectorized(T.int64(QB)):
                    # all-masked so far: NEG - NEG = 0 gives 1, harmless on a zero sum
                    alpha[q] = _exp(alpha[q] - mx[q])
                    sm[q] = sm[q] * alpha[q]
                for k in range(T.int64(KB)):
                    for q in T.vectorized(T.int64(QB)):
                        sc[k, q] = T.if_then_else(sc[k, q] > T.float32(NEG / 2), _exp(sc[k, q] - mx[q]), T.float32(0))
                        sm[q] = sm[q] + sc[k, q]
                for q in range(qn):
                    for d in T.vectorized(D):
                        acc[q, d] = acc[q, d] * alpha[q] + _sum([sc[k, q] * vb[k, d] for k in range(KB)])
            for q in range(qn):
                for d in T.vectorized(D):
                    O[r, i0 + q, h * D + d] = acc[q, d] / sm[q]
    return attention_prefill
