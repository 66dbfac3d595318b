"""Attention fusion after the KV pass, and its lowering to GroupQueryAttention."""
import numpy as np
import onnxruntime as ort
import pytest
from conftest import REPO

from kiln.frontends import hf
from kiln.interp import Interpreter
from kiln.passes.attention import fuse_attention
from kiln.passes.dce import dce
from kiln.passes.kv_cache import insert_kv_cache
from kiln.passes.rotary import fuse_rotary
from kiln.targets import onnxrt
from kiln.verify import verify

VARIANTS = REPO / "tests" / "data" / "hf_variants"

# Max |logits - transformers'| per model, measured over the interpreter, ORT and decomposed
# paths: llama 2.1e-7, gpt2 1.8e-7 (logits ~0.5), mistral_sliding 2.7e-6, qwen3 1.8e-6,
# llama_mqa 3.4e-6 (logits ~3), gemma2 2.6e-6 (logits ~1.5; ORT's tanh in the soft cap),
# gemma3 1.4e-5 (logits ~6.6). Bound ~10x each (gemma3: ~3x, the variants' 4e-5).
BOUND = {"llama": 3e-6, "gpt2": 2e-6, "mistral_sliding": 3e-5, "qwen3": 2e-5, "llama_mqa": 4e-5,
         "gemma2": 3e-5, "gemma3": 4e-5, "gpt_oss": 4e-5}


def _cached_graph(path, head_dim_multiple=8):
    model = hf.read(path)
    g = model.graph
    insert_kv_cache(g)
    fuse_rotary(g)
    r = fuse_attention(g, head_dim_multiple=head_dim_multiple)
    dce(g)
    verify(g)
    return model, g, r


def _chunks(run, cfg, ids, splits):
    """Run ids in pieces ending at ``splits`` through the cache; the pieces' logits joined."""
    past = {f"past_{k}.{i}": np.zeros((ids.shape[0], cfg["num_kv_heads"], 0, cfg["head_dim"]), np.float32)
            for i in range(cfg["num_layers"]) for k in ("key", "value")}
    logits, start = [], 0
    for end in list(splits) + [ids.shape[1]]:
        out = run({**past, "input_ids": ids[:, start:end]})
        past = {k: out["present" + k[4:]] for k in past}
        logits.append(out["logits"])
        start = end
    return np.concatenate(logits, axis=1)


@pytest.mark.parametrize("name", ["llama", "gpt2", "mistral_sliding", "qwen3", "llama_mqa", "gemma2", "gemma3"])
def test_fused_attention_in_interpreter_and_onnxruntime(hf_fixture, name, tmp_path):
    path = VARIANTS / name if (VARIANTS / name).is_dir() else hf_fixture(name)
    ref = np.load(path / "reference.npz")
    model, g, r = _cached_graph(path)
    assert r.stats == {"attention": model.config["num_layers"]}
    assert [v.name for v in g.outputs[1:3]] == ["present_key.0", "present_value.0"]
    assert not any(n.op == "Softmax" for n in g.nodes)
    it = Interpreter(g)
    interp = _chunks(lambda feeds: it.run(feeds, None), model.config, ref["input_ids"], [5])
    np.testing.assert_allclose(interp, ref["logits"], rtol=0, atol=BOUND[name])
    # the growing cache, fed by hand (the preallocated layout is tests/test_kv_shared.py's)
    onnxrt.lower(g, tmp_path, kv_layout="concat")
    sess = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]

    def run_ort(feeds):
        b, n = feeds["input_ids"].shape
        every = np.broadcast_to(np.arange(n), (b, n))                # logits of every position
        return dict(zip(names, sess.run(None, {**feeds, "logits_positions": every})))
    # one row in two chunks (the second continues a cache); a batch of two, prefilled then
    # token by token (ORT's kernel takes several new tokens over a cache only for one row)
    ids = ref["input_ids"]
    np.testing.assert_allclose(_chunks(run_ort, model.config, ids[:1], [5]), ref["logits"][:1], rtol=0, atol=BOUND[name])
    np.testing.assert_allclose(_chunks(run_ort, model.config, ids, range(5, 12)), ref["logits"], rtol=0, atol=BOUND[name])


@pytest.mark.parametrize("name, windows, softcap", [("gemma2", [4, 0], 2.0), ("gemma3", [4, 0], 0.0),
                                                    ("mistral_sliding", [4, 4], 0.0)])
def test_each_layer_keeps_its_window_and_soft_cap(name, windows, softcap):
    """gemma2/3 mix sliding and global layers: each fused attention takes its own layer's mask
    window, and gemma2's soft cap on the scores moves into the op."""
    _, g, _ = _cached_graph(VARIANTS / name)
    atts = [n for n in g.nodes if n.op == "Attention"]
    assert [n.attrs["window"] for n in atts] == windows
    assert {n.attrs["softcap"] for n in atts} == {softcap}
    assert not any("softcap_scores" in n.name for n in g.nodes)       # the builder's cap, fused away


def test_head_sizes_the_kernel_cannot_take_stay_in_primitives():
    _, g, r = _cached_graph(VARIANTS / "llama_f16")          # head size 12
    assert r.stats == {"refused": 2} and any(n.op == "Softmax" for n in g.nodes)


def test_runtime_session_continues_a_batch_over_its_cache(hf_fixture, compiled_family):
    from kiln import runtime
    folder = hf_fixture("llama")
    ref = np.load(folder / "reference.npz")
    model = runtime.load(compiled_family("llama"))
    assert {p["name"]: p["stats"] for p in model.manifest["passes"]}["attention"] == {"attention": 2}
    sess = model.session
    sess.reset(2)
    first = sess.forward(ref["input_ids"][:, :5])
    rest = sess.forward(ref["input_ids"][:, 5:])
    np.testing.assert_allclose(np.concatenate([first, rest], axis=1), ref["logits"], rtol=0, atol=BOUND["llama"])


def test_sinks_move_into_the_fused_attention():
    """gpt-oss's sink column (Concat before the softmax, Slice after) becomes the Attention op's
    sixth input, the layer's sinks weight; the fused graph, through the cache in two chunks,
    computes transformers' logits."""
    model, g, r = _cached_graph(VARIANTS / "gpt_oss")
    assert r.stats == {"attention": 2}
    atts = [n for n in g.nodes if n.op == "Attention"]
    assert [n.inputs[5].name for n in atts] == ["layers.0.sinks", "layers.1.sinks"]
    assert [n.attrs["window"] for n in atts] == [4, 0]
    assert not any(n.op == "Slice" and "probs" in n.name for n in g.nodes)
    ref = np.load(VARIANTS / "gpt_oss" / "reference.npz")
    it = Interpreter(g)
    got = _chunks(lambda feeds: it.run(feeds, None), model.config, ref["input_ids"], [5])
    np.testing.assert_allclose(got, ref["logits"], rtol=0, atol=BOUND["gpt_oss"])


@pytest.mark.parametrize("name", ["mistral_sliding", "llama_mqa", "gemma2", "gpt_oss"])
def test_decomposition_computes_the_same(name):
    from kiln.passes.attention import decompose
    path = VARIANTS / name
    ref = np.load(path / "reference.npz")
    model, g, _ = _cached_graph(path)
    assert decompose(g).stats == {"decomposed": model.config["num_layers"]}
    dce(g)
    verify(g)
    assert [v.name for v in g.outputs[1:3]] == ["present_key.0", "present_value.0"]
    it = Interpreter(g)
    got = _chunks(lambda feeds: it.run(feeds, None), model.config, ref["input_ids"], [5])
    np.testing.assert_allclose(got, ref["logits"], rtol=0, atol=BOUND[name])
