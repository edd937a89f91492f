"""Endpoints the hub serves itself, passed through: GET /v1/models (and one model) and
POST /v1/chat/completions.

The caller is authenticated like on every other route (an API key when keys are configured);
the hub gets the router's own hub credentials and the request id, never the caller's key. A
tenant with models of its own (``--tenant-models``, router_svc.auth) is listed only those and may
name no other, here as on every route that calls the hub. A chat completion goes to the hub byte
for byte and comes back unchanged, streamed (server-sent events, relayed as they arrive) or whole.
A hub failure before the answer starts is an error in OpenAI's shape, mapped as for every hub call
(502 upstream_*, 504 upstream_timeout, 429, 400 context_length_exceeded); once a stream has
started its status cannot change, so a failure ends it with an ``error`` event, which the openai
SDK raises as an APIError.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from typing import cast

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from router_svc import auth, errors
from router_svc.http import JSONResponse, read_json, services, tenant
from router_svc.routes.responses import OPEN_STREAMS, SSE_HEADERS

log = logging.getLogger(__name__)

JSON = "application/json"


async def list_models(request: Request) -> Response:
    """The hub's list; for a tenant with models of its own (--tenant-models), only those."""
    svc = services(request)
    allowed = svc.auth.models_of(tenant(request))
    listing = await svc.hub.get_json("/models")
    data = listing.get("data")
    if allowed is not None and isinstance(data, list):
        kept = [e for e in data if isinstance(e, dict) and e.get("id") in allowed]
        listing = {**listing, "data": kept}
    return JSONResponse(listing)


async def retrieve_model(request: Request) -> Response:
    """One model of the hub's list (every hub lists its models; not every hub serves one)."""
    svc = services(request)
    model = request.path_params["model"]
    svc.auth.check_model(tenant(request), model)
    listing = await svc.hub.get_json("/models")
    data = listing.get("data")
    for entry in data if isinstance(data, list) else []:
        if isinstance(entry, dict) and entry.get("id") == model:
            return JSONResponse(entry)
    raise auth.model_not_found(model)


async def chat_completions(request: Request) -> Response:
    svc = services(request)
    who = tenant(request)
    body = await read_json(request)  # a JSON object within the size limit, or a 4xx
    model = body.get("model")
    svc.auth.check_model(who, model if isinstance(model, str) else "")
    raw = await request.body()
    if body.get("stream") is not True:
        return Response(await svc.hub.forward("/chat/completions", raw), media_type=JSON)
    chunks = cast(AsyncGenerator[bytes, None], svc.hub.forward_stream("/chat/completions", raw))
    try:
        # The hub's status is known (and a failure answered as such) before ours is sent.
        first = await anext(chunks)
    except StopAsyncIteration:
        first = b""
    return StreamingResponse(
        _relay(first, chunks), media_type="text/event-stream", headers=SSE_HEADERS
    )


async def _relay(first: bytes, rest: AsyncGenerator[bytes, None]) -> AsyncGenerator[bytes, None]:
    OPEN_STREAMS.inc()
    try:
        if first:
            yield first
        async for chunk in rest:
            yield chunk
    except errors.ApiError as exc:
        # Already answered 200: say it in the stream, as OpenAI-compatible servers do.
        log.warning("chat completion stream broke off", extra={"code": exc.code})
        yield b"\n\ndata: " + orjson.dumps(exc.body()) + b"\n\n"
    finally:
        OPEN_STREAMS.dec()
        await rest.aclose()  # the hub's answer, when the client left before its end


routes = [
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model:path}", retrieve_model, methods=["GET"]),
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
]
