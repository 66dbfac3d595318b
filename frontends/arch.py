"""Architectures as data: normalised configs and the tensor-name tables of each family.

Every family maps onto one canonical config (``ArchConfig``) and one canonical set of tensor
roles. The tables below say, per family, what each role is called in a Hugging Face checkpoint
and in a GGUF file, and what transform it needs on the way in. A new family is a table row and
a few flags, not a new builder.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class ArchConfig:
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float = 1e-5
    norm: str = "rms"                 # "rms" or "layer" (LayerNorm with bias)
    norm_offset: float = 0.0          # gemma's RMSNorm multiplies by (1 + w)
    activation: str = "silu"          # silu | gelu | gelu_tanh
    gated_mlp: bool = True            # gate/up/down (SwiGLU, GeGLU) vs fc/proj
    attention_bias: bool = False      # q/k/v biases
    output_bias: bool = False         # o_proj bias
    mlp_bias: bool = False
    qk_norm: bool = False             # qwen3: RMSNorm over each head of q and k
    qk_norm_whole: bool = False       # olmo2: the q/k norms span the whole projection (all heads at once)
    pre_norm: bool = True             # a norm before attention and before the MLP (olmo2 has none)
    post_norm: bool = False           # a norm on the attention and MLP outputs, before the residual add
                                      # (olmo2; gemma2/3 have both)
    residual_scale: float = 1.0       # granite: attention and MLP outputs times this before the residual add
    logit_scale: float = 1.0          # granite: the logits divided by this
    attn_softcap: float | None = None     # gemma2: scores -> cap * tanh(scores / cap) before the mask
    final_softcap: float | None = None    # gemma2/3: logits -> cap * tanh(logits / cap)
    # per layer "sliding_attention" (the window applies) or "full_attention", as transformers
    # names them; empty: every layer uses sliding_window (if any)
    layer_types: list = field(default_factory=list)
    rope_local_theta: float | None = None  # gemma3: sliding layers rotate at this base, unscaled
    tie_word_embeddings: bool = False
    embed_scale: float = 1.0          # gemma multiplies embeddings by sqrt(hidden)
    learned_positions: bool = False   # gpt2
    rotary_dim: int = 0               # 0 = no rotary; partial rotary when < head_dim
    rope_theta: float = 10000.0
    rope_scaling: dict = field(default_factory=dict)
    max_position_embeddings: int = 2048
    sliding_window: int | None = None
    attn_scale: float | None = None   # None = 1/sqrt(head_dim)
    bos_token_id: int | None = None
    eos_token_ids: list = field(default_factory=list)
    pad_token_id: int | None = None
    # mixture of experts (mixtral, qwen2_moe, qwen3_moe, olmoe): 0 experts = a dense MLP
    num_experts: int = 0
    experts_per_token: int = 0
    expert_intermediate_size: int = 0
    expert_norm_topk: bool = False    # the chosen experts' weights divided by their sum (norm_topk_prob)
    shared_expert_intermediate_size: int = 0   # qwen2_moe: an expert every token runs, sigmoid-gated
    # gpt_oss: every expert projection and the router have biases; the experts' activation is
    # the clamped SwiGLU, (clip(up, ±limit) + 1)·g·sigmoid(alpha·g), g = min(gate, limit)
    expert_bias: bool = False
    expert_glu: str = "silu"          # silu | swiglu_oai
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    attention_sinks: bool = False     # gpt_oss: a learned logit per head in each softmax's denominator

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "ArchConfig":
        return ArchConfig(**d)


# ---- tensor roles -------------------------------------------------------------------------
# Canonical role names (per layer roles take {i}). Each family row gives the HF and GGUF name
# per role; a missing entry means the family has no such tensor.

LLAMA_HF = {
    "embed": "model.embed_tokens.weight",
    "final_norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
    "layers.{i}.attn_norm": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "layers.{i}.k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "layers.{i}.v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "layers.{i}.o.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.o.bias": "model.layers.{i}.self_attn.o_proj.bias",
    "layers.{i}.q_norm": "model.layers.{i}.self_attn.q_norm.weight",
    "layers.{i}.k_norm": "model.layers.{i}.self_attn.k_norm.weight",
    "layers.{i}.mlp_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "layers.{i}.down.weight": "model.layers.{i}.mlp.down_proj.weight",
    "layers.{i}.gate.bias": "model.layers.{i}.mlp.gate_proj.bias",
    "layers.{i}.up.bias": "model.layers.{i}.mlp.up_proj.bias",
    "layers.{i}.down.bias": "model.layers.{i}.mlp.down_proj.bias",
}

LLAMA_GGUF = {
    "embed": "token_embd.weight",
    "final_norm": "output_norm.weight",
    "lm_head": "output.weight",
    "layers.{i}.attn_norm": "blk.{i}.attn_norm.weight",
    "layers.{i}.q.weight": "blk.{i}.attn_q.weight",
    "layers.{i}.k.weight": "blk.{i}.attn_k.weight",
    "layers.{i}.v.weight": "blk.{i}.attn_v.weight",
    "layers.{i}.q.bias": "blk.{i}.attn_q.bias",
    "layers.{i}.k.bias": "blk.{i}.attn_k.bias",
    "layers.{i}.v.bias": "blk.{i}.attn_v.bias",
    "layers.{i}.o.weight": "blk.{i}.attn_output.weight",
    "layers.{i}.o.bias": "blk.{i}.attn_output.bias",
    "layers.{i}.q_norm": "blk.{i}.attn_q_norm.weight",
    "layers.{i}.k_norm": "blk.{i}.attn_k_norm.weight",
    "layers.{i}.mlp_norm": "blk.{i}.ffn_norm.weight",
    "layers.{i}.attn_post_norm": "blk.{i}.post_attention_norm.weight",
    "layers.{i}.mlp_post_norm": "blk.{i}.post_ffw_norm.weight",
    "layers.{i}.gate.weight": "blk.{i}.ffn_gate.weight",
    "layers.{i}.up.weight": "blk.{i}.ffn_up.weight",
    "layers.{i}.down.weight": "blk.{i}.ffn_down.weight",
    "layers.{i}.gate.bias": "blk.{i}.ffn_gate.bias",
    "layers.{i}.up.bias": "blk.{i}.ffn_up.bias",
    "layers.{i}.down.bias": "blk.{i}.ffn_down.bias",
}


@dataclass(frozen=True)
class Family:
    name: str
    hf_model_types: tuple
    gguf_arch: str
    hf_names: dict
    gguf_names: dict
    rope_permuted_in_gguf: bool = False   # llama.cpp interleaves q/k rows for its rope kernel
    hf_conv1d: bool = False               # HF stores linear weights [in, out] (GPT-2's Conv1D)
    hf_config_aliases: dict = field(default_factory=dict)   # canonical key -> this family's key
    flags: dict = field(default_factory=dict)               # ArchConfig fields fixed by the family
    # ArchConfig scalar fields the family states in its config: field -> config.json key / GGUF key
    # (after the architecture prefix); a key that is absent leaves the field's default
    hf_scalars: dict = field(default_factory=dict)
    gguf_scalars: dict = field(default_factory=dict)
    gguf_norm_plus_one: bool = False      # llama.cpp stores (1 + w) for the family's RMSNorm scales (gemma)
    scaled_embedding: bool = False        # gemma: embeddings times sqrt(hidden_size)
    # gemma2/3: transformers' layer_types when a config has none (every Nth layer global), which
    # is also the pattern llama.cpp assumes for a GGUF without sliding_window_pattern
    global_every: int = 0
    # multimodal checkpoints whose text model is this family: outer model_type -> the prefixes
    # its text tensors carry, each with the name the family's own checkpoints use instead (the
    # config's text_config holds the text model's config)
    hf_multimodal: dict = field(default_factory=dict)
    # transformers' config defaults where they matter: a config.json may leave them out
    hf_defaults: dict = field(default_factory=dict)
    # gpt_oss: HF stores each projection's experts as one [experts, in, out] tensor, gate and up
    # interleaved in one (frontends/moe.py's hf_experts_in / split_gate_up / hf_experts_out)
    hf_experts_transposed: bool = False


FAMILIES: dict[str, Family] = {}


def _family(f: Family) -> Family:
    FAMILIES[f.name] = f
    return f


_family(Family("llama", ("llama",), "llama", LLAMA_HF, LLAMA_GGUF, rope_permuted_in_gguf=True))
_family(Family("mistral", ("mistral",), "llama", LLAMA_HF, LLAMA_GGUF, rope_permuted_in_gguf=True))
_family(Family("qwen2", ("qwen2",), "qwen2", LLAMA_HF, LLAMA_GGUF))
_family(Family("qwen3", ("qwen3",), "qwen3", LLAMA_HF, LLAMA_GGUF))
_family(Family("gemma", ("gemma",), "gemma", LLAMA_HF, LLAMA_GGUF, gguf_norm_plus_one=True, scaled_embedding=True,
              flags={"norm_offset": 1.0, "tie_word_embeddings": True}))

# gemma2/3: norms before and after attention and the MLP; the pre-MLP norm has its own name
GEMMA2_HF = dict(LLAMA_HF)
GEMMA2_HF.update({"layers.{i}.attn_post_norm": "model.layers.{i}.post_attention_layernorm.weight",
                  "layers.{i}.mlp_norm": "model.layers.{i}.pre_feedforward_layernorm.weight",
                  "layers.{i}.mlp_post_norm": "model.layers.{i}.post_feedforward_layernorm.weight"})
_GEMMA_FLAGS = {"norm_offset": 1.0, "post_norm": True}
# Gemma2Config's / Gemma3TextConfig's defaults (the 2B / 1B shapes): published gemma3 configs,
# multimodal ones above all, leave most of them out
_GEMMA_DEFAULTS = {"hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26, "num_attention_heads": 8,
                   "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
                   "rms_norm_eps": 1e-6, "query_pre_attn_scalar": 256, "sliding_window": 4096,
                   "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "tie_word_embeddings": True}
GEMMA2_DEFAULTS = {**_GEMMA_DEFAULTS, "vocab_size": 256000, "max_position_embeddings": 8192, "rope_theta": 10000.0,
                   "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}
GEMMA3_DEFAULTS = {**_GEMMA_DEFAULTS, "vocab_size": 262208, "max_position_embeddings": 131072,
                   "rope_theta": 1_000_000.0, "rope_local_base_freq": 10000.0}
_family(Family("gemma2", ("gemma2",), "gemma2", GEMMA2_HF, LLAMA_GGUF, gguf_norm_plus_one=True,
               scaled_embedding=True, global_every=2, flags=_GEMMA_FLAGS, hf_defaults=GEMMA2_DEFAULTS,
               hf_scalars={"attn_softcap": "attn_logit_softcapping", "final_softcap": "final_logit_softcapping"},
               gguf_scalars={"attn_softcap": "attn_logit_softcapping", "final_softcap": "final_logit_softcapping",
                             "attn_scale": "attention.scale"}))
_family(Family("gemma3", ("gemma3_text",), "gemma3", GEMMA2_HF, LLAMA_GGUF, gguf_norm_plus_one=True,
               scaled_embedding=True, global_every=6, flags={**_GEMMA_FLAGS, "qk_norm": True},
               hf_defaults=GEMMA3_DEFAULTS,
               # Gemma3ForConditionalGeneration (gemma-3-4b and up): kiln reads its language model
               hf_multimodal={"gemma3": (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                                         ("model.language_model.", "model."), ("lm_head.", "lm_head."))},
               hf_scalars={"attn_softcap": "attn_logit_softcapping", "final_softcap": "final_logit_softcapping"},
               gguf_scalars={"attn_softcap": "attn_logit_softcapping", "final_softcap": "final_logit_softcapping",
                             "attn_scale": "attention.scale"}))
# granite: llama with four multipliers (llama.cpp names them *_scale; its logit_scale divides)
_family(Family("granite", ("granite",), "granite", LLAMA_HF, LLAMA_GGUF, rope_permuted_in_gguf=True,
               hf_scalars={"embed_scale": "embedding_multiplier", "residual_scale": "residual_multiplier",
                           "attn_scale": "attention_multiplier", "logit_scale": "logits_scaling"},
               # transformers' default scale is 1.0; llama.cpp's (no granite.attention.scale) 1/sqrt(head_dim)
               hf_defaults={"attention_multiplier": 1.0},
               gguf_scalars={"embed_scale": "embedding_scale", "residual_scale": "residual_scale",
                             "attn_scale": "attention.scale", "logit_scale": "logit_scale"}))

# olmo2: no norms before attention and MLP, one on each output instead (HF's post_attention_layernorm
# is that output norm here, not llama's pre-MLP norm); q/k norms over the whole projection
OLMO2_HF = {k: v for k, v in LLAMA_HF.items() if k not in ("layers.{i}.attn_norm", "layers.{i}.mlp_norm")}
OLMO2_HF.update({"layers.{i}.attn_post_norm": "model.layers.{i}.post_attention_layernorm.weight",
                 "layers.{i}.mlp_post_norm": "model.layers.{i}.post_feedforward_layernorm.weight"})
_family(Family("olmo2", ("olmo2",), "olmo2", OLMO2_HF, LLAMA_GGUF,
               flags={"qk_norm": True, "qk_norm_whole": True, "pre_norm": False, "post_norm": True}))

def _without_split_parts(table: dict) -> dict:
    return {k: v for k, v in table.items() if not (k.count(".") == 3 and k.split(".")[2] in ("q", "k", "v", "gate", "up"))}


PHI3_HF = _without_split_parts(LLAMA_HF)
PHI3_HF.update({
    "layers.{i}.qkv.weight": "model.layers.{i}.self_attn.qkv_proj.weight",
    "layers.{i}.gate_up.weight": "model.layers.{i}.mlp.gate_up_proj.weight",
})
PHI3_GGUF = _without_split_parts(LLAMA_GGUF)
PHI3_GGUF.update({
    "layers.{i}.qkv.weight": "blk.{i}.attn_qkv.weight",
    "layers.{i}.gate_up.weight": "blk.{i}.ffn_up.weight",
})
_family(Family("phi3", ("phi3",), "phi3", PHI3_HF, PHI3_GGUF))

GPT2_HF = {
    "embed": "transformer.wte.weight",
    "pos_embed": "transformer.wpe.weight",
    "final_norm": "transformer.ln_f.weight",
    "final_norm_bias": "transformer.ln_f.bias",
    "lm_head": "lm_head.weight",
    "layers.{i}.attn_norm": "transformer.h.{i}.ln_1.weight",
    "layers.{i}.attn_norm_bias": "transformer.h.{i}.ln_1.bias",
    "layers.{i}.qkv.weight": "transformer.h.{i}.attn.c_attn.weight",
    "layers.{i}.qkv.bias": "transformer.h.{i}.attn.c_attn.bias",
    "layers.{i}.o.weight": "transformer.h.{i}.attn.c_proj.weight",
    "layers.{i}.o.bias": "transformer.h.{i}.attn.c_proj.bias",
    "layers.{i}.mlp_norm": "transformer.h.{i}.ln_2.weight",
    "layers.{i}.mlp_norm_bias": "transformer.h.{i}.ln_2.bias",
    "layers.{i}.up.weight": "transformer.h.{i}.mlp.c_fc.weight",
    "layers.{i}.up.bias": "transformer.h.{i}.mlp.c_fc.bias",
    "layers.{i}.down.weight": "transformer.h.{i}.mlp.c_proj.weight",
    "layers.{i}.down.bias": "transformer.h.{i}.mlp.c_proj.bias",
}
GPT2_GGUF = {
    "embed": "token_embd.weight",
    "pos_embed": "position_embd.weight",
    "final_norm": "output_norm.weight",
    "final_norm_bias": "output_norm.bias",
    "lm_head": "output.weight",
    "layers.{i}.attn_norm": "blk.{i}.attn_norm.weight",
    "layers.{i}.attn_norm_bias": "blk.{i}.attn_norm.bias",
    "layers.{i}.qkv.weight": "blk.{i}.attn_qkv.weight",
    "layers.{i}.qkv.bias": "blk.{i}.attn_qkv.bias",
    "layers.{i}.o.weight": "blk.{i}.attn_output.weight",
    "layers.{i}.o.bias": "blk.{i}.attn_output.bias",
    "layers.{i}.mlp_norm": "blk.{i}.ffn_norm.weight",
    "layers.{i}.mlp_norm_bias": "blk.{i}.ffn_norm.bias",
    "layers.{i}.up.weight": "blk.{i}.ffn_up.weight",
    "layers.{i}.up.bias": "blk.{i}.ffn_up.bias",
    "layers.{i}.down.weight": "blk.{i}.ffn_down.weight",
    "layers.{i}.down.bias": "blk.{i}.ffn_down.bias",
}
_family(Family(
    "gpt2", ("gpt2",), "gpt2", GPT2_HF, GPT2_GGUF, hf_conv1d=True,
    hf_config_aliases={"hidden_size": "n_embd", "num_attention_heads": "n_head", "num_hidden_layers": "n_layer",
                       "max_position_embeddings": "n_positions", "rms_norm_eps": "layer_norm_epsilon",
                       "intermediate_size": "n_inner", "hidden_act": "activation_function"},
    flags={"norm": "layer", "gated_mlp": False, "learned_positions": True, "rotary_dim": 0,
           "attention_bias": True, "output_bias": True, "mlp_bias": True, "tie_word_embeddings": True}))

# Fused tensors split into canonical roles, with each part's row count from the config.
FUSED = {
    "qkv": (("q", lambda c: c.num_heads * c.head_dim), ("k", lambda c: c.num_kv_heads * c.head_dim),
            ("v", lambda c: c.num_kv_heads * c.head_dim)),
    "gate_up": (("gate", lambda c: c.intermediate_size), ("up", lambda c: c.intermediate_size)),
}


def split_fused(weights: dict, cfg: "ArchConfig") -> dict:
    """Replace ``layers.N.qkv.*`` / ``layers.N.gate_up.*`` with their parts (lazy row slices)."""
    out = {}
    for role, w in weights.items():
        parts = role.split(".")
        if len(parts) == 4 and parts[2] in FUSED:
            sizes = [(name, rows(cfg)) for name, rows in FUSED[parts[2]]]
            total = sum(n for _, n in sizes)
            if total != w.shape[0]:     # before any row index is built: the config's sizes may be huge
                raise ValueError(f"fused tensor {role} has {w.shape[0]} rows, the config implies {total}")
            start = 0
            for name, n in sizes:
                out[f"{parts[0]}.{parts[1]}.{name}.{parts[3]}"] = w.take_rows(np.arange(start, start + n))
                start += n
        else:
            out[role] = w
    return out


def roles_from_file(path, tensors: dict, table: dict, cfg: "ArchConfig", *, layers_key: str,
                    transform=None) -> dict:
    """A file's tensors -> canonical roles: bounds the layer count by what the file can hold,
    maps names, splits fused tensors, and checks every required role is there with its shape."""
    from kiln.errors import KilnError
    n = cfg.num_layers
    if n > len(tensors):      # checked before anything is built per layer: the count may be huge
        raise KilnError(path, f"{layers_key} says {n} layers, more than the file's {len(tensors)} tensors can hold")
    roles = layer_roles(table, n)
    out = {}
    for role, name in roles.items():
        if "{j}" in name:
            from .moe import stack_experts
            w = stack_experts(path, tensors, name, cfg.num_experts)
            if w is not None:
                out[role] = w
        elif name in tensors:
            out[role] = transform(role, tensors[name]) if transform else tensors[name]
    if cfg.shared_expert_intermediate_size:
        from .moe import shared_router_rows
        out = shared_router_rows(out)
    try:
        if cfg.expert_bias:
            from .moe import split_gate_up
            out = split_gate_up(out)
        out = split_fused(out, cfg)
    except ValueError as e:
        raise KilnError(path, str(e)) from None
    if "embed" not in out:
        raise KilnError(path, f"tensor {table['embed']} is missing")
    for i in range(n):
        for r in ("q", "k", "v", "o") + (("experts.up", "experts.down", "experts.gate", "router")
                                         if cfg.num_experts else ("up", "down")):
            role = f"layers.{i}.{r}.weight"
            if role not in out:
                fused = f"layers.{i}.{'qkv' if r in 'qkv' else 'gate_up'}.weight"
                raise KilnError(path, f"tensor {roles.get(role) or roles.get(fused, role)} is missing "
                                      f"(needed for {role})")
    # the other tensors the builder cannot do without (biases are optional)
    per_layer = (["attn_norm", "mlp_norm"] if cfg.pre_norm else []) \
        + (["attn_post_norm", "mlp_post_norm"] if cfg.post_norm else []) \
        + (["gate.weight"] if cfg.gated_mlp and not cfg.num_experts else []) \
        + (["q_norm", "k_norm"] if cfg.qk_norm else []) + (["sinks"] if cfg.attention_sinks else []) \
        + ([f"{r}.bias" for r in ("router", "experts.gate", "experts.up", "experts.down")] if cfg.expert_bias else []) \
        + ([f"shexp.{r}.weight" for r in ("gate", "up", "down", "router")] if cfg.shared_expert_intermediate_size else [])
    needed = ["final_norm"] + (["pos_embed"] if cfg.learned_positions else []) \
        + (["lm_head"] if not cfg.tie_word_embeddings else []) + [f"layers.{i}.{r}" for i in range(n) for r in per_layer]
    for role in needed:
        if role not in out:
            fused = role.replace("gate.weight", "gate_up.weight")
            raise KilnError(path, f"tensor {roles.get(role) or roles.get(fused, role)} is missing (needed for {role})")
    check_shapes(path, out, cfg)
    return out


def shift_norms(weights: dict, delta: float) -> dict:
    """Add ``delta`` to every norm scale (gemma: HF stores w, llama.cpp stores 1 + w)."""
    return {role: (w.map_values(lambda a: a + np.float32(delta)) if role.endswith("norm") else w)
            for role, w in weights.items()}


def to_file_names(weights: dict, table: dict, family: Family, cfg: "ArchConfig", what: str) -> dict:
    """Canonical role weights -> {file name: (role, weight)} in the table's order, fusing the
    parts the format stores fused."""
    for fused in FUSED:
        if any(k.startswith("layers.") and k.split(".")[2] == fused for k in table):
            weights = fuse_parts(weights, fused, cfg, cfg.num_layers)
    roles = layer_roles(table, cfg.num_layers)
    out = {}
    for role, w in weights.items():
        if role not in roles:
            raise ValueError(f"no {what} name for the {family.name} tensor {role}")
        out[roles[role]] = (role, w)
    names = list(roles.values())
    if any("{j}" in name for name in out):
        from .moe import per_expert_names, unstack_experts
        out = unstack_experts(out, cfg.num_experts)
        names = per_expert_names(names, cfg.num_experts)
    order = {name: i for i, name in enumerate(names)}
    return dict(sorted(out.items(), key=lambda kv: order[kv[0]]))


def fuse_parts(weights: dict, fused: str, cfg: "ArchConfig", n_layers: int) -> dict:
    """The inverse of split_fused for writers whose format stores the fused tensor."""
    from kiln.weights import concat_rows
    out = dict(weights)
    names = [name for name, _ in FUSED[fused]]
    for i in range(n_layers):
        for kind in ("weight", "bias"):
            keys = [f"layers.{i}.{n}.{kind}" for n in names]
            if all(k in out for k in keys):
                out[f"layers.{i}.{fused}.{kind}"] = concat_rows([out.pop(k) for k in keys])
    return out


def family_for_model_type(model_type: str) -> Family | None:
    for f in FAMILIES.values():
        if model_type in f.hf_model_types or model_type in f.hf_multimodal:
            return f
    return None


def family_for_gguf_arch(arch: str) -> Family | None:
    for f in FAMILIES.values():
        if f.gguf_arch == arch:
            return f
    return None


def layer_roles(table: dict, n_layers: int) -> dict[str, str]:
    """Expand ``{i}`` templates: canonical role name -> file name, global tensors first, then
    each layer's tensors together (the order converters write them in)."""
    out = {role: name for role, name in table.items() if "{i}" not in role}
    per_layer = [(role, name) for role, name in table.items() if "{i}" in role]
    for i in range(n_layers):
        for role, name in per_layer:
            out[role.format(i=i)] = name.replace("{i}", str(i))
    return out


def check_shapes(path, w: dict, cfg: ArchConfig) -> None:
    """Every role's shape against the config, so a lying file fails here with a clear line."""
    from kiln.errors import KilnError
    H, KV, D, E, F = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size, cfg.intermediate_size
    expect = {"embed": (cfg.vocab_size, E)}
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        expect.update({p + "q.weight": (H * D, E), p + "k.weight": (KV * D, E), p + "v.weight": (KV * D, E),
                       p + "o.weight": (E, H * D), p + "up.weight": (F, E), p + "down.weight": (E, F),
                       p + "gate.weight": (F, E), p + "attn_norm": (E,), p + "mlp_norm": (E,),
                       p + "q.bias": (H * D,), p + "k.bias": (KV * D,), p + "v.bias": (KV * D,), p + "o.bias": (E,),
                       p + "up.bias": (F,), p + "down.bias": (E,), p + "attn_post_norm": (E,), p + "mlp_post_norm": (E,),
                       p + "q_norm": (H * D,) if cfg.qk_norm_whole else (D,),
                       p + "k_norm": (KV * D,) if cfg.qk_norm_whole else (D,)})
        if cfg.num_experts:
            from .moe import expert_shapes
            expect.update(expert_shapes(cfg, p))
        if cfg.attention_sinks:
            expect[p + "sinks"] = (H,)
    expect.update({"final_norm": (E,), "lm_head": (cfg.vocab_size, E)})
    for role, shape in expect.items():
        if role in w and w[role].shape != shape:
            name = getattr(w[role], "name", "")
            label = f"{name} ({role})" if name and name != role else f"for {role}"
            raise KilnError(path, f"tensor {label} has shape {list(w[role].shape)}, the config implies {list(shape)}")


LAYER_TYPES = ("sliding_attention", "full_attention")


def layer_window(cfg: ArchConfig, i: int) -> int:
    """Layer i's attention window (0: it sees the whole context)."""
    if cfg.layer_types and cfg.layer_types[i] != "sliding_attention":
        return 0
    return int(cfg.sliding_window or 0)


def default_layer_types(n_layers: int, global_every: int) -> list:
    """Every ``global_every``-th layer global, the rest sliding (transformers' gemma2/3 default)."""
    return ["full_attention" if (i + 1) % global_every == 0 else "sliding_attention" for i in range(n_layers)]


MAX_HEAD_DIM = 65536       # real models use 64 to 512

# config fields that count something, and so must be at least 1
_COUNTS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
           "intermediate_size", "max_position_embeddings")


def check_config(path, cfg: ArchConfig, keys: dict | None = None) -> None:
    """The config's numbers on their own and against each other, so a file that lies about its
    model fails here with one clear line instead of deep in the builder. ``keys`` names the
    fields as the file spells them (``num_layers`` -> ``llama.block_count``)."""
    from kiln.errors import KilnError
    keys = keys or {}
    for f in _COUNTS:
        v = getattr(cfg, f)
        if v < 1:
            raise KilnError(path, f"{keys.get(f, f)} is {v}; it must be at least 1")
    if cfg.num_heads % cfg.num_kv_heads:
        raise KilnError(path, f"{cfg.num_heads} attention heads are not a multiple of {cfg.num_kv_heads} key/value heads")
    if cfg.head_dim > MAX_HEAD_DIM:
        # checked before the rotary tables below are computed: their size follows the head size
        raise KilnError(path, f"{keys.get('head_dim', 'head_dim')} is {cfg.head_dim}; kiln handles heads of up to "
                              f"{MAX_HEAD_DIM} dimensions")
    if cfg.layer_types:
        if len(cfg.layer_types) != cfg.num_layers:
            raise KilnError(path, f"{keys.get('layer_types', 'layer_types')} lists {len(cfg.layer_types)} layers, "
                                  f"the model has {cfg.num_layers}")
        odd = [t for t in cfg.layer_types if t not in LAYER_TYPES]
        if odd:
            raise KilnError(path, f"{keys.get('layer_types', 'layer_types')} holds {str(odd[0])[:40]!r}; kiln reads "
                                  f"{' and '.join(LAYER_TYPES)}")
        if "sliding_attention" in cfg.layer_types and not cfg.sliding_window:
            raise KilnError(path, "some layers are sliding_attention layers, but the config gives no sliding_window")
    for f in ("attn_softcap", "final_softcap"):
        v = getattr(cfg, f)
        if v is not None and not (math.isfinite(v) and v > 0):
            raise KilnError(path, f"{keys.get(f, f)} is {v}; a soft cap is a positive number")
    if cfg.logit_scale == 0:
        raise KilnError(path, f"{keys.get('logit_scale', 'logit_scale')} is 0; the logits are divided by it")
    if cfg.rotary_dim < 0 or cfg.rotary_dim > cfg.head_dim or cfg.rotary_dim % 2:
        raise KilnError(path, f"rotary dimension {cfg.rotary_dim} is not an even number up to the head size {cfg.head_dim}")
    if cfg.rotary_dim:
        scaling = cfg.rope_scaling or {}
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        try:
            rope_inv_freq(cfg)
            if rope_switch_length(cfg):
                rope_inv_freq(cfg, long=True)
        except KeyError as e:
            raise KilnError(path, f"rope scaling {kind!r} has no {e.args[0]!r}") from None
        except (TypeError, ValueError, ArithmeticError) as e:
            text = str(e) if str(e).startswith("rope scaling") else f"rope scaling {kind!r} has bad parameters ({e})"
            raise KilnError(path, text) from None



# ---- rotary embeddings --------------------------------------------------------------------

def rope_inv_freq(cfg: ArchConfig, long: bool = False) -> tuple[np.ndarray, float]:
    """Inverse frequencies (rotary_dim/2,) and the attention scaling applied to cos/sin.

    Computed as transformers computes them (float64 maths in float32 at the end) so logits
    match its reference to ~1e-6.
    """
    dim = cfg.rotary_dim
    base = cfg.rope_theta
    idx = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32)
    inv_freq = (1.0 / (base ** (idx / dim))).astype(np.float32)
    scaling = dict(cfg.rope_scaling or {})
    kind = rope_kind(scaling)
    attention_factor = 1.0
    if kind == "linear":
        inv_freq = inv_freq / np.float32(scaling["factor"])
    elif kind == "llama3":
        factor = scaling["factor"]
        low = scaling.get("low_freq_factor", 1.0)
        high = scaling.get("high_freq_factor", 4.0)
        old_ctx = scaling.get("original_max_position_embeddings", 8192)
        low_wavelen = old_ctx / low
        high_wavelen = old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    elif kind == "yarn":
        factor = scaling["factor"]
        old_ctx = scaling.get("original_max_position_embeddings", cfg.max_position_embeddings)
        beta_fast = scaling.get("beta_fast", 32.0)
        beta_slow = scaling.get("beta_slow", 1.0)
        mscale = scaling.get("attention_factor")
        if mscale is None:
            mscale = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
        attention_factor = mscale

        def corr_dim(rot):
            return (dim * math.log(old_ctx / (rot * 2 * math.pi))) / (2 * math.log(base))
        # transformers' truncate (default true, gpt-oss false): the correction range rounded outward
        rounded = scaling.get("truncate", True) is not False
        low = max(math.floor(corr_dim(beta_fast)) if rounded else corr_dim(beta_fast), 0)
        high = min(math.ceil(corr_dim(beta_slow)) if rounded else corr_dim(beta_slow), dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
        extrapolation = 1 - ramp
        pos_freqs = base ** (idx / dim)
        inv_freq = ((1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation).astype(np.float32)
    elif kind == "longrope":
        # short factors within the original context, long ones past it (the builder switches)
        factors = _factor_list(scaling, "long_factor" if long else "short_factor", dim // 2)
        old_ctx = scaling.get("original_max_position_embeddings", cfg.max_position_embeddings)
        inv_freq = (1.0 / (factors * base ** (idx / dim))).astype(np.float32)
        factor = cfg.max_position_embeddings / old_ctx
        attention_factor = scaling.get("attention_factor") or (
            1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(old_ctx)))
    elif kind == "freq_factors":
        # llama.cpp's rope_freqs.weight as read from a GGUF file: one divisor per frequency
        inv_freq = (inv_freq / _factor_list(scaling, "freq_factors", dim // 2)).astype(np.float32)
    elif kind in ("default", "dynamic"):
        # dynamic NTK only changes frequencies past the trained context; within it, it is default
        pass
    else:
        raise ValueError(f"rope scaling type {kind!r} is not supported")
    return inv_freq.astype(np.float32), float(attention_factor)


def rope_kind(scaling: dict | None) -> str:
    """The scaling's type: transformers' ``rope_type`` (or the older ``type``), else "default".

    kiln adds one of its own, "freq_factors" (a GGUF's ``rope_freqs.weight`` that matches no
    type transformers knows): ``{"rope_type": "freq_factors", "freq_factors": [...]}``."""
    scaling = scaling or {}
    return scaling.get("rope_type", scaling.get("type", "default")) or "default"


def _factor_list(scaling: dict, key: str, n: int) -> np.ndarray:
    if key not in scaling:
        raise KeyError(key)
    factors = np.asarray(scaling[key], dtype=np.float64)
    if factors.shape != (n,):
        raise ValueError(f"rope scaling {rope_kind(scaling)!r} needs {n} {key} (half the rotary "
                         f"dimension), not {factors.size}")
    if not (np.isfinite(factors).all() and (factors > 0).all()):
        raise ValueError(f"rope scaling {rope_kind(scaling)!r} has a {key} that is not a positive number")
    return factors.astype(np.float32)


def rope_freq_factors(cfg: ArchConfig) -> np.ndarray:
    """llama.cpp's ``rope_freqs.weight`` for the config's scaling: per rotary frequency, the
    divisor llama.cpp applies to ``theta ** (-2i/d)`` (1 where nothing is scaled).

    For llama3 scaling each factor is 1 for short wavelengths (< original context / high_freq_factor),
    ``factor`` for long ones (> original context / low_freq_factor) and ``1 / ((1 - s) / factor + s)``
    between, with ``s = (original context / wavelength - low) / (high - low)``: transformers'
    smoothing of the inverse frequency, written as a divisor."""
    scaling = cfg.rope_scaling or {}
    kind = rope_kind(scaling)
    dim = cfg.rotary_dim
    if kind == "freq_factors":
        return _factor_list(scaling, "freq_factors", dim // 2)
    if kind != "llama3":
        raise ValueError(f"rope scaling {kind!r} has no per-frequency factors")
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
    idx = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32)
    wavelen = 2 * math.pi / (1.0 / (cfg.rope_theta ** (idx / dim))).astype(np.float32).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        smooth = (old_ctx / wavelen - low) / (high - low)
        between = 1.0 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < old_ctx / high, 1.0, np.where(wavelen > old_ctx / low, factor, between))
    return out.astype(np.float32)


def rope_attention_factor(cfg: ArchConfig) -> float:
    """The factor the scaling multiplies cos/sin by (yarn's and longrope's mscale; else 1)."""
    return rope_inv_freq(cfg)[1]


def same_rotary(a: ArchConfig, b: ArchConfig, rtol: float = 1e-6) -> bool:
    """Whether two configs rotate q/k alike (frequencies, cos/sin factor, longrope's switch),
    to float32 rounding: how a GGUF's llama.cpp keys are checked against kiln's own record."""
    if a.rotary_dim != b.rotary_dim:
        return False
    if not a.rotary_dim:
        return True
    fa, ma = rope_inv_freq(a)
    fb, mb = rope_inv_freq(b)
    if not (np.allclose(fa, fb, rtol=rtol, atol=0) and math.isclose(ma, mb, rel_tol=rtol)):
        return False
    sa, sb = rope_switch_length(a), rope_switch_length(b)
    if sa != sb:
        return False
    return sa is None or bool(np.allclose(rope_inv_freq(a, long=True)[0], rope_inv_freq(b, long=True)[0],
                                          rtol=rtol, atol=0))


def rope_switch_length(cfg: ArchConfig) -> int | None:
    """Sequence length past which longrope's long factors replace the short ones, or None."""
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) == "longrope" and scaling.get("long_factor"):
        return int(scaling.get("original_max_position_embeddings", cfg.max_position_embeddings))
    return None


# the mixture-of-experts families' rows (kept apart: their tables and the per-expert stacking)
from . import moe as _moe  # noqa: E402,F401
