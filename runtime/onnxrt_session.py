"""The ONNX Runtime session: runs an artifact's model.onnx with its KV cache.

Two cache layouts, named by the manifest (``backend.kv_cache.layout``):

* ``shared``: one buffer per layer for keys and one for values, ``[batch, kv_heads, capacity,
  head_dim]``, allocated once and updated in place by GroupQueryAttention (its past and
  present bound to the same memory through ORT's I/O binding). A decode step moves the new
  tokens in and the requested rows of logits out; nothing else is copied. Each row has its own
  cached length, so prompts of different lengths prefill as one right-padded batch
  (:meth:`OnnxRuntimeSession.prefill`). The capacity doubles when a sequence outgrows it (one
  copy, amortised), up to the artifact's ``max_length``.
* ``concat``: the growing layout (past in, past + new out), for graphs the shared layout cannot
  serve (learned positions, longrope's switch).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from kiln.artifact import ArtifactError

from . import manifest_numbers as numbers
from .backend_entry import OnnxrtEntry
from .heap import mapped_zeros
from .onnx_check import check_external_data
from .session import RowCache

#: First capacity of a shared cache, in tokens per row; it doubles as sequences grow.
INITIAL_CAPACITY = 256


def _providers(device: str | None, folder=None):
    import onnxruntime as ort
    available = ort.get_available_providers()
    if device in (None, "cpu"):
        return ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise ArtifactError(folder, "was compiled for cuda, and onnxruntime here has no CUDA provider "
                                        "(on a machine with an NVIDIA GPU: pip uninstall onnxruntime && "
                                        "pip install onnxruntime-gpu==1.31.1; or compile with --target cpu)")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxRuntimeSession(RowCache):
    """Implements kiln.runtime.session.RowSession over one ONNX model with a KV cache."""

    no_rows = "rows can join a running batch only with the shared KV-cache layout"
    no_ragged = "this artifact's KV cache grows by concatenation; prompts of one run must have the same length"

    def __init__(self, folder, manifest: dict, *, threads: int | None = None, device: str | None = None):
        import onnxruntime as ort
        self._ort = ort
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or os.cpu_count() or 1
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        entry = OnnxrtEntry.read(folder, manifest)
        model_path = Path(folder) / entry.model
        self.logits_name = entry.logits
        self.layout = entry.kv.layout
        check_external_data(model_path)
        try:
            self.sess = ort.InferenceSession(os.fspath(model_path), opts, providers=_providers(device or manifest.get("target", {}).get("device"), folder))
        except Exception as e:                 # ORT's own exception types are not RuntimeErrors
            if type(e).__module__.split(".")[0] != "onnxruntime":
                raise
            reason = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", str(e).strip()).splitlines()[0][:400]
            raise ArtifactError(model_path, f"ONNX Runtime cannot load the model: {reason}") from None
        self.output_names = [o.name for o in self.sess.get_outputs()]
        self.input_names = {i.name for i in self.sess.get_inputs()}
        # the cache's numbers must be the graph's own before a buffer is sized from them
        self.layers, self.kv_heads, self.head_dim = numbers.check_onnx_cache(
            folder, entry.kv.layers, entry.kv.kv_heads, entry.kv.head_dim, {i.name: i.shape for i in self.sess.get_inputs()})
        self.cache_names = [f"{k}.{i}" for i in range(self.layers) for k in ("key", "value")]
        config = manifest.get("config")
        config = config if isinstance(config, dict) else {}
        self.max_length = numbers.max_length(folder, None, config)
        self.vocab_size = config.get("vocab_size")    # ids a prompt may hold
        if self.layout == "shared":
            # positions past the rotary tables the artifact holds cannot be computed
            self.max_length = min(numbers.max_length(folder, entry.max_length, config) or numbers.MAX_LENGTH_CEILING,
                                  self.max_length or numbers.MAX_LENGTH_CEILING)
        # longrope models rotate with other frequencies past this length; as transformers does,
        # crossing it recomputes the cache so every cached key uses the long frequencies
        self.recompute_past = entry.recompute_cache_after if self.layout == "concat" else None
        self.past: dict[str, np.ndarray] = {}
        self.buffers: dict[str, object] = {}
        self._arrays: dict[str, np.ndarray] = {}
        self._rows: dict = {}
        self._io = None
        self.reset(1)

    # ---- the Session protocol -------------------------------------------------------------
    def reset(self, batch: int = 1) -> None:
        self._reset_rows(batch)
        if self.layout == "shared":
            if not self.buffers or self._buffer_batch != batch:
                self._allocate(batch, min(INITIAL_CAPACITY, self.max_length or INITIAL_CAPACITY))
            return
        empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=np.float32)
        self.past = {f"past_{name}": empty for name in self.cache_names}

    def forward(self, ids: np.ndarray, last_only: bool = False) -> np.ndarray:
        ids = self._checked_ids(ids)
        if self.batch > 1 and ids.shape[1] > 1 and self.length:
            # ORT's GroupQueryAttention takes several new tokens over a cache for one row only;
            # step through them, which computes the same thing
            steps = [self.forward(ids[:, i:i + 1]) for i in range(ids.shape[1])]
            return steps[-1] if last_only else np.concatenate(steps, axis=1)
        s = ids.shape[1]
        positions = np.full((self.batch, 1), s - 1) if last_only else np.tile(np.arange(s), (self.batch, 1))
        if self.layout == "shared":
            return self._run_shared(ids, self.lengths + s, positions)
        return self._run_concat(ids, last_only, positions)

    def _reorder_cache(self, index) -> None:
        if self.layout == "shared":
            n = int(self.lengths.max())
            # in place: the OrtValues bound to these arrays share their memory
            for name in self.cache_names:
                arr = self._arrays[name]
                arr[:, :, :n] = arr[index, :, :n]
        else:
            self.past = {name: value[index] for name, value in self.past.items()}

    def _truncate(self, length: int) -> None:
        if self.layout == "concat":        # the concat layout's past is exactly what it holds
            self.past = {name: value[:, :, :length] for name, value in self.past.items()}

    # ---- prompts of different lengths in one run (shared layout) ---------------------------
    @property
    def ragged_prefill(self) -> bool:
        return self.layout == "shared"

    def _prefill_padded(self, ids, lengths, positions) -> np.ndarray:
        return self._run_shared(ids, lengths, positions)

    # ---- rows that join and leave a running batch (shared layout) --------------------------
    def _extend_one(self, r: int, ids: list[int], cached: int, every: bool = False) -> np.ndarray:
        """ORT's GroupQueryAttention takes several new tokens over a cache for one row only, so
        they run as a batch of one whose cache buffers are row r's slice of the batch buffers
        (the OrtValues share the numpy arrays' memory: nothing is copied)."""
        row = self._row_session(r)
        row.lengths = np.asarray([cached], dtype=np.int64)
        logits = row.forward(np.asarray([ids], dtype=np.int64), last_only=not every)[0]
        return logits if every else logits[-1]

    def _step_all(self, ids: np.ndarray, before: np.ndarray) -> np.ndarray:
        return self._run_shared(ids, before + 1, np.zeros((self.batch, 1), dtype=np.int64))

    def _read_kv(self, r: int, start: int, stop: int) -> np.ndarray:
        return np.stack([self._arrays[name][r, :, start:stop] for name in self.cache_names])

    def _write_kv(self, r: int, start: int, kv: np.ndarray) -> None:
        # in place: the OrtValues bound to these arrays share their memory
        for name, part in zip(self.cache_names, kv):
            self._arrays[name][r, :, start:start + part.shape[1]] = part

    def _row_session(self, r: int):
        """A batch-1 session over row r's slice of the cache buffers, made again only when the
        buffers are (they are views: the batch buffers must outlive it)."""
        row = self._rows.get(r)
        if row is None:
            row = object.__new__(type(self))
            row.__dict__.update({k: v for k, v in self.__dict__.items()
                                 if k not in ("buffers", "_arrays", "_io", "_rows")})
            row._arrays = {name: arr[r:r + 1] for name, arr in self._arrays.items()}
            row.buffers = {name: self._ort.OrtValue.ortvalue_from_numpy(arr) for name, arr in row._arrays.items()}
            row.batch, row._buffer_batch, row._io, row._rows = 1, 1, None, {}
            self._rows[r] = row
        return row

    # ---- the two layouts ----------------------------------------------------------------
    def _feeds(self, ids, positions) -> dict:
        feeds = {"input_ids": ids}
        if "logits_positions" in self.input_names:
            feeds["logits_positions"] = np.ascontiguousarray(positions, dtype=np.int64)
        return feeds

    def _run_concat(self, ids, last_only, positions):
        if self.recompute_past:
            recomputed = self._recomputed_at_switch(ids, last_only)
            if recomputed is not None:
                return recomputed
        outs = self.sess.run(None, {**self._feeds(ids, positions), **self.past})
        results = dict(zip(self.output_names, outs))
        for name in self.past:
            self.past[name] = results["present" + name[4:]]
        self._set_lengths(self.lengths + ids.shape[1])
        logits = results[self.logits_name]
        if "logits_positions" in self.input_names:
            return logits
        return logits[:, -1:] if last_only else logits

    def _run_shared(self, ids, new_lengths, positions):
        """One run that leaves row b holding new_lengths[b] tokens; the new tokens of a row
        are written right after its cached ones (a prefill's padding lands past its end)."""
        total = int(max(new_lengths.max(), self.lengths.max() + ids.shape[1]))
        if self.max_length is not None and total > self.max_length:
            raise ValueError(f"the sequence would hold {total} tokens but this artifact holds at "
                             f"most {self.max_length}")
        if total > self.capacity:
            self._grow(total)
        io = self._binding()
        for name, arr in self._feeds(ids, positions).items():
            io.bind_cpu_input(name, arr)
        io.bind_cpu_input("seqlens_k", (new_lengths - 1).astype(np.int32))
        io.bind_cpu_input("total_sequence_length", np.asarray(total, dtype=np.int32))
        io.bind_output(self.logits_name)            # a fresh output: its shape changes per run
        self.sess.run_with_iobinding(io)
        logits = io.get_outputs()[0].numpy()
        self._set_lengths(new_lengths)
        return logits

    def _binding(self):
        """The I/O binding with the cache buffers bound, made again only when they change."""
        if self._io is None:
            io = self.sess.io_binding()
            io.bind_output(self.logits_name)            # first: get_outputs() keeps binding order
            for name in self.cache_names:
                io.bind_ortvalue_input(f"past_{name}", self.buffers[name])
                io.bind_ortvalue_output(f"present_{name}", self.buffers[name])
            self._io = io
        return self._io

    def _allocate(self, batch: int, capacity: int, keep: int = 0) -> None:
        """Fresh cache buffers of ``capacity`` positions holding the first ``keep`` of the old.

        Each buffer is its own memory map (``heap.mapped_zeros``), as the TVM session's are:
        positions not yet filled stay out of memory, and growing copies one buffer at a time
        and unmaps each old one once copied, so the old and new caches are never both whole and
        each new buffer takes the pages the previous old one gave back. On a VM whose host backs
        its memory lazily, a page never touched before costs ~20 us: copying a 2-row SmolLM2
        cache into a whole new one beside it (growing to 8,192 positions) took 1.5 s, a stall
        of every running stream."""
        shape = (batch, self.kv_heads, capacity, self.head_dim)
        old = self._arrays if keep else {}
        # the binding and the row views hold the old buffers: let them go first
        self.buffers, self._arrays, self._io, self._rows = {}, {}, None, {}
        fresh, arrays = {}, {}
        for name in self.cache_names:
            arr = mapped_zeros(shape, np.float32)
            if name in old:
                # the old array itself (its OrtValue shares it): OrtValue.numpy() would copy
                # every position of it first
                arr[:, :, :keep] = old.pop(name)[:, :, :keep]
            # on CPU the OrtValue shares the array's memory: writing one writes the other
            fresh[name] = self._ort.OrtValue.ortvalue_from_numpy(arr)
            arrays[name] = arr
        self.buffers, self.capacity, self._buffer_batch = fresh, capacity, batch
        self._arrays = arrays

    def _resize(self, capacity: int, keep: int) -> None:
        self._allocate(self.batch, capacity, keep=keep)
