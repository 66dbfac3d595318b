"""ONNX as a conversion target: a standalone model with KV-cache inputs and outputs.

``write`` runs the KV-cache pipeline and the ONNX Runtime lowering into a folder (model.onnx,
model.onnx.data, the tokenizer, and ``kiln_io.json`` describing inputs and outputs).
``check_external_data`` validates an ONNX file's external-data references before anything
reads them: a location must be a plain relative path inside the model's folder, and every
(offset, length) must lie inside the referenced file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from kiln.errors import KilnError
from kiln.ir import ModelIR


def check_external_data(path) -> None:
    import onnx
    from onnx import TensorProto
    path = Path(path)
    try:
        model = onnx.load(os.fspath(path), load_external_data=False)
    except Exception as e:                         # protobuf raises its own DecodeError
        raise KilnError(path, f"not a readable ONNX model ({e.__class__.__name__})") from None
    folder = path.parent.resolve()
    sizes: dict[Path, int] = {}
    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                tensors.append(attr.t)
    for t in tensors:
        if t.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        p = Path(loc)
        if not loc or p.is_absolute() or ".." in p.parts or "\\" in loc or "\0" in loc:
            raise KilnError(path, f"initializer {t.name} points at external data {loc!r} outside the model folder")
        target = (folder / p).resolve()
        if folder not in target.parents:
            raise KilnError(path, f"initializer {t.name} points at external data {loc!r} outside the model folder")
        if not target.is_file():
            raise KilnError(path, f"initializer {t.name}: external data file {loc} is missing")
        size = sizes.setdefault(target, target.stat().st_size)
        try:
            offset, length = int(info.get("offset", 0)), int(info.get("length", -1))
        except ValueError:
            raise KilnError(path, f"initializer {t.name}: offset/length are not numbers") from None
        if offset < 0 or length < -1 or offset + max(length, 0) > size:
            raise KilnError(path, f"initializer {t.name}: bytes {offset}..{offset + length} lie outside {loc} ({size} bytes)")


def write(model: ModelIR, folder, *, progress=None) -> dict:
    from kiln.artifact import staging
    from kiln.passes.dce import dce
    from kiln.passes.kv_cache import insert_kv_cache
    from kiln.passes_base import run_passes
    from kiln.targets import onnxrt
    graph, _ = run_passes(model.graph, [("kv_cache", insert_kv_cache), ("dce", dce)])
    with staging(folder) as tmp:
        summary = onnxrt.lower(graph, tmp, progress=(lambda name: progress(name, 0)) if progress else None)
        if model.tokenizer is not None:
            model.tokenizer.save(tmp)
        io = {"inputs": {v.name: {"dtype": v.type.dtype, "shape": list(v.type.shape)} for v in graph.inputs},
              "outputs": {v.name: {"dtype": v.type.dtype, "shape": list(v.type.shape)} for v in graph.outputs},
              "kv_cache": {"layout": "concat", "past": "past_key.N / past_value.N", "present": "present_key.N / present_value.N"},
              "config": model.config}
        (tmp / "kiln_io.json").write_text(json.dumps(io, indent=2) + "\n")
    return {"tensors": summary["initializers"], "bytes_in": sum(w.nbytes for w in model.weights.values()),
            "bytes_out": summary["data_bytes"]}
