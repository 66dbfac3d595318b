"""Targets: device presets and the lowerings (onnxrt, tvm)."""
