"""How a CPU GEMV reads one 16-row tile of a block weight: prefetch, scales, weight vectors.

The dense matmuls (:mod:`.quant_kernels`) and the MoE experts (:mod:`.moe`) read blocks the
same way, so a row's arithmetic is the same in both: the scales of a chunk of 32 k's are
computed once into small buffers (``hoist_scales``), each 16-lane weight vector is
scale · (code − offset) (+ bias) (``store_weight``; on AVX-512 a 4-bit code becomes its
float through one ``vpermps``), and the blocks ``PREFETCH_CHUNKS`` chunks ahead are
prefetched into the cache (``prefetch``).
"""
from __future__ import annotations

import numpy as np

from .quant_layout import CHUNK, LANES, _array_dtypes, _array_names, _array_shapes, _split

# GEMVs prefetch their blocks this many chunks of 32 k's ahead (a tile's 16 rows: 4 KB of Q4_0
# codes). The hardware's prefetchers alone left 1B-shape decode GEMVs at 18-22 GB/s of this
# machine's 35; with it, 31-35 (``benchmarks/tvm_quant_gemv.py``-style timing, weights cold)
PREFETCH_CHUNKS = 16


class TileReader:
    """TIR for reading the tiles of ``W`` (a ``quant_layout._Weights`` over an [n, k] weight)
    inside a prim func being built with ``T`` (the tirx IR builder). ``wide``: the target has
    AVX-512 (32 vector registers, ``vpermps``)."""

    def __init__(self, T, W, n: int, k: int, wide: bool, prefetch_ahead: int = PREFETCH_CHUNKS,
                 fold_offset: bool = False):
        from tvm import tirx
        self.T, self.W, self.spec, self.n, self.k = T, W, W.spec, n, k
        self.groups = CHUNK // self.spec.group
        self.prefetch_ahead = prefetch_ahead
        self.permute = wide and self.spec.planes == (4,)
        # bias-free 4- and 8-bit codes in groups of 32 (q4_0, q8_0): the group's scale
        # multiplies the float32 sum of (code − offset) · x once, instead of every weight
        spec = self.spec
        self.scale_after_sum = not spec.bias and spec.group == CHUNK and spec.planes in ((4,), (8,))
        # ``fold_offset``, without vpermps (AVX2): a 4-bit code's offset is not subtracted
        # from every weight vector (an integer subtract per 8 lanes) but once per chunk and
        # row, Σ code·x − offset · Σ x, with offset · Σ x (``unfold_term``) computed by the
        # caller once for all tiles (computed in each tile's loop it cost more than it saved)
        self.fold_offset = (fold_offset and self.scale_after_sum and spec.planes == (4,) and not self.permute
                            and bool(spec.offset))
        # the 16 values (code − offset) of a 4-bit code, vpermps's table
        self.table = tirx.Ramp(tirx.const(-float(self.spec.offset), "float32"), tirx.const(1.0, "float32"), LANES)

    def prefetch(self, t, c, following=None):
        """Software prefetch of tile t's blocks ``prefetch_ahead`` chunks past chunk c (the
        hardware's stream prefetcher alone leaves decode GEMVs well below bandwidth). Past the
        tile's end it reads on into tile t + 1, which a prefetch may do, or, given
        ``following``, into that tile (the one the loop reads next)."""
        from tvm import tirx
        if not self.prefetch_ahead:
            return
        if following is not None:
            chunks = self.k // CHUNK
            ahead = c + self.prefetch_ahead
            t = tirx.Select(ahead < chunks, t, following)
            c = tirx.Select(ahead < chunks, c, c - chunks)
        for name, shp, dt in zip(_array_names(self.spec), _array_shapes(self.spec, self.n, self.k),
                                 _array_dtypes(self.spec)):
            buf, size = self.W.bufs[name], np.dtype(dt).itemsize
            per_chunk = shp[1] * LANES * CHUNK // self.k          # elements of a tile per 32 k's
            for line in range(max(1, per_chunk * size // 64)):
                off = (c + self.prefetch_ahead) * per_chunk + line * (64 // size)
                self.T.evaluate(tirx.call_llvm_intrin(
                    "void", "llvm.prefetch.p0", tirx.address_of(buf[t, off // LANES, off % LANES]),
                    tirx.const(0, "int32"), tirx.const(3, "int32"), tirx.const(1, "int32")))

    def hoist_scales(self, t, c, scb, bib):
        """Chunk c's scales (and biases) of tile t into scb (bib), [groups, LANES] buffers."""
        T, spec = self.T, self.spec
        for g in range(self.groups):
            with T.vectorized(0, LANES) as lane:
                s, bias = self.W.scale_bias(t, c, CHUNK, g * spec.group, lane)
                T.buffer_store(scb, s, [g, lane])
                if bias is not None:
                    T.buffer_store(bib, bias, [g, lane])

    def weight(self, t, c, kk, lane, scb, bib):
        """Lane ``lane`` of the weight vector at k = c·32 + kk, from the hoisted scales."""
        g = kk // self.spec.group
        return self.W.combine(scb[g, lane], bib[g, lane] if self.spec.bias else None, self.W.code(t, c, CHUNK, kk, lane))

    def permuted_weight(self, t, c, kk, scb, bib):
        """The same vector as ``weight``'s lanes, a 4-bit code made float by one vpermps (the
        instruction reads only each index's low 4 bits, so the code needs a shift and no mask)."""
        from tvm import tirx
        idx, pos = _split(c, CHUNK, kk, 8)
        word = self.W.bufs["bits4"][t, idx, tirx.Ramp(0, 1, LANES)]
        if pos:
            word = tirx.shift_right(word, tirx.Broadcast(tirx.const(4 * pos, "uint32"), LANES))
        q = tirx.call_llvm_pure_intrin("float32x16", "llvm.x86.avx512.permvar.sf.512", self.table,
                                       tirx.reinterpret("int32x16", word))
        g = kk // self.spec.group
        w = scb[g, tirx.Ramp(0, 1, LANES)] * q
        return w + bib[g, tirx.Ramp(0, 1, LANES)] if self.spec.bias else w

    def store_weight(self, wv, t, c, kk, scb, bib):
        """The weight vector at k = c·32 + kk into the 16-lane buffer wv."""
        from tvm import tirx
        T = self.T
        if self.permute:
            T.buffer_store(wv, self.permuted_weight(t, c, kk, scb, bib), [tirx.Ramp(0, 1, LANES)])
        else:
            with T.vectorized(0, LANES) as lane:
                T.buffer_store(wv, self.weight(t, c, kk, lane, scb, bib), [lane])

    def signed_code(self, t, c, kk):
        """(code − offset) as float32x16, exact, for ``scale_after_sum`` formats: a 4-bit code
        through the vpermps table; an 8-bit one (stored code + 128) as the signed byte of its
        word xor 0x80. With ``fold_offset`` the 4-bit code itself (see ``unfold_term``)."""
        from tvm import tirx
        ramp = tirx.Ramp(0, 1, LANES)
        if self.spec.planes == (4,):
            idx, pos = _split(c, CHUNK, kk, 8)
            word = self.W.bufs["bits4"][t, idx, ramp]
            if pos:
                word = tirx.shift_right(word, tirx.Broadcast(tirx.const(4 * pos, "uint32"), LANES))
            if self.permute:
                return tirx.call_llvm_pure_intrin("float32x16", "llvm.x86.avx512.permvar.sf.512", self.table,
                                                  tirx.reinterpret("int32x16", word))
            if pos < 7:
                word = tirx.bitwise_and(word, tirx.Broadcast(tirx.const(0xF, "uint32"), LANES))
            code = tirx.reinterpret("int32x16", word)
            if not self.fold_offset:
                code = code - tirx.Broadcast(tirx.const(self.spec.offset, "int32"), LANES)
            return tirx.Cast("float32x16", code)
        idx, pos = _split(c, CHUNK, kk, 4)
        word = tirx.bitwise_xor(self.W.bufs["bits8"][t, idx, ramp],
                                tirx.Broadcast(tirx.const(0x80808080, "uint32"), LANES))
        word = tirx.reinterpret("int32x16", word)
        if pos < 3:
            word = tirx.shift_left(word, tirx.Broadcast(tirx.const(24 - 8 * pos, "int32"), LANES))
        return tirx.Cast("float32x16", tirx.shift_right(word, tirx.Broadcast(tirx.const(24, "int32"), LANES)))

    def unfold_term(self, x_at):
        """offset · Σ_kk x_at(kk) over a chunk (added pairwise): what ``fold_offset`` takes
        from a chunk's Σ code · x to make it Σ (code − offset) · x."""
        from tvm import tirx
        xs = [x_at(kk) for kk in range(CHUNK)]
        while len(xs) > 1:
            xs = [xs[j] + xs[j + 1] for j in range(0, len(xs), 2)]
        return xs[0] * tirx.const(float(self.spec.offset), "float32")

    def accumulate_chunk(self, acc, part, wv, scb, bib, t, c, x_at, accs: int):
        """acc (float32 [LANES]) += Σ_kk x_at(kk) · w[tile t, k = c·32 + kk] over chunk c, in
        ``accs`` partial sums (independent FMA chains) added pairwise; ``part`` is [accs,
        LANES], ``wv`` [LANES], ``scb``/``bib`` [groups, LANES] scratch. The order of the sums
        is fixed, so a row's result does not depend on what else the kernel computes."""
        from tvm import tirx
        T = self.T
        ramp = tirx.Ramp(0, 1, LANES)
        self.hoist_scales(t, c, scb, bib)
        for a in range(accs):
            T.buffer_store(part, tirx.Broadcast(tirx.const(0, "float32"), LANES), [a, ramp])
        for kk in range(CHUNK):
            if self.scale_after_sum:
                T.buffer_store(wv, self.signed_code(t, c, kk), [ramp])
            else:
                self.store_weight(wv, t, c, kk, scb, bib)
            a = kk % accs
            T.buffer_store(part, part[a, ramp] + tirx.Broadcast(x_at(kk), LANES) * wv[ramp], [a, ramp])
        parts = [part[a, ramp] for a in range(accs)]
        while len(parts) > 1:       # pairwise
            parts = [parts[j] + parts[j + 1] for j in range(0, len(parts), 2)]
        total = scb[0, ramp] * parts[0] if self.scale_after_sum else parts[0]
        T.buffer_store(acc, acc[ramp] + total, [ramp])
