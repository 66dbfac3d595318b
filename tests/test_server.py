"""kiln serve (runtime/server.py): the real server on a loopback port, driven by the official
openai client; answers equal the runtime's own generate for the same settings."""
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
openai = pytest.importorskip("openai")
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402

from kiln import runtime  # noqa: E402

KEY = "test-key"


class _Resp:
    def __init__(self, status, text):
        self.status_code, self.text = status, text

    def json(self):
        return json.loads(self.text)


def _http(method, url, *, json_body=None, content=None, headers=None):
    data = content if content is not None else (None if json_body is None else json.dumps(json_body).encode())
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return _Resp(r.status, r.read().decode())
    except urllib.error.HTTPError as e:
        return _Resp(e.code, e.read().decode())


def _get(url, headers=None):
    return _http("GET", url, headers=headers)


def _post(url, json=None, content=None, headers=None):
    return _http("POST", url, json_body=json, content=content, headers=headers)


@pytest.fixture(scope="module")
def artifact(smollm2_artifact):
    return smollm2_artifact


@pytest.fixture(scope="module")
def server(artifact):
    import uvicorn

    from kiln.runtime.server import build
    app, service = build(artifact, max_batch=4, max_queue=16, api_key=KEY, threads=2)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    t = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    base = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if _get(base + "/health").status_code == 200:
                break
        except OSError:
            time.sleep(0.05)
    yield base, service
    srv.should_exit = True
    t.join(10)
    service.scheduler.stop(10)
    sock.close()


@pytest.fixture(scope="module")
def ref(artifact):
    return runtime.load(artifact, threads=2)


def _client(base, key=KEY):
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=120)


def test_models_and_health(server):
    base, service = server
    assert _get(base + "/health").json()["status"] == "ok"
    ids = [m.id for m in _client(base).models.list().data]
    assert ids == [service.name] == ["smollm2"]


def test_completion_equals_generate(server, ref):
    base, service = server
    c = _client(base)
    prompt = "The capital of France is"
    want = ref.generate(prompt, max_new_tokens=12)
    got = c.completions.create(model=service.name, prompt=prompt, max_tokens=12, temperature=0)
    assert got.choices[0].text == want.text
    assert got.choices[0].finish_reason == ("length" if want.finish_reason == "length" else "stop")
    assert got.usage.prompt_tokens == want.prompt_tokens
    assert got.usage.completion_tokens == len(want.ids) + (want.finish_reason == "eos")
    pieces = [ch.choices[0].text for ch in c.completions.create(
        model=service.name, prompt=prompt, max_tokens=12, temperature=0, stream=True)]
    assert "".join(pieces) == want.text and len(pieces) > 2


def test_chat_equals_generate(server, ref):
    base, service = server
    c = _client(base)
    msgs = [{"role": "user", "content": "Name a fruit that is yellow."}]
    for settings in (dict(temperature=0), dict(temperature=0.8, top_p=0.9, seed=7)):
        want = ref.chat(msgs, max_new_tokens=20, **settings)
        got = c.chat.completions.create(model=service.name, messages=msgs, max_tokens=20, **settings)
        assert got.choices[0].message.content == want.text
        assert got.choices[0].message.role == "assistant"
        assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
        stream = c.chat.completions.create(model=service.name, messages=msgs, max_tokens=20, stream=True,
                                           extra_body={"top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0},
                                           **settings)
        chunks = list(stream)
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want.text
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_eight_concurrent_streams_get_their_alone_results(server):
    base, service = server
    c = _client(base)
    topics = ["the sea", "a cat", "mountains", "bread", "a red bicycle in the rain", "stars", "tea",
              "an old library full of dusty books and quiet readers"]
    jobs = [dict(messages=[{"role": "user", "content": f"Write one sentence about {t}."}],
                 max_tokens=8 + 3 * i, temperature=0.9 if i % 2 else 0, seed=i) for i, t in enumerate(topics)]

    def run(job):
        return "".join(ch.choices[0].delta.content or "" for ch in
                       c.chat.completions.create(model=service.name, stream=True, **job))

    alone = [run(j) for j in jobs]
    out = [None] * len(jobs)

    def worker(i):
        time.sleep(0.03 * i)                    # arrivals spread over the first steps
        out[i] = run(jobs[i])
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert out == alone


def _error(resp, status, code):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["code"] == code and err["message"] and err["type"]
    assert "Traceback" not in resp.text


def test_errors(server):
    base, service = server
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    url = base + "/v1/chat/completions"
    msgs = [{"role": "user", "content": "hi"}]
    _error(_post(url, content=b"{not json", headers=h), 400, "invalid_json")
    _error(_post(url, json={"model": "gpt-4", "messages": msgs}, headers=h), 404, "model_not_found")
    _error(_post(url, json={"model": service.name, "messages": msgs, "max_tokens": -1}, headers=h),
           422, "invalid_value")
    long = "word " * (service.scheduler.max_length + 10)
    _error(_post(base + "/v1/completions", json={"model": service.name, "prompt": long}, headers=h),
           413, "context_length_exceeded")
    _error(_post(url, json={"model": service.name, "messages": msgs},
                      headers={**h, "Authorization": "Bearer wrong"}), 401, "invalid_api_key")
    _error(_get(base + "/v1/models"), 401, "invalid_api_key")
    with pytest.raises(openai.NotFoundError):
        _client(base).chat.completions.create(model="nope", messages=msgs)
    with pytest.raises(openai.AuthenticationError):
        _client(base, key="wrong").models.list()
    with pytest.raises(openai.UnprocessableEntityError):
        _client(base).completions.create(model=service.name, prompt="x", max_tokens=-5)


KILLED_CLIENT = """
import sys, openai
c = openai.OpenAI(base_url=sys.argv[1], api_key=sys.argv[2], max_retries=0)
for ch in c.completions.create(model="smollm2", prompt="Count: 1, 2, 3,", max_tokens=400,
                               temperature=0, stream=True):
    print("chunk", flush=True)
"""


def test_client_killed_mid_stream_frees_its_row(server):
    base, service = server
    proc = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, base + "/v1", KEY],
                            stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(3):
            assert proc.stdout.readline().startswith("chunk")
        assert service.scheduler.active == 1
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline and _get(base + "/health").json()["running"]:
        time.sleep(0.05)
    assert _get(base + "/health").json()["running"] == 0
    r = _client(base).completions.create(model=service.name, prompt="Hello", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3


def test_kiln_serve_command_serves_and_exits_on_ctrl_c(artifact):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([sys.executable, "-m", "kiln.cli", "serve", str(artifact), "--port", str(port),
                             "--max-batch", "2", "--threads", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if _get(base + "/health").status_code == 200:
                    break
            except OSError:
                time.sleep(0.05)
        r = _client(base, key="unused").completions.create(model="smollm2", prompt="Hi", max_tokens=2)
        assert r.usage.completion_tokens == 2
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert f"http://127.0.0.1:{port}/v1" in out
