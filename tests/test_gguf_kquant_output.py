"""K-quant GGUF output, which the gguf package cannot write: checked by its dequantizer."""
import json

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from kiln.driver import convert, load_model
from kiln.frontends.gguf_file import read_gguf
from kiln.interp import run

# relative RMSE of our quantizers on normal data (see tests/test_formats.py), with margin
BOUNDS = {"q4_k": 0.075, "q6_k": 0.019, "q5_k": 0.038, "q3_k": 0.16, "q2_k": 0.31}


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    """A random llama whose rows are whole 256-element super-blocks."""
    d = tmp_path_factory.mktemp("wide")
    rng = np.random.default_rng(0)
    H, F, V = 256, 512, 256
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": H, "intermediate_size": F,
           "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": V,
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 128, "tie_word_embeddings": False}
    (d / "config.json").write_text(json.dumps(cfg))
    p = "model.layers.0."
    t = {"model.embed_tokens.weight": (V, H), "lm_head.weight": (V, H), p + "self_attn.q_proj.weight": (H, H),
         p + "self_attn.k_proj.weight": (H // 2, H), p + "self_attn.v_proj.weight": (H // 2, H),
         p + "self_attn.o_proj.weight": (H, H), p + "mlp.gate_proj.weight": (F, H), p + "mlp.up_proj.weight": (F, H),
         p + "mlp.down_proj.weight": (H, F)}
    tensors = {k: (rng.standard_normal(s) * 0.05).astype(np.float32) for k, s in t.items()}
    for k in ("model.norm.weight", p + "input_layernorm.weight", p + "post_attention_layernorm.weight"):
        tensors[k] = (1 + 0.1 * rng.standard_normal(H)).astype(np.float32)
    save_file(tensors, str(d / "model.safetensors"))
    return d


@pytest.mark.parametrize("quant", ["q4_k", "q6_k", "q5_k", "q3_k", "q2_k"])
def test_kquant_gguf_dequantizes_within_bounds(wide_model, tmp_path, quant):
    out = tmp_path / f"m.{quant}.gguf"
    convert(wide_model, out, to="gguf", quant=quant)
    src = load_model(wide_model).weights
    f = read_gguf(out)
    reader = gguf.GGUFReader(str(out))
    quantized = 0
    for t in reader.tensors:
        ours = f.tensors[t.name]
        if ours.format.name == "f32":
            continue
        assert ours.format.name == quant, t.name
        quantized += 1
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ours.shape)
        np.testing.assert_array_equal(values, ours.numpy())      # the reference reads what we read
    assert quantized == 9
    # error against the source weights (q/k rows are permuted in GGUF; compare the v and mlp weights)
    for role, name in (("layers.0.v.weight", "blk.0.attn_v.weight"), ("layers.0.down.weight", "blk.0.ffn_down.weight"),
                       ("embed", "token_embd.weight")):
        x = src[role].numpy()
        err = np.sqrt(np.mean((f.tensors[name].numpy() - x) ** 2)) / np.sqrt(np.mean(x ** 2))
        assert err < BOUNDS[quant], (name, err)


def test_kquant_model_still_predicts(wide_model, tmp_path):
    """The Q6_K GGUF computes exactly what the source model computes with its matrices rounded
    through Q6_K (so the write, the q/k permutation and the read add nothing), and that stays
    near the float model."""
    from kiln import formats
    convert(wide_model, tmp_path / "q6.gguf", to="gguf", quant="q6_k")
    ids = np.random.default_rng(1).integers(0, 256, size=(1, 8))
    ref = next(iter(run(load_model(wide_model).graph, {"input_ids": ids}).values()))
    got = next(iter(run(load_model(tmp_path / "q6.gguf").graph, {"input_ids": ids}).values()))
    rounded = tmp_path / "rounded"
    rounded.mkdir()
    (rounded / "config.json").write_text((wide_model / "config.json").read_text())
    q6 = formats.get("q6_k")
    tensors = load_file(str(wide_model / "model.safetensors"))
    save_file({k: q6.dequantize(q6.quantize(v), v.shape) if v.ndim == 2 else v for k, v in tensors.items()},
              str(rounded / "model.safetensors"))
    want = next(iter(run(load_model(rounded).graph, {"input_ids": ids}).values()))
    # measured 0 (the same float32 operations on the same weights); bound ~10 ulps of logits ~3
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
    # Q6_K's 1.8% weight error moves these random logits by 4.97% (relative RMSE), measured;
    # bound 6%
    assert np.sqrt(np.mean((ref - got) ** 2)) < 0.06 * np.sqrt(np.mean(ref ** 2))


def test_rows_that_are_not_superblocks_fall_back(hf_fixture, tmp_path):
    convert(hf_fixture("llama"), tmp_path / "m.gguf", to="gguf", quant="q4_k")
    kinds = {t.format.name for t in read_gguf(tmp_path / "m.gguf").tensors.values()}
    assert kinds == {"f32", "q5_0"}


@pytest.mark.parametrize("quant", ["q4_k", "q6_k"])
def test_kquant_blocks_run_quantized_in_onnxruntime(wide_model, tmp_path, quant):
    """Compiled, the K-quant blocks reach MatMulNBits as they are and compute what the
    interpreter computes from the dequantized weights."""
    from kiln import runtime
    from kiln.driver import compile as kiln_compile
    gguf_path = tmp_path / f"m.{quant}.gguf"
    convert(wide_model, gguf_path, to="gguf", quant=quant)
    model = runtime.load(kiln_compile(gguf_path, output=tmp_path / "m.kiln", backend="onnxrt"))
    stats = {p["name"]: p["stats"] for p in model.manifest["passes"]}
    assert stats["merge_matmul"] == {"merged": 2, "matmuls": 5}       # q/k/v and gate/up
    assert stats["quant_matmul"] == {f"quant_matmul_{quant}": 5}     # q_k_v, o, gate_up, down + lm_head
    ids = np.random.default_rng(2).integers(0, 256, size=(1, 8))
    want = next(iter(run(load_model(gguf_path).graph, {"input_ids": ids}).values()))
    # measured 7.4e-6 (q4_k) and 3.5e-6 (q6_k) on logits ~3; bound ~10x the worst
    np.testing.assert_allclose(model.logits(ids), want, rtol=0, atol=8e-5)
