"""Rotary fusion: the expected graph, the same numbers in the interpreter and in ORT, decomposition."""
import numpy as np
import onnxruntime as ort
import pytest
from conftest import REPO

from kiln.frontends import hf
from kiln.interp import run
from kiln.passes.dce import dce
from kiln.passes.kv_cache import insert_kv_cache
from kiln.passes.rotary import decompose, fuse_rotary
from kiln.targets import onnxrt
from kiln.verify import verify

VARIANTS = REPO / "tests" / "data" / "hf_variants"
# Fused and decomposed graphs against the unfused one: measured 0 (the same float32 operations);
# bound 1e-6, about 4 float32 ulps at these logits' magnitude (up to ~3.3).
SAME = 1e-6


@pytest.mark.parametrize("folder", ["llama", "gemma", "qwen2_yarn", "phi3_longrope"])
def test_fuses_q_and_k_and_keeps_numbers(hf_fixture, folder):
    path = VARIANTS / folder if (VARIANTS / folder).is_dir() else hf_fixture(folder)
    g = hf.read(path).graph
    ref = np.load(path / "reference.npz")
    before = run(g, {"input_ids": ref["input_ids"]})[g.outputs[0].name]
    assert fuse_rotary(g).stats == {"rotary": 4}
    dce(g)
    verify(g)
    assert not any(n.op == "Neg" for n in g.nodes)
    # one pair of half tables serves every layer
    assert sum(n.op == "Cos" for n in g.nodes) == 1
    np.testing.assert_allclose(run(g, {"input_ids": ref["input_ids"]})[g.outputs[0].name], before, rtol=0, atol=SAME)
    decompose(g)
    verify(g)
    np.testing.assert_allclose(run(g, {"input_ids": ref["input_ids"]})[g.outputs[0].name], before, rtol=0, atol=SAME)


def test_partial_rotary_fuses_the_rotated_slice():
    path = VARIANTS / "phi3_partial_rotary"
    g = hf.read(path).graph
    ref = np.load(path / "reference.npz")
    assert fuse_rotary(g).stats == {"rotary": 4}
    dce(g)
    rot = [n for n in g.nodes if n.op == "Rotary"]
    assert all(n.inputs[0].producer.op == "Slice" for n in rot)      # the rotated part of each head
    # against transformers: measured 1.8e-6 (logits ~3.4); bound ~10x
    np.testing.assert_allclose(run(g, {"input_ids": ref["input_ids"]})[g.outputs[0].name], ref["logits"], rtol=0, atol=2e-5)


def test_ort_rotary_embedding_matches_for_a_batch_with_a_cache(hf_fixture, tmp_path):
    folder = hf_fixture("mistral")
    ref = np.load(folder / "reference.npz")
    g = hf.read(folder).graph
    insert_kv_cache(g)
    fuse_rotary(g)
    dce(g)
    onnxrt.lower(g, tmp_path, kv_layout="concat")                   # the growing cache, fed by hand
    sess = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    past = {i.name: np.zeros((2, 2, 0, 8), np.float32) for i in sess.get_inputs() if i.name.startswith("past")}
    ids = ref["input_ids"]

    def every(n):                                                   # logits of every position
        return np.broadcast_to(np.arange(n), (2, n))
    first = dict(zip(names, sess.run(None, {**past, "input_ids": ids[:, :7], "logits_positions": every(7)})))
    rest = dict(zip(names, sess.run(None, {**{k: first["present" + k[4:]] for k in past}, "input_ids": ids[:, 7:],
                                           "logits_positions": every(5)})))
    got = np.concatenate([first[names[0]], rest[names[0]]], axis=1)
    # against transformers: measured 1.9e-7 (logits ~0.5); bound ~10x
    np.testing.assert_allclose(got, ref["logits"], rtol=0, atol=2e-6)
