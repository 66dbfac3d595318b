"""The ONNX Runtime session: runs an artifact's model.onnx with a growing KV cache."""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from kiln.artifact import ArtifactError

from .onnx_check import check_external_data


def _providers(device: str | None):
    import onnxruntime as ort
    available = ort.get_available_providers()
    if device in (None, "cpu"):
        return ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise RuntimeError("this artifact wants CUDA, but onnxruntime here has no CUDA provider")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxRuntimeSession:
    """Implements kiln.runtime.generation.Session over one ONNX model with past/present KV."""

    def __init__(self, folder, manifest: dict, *, threads: int | None = None, device: str | None = None):
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or os.cpu_count() or 1
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        backend = manifest["backend"]
        try:
            model_path = Path(folder) / backend["model"]
            self.logits_name = backend["logits"]
            kv = backend["kv_cache"]
            self.layers, self.kv_heads, self.head_dim = int(kv["layers"]), int(kv["kv_heads"]), int(kv["head_dim"])
        except (KeyError, TypeError, ValueError) as e:
            what = f"has no {e.args[0]!r}" if isinstance(e, KeyError) else f"has a bad value ({e})"
            raise ArtifactError(Path(folder) / "manifest.json", f"the manifest's onnxrt backend entry {what}") from None
        check_external_data(model_path)
        try:
            self.sess = ort.InferenceSession(os.fspath(model_path), opts, providers=_providers(device))
        except Exception as e:                 # ORT's own exception types are not RuntimeErrors
            if type(e).__module__.split(".")[0] != "onnxruntime":
                raise
            reason = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", str(e).strip()).splitlines()[0][:400]
            raise ArtifactError(model_path, f"ONNX Runtime cannot load the model: {reason}") from None
        self.output_names = [o.name for o in self.sess.get_outputs()]
        self.max_length = manifest.get("config", {}).get("max_position_embeddings")
        # longrope models rotate with other frequencies past this length; as transformers does,
        # crossing it recomputes the cache so every cached key uses the long frequencies
        self.recompute_past = backend.get("recompute_cache_after")
        self.history: np.ndarray | None = None
        self.past: dict[str, np.ndarray] = {}
        self.length = 0
        self.reset(1)

    def reset(self, batch: int = 1) -> None:
        empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=np.float32)
        self.past = {f"past_{k}.{i}": empty for i in range(self.layers) for k in ("key", "value")}
        self.batch = batch
        self.length = 0
        self.history = np.zeros((batch, 0), dtype=np.int64) if self.recompute_past else None

    def forward(self, ids: np.ndarray, last_only: bool = False) -> np.ndarray:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[0] != self.batch:
            raise ValueError(f"ids must be [batch={self.batch}, seq], got {list(ids.shape)}")
        if self.batch > 1 and ids.shape[1] > 1 and self.length:
            # ORT's GroupQueryAttention takes several new tokens over a cache for one row only;
            # step through them, which computes the same thing
            steps = [self.forward(ids[:, i:i + 1]) for i in range(ids.shape[1])]
            return steps[-1] if last_only else np.concatenate(steps, axis=1)
        if self.recompute_past:
            seen = np.concatenate([self.history, ids], axis=1)
            if self.length and self.length <= self.recompute_past < seen.shape[1]:
                n = ids.shape[1]
                self.reset(self.batch)
                logits = self.forward(seen, last_only)
                return logits if last_only else logits[:, -n:]
            self.history = seen
        outs = self.sess.run(None, {"input_ids": ids, **self.past})
        results = dict(zip(self.output_names, outs))
        for name in self.past:
            self.past[name] = results["present" + name[4:]]
        self.length += ids.shape[1]
        logits = results[self.logits_name]
        return logits[:, -1:] if last_only else logits
