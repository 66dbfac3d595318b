"""Packaging and import boundaries (DESIGN.md, Layout)."""
import subprocess
import sys
import zipfile

from conftest import REPO

FOLDERS = {"compiler": "kiln", "frontends": "kiln/frontends", "passes": "kiln/passes",
           "targets": "kiln/targets", "runtime": "kiln/runtime"}


def test_runtime_imports_nothing_heavy(tmp_path):
    code = ("import sys, kiln.runtime, kiln.runtime.model, kiln.runtime.onnxrt_session\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('onnx', 'tvm') or "
            "m.startswith(('kiln.frontends', 'kiln.targets', 'kiln.passes', 'kiln.driver'))]\n"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_wheel_contains_every_module(tmp_path):
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path), str(REPO)],
                   check=True, capture_output=True)
    wheel = next(tmp_path.glob("kiln-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"{FOLDERS[p.relative_to(REPO).parts[0]]}/{'/'.join(p.relative_to(REPO).parts[1:])}"
                for folder in FOLDERS for pattern in ("*.py", "*.html") for p in (REPO / folder).rglob(pattern)}
    assert "kiln/runtime/web/chat.html" in expected        # kiln serve's chat page is package data
    missing = sorted(expected - names)
    assert not missing, f"files missing from the wheel: {missing}"
