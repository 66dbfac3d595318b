"""One config-driven transformer builder for every family, in primitive ops.

The graph computes what the source model computes, op for op, the way transformers writes it
(RMSNorm as pow/mean/rsqrt/mul, rotary as rotate-half, attention as matmul/softmax/matmul), so
the interpreter reproduces transformers' float32 logits. Fusion passes later turn these
patterns into composite ops; nothing here knows about any backend.

Positions and the causal mask are computed in the graph from ``past_length``, a constant 0 in
the full-sequence graph that the KV-cache pass replaces with the cached length.
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from kiln.ir import Graph, Value
from kiln.weights import Weight

from .arch import ArchConfig, layer_window, rope_inv_freq, rope_switch_length

NEG_INF = float(np.finfo(np.float32).min)


class _Emit:
    """Small helper so the builder reads like the model: ``e.MatMul(a, b)``."""

    def __init__(self, g: Graph):
        self.g = g
        self.scope = ""
        self.gathered = {}      # (input, order) -> the input gathered into that order

    def __getattr__(self, op):
        def call(*inputs, name: str = "", **attrs):
            return self.g.add_node(op, inputs, attrs, name=f"{self.scope}{name or op.lower()}")[0]
        return call

    def c(self, value, dtype="float32"):
        return self.g.const(np.asarray(value, dtype=dtype), name=f"{self.scope}c")

    def i64(self, value):
        return self.g.const(np.asarray(value, dtype=np.int64), name=f"{self.scope}shape")


def build_graph(cfg: ArchConfig, weights: dict[str, Weight], name: str = "model", *,
                hidden_states: bool = False) -> Graph:
    """The model's graph, from ``input_ids`` to its logits; with ``hidden_states``, to the final
    norm's output [batch, seq, hidden] instead (what an embedding model pools)."""
    g = Graph(name)
    e = _Emit(g)
    W = {}

    def w(role: str) -> Value | None:
        if role not in weights:
            return None
        if role not in W:
            # a GPTQ desc_act layer: its blocks over sorted inputs (see _linear)
            W[role] = g.add_weight(role, getattr(weights[role], "sorted_blocks", None) or weights[role])
        return W[role]

    ids = g.add_input("input_ids", "int64", ("batch", "seq"))
    past = g.const(np.asarray(0, dtype=np.int64), name="past_length")
    g.meta["past_length"] = past.name

    seq = e.Gather(e.Shape(ids, name="ids_shape"), e.i64(1), name="seq_len")
    total = e.Add(past, seq, name="total_len")
    one = e.i64(1)
    pos = e.Range(past, total, one, name="positions")                       # [seq]
    # where the rotations read positions: an ONNX export gives them per row (position_ids)
    g.meta["rotary_positions"] = []

    h = e.Gather(w("embed"), ids, name="embed")                               # [b, s, hidden]
    if cfg.embed_scale != 1.0:
        # gemma rounds the scale to the activation dtype before multiplying
        h = e.Mul(h, e.c(np.float32(cfg.embed_scale)), name="embed_scale")
    if cfg.learned_positions:
        pos_embed = e.Gather(w("pos_embed"), pos, name="pos_embed")
        g.meta["position_embeddings"] = pos_embed.name
        h = e.Add(h, pos_embed, name="embed_pos")

    windows = [layer_window(cfg, i) for i in range(cfg.num_layers)]
    masks = {}
    for window in sorted(set(windows)):
        e.scope = f"window{window}." if len(set(windows)) > 1 and window else ""
        masks[window] = _causal_mask(e, pos, total, window)                   # [seq, total]
    e.scope = ""
    # what each mask means, so an attention fusion can check it is one of these masks it replaces
    g.meta["causal_masks"] = {m.name: window for window, m in masks.items()}
    rotary = {}
    if cfg.rotary_dim:
        rotary["global"] = _rotary_tables(e, cfg, pos, total)                 # [seq, rotary_dim] each
        if cfg.rope_local_theta is not None:
            # gemma3's sliding layers: plain rotary at their own base
            e.scope = "local."
            rotary["local"] = _rotary_tables(e, replace(cfg, rope_theta=cfg.rope_local_theta, rope_scaling={}),
                                             pos, total)
            e.scope = ""

    for i in range(cfg.num_layers):
        e.scope = f"layers.{i}."
        p = f"layers.{i}."
        cos, sin = rotary.get("local" if windows[i] and "local" in rotary else "global", (None, None))
        x = _norm(e, cfg, h, w(p + "attn_norm"), w(p + "attn_norm_bias"), name="attn_norm") if cfg.pre_norm else h
        h = _residual(e, cfg, h, _attention(e, cfg, x, p, w, cos, sin, masks[windows[i]]), w(p + "attn_post_norm"),
                      "attn")
        x = _norm(e, cfg, h, w(p + "mlp_norm"), w(p + "mlp_norm_bias"), name="mlp_norm") if cfg.pre_norm else h
        mlp = _moe(e, cfg, x, p, w) if cfg.num_experts else _mlp(e, cfg, x, p, w)
        h = _residual(e, cfg, h, mlp, w(p + "mlp_post_norm"), "mlp")
    e.scope = ""
    h = _norm(e, cfg, h, w("final_norm"), w("final_norm_bias"), name="final_norm")
    if hidden_states:
        g.outputs = [h]
        return g
    head = w("embed") if cfg.tie_word_embeddings else w("lm_head")
    logits = _linear(e, h, head, w("lm_head_bias") if not cfg.tie_word_embeddings else None, name="lm_head")
    if cfg.logit_scale != 1.0:
        logits = e.Div(logits, e.c(np.float32(cfg.logit_scale)), name="logit_scale")
    if cfg.final_softcap:
        logits = _softcap(e, logits, cfg.final_softcap, "final_softcap")
    logits.name = g.fresh_name("logits") if logits.name != "logits" else logits.name
    g.outputs = [logits]
    return g


def _linear(e: _Emit, x: Value, weight: Value, bias: Value | None, name: str) -> Value:
    """torch.nn.Linear: x @ W.T + b, with W stored [out, in] as in the checkpoint. A weight whose
    columns are stored in another order (``input_order``: GPTQ's desc_act, whose groups are
    runs only once the inputs are sorted) multiplies x gathered into that order."""
    order = getattr(weight.weight, "input_order", None) if weight.is_weight else None
    if order is not None:
        key = (x.name, order.tobytes())
        if key not in e.gathered:       # q/k/v (gate/up) share one order: gather once
            e.gathered[key] = e.Gather(x, e.i64(order), axis=-1, name=f"{name}.input_order")
        x = e.gathered[key]
    y = e.MatMul(x, e.Transpose(weight, perm=[1, 0], name=f"{name}.wt"), name=name)
    if bias is not None:
        y = e.Add(y, bias, name=f"{name}.bias")
    return y


def _softcap(e: _Emit, x: Value, cap: float, name: str) -> Value:
    """cap * tanh(x / cap), in transformers' order (divide, tanh, multiply)."""
    c = e.c(np.float32(cap))
    return e.Mul(e.Tanh(e.Div(x, c, name=f"{name}.div"), name=f"{name}.tanh"), c, name=name)


def _residual(e: _Emit, cfg: ArchConfig, h: Value, out: Value, post_norm: Value | None, name: str) -> Value:
    """h + the block's output, after its post-norm (olmo2, gemma2/3) and granite's multiplier."""
    if cfg.post_norm:
        out = _norm(e, cfg, out, post_norm, None, name=f"{name}_post_norm")
    if cfg.residual_scale != 1.0:
        out = e.Mul(out, e.c(np.float32(cfg.residual_scale)), name=f"{name}_residual_scale")
    return e.Add(h, out, name=f"{name}_residual")


def _norm(e: _Emit, cfg: ArchConfig, x: Value, weight: Value, bias: Value | None, name: str) -> Value:
    eps = e.c(np.float32(cfg.norm_eps))
    if cfg.norm == "layer":
        mean = e.ReduceMean(x, axes=[-1], keepdims=1, name=f"{name}.mean")
        d = e.Sub(x, mean, name=f"{name}.center")
        var = e.ReduceMean(e.Mul(d, d, name=f"{name}.sq"), axes=[-1], keepdims=1, name=f"{name}.var")
        y = e.Div(d, e.Sqrt(e.Add(var, eps, name=f"{name}.eps"), name=f"{name}.std"), name=f"{name}.normed")
        y = e.Mul(y, weight, name=f"{name}.scale")
        return e.Add(y, bias, name=f"{name}.shift") if bias is not None else y
    var = e.ReduceMean(e.Pow(x, e.c(np.float32(2.0)), name=f"{name}.sq"), axes=[-1], keepdims=1, name=f"{name}.var")
    inv = e.Reciprocal(e.Sqrt(e.Add(var, eps, name=f"{name}.eps"), name=f"{name}.std"), name=f"{name}.rstd")
    y = e.Mul(x, inv, name=f"{name}.normed")
    if cfg.norm_offset:
        weight = e.Add(weight, e.c(np.float32(cfg.norm_offset)), name=f"{name}.w_offset")
    return e.Mul(y, weight, name=f"{name}.scale")


def _head_norm(e: _Emit, cfg: ArchConfig, x: Value, weight: Value, name: str) -> Value:
    """RMSNorm over the last axis of [b, s, heads, head_dim] (qwen3's and gemma3's q/k norms)."""
    eps = e.c(np.float32(cfg.norm_eps))
    var = e.ReduceMean(e.Pow(x, e.c(np.float32(2.0)), name=f"{name}.sq"), axes=[-1], keepdims=1, name=f"{name}.var")
    inv = e.Reciprocal(e.Sqrt(e.Add(var, eps, name=f"{name}.eps"), name=f"{name}.std"), name=f"{name}.rstd")
    if cfg.norm_offset:
        weight = e.Add(weight, e.c(np.float32(cfg.norm_offset)), name=f"{name}.w_offset")
    return e.Mul(e.Mul(x, inv, name=f"{name}.normed"), weight, name=f"{name}.scale")


def _causal_mask(e: _Emit, pos: Value, total: Value, window: int | None) -> Value:
    zero = e.i64(0)
    keys = e.Range(zero, total, e.i64(1), name="key_positions")              # [total]
    q = e.Unsqueeze(pos, axes=[1], name="query_pos")                          # [seq, 1]
    k = e.Unsqueeze(keys, axes=[0], name="key_pos")                           # [1, total]
    allowed = e.LessOrEqual(k, q, name="causal")
    if window:
        recent = e.Greater(k, e.Sub(q, e.i64(window), name="window_start"), name="in_window")
        allowed = e.And(allowed, recent, name="causal_window")
    return e.Where(allowed, e.c(np.float32(0.0)), e.c(np.float32(NEG_INF)), name="mask")


def _rotary_tables(e: _Emit, cfg: ArchConfig, pos: Value, total: Value) -> tuple[Value, Value]:
    inv_freq, attn_factor = rope_inv_freq(cfg)
    col = e.Unsqueeze(pos, axes=[1], name="pos_col")                                    # [seq, 1]
    e.g.meta["rotary_positions"].append(col.name)
    p = e.Cast(col, to="float32", name="pos_f")
    freqs = e.Mul(p, e.c(inv_freq[None, :]), name="rope_freqs")                           # [seq, rot/2]
    switch = rope_switch_length(cfg)
    if switch is not None:
        # longrope: as transformers does per forward call, a call whose sequence reaches past
        # the original context rotates with the long factors (cached keys keep theirs)
        long_freqs = e.Mul(p, e.c(rope_inv_freq(cfg, long=True)[0][None, :]), name="rope_freqs_long")
        is_long = e.Greater(total, e.i64(switch), name="rope_is_long")
        freqs = e.Where(is_long, long_freqs, freqs, name="rope_freqs_chosen")
    emb = e.Concat(freqs, freqs, axis=-1, name="rope_emb")                                 # [seq, rot]
    cos, sin = e.Cos(emb, name="rope_cos"), e.Sin(emb, name="rope_sin")
    if attn_factor != 1.0:
        f = e.c(np.float32(attn_factor))
        cos, sin = e.Mul(cos, f, name="rope_cos_scaled"), e.Mul(sin, f, name="rope_sin_scaled")
    return cos, sin


def _rotate(e: _Emit, cfg: ArchConfig, x: Value, cos: Value, sin: Value, name: str) -> Value:
    """x * cos + rotate_half(x) * sin on the first rotary_dim features of [b, h, s, d]."""
    rot, d = cfg.rotary_dim, cfg.head_dim
    xr = x if rot == d else e.Slice(x, starts=[0], ends=[rot], axes=[-1], name=f"{name}.rot_part")
    half = rot // 2
    x1 = e.Slice(xr, starts=[0], ends=[half], axes=[-1], name=f"{name}.x1")
    x2 = e.Slice(xr, starts=[half], ends=[rot], axes=[-1], name=f"{name}.x2")
    rotated = e.Concat(e.Neg(x2, name=f"{name}.neg"), x1, axis=-1, name=f"{name}.rotate_half")
    out = e.Add(e.Mul(xr, cos, name=f"{name}.cos"), e.Mul(rotated, sin, name=f"{name}.sin"), name=f"{name}.rope")
    if rot != d:
        rest = e.Slice(x, starts=[rot], ends=[d], axes=[-1], name=f"{name}.pass_part")
        out = e.Concat(out, rest, axis=-1, name=f"{name}.rope_full")
    return out


def _heads(e: _Emit, x: Value, n: int, d: int, name: str) -> Value:
    """[b, s, n*d] -> [b, n, s, d]"""
    x = e.Reshape(x, e.i64([0, 0, n, d]), name=f"{name}.split_heads")
    return e.Transpose(x, perm=[0, 2, 1, 3], name=f"{name}.heads_first")


def _repeat_kv(e: _Emit, x: Value, groups: int, heads: int, d: int, name: str) -> Value:
    """GQA: [b, kv, s, d] -> [b, kv*groups, s, d], each kv head repeated ``groups`` times."""
    if groups == 1:
        return x
    x = e.Unsqueeze(x, axes=[2], name=f"{name}.unsqueeze")
    x = e.Expand(x, e.i64([1, 1, groups, 1, 1]), name=f"{name}.expand")
    return e.Reshape(x, e.i64([0, heads, -1, d]), name=f"{name}.repeat")


def _attention(e: _Emit, cfg: ArchConfig, x: Value, p: str, w, cos, sin, mask) -> Value:
    H, KV, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = _linear(e, x, w(p + "q.weight"), w(p + "q.bias"), name="q_proj")
    k = _linear(e, x, w(p + "k.weight"), w(p + "k.bias"), name="k_proj")
    v = _linear(e, x, w(p + "v.weight"), w(p + "v.bias"), name="v_proj")
    if cfg.qk_norm and cfg.qk_norm_whole:
        q = _heads(e, _norm(e, cfg, q, w(p + "q_norm"), None, name="q_norm"), H, D, "q")
        k = _heads(e, _norm(e, cfg, k, w(p + "k_norm"), None, name="k_norm"), KV, D, "k")
    elif cfg.qk_norm:
        q = e.Reshape(q, e.i64([0, 0, H, D]), name="q.split_heads")
        k = e.Reshape(k, e.i64([0, 0, KV, D]), name="k.split_heads")
        q = e.Transpose(_head_norm(e, cfg, q, w(p + "q_norm"), "q_norm"), perm=[0, 2, 1, 3], name="q.heads_first")
        k = e.Transpose(_head_norm(e, cfg, k, w(p + "k_norm"), "k_norm"), perm=[0, 2, 1, 3], name="k.heads_first")
    else:
        q, k = _heads(e, q, H, D, "q"), _heads(e, k, KV, D, "k")
    v = _heads(e, v, KV, D, "v")
    if cos is not None:
        q = _rotate(e, cfg, q, cos, sin, "q")
        k = _rotate(e, cfg, k, cos, sin, "k")
    k = _repeat_kv(e, k, H // KV, H, D, "k")
    v = _repeat_kv(e, v, H // KV, H, D, "v")
    scale = cfg.attn_scale if cfg.attn_scale is not None else 1.0 / math.sqrt(D)
    scores = e.MatMul(q, e.Transpose(k, perm=[0, 1, 3, 2], name="k_t"), name="scores")
    scores = e.Mul(scores, e.c(np.float32(scale)), name="scaled_scores")
    if cfg.attn_softcap:
        scores = _softcap(e, scores, cfg.attn_softcap, "softcap_scores")
    scores = e.Add(scores, mask, name="masked_scores")
    sinks = w(p + "sinks")
    if sinks is not None:
        scores = _with_sinks(e, scores, sinks, H)
    probs = e.Softmax(scores, axis=-1, name="probs")
    if sinks is not None:
        probs = e.Slice(probs, starts=[0], ends=[-1], axes=[-1], name="probs_without_sink")
    out = e.MatMul(probs, v, name="context")
    out = e.Transpose(out, perm=[0, 2, 1, 3], name="context_seq_first")
    out = e.Reshape(out, e.i64([0, 0, H * D]), name="context_merged")
    return _linear(e, out, w(p + "o.weight"), w(p + "o.bias"), name="o_proj")


def _with_sinks(e: _Emit, scores: Value, sinks: Value, heads: int) -> Value:
    """gpt-oss's attention sinks as transformers adds them: a column [b, H, s, 1] holding each
    head's sink logit, concatenated after the masked scores (the softmax's one extra key)."""
    col = e.Reshape(sinks, e.i64([1, heads, 1, 1]), name="sinks.heads")
    lead = e.Slice(e.Shape(scores, name="sinks.scores_shape"), starts=[0], ends=[3], axes=[0], name="sinks.lead")
    col = e.Expand(col, e.Concat(lead, e.i64([1]), axis=0, name="sinks.shape"), name="sinks.column")
    return e.Concat(scores, col, axis=-1, name="scores_with_sinks")


def _activation(e: _Emit, kind: str, x: Value, name: str) -> Value:
    if kind == "silu":
        return e.Mul(x, e.Sigmoid(x, name=f"{name}.sigmoid"), name=name)
    if kind == "gelu":
        inner = e.Erf(e.Mul(x, e.c(np.float32(1 / math.sqrt(2))), name=f"{name}.scaled"), name=f"{name}.erf")
        return e.Mul(e.Mul(x, e.c(np.float32(0.5)), name=f"{name}.half"),
                     e.Add(inner, e.c(np.float32(1.0)), name=f"{name}.one_plus"), name=name)
    if kind == "gelu_tanh":
        cube = e.Mul(e.Pow(x, e.c(np.float32(3.0)), name=f"{name}.cube"), e.c(np.float32(0.044715)), name=f"{name}.cube_scaled")
        inner = e.Mul(e.Add(x, cube, name=f"{name}.poly"), e.c(np.float32(math.sqrt(2 / math.pi))), name=f"{name}.inner")
        t = e.Add(e.Tanh(inner, name=f"{name}.tanh"), e.c(np.float32(1.0)), name=f"{name}.one_plus")
        return e.Mul(e.Mul(x, e.c(np.float32(0.5)), name=f"{name}.half"), t, name=name)
    raise ValueError(f"activation {kind!r} is not supported")


def _mlp(e: _Emit, cfg: ArchConfig, x: Value, p: str, w) -> Value:
    if cfg.gated_mlp:
        gate = _linear(e, x, w(p + "gate.weight"), w(p + "gate.bias"), name="gate_proj")
        up = _linear(e, x, w(p + "up.weight"), w(p + "up.bias"), name="up_proj")
        act = e.Mul(_activation(e, cfg.activation, gate, "act"), up, name="gated")
    else:
        act = _activation(e, cfg.activation, _linear(e, x, w(p + "up.weight"), w(p + "up.bias"), name="up_proj"), "act")
    return _linear(e, act, w(p + "down.weight"), w(p + "down.bias"), name="down_proj")


def _moe(e: _Emit, cfg: ArchConfig, x: Value, p: str, w) -> Value:
    """The experts as one MoE op (the router's choice is not a pattern a fusion could find);
    kiln.passes.moe decomposes it for backends without a kernel."""
    ins = [x] + [w(p + r) for r in ("router.weight", "experts.gate.weight", "experts.up.weight", "experts.down.weight")]
    attrs = {}
    if cfg.expert_bias:
        ins += [w(p + f"{r}.bias") for r in ("router", "experts.gate", "experts.up", "experts.down")]
        attrs["bias"] = 1
    if cfg.expert_glu != "silu":
        attrs.update(activation=cfg.expert_glu, alpha=float(cfg.swiglu_alpha), limit=float(cfg.swiglu_limit))
    if cfg.shared_expert_intermediate_size:
        ins += [w(p + f"shexp.{r}.weight") for r in ("gate", "up", "down", "router")]
    return e.MoE(*ins, top_k=cfg.experts_per_token, normalize=int(cfg.expert_norm_topk), name="moe", **attrs)
