"""Speculative decoding (runtime/speculative.py): a session's rollback (``truncate``) on both
backends, greedy tokens equal to the target's alone on both backends and on SmolLM2, the
sampling rule's distribution against exact probabilities, and the CLI's --draft."""
import itertools
import json
from types import SimpleNamespace

import numpy as np
import pytest

from kiln import runtime
from kiln.driver import compile as kiln_compile
from kiln.runtime.generation import generate
from kiln.runtime.params import SamplingParams
from kiln.runtime.sampling import Sampler
from kiln.runtime.speculative import check_same_vocabulary, speculative_ids

from conftest import HF_FIXTURES
from test_session_contract import VOCAB, ToySession

PROMPT = [1, 5, 9, 13, 2]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """The tiny llama fixture per backend (and ONNX Runtime's concat layout), and a q4_0
    variant of each as a draft that disagrees with it now and then."""
    out = tmp_path_factory.mktemp("spec")
    src = HF_FIXTURES / "llama"
    built = {}
    for name, kw in {"onnxrt": dict(backend="onnxrt"), "onnxrt-concat": dict(backend="onnxrt", kv_layout="concat"),
                     "tvm": dict(backend="tvm")}.items():
        built[name] = kiln_compile(src, output=out / f"{name}.kiln", **kw)
        if name != "onnxrt-concat":
            built[name + "-q4"] = kiln_compile(src, output=out / f"{name}-q4.kiln", quant="q4_0", **kw)
    return built


# ---- rollback --------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["onnxrt", "onnxrt-concat", "tvm"])
def test_truncate_then_continue_equals_a_fresh_run(artifacts, backend):
    session = runtime.load(artifacts[backend]).session
    if backend == "onnxrt-concat":
        assert session.layout == "concat"
    a, b, c = [3, 7, 11, 2], [40, 41, 42, 43, 44], [9, 8, 7]
    session.reset(1)
    session.forward(np.asarray([a + b]))
    session.truncate(len(a) + 2)
    assert session.lengths.tolist() == [len(a) + 2]
    after = session.forward(np.asarray([c]))
    session.reset(1)
    fresh = session.forward(np.asarray([a + b[:2] + c]))[:, -len(c):]
    np.testing.assert_allclose(after, fresh, rtol=1e-4, atol=1e-4)
    session.truncate(100)                       # never lengthens a row
    assert session.lengths.tolist() == [len(a) + 2 + len(c)]


def test_truncate_refuses_a_bad_length():
    session = ToySession()
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="truncate takes a length"):
            session.truncate(bad)


# ---- greedy: the target's tokens alone ------------------------------------------------------

@pytest.mark.parametrize("backend", ["onnxrt", "tvm"])
def test_greedy_tokens_are_the_targets_alone(artifacts, backend):
    target = runtime.load(artifacts[backend])
    alone = target.generate(PROMPT, max_new_tokens=40, ignore_eos=True)
    itself = runtime.load(artifacts[backend])
    variant = runtime.load(artifacts[backend + "-q4"])
    rates = {}
    for name, draft in (("itself", itself), ("variant", variant)):
        for k in (1, 3, 6):
            r = target.generate(PROMPT, max_new_tokens=40, ignore_eos=True, draft=draft, draft_tokens=k)
            assert r.ids == alone.ids, (name, k)
            assert r.finish_reason == "length" and r.timings["decode_steps"] == 39
            rates[name, k] = r.timings["acceptance_rate"]
    assert all(rates["itself", k] == 1.0 for k in (1, 3, 6))
    assert any(rates["variant", k] < 1.0 for k in (1, 3, 6))      # rejections were taken back


def test_greedy_with_penalties_and_ends_as_the_target_alone():
    """The penalties read the history the proposals extend; an EOS inside an accepted run of
    proposals ends the row there; a prompt batch runs prompt by prompt."""
    def toy(shift):
        s = ToySession()
        s._logits = lambda b, n, f=s._logits: np.roll(f(b, n), shift) if n % 3 == 0 else f(b, n)
        return s
    target = ToySession()
    prompts = [[3, 1, 4, 1], [5, 9], [2, 6, 5, 3, 5]]
    for settings in (dict(repetition_penalty=1.3), dict(presence_penalty=1.5, eos_ids=[7]),
                     dict(min_tokens=5, eos_ids=[7])):
        alone = generate(target, None, prompts, max_new_tokens=30, **settings)
        for shift in (0, 1):
            drafted = generate(target, None, prompts, max_new_tokens=30, draft=toy(shift), draft_tokens=4, **settings)
            assert [r.ids for r in drafted] == [r.ids for r in alone]
            assert [r.finish_reason for r in drafted] == [r.finish_reason for r in alone]


# ---- sampling: the target's distribution exactly ---------------------------------------------

class _Table(ToySession):
    """Logits over 3 tokens from a fixed random table indexed by a hash of the row: two seeds
    are two models that disagree."""

    def __init__(self, seed):
        self.table = np.random.default_rng(seed).normal(0, 1.0, (97, 3)).astype(np.float32)
        super().__init__()

    def _logits(self, b, n):
        row = self.tokens[b, :n]
        return self.table[int((row * np.arange(3, n + 3)).sum() % 97)].copy()


def _exact(target, params, prompt, steps):
    """The probability of every sequence of ``steps`` tokens when the target samples alone."""
    sampler = Sampler.of(params)
    probs = {}
    for seq in itertools.product(range(3), repeat=steps):
        p, history = 1.0, list(prompt)
        for t in seq:
            target.reset(1)
            logits = target.forward(np.asarray([history]), last_only=True)[:, -1]
            p *= sampler.distribution(logits, [history], [len(prompt)])[0, t]
            if p == 0:
                break
            history.append(t)
        if p:
            probs[seq] = p
    return probs


@pytest.mark.parametrize("settings", [dict(temperature=1.0), dict(temperature=0.7, top_p=0.8),
                                      dict(temperature=1.3, top_k=2, presence_penalty=0.8)])
def test_sampled_tokens_follow_the_targets_distribution(settings):
    """4 tokens: the prefill's, then a round of 2 proposals and the target's own; every
    sequence's frequency against its exact probability (chi-square, cells expecting fewer
    than 5 pooled), the filters' zeros never drawn."""
    target, draft, prompt, steps, runs = _Table(1), _Table(2), [4, 8, 15], 4, 4000
    params = SamplingParams(**settings)
    exact = _exact(target, params, prompt, steps)
    counts, accepted, proposed = {}, 0, 0
    for seed in range(runs):
        timings = {}
        out = tuple(int(t[0]) for t in speculative_ids(
            target, [prompt], draft=draft, max_new_tokens=steps, draft_tokens=2,
            sampler=Sampler.of(SamplingParams(**settings, seed=seed)), timings=timings))
        counts[out] = counts.get(out, 0) + 1
        accepted, proposed = accepted + timings["draft_accepted"], proposed + timings["draft_proposed"]
    assert set(counts) <= set(exact), "a sequence the filters rule out was drawn"
    assert 0.05 < accepted / proposed < 0.95             # the rule both accepted and rejected
    stat, df = _chi2(counts, exact, runs)
    assert stat < _chi2_bound(df)
    # the same test tells the draft's own distribution apart from the target's
    drafts = _exact(draft, params, prompt, steps)
    stat, df = _chi2({s: round(p * runs) for s, p in drafts.items()}, exact, runs)
    assert stat > _chi2_bound(df)


def _chi2(counts, exact, runs):
    """Pearson's statistic and its degrees of freedom, the cells expecting fewer than 5 draws
    pooled into one."""
    big = {s: p for s, p in exact.items() if runs * p >= 5}
    cells = [(counts.get(s, 0), runs * p) for s, p in big.items()]
    rest = runs - sum(e for _, e in cells)
    if rest > 1e-9:
        cells.append((sum(c for s, c in counts.items() if s not in big), rest))
    return sum((c - e) ** 2 / e for c, e in cells), len(cells) - 1


def _chi2_bound(df):
    return df + 6 * np.sqrt(2 * df)            # six standard deviations above the mean


# ---- the vocabulary check, the CLI ------------------------------------------------------------

def _tok(vocab):
    return SimpleNamespace(backend=SimpleNamespace(get_vocab=lambda with_added_tokens: dict(vocab)))


def test_a_draft_with_another_vocabulary_is_refused():
    check_same_vocabulary(_tok({"a": 0, "b": 1}), _tok({"a": 0, "b": 1}), "d.kiln")
    with pytest.raises(ValueError, match=r"draft d.kiln: its tokenizer differs .*id 1 is 'b' in the target and 'c'"):
        check_same_vocabulary(_tok({"a": 0, "b": 1}), _tok({"a": 0, "c": 1}), "d.kiln")
    with pytest.raises(ValueError, match="has a tokenizer and the other has none"):
        check_same_vocabulary(_tok({"a": 0}), None, "d.kiln")


def test_model_generate_refuses_what_it_cannot_draft(artifacts):
    target = runtime.load(artifacts["onnxrt"])
    with pytest.raises(ValueError, match="another model than the target"):
        target.generate(PROMPT, max_new_tokens=4, draft=target)
    with pytest.raises(ValueError, match="beam search takes no draft"):
        target.generate(PROMPT, max_new_tokens=4, num_beams=2, draft=artifacts["tvm"])
    with pytest.raises(ValueError, match="draft_tokens must be an integer >= 1"):
        target.generate(PROMPT, max_new_tokens=4, draft=artifacts["tvm"], draft_tokens=0)
    # a path is loaded once, across backends
    r = target.generate(PROMPT, max_new_tokens=8, ignore_eos=True, draft=str(artifacts["tvm"]))
    assert r.ids == target.generate(PROMPT, max_new_tokens=8, ignore_eos=True).ids


def test_cli_run_and_bench_with_a_draft(artifacts, capsys):
    from kiln.cli import main
    ids = ",".join(map(str, PROMPT))
    assert main(["run", str(artifacts["tvm"]), "--ids", ids, "-n", "20"]) == 0
    alone = capsys.readouterr().out
    assert main(["run", str(artifacts["tvm"]), "--ids", ids, "-n", "20",
                 "--draft", str(artifacts["tvm-q4"]), "--draft-tokens", "3", "-v"]) == 0
    out = capsys.readouterr()
    assert out.out == alone and "acceptance_rate=" in out.err
    assert main(["bench", str(artifacts["tvm"]), "--draft", str(artifacts["tvm-q4"]), "--decode-tokens", "16",
                 "--prefill-tokens", "8", "--repeats", "1", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["draft_same_tokens"] is True and 0 < figures["draft_acceptance_rate"] <= 1
    assert figures["draft_speedup"] > 0
    assert main(["run", str(artifacts["tvm"]), "--ids", ids, "--draft", str(artifacts["tvm-q4"]),
                 "--draft-tokens", "0"]) == 2
    assert "draft_tokens must be an integer >= 1" in capsys.readouterr().err


# ---- SmolLM2 ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_onnxrt(smollm2_gguf, tmp_path_factory):
    return kiln_compile(smollm2_gguf, output=tmp_path_factory.mktemp("smol") / "smollm2-onnxrt.kiln", backend="onnxrt")


def test_smollm2_greedy_answer_is_the_targets_alone(smollm2_artifact, smollm2_onnxrt):
    """SmolLM2 on TVM drafted by itself on ONNX Runtime (another backend, other rounding):
    the streamed answer equals the target's alone, and a seeded sampled answer repeats."""
    target, draft = runtime.load(smollm2_artifact), runtime.load(smollm2_onnxrt)
    question = [{"role": "user", "content": "Name three rivers of Europe and say where each one ends."}]
    alone = target.chat(question, max_new_tokens=48)
    pieces = target.chat(question, max_new_tokens=48, stream=True, draft=draft, draft_tokens=5)
    text = "".join(pieces)
    assert text == alone.text and len(alone.ids) > 20
    drafted = target.chat(question, max_new_tokens=48, draft=draft, draft_tokens=5)
    assert drafted.ids == alone.ids and drafted.timings["acceptance_rate"] > 0.5
    # a stop string inside a run of kept proposals ends the answer where it ends alone
    stop = alone.text.split()[3]
    stopped = [target.chat(question, max_new_tokens=48, stop=[stop], **kw) for kw in ({}, dict(draft=draft))]
    assert stopped[0].text == stopped[1].text and stopped[1].finish_reason == "stop"
    sampled = [target.chat(question, max_new_tokens=24, temperature=0.8, top_p=0.9, seed=7, draft=draft).ids
               for _ in range(2)]
    assert sampled[0] == sampled[1] and len(sampled[0]) > 5


# ---- the scheduler (kiln serve --draft): speculative while one request runs alone ------------

def _drain(sch):
    while not sch.idle():
        sch.step()


@pytest.mark.parametrize("backend", ["onnxrt", "tvm"])
def test_scheduler_drafts_for_a_lone_request_and_batches_beside_others(artifacts, backend):
    from kiln.runtime.scheduler import Scheduler
    target = runtime.load(artifacts[backend])
    prompts = [PROMPT, [7, 3, 3, 9, 12, 4, 1], [2, 2, 8]]

    def run(draft):
        kw = {} if draft is None else dict(draft=draft, draft_tokens=3)
        sch = Scheduler(target.session, None, max_batch=4, eos_ids=[], **kw)
        a = sch.submit(prompts[0], max_tokens=30, logprobs=2)
        for _ in range(4):                     # a alone: speculative rounds
            sch.step()
        b = sch.submit(prompts[1], max_tokens=12)      # beside b: batched steps
        _drain(sch)
        c = sch.submit(prompts[2], max_tokens=25)      # c alone: the draft starts again from c
        _drain(sch)
        return [a, b, c], sch

    plain, _ = run(None)
    drafted, sch = run(runtime.load(artifacts[backend + "-q4"]).session)
    assert [r.ids for r in drafted] == [r.ids for r in plain]
    assert all(r.finish_reason == "length" for r in drafted)
    assert [t for t, _, _ in drafted[0].token_logprobs] == [t for t, _, _ in plain[0].token_logprobs]
    np.testing.assert_allclose([lp for _, lp, _ in drafted[0].token_logprobs],
                               [lp for _, lp, _ in plain[0].token_logprobs], atol=1e-4)
    assert sch.steps < sum(len(r.ids) for r in plain)     # rounds gave several tokens a step
    assert 0 < sch.drafter.accepted < sch.drafter.proposed


def test_scheduler_draft_samples_reproducibly(artifacts):
    from kiln.runtime.scheduler import Scheduler
    target, draft = runtime.load(artifacts["tvm"]), runtime.load(artifacts["tvm-q4"])
    out = []
    for _ in range(2):
        sch = Scheduler(target.session, None, max_batch=2, eos_ids=[], draft=draft.session)
        req = sch.submit(PROMPT, max_tokens=20, temperature=0.9, top_p=0.9, seed=3)
        _drain(sch)
        out.append(req.ids)
        assert sch.drafter.proposed > 0
    assert out[0] == out[1] and len(out[0]) == 20


def test_serve_with_a_draft_answers_as_the_target(artifacts):
    from test_server_edge import Server
    ids = runtime.load(artifacts["tvm"]).generate(PROMPT, max_new_tokens=12, ignore_eos=True).ids
    srv = Server(artifacts["tvm"], "--draft", str(artifacts["tvm-q4"]), "--draft-tokens", "3")
    try:
        status, body = srv.request("POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 12, "logprobs": 0,
                                                               "temperature": 0, "ignore_eos": True})
    finally:
        srv.stop()
    assert status == 200, body
    assert body["choices"][0]["logprobs"]["tokens"] == [f"token_id:{t}" for t in ids]
    from kiln.runtime.server import build
    _, service = build(artifacts["tvm"], draft=artifacts["tvm-q4"], draft_tokens=3)
    try:
        req = service.scheduler.submit(PROMPT, max_tokens=12, ignore_eos=True).result()
        assert req.ids == ids and service.scheduler.drafter.proposed > 0
    finally:
        service.scheduler.stop(10)


def test_serve_refuses_a_draft_of_another_vocabulary(artifacts, smollm2_onnxrt, capsys):
    from kiln.cli import main
    assert main(["serve", str(artifacts["tvm"]), "--port", "1", "--draft", str(smollm2_onnxrt)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has a tokenizer and the other has none" in err[0]


def test_smollm2_chat_with_a_draft_answers_as_without(smollm2_artifact, smollm2_onnxrt):
    import subprocess
    import sys
    answers = []
    for flags in ([], ["--draft", str(smollm2_onnxrt), "--draft-tokens", "3"]):
        r = subprocess.run([sys.executable, "-m", "kiln.cli", "chat", str(smollm2_artifact), "-n", "24", *flags],
                           input="What is the capital of France?\n", capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        answers.append(r.stdout)
    assert answers[0] == answers[1] and "Paris" in answers[0]


def test_a_draft_of_a_shorter_context_stops_drafting_not_the_answer():
    target, draft = ToySession(), ToySession()
    draft.max_length = 12
    prompt = [3, 1, 4, 1, 5]
    alone = generate(target, None, prompt, max_new_tokens=40, eos_ids=[])
    timings = {}
    out = [int(t[0]) for t in speculative_ids(target, [prompt], draft=draft, max_new_tokens=40, draft_tokens=3,
                                              sampler=Sampler.of(SamplingParams()), timings=timings)]
    assert out == alone.ids and len(out) == 40
    assert 0 < timings["draft_proposed"] <= 12 - len(prompt) + 1


def test_scheduler_drafts_on_the_contracts_numpy_backend():
    """The contract's NumPy backend (every=True, truncate_row from RowCache) under the
    scheduler's rounds: the tokens of plain steps, through a draft that is often wrong."""
    from kiln.runtime.scheduler import Scheduler
    wrong = ToySession()
    wrong._logits = lambda b, n, f=wrong._logits: np.roll(f(b, n), 1) if n % 2 else f(b, n)
    out = []
    for draft in (None, wrong):
        sch = Scheduler(ToySession(), None, max_batch=2, eos_ids=[], **({} if draft is None else dict(draft=draft)))
        reqs = [sch.submit([3, 1, 4], max_tokens=20, repetition_penalty=1.2)]
        for _ in range(3):
            sch.step()
        reqs.append(sch.submit([2, 7], max_tokens=6))
        _drain(sch)
        out.append([r.ids for r in reqs])
        if draft is not None:
            assert 0 < sch.drafter.accepted < sch.drafter.proposed
    assert out[0] == out[1]
