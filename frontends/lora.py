"""LoRA adapters: PEFT folders and llama.cpp's LoRA GGUF, read, merged into a base, written.

A LoRA adapter changes a matrix ``W`` [out, in] into ``W + s · B @ A`` with ``A`` [r, in],
``B`` [out, r] and ``s = alpha / r`` (rsLoRA: ``alpha / sqrt(r)``). Both formats store exactly
that pair per adapted matrix: PEFT as ``base_model.model.<module>.lora_A/lora_B.weight`` (with
``r``/``lora_alpha`` and per-module ``rank_pattern``/``alpha_pattern`` in adapter_config.json),
llama.cpp as ``<gguf tensor>.lora_a/.lora_b`` with one ``adapter.lora.alpha`` (its loader takes
``r`` from each ``lora_a``'s rows).

kiln merges: the adapted matrices are dequantized, the scaled products added in float32 and the
result kept in float32, so the merged model is what PEFT's ``merge_and_unload`` computes in
float32, at no cost per token. (Keeping ``B @ (A @ x)`` beside a quantized base would keep its
blocks, but costs every backend a second matmul path; a merged quantized base can be quantized
again with ``--quant --requantize`` when size matters more than the last digit.)

Pairs are keyed by kiln's role of the file's own tensor (``layers.3.qkv.weight`` for phi3's fused
projection), so an adapter maps to and from both formats the way its base does; fused tensors are
split into kiln's parts (``B``'s rows, ``A`` shared) when merged.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kiln.errors import KilnError, load_json_object
from kiln.weights import Weight

from . import arch as A

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


@dataclass
class LoraPair:
    a: Weight               # [r, in]
    b: Weight               # [out, r]
    scale: float            # what B @ A is multiplied by before it is added

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass
class Adapter:
    path: Path
    format: str                                   # "peft" or "gguf"
    alpha: float
    pairs: dict[str, LoraPair] = field(default_factory=dict)   # role of the file's tensor -> pair
    architecture: str | None = None               # GGUF adapters: the base's general.architecture


def is_adapter(path) -> bool:
    """A PEFT adapter folder or a llama.cpp LoRA GGUF."""
    p = Path(path)
    if p.is_dir():
        return (p / PEFT_CONFIG).is_file()
    if p.is_file() and p.suffix == ".gguf":
        from .gguf_file import read_gguf
        try:
            return read_gguf(p).metadata.get("general.type") == "adapter"
        except KilnError:
            return False
    return False


# ---- reading -------------------------------------------------------------------------------

def read_adapter(path, family: A.Family, cfg: A.ArchConfig) -> Adapter:
    """The adapter at ``path`` mapped onto a base of ``family``/``cfg``; one-line errors for
    adapters kiln cannot merge exactly."""
    p = Path(path)
    if not p.exists():
        raise KilnError(path, "no such file or folder")
    if p.is_dir():
        return _read_peft(p, family, cfg)
    return _read_gguf(p, family, cfg)


def _read_peft(folder: Path, family: A.Family, cfg: A.ArchConfig) -> Adapter:
    conf_path = folder / PEFT_CONFIG
    if not conf_path.is_file():
        raise KilnError(folder, f"not a LoRA adapter: the folder has no {PEFT_CONFIG}")
    conf = load_json_object(conf_path, unreadable="not a readable adapter config",
                            not_object="not an adapter config (not a JSON object)")
    kind = conf.get("peft_type", "LORA")
    if str(kind).upper() != "LORA":
        raise KilnError(conf_path, f"peft_type is {kind!r}; kiln reads LoRA adapters only")
    if conf.get("use_dora"):
        raise KilnError(conf_path, "DoRA adapters are not supported yet (their magnitude vector rescales every "
                                   "merged column, which kiln does not compute)")
    if conf.get("bias", "none") != "none":
        raise KilnError(conf_path, f"bias={conf['bias']!r}: the adapter trains the base's biases too, which kiln "
                                   f"does not merge yet (only bias='none')")
    if conf.get("modules_to_save"):
        raise KilnError(conf_path, f"modules_to_save={conf['modules_to_save']!r}: the adapter replaces whole "
                                   f"modules, which kiln does not merge yet")
    for key, what in _UNMERGED_OPTIONS.items():
        if conf.get(key):
            raise KilnError(conf_path, f"{key}={conf[key]!r}: {what}, which kiln does not merge yet")
    r, alpha = conf.get("r", 8), conf.get("lora_alpha", 8)
    if not _positive(r, int) or not _positive(alpha, float):
        raise KilnError(conf_path, f"r and lora_alpha must be positive numbers, got r={r!r}, lora_alpha={alpha!r}")
    rslora = bool(conf.get("use_rslora", False))
    rank_pattern, alpha_pattern = conf.get("rank_pattern") or {}, conf.get("alpha_pattern") or {}
    if not isinstance(rank_pattern, dict) or not isinstance(alpha_pattern, dict):
        raise KilnError(conf_path, "rank_pattern and alpha_pattern must be objects")
    weights = folder / PEFT_WEIGHTS
    if not weights.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise KilnError(folder, "adapter_model.bin (a pickle) is not read; save the adapter with "
                                    "safe_serialization (adapter_model.safetensors)")
        raise KilnError(folder, f"{PEFT_WEIGHTS} is missing")
    from .safetensors_file import read_safetensors
    tensors = read_safetensors(weights).tensors
    hf_roles = {name: role for role, name in A.layer_roles(family.hf_names, cfg.num_layers).items()}
    modules: dict[str, dict[str, Weight]] = {}
    for name, w in tensors.items():
        module, part = _peft_module(name)
        if name.endswith(".base_layer.weight"):
            raise KilnError(weights, f"{name} is a full copy of a base tensor (peft saves one for embeddings resized "
                                     f"to new tokens); kiln does not replace base tensors yet")
        if module is None:
            raise KilnError(weights, f"tensor {name} is not a LoRA A or B matrix (kiln merges lora_A/lora_B pairs)")
        modules.setdefault(module, {})[part] = w
    adapter = Adapter(folder, "peft", float(alpha))
    for module, parts in modules.items():
        if set(parts) != {"A", "B"}:
            raise KilnError(weights, f"{module} has lora_{''.join(parts)} without its other half")
        embedding = module.endswith("#embedding")
        module = module.removesuffix("#embedding")
        role = hf_roles.get(module + ".weight")
        if role is None:
            raise KilnError(weights, f"{module} is not a matrix of a {family.name} model kiln knows")
        a, b = parts["A"], parts["B"]
        if embedding:                 # PEFT's embedding pair: delta = (B_e @ A_e)ᵀ, as a linear pair
            a, b = b.transpose(), a.transpose()
        m_r = _pattern(rank_pattern, module, r)
        m_alpha = _pattern(alpha_pattern, module, alpha)
        scale = float(m_alpha) / (math.sqrt(m_r) if rslora else float(m_r))
        adapter.pairs[role] = _checked_pair(weights, module, a, b, scale)
    if not adapter.pairs:
        raise KilnError(weights, "the adapter holds no LoRA matrices")
    return adapter


# PEFT options that change what an adapter computes beyond W + s·B@A
_UNMERGED_OPTIONS = {
    "lora_bias": "lora_B carries a bias",
    "trainable_token_indices": "the adapter retrains some embedding rows",
    "layer_replication": "the adapter repeats base layers",
    "alora_invocation_tokens": "an activated LoRA applies only after its invocation tokens",
    "target_parameters": "the adapter targets bare parameters (e.g. fused experts)",
}


def _peft_module(name: str) -> tuple[str | None, str]:
    """``base_model.model.X.lora_A.weight`` -> (X, "A"); embeddings as ``X#embedding``."""
    for suffix, part, extra in ((".lora_A.weight", "A", ""), (".lora_B.weight", "B", ""),
                                (".lora_embedding_A", "A", "#embedding"), (".lora_embedding_B", "B", "#embedding")):
        if name.endswith(suffix):
            module = name[: -len(suffix)]
            return module.removeprefix(PEFT_PREFIX) + extra, part
    return None, ""


def _pattern(patterns: dict, module: str, default):
    """PEFT's per-module override: a key matches the module's name or a dotted suffix of it."""
    for key, value in patterns.items():
        if module == key or module.endswith("." + key):
            return value
    return default


def _positive(v, kind) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and (kind is float or float(v).is_integer())


def _checked_pair(path, what: str, a: Weight, b: Weight, scale: float) -> LoraPair:
    if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1] or a.shape[0] == 0:
        raise KilnError(path, f"{what}: lora A {list(a.shape)} and B {list(b.shape)} are not a rank-r pair "
                              f"(A [r, in], B [out, r])")
    if not math.isfinite(scale):
        raise KilnError(path, f"{what}: the scale {scale} is not finite")
    return LoraPair(a, b, scale)


def _read_gguf(path: Path, family: A.Family, cfg: A.ArchConfig) -> Adapter:
    from .gguf import rope_unpermute_rows
    from .gguf_file import read_gguf
    f = read_gguf(path)
    meta = f.metadata
    if meta.get("general.type") != "adapter" or meta.get("adapter.type") != "lora":
        raise KilnError(path, "not a LoRA adapter (general.type is not 'adapter' with adapter.type 'lora')")
    arch = meta.get("general.architecture")
    if arch != family.gguf_arch:
        raise KilnError(path, f"the adapter is for {arch!r} models; the base is {family.gguf_arch!r}")
    alpha = meta.get("adapter.lora.alpha", 0.0)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha < 0:
        raise KilnError(path, f"adapter.lora.alpha {alpha!r} is not a non-negative number")
    gguf_roles = {name: role for role, name in A.layer_roles(family.gguf_names, cfg.num_layers).items()}
    parts: dict[str, dict[str, Weight]] = {}
    for name, w in f.tensors.items():
        base, dot, kind = name.rpartition(".")
        if kind not in ("lora_a", "lora_b"):
            raise KilnError(path, f"tensor {name} is not a LoRA A or B matrix")
        parts.setdefault(base, {})[kind] = w
    adapter = Adapter(path, "gguf", float(alpha), architecture=arch)
    for base, ab in parts.items():
        if set(ab) != {"lora_a", "lora_b"}:
            raise KilnError(path, f"{base} has {', '.join(ab)} without its other half")
        role = gguf_roles.get(base)
        if role is None:
            raise KilnError(path, f"{base} is not a matrix of a {family.name} model kiln knows")
        a, b = ab["lora_a"], ab["lora_b"]
        if role == "embed":          # llama.cpp's token_embd pair: lora_a [vocab, r], lora_b [hidden, r]
            a, b = b.transpose(), a
        pair = _checked_pair(path, base, a, b, 0.0)
        # llama.cpp: scale = alpha / r, or 1 when the file gives no alpha
        pair.scale = float(alpha) / pair.rank if alpha else 1.0
        heads = _rope_heads(role, family, cfg)
        if heads:
            pair.b = pair.b.take_rows(rope_unpermute_rows(pair.b.shape[0], heads))
        adapter.pairs[role] = pair
    if not adapter.pairs:
        raise KilnError(path, "the adapter holds no LoRA matrices")
    return adapter


def _rope_heads(role: str, family: A.Family, cfg: A.ArchConfig) -> int | None:
    """The head count whose rope order llama.cpp permutes this role's rows by (q and k of the
    families it permutes), else None."""
    parts = role.split(".")
    if not family.rope_permuted_in_gguf or len(parts) != 4 or parts[2] not in ("q", "k"):
        return None
    return cfg.num_heads if parts[2] == "q" else cfg.num_kv_heads


# ---- merging -------------------------------------------------------------------------------

def merged(model, adapters: list[tuple[Adapter, float]]):
    """``model`` (a ModelIR) with every adapter's scaled products added to its matrices, in
    float32; ``adapters`` pairs each adapter with the user's extra scale (``--lora-scale``)."""
    from kiln.ir import ModelIR

    from .builder import build_graph
    cfg = A.ArchConfig.from_dict(model.config)
    weights = dict(model.weights)
    deltas: dict[str, list[tuple[LoraPair, float, Path]]] = {}
    for adapter, user_scale in adapters:
        for role, pair in adapter.pairs.items():
            for part_role, part in _split(role, pair, cfg):
                deltas.setdefault(part_role, []).append((part, user_scale, adapter.path))
    for role, items in deltas.items():
        if role not in weights:
            raise KilnError(items[0][2], f"adapts {role}, which the base model does not have")
        w = weights[role]
        for pair, _, path in items:
            if (pair.b.shape[0], pair.a.shape[1]) != tuple(w.shape):
                raise KilnError(path, f"{role}: B @ A is {pair.b.shape[0]}x{pair.a.shape[1]}, "
                                      f"the base's matrix is {w.shape[0]}x{w.shape[1]}")
        weights[role] = w.map_values(_adder(items))
    if not deltas:
        return model
    source = dict(model.source)
    source["lora"] = [{"path": os.fspath(a.path), "format": a.format, "scale": s,
                       "matrices": len(a.pairs)} for a, s in adapters]
    family = A.FAMILIES[cfg.family]
    return ModelIR(graph=build_graph(cfg, weights, name=family.name), config=model.config, weights=weights,
                   source=source, tokenizer=model.tokenizer, generation=model.generation)


def _adder(items):
    def add(values: np.ndarray) -> np.ndarray:
        out = np.array(values, dtype=np.float32)
        for pair, user_scale, _ in items:
            out += np.float32(pair.scale * user_scale) * (pair.b.numpy() @ pair.a.numpy())
        return out
    return add


def _split(role: str, pair: LoraPair, cfg: A.ArchConfig):
    """A fused tensor's pair as its parts' pairs (B's rows split, A shared)."""
    parts = role.split(".")
    if len(parts) != 4 or parts[2] not in A.FUSED:
        yield role, pair
        return
    start = 0
    for name, rows in A.FUSED[parts[2]]:
        n = rows(cfg)
        yield f"{parts[0]}.{parts[1]}.{name}.{parts[3]}", LoraPair(
            pair.a, pair.b.take_rows(np.arange(start, start + n)), pair.scale)
        start += n


def apply_adapters(model, specs: list[tuple[str, float]]):
    """Read each ``(path, scale)`` adapter for ``model``'s family and merge them all."""
    if not specs:
        return model
    cfg = A.ArchConfig.from_dict(model.config)
    family = A.FAMILIES[cfg.family]
    adapters = [(read_adapter(path, family, cfg), float(scale)) for path, scale in specs]
    return merged(model, adapters)


# ---- writing llama.cpp's LoRA GGUF -----------------------------------------------------------

def write_gguf_adapter(adapter: Adapter, family: A.Family, cfg: A.ArchConfig, path, *, dtype: str = "f32",
                       progress=None) -> dict:
    """The adapter as llama.cpp's LoRA GGUF (what its convert_lora_to_gguf.py writes): per
    matrix ``<tensor>.lora_a`` [r, in] and ``.lora_b`` [out, r] under the base's GGUF names,
    q/k's B rows in llama.cpp's rope order, one ``adapter.lora.alpha``. A module whose scale is
    not ``alpha / r`` (PEFT's patterns, rsLoRA) has the difference folded into its B."""
    from .gguf import rope_permute_rows
    from .gguf_file import typed, write_gguf
    if dtype not in ("f32", "f16", "bf16"):
        raise KilnError(path, f"LoRA matrices are written as f32, f16 or bf16, not {dtype}")
    names = A.layer_roles(family.gguf_names, cfg.num_layers)
    alpha = adapter.alpha
    tensors = []
    for role, pair in adapter.pairs.items():
        if role not in names:
            raise KilnError(path, f"{family.name} GGUF files have no tensor for {role}")
        b = pair.b
        wanted = alpha / pair.rank if alpha else 1.0
        if not math.isclose(pair.scale, wanted, rel_tol=1e-7):
            ratio = np.float32(pair.scale / wanted)
            b = b.map_values(lambda v, r=ratio: v * r)
        heads = _rope_heads(role, family, cfg)
        if heads:
            b = b.take_rows(rope_permute_rows(b.shape[0], heads))
        a = pair.a
        if role == "embed":          # llama.cpp reads token_embd's pair flipped: lora_a [vocab, r], lora_b [hidden, r]
            a, b = b, a.transpose()
        tensors.append((names[role] + ".lora_a", a.astype(dtype)))
        tensors.append((names[role] + ".lora_b", b.astype(dtype)))
    meta = {"general.architecture": family.gguf_arch, "general.type": "adapter",
            "general.name": adapter.path.name, "adapter.type": "lora",
            "adapter.lora.alpha": typed(float(alpha), "float32")}
    write_gguf(path, meta, tensors, progress=progress)
    return {"format": "gguf", "path": os.fspath(path), "tensors": len(tensors), "lora_matrices": len(adapter.pairs)}


def convert_adapter(src, dst, base, *, dtype: str | None = None, progress=None) -> dict:
    """``kiln convert ADAPTER out.gguf --to gguf --base BASE``: the base gives the family,
    the layer count and the GGUF names."""
    from .detect import read_model
    model = read_model(base)
    cfg = A.ArchConfig.from_dict(model.config)
    family = A.FAMILIES[cfg.family]
    adapter = read_adapter(src, family, cfg)
    return write_gguf_adapter(adapter, family, cfg, dst, dtype=dtype or "f32", progress=progress)


def describe(adapter: Adapter) -> str:
    ranks = sorted({p.rank for p in adapter.pairs.values()})
    return (f"LoRA adapter ({adapter.format}): {len(adapter.pairs)} matrices, rank {'/'.join(map(str, ranks))}, "
            f"alpha {adapter.alpha:g}")

