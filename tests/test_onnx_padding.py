"""kiln's ONNX export in optimum's layout reads ``attention_mask`` and ``position_ids``
(kiln.passes.padded_batch): a left-padded batch gives each row's real tokens the logits of its
prompt run alone, through a prefill and a decode step with past_key_values, in a plain
onnxruntime InferenceSession as optimum's callers run it; transformers' logits for that batch
(tests/data/padded_batch/, from scripts/make_padded_batch_reference.py); and optimum's own
export of the fixture given the same padded batch.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

OPTIMUM = Path(__file__).parent / "data" / "onnx_optimum"
TRANSFORMERS = Path(__file__).parent / "data" / "padded_batch"
PROMPTS = [[5, 9, 13, 2, 7, 30, 11], [17, 3, 8]]
NEXT = [[21], [4]]
# measured: padded rows equal the lone prompt's to the bit (0.0) for every family; kiln's
# export against transformers' at most 1.5e-7 and against optimum's at most 1.8e-7 (float32
# rounding of two graphs)
BOUND = 1e-4


def _export(src, out, *flags):
    r = subprocess.run([sys.executable, "-m", "kiln.cli", "convert", str(src), str(out), "--to", "onnx", "-q", *flags],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "KILN_DEBUG": ""})
    assert r.returncode == 0, r.stderr
    return out / "model.onnx"


class Decoder:
    """One InferenceSession, fed as optimum's callers feed it (inputs it lacks are left out:
    optimum's gpt2 export takes no position_ids)."""

    def __init__(self, path):
        self.sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.sess.get_inputs()}
        self.names = [o.name for o in self.sess.get_outputs()]

    def empty(self, batch):
        return {n: np.zeros((batch, i.shape[1], 0, i.shape[3]), np.float32)
                for n, i in self.inputs.items() if n.startswith("past_key_values.")}

    def __call__(self, ids, mask, positions, past):
        feed = {"input_ids": np.asarray(ids, np.int64), "attention_mask": np.asarray(mask, np.int64),
                "position_ids": np.asarray(positions, np.int64), **past}
        outs = dict(zip(self.names, self.sess.run(None, {k: v for k, v in feed.items() if k in self.inputs})))
        return outs["logits"], {k: outs["present." + k[len("past_key_values."):]] for k in past}

    def padded(self):
        """(prefill logits [2, L, vocab], decode logits [2, vocab], mask) of PROMPTS left-padded
        to one length, positions as transformers' generate makes them (pads at 1)."""
        width = max(map(len, PROMPTS))
        mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
        ids = np.array([[0] * (width - len(p)) + p for p in PROMPTS])
        positions = np.where(mask == 1, np.cumsum(mask, 1) - 1, 1)
        prefill, past = self(ids, mask, positions, self.empty(2))
        step, _ = self(NEXT, np.concatenate([mask, np.ones((2, 1), np.int64)], 1), positions[:, -1:] + 1, past)
        return prefill, step[:, 0], mask


@pytest.mark.parametrize("family", ["llama", "gpt2", "mistral"])     # rotary, learned positions, a window
def test_a_left_padded_batch_gives_each_prompts_own_logits(hf_fixture, tmp_path, family):
    model = Decoder(_export(hf_fixture(family), tmp_path / "onnx"))
    prefill, step, mask = model.padded()
    for row, (prompt, nxt) in enumerate(zip(PROMPTS, NEXT)):
        n = len(prompt)
        alone, past = model([prompt], np.ones((1, n)), [list(range(n))], model.empty(1))
        alone_step, _ = model([nxt], np.ones((1, n + 1)), [[n]], past)
        np.testing.assert_allclose(prefill[row][mask[row] == 1], alone[0], rtol=0, atol=BOUND)
        np.testing.assert_allclose(step[row], alone_step[0, 0], rtol=0, atol=BOUND)


@pytest.mark.parametrize("family", ["llama", "gpt2", "mistral"])
def test_a_padded_batch_matches_transformers(hf_fixture, tmp_path, family):
    ref = np.load(TRANSFORMERS / f"{family}.npz")
    model = Decoder(_export(hf_fixture(family), tmp_path / "onnx"))
    mask = ref["attention_mask"]
    prefill, past = model(ref["input_ids"], mask, ref["position_ids"], model.empty(2))
    step, _ = model(ref["next_ids"], np.concatenate([mask, np.ones((2, 1), np.int64)], 1),
                    ref["position_ids"][:, -1:] + 1, past)
    np.testing.assert_allclose(prefill[mask == 1], ref["logits"][mask == 1], rtol=0, atol=BOUND)
    np.testing.assert_allclose(step[:, 0], ref["next_logits"], rtol=0, atol=BOUND)


@pytest.mark.parametrize("family", ["llama", "gemma", "gpt2", "phi3"])
def test_a_padded_batch_matches_optimums_export(hf_fixture, tmp_path, family):
    ours = Decoder(_export(hf_fixture(family), tmp_path / "onnx")).padded()
    theirs = Decoder(OPTIMUM / family / "model.onnx").padded()
    real = ours[2] == 1
    np.testing.assert_allclose(ours[0][real], theirs[0][real], rtol=0, atol=BOUND)
    np.testing.assert_allclose(ours[1], theirs[1], rtol=0, atol=BOUND)


def test_position_ids_drive_the_rotation(hf_fixture, tmp_path):
    """The same tokens at positions spread twice as far apart give other logits (the graph
    reads the input rather than counting positions from the cache; a shift alone would not
    show it, rotary attention sees only distances)."""
    model = Decoder(_export(hf_fixture("llama"), tmp_path / "onnx"))
    ids, mask = [PROMPTS[0]], np.ones((1, len(PROMPTS[0])))
    at0, _ = model(ids, mask, [list(range(7))], model.empty(1))
    spread, _ = model(ids, mask, [list(range(0, 14, 2))], model.empty(1))
    assert np.abs(at0[0, 1:] - spread[0, 1:]).max() > 1e-3


def test_the_kiln_layout_keeps_its_inputs(hf_fixture, tmp_path):
    path = _export(hf_fixture("llama"), tmp_path / "onnx", "--onnx-layout", "kiln")
    names = [i.name for i in ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()]
    assert "attention_mask" not in names and "position_ids" not in names and "logits_positions" in names
