"""Matmuls over float weights (f32, f16, bf16) kept in their own type, written as TIR.

The contract with :mod:`.lower` is :mod:`.quant_kernels`' for matmuls::

    SUPPORTED                      kiln format names with a kernel here
    pack(weight) -> {name: array}  what the artifact stores for a [n, k] float weight
    matmul(bb, x, packed, fmt, n, k, target, *, exact=True) -> relax.Expr
        x float32 [..., k] (symbolic leading dims) @ wᵀ -> float32 [..., n]; ``packed`` are the
        Relax values of ``pack``'s arrays, in its order
    gather(bb, ids, packed, fmt, n, k, target) -> relax.Expr
        ids int64 [...] -> float32 [..., k], the rows of the same arrays (ids outside 0..n-1
        are clamped, as ``relax.op.take(mode="clip")`` does): a tied embedding and LM head
        share one bf16 copy

Layout. One array ``w`` of shape ``[tiles, k, 16]``: entry ``[t, j, l]`` is row ``16·t + l``'s
value at column j (the last tile padded with zero rows), so the 16 rows' values for one k are
one contiguous vector (a zmm register of float32 on AVX-512, 64 contiguous bytes for 16 GPU
threads). Values keep their storage type: float32, float16, or bf16 as its uint16 bits (LLVM's
own bfloat16 is not reliable across TVM's targets; a bf16 value is its float32's upper half,
so widening is a shift). Nothing is widened ahead of time: a bf16 weight is half the bytes of
the float32 copy the lowering used to store, and a decode step is a stream of weights.

Arithmetic. Each weight is widened to float32 exactly, multiplied by x in float32 and summed
in float32; only the order of the additions (and LLVM's fused multiply-adds) differs from
numpy's ``x @ w.astype(float32).T``. ``exact`` is accepted for the contract and changes
nothing: there is no cheaper product of float weights that kiln's fast precision would allow.

Kernels by target (one prim func per (format, n, k, target), marked ``tirx.is_scheduled`` when
scheduled here):

* CPU (llvm): one function whose path is chosen by the row count M at run time (TIR ifs;
  decode is M = 1). M ≤ 8: a GEMV parallel over 16-row tiles; each widened weight vector
  feeds 1, 2 or 4 rows of x, with several accumulators per row so the FMA chains do not wait
  on their own latency. M > 8: per task of one tile (two on AVX-512) a k-chunk (≤ 512 k's) of
  weights is widened into a float32 buffer once, then a register-blocked product runs over
  the rows, 6 at a time (rows past the end repeat the last row: no branch in the loop).
* GPU (cuda, metal, ...): M ≤ 4: a block of 128 threads per tile, 16 lanes × 8 slices of k
  (a step reads 128 contiguous weights), every row's sum kept per thread and the slices summed
  in shared memory. Otherwise a 16×16-thread block per (up to 4 tiles, 32 rows) that stages 32
  k's of widened weights and of x in shared memory; each thread keeps 8 outputs (2 rows × 4
  tiles) in registers.
* gather: a token per parallel iteration (CPU); a TE computation for dlight (GPU).

The GPU matmul can be built with ``emulate=True`` (see ``kernel_common.Threads``): the same arithmetic with
the thread indices as serial loops, compiled for the CPU, which is how the tests check its
numbers on a machine without a GPU.
"""
from __future__ import annotations

import functools

import numpy as np

from .kernel_common import (Threads, cpu_shape, dims, emit_matmul, gpu_tiles_accumulate, gpu_tiles_store, gpu_tiles_zero,
                            is_gpu, matmul_args, product, target_key)

LANES = 16                  # rows per tile: the layout's vector
CPU_GEMV_MAX_ROWS = 8
GEMV_UNROLL = 8             # k's per unrolled GEMV step (the accumulators rotate over them)
MAX_K_CHUNK = 512           # k's of widened weights per GEMM task step (32 KiB a tile)

_STORAGE = {"f32": "float32", "f16": "float16", "bf16": "uint16"}

#: kiln's plain float formats (compiler/formats/plain.py); f64 is not a weight type worth a kernel
SUPPORTED = frozenset(_STORAGE)



def _tiles(n: int) -> int:
    return -(-n // LANES)


def _check(fmt: str, n: int, k: int, origin=None) -> str:
    from kiln.errors import KilnError
    if fmt not in _STORAGE:
        raise KilnError(origin, f"no TVM float kernel for weight format {fmt!r}; kernels: {', '.join(sorted(SUPPORTED))}")
    if n <= 0 or k <= 0:
        raise KilnError(origin, f"a {fmt} weight of shape [{n}, {k}]: both sizes must be positive")
    return _STORAGE[fmt]


# ---- pack ---------------------------------------------------------------------------------

_PACK_ROWS = 4096   # rows re-laid-out at a time: bounds the temporaries for a large LM head


def pack(weight) -> dict[str, np.ndarray]:
    """``{"w": [tiles, k, 16]}`` in the weight's own storage type (see the module docstring)."""
    from kiln.errors import KilnError
    if len(weight.shape) != 2:
        raise KilnError(weight.origin or None, f"weight {weight.name or '?'}: float matmul kernels take 2-D weights, not {list(weight.shape)}")
    n, k = weight.shape
    dtype = _check(weight.format.name, n, k, weight.origin or None)
    values = weight.raw().view(dtype).reshape(n, k)      # the stored bits, never converted
    tiles = _tiles(n)
    out = np.zeros((tiles, k, LANES), dtype)
    for a in range(0, n, _PACK_ROWS):
        b = min(n, a + _PACK_ROWS)
        t0, t1 = a // LANES, _tiles(b)
        padded = np.zeros(((t1 - t0) * LANES, k), dtype)
        padded[:b - a] = values[a:b]
        out[t0:t1] = padded.reshape(t1 - t0, LANES, k).transpose(0, 2, 1)
    return {"w": out}


def _widen(fmt: str, value):
    """A stored weight value as float32, exactly."""
    from tvm import tirx
    if fmt == "f32":
        return value
    if fmt == "f16":
        return tirx.Cast("float32", value)
    return tirx.reinterpret("float32", tirx.shift_left(tirx.Cast("uint32", value), tirx.const(16, "uint32")))


# ---- targets ------------------------------------------------------------------------------

def _k_chunks(k: int) -> tuple[int, int, int]:
    """(count, size, last): k split into ``count`` GEMM chunks of ``size`` k's, the last of
    ``last`` (as even as multiples of 8 allow, none over MAX_K_CHUNK)."""
    count = -(-k // MAX_K_CHUNK)
    size = -(-k // count)
    size = min(k, -(-size // 8) * 8)
    count = -(-k // size)
    return count, size, k - (count - 1) * size


# ---- CPU kernel ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _cpu_matmul_func(fmt: str, n: int, k: int, target_key: str, lead: int = 1):
    from tvm import tirx
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    dtype = _STORAGE[fmt]
    shape = cpu_shape(target_key)
    tiles = _tiles(n)
    tt = shape.tiles if tiles % shape.tiles == 0 else 1
    mb = shape.rows
    chunks, kc, k_last = _k_chunks(k)
    unroll = GEMV_UNROLL
    zero = tirx.const(0, "float32")
    with IRBuilder() as ib:
        with T.prim_func(private=True):
            T.func_name(f"fmm_{fmt}_{n}x{k}")
            T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
            m_rows, x, w, out = matmul_args(T, k, tiles * LANES, lead,
                                            lambda: T.arg("w", T.buffer((tiles, k, LANES), dtype)))

            def gemv(r: int, accs: int):
                """Each weight vector widened once per pass over ``r`` rows of x, into ``accs``
                accumulators per row."""
                with T.parallel(0, tiles) as t:
                    acc = T.alloc_buffer((r * accs, LANES), "float32")
                    wv = T.alloc_buffer((LANES,), "float32")
                    with T.serial(0, (m_rows + r - 1) // r) as mo:
                        rows = [T.min(mo * r + i, m_rows - 1) for i in range(r)] if r > 1 else [mo]
                        for a in range(r * accs):
                            with T.vectorized(0, LANES) as lane:
                                T.buffer_store(acc, zero, [a, lane])

                        def step(j, a):
                            with T.vectorized(0, LANES) as lane:
                                T.buffer_store(wv, _widen(fmt, w[t, j, lane]), [lane])
                            for i in range(r):
                                with T.vectorized(0, LANES) as lane:
                                    T.buffer_store(acc, acc[i * accs + a, lane] + x[rows[i], j] * wv[lane],
                                                   [i * accs + a, lane])
                        if k >= unroll:
                            with T.serial(0, k // unroll) as u:
                                for kk in range(unroll):
                                    step(u * unroll + kk, kk % accs)
                        for kk in range(k - k % unroll, k):
                            step(kk, kk % accs)
                        for i in range(r):
                            def store():
                                with T.vectorized(0, LANES) as lane:
                                    parts = [acc[i * accs + a, lane] for a in range(accs)]
                                    while len(parts) > 1:       # pairwise
                                        parts = [parts[j] + parts[j + 1] for j in range(0, len(parts), 2)]
                                    T.buffer_store(out, parts[0], [mo * r + i, t * LANES + lane])
                            if r == 1:
                                store()
                            else:
                                with T.If(mo * r + i < m_rows):
                                    with T.Then():
                                        store()

            def gemm():
                with T.parallel(0, tiles // tt) as task:
                    wt = T.alloc_buffer((kc, tt * LANES), "float32")
                    acc = T.alloc_buffer((mb, tt * LANES), "float32")

                    def chunk(k0, size: int, first):
                        # widen this k-chunk of the task's tiles once
                        with T.serial(0, size) as kx:
                            for u in range(tt):
                                with T.vectorized(0, LANES) as lane:
                                    T.buffer_store(wt, _widen(fmt, w[task * tt + u, k0 + kx, lane]), [kx, u * LANES + lane])
                        with T.serial(0, (m_rows + mb - 1) // mb) as mo:
                            rows = [T.min(mo * mb + i, m_rows - 1) for i in range(mb)]
                            for i in range(mb):
                                for u in range(tt):
                                    with T.vectorized(0, LANES) as lane:
                                        col = (task * tt + u) * LANES + lane
                                        start = (zero if first is True else out[rows[i], col] if first is False
                                                 else tirx.Select(first, zero, out[rows[i], col]))
                                        T.buffer_store(acc, start, [i, u * LANES + lane])
                            with T.serial(0, size) as kx:
                                for i in range(mb):
                                    xv = x[rows[i], k0 + kx]
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
                    if chunks == 1:
                        chunk(0, k, True)
                    else:
                        if kc == k_last:
                            with T.serial(0, chunks) as ci:
                                chunk(ci * kc, kc, ci == 0)
                        else:
                            with T.serial(0, chunks - 1) as ci:
                                chunk(ci * kc, kc, ci == 0)
                            chunk((chunks - 1) * kc, k_last, False)

            wide = shape.wide
            accs = 4 if wide else 2     # the same at every M: batch invariance (see quant_kernels)
            with T.If(m_rows == 1):
                with T.Then():
                    gemv(1, accs)
                with T.Else():
                    with T.If(m_rows == 2):
                        with T.Then():
                            gemv(2, accs)
                        with T.Else():
                            with T.If(m_rows <= CPU_GEMV_MAX_ROWS):
                                with T.Then():
                                    gemv(4 if wide else 2, accs)
                                with T.Else():
                                    gemm()
    return ib.get()


@functools.lru_cache(maxsize=None)
def _cpu_gather_func(fmt: str, n: int, k: int):
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    with IRBuilder() as ib:
        with T.prim_func(private=True):
            T.func_name(f"fgather_{fmt}_{n}x{k}")
            T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
            count = T.int64()
            ids = T.arg("ids", T.buffer((count,), "int64"))
            w = T.arg("w", T.buffer((_tiles(n), k, LANES), _STORAGE[fmt]))
            out = T.arg("out", T.buffer((count, k), "float32"))
            with T.parallel(0, count) as i:
                row = T.max(T.min(ids[i], n - 1), 0)
                with T.serial(0, k) as j:
                    T.buffer_store(out, _widen(fmt, w[row // LANES, j, row % LANES]), [i, j])
    return ib.get()


# ---- GPU kernels --------------------------------------------------------------------------

GPU_GEMV_MAX_ROWS = 4
GPU_SLICES = 8              # GEMV: k split over 8 groups of 16 threads (a block reads 128 values a step)


@functools.lru_cache(maxsize=None)
def _gpu_matmul_func(fmt: str, n: int, k: int, emulate: bool = False):
    from tvm import tirx
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    dtype = _STORAGE[fmt]
    tiles = _tiles(n)
    zero = tirx.const(0, "float32")
    threads = GPU_SLICES * LANES
    bk, bm, bm_rows = 32, 16, 32        # GEMM: 16 × 16 threads, 32 k's a step, 32 rows a block
    rpt = bm_rows // bm                 # rows per thread
    tb = 4 if tiles % 4 == 0 else 2 if tiles % 2 == 0 else 1    # tiles per block
    rows_max = GPU_GEMV_MAX_ROWS
    with IRBuilder() as ib:
        with T.prim_func(private=True):
            T.func_name(f"fmm_{fmt}_{n}x{k}_gpu")
            T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
            m_rows = T.int64()
            x = T.arg("x", T.buffer((m_rows, k), "float32"))
            w = T.arg("w", T.buffer((tiles, k, LANES), dtype))
            out = T.arg("out", T.buffer((m_rows, tiles * LANES), "float32"))

            def guarded(kidx, value):
                return value if k % bk == 0 else tirx.if_then_else(kidx < k, value, zero)

            with T.If(m_rows <= rows_max):
                with T.Then():
                    # a block per tile: thread (slice s, lane) sums k = s, s + 8, ... for every row
                    with Threads(emulate, {"blockIdx.x": tiles}, {"threadIdx.x": threads}) as g:
                        t = g.block_vars["blockIdx.x"]
                        red = g.shared((rows_max, threads))
                        acc = g.local(rows_max)
                        wv = g.local(1)
                        with g.phase() as tv:
                            tx = tv["threadIdx.x"]
                            s, lane = tx // LANES, tx % LANES
                            for i in range(rows_max):
                                T.buffer_store(acc, zero, [i])
                            with T.serial(0, (k + GPU_SLICES - 1) // GPU_SLICES) as step:
                                kidx = step * GPU_SLICES + s

                                def body():
                                    T.buffer_store(wv, _widen(fmt, w[t, kidx, lane]), [0])
                                    for i in range(rows_max):
                                        row = T.min(tirx.const(i, "int64"), m_rows - 1)
                                        T.buffer_store(acc, acc[i] + x[row, kidx] * wv[0], [i])
                                if k % GPU_SLICES:
                                    with T.If(kidx < k):
                                        with T.Then():
                                            body()
                                else:
                                    body()
                            for i in range(rows_max):
                                T.buffer_store(red, acc[i], [i, tx])
                        g.sync()
                        with g.phase() as tv:
                            tx = tv["threadIdx.x"]
                            i, lane = tx // LANES, tx % LANES
                            with T.If(tirx.all(i < rows_max, tirx.Cast("int64", i) < m_rows)):
                                with T.Then():
                                    total = red[i, lane]
                                    for sl in range(1, GPU_SLICES):
                                        total = total + red[i, sl * LANES + lane]
                                    T.buffer_store(out, total, [i, t * LANES + lane])
                with T.Else():
                    # a block per (tb tiles, 32 rows); each thread: rows ty and ty + 16, lane tx of the tiles
                    blocks = {"blockIdx.x": tiles // tb, "blockIdx.y": (m_rows + bm_rows - 1) // bm_rows}
                    with Threads(emulate, blocks, {"threadIdx.y": bm, "threadIdx.x": LANES}) as g:
                        tg, mb = g.block_vars["blockIdx.x"], g.block_vars["blockIdx.y"]
                        ws = g.shared((bk, tb * LANES))
                        xs = g.shared((bm_rows, bk + 1))        # + 1: rows in different banks
                        acc = g.local(rpt * tb, carried=True)
                        gpu_tiles_zero(g, acc, rpt, tb)
                        with T.serial(0, (k + bk - 1) // bk) as c:
                            with g.phase() as tv:
                                ty, tx = tv["threadIdx.y"], tv["threadIdx.x"]
                                for h in range(bk // bm):
                                    kk = h * bm + ty            # 16 threads of a row read 16 contiguous values
                                    kidx = c * bk + kk
                                    for u in range(tb):
                                        T.buffer_store(ws, guarded(kidx, _widen(fmt, w[tg * tb + u, T.min(kidx, k - 1), tx])),
                                                       [kk, u * LANES + tx])
                                for i in range(rpt):
                                    row = T.min(mb * bm_rows + ty + bm * i, m_rows - 1)
                                    for h in range(bk // LANES):
                                        kk = h * LANES + tx
                                        kidx = c * bk + kk
                                        T.buffer_store(xs, guarded(kidx, x[row, T.min(kidx, k - 1)]), [ty + bm * i, kk])
                            g.sync()
                            gpu_tiles_accumulate(g, acc, xs, ws, rpt, tb, bm, bk)
                        gpu_tiles_store(g, acc, out, m_rows, mb, tg, rpt, tb, bm, bm_rows)
    return ib.get()


def _gpu_rows(ids, w, fmt: str, n: int):
    from tvm import te, tirx
    def f(i, j):
        row = tirx.max(tirx.min(ids[i], tirx.const(n - 1, "int64")), tirx.const(0, "int64"))
        return _widen(fmt, w[row // LANES, j, row % LANES])
    return te.compute((ids.shape[0], w.shape[1]), f, name="fgather")


# ---- Relax --------------------------------------------------------------------------------

def matmul(bb, x, packed: list, fmt: str, n: int, k: int, target: dict, *, exact: bool = True):
    """x float32 [..., k] @ wᵀ for the packed [n, k] weight -> float32 [..., n]."""
    _check(fmt, n, k)
    gpu = is_gpu(target)

    def func_for(lead: int):
        if gpu:
            return _gpu_matmul_func(fmt, n, k), f"fmm_{fmt}_{n}x{k}_gpu"
        return _cpu_matmul_func(fmt, n, k, target_key(target), lead=lead), f"fmm_{fmt}_{n}x{k}"
    return emit_matmul(bb, x, packed, n, k, _tiles(n) * LANES, gpu, func_for)


def gather(bb, ids, packed: list, fmt: str, n: int, k: int, target: dict):
    """Rows ``ids`` (int64 [...]) of the packed [n, k] weight, widened -> float32 [..., k]."""
    from tvm import relax, tirx
    _check(fmt, n, k)
    lead = dims(ids)
    count = product(lead)
    flat = ids if len(lead) == 1 else bb.emit(relax.op.reshape(ids, relax.ShapeExpr([count])))
    if is_gpu(target):
        y = bb.emit_te(_gpu_rows, flat, packed[0], fmt, n, primfunc_name_hint=f"fgather_{fmt}_{n}x{k}_gpu")
    else:
        gv = bb.add_func(_cpu_gather_func(fmt, n, k), f"fgather_{fmt}_{n}x{k}")
        y = bb.emit(relax.call_tir(gv, [flat, *packed], relax.TensorType([count, tirx.IntImm("int64", k)], "float32")))
    if len(lead) != 1:
        y = bb.emit(relax.op.reshape(y, relax.ShapeExpr([*lead, tirx.IntImm("int64", k)])))
    return y
