"""Regenerate tests/data/padded_batch/: transformers' logits for a left-padded batch of two
prompts, a prefill and one decode step through its cache, for tests/test_onnx_padding.py
(kiln's ONNX export fed the same inputs must give the same logits on the real tokens).

Needs torch and transformers, which the kiln venv deliberately does not have; run it with a
separate venv outside the repository:

    /work/peers/torch/bin/python scripts/make_padded_batch_reference.py

The inputs are what transformers' ``generate`` feeds a left-padded batch: ``attention_mask``
0 on the padding, ``position_ids`` counting the real tokens from 0 (1 on the padding), and
eager attention (sdpa's fully masked padding rows can turn to NaN). ``index.json`` records
the versions.
"""
from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SOURCE = REPO / "tests" / "data" / "fixtures" / "hf"
OUT = REPO / "tests" / "data" / "padded_batch"
FAMILIES = ("llama", "gpt2", "mistral")          # rotary, learned positions, a sliding window
PROMPTS = ([5, 9, 13, 2, 7, 30, 11], [17, 3, 8])
NEXT = ([21], [4])


def main() -> int:
    import torch
    from transformers import AutoModelForCausalLM
    OUT.mkdir(parents=True, exist_ok=True)
    width = max(map(len, PROMPTS))
    mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS], np.int64)
    ids = np.array([[0] * (width - len(p)) + list(p) for p in PROMPTS], np.int64)
    positions = np.where(mask == 1, np.cumsum(mask, 1) - 1, 1)
    step_mask = np.concatenate([mask, np.ones((len(PROMPTS), 1), np.int64)], 1)
    step_positions = positions[:, -1:] + 1
    for family in FAMILIES:
        model = AutoModelForCausalLM.from_pretrained(SOURCE / family, attn_implementation="eager",
                                                     dtype=torch.float32).eval()
        with torch.no_grad():
            out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                        position_ids=torch.from_numpy(positions), use_cache=True)
            step = model(input_ids=torch.tensor(NEXT), attention_mask=torch.from_numpy(step_mask),
                         position_ids=torch.from_numpy(step_positions), past_key_values=out.past_key_values,
                         use_cache=True)
        np.savez_compressed(OUT / f"{family}.npz", input_ids=ids, attention_mask=mask, position_ids=positions,
                            next_ids=np.array(NEXT, np.int64), logits=out.logits.numpy(),
                            next_logits=step.logits[:, -1].numpy())
    index = {"torch_version": version("torch"), "transformers_version": version("transformers"),
             "families": list(FAMILIES)}
    (OUT / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
