"""The artifact format: a folder ``NAME.kiln/`` with ``manifest.json`` and the backend's files.

Written into a staging folder beside the destination and renamed into place only when
complete (``kiln.atomic.staging``), so an interrupted build never leaves a half artifact under
the final name. The manifest lists every other file with its size and sha256 and carries its
own sha256 (``manifest_sha256``, computed with that value zeroed). Every check keeps to the
folder: a listed file (or a folder above it) that is a link resolving outside it is refused.

An artifact holds code that runs in the loading process (a TVM library is native code), so
:func:`open_checked` -- what loading runs -- checks the listing, every size, and the sha256 of
every file but the bulk tensor data before a backend opens anything; the tensor data (the
weights, read only within the byte ranges their headers give) is hashed by ``kiln verify``,
``runtime.load(..., verify=True)`` and whenever a signature is required (``kiln.signing``).
This module is imported by the runtime, so it stays light: json, hashlib, os.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .atomic import staging  # noqa: F401  (writers stage artifacts through here)
from .errors import KilnError, load_json_object

FORMAT_VERSION = 2          # 2: the manifest carries its own sha256; every file has bytes and sha256
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"  # beside the manifest, unlisted: it signs the manifest's bytes (kiln.signing)
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

    Always: the manifest's structure, every listed file present with its listed size and
    inside the folder once links are followed, and no file present that is not listed. With
    ``check_hashes``: the manifest's own sha256 and every file's sha256 too. Nothing else of the
    artifact is read before these checks pass.
    """
    return _read_manifest(Path(folder), check_hashes)[0]


def open_checked(folder, *, verify: bool = False, trusted_keys=None) -> dict:
    """The manifest of an artifact about to be loaded, after every check that must come before
    a backend reads a byte of it: :func:`read_manifest`'s, then the sha256 of every file that
    is code or is parsed (the library, the ONNX graph, the tokenizer: small; SmolLM2's TVM
    library hashes in ~1 ms), so a swapped or damaged library is refused before it is loaded.
    With ``verify`` or ``trusted_keys`` every file is hashed, the weights too; with
    ``trusted_keys`` (public key files or PEM bytes) the manifest must also carry a signature
    by one of them."""
    folder = Path(folder)
    manifest, raw = _read_manifest(folder, False)
    if trusted_keys:            # before any hashing: a wrong key fails at once, not after the weights
        from .signing import check_signature
        check_signature(folder, raw, trusted_keys)
    files = manifest["files"]
    if verify or trusted_keys:
        _check_self_hash(folder / MANIFEST, manifest, raw)
    else:
        data = bulk_data(manifest)
        files = {rel: info for rel, info in files.items() if rel not in data}
    _check_sha256(folder, files)
    return manifest


def bulk_data(manifest: dict) -> set[str]:
    """The listed files that hold nothing but tensor bytes, which the backends read only within
    byte ranges checked against the file first (``safetensors_index``, ``onnx_check``): TVM's
    weights and the ONNX model's external data. Damage there gives wrong numbers, never a read
    outside the file or code run, so loading leaves hashing them to ``kiln verify``."""
    backend = manifest["backend"]
    names = {backend.get("weights")}
    if isinstance(backend.get("model"), str):
        names.add(backend["model"] + ".data")
    return names & set(manifest["files"])


def _check_self_hash(mpath: Path, manifest: dict, raw: bytes) -> None:
    claimed = manifest.get(SELF_HASH)
    if not isinstance(claimed, str):
        raise ArtifactError(mpath, f"the manifest has no {SELF_HASH}")
    if _self_hash(raw) != claimed:
        raise ArtifactError(mpath, "does not match its own sha256 (the manifest was edited or damaged)")


def _check_sha256(folder: Path, files: dict) -> None:
    for rel, info in files.items():
        try:
            digest = sha256_file(folder / rel)
        except OSError as e:
            where, what = _at(folder, rel)
            raise ArtifactError(where, f"{what}cannot be read ({e.strerror or e})") from None
        if digest != info["sha256"]:
            where, what = _at(folder, rel)
            raise ArtifactError(where, f"{what}does not match its sha256 in the manifest "
                                "(edited, damaged or swapped)")


def _read_manifest(folder: Path, check_hashes: bool) -> tuple[dict, bytes]:
    mpath = folder / MANIFEST
    if not folder.is_dir():
        raise ArtifactError(folder, "not a kiln artifact (no such folder)")
    if not mpath.is_file():
        raise ArtifactError(folder, "not a kiln artifact (no manifest.json)")
    _inside(folder, MANIFEST)
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
        _check_self_hash(mpath, manifest, raw)
    for rel, info in files.items():
        if not rel or Path(rel).is_absolute() or ".." in Path(rel).parts or "\\" in rel or "\0" in rel \
                or rel == MANIFEST:
            raise ArtifactError(mpath, f"the manifest lists {_show(rel)}, which is not a path inside the artifact")
        size = info.get("bytes")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size < 2**63 \
                or not isinstance(info.get("sha256"), str):
            raise ArtifactError(mpath, f"the manifest's entry for {_show(rel)} lacks its bytes or sha256")
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir()} - {MANIFEST, SIGNATURE}
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
        _inside(folder, rel)
    if check_hashes:
        _check_sha256(folder, files)
    return manifest, raw


def _inside(folder: Path, rel: str) -> None:
    """A listed file, once every link on its way is followed, is still in the artifact: a
    link out (to a library, weights or tokenizer elsewhere) would make the artifact's checks
    vouch for a file they do not cover."""
    root = folder.resolve()
    try:
        real = (folder / rel).resolve(strict=True)
    except (OSError, RuntimeError):          # a link loop
        real = None
    if real is None or root not in real.parents:
        where, what = _at(folder, rel)
        raise ArtifactError(where, f"{what}is a link that resolves outside the artifact folder "
                                   "(an artifact must hold its files itself)")
