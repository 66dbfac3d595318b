"""kiln.runtime: load a compiled artifact and generate text with it.

Imports only what a deployment needs: the artifact reader, the backend session, tokenizers
and jinja2 for chat templates. No frontends, no onnx export code, no tvm compiler.
"""
from __future__ import annotations

from .params import SamplingParams

def load(path, *, threads: int | None = None, device: str | None = None, verify: bool = False,
         trusted_keys=None):
    """Load ``NAME.kiln`` and return a :class:`kiln.runtime.model.Model`.

    An artifact is code (a TVM artifact's library is native code that runs in this process):
    load only artifacts from a source you trust. Every file the manifest lists must be present
    with its listed size, inside the folder (no links out), and no other file may be there;
    every file but the weights must match its sha256 (the library among them, checked before
    it is loaded); ``verify=True`` hashes the weights too (reads the whole artifact once).

    ``trusted_keys``: Ed25519 public keys (files or PEM bytes); the artifact must then carry a
    signature of its manifest by one of them (``kiln compile --sign``), and every file is
    hashed. Left out, the keys are the files named in ``$KILN_TRUSTED_KEYS`` (separated by
    ``os.pathsep``) when it is set; ``[]`` requires none.

    A failed check raises ``kiln.artifact.ArtifactError`` naming the file, before the backend
    reads anything."""
    import os

    from .model import Model
    if trusted_keys is None and os.environ.get(TRUSTED_KEYS_ENV):
        trusted_keys = [k for k in os.environ[TRUSTED_KEYS_ENV].split(os.pathsep) if k]
    return Model(path, threads=threads, device=device, verify=verify, trusted_keys=trusted_keys)


#: Public key files an artifact must be signed by, for every load in this process (kiln run,
#: serve, bench, eval included).
TRUSTED_KEYS_ENV = "KILN_TRUSTED_KEYS"


__all__ = ["load", "SamplingParams"]
