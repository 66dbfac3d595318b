"""Continuous batching (runtime/scheduler.py): requests join a running batch and leave it, and
each gets the tokens it gets alone, on the tiny llama fixture and on SmolLM2."""
import numpy as np
import pytest

from kiln import runtime
from kiln.runtime.scheduler import QueueFull, Scheduler


@pytest.fixture(scope="module")
def llama(compiled_family):
    return compiled_family("llama")


@pytest.fixture(scope="module")
def llama_ort(compiled_family):
    # for the tests of ONNX Runtime's own cache buffers
    return compiled_family("llama", "onnxrt")


@pytest.fixture(scope="module")
def smollm2(smollm2_artifact):
    return smollm2_artifact


def _drain(sch):
    while not sch.idle():
        sch.step()


def _alone(model, prompt, **kw):
    sch = Scheduler(model.session, model.tokenizer, max_batch=4, eos_ids=kw.pop("eos_ids", None))
    req = sch.submit(prompt, **kw)
    _drain(sch)
    return req


def _settings(i):
    if i % 2:
        return dict(temperature=0.9, top_k=40, top_p=0.95, seed=100 + i)
    return dict(temperature=0.0)


def _staggered(model, prompts, max_tokens, max_batch=4, eos_ids=None, **extra):
    sch = Scheduler(model.session, model.tokenizer, max_batch=max_batch, max_queue=16, eos_ids=eos_ids)
    reqs = []
    for i, p in enumerate(prompts):
        reqs.append(sch.submit(p, max_tokens=max_tokens[i], **_settings(i), **extra))
        for _ in range(i % 3):          # arrivals at different steps
            sch.step()
    _drain(sch)
    return reqs, sch


def test_rows_join_and_leave_with_their_alone_tokens(llama):
    model = runtime.load(llama, threads=2)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 200, size=n).tolist() for n in (3, 17, 1, 40, 8, 25, 5, 12)]
    max_tokens = [12, 5, 20, 9, 15, 3, 18, 7]
    alone = [_alone(model, p, max_tokens=max_tokens[i], eos_ids=[], **_settings(i)).ids
             for i, p in enumerate(prompts)]
    reqs, sch = _staggered(model, prompts, max_tokens, eos_ids=[])
    assert [r.ids for r in reqs] == alone
    assert all(r.finish_reason == "length" for r in reqs)
    assert sch.active == 0
    # greedy requests equal the plain generate loop
    ref = runtime.load(llama, threads=2)
    for i in range(0, 8, 2):
        assert alone[i] == ref.generate(prompts[i], max_new_tokens=max_tokens[i], eos_ids=[]).ids


def test_capacity_grows_while_other_rows_run(llama_ort, monkeypatch):
    from kiln.runtime import onnxrt_session
    llama = llama_ort
    monkeypatch.setattr(onnxrt_session, "INITIAL_CAPACITY", 16)
    model = runtime.load(llama, threads=2)
    start = model.session.capacity
    rng = np.random.default_rng(1)
    prompts = [rng.integers(1, 200, size=n).tolist() for n in (5, start + 10, 9)]
    assert start + 16 < model.session.max_length
    alone = [_alone(model, p, max_tokens=6, eos_ids=[]).ids for p in prompts]
    model = runtime.load(llama, threads=2)
    sch = Scheduler(model.session, None, max_batch=2, eos_ids=[])
    reqs = [sch.submit(prompts[0], max_tokens=6)]
    sch.step()
    reqs += [sch.submit(p, max_tokens=6) for p in prompts[1:]]
    _drain(sch)
    assert model.session.capacity > start
    assert [r.ids for r in reqs] == alone


def test_cancel_frees_the_row_and_the_queue_is_bounded(llama):
    model = runtime.load(llama, threads=2)
    sch = Scheduler(model.session, None, max_batch=1, max_queue=2, eos_ids=[])
    a = sch.submit([1, 2, 3], max_tokens=50)
    sch.step()
    b = sch.submit([4, 5], max_tokens=3)
    c = sch.submit([6], max_tokens=2)
    with pytest.raises(QueueFull):
        sch.submit([7], max_tokens=2)
    sch.step()
    assert sch.rows[0] is a and not b.done
    a.cancel()
    sch.step()                                  # a leaves, b takes its row
    assert a.finish_reason == "cancelled" and sch.rows[0] is b
    assert 2 <= a.completion_tokens < 50
    _drain(sch)
    assert (b.finish_reason, c.finish_reason) == ("length", "length")
    assert len(b.ids) == 3 and len(c.ids) == 2
    with pytest.raises(ValueError):
        sch.submit([1], max_tokens=-1)
    with pytest.raises(ValueError):
        sch.submit([1] * (model.session.max_length + 1), max_tokens=1)


def test_background_loop_streams_events(llama):
    model = runtime.load(llama, threads=2)
    sch = Scheduler(model.session, None, max_batch=2, eos_ids=[]).start()
    try:
        reqs = [sch.submit([i + 1, 2, 3], max_tokens=5 + i) for i in range(4)]
        for i, r in enumerate(reqs):
            events = list(r)
            assert [e.token for e in events[:-1]] == r.ids and len(r.ids) == 5 + i
            assert events[-1].finish_reason == "length"
    finally:
        sch.stop()


def test_smollm2_staggered_requests_equal_alone(smollm2):
    model = runtime.load(smollm2, threads=2)
    tok = model.tokenizer
    texts = ["Hi", "The capital of France is", "Write a haiku about the sea and the wind at night.",
             "1, 2, 3,", "Once upon a time there was a little fox who", "Python is",
             "List three colours:", "What is the tallest mountain on Earth? Answer briefly."]
    prompts = [model.tokenizer.encode(model.chat_prompt(t)) for t in texts]
    max_tokens = [6, 14, 9, 20, 4, 11, 16, 8]
    alone = [_alone(model, p, max_tokens=max_tokens[i], stop=["\n\n"], **_settings(i))
             for i, p in enumerate(prompts)]
    reqs, _ = _staggered(model, prompts, max_tokens, stop=["\n\n"])
    assert [r.ids for r in reqs] == [a.ids for a in alone]
    assert ["".join(r.text) for r in reqs] == ["".join(a.text) for a in alone]
    assert [r.finish_reason for r in reqs] == [a.finish_reason for a in alone]
    ref = runtime.load(smollm2, threads=2)
    for i in (0, 2, 4):
        g = ref.generate(prompts[i], max_new_tokens=max_tokens[i], stop=["\n\n"])
        assert g.ids == reqs[i].ids and g.text == "".join(reqs[i].text)
        assert {"eos": "eos", "stop": "stop", "length": "length"}[g.finish_reason] == reqs[i].finish_reason
    assert tok is not None


def test_cache_arrays_share_memory_with_the_ortvalues(llama_ort):
    session = runtime.load(llama_ort, threads=1).session
    session.start_rows(2)
    name = session.cache_names[0]
    session._arrays[name][1, 0, 3, 0] = 42.0
    assert session.buffers[name].numpy()[1, 0, 3, 0] == 42.0


def test_sample_streams_are_the_rows_of_generate_and_logprobs_are_the_models(llama):
    """Choice i of an n>1 request (sample_stream=i) is row i of generate's seeded batch; with
    logprobs every completion token carries the log-softmax of the model's raw logits."""
    model = runtime.load(llama, threads=2)
    prompt = [5, 9, 2, 14, 3]
    want = model.generate([prompt] * 3, max_new_tokens=8, temperature=1.0, seed=21, eos_ids=[])
    sch = Scheduler(model.session, None, max_batch=4, eos_ids=[])
    reqs = [sch.submit(prompt, max_tokens=8, temperature=1.0, seed=21, sample_stream=i, logprobs=2)
            for i in range(3)]
    _drain(sch)
    assert [r.ids for r in reqs] == [w.ids for w in want]
    assert len({tuple(r.ids) for r in reqs}) == 3
    ref = runtime.load(llama, threads=2)
    for r in reqs:
        x = ref.logits([prompt + r.ids[:-1]])[0, len(prompt) - 1:].astype(np.float64)
        lsm = x - x.max(-1, keepdims=True)
        lsm -= np.log(np.exp(lsm).sum(-1, keepdims=True))
        assert [t for t, _, _ in r.token_logprobs] == r.ids
        for j, (t, lp, top) in enumerate(r.token_logprobs):
            assert lp == pytest.approx(lsm[j, t], abs=1e-4)
            assert [u for u, _ in top] == np.argsort(-lsm[j], kind="stable")[:2].tolist()
    with pytest.raises(ValueError, match="logprobs"):
        sch.submit(prompt, logprobs=21)
