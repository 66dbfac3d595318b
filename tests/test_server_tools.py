"""Tool calling through a real ``kiln serve`` on a loopback port, driven by the official openai
client on SmolLM2 (whose chat template knows no tools, so kiln writes them into the system
message): required and named tool choices sampled at temperature 0.9 always give calls whose
arguments validate, streamed (``delta.tool_calls``) and not (``message.tool_calls``);
``parallel_tool_calls: false`` gives one call; tool results are rendered back."""
import json

import pytest

from test_server_structured import base, client  # noqa: F401  (the served model and its client)

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "The current weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 24},
            "unit": {"enum": ["celsius", "fahrenheit"]},
            "days": {"type": ["integer", "null"], "minimum": 1, "maximum": 7}},
            "required": ["city", "unit", "days"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "add_items", "description": "Add items to a shopping list",
        "parameters": {"type": "object", "properties": {
            "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
                "type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                                 "count": {"type": "integer", "minimum": 1, "maximum": 9}},
                "required": ["name", "count"], "additionalProperties": False}}},
            "required": ["items"], "additionalProperties": False}}},
]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris, and add two apples to my list."}]


def _check_calls(calls, only=None):
    assert calls
    for c in calls:
        assert c.type == "function" and c.id.startswith("call_")
        assert c.function.name in PARAMS and (only is None or c.function.name == only)
        jsonschema.validate(json.loads(c.function.arguments), PARAMS[c.function.name])


@pytest.mark.parametrize("choice, only", [("required", None),
                                          ({"type": "function", "function": {"name": "add_items"}}, "add_items")])
def test_required_and_named_calls_validate(client, choice, only):  # noqa: F811
    r = client.chat.completions.create(model="smol", messages=ASK, tools=TOOLS, tool_choice=choice,
                                       temperature=0.9, seed=11, n=3, max_tokens=300)
    for c in r.choices:
        assert c.finish_reason == "tool_calls", c.message
        assert c.message.content is None
        _check_calls(c.message.tool_calls, only)


def test_streamed_calls_validate(client):  # noqa: F811
    for seed, choice in ((1, "required"), (2, {"type": "function", "function": {"name": "get_weather"}})):
        stream = client.chat.completions.create(model="smol", messages=ASK, tools=TOOLS, tool_choice=choice,
                                                temperature=0.9, seed=seed, n=2, max_tokens=300, stream=True)
        calls, finish, text = {}, {}, {}
        for chunk in stream:
            for c in chunk.choices:
                text[c.index] = text.get(c.index, "") + (c.delta.content or "")
                for tc in c.delta.tool_calls or []:
                    assert (c.index, tc.index) not in calls      # each call arrives whole, once
                    calls[c.index, tc.index] = tc
                if c.finish_reason:
                    finish[c.index] = c.finish_reason
        assert finish == {0: "tool_calls", 1: "tool_calls"} and not any(text.values())
        for i in (0, 1):
            got = [calls[k] for k in sorted(calls) if k[0] == i]
            assert [k[1] for k in sorted(calls) if k[0] == i] == list(range(len(got)))
            _check_calls(got, None if choice == "required" else "get_weather")


def test_parallel_tool_calls_false_gives_one_call(client):  # noqa: F811
    r = client.chat.completions.create(model="smol", messages=ASK, tools=TOOLS, tool_choice="required",
                                       parallel_tool_calls=False, temperature=0.9, seed=5, n=3, max_tokens=300)
    for c in r.choices:
        assert len(c.message.tool_calls) == 1
        _check_calls(c.message.tool_calls)


def test_auto_answers_are_text_or_valid_calls(client):  # noqa: F811
    r = client.chat.completions.create(model="smol", messages=ASK, tools=TOOLS, temperature=0.9, seed=3, n=3,
                                       max_tokens=60)
    for c in r.choices:
        if c.message.tool_calls:          # a call the model wrote itself: its JSON parses
            assert c.finish_reason == "tool_calls"
            for tc in c.message.tool_calls:
                json.loads(tc.function.arguments)
        else:
            assert c.message.content and c.finish_reason in ("stop", "length")


def test_a_tool_result_is_rendered_back(client):  # noqa: F811
    first = client.chat.completions.create(model="smol", messages=ASK, tools=TOOLS, temperature=0, max_tokens=300,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = first.choices[0].message.tool_calls[0]
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 24 degrees."}]
    r = client.chat.completions.create(model="smol", messages=history, tools=TOOLS, temperature=0, max_tokens=20)
    base = client.chat.completions.create(model="smol", messages=ASK, tools=TOOLS, temperature=0, max_tokens=20)
    # the call and its result are in the prompt: the conversation grew by their tokens
    assert r.usage.prompt_tokens > base.usage.prompt_tokens + 15
    assert r.choices[0].message.content or r.choices[0].message.tool_calls


def test_tool_choice_none_and_bad_fields(client):  # noqa: F811
    with_tools = client.chat.completions.create(model="smol", messages=ASK, tools=TOOLS, tool_choice="none",
                                                temperature=0, max_tokens=5)
    without = client.chat.completions.create(model="smol", messages=ASK, temperature=0, max_tokens=5)
    assert with_tools.usage.prompt_tokens == without.usage.prompt_tokens      # no tools in the prompt
    assert with_tools.choices[0].message.tool_calls is None
    for extra, status, param in [({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, 400, "tool_choice"),
                                 ({"tools": [{"type": "function"}]}, 422, "tools[0]")]:
        kwargs = {"tools": TOOLS, **extra}
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model="smol", messages=ASK, max_tokens=5, **kwargs)
        assert e.value.status_code == status and e.value.body["param"] == param
