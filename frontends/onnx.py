"""ONNX as a conversion target: a standalone model with KV-cache inputs and outputs.

``write`` runs the KV-cache pipeline and the ONNX Runtime lowering into a folder (model.onnx,
model.onnx.data, the tokenizer, and ``kiln_io.json`` describing inputs and outputs).
``check_external_data`` validates an ONNX file's external-data references before anything
reads them: a location must be a plain relative path inside the model's folder, and every
(offset, length) must lie inside the referenced file.
"""
from __future__ import annotations

import json

from kiln.ir import ModelIR
from kiln.runtime.onnx_check import check_external_data  # noqa: F401  (re-exported for readers)


# what ``write`` puts in a folder: replacing one removes these and keeps the rest
OWNED = ("model.onnx", "model.onnx.data", "kiln_io.json", "tokenizer.json", "tokenizer_config.json")


def write(model: ModelIR, folder, *, progress=None) -> dict:
    from kiln.artifact import staging
    from kiln.passes.dce import dce
    from kiln.passes.kv_cache import insert_kv_cache
    from kiln.passes.moe import decompose as decompose_moe
    from kiln.passes_base import run_passes
    from kiln.targets import onnxrt
    # standard ONNX has no mixture-of-experts op: its primitives
    graph, _ = run_passes(model.graph, [("kv_cache", insert_kv_cache), ("moe", decompose_moe), ("dce", dce)])
    with staging(folder, owned=OWNED) as tmp:
        # the growing (concatenated) cache: a standalone model keeps no state between runs
        summary = onnxrt.lower(graph, tmp, progress=(lambda name: progress(name, 0)) if progress else None,
                               kv_layout="concat")
        if model.tokenizer is not None:
            model.tokenizer.save(tmp)
        inputs = {v.name: {"dtype": v.type.dtype, "shape": list(v.type.shape)} for v in graph.inputs}
        if summary.get("logits_positions"):
            # the lowering adds it: which positions' logits the model computes
            inputs[summary["logits_positions"]] = {
                "dtype": "int64", "shape": ["batch", "logits"],
                "meaning": "positions (0-based, within this run's input_ids) whose logits are computed"}
        io = {"inputs": inputs,
              "outputs": {v.name: {"dtype": v.type.dtype, "shape": list(v.type.shape)} for v in graph.outputs},
              "kv_cache": {"layout": "concat", "past": "past_key.N / past_value.N", "present": "present_key.N / present_value.N"},
              "config": model.config}
        (tmp / "kiln_io.json").write_text(json.dumps(io, indent=2) + "\n")
    return {"tensors": summary["initializers"], "bytes_in": sum(w.nbytes for w in model.weights.values()),
            "bytes_out": summary["data_bytes"]}
