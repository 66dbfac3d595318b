"""Against llama.cpp's own tools: kiln's importance-weighted quantization equals
``llama-quantize --imatrix`` byte for byte, and ``kiln imatrix`` collects what ``llama-imatrix``
collects.

Optional peers, never kiln dependencies: runs when KILN_LLAMA_QUANTIZE (and, for the
collection test, KILN_LLAMA_IMATRIX) name the binaries of a build of the vendored llama.cpp:

    cmake -S llama.cpp -B build -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF
    cmake --build build --target llama-quantize llama-imatrix
    KILN_LLAMA_QUANTIZE=build/bin/llama-quantize KILN_LLAMA_IMATRIX=build/bin/llama-imatrix pytest ...
"""
import os
import subprocess

import numpy as np
import pytest
from test_llama_cpp_quantize import FTYPES, assert_same_tensors, smollm2_f32  # noqa: F401 (a fixture)
from test_quantize import make_wide_llama

from kiln import imatrix, imatrix_file
from kiln.driver import convert, load_model
from kiln.frontends.gguf_file import read_gguf

QUANTIZE = os.environ.get("KILN_LLAMA_QUANTIZE")
IMATRIX = os.environ.get("KILN_LLAMA_IMATRIX")
needs_quantize = pytest.mark.skipif(not QUANTIZE, reason="set KILN_LLAMA_QUANTIZE to a llama-quantize binary")
needs_imatrix = pytest.mark.skipif(not IMATRIX, reason="set KILN_LLAMA_IMATRIX to a llama-imatrix binary")


def run(*args):
    out = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """The random 8-layer llama of test_quantize as an F32 GGUF, and an importance matrix
    kiln collected on it from random tokens."""
    d = tmp_path_factory.mktemp("wide")
    folder = make_wide_llama(d / "hf")
    gguf = d / "wide-f32.gguf"
    convert(folder, gguf, to="gguf", dtype="f32")
    ids = list(np.random.default_rng(7).integers(0, 512, 96))
    imatrix_file.write(d / "im.gguf", imatrix.collect(load_model(folder), ids, ctx=32, dataset="random ids"))
    return gguf, d / "im.gguf"


@needs_quantize
@pytest.mark.parametrize("quant", ["q4_k_m", "q3_k_s", "q2_k_m", "q3_k_m", "q5_k_s", "q6_k", "q4_0", "q5_1"])
def test_imatrix_quantization_equals_llama_quantize(wide, tmp_path, quant):
    src, im = wide
    convert(src, tmp_path / "kiln.gguf", to="gguf", quant=quant, imatrix=im)
    # a bare type is one type for every matrix: llama-quantize --pure
    if quant in FTYPES:
        run(QUANTIZE, "--imatrix", im, src, tmp_path / "llama.gguf", FTYPES[quant], 2)
    else:
        run(QUANTIZE, "--pure", "--imatrix", im, src, tmp_path / "llama.gguf", quant.upper(), 2)
    assert_same_tensors(tmp_path / "kiln.gguf", tmp_path / "llama.gguf")
    ours, theirs = read_gguf(tmp_path / "kiln.gguf").metadata, read_gguf(tmp_path / "llama.gguf").metadata
    for key in ("quantize.imatrix.file", "quantize.imatrix.dataset", "quantize.imatrix.entries_count",
                "quantize.imatrix.chunks_count"):
        assert ours[key] == theirs[key], key


@needs_quantize
@pytest.mark.parametrize("quant", ["q4_k_m", "q3_k_s"])
def test_smollm2_imatrix_quantization_equals_llama_quantize(smollm2_f32, tmp_path, quant):
    """A real model (rows of 576 fall back to Q5_0/Q4_0, of 1536 stay K-quants) with an
    importance matrix kiln collected from two short windows of text."""
    text = " ".join(f"Sentence {i} says what an importance matrix is for." for i in range(40))
    model = load_model(smollm2_f32)
    im = tmp_path / "im.gguf"
    imatrix_file.write(im, imatrix.collect(model, imatrix.tokenize(model, text), ctx=64, chunks=2, dataset="t"))
    convert(smollm2_f32, tmp_path / "kiln.gguf", to="gguf", quant=quant, imatrix=im)
    run(QUANTIZE, "--imatrix", im, smollm2_f32, tmp_path / "llama.gguf", FTYPES[quant], 2)
    counts = assert_same_tensors(tmp_path / "kiln.gguf", tmp_path / "llama.gguf")
    assert sum(counts.values()) == 272


@needs_imatrix
def test_kiln_imatrix_collects_what_llama_imatrix_does(smollm2_gguf, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"Line {i}: the importance of each column is its mean squared input." for i in range(60)))
    run(IMATRIX, "-m", smollm2_gguf, "-f", text, "-c", 64, "--chunks", 3, "-o", tmp_path / "llama.gguf",
        "--no-ppl", "-t", 2)
    model = load_model(smollm2_gguf)
    ids = imatrix.tokenize(model, text.read_text(), text)
    ours = imatrix.collect(model, ids, ctx=64, chunks=3)
    theirs = imatrix_file.read(tmp_path / "llama.gguf")
    assert set(ours.entries) == set(theirs.entries)
    assert (ours.chunk_count, ours.chunk_size) == (theirs.chunk_count, theirs.chunk_size)
    for name, e in theirs.entries.items():
        assert list(ours.entries[name].counts) == list(e.counts), name
        # llama.cpp multiplies Q4_1 weights by 8-bit activations and keeps K/V in f16, kiln's
        # interpreter all in float32: a few columns differ by ~10%; whole entries measured 0.35%
        # (median) to 2.3% (worst) apart
        a, b = ours.importance(name), theirs.importance(name)
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 0.05, name
