"""Bare safetensors files: one file of HF-named tensors, with the architecture taken from a
config.json beside it, from kiln's own ``__metadata__``, or inferred from tensor names and shapes."""
from __future__ import annotations

import json
import os
from pathlib import Path

from kiln.errors import KilnError
from kiln.ir import ModelIR

from . import arch as A
from . import hf
from .builder import build_graph

CONFIG_KEY = "kiln.hf_config"      # __metadata__ entry holding the HF config.json text


def infer_config(path, names: dict) -> dict:
    """An HF-style config from tensor names and shapes, or a clear error when it is ambiguous."""
    def has(n):
        return n in names

    def layers(prefix):
        idx = {int(k[len(prefix):].split(".")[0]) for k in names if k.startswith(prefix) and k[len(prefix):].split(".")[0].isdigit()}
        return len(idx)

    if has("transformer.wte.weight"):
        raise KilnError(path, "looks like GPT-2, but its head count cannot be read off tensor shapes; "
                              "put the model's config.json beside the file")
    if not has("model.embed_tokens.weight"):
        raise KilnError(path, "cannot tell the architecture: no embedding tensor kiln knows "
                              "(model.embed_tokens.weight or transformer.wte.weight)")
    vocab, hidden = names["model.embed_tokens.weight"].shape
    n = layers("model.layers.")
    p = "model.layers.0."
    if has(p + "self_attn.q_norm.weight"):
        head_dim = names[p + "self_attn.q_norm.weight"].shape[0]
        cfg = {"model_type": "qwen3",
               "num_attention_heads": names[p + "self_attn.q_proj.weight"].shape[0] // head_dim,
               "num_key_value_heads": names[p + "self_attn.k_proj.weight"].shape[0] // head_dim,
               "head_dim": head_dim}
    else:
        family = "phi3" if has(p + "self_attn.qkv_proj.weight") else "qwen2" if has(p + "self_attn.q_proj.bias") else "llama-like"
        raise KilnError(path, f"looks like {family}, but the number of attention heads cannot be read off "
                              "tensor shapes; put the model's config.json beside the file")
    up = names.get(p + "mlp.up_proj.weight")
    cfg.update({"vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": n,
                "intermediate_size": up.shape[0] if up is not None else 4 * hidden,
                "tie_word_embeddings": not has("lm_head.weight")})
    return cfg


def read(path) -> ModelIR:
    from .safetensors_file import read_safetensors
    path = Path(path)
    f = read_safetensors(path)
    beside = path.parent / "config.json"
    if beside.is_file():
        raw = hf.read_config(path.parent)
    elif CONFIG_KEY in f.metadata:
        try:
            raw = json.loads(f.metadata[CONFIG_KEY])
        except json.JSONDecodeError:
            raise KilnError(path, f"the {CONFIG_KEY} metadata entry is not JSON") from None
    else:
        raw = infer_config(path, f.tensors)
    family, cfg = hf.arch_config(raw, path.parent)
    weights = hf.map_weights(path, dict(f.tensors), family, cfg)
    graph = build_graph(cfg, weights, name=family.name)
    return ModelIR(graph=graph, config=cfg.to_dict(), weights=weights,
                   source={"format": "safetensors", "path": os.fspath(path), "config": raw},
                   generation={"eos_token_id": cfg.eos_token_ids} if cfg.eos_token_ids else {})


def write(model: ModelIR, path, *, dtype: str | None = None, progress=None) -> dict:
    from .safetensors_file import write_safetensors
    cfg = A.ArchConfig.from_dict(model.config)
    family = hf.hf_family(cfg, path)      # as the HF writer: a llama model with a window is Mistral
    dtype = dtype or hf.default_dtype(model.weights)
    tensors = {n: (w if len(w.shape) < 2 and w.format.name == "f32" else w.astype(dtype))
               for n, w in hf.hf_tensors(model.weights, family, cfg).items()}
    meta = {"format": "pt", CONFIG_KEY: json.dumps(hf.hf_config(cfg, family, dtype))}
    write_safetensors(path, list(tensors.items()), metadata=meta,
                      progress=(lambda n, *_: progress(n, tensors[n].nbytes)) if progress else None)
    return {"tensors": len(tensors), "dtype": dtype, "bytes_in": sum(w.nbytes for w in model.weights.values()),
            "bytes_out": os.path.getsize(path)}
