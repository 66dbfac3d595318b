"""Verified artifacts: a damaged or tampered file is refused, named, before the backend reads it.

Loading checks the manifest's listing and every file's size (no hashing); ``kiln verify`` and
``runtime.load(..., verify=True)`` check every sha256, the manifest's own included. Each file
kind of an artifact (the manifest, the ONNX model, its external weight data, the tokenizer
files) is truncated and byte-flipped in turn; files are swapped, added and removed.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import HF_FIXTURES

from kiln.artifact import FORMAT_VERSION, ArtifactError, read_manifest
from kiln.cli import main

LLAMA = HF_FIXTURES / "llama"
# every file the tiny artifact holds: a new kind of file must be added here (and so get its cases)
FILES = ["manifest.json", "model.onnx", "model.onnx.data", "tokenizer/generation_config.json",
         "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    """The tiny llama with a byte-level tokenizer and a chat template, compiled once."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    import kiln
    root = tmp_path_factory.mktemp("verify")
    src = root / "llama"
    shutil.copytree(LLAMA, src, ignore=shutil.ignore_patterns("reference.npz"))
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": alphabet[2], "bos_token": alphabet[1],
        "chat_template": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"}))
    # ONNX Runtime: the cases below name its files (model.onnx, model.onnx.data);
    # tests/test_tvm_backend.py checks a TVM artifact's library and weights the same way
    return kiln.compile(src, output=root / "tiny.kiln", backend="onnxrt")


def _copy(artifact: Path, tmp_path: Path) -> Path:
    d = tmp_path / "tiny.kiln"
    shutil.copytree(artifact, d)
    return d


def _refused(d: Path, named: Path, *, verify: bool, monkeypatch, capsys) -> str:
    """The artifact is refused by load (before any ONNX Runtime session) and by the CLI, with
    one line naming ``named``; returns the line."""
    from kiln import runtime
    from kiln.runtime import onnxrt_session

    def no_session(*a, **k):
        raise AssertionError("ONNX Runtime was reached")
    monkeypatch.setattr(onnxrt_session.OnnxRuntimeSession, "__init__", no_session)
    with pytest.raises(ArtifactError) as e:
        runtime.load(d, verify=verify)
    assert str(named) in str(e.value), str(e.value)
    argv = ["verify", str(d)] if verify else ["run", str(d), "--ids", "1,2", "-n", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("kiln: ") and str(named) in err, err
    return err.strip()


def test_the_artifact_has_the_expected_files(artifact):
    present = sorted(p.relative_to(artifact).as_posix() for p in artifact.rglob("*") if p.is_file())
    assert present == sorted(FILES)
    m = read_manifest(artifact, check_hashes=True)
    assert m["format_version"] == FORMAT_VERSION
    assert sorted(m["files"]) == sorted(set(FILES) - {"manifest.json"})
    assert all(isinstance(v["bytes"], int) and len(v["sha256"]) == 64 for v in m["files"].values())


def test_intact_artifact_loads_verifies_and_runs(artifact, capsys):
    from kiln import runtime
    model = runtime.load(artifact, verify=True)
    assert len(model.generate([1, 2, 3], max_new_tokens=2).ids) == 2
    assert main(["verify", str(artifact)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{artifact}: ok, manifest and {len(FILES) - 1} files match their sha256"), out


@pytest.mark.parametrize("rel", FILES)
def test_truncated_file_refused_at_load(artifact, tmp_path, rel, monkeypatch, capsys):
    d = _copy(artifact, tmp_path)
    p = d / rel
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    named = p if rel != "manifest.json" else d / "manifest.json"
    line = _refused(d, named, verify=False, monkeypatch=monkeypatch, capsys=capsys)
    assert ("the manifest says" in line) if rel != "manifest.json" else ("unreadable manifest" in line), line


@pytest.mark.parametrize("rel", FILES)
def test_byte_flipped_file_refused_by_verify(artifact, tmp_path, rel, monkeypatch, capsys):
    d = _copy(artifact, tmp_path)
    p = d / rel
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    line = _refused(d, p, verify=True, monkeypatch=monkeypatch, capsys=capsys)
    assert "sha256" in line or "unreadable manifest" in line, line


def test_manifest_edit_that_stays_valid_json_refused_by_verify(artifact, tmp_path, monkeypatch, capsys):
    """An edit that keeps the manifest valid JSON, with no size to betray it: its own sha256 does."""
    d = _copy(artifact, tmp_path)
    p = d / "manifest.json"
    text = p.read_text()
    assert '"architecture": "llama"' in text
    p.write_text(text.replace('"architecture": "llama"', '"architecture": "llamb"', 1))
    line = _refused(d, p, verify=True, monkeypatch=monkeypatch, capsys=capsys)
    assert "does not match its own sha256" in line


def test_manifest_sizes_edited_to_match_a_tampered_file(artifact, tmp_path, monkeypatch, capsys):
    """A file replaced and its size in the manifest updated to pass the load check: verify
    refuses the manifest, whose own sha256 no longer matches."""
    d = _copy(artifact, tmp_path)
    (d / "tokenizer/tokenizer_config.json").write_text("{}")
    m = json.loads((d / "manifest.json").read_text())
    m["files"]["tokenizer/tokenizer_config.json"]["bytes"] = 2
    (d / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")
    _refused(d, d / "manifest.json", verify=True, monkeypatch=monkeypatch, capsys=capsys)


@pytest.mark.parametrize("a,b", [("model.onnx", "model.onnx.data"),
                                 ("tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"),
                                 ("tokenizer/generation_config.json", "tokenizer/tokenizer_config.json")])
def test_swapped_files_refused_at_load(artifact, tmp_path, a, b, monkeypatch, capsys):
    d = _copy(artifact, tmp_path)
    tmp = d / "swap"
    (d / a).rename(tmp)
    (d / b).rename(d / a)
    tmp.rename(d / b)
    line = _refused(d, d, verify=False, monkeypatch=monkeypatch, capsys=capsys)
    assert str(d / a) in line or str(d / b) in line, line


def test_swapped_equal_size_content_refused_by_verify(artifact, tmp_path, monkeypatch, capsys):
    """Content of the same size from elsewhere (two halves of the weights exchanged): only the
    sha256 can tell."""
    d = _copy(artifact, tmp_path)
    p = d / "model.onnx.data"
    data = p.read_bytes()
    half = len(data) // 2
    p.write_bytes(data[half:2 * half] + data[:half] + data[2 * half:])
    read_manifest(d)                                  # the sizes agree
    line = _refused(d, p, verify=True, monkeypatch=monkeypatch, capsys=capsys)
    assert "does not match its sha256" in line


@pytest.mark.parametrize("rel", ["extra.bin", "tokenizer/special_tokens_map.json", "model.onnx.data.bak"])
def test_unlisted_file_refused_at_load(artifact, tmp_path, rel, monkeypatch, capsys):
    d = _copy(artifact, tmp_path)
    (d / rel).write_bytes(b"{}")
    line = _refused(d, d / rel, verify=False, monkeypatch=monkeypatch, capsys=capsys)
    assert "is not listed in the manifest" in line


@pytest.mark.parametrize("rel", [f for f in FILES if f != "manifest.json"])
def test_missing_file_refused_at_load(artifact, tmp_path, rel, monkeypatch, capsys):
    d = _copy(artifact, tmp_path)
    (d / rel).unlink()
    line = _refused(d, d, verify=False, monkeypatch=monkeypatch, capsys=capsys)
    assert f"file {rel} listed in the manifest is missing" in line


def test_missing_manifest_refused(artifact, tmp_path, monkeypatch, capsys):
    d = _copy(artifact, tmp_path)
    (d / "manifest.json").unlink()
    assert "no manifest.json" in _refused(d, d, verify=False, monkeypatch=monkeypatch, capsys=capsys)


def test_older_format_refused_with_a_clear_error(artifact, tmp_path, monkeypatch, capsys):
    d = _copy(artifact, tmp_path)
    m = json.loads((d / "manifest.json").read_text())
    m["format_version"] = 1
    m.pop("manifest_sha256")
    (d / "manifest.json").write_text(json.dumps(m))
    line = _refused(d, d / "manifest.json", verify=False, monkeypatch=monkeypatch, capsys=capsys)
    assert f"artifact format version 1 is not the one this kiln reads ({FORMAT_VERSION}); compile the model again" in line
