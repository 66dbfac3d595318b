"""Quantization schemes: which block type each tensor of a float model gets.

A scheme is either one block type for every matrix (``q4_0``, ``q8_0``, ``q4_k``, ...: what
llama.cpp's converter ``--outtype`` and ``llama-quantize --pure`` do) or one of llama.cpp's
named mixtures (``q4_k_m``, ``q5_k_s``, ...), which give some tensors more bits. Both apply
llama.cpp's shape fallback: a row that is not a whole number of the type's blocks (K-types
need 256) takes a 32-wide type of similar size, else F16.

The mixtures are the rules of llama.cpp's ``llama_tensor_get_type_impl`` and
``tensor_type_fallback`` (``src/llama-quant.cpp``, read at commit 007dbbf3), written here as
one table row per mixture; only the parts that apply to kiln's families are kept (no
Falcon, no IQ types; the rules that change with an importance matrix concern only the IQ and
Q4_0/Q5_0 file types, so an ``--imatrix`` changes how tensors are quantized, not their types).
Experts (``ffn_*_exps``, 3-D) and shared experts (``ffn_*_shexp``) take their projection's
rules, with the layer from the tensor's block as llama.cpp does for mixtures of experts; routers
(``ffn_gate_inp``, ``ffn_gate_inp_shexp``) stay float; an 8-expert model (Mixtral) gets
llama.cpp's extra bits for attn_k, attn_v and attn_output. Rules are keyed by llama.cpp's tensor categories,
which kiln derives from the canonical roles (``layers.3.v.weight`` -> ``attn_v``).

Used by the compile-time pass (``passes/quantize.py``) and by the GGUF writer, so
``kiln compile --quant`` and ``kiln convert --to gguf --quant`` choose the same types.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from . import formats

# llama.cpp's tensor_type_fallback: a type whose blocks do not divide the row -> a 32-wide type
FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0",
            "tq1_0": "q4_0", "tq2_0": "q4_0", "iq4_xs": "iq4_nl"}


@dataclass(frozen=True)
class Layout:
    """What the mixture rules need to know about a model besides a tensor's role and shape."""
    num_layers: int
    gqa: int = 1                 # query heads per key/value head (llama.cpp's n_gqa())
    tied: bool = False           # no separate output matrix: the token embedding is the head
    fused_qkv: bool = False      # the GGUF file holds attn_qkv (phi3, gpt2), not attn_q/k/v
    fused_gate_up: bool = False  # the GGUF file holds gate and up in ffn_up (phi3)
    is_70b: bool = False         # llama.cpp's LLM_TYPE_70B: llama, 80 layers, grouped heads
    n_expert: int = 0            # experts per MoE layer (llama.cpp's hparams.n_expert)

    @classmethod
    def of(cls, cfg, family) -> "Layout":
        """From an ArchConfig (or its dict) and a frontends.arch.Family."""
        get = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
        layers, heads, kv = int(get("num_layers")), int(get("num_heads")), int(get("num_kv_heads") or get("num_heads"))
        return cls(num_layers=layers, gqa=heads // max(kv, 1), tied=bool(get("tie_word_embeddings", False)),
                   fused_qkv="layers.{i}.qkv.weight" in family.gguf_names,
                   fused_gate_up="layers.{i}.gate_up.weight" in family.gguf_names,
                   is_70b=family.gguf_arch == "llama" and layers == 80 and heads != kv and not get("num_experts"),
                   n_expert=int(get("num_experts", 0) or 0))


# ---- tensor categories (llama.cpp's tensor_get_category, on kiln's roles) ---------------------

_LAYER_CATEGORIES = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "qkv": "attn_qkv", "o": "attn_output",
                     "gate": "ffn_gate", "up": "ffn_up", "gate_up": "ffn_up", "down": "ffn_down"}


def category(role: str, layout: Layout) -> str | None:
    """llama.cpp's category of a role's tensor, ``"other"`` for a matrix it has no rule for,
    or None for a tensor that stays float (position embeddings; norms and biases are 1-D)."""
    if role == "embed":
        return "token_embd"
    if role == "lm_head":
        return "output"
    if role == "pos_embed" or role.endswith(("norm", "bias")):
        return None
    parts = role.split(".")
    if len(parts) == 5 and parts[2] in ("experts", "shexp") and parts[3] in ("gate", "up", "down"):
        return _LAYER_CATEGORIES[parts[3]]          # ffn_*_exps, ffn_*_shexp
    if parts[-2:] == ["router", "weight"]:
        return None            # llama.cpp never quantizes the routers (ffn_gate_inp, 1-D ffn_gate_inp_shexp)
    if len(parts) == 4 and parts[0] == "layers" and parts[3] == "weight" and parts[2] in _LAYER_CATEGORIES:
        kind = parts[2]
        if layout.fused_qkv and kind in ("q", "k", "v"):
            kind = "qkv"           # split on the way in, but one attn_qkv tensor in a GGUF file
        if layout.fused_gate_up and kind in ("gate", "up"):
            kind = "gate_up"
        return _LAYER_CATEGORIES[kind]
    return "other"


def layer_of(role: str) -> int:
    return int(role.split(".")[1])


# ---- mixture rules: (layer, layout) -> a type, or None for the mixture's base type -----------
# In llama.cpp the layer of attn_v is a running count of attn_v-like tensors (i_attention_wv)
# over tensors sorted by layer; with one such tensor per layer it is the layer index.

Rule = Callable[[int, Layout], "str | None"]


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers and every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def always(t: str) -> Rule:
    return lambda i, lay: t


def more_bits(t: str) -> Rule:
    return lambda i, lay: t if use_more_bits(i, lay.num_layers) else None


def first_layers(k: int, t: str, rest: str | None = None) -> Rule:
    return lambda i, lay: t if i < k else rest


def first_part(d: int, t: str, rest: str | None = None) -> Rule:
    """``t`` for layers below num_layers // d (integer division, as in C)."""
    return lambda i, lay: t if i < lay.num_layers // d else rest


def by_gqa(at_least: int, t: str, rest: str) -> Rule:
    return lambda i, lay: t if lay.gqa >= at_least else rest


@dataclass(frozen=True)
class Scheme:
    name: str
    base: str                          # the type of every tensor no rule picks another for
    file_type: int | None              # llama.cpp's general.file_type (enum llama_ftype) of a mixture
    rules: dict = field(default_factory=dict)   # category -> Rule
    mixture: bool = True               # False: one type for every matrix (no output rule)

    def type_for(self, role: str, shape, layout: Layout | None) -> str | None:
        """The block type of this tensor, "f16" when no block type fits its rows, or None
        when it stays float (1-D tensors, position embeddings)."""
        shape, layout = tuple(shape), layout or Layout(0)
        cat = category(role, layout)
        if cat is None or len(shape) < 2:
            return None
        cols = shape[-1]
        t = self.base
        if self.mixture:
            if cat == "output" or (cat == "token_embd" and layout.tied):
                # llama.cpp quantizes the head (and a tied embedding) with more bits: Q6_K, or
                # Q8_0 when the row is not whole blocks of the base type
                if cols % formats.get(self.base).block_size:
                    t = "q8_0"
                elif self.base != "q8_0":
                    t = "q6_k"
            else:
                rule = self.rules.get("attn_v" if cat == "attn_qkv" else cat)
                if rule is not None:
                    t = rule(layer_of(role), layout) or t
                if cat in ("attn_v", "attn_qkv") and layout.is_70b and t in ("q3_k", "q4_k"):
                    t = "q5_k"     # 70B: attn_v is 8x smaller than attn_q, more bits are cheap
                if layout.n_expert == 8:
                    # llama.cpp's 8-expert rules: attention is small beside the experts
                    if cat in ("attn_v", "attn_qkv", "attn_k"):
                        t = "q8_0"
                    elif cat == "attn_output":
                        t = "q5_k" if self.name in _EIGHT_EXPERT_OUTPUT_Q5K else self.base
        return fallback(t, cols)

    def gguf_type(self, role: str, shape, layout: Layout | None) -> str:
        """The type a GGUF file stores: float tensors are F32."""
        return self.type_for(role, shape, layout) or "f32"


# the mixtures whose attn_output llama.cpp raises to Q5_K in an 8-expert model (the others keep their base type)
_EIGHT_EXPERT_OUTPUT_Q5K = ("q2_k_m", "q3_k_s", "q3_k_m", "q4_k_s", "q4_k_m")


def fallback(t: str, cols: int) -> str:
    """llama.cpp's tensor_type_fallback for a row of ``cols`` elements."""
    if cols % formats.get(t).block_size == 0:
        return t
    alt = FALLBACK.get(t)
    if alt is not None and cols % formats.get(alt).block_size == 0:
        return alt
    return "f16"


# llama.cpp's K-quant mixtures (llama_tensor_get_type_impl), non-MoE, non-Falcon, no imatrix.
# Every mixture also takes the output rule above (head and tied embedding: Q6_K or Q8_0).
# "q2_k_m" is llama.cpp's Q2_K file type: kiln's bare "q2_k" has always meant every matrix in
# Q2_K (as llama-quantize --pure), so the mixture takes a suffix. llama.cpp's Q6_K file type
# has no rule beyond the output one, which Q6_K's fallback already gives: "q6_k" is both.
MIXTURES = {s.name: s for s in [
    Scheme("q2_k_m", "q2_k", 10, {"attn_v": by_gqa(4, "q4_k", "q3_k"), "ffn_down": always("q3_k"),
                                  "attn_output": always("q3_k")}),
    Scheme("q3_k_s", "q3_k", 11),
    Scheme("q3_k_m", "q3_k", 12, {"attn_v": first_layers(2, "q5_k", "q4_k"), "ffn_down": first_part(16, "q5_k", "q4_k"),
                                  "attn_output": always("q4_k")}),
    Scheme("q3_k_l", "q3_k", 13, {"attn_v": always("q5_k"), "ffn_down": always("q5_k"), "attn_output": always("q5_k")}),
    Scheme("q4_k_s", "q4_k", 14, {"attn_v": first_layers(4, "q5_k"), "ffn_down": first_part(8, "q5_k")}),
    Scheme("q4_k_m", "q4_k", 15, {"attn_v": more_bits("q6_k"), "ffn_down": more_bits("q6_k")}),
    Scheme("q5_k_s", "q5_k", 16),
    Scheme("q5_k_m", "q5_k", 17, {"attn_v": more_bits("q6_k"), "ffn_down": more_bits("q6_k")}),
    Scheme("q6_k", "q6_k", 18),
]}

def get(name: str) -> Scheme:
    """A mixture by name, else a single block type; ValueError names the choices."""
    key = name.lower()
    if key in MIXTURES:
        return MIXTURES[key]
    types = block_types()
    if key not in types:
        raise ValueError(f"unknown quantization {name!r}: choose a block type "
                         f"({', '.join(types)}) or a mixture ({', '.join(MIXTURES)})")
    return Scheme(key, key, None, mixture=False)


def block_types() -> list[str]:
    """Block types kiln can write: a GGUF type and a quantizer."""
    base = formats.WeightFormat.quantize_blocks
    return [name for name, fmt in sorted(formats.all_formats().items())
            if fmt.is_block and fmt.gguf_type is not None and type(fmt).quantize_blocks is not base]
