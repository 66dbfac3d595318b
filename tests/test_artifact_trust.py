"""Artifact trust: an artifact is code, so what loading runs is checked before it runs.

* The library (and every file that is code or parsed: the ONNX graph, the tokenizer) is
  hashed against the manifest before it is loaded: a library swapped for one whose
  constructor writes a marker file never runs; one half zeroed in place is a one-line error,
  not SIGSEGV. The weights are left to ``kiln verify`` (they are read within checked ranges).
* No link out of the folder is followed, by either backend or by ``kiln verify``.
* The manifest's cache numbers are checked against what the files hold before anything is
  allocated.

One artifact per backend for the module (TVM builds take 10-30 s), copied per test.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import HF_FIXTURES

from kiln import runtime
from kiln.artifact import ArtifactError, read_manifest, sha256_file

EVIL_C = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void evil(void) {
    const char *p = getenv("KILN_TEST_MARKER");
    FILE *f = p ? fopen(p, "w") : NULL;
    if (f) { fputs("the library ran", f); fclose(f); }
}
"""


def source_with_tokenizer(root: Path) -> Path:
    """The tiny llama with a byte-level tokenizer, so artifacts have a tokenizer/ folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    src = root / "llama"
    shutil.copytree(HF_FIXTURES / "llama", src, ignore=shutil.ignore_patterns("reference.npz"))
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps({"eos_token": alphabet[2], "bos_token": alphabet[1]}))
    return src


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    import kiln
    root = tmp_path_factory.mktemp("trust")
    src = source_with_tokenizer(root)
    return {"onnxrt": kiln.compile(src, output=root / "ort.kiln", backend="onnxrt"),
            "tvm": kiln.compile(src, output=root / "tvm.kiln", backend="tvm")}


def copy_of(built, backend: str, tmp_path: Path) -> Path:
    d = tmp_path / f"{backend}.kiln"
    shutil.copytree(built[backend], d)
    return d


def kiln_cli(*args, env=None) -> subprocess.CompletedProcess:
    """The kiln command in a child process: a library that runs, or crashes, does so there."""
    return subprocess.run([sys.executable, "-m", "kiln.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def one_line(p: subprocess.CompletedProcess, *needles) -> str:
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("kiln: "), p.stderr
    for n in needles:
        assert str(n) in lines[0], lines[0]
    return lines[0]


def rewrite(folder: Path, edit) -> None:
    """Edit the manifest as JSON (loading does not check the manifest's own sha256)."""
    m = json.loads((folder / "manifest.json").read_text())
    edit(m)
    (folder / "manifest.json").write_text(json.dumps(m, indent=2))


def rehash(folder: Path) -> None:
    """Make the manifest agree with the files again, as a forger would (its own sha256 too)."""
    from kiln import artifact
    m = json.loads((folder / "manifest.json").read_text())
    for rel, info in m["files"].items():
        info.update(bytes=(folder / rel).stat().st_size, sha256=sha256_file(folder / rel))
    m.pop(artifact.SELF_HASH)
    artifact.write_manifest(folder, {k: v for k, v in m.items() if k not in ("files", "format_version")})


@pytest.fixture(scope="module")
def evil_library(tmp_path_factory, built) -> Path:
    """A shared library whose constructor writes $KILN_TEST_MARKER, padded with zeros to the
    size of the TVM artifact's library (so only the sha256 can tell them apart)."""
    root = tmp_path_factory.mktemp("evil")
    (root / "evil.c").write_text(EVIL_C)
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(root / "evil.so"), str(root / "evil.c")], check=True)
    size = (built["tvm"] / "model.so").stat().st_size
    data = (root / "evil.so").read_bytes()
    assert len(data) < size
    (root / "evil.so").write_bytes(data + bytes(size - len(data)))
    return root / "evil.so"


# ---- 1. the library is hashed before it is loaded ------------------------------------------

def test_the_evil_library_runs_its_constructor_when_loaded(evil_library, tmp_path):
    # the control: dlopen alone runs it, so the test below would see a marker if kiln loaded it
    marker = tmp_path / "ran"
    code = f"import ctypes; ctypes.CDLL({str(evil_library)!r})"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "KILN_TEST_MARKER": str(marker)})
    assert marker.read_text() == "the library ran"


def test_swapped_library_is_refused_before_it_runs(built, evil_library, tmp_path):
    d = copy_of(built, "tvm", tmp_path)
    shutil.copyfile(evil_library, d / "model.so")
    read_manifest(d)                                    # the listing and the sizes agree
    marker = tmp_path / "ran"
    for args in (["run", d, "--ids", "1,2", "-n", "1"], ["verify", d]):
        p = kiln_cli(*args, env={"KILN_TEST_MARKER": str(marker)})
        one_line(p, d / "model.so", "does not match its sha256")
        assert not marker.exists(), "the swapped library's constructor ran"


def test_half_zeroed_library_is_a_one_line_error(built, tmp_path):
    d = copy_of(built, "tvm", tmp_path)
    lib = d / "model.so"
    data = bytearray(lib.read_bytes())
    data[len(data) // 2:] = bytes(len(data) - len(data) // 2)
    lib.write_bytes(bytes(data))
    one_line(kiln_cli("run", d, "--ids", "1,2", "-n", "1"), lib, "does not match its sha256")


@pytest.mark.parametrize("backend,rel", [("onnxrt", "model.onnx"), ("onnxrt", "tokenizer/tokenizer.json"),
                                         ("tvm", "tokenizer/tokenizer_config.json")])
def test_parsed_files_are_hashed_at_load(built, tmp_path, backend, rel):
    d = copy_of(built, backend, tmp_path)
    data = bytearray((d / rel).read_bytes())
    data[len(data) // 2] ^= 1
    (d / rel).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match its sha256") as e:
        runtime.load(d)
    assert e.value.path == str(d / rel)


@pytest.mark.parametrize("backend,rel", [("onnxrt", "model.onnx.data"), ("tvm", "weights.safetensors")])
def test_weights_are_left_to_verify(built, tmp_path, backend, rel):
    """The weights hold tensor bytes only, read within ranges checked against the file: a
    damaged weight gives other numbers, so a plain load leaves them unhashed; verify=True and
    kiln verify hash them."""
    d = copy_of(built, backend, tmp_path)
    p = d / rel
    data = bytearray(p.read_bytes())
    data[-5] ^= 0x40
    p.write_bytes(bytes(data))
    runtime.load(d).generate([1, 2], max_new_tokens=1)
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        runtime.load(d, verify=True)
    one_line(kiln_cli("verify", d), p, "does not match its sha256")


# ---- 4. no link out of the folder ------------------------------------------------------------

@pytest.mark.parametrize("backend,rel", [("onnxrt", "model.onnx"), ("onnxrt", "model.onnx.data"),
                                         ("onnxrt", "tokenizer"), ("tvm", "model.so"),
                                         ("tvm", "weights.safetensors"), ("tvm", "tokenizer")])
def test_link_out_of_the_folder_is_refused(built, tmp_path, backend, rel):
    """The same bytes, moved out of the artifact and linked back: every size and sha256 agree,
    yet the artifact no longer holds its files, so load and verify refuse it."""
    d = copy_of(built, backend, tmp_path)
    outside = tmp_path / "outside" / rel
    outside.parent.mkdir(parents=True)
    (d / rel).rename(outside)
    (d / rel).symlink_to(outside)
    for args in (["run", d, "--ids", "1,2", "-n", "1"], ["verify", d]):
        one_line(kiln_cli(*args), d / rel, "resolves outside the artifact folder")   # tokenizer: a file in it


def test_link_inside_the_folder_is_kept(built, tmp_path):
    d = copy_of(built, "onnxrt", tmp_path)
    (d / "tokenizer" / "generation_config.json").unlink()
    (d / "tokenizer" / "generation_config.json").symlink_to(d / "tokenizer" / "tokenizer_config.json")
    rewrite(d, lambda m: m["files"].update({"tokenizer/generation_config.json":
                                            m["files"]["tokenizer/tokenizer_config.json"]}))
    read_manifest(d, check_hashes=False)


# ---- 5. the manifest's numbers against what the files hold --------------------------------

def _set(path: tuple, value):
    def edit(m):
        here = m
        for k in path[:-1]:
            here = here[k]
        here[path[-1]] = value
    return edit


KV = ("backend", "kv_cache")
NUMBERS = [
    ("onnxrt", KV + ("layers",), 1e9, "not a whole number"),
    ("onnxrt", KV + ("layers",), 10**9, "kv_cache layers is 1000000000, not a whole number from 0 to 2"),
    ("onnxrt", KV + ("layers",), 1, "but the model has 2 cache inputs"),
    ("onnxrt", KV + ("kv_heads",), 10**6, "kv_cache kv_heads"),
    ("onnxrt", KV + ("head_dim",), 17, "head_dim is 17, but the model's cache inputs have 16"),
    ("onnxrt", ("backend", "max_length"), 1e30, "max_length is 1e+30"),
    ("onnxrt", ("backend", "max_length"), 10**30, "max_length"),
    ("onnxrt", ("config", "max_position_embeddings"), "128", "max_position_embeddings"),
    ("tvm", KV + ("layers",), 10**9, "kv_cache layers"),
    ("tvm", KV + ("kv_heads",), 10**6, "kv_cache kv_heads"),
    ("tvm", KV + ("head_dim",), 60000, "wider than any weight"),
    ("tvm", KV + ("kv_heads",), True, "kv_heads is True"),
    ("tvm", ("backend", "max_length"), 1e30, "max_length"),
    ("tvm", ("backend", "max_length"), 129, "past the 128 positions its rotary tables hold"),
]


@pytest.mark.parametrize("backend,path,value,message", NUMBERS)
def test_manifest_numbers_are_bounded(built, tmp_path, backend, path, value, message):
    d = copy_of(built, backend, tmp_path)
    rewrite(d, _set(path, value))
    t = time.perf_counter()
    with pytest.raises(ArtifactError, match="manifest") as e:
        runtime.load(d)
    assert e.value.path == str(d / "manifest.json") and message in e.value.message, str(e.value)
    assert time.perf_counter() - t < 30          # refused, not allocated first


def test_a_billion_layers_is_one_line_at_the_cli(built, tmp_path):
    d = copy_of(built, "onnxrt", tmp_path)
    rewrite(d, _set(KV + ("layers",), 10**9))
    one_line(kiln_cli("run", d, "--ids", "1,2", "-n", "1"), d / "manifest.json", "kv_cache layers")


@pytest.mark.parametrize("backend", ["onnxrt", "tvm"])
def test_smaller_max_length_still_loads(built, tmp_path, backend):
    d = copy_of(built, backend, tmp_path)
    rewrite(d, _set(("backend", "max_length"), 8))
    model = runtime.load(d)
    assert model.session.max_length == 8
    with pytest.raises(ValueError, match="at most 8"):
        model.generate(list(range(1, 10)), max_new_tokens=1)


# ---- 3. signatures ---------------------------------------------------------------------------

def write_key_pair(folder: Path, name: str = "kiln") -> tuple[Path, Path]:
    """An Ed25519 key pair in the PEM files OpenSSL writes (PKCS#8 private, SPKI public)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    key = Ed25519PrivateKey.generate()
    folder.mkdir(parents=True, exist_ok=True)
    private, public = folder / f"{name}.key", folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


@pytest.fixture(scope="module")
def signed(built, tmp_path_factory) -> dict:
    """Both artifacts signed with one key (as kiln compile --sign does, after the build)."""
    from kiln.signing import load_private_key, sign
    root = tmp_path_factory.mktemp("signed")
    private, public = write_key_pair(root / "keys")
    out = {"private": private, "public": public, "other": write_key_pair(root / "keys", "other")[1]}
    for backend, folder in built.items():
        d = root / folder.name
        shutil.copytree(folder, d)
        sign(d, load_private_key(private))
        out[backend] = d
    return out


def test_compile_sign_verify_key_and_run_trusted_key(tmp_path):
    private, public = write_key_pair(tmp_path / "keys")
    d = tmp_path / "s.kiln"
    p = kiln_cli("compile", HF_FIXTURES / "llama", "--backend", "onnxrt", "-o", d, "--sign", private, "-q")
    assert p.returncode == 0, p.stderr
    assert (d / "manifest.sig").is_file()
    p = kiln_cli("verify", d, "--key", public)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].startswith(f"{d}: ok, manifest and 2 files match their sha256"), p.stdout
    assert lines[1].startswith(f"{d}: signed by trusted key ed25519:"), p.stdout
    assert "load only artifacts from a source you trust" in lines[2], p.stdout
    p = kiln_cli("run", d, "--ids", "1,2", "-n", "2", "--trusted-key", public)
    assert p.returncode == 0 and len(p.stdout.splitlines()[-1].split(",")) == 2, p.stderr
    assert len(runtime.load(d, trusted_keys=[public]).generate([1, 2], max_new_tokens=1).ids) == 1
    assert runtime.load(d, trusted_keys=[public.read_bytes()]).manifest["backend"]["name"] == "onnxrt"


def test_compile_with_a_bad_key_writes_nothing(tmp_path):
    private, public = write_key_pair(tmp_path / "keys")
    d = tmp_path / "s.kiln"
    one_line(kiln_cli("compile", HF_FIXTURES / "llama", "-o", d, "--sign", public), public,
             "is not an Ed25519 private key")
    assert not d.exists()


def test_openssl_keys_work(tmp_path):
    """The key-making command the README gives."""
    from kiln.signing import KEYGEN_HINT
    subprocess.run(KEYGEN_HINT, shell=True, cwd=tmp_path, check=True, capture_output=True)
    d = tmp_path / "s.kiln"
    import kiln
    kiln.compile(HF_FIXTURES / "llama", output=d, sign=tmp_path / "kiln.key")
    runtime.load(d, trusted_keys=[tmp_path / "kiln.pub"])


@pytest.mark.parametrize("backend", ["onnxrt", "tvm"])
def test_unsigned_verify_says_so_and_names_the_code(built, backend):
    p = kiln_cli("verify", built[backend])
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[1] == f"{built[backend]}: not signed (kiln compile --sign KEYFILE signs an artifact)"
    code = "native code (model.so)" if backend == "tvm" else "a compiled graph (model.onnx)"
    assert code in lines[2] and "load only artifacts from a source you trust" in lines[2], p.stdout


def test_signed_but_unchecked_is_said(signed):
    p = kiln_cli("verify", signed["onnxrt"])
    assert p.returncode == 0 and "not checked (give --key PUBFILE to check it)" in p.stdout, p.stdout


@pytest.mark.parametrize("backend", ["onnxrt", "tvm"])
def test_trusted_key_hashes_the_weights_too(signed, tmp_path, backend):
    d = tmp_path / "a.kiln"
    shutil.copytree(signed[backend], d)
    rel = "weights.safetensors" if backend == "tvm" else "model.onnx.data"
    data = bytearray((d / rel).read_bytes())
    data[-5] ^= 0x40
    (d / rel).write_bytes(bytes(data))
    runtime.load(d)                                    # no key: the weights are not hashed
    for args in (["run", d, "--ids", "1,2", "-n", "1", "--trusted-key", signed["public"]],
                 ["verify", d, "--key", signed["public"]]):
        one_line(kiln_cli(*args), d / rel, "does not match its sha256")


def test_swapped_library_with_the_manifest_rehashed(signed, evil_library, tmp_path):
    """The forger's full job: the library swapped and every hash in the manifest recomputed.
    Nothing in the folder betrays it (kiln verify without a key says ok), but the signature
    no longer matches the manifest, and with a trusted key the library is never loaded."""
    d = tmp_path / "a.kiln"
    shutil.copytree(signed["tvm"], d)
    shutil.copyfile(evil_library, d / "model.so")
    rehash(d)
    assert kiln_cli("verify", d).returncode == 0
    marker = tmp_path / "ran"
    env = {"KILN_TEST_MARKER": str(marker)}
    for args in (["run", d, "--ids", "1,2", "-n", "1", "--trusted-key", signed["public"]],
                 ["verify", d, "--key", signed["public"]]):
        one_line(kiln_cli(*args, env=env), d / "manifest.sig", "does not match manifest.json")
    one_line(kiln_cli("run", d, "--ids", "1,2", "-n", "1", env={**env, "KILN_TRUSTED_KEYS": str(signed["public"])}),
             d / "manifest.sig", "does not match manifest.json")
    with pytest.raises(ArtifactError, match="does not match manifest.json"):
        runtime.load(d, trusted_keys=[signed["public"]])
    assert not marker.exists(), "the swapped library's constructor ran"


def test_wrong_key_is_refused(signed):
    one_line(kiln_cli("verify", signed["onnxrt"], "--key", signed["other"]), signed["onnxrt"] / "manifest.sig",
             "which is not a trusted key")
    # any of several keys will do
    p = kiln_cli("verify", signed["onnxrt"], "--key", signed["other"], "--key", signed["public"])
    assert p.returncode == 0, p.stderr


def test_unsigned_artifact_is_refused_when_a_key_is_required(built, signed, monkeypatch):
    for args in (["verify", built["onnxrt"], "--key", signed["public"]],
                 ["run", built["onnxrt"], "--ids", "1,2", "-n", "1", "--trusted-key", signed["public"]]):
        one_line(kiln_cli(*args), built["onnxrt"], "is not signed")
    monkeypatch.setenv("KILN_TRUSTED_KEYS", str(signed["public"]))
    with pytest.raises(ArtifactError, match="is not signed"):
        runtime.load(built["onnxrt"])
    runtime.load(built["onnxrt"], trusted_keys=[])          # an empty list asks for none


@pytest.mark.parametrize("text,message", [("{}", "is not an ed25519 signature"),
                                          ('{"algorithm": "ed25519", "key": "x", "signature": "@@"}', "not base64"),
                                          ("\xff", "unreadable signature")])
def test_damaged_signature_file_is_one_line(signed, tmp_path, text, message):
    d = tmp_path / "a.kiln"
    shutil.copytree(signed["onnxrt"], d)
    (d / "manifest.sig").write_bytes(text.encode("latin-1"))
    one_line(kiln_cli("verify", d, "--key", signed["public"]), d / "manifest.sig", message)


def test_bad_public_key_is_one_line(signed, tmp_path):
    bad = tmp_path / "bad.pub"
    bad.write_text("not a key")
    one_line(kiln_cli("verify", signed["onnxrt"], "--key", bad), bad, "is not an Ed25519 public key")
    one_line(kiln_cli("verify", signed["onnxrt"], "--key", tmp_path / "missing.pub"), tmp_path / "missing.pub",
             "cannot read the key")


def test_without_cryptography_a_key_is_a_one_line_error(signed, monkeypatch):
    from kiln.errors import KilnError
    for name in [m for m in sys.modules if m == "cryptography" or m.startswith("cryptography.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "cryptography", None)         # import cryptography fails
    with pytest.raises(KilnError, match=r"pip install 'kiln\[sign\]'"):
        runtime.load(signed["onnxrt"], trusted_keys=[signed["public"]])
    runtime.load(signed["onnxrt"])                                  # no key, no need of it


def test_serve_trusted_key_reaches_the_load(signed, monkeypatch):
    """kiln serve --trusted-key hands the key to the server's runtime.load ($KILN_TRUSTED_KEYS)."""
    from kiln.cli import main
    from kiln.runtime import server
    seen = {}
    monkeypatch.setenv("KILN_TRUSTED_KEYS", "")      # empty: no key; and cmd_serve's setting is undone after
    monkeypatch.setattr(server, "serve", lambda artifact, **kw: seen.update(model=runtime.load(artifact)))
    assert main(["serve", str(signed["onnxrt"]), "--trusted-key", str(signed["public"])]) == 0
    assert seen["model"].manifest["backend"]["name"] == "onnxrt"
    assert main(["serve", str(signed["onnxrt"]), "--trusted-key", str(signed["other"])]) == 2
