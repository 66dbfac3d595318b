"""Every fixture family read from its Hugging Face folder matches transformers' own outputs.

The interpreter runs the full-sequence graph; the compiled artifact (the default backend, TVM,
and ONNX Runtime) runs the KV-cache graph, both for whole-sequence logits and for 16 greedy
tokens one at a time. Both also run the 22 positions of prompt + greedy[:-1] against
``greedy_logits``: the input_ids cover only 12 positions, and a position-dependent fault past
them (phi3 longrope switches tables at its 16-position original context) must show in the
logits, not only in a late greedy token.

Bounds (max |kiln - transformers| over all logits) are what these fixtures measured, with a
stated margin; a looser bound lets real faults through (a 1e-6-for-1e-5 epsilon in a norm
moves these logits by ~1e-4).
"""
import numpy as np
import pytest
from conftest import ALL_FAMILIES, greedy_decode

from kiln.frontends import hf
from kiln.interp import run
from kiln.verify import verify

# Max |error| measured per family (logits of magnitude 0.5-1.5): interpreter 1.2-2.4e-7,
# compiled artifact 1.2-3.0e-7 (worst phi3 over the greedy sequence). Bound 10x the worst.
INTERP_BOUND = 3e-6
COMPILED_BOUND = 3e-6


def _greedy_sequence(ref):
    """prompt + greedy[:-1] as one row, and where greedy_logits start in its logits."""
    ids = np.concatenate([ref["prompt"][0], ref["greedy"][:-1]])[None]
    return ids, ref["prompt"].shape[1] - 1


def test_every_family_has_a_fixture(hf_fixture):
    # qwen3 and the later families have their fixtures in tests/test_hf_variants.py
    assert sorted(hf.A.FAMILIES) == sorted(ALL_FAMILIES + ["qwen3", "granite", "olmo2", "gemma2", "gemma3",
                                                          "mixtral", "qwen3_moe", "olmoe", "qwen2_moe", "gpt_oss"])
    for family in ALL_FAMILIES:
        assert (hf_fixture(family) / "reference.npz").is_file()


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_interpreter_matches_transformers(hf_fixture, family):
    folder = hf_fixture(family)
    model = hf.read(folder)
    verify(model.graph)
    ref = np.load(folder / "reference.npz")
    logits = run(model.graph, {"input_ids": ref["input_ids"]})[model.graph.outputs[0].name]
    np.testing.assert_allclose(logits, ref["logits"], rtol=0, atol=INTERP_BOUND)
    ids, start = _greedy_sequence(ref)
    logits = run(model.graph, {"input_ids": ids})[model.graph.outputs[0].name]
    np.testing.assert_allclose(logits[0, start:], ref["greedy_logits"], rtol=0, atol=INTERP_BOUND)


@pytest.mark.parametrize("backend", [None, "onnxrt"], ids=["default", "onnxrt"])
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_compiled_artifact_matches_transformers(hf_fixture, compiled_family, family, backend):
    from kiln import runtime
    folder = hf_fixture(family)
    model = runtime.load(compiled_family(family, backend))         # compiled with verify=True
    assert backend is not None or model.manifest["backend"]["name"] == "tvm"
    ref = np.load(folder / "reference.npz")
    np.testing.assert_allclose(model.logits(ref["input_ids"]), ref["logits"], rtol=0, atol=COMPILED_BOUND)
    # 22 positions: prompt + every greedy token but the last, against the logits that chose them
    ids, start = _greedy_sequence(ref)
    np.testing.assert_allclose(model.logits(ids)[0, start:], ref["greedy_logits"], rtol=0, atol=COMPILED_BOUND)
    # greedy decoding through the KV cache, token by token: the tokens, and the logits of
    # every step (a full pass computes the same numbers for these families)
    tokens, logits = greedy_decode(model.session, ref["prompt"], 16)
    assert tokens == ref["greedy"].tolist()
    np.testing.assert_allclose(logits, ref["greedy_logits"], rtol=0, atol=COMPILED_BOUND)
