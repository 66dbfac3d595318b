"""kiln serve's logprobs, n > 1 and frequency/presence penalties, through the official openai
client against the real server (the fixtures of tests/test_server.py): logprobs equal the
log-softmax of Model.logits for the same prefix, the n choices of a seed equal the rows of
runtime.generate's batch, penalised answers equal runtime.generate with the same penalties."""
import numpy as np
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from test_server import KEY, _client, _post, artifact, ref, server  # noqa: E402,F401

from kiln.runtime.logprobs import TokenStrings, token_logprobs  # noqa: E402

# Measured: the server's logits (a 4-row decode step) and Model.logits (one full-sequence
# pass) differ by at most 4.5e-5 in a logprob on SmolLM2 (these tests' prompts, this machine).
TOL = 5e-4
MSGS = [{"role": "user", "content": "Name three animals that live in the sea."}]


def _log_softmax(logits):
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _reference(ref, prompt, ids):
    """log-softmax of Model.logits at every generated position: row j predicts ids[j]."""
    lsm = _log_softmax(ref.logits([prompt + ids[:-1]])[0])
    return lsm[len(prompt) - 1:]


def _check_entries(ref, prompt, ids, logprob_of, top_of, k):
    lsm = _reference(ref, prompt, ids)
    worst = 0.0
    for j, t in enumerate(ids):
        worst = max(worst, abs(logprob_of(j) - lsm[j, t]))
        top = top_of(j)
        assert len(top) == k
        got = [lp for _, lp in top]
        assert got == sorted(got, reverse=True)
        want_ids = np.argsort(-lsm[j], kind="stable")[:k]
        np.testing.assert_allclose(got, lsm[j, want_ids], atol=TOL)
        assert sum(np.exp(got)) <= 1 + 1e-9
    assert worst < TOL
    return worst


def test_chat_logprobs_are_the_models_log_softmax(server, ref):
    base, service = server
    c = _client(base)
    prompt = ref.tokenizer.encode(ref.chat_prompt(MSGS))
    strings = TokenStrings(ref.tokenizer)
    for settings in (dict(temperature=0), dict(temperature=1.3, top_p=0.8, seed=5)):
        want = ref.chat(MSGS, max_new_tokens=14, **settings)
        got = c.chat.completions.create(model=service.name, messages=MSGS, max_tokens=14, logprobs=True,
                                        top_logprobs=5, **settings)
        content = got.choices[0].logprobs.content
        assert got.choices[0].message.content == want.text
        assert len(content) == len(want.ids)
        # token and bytes are the token's own: joined they spell the answer
        assert [e.token for e in content] == [strings(t)[0] for t in want.ids]
        assert b"".join(bytes(e.bytes) for e in content).decode() == want.text
        # the reported distribution is the model's, before temperature and top-p
        _check_entries(ref, prompt, want.ids, lambda j: content[j].logprob,
                       lambda j: [(e.token, e.logprob) for e in content[j].top_logprobs], 5)
        if settings["temperature"] == 0:
            assert all(e.top_logprobs[0].token == e.token and e.top_logprobs[0].logprob == e.logprob
                       for e in content)
        # streamed chunks carry the same entries, in order
        chunks = list(c.chat.completions.create(model=service.name, messages=MSGS, max_tokens=14,
                                                logprobs=True, top_logprobs=5, stream=True, **settings))
        streamed = [e for ch in chunks if ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
        assert [e.model_dump() for e in streamed] == [e.model_dump() for e in content]
    # logprobs without top_logprobs: empty lists of alternatives; no logprobs: null
    got = c.chat.completions.create(model=service.name, messages=MSGS, max_tokens=3, temperature=0, logprobs=True)
    assert [e.top_logprobs for e in got.choices[0].logprobs.content] == [[], [], []]
    got = c.chat.completions.create(model=service.name, messages=MSGS, max_tokens=3, temperature=0)
    assert got.choices[0].logprobs is None


def test_completion_logprobs(server, ref):
    base, service = server
    c = _client(base)
    text = "The three primary colours are"
    prompt = ref.tokenizer.encode(text)
    want = ref.generate(text, max_new_tokens=10)
    got = c.completions.create(model=service.name, prompt=text, max_tokens=10, temperature=0, logprobs=3)
    lp = got.choices[0].logprobs
    assert got.choices[0].text == want.text == "".join(lp.tokens)
    assert lp.text_offset == [len("".join(lp.tokens[:j])) for j in range(len(lp.tokens))]
    assert all(len(d) <= 3 and max(d.values()) == lp.token_logprobs[j] for j, d in enumerate(lp.top_logprobs))
    _check_entries(ref, prompt, want.ids, lambda j: lp.token_logprobs[j],
                   lambda j: sorted(lp.top_logprobs[j].items(), key=lambda kv: -kv[1]), 3)
    chunks = list(c.completions.create(model=service.name, prompt=text, max_tokens=10, temperature=0,
                                       logprobs=3, stream=True))
    parts = [ch.choices[0].logprobs for ch in chunks if ch.choices[0].logprobs]
    for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [x for p in parts for x in getattr(p, field)] == getattr(lp, field)


def test_n_choices_are_the_rows_of_a_seeded_batch(server, ref):
    base, service = server
    c = _client(base)
    prompt = ref.tokenizer.encode(ref.chat_prompt(MSGS))
    settings = dict(temperature=1.0, top_p=0.95, seed=11)
    want = ref.generate([prompt] * 3, max_new_tokens=10, **settings)
    got = c.chat.completions.create(model=service.name, messages=MSGS, max_tokens=10, n=3, **settings)
    assert [ch.index for ch in got.choices] == [0, 1, 2]
    assert [ch.message.content for ch in got.choices] == [w.text for w in want]
    assert len({w.text for w in want}) == 3                      # the rows drew differently
    assert got.usage.prompt_tokens == len(prompt)
    assert got.usage.completion_tokens == sum(len(w.ids) + (w.finish_reason == "eos") for w in want)
    # choice 0 is the n=1 answer of the same seed
    one = c.chat.completions.create(model=service.name, messages=MSGS, max_tokens=10, **settings)
    assert one.choices[0].message.content == want[0].text
    # streamed: chunks of the three choices interleave; each index joins to its choice
    chunks = list(c.chat.completions.create(model=service.name, messages=MSGS, max_tokens=10, n=3,
                                            stream=True, **settings))
    joined = ["".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices[0].index == i)
              for i in range(3)]
    assert joined == [w.text for w in want]
    assert sum(ch.choices[0].finish_reason is not None for ch in chunks) == 3
    assert chunks[-1].usage.completion_tokens == got.usage.completion_tokens
    # legacy completions too; greedy choices are all the same
    greedy = c.completions.create(model=service.name, prompt="Water boils at", max_tokens=6, n=2, temperature=0)
    assert greedy.choices[0].text == greedy.choices[1].text == ref.generate("Water boils at", max_new_tokens=6).text


def test_penalties_equal_generate(server, ref):
    base, service = server
    c = _client(base)
    msgs = [{"role": "user", "content": "Write a poem about the sea."}]
    plain = ref.chat(msgs, max_new_tokens=24).text
    for settings in (dict(frequency_penalty=1.0), dict(presence_penalty=1.5),
                     dict(frequency_penalty=0.5, presence_penalty=-0.5, repetition_penalty=1.1),
                     # seed 3 is a measured near-tie: the served logits (a 4-row step) and
                     # generate's (batch 1) differ in the last bits, and at its 10th token the
                     # draw lands in the 5e-7 of probability mass between the two
                     dict(frequency_penalty=0.8, temperature=0.9, seed=4)):
        want = ref.chat(msgs, max_new_tokens=24, **settings).text
        if "temperature" not in settings:
            assert want != plain                # the penalty changes the greedy answer
        body = dict(settings)
        extra = {"repetition_penalty": body.pop("repetition_penalty")} if "repetition_penalty" in body else {}
        got = c.chat.completions.create(model=service.name, messages=msgs, max_tokens=24,
                                        temperature=body.pop("temperature", 0), extra_body=extra, **body)
        assert got.choices[0].message.content == want


def _error(resp, status, param):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["param"] == param and err["message"]


def test_bad_values(server):
    base, service = server
    h = {"Authorization": f"Bearer {KEY}"}
    chat, comp = base + "/v1/chat/completions", base + "/v1/completions"
    body = {"model": service.name, "messages": MSGS, "max_tokens": 2}
    _error(_post(chat, json={**body, "n": 5}, headers=h), 400, "n")            # max batch is 4
    _error(_post(chat, json={**body, "n": 0}, headers=h), 422, "n")
    _error(_post(chat, json={**body, "top_logprobs": 2}, headers=h), 400, "top_logprobs")
    _error(_post(chat, json={**body, "logprobs": True, "top_logprobs": 21}, headers=h), 422, "top_logprobs")
    _error(_post(chat, json={**body, "logprobs": 3}, headers=h), 422, "logprobs")
    _error(_post(comp, json={"model": service.name, "prompt": "x", "logprobs": 6}, headers=h), 422, "logprobs")
    for name in ("frequency_penalty", "presence_penalty"):
        _error(_post(chat, json={**body, name: 2.5}, headers=h), 422, name)
        _error(_post(chat, json={**body, name: -3}, headers=h), 422, name)


def test_token_logprobs_and_strings_units():
    logits = np.array([1.0, 3.0, 3.0, -np.inf, 0.5], dtype=np.float32)
    lp, top = token_logprobs(logits, 4, 3)
    ref = _log_softmax(logits)
    assert lp == pytest.approx(ref[4], abs=1e-12)
    assert [t for t, _ in top] == [1, 2, 0]                    # ties go to the lower id
    assert token_logprobs(logits, 3, 0) == (-9999.0, [])       # -inf has no JSON spelling

    class SentencePiece:                                        # byte fallback, no byte-level BPE
        pieces = {0: "\u2581caf", 1: "<0xC3>", 2: "<0xA9>", 3: "</s>"}

        def id_to_token(self, i):
            return self.pieces.get(i)
    s = TokenStrings(SentencePiece())
    assert b"".join(bytes(s(i)[1]) for i in range(3)) == " café".encode()
    assert s(1) == ("\ufffd", [0xC3]) and s(3) == ("</s>", list(b"</s>"))
    assert TokenStrings(None)(7) == ("token_id:7", None)


def test_byte_level_token_bytes_spell_the_text(ref):
    s = TokenStrings(ref.tokenizer)
    text = "Café, naïve 日本語 — ok\n\ttabs"
    ids = ref.tokenizer.encode(text)
    assert b"".join(bytes(s(t)[1]) for t in ids) == text.encode()
