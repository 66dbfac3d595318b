"""GGUF models: metadata -> ArchConfig, tensors -> roles, vocabulary -> tokenizer.

The container itself (parsing, validation, writing) lives in ``gguf_file``; this module knows
what llama.cpp's keys and tensor names mean. Quantized tensors stay in their blocks: the only
transform on the way in, llama.cpp's interleaving of q/k rows for its rotary kernel, is a row
permutation, which whole-row block formats survive untouched.
"""
from __future__ import annotations

import math
import os
import reprlib
from pathlib import Path

import numpy as np

from kiln.errors import KilnError
from kiln.ir import ModelIR
from kiln.weights import Weight

from . import arch as A
from . import gguf_rope
from .builder import build_graph
from .moe import MOE_FAMILIES, gguf_expert_keys, gguf_experts


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
    if arch == "llama" and meta.get("llama.expert_count"):
        family = A.FAMILIES["mixtral"]       # llama.cpp's converter writes Mixtral as llama with experts
    if family is None:
        raise KilnError(path, f"unsupported architecture {reprlib.repr(arch)} "
                        f"(kiln reads: {', '.join(sorted({f.gguf_arch for f in A.FAMILIES.values()}))})")

    def key(name, default=None, required=True, whole=True):
        v = meta.get(f"{arch}.{name}", default)
        if v is None and required:
            raise KilnError(path, f"metadata key {arch}.{name} is missing")
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            kind = "a string" if isinstance(v, str) else "an array" if isinstance(v, list) else type(v).__name__
            raise KilnError(path, f"metadata key {arch}.{name} is {kind}, not a number")
        if v is not None and whole:
            # counts and sizes: llama.cpp reads them as uint32 (a float here could be inf or 2.5)
            if isinstance(v, float) and not v.is_integer():
                raise KilnError(path, f"metadata key {arch}.{name} is {v}, not a whole number")
            if not -2**31 <= v < 2**32:
                raise KilnError(path, f"metadata key {arch}.{name} is {int(v)}, out of range for a count")
        return v

    def token_id(name):
        v = meta.get(f"tokenizer.ggml.{name}")
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
            raise KilnError(path, f"metadata key tokenizer.ggml.{name} is {reprlib.repr(v)}, not a token id")
        return int(v)

    try:
        heads = int(key("attention.head_count"))
        hidden = int(key("embedding_length"))
        kv = int(key("attention.head_count_kv", heads))
        head_dim = int(key("attention.key_length", hidden // heads if heads > 0 else 0))
        tokens = meta.get("tokenizer.ggml.tokens")
        vocab = int(key("vocab_size", len(tokens) if tokens else None))
        eos = token_id("eos_token_id")
        cfg = A.ArchConfig(
            family=family.name,
            vocab_size=vocab,
            hidden_size=hidden,
            num_layers=int(key("block_count")),
            num_heads=heads,
            num_kv_heads=kv,
            head_dim=head_dim,
            intermediate_size=int(key("feed_forward_length")),
            norm_eps=float(key("attention.layer_norm_rms_epsilon" if f"{arch}.attention.layer_norm_rms_epsilon" in meta
                               else "attention.layer_norm_epsilon", 1e-5, whole=False)),
            tie_word_embeddings="output.weight" not in tensors,
            rotary_dim=int(key("rope.dimension_count", head_dim)),
            rope_theta=float(key("rope.freq_base", 10000.0, whole=False)),
            max_position_embeddings=int(key("context_length", 2048)),
            sliding_window=None if (sw := key("attention.sliding_window", required=False)) is None else int(sw),
            bos_token_id=token_id("bos_token_id"),
            eos_token_ids=[eos] if eos is not None else [],
            pad_token_id=token_id("padding_token_id"),
        )
    except (TypeError, ValueError) as e:
        text = str(e)
        raise KilnError(path, f"bad model metadata: {text if len(text) <= 160 else text[:157] + '...'}") from None
    for k, v in family.flags.items():
        setattr(cfg, k, v)
    if family.name in MOE_FAMILIES:
        gguf_experts(key, meta, arch, cfg, path)
    for f, suffix in family.gguf_scalars.items():
        v = key(suffix, required=False, whole=False)
        if v is not None and not math.isfinite(v):
            raise KilnError(path, f"metadata key {arch}.{suffix} is {v}, not a finite number")
        if v is not None:
            setattr(cfg, f, gguf_rope.short_float(v))
    if family.gguf_norm_plus_one:
        cfg.norm_offset = 0.0        # llama.cpp stores the norm weights with the 1 already added
    if family.scaled_embedding:
        cfg.embed_scale = float(hidden) ** 0.5
        cfg.activation = "gelu_tanh"
    if family.global_every:
        _gemma_layers(meta, cfg, family, arch, path)
    if family.name == "qwen3":
        cfg.qk_norm = True
    if family.name == "gpt2":
        cfg.activation = "gelu_tanh"
        cfg.tie_word_embeddings = "output.weight" not in tensors
    keys = {f: f"{arch}.{k}" for f, k in {**_METADATA_KEYS, **family.gguf_scalars}.items()}
    A.check_config(path, cfg, keys)
    cfg.rope_scaling = gguf_rope.from_gguf(meta, tensors, cfg, arch, path)
    if cfg.rope_scaling:
        A.check_config(path, cfg, keys)
    return family, cfg


def _gemma_layers(meta: dict, cfg: A.ArchConfig, family: A.Family, arch: str, path) -> None:
    """gemma2/3's sliding layers, their rope base and the attention scale, as llama.cpp reads
    them: a GGUF without sliding_window_pattern / rope.freq_base_swa / attention.scale means
    llama.cpp's fixed choices (every 2nd / 6th layer global, base 10000, 1/sqrt(head_dim) but
    1/sqrt(hidden/heads) for the 27B models, which it knows by their layer count)."""
    pattern = meta.get(f"{arch}.attention.sliding_window_pattern")
    if not cfg.sliding_window:
        cfg.layer_types = []
    elif pattern is not None:
        if not isinstance(pattern, list) or len(pattern) != cfg.num_layers \
                or not all(isinstance(x, bool) for x in pattern):
            raise KilnError(path, f"metadata key {arch}.attention.sliding_window_pattern is not one true/false "
                                  f"per layer ({cfg.num_layers})")
        cfg.layer_types = [A.LAYER_TYPES[0] if x else A.LAYER_TYPES[1] for x in pattern]
    else:
        cfg.layer_types = A.default_layer_types(cfg.num_layers, family.global_every)
    if family.name == "gemma3":
        base = meta.get(f"{arch}.rope.freq_base_swa", 10000.0)
        if isinstance(base, bool) or not isinstance(base, (int, float)) or not (math.isfinite(base) and base > 0):
            raise KilnError(path, f"metadata key {arch}.rope.freq_base_swa is {reprlib.repr(base)}, not a positive number")
        cfg.rope_local_theta = gguf_rope.short_float(base)
    if f"{arch}.attention.scale" not in meta and family.scaled_embedding:
        big = cfg.num_layers == (46 if family.name == "gemma2" else 62)
        cfg.attn_scale = (cfg.hidden_size / cfg.num_heads if big else cfg.head_dim) ** -0.5


def _llama_cpp_gemma_notes(cfg: A.ArchConfig, family: A.Family) -> list[str]:
    """Where llama.cpp's fixed gemma2/3 choices (see _gemma_layers) differ from this model: kiln
    writes the model's own values, which llama.cpp does not read."""
    arch, notes = family.gguf_arch, []
    fixed = A.ArchConfig(**{**cfg.to_dict(), "layer_types": []})
    _gemma_layers({}, fixed, family, arch, None)
    scale = cfg.attn_scale if cfg.attn_scale is not None else cfg.head_dim ** -0.5
    if fixed.attn_scale is not None and not math.isclose(scale, fixed.attn_scale, rel_tol=1e-6):
        notes.append(f"llama.cpp's {arch} graph scales attention scores by {fixed.attn_scale:.6g}, not this model's "
                     f"{scale:.6g} (query_pre_attn_scalar; kiln writes it in {arch}.attention.scale)")
    if cfg.sliding_window and cfg.layer_types and cfg.layer_types != fixed.layer_types:
        notes.append(f"llama.cpp's {arch} graph makes every {family.global_every}th layer global, not this model's "
                     f"layers (kiln writes them in {arch}.attention.sliding_window_pattern)")
    if cfg.rope_local_theta is not None and cfg.rope_local_theta != fixed.rope_local_theta:
        notes.append(f"llama.cpp's {arch} graph rotates the sliding layers at base {fixed.rope_local_theta:g}, not "
                     f"this model's {cfg.rope_local_theta:g} (kiln writes it in {arch}.rope.freq_base_swa)")
    return notes


# ArchConfig fields as llama.cpp's metadata names them (after the architecture prefix)
_METADATA_KEYS = {"vocab_size": "vocab_size", "hidden_size": "embedding_length", "num_layers": "block_count",
                  "num_heads": "attention.head_count", "num_kv_heads": "attention.head_count_kv",
                  "head_dim": "attention.key_length", "intermediate_size": "feed_forward_length",
                  "max_position_embeddings": "context_length"}


def load_weights(path, tensors: dict[str, Weight], family: A.Family, cfg: A.ArchConfig) -> dict[str, Weight]:
    out = A.roles_from_file(path, tensors, family.gguf_names, cfg, layers_key=f"{family.gguf_arch}.block_count")
    n = cfg.num_layers
    extra = sorted(name for name in tensors if name.startswith(f"blk.{n}."))
    if extra:
        raise KilnError(path, f"the file holds tensors for layer {n} (e.g. {extra[0]}), but "
                              f"{family.gguf_arch}.block_count says {n} layers")
    if family.rope_permuted_in_gguf:
        for i in range(cfg.num_layers):
            for r, heads in (("q", cfg.num_heads), ("k", cfg.num_kv_heads)):
                role = f"layers.{i}.{r}.weight"
                w = out[role]
                out[role] = w.take_rows(rope_unpermute_rows(w.shape[0], heads))
    return out


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
        tokenizer = from_gguf_metadata(f.metadata, path)
    gen = {"eos_token_id": cfg.eos_token_ids} if cfg.eos_token_ids else {}
    formats: dict[str, int] = {}
    for t in f.tensors.values():
        formats[t.format.name] = formats.get(t.format.name, 0) + 1
    return ModelIR(graph=graph, config=cfg.to_dict(), weights=weights,
                   source={"format": "gguf", "path": os.fspath(path), "tensor_formats": formats,
                           "name": f.metadata.get("general.name")},
                   tokenizer=tokenizer, generation=gen)


# ---- writing ------------------------------------------------------------------------------

# llama.cpp's general.file_type values (enum llama_ftype) for the main tensor type of a file
FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "q2_k": 10,
              "q3_k": 12, "q4_k": 15, "q5_k": 17, "q6_k": 18, "bf16": 32}
# roles llama.cpp always keeps in float32 (norms, biases and other 1-D tensors are F32 too)
_ALWAYS_F32 = ("pos_embed",)


def tensor_format(role: str, w: Weight, dtype: str | None, quant: str | None, layout=None) -> str:
    """The GGUF type of one tensor, following llama.cpp's converter: 1-D tensors and position
    embeddings stay F32; ``quant`` (a block type or a llama.cpp mixture, ``kiln.quant_schemes``,
    with llama.cpp's fallback types for rows that are not whole blocks) picks the rest."""
    if len(w.shape) < 2 or role in _ALWAYS_F32:
        return "f32"
    if quant:
        from kiln import quant_schemes
        return quant_schemes.get(quant).gguf_type(role, w.shape, layout)
    if dtype:
        return dtype
    if w.format.gguf_type is not None:
        return w.format.name           # keep the source's storage: no requantization
    return "f32"


def _metadata(model: ModelIR, family: A.Family, cfg: A.ArchConfig, file_type: int) -> dict:
    from .gguf_file import typed
    arch = family.gguf_arch
    m = {
        "general.architecture": arch,
        "general.type": "model",
        "general.name": model.source.get("name") or Path(model.source.get("path", "model")).name,
        "general.file_type": typed(file_type, "uint32"),
        "general.quantization_version": typed(2, "uint32"),
        f"{arch}.vocab_size": typed(cfg.vocab_size, "uint32"),
        f"{arch}.context_length": typed(cfg.max_position_embeddings, "uint32"),
        f"{arch}.embedding_length": typed(cfg.hidden_size, "uint32"),
        f"{arch}.block_count": typed(cfg.num_layers, "uint32"),
        f"{arch}.feed_forward_length": typed(cfg.intermediate_size, "uint32"),
        f"{arch}.attention.head_count": typed(cfg.num_heads, "uint32"),
        f"{arch}.attention.head_count_kv": typed(cfg.num_kv_heads, "uint32"),
    }
    eps_key = "attention.layer_norm_epsilon" if cfg.norm == "layer" else "attention.layer_norm_rms_epsilon"
    m[f"{arch}.{eps_key}"] = typed(cfg.norm_eps, "float32")
    if cfg.rotary_dim:
        m[f"{arch}.rope.freq_base"] = typed(cfg.rope_theta, "float32")
        m[f"{arch}.rope.dimension_count"] = typed(cfg.rotary_dim, "uint32")
    if cfg.head_dim * cfg.num_heads != cfg.hidden_size or family.name in ("gemma", "gemma2", "gemma3", "qwen3", "qwen3_moe"):
        m[f"{arch}.attention.key_length"] = typed(cfg.head_dim, "uint32")
        m[f"{arch}.attention.value_length"] = typed(cfg.head_dim, "uint32")
    for f, suffix in family.gguf_scalars.items():
        v = getattr(cfg, f)
        if v is not None:
            m[f"{arch}.{suffix}"] = typed(float(v), "float32")
    if cfg.num_experts:
        m.update({f"{arch}.{k}": v if isinstance(v, bool) else typed(v, "uint32")
                  for k, v in gguf_expert_keys(cfg).items()})
    if cfg.layer_types:
        m[f"{arch}.attention.sliding_window_pattern"] = [t == A.LAYER_TYPES[0] for t in cfg.layer_types]
    if cfg.rope_local_theta is not None:
        m[f"{arch}.rope.freq_base_swa"] = typed(cfg.rope_local_theta, "float32")
    m.update(gguf_rope.for_gguf(cfg, arch)[0])      # rope scaling and attention window
    if model.tokenizer is not None:
        from .tokenizer import to_gguf_metadata
        m.update(to_gguf_metadata(model.tokenizer))
    else:
        m["tokenizer.ggml.model"] = "no_vocab"
        for key, val in (("bos_token_id", cfg.bos_token_id), ("eos_token_id", (cfg.eos_token_ids or [None])[0]),
                         ("padding_token_id", cfg.pad_token_id)):
            if val is not None:
                m[f"tokenizer.ggml.{key}"] = typed(int(val), "uint32")
    return m


def _imatrix_metadata(path, im) -> dict:
    """The keys llama-quantize adds for --imatrix (strings cut to 127 bytes, as it does)."""
    from .gguf_file import typed
    m = {"quantize.imatrix.file": os.fspath(path)[:127]}
    if im.datasets:
        m["quantize.imatrix.dataset"] = im.datasets[0][:127]
    m["quantize.imatrix.entries_count"] = typed(len(im.entries), "uint32")
    if im.chunk_count > 0:
        m["quantize.imatrix.chunks_count"] = typed(im.chunk_count, "uint32")
    return m


def gguf_tensors(model: ModelIR, family: A.Family, cfg: A.ArchConfig) -> dict[str, Weight]:
    """Canonical role weights -> GGUF tensor names, with llama.cpp's layout transforms."""
    weights = dict(model.weights)
    if cfg.tie_word_embeddings:
        weights.pop("lm_head", None)
    if family.rope_permuted_in_gguf:
        for i in range(cfg.num_layers):
            for r, heads in (("q", cfg.num_heads), ("k", cfg.num_kv_heads)):
                role = f"layers.{i}.{r}.weight"
                weights[role] = weights[role].take_rows(rope_permute_rows(weights[role].shape[0], heads))
    if family.gguf_norm_plus_one and cfg.norm_offset:
        weights = A.shift_norms(weights, +1.0)      # llama.cpp stores gemma's (1 + w) norm scale
    return A.to_file_names(weights, family.gguf_names, family, cfg, "GGUF")


def write(model: ModelIR, path, *, dtype: str | None = None, quant: str | None = None, progress=None,
          imatrix=None) -> dict:
    """Write ``model`` as a GGUF file llama.cpp loads; returns a summary. ``imatrix`` (a path,
    with ``quant``): weight the quantizers by that importance matrix, as llama-quantize
    --imatrix does, and record it in the metadata as llama-quantize does."""
    from .gguf_file import write_gguf
    cfg = A.ArchConfig.from_dict(model.config)
    family = A.FAMILIES[cfg.family]
    _, extra, notes = gguf_rope.for_gguf(cfg, family.gguf_arch)
    if family.global_every:
        notes += _llama_cpp_gemma_notes(cfg, family)
    # llama.cpp's converter writes these first (rope_freqs, longrope's factors), always F32
    tensors = {name: (name.split(".")[0], Weight.from_array(a, name=name)) for name, a in extra.items()}
    tensors.update(gguf_tensors(model, family, cfg))
    planned = []
    counts: dict[str, int] = {}
    layout = None
    if quant:
        from kiln.quant_schemes import Layout
        layout = Layout.of(cfg, family)
    im = None
    if quant and imatrix is not None:
        from kiln.imatrix import load_for_quantizing
        im = load_for_quantizing(imatrix, {n: w.shape[-1] for n, (_, w) in tensors.items() if len(w.shape) == 2})
    for name, (role, w) in tensors.items():
        fmt = tensor_format(role, w, dtype, quant, layout)
        counts[fmt] = counts.get(fmt, 0) + 1
        planned.append((name, w.astype(fmt, im.importance(name) if im is not None else None)))
    if quant or dtype:
        main = quant or dtype
    else:
        others = {f: c for f, c in counts.items() if f != "f32"}
        main = max(others, key=others.get) if others else "f32"
    if quant and main not in FILE_TYPES:
        from kiln.quant_schemes import get
        file_type = get(quant).file_type or 0           # a mixture's own llama_ftype
    else:
        file_type = FILE_TYPES.get(main, 0)
    meta = _metadata(model, family, cfg, file_type)
    if im is not None:
        meta.update(_imatrix_metadata(imatrix, im))
    write_gguf(path, meta, planned, progress=progress)
    return {"tensors": len(planned), "formats": counts,
            "bytes_in": sum(w.nbytes for name, (_, w) in tensors.items() if name not in extra),
            "bytes_out": os.path.getsize(path), "notes": notes}
