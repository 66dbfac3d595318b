"""No cost for empty rows, and no change either: a scheduler step on TVM's CPU session runs only
the span of rows in use (runtime/session.py ``_active_span``), so its kernels must give a row
the same bits whatever the number of rows beside it (targets/tvm/quant_kernels.py and
float_kernels.py: one accumulator layout at every row count up to 8). Checked bit for bit: a row
alone against the same row in batches of every size up to 8, exact and fast, quantized and
float weights; and through the scheduler, a request's tokens alone and beside others."""
import numpy as np
import pytest

from kiln import runtime
from kiln.runtime.scheduler import Scheduler

from conftest import HF_FIXTURES

MAX_BATCH = 8


@pytest.fixture(scope="module", params=[("q4_0", "exact"), ("q4_0", "fast"), (None, "exact")],
                ids=["q4_0-exact", "q4_0-fast", "float"])
def artifact(request, tmp_path_factory):
    from kiln.driver import compile as kiln_compile
    quant, precision = request.param
    out = tmp_path_factory.mktemp("inv") / f"llama-{quant}-{precision}.kiln"
    return kiln_compile(HF_FIXTURES / "llama", output=out, backend="tvm", quant=quant, precision=precision)


def _prompts(n):
    rng = np.random.default_rng(5)
    return [rng.integers(3, 200, 4 + 3 * i).tolist() for i in range(n)]


def _steps(session, rows, prompts, steps=4):
    """Row logits of ``steps`` decode steps with ``rows`` in use (each with its prompt)."""
    session.start_rows(MAX_BATCH)
    for r, p in zip(rows, prompts):
        session.join_row(r, p)
    active = np.zeros(MAX_BATCH, dtype=bool)
    active[rows] = True
    tokens = np.full(MAX_BATCH, 7)
    return [session.step(tokens, active)[rows].copy() for _ in range(steps)]


def test_a_row_gets_the_same_bits_alone_and_in_every_batch_size(artifact):
    session = runtime.load(artifact, threads=2).session
    assert session.steps_rows
    prompts = _prompts(MAX_BATCH)
    alone = _steps(session, [0], prompts[:1])
    for size in range(2, MAX_BATCH + 1):
        together = _steps(session, list(range(size)), prompts[:size])
        for a, t in zip(alone, together):
            assert np.array_equal(a[0], t[0]), f"row 0 differs beside {size - 1} others"
    # a span that does not start at row 0
    shifted = _steps(session, [5], prompts[:1])
    assert all(np.array_equal(a, s) for a, s in zip(alone, shifted))


def test_a_request_gets_the_same_tokens_alone_and_beside_others(artifact):
    model = runtime.load(artifact, threads=2)
    prompts = _prompts(5)

    def run(batch):
        sch = Scheduler(model.session, None, max_batch=MAX_BATCH, eos_ids=[])
        reqs = [sch.submit(p, max_tokens=12, temperature=0.8, seed=i, logprobs=2) for i, p in enumerate(batch)]
        while not sch.idle():
            sch.step()
        return [(r.ids, r.token_logprobs) for r in reqs]

    alone = run(prompts[:1])[0]
    beside = run(prompts)[0]
    assert alone == beside
