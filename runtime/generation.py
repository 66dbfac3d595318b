"""Text generation on top of any backend session: the decode loop, stop handling, streaming.

Backends (ONNX Runtime, TVM) only implement :class:`Session`: a KV cache that grows by
whatever ``forward`` is given. Everything here is numpy and plain Python, so every backend
generates, stops and streams the same way, and the loop is tested with a fake session.

Decisions a user may want to know:

* ``result.ids`` holds the generated tokens without the EOS token; ``result.text`` is their
  text, cut before the first stop string. When a stop string ends generation, ``ids`` keeps
  every token that was generated (the last one completed the stop string), so
  ``decode(ids)`` may be longer than ``text``.
* A stop string that the tokenizer encodes as a single special token (``"<|im_end|>"``)
  never shows up in decoded text, so it is also matched as that token id.
* A batch of prompts runs as one batch when the session keeps a length per cache row
  (``session.ragged_prefill``: its ``prefill`` takes prompts of different lengths); otherwise
  each group of equal-length prompts runs on its own. Results come back in the order of the
  prompts either way, and with a seed each prompt gets the same tokens as it would alone
  (see :mod:`kiln.runtime.sampling`).
* ``max_length`` of the session bounds prompt plus new tokens; hitting it ends generation
  with ``finish_reason == "length"``.
"""
from __future__ import annotations

import inspect
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import numpy as np

from kiln.runtime.sampling import Sampler

__all__ = ["Session", "GenerationResult", "PAD_ID", "generate_ids", "generate", "stream"]

#: What :func:`generate_ids` yields for a batch row that has already finished.
PAD_ID = -1

FinishReason = Literal["eos", "stop", "length"]


@runtime_checkable
class Session(Protocol):
    """What a backend provides: a model with a KV cache for a fixed batch.

    ``forward`` appends ``ids`` (int64 ``[batch, seq]``) to the cache and returns float32
    logits ``[batch, seq, vocab]``, or ``[batch, 1, vocab]`` for the last position only when
    ``last_only`` is true (which lets a backend skip the LM head for the rest of a prefill).
    ``max_length`` is the most tokens one row of the cache can hold, or None if unbounded.

    Optional: ``reorder_rows(index)`` (int64 ``[batch]``) makes row b of the cache hold what
    row ``index[b]`` held, rows repeating or dropping out; beam search
    (:mod:`kiln.runtime.beam`) needs it for ``num_beams`` > 1.
    """

    max_length: int | None

    def reset(self, batch: int = 1) -> None: ...

    def forward(self, ids: np.ndarray, last_only: bool = False) -> np.ndarray: ...


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
) -> Iterator[np.ndarray]:
    """Yield the new token of every batch row, int64 ``[batch]``, one step at a time.

    All prompts must have the same length. A row ends when it produces a token of
    ``eos_ids`` or ``stop_ids`` (that token is still yielded); from then on its entries are
    :data:`PAD_ID`. Iteration stops when every row has ended, after ``max_new_tokens`` steps,
    or when the session's ``max_length`` is reached. ``timings``, if given, is filled with
    ``prefill_s``, ``decode_s`` and ``decode_steps`` as the loop runs, counting only the
    model and the sampler, not the time the caller spends between steps.
    """
    prompts = _check_prompt_batch(prompt_ids, ragged=_ragged(session))
    _check_count("max_new_tokens", max_new_tokens)
    ends = _id_set(eos_ids) | _id_set(stop_ids)
    batch, n = len(prompts), max(len(p) for p in prompts)

    limit = max_new_tokens
    max_length = getattr(session, "max_length", None)
    if max_length is not None:
        if n > max_length:
            raise ValueError(f"the prompt has {n} tokens but the model holds at most "
                             f"{max_length}")
        limit = min(limit, max_length - n)
    if timings is not None:
        timings.update(prefill_s=0.0, decode_s=0.0, decode_steps=0)
    # Not a generator itself, so bad arguments raise here rather than at the first next().
    return _decode_loop(session, prompts, batch, limit, sampler, ends, timings)


def _decode_loop(session, prompts, batch, limit, sampler, ends, timings):
    if limit == 0:
        return
    session.reset(batch)
    history = [list(p) for p in prompts]
    done = np.zeros(batch, dtype=bool)
    fed = np.zeros(batch, dtype=np.int64)

    start = time.perf_counter()
    if len({len(p) for p in prompts}) > 1:
        logits = _last_logits(session.prefill(prompts, last_only=True), batch)
    else:
        logits = _last_logits(session.forward(np.asarray(prompts, dtype=np.int64), last_only=True),
                              batch)
    prompt_lens = [len(p) for p in prompts]
    tokens = sampler(logits, history, prompt_lens)
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
        logits = _last_logits(session.forward(fed[:, None].copy(), last_only=True), batch)
        tokens = sampler(logits, history, prompt_lens)
        if timings is not None:
            timings["decode_s"] += time.perf_counter() - start
            timings["decode_steps"] += 1


def generate(
    session: Session,
    tokenizer,
    prompt: str | Sequence[int] | Sequence[str] | Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    stop: Sequence[str] | str | None = None,
    add_special_tokens: bool = False,
    eos_ids: Iterable[int] | None = None,
) -> GenerationResult | list[GenerationResult]:
    """Complete ``prompt`` (text or token ids); a list of prompts gives a list of results.

    ``add_special_tokens`` encodes text prompts with the tokenizer's special tokens (its
    ``encode(text, add_special_tokens=True)``, or else BOS in front unless already there).
    Token-id prompts are used exactly as given. ``tokenizer`` may be None: prompts must then
    be token ids, results carry ids and an empty text, and generation ends at ``eos_ids``
    (which otherwise default to the tokenizer's).
    """
    prompts, single = _prompts(tokenizer, prompt, add_special_tokens)
    job = _Job(session, tokenizer, max_new_tokens, stop,
               Sampler(temperature, top_k, top_p, min_p, repetition_penalty, seed,
                       frequency_penalty, presence_penalty), eos_ids)
    results: list[GenerationResult | None] = [None] * len(prompts)
    groups = [list(range(len(prompts)))] if _ragged(session) else _equal_length_groups(prompts)
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
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    stop: Sequence[str] | str | None = None,
    add_special_tokens: bool = False,
    eos_ids: Iterable[int] | None = None,
) -> Iterator[str]:
    """Yield the completion of one prompt as pieces of text, as soon as they are final.

    The pieces join to exactly ``generate(...).text`` for the same arguments. Text that may
    be the beginning of a stop string is held back until the next tokens decide it. The
    iterator's return value (``StopIteration.value``, or ``yield from``) is the
    :class:`GenerationResult`. Without a tokenizer there is no text: nothing is yielded and
    the result carries the ids.
    """
    prompts, single = _prompts(tokenizer, prompt, add_special_tokens)
    if not single:
        raise ValueError("stream() takes one prompt; use generate() for a batch of prompts")
    # Everything is checked above and in _Job, before the first next(), so a bad argument
    # fails at the call rather than somewhere inside the caller's loop.
    job = _Job(session, tokenizer, max_new_tokens, stop,
               Sampler(temperature, top_k, top_p, min_p, repetition_penalty, seed,
                       frequency_penalty, presence_penalty), eos_ids)
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

    def __init__(self, session, tokenizer, max_new_tokens, stop, sampler, eos_ids=None):
        _check_count("max_new_tokens", max_new_tokens)
        self.session, self.tokenizer, self.sampler = session, tokenizer, sampler
        self.max_new_tokens = max_new_tokens
        self.stops = _stop_strings(stop)
        if self.stops and tokenizer is None:
            raise ValueError("stop strings need a tokenizer to read the generated text, and "
                             "this model has none; stop on token ids with eos_ids instead")
        self.eos = _id_set(getattr(tokenizer, "eos_ids", None) if eos_ids is None else eos_ids)
        self.stop_ids = _special_stop_ids(tokenizer, self.stops) - self.eos

    def run(self, prompts: list[list[int]], sampler: Sampler):
        """Yield ``(row, piece)`` as text becomes final; return the results of the rows."""
        batch = len(prompts)
        texts = [_StopMatcher(_stream_decoder(self.tokenizer), self.stops) for _ in prompts]
        pieces: list[list[str]] = [[] for _ in prompts]
        ids: list[list[int]] = [[] for _ in prompts]
        reasons: list[str | None] = [None] * batch
        timings: dict = {}

        steps = generate_ids(self.session, prompts, max_new_tokens=self.max_new_tokens,
                             sampler=sampler, eos_ids=self.eos, stop_ids=self.stop_ids,
                             timings=timings)
        try:
            for tokens in steps:
                for b in range(batch):
                    if reasons[b] is not None:
                        continue
                    t = int(tokens[b])
                    if t in self.eos or t in self.stop_ids:
                        reasons[b] = "eos" if t in self.eos else "stop"
                        piece, hit = texts[b].finish()
                    else:
                        ids[b].append(t)
                        piece, hit = texts[b].add(t)
                    if hit:
                        reasons[b] = "stop"
                    if piece:
                        pieces[b].append(piece)
                        yield b, piece
                if all(r is not None for r in reasons):
                    break
        finally:
            steps.close()

        for b in range(batch):
            if reasons[b] is None:
                piece, hit = texts[b].finish()
                reasons[b] = "stop" if hit else "length"
                if piece:
                    pieces[b].append(piece)
                    yield b, piece
        return [GenerationResult(ids=ids[b], text="".join(pieces[b]), finish_reason=reasons[b],
                                 prompt_tokens=len(prompts[b]),
                                 timings=_timing_summary(timings, len(prompts[b])))
                for b in range(batch)]


class _StopMatcher:
    """Decoded text of one row, released only once no stop string can still start in it.

    Invariant: no suffix of the released text is a proper prefix of a stop string, so a
    stop string that completes later lies entirely inside the held-back text plus the new
    piece, and searching that small buffer is enough.
    """

    def __init__(self, decoder, stops: list[str]):
        # Stream decoders spell "next token" as add(), put() or a call; accept any of them.
        self.decode = getattr(decoder, "add", None) or getattr(decoder, "put", None) or decoder
        self.flush = decoder.flush
        self.stops = stops
        self.held = ""

    def add(self, token: int) -> tuple[str, bool]:
        return self._push(self.decode(token), final=False)

    def finish(self) -> tuple[str, bool]:
        return self._push(self.flush(), final=True)

    def _push(self, piece: str, final: bool) -> tuple[str, bool]:
        buf = self.held + piece
        self.held = ""
        if not self.stops:
            return buf, False
        found = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if found:
            return buf[:min(found)], True
        if not final:
            keep = _partial_stop_len(buf, self.stops)
            if keep:
                buf, self.held = buf[:-keep], buf[-keep:]
        return buf, False


def _partial_stop_len(text: str, stops: list[str]) -> int:
    best = 0
    for s in stops:
        for k in range(min(len(text), len(s) - 1), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class _DiffDecoder:
    """Stream decoder for a tokenizer that only has ``decode``.

    Decodes a short window of ids and releases the text past the previous window once it no
    longer ends in U+FFFD (an incomplete UTF-8 sequence). The window starts one released
    chunk back so tokenizers that drop a leading space at the start of a decode still see
    the context they need.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def _decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        self.ids.append(int(token))
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before):]
        return ""

    def flush(self) -> str:
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return now[len(before):]


class _NoText:
    """The stream decoder of a model without a tokenizer: its results are ids only."""

    def add(self, token: int) -> str:
        return ""

    def flush(self) -> str:
        return ""


def _stream_decoder(tokenizer):
    if tokenizer is None:
        return _NoText()
    make = getattr(tokenizer, "stream_decoder", None)
    return make() if make is not None else _DiffDecoder(tokenizer)


def _timing_summary(t: dict, prompt_tokens: int) -> dict[str, float]:
    prefill, decode, steps = t.get("prefill_s", 0.0), t.get("decode_s", 0.0), \
        t.get("decode_steps", 0)
    return {
        "prefill_s": prefill,
        "decode_s": decode,
        "decode_steps": steps,
        # Per sequence, like llama.cpp's "prompt eval" and "eval" rates: the first new token
        # comes out of the prefill, every later one costs one decode step.
        "prefill_tokens_per_s": prompt_tokens / prefill if prefill > 0 else 0.0,
        "tokens_per_s": steps / decode if decode > 0 else 0.0,
    }


# -- argument handling ---------------------------------------------------------------------

def _prompts(tokenizer, prompt, add_special_tokens: bool) -> tuple[list[list[int]], bool]:
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


def _ragged(session) -> bool:
    """Whether the session prefills prompts of different lengths in one run (each row of its
    KV cache has its own length)."""
    return bool(getattr(session, "ragged_prefill", False))


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


def _check_count(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


def _id_set(ids) -> set[int]:
    if ids is None:
        return set()
    if isinstance(ids, (int, np.integer)):
        return {int(ids)}
    return {int(i) for i in ids}


def _stop_strings(stop) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    for s in stops:
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
    return stops


def _special_stop_ids(tokenizer, stops: list[str]) -> set[int]:
    ids = set()
    for s in stops:
        enc = list(tokenizer.encode(s))
        if len(enc) == 1 and tokenizer.decode(enc, skip_special_tokens=True) == "":
            ids.add(int(enc[0]))
    return ids


def _equal_length_groups(prompts: list[list[int]]) -> list[list[int]]:
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(i)
    return list(groups.values())


def _last_logits(logits, batch: int) -> np.ndarray:
    logits = np.asarray(logits)
    if logits.ndim != 3 or logits.shape[0] != batch or logits.shape[1] == 0:
        raise RuntimeError(f"session.forward returned logits of shape {logits.shape}; "
                           f"expected [{batch}, seq, vocab]")
    return logits[:, -1, :]
