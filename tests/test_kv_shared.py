"""The copy-free KV cache on ONNX Runtime (targets/kv_plan.py, runtime/onnxrt_session.py):
one preallocated buffer per layer updated in place, a length per batch row, ragged prefill.

The growing (concatenating) layout is the reference here: it is checked against transformers
in tests/test_hf_families.py, and the shared layout must compute the same numbers."""
import json
import shutil

import numpy as np
import pytest

from conftest import HF_FIXTURES, greedy_tokens
from kiln.driver import compile as kiln_compile
from kiln.driver import load_model, pipeline
from kiln.passes_base import run_passes
from kiln.targets import kv_plan

VARIANTS = HF_FIXTURES.parent.parent / "hf_variants"
# both layouts run float32 attention over the same numbers; measured differences are <= 5e-7
SAME = 5e-6


def _graph(folder):
    graph, _ = run_passes(load_model(folder).graph, pipeline("onnxrt"))
    return graph


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("kv")
    return tuple(kiln_compile(HF_FIXTURES / "llama", output=root / f"{layout}.kiln", kv_layout=layout, backend="onnxrt")
                 for layout in ('shared', 'concat'))


def _load(path):
    from kiln import runtime
    return runtime.load(path)


@pytest.mark.parametrize("folder, reason", [
    (HF_FIXTURES / "gpt2", "lm_head makes a graph output from the cache length"),  # learned positions
    (VARIANTS / "phi3_longrope", "change with the sequence length"),        # longrope's switch
    (HF_FIXTURES / "mistral", "head size 8 is not a multiple of 16"),       # ORT's rotary kernel
])
def test_plan_refuses_what_the_shared_layout_cannot_compute(folder, reason):
    plan, why = kv_plan.plan(_graph(folder), 128)
    assert plan is None and reason in why


def test_plan_tables_are_the_rotary_tables_of_every_position():
    plan, why = kv_plan.plan(_graph(HF_FIXTURES / "llama"), 128)
    assert why == "" and plan.max_length == 128
    assert len(plan.rotations) == 4                   # q and k of both layers
    [(cos, sin)] = plan.tables.values()
    cfg = json.loads((HF_FIXTURES / "llama" / "config.json").read_text())
    inv = 1.0 / (cfg.get("rope_theta", 10000.0) ** (np.arange(0, 16, 2, dtype=np.float32) / 16))
    angles = np.arange(128, dtype=np.float32)[:, None] * inv[None].astype(np.float32)
    np.testing.assert_allclose(cos, np.cos(angles), atol=2e-6)
    np.testing.assert_allclose(sin, np.sin(angles), atol=2e-6)


def test_manifest_names_the_layout(llama_pair):
    shared, concat = (json.loads((p / "manifest.json").read_text())["backend"] for p in llama_pair)
    assert shared["kv_cache"]["layout"] == 'shared' and shared["max_length"] == 128
    assert concat["kv_cache"]["layout"] == "concat" and concat["kv_layout_reason"] == "asked for the growing layout"


def test_shared_layout_equals_the_growing_one(llama_pair):
    shared, concat = (_load(p) for p in llama_pair)
    ref = np.load(HF_FIXTURES / "llama" / "reference.npz")
    np.testing.assert_allclose(shared.logits(ref["input_ids"]), concat.logits(ref["input_ids"]), rtol=0, atol=SAME)
    assert greedy_tokens(shared.session, ref["prompt"][0], 16) == ref["greedy"].tolist()
    # decode steps, batch of two, compared step by step
    for m in (shared, concat):
        m.session.reset(2)
    ids = ref["input_ids"]
    a = shared.session.forward(ids[:, :5])
    b = concat.session.forward(ids[:, :5])
    for i in range(5, 12):
        a = np.concatenate([a, shared.session.forward(ids[:, i:i + 1])], axis=1)
        b = np.concatenate([b, concat.session.forward(ids[:, i:i + 1])], axis=1)
    np.testing.assert_allclose(a, b, rtol=0, atol=SAME)
    np.testing.assert_allclose(a, ref["logits"], rtol=0, atol=3e-6)


def test_buffers_stay_put_between_decode_steps(llama_pair):
    s = _load(llama_pair[0]).session
    s.reset(1)
    s.forward(np.array([[1, 2, 3]]))
    before = {k: v.data_ptr() for k, v in s.buffers.items()}
    for t in range(20):
        s.forward(np.array([[t + 4]]), last_only=True)
    assert {k: v.data_ptr() for k, v in s.buffers.items()} == before
    assert s.lengths.tolist() == [23] and s.capacity == 256 or s.capacity == 128


def test_capacity_grows_without_changing_results(llama_pair, monkeypatch):
    from kiln.runtime import onnxrt_session
    monkeypatch.setattr(onnxrt_session, "INITIAL_CAPACITY", 4)
    shared, concat = (_load(p) for p in llama_pair)
    ids = np.arange(3, 43)[None]
    shared.session.reset(1)
    assert shared.session.capacity == 4
    steps = [shared.session.forward(ids[:, :3])] + [shared.session.forward(ids[:, i:i + 1]) for i in range(3, 40)]
    assert shared.session.capacity == 64
    np.testing.assert_allclose(np.concatenate(steps, axis=1), concat.logits(ids), rtol=0, atol=SAME)


def test_growth_during_a_ragged_batch_keeps_every_row(llama_pair, monkeypatch):
    from kiln.runtime import onnxrt_session
    monkeypatch.setattr(onnxrt_session, "INITIAL_CAPACITY", 4)
    shared = _load(llama_pair[0])
    prompts = [[5, 9, 200], [12, 40, 41, 42, 43, 44], [7]]
    together = shared.generate(prompts, max_new_tokens=20)            # 26 tokens: 4 -> 8 -> 16 -> 32
    assert shared.session.capacity == 32
    for p, r in zip(prompts, together):
        assert r.ids == shared.generate(p, max_new_tokens=20).ids
    concat = _load(llama_pair[1])
    assert [r.ids for r in together] == [concat.generate(p, max_new_tokens=20).ids for p in prompts]


def test_ragged_prefill_equals_each_prompt_alone(llama_pair):
    shared = _load(llama_pair[0])
    prompts = [[5, 9, 200, 17, 4, 88, 31], [12], [7, 7, 7, 250]]
    s = shared.session
    s.reset(3)
    last = s.prefill(prompts)
    assert last.shape == (3, 1, 256) and s.lengths.tolist() == [7, 1, 4]
    for b, p in enumerate(prompts):
        np.testing.assert_allclose(last[b, 0], shared.logits([p])[0, -1], rtol=0, atol=SAME)
    # generate() runs them as one batch, and each row gets its alone-result
    together = shared.generate(prompts, max_new_tokens=10)
    for p, r in zip(prompts, together):
        assert r.ids == shared.generate(p, max_new_tokens=10).ids


def test_prefill_of_logits_for_the_last_position_only(llama_pair):
    shared = _load(llama_pair[0])
    s = shared.session
    s.reset(2)
    ids = np.load(HF_FIXTURES / "llama" / "reference.npz")["input_ids"]
    last = s.forward(ids, last_only=True)
    assert last.shape == (2, 1, 256)
    np.testing.assert_allclose(last[:, 0], shared.logits(ids)[:, -1], rtol=0, atol=SAME)


def test_max_length_is_enforced(llama_pair):
    s = _load(llama_pair[0]).session
    s.reset(1)
    s.forward(np.zeros((1, 120), dtype=np.int64))
    with pytest.raises(ValueError, match="would hold 130 tokens but this artifact holds at most 128"):
        s.forward(np.zeros((1, 10), dtype=np.int64))


def test_sliding_window_on_the_shared_layout(tmp_path):
    # the llama fixture as a mistral with a window of 4 (head size 16, so the shared layout fits)
    folder = tmp_path / "mistral16"
    shutil.copytree(HF_FIXTURES / "llama", folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=4)
    (folder / "config.json").write_text(json.dumps(cfg))
    shared = _load(kiln_compile(folder, output=tmp_path / "s.kiln", kv_layout='shared', backend="onnxrt"))
    concat = _load(kiln_compile(folder, output=tmp_path / "c.kiln", kv_layout="concat", backend="onnxrt"))
    ids = np.arange(10, 30)[None]
    np.testing.assert_allclose(shared.logits(ids), concat.logits(ids), rtol=0, atol=SAME)
    # and both against the reference interpreter on the builder's own windowed mask, over a
    # prefill and decode steps (a window off by one in the lowering moves these by ~1)
    from kiln.interp import run
    graph = load_model(folder).graph
    want = run(graph, {"input_ids": ids})[graph.outputs[0].name]
    s = shared.session
    s.reset(1)
    steps = [s.forward(ids[:, :7])] + [s.forward(ids[:, i:i + 1]) for i in range(7, 20)]
    np.testing.assert_allclose(np.concatenate(steps, axis=1), want, rtol=0, atol=3e-6)
    full = _load(kiln_compile(HF_FIXTURES / "llama", output=tmp_path / "f.kiln", backend="onnxrt"))
    assert np.abs(shared.logits(ids) - full.logits(ids)).max() > 1e-3       # the window matters
    assert shared.generate(list(range(10, 16)), max_new_tokens=12).ids == \
        concat.generate(list(range(10, 16)), max_new_tokens=12).ids


def test_smollm2_uses_the_shared_layout_and_keeps_its_tokens(smollm2_gguf, tmp_path):
    art = kiln_compile(smollm2_gguf, output=tmp_path / "s.kiln", backend="onnxrt")
    backend = json.loads((art / "manifest.json").read_text())["backend"]
    assert backend["kv_cache"]["layout"] == 'shared' and backend["max_length"] == 8192
    ref = json.loads((HF_FIXTURES.parent / "smollm2" / "reference.json").read_text())
    model = _load(art)
    prompts = [g["prompt_ids"] for g in ref["generations"]]
    eos = model.tokenizer.eos_ids
    for g in ref["generations"]:
        assert greedy_tokens(model.session, g["prompt_ids"], 32, banned=eos) == g["greedy_ids"]
    # the three prompts (different lengths) as one ragged batch
    results = model.generate(prompts, max_new_tokens=8)
    # the chat answer ends at <|im_end|> after 7 tokens (the reference banned EOS to go on)
    assert [r.ids for r in results] == [g["greedy_ids"][:n] for g, n in zip(ref["generations"], (8, 8, 7))]
    assert [r.finish_reason for r in results] == ["length", "length", "eos"]


def test_merged_qkv_reaches_the_attention_packed(llama_pair):
    import onnx
    shared, concat = (onnx.load(p / "model.onnx", load_external_data=False).graph for p in llama_pair)
    gqa = [n for n in shared.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 2 and all(list(n.input[1:3]) == ["", ""] for n in gqa)
    assert [n.input[0] for n in gqa] == ["layers.0.q_k_v", "layers.1.q_k_v"]   # the merged projection
    # the growing layout rotates q and k outside the kernel, so they stay apart there
    assert all(n.input[1] != "" for n in concat.node if n.op_type == "GroupQueryAttention")
