"""The matcher toolkit the passes share (passes/match.py), and a pass asking its target what it
can fuse (targets/fusions.py) instead of importing a backend's table."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from kiln.ir import Graph
from kiln.passes import match as m
from kiln.targets import fusions
from kiln.weights import Weight

ROOT = Path(__file__).resolve().parents[1]


def _chain():
    """y = Reshape(Expand(Unsqueeze(k))) * 0.5, read once by a Relu."""
    g = Graph("chain")
    k = g.add_input("k", "float32", (1, 2, 4, 8))
    u = g.add_node("Unsqueeze", [k], {"axes": [2]})[0]
    e = g.add_node("Expand", [u, g.const(np.array([1, 1, 2, 1, 1], dtype=np.int64))])[0]
    r = g.add_node("Reshape", [e, g.const(np.array([0, 4, -1, 8], dtype=np.int64))])[0]
    y = g.add_node("Mul", [g.const(np.float32(0.5)), r])[0]
    g.outputs = [g.add_node("Relu", [y])[0]]
    return g, k, r, y


def test_producer_walks_and_says_what_it_expected():
    g, k, r, y = _chain()
    assert m.producer(y, "Mul", "the scaling").op == "Mul"
    with pytest.raises(m.Refused, match="the keys: expected Transpose, found Reshape"):
        m.producer(r, "Transpose", "the keys")
    with pytest.raises(m.NoMatch, match="found a graph input"):
        m.producer(k, "Mul", "x", m.NoMatch)
    assert m.made_by(r, "Cast", "Reshape").op == "Reshape" and m.made_by(r, "Cast") is None and m.made_by(k, "Mul") is None


def test_repeat_stripping_constants_and_users():
    g, k, r, y = _chain()
    assert m.strip_repeat(r) is k and m.strip_repeat(k) is k
    other, value = m.constant_operand(y.producer)
    assert other is r and value == 0.5
    assert m.constant_operand(m.made_by(r, "Reshape"))[1] is None     # a shape tensor is no scalar
    assert m.sole_user(y).op == "Relu" and m.sole_user(g.outputs[0]) is None


def test_linear_weight():
    g = Graph("linear")
    x = g.add_input("x", "float32", (1, 3, 32))
    w = g.add_weight("w", Weight.from_array(np.ones((4, 32), np.float32)))
    mm = g.add_node("MatMul", [x, g.add_node("Transpose", [w], {"perm": [1, 0]})[0]])[0].producer
    flipped = g.add_node("MatMul", [x, g.add_node("Transpose", [w], {"perm": [0, 1]})[0]])[0].producer
    assert m.linear_weight(mm) is w and m.linear_weight(flipped) is None


def test_apply_rule_counts_fused_refused_and_skipped():
    g, k, r, y = _chain()
    seen = []

    def rewrite(node):
        seen.append(node.op)
        if node.op == "Relu":
            raise m.NoMatch()
        raise m.Refused("no")
    r1 = m.apply_rule(g, "Mul", rewrite, "x")
    assert (r1.changed, r1.stats) == (False, {"refused": 1})
    assert m.apply_rule(g, "Relu", rewrite, "x").stats == {}
    r2 = m.apply_rule(g, "Mul", lambda node: None, "scalings")
    assert (r2.changed, r2.stats) == (True, {"scalings": 1})


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            yield node.module or "", [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            yield from ((a.name, []) for a in node.names)


def test_passes_import_no_private_names_and_no_backend():
    for path in sorted((ROOT / "passes").glob("*.py")):
        for module, names in _imports(path):
            private = [n for n in names if n.startswith("_")]
            assert not private, f"{path.name} imports {private} from {module}"
            assert not module.startswith("kiln.targets"), f"{path.name} imports {module}: ask kiln.targets.fusions"


def _quantized_linear(fmt):
    g = Graph("linear")
    x = g.add_input("x", "float32", ("batch", "seq", 256))
    w = g.add_weight("w", Weight.from_array(np.random.default_rng(0).standard_normal((8, 256)).astype(np.float32),
                                            fmt, name="w"))
    g.outputs = [g.add_node("MatMul", [x, g.add_node("Transpose", [w], {"perm": [1, 0]})[0]], name="proj")[0]]
    return g


@pytest.mark.parametrize("backend", ["onnxrt", "tvm"])
def test_quant_matmul_fuses_what_the_target_takes(backend):
    """Q3_K has TVM kernels and no ONNX Runtime repack: each backend's pipeline fuses what its
    own target says, not ONNX Runtime's table for both."""
    from kiln.driver import pipeline
    from kiln.targets.onnxrt.quant import REPACK
    from kiln.targets.tvm.quant_layout import SUPPORTED
    can = fusions.of(backend)
    assert can.quant_matmul == {"onnxrt": frozenset(REPACK), "tvm": SUPPORTED}[backend]
    assert (can.attention_head_multiple, can.moe) == {"onnxrt": (8, False), "tvm": (1, True)}[backend]
    run = dict(pipeline(backend))["quant_matmul"]
    stats = run(_quantized_linear("q3_k")).stats
    assert stats == ({"quant_matmul_q3_k": 1} if backend == "tvm" else {"kept_float": 1})
    assert ("moe" in dict(pipeline(backend))) == (not can.moe)
    with pytest.raises(ValueError, match="unknown backend"):
        fusions.of("cuda")
