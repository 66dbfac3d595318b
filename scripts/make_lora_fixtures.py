#!/usr/bin/env python3
"""Make tests/data/lora/: PEFT LoRA adapters on the tiny fixture models, with what transformers
+ peft compute for the merged models (the reference kiln's merge is checked against).

Run with a Python that has torch, transformers, peft and safetensors (not kiln's venv):

    PEERS/torch/bin/python scripts/make_lora_fixtures.py

Made with torch 2.13.0 (CPU), transformers and peft as printed into tests/data/lora/README.md.
Each adapter is ``get_peft_model(base, LoraConfig(..., init_lora_weights=False))`` with
``torch.manual_seed``: both A and B random (PEFT's default B is zero, which would test
nothing), then B scaled so the change moves the logits visibly without swamping the base.
``save_pretrained`` writes the adapter as PEFT does (adapter_config.json and
adapter_model.safetensors).

Cases (base fixture, adapters applied in order, each merged with ``merge_and_unload``):

- ``llama``: q/k/v/o/gate/down, r 4, alpha 12 (alpha != r; llama.cpp permutes q/k rows);
- ``llama_two``: the above, then a second adapter on q/v/up with rsLoRA, r 8, alpha 4 and a
  ``rank_pattern``/``alpha_pattern`` giving v_proj rank 2 and alpha 6, and the token embedding
  (PEFT's lora_embedding_A/B): several adapters at once;
- ``phi3``: the fused qkv_proj and gate_up_proj, r 4, alpha 8;
- ``gpt2``: GPT-2's Conv1D c_attn and c_fc (``fan_in_fan_out``), r 2, alpha 5.

``reference.npz`` per case holds the keys of the base fixtures' reference (input_ids, logits,
prompt, greedy, greedy_logits), computed by the merged model in float32.
"""
from __future__ import annotations

import importlib.metadata as md
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parent.parent
BASES = ROOT / "tests" / "data" / "fixtures" / "hf"
OUT = ROOT / "tests" / "data" / "lora"

ADAPTERS = {
    "llama_a": ("llama", dict(r=4, lora_alpha=12, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                  "gate_proj", "down_proj"]), 1),
    "llama_b": ("llama", dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj", "up_proj", "embed_tokens"],
                              rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 6}), 2),
    "phi3_a": ("phi3", dict(r=4, lora_alpha=8, target_modules=["qkv_proj", "gate_up_proj"]), 3),
    "gpt2_a": ("gpt2", dict(r=2, lora_alpha=5, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True), 4),
}
# B's standard deviation: GPT-2's fixture has LayerNorms and smaller activations, so its change
# needs a larger B to move the logits as much as the others'
B_STD = {"gpt2_a": 0.5}
CASES = {"llama": ["llama_a"], "llama_two": ["llama_a", "llama_b"], "phi3": ["phi3_a"], "gpt2": ["gpt2_a"]}


def make_adapter(name: str) -> None:
    base, kwargs, seed = ADAPTERS[name]
    model = AutoModelForCausalLM.from_pretrained(BASES / base, dtype=torch.float32)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **kwargs))
    with torch.no_grad():
        for pname, p in peft_model.named_parameters():
            if "lora_B" in pname:
                p.copy_(torch.randn_like(p) * B_STD.get(name, 0.05))
    dst = OUT / "adapters" / name
    if dst.exists():
        shutil.rmtree(dst)
    # save_embedding_layers=False: an embedding adapter on an unresized vocabulary is the pair
    # alone (peft would add a full copy of the embedding by default)
    peft_model.save_pretrained(dst, save_embedding_layers=False)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg["target_modules"] = sorted(cfg["target_modules"])      # peft writes a set: fix the order
    cfg["base_model_name_or_path"] = f"tests/data/fixtures/hf/{base}"     # not the machine's path
    (dst / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for extra in dst.glob("README.md"):
        extra.unlink()


def merged_model(case: str):
    from peft import PeftModel
    names = CASES[case]
    base = ADAPTERS[names[0]][0]
    model = AutoModelForCausalLM.from_pretrained(BASES / base, dtype=torch.float32)
    for name in names:
        model = PeftModel.from_pretrained(model, OUT / "adapters" / name).merge_and_unload()
    return model.eval(), base


def reference(case: str) -> None:
    model, base = merged_model(case)
    ref = np.load(BASES / base / "reference.npz")
    input_ids, prompt = torch.tensor(ref["input_ids"]), torch.tensor(ref["prompt"])
    with torch.no_grad():
        logits = model(input_ids).logits.numpy()
        # greedy by argmax of full passes, 16 tokens whatever they are (no EOS stop: the
        # tests decode a fixed count)
        seq = prompt
        for _ in range(16):
            nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
        greedy = seq[0, prompt.shape[1]:]
        full = model(seq[:, :-1]).logits[0, prompt.shape[1] - 1:].numpy()
    np.savez(OUT / case / "reference.npz", input_ids=ref["input_ids"], logits=logits, prompt=ref["prompt"],
             greedy=greedy.numpy(), greedy_logits=full)
    base_logits = ref["logits"]
    print(f"{case}: adapters move the logits by up to {np.abs(logits - base_logits).max():.3f}; "
          f"greedy {greedy.tolist()}")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name in ADAPTERS:
        make_adapter(name)
    for case in CASES:
        (OUT / case).mkdir(exist_ok=True)
        reference(case)
    versions = {p: md.version(p) for p in ("torch", "transformers", "peft", "safetensors")}
    (OUT / "versions.json").write_text(json.dumps(versions, indent=2) + "\n")
    print(versions)


if __name__ == "__main__":
    main()
