"""The TVM backend on the real model: SmolLM2's GGUF with its Q4_1 / Q8_0 blocks kept as they
are, on this CPU against reference.json, and built for CUDA and Metal (not run: no device)."""
import json

import numpy as np
import pytest
from conftest import FIXTURES, greedy_tokens

from kiln import runtime
from kiln.driver import compile as kiln_compile

FUSED_FAMILIES = ("attention", "kv_append", "rotary", "rms_norm", "skip_rms_norm")


SMOLLM2_REFERENCE = FIXTURES / "smollm2" / "reference.json"


@pytest.fixture(scope="module")
def smollm2_tvm(smollm2_artifact):
    # the default backend's artifact, shared with test_smollm2.py and others
    assert json.loads((smollm2_artifact / "manifest.json").read_text())["backend"]["name"] == "tvm"
    return smollm2_artifact


@pytest.mark.parametrize("index", [0, 1, 2])
def test_smollm2_reproduces_the_reference(smollm2_tvm, index):
    gen = json.loads(SMOLLM2_REFERENCE.read_text())["generations"][index]
    model = runtime.load(smollm2_tvm)
    s = model.session
    s.reset(1)
    logits = s.forward(np.array([gen["prompt_ids"]]), last_only=True)[0, -1]
    top = gen["last_logits_top10"]
    assert np.argsort(-logits)[:10].tolist() == top["ids"]
    # measured 1.2e-5, 1.7e-5, 4.2e-5 (the ONNX Runtime artifact: 8.7e-5, 2.7e-5, 5.1e-5)
    np.testing.assert_allclose(logits[top["ids"]], top["values"], rtol=0, atol=2.5e-4)
    assert greedy_tokens(s, gen["prompt_ids"], 32, banned=model.tokenizer.eos_ids) == gen["greedy_ids"]
    # streaming gives the same text as generating, through the chat and text paths alike
    text = model.generate(gen["prompt"], max_new_tokens=12).text
    assert "".join(model.stream(gen["prompt"], max_new_tokens=12)) == text


def test_smollm2_weights_stay_blocks(smollm2_tvm, smollm2_gguf):
    from safetensors import safe_open
    b = json.loads((smollm2_tvm / "manifest.json").read_text())["backend"]
    formats = b["weight_formats"]
    assert formats["embed"] == "q8_0"          # tied: the embedding and the LM head share it
    assert {f for name, f in formats.items() if name.endswith(".weight")} == {"q4_1"}
    weights = smollm2_tvm / b["weights"]
    # no float copy of a matrix: the file is about the GGUF's size (float32 would be 5x more)
    assert weights.stat().st_size < 1.1 * smollm2_gguf.stat().st_size
    with safe_open(str(weights), "np") as f:
        q = {n: f.get_slice(n) for n in f.keys() if n.startswith("layers.0.o.weight.")}
    # Q4_1 576x576: 4-bit codes in uint32 words, and a float16 scale and minimum per 32 values
    assert {n: (x.get_dtype(), int(np.prod(x.get_shape()))) for n, x in q.items()} == {
        "layers.0.o.weight.bits4": ("U32", 576 * 576 // 8),
        "layers.0.o.weight.d": ("F16", 576 * 576 // 32), "layers.0.o.weight.m": ("F16", 576 * 576 // 32)}


@pytest.mark.parametrize("target", ["cuda", "metal"])
def test_smollm2_gpu_build_has_quantized_kernels(smollm2_gguf, tmp_path, target):
    out = kiln_compile(smollm2_gguf, target=target, output=tmp_path / "s.kiln", backend="tvm")
    b = json.loads((out / "manifest.json").read_text())["backend"]
    kernels = b["kernels"]
    for family in FUSED_FAMILIES:
        assert any(family in k for k in kernels), family
    # the Q4_1 matmuls and the Q8_0 head and embedding read blocks in the kernel itself
    assert any("q4_1" in k for k in kernels) and any("q8_0" in k and "gather" in k for k in kernels)
    source = {"cuda": "device_code.cu", "metal": "device_code.metal"}[target]
    assert b["device_source"] == source and "cross_compiled_for" not in b
    code = (out / source).read_text()
    assert all(k in code for k in kernels)
    assert (out / b["weights"]).stat().st_size < 1.1 * smollm2_gguf.stat().st_size


def test_smollm2_fast_precision_agrees_as_long_as_llama_cpp(smollm2_gguf, smollm2_tvm, tmp_path):
    # --precision fast: decode products with int8 activations (AVX-512 VNNI here). Greedy
    # tokens equal to the float32 reference's for at least as long as llama.cpp's own output
    # (measured for llama-cpp-python 0.3.36 on this GGUF: 5, 13 and 0 tokens; kiln fast: 15, 13, 0)
    out = kiln_compile(smollm2_gguf, output=tmp_path / "fast.kiln", backend="tvm", precision="fast")
    assert json.loads((out / "manifest.json").read_text())["precision"] == "fast"
    model = runtime.load(out)
    llama_cpp = [5, 13, 0]
    for gen, floor in zip(json.loads(SMOLLM2_REFERENCE.read_text())["generations"], llama_cpp):
        toks = greedy_tokens(model.session, gen["prompt_ids"], 32, banned=model.tokenizer.eos_ids)
        agree = next((i for i, (a, b) in enumerate(zip(toks, gen["greedy_ids"])) if a != b), len(toks))
        assert agree >= floor
    # teacher-forced over the three prompts and answers (144 positions, prefill and decode
    # kernels both): llama.cpp 0.3.36's logits on this GGUF differ from the float32 ones by
    # 0.235 on average with 96.5% of argmaxes equal; kiln fast: 0.218 and 96.5% (0.469 and 95.8%
    # when a block's bias multiplied the float sum of x rather than the int8 x's sum)
    ids = sum((g["prompt_ids"] + g["greedy_ids"] for g in json.loads(SMOLLM2_REFERENCE.read_text())["generations"]), [])
    exact = runtime.load(smollm2_tvm).session
    exact.reset(1)
    want = exact.forward(np.array([ids]))[0]
    model.session.reset(1)
    prefill = model.session.forward(np.array([ids]))[0]
    model.session.reset(1)
    model.session.forward(np.array([ids[:8]]))
    decode = np.stack([model.session.step(np.array([t]), np.array([True]))[0] for t in ids[8:]])
    for got, ref in ((prefill, want), (decode, want[8:])):
        assert np.abs(got - ref).mean() < 0.3
        assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.95


def test_smollm2_runs_on_the_runtime_library_alone(smollm2_tvm):
    """kiln bench on the TVM artifact: TVM's Python compiler package is never imported, the
    weights are read once into their tensors, and the process's peak memory is the
    interpreter's, the weights' and little else (issue 7: within 1.2x llama.cpp's)."""
    import subprocess
    import sys
    weights_mb = (smollm2_tvm / "weights.safetensors").stat().st_size / 2**20
    probe = ("import resource, sys, numpy, tvm_ffi, tokenizers; "
             "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    base_mb = float(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                   check=True).stdout)
    bench = ("import json, sys; from kiln.cli import main; main(sys.argv[1:]); "
             "print(json.dumps({'tvm_imported': 'tvm' in sys.modules}))")
    out = subprocess.run([sys.executable, "-c", bench, "bench", str(smollm2_tvm), "--repeats", "1",
                          "--prefill-tokens", "130", "--decode-tokens", "16", "--json"],
                         capture_output=True, text=True, check=True).stdout.strip().splitlines()
    figures, tail = json.loads(out[-2]), json.loads(out[-1])
    assert not tail["tvm_imported"]
    # measured: base 46 MB, weights 94 MB, peak 178 MB (before: 281, with `import tvm` and
    # the weights passing through a second buffer)
    assert figures["peak_rss_mb"] < base_mb + weights_mb + 60, (figures["peak_rss_mb"], base_mb, weights_mb)
