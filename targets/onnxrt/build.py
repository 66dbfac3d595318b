"""Write the ONNX Runtime artifact's files and describe them: the backend's manifest entry."""
from __future__ import annotations

from kiln.frontends.arch import ArchConfig, rope_switch_length
from kiln.runtime.backend_entry import KVCache, OnnxrtEntry

from .lower import lower

#: what running the artifact needs; CUDA through ONNX Runtime needs the onnxruntime-gpu wheel
#: in place of onnxruntime
REQUIRES = {"cpu": ["onnxruntime==1.31.1"], "cuda": ["onnxruntime-gpu==1.31.1"]}


def build(graph, out_dir, preset, config: dict, *, progress=None, kv_layout: str = "auto",
          precision: str = "exact") -> OnnxrtEntry:
    """model.onnx and its data into ``out_dir`` (:func:`.lower.lower`), and the entry naming them."""
    summary = lower(graph, out_dir, progress=progress, kv_layout=kv_layout,
                    max_length=config.get("max_position_embeddings"), precision=precision)
    kv = KVCache(graph.meta.get("kv_cache", {}).get("layers", 0), config["num_kv_heads"], config["head_dim"],
                 summary.pop("kv_layout"))
    return OnnxrtEntry(model="model.onnx", logits=graph.outputs[0].name, inputs=[v.name for v in graph.inputs],
                       outputs=[v.name for v in graph.outputs], kv=kv,
                       requires=list(REQUIRES["cuda" if preset.device == "cuda" else "cpu"]),
                       recompute_cache_after=rope_switch_length(ArchConfig.from_dict(config)),
                       max_length=summary.pop("max_length", None), details=summary)
