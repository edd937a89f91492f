"""The StateService servicer: validates requests and converts between API messages and the
backend's dataclasses. Its errors are ``state_svc.errors``; one boundary
(:func:`gateway.grpcerrors.servicer`) maps them to a status with ErrorInfo for every RPC."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import grpc
import orjson
from google.protobuf import duration_pb2
from google.protobuf.internal.containers import RepeatedCompositeFieldContainer
from prometheus_client import Histogram

from gateway import gctune, grpcerrors, metrics
from gateway.grpcerrors import ServiceError
from gateway.logs import request_id_var
from respgw.state.v1 import resources_pb2, state_service_pb2, state_service_pb2_grpc
from state_svc import errors, wire
from state_svc.backends import base
from state_svc.backends.base import Backend
from state_svc.config import StateSettings

log = logging.getLogger(__name__)

T = TypeVar("T")
Context = grpc.aio.ServicerContext[Any, Any]

SERVICE_NAME = state_service_pb2.DESCRIPTOR.services_by_name["StateService"].full_name

MAX_METADATA_PAIRS = 16
DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100
# Most events in one WatchResponseEvents message (a longer backlog goes in several).
WATCH_BATCH = 256
# Most ids one GetItems call may ask for.
MAX_ITEM_IDS = 100

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
            check_strings(request)
            reply = await handler(request)
            getattr(slot(), which).CopyFrom(reply)
        except ServiceError as exc:
            code = exc.code.name
            _set_status(slot().status, exc)
        except Exception:
            log.exception("state call failed", extra={"rpc": method})
            code = "INTERNAL"
            _set_status(slot().status, errors.internal())
        finally:
            elapsed = time.perf_counter() - start
            metrics.GRPC_SERVER_LATENCY.labels(method).observe(elapsed)
            metrics.GRPC_SERVER_REQUESTS.labels(method, code).inc()
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
            BACKEND_LATENCY.labels(self._backend_name, op).observe(time.perf_counter() - start)

    # --- responses ------------------------------------------------------------------------

    async def PutTurn(
        self, request: state_service_pb2.PutTurnRequest | wire.LargePutTurn, context: Context
    ) -> state_service_pb2.PutTurnResponse:
        # A large request comes split, its large fields views of the bytes received (see wire).
        if isinstance(request, wire.LargePutTurn):
            try:
                check_strings(request.request)
                return await self._put_turn(request.request, request.large)
            finally:
                gctune.give_back()  # what the parsed JSON and the backend's copies took
        check_strings(request)
        return await self._put_turn(request)

    async def _put_turn(
        self,
        request: state_service_pb2.PutTurnRequest,
        large: Mapping[str, memoryview] | None = None,
    ) -> state_service_pb2.PutTurnResponse:
        tenant = _tenant(request.tenant)
        r = request.response
        _require(r.id, "response.id")
        # Each read of a bytes field is a copy of it: read once (a large field not at all).
        combined_json = _bytes_field(r, "response_json_with_output_items", large)
        response_json = _bytes_field(r, "response_json", large)
        combined = bool(combined_json)
        if combined:
            if response_json or r.output_items:
                raise _invalid(
                    "response.response_json_with_output_items",
                    "response_json_with_output_items replaces response_json and output_items",
                )
            response_json = combined_json
        del combined_json
        _require(response_json, "response.response_json")
        response = _json_object(response_json)
        if response is None:
            raise _invalid("response.response_json", "response_json must be a JSON object")
        if r.previous_response_id and r.conversation_id:
            raise _invalid(
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
            input_items=_items(r.input_items, "response.input_items", seen),
            output_items=(
                _output_of(response, seen, response_json)
                if combined
                else _items(r.output_items, "response.output_items", seen)
            ),
            idempotency_key=r.idempotency_key,
            stream_events_json=_bytes_field(r, "stream_events_json", large),
            in_progress=r.in_progress,
        )
        del response, response_json
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
                _turn_header_pb(result.turn)
                if request.omit_stored_content and not result.replayed
                else _turn_pb(base.owned(result.turn))
            ),
            replayed=result.replayed,
            conversation_version=result.conversation_version,
            history_max_items=self._settings.history_max_items,
            response_json_with_output_items=True,
        )

    async def GetResponse(
        self, request: state_service_pb2.GetResponseRequest, context: Context
    ) -> state_service_pb2.GetResponseResponse:
        check_strings(request)
        return await self._get_response(request)

    async def _get_response(
        self, request: state_service_pb2.GetResponseRequest
    ) -> state_service_pb2.GetResponseResponse:
        tenant = _tenant(request.tenant)
        which = request.WhichOneof("selector")
        if which is None or not getattr(request, which):
            raise _invalid("selector", "set response_id or idempotency_key")
        turn = await self._timed(
            "get_response",
            self._backend.get_response(
                tenant, response_id=request.response_id, idempotency_key=request.idempotency_key
            ),
        )
        return state_service_pb2.GetResponseResponse(response=_turn_pb(turn))

    async def GetHistory(
        self, request: state_service_pb2.GetHistoryRequest, context: Context
    ) -> state_service_pb2.GetHistoryResponse:
        check_strings(request)
        return await self._get_history(request)

    async def _get_history(
        self, request: state_service_pb2.GetHistoryRequest
    ) -> state_service_pb2.GetHistoryResponse:
        tenant = _tenant(request.tenant)
        which = request.WhichOneof("anchor")
        if which is None or not getattr(request, which):
            raise _invalid("anchor", "set response_id or conversation_id")
        if request.max_items < 0:
            raise _invalid("max_items", "max_items must not be negative")
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
        _add_items(reply.items, history.items)
        return reply

    async def GetItems(
        self, request: state_service_pb2.GetItemsRequest, context: Context
    ) -> state_service_pb2.GetItemsResponse:
        check_strings(request)
        return await self._get_items(request)

    async def _get_items(
        self, request: state_service_pb2.GetItemsRequest
    ) -> state_service_pb2.GetItemsResponse:
        tenant = _tenant(request.tenant)
        asked = request.item_ids
        if not asked:
            raise _invalid("item_ids", "item_ids must not be empty")
        if len(asked) > MAX_ITEM_IDS:
            raise _invalid("item_ids", f"at most {MAX_ITEM_IDS} item_ids are allowed")
        for n, item_id in enumerate(asked):
            _require(item_id, f"item_ids[{n}]")
        ids = list(dict.fromkeys(asked))
        found = await self._timed("get_items", self._backend.get_items(tenant, ids))
        reply = state_service_pb2.GetItemsResponse(
            missing_item_ids=[i for i in ids if i not in found]
        )
        _add_items(reply.items, (found[i] for i in ids if i in found))
        return reply

    async def DeleteResponse(
        self, request: state_service_pb2.DeleteResponseRequest, context: Context
    ) -> state_service_pb2.DeleteResponseResponse:
        check_strings(request)
        return await self._delete_response(request)

    async def _delete_response(
        self, request: state_service_pb2.DeleteResponseRequest
    ) -> state_service_pb2.DeleteResponseResponse:
        tenant = _tenant(request.tenant)
        _require(request.response_id, "response_id")
        await self._timed(
            "delete_response", self._backend.delete_response(tenant, request.response_id)
        )
        return state_service_pb2.DeleteResponseResponse()

    # --- conversations --------------------------------------------------------------------

    async def CreateConversation(
        self, request: state_service_pb2.CreateConversationRequest, context: Context
    ) -> state_service_pb2.CreateConversationResponse:
        check_strings(request)
        return await self._create_conversation(request)

    async def _create_conversation(
        self, request: state_service_pb2.CreateConversationRequest
    ) -> state_service_pb2.CreateConversationResponse:
        tenant = _tenant(request.tenant)
        metadata = _metadata(request.metadata)
        items = _items(request.items, "items", set())
        created = await self._timed(
            "create_conversation",
            self._backend.create_conversation(tenant, metadata, items, request.request_id),
        )
        reply = state_service_pb2.CreateConversationResponse(
            conversation=_conversation_pb(created.conversation), replayed=created.replayed
        )
        _add_items(reply.items, created.items)
        return reply

    async def GetConversation(
        self, request: state_service_pb2.GetConversationRequest, context: Context
    ) -> state_service_pb2.GetConversationResponse:
        check_strings(request)
        return await self._get_conversation(request)

    async def _get_conversation(
        self, request: state_service_pb2.GetConversationRequest
    ) -> state_service_pb2.GetConversationResponse:
        tenant = _tenant(request.tenant)
        if request.request_id:
            if request.conversation_id:
                raise _invalid("request_id", "set conversation_id or request_id, not both")
            conversation = await self._timed(
                "get_conversation",
                self._backend.get_conversation_by_request(tenant, request.request_id),
            )
        else:
            _require(request.conversation_id, "conversation_id")
            conversation = await self._timed(
                "get_conversation", self._backend.get_conversation(tenant, request.conversation_id)
            )
        return state_service_pb2.GetConversationResponse(
            conversation=_conversation_pb(conversation)
        )

    async def UpdateConversation(
        self, request: state_service_pb2.UpdateConversationRequest, context: Context
    ) -> state_service_pb2.UpdateConversationResponse:
        check_strings(request)
        return await self._update_conversation(request)

    async def _update_conversation(
        self, request: state_service_pb2.UpdateConversationRequest
    ) -> state_service_pb2.UpdateConversationResponse:
        tenant = _tenant(request.tenant)
        _require(request.conversation_id, "conversation_id")
        metadata = _metadata(request.metadata)
        conversation = await self._timed(
            "update_conversation",
            self._backend.update_conversation(tenant, request.conversation_id, metadata),
        )
        return state_service_pb2.UpdateConversationResponse(
            conversation=_conversation_pb(conversation)
        )

    async def DeleteConversation(
        self, request: state_service_pb2.DeleteConversationRequest, context: Context
    ) -> state_service_pb2.DeleteConversationResponse:
        check_strings(request)
        return await self._delete_conversation(request)

    async def _delete_conversation(
        self, request: state_service_pb2.DeleteConversationRequest
    ) -> state_service_pb2.DeleteConversationResponse:
        tenant = _tenant(request.tenant)
        _require(request.conversation_id, "conversation_id")
        await self._timed(
            "delete_conversation",
            self._backend.delete_conversation(tenant, request.conversation_id),
        )
        return state_service_pb2.DeleteConversationResponse()

    async def CreateConversationItems(
        self, request: state_service_pb2.CreateConversationItemsRequest, context: Context
    ) -> state_service_pb2.CreateConversationItemsResponse:
        check_strings(request)
        return await self._create_items(request)

    async def _create_items(
        self, request: state_service_pb2.CreateConversationItemsRequest
    ) -> state_service_pb2.CreateConversationItemsResponse:
        tenant = _tenant(request.tenant)
        _require(request.conversation_id, "conversation_id")
        if not request.items:
            raise _invalid("items", "at least one item is required")
        items = _items(request.items, "items", set())
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
        _add_items(reply.items, result.items)
        return reply

    async def ListConversationItems(
        self, request: state_service_pb2.ListConversationItemsRequest, context: Context
    ) -> state_service_pb2.ListConversationItemsResponse:
        check_strings(request)
        return await self._list_items(request)

    async def _list_items(
        self, request: state_service_pb2.ListConversationItemsRequest
    ) -> state_service_pb2.ListConversationItemsResponse:
        tenant = _tenant(request.tenant)
        _require(request.conversation_id, "conversation_id")
        if request.order not in (state_service_pb2.ORDER_ASC, state_service_pb2.ORDER_DESC):
            raise _invalid("order", "order must be ORDER_ASC or ORDER_DESC")
        if request.page_size < 0:
            raise _invalid("page_size", "page_size must not be negative")
        size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = (
            decode_page_token(request.page_token, request.conversation_id, request.order)
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
            token = encode_page_token(
                request.conversation_id, request.order, page.items[-1].sequence
            )
        reply = state_service_pb2.ListConversationItemsResponse(next_page_token=token)
        _add_items(reply.items, page.items)
        return reply

    async def GetConversationItem(
        self, request: state_service_pb2.GetConversationItemRequest, context: Context
    ) -> state_service_pb2.GetConversationItemResponse:
        check_strings(request)
        return await self._get_item(request)

    async def _get_item(
        self, request: state_service_pb2.GetConversationItemRequest
    ) -> state_service_pb2.GetConversationItemResponse:
        tenant = _tenant(request.tenant)
        _require(request.conversation_id, "conversation_id")
        _require(request.item_id, "item_id")
        item = await self._timed(
            "get_item",
            self._backend.get_item(tenant, request.conversation_id, request.item_id),
        )
        return state_service_pb2.GetConversationItemResponse(item=_item_pb(item))

    async def DeleteConversationItem(
        self, request: state_service_pb2.DeleteConversationItemRequest, context: Context
    ) -> state_service_pb2.DeleteConversationItemResponse:
        check_strings(request)
        return await self._delete_item(request)

    async def _delete_item(
        self, request: state_service_pb2.DeleteConversationItemRequest
    ) -> state_service_pb2.DeleteConversationItemResponse:
        tenant = _tenant(request.tenant)
        _require(request.conversation_id, "conversation_id")
        _require(request.item_id, "item_id")
        conversation = await self._timed(
            "delete_item",
            self._backend.delete_item(tenant, request.conversation_id, request.item_id),
        )
        return state_service_pb2.DeleteConversationItemResponse(
            conversation=_conversation_pb(conversation)
        )

    # --- background responses: jobs, leases and event logs ----------------------------------

    async def EnqueueBackgroundResponse(
        self, request: state_service_pb2.EnqueueBackgroundResponseRequest, context: Context
    ) -> state_service_pb2.EnqueueBackgroundResponseResponse:
        check_strings(request)
        return await self._enqueue(request)

    async def _enqueue(
        self, request: state_service_pb2.EnqueueBackgroundResponseRequest
    ) -> state_service_pb2.EnqueueBackgroundResponseResponse:
        tenant = _tenant(request.tenant)
        if not request.response.in_progress:
            raise _invalid("response.in_progress", "a background response is enqueued running")
        turn = _turn(request.response)
        lease_us = 0
        if request.owner:
            lease_us = _positive_us(request.lease_duration, "lease_duration")
        for name in ("max_pending_per_tenant", "max_pending_total"):
            if getattr(request, name) < 0:
                raise _invalid(name, f"{name} must not be negative")
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
            response=_turn_pb(put.turn) if put.replayed else _turn_header_pb(put.turn),
            replayed=put.replayed,
        )
        if result.job is not None:
            reply.job.CopyFrom(_job_pb(result.job))
        return reply

    async def ClaimBackgroundResponse(
        self, request: state_service_pb2.ClaimBackgroundResponseRequest, context: Context
    ) -> state_service_pb2.ClaimBackgroundResponseResponse:
        check_strings(request)
        return await self._claim(request)

    async def _claim(
        self, request: state_service_pb2.ClaimBackgroundResponseRequest
    ) -> state_service_pb2.ClaimBackgroundResponseResponse:
        if request.any_tenant:
            if request.tenant:
                raise _invalid("tenant", "tenant must be empty with any_tenant")
            tenant = ""
        else:
            tenant = _tenant(request.tenant)
        _require(request.owner, "owner")
        _require(request.request_id, "request_id")
        lease_us = _positive_us(request.lease_duration, "lease_duration")
        job = await self._timed(
            "claim_job",
            self._backend.claim_job(tenant, request.owner, lease_us, request.request_id),
        )
        reply = state_service_pb2.ClaimBackgroundResponseResponse()
        if job is not None:
            reply.job.CopyFrom(_job_pb(job))
        return reply

    async def RenewBackgroundLease(
        self, request: state_service_pb2.RenewBackgroundLeaseRequest, context: Context
    ) -> state_service_pb2.RenewBackgroundLeaseResponse:
        check_strings(request)
        return await self._renew(request)

    async def _renew(
        self, request: state_service_pb2.RenewBackgroundLeaseRequest
    ) -> state_service_pb2.RenewBackgroundLeaseResponse:
        tenant = _tenant(request.tenant)
        _require(request.response_id, "response_id")
        _lease_token(request.lease_token)
        lease_us = _positive_us(request.lease_duration, "lease_duration")
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
        check_strings(request)
        return await self._append_events(request)

    async def _append_events(
        self, request: state_service_pb2.AppendResponseEventsRequest
    ) -> state_service_pb2.AppendResponseEventsResponse:
        tenant = _tenant(request.tenant)
        _require(request.response_id, "response_id")
        _lease_token(request.lease_token)
        if not request.events:
            raise _invalid("events", "at least one event is required")
        events = _events(request.events)
        last = await self._timed(
            "append_events",
            self._backend.append_events(tenant, request.response_id, request.lease_token, events),
        )
        self._wake(tenant, request.response_id)
        return state_service_pb2.AppendResponseEventsResponse(last_sequence_number=last)

    async def FinishBackgroundResponse(
        self, request: state_service_pb2.FinishBackgroundResponseRequest, context: Context
    ) -> state_service_pb2.FinishBackgroundResponseResponse:
        check_strings(request)
        return await self._finish(request)

    async def _finish(
        self, request: state_service_pb2.FinishBackgroundResponseRequest
    ) -> state_service_pb2.FinishBackgroundResponseResponse:
        tenant = _tenant(request.tenant)
        if request.response.in_progress:
            raise _invalid("response.in_progress", "the final turn must not be running")
        turn = _turn(request.response)
        _lease_token(request.lease_token)
        events = _events(request.events)
        result = await self._timed(
            "finish_job",
            self._backend.finish_job(tenant, turn, request.lease_token, events),
        )
        self._wake(tenant, turn.id)
        return state_service_pb2.FinishBackgroundResponseResponse(
            response=_turn_pb(result.turn) if result.replayed else _turn_header_pb(result.turn),
            replayed=result.replayed,
            conversation_version=result.conversation_version,
        )

    async def CancelBackgroundResponse(
        self, request: state_service_pb2.CancelBackgroundResponseRequest, context: Context
    ) -> state_service_pb2.CancelBackgroundResponseResponse:
        check_strings(request)
        return await self._cancel(request)

    async def _cancel(
        self, request: state_service_pb2.CancelBackgroundResponseRequest
    ) -> state_service_pb2.CancelBackgroundResponseResponse:
        tenant = _tenant(request.tenant)
        if request.response.in_progress:
            raise _invalid("response.in_progress", "the cancelled turn must not be running")
        turn = _turn(request.response)
        event = request.cancel_event_json
        if event and not _is_json_object(event):
            raise _invalid("cancel_event_json", "cancel_event_json must be a JSON object")
        result = await self._timed("cancel_job", self._backend.cancel_job(tenant, turn, event))
        if result.cancelled:
            self._wake(tenant, turn.id)
        return state_service_pb2.CancelBackgroundResponseResponse(
            response=_turn_pb(result.turn), cancelled=result.cancelled
        )

    async def WatchResponseEvents(
        self, request: state_service_pb2.WatchResponseEventsRequest, context: Context
    ) -> AsyncIterator[state_service_pb2.WatchResponseEventsResponse]:
        """Sends the log after starting_after, then waits for more: woken by an append through
        this replica, or after the poll interval for the other replicas' appends."""
        tenant = _tenant(request.tenant)
        _require(request.response_id, "response_id")
        after = request.starting_after if request.HasField("starting_after") else -1
        if after < -1:
            raise _invalid("starting_after", "starting_after must be -1 or more")
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


def _turn(r: resources_pb2.StoredResponse) -> base.Turn:
    """A turn sent to the background RPCs, checked as PutTurn checks its turn."""
    _require(r.id, "response.id")
    if r.response_json_with_output_items:
        raise _invalid(
            "response.response_json_with_output_items",
            "response_json_with_output_items is for PutTurn",
        )
    _require(r.response_json, "response.response_json")
    if not _is_json_object(r.response_json):
        raise _invalid("response.response_json", "response_json must be a JSON object")
    if r.previous_response_id and r.conversation_id:
        raise _invalid(
            "response.conversation_id",
            "a turn cannot have both previous_response_id and conversation_id",
        )
    seen: set[str] | None = set() if r.conversation_id else None
    return base.Turn(
        id=r.id,
        response_json=r.response_json,
        previous_response_id=r.previous_response_id,
        conversation_id=r.conversation_id,
        input_items=_items(r.input_items, "response.input_items", seen),
        output_items=_items(r.output_items, "response.output_items", seen),
        idempotency_key=r.idempotency_key,
        stream_events_json=r.stream_events_json,
        in_progress=r.in_progress,
    )


def _positive_us(duration: duration_pb2.Duration, field: str) -> int:
    micros = duration.seconds * 1_000_000 + duration.nanos // 1000
    if micros <= 0:
        raise _invalid(field, f"{field} must be positive")
    return micros


def _lease_token(token: int) -> None:
    if token < 1:
        raise _invalid("lease_token", "lease_token must be 1 or more")


def _events(events: Sequence[resources_pb2.ResponseEvent]) -> list[base.Event]:
    """Checks an append's events: JSON objects with consecutive sequence numbers."""
    out: list[base.Event] = []
    for n, event in enumerate(events):
        if event.sequence_number < 0 or (n and event.sequence_number != out[-1].sequence + 1):
            raise _invalid(
                f"events[{n}].sequence_number", "events must have consecutive sequence numbers"
            )
        if not _is_json_object(event.json):
            raise _invalid(f"events[{n}].json", "an event must be a JSON object")
        out.append(base.Event(event.sequence_number, event.json))
    return out


def _job_pb(job: base.Job) -> resources_pb2.BackgroundJob:
    msg = resources_pb2.BackgroundJob(
        tenant=job.tenant,
        response_id=job.response_id,
        spec=job.spec,
        lease_token=job.lease_token,
        owner=job.owner,
        last_sequence_number=job.last_sequence,
    )
    msg.lease_expire_time.FromMicroseconds(job.lease_expire_us)
    msg.create_time.FromMicroseconds(job.create_time_us)
    return msg


# --- every request's strings, before any handler -------------------------------------------

MAX_ID_CHARS = 512


def check_strings(request: Any, prefix: str = "") -> None:
    """Refuses a request whose tenant, ids, keys or owners (every string field, and those of its
    messages and items) are over MAX_ID_CHARS characters or hold a NUL: INVALID_ARGUMENT naming
    the field, before anything is read or written (PostgreSQL cannot store a NUL, and no stored
    id is that long); metadata keys and values likewise. JSON (bytes) is checked elsewhere."""
    for fd, value in request.ListFields():
        name = f"{prefix}{fd.name}"
        if isinstance(value, str):
            _check_string(name, value)
        elif fd.type == fd.TYPE_STRING and fd.is_repeated:
            for n, element in enumerate(value):
                _check_string(f"{name}[{n}]", element)
        elif fd.type != fd.TYPE_MESSAGE:
            continue
        elif fd.message_type.GetOptions().map_entry:
            for key, item in value.items():
                _check_string(f"{name}[{key[:32]}]", key)
                if isinstance(item, str):
                    _check_string(f"{name}[{key[:32]}]", item)
        else:
            if fd.is_repeated:
                for n, element in enumerate(value):
                    check_strings(element, f"{name}[{n}].")
            elif fd.message_type.full_name.startswith("respgw."):
                check_strings(value, f"{name}.")


def _check_string(name: str, value: str) -> None:
    if len(value) > MAX_ID_CHARS or "\x00" in value:
        raise _invalid(name, f"{name} must be at most {MAX_ID_CHARS} characters, without NUL")


def _set_status(status: state_service_pb2.CallStatus, error: ServiceError) -> None:
    status.code = error.code.value[0]
    status.message = error.message
    status.reason = error.reason
    status.domain = error.domain
    status.metadata.update(error.metadata)


# --- validation ---------------------------------------------------------------------------


_invalid = errors.invalid


def _tenant(tenant: str) -> str:
    if not tenant:
        raise errors.tenant_required()
    return tenant


def _require(value: str | bytes | memoryview, field: str) -> None:
    if not value:
        raise _invalid(field, f"{field} is required")


def _bytes_field(
    r: resources_pb2.StoredResponse, name: str, large: Mapping[str, memoryview] | None
) -> bytes | memoryview:
    """A bytes field of a stored response: its view in ``large`` when the request was split
    there (see wire), else the field (a copy)."""
    if large is not None and name in large:
        return large[name]
    value: bytes = getattr(r, name)
    return value


def _is_json_object(data: bytes) -> bool:
    try:
        return isinstance(orjson.loads(data), dict)
    except orjson.JSONDecodeError:
        return False


def _json_object(data: bytes | memoryview) -> dict[str, Any] | None:
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _output_of(
    response: dict[str, Any], seen: set[str] | None, source: bytes | memoryview
) -> tuple[base.Item, ...]:
    """The output items of a turn written with response_json_with_output_items: those of its
    response's "output" array, each re-encoded (see the proto). A large item whose encoding is
    in the request received as it is (the router encodes both alike) is a view of it there (see
    state_svc.wire), not a copy held while the turn is written."""
    field = "response.response_json_with_output_items"
    output = response.get("output")
    if not isinstance(output, list):
        raise _invalid(field, 'response_json has no "output" array to take the output items from')
    out = []
    for n, item in enumerate(output):
        item_id = item.get("id") if isinstance(item, dict) else None
        if not isinstance(item_id, str) or not item_id:
            raise _invalid(field, f'output[{n}] of response_json is not an object with an "id"')
        _check_string(f"response_json.output[{n}].id", item_id)
        if seen is not None:
            if item_id in seen:
                raise _invalid(field, f"item id {item_id} appears twice")
            seen.add(item_id)
        out.append(base.Item(id=item_id, json=_shared(orjson.dumps(item), source)))
    return tuple(out)


def _shared(data: bytes, source: bytes | memoryview) -> bytes | memoryview:
    """``data``, or the same bytes in ``source``'s request (a view) when it is large."""
    if len(data) < wire.LARGE_REQUEST_BYTES or not isinstance(source, memoryview):
        return data
    raw = source.obj
    at = raw.find(data) if isinstance(raw, bytes) else -1
    return data if at < 0 else memoryview(raw)[at : at + len(data)]


def _items(
    items: Sequence[resources_pb2.Item], field: str, seen: set[str] | None
) -> tuple[base.Item, ...]:
    """Checks items (id, JSON object, and unique ids when ``seen`` is given) and converts them;
    server-set fields are ignored."""
    out = []
    for n, item in enumerate(items):
        item_id, data = item.id, item.json  # each read is a copy: read once
        _require(item_id, f"{field}[{n}].id")
        _require(data, f"{field}[{n}].json")
        if not _is_json_object(data):
            raise _invalid(f"{field}[{n}].json", "item JSON must be a JSON object")
        if seen is not None:
            if item_id in seen:
                raise _invalid(f"{field}[{n}].id", f"item id {item_id} appears twice")
            seen.add(item_id)
        out.append(base.Item(id=item_id, json=data))
    return tuple(out)


def _metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    if len(metadata) > MAX_METADATA_PAIRS:
        raise _invalid("metadata", f"at most {MAX_METADATA_PAIRS} metadata pairs are allowed")
    return dict(metadata)


# --- page tokens --------------------------------------------------------------------------

# Not a secret: the check value only tells a token this service issued from a mangled or
# hand-made one. Knowing a sequence number gives a caller nothing it could not list anyway.
_TOKEN_KEY = b"respgw.state.v1.page-token"


def encode_page_token(conversation_id: str, order: int, sequence: int) -> str:
    payload = orjson.dumps([1, conversation_id, order, sequence])
    check = hashlib.blake2b(payload, key=_TOKEN_KEY, digest_size=8).digest()
    return base64.urlsafe_b64encode(check + payload).rstrip(b"=").decode()


def decode_page_token(token: str, conversation_id: str, order: int) -> int:
    """The last sequence of the previous page, or INVALID_ARGUMENT when the token was not
    issued for this conversation and order."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        check, payload = raw[:8], raw[8:]
        if hashlib.blake2b(payload, key=_TOKEN_KEY, digest_size=8).digest() != check:
            raise ValueError("check value")
        version, conv, token_order, sequence = orjson.loads(payload)
    except (ValueError, TypeError) as exc:
        raise _invalid("page_token", "page_token is not a token this service issued") from exc
    if version != 1 or conv != conversation_id or token_order != order:
        raise _invalid("page_token", "page_token was issued for another listing")
    if not isinstance(sequence, int) or sequence < 0:
        raise _invalid("page_token", "page_token is not a token this service issued")
    return sequence


# --- conversions --------------------------------------------------------------------------


def _add_items(
    target: RepeatedCompositeFieldContainer[resources_pb2.Item], items: Iterable[base.Item]
) -> None:
    """Appends ``items`` to a repeated field in place (half the cost of building each Item
    message and copying it in: this is most of GetHistory's CPU time)."""
    add = target.add
    for item in items:
        # Bytes: a view (see base.Item) is only in a turn being written, answered owned.
        msg = add(id=item.id, sequence=item.sequence, json=item.json)
        msg.create_time.FromMicroseconds(item.create_time_us)


def _item_pb(item: base.Item) -> resources_pb2.Item:
    msg = resources_pb2.Item(id=item.id, sequence=item.sequence, json=bytes(item.json))
    msg.create_time.FromMicroseconds(item.create_time_us)
    return msg


def _turn_pb(turn: base.Turn) -> resources_pb2.StoredResponse:
    msg = resources_pb2.StoredResponse(
        id=turn.id,
        previous_response_id=turn.previous_response_id,
        conversation_id=turn.conversation_id,
        response_json=bytes(turn.response_json),  # no copy of bytes
        idempotency_key=turn.idempotency_key,
        stream_events_json=bytes(turn.stream_events_json),
        in_progress=turn.in_progress,
    )
    _add_items(msg.input_items, turn.input_items)
    _add_items(msg.output_items, turn.output_items)
    msg.create_time.FromMicroseconds(turn.create_time_us)
    if turn.expire_time_us is not None:
        msg.expire_time.FromMicroseconds(turn.expire_time_us)
    return msg


def _turn_header_pb(turn: base.Turn) -> resources_pb2.StoredResponse:
    """Only the server-set fields of a stored turn (PutTurnRequest.omit_stored_content)."""
    msg = resources_pb2.StoredResponse(id=turn.id)
    msg.create_time.FromMicroseconds(turn.create_time_us)
    if turn.expire_time_us is not None:
        msg.expire_time.FromMicroseconds(turn.expire_time_us)
    return msg


def _conversation_pb(conversation: base.Conversation) -> resources_pb2.Conversation:
    msg = resources_pb2.Conversation(
        id=conversation.id, metadata=dict(conversation.metadata), version=conversation.version
    )
    msg.create_time.FromMicroseconds(conversation.create_time_us)
    if conversation.expire_time_us is not None:
        msg.expire_time.FromMicroseconds(conversation.expire_time_us)
    return msg
