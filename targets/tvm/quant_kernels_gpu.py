"""The GPU kernels of :mod:`.quant_kernels` (cuda, metal, ...): the GEMV/GEMM and the row
lookup over the same stored blocks, scheduled for GPU threads (the schedule is described in
:mod:`.quant_kernels`' docstring). ``emulate=True`` builds them as plain loops, so the tests
run their arithmetic on the CPU."""
from __future__ import annotations

import functools

from .kernel_common import Threads, gpu_tiles_accumulate, gpu_tiles_store, gpu_tiles_zero
from .quant_layout import CHUNK, LANES, _array_dtypes, _array_names, _array_shapes, _FORMATS, _tiles, _Weights

GPU_UNIT = 8        # k's per thread step of the GPU GEMV
GPU_GEMV_MAX_ROWS = 4


# ---- kernels --------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _gpu_matmul_func(fmt: str, n: int, k: int, emulate: bool = False):
    from tvm import tirx
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    spec = _FORMATS[fmt]
    tiles = _tiles(n)
    slices = 8                    # GEMV: k split over 8 groups of 16 threads
    units = k // GPU_UNIT
    bm, bk = 16, CHUNK            # GEMM: 16 × 16 threads, 32 k's a step,
    bm_rows = 32                  # 32 rows × up to 4 tiles per block (8 outputs a thread)
    with IRBuilder() as ib:
        with T.prim_func(private=True):
            T.func_name(f"qmm_{fmt}_{n}x{k}_gpu")
            T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
            m_rows = T.int64()
            x = T.arg("x", T.buffer((m_rows, k), "float32"))
            bufs = [T.arg(name, T.buffer(s, d)) for name, s, d in
                    zip(_array_names(spec), _array_shapes(spec, n, k), _array_dtypes(spec))]
            out = T.arg("out", T.buffer((m_rows, tiles * LANES), "float32"))
            W = _Weights(spec, bufs)
            with T.If(m_rows <= GPU_GEMV_MAX_ROWS):
                with T.Then():
                    with Threads(emulate, {"blockIdx.x": tiles}, {"threadIdx.x": slices * LANES}) as th:
                        t = th.block_vars["blockIdx.x"]
                        red = th.shared((slices * LANES,))
                        acc = th.local(1, carried=True)
                        with T.serial(0, m_rows) as m:
                            with th.phase() as tv:
                                tx = tv["threadIdx.x"]
                                s, lane = tx // LANES, tx % LANES
                                T.buffer_store(acc, tirx.const(0, "float32"), th.at(tv, 0, True))
                                with T.serial(0, (units + slices - 1) // slices) as step:
                                    u = step * slices + s
                                    with T.If(u < units):
                                        with T.Then():
                                            for kk in range(GPU_UNIT):
                                                T.buffer_store(acc, acc[tuple(th.at(tv, 0, True))] + x[m, u * GPU_UNIT + kk]
                                                               * W.value(t, u, GPU_UNIT, kk, lane), th.at(tv, 0, True))
                                T.buffer_store(red, acc[tuple(th.at(tv, 0, True))], [tx])
                            th.sync()
                            with th.phase() as tv:
                                tx = tv["threadIdx.x"]
                                with T.If(tx < LANES):
                                    with T.Then():
                                        total = red[tx]
                                        for s in range(1, slices):
                                            total = total + red[s * LANES + tx]
                                        T.buffer_store(out, total, [m, t * LANES + tx])
                            th.sync()
                with T.Else():
                    # each thread: rows ty and ty + 16 of the block's 32, lane tx of its 4 tiles
                    tb = 4 if tiles % 4 == 0 else 2 if tiles % 2 == 0 else 1
                    rpt = bm_rows // bm
                    blocks = {"blockIdx.x": tiles // tb, "blockIdx.y": (m_rows + bm_rows - 1) // bm_rows}
                    with Threads(emulate, blocks, {"threadIdx.y": bm, "threadIdx.x": LANES}) as th:
                        tg, mb = th.block_vars["blockIdx.x"], th.block_vars["blockIdx.y"]
                        ws = th.shared((bk, tb * LANES))
                        xs = th.shared((bm_rows, bk + 1))        # + 1: rows in different banks
                        acc = th.local(rpt * tb, carried=True)
                        gpu_tiles_zero(th, acc, rpt, tb)
                        with T.serial(0, k // bk) as c:
                            with th.phase() as tv:
                                ty, tx = tv["threadIdx.y"], tv["threadIdx.x"]
                                for h in range(bk // bm):
                                    kk = ty * (bk // bm) + h
                                    for u in range(tb):
                                        T.buffer_store(ws, W.value(tg * tb + u, c, bk, kk, tx), [kk, u * LANES + tx])
                                for i in range(rpt):
                                    row = T.min(mb * bm_rows + ty + bm * i, m_rows - 1)
                                    for h in range(bk // LANES):
                                        kk = tx * (bk // LANES) + h
                                        T.buffer_store(xs, x[row, c * bk + kk], [ty + bm * i, kk])
                            th.sync()
                            gpu_tiles_accumulate(th, acc, xs, ws, rpt, tb, bm, bk)
                        gpu_tiles_store(th, acc, out, m_rows, mb, tg, rpt, tb, bm, bm_rows)
    return ib.get()


@functools.lru_cache(maxsize=None)
def _gpu_gather_func(fmt: str, n: int, k: int, emulate: bool = False):
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    spec = _FORMATS[fmt]
    threads = 64
    units = k // GPU_UNIT
    with IRBuilder() as ib:
        with T.prim_func(private=True):
            T.func_name(f"qgather_{fmt}_{n}x{k}_gpu")
            T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
            count = T.int64()
            ids = T.arg("ids", T.buffer((count,), "int64"))
            bufs = [T.arg(name, T.buffer(s, d)) for name, s, d in
                    zip(_array_names(spec), _array_shapes(spec, n, k), _array_dtypes(spec))]
            out = T.arg("out", T.buffer((count, k), "float32"))
            W = _Weights(spec, bufs)
            with Threads(emulate, {"blockIdx.x": count}, {"threadIdx.x": threads}) as th:
                i = th.block_vars["blockIdx.x"]
                with th.phase() as tv:
                    tx = tv["threadIdx.x"]
                    row = T.max(T.min(ids[i], n - 1), 0)
                    t, lane = row // LANES, row % LANES
                    with T.serial(0, (units + threads - 1) // threads) as step:
                        u = step * threads + tx
                        with T.If(u < units):
                            with T.Then():
                                for kk in range(GPU_UNIT):
                                    T.buffer_store(out, W.value(t, u, GPU_UNIT, kk, lane), [i, u * GPU_UNIT + kk])
    return ib.get()
