"""The prefix cache (runtime/prefix_cache.py): requests that begin alike reuse the keys of their
common beginning, and get the tokens a scheduler without the cache gives them; the store stays
within its budget. On the tiny llama fixture compiled for both backends, and on a NumPy fake
for the store's own bookkeeping."""
import numpy as np
import pytest

from kiln import runtime
from kiln.runtime.prefix_cache import PrefixCache
from kiln.runtime.scheduler import Scheduler

from conftest import HF_FIXTURES

BLOCK = 16


@pytest.fixture(scope="module", params=["onnxrt", "tvm"])
def llama(request, tmp_path_factory):
    from kiln.driver import compile as kiln_compile
    out = tmp_path_factory.mktemp("prefix") / f"llama-{request.param}.kiln"
    return kiln_compile(HF_FIXTURES / "llama", output=out, backend=request.param)


def _drain(sch):
    while not sch.idle():
        sch.step()


def _serve(path, prompts, settings, cache=None, chunk=24, max_batch=2):
    """Each prompt's request, submitted once the one before it has its first token (so the
    one before has its prompt in the cache), all on one scheduler."""
    sch = Scheduler(runtime.load(path, threads=2).session, None, max_batch=max_batch, eos_ids=[],
                    prefill_chunk=chunk, prefix_cache=cache)
    reqs = []
    for p, s in zip(prompts, settings):
        reqs.append(sch.submit(p, **s))
        while not reqs[-1].completion_tokens and not reqs[-1].done:
            sch.step()
    _drain(sch)
    return reqs


def _prompts(seed=5):
    rng = np.random.default_rng(seed)
    system = rng.integers(1, 250, size=70).tolist()
    tails = [rng.integers(1, 250, size=n).tolist() for n in (9, 30, 1, 50)]
    return system, [system + t for t in tails]


SETTINGS = [dict(max_tokens=12, temperature=0.0), dict(max_tokens=10, temperature=0.8, top_k=40, seed=3),
            dict(max_tokens=8, temperature=0.0), dict(max_tokens=15, temperature=0.7, seed=11)]


def test_requests_sharing_a_prefix_get_a_fresh_schedulers_tokens(llama):
    system, prompts = _prompts()
    # the same system prompt, then a conversation's next turn (prompt, answer, a new question)
    fresh = _serve(llama, prompts, SETTINGS)
    turn = prompts[0] + fresh[0].ids + [17, 18, 19, 20, 21]
    prompts.append(turn)
    settings = SETTINGS + [dict(max_tokens=6, temperature=0.0)]
    fresh.append(_serve(llama, [turn], settings[-1:])[0])
    cache = PrefixCache(64 << 20, block_tokens=BLOCK)
    cached = _serve(llama, prompts, settings, cache)
    assert [r.ids for r in cached] == [r.ids for r in fresh]
    assert all(r.finish_reason == "length" for r in cached)
    # every request after the first reused the system prompt's whole blocks (64 of its 70
    # tokens); the turn reused its earlier prompt and answer too
    assert cache.misses == 1 and cache.hits == 4
    assert cache.tokens_reused == 3 * 64 + (len(turn) - 1) // BLOCK * BLOCK
    assert cache.bytes <= cache.budget_bytes


def test_a_partial_overlap_reuses_its_whole_blocks_and_the_last_token_is_prefilled(llama):
    model = runtime.load(llama, threads=2)
    s = model.session
    s.start_rows(2)
    cache = PrefixCache(64 << 20, block_tokens=BLOCK)
    a = list(range(1, 49))                          # three whole blocks
    s.join_row(0, a)
    cache.keep(s, 0, a)
    assert len(cache) == 3
    b = a[:40] + [200, 201, 202]                    # shares two blocks and a half
    assert cache.reuse(s, 1, b) == 32 and s.lengths[1] == 32
    got = s.extend_row(1, b[32:])
    s.start_rows(2)
    np.testing.assert_allclose(got, s.join_row(0, b), rtol=1e-4, atol=1e-4)
    # the same prompt again: its last block is left to prefill, so its logits exist
    assert cache.reuse(s, 1, a) == 32
    assert cache.reuse(s, 1, a[:16]) == 0 and cache.reuse(s, 1, a[:17]) == 16
    assert (cache.hits, cache.misses, cache.tokens_reused) == (3, 1, 80)


def test_eviction_keeps_the_store_within_its_budget(llama):
    model = runtime.load(llama, threads=2)
    s = model.session
    s.start_rows(1)
    s.join_row(0, [1] * BLOCK)
    block_bytes = s.read_kv(0, 0, BLOCK).nbytes
    rng = np.random.default_rng(2)
    prompts = [rng.integers(1, 250, size=n).tolist() for n in (40, 70, 35, 90, 20, 60)]
    settings = [dict(max_tokens=6, temperature=0.0)] * len(prompts)
    cache = PrefixCache(5 * block_bytes, block_tokens=BLOCK)
    sch = Scheduler(s, None, max_batch=2, eos_ids=[], prefix_cache=cache)
    reqs = [sch.submit(p, **st) for p, st in zip(prompts, settings)]
    seen = 0
    while not sch.idle():
        sch.step()
        assert cache.bytes <= cache.budget_bytes and len(cache) <= 5
        seen = max(seen, len(cache))
    assert seen >= 4 and cache.evictions > 0
    fresh = _serve(llama, prompts, settings)
    assert [r.ids for r in reqs] == [r.ids for r in fresh]
    # the most recent prompt is what is left, and a repeat of it reuses it
    again = sch.submit(prompts[-1], max_tokens=6, temperature=0.0)
    _drain(sch)
    assert cache.hits >= 1 and again.ids == fresh[-1].ids


class FakeRows:
    """read_kv / load_kv over one float per position: enough for the store's bookkeeping."""

    def __init__(self):
        self.rows = {}

    def read_kv(self, r, start, stop):
        return np.asarray(self.rows[r][start:stop], dtype=np.float32).reshape(1, 1, -1, 1)

    def load_kv(self, r, pieces):
        self.rows[r] = np.concatenate([p.reshape(-1) for p in pieces]).tolist()


def test_the_store_evicts_least_recent_tails_first_and_never_leaves_orphans():
    rows = FakeRows()
    cache = PrefixCache(4 * 4 * 4, block_tokens=4)       # four blocks of four float32
    a, b = list(range(12)), list(range(100, 108))
    rows.rows[0] = [float(t) for t in a]
    cache.keep(rows, 0, a)
    rows.rows[0] = [float(t) for t in b]
    cache.keep(rows, 0, b)                               # five blocks: a's tail goes
    assert len(cache) == 4 and cache.bytes == 64 and cache.evictions == 1
    assert cache.reuse(rows, 1, a + [1]) == 8 and rows.rows[1] == [float(t) for t in a[:8]]
    # a longer prompt extending b: the least recent go (a's blocks), then its own chain's tail
    c = b + list(range(200, 212))
    rows.rows[0] = [float(t) for t in c]
    cache.keep(rows, 0, c)
    assert cache.bytes <= 64 and cache.reuse(rows, 1, c + [1]) == 16
    assert cache.reuse(rows, 1, a + [1]) == 0                   # evicted: b's chain was newer
    # a block's descendants go with it: nothing is left that no prompt can reach
    cache._drop(cache._chain(c, 1)[0])
    assert len(cache) == 0 and cache.bytes == 0
    off = PrefixCache(0)
    off.keep(rows, 0, c)
    assert len(off) == 0 and off.reuse(rows, 1, c) == 0


def test_tvm_device_copies_match_the_cpu_ones(tmp_path):
    """A TVM session on a device copies a row's positions through one view per head (its
    cache is not host memory); run here on the CPU's cache, both ways agree."""
    from kiln.driver import compile as kiln_compile
    s = runtime.load(kiln_compile(HF_FIXTURES / "llama", output=tmp_path / "l.kiln", backend="tvm"),
                     threads=2).session
    s.start_rows(3)
    s.join_row(1, list(range(3, 40)))
    s.join_row(2, list(range(50, 60)))
    on_cpu, other = s.read_kv(1, 5, 30), s.read_kv(2, 0, 10)
    kind = s.rt.kind
    try:
        s.rt.kind = "device"                  # the views' path; the memory is the CPU's still
        np.testing.assert_array_equal(s.read_kv(1, 5, 30), on_cpu)
        s.load_kv(0, [s.read_kv(1, 0, 5), s.read_kv(1, 5, 30)])
    finally:
        s.rt.kind = kind
    np.testing.assert_array_equal(s.read_kv(0, 0, 30), s.read_kv(1, 0, 30))
    assert s.lengths.tolist() == [30, 37, 10]
    np.testing.assert_array_equal(s.read_kv(2, 0, 10), other)


def test_smollm2_second_request_sharing_a_long_system_prompt_starts_fast(smollm2_artifact):
    """Issue 16's figure: a second chat sharing a ~1,500-token system prompt gets its first
    token in <= 0.25x the first's time (measured 0.04x: 1.07 s against 26 s on a loaded 2-core
    machine), its answer the one a scheduler without the cache gives. Slack: 0.5x."""
    model = runtime.load(smollm2_artifact, threads=2)
    rule = ("The museum's archive records every object by its room, shelf and year of arrival; "
            "curators answer visitors' questions politely, cite the catalogue number, and never guess. ")
    system = " ".join(f"Rule {i}: {rule}" for i in range(38))

    def prompt(q):
        return model.tokenizer.encode(model.chat_prompt([{"role": "system", "content": system},
                                                         {"role": "user", "content": q}]))

    def ask(sch, p):
        r = sch.submit(p, max_tokens=12, temperature=0.0)
        while not r.done:
            sch.step()
        return r.first_token_at - r.submitted, r.ids

    first, second = prompt("Where is the oldest vase kept?"), prompt("Who wrote the catalogue?")
    assert 1400 <= len(second) <= 1600
    cache = PrefixCache(512 << 20)
    sch = Scheduler(model.session, model.tokenizer, max_batch=4, eos_ids=model.eos_ids, prefix_cache=cache)
    t1, _ = ask(sch, first)
    t2, ids = ask(sch, second)
    assert cache.tokens_reused >= 1400
    assert t2 <= 0.5 * t1, (t1, t2)
    fresh = Scheduler(model.session, model.tokenizer, max_batch=4, eos_ids=model.eos_ids)
    assert ask(fresh, second)[1] == ids
