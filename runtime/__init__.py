"""kiln.runtime: load a compiled artifact and generate text with it.

Imports only what a deployment needs: the artifact reader, the backend session, tokenizers
and jinja2 for chat templates. No frontends, no onnx export code, no tvm compiler.
"""
from __future__ import annotations


def load(path, *, threads: int | None = None, device: str | None = None):
    """Load ``NAME.kiln`` and return a :class:`kiln.runtime.model.Model`."""
    from .model import Model
    return Model(path, threads=threads, device=device)


__all__ = ["load"]
