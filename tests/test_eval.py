"""Perplexity through the KV cache in chunks, with a sliding window, and `kiln eval`."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import llama_cpp_python, needs_llama_cpp


@pytest.fixture(scope="module")
def llama(compiled_family):
    from kiln import runtime
    return runtime.load(compiled_family("llama"))


def _nll(logits, ids, targets):
    """Summed negative log-likelihood of ids[t] for t in targets, from logits[t - 1]."""
    rows = logits[np.asarray(targets) - 1].astype(np.float64)
    m = rows.max(-1, keepdims=True)
    logp = rows - m - np.log(np.exp(rows - m).sum(-1, keepdims=True))
    return -logp[np.arange(len(targets)), np.asarray(ids)[targets]].sum()


def test_chunks_through_the_cache_equal_one_pass(llama):
    ids = list(np.random.default_rng(1).integers(0, 256, 60))
    whole = llama.logits([ids])[0]
    want = float(np.exp(_nll(whole, ids, list(range(1, 60))) / 59))
    for chunk in (1, 7, 256):
        r = llama.evaluate(ids, chunk=chunk)
        assert r["tokens"] == 59 and r["window"] == 128
        assert r["perplexity"] == pytest.approx(want, rel=2e-6)


@pytest.mark.parametrize("window, stride", [(16, 8), (16, 16), (10, 3)])
def test_sliding_window_scores_each_token_once_with_its_window_before_it(llama, window, stride):
    ids = list(np.random.default_rng(2).integers(0, 256, 41))
    nll, scored, done, begin = 0.0, 0, 1, 0
    while done < len(ids):
        end = min(begin + window, len(ids))
        logits = llama.logits([ids[begin:end]])[0]
        targets = [t for t in range(max(done, begin + 1), end)]
        nll += _nll(logits, ids[begin:end], [t - begin for t in targets])
        scored += len(targets)
        done, begin = end, begin + stride
    r = llama.evaluate(ids, window=window, stride=stride, chunk=4)
    # every token after the first, except a window's first when windows do not overlap
    assert r["tokens"] == scored == (40 if stride < window else 38)
    assert r["perplexity"] == pytest.approx(float(np.exp(nll / scored)), rel=2e-6)
    # a window shorter than the text sees less context, so it scores differently
    assert r["perplexity"] != pytest.approx(llama.perplexity(ids), rel=1e-4)


@pytest.mark.parametrize("window, stride, message", [(1, None, "window must be at least 2 tokens, got 1"),
                                                     (16, 17, "stride must be between 1 and the window (16), got 17")])
def test_bad_windows(llama, window, stride, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        llama.evaluate(list(range(30)), window=window, stride=stride)


def _text(tmp_path) -> Path:
    import pydoc_data.topics as topics
    p = tmp_path / "topics.txt"
    p.write_text("\n\n".join(topics.topics[k] for k in sorted(topics.topics)), encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def smollm2(smollm2_artifact):
    return smollm2_artifact


def test_kiln_eval_prints_the_perplexity(smollm2, tmp_path):
    from kiln import runtime
    text = _text(tmp_path)
    out = subprocess.run([sys.executable, "-m", "kiln.cli", "eval", str(smollm2), "--text", str(text),
                          "--max-tokens", "300", "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    line, js = out.stdout.strip().splitlines()
    figures = json.loads(js)
    model = runtime.load(smollm2)
    ids = model.tokenizer.encode(text.read_text())[:300]
    assert figures["tokens"] == 299 and figures["perplexity"] == pytest.approx(model.perplexity(ids), rel=1e-6)
    assert line.startswith(f"perplexity {figures['perplexity']:.4f} over 299 tokens (window 8192, stride 4096), ")
    missing = subprocess.run([sys.executable, "-m", "kiln.cli", "eval", str(smollm2), "--text", str(tmp_path / "none.txt")],
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and missing.stderr == f"kiln: {tmp_path / 'none.txt'}: cannot read: No such file or directory\n"


@needs_llama_cpp
def test_perplexity_equals_llama_cpps_on_the_same_gguf(smollm2, smollm2_gguf, tmp_path):
    from kiln import runtime
    model = runtime.load(smollm2)
    ids = model.tokenizer.encode(_text(tmp_path).read_text())[:1000]
    (tmp_path / "ids.json").write_text(json.dumps(ids))
    out = subprocess.run([llama_cpp_python(), str(Path(__file__).parent / "llama_cpp_perplexity.py"),
                          str(smollm2_gguf), str(tmp_path / "ids.json")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    theirs = json.loads(out.stdout.strip().splitlines()[-1])
    # measured: kiln 12.7482, llama.cpp 0.3.36 12.8000 (0.41%; llama.cpp's own int8 dot products)
    assert abs(model.perplexity(ids) / theirs - 1) <= 0.005
