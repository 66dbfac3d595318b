"""What the hand-written TVM kernels share (quantized and float matmuls): targets as cache
keys, the CPU's register blocking per vector ISA, GPU thread structure (or its CPU
emulation, for testing GPU kernels' arithmetic here), and Relax shape arithmetic."""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass

GPU_KINDS = ("cuda", "metal", "rocm", "vulkan", "opencl", "webgpu")


def target_key(target) -> str:
    """A hashable key for a TVM target dict (the kernels are cached per target)."""
    return json.dumps(target, sort_keys=True, default=list) if isinstance(target, dict) else str(target)


def is_gpu(target) -> bool:
    kind = target.get("kind") if isinstance(target, dict) else str(target).split()[0]
    return kind in GPU_KINDS


@dataclass(frozen=True)
class CpuShape:
    """Register blocking of the CPU GEMMs for one vector ISA."""
    tiles: int            # 16-row tiles per parallel task
    rows: int             # rows of x per register block
    wide: bool            # 32 vector registers: room for more GEMV accumulators
    # how fast precision's int8 dot products run: "vnni" (AVX-512 VNNI ``vpdpbusd``, 64 byte
    # products an instruction) or "avx2" (``vpmaddubsw`` then ``vpmaddwd``, 32 a pair); "" none
    int8_dot: str = ""


@functools.lru_cache(maxsize=None)
def cpu_shape(key: str) -> CpuShape:
    import tvm
    from tvm.target import codegen
    t = tvm.target.Target(json.loads(key) if key.startswith("{") else key)
    if codegen.target_has_features("avx512f", t):                        # 12 of 32 zmm accumulate
        return CpuShape(tiles=2, rows=6, wide=True,
                        int8_dot="vnni" if codegen.target_has_features("avx512vnni", t) else "avx2")
    triple = str(t.attrs.get("mtriple", ""))
    if codegen.target_has_features("avx2", t):
        return CpuShape(tiles=1, rows=6, wide=False, int8_dot="avx2")   # 12 of 16 ymm
    if triple.startswith(("aarch64", "arm64")):
        return CpuShape(tiles=1, rows=6, wide=False)      # NEON: 24 of 32 q
    return CpuShape(tiles=1, rows=2, wide=False)          # 16-byte vectors, 16 registers


class Threads:
    """A GPU kernel's blocks and threads, or (``emulate``) the same kernel for the CPU.

    On a GPU the block and thread indices are launched once and each barrier-separated phase
    runs on all threads. Emulated, each phase is a serial loop nest over the thread indices
    inside serial loops over the blocks: with a barrier between phases that is an order of
    effects a GPU allows, so the numbers are the kernel's. ``carried`` per-thread arrays (live
    across phases) get one copy per thread when emulated; index them with ``at``.
    """

    def __init__(self, emulate: bool, blocks: dict, threads: dict):
        self.emulate, self.blocks, self.threads = emulate, blocks, threads
        self.block_vars: dict = {}
        self.thread_vars: dict = {}
        self._frames: list = []

    def __enter__(self):
        from tvm.script.ir_builder import tirx as T
        for tag, ext in self.blocks.items():
            f = T.serial(0, ext) if self.emulate else T.launch_thread(tag, ext)
            self.block_vars[tag] = f.__enter__()
            self._frames.append(f)
        if not self.emulate:
            for tag, ext in self.threads.items():
                f = T.launch_thread(tag, ext)
                self.thread_vars[tag] = f.__enter__()
                self._frames.append(f)
        return self

    def __exit__(self, *exc):
        for f in reversed(self._frames):
            f.__exit__(*exc)

    def phase(self):
        """A context whose value is the thread indices {tag: var}."""
        from contextlib import ExitStack, contextmanager

        from tvm.script.ir_builder import tirx as T

        @contextmanager
        def run():
            if not self.emulate:
                yield self.thread_vars
                return
            with ExitStack() as stack:
                yield {tag: stack.enter_context(T.serial(0, ext)) for tag, ext in self.threads.items()}
        return run()

    def sync(self):
        from tvm import tirx
        from tvm.script.ir_builder import tirx as T
        if not self.emulate:
            T.evaluate(tirx.op.tvm_storage_sync("shared"))

    def shared(self, shape, dtype: str = "float32"):
        from tvm.script.ir_builder import tirx as T
        return T.alloc_buffer(shape, dtype, scope="global" if self.emulate else "shared")

    def local(self, size: int, dtype: str = "float32", carried: bool = False):
        from tvm.script.ir_builder import tirx as T
        if self.emulate:
            return T.alloc_buffer((tuple(self.threads.values()) if carried else ()) + (size,), dtype)
        return T.alloc_buffer((size,), dtype, scope="local")

    def at(self, tv: dict, i, carried: bool = False) -> list:
        return [tv[tag] for tag in self.threads] + [i] if self.emulate and carried else [i]


def dims(expr, what: str = "matmul kernels") -> list:
    """The Relax expression's shape as a list of PrimExprs."""
    shape = expr.ty.shape
    if shape is None or not hasattr(shape, "values"):
        from kiln.errors import KilnError
        raise KilnError(None, f"{what} need an input of known rank and shape")
    return list(shape.values)


def product(values):
    """The int64 product of shape values (1 for none)."""
    from tvm import tirx
    total = None
    for d in values:
        d = tirx.Cast("int64", d) if str(d.ty) != "int64" else d
        total = d if total is None else total * d
    return total if total is not None else tirx.IntImm("int64", 1)


TILE_LANES = 16      # outputs per tile: both weight layouts group rows by 16


# ---- the tiled GPU GEMM's shared steps (float and block weights differ only in loading) ----
# A block holds ``bm_rows`` rows of x against ``tb`` tiles of TILE_LANES outputs; thread (ty, tx) keeps
# ``rpt`` rows (ty, ty + bm, ...) times lane tx of each tile in its accumulators ``acc``; each k
# step stages ``bk`` k's of x in ``xs`` [bm_rows, bk] and of the weights in ``ws`` [bk, tb·TILE_LANES].

def matmul_args(T, k: int, width: int, lead: int, weight_args):
    """A CPU matmul kernel's arguments: ``x``, the weights (``weight_args()`` declares them),
    ``out``. With ``lead`` 2, x and out arrive as the graph holds them, [batch, tokens, k] and
    [batch, tokens, width], and the kernel reads them as [batch * tokens, ...]: a Relax
    reshape on each side of the call costs the VM three instructions (shape, view, release),
    about a fifth of a SmolLM2 layer's. Returns (rows, x, weights, out)."""
    outer = [T.int64() for _ in range(lead)]
    rows = outer[0] if lead == 1 else product(outer)
    x = T.arg("x", T.buffer((*outer, k), "float32"))
    weights = weight_args()
    out = T.arg("out", T.buffer((*outer, width), "float32"))
    if lead != 1:           # after every argument: a buffer declaration opens a frame
        x = T.decl_buffer((rows, k), "float32", data=x.data)
        out = T.decl_buffer((rows, width), "float32", data=out.data)
    return rows, x, weights, out


def emit_matmul(bb, x, packed: list, n: int, k: int, width: int, gpu: bool, func_for):
    """``x [..., k] @ wᵀ -> [..., n]`` through the kernel ``func_for(lead)`` gives (a (func,
    name) pair, lead being how many leading dimensions its x has). On the CPU a [batch,
    tokens, k] x goes to the kernel as it is when the kernel's width is n; otherwise x is
    reshaped to 2-D, the padded columns sliced off and the result reshaped back."""
    from tvm import relax, tirx
    lead = dims(x)[:-1]
    rows = product(lead)
    direct = not gpu and len(lead) == 2 and width == n
    x2 = x if len(lead) == 1 or direct else bb.emit(relax.op.reshape(x, relax.ShapeExpr([rows, tirx.IntImm("int64", k)])))
    func, name = func_for(2 if direct else 1)
    gv = bb.add_func(func, name)
    out = [*lead, tirx.IntImm("int64", width)] if direct else [rows, tirx.IntImm("int64", width)]
    y = bb.emit(relax.call_tir(gv, [x2, *packed], relax.TensorType(out, "float32")))
    if direct:
        return y
    if width != n:
        y = bb.emit(relax.op.strided_slice(y, axes=[1], begin=[0], end=[n]))
    if len(lead) != 1:
        y = bb.emit(relax.op.reshape(y, relax.ShapeExpr([*lead, tirx.IntImm("int64", n)])))
    return y


def gpu_tiles_zero(th: Threads, acc, rpt: int, tb: int) -> None:
    from tvm import tirx
    from tvm.script.ir_builder import tirx as T
    with th.phase() as tv:
        for a in range(rpt * tb):
            T.buffer_store(acc, tirx.const(0, "float32"), th.at(tv, a, True))


def gpu_tiles_accumulate(th: Threads, acc, xs, ws, rpt: int, tb: int, bm: int, bk: int) -> None:
    """Add the staged step's products into every thread's accumulators, then a barrier."""
    from tvm.script.ir_builder import tirx as T
    with th.phase() as tv:
        ty, tx = tv["threadIdx.y"], tv["threadIdx.x"]
        totals = [acc[tuple(th.at(tv, a, True))] for a in range(rpt * tb)]
        for kk in range(bk):
            for i in range(rpt):
                xv = xs[ty + bm * i, kk]
                for u in range(tb):
                    totals[i * tb + u] = totals[i * tb + u] + xv * ws[kk, u * TILE_LANES + tx]
        for a in range(rpt * tb):
            T.buffer_store(acc, totals[a], th.at(tv, a, True))
    th.sync()


def gpu_tiles_store(th: Threads, acc, out, m_rows, mb, tg, rpt: int, tb: int, bm: int, bm_rows: int) -> None:
    """Write the accumulators of the rows that exist to ``out`` [m_rows, tiles·TILE_LANES]."""
    from tvm.script.ir_builder import tirx as T
    with th.phase() as tv:
        ty, tx = tv["threadIdx.y"], tv["threadIdx.x"]
        for i in range(rpt):
            with T.If(mb * bm_rows + ty + bm * i < m_rows):
                with T.Then():
                    for u in range(tb):
                        T.buffer_store(out, acc[tuple(th.at(tv, i * tb + u, True))],
                                       [mb * bm_rows + ty + bm * i, (tg * tb + u) * TILE_LANES + tx])
