"""GGUF files written by kiln load in llama.cpp, and llama.cpp's greedy tokens equal kiln's.

Runs when llama-cpp-python is importable here, or when KILN_LLAMA_CPP_PYTHON names a Python
that has it (a peer venv: llama-cpp-python is never a test dependency of kiln).
"""
import json
import subprocess
from pathlib import Path

import pytest
from conftest import llama_cpp_python, needs_llama_cpp
from conftest import greedy_tokens

from kiln.driver import compile as kiln_compile
from kiln.driver import convert

HERE = Path(__file__).parent


_llama_python = llama_cpp_python
pytestmark = needs_llama_cpp


def llama_cpp(gguf, ids, n=16, texts=(), vocab_only=False):
    spec = json.dumps({"ids": ids, "n": n, "texts": list(texts), "vocab_only": vocab_only})
    out = subprocess.run([_llama_python(), str(HERE / "llama_cpp_greedy.py"), str(gguf), spec],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def kiln_greedy(gguf, ids, tmp_path, n=16):
    from kiln import runtime
    return greedy_tokens(runtime.load(kiln_compile(gguf, output=tmp_path / "k.kiln")).session, ids, n)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma", "phi3", "gpt2"])
def test_fixture_gguf_agrees_with_llama_cpp(hf_fixture, family, tmp_path):
    gguf = tmp_path / f"{family}.gguf"
    convert(hf_fixture(family), gguf, to="gguf")
    ids = [1, 5, 9, 23, 4, 8]
    assert llama_cpp(gguf, ids)["greedy"] == kiln_greedy(gguf, ids, tmp_path)


@pytest.mark.parametrize("name", ["granite", "olmo2", "mixtral", "qwen3_moe", "olmoe", "qwen2_moe", "gpt_oss"])
def test_later_family_gguf_agrees_with_llama_cpp(name, tmp_path):
    """The families whose fixtures live in tests/data/hf_variants/ (names and keys as llama.cpp's
    converter writes them, granite's q/k rows interleaved for its rope). Not the gemma2/3
    fixtures: they use a query_pre_attn_scalar, a layer pattern and (gemma3) a local rope base
    that llama.cpp fixes to other values (kiln's convert says so in its notes). gpt_oss's yarn
    has transformers' truncate false, which llama.cpp rounds (a note too); the fixture's greedy
    tokens survive it."""
    gguf = tmp_path / f"{name}.gguf"
    convert(HERE / "data" / "hf_variants" / name, gguf, to="gguf")
    ids = [1, 5, 9, 23, 4, 8]
    assert llama_cpp(gguf, ids)["greedy"] == kiln_greedy(gguf, ids, tmp_path)


@pytest.mark.parametrize("name", ["qwen3_moe", "olmoe", "qwen2_moe", "gpt_oss"])
def test_quantized_experts_agree_with_llama_cpp(name, tmp_path):
    """Expert tensors quantized in 3-D blocks (Q8_0) as llama.cpp reads them. Not mixtral's
    fixture: its smallest greedy margin (0.012) is within what llama.cpp's int8 activations move
    these logits, and llama.cpp picks another token at step 3 (kiln's exact mode keeps float32)."""
    gguf = tmp_path / f"{name}.gguf"
    convert(HERE / "data" / "hf_variants" / name, gguf, to="gguf", quant="q8_0")
    ids = [1, 5, 9, 23, 4, 8]
    assert llama_cpp(gguf, ids)["greedy"] == kiln_greedy(gguf, ids, tmp_path)


def test_gpt_oss_mxfp4_experts_agree_with_llama_cpp(tmp_path):
    """gpt-oss with its experts in MXFP4 blocks, as llama.cpp's converter ships it: llama.cpp
    and kiln (which dequantizes them exactly) pick the same greedy tokens."""
    from test_moe_families import mxfp4_gguf
    gguf = mxfp4_gguf(tmp_path)
    ids = [1, 5, 9, 23, 4, 8]
    assert llama_cpp(gguf, ids)["greedy"] == kiln_greedy(gguf, ids, tmp_path)


def test_gpt_4o_pre_tokenizer_agrees_with_llama_cpp(tmp_path):
    """gpt-oss's pre-tokenizer (GGUF name gpt-4o): kiln and llama.cpp split and merge texts
    alike, on a vocabulary with a first merge ("a B") that only a pre-tokenizer keeping
    "aBc" whole would apply (o200k splits it before the capital)."""
    from test_tokenizer import _tiny_gpt2_meta

    from kiln.frontends import tokenizer as ft
    from kiln.frontends.gguf_file import write_gguf
    meta = _tiny_gpt2_meta("gpt-4o")
    meta["tokenizer.ggml.tokens"] = meta["tokenizer.ggml.tokens"] + ["aB"]
    meta["tokenizer.ggml.token_type"] = meta["tokenizer.ggml.token_type"] + [ft.TOKEN_NORMAL]
    meta["tokenizer.ggml.merges"] = ["a B"] + meta["tokenizer.ggml.merges"]
    write_gguf(tmp_path / "vocab.gguf", {**meta, "general.architecture": "gpt-oss"}, [])
    texts = ["aBc", "xaBc HelloWorld it's", "HELLOworld 12345 a/b\n\n  x", "hello world's 7"]
    seen = llama_cpp(tmp_path / "vocab.gguf", [], texts=texts, vocab_only=True)["tokens"]
    kiln = ft.from_gguf_metadata(meta).tokenizer
    assert seen == [kiln.encode(t, add_special_tokens=False).ids for t in texts]
    # the vocabulary tells the pre-tokenizers apart: llama3's keeps "aBc" whole and merges "aB"
    llama3 = ft.from_gguf_metadata({**meta, "tokenizer.ggml.pre": "llama-bpe"}).tokenizer
    assert llama3.encode("aBc", add_special_tokens=False).ids != kiln.encode("aBc", add_special_tokens=False).ids


@pytest.mark.parametrize("quant", [None, "q8_0"])
def test_smollm2_from_hf_agrees_with_llama_cpp(smollm2_gguf, tmp_path, quant):
    convert(smollm2_gguf, tmp_path / "hf", to="hf", dtype="bf16")
    gguf = tmp_path / "smollm2.gguf"
    convert(tmp_path / "hf", gguf, to="gguf", quant=quant)
    from conftest import FIXTURES
    reference = json.loads((FIXTURES / "smollm2" / "reference.json").read_text())
    cases = [c for c in reference["tokenizer"] if c["text"]]
    ids = [504, 3575, 282, 4649, 314]           # "The capital of France is"
    seen = llama_cpp(gguf, ids, texts=[c["text"] for c in cases])
    assert seen["greedy"] == kiln_greedy(gguf, ids, tmp_path)
    # the vocabulary kiln wrote tokenizes in llama.cpp as transformers does
    assert seen["tokens"] == [c["ids"] for c in cases]
