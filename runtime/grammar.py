"""Constrained decoding: a :class:`Grammar` limits which tokens a row may draw.

A request's grammar is a :class:`Grammar` (a JSON schema, any JSON object, a regular
expression, or a context-free grammar in Lark or llama.cpp's GBNF syntax), a value in its
:class:`~kiln.runtime.params.SamplingParams`. Each row that uses one gets a
:class:`RowConstraint`: before each draw it sets the logits of every token the grammar does not
allow next to -inf (so the temperature, top-k/p, min-p and the penalties then work on the
allowed tokens only, and every row of a batch has its own), and the token drawn advances it.
When the grammar can take no further token, the row ends with finish_reason "stop".

The matching is llguidance's (Microsoft, MIT): of the three maintained libraries measured on
SmolLM2's 49,152-token vocabulary (``benchmarks/grammar_mask_cost.py``, figures in
docs/design-notes.md) it compiles a schema in about a millisecond, computes a mask in about
10 µs (a thousandth of a decode step), has no dependencies, and reads every grammar kind
above; see the design note for the others.
"""
from __future__ import annotations

import functools
import json
import threading
import weakref
from dataclasses import dataclass

import numpy as np

from .params import InvalidParam

__all__ = ["Grammar", "RowConstraint", "GrammarError", "check_grammar", "row_constraint"]

#: kinds of grammar, and what their ``source`` is
KINDS = {
    "json_schema": "a JSON schema (its JSON text)",
    "json_object": "any JSON object (no source)",
    "regex": "a regular expression the whole answer matches",
    # told apart by their first rule, as llguidance does: Lark's is 'start: ...', GBNF's 'root ::= ...'
    "grammar": "a Lark grammar (llguidance's dialect, rule 'start') or a llama.cpp GBNF grammar (rule 'root')",
}

# JSON without free whitespace: with it, a sampled row may spend its max_tokens on blank lines
# between two items and end as truncated, invalid JSON. One space after ',' and ':' as
# json.dumps writes it.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(InvalidParam):
    """A grammar that cannot be used (bad schema, regex or grammar text); ``param`` names it."""


@dataclass(frozen=True)
class Grammar:
    """What a row's answer must match: ``kind`` (one of :data:`KINDS`) and its ``source``."""

    kind: str
    source: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise GrammarError(f"grammar kind must be one of {', '.join(KINDS)}, got {self.kind!r}", "grammar")
        if not isinstance(self.source, str) or (self.kind != "json_object" and not self.source):
            raise GrammarError(f"a {self.kind} grammar needs its text, got {self.source!r}", "grammar")

    @classmethod
    def json_schema(cls, schema: dict | bool) -> Grammar:
        return cls("json_schema", json.dumps(schema))

    def lark(self) -> str:
        """llguidance's grammar text of this grammar (GrammarError when it cannot be read)."""
        import llguidance
        if self.kind in ("json_schema", "json_object"):
            schema = {"type": "object"} if self.kind == "json_object" else self.source
            try:
                return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_STYLE)
            except ValueError as e:
                raise GrammarError(f"the JSON schema is not usable: {e}", "grammar") from None
        if self.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(self.source)
        from llguidance.gbnf_to_lark import GbnfToLarkError, any_to_lark
        try:
            return llguidance.LLMatcher.grammar_from_lark(any_to_lark(self.source))
        except GbnfToLarkError as e:
            raise GrammarError(f"the GBNF grammar is not valid: {' '.join(str(e).split())}", "grammar") from None


class _Vocabulary:
    """llguidance's view of one tokenizer (its token bytes and a trie): built once per
    tokenizer and vocabulary size, which costs about half a second for 49k tokens."""

    _cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
    _lock = threading.Lock()

    @classmethod
    def of(cls, tokenizer, vocab: int | None):
        try:
            import llguidance
        except ImportError:
            raise GrammarError("structured output needs llguidance, which is not installed: "
                               "pip install 'kiln[structured]'", "grammar") from None
        vocab = max(int(vocab or 0), tokenizer.vocab_size)
        with cls._lock:
            known = cls._cache.setdefault(tokenizer, {})
            if vocab not in known:
                known[vocab] = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab,
                                                      eos_token=list(tokenizer.eos_ids) or None)
            return known[vocab]


def _compiled(grammar: Grammar, tokenizer, vocab: int | None):
    if tokenizer is None:
        raise GrammarError("a grammar needs the model's tokenizer, and this model has none", "grammar")
    lltok = _Vocabulary.of(tokenizer, vocab)
    return lltok, _checked(grammar, lltok)


@functools.lru_cache(maxsize=64)
def _checked(grammar: Grammar, lltok) -> str:
    """The grammar's checked text; kept, so the server's check of a request (off its event loop)
    leaves only the matcher to build when the scheduler takes it, and a schema sent again is
    not compiled again."""
    import llguidance
    text = grammar.lark()
    error = llguidance.LLMatcher.validate_grammar(text, lltok)
    if error:
        error = " ".join(error.split())       # llguidance points at the spot over several lines
        raise GrammarError(f"the {grammar.kind.replace('_', ' ')} is not usable: {error[:300]}", "grammar")
    return text


def check_grammar(grammar: Grammar, tokenizer, vocab: int | None = None) -> None:
    """GrammarError (one line naming the problem) unless ``grammar`` compiles for ``tokenizer``."""
    _compiled(grammar, tokenizer, vocab)


def row_constraint(grammar: Grammar | None, tokenizer, vocab: int | None = None) -> RowConstraint | None:
    """One row's matcher of ``grammar`` (None: no grammar, no constraint)."""
    if grammar is None:
        return None
    import llguidance
    lltok, text = _compiled(grammar, tokenizer, vocab)
    return RowConstraint(llguidance.LLMatcher(lltok, text, log_level=0), lltok.vocab_size)


class RowConstraint:
    """One row's position in its grammar: the tokens it may draw next, and when it is done."""

    def __init__(self, matcher, vocab: int):
        self.matcher, self.vocab = matcher, vocab
        self._bits = np.zeros((vocab + 31) // 32, dtype=np.int32)

    def allowed(self) -> np.ndarray:
        """bool [vocab]: the tokens the grammar allows next."""
        self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        self._raise_if_failed()
        return np.unpackbits(self._bits.view(np.uint8), count=self.vocab, bitorder="little").view(bool)

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """A copy of ``logits`` (float [vocab'], any width) with the disallowed tokens at -inf."""
        allowed = self.allowed()
        if len(logits) == self.vocab:
            return np.where(allowed, logits, -np.inf).astype(logits.dtype, copy=False)
        out = np.full(logits.shape, -np.inf, dtype=logits.dtype)
        n = min(len(out), self.vocab)
        out[:n] = np.where(allowed[:n], logits[:n], -np.inf)
        return out

    def accept(self, token: int) -> None:
        """Advance by the drawn token (one the mask allowed)."""
        if not self.matcher.consume_token(int(token)):
            self._raise_if_failed()

    @property
    def done(self) -> bool:
        """Whether the grammar takes no further token (the answer is complete)."""
        return self.matcher.is_stopped()

    def _raise_if_failed(self) -> None:
        if self.matcher.is_error():
            # a limit of llguidance's parser or a token the mask did not allow: a bug, not the
            # request's input (which was checked when it came in)
            raise RuntimeError(f"the grammar matcher failed: {self.matcher.get_error().splitlines()[0]}")
