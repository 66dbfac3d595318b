"""The mixture-of-experts families as rows, and their experts' tensors in each format.

A Hugging Face checkpoint stores one tensor per expert and projection
(``mlp.experts.{j}.gate_proj.weight``, ``{j}`` the expert); GGUF stores one 3-D tensor per
projection, ``[experts, out, in]`` (``blk.{i}.ffn_gate_exps.weight``), which is also kiln's
role (``layers.{i}.experts.gate.weight``). A table name holding ``{j}`` is stacked on reading
(lazily: no expert is read before it is needed) and split again on writing.
"""
from __future__ import annotations

import numpy as np

from kiln.errors import KilnError

from .arch import LLAMA_GGUF, LLAMA_HF, Family, _family

_DENSE_MLP = ("gate", "up", "down")


def _without_dense_mlp(table: dict) -> dict:
    return {k: v for k, v in table.items() if not (k.count(".") == 3 and k.split(".")[2] in _DENSE_MLP)}


def _hf_table(block: str, gate: str, up: str, down: str, router: str = "gate") -> dict:
    t = _without_dense_mlp(LLAMA_HF)
    p = f"model.layers.{{i}}.{block}."
    t.update({"layers.{i}.router.weight": f"{p}{router}.weight",
              "layers.{i}.experts.gate.weight": f"{p}experts.{{j}}.{gate}.weight",
              "layers.{i}.experts.up.weight": f"{p}experts.{{j}}.{up}.weight",
              "layers.{i}.experts.down.weight": f"{p}experts.{{j}}.{down}.weight"})
    return t


MIXTRAL_HF = _hf_table("block_sparse_moe", "w1", "w3", "w2")
QWEN_MOE_HF = _hf_table("mlp", "gate_proj", "up_proj", "down_proj")
QWEN2_MOE_HF = dict(QWEN_MOE_HF)
QWEN2_MOE_HF.update({"layers.{i}.shexp.gate.weight": "model.layers.{i}.mlp.shared_expert.gate_proj.weight",
                     "layers.{i}.shexp.up.weight": "model.layers.{i}.mlp.shared_expert.up_proj.weight",
                     "layers.{i}.shexp.down.weight": "model.layers.{i}.mlp.shared_expert.down_proj.weight",
                     "layers.{i}.shexp.router.weight": "model.layers.{i}.mlp.shared_expert_gate.weight"})

# llama.cpp's names (gguf-py's MODEL_TENSOR.FFN_GATE_INP, FFN_*_EXP, FFN_*_SHEXP, FFN_GATE_INP_SHEXP)
MOE_GGUF = _without_dense_mlp(LLAMA_GGUF)
MOE_GGUF.update({"layers.{i}.router.weight": "blk.{i}.ffn_gate_inp.weight",
                 "layers.{i}.experts.gate.weight": "blk.{i}.ffn_gate_exps.weight",
                 "layers.{i}.experts.up.weight": "blk.{i}.ffn_up_exps.weight",
                 "layers.{i}.experts.down.weight": "blk.{i}.ffn_down_exps.weight"})
QWEN2_MOE_GGUF = dict(MOE_GGUF)
QWEN2_MOE_GGUF.update({"layers.{i}.shexp.gate.weight": "blk.{i}.ffn_gate_shexp.weight",
                       "layers.{i}.shexp.up.weight": "blk.{i}.ffn_up_shexp.weight",
                       "layers.{i}.shexp.down.weight": "blk.{i}.ffn_down_shexp.weight",
                       "layers.{i}.shexp.router.weight": "blk.{i}.ffn_gate_inp_shexp.weight"})

# expert_norm_topk here is llama.cpp's fixed choice per architecture (its graphs ignore
# norm_topk_prob): the value a GGUF without kiln's expert_weights_norm key means
_family(Family("mixtral", ("mixtral",), "llama", MIXTRAL_HF, MOE_GGUF, rope_permuted_in_gguf=True,
               flags={"expert_norm_topk": True}))
_family(Family("qwen3_moe", ("qwen3_moe",), "qwen3moe", QWEN_MOE_HF, MOE_GGUF,
               flags={"qk_norm": True, "expert_norm_topk": True}))
_family(Family("olmoe", ("olmoe",), "olmoe", QWEN_MOE_HF, MOE_GGUF,
               flags={"qk_norm": True, "qk_norm_whole": True, "expert_norm_topk": False}))
_family(Family("qwen2_moe", ("qwen2_moe",), "qwen2moe", QWEN2_MOE_HF, QWEN2_MOE_GGUF,
               flags={"attention_bias": True, "expert_norm_topk": False}))

# gpt_oss: HF keeps each projection's experts in one tensor, laid out [experts, in, out] (the
# transpose of kiln's), gate and up interleaved column by column in one gate_up_proj; every
# projection, the router included, has a bias; attention has biases and a sink per head
GPT_OSS_HF = _without_dense_mlp(LLAMA_HF)
GPT_OSS_HF.update({"layers.{i}.sinks": "model.layers.{i}.self_attn.sinks",
                   "layers.{i}.router.weight": "model.layers.{i}.mlp.router.weight",
                   "layers.{i}.router.bias": "model.layers.{i}.mlp.router.bias",
                   "layers.{i}.experts.gate_up.weight": "model.layers.{i}.mlp.experts.gate_up_proj",
                   "layers.{i}.experts.gate_up.bias": "model.layers.{i}.mlp.experts.gate_up_proj_bias",
                   "layers.{i}.experts.down.weight": "model.layers.{i}.mlp.experts.down_proj",
                   "layers.{i}.experts.down.bias": "model.layers.{i}.mlp.experts.down_proj_bias"})
# llama.cpp's gpt-oss names: its pre-MLP norm is post_attention_norm (gguf-py's ATTN_POST_NORM)
GPT_OSS_GGUF = {k: v for k, v in MOE_GGUF.items() if k not in ("layers.{i}.attn_post_norm", "layers.{i}.mlp_post_norm")}
GPT_OSS_GGUF.update({"layers.{i}.mlp_norm": "blk.{i}.post_attention_norm.weight",
                     "layers.{i}.sinks": "blk.{i}.attn_sinks.weight",
                     "layers.{i}.router.bias": "blk.{i}.ffn_gate_inp.bias",
                     "layers.{i}.experts.gate.bias": "blk.{i}.ffn_gate_exps.bias",
                     "layers.{i}.experts.up.bias": "blk.{i}.ffn_up_exps.bias",
                     "layers.{i}.experts.down.bias": "blk.{i}.ffn_down_exps.bias"})
# transformers' GptOssConfig defaults for what a config.json may leave out; alpha and limit are
# also llama.cpp's fixed constants (a GGUF without kiln's keys means them)
GPT_OSS_DEFAULTS = {"attention_bias": True, "swiglu_alpha": 1.702, "swiglu_limit": 7.0, "sliding_window": 128,
                    "rms_norm_eps": 1e-5, "head_dim": 64, "max_position_embeddings": 131072, "rope_theta": 150000.0,
                    "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                     "truncate": False, "original_max_position_embeddings": 4096}}
_family(Family("gpt_oss", ("gpt_oss",), "gpt-oss", GPT_OSS_HF, GPT_OSS_GGUF, global_every=2,
               hf_defaults=GPT_OSS_DEFAULTS, hf_experts_transposed=True,
               # llama.cpp's gpt-oss graph requires the attention biases: the family has them
               flags={"expert_norm_topk": True, "expert_bias": True, "expert_glu": "swiglu_oai",
                      "attention_sinks": True, "attention_bias": True, "output_bias": True},
               hf_scalars={"swiglu_alpha": "swiglu_alpha", "swiglu_limit": "swiglu_limit"},
               gguf_scalars={"swiglu_alpha": "swiglu_alpha", "swiglu_limit": "swiglu_limit"}))

MOE_FAMILIES = ("mixtral", "qwen3_moe", "olmoe", "qwen2_moe", "gpt_oss")


def hf_experts(cfg: dict, c, path) -> None:
    """The experts' numbers from a transformers config.json onto ArchConfig ``c``."""
    def count(*keys, default=None):
        for k in keys:
            v = cfg.get(k)
            if v is not None:
                if isinstance(v, bool) or not isinstance(v, int) or v < 1 or v >= 2**32:
                    raise KilnError(path, f"{k} is {v!r}, not a positive whole number")
                return v
        if default is None:
            raise KilnError(path, f"config is missing {keys[0]}")
        return default
    c.num_experts = count("num_local_experts", "num_experts")
    c.experts_per_token = count("num_experts_per_tok")
    c.expert_intermediate_size = count("moe_intermediate_size", default=c.intermediate_size)
    if "norm_topk_prob" in cfg and c.family != "mixtral":
        c.expert_norm_topk = bool(cfg["norm_topk_prob"])
    if c.family == "qwen2_moe":
        c.shared_expert_intermediate_size = count("shared_expert_intermediate_size")
        c.attention_bias = bool(cfg.get("qkv_bias", True))
    if not c.sliding_window and all(t == "full_attention" for t in c.layer_types):
        c.layer_types = []       # transformers 5 writes qwen2_moe's every-layer-global list: no window anywhere
    if c.experts_per_token > c.num_experts:
        raise KilnError(path, f"num_experts_per_tok {c.experts_per_token} is more than the {c.num_experts} experts")
    # qwen2/3-moe can mix dense layers in; published checkpoints do not, and kiln reads none
    step = cfg.get("decoder_sparse_step", 1)
    if cfg.get("mlp_only_layers") or step not in (None, 1):
        raise KilnError(path, "layers with a dense MLP among the experts (mlp_only_layers, decoder_sparse_step) "
                              "are not supported")
    if cfg.get("clip_qkv") is not None:
        raise KilnError(path, f"clip_qkv {cfg['clip_qkv']!r} is not supported")


def hf_expert_config(c) -> dict:
    """The config.json keys transformers' family reads for the experts (the inverse of hf_experts)."""
    out = {"num_experts_per_tok": c.experts_per_token, "sliding_window": c.sliding_window}
    if c.family in ("mixtral", "gpt_oss"):
        out.update(num_local_experts=c.num_experts, intermediate_size=c.expert_intermediate_size)
        return out
    out.update(num_experts=c.num_experts, norm_topk_prob=bool(c.expert_norm_topk))
    if c.family == "olmoe":
        out["intermediate_size"] = c.expert_intermediate_size     # olmoe's experts are its MLP size
        return out
    out.update(moe_intermediate_size=c.expert_intermediate_size, decoder_sparse_step=1, mlp_only_layers=[],
               use_sliding_window=bool(c.sliding_window))
    if c.family == "qwen2_moe":
        out.update(shared_expert_intermediate_size=c.shared_expert_intermediate_size, qkv_bias=bool(c.attention_bias))
    return out


def gguf_experts(key, meta: dict, arch: str, c, path) -> None:
    """The experts' numbers from llama.cpp's metadata keys onto ArchConfig ``c``."""
    c.num_experts = int(key("expert_count"))
    c.experts_per_token = int(key("expert_used_count"))
    c.expert_intermediate_size = int(key("expert_feed_forward_length", c.intermediate_size))
    norm = meta.get(f"{arch}.expert_weights_norm")
    if norm is not None:
        if not isinstance(norm, bool):
            raise KilnError(path, f"metadata key {arch}.expert_weights_norm is {norm!r}, not true or false")
        c.expert_norm_topk = norm
    if c.family == "qwen2_moe":
        c.shared_expert_intermediate_size = int(key("expert_shared_feed_forward_length"))
    if not 1 <= c.experts_per_token <= c.num_experts:
        raise KilnError(path, f"metadata key {arch}.expert_used_count is {c.experts_per_token}; it must be "
                              f"between 1 and {arch}.expert_count ({c.num_experts})")


def gguf_expert_keys(c) -> dict:
    """llama.cpp's metadata keys for the experts (after the architecture prefix)."""
    out = {"expert_count": c.num_experts, "expert_used_count": c.experts_per_token,
           "expert_feed_forward_length": c.expert_intermediate_size, "expert_weights_norm": bool(c.expert_norm_topk)}
    if c.shared_expert_intermediate_size:
        out["expert_shared_feed_forward_length"] = c.shared_expert_intermediate_size
    return out


def expert_shapes(c, p: str) -> dict:
    X, E, F, S = c.num_experts, c.hidden_size, c.expert_intermediate_size, c.shared_expert_intermediate_size
    out = {p + "router.weight": (X, E), p + "experts.gate.weight": (X, F, E), p + "experts.up.weight": (X, F, E),
           p + "experts.down.weight": (X, E, F)}
    if c.expert_bias:
        out.update({p + "router.bias": (X,), p + "experts.gate.bias": (X, F), p + "experts.up.bias": (X, F),
                    p + "experts.down.bias": (X, E)})
    if S:
        out.update({p + "shexp.gate.weight": (S, E), p + "shexp.up.weight": (S, E), p + "shexp.down.weight": (E, S),
                    p + "shexp.router.weight": (1, E)})
    return out


def shared_router_rows(weights: dict) -> dict:
    """The shared expert's gate as one row [1, hidden]: llama.cpp declares it 1-D ({n_embd}),
    so a GGUF may hold it either way."""
    return {role: (w.reshape((1,) + w.shape) if role.endswith("shexp.router.weight") and len(w.shape) == 1 else w)
            for role, w in weights.items()}


def hf_mxfp4_experts(path, tensors: dict) -> dict:
    """gpt-oss as published: each expert projection as MXFP4 bytes, ``{name}_blocks`` [experts,
    out, in/32, 16] (value 2i in the low nibble of byte i, 2i + 1 in the high one) and
    ``{name}_scales`` [experts, out, in/32] (E8M0 exponents), already [out, in] unlike the float
    tensors. Each pair becomes one MXFP4 weight ``{name}`` [experts, out, in] in kiln's (and
    GGUF's) block layout, e then 16 bytes in Q4_0's nibble order: repacked lazily, never
    dequantized."""
    from kiln import formats
    from kiln.formats._blocks import pack_nibbles
    from kiln.weights import Weight
    out = dict(tensors)
    for name in [n for n in tensors if n.endswith("_blocks")]:
        base = name[:-len("_blocks")]
        blocks, scales = tensors[name], tensors.get(base + "_scales")
        if scales is None:
            continue
        shape = tuple(blocks.shape)
        if len(shape) != 4 or shape[3] != 16 or tuple(scales.shape) != shape[:3] \
                or {blocks.format.name, scales.format.name} != {"u8"}:
            raise KilnError(path, f"{name} {list(shape)} and {base}_scales {list(scales.shape)} are not MXFP4 "
                                  f"blocks [experts, rows, groups, 16] and scales [experts, rows, groups] of bytes")

        def load(b=blocks, e=scales):
            raw = b.raw().reshape(-1, 16)
            codes = np.stack([raw & 0x0F, raw >> 4], axis=-1).reshape(-1, 32)
            return np.concatenate([e.raw().reshape(-1, 1), pack_nibbles(codes)], axis=1)
        del out[name], out[base + "_scales"]
        out[base] = Weight(shape[:2] + (shape[2] * 32,), formats.get("mxfp4"), load, name=base, origin=blocks.origin)
    return out


def hf_experts_in(role: str, w):
    """gpt_oss's HF float expert weights [experts, in, out] as kiln's [experts, out, in]
    (lazily); MXFP4 blocks (hf_mxfp4_experts) are [experts, out, in] already."""
    if w.format.is_block:
        return w
    if role.startswith("layers.") and ".experts." in role and role.endswith(".weight") and len(w.shape) == 3:
        x, a, b = w.shape
        return w.map_values(lambda v: np.swapaxes(v, 1, 2), (x, b, a))
    return w


def hf_experts_out(weights: dict) -> dict:
    """The inverse of hf_experts_in and split_gate_up, for writing a gpt_oss HF checkpoint:
    gate and up interleaved again, every expert weight [experts, in, out]."""
    def interleaved(gate, up):
        # weights [X, F, in] -> [X, 2F, in], biases [X, F] -> [X, 2F]: gate's row f at 2f, up's at 2f + 1
        return gate.map_values(lambda g: np.stack([g, up.numpy()], axis=2).reshape((g.shape[0], -1) + g.shape[2:]),
                               (gate.shape[0], 2 * gate.shape[1]) + tuple(gate.shape[2:]))
    out = dict(weights)
    for role in [r for r in out if r.endswith((".experts.gate.weight", ".experts.gate.bias"))]:
        out[role.replace(".gate.", ".gate_up.")] = interleaved(out.pop(role), out.pop(role.replace(".gate.", ".up.")))
    for role, w in list(out.items()):
        if ".experts." in role and role.endswith(".weight") and len(w.shape) == 3:
            out[role] = w.map_values(lambda v: np.swapaxes(v, 1, 2), (w.shape[0], w.shape[2], w.shape[1]))
    return out


def split_gate_up(weights: dict) -> dict:
    """gpt_oss's fused experts.gate_up (weight [X, 2F, E] once transposed, bias [X, 2F]) as
    experts.gate and experts.up: their rows alternate, gate first."""
    out = {}
    for role, w in weights.items():
        if ".experts.gate_up." not in role:
            out[role] = w
            continue
        if len(w.shape) < 2 or w.shape[1] % 2:
            raise ValueError(f"fused tensor {w.name or role} has shape {list(w.shape)}: not gate and up rows "
                             f"in pairs")
        shape = (w.shape[0], w.shape[1] // 2) + tuple(w.shape[2:])
        for k, part in enumerate(("gate", "up")):
            if len(shape) == 3:
                # rows k, k + 2, ... of every expert: whole rows, so MXFP4 blocks stay blocks
                rows = (np.arange(w.shape[0])[:, None] * w.shape[1] + np.arange(k, w.shape[1], 2)).reshape(-1)
                out[role.replace(".gate_up.", f".{part}.")] = w.take_rows(rows).reshape(shape)
            else:
                out[role.replace(".gate_up.", f".{part}.")] = w.map_values(lambda a, k=k: a[:, k::2], shape)
    return out


def stack_experts(path, tensors: dict, template: str, n: int):
    """The ``n`` per-expert tensors ``template`` names ({j}) as one [n, out, in] weight, or None
    when the file has none of them."""
    from kiln.weights import concat_rows
    names = [template.replace("{j}", str(j)) for j in range(n)]
    present = [x for x in names if x in tensors]
    if not present:
        return None
    if len(present) < n:
        missing = next(x for x in names if x not in tensors)
        raise KilnError(path, f"tensor {missing} is missing (the config says {n} experts)")
    parts = [tensors[x] for x in names]
    shape = parts[0].shape
    odd = next((x for x, w in zip(names, parts) if w.shape != shape or len(w.shape) != 2), None)
    if odd is not None:
        raise KilnError(path, f"tensor {odd} has shape {list(tensors[odd].shape)}, unlike {names[0]}'s {list(shape)}")
    return concat_rows(parts, name=template).reshape((n,) + shape)


def unstack_experts(out: dict, n: int) -> dict:
    """{file name: (role, weight)} with each ``{j}`` name split into its ``n`` experts' tensors."""
    res = {}
    for name, (role, w) in out.items():
        if "{j}" not in name:
            res[name] = (role, w)
            continue
        rows = w.shape[1]
        flat = w.reshape((n * rows, w.shape[2]))
        for j in range(n):
            res[name.replace("{j}", str(j))] = (role, flat.take_rows(range(j * rows, (j + 1) * rows)))
    return res


def per_expert_names(names: list, n: int) -> list:
    """Table names with each ``{j}`` name expanded to its experts', in order."""
    return [x.replace("{j}", str(j)) for name in names for x in [name] for j in (range(n) if "{j}" in name else [0])]
