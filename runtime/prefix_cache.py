"""The prefix cache: prompts that begin alike (a system prompt, a conversation's earlier turns)
reuse the keys and values an earlier request computed for their common beginning instead of
prefilling it again.

What is kept is host copies of a row's cache in blocks of ``block_tokens`` positions, each
block keyed by the ids of its own tokens and the block before it (so a block stands for its
whole prefix, as vLLM's hashed block chains do; here the key holds the ids themselves, so two
prefixes never share a block by a hash's collision). A new prompt takes the longest chain of
stored blocks that matches its beginning, less at least its last token, which is prefilled so
that its logits exist. The blocks hold at most ``budget_bytes`` together; the least recently
used go first, and a block's descendants with it (nothing can reach them any more).

Keys are a function of the positions and the tokens before them only (causal attention,
absolute positions), so a row loaded from the cache holds what a prefill of the same tokens
would write, and the scheduler's requests get the tokens they get without it.

The scheduler calls :meth:`PrefixCache.reuse` when a request takes a row and
:meth:`PrefixCache.keep` once its prompt is in and when it ends (the answer's blocks serve
the conversation's next turn). Only the scheduler's thread uses it; the counters are read
from others (the server's ``/metrics``).
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import count

import numpy as np

__all__ = ["PrefixCache", "BLOCK_TOKENS", "DEFAULT_MB"]

#: Positions per block: a prompt's reusable part ends on a multiple of it. Smaller blocks match
#: more of a partly shared prompt; each costs one copy per cache tensor either way.
BLOCK_TOKENS = 64

#: ``kiln serve``'s default budget (``--prefix-cache-mb``). SmolLM2-135M's float32 cache is
#: 45 KB a token, so this holds ~11,000 tokens of it.
DEFAULT_MB = 512


_serials = count()


@dataclass(eq=False)
class _Block:
    key: tuple
    parent: "_Block | None"
    kv: np.ndarray
    children: list = field(default_factory=list)
    serial: int = field(default_factory=lambda: next(_serials))


class PrefixCache:
    """Blocks of rows' keys and values, at most ``budget_bytes`` of them."""

    def __init__(self, budget_bytes: int, block_tokens: int = BLOCK_TOKENS):
        if budget_bytes < 0 or block_tokens < 1:
            raise ValueError("the prefix cache needs a budget >= 0 bytes and blocks of >= 1 token")
        self.budget_bytes, self.block_tokens = int(budget_bytes), int(block_tokens)
        # least recently used first; the key of a block is (its parent's serial, its ids)
        self._blocks: OrderedDict[tuple, _Block] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.tokens_reused = self.evictions = 0

    def __len__(self) -> int:
        return len(self._blocks)

    # ---- the scheduler's two calls ----------------------------------------------------------
    def reuse(self, session, r: int, prompt: Sequence[int]) -> int:
        """Load the longest stored beginning of ``prompt`` (all of it but its last token at
        most) into row ``r`` of ``session``; returns how many tokens it holds now (0: none)."""
        if not self.budget_bytes:
            return 0
        chain = self._chain(prompt, (len(prompt) - 1) // self.block_tokens)
        if not chain:
            self.misses += 1
            return 0
        session.load_kv(r, [b.kv for b in chain])
        self._touch(chain)
        n = len(chain) * self.block_tokens
        self.hits += 1
        self.tokens_reused += n
        return n

    def keep(self, session, r: int, tokens: Sequence[int]) -> None:
        """Store the whole blocks of ``tokens``, which row ``r`` of ``session`` holds from
        position 0 on, that are not stored yet (the ones that are become the most recent)."""
        if not self.budget_bytes:
            return
        full = len(tokens) // self.block_tokens
        chain = self._chain(tokens, full)
        parent = chain[-1] if chain else None
        for i in range(len(chain), full):
            a = i * self.block_tokens
            kv = session.read_kv(r, a, a + self.block_tokens)
            if kv.nbytes > self.budget_bytes:
                break
            block = _Block(self._key(parent, tokens[a:a + self.block_tokens]), parent, kv)
            if parent is not None:
                parent.children.append(block)
            self._blocks[block.key] = block
            self.bytes += kv.nbytes
            chain.append(block)
            parent = block
        self._touch(chain)
        self._evict()

    # ---- internals --------------------------------------------------------------------------
    @staticmethod
    def _key(parent: _Block | None, ids: Sequence[int]) -> tuple:
        return (None if parent is None else parent.serial, tuple(int(t) for t in ids))

    def _chain(self, tokens: Sequence[int], most: int) -> list[_Block]:
        """The stored blocks that match ``tokens`` from the start, at most ``most`` of them."""
        chain, parent = [], None
        for i in range(most):
            block = self._blocks.get(self._key(parent, tokens[i * self.block_tokens:(i + 1) * self.block_tokens]))
            if block is None:
                break
            chain.append(block)
            parent = block
        return chain

    def _touch(self, chain: list[_Block]) -> None:
        # deepest first, so a chain's first blocks are its most recent: eviction takes its
        # tail before its head (a head is what other prompts share)
        for block in reversed(chain):
            self._blocks.move_to_end(block.key)

    def _evict(self) -> None:
        while self.bytes > self.budget_bytes:
            self._drop(next(iter(self._blocks.values())))

    def _drop(self, block: _Block) -> None:
        """Remove ``block`` and its descendants, whose keys name it."""
        stack = [block]
        while stack:
            b = stack.pop()
            if self._blocks.pop(b.key, None) is not None:
                self.bytes -= b.kv.nbytes
                self.evictions += 1
            stack.extend(b.children)
            b.children = []
        if block.parent is not None and block in block.parent.children:
            block.parent.children.remove(block)
