"""BERT-family encoders (what sentence-transformers' BERT-based embedders run), read into kiln's IR.

An encoder is not a decoder family row (frontends/arch.py): its graph differs in most places
the decoder builder has a switch for. Every token sees every other (bidirectional attention,
only the padding masked), the embedding sums token, token-type and absolute position
embeddings and normalizes them, and the LayerNorms come after each residual add (post-norm)
with no final norm. The graph ends at the last layer's hidden states [batch, seq, hidden];
:mod:`kiln.frontends.pooling` adds the pooling. It reuses the decoder builder's pieces
(linear layers, LayerNorm, activations, head splits) so the ops are the ones every backend
already lowers.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from kiln.errors import KilnError
from kiln.ir import Graph

from . import arch as A
from .builder import NEG_INF, _activation, _Emit, _heads, _linear, _norm

#: canonical role -> name in a BertModel checkpoint (a BertFor* checkpoint prefixes "bert.")
BERT_HF = {
    "embed": "embeddings.word_embeddings.weight",
    "pos_embed": "embeddings.position_embeddings.weight",
    "type_embed": "embeddings.token_type_embeddings.weight",
    "embed_norm": "embeddings.LayerNorm.weight",
    "embed_norm_bias": "embeddings.LayerNorm.bias",
    **{f"layers.{{i}}.{role}.{kind}": f"encoder.layer.{{i}}.{name}.{kind}"
       for role, name in (("q", "attention.self.query"), ("k", "attention.self.key"), ("v", "attention.self.value"),
                          ("o", "attention.output.dense"), ("up", "intermediate.dense"), ("down", "output.dense"))
       for kind in ("weight", "bias")},
    "layers.{i}.attn_norm": "encoder.layer.{i}.attention.output.LayerNorm.weight",
    "layers.{i}.attn_norm_bias": "encoder.layer.{i}.attention.output.LayerNorm.bias",
    "layers.{i}.mlp_norm": "encoder.layer.{i}.output.LayerNorm.weight",
    "layers.{i}.mlp_norm_bias": "encoder.layer.{i}.output.LayerNorm.bias",
}

_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def arch_config(raw: dict, folder: Path) -> tuple[A.ArchConfig, int]:
    """(kiln's config, type_vocab_size) from a BERT config.json."""
    path = folder / "config.json"
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings", "type_vocab_size"):
        v = raw.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v < 2**31:
            raise KilnError(path, f"{key} is {v!r}, not a positive whole number")
    if raw.get("position_embedding_type", "absolute") != "absolute":
        raise KilnError(path, f"position_embedding_type {raw['position_embedding_type']!r}: kiln reads absolute "
                              f"position embeddings")
    act = raw.get("hidden_act", "gelu")
    if act not in _ACTIVATIONS:
        raise KilnError(path, f"hidden_act {act!r} is not supported (kiln reads {', '.join(_ACTIVATIONS)})")
    eps = raw.get("layer_norm_eps", 1e-12)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise KilnError(path, f"layer_norm_eps is {eps!r}, not a small positive number")
    hidden, heads = raw["hidden_size"], raw["num_attention_heads"]
    if hidden % heads:
        raise KilnError(path, f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    pad = raw.get("pad_token_id")
    cfg = A.ArchConfig(family="bert", vocab_size=raw["vocab_size"], hidden_size=hidden,
                       num_layers=raw["num_hidden_layers"], num_heads=heads, num_kv_heads=heads,
                       head_dim=hidden // heads, intermediate_size=raw["intermediate_size"], norm_eps=float(eps),
                       norm="layer", activation=_ACTIVATIONS[act], gated_mlp=False, attention_bias=True,
                       output_bias=True, mlp_bias=True, pre_norm=False, learned_positions=True, rotary_dim=0,
                       max_position_embeddings=raw["max_position_embeddings"],
                       pad_token_id=pad if isinstance(pad, int) and 0 <= pad < raw["vocab_size"] else None)
    A.check_config(path, cfg)
    return cfg, raw["type_vocab_size"]


def _shapes(cfg: A.ArchConfig, types: int) -> dict:
    E, F = cfg.hidden_size, cfg.intermediate_size
    out = {"embed": (cfg.vocab_size, E), "pos_embed": (cfg.max_position_embeddings, E), "type_embed": (types, E),
           "embed_norm": (E,), "embed_norm_bias": (E,)}
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        for r in "qkvo":
            out.update({p + f"{r}.weight": (E, E), p + f"{r}.bias": (E,)})
        out.update({p + "up.weight": (F, E), p + "up.bias": (F,), p + "down.weight": (E, F), p + "down.bias": (E,),
                    p + "attn_norm": (E,), p + "attn_norm_bias": (E,), p + "mlp_norm": (E,),
                    p + "mlp_norm_bias": (E,)})
    return out


def load_weights(folder: Path, cfg: A.ArchConfig, types: int) -> dict:
    """The checkpoint's tensors by canonical role, every one present with the config's shape."""
    from .hf import _open_tensors
    tensors = _open_tensors(folder)
    if BERT_HF["embed"] not in tensors and "bert." + BERT_HF["embed"] in tensors:
        tensors = {name[len("bert."):]: w for name, w in tensors.items() if name.startswith("bert.")}
    roles = A.layer_roles(BERT_HF, cfg.num_layers)
    out = {}
    for role, shape in _shapes(cfg, types).items():
        name = roles[role]
        if name not in tensors:
            raise KilnError(folder, f"tensor {name} is missing (needed for {role})")
        if tuple(tensors[name].shape) != shape:
            raise KilnError(folder, f"tensor {name} has shape {list(tensors[name].shape)}, the config implies {list(shape)}")
        out[role] = tensors[name]
    return out


def build_graph(cfg: A.ArchConfig, weights: dict, name: str = "bert") -> Graph:
    """input_ids, attention_mask, token_type_ids [batch, seq] -> hidden states [batch, seq, hidden]."""
    g = Graph(name)
    e = _Emit(g)
    W = {role: g.add_weight(role, w) for role, w in weights.items()}
    ids = g.add_input("input_ids", "int64", ("batch", "seq"))
    mask = g.add_input("attention_mask", "int64", ("batch", "seq"))
    types = g.add_input("token_type_ids", "int64", ("batch", "seq"))
    seq = e.Gather(e.Shape(ids, name="ids_shape"), e.i64(1), name="seq_len")
    pos = e.Range(e.i64(0), seq, e.i64(1), name="positions")
    # transformers' order: words + token types, then + positions
    h = e.Add(e.Gather(W["embed"], ids, name="embed"), e.Gather(W["type_embed"], types, name="type_embed"),
              name="embed_types")
    h = e.Add(h, e.Gather(W["pos_embed"], pos, name="pos_embed"), name="embed_pos")
    h = _norm(e, cfg, h, W["embed_norm"], W["embed_norm_bias"], name="embed_norm")
    # padding only: [batch, 1, 1, seq], added to every head's scores
    keep = e.Unsqueeze(e.Cast(mask, to="bool", name="keep"), axes=[1, 2], name="keep_4d")
    bias = e.Where(keep, e.c(np.float32(0.0)), e.c(np.float32(NEG_INF)), name="padding_mask")
    for i in range(cfg.num_layers):
        e.scope = f"layers.{i}."
        p = f"layers.{i}."
        attn = _attention(e, cfg, h, p, W, bias)
        h = _norm(e, cfg, e.Add(h, attn, name="attn_residual"), W[p + "attn_norm"], W[p + "attn_norm_bias"],
                  name="attn_norm")
        up = _activation(e, cfg.activation, _linear(e, h, W[p + "up.weight"], W[p + "up.bias"], name="up_proj"), "act")
        down = _linear(e, up, W[p + "down.weight"], W[p + "down.bias"], name="down_proj")
        h = _norm(e, cfg, e.Add(h, down, name="mlp_residual"), W[p + "mlp_norm"], W[p + "mlp_norm_bias"],
                  name="mlp_norm")
    g.outputs = [h]
    return g


def _attention(e: _Emit, cfg: A.ArchConfig, x, p: str, W: dict, bias):
    H, D = cfg.num_heads, cfg.head_dim
    q = _heads(e, _linear(e, x, W[p + "q.weight"], W[p + "q.bias"], name="q_proj"), H, D, "q")
    k = _heads(e, _linear(e, x, W[p + "k.weight"], W[p + "k.bias"], name="k_proj"), H, D, "k")
    v = _heads(e, _linear(e, x, W[p + "v.weight"], W[p + "v.bias"], name="v_proj"), H, D, "v")
    scores = e.MatMul(q, e.Transpose(k, perm=[0, 1, 3, 2], name="k_t"), name="scores")
    scores = e.Mul(scores, e.c(np.float32(1.0 / math.sqrt(D))), name="scaled_scores")
    probs = e.Softmax(e.Add(scores, bias, name="masked_scores"), axis=-1, name="probs")
    out = e.Transpose(e.MatMul(probs, v, name="context"), perm=[0, 2, 1, 3], name="context_seq_first")
    out = e.Reshape(out, e.i64([0, 0, H * D]), name="context_merged")
    return _linear(e, out, W[p + "o.weight"], W[p + "o.bias"], name="o_proj")


def read(folder: Path, raw: dict):
    """(config, weights by role, graph to the hidden states) of a BERT folder."""
    cfg, types = arch_config(raw, folder)
    weights = load_weights(folder, cfg, types)
    return cfg, weights, build_graph(cfg, weights)
