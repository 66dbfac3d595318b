"""The CLI's output read by programs: whole lines in a pipe (no wrapping at the terminal's
width, whatever COLUMNS says), ``kiln inspect --json`` and ``--tensors``, and an artifact's
summary as text rather than Python dicts."""
import json
import os
import subprocess
import sys

import pytest

from conftest import HF_FIXTURES

LLAMA = HF_FIXTURES / "llama"


def kiln(*args, columns="20"):
    # a narrow terminal's COLUMNS, and stdout a pipe, as in `kiln inspect X | grep`
    env = {**os.environ, "KILN_DEBUG": "", "COLUMNS": columns}
    r = subprocess.run([sys.executable, "-m", "kiln.cli", *map(str, args)], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """A folder under a long path, with the fixture as GGUF, safetensors and an artifact."""
    root = tmp_path_factory.mktemp("out")
    for part in ("a-rather-long-folder-name-for-a-project", "models", "converted-with-kiln-for-testing"):
        root = root / part
    root.mkdir(parents=True)
    kiln("convert", LLAMA, root / "m.gguf", "--to", "gguf", "-q")
    kiln("convert", LLAMA, root / "m.safetensors", "--to", "safetensors", "-q")
    # ONNX Runtime named: these tests read inspect's text about an artifact, and the one-second
    # build's files (model.onnx, model.onnx.data) are what they check for
    kiln("compile", LLAMA, "--backend", "onnxrt", "-o", root / "m.kiln", "-q")
    return root


def grep(text, word):
    return [line for line in text.splitlines() if word in line]


@pytest.mark.parametrize("name", ["m.gguf", "m.safetensors", "hf"])
def test_piped_lines_are_whole(deep, name):
    path = LLAMA if name == "hf" else deep / name
    out = kiln("inspect", path, "--tensors")
    assert len(grep(out, str(path))) == 1                 # the title line, path and all
    assert grep(out, str(path))[0].startswith(f"{path}: ")
    q_proj = "blk.1.attn_q.weight" if name == "m.gguf" else "model.layers.1.self_attn.q_proj.weight"
    q = grep(out, q_proj)
    assert len(q) == 1 and q[0].split() == [q_proj, "f32", "64x64", "16,384", "bytes"]
    if name != "m.safetensors":
        ops = grep(out, "graph:")
        assert len(ops) == 1 and "MatMul 19" in ops[0] and ops[0].rstrip().endswith("Where 1")


def test_the_tensor_listing_has_every_tensor(deep):
    out = kiln("inspect", deep / "m.gguf", "--tensors")
    assert len([line for line in grep(out, " bytes") if line.endswith(" bytes")]) == 21


def test_inspect_json(deep):
    info = json.loads(kiln("inspect", deep / "m.gguf", "--json"))
    assert info["format"] == "gguf" and info["version"] == 3
    assert info["metadata"]["llama.block_count"] == 2
    assert len(info["tensors"]) == 21
    assert {"name": "output_norm.weight", "type": "f32", "shape": [64], "bytes": 256} in info["tensors"]
    assert info["graph"]["ops"]["MatMul"] == 19

    info = json.loads(kiln("inspect", LLAMA, "--json"))
    assert info["format"] == "hf" and info["architecture"] == "llama" and info["config"]["num_layers"] == 2

    info = json.loads(kiln("inspect", deep / "m.kiln", "--json"))
    assert info["format"] == "kiln artifact" and info["backend"]["name"] == "onnxrt"
    assert info["target"]["device"] == "cpu" and "model.onnx" in info["files"]


def test_artifact_summary_is_text(deep):
    out = kiln("inspect", deep / "m.kiln", "--tensors")
    assert "{" not in out and "'" not in out, out
    assert grep(out, "target cpu (cpu")
    assert grep(out, "pass attention:")[0].split() == ["pass", "attention:", "attention=2"]
    files = [line for line in grep(out, " bytes") if line.endswith(" bytes")]
    assert {line.split()[0] for line in files} == {"model.onnx", "model.onnx.data"}
