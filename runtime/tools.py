"""Tool calling on the server: a request's ``tools``, ``tool_choice`` and
``parallel_tool_calls`` (OpenAI's fields), the chat prompt they make, and the grammar that
enforces a required or named call.

* The chat template gets the tools as transformers' ``apply_chat_template`` passes them (the
  Jinja variable ``tools``: a list of ``{"type": "function", "function": {...}}``), assistant
  messages keep their ``tool_calls`` (``arguments`` as an object, as templates expect) and
  ``role: "tool"`` messages their ``tool_call_id``. A template that never mentions ``tools``
  (SmolLM2's) would drop them silently, so for such a template kiln writes the tools into the
  system message in the Hermes format (``<tools>`` ... ``</tools>``, calls as ``<tool_call>``
  JSON), earlier calls into the assistant's text the same way, and tool results as user
  messages in ``<tool_response>`` tags.
* ``tool_choice``: ``"none"`` leaves the tools out of the prompt; ``"auto"`` (the default with
  tools) lets the model answer or call; ``"required"`` and a named function
  (``{"type": "function", "function": {"name": ...}}``) are a grammar: the answer is one
  ``<tool_call>`` (several when ``parallel_tool_calls``, the default) whose ``arguments`` match
  the function's ``parameters`` schema, so they always validate.

The answer is read back into ``tool_calls`` by :mod:`kiln.runtime.tool_parser`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from .grammar import JSON_STYLE, Grammar
from .http_limits import APIError

__all__ = ["ToolRequest", "tool_request", "render_messages", "TOOL_CALL_OPEN", "TOOL_CALL_CLOSE"]

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
MAX_TOOLS = 128


@dataclass(frozen=True)
class ToolRequest:
    """The tools a request offers (``{"name", "description", "parameters"}`` each), how it wants
    them used (``choice``: "none", "auto", "required" or a function's name) and whether an answer
    may hold several calls."""
    functions: tuple
    choice: str
    parallel: bool

    @property
    def names(self) -> list[str]:
        return [f["name"] for f in self.functions]

    def grammar(self) -> Grammar | None:
        """The grammar of an answer that must call (``required`` or named); None otherwise."""
        if self.choice in ("none", "auto"):
            return None
        names = [f["name"] for f in self.functions] if self.choice == "required" else [self.choice]
        options = [{"type": "object",
                    "properties": {"name": {"const": n}, "arguments": self._parameters(n)},
                    "required": ["name", "arguments"], "additionalProperties": False} for n in names]
        body = {"anyOf": options, "x-guidance": JSON_STYLE}     # JSON as response_format writes it
        calls = 'call ("\\n" call)*' if self.parallel else "call"
        lark = (f"start: {calls}\n"
                f"call: {json.dumps(TOOL_CALL_OPEN + chr(10))} body {json.dumps(chr(10) + TOOL_CALL_CLOSE)}\n"
                f"body: %json {json.dumps(body)}\n")
        return Grammar("grammar", lark)

    def _parameters(self, name: str) -> dict:
        f = next(f for f in self.functions if f["name"] == name)
        return f.get("parameters") or {"type": "object"}

    def template_tools(self) -> list[dict] | None:
        """The ``tools`` the chat template gets (None: none, for ``tool_choice: "none"``)."""
        if self.choice == "none":
            return None
        return [{"type": "function", "function": f} for f in self.functions]


def tool_request(body: dict) -> ToolRequest | None:
    """The request's tool fields, checked (None: it offers no tools); APIError when malformed."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise APIError(422, "parallel_tool_calls must be true or false", code="invalid_value",
                       param="parallel_tool_calls")
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise APIError(400, "tool_choice needs tools to choose from", code="invalid_value", param="tool_choice")
        return None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise APIError(422, f"tools must be a list of at most {MAX_TOOLS} functions", code="invalid_value",
                       param="tools")
    functions = tuple(_function(t, i) for i, t in enumerate(tools))
    names = [f["name"] for f in functions]
    if len(set(names)) != len(names):
        raise APIError(400, "tools name the same function twice", code="invalid_value", param="tools")
    if choice is None:
        choice = "auto"
    elif isinstance(choice, dict):
        fn = choice.get("function") if choice.get("type") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise APIError(422, 'tool_choice must be "none", "auto", "required" or {"type": "function", '
                                '"function": {"name": ...}}', code="invalid_value", param="tool_choice")
        if name not in names:
            raise APIError(400, f"tool_choice names the function {name!r:.60}, which tools does not hold",
                           code="invalid_value", param="tool_choice")
        choice = name
    elif choice not in ("none", "auto", "required"):
        raise APIError(422, 'tool_choice must be "none", "auto", "required" or {"type": "function", '
                            '"function": {"name": ...}}', code="invalid_value", param="tool_choice")
    return ToolRequest(functions, choice, parallel)


def _function(tool, i: int) -> dict:
    param = f"tools[{i}]"
    fn = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise APIError(422, f'{param} must be {{"type": "function", "function": {{"name", "description", '
                            f'"parameters"}}}}', code="invalid_value", param=param)
    params = fn.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise APIError(422, f"{param}.function.parameters must be a JSON schema (an object)",
                       code="invalid_value", param=f"{param}.function.parameters")
    desc = fn.get("description")
    out = {"name": fn["name"], **({"description": desc} if isinstance(desc, str) else {})}
    if params is not None:
        out["parameters"] = params
    return out


# ---- the prompt ------------------------------------------------------------------------------

def render_messages(msgs: list, tools: ToolRequest | None, template: str | None, content) -> tuple[list, list | None]:
    """The messages and ``tools`` to render the chat template with. ``msgs``: the request's
    messages (dicts with a string ``role``); ``content(c, i)``: message i's text (the server's
    check of ``content``)."""
    offered = tools.template_tools() if tools is not None else None
    native = template is not None and "tools" in template
    out = []
    for i, m in enumerate(msgs):
        calls = _calls_of(m, i) if m["role"] == "assistant" and m.get("tool_calls") else None
        text = "" if calls is not None and m.get("content") is None else content(m.get("content"), i)
        msg = {"role": m["role"], "content": text}
        if isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        if native:
            if calls is not None:
                msg["tool_calls"] = [{"id": c["id"], "type": "function", "function": c["function"]} for c in calls]
            if m["role"] == "tool" and isinstance(m.get("tool_call_id"), str):
                msg["tool_call_id"] = m["tool_call_id"]
        elif calls is not None:
            msg["content"] = "\n".join([text] * bool(text) + [_call_text(c["function"]) for c in calls])
        elif m["role"] == "tool":
            msg = {"role": "user", "content": f"<tool_response>\n{text}\n</tool_response>"}
        out.append(msg)
    if native or offered is None:
        return out, offered
    return _with_tools_in_system(out, offered), None


def _calls_of(m: dict, i: int) -> list:
    calls = m["tool_calls"]
    ok = isinstance(calls, list) and all(
        isinstance(c, dict) and isinstance(c.get("function"), dict) and isinstance(c["function"].get("name"), str)
        and isinstance(c["function"].get("arguments", "{}"), (str, dict)) for c in calls)
    if not ok:
        raise APIError(422, f"messages[{i}].tool_calls must be a list of {{\"id\", \"type\": \"function\", "
                            f"\"function\": {{\"name\", \"arguments\"}}}}", code="invalid_value",
                       param=f"messages[{i}].tool_calls")
    out = []
    for c in calls:
        args = c["function"].get("arguments", "{}")
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                raise APIError(422, f"messages[{i}].tool_calls: the arguments of {c['function']['name']!r:.60} "
                                    "are not JSON", code="invalid_value", param=f"messages[{i}].tool_calls") from None
        out.append({"id": c.get("id") if isinstance(c.get("id"), str) else "",
                    "function": {"name": c["function"]["name"], "arguments": args}})
    return out


def _call_text(function: dict) -> str:
    body = json.dumps({"name": function["name"], "arguments": function["arguments"]}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}\n{body}\n{TOOL_CALL_CLOSE}"


def _with_tools_in_system(msgs: list, tools: list) -> list:
    listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    text = ("# Tools\n\nYou may call one or more functions to answer the user. The functions are "
            f"described in JSON inside <tools></tools>:\n<tools>\n{listing}\n</tools>\n\n"
            "To call a function, answer with one JSON object per call, holding its name and its "
            f"arguments, inside {TOOL_CALL_OPEN}{TOOL_CALL_CLOSE} tags:\n"
            f'{TOOL_CALL_OPEN}\n{{"name": "<function name>", "arguments": {{<arguments>}}}}\n{TOOL_CALL_CLOSE}')
    if msgs and msgs[0]["role"] == "system":
        return [{**msgs[0], "content": msgs[0]["content"] + "\n\n" + text}, *msgs[1:]]
    return [{"role": "system", "content": text}, *msgs]
