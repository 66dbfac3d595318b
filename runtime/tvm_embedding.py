"""An embedding artifact built by the TVM backend: one entry point, ``main``, and its weights.

The library (``targets/tvm/build.py: build_plain``) takes the graph's inputs (``input_ids``,
``attention_mask`` and, for BERT's family, ``token_type_ids``) and the weights as one tuple,
and returns the vectors; there is no cache to keep between calls. The checks a decoder's TVM
session makes before loading (the device, the CPU's vector instructions, a cross-compiled
library) are made here too, each as one line naming the artifact.
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from kiln.artifact import ArtifactError

from .embedding import EmbeddingSession
from .safetensors_index import read_index
from .tvm_session import open_library


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
        index = read_index(weights)
        absent = [n for n in names if n not in index]
        if absent:
            raise ArtifactError(weights, f"lacks the weight {absent[0]!r} the library takes")
        self.rt, vm = open_library(folder, library, kind, needs, self.backend.get("cross_compiled_for"), threads)
        self._main = vm["main"]
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
