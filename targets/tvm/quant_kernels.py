"""Matmuls and embedding lookups that read GGUF blocks as they are, written as TIR.

The contract with :mod:`.lower`::

    SUPPORTED                      kiln format names with a fused kernel (every one listed below)
    pack(weight) -> {name: array}  what the artifact stores for a [n, k] block weight
    matmul(bb, x, packed, fmt, n, k, target, *, exact=True) -> relax.Expr
        x float32 [..., k] (symbolic leading dims) @ wᵀ -> float32 [..., n]; ``packed`` are the
        Relax values of ``pack``'s arrays, in its order
    gather(bb, ids, packed, fmt, n, k, target) -> relax.Expr
        ids int64 [...] -> float32 [..., k], the rows of the same arrays (ids outside 0..n-1
        are clamped, as ``relax.op.take(mode="clip")`` does)

The stored layout and the arithmetic of one weight are :mod:`.quant_layout`'s.

``exact=False`` (kiln's fast precision) changes the CPU kernels only. On AVX-512 VNNI, for
q4_0, q4_1, q4_k, q6_k and q8_0, x is quantized to int8 per 32 values (scale max|x|/127, as
llama.cpp quantizes activations) and ``vpdpbusd`` sums code × x in int32, 64 byte products an
instruction; each scale group is scaled once and a bias multiplies the int8 x's own sum, as
llama.cpp's Q8_1 dot products do (a Q4_1 decode product ~3x faster, error ~2e-3 of the summed
|products|). The GEMV (M ≤ 8, decode) and the GEMM (prefill) compute a row alike. Without VNNI,
the GEMV sums code · x per scale group in float32, scales it once and applies the bias to the
group's sum of x (10–30% faster, rounding like the exact path); the GEMM stays float32.

Kernels by target (one prim func per (format, n, k, target), marked ``tirx.is_scheduled`` so
dlight leaves it alone):

* CPU (llvm): one function whose path is chosen by the row count M at run time (a chain of
  TIR ifs; decode is M = 1). M ≤ 8: a GEMV parallel over 16-row tiles; each 16-lane weight
  vector is dequantized once per pass over 1, 2, 4 or 8 rows of x (M = 1, 2, ≤ 4, ≤ 8; at
  most 2 without AVX-512's registers) into enough accumulators that the FMA chains do not
  wait on their own latency, the same number a row at every M, so a row's sums do not depend
  on M (batch invariance); the sub-block scales are computed once per 32 k's. M > 8: per task
  of one tile (two on AVX-512) the weights of a k-chunk (≤ 512 k's) are dequantized into a float32 buffer once, then a register-blocked
  product runs over the rows, 6 at a time (2 without AVX2 or NEON; rows past the end repeat
  the last row, so the inner loop has no branch).
* GPU (cuda, metal, ...; built in :mod:`.quant_kernels_gpu`): M ≤ 4: a block of 128 threads
  per tile, 16 lanes × 8 slices of k, the slices summed in shared memory. Otherwise a 16×16-thread block per (4 tiles, 32 rows)
  that stages 32 k's of dequantized weights and of x in shared memory; each thread keeps 8
  outputs (2 rows × 4 tiles) in registers, so 6 shared-memory reads feed 8 FMAs.
* gather: a token per parallel iteration (CPU) or per thread block (GPU).

The GPU kernels can be built with ``emulate=True`` (see ``kernel_common.Threads``): the same arithmetic
with the thread indices as serial loops, compiled for the CPU, which is how the tests check
their numbers on a machine without a GPU.
"""
from __future__ import annotations

import functools

from .kernel_common import cpu_shape, dims, emit_matmul, is_gpu, matmul_args, product, target_key
from .quant_kernels_gpu import _gpu_gather_func, _gpu_matmul_func
from .quant_layout import (CHUNK, LANES, SUPPORTED, _array_dtypes, _array_names, _array_shapes, _check, _FORMATS,
                           _tiles, _Weights, pack)
from .tile_reader import TileReader

__all__ = ["SUPPORTED", "pack", "matmul", "gather"]
CPU_GEMV_MAX_ROWS = 8
GEMM_INT8_ROWS = 4    # rows per register block of the int8 GEMM (2 tiles: 8 accumulators, 8 dot chains)


# ---- targets ------------------------------------------------------------------------------



# ---- CPU kernels --------------------------------------------------------------------------

def _int8_activations(fmt: str, target_key: str) -> bool:
    """Whether ``exact=False`` quantizes x to int8 for this format on this CPU target: on x86
    with AVX2 or AVX-512 VNNI, for codes of 4 or 8 bits with a scale per 32 (q4_0, q4_1, q4_k,
    q8_0) and for Q6_K's 6-bit codes with a scale per 16 (its two planes are joined into bytes
    in registers)."""
    spec = _FORMATS[fmt]
    return bool(cpu_shape(target_key).int8_dot) and ((spec.group == CHUNK and spec.planes in ((4,), (8,)))
                                           or (spec.group == 16 and spec.planes == (4, 2)))


def _k_chunk(k: int) -> int:
    """The largest multiple of 32 that divides k and is at most 512 (a GEMM k-chunk)."""
    units = k // CHUNK
    return CHUNK * max(d for d in range(1, 17) if units % d == 0)


@functools.lru_cache(maxsize=None)
def _cpu_matmul_func(fmt: str, n: int, k: int, target_key: str, fast: bool = False, lead: int = 1):
    from tvm import tirx
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    spec = _FORMATS[fmt]
    shape = cpu_shape(target_key)
    tiles = _tiles(n)
    tt = shape.tiles if tiles % shape.tiles == 0 else 1
    mb = shape.rows
    wide = shape.tiles > 1          # 32 vector registers: room for more accumulators
    int8 = _int8_activations(fmt, target_key)
    kc = _k_chunk(k)
    groups = CHUNK // spec.group
    with IRBuilder() as ib:
        with T.prim_func(private=True):
            T.func_name(f"qmm_{fmt}_{n}x{k}{'_fast' if fast else ''}")
            T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
            m_rows, x, bufs, out = matmul_args(
                T, k, tiles * LANES, lead, lambda: [T.arg(name, T.buffer(s, d)) for name, s, d in
                                                    zip(_array_names(spec), _array_shapes(spec, n, k), _array_dtypes(spec))])
            W = _Weights(spec, bufs)
            reader = TileReader(T, W, n, k, wide, fold_offset=not fast)
            prefetch, hoist_scales, weight = reader.prefetch, reader.hoist_scales, reader.weight

            def store_rows(r, mo, store):
                """``store(i)`` for each row i of a pass over ``r`` rows of x; in a pass over
                more than one, the rows past the last are not stored."""
                for i in range(r):
                    if r == 1:
                        store(i)
                    else:
                        with T.If(mo * r + i < m_rows):
                            with T.Then():
                                store(i)

            def gemv(rows_per_pass: int, accs: int):
                """Each weight vector dequantized once per pass over ``rows_per_pass`` rows of x,
                with ``accs`` accumulators per row (together at least four FMA chains)."""
                r = rows_per_pass
                with T.parallel(0, tiles) as t:
                    acc = T.alloc_buffer((r * accs, LANES), "float32")
                    wv = T.alloc_buffer((LANES,), "float32")
                    scb = T.alloc_buffer((groups, LANES), "float32")
                    bib = T.alloc_buffer((groups, LANES), "float32")
                    with T.serial(0, (m_rows + r - 1) // r) as mo:
                        rows = [T.min(mo * r + i, m_rows - 1) for i in range(r)] if r > 1 else [mo]
                        for a in range(r * accs):
                            with T.vectorized(0, LANES) as lane:
                                T.buffer_store(acc, tirx.const(0, "float32"), [a, lane])
                        with T.serial(0, k // CHUNK) as c:
                            prefetch(t, c)
                            hoist_scales(t, c, scb, bib)
                            for kk in range(CHUNK):
                                reader.store_weight(wv, t, c, kk, scb, bib)
                                for i in range(r):
                                    with T.vectorized(0, LANES) as lane:
                                        a = i * accs + kk % accs
                                        T.buffer_store(acc, acc[a, lane] + x[rows[i], c * CHUNK + kk] * wv[lane], [a, lane])
                        def store(i):
                            with T.vectorized(0, LANES) as lane:
                                parts = [acc[i * accs + a, lane] for a in range(accs)]
                                while len(parts) > 1:       # pairwise
                                    parts = [parts[j] + parts[j + 1] for j in range(0, len(parts), 2)]
                                total = parts[0]
                                T.buffer_store(out, total, [mo * r + i, t * LANES + lane])
                        store_rows(r, mo, store)

            scale_after_sum, signed_code = reader.scale_after_sum, reader.signed_code

            def gemv_scaled_groups(rows_per_pass: int, accs: int):
                """``gemv`` for ``scale_after_sum`` formats: per group and row, ``accs`` float32
                sums of (code − offset) · x, then the group's scale times their pairwise sum.
                One shift, one conversion (or permute) and one FMA per weight vector; the sums
                differ from ``gemv``'s by float32 rounding (the scale applied once, not per
                weight), and every row count rounds a row the same way. On AVX2 (no vpermps) a
                4-bit code is summed as it is stored and offset · Σ x is taken off per chunk
                (``TileReader.fold_offset``): 1.07B Q4_0 exact decode step 38.6 -> 32.8 ms."""
                r = rows_per_pass
                ramp = tirx.Ramp(0, 1, LANES)
                if reader.fold_offset:
                    # offset · Σ x per row and chunk, once for all tiles
                    xsum = T.alloc_buffer((CPU_GEMV_MAX_ROWS, k // CHUNK), "float32")
                    with T.serial(0, m_rows) as m:
                        with T.serial(0, k // CHUNK) as c:
                            T.buffer_store(xsum, reader.unfold_term(lambda kk: x[m, c * CHUNK + kk]), [m, c])
                with T.parallel(0, tiles) as t:
                    acc = T.alloc_buffer((r, LANES), "float32")
                    part = T.alloc_buffer((r * accs, LANES), "float32")
                    wv = T.alloc_buffer((LANES,), "float32")
                    scb = T.alloc_buffer((groups, LANES), "float32")
                    bib = T.alloc_buffer((groups, LANES), "float32")
                    with T.serial(0, (m_rows + r - 1) // r) as mo:
                        rows = [T.min(mo * r + i, m_rows - 1) for i in range(r)] if r > 1 else [mo]
                        for i in range(r):
                            T.buffer_store(acc, tirx.Broadcast(tirx.const(0, "float32"), LANES), [i, ramp])
                        with T.serial(0, k // CHUNK) as c:
                            prefetch(t, c)
                            hoist_scales(t, c, scb, bib)
                            for a in range(r * accs):
                                T.buffer_store(part, tirx.Broadcast(tirx.const(0, "float32"), LANES), [a, ramp])
                            for kk in range(CHUNK):
                                T.buffer_store(wv, signed_code(t, c, kk), [ramp])
                                for i in range(r):
                                    a = i * accs + kk % accs
                                    T.buffer_store(part, part[a, ramp] + tirx.Broadcast(x[rows[i], c * CHUNK + kk], LANES)
                                                   * wv[ramp], [a, ramp])
                            for i in range(r):
                                parts = [part[i * accs + a, ramp] for a in range(accs)]
                                while len(parts) > 1:       # pairwise
                                    parts = [parts[j] + parts[j + 1] for j in range(0, len(parts), 2)]
                                signed = parts[0]
                                if reader.fold_offset:
                                    signed = signed - tirx.Broadcast(xsum[rows[i], c], LANES)
                                T.buffer_store(acc, acc[i, ramp] + scb[0, ramp] * signed, [i, ramp])
                        def store(i):
                            T.buffer_store(out, acc[i, ramp], [mo * r + i, tirx.Ramp(t * LANES, 1, LANES)])
                        store_rows(r, mo, store)

            def gemv_folded(rows_per_pass: int, accs: int):
                """``exact=False``: per group, Σ code·x in float32, then scale · that +
                (bias − scale · offset) · Σ x. Four vector operations per weight vector instead
                of six; sums are reassociated, so rounding differs more than in the exact path."""
                r = rows_per_pass
                ngroups = k // spec.group
                xs = T.alloc_buffer((CPU_GEMV_MAX_ROWS, ngroups), "float32")
                with T.serial(0, m_rows) as m:
                    with T.serial(0, ngroups) as gi:
                        total = x[m, gi * spec.group]
                        for j in range(1, spec.group):
                            total = total + x[m, gi * spec.group + j]
                        T.buffer_store(xs, total, [m, gi])
                with T.parallel(0, tiles) as t:
                    acc = T.alloc_buffer((r, LANES), "float32")
                    part = T.alloc_buffer((r * accs, LANES), "float32")
                    qv = T.alloc_buffer((LANES,), "float32")
                    scb = T.alloc_buffer((groups, LANES), "float32")
                    zb = T.alloc_buffer((groups, LANES), "float32")
                    with T.serial(0, (m_rows + r - 1) // r) as mo:
                        rows = [T.min(mo * r + i, m_rows - 1) for i in range(r)] if r > 1 else [mo]
                        for i in range(r):
                            with T.vectorized(0, LANES) as lane:
                                T.buffer_store(acc, tirx.const(0, "float32"), [i, lane])
                        with T.serial(0, k // CHUNK) as c:
                            prefetch(t, c)
                            for g in range(groups):
                                with T.vectorized(0, LANES) as lane:
                                    sc, bias = W.scale_bias(t, c, CHUNK, g * spec.group, lane)
                                    T.buffer_store(scb, sc, [g, lane])
                                    zero = -(scb[g, lane] * tirx.const(float(spec.offset), "float32"))
                                    if bias is not None:
                                        zero = bias + zero if spec.offset else bias
                                    T.buffer_store(zb, zero, [g, lane])
                            for g in range(groups):
                                for a in range(r * accs):
                                    with T.vectorized(0, LANES) as lane:
                                        T.buffer_store(part, tirx.const(0, "float32"), [a, lane])
                                for kk in range(g * spec.group, (g + 1) * spec.group):
                                    with T.vectorized(0, LANES) as lane:
                                        T.buffer_store(qv, tirx.Cast("float32", W.code(t, c, CHUNK, kk, lane)), [lane])
                                    for i in range(r):
                                        with T.vectorized(0, LANES) as lane:
                                            a = i * accs + kk % accs
                                            T.buffer_store(part, part[a, lane] + x[rows[i], c * CHUNK + kk] * qv[lane], [a, lane])
                                for i in range(r):
                                    with T.vectorized(0, LANES) as lane:
                                        parts = [part[i * accs + a, lane] for a in range(accs)]
                                        while len(parts) > 1:
                                            parts = [parts[j] + parts[j + 1] for j in range(0, len(parts), 2)]
                                        T.buffer_store(acc, acc[i, lane] + scb[g, lane] * parts[0]
                                                       + zb[g, lane] * xs[rows[i], c * groups + g], [i, lane])
                        def store(i):
                            with T.vectorized(0, LANES) as lane:
                                T.buffer_store(out, acc[i, lane], [mo * r + i, t * LANES + lane])
                        store_rows(r, mo, store)

            width = spec.planes[0]
            nb = k // CHUNK
            lanes = tirx.Ramp(0, 1, LANES)
            zero_i32 = tirx.Broadcast(tirx.const(0, "int32"), LANES)

            def quantize_activations(rows: int | None):
                """x quantized to int8 per group of 32 (scale max|x|/127, as llama.cpp's Q8
                activations), four codes to an int32 word in the order the weight words hold
                their k's; per group also the scale and the sum of the codes.
                ``rows``: the buffers' row count (None: every row of x, quantized in parallel)."""
                extent = m_rows if rows is None else rows
                xq = T.alloc_buffer((extent, k // 4), "int32")
                dxb = T.alloc_buffer((extent, nb), "float32")
                sqb = T.alloc_buffer((extent, nb * groups), "int32")
                loop = T.serial if rows is not None else T.parallel
                half = CHUNK // 2
                # the weight words' byte order: 4-bit words split into even and odd k's
                order = ([8 * (w // 2) + 2 * e + (w % 2) for w in range(8) for e in range(4)] if width != 8
                         else list(range(CHUNK)))
                with loop(0, m_rows) as m:
                    with T.serial(0, nb) as b:
                        # 32 values as two vectors; lanes reduced by LLVM's vector reductions
                        v0 = x[m, tirx.Ramp(b * CHUNK, 1, half)]
                        v1 = x[m, tirx.Ramp(b * CHUNK + half, 1, half)]
                        amax = tirx.call_llvm_pure_intrin("float32", "llvm.vector.reduce.fmax",
                                                          T.max(T.abs(v0), T.abs(v1)))
                        inv = tirx.Select(amax > 0, tirx.const(127.0, "float32") / amax, tirx.const(0.0, "float32"))
                        T.buffer_store(dxb, amax / tirx.const(127.0, "float32"), [m, b])
                        q0 = tirx.Cast(f"int32x{half}", T.round(v0 * tirx.Broadcast(inv, half)))
                        q1 = tirx.Cast(f"int32x{half}", T.round(v1 * tirx.Broadcast(inv, half)))
                        sums = [q0 + q1] if groups == 1 else [q0, q1]
                        for g, part in enumerate(sums):         # the codes' sum per scale group
                            T.buffer_store(sqb, tirx.call_llvm_pure_intrin("int32", "llvm.vector.reduce.add", part),
                                           [m, b * groups + g])
                        codes = tirx.Shuffle([tirx.Cast(f"int8x{half}", q0), tirx.Cast(f"int8x{half}", q1)], order)
                        T.buffer_store(xq, tirx.reinterpret("int32x8", codes), [m, tirx.Ramp(b * 8, 1, 8)])
                return xq, dxb, sqb

            # AVX2's byte products (vpmaddubsw) add pairs into int16 with saturation: unsigned
            # codes of up to 6 bits times int8 x stay below it (63·127·2), 8-bit ones need not.
            # So 8-bit codes go in signed, as |code − 128| against x with the code's sign
            # (128·127·2 fits), and their sums are then Σ (code − 128)·x with no offset to take off
            signed_bytes = shape.int8_dot == "avx2" and width == 8

            # int16 sums of up to this many words' pair sums stay below 2**15 too: 4-bit codes
            # 8 words (15·127·16), 6-bit 2 (63·127·4), signed 8-bit 1; vpmaddwd then widens once
            words_per_widen = 1 if signed_bytes else 8 if width == 4 and spec.planes == (4,) else 2

            def dot(acc, codes, xword):
                """acc + per lane (row) the sum of its word's 4 byte products with x's word
                (AVX-512 VNNI)."""
                # LLVM 22 types the byte operands as <64 x i8>
                return tirx.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", acc,
                                                  tirx.reinterpret("int8x64", codes),
                                                  tirx.reinterpret("int8x64", tirx.Broadcast(xword, LANES)))

            def byte_pairs(codes, xword):
                """AVX2: a word's byte products with x's word, added in pairs into int16: the
                16 lanes' 32 bits as two int16x16 halves."""
                xv = tirx.reinterpret("int8x32", tirx.Broadcast(xword, LANES // 2))
                halves = []
                for h in range(2):
                    w = tirx.reinterpret("int8x32", tirx.Shuffle([codes], list(range(h * 8, h * 8 + 8))))
                    if signed_bytes:
                        w = tirx.bitwise_xor(w, tirx.Broadcast(tirx.const(-128, "int8"), 32))
                        a = tirx.call_llvm_pure_intrin("int8x32", "llvm.x86.avx2.psign.b", w, w)
                        b = tirx.call_llvm_pure_intrin("int8x32", "llvm.x86.avx2.psign.b", xv, w)
                    else:
                        a, b = w, xv
                    halves.append(tirx.call_llvm_pure_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", a, b))
                return halves

            def widened(halves):
                """int16 pair sums (two int16x16) as int32x16, the lane's two pairs added."""
                ones = tirx.Broadcast(tirx.const(1, "int16"), 16)
                return tirx.Shuffle([tirx.call_llvm_pure_intrin("int32x8", "llvm.x86.avx2.pmadd.wd", h, ones)
                                     for h in halves], list(range(LANES)))

            def group_sum(words, xwords):
                """Σ over a scale group's words of their byte products with x's words, int32x16."""
                if shape.int8_dot == "vnni":
                    chains = [zero_i32, zero_i32]          # two dependency chains
                    for j, (w, xw) in enumerate(zip(words, xwords)):
                        chains[j % 2] = dot(chains[j % 2], w, xw)
                    return chains[0] + chains[1]
                total = None
                for j0 in range(0, len(words), words_per_widen):
                    run = None
                    for w, xw in zip(words[j0:j0 + words_per_widen], xwords[j0:j0 + words_per_widen]):
                        pairs = byte_pairs(w, xw)
                        run = pairs if run is None else [a + b for a, b in zip(run, pairs)]
                    part = widened(run)
                    total = part if total is None else total + part
                return total

            def code_words(t, c):
                """The 8 int32x16 vectors of one tile's 32 k's, unsigned bytes in the order of
                ``quantize_activations``' words."""
                if width == 8:
                    return [tirx.reinterpret("int32x16", W.bufs["bits8"][t, c * 8 + j, lanes]) for j in range(8)]
                def u32(v):
                    return tirx.Broadcast(tirx.const(v, "uint32"), LANES)
                words = []
                for j in range(4):
                    w = W.bufs["bits4"][t, c * 4 + j, lanes]
                    lo = tirx.bitwise_and(w, u32(0x0F0F0F0F))
                    hi = tirx.bitwise_and(tirx.shift_right(w, u32(4)), u32(0x0F0F0F0F))
                    if spec.planes == (4, 2):
                        # Q6_K: the 2-bit fields of these 8 k's sit at 4e (even k's) and 4e + 2
                        # (odd k's) of 16 bits of the bits2 word; spread its 4-bit groups to one
                        # a byte, then each field goes to bits 4-5 of its code's byte
                        h = tirx.bitwise_and(tirx.shift_right(W.bufs["bits2"][t, c * 2 + j // 2, lanes],
                                                              u32(16 * (j % 2))), u32(0xFFFF))
                        h = tirx.bitwise_and(tirx.bitwise_or(h, tirx.shift_left(h, u32(8))), u32(0x00FF00FF))
                        h = tirx.bitwise_and(tirx.bitwise_or(h, tirx.shift_left(h, u32(4))), u32(0x0F0F0F0F))
                        lo = tirx.bitwise_or(lo, tirx.shift_left(tirx.bitwise_and(h, u32(0x03030303)), u32(4)))
                        hi = tirx.bitwise_or(hi, tirx.shift_left(tirx.bitwise_and(h, u32(0x0C0C0C0C)), u32(2)))
                    words += [tirx.reinterpret("int32x16", lo), tirx.reinterpret("int32x16", hi)]
                return words

            def block_value(words, row, c, scales, bias, acts):
                """32 k's products for one row: int32 dot products per scale group, then the
                groups' scales (and the bias times the int8 x's sum)."""
                xq, dxb, sqb = acts
                per = 8 // groups
                sums = []
                for g in range(groups):
                    span = range(g * per, (g + 1) * per)
                    isum = group_sum([words[j] for j in span], [xq[row, c * 8 + j] for j in span])
                    if spec.offset and not signed_bytes:
                        isum = isum - tirx.Broadcast(sqb[row, c * groups + g] * spec.offset, LANES)
                    sums.append(tirx.Cast("float32x16", isum))
                dx = tirx.Broadcast(dxb[row, c], LANES)
                if groups == 1:
                    val = scales[0] * (dx * sums[0])
                else:
                    val = dx * (scales[0] * sums[0] + scales[1] * sums[1])
                if spec.bias:
                    # the bias times the int8 x's own sum (dx · Σ codes), as llama.cpp's Q8_1
                    # does: the error is then Σ w·(x − x̃) with centred weights, not Σ (w − bias)·(x − x̃)
                    # with all-positive ones, which doubled SmolLM2's logit error against float32
                    val = val + bias * (dx * tirx.Cast("float32x16", tirx.Broadcast(sqb[row, c], LANES)))
                return val

            def gemv_int8(rows_per_pass: int):
                """``exact=False`` where the CPU has int8 products (``int8_dot``), for 4-, 6- and
                8-bit codes: the codes' dot products with int8 x summed in int32 (``group_sum``:
                ``vpdpbusd`` on VNNI, ``vpmaddubsw`` + ``vpmaddwd`` on AVX2), then scaled once
                per group."""
                r = rows_per_pass
                acts = quantize_activations(CPU_GEMV_MAX_ROWS)
                with T.parallel(0, tiles) as t:
                    accv = T.alloc_buffer((r,), "float32x16")
                    scb = T.alloc_buffer((groups, LANES), "float32")
                    bib = T.alloc_buffer((groups, LANES), "float32")
                    with T.serial(0, (m_rows + r - 1) // r) as mo:
                        rows = [T.min(mo * r + i, m_rows - 1) for i in range(r)] if r > 1 else [mo]
                        for i in range(r):
                            T.buffer_store(accv, tirx.Broadcast(tirx.const(0, "float32"), LANES), [i])
                        with T.serial(0, nb) as c:
                            prefetch(t, c)
                            hoist_scales(t, c, scb, bib)
                            for i in range(r):
                                val = block_value(code_words(t, c), rows[i], c, [scb[g, lanes] for g in range(groups)],
                                                  bib[0, lanes], acts)
                                T.buffer_store(accv, accv[i] + val, [i])
                        def store(i):
                            T.buffer_store(out, accv[i], [mo * r + i, tirx.Ramp(t * LANES, 1, LANES)])
                        store_rows(r, mo, store)

            def gemm_int8(rows_per_block: int):
                """``exact=False`` prefill with int8 products (VNNI or AVX2): per task of ``tt`` tiles and k-chunk,
                the weights' bytes are unpacked once into a scratch buffer with their scales,
                then every block of rows runs ``vpdpbusd`` over them (the products of
                ``gemv_int8``: a row's result does not depend on the row count)."""
                mbi = rows_per_block
                acts = quantize_activations(None)
                cpc = kc // CHUNK

                def span(u):
                    return tirx.Ramp(u * LANES, 1, LANES)
                with T.parallel(0, tiles // tt) as task:
                    wq = T.alloc_buffer((cpc * 8, tt * LANES), "int32")
                    scq = T.alloc_buffer((cpc * groups, tt * LANES), "float32")
                    biq = T.alloc_buffer((cpc, tt * LANES), "float32")
                    scb = T.alloc_buffer((groups, LANES), "float32")
                    bib = T.alloc_buffer((groups, LANES), "float32")
                    accv = T.alloc_buffer((mbi, tt * LANES), "float32")
                    with T.serial(0, k // kc) as kci:
                        with T.serial(0, cpc) as ci:
                            c = kci * cpc + ci
                            for u in range(tt):
                                t = task * tt + u
                                hoist_scales(t, c, scb, bib)
                                for g in range(groups):
                                    T.buffer_store(scq, scb[g, lanes], [ci * groups + g, span(u)])
                                if spec.bias:
                                    T.buffer_store(biq, bib[0, lanes], [ci, span(u)])
                                for j, wv in enumerate(code_words(t, c)):
                                    T.buffer_store(wq, wv, [ci * 8 + j, span(u)])
                        with T.serial(0, (m_rows + mbi - 1) // mbi) as mo:
                            rows = [T.min(mo * mbi + i, m_rows - 1) for i in range(mbi)]
                            for i in range(mbi):
                                for u in range(tt):
                                    cols = tirx.Ramp((task * tt + u) * LANES, 1, LANES)
                                    start = tirx.Select(kci == 0, tirx.Broadcast(tirx.const(0, "float32"), LANES),
                                                        out[rows[i], cols])
                                    T.buffer_store(accv, start, [i, span(u)])
                            with T.serial(0, cpc) as ci:
                                c = kci * cpc + ci
                                for i in range(mbi):
                                    for u in range(tt):
                                        words = [wq[ci * 8 + j, span(u)] for j in range(8)]
                                        val = block_value(words, rows[i], c, [scq[ci * groups + g, span(u)] for g in range(groups)],
                                                          biq[ci, span(u)] if spec.bias else None, acts)
                                        T.buffer_store(accv, accv[i, span(u)] + val, [i, span(u)])
                            for i in range(mbi):
                                with T.If(mo * mbi + i < m_rows):
                                    with T.Then():
                                        for u in range(tt):
                                            T.buffer_store(out, accv[i, span(u)],
                                                           [mo * mbi + i, tirx.Ramp((task * tt + u) * LANES, 1, LANES)])

            def gemm():
                with T.parallel(0, tiles // tt) as task:
                    wt = T.alloc_buffer((kc, tt * LANES), "float32")
                    acc = T.alloc_buffer((mb, tt * LANES), "float32")
                    scb = T.alloc_buffer((groups, LANES), "float32")
                    bib = T.alloc_buffer((groups, LANES), "float32")
                    with T.serial(0, k // kc) as kci:
                        # dequantize this k-chunk of the task's tiles once
                        with T.serial(0, kc // CHUNK) as ci:
                            c = kci * (kc // CHUNK) + ci
                            for u in range(tt):
                                t = task * tt + u
                                hoist_scales(t, c, scb, bib)
                                for kk in range(CHUNK):
                                    with T.vectorized(0, LANES) as lane:
                                        T.buffer_store(wt, weight(t, c, kk, lane, scb, bib),
                                                       [ci * CHUNK + kk, u * LANES + lane])
                        with T.serial(0, (m_rows + mb - 1) // mb) as mo:
                            # rows past the end repeat the last row: no branch in the loop
                            rows = [T.min(mo * mb + i, m_rows - 1) for i in range(mb)]
                            for i in range(mb):
                                for u in range(tt):
                                    with T.vectorized(0, LANES) as lane:
                                        col = (task * tt + u) * LANES + lane
                                        start = tirx.Select(kci == 0, tirx.const(0, "float32"), out[rows[i], col])
                                        T.buffer_store(acc, start, [i, u * LANES + lane])
                            with T.serial(0, kc) as kx:
                                for i in range(mb):
                                    xv = x[rows[i], kci * kc + kx]
                                    for u in range(tt):
                                        with T.vectorized(0, LANES) as lane:
                                            j = u * LANES + lane
                                            T.buffer_store(acc, acc[i, j] + xv * wt[kx, j], [i, j])
                            for i in range(mb):
                                with T.If(mo * mb + i < m_rows):
                                    with T.Then():
                                        for u in range(tt):
                                            with T.vectorized(0, LANES) as lane:
                                                T.buffer_store(out, acc[i, u * LANES + lane],
                                                               [mo * mb + i, (task * tt + u) * LANES + lane])

            large = gemm
            if fast and int8:
                small = lambda rows, accs: gemv_int8(rows)   # noqa: E731
                large = lambda: gemm_int8(GEMM_INT8_ROWS)     # noqa: E731
            else:
                # exact without vpermps (AVX2): Q4_0 and Q8_0 sum codes before their scale, the
                # other formats per group Σ code·x, then scale · that + (bias − scale · offset)
                # · Σ x (still float32 products, summed in another order): 1.07B Q4_K_M exact
                # decode step 51-53 -> 45 ms (same process, alternated); with vpermps the per-weight
                # dequantization costs one instruction and stays
                if fast or (not wide and not scale_after_sum):
                    small = gemv_folded
                else:
                    small = gemv_scaled_groups if scale_after_sum else gemv
            # every row count up to CPU_GEMV_MAX_ROWS sums a row's products into the same
            # accumulators in the same order, so a row's result does not depend on how many
            # rows run beside it (the scheduler steps only the rows in use: batch invariance)
            accs = 4 if wide else 2
            # AVX2's int8 GEMV takes 4 rows a pass, so each tile's unpacked codes serve 4 rows:
            # a 4-row SmolLM2 step 16.3 -> 14.2 ms, 8 rows 27.7 -> 22.7 (same process, rounds
            # alternated); 8 a pass was no faster. Its float32 GEMVs keep 2 (16 ymm registers)
            narrow = 4 if fast and int8 else 2
            with T.If(m_rows == 1):
                with T.Then():
                    small(1, accs)
                with T.Else():
                    with T.If(m_rows == 2):
                        with T.Then():
                            small(2, accs)
                        with T.Else():
                            with T.If(m_rows <= 4):
                                with T.Then():
                                    small(4 if wide else narrow, accs)
                                with T.Else():
                                    with T.If(m_rows <= CPU_GEMV_MAX_ROWS):
                                        with T.Then():
                                            small(8 if wide else narrow, accs)
                                        with T.Else():
                                            large()
    return ib.get()


@functools.lru_cache(maxsize=None)
def _cpu_gather_func(fmt: str, n: int, k: int):
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    spec = _FORMATS[fmt]
    with IRBuilder() as ib:
        with T.prim_func(private=True):
            T.func_name(f"qgather_{fmt}_{n}x{k}")
            T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
            count = T.int64()
            ids = T.arg("ids", T.buffer((count,), "int64"))
            bufs = [T.arg(name, T.buffer(s, d)) for name, s, d in
                    zip(_array_names(spec), _array_shapes(spec, n, k), _array_dtypes(spec))]
            out = T.arg("out", T.buffer((count, k), "float32"))
            W = _Weights(spec, bufs)
            with T.parallel(0, count) as i:
                row = T.max(T.min(ids[i], n - 1), 0)
                t, lane = row // LANES, row % LANES
                with T.serial(0, k // CHUNK) as c:
                    for kk in range(CHUNK):
                        T.buffer_store(out, W.value(t, c, CHUNK, kk, lane), [i, c * CHUNK + kk])
    return ib.get()


# ---- Relax --------------------------------------------------------------------------------

def matmul(bb, x, packed: list, fmt: str, n: int, k: int, target: dict, *, exact: bool = True):
    """x float32 [..., k] @ wᵀ for the packed [n, k] weight -> float32 [..., n]."""
    _check(fmt, n, k)
    gpu = is_gpu(target)

    def func_for(lead: int):
        if gpu:
            return _gpu_matmul_func(fmt, n, k), f"qmm_{fmt}_gpu"
        return (_cpu_matmul_func(fmt, n, k, target_key(target), not exact, lead=lead),
                f"qmm_{fmt}" if exact else f"qmm_{fmt}_fast")
    return emit_matmul(bb, x, packed, n, k, _tiles(n) * LANES, gpu, func_for)


def gather(bb, ids, packed: list, fmt: str, n: int, k: int, target: dict):
    """Rows ``ids`` (int64 [...]) of the packed [n, k] weight, dequantized -> float32 [..., k]."""
    from tvm import relax, tirx
    _check(fmt, n, k)
    lead = dims(ids)
    count = product(lead)
    flat = ids if len(lead) == 1 else bb.emit(relax.op.reshape(ids, relax.ShapeExpr([count])))
    if is_gpu(target):
        func, name = _gpu_gather_func(fmt, n, k), f"qgather_{fmt}_gpu"
    else:
        func, name = _cpu_gather_func(fmt, n, k), f"qgather_{fmt}"
    gv = bb.add_func(func, name)
    y = bb.emit(relax.call_tir(gv, [flat, *packed], relax.TensorType([count, tirx.IntImm("int64", k)], "float32")))
    if len(lead) != 1:
        y = bb.emit(relax.op.reshape(y, relax.ShapeExpr([*lead, tirx.IntImm("int64", k)])))
    return y
