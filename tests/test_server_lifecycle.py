"""A real ``kiln serve`` on a loopback port, and the ends of its requests: a non-streamed client
that goes away frees its row, and a shutdown ends running streams by its deadline, each with
its finish chunk and ``[DONE]``; a second signal exits at once."""
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

pytest.importorskip("fastapi")

# SmolLM2 counts on from here without an end, so a request runs until its max_tokens
COUNTING = "1, 2, 3, 4, 5,"


@pytest.fixture(scope="module")
def artifact(smollm2_gguf, tmp_path_factory):
    from kiln.driver import compile as kiln_compile
    return kiln_compile(smollm2_gguf, target="cpu", output=tmp_path_factory.mktemp("life") / "smollm2.kiln")


class Served:
    def __init__(self, artifact, *flags):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "kiln.cli", "serve", str(artifact), "--port",
                                      str(self.port), "--threads", "2", *flags],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                self.health()
                return
            except OSError:
                assert self.proc.poll() is None, self.proc.communicate()[1]
                time.sleep(0.1)
        raise AssertionError("kiln serve did not start")

    def health(self) -> dict:
        with urllib.request.urlopen(self.base + "/health", timeout=10) as r:
            return json.loads(r.read())

    def post(self, body: dict, timeout: float = 120):
        req = urllib.request.Request(self.base + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        return urllib.request.urlopen(req, timeout=timeout)

    def wait_running(self, n: int, seconds: float = 60) -> None:
        deadline = time.time() + seconds
        while self.health()["running"] != n:
            assert time.time() < deadline, f"never {n} running: {self.health()}"
            time.sleep(0.05)

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.communicate(timeout=30)


def test_a_non_streamed_client_that_disconnects_frees_its_row(artifact):
    srv = Served(artifact, "--max-batch", "1")
    try:
        body = json.dumps({"prompt": COUNTING, "max_tokens": 1000, "temperature": 0}).encode()
        client = socket.create_connection(("127.0.0.1", srv.port))
        client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: kiln\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n" % len(body) + body)
        srv.wait_running(1)
        time.sleep(0.5)
        client.close()
        start = time.time()
        srv.wait_running(0, seconds=10)       # its 1,000 tokens would take far longer
        with srv.post({"prompt": "Hi", "max_tokens": 2, "temperature": 0}, timeout=30) as r:
            assert json.loads(r.read())["usage"]["completion_tokens"] == 2
        assert time.time() - start < 30
    finally:
        srv.close()


def _streams(srv, n: int, max_tokens: int):
    """n streaming requests on threads; returns (their data lines, an event per first chunk)."""
    lines = [[] for _ in range(n)]
    started = [threading.Event() for _ in range(n)]

    def run(i):
        try:
            with srv.post({"prompt": COUNTING, "max_tokens": max_tokens, "temperature": 0,
                           "stream": True}) as r:
                for line in r:
                    if line.startswith(b"data: "):
                        lines[i].append(line[6:].decode().strip())
                        started[i].set()
        except OSError as e:
            lines[i].append(f"error: {e}")
    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for e in started:
        assert e.wait(60)
    return lines, threads


def _ended_by_shutdown(lines):
    assert lines[-1] == "[DONE]", lines[-3:]
    last = json.loads(lines[-2])["choices"][0]
    assert last["finish_reason"] == "length"
    # cut short: far fewer than the 1,000 tokens asked
    assert len(lines) < 500


def _shut_down(artifact, deadline: int, second_signal: bool = False) -> float:
    """Three 1,000-token streams, then SIGTERM (and SIGINT half a second later when
    ``second_signal``): the seconds the server took to exit after its last signal. The server
    must exit cleanly and every stream end with its finish chunk and [DONE]."""
    srv = Served(artifact, "--max-batch", "4", "--shutdown-timeout", str(deadline))
    try:
        lines, threads = _streams(srv, 3, 1000)
        srv.proc.send_signal(signal.SIGTERM)
        if second_signal:
            time.sleep(0.5)
            srv.proc.send_signal(signal.SIGINT)
        start = time.time()
        srv.proc.wait(timeout=30)
        took = time.time() - start
        for t in threads:
            t.join(10)
    finally:
        out, err = srv.close()
    assert srv.proc.returncode == 0, err
    assert "Traceback" not in err and "Event loop is closed" not in err, err
    for stream in lines:
        _ended_by_shutdown(stream)
    return took


def test_sigterm_ends_running_streams_at_the_deadline(artifact):
    took = _shut_down(artifact, 3)
    # the streams ran on until the 3 s deadline, then ended at once (slack for a busy machine)
    assert 2.5 < took < 3 + 4, took


def test_a_second_signal_ends_everything_at_once(artifact):
    took = _shut_down(artifact, 60, second_signal=True)
    assert took < 5, took


def test_a_bad_shutdown_timeout_is_one_line(artifact):
    r = subprocess.run([sys.executable, "-m", "kiln.cli", "serve", str(artifact), "--shutdown-timeout", "-1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--shutdown-timeout" in r.stderr.strip().splitlines()[-1]
