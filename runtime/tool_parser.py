"""Reads tool calls out of a model's answer: the Hermes / Qwen format, each call a JSON object
``{"name": ..., "arguments": {...}}`` between ``<tool_call>`` and ``</tool_call>``.

:class:`ToolCallParser` takes the answer's text as it streams and gives back what to send: text
(``content``) as soon as it cannot be the start of a call, and each call, whole, as soon as its
closing tag arrives (``arguments`` as a JSON string, as OpenAI sends them). Text between tags
that is not a call's JSON stays text, tags and all, so nothing the model wrote is lost. A call
left open at the end is still a call when its JSON is complete (models often end at EOS instead
of the closing tag).
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

    def __init__(self):
        self.buf = ""
        self.inside = False
        self.after_call = False         # the line break between two calls is not text
        self.calls: list[dict] = []

    def feed(self, piece: str) -> list[dict]:
        self.buf += piece
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


def _partial(text: str, tag: str) -> int:
    """How many characters at the end of ``text`` may begin ``tag``."""
    for k in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


def parse_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """A whole answer's text (None when it is only calls, or empty beside them) and its calls."""
    p = ToolCallParser()
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
    content, calls = parse_tool_calls(text)
    if not calls:
        return {"role": "assistant", "content": text}, finish
    return {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls" if finish == "stop" else finish


class ToolDeltas:
    """A streamed chat choice's deltas when its request offers tools: ``{"content"}`` pieces and
    ``{"tool_calls": [{"index", "id", "type", "function"}]}``, one whole call each."""

    def __init__(self):
        self.parser = ToolCallParser()

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
