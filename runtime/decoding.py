"""What happens to each new token of a row, the same for ``generate``/``stream``, the
scheduler and beam search: :class:`RowDecoder`.

A request's :class:`StopRules` (its stop strings, EOS ids and the stop strings that are single
special tokens) are worked out once; each row then has a RowDecoder holding its state: the
tokens it holds (the penalties' history), the ids and text it generated, the text held back
while a stop string may still be starting, its logprobs, and why it ended.

* ``ids`` holds the generated tokens without the EOS token (or the special token of a stop
  string); ``text`` is their text, cut before the first stop string. When a stop string ends
  generation, ``ids`` keeps every token that was generated (the last one completed the stop
  string), so ``decode(ids)`` may be longer than ``text``.
* A stop string that the tokenizer encodes as a single special token (``"<|im_end|>"``)
  never shows up in decoded text, so it is also matched as that token id.
* A row with a grammar (a :class:`~kiln.runtime.grammar.RowConstraint`) draws only the tokens
  it allows, and ends with reason "stop" once the grammar takes no further token.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from .logprobs import token_logprobs
from .params import SamplingParams

__all__ = ["StopRules", "RowDecoder", "StopMatcher", "stream_decoder", "id_set", "timing_summary"]


class StopRules:
    """A request's ends: ``eos`` ids, ``stops`` strings and ``stop_ids`` (the stop strings
    that are one special token), and the tokenizer that turns tokens into text (None: ids
    only, and then no stop strings)."""

    def __init__(self, tokenizer, stops: Sequence[str] = (), eos: Iterable[int] | None = None):
        self.tokenizer, self.stops = tokenizer, list(stops)
        if self.stops and tokenizer is None:
            raise ValueError("stop strings need a tokenizer to read the generated text, and "
                             "this model has none; stop on token ids with eos_ids instead")
        self.eos = id_set(getattr(tokenizer, "eos_ids", None) if eos is None else eos)
        self.stop_ids = _special_stop_ids(tokenizer, self.stops) - self.eos

    @classmethod
    def of(cls, tokenizer, params: SamplingParams, eos: Iterable[int] | None = None) -> StopRules:
        """The ends of a request; with ``ignore_eos`` its EOS ids are none of them."""
        return cls(tokenizer, params.stop, () if params.ignore_eos else eos)

    @property
    def end_ids(self) -> set[int]:
        """The ids that end a row (what ``min_tokens`` holds back)."""
        return self.eos | self.stop_ids

    def ends(self, token: int) -> str | None:
        """Why ``token`` ends a row ("eos" or "stop"), or None."""
        return "eos" if token in self.eos else "stop" if token in self.stop_ids else None


class RowDecoder:
    """One row's decode state; see the module's docstring.

    ``limit``: the most tokens it may take (None: the caller stops it). ``logprobs``: None,
    or how many top alternatives to keep with each token's logprob (``token_logprobs``:
    ``(token, logprob, [(id, logprob)])`` per token of ``ids``). ``constraint``: None, or the
    row's grammar matcher."""

    def __init__(self, rules: StopRules, prompt: Sequence[int], *, limit: int | None = None,
                 logprobs: int | None = None, sampler=None, constraint=None):
        self.rules, self.sampler, self.constraint = rules, sampler, constraint
        self.matcher = StopMatcher(stream_decoder(rules.tokenizer), rules.stops)
        self.prompt_tokens = len(prompt)
        self.history = list(prompt)
        self.limit, self.logprobs = limit, logprobs
        self.ids: list[int] = []
        self.pieces: list[str] = []
        self.token_logprobs: list = []
        self.count = 0
        self.reason: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def sample(self, logits: np.ndarray) -> int:
        """The row's next token from its logits (float32 [vocab]), by its own sampler (among
        the tokens its grammar allows, if it has one)."""
        logits = np.asarray(logits)
        if self.constraint is not None:
            logits = self.constraint.mask(logits)
        return int(self.sampler(logits[None, :], [self.history], [self.prompt_tokens])[0])

    def accept(self, token: int, logits: np.ndarray | None = None) -> tuple[str, float | None, list | None]:
        """Take the row's next token: returns the text it made final (possibly empty) and, when
        logprobs are asked for and ``logits`` given, its logprob and top alternatives. Sets
        ``reason`` when the token ends the row."""
        self.history.append(token)
        self.count += 1
        logprob = top = None
        reason = self.rules.ends(token)
        if self.constraint is not None:
            self.constraint.accept(token)
        if reason is not None:
            piece, hit = self.matcher.finish()
        else:
            self.ids.append(token)
            piece, hit = self.matcher.add(token)
            if self.logprobs is not None and logits is not None:
                logprob, top = token_logprobs(logits, token, self.logprobs)
                self.token_logprobs.append((token, logprob, top))
        if reason is None and not hit and self.constraint is not None and self.constraint.done:
            rest, hit = self.matcher.finish()      # the answer is complete: nothing is held back
            piece += rest
            reason = "stop"
        if piece:
            self.pieces.append(piece)
        self.reason = "stop" if hit else reason
        return piece, logprob, top

    @property
    def at_limit(self) -> bool:
        return self.limit is not None and self.count >= self.limit

    def end(self) -> str:
        """The row ends without a token ending it (its limit, the model's length): returns the
        text held back, and ``reason`` becomes "stop" if that text holds a stop string, else
        "length"."""
        piece, hit = self.matcher.finish()
        if piece:
            self.pieces.append(piece)
        self.reason = "stop" if hit else "length"
        return piece


class StopMatcher:
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


def stream_decoder(tokenizer):
    """The tokenizer's incremental decoder (text as tokens arrive)."""
    if tokenizer is None:
        return _NoText()
    make = getattr(tokenizer, "stream_decoder", None)
    return make() if make is not None else _DiffDecoder(tokenizer)


def id_set(ids) -> set[int]:
    """Token ids (None, one id, or several) as a set of ints."""
    if ids is None:
        return set()
    if isinstance(ids, (int, np.integer)):
        return {int(ids)}
    return {int(i) for i in ids}


def _special_stop_ids(tokenizer, stops: list[str]) -> set[int]:
    ids = set()
    for s in stops:
        enc = list(tokenizer.encode(s))
        if len(enc) == 1 and tokenizer.decode(enc, skip_special_tokens=True) == "":
            ids.add(int(enc[0]))
    return ids


def timing_summary(t: dict, prompt_tokens: int) -> dict[str, float]:
    """``prefill_s``, ``decode_s``, ``decode_steps`` and the rates a result reports."""
    prefill, decode, steps = t.get("prefill_s", 0.0), t.get("decode_s", 0.0), \
        t.get("decode_steps", 0)
    drafted = {} if "draft_proposed" not in t else {     # speculative decoding's
        "draft_proposed": t["draft_proposed"], "draft_accepted": t["draft_accepted"],
        "acceptance_rate": t["draft_accepted"] / t["draft_proposed"] if t["draft_proposed"] else 0.0}
    return {
        **drafted,
        "prefill_s": prefill,
        "decode_s": decode,
        "decode_steps": steps,
        # Per sequence, like llama.cpp's "prompt eval" and "eval" rates: the first new token
        # comes out of the prefill, every later one costs one decode step.
        "prefill_tokens_per_s": prompt_tokens / prefill if prefill > 0 else 0.0,
        "tokens_per_s": steps / decode if decode > 0 else 0.0,
    }
