"""Structure-aware fuzzing of the artifact manifest reader (``kiln.artifact.read_manifest``).

A real artifact (the tiny llama compiled once) is copied per case; its manifest.json is edited
knowing its keys (format_version, files and each entry's bytes and sha256, backend and its model,
the manifest's own sha256, which some cases recompute so the edit gets past that check), its
text is cut or made invalid UTF-8, and the folder itself changes: listed files missing, resized,
replaced by folders or links, unlisted files added, entries naming paths outside the artifact.
The manifest is read plain and with ``check_hashes``; every case must read or fail with a
one-line KilnError (ArtifactError is one) naming a file of the artifact.

``fuzz_load_numbers`` loads the artifact (ONNX Runtime or TVM) after editing the numbers that
size memory (the KV cache's layers, heads and head size, max_length, the model's context and
EOS ids) and generates two tokens: every case must run or be refused with one line, within the
child's memory limit (a billion layers once took 6 GB).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import strategies as st

import fuzzing
from conftest import HF_FIXTURES
from kiln import artifact
from kiln.errors import KilnError

FOCUS = [("format_version",), ("files",), ("backend",), ("backend", "model"), (artifact.SELF_HASH,)]
NAMES = ["../x", "/etc/passwd", "a/../../x", "a\\b", "nul\x00", "", ".", "a/", "model.onnx/", "manifest.json",
         "x" * 300, "d/" * 60 + "x", "new\nline", "\u2028", "tokenizer/../model.onnx", "./model.onnx", "model.onnx "]

_BASE: dict = {}


def prepare(work: Path) -> None:
    if _BASE:
        return
    from kiln.driver import compile as kiln_compile
    work.mkdir(parents=True, exist_ok=True)
    # ONNX Runtime: the cases name its files (model.onnx) and its backend entry's "model"
    folder = kiln_compile(HF_FIXTURES / "llama", output=work / "llama.kiln", backend="onnxrt")
    _BASE["folder"] = Path(folder)
    _BASE["manifest"] = json.loads((Path(folder) / artifact.MANIFEST).read_text())
    _tvm_base(work)


def _tvm_base(work: Path) -> None:
    """The TVM artifact, built by the calling test before the child starts (a TVM build
    would count against the child's start-up watchdog)."""
    if (work / "tvm.kiln").is_dir():
        _BASE["tvm"] = work / "tvm.kiln"


def _with_self_hash(text: str) -> bytes:
    """The manifest text with its own sha256 made right again (as a careful forger would)."""
    raw = text.encode("utf-8", "surrogatepass")
    at = raw.rfind(artifact._SELF_HASH_AT)
    if at < 0 or len(raw) < at + len(artifact._SELF_HASH_AT) + 64:
        return raw
    at += len(artifact._SELF_HASH_AT)
    digest = artifact._self_hash(raw)
    return raw[:at] + digest.encode() + raw[at + 64:]


def _entry_edit(manifest: dict, draw) -> tuple[dict, str]:
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return manifest, "no files"
    files = dict(files)
    rel = draw(st.sampled_from(sorted(files)))
    op = draw(st.sampled_from(["rename", "bytes", "sha", "drop", "add"]))
    if op == "rename":
        new = draw(st.sampled_from(NAMES) | fuzzing.hostile_str())
        files[new] = files.pop(rel)
        note = f"files: {rel} -> {new[:40]!r}"
    elif op == "bytes":
        info = dict(files[rel]) if isinstance(files[rel], dict) else {}
        info["bytes"] = draw(fuzzing.json_values(info.get("bytes")))
        files[rel] = info
        note = f"files[{rel}].bytes = {str(info['bytes'])[:40]}"
    elif op == "sha":
        info = dict(files[rel]) if isinstance(files[rel], dict) else {}
        info["sha256"] = draw(st.sampled_from(["", "0" * 64, "x", None, 5]) | fuzzing.hostile_str())
        files[rel] = info
        note = f"files[{rel}].sha256 changed"
    elif op == "drop":
        del files[rel]
        note = f"files: drop {rel}"
    else:
        new = draw(st.sampled_from(NAMES))
        files[new] = {"bytes": draw(st.sampled_from([0, 1, 5])), "sha256": "0" * 64}
        note = f"files: add {new[:40]!r}"
    return dict(manifest, files=files), note


def _folder_edit(folder: Path, draw) -> str:
    listed = sorted(p.name for p in folder.iterdir() if p.name != artifact.MANIFEST)
    if not listed:
        return "nothing left to change"
    name = draw(st.sampled_from(listed))
    p = folder / name
    if p.is_symlink() or not p.is_file():
        return f"{name}: already changed"
    op = draw(st.sampled_from(["delete", "truncate", "grow", "folder", "symlink_in", "symlink_out", "extra",
                               "extra_dir", "flip"]))
    if op in ("delete", "folder", "symlink_in", "symlink_out"):
        p.unlink()
        if op == "folder":
            p.mkdir()
        elif op == "symlink_in":
            p.symlink_to(folder / draw(st.sampled_from(listed)))
        elif op == "symlink_out":
            p.symlink_to(_BASE["folder"] / name)      # same bytes, outside the artifact
    elif op == "truncate":
        data = p.read_bytes()
        p.write_bytes(data[:draw(fuzzing.position(len(data)))])
    elif op == "grow":
        with open(p, "ab") as f:
            f.write(b"\0" * draw(st.integers(1, 64)))
    elif op == "flip":
        data = bytearray(p.read_bytes())
        if data:
            data[draw(fuzzing.position(len(data)))] ^= 1
        p.write_bytes(bytes(data))
    elif op == "extra":
        (folder / draw(st.sampled_from(["extra.bin", "tokenizer.json", ".hidden", "model.onnx.bak"]))).write_bytes(b"x")
    else:
        (folder / "sub").mkdir(exist_ok=True)
        (folder / "sub" / "x").write_bytes(b"x")
    return f"{name}: {op}"


@fuzzing.target(data=st.data())
def fuzz_manifest(ws, data):
    prepare(ws.root / "bases")
    folder = ws.path("a.kiln")
    shutil.copytree(_BASE["folder"], folder)
    manifest = _BASE["manifest"]
    notes = []
    for _ in range(data.draw(st.sampled_from([1, 1, 2, 3]), label="edits")):
        what = data.draw(st.sampled_from(["json", "json", "entry", "entry", "folder"]))
        if what == "json":
            manifest, note = fuzzing.mutate_json(manifest, data.draw, focus=FOCUS)
        elif what == "entry":
            manifest, note = _entry_edit(manifest, data.draw) if isinstance(manifest, dict) else (manifest, "-")
        else:
            note = _folder_edit(folder, data.draw)
        notes.append(note)
    text = fuzzing.dumps(manifest)
    if data.draw(st.booleans(), label="self hash right?"):
        raw = _with_self_hash(text)
    else:
        raw = text.encode("utf-8", "surrogatepass")
    if data.draw(st.integers(0, 5), label="text edit?") == 0:
        raw, note = fuzzing.mutate_json_text(raw.decode("utf-8", "surrogateescape"), data.draw)
        notes.append(note)
    (folder / artifact.MANIFEST).write_bytes(raw)
    ws.note(" | ".join(notes))
    check = data.draw(st.booleans(), label="check_hashes")
    fuzzing.expect(ws, lambda: artifact.read_manifest(folder, check_hashes=check), folder)


NUMBERS = [("backend", "kv_cache", "layers"), ("backend", "kv_cache", "kv_heads"), ("backend", "kv_cache", "head_dim"),
           ("backend", "max_length"), ("config", "max_position_embeddings"), ("generation", "eos_token_id"),
           ("backend", "kv_cache", "dtype"), ("backend", "kv_cache", "layout"), ("backend", "kv_cache", "mode"),
           ("config",), ("backend", "kv_cache")]


def _linked_copy(src: Path, dst: Path) -> None:
    """A copy whose files are hard links (no bytes copied, one library inode for dlopen), but
    for the manifest, which the case rewrites."""
    def link(a, b):
        if Path(a).name == artifact.MANIFEST:
            shutil.copyfile(a, b)
        else:
            os.link(a, b)
    shutil.copytree(src, dst, copy_function=link)


@fuzzing.target(data=st.data())
def fuzz_load_numbers(ws, data):
    from kiln import runtime
    prepare(ws.root / "bases")
    backend = data.draw(st.sampled_from(["onnxrt", "tvm"] if "tvm" in _BASE else ["onnxrt"]), label="backend")
    base = _BASE["folder"] if backend == "onnxrt" else _BASE["tvm"]
    folder = ws.path("a.kiln")
    _linked_copy(base, folder)
    manifest = json.loads((base / artifact.MANIFEST).read_text())
    notes = [backend]
    for _ in range(data.draw(st.sampled_from([1, 1, 2, 3]), label="edits")):
        path = data.draw(st.sampled_from(NUMBERS))
        here = fuzzing.json_get(manifest, path[:-1]) if len(path) > 1 else manifest
        value = data.draw(fuzzing.json_values(here.get(path[-1]) if isinstance(here, dict) else None))
        if isinstance(here, dict):
            manifest = fuzzing.json_set(manifest, path[:-1], {**here, path[-1]: value})
            notes.append(f"{'.'.join(path)} = {str(value)[:40]}")
    (folder / artifact.MANIFEST).write_bytes(fuzzing.dumps(manifest).encode("utf-8", "surrogatepass"))
    ws.note(" | ".join(notes))

    def load_and_run():
        model = runtime.load(folder)
        try:
            return model.generate([1, 2], max_new_tokens=2).ids
        except ValueError as e:            # a small max_length, refused as the runtime refuses it
            assert "at most" in str(e), e
    fuzzing.expect(ws, load_and_run, folder)


def test_base_reads(tmp_path):
    prepare(tmp_path / "bases")
    m = artifact.read_manifest(_BASE["folder"], check_hashes=True)
    assert m["backend"]["model"] in m["files"]
    assert _with_self_hash(json.dumps(m, indent=2) + "\n") == (_BASE["folder"] / artifact.MANIFEST).read_bytes()


@pytest.fixture()
def art(tmp_path) -> Path:
    prepare(tmp_path / "bases")
    folder = tmp_path / "a.kiln"
    shutil.copytree(_BASE["folder"], folder)
    return folder


def _write(folder: Path, manifest) -> None:
    (folder / artifact.MANIFEST).write_bytes(_with_self_hash(fuzzing.dumps(manifest)))


def _refused(folder: Path, match: str, check_hashes=False) -> KilnError:
    with pytest.raises(KilnError, match=match) as e:
        artifact.read_manifest(folder, check_hashes=check_hashes)
    fuzzing.check_error(e.value, [folder])
    return e.value


def test_regression_artifact_errors_are_kiln_errors(art):
    # found by fuzz_manifest: every refusal was an ArtifactError, which was no KilnError
    (art / "model.onnx").unlink()
    assert isinstance(_refused(art, "model.onnx listed in the manifest is missing"), artifact.ArtifactError)


@pytest.mark.parametrize("text,match", [("[" * 100000 + "]" * 100000, "nested too deeply"),
                                        ('{"format_version": ' + "9" * 5000 + "}", "digits")])
def test_regression_json_that_python_cannot_hold(art, text, match):
    # found by fuzz_manifest: RecursionError and ValueError (int digit limit) escaped json.loads
    (art / artifact.MANIFEST).write_text(text)
    _refused(art, match)


@pytest.mark.parametrize("name", ["new\nline", "x" * 300, "\u2028"])
def test_regression_listed_names_that_break_messages_or_paths(art, name):
    # found by fuzz_manifest: a listed name with a newline gave a two-line message; one of 300
    # characters made is_file() raise OSError (ENAMETOOLONG)
    m = json.loads((art / artifact.MANIFEST).read_text())
    m["files"][name] = {"bytes": 1, "sha256": "0" * 64}
    _write(art, m)
    assert len(_refused(art, None).message) < 300


def test_regression_format_version_that_breaks_the_line(art):
    # found by fuzz_manifest: format_version "\r" was printed raw
    m = json.loads((art / artifact.MANIFEST).read_text())
    m["format_version"] = "\r"
    _write(art, m)
    _refused(art, "format version")


def test_unlisted_file_with_a_newline_in_its_name(art):
    # found while fixing the cases above: the unlisted file itself was the error's path
    (art / "a\nb").write_bytes(b"x")
    e = _refused(art, "not listed")
    assert e.path == str(art)


@pytest.mark.parametrize("name", ["fuzz_manifest", "fuzz_load_numbers"])
def test_fuzz(name, tmp_path):
    if name == "fuzz_load_numbers":
        from kiln.driver import compile as kiln_compile
        kiln_compile(HF_FIXTURES / "llama", output=tmp_path / f"fuzz-{name}" / "bases" / "tvm.kiln", backend="tvm")
    fuzzing.run_target(__file__, name, tmp_path)
