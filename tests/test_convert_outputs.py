"""What `kiln convert` writes: GGUF types bit-exact with the gguf package, sharded HF folders."""
import json

import gguf
import numpy as np
import pytest

from kiln.cli import main
from kiln.driver import load_model
from kiln.frontends.gguf_file import read_gguf
from kiln.frontends.safetensors_file import read_safetensors


@pytest.mark.parametrize("quant", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
def test_gguf_blocks_equal_the_gguf_package(hf_fixture, tmp_path, quant):
    src = hf_fixture("llama")
    assert main(["convert", str(src), str(tmp_path / "m.gguf"), "--to", "gguf", "--quant", quant, "-q"]) == 0
    f = read_gguf(tmp_path / "m.gguf")
    weights = load_model(src).weights
    qtype = gguf.GGMLQuantizationType[quant.upper()]
    # v and mlp weights are stored unpermuted, so they compare directly with the source
    for role, name in (("layers.0.v.weight", "blk.0.attn_v.weight"), ("layers.1.down.weight", "blk.1.ffn_down.weight"),
                       ("embed", "token_embd.weight"), ("lm_head", "output.weight")):
        want = gguf.quants.quantize(weights[role].numpy(), qtype)
        assert f.tensors[name].raw().tobytes() == want.tobytes(), name
    assert f.tensors["blk.0.attn_norm.weight"].format.name == "f32"


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_gguf_float_types_equal_the_gguf_package(hf_fixture, tmp_path, dtype):
    src = hf_fixture("qwen2")
    assert main(["convert", str(src), str(tmp_path / "m.gguf"), "--to", "gguf", "--dtype", dtype, "-q"]) == 0
    f = read_gguf(tmp_path / "m.gguf")
    x = load_model(src).weights["layers.0.up.weight"].numpy()
    want = x.astype(np.float16) if dtype == "f16" else gguf.quants.quantize(x, gguf.GGMLQuantizationType.BF16)
    assert f.tensors["blk.0.ffn_up.weight"].raw().tobytes() == want.tobytes()


def test_hf_output_is_sharded_above_the_limit(hf_fixture, tmp_path):
    src = hf_fixture("mistral")
    out = tmp_path / "sharded"
    assert main(["convert", str(src), str(out), "--to", "hf", "--max-shard-size", "100KB", "-q"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((out / s).stat().st_size <= 100_000 + 70_000 for s in shards)
    original = read_safetensors(src / "model.safetensors").tensors
    assert set(index["weight_map"]) == set(original)
    for name, shard in index["weight_map"].items():
        assert read_safetensors(out / shard).tensors[name].raw().tobytes() == original[name].raw().tobytes()
    assert index["metadata"]["total_size"] == sum(w.nbytes for w in original.values())


def test_bad_shard_size_is_a_usage_error(hf_fixture, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["convert", str(hf_fixture("llama")), str(tmp_path / "x"), "--to", "hf", "--max-shard-size", "lots"])
    assert e.value.code == 2
    assert "not a size" in capsys.readouterr().err
