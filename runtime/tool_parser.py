"""Reads tool calls out of a model's answer: the Hermes / Qwen format, each call a JSON object
``{"name": ..., "arguments": {...}}`` between ``<tool_call>`` and ``</tool_call>``.

:class:`ToolCallParser` takes the answer's text as it streams and gives back what to send: text
(``content``) as soon as it cannot be the start of a call, and each call, whole, as soon as its
closing tag arrives (``arguments`` as a JSON string, as OpenAI sends them). Text between tags
that is not a call's JSON stays text, tags and all, so nothing the model wrote is lost. A call
left open at the end is still a call when its JSON is complete (models often end at EOS instead
of the closing tag).

Llama 3.1's and Mistral's formats are also read: their markers (``<|python_tag|>``,
``[TOOL_CALLS]``) are special tokens, absent from the decoded text, which leaves an answer that
is wholly a JSON object ``{"name", "parameters"}`` (Llama) or an array of ``{"name",
"arguments"}`` (Mistral). Such an answer is calls only when every name is one of the request's
functions (so a JSON answer about a person named "Ada" stays text); when tools are offered, an
answer that starts with ``{`` or ``[`` is therefore held back until it ends.
"""
from __future__ import annotations

import json
import uuid

from .tools import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

__all__ = ["ToolCallParser", "parse_tool_calls"]


class ToolCallParser:
    """One choice's answer, fed piece by piece (``feed``), then ``finish``. Both return a list
    of deltas: ``{"content": str}`` or ``{"tool_call": {"id", "type", "function": {"name",
    "arguments"}}}``. ``calls`` holds every call found."""

    def __init__(self, names=()):
        self.buf = ""
        self.inside = False
        self.after_call = False         # the line break between two calls is not text
        self.calls: list[dict] = []
        self.names = set(names)         # the functions a bare JSON answer may call
        self.bare: bool | None = None   # whether the answer may be bare JSON (None: no text yet)

    def feed(self, piece: str) -> list[dict]:
        self.buf += piece
        if self.bare is None and self.buf.strip():
            self.bare = bool(self.names) and self.buf.lstrip()[0] in "{["
        if self.bare is not False:
            return []                   # no text yet, or maybe bare JSON calls: wait for the end
        out = []
        while True:
            if self.after_call and self.buf:
                self.buf = self.buf.removeprefix("\n")
                self.after_call = False
            if not self.inside:
                at = self.buf.find(TOOL_CALL_OPEN)
                if at < 0:
                    keep = _partial(self.buf, TOOL_CALL_OPEN)
                    self._text(out, self.buf[:len(self.buf) - keep])
                    self.buf = self.buf[len(self.buf) - keep:]
                    return out
                self._text(out, self.buf[:at])
                self.buf, self.inside = self.buf[at + len(TOOL_CALL_OPEN):], True
            end = self.buf.find(TOOL_CALL_CLOSE)
            if end < 0:
                return out
            body, self.buf, self.inside = self.buf[:end], self.buf[end + len(TOOL_CALL_CLOSE):], False
            self.after_call = self._call(out, body, closed=True)

    def finish(self) -> list[dict]:
        if self.bare is not False:
            calls = _bare_calls(self.buf, self.names)
            if calls:
                self.calls, self.buf = calls, ""
                return [{"tool_call": c} for c in calls]
            self.bare = False
            out = self.feed("")
        else:
            out = []
        if self.inside:
            self._call(out, self.buf, closed=False)
        else:
            self._text(out, self.buf)
        self.buf, self.inside = "", False
        return out

    def _text(self, out: list, text: str) -> None:
        if text:
            out.append({"content": text})

    def _call(self, out: list, body: str, closed: bool) -> bool:
        """Whether ``body`` was a call (else it goes out as text, tags and all)."""
        call = _call_of(body)
        if call is None:
            self._text(out, TOOL_CALL_OPEN + body + (TOOL_CALL_CLOSE if closed else ""))
            return False
        self.calls.append(call)
        out.append({"tool_call": call})
        return True


def _call_of(body: str) -> dict | None:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
            "function": {"name": obj["name"],
                         "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}}


def _bare_calls(text: str, names: set) -> list[dict]:
    """The calls of an answer that is wholly a call object or an array of them, every one
    naming a function of ``names``; [] otherwise."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return []
    items = obj if isinstance(obj, list) else [obj]
    calls = [_call_of(json.dumps(o)) if isinstance(o, dict) else None for o in items]
    if not calls or any(c is None or c["function"]["name"] not in names for c in calls):
        return []
    return calls


def _partial(text: str, tag: str) -> int:
    """How many characters at the end of ``text`` may begin ``tag``."""
    for k in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


def parse_tool_calls(text: str, names=()) -> tuple[str | None, list[dict]]:
    """A whole answer's text (None when it is only calls, or empty beside them) and its calls
    (``names``: the request's functions, which bare JSON calls must name)."""
    p = ToolCallParser(names)
    deltas = p.feed(text) + p.finish()
    content = "".join(d["content"] for d in deltas if "content" in d)
    if p.calls and not content.strip():
        content = None
    return content, p.calls


# ---- the server's shapes ---------------------------------------------------------------------

def reads_calls(tools) -> bool:
    """Whether a request's answers are read for tool calls (it offers tools, not with "none")."""
    return tools is not None and tools.choice != "none"


def assistant_message(text: str, finish: str, tools) -> tuple[dict, str]:
    """A chat choice's ``message`` and ``finish_reason`` ("tool_calls" when it called one)."""
    if not reads_calls(tools):
        return {"role": "assistant", "content": text}, finish
    content, calls = parse_tool_calls(text, tools.names)
    if not calls:
        return {"role": "assistant", "content": text}, finish
    return {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls" if finish == "stop" else finish


class ToolDeltas:
    """A streamed chat choice's deltas when its request offers tools: ``{"content"}`` pieces and
    ``{"tool_calls": [{"index", "id", "type", "function"}]}``, one whole call each."""

    def __init__(self, tools=None):
        self.parser = ToolCallParser(tools.names if tools is not None else ())

    def feed(self, piece: str) -> list[dict]:
        return [self._delta(d) for d in self.parser.feed(piece)]

    def finish(self) -> list[dict]:
        return [self._delta(d) for d in self.parser.finish()]

    def finish_reason(self, finish: str) -> str:
        return "tool_calls" if self.parser.calls and finish == "stop" else finish

    def _delta(self, d: dict) -> dict:
        if "content" in d:
            return d
        call = d["tool_call"]
        return {"tool_calls": [{"index": self.parser.calls.index(call), **call}]}
