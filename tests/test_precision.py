"""Precision modes (kiln compile --precision exact|fast) and embeddings gathered from blocks, on
the ONNX Runtime backend (its MatMulNBits attributes); TVM's modes: tests/test_tvm_smollm2.py."""
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from conftest import FIXTURES, HF_FIXTURES
from kiln.driver import compile as kiln_compile


@pytest.fixture(scope="module")
def smollm2_pair(smollm2_gguf, tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    return (kiln_compile(smollm2_gguf, output=root / "exact.kiln", backend="onnxrt"),
            kiln_compile(smollm2_gguf, output=root / "fast.kiln", precision="fast", backend="onnxrt"))


def _nodes(artifact, op):
    return [n for n in onnx.load(artifact / "model.onnx", load_external_data=False).graph.node if n.op_type == op]


def _attr(node, name):
    return next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name)


def test_manifest_and_inspect_name_the_precision(smollm2_pair):
    for art, mode in zip(smollm2_pair, ("exact", "fast")):
        assert json.loads((art / "manifest.json").read_text())["precision"] == mode
        out = subprocess.run([sys.executable, "-m", "kiln.cli", "inspect", str(art)], capture_output=True, text=True)
        assert f"precision {mode}, KV cache shared" in out.stdout


def test_exact_runs_float32_products_and_fast_int8_activations(smollm2_pair):
    exact, fast = (_nodes(a, "MatMulNBits") for a in smollm2_pair)
    assert {_attr(n, "accuracy_level") for n in exact} == {0}
    assert {_attr(n, "accuracy_level") for n in fast} == {4}
    # the Q8_0 head: two exact 4-bit planes at full precision, one 8-bit product in fast mode;
    # the Q4_1 matrices' minimums: a min-term product in exact mode, 8-bit zero points in fast
    assert len(exact) == 122 and len(fast) == 121
    assert {_attr(n, "bits") for n in fast} == {8}
    assert len(_nodes(smollm2_pair[0], "MatMul")) == 120 and not _nodes(smollm2_pair[1], "MatMul")


def test_fast_mode_agrees_with_the_reference(smollm2_pair):
    from kiln import runtime
    from conftest import greedy_tokens
    ref = json.loads((FIXTURES / "smollm2" / "reference.json").read_text())
    exact, fast = (runtime.load(a) for a in smollm2_pair)
    eos = exact.tokenizer.eos_ids
    agree = []
    for g in ref["generations"]:
        assert greedy_tokens(exact.session, g["prompt_ids"], 32, banned=eos) == g["greedy_ids"]
        got = greedy_tokens(fast.session, g["prompt_ids"], 32, banned=eos)
        agree.append(next((i for i, (a, b) in enumerate(zip(got, g["greedy_ids"])) if a != b), 32))
    # Leading tokens that agree with transformers' float32 run (EOS banned, as it was made):
    # measured here (AVX-512) kiln fast [5, 32, 0], llama.cpp 0.3.36 on the same GGUF
    # [5, 13, 0] (its own int8 dot products). Fast mode must agree as long as llama.cpp overall.
    assert sum(agree) >= 18, agree


def test_fast_mode_perplexity_within_one_percent_of_exact(smollm2_pair):
    from kiln import runtime
    import pydoc_data.topics as topics
    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    exact, fast = (runtime.load(a) for a in smollm2_pair)
    ids = exact.tokenizer.encode(text)[:400]
    pe, pf = exact.perplexity(ids), fast.perplexity(ids)
    # measured on 1,000 tokens: 12.748 exact, 12.833 fast (+0.67%)
    assert abs(pf / pe - 1) < 0.01, (pe, pf)


def test_embedding_gathered_from_its_blocks(smollm2_pair, smollm2_gguf):
    # SmolLM2's tied Q8_0 table: gathered as codes and scales, never a float32 copy
    for art in smollm2_pair:
        [g] = _nodes(art, "GatherBlockQuantized")
        assert _attr(g, "bits") == 8 and g.input[1] == "input_ids"
        assert not _nodes(art, "Gather") or all(n.input[0] != "embed" for n in _nodes(art, "Gather"))
    assert (smollm2_pair[0] / "model.onnx.data").stat().st_size < 160e6     # was 237 MB with a float table


@pytest.mark.parametrize("quant", ["q8_0", "q4_0"])
def test_gathered_rows_equal_the_dequantized_table(tmp_path, quant):
    """gemma ties its head to the embedding; quantized at compile time, the table's rows are
    gathered from the blocks and the artifact equals the interpreter on the dequantized weights."""
    from kiln import runtime
    from kiln.driver import load_model
    from kiln.interp import run
    from kiln.passes.quantize import quantize
    from test_quantize import layout_of
    art = kiln_compile(HF_FIXTURES / "gemma", output=tmp_path / "g.kiln", quant=quant, backend="onnxrt")
    [g] = _nodes(art, "GatherBlockQuantized")
    assert _attr(g, "bits") == (8 if quant == "q8_0" else 4)
    ref = load_model(HF_FIXTURES / "gemma")
    quantize(ref.graph, quant, layout_of(ref))
    ids = np.load(HF_FIXTURES / "gemma" / "reference.npz")["input_ids"]
    want = next(iter(run(ref.graph, {"input_ids": ids}).values()))
    # float32 rounding only: the gathered rows are the dequantized rows exactly
    np.testing.assert_allclose(runtime.load(art).logits(ids), want, rtol=0, atol=2e-5)


def test_min_folded_into_zero_points_moves_each_weight_by_at_most_a_32nd_of_a_step():
    from kiln.targets.onnxrt import quant as Q
    rng = np.random.default_rng(5)
    n, nb = 64, 8
    codes = rng.integers(0, 16, (n, nb, 32)).astype(np.uint8)
    d = rng.uniform(0.001, 0.05, (n, nb)).astype(np.float32)
    m = (-d * rng.uniform(0, 15, (n, nb))).astype(np.float32)
    m[0, 0] = 3 * d[0, 0]              # a block lying above zero: a smaller multiplier
    m[1, 1] = 40 * d[1, 1]             # far above zero: smaller still
    d[2, 2] = 0                        # a constant block: exact
    op = Q.NBitsOperands(4, codes, d, 0, m)
    folded = Q.min_into_zero_points(op)
    assert folded.bits == 8 and folded.mins is None
    want = codes * d[..., None].astype(np.float64) + m[..., None]
    got = (folded.codes.astype(np.float64) - folded.zero_points[..., None]) * folded.scales[..., None]
    err = np.abs(got - want)
    assert err[2, 2].max() == 0
    step = np.where(d == 0, 1, d)[..., None]
    ratio = (err / step).max(axis=-1)
    assert ratio.max() <= 1 / 2 + 1e-6            # the 40-step block (multiplier 1)
    typical = np.ones((n, nb), bool)
    typical[0, 0] = typical[1, 1] = typical[2, 2] = False
    assert ratio[typical].max() <= 1 / 32 + 1e-6  # multiplier 16 wherever the minimum is <= 0
