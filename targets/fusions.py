"""What each backend runs as one op: the passes that make those ops ask here (through
``compiler/driver.py: pipeline``) rather than import a backend's own tables.

Light on purpose: reading a backend's table imports its layout module (numpy and kiln's
formats), never onnx or TVM.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Fusions:
    #: block formats a QuantMatMul may read as they are (the rest stay float products)
    quant_matmul: frozenset
    #: the head sizes its Attention kernel takes are multiples of this
    attention_head_multiple: int
    #: whether it lowers the MoE op itself (else the op is decomposed into dense primitives)
    moe: bool


def of(backend: str) -> Fusions:
    if backend == "onnxrt":
        from .onnxrt.quant import REPACK
        # ORT's 4-bit MatMulNBits is exact and fast at accuracy level 0; its 8-bit kernel is only
        # fast with int8 activations (accuracy level 4, ~0.6% error), so 8-bit operands (Q8_0,
        # Q5_0, Q5_1) run as two exact 4-bit planes (quant.py). GroupQueryAttention needs head
        # sizes in multiples of 8; ORT has no MoE kernel kiln
        # uses, so every expert runs densely weighted (TVM reads only the chosen experts)
        return Fusions(frozenset(REPACK), attention_head_multiple=8, moe=False)
    if backend == "tvm":
        from .tvm.quant_layout import SUPPORTED
        return Fusions(SUPPORTED, attention_head_multiple=1, moe=True)
    raise ValueError(f"unknown backend {backend!r}")
