"""Token log-probabilities for ``kiln serve``'s ``logprobs`` option, and their OpenAI shapes.

The log-probability reported for a token is of the model's own distribution: the log-softmax
of the raw logits at that step, before any penalty, temperature or top-k/top-p/min-p filter
(vLLM's default, ``raw_logprobs``; OpenAI documents no processing either). It therefore
does not depend on the sampling settings, and a greedy token's logprob equals the top entry
of ``top_logprobs``.
The scheduler computes it (in float64, from the float32 logits of the request's row) only
for requests that ask.
"""
from __future__ import annotations

import json
import math
import re

import numpy as np

from .sampling import ranked_top

__all__ = ["token_logprobs", "TokenStrings", "chat_logprobs", "completion_logprobs"]

#: What JSON gets for a logprob of -inf (JSON has no infinities); OpenAI uses the same value.
FLOOR = -9999.0


def token_logprobs(logits: np.ndarray, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """The logprob of ``token`` and the ``k`` most likely tokens with theirs (highest first,
    ties to the lower id) under the log-softmax of one row of logits."""
    x = np.asarray(logits, dtype=np.float64)
    finite = x[np.isfinite(x)]
    m = finite.max() if finite.size else 0.0
    lse = m + math.log(np.exp(x - m).sum())
    top = ranked_top(x, k)[:k] if k else ()
    return _finite(x[token] - lse), [(int(i), _finite(x[i] - lse)) for i in top]


def _finite(v) -> float:
    v = float(v)
    return v if math.isfinite(v) else FLOOR


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2 byte-level BPE spells every byte as one printable character: bytes that are
    printable Latin-1 stand for themselves, the others take the code points from 256 up in
    byte order. Returns character -> byte."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    out = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in out.values():
            out[chr(256 + extra)] = b
            extra += 1
    return out


_BYTE_LEVEL = _byte_level_alphabet()


def _uses_byte_level(tokenizer) -> bool:
    try:
        decoder = json.loads(tokenizer.backend.to_str()).get("decoder") or {}
    except (AttributeError, ValueError):
        return False
    return "ByteLevel" in json.dumps(decoder)
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenStrings:
    """A token id's text and raw UTF-8 bytes, as OpenAI's ``token`` and ``bytes`` fields.

    ``bytes`` are the token's own bytes: a token holding part of a multi-byte character has
    only that part, and its ``token`` string shows U+FFFD for it. Byte-level BPE (GPT-2,
    SmolLM2, Qwen, Llama 3) and SentencePiece pieces with byte fallback (``\u2581`` as a
    space, ``<0x0A>`` as its byte) are read exactly. A model without a tokenizer
    names tokens ``token_id:N`` (vLLM's spelling) with no bytes.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int] | None]] = {}
        self._byte_level = tokenizer is not None and _uses_byte_level(tokenizer)

    def __call__(self, token: int) -> tuple[str, list[int] | None]:
        hit = self._cache.get(token)
        if hit is None:
            hit = self._cache[token] = self._lookup(token)
        return hit

    def _lookup(self, token: int) -> tuple[str, list[int] | None]:
        if self.tokenizer is None:
            return f"token_id:{token}", None
        raw = self._bytes(token)
        return raw.decode("utf-8", errors="replace"), list(raw)

    def _bytes(self, token: int) -> bytes:
        piece = self.tokenizer.id_to_token(token)
        if piece is None:
            return b""
        if self._byte_level and all(c in _BYTE_LEVEL for c in piece):
            return bytes(_BYTE_LEVEL[c] for c in piece)
        m = _BYTE_FALLBACK.fullmatch(piece)
        if m:
            return bytes([int(m[1], 16)])
        return piece.replace("\u2581", " ").encode("utf-8")       # SentencePiece's word boundary

    def offsets(self, ids: list[int], start: int = 0) -> list[int]:
        """Where each token's text starts in the completion text: the length of the decoded
        text of the tokens before it (``start`` tokens of ``ids`` came in an earlier chunk)."""
        if self.tokenizer is None:
            return [0] * (len(ids) - start)
        return [len(self.tokenizer.decode(ids[:j])) for j in range(start, len(ids))]


def chat_logprobs(entries, strings: TokenStrings) -> dict:
    """``choices[i].logprobs`` of a chat completion: ``{"content": [...]}`` from
    ``(token, logprob, top)`` entries."""
    def one(t, lp):
        text, raw = strings(t)
        return {"token": text, "logprob": lp, "bytes": raw}
    return {"content": [{**one(t, lp), "top_logprobs": [one(u, ulp) for u, ulp in top]}
                        for t, lp, top in entries], "refusal": None}


def completion_logprobs(entries, strings: TokenStrings, ids: list[int], start: int = 0) -> dict:
    """``choices[i].logprobs`` of a legacy completion: parallel lists, ``top_logprobs`` as
    one ``{token: logprob}`` dict per token (tokens with the same text share a key, as in
    OpenAI's format). ``ids`` are the choice's tokens so far, ``entries`` the last of them."""
    return {"tokens": [strings(t)[0] for t, _, _ in entries],
            "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [{strings(u)[0]: ulp for u, ulp in top} for _, _, top in entries],
            "text_offset": strings.offsets(ids, start)}
