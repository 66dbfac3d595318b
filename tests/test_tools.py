"""Tool calling's parts without a model: the request's tool fields (runtime/tools.py), the
prompt the chat template renders, the grammar of a required or named call, and the reading of
``<tool_call>`` blocks out of an answer, whole or streamed (runtime/tool_parser.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from kiln.runtime.decoding import RowDecoder, StopRules
from kiln.runtime.grammar import row_constraint
from kiln.runtime.http_limits import APIError
from kiln.runtime.params import SamplingParams
from kiln.runtime.response_format import request_grammar
from kiln.runtime.sampling import Sampler
from kiln.runtime.server import _content
from kiln.runtime.tool_parser import ToolCallParser, ToolDeltas, assistant_message, parse_tool_calls
from kiln.runtime.tools import render_messages, tool_request

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                                  "required": ["a", "b"], "additionalProperties": False}}}
TOOLS = [WEATHER, ADD]

# a template that reads tools, tool calls and tool results, as Qwen's and Hermes' do
NATIVE = ("{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}\n{% endif %}"
          "{% for m in messages %}[{{ m.role }}]{{ m.content }}"
          "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }} {{ c.function.arguments | tojson }}{% endfor %}"
          "{% if m.tool_call_id %} (for {{ m.tool_call_id }}){% endif %}\n{% endfor %}")
PLAIN = "{% for m in messages %}[{{ m.role }}]{{ m.content }}\n{% endfor %}"


@pytest.fixture(scope="module")
def tok(smollm2_tokenizer):
    return smollm2_tokenizer


CONVERSATION = [
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "c"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "-3"},
]


def _render(template, body):
    msgs, tools = render_messages(body["messages"], tool_request(body), template, _content)
    from kiln.runtime.tokenizer import _compile_template
    return _compile_template(template).render(messages=msgs, tools=tools, add_generation_prompt=True)


def test_a_template_that_reads_tools_gets_them_and_the_calls():
    text = _render(NATIVE, {"messages": CONVERSATION, "tools": TOOLS})
    assert text.startswith("TOOLS:get_weather;add;[user]")
    # arguments are an object for the template (its tojson), not OpenAI's JSON string
    assert 'CALL get_weather {"city": "Oslo", "unit": "c"}' in text
    assert "[tool]-3 (for call_1)" in text


def test_a_template_without_tools_gets_them_in_the_system_message():
    text = _render(PLAIN, {"messages": CONVERSATION, "tools": TOOLS})
    system = text.split("\n[user]")[0]
    assert system.startswith("[system]") and "<tools>" in system and json.dumps(ADD) in system
    assert '[assistant]<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}\n</tool_call>' in text
    assert "[user]<tool_response>\n-3\n</tool_response>" in text


def test_tool_choice_none_leaves_the_tools_out():
    for template in (NATIVE, PLAIN):
        text = _render(template, {"messages": CONVERSATION[:1], "tools": TOOLS, "tool_choice": "none"})
        assert "TOOLS" not in text and "<tools>" not in text


@pytest.mark.parametrize("body, status, param", [
    ({"tools": "get_weather"}, 422, "tools"),
    ({"tools": [{"type": "function"}]}, 422, "tools[0]"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}, 422, "tools[0].function.parameters"),
    ({"tools": [ADD, ADD]}, 400, "tools"),
    ({"tools": TOOLS, "tool_choice": "always"}, 422, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "mul"}}}, 400, "tool_choice"),
    ({"tool_choice": "required"}, 400, "tool_choice"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, 422, "parallel_tool_calls"),
])
def test_bad_tool_fields_are_errors_naming_them(body, status, param):
    with pytest.raises(APIError) as e:
        tool_request(body)
    assert (e.value.status, e.value.param) == (status, param), e.value.message


def test_bad_tool_calls_in_messages_are_errors():
    bad = [{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "add", "arguments": "{nope"}}]}]
    with pytest.raises(APIError) as e:
        render_messages(bad, None, PLAIN, _content)
    assert e.value.status == 422 and e.value.param == "messages[0].tool_calls"


def test_required_and_response_format_cannot_both_be_grammars(tok):
    body = {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}
    with pytest.raises(APIError) as e:
        request_grammar(body, tok, tools=tool_request(body))
    assert e.value.status == 400 and "tool_choice" in e.value.message
    auto = {"tools": TOOLS, "response_format": {"type": "json_object"}}
    assert request_grammar(auto, tok, tools=tool_request(auto)).kind == "json_object"


def _sampled(tok, body, seed):
    tools = tool_request(body)
    params = SamplingParams(max_tokens=150, temperature=1.0, seed=seed)
    rules = StopRules.of(tok, params)
    row = RowDecoder(rules, [1], limit=150, sampler=Sampler.of(params, rules.end_ids),
                     constraint=row_constraint(request_grammar(body, tok, tools=tools), tok, 49152))
    rng = np.random.default_rng(seed)
    while row.reason is None and not row.at_limit:
        logits = rng.normal(0, 3, 49152).astype(np.float32)
        row.accept(row.sample(logits), logits)
    return row


@pytest.mark.parametrize("choice, parallel", [("required", True), ("required", False),
                                              ({"type": "function", "function": {"name": "get_weather"}}, False)])
def test_the_grammar_makes_calls_whose_arguments_validate(tok, choice, parallel):
    import jsonschema
    body = {"tools": TOOLS, "tool_choice": choice, "parallel_tool_calls": parallel}
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for seed in range(3):
        row = _sampled(tok, body, seed)
        assert row.reason in ("stop", "eos"), row.text
        content, calls = parse_tool_calls(row.text)
        assert content is None and calls, row.text
        if not parallel:
            assert len(calls) == 1
        for c in calls:
            if isinstance(choice, dict):
                assert c["function"]["name"] == "get_weather"
            jsonschema.validate(json.loads(c["function"]["arguments"]), schemas[c["function"]["name"]])


ANSWER = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}\n</tool_call>\n'
          '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>')


def test_an_answer_is_read_into_content_and_calls():
    content, calls = parse_tool_calls(ANSWER)
    assert content == "Let me look.\n"
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Oslo", "unit": "c"}), ("add", {"a": 1, "b": 2})]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert len({c["id"] for c in calls}) == 2


def test_what_is_not_a_call_stays_text():
    assert parse_tool_calls("a <tool_call> not json </tool_call> b") == ("a <tool_call> not json </tool_call> b", [])
    assert parse_tool_calls("1 < 2 and <tool") == ("1 < 2 and <tool", [])
    # a call the model ended at EOS, without its closing tag, is a call when its JSON is whole
    content, calls = parse_tool_calls('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n')
    assert content is None and calls[0]["function"]["name"] == "add"


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_streamed_pieces_give_the_same_calls(size):
    stream = ToolDeltas()
    deltas = []
    for k in range(0, len(ANSWER), size):
        deltas += stream.feed(ANSWER[k:k + size])
    deltas += stream.finish()
    text = "".join(d.get("content", "") for d in deltas)
    calls = [c for d in deltas for c in d.get("tool_calls", [])]
    assert text == "Let me look.\n"
    assert [c["index"] for c in calls] == [0, 1]
    assert [c["function"]["name"] for c in calls] == ["get_weather", "add"]
    assert stream.finish_reason("stop") == "tool_calls" and stream.finish_reason("length") == "length"


def test_a_call_is_sent_as_soon_as_it_closes():
    p = ToolCallParser()
    assert p.feed("Hi <tool_") == [{"content": "Hi "}]          # "<tool_" may open a call: held back
    assert p.feed('call>{"name": "add", "arguments": {}}') == []
    out = p.feed("</tool_call>")
    assert out[0]["tool_call"]["function"] == {"name": "add", "arguments": "{}"}


def test_assistant_message_shapes():
    req = tool_request({"tools": TOOLS})
    msg, finish = assistant_message(ANSWER, "stop", req)
    assert finish == "tool_calls" and msg["content"] == "Let me look.\n" and len(msg["tool_calls"]) == 2
    assert assistant_message("plain", "stop", req) == ({"role": "assistant", "content": "plain"}, "stop")
    none = tool_request({"tools": TOOLS, "tool_choice": "none"})
    assert assistant_message(ANSWER, "stop", none) == ({"role": "assistant", "content": ANSWER}, "stop")


def test_llama_and_mistral_bare_json_calls():
    names = ["get_weather", "add"]
    # Llama 3.1: one object with "parameters" (its <|python_tag|> is a special token, not text)
    content, calls = parse_tool_calls(' {"name": "add", "parameters": {"a": 1, "b": 2}}', names)
    assert content is None and [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("add", {"a": 1, "b": 2})]
    # Mistral: an array after [TOOL_CALLS] (a special token too)
    content, calls = parse_tool_calls('[{"name": "add", "arguments": {"a": 1, "b": 2}}, '
                                      '{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}]', names)
    assert content is None and [c["function"]["name"] for c in calls] == ["add", "get_weather"]
    # JSON that names no offered function is an answer, not a call; nor is JSON without tools
    person = '{"name": "Ada", "arguments": {}}'
    assert parse_tool_calls(person, names) == (person, [])
    assert parse_tool_calls('{"name": "add", "parameters": {}}') == ('{"name": "add", "parameters": {}}', [])


def test_a_streamed_bare_json_answer_waits_for_its_end():
    stream = ToolDeltas(tool_request({"tools": TOOLS}))
    text = '{"name": "add", "parameters": {"a": 1, "b": 2}}'
    assert all(stream.feed(ch) == [] for ch in text)
    out = stream.finish()
    assert out[0]["tool_calls"][0]["function"]["name"] == "add" and stream.finish_reason("stop") == "tool_calls"
    # an ordinary answer still streams at once
    stream = ToolDeltas(tool_request({"tools": TOOLS}))
    assert stream.feed("Hello") == [{"content": "Hello"}]
    # a JSON-looking answer that is no call comes out whole at the end
    stream = ToolDeltas(tool_request({"tools": TOOLS}))
    assert stream.feed("[1, 2") == [] and stream.finish() == [{"content": "[1, 2"}]
