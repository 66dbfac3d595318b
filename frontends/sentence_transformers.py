"""Embedding models in sentence-transformers' layout: which transformer, pooled how, normalized.

A sentence-transformers folder is a list of modules (``modules.json``) applied in order: a
Transformer (a Hugging Face model folder, usually the folder itself), a Pooling module
(``1_Pooling/config.json``: which of its pooling modes are on) and often a Normalize module
(no files: each vector divided by its L2 norm). kiln reads that chain into an
:class:`EmbeddingSpec` and builds one graph from token ids to the final vectors: the encoder
(:mod:`kiln.frontends.encoder`, BERT's family) or a decoder family's graph up to its final
norm (qwen3 for Qwen3-Embedding), then :mod:`kiln.frontends.pooling`.

Modules kiln does not compute (Dense projections, word-weighted pooling, CNNs...) are refused
with one line naming them, never skipped: a vector without them is a different vector.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from kiln.errors import KilnError, load_json_object
from kiln.ir import ModelIR

MODULES = "modules.json"
_TRANSFORMER = "sentence_transformers.models.Transformer"
_POOLING = "sentence_transformers.models.Pooling"
_NORMALIZE = "sentence_transformers.models.Normalize"

#: sentence-transformers' pooling modes in the order it concatenates them, by kiln's names
POOLING_KEYS = {"cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens",
                "mean": "pooling_mode_mean_tokens", "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens",
                "weightedmean": "pooling_mode_weightedmean_tokens", "last": "pooling_mode_lasttoken"}
SUPPORTED_POOLING = ("cls", "max", "mean", "mean_sqrt_len", "last")


@dataclass
class EmbeddingSpec:
    """What the manifest's ``embedding`` entry records and the runtime needs."""
    pooling: list                 # modes in sentence-transformers' concatenation order
    normalize: bool
    dimension: int                # the vectors' length
    max_seq_length: int           # the most tokens one input may have
    token_types: bool             # the graph takes token_type_ids (BERT's family)

    def to_dict(self) -> dict:
        return asdict(self)


def is_sentence_transformers(folder) -> bool:
    return Path(folder).is_dir() and (Path(folder) / MODULES).is_file()


def _modules(folder: Path) -> list:
    path = folder / MODULES
    try:
        mods = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        raise KilnError(path, "not a readable JSON list of modules") from None
    if not isinstance(mods, list) or not all(isinstance(m, dict) and isinstance(m.get("type"), str) for m in mods):
        raise KilnError(path, "not a list of modules, each with a \"type\"")
    return mods


def read_layout(folder: Path) -> tuple[Path, list, bool, int | None]:
    """(the Transformer module's folder, its pooling modes, normalize, max_seq_length or None)."""
    mods = _modules(folder)
    kinds = [m["type"] for m in mods]
    if not kinds or kinds[0] != _TRANSFORMER:
        raise KilnError(folder / MODULES, f"the first module is {kinds[0] if kinds else 'missing'}; kiln reads "
                                          f"embedding models that start with a Transformer module")
    if kinds[1:2] != [_POOLING]:
        raise KilnError(folder / MODULES, "kiln reads embedding models whose Transformer is followed by a Pooling module")
    rest = kinds[2:]
    if rest not in ([], [_NORMALIZE]):
        odd = next(k for k in rest if k != _NORMALIZE)
        raise KilnError(folder / MODULES, f"has a {odd.rsplit('.', 1)[-1]} module, which kiln does not compute "
                                          f"(it reads Transformer, Pooling and Normalize)")
    model_dir = _inside(folder, mods[0].get("path") or "")
    pool_path = _inside(folder, mods[1].get("path") or "") / "config.json"
    pool = load_json_object(pool_path, unreadable="not a readable JSON pooling config",
                            not_object="not a JSON object")
    modes = [mode for mode, key in POOLING_KEYS.items() if pool.get(key) is True]
    if not modes:
        raise KilnError(pool_path, "turns on no pooling mode")
    odd = [m for m in modes if m not in SUPPORTED_POOLING]
    if odd:
        raise KilnError(pool_path, f"pooling mode {odd[0]!r} is not one kiln computes "
                                   f"({', '.join(SUPPORTED_POOLING)})")
    if pool.get("include_prompt", True) is not True:
        raise KilnError(pool_path, "include_prompt false (an instruction left out of the pooling) is not supported")
    st_cfg = model_dir / "sentence_bert_config.json"
    max_len = None
    if st_cfg.is_file():
        v = load_json_object(st_cfg, unreadable="not a readable JSON file", not_object="not a JSON object") \
            .get("max_seq_length")
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise KilnError(st_cfg, f"max_seq_length is {v!r}, not a positive whole number")
        max_len = v
    return model_dir, modes, rest == [_NORMALIZE], max_len


def _inside(folder: Path, rel) -> Path:
    """A module's path, which must be a folder name inside the model folder."""
    if not isinstance(rel, str):
        raise KilnError(folder / MODULES, f"module path {rel!r} is not a folder name")
    p = (folder / rel).resolve()
    if p != folder.resolve() and folder.resolve() not in p.parents:
        raise KilnError(folder / MODULES, f"module path {rel!r} points outside the folder")
    return p


def read(folder) -> ModelIR:
    """A sentence-transformers folder -> a ModelIR whose graph maps token ids (and an
    attention mask) to the pooled, normalized vectors, with ``embedding`` describing them."""
    from .pooling import add_pooling
    folder = Path(folder)
    model_dir, modes, normalize, max_len = read_layout(folder)
    if not (model_dir / "config.json").is_file():
        raise KilnError(model_dir, "the Transformer module's folder has no config.json")
    from .hf import read_config
    raw_cfg = read_config(model_dir)
    if raw_cfg.get("model_type") in ("bert",):
        from . import encoder
        cfg, weights, graph = encoder.read(model_dir, raw_cfg)
        token_types = True
    else:
        cfg, weights, graph = _decoder(model_dir, raw_cfg)
        token_types = False
    limit = cfg.max_position_embeddings if max_len is None else min(max_len, cfg.max_position_embeddings)
    add_pooling(graph, modes, normalize)
    spec = EmbeddingSpec(pooling=modes, normalize=normalize, dimension=cfg.hidden_size * len(modes),
                         max_seq_length=limit, token_types=token_types)
    from .hf import folder_extras
    tokenizer, gen = folder_extras(model_dir, cfg)
    return ModelIR(graph=graph, config=cfg.to_dict(), weights=weights,
                   source={"format": "hf", "path": os.fspath(folder), "config": raw_cfg,
                           "name": raw_cfg.get("_name_or_path") or folder.resolve().name},
                   tokenizer=tokenizer, generation=gen, embedding=spec.to_dict())


def _decoder(model_dir: Path, raw_cfg: dict):
    """A decoder family's graph up to its final norm (Qwen3-Embedding: a qwen3 model saved
    without the ``model.`` prefix and without an LM head, as its base model class)."""
    from . import hf
    from .builder import build_graph
    family, cfg = hf.arch_config(raw_cfg, model_dir)
    if cfg.num_experts:
        raise KilnError(model_dir / "config.json", "kiln reads dense decoders as embedding models, not mixtures of experts")
    tensors = hf._open_tensors(model_dir)
    embed = family.hf_names["embed"]
    if embed not in tensors and embed.split(".", 1)[1] in tensors:
        prefix = embed.split(".", 1)[0] + "."
        tensors = {prefix + name: w for name, w in tensors.items()}
    weights = hf.map_weights(model_dir, tensors, family, cfg)
    weights.pop("lm_head", None)
    graph = build_graph(cfg, weights, name=f"{family.name}_embedding", hidden_states=True)
    return cfg, weights, graph
