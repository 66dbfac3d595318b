"""The MoE op: its numpy reference against a per-token loop written from the definition, and
its decomposition into primitives against the op, with and without a shared expert."""
import numpy as np
import pytest

from kiln.interp import run
from kiln.ir import Graph
from kiln.passes.moe import decompose
from kiln.verify import verify
from kiln.weights import Weight

X, E, F, S = 6, 8, 5, 7      # experts, hidden, expert MLP, shared MLP


def _weights(seed, shared):
    r = np.random.default_rng(seed)
    w = {"router": r.normal(size=(X, E)), "gate": r.normal(size=(X, F, E)), "up": r.normal(size=(X, F, E)),
         "down": r.normal(size=(X, E, F))}
    if shared:
        w.update({"sg": r.normal(size=(S, E)), "su": r.normal(size=(S, E)), "sd": r.normal(size=(E, S)),
                  "sr": r.normal(size=(1, E))})
    return {k: (v * 0.5).astype(np.float32) for k, v in w.items()}


def _graph(w, **attrs):
    g = Graph("moe")
    x = g.add_input("x", "float32", ("batch", "seq", E))
    ins = [x] + [g.add_weight(k, Weight.from_array(v, name=k)) for k, v in w.items()]
    g.outputs = g.add_node("MoE", ins, attrs, name="moe")
    return g


def _loop(x, w, k, normalize, scoring):
    """The definition, one token at a time."""
    def silu(a):
        return a / (1 + np.exp(-a))
    out = np.zeros_like(x, dtype=np.float64)
    for idx in np.ndindex(x.shape[:-1]):
        t = x[idx].astype(np.float64)
        logits = w["router"] @ t
        p = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum() if scoring == "softmax" \
            else 1 / (1 + np.exp(-logits))
        top = np.argsort(-p)[:k]
        c = p[top] / p[top].sum() if normalize else p[top]
        for e, ce in zip(top, c):
            out[idx] += ce * (w["down"][e] @ (silu(w["gate"][e] @ t) * (w["up"][e] @ t)))
        if "sg" in w:
            out[idx] += (w["sd"] @ (silu(w["sg"] @ t) * (w["su"] @ t))) / (1 + np.exp(-(w["sr"] @ t)[0]))
    return out


@pytest.mark.parametrize("shared,normalize,scoring", [(False, 1, "softmax"), (False, 0, "softmax"),
                                                      (True, 0, "softmax"), (False, 1, "sigmoid")])
def test_moe_matches_definition_and_decomposes(shared, normalize, scoring):
    w = _weights(1, shared)
    x = np.random.default_rng(2).normal(size=(2, 5, E)).astype(np.float32)
    g = _graph(w, top_k=2, normalize=normalize, scoring=scoring)
    verify(g)
    got = run(g, {"x": x})[g.outputs[0].name]
    np.testing.assert_allclose(got, _loop(x, w, 2, normalize, scoring), rtol=0, atol=2e-5)
    assert decompose(g).stats == {"decomposed": 1}
    verify(g)
    assert {n.op for n in g.nodes} >= {"TopK", "MatMul", "ReduceSum"} and "MoE" not in {n.op for n in g.nodes}
    np.testing.assert_allclose(run(g, {"x": x})[g.outputs[0].name], got, rtol=0, atol=2e-5)


def test_moe_refuses_unknown_scoring():
    with pytest.raises(ValueError, match="scoring 'relu'"):
        _graph(_weights(1, False), top_k=2, scoring="relu")


def test_gpt_oss_experts_with_biases_and_clamped_swiglu():
    """gpt-oss's experts (activation swiglu_oai, bias=1): a router with a bias, the top k logits
    softmaxed, every projection biased, the SwiGLU clamped at ``limit`` (gate above, up both
    ways) with up + 1; written per token as transformers' GptOssExperts computes it. Weights
    large enough that the clamps bite."""
    r = np.random.default_rng(7)
    w = {"router": r.normal(size=(X, E)), "gate": 3 * r.normal(size=(X, F, E)), "up": 3 * r.normal(size=(X, F, E)),
         "down": r.normal(size=(X, E, F)), "rb": r.normal(size=(X,)), "gb": r.normal(size=(X, F)),
         "ub": r.normal(size=(X, F)), "db": r.normal(size=(X, E))}
    w = {k: v.astype(np.float32) for k, v in w.items()}
    x = r.normal(size=(2, 5, E)).astype(np.float32)
    g = _graph(w, top_k=2, normalize=1, activation="swiglu_oai", bias=1, alpha=1.702, limit=4.0)
    verify(g)
    want = np.zeros_like(x, dtype=np.float64)
    clamped = 0
    for idx in np.ndindex(x.shape[:-1]):
        t = x[idx].astype(np.float64)
        logits = w["router"] @ t + w["rb"]
        top = np.argsort(-logits)[:2]
        c = np.exp(logits[top] - logits[top].max())
        for e, ce in zip(top, c / c.sum()):
            gate, up = w["gate"][e] @ t + w["gb"][e], w["up"][e] @ t + w["ub"][e]
            clamped += int((gate > 4).sum() + (np.abs(up) > 4).sum())
            gate, up = np.minimum(gate, 4.0), np.clip(up, -4.0, 4.0)
            want[idx] += ce * (w["down"][e] @ ((up + 1) * gate / (1 + np.exp(-1.702 * gate))) + w["db"][e])
    assert clamped > 10
    got = run(g, {"x": x})[g.outputs[0].name]
    np.testing.assert_allclose(got, want, rtol=0, atol=5e-5)
    assert decompose(g).stats == {"decomposed": 1}
    verify(g)
    np.testing.assert_allclose(run(g, {"x": x})[g.outputs[0].name], got, rtol=0, atol=5e-5)


def test_moe_refuses_unknown_activation_and_missing_biases():
    with pytest.raises(ValueError, match="activation 'gelu'"):
        _graph(_weights(1, False), top_k=2, activation="gelu")
    with pytest.raises(ValueError, match="MoE takes 9 inputs"):
        _graph(_weights(1, False), top_k=2, bias=1)
