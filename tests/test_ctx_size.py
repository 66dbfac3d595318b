"""-c/--ctx-size on ``kiln serve`` and ``kiln bench`` (runtime/context_size.py), as llama.cpp's:
no request holds more than N tokens, prompt and answer; a benchmark whose runs do not fit is
refused before it times anything. ``kiln run``'s and ``kiln chat``'s -c are in
test_cli_flags.py and test_chat_repl.py.
"""
import json
import os
import subprocess
import sys

import pytest
from test_server_edge import Server, _free_port, _refused

pytest.importorskip("fastapi")


def kiln(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "kiln.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "KILN_DEBUG": ""})


@pytest.fixture(scope="module")
def tiny_artifact(hf_fixture, tmp_path_factory):
    """The tiny Llama fixture: no tokenizer (prompts are ids), a context of 128 tokens."""
    from kiln.driver import compile as kiln_compile
    return kiln_compile(hf_fixture("llama"), target="cpu", output=tmp_path_factory.mktemp("ctx") / "tiny.kiln")


def test_serve_holds_every_request_to_the_context(tiny_artifact):
    srv = Server(tiny_artifact, "-c", "8")
    try:
        # 5 prompt tokens leave 3 of the 8: max_tokens 20 is cut there
        status, body = srv.request("POST", "/v1/completions", {"prompt": [1, 2, 3, 4, 5], "max_tokens": 20,
                                                              "temperature": 0, "ignore_eos": True})
        assert status == 200, body
        assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
        assert body["choices"][0]["finish_reason"] == "length"
        # a prompt that fills the context leaves no room for an answer: OpenAI's error shape
        answer = srv.request("POST", "/v1/completions", {"prompt": list(range(1, 9)), "max_tokens": 1})
        _refused(answer, 413, "context_length_exceeded", "prompt")
        assert "holds 8" in answer[1]["error"]["message"]
        # 9 tokens fit the artifact (128) but not -c 8
        _refused(srv.request("POST", "/v1/completions", {"prompt": list(range(1, 10))}), 413,
                 "context_length_exceeded", "prompt")
        status, body = srv.request("POST", "/v1/completions", {"prompt": list(range(1, 8)), "max_tokens": 5,
                                                              "ignore_eos": True})
        assert status == 200 and body["usage"]["completion_tokens"] == 1, body
    finally:
        srv.stop()


@pytest.mark.parametrize("ctx", ["129", "0"])
def test_serve_refuses_a_context_the_artifact_does_not_have(tiny_artifact, ctx):
    r = kiln("serve", tiny_artifact, "--port", _free_port(), "-c", ctx, timeout=120)
    assert r.returncode == 2
    assert r.stderr == f"kiln: -c/--ctx-size {ctx}: choose from 1 to 128, the tokens this artifact holds\n"
    assert "serving" not in r.stdout


BENCH = ["--threads", "1", "--repeats", "1", "--prefill-tokens", "20", "--decode-tokens", "8"]


@pytest.mark.parametrize("args, message", [
    (["-c", "16"], "the prefill timing (--prefill-tokens 20) needs 20 tokens; -c/--ctx-size holds 16"),
    (["-c", "24", "--decode-tokens", "20"],
     "the decode timing after the 5-token prompt (with --decode-tokens 20) needs 25 tokens; -c/--ctx-size holds 24"),
    (["-c", "64", "--context", "16,60"],
     "the decode timing after --context 60 (with --decode-tokens 8) needs 68 tokens; -c/--ctx-size holds 64"),
    (["--context", "125"],             # no -c: the artifact's own context
     "the decode timing after --context 125 (with --decode-tokens 8) needs 133 tokens; this artifact holds 128"),
    (["--ctx-size", "200"], "-c/--ctx-size 200: choose from 1 to 128, the tokens this artifact holds"),
])
def test_bench_refuses_runs_past_the_context_before_timing(tiny_artifact, args, message):
    r = kiln("bench", tiny_artifact, *BENCH, *args)
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines() == [f"kiln bench: loading {tiny_artifact}", f"kiln: {message}"]
    assert r.stdout == ""


def test_bench_runs_within_the_context(tiny_artifact):
    r = kiln("bench", tiny_artifact, *BENCH, "-c", "28", "--context", "20", "--json")
    assert r.returncode == 0, r.stderr
    figures = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(figures["decode_tokens_per_s_at_context"]) == {"20"}


def test_help_says_what_ctx_size_does():
    serve = " ".join(kiln("serve", "--help").stdout.split())
    assert "-c N, --ctx-size N tokens one request may hold, prompt and answer together" in serve
    bench = " ".join(kiln("bench", "--help").stdout.split())
    assert "-c N, --ctx-size N tokens the cache may hold: every timed run" in bench
    assert "checked before timing starts" in bench
