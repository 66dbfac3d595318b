"""The default backend (targets/presets.py choose_backend): TVM on every target, ONNX Runtime when
TVM is not installed (a one-line notice, or a warning from the Python API), and a one-line
error when TVM is asked for by name and missing. "Not installed" is simulated with
``sys.modules["tvm"] = None``, which makes both finding and importing the package fail."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import HF_FIXTURES
from kiln.errors import KilnError
from kiln.targets import presets

LLAMA = HF_FIXTURES / "llama"
# kiln's CLI in a child where TVM cannot be imported
NO_TVM_CLI = "import sys; sys.modules['tvm'] = None; from kiln.cli import main; sys.exit(main(sys.argv[1:]))"


def _no_tvm():
    raise AssertionError("TVM's presence was checked for a backend that does not need it")


@pytest.mark.parametrize("target", presets.names())
def test_every_target_defaults_to_tvm(target):
    preset = presets.resolve(target)
    assert preset.default_backend == "tvm" and "tvm" in preset.backends
    assert presets.choose_backend(preset, None, tvm_here=lambda: True) == ("tvm", None)
    # named, each backend is taken as it is; ONNX Runtime never asks whether TVM is there
    if "onnxrt" in preset.backends:
        assert presets.choose_backend(preset, "onnxrt", tvm_here=_no_tvm) == ("onnxrt", None)


def test_without_tvm_the_default_falls_back_to_onnx_runtime():
    cpu = presets.resolve("cpu")
    assert presets.choose_backend(cpu, None, tvm_here=lambda: False) == ("onnxrt", presets.TVM_FALLBACK)
    assert "\n" not in presets.TVM_FALLBACK and "--backend onnxrt" in presets.TVM_FALLBACK
    # asked for by name, or on a target with nothing else (metal), a missing TVM is an error
    for preset, backend in ((cpu, "tvm"), (presets.resolve("metal"), None)):
        with pytest.raises(ValueError, match="the TVM backend needs Apache TVM: pip install 'kiln\\[tvm\\]'"):
            presets.choose_backend(preset, backend, tvm_here=lambda: False)


def test_tvm_installed_looks_without_importing(monkeypatch):
    assert presets.tvm_installed()                     # scripts/setup.sh installs the tvm extra
    monkeypatch.setitem(sys.modules, "tvm", None)
    assert not presets.tvm_installed()


def test_python_api_falls_back_with_a_warning(tmp_path, monkeypatch):
    import kiln
    from kiln import runtime
    monkeypatch.setitem(sys.modules, "tvm", None)
    with pytest.warns(UserWarning, match="Apache TVM is not installed, so this builds with ONNX Runtime"):
        art = kiln.compile(LLAMA, output=tmp_path / "a.kiln")
    model = runtime.load(art)
    assert model.manifest["backend"]["name"] == "onnxrt"
    ref = np.load(LLAMA / "reference.npz")
    np.testing.assert_allclose(model.logits(ref["input_ids"]), ref["logits"], rtol=0, atol=3e-6)
    # a caller that takes notices gets the line instead of a warning
    notices = []
    kiln.compile(LLAMA, output=tmp_path / "b.kiln", on_notice=notices.append)
    assert notices == [presets.TVM_FALLBACK]
    # TVM named: a one-line error, nothing written
    with pytest.raises(KilnError, match="the TVM backend needs Apache TVM") as e:
        kiln.compile(LLAMA, output=tmp_path / "c.kiln", backend="tvm")
    assert "\n" not in str(e.value) and not (tmp_path / "c.kiln").exists()


def test_cli_without_tvm_notices_or_refuses_in_one_line(tmp_path):
    def compile_(*args):
        return subprocess.run([sys.executable, "-c", NO_TVM_CLI, "compile", str(LLAMA), *args], capture_output=True,
                              text=True, timeout=300)
    p = compile_("-o", tmp_path / "a.kiln", "-q")
    assert p.returncode == 0, p.stderr
    # the notice is one line, whatever the width ("wrote PATH ..." after it may wrap at 80)
    notice, wrote = p.stderr.split("\n", 1)
    assert notice == f"kiln: {presets.TVM_FALLBACK}" and wrote.startswith("wrote ")
    assert json.loads((tmp_path / "a.kiln" / "manifest.json").read_text())["backend"]["name"] == "onnxrt"
    p = compile_("--backend", "tvm", "-o", tmp_path / "b.kiln")
    assert p.returncode == 2 and p.stderr == f"kiln: {presets.TVM_MISSING}\n", p.stderr
    assert not (tmp_path / "b.kiln").exists()


def test_compile_help_names_the_default():
    p = subprocess.run([sys.executable, "-m", "kiln.cli", "compile", "--help"], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "COLUMNS": "200"})
    assert p.returncode == 0, p.stderr
    assert "default: tvm where installed, else onnxrt" in p.stdout
