"""Token ids in, token ids out, on artifacts without a tokenizer (the fixture families) and
with one (SmolLM2): generate, stream, chat with rendered ids, perplexity and `kiln run --ids`."""
import subprocess
import sys

import numpy as np
import pytest

from conftest import ALL_FAMILIES

# Families whose greedy reference has no EOS in it, so 16 new tokens are all generated.
FAMILIES = ALL_FAMILIES


@pytest.fixture(scope="module")
def artifacts(compiled_family):
    return {f: compiled_family(f) for f in FAMILIES}


def _load(artifacts, family):
    from kiln import runtime
    return runtime.load(artifacts[family])


def _reference(family):
    from conftest import HF_FIXTURES
    return np.load(HF_FIXTURES / family / "reference.npz")


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_from_ids_without_a_tokenizer(artifacts, family):
    model = _load(artifacts, family)
    assert model.tokenizer is None
    ref = _reference(family)
    prompt = ref["prompt"][0].tolist()
    result = model.generate(prompt, max_new_tokens=16)
    assert result.ids == ref["greedy"].tolist()
    assert result.text == "" and result.finish_reason == "length" and result.prompt_tokens == 6
    # numpy ids and a batch of id lists work the same way
    batch = model.generate([np.asarray(prompt), prompt[1:]], max_new_tokens=4)
    assert batch[0].ids == ref["greedy"].tolist()[:4] and len(batch[1].ids) == 4


@pytest.mark.parametrize("family", FAMILIES)
def test_stream_and_rendered_chat_from_ids(artifacts, family):
    model = _load(artifacts, family)
    greedy = _reference(family)["greedy"].tolist()
    prompt = _reference(family)["prompt"][0].tolist()
    pieces = model.stream(prompt, max_new_tokens=16)
    got = []
    while True:
        try:
            got.append(next(pieces))
        except StopIteration as stop:
            result = stop.value
            break
    assert got == [] and result.ids == greedy and result.text == ""
    assert model.chat(prompt, max_new_tokens=16).ids == greedy
    assert model.chat(np.asarray(prompt), max_new_tokens=5, stream=False).ids == greedy[:5]


@pytest.mark.parametrize("family", FAMILIES)
def test_perplexity_of_ids_equals_the_reference_logits(artifacts, family):
    model = _load(artifacts, family)
    ref = _reference(family)
    ids = ref["input_ids"][0]
    logits = ref["logits"][0, :-1].astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    expected = float(np.exp(-logp[np.arange(len(ids) - 1), ids[1:]].mean()))
    assert model.perplexity(ids.tolist()) == pytest.approx(expected, rel=1e-5)


def test_eos_ids_come_from_the_manifest_and_end_generation(artifacts):
    model = _load(artifacts, "llama")
    assert model.eos_ids == [2]                       # generation_config.json's eos_token_id
    greedy = _reference("llama")["greedy"].tolist()
    prompt = _reference("llama")["prompt"][0].tolist()
    # make the eighth greedy token (its first 154) an end-of-sequence id: generation stops before it
    assert greedy[7] == 154 and 154 not in greedy[:7]
    result = model.generate(prompt, max_new_tokens=16, eos_ids=[154])
    assert result.ids == greedy[:7] and result.finish_reason == "eos"


def test_text_and_stop_strings_need_a_tokenizer(artifacts):
    model = _load(artifacts, "qwen2")
    with pytest.raises(ValueError, match="no tokenizer, so it cannot encode a text prompt; pass token ids"):
        model.generate("hello", max_new_tokens=2)
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        model.generate([1, 2, 3], max_new_tokens=2, stop=["x"])
    with pytest.raises(ValueError, match="has no tokenizer, so text needs token ids"):
        model.perplexity("some text")
    with pytest.raises(ValueError, match="has no tokenizer"):
        model.chat([{"role": "user", "content": "hi"}])


def test_cli_run_ids_prints_the_new_ids(artifacts):
    greedy = _reference("mistral")["greedy"].tolist()
    prompt = ",".join(str(t) for t in _reference("mistral")["prompt"][0])
    out = subprocess.run([sys.executable, "-m", "kiln.cli", "run", str(artifacts["mistral"]), "--ids", prompt,
                          "-n", "16"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == ",".join(map(str, greedy)) + "\n"


@pytest.mark.parametrize("bad, message", [("1,x,3", "--ids: expected comma-separated token ids, got '1,x,3'"),
                                          (",", "--ids: no token ids given")])
def test_cli_run_bad_ids(artifacts, bad, message):
    out = subprocess.run([sys.executable, "-m", "kiln.cli", "run", str(artifacts["llama"]), "--ids", bad],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr == f"kiln: {message}\n"
