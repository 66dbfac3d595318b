"""kiln serve's prefix cache and ``GET /metrics`` (runtime/prefix_cache.py, runtime/metrics.py):
a served request that shares a prompt's beginning answers as a server without the cache does,
and a scrape after some requests parses to the counts they made. The tiny llama fixture
(ONNX Runtime, prompts as token ids) on a loopback port."""
import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("fastapi")

from kiln.cli import build_parser  # noqa: E402
from kiln.runtime.prefix_cache import DEFAULT_MB  # noqa: E402

from conftest import HF_FIXTURES  # noqa: E402

KEY = "metrics-key"
SYSTEM = [(7 * i) % 250 + 1 for i in range(80)]     # the fixture's context holds 128


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from kiln.driver import compile as kiln_compile
    return kiln_compile(HF_FIXTURES / "llama", output=tmp_path_factory.mktemp("served") / "llama.kiln",
                        backend="onnxrt")


def _call(base, path, body=None, key=KEY):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method="GET" if body is None else "POST",
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers.get("content-type"), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("content-type"), e.read().decode()


def _serving(artifact, **settings):
    import uvicorn

    from kiln.runtime.server import build
    app, service = build(artifact, max_batch=2, max_queue=8, api_key=KEY, threads=2, **settings)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    t = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    for _ in range(200):
        try:
            if _call(base, "/health")[0] == 200:
                break
        except OSError:
            time.sleep(0.05)

    def stop():
        srv.should_exit = True
        t.join(10)
        service.scheduler.stop(10)
        sock.close()
    return base, service, stop


def _complete(base, prompt, **extra):
    status, _, text = _call(base, "/v1/completions", {"prompt": prompt, "max_tokens": 8, "temperature": 0,
                                                      "ignore_eos": True, **extra})
    assert status == 200, text
    return json.loads(text)["choices"][0]["text"], json.loads(text)


def _scrape(base) -> dict:
    """``{(name, labels): value}`` of a Prometheus text page, checking every line's form."""
    status, ctype, text = _call(base, "/metrics")
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
    values, typed = {}, set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram")
            typed.add(name)
            continue
        if line.startswith("# HELP ") or not line:
            continue
        m = re.fullmatch(r'([a-z_]+)(\{([a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*)\})? (\S+)', line)
        assert m, line
        name, labels = m.group(1), tuple(re.findall(r'([a-z_]+)="([^"]*)"', m.group(3) or ""))
        assert re.sub(r"_(bucket|sum|count)$", "", name) in typed or name in typed, line
        values[(name, labels)] = float(m.group(5))
    return values


def test_served_prefix_cache_answers_as_without_it_and_metrics_count_it(llama):
    prompts = [SYSTEM + [11, 12, 13], SYSTEM + [40, 41], SYSTEM[:70] + [9] * 10, [3] * 70]
    base, service, stop = _serving(llama, prefix_cache_mb=0)
    try:
        want = [_complete(base, p)[0] for p in prompts]
        assert service.scheduler.prefix_cache is None
        assert not any(name.startswith("kiln_prefix_cache") for name, _ in _scrape(base))
    finally:
        stop()
    base, service, stop = _serving(llama)              # the default: on
    try:
        got = [_complete(base, p)[0] for p in prompts]
        _, sampled = _complete(base, SYSTEM + [5], max_tokens=4, temperature=0.9, seed=1, n=2)
        assert _call(base, "/v1/completions", {"prompt": [1, 2], "max_tokens": 1}, key="wrong")[0] == 401
        assert _call(base, "/v1/completions", {"prompt": [1, 2], "max_tokens": -1})[0] == 422
        assert _call(base, "/metrics", key=None)[0] == 401              # the API key guards it
        assert _call(base, "/v1/no-such-route")[0] == 404               # labelled "other"
        m = _scrape(base)
    finally:
        stop()
    assert got == want
    cache = service.scheduler.prefix_cache
    assert cache.budget_bytes == 512 << 20
    # the second and the third prompt shared the first's first block (64 tokens), the fourth
    # nothing; the sampled request's two choices the first block too
    assert (cache.hits, cache.misses, cache.tokens_reused) == (4, 2, 4 * 64)
    assert m[("kiln_prefix_cache_hits_total", ())] == 4
    assert m[("kiln_prefix_cache_misses_total", ())] == 2
    assert m[("kiln_prefix_cache_reused_tokens_total", ())] == 256
    assert 0 < m[("kiln_prefix_cache_bytes", ())] <= m[("kiln_prefix_cache_budget_bytes", ())]
    completions = "/v1/completions"
    assert m[("kiln_http_requests_total", (("path", completions), ("status", "200")))] == 5
    assert m[("kiln_http_requests_total", (("path", completions), ("status", "401")))] == 1
    assert m[("kiln_http_requests_total", (("path", completions), ("status", "422")))] == 1
    assert m[("kiln_http_requests_total", (("path", "/metrics"), ("status", "401")))] == 1
    assert m[("kiln_http_requests_total", (("path", "other"), ("status", "404")))] == 1
    assert m[("kiln_requests_total", (("finish_reason", "length"),))] == 6
    assert m[("kiln_prompt_tokens_total", ())] == sum(map(len, prompts)) + 2 * 81
    assert m[("kiln_generation_tokens_total", ())] == 4 * 8 + 2 * 4
    assert sampled["usage"]["completion_tokens"] == 8
    for name in ("kiln_time_to_first_token_seconds", "kiln_request_duration_seconds"):
        assert m[(name + "_count", ())] == 6
        assert m[(name + "_bucket", (("le", "+Inf"),))] == 6 and m[(name + "_sum", ())] > 0
        counts = [v for (n, lab), v in m.items() if n == name + "_bucket"]
        assert counts == sorted(counts)                             # cumulative
    assert m[("kiln_queue_length", ())] == 0 and m[("kiln_running_requests", ())] == 0
    assert m[("kiln_batch_rows", ())] == 2 and m[("kiln_batch_occupancy", ())] == 0
    # the two choices of the sampled request ran side by side: some steps held both rows
    steps, rows = m[("kiln_decode_steps_total", ())], m[("kiln_decode_step_rows_total", ())]
    assert 0 < steps < rows <= 2 * steps


def test_prefix_cache_flag():
    parse = build_parser().parse_args
    assert parse(["serve", "x.kiln"]).prefix_cache_mb == DEFAULT_MB == 512
    assert parse(["serve", "x.kiln", "--prefix-cache-mb", "0"]).prefix_cache_mb == 0
    with pytest.raises(SystemExit):
        parse(["serve", "x.kiln", "--prefix-cache-mb", "-1"])
