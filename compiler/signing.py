"""Ed25519 signatures over an artifact's manifest (``kiln compile --sign``, ``kiln verify --key``,
``runtime.load(..., trusted_keys=)``).

The manifest lists every file of the artifact with its sha256, so one signature over the
manifest's bytes vouches for every byte of the artifact once the files are hashed against it.
The signature lives beside the manifest in ``manifest.sig`` (not listed in it: it signs it):
``{"algorithm": "ed25519", "key": "ed25519:<fingerprint>", "signature": "<base64>"}``; the
fingerprint is the first 16 hex digits of the sha256 of the raw 32-byte public key, which
names the key in messages.

Keys are the standard files OpenSSL writes (``openssl genpkey -algorithm ed25519 -out
kiln.key``; ``openssl pkey -in kiln.key -pubout -out kiln.pub``): an unencrypted PKCS#8 PEM
private key, and a PEM public key (an OpenSSH ``ssh-ed25519`` line is read too). The
cryptography package does the mathematics; it is imported only when a key is used, and
missing it is a one-line error naming the ``sign`` extra.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import os
from pathlib import Path

from .artifact import MANIFEST, SIGNATURE, ArtifactError, _inside
from .errors import KilnError, load_json_object

ALGORITHM = "ed25519"
KEYGEN_HINT = "openssl genpkey -algorithm ed25519 -out kiln.key && openssl pkey -in kiln.key -pubout -out kiln.pub"


def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise KilnError(None, "signatures need the cryptography package: pip install 'kiln[sign]'") from None
    return serialization, ed25519, InvalidSignature


def _key_bytes(source) -> tuple[str | None, bytes]:
    """(the file it came from or None, its bytes) for a key given as a path or as bytes."""
    if isinstance(source, bytes):
        return None, source
    path = os.fspath(source)
    try:
        with open(path, "rb") as f:
            return path, f.read(1 << 16)
    except OSError as e:
        raise KilnError(path, f"cannot read the key ({e.strerror or e})") from None


def load_private_key(source):
    """An Ed25519 private key from a PEM file (or its bytes); one-line KilnError otherwise."""
    serialization, ed25519, _ = _crypto()
    path, data = _key_bytes(source)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:                          # it wants a password
        raise KilnError(path, "is an encrypted private key; kiln signs with an unencrypted one") from None
    except Exception:                          # ValueError, and cryptography's UnsupportedAlgorithm
        key = None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise KilnError(path, f"is not an Ed25519 private key in PEM (make one with: {KEYGEN_HINT})")
    return key


def load_public_key(source):
    """An Ed25519 public key from a PEM or OpenSSH file (or its bytes)."""
    serialization, ed25519, _ = _crypto()
    path, data = _key_bytes(source)
    key = None
    for loader in (serialization.load_pem_public_key, serialization.load_ssh_public_key):
        try:
            key = loader(data.strip())
            break
        except Exception:                      # ValueError, UnsupportedAlgorithm: try the next form
            continue
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise KilnError(path, "is not an Ed25519 public key (PEM, as 'openssl pkey -pubout' writes, "
                              "or an OpenSSH ssh-ed25519 line)")
    return key


def fingerprint(public_key) -> str:
    serialization, _, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return f"{ALGORITHM}:{hashlib.sha256(raw).hexdigest()[:16]}"


def sign(folder, private_key) -> str:
    """Write ``manifest.sig`` for the manifest in ``folder``; returns the key's fingerprint."""
    folder = Path(folder)
    raw = (folder / MANIFEST).read_bytes()
    name = fingerprint(private_key.public_key())
    text = (f'{{"algorithm": "{ALGORITHM}", "key": "{name}", '
            f'"signature": "{base64.b64encode(private_key.sign(raw)).decode()}"}}\n')
    (folder / SIGNATURE).write_text(text)
    return name


def read_signature(folder) -> tuple[str, bytes] | None:
    """(the signing key's fingerprint, the signature) from ``manifest.sig``, None when unsigned."""
    path = Path(folder) / SIGNATURE
    if not path.exists() and not path.is_symlink():
        return None
    _inside(Path(folder), SIGNATURE)
    sig = load_json_object(path, unreadable="unreadable signature", not_object="the signature is not a JSON object",
                           error=ArtifactError)
    name, value = sig.get("key"), sig.get("signature")
    if sig.get("algorithm") != ALGORITHM or not isinstance(name, str) or not isinstance(value, str) \
            or not name.isprintable() or len(name) > 80:
        raise ArtifactError(path, f"is not an {ALGORITHM} signature kiln reads (algorithm, key, signature)")
    try:
        return name, base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ArtifactError(path, "holds a signature that is not base64") from None


def check_signature(folder, raw: bytes, trusted_keys) -> str:
    """The manifest's bytes ``raw`` carry a valid signature by one of ``trusted_keys`` (paths,
    PEM bytes or public key objects); returns that key's fingerprint, else ArtifactError."""
    _, ed25519, invalid = _crypto()
    keys = [k if isinstance(k, ed25519.Ed25519PublicKey) else load_public_key(k) for k in trusted_keys]
    folder = Path(folder)
    found = read_signature(folder)
    if found is None:
        raise ArtifactError(folder, f"is not signed (no {SIGNATURE}), and a signature by a trusted key is required")
    name, signature = found
    for key in keys:
        if fingerprint(key) != name:
            continue
        try:
            key.verify(signature, raw)
            return name
        except invalid:
            raise ArtifactError(folder / SIGNATURE, f"does not match manifest.json for key {name} "
                                "(the manifest was changed after signing, or the signature damaged)") from None
    trusted = ", ".join(fingerprint(k) for k in keys)
    raise ArtifactError(folder / SIGNATURE, f"is by key {name}, which is not a trusted key ({trusted})")


def trust_lines(folder, manifest: dict, keys) -> list[str]:
    """What ``kiln verify`` says about trust after the hashes: who signed the manifest, and
    that the artifact is code which runs in the process that loads it."""
    found = read_signature(folder)
    if found is None:
        signed = "not signed (kiln compile --sign KEYFILE signs an artifact)"
    elif keys:
        signed = f"signed by trusted key {found[0]}"
    else:
        signed = f"signed by key {found[0]}, not checked (give --key PUBFILE to check it)"
    backend = manifest["backend"]
    if backend.get("library"):
        code = f"native code ({backend['library']}) that runs with your rights as the artifact loads"
    else:
        code = (f"a compiled graph ({backend.get('model', 'model.onnx')}) that ONNX Runtime runs in the "
                "process that loads it")
    return [signed, f"note: holds {code}; load only artifacts from a source you trust"]
