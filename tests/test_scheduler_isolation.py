"""One request must never hurt another (runtime/scheduler.py): a request whose prefill, sampling
or event listener fails ends alone with "error" while the rest of the batch gets, token for
token, what it gets alone; on the tiny llama fixture compiled for both backends."""
import numpy as np
import pytest

from kiln import runtime
from kiln.runtime.scheduler import Scheduler

from conftest import HF_FIXTURES

POISON = 77             # a prompt starting with this id fails to join (see Flaky)


@pytest.fixture(scope="module", params=["onnxrt", "tvm"])
def llama(request, tmp_path_factory):
    from kiln.driver import compile as kiln_compile
    out = tmp_path_factory.mktemp("isolation") / f"llama-{request.param}.kiln"
    return kiln_compile(HF_FIXTURES / "llama", output=out, backend=request.param)


class Flaky:
    """A session that fails where told: joining a prompt that starts with POISON (or a chunk
    of one that holds it), and the
    batched decode step number ``fail_step``; everything else is the real session's."""

    def __init__(self, session, fail_step=None):
        self.inner, self.fail_step, self.steps = session, fail_step, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def join_row(self, r, prompt):
        if prompt[0] == POISON:
            raise OverflowError("Python int too large to convert to C long")
        return self.inner.join_row(r, prompt)

    def extend_row(self, r, ids):
        if POISON in ids:
            raise OverflowError("Python int too large to convert to C long")
        return self.inner.extend_row(r, ids)

    def step(self, tokens, active):
        self.steps += 1
        if self.steps == self.fail_step:
            raise RuntimeError("the device went away")
        return self.inner.step(tokens, active)


class FailingSampler:
    """Draws as the request's own sampler does, and raises on draw number ``at``."""

    def __init__(self, sampler, at):
        self.sampler, self.at, self.calls = sampler, at, 0

    def __call__(self, *args):
        self.calls += 1
        if self.calls == self.at:
            raise FloatingPointError("NaN in the logits")
        return self.sampler(*args)


def _drain(sch):
    while not sch.idle():
        sch.step()


SETTINGS = [dict(temperature=0.0), dict(temperature=0.9, top_k=40, seed=5),
            dict(temperature=0.7, top_p=0.9, seed=11)]
PROMPTS = [[5, 9, 2, 14, 3], [30, 31, 32], list(range(40, 61))]


def _alone(path, prompt, max_tokens, **kw):
    model = runtime.load(path, threads=2)
    sch = Scheduler(model.session, None, max_batch=4, eos_ids=[])
    req = sch.submit(prompt, max_tokens=max_tokens, **kw)
    _drain(sch)
    return req.ids


def test_a_failing_request_ends_alone_and_the_batch_goes_on(llama):
    alone = [_alone(llama, p, 20, **SETTINGS[i]) for i, p in enumerate(PROMPTS)]
    model = runtime.load(llama, threads=2)
    sch = Scheduler(Flaky(model.session), None, max_batch=4, max_queue=16, eos_ids=[])
    good = [sch.submit(p, max_tokens=20, **SETTINGS[i]) for i, p in enumerate(PROMPTS)]
    sch.step()
    sch.step()
    poisoned = sch.submit([POISON, 1, 2], max_tokens=20)          # fails in its prefill
    sch.step()
    assert poisoned.finish_reason == "error" and "OverflowError" in poisoned.error
    assert sch.rows.count(None) == 1                             # its row is free again
    bad_draw = sch.submit([8, 8, 8], max_tokens=20)              # fails at its 4th token
    bad_draw.sampler = FailingSampler(bad_draw.sampler, at=4)
    sch.step()
    assert not bad_draw.done

    def deaf(ev):
        raise ConnectionResetError("the client went away")
    for _ in range(4):
        sch.step()
    assert bad_draw.finish_reason == "error" and "NaN in the logits" in bad_draw.error
    assert bad_draw.completion_tokens == 3
    listener = sch.submit([9, 9], max_tokens=20, on_event=deaf)  # its listener raises
    _drain(sch)
    assert listener.finish_reason == "error" and "ConnectionResetError" in listener.error
    assert [r.ids for r in good] == alone
    assert all(r.finish_reason == "length" and r.error is None for r in good)
    assert sch.active == 0
    # and it goes on serving
    after = sch.submit(PROMPTS[1], max_tokens=20, **SETTINGS[1])
    _drain(sch)
    assert after.ids == alone[1]


def test_a_failed_batch_step_ends_its_rows_and_later_requests_are_served(llama):
    alone = _alone(llama, PROMPTS[2], 12, **SETTINGS[2])
    model = runtime.load(llama, threads=2)
    sch = Scheduler(Flaky(model.session, fail_step=3), None, max_batch=2, eos_ids=[])
    first = [sch.submit(p, max_tokens=12) for p in PROMPTS[:2]]
    _drain(sch)
    assert [r.finish_reason for r in first] == ["error", "error"]
    assert all("the device went away" in r.error for r in first)
    assert sch.active == 0
    later = sch.submit(PROMPTS[2], max_tokens=12, **SETTINGS[2])
    _drain(sch)
    assert later.finish_reason == "length" and later.ids == alone


def test_background_loop_keeps_serving_past_a_poisoned_request(llama):
    alone = [_alone(llama, p, 30, **SETTINGS[i]) for i, p in enumerate(PROMPTS)]
    model = runtime.load(llama, threads=2)
    sch = Scheduler(Flaky(model.session), None, max_batch=4, eos_ids=[]).start()
    try:
        good = [sch.submit(p, max_tokens=30, **SETTINGS[i]) for i, p in enumerate(PROMPTS)]
        poisoned = sch.submit([POISON], max_tokens=30)
        assert [e.finish_reason for e in poisoned] == ["error"]
        assert [r.result().ids for r in good] == alone
        assert sch.submit([3, 4], max_tokens=2).result().finish_reason == "length"
    finally:
        sch.stop()


def test_prompt_ids_outside_the_vocabulary_are_refused(llama):
    model = runtime.load(llama, threads=1)
    sch = Scheduler(model.session, None, max_batch=1)
    vocab = model.config["vocab_size"]
    assert sch.vocab_size == vocab
    for bad in (-1, vocab, 10**6, 2**63):
        with pytest.raises(ValueError, match=f"token id {bad} is not in the vocabulary"):
            sch.submit([1, bad, 2], max_tokens=1)
    assert not sch.waiting
    sch.submit([0, vocab - 1], max_tokens=1)
    _drain(sch)
    assert np.all(np.asarray(sch.session.lengths) == 0)


def test_abort_ends_running_waiting_and_later_requests(llama):
    model = runtime.load(llama, threads=1)
    sch = Scheduler(model.session, None, max_batch=2, prefill_chunk=4, eos_ids=[])
    running = [sch.submit([3, 4, 5], max_tokens=50), sch.submit(list(range(1, 30)), max_tokens=50)]
    waiting = sch.submit([6, 7], max_tokens=50)
    sch.step()
    sch.step()
    assert running[0].completion_tokens and running[1].prefilling
    sch.abort()
    later = sch.submit([8], max_tokens=5)
    _drain(sch)
    assert [r.finish_reason for r in (*running, waiting, later)] == ["abort"] * 4
    assert sch.active == 0 and list(sch.session.lengths) == [0, 0]
