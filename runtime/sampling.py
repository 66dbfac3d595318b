"""Next-token selection: greedy, or sampling with temperature, top-k, top-p and min-p.

The order of the steps follows transformers' logits processors, so a user moving from
``model.generate(...)`` gets the same distribution for the same settings (up to ties at the
top-k boundary, which transformers keeps all of):

    repetition penalty -> frequency/presence penalty -> temperature -> top-k -> top-p -> min-p -> draw

The frequency and presence penalties are OpenAI's (transformers has none): over the tokens
generated so far (not the prompt, as vLLM reads OpenAI's definition),
``logit[t] -= count[t] * frequency_penalty + (count[t] > 0) * presence_penalty``. The
repetition penalty is transformers' multiplicative one over prompt and generated tokens
(positive logits divided by it, negative ones multiplied); llama.cpp's ``repeat_penalty`` is
the same formula over its last ``repeat_last_n`` tokens. The two kinds do not convert into
each other: ``r`` lowers a seen token's logit ``x`` by ``x * (1 - 1/r)`` when ``x > 0`` and
by ``|x| * (r - 1)`` when not, an amount that depends on ``x``, while the presence penalty
subtracts a constant; ``presence_penalty = x * (1 - 1/r)`` matches ``r`` only for seen tokens
whose logit is near ``x``, and only once per token (``r`` never grows with the count).

Ties are always broken towards the lower token id (greedy picks it, top-k keeps it), so the
candidate set is a function of the logits alone and ``top_k=1`` is exactly greedy.

Every batch row draws from its own random stream, spawned from ``seed`` by row index. A
prompt therefore gets the same tokens for the same seed whether it runs alone or as row 0
of a batch, and whatever the other prompts of its batch are.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np

from .params import SamplingParams

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
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        *,
        params: SamplingParams | None = None,
        end_ids: Sequence[int] = (),
    ):
        if params is None:        # the settings are checked once, by SamplingParams
            params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                    repetition_penalty=repetition_penalty, seed=seed,
                                    frequency_penalty=frequency_penalty, presence_penalty=presence_penalty)
        self.params = params
        self.temperature, self.top_k, self.top_p, self.min_p = (params.temperature, params.top_k,
                                                                 params.top_p, params.min_p)
        self.repetition_penalty = params.repetition_penalty
        self.frequency_penalty, self.presence_penalty = params.frequency_penalty, params.presence_penalty
        self.seed = params.seed
        # min_tokens: the ids that end a row cannot be drawn before that many new tokens
        self.min_tokens = params.min_tokens
        self._end_ids = np.asarray(sorted(end_ids), dtype=np.int64)
        self._seed_seq = np.random.SeedSequence(self.seed)
        self._streams: list[np.random.Generator] = []
        self._rows: list[int] | None = None

    @classmethod
    def of(cls, params: SamplingParams, end_ids: Sequence[int] = ()) -> Sampler:
        """The sampler of a request's settings; ``end_ids``, the ids that end its rows (EOS,
        stop tokens), are held back until ``params.min_tokens`` tokens are generated."""
        return cls(params=params, end_ids=end_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def _leaves_logits(self) -> bool:
        """Whether no setting changes a logit before the choice (no bias, penalty or
        min_tokens)."""
        return not (self.params.logit_bias or self.repetition_penalty != 1.0 or self.frequency_penalty
                    or self.presence_penalty or self.min_tokens)

    def __repr__(self) -> str:
        return (f"Sampler(temperature={self.temperature}, top_k={self.top_k}, top_p={self.top_p},"
                f" min_p={self.min_p}, repetition_penalty={self.repetition_penalty},"
                f" frequency_penalty={self.frequency_penalty},"
                f" presence_penalty={self.presence_penalty}, seed={self.seed})")

    def rows(self, rows: Sequence[int]) -> Sampler:
        """A view whose batch row ``j`` draws from this sampler's stream ``rows[j]``.

        Used when the prompts of one request run in several smaller batches: each prompt
        keeps the random stream of its position in the request.
        """
        view = copy.copy(self)
        base = self._rows
        view._rows = [base[r] if base is not None else int(r) for r in rows]
        return view

    def __call__(self, logits: np.ndarray, history: Sequence[Sequence[int]] | None = None,
                 prompt_lens: Sequence[int] | None = None) -> np.ndarray:
        """Return the chosen token ids, int64 ``[batch]``.

        ``history[b]`` is every token row ``b`` has seen so far (prompt and generated); only
        the penalties read it. ``prompt_lens[b]`` is how many of its first tokens are the
        prompt, which the frequency and presence penalties skip (None: no prompt, every token
        of the history counts).
        """
        logits = self._check_logits(logits, history)
        out = np.empty(logits.shape[0], dtype=np.int64)
        for b in range(logits.shape[0]):
            if self.greedy and self._leaves_logits:
                # the float64 copy only serves the penalties and the softmax; float32's argmax
                # is the same token (the conversion is exact and keeps the order)
                if logits[b].max() == -np.inf:
                    raise ValueError("every logit is -inf; nothing can be sampled")
                out[b] = _argmax(logits[b])
                continue
            row = self._penalized(logits[b], *self._row_history(history, prompt_lens, b))
            if self.greedy:
                out[b] = _argmax(row)
            else:
                out[b] = self._draw(*self._candidates(row), b)
        return out

    def distribution(self, logits: np.ndarray, history: Sequence[Sequence[int]] | None = None,
                     prompt_lens: Sequence[int] | None = None) -> np.ndarray:
        """The probabilities ``__call__`` draws from, float64 ``[batch, vocab]``.

        Tokens removed by the filters have probability exactly 0. Greedy gives one-hot rows.
        """
        logits = self._check_logits(logits, history)
        out = np.zeros(logits.shape, dtype=np.float64)
        for b in range(logits.shape[0]):
            row = self._penalized(logits[b], *self._row_history(history, prompt_lens, b))
            if self.greedy:
                out[b, _argmax(row)] = 1.0
            else:
                ids, weights = self._candidates(row)
                probs = weights / weights.sum()
                if ids is None:
                    out[b] = probs
                else:
                    out[b, ids] = probs
        return out

    def draw(self, probs: np.ndarray, b: int = 0) -> int:
        """A token drawn from ``probs`` (weights over the vocabulary, [vocab]) with row ``b``'s
        random stream: speculative decoding draws from distributions it builds itself."""
        return _inverse_cdf(np.asarray(probs, dtype=np.float64), self._stream(b).random())

    def uniform(self, b: int = 0) -> float:
        """A number in [0, 1) from row ``b``'s random stream."""
        return float(self._stream(b).random())

    # -- steps -----------------------------------------------------------------------------

    def _check_logits(self, logits, history) -> np.ndarray:
        logits = np.asarray(logits)
        if logits.ndim != 2 or logits.shape[1] == 0:
            raise ValueError(f"logits must have shape [batch, vocab], got {logits.shape}")
        if not np.issubdtype(logits.dtype, np.floating):
            raise ValueError(f"logits must be floating point, got {logits.dtype}")
        if logits.size and np.isnan(logits.max()):        # max propagates NaN: one pass, no mask
            raise ValueError("logits contain NaN; the model produced invalid output")
        if history is not None and len(history) != logits.shape[0]:
            raise ValueError(
                f"history has {len(history)} rows but logits have batch {logits.shape[0]}")
        return logits

    @staticmethod
    def _row_history(history, prompt_lens, b) -> tuple[Sequence[int], int]:
        if history is None:
            return (), 0
        return history[b], 0 if prompt_lens is None else int(prompt_lens[b])

    def _penalized(self, row: np.ndarray, history: Sequence[int], prompt_len: int = 0
                   ) -> np.ndarray:
        # float64: float32 sums over a 150k vocabulary drift enough to move the top-p cut.
        row = row.astype(np.float64)
        if self.params.logit_bias:
            ids, bias = np.array(self.params.logit_bias).T
            if ids.max() >= row.shape[0]:
                raise ValueError(f"logit_bias names token {int(ids.max())}; the vocabulary has {row.shape[0]}")
            row[ids.astype(np.int64)] += bias
        if self.repetition_penalty != 1.0 and len(history):
            seen = np.unique(np.asarray(history, dtype=np.int64))
            seen = seen[(seen >= 0) & (seen < row.shape[0])]
            vals = row[seen]
            row[seen] = np.where(vals > 0, vals / self.repetition_penalty,
                                 vals * self.repetition_penalty)
        if (self.frequency_penalty or self.presence_penalty) and len(history) > prompt_len:
            ids, counts = np.unique(np.asarray(history[prompt_len:], dtype=np.int64),
                                    return_counts=True)
            keep = (ids >= 0) & (ids < row.shape[0])
            ids, counts = ids[keep], counts[keep]
            row[ids] -= counts * self.frequency_penalty + self.presence_penalty
        if self.min_tokens and len(history) - prompt_len < self.min_tokens and self._end_ids.size:
            ends = self._end_ids[self._end_ids < row.shape[0]]
            row[ends] = -np.inf
        if row.max() == -np.inf:                          # (no NaN here: _check_logits refused them)
            raise ValueError("every logit is -inf; nothing can be sampled")
        return row

    def _candidates(self, row: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """The tokens that survive the filters, and weights proportional to their probability.

        ``ids`` is None when every token survives (weights are then in id order), which
        spares the common unfiltered case any copy of the vocabulary. Once a filter cuts
        the vocabulary down, work continues on the small candidate arrays, so top-k and
        top-p cost about one pass over the logits rather than a full sort.
        """
        top = row.max()
        if top == np.inf:
            # +inf means "must pick"; spread the mass over those tokens only.
            ids = np.flatnonzero(np.isposinf(row))
            return ids, np.ones(len(ids))
        # Shift before scaling: a tiny temperature then sends far-off logits to -inf
        # (weight 0, as intended) instead of the top ones to +inf. The top weight is 1.
        # In place, on the caller's private float64 copy: on a large vocabulary fresh
        # temporaries cost more than the arithmetic.
        vals = row
        vals -= top
        vals /= self.temperature
        weights = _exp(vals)
        ids = None
        # Ranking uses the scaled logits, not the weights: exp() can round two distinct
        # logits to one weight, and the ranking must agree with greedy's argmax.
        ranked = False  # whether the candidates are in (logit desc, id asc) order

        if 0 < self.top_k < len(vals):
            ids = ranked_top(vals, self.top_k)[:self.top_k]
            vals, weights, ranked = vals[ids], weights[ids], True

        if self.top_p < 1.0:
            target = (self.top_p - 1e-12) * weights.sum()
            # The nucleus is usually a small part of the vocabulary: rank a growing top
            # slice until it holds top_p of the mass instead of sorting everything.
            m = 64
            while not ranked:
                order = ranked_top(vals, m)
                if weights[order].sum() >= target or len(order) == len(vals):
                    ids, weights, ranked = order, weights[order], True
                m *= 8
            # The slack in target keeps a set whose mass is top_p up to rounding from
            # losing its last member to a cumulative sum of 0.8999999 against 0.9.
            n = int(np.searchsorted(np.cumsum(weights), target, side="left")) + 1
            ids, weights = ids[:n], weights[:n]

        if self.min_p > 0.0:
            keep = weights >= self.min_p * weights.max()
            ids = np.flatnonzero(keep) if ids is None else ids[keep]
            weights = weights[keep]

        return ids, weights

    def _draw(self, ids: np.ndarray | None, weights: np.ndarray, b: int) -> int:
        u = self._stream(b).random()
        i = _inverse_cdf(weights, u)
        return i if ids is None else int(ids[i])

    def _stream(self, b: int) -> np.random.Generator:
        row = self._rows[b] if self._rows is not None else b
        # Spawning is sequential in SeedSequence, so streams are created in row order and
        # stream r is always the r-th child, however rows are first requested.
        while len(self._streams) <= row:
            self._streams.append(np.random.Generator(np.random.PCG64(self._seed_seq.spawn(1)[0])))
        return self._streams[row]


def _exp(vals: np.ndarray) -> np.ndarray:
    """exp of float64 values <= 0, computed in float32 and returned as float64 weights.

    numpy vectorizes float32's exp on AVX2 but computes float64's element by element: 0.35-0.45
    ms over a 49k vocabulary against 0.07-0.12 (an AMD EPYC, Zen 3), per row and token.
    float32's exp is good to about 1e-7 of each weight (transformers' softmax is float32
    throughout); what float64 is kept for is the sums over the vocabulary, which drift in
    float32. Logits more than 87·T below the top get weight exactly 0."""
    with np.errstate(over="ignore"):        # below float32's range: -inf, then weight 0
        return np.exp(vals.astype(np.float32)).astype(np.float64)


def _argmax(row: np.ndarray) -> int:
    return int(np.argmax(row))  # np.argmax returns the first maximum: the lowest id


def ranked_top(vals: np.ndarray, m: int) -> np.ndarray:
    """Positions of at least the m largest ``vals``, ordered by value desc then position asc.

    A partition finds the m-th largest value in linear time; only the candidates at or above
    it are sorted. Ties with the m-th value are all included, so the first m of the result
    are exactly the top m with ties going to the lowest ids.
    """
    if m >= len(vals):
        pos = np.arange(len(vals))
    else:
        kth = np.partition(vals, len(vals) - m)[len(vals) - m]
        pos = np.flatnonzero(vals >= kth)
    # pos is ascending, so a stable sort leaves ties in id order.
    return pos[np.argsort(-vals[pos], kind="stable")]


_BLOCK = 1024


def _inverse_cdf(weights: np.ndarray, u: float) -> int:
    """The index i with cum[i-1] <= u * total < cum[i], cum being the cumulative weights.

    A float64 cumsum over a 150k vocabulary costs about a millisecond, more than the rest of
    sampling; summing blocks first and scanning only the chosen block costs a tenth of it.
    Landing on a zero weight is impossible except by rounding at a block's top, so that
    case falls back to the last positive weight before it.
    """
    if len(weights) <= 4 * _BLOCK:
        cum = np.cumsum(weights)
        return _search(cum, weights, u * cum[-1])
    pad = -len(weights) % _BLOCK
    padded = np.concatenate([weights, np.zeros(pad)]) if pad else weights
    block_sums = padded.reshape(-1, _BLOCK).sum(axis=1)
    cum = np.cumsum(block_sums)
    x = u * cum[-1]
    j = _search(cum, block_sums, x)
    start = j * _BLOCK
    block = padded[start:start + _BLOCK]
    x -= cum[j - 1] if j else 0.0
    return start + _search(np.cumsum(block), block, x)


def _search(cum: np.ndarray, weights: np.ndarray, x: float) -> int:
    # side="right": the first entry whose cumulative sum exceeds x has a positive weight.
    i = int(np.searchsorted(cum, x, side="right"))
    if i >= len(cum) or weights[i] <= 0.0:
        i = int(np.flatnonzero(weights[:min(i, len(cum) - 1) + 1] > 0)[-1])
    return i
