"""The TVM backend (``--backend tvm``): every fixture family against transformers' outputs,
its KV cache (ragged rows, joining rows, reordering), and its builds for other devices.

CPU artifacts are built and run here. CUDA and Metal artifacts are built without the device
(this machine has neither): the checks read their device code and manifest. The aarch64
(NEON) build is cross-compiled and exported as objects to link on that machine.
"""
import json

import numpy as np
import pytest
from conftest import ALL_FAMILIES, greedy_decode

from kiln import runtime
from kiln.driver import compile as kiln_compile
from kiln.errors import KilnError

# Max |error| measured against transformers per family: 1.2e-7 (gpt2) to 2.4e-7 (gemma, qwen2)
# over the 12-token batch; the online softmax adds rounding only. Bound 10x the worst.
BOUND = 3e-6


@pytest.fixture(scope="module")
def compiled(compiled_family):
    # TVM named: these tests are about this backend whatever the default is (the default's
    # artifacts are the same ones, shared with test_hf_families.py and others)
    return lambda family, target="cpu": compiled_family(family, "tvm", target)


def _greedy_sequence(ref):
    ids = np.concatenate([ref["prompt"][0], ref["greedy"][:-1]])[None]
    return ids, ref["prompt"].shape[1] - 1


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_family_matches_transformers(compiled, hf_fixture, family):
    model = runtime.load(compiled(family))
    assert model.manifest["backend"]["name"] == "tvm"
    ref = np.load(hf_fixture(family) / "reference.npz")
    np.testing.assert_allclose(model.logits(ref["input_ids"]), ref["logits"], rtol=0, atol=BOUND)
    ids, start = _greedy_sequence(ref)
    np.testing.assert_allclose(model.logits(ids)[0, start:], ref["greedy_logits"], rtol=0, atol=BOUND)
    tokens, logits = greedy_decode(model.session, ref["prompt"], 16)
    assert tokens == ref["greedy"].tolist()
    np.testing.assert_allclose(logits, ref["greedy_logits"], rtol=0, atol=BOUND)


def test_positions_mode_follows_the_graph(compiled):
    # rotary models keep per-row positions; gpt2's learned positions read the cache length
    llama = json.loads((compiled("llama") / "manifest.json").read_text())["backend"]["kv_cache"]
    gpt2 = json.loads((compiled("gpt2") / "manifest.json").read_text())["backend"]["kv_cache"]
    assert llama["mode"] == "rows" and gpt2["mode"] == "uniform"
    assert "reads" in gpt2["why_uniform"] or "output" in gpt2["why_uniform"]


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_ragged_prefill_equals_each_prompt_alone(compiled, family):
    model = runtime.load(compiled(family))
    prompts = [[5, 9, 13], [7, 1, 2, 3, 4, 8, 11], [42]]
    alone = []
    for p in prompts:
        tokens, logits = greedy_decode(model.session, [p], 6)
        alone.append((tokens, logits))
    s = model.session
    s.reset(3)
    last = s.prefill(prompts)[:, -1]
    rows = [[int(np.argmax(last[b]))] for b in range(3)]
    steps = [last]
    for _ in range(5):
        out = s.forward(np.array([[r[-1]] for r in rows]), last_only=True)[:, -1]
        steps.append(out)
        for b in range(3):
            rows[b].append(int(np.argmax(out[b])))
    for b in range(3):
        assert rows[b] == alone[b][0]
        np.testing.assert_allclose(np.stack([st[b] for st in steps]), alone[b][1], rtol=0, atol=1e-5)


def test_rows_join_and_leave_a_running_batch(compiled):
    model = runtime.load(compiled("qwen2"))
    s = model.session
    first, _ = greedy_decode(s, [[3, 4, 5]], 5)
    second, _ = greedy_decode(s, [[9, 8, 7, 6, 5, 4]], 3)
    s.start_rows(4)
    t0 = int(np.argmax(s.join_row(2, [3, 4, 5])))
    got0 = [t0]
    # row 2 decodes two tokens alone, then row 0 joins with a longer prompt
    for _ in range(2):
        got0.append(int(np.argmax(s.step(np.array([0, 0, got0[-1], 0]), np.array([0, 0, 1, 0], bool))[2])))
    got1 = [int(np.argmax(s.join_row(0, [9, 8, 7, 6, 5, 4])))]
    for _ in range(2):
        out = s.step(np.array([got1[-1], 0, got0[-1], 0]), np.array([1, 0, 1, 0], bool))
        got0.append(int(np.argmax(out[2])))
        got1.append(int(np.argmax(out[0])))
    assert got0 == first and got1 == second
    s.free_row(2)
    assert s.lengths.tolist() == [8, 0, 0, 0]


def test_reorder_rows_moves_whole_rows(compiled):
    model = runtime.load(compiled("llama"))
    s = model.session
    s.reset(2)
    s.prefill([[1, 2, 3], [4, 5, 6, 7]])
    s.reorder_rows([1, 1])
    out = s.forward(np.array([[9], [9]]), last_only=True)[:, -1]
    s.reset(1)
    alone = s.forward(np.array([[4, 5, 6, 7, 9]]), last_only=True)[0, -1]
    np.testing.assert_allclose(out[0], alone, rtol=0, atol=1e-5)
    np.testing.assert_allclose(out[1], alone, rtol=0, atol=1e-5)


def test_logits_kept_by_the_caller_survive_later_calls(compiled):
    # on the CPU a call's logits are a view of the VM's output tensor, not a copy: holding them
    # must keep that memory from being reused by the next call
    s = runtime.load(compiled("llama")).session
    s.reset(1)
    first = s.forward(np.array([[1, 2, 3]]), last_only=True)
    kept = first.copy()
    for t in (4, 5, 6, 7):
        s.forward(np.array([[t]]), last_only=True)
    s.reset(1)
    s.forward(np.array([[9, 9, 9, 9]]))
    np.testing.assert_array_equal(first, kept)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_long_prompt_in_chunks_equals_one_run(compiled, family, monkeypatch):
    # prompts longer than PREFILL_CHUNK run a chunk at a time (the VM's pool then holds one
    # chunk's activations): the logits are those of one run, in both position modes
    from kiln.runtime import tvm_session
    s = runtime.load(compiled(family)).session
    ids = np.array([[(7 * i + 3) % 100 + 1 for i in range(13)]])
    s.reset(1)
    whole = s.forward(ids).copy()
    monkeypatch.setattr(tvm_session, "PREFILL_CHUNK", 4)
    s.reset(1)
    chunked = s.forward(ids)
    assert chunked.shape == whole.shape
    np.testing.assert_allclose(chunked, whole, rtol=0, atol=2e-6)
    s.reset(1)
    np.testing.assert_allclose(s.forward(ids, last_only=True)[:, -1], whole[:, -1], rtol=0, atol=2e-6)
    # prefills of many lengths: the pool is emptied before the sizes pile past one chunk
    for n in range(2, 9):
        s.reset(1)
        s.forward(ids[:, :n], last_only=True)
        assert sum(s._pooled) <= 4


def test_uniform_artifact_refuses_ragged_rows(compiled):
    s = runtime.load(compiled("gpt2")).session
    s.reset(2)
    with pytest.raises(ValueError, match="one shared length"):
        s.prefill([[1, 2], [3]])


# ---- builds for devices this machine does not have -------------------------------------------

FUSED_FAMILIES = ("attention", "kv_append", "rotary", "rms_norm", "skip_rms_norm")


# the Metal build is the slowest test here (~25 s: dlight's Metal matmul rule on the float
# matmuls); SmolLM2's quantized one takes 5 s (tests/test_tvm_smollm2.py)
@pytest.mark.parametrize("target,source", [("cuda", "device_code.cu"), ("metal", "device_code.metal")])
def test_gpu_build_holds_a_kernel_per_fused_op(compiled, target, source):
    out = compiled("llama", target)
    m = json.loads((out / "manifest.json").read_text())
    b = m["backend"]
    assert (m["target"]["device"], b["name"]) == (target, "tvm") and "cross_compiled_for" not in b
    assert (out / b["library"]).stat().st_size > 0 and (out / b["weights"]).is_file()
    assert b["device_source"] == source
    code = (out / source).read_text()
    for family in FUSED_FAMILIES:
        assert any(k.startswith(family) or f"_{family}" in k for k in b["kernels"]), family
        assert family in code
    assert b["requires"][0].startswith("apache-tvm==")


def test_cuda_arch_reaches_the_target(hf_fixture, tmp_path):
    out = kiln_compile(hf_fixture("llama"), target="cuda", arch="sm90", output=tmp_path / "a.kiln", backend="tvm")
    m = json.loads((out / "manifest.json").read_text())
    assert m["target"]["preset"] == "cuda-sm90" and m["backend"]["target"]["arch"] == "sm_90"


def test_neon_cross_build_exports_objects(compiled):
    out = compiled("qwen2", "cpu-neon")
    b = json.loads((out / "manifest.json").read_text())["backend"]
    assert b["library"] == "model.tar" and (out / "model.tar").stat().st_size > 0
    assert b["target"]["mtriple"].startswith("aarch64") and b["cross_compiled_for"] == "aarch64"
    with pytest.raises(KilnError, match="was cross-compiled for aarch64; run it on such a machine"):
        runtime.load(out)


def test_gpu_artifact_here_is_a_one_line_error(compiled, hf_fixture, tmp_path):
    with pytest.raises(KilnError, match="compiled for cuda, and this machine has no cuda device"):
        runtime.load(compiled("llama", "cuda"))
    # the ONNX Runtime cuda artifact names the package it needs
    out = kiln_compile(hf_fixture("llama"), target="cuda", output=tmp_path / "o.kiln", backend="onnxrt")
    assert json.loads((out / "manifest.json").read_text())["backend"]["requires"] == ["onnxruntime-gpu==1.31.1"]
    with pytest.raises(KilnError, match="compiled for cuda, and onnxruntime here has no CUDA provider"):
        runtime.load(out)


@pytest.mark.parametrize("kwargs,message", [
    ({"target": "tpu"}, "unknown target 'tpu'; choose from cpu, cpu-avx2"),
    ({"target": "metal", "backend": "onnxrt"}, "target 'metal' has no onnxrt backend; it has tvm"),
    ({"target": "cuda", "arch": "sm70"}, "--arch sm70 does not fit target 'cuda'"),
    ({"target": "cpu", "backend": "tvm", "precision": "fastest"}, "unknown precision 'fastest'; choose exact or fast"),
    # the ONNX Runtime cache layouts: TVM lays out its own, so asking for one there is an error
    ({"target": "cpu", "kv_layout": "concat"}, "kv_layout='concat' is an ONNX Runtime option, for backend='onnxrt'"),
])
def test_bad_target_or_backend_is_refused(hf_fixture, tmp_path, kwargs, message):
    kwargs.setdefault("backend", None)
    with pytest.raises(KilnError, match=message.replace("(", r"\(")):
        kiln_compile(hf_fixture("llama"), output=tmp_path / "x.kiln", **kwargs)
    assert not (tmp_path / "x.kiln").exists()


def test_manifest_must_list_the_library(compiled, tmp_path):
    import shutil

    from kiln.artifact import ArtifactError
    art = tmp_path / "a.kiln"
    shutil.copytree(compiled("llama"), art)
    m = json.loads((art / "manifest.json").read_text())
    m["backend"]["library"] = "../elsewhere.so"
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="the backend's library ../elsewhere.so is not a file listed"):
        runtime.load(art)


def test_cpu_missing_an_instruction_set_is_a_one_line_error(compiled, tmp_path, monkeypatch):
    # a library for this exact CPU model would die of SIGILL on a CPU without its vector
    # instructions: the manifest names them, and loading checks them first
    import shutil

    from kiln.artifact import ArtifactError
    from kiln.runtime import cpu_features
    from kiln.targets.presets import PRESETS
    avx2 = PRESETS["cpu-avx2"].cpu_flags
    art = tmp_path / "a.kiln"
    shutil.copytree(compiled("llama"), art)
    needs = json.loads((art / "manifest.json").read_text())["backend"]["cpu_features"]
    assert "avx2" in needs and set(needs) <= cpu_features.SIMD_FLAGS and set(needs) <= cpu_features.host_flags()
    runtime.load(art)
    # the same artifact on an AVX2-only CPU
    monkeypatch.setattr(cpu_features, "host_flags", lambda: avx2)
    lacking = sorted(set(needs) - avx2)
    assert lacking, "this machine has nothing beyond AVX2 to test with"
    with pytest.raises(ArtifactError, match="was compiled for a CPU with " + ", ".join(lacking)) as e:
        runtime.load(art)
    assert "\n" not in str(e.value)


# ---- the runtime behaves the same on both backends ------------------------------------------

def test_runtime_api_is_the_same_on_both_backends(compiled, compiled_family):
    tvm_model = runtime.load(compiled("qwen2"))
    ort_model = runtime.load(compiled_family("qwen2", "onnxrt"))
    prompts = [[5, 9, 13, 2], [7, 1], [42, 43, 44, 45, 46, 47]]
    for m in (tvm_model, ort_model):
        assert m.session.ragged_prefill
    # greedy and seeded sampling, a batch of prompts of different lengths in one run
    for kw in ({}, {"temperature": 0.8, "top_k": 20, "seed": 7}):
        a = [r.ids for r in tvm_model.generate(prompts, max_new_tokens=10, eos_ids=[], **kw)]
        b = [r.ids for r in ort_model.generate(prompts, max_new_tokens=10, eos_ids=[], **kw)]
        assert a == b
    ids = list(range(3, 60))
    assert tvm_model.perplexity(ids) == pytest.approx(ort_model.perplexity(ids), rel=1e-5)
    beams_t = tvm_model.generate(prompts[2], max_new_tokens=6, num_beams=3, eos_ids=[])
    beams_o = ort_model.generate(prompts[2], max_new_tokens=6, num_beams=3, eos_ids=[])
    assert beams_t.ids == beams_o.ids


def test_scheduler_rows_get_their_alone_tokens(compiled):
    from kiln.runtime.scheduler import Scheduler
    model = runtime.load(compiled("llama"))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 200, size=n).tolist() for n in (3, 17, 1, 40, 8)]
    max_tokens = [12, 5, 20, 9, 15]

    def run(batch, staggered):
        sch = Scheduler(model.session, None, max_batch=batch, eos_ids=[])
        reqs = []
        for i, p in enumerate(prompts if staggered else prompts[:1]):
            reqs.append(sch.submit(p, max_tokens=max_tokens[i], temperature=0.9 if i % 2 else 0.0, seed=i))
            for _ in range(i % 3):
                sch.step()
        while not sch.idle():
            sch.step()
        return [r.ids for r in reqs]
    together = run(4, True)
    for i, p in enumerate(prompts):
        sch = Scheduler(model.session, None, max_batch=4, eos_ids=[])
        req = sch.submit(p, max_tokens=max_tokens[i], temperature=0.9 if i % 2 else 0.0, seed=i)
        while not sch.idle():
            sch.step()
        assert req.ids == together[i]


def test_cli_run_and_bench_on_a_tvm_artifact(compiled, compiled_family):
    import subprocess
    import sys
    art = str(compiled("llama"))
    ort_art = str(compiled_family("llama", "onnxrt"))
    run, ort = (subprocess.run([sys.executable, "-m", "kiln.cli", "run", a, "--ids", "1,2,3,4", "-n", "6"],
                               capture_output=True, text=True) for a in (art, ort_art))
    assert run.returncode == 0, run.stderr
    assert run.stdout == ort.stdout and len(run.stdout.strip().split(",")) == 6
    bench = subprocess.run([sys.executable, "-m", "kiln.cli", "bench", art, "--repeats", "1", "--decode-tokens", "4",
                            "--prefill-tokens", "8", "--json"], capture_output=True, text=True)
    assert bench.returncode == 0, bench.stderr
    assert "tvm" in bench.stdout


def test_float16_kv_cache(hf_fixture, tmp_path):
    out = kiln_compile(hf_fixture("mistral"), output=tmp_path / "f16.kiln", backend="tvm", kv_dtype="f16")
    assert json.loads((out / "manifest.json").read_text())["backend"]["kv_cache"]["dtype"] == "float16"
    model = runtime.load(out)
    ref = np.load(hf_fixture("mistral") / "reference.npz")
    # keys and values rounded to float16 (relative 2^-11): measured 1.2e-4 on these logits
    np.testing.assert_allclose(model.logits(ref["input_ids"]), ref["logits"], rtol=0, atol=1e-3)
    tokens, _ = greedy_decode(model.session, ref["prompt"], 16)
    assert tokens == ref["greedy"].tolist()
    # a row joins through a view of its float16 slice: same tokens as alone
    s = model.session
    alone, _ = greedy_decode(s, [[9, 8, 7, 6]], 3)
    s.start_rows(3)
    got = [int(np.argmax(s.join_row(1, [9, 8, 7, 6])))]
    for _ in range(2):
        got.append(int(np.argmax(s.step(np.array([0, got[-1], 0]), np.array([0, 1, 0], bool))[1])))
    assert got == alone
    # and the GPU kernels build over a float16 cache
    kiln_compile(hf_fixture("mistral"), target="cuda", output=tmp_path / "g.kiln", backend="tvm", kv_dtype="f16")
