"""sentence-transformers' Pooling and Normalize modules as graph ops after the hidden states.

Everything is computed in the graph, so an artifact maps token ids and an attention mask to
the final vectors on any backend, and the mask makes padded batches give each row the vector
it gets alone. The modes follow sentence-transformers' definitions exactly:

* ``cls``: the first token's state;
* ``max``: per feature, the largest over the unmasked tokens (masked ones count as -1e9);
* ``mean``: the sum over unmasked tokens over their count (clamped to at least 1e-9);
* ``mean_sqrt_len``: the same sum over the square root of that count;
* ``last``: the last unmasked token's state (a decoder's summary of the whole text), found as
  the largest position the mask keeps, then taken by a one-hot product, which is exact.

Several modes are concatenated in that order; Normalize divides by ``max(||x||_2, 1e-12)``,
as ``torch.nn.functional.normalize`` does.
"""
from __future__ import annotations

import numpy as np

from kiln.ir import Graph

from .builder import _Emit

ORDER = ("cls", "max", "mean", "mean_sqrt_len", "last")
OUTPUT = "embeddings"


def add_pooling(g: Graph, modes: list, normalize: bool) -> None:
    """Replace the graph's output (hidden states [batch, seq, hidden]) by the pooled vectors
    [batch, hidden * len(modes)], taking an ``attention_mask`` input (added if missing)."""
    e = _Emit(g)
    e.scope = "pooling."
    h = g.outputs[0]
    mask = next((v for v in g.inputs if v.name == "attention_mask"), None)
    if mask is None:
        mask = g.add_input("attention_mask", "int64", tuple(h.type.shape[:2]))
    m = e.Unsqueeze(e.Cast(mask, to="float32", name="mask_f"), axes=[2], name="mask_3d")       # [b, s, 1]
    parts = []
    for mode in sorted(modes, key=ORDER.index):
        if mode == "cls":
            parts.append(e.Gather(h, e.i64(0), axis=1, name="cls"))
        elif mode == "max":
            kept = e.Where(e.Cast(m, to="bool", name="keep"), h, e.c(np.float32(-1e9)), name="masked")
            parts.append(e.ReduceMax(kept, axes=[1], keepdims=0, name="max"))
        elif mode in ("mean", "mean_sqrt_len"):
            total = e.ReduceSum(e.Mul(h, m, name="kept"), axes=[1], keepdims=0, name="sum")
            count = e.Max(e.ReduceSum(m, axes=[1], keepdims=0, name="count"), e.c(np.float32(1e-9)),
                          name="count_clamped")
            if mode == "mean_sqrt_len":
                count = e.Sqrt(count, name="sqrt_count")
            parts.append(e.Div(total, count, name=mode))
        elif mode == "last":
            seq = e.Gather(e.Shape(mask, name="mask_shape"), e.i64(1), name="seq_len")
            pos = e.Range(e.i64(0), seq, e.i64(1), name="positions")                          # [s]
            last = e.ReduceMax(e.Mul(mask, pos, name="kept_positions"), axes=[1], keepdims=1,
                               name="last_position")                                          # [b, 1]
            pick = e.Cast(e.Equal(pos, last, name="is_last"), to="float32", name="one_hot")   # [b, s]
            pick = e.Unsqueeze(pick, axes=[2], name="one_hot_3d")
            parts.append(e.ReduceSum(e.Mul(h, pick, name="last_only"), axes=[1], keepdims=0, name="last"))
        else:
            raise ValueError(f"pooling mode {mode!r} is not one of {', '.join(ORDER)}")
    x = parts[0] if len(parts) == 1 else e.Concat(*parts, axis=-1, name="concat")
    if normalize:
        norm = e.Sqrt(e.ReduceSum(e.Mul(x, x, name="sq"), axes=[-1], keepdims=1, name="sum_sq"), name="l2")
        x = e.Div(x, e.Max(norm, e.c(np.float32(1e-12)), name="l2_clamped"), name="normalized")
    x.name = g.fresh_name(OUTPUT)
    g.outputs = [x]
