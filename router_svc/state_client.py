"""The router's client of the state service: one long-lived channel, a deadline on every call,
and retries only where the contract allows them.

Which calls may be retried is read from the contract itself: an RPC whose proto declares
``idempotency_level`` NO_SIDE_EFFECTS or IDEMPOTENT is retried on UNAVAILABLE (the server wrote
nothing, or the replay is harmless by contract); any other RPC is never retried.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import grpc
from grpc_health.v1 import health_pb2
from prometheus_client import Counter, Histogram

from gateway import grpcclient, grpcerrors
from gateway.grpcserver import channel_options
from gateway.logs import REQUEST_ID_HEADER, request_id_var
from gateway.metrics import LATENCY_BUCKETS
from respgw.state.v1 import error_reason_pb2 as state_reasons
from respgw.state.v1 import resources_pb2
from respgw.state.v1 import state_service_pb2 as pb
from respgw.state.v1 import state_service_pb2_grpc as pb_grpc
from router_svc import errors

log = logging.getLogger(__name__)

SERVICE_NAME = "respgw.state.v1.StateService"

STATE_CALL_LATENCY = Histogram(
    "respgw_router_state_call_latency_seconds",
    "Time of one state service call as the router sees it, retries included.",
    ["method"],
    buckets=LATENCY_BUCKETS,
)
STATE_CALL_ERRORS = Counter(
    "respgw_router_state_call_errors_total",
    "Failed state service calls, by method and status code.",
    ["method", "code"],
)

RETRYABLE = grpcclient.safe_to_retry(pb.DESCRIPTOR.services_by_name["StateService"])
# UNAVAILABLE: the server wrote nothing, or the replay is harmless by contract.
_RETRY = grpcclient.RetryPolicy(frozenset({grpc.StatusCode.UNAVAILABLE}), (0.05, 0.2))

# The RPCs that go over Exchange streams, with their field in ExchangeRequest.call.
_EXCHANGED = {"PutTurn": "put_turn", "GetHistory": "get_history", "GetResponse": "get_response"}
_CODES = {code.value[0]: code for code in grpc.StatusCode}
# The most ids one GetItems call may ask for (its contract).
MAX_ITEM_IDS = 100
# A call site's own error for NOT_FOUND, where the route must answer another than the reason's.
NotFoundOverride = Callable[[grpcerrors.RemoteError], errors.ApiError]
WatchCall = grpc.aio.UnaryStreamCall[pb.WatchResponseEventsRequest, pb.WatchResponseEventsResponse]
ChunkedReadCall = grpc.aio.UnaryStreamCall[
    pb.GetResponseChunkedRequest, pb.GetResponseChunkedResponse
]


# The fields of GetResponseChunkedResponse (its oneof chunk).
_HEAD = pb.GetResponseChunkedResponse.HEAD_FIELD_NUMBER
_RESPONSE_JSON = pb.GetResponseChunkedResponse.RESPONSE_JSON_FIELD_NUMBER
_STREAM_EVENTS_JSON = pb.GetResponseChunkedResponse.STREAM_EVENTS_JSON_FIELD_NUMBER


def _varint(data: bytes, at: int) -> tuple[int, int]:
    """The varint at ``at`` in ``data``, and where it ends."""
    n = shift = 0
    while True:
        if at >= len(data) or shift > 63:
            raise _broken("a malformed GetResponseChunked message")
        byte = data[at]
        at += 1
        n |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return n, at
        shift += 7


def _chunk_field(data: bytes) -> tuple[int, memoryview]:
    """Which field of its oneof an encoded GetResponseChunkedResponse sets, and that field's
    bytes (a view of ``data``; for the head, its encoding). Fields it does not know (a newer
    service's) are skipped; the last of the oneof's fields wins, as in a parsed message."""
    view = memoryview(data)
    found, value = 0, view[:0]
    at = 0
    while at < len(data):
        key, at = _varint(data, at)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, at = _varint(data, at)
        elif wire == 1:
            at += 8
        elif wire == 5:
            at += 4
        elif wire == 2:
            size, at = _varint(data, at)
            if field in (_HEAD, _RESPONSE_JSON, _STREAM_EVENTS_JSON):
                found, value = field, view[at : at + size]
            at += size
        else:
            raise _broken("a malformed GetResponseChunked message")
        if at > len(data):
            raise _broken("a malformed GetResponseChunked message")
    return found, value


@dataclass(slots=True)
class ReadResponse:
    """A stored response as :meth:`StateClient.read_response` gives it: ``response`` without
    its items and large fields, and those fields (whole)."""

    response: resources_pb2.StoredResponse
    response_json: bytes | bytearray
    stream_events_json: bytes | bytearray


class CallFailed(Exception):
    """A call on an Exchange stream that ended with a status other than OK."""

    def __init__(self, info: grpcerrors.RemoteError) -> None:
        super().__init__(info.message)
        self.info = info


def _broken(message: str) -> CallFailed:
    """A stream that breaks its contract (the server's fault): INTERNAL, never retried."""
    return CallFailed(
        grpcerrors.RemoteError(
            code=grpc.StatusCode.INTERNAL, reason="", message=message, metadata={}, domain=""
        )
    )


def _unavailable(message: str) -> CallFailed:
    return CallFailed(
        grpcerrors.RemoteError(
            code=grpc.StatusCode.UNAVAILABLE,
            reason="",
            message=message,
            metadata={},
            domain="",
        )
    )


class Exchange:
    """The calls of the request path over a few long-lived Exchange streams (round robin, so
    that with several state replicas the streams spread over them, and each replaced after
    ``max_age_s``). A stream that ends fails its unanswered calls as UNAVAILABLE, which the caller
    retries on a new stream (all three RPCs are safe to replay); the next call opens the new
    stream."""

    def __init__(self, channel: grpc.aio.Channel, streams: int, max_age_s: float = 60.0) -> None:
        self._open = channel.stream_stream(
            f"/{SERVICE_NAME}/Exchange",
            request_serializer=pb.ExchangeRequest.SerializeToString,
            response_deserializer=pb.ExchangeResponse.FromString,
        )
        self._lanes: list[_Lane | None] = [None] * streams
        self._turn = 0
        self._ids = itertools.count()
        # Streams are replaced after this long, so that new state replicas (and the connection a
        # server's maximum connection age opened) get their share of the calls.
        self._max_age_s = max_age_s

    def close(self) -> None:
        for lane in self._lanes:
            if lane is not None:
                lane.close()

    async def call(self, field: str, request: Any, request_id: str, timeout_s: float) -> Any:
        self._turn = (self._turn + 1) % len(self._lanes)
        lane = self._lanes[self._turn]
        if lane is None or lane.closed or time.monotonic() - lane.born > self._max_age_s:
            if lane is not None and not lane.closed:
                lane.retire()
            lane = self._lanes[self._turn] = _Lane(self._open())
        result = await lane.call(next(self._ids), field, request, request_id, timeout_s)
        if result.status.code:
            status = result.status
            raise CallFailed(
                grpcerrors.RemoteError(
                    code=_CODES.get(status.code, grpc.StatusCode.UNKNOWN),
                    reason=status.reason,
                    message=status.message,
                    metadata=dict(status.metadata),
                    domain=status.domain,
                )
            )
        return getattr(result, field)


class _Lane:
    """One Exchange stream. Calls go into the batch being filled; a writer task sends the batch
    whenever the previous write is done, and a reader task hands each answer to its caller by
    call_id."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._pending: dict[int, asyncio.Future[pb.ExchangeResult]] = {}
        self._batch = pb.ExchangeRequest()
        self._ready = asyncio.Event()
        self.closed = False
        # A retired stream takes no new calls and closes once its last call is answered.
        self.retired = False
        self.born = time.monotonic()
        loop = asyncio.get_running_loop()
        self._reader = loop.create_task(self._read())
        self._writer = loop.create_task(self._write())

    async def call(
        self, call_id: int, field: str, request: Any, request_id: str, timeout_s: float
    ) -> pb.ExchangeResult:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[pb.ExchangeResult] = loop.create_future()
        self._pending[call_id] = future
        call = self._batch.calls.add(call_id=call_id, request_id=request_id)
        getattr(call, field).CopyFrom(request)
        self._ready.set()
        deadline = loop.call_later(timeout_s, _expire, future)
        try:
            return await future
        finally:
            deadline.cancel()
            self._pending.pop(call_id, None)
            if self.retired and not self._pending:
                self.close()

    async def _write(self) -> None:
        try:
            while True:
                await self._ready.wait()
                self._ready.clear()
                if self._batch.calls:
                    batch, self._batch = self._batch, pb.ExchangeRequest()
                    await self._stream.write(batch)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
            self._end(f"the state service stream broke: {exc}")

    async def _read(self) -> None:
        try:
            while True:
                reply = await self._stream.read()
                if reply is grpc.aio.EOF:
                    break
                for result in reply.results:
                    future = self._pending.pop(result.call_id, None)
                    if future is not None and not future.done():
                        future.set_result(result)
        except grpc.aio.AioRpcError as exc:
            self._end(f"the state service stream ended: {exc.code().name} {exc.details()}")
            return
        except asyncio.CancelledError:
            self._end("the state client is closing")
            raise
        self._end("the state service ended the stream")

    def _end(self, why: str) -> None:
        """Marks the stream closed and fails every call still waiting on it."""
        if not self.closed:
            self.closed = True
            self._stream.cancel()
            self._writer.cancel()
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(_unavailable(why))

    def retire(self) -> None:
        self.retired = True
        if not self._pending:
            self.close()

    def close(self) -> None:
        self._end("the state client is closing")
        self._reader.cancel()


if TYPE_CHECKING:
    # A stub on a channel of the caller's own: the background worker's, for its claims and
    # WatchResponseEvents (see background.py), which stay out of the Exchange streams. The async
    # stub is a name of the type stubs only.
    StateStub: TypeAlias = pb_grpc.StateServiceAsyncStub


def state_stub(channel: grpc.aio.Channel) -> StateStub:
    stub: StateStub = pb_grpc.StateServiceStub(channel)
    return stub


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(
            CallFailed(
                grpcerrors.RemoteError(
                    code=grpc.StatusCode.DEADLINE_EXCEEDED,
                    reason="",
                    message="the state service did not answer in time",
                    metadata={},
                    domain="",
                )
            )
        )


R = TypeVar("R")


def _not_found_reason(value: state_reasons.ErrorReason.ValueType) -> str:
    return grpcerrors.reason(state_reasons.ErrorReason, value)


def _response_not_found(err: grpcerrors.RemoteError, param: str | None) -> errors.ApiError:
    return errors.response_not_found(
        err.metadata.get("response_id") or err.metadata.get("idempotency_key", "")
    )


def _previous_not_found(err: grpcerrors.RemoteError, param: str | None) -> errors.ApiError:
    return errors.previous_response_not_found(err.metadata.get("previous_response_id", ""))


def _conversation_not_found(err: grpcerrors.RemoteError, param: str | None) -> errors.ApiError:
    return errors.conversation_not_found(
        err.metadata.get("conversation_id") or err.metadata.get("request_id", ""), param=param
    )


def _item_not_found(err: grpcerrors.RemoteError, param: str | None) -> errors.ApiError:
    return errors.NotFound(
        f"Item with id '{err.metadata.get('item_id', '')}' not found.", code="not_found"
    )


# NOT_FOUND by the state service's reason (error_reason.proto): the error the client sees, built
# from the ids the reason's metadata names. ``param`` is the request field that named the
# conversation (``conversation`` for a turn's RPCs, none for the conversation routes). A NOT_FOUND
# without a known reason falls back on errors.from_state_error (a 404 with the server's message).
NOT_FOUND_BY_REASON: dict[str, Callable[[grpcerrors.RemoteError, str | None], errors.ApiError]] = {
    _not_found_reason(state_reasons.ERROR_REASON_RESPONSE_NOT_FOUND): _response_not_found,
    _not_found_reason(state_reasons.ERROR_REASON_PREVIOUS_RESPONSE_NOT_FOUND): _previous_not_found,
    _not_found_reason(state_reasons.ERROR_REASON_CONVERSATION_NOT_FOUND): _conversation_not_found,
    _not_found_reason(state_reasons.ERROR_REASON_ITEM_NOT_FOUND): _item_not_found,
}


def map_error(
    info: grpcerrors.RemoteError, *, param: str | None = None, conversation_param: str | None = None
) -> errors.ApiError:
    """The client's error for a failed state call: NOT_FOUND by its reason
    (:data:`NOT_FOUND_BY_REASON`), anything else by :func:`errors.from_state_error`."""
    if info.code == grpc.StatusCode.NOT_FOUND:
        build = NOT_FOUND_BY_REASON.get(info.reason)
        if build is not None:
            mapped = build(info, conversation_param)
            mapped.state_not_found = True
            return mapped
    mapped = errors.from_state_error(info, param=param)
    mapped.state_not_found = info.code == grpc.StatusCode.NOT_FOUND
    return mapped


class StateClient:
    """The typed door to the state service: one method per RPC of ``StateService`` (named in
    snake_case, taking and returning its generated messages; tests/router_svc/test_state_client.py
    checks them against the service descriptor), every failure an :class:`errors.ApiError` mapped
    in one place (:func:`map_error`). Exchange has no method: it is the transport PutTurn,
    GetHistory and GetResponse ride (see :class:`Exchange`)."""

    def __init__(
        self,
        target: str,
        *,
        timeout_s: float,
        max_message_bytes: int = 64 * 1024 * 1024,
        exchange_streams: int = 2,
    ) -> None:
        self._channel = grpc.aio.insecure_channel(
            target, options=channel_options(max_message_bytes)
        )
        self._stub = pb_grpc.StateServiceStub(self._channel)
        # GetResponseChunked with its messages left encoded (see _read_chunked), on a channel of
        # its own whose receive window does not grow with gRPC's bandwidth-delay probe: the
        # state service sends a long answer's pieces as fast as the window allows, and a window
        # grown to megabytes had gRPC hold most of the answer ahead of the reader (issue 13).
        # Each piece still gets a window of its size, so a read costs about a round trip a piece.
        self._read_channel = grpc.aio.insecure_channel(
            target, options=[*channel_options(max_message_bytes), ("grpc.http2.bdp_probe", 0)]
        )
        self._chunked_raw: Callable[..., grpc.aio.UnaryStreamCall[Any, bytes]] = (
            self._read_channel.unary_stream(
                f"/{SERVICE_NAME}/GetResponseChunked",
                request_serializer=pb.GetResponseChunkedRequest.SerializeToString,
                response_deserializer=None,
            )
        )
        self._health_check = self._channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        self._timeout_s = timeout_s
        self._exchange = Exchange(self._channel, exchange_streams) if exchange_streams else None
        self._encoded: dict[str, Any] = {}
        # Whether the service takes a turn's output items from its response JSON
        # (StoredResponse.response_json_with_output_items): learned from its PutTurn replies.
        self.response_json_with_output_items = False
        # Whether the service serves PutTurnChunked (a large turn goes in pieces): until one
        # answers UNIMPLEMENTED (an older replica), then large turns go to PutTurn encoded.
        self.put_turn_chunked_served = True
        # Whether the service serves GetResponseChunked: until one answers UNIMPLEMENTED.
        self.get_response_chunked_served = True

    async def close(self) -> None:
        if self._exchange is not None:
            self._exchange.close()
        await self._channel.close()
        await self._read_channel.close()

    def connected(self) -> bool:
        """True while the channel to the state service is connected (no call made): a turn
        that could not be stored must not call the hub, so remembered histories are used only
        then."""
        return self._channel.get_state() == grpc.ChannelConnectivity.READY

    async def ready(self) -> bool:
        """True when the state service answers its health check with SERVING."""
        try:
            reply = await self._health_check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=self._timeout_s
            )
        except grpc.RpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    def _encoded_rpc(self, method: str) -> Any:
        """The unary RPC ``method`` for a request encoded already (bytes, sent as they are)."""
        rpc = self._encoded.get(method)
        if rpc is None:
            reply = pb.DESCRIPTOR.services_by_name["StateService"].methods_by_name[method]
            rpc = self._encoded[method] = self._channel.unary_unary(
                f"/{SERVICE_NAME}/{method}",
                request_serializer=None,
                response_deserializer=getattr(pb, reply.output_type.name).FromString,
            )
        return rpc

    @staticmethod
    async def find(call: Awaitable[R]) -> R | None:
        """The reply of ``call`` (a typed method's), or None when the state service answered
        NOT_FOUND."""
        try:
            return await call
        except errors.ApiError as exc:
            if exc.state_not_found:
                return None
            raise

    # --- one method per RPC -------------------------------------------------------------------
    # ``param`` names the request field a 4xx other than NOT_FOUND points at (see
    # errors.from_state_error); ``not_found`` replaces the reason's error where a route must
    # answer another one (the call site says why).

    async def put_turn(
        self,
        request: pb.PutTurnRequest | bytes,
        *,
        param: str | None = None,
        not_found: NotFoundOverride | None = None,
    ) -> pb.PutTurnResponse:
        """Stores a turn. ``request`` may be a PutTurnRequest encoded already (a large turn, see
        state_records.encoded_put_turn): it goes as a unary call, as it is."""
        reply: pb.PutTurnResponse = await self._call(
            "PutTurn", request, param=param, conversation_param="conversation", not_found=not_found
        )
        return reply

    async def put_turn_chunked(
        self,
        request: Callable[[], Iterator[pb.PutTurnChunkedRequest]],
        *,
        param: str | None = None,
        not_found: NotFoundOverride | None = None,
    ) -> pb.PutTurnChunkedResponse:
        """Stores a large turn in pieces: ``request`` makes the call's messages (the head, then
        the pieces, see state_records.put_turn_chunks), anew for each attempt."""
        reply: pb.PutTurnChunkedResponse = await self._call(
            "PutTurnChunked",
            request,
            param=param,
            conversation_param="conversation",
            not_found=not_found,
        )
        return reply

    async def get_response(self, request: pb.GetResponseRequest) -> pb.GetResponseResponse:
        reply: pb.GetResponseResponse = await self._call("GetResponse", request)
        return reply

    async def get_history(
        self,
        request: pb.GetHistoryRequest,
        *,
        param: str | None = None,
        not_found: NotFoundOverride | None = None,
    ) -> pb.GetHistoryResponse:
        reply: pb.GetHistoryResponse = await self._call(
            "GetHistory",
            request,
            param=param,
            conversation_param="conversation",
            not_found=not_found,
        )
        return reply

    async def delete_response(self, request: pb.DeleteResponseRequest) -> pb.DeleteResponseResponse:
        reply: pb.DeleteResponseResponse = await self._call("DeleteResponse", request)
        return reply

    async def create_conversation(
        self, request: pb.CreateConversationRequest
    ) -> pb.CreateConversationResponse:
        reply: pb.CreateConversationResponse = await self._call("CreateConversation", request)
        return reply

    async def get_conversation(
        self, request: pb.GetConversationRequest
    ) -> pb.GetConversationResponse:
        reply: pb.GetConversationResponse = await self._call("GetConversation", request)
        return reply

    async def update_conversation(
        self, request: pb.UpdateConversationRequest
    ) -> pb.UpdateConversationResponse:
        reply: pb.UpdateConversationResponse = await self._call("UpdateConversation", request)
        return reply

    async def delete_conversation(
        self, request: pb.DeleteConversationRequest
    ) -> pb.DeleteConversationResponse:
        reply: pb.DeleteConversationResponse = await self._call("DeleteConversation", request)
        return reply

    async def create_conversation_items(
        self, request: pb.CreateConversationItemsRequest, *, param: str | None = None
    ) -> pb.CreateConversationItemsResponse:
        reply: pb.CreateConversationItemsResponse = await self._call(
            "CreateConversationItems", request, param=param
        )
        return reply

    async def list_conversation_items(
        self, request: pb.ListConversationItemsRequest, *, param: str | None = None
    ) -> pb.ListConversationItemsResponse:
        reply: pb.ListConversationItemsResponse = await self._call(
            "ListConversationItems", request, param=param
        )
        return reply

    async def get_conversation_item(
        self, request: pb.GetConversationItemRequest
    ) -> pb.GetConversationItemResponse:
        reply: pb.GetConversationItemResponse = await self._call("GetConversationItem", request)
        return reply

    async def delete_conversation_item(
        self, request: pb.DeleteConversationItemRequest
    ) -> pb.DeleteConversationItemResponse:
        reply: pb.DeleteConversationItemResponse = await self._call(
            "DeleteConversationItem", request
        )
        return reply

    async def get_items(self, request: pb.GetItemsRequest) -> pb.GetItemsResponse:
        reply: pb.GetItemsResponse = await self._call("GetItems", request)
        return reply

    async def put_compaction(self, request: pb.PutCompactionRequest) -> pb.PutCompactionResponse:
        reply: pb.PutCompactionResponse = await self._call("PutCompaction", request)
        return reply

    async def get_compaction(self, request: pb.GetCompactionRequest) -> pb.GetCompactionResponse:
        reply: pb.GetCompactionResponse = await self._call("GetCompaction", request)
        return reply

    async def enqueue_background_response(
        self,
        request: pb.EnqueueBackgroundResponseRequest,
        *,
        param: str | None = None,
        not_found: NotFoundOverride | None = None,
    ) -> pb.EnqueueBackgroundResponseResponse:
        reply: pb.EnqueueBackgroundResponseResponse = await self._call(
            "EnqueueBackgroundResponse",
            request,
            param=param,
            conversation_param="conversation",
            not_found=not_found,
        )
        return reply

    async def claim_background_response(
        self, request: pb.ClaimBackgroundResponseRequest
    ) -> pb.ClaimBackgroundResponseResponse:
        reply: pb.ClaimBackgroundResponseResponse = await self._call(
            "ClaimBackgroundResponse", request
        )
        return reply

    async def renew_background_lease(
        self, request: pb.RenewBackgroundLeaseRequest
    ) -> pb.RenewBackgroundLeaseResponse:
        reply: pb.RenewBackgroundLeaseResponse = await self._call("RenewBackgroundLease", request)
        return reply

    async def append_response_events(
        self, request: pb.AppendResponseEventsRequest
    ) -> pb.AppendResponseEventsResponse:
        reply: pb.AppendResponseEventsResponse = await self._call("AppendResponseEvents", request)
        return reply

    async def finish_background_response(
        self, request: pb.FinishBackgroundResponseRequest
    ) -> pb.FinishBackgroundResponseResponse:
        reply: pb.FinishBackgroundResponseResponse = await self._call(
            "FinishBackgroundResponse", request
        )
        return reply

    async def cancel_background_response(
        self, request: pb.CancelBackgroundResponseRequest
    ) -> pb.CancelBackgroundResponseResponse:
        reply: pb.CancelBackgroundResponseResponse = await self._call(
            "CancelBackgroundResponse", request
        )
        return reply

    def watch_response_events(
        self, request: pb.WatchResponseEventsRequest, *, timeout: float | None = None
    ) -> WatchCall:
        """The response's events as they reach its log: a server stream to iterate with
        ``async for`` and cancel when done (no deadline unless ``timeout``). Failures come out
        as ``grpc.aio.AioRpcError`` while iterating: the stream may have delivered events before
        it broke. (The background worker watches on a channel of its own, see background.py.)"""
        metadata: tuple[tuple[str, str], ...] = ((REQUEST_ID_HEADER, request_id_var.get()),)
        call: WatchCall = self._stub.WatchResponseEvents(
            request, timeout=timeout, metadata=metadata
        )
        return call

    def get_response_chunked(
        self, request: pb.GetResponseChunkedRequest, *, timeout: float | None = None
    ) -> ChunkedReadCall:
        """A stored response in pieces: a server stream to iterate with ``async for`` (see
        :meth:`read_response`, which puts the pieces together, retries and maps failures)."""
        metadata: tuple[tuple[str, str], ...] = ((REQUEST_ID_HEADER, request_id_var.get()),)
        call: ChunkedReadCall = self._stub.GetResponseChunked(
            request, timeout=timeout, metadata=metadata
        )
        return call

    # --- beyond one RPC -----------------------------------------------------------------------

    async def read_response(
        self, tenant: str, response_id: str, *, events: bool = True
    ) -> ReadResponse:
        """A stored response for a reader that needs its response object and event log but not
        its items (GET /v1/responses/{id}): through GetResponseChunked, each large field put
        together in a buffer of its declared size, so that a long answer is held once (GetResponse
        sends it twice, in the response and its output items, in one message); through
        GetResponse from a service that predates it. Without ``events`` (a plain GET) the event
        log's pieces are read but not kept: its ``stream_events_json`` is then empty (or what
        GetResponse sent).
        Failures are mapped as every call's."""
        if self.get_response_chunked_served:
            try:
                return await self._read_chunked(tenant, response_id, events=events)
            except errors.ApiError as exc:
                cause = exc.__cause__
                if not (
                    isinstance(cause, grpc.aio.AioRpcError)
                    and cause.code() == grpc.StatusCode.UNIMPLEMENTED
                ):
                    raise
                # A service that predates it (one replica of a fleet being upgraded).
                self.get_response_chunked_served = False
        reply = await self.get_response(
            pb.GetResponseRequest(tenant=tenant, response_id=response_id)
        )
        stored = reply.response
        response_json, log = stored.response_json, stored.stream_events_json
        del stored.input_items[:], stored.output_items[:]
        stored.ClearField("response_json")
        stored.ClearField("stream_events_json")
        return ReadResponse(stored, response_json, log)

    async def _read_chunked(self, tenant: str, response_id: str, *, events: bool) -> ReadResponse:
        out = grpcclient.Outgoing(SERVICE_NAME, "GetResponseChunked")
        request = pb.GetResponseChunkedRequest(tenant=tenant, response_id=response_id)

        async def attempt(deadline_s: float) -> ReadResponse:
            head: pb.GetResponseChunkedHead | None = None
            buffers: dict[int, bytearray] = {}
            filled: dict[int, int] = {}
            skipped = 0
            # The messages as gRPC received them (bytes): a piece goes from them into its
            # buffer, not through a message object and a bytes object of its own first.
            call = self._chunked_raw(request, timeout=deadline_s, metadata=out.metadata)
            try:
                async for data in call:
                    field, piece = _chunk_field(data)
                    if field == _HEAD and head is None:
                        head = pb.GetResponseChunkedResponse.FromString(data).head
                        buffers = {
                            _RESPONSE_JSON: bytearray(head.response_json_size),
                            _STREAM_EVENTS_JSON: bytearray(
                                head.stream_events_json_size if events else 0
                            ),
                        }
                        filled = dict.fromkeys(buffers, 0)
                        continue
                    if head is None or field not in buffers:
                        raise _broken(f"unexpected field {field} in GetResponseChunked")
                    if field == _STREAM_EVENTS_JSON and not events:
                        # Read to the stream's end (its status), not kept; counted.
                        skipped += len(piece)
                        continue
                    at = filled[field]
                    if at + len(piece) > len(buffers[field]):
                        raise _broken(f"field {field} longer than its declared size")
                    buffers[field][at : at + len(piece)] = piece
                    filled[field] = at + len(piece)
                    del data, piece
            finally:
                call.cancel()  # a no-op once it ended; otherwise nothing more is read
            if (
                head is None
                or any(filled[k] != len(b) for k, b in buffers.items())
                or (not events and skipped != head.stream_events_json_size)
            ):
                raise _broken("GetResponseChunked ended short of its declared sizes")
            return ReadResponse(
                head.response, buffers[_RESPONSE_JSON], buffers[_STREAM_EVENTS_JSON]
            )

        code = "OK"
        failed = False
        try:
            policy = _RETRY if "GetResponseChunked" in RETRYABLE else grpcclient.NO_RETRY
            return await grpcclient.retrying(
                attempt,
                policy,
                timeout_s=self._timeout_s,
                code_of=_code_of,
                on_retry=lambda _code, n: _log_retry("GetResponseChunked", n),
            )
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except (grpc.aio.AioRpcError, CallFailed) as exc:
            info = exc.info if isinstance(exc, CallFailed) else grpcerrors.error_info(exc)
            code, failed = info.code.name, True
            mapped = map_error(info)
            if mapped.status >= 500 and info.code != grpc.StatusCode.UNIMPLEMENTED:
                log.error(
                    "state call failed",
                    extra={
                        "method": "GetResponseChunked",
                        "code": info.code.name,
                        "detail": info.message,
                    },
                )
            raise mapped from exc
        finally:
            out.end(
                code, latency=STATE_CALL_LATENCY, failures=STATE_CALL_ERRORS if failed else None
            )

    async def get_items_by_id(self, tenant: str, item_ids: Sequence[str]) -> dict[str, bytes]:
        """The JSON of the stored items with these ids (GetItems, up to MAX_ITEM_IDS ids a
        call), by id; ids not found are left out."""
        found: dict[str, bytes] = {}
        for start in range(0, len(item_ids), MAX_ITEM_IDS):
            request = pb.GetItemsRequest(
                tenant=tenant, item_ids=item_ids[start : start + MAX_ITEM_IDS]
            )
            reply = await self.get_items(request)
            found.update((item.id, item.json) for item in reply.items)
        return found

    async def _call(
        self,
        method: str,
        request: Any,
        *,
        param: str | None = None,
        conversation_param: str | None = None,
        not_found: NotFoundOverride | None = None,
    ) -> Any:
        """Calls ``method`` with ``request``; maps a failure with :func:`map_error` (or
        ``not_found`` for NOT_FOUND).

        The request path's RPCs (PutTurn, GetHistory, GetResponse) go over the Exchange streams
        unless tracing is on (a unary call carries its own span to the server). A request given
        as bytes (encoded already: a large turn, see turn.store) goes as a unary call, as it is;
        one given as a function (PutTurnChunked's messages) is called for each attempt."""
        out = grpcclient.Outgoing(SERVICE_NAME, method)
        encoded = isinstance(request, bytes)
        if callable(request):
            make = request
            request = None
        else:
            make = None
        exchange = self._exchange if out.span is None and not encoded and make is None else None
        field = _EXCHANGED.get(method) if exchange is not None else None
        rpc = None
        if field is None:
            rpc = self._encoded_rpc(method) if encoded else getattr(self._stub, method)
        rid, metadata = out.metadata[0][1], out.metadata

        def attempt(timeout: float) -> Awaitable[Any]:
            if rpc is None:
                assert exchange is not None and field is not None
                return exchange.call(field, request, rid, timeout)
            sent = request if make is None else make()
            return rpc(sent, timeout=timeout, metadata=metadata)  # type: ignore[no-any-return]

        code = "OK"
        failed = False
        try:
            try:
                if rpc is None:
                    assert exchange is not None and field is not None
                    return await exchange.call(field, request, rid, self._timeout_s)
                sent = request if make is None else make()
                return await rpc(sent, timeout=self._timeout_s, metadata=metadata)
            except (grpc.aio.AioRpcError, CallFailed) as first:
                # Retried as the contract allows, off the path of a call that succeeds.
                policy = _RETRY if method in RETRYABLE else grpcclient.NO_RETRY
                status = first.info.code if isinstance(first, CallFailed) else first.code()
                pause = policy.pause(status, 0)
                if pause is None:
                    raise
                _log_retry(method, 1)
                await asyncio.sleep(pause)
            return await grpcclient.retrying(
                attempt,
                policy,
                timeout_s=self._timeout_s,
                code_of=_code_of,
                on_retry=lambda _code, n: _log_retry(method, n),
                attempts_made=1,
            )
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except (grpc.aio.AioRpcError, CallFailed) as exc:
            info = exc.info if isinstance(exc, CallFailed) else grpcerrors.error_info(exc)
            code, failed = info.code.name, True
            if info.code == grpc.StatusCode.NOT_FOUND and not_found is not None:
                overridden = not_found(info)
                overridden.state_not_found = True
                raise overridden from exc
            mapped = map_error(info, param=param, conversation_param=conversation_param)
            if mapped.status >= 500:
                log.error(
                    "state call failed",
                    extra={"method": method, "code": info.code.name, "detail": info.message},
                )
            raise mapped from exc
        finally:
            out.end(
                code, latency=STATE_CALL_LATENCY, failures=STATE_CALL_ERRORS if failed else None
            )


def _log_retry(method: str, attempt: int) -> None:
    log.warning("state call unavailable, retrying", extra={"method": method, "attempt": attempt})


def _code_of(exc: Exception) -> grpc.StatusCode | None:
    if isinstance(exc, CallFailed):
        return exc.info.code
    return exc.code() if isinstance(exc, grpc.aio.AioRpcError) else None
