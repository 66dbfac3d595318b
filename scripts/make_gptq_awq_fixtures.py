#!/usr/bin/env python3
"""Make tests/data/gptq_awq/: GPTQ and AWQ checkpoints of the tiny llama fixture, written by
their published layouts, with what transformers computes for the dequantized models.

Run with a Python that has torch, transformers and safetensors (not kiln's venv):

    PEERS/torch/bin/python scripts/make_gptq_awq_fixtures.py

The GPU libraries that make these checkpoints (AutoGPTQ, GPTQModel, AutoAWQ) do not run here,
so this script quantizes every linear layer of tests/data/fixtures/hf/llama itself, by rounding
to nearest (RTN): the format is what kiln reads, not the algorithm that picked the codes. Per
group it takes the libraries' scale and zero rules, then packs as they do:

- GPTQ (AutoGPTQ's pack, checkpoint_format "gptq"): ``qweight`` int32 [K/8, N], eight inputs a
  word, low bits first; ``qzeros`` int32 [groups, N/8], eight outputs a word, each zero stored
  minus one (the classic v1 convention; zeros are kept in 1..15 so that none wraps); ``scales``
  float16 [groups, N]; ``g_idx`` int32 [K]. Asymmetric groups: scale (max(x, 0) − min(x, 0)) / 15,
  zero round(−min / scale); symmetric: scale 2·max|x| / 15, zero 8.
- AWQ GEMM (AutoAWQ's WQLinear_GEMM): ``qweight`` int32 [K, N/8] and ``qzeros`` int32
  [groups, N/8], eight outputs a word in the order 0, 2, 4, 6, 1, 3, 5, 7; ``scales`` float16
  [groups, N]; scale (max − min) / 15, zero round(−min / scale) in 0..15.

The scale is rounded to a half before the codes are made, as the stored one is what dequantizes.
The other tensors (embedding, norms, lm_head) are stored as float16, as these checkpoints are.

Cases (the fixture's K is 64, or 128 for down_proj):

- ``gptq_g32``: group_size 32, asymmetric, desc_act false (g_idx is i // 32);
- ``gptq_g128_sym``: group_size 128, symmetric: a 64-wide row is one short group, down_proj's
  128 one whole group;
- ``gptq_desc_act``: group_size 32, asymmetric, desc_act true: each layer's inputs are assigned
  to groups in a random order (g_idx[perm[i]] = i // 32), as act-order leaves them, one order
  for the layers that read the same input (q/k/v, gate/up), as GPTQ's shared Hessian gives;
- ``awq_g32``, ``awq_g64``: AutoAWQ needs K to be a multiple of the group size, so 64 is its
  largest group here.

``reference.npz`` per case holds the keys of the base fixture's reference (input_ids, logits,
prompt, greedy, greedy_logits), computed in float32 by transformers' LlamaForCausalLM loaded
with the dequantized weights (scale · (code − zero), in float32).
"""
from __future__ import annotations

import importlib.metadata as md
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "tests" / "data" / "fixtures" / "hf" / "llama"
OUT = ROOT / "tests" / "data" / "gptq_awq"
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# GPTQ quantizes q/k/v (and gate/up) from the same inputs, so act-order gives them one order
SHARED_INPUT = {"self_attn.k_proj": "self_attn.q_proj", "self_attn.v_proj": "self_attn.q_proj",
                "mlp.up_proj": "mlp.gate_proj"}

CASES = {
    "gptq_g32": dict(method="gptq", group=32, sym=False, desc_act=False, seed=1),
    "gptq_g128_sym": dict(method="gptq", group=128, sym=True, desc_act=False, seed=2),
    "gptq_desc_act": dict(method="gptq", group=32, sym=False, desc_act=True, seed=3),
    "awq_g32": dict(method="awq", group=32, seed=4),
    "awq_g64": dict(method="awq", group=64, seed=5),
}


def gptq_config(c: dict) -> dict:
    """What AutoGPTQ (through optimum / transformers' GPTQConfig) writes into config.json."""
    return {"bits": 4, "group_size": c["group"], "damp_percent": 0.01, "desc_act": c["desc_act"],
            "static_groups": False, "sym": c["sym"], "true_sequential": True, "model_name_or_path": None,
            "model_file_base_name": "model", "quant_method": "gptq", "checkpoint_format": "gptq"}


def awq_config(c: dict) -> dict:
    """What AutoAWQ writes into config.json."""
    return {"quant_method": "awq", "zero_point": True, "group_size": c["group"], "bits": 4, "version": "gemm",
            "modules_to_not_convert": None}


def pack_words(fields: np.ndarray, order=tuple(range(8))) -> np.ndarray:
    """[R, 8C] values 0..15 -> int32 [R, C]: field i of word c holds value 8c + order[i]."""
    r, n = fields.shape
    f = fields.reshape(r, n // 8, 8).astype(np.uint32)
    words = np.zeros((r, n // 8), np.uint32)
    for i, src in enumerate(order):
        words |= f[:, :, src] << np.uint32(4 * i)
    return words.view(np.int32)


def group_params(w: np.ndarray, sym: bool, method: str):
    """Scale (a half) and zero of one group of values (any shape, reduced over axis 0)."""
    if method == "awq":
        lo, hi = w.min(axis=0), w.max(axis=0)
    else:
        lo, hi = np.minimum(w.min(axis=0), 0), np.maximum(w.max(axis=0), 0)
    if sym:
        scale = (2 * np.abs(w).max(axis=0) / 15).astype(np.float16)
        zero = np.full(scale.shape, 8)
    else:
        scale = ((hi - lo) / 15).astype(np.float16)
        zero = np.rint(-lo / scale.astype(np.float32))
        zero = np.clip(zero, 1 if method == "gptq" else 0, 15)   # v1 stores zero - 1: keep it >= 0
    return scale, zero.astype(np.int64)


def quantize(w: np.ndarray, c: dict, perm) -> tuple[dict, np.ndarray]:
    """A float [N, K] weight -> (its packed tensors, the dequantized float32 weight). ``perm``:
    desc_act's order of the inputs (None: in order)."""
    n, k = w.shape
    group = c["group"]
    groups = -(-k // group)
    if perm is not None:
        g_idx = np.empty(k, np.int64)
        g_idx[perm] = np.arange(k) // group
    else:
        g_idx = np.arange(k) // group
    wt = w.T.astype(np.float32)                   # [K, N]: the libraries work input-major
    scales = np.zeros((groups, n), np.float16)
    zeros = np.zeros((groups, n), np.int64)
    for g in range(groups):
        scales[g], zeros[g] = group_params(wt[g_idx == g], c.get("sym", False), c["method"])
    s32 = scales.astype(np.float32)[g_idx]        # [K, N]
    codes = np.clip(np.rint(wt / s32) + zeros[g_idx], 0, 15).astype(np.int64)
    dequant = (s32 * (codes - zeros[g_idx]).astype(np.float32)).T.astype(np.float32)
    if c["method"] == "gptq":
        qweight = pack_words(codes.T).T            # eight inputs a word: pack K, then [K/8, N]
        tensors = {"qweight": np.ascontiguousarray(qweight), "qzeros": pack_words(zeros - 1), "scales": scales,
                   "g_idx": g_idx.astype(np.int32)}
    else:
        tensors = {"qweight": pack_words(codes, AWQ_ORDER), "qzeros": pack_words(zeros, AWQ_ORDER), "scales": scales}
    return tensors, dequant


def make_case(name: str, c: dict) -> None:
    rng = np.random.default_rng(c["seed"])
    src = {k: v.numpy() for k, v in load_file_all(BASE).items()}
    out, dequant_sd = {}, {}
    perms = {}
    for key, value in sorted(src.items()):
        prefix = key[:-len(".weight")]
        module = prefix.split("layers.", 1)[-1].split(".", 1)[-1]
        if key.endswith(".weight") and module in LINEARS:
            # layers reading the same input share act-order's permutation (one Hessian)
            shared = prefix.rsplit(".", 1)[0] + "." + SHARED_INPUT.get(module, module)
            if c.get("desc_act") and shared not in perms:
                perms[shared] = rng.permutation(value.shape[1])
            packed, deq = quantize(value, c, perms.get(shared))
            out.update({f"{prefix}.{part}": t for part, t in packed.items()})
            dequant_sd[key] = deq
        else:
            half = value.astype(np.float16)
            out[key] = half
            dequant_sd[key] = half.astype(np.float32)
    dst = OUT / name
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    save_file(dict(sorted(out.items())), dst / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((BASE / "config.json").read_text())
    cfg["dtype"] = "float16"
    cfg["quantization_config"] = gptq_config(c) if c["method"] == "gptq" else awq_config(c)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    shutil.copy(BASE / "generation_config.json", dst / "generation_config.json")
    reference(name, dequant_sd)


def load_file_all(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def reference(name: str, state: dict) -> None:
    model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    model.eval()
    ref = np.load(BASE / "reference.npz")
    input_ids, prompt = torch.tensor(ref["input_ids"]), torch.tensor(ref["prompt"])
    with torch.no_grad():
        logits = model(input_ids).logits.numpy()
        seq = prompt
        for _ in range(16):         # 16 greedy tokens by full passes, no EOS stop
            nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
        greedy = seq[0, prompt.shape[1]:]
        full = model(seq[:, :-1]).logits[0, prompt.shape[1] - 1:].numpy()
    np.savez(OUT / name / "reference.npz", input_ids=ref["input_ids"], logits=logits, prompt=ref["prompt"],
             greedy=greedy.numpy(), greedy_logits=full)
    print(f"{name}: quantization moves the logits by up to {np.abs(logits - ref['logits']).max():.3f}; "
          f"greedy {greedy.tolist()}")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, c in CASES.items():
        make_case(name, c)
    versions = {p: md.version(p) for p in ("torch", "transformers", "safetensors", "numpy")}
    (OUT / "versions.json").write_text(json.dumps(versions, indent=2) + "\n")
    print(versions)


if __name__ == "__main__":
    main()
