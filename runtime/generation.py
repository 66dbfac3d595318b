"""Text generation on top of any backend session: the decode loop, stop handling, streaming.

Backends (ONNX Runtime, TVM) only implement :class:`Session`: a KV cache that grows by
whatever ``forward`` is given. Everything here is numpy and plain Python, so every backend
generates, stops and streams the same way, and the loop is tested with a fake session.

Decisions a user may want to know:

* The settings are one :class:`~kiln.runtime.params.SamplingParams` (``params=``), or keyword
  arguments that build one (``max_new_tokens=``, ``temperature=``, ...).
* What a token does to its row (``result.ids`` without the EOS token, ``result.text`` cut
  before the first stop string, stop strings that are special tokens) is
  :class:`~kiln.runtime.decoding.RowDecoder`'s, shared with the scheduler and beam search.
* A batch of prompts runs as one batch when the session keeps a length per cache row
  (``session.ragged_prefill``: its ``prefill`` takes prompts of different lengths); otherwise
  each group of equal-length prompts runs on its own. Results come back in the order of the
  prompts either way, and with a seed each prompt gets the same tokens as it would alone
  (see :mod:`kiln.runtime.sampling`).
* ``max_length`` of the session bounds prompt plus new tokens; hitting it ends generation
  with ``finish_reason == "length"``.
* A ``grammar`` (:mod:`kiln.runtime.grammar`) masks each row's logits with its own matcher
  before the batch's sampler draws, as the scheduler's rows do.
"""
from __future__ import annotations

import inspect
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from .decoding import RowDecoder, StopRules, id_set, timing_summary
from .grammar import row_constraint
from .params import SamplingParams, check_count
from .sampling import Sampler
from .session import Session, last_logits, ragged
from .speculative import DEFAULT_DRAFT_TOKENS, check_draft, speculative_ids

__all__ = ["Session", "SamplingParams", "GenerationResult", "PAD_ID", "generate_ids", "generate",
           "stream", "prompt_batch", "is_id_list"]

#: What :func:`generate_ids` yields for a batch row that has already finished.
PAD_ID = -1

FinishReason = Literal["eos", "stop", "length"]


@dataclass
class GenerationResult:
    """One prompt's completion.

    ``timings`` holds ``prefill_s``, ``decode_s``, ``decode_steps``, ``prefill_tokens_per_s``
    and ``tokens_per_s`` (decode steps per second). Prompts that ran as one batch share
    their batch's timings.
    """

    ids: list[int]
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    timings: dict[str, float] = field(default_factory=dict)


def generate_ids(
    session: Session,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampler: Sampler,
    eos_ids: Iterable[int] = (),
    stop_ids: Iterable[int] | None = None,
    timings: dict | None = None,
    mask=None,
) -> Iterator[np.ndarray]:
    """Yield the new token of every batch row, int64 ``[batch]``, one step at a time.

    All prompts must have the same length. A row ends when it produces a token of
    ``eos_ids`` or ``stop_ids`` (that token is still yielded); from then on its entries are
    :data:`PAD_ID`. Iteration stops when every row has ended, after ``max_new_tokens`` steps,
    or when the session's ``max_length`` is reached. ``timings``, if given, is filled with
    ``prefill_s``, ``decode_s`` and ``decode_steps`` as the loop runs, counting only the
    model and the sampler, not the time the caller spends between steps. ``mask``, if given,
    takes each step's logits ``[batch, vocab]`` before the sampler and returns the logits to
    draw from (a grammar's: the caller has taken the previous tokens by then).
    """
    prompts = _check_prompt_batch(prompt_ids, ragged=ragged(session))
    check_count("max_new_tokens", max_new_tokens)
    ends = id_set(eos_ids) | id_set(stop_ids)
    batch, n = len(prompts), max(len(p) for p in prompts)

    limit = max_new_tokens
    max_length = session.max_length
    if max_length is not None:
        if n > max_length:
            raise ValueError(f"the prompt has {n} tokens but the model holds at most "
                             f"{max_length}")
        limit = min(limit, max_length - n)
    if timings is not None:
        timings.update(prefill_s=0.0, decode_s=0.0, decode_steps=0)
    # Not a generator itself, so bad arguments raise here rather than at the first next().
    return _decode_loop(session, prompts, batch, limit, sampler, ends, timings, mask)


def _decode_loop(session, prompts, batch, limit, sampler, ends, timings, mask=None):
    if limit == 0:
        return
    session.reset(batch)
    history = [list(p) for p in prompts]
    done = np.zeros(batch, dtype=bool)
    fed = np.zeros(batch, dtype=np.int64)

    start = time.perf_counter()
    if len({len(p) for p in prompts}) > 1:
        logits = last_logits(session.prefill(prompts, last_only=True), batch)
    else:
        logits = last_logits(session.forward(np.asarray(prompts, dtype=np.int64), last_only=True),
                              batch)
    prompt_lens = [len(p) for p in prompts]
    tokens = sampler(logits if mask is None else mask(logits), history, prompt_lens)
    if timings is not None:
        timings["prefill_s"] = time.perf_counter() - start

    for step in range(limit):
        tokens = np.where(done, PAD_ID, tokens).astype(np.int64)
        yield tokens.copy()
        for b in np.flatnonzero(~done):
            t = int(tokens[b])
            history[b].append(t)
            fed[b] = t
            if t in ends:
                done[b] = True
        if done.all() or step == limit - 1:
            return
        # Finished rows keep feeding their last token: the batch must advance together,
        # and what they compute is thrown away.
        start = time.perf_counter()
        logits = last_logits(session.forward(fed[:, None].copy(), last_only=True), batch)
        tokens = sampler(logits if mask is None else mask(logits), history, prompt_lens)
        if timings is not None:
            timings["decode_s"] += time.perf_counter() - start
            timings["decode_steps"] += 1


def generate(
    session: Session,
    tokenizer,
    prompt: str | Sequence[int] | Sequence[str] | Sequence[Sequence[int]],
    *,
    params: SamplingParams | None = None,
    add_special_tokens: bool = False,
    eos_ids: Iterable[int] | None = None,
    draft: Session | None = None,
    draft_tokens: int = DEFAULT_DRAFT_TOKENS,
    **settings,
) -> GenerationResult | list[GenerationResult]:
    """Complete ``prompt`` (text or token ids); a list of prompts gives a list of results.

    ``params`` (a :class:`SamplingParams`) and ``settings`` (keyword arguments by its field
    names, ``max_new_tokens`` for ``max_tokens``; they override ``params``) say what to
    generate. ``add_special_tokens`` encodes text prompts with the tokenizer's special tokens
    (its ``encode(text, add_special_tokens=True)``, or else BOS in front unless already there).
    Token-id prompts are used exactly as given. ``tokenizer`` may be None: prompts must then
    be token ids, results carry ids and an empty text, and generation ends at ``eos_ids``
    (which otherwise default to the tokenizer's). ``draft``: a draft model's session for
    speculative decoding (:mod:`kiln.runtime.speculative`), ``draft_tokens`` proposals a round;
    each prompt then runs alone.
    """
    prompts, single = prompt_batch(tokenizer, prompt, add_special_tokens)
    job = _Job(session, tokenizer, SamplingParams.of(params, **settings), eos_ids, draft, draft_tokens)
    results: list[GenerationResult | None] = [None] * len(prompts)
    groups = [[i] for i in range(len(prompts))] if draft is not None else \
        [list(range(len(prompts)))] if ragged(session) else _equal_length_groups(prompts)
    for group in groups:
        runner = job.run([prompts[i] for i in group], job.sampler.rows(group))
        group_results = _drain(runner)
        for i, r in zip(group, group_results):
            results[i] = r
    return results[0] if single else results


def stream(
    session: Session,
    tokenizer,
    prompt: str | Sequence[int],
    *,
    params: SamplingParams | None = None,
    add_special_tokens: bool = False,
    eos_ids: Iterable[int] | None = None,
    draft: Session | None = None,
    draft_tokens: int = DEFAULT_DRAFT_TOKENS,
    **settings,
) -> Iterator[str]:
    """Yield the completion of one prompt as pieces of text, as soon as they are final.

    Takes what :func:`generate` takes. The pieces join to exactly ``generate(...).text`` for
    the same arguments. Text that may be the beginning of a stop string is held back until
    the next tokens decide it. The iterator's return value (``StopIteration.value``, or
    ``yield from``) is the :class:`GenerationResult`. Without a tokenizer there is no text:
    nothing is yielded and the result carries the ids.
    """
    prompts, single = prompt_batch(tokenizer, prompt, add_special_tokens)
    if not single:
        raise ValueError("stream() takes one prompt; use generate() for a batch of prompts")
    # Everything is checked above and in _Job, before the first next(), so a bad argument
    # fails at the call rather than somewhere inside the caller's loop.
    job = _Job(session, tokenizer, SamplingParams.of(params, **settings), eos_ids, draft, draft_tokens)
    return _stream_pieces(job.run(prompts, job.sampler))


def _stream_pieces(runner):
    try:
        while True:
            try:
                _, piece = next(runner)
            except StopIteration as done:
                return done.value[0]
            yield piece
    finally:
        # A caller that stops reading early must not leave the decode loop suspended.
        runner.close()


def _drain(runner) -> list[GenerationResult]:
    while True:
        try:
            next(runner)
        except StopIteration as stop:
            return stop.value


class _Job:
    """One generate/stream call's settings, checked once, shared by its prompt groups."""

    def __init__(self, session, tokenizer, params: SamplingParams, eos_ids=None, draft=None,
                 draft_tokens: int = DEFAULT_DRAFT_TOKENS):
        if params.logprobs is not None:
            raise ValueError("logprobs are reported by the scheduler (kiln serve), not by generate()")
        self.session, self.tokenizer, self.params = session, tokenizer, params
        self.draft, self.draft_tokens = draft, draft_tokens
        if draft is not None:
            check_draft(session, draft, draft_tokens)
            if params.grammar is not None:
                raise ValueError("a grammar and a draft model cannot be combined yet")
        self.vocab = getattr(session, "vocab_size", None)
        self.rules = StopRules.of(tokenizer, params, eos_ids)
        self.sampler = Sampler.of(params, self.rules.end_ids)

    def run(self, prompts: list[list[int]], sampler: Sampler):
        """Yield ``(row, piece)`` as text becomes final; return the results of the rows."""
        grammar = self.params.grammar
        rows = [RowDecoder(self.rules, p, constraint=row_constraint(grammar, self.tokenizer, self.vocab))
                for p in prompts]
        timings: dict = {}
        if self.draft is None:
            steps = generate_ids(self.session, prompts, max_new_tokens=self.params.max_tokens,
                                 sampler=sampler, eos_ids=self.rules.eos, stop_ids=self.rules.stop_ids,
                                 timings=timings, mask=None if grammar is None else _grammar_mask(rows))
        else:
            steps = speculative_ids(self.session, prompts, max_new_tokens=self.params.max_tokens,
                                    sampler=sampler, eos_ids=self.rules.eos, stop_ids=self.rules.stop_ids,
                                    timings=timings, draft=self.draft, draft_tokens=self.draft_tokens)
        try:
            for tokens in steps:
                for b, row in enumerate(rows):
                    if row.reason is None:
                        piece, _, _ = row.accept(int(tokens[b]))
                        if piece:
                            yield b, piece
                if all(row.reason is not None for row in rows):
                    break
        finally:
            steps.close()
        # the rows the loop stopped (max_new_tokens, the model's length)
        for b, row in enumerate(rows):
            if row.reason is None:
                piece = row.end()
                if piece:
                    yield b, piece
        return [GenerationResult(ids=row.ids, text=row.text, finish_reason=row.reason,
                                 prompt_tokens=len(p), timings=timing_summary(timings, len(p)))
                for row, p in zip(rows, prompts)]


def _grammar_mask(rows: list[RowDecoder]):
    """The logits mask of rows with a grammar: each open row's own (a row its grammar ended
    still runs with the batch, its tokens unused, and draws unconstrained)."""
    def mask(logits: np.ndarray) -> np.ndarray:
        logits = np.array(logits)
        for b, row in enumerate(rows):
            if row.reason is None:
                logits[b] = row.constraint.mask(logits[b])
        return logits
    return mask


# -- argument handling ---------------------------------------------------------------------

def prompt_batch(tokenizer, prompt, add_special_tokens: bool) -> tuple[list[list[int]], bool]:
    """The prompts' token ids (text encoded), and whether ``prompt`` was a single prompt."""
    if isinstance(prompt, np.ndarray):
        prompt = prompt.tolist()
    if isinstance(prompt, str) or is_id_list(prompt):
        items, single = [prompt], True
    elif isinstance(prompt, (list, tuple)) and prompt and all(
            isinstance(p, str) or is_id_list(p) or (isinstance(p, (list, tuple)) and not p)
            for p in prompt):
        items, single = list(prompt), False
    else:
        raise ValueError("prompt must be a string, a list of token ids, or a non-empty list "
                         f"of those; got {type(prompt).__name__}")

    out = []
    for i, p in enumerate(items):
        ids = _encode(tokenizer, p, add_special_tokens) if isinstance(p, str) \
            else [int(t) for t in p]
        if not ids:
            where = "the prompt" if single else f"prompt {i}"
            raise ValueError(f"{where} has no tokens; the model needs at least one "
                             "(add_special_tokens=True prepends BOS)")
        out.append(ids)
    return out, single


def _encode(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    if tokenizer is None:
        raise ValueError("this model has no tokenizer, so it cannot encode a text prompt; "
                         "pass token ids")
    if not add_special_tokens:
        return [int(t) for t in tokenizer.encode(text)]
    try:
        params = inspect.signature(tokenizer.encode).parameters
    except (TypeError, ValueError):
        params = {}
    if "add_special_tokens" in params:
        # The tokenizer knows whether its model wants BOS (SmolLM2 does not, Llama does).
        return [int(t) for t in tokenizer.encode(text, add_special_tokens=True)]
    ids = [int(t) for t in tokenizer.encode(text)]
    bos = getattr(tokenizer, "bos_id", None)
    if bos is not None and (not ids or ids[0] != bos):
        ids.insert(0, int(bos))
    return ids


def is_id_list(p) -> bool:
    if isinstance(p, np.ndarray):
        return p.ndim == 1 and np.issubdtype(p.dtype, np.integer)
    return (isinstance(p, (list, tuple)) and len(p) > 0
            and all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in p))


def _check_prompt_batch(prompt_ids, ragged: bool = False) -> list[list[int]]:
    prompts = [[int(t) for t in p] for p in prompt_ids]
    if not prompts:
        raise ValueError("prompt_ids is empty; give at least one prompt")
    lengths = {len(p) for p in prompts}
    if 0 in lengths:
        raise ValueError("a prompt has no tokens; the model needs at least one")
    if len(lengths) > 1 and not ragged:
        raise ValueError(f"prompts of one batch must have the same length, got lengths "
                         f"{sorted(lengths)}; run them separately (generate() does this)")
    return prompts


def _equal_length_groups(prompts: list[list[int]]) -> list[list[int]]:
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(i)
    return list(groups.values())

