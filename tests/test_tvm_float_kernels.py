"""The TVM backend's float-weight matmuls (targets/tvm/float_kernels.py).

Numbers are checked on the CPU against numpy's float64 product with the weight's own values;
the GPU matmul's arithmetic runs on the CPU through its emulated build, and the GPU and cross
builds are checked by the code they contain.
"""
from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from kiln.errors import KilnError
from kiln.targets.tvm import float_kernels as F
from kiln.weights import Weight

FORMATS = sorted(F.SUPPORTED)
HOST = {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()}
K = 1100            # over 512: the CPU GEMM takes it in three chunks, the last one shorter;
                    # not a multiple of the GEMV's 8-k step: its tail runs too
N_ODD, N_EVEN = 40, 64   # 40: a padded tile and an odd tile count; 64: two tiles per AVX-512 task
# float32 sums of 1100 products: a few units of 2**-24 of the sum of |products| (measured ≤ 2.5e-7)
TOLERANCE = 2e-6
ROWS = [(1, 1), (1, 2), (1, 5), (2, 3), (1, 9), (2, 41)]    # every path: M = 1, 2, ≤ 8, GEMM


def _weight(fmt: str, n: int, k: int = K, seed: int = 0) -> Weight:
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((n, k)).astype(np.float32) * rng.uniform(0.5, 2.0, (n, 1)).astype(np.float32)
    return Weight.from_array(values, "f32", name=f"w_{fmt}").astype(fmt)


def _reference(w: Weight) -> np.ndarray:
    """The weight's stored values, float64, read from its bytes independently of kiln's
    formats (bf16: the upper half of a float32)."""
    raw = w.raw().reshape(-1)
    if w.format.name == "bf16":
        values = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        values = raw.view({"f32": np.float32, "f16": np.float16}[w.format.name])
    return values.reshape(w.shape).astype(np.float64)


def _relative_error(y: np.ndarray, x: np.ndarray, w64: np.ndarray) -> float:
    """max |y − x·wᵀ| over the sum of |products| (the scale float32 rounding works at)."""
    ref = x.astype(np.float64) @ w64.T
    scale = np.abs(x.astype(np.float64)) @ np.abs(w64).T
    return float((np.abs(y - ref) / np.maximum(scale, 1e-30)).max())


@pytest.fixture(scope="module")
def cpu_results():
    """Per format: one compiled module run on every row count (compiling once keeps it fast)."""
    cache = {}

    def get(fmt):
        if fmt not in cache:
            weights = {"odd": _weight(fmt, N_ODD), "even": _weight(fmt, N_EVEN, seed=1)}
            bb = relax.BlockBuilder()
            b, s = tvm.tirx.Var("b", "int64"), tvm.tirx.Var("s", "int64")
            x = relax.Var("x", relax.TensorType([b, s, K], "float32"))
            packed = {name: F.pack(w) for name, w in weights.items()}
            params = {name: [relax.Var(f"{name}.{a}", relax.TensorType(list(v.shape), str(v.dtype)))
                             for a, v in arrays.items()] for name, arrays in packed.items()}
            with bb.function("main", [x, *[p for ps in params.values() for p in ps]]):
                with bb.dataflow():
                    outs = [F.matmul(bb, x, params[name], fmt, w.shape[0], K, HOST) for name, w in weights.items()]
                    out = bb.emit_output(relax.Tuple(outs))
                bb.emit_func_output(out)
            vm = relax.VirtualMachine(tvm.compile(bb.get(), target=tvm.target.Target(HOST)), tvm.cpu())
            arrays = [tvm.runtime.tensor(a) for arrs in packed.values() for a in arrs.values()]
            rng = np.random.default_rng(7)
            runs = {}
            for rows in ROWS:
                x = rng.standard_normal((*rows, K)).astype(np.float32)
                runs[rows] = x, [o.numpy() for o in vm["main"](tvm.runtime.tensor(x), *arrays)]
            cache[fmt] = weights, runs
        return cache[fmt]
    return get


@pytest.mark.parametrize("fmt", FORMATS)
def test_pack_keeps_the_stored_type(fmt):
    w = _weight(fmt, N_ODD)
    arrays = F.pack(w)
    assert list(arrays) == ["w"]
    a = arrays["w"]
    assert a.shape == (3, K, F.LANES)
    assert a.dtype == {"f32": np.float32, "f16": np.float16, "bf16": np.uint16}[fmt]
    assert a.nbytes == w.raw().nbytes * 48 // 40         # the same bytes, padded to whole tiles
    # entry [t, j, l] is row 16·t + l at column j; the padding rows are zeros
    stored = w.raw().reshape(-1).view(a.dtype).reshape(N_ODD, K)
    assert np.array_equal(a[1, :, 3], stored[19])
    assert np.array_equal(a[2, 7, :8], stored[32:, 7])
    assert not a[2, :, 8:].any()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows", ROWS, ids=lambda r: f"{r[0]}x{r[1]}")
def test_cpu_matmul_matches_the_product(fmt, rows, cpu_results):
    weights, runs = cpu_results(fmt)
    x, outs = runs[rows]
    for w, y in zip(weights.values(), outs):
        assert y.shape == (*rows, w.shape[0])
        err = _relative_error(y.reshape(-1, w.shape[0]), x.reshape(-1, K), _reference(w))
        assert err < TOLERANCE, (fmt, rows, err)


@pytest.mark.parametrize("fmt", FORMATS)
def test_cpu_gather_is_the_stored_rows(fmt):
    n, k = N_ODD, 96
    w = _weight(fmt, n, k)
    bb = relax.BlockBuilder()
    ids = relax.Var("ids", relax.TensorType([tvm.tirx.Var("b", "int64"), tvm.tirx.Var("s", "int64")], "int64"))
    arrays = F.pack(w)
    p = relax.Var("w", relax.TensorType(list(arrays["w"].shape), str(arrays["w"].dtype)))
    with bb.function("main", [ids, p]):
        with bb.dataflow():
            out = bb.emit_output(F.gather(bb, ids, [p], fmt, n, k, HOST))
        bb.emit_func_output(out)
    vm = relax.VirtualMachine(tvm.compile(bb.get(), target=tvm.target.Target(HOST)), tvm.cpu())
    rows = np.array([[0, 7, n - 1], [16, n + 5, -2]], np.int64)    # outside 0..n-1: clamped
    got = vm["main"](tvm.runtime.tensor(rows), tvm.runtime.tensor(arrays["w"])).numpy()
    np.testing.assert_array_equal(got, _reference(w)[np.clip(rows, 0, n - 1)].astype(np.float32))


def test_inexact_mode_is_the_same_kernel():
    assert F.matmul.__kwdefaults__ == {"exact": True}
    w = _weight("bf16", 16, 64)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([tvm.tirx.Var("m", "int64"), 64], "float32"))
    p = relax.Var("w", relax.TensorType([1, 64, 16], "uint16"))
    with bb.function("main", [x, p]):
        with bb.dataflow():
            out = bb.emit_output(relax.Tuple([F.matmul(bb, x, [p], "bf16", 16, 64, HOST),
                                              F.matmul(bb, x, [p], "bf16", 16, 64, HOST, exact=False)]))
        bb.emit_func_output(out)
    vm = relax.VirtualMachine(tvm.compile(bb.get(), target=tvm.target.Target(HOST)), tvm.cpu())
    xs = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    a, b = vm["main"](tvm.runtime.tensor(xs), tvm.runtime.tensor(F.pack(w)["w"]))
    np.testing.assert_array_equal(a.numpy(), b.numpy())


def _small_module(target):
    bb = relax.BlockBuilder()
    s = tvm.tirx.Var("s", "int64")
    x = relax.Var("x", relax.TensorType([1, s, 96], "float32"))
    ids = relax.Var("ids", relax.TensorType([1, s], "int64"))
    params = {f: relax.Var(f, relax.TensorType([3, 96, F.LANES], F._STORAGE[f])) for f in FORMATS}
    with bb.function("main", [x, ids, *params.values()]):
        with bb.dataflow():
            outs = [F.matmul(bb, x, [p], f, 40, 96, target) for f, p in params.items()]
            outs += [F.gather(bb, ids, [p], f, 40, 96, target) for f, p in params.items()]
            out = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(out)
    return bb.get()


def _modules(m):
    yield m
    for i in m.imports:
        yield from _modules(i)


def _emulated(func):
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target={"kind": "llvm"})["main"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n,k", [(N_ODD, 100), (N_EVEN, 96), (48, K)], ids=["odd", "even", "longk"])
def test_gpu_matmul_arithmetic_emulated_on_cpu(fmt, n, k):
    """GEMV blocks (≤ 4 rows) and GEMM blocks of 1, 4 and 3 tiles; k not a multiple of the
    GEMV's 8 slices nor of the GEMM's 32-k steps (100, 1100)."""
    w = _weight(fmt, n, k, seed=3)
    w64 = _reference(w)
    mm = _emulated(F._gpu_matmul_func(fmt, n, k, emulate=True))
    arr = tvm.runtime.tensor(F.pack(w)["w"])
    rng = np.random.default_rng(5)
    for m in (1, 3, 4, 5, 37):      # a partial row block in the GEMM
        x = rng.standard_normal((m, k)).astype(np.float32)
        out = tvm.runtime.empty((m, F._tiles(n) * F.LANES), "float32")
        mm(tvm.runtime.tensor(x), arr, out)
        assert _relative_error(out.numpy()[:, :n], x, w64) < TOLERANCE, (fmt, n, k, m)


@pytest.mark.parametrize("kind,host", [("cuda", {"kind": "llvm"}), ("metal", {"kind": "llvm", "mtriple": "arm64-apple-macos"})])
def test_gpu_builds_hold_the_kernels(kind, host):
    target = {"kind": "cuda", "arch": "sm_80"} if kind == "cuda" else {"kind": "metal"}
    ex = tvm.compile(_small_module(target), target=tvm.target.Target(target, host=host))
    device = [m for m in _modules(ex.mod) if m.kind == kind]
    assert len(device) == 1
    src = device[0].inspect_source("" if kind == "cuda" else "metal")
    head = 'extern "C" __global__ void' if kind == "cuda" else "kernel void"
    for fmt in FORMATS:
        # the GEMV and the GEMM of the hand-scheduled product; the gather (dlight) may be fused
        for kernel in (f"fmm_{fmt}_40x96_gpu_kernel(", f"fmm_{fmt}_40x96_gpu_kernel_1(", f"fgather_{fmt}_40x96_gpu"):
            assert any(head in line and kernel in line for line in src.splitlines()), (kind, kernel)
    if kind == "cuda":
        assert "__syncthreads()" in src and "__shared__" in src
    else:
        assert "threadgroup_barrier" in src and "threadgroup float" in src


@pytest.mark.parametrize("target,vector", [
    ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}, "fmla\tv"),
    ({"kind": "llvm", "mcpu": "haswell"}, "vfmadd"),
    ({"kind": "llvm", "mcpu": "skylake-avx512"}, "zmm"),
])
def test_cpu_cross_builds_are_vectorized(target, vector):
    ex = tvm.compile(_small_module(target), target=tvm.target.Target(target))
    asm = [m for m in _modules(ex.mod) if m.kind == "llvm"][0].inspect_source("asm")
    assert vector in asm


def test_refuses_what_it_cannot_run():
    with pytest.raises(KilnError, match="no TVM float kernel"):
        F.pack(Weight.from_array(np.zeros((16, 32), np.float32), "q8_0"))
    with pytest.raises(KilnError, match="2-D"):
        F.pack(Weight.from_array(np.zeros((2, 16, 32), np.float32), "bf16"))
    with pytest.raises(KilnError, match="no TVM float kernel"):
        F._check("f64", 16, 32)
