"""How many prompt tokens the scheduler prefills in one step while other rows wait on it.

A fixed chunk bounds the tokens, not the time: a chunk's cost grows with the depth it is
prefilled at (its attention reads every earlier key), with the model's size and with the
machine's load. SmolLM2 on TVM, 256 tokens: 0.15 s at the start of a prompt, 3.8 s 7,000 tokens
deep before the blocked prefill attention, ~1 s after it; a 1B model takes ~2 s for 256 tokens
at any depth. So the running streams' gap between tokens was bounded by nothing a user sets.

``ChunkSizer`` aims each chunk at ``target_s`` seconds instead: after every chunk it scales the
next one by target / measured (at most doubling, in steps of ``ALIGN`` tokens so the TVM
session's pooled buffers see few distinct sizes, and the blocked kernels whole query blocks),
between ``MIN_TOKENS`` and the scheduler's ``prefill_chunk``, starting from ``FIRST_TOKENS`` (a
full first chunk of a big model on a loaded machine is itself a long gap). Depth grows by one chunk per step
and load changes slowly, so the last chunk's rate is a good forecast of the next one's.
When no other row is running nobody waits, and the whole ``prefill_chunk`` is used.
"""
from __future__ import annotations

ALIGN = 16
MIN_TOKENS = 16
FIRST_TOKENS = 64      # before any chunk is measured: a 1B model takes ~0.5 s for 64


class ChunkSizer:
    def __init__(self, most: int | None, target_s: float | None):
        if target_s is not None and target_s <= 0:
            raise ValueError("the prefill step target must be a positive number of seconds")
        self.most, self.target_s = most, target_s
        self.tokens = most if most is None else min(most, FIRST_TOKENS)

    def budget(self, others_running: bool) -> int | None:
        """Prompt tokens to prefill this step (None: no limit)."""
        if self.most is None or self.target_s is None or not others_running:
            return self.most
        return self.tokens

    def measured(self, tokens: int, seconds: float) -> None:
        """A step's prefill of ``tokens`` took ``seconds`` while others waited; size the next
        step's from it."""
        if self.most is None or self.target_s is None or tokens <= 0:
            return
        want = min(tokens * self.target_s / max(seconds, 1e-6), 2 * max(self.tokens, tokens))
        self.tokens = min(self.most, max(MIN_TOKENS, int(want) // ALIGN * ALIGN))
