"""The mixture-of-experts op: a router picks k experts per token, their gated MLPs are summed.

Expert weights are 3-D, ``[experts, out, in]``, as llama.cpp stores them (``ffn_gate_exps``,
``ffn_up_exps``, ``ffn_down_exps``): one tensor per projection rather than one per expert, so a
backend can read the selected experts' rows of one array. ``kiln.passes.moe.decompose`` turns
the op into primitives (every expert computed, weighted by a dense routing matrix) for backends
without a kernel of their own.
"""
from __future__ import annotations

import numpy as np

from .ir import TensorType
from .ops import REQUIRED, op

SCORING = ("softmax", "sigmoid")
ACTIVATIONS = ("silu", "swiglu_oai")


def _sigmoid(a: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-a))).astype(a.dtype)


def _silu(a: np.ndarray) -> np.ndarray:
    return a * _sigmoid(a)


def glu(gate: np.ndarray, up: np.ndarray, attrs: dict) -> np.ndarray:
    """The gated activation of an expert's two projections: silu(gate) ⊙ up, or gpt-oss's
    clamped SwiGLU, (clip(up, ±limit) + 1) ⊙ g·sigmoid(alpha·g) with g = min(gate, limit)."""
    if attrs["activation"] == "silu":
        return _silu(gate) * up
    limit, alpha = np.float32(attrs["limit"]), np.float32(attrs["alpha"])
    g = np.minimum(gate, limit)
    return (np.clip(up, -limit, limit) + np.float32(1)) * (g * _sigmoid(g * alpha))


def routing(x: np.ndarray, router: np.ndarray, attrs: dict, bias: np.ndarray | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
    """Per token (rows of x [n, hidden]): the k chosen experts [n, k] and their weights [n, k]."""
    logits = x @ router.T
    if bias is not None:
        logits = logits + bias
    if attrs["scoring"] == "softmax":
        e = np.exp(logits - logits.max(-1, keepdims=True))
        probs = e / e.sum(-1, keepdims=True)
    else:
        probs = _sigmoid(logits)
    k = int(attrs["top_k"])
    idx = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    weights = np.take_along_axis(probs, idx, axis=-1)
    if attrs["normalize"]:
        weights = weights / weights.sum(-1, keepdims=True)
    return idx, weights.astype(x.dtype)


def parts(inputs: list, attrs: dict) -> tuple[list, list | None, list | None]:
    """The op's inputs by role: (x, router, gate, up, down), the four biases (router [X],
    gate [X, F], up [X, F], down [X, E]) or None, the shared expert's four or None."""
    n = 5 + (4 if attrs.get("bias") else 0)
    return list(inputs[:5]), (list(inputs[5:n]) if n > 5 else None), (list(inputs[n:n + 4]) if len(inputs) > n else None)


@op("MoE", {"top_k": REQUIRED, "normalize": 0, "scoring": "softmax", "activation": "silu", "bias": 0,
            "alpha": 1.702, "limit": 7.0})
class MoE:
    """MoE(x [..., E], router [X, E], gate [X, F, E], up [X, F, E], down [X, E, F]
    [, router_bias [X], gate_bias [X, F], up_bias [X, F], down_bias [X, E]]
    [, shared_gate [S, E], shared_up [S, E], shared_down [E, S], shared_router [1, E]]) -> [..., E].

    Per token: scores = softmax (or sigmoid) of x·routerᵀ (+ router_bias); the ``top_k`` best
    experts, their scores divided by their sum when ``normalize`` (transformers'
    ``norm_topk_prob``; gpt-oss's softmax over the top k logits is the same); the output is
    Σ score_e · down_e(glu(gate_e·x, up_e·x)), glu being silu(g) ⊙ u or, with ``activation``
    swiglu_oai (gpt-oss), (clip(u, ±limit) + 1) ⊙ min(g, limit)·sigmoid(alpha·min(g, limit)).
    With ``bias`` the four bias inputs follow the experts (gpt-oss: every projection has one).
    With the four shared inputs (qwen2_moe) a shared expert's MLP, times
    sigmoid(x·shared_routerᵀ), is added for every token.
    Decomposes to MatMul, Softmax/Sigmoid, TopK, Equal, Cast, ReduceSum and elementwise ops.
    """
    @staticmethod
    def infer(inputs, attrs):
        base = 9 if attrs.get("bias") else 5
        if len(inputs) not in (base, base + 4):
            raise ValueError(f"MoE takes {base} inputs ({base + 4} with a shared expert), not {len(inputs)}")
        if attrs["scoring"] not in SCORING:
            raise ValueError(f"MoE: scoring {attrs['scoring']!r} is not one of {', '.join(SCORING)}")
        if attrs["activation"] not in ACTIVATIONS:
            raise ValueError(f"MoE: activation {attrs['activation']!r} is not one of {', '.join(ACTIVATIONS)}")
        return [inputs[0].type]

    @staticmethod
    def compute(x, attrs):
        (a, router, gate, up, down), bias, shared = parts(x, attrs)
        shape = a.shape
        flat = a.reshape(-1, shape[-1])
        idx, weights = routing(flat, router, attrs, bias[0] if bias else None)
        out = np.zeros_like(flat)
        for e in np.unique(idx):
            rows, slot = np.nonzero(idx == e)
            h = flat[rows]
            g, u = h @ gate[e].T, h @ up[e].T
            if bias:
                g, u = g + bias[1][e], u + bias[2][e]
            y = glu(g, u, attrs) @ down[e].T
            if bias:
                y = y + bias[3][e]
            out[rows] += y * weights[rows, slot][:, None]
        if shared:
            sg, su, sd, sr = shared
            y = (_silu(flat @ sg.T) * (flat @ su.T)) @ sd.T
            out += y * _sigmoid(flat @ sr.T)
        return [out.reshape(shape).astype(a.dtype)]
