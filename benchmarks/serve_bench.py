"""Throughput of ``kiln serve`` with 1, 4 and 8 concurrent streaming clients.

Starts ``kiln serve ARTIFACT`` on a free loopback port, then for each client count starts that
many clients together (threads with the official ``openai`` client, or ``--client http``'s
lighter one), each streaming exactly ``--tokens`` tokens of a seeded story (``ignore_eos``, so
every run generates the same number whatever the sampled text). Reports total generated tokens/s (all clients' tokens over the
wall time from the first request to the last token) and time to first token (mean, worst).

    .venv/bin/python benchmarks/serve_bench.py smollm2.kiln [--clients 1,4,8] [--tokens 128] [--max-batch 8]
        [--client openai|http] [--temperature 0.8] [--against-bench ROUNDS]
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base: str, proc, timeout: float = 120) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise SystemExit(f"serve_bench: the server exited ({proc.returncode}): {proc.stderr.read()}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise SystemExit("serve_bench: the server did not come up")


def _one_client(client, model: str, i: int, tokens: int, out: dict, start: float, temperature: float) -> None:
    first, n, counted = None, 0, None
    stream = client.chat.completions.create(
        model=model, stream=True, max_tokens=tokens, temperature=temperature, seed=100 + i, extra_body={"ignore_eos": True},
        messages=[{"role": "user", "content": f"Tell me a long story about a lighthouse keeper number {i}."}])
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if first is None:
                first = time.perf_counter() - start
            n += 1
        if getattr(chunk, "usage", None) is not None:
            counted = chunk.usage.completion_tokens
    out[i] = {"ttft": first, "tokens": counted if counted is not None else n, "end": time.perf_counter() - start}


class RawClient:
    """A streaming chat client of a few lines over http.client: the load generator for
    ``--client http``. The official client parses every chunk into objects; on a 2-core
    machine shared with the server, eight of them take CPU time the server's steps need."""

    def __init__(self, base: str):
        self.host, self.port = base.removeprefix("http://").split(":")

    def stream(self, body: dict):
        import http.client
        conn = http.client.HTTPConnection(self.host, int(self.port), timeout=600)
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
        for line in resp:
            if line.startswith(b"data: "):
                if line.startswith(b"data: [DONE]"):
                    break
                yield line
        conn.close()


def _one_raw_client(client: RawClient, model: str, i: int, tokens: int, out: dict, start: float,
                    temperature: float) -> None:
    first, n, counted = None, 0, None
    body = {"model": model, "stream": True, "max_tokens": tokens, "temperature": temperature, "seed": 100 + i,
            "stream_options": {"include_usage": True}, "ignore_eos": True,
            "messages": [{"role": "user", "content": f"Tell me a long story about a lighthouse keeper number {i}."}]}
    for line in client.stream(body):
        if b'"content": "' in line and b'"content": ""' not in line:
            if first is None:
                first = time.perf_counter() - start
            n += 1
        if b'"usage": {' in line:
            counted = json.loads(line[6:])["usage"]["completion_tokens"]
    out[i] = {"ttft": first, "tokens": counted if counted is not None else n, "end": time.perf_counter() - start}


def run(base: str, clients: int, tokens: int, kind: str = "openai", temperature: float = 0.8) -> dict:
    if kind == "http":
        client = RawClient(base)
        with urllib.request.urlopen(base + "/v1/models") as r:
            model = json.load(r)["data"][0]["id"]
        work = _one_raw_client
    else:
        from openai import OpenAI
        client = OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=600)
        model = client.models.list().data[0].id
        work = _one_client
    out: dict = {}
    start = time.perf_counter()

    def one(i):
        try:
            work(client, model, i, tokens, out, start, temperature)
        except Exception as e:               # reported below: a thread cannot raise to run()
            out[i] = {"error": f"{type(e).__name__}: {e}"}
    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [r["error"] for r in out.values() if "error" in r]
    if errors:
        raise SystemExit(f"serve_bench: a client failed: {errors[0]}")
    wall = max(r["end"] for r in out.values())
    # the server's own count (usage on the last chunk), else the chunks that carried text
    generated = sum(r["tokens"] for r in out.values())
    # a stream's decode speed: its tokens after the first over the time from the first to the
    # last (what `kiln bench` calls decode; the prompt's prefill is in the time to first token)
    decode = statistics.mean((r["tokens"] - 1) / (r["end"] - r["ttft"]) for r in out.values())
    return {"clients": clients, "wall_s": wall, "tokens": generated, "decode_per_client": decode,
            "ttft_mean_s": statistics.mean(r["ttft"] for r in out.values()),
            "ttft_worst_s": max(r["ttft"] for r in out.values())}


def bench_decode(artifact: str, tokens: int, threads: int) -> float:
    """``kiln bench``'s greedy decode tokens/s for the artifact (its own process, one run)."""
    out = subprocess.run([sys.executable, "-m", "kiln.cli", "bench", artifact, "--decode-tokens", str(tokens),
                          "--repeats", "1", "--threads", str(threads), "--json"],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["decode_tokens_per_s"]


def against_bench(base: str, a, rounds: int) -> None:
    """One stream against ``kiln bench`` on the same artifact, in turns (this host's speed
    drifts between runs minutes apart): the lone client's share of the model's speed."""
    served, alone = [], []
    for k in range(rounds):
        alone.append(bench_decode(a.artifact, a.tokens, a.threads))
        served.append(run(base, 1, a.tokens, a.client, a.temperature)["decode_per_client"])
        print(f"round {k + 1}: kiln bench {alone[-1]:.1f} tokens/s, one stream {served[-1]:.1f}", flush=True)
    s, b = statistics.median(served), statistics.median(alone)
    print(f"median of {rounds}: one stream {s:.1f} tokens/s, kiln bench {b:.1f}: {s / b:.2f}x", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("--clients", default="1,4,8")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--client", choices=("openai", "http"), default="openai",
                    help="the official openai client, or a few lines of http.client (a lighter load generator)")
    ap.add_argument("--temperature", type=float, default=0.8,
                    help="the clients' sampling temperature (0: greedy, as kiln bench decodes)")
    ap.add_argument("--against-bench", type=int, default=0, metavar="ROUNDS",
                    help="also time one stream against `kiln bench`'s decode, in turns, this many rounds")
    ap.add_argument("--json")
    a = ap.parse_args()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "kiln.cli", "serve", a.artifact, "--port", str(port),
                             "--max-batch", str(a.max_batch), "--threads", str(a.threads)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_ready(base, proc)
        run(base, 1, 8, a.client)                         # warm-up
        if a.against_bench:
            against_bench(base, a, a.against_bench)
        rows = []
        for n in (int(x) for x in a.clients.split(",")):
            r = run(base, n, a.tokens, a.client, a.temperature)
            with urllib.request.urlopen(base + "/health") as h:
                json.load(h)
            r["tokens_per_s"] = r["tokens"] / r["wall_s"]
            rows.append(r)
            print(f"{n} client(s): {r['tokens']} tokens in {r['wall_s']:.2f} s = {r['tokens_per_s']:.1f} tokens/s "
                  f"in total; each stream decodes {r['decode_per_client']:.1f} tokens/s after its first; "
                  f"time to first token {r['ttft_mean_s']:.2f} s mean, {r['ttft_worst_s']:.2f} s worst",
                  flush=True)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(rows, f, indent=1)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
