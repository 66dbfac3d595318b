"""ONNX as a conversion target: a standalone KV-cache model that ONNX Runtime runs."""
import json

import numpy as np
import onnx
import onnxruntime as ort

from kiln.driver import convert


def test_onnx_export_runs_in_onnxruntime_with_kv_cache(hf_fixture, tmp_path):
    src = hf_fixture("qwen2")
    out = tmp_path / "qwen2-onnx"
    convert(src, out, to="onnx", onnx_layout="kiln")
    onnx.checker.check_model(str(out / "model.onnx"))
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert m.ir_version <= 13
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer if t.name.endswith((".weight", ".weight.T")))
    io = json.loads((out / "kiln_io.json").read_text())
    assert "past_key.0" in io["inputs"] and "present_value.1" in io["outputs"]
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    # kiln_io.json lists exactly what the model takes
    assert sorted(io["inputs"]) == sorted(i.name for i in sess.get_inputs())
    ref = np.load(src / "reference.npz")
    empty = {i.name: np.zeros((1, 4, 0, 16), np.float32) for i in sess.get_inputs() if i.name.startswith("past")}
    names = [o.name for o in sess.get_outputs()]
    feeds = {**empty, "input_ids": ref["prompt"]}
    tokens, logits = [], []
    for _ in range(16):
        last = np.array([[feeds["input_ids"].shape[1] - 1]])        # the logits of the last position only
        outs = dict(zip(names, sess.run(None, {**feeds, "logits_positions": last})))
        logits.append(outs[names[0]][0, -1])
        t = int(np.argmax(logits[-1]))
        tokens.append(t)
        feeds = {k: outs["present" + k[4:]] for k in empty} | {"input_ids": np.array([[t]])}
    assert tokens == ref["greedy"].tolist()
    # every step's logits: measured 1.8e-7 (logits ~0.75), as the compiled artifact; bound ~10x
    np.testing.assert_allclose(np.stack(logits), ref["greedy_logits"], rtol=0, atol=2e-6)


def test_inspect_reads_every_format(hf_fixture, tmp_path, capsys):
    from kiln.cli import main
    src = hf_fixture("llama")
    convert(src, tmp_path / "m.gguf", to="gguf", quant="q8_0")
    convert(src, tmp_path / "m.safetensors", to="safetensors")
    for path, words in ((src, "Hugging Face folder"), (tmp_path / "m.gguf", "q8_0"),
                        (tmp_path / "m.safetensors", "safetensors")):
        assert main(["inspect", str(path)]) == 0
        out = capsys.readouterr().out
        assert words in out and "tensors" in out
    gguf_out = (main(["inspect", str(tmp_path / "m.gguf")]), capsys.readouterr().out)[1]
    assert "llama.block_count" in gguf_out and "tokenizer" in gguf_out


def test_inspect_takes_known_model_names(smollm2_gguf, capsys):
    from kiln.cli import main
    assert main(["inspect", "smollm2"]) == 0
    out = capsys.readouterr().out
    assert "GGUF v3" in out and "q4_1" in out and "49152 tokens" in out


def test_onnx_export_of_a_mixture_of_experts(tmp_path):
    """A MoE model exports in standard ONNX ops (the op decomposed) and matches transformers."""
    from pathlib import Path
    src = Path(__file__).resolve().parent / "data" / "hf_variants" / "qwen2_moe"
    out = tmp_path / "moe-onnx"
    convert(src, out, to="onnx", onnx_layout="kiln")
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert {n.op_type for n in m.graph.node} >= {"TopK"} and "MoE" not in {n.op_type for n in m.graph.node}
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    ref = np.load(src / "reference.npz")
    empty = {i.name: np.zeros((2, 2, 0, 8), np.float32) for i in sess.get_inputs() if i.name.startswith("past")}
    ids = ref["input_ids"]
    positions = np.tile(np.arange(ids.shape[1]), (ids.shape[0], 1))
    logits = sess.run(None, {**empty, "input_ids": ids, "logits_positions": positions})[0]
    np.testing.assert_allclose(logits, ref["logits"], rtol=0, atol=4e-5)
