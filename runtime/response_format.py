"""The server's structured-output fields: a request body's :class:`~kiln.runtime.grammar.Grammar`.

* OpenAI's ``response_format``: ``{"type": "text"}`` (no constraint), ``{"type":
  "json_object"}`` (any JSON object), ``{"type": "json_schema", "json_schema": {"name",
  "schema", "strict"}}`` (an answer valid against ``schema``; kiln enforces it whatever
  ``strict`` says, as vLLM does).
* A ``tool_choice`` of ``"required"`` or a named function (:mod:`kiln.runtime.tools`).
* vLLM's ``guided_regex`` (a regular expression the whole answer matches) and
  ``guided_grammar``, and llama-server's ``grammar``: a context-free grammar in Lark syntax
  (rule ``start``) or llama.cpp's GBNF (rule ``root``).

At most one of them per request. A field of the wrong shape is a 422 naming it; a schema, regex
or grammar that does not compile is a 400 naming the field and the problem, before anything is
queued.
"""
from __future__ import annotations

from .grammar import Grammar, GrammarError, check_grammar
from .http_limits import APIError

__all__ = ["request_grammar", "GRAMMAR_FIELDS"]

#: the extension fields, and the Grammar kind of each
GRAMMAR_FIELDS = {"guided_regex": "regex", "guided_grammar": "grammar", "grammar": "grammar"}


def request_grammar(body: dict, tokenizer, vocab: int | None = None, tools=None) -> Grammar | None:
    """The grammar the request's answers must match (None: none), checked against the model's
    tokenizer; APIError for a bad field. ``tools``: the request's
    :class:`~kiln.runtime.tools.ToolRequest`, whose required or named call is a grammar too."""
    given = [name for name in ("response_format", *GRAMMAR_FIELDS) if body.get(name) is not None]
    if tools is not None and tools.grammar() is not None:
        given.insert(0, "tool_choice")
    if len(given) > 1:
        raise APIError(400, f"give at most one of response_format, {', '.join(GRAMMAR_FIELDS)} and a required "
                            f"or named tool_choice; got "
                            f"{' and '.join(given)}", code="invalid_value", param=given[1])
    if not given:
        return None
    name = given[0]
    if name == "tool_choice":
        grammar = tools.grammar()
    elif name == "response_format":
        grammar = _response_format(body[name])
    else:
        grammar = _text_field(body, name)
    if grammar is None:
        return None
    try:
        check_grammar(grammar, tokenizer, vocab)
    except GrammarError as e:
        raise APIError(400, f"{name}: {e}", code="invalid_value", param=name) from None
    return grammar


def _text_field(body: dict, name: str) -> Grammar:
    v = body[name]
    if not isinstance(v, str) or not v.strip():
        raise APIError(422, f"{name} must be a non-empty string", code="invalid_value", param=name)
    return Grammar(GRAMMAR_FIELDS[name], v)


def _response_format(rf) -> Grammar | None:
    param = "response_format"
    if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
        raise APIError(422, 'response_format must be an object with a "type": "text", "json_object" or '
                            '"json_schema"', code="invalid_value", param=param)
    kind = rf["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return Grammar("json_object")
    if kind != "json_schema":
        raise APIError(422, f'response_format.type must be "text", "json_object" or "json_schema", got '
                            f'{kind!r:.40}', code="invalid_value", param="response_format.type")
    spec = rf.get("json_schema")
    if not isinstance(spec, dict):
        raise APIError(422, 'response_format of type "json_schema" needs a "json_schema" object '
                            '({"name", "schema", "strict"})', code="invalid_value",
                       param="response_format.json_schema")
    name = spec.get("name")
    if name is not None and not isinstance(name, str):
        raise APIError(422, "response_format.json_schema.name must be a string", code="invalid_value",
                       param="response_format.json_schema.name")
    if spec.get("strict") not in (None, True, False):
        raise APIError(422, "response_format.json_schema.strict must be true or false", code="invalid_value",
                       param="response_format.json_schema.strict")
    schema = spec.get("schema")
    if schema is None:                  # OpenAI's schema is optional: then any JSON object
        return Grammar("json_object")
    if not isinstance(schema, (dict, bool)):
        raise APIError(422, "response_format.json_schema.schema must be a JSON schema (an object)",
                       code="invalid_value", param="response_format.json_schema.schema")
    return Grammar.json_schema(schema)
