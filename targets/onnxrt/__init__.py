"""The ONNX Runtime backend: IR -> ONNX (standard and com.microsoft contrib ops) with the
weights as external data.

``lower.py`` writes model.onnx node by node, ``quant.py`` turns GGUF blocks into MatMulNBits /
GatherBlockQuantized operands; the KV-cache plan both backends share is
:mod:`kiln.targets.kv_plan`. ``kiln.runtime.onnxrt_session`` runs the result.
"""
from .lower import IR_VERSION, OPSET, PRECISIONS, lower

__all__ = ["lower", "OPSET", "IR_VERSION", "PRECISIONS"]
