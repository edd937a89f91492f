"""The StateService servicer: each RPC, from its request (checked by ``state_svc.checks``) to
its answer (built by ``state_svc.records``). Its errors are ``state_svc.errors``; one boundary
(:func:`gateway.grpcerrors.servicer`) maps them to a status with ErrorInfo for every RPC."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

import grpc
from prometheus_client import Histogram

from gateway import gctune, grpcerrors, metrics
from gateway.grpcerrors import ServiceError
from gateway.logs import request_id_var
from respgw.state.v1 import state_service_pb2, state_service_pb2_grpc
from state_svc import checks, errors, page_tokens, records, wire
from state_svc.backends import base
from state_svc.backends.base import Backend
from state_svc.config import StateSettings

log = logging.getLogger(__name__)

T = TypeVar("T")
Context = grpc.aio.ServicerContext[Any, Any]

SERVICE_NAME = state_service_pb2.DESCRIPTOR.services_by_name["StateService"].full_name

DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100
# Most events in one WatchResponseEvents message (a longer backlog goes in several).
WATCH_BATCH = 256
# Most ids one GetItems call may ask for.
MAX_ITEM_IDS = 100
# Most bytes of a large field in one GetResponseChunked message (the contract allows 256 KiB):
# gRPC holds a message received in its own buffers and again as Python bytes, so a smaller
# piece is a smaller peak for the reader, at a few more messages per long answer.
PIECE_BYTES = 64 * 1024
# A response this long has its copies handed back to the system after it was sent.
_GIVE_BACK_FROM = 256 * 1024

BACKEND_LATENCY = Histogram(
    "respgw_state_backend_latency_seconds",
    "Time the storage backend took for one operation, by backend and operation.",
    ["backend", "op"],
    buckets=metrics.LATENCY_BUCKETS,
)


@grpcerrors.servicer(
    state_service_pb2.DESCRIPTOR.services_by_name["StateService"],
    log=log,
    internal=errors.internal,
)
class StateServicer(state_service_pb2_grpc.StateServiceServicer):
    """Serves StateService from a :class:`Backend`."""

    def __init__(self, backend: Backend, settings: StateSettings) -> None:
        self._backend = backend
        self._settings = settings
        self._backend_name = settings.backend
        self._backend_timers: dict[str, Any] = {}  # BACKEND_LATENCY's children, by operation
        # The RPCs an Exchange call may name, by its oneof field: (method name, handler).
        self._exchanged: dict[str, tuple[str, Callable[[Any], Awaitable[Any]]]] = {
            "put_turn": ("PutTurn", self._put_turn),
            "get_history": ("GetHistory", self._get_history),
            "get_response": ("GetResponse", self._get_response),
        }
        # The open WatchResponseEvents streams of this replica, by (tenant, response id): an
        # append through this replica wakes them at once (other replicas' appends are polled).
        self._watchers: dict[tuple[str, str], set[asyncio.Event]] = {}

    # --- Exchange: the request path's RPCs over one stream ----------------------------------

    async def Exchange(  # type: ignore[override]  # the reader/writer API, not an iterator
        self,
        request_iterator: Any,
        context: Context,
    ) -> None:
        """Serves the calls of one Exchange stream concurrently, each as its unary RPC would be
        served; a writer sends the answers ready at each moment in one message (see the proto)."""
        tasks: dict[int, asyncio.Task[None]] = {}
        outbox = [state_service_pb2.ExchangeResponse()]  # the batch being filled
        ready = asyncio.Event()

        async def answer(call: state_service_pb2.ExchangeCall) -> None:
            try:
                await self._exchange_call(call, lambda: outbox[0].results.add(call_id=call.call_id))
            finally:
                tasks.pop(call.call_id, None)
                ready.set()

        async def write() -> None:
            while True:
                await ready.wait()
                ready.clear()
                if outbox[0].results:
                    batch, outbox[0] = outbox[0], state_service_pb2.ExchangeResponse()
                    await context.write(batch)

        writer = asyncio.create_task(write())
        try:
            while True:
                request = await context.read()
                if request is grpc.aio.EOF:
                    break
                if not request.calls:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "calls must not be empty")
                for call in request.calls:
                    if call.WhichOneof("call") is None:
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a call must be set")
                    if call.call_id in tasks:
                        await context.abort(
                            grpc.StatusCode.INVALID_ARGUMENT,
                            f"call_id {call.call_id} is already in flight on this stream",
                        )
                    tasks[call.call_id] = asyncio.create_task(answer(call))
            # The caller closed its side: answer what is still running, then end the stream.
            while tasks:
                await asyncio.gather(*tasks.values(), return_exceptions=True)
            while outbox[0].results and not writer.done():
                ready.set()
                await asyncio.sleep(0)
        finally:
            for task in tasks.values():
                task.cancel()
            writer.cancel()

    async def _exchange_call(
        self,
        call: state_service_pb2.ExchangeCall,
        slot: Callable[[], state_service_pb2.ExchangeResult],
    ) -> None:
        """Serves one call of an Exchange stream; its answer goes into ``slot()``, a new result
        in the batch being filled, taken only once the answer is complete."""
        which = call.WhichOneof("call") or ""
        method, handler = self._exchanged[which]
        token = request_id_var.set(call.request_id)
        start = time.perf_counter()
        code = "OK"
        try:
            request = getattr(call, which)
            checks.check_strings(request)
            reply = await handler(request)
            getattr(slot(), which).CopyFrom(reply)
        except ServiceError as exc:
            code = exc.code.name
            records.set_status(slot().status, exc)
        except Exception:
            log.exception("state call failed", extra={"rpc": method})
            code = "INTERNAL"
            records.set_status(slot().status, errors.internal())
        finally:
            elapsed = time.perf_counter() - start
            metrics.observe_served(method, code, elapsed)
            if log.isEnabledFor(logging.DEBUG):
                # The same line the interceptor writes for a unary call.
                log.debug(
                    "gRPC call served",
                    extra={
                        "rpc": f"/{SERVICE_NAME}/{method}",
                        "code": code,
                        "ms": round(elapsed * 1000, 3),
                        "via": "Exchange",
                    },
                )
            request_id_var.reset(token)

    async def _timed(self, op: str, call: Awaitable[T]) -> T:
        start = time.perf_counter()
        try:
            return await call
        finally:
            timer = self._backend_timers.get(op)
            if timer is None:
                timer = self._backend_timers[op] = BACKEND_LATENCY.labels(self._backend_name, op)
            timer.observe(time.perf_counter() - start)

    # --- responses ------------------------------------------------------------------------

    async def PutTurn(
        self, request: state_service_pb2.PutTurnRequest | wire.LargePutTurn, context: Context
    ) -> state_service_pb2.PutTurnResponse:
        # A large request comes split, its large fields views of the bytes received (see wire).
        if isinstance(request, wire.LargePutTurn):
            try:
                checks.check_strings(request.request)
                return await self._put_turn(request.request, request.large)
            finally:
                gctune.give_back()  # what the parsed JSON and the backend's copies took
        checks.check_strings(request)
        return await self._put_turn(request)

    async def PutTurnChunked(
        self,
        request_iterator: AsyncIterator[state_service_pb2.PutTurnChunkedRequest | wire.Piece],
        context: Context,
    ) -> state_service_pb2.PutTurnChunkedResponse:
        """PutTurn sent in pieces (see the proto): each large field is filled into a buffer of its
        declared size as its pieces come, so that no more than one piece is ever held twice."""
        chunks = aiter(request_iterator)
        try:
            request, large = await self._received_turn(chunks)
            reply = await self._put_turn(request, large)
        except ServiceError:
            # The rest of the stream is read (and dropped) first: a caller still writing when
            # the call ends would see its write fail (INTERNAL), not this error.
            async for _ in chunks:
                pass
            raise
        finally:
            gctune.give_back()  # what the pieces, the parsed JSON and the backend's copies took
        return state_service_pb2.PutTurnChunkedResponse(put_turn=reply)

    async def _received_turn(
        self, chunks: AsyncIterator[state_service_pb2.PutTurnChunkedRequest | wire.Piece]
    ) -> tuple[state_service_pb2.PutTurnRequest, dict[str, memoryview]]:
        """The request a PutTurnChunked stream carries, its large fields views of the buffers
        they were received into (each piece copied once, from the message received: see
        wire.put_turn_chunk)."""
        first = await anext(chunks, None)
        if first is None or isinstance(first, wire.Piece) or first.WhichOneof("chunk") != "head":
            raise errors.invalid("head", "the first message of PutTurnChunked must be its head")
        head = first.head
        request = head.request
        del first
        checks.check_strings(request)
        sizes = {name: getattr(head, f"{name}_size") for name in wire.CHUNKED_FIELDS}
        for name in wire.CHUNKED_FIELDS:
            if getattr(request.response, name):
                raise errors.invalid(
                    f"head.request.response.{name}", f"{name} comes in pieces, not in the head"
                )
        if sum(sizes.values()) > self._settings.max_message_bytes:
            raise errors.invalid(
                "head", "the turn is larger than the largest message this server accepts"
            )
        buffers = {name: bytearray(size) for name, size in sizes.items() if size}
        filled = dict.fromkeys(buffers, 0)
        async for chunk in chunks:
            piece: bytes | memoryview
            if isinstance(chunk, wire.Piece):
                name, piece = chunk.name, chunk.data
            else:
                which = chunk.WhichOneof("chunk")
                if which is None or which == "head":
                    raise errors.invalid("chunk", "every message after the head is one piece")
                name = which
                piece = getattr(chunk, name)
            if not piece:
                continue
            at = filled.get(name, 0)
            if at + len(piece) > sizes[name]:
                raise errors.invalid(name, f"{name} is longer than its declared size")
            buffers[name][at : at + len(piece)] = piece
            filled[name] = at + len(piece)
            del chunk, piece
        for name, size in sizes.items():
            if filled.get(name, 0) != size:
                raise errors.invalid(name, f"{name} ended short of its declared size")
        return request, {name: memoryview(buffer) for name, buffer in buffers.items()}

    async def _put_turn(
        self,
        request: state_service_pb2.PutTurnRequest,
        large: Mapping[str, memoryview] | None = None,
    ) -> state_service_pb2.PutTurnResponse:
        tenant = checks.tenant(request.tenant)
        r = request.response
        checks.require(r.id, "response.id")
        # Each read of a bytes field is a copy of it: read once (a large field not at all).
        combined_json = checks.bytes_field(r, "response_json_with_output_items", large)
        response_json = checks.bytes_field(r, "response_json", large)
        combined = bool(combined_json)
        if combined:
            if response_json or r.output_items:
                raise errors.invalid(
                    "response.response_json_with_output_items",
                    "response_json_with_output_items replaces response_json and output_items",
                )
            response_json = combined_json
        del combined_json
        checks.require(response_json, "response.response_json")
        response, shape = checks.response_object(response_json)
        if response is None:
            raise errors.invalid("response.response_json", "response_json must be a JSON object")
        if r.previous_response_id and r.conversation_id:
            raise errors.invalid(
                "response.conversation_id",
                "a turn cannot have both previous_response_id and conversation_id",
            )
        # Item ids key a conversation, so a turn appended to one must not repeat an id.
        seen: set[str] | None = set() if r.conversation_id else None
        turn = base.Turn(
            id=r.id,
            response_json=response_json,
            previous_response_id=r.previous_response_id,
            conversation_id=r.conversation_id,
            input_items=checks.items(r.input_items, "response.input_items", seen),
            output_items=(
                checks.output_of(response, seen, response_json, shape)
                if combined
                else checks.items(r.output_items, "response.output_items", seen)
            ),
            idempotency_key=r.idempotency_key,
            stream_events_json=checks.bytes_field(r, "stream_events_json", large),
            in_progress=r.in_progress,
        )
        del response, response_json, shape
        if large:
            # What receiving and checking a long answer freed goes back before the backend
            # writes it, on its own thread's heap (SQLite writes it from the buffers received, in
            # pieces; PostgreSQL's driver copies it into the message it sends).
            gctune.give_back_now()
        expected = (
            request.expected_conversation_version
            if request.HasField("expected_conversation_version")
            else None
        )
        result = await self._timed(
            "put_turn",
            self._backend.put_turn(
                tenant,
                turn,
                expected_conversation_version=expected,
                require_intact_chain=request.require_intact_chain,
            ),
        )
        return state_service_pb2.PutTurnResponse(
            response=(
                records.turn_header_pb(result.turn)
                if request.omit_stored_content and not result.replayed
                else records.turn_pb(base.owned(result.turn))
            ),
            replayed=result.replayed,
            conversation_version=result.conversation_version,
            history_max_items=self._settings.history_max_items,
            response_json_with_output_items=True,
        )

    async def GetResponse(
        self, request: state_service_pb2.GetResponseRequest, context: Context
    ) -> state_service_pb2.GetResponseResponse:
        checks.check_strings(request)
        return await self._get_response(request)

    async def _get_response(
        self, request: state_service_pb2.GetResponseRequest
    ) -> state_service_pb2.GetResponseResponse:
        tenant = checks.tenant(request.tenant)
        which = request.WhichOneof("selector")
        if which is None or not getattr(request, which):
            raise errors.invalid("selector", "set response_id or idempotency_key")
        turn = await self._timed(
            "get_response",
            self._backend.get_response(
                tenant, response_id=request.response_id, idempotency_key=request.idempotency_key
            ),
        )
        return state_service_pb2.GetResponseResponse(response=records.turn_pb(turn))

    async def GetResponseChunked(
        self, request: state_service_pb2.GetResponseChunkedRequest, context: Context
    ) -> AsyncIterator[state_service_pb2.GetResponseChunkedResponse]:
        """GetResponse in pieces (see the proto): the head, then the large fields a piece at a
        time, each copied only as gRPC takes it."""
        checks.check_strings(request)
        tenant = checks.tenant(request.tenant)
        checks.require(request.response_id, "response_id")
        turn = await self._timed(
            "get_response",
            self._backend.get_response(tenant, response_id=request.response_id, with_items=False),
        )
        large = {"response_json": turn.response_json, "stream_events_json": turn.stream_events_json}
        head = state_service_pb2.GetResponseChunkedHead(
            response=records.turn_pb(
                dataclasses.replace(
                    turn,
                    response_json=b"",
                    stream_events_json=b"",
                    input_items=(),
                    output_items=(),
                )
            ),
            response_json_size=len(turn.response_json),
            stream_events_json_size=len(turn.stream_events_json),
        )
        del turn  # its items: the pieces need only the two fields
        yield state_service_pb2.GetResponseChunkedResponse(head=head)
        try:
            for name, data in large.items():
                view = memoryview(data)
                for start in range(0, len(view), PIECE_BYTES):
                    piece = state_service_pb2.GetResponseChunkedResponse()
                    setattr(piece, name, bytes(view[start : start + PIECE_BYTES]))
                    yield piece
        finally:
            if head.response_json_size > _GIVE_BACK_FROM:
                gctune.give_back()  # what the backend's copy of a long answer took

    async def GetHistory(
        self, request: state_service_pb2.GetHistoryRequest, context: Context
    ) -> state_service_pb2.GetHistoryResponse:
        checks.check_strings(request)
        return await self._get_history(request)

    async def _get_history(
        self, request: state_service_pb2.GetHistoryRequest
    ) -> state_service_pb2.GetHistoryResponse:
        tenant = checks.tenant(request.tenant)
        which = request.WhichOneof("anchor")
        if which is None or not getattr(request, which):
            raise errors.invalid("anchor", "set response_id or conversation_id")
        if request.max_items < 0:
            raise errors.invalid("max_items", "max_items must not be negative")
        limits = [n for n in (request.max_items, self._settings.history_max_items) if n > 0]
        limit = min(limits, default=0)
        if which == "response_id":
            history = await self._timed(
                "response_history",
                self._backend.response_history(tenant, request.response_id, limit=limit),
            )
        else:
            history = await self._timed(
                "conversation_history",
                self._backend.conversation_history(tenant, request.conversation_id, limit=limit),
            )
        reply = state_service_pb2.GetHistoryResponse(
            truncated=history.omitted > 0,
            omitted_item_count=history.omitted,
            conversation_version=history.conversation_version,
            response_ids=history.response_ids,
        )
        records.add_items(reply.items, history.items)
        return reply

    async def GetItems(
        self, request: state_service_pb2.GetItemsRequest, context: Context
    ) -> state_service_pb2.GetItemsResponse:
        checks.check_strings(request)
        return await self._get_items(request)

    async def _get_items(
        self, request: state_service_pb2.GetItemsRequest
    ) -> state_service_pb2.GetItemsResponse:
        tenant = checks.tenant(request.tenant)
        asked = request.item_ids
        if not asked:
            raise errors.invalid("item_ids", "item_ids must not be empty")
        if len(asked) > MAX_ITEM_IDS:
            raise errors.invalid("item_ids", f"at most {MAX_ITEM_IDS} item_ids are allowed")
        for n, item_id in enumerate(asked):
            checks.require(item_id, f"item_ids[{n}]")
        ids = list(dict.fromkeys(asked))
        found = await self._timed("get_items", self._backend.get_items(tenant, ids))
        reply = state_service_pb2.GetItemsResponse(
            missing_item_ids=[i for i in ids if i not in found]
        )
        records.add_items(reply.items, (found[i] for i in ids if i in found))
        return reply

    async def DeleteResponse(
        self, request: state_service_pb2.DeleteResponseRequest, context: Context
    ) -> state_service_pb2.DeleteResponseResponse:
        checks.check_strings(request)
        return await self._delete_response(request)

    async def _delete_response(
        self, request: state_service_pb2.DeleteResponseRequest
    ) -> state_service_pb2.DeleteResponseResponse:
        tenant = checks.tenant(request.tenant)
        checks.require(request.response_id, "response_id")
        await self._timed(
            "delete_response", self._backend.delete_response(tenant, request.response_id)
        )
        return state_service_pb2.DeleteResponseResponse()

    # --- compaction summaries -----------------------------------------------------------------

    async def PutCompaction(
        self, request: state_service_pb2.PutCompactionRequest, context: Context
    ) -> state_service_pb2.PutCompactionResponse:
        checks.check_strings(request)
        tenant = checks.tenant(request.tenant)
        compaction = checks.compaction(request.compaction)
        result = await self._timed(
            "put_compaction", self._backend.put_compaction(tenant, compaction)
        )
        return state_service_pb2.PutCompactionResponse(
            compaction=records.compaction_pb(result.compaction), replayed=result.replayed
        )

    async def GetCompaction(
        self, request: state_service_pb2.GetCompactionRequest, context: Context
    ) -> state_service_pb2.GetCompactionResponse:
        checks.check_strings(request)
        tenant = checks.tenant(request.tenant)
        checks.require(request.compaction_id, "compaction_id")
        found = await self._timed(
            "get_compaction", self._backend.get_compaction(tenant, request.compaction_id)
        )
        return state_service_pb2.GetCompactionResponse(compaction=records.compaction_pb(found))

    # --- conversations --------------------------------------------------------------------

    async def CreateConversation(
        self, request: state_service_pb2.CreateConversationRequest, context: Context
    ) -> state_service_pb2.CreateConversationResponse:
        checks.check_strings(request)
        return await self._create_conversation(request)

    async def _create_conversation(
        self, request: state_service_pb2.CreateConversationRequest
    ) -> state_service_pb2.CreateConversationResponse:
        tenant = checks.tenant(request.tenant)
        metadata = checks.metadata(request.metadata)
        items = checks.items(request.items, "items", set())
        created = await self._timed(
            "create_conversation",
            self._backend.create_conversation(tenant, metadata, items, request.request_id),
        )
        reply = state_service_pb2.CreateConversationResponse(
            conversation=records.conversation_pb(created.conversation), replayed=created.replayed
        )
        records.add_items(reply.items, created.items)
        return reply

    async def GetConversation(
        self, request: state_service_pb2.GetConversationRequest, context: Context
    ) -> state_service_pb2.GetConversationResponse:
        checks.check_strings(request)
        return await self._get_conversation(request)

    async def _get_conversation(
        self, request: state_service_pb2.GetConversationRequest
    ) -> state_service_pb2.GetConversationResponse:
        tenant = checks.tenant(request.tenant)
        if request.request_id:
            if request.conversation_id:
                raise errors.invalid("request_id", "set conversation_id or request_id, not both")
            conversation = await self._timed(
                "get_conversation",
                self._backend.get_conversation_by_request(tenant, request.request_id),
            )
        else:
            checks.require(request.conversation_id, "conversation_id")
            conversation = await self._timed(
                "get_conversation", self._backend.get_conversation(tenant, request.conversation_id)
            )
        return state_service_pb2.GetConversationResponse(
            conversation=records.conversation_pb(conversation)
        )

    async def UpdateConversation(
        self, request: state_service_pb2.UpdateConversationRequest, context: Context
    ) -> state_service_pb2.UpdateConversationResponse:
        checks.check_strings(request)
        return await self._update_conversation(request)

    async def _update_conversation(
        self, request: state_service_pb2.UpdateConversationRequest
    ) -> state_service_pb2.UpdateConversationResponse:
        tenant = checks.tenant(request.tenant)
        checks.require(request.conversation_id, "conversation_id")
        metadata = checks.metadata(request.metadata)
        conversation = await self._timed(
            "update_conversation",
            self._backend.update_conversation(tenant, request.conversation_id, metadata),
        )
        return state_service_pb2.UpdateConversationResponse(
            conversation=records.conversation_pb(conversation)
        )

    async def DeleteConversation(
        self, request: state_service_pb2.DeleteConversationRequest, context: Context
    ) -> state_service_pb2.DeleteConversationResponse:
        checks.check_strings(request)
        return await self._delete_conversation(request)

    async def _delete_conversation(
        self, request: state_service_pb2.DeleteConversationRequest
    ) -> state_service_pb2.DeleteConversationResponse:
        tenant = checks.tenant(request.tenant)
        checks.require(request.conversation_id, "conversation_id")
        await self._timed(
            "delete_conversation",
            self._backend.delete_conversation(tenant, request.conversation_id),
        )
        return state_service_pb2.DeleteConversationResponse()

    async def CreateConversationItems(
        self, request: state_service_pb2.CreateConversationItemsRequest, context: Context
    ) -> state_service_pb2.CreateConversationItemsResponse:
        checks.check_strings(request)
        return await self._create_items(request)

    async def _create_items(
        self, request: state_service_pb2.CreateConversationItemsRequest
    ) -> state_service_pb2.CreateConversationItemsResponse:
        tenant = checks.tenant(request.tenant)
        checks.require(request.conversation_id, "conversation_id")
        if not request.items:
            raise errors.invalid("items", "at least one item is required")
        items = checks.items(request.items, "items", set())
        expected = request.expected_version if request.HasField("expected_version") else None
        result = await self._timed(
            "append_items",
            self._backend.append_items(
                tenant, request.conversation_id, items, expected_version=expected
            ),
        )
        reply = state_service_pb2.CreateConversationItemsResponse(
            conversation_version=result.conversation_version, replayed=result.replayed
        )
        records.add_items(reply.items, result.items)
        return reply

    async def ListConversationItems(
        self, request: state_service_pb2.ListConversationItemsRequest, context: Context
    ) -> state_service_pb2.ListConversationItemsResponse:
        checks.check_strings(request)
        return await self._list_items(request)

    async def _list_items(
        self, request: state_service_pb2.ListConversationItemsRequest
    ) -> state_service_pb2.ListConversationItemsResponse:
        tenant = checks.tenant(request.tenant)
        checks.require(request.conversation_id, "conversation_id")
        if request.order not in (state_service_pb2.ORDER_ASC, state_service_pb2.ORDER_DESC):
            raise errors.invalid("order", "order must be ORDER_ASC or ORDER_DESC")
        if request.page_size < 0:
            raise errors.invalid("page_size", "page_size must not be negative")
        size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = (
            page_tokens.decode_page_token(
                request.page_token, request.conversation_id, request.order
            )
            if request.page_token
            else None
        )
        page = await self._timed(
            "list_items",
            self._backend.list_items(
                tenant,
                request.conversation_id,
                descending=request.order == state_service_pb2.ORDER_DESC,
                limit=size,
                after_sequence=after,
                after_item_id=request.after_item_id,
            ),
        )
        token = ""
        if page.has_more and page.items:
            token = page_tokens.encode_page_token(
                request.conversation_id, request.order, page.items[-1].sequence
            )
        reply = state_service_pb2.ListConversationItemsResponse(next_page_token=token)
        records.add_items(reply.items, page.items)
        return reply

    async def GetConversationItem(
        self, request: state_service_pb2.GetConversationItemRequest, context: Context
    ) -> state_service_pb2.GetConversationItemResponse:
        checks.check_strings(request)
        return await self._get_item(request)

    async def _get_item(
        self, request: state_service_pb2.GetConversationItemRequest
    ) -> state_service_pb2.GetConversationItemResponse:
        tenant = checks.tenant(request.tenant)
        checks.require(request.conversation_id, "conversation_id")
        checks.require(request.item_id, "item_id")
        item = await self._timed(
            "get_item",
            self._backend.get_item(tenant, request.conversation_id, request.item_id),
        )
        return state_service_pb2.GetConversationItemResponse(item=records.item_pb(item))

    async def DeleteConversationItem(
        self, request: state_service_pb2.DeleteConversationItemRequest, context: Context
    ) -> state_service_pb2.DeleteConversationItemResponse:
        checks.check_strings(request)
        return await self._delete_item(request)

    async def _delete_item(
        self, request: state_service_pb2.DeleteConversationItemRequest
    ) -> state_service_pb2.DeleteConversationItemResponse:
        tenant = checks.tenant(request.tenant)
        checks.require(request.conversation_id, "conversation_id")
        checks.require(request.item_id, "item_id")
        conversation = await self._timed(
            "delete_item",
            self._backend.delete_item(tenant, request.conversation_id, request.item_id),
        )
        return state_service_pb2.DeleteConversationItemResponse(
            conversation=records.conversation_pb(conversation)
        )

    # --- background responses: jobs, leases and event logs ----------------------------------

    async def EnqueueBackgroundResponse(
        self, request: state_service_pb2.EnqueueBackgroundResponseRequest, context: Context
    ) -> state_service_pb2.EnqueueBackgroundResponseResponse:
        checks.check_strings(request)
        return await self._enqueue(request)

    async def _enqueue(
        self, request: state_service_pb2.EnqueueBackgroundResponseRequest
    ) -> state_service_pb2.EnqueueBackgroundResponseResponse:
        tenant = checks.tenant(request.tenant)
        if not request.response.in_progress:
            raise errors.invalid(
                "response.in_progress", "a background response is enqueued running"
            )
        turn = checks.turn(request.response)
        lease_us = 0
        if request.owner:
            lease_us = checks.positive_us(request.lease_duration, "lease_duration")
        for name in ("max_pending_per_tenant", "max_pending_total"):
            if getattr(request, name) < 0:
                raise errors.invalid(name, f"{name} must not be negative")
        result = await self._timed(
            "enqueue_job",
            self._backend.enqueue_job(
                tenant,
                turn,
                request.spec,
                owner=request.owner,
                lease_us=lease_us,
                require_intact_chain=request.require_intact_chain,
                max_pending_per_tenant=request.max_pending_per_tenant,
                max_pending_total=request.max_pending_total,
            ),
        )
        put = result.put
        reply = state_service_pb2.EnqueueBackgroundResponseResponse(
            response=records.turn_pb(put.turn)
            if put.replayed
            else records.turn_header_pb(put.turn),
            replayed=put.replayed,
        )
        if result.job is not None:
            reply.job.CopyFrom(records.job_pb(result.job))
        return reply

    async def ClaimBackgroundResponse(
        self, request: state_service_pb2.ClaimBackgroundResponseRequest, context: Context
    ) -> state_service_pb2.ClaimBackgroundResponseResponse:
        checks.check_strings(request)
        return await self._claim(request)

    async def _claim(
        self, request: state_service_pb2.ClaimBackgroundResponseRequest
    ) -> state_service_pb2.ClaimBackgroundResponseResponse:
        if request.any_tenant:
            if request.tenant:
                raise errors.invalid("tenant", "tenant must be empty with any_tenant")
            tenant = ""
        else:
            tenant = checks.tenant(request.tenant)
        checks.require(request.owner, "owner")
        checks.require(request.request_id, "request_id")
        lease_us = checks.positive_us(request.lease_duration, "lease_duration")
        job = await self._timed(
            "claim_job",
            self._backend.claim_job(tenant, request.owner, lease_us, request.request_id),
        )
        reply = state_service_pb2.ClaimBackgroundResponseResponse()
        if job is not None:
            reply.job.CopyFrom(records.job_pb(job))
        return reply

    async def RenewBackgroundLease(
        self, request: state_service_pb2.RenewBackgroundLeaseRequest, context: Context
    ) -> state_service_pb2.RenewBackgroundLeaseResponse:
        checks.check_strings(request)
        return await self._renew(request)

    async def _renew(
        self, request: state_service_pb2.RenewBackgroundLeaseRequest
    ) -> state_service_pb2.RenewBackgroundLeaseResponse:
        tenant = checks.tenant(request.tenant)
        checks.require(request.response_id, "response_id")
        checks.lease_token(request.lease_token)
        lease_us = checks.positive_us(request.lease_duration, "lease_duration")
        renewal = await self._timed(
            "renew_lease",
            self._backend.renew_lease(tenant, request.response_id, request.lease_token, lease_us),
        )
        reply = state_service_pb2.RenewBackgroundLeaseResponse(
            cancel_requested=renewal.cancel_requested
        )
        if not renewal.cancel_requested:
            reply.lease_expire_time.FromMicroseconds(renewal.lease_expire_us)
        return reply

    async def AppendResponseEvents(
        self, request: state_service_pb2.AppendResponseEventsRequest, context: Context
    ) -> state_service_pb2.AppendResponseEventsResponse:
        checks.check_strings(request)
        return await self._append_events(request)

    async def _append_events(
        self, request: state_service_pb2.AppendResponseEventsRequest
    ) -> state_service_pb2.AppendResponseEventsResponse:
        tenant = checks.tenant(request.tenant)
        checks.require(request.response_id, "response_id")
        checks.lease_token(request.lease_token)
        if not request.events:
            raise errors.invalid("events", "at least one event is required")
        events = checks.events(request.events)
        last = await self._timed(
            "append_events",
            self._backend.append_events(tenant, request.response_id, request.lease_token, events),
        )
        self._wake(tenant, request.response_id)
        return state_service_pb2.AppendResponseEventsResponse(last_sequence_number=last)

    async def FinishBackgroundResponse(
        self, request: state_service_pb2.FinishBackgroundResponseRequest, context: Context
    ) -> state_service_pb2.FinishBackgroundResponseResponse:
        checks.check_strings(request)
        return await self._finish(request)

    async def _finish(
        self, request: state_service_pb2.FinishBackgroundResponseRequest
    ) -> state_service_pb2.FinishBackgroundResponseResponse:
        tenant = checks.tenant(request.tenant)
        if request.response.in_progress:
            raise errors.invalid("response.in_progress", "the final turn must not be running")
        turn = checks.turn(request.response)
        checks.lease_token(request.lease_token)
        events = checks.events(request.events)
        result = await self._timed(
            "finish_job",
            self._backend.finish_job(tenant, turn, request.lease_token, events),
        )
        self._wake(tenant, turn.id)
        return state_service_pb2.FinishBackgroundResponseResponse(
            response=records.turn_pb(result.turn)
            if result.replayed
            else records.turn_header_pb(result.turn),
            replayed=result.replayed,
            conversation_version=result.conversation_version,
        )

    async def CancelBackgroundResponse(
        self, request: state_service_pb2.CancelBackgroundResponseRequest, context: Context
    ) -> state_service_pb2.CancelBackgroundResponseResponse:
        checks.check_strings(request)
        return await self._cancel(request)

    async def _cancel(
        self, request: state_service_pb2.CancelBackgroundResponseRequest
    ) -> state_service_pb2.CancelBackgroundResponseResponse:
        tenant = checks.tenant(request.tenant)
        if request.response.in_progress:
            raise errors.invalid("response.in_progress", "the cancelled turn must not be running")
        turn = checks.turn(request.response)
        event = request.cancel_event_json
        if event and not checks.is_json_object(event):
            raise errors.invalid("cancel_event_json", "cancel_event_json must be a JSON object")
        result = await self._timed("cancel_job", self._backend.cancel_job(tenant, turn, event))
        if result.cancelled:
            self._wake(tenant, turn.id)
        return state_service_pb2.CancelBackgroundResponseResponse(
            response=records.turn_pb(result.turn), cancelled=result.cancelled
        )

    async def WatchResponseEvents(
        self, request: state_service_pb2.WatchResponseEventsRequest, context: Context
    ) -> AsyncIterator[state_service_pb2.WatchResponseEventsResponse]:
        """Sends the log after starting_after, then waits for more: woken by an append through
        this replica, or after the poll interval for the other replicas' appends."""
        tenant = checks.tenant(request.tenant)
        checks.require(request.response_id, "response_id")
        after = request.starting_after if request.HasField("starting_after") else -1
        if after < -1:
            raise errors.invalid("starting_after", "starting_after must be -1 or more")
        key = (tenant, request.response_id)
        wake = asyncio.Event()
        self._watchers.setdefault(key, set()).add(wake)
        try:
            while True:
                wake.clear()
                page = await self._timed(
                    "read_events",
                    self._backend.read_events(
                        tenant, request.response_id, after=after, limit=WATCH_BATCH
                    ),
                )
                if page.events:
                    reply = state_service_pb2.WatchResponseEventsResponse()
                    for event in page.events:
                        reply.events.add(sequence_number=event.sequence, json=event.json)
                    yield reply
                    after = page.events[-1].sequence
                if len(page.events) == WATCH_BATCH:
                    continue
                if page.final:
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), self._settings.watch_poll_interval_s)
        finally:
            watchers = self._watchers.get(key)
            if watchers is not None:
                watchers.discard(wake)
                if not watchers:
                    del self._watchers[key]

    def _wake(self, tenant: str, response_id: str) -> None:
        for wake in self._watchers.get((tenant, response_id), ()):
            wake.set()
