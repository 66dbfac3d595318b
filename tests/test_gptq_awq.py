"""GPTQ and AWQ checkpoints read as int4 block weights (frontends/packed_int4.py).

The fixtures (tests/data/gptq_awq/, made by scripts/make_gptq_awq_fixtures.py) are the tiny
llama packed by the published GPTQ and AWQ layouts, with transformers' logits for the
dequantized models. Each is checked in the interpreter, compiled on both backends with its
blocks kept, and through GGUF; the packing itself is checked against hand-made words.
"""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, greedy_decode

from kiln import formats
from kiln.driver import compile as kiln_compile
from kiln.driver import convert, load_model
from kiln.errors import KilnError
from kiln.frontends import hf, packed_int4
from kiln.formats import int4_group
from kiln.frontends.safetensors_file import read_safetensors, write_safetensors
from kiln.interp import run
from kiln.weights import Weight

DATA = REPO / "tests" / "data" / "gptq_awq"
# the linear layers' blocks in the graph per case: a 64-wide row under group_size 128 is one
# group, stored in blocks of 64; desc_act's are blocks over its sorted inputs
FORMATS = {"gptq_g32": {"int4_g32"}, "gptq_g128_sym": {"int4_g64", "int4_g128"}, "gptq_desc_act": {"int4_g32"},
           "awq_g32": {"int4_g32"}, "awq_g64": {"int4_g64"}}
# max |kiln - transformers| over the logits: interpreter ~2e-7, compiled ~3e-7; 30x the worst
BOUND = 1e-5
LINEAR = "layers.0.down.weight"


def _case(case):
    ref = DATA / case / "reference.npz"
    if not ref.is_file():
        pytest.fail(f"fixture {ref} is missing (scripts/make_gptq_awq_fixtures.py)", pytrace=False)
    return DATA / case, np.load(ref)


def _linear_formats(model):
    return {w.format.name for role, w in model.weights.items() if role.startswith("layers.") and len(w.shape) == 2}


def _graph_formats(graph):
    return {v.weight.format.name for name, v in graph.weights.items() if name.startswith("layers.")
            and len(v.weight.shape) == 2}


@pytest.mark.parametrize("case", sorted(FORMATS))
def test_checkpoint_matches_the_dequantized_model(case):
    folder, ref = _case(case)
    model = hf.read(folder)
    assert _graph_formats(model.graph) == FORMATS[case]
    # what converters and LoRA merges read: the blocks, or desc_act's values in checkpoint order
    assert _linear_formats(model) == ({"f32"} if case == "gptq_desc_act" else FORMATS[case])
    assert model.source["quantization"]["method"] == case.split("_")[0]
    logits = run(model.graph, {"input_ids": ref["input_ids"]})[model.graph.outputs[0].name]
    np.testing.assert_allclose(logits, ref["logits"], rtol=0, atol=BOUND)
    # the quantization changed the model: the float fixture's logits are far from these
    base = np.load(REPO / "tests" / "data" / "fixtures" / "hf" / "llama" / "reference.npz")
    assert np.abs(base["logits"] - ref["logits"]).max() > 1e-2


@pytest.mark.parametrize("backend", ["onnxrt", "tvm"])
@pytest.mark.parametrize("case", sorted(FORMATS))
def test_compiled_checkpoint_keeps_its_blocks(case, backend, tmp_path):
    from kiln import runtime
    folder, ref = _case(case)
    model = runtime.load(kiln_compile(folder, output=tmp_path / "m.kiln", backend=backend))
    np.testing.assert_allclose(model.logits(ref["input_ids"]), ref["logits"], rtol=0, atol=BOUND)
    tokens, logits = greedy_decode(model.session, ref["prompt"], 16)
    assert tokens == ref["greedy"].tolist()
    np.testing.assert_allclose(logits, ref["greedy_logits"], rtol=0, atol=BOUND)
    stats = {p["name"]: p["stats"] for p in model.manifest["passes"]}["quant_matmul"]
    blocks = FORMATS[case] - {"f32"}
    assert {k.removeprefix("quant_matmul_") for k in stats if k.startswith("quant_matmul_")} == blocks
    assert "kept_float" not in stats
    assert model.manifest["source"]["quantization"]["method"] == case.split("_")[0]


@pytest.mark.parametrize("case", ["gptq_g32", "gptq_desc_act", "awq_g64"])
def test_convert_to_gguf_dequantizes_and_requantizes_only_when_asked(case, tmp_path):
    from kiln.frontends import gguf
    folder, ref = _case(case)
    summary = convert(folder, tmp_path / "f.gguf", to="gguf")
    assert any("dequantized to float32" in n for n in summary["notes"])
    model = gguf.read(tmp_path / "f.gguf")
    assert _linear_formats(model) == {"f32"}
    logits = run(model.graph, {"input_ids": ref["input_ids"]})[model.graph.outputs[0].name]
    np.testing.assert_allclose(logits, ref["logits"], rtol=0, atol=BOUND)
    with pytest.raises(KilnError, match="already quantized .*--requantize"):
        convert(folder, tmp_path / "q.gguf", to="gguf", quant="q4_0")
    assert not (tmp_path / "q.gguf").exists()
    convert(folder, tmp_path / "q.gguf", to="gguf", quant="q8_0", requantize=True)
    assert _linear_formats(gguf.read(tmp_path / "q.gguf")) == {"q8_0"}


def test_autogptqs_own_quantize_config_json_is_read(tmp_path):
    """AutoGPTQ's checkpoints from before transformers read them hold the config in
    quantize_config.json, without a quantization_config in config.json."""
    folder = tmp_path / "old"
    shutil.copytree(DATA / "gptq_g32", folder)
    cfg = json.loads((folder / "config.json").read_text())
    q = cfg.pop("quantization_config")
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "quantize_config.json").write_text(json.dumps({k: v for k, v in q.items() if k != "quant_method"}))
    model = hf.read(folder)
    assert _graph_formats(model.graph) == {"int4_g32"}
    # and a hub download fetches it with the folder
    from kiln.frontends.hub import FOLDER_FILES
    assert "quantize_config.json" in FOLDER_FILES
    (folder / "quantize_config.json").write_text(json.dumps({**q, "bits": 8}))
    with pytest.raises(KilnError, match=r"quantize_config.json: quantization_config bits 8"):
        hf.read(folder)


# ---- the packing, from hand-made words ----------------------------------------------------

def _raw(array, fmt):
    array = np.ascontiguousarray(array)
    return Weight(array.shape, fmt, lambda: array.view(np.uint8).reshape(-1))


def _one_layer(method, qweight, qzeros, scales, g_idx=None, group=32, fmt="gptq"):
    tensors = {"p.qweight": _raw(np.asarray(qweight, np.uint32).view(np.int32), "i32"),
               "p.qzeros": _raw(np.asarray(qzeros, np.uint32).view(np.int32), "i32"),
               "p.scales": _raw(np.asarray(scales, np.float16), "f16")}
    if g_idx is not None:
        tensors["p.g_idx"] = _raw(np.asarray(g_idx, np.int32), "i32")
    s = packed_int4.Scheme(method, group, fmt == "gptq", REPO / "config.json")
    return packed_int4.unpack(tensors, s, REPO)["p.weight"]


def test_gptq_words_pack_eight_inputs_and_zeros_minus_one():
    # K 32, N 8: input i of output j has code (i + j) % 16; word r of column j holds inputs
    # 8r..8r+7, low bits first. Zeros stored 0..7 (minus one) are 1..8.
    k, n = 32, 8
    codes = (np.arange(k)[:, None] + np.arange(n)[None, :]) % 16
    qweight = sum(codes[f::8].astype(np.uint32) << np.uint32(4 * f) for f in range(8))
    qzeros = [[sum(j << (4 * j) for j in range(8))]]
    scales = np.full((1, n), 0.5)
    for fmt, zero_add in (("gptq", 1), ("gptq_v2", 0)):
        w = _one_layer("gptq", qweight, qzeros, scales, np.zeros(k), fmt=fmt)
        assert w.format.name == "int4_g32"
        want = 0.5 * (codes.T - (np.arange(n)[:, None] + zero_add))
        np.testing.assert_array_equal(w.numpy(), want)


def test_group_size_minus_one_is_one_group_per_row():
    # K 64 under group_size -1: one scale and zero per output, stored as blocks of 64
    k, n = 64, 8
    w = _one_layer("gptq", np.full((k // 8, n), 0x99999999, np.uint32), [[0x33333333]], np.full((1, n), 0.25),
                   group=-1)
    assert w.format.name == "int4_g64"
    np.testing.assert_array_equal(w.numpy(), np.full((n, k), 0.25 * (9 - 4)))


def test_awq_words_interleave_outputs():
    # one input row, 8 outputs: the word 0x76543210 holds 0..7 in fields 0..7, field i being
    # output (0, 2, 4, 6, 1, 3, 5, 7)[i]; the zero word likewise
    k = 32
    qweight = np.full((k, 1), 0x76543210, np.uint32)
    w = _one_layer("awq", qweight, [[0x11111111]], np.ones((1, 8)), fmt="awq")
    np.testing.assert_array_equal(w.numpy()[:, 0], np.array([0, 4, 1, 5, 2, 6, 3, 7]) - 1)


def test_desc_act_groups_follow_g_idx():
    # g_idx sends input i to group i % 2 (two groups of 32 by turns): the layer's values are
    # each input scaled by its own group's scale; its blocks hold the inputs sorted by group
    # (evens, then odds), which the graph gathers x into
    k, n = 64, 8
    codes = np.arange(k) % 16
    qweight = np.tile(sum(codes[f::8].astype(np.uint32) << np.uint32(4 * f) for f in range(8))[:, None], (1, n))
    scales = np.array([[1.0] * n, [2.0] * n])
    w = _one_layer("gptq", qweight, np.full((2, 1), 0x77777777, np.uint32), scales, g_idx=np.arange(k) % 2,
                   fmt="gptq_v2")
    assert w.format.name == "f32"
    want = np.where(np.arange(k) % 2, 2.0, 1.0) * (codes - 7)
    np.testing.assert_array_equal(w.numpy()[0], want)
    order = np.r_[np.arange(0, k, 2), np.arange(1, k, 2)]
    blocks = w.sorted_blocks
    assert blocks.format.name == "int4_g32" and (blocks.input_order == order).all()
    np.testing.assert_array_equal(blocks.numpy(), w.numpy()[:, order])
    # groups of 31 and 33 inputs: no block holds one group alone, so the layer is float32 only
    uneven = (np.arange(k) >= 31).astype(int)
    w = _one_layer("gptq", qweight, np.full((2, 1), 0x77777777, np.uint32), scales, g_idx=uneven, fmt="gptq_v2")
    assert w.format.name == "f32" and getattr(w, "sorted_blocks", None) is None


def test_desc_act_layers_reading_one_input_share_one_gather():
    model = hf.read(DATA / "gptq_desc_act")
    gathers = [n for n in model.graph.nodes if n.op == "Gather" and n.name.endswith("input_order")]
    # per layer: q/k/v's input, o's, gate/up's and down's
    assert len(gathers) == 4 * model.config["num_layers"]


# ---- what kiln refuses --------------------------------------------------------------------

def _copy(tmp_path, case="gptq_g32", config=None, drop=(), reshape=None):
    dst = tmp_path / case
    shutil.copytree(DATA / case, dst)
    if config:
        cfg = json.loads((dst / "config.json").read_text())
        cfg["quantization_config"] = {**cfg["quantization_config"], **config}
        cfg["quantization_config"] = {k: v for k, v in cfg["quantization_config"].items() if v is not None}
        (dst / "config.json").write_text(json.dumps(cfg))
    if drop or reshape:
        f = dst / "model.safetensors"
        tensors = dict(read_safetensors(f).tensors)
        tensors = {name: w for name, w in tensors.items() if name not in drop}
        if reshape:
            name, shape = reshape
            w = tensors[name]
            data = w.raw().reshape(-1)[:int(np.prod(shape)) * w.format.type_size]
            tensors[name] = Weight(shape, w.format, lambda d=data: d)
        staged = tmp_path / "staged.safetensors"
        write_safetensors(staged, [(n, tensors[n]) for n in sorted(tensors)])
        staged.replace(f)
    return dst


@pytest.mark.parametrize("edit, message", [
    (dict(config={"bits": 3}), r"config.json: quantization_config bits 3: kiln reads 4-bit GPTQ"),
    (dict(config={"bits": 8}), r"quantization_config bits 8: kiln reads 4-bit GPTQ"),
    (dict(config={"quant_method": "bitsandbytes"}), r"quant_method 'bitsandbytes' is not supported"),
    (dict(config={"group_size": "32"}), r"group_size '32' is not a positive whole number or -1"),
    (dict(config={"checkpoint_format": "marlin"}), r"checkpoint_format 'marlin' is not supported"),
    (dict(case="awq_g32", config={"version": "gemv"}), r"version 'gemv': kiln reads AWQ's GEMM layout"),
    (dict(case="awq_g32", config={"zero_point": False}), r"zero_point is false"),
    (dict(drop=("model.layers.1.mlp.up_proj.scales",)),
     r"tensor model.layers.1.mlp.up_proj.scales is missing \(every GPTQ layer stores qweight, qzeros, scales\)"),
    (dict(reshape=("model.layers.0.self_attn.q_proj.scales", (1, 64))),
     r"model.safetensors: model.layers.0.self_attn.q_proj: scales has shape \[1, 64\]; .* needs \[2, 64\]"),
    (dict(case="awq_g32", reshape=("model.layers.0.mlp.down_proj.qweight", (64, 8))),
     r"down_proj: scales has shape \[4, 64\]; the AWQ qweight \[64, 8\] with group_size 32 needs \[2, 64\]"),
])
def test_unsupported_checkpoints_are_one_line_errors(tmp_path, edit, message):
    folder = _copy(tmp_path, **edit)
    with pytest.raises(KilnError, match=message):
        hf.read(folder)
    p = subprocess.run([sys.executable, "-m", "kiln.cli", "compile", str(folder), "-o", str(tmp_path / "m.kiln")],
                       capture_output=True, text=True)
    assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    assert str(folder.name) in p.stderr and not (tmp_path / "m.kiln").exists()


@pytest.mark.parametrize("name", sorted(int4_group.NAMES))
def test_int4_group_codec_reads_scale_zero_and_nibbles(name):
    """Random blocks (positive half scales, as the libraries write them; zeros 0..16): the codec
    is scale · (code − zero) bit for bit, with the block's first half of codes in the low
    nibbles. (A negative scale would give +0 where this formula gives −0: the layout computes
    scale·code − scale·zero.)"""
    fmt = formats.get(name)
    rng = np.random.default_rng(7)
    raw = rng.integers(0, 256, (6, fmt.type_size), dtype=np.uint8)
    raw[:, :2] = rng.uniform(1e-4, 0.05, (6, 1)).astype(np.float16).view(np.uint8)
    raw[:, 2] = rng.integers(0, 17, 6)
    scale = raw[:, :2].copy().view(np.float16).astype(np.float32)
    nibbles = raw[:, 3:]
    codes = np.concatenate([nibbles & 15, nibbles >> 4], axis=1).astype(np.float32)
    want = scale * (codes - raw[:, 2:3].astype(np.float32))
    assert (fmt.dequantize_blocks(raw).view(np.uint32) == want.view(np.uint32)).all()
    assert (fmt.dequantize_blocks(int4_group.encode(codes.astype(np.uint8), scale[:, 0], raw[:, 2])) == want).all()


@pytest.mark.parametrize("name", sorted(int4_group.NAMES))
def test_int4_group_quantizer_rounds_to_the_nearest_step(name):
    """kiln makes these blocks only for tests: round to nearest over each block's [min, max]."""
    fmt = formats.get(name)
    values = np.random.default_rng(8).standard_normal((3, 2 * fmt.block_size)).astype(np.float32)
    got = Weight.from_array(values, name).numpy()
    step = (np.ptp(values.reshape(-1, fmt.block_size), axis=1) / 15).repeat(fmt.block_size).reshape(values.shape)
    # half a step, or a whole one where the rounded zero pushes an end code past 0..15
    err = np.abs(got - values)
    assert (err <= 1.01 * step).all() and np.median(err / step) < 0.3


# ---- desc_act where the graph's matrices are read back as the checkpoint's ----------------

def test_desc_act_onnx_export_reads_back_in_checkpoint_order(tmp_path):
    """An export's initializers are read back by role: it holds the layers in checkpoint order."""
    folder, ref = _case("gptq_desc_act")
    convert(folder, tmp_path / "onnx", to="onnx", onnx_layout="kiln")
    model = load_model(tmp_path / "onnx")
    logits = run(model.graph, {"input_ids": ref["input_ids"]})[model.graph.outputs[0].name]
    np.testing.assert_allclose(logits, ref["logits"], rtol=0, atol=BOUND)


def test_desc_act_importance_matrix_is_in_checkpoint_order(tmp_path):
    from kiln.frontends import gguf
    from kiln.imatrix import collect
    folder, _ = _case("gptq_desc_act")
    convert(folder, tmp_path / "f.gguf", to="gguf")
    ids = np.random.default_rng(9).integers(0, 256, 64).tolist()
    got = collect(hf.read(folder), ids, ctx=32)
    want = collect(gguf.read(tmp_path / "f.gguf"), ids, ctx=32)
    assert got.entries.keys() == want.entries.keys()
    for name in want.entries:
        np.testing.assert_allclose(got.entries[name].sums, want.entries[name].sums, rtol=1e-5)


def test_desc_act_requantized_at_compile_time_in_checkpoint_order(tmp_path):
    """--quant requantizes the layer's values in checkpoint order, as from the float GGUF: the
    same blocks of 32 (over the sorted inputs they would be other blocks)."""
    from kiln import runtime
    folder, ref = _case("gptq_desc_act")
    convert(folder, tmp_path / "f.gguf", to="gguf")
    outs = []
    for src, name in ((folder, "a.kiln"), (tmp_path / "f.gguf", "b.kiln")):
        model = runtime.load(kiln_compile(src, output=tmp_path / name, backend="onnxrt", quant="q4_0", requantize=True))
        assert {p["name"]: p["stats"] for p in model.manifest["passes"]}["quant_matmul"] == {"quant_matmul_q4_0": 9}     # with lm_head
        outs.append(model.logits(ref["input_ids"]))
    np.testing.assert_allclose(outs[0], outs[1], rtol=0, atol=1e-6)
