"""The artifact format: a folder ``NAME.kiln/`` with ``manifest.json`` and the backend's files.

Written into a staging folder beside the destination and renamed into place only when
complete (``kiln.atomic.staging``), so an interrupted build never leaves a half artifact under
the final name. This module is imported by the runtime, so it stays light: json, hashlib, os.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .atomic import staging  # noqa: F401  (writers stage artifacts through here)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def sha256_file(path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def write_manifest(folder, manifest: dict) -> dict:
    """Complete ``manifest`` with the list of files and their hashes, then write it."""
    folder = Path(folder)
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[p.relative_to(folder).as_posix()] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    manifest = {"format_version": FORMAT_VERSION, **manifest, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, default=_json_default) + "\n")
    return manifest


def _json_default(o):
    try:
        import numpy as np
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:
        pass
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


class ArtifactError(Exception):
    def __init__(self, path, message):
        self.path, self.message = os.fspath(path), message
        super().__init__(f"{self.path}: {message}")


def read_manifest(folder, *, check_hashes: bool = False) -> dict:
    folder = Path(folder)
    mpath = folder / MANIFEST
    if not folder.is_dir():
        raise ArtifactError(folder, "not a kiln artifact (no such folder)")
    if not mpath.is_file():
        raise ArtifactError(folder, "not a kiln artifact (no manifest.json)")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(mpath, f"unreadable manifest ({e})") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(mpath, "the manifest is not a JSON object")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(mpath, f"artifact format version {manifest.get('format_version')} "
                            f"is not the one this kiln reads ({FORMAT_VERSION})")
    files = manifest.get("files", {})
    if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
        raise ArtifactError(mpath, "the manifest's 'files' is not an object of file entries")
    backend = manifest.get("backend")
    if not isinstance(backend, dict) or not isinstance(backend.get("name"), str):
        raise ArtifactError(mpath, "the manifest names no backend")
    if "model" in backend and (not isinstance(backend["model"], str) or backend["model"] not in files):
        raise ArtifactError(mpath, f"the backend's model {backend['model']!r} is not a file listed in the manifest")
    for rel, info in files.items():
        if not rel or Path(rel).is_absolute() or ".." in Path(rel).parts or "\\" in rel or "\0" in rel:
            raise ArtifactError(mpath, f"the manifest lists {rel!r}, which is not a path inside the artifact")
        p = folder / rel
        if not p.is_file():
            raise ArtifactError(folder, f"file {rel} listed in the manifest is missing")
        if p.stat().st_size != info.get("bytes"):
            raise ArtifactError(folder, f"file {rel} has {p.stat().st_size} bytes, the manifest says {info.get('bytes')}")
        if check_hashes and sha256_file(p) != info.get("sha256"):
            raise ArtifactError(folder, f"file {rel} does not match its sha256 in the manifest")
    return manifest
