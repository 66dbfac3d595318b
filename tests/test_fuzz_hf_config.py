"""Structure-aware fuzzing of the Hugging Face config reader (config.json, generation_config.json).

Each case is a Hugging Face folder of one of the test families and variants (llama, mistral,
qwen2, qwen3, gemma, phi3, gpt2; rope scalings, sliding windows, partial rotary), its weights
linked in unchanged, whose config.json and generation_config.json are edited knowing their keys:
sizes and counts made zero, negative, fractional, huge, infinite or of the wrong type; rope
parameters and scalings reshaped; token ids outside the vocabulary; model types swapped;
the JSON itself nested, retyped, cut or made invalid UTF-8. ``kiln.frontends.hf.read`` must
build the model (then a few weights are read) or fail with a one-line KilnError naming a file.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import strategies as st

import fuzzing
from conftest import HF_FIXTURES, REPO
from kiln.errors import KilnError
from kiln.frontends import hf

SOURCES = {name: HF_FIXTURES / name for name in ("llama", "mistral", "qwen2", "gemma", "phi3", "gpt2")}
SOURCES.update({name: REPO / "tests/data/hf_variants" / name
                for name in ("phi3_longrope", "qwen2_yarn", "llama_rope_llama3", "qwen3", "mistral_sliding",
                             "phi3_partial_rotary", "llama_rope_dynamic")})

KEYS = ["model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "intermediate_size", "max_position_embeddings", "rms_norm_eps",
        "rope_theta", "rope_parameters", "rope_scaling", "partial_rotary_factor", "sliding_window",
        "use_sliding_window", "tie_word_embeddings", "hidden_act", "hidden_activation", "attention_bias",
        "mlp_bias", "bos_token_id", "eos_token_id", "pad_token_id", "n_embd", "n_layer", "n_head", "n_inner",
        "n_positions", "layer_norm_epsilon", "activation_function"]
ROPE_KEYS = ["rope_type", "type", "factor", "rope_theta", "original_max_position_embeddings", "low_freq_factor",
             "high_freq_factor", "beta_fast", "beta_slow", "attention_factor", "short_factor", "long_factor",
             "mscale", "partial_rotary_factor"]
NUMBERS = [0, 1, 2, 3, 7, 8, 16, 63, 64, 65, 128, 255, 256, 257, 2**31, 2**63, 10**30, -1, -64, 0.5, 2.5, 64.0,
           1e-300, 1e300, fuzzing.Raw("1e400"), fuzzing.Raw("NaN"), fuzzing.Raw("-Infinity"), True, None, "64",
           [64], {"a": 1}]
NAMES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt2", "bert", "", "LLAMA", "llama ",
         "silu", "gelu", "gelu_pytorch_tanh", "relu", "linear", "yarn", "llama3", "longrope", "dynamic", "default",
         "su", "x" * 5000]


def _rope_edit(value, draw):
    rope = dict(value) if isinstance(value, dict) else {}
    key = draw(st.sampled_from(ROPE_KEYS))
    op = draw(st.sampled_from(["set", "set", "delete", "factors"]))
    if op == "delete":
        rope.pop(key, None)
    elif op == "factors":
        n = draw(st.sampled_from([0, 1, 3, 4, 8, 16, 1000]))
        rope[draw(st.sampled_from(["short_factor", "long_factor"]))] = \
            [draw(st.sampled_from([1.0, 0.0, -1.0, 1e30, 2.5])) for _ in range(min(n, 8))] * max(1, n // 8)
    else:
        rope[key] = draw(st.sampled_from(NUMBERS + NAMES[14:22]))
    return rope, f"{key} {op}"


def mutated_config(cfg: dict, draw) -> tuple[dict, str]:
    cfg = dict(cfg)
    notes = []
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 3]))):
        op = draw(st.sampled_from(["key", "key", "key", "rope", "json", "delete"]))
        key = draw(st.sampled_from(KEYS))
        if op == "key":
            cfg[key] = draw(st.sampled_from(NUMBERS + NAMES) | fuzzing.json_values(cfg.get(key)))
            notes.append(f"{key} = {str(cfg[key])[:40]}")
        elif op == "rope":
            where = draw(st.sampled_from(["rope_parameters", "rope_scaling"]))
            cfg[where], note = _rope_edit(cfg.get(where), draw)
            notes.append(f"{where}: {note}")
        elif op == "delete":
            cfg.pop(key, None)
            notes.append(f"delete {key}")
        else:
            cfg, note = fuzzing.mutate_json(cfg, draw, focus=[(k,) for k in KEYS[:12]])
            notes.append(note)
            if not isinstance(cfg, dict) or isinstance(cfg, fuzzing.Pairs):
                break
    return cfg, " | ".join(notes)


_BASES: dict[str, tuple[dict, dict]] = {}


def prepare(work: Path) -> None:
    if not _BASES:
        for name, src in SOURCES.items():
            _BASES[name] = (json.loads((src / "config.json").read_text()),
                            json.loads((src / "generation_config.json").read_text()))


def touch(model) -> int:
    for i, w in enumerate(model.weights.values()):
        if i < 4:
            w.raw()
            with np.errstate(all="ignore"):
                w.numpy()
    return len(model.graph.nodes)


@fuzzing.target(data=st.data())
def fuzz_config(ws, data):
    prepare(ws.root)
    name = data.draw(st.sampled_from(sorted(_BASES)), label="base")
    cfg, gen = _BASES[name]
    folder = ws.path(name)
    folder.mkdir()
    for f in SOURCES[name].iterdir():
        if f.name.endswith((".safetensors", ".bin")) or f.name.endswith(".index.json"):
            (folder / f.name).symlink_to(f)
    which = data.draw(st.sampled_from(["config", "config", "config", "generation", "both"]), label="file")
    notes = [name]
    if which in ("config", "both"):
        cfg, note = mutated_config(cfg, data.draw)
        notes.append(note)
    if which in ("generation", "both"):
        gen, note = fuzzing.mutate_json(gen, data.draw, focus=[("eos_token_id",), ("bos_token_id",)])
        notes.append(f"generation_config: {note}")
    for fname, doc in (("config.json", cfg), ("generation_config.json", gen)):
        raw = fuzzing.dumps(doc).encode("utf-8", "surrogatepass")
        if data.draw(st.integers(0, 9), label=f"text edit {fname}?") == 0:
            raw, note = fuzzing.mutate_json_text(raw.decode("utf-8", "surrogateescape"), data.draw)
            notes.append(f"{fname}: {note}")
        (folder / fname).write_bytes(raw)
    ws.note(" | ".join(notes))
    fuzzing.expect(ws, lambda: touch(hf.read(folder)), folder)


def test_bases_read(tmp_path):
    for name, src in SOURCES.items():
        assert touch(hf.read(src)) > 10, name


@pytest.fixture()
def folder(tmp_path) -> Path:
    out = tmp_path / "llama"
    out.mkdir()
    for f in SOURCES["llama"].iterdir():
        if f.suffix in (".safetensors", ".json"):
            (out / f.name).symlink_to(f) if f.suffix == ".safetensors" else (out / f.name).write_bytes(f.read_bytes())
    return out


def _edit(folder: Path, name="config.json", **changes) -> None:
    cfg = json.loads((folder / name).read_text())
    cfg.update(changes)
    (folder / name).write_text(fuzzing.dumps(cfg))


def _refused(folder: Path, match: str, file: str = "config.json") -> KilnError:
    with pytest.raises(KilnError, match=match) as e:
        touch(hf.read(folder))
    fuzzing.check_error(e.value, [folder])
    assert e.value.path == str(folder / file)
    return e.value


@pytest.mark.parametrize("file", ["config.json", "generation_config.json"])
@pytest.mark.parametrize("text,match", [("[" * 100000 + "]" * 100000, "nested too deeply"),
                                        ('{"model_type": ' + "9" * 5000 + "}", "digits")])
def test_regression_json_that_python_cannot_hold(folder, file, text, match):
    # found by fuzz_config: RecursionError and ValueError (int digit limit) escaped json.load
    (folder / file).write_text(text)
    _refused(folder, match, file)


def test_regression_head_size_that_would_fill_memory(folder):
    # found by fuzz_config: head_dim 2**31 made the rotary check allocate 8 GiB (MemoryError)
    _edit(folder, head_dim=2**31)
    _refused(folder, "head_dim is 2147483648; kiln handles heads of up to 65536 dimensions")


def test_regression_fused_tensor_sizes_that_would_fill_memory(tmp_path):
    # found by the long run of fuzz_config: phi3 (fused gate_up) with intermediate_size 2**31 - 1
    # built the row index of each part (16 GiB, MemoryError) before comparing the fused rows
    folder = tmp_path / "phi3"
    folder.mkdir()
    (folder / "model.safetensors").symlink_to(SOURCES["phi3"] / "model.safetensors")
    (folder / "generation_config.json").write_bytes((SOURCES["phi3"] / "generation_config.json").read_bytes())
    (folder / "config.json").write_bytes((SOURCES["phi3"] / "config.json").read_bytes())
    _edit(folder, intermediate_size=2**31 - 1)
    _refused(folder, "fused tensor .* has .* rows, the config implies 4294967294", "")


@pytest.mark.parametrize("value", [fuzzing.Raw("Infinity"), fuzzing.Raw("NaN"), fuzzing.Raw("1e400")])
def test_regression_numbers_that_are_not_finite(folder, value):
    # found by fuzz_config: partial_rotary_factor Infinity raised OverflowError (int(16 * inf))
    _edit(folder, partial_rotary_factor=value)
    _refused(folder, "partial_rotary_factor is .*, not a finite number")


def test_regression_window_past_64_bits(folder):
    # found by fuzz_config: sliding_window 2**63 raised OverflowError in the graph builder
    _edit(folder, sliding_window=2**63)
    _refused(folder, "sliding_window is 9223372036854775808, out of range")


@pytest.mark.parametrize("change,file", [({"model_type": fuzzing.Raw("7" * 4000)}, "config.json"),
                                         ({"bos_token_id": fuzzing.Raw("7" * 4000)}, "generation_config.json"),
                                         ({"hidden_act": "x" * 5000}, "config.json"),
                                         ({"vocab_size": fuzzing.Raw("7" * 4000)}, "config.json")])
def test_regression_long_values_stay_out_of_messages(folder, change, file):
    # found by fuzz_config: 4000-digit numbers were echoed whole (a 4,000-character line)
    _edit(folder, file, **change)
    message = _refused(folder, None, file).message
    # the unknown-architecture error also lists every family kiln reads, which grows with them
    listed = message.split("(kiln reads: ")[1] if "(kiln reads: " in message else ""
    assert len(message) - len(listed) < 200


def test_huge_rope_theta(folder):
    # found while fixing the cases above: float() of a 4000-digit rope_theta raised OverflowError
    _edit(folder, rope_parameters={"rope_theta": fuzzing.Raw("7" * 4000), "rope_type": "default"})
    _refused(folder, "bad value for int too large to convert to float")


@pytest.mark.parametrize("name", ["fuzz_config"])
def test_fuzz(name, tmp_path):
    fuzzing.run_target(__file__, name, tmp_path)
