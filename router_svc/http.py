"""Small HTTP helpers shared by the routes: JSON in and out, and query parameters."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from typing import Any

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from router_svc import errors
from router_svc.services import Services


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def services(request: Request) -> Services:
    svc: Services = request.app.state.services
    return svc


def tenant(request: Request) -> str:
    return services(request).auth.tenant(request.headers.get("authorization"))


def _media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def require_json_content_type(request: Request) -> None:
    """A 415 unless the request says its body is JSON (``application/json``, any parameters).

    The point is cross-site requests: a web page may POST to a gateway on localhost (keyless in
    local mode) without a CORS preflight only with a "simple" request, whose Content-Type is
    text/plain, application/x-www-form-urlencoded or multipart/form-data, or which has none at all
    (fetch() and sendBeacon() send none for a Blob or ArrayBuffer body). Refusing every body that is
    not declared JSON leaves such a page only requests the browser preflights, which the router
    never allows (it sends no CORS headers). The openai SDK and every JSON client send
    ``application/json``.
    """
    declared = request.headers.get("content-type", "")
    if _media_type(declared) == "application/json":
        return
    shown = f"'{declared}'" if declared else "missing"
    raise errors.InvalidRequest(
        f"Unsupported Content-Type ({shown}): this endpoint takes a JSON body, sent with "
        "'Content-Type: application/json'.",
        status=415,
        code="unsupported_media_type",
    )


def _too_large(limit: int) -> errors.RequestTooLarge:
    # The connection is closed after the answer, so that the rest of the body is not read.
    return errors.RequestTooLarge(
        f"The request body is larger than the limit of {limit} bytes.",
        headers={"connection": "close"},
    )


async def read_body(request: Request) -> bytes:
    """The raw request body, read as it arrives and refused (413) as soon as it is over
    ``--max-body-bytes``, whether it declared its length or is chunked. (A body that arrives too
    slowly is the protocol guard's: see :mod:`router_svc.app`.)"""
    require_json_content_type(request)
    limit = services(request).settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    try:
        async with aclosing(request.stream()) as stream:
            async for chunk in stream:
                size += len(chunk)
                if size > limit:
                    raise _too_large(limit)
                chunks.append(chunk)
    except ClientDisconnect as exc:
        # Nobody reads this answer; it only ends the request quietly.
        raise errors.InvalidRequest(
            "The connection was closed before the request body was complete.",
            code="incomplete_body",
        ) from exc
    raw = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    request._body = raw  # as Request.body() keeps it, for a later request.body()
    return raw


def parse_json(raw: bytes) -> dict[str, Any]:
    """``raw`` as a JSON object, or a 400 in OpenAI's words."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise errors.InvalidRequest(
            "We could not parse the JSON body of your request. (HINT: This likely means you "
            "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, but "
            "what was sent was not valid JSON.)"
        ) from exc
    if not isinstance(body, dict):
        raise errors.InvalidRequest("The request body must be a JSON object.")
    return body


async def read_json(request: Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 in OpenAI's words (a 415 for a body that is
    not declared JSON, see :func:`require_json_content_type`; a 413 for one that is too large)."""
    return parse_json(await read_body(request))


# --- ids from clients ---------------------------------------------------------------------------

# The longest id (response, conversation, item) or Idempotency-Key the router passes on. Ids the
# gateway mints are 53 characters; longer ones can only come from clients, and the storage behind
# the state service cannot index ids of a few kilobytes.
MAX_ID_CHARS = 256


def valid_id(value: str) -> bool:
    """True for an id the state service can hold: at most MAX_ID_CHARS printable characters
    (no NUL, no control characters)."""
    return len(value) <= MAX_ID_CHARS and value.isprintable()


def check_item_ids(items: list[dict[str, Any]], param: str) -> None:
    """A 400 naming the first item whose (client-chosen) id is not a valid id."""
    for i, item in enumerate(items):
        item_id = item.get("id")
        if isinstance(item_id, str) and not valid_id(item_id):
            raise errors.invalid_id(f"{param}[{i}].id", MAX_ID_CHARS)


def shown_id(value: str) -> str:
    """An id as error messages quote it (cut, and without control characters)."""
    cut = value[:64] + "..." if len(value) > 64 else value
    return "".join(c if c.isprintable() else "?" for c in cut)


def idempotency_key(request: Request) -> str:
    """The request's ``Idempotency-Key`` (empty when none), or a 400 when it cannot be one."""
    key = request.headers.get("idempotency-key", "").strip()
    if key and not (len(key) <= MAX_ID_CHARS and key.isascii() and key.isprintable()):
        raise errors.InvalidRequest(
            f"Invalid 'Idempotency-Key' header: expected at most {MAX_ID_CHARS} printable ASCII "
            "characters.",
            code="invalid_idempotency_key",
        )
    return key


# --- concurrent streams -------------------------------------------------------------------------


class StreamSlots:
    """Counts the streamed responses being served, in all and per tenant, and refuses one more
    over either cap (0 means no cap): a 429 for a tenant over its share, a 503 for the router."""

    def __init__(self, total: int, per_tenant: int) -> None:
        self.total = total
        self.per_tenant = per_tenant
        self.open = 0
        self.by_tenant: dict[str, int] = {}

    def take(self, tenant: str) -> None:
        held = self.by_tenant.get(tenant, 0)
        if self.per_tenant and held >= self.per_tenant:
            raise errors.RateLimited(
                f"Too many concurrent streams for this API key (at most {self.per_tenant}); "
                "wait for one to finish.",
            )
        if self.total and self.open >= self.total:
            raise errors.ApiError(
                "The gateway is serving as many streams as it can; please try again shortly.",
                status=503,
                code="server_overloaded",
                headers={"x-should-retry": "true"},
            )
        self.open += 1
        self.by_tenant[tenant] = held + 1

    def give(self, tenant: str) -> None:
        self.open -= 1
        held = self.by_tenant[tenant] - 1
        if held:
            self.by_tenant[tenant] = held
        else:
            del self.by_tenant[tenant]


def stream_slots(request: Request) -> StreamSlots:
    slots: StreamSlots = request.app.state.stream_slots
    return slots


class EventStream(StreamingResponse):
    """Starlette's StreamingResponse, with its watch for the client leaving kept in plain asyncio.

    Under ASGI spec 2.3 (uvicorn's), StreamingResponse sends its body in a task of an anyio task
    group while another watches ``receive`` for ``http.disconnect``: per stream a task group,
    a named task (its repr made), cancel scopes and their callbacks, and the head sent one
    loop turn later. Here the body is sent by the request's own task, and one plain task
    watches: when the client leaves, it cancels the sending (as the task group would), and
    the cancellation ends there; any other cancellation goes on as before. The body iterator
    is closed either way, so what it holds (a stream's outbox) is released at once."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        sender = asyncio.current_task()
        assert sender is not None
        gone = False

        async def watch() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            sender.cancel()

        watcher = asyncio.get_running_loop().create_task(watch())
        try:
            await self.stream_response(send)
        except asyncio.CancelledError:
            if not gone or sender.uncancel() > 0:
                raise  # cancelled from outside (too): not ours to end
        finally:
            watcher.cancel()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None and gone:
                await aclose()
        if self.background is not None:
            await self.background()


class Releasing(Response):
    """Sends ``inner`` and then calls ``release``, however the sending ends (a client that
    leaves before the first byte included)."""

    def __init__(self, inner: Response, release: Callable[[], None]) -> None:
        self.inner = inner
        self.release = release
        self.status_code = inner.status_code
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.inner(scope, receive, send)
        finally:
            self.release()


# --- one conversation's streamed turns ------------------------------------------------------------


class KeyedLocks:
    """asyncio locks by key, each dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[Any, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, key: Any) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            users = self._locks[key][1] - 1
            if users:
                self._locks[key] = (lock, users)
            else:
                del self._locks[key]


def conversation_locks(request: Request) -> KeyedLocks:
    locks: KeyedLocks = request.app.state.conversation_locks
    return locks


# --- SDK retries --------------------------------------------------------------------------------

RETRY_COUNT_HEADER = "x-stainless-retry-count"


def sdk_attempt(request: Request) -> int | None:
    """Which attempt of an official SDK's call this request is (0 for the first), from the
    ``x-stainless-retry-count`` header the SDKs send; None for other clients."""
    raw = request.headers.get(RETRY_COUNT_HEADER)
    if raw is None:
        return None
    raw = raw.strip()
    return int(raw) if raw.isascii() and raw.isdigit() and len(raw) < 6 else 0


def query_int(request: Request, name: str, default: int) -> int:
    """An integer query parameter, or a 400 naming it."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise errors.InvalidRequest(
            f"Invalid type for '{name}': expected an integer, but got '{raw}' instead.",
            param=name,
            code="invalid_type",
        ) from exc
    if not _INT64_MIN <= value <= _INT64_MAX:
        # Such a number goes into no int64 field of the state contract (a 500 otherwise).
        raise errors.InvalidRequest(
            f"Invalid '{name}': expected a value between {_INT64_MIN} and {_INT64_MAX}, "
            f"but got {raw[:40]} instead.",
            param=name,
            code="integer_out_of_range",
        )
    return value


_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1


def query_limit(request: Request, default: int = 20) -> int:
    value = query_int(request, "limit", default)
    if value < 1 or value > 100:
        raise errors.InvalidRequest(
            f"Invalid 'limit': expected a value between 1 and 100, but got {value} instead.",
            param="limit",
            code="integer_out_of_range",
        )
    return value


def query_order(request: Request, default: str = "desc") -> str:
    order = request.query_params.get("order", default)
    if order not in ("asc", "desc"):
        raise errors.InvalidRequest(
            f"Invalid value for 'order': expected one of asc or desc, but got '{order}' instead.",
            param="order",
            code="invalid_value",
        )
    return order


def list_page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }
