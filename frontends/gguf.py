"""GGUF models: metadata -> ArchConfig, tensors -> roles, vocabulary -> tokenizer.

The container itself (parsing, validation, writing) lives in ``gguf_file``; this module knows
what llama.cpp's keys and tensor names mean. Quantized tensors stay in their blocks: the only
transform on the way in, llama.cpp's interleaving of q/k rows for its rotary kernel, is a row
permutation, which whole-row block formats survive untouched.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from kiln.errors import KilnError
from kiln.ir import ModelIR
from kiln.weights import Weight

from . import arch as A
from .builder import build_graph


def rope_unpermute_rows(rows: int, n_head: int) -> np.ndarray:
    """Row index that undoes llama.cpp's q/k interleave: hf[r] = gguf[index[r]]."""
    head_dim = rows // n_head
    gguf_rows = np.arange(rows).reshape(n_head, head_dim // 2, 2)
    return gguf_rows.transpose(0, 2, 1).reshape(-1)


def rope_permute_rows(rows: int, n_head: int) -> np.ndarray:
    """The inverse: gguf[r] = hf[index[r]] (used when writing GGUF)."""
    return np.argsort(rope_unpermute_rows(rows, n_head))


def arch_config(meta: dict, tensors: dict, path) -> tuple[A.Family, A.ArchConfig]:
    arch = meta.get("general.architecture")
    family = A.family_for_gguf_arch(arch) if isinstance(arch, str) else None
    if family is None:
        raise KilnError(path, f"unsupported architecture {arch!r} "
                        f"(kiln reads: {', '.join(sorted({f.gguf_arch for f in A.FAMILIES.values()}))})")

    def key(name, default=None, required=True):
        v = meta.get(f"{arch}.{name}", default)
        if v is None and required:
            raise KilnError(path, f"metadata key {arch}.{name} is missing")
        return v

    try:
        heads = int(key("attention.head_count"))
        hidden = int(key("embedding_length"))
        kv = int(key("attention.head_count_kv", heads))
        head_dim = int(key("attention.key_length", hidden // heads))
        tokens = meta.get("tokenizer.ggml.tokens")
        vocab = int(key("vocab_size", len(tokens) if tokens else None))
        scaling = {}
        stype = meta.get(f"{arch}.rope.scaling.type")
        if stype and stype != "none":
            scaling = {"rope_type": stype, "factor": float(meta.get(f"{arch}.rope.scaling.factor", 1.0))}
            octx = meta.get(f"{arch}.rope.scaling.original_context_length")
            if octx:
                scaling["original_max_position_embeddings"] = int(octx)
        eos = meta.get("tokenizer.ggml.eos_token_id")
        cfg = A.ArchConfig(
            family=family.name,
            vocab_size=vocab,
            hidden_size=hidden,
            num_layers=int(key("block_count")),
            num_heads=heads,
            num_kv_heads=kv,
            head_dim=head_dim,
            intermediate_size=int(key("feed_forward_length")),
            norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
            tie_word_embeddings="output.weight" not in tensors,
            rotary_dim=int(key("rope.dimension_count", head_dim)),
            rope_theta=float(key("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            max_position_embeddings=int(key("context_length", 2048)),
            sliding_window=meta.get(f"{arch}.attention.sliding_window"),
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=[int(eos)] if eos is not None else [],
            pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
        )
    except (TypeError, ValueError) as e:
        raise KilnError(path, f"bad model metadata: {e}") from None
    if family.name == "gemma":
        cfg.norm_offset = 0.0        # llama.cpp stores gemma's norm weights with the 1 already added
        cfg.embed_scale = float(hidden) ** 0.5
        cfg.activation = "gelu_tanh"
        cfg.tie_word_embeddings = True
    if family.name == "qwen3":
        cfg.qk_norm = True
    if cfg.num_heads % max(cfg.num_kv_heads, 1):
        raise KilnError(path, f"{heads} attention heads are not a multiple of {kv} key/value heads")
    return family, cfg


def load_weights(path, tensors: dict[str, Weight], family: A.Family, cfg: A.ArchConfig) -> dict[str, Weight]:
    roles = A.layer_roles(family.gguf_names, cfg.num_layers)
    out: dict[str, Weight] = {}
    for role, name in roles.items():
        if name in tensors:
            out[role] = tensors[name]
    for i in range(cfg.num_layers):
        for r in ("q", "k", "v", "o", "up", "down"):
            if f"layers.{i}.{r}.weight" not in out:
                raise KilnError(path, f"tensor {roles[f'layers.{i}.{r}.weight']} is missing")
    if "embed" not in out:
        raise KilnError(path, "tensor token_embd.weight is missing")
    _check_shapes(path, out, cfg)
    if family.rope_permuted_in_gguf:
        for i in range(cfg.num_layers):
            for r, heads in (("q", cfg.num_heads), ("k", cfg.num_kv_heads)):
                role = f"layers.{i}.{r}.weight"
                w = out[role]
                out[role] = w.take_rows(rope_unpermute_rows(w.shape[0], heads))
    return out


def _check_shapes(path, w: dict[str, Weight], cfg: A.ArchConfig) -> None:
    H, KV, D, E, F = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size, cfg.intermediate_size
    expect = {"embed": (cfg.vocab_size, E)}
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        expect.update({p + "q.weight": (H * D, E), p + "k.weight": (KV * D, E), p + "v.weight": (KV * D, E),
                       p + "o.weight": (E, H * D), p + "up.weight": (F, E), p + "down.weight": (E, F)})
    for role, shape in expect.items():
        if role in w and w[role].shape != shape:
            raise KilnError(path, f"tensor for {role} has shape {list(w[role].shape)}, the metadata implies {list(shape)}")


def read(path) -> ModelIR:
    from .gguf_file import read_gguf
    path = Path(path)
    if not path.exists():
        raise KilnError(path, "no such file or folder")
    f = read_gguf(path)
    family, cfg = arch_config(f.metadata, f.tensors, path)
    weights = load_weights(path, f.tensors, family, cfg)
    graph = build_graph(cfg, weights, name=family.name)
    tokenizer = None
    if "tokenizer.ggml.tokens" in f.metadata:
        from .tokenizer import from_gguf_metadata
        tokenizer = from_gguf_metadata(f.metadata)
    gen = {"eos_token_id": cfg.eos_token_ids} if cfg.eos_token_ids else {}
    formats: dict[str, int] = {}
    for t in f.tensors.values():
        formats[t.format.name] = formats.get(t.format.name, 0) + 1
    return ModelIR(graph=graph, config=cfg.to_dict(),
                   source={"format": "gguf", "path": os.fspath(path), "tensor_formats": formats,
                           "name": f.metadata.get("general.name")},
                   tokenizer=tokenizer, generation=gen)
