"""The TVM session: runs an artifact's compiled library (``backend.name == "tvm"``).

The KV cache is one tensor per layer for keys and one for values, ``[batch, kv_heads,
capacity, head_dim]`` on the device, allocated once and updated in place by the library's
``kv_append`` kernel; a call moves the new tokens in and the requested rows of logits out.
Each row has its own cached length (``lengths``), so in the artifact's ``rows`` mode prompts
of different lengths prefill as one right-padded batch, and a row can join a running batch
by prefilling through a view of its own slice of the cache (no copy). ``uniform`` artifacts
(positions computed from the cache length, e.g. learned position embeddings) run rows of
equal length only.

Implements the same protocol as :class:`kiln.runtime.onnxrt_session.OnnxRuntimeSession`.
"""
from __future__ import annotations

import os
import platform
import re
import sys
from pathlib import Path

import numpy as np

from kiln.artifact import ArtifactError

from . import manifest_numbers as numbers
from .backend_entry import TVMEntry
from .cpu_features import missing
from .safetensors_index import read_index
from .session import RowCache
from .tvm_runtime import DEVICE_CODES, RuntimeMissing, TVMRuntime, import_full_tvm

#: the row counts at which the CPU matmul kernels sum a row alike (their GEMV's
#: ``CPU_GEMV_MAX_ROWS``; not imported: a CPU artifact runs without the tvm package)
BATCH_INVARIANT_ROWS = 8

INITIAL_CAPACITY = 256
PREFILL_CHUNK = 512


def open_library(folder: Path, library: Path, kind: str, cpu_features, cross: str | None,
                 threads: int | None):
    """What running an artifact's TVM library on this machine needs (its device kind, its CPU
    features, the machine it was cross-compiled for), checked before it is loaded; then the
    runtime and the library's VM."""
    if kind not in DEVICE_CODES:
        raise ArtifactError(folder / "manifest.json", f"names an unknown device {kind!r}")
    lacking = missing(cpu_features) if kind == "cpu" else []
    if lacking:
        raise ArtifactError(folder, f"was compiled for a CPU with {', '.join(lacking)}, which this one lacks "
                                    f"(compile it again here, or for --target cpu-avx2)")
    if cross and platform.machine().lower() not in (cross, "arm64" if cross == "aarch64" else cross):
        raise ArtifactError(folder, f"was cross-compiled for {cross}; run it on such a machine "
                                    f"(its library is objects that kiln links there)")
    # TVM's thread pool reads this when it starts; left unset, it ran SmolLM2's decode at
    # ~125 tokens/s on this 2-core machine, against ~230 with the cores named
    if threads:
        os.environ["TVM_NUM_THREADS"] = str(threads)
    else:
        os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))
    try:
        rt = TVMRuntime(kind)
    except RuntimeMissing:
        raise ArtifactError(folder, "was compiled with the TVM backend; running it needs Apache TVM "
                                    "(pip install 'kiln[tvm]')") from None
    if not rt.device_exists:
        raise ArtifactError(folder, f"was compiled for {kind}, and this machine has no {kind} device "
                                    f"(compile it again with --target cpu to run it here)")
    try:
        return rt, rt.load_vm(library)
    except Exception as e:           # TVM raises its own error types for a bad library
        raise ArtifactError(library, f"TVM cannot load the library: {str(e).strip().splitlines()[-1][:300]}") from None


class TVMSession(RowCache):
    """Implements kiln.runtime.session.RowSession over an artifact's compiled library."""

    join_chunk = PREFILL_CHUNK          # a joining prompt runs as forward's chunks do
    no_rows = "rows can join a running batch only in an artifact whose positions are per row"
    no_ragged = ("this artifact computes positions from one shared length; prompts of one run "
                 "must have the same length")

    def __init__(self, folder, manifest: dict, *, threads: int | None = None, device: str | None = None):
        folder = Path(folder)
        entry = TVMEntry.read(folder, manifest)
        try:
            kind = manifest["target"]["device"]
        except (KeyError, TypeError):
            raise ArtifactError(folder / "manifest.json", "the manifest names no target device") from None
        library, weights, names = folder / entry.library, folder / entry.weights, entry.params
        self.mode = entry.kv.layout
        self.kv_dtype = np.dtype(entry.kv.dtype)
        # the weights' header first: the cache's numbers and the positions are checked against
        # what the weights hold before the library is loaded or anything is allocated
        index = read_index(weights)
        self.layers, self.kv_heads, self.head_dim = numbers.check_weights_cache(folder, entry.kv.layers, entry.kv.kv_heads,
                                                                              entry.kv.head_dim, index)
        config = manifest.get("config")
        self.max_length = numbers.max_length(folder, entry.max_length, config if isinstance(config, dict) else {},
                                             table_rows=numbers.rotary_rows(index)) or numbers.MAX_LENGTH_CEILING
        self.rt, self.vm = open_library(folder, library, kind, entry.cpu_features, entry.cross_compiled_for,
                                        threads)
        self._prefill, self._decode = self.vm["prefill"], self.vm["decode"]
        # passed as one FFI array built once: a Python list would be converted on every call
        self.params = self.rt.array(self._load_params(weights, names, index))
        # longrope's switch (RowCache._recomputed_at_switch); only "uniform" artifacts have one
        self.recompute_past = entry.recompute_cache_after
        self.vocab_size = (config if isinstance(config, dict) else {}).get("vocab_size")    # ids a prompt may hold
        self.caches: list = []
        self._inputs: dict = {}
        self._pooled: set = set()
        # the caches, capacity, first row and rows of the last span stepped, and its views; the
        # caches object itself is held and compared (an id() could be reused once it is freed)
        self._views: tuple = (None, None, None, None, None)
        self.reset(1)
        self._check_against_library(library)

    def _check_against_library(self, library: Path) -> None:
        """One decode step over the empty cache: the library checks every argument's shape
        against its own (the cache's layers, heads and head size among them), so a manifest
        that disagrees with it is refused here, naming the manifest, rather than at a user's
        first token. Costs one decode step (SmolLM2: ~4 ms on an idle 2-core CPU)."""
        one = np.zeros((1, 1), dtype=np.int64)

        def step():
            self._run(np.zeros((self.batch, 1), dtype=np.int64), np.zeros(self.batch, dtype=np.int64),
                      np.repeat(one, self.batch, axis=0))
        try:
            try:
                step()
            except Exception as e:
                # TVM's library functions (relax.op.topk: the MoE router's top-k) live in the
                # compiler's library, not in the runtime-only one this session loaded to stay lean
                if "Cannot find function tvm.contrib." not in str(e) or "tvm" in sys.modules:
                    raise
                import_full_tvm()
                step()
        except Exception as e:          # TVM's argument checks raise its own error types
            text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            param = re.search(r"param=(\w+)", text)
            reason = text.split(" : ErrorContext")[0][:200] + (f" (argument {param.group(1)})" if param else "")
            raise ArtifactError(library.parent / "manifest.json", f"does not match its library {library.name}: "
                                f"{reason}") from None
        self.reset(self.batch)

    # ---- the Session protocol -------------------------------------------------------------
    def reset(self, batch: int = 1) -> None:
        if batch != self.batch or not self.caches:
            self.batch = batch
            self._allocate(min(INITIAL_CAPACITY, self.max_length))
        self._reset_rows(batch)

    def forward(self, ids: np.ndarray, last_only: bool = False) -> np.ndarray:
        ids = self._checked_ids(ids)
        if self.recompute_past:
            recomputed = self._recomputed_at_switch(ids, last_only)
            if recomputed is not None:
                return recomputed
        # a long prompt runs PREFILL_CHUNK tokens at a time (as llama.cpp's batches do), so the
        # VM's memory pool holds one chunk's activations, not the whole prompt's; not for
        # longrope, whose rotation depends on the length of the call
        chunk = ids.shape[1] if self.recompute_past else PREFILL_CHUNK
        outs = []
        for a in range(0, ids.shape[1], chunk):
            part = ids[:, a:a + chunk]
            s = part.shape[1]
            positions = np.full((self.batch, 1), s - 1) if last_only else np.tile(np.arange(s), (self.batch, 1))
            outs.append(self._run(part, self.lengths, positions))
        return outs[-1] if last_only or len(outs) == 1 else np.concatenate(outs, axis=1)

    @property
    def ragged_prefill(self) -> bool:
        return self.mode == "rows"

    def _prefill_padded(self, ids, lengths, positions) -> np.ndarray:
        return self._run(ids, self.lengths, positions)

    # ---- rows that join and leave a running batch -----------------------------------------
    def _extend_one(self, r: int, ids: list[int], cached: int, every: bool = False) -> np.ndarray:
        """Through a view of row r's cache slice (the other rows are not touched)."""
        n = len(ids)
        views = [self._row_view(c, r) for c in self.caches]
        positions = np.arange(n)[None] if every else np.asarray([[n - 1]])
        args = [self.rt.tensor(np.asarray([ids], dtype=np.int64)), self.rt.tensor(np.asarray([cached], np.int32)),
                self.rt.tensor(positions.astype(np.int64)), views, self.params]
        self._pool_for(n)
        logits = self.rt.numpy(self._prefill(*args))[0]
        return logits if every else logits[-1]

    def _step_all(self, ids: np.ndarray, before: np.ndarray) -> np.ndarray:
        return self._run(ids, before, np.zeros((self.batch, 1), dtype=np.int64))

    @property
    def steps_rows(self) -> bool:
        # the CPU kernels give a row the same sums at any row count up to 8 (quant_kernels'
        # GEMV; attention, norms and rotary are per row); the GPU ones are not checked
        return self.rt.kind == "cpu" and self.batch <= BATCH_INVARIANT_ROWS

    def _step_rows(self, ids: np.ndarray, before: np.ndarray, lo: int) -> np.ndarray:
        """Through views of rows lo.. of every cache, as a batch of len(ids) rows."""
        n, total = ids.shape[0], int(before.max()) + 1
        if total > self.max_length:
            raise ValueError(f"the sequence would hold {total} tokens but this artifact holds at most {self.max_length}")
        if total > self.capacity:
            self._grow(total)
        caches, capacity, first, rows, views = self._views
        if not (caches is self.caches and (capacity, first, rows) == (self.capacity, lo, n)):
            # one FFI array, kept: a list of 2 x layers views converted at every call cost
            # ~0.2 ms of a SmolLM2 step (6%)
            views = self.rt.array([self._rows_view(c, lo, n) for c in self.caches])
            self._views = (self.caches, self.capacity, lo, n, views)
        args = [self._staged("ids", ids), self._staged("lengths", before.astype(np.int32)),
                self._staged("positions", np.zeros((n, 1), dtype=np.int64)), views, self.params]
        return self.rt.host(self._decode(*args))

    def _read_kv(self, r: int, start: int, stop: int) -> np.ndarray:
        if self.rt.kind == "cpu":
            return np.stack([np.from_dlpack(c)[r, :, start:stop] for c in self.caches])
        return np.stack([[self.rt.numpy(self._span_view(c, r, h, start, stop)) for h in range(self.kv_heads)]
                         for c in self.caches])

    def _write_kv(self, r: int, start: int, kv: np.ndarray) -> None:
        stop = start + kv.shape[2]
        for c, part in zip(self.caches, kv):
            if self.rt.kind == "cpu":
                np.from_dlpack(c)[r, :, start:stop] = part
            else:
                for h in range(self.kv_heads):
                    self.rt.copy_in(self._span_view(c, r, h, start, stop), part[h])

    def _span_view(self, cache, r: int, h: int, start: int, stop: int):
        """Positions start..stop of head h of row r: contiguous in the [batch, kv_heads,
        capacity, head_dim] layout, so one view copies them to or from the host."""
        offset = ((r * self.kv_heads + h) * self.capacity + start) * self.head_dim * self.kv_dtype.itemsize
        return self.rt.view(cache, (stop - start, self.head_dim), offset)

    def _reorder_cache(self, index) -> None:
        if self.rt.kind == "cpu":
            n = int(self.lengths.max())
            fresh = []
            for c in self.caches:
                t = self.rt.mapped_zeros(tuple(c.shape), self.kv_dtype.name)
                np.from_dlpack(t)[:, :, :n] = np.from_dlpack(c)[index, :, :n]
                fresh.append(t)
            self.caches = self.rt.array(fresh)
        else:
            self.caches = self.rt.array([self.rt.tensor(self.rt.numpy(c)[index]) for c in self.caches])

    # ---- internals ------------------------------------------------------------------------
    def _load_params(self, weights: Path, names: list, index: dict) -> list:
        """The weights on the device, each read from the file straight into its tensor (on the
        CPU; elsewhere through one tensor-sized host buffer), so memory never holds a second
        copy of the file."""
        missing = [n for n in names if n not in index]
        if missing:
            raise ArtifactError(weights, f"lacks the weight {missing[0]!r} the library takes")
        try:
            with open(weights, "rb") as f:
                return [self.rt.read_into(f, index[n].start, index[n].nbytes, index[n].shape, index[n].dtype)
                        for n in names]
        except (OSError, EOFError) as e:
            raise ArtifactError(weights, f"cannot be read ({e})") from None

    def _run(self, ids, lengths, positions):
        s = ids.shape[1]
        total = int((lengths + s).max())
        if total > self.max_length:
            raise ValueError(f"the sequence would hold {total} tokens but this artifact holds at most {self.max_length}")
        if self.mode == "uniform" and len(set(lengths.tolist())) > 1:
            raise ValueError("this artifact runs rows of one length only")
        if total > self.capacity:
            self._grow(total)
        args = [self._staged("ids", ids), self._staged("lengths", lengths.astype(np.int32)),
                self._staged("positions", np.ascontiguousarray(positions, dtype=np.int64)), self.caches, self.params]
        if self.mode == "uniform":
            args.append(self.rt.shape([int(lengths[0])]))
        if s > 1:
            self._pool_for(ids.size)
        fn = self._decode if s == 1 else self._prefill
        logits = self.rt.host(fn(*args))
        self._set_lengths(lengths + s)
        return logits

    def _pool_for(self, tokens: int) -> None:
        """Before a prefill of ``tokens`` (rows x length): the VM's pooled allocator keeps one
        set of activation buffers per distinct size (SmolLM2: ~130 KB a token), so prompts of
        many lengths would pile them up. Once the sizes pooled since the last clearing add up
        to more than one PREFILL_CHUNK, the pool is emptied first. A repeated size reuses its
        buffers (emptying it every time cost 20% of prefill speed in page faults)."""
        if tokens in self._pooled:
            return
        if sum(self._pooled) + tokens > PREFILL_CHUNK:
            self.rt.release_pooled_memory()
            self._pooled.clear()
        self._pooled.add(tokens)

    def _staged(self, name: str, arr: np.ndarray):
        """A call's small input as a device tensor. On the CPU each input keeps one tensor that
        is refilled while its shape stays (every decode step): allocating three tensors per
        step cost ~80 us of a ~3.5 ms step, its memory cold after the weights streamed by."""
        if self.rt.kind != "cpu":
            return self.rt.tensor(arr)
        slot = self._inputs.get(name)
        if slot is None or slot[1].shape != arr.shape:
            t = self.rt.empty(arr.shape, arr.dtype.name)
            slot = self._inputs[name] = (t, np.from_dlpack(t))
        slot[1][...] = arr
        return slot[0]

    def _row_view(self, cache, r: int):
        return self._rows_view(cache, r, 1)

    def _rows_view(self, cache, lo: int, n: int):
        shape = (n, self.kv_heads, self.capacity, self.head_dim)
        row_bytes = self.kv_heads * self.capacity * self.head_dim * self.kv_dtype.itemsize
        return self.rt.view(cache, shape, lo * row_bytes)

    def _allocate(self, capacity: int, keep: int = 0) -> None:
        """Fresh cache tensors of ``capacity`` positions holding the first ``keep`` of the old.

        On the CPU each is an anonymous memory map: untouched positions stay out of the
        resident set until tokens fill them (SmolLM2 after 1,000 tokens: 49 MB of a 94 MB
        cache), and a freed layer goes straight back to the system (from the C heap, a grown
        cache left ~20 MB of old layers resident). Growing copies one layer at a time and lets
        each old layer go once copied, so the old and new caches are never both whole."""
        shape = (self.batch, self.kv_heads, capacity, self.head_dim)
        old = list(self.caches) if keep else []
        self.caches = []
        fresh = []
        for i in range(2 * self.layers):
            if self.rt.kind == "cpu":
                t = self.rt.mapped_zeros(shape, self.kv_dtype.name)
                if old:
                    np.from_dlpack(t)[:, :, :keep] = np.from_dlpack(old[i])[:, :, :keep]
            elif old:
                arr = np.zeros(shape, dtype=self.kv_dtype)
                arr[:, :, :keep] = self.rt.numpy(old[i])[:, :, :keep]
                t = self.rt.tensor(arr)
            else:
                t = self.rt.zeros(shape, self.kv_dtype.name)
            if old:
                old[i] = None
            fresh.append(t)
        self.caches, self.capacity = self.rt.array(fresh), capacity

    def _resize(self, capacity: int, keep: int) -> None:
        self._allocate(capacity, keep=keep)

