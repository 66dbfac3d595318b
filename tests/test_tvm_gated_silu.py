"""The gated-SiLU kernel (targets/tvm/gated_silu.py): its exponential against numpy's, and the
pattern lowered as one kernel with the graph's own numbers."""
import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from kiln.targets.tvm import gated_silu  # noqa: E402

HOST = {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()}


def _reference(g, u):
    g64, u64 = g.astype(np.float64), u.astype(np.float64)
    return g64 / (1.0 + np.exp(-g64)) * u64


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 20])        # 20: past PARALLEL_ROWS, the parallel loop
def test_kernel_matches_float64_silu_to_float32_rounding(fused, rows):
    rng = np.random.default_rng(rows)
    width = 64
    g = (rng.standard_normal((1, rows, width)) * 6).astype(np.float32)
    g[0, 0, :8] = [0.0, -0.0, 100.0, -100.0, 88.0, -88.0, 1e-30, -1e-30]   # clamps and tiny values
    u = rng.standard_normal((1, rows, width)).astype(np.float32)
    lib = tvm.compile(tvm.IRModule({"main": gated_silu._kernel(width, fused).with_attr("global_symbol", "main")}),
                      target=tvm.target.Target(HOST))
    out = tvm.runtime.tensor(np.zeros((1, rows, width), np.float32))
    if fused:
        lib["main"](tvm.runtime.tensor(np.concatenate([g, u], axis=-1)), out)
    else:
        lib["main"](tvm.runtime.tensor(g), tvm.runtime.tensor(u), out)
    want = _reference(g, u)
    got = out.numpy()
    assert np.isfinite(got).all()
    # a few float32 roundings: the polynomial exp (≤ 2 ulp), the division and two products;
    # below g = -87.3 e^-g is clamped to float32's largest, so silu is ~1e-37, not ~1e-42
    np.testing.assert_allclose(got, want, rtol=6e-7 * 8, atol=1e-35)


def test_the_mlp_pattern_is_matched_with_its_split():
    """SmolLM2-style graph: Split(gate_up) -> g, u; Mul(Mul(g, Sigmoid(g)), u) is one match
    that reads the Split's input; a Sigmoid whose output is read elsewhere is left alone."""
    from kiln.ir import Graph
    g = Graph("mlp")
    x = g.add_input("x", "float32", ("batch", "seq", 64))
    gate, up = g.add_node("Split", [x], {"axis": -1, "split": [32, 32]}, name="split")
    (sig,) = g.add_node("Sigmoid", [gate], {}, name="sig")
    (act,) = g.add_node("Mul", [gate, sig], {}, name="act")
    (out,) = g.add_node("Mul", [act, up], {}, name="gated")
    g.outputs = [out]
    found = gated_silu.match(g)
    assert len(found) == 1
    (m,) = found.values()
    assert m.fused is x and m.width == 32 and {n.op for n in m.folded} == {"Sigmoid", "Mul", "Split"}
    g.outputs = [out, sig]          # the sigmoid is an output too: no longer only the pattern's
    assert gated_silu.match(g) == {}
