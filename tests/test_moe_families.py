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


def test_mixture_rules_for_experts():
    """llama.cpp's rules on expert tensors: their projection's rule with the layer of their block,
    routers left float, an 8-expert model's attention given more bits."""
    from kiln.quant_schemes import Layout, get
    eight, many = Layout(num_layers=32, gqa=4, n_expert=8), Layout(num_layers=32, gqa=4, n_expert=128)
    s = get("q4_k_m")
    for lay in (eight, many):
        assert s.type_for("layers.3.experts.down.weight", (8, 4096, 14336), lay) == "q6_k"     # use_more_bits(3, 32)
        assert s.type_for("layers.4.experts.down.weight", (8, 4096, 14336), lay) == "q4_k"
        assert s.type_for("layers.4.experts.gate.weight", (8, 14336, 4096), lay) == "q4_k"
        assert s.type_for("layers.4.shexp.down.weight", (4096, 5632), lay) == "q4_k"
        assert s.type_for("layers.4.router.weight", (8, 4096), lay) is None
        assert s.type_for("layers.4.shexp.router.weight", (1, 4096), lay) is None
    assert s.type_for("layers.4.k.weight", (1024, 4096), eight) == "q8_0"
    assert s.type_for("layers.4.v.weight", (1024, 4096), eight) == "q8_0"
    assert s.type_for("layers.4.o.weight", (4096, 4096), eight) == "q5_k"
    assert get("q3_k_l").type_for("layers.4.o.weight", (4096, 4096), eight) == "q3_k"    # the base, not Q5_K
    assert s.type_for("layers.4.k.weight", (1024, 4096), many) == "q4_k"
    assert s.type_for("layers.4.v.weight", (1024, 4096), many) == "q4_k"


@pytest.mark.parametrize("name", ["qwen2_moe", "mixtral", "gpt_oss"])
@pytest.mark.parametrize("backend", ["onnxrt", "tvm"])
@pytest.mark.parametrize("quant", ["q8_0", "q4_k_m"])
def test_quantized_experts_compile(tmp_path, backend, quant, name):
    """--quant quantizes the 3-D expert tensors in blocks (routers kept float); the artifact
    computes what the interpreter computes from the dequantized blocks."""
    from kiln import runtime
    from kiln.driver import compile as kiln_compile
    from kiln.frontends.arch import FAMILIES
    from kiln.interp import run
    from kiln.passes.quantize import quantize
    from kiln.quant_schemes import Layout
    art = kiln_compile(DATA / name, output=tmp_path / "m.kiln", quant=quant, backend=backend)
    model = runtime.load(art)
    ref = load_model(DATA / name)
    quantize(ref.graph, quant, Layout.of(ref.config, FAMILIES[name]))
    w = ref.graph.weights
    assert w["layers.0.experts.gate.weight"].weight.format.is_block
    assert len(w["layers.0.experts.down.weight"].weight.shape) == 3
    assert not w["layers.0.router.weight"].weight.format.is_block
    ids = np.random.default_rng(3).integers(0, 128, size=(2, 9))
    want = next(iter(run(ref.graph, {"input_ids": ids}).values()))
    np.testing.assert_allclose(model.logits(ids), want, rtol=0, atol=5e-5)
    if backend == "tvm" and name == "mixtral":
        # mixtral's gate/up rows (48 of 32) stay blocks in the artifact; its down rows (32 of 48) fit no
        # block type, so --quant keeps them float
        formats = model.manifest["backend"]["weight_formats"]
        assert formats["layers.0.experts.gate.weight"] == formats["layers.0.experts.up.weight"] \
            == w["layers.0.experts.gate.weight"].weight.format.name
        assert formats["layers.0.experts.down.weight"] == "f32"


@pytest.mark.parametrize("formats, gpt_oss", [(("q4_0", "q8_0"), False), (("q4_k", "q6_k"), False),
                                              (("q8_0", "f32"), False), (("q8_0", "q4_0"), True), (("f32", "f32"), True)])
@pytest.mark.parametrize("cpu", ["generic", "host"])
def test_tvm_block_expert_kernels_match_the_interpreter(formats, gpt_oss, cpu):
    """The CPU kernels over experts kept in their blocks (gate/up in one type, down in another or
    float), a token at a time and several at once, against the interpreter on the same blocks;
    with ``gpt_oss`` the router and experts have biases and the SwiGLU is clamped (at a limit
    these weights reach). ``host``: compiled for this machine's CPU, whose AVX-512 paths
    (vpermps codes, scales applied per group sum) a generic target does not take."""
    import tvm

    from kiln.interp import run
    from kiln.ir import Graph
    from kiln.targets.tvm.lower import Target, lower_plain
    from kiln.weights import Weight
    gu, d = formats
    r = np.random.default_rng(5)
    X, E, F = 4, 256, 256
    g = Graph("moe")
    x = g.add_input("x", "float32", ("batch", "seq", E))
    arrays = {"router": (r.normal(size=(X, E)), "f32"), "gate": (r.normal(size=(X, F, E)), gu),
              "up": (r.normal(size=(X, F, E)), gu), "down": (r.normal(size=(X, E, F)), d)}
    attrs = {"top_k": 2, "normalize": 1}
    if gpt_oss:
        arrays.update({"router_bias": (r.normal(size=(X,)), "f32"), "gate_bias": (r.normal(size=(X, F)), "f32"),
                       "up_bias": (r.normal(size=(X, F)), "f32"), "down_bias": (r.normal(size=(X, E)), "f32")})
        attrs.update(activation="swiglu_oai", bias=1, alpha=1.702, limit=0.5)
    ins = [x] + [g.add_weight(k, Weight.from_array(a.astype(np.float32) * 0.1, fmt, name=k), "float32")
                 for k, (a, fmt) in arrays.items()]
    g.outputs = g.add_node("MoE", ins, attrs, name="moe")
    target = {"kind": "llvm"} if cpu == "generic" else {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()}
    mod, plan = lower_plain(g, Target(target, False))
    assert plan.formats["gate"] == gu and plan.formats["down"] == d
    ex = tvm.compile(mod, target=tvm.target.Target(target))
    vm = tvm.runtime.vm.VirtualMachine(ex, tvm.cpu())
    # 1 and 2 tokens: the per-token (decode) kernels; 10 and 39: prefill's grouped pass (39
    # tokens give each expert several passes of GROUP_ROWS pairs, the last one ragged)
    for shape in ((1, 1, E), (1, 2, E), (2, 5, E), (3, 13, E)):
        feed = r.normal(size=shape).astype(np.float32)
        got = vm["main"](tvm.runtime.tensor(feed), [tvm.runtime.tensor(p.array) for p in plan.params])[0].numpy()
        want = run(g, {"x": feed})[g.outputs[0].name]
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-4)


def test_quantized_expert_gguf_reads_back(tmp_path):
    """kiln convert --to gguf --quant writes the expert tensors in blocks, 3-D, and reads them back."""
    from kiln.frontends.gguf_file import read_gguf
    convert(DATA / "mixtral", tmp_path / "m.gguf", to="gguf", quant="q4_0")
    f = read_gguf(tmp_path / "m.gguf")
    t = f.tensors["blk.0.ffn_gate_exps.weight"]
    assert t.format.name == "q4_0" and t.shape == (4, 48, 32)
    # rows of 48 are no whole number of 32-blocks: F16, as llama.cpp's fallback
    assert f.tensors["blk.0.ffn_down_exps.weight"].format.name == "f16"
    assert f.tensors["blk.0.ffn_gate_inp.weight"].format.name == "f32"
    m = load_model(tmp_path / "m.gguf")
    np.testing.assert_array_equal(m.weights["layers.0.experts.gate.weight"].numpy(), t.numpy())


def test_inspect_shows_experts(tmp_path, capsys):
    """kiln inspect names the experts, how many a token uses, and the share of their weights it
    reads: from config.json, from the GGUF, and from a compiled artifact."""
    from kiln.cli import main
    from kiln.driver import compile as kiln_compile
    convert(DATA / "qwen2_moe", tmp_path / "m.gguf", to="gguf")
    art = kiln_compile(DATA / "qwen2_moe", output=tmp_path / "m.kiln")
    # 2 layers x 3 projections x hidden 32 x expert MLP 24 = 4,608 per expert
    want = "experts: 4 per layer, 2 active per token, plus a shared expert of 40; 9,216 of the experts' " \
           "18,432 parameters read per token"
    for path in (DATA / "qwen2_moe", tmp_path / "m.gguf", art):
        assert main(["inspect", str(path)]) == 0
        out = capsys.readouterr().out
        assert want in out, out[-2000:]
    assert main(["inspect", str(DATA / "mixtral")]) == 0
    assert "experts: 4 per layer, 2 active per token (their weights renormalized);" in capsys.readouterr().out
    assert main(["inspect", str(DATA / "olmo2")]) == 0
    assert "experts" not in capsys.readouterr().out


def test_gpt_oss_experts_are_read_from_the_interleaved_transposed_gate_up():
    """gpt_oss's HF experts: gate_up_proj [experts, in, 2F] holds gate in its even columns and up
    in its odd ones; kiln's gate/up are those columns as [experts, F, in], down_proj [experts,
    in, out] transposed, and the biases split the same way; one MoE op per layer with them."""
    from kiln.frontends.safetensors_file import read_safetensors
    model = hf.read(DATA / "gpt_oss")
    t = {k: v.numpy() for k, v in read_safetensors(DATA / "gpt_oss" / "model.safetensors").tensors.items()}
    p = "model.layers.1.mlp.experts."
    w = {k: v.numpy() for k, v in model.weights.items() if k.startswith("layers.1.")}
    np.testing.assert_array_equal(w["layers.1.experts.gate.weight"], t[p + "gate_up_proj"][:, :, 0::2].transpose(0, 2, 1))
    np.testing.assert_array_equal(w["layers.1.experts.up.weight"], t[p + "gate_up_proj"][:, :, 1::2].transpose(0, 2, 1))
    np.testing.assert_array_equal(w["layers.1.experts.down.weight"], t[p + "down_proj"].transpose(0, 2, 1))
    np.testing.assert_array_equal(w["layers.1.experts.gate.bias"], t[p + "gate_up_proj_bias"][:, 0::2])
    np.testing.assert_array_equal(w["layers.1.experts.up.bias"], t[p + "gate_up_proj_bias"][:, 1::2])
    np.testing.assert_array_equal(w["layers.1.router.bias"], t["model.layers.1.mlp.router.bias"])
    moes = [n for n in model.graph.nodes if n.op == "MoE"]
    assert len(moes) == 2 and len(moes[0].inputs) == 9
    assert moes[0].attrs == {"top_k": 2, "normalize": 1, "bias": 1, "activation": "swiglu_oai", "alpha": 1.702,
                             "limit": 7.0}


def test_gpt_oss_swiglu_constants_are_read_and_written(tmp_path):
    """swiglu_alpha and swiglu_limit come from config.json (transformers' 1.702 and 7.0 where
    it has none, and its yarn rope) and go into the GGUF as kiln's keys (llama.cpp fixes 1.702
    and 7.0)."""
    from kiln.frontends.gguf_file import read_gguf
    folder = tmp_path / "m"
    shutil.copytree(DATA / "gpt_oss", folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "swiglu_limit": 3.5}))
    assert hf.read(folder).config["swiglu_limit"] == 3.5
    convert(folder, tmp_path / "m.gguf", to="gguf")
    assert read_gguf(tmp_path / "m.gguf").metadata["gpt-oss.swiglu_limit"] == 3.5
    assert load_model(tmp_path / "m.gguf").config["swiglu_limit"] == 3.5
    del cfg["swiglu_alpha"], cfg["swiglu_limit"], cfg["rope_parameters"]
    (folder / "config.json").write_text(json.dumps(cfg))
    c = hf.read(folder).config
    assert (c["swiglu_alpha"], c["swiglu_limit"]) == (1.702, 7.0)
    # GptOssConfig's rope when a config states none: yarn, factor 32 over 4096, truncate false
    assert c["rope_theta"] == 150000.0 and c["rope_scaling"]["factor"] == 32.0
    assert c["rope_scaling"]["truncate"] is False


def mxfp4_gguf(tmp_path):
    """The gpt_oss fixture as llama.cpp's converter ships gpt-oss: expert tensors in MXFP4."""
    from kiln.frontends.gguf_file import read_gguf, write_gguf
    convert(DATA / "gpt_oss", tmp_path / "f32.gguf", to="gguf")
    f = read_gguf(tmp_path / "f32.gguf")
    tensors = {n: (w.astype("mxfp4") if n.endswith("_exps.weight") else w) for n, w in f.tensors.items()}
    write_gguf(tmp_path / "mxfp4.gguf", f.metadata, tensors.items())
    return tmp_path / "mxfp4.gguf"


@pytest.mark.parametrize("backend", ["onnxrt", "tvm"])
def test_gguf_mxfp4_experts_stay_blocks_and_compile(tmp_path, backend):
    """kiln reads MXFP4 expert tensors as blocks (a GGUF written from them keeps them MXFP4);
    both backends compute from their exact values: neither has an MXFP4 kernel, so the
    artifact holds them dequantized to float32."""
    from kiln import runtime
    from kiln.driver import compile as kiln_compile
    from kiln.frontends.gguf_file import read_gguf
    from kiln.interp import run
    path = mxfp4_gguf(tmp_path)
    model = load_model(path)
    assert {model.weights[f"layers.1.experts.{p}.weight"].format.name for p in ("gate", "up", "down")} == {"mxfp4"}
    convert(path, tmp_path / "again.gguf", to="gguf")
    again = read_gguf(tmp_path / "again.gguf").tensors
    assert again["blk.1.ffn_gate_exps.weight"].format.name == "mxfp4"
    assert again["blk.1.ffn_gate_exps.weight"].raw().tobytes() == read_gguf(path).tensors[
        "blk.1.ffn_gate_exps.weight"].raw().tobytes()
    art = runtime.load(kiln_compile(path, output=tmp_path / "m.kiln", backend=backend))
    ids = np.random.default_rng(6).integers(0, 128, size=(2, 9))
    want = next(iter(run(model.graph, {"input_ids": ids}).values()))
    np.testing.assert_allclose(art.logits(ids), want, rtol=0, atol=5e-5)


def test_gpt_oss_bad_gate_up_is_one_clear_line(tmp_path):
    """A gate_up_proj whose gate and up columns do not pair up fails naming the tensor."""
    from kiln.frontends.safetensors_file import read_safetensors, write_safetensors
    from kiln.weights import Weight
    folder = tmp_path / "m"
    shutil.copytree(DATA / "gpt_oss", folder)
    tensors = read_safetensors(DATA / "gpt_oss" / "model.safetensors").tensors
    bad = "model.layers.0.mlp.experts.gate_up_proj"
    items = [(n, Weight.from_array(w.numpy()[:, :, :63]) if n == bad else w) for n, w in tensors.items()]
    write_safetensors(folder / "model.safetensors", items, metadata={"format": "pt"})
    with pytest.raises(KilnError) as e:
        hf.read(folder)
    assert f"fused tensor {bad} has shape [4, 63, 32]: not gate and up rows in pairs" in str(e.value)
    assert "\n" not in str(e.value)


def hf_mxfp4_folder(tmp_path):
    """The gpt_oss fixture as gpt-oss is published: each expert projection as MXFP4 bytes,
    ``_blocks`` [experts, out, in/32, 16] (value 2i in the low nibble of byte i) and ``_scales``
    [experts, out, in/32], quantized from its float experts, with quantization_config mxfp4."""
    from kiln import formats
    from kiln.formats._blocks import unpack_nibbles
    from kiln.frontends.safetensors_file import read_safetensors, write_safetensors
    from kiln.weights import Weight
    folder = tmp_path / "mxfp4"
    shutil.copytree(DATA / "gpt_oss", folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "mxfp4"}}))
    items = []
    for name, w in read_safetensors(DATA / "gpt_oss" / "model.safetensors").tensors.items():
        if not name.endswith(("gate_up_proj", "down_proj")):
            items.append((name, w))
            continue
        a = w.numpy().transpose(0, 2, 1)                                        # [X, out, in]
        kiln_blocks = formats.get("mxfp4").quantize(a.reshape(-1, a.shape[-1])).reshape(-1, 17)
        codes = unpack_nibbles(kiln_blocks[:, 1:])                               # element order
        hf_bytes = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
        groups = a.shape[:2] + (a.shape[2] // 32,)
        items.append((name + "_blocks", Weight(groups + (16,), "u8", lambda b=hf_bytes: b)))
        items.append((name + "_scales", Weight(groups, "u8", lambda e=kiln_blocks[:, 0].copy(): e)))
    write_safetensors(folder / "model.safetensors", items, metadata={"format": "pt"})
    return folder


def test_hf_mxfp4_experts_are_read_as_blocks(tmp_path):
    """A published gpt-oss folder's MXFP4 experts are repacked into kiln's MXFP4 blocks without
    dequantizing: the very bytes llama.cpp's converter writes into a GGUF (the GGUF here holds
    the same experts quantized by kiln, which llama.cpp reads with kiln's greedy tokens,
    tests/test_llama_cpp.py), gate and up taken from alternate rows; convert to GGUF keeps them."""
    from kiln.frontends.gguf_file import read_gguf
    folder = hf_mxfp4_folder(tmp_path)
    model = hf.read(folder)
    gguf = read_gguf(mxfp4_gguf(tmp_path)).tensors
    for i in range(2):
        for part, name in (("gate", "ffn_gate_exps"), ("up", "ffn_up_exps"), ("down", "ffn_down_exps")):
            w = model.weights[f"layers.{i}.experts.{part}.weight"]
            assert w.format.name == "mxfp4" and w.shape == gguf[f"blk.{i}.{name}.weight"].shape
            assert w.raw().tobytes() == gguf[f"blk.{i}.{name}.weight"].raw().tobytes(), (i, part)
    convert(folder, tmp_path / "m.gguf", to="gguf")
    assert read_gguf(tmp_path / "m.gguf").tensors["blk.0.ffn_up_exps.weight"].format.name == "mxfp4"


@pytest.mark.parametrize("backend", ["onnxrt", "tvm"])
def test_hf_mxfp4_experts_compile(tmp_path, backend):
    from kiln import runtime
    from kiln.driver import compile as kiln_compile
    from kiln.interp import run
    folder = hf_mxfp4_folder(tmp_path)
    model = hf.read(folder)
    art = runtime.load(kiln_compile(folder, output=tmp_path / "m.kiln", backend=backend))
    ids = np.random.default_rng(8).integers(0, 128, size=(2, 9))
    want = next(iter(run(model.graph, {"input_ids": ids}).values()))
    np.testing.assert_allclose(art.logits(ids), want, rtol=0, atol=5e-5)


def test_bad_hf_mxfp4_blocks_are_one_clear_line(tmp_path):
    from kiln.frontends.safetensors_file import read_safetensors, write_safetensors
    from kiln.weights import Weight
    folder = hf_mxfp4_folder(tmp_path)
    tensors = read_safetensors(folder / "model.safetensors").tensors
    bad = "model.layers.0.mlp.experts.down_proj_scales"
    items = [(n, Weight((4, 32), "u8", lambda: np.zeros((4, 32), np.uint8)) if n == bad else w)
             for n, w in tensors.items()]
    write_safetensors(folder / "model.safetensors", items, metadata={"format": "pt"})
    with pytest.raises(KilnError) as e:
        hf.read(folder)
    assert "model.layers.0.mlp.experts.down_proj_blocks [4, 32, 1, 16] and " \
           "model.layers.0.mlp.experts.down_proj_scales [4, 32] are not MXFP4 blocks" in str(e.value)
    assert "\n" not in str(e.value)


def test_inspect_shows_gpt_oss(tmp_path, capsys):
    """kiln inspect on gpt-oss: its experts (biased, the SwiGLU's clamp), its alternating
    sliding layers and its sinks, from config.json and from the GGUF."""
    from kiln.cli import main
    convert(DATA / "gpt_oss", tmp_path / "m.gguf", to="gguf")
    for path in (DATA / "gpt_oss", tmp_path / "m.gguf"):
        assert main(["inspect", str(path)]) == 0
        out = capsys.readouterr().out
        assert "experts: 4 per layer, 2 active per token (their weights renormalized), biased, clamped SwiGLU at " \
               "7; 12,288 of the experts' 24,576 parameters read per token" in out, out[-2000:]
        assert "attention: 1 of 2 layers within a sliding window of 4 tokens (S), the others global (G), layer 0 " \
               "first: SG; a learned sink logit per head in every softmax" in out, out[-2000:]


def test_tvm_keeps_the_op_and_onnxrt_decomposes_it(tmp_path):
    """TVM lowers MoE itself (a kernel indexing the chosen experts' weights); ONNX Runtime gets
    the dense decomposition."""
    from kiln.driver import compile as kiln_compile
    from kiln.targets.tvm.lower import Target, lower_plain
    stats = {}
    for backend in ("onnxrt", "tvm"):
        art = kiln_compile(DATA / "olmoe", output=tmp_path / f"{backend}.kiln", backend=backend)
        manifest = json.loads((art / "manifest.json").read_text())
        stats[backend] = [p for p in manifest["passes"] if p["name"] == "moe"]
    assert [p["stats"] for p in stats["onnxrt"]] == [{"decomposed": 2}]
    assert stats["tvm"] == []                # no decomposition in TVM's pipeline
    mod, _ = lower_plain(hf.read(DATA / "olmoe").graph, Target({"kind": "llvm"}, False))
    names = {gv.name_hint for gv in mod.functions}
    assert any(x.startswith("moe_up_") for x in names) and any(x.startswith("moe_down_") for x in names)


def test_tvm_keeps_bf16_experts_in_their_own_type(tmp_path):
    """A bf16 checkpoint's expert tensors stay 2 bytes a value in the TVM artifact (widened in
    the kernels), and the artifact computes what the interpreter computes from them."""
    from kiln import runtime
    from kiln.driver import compile as kiln_compile
    from kiln.interp import run
    convert(DATA / "qwen2_moe", tmp_path / "bf16", to="hf", dtype="bf16")
    art = kiln_compile(tmp_path / "bf16", output=tmp_path / "m.kiln", backend="tvm")
    model = runtime.load(art)
    formats = model.manifest["backend"]["weight_formats"]
    assert formats["layers.0.experts.gate.weight"] == "bf16" and formats["layers.1.experts.down.weight"] == "bf16"
    ref = hf.read(tmp_path / "bf16")
    ids = np.random.default_rng(4).integers(0, 128, size=(2, 9))
    want = next(iter(run(ref.graph, {"input_ids": ids}).values()))
    np.testing.assert_allclose(model.logits(ids), want, rtol=0, atol=5e-5)


@pytest.mark.parametrize("name", ["qwen2_moe", "gpt_oss"])
def test_cuda_build_holds_the_moe_kernels(tmp_path, name):
    """For a GPU, TVM schedules the expert computation itself (built here without a GPU: the
    kernels are in the device code; their numbers are not checked on a GPU yet); gpt_oss's
    with its biases and clamped SwiGLU, beside the attention kernel that takes its sinks."""
    from kiln.driver import compile as kiln_compile
    out = kiln_compile(DATA / name, target="cuda", output=tmp_path / "m.kiln", backend="tvm")
    b = json.loads((out / "manifest.json").read_text())["backend"]
    assert any(k.startswith("moe_experts") for k in b["kernels"])
    assert "moe_experts" in (out / b["device_source"]).read_text()


def test_one_dimensional_shared_expert_gate_in_gguf_reads(tmp_path):
    """llama.cpp declares ffn_gate_inp_shexp as {n_embd}: a GGUF holding it 1-D reads as one row."""
    from kiln.frontends.gguf_file import read_gguf, write_gguf
    convert(DATA / "qwen2_moe", tmp_path / "m.gguf", to="gguf")
    f = read_gguf(tmp_path / "m.gguf")
    tensors = {name: (w.reshape((w.shape[-1],)) if "ffn_gate_inp_shexp" in name else w) for name, w in f.tensors.items()}
    write_gguf(tmp_path / "flat.gguf", f.metadata, tensors.items())
    assert read_gguf(tmp_path / "flat.gguf").tensors["blk.0.ffn_gate_inp_shexp.weight"].shape == (32,)
    a, b = load_model(tmp_path / "m.gguf"), load_model(tmp_path / "flat.gguf")
    np.testing.assert_array_equal(b.weights["layers.0.shexp.router.weight"].numpy(),
                                  a.weights["layers.0.shexp.router.weight"].numpy())


def test_tvm_moe_artifact_runs_in_a_process_without_the_compiler(tmp_path):
    """`kiln run` loads TVM's runtime-only library; a MoE artifact's router top-k is one of
    TVM's library functions (tvm.contrib.sort.topk) that only the compiler's library has, so
    the session must bring that in rather than refuse the artifact as not matching its library."""
    import subprocess
    import sys
    from kiln.driver import compile as compile_model
    art = tmp_path / "olmoe.kiln"
    compile_model(DATA / "olmoe", output=art, backend="tvm")
    code = ("import sys; from kiln.cli import main; rc = main(['run', sys.argv[1], '--ids', '1,2,3', '-n', '4']); "
            "assert 'tvm' in sys.modules; sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code, str(art)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.strip().split(",")) >= 4
