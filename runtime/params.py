"""One request's generation settings, checked once: :class:`SamplingParams`.

``generate``, ``stream``, ``chat``, the scheduler, beam search and the server all take their
settings as a SamplingParams (or as keyword arguments that build one), so a new option is one
field here (and, for the server, one entry of its request schema). The names are OpenAI's
(``max_tokens``, ``stop``, ``logprobs``, the penalties) and transformers' (``top_k``,
``min_p``, ``repetition_penalty``); ``max_new_tokens`` is accepted for ``max_tokens``.
See :mod:`kiln.runtime.sampling` for what each sampling setting does.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

__all__ = ["SamplingParams", "InvalidParam", "check_count"]


class InvalidParam(ValueError):
    """A setting that cannot be used; ``param`` names it (the server reports it as such)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


MAX_BIASES = 1024


def _check_bias(bias) -> tuple[tuple[int, float], ...]:
    items = bias.items() if isinstance(bias, dict) else bias
    try:
        pairs = [(k, v) for k, v in items]
    except (TypeError, ValueError):
        raise InvalidParam("logit_bias must map token ids to numbers", "logit_bias") from None
    if len(pairs) > MAX_BIASES:
        raise InvalidParam(f"logit_bias holds {len(pairs)} tokens; at most {MAX_BIASES}", "logit_bias")
    out = {}
    for k, v in pairs:
        if isinstance(k, str) and k.isascii() and k.isdigit() and len(k) < 12:
            k = int(k)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise InvalidParam(f"logit_bias keys must be token ids, got {str(k)[:40]!r}", "logit_bias")
        out[int(k)] = _check_float("logit_bias", v, "in [-100, 100]", lambda x: -100 <= x <= 100)
    return tuple(sorted(out.items()))


@dataclass(frozen=True)
class SamplingParams:
    """What to generate and how to pick each token.

    ``temperature`` 0 is greedy decoding. ``stop``: strings that end the text (a string, or a
    list of them; kept as a tuple). ``logprobs``: None, or how many top alternatives (0..20)
    each token's logprob comes with (the scheduler and server report them).

    vLLM's extensions (for benchmarks): ``min_tokens``, the EOS ids and the stop strings'
    special tokens cannot be drawn before that many tokens (as transformers'
    ``min_new_tokens``; a stop string in the text still ends it); ``ignore_eos``, the EOS ids
    are ordinary tokens (kept in ``ids``, generation goes on).

    ``grammar``: None, or a :class:`~kiln.runtime.grammar.Grammar` (a JSON schema, a regex, a
    grammar) that every answer matches: the tokens it does not allow next are never drawn, and
    the row ends ("stop") when it is complete.

    ``logit_bias``: OpenAI's ``{token id: bias}`` (ids as ints or decimal strings, biases in
    [-100, 100], at most 1,024 of them), added to those logits before anything else (kept as
    sorted ``(id, bias)`` pairs).
    """

    max_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    grammar: object = None
    logit_bias: object = ()

    def __post_init__(self):
        fix = object.__setattr__           # frozen: normalised values are set once, here
        fix(self, "max_tokens", check_count("max_tokens", self.max_tokens))
        fix(self, "temperature", _check_float("temperature", self.temperature, ">= 0", lambda v: v >= 0))
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise InvalidParam(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}", "top_k")
        fix(self, "top_k", int(self.top_k))
        fix(self, "top_p", _check_float("top_p", self.top_p, "in (0, 1]", lambda v: 0 < v <= 1))
        fix(self, "min_p", _check_float("min_p", self.min_p, "in [0, 1]", lambda v: 0 <= v <= 1))
        fix(self, "repetition_penalty",
            _check_float("repetition_penalty", self.repetition_penalty, "> 0", lambda v: v > 0))
        for name in ("frequency_penalty", "presence_penalty"):
            fix(self, name, _check_float(name, getattr(self, name), "in [-2, 2]", lambda v: -2 <= v <= 2))
        seed = self.seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
            raise InvalidParam(f"seed must be a non-negative integer or None, got {seed!r}", "seed")
        fix(self, "seed", None if seed is None else int(seed))
        fix(self, "stop", _stop_strings(self.stop))
        if self.logprobs is not None:
            check_count("logprobs", self.logprobs)
            if self.logprobs > 20:
                raise InvalidParam(f"logprobs must be at most 20, got {self.logprobs}", "logprobs")
            fix(self, "logprobs", int(self.logprobs))
        fix(self, "min_tokens", check_count("min_tokens", self.min_tokens))
        if self.min_tokens > self.max_tokens:
            raise InvalidParam(f"min_tokens ({self.min_tokens}) must be at most max_tokens ({self.max_tokens})",
                               "min_tokens")
        if not isinstance(self.ignore_eos, (bool, np.bool_)):
            raise InvalidParam(f"ignore_eos must be true or false, got {self.ignore_eos!r}", "ignore_eos")
        fix(self, "ignore_eos", bool(self.ignore_eos))
        fix(self, "logit_bias", _check_bias(self.logit_bias))
        if self.grammar is not None:
            from .grammar import Grammar        # not at the top: grammar.py imports InvalidParam
            if not isinstance(self.grammar, Grammar):
                raise InvalidParam(f"grammar must be a kiln.runtime.grammar.Grammar or None, got "
                                   f"{type(self.grammar).__name__}", "grammar")

    @property
    def max_new_tokens(self) -> int:
        """transformers' name of ``max_tokens``."""
        return self.max_tokens

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def of(cls, params: SamplingParams | None = None, **settings) -> SamplingParams:
        """``params`` with ``settings`` (keyword arguments, by the names of the fields or
        ``max_new_tokens``) in place of its values; without ``params``, from the defaults."""
        if "max_new_tokens" in settings:
            if "max_tokens" in settings:
                raise TypeError("give max_tokens or max_new_tokens, not both")
            settings["max_tokens"] = settings.pop("max_new_tokens")
            alias = True
        else:
            alias = False
        unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"unexpected keyword argument {unknown[0]!r}")
        try:
            return dataclasses.replace(params, **settings) if params is not None else cls(**settings)
        except InvalidParam as e:
            if alias and e.param == "max_tokens":     # name it as the caller did
                raise InvalidParam(str(e).replace("max_tokens", "max_new_tokens", 1), "max_new_tokens") from None
            raise

    def non_default(self) -> dict:
        """The fields whose value is not the default (for a caller that supports only some)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != f.default}


def check_count(name: str, value) -> int:
    """``value`` as an int, or InvalidParam naming ``name`` unless it is an integer >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise InvalidParam(f"{name} must be an integer >= 0, got {value!r}", name)
    return int(value)


def _check_float(name: str, value, rule: str, ok) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InvalidParam(f"{name} must be a number {rule}, got {value!r}", name)
    value = float(value)
    if math.isnan(value) or math.isinf(value) or not ok(value):
        raise InvalidParam(f"{name} must be {rule}, got {value!r}", name)
    return value


def _stop_strings(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    for s in stops:
        if not isinstance(s, str) or not s:
            raise InvalidParam(f"stop strings must be non-empty strings, got {s!r}", "stop")
    return stops
