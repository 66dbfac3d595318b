"""The contract between the runtime and a backend: what a session is, and the per-row KV-cache
bookkeeping every backend shares.

* :class:`Session` is the least a backend provides: ``reset``, ``forward`` and ``max_length``.
  That is enough for :func:`kiln.runtime.generation.generate` (and beam search with one beam);
  the tests drive the decode loop with fakes that have only this.
* :class:`RowSession` is the whole protocol the runtime uses: the ragged prefill of
  generation, the rows that join and leave a running batch (the scheduler), the reordering of
  rows (beam search), ``vocab_size`` (the server's prompt check).
* :class:`RowCache` is a base holding what both sessions (ONNX Runtime, TVM) do the same way:
  the lengths of the rows, the capacity and its growth, rows that join, extend and leave, the
  reordering of rows and longrope's recompute at its switch. A backend subclasses it and
  implements the hooks below ``# ---- a backend's own``; nothing else.

Capabilities a backend may lack are declared, not probed: ``ragged_prefill`` says whether
each row of the cache has its own length (``prefill`` of prompts of different lengths, and the
scheduler's rows); :func:`ragged` and :func:`reorders_rows` read them for sessions that are
not a :class:`RowCache` (fakes, wrappers).
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from .rows import check_extend, check_join, doubled_capacity, right_padded, row_order

__all__ = ["Session", "RowSession", "RowCache", "ragged", "reorders_rows", "truncates", "last_logits"]


@runtime_checkable
class Session(Protocol):
    """What a backend provides: a model with a KV cache for a fixed batch.

    ``forward`` appends ``ids`` (int64 ``[batch, seq]``) to the cache and returns float32
    logits ``[batch, seq, vocab]``, or ``[batch, 1, vocab]`` for the last position only when
    ``last_only`` is true (which lets a backend skip the LM head for the rest of a prefill).
    ``max_length`` is the most tokens one row of the cache can hold, or None if unbounded.

    Optional: ``reorder_rows(index)`` (int64 ``[batch]``) makes row b of the cache hold what
    row ``index[b]`` held, rows repeating or dropping out; beam search
    (:mod:`kiln.runtime.beam`) needs it for ``num_beams`` > 1. ``truncate(length)`` makes every
    row forget its tokens past the first ``length``; speculative decoding
    (:mod:`kiln.runtime.speculative`) needs it to take back the draft tokens the target rejected.
    """

    max_length: int | None

    def reset(self, batch: int = 1) -> None: ...

    def forward(self, ids: np.ndarray, last_only: bool = False) -> np.ndarray: ...


@runtime_checkable
class RowSession(Session, Protocol):
    """Everything the runtime calls on a backend's session (both kiln backends implement it).

    ``prefill(prompts)``: every row of a fresh cache starts with its own prompt, in one run;
    only when ``ragged_prefill``. ``start_rows(batch)`` empties a cache for a scheduler;
    ``join_row(r, prompt)`` prefills row r alone, ``extend_row(r, ids)`` appends to it,
    ``step(tokens, active)`` advances every active row by one token (``step_span``, where a
    session has it, does the same and returns only the logits of the rows it ran, with the
    first one's index), ``free_row(r)`` empties
    row r. ``read_kv(r, start, stop)`` copies positions start..stop of row r's keys and values
    out to the host, ``load_kv(r, pieces)`` makes row r hold such copies (the prefix cache's
    two operations). ``vocab_size``: the ids a prompt may hold are below it (None: unknown)."""

    vocab_size: int | None
    ragged_prefill: bool
    lengths: np.ndarray

    def prefill(self, prompts: list[list[int]], last_only: bool = True) -> np.ndarray: ...

    def start_rows(self, batch: int) -> None: ...

    def join_row(self, r: int, prompt: list[int]) -> np.ndarray: ...

    def extend_row(self, r: int, ids: list[int]) -> np.ndarray: ...

    def step(self, tokens: np.ndarray, active: np.ndarray) -> np.ndarray: ...

    def free_row(self, r: int) -> None: ...

    def reorder_rows(self, index) -> None: ...

    def read_kv(self, r: int, start: int, stop: int) -> np.ndarray: ...

    def load_kv(self, r: int, pieces: list[np.ndarray]) -> None: ...
    def truncate(self, length: int) -> None: ...


def ragged(session) -> bool:
    """Whether the session prefills prompts of different lengths in one run (each row of its
    KV cache has its own length); a minimal :class:`Session` does not."""
    return bool(getattr(session, "ragged_prefill", False))


def reorders_rows(session) -> bool:
    """Whether beam search can move the session's cache rows (``reorder_rows``)."""
    return callable(getattr(session, "reorder_rows", None))


def truncates(session) -> bool:
    """Whether the session can forget its last tokens (``truncate``), as speculative decoding
    needs."""
    return callable(getattr(session, "truncate", None))


def last_logits(logits, batch: int) -> np.ndarray:
    """The last position's logits of a ``forward``'s answer, [batch, vocab], checked to be the
    [batch, seq, vocab] the protocol promises (a backend's bug is named, not a shape error)."""
    logits = np.asarray(logits)
    if logits.ndim != 3 or logits.shape[0] != batch or logits.shape[1] == 0:
        raise RuntimeError(f"session.forward returned logits of shape {logits.shape}; "
                           f"expected [{batch}, seq, vocab]")
    return logits[:, -1, :]


class RowCache:
    """The per-row KV bookkeeping of a session; see the module's docstring.

    State: ``batch``; ``lengths`` (int64 ``[batch]``, the tokens each row holds) and ``length``
    (their maximum); ``capacity`` (positions allocated per row); ``max_length``; and for
    longrope (``recompute_past`` set) ``history``, the ids every row holds.

    Class attributes a backend sets: ``join_chunk`` (a joining prompt is prefilled that many
    tokens at a time; None: at once) and ``no_rows`` / ``no_ragged`` (why an artifact whose
    rows share one length refuses the scheduler's rows / a ragged prefill)."""

    join_chunk: int | None = None
    no_rows = "rows can join a running batch only when each row of the KV cache has its own length"
    no_ragged = "this artifact's rows share one length; prompts of one run must have the same length"

    max_length: int | None = None
    vocab_size: int | None = None
    recompute_past: int | None = None
    history: np.ndarray | None = None
    capacity = 0
    batch = 0

    # ---- a backend's own ----------------------------------------------------------------
    @property
    def ragged_prefill(self) -> bool:
        """Whether each row of the cache has its own length."""
        return False

    def reset(self, batch: int = 1) -> None:
        raise NotImplementedError

    def forward(self, ids: np.ndarray, last_only: bool = False) -> np.ndarray:
        raise NotImplementedError

    def _prefill_padded(self, ids, lengths, positions) -> np.ndarray:
        """One run over a fresh cache of right-padded prompts whose rows end at ``lengths``."""
        raise NotImplementedError

    def _extend_one(self, r: int, ids: list[int], cached: int, every: bool = False) -> np.ndarray:
        """Run ``ids`` over row r alone (it holds ``cached`` tokens, room for the new ones is
        allocated); returns the logits of the last, float32 [vocab] (``every``: of each,
        [len(ids), vocab]; asked only by a speculative round, :meth:`extend_row`)."""
        raise NotImplementedError

    def _step_all(self, ids: np.ndarray, before: np.ndarray) -> np.ndarray:
        """One token per row (``ids`` [batch, 1]) written at ``before``; returns the logits
        [batch, 1, vocab]. Any change the run makes to ``lengths`` is overwritten."""
        raise NotImplementedError

    #: whether :meth:`_step_rows` runs a step over a span of rows, with each row's result the
    #: same at any span (the backend's kernels are batch-invariant up to ``max_batch``)
    steps_rows = False

    def _step_rows(self, ids: np.ndarray, before: np.ndarray, lo: int) -> np.ndarray:
        """As :meth:`_step_all` for rows lo .. lo + len(ids) only; the others are not touched."""
        raise NotImplementedError

    def _reorder_cache(self, index: np.ndarray) -> None:
        """Row b of the cache buffers takes what row index[b] held."""
        raise NotImplementedError

    def _resize(self, capacity: int, keep: int) -> None:
        """Buffers of ``capacity`` positions per row holding the first ``keep`` of the old."""
        raise NotImplementedError

    def _read_kv(self, r: int, start: int, stop: int) -> np.ndarray:
        """A host copy of row r's cache at positions start..stop: [cache tensors, kv_heads,
        stop - start, head_dim], the tensors in the backend's own order."""
        raise NotImplementedError

    def _write_kv(self, r: int, start: int, kv: np.ndarray) -> None:
        """Row r's cache at positions start..start + kv.shape[2] takes ``kv`` (as
        ``_read_kv`` returns it; room is allocated)."""
        raise NotImplementedError
    def _truncate(self, length: int) -> None:
        """Drop what the cache holds past ``length`` positions. Nothing to do for a cache whose
        rows are written at their lengths (the next tokens overwrite the dead positions); a
        cache that is exactly as long as what it holds (ONNX Runtime's concat layout) is cut."""

    # ---- shared -------------------------------------------------------------------------
    def _reset_rows(self, batch: int) -> None:
        """Every row empty (a backend's ``reset`` calls this and then sizes its buffers)."""
        self.batch = batch
        self._set_lengths(np.zeros(batch, dtype=np.int64))
        self.history = np.zeros((batch, 0), dtype=np.int64) if self.recompute_past else None

    def _set_lengths(self, lengths) -> None:
        self.lengths = np.array(lengths, dtype=np.int64)
        self.length = int(self.lengths.max()) if self.lengths.size else 0

    def _checked_ids(self, ids) -> np.ndarray:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[0] != self.batch:
            raise ValueError(f"ids must be [batch={self.batch}, seq], got {list(ids.shape)}")
        return ids

    def _grow(self, needed: int) -> None:
        """Room for ``needed`` tokens per row: the capacity doubles (one copy, amortised)."""
        self._resize(doubled_capacity(self.capacity, needed, self.max_length), int(self.lengths.max()))

    def _recomputed_at_switch(self, ids: np.ndarray, last_only: bool):
        """Longrope models rotate with other frequencies once a sequence is longer than the
        switch (``recompute_past``). As transformers' generate does for them, the call that
        crosses it runs the whole sequence again from an empty cache, so every cached key uses
        the long frequencies: returns that call's logits, or None (and records ``ids`` in
        ``history``) for a call that does not cross it."""
        seen = np.concatenate([self.history, ids], axis=1)
        if self.length and self.length <= self.recompute_past < seen.shape[1]:
            n = ids.shape[1]
            self.reset(self.batch)
            logits = self.forward(seen, last_only)
            return logits if last_only else logits[:, -n:]
        self.history = seen
        return None

    def prefill(self, prompts: list[list[int]], last_only: bool = True) -> np.ndarray:
        """Start every row of a fresh cache with its own prompt, in one run: right-padded to
        the longest, each row's length telling attention where its keys end. Returns the
        logits of each row's last prompt token, [batch, 1, vocab] (or [batch, longest, vocab]
        with rows past their prompt undefined when ``last_only`` is false)."""
        if not self.ragged_prefill:
            raise ValueError(self.no_ragged)
        ids, lengths, positions = right_padded(prompts, self.batch, self.length, last_only)
        logits = self._prefill_padded(ids, lengths, positions)
        self._set_lengths(lengths)
        return logits

    def start_rows(self, batch: int) -> None:
        """An empty cache of ``batch`` rows for a scheduler: rows join with :meth:`join_row`,
        all rows advance together with :meth:`step`, and :meth:`free_row` empties one."""
        if not self.ragged_prefill:
            raise ValueError(self.no_rows)
        self.reset(batch)

    def join_row(self, r: int, prompt: list[int]) -> np.ndarray:
        """Prefill ``prompt`` into row ``r`` while the other rows keep their state
        (``join_chunk`` tokens at a time); returns the logits of its last token, float32
        [vocab]."""
        check_join(r, len(prompt), self.batch, self.max_length)
        self.free_row(r)
        chunk = self.join_chunk or len(prompt)
        for a in range(0, len(prompt), chunk):
            logits = self.extend_row(r, prompt[a:a + chunk])
        return logits

    def extend_row(self, r: int, ids: list[int], every: bool = False) -> np.ndarray:
        """Append ``ids`` to row ``r`` (a prompt fed a chunk at a time) while the other rows
        keep their state; returns the logits of its last token, float32 [vocab] (``every``:
        of each token, [len(ids), vocab], as a speculative round checks its proposals)."""
        cached, n = int(self.lengths[r]), len(ids)
        check_extend(r, cached, n, self.batch, self.max_length)
        if cached + n > self.capacity:
            self._grow(cached + n)
        logits = self._extend_one(r, ids, cached, every=True) if every else self._extend_one(r, ids, cached)
        self.lengths[r] = cached + n
        self.length = int(self.lengths.max())
        return logits

    def read_kv(self, r: int, start: int, stop: int) -> np.ndarray:
        """A host copy of the keys and values row ``r`` holds at positions start..stop (see
        ``_read_kv``): what :mod:`kiln.runtime.prefix_cache` keeps of a prompt."""
        if not (0 <= r < self.batch and 0 <= start < stop <= self.lengths[r]):
            raise ValueError(f"row {r} holds {int(self.lengths[r]) if 0 <= r < self.batch else 0} "
                             f"positions; cannot read {start}..{stop}")
        return self._read_kv(r, start, stop)

    def load_kv(self, r: int, pieces: list[np.ndarray]) -> None:
        """Row ``r`` holds exactly ``pieces`` (``read_kv``'s copies of consecutive positions,
        from 0 on) while the other rows keep their state; :meth:`extend_row` then appends the
        rest of a prompt. The keys were computed at the same positions, so they are what a
        prefill of the same tokens would have written."""
        if not self.ragged_prefill or self.history is not None:
            raise ValueError(self.no_rows)
        n = sum(int(p.shape[2]) for p in pieces)
        check_join(r, n, self.batch, self.max_length)
        self.free_row(r)
        if n > self.capacity:
            self._grow(n)
        at = 0
        for p in pieces:
            self._write_kv(r, at, p)
            at += int(p.shape[2])
        self.lengths[r] = n
        self.length = int(self.lengths.max())

    def free_row(self, r: int) -> None:
        self.lengths[r] = 0
        self.length = int(self.lengths.max())

    def truncate_row(self, r: int, length: int) -> None:
        """Row ``r`` keeps at most its first ``length`` tokens, the other rows theirs (a
        scheduler's speculative round takes back the rejected proposals of one row)."""
        self.lengths[r] = min(int(self.lengths[r]), max(int(length), 0))
        self.length = int(self.lengths.max())

    def step(self, tokens: np.ndarray, active: np.ndarray) -> np.ndarray:
        """One decode step of every row: row b appends ``tokens[b]`` at its own length.
        Rows not ``active`` keep their cache and length (a row between two chunks of its
        prompt): their token is written just past their end, where their next tokens go, and
        their logits are meaningless. Returns float32 [batch, vocab]."""
        lo, part = self.step_span(tokens, active)
        if lo == 0 and part.shape[0] == self.batch:
            return part
        logits = np.zeros((self.batch, *part.shape[1:]), dtype=part.dtype)
        logits[lo:lo + part.shape[0]] = part
        return logits

    def step_span(self, tokens: np.ndarray, active: np.ndarray) -> tuple[int, np.ndarray]:
        """:meth:`step`, returning ``(lo, logits)`` with the logits of rows ``lo..lo+len``
        only, the span of rows the step ran over (every active row is in it): the scheduler's
        way, which spares a lone request a [batch, vocab] array per token (1.5 MB at
        SmolLM2's vocabulary and 8 rows, ~0.15 ms a step to allocate and fill)."""
        ids = np.ascontiguousarray(np.asarray(tokens, dtype=np.int64).reshape(self.batch, 1))
        active = np.asarray(active, dtype=bool)
        if self.recompute_past and active.all():
            return 0, self.forward(ids, last_only=True)[:, -1]      # through the switch's recompute
        before = self.lengths.copy()
        span = self._active_span(active)
        if span is None:
            lo, logits = 0, self._step_all(ids, before)
        else:
            lo, hi = span
            logits = self._step_rows(ids[lo:hi], before[lo:hi], lo)
        self._set_lengths(np.where(active, before + 1, before))
        return lo, logits[:, -1]

    def _active_span(self, active: np.ndarray) -> tuple[int, int] | None:
        """The rows a step runs over, lo..hi, when the backend can step some rows only and
        fewer than all are in use (a lone client pays for one row, not ``max_batch``)."""
        if not self.steps_rows or not active.any():
            return None
        rows = np.flatnonzero(active)
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        return None if (lo, hi) == (0, self.batch) else (lo, hi)

    def truncate(self, length: int) -> None:
        """Every row keeps at most its first ``length`` tokens (speculative decoding takes back
        the draft tokens the target rejected); its next tokens go right after them."""
        if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 0:
            raise ValueError(f"truncate takes a length >= 0, got {length!r}")
        length = int(length)
        self._set_lengths(np.minimum(self.lengths, length))
        if self.history is not None:
            self.history = self.history[:, :length]
        self._truncate(length)

    def reorder_rows(self, index) -> None:
        """Row b of the cache becomes what row ``index[b]`` held (beam search's step from
        parent beams to their children); rows may repeat or drop out."""
        index = row_order(index, self.batch)
        if index is None:
            return
        self._reorder_cache(index)
        self._set_lengths(self.lengths[index])
        if self.history is not None:
            self.history = self.history[index]
