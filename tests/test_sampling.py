"""Sampler: greedy, filters, repetition penalty, seeds; a property test on the candidate set."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kiln.runtime.sampling import Sampler

RNG = np.random.default_rng(1234)


def probs_logits(probs):
    return np.log(np.asarray(probs, dtype=np.float64))[None, :].astype(np.float32)


def support(dist_row):
    return set(np.flatnonzero(dist_row).tolist())


def test_greedy_takes_argmax_lowest_id_on_ties():
    logits = np.array([[0.0, 3.0, 1.0, 3.0], [5.0, 5.0, 5.0, 5.0]], dtype=np.float32)
    assert Sampler()(logits, [[], []]).tolist() == [1, 0]


def test_greedy_is_int64_and_ignores_seed():
    logits = RNG.normal(size=(3, 50)).astype(np.float32)
    out = Sampler(seed=1)(logits, [[]] * 3)
    assert out.dtype == np.int64 and out.shape == (3,)
    assert out.tolist() == Sampler(seed=2)(logits, [[]] * 3).tolist() == logits.argmax(1).tolist()


def test_equal_seeds_give_equal_tokens_and_different_seeds_differ():
    logits = np.zeros((2, 1000), dtype=np.float32)

    def draws(seed):
        s = Sampler(temperature=1.0, seed=seed)
        return np.stack([s(logits, [[], []]) for _ in range(20)]).tolist()

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_each_row_has_its_own_stream():
    logits = np.zeros((3, 1000), dtype=np.float32)
    batched = Sampler(temperature=1.0, seed=5)(logits, [[]] * 3)
    alone = Sampler(temperature=1.0, seed=5)(logits[:1], [[]])
    assert batched[0] == alone[0]
    # Row 2 of the request run as row 0 of a smaller batch keeps its stream.
    view = Sampler(temperature=1.0, seed=5).rows([2])
    assert view(logits[:1], [[]])[0] == batched[2]
    assert len(set(batched.tolist())) > 1


def test_top_k_one_equals_greedy():
    logits = RNG.normal(size=(4, 300)).astype(np.float32)
    s = Sampler(temperature=1.3, top_k=1, seed=0)
    for _ in range(5):
        assert s(logits, [[]] * 4).tolist() == logits.argmax(1).tolist()


def test_top_k_keeps_lowest_ids_on_ties():
    logits = np.array([[1.0, 2.0, 2.0, 2.0, 0.0]], dtype=np.float32)
    dist = Sampler(temperature=1.0, top_k=2).distribution(logits, [[]])
    assert support(dist[0]) == {1, 2}


def test_tiny_top_p_equals_greedy():
    logits = RNG.normal(size=(4, 300)).astype(np.float32)
    s = Sampler(temperature=2.0, top_p=1e-9, seed=0)
    for _ in range(5):
        assert s(logits, [[]] * 4).tolist() == logits.argmax(1).tolist()


@pytest.mark.parametrize("top_p, kept", [(0.5, {0}), (0.8, {0, 1}), (0.81, {0, 1, 2}),
                                         (0.96, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_smallest_set_reaching_p(top_p, kept):
    logits = probs_logits([0.3, 0.5, 0.15, 0.05])[:, [1, 0, 2, 3]]  # ids ordered by prob
    dist = Sampler(temperature=1.0, top_p=top_p).distribution(logits, [[]])
    assert support(dist[0]) == kept
    assert dist[0].sum() == pytest.approx(1.0)


def test_top_p_applies_after_top_k():
    logits = probs_logits([0.4, 0.3, 0.2, 0.1])
    # Within the top 2 the probabilities are 4/7 and 3/7, so top_p = 0.6 needs both.
    dist = Sampler(temperature=1.0, top_k=2, top_p=0.6).distribution(logits, [[]])
    assert support(dist[0]) == {0, 1}


def test_min_p_is_relative_to_the_top_token():
    logits = probs_logits([0.5, 0.3, 0.15, 0.05])
    dist = Sampler(temperature=1.0, min_p=0.2).distribution(logits, [[]])
    assert support(dist[0]) == {0, 1, 2}  # 0.05 < 0.2 * 0.5
    np.testing.assert_allclose(dist[0, :3], np.array([0.5, 0.3, 0.15]) / 0.95)
    assert support(Sampler(temperature=1.0, min_p=1.0).distribution(logits, [[]])[0]) == {0}


def test_temperature_scales_the_softmax():
    logits = RNG.normal(size=(1, 20)).astype(np.float32)
    dist = Sampler(temperature=0.5).distribution(logits, [[]])[0]
    ref = np.exp(logits[0].astype(np.float64) / 0.5)
    # the sampler's exp runs in float32 (sampling._exp): each weight to ~1e-7, sums in float64
    np.testing.assert_allclose(dist, ref / ref.sum(), rtol=1e-6)


def test_samples_follow_the_distribution():
    logits = probs_logits([0.6, 0.3, 0.1])
    s = Sampler(temperature=1.0, seed=11)
    counts = np.bincount([int(s(logits, [[]])[0]) for _ in range(3000)], minlength=3) / 3000
    # sampling noise: one standard deviation is at most sqrt(0.6 * 0.4 / 3000) = 0.009; bound 3.4 sd
    np.testing.assert_allclose(counts, [0.6, 0.3, 0.1], rtol=0, atol=0.03)


def test_large_vocabulary_draws_only_allowed_tokens_in_proportion():
    # Above a few thousand tokens the draw searches block sums first; check that path.
    probs = np.zeros(20_001)
    probs[[7, 4096, 20_000]] = [0.2, 0.5, 0.3]
    with np.errstate(divide="ignore"):
        logits = np.log(probs)[None].astype(np.float32)
    s = Sampler(temperature=1.0, seed=3)
    draws = [int(s(logits, [[]])[0]) for _ in range(2000)]
    assert set(draws) == {7, 4096, 20_000}
    freq = [draws.count(t) / len(draws) for t in (7, 4096, 20_000)]
    # sampling noise: one standard deviation is at most sqrt(0.5 * 0.5 / 2000) = 0.011; bound 3.6 sd
    np.testing.assert_allclose(freq, [0.2, 0.5, 0.3], rtol=0, atol=0.04)


def test_top_p_on_a_flat_distribution_keeps_the_lowest_ids():
    # The nucleus is far larger than the first slice ranked, so the slice has to grow.
    logits = np.zeros((1, 5000), dtype=np.float32)
    dist = Sampler(temperature=1.0, top_p=0.9).distribution(logits, [[]])[0]
    assert support(dist) == set(range(4500))


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    # transformers' rule: a seen token with logit 2.0 becomes 2.0/2 = 1.0 (< 1.5),
    # one with logit -1.0 becomes -2.0 (< -1.5).
    pos = np.array([[2.0, 1.5]], dtype=np.float32)
    neg = np.array([[-1.0, -1.5]], dtype=np.float32)
    assert Sampler()(pos, [[0]])[0] == 0
    assert Sampler(repetition_penalty=2.0)(pos, [[0]])[0] == 1
    assert Sampler(repetition_penalty=2.0)(neg, [[0, 0, 0]])[0] == 1
    assert Sampler(repetition_penalty=2.0)(pos, [[1]])[0] == 0
    dist = Sampler(temperature=1.0, repetition_penalty=2.0).distribution(pos, [[0]])[0]
    np.testing.assert_allclose(dist, np.exp([1.0, 1.5]) / np.exp([1.0, 1.5]).sum())


def test_minus_inf_logits_are_never_sampled():
    logits = np.array([[-np.inf, 0.0, -np.inf, 0.0]], dtype=np.float32)
    s = Sampler(temperature=1.0, seed=0)
    assert {int(s(logits, [[]])[0]) for _ in range(50)} == {1, 3}
    with pytest.raises(ValueError, match="-inf"):
        s(np.full((1, 4), -np.inf, dtype=np.float32), [[]])


def test_tiny_temperature_does_not_overflow():
    logits = np.array([[100.0, 99.0, -100.0]], dtype=np.float32)
    assert Sampler(temperature=1e-300, seed=0)(logits, [[]])[0] == 0


@pytest.mark.parametrize("kwargs, word", [
    ({"temperature": -1}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"top_k": -1}, "top_k"), ({"top_k": 1.5}, "top_k"), ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"), ({"min_p": -0.1}, "min_p"), ({"min_p": 2}, "min_p"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"seed": -3}, "seed"),
    ({"seed": "x"}, "seed"), ({"temperature": "hot"}, "temperature"),
])
def test_bad_arguments_are_clear_value_errors(kwargs, word):
    with pytest.raises(ValueError, match=word):
        Sampler(**kwargs)


def test_bad_logits_are_rejected():
    s = Sampler()
    with pytest.raises(ValueError, match="batch, vocab"):
        s(np.zeros(5, dtype=np.float32), [[]])
    with pytest.raises(ValueError, match="NaN"):
        s(np.array([[0.0, np.nan]], dtype=np.float32), [[]])
    with pytest.raises(ValueError, match="history"):
        s(np.zeros((2, 5), dtype=np.float32), [[]])


@settings(max_examples=150, deadline=None)
@given(
    logits=st.lists(st.floats(-30, 30, allow_nan=False, width=32), min_size=1, max_size=40,
                    unique=True),
    temperature=st.floats(0.05, 5.0),
    top_k=st.integers(0, 45),
    top_p=st.floats(0.01, 1.0),
    min_p=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**32),
)
def test_sampled_id_is_inside_the_top_k_top_p_min_p_set(logits, temperature, top_k, top_p,
                                                        min_p, seed):
    row = np.array(logits, dtype=np.float32)
    s = Sampler(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed)
    token = int(s(row[None], [[]])[0])
    dist = Sampler(temperature=temperature, top_k=top_k, top_p=top_p,
                   min_p=min_p).distribution(row[None], [[]])[0]

    assert dist[token] > 0
    assert dist.sum() == pytest.approx(1.0)
    assert dist[int(np.argmax(row))] > 0  # the most likely token always survives

    # top-k: fewer than k tokens are strictly more likely.
    if top_k:
        assert (row > row[token]).sum() < top_k
    # top-p over the top-k set: the tokens strictly more likely than the sampled one have
    # not yet reached top_p, otherwise the nucleus would have stopped before it.
    k = top_k or len(row)
    in_k = np.argsort(-row.astype(np.float64), kind="stable")[:k]
    scaled = row[in_k].astype(np.float64) / temperature
    p = np.exp(scaled - scaled.max())
    p /= p.sum()
    p_token = p[list(in_k).index(token)]
    assert p[p > p_token].sum() < top_p + 1e-9
    # min-p: relative to the most likely surviving token.
    assert dist[token] >= min_p * dist.max() - 1e-12


def _penalty_reference(logits, history, prompt_len, rep, freq, pres):
    """OpenAI's additive penalties (generated tokens only) after transformers' multiplicative
    one (every token seen), written out plainly."""
    row = logits.astype(np.float64).copy()
    for t in set(history):
        row[t] = row[t] / rep if row[t] > 0 else row[t] * rep
    counts = np.bincount(np.asarray(history[prompt_len:], dtype=np.int64), minlength=len(row))
    return row - counts * freq - (counts > 0) * pres


@pytest.mark.parametrize("freq,pres,rep", [(0.7, 0.0, 1.0), (0.0, 1.3, 1.0), (-1.5, 2.0, 1.0),
                                           (0.4, -0.6, 1.3)])
def test_frequency_and_presence_penalties_match_the_formula(freq, pres, rep):
    rng = np.random.default_rng(7)
    logits = rng.normal(0, 2, size=(1, 40)).astype(np.float32)
    prompt = [3, 3, 5, 9]
    history = prompt + [5, 5, 5, 11, 3, 20, 20]
    want = _penalty_reference(logits[0], history, len(prompt), rep, freq, pres)
    s = Sampler(temperature=1.0, repetition_penalty=rep, frequency_penalty=freq, presence_penalty=pres)
    got = s.distribution(logits, [history], [len(prompt)])[0]
    ref = np.exp(want - want.max())
    np.testing.assert_allclose(got, ref / ref.sum(), rtol=1e-6, atol=1e-15)   # float32 exp
    # the prompt's tokens are not counted: 9 appears only there
    if rep == 1.0:
        assert got[9] / got[0] == pytest.approx(np.exp(float(logits[0, 9]) - float(logits[0, 0])))
    # greedy picks the argmax of the adjusted logits
    greedy = Sampler(frequency_penalty=freq, presence_penalty=pres, repetition_penalty=rep)
    assert greedy(logits, [history], [len(prompt)])[0] == int(np.argmax(want))


def test_penalties_push_greedy_off_a_repeated_token():
    logits = np.array([[0.0, 3.0, 2.5]], dtype=np.float32)
    s = Sampler(frequency_penalty=0.2)
    assert s(logits, [[1, 1]], [0])[0] == 1            # 3.0 - 0.4 > 2.5
    assert s(logits, [[1, 1, 1]], [0])[0] == 2         # 3.0 - 0.6 < 2.5
    assert s(logits, [[1, 1, 1]], [3])[0] == 1         # all prompt: not counted
    assert Sampler(presence_penalty=0.6)(logits, [[1]], [0])[0] == 2
    for bad in (2.5, -2.01, float("nan")):
        with pytest.raises(ValueError, match="frequency_penalty"):
            Sampler(frequency_penalty=bad)
        with pytest.raises(ValueError, match="presence_penalty"):
            Sampler(presence_penalty=bad)
