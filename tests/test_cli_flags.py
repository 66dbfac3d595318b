"""Flags as llama.cpp users know them (-t threads, -c context size, -n / --n-predict, --temp),
--help showing defaults, and ``kiln list`` read from kiln's own registries."""
import os
import subprocess
import sys

import pytest

from conftest import HF_FIXTURES

from kiln.cli import build_parser


def kiln(*args):
    return subprocess.run([sys.executable, "-m", "kiln.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "KILN_DEBUG": ""})


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    art = tmp_path_factory.mktemp("flags") / "llama.kiln"
    assert kiln("compile", HF_FIXTURES / "llama", "-o", art, "-q").returncode == 0
    return art


def test_llama_cpp_spellings():
    a = build_parser().parse_args(["run", "x", "-t", "2", "-c", "64", "--n-predict", "5", "--temp", "0.7"])
    assert (a.threads, a.ctx_size, a.max_new_tokens, a.temperature) == (2, 64, 5, 0.7)
    a = build_parser().parse_args(["run", "x", "-n", "3", "--temperature", "0.5"])
    assert (a.threads, a.max_new_tokens, a.temperature) == (None, 3, 0.5)
    assert build_parser().parse_args(["eval", "x", "--text", "t", "-c", "64"]).window == 64   # llama-perplexity's -c
    for command in ("serve", "bench", "eval"):
        extra = ["--text", "t"] if command == "eval" else []
        assert build_parser().parse_args([command, "x", "-t", "3", *extra]).threads == 3


def test_ctx_size_caps_the_answer(artifact):
    r = kiln("run", artifact, "--ids", "5,6,7", "-n", "2", "-t", "1")
    assert r.returncode == 0, r.stderr
    capped = kiln("run", artifact, "--ids", "5,6,7", "-n", "20", "-c", "5", "-t", "1")
    assert capped.returncode == 0, capped.stderr
    assert capped.stdout == r.stdout                       # 3 prompt tokens + 2 new = 5


@pytest.mark.parametrize("args, message", [
    (["-c", "129"], "-c/--ctx-size 129: choose from 1 to 128, the tokens this artifact holds"),
    (["-c", "3"], "the prompt has 3 tokens, which leaves none of -c/--ctx-size 3 for the answer"),
])
def test_ctx_size_errors(artifact, args, message):
    r = kiln("run", artifact, "--ids", "5,6,7", *args)
    assert r.returncode == 2
    assert r.stderr == f"kiln: {message}\n"


def test_help_shows_defaults():
    out = kiln("run", "--help").stdout
    assert "tokens to generate at most (default: 128)" in " ".join(out.split())
    assert "sampling temperature; 0 is greedy (default: 0.0)" in " ".join(out.split())
    out = " ".join(kiln("serve", "--help").stdout.split())
    assert "port to listen on (default: 8000)" in out
    assert "(default: None)" not in out and "(default: False)" not in out


def test_kiln_list_comes_from_the_registries():
    from kiln import quant_schemes
    from kiln.frontends.known_models import KNOWN
    from kiln.targets import presets
    r = kiln("list")
    assert r.returncode == 0, r.stderr
    lines = [line.split() for line in r.stdout.splitlines()]
    firsts = [w[0] for w in lines if w]
    assert set(presets.names()) <= set(firsts)
    assert set(quant_schemes.MIXTURES) <= set(firsts) and set(quant_schemes.block_types()) <= set(firsts)
    assert set(KNOWN) <= set(firsts) and set(presets.BACKENDS) <= set(firsts)
    assert ["q8_0", "8.50", "bits", "per", "weight"] in lines
    assert ["q4_0", "4.50", "bits", "per", "weight"] in lines
    assert next(w for w in lines if w and w[0] == "q4_k_m")[1:5] == ["mixture:", "q4_k", "(4.50", "bits"]


# ---- smaller things ---------------------------------------------------------------------------

def test_arch_is_refused_for_a_cpu_target(tmp_path):
    r = kiln("compile", HF_FIXTURES / "llama", "--target", "cpu", "--arch", "sm90", "-o", tmp_path / "a.kiln")
    assert r.returncode == 2
    assert r.stderr == ("kiln: --arch sm90 is a CUDA architecture; target 'cpu' is a cpu target (use --target "
                        "cuda --arch ..., or leave out --arch)\n")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name, format", [("m.gguf", "GGUF v3"), ("m.safetensors", "safetensors"),
                                          ("m.onnx", None)])
def test_to_is_inferred_from_the_suffix(tmp_path, name, format):
    r = kiln("convert", HF_FIXTURES / "llama", tmp_path / name, "-q")
    assert r.returncode == 0, r.stderr
    if format:
        assert format in kiln("inspect", tmp_path / name).stdout
    else:
        assert (tmp_path / name / "model.onnx").is_file()


def test_to_is_needed_without_a_telling_suffix(tmp_path):
    r = kiln("convert", HF_FIXTURES / "llama", tmp_path / "out")
    assert r.returncode == 2
    assert r.stderr == (f"kiln: {tmp_path / 'out'}: which format? add --to hf, gguf, safetensors or onnx (a name "
                        "ending in .gguf, .safetensors or .onnx says it without --to)\n")


def test_a_misspelt_short_name_gets_a_hint():
    r = kiln("compile", "smollm")
    assert r.returncode == 2
    assert r.stderr == "kiln: smollm: no such file or folder; did you mean smollm2 (a model short name, see kiln list)?\n"
    assert kiln("inspect", "./nothing-like-it").stderr == "kiln: nothing-like-it: no such file or folder\n"


def test_compile_help_names_the_inputs():
    out = " ".join(kiln("compile", "--help").stdout.split())
    assert ".safetensors" in out and "smollm2" in out


def test_quantized_gguf_to_hf_says_why_float32(tmp_path):
    gguf = tmp_path / "q.gguf"
    assert kiln("convert", HF_FIXTURES / "llama", gguf, "--quant", "q8_0", "-q").returncode == 0
    r = kiln("convert", gguf, tmp_path / "hf", "--to", "hf")
    assert r.returncode == 0, r.stderr
    assert ("note: the source's quantized blocks became float32, the one float type that holds their values "
            "exactly; --dtype bf16 or f16 halves the size and rounds each weight once") in r.stderr
    r = kiln("convert", gguf, tmp_path / "hf16", "--to", "hf", "--dtype", "f16")
    assert r.returncode == 0 and "note:" not in r.stderr


def test_convert_threads(tmp_path):
    """-t sets the quantizers' threads; the file is the same whatever the count."""
    files = []
    for threads in ("1", "3"):
        out = tmp_path / f"t{threads}.gguf"
        r = kiln("convert", HF_FIXTURES / "llama", out, "--quant", "q4_k_m", "-t", threads, "-q")
        assert r.returncode == 0, r.stderr
        files.append(out.read_bytes())
    assert files[0] == files[1]
    r = kiln("convert", HF_FIXTURES / "llama", tmp_path / "t0.gguf", "--quant", "q4_k_m", "-t", "0")
    assert r.returncode == 2 and r.stderr == "kiln: --threads 0: give at least 1\n"
    assert not (tmp_path / "t0.gguf").exists()
