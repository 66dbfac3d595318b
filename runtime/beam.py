"""Beam search over any session that can reorder its cache rows, as transformers defines it.

One prompt runs as a batch of ``num_beams`` cache rows. Each step:

1. log-softmax of every row's float32 logits, plus the row's running score (the sum of its
   tokens' log-probabilities), over ``num_beams x vocab`` candidates;
2. the best ``K = max(2, 1 + len(eos_ids)) * num_beams`` candidates: enough that, even if every
   beam's best continuations are EOS, ``num_beams`` of them still run;
3. a candidate ends when its token is an EOS id or it reaches ``max_new_tokens``; the best
   ``num_beams`` of those that did not end run on (the cache rows are reordered to their
   parents, :meth:`Session.reorder_rows`);
4. of the ended candidates, only those among the best ``num_beams`` of step 2 may become
   finished hypotheses, scored ``sum_logprobs / generated_len ** length_penalty`` where
   ``generated_len`` counts the new tokens including the EOS (not the prompt); the
   ``num_beams`` best finished hypotheses are kept.

The search ends when the running beams hit ``max_new_tokens``; or, with
``early_stopping=True``, once ``num_beams`` hypotheses have finished; or when no running beam
can beat the worst of ``num_beams`` finished hypotheses: its score divided by the current
generated length (``early_stopping=False``) or, for ``"never"`` with a positive
``length_penalty``, by ``max_new_tokens`` (the best it could reach). These are transformers'
rules (its ``_beam_search``), including its large negative mask (-1e9) for excluded
candidates, computed in float32 as it does, so the same logits give the same hypotheses.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .decoding import RowDecoder, StopRules, timing_summary
from .generation import GenerationResult, prompt_batch
from .params import SamplingParams
from .session import last_logits, reorders_rows

__all__ = ["BeamResult", "beam_search", "generate", "check_beam_args"]

#: transformers' score for a candidate that must not be chosen; added, not assigned, so a
#: masked candidate keeps its order among the masked ones, as there.
_MASK = np.float32(-1.0e9)


@dataclass
class BeamResult(GenerationResult):
    """One finished hypothesis: the fields of a :class:`GenerationResult` and ``score``, the
    sum of its tokens' log-probabilities (the EOS token's included) divided by
    ``len(generated tokens) ** length_penalty``, as transformers' ``sequences_scores``."""

    score: float = 0.0


@dataclass
class _Hypothesis:
    tokens: list[int]
    score: float


def check_beam_args(num_beams, length_penalty, early_stopping, num_return_sequences) -> None:
    """ValueError for settings beam search cannot take (checked before any model work)."""
    if isinstance(num_beams, bool) or not isinstance(num_beams, (int, np.integer)) or num_beams < 1:
        raise ValueError(f"num_beams must be an integer >= 1, got {num_beams!r}")
    if (isinstance(num_return_sequences, bool) or not isinstance(num_return_sequences, (int, np.integer))
            or not 1 <= num_return_sequences <= num_beams):
        raise ValueError(f"num_return_sequences must be an integer from 1 to num_beams ({num_beams}), "
                         f"got {num_return_sequences!r}")
    if not (isinstance(early_stopping, bool) or early_stopping == "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float)) \
            or not np.isfinite(length_penalty):
        raise ValueError(f"length_penalty must be a finite number, got {length_penalty!r}")


def beam_search(session, prompt: list[int], *, num_beams: int, max_new_tokens: int,
                eos_ids=(), length_penalty: float = 1.0, early_stopping: bool | str = False,
                num_return_sequences: int = 1, timings: dict | None = None) -> list[_Hypothesis]:
    """The ``num_return_sequences`` best finished hypotheses of one prompt, best first.

    A hypothesis' ``tokens`` are the generated ids, ending with the EOS id when one ended it.
    The session is reset to ``num_beams`` rows; it must have ``reorder_rows`` unless
    ``num_beams`` is 1. ``timings``, if given, gets ``prefill_s``, ``decode_s`` and
    ``decode_steps`` (model time only, the search's bookkeeping included in decode).
    """
    check_beam_args(num_beams, length_penalty, early_stopping, num_return_sequences)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
            or max_new_tokens < 1:
        raise ValueError(f"beam search needs max_new_tokens >= 1, got {max_new_tokens!r}")
    prompt = [int(t) for t in prompt]
    if not prompt:
        raise ValueError("the prompt has no tokens; the model needs at least one")
    if num_beams > 1 and not reorders_rows(session):
        raise ValueError(f"this backend ({type(session).__name__}) cannot reorder its KV-cache rows, "
                         "so it cannot run beam search; use num_beams=1")
    limit = max_new_tokens
    max_length = session.max_length
    if max_length is not None:
        if len(prompt) >= max_length:
            raise ValueError(f"the prompt has {len(prompt)} tokens and the model holds at most "
                             f"{max_length}: no room for a new token")
        limit = min(limit, max_length - len(prompt))

    eos = np.array(sorted({int(i) for i in eos_ids}), dtype=np.int64)
    keep = max(2, 1 + len(eos)) * num_beams

    clock = time.perf_counter()
    t = {"prefill_s": 0.0, "decode_s": 0.0, "decode_steps": 0} if timings is None else timings
    t.update(prefill_s=0.0, decode_s=0.0, decode_steps=0)
    session.reset(num_beams)
    # every row holds the prompt; only row 0's continuations count at first (the others start
    # at the mask score), so the first step picks distinct tokens
    logits = session.forward(np.tile(np.asarray(prompt, dtype=np.int64), (num_beams, 1)), last_only=True)
    running: list[list[int]] = [[] for _ in range(num_beams)]
    running_scores = np.zeros(num_beams, dtype=np.float32)
    running_scores[1:] = _MASK
    finished: list[list[int]] = [[] for _ in range(num_beams)]
    finished_scores = np.full(num_beams, _MASK, dtype=np.float32)
    is_finished = np.zeros(num_beams, dtype=bool)
    improvable = True

    t["prefill_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    for step in range(limit):
        generated = step + 1                     # new tokens in each candidate, this one included
        logp = _log_softmax(last_logits(logits, num_beams))
        vocab = logp.shape[1]
        total = (logp + running_scores[:, None]).reshape(-1)
        top = _top(total, keep)
        top_scores = total[top]
        parents, tokens = top // vocab, top % vocab
        ends = np.isin(tokens, eos) | (generated == limit)

        # the best num_beams candidates that go on
        go_on = top_scores + ends.astype(np.float32) * _MASK
        chosen = _top(go_on, num_beams)
        next_running = [running[parents[c]] + [int(tokens[c])] for c in chosen]
        next_scores = go_on[chosen]
        next_parents = parents[chosen]

        # candidates that ended, among the best num_beams, join the finished hypotheses
        just_finished = ends & (np.arange(keep) < num_beams)
        cand = top_scores / np.float32(generated ** length_penalty)
        if early_stopping is True and is_finished.all():
            cand = cand + _MASK
        if not improvable:
            cand = cand + _MASK
        cand = cand + (~just_finished).astype(np.float32) * _MASK
        merged = np.concatenate([finished_scores, cand])
        best = _top(merged, num_beams)
        merged_tokens = finished + [running[parents[c]] + [int(tokens[c])] for c in range(keep)]
        merged_done = np.concatenate([is_finished, just_finished])
        finished = [merged_tokens[i] for i in best]
        finished_scores, is_finished = merged[best], merged_done[best]

        running, running_scores = next_running, next_scores
        improvable = improvable and _can_improve(running_scores[0], finished_scores, is_finished,
                                                 generated, limit, length_penalty, early_stopping)
        if not improvable or (early_stopping is True and is_finished.all()) or ends.all():
            break
        session.reorder_rows(next_parents)
        logits = session.forward(np.array([[h[-1]] for h in running], dtype=np.int64), last_only=True)
        t["decode_steps"] += 1
    t["decode_s"] = time.perf_counter() - clock

    if not is_finished[:num_return_sequences].all():
        # cannot happen: the last step ends every candidate and the best num_beams finish
        raise RuntimeError("beam search ended with fewer finished hypotheses than asked for")
    return [_Hypothesis(finished[i], float(finished_scores[i])) for i in range(num_return_sequences)]


def generate(session, tokenizer, prompt, *, num_beams: int = 4, length_penalty: float = 1.0,
             early_stopping: bool | str = False, num_return_sequences: int = 1,
             add_special_tokens: bool = False, eos_ids=None, params: SamplingParams | None = None,
             **settings):
    """Beam search for ``prompt`` (text or ids, or a list of those, as generation.generate).

    Returns, per prompt, a :class:`BeamResult` when ``num_return_sequences`` is 1, else a list
    of them, best first; a list of prompts gives a list of those. Prompts run one after
    another, each as a batch of ``num_beams`` cache rows. Results carry ids without the
    ending EOS and ``finish_reason`` "eos" or "length". Of the settings (``params`` and
    keyword arguments, as generation.generate takes them) only ``max_tokens`` may differ from
    its default: beam sampling and logit processors are not implemented.
    """
    params = SamplingParams.of(params, **settings)
    _refuse_sampling(params)
    check_beam_args(num_beams, length_penalty, early_stopping, num_return_sequences)
    prompts, single = prompt_batch(tokenizer, prompt, add_special_tokens)
    rules = StopRules.of(tokenizer, params, eos_ids)
    out = []
    for ids in prompts:
        timings: dict = {}
        found = beam_search(session, ids, num_beams=num_beams, max_new_tokens=params.max_tokens,
                            eos_ids=rules.eos, length_penalty=length_penalty,
                            early_stopping=early_stopping,
                            num_return_sequences=num_return_sequences, timings=timings)
        summary = timing_summary(timings, len(ids))
        rs = [_result(h, ids, rules, summary) for h in found]
        out.append(rs[0] if num_return_sequences == 1 else rs)
    return out[0] if single else out


def _refuse_sampling(params: SamplingParams) -> None:
    for name, value in params.non_default().items():
        if name not in ("max_tokens", "ignore_eos"):    # StopRules applies ignore_eos
            raise ValueError(f"{name}={value!r} cannot be used with num_beams > 1: beam search here is "
                             "deterministic (no beam sampling, penalties or stop strings); "
                             "drop it or use num_beams=1")


def _result(h: _Hypothesis, prompt: list[int], rules: StopRules, timings) -> BeamResult:
    """The hypothesis' tokens through a row's decode state, as generate's tokens go."""
    row = RowDecoder(rules, prompt)
    for t in h.tokens:
        row.accept(t)
    if row.reason is None:
        row.end()
    return BeamResult(ids=row.ids, text=row.text, finish_reason=row.reason,
                      prompt_tokens=len(prompt), timings=dict(timings), score=h.score)


def _can_improve(best_running, finished_scores, is_finished, generated, limit, length_penalty,
                 early_stopping) -> bool:
    """Whether the best running beam may still beat a finished hypothesis (transformers'
    heuristic: until num_beams have finished, the worst finished score is the mask)."""
    if early_stopping == "never" and length_penalty > 0.0:
        length = limit
    else:
        length = generated
    best = np.float32(best_running) / np.float32(length ** length_penalty)
    worst = np.where(is_finished, finished_scores.min(), _MASK)
    return bool((best > worst).any())


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _top(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values, largest first; ties go to the lower index."""
    k = min(k, values.size)
    if k < values.size:
        # every value tied with the k-th largest stays in, so the lower index can win the tie
        part = np.flatnonzero(values >= -np.partition(-values, k - 1)[k - 1])
    else:
        part = np.arange(values.size)
    return part[np.lexsort((part, -values[part]))][:k]

