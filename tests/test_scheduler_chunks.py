"""Chunked prefill (runtime/scheduler.py ``prefill_chunk``): a long prompt joins its row a chunk
at a time with a decode step of the running rows between chunks, and every request still gets
the tokens it gets unchunked; on the tiny llama fixture compiled for both backends."""
import numpy as np
import pytest

from kiln import runtime
from kiln.runtime.scheduler import Scheduler

from conftest import HF_FIXTURES


@pytest.fixture(scope="module", params=["onnxrt", "tvm"])
def llama(request, tmp_path_factory):
    from kiln.driver import compile as kiln_compile
    out = tmp_path_factory.mktemp("chunks") / f"llama-{request.param}.kiln"
    return kiln_compile(HF_FIXTURES / "llama", output=out, backend=request.param)


class Counting:
    """The real session, recording the prompt tokens fed between two decode steps and which
    rows each decode step advanced."""

    def __init__(self, session):
        self.inner, self.fed, self.decoded = session, [0], []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def join_row(self, r, prompt):
        self.fed[-1] += len(prompt)
        return self.inner.join_row(r, prompt)

    def extend_row(self, r, ids):
        self.fed[-1] += len(ids)
        return self.inner.extend_row(r, ids)

    def step(self, tokens, active):
        self.decoded.append(np.flatnonzero(active).tolist())
        self.fed.append(0)
        return self.inner.step(tokens, active)


def _drain(sch):
    while not sch.idle():
        sch.step()


def _run(path, prompts, max_tokens, chunk, settings):
    model = runtime.load(path, threads=2)
    sch = Scheduler(model.session, None, max_batch=3, max_queue=16, eos_ids=[], prefill_chunk=chunk)
    reqs = []
    for i, p in enumerate(prompts):
        reqs.append(sch.submit(p, max_tokens=max_tokens[i], **settings[i]))
        for _ in range(i % 3):          # arrivals at different steps
            sch.step()
    _drain(sch)
    return reqs


def test_chunked_prefill_gives_the_unchunked_tokens(llama):
    rng = np.random.default_rng(3)
    prompts = [rng.integers(1, 250, size=n).tolist() for n in (40, 23, 3, 60, 7, 15)]
    max_tokens = [30, 12, 25, 20, 9, 14]
    settings = [dict(temperature=0.0) if i % 2 == 0 else dict(temperature=0.8, top_k=50, seed=i)
                for i in range(len(prompts))]
    whole = _run(llama, prompts, max_tokens, None, settings)
    chunked = _run(llama, prompts, max_tokens, 7, settings)
    assert [r.ids for r in chunked] == [r.ids for r in whole]
    assert all(r.finish_reason == "length" for r in chunked)
    # greedy requests are also what generate gives
    ref = runtime.load(llama, threads=2)
    for i in (0, 2, 4):
        assert whole[i].ids == ref.generate(prompts[i], max_new_tokens=max_tokens[i], eos_ids=[]).ids


def test_a_long_prompt_delays_running_rows_by_one_chunk_per_step(llama):
    model = runtime.load(llama, threads=2)
    session = Counting(model.session)
    sch = Scheduler(session, None, max_batch=4, eos_ids=[], prefill_chunk=8)
    running = [sch.submit([i + 3, 7, 9], max_tokens=60) for i in range(3)]
    while any(r.prefilling or not r.completion_tokens for r in running):
        sch.step()                                 # 9 prompt tokens: two steps of 8
    counts = [r.completion_tokens for r in running]
    long = sch.submit(list(range(1, 101)), max_tokens=5)
    steps = 0
    while long.completion_tokens == 0:
        sch.step()
        steps += 1
        # every step fed at most one chunk, and every running row still got its token
        assert session.fed[-2] <= 8
        assert [r.completion_tokens for r in running] == [c + steps for c in counts]
        assert session.decoded[-1] == [0, 1, 2] or long.completion_tokens
    assert steps == 13                             # ceil(100 / 8) chunks, one per step
    assert sum(session.fed) == 3 * 3 + 100
    _drain(sch)
    assert [len(r.ids) for r in running] == [60] * 3 and len(long.ids) == 5


def test_a_prompt_cancelled_between_chunks_frees_its_row(llama):
    model = runtime.load(llama, threads=2)
    sch = Scheduler(model.session, None, max_batch=1, eos_ids=[], prefill_chunk=5)
    long = sch.submit(list(range(1, 41)), max_tokens=5)
    sch.step()
    sch.step()
    assert long.prefilling and long._fed == 10
    long.cancel()
    nxt = sch.submit([4, 5, 6], max_tokens=3)
    _drain(sch)
    assert long.finish_reason == "cancelled" and long.completion_tokens == 0
    alone = Scheduler(runtime.load(llama, threads=2).session, None, max_batch=1, eos_ids=[])
    want = alone.submit([4, 5, 6], max_tokens=3)
    _drain(alone)
    assert nxt.ids == want.ids


def test_extend_row_appends_to_one_row_and_leaves_the_others(llama):
    """Session level: a prompt fed to a row in pieces gives the logits of one run, while the
    other rows, stepping in between, keep their tokens."""
    model = runtime.load(llama, threads=2)
    s = model.session
    s.start_rows(2)
    prompt = list(range(10, 41))
    whole = s.join_row(1, prompt)
    s.free_row(1)
    s.join_row(0, [3, 4, 5])
    ref_other = s.step(np.array([6, 0]), np.array([True, False]))[0]
    s.free_row(0)
    s.join_row(0, [3, 4, 5])
    for a in range(0, len(prompt), 9):
        logits = s.extend_row(1, prompt[a:a + 9])
        if a == 9:
            other = s.step(np.array([6, 0]), np.array([True, False]))[0]
    assert s.lengths.tolist() == [4, len(prompt)]
    np.testing.assert_allclose(logits, whole, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(other, ref_other, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="would hold"):
        s.extend_row(1, [1] * (s.max_length - len(prompt) + 1))
