"""Folder outputs replace their destination whole, so a folder that is not an earlier output
of the same kind (somebody's documents) is refused, and nothing in it is touched."""
import subprocess
import sys

import pytest

from conftest import HF_FIXTURES


@pytest.mark.parametrize("args, marker", [
    (["compile", str(HF_FIXTURES / "llama"), "-o"], "manifest.json"),
    (["convert", str(HF_FIXTURES / "llama"), "--to", "hf"], "config.json"),
    (["convert", str(HF_FIXTURES / "llama"), "--to", "onnx"], "kiln_io.json"),
])
def test_a_foreign_folder_is_not_replaced(tmp_path, args, marker):
    dest = tmp_path / "notes"
    dest.mkdir()
    (dest / "thesis.txt").write_text("years of work")
    cmd = [sys.executable, "-m", "kiln.cli", *args[:2]]
    cmd += [*args[2:], str(dest)] if args[0] == "compile" else [str(dest), *args[2:]]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert out.stderr == (f"kiln: {dest}: is a folder with other files in it (no {marker}, so not an "
                          "earlier output of this kind); kiln replaces its destination whole, so "
                          "choose a new or empty folder\n")
    assert sorted(p.name for p in dest.iterdir()) == ["thesis.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]          # no staging left behind
    # an empty folder, or an earlier output of the same kind, is replaced as before
    (dest / "thesis.txt").unlink()
    assert subprocess.run(cmd, capture_output=True, timeout=300).returncode == 0
    assert (dest / marker).is_file()
    assert subprocess.run(cmd, capture_output=True, timeout=300).returncode == 0
