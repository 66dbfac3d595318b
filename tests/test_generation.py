"""The decode loop, stop handling and streaming, on a fake session and a byte tokenizer."""
from __future__ import annotations

import codecs

import numpy as np
import pytest

from kiln.runtime.generation import (PAD_ID, GenerationResult, Session, generate,
                                     generate_ids, stream)
from kiln.runtime.sampling import Sampler

# -- a byte-level tokenizer ------------------------------------------------------------------

BOS, EOS, END = 256, 257, 258  # END is a special "<|end|>" token, like <|im_end|>
MERGES = {259: b"he", 260: b"llo", 261: b" wor", 262: b"ld"}
SPECIAL = {BOS: "<s>", EOS: "</s>", END: "<|end|>"}
VOCAB = 263


def token_bytes(t: int) -> bytes:
    return bytes([t]) if t < 256 else MERGES.get(t, b"")


class ByteTokenizer:
    eos_ids = (EOS,)
    bos_id = BOS

    def encode(self, text: str) -> list[int]:
        if text == SPECIAL[END]:
            return [END]
        data, ids, i = text.encode("utf-8"), [], 0
        while i < len(data):
            for t, m in sorted(MERGES.items(), key=lambda kv: -len(kv[1])):
                if data.startswith(m, i):
                    ids.append(t)
                    i += len(m)
                    break
            else:
                ids.append(data[i])
                i += 1
        return ids

    def decode(self, ids, skip_special_tokens=True) -> str:
        out = b""
        for t in ids:
            if t in SPECIAL:
                out += b"" if skip_special_tokens else SPECIAL[t].encode()
            else:
                out += token_bytes(t)
        return out.decode("utf-8", errors="replace")

    def stream_decoder(self):
        return ByteStream()


class ByteStream:
    def __init__(self):
        self.dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, t: int) -> str:
        return "" if t in SPECIAL else self.dec.decode(token_bytes(t))

    def flush(self) -> str:
        return self.dec.decode(b"", final=True)


class DecodeOnlyTokenizer(ByteTokenizer):
    stream_decoder = None  # exercises the fallback decoder built on decode()


class PutStream(ByteStream):
    """A stream decoder that spells "next token" put(), like kiln.runtime.tokenizer's."""

    def put(self, t: int) -> str:
        return ByteStream.add(self, t)

    add = None


class SpecialsTokenizer(ByteTokenizer):
    """Decides itself what add_special_tokens adds, like a real tokenizer (here: BOS, BOS)."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return ([BOS, BOS] if add_special_tokens else []) + ByteTokenizer.encode(self, text)

    def stream_decoder(self):
        return PutStream()


TOK = ByteTokenizer()

# -- a fake session --------------------------------------------------------------------------

TABLE = np.random.default_rng(0).normal(size=(VOCAB, VOCAB)).astype(np.float32) * 2
POS_BIAS = np.random.default_rng(1).normal(size=(17, VOCAB)).astype(np.float32)


def toy_logits(last_token: int, length: int) -> np.ndarray:
    """The toy model: next-token logits from the last token and the sequence length."""
    return TABLE[last_token] + POS_BIAS[length % 17]


class FakeSession:
    """A KV-cache session that checks it is driven as prefill, then one token per step.

    Without ``script`` it runs the toy model. With ``script`` (one token list per row) the
    i-th new token of row b is script[b][i] by a wide margin, then EOS.
    """

    def __init__(self, script=None, max_length=None):
        self.script = script
        self.max_length = max_length
        self.calls: list[tuple[tuple[int, ...], bool]] = []
        self.resets: list[int] = []
        self.batch = None

    def reset(self, batch: int = 1) -> None:
        self.resets.append(batch)
        self.batch = batch
        self.cache = np.zeros((batch, 0), dtype=np.int64)

    def forward(self, ids: np.ndarray, last_only: bool = False) -> np.ndarray:
        assert self.batch is not None, "forward before reset"
        assert ids.dtype == np.int64 and ids.ndim == 2 and ids.shape[0] == self.batch
        if self.cache.shape[1]:
            assert ids.shape[1] == 1, "decode steps feed one token"
        else:
            self.prompt_len = ids.shape[1]
        self.calls.append((ids.shape, last_only))
        self.cache = np.concatenate([self.cache, ids], axis=1)
        if self.max_length is not None:
            assert self.cache.shape[1] <= self.max_length
        length = self.cache.shape[1]
        positions = range(length - ids.shape[1] + 1, length + 1)
        out = np.stack([self._logits(p) for p in positions], axis=1)
        return out[:, -1:] if last_only else out

    def _logits(self, length: int) -> np.ndarray:
        if self.script is None:
            return np.stack([toy_logits(int(self.cache[b, length - 1]), length)
                             for b in range(self.batch)])
        out = np.full((self.batch, VOCAB), -5.0, dtype=np.float32)
        for b in range(self.batch):
            i = length - self.prompt_len
            row = self.script[b] if len(self.script) > 1 else self.script[0]
            if i >= 0:  # logits inside the prompt are never used for generation
                out[b, row[i] if i < len(row) else EOS] = 5.0
        return out

    @property
    def fed(self) -> list[list[int]]:
        return self.cache.tolist()


assert isinstance(FakeSession(), Session)


def reference_greedy(prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(np.argmax(toy_logits(ids[-1], len(ids)))))
    return ids[len(prompt):]


def script_of(text: str) -> list[int]:
    return TOK.encode(text)


# -- greedy, cache protocol ------------------------------------------------------------------

def test_greedy_matches_a_reference_loop_and_drives_the_cache_correctly():
    session = FakeSession()
    res = generate(session, TOK, [5, 6, 7], max_new_tokens=12)
    assert res.ids == reference_greedy([5, 6, 7], 12)
    assert res.finish_reason == "length" and res.prompt_tokens == 3
    # Prefill once with last_only, then one token per step; the last token is not fed.
    assert session.resets == [1]
    assert session.calls == [((1, 3), True)] + [((1, 1), True)] * 11
    assert session.fed == [[5, 6, 7] + res.ids[:-1]]


def test_greedy_is_deterministic():
    a = generate(FakeSession(), TOK, "hello", max_new_tokens=20)
    b = generate(FakeSession(), TOK, "hello", max_new_tokens=20)
    assert a.ids == b.ids and a.text == b.text


class ClockedSession(FakeSession):
    """A FakeSession on a fake clock: the prefill takes 0.25 s, each decode step 0.125 s."""

    def __init__(self, clock, **kw):
        super().__init__(**kw)
        self.clock = clock

    def forward(self, ids, last_only=False):
        self.clock[0] += 0.25 if not self.cache.shape[1] else 0.125
        return super().forward(ids, last_only)


def test_result_fields_and_timings(monkeypatch):
    import types

    import kiln.runtime.generation as generation
    clock = [100.0]
    monkeypatch.setattr(generation, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    res = generate(ClockedSession(clock, script=[script_of("hi")]), TOK, "xyz", max_new_tokens=10)
    assert isinstance(res, GenerationResult)
    assert (res.ids, res.text, res.finish_reason, res.prompt_tokens) == \
        (script_of("hi"), "hi", "eos", 3)
    # "h" comes out of the prefill, "i" and EOS out of two decode steps
    assert res.timings == {"prefill_s": 0.25, "decode_s": 0.25, "decode_steps": 2,
                           "prefill_tokens_per_s": 12.0, "tokens_per_s": 8.0}


# -- sampling through generate ---------------------------------------------------------------

def test_seed_reproducibility():
    kw = dict(max_new_tokens=25, temperature=1.0, seed=42)
    a = generate(FakeSession(), TOK, [1, 2], **kw)
    b = generate(FakeSession(), TOK, [1, 2], **kw)
    c = generate(FakeSession(), TOK, [1, 2], **{**kw, "seed": 43})
    assert a.ids == b.ids
    assert a.ids != c.ids


def test_top_k_one_and_tiny_top_p_equal_greedy():
    greedy = generate(FakeSession(), TOK, [9], max_new_tokens=15).ids
    assert generate(FakeSession(), TOK, [9], max_new_tokens=15, temperature=1.5,
                    top_k=1, seed=1).ids == greedy
    assert generate(FakeSession(), TOK, [9], max_new_tokens=15, temperature=1.5,
                    top_p=1e-9, seed=1).ids == greedy
    assert generate(FakeSession(), TOK, [9], max_new_tokens=15, temperature=1.5,
                    min_p=1.0, seed=1).ids == greedy


def test_min_p_keeps_samples_among_likely_tokens():
    res = generate(FakeSession(), TOK, [3], max_new_tokens=30, temperature=1.0, min_p=0.3,
                   seed=0)
    ids = [3] + res.ids
    for i, t in enumerate(res.ids):
        logits = toy_logits(ids[i], i + 1)  # predicted with i + 1 tokens in the cache
        assert np.exp(logits[t] - logits.max()) >= 0.3 - 1e-6


class FavouriteSession(FakeSession):
    """Always prefers "a" (3.0) over "b" (2.0) over "c" (1.0); every other token is -1."""

    def _logits(self, length):
        row = np.full(VOCAB, -1.0, dtype=np.float32)
        row[[ord("a"), ord("b"), ord("c")]] = [3.0, 2.0, 1.0]
        return np.tile(row, (self.batch, 1))


def test_repetition_penalty_breaks_a_loop():
    assert generate(FavouriteSession(), TOK, "x", max_new_tokens=5).text == "aaaaa"
    # With 10, a seen "a" scores 0.3, "b" 0.2, "c" 0.1: after a, b and c it is "a" again,
    # since the penalty is applied once per distinct token, not once per occurrence.
    res = generate(FavouriteSession(), TOK, "x", max_new_tokens=5, repetition_penalty=10.0)
    assert res.text == "abcaa"


def test_repetition_penalty_covers_the_prompt():
    res = generate(FavouriteSession(), TOK, "a", max_new_tokens=1, repetition_penalty=10.0)
    assert res.text == "b"


# -- ends: eos, length, stop strings -----------------------------------------------------------

def test_eos_ends_generation_and_is_not_in_the_output():
    session = FakeSession(script=[script_of("hi") + [EOS] + script_of("more")])
    res = generate(session, TOK, "x", max_new_tokens=50)
    assert (res.ids, res.text, res.finish_reason) == (script_of("hi"), "hi", "eos")
    assert len(session.calls) == 3  # nothing is computed after EOS
    assert session.fed == [[ord("x")] + script_of("hi")]


def test_max_new_tokens_and_session_max_length():
    session = FakeSession(script=[script_of("abcdefgh")])
    res = generate(session, TOK, "xy", max_new_tokens=3)
    assert (res.text, res.finish_reason, len(session.calls)) == ("abc", "length", 3)

    session = FakeSession(script=[script_of("abcdefgh")], max_length=6)
    res = generate(session, TOK, "xy", max_new_tokens=100)
    assert (res.text, res.finish_reason) == ("abcd", "length")

    session = FakeSession()
    res = generate(session, TOK, "xy", max_new_tokens=0)
    assert (res.ids, res.text, res.finish_reason, session.calls) == ([], "", "length", [])

    with pytest.raises(ValueError, match="at most 2"):
        generate(FakeSession(max_length=2), TOK, "xyz")


def test_stop_string_spanning_token_boundaries():
    # "lo w" starts inside the token "llo" and ends inside " wor".
    session = FakeSession(script=[script_of("hello world")])
    res = generate(session, TOK, "x", stop="lo w", max_new_tokens=50)
    assert (res.text, res.finish_reason) == ("hel", "stop")
    assert res.ids == script_of("hello wor")  # tokens consumed up to the completing one
    assert len(session.calls) == 3


def test_earliest_stop_string_wins_and_false_starts_are_released():
    script = [script_of("hello world")]
    res = generate(FakeSession(script=script), TOK, "x", stop=["world", "o w"])
    assert (res.text, res.finish_reason) == ("hell", "stop")
    res = generate(FakeSession(script=script), TOK, "x", stop=["lox", "worlds", "d!"])
    assert (res.text, res.finish_reason) == ("hello world", "eos")


def test_held_back_text_is_released_at_length_end():
    res = generate(FakeSession(script=[script_of("hello")]), TOK, "x", stop="llama",
                   max_new_tokens=2)
    assert (res.text, res.finish_reason) == ("hello", "length")


def test_special_token_stop_string_matches_the_token():
    session = FakeSession(script=[script_of("ok") + [END] + script_of("no")])
    res = generate(session, TOK, "x", stop=["<|end|>"])
    assert (res.text, res.ids, res.finish_reason) == ("ok", script_of("ok"), "stop")
    # Without it as a stop string, the special token is skipped in the text.
    res = generate(FakeSession(script=session.script), TOK, "x")
    assert (res.text, res.finish_reason) == ("okno", "eos")


def test_multibyte_character_split_across_tokens():
    text = "caf\u00e9 ok"
    script = script_of(text)
    assert [0xC3, 0xA9] == script[3:5]  # é is two tokens
    pieces = list(stream(FakeSession(script=[script]), TOK, "x"))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    res = generate(FakeSession(script=[script]), TOK, "x", stop="\u00e9 ")
    assert (res.text, res.finish_reason) == ("caf", "stop")


def test_incomplete_character_at_the_end_is_flushed():
    res = generate(FakeSession(script=[[ord("a"), 0xC3]]), TOK, "x", max_new_tokens=2)
    assert res.text == "a\ufffd"


# -- streaming -------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    {},
    {"stop": "lo w"},
    {"stop": ["o", "wor"]},
    {"stop": "xyz"},
    {"max_new_tokens": 3, "stop": "llo"},
    {"temperature": 1.0, "seed": 3, "stop": "e"},
])
@pytest.mark.parametrize("text", ["hello world", "caf\u00e9 h\u00e9llo world", "hi"])
def test_stream_pieces_join_to_generate_text(kwargs, text):
    script = [script_of(text) + [EOS]]
    res = generate(FakeSession(script=script), TOK, "x", **kwargs)
    pieces = list(stream(FakeSession(script=script), TOK, "x", **kwargs))
    assert "".join(pieces) == res.text
    assert all(pieces)


def test_stream_holds_back_possible_stop_prefix_until_decided():
    session = FakeSession(script=[script_of("hello world")])
    it = stream(session, TOK, "x", stop="lo w")
    first = next(it)
    assert first == "he"
    # "llo" could begin "lo w": only "l" is released, and nothing after the stop string.
    assert list(it) == ["l"]
    assert len(session.calls) == 3


def test_stream_returns_the_result():
    def collect():
        return (yield from stream(FakeSession(script=[script_of("hi")]), TOK, "x"))
    gen = collect()
    pieces = []
    try:
        while True:
            pieces.append(next(gen))
    except StopIteration as done:
        res = done.value
    assert "".join(pieces) == res.text == "hi" and res.finish_reason == "eos"


def test_stream_validates_arguments_at_the_call():
    with pytest.raises(ValueError, match="one prompt"):
        stream(FakeSession(), TOK, ["a", "b"])
    with pytest.raises(ValueError, match="temperature"):
        stream(FakeSession(), TOK, "a", temperature=-1)


def test_stream_stopped_early_by_the_caller():
    session = FakeSession()
    it = stream(session, TOK, "a", max_new_tokens=100)
    next(it)
    it.close()
    assert len(session.calls) < 100


def test_fallback_decoder_without_stream_decoder():
    text = "caf\u00e9 h\u00e9llo world"
    script = [script_of(text) + [EOS]]
    tok = DecodeOnlyTokenizer()
    pieces = list(stream(FakeSession(script=script), tok, "x"))
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)
    res = generate(FakeSession(script=script), tok, "x", stop="o w")
    assert res.text == "caf\u00e9 h\u00e9ll"


# -- prompts and batches ---------------------------------------------------------------------

def test_add_special_tokens_prepends_bos_to_text():
    session = FakeSession(script=[script_of("a")])
    res = generate(session, TOK, "hi", add_special_tokens=True)
    assert session.fed[0][:3] == [BOS] + script_of("hi") and res.prompt_tokens == 3
    session = FakeSession(script=[script_of("a")])
    generate(session, TOK, "\x00", add_special_tokens=True)
    assert session.fed[0][:2] == [BOS, 0]
    # Token ids are used as given.
    session = FakeSession(script=[script_of("a")])
    generate(session, TOK, [5, 6], add_special_tokens=True)
    assert session.fed[0][:2] == [5, 6]


def test_add_special_tokens_defers_to_a_tokenizer_that_takes_it():
    session = FakeSession(script=[script_of("a")])
    res = generate(session, SpecialsTokenizer(), "hi", add_special_tokens=True)
    assert session.fed[0][:4] == [BOS, BOS] + script_of("hi") and res.prompt_tokens == 4


def test_put_style_stream_decoder():
    text = "caf\u00e9 world"
    script = [script_of(text) + [EOS]]
    pieces = list(stream(FakeSession(script=script), SpecialsTokenizer(), "x", stop="wor"))
    assert "".join(pieces) == "caf\u00e9 "


def test_empty_prompt_is_an_error():
    with pytest.raises(ValueError, match="no tokens"):
        generate(FakeSession(), TOK, "")
    assert generate(FakeSession(script=[[ord("a")]]), TOK, "",
                    add_special_tokens=True).text == "a"
    with pytest.raises(ValueError, match="prompt must be"):
        generate(FakeSession(), TOK, [])


def test_equal_length_batch_runs_together_and_matches_single_runs():
    prompts = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    session = FakeSession()
    greedy = generate(session, TOK, prompts, max_new_tokens=10)
    assert session.resets == [3]
    assert [r.ids for r in greedy] == [reference_greedy(p, 10) for p in prompts]

    kw = dict(max_new_tokens=10, temperature=0.8, top_k=20, seed=7)
    sampled = generate(FakeSession(), TOK, prompts, **kw)
    assert sampled[0].ids == generate(FakeSession(), TOK, prompts[0], **kw).ids
    assert len({tuple(r.ids) for r in sampled}) == 3


def test_different_lengths_run_in_groups_in_prompt_order():
    prompts = ["ab", "abc", "xy", [1, 2, 3, 4]]
    kw = dict(max_new_tokens=6, temperature=1.0, seed=2)
    session = FakeSession()
    results = generate(session, TOK, prompts, **kw)
    assert session.resets == [2, 1, 1]
    assert [r.prompt_tokens for r in results] == [2, 3, 2, 4]
    assert all(len(r.ids) == 6 and r.finish_reason == "length" for r in results)
    # A prompt's tokens depend on the seed and its place in the request, not on which
    # other prompts share its batch: "abc" runs alone here, batched with "zzz" below.
    session = FakeSession()
    other = generate(session, TOK, ["zzz", "abc"], **kw)
    assert session.resets == [2]
    assert other[1].ids == results[1].ids
    assert results[0].ids == generate(FakeSession(), TOK, "ab", **kw).ids


def test_batch_rows_finish_independently():
    script = [script_of("hi"), script_of("hello"), script_of("hey you")]
    session = FakeSession(script=script)
    res = generate(session, TOK, ["a", "b", "c"], stop="ll")
    assert [(r.text, r.finish_reason) for r in res] == \
        [("hi", "eos"), ("he", "stop"), ("hey you", "eos")]
    assert len(session.calls) == len(script_of("hey you")) + 1


def test_generate_ids_pads_finished_rows_and_checks_lengths():
    session = FakeSession(script=[[10, EOS], [11, 12, 13]])
    steps = list(generate_ids(session, [[1], [2]], max_new_tokens=5, sampler=Sampler(),
                              eos_ids=[EOS]))
    assert [s.tolist() for s in steps] == [[10, 11], [EOS, 12], [PAD_ID, 13], [PAD_ID, EOS]]
    assert all(s.dtype == np.int64 for s in steps)
    steps = list(generate_ids(FakeSession(script=[[10, 11, 12]]), [[1]], max_new_tokens=5,
                              sampler=Sampler(), eos_ids=[], stop_ids=[11]))
    assert [s.tolist() for s in steps] == [[10], [11]]
    with pytest.raises(ValueError, match="same length"):
        generate_ids(FakeSession(), [[1], [2, 3]], max_new_tokens=2, sampler=Sampler())
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_ids(FakeSession(), [[1]], max_new_tokens=-1, sampler=Sampler())


def test_bad_stop_strings():
    with pytest.raises(ValueError, match="stop"):
        generate(FakeSession(), TOK, "a", stop=[""])
    with pytest.raises(ValueError, match="stop"):
        generate(FakeSession(), TOK, "a", stop=[3])


def test_backend_returning_wrong_shape_is_reported():
    class Broken(FakeSession):
        def forward(self, ids, last_only=False):
            return np.zeros((ids.shape[0], VOCAB), dtype=np.float32)
    with pytest.raises(RuntimeError, match="shape"):
        generate(Broken(), TOK, "a")


def test_empty_prompt_inside_a_batch_is_named():
    with pytest.raises(ValueError, match="prompt 1 has no tokens"):
        generate(FakeSession(), TOK, [[1, 2], []])
