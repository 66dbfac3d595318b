"""KV-cache insertion: structure of the rewritten graph and equality with the full-sequence graph."""
import numpy as np

from kiln.frontends import hf
from kiln.interp import Interpreter, run
from kiln.passes.dce import dce
from kiln.passes.kv_cache import insert_kv_cache, match_attention
from kiln.verify import verify


def test_inserts_past_and_present_per_layer(hf_fixture):
    g = hf.read(hf_fixture("llama")).graph
    result = insert_kv_cache(g)
    assert result.changed and result.stats == {"attention_layers": 2}
    verify(g)
    names = [v.name for v in g.inputs]
    assert names == ["input_ids", "past_key.0", "past_value.0", "past_key.1", "past_value.1"]
    assert [v.name for v in g.outputs[1:]] == ["present_key.0", "present_value.0", "present_key.1", "present_value.1"]
    # cached keys are stored before GQA repetition: 2 kv heads, not 4 query heads
    assert g.inputs[1].type.shape == ("batch", 2, "past", 16)
    assert not insert_kv_cache(g).changed          # idempotent


def test_refuses_softmax_that_is_not_attention():
    from kiln.ir import Graph
    g = Graph()
    x = g.add_input("x", "float32", (2, 3))
    g.outputs = [g.add_node("Softmax", [x], {"axis": -1})[0]]
    r = insert_kv_cache(g)
    assert not r.changed and r.stats == {"refused": 1}


def test_prefill_then_decode_equals_full_sequence(hf_fixture):
    folder = hf_fixture("qwen2")
    ref = np.load(folder / "reference.npz")
    full = hf.read(folder).graph
    want = run(full, {"input_ids": ref["input_ids"]})[full.outputs[0].name]
    g = hf.read(folder).graph
    insert_kv_cache(g)
    dce(g)
    verify(g)
    it = Interpreter(g)
    L = 2
    feeds = {f"past_{k}.{i}": np.zeros((2, 4, 0, 16), np.float32) for i in range(L) for k in ("key", "value")}
    got = []
    # prefill 5 tokens, then one token at a time
    chunks = [ref["input_ids"][:, :5]] + [ref["input_ids"][:, i:i + 1] for i in range(5, 12)]
    for ids in chunks:
        out = it.run({**feeds, "input_ids": ids}, None)
        got.append(out[g.outputs[0].name])
        feeds = {f"past_{k}.{i}": out[f"present_{k}.{i}"] for i in range(L) for k in ("key", "value")}
    # measured 2.1e-7 (logits up to 0.75); bound ~10x
    np.testing.assert_allclose(np.concatenate(got, axis=1), want, rtol=0, atol=2e-6)


def test_matcher_finds_keys_before_repetition(hf_fixture):
    g = hf.read(hf_fixture("mistral")).graph
    soft = [n for n in g.nodes if n.op == "Softmax"]
    k, v = match_attention(soft[0])
    assert k.type.shape[1] == 2 and v.type.shape[1] == 2      # kv heads
