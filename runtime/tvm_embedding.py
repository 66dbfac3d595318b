"""An embedding artifact built by the TVM backend: one entry point, ``main``, and its weights.

The library (``targets/tvm/build.py: build_plain``) takes the graph's inputs (``input_ids``,
``attention_mask`` and, for BERT's family, ``token_type_ids``) and the weights as one tuple,
and returns the vectors; there is no cache to keep between calls. The checks a decoder's TVM
session makes before loading (the device, the CPU's vector instructions, a cross-compiled
library) are made here too, each as one line naming the artifact.
"""
from __future__ import annotations

import os
import platform
import threading
from pathlib import Path

import numpy as np

from kiln.artifact import ArtifactError

from .cpu_features import missing
from .embedding import EmbeddingSession
from .safetensors_index import read_index
from .tvm_runtime import DEVICE_CODES, RuntimeMissing, TVMRuntime


class TVMEmbedding(EmbeddingSession):
    def __init__(self, folder, manifest: dict, *, threads: int | None = None, device: str | None = None):
        super().__init__(folder, manifest)
        self._lock = threading.Lock()
        folder = Path(folder)
        try:
            kind = manifest["target"]["device"]
            library = folder / self.backend["library"]
            weights = folder / self.backend["weights"]
            names = [str(n) for n in self.backend["params"]]
            needs = [str(f) for f in self.backend.get("cpu_features", [])]
        except (KeyError, TypeError) as e:
            raise ArtifactError(folder / "manifest.json", f"the manifest's tvm backend entry has no usable "
                                                          f"{e.args[0]!r}") from None
        if kind not in DEVICE_CODES:
            raise ArtifactError(folder / "manifest.json", f"names an unknown device {kind!r}")
        lacking = missing(needs) if kind == "cpu" else []
        if lacking:
            raise ArtifactError(folder, f"was compiled for a CPU with {', '.join(lacking)}, which this one lacks "
                                        f"(compile it again here, or for --target cpu-avx2)")
        cross = self.backend.get("cross_compiled_for")
        if cross and platform.machine().lower() not in (cross, "arm64" if cross == "aarch64" else cross):
            raise ArtifactError(folder, f"was cross-compiled for {cross}; run it on such a machine")
        os.environ["TVM_NUM_THREADS"] = str(threads) if threads else os.environ.get("TVM_NUM_THREADS",
                                                                                  str(os.cpu_count() or 1))
        index = read_index(weights)
        absent = [n for n in names if n not in index]
        if absent:
            raise ArtifactError(weights, f"lacks the weight {absent[0]!r} the library takes")
        try:
            self.rt = TVMRuntime(kind)
        except RuntimeMissing:
            raise ArtifactError(folder, "was compiled with the TVM backend; running it needs Apache TVM "
                                        "(pip install 'kiln[tvm]')") from None
        if not self.rt.device_exists:
            raise ArtifactError(folder, f"was compiled for {kind}, and this machine has no {kind} device")
        try:
            self._main = self.rt.load_vm(library)["main"]
        except Exception as e:           # TVM raises its own error types for a bad library
            raise ArtifactError(library, f"TVM cannot load the library: {str(e).strip().splitlines()[-1][:300]}") from None
        try:
            with open(weights, "rb") as f:
                self.params = self.rt.array([self.rt.read_into(f, index[n].start, index[n].nbytes, index[n].shape,
                                                               index[n].dtype) for n in names])
        except (OSError, EOFError) as e:
            raise ArtifactError(weights, f"cannot be read ({e})") from None

    def _compute(self, feeds: dict) -> np.ndarray:
        order = ["input_ids", "attention_mask"] + (["token_type_ids"] if self.token_types else [])
        with self._lock:            # one VM, not safe to call from the server's threads at once
            out = self._main(*[self.rt.tensor(feeds[k]) for k in order], self.params)
            return self.rt.numpy(out[0])
