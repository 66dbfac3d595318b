"""Conversion keeps every rope scaling and the attention window, for llama.cpp and for kiln.

For each scaling kiln reads from a Hugging Face config (linear, dynamic, yarn, llama3, longrope)
and for mistral's sliding window: HF -> GGUF -> compiled artifact gives the direct artifact's
logits, HF -> GGUF -> HF gives back the config's rope settings and the same logits, and the
GGUF holds what llama.cpp's converter writes (read with gguf-py's GGUFReader, an independent
reader): llama3's rope_freqs.weight equals the factors computed here from the llama3 formula.
Sequences are 24 tokens: past the window (4) and past phi3's original context (16), where
longrope switches to its long factors; phi3 is also checked at 12 tokens (short factors).
Then config.json values kiln refused to take on trust, and llama.cpp's greedy tokens where
llama-cpp-python is available.
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import greedy_tokens

from kiln.driver import compile as kiln_compile
from kiln.driver import convert, load_model
from kiln.errors import KilnError
from kiln.frontends import hf

DATA = Path(__file__).resolve().parent / "data" / "hf_variants"
CASES = ["llama_rope_linear", "llama_rope_dynamic", "llama_rope_llama3", "qwen2_yarn", "phi3_longrope",
         "mistral_sliding"]
IDS = np.random.default_rng(7).integers(0, 128, (2, 24))
TOL = 1e-5


def _ids(name):
    return [IDS, IDS[:1, :12]] if name == "phi3_longrope" else [IDS]


def _logits(path, out: Path, name: str):
    from kiln import runtime
    # ONNX Runtime named: the round trip is about the converters (backend-neutral) and compiles
    # three artifacts per case, kept fast; test_hf_variants.py runs these models on both backends
    model = runtime.load(kiln_compile(path, target="cpu", output=out, backend="onnxrt"))
    return model, [model.logits(ids) for ids in _ids(name)]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Per case: the direct artifact's logits, the GGUF file, and the HF folder written from it."""
    cache = {}

    def get(name):
        if name not in cache:
            tmp = tmp_path_factory.mktemp(name)
            model, direct = _logits(DATA / name, tmp / "direct.kiln", name)
            greedy = _greedy(model, name)
            summary = convert(DATA / name, tmp / "model.gguf", to="gguf")
            convert(tmp / "model.gguf", tmp / "hf", to="hf")
            cache[name] = {"tmp": tmp, "direct": direct, "greedy": greedy, "gguf": tmp / "model.gguf", "hf": tmp / "hf",
                           "summary": summary}
        return cache[name]
    return get


def _greedy(model, name):
    """16 greedy tokens through the KV cache after the fixture's prompt (22 positions in all)."""
    return greedy_tokens(model.session, np.load(DATA / name / "reference.npz")["prompt"], 16)


def _max_diff(a, b):
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


@pytest.mark.parametrize("name", CASES)
def test_gguf_compiles_to_the_direct_logits(converted, name):
    c = converted(name)
    model, via_gguf = _logits(c["gguf"], c["tmp"] / "gguf.kiln", name)
    diff = _max_diff(c["direct"], via_gguf)
    print(f"{name}: direct vs via GGUF max abs logit difference {diff:.3g}")
    assert diff <= TOL
    # and through the KV cache, token by token (test_hf_variants checks these against transformers)
    assert _greedy(model, name) == c["greedy"]


@pytest.mark.parametrize("name", CASES)
def test_gguf_to_hf_keeps_the_rope_config_and_logits(converted, name):
    c = converted(name)
    source = json.loads((DATA / name / "config.json").read_text())
    written = json.loads((c["hf"] / "config.json").read_text())
    theta, scaling = hf._rope_params(source)
    assert hf._rope_params(written) == (theta, scaling)
    assert written.get("sliding_window") == source.get("sliding_window")
    _, via_hf = _logits(c["hf"], c["tmp"] / "hf.kiln", name)
    diff = _max_diff(c["direct"], via_hf)
    print(f"{name}: direct vs via GGUF -> HF max abs logit difference {diff:.3g}")
    assert diff <= TOL


def _llama3_factors(theta, dim, factor, low, high, old_ctx):
    """llama3 scaling as a divisor per frequency, computed here one frequency at a time."""
    out = []
    for i in range(0, dim, 2):
        freq = float(np.float32(1.0) / np.float32(theta) ** np.float32(i / dim))
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _fields(path):
    import gguf
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


def _rope_tensors(tensors):
    return sorted(n for n in tensors if n.startswith("rope_"))


def test_written_gguf_llama3_has_rope_freqs(converted):
    import gguf
    from gguf.constants import MODEL_TENSOR, TENSOR_NAMES, Keys
    fields, tensors = _fields(converted("llama_rope_llama3")["gguf"])
    name = TENSOR_NAMES[MODEL_TENSOR.ROPE_FREQS] + ".weight"
    assert _rope_tensors(tensors) == [name]
    t = tensors[name]
    assert t.tensor_type == gguf.GGMLQuantizationType.F32 and list(t.shape) == [8]
    expected = _llama3_factors(10000.0, 16, factor=8.0, low=1.0, high=4.0, old_ctx=16)
    np.testing.assert_allclose(np.asarray(t.data), expected, rtol=1e-6, atol=0)
    assert expected[0] not in (1.0, 8.0)       # the fixture exercises the smoothed band too
    # llama.cpp writes no scaling keys for llama3; kiln's record keeps the parameters
    assert Keys.Rope.SCALING_TYPE.format(arch="llama") not in fields
    assert json.loads(fields["kiln.rope.scaling"]) == hf._rope_params(
        json.loads((DATA / "llama_rope_llama3" / "config.json").read_text()))[1]


def test_written_gguf_linear(converted):
    from gguf.constants import Keys
    fields, tensors = _fields(converted("llama_rope_linear")["gguf"])
    assert fields[Keys.Rope.SCALING_TYPE.format(arch="llama")] == "linear"
    assert fields[Keys.Rope.SCALING_FACTOR.format(arch="llama")] == 2.0
    assert _rope_tensors(tensors) == []


def test_written_gguf_yarn(converted):
    from gguf.constants import Keys
    fields, tensors = _fields(converted("qwen2_yarn")["gguf"])
    assert fields[Keys.Rope.SCALING_TYPE.format(arch="qwen2")] == "yarn"
    assert fields[Keys.Rope.SCALING_FACTOR.format(arch="qwen2")] == 4.0
    assert fields[Keys.Rope.SCALING_ORIG_CTX_LEN.format(arch="qwen2")] == 16
    # the config sets no beta or attention factor, so llama.cpp's defaults (transformers' too) hold
    assert not [k for k in fields if "yarn_" in k]
    assert _rope_tensors(tensors) == []


def test_written_gguf_longrope(converted):
    from gguf.constants import MODEL_TENSOR, TENSOR_NAMES, Keys
    fields, tensors = _fields(converted("phi3_longrope")["gguf"])
    params = json.loads((DATA / "phi3_longrope" / "config.json").read_text())["rope_parameters"]
    long_name = TENSOR_NAMES[MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight"
    short_name = TENSOR_NAMES[MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight"
    assert _rope_tensors(tensors) == sorted([long_name, short_name])
    assert np.asarray(tensors[long_name].data).tolist() == params["long_factor"]
    assert np.asarray(tensors[short_name].data).tolist() == params["short_factor"]
    assert fields[Keys.Rope.SCALING_ORIG_CTX_LEN.format(arch="phi3")] == 16
    # transformers' longrope attention factor: sqrt(1 + ln(64/16) / ln 16)
    assert math.isclose(fields[Keys.Rope.SCALING_ATTN_FACTOR.format(arch="phi3")],
                        math.sqrt(1 + math.log(4) / math.log(16)), rel_tol=1e-6)
    assert Keys.Rope.SCALING_TYPE.format(arch="phi3") not in fields    # llama.cpp's phi3 writes none


def test_written_gguf_dynamic_and_window_notes(converted):
    from gguf.constants import Keys
    c = converted("llama_rope_dynamic")
    fields, tensors = _fields(c["gguf"])
    assert Keys.Rope.SCALING_TYPE.format(arch="llama") not in fields
    assert json.loads(fields["kiln.rope.scaling"]) == {"rope_type": "dynamic", "factor": 2.0}
    assert any("dynamic" in n and "llama.cpp" in n for n in c["summary"]["notes"])

    c = converted("mistral_sliding")
    fields, _ = _fields(c["gguf"])
    assert fields[Keys.Attention.SLIDING_WINDOW.format(arch="llama")] == 4
    assert "kiln.rope.scaling" not in fields
    assert any("sliding_window" in n and "ignores" in n for n in c["summary"]["notes"])
    assert json.loads((c["hf"] / "config.json").read_text())["model_type"] == "mistral"

    assert converted("llama_rope_linear")["summary"]["notes"] == []


def test_window_survives_gguf_to_bare_safetensors(converted, tmp_path):
    from kiln.frontends.safetensors_file import read_safetensors
    convert(converted("mistral_sliding")["gguf"], tmp_path / "m.safetensors", to="safetensors")
    config = json.loads(read_safetensors(tmp_path / "m.safetensors").metadata["kiln.hf_config"])
    assert config["model_type"] == "mistral" and config["sliding_window"] == 4
    assert load_model(tmp_path / "m.safetensors").config["sliding_window"] == 4


def test_convert_command_prints_the_notes(tmp_path):
    out = subprocess.run([sys.executable, "-m", "kiln.cli", "convert", str(DATA / "mistral_sliding"),
                          str(tmp_path / "m.gguf"), "--to", "gguf", "--quiet"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    notes = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and "sliding_window (4)" in notes[0], out.stderr


def test_gguf_to_gguf_keeps_rope_tensors_and_record(converted, tmp_path):
    for name in ("llama_rope_llama3", "phi3_longrope", "llama_rope_dynamic"):
        src = converted(name)["gguf"]
        convert(src, tmp_path / f"{name}.gguf", to="gguf")
        a_fields, a_tensors = _fields(src)
        b_fields, b_tensors = _fields(tmp_path / f"{name}.gguf")
        assert _rope_tensors(a_tensors) == _rope_tensors(b_tensors)
        for t in _rope_tensors(a_tensors):
            assert np.array_equal(a_tensors[t].data, b_tensors[t].data)
        assert b_fields["kiln.rope.scaling"] == a_fields["kiln.rope.scaling"]


# ---- files without kiln's record: what llama.cpp's own converter writes ----------------------

def _without_kiln_record(src, dst):
    from kiln.frontends.gguf_file import read_gguf, write_gguf
    f = read_gguf(src)
    meta = {k: v for k, v in f.metadata.items() if not k.startswith("kiln.")}
    write_gguf(dst, meta, f.tensors.items(), metadata_types={k: f.metadata_types[k] for k in meta})


@pytest.mark.parametrize("name", ["llama_rope_linear", "llama_rope_llama3", "qwen2_yarn", "phi3_longrope"])
def test_llama_cpp_keys_alone_give_the_same_rotary(converted, name, tmp_path):
    c = converted(name)
    _without_kiln_record(c["gguf"], tmp_path / "bare.gguf")
    _, logits = _logits(tmp_path / "bare.gguf", tmp_path / "bare.kiln", name)
    diff = _max_diff(c["direct"], logits)
    print(f"{name}: direct vs GGUF without kiln.rope.scaling max abs logit difference {diff:.3g}")
    assert diff <= TOL


def test_rope_freqs_alone_reads_as_llama3_with_llama_cpp_defaults(tmp_path):
    """A Llama 3.1-shaped rotary (theta 500000, 128 dims, factor 8 over 8192): rope_freqs.weight
    on its own, as llama.cpp's converter writes it, reads back as transformers' llama3 config."""
    from kiln.frontends import gguf_rope
    from kiln.frontends.arch import ArchConfig, same_rotary
    from kiln.weights import Weight
    base = ArchConfig(family="llama", vocab_size=16, hidden_size=256, num_layers=1, num_heads=2,
                      num_kv_heads=2, head_dim=128, intermediate_size=8, rotary_dim=128,
                      rope_theta=500000.0, max_position_embeddings=131072)
    for factor in (8.0, 32.0):
        params = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}
        cfg = ArchConfig(**{**base.to_dict(), "rope_scaling": params})
        meta, extra, _ = gguf_rope.for_gguf(cfg, "llama")
        factors = extra["rope_freqs.weight"]
        np.testing.assert_allclose(factors, _llama3_factors(500000.0, 128, factor, 1.0, 4.0, 8192), rtol=1e-6)
        tensors = {"rope_freqs.weight": Weight.from_array(factors)}
        read = gguf_rope.from_gguf({}, tensors, base, "llama", tmp_path)
        assert read == params
        # unusual parameters are kept as the factors themselves, still the same rotary
        odd = ArchConfig(**{**base.to_dict(), "rope_scaling": {**params, "high_freq_factor": 3.0}})
        tensors = {"rope_freqs.weight": Weight.from_array(gguf_rope.for_gguf(odd, "llama")[1]["rope_freqs.weight"])}
        read = gguf_rope.from_gguf({}, tensors, base, "llama", tmp_path)
        assert read["rope_type"] == "freq_factors"
        assert same_rotary(odd, ArchConfig(**{**base.to_dict(), "rope_scaling": read}))


def test_edited_llama_cpp_keys_win_over_kiln_record(converted, tmp_path):
    """A tool that changes llama.cpp's factor leaves kiln's record behind: the file's llama.cpp
    keys are what llama.cpp runs, so kiln runs them too."""
    from kiln.frontends.gguf_file import read_gguf, typed, write_gguf
    f = read_gguf(converted("llama_rope_linear")["gguf"])
    meta = dict(f.metadata)
    meta["llama.rope.scaling.factor"] = typed(4.0, "float32")
    write_gguf(tmp_path / "edited.gguf", meta, f.tensors.items(),
               metadata_types={k: v for k, v in f.metadata_types.items() if k != "llama.rope.scaling.factor"})
    assert load_model(tmp_path / "edited.gguf").config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}


def test_freq_factors_that_fit_no_transformers_type_are_refused_for_hf(tmp_path):
    from kiln.frontends.gguf_file import read_gguf, write_gguf
    from kiln.weights import Weight
    src = tmp_path / "llama3.gguf"
    convert(DATA / "llama_rope_llama3", src, to="gguf")
    f = read_gguf(src)
    meta = {k: v for k, v in f.metadata.items() if not k.startswith("kiln.")}
    tensors = dict(f.tensors)
    tensors["rope_freqs.weight"] = Weight.from_array(np.linspace(1, 3, 8, dtype=np.float32))
    write_gguf(tmp_path / "odd.gguf", meta, tensors.items(), metadata_types={k: f.metadata_types[k] for k in meta})
    model = load_model(tmp_path / "odd.gguf")
    assert model.config["rope_scaling"]["rope_type"] == "freq_factors"
    with pytest.raises(KilnError, match="rope_freqs.weight"):
        convert(tmp_path / "odd.gguf", tmp_path / "hf", to="hf")
    assert not (tmp_path / "hf").exists()


# ---- config.json values refused ------------------------------------------------------------

def _variant(tmp_path, name, **changes):
    folder = tmp_path / name
    shutil.copytree(DATA / name, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("changes, words", [
    ({"hidden_size": 32.5}, "hidden_size is 32.5, not a whole number"),
    ({"hidden_size": 32.0}, "hidden_size is 32.0, not a whole number"),
    ({"num_attention_heads": 4.5}, "num_attention_heads is 4.5"),
    ({"intermediate_size": 63.9}, "intermediate_size is 63.9"),
    ({"num_hidden_layers": 2.5}, "num_hidden_layers is 2.5"),
    ({"num_key_value_heads": 1.5}, "num_key_value_heads is 1.5"),
    ({"head_dim": 8.5}, "head_dim is 8.5"),
    ({"eos_token_id": 128}, "eos_token_id 128 is outside the vocabulary (vocab_size 128)"),
    ({"eos_token_id": [2, 300]}, "eos_token_id 300 is outside the vocabulary"),
    ({"eos_token_id": 2.0}, "eos_token_id is 2.0, not a token id"),
    ({"bos_token_id": -1}, "bos_token_id -1 is outside the vocabulary"),
    ({"pad_token_id": 1000}, "pad_token_id 1000 is outside the vocabulary"),
    ({"bos_token_id": "1"}, "bos_token_id is \"1\", not a token id"),
])
def test_config_values_refused(tmp_path, changes, words):
    folder = _variant(tmp_path, "llama_rope_linear", **changes)
    with pytest.raises(KilnError) as e:
        hf.read(folder)
    assert str(folder / "config.json") in str(e.value) and words in str(e.value)
    out = subprocess.run([sys.executable, "-m", "kiln.cli", "convert", str(folder), str(tmp_path / "o.gguf"),
                          "--to", "gguf"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "config.json" in lines[0] and words in lines[0], out.stderr
    assert not (tmp_path / "o.gguf").exists()


def test_generation_config_token_ids_are_checked(tmp_path):
    folder = _variant(tmp_path, "llama_rope_linear")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 128]}))
    with pytest.raises(KilnError, match="generation_config.json: eos_token_id 128 is outside"):
        hf.read(folder)


# ---- llama.cpp itself ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["llama_rope_llama3", "llama_rope_linear", "qwen2_yarn", "llama_rope_dynamic"])
def test_llama_cpp_greedy_tokens_equal_kiln(converted, name, tmp_path):
    from test_llama_cpp import _llama_python, kiln_greedy, llama_cpp
    if _llama_python() is None:
        pytest.skip("llama-cpp-python is not installed (set KILN_LLAMA_CPP_PYTHON to a Python that has it)")
    gguf = converted(name)["gguf"]
    ids = [1, 5, 9, 23, 4, 8]
    assert llama_cpp(gguf, ids)["greedy"] == kiln_greedy(gguf, ids, tmp_path)


@pytest.mark.parametrize("change, words", [
    ({"kiln.rope.scaling": "[1, 2"}, "metadata key kiln.rope.scaling is not a JSON object"),
    ({"rope_freqs.weight": np.ones(4, np.float32)}, "tensor rope_freqs.weight has shape [4]; the rotary dimension 16 implies [8]"),
    ({"rope_freqs.weight": -np.ones(8, np.float32)}, "tensor rope_freqs.weight holds a factor that is not a positive number"),
    ({"llama.rope.scaling.attn_factor": 2.0}, "attn_factor is 2.0 without longrope factor tensors"),
    # rope_freqs with yarn keys: a combination llama.cpp would apply and kiln cannot state
    ({"llama.rope.scaling.type": "yarn"}, "rope_freqs.weight with llama.rope.scaling.type yarn is not supported"),
])
def test_lying_gguf_rope_is_refused(converted, tmp_path, change, words):
    from kiln.frontends.gguf_file import read_gguf, typed, write_gguf
    from kiln.weights import Weight
    f = read_gguf(converted("llama_rope_llama3")["gguf"])
    meta, tensors, types = dict(f.metadata), dict(f.tensors), dict(f.metadata_types)
    for k, v in change.items():
        if isinstance(v, np.ndarray):
            tensors[k] = Weight.from_array(v)
        else:
            meta[k] = typed(v, "float32") if isinstance(v, float) else v
            types.pop(k, None)
    write_gguf(tmp_path / "lie.gguf", meta, tensors.items(), metadata_types=types)
    with pytest.raises(KilnError) as e:
        load_model(tmp_path / "lie.gguf")
    assert words in str(e.value), str(e.value)
