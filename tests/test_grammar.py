"""Constrained decoding (runtime/grammar.py, the grammar fields of runtime/response_format.py):
a row draws only what its grammar allows, whatever its sampling settings, and ends when the
grammar is complete. SmolLM2's real tokenizer (49,152 tokens) with made-up logits, and
generate()/stream() on the real model (tests/test_server_structured.py samples it through
``kiln serve``)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from kiln.runtime.decoding import RowDecoder, StopRules
from kiln.runtime.grammar import Grammar, GrammarError, check_grammar, row_constraint
from kiln.runtime.http_limits import APIError
from kiln.runtime.params import InvalidParam, SamplingParams
from kiln.runtime.response_format import request_grammar
from kiln.runtime.sampling import Sampler

SCHEMA = {"type": "object", "properties": {
    "kind": {"enum": ["a", "b"]},
    "n": {"type": ["integer", "null"]},
    "xs": {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 2}},
    "required": ["kind", "n", "xs"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tok(smollm2_tokenizer):
    return smollm2_tokenizer


def _run(tok, grammar, params: SamplingParams, seed_logits: int, limit: int = 80) -> RowDecoder:
    """A row decoded from random logits (a model that knows nothing) under ``grammar``."""
    rules = StopRules.of(tok, params)
    row = RowDecoder(rules, [1, 2, 3], limit=limit, sampler=Sampler.of(params, rules.end_ids),
                     constraint=row_constraint(grammar, tok, 49152))
    rng = np.random.default_rng(seed_logits)
    while row.reason is None and not row.at_limit:
        logits = rng.normal(0, 3, 49152).astype(np.float32)
        row.accept(row.sample(logits), logits)
    if row.reason is None:
        row.end()
    return row


@pytest.mark.parametrize("settings", [
    dict(temperature=0.9, seed=1),
    dict(temperature=1.5, top_k=40, top_p=0.9, min_p=0.05, seed=2),
    dict(temperature=0.0, repetition_penalty=1.5, frequency_penalty=2.0, presence_penalty=2.0),
])
def test_random_logits_still_give_valid_json(tok, settings):
    import jsonschema
    for i in range(3):
        row = _run(tok, Grammar.json_schema(SCHEMA), SamplingParams(max_tokens=80, **settings), seed_logits=i)
        assert row.reason == "stop", row.text       # the grammar ended it, not the limit
        jsonschema.validate(json.loads(row.text), SCHEMA)


def test_the_mask_allows_only_what_the_grammar_does(tok):
    c = row_constraint(Grammar("regex", "(yes|no)"), tok)
    allowed = np.flatnonzero(c.allowed())
    texts = {tok.decode([int(t)]) for t in allowed}
    assert texts and all("yes".startswith(t) or "no".startswith(t) for t in texts), texts
    logits = np.zeros(49152, dtype=np.float32)
    masked = c.mask(logits)
    assert np.isneginf(masked).sum() == 49152 - len(allowed)
    assert masked.dtype == logits.dtype and not np.isneginf(logits).any()      # the model's logits stay


def test_a_complete_answer_ends_the_row_with_stop(tok):
    # greedy on logits that favour "y": the regex is complete after "yes" and no EOS is needed
    params = SamplingParams(max_tokens=20)
    row = _run(tok, Grammar("regex", "yes|no"), params, seed_logits=0)
    assert row.reason == "stop" and row.text in ("yes", "no")
    assert row.count <= 3


def test_a_number_may_go_on_and_eos_ends_it(tok):
    # "[0-9]+" can always take another digit: only EOS (which the mask allows once a digit is
    # there) ends it, and EOS is not part of the text
    params = SamplingParams(max_tokens=6, temperature=0.0)
    rules = StopRules.of(tok, params)
    row = RowDecoder(rules, [1], limit=6, sampler=Sampler.of(params, rules.end_ids),
                     constraint=row_constraint(Grammar("regex", "[0-9]+"), tok))
    logits = np.zeros(49152, dtype=np.float32)
    logits[tok.encode("7")[0]] = 5.0
    row.accept(row.sample(logits))
    logits[:] = 0.0
    logits[tok.eos_ids[0]] = 5.0
    row.accept(row.sample(logits))
    assert row.reason == "eos" and row.text == "7"


def test_gbnf_and_lark_grammars(tok):
    for source in ('root ::= "red" | "green"', 'start: "red" | "green"'):
        row = _run(tok, Grammar("grammar", source), SamplingParams(max_tokens=10, temperature=1.0, seed=0), 0)
        assert row.text in ("red", "green") and row.reason == "stop"


@pytest.mark.parametrize("grammar, words", [
    (Grammar("json_schema", json.dumps({"type": "objectx"})), "Invalid type"),
    (Grammar("regex", "a(b"), "unclosed group"),
    (Grammar("grammar", "root ::= ("), "GBNF"),
    (Grammar("grammar", "start: foo"), "unknown name"),
])
def test_a_bad_grammar_is_one_line(tok, grammar, words):
    with pytest.raises(GrammarError, match=words) as e:
        check_grammar(grammar, tok)
    assert "\n" not in str(e.value) and e.value.param == "grammar"


def test_grammar_is_a_checked_sampling_param():
    with pytest.raises(InvalidParam, match="grammar must be"):
        SamplingParams(grammar={"type": "object"})
    with pytest.raises(GrammarError, match="kind"):
        Grammar("xml", "<a/>")
    with pytest.raises(GrammarError, match="needs its text"):
        Grammar("regex", "")
    assert SamplingParams(grammar=Grammar("json_object")).non_default() == {"grammar": Grammar("json_object")}


def test_beam_search_refuses_a_grammar():
    from kiln.runtime.beam import _refuse_sampling
    with pytest.raises(ValueError, match="num_beams"):
        _refuse_sampling(SamplingParams(grammar=Grammar("json_object")))


def test_generate_and_stream_follow_the_grammar_on_smollm2(smollm2_artifact):
    """Model.generate on a batch of two prompts (each row its own matcher) and Model.chat
    streamed, sampled at temperature 0.9: every answer validates."""
    import jsonschema

    from kiln import runtime
    model = runtime.load(smollm2_artifact, threads=2)
    schema = {"type": "object", "properties": {"word": {"type": "string", "maxLength": 12},
                                               "n": {"type": "integer"}, "ok": {"type": ["boolean", "null"]}},
              "required": ["word", "n", "ok"], "additionalProperties": False}
    grammar = Grammar.json_schema(schema)
    results = model.generate(["A JSON object:", "Some JSON for you:\n"], max_new_tokens=60, temperature=0.9,
                             seed=3, grammar=grammar)
    for r in results:
        assert r.finish_reason == "stop", r.text
        jsonschema.validate(json.loads(r.text), schema)
    text = "".join(model.chat("Give me JSON.", stream=True, max_new_tokens=60, temperature=0.9, seed=4,
                              grammar=grammar))
    jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("body, status, param", [
    ({"response_format": "json"}, 422, "response_format"),
    ({"response_format": {"type": "xml"}}, 422, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, 422, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}}, 422,
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
     400, "response_format"),
    ({"guided_regex": 5}, 422, "guided_regex"),
    ({"guided_regex": "a(b"}, 400, "guided_regex"),
    ({"guided_grammar": "start: foo"}, 400, "guided_grammar"),
    ({"grammar": "root ::= ("}, 400, "grammar"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, 400, "guided_regex"),
])
def test_bad_request_fields_are_errors_naming_them(tok, body, status, param):
    with pytest.raises(APIError) as e:
        request_grammar(body, tok, 49152)
    assert (e.value.status, e.value.param) == (status, param), e.value.message


def test_request_fields_give_their_grammar(tok):
    assert request_grammar({}, tok) is None
    assert request_grammar({"response_format": {"type": "text"}}, tok) is None
    assert request_grammar({"response_format": {"type": "json_object"}}, tok) == Grammar("json_object")
    rf = {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA, "strict": True}}
    assert request_grammar({"response_format": rf}, tok) == Grammar.json_schema(SCHEMA)
    assert request_grammar({"guided_regex": "a+"}, tok) == Grammar("regex", "a+")
    assert request_grammar({"grammar": 'root ::= "a"'}, tok) == Grammar("grammar", 'root ::= "a"')


def test_the_mask_cost_benchmark_walks_its_answer(tok, smollm2_gguf, capsys):
    """benchmarks/grammar_mask_cost.py: llguidance (the one kiln installs) allows every token of
    the benchmark's answer; a library that is not installed is one line, not a failure."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "grammar_mask_cost.py"
    spec = importlib.util.spec_from_file_location("grammar_mask_cost", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ids = tok.encode(bench.ANSWER)
    setup, compile_s, times = bench.bench_llguidance(tok, ids)
    assert len(times) == 2 * len(ids) and min(times) > 0
    import jsonschema
    jsonschema.validate(json.loads(bench.ANSWER), bench.SCHEMA)
    bench.main([str(smollm2_gguf)])
    rows = capsys.readouterr().out.splitlines()
    assert rows[0] == f"vocabulary 49152 tokens; the answer is {len(ids)} tokens"
    assert {r.split()[0] for r in rows[2:]} == {"llguidance", "xgrammar", "outlines-core"}
