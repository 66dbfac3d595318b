"""kiln's GGUF quantization equals llama.cpp's own, byte for byte, tensor by tensor.

llama.cpp's quantizer (``llama_model_quantize``, what ``llama-quantize`` runs) and
``kiln convert --to gguf --quant`` start from the same F32 GGUF; every tensor must get the same
type and the same bytes. Runs when llama-cpp-python is importable here, or when
KILN_LLAMA_CPP_PYTHON names a Python that has it (a peer venv: never a kiln dependency).
"""
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import llama_cpp_python, needs_llama_cpp

from kiln.driver import convert
from kiln.frontends.gguf_file import read_gguf

HERE = Path(__file__).parent


_llama_python = llama_cpp_python
pytestmark = needs_llama_cpp

# kiln's name -> llama.cpp's file type name (kiln's q2_k_m is llama.cpp's Q2_K mixture)
FTYPES = {"q4_k_m": "Q4_K_M", "q4_k_s": "Q4_K_S", "q5_k_m": "Q5_K_M", "q5_k_s": "Q5_K_S", "q6_k": "Q6_K",
          "q3_k_s": "Q3_K_S", "q3_k_m": "Q3_K_M", "q3_k_l": "Q3_K_L", "q2_k_m": "Q2_K"}


def llama_quantize(src, dst, ftype):
    out = subprocess.run([_llama_python(), str(HERE / "llama_cpp_quantize.py"), str(src), str(dst), ftype],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]


def assert_same_tensors(ours, theirs) -> dict:
    a, b = read_gguf(ours), read_gguf(theirs)
    assert set(a.tensors) == set(b.tensors)         # llama.cpp writes them sorted by layer, then name
    counts = {}
    for name, t in b.tensors.items():
        mine = a.tensors[name]
        assert mine.format.name == t.format.name, (name, mine.format.name, t.format.name)
        assert np.array_equal(mine.raw(), t.raw()), name
        counts[t.format.name] = counts.get(t.format.name, 0) + 1
    assert a.metadata["general.file_type"] == b.metadata["general.file_type"]
    return counts


@pytest.fixture(scope="module")
def wide_f32(tmp_path_factory):
    """The random 8-layer llama of test_quantize (rows of 256 and 512, gqa 4) as an F32 GGUF."""
    from test_quantize import make_wide_llama
    d = tmp_path_factory.mktemp("wide")
    gguf = d / "wide-f32.gguf"
    convert(make_wide_llama(d / "hf"), gguf, to="gguf", dtype="f32")
    return gguf


@pytest.fixture(scope="module")
def smollm2_f32(smollm2_gguf, tmp_path_factory):
    """SmolLM2 as bf16 safetensors (the Q4_1 GGUF's values), then an F32 GGUF: 30 layers, tied
    embedding, rows of 576 (not whole super-blocks: llama.cpp's fallback types) and 1536."""
    d = tmp_path_factory.mktemp("smollm2")
    convert(smollm2_gguf, d / "hf", to="hf", dtype="bf16")
    gguf = d / "smollm2-f32.gguf"
    convert(d / "hf", gguf, to="gguf", dtype="f32")
    return gguf


@pytest.mark.parametrize("quant", list(FTYPES))
def test_every_mixture_equals_llama_cpp_on_a_wide_model(wide_f32, tmp_path, quant):
    convert(wide_f32, tmp_path / "kiln.gguf", to="gguf", quant=quant)
    llama_quantize(wide_f32, tmp_path / "llama.gguf", FTYPES[quant])
    assert_same_tensors(tmp_path / "kiln.gguf", tmp_path / "llama.gguf")


@pytest.mark.parametrize("quant", ["q4_k_m", "q6_k"])
def test_smollm2_equals_llama_cpp(smollm2_f32, tmp_path, quant):
    convert(smollm2_f32, tmp_path / "kiln.gguf", to="gguf", quant=quant)
    llama_quantize(smollm2_f32, tmp_path / "llama.gguf", FTYPES[quant])
    counts = assert_same_tensors(tmp_path / "kiln.gguf", tmp_path / "llama.gguf")
    assert counts == {"q4_k_m": {"f32": 61, "q8_0": 15, "q5_0": 166, "q6_k": 14, "q4_k": 16},
                      "q6_k": {"f32": 61, "q8_0": 181, "q6_k": 30}}[quant]
