"""``kiln serve``'s shutdown: a deadline for the running streams, and a second signal that ends
everything at once.

uvicorn alone, on SIGTERM or SIGINT, stops accepting and then waits for every response to
finish (a 1,000-token stream kept it alive for minutes), ignores a second SIGTERM, and on a
second SIGINT drops the streams without their end while the scheduler still posts events to
the closing event loop. Here the first signal stops accepting and lets the streams run for
``shutdown_timeout`` seconds; then the scheduler ends every request with finish_reason "abort"
(sent as "length": the server cut the answer short, and OpenAI's clients know no other value),
so each stream still gets its finish chunk and ``[DONE]``. A second signal does that at once and
exits within a second whether or not the streams got out.
"""
from __future__ import annotations

import threading

import uvicorn

#: After a second signal, how long the streams get to send their end before the server exits.
FORCE_GRACE = 1.0


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, scheduler, shutdown_timeout: float):
        super().__init__(config)
        self.scheduler, self.shutdown_timeout = scheduler, float(shutdown_timeout)
        self._timers: list[threading.Timer] = []

    def handle_exit(self, sig, frame) -> None:
        # Runs in the main thread between two bytecodes, maybe while it holds the scheduler's
        # lock (submit): anything that takes the lock runs on a timer thread. The signal is not
        # recorded for uvicorn to raise again after the run, so the process exits with status 0.
        if not self.should_exit:
            self.should_exit = True
            self._later(self.shutdown_timeout, self.scheduler.abort)
        else:
            self._later(0, self.scheduler.abort)
            self._later(FORCE_GRACE, self._force)

    def _force(self) -> None:
        self.force_exit = True

    def _later(self, seconds: float, fn) -> None:
        t = threading.Timer(seconds, fn)
        t.daemon = True
        t.start()
        self._timers.append(t)

    def cancel_timers(self) -> None:
        for t in self._timers:
            t.cancel()
