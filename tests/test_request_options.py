"""Request options added the way runtime/params.py says a new one is added (a SamplingParams
field, the rule that applies it, one line of the server's SAMPLING_FIELDS): vLLM's
``ignore_eos`` and ``min_tokens``, through generate, the scheduler, beam search and the server."""
from types import SimpleNamespace

import pytest

from kiln.runtime import beam
from kiln.runtime.generation import generate
from kiln.runtime.http_limits import APIError
from kiln.runtime.params import InvalidParam, SamplingParams
from kiln.runtime.scheduler import Scheduler
from kiln.runtime.server import Service

from test_session_contract import ToySession

PROMPT = [5, 9, 2, 14, 3]


def _scheduled(session, **settings):
    sch = Scheduler(session, None, max_batch=2, eos_ids=settings.pop("eos_ids"))
    req = sch.submit(PROMPT, **settings)
    while not sch.idle():
        sch.step()
    return req


@pytest.fixture(scope="module")
def free_run():
    """The toy model's greedy tokens with nothing ending them, and an EOS id among them."""
    ids = generate(ToySession(), None, PROMPT, max_new_tokens=10, eos_ids=[]).ids
    return ids, ids[1]


def test_an_eos_id_ends_the_run(free_run):
    ids, eos = free_run
    assert eos not in ids[:1]
    r = generate(ToySession(), None, PROMPT, max_new_tokens=10, eos_ids=[eos])
    assert (r.ids, r.finish_reason) == (ids[:1], "eos")


def test_ignore_eos_keeps_generating_through_eos(free_run):
    ids, eos = free_run
    r = generate(ToySession(), None, PROMPT, max_new_tokens=10, eos_ids=[eos], ignore_eos=True)
    assert (r.ids, r.finish_reason) == (ids, "length")
    req = _scheduled(ToySession(), max_tokens=10, eos_ids=[eos], ignore_eos=True)
    assert (req.ids, req.finish_reason) == (ids, "length")
    h = beam.generate(ToySession(), None, PROMPT, max_new_tokens=10, num_beams=1, eos_ids=[eos],
                      ignore_eos=True)
    assert (h.ids, h.finish_reason) == (ids, "length")
    hs = beam.generate(ToySession(), None, PROMPT, max_new_tokens=10, num_beams=2, num_return_sequences=2,
                       eos_ids=[eos], ignore_eos=True)
    assert [(len(h.ids), h.finish_reason) for h in hs] == [(10, "length")] * 2


def test_min_tokens_holds_eos_back(free_run):
    ids, eos = free_run
    r = generate(ToySession(), None, PROMPT, max_new_tokens=10, eos_ids=[eos], min_tokens=4)
    assert len(r.ids) >= 4 and eos not in r.ids[:4] and r.ids[0] == ids[0]
    req = _scheduled(ToySession(), max_tokens=10, eos_ids=[eos], min_tokens=4)
    assert (req.ids, req.finish_reason) == (r.ids, r.finish_reason)
    # sampled, too: no draw of the first four is EOS, whatever the seed
    for seed in range(5):
        s = generate(ToySession(), None, PROMPT, max_new_tokens=6, eos_ids=[eos], min_tokens=4,
                     temperature=5.0, seed=seed)
        assert len(s.ids) >= 4 and eos not in s.ids[:4]


def test_the_options_are_checked_once_in_sampling_params():
    with pytest.raises(InvalidParam, match="min_tokens") as e:
        SamplingParams(max_tokens=3, min_tokens=4)
    assert e.value.param == "min_tokens"
    with pytest.raises(InvalidParam, match="min_tokens must be an integer"):
        SamplingParams(min_tokens=-1)
    with pytest.raises(InvalidParam, match="ignore_eos must be true or false"):
        SamplingParams(ignore_eos="yes")
    with pytest.raises(ValueError, match="min_tokens=2 cannot be used with num_beams > 1"):
        beam.generate(ToySession(), None, PROMPT, num_beams=2, min_tokens=2)


def test_the_server_takes_them_from_the_request_body():
    model = SimpleNamespace(tokenizer=None, config={"vocab_size": 32})
    service = Service(model, SimpleNamespace(max_batch=1, max_queue=1, max_length=64), "m")
    params = service.settings({"prompt": [1], "max_tokens": 5, "min_tokens": 2, "ignore_eos": True})
    assert (params.max_tokens, params.min_tokens, params.ignore_eos) == (5, 2, True)
    assert service.settings({"prompt": [1]}).ignore_eos is False
    for body, param in (({"ignore_eos": "yes"}, "ignore_eos"), ({"min_tokens": -1}, "min_tokens"),
                        ({"min_tokens": 1.5}, "min_tokens"), ({"min_tokens": 20, "max_tokens": 4}, "min_tokens")):
        with pytest.raises(APIError) as e:
            service.settings({"prompt": [1], **body})
        assert (e.value.status, e.value.param) == (422, param), body


def test_model_methods_take_params_or_keywords():
    """Model.generate/stream/chat: ``params=`` alone, keywords alone, or params with keywords
    overriding it; chat's default of 256 new tokens applies only when neither says."""
    from kiln.runtime.model import Model
    model = object.__new__(Model)           # a Model over the toy session, without an artifact
    model.session, model.tokenizer, model.eos_ids = ToySession(), None, []
    params = SamplingParams(max_tokens=7, temperature=0.9, seed=3)
    a = model.generate(PROMPT, params=params)
    assert len(a.ids) == 7 and model.generate(PROMPT, 7, temperature=0.9, seed=3).ids == a.ids
    assert model.generate(PROMPT, 3, params=params).ids == a.ids[:3]
    assert model.chat(PROMPT, params=params).ids == a.ids
    assert len(model.chat(PROMPT).ids) == 64 - len(PROMPT)          # 256, cut by the toy's 64
    pieces = model.stream(PROMPT, params=params)
    with pytest.raises(StopIteration) as done:
        next(pieces)
    assert done.value.value.ids == a.ids


def test_logit_bias_moves_the_choice_everywhere(free_run):
    """OpenAI's logit_bias, in generate and the scheduler: -100 bans the greedy choice, +100
    forces a token the model would not pick; beam search refuses it as it refuses penalties."""
    ids, _ = free_run
    banned = generate(ToySession(), None, PROMPT, max_new_tokens=4, eos_ids=[], logit_bias={ids[0]: -100})
    assert banned.ids[0] != ids[0]
    forced = generate(ToySession(), None, PROMPT, max_new_tokens=4, eos_ids=[], logit_bias={"7": 100})
    assert forced.ids == [7, 7, 7, 7] != ids[:4]
    assert _scheduled(ToySession(), max_tokens=4, eos_ids=[], logit_bias={7: 100}).ids == forced.ids
    sampled = generate(ToySession(), None, PROMPT, max_new_tokens=4, eos_ids=[], logit_bias={7: 100},
                       temperature=1.0, seed=1)
    assert sampled.ids == forced.ids
    with pytest.raises(ValueError, match="logit_bias=.* cannot be used with num_beams > 1"):
        beam.generate(ToySession(), None, PROMPT, max_new_tokens=4, num_beams=2, eos_ids=[], logit_bias={7: 100})


def test_logit_bias_is_checked_once_and_at_the_edge():
    assert SamplingParams(logit_bias={"3": 1.5, 1: -2}).logit_bias == ((1, -2.0), (3, 1.5))
    for bad in ({"x": 1}, {-1: 1}, {1: 101}, {1: "a"}, {True: 1}, [1, 2], {str(i): 1 for i in range(1025)}):
        with pytest.raises(InvalidParam) as e:
            SamplingParams(logit_bias=bad)
        assert e.value.param == "logit_bias"
    model = SimpleNamespace(tokenizer=None, config={"vocab_size": 32})
    service = Service(model, SimpleNamespace(max_batch=1, max_queue=1, max_length=64), "m")
    assert service.settings({"prompt": [1], "logit_bias": {"31": -100}}).logit_bias == ((31, -100.0),)
    for bias in ({"32": 1}, {"1": 500}, "no"):
        with pytest.raises(APIError) as e:
            service.settings({"prompt": [1], "logit_bias": bias})
        assert (e.value.status, e.value.param) == (422, "logit_bias"), bias
