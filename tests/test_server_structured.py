"""Structured output through a real ``kiln serve`` on a loopback port, driven by the official
openai client: SmolLM2 sampled at temperature 0.9 under JSON schemas (nested objects, arrays
with minItems/maxItems, enums, nullable types), streamed and not, on both endpoints: every
answer parses and validates. Also the regex and grammar extensions, the errors of bad
schemas, and a constrained row beside an unconstrained one in the same batch."""
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "nickname": {"type": ["string", "null"], "maxLength": 16},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 24},
                "geo": {"type": "object", "properties": {"lat": {"type": "integer"}, "lon": {"type": "integer"}},
                        "required": ["lat", "lon"], "additionalProperties": False},
            },
            "required": ["city", "geo"], "additionalProperties": False,
        },
    },
    "required": ["name", "age", "role", "nickname", "address"],
    "additionalProperties": False,
}
SHOPPING = {
    "type": "object",
    "properties": {
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 2, "maxItems": 3},
        "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object",
            "properties": {"id": {"type": "integer"}, "done": {"type": "boolean"},
                           "unit": {"enum": ["kg", "g", "piece", None]}},
            "required": ["id", "done", "unit"], "additionalProperties": False}},
        "note": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 20}]},
    },
    "required": ["tags", "items", "note"],
    "additionalProperties": False,
}
SCHEMAS = {"person": PERSON, "shopping": SHOPPING}
ASK = {"person": "Describe a person as JSON.", "shopping": "Write a shopping list as JSON."}


@pytest.fixture(scope="module")
def base(smollm2_artifact):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([sys.executable, "-m", "kiln.cli", "serve", str(smollm2_artifact), "--port", str(port),
                             "--threads", "2", "--max-batch", "4", "--served-model-name", "smol"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=5)
            break
        except OSError:
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1]
            time.sleep(0.1)
    yield url
    proc.terminate()
    proc.communicate(timeout=30)


@pytest.fixture(scope="module")
def client(base):
    return openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=300)


def _format(name):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}


def _valid(text, schema):
    jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_chat_answers_validate(client, name):
    r = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": ASK[name]}],
                                       temperature=0.9, seed=7, n=3, max_tokens=200,
                                       response_format=_format(name))
    assert len(r.choices) == 3
    for c in r.choices:
        assert c.finish_reason == "stop", c.message.content
        _valid(c.message.content, SCHEMAS[name])


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_streamed_chat_answers_validate(client, name):
    texts, finish = {}, {}
    for seed in (1, 2):
        stream = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": ASK[name]}],
                                                temperature=0.9, seed=seed, n=2, max_tokens=200, stream=True,
                                                response_format=_format(name))
        for chunk in stream:
            for c in chunk.choices:
                key = (seed, c.index)
                texts[key] = texts.get(key, "") + (c.delta.content or "")
                if c.finish_reason:
                    finish[key] = c.finish_reason
    assert len(texts) == 4 and set(finish.values()) == {"stop"}, finish
    for text in texts.values():
        _valid(text, SCHEMAS[name])


def test_completions_answers_validate_streamed_and_not(client):
    prompt = "A person, as a JSON object:\n"
    r = client.completions.create(model="smol", prompt=prompt, temperature=0.9, seed=3, n=2, max_tokens=200,
                                  extra_body={"response_format": _format("person")})
    for c in r.choices:
        assert c.finish_reason == "stop"
        _valid(c.text, PERSON)
    text = "".join(c.choices[0].text for c in client.completions.create(
        model="smol", prompt=prompt, temperature=0.9, seed=4, max_tokens=200, stream=True,
        extra_body={"response_format": _format("person")}))
    _valid(text, PERSON)


def test_json_object_gives_an_object(client):
    r = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Any JSON please."}],
                                       temperature=0.9, seed=5, max_tokens=200,
                                       response_format={"type": "json_object"})
    c = r.choices[0]
    if c.finish_reason == "stop":        # an object of free keys may run past max_tokens
        assert isinstance(json.loads(c.message.content), dict)
    assert c.message.content.startswith("{")


def test_regex_and_grammar_extensions(client):
    r = client.completions.create(model="smol", prompt="Is the sky blue? Answer:", temperature=0.9, seed=6,
                                  n=3, max_tokens=30, extra_body={"guided_regex": r" (yes|no), [a-z ]{1,20}\."})
    for c in r.choices:
        assert c.finish_reason == "stop"
        assert c.text.startswith((" yes, ", " no, ")) and c.text.endswith("."), c.text
    gbnf = 'root ::= color ("," color)?\ncolor ::= "red" | "green" | "blue"'
    lark = 'start: color ("," color)?\ncolor: "red" | "green" | "blue"'
    for field, source in (("grammar", gbnf), ("guided_grammar", lark)):
        r = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Two colours?"}],
                                           temperature=0.9, seed=8, max_tokens=20, extra_body={field: source})
        parts = r.choices[0].message.content.split(",")
        assert 1 <= len(parts) <= 2 and set(parts) <= {"red", "green", "blue"}, r.choices[0].message.content


@pytest.mark.parametrize("extra, status, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
     400, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": "{}"}}},
     422, "response_format.json_schema.schema"),
    ({"guided_regex": "(unclosed"}, 400, "guided_regex"),
])
def test_bad_schemas_are_refused_in_openai_shape(client, extra, status, param):
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=5, extra_body=extra)
    assert e.value.status_code == status
    err = e.value.body
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]


def test_a_constrained_row_leaves_its_neighbours_alone(client):
    """Greedy, unconstrained: the same text alone and beside constrained rows of one batch."""
    ask = dict(model="smol", messages=[{"role": "user", "content": "Name three fruits."}], temperature=0,
               max_tokens=40)
    alone = client.chat.completions.create(**ask).choices[0].message.content
    out = {}

    def constrained(i):
        out[i] = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": ASK["person"]}],
                                                temperature=0.9, seed=10 + i, max_tokens=200,
                                                response_format=_format("person")).choices[0].message.content
    threads = [threading.Thread(target=constrained, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    beside = client.chat.completions.create(**ask).choices[0].message.content
    for t in threads:
        t.join()
    assert beside == alone
    for text in out.values():
        _valid(text, PERSON)
