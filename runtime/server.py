"""``kiln serve``: an OpenAI-compatible HTTP API over the continuous-batching scheduler.

This module only translates: JSON requests into :meth:`Scheduler.submit` calls (the chat
template and tokenizer of the model render and encode the prompt), the scheduler's events into
OpenAI responses and server-sent events, and every bad request into OpenAI's error JSON
``{"error": {"message", "type", "code"}}`` with a 4xx status. Generation itself lives in
:mod:`kiln.runtime.scheduler`.

Beyond OpenAI's settings: ``top_k``, ``min_p`` and ``repetition_penalty`` (transformers'
multiplicative penalty, llama.cpp's ``repeat_penalty``). OpenAI's ``frequency_penalty`` and
``presence_penalty`` are applied as OpenAI defines them, after it; the two kinds do not convert
into each other (:mod:`kiln.runtime.sampling` says why). ``logprobs`` are of the model's raw
distribution (:mod:`kiln.runtime.logprobs`); ``n`` choices are ``n`` batch rows, choice ``i``
drawing from stream ``i`` of the seed.

FastAPI on uvicorn: both are widely used, maintained, and pinned in the ``serve`` extra.
"""

import asyncio
import functools
import json
import time
import uuid
from importlib.resources import files
from pathlib import Path

from .logprobs import TokenStrings, chat_logprobs, completion_logprobs
from .scheduler import QueueFull, Scheduler

# The chat page at GET /: one self-contained HTML file shipped in the package (package-data).
CHAT_PAGE = files("kiln.runtime") / "web" / "chat.html"

FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop", "error": "error",
          "abort": "length"}     # ended by a shutdown's deadline: cut short, as by max_tokens


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "code": self.code,
                          "param": self.param}}


def _number(body, name, default, kind=float, lo=None, hi=None, lo_open=False):
    v = body.get(name, default)
    if v is None:
        return default
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (kind is float or float(v).is_integer())
    if ok:
        v = kind(v)
        ok = (lo is None or (v > lo if lo_open else v >= lo)) and (hi is None or v <= hi)
    if not ok:
        rng = f" in {'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}]" if lo is not None else ""
        raise APIError(422, f"{name} must be {'an integer' if kind is int else 'a number'}{rng}, got {body.get(name)!r}",
                       code="invalid_value", param=name)
    return v


class Service:
    """The HTTP-independent half: request dicts in, scheduler requests and response dicts out."""

    def __init__(self, model, scheduler: Scheduler, name: str):
        self.model, self.scheduler, self.name = model, scheduler, name
        self.created = int(time.time())
        self.token_strings = TokenStrings(model.tokenizer)

    def settings(self, body: dict) -> dict:
        if body.get("model") not in (None, self.name):
            raise APIError(404, f"the model {body.get('model')!r} does not exist; this server has {self.name!r}",
                           code="model_not_found", param="model")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        limit = self.scheduler.max_length or 1 << 30
        max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", 16 if "messages" not in body else limit,
                             int, 0)
        stop = body.get("stop")
        if stop is not None and not (isinstance(stop, str) or (isinstance(stop, list) and all(
                isinstance(s, str) and s for s in stop))):
            raise APIError(422, "stop must be a string or a list of strings", code="invalid_value", param="stop")
        if isinstance(stop, str) and not stop:
            stop = None
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise APIError(422, f"seed must be a non-negative integer, got {seed!r}", code="invalid_value",
                           param="seed")
        return dict(max_tokens=max_tokens,
                    temperature=_number(body, "temperature", 1.0, float, 0, 2),
                    top_p=_number(body, "top_p", 1.0, float, 0, 1, lo_open=True),
                    top_k=_number(body, "top_k", 0, int, 0),
                    min_p=_number(body, "min_p", 0.0, float, 0, 1),
                    repetition_penalty=_number(body, "repetition_penalty", 1.0, float, 0, lo_open=True),
                    frequency_penalty=_number(body, "frequency_penalty", 0.0, float, -2, 2),
                    presence_penalty=_number(body, "presence_penalty", 0.0, float, -2, 2),
                    seed=seed, stop=stop or None)

    def prompt_ids(self, body: dict, chat: bool) -> list[int]:
        tok = self.model.tokenizer
        if chat:
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) for m in msgs):
                raise APIError(422, "messages must be a non-empty list of {role, content} objects",
                               code="invalid_value", param="messages")
            if tok is None:
                raise APIError(400, "this model has no tokenizer, so it cannot render chat messages",
                               code="unsupported_value", param="messages")
            msgs = [{**m, "content": _content(m.get("content"))} for m in msgs]
            ids = tok.encode(self.model.chat_prompt(msgs))
        else:
            p = body.get("prompt")
            if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
                p = p[0]
            if isinstance(p, str):
                if tok is None:
                    raise APIError(400, "this model has no tokenizer; send the prompt as token ids",
                                   code="unsupported_value", param="prompt")
                ids = tok.encode(p)
            elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                ids = list(p)
            else:
                raise APIError(422, "prompt must be a string or a list of token ids", code="invalid_value",
                               param="prompt")
        if not ids:
            raise APIError(422, "the prompt has no tokens", code="invalid_value", param="prompt")
        limit = self.scheduler.max_length
        if limit is not None and len(ids) >= limit:
            raise APIError(413, f"the prompt has {len(ids)} tokens but this model's context holds {limit}",
                           code="context_length_exceeded", param="messages" if chat else "prompt")
        return ids

    def choices(self, body: dict, chat: bool) -> tuple[int, int | None]:
        """``n`` and the number of top alternatives per token (None: no logprobs).

        Chat: ``logprobs: true`` with ``top_logprobs`` 0..20; completions: ``logprobs`` 0..5,
        OpenAI's ranges. ``n`` choices are ``n`` batch rows, so at most ``--max-batch``.
        """
        n = _number(body, "n", 1, int, 1)
        if n > self.scheduler.max_batch:
            raise APIError(400, f"n={n} is more than this server runs at once (--max-batch "
                                f"{self.scheduler.max_batch})", code="unsupported_value", param="n")
        if not chat:
            return n, (None if body.get("logprobs") is None else _number(body, "logprobs", 0, int, 0, 5))
        want = body.get("logprobs")
        if want not in (None, True, False):
            raise APIError(422, f"logprobs must be true or false, got {want!r}", code="invalid_value",
                           param="logprobs")
        top = body.get("top_logprobs")
        if top is not None:
            top = _number(body, "top_logprobs", 0, int, 0, 20)
            if not want:
                raise APIError(400, "top_logprobs needs logprobs: true", code="invalid_value",
                               param="top_logprobs")
        return n, (top or 0) if want else None

    def submit(self, body: dict, chat: bool, on_event) -> list:
        """Queue the request's ``n`` choices; ``on_event(i, event)`` gets choice i's events.

        Choice i draws from stream i of the seed (see ``Scheduler.submit``'s
        ``sample_stream``), so choice 0 is what the same request with ``n=1`` gets.
        """
        settings = self.settings(body)
        n, logprobs = self.choices(body, chat)
        ids = self.prompt_ids(body, chat)
        reqs = []
        try:
            for i in range(n):
                reqs.append(self.scheduler.submit(ids, on_event=functools.partial(on_event, i),
                                                  logprobs=logprobs, sample_stream=i, **settings))
        except (QueueFull, ValueError) as e:
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


def _content(c) -> str:
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        return "".join(p.get("text", "") for p in c if isinstance(p, dict))
    return "" if c is None else str(c)


async def _client_gone(request) -> None:
    """Returns once the client of a request whose body was read has disconnected. Starlette's
    ``is_disconnected()`` never sees it through an http middleware (it polls under a cancelled
    scope, and the middleware's receive always checkpoints); a receive that waits does."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(service: Service, api_key: str | None = None):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="kiln", docs_url=None, redoc_url=None, openapi_url=None)

    def error(e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        codes = {404: "not_found", 405: "method_not_allowed"}
        return error(APIError(e.status_code, str(e.detail), code=codes.get(e.status_code)))

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e):
        return error(APIError(422, "invalid request", code="invalid_value"))

    @app.exception_handler(Exception)
    async def _internal(request, e):
        return error(APIError(500, f"internal error: {type(e).__name__}", "server_error", code="internal_error"))

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        # the chat page is static; the API calls it makes carry the key
        if api_key is not None and request.url.path not in ("/health", "/"):
            given = request.headers.get("authorization", "")
            if given != f"Bearer {api_key}":
                return error(APIError(401, "invalid or missing API key", "authentication_error",
                                      code="invalid_api_key"))
        return await call_next(request)

    @app.get("/")
    async def chat_page():
        return HTMLResponse(CHAT_PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        s = service.scheduler
        return {"status": "ok", "running": s.active, "waiting": len(s.waiting)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": service.name, "object": "model",
                                            "created": service.created, "owned_by": "kiln"}]}

    async def body_of(request: Request) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise APIError(400, "the request body is not valid JSON", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        return body

    async def complete(request: Request, chat: bool):
        body = await body_of(request)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def post(i, ev):                # on the scheduler's thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, (i, ev))
            except RuntimeError:        # the loop closed (a forced shutdown): nobody listens
                pass
        reqs = service.submit(body, chat, post)
        n, want_logprobs = len(reqs), reqs[0].logprobs is not None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"

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

        async def next_event():
            # wakes up now and then to notice a client that went away
            while True:
                try:
                    return await asyncio.wait_for(events.get(), 0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        cancel()
                        raise asyncio.CancelledError from None

        def chunk(i: int, piece: str | None, finish: str | None, first: bool = False, lps=None,
                  usage: bool = False) -> str:
            if chat:
                delta = {} if piece is None else {"content": piece}
                if first:
                    delta = {"role": "assistant", "content": ""}
                choice = {"index": i, "delta": delta, "logprobs": lps, "finish_reason": finish}
            else:
                choice = {"index": i, "text": piece or "", "logprobs": lps, "finish_reason": finish}
            out = {"id": rid, "object": kind + (".chunk" if chat else ""), "created": created,
                   "model": service.name, "choices": [choice]}
            if usage:
                out["usage"] = Service.usage(reqs)
            return f"data: {json.dumps(out)}\n\n"

        if body.get("stream"):
            async def sse():
                # a token whose text is held back (a possible stop string, a partial character)
                # sends its logprobs with the next piece of text, or alone before the finish
                pending: list[list] = [[] for _ in reqs]
                sent = [0] * n

                def flush(i):
                    lps = logprobs(i, pending[i], sent[i])
                    sent[i] += len(pending[i])
                    pending[i] = []
                    return lps
                try:
                    if chat:
                        for i in range(n):
                            yield chunk(i, None, None, first=True)
                    left = n
                    while left:
                        i, ev = await next_event()
                        if ev.logprob is not None:
                            pending[i].append((ev.token, ev.logprob, ev.top_logprobs))
                        if ev.finish_reason is not None:
                            if pending[i]:
                                yield chunk(i, "", None, lps=flush(i))
                            left -= 1
                            yield chunk(i, None, FINISH[ev.finish_reason], usage=not left)
                        elif ev.text:
                            yield chunk(i, ev.text, None, lps=flush(i))
                    yield "data: [DONE]\n\n"
                finally:
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
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "logprobs": logprobs(i, req.token_logprobs), "finish_reason": finish})
            else:
                choices.append({"index": i, "text": text, "logprobs": logprobs(i, req.token_logprobs),
                                "finish_reason": finish})
        return {"id": rid, "object": kind, "created": created, "model": service.name,
                "choices": choices, "usage": Service.usage(reqs)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    return app


def build(artifact, *, max_batch: int = 8, max_queue: int = 64, api_key: str | None = None,
          threads: int | None = None, name: str | None = None):
    """The app and its running scheduler for an artifact folder."""
    from kiln import runtime
    model = runtime.load(artifact, threads=threads)
    sched = Scheduler(model.session, model.tokenizer, max_batch=max_batch, max_queue=max_queue,
                      eos_ids=model.eos_ids).start()
    service = Service(model, sched, name or Path(artifact).name.removesuffix(".kiln"))
    return create_app(service, api_key), service


def serve(artifact, *, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8, max_queue: int = 64,
          api_key: str | None = None, threads: int | None = None, shutdown_timeout: float = 10.0) -> None:
    import uvicorn

    from .shutdown import GracefulServer
    if not 0 <= shutdown_timeout < 1e6:
        raise ValueError(f"--shutdown-timeout must be a number of seconds >= 0, got {shutdown_timeout}")
    app, service = build(artifact, max_batch=max_batch, max_queue=max_queue, api_key=api_key, threads=threads)
    print(f"kiln: serving {service.name!r} on http://{host}:{port}/v1 (max batch {max_batch}); "
          f"chat page at http://{host}:{port}/", flush=True)
    # uvicorn's own graceful timeout only backs ours up: it cancels responses that did not end
    # (a client that stopped reading) a few seconds after the streams were ended
    server = GracefulServer(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                           timeout_graceful_shutdown=shutdown_timeout + 5),
                            service.scheduler, shutdown_timeout)
    try:
        server.run()
    finally:
        server.cancel_timers()
        service.scheduler.abort()           # nobody listens any more
        service.scheduler.stop(timeout=30)
