"""Next-token selection: greedy, or sampling with temperature, top-k, top-p and min-p.

The order of the steps follows transformers' logits processors, so a user moving from
``model.generate(...)`` gets the same distribution for the same settings:

    repetition penalty -> temperature -> top-k -> top-p -> min-p -> draw

Ties are always broken towards the lower token id (greedy picks it, top-k keeps it), so the
candidate set is a function of the logits alone and ``top_k=1`` is exactly greedy.

Every batch row draws from its own random stream, spawned from ``seed`` by row index. A
prompt therefore gets the same tokens for the same seed whether it runs alone or as row 0
of a batch, and whatever the other prompts of its batch are.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import numpy as np

__all__ = ["Sampler"]


class Sampler:
    """Pick one token per batch row from next-token logits.

    ``temperature == 0`` means greedy decoding; the filters (top-k, top-p, min-p) cannot
    change the argmax and are ignored, but the repetition penalty still applies, as in
    transformers' greedy search.
    """

    def __init__(
        self,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
    ):
        self.temperature = _check_float("temperature", temperature, ">= 0", lambda v: v >= 0)
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {top_k!r}")
        self.top_k = int(top_k)
        self.top_p = _check_float("top_p", top_p, "in (0, 1]", lambda v: 0 < v <= 1)
        self.min_p = _check_float("min_p", min_p, "in [0, 1]", lambda v: 0 <= v <= 1)
        self.repetition_penalty = _check_float(
            "repetition_penalty", repetition_penalty, "> 0", lambda v: v > 0)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))
                                 or seed < 0):
            raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}")
        self.seed = None if seed is None else int(seed)
        self._seed_seq = np.random.SeedSequence(self.seed)
        self._streams: list[np.random.Generator] = []
        self._rows: list[int] | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def __repr__(self) -> str:
        return (f"Sampler(temperature={self.temperature}, top_k={self.top_k}, top_p={self.top_p},"
                f" min_p={self.min_p}, repetition_penalty={self.repetition_penalty},"
                f" seed={self.seed})")

    def rows(self, rows: Sequence[int]) -> Sampler:
        """A view whose batch row ``j`` draws from this sampler's stream ``rows[j]``.

        Used when the prompts of one request run in several smaller batches: each prompt
        keeps the random stream of its position in the request.
        """
        view = copy.copy(self)
        base = self._rows
        view._rows = [base[r] if base is not None else int(r) for r in rows]
        return view

    def __call__(self, logits: np.ndarray, history: Sequence[Sequence[int]] | None = None
                 ) -> np.ndarray:
        """Return the chosen token ids, int64 ``[batch]``.

        ``history[b]`` is every token row ``b`` has seen so far (prompt and generated); only
        the repetition penalty reads it.
        """
        logits = self._check_logits(logits, history)
        out = np.empty(logits.shape[0], dtype=np.int64)
        for b in range(logits.shape[0]):
            row = self._penalized(logits[b], history[b] if history is not None else ())
            if self.greedy:
                out[b] = _argmax(row)
            else:
                out[b] = self._draw(self._filtered_probs(row), b)
        return out

    def distribution(self, logits: np.ndarray, history: Sequence[Sequence[int]] | None = None
                     ) -> np.ndarray:
        """The probabilities ``__call__`` draws from, float64 ``[batch, vocab]``.

        Tokens removed by the filters have probability exactly 0. Greedy gives one-hot rows.
        """
        logits = self._check_logits(logits, history)
        out = np.zeros(logits.shape, dtype=np.float64)
        for b in range(logits.shape[0]):
            row = self._penalized(logits[b], history[b] if history is not None else ())
            if self.greedy:
                out[b, _argmax(row)] = 1.0
            else:
                out[b] = self._filtered_probs(row)
        return out

    # -- steps -----------------------------------------------------------------------------

    def _check_logits(self, logits, history) -> np.ndarray:
        logits = np.asarray(logits)
        if logits.ndim != 2 or logits.shape[1] == 0:
            raise ValueError(f"logits must have shape [batch, vocab], got {logits.shape}")
        if not np.issubdtype(logits.dtype, np.floating):
            raise ValueError(f"logits must be floating point, got {logits.dtype}")
        if np.isnan(logits).any():
            raise ValueError("logits contain NaN; the model produced invalid output")
        if history is not None and len(history) != logits.shape[0]:
            raise ValueError(
                f"history has {len(history)} rows but logits have batch {logits.shape[0]}")
        return logits

    def _penalized(self, row: np.ndarray, history: Sequence[int]) -> np.ndarray:
        # float64 so a large vocabulary's softmax and cumulative sums stay exact enough
        # for top-p to pick the same set as a float32 reference would by intent.
        row = row.astype(np.float64)
        if self.repetition_penalty != 1.0 and len(history):
            seen = np.unique(np.asarray(history, dtype=np.int64))
            seen = seen[(seen >= 0) & (seen < row.shape[0])]
            vals = row[seen]
            row[seen] = np.where(vals > 0, vals / self.repetition_penalty,
                                 vals * self.repetition_penalty)
        if not np.isfinite(row).any() and not (row == np.inf).any():
            raise ValueError("every logit is -inf; nothing can be sampled")
        return row

    def _filtered_probs(self, row: np.ndarray) -> np.ndarray:
        vocab = row.shape[0]
        if np.isposinf(row).any():
            # +inf means "must pick"; spread the mass over those tokens only.
            row = np.where(np.isposinf(row), 0.0, -np.inf)
        else:
            # Shift before scaling: a tiny temperature then sends far-off logits to -inf
            # (probability 0, as intended) instead of the top ones to +inf.
            row = (row - row.max()) / self.temperature
        keep = np.isfinite(row)

        if 0 < self.top_k < keep.sum():
            ids = np.flatnonzero(keep)
            keep = np.zeros(vocab, dtype=bool)
            keep[_top_ids(row, ids, self.top_k)] = True

        probs = _softmax(row, keep)

        if self.top_p < 1.0:
            ids = np.flatnonzero(keep)
            order = ids[np.lexsort((ids, -probs[ids]))]
            cum = np.cumsum(probs[order])
            # The small slack keeps a set whose sum is top_p up to rounding from losing
            # its last member to a cumulative sum of 0.8999999 against top_p = 0.9.
            n = int(np.searchsorted(cum, self.top_p - 1e-12, side="left")) + 1
            keep = np.zeros(vocab, dtype=bool)
            keep[order[:min(n, len(order))]] = True
            probs = _softmax(row, keep)

        if self.min_p > 0.0:
            keep &= probs >= self.min_p * probs.max()
            probs = _softmax(row, keep)

        return probs

    def _draw(self, probs: np.ndarray, b: int) -> int:
        cum = np.cumsum(probs)
        x = self._stream(b).random() * cum[-1]
        # side="right" lands on the first id whose cumulative sum exceeds x, which always
        # has non-zero probability; only rounding at the very top can run past the end.
        i = int(np.searchsorted(cum, x, side="right"))
        if i >= len(cum) or probs[i] == 0.0:
            i = int(np.flatnonzero(probs)[-1])
        return i

    def _stream(self, b: int) -> np.random.Generator:
        row = self._rows[b] if self._rows is not None else b
        # Spawning is sequential in SeedSequence, so streams are created in row order and
        # stream r is always the r-th child, however rows are first requested.
        while len(self._streams) <= row:
            self._streams.append(np.random.Generator(np.random.PCG64(self._seed_seq.spawn(1)[0])))
        return self._streams[row]


def _check_float(name: str, value, rule: str, ok) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number {rule}, got {value!r}")
    value = float(value)
    if math.isnan(value) or math.isinf(value) or not ok(value):
        raise ValueError(f"{name} must be {rule}, got {value!r}")
    return value


def _argmax(row: np.ndarray) -> int:
    return int(np.argmax(row))  # np.argmax returns the first maximum: the lowest id


def _top_ids(row: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    vals = row[ids]
    # A partition finds the k-th largest value in O(vocab); only the few candidates at or
    # above it need sorting, by value then id so ties at the boundary keep the lowest ids.
    kth = np.partition(vals, len(vals) - k)[len(vals) - k]
    cand = ids[vals >= kth]
    order = np.lexsort((cand, -row[cand]))
    return cand[order[:k]]


def _softmax(row: np.ndarray, keep: np.ndarray) -> np.ndarray:
    probs = np.zeros(row.shape[0], dtype=np.float64)
    vals = row[keep]
    e = np.exp(vals - vals.max())
    probs[keep] = e / e.sum()
    return probs
