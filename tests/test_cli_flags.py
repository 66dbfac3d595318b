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
