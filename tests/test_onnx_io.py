"""ONNX both ways: kiln's export in optimum's decoder layout and in the stored dtype, and the
ONNX frontend reading kiln's exports and optimum's own back into the IR.

References: the shared fixtures' reference.npz (transformers' logits and greedy tokens), and
for SmolLM2 the greedy tokens of the artifact compiled from its GGUF file. The optimum-made
exports in tests/data/onnx_optimum/ come from scripts/make_optimum_onnx_fixtures.py.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import ALL_FAMILIES, greedy_decode

from kiln import runtime
from kiln.driver import compile as kiln_compile
from kiln.interp import run

OPTIMUM = Path(__file__).parent / "data" / "onnx_optimum"
# max |kiln - transformers| over the fixtures' logits, as in test_hf_families: measured 1.2e-7
# to 3.0e-7 for every family, read back from kiln's export or from optimum's; bound 10x
BOUND = 3e-6


def kiln(*args):
    return subprocess.run([sys.executable, "-m", "kiln.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "KILN_DEBUG": ""})


def _optimum_greedy(path, ref, n=16):
    """n greedy tokens with a plain InferenceSession fed as optimum's callers feed it: the
    prompt, then one token a step, past_key_values growing from the previous present.N."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in sess.get_inputs()}
    names = [o.name for o in sess.get_outputs()]
    past = {name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
            for name, i in inputs.items() if name.startswith("past_key_values.")}
    ids, done, tokens, logits = ref["prompt"], 0, [], []
    for _ in range(n):
        new = ids.shape[1]
        outs = dict(zip(names, sess.run(None, {"input_ids": ids, "attention_mask": np.ones((1, done + new), np.int64),
                                                "position_ids": np.arange(done, done + new)[None], **past})))
        done += new
        assert outs["logits"].shape[1] == new          # every position's logits, as optimum's
        logits.append(outs["logits"][0, -1])
        tokens.append(int(np.argmax(logits[-1])))
        past = {k: outs["present." + k[len("past_key_values."):]] for k in past}
        ids = np.array([[tokens[-1]]])
    return tokens, np.stack(logits)


# measured max |error| over the 16 greedy steps' logits (magnitude ~0.75): f32 1.8e-7,
# f16 1.9e-4, bf16 1.9e-3 (weights rounded once, every product float32); bounds ~10x
@pytest.mark.parametrize("dtype,onnx_type,bound", [("f32", onnx.TensorProto.FLOAT, 2e-6),
                                                   ("f16", onnx.TensorProto.FLOAT16, 2e-3),
                                                   ("bf16", onnx.TensorProto.BFLOAT16, 2e-2)])
def test_export_in_optimum_layout_runs_in_plain_onnxruntime(hf_fixture, tmp_path, dtype, onnx_type, bound):
    src = hf_fixture("llama")
    out = tmp_path / "llama-onnx"
    r = kiln("convert", src, out, "--to", "onnx", "--dtype", dtype)
    assert r.returncode == 0, r.stderr
    onnx.checker.check_model(str(out / "model.onnx"))
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert [i.name for i in m.graph.input] == ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    assert [o.name for o in m.graph.output] == ["logits"] + [f"present.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    # every weight matrix in the asked type, once (7 a layer, embedding, LM head); norms stay float32
    matrices = [t for t in m.graph.initializer if t.name.startswith(("layers.", "embed", "lm_head")) and len(t.dims) == 2]
    assert len(matrices) == 16 and {t.data_type for t in matrices} == {onnx_type}
    assert {t.data_type for t in m.graph.initializer if t.name.endswith("norm")} == {onnx.TensorProto.FLOAT}
    io = json.loads((out / "kiln_io.json").read_text())
    assert io["layout"] == "optimum" and io["weights_dtype"] == dtype
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"     # as optimum writes
    ref = np.load(src / "reference.npz")
    tokens, logits = _optimum_greedy(out / "model.onnx", ref)
    assert tokens == ref["greedy"].tolist()
    np.testing.assert_allclose(logits, ref["greedy_logits"], rtol=0, atol=bound)


def test_an_onnx_export_takes_float_dtypes_only(hf_fixture, tmp_path):
    from kiln.driver import convert
    from kiln.errors import KilnError
    with pytest.raises(KilnError, match="an ONNX export holds f32, f16 or bf16 weights, not q8_0"):
        convert(hf_fixture("llama"), tmp_path / "out", to="onnx", dtype="q8_0")
    assert not (tmp_path / "out").exists()


def test_f16_export_is_half_the_size(hf_fixture, tmp_path):
    src = hf_fixture("gemma")        # tied embeddings: the table is stored once, not again transposed
    sizes = {}
    for dtype in ("f32", "f16"):
        assert kiln("convert", src, tmp_path / dtype, "--to", "onnx", "--dtype", dtype, "-q").returncode == 0
        sizes[dtype] = (tmp_path / dtype / "model.onnx.data").stat().st_size
        m = onnx.load(str(tmp_path / dtype / "model.onnx"), load_external_data=False)
        assert len([t for t in m.graph.initializer if list(t.dims) == [256, 64]]) == 1
    assert sizes["f16"] < 0.55 * sizes["f32"]


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_kiln_compiles_its_own_export(hf_fixture, tmp_path, family):
    """`kiln convert X --to onnx` then `kiln compile` of that folder: transformers' numbers."""
    src = hf_fixture(family)
    out = tmp_path / f"{family}-onnx"
    assert kiln("convert", src, out, "--to", "onnx", "-q").returncode == 0
    _compiles_and_matches(out, np.load(src / "reference.npz"), tmp_path)


def test_kiln_reads_its_kiln_layout_export_and_a_bare_onnx_file(hf_fixture, tmp_path):
    src = hf_fixture("phi3")        # fused q/k/v in the checkpoint, split in kiln's IR
    out = tmp_path / "phi3-onnx"
    assert kiln("convert", src, out, "--to", "onnx", "--onnx-layout", "kiln", "-q").returncode == 0
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert "logits_positions" in [i.name for i in m.graph.input]
    _compiles_and_matches(out / "model.onnx", np.load(src / "reference.npz"), tmp_path)


@pytest.mark.parametrize("name", ["llama", "llama-no-past", "gemma", "gpt2", "phi3", "llama-torch-dynamo"])
def test_optimum_export_compiles_and_matches_transformers(hf_fixture, tmp_path, name):
    family = json.loads((OPTIMUM / "index.json").read_text())["exports"][name]["family"]
    _compiles_and_matches(OPTIMUM / name, np.load(hf_fixture(family) / "reference.npz"), tmp_path)


def test_convert_reads_an_optimum_export(hf_fixture, tmp_path):
    """ONNX -> an HF folder and a GGUF file, each read back to transformers' logits."""
    from kiln.frontends.detect import read_model
    ref = np.load(hf_fixture("gpt2") / "reference.npz")
    for to, dest in (("hf", tmp_path / "gpt2-hf"), ("gguf", tmp_path / "gpt2.gguf")):
        r = kiln("convert", OPTIMUM / "gpt2", dest, "--to", to, "-q")
        assert r.returncode == 0, r.stderr
        model = read_model(dest)
        logits = run(model.graph, {"input_ids": ref["input_ids"]})[model.graph.outputs[0].name]
        np.testing.assert_allclose(logits, ref["logits"], rtol=0, atol=BOUND)


def test_a_hub_repositorys_onnx_subfolder_reads_config_and_tokenizer_above_it(hf_fixture, tmp_path):
    """Hub repositories hold onnx/model.onnx with config.json and the tokenizer at the top."""
    import shutil
    repo = tmp_path / "repo"
    (repo / "onnx").mkdir(parents=True)
    shutil.copy(OPTIMUM / "llama" / "model.onnx", repo / "onnx" / "model.onnx")
    shutil.copy(OPTIMUM / "llama" / "config.json", repo / "config.json")
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({"hello": 5, "world": 7, "[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(repo / "tokenizer.json"))
    from kiln.frontends.detect import read_model
    assert read_model(repo / "onnx").tokenizer.tokenizer.encode("hello world").ids == [5, 7]
    _compiles_and_matches(repo / "onnx", np.load(hf_fixture("llama") / "reference.npz"), tmp_path)


def test_optimum_export_compiles_with_tvm_too(hf_fixture, tmp_path):
    _compiles_and_matches(OPTIMUM / "llama", np.load(hf_fixture("llama") / "reference.npz"), tmp_path, backend="tvm")


def _compiles_and_matches(path, ref, tmp_path, backend="onnxrt"):
    from kiln.frontends.detect import read_model
    model = read_model(path)
    assert model.source["format"] == "onnx"
    logits = run(model.graph, {"input_ids": ref["input_ids"]})[model.graph.outputs[0].name]
    np.testing.assert_allclose(logits, ref["logits"], rtol=0, atol=BOUND)
    art = tmp_path / "from-onnx.kiln"
    r = kiln("compile", path, "-o", art, "--backend", backend, "-q")
    assert r.returncode == 0, r.stderr
    session = runtime.load(art).session
    tokens, logits = greedy_decode(session, ref["prompt"], 16)
    assert tokens == ref["greedy"].tolist()
    np.testing.assert_allclose(logits, ref["greedy_logits"], rtol=0, atol=BOUND)


def test_inspect_describes_onnx_models(hf_fixture, tmp_path):
    r = kiln("inspect", OPTIMUM / "llama")
    assert r.returncode == 0, r.stderr
    assert "ONNX model (optimum layout, with past KV), architecture llama" in r.stdout
    assert "past_key_values.1.value" in r.stdout and "21 tensors" in r.stdout
    r = kiln("inspect", OPTIMUM / "llama-no-past" / "model.onnx", "--json")
    info = json.loads(r.stdout)
    assert info["format"] == "onnx" and info["layout"] == "optimum layout, without past KV"
    assert info["inputs"] == ["input_ids", "attention_mask", "position_ids"]
    out = tmp_path / "gpt2-onnx"
    assert kiln("convert", hf_fixture("gpt2"), out, "--to", "onnx", "--onnx-layout", "kiln", "-q").returncode == 0
    assert "ONNX model (kiln's export, kiln layout), architecture gpt2" in kiln("inspect", out).stdout


def _one_line_error(r, *words):
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_a_graph_kiln_cannot_map_is_one_line_naming_it(tmp_path):
    m = onnx.load(str(OPTIMUM / "llama" / "model.onnx"))
    for n in m.graph.node:
        if n.name == "/model/layers.0/self_attn/q_proj/MatMul":
            n.name = "/model/layers.0/self_attn/custom_proj/MatMul"     # a module llama does not have
    bad = tmp_path / "bad"
    bad.mkdir()
    onnx.save(m, str(bad / "model.onnx"))
    (bad / "config.json").write_bytes((OPTIMUM / "llama" / "config.json").read_bytes())
    _one_line_error(kiln("compile", bad, "-o", tmp_path / "x.kiln"),
                    "cannot map 1 weight(s) onto llama's tensors", "read by MatMul /model/layers.0/self_attn/custom_proj/MatMul")
    assert not (tmp_path / "x.kiln").exists()
    art = tmp_path / "llama.kiln"          # an artifact holds a model.onnx too: not a source
    assert kiln("compile", OPTIMUM / "llama", "-o", art, "--backend", "onnxrt", "-q").returncode == 0
    _one_line_error(kiln("compile", art, "-o", tmp_path / "y.kiln"), "this is a compiled kiln artifact")
    (bad / "config.json").unlink()
    _one_line_error(kiln("inspect", bad), "no config.json beside it")
    m.graph.output[0].name = "scores"
    onnx.save(m, str(bad / "model.onnx"))
    _one_line_error(kiln("inspect", bad / "model.onnx"), "no logits output")


@pytest.fixture(scope="module")
def smollm2_f16_onnx(smollm2_gguf, tmp_path_factory):
    """SmolLM2 exported once as f16 ONNX (269 MB; f32 would be 538 MB)."""
    out = tmp_path_factory.mktemp("smol-onnx") / "smollm2-onnx"
    r = kiln("convert", "smollm2", out, "--to", "onnx", "--dtype", "f16", "-q")
    assert r.returncode == 0, r.stderr
    return out


def test_smollm2_through_onnx_reproduces_the_gguf_artifacts_tokens(smollm2_gguf, smollm2_f16_onnx, tmp_path):
    """GGUF -> `--to onnx --dtype f16` -> `kiln compile` of that folder: the same 32 greedy
    tokens as the artifact compiled from the GGUF file (measured: all 32 equal, max |logit
    difference| 0.033 for f16 weights, 1.6e-4 for f32)."""
    art = tmp_path / "from-onnx.kiln"
    r = kiln("compile", smollm2_f16_onnx, "-o", art, "--backend", "onnxrt", "-q")
    assert r.returncode == 0, r.stderr
    gguf_art = kiln_compile(smollm2_gguf, target="cpu", output=tmp_path / "from-gguf.kiln", backend="onnxrt")
    a, b = runtime.load(gguf_art), runtime.load(art)
    prompt = np.array([a.tokenizer.encode("The capital of France is")])
    assert b.tokenizer.encode("The capital of France is") == prompt[0].tolist()     # tokenizer carried over
    want, _ = greedy_decode(a.session, prompt, 32)
    got, _ = greedy_decode(b.session, prompt, 32)
    assert got == want
