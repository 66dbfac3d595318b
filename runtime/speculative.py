"""Speculative decoding: a draft model proposes the next tokens, the target checks them in one run.

A round: the draft proposes ``k`` tokens, one decode step each; the target runs once over the
last token it has not seen and the ``k`` proposals (``k + 1`` positions, the logits of every
one); the proposals it accepts and one token of its own come out, 1 to ``k + 1`` tokens a
round; then both caches forget the rejected proposals (``session.truncate``). A decode step
streams the target's weights through memory whatever the count of tokens it runs over, so
when the draft is much cheaper and mostly right, a round costs little more than one step.

What comes out is the target's alone:

* greedy: proposals are accepted while each equals the target's own choice at its position;
  the first that differs is replaced by the target's choice, and when all ``k`` are accepted
  the target's choice after the last comes with them. Up to the logits, which a run over
  ``k + 1`` positions computes as a decode step would, the tokens are the target's alone.
* sampling: the standard rule (Leviathan et al. 2023; Chen et al. 2023). Proposal ``d`` is
  drawn from the draft's distribution ``q`` and accepted with probability
  ``min(1, p(d) / q(d))``; on rejection the token is drawn from ``max(0, p - q)`` normalised,
  so every token is distributed exactly as ``p``, the target's. Both ``p`` and ``q`` are the
  request's :class:`~kiln.runtime.sampling.Sampler` distribution (temperature, top-k, top-p,
  min-p, penalties over the row's history, proposals included) of the target's and the
  draft's logits, and every draw comes from the request's random stream.

One prompt at a time (batch 1): the rows of a batch would accept different counts of
proposals and their caches would drift apart. The two models must share a tokenizer; their
logits may differ in width (vocabularies padded to different sizes), the draft's being cut or
padded to the target's (a padded id has probability 0 under the draft, and the rule stays exact).
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from .decoding import id_set
from .params import check_count
from .sampling import Sampler
from .session import Session, last_logits, truncates

__all__ = ["DEFAULT_DRAFT_TOKENS", "speculative_ids", "check_draft", "check_same_vocabulary", "propose", "judge"]

#: Proposals per round unless told otherwise (vLLM's and llama.cpp's examples use 3 to 5).
DEFAULT_DRAFT_TOKENS = 4


def check_same_vocabulary(target_tokenizer, draft_tokenizer, draft_name) -> None:
    """Refuse a draft whose token ids mean other text than the target's: its proposals would
    be other tokens. Compares the whole vocabulary (token text to id), added tokens included."""
    if target_tokenizer is None or draft_tokenizer is None:
        if (target_tokenizer is None) != (draft_tokenizer is None):
            raise ValueError(f"draft {draft_name}: one of the target and the draft has a tokenizer and the "
                             "other has none, so their token ids cannot be checked to agree")
        return
    ours, theirs = (t.backend.get_vocab(with_added_tokens=True) for t in (target_tokenizer, draft_tokenizer))
    if ours != theirs:
        by_id = [{i: text for text, i in v.items()} for v in (ours, theirs)]
        i = min(i for i in by_id[0].keys() | by_id[1].keys() if by_id[0].get(i) != by_id[1].get(i))
        raise ValueError(f"draft {draft_name}: its tokenizer differs from the target's ({len(theirs)} tokens "
                         f"against {len(ours)}; id {i} is {by_id[0].get(i)!r} in the target and "
                         f"{by_id[1].get(i)!r} in the draft); speculative decoding needs one vocabulary")


def check_draft(target: Session, draft: Session, draft_tokens: int) -> None:
    """The arguments of speculative decoding that its sessions and settings can be checked
    for before it starts."""
    if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, (int, np.integer)) or draft_tokens < 1:
        raise ValueError(f"draft_tokens must be an integer >= 1, got {draft_tokens!r}")
    for who, session in (("target", target), ("draft", draft)):
        if not truncates(session):
            raise ValueError(f"the {who}'s session cannot take back tokens (no truncate); speculative "
                             "decoding needs it")


def speculative_ids(
    target: Session,
    prompt_ids: Sequence[Sequence[int]],
    *,
    draft: Session,
    max_new_tokens: int,
    sampler: Sampler,
    draft_tokens: int = DEFAULT_DRAFT_TOKENS,
    eos_ids: Iterable[int] = (),
    stop_ids: Iterable[int] | None = None,
    timings: dict | None = None,
) -> Iterator[np.ndarray]:
    """Yield the new tokens of one prompt, int64 ``[1]`` each, as
    :func:`kiln.runtime.generation.generate_ids` does (its contract: ends at ``eos_ids`` or
    ``stop_ids``, yielded; ``max_new_tokens``; the sessions' ``max_length``), drafting
    ``draft_tokens`` proposals a round. ``timings`` gains ``draft_proposed`` and
    ``draft_accepted`` (proposals made and accepted) and ``target_runs`` (the target's runs
    after the prompt); ``decode_steps`` counts the tokens after the first, so
    ``tokens_per_s`` compares with decoding without a draft."""
    prompts = [[int(t) for t in p] for p in prompt_ids]
    if len(prompts) != 1 or not prompts[0]:
        raise ValueError("speculative decoding takes one prompt of at least one token at a time")
    prompt = prompts[0]
    check_count("max_new_tokens", max_new_tokens)
    check_draft(target, draft, draft_tokens)
    limit = max_new_tokens
    if target.max_length is not None:
        if len(prompt) > target.max_length:
            raise ValueError(f"the prompt has {len(prompt)} tokens but the model holds at most "
                             f"{target.max_length}")
        limit = min(limit, target.max_length - len(prompt))
    timings = {} if timings is None else timings
    timings.update(prefill_s=0.0, decode_s=0.0, decode_steps=0, draft_proposed=0, draft_accepted=0,
                   target_runs=0)
    rounds = _Rounds(target, draft, prompt, sampler, int(draft_tokens), timings)
    return rounds.tokens(limit, id_set(eos_ids) | id_set(stop_ids))


class _Rounds:
    """The state between rounds. ``seq`` is the prompt and every token decided; the target's
    cache holds all of it but the last token, the draft's its first ``drafted``."""

    def __init__(self, target, draft, prompt, sampler, k, timings):
        self.target, self.draft, self.sampler, self.k = target, draft, sampler, k
        self.seq, self.prompt_len = list(prompt), len(prompt)
        self.timings = timings
        self.width = 0                  # the target's logits' width
        self.drafted = 0

    def tokens(self, limit: int, ends: set[int]):
        if limit == 0:
            return
        start = time.perf_counter()
        self.target.reset(1)
        self.draft.reset(1)
        logits = last_logits(self.target.forward(np.asarray([self.seq], dtype=np.int64), last_only=True), 1)
        self.width = logits.shape[1]
        decided = [int(self.sampler(logits, [self.seq], [self.prompt_len])[0])]
        self.timings["prefill_s"] = time.perf_counter() - start
        made = 0
        while True:
            for token in decided:
                yield np.asarray([token], dtype=np.int64)
                self.seq.append(token)
                made += 1
                if made > 1:
                    self.timings["decode_steps"] += 1
                if token in ends or made == limit:
                    return
            start = time.perf_counter()
            # never propose past the last token wanted (the target's own token fills the
            # round) nor past what the draft holds (a draft of a shorter context stops drafting)
            k = min(self.k, limit - made - 1)
            if self.draft.max_length is not None:
                k = max(min(k, self.draft.max_length - len(self.seq) + 1), 0)
            decided = self._round(k)
            self.timings["decode_s"] += time.perf_counter() - start

    def _round(self, k: int) -> list[int]:
        seq = self.seq
        proposals, qs = propose(self.draft, seq[self.drafted:], k, self.sampler, seq, self.prompt_len, self.width)
        if k:
            self.drafted = len(seq) + k - 1
        logits = np.asarray(self.target.forward(np.asarray([seq[-1:] + proposals], dtype=np.int64)))
        if logits.ndim != 3 or logits.shape[:2] != (1, k + 1):
            raise RuntimeError(f"session.forward returned logits of shape {logits.shape}; expected [1, {k + 1}, vocab]")
        self.timings["target_runs"] += 1
        out = judge(self.sampler, proposals, qs, logits[0], seq, self.prompt_len)
        accepted = len(out) - 1
        self.timings["draft_proposed"] += k
        self.timings["draft_accepted"] += accepted
        # the caches keep the accepted proposals only (the target's also keeps the token the
        # round began with; the token the round ends with is fed next round)
        self.target.truncate(len(seq) + accepted)
        self.drafted = min(self.drafted, len(seq) + accepted)
        self.draft.truncate(self.drafted)
        return out


def propose(draft: Session, feed: list[int], k: int, sampler: Sampler, seq: list[int], prompt_len: int,
            width: int | None) -> tuple[list[int], list[np.ndarray]]:
    """The draft's ``k`` proposals after ``seq`` (its cache lacks ``feed``, the end of ``seq``),
    and for sampling the distribution each was drawn from, over ``width`` ids (None: the
    draft's own width)."""
    proposals, qs = [], []
    for _ in range(k):
        logits = _fit(last_logits(draft.forward(np.asarray([feed], dtype=np.int64), last_only=True), 1), width)
        history = [seq + proposals]
        if sampler.greedy:
            d = int(sampler(logits, history, [prompt_len])[0])
        else:
            q = sampler.distribution(logits, history, [prompt_len])[0]
            d = sampler.draw(q)
            qs.append(q)
        proposals.append(d)
        feed = [d]
    return proposals, qs


def judge(sampler: Sampler, proposals: list[int], qs: list[np.ndarray], logits: np.ndarray, seq: list[int],
          prompt_len: int) -> list[int]:
    """The round's tokens from the target's logits after ``seq`` and each proposal ([k + 1,
    vocab]): the proposals kept and one token of the target's (see the module's docstring)."""
    k = len(proposals)
    histories = [seq + proposals[:i] for i in range(k + 1)]
    lens = [prompt_len] * (k + 1)
    if sampler.greedy:
        choices = sampler(logits, histories, lens)
        m = 0
        while m < k and proposals[m] == choices[m]:
            m += 1
        return proposals[:m] + [int(choices[m])]
    ps = sampler.distribution(logits, histories, lens)
    if qs and len(qs[0]) != ps.shape[1]:
        raise RuntimeError(f"the draft's logits have {len(qs[0])} entries and the target's {ps.shape[1]}")
    out = []
    for d, q, p in zip(proposals, qs, ps):
        if sampler.uniform() * q[d] < p[d]:          # kept with probability min(1, p(d)/q(d))
            out.append(d)
            continue
        out.append(sampler.draw(np.maximum(p - q, 0.0)))
        return out
    out.append(sampler.draw(ps[k]))
    return out


def _fit(logits: np.ndarray, width: int) -> np.ndarray:
    """The draft's logits over the target's ids: cut to its width, or padded with ids the
    draft never proposes."""
    if width is None or logits.shape[1] == width:
        return logits
    if logits.shape[1] > width:
        return logits[:, :width]
    return np.concatenate([logits, np.full((1, width - logits.shape[1]), -np.inf, dtype=logits.dtype)], axis=1)
