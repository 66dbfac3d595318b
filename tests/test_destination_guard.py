"""kiln never deletes what it did not write.

An existing destination is refused unless ``--force``; with it, a folder output replaces only
the files a kiln output of that kind writes and keeps every other file (an artifact, whose
manifest lists every file, refuses a folder holding others). Driven through the CLI, for every
writer."""
import json
import os
import subprocess
import sys

import pytest

from conftest import HF_FIXTURES

LLAMA = HF_FIXTURES / "llama"
TIMEOUT = 300


def kiln(*args):
    env = {**os.environ, "KILN_DEBUG": ""}
    return subprocess.run([sys.executable, "-m", "kiln.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=TIMEOUT, env=env)


def argv(writer, dest, *extra):
    if writer == "compile":
        return ["compile", LLAMA, "-o", dest, "-q", *extra]
    return ["convert", LLAMA, dest, "--to", writer, "-q", *extra]


FOLDER_WRITERS = ["hf", "onnx", "compile"]
FILE_WRITERS = {"gguf": "out.gguf", "safetensors": "out.safetensors"}


def users_folder(dest):
    """A folder of the user's: documents, a template, a subfolder, their own weights."""
    dest.mkdir()
    (dest / "README.md").write_text("my notes")
    (dest / "chat_template.jinja").write_text("{{ messages }}")
    (dest / "original").mkdir()
    (dest / "original" / "weights.bin").write_bytes(b"\x01" * 100)
    (dest / "adapter_model.safetensors").write_bytes(b"not kiln's")
    return {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}


def unchanged(dest, files):
    return all((dest / rel).is_file() and (dest / rel).read_bytes() == data for rel, data in files.items())


@pytest.mark.parametrize("writer", FOLDER_WRITERS + list(FILE_WRITERS))
def test_a_folder_with_unknown_files_is_never_emptied(tmp_path, writer):
    dest = tmp_path / "mine"
    files = users_folder(dest)
    for extra in ([], ["--force"]):
        r = kiln(*argv(writer, dest, *extra))
        if writer in FILE_WRITERS or writer == "compile" or not extra:
            assert r.returncode == 2, r.stderr
            assert r.stderr.startswith(f"kiln: {dest}: ") and r.stderr.count("\n") == 1, r.stderr
        else:
            assert r.returncode == 0, r.stderr
        assert unchanged(dest, files), sorted(p.name for p in dest.rglob("*"))
        assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]          # no staging left behind
    r = kiln(*argv(writer, dest))
    if writer in FILE_WRITERS:
        assert r.stderr == (f"kiln: {dest}: already exists and is not empty; add --force to replace the files "
                            "kiln writes (it never deletes others), or choose another name\n")


# per writer: a file of an earlier output of its own kind that the new one does not write
# (stale shards), and one of the other kind's, which is not its to remove
STALE = {"hf": ("model-00001-of-00009.safetensors", "model.onnx"),
         "onnx": ("model.onnx.data", "model.safetensors")}


@pytest.mark.parametrize("writer", list(STALE))
def test_force_replaces_only_what_the_writer_owns(tmp_path, writer):
    dest = tmp_path / "out"
    files = users_folder(dest)
    own, other = STALE[writer]
    (dest / "config.json").write_text("{}")
    (dest / own).write_bytes(b"stale")
    (dest / other).write_bytes(b"stale")
    r = kiln(*argv(writer, dest))
    assert r.returncode == 2
    assert r.stderr == (f"kiln: {dest}: already exists and is not empty; add --force to replace the files "
                        "kiln writes (it never deletes others), or choose another name\n")
    assert (dest / "config.json").read_text() == "{}"

    assert kiln(*argv(writer, dest, "--force")).returncode == 0
    assert unchanged(dest, files)
    assert (dest / other).read_bytes() == b"stale"
    assert not (dest / own).exists() or (dest / own).read_bytes() != b"stale"
    if writer == "hf":
        assert not (dest / own).exists()
        assert (dest / "config.json").read_text() != "{}"      # rewritten
        assert kiln("inspect", dest).returncode == 0
    else:
        # an ONNX export writes config.json beside model.onnx, as optimum does
        assert json.loads((dest / "config.json").read_text())["model_type"] == "llama"
        assert (dest / "model.onnx").stat().st_size > 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("writer", list(FILE_WRITERS))
def test_a_file_is_replaced_only_with_force(tmp_path, writer):
    dest = tmp_path / FILE_WRITERS[writer]
    dest.write_bytes(b"somebody's file")
    r = kiln(*argv(writer, dest))
    assert r.returncode == 2
    assert r.stderr == f"kiln: {dest}: already exists; add --force to replace it, or choose another name\n"
    assert dest.read_bytes() == b"somebody's file"
    assert kiln(*argv(writer, dest, "--force")).returncode == 0
    assert kiln("inspect", dest).returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [dest.name]


def test_an_earlier_artifact_is_replaced_like_a_build_output(tmp_path):
    dest = tmp_path / "a.kiln"
    assert kiln(*argv("compile", dest)).returncode == 0
    first = (dest / "manifest.json").read_text()
    r = kiln(*argv("compile", dest))          # every file kiln's own, listed by its manifest
    assert r.returncode == 0, r.stderr
    assert (dest / "manifest.json").read_text() != first        # written anew (compile_seconds, ...)
    assert kiln(*argv("compile", dest, "--force")).returncode == 0
    assert kiln("verify", dest).returncode == 0
    # a folder of other files is never an artifact's, --force or not; a file needs --force
    other = tmp_path / "b.kiln"
    other.mkdir()
    (other / "x.bin").write_bytes(b"?")
    r = kiln(*argv("compile", other))
    assert r.returncode == 2 and "holds files that are not part of an artifact (x.bin)" in r.stderr
    a_file = tmp_path / "c.kiln"
    a_file.write_bytes(b"?")
    r = kiln(*argv("compile", a_file))
    assert r.returncode == 2 and "already exists; add --force" in r.stderr
    # a file of the user's in an artifact: an artifact cannot hold it, and kiln does not delete it
    (dest / "notes.txt").write_text("mine")
    r = kiln(*argv("compile", dest, "--force"))
    assert r.returncode == 2
    assert r.stderr == (f"kiln: {dest}: holds files that are not part of an artifact (notes.txt); kiln does "
                        "not delete them and an artifact cannot hold them, so move them or choose another folder\n")
    assert (dest / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("writer", FOLDER_WRITERS)
def test_an_empty_folder_needs_no_force(tmp_path, writer):
    dest = tmp_path / "empty"
    dest.mkdir()
    r = kiln(*argv(writer, dest))
    assert r.returncode == 0, r.stderr
    assert any(dest.iterdir())
