"""A real ``kiln serve`` on a loopback port, and the ends of its requests: a non-streamed client
that goes away frees its row."""
import json
import socket
import subprocess
import sys
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
