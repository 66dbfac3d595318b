"""LoRA adapters merged by kiln match transformers + peft's merged models.

The fixtures (tests/data/lora/, made by scripts/make_lora_fixtures.py) are PEFT adapters on the
tiny fixture models with random A and B, and what peft's ``merge_and_unload`` model computes.
Each case is checked in the interpreter, compiled on both backends, and after the adapter went
through llama.cpp's LoRA GGUF format onto a GGUF base (q/k rows permuted both ways).
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import HF_FIXTURES, REPO, greedy_decode, llama_cpp_python, needs_llama_cpp

from kiln.driver import compile as kiln_compile
from kiln.driver import convert
from kiln.errors import KilnError
from kiln.frontends import hf
from kiln.frontends.lora import apply_adapters
from kiln.interp import run

LORA = REPO / "tests" / "data" / "lora"
ADAPTERS = LORA / "adapters"
CASES = {"llama": ("llama", ["llama_a"]), "llama_two": ("llama", ["llama_a", "llama_b"]),
         "phi3": ("phi3", ["phi3_a"]), "gpt2": ("gpt2", ["gpt2_a"])}
# max |kiln - peft merged| measured over the logits: interpreter ~2e-7, compiled ~3e-7; as
# tests/test_hf_families.py, 10x the worst
BOUND = 3e-6


def _case(case):
    base, names = CASES[case]
    ref = LORA / case / "reference.npz"
    if not ref.is_file():
        pytest.fail(f"fixture {ref} is missing (scripts/make_lora_fixtures.py)", pytrace=False)
    return HF_FIXTURES / base, [(ADAPTERS / n, 1.0) for n in names], np.load(ref)


def _logits(graph, ids):
    return run(graph, {"input_ids": ids})[graph.outputs[0].name]


@pytest.mark.parametrize("case", sorted(CASES))
def test_merged_graph_matches_peft(case):
    base, specs, ref = _case(case)
    model = apply_adapters(hf.read(base), specs)
    np.testing.assert_allclose(_logits(model.graph, ref["input_ids"]), ref["logits"], rtol=0, atol=BOUND)
    # the adapters change the model: the base's own reference is far from these logits
    base_ref = np.load(base / "reference.npz")
    assert np.abs(base_ref["logits"] - ref["logits"]).max() > 1e-2


@pytest.mark.parametrize("backend", ["onnxrt", "tvm"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_compiled_with_adapters_matches_peft(case, backend, tmp_path):
    from kiln import runtime
    base, specs, ref = _case(case)
    out = kiln_compile(base, output=tmp_path / "m.kiln", backend=backend, lora=specs)
    model = runtime.load(out)
    np.testing.assert_allclose(model.logits(ref["input_ids"]), ref["logits"], rtol=0, atol=BOUND)
    tokens, logits = greedy_decode(model.session, ref["prompt"], 16)
    assert tokens == ref["greedy"].tolist()
    np.testing.assert_allclose(logits, ref["greedy_logits"], rtol=0, atol=BOUND)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [Path(x["path"]).name for x in manifest["source"]["lora"]] == [p.name for p, _ in specs]


@pytest.mark.parametrize("case", ["llama_two", "phi3", "gpt2"])
def test_lora_gguf_round_trip(case, tmp_path):
    """PEFT -> llama.cpp's LoRA GGUF (kiln convert --base) -> merged onto the base's GGUF."""
    from kiln.frontends import gguf
    base, specs, ref = _case(case)
    base_gguf = tmp_path / "base.gguf"
    convert(base, base_gguf, to="gguf")
    ggufs = []
    for i, (adapter, scale) in enumerate(specs):
        dst = tmp_path / f"lora{i}.gguf"
        convert(adapter, dst, to="gguf", base=base)
        ggufs.append((dst, scale))
    model = apply_adapters(gguf.read(base_gguf), ggufs)
    np.testing.assert_allclose(_logits(model.graph, ref["input_ids"]), ref["logits"], rtol=0, atol=BOUND)


def test_lora_gguf_layout_is_llama_cpps(tmp_path):
    """Names, shapes and keys as llama.cpp's loader checks them: <tensor>.lora_a [r, in] and
    .lora_b [out, r] under the base's GGUF names; general.type adapter, adapter.lora.alpha."""
    from kiln.frontends.gguf_file import read_gguf
    dst = tmp_path / "a.gguf"
    convert(ADAPTERS / "llama_a", dst, to="gguf", base=HF_FIXTURES / "llama")
    f = read_gguf(dst)
    assert f.metadata["general.type"] == "adapter" and f.metadata["adapter.type"] == "lora"
    assert f.metadata["general.architecture"] == "llama" and f.metadata["adapter.lora.alpha"] == 12.0
    assert f.tensors["blk.0.attn_q.weight.lora_a"].shape == (4, 64)
    assert f.tensors["blk.0.attn_q.weight.lora_b"].shape == (64, 4)
    assert f.tensors["blk.1.ffn_down.weight.lora_a"].shape[0] == 4
    assert len(f.tensors) == 2 * 6 * 2


def test_scale_zero_is_the_base_and_scale_two_is_twice(tmp_path):
    base, specs, ref = _case("llama")
    base_ref = np.load(base / "reference.npz")
    zero = apply_adapters(hf.read(base), [(specs[0][0], 0.0)])
    np.testing.assert_allclose(_logits(zero.graph, base_ref["input_ids"]), base_ref["logits"], rtol=0, atol=BOUND)
    twice = apply_adapters(hf.read(base), [(specs[0][0], 1.0), (specs[0][0], 1.0)])
    double = apply_adapters(hf.read(base), [(specs[0][0], 2.0)])
    np.testing.assert_allclose(_logits(double.graph, ref["input_ids"]), _logits(twice.graph, ref["input_ids"]),
                               rtol=0, atol=1e-5)


def _adapter_copy(tmp_path, **changes):
    dst = tmp_path / "adapter"
    shutil.copytree(ADAPTERS / "llama_a", dst)
    conf = json.loads((dst / "adapter_config.json").read_text())
    conf.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(conf))
    return dst


@pytest.mark.parametrize("changes, message", [
    ({"use_dora": True}, "DoRA adapters are not supported yet"),
    ({"bias": "all"}, "trains the base's biases"),
    ({"modules_to_save": ["lm_head"]}, "replaces whole modules"),
    ({"peft_type": "IA3"}, "kiln reads LoRA adapters only"),
    ({"r": 0}, "must be positive"),
])
def test_adapters_kiln_cannot_merge_exactly_are_refused(tmp_path, changes, message):
    adapter = _adapter_copy(tmp_path, **changes)
    with pytest.raises(KilnError, match=message):
        apply_adapters(hf.read(HF_FIXTURES / "llama"), [(adapter, 1.0)])


def test_adapter_for_another_model_is_refused():
    # gpt2's adapter names modules a llama model does not have
    with pytest.raises(KilnError, match="is not a matrix of a llama model"):
        apply_adapters(hf.read(HF_FIXTURES / "llama"), [(ADAPTERS / "gpt2_a", 1.0)])
    # llama's adapter onto mistral (same names, same shapes here) is a user's choice; onto phi3 not
    with pytest.raises(KilnError, match="is not a matrix of a phi3 model"):
        apply_adapters(hf.read(HF_FIXTURES / "phi3"), [(ADAPTERS / "llama_a", 1.0)])


def test_cli_compile_with_lora_and_its_errors(tmp_path):
    kiln = [sys.executable, "-m", "kiln.cli"]
    out = tmp_path / "m.kiln"
    ok = subprocess.run(kiln + ["compile", str(HF_FIXTURES / "llama"), "--backend", "onnxrt", "-o", str(out),
                                "--lora", str(ADAPTERS / "llama_a"), "--lora", str(ADAPTERS / "llama_b"),
                                "--lora-scale", "1", "--lora-scale", "1", "-q"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    from kiln import runtime
    ref = np.load(LORA / "llama_two" / "reference.npz")
    np.testing.assert_allclose(runtime.load(out).logits(ref["input_ids"]), ref["logits"], rtol=0, atol=BOUND)
    bad = subprocess.run(kiln + ["compile", str(HF_FIXTURES / "llama"), "-o", str(tmp_path / "x.kiln"),
                                 "--lora", str(ADAPTERS / "llama_a"), "--lora-scale", "1", "--lora-scale", "2",
                                 "--lora", str(ADAPTERS / "llama_b"), "--lora", str(ADAPTERS / "llama_b")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--lora-scale" in bad.stderr
    assert not (tmp_path / "x.kiln").exists()


@needs_llama_cpp
def test_llama_cpp_applies_kilns_lora_gguf(tmp_path):
    """llama.cpp loads kiln's LoRA GGUF beside kiln's base GGUF and gives peft's greedy tokens."""
    base, specs, ref = _case("llama")
    base_gguf, lora_gguf = tmp_path / "base.gguf", tmp_path / "lora.gguf"
    convert(base, base_gguf, to="gguf")
    convert(specs[0][0], lora_gguf, to="gguf", base=base)
    script = REPO / "tests" / "llama_cpp_greedy.py"
    ids = ref["prompt"][0].tolist()
    spec = json.dumps({"ids": ids, "n": 16, "lora": str(lora_gguf)})
    out = subprocess.run([llama_cpp_python(), str(script), str(base_gguf), spec],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["greedy"] == ref["greedy"].tolist()
