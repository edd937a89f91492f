"""The state service's records as the router builds and reads them: the one module beside
``state_client`` that names generated state messages, so that turn.py and the routes never do.

Items travel as ``Item`` (the id and the item's JSON); a turn is stored as one ``StoredResponse``
inside a PutTurnRequest; a running response is ended by storing a copy of its record with the
final Response object (:func:`ended`). The request builders below take the route's values and
return the message the typed method of :class:`router_svc.state_client.StateClient` takes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeAlias, cast

import orjson
from google.protobuf import duration_pb2

from respgw.state.v1 import resources_pb2
from respgw.state.v1 import state_service_pb2 as pb
from router_svc import shapes
from router_svc.shapes import ResponseObject

# The records the router reads (names for annotations; built only here).
StoredResponse = resources_pb2.StoredResponse
Conversation = resources_pb2.Conversation
Item = resources_pb2.Item
GetResponseReply = pb.GetResponseResponse
PutTurnReply = pb.PutTurnResponse
# A PutTurnChunked request: its messages, made anew for each attempt (see put_turn_chunks).
Chunks: TypeAlias = Callable[[], Iterator[pb.PutTurnChunkedRequest]]
# A JSON never made whole: its size in bytes, and a function that makes it in pieces (each time
# anew), as router_svc.events.json_slices does.
SlicedJson: TypeAlias = tuple[int, Callable[[], Iterator[bytes]]]
CreateConversationReply = pb.CreateConversationResponse
CreateConversationItemsReply = pb.CreateConversationItemsResponse
BackgroundJob = resources_pb2.BackgroundJob
ResponseEvent = resources_pb2.ResponseEvent


# --- items ---------------------------------------------------------------------------------------


def item_to_proto(item: Mapping[str, Any]) -> resources_pb2.Item:
    return resources_pb2.Item(id=str(item["id"]), json=orjson.dumps(item))


def item_from_proto(item: resources_pb2.Item) -> shapes.Item:
    parsed: shapes.Item = orjson.loads(item.json)
    return parsed


def items_from_proto(items: Iterable[resources_pb2.Item]) -> list[shapes.Item]:
    return [item_from_proto(i) for i in items]


# --- responses -----------------------------------------------------------------------------------


def response_of(stored: resources_pb2.StoredResponse) -> ResponseObject:
    """The Response object a record holds."""
    # Parsed, not checked: the router stored it (a ResponseObject) and the state service keeps
    # it as it was given.
    return cast(ResponseObject, orjson.loads(stored.response_json))


def turn_record(
    *,
    response_id: str,
    previous_response_id: str,
    conversation_id: str,
    input_items: Iterable[Mapping[str, Any]],
    output_items: Iterable[Mapping[str, Any]],
    response: Mapping[str, Any],
    idempotency_key: str,
    events: list[dict[str, Any]] | None,
    in_progress: bool,
) -> resources_pb2.StoredResponse:
    """The record of one turn: its own input items, its output items and the Response object
    (with the stream's events when it streamed)."""
    return resources_pb2.StoredResponse(
        id=response_id,
        previous_response_id=previous_response_id,
        conversation_id=conversation_id,
        input_items=[item_to_proto(i) for i in input_items],
        output_items=[item_to_proto(i) for i in output_items],
        response_json=orjson.dumps(response),
        idempotency_key=idempotency_key,
        stream_events_json=orjson.dumps(events) if events else b"",
        in_progress=in_progress,
    )


def put_turn(
    tenant: str,
    record: resources_pb2.StoredResponse,
    *,
    require_intact_chain: bool = False,
    omit_stored_content: bool = False,
    expected_conversation_version: int | None = None,
) -> pb.PutTurnRequest:
    request = pb.PutTurnRequest(
        tenant=tenant,
        response=record,
        require_intact_chain=require_intact_chain,
        omit_stored_content=omit_stored_content,
    )
    if expected_conversation_version is not None:
        request.expected_conversation_version = expected_conversation_version
    return request


# A turn whose response JSON (with its event log) is at least this large is sent to the state
# service encoded here (encoded_put_turn), not as a message: filling a message copies every field,
# and encoding it copies them again, so that a long answer was held several times over.
LARGE_TURN_BYTES = 256 * 1024


def large_turn(response_json: bytes, events_json: bytes, json_size: int = 0) -> bool:
    """Whether a turn goes to PutTurn encoded already, or in pieces (see
    :data:`LARGE_TURN_BYTES`); ``json_size``: that of a response JSON not made whole."""
    return len(response_json) + json_size + len(events_json) >= LARGE_TURN_BYTES


def put_turn_request(
    tenant: str,
    *,
    response_id: str,
    previous_response_id: str,
    conversation_id: str,
    input_items: Iterable[Mapping[str, Any]],
    idempotency_key: str,
    in_progress: bool,
    output: Sequence[Mapping[str, Any]],
    output_json: Sequence[bytes],
    response_json: bytes | SlicedJson,
    events_json: bytes,
    encoded: bool,
    chunked: bool = False,
    combined: bool = False,
    require_intact_chain: bool = False,
    omit_stored_content: bool = False,
    expected_conversation_version: int | None = None,
) -> tuple[pb.PutTurnRequest | bytes | Chunks, resources_pb2.StoredResponse]:
    """The PutTurn request of one turn, and its record (what the history cache takes its input
    items from). The output items are ``output`` with their JSON ``output_json`` (encoded once by
    the caller). ``encoded`` (a large turn): the request comes as bytes, the record then holds no
    output items, response JSON or event log (they went straight into the bytes, see
    :func:`encoded_put_turn`); with ``chunked`` too, as the messages of a PutTurnChunked call
    (:func:`put_turn_chunks`) instead, and only then may ``response_json`` be a
    :data:`SlicedJson`; ``combined``: the output items go inside the response JSON
    (response_json_with_output_items, ``output`` not sent)."""
    put = pb.PutTurnRequest(
        tenant=tenant,
        require_intact_chain=require_intact_chain,
        omit_stored_content=omit_stored_content,
    )
    stored = put.response
    stored.id = response_id
    stored.previous_response_id = previous_response_id
    stored.conversation_id = conversation_id
    stored.input_items.extend(item_to_proto(i) for i in input_items)
    stored.idempotency_key = idempotency_key
    stored.in_progress = in_progress
    if expected_conversation_version is not None:
        put.expected_conversation_version = expected_conversation_version
    if encoded and chunked:
        if not combined:
            for item, data in zip(output, output_json, strict=True):
                put.response.output_items.add(id=str(item["id"]), json=data)
        return put_turn_chunks(put, response_json, events_json, combined=combined), stored
    assert isinstance(response_json, bytes)
    if encoded:
        if combined:
            return encoded_put_turn(put, [], [], response_json, events_json, combined=True), stored
        return encoded_put_turn(put, output, output_json, response_json, events_json), stored
    for item, data in zip(output, output_json, strict=True):
        stored.output_items.add(id=str(item["id"]), json=data)
    stored.response_json = response_json
    stored.stream_events_json = events_json
    return put, stored


def encoded_put_turn(
    put: pb.PutTurnRequest,
    output: Sequence[Mapping[str, Any]],
    output_json: Sequence[bytes],
    response_json: bytes,
    log: bytes,
    *,
    combined: bool = False,
) -> bytes:
    """``put`` with the turn's output items, response JSON and event log added, encoded: the
    small fields by protobuf, the large ones after them as a second occurrence of the ``response``
    field, which every protobuf parser merges into the first (a message field that occurs twice is
    merged). Each large field is copied once, into the bytes sent. ``combined``: the response JSON
    goes as response_json_with_output_items (``output`` then empty)."""
    parts: list[bytes] = []
    for item, data in zip(output, output_json, strict=True):
        item_id = str(item["id"]).encode()
        head = _len_field(_ITEM_ID, item_id) + item_id + _len_field(_ITEM_JSON, data)
        parts += (_len_field(_OUTPUT_ITEMS, b"", len(head) + len(data)) + head, data)
    json_field = _COMBINED if combined else _RESPONSE_JSON
    parts += (_len_field(json_field, response_json), response_json)
    if log:
        parts += (_len_field(_EVENTS, log), log)
    size = sum(map(len, parts))
    return b"".join([put.SerializeToString(), _len_field(_RESPONSE, b"", size), *parts])


# The most bytes of a large field one message of a PutTurnChunked call carries: each piece is held
# twice for a moment (in its message, and as gRPC sends or receives it), never the whole turn;
# 64 KiB rather than 256 KiB took the state service's peak for a 0.5 MB answer from 2.4-3.0x to
# 1.7-2.1x of it (bench_memory).
CHUNK_BYTES = 64 * 1024


def put_turn_chunks(
    put: pb.PutTurnRequest,
    response_json: bytes | SlicedJson,
    log: bytes,
    *,
    combined: bool = False,
) -> Chunks:
    """The messages of a PutTurnChunked call that stores ``put`` with ``response_json`` (as
    response_json_with_output_items when ``combined``; whole, or made in pieces) and the event
    log ``log``: the head, then pieces of at most CHUNK_BYTES, each made only as gRPC takes it."""
    json_field = "response_json_with_output_items" if combined else "response_json"
    json_size = len(response_json) if isinstance(response_json, bytes) else response_json[0]

    def chunks() -> Iterator[pb.PutTurnChunkedRequest]:
        head = pb.PutTurnChunkedHead(request=put, stream_events_json_size=len(log))
        setattr(head, f"{json_field}_size", json_size)
        yield pb.PutTurnChunkedRequest(head=head)
        for name, data in ((json_field, response_json), ("stream_events_json", log)):
            for piece in _pieces(data):
                message = pb.PutTurnChunkedRequest()
                setattr(message, name, piece)
                yield message

    return chunks


def _pieces(data: bytes | SlicedJson) -> Iterator[bytes]:
    """``data`` in pieces of CHUNK_BYTES (the last one shorter)."""
    if isinstance(data, bytes):
        view = memoryview(data)
        for start in range(0, len(view), CHUNK_BYTES):
            yield bytes(view[start : start + CHUNK_BYTES])
        return
    size, make = data
    pending = bytearray()
    made = 0
    for part in make():
        pending += part
        made += len(part)
        while len(pending) >= CHUNK_BYTES:
            yield bytes(pending[:CHUNK_BYTES])
            del pending[:CHUNK_BYTES]
    if made != size:  # never: the same value makes the same JSON
        raise RuntimeError(f"a JSON of {size} bytes came out as {made}")
    if pending:
        yield bytes(pending)


def _len_field(number: int, value: bytes, size: int | None = None) -> bytes:
    """The key and length of a length-delimited field (``size``, or that of ``value``)."""
    out = bytearray()
    for n in (number << 3 | 2, len(value) if size is None else size):
        while n > 0x7F:
            out.append(0x80 | (n & 0x7F))
            n >>= 7
        out.append(n)
    return bytes(out)


_STORED = resources_pb2.StoredResponse.DESCRIPTOR.fields_by_name
_RESPONSE = pb.PutTurnRequest.DESCRIPTOR.fields_by_name["response"].number
_OUTPUT_ITEMS = _STORED["output_items"].number
_RESPONSE_JSON = _STORED["response_json"].number
_COMBINED = _STORED["response_json_with_output_items"].number
_EVENTS = _STORED["stream_events_json"].number
_ITEM_ID = resources_pb2.Item.DESCRIPTOR.fields_by_name["id"].number
_ITEM_JSON = resources_pb2.Item.DESCRIPTOR.fields_by_name["json"].number


def ended(
    stored: resources_pb2.StoredResponse,
    response: Mapping[str, Any],
    *,
    keep_output: bool = True,
) -> resources_pb2.StoredResponse:
    """A running response's record ended with ``response`` (cancelled, failed): a copy without
    the times the state service sets, the stream's events or the running flag; without its
    output items unless ``keep_output``."""
    final = resources_pb2.StoredResponse()
    final.CopyFrom(stored)
    final.ClearField("create_time")
    final.ClearField("expire_time")
    if not keep_output:
        del final.output_items[:]
    final.response_json = orjson.dumps(response)
    final.stream_events_json = b""
    final.in_progress = False
    return final


def get_response(
    tenant: str, *, response_id: str = "", idempotency_key: str = ""
) -> pb.GetResponseRequest:
    """GetResponse by id, or by idempotency key (one of the selector is set)."""
    if idempotency_key:
        return pb.GetResponseRequest(tenant=tenant, idempotency_key=idempotency_key)
    return pb.GetResponseRequest(tenant=tenant, response_id=response_id)


def get_history(
    tenant: str, *, response_id: str = "", conversation_id: str = ""
) -> pb.GetHistoryRequest:
    """GetHistory anchored at a response, or at a conversation (one anchor is set)."""
    if conversation_id:
        return pb.GetHistoryRequest(tenant=tenant, conversation_id=conversation_id)
    return pb.GetHistoryRequest(tenant=tenant, response_id=response_id)


def delete_response(tenant: str, response_id: str) -> pb.DeleteResponseRequest:
    return pb.DeleteResponseRequest(tenant=tenant, response_id=response_id)


def get_items(tenant: str, item_ids: Iterable[str]) -> pb.GetItemsRequest:
    return pb.GetItemsRequest(tenant=tenant, item_ids=item_ids)


def put_compaction(tenant: str, compaction_id: str, summary: str) -> pb.PutCompactionRequest:
    return pb.PutCompactionRequest(
        tenant=tenant,
        compaction=resources_pb2.Compaction(id=compaction_id, summary=summary.encode()),
    )


def get_compaction(tenant: str, compaction_id: str) -> pb.GetCompactionRequest:
    return pb.GetCompactionRequest(tenant=tenant, compaction_id=compaction_id)


# --- background jobs and running responses -------------------------------------------------------
# The job of a background response (or of a streamed turn stored as running, see running.py) is
# held by a lease: its token comes with the claim (or the enqueue) and goes with every call that
# writes the response until it is finished.


def lease(seconds: float) -> duration_pb2.Duration:
    """A lease's duration, as the job calls take it."""
    duration = duration_pb2.Duration()
    duration.FromMicroseconds(int(seconds * 1_000_000))
    return duration


def enqueue_background(
    tenant: str,
    record: resources_pb2.StoredResponse,
    *,
    spec: bytes,
    owner: str,
    lease_duration: duration_pb2.Duration,
    require_intact_chain: bool = False,
    max_pending_per_tenant: int = 0,
    max_pending_total: int = 0,
) -> pb.EnqueueBackgroundResponseRequest:
    """The running ``record`` stored with its job, claimed by ``owner`` (0 caps: none)."""
    return pb.EnqueueBackgroundResponseRequest(
        tenant=tenant,
        response=record,
        spec=spec,
        owner=owner,
        lease_duration=lease_duration,
        require_intact_chain=require_intact_chain,
        max_pending_per_tenant=max_pending_per_tenant,
        max_pending_total=max_pending_total,
    )


def claim_any_background(
    owner: str, lease_duration: duration_pb2.Duration, request_id: str
) -> pb.ClaimBackgroundResponseRequest:
    """A claim of a queued or expired job of any tenant (the same ``request_id`` gets the same
    job again)."""
    return pb.ClaimBackgroundResponseRequest(
        any_tenant=True, owner=owner, lease_duration=lease_duration, request_id=request_id
    )


def renew_lease(
    tenant: str, response_id: str, lease_token: int, lease_duration: duration_pb2.Duration
) -> pb.RenewBackgroundLeaseRequest:
    return pb.RenewBackgroundLeaseRequest(
        tenant=tenant,
        response_id=response_id,
        lease_token=lease_token,
        lease_duration=lease_duration,
    )


def response_event(sequence_number: int, event_json: bytes) -> resources_pb2.ResponseEvent:
    """One event of a response's log: its number and its JSON (encoded by the caller)."""
    return resources_pb2.ResponseEvent(sequence_number=sequence_number, json=event_json)


def append_events(
    tenant: str,
    response_id: str,
    lease_token: int,
    events: Iterable[resources_pb2.ResponseEvent],
) -> pb.AppendResponseEventsRequest:
    return pb.AppendResponseEventsRequest(
        tenant=tenant, response_id=response_id, lease_token=lease_token, events=events
    )


def finish_background(
    tenant: str,
    lease_token: int,
    record: resources_pb2.StoredResponse,
    events: Iterable[resources_pb2.ResponseEvent] = (),
) -> pb.FinishBackgroundResponseRequest:
    """The final ``record`` of a job held with ``lease_token``, with the rest of its log."""
    return pb.FinishBackgroundResponseRequest(
        tenant=tenant, lease_token=lease_token, response=record, events=events
    )


def cancel_background(
    tenant: str, record: resources_pb2.StoredResponse, cancel_event_json: bytes
) -> pb.CancelBackgroundResponseRequest:
    """``record`` (ended as cancelled, see :func:`ended`) stored with its cancel event."""
    return pb.CancelBackgroundResponseRequest(
        tenant=tenant, response=record, cancel_event_json=cancel_event_json
    )


def watch_events(
    tenant: str, response_id: str, starting_after: int
) -> pb.WatchResponseEventsRequest:
    """The events of a response's log after ``starting_after`` (-1: all), then live."""
    return pb.WatchResponseEventsRequest(
        tenant=tenant, response_id=response_id, starting_after=starting_after
    )


# --- conversations -------------------------------------------------------------------------------


def conversation_json(conv: resources_pb2.Conversation) -> dict[str, Any]:
    return {
        "id": conv.id,
        "object": "conversation",
        "created_at": conv.create_time.seconds,
        "metadata": dict(conv.metadata),
    }


def create_conversation(
    tenant: str, metadata: Mapping[str, str], items: Iterable[Mapping[str, Any]], request_id: str
) -> pb.CreateConversationRequest:
    return pb.CreateConversationRequest(
        tenant=tenant,
        metadata=metadata,
        items=[item_to_proto(i) for i in items],
        request_id=request_id,
    )


def get_conversation(
    tenant: str, *, conversation_id: str = "", request_id: str = ""
) -> pb.GetConversationRequest:
    return pb.GetConversationRequest(
        tenant=tenant, conversation_id=conversation_id, request_id=request_id
    )


def update_conversation(
    tenant: str, conversation_id: str, metadata: Mapping[str, str]
) -> pb.UpdateConversationRequest:
    return pb.UpdateConversationRequest(
        tenant=tenant, conversation_id=conversation_id, metadata=metadata
    )


def delete_conversation(tenant: str, conversation_id: str) -> pb.DeleteConversationRequest:
    return pb.DeleteConversationRequest(tenant=tenant, conversation_id=conversation_id)


def create_conversation_items(
    tenant: str, conversation_id: str, items: Iterable[Mapping[str, Any]]
) -> pb.CreateConversationItemsRequest:
    return pb.CreateConversationItemsRequest(
        tenant=tenant, conversation_id=conversation_id, items=[item_to_proto(i) for i in items]
    )


def list_conversation_items(
    tenant: str, conversation_id: str, *, ascending: bool, page_size: int, after_item_id: str
) -> pb.ListConversationItemsRequest:
    return pb.ListConversationItemsRequest(
        tenant=tenant,
        conversation_id=conversation_id,
        order=pb.ORDER_ASC if ascending else pb.ORDER_DESC,
        page_size=page_size,
        after_item_id=after_item_id,
    )


def get_conversation_item(
    tenant: str, conversation_id: str, item_id: str
) -> pb.GetConversationItemRequest:
    return pb.GetConversationItemRequest(
        tenant=tenant, conversation_id=conversation_id, item_id=item_id
    )


def delete_conversation_item(
    tenant: str, conversation_id: str, item_id: str
) -> pb.DeleteConversationItemRequest:
    return pb.DeleteConversationItemRequest(
        tenant=tenant, conversation_id=conversation_id, item_id=item_id
    )
