"""``GET /metrics``: the server's counters in Prometheus's text format (version 0.0.4).

Written here rather than with prometheus_client, which kiln does not depend on: the format is
lines of ``name{label="value"} number`` after a ``# HELP`` and a ``# TYPE`` line per metric.

What is counted, and where:

* HTTP responses by route and status (``kiln_http_requests_total``), when each response has
  ended (the server's request log middleware calls :meth:`ServerMetrics.http_response`).
* Each scheduler request (one per choice) when it ends (``Scheduler.on_end``): its finish
  reason, its prompt and generated tokens, its time to first token and its time from
  submission to its end, as histograms.
* At each scrape, from the scheduler: the requests waiting and running, the batch's rows, the
  decode steps and the rows they advanced (their ratio is the mean batch occupancy), and the
  prefix cache's hits, misses, reused tokens, bytes and evictions.
"""
from __future__ import annotations

import bisect
import threading
import time

__all__ = ["ServerMetrics", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: seconds; a CPU's time to first token runs from milliseconds (a cached prefix) to a minute
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Histogram:
    """Counts of observations at or below each bound (cumulative when written), their sum."""

    def __init__(self, bounds):
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, v)] += 1
        self.sum += v

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts):
            total += n
            out.append(f'{name}_bucket{{le="{_number(bound)}"}} {total}')
        return out + [f"{name}_sum {_number(self.sum)}", f"{name}_count {total}"]


def _number(v) -> str:
    if v == float("inf"):
        return "+Inf"
    return repr(float(v)) if isinstance(v, float) else str(v)


def _label(v) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class ServerMetrics:
    """The counters of one server; see the module's docstring. Thread-safe: the scheduler's
    thread and the event loop write, a scrape reads."""

    def __init__(self, scheduler, routes=lambda: ()):
        """``routes()``: the app's paths, labelled as themselves (others are "other", so
        requests for random paths cannot grow the label set); read at the first response,
        when every route is defined."""
        self.scheduler = scheduler
        self._routes, self.routes = routes, None
        self._lock = threading.Lock()
        self.http: dict[tuple[str, int], int] = {}
        self.finished: dict[str, int] = {}
        self.prompt_tokens = self.generated_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.latency = Histogram(LATENCY_BUCKETS)
        scheduler.on_end = self.request_ended

    def request_ended(self, req) -> None:
        """A scheduler request's end (on the scheduler's thread)."""
        now = time.perf_counter()
        with self._lock:
            self.finished[req.finish_reason] = self.finished.get(req.finish_reason, 0) + 1
            self.prompt_tokens += req.prompt_tokens
            self.generated_tokens += req.completion_tokens
            if req.first_token_at is not None:
                self.ttft.observe(req.first_token_at - req.submitted)
            self.latency.observe(now - req.submitted)

    def http_response(self, path: str, status: int | None) -> None:
        if self.routes is None:
            self.routes = {p for p in self._routes() if p}
        key = (path if path in self.routes else "other", int(status or 500))
        with self._lock:
            self.http[key] = self.http.get(key, 0) + 1

    def render(self) -> str:
        """The text a scrape gets."""
        s = self.scheduler
        out: list[str] = []

        def metric(name, kind, help_text, samples):
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(samples)

        def one(name, kind, help_text, value):
            metric(name, kind, help_text, [f"{name} {_number(value)}"])

        with self._lock:
            metric("kiln_http_requests_total", "counter", "HTTP responses by route and status.",
                   [f'kiln_http_requests_total{{path="{_label(p)}",status="{st}"}} {n}'
                    for (p, st), n in sorted(self.http.items())])
            metric("kiln_requests_total", "counter",
                   "Generation requests (one per choice) that ended, by finish reason.",
                   [f'kiln_requests_total{{finish_reason="{_label(r)}"}} {n}'
                    for r, n in sorted(self.finished.items())])
            one("kiln_prompt_tokens_total", "counter", "Prompt tokens of the requests that ended.",
                self.prompt_tokens)
            one("kiln_generation_tokens_total", "counter", "Tokens generated by the requests that ended.",
                self.generated_tokens)
            metric("kiln_time_to_first_token_seconds", "histogram",
                   "Seconds from a request's submission to its first token.",
                   self.ttft.lines("kiln_time_to_first_token_seconds"))
            metric("kiln_request_duration_seconds", "histogram",
                   "Seconds from a request's submission to its end.",
                   self.latency.lines("kiln_request_duration_seconds"))
        one("kiln_queue_length", "gauge", "Requests waiting for a row.", len(s.waiting))
        one("kiln_running_requests", "gauge", "Requests holding a row of the batch.", s.active)
        one("kiln_batch_rows", "gauge", "Rows of the batch (--max-batch).", s.max_batch)
        one("kiln_batch_occupancy", "gauge", "Share of the batch's rows held now.", s.active / s.max_batch)
        one("kiln_decode_steps_total", "counter", "Decode steps run.", s.steps)
        one("kiln_decode_step_rows_total", "counter",
            "Rows the decode steps advanced (divided by the steps: the mean batch occupancy in rows).",
            s.step_rows)
        cache = s.prefix_cache
        if cache is not None:
            one("kiln_prefix_cache_hits_total", "counter", "Requests that reused a cached prompt prefix.",
                cache.hits)
            one("kiln_prefix_cache_misses_total", "counter", "Requests that found no cached prefix.",
                cache.misses)
            one("kiln_prefix_cache_reused_tokens_total", "counter",
                "Prompt tokens loaded from the prefix cache instead of prefilled.", cache.tokens_reused)
            one("kiln_prefix_cache_bytes", "gauge", "Bytes the prefix cache holds.", cache.bytes)
            one("kiln_prefix_cache_budget_bytes", "gauge", "The most bytes the prefix cache may hold.",
                cache.budget_bytes)
            one("kiln_prefix_cache_evictions_total", "counter", "Blocks evicted from the prefix cache.",
                cache.evictions)
        return "\n".join(out) + "\n"
