"""Continuous batching: requests join a running batch at the next step and leave when done.

A :class:`Scheduler` owns one session (shared KV-cache layout) with ``max_batch`` rows.
Requests queue (at most ``max_queue`` waiting), take a free row at the next step (their prompt
prefilled into that row while the other rows keep their state, at most ``prefill_chunk`` tokens
per step, sized to take about ``prefill_target_s`` while other rows wait, with a decode step of
the other rows between chunks), stream their tokens, and free
the row when they end (EOS, a stop string or id, ``max_tokens``, the model's length limit,
cancellation, or an error of their own). No HTTP here: ``kiln serve`` is a thin layer over this.

A request's settings are one :class:`~kiln.runtime.params.SamplingParams`; each request has its
own :class:`~kiln.runtime.decoding.RowDecoder` (what a token does to it: stop strings and ids,
limits, logprobs, the penalties' history, as in ``generate``) and its own
:class:`~kiln.runtime.sampling.Sampler`, drawing from row 0's stream of its seed, as a single prompt does in :func:`~kiln.runtime.generation.generate`. Each row of
the batch computes only from its own cache, so a request gets the same tokens whether it runs
alone or beside others.
"""
from __future__ import annotations

import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .decoding import RowDecoder, StopRules, id_set
from .grammar import row_constraint
from .params import SamplingParams, check_count
from .prefill_budget import ChunkSizer
from .sampling import Sampler
from .scheduler_draft import SoloDrafter
from .session import RowCache
from .speculative import DEFAULT_DRAFT_TOKENS, check_draft

__all__ = ["Scheduler", "Request", "QueueFull", "Event"]

#: The most prompt tokens prefilled per scheduler step by default (the activations' bound).
PREFILL_CHUNK = 256
#: The time a step's prefill aims at while other rows wait on it (their gap between tokens).
PREFILL_TARGET_S = 0.5


class QueueFull(RuntimeError):
    """The scheduler's queue holds ``max_queue`` waiting requests already."""


@dataclass
class Event:
    """What a request streams: a new token (``token``, and the text it made final, possibly
    empty), or the end (``finish_reason`` set: "eos", "stop", "length", "cancelled", "abort"
    when the scheduler was told to end everything (:meth:`Scheduler.abort`, a shutdown), or
    "error" when computing this request failed: :attr:`Request.error` says how).

    For a request that asked for logprobs, a token of the completion (not EOS or a stop id)
    also carries ``logprob`` and ``top_logprobs`` (``[(id, logprob)]``, most likely first):
    see :mod:`kiln.runtime.logprobs` for what they are of."""
    token: int | None = None
    text: str = ""
    finish_reason: str | None = None
    logprob: float | None = None
    top_logprobs: list | None = None


@dataclass
class Request:
    """One submitted request: its prompt, its settings and its row's decode state
    (``decoder``, which holds the generated ``ids``, the pieces of ``text``, the
    ``token_logprobs`` and the sampler)."""
    prompt: list[int]
    params: SamplingParams
    decoder: RowDecoder
    on_event: object = None
    finish_reason: str | None = None
    submitted: float = 0.0
    first_token_at: float | None = None
    #: why the request ended with finish_reason "error" (``"ExceptionType: message"``)
    error: str | None = None
    _events: queue.Queue = field(default_factory=queue.Queue)
    _cancelled: bool = False
    _row: int | None = None
    _next: int = 0
    _fed: int = 0               # prompt tokens in its row so far

    @property
    def ids(self) -> list[int]:
        return self.decoder.ids

    @property
    def text(self) -> list[str]:
        """The pieces of text streamed so far."""
        return self.decoder.pieces

    @property
    def token_logprobs(self) -> list:
        """``(token, logprob, [(id, logprob)])`` per token of ``ids``, when logprobs are asked for."""
        return self.decoder.token_logprobs

    @property
    def sampler(self) -> Sampler:
        return self.decoder.sampler

    @sampler.setter
    def sampler(self, sampler) -> None:
        self.decoder.sampler = sampler

    @property
    def max_tokens(self) -> int:
        return self.params.max_tokens

    @property
    def logprobs(self) -> int | None:
        return self.params.logprobs

    @property
    def prefilling(self) -> bool:
        """Whether it holds a row whose prompt is not all in yet (no token drawn)."""
        return self._row is not None and self._fed < len(self.prompt)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt)

    @property
    def completion_tokens(self) -> int:
        return self.decoder.count

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Stop generating; the row is freed at the scheduler's next step."""
        self._cancelled = True

    def __iter__(self):
        """Events until the end (the last one carries ``finish_reason``)."""
        while True:
            ev = self._events.get()
            yield ev
            if ev.finish_reason is not None:
                return

    def result(self, timeout: float | None = None) -> "Request":
        for _ in self:
            pass
        return self

    def _emit(self, ev: Event) -> None:
        if self.on_event is not None:
            self.on_event(ev)
        else:
            self._events.put(ev)


class Scheduler:
    def __init__(self, session, tokenizer=None, *, max_batch: int = 4, max_queue: int = 64,
                 eos_ids: Iterable[int] | None = None, prefill_chunk: int | None = PREFILL_CHUNK,
                 prefix_cache=None, prefill_target_s: float | None = PREFILL_TARGET_S,
                 draft=None, draft_tokens: int = DEFAULT_DRAFT_TOKENS):
        """``prefill_chunk``: the most prompt tokens prefilled per step (None: whole prompts).
        A long prompt joins its row that many tokens at a time, with a decode step of the
        running rows between chunks, so it delays their next token by one chunk's prefill at
        most, and its prefill's activations are one chunk's. ``prefill_target_s``: while other
        rows are running, chunks are sized to take about that long (see
        :mod:`~kiln.runtime.prefill_budget`; None: always ``prefill_chunk``).

        ``prefix_cache``: a :class:`~kiln.runtime.prefix_cache.PrefixCache` (None: none): a
        prompt starts from the stored keys of its longest stored beginning, and every row's
        blocks are offered to it once its prompt is in and when it ends. ``on_end``, when set,
        is called with each request as it ends (the server's metrics).

        ``draft``: a draft model's session (batch 1) for speculative rounds while one request
        runs alone (:mod:`kiln.runtime.scheduler_draft`), ``draft_tokens`` proposals a round."""
        if max_batch < 1 or max_queue < 0 or (prefill_chunk is not None and prefill_chunk < 1):
            raise ValueError("max_batch and prefill_chunk must be >= 1 and max_queue >= 0")
        self.session, self.tokenizer = session, tokenizer
        self.max_batch, self.max_queue = int(max_batch), int(max_queue)
        self.prefill_chunk = None if prefill_chunk is None else int(prefill_chunk)
        self.chunks = ChunkSizer(self.prefill_chunk, prefill_target_s)
        self.eos_ids = id_set(getattr(tokenizer, "eos_ids", None) if eos_ids is None else eos_ids)
        self.prefix_cache = prefix_cache
        self.on_end = None
        session.start_rows(self.max_batch)
        self.rows: list[Request | None] = [None] * self.max_batch
        self.waiting: deque[Request] = deque()
        self._admitted: deque[Request] = deque()     # holding a row, prompt not all in yet
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._aborting = False
        self.steps = 0
        self.step_rows = 0          # the rows the decode steps advanced, all together
        self.drafter = None
        if draft is not None:
            check_draft(session, draft, draft_tokens)
            self.drafter = SoloDrafter(draft, draft_tokens)

    @property
    def max_length(self) -> int | None:
        return self.session.max_length

    @property
    def vocab_size(self) -> int | None:
        """The ids a prompt may hold are 0..vocab_size-1 (None: the session does not say)."""
        return self.session.vocab_size

    # ---- requests -------------------------------------------------------------------------
    def submit(self, prompt: Sequence[int], *, params: SamplingParams | None = None,
               eos_ids: Iterable[int] | None = None, on_event=None, sample_stream: int = 0,
               **settings) -> Request:
        """Queue a request; raises ValueError for bad settings, QueueFull when the queue is full.

        The settings are ``params`` and/or keyword arguments by its field names (``max_tokens``
        128 unless given). ``logprobs`` (None, or how many top alternatives, 0..20) asks for
        every token's logprob. ``sample_stream`` picks which of the seed's random streams
        draws: row ``sample_stream`` of ``generate``'s batch, so the ``n`` choices of one
        seeded prompt are its streams 0..n-1 (stream 0 is what a single prompt uses).
        """
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("the prompt has no tokens; the model needs at least one")
        vocab = self.vocab_size
        outside = next((t for t in prompt if not 0 <= t < vocab), None) if vocab else None
        if outside is not None:
            raise ValueError(f"the prompt's token id {outside} is not in the vocabulary [0, {vocab})")
        params = SamplingParams.of(params, **settings)
        if self.max_length is not None and len(prompt) > self.max_length:
            raise ValueError(f"the prompt has {len(prompt)} tokens but the model holds at most "
                             f"{self.max_length}")
        rules = StopRules.of(self.tokenizer, params, self.eos_ids if eos_ids is None else eos_ids)
        sampler = Sampler.of(params, rules.end_ids)
        if check_count("sample_stream", sample_stream):
            sampler = sampler.rows([sample_stream])
        limit = params.max_tokens
        if self.max_length is not None:
            limit = min(limit, self.max_length - len(prompt))
        constraint = row_constraint(params.grammar, self.tokenizer, self.vocab_size)
        req = Request(prompt, params, RowDecoder(rules, prompt, limit=limit, logprobs=params.logprobs,
                                                 sampler=sampler, constraint=constraint), on_event)
        req.submitted = time.perf_counter()
        with self._lock:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting already "
                                f"(max_queue={self.max_queue})")
            self.waiting.append(req)
            self._wake.notify()
        return req

    @property
    def active(self) -> int:
        return sum(r is not None for r in self.rows)

    def idle(self) -> bool:
        with self._lock:
            return not self.waiting and self.active == 0

    # ---- one step ---------------------------------------------------------------------------
    def step(self) -> bool:
        """Admit waiting requests into free rows, feed prompts into their rows (at most
        ``prefill_chunk`` tokens in all, oldest request first), then advance every row whose
        prompt is in by one token. Returns whether there was anything to do.

        A failure that belongs to one request (its prefill, its sampling, its event listener)
        ends that request alone with "error"; the others go on. Only a failure of the batched
        decode step, which every running row shares, ends the rows that ran in it."""
        worked = False
        for r, req in enumerate(self.rows):
            if req is not None and (req._cancelled or self._aborting):
                self._finish(req, "cancelled" if req._cancelled else "abort")
        while None in self.rows:
            with self._lock:
                if not self.waiting:
                    break
                req = self.waiting.popleft()
            if req._cancelled or self._aborting:
                self._end(req, "cancelled" if req._cancelled else "abort")
                continue
            worked = True
            if req.decoder.limit <= 0:
                self._end(req, "length")
                continue
            r = self.rows.index(None)
            self.rows[r], req._row, req._fed = req, r, 0
            self.session.free_row(r)
            self._admitted.append(req)
        self._prefill()
        running = [r for r, req in enumerate(self.rows) if req is not None and not req.prefilling]
        if not running:
            return worked or bool(self._admitted)
        if self.drafter is not None and len(running) == 1 and not self._admitted and not self.waiting \
                and self._speculate(self.rows[running[0]]):
            return True
        tokens = np.zeros(self.max_batch, dtype=np.int64)
        active = np.zeros(self.max_batch, dtype=bool)
        for r in running:
            tokens[r], active[r] = self.rows[r]._next, True
        try:
            lo, logits = self._step(tokens, active)
        except Exception as e:
            for r in running:
                self._fail(self.rows[r], e)
            return True
        self.steps += 1
        self.step_rows += len(running)
        for r in running:
            self._take(self.rows[r], logits[r - lo])
        return True

    def _step(self, tokens: np.ndarray, active: np.ndarray) -> tuple[int, np.ndarray]:
        """The decode step: ``(lo, logits of rows lo..)``, by :meth:`RowCache.step_span` (only
        the rows it ran) where the session's class steps as RowCache does, else by its ``step``
        (every row): a wrapper that overrides ``step`` or forwards attributes is stepped
        through its own ``step``."""
        cls = type(self.session)
        if getattr(cls, "step", None) is RowCache.step and getattr(cls, "step_span", None) is RowCache.step_span:
            return self.session.step_span(tokens, active)
        return 0, self.session.step(tokens, active)

    def _prefill(self) -> None:
        """Feed the admitted prompts into their rows, oldest first, up to this step's budget of
        tokens in all (``prefill_chunk``, less while other rows wait); a prompt that is all in
        draws its first token."""
        others = any(req is not None and not req.prefilling for req in self.rows)
        budget = self.chunks.budget(others)
        fed, began = 0, time.perf_counter()
        while self._admitted and (budget is None or budget > 0):
            req = self._admitted[0]
            if req.done:                 # cancelled or failed meanwhile
                self._admitted.popleft()
                continue
            try:
                if req._fed == 0 and self.prefix_cache is not None:
                    req._fed = self.prefix_cache.reuse(self.session, req._row, req.prompt)
                end = len(req.prompt) if budget is None else min(len(req.prompt), req._fed + budget)
                if req._fed == 0 and end == len(req.prompt):
                    logits = self.session.join_row(req._row, req.prompt)
                else:
                    logits = self.session.extend_row(req._row, req.prompt[req._fed:end])
            except Exception as e:
                self._admitted.popleft()
                self._fail(req, e)
                continue
            if budget is not None:
                budget -= end - req._fed
            fed += end - req._fed
            req._fed = end
            if end == len(req.prompt):
                self._admitted.popleft()
                self._keep(req)
                self._take(req, logits)
        if others and fed:
            self.chunks.measured(fed, time.perf_counter() - began)

    def _take(self, req: Request, logits: np.ndarray, token: int | None = None) -> None:
        """Sample the request's next token from its logits (or take ``token``, which a
        speculative round chose from them) and stream it; a failure ends this request alone."""
        try:
            self._sample(req, logits, token)
        except Exception as e:
            self._fail(req, e)

    def _speculate(self, req: Request) -> bool:
        """A speculative round for the request running alone; False when no proposal fits
        before its limit (a decode step serves it)."""
        try:
            decided = self.drafter.round(self.session, req)
        except Exception as e:
            self._fail(req, e)
            return True
        if decided is None:
            return False
        self.steps += 1
        for token, logits in decided:
            self._take(req, logits, token)
            if req.done:
                break
        return True

    def _sample(self, req: Request, logits: np.ndarray, token: int | None = None) -> None:
        if req._cancelled:
            self._finish(req, "cancelled")
            return
        row = req.decoder
        t = row.sample(logits) if token is None else token
        if req.first_token_at is None:
            req.first_token_at = time.perf_counter()
        piece, logprob, top = row.accept(t, logits)
        req._emit(Event(token=t, text=piece, logprob=logprob, top_logprobs=top))
        if row.reason is None and row.at_limit:
            piece = row.end()
            if piece:
                req._emit(Event(text=piece))
        if row.reason is not None:
            self._finish(req, row.reason)
        else:
            req._next = t

    def _fail(self, req: Request, e: BaseException) -> None:
        """End one request with "error", its message kept on it and logged."""
        if req.done:
            return
        req.error = f"{type(e).__name__}: {e}"
        print(f"kiln scheduler: a request failed ({req.error}); the others go on", file=sys.stderr)
        self._finish(req, "error")

    def _keep(self, req: Request) -> None:
        """Offer what the request's row holds to the prefix cache; a failure there costs only
        the reuse, not the request."""
        if self.prefix_cache is None or req._row is None:
            return
        try:
            held = int(self.session.lengths[req._row])
            self.prefix_cache.keep(self.session, req._row, req.decoder.history[:held])
        except Exception as e:
            print(f"kiln scheduler: the prefix cache could not keep a row ({type(e).__name__}: {e})",
                  file=sys.stderr)

    def _finish(self, req: Request, reason: str) -> None:
        if req._row is not None:
            if reason != "error":
                self._keep(req)
            self.session.free_row(req._row)
            self.rows[req._row] = None
            req._row = None
        self._end(req, reason)

    def _end(self, req: Request, reason: str) -> None:
        req.finish_reason = reason
        if self.on_end is not None:
            try:
                self.on_end(req)
            except Exception as e:      # metrics must not end the scheduler
                print(f"kiln scheduler: on_end failed ({type(e).__name__}: {e})", file=sys.stderr)
        try:
            req._emit(Event(finish_reason=reason))
        except Exception as e:          # its listener failed: the request has ended anyway
            print(f"kiln scheduler: a request's last event failed ({type(e).__name__}: {e})",
                  file=sys.stderr)

    # ---- the background loop ---------------------------------------------------------------
    #: called on the background loop's thread after each step (the server: let the event loop
    #: hand out the step's tokens before the next step starts; see loop_mailbox)
    between_steps = None

    def start(self) -> "Scheduler":
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="kiln-scheduler", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self.waiting and self.active == 0:
                    self._wake.wait(0.5)
                if self._stopping and not self.waiting and self.active == 0:
                    return
            try:
                self.step()
            except Exception as e:    # not one request's failure (step handles those): a bug
                for req in [*self.rows]:
                    if req is not None:
                        self._fail(req, e)
            if self.between_steps is not None:
                try:
                    self.between_steps()
                except Exception as e:    # a listener's hook must not end the scheduler
                    print(f"kiln scheduler: between_steps failed ({type(e).__name__}: {e})", file=sys.stderr)

    def abort(self) -> None:
        """End every running and waiting request at the next step, and any submitted later,
        with finish_reason "abort" (a shutdown's deadline). Safe from any thread."""
        with self._lock:
            self._aborting = True
            self._wake.notify()

    def stop(self, timeout: float | None = None) -> None:
        """Let queued and running requests finish, then end the loop."""
        with self._lock:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)
