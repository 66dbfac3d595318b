"""``--api-key``: every request but the chat page and ``/health`` must carry ``Authorization:
Bearer KEY``, else it is answered 401 in OpenAI's error shape.

A plain ASGI middleware, not Starlette's ``@app.middleware("http")``: that one runs a streamed
response's body through a memory stream and a task of its own, which cost the event loop about
a third of its work per streamed token (measured with py-spy on one SmolLM2 stream), on the
same two cores as the model's threads. This passes ``send`` through untouched.
"""
from __future__ import annotations

import hmac

from .http_limits import APIError

#: what a browser or a load balancer fetches without the key: the static chat page (its API
#: calls carry the key) and the liveness probe
OPEN_PATHS = ("/", "/health")


class ApiKeyGate:
    def __init__(self, app, api_key: str):
        # headers arrive as bytes: compare them with the key's UTF-8 bytes, in constant time
        self.app, self.expected = app, f"Bearer {api_key}".encode("utf-8")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        if hmac.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        from starlette.responses import JSONResponse
        e = APIError(401, "invalid or missing API key", "authentication_error", code="invalid_api_key")
        scope.setdefault("state", {})["error"] = e.code       # for the request log
        await JSONResponse(e.body(), status_code=e.status)(scope, receive, send)
