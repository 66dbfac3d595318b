"""ONNX as a conversion target: a standalone model with KV-cache inputs and outputs.

``write`` runs the KV-cache pipeline and the ONNX Runtime lowering into a folder (model.onnx,
model.onnx.data, config.json, the tokenizer, and ``kiln_io.json`` describing inputs and
outputs). The default I/O layout is optimum's decoder layout (``input_ids``, ``attention_mask``,
``position_ids``, ``past_key_values.N.key/value`` -> ``logits``, ``present.N.key/value``), so
tools made for optimum's exports run it; ``layout="kiln"`` keeps kiln's own names and its
``logits_positions`` input. ``check_external_data`` validates an ONNX file's external-data
references before anything reads them: a location must be a plain relative path inside the
model's folder, and every (offset, length) must lie inside the referenced file.
"""
from __future__ import annotations

import json

from kiln.errors import KilnError
from kiln.ir import ModelIR
from kiln.runtime.onnx_check import check_external_data  # noqa: F401  (re-exported for readers)

# what ``write`` puts in a folder: replacing one removes these and keeps the rest
OWNED = ("model.onnx", "model.onnx.data", "kiln_io.json", "config.json", "generation_config.json",
         "tokenizer.json", "tokenizer_config.json")
LAYOUTS = ("optimum", "kiln")
# --dtype -> the element type of the weight initializers (compute stays float32)
_STORE = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


def write(model: ModelIR, folder, *, dtype: str | None = None, layout: str = "optimum", progress=None) -> dict:
    from kiln.artifact import staging
    from kiln.passes.dce import dce
    from kiln.passes.kv_cache import insert_kv_cache
    from kiln.passes.moe import decompose as decompose_moe
    from kiln.passes.padded_batch import padded_batch
    from kiln.passes_base import run_passes
    from kiln.targets import onnxrt

    from . import onnx_layout
    from .packed_int4 import in_checkpoint_order
    dtype = dtype or "f32"
    if dtype not in _STORE:
        raise KilnError(folder, f"an ONNX export holds f32, f16 or bf16 weights, not {dtype}")
    if layout not in LAYOUTS:
        raise KilnError(folder, f"unknown ONNX layout {layout!r} (choose from {', '.join(LAYOUTS)})")
    # standard ONNX has no mixture-of-experts op: its primitives. optimum's layout takes a
    # left-padded batch: per-row positions and a padding mask
    passes = [("kv_cache", insert_kv_cache), *([("padded_batch", padded_batch)] if layout == "optimum" else []),
              ("moe", decompose_moe), ("dce", dce)]
    # the export's initializers are named by role and read back as such: checkpoint order
    graph, _ = run_passes(in_checkpoint_order(model), passes)
    onnx_layout.store_weights_as(graph, _STORE[dtype])
    with staging(folder, owned=OWNED) as tmp:
        # the growing (concatenated) cache: a standalone model keeps no state between runs
        summary = onnxrt.lower(graph, tmp, progress=(lambda name: progress(name, 0)) if progress else None,
                               kv_layout="concat")
        if model.tokenizer is not None:
            model.tokenizer.save(tmp)
        if layout == "optimum":
            io = onnx_layout.to_optimum(tmp / "model.onnx", graph, logits_positions=summary.get("logits_positions"))
        else:
            io = _kiln_io(graph, summary)
        io.update(layout=layout, weights_dtype=dtype, config=model.config)
        (tmp / "kiln_io.json").write_text(json.dumps(io, indent=2) + "\n")
        _write_hf_config(model, tmp, dtype)
    return {"tensors": summary["initializers"], "dtype": dtype, "layout": layout,
            "bytes_in": sum(w.nbytes for w in model.weights.values()), "bytes_out": summary["data_bytes"]}


def _kiln_io(graph, summary) -> dict:
    inputs = {v.name: {"dtype": v.type.dtype, "shape": list(v.type.shape)} for v in graph.inputs}
    if summary.get("logits_positions"):
        # the lowering adds it: which positions' logits the model computes
        inputs[summary["logits_positions"]] = {
            "dtype": "int64", "shape": ["batch", "logits"],
            "meaning": "positions (0-based, within this run's input_ids) whose logits are computed"}
    return {"inputs": inputs,
            "outputs": {v.name: {"dtype": v.type.dtype, "shape": list(v.type.shape)} for v in graph.outputs},
            "kv_cache": {"layout": "concat", "past": "past_key.N / past_value.N",
                         "present": "present_key.N / present_value.N"}}


def _write_hf_config(model: ModelIR, folder, dtype: str) -> None:
    """config.json and generation_config.json as optimum writes them beside its model.onnx, so
    tools that read the family and sizes from there work; kiln itself reads kiln_io.json's
    exact config. A model whose rotary scaling transformers cannot state gets none."""
    from . import arch as A
    from . import hf
    cfg = A.ArchConfig.from_dict(model.config)
    try:
        config = hf.hf_config(cfg, hf.hf_family(cfg, folder), dtype)
    except KilnError:
        return
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = dict(model.generation)
    if cfg.eos_token_ids:
        gen.setdefault("eos_token_id", cfg.eos_token_ids)
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
