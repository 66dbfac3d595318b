"""The artifact format: a folder ``NAME.kiln/`` with ``manifest.json`` and the backend's files.

Written into a staging folder beside the destination and renamed into place only when
complete (``kiln.atomic.staging``), so an interrupted build never leaves a half artifact under
the final name. The manifest lists every other file with its size and sha256 and carries its
own sha256 (``manifest_sha256``, computed with that value zeroed). Loading checks the listing
and every size (cheap: no file is read); ``check_hashes`` (``kiln verify``, ``runtime.load(...,
verify=True)``) also checks every byte. This module is imported by the runtime, so it stays
light: json, hashlib, os.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .atomic import staging  # noqa: F401  (writers stage artifacts through here)
from .errors import KilnError, load_json_object

FORMAT_VERSION = 2          # 2: the manifest carries its own sha256; every file has bytes and sha256
MANIFEST = "manifest.json"
SELF_HASH = "manifest_sha256"
_SELF_HASH_AT = b'"manifest_sha256": "'


def sha256_file(path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _self_hash(raw: bytes) -> str | None:
    """sha256 of the manifest's bytes with its own hash value zeroed; None if it has none."""
    i = raw.rfind(_SELF_HASH_AT)
    if i < 0:
        return None
    j = i + len(_SELF_HASH_AT)
    return hashlib.sha256(raw[:j] + b"0" * 64 + raw[j + 64:]).hexdigest()


def write_manifest(folder, manifest: dict) -> dict:
    """Complete ``manifest`` with the list of files and their hashes, then write it."""
    folder = Path(folder)
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[p.relative_to(folder).as_posix()] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    manifest = {"format_version": FORMAT_VERSION, **manifest, "files": files, SELF_HASH: "0" * 64}
    raw = (json.dumps(manifest, indent=2, default=_json_default) + "\n").encode("utf-8")
    manifest[SELF_HASH] = _self_hash(raw)
    at = raw.rfind(_SELF_HASH_AT) + len(_SELF_HASH_AT)     # the last key, so the last match
    (folder / MANIFEST).write_bytes(raw[:at] + manifest[SELF_HASH].encode() + raw[at + 64:])
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


class ArtifactError(KilnError):
    """A problem with an artifact, naming the offending file: a KilnError like any input's."""

    def __init__(self, path, message):
        super().__init__(path, message)


def _show(name) -> str:
    """A name from the manifest fit for a one-line message: quoted when odd, cut when long."""
    text = name if isinstance(name, str) else repr(name)
    if not text or not text.isprintable() or text != text.strip():
        text = repr(text)
    return text if len(text) <= 120 else text[:117] + "..."


def _at(folder: Path, rel: str) -> tuple[Path, str]:
    """Where an error about file ``rel`` points: the file itself, or, when its name would break
    the message's line, the folder, with the name quoted at the start of the message."""
    return (folder / rel, "") if _show(rel) == rel else (folder, f"file {_show(rel)} ")


def read_manifest(folder, *, check_hashes: bool = False) -> dict:
    """Read and check an artifact's manifest; raises ArtifactError naming the offending file.

    Always: the manifest's structure, every listed file present with its listed size, and no
    file present that is not listed. With ``check_hashes``: the manifest's own sha256 and every
    file's sha256 too. Nothing else of the artifact is read before these checks pass.
    """
    folder = Path(folder)
    mpath = folder / MANIFEST
    if not folder.is_dir():
        raise ArtifactError(folder, "not a kiln artifact (no such folder)")
    if not mpath.is_file():
        raise ArtifactError(folder, "not a kiln artifact (no manifest.json)")
    try:
        raw = mpath.read_bytes()
    except OSError as e:
        raise ArtifactError(mpath, f"unreadable manifest ({e.strerror or e})") from None
    manifest = load_json_object(mpath, unreadable="unreadable manifest", data=raw, error=ArtifactError,
                                not_object="the manifest is not a JSON object")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(mpath, f"artifact format version {_show(manifest.get('format_version'))} "
                            f"is not the one this kiln reads ({FORMAT_VERSION}); compile the model again")
    files = manifest.get("files", {})
    if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
        raise ArtifactError(mpath, "the manifest's 'files' is not an object of file entries")
    backend = manifest.get("backend")
    if not isinstance(backend, dict) or not isinstance(backend.get("name"), str):
        raise ArtifactError(mpath, "the manifest names no backend")
    # the files a backend runs from (onnxrt: model; tvm: library and weights) must be listed,
    # so their sizes are checked and a manifest cannot point outside the folder
    for key in ("model", "library", "weights"):
        if key in backend and (not isinstance(backend[key], str) or backend[key] not in files):
            raise ArtifactError(mpath, f"the backend's {key} {_show(backend[key])} is not a file listed in the manifest")
    if check_hashes:
        claimed = manifest.get(SELF_HASH)
        if not isinstance(claimed, str):
            raise ArtifactError(mpath, f"the manifest has no {SELF_HASH}")
        if _self_hash(raw) != claimed:
            raise ArtifactError(mpath, "does not match its own sha256 (the manifest was edited or damaged)")
    for rel, info in files.items():
        if not rel or Path(rel).is_absolute() or ".." in Path(rel).parts or "\\" in rel or "\0" in rel \
                or rel == MANIFEST:
            raise ArtifactError(mpath, f"the manifest lists {_show(rel)}, which is not a path inside the artifact")
        size = info.get("bytes")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size < 2**63 \
                or not isinstance(info.get("sha256"), str):
            raise ArtifactError(mpath, f"the manifest's entry for {_show(rel)} lacks its bytes or sha256")
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir()} - {MANIFEST}
    for rel in sorted(present - set(files)):
        where, what = _at(folder, rel)
        raise ArtifactError(where, f"{what}is not listed in the manifest (a file added to the artifact)")
    for rel, info in files.items():
        p = folder / rel
        try:
            if not p.is_file():
                raise ArtifactError(folder, f"file {_show(rel)} listed in the manifest is missing")
            size = p.stat().st_size
        except OSError as e:          # a name too long for the file system, say
            raise ArtifactError(mpath, f"the manifest lists {_show(rel)}, which cannot be read "
                                       f"({e.strerror or type(e).__name__})") from None
        if size != info["bytes"]:
            where, what = _at(folder, rel)
            raise ArtifactError(where, f"{what}has {size} bytes, the manifest says {info['bytes']} "
                                "(truncated, extended or replaced)")
    if check_hashes:
        for rel, info in files.items():
            if sha256_file(folder / rel) != info["sha256"]:
                where, what = _at(folder, rel)
                raise ArtifactError(where, f"{what}does not match its sha256 in the manifest "
                                    "(edited, damaged or swapped)")
    return manifest
