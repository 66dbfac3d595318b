"""The server's edge: what a request may cost before kiln looks at what it asks.

Three bounds, each enforced before the next stage can be made to pay for more:

- the body is read in pieces and refused (413) once it passes ``max_body`` bytes, so a 200 MB
  upload costs at most ``max_body`` of memory and is never parsed;
- JSON nesting is bounded: Python's parser recurses, so a 100k-deep array stops it at the
  recursion limit (a 400, as is anything over ``MAX_DEPTH`` levels, found by one walk without
  recursion), and NaN/Infinity, which JSON does not have, are refused;
- a connection must deliver its request line and headers within ``read_timeout`` seconds of
  opening (or of its previous response), so sockets that trickle partial headers (slowloris)
  are closed instead of held forever; uvicorn's own keep-alive timeout only covers idle
  connections that send nothing.

Every refusal is an :class:`APIError`, answered in OpenAI's error shape by the app.
"""
from __future__ import annotations

import json
import re

#: default ``--max-body-size``: a full context of text, as JSON, fits many times over
MAX_BODY = 4 << 20
#: deepest JSON nesting a request may have; OpenAI's requests need 4 or 5 levels
MAX_DEPTH = 32
#: default ``--read-timeout`` in seconds, for the headers and again for the body
READ_TIMEOUT = 10.0
#: largest request line plus headers h11 buffers (its own default is 16 KiB)
MAX_HEADER_BYTES = 64 << 10


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "code": self.code,
                          "param": self.param}}


def too_large(size: str, limit: int) -> APIError:
    return APIError(413, f"the request body is {size} bytes; this server takes at most {limit} "
                         f"(--max-body-size)", code="request_too_large")


async def read_body(request, limit: int) -> bytes:
    """The request's body, refused once it passes ``limit`` bytes; the rest is never read."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(declared, limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(f"more than {limit}", limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def parse_json(raw: bytes, max_depth: int = MAX_DEPTH) -> dict:
    """The request's JSON object, or a 400 that says what is wrong with it (a 422 for text
    that is not Unicode)."""
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:                      # the C parser counts its depth against Python's limit
        raise _too_deep(max_depth) from None
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    _check_values(body, raw, max_depth)
    return body


def _too_deep(max_depth: int) -> APIError:
    return APIError(400, f"the request body nests deeper than {max_depth} levels", code="invalid_json")


# a surrogate's escape (\ud800-\udfff) or its CESU-8 bytes, which Python's parser lets through
_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")


def _check_values(body: dict, raw: bytes, max_depth: int) -> None:
    """Nesting at most ``max_depth`` levels, and no string that is not Unicode text (a lone
    surrogate, which no tokenizer can encode). One walk over the parsed body, without
    recursion, and only when the raw bytes leave a doubt: fewer brackets than ``max_depth``
    cannot nest deeper, and text without surrogate escapes cannot hold one."""
    text = _SURROGATE.search(raw) is not None
    if not text and raw.count(b"[") + raw.count(b"{") <= max_depth:
        return
    for field, value in body.items():
        if text and not _encodes(field):
            raise _not_text("a field name")
        stack = [(value, 1)]
        while stack:
            v, level = stack.pop()
            if isinstance(v, str):
                if text and not _encodes(v):
                    raise _not_text(field)
                continue
            if not isinstance(v, (dict, list)):
                continue
            if level + 1 > max_depth:
                raise _too_deep(max_depth)
            if isinstance(v, dict):
                if text and not all(_encodes(k) for k in v):
                    raise _not_text(field)
                v = v.values()
            stack.extend((x, level + 1) for x in v if isinstance(x, (str, dict, list)))


def _not_text(field: str) -> APIError:
    return APIError(422, f"{field} holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text",
                    code="invalid_value", param=field)


def _encodes(s: str) -> bool:
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


class _LingeringTransport:
    """The connection's transport, as uvicorn sees it, with a gentler ``close``: while the client
    is still sending a body that kiln refused, closing at once would make the kernel answer its
    next bytes with a reset, which can destroy the unread 413 on the client's side. Instead the
    response is followed by a FIN, whatever more arrives is dropped unread, and the socket
    closes when the client does or after ``LINGER`` seconds."""

    LINGER = 2.0

    def __init__(self, transport, loop, body_unread):
        self._t, self._loop, self._body_unread = transport, loop, body_unread
        self.lingering = False
        self._timer = None

    def __getattr__(self, name):
        return getattr(self._t, name)

    def is_closing(self) -> bool:
        return self.lingering or self._t.is_closing()

    def close(self) -> None:
        if self.lingering or self._t.is_closing():
            return
        if not self._body_unread() or not self._t.can_write_eof():
            self._t.close()
            return
        self.lingering = True
        self._t.write_eof()
        self._t.resume_reading()
        self._timer = self._loop.call_later(self.LINGER, self._t.close)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


def guarded_h11(read_timeout: float):
    """uvicorn's h11 protocol, closing a connection whose request line and headers take longer
    than ``read_timeout`` seconds to arrive (counted from the connection's opening, or from its
    previous response's end for the next request on a kept-alive connection), and closing a
    connection whose refused body is still arriving without destroying the refusal."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11(H11Protocol):
        _deadline = None

        def connection_made(self, transport):
            self._raw = transport
            super().connection_made(_LingeringTransport(
                transport, self.loop, lambda: self.conn.their_state is h11.SEND_BODY))
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self.transport.lingering:
                return                          # the rest of a refused body
            if self.conn.their_state is h11.IDLE:
                self._arm()                     # the first bytes of the next request
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._disarm()                  # its headers are in

        def connection_lost(self, exc):
            self._disarm()
            self.transport.cancel()
            super().connection_lost(exc)

        def _arm(self):
            if self._deadline is None:
                self._deadline = self.loop.call_later(read_timeout, self._expire)

        def _disarm(self):
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self):
            self._deadline = None
            if self.conn.their_state is h11.IDLE:
                self._raw.close()

    return GuardedH11
