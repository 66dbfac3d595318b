"""``POST /v1/embeddings``: OpenAI's embeddings endpoint over an embedding artifact.

The request as OpenAI defines it: ``input`` is a text, a list of texts, a list of token ids,
or a list of such lists (at most :data:`MAX_INPUTS`); ``encoding_format`` is ``float`` (lists
of numbers) or ``base64`` (each vector's little-endian float32 bytes, what the official
client asks for by default); ``dimensions``, when given, must be the model's own (kiln does
not shorten vectors). An input longer than the model's ``max_seq_length`` gets 413, as a
prompt longer than the context does on the completion endpoints. The answer is ``{"object": "list", "data": [{"object": "embedding",
"index", "embedding"}], "model", "usage": {"prompt_tokens", "total_tokens"}}``.
"""
from __future__ import annotations

import base64

import numpy as np

from . import embedding
from .http_limits import APIError

#: inputs one request may hold (OpenAI's own limit)
MAX_INPUTS = 2048


def _shown(v, limit: int = 40) -> str:
    r = repr(v)
    return r if len(r) <= limit else r[:limit] + "..."


def _inputs(body: dict) -> list:
    x = body.get("input")
    if x is None:
        raise APIError(422, "input is required: a text, a list of texts, token ids or lists of token ids",
                       code="invalid_value", param="input")
    if isinstance(x, str) or (isinstance(x, list) and x and embedding.is_token_ids(x)):
        x = [x]
    if not isinstance(x, list) or not x:
        raise APIError(422, f"input must be a text or a non-empty list, got {_shown(x)}", code="invalid_value",
                       param="input")
    if len(x) > MAX_INPUTS:
        raise APIError(422, f"input holds {len(x)} items; at most {MAX_INPUTS} per request", code="invalid_value",
                       param="input")
    for i, item in enumerate(x):
        if not (isinstance(item, str) or (isinstance(item, list) and embedding.is_token_ids(item))):
            raise APIError(422, f"input[{i}] must be a text or a list of token ids, got {_shown(item)}",
                           code="invalid_value", param="input")
        if not item:
            raise APIError(422, f"input[{i}] is empty", code="invalid_value", param="input")
    return x


def respond(service, body: dict) -> dict:
    """The response to one request (blocking: the app runs it off its event loop)."""
    model = service.model
    name = body.get("model")
    if name is not None and (not isinstance(name, str) or name not in service.names):
        raise APIError(404, f"the model {_shown(name)} does not exist; this server has {service.name!r}",
                       code="model_not_found", param="model")
    if getattr(model, "embedding", None) is None:
        raise APIError(400, f"{service.name!r} is not an embedding model; it answers /v1/completions and "
                            f"/v1/chat/completions", code="model_not_embedding", param="model")
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise APIError(422, f"encoding_format must be 'float' or 'base64', got {_shown(fmt)}", code="invalid_value",
                       param="encoding_format")
    dims = body.get("dimensions")
    if dims is not None and dims != model.session.dimension:
        raise APIError(422, f"dimensions must be this model's {model.session.dimension} (kiln does not shorten "
                            f"vectors), got {_shown(dims)}", code="invalid_value", param="dimensions")
    inputs = _inputs(body)
    try:
        rows = model.embedding_tokens(inputs)
    except embedding.TooLong as e:
        raise APIError(413, str(e), code="context_length_exceeded", param="input") from None
    except ValueError as e:
        raise APIError(422, str(e), code="invalid_value", param="input") from None
    vectors = model.embed(rows)
    data = [{"object": "embedding", "index": i,
             "embedding": [float(x) for x in v] if fmt == "float"
             else base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode("ascii")}
            for i, v in enumerate(vectors)]
    tokens = sum(len(r) for r in rows)
    return {"object": "list", "data": data, "model": service.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
