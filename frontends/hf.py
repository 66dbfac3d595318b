"""Hugging Face folders: config.json + safetensors (single or sharded) or PyTorch .bin files."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path


from kiln.errors import KilnError, load_json_object
from kiln.ir import ModelIR
from kiln.weights import Weight

from . import arch as A
from .builder import build_graph
from .moe import MOE_FAMILIES, hf_expert_config, hf_experts


def is_hf_folder(path) -> bool:
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def _show(v, style=json.dumps) -> str:
    """A config value fit for a one-line message: hostile files hold 4000-digit numbers."""
    try:
        text = style(v)
    except (TypeError, ValueError):
        text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    cfg = load_json_object(path, unreadable="not a readable JSON config",
                           not_object="config.json is not a JSON object")
    return cfg


def _local_rope(cfg: dict) -> tuple[dict, float | None]:
    """gemma3 rotates its sliding layers apart: transformers 5 nests rope_parameters per layer
    type; older configs give rope_local_base_freq. Returns (the config with the global layers'
    rope where the generic reader looks for it, the sliding layers' base or None)."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and isinstance(params.get("full_attention"), dict):
        local = params.get("sliding_attention") or {}
        if not isinstance(local, dict) or local.get("rope_type", "default") != "default":
            raise ValueError("rope_parameters (kiln reads plain rotary for the sliding_attention layers)")
        return {**cfg, "rope_parameters": params["full_attention"]}, _base(local.get("rope_theta", 10000.0),
                                                                          "the sliding_attention rope_theta")
    if "rope_local_base_freq" in cfg:
        return cfg, _base(cfg["rope_local_base_freq"], "rope_local_base_freq")
    return cfg, None


def _base(v, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v < 2**63):
        raise ValueError(f"rope_parameters ({what} is not a positive number)")
    return float(v)


def _rope_params(cfg: dict) -> tuple[float, dict]:
    """(theta, scaling dict) from either transformers 5's rope_parameters or the older keys."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        scaling = {k: v for k, v in params.items() if k not in ("rope_theta",)}
        if scaling.get("rope_type", "default") == "default" and len(scaling) <= 2:
            scaling = {k: v for k, v in scaling.items() if k != "partial_rotary_factor"}
            scaling = {} if scaling.get("rope_type", "default") == "default" else scaling
        return float(params["rope_theta"]), scaling
    scaling = cfg.get("rope_scaling") or {}
    return float(cfg.get("rope_theta", 10000.0)), dict(scaling)


def _eos_list(v) -> list:
    if v is None:
        return []
    return [int(x) for x in v] if isinstance(v, list) else [int(v)]


def text_prefixes(cfg: dict) -> tuple:
    """For a multimodal checkpoint kiln reads the language model of: (tensor prefix, its name in
    the text model's own checkpoints) pairs; else ()."""
    model_type = cfg.get("model_type")
    family = A.family_for_model_type(model_type) if isinstance(model_type, str) else None
    return family.hf_multimodal.get(model_type, ()) if family is not None else ()


def _text_config(cfg: dict, family: A.Family, path: Path) -> dict:
    """A multimodal config's text_config, as the text model's own config (token ids and tying
    may be stated on the outer config only)."""
    text = cfg.get("text_config")
    if not isinstance(text, dict):
        raise KilnError(path / "config.json", f"a {cfg['model_type']} config needs a text_config object "
                                              f"(kiln reads its language model)")
    outer = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings") if k in cfg}
    return {**outer, **text, "model_type": family.hf_model_types[0]}


def arch_config(cfg: dict, path: Path) -> tuple[A.Family, A.ArchConfig]:
    """Normalise a transformers config.json into kiln's ArchConfig."""
    model_type = cfg.get("model_type")
    family = A.family_for_model_type(model_type) if isinstance(model_type, str) else None
    if family is None:
        names = {t for f in A.FAMILIES.values() for t in (*f.hf_model_types, *f.hf_multimodal)}
        raise KilnError(path / "config.json", f"unsupported architecture {_show(model_type, repr)} "
                        f"(kiln reads: {', '.join(sorted(names))})")
    if model_type in family.hf_multimodal:
        cfg = _text_config(cfg, family, path)
    cfg = {**family.hf_defaults, **cfg}
    scalars = dict(family.hf_scalars)
    for key in (*_NUMBERS, *(family.hf_config_aliases[k] for k in _NUMBERS if k in family.hf_config_aliases),
                *scalars.values()):
        v = cfg.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise KilnError(path / "config.json", f"{key} is {_show(v)}, not a number")
        if v is not None and not (abs(v) < 2**63 and math.isfinite(v)):     # JSON's 1e400, NaN, 10**4000
            raise KilnError(path / "config.json", f"{key} is {_show(v)}, not a finite number in range")
    for key in (*_WHOLE, *(family.hf_config_aliases[k] for k in _WHOLE if k in family.hf_config_aliases)):
        v = cfg.get(key)
        if isinstance(v, float):     # int(32.5) would quietly build a model of another size
            raise KilnError(path / "config.json", f"{key} is {_show(v)}, not a whole number")
        if isinstance(v, int) and not -2**31 <= v < 2**32:   # sizes and counts: llama.cpp's uint32
            raise KilnError(path / "config.json", f"{key} is {_show(v)}, out of range for a count")
    for key in ("rope_parameters", "rope_scaling"):
        if cfg.get(key) is not None and not isinstance(cfg[key], dict):
            raise KilnError(path / "config.json", f"{key} is not a JSON object")
    _check_token_ids(cfg, path / "config.json", cfg.get("vocab_size"))
    cfg = dict(cfg)
    for canonical, key in family.hf_config_aliases.items():
        if key in cfg and canonical not in cfg:
            cfg[canonical] = cfg[key]
    if cfg.get("intermediate_size") is None and "hidden_size" in cfg:
        cfg["intermediate_size"] = 4 * int(cfg["hidden_size"])     # GPT-2's n_inner default
    try:
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        kv = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or (hidden // heads if heads > 0 else 0))
        cfg, local_theta = _local_rope(cfg)
        theta, scaling = _rope_params(cfg)
        partial = (cfg.get("rope_parameters") or {}).get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
        c = A.ArchConfig(
            family=family.name,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=kv,
            head_dim=head_dim,
            intermediate_size=int(cfg["intermediate_size"]),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            activation=_activation(cfg.get("hidden_activation") or cfg.get("hidden_act", "silu")),
            attention_bias=bool(cfg.get("attention_bias", family.name == "qwen2")),
            output_bias=bool(cfg.get("attention_bias", False)) and family.name not in ("qwen2",),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=family.name == "qwen3",
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", family.scaled_embedding)),
            rotary_dim=int(head_dim * float(partial or 1.0)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            sliding_window=_sliding_window(cfg),
            layer_types=_layer_types(cfg, family),
            rope_local_theta=local_theta,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=_eos_list(cfg.get("eos_token_id")),
            pad_token_id=cfg.get("pad_token_id"),
        )
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise KilnError(path / "config.json", f"config is missing or has a bad value for {_show(str(e))[1:-1]}") from None
    for k, v in family.flags.items():
        setattr(c, k, v)
    if family.name in MOE_FAMILIES:
        hf_experts(cfg, c, path / "config.json")
    for f, key in scalars.items():
        if cfg.get(key) is not None:
            setattr(c, f, float(cfg[key]))
    if cfg.get("query_pre_attn_scalar") is not None:
        q = cfg["query_pre_attn_scalar"]
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not (0 < q < 2**63):
            raise KilnError(path / "config.json", f"query_pre_attn_scalar is {_show(q)}, not a positive number")
        c.attn_scale = float(q) ** -0.5         # gemma2/3 scale scores by it, not by head_dim
    if cfg.get("use_bidirectional_attention"):
        raise KilnError(path / "config.json", "use_bidirectional_attention is set: an embedding model, not a "
                                              "causal language model")
    if family.scaled_embedding:
        c.embed_scale = float(hidden) ** 0.5
    keys = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads"}
    A.check_config(path / "config.json", c, {**{f: family.hf_config_aliases.get(k, k) for f, k in keys.items()},
                                             **scalars})
    return family, c


# config.json keys that hold numbers (checked up front, so an error names the key)
_NUMBERS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
            "intermediate_size", "max_position_embeddings", "rms_norm_eps", "rope_theta", "partial_rotary_factor")


# config.json keys that count something: whole numbers (a JSON 32.0 included, as transformers
# would build nothing with it either)
_WHOLE = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
          "head_dim", "intermediate_size", "max_position_embeddings", "sliding_window")


def _check_token_ids(cfg: dict, path: Path, vocab) -> None:
    """bos/eos/pad ids name tokens: integers inside the vocabulary (eos may be a list)."""
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = cfg.get(key)
        if v is None:
            continue
        for x in (v if key == "eos_token_id" and isinstance(v, list) else [v]):
            if isinstance(x, bool) or not isinstance(x, int):
                raise KilnError(path, f"{key} is {_show(v)}, not a token id")
            if isinstance(vocab, int) and not isinstance(vocab, bool) and not 0 <= x < vocab:
                raise KilnError(path, f"{key} {_show(x)} is outside the vocabulary (vocab_size {_show(vocab)})")


def _activation(name: str) -> str:
    table = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
             "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh"}
    if not isinstance(name, str) or name not in table:
        raise ValueError(f"hidden_act ({_show(name, repr)} is not supported)")
    return table[name]


def _layer_types(cfg: dict, family: A.Family) -> list:
    types = cfg.get("layer_types")
    if types is None:
        return A.default_layer_types(int(cfg["num_hidden_layers"]), family.global_every) if family.global_every else []
    if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
        raise ValueError("layer_types (not a list of names)")
    return list(types)


def _sliding_window(cfg: dict):
    if cfg.get("use_sliding_window") is False:
        return None
    w = cfg.get("sliding_window")
    return int(w) if w else None


def _open_tensors(folder: Path) -> dict[str, Weight]:
    """Every tensor of the folder's checkpoint files, lazily."""
    from .safetensors_file import read_safetensors, read_sharded_index
    index = folder / "model.safetensors.index.json"
    single = folder / "model.safetensors"
    if index.is_file():
        weight_map = read_sharded_index(folder)
        shards = {f: read_safetensors(folder / f).tensors for f in sorted(set(weight_map.values()))}
        return {name: shards[f][name] for name, f in weight_map.items()}
    if single.is_file():
        return dict(read_safetensors(single).tensors)
    files = sorted(folder.glob("*.safetensors"))
    if files:
        out: dict[str, Weight] = {}
        for f in files:
            out.update(read_safetensors(f).tensors)
        return out
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if bins:
        from .torch_bin import read_torch_bin
        out = {}
        for f in bins:
            out.update(read_torch_bin(f))
        return out
    raise KilnError(folder, "no model weights found (expected model.safetensors, a sharded index, or pytorch_model.bin)")


def load_weights(folder: Path, family: A.Family, cfg: A.ArchConfig, prefixes: tuple = (),
                 quantization=None) -> dict[str, Weight]:
    """``prefixes``: a multimodal checkpoint's text tensors, renamed as the text model names them
    (the vision tower and projector are left out). ``quantization``: a GPTQ or AWQ checkpoint's
    scheme (``packed_int4.scheme``): its packed layers become int4 block weights."""
    tensors = _open_tensors(folder)
    if quantization is not None:
        from .packed_int4 import unpack
        tensors = unpack(tensors, quantization, folder)
    if prefixes:
        tensors = {new + name[len(old):]: w for name, w in tensors.items()
                   for old, new in prefixes if name.startswith(old)}
    return map_weights(folder, tensors, family, cfg)


def map_weights(folder, tensors: dict[str, Weight], family: A.Family, cfg: A.ArchConfig) -> dict[str, Weight]:
    """HF-named tensors -> canonical roles (transposing Conv1D, splitting fused tensors)."""
    def conv1d_to_linear(role, w):
        if family.hf_experts_transposed:
            from .moe import hf_experts_in
            return hf_experts_in(role, w)
        return w.transpose() if family.hf_conv1d and len(w.shape) == 2 and role.startswith("layers.") else w
    if "lm_head" in family.hf_names and family.hf_names["lm_head"] not in tensors:
        cfg.tie_word_embeddings = True      # checkpoints that drop lm_head tie it to the embedding
    if family.hf_experts_transposed:
        from .moe import hf_mxfp4_experts
        tensors = hf_mxfp4_experts(folder, tensors)
    return A.roles_from_file(folder, tensors, family.hf_names, cfg, layers_key="the config",
                             transform=conv1d_to_linear)


def read(path) -> ModelIR:
    folder = Path(path)
    if not folder.exists():
        raise KilnError(path, "no such file or folder")
    from .sentence_transformers import is_sentence_transformers
    if is_sentence_transformers(folder):         # an embedding model: its own reader
        from . import sentence_transformers
        return sentence_transformers.read(folder)
    if not is_hf_folder(folder):
        raise KilnError(path, "not a model: a Hugging Face folder needs a config.json")
    raw_cfg = read_config(folder)
    family, cfg = arch_config(raw_cfg, folder)
    from .packed_int4 import scheme
    packed = scheme(raw_cfg, folder)
    weights = load_weights(folder, family, cfg, text_prefixes(raw_cfg), packed)
    graph = build_graph(cfg, weights, name=family.name)
    tokenizer, gen = folder_extras(folder, cfg)
    return ModelIR(graph=graph, config=cfg.to_dict(), weights=weights,
                   source={"format": "hf", "path": os.fspath(folder), "config": raw_cfg,
                           "name": raw_cfg.get("_name_or_path") or folder.resolve().name,
                           **({"quantization": packed.summary()} if packed else {})},
                   tokenizer=tokenizer, generation=gen)


def folder_extras(folder: Path, cfg: A.ArchConfig):
    """What a model folder holds beside its weights: the tokenizer (None where there is none,
    or the tokenizers package is missing) and the generation defaults, EOS from the config
    where generation_config.json names none."""
    tokenizer = None
    try:
        from .tokenizer import from_hf_folder
        tokenizer = from_hf_folder(folder)
    except ImportError:
        pass
    gen = _generation_config(folder, cfg.vocab_size)
    if not gen.get("eos_token_id") and cfg.eos_token_ids:
        gen["eos_token_id"] = cfg.eos_token_ids
    return tokenizer, gen


def _generation_config(folder: Path, vocab_size: int) -> dict:
    p = folder / "generation_config.json"
    if not p.is_file():
        return {}
    d = load_json_object(p, unreadable="not a readable JSON file", not_object="not a JSON object")
    _check_token_ids(d, p, vocab_size)
    keep = ("eos_token_id", "bos_token_id", "pad_token_id", "temperature", "top_k", "top_p", "repetition_penalty", "do_sample", "max_new_tokens")
    out = {k: d[k] for k in keep if k in d and d[k] is not None}
    if "eos_token_id" in out:
        out["eos_token_id"] = _eos_list(out["eos_token_id"])
    return out


# ---- writing ------------------------------------------------------------------------------

HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                    "qwen3": "Qwen3ForCausalLM", "gemma": "GemmaForCausalLM", "phi3": "Phi3ForCausalLM",
                    "gpt2": "GPT2LMHeadModel", "granite": "GraniteForCausalLM", "olmo2": "Olmo2ForCausalLM",
                    "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM", "mixtral": "MixtralForCausalLM",
                    "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM",
                    "qwen2_moe": "Qwen2MoeForCausalLM", "gpt_oss": "GptOssForCausalLM"}
_HF_ACT = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
_TORCH_DTYPE = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}
DEFAULT_SHARD_BYTES = 2 * 1024**3


def hf_config(cfg: A.ArchConfig, family: A.Family, dtype: str) -> dict:
    """kiln's config -> a config.json transformers loads."""
    out = {
        "architectures": [HF_ARCHITECTURES[family.name]],
        "model_type": family.hf_model_types[0],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "gelu_new" if family.name == "gpt2" else _HF_ACT[cfg.activation],
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "torch_dtype": _TORCH_DTYPE[dtype],
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_ids[0] if len(cfg.eos_token_ids) == 1 else (cfg.eos_token_ids or None),
        "pad_token_id": cfg.pad_token_id,
    }
    if cfg.rotary_dim:
        out["rope_theta"] = cfg.rope_theta
        if cfg.rope_scaling:
            out["rope_scaling"] = dict(cfg.rope_scaling)
        if cfg.rotary_dim != cfg.head_dim:
            out["partial_rotary_factor"] = cfg.rotary_dim / cfg.head_dim
    for f, key in family.hf_scalars.items():
        v = getattr(cfg, f)
        if f == "attn_scale" and v is None:
            v = cfg.head_dim ** -0.5
        out[key] = v
    if family.name == "gpt_oss":
        out["attention_bias"] = cfg.attention_bias
    if family.name in ("llama", "qwen3", "granite", "olmo2"):
        out["attention_bias"] = cfg.attention_bias
        out["mlp_bias"] = cfg.mlp_bias
    if family.scaled_embedding:
        out["hidden_activation"] = out["hidden_act"]
    if family.global_every:
        if family.scaled_embedding:
            # query_pre_attn_scalar is a whole number in every gemma config; give it back as one
            q = (cfg.attn_scale or cfg.head_dim ** -0.5) ** -2
            out["query_pre_attn_scalar"] = round(q) if math.isclose(q, round(q), rel_tol=1e-6) else q
        out["sliding_window"] = cfg.sliding_window
        out["layer_types"] = list(cfg.layer_types) or ["sliding_attention" if cfg.sliding_window else "full_attention"] \
            * cfg.num_layers
    if cfg.rope_local_theta is not None:
        out["rope_local_base_freq"] = cfg.rope_local_theta
    if family.name in ("mistral", "qwen2", "qwen3", "phi3"):
        out["sliding_window"] = cfg.sliding_window
        if family.name.startswith("qwen"):
            out["use_sliding_window"] = bool(cfg.sliding_window)
    if cfg.num_experts:
        out.update(hf_expert_config(cfg))
    if family.name == "gpt2":
        for canonical, key in family.hf_config_aliases.items():
            if canonical in out:
                out[key] = out.pop(canonical)
        out["layer_norm_epsilon"] = out.pop("rms_norm_eps", cfg.norm_eps)
        for k in ("num_key_value_heads", "head_dim", "rope_theta"):
            out.pop(k, None)
    return out


def hf_family(cfg: A.ArchConfig, folder) -> A.Family:
    """The transformers family a config is written as. transformers' Llama has no attention
    window, Mistral is Llama with one: a llama model with a window (read from a GGUF file, whose
    llama architecture covers both) is written as Mistral."""
    family = A.FAMILIES[cfg.family]
    if A.rope_kind(cfg.rope_scaling) == "freq_factors":
        raise KilnError(folder, "the model's rope_freqs.weight factors match no rope scaling transformers knows "
                                "(llama3 with llama.cpp's defaults was tried), so config.json cannot state them")
    if family.name == "llama" and cfg.sliding_window:
        if cfg.attention_bias or cfg.output_bias or cfg.mlp_bias:
            raise KilnError(folder, f"transformers has no llama-family model with both biases and an attention "
                                    f"window ({cfg.sliding_window})")
        return A.FAMILIES["mistral"]
    return family


def hf_tensors(weights: dict[str, Weight], family: A.Family, cfg: A.ArchConfig) -> dict[str, Weight]:
    """Canonical role weights -> HF checkpoint names, undoing kiln's read transforms."""
    weights = dict(weights)
    if cfg.tie_word_embeddings:
        weights.pop("lm_head", None)
    if family.gguf_norm_plus_one and not cfg.norm_offset:
        weights = A.shift_norms(weights, -1.0)      # read from GGUF, where the 1 was added
    if family.hf_experts_transposed:
        from .moe import hf_experts_out
        weights = hf_experts_out(weights)
    out = {}
    for name, (role, w) in A.to_file_names(weights, family.hf_names, family, cfg, "Hugging Face").items():
        if family.hf_conv1d and len(w.shape) == 2 and role.startswith("layers."):
            w = w.transpose()
        out[name] = w
    return out


def default_dtype(weights: dict[str, Weight]) -> str:
    """Keep a plain source type; dequantized blocks become float32 (exact)."""
    kinds = {w.format.name for w in weights.values() if len(w.shape) > 1}
    plain = kinds & set(_TORCH_DTYPE)
    if kinds and kinds <= set(_TORCH_DTYPE) and len(plain) == 1:
        return plain.pop()
    return "f32"


# what ``write`` puts in a folder: replacing one removes these (stale shards too) and keeps the rest
OWNED = ("config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
         "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json")


def write(model: ModelIR, folder, *, dtype: str | None = None, shard_bytes: int = DEFAULT_SHARD_BYTES,
          progress=None) -> dict:
    """Write an HF folder: config.json, generation_config.json, tokenizer, safetensors (sharded
    above ``shard_bytes`` with model.safetensors.index.json)."""
    from kiln.artifact import staging

    from .safetensors_file import write_safetensors
    cfg = A.ArchConfig.from_dict(model.config)
    family = hf_family(cfg, folder)
    dtype = dtype or default_dtype(model.weights)
    if dtype not in _TORCH_DTYPE:
        raise KilnError(folder, f"a Hugging Face folder holds f32, f16 or bf16 tensors, not {dtype}")
    tensors = {name: (w if len(w.shape) < 2 and w.format.name == "f32" else w.astype(dtype))
               for name, w in hf_tensors(model.weights, family, cfg).items()}
    shards: list[list[str]] = [[]]
    size = 0
    for name, w in tensors.items():
        if shards[-1] and size + w.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += w.nbytes
    with staging(folder, owned=OWNED) as tmp:
        config = hf_config(cfg, family, dtype)
        if model.source.get("name"):
            config["_name_or_path"] = model.source["name"]
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        gen = {k: v for k, v in model.generation.items()}
        gen.setdefault("bos_token_id", cfg.bos_token_id)
        if cfg.eos_token_ids:
            gen.setdefault("eos_token_id", cfg.eos_token_ids)
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if model.tokenizer is not None:
            model.tokenizer.save(tmp)
        names = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        for fname, shard in zip(names, shards):
            write_safetensors(tmp / fname, [(n, tensors[n]) for n in shard], metadata={"format": "pt"},
                              progress=(lambda n, *_: progress(n, tensors[n].nbytes)) if progress else None)
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(w.nbytes for w in tensors.values())},
                     "weight_map": {n: f for f, shard in zip(names, shards) for n in shard}}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return {"tensors": len(tensors), "shards": len(shards), "dtype": dtype,
            "bytes_in": sum(w.nbytes for w in model.weights.values()),
            "bytes_out": sum(w.nbytes for w in tensors.values())}
