"""The benchmark scripts (benchmarks/): what they time and how they fail, on kiln itself.

The peers' own venvs are not needed here: kiln is timed by the same peers.py, and a peer that
cannot run is played by an engine missing from this venv or by a Python that fails.
"""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, SMOLLM2_REFERENCE

BENCH = REPO / "benchmarks"


@pytest.fixture(scope="module")
def artifact(smollm2_artifact):
    return smollm2_artifact


def _run(*args, env=None):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=600,
                          env=env, cwd=REPO)


def test_peers_times_kiln_as_asked(artifact):
    proc = _run(BENCH / "peers.py", "kiln", artifact, "--threads", "1", "--repeats", "2", "--tokens", "4",
                "--prefill-tokens", "12")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (r["engine"], r["threads"], r["repeats"], r["prefill_tokens"], r["decode_tokens"]) == ("kiln", 1, 2, 12, 4)
    assert len(r["prefill_s"]) == len(r["decode_s"]) == 2
    assert r["prefill"]["runs_tokens_per_s"] == [12 / s for s in r["prefill_s"]]
    assert r["decode"]["runs_tokens_per_s"] == [4 / s for s in r["decode_s"]]
    assert r["decode"]["tokens_per_s"] == sum(4 / s for s in r["decode_s"]) / 2      # the median of two
    # the prompt's greedy token and the 4 timed steps: transformers' greedy tokens
    greedy = json.loads(SMOLLM2_REFERENCE.read_text())["generations"][0]["greedy_ids"]
    assert r["greedy"] == greedy[:5]


def test_peers_says_when_an_engine_is_missing(tmp_path):
    proc = _run(BENCH / "peers.py", "onnxruntime-genai", tmp_path, "--tokens", "2")
    assert proc.returncode == 3
    assert proc.stderr.startswith(f"peers.py: onnxruntime-genai is not installed in {sys.executable}")
    proc = _run(BENCH / "peers.py", "llama.cpp", tmp_path / "none.gguf")
    assert proc.returncode == 2 and "none.gguf: no such file or folder" in proc.stderr


def test_decode_bench_fails_with_the_peers_error(artifact, tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    failing = tmp_path / "python"
    failing.write_text("#!/bin/sh\necho 'no llama here' >&2\nexit 7\n")
    failing.chmod(0o755)
    common = [BENCH / "decode_bench.py", artifact, "--gguf", gguf, "--repeats", "1", "--tokens", "2",
              "--prefill-tokens", "4", "--threads", "1"]
    proc = _run(*common, "--llama-cpp-python", failing)
    assert proc.returncode == 1
    assert "decode_bench: llama.cpp: exit status 7" in proc.stderr and "no llama here" in proc.stderr
    proc = _run(*common, "--llama-cpp-python", failing, "--skip-missing", "--json", tmp_path / "r.json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "r.json").read_text())
    assert [r["engine"] for r in result["rows"]] == ["kiln"]
    assert "exit status 7" in result["skipped"]["llama.cpp"]
    assert result["rows"][0]["decode_runs"] == [result["rows"][0]["decode_tokens_per_s"]]
    # a peer asked for without a Python for it
    env = {k: v for k, v in os.environ.items() if k != "KILN_LLAMA_CPP_PYTHON"}
    proc = _run(*common, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("decode_bench: llama.cpp: no Python for it: give --llama-cpp-python "
                                   "or set KILN_LLAMA_CPP_PYTHON")


def test_ladder_models_have_the_real_shapes_and_stream_the_same_rows():
    """benchmarks/make_ladder.py: the 1B/3B/8B shapes (Llama 3.2 1B/3B and Llama 3.1 8B layers with
    SmolLM2's 49,152-token vocabulary and a tied head), weights never built whole, and the
    same values whichever row ranges a writer asks for."""
    import importlib.util

    import numpy as np
    spec = importlib.util.spec_from_file_location("make_ladder", BENCH / "make_ladder.py")
    ladder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ladder)
    params = {size: ladder.ladder_model(size)[1] for size in ("1b", "3b", "8b")}
    assert [round(params[s] / 1e9, 2) for s in ("1b", "3b", "8b")] == [1.07, 2.97, 7.18]
    model, _ = ladder.ladder_model("1b")
    w = model.weights["layers.0.gate.weight"]
    assert w.shape == (8192, 2048)
    whole = np.concatenate([c.view(np.float32) for c in w.raw_chunks(max_bytes=3 << 20)])
    parts = np.concatenate([w._load_rows(a, min(a + 700, 1500)) for a in range(0, 1500, 700)])
    np.testing.assert_array_equal(parts, whole[:1500 * 2048])
    assert 0.018 < whole.std() < 0.022 and model.weights["layers.0.attn_norm"].numpy().tolist() == [1.0] * 2048


@pytest.mark.parametrize("scheme", ["q4_0", "q4_k_m", "q8_0"])
def test_ladder_random_blocks_are_finite_and_of_the_schemes_types(scheme):
    import importlib.util

    import numpy as np

    from kiln import quant_schemes
    spec = importlib.util.spec_from_file_location("make_ladder", BENCH / "make_ladder.py")
    ladder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ladder)
    model, _ = ladder.ladder_model("1b", scheme)
    for role in ("layers.0.v.weight", "layers.5.down.weight", "embed"):
        w = model.weights[role]
        assert w.format.name == quant_schemes.get(scheme).gguf_type(role, w.shape, None if scheme != "q4_k_m" else
                                                                     quant_schemes.Layout(16, gqa=4, tied=True))
        rows = w.format.dequantize(np.asarray(w._load_rows(0, 64)).reshape(64, -1), (64, w.shape[1]))
        assert np.isfinite(rows).all() and 0.003 < rows.std() < 0.2


def test_ladder_moe_rungs_have_their_families_shapes():
    """The MoE rungs: OLMoE's shape (q/k norms over the whole projection, no renormalised
    routing) and a 12-layer Qwen3-30B-A3B shape (per-head q/k norms of 128, 128 experts of
    width 768, 8 active, renormalised)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_ladder", BENCH / "make_ladder.py")
    ladder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ladder)
    olmoe, params = ladder.ladder_model("olmoe")
    assert round(params / 1e9, 2) == 6.91 and olmoe.config["family"] == "olmoe"
    assert olmoe.weights["layers.0.q_norm"].shape == (2048,)
    qwen, params = ladder.ladder_model("qwen3moe", "q4_0")
    assert round(params / 1e9, 2) == 7.68 and qwen.config["family"] == "qwen3_moe"
    assert qwen.config["expert_norm_topk"] and qwen.config["num_experts"] == 128
    w = qwen.weights
    assert w["layers.11.experts.down.weight"].shape == (128, 2048, 768)
    assert w["layers.0.q.weight"].shape == (4096, 2048) and w["layers.0.k.weight"].shape == (512, 2048)
    assert w["layers.0.q_norm"].shape == (128,) and w["layers.0.experts.gate.weight"].format.name == "q4_0"
