"""kiln serve's edge (runtime/http_limits.py, the checks in runtime/server.py): every request is
checked before it reaches the scheduler, and none can cost the server more than its limits.

Each test drives a real ``kiln serve`` process on a loopback port: the tiny Llama fixture
(ONNX Runtime, no tokenizer: prompts are token ids) where no text is needed, SmolLM2 where
chat templates and stop strings are. Loads are bounded (at most 64 clients, 200 MB streamed
in 1 MB pieces) and never leave 127.0.0.1.
"""
import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")

LOCAL = "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCAL, 0))
        return s.getsockname()[1]


class Server:
    """A ``kiln serve`` subprocess; ``log`` holds its stderr lines once it has exited."""

    def __init__(self, artifact, *flags, env=None):
        self.port = _free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "kiln.cli", "serve", str(artifact), "--port",
                                      str(self.port), "--threads", "1", *flags],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        self.log: list[str] = []
        deadline = time.time() + 120
        while time.time() < deadline:
            assert self.proc.poll() is None, self.proc.communicate()[1]
            try:
                if self.request("GET", "/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.1)
        raise AssertionError("kiln serve did not start in 120 s")

    def request(self, method, path, body=None, headers=None, timeout=60):
        """(status, parsed JSON or text) of one request on a fresh connection."""
        c = http.client.HTTPConnection(LOCAL, self.port, timeout=timeout)
        try:
            data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
            c.request(method, path, data, {"Content-Type": "application/json", **(headers or {})})
            r = c.getresponse()
            text = r.read().decode()
        finally:
            c.close()
        with contextlib.suppress(ValueError):
            return r.status, json.loads(text)
        return r.status, text

    def rss_kb(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        self.log = err.splitlines()


@pytest.fixture(scope="module")
def tiny_artifact(hf_fixture, tmp_path_factory):
    from kiln.driver import compile as kiln_compile
    return kiln_compile(hf_fixture("llama"), target="cpu", output=tmp_path_factory.mktemp("edge") / "tiny.kiln")


@pytest.fixture(scope="module")
def smol_artifact(smollm2_gguf, tmp_path_factory):
    from kiln.driver import compile as kiln_compile
    # named unlike the model: requests may still say "smollm2" (the known short name)
    return kiln_compile(smollm2_gguf, target="cpu", output=tmp_path_factory.mktemp("edge") / "ref-q41.kiln")


@pytest.fixture(scope="module")
def tiny(tiny_artifact):
    srv = Server(tiny_artifact, "--read-timeout", "2")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def smol(smol_artifact):
    srv = Server(smol_artifact, "--max-batch", "8", "--max-queue", "16")
    yield srv
    srv.stop()


def _refused(answer, status, code, param=None):
    got, body = answer
    assert got == status, body
    err = body["error"]
    assert err["code"] == code and err["message"] and err["type"], err
    if param is not None:
        assert err["param"] == param, err


# ---- every value checked at the edge -------------------------------------------------------

def test_prompt_token_ids_outside_the_vocabulary_get_422(tiny):
    for bad in (2 ** 63, 2 ** 64 + 5, -1, 256, 10 ** 6, True, 1.0, 1.5, "1", None, [1]):
        _refused(tiny.request("POST", "/v1/completions", {"prompt": [5, bad], "max_tokens": 4}),
                 422, "invalid_value", "prompt")
    status, body = tiny.request("POST", "/v1/completions", {"prompt": [0, 255, 7], "max_tokens": 4})
    assert status == 200 and body["usage"]["completion_tokens"] == 4


def test_a_refused_request_leaves_running_streams_alone(tiny):
    """The poisoned id of the attack report: three streams running beside it end normally."""
    out = [None] * 3

    def stream(i):
        out[i] = _stream(tiny.port, {"prompt": [1, 2, 3 + i], "max_tokens": 100, "temperature": 0})
    threads = [threading.Thread(target=stream, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    _refused(tiny.request("POST", "/v1/completions", {"prompt": [2 ** 63], "max_tokens": 4}),
             422, "invalid_value", "prompt")
    for t in threads:
        t.join(60)
    for status, chunks, done, _ in out:
        assert status == 200 and done
        assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")


def test_deep_or_non_json_bodies_get_400_not_500(tiny):
    deep = b"[" * 100_000 + b"]" * 100_000
    _refused(tiny.request("POST", "/v1/completions", deep), 400, "invalid_json")
    deep_value = b'{"prompt": [1], "extra": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    _refused(tiny.request("POST", "/v1/completions", deep_value), 400, "invalid_json")
    _refused(tiny.request("POST", "/v1/completions", b'{"prompt": [1], "temperature": NaN}'), 400, "invalid_json")
    # brackets inside strings are text, not nesting
    status, _ = tiny.request("POST", "/v1/completions", {"prompt": [1], "max_tokens": 1, "user": "[" * 1000})
    assert status == 200


def test_parse_json_bounds_nesting_and_text_in_linear_time():
    from kiln.runtime.http_limits import APIError, parse_json

    def refused(raw):
        with pytest.raises(APIError) as e:
            parse_json(raw)
        return e.value.status
    assert parse_json(b'{"a": ' + b"[" * 31 + b"]" * 31 + b"}")
    assert refused(b'{"a": ' + b"[" * 32 + b"]" * 32 + b"}") == 400
    assert refused(b"[" * 100_000 + b"]" * 100_000) == 400
    # brackets and escaped quotes inside strings are text; an escaped surrogate pair is an emoji
    assert parse_json(b'{"a": "[[[{{{\\"[[", "b": ["]]]"], "c": "\\ud83d\\ude00"}')["c"] == "\U0001f600"
    assert refused(b'{"a": ["x", {"b": "\\udc00"}]}') == 422
    assert refused(b'{"a": "\xed\xa0\x80"}') == 422           # CESU-8 bytes of a surrogate
    t0 = time.perf_counter()
    for raw in (b'{"a": "' + b'\\"' * 1_000_000 + b'"}', b'"' + b'\\"' * 1_000_000,
                b'{"p": [' + b"[]," * 300_000 + b"[]]}", b'{"p": [' + b"1," * 1_000_000 + b"1]}"):
        with contextlib.suppress(APIError):
            parse_json(raw)
    assert time.perf_counter() - t0 < 20                # quadratic scans of these took minutes


def test_lone_surrogates_get_422(tiny, smol):
    for srv, path, body in ((tiny, "/v1/completions", b'{"prompt": [1], "user": "\\ud800"}'),
                            (smol, "/v1/chat/completions",
                             b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}'),
                            (smol, "/v1/completions", b'{"prompt": "\\udfff x", "max_tokens": 2}')):
        status, answer = srv.request("POST", path, body)
        assert status == 422 and answer["error"]["code"] == "invalid_value", answer


def test_message_content_must_be_text(smol):
    url = "/v1/chat/completions"
    for content in (None, 5, True, {"text": "hi"}, [{"text": 5}], [{"type": "text", "text": None}],
                    [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}], ["hi"]):
        _refused(smol.request("POST", url, {"messages": [{"role": "user", "content": content}]}),
                 422, "invalid_value", "messages[0].content")
    msgs = [{"role": "user", "content": "Name a fruit."}]
    parts = [{"role": "user", "content": [{"type": "text", "text": "Name a "}, {"type": "text", "text": "fruit."}]}]
    answers = [smol.request("POST", url, {"messages": m, "max_tokens": 6, "temperature": 0})[1] for m in (msgs, parts)]
    assert answers[0]["choices"][0]["message"] == answers[1]["choices"][0]["message"]


def test_a_chat_template_that_refuses_the_messages_gives_422():
    """Templates may raise (``raise_exception``: "roles must alternate"); that is the request's
    fault, not the server's. Checked on Service itself, with a template that always refuses."""
    from types import SimpleNamespace

    from kiln.runtime.http_limits import APIError
    from kiln.runtime.server import Service
    from kiln.runtime.tokenizer import ChatTemplateError

    def refuse(msgs):
        assert all(set(m) <= {"role", "content", "name"} for m in msgs)   # nothing else reaches it
        raise ChatTemplateError("chat template raised: roles must alternate")
    tok = SimpleNamespace(encode=lambda text: [1], decode=lambda ids, **kw: "")
    model = SimpleNamespace(tokenizer=tok, chat_prompt=refuse, config={"vocab_size": 10})
    service = Service(model, SimpleNamespace(max_batch=1, max_queue=1, max_length=64), "m")
    with pytest.raises(APIError) as e:
        service.prepare({"messages": [{"role": "user", "content": "a", "tool_calls": {"x": 1}}]}, chat=True)
    assert e.value.status == 422 and "alternate" in e.value.message and e.value.param == "messages"


def test_stop_strings_are_bounded(smol):
    url = "/v1/completions"
    ok = {"prompt": "Count: 1, 2, 3,", "max_tokens": 4, "temperature": 0}
    _refused(smol.request("POST", url, {**ok, "stop": [f"s{i}" for i in range(17)]}), 422, "invalid_value", "stop")
    _refused(smol.request("POST", url, {**ok, "stop": "x" * 129}), 422, "invalid_value", "stop")
    _refused(smol.request("POST", url, {**ok, "stop": ["a", 5]}), 422, "invalid_value", "stop")
    status, body = smol.request("POST", url, {**ok, "stop": [f"s{i}" for i in range(15)] + ["x" * 128]})
    assert status == 200 and body["usage"]["completion_tokens"] == 4


def test_other_values_never_get_500(tiny):
    url = "/v1/completions"
    for body in ({"prompt": [1], "stream": "yes"}, {"prompt": [1], "model": ["llama"]},
                 {"prompt": [1], "seed": 2 ** 64}, {"prompt": [1], "seed": -1}, {"prompt": [1], "n": 10 ** 30},
                 {"prompt": [1], "max_tokens": "x" * 100_000}, {"prompt": [[1], [2]]}, {"prompt": []},
                 {"prompt": [1], "temperature": 10 ** 400}, {"prompt": [1], "n": 10 ** 400},
                 {"prompt": [1], "logprobs": -10 ** 400}):
        status, answer = tiny.request("POST", url, body)
        assert 400 <= status < 500, (body, answer)
        assert len(answer["error"]["message"]) < 300        # refused values are not echoed whole


# ---- what a request may cost ---------------------------------------------------------------

def _upload(port, total: int, chunked: bool, piece: int = 1 << 20) -> tuple[bytes, int]:
    """POST ``total`` bytes in ``piece``-sized writes, stopping once the server answers."""
    s = socket.create_connection((LOCAL, port), timeout=30)
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += b"Transfer-Encoding: chunked\r\n\r\n" if chunked else b"Content-Length: %d\r\n\r\n" % total
    block = b"x" * piece
    sent, answer = 0, b""
    with s:
        s.sendall(head)
        try:
            while sent < total and not answer:
                s.sendall(b"%x\r\n%s\r\n" % (piece, block) if chunked else block)
                sent += piece
                s.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    answer = s.recv(1 << 16)
                s.settimeout(30)
            while chunk := s.recv(1 << 16):
                answer += chunk
        except (ConnectionResetError, BrokenPipeError):
            pass
    return answer, sent


def test_a_200_mb_body_gets_413_without_being_read(tiny):
    before = tiny.rss_kb()
    for chunked in (True, False):
        answer, sent = _upload(tiny.port, 200 << 20, chunked)
        assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
        assert b'"request_too_large"' in answer
        assert sent < 64 << 20                       # the server answered long before the end
    grown_mb = (tiny.rss_kb() - before) / 1024
    print(f"server RSS grew {grown_mb:.1f} MB over two 200 MB uploads")
    assert grown_mb < 50
    assert tiny.request("POST", "/v1/completions", {"prompt": [1, 2], "max_tokens": 2})[0] == 200


def test_max_body_size_flag_and_api_key(tiny_artifact):
    srv = Server(tiny_artifact, "--max-body-size", "2KB", "--api-key", "sekrit")
    try:
        key = {"Authorization": "Bearer sekrit"}
        small = {"prompt": [1, 2], "max_tokens": 2}
        assert srv.request("POST", "/v1/completions", small, key)[0] == 200
        _refused(srv.request("POST", "/v1/completions", {**small, "user": "x" * 2000}, key), 413, "request_too_large")
        _refused(srv.request("GET", "/v1/models", headers={"Authorization": "Bearer sekrit!"}), 401, "invalid_api_key")
        # a key header in bytes that are not ASCII is a wrong key, not a 500
        utf8 = "Bearer ключ".encode().decode("latin-1")
        _refused(srv.request("GET", "/v1/models", headers={"Authorization": utf8}), 401, "invalid_api_key")
    finally:
        srv.stop()
    assert sum(" 401 " in line and "error=invalid_api_key" in line for line in srv.log) == 2, srv.log


@pytest.mark.parametrize("how", ["flag", "env"])
def test_an_empty_api_key_is_refused(tiny_artifact, how):
    args = ["--api-key", ""] if how == "flag" else []
    env = {**os.environ, "KILN_API_KEY": "" if how == "env" else "unused"}
    r = subprocess.run([sys.executable, "-m", "kiln.cli", "serve", str(tiny_artifact), "--port",
                        str(_free_port()), *args], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "empty" in lines[0] and ("--api-key" if how == "flag" else "KILN_API_KEY") in lines[0]


def test_slow_headers_are_cut_off(tiny):
    """20 sockets trickling header lines (slowloris) and 5 silent ones: all closed once the
    2 s --read-timeout has passed, while the server keeps answering."""
    t0 = time.time()
    trickling = [socket.create_connection((LOCAL, tiny.port), timeout=5) for _ in range(20)]
    silent = [socket.create_connection((LOCAL, tiny.port), timeout=5) for _ in range(5)]
    # a kept-alive connection whose second request trickles in
    kept = http.client.HTTPConnection(LOCAL, tiny.port, timeout=30)
    kept.request("GET", "/health")
    assert kept.getresponse().read()
    kept.sock.sendall(b"GET /health HTTP/1.1\r\n")
    trickling.append(kept.sock)
    closed = {}
    try:
        for s in trickling:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\n")
        while len(closed) < len(trickling) and time.time() - t0 < 20:
            for i, s in enumerate(trickling):
                if i in closed:
                    continue
                try:
                    s.sendall(b"X-Slow: 1\r\n")
                    s.setblocking(False)
                    if s.recv(1024) == b"":
                        closed[i] = time.time() - t0
                except BlockingIOError:
                    pass
                except OSError:
                    closed[i] = time.time() - t0
                finally:
                    s.settimeout(5)
            assert tiny.request("GET", "/health", timeout=10)[0] == 200
            time.sleep(0.25)
        assert len(closed) == len(trickling), f"{len(trickling) - len(closed)} sockets still open"
        assert max(closed.values()) < 10
        for s in silent:
            assert s.recv(16) == b""                 # closed by the server, nothing sent
    finally:
        for s in trickling + silent:
            s.close()


def test_a_slow_body_gets_408(tiny):
    with socket.create_connection((LOCAL, tiny.port), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"prompt\"")
        t0 = time.time()
        answer = s.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert time.time() - t0 < 10


# ---- queue accounting, names, logs, load ----------------------------------------------------

def _stream(port, body, path="/v1/completions", headers=None, hold=None):
    """(status, chunks, ended with [DONE], seconds to the first chunk) of a streamed request;
    ``hold(status)`` is called once the status is known, before the stream is read (returning
    False closes it)."""
    c = http.client.HTTPConnection(LOCAL, port, timeout=120)
    t0 = time.perf_counter()
    try:
        c.request("POST", path, json.dumps({**body, "stream": True}),
                  {"Content-Type": "application/json", **(headers or {})})
        r = c.getresponse()
        if hold is not None and hold(r.status) is False:
            return r.status, [], False, None
        if r.status != 200:
            return r.status, [json.loads(r.read())], False, None
        chunks, done, first = [], False, None
        for line in r:
            line = line.strip()
            if line == b"data: [DONE]":
                done = True
            elif line.startswith(b"data: "):
                first = first or time.perf_counter() - t0
                chunks.append(json.loads(line[6:]))
        return r.status, chunks, done, first
    finally:
        c.close()


def test_max_batch_plus_max_queue_streams_are_accepted(smol):
    """--max-batch 8 --max-queue 16: of 64 streams arriving together, 8 run and 16 wait (24
    accepted, as README says) and 40 get 429; none of the accepted ones ends early."""
    statuses, lock, all_in = [], threading.Lock(), threading.Event()

    def hold(status):
        with lock:
            statuses.append(status)
            if len(statuses) == 64:
                all_in.set()
        all_in.wait(120)                              # every stream stays open until all have an answer
        return False
    body = {"prompt": "Count: 1, 2, 3,", "max_tokens": 400, "temperature": 0}
    threads = [threading.Thread(target=_stream, args=(smol.port, body), kwargs={"hold": hold}) for _ in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert sorted(statuses) == [200] * 24 + [429] * 40
    # the closed streams free their rows and places
    deadline = time.time() + 30
    while time.time() < deadline and smol.request("GET", "/health")[1]["running"]:
        time.sleep(0.2)
    assert smol.request("GET", "/health")[1] == {"status": "ok", "running": 0, "waiting": 0}
    assert smol.request("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2})[0] == 200


def test_served_model_names_and_request_log(smol_artifact):
    srv = Server(smol_artifact)
    try:
        assert [m["id"] for m in srv.request("GET", "/v1/models")[1]["data"]] == ["ref-q41"]
        for name in ("ref-q41", "smollm2"):
            status, body = srv.request("POST", "/v1/completions", {"model": name, "prompt": "Hi", "max_tokens": 3})
            assert status == 200 and body["model"] == name
        status, chunks, done, _ = _stream(srv.port, {"model": "smollm2", "prompt": "Hi", "max_tokens": 3})
        assert status == 200 and done
        _refused(srv.request("POST", "/v1/completions", {"model": "gpt-4", "prompt": "Hi"}), 404, "model_not_found")
    finally:
        srv.stop()
    lines = [line for line in srv.log if " /v1/" in line]
    assert len(lines) == 5, srv.log
    ok = [line for line in lines if " 200 " in line and "POST" in line]
    assert len(ok) == 3 and all("in=" in line and "out=3" in line and "cmpl-" in line for line in ok)
    assert body["id"] in ok[1] and "finish=length" in ok[1]
    assert chunks[0]["id"] in ok[2]
    assert any(" 404 " in line and "error=model_not_found" in line for line in lines)

    srv = Server(smol_artifact, "--served-model-name", "team/smol", "--served-model-name", "smol")
    try:
        assert [m["id"] for m in srv.request("GET", "/v1/models")[1]["data"]] == ["team/smol"]
        for name in ("team/smol", "smol", None):
            assert srv.request("POST", "/v1/completions", {"model": name, "prompt": "Hi", "max_tokens": 1})[0] == 200
        _refused(srv.request("POST", "/v1/completions", {"model": "smollm2", "prompt": "Hi"}), 404, "model_not_found")
    finally:
        srv.stop()


def test_load_64_clients(smol_artifact):
    """64 clients stream at once: no 5xx, every stream ends with [DONE]. Bounded: 8 tokens each,
    loopback; 44-51 s measured on this 2-core machine while six other jobs shared it, so the
    limit is 120 s. Prints requests/s and time to first token (for the notes)."""
    srv = Server(smol_artifact, "--max-batch", "8", "--max-queue", "64")
    results = [None] * 64
    try:
        def client(i):
            t0 = time.perf_counter()
            status, chunks, done, first = _stream(srv.port, {"prompt": f"Story {i}: Once upon a time",
                                                             "max_tokens": 8, "temperature": 0.8, "seed": i})
            tokens = chunks[-1]["usage"]["completion_tokens"] if chunks else 0
            results[i] = (status, done, first, time.perf_counter() - t0, tokens)
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(1.0, 120 - (time.perf_counter() - t0)))
        wall = time.perf_counter() - t0
    finally:
        srv.stop()
    assert all(r is not None for r in results), "a client did not finish within 120 s"
    assert all(r[0] == 200 and r[1] for r in results), [r[:2] for r in results]
    firsts, totals = sorted(r[2] for r in results), sorted(r[3] for r in results)
    print(f"\nload: 64 concurrent streams of 8 tokens (--max-batch 8) in {wall:.1f} s: {64 / wall:.2f} "
          f"requests/s, {sum(r[4] for r in results) / wall:.0f} tokens/s; time to first token p50 "
          f"{firsts[31]:.2f} s, p95 {firsts[60]:.2f} s; whole request p50 {totals[31]:.2f} s, p95 {totals[60]:.2f} s")
