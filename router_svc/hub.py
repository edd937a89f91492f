"""The router's client of the hub: an OpenAI-compatible model server.

aiohttp is used rather than httpx's default transport: under concurrency its connection pool
is several times faster on this workload (measured in the shared PERFORMANCE.md, and again by
``bench/bench_router.py``). Every failure comes out as an :class:`errors.ApiError` with a code:
502 for a refused connection, a 5xx, a rejected request or a malformed reply, 504 for a timeout,
400 ``context_length_exceeded`` when the hub says the input is too long.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
import warnings
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import orjson
from prometheus_client import Counter, Histogram

from gateway import gctune, tracing
from gateway.logs import REQUEST_ID_HEADER, request_id_var
from gateway.metrics import LATENCY_BUCKETS
from router_svc import errors, stored_json

log = logging.getLogger(__name__)

HUB_LATENCY = Histogram(
    "respgw_router_hub_latency_seconds",
    "Time from sending a hub request to its last byte.",
    ["path", "stream"],
    buckets=LATENCY_BUCKETS,
)
HUB_ERRORS = Counter("respgw_router_hub_errors_total", "Failed hub calls, by error code.", ["code"])

# How model servers word an input longer than the context window: OpenAI and vLLM ("maximum
# context length", and vLLM's engine "maximum model length"), SGLang ("context length"),
# llama.cpp ("exceeds the available context size").
_CONTEXT_HINTS = (
    "context length",
    "context_length",
    "maximum context",
    "too many tokens",
    "available context size",
    "maximum model length",
)


# The most of a hub's event stream read at once (what arrived, up to this): the events in it are
# split out of it while it is held. (16 KiB blocks cost 30% more CPU per delta on a stream of
# 4-byte deltas, for no less memory.)
READ_BLOCK = 64 * 1024
# A long stream hands the memory it freed back to the system each time it has read this much
# of the hub's stream (gctune.give_back_now: at most every TRIM_DELAY_S, about a millisecond per
# hundred MB held): what a stream frees (the hub's reads, its events, their encodings) is
# otherwise kept by glibc among what stays, and counts toward the process's peak. 0.5 MB in
# 4-byte deltas from a hub far faster than the router, five such turns in a row through one
# router: peak 2.6-3.1x of it -> 1.7-2.5x; the first such turn of a fresh router (the case of
# bench/bench_memory.py, where the heap grows for the first time) 2.8-3.1x either way.
GIVE_BACK_EVERY = 256 * 1024
# What aiohttp holds of a hub's answer before it stops reading the socket (it stops at twice
# this; its default is 64 KiB). A hub that sends faster than the router translates (a bench's
# hub, or a model server's burst) is held back by TCP instead: with 64 KiB blocks and aiohttp's
# default, a stream of 4-byte deltas cost the router about 1 MB more at any time (issue 13).
READ_BUFSIZE = 16 * 1024

# The current turn's session key (see turn.session_key), sent to the hub as the session header
# so that prefix-cache-aware routers keep a conversation or a chain on one replica.
session_var: contextvars.ContextVar[str] = contextvars.ContextVar("hub_session", default="")


class HubClient:
    """POSTs JSON to the hub, whole or as a stream of server-sent events."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str = "",
        timeout_s: float = 0.0,
        connect_timeout_s: float = 10.0,
        first_byte_timeout_s: float = 300.0,
        idle_timeout_s: float = 120.0,
        max_connections: int = 0,
        session_header: str = "",
    ) -> None:
        self._base = base_url.rstrip("/")
        self._headers = {"content-type": "application/json"}
        if api_key:
            self._headers["authorization"] = f"Bearer {api_key}"
        # Four bounds, each its own: connecting; the wait for the answer to start (a model may
        # queue and prefill for long); the gap between two pieces of the answer (a stream that
        # goes quiet); and, only when set, the whole call (a long live stream is not cut by a
        # budget meant for a stuck one). 0 means no bound.
        self._timeout = aiohttp.ClientTimeout(
            total=timeout_s or None, sock_connect=connect_timeout_s or None, sock_read=None
        )
        self._first_byte_s = first_byte_timeout_s or None
        self._idle_s = idle_timeout_s or None
        self._max_connections = max_connections
        self._session_header = session_header
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self._max_connections, keepalive_timeout=30)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                json_serialize=lambda o: orjson.dumps(o).decode(),
                read_bufsize=READ_BUFSIZE,
                # No cookies kept: the hub is called for every tenant over one session, so a
                # cookie one answer set must not go out with another tenant's request (and a
                # jar costs each call its lookups).
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _request_headers(self) -> dict[str, str]:
        rid = request_id_var.get()
        headers = {**self._headers, REQUEST_ID_HEADER: rid} if rid else self._headers
        session = session_var.get()
        if session and self._session_header:
            headers = {**headers, self._session_header: session}
        return headers

    def _call(
        self, path: str, body: dict[str, Any], *, stream: bool
    ) -> contextlib.AbstractAsyncContextManager[aiohttp.ClientResponse]:
        """One POST of a JSON body to the hub (see :meth:`_request`)."""
        return self._request("POST", path, orjson.dumps(body), stream=stream)

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POSTs ``body`` and returns the JSON object the hub answered."""
        async with self._call(path, body, stream=False) as resp:
            return _json_object(await self._read_grown(resp))

    async def _read(self, resp: aiohttp.ClientResponse) -> bytes:
        """The whole answer once it started, within the idle bound."""
        async with self._quiet_limit() as gap:
            gap.reschedule(self._idle_deadline())
            return await resp.read()

    async def _read_grown(self, resp: aiohttp.ClientResponse) -> bytearray:
        """:meth:`_read`, into one buffer grown as the answer arrives (aiohttp's read() keeps
        the pieces until the end, then joins them: the answer twice for a moment). With the
        parse of :func:`_json_object`, a 4 MB answer's router peak went from 3.0x of it to
        2.0x (bench/bench_memory.py). What is parsed from it is all that outlives it."""
        body = bytearray()
        async with self._quiet_limit() as gap:
            gap.reschedule(self._idle_deadline())
            while chunk := await resp.content.readany():
                body += chunk
        return body

    async def stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """POSTs ``body`` and yields each JSON object of the hub's event stream, up to ``[DONE]``
        (or the end of the stream)."""
        async with self._call(path, body, stream=True) as resp:
            events = SseEvents()
            unreturned = 0  # bytes read since the memory freed was last handed back
            while True:
                # What arrived, whole (a model streams a few bytes per event: one bound, one
                # read and one timer per block of events, not per line).
                async with self._quiet_limit() as gap:
                    gap.reschedule(self._idle_deadline())
                    block = await resp.content.read(READ_BLOCK)
                if not block:
                    break
                unreturned += len(block)
                if unreturned >= GIVE_BACK_EVERY:
                    unreturned -= GIVE_BACK_EVERY
                    gctune.give_back_now()
                for payload in events.feed(block):
                    if payload == b"[DONE]":
                        return
                    yield _parse_event(payload)
            last = events.end()
            if last is not None and last != b"[DONE]":
                yield _parse_event(last)

    @contextlib.asynccontextmanager
    async def _quiet_limit(self) -> AsyncIterator[asyncio.Timeout]:
        """A bound on the next read of the answer (``--hub-idle-timeout-s``): a 504 saying the
        model server went quiet. Another bound that expires meanwhile (the whole call's) is
        raised as it is, for the caller to name."""
        gap = asyncio.timeout(None)
        try:
            async with gap:
                yield gap
        except TimeoutError as exc:
            if not gap.expired():
                raise
            raise _fail(
                "upstream_timeout",
                f"The model server sent nothing for {self._idle_s:g} s in the middle of its answer.",
                504,
            ) from exc

    def _idle_deadline(self) -> float | None:
        return None if self._idle_s is None else asyncio.get_running_loop().time() + self._idle_s

    @contextlib.asynccontextmanager
    async def _request(
        self, method: str, path: str, body: bytes | None, *, stream: bool
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """One call to the hub (``body`` already encoded): its span, its latency, the request
        id, and every failure mapped to an ApiError. Yields the response once its status is
        known to be a success."""
        headers = self._request_headers()
        if body is None:
            headers = {k: v for k, v in headers.items() if k != "content-type"}
        span = None
        if tracing.enabled:
            span = tracing.start_client(
                f"{method} {path}",
                {
                    "http.request.method": method,
                    "url.full": self._base + path,
                    "respgw.stream": stream,
                },
            )
            headers = {**headers, **tracing.headers(span)}
        start = time.perf_counter()
        error: BaseException | None = None
        started = False
        try:
            async with asyncio.timeout(None) as first_byte:
                if self._first_byte_s is not None:
                    first_byte.reschedule(asyncio.get_running_loop().time() + self._first_byte_s)
                async with self._client().request(
                    method, self._base + path, data=_payload(body), headers=headers
                ) as resp:
                    started = True
                    first_byte.reschedule(None)  # the answer started: idle gaps bound it now
                    if resp.status >= 400:
                        raise _status_error(resp.status, await resp.read())
                    yield resp
        except TimeoutError as exc:
            message = (
                "The model server did not finish in time."
                if started
                else "The model server did not start answering in time."
            )
            error = _fail("upstream_timeout", message, 504)
            raise error from exc
        except aiohttp.ClientPayloadError as exc:
            error = _fail("upstream_stream_broken", f"The model server's answer broke off: {exc}")
            raise error from exc
        except aiohttp.ClientError as exc:
            error = _fail("upstream_unreachable", f"The model server could not be reached: {exc}")
            raise error from exc
        except BaseException as exc:
            error = exc
            raise
        finally:
            HUB_LATENCY.labels(path, "true" if stream else "false").observe(
                time.perf_counter() - start
            )
            if span is not None:
                tracing.end(span, error)

    # --- token counting: the hub's tokenizer endpoints ------------------------------------------

    @property
    def root(self) -> str:
        """The hub's server root: its base URL without a trailing ``/v1`` (where vLLM, SGLang
        and llama.cpp serve ``/tokenize``)."""
        return self._base[:-3] if self._base.endswith("/v1") else self._base

    async def post_raw(self, path: str, body: dict[str, Any], *, root: bool) -> tuple[int, bytes]:
        """POSTs ``body`` to ``path`` (under :attr:`root` when ``root``, else under the base URL)
        and returns the status and the answer's bytes, whatever the status: the caller tells a
        missing endpoint from a failure. A refused connection or a timeout is an ApiError as for
        every hub call."""
        url = (self.root if root else self._base) + path
        start = time.perf_counter()
        try:
            async with asyncio.timeout(self._first_byte_s):
                async with self._client().post(
                    url, data=orjson.dumps(body), headers=self._request_headers()
                ) as resp:
                    return resp.status, await resp.read()
        except TimeoutError as exc:
            raise _fail(
                "upstream_timeout", "The model server did not answer in time.", 504
            ) from exc
        except aiohttp.ClientError as exc:
            raise _fail(
                "upstream_unreachable", f"The model server could not be reached: {exc}"
            ) from exc
        finally:
            HUB_LATENCY.labels(path, "false").observe(time.perf_counter() - start)

    # --- pass-through: GET /v1/models, POST /v1/chat/completions --------------------------------

    async def get_json(self, path: str) -> dict[str, Any]:
        """GETs ``path`` and returns the JSON object the hub answered."""
        async with self._request("GET", path, None, stream=False) as resp:
            return _json_object(await self._read_grown(resp))

    async def forward(self, path: str, body: bytes) -> bytes:
        """POSTs ``body`` unchanged and returns the hub's answer unchanged."""
        async with self._request("POST", path, body, stream=False) as resp:
            return await self._read(resp)

    async def forward_stream(self, path: str, body: bytes) -> AsyncIterator[bytes]:
        """POSTs ``body`` unchanged and yields the hub's answer (an event stream) unchanged, as
        the bytes arrive. A failure before the first byte, or mid-stream (a quiet hub
        included), is an ApiError."""
        async with self._request("POST", path, body, stream=True) as resp:
            while True:
                async with self._quiet_limit() as gap:
                    gap.reschedule(self._idle_deadline())
                    chunk = await resp.content.readany()
                if not chunk:
                    return
                yield chunk


class SseEvents:
    """The data of each event of a server-sent event stream that arrives in blocks of any size
    (:meth:`HubClient.stream`): lines end with LF (CRs before it are dropped); the ``data:``
    lines of an event are joined with LF, each without the blanks after its colon; other lines
    (comments, ``event:``, keep-alives) are ignored; an empty line ends an event."""

    __slots__ = ("_data", "_tail")

    def __init__(self) -> None:
        self._tail: list[bytes] = []  # the pieces of a line not finished yet
        self._data: list[bytes] = []  # the data lines of the event being read

    def feed(self, block: bytes) -> Iterator[bytes]:
        """The data of each event ``block`` finishes."""
        nl = block.find(b"\n")
        if nl < 0:
            self._tail.append(block)
            return
        pos = 0
        if self._tail:
            line = b"".join((*self._tail, block[:nl]))
            self._tail = []
            payload = self._line(line, 0, len(line))
            if payload is not None:
                yield payload
            pos = nl + 1
            nl = block.find(b"\n", pos)
        while nl >= 0:
            payload = self._line(block, pos, nl)
            if payload is not None:
                yield payload
            pos = nl + 1
            nl = block.find(b"\n", pos)
        if pos < len(block):
            self._tail.append(block[pos:])

    def end(self) -> bytes | None:
        """The data of an event the stream ended in without its empty line (its last line
        perhaps without its LF); None when there is none."""
        if self._tail:
            line = b"".join(self._tail)
            self._tail = []
            payload = self._line(line, 0, len(line))
            if payload is not None:
                return payload
        data, self._data = self._data, []
        return b"\n".join(data) if data else None

    def _line(self, buf: bytes, start: int, end: int) -> bytes | None:
        """Reads the line ``buf[start:end]``; the event's data when it ends one."""
        if buf.startswith(b"data:", start, end):
            self._data.append(buf[start + 5 : end].rstrip(b"\r").lstrip())
            return None
        data = self._data
        if not data or (end > start and buf[start:end].rstrip(b"\r")):
            return None  # comments, "event:" lines and keep-alives
        self._data = []
        return data[0] if len(data) == 1 else b"\n".join(data)


def _payload(body: bytes | None) -> bytes | aiohttp.BytesPayload | None:
    """``body`` as aiohttp sends it. A body over aiohttp's TOO_LARGE_BYTES_BODY (1 MiB: a long
    history) makes it warn (ResourceWarning) that raw bytes "might lock the event loop"; they do
    not here (the body is in memory and written to the transport without blocking), and a
    process run with warnings as errors (``-W error``, as the tests are) failed such a turn with
    a server_error. Its payload is made with that warning silenced: the same bytes sent."""
    if body is None or len(body) <= aiohttp.payload.TOO_LARGE_BYTES_BODY:
        return body
    with warnings.catch_warnings():  # synchronous: nothing else runs on this loop meanwhile
        warnings.simplefilter("ignore", ResourceWarning)
        return aiohttp.BytesPayload(body, content_type="application/json")


def _json_object(raw: bytes | bytearray) -> dict[str, Any]:
    """The hub's answer as a JSON object, or a 502 saying what is wrong with it. A long answer's
    text is made without orjson's copy of the whole answer (:mod:`router_svc.stored_json`)."""
    try:
        parsed = stored_json.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _fail(
            "upstream_malformed_response", "The model server answered with malformed JSON."
        ) from exc
    if not isinstance(parsed, dict):
        raise _fail(
            "upstream_malformed_response", "The model server's answer is not a JSON object."
        )
    return parsed


def _parse_event(payload: bytes) -> dict[str, Any]:
    try:
        parsed = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise _fail(
            "upstream_malformed_response", "The model server sent a malformed stream event."
        ) from exc
    if not isinstance(parsed, dict):
        raise _fail(
            "upstream_malformed_response",
            "A stream event of the model server is not a JSON object.",
        )
    if "error" in parsed and not parsed.get("choices"):
        message = _error_message(parsed) or "The model server reported an error mid-stream."
        raise _fail("upstream_error", f"The model server failed: {message}")
    return parsed


def _error_message(parsed: Any) -> str:
    if isinstance(parsed, dict):
        err = parsed.get("error", parsed)
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])
        if isinstance(err, str):
            return err
        if isinstance(parsed.get("detail"), str):
            return str(parsed["detail"])
    return ""


def status_error(status: int, raw: bytes) -> errors.ApiError:
    """The error a hub answer of ``status`` (400 or more) with body ``raw`` is to the client."""
    return _status_error(status, raw)


def malformed(message: str) -> errors.ApiError:
    """A 502 ``upstream_malformed_response``: the hub answered, with nothing usable."""
    return _fail("upstream_malformed_response", message)


def _status_error(status: int, raw: bytes) -> errors.ApiError:
    try:
        message = _error_message(orjson.loads(raw))
    except orjson.JSONDecodeError:
        message = raw[:500].decode("utf-8", "replace")
    if status == 400 and any(hint in message.lower() for hint in _CONTEXT_HINTS):
        HUB_ERRORS.labels("context_length_exceeded").inc()
        return errors.InvalidRequest(
            f"The input exceeds the model's context window: {message}",
            param="input",
            code="context_length_exceeded",
        )
    if status in (408, 504):
        return _fail("upstream_timeout", f"The model server timed out ({status}): {message}", 504)
    if status == 429:
        return _fail(
            "upstream_rate_limited", f"The model server is rate limiting ({status}): {message}", 429
        )
    if status >= 500:
        return _fail("upstream_error", f"The model server failed ({status}): {message}")
    return _fail(
        "upstream_rejected", f"The model server rejected the request ({status}): {message}"
    )


def _fail(code: str, message: str, status: int = 502) -> errors.ApiError:
    HUB_ERRORS.labels(code).inc()
    log.warning("hub call failed", extra={"code": code, "detail": message})
    if status == 429:
        return errors.RateLimited(message, code=code)
    return errors.UpstreamError(message, code=code, status=status)
