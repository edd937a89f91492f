"""The state service's records as the router builds and reads them: the one module beside
``state_client`` that names generated state messages, so that turn.py and the routes never do.

Items travel as ``Item`` (the id and the item's JSON); a turn is stored as one ``StoredResponse``
inside a PutTurnRequest; a running response is ended by storing a copy of its record with the
final Response object (:func:`ended`). The request builders below take the route's values and
return the message the typed method of :class:`router_svc.state_client.StateClient` takes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from respgw.state.v1 import resources_pb2
from respgw.state.v1 import state_service_pb2 as pb

# The records the router reads (names for annotations; built only here).
StoredResponse = resources_pb2.StoredResponse
Conversation = resources_pb2.Conversation
Item = resources_pb2.Item
GetResponseReply = pb.GetResponseResponse
PutTurnReply = pb.PutTurnResponse
CreateConversationReply = pb.CreateConversationResponse
CreateConversationItemsReply = pb.CreateConversationItemsResponse


# --- items ---------------------------------------------------------------------------------------


def item_to_proto(item: Mapping[str, Any]) -> resources_pb2.Item:
    return resources_pb2.Item(id=str(item["id"]), json=orjson.dumps(item))


def item_from_proto(item: resources_pb2.Item) -> dict[str, Any]:
    parsed: dict[str, Any] = orjson.loads(item.json)
    return parsed


def items_from_proto(items: Iterable[resources_pb2.Item]) -> list[dict[str, Any]]:
    return [item_from_proto(i) for i in items]


# --- responses -----------------------------------------------------------------------------------


def response_of(stored: resources_pb2.StoredResponse) -> dict[str, Any]:
    """The Response object a record holds."""
    response: dict[str, Any] = orjson.loads(stored.response_json)
    return response


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
