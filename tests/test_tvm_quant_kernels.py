"""The TVM backend's quantized matmul and lookup kernels (targets/tvm/quant_kernels.py).

Numbers are checked on the CPU against numpy over ``gguf.quants.dequantize`` (the independent
reference); the GPU kernels' arithmetic runs on the CPU through their emulated build, and their
CUDA / Metal builds are checked by the source they contain.
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import tvm
from tvm import relax

from kiln.errors import KilnError
from kiln.formats import int4_group
from kiln.targets.tvm import quant_kernels as Q
from kiln.targets.tvm.kernel_common import target_key
from kiln.weights import Weight

# int4_g64 and int4_g256 run the same kernels as int4_g32 and int4_g128 with another span of
# their scales (tests/test_gptq_awq.py compiles int4_g64 models): left out to save time
FORMATS = sorted(Q.SUPPORTED - {"int4_g64", "int4_g256"})
HOST = {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()}
K = 768              # 3 K-quant super-blocks; the CPU GEMM takes it in two chunks of 384
N_ODD, N_EVEN = 40, 64   # 40: a padded tile and an odd tile count; 64: two tiles per AVX-512 task
# float32 sums of 768 products: the error is a few units of 2**-24 of the sum of |products|
TOLERANCE = 2e-6


def _weight(fmt: str, n: int, k: int = K, seed: int = 0) -> Weight:
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((n, k)).astype(np.float32) * rng.uniform(0.5, 2.0, (n, 1)).astype(np.float32)
    return Weight.from_array(values, "f32", name=f"w_{fmt}").astype(fmt)


def _reference(w: Weight) -> np.ndarray:
    """The weight's values by the gguf package, float64 (GGUF has no int4_gN: kiln's codec,
    checked against the formula in tests/test_gptq_awq.py)."""
    if w.format.gguf_type is None:
        return w.numpy().astype(np.float64)
    kind = getattr(gguf.GGMLQuantizationType, w.format.name.upper())
    return gguf.quants.dequantize(w.raw(), kind).reshape(w.shape).astype(np.float64)


def _relative_error(y: np.ndarray, x: np.ndarray, w64: np.ndarray) -> float:
    """max |y − x·wᵀ| over the sum of |products| (the scale float32 rounding works at)."""
    ref = x.astype(np.float64) @ w64.T
    scale = np.abs(x.astype(np.float64)) @ np.abs(w64).T
    return float((np.abs(y - ref) / np.maximum(scale, 1e-30)).max())


def _module(fmt: str, weights: dict, target: dict, *, gather_from: str | None = None):
    """main(x [b, s, K], ids [b, s], *arrays) -> (x @ wᵀ for each weight..., the same with
    exact=False..., rows of one)."""
    bb = relax.BlockBuilder()
    b, s = tvm.tirx.Var("b", "int64"), tvm.tirx.Var("s", "int64")
    x = relax.Var("x", relax.TensorType([b, s, K], "float32"))
    ids = relax.Var("ids", relax.TensorType([b, s], "int64"))
    params, outs = [], []
    packed = {}
    for name, w in weights.items():
        arrays = Q.pack(w)
        packed[name] = arrays
        params.append([relax.Var(f"{name}.{a}", relax.TensorType(list(v.shape), str(v.dtype))) for a, v in arrays.items()])
    with bb.function("main", [x, ids, *[p for ps in params for p in ps]]):
        with bb.dataflow():
            for (name, w), ps in zip(weights.items(), params):
                outs.append(Q.matmul(bb, x, ps, fmt, w.shape[0], w.shape[1], target))
            for (name, w), ps in zip(weights.items(), params):
                outs.append(Q.matmul(bb, x, ps, fmt, w.shape[0], w.shape[1], target, exact=False))
            if gather_from is not None:
                i = list(weights).index(gather_from)
                w = weights[gather_from]
                outs.append(Q.gather(bb, ids, params[i], fmt, w.shape[0], w.shape[1], target))
            out = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(out)
    return bb.get(), packed


@pytest.fixture(scope="module")
def cpu_results():
    """Per format: one compiled module run on every shape (compiling once keeps the tests fast)."""
    cache = {}

    def get(fmt):
        if fmt not in cache:
            weights = {"odd": _weight(fmt, N_ODD), "even": _weight(fmt, N_EVEN, seed=1)}
            mod, packed = _module(fmt, weights, HOST, gather_from="odd")
            vm = relax.VirtualMachine(tvm.compile(mod, target=tvm.target.Target(HOST)), tvm.cpu())
            arrays = [tvm.runtime.tensor(a) for arrs in packed.values() for a in arrs.values()]
            rng = np.random.default_rng(7)
            runs = {}
            for b, s in [(1, 1), (1, 2), (1, 5), (2, 3), (1, 9), (2, 41)]:
                x = rng.standard_normal((b, s, K)).astype(np.float32)
                ids = rng.integers(0, N_ODD, (b, s))
                runs[(b, s)] = (x, ids, [o.numpy() for o in vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(ids),
                                                                          *arrays)])
            cache[fmt] = weights, runs
        return cache[fmt]
    return get


@pytest.mark.parametrize("fmt", FORMATS)
def test_pack_keeps_the_blocks(fmt):
    w = _weight(fmt, N_ODD)
    arrays = Q.pack(w)
    assert list(arrays) == Q._array_names(Q._FORMATS[fmt])
    assert all(a.shape[0] == 3 and a.shape[-1] == Q.LANES for a in arrays.values())
    stored = sum(a.nbytes for a in arrays.values())
    gguf_bytes = w.raw().nbytes * 48 / 40          # the same rows padded to whole tiles
    assert stored <= gguf_bytes * 1.07, (stored, gguf_bytes)   # nothing float32 per weight
    assert all(a.dtype != np.float32 for a in arrays.values())


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows", [(1, 1), (1, 2), (1, 5), (2, 3), (1, 9), (2, 41)], ids=lambda r: f"{r[0]}x{r[1]}")
def test_cpu_matmul_matches_dequantized_product(fmt, rows, cpu_results):
    weights, runs = cpu_results(fmt)
    x, _, outs = runs[rows]
    for w, y in zip(weights.values(), outs):
        assert y.shape == (*rows, w.shape[0])
        err = _relative_error(y.reshape(-1, w.shape[0]), x.reshape(-1, K), _reference(w))
        assert err < TOLERANCE, (fmt, rows, err)


def _int8_activation_reference(fmt: str, w: Weight, x: np.ndarray) -> np.ndarray:
    """What exact=False computes where it quantizes x to int8 (per 32 values, scale max|x|/127):
    the weights times the dequantized int8 x (biases included, as llama.cpp's Q8_1 products
    take them), float64."""
    k = w.shape[1]
    xb = x.reshape(len(x), k // 32, 32).astype(np.float32)
    amax = np.abs(xb).max(axis=-1, keepdims=True)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    xq = np.round(xb * inv) * (amax / np.float32(127)).astype(np.float32)
    return xq.reshape(len(x), k).astype(np.float64) @ _reference(w).T


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows", [(1, 1), (1, 2), (1, 5), (1, 9), (2, 41)], ids=lambda r: f"{r[0]}x{r[1]}")
def test_cpu_matmul_inexact_mode(fmt, rows, cpu_results):
    weights, runs = cpu_results(fmt)
    x, _, outs = runs[rows]
    # on VNNI the GEMV (rows <= 8) and the GEMM (prefill) both take int8 activations
    int8 = Q._int8_activations(fmt, target_key(HOST))
    for w, y in zip(weights.values(), outs[len(weights):2 * len(weights)]):
        assert y.shape == (*rows, w.shape[0])
        y, x2 = y.reshape(-1, w.shape[0]), x.reshape(-1, K)
        if not int8:
            # the scales folded out of float32 sums: rounding of the same order (measured 5e-8
            # to 1.2e-7 of the summed |products| on 1536x576/512 weights)
            assert _relative_error(y, x2, _reference(w)) < TOLERANCE
            continue
        # int8 activations: the product of the int8-rounded x, to float32 rounding ...
        ref = _int8_activation_reference(fmt, w, x2)
        scale = np.abs(x2.astype(np.float64)) @ np.abs(_reference(w)).T
        assert (np.abs(y - ref) / scale).max() < TOLERANCE
        # ... which is within llama.cpp's rounding of the exact one (measured 1.3e-3 to 2.7e-3)
        assert 1e-4 < _relative_error(y, x2, _reference(w)) < 1e-2


_X86 = tvm.target.codegen.llvm_get_system_cpu() not in ("generic", "") and \
    tvm.target.codegen.target_has_features("avx2", tvm.target.Target(HOST))


@pytest.mark.skipif(not _X86, reason="AVX2 code runs only on an x86 CPU with AVX2")
@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q8_0", "q6_k"])
def test_avx2_int8_products_are_vnnis_integers(fmt):
    """On AVX2 (no VNNI) exact=False takes its byte products with vpmaddubsw: 4-bit and 6-bit
    codes go in unsigned, Q8_0's 8-bit ones signed (|code − 128| against x with the code's
    sign), so no int16 pair sum saturates. Q8_0 gets pairs of the extreme codes 255 and 0
    against x of their sign, which would saturate as unsigned codes; the result is the int8-rounded x's
    product to float32 rounding, as on VNNI."""
    target = {"kind": "llvm", "mcpu": "haswell"}
    assert Q.cpu_shape(target_key(target)).int8_dot == "avx2"
    assert Q._int8_activations(fmt, target_key(target))
    n = N_ODD
    w = _weight(fmt, n, seed=11)
    if fmt == "q8_0":
        blocks = w.raw().reshape(n, -1, 34).copy()
        blocks[:, :, 2:] = np.where(np.arange(32) // 2 % 2 == 0, 127, -128).astype(np.int8).view(np.uint8)
        w = Weight(w.shape, "q8_0", lambda b=blocks: b.reshape(-1))
    mod, packed = _module(fmt, {"w": w}, target)
    vm = relax.VirtualMachine(tvm.compile(mod, target=tvm.target.Target(target)), tvm.cpu())
    arrays = [tvm.runtime.tensor(a) for a in packed["w"].values()]
    rng = np.random.default_rng(13)
    for b, s in [(1, 1), (1, 3), (1, 8), (2, 20)]:        # GEMV row counts, then the GEMM
        x = rng.standard_normal((b, s, K)).astype(np.float32)
        # pairs of k's (vpmaddubsw's int16 sums): +127, +127 against x > 0, −128, −128 against x < 0
        sign = np.where(np.arange(K) // 2 % 2 == 0, 1, -1).astype(np.float32)
        x = np.abs(x) * sign
        ids = np.zeros((b, s), np.int64)
        outs = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(ids), *arrays)
        y, x2 = outs[1].numpy().reshape(-1, n), x.reshape(-1, K)
        ref = _int8_activation_reference(fmt, w, x2)
        scale = np.abs(x2.astype(np.float64)) @ np.abs(_reference(w)).T
        assert (np.abs(y - ref) / scale).max() < TOLERANCE, (fmt, b, s)


@pytest.mark.parametrize("fmt", FORMATS)
def test_cpu_gather_is_the_dequantized_rows(fmt, cpu_results):
    weights, runs = cpu_results(fmt)
    w64 = _reference(weights["odd"])
    for x, ids, outs in runs.values():
        assert outs[-1].shape == (*ids.shape, K)
        np.testing.assert_array_equal(outs[-1], w64[ids].astype(np.float32))


def _emulated(func, target=None):
    # GPU kernels built with emulate=True run on a plain LLVM target; CPU kernels must be compiled
    # for the CPU they were written for (their intrinsics do not exist elsewhere)
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    return tvm.compile(mod, target=target or {"kind": "llvm"})["main"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n", [N_ODD, N_EVEN])     # GEMM blocks of 1 and of 4 tiles
def test_gpu_kernels_arithmetic_emulated_on_cpu(fmt, n):
    w = _weight(fmt, n, seed=3)
    w64 = _reference(w)
    arrays = [tvm.runtime.tensor(a) for a in Q.pack(w).values()]
    mm = _emulated(Q._gpu_matmul_func(fmt, n, K, emulate=True))
    rng = np.random.default_rng(5)
    for m in (1, 4, 5, 37):       # the GEMV (≤ 4 rows) and the tiled GEMM with a partial row block
        x = rng.standard_normal((m, K)).astype(np.float32)
        out = tvm.runtime.empty((m, Q._tiles(n) * Q.LANES), "float32")
        mm(tvm.runtime.tensor(x), *arrays, out)
        assert _relative_error(out.numpy()[:, :n], x, w64) < TOLERANCE
    ids = np.array([0, 7, n - 1, 16, n + 5, -2], np.int64)
    rows = tvm.runtime.empty((len(ids), K), "float32")
    _emulated(Q._gpu_gather_func(fmt, n, K, emulate=True))(tvm.runtime.tensor(ids), *arrays, rows)
    np.testing.assert_array_equal(rows.numpy(), w64[np.clip(ids, 0, n - 1)].astype(np.float32))


def _all_formats_module(target):
    bb = relax.BlockBuilder()
    s = tvm.tirx.Var("s", "int64")
    x = relax.Var("x", relax.TensorType([1, s, 256], "float32"))
    ids = relax.Var("ids", relax.TensorType([1, s], "int64"))
    params, outs = [], []
    for fmt in FORMATS:
        spec = Q._FORMATS[fmt]
        params.append([relax.Var(f"{fmt}.{a}", relax.TensorType(list(shape), dtype)) for a, shape, dtype in
                       zip(Q._array_names(spec), Q._array_shapes(spec, 48, 256), Q._array_dtypes(spec))])
    with bb.function("main", [x, ids, *[p for ps in params for p in ps]]):
        with bb.dataflow():
            for fmt, ps in zip(FORMATS, params):
                outs.append(Q.matmul(bb, x, ps, fmt, 48, 256, target))
                outs.append(Q.gather(bb, ids, ps, fmt, 48, 256, target))
            out = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(out)
    return bb.get()


def _modules(m):
    yield m
    for i in m.imports:
        yield from _modules(i)


@pytest.mark.parametrize("kind,host", [("cuda", {"kind": "llvm"}), ("metal", {"kind": "llvm", "mtriple": "arm64-apple-macos"})])
def test_gpu_builds_hold_every_kernel(kind, host):
    target = {"kind": "cuda", "arch": "sm_80"} if kind == "cuda" else {"kind": "metal"}
    ex = tvm.compile(_all_formats_module(target), target=tvm.target.Target(target, host=host))
    device = [m for m in _modules(ex.mod) if m.kind == kind]
    assert len(device) == 1
    src = device[0].inspect_source("" if kind == "cuda" else "metal")
    head = 'extern "C" __global__ void' if kind == "cuda" else "kernel void"
    for fmt in FORMATS:
        for kernel in (f"qmm_{fmt}_gpu_kernel(", f"qmm_{fmt}_gpu_kernel_1(", f"qgather_{fmt}_gpu_kernel("):
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
    ex = tvm.compile(_all_formats_module(target), target=tvm.target.Target(target))
    asm = [m for m in _modules(ex.mod) if m.kind == "llvm"][0].inspect_source("asm")
    assert vector in asm


def test_refuses_what_it_cannot_run():
    with pytest.raises(KilnError, match="no fused TVM kernel"):
        Q.pack(Weight((16, 32), "iq4_nl", lambda: np.zeros(16 * 18, np.uint8)))
    with pytest.raises(KilnError, match="multiple of 256"):
        Q._check("q4_k", 16, 96)
    with pytest.raises(KilnError, match="2-D"):
        Q.pack(Weight.from_array(np.zeros((2, 16, 32), np.float32), "q4_0"))


def test_real_smollm2_weights(smollm2_gguf):
    """A Q4_1 projection and the Q8_0 embedding (rows and LM head) of the real model."""
    from kiln.frontends.detect import read_model
    weights = read_model(smollm2_gguf).weights
    down, embed = weights["layers.0.down.weight"], weights["embed"]
    assert (down.format.name, embed.format.name) == ("q4_1", "q8_0")
    rng = np.random.default_rng(0)
    for w in (down, embed):
        n, k = w.shape
        arrays = Q.pack(w)
        f = _emulated(Q._cpu_matmul_func(w.format.name, n, k, target_key(HOST)), HOST)
        dev = [tvm.runtime.tensor(a) for a in arrays.values()]
        x = rng.standard_normal((1, k)).astype(np.float32)
        out = tvm.runtime.empty((1, Q._tiles(n) * Q.LANES), "float32")
        f(tvm.runtime.tensor(x), *dev, out)
        w64 = _reference(w)
        assert _relative_error(out.numpy()[:, :n], x, w64) < TOLERANCE
    ids = np.array([0, 1, 49151, 12345], np.int64)
    rows = tvm.runtime.empty((4, 576), "float32")
    _emulated(Q._cpu_gather_func("q8_0", 49152, 576), HOST)(tvm.runtime.tensor(ids), *dev, rows)
    np.testing.assert_array_equal(rows.numpy(), w64[ids].astype(np.float32))
