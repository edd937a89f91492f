"""The Responses API: POST /v1/responses and the stored-response endpoints."""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection, Iterable
from typing import Any

import orjson
from prometheus_client import Gauge
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from gateway import gctune
from router_svc import (
    background,
    compaction,
    errors,
    idempotency,
    include,
    state_records,
    stored_json,
    streaming,
    turn,
    validate,
)
from router_svc.events import SSE_DONE, json_slices, sse_encode, sse_slices
from router_svc.http import (
    EventStream,
    JSONResponse,
    Releasing,
    check_item_ids,
    conversation_locks,
    idempotency_key,
    list_page,
    parse_json,
    query_int,
    query_limit,
    query_order,
    read_body,
    sdk_attempt,
    services,
    stream_slots,
    tenant,
)
from router_svc.replay import stored_stream_iter
from router_svc.services import Services
from router_svc.shapes import ResponseObject

OPEN_STREAMS = Gauge("respgw_router_open_streams", "Streaming responses being sent right now.")

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


async def create_response(request: Request) -> Response:
    svc = services(request)
    who = tenant(request)
    raw = await read_body(request)
    req = validate.parse_turn_request(
        parse_json(raw),
        default_model=svc.settings.default_model,
        strict_params=svc.settings.strict_params,
    )
    svc.auth.check_model(who, req.model)
    svc.dialect.refuse(req)
    check_item_ids(req.input_items, "input")
    ident = idempotency.identify(
        who, raw, req.body, idempotency_key(request), sdk_attempt(request), store=req.store
    )
    if not req.stream:
        return await _create(request, svc, who, req, ident)
    slots = stream_slots(request)
    slots.take(who)
    try:
        answer = await _create(request, svc, who, req, ident)
    except BaseException:
        slots.give(who)
        raise
    return Releasing(answer, lambda: slots.give(who))


async def _create(
    request: Request,
    svc: Services,
    who: str,
    req: validate.TurnRequest,
    ident: idempotency.Identity,
) -> Response:
    if ident.lookup:
        first = await idempotency.find_first(svc, who, ident)
        if first is not None:
            if req.stream:
                return _sse(_replay(first, -1, asked=req.include))
            return JSONResponse(include.response(first, req.include))
    held = not req.background and (
        req.conversation_id is not None or (req.stream and ident.kind == "retry")
    )
    if held:
        # Answered only once stored: see streaming.settle.
        lock = None
        if req.stream and req.conversation_id is not None:
            lock = conversation_locks(request).hold((who, req.conversation_id))
        t, answer = await streaming.settle(
            svc, req, tenant=who, ident=ident, headers=request.headers, lock=lock
        )
        if isinstance(answer, dict):
            return Response(t.json_of(answer), media_type="application/json", headers=t.headers())
        return _sse(_sent(answer), t.headers())
    t = await turn.begin(svc, req, tenant=who, ident=ident, headers=request.headers)
    if req.background and not req.stream:
        accepted = await background.start(svc, t, request.headers)
        return JSONResponse(include.response(accepted, req.include), headers=t.headers())
    if req.background:
        # A durable job: retrievable (as queued) from the start, streamed from its event log.
        return _sse(await background.open_stream(svc, t, request.headers), t.headers())
    if req.stream:
        return _sse(await streaming.open_stream(svc, t), t.headers())
    answered = await turn.complete(svc, t)
    return Response(t.json_of(answered), media_type="application/json", headers=t.headers())


async def _sent(chunks: Iterable[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


def _sse(body: AsyncIterator[bytes], headers: dict[str, str] | None = None) -> StreamingResponse:
    return EventStream(
        _counted(body), media_type="text/event-stream", headers={**SSE_HEADERS, **(headers or {})}
    )


async def _counted(body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    OPEN_STREAMS.inc()
    try:
        async for chunk in body:
            yield chunk
    finally:
        OPEN_STREAMS.dec()


async def _replay(
    response: ResponseObject,
    starting_after: int,
    events: list[dict[str, Any]] | None = None,
    *,
    asked: Collection[str] = (),
) -> AsyncIterator[bytes]:
    # One event at a time: a long answer's log stands for a hundred thousand of them; the
    # others (.done and terminal events, each holding the answer) a slice at a time.
    for event in include.events(stored_stream_iter(response, events), response, asked):
        if int(event["sequence_number"]) > starting_after:
            if event["type"].endswith(".delta"):
                yield sse_encode(event)
            else:
                for piece in sse_slices(event):
                    yield piece
    yield SSE_DONE


async def compact_response(request: Request) -> Response:
    """POST /v1/responses/compact: the caller's user messages and one compaction item holding
    the served model's summary of the history (router_svc.compaction). Nothing is stored."""
    svc = services(request)
    who = tenant(request)
    req = compaction.compact_request(
        parse_json(await read_body(request)),
        default_model=svc.settings.default_model,
    )
    svc.auth.check_model(who, req.model)
    svc.dialect.refuse(req)
    check_item_ids(req.input_items, "input")
    t = await turn.begin(svc, req, tenant=who, headers=request.headers)
    return JSONResponse(await compaction.compact(svc, t))


async def _stored(request: Request) -> tuple[str, str, state_records.GetResponseReply]:
    svc = services(request)
    who = tenant(request)
    response_id = request.path_params["response_id"]
    reply = await svc.state.get_response(state_records.get_response(who, response_id=response_id))
    return who, response_id, reply


async def get_response(request: Request) -> Response:
    asked = include.from_query(request)
    streamed = request.query_params.get("stream", "false").lower() == "true"
    after = query_int(request, "starting_after", -1) if streamed else -1
    svc = services(request)
    who = tenant(request)
    response_id = request.path_params["response_id"]
    # Without its items, and a long answer's fields in pieces (GetResponseChunked): the answer
    # is held once here as the JSON read, then as the text parsed from it (stored_json, without
    # orjson's copy of the JSON), and sent a slice at a time (issue 13).
    read = await svc.state.read_response(who, response_id, events=streamed)
    in_progress = read.response.in_progress
    long = len(read.response_json) >= stored_json.LONG_BYTES
    if long:
        # What gRPC took to receive it is free now, on its own threads' heaps: handed back
        # before the answer's text is made, it is not held with it.
        gctune.give_back_now()
    response: ResponseObject = stored_json.loads(read.response_json)
    events = read.stream_events_json
    # The response's JSON is not held while the log is parsed, nor the log's JSON after (a
    # long answer's log holds a byte per delta in one string: made from the JSON once).
    del read
    live = stored_json.loads(events) if streamed and events else None
    del events
    if streamed:
        if in_progress:
            # Its events as they reach its log, whichever router runs it.
            return _sse(background.follow(svc, who, response_id, after, include=asked))
        return _sse(_given_back(_replay(response, after, live, asked=asked), long))
    shown = include.response(response, asked)
    if long:
        gctune.give_back()  # what the JSON read took
        return _SlicedJSON(shown)
    return JSONResponse(shown)


class _SlicedJSON(Response):
    """A JSON response sent a slice at a time (events.json_slices), its body never whole: the
    JSON of a long answer would be the answer once more (and the transport's copy of what the
    socket did not take at once, once more again)."""

    media_type = "application/json"

    def __init__(self, content: Any) -> None:
        self.content = content
        self.status_code = 200
        self.background = None
        size = 0
        slices = json_slices(content)
        if slices is None:
            self.body = orjson.dumps(content)
        else:
            self.body = b""
            for piece in slices:  # made twice: once to count them, never held together
                size += len(piece)
        self.init_headers()
        if slices is not None:
            self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"] + [
                (b"content-length", str(size).encode())
            ]
        self._sliced = slices is not None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._sliced:
            await super().__call__(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        for piece in json_slices(self.content) or (orjson.dumps(self.content),):
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _given_back(body: AsyncIterator[bytes], long: bool) -> AsyncIterator[bytes]:
    """``body``, then (a long answer's) the memory its reading took handed back."""
    try:
        async for chunk in body:
            yield chunk
    finally:
        if long:
            gctune.give_back()


async def delete_response(request: Request) -> Response:
    svc = services(request)
    who = tenant(request)
    response_id = request.path_params["response_id"]
    if svc.history_cache is not None:
        # Chains through the deleted response are broken: forget them before the delete lands.
        svc.history_cache.forget_tenant(who)
    await svc.state.delete_response(state_records.delete_response(who, response_id))
    return JSONResponse({"id": response_id, "object": "response", "deleted": True})


async def list_input_items(request: Request) -> Response:
    asked = include.from_query(request)
    _, _, reply = await _stored(request)
    limit = query_limit(request)
    order = query_order(request)
    items = state_records.items_from_proto(reply.response.input_items)
    if order == "desc":
        items.reverse()
    after = request.query_params.get("after")
    if after:
        ids = [i.get("id") for i in items]
        if after not in ids:
            raise errors.NotFound(
                f"Item with id '{after}' not found in the input of this response.", param="after"
            )
        items = items[ids.index(after) + 1 :]
    return JSONResponse(list_page(include.items(items[:limit], asked), len(items) > limit))


async def cancel_response(request: Request) -> Response:
    svc = services(request)
    who, _, reply = await _stored(request)
    stored = reply.response
    response = state_records.response_of(stored)
    if not response.get("background"):
        raise errors.InvalidRequest(
            "Only responses created with background: true can be cancelled.",
            param="response_id",
            code="not_cancellable",
        )
    if not stored.in_progress:
        # Finished already: cancelling changes nothing.
        return JSONResponse(include.response(response, ()))
    return JSONResponse(include.response(await background.cancel(svc, who, stored), ()))


routes = [
    Route("/v1/responses", create_response, methods=["POST"]),
    Route("/v1/responses/compact", compact_response, methods=["POST"]),
    Route("/v1/responses/{response_id}", get_response, methods=["GET"]),
    Route("/v1/responses/{response_id}", delete_response, methods=["DELETE"]),
    Route("/v1/responses/{response_id}/input_items", list_input_items, methods=["GET"]),
    Route("/v1/responses/{response_id}/cancel", cancel_response, methods=["POST"]),
]
