"""kiln.runtime: load a compiled artifact and generate text with it.

Imports only what a deployment needs: the artifact reader, the backend session, tokenizers
and jinja2 for chat templates. No frontends, no onnx export code, no tvm compiler.
"""
from __future__ import annotations


def load(path, *, threads: int | None = None, device: str | None = None, verify: bool = False):
    """Load ``NAME.kiln`` and return a :class:`kiln.runtime.model.Model`.

    Every file the manifest lists must be present with its listed size, and no other file may
    be there; ``verify=True`` also checks every file's sha256 (reads the whole artifact once).
    A failed check raises ``kiln.artifact.ArtifactError`` naming the file, before the backend
    reads anything."""
    from .model import Model
    return Model(path, threads=threads, device=device, verify=verify)


__all__ = ["load"]
