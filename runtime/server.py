"""``kiln serve``: an OpenAI-compatible HTTP API over the continuous-batching scheduler.

This module only translates: JSON requests into :meth:`Scheduler.submit` calls (the chat
template and tokenizer of the model render and encode the prompt), the scheduler's events into
OpenAI responses and server-sent events, and every bad request into OpenAI's error JSON
``{"error": {"message", "type", "code"}}`` with a 4xx status. Generation itself lives in
:mod:`kiln.runtime.scheduler`.

Beyond OpenAI's settings: ``top_k``, ``min_p`` and ``repetition_penalty`` (transformers'
multiplicative penalty, llama.cpp's ``repeat_penalty``), and vLLM's ``min_tokens`` and
``ignore_eos`` (see :class:`~kiln.runtime.params.SamplingParams`). OpenAI's ``frequency_penalty`` and
``presence_penalty`` are applied as OpenAI defines them, after it; the two kinds do not convert
into each other (:mod:`kiln.runtime.sampling` says why). ``logprobs`` are of the model's raw
distribution (:mod:`kiln.runtime.logprobs`); ``n`` choices are ``n`` batch rows, choice ``i``
drawing from stream ``i`` of the seed.

FastAPI on uvicorn: both are widely used, maintained, and pinned in the ``serve`` extra.
"""

import asyncio
import functools
import os
import json
import logging
import threading
import time
import uuid
from importlib.resources import files
from pathlib import Path

from .api_key import ApiKeyGate
from .http_limits import MAX_BODY, MAX_HEADER_BYTES, READ_TIMEOUT, APIError, guarded_h11, parse_json, read_body
from .logprobs import TokenStrings, chat_logprobs, completion_logprobs
from .loop_mailbox import mailbox_for, settle_all
from .metrics import CONTENT_TYPE, ServerMetrics
from .params import InvalidParam, SamplingParams
from .prefix_cache import DEFAULT_MB, PrefixCache
from .response_format import request_grammar
from .scheduler import PREFILL_TARGET_S, QueueFull, Scheduler
from .tool_parser import ToolDeltas, assistant_message, reads_calls
from .tools import render_messages, tool_request

__all__ = ["APIError", "Service", "build", "create_app", "serve"]

log = logging.getLogger("kiln.serve")

# The chat page at GET /: one self-contained HTML file shipped in the package (package-data).
CHAT_PAGE = files("kiln.runtime") / "web" / "chat.html"

FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop", "error": "error",
          "abort": "length"}     # ended by a shutdown's deadline: cut short, as by max_tokens


#: The request's fields that are SamplingParams fields of the same name, with their default
#: and range: ``name: (kind, default, lo, hi, lo_open)`` (OpenAI's ranges where it has one;
#: ``bool``: true or false). A new request option is a field of SamplingParams and a line here.
SAMPLING_FIELDS = {
    "temperature": (float, 1.0, 0, 2, False),
    "top_p": (float, 1.0, 0, 1, True),
    "top_k": (int, 0, 0, None, False),
    "min_p": (float, 0.0, 0, 1, False),
    "repetition_penalty": (float, 1.0, 0, None, True),
    "frequency_penalty": (float, 0.0, -2, 2, False),
    "presence_penalty": (float, 0.0, -2, 2, False),
    "min_tokens": (int, 0, 0, None, False),           # vLLM's extensions
    "ignore_eos": (bool, False, None, None, False),
    "logit_bias": (dict, (), None, None, False),     # checked by SamplingParams
}

#: at most this many stop strings of at most STOP_CHARS characters each: every running row
#: searches its held-back text for each of them after every token, on the scheduler's thread
MAX_STOPS = 16
# between two decode steps the scheduler waits at most this long for the event loop to hand
# out the step's tokens (loop_mailbox.settle); a loop that is slower costs no more than this
SETTLE_S = 0.005
STOP_CHARS = 128


def _shown(v, limit: int = 40) -> str:
    """``repr(v)``, cut short: error messages echo what they refuse, not megabytes of it."""
    r = repr(v)
    return r if len(r) <= limit else r[:limit] + "..."


def _flag(body, name, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise APIError(422, f"{name} must be true or false, got {_shown(v)}", code="invalid_value", param=name)
    return v


def _number(body, name, default, kind=float, lo=None, hi=None, lo_open=False):
    v = body.get(name, default)
    if v is None:
        return default
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (kind is float or isinstance(v, int)
                                                                      or v.is_integer())
    if ok:
        try:
            v = kind(v)
        except OverflowError:                   # an integer of 400 digits is no float
            ok = False
        else:
            ok = (lo is None or (v > lo if lo_open else v >= lo)) and (hi is None or v <= hi)
    if not ok:
        rng = f" in {'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}]" if lo is not None else ""
        raise APIError(422, f"{name} must be {'an integer' if kind is int else 'a number'}{rng}, "
                            f"got {_shown(body.get(name))}",
                       code="invalid_value", param=name)
    return v


class Service:
    """The HTTP-independent half: request dicts in, scheduler requests and response dicts out.

    ``names`` are the model ids requests may name (the first is the one ``/v1/models`` lists).
    At most ``capacity`` choices are running or waiting at once (``--max-batch`` plus
    ``--max-queue``), counted here from acceptance to their last event: the scheduler's own
    queue also holds requests that free rows will take at its next step, so counting its
    ``waiting`` would turn some away while rows sit free.
    """

    def __init__(self, model, scheduler: Scheduler, name: str | list[str], capacity: int | None = None):
        self.names = [name] if isinstance(name, str) else list(name)
        if not self.names:
            raise ValueError("a served model needs at least one name")
        self.model, self.scheduler, self.name = model, scheduler, self.names[0]
        self.created = int(time.time())
        self.token_strings = TokenStrings(model.tokenizer)
        self.vocab = int(model.config["vocab_size"])
        self.capacity = scheduler.max_batch + scheduler.max_queue if capacity is None else int(capacity)
        self.in_flight = 0
        self._count_lock = threading.Lock()

    def settings(self, body: dict) -> SamplingParams:
        model = body.get("model")
        if model is not None and (not isinstance(model, str) or model not in self.names):
            raise APIError(404, f"the model {_shown(model)} does not exist; this server has {self.name!r}",
                           code="model_not_found", param="model")
        if body.get("stream") not in (None, True, False):
            raise APIError(422, f"stream must be true or false, got {_shown(body.get('stream'))}",
                           code="invalid_value", param="stream")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        limit = self.scheduler.max_length or 1 << 30
        max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", 16 if "messages" not in body else limit,
                             int, 0)
        stop = _stops(body.get("stop"))
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 64):
            raise APIError(422, f"seed must be an integer in [0, 2**64), got {_shown(seed)}", code="invalid_value",
                           param="seed")
        values = {name: _flag(body, name, default) if kind is bool else
                  (body.get(name) or default) if kind is dict else _number(body, name, default, kind, lo, hi, lo_open)
                  for name, (kind, default, lo, hi, lo_open) in SAMPLING_FIELDS.items()}
        try:
            params = SamplingParams(max_tokens=max_tokens, seed=seed, stop=stop, **values)
        except InvalidParam as e:
            raise APIError(422, str(e), code="invalid_value", param=e.param) from None
        if params.logit_bias and params.logit_bias[-1][0] >= self.vocab:
            raise APIError(422, f"logit_bias keys must be token ids in [0, {self.vocab})", code="invalid_value",
                           param="logit_bias")
        return params

    def prompt_ids(self, body: dict, chat: bool, tools=None) -> list[int]:
        tok = self.model.tokenizer
        limit = self.scheduler.max_length
        if chat:
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) for m in msgs):
                raise APIError(422, "messages must be a non-empty list of {role, content} objects",
                               code="invalid_value", param="messages")
            if tok is None:
                raise APIError(400, "this model has no tokenizer, so it cannot render chat messages",
                               code="unsupported_value", param="messages")
            # only the fields chat templates read, each of the type they expect; the tools
            # (kiln.runtime.tools) and the messages' tool calls and results
            msgs, template_tools = render_messages(msgs, tools, getattr(tok, "chat_template", None), _content)
            try:
                text = self.model.chat_prompt(msgs, **({"tools": template_tools} if template_tools else {}))
            except ValueError as e:             # ChatTemplateError: the template refused them
                raise APIError(422, str(e), code="invalid_value", param="messages") from None
            ids = tok.encode(text)
        else:
            p = body.get("prompt")
            if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
                p = p[0]
            if isinstance(p, str):
                if tok is None:
                    raise APIError(400, "this model has no tokenizer; send the prompt as token ids",
                                   code="unsupported_value", param="prompt")
                ids = tok.encode(p)
            elif isinstance(p, list) and p:
                if limit is not None and len(p) >= limit:
                    raise _too_long(len(p), limit, "prompt")
                ids = self.token_ids(p)
            else:
                raise APIError(422, "prompt must be a string or a list of token ids", code="invalid_value",
                               param="prompt")
        if not ids:
            raise APIError(422, "the prompt has no tokens", code="invalid_value", param="prompt")
        if limit is not None and len(ids) >= limit:
            raise _too_long(len(ids), limit, "messages" if chat else "prompt")
        return ids

    def token_ids(self, p: list) -> list[int]:
        """A prompt given as token ids: each an integer the model has an embedding for."""
        for i, t in enumerate(p):
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab:
                raise APIError(422, f"prompt token ids must be integers in [0, {self.vocab}); "
                                    f"prompt[{i}] is {_shown(t)}", code="invalid_value", param="prompt")
        return list(p)

    def choices(self, body: dict, chat: bool) -> tuple[int, int | None]:
        """``n`` and the number of top alternatives per token (None: no logprobs).

        Chat: ``logprobs: true`` with ``top_logprobs`` 0..20; completions: ``logprobs`` 0..5,
        OpenAI's ranges. ``n`` choices are ``n`` batch rows, so at most ``--max-batch``.
        """
        n = _number(body, "n", 1, int, 1)
        if n > self.scheduler.max_batch:
            raise APIError(400, f"n={_shown(n)} is more than this server runs at once (--max-batch "
                                f"{self.scheduler.max_batch})", code="unsupported_value", param="n")
        if not chat:
            return n, (None if body.get("logprobs") is None else _number(body, "logprobs", 0, int, 0, 5))
        want = body.get("logprobs")
        if want not in (None, True, False):
            raise APIError(422, f"logprobs must be true or false, got {_shown(want)}", code="invalid_value",
                           param="logprobs")
        top = body.get("top_logprobs")
        if top is not None:
            top = _number(body, "top_logprobs", 0, int, 0, 20)
            if not want:
                raise APIError(400, "top_logprobs needs logprobs: true", code="invalid_value",
                               param="top_logprobs")
        return n, (top or 0) if want else None

    def prepare(self, body: dict, chat: bool) -> dict:
        """Every check of the request, and its prompt's ids: what :meth:`submit` queues.

        Tokenizing (and rendering a chat template) may take a while for a long prompt, so the
        app runs this off its event loop; nothing here touches the scheduler."""
        if getattr(self.model, "embedding", None) is not None:
            raise APIError(400, f"{self.name!r} is an embedding model; it answers /v1/embeddings",
                           code="model_is_embedding", param="model")
        params = self.settings(body)
        n, logprobs = self.choices(body, chat)
        tools = tool_request(body) if chat else None
        # structured output (response_format, guided_regex, guided_grammar, grammar, tool_choice)
        grammar = request_grammar(body, self.model.tokenizer, self.vocab, tools)
        return dict(ids=self.prompt_ids(body, chat, tools), n=n, tools=tools,
                    params=SamplingParams.of(params, logprobs=logprobs, grammar=grammar))

    def submit(self, prepared: dict, on_event) -> list:
        """Queue the request's ``n`` choices; ``on_event(i, event)`` gets choice i's events.

        Choice i draws from stream i of the seed (see ``Scheduler.submit``'s
        ``sample_stream``), so choice 0 is what the same request with ``n=1`` gets.
        """
        n = prepared["n"]
        with self._count_lock:
            if self.in_flight + n > self.capacity:
                raise APIError(429, f"{self.in_flight} requests are running or waiting already (at most "
                                    f"{self.capacity}: --max-batch plus --max-queue)", "server_busy",
                               code="queue_full")
            self.in_flight += n

        def counted(i, ev):
            if ev.finish_reason is not None:
                with self._count_lock:
                    self.in_flight -= 1
            on_event(i, ev)
        reqs = []
        try:
            for i in range(n):
                reqs.append(self.scheduler.submit(prepared["ids"], params=prepared["params"],
                                                  on_event=functools.partial(counted, i), sample_stream=i))
        except (QueueFull, ValueError) as e:
            with self._count_lock:
                self.in_flight -= n - len(reqs)     # the queued ones count until they end
            for r in reqs:
                r.cancel()
            if isinstance(e, QueueFull):
                raise APIError(429, str(e), "server_busy", code="queue_full") from None
            raise APIError(422, str(e), code="invalid_value") from None
        return reqs

    @staticmethod
    def usage(reqs) -> dict:
        """The prompt counted once, every choice's tokens."""
        done = sum(r.completion_tokens for r in reqs)
        return {"prompt_tokens": reqs[0].prompt_tokens, "completion_tokens": done,
                "total_tokens": reqs[0].prompt_tokens + done}


def _too_long(n: int, limit: int, param: str) -> APIError:
    return APIError(413, f"the prompt has {n} tokens but this model's context holds {limit}",
                    code="context_length_exceeded", param=param)


def _stops(stop) -> list[str] | None:
    """``stop``: a string or a list of at most MAX_STOPS strings of 1..STOP_CHARS characters."""
    if stop is None or stop == "":
        return None
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise APIError(422, "stop must be a string or a list of non-empty strings", code="invalid_value",
                       param="stop")
    if len(stops) > MAX_STOPS:
        raise APIError(422, f"stop has {len(stops)} strings; at most {MAX_STOPS} are allowed",
                       code="invalid_value", param="stop")
    longest = max(len(s) for s in stops)
    if longest > STOP_CHARS:
        raise APIError(422, f"a stop string has {longest} characters; at most {STOP_CHARS} are allowed",
                       code="invalid_value", param="stop")
    return stops or None


def _content(c, i: int) -> str:
    """A message's text: a string, or a list of ``{"type": "text", "text": str}`` parts."""
    if isinstance(c, str):
        return c
    if isinstance(c, list) and all(isinstance(p, dict) and p.get("type", "text") == "text"
                                   and isinstance(p.get("text"), str) for p in c):
        return "".join(p["text"] for p in c)
    raise APIError(422, f"messages[{i}].content must be a string or a list of {{\"type\": \"text\", "
                        f"\"text\": string}} parts, got {_shown(c)}", code="invalid_value",
                   param=f"messages[{i}].content")


async def _client_gone(request) -> None:
    """Returns once the client of a request whose body was read has disconnected: a receive
    that waits, rather than Starlette's ``is_disconnected()``, which polls under an already
    cancelled scope and missed the disconnect behind an ``@app.middleware("http")`` layer."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(service: Service, api_key: str | None = None, *, max_body: int = MAX_BODY,
               read_timeout: float = READ_TIMEOUT):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="kiln", docs_url=None, redoc_url=None, openapi_url=None)

    def error(request, e: APIError):
        request.state.error = e.code
        # a refused body is left unread: the connection cannot carry another request
        closing = {"connection": "close"} if e.code in ("request_too_large", "request_timeout") else None
        return JSONResponse(e.body(), status_code=e.status, headers=closing)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error(request, e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        codes = {404: "not_found", 405: "method_not_allowed"}
        return error(request, APIError(e.status_code, str(e.detail), code=codes.get(e.status_code)))

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e):
        return error(request, APIError(422, "invalid request", code="invalid_value"))

    @app.exception_handler(Exception)
    async def _internal(request, e):
        log.warning("kiln: internal error in %s %s: %s: %s", request.method, request.url.path, type(e).__name__, e)
        return error(request, APIError(500, f"internal error: {type(e).__name__}", "server_error",
                                       code="internal_error"))

    if api_key is not None:
        app.add_middleware(ApiKeyGate, api_key=api_key)
    metrics = ServerMetrics(service.scheduler, routes=lambda: [getattr(r, "path", None) for r in app.routes])
    app.add_middleware(RequestLog, metrics=metrics)     # added last, so outermost: it sees the 401s too

    @app.get("/")
    async def chat_page():
        return HTMLResponse(CHAT_PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        s = service.scheduler
        return {"status": "ok", "running": s.active, "waiting": len(s.waiting)}

    @app.get("/metrics")
    async def prometheus_metrics():
        return PlainTextResponse(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": service.name, "object": "model",
                                            "created": service.created, "owned_by": "kiln"}]}

    async def body_of(request: Request) -> bytes:
        try:
            return await asyncio.wait_for(read_body(request, max_body), read_timeout)
        except asyncio.TimeoutError:
            raise APIError(408, f"the request body did not arrive within {read_timeout:g} s (--read-timeout)",
                           code="request_timeout") from None

    def parse_and_prepare(raw: bytes, chat: bool) -> tuple[dict, dict]:
        body = parse_json(raw)
        return body, service.prepare(body, chat)

    async def complete(request: Request, chat: bool):
        # parsing a 4 MB body, tokenizing it, rendering a chat template: off the event loop,
        # which carries every other stream's tokens
        body, prepared = await asyncio.to_thread(parse_and_prepare, await body_of(request), chat)
        mailbox = mailbox_for(asyncio.get_running_loop())
        events: asyncio.Queue = asyncio.Queue()

        def post(i, ev):                # on the scheduler's thread
            try:
                mailbox.put(events, (i, ev))
            except RuntimeError:        # the loop closed (a forced shutdown): nobody listens
                pass
        reqs = service.submit(prepared, post)
        n, want_logprobs = len(reqs), reqs[0].logprobs is not None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        request.state.rid, request.state.reqs = rid, reqs
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        model = body.get("model") or service.name       # the name (or alias) the client used

        def cancel():
            for r in reqs:
                r.cancel()              # a no-op once done; frees the row of a client gone away

        def logprobs(i: int, entries: list, start: int = 0) -> dict | None:
            """Choice i's logprobs of ``entries``, its tokens from number ``start`` on."""
            if not want_logprobs:
                return None
            if chat:
                return chat_logprobs(entries, service.token_strings)
            return completion_logprobs(entries, service.token_strings, reqs[i].ids[:start + len(entries)],
                                       start)

        def chunk(i: int, piece: str | None, finish: str | None, first: bool = False, lps=None,
                  usage: bool = False, delta: dict | None = None) -> str:
            if chat:
                delta = delta if delta is not None else {} if piece is None else {"content": piece}
                if first:
                    delta = {"role": "assistant", "content": ""}
                choice = {"index": i, "delta": delta, "logprobs": lps, "finish_reason": finish}
            else:
                choice = {"index": i, "text": piece or "", "logprobs": lps, "finish_reason": finish}
            out = {"id": rid, "object": kind + (".chunk" if chat else ""), "created": created,
                   "model": model, "choices": [choice]}
            if usage:
                out["usage"] = Service.usage(reqs)
            return f"data: {json.dumps(out)}\n\n"

        if body.get("stream"):
            async def sse():
                # a token whose text is held back (a possible stop string, a partial character)
                # sends its logprobs with the next piece of text, or alone before the finish
                pending: list[list] = [[] for _ in reqs]
                sent = [0] * n
                # with tools, text that may open a call waits; each call goes out whole
                calls = [ToolDeltas(prepared["tools"]) if chat and reads_calls(prepared.get("tools")) else None
                         for _ in reqs]

                def flush(i):
                    lps = logprobs(i, pending[i], sent[i])
                    sent[i] += len(pending[i])
                    pending[i] = []
                    return lps
                # a client that goes away cancels its requests, whose ends then close the stream
                # (one watcher per stream: a timed wait per token cost the loop a task each)
                gone = asyncio.ensure_future(_client_gone(request))
                gone.add_done_callback(lambda _: cancel())
                try:
                    if chat:
                        for i in range(n):
                            yield chunk(i, None, None, first=True)
                    left = n
                    while left:
                        i, ev = await events.get()
                        if ev.logprob is not None:
                            pending[i].append((ev.token, ev.logprob, ev.top_logprobs))
                        if ev.finish_reason is not None:
                            finish = FINISH[ev.finish_reason]
                            if calls[i] is not None:
                                for d in calls[i].finish():
                                    yield chunk(i, None, None, delta=d)
                                finish = calls[i].finish_reason(finish)
                            if pending[i]:
                                yield chunk(i, "", None, lps=flush(i))
                            left -= 1
                            yield chunk(i, None, finish, usage=not left)
                        elif ev.text and calls[i] is not None:
                            for d in calls[i].feed(ev.text):
                                yield chunk(i, None, None, lps=flush(i), delta=d)
                        elif ev.text:
                            yield chunk(i, ev.text, None, lps=flush(i))
                    yield "data: [DONE]\n\n"
                finally:
                    gone.cancel()
                    cancel()
            return StreamingResponse(sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        gone = asyncio.ensure_future(_client_gone(request))
        try:
            left = n
            while left:
                if gone.done():
                    cancel()            # the client went away: free its rows; their ends follow
                    _, ev = await events.get()
                else:
                    get = asyncio.ensure_future(events.get())
                    await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                    if not get.done():
                        get.cancel()    # an event not taken stays queued
                        continue
                    _, ev = get.result()
                left -= ev.finish_reason is not None
        finally:
            gone.cancel()
            cancel()
        choices = []
        for i, req in enumerate(reqs):
            text = "".join(req.text)
            finish = FINISH[req.finish_reason]
            if chat:
                message, finish = assistant_message(text, finish, prepared.get("tools"))
                choices.append({"index": i, "message": message,
                                "logprobs": logprobs(i, req.token_logprobs), "finish_reason": finish})
            else:
                choices.append({"index": i, "text": text, "logprobs": logprobs(i, req.token_logprobs),
                                "finish_reason": finish})
        return {"id": rid, "object": kind, "created": created, "model": model,
                "choices": choices, "usage": Service.usage(reqs)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        from .embeddings_api import respond
        raw = await body_of(request)
        return await asyncio.to_thread(lambda: respond(service, parse_json(raw)))

    return app


class RequestLog:
    """ASGI middleware: one log line per API request, when its response has ended (for a
    stream, after ``[DONE]`` or the client's going away): id, method, path, status, prompt and
    completion tokens, seconds, and the finish reasons or the error code. ``GET /health`` and
    the chat page log only when they fail. Every response is counted in ``metrics``."""

    def __init__(self, app, metrics: ServerMetrics | None = None):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        started, status = time.perf_counter(), None

        async def sending(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, sending)
        except BaseException:
            status = status or 500
            raise
        finally:
            if self.metrics is not None:
                self.metrics.http_response(scope["path"], status)
            if status is None or status >= 400 or scope["path"].startswith("/v1/"):
                log.info("%s", _log_line(scope, state, status, time.perf_counter() - started))


def _log_line(scope, state, status, seconds) -> str:
    reqs = state.get("reqs")
    tokens = ""
    if reqs:
        finish = ",".join(FINISH.get(r.finish_reason, r.finish_reason or "open") for r in reqs)
        tokens = (f" in={reqs[0].prompt_tokens} out={sum(r.completion_tokens for r in reqs)}"
                  f" finish={finish}")
    error = f" error={state['error']}" if state.get("error") else ""
    return (f"kiln: {state.get('rid', '-')} {scope['method']} {scope['path']} {status or '-'}{tokens}"
            f" {seconds:.3f}s{error}")


def build(artifact, *, max_batch: int = 8, max_queue: int = 64, api_key: str | None = None,
          threads: int | None = None, name: str | list[str] | None = None, max_body: int = MAX_BODY,
          read_timeout: float = READ_TIMEOUT, ctx_size: int | None = None,
          prefix_cache_mb: float = DEFAULT_MB, prefill_step_s: float | None = PREFILL_TARGET_S,
          draft=None, draft_tokens: int = 4):
    """The app and its running scheduler for an artifact folder.

    ``name``: the model's id (or ids, the first listed); default the folder's name.
    ``ctx_size``: the most tokens a request may hold, prompt and answer (default: the artifact's).
    ``prefix_cache_mb``: the prefix cache's budget in MiB (0: no prefix cache).
    ``prefill_step_s``: the time a long prompt's chunk aims at while other streams wait.
    ``draft``: a draft artifact for speculative decoding while one request runs alone."""
    from kiln import runtime

    from .context_size import limit
    model = runtime.load(artifact, threads=threads)
    limit(model.session, ctx_size)
    # a draft model's session, its vocabulary checked against the model's
    drafting = {} if draft is None else dict(draft=model.draft_session(runtime.load(draft, threads=threads)),
                                             draft_tokens=draft_tokens)
    # the service admits at most max_batch + max_queue; the scheduler's queue, which also holds
    # what free rows take at its next step, is sized so that it never refuses one of those
    sched = Scheduler(model.session, model.tokenizer, max_batch=max_batch, max_queue=max_queue + max_batch,
                      eos_ids=model.eos_ids, prefill_target_s=prefill_step_s,
                      prefix_cache=PrefixCache(int(prefix_cache_mb * 2**20)) if prefix_cache_mb else None,
                      **drafting)
    # KILN_SETTLE=0 turns the wait between steps off (for measuring what it is worth)
    if os.environ.get("KILN_SETTLE", "1") == "1":
        sched.between_steps = functools.partial(settle_all, SETTLE_S)
    sched.start()
    service = Service(model, sched, name or Path(artifact).name.removesuffix(".kiln"),
                      capacity=max_batch + max_queue)
    return create_app(service, api_key, max_body=max_body, read_timeout=read_timeout), service


def uvicorn_settings(read_timeout: float = READ_TIMEOUT) -> dict:
    """uvicorn's settings for kiln (for ``uvicorn.run`` or ``uvicorn.Config``): its h11 protocol
    with the header deadline and header-size limit of :mod:`kiln.runtime.http_limits`
    (uvicorn's httptools protocol, picked when installed, has neither)."""
    return dict(http=guarded_h11(read_timeout), h11_max_incomplete_event_size=MAX_HEADER_BYTES,
                log_level="warning")


def serve(artifact, *, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8, max_queue: int = 64,
          api_key: str | None = None, threads: int | None = None, names: list[str] | None = None,
          max_body: int = MAX_BODY, read_timeout: float = READ_TIMEOUT, shutdown_timeout: float = 10.0,
          ctx_size: int | None = None, prefix_cache_mb: float = DEFAULT_MB,
          prefill_step_s: float | None = PREFILL_TARGET_S, draft=None, draft_tokens: int = 4) -> None:
    import uvicorn

    from .shutdown import GracefulServer
    if not 0 <= shutdown_timeout < 1e6:
        raise ValueError(f"--shutdown-timeout must be a number of seconds >= 0, got {shutdown_timeout}")
    app, service = build(artifact, max_batch=max_batch, max_queue=max_queue, api_key=api_key, threads=threads,
                         name=names, max_body=max_body, read_timeout=read_timeout, ctx_size=ctx_size,
                         prefix_cache_mb=prefix_cache_mb, prefill_step_s=prefill_step_s, draft=draft,
                         draft_tokens=draft_tokens)
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    aliases = f" (also answers to {', '.join(map(repr, service.names[1:]))})" if service.names[1:] else ""
    print(f"kiln: serving {service.name!r}{aliases} on http://{host}:{port}/v1 (max batch {max_batch}); "
          f"chat page at http://{host}:{port}/", flush=True)
    # uvicorn's own graceful timeout only backs ours up: it cancels responses that did not end
    # (a client that stopped reading) a few seconds after the streams were ended
    server = GracefulServer(uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=shutdown_timeout + 5,
                                           **uvicorn_settings(read_timeout)),
                            service.scheduler, shutdown_timeout)
    try:
        server.run()
    finally:
        server.cancel_timers()
        service.scheduler.abort()           # nobody listens any more
        service.scheduler.stop(timeout=30)
