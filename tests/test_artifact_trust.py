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
    return {"onnxrt": kiln.compile(src, output=root / "ort.kiln"),
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
