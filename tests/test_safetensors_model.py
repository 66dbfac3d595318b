"""Bare safetensors files: architecture from a config beside them, from kiln's metadata, or inferred."""
import json
import shutil

import numpy as np
import pytest

from kiln.driver import convert, load_model
from kiln.errors import KilnError
from kiln.interp import run


def _logits(model, ids):
    return run(model.graph, {"input_ids": ids})[model.graph.outputs[0].name]


def test_kiln_written_file_describes_itself(hf_fixture, tmp_path):
    src = hf_fixture("phi3")
    convert(src, tmp_path / "phi3.safetensors", to="safetensors")
    model = load_model(tmp_path / "phi3.safetensors")
    ref = np.load(src / "reference.npz")
    # measured 2.1e-7 (logits ~0.6); bound ~10x
    np.testing.assert_allclose(_logits(model, ref["input_ids"]), ref["logits"], rtol=0, atol=3e-6)


def test_config_beside_the_file(hf_fixture, tmp_path):
    src = hf_fixture("mistral")
    shutil.copy(src / "model.safetensors", tmp_path / "weights.safetensors")
    shutil.copy(src / "config.json", tmp_path / "config.json")
    model = load_model(tmp_path / "weights.safetensors")
    assert model.config["family"] == "mistral"
    # the config was read, not guessed: the model computes what transformers computes
    # (measured 2.4e-7, logits ~0.5; bound ~10x)
    ref = np.load(src / "reference.npz")
    np.testing.assert_allclose(_logits(model, ref["input_ids"]), ref["logits"], rtol=0, atol=3e-6)


def test_architecture_inferred_from_qwen3_shapes(tmp_path):
    from conftest import REPO
    src = REPO / "tests" / "data" / "hf_variants" / "qwen3"
    shutil.copy(src / "model.safetensors", tmp_path / "q.safetensors")
    model = load_model(tmp_path / "q.safetensors")
    cfg = json.loads((src / "config.json").read_text())
    assert model.config["num_heads"] == cfg["num_attention_heads"]
    assert model.config["head_dim"] == cfg["head_dim"]


def test_ambiguous_shapes_give_a_clear_error(hf_fixture, tmp_path):
    path = tmp_path / "x.safetensors"
    shutil.copy(hf_fixture("llama") / "model-00001-of-00004.safetensors", path)
    with pytest.raises(KilnError) as e:
        load_model(path)
    assert str(e.value).startswith(f"{path}: ")
    assert str(e.value).endswith("the number of attention heads cannot be read off tensor shapes; "
                                 "put the model's config.json beside the file")
