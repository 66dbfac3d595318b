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


def _sigmoid(a: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-a))).astype(a.dtype)


def _silu(a: np.ndarray) -> np.ndarray:
    return a * _sigmoid(a)


def routing(x: np.ndarray, router: np.ndarray, attrs: dict) -> tuple[np.ndarray, np.ndarray]:
    """Per token (rows of x [n, hidden]): the k chosen experts [n, k] and their weights [n, k]."""
    logits = x @ router.T
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


@op("MoE", {"top_k": REQUIRED, "normalize": 0, "scoring": "softmax", "activation": "silu"})
class MoE:
    """MoE(x [..., E], router [X, E], gate [X, F, E], up [X, F, E], down [X, E, F]
    [, shared_gate [S, E], shared_up [S, E], shared_down [E, S], shared_router [1, E]]) -> [..., E].

    Per token: scores = softmax (or sigmoid) of x·routerᵀ; the ``top_k`` best experts, their
    scores divided by their sum when ``normalize`` (transformers' ``norm_topk_prob``); the output
    is Σ score_e · down_e(silu(gate_e·x) ⊙ up_e·x). With the four shared inputs (qwen2_moe) a
    shared expert's MLP, times sigmoid(x·shared_routerᵀ), is added for every token.
    Decomposes to MatMul, Softmax/Sigmoid, TopK, Equal, Cast, ReduceSum and elementwise ops.
    """
    @staticmethod
    def infer(inputs, attrs):
        if len(inputs) not in (5, 9):
            raise ValueError(f"MoE takes 5 inputs (9 with a shared expert), not {len(inputs)}")
        if attrs["scoring"] not in SCORING:
            raise ValueError(f"MoE: scoring {attrs['scoring']!r} is not one of {', '.join(SCORING)}")
        if attrs["activation"] != "silu":
            raise ValueError(f"MoE: activation {attrs['activation']!r} is not supported (silu)")
        return [inputs[0].type]

    @staticmethod
    def compute(x, attrs):
        a, router, gate, up, down = x[:5]
        shape = a.shape
        flat = a.reshape(-1, shape[-1])
        idx, weights = routing(flat, router, attrs)
        out = np.zeros_like(flat)
        for e in np.unique(idx):
            rows, slot = np.nonzero(idx == e)
            h = flat[rows]
            y = (_silu(h @ gate[e].T) * (h @ up[e].T)) @ down[e].T
            out[rows] += y * weights[rows, slot][:, None]
        if len(x) == 9:
            sg, su, sd, sr = x[5:]
            shared = (_silu(flat @ sg.T) * (flat @ su.T)) @ sd.T
            out += shared * _sigmoid(flat @ sr.T)
        return [out.reshape(shape).astype(a.dtype)]
