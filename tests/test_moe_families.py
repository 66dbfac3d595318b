"""The mixture-of-experts families beyond matching transformers (tests/test_hf_variants.py):
how their experts are read and written, and bad files as one clear line."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from kiln.driver import convert, load_model
from kiln.errors import KilnError
from kiln.frontends import hf

DATA = Path(__file__).resolve().parent / "data" / "hf_variants"


def test_experts_are_stacked_as_llama_cpp_lays_them_out():
    """HF's one tensor per expert becomes one [experts, out, in] weight per projection, expert j
    at index j; the graph holds one MoE op per layer."""
    from kiln.frontends.safetensors_file import read_safetensors
    model = hf.read(DATA / "qwen2_moe")
    tensors = read_safetensors(DATA / "qwen2_moe" / "model.safetensors").tensors
    gate = model.weights["layers.1.experts.gate.weight"]
    assert gate.shape == (4, 24, 32)
    for j in range(4):
        want = tensors[f"model.layers.1.mlp.experts.{j}.gate_proj.weight"].numpy()
        np.testing.assert_array_equal(gate.numpy()[j], want)
    assert model.weights["layers.1.experts.down.weight"].shape == (4, 32, 24)
    assert model.weights["layers.0.shexp.router.weight"].shape == (1, 32)
    moes = [n for n in model.graph.nodes if n.op == "MoE"]
    assert len(moes) == 2 and moes[0].attrs == {"top_k": 2, "normalize": 0}
    assert len(moes[0].inputs) == 9
    c = model.config
    assert (c["num_experts"], c["experts_per_token"], c["expert_intermediate_size"],
            c["shared_expert_intermediate_size"]) == (4, 2, 24, 40)


@pytest.mark.parametrize("name, norm", [("mixtral", True), ("qwen3_moe", True), ("olmoe", False), ("qwen2_moe", False)])
def test_norm_topk_prob_is_read(name, norm):
    assert hf.read(DATA / name).config["expert_norm_topk"] is norm


def test_gguf_expert_weights_norm_overrides_llama_cpps_fixed_choice(tmp_path):
    """llama.cpp's qwen2moe graph never renormalizes; a model that does says so in kiln's
    expert_weights_norm key, which kiln reads back (llama.cpp ignores it)."""
    from kiln.frontends.gguf_file import read_gguf, write_gguf
    convert(DATA / "qwen2_moe", tmp_path / "m.gguf", to="gguf")
    f = read_gguf(tmp_path / "m.gguf")
    assert f.metadata["qwen2moe.expert_weights_norm"] is False
    assert load_model(tmp_path / "m.gguf").config["expert_norm_topk"] is False
    write_gguf(tmp_path / "n.gguf", {**f.metadata, "qwen2moe.expert_weights_norm": True}, f.tensors.items())
    assert load_model(tmp_path / "n.gguf").config["expert_norm_topk"] is True
    meta = {k: v for k, v in f.metadata.items() if k != "qwen2moe.expert_weights_norm"}
    write_gguf(tmp_path / "o.gguf", meta, f.tensors.items())
    assert load_model(tmp_path / "o.gguf").config["expert_norm_topk"] is False


@pytest.mark.parametrize("patch, words", [
    ({"num_experts_per_tok": 5}, "num_experts_per_tok 5 is more than the 4 experts"),
    ({"num_experts": 0}, "num_experts is 0, not a positive whole number"),
    ({"mlp_only_layers": [1]}, "layers with a dense MLP among the experts"),
    ({"decoder_sparse_step": 2}, "layers with a dense MLP among the experts"),
    ({"num_experts": 5}, "tensor model.layers.0.mlp.experts.4.gate_proj.weight is missing (the config says 5 experts)"),
])
def test_bad_moe_config_is_one_clear_line(tmp_path, patch, words):
    folder = tmp_path / "m"
    shutil.copytree(DATA / "qwen3_moe", folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_experts"] = cfg.pop("num_local_experts")      # as Qwen3-30B-A3B's config.json names it
    (folder / "config.json").write_text(json.dumps({**cfg, **patch}))
    with pytest.raises(KilnError) as e:
        hf.read(folder)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_qwen3_moe_config_as_published_reads(tmp_path):
    """Qwen3-30B-A3B's config.json says num_experts; transformers 5 saves num_local_experts."""
    folder = tmp_path / "m"
    shutil.copytree(DATA / "qwen3_moe", folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_experts"] = cfg.pop("num_local_experts")
    (folder / "config.json").write_text(json.dumps(cfg))
    assert hf.read(folder).config["num_experts"] == 4


def test_bad_expert_count_in_gguf_is_one_clear_line(tmp_path):
    from kiln.frontends.gguf_file import read_gguf, write_gguf
    convert(DATA / "olmoe", tmp_path / "m.gguf", to="gguf")
    f = read_gguf(tmp_path / "m.gguf")
    write_gguf(tmp_path / "bad.gguf", {**f.metadata, "olmoe.expert_used_count": 9}, f.tensors.items())
    with pytest.raises(KilnError) as e:
        load_model(tmp_path / "bad.gguf")
    assert "olmoe.expert_used_count is 9; it must be between 1 and olmoe.expert_count (4)" in str(e.value)


def test_mixtral_gguf_is_llama_with_experts(tmp_path):
    """llama.cpp's converter writes Mixtral as architecture llama with expert keys: kiln reads such
    a file as mixtral, and a llama file without experts stays llama."""
    from kiln.frontends.gguf_file import read_gguf
    convert(DATA / "mixtral", tmp_path / "m.gguf", to="gguf")
    f = read_gguf(tmp_path / "m.gguf")
    assert f.metadata["general.architecture"] == "llama" and f.metadata["llama.expert_count"] == 4
    assert load_model(tmp_path / "m.gguf").config["family"] == "mixtral"
