"""Round trips between formats keep lossless tensors bit for bit, and metadata and tokenizer."""
import json

import numpy as np
import pytest

from kiln.driver import convert, load_model
from kiln.frontends.gguf_file import read_gguf
from kiln.frontends.safetensors_file import read_safetensors
from kiln.interp import run

FAMILIES = ["llama", "mistral", "qwen2", "gemma", "phi3", "gpt2"]


def _hf_tensors(folder):
    import glob
    out = {}
    for f in sorted(glob.glob(f"{folder}/*.safetensors")):
        out.update({k: w.raw().tobytes() for k, w in read_safetensors(f).tensors.items()})
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_to_gguf_to_hf_is_bit_identical(hf_fixture, family, tmp_path):
    src = hf_fixture(family)
    convert(src, tmp_path / "m.gguf", to="gguf")
    convert(tmp_path / "m.gguf", tmp_path / "back", to="hf")
    before, after = _hf_tensors(src), _hf_tensors(tmp_path / "back")
    if family == "gemma":
        # llama.cpp stores gemma's norm scale as (1 + w); subtracting the 1 again is float maths:
        # 1 + w in [1, 2) rounds by at most half its ulp, 2**-24 (measured: exactly that, 5.96e-8)
        norms = [k for k in before if k.endswith("norm.weight")]
        assert norms
        for k in norms:
            np.testing.assert_allclose(np.frombuffer(after.pop(k), np.float32), np.frombuffer(before.pop(k), np.float32),
                                       rtol=0, atol=2.0 ** -24)
    assert after.keys() == before.keys()
    assert all(after[k] == before[k] for k in before), [k for k in before if after[k] != before[k]]
    cfg_in = json.loads((src / "config.json").read_text())
    cfg_out = json.loads((tmp_path / "back" / "config.json").read_text())
    assert cfg_out["model_type"] in (cfg_in["model_type"], "llama")     # llama.cpp writes mistral as llama
    for key in ("vocab_size", "tie_word_embeddings"):
        assert cfg_out[key] == cfg_in[key]


@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_written_by_kiln_matches_transformers(hf_fixture, family, tmp_path):
    src = hf_fixture(family)
    convert(src, tmp_path / "m.gguf", to="gguf")
    model = load_model(tmp_path / "m.gguf")
    ref = np.load(src / "reference.npz")
    logits = run(model.graph, {"input_ids": ref["input_ids"]})[model.graph.outputs[0].name]
    # measured 1.2-2.4e-7 over the six families (logits up to 1.5); bound ~10x
    np.testing.assert_allclose(logits, ref["logits"], rtol=0, atol=3e-6)


@pytest.mark.parametrize("dtype", ["f16", "bf16", "f32"])
def test_gguf_to_hf_to_gguf_is_bit_identical(hf_fixture, dtype, tmp_path):
    convert(hf_fixture("llama"), tmp_path / "a.gguf", to="gguf", dtype=dtype)
    convert(tmp_path / "a.gguf", tmp_path / "hf", to="hf")
    convert(tmp_path / "hf", tmp_path / "b.gguf", to="gguf")
    a, b = read_gguf(tmp_path / "a.gguf"), read_gguf(tmp_path / "b.gguf")
    assert list(a.tensors) == list(b.tensors)
    for name in a.tensors:
        assert a.tensors[name].format is b.tensors[name].format
        assert a.tensors[name].raw().tobytes() == b.tensors[name].raw().tobytes(), name
    assert a.metadata == b.metadata


def test_gguf_to_gguf_keeps_quantized_blocks(smollm2_gguf, tmp_path):
    convert(smollm2_gguf, tmp_path / "copy.gguf", to="gguf")
    a, b = read_gguf(smollm2_gguf), read_gguf(tmp_path / "copy.gguf")
    assert {n: t.format.name for n, t in a.tensors.items()} == {n: t.format.name for n, t in b.tensors.items()}
    for name in a.tensors:
        assert a.tensors[name].raw().tobytes() == b.tensors[name].raw().tobytes(), name
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                "tokenizer.chat_template", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "llama.rope.freq_base", "llama.attention.head_count_kv", "llama.context_length"):
        assert a.metadata[key] == b.metadata[key], key


def test_smollm2_through_hf_keeps_tokenizer_and_greedy_tokens(smollm2_gguf, tmp_path):
    from kiln import runtime
    from kiln.driver import compile as kiln_compile
    from conftest import FIXTURES
    reference = json.loads((FIXTURES / "smollm2" / "reference.json").read_text())
    convert(smollm2_gguf, tmp_path / "hf", to="hf")
    back = tmp_path / "back.gguf"
    convert(tmp_path / "hf", back, to="gguf")
    a, b = read_gguf(smollm2_gguf).metadata, read_gguf(back).metadata
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.chat_template"):
        assert a[key] == b[key], key
    # ONNX Runtime named: the test is about the conversion (backend-neutral), and TVM builds the
    # float32 SmolLM2 this makes in far longer than the GGUF's blocks
    model = runtime.load(kiln_compile(tmp_path / "hf", output=tmp_path / "hf.kiln", backend="onnxrt"))
    for case in reference["tokenizer"]:
        assert model.tokenizer.encode(case["text"]) == case["ids"]
    gen = reference["generations"][0]
    r = model.generate(gen["prompt"], max_new_tokens=16)
    assert r.ids == gen["greedy_ids"][:16]


def test_conversion_streams_big_tensors_in_row_chunks(hf_fixture, tmp_path):
    """A quantizing write reads the source rows piecewise, never the whole tensor at once."""
    from kiln.weights import Weight
    from kiln.frontends.safetensors_file import read_safetensors
    src = read_safetensors(hf_fixture("mistral") / "model.safetensors").tensors["model.embed_tokens.weight"]
    chunked = src.astype("q8_0")
    pieces = list(chunked.raw_chunks(max_bytes=4096))
    assert len(pieces) > 1
    assert np.concatenate(pieces).tobytes() == Weight.from_array(src.numpy(), "q8_0").raw().tobytes()
