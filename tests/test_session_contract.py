"""The session contract (runtime/session.py): the same generation, beam search and scheduler
cases run through the protocol on both sessions (the tiny llama fixture compiled for ONNX
Runtime and for TVM) and on a third, NumPy "backend" that implements only RowCache's hooks."""
import numpy as np
import pytest

from kiln import runtime
from kiln.runtime import beam
from kiln.runtime.generation import generate, stream
from kiln.runtime.params import SamplingParams
from kiln.runtime.scheduler import Scheduler
from kiln.runtime.session import RowCache, RowSession

from conftest import HF_FIXTURES

VOCAB = 32


class ToySession(RowCache):
    """A backend in forty lines: its "KV cache" holds each row's tokens, and the next token's
    logits peak at a hash of the whole row, so a row that lost, mixed up or misplaced a token
    goes another way. Everything else (lengths, growth, joins, frees, reordering) is
    RowCache's."""

    join_chunk = 3                      # a joining prompt runs 3 tokens at a time

    def __init__(self):
        self.max_length, self.vocab_size = 64, VOCAB
        self.reset(1)

    @property
    def ragged_prefill(self) -> bool:
        return True

    def reset(self, batch: int = 1) -> None:
        self._reset_rows(batch)
        self.tokens, self.capacity = np.zeros((batch, 4), dtype=np.int64), 4

    def _resize(self, capacity: int, keep: int) -> None:
        tokens = np.zeros((self.batch, capacity), dtype=np.int64)
        tokens[:, :keep] = self.tokens[:, :keep]
        self.tokens, self.capacity = tokens, capacity

    def _logits(self, b: int, n: int) -> np.ndarray:
        row = self.tokens[b, :n]
        peak = int((row * np.arange(1, n + 1)).sum() * 7 % VOCAB)
        return -np.abs(np.arange(VOCAB) - peak).astype(np.float32) / 2

    def _run(self, ids, starts, ends):
        """Write ids[b] at starts[b] and return the logits after each of ends[b]'s tokens."""
        if int((starts + ids.shape[1]).max()) > self.capacity:
            self._grow(int((starts + ids.shape[1]).max()))
        for b in range(self.batch):
            self.tokens[b, starts[b]:starts[b] + ids.shape[1]] = ids[b]
        return np.stack([[self._logits(b, n) for n in ends[b]] for b in range(self.batch)])

    def forward(self, ids, last_only=False):
        ids = self._checked_ids(ids)
        s = ids.shape[1]
        if self.length + s > self.max_length:
            raise ValueError("too long")
        ends = [range(n + 1, n + s + 1)[-1:] if last_only else range(n + 1, n + s + 1) for n in self.lengths]
        logits = self._run(ids, self.lengths, ends)
        self._set_lengths(self.lengths + s)
        return logits

    def _prefill_padded(self, ids, lengths, positions):
        return self._run(ids, np.zeros(self.batch, dtype=np.int64), [[int(n)] for n in lengths])

    def _extend_one(self, r, ids, cached, every=False):
        self.tokens[r, cached:cached + len(ids)] = ids
        if every:
            return np.stack([self._logits(r, n) for n in range(cached + 1, cached + len(ids) + 1)])
        return self._logits(r, cached + len(ids))

    def _step_all(self, ids, before):
        return self._run(ids, before, [[int(n) + 1] for n in before])

    def _reorder_cache(self, index):
        self.tokens = self.tokens[index]

    def _read_kv(self, r, start, stop):
        return self.tokens[r, start:stop].reshape(1, 1, -1, 1).copy()

    def _write_kv(self, r, start, kv):
        self.tokens[r, start:start + kv.shape[2]] = kv.reshape(-1)


@pytest.fixture(scope="module", params=["onnxrt", "tvm", "toy"])
def session(request, tmp_path_factory):
    if request.param == "toy":
        return ToySession()
    from kiln.driver import compile as kiln_compile
    out = tmp_path_factory.mktemp("contract") / f"llama-{request.param}.kiln"
    return runtime.load(kiln_compile(HF_FIXTURES / "llama", output=out, backend=request.param),
                        threads=2).session


PROMPTS = [[5, 9, 2, 14, 3], [7], [11, 4, 4, 19, 2, 8, 1, 6, 13, 10, 3], [2, 2]]
SAMPLED = SamplingParams(max_tokens=9, temperature=0.9, top_k=8, seed=7)


def test_both_sessions_implement_the_whole_protocol(session):
    assert isinstance(session, RowSession) and isinstance(session, RowCache)
    assert session.ragged_prefill


def test_generate_a_ragged_batch_as_each_prompt_alone(session):
    greedy = SamplingParams(max_tokens=9)
    alone = [generate(session, None, p, params=greedy, eos_ids=[]) for p in PROMPTS]
    batch = generate(session, None, PROMPTS, params=greedy, eos_ids=[])
    assert [r.ids for r in batch] == [r.ids for r in alone]
    assert all(len(r.ids) == 9 and r.finish_reason == "length" for r in alone)
    # sampled, row b draws from the seed's stream b: row 0 as the prompt alone
    alone = [generate(session, None, p, params=SAMPLED, eos_ids=[]) for p in PROMPTS]
    batch = generate(session, None, PROMPTS, params=SAMPLED, eos_ids=[])
    assert batch[0].ids == alone[0].ids and [r.ids for r in batch] != [r.ids for r in alone]
    # keyword arguments build the same SamplingParams
    kw = generate(session, None, PROMPTS[0], max_new_tokens=9, temperature=0.9, top_k=8, seed=7, eos_ids=[])
    assert kw.ids == alone[0].ids
    # a stream of ids (no tokenizer: no text) returns the same result
    pieces = stream(session, None, PROMPTS[0], params=SAMPLED, eos_ids=[])
    with pytest.raises(StopIteration) as done:
        next(pieces)
    assert done.value.value.ids == alone[0].ids


def test_an_eos_id_ends_a_row_without_being_kept(session):
    greedy = generate(session, None, PROMPTS[2], max_new_tokens=6, eos_ids=[])
    eos = greedy.ids[3]
    cut = generate(session, None, PROMPTS[2], max_new_tokens=6, eos_ids=[eos])
    assert cut.finish_reason == "eos" and cut.ids == greedy.ids[:greedy.ids.index(eos)]


def test_the_scheduler_gives_each_request_its_tokens_alone(session):
    # request i draws from the seed's stream i, as row i of generate's batch does
    alone = [r.ids for r in generate(session, None, PROMPTS, params=SAMPLED, eos_ids=[])]
    # a prefill chunk of 4 tokens: the long prompt joins through extend_row between steps
    sch = Scheduler(session, None, max_batch=3, max_queue=8, eos_ids=[], prefill_chunk=4)
    reqs = []
    for i, p in enumerate(PROMPTS):
        reqs.append(sch.submit(p, params=SAMPLED, sample_stream=i))
        for _ in range(i % 2):
            sch.step()
    while not sch.idle():
        sch.step()
    assert [r.ids for r in reqs] == alone
    assert [r.finish_reason for r in reqs] == ["length"] * len(PROMPTS)
    assert sch.submit(PROMPTS[0], max_tokens=3, temperature=0.9, top_k=8, seed=7).params == \
        SamplingParams(max_tokens=3, temperature=0.9, top_k=8, seed=7)


def test_beam_search_scores_are_the_sessions_logprobs(session):
    greedy = generate(session, None, PROMPTS[0], max_new_tokens=5, eos_ids=[])
    [one] = beam.beam_search(session, PROMPTS[0], num_beams=1, max_new_tokens=5)
    assert one.tokens == greedy.ids
    found = beam.generate(session, None, PROMPTS[0], max_new_tokens=5, num_beams=3,
                          num_return_sequences=3, eos_ids=[])
    assert [r.score for r in found] == sorted((r.score for r in found), reverse=True)
    assert found[0].score >= one.score - 1e-5
    for r in found:
        session.reset(1)
        logits = session.forward(np.asarray([PROMPTS[0] + r.ids[:-1]]))[0, -5:].astype(np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        assert r.score == pytest.approx(logp[np.arange(5), r.ids].sum() / 5, rel=1e-4, abs=1e-5)
    with pytest.raises(ValueError, match="temperature=0.9 cannot be used with num_beams > 1"):
        beam.generate(session, None, PROMPTS[0], params=SAMPLED, num_beams=2, eos_ids=[])


def test_rows_join_free_and_reorder_through_the_base(session):
    session.start_rows(3)
    a = session.join_row(0, PROMPTS[2])
    session.join_row(1, PROMPTS[0])
    assert session.lengths.tolist() == [len(PROMPTS[2]), len(PROMPTS[0]), 0]
    session.free_row(1)
    assert session.lengths.tolist() == [len(PROMPTS[2]), 0, 0] and session.length == len(PROMPTS[2])
    session.reorder_rows([0, 0, 2])
    assert session.lengths.tolist() == [len(PROMPTS[2])] * 2 + [0]
    step = session.step(np.array([3, 3, 0]), np.array([True, True, False]))
    np.testing.assert_allclose(step[0], step[1], rtol=1e-5, atol=1e-5)
    assert session.lengths.tolist() == [len(PROMPTS[2]) + 1] * 2 + [0]
    session.reset(1)
    whole = session.forward(np.asarray([PROMPTS[2]]), last_only=True)[0, -1]
    np.testing.assert_allclose(a, whole, rtol=1e-4, atol=1e-4)


def test_step_span_gives_steps_rows_and_where_they_start(session):
    """step_span (the scheduler's step) returns the logits of the rows it ran (from the first
    active one on where the backend steps some rows only) with the first one's index, equal
    to step's for the active rows, and moves the lengths as step does."""
    got = {}
    for how in ("step", "step_span"):
        session.start_rows(4)
        session.join_row(1, PROMPTS[0])
        session.join_row(2, PROMPTS[2])
        active = np.array([False, True, True, False])
        if how == "step":
            got[how] = session.step(np.array([0, 3, 5, 0]), active)[1:3]
        else:
            lo, part = session.step_span(np.array([0, 3, 5, 0]), active)
            assert lo in (0, 1) and lo + part.shape[0] >= 3     # every row, or from row 1 on
            got[how] = part[1 - lo:3 - lo]
        assert session.lengths.tolist() == [0, len(PROMPTS[0]) + 1, len(PROMPTS[2]) + 1, 0]
    np.testing.assert_array_equal(got["step"], got["step_span"])


def test_a_rows_keys_copied_out_and_into_another_row_continue_alike(session):
    """read_kv / load_kv (the prefix cache's operations): row 1 loaded with row 0's first
    positions, in pieces, then extended with the rest, gives row 0's logits, and the other
    rows keep theirs."""
    prompt = PROMPTS[2]
    session.start_rows(3)
    whole = session.join_row(0, prompt)
    session.join_row(2, PROMPTS[0])
    pieces = [session.read_kv(0, 0, 4), session.read_kv(0, 4, 7)]
    assert pieces[0].shape[2] == 4 and pieces[1].shape[2] == 3
    session.load_kv(1, pieces)
    assert session.lengths.tolist() == [len(prompt), 7, len(PROMPTS[0])]
    np.testing.assert_allclose(session.extend_row(1, prompt[7:]), whole, rtol=1e-4, atol=1e-4)
    step = session.step(np.array([3, 3, 5]), np.array([True, True, True]))
    np.testing.assert_allclose(step[0], step[1], rtol=1e-4, atol=1e-4)
    session.reset(1)
    alone = session.forward(np.asarray([PROMPTS[0] + [5]]), last_only=True)[0, -1]
    np.testing.assert_allclose(step[2], alone, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="cannot read"):
        session.start_rows(2)
        session.read_kv(0, 0, 1)
