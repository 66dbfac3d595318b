"""Speculative decoding in the scheduler (``kiln serve --draft``), for a request running alone.

When one request holds a row and nothing else runs, waits or prefills, the scheduler's step is
a speculative round for that row (:mod:`kiln.runtime.speculative`) instead of a decode step:
the draft, a batch-1 session of its own, proposes tokens after the request's history; the
target checks them in one run over the row (``extend_row(..., every=True)``) and takes back the
rejected ones (``truncate_row``). As soon as a second request comes, steps are batched again
(rows that accept different counts of proposals would need ragged verifying runs); the draft's
cache keeps what it holds of the request, so it catches up with only the tokens it missed.
Each token is the request's own as in a decode step: its sampler draws and its decoder takes
it (stop strings, logprobs from the target's logits at that position, limits).
"""
from __future__ import annotations

import numpy as np

from .speculative import DEFAULT_DRAFT_TOKENS, judge, propose


class SoloDrafter:
    """The draft session and what its cache holds: the first ``drafted`` tokens of the
    history of ``request`` (None: nothing)."""

    def __init__(self, draft, draft_tokens: int = DEFAULT_DRAFT_TOKENS):
        self.draft, self.k = draft, int(draft_tokens)
        self.request, self.drafted = None, 0
        self.proposed = self.accepted = 0

    def round(self, session, req) -> list[tuple[int, np.ndarray]] | None:
        """A round for ``req`` at its row: the tokens it decided and the target's logits that
        chose each (the caller hands them to the request in order), or None when no proposal
        fits before its limit (a plain step serves it)."""
        row = req.decoder
        seq = row.history                 # its prompt and tokens; the row's cache lacks the last
        k = min(self.k, row.limit - row.count - 1)
        if session.max_length is not None:
            k = min(k, session.max_length - len(seq))
        if self.draft.max_length is not None:
            k = min(k, self.draft.max_length - len(seq) + 1)
        if k < 1:
            return None
        if self.request is not req:
            self.draft.reset(1)
            self.request, self.drafted = req, 0
        # the target's width, which the draft's logits are fitted to (unknown: taken as equal)
        proposals, qs = propose(self.draft, seq[self.drafted:], k, row.sampler, seq, row.prompt_tokens,
                                session.vocab_size)
        self.drafted = len(seq) + k - 1
        r = req._row
        logits = np.asarray(session.extend_row(r, seq[-1:] + proposals, every=True))
        out = judge(row.sampler, proposals, qs, logits, seq, row.prompt_tokens)
        kept = len(out) - 1
        self.proposed, self.accepted = self.proposed + k, self.accepted + kept
        session.truncate_row(r, len(seq) + kept)
        self.drafted = min(self.drafted, len(seq) + kept)
        self.draft.truncate(self.drafted)
        return list(zip(out, logits))
