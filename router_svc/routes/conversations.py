"""The Conversations API: conversations and their items."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.grpcerrors import RemoteError
from respgw.state.v1 import resources_pb2, state_service_pb2
from router_svc import errors, turn, validate
from router_svc.http import (
    JSONResponse,
    list_page,
    query_limit,
    query_order,
    read_json,
    services,
    tenant,
)

MAX_ITEMS_PER_CALL = 20


def conversation_json(conv: resources_pb2.Conversation) -> dict[str, Any]:
    return {
        "id": conv.id,
        "object": "conversation",
        "created_at": conv.create_time.seconds,
        "metadata": dict(conv.metadata),
    }


def _conversation_id(request: Request) -> str:
    conversation_id: str = request.path_params["conversation_id"]
    return conversation_id


def _not_found(conversation_id: str) -> Any:
    def make(err: RemoteError) -> errors.ApiError:
        if err.reason == "ITEM_NOT_FOUND":
            item = err.metadata.get("item_id", "")
            return errors.NotFound(f"Item with id '{item}' not found.", code="not_found")
        return errors.conversation_not_found(conversation_id)

    return make


def _items(body: dict[str, Any], *, required: bool) -> list[dict[str, Any]]:
    raw = body.get("items")
    if raw is None:
        if required:
            raise errors.InvalidRequest(
                "Missing required parameter: 'items'.",
                param="items",
                code="missing_required_parameter",
            )
        return []
    items = validate.normalize_items(raw, param="items")
    if len(items) > MAX_ITEMS_PER_CALL:
        raise errors.InvalidRequest(
            f"Invalid 'items': array too long. Expected an array with maximum length "
            f"{MAX_ITEMS_PER_CALL}, but got an array with length {len(items)} instead.",
            param="items",
            code="array_above_max_length",
        )
    return items


def _metadata(body: dict[str, Any]) -> dict[str, str]:
    if body.get("metadata") is None:
        return {}
    return validate.parse_metadata(body["metadata"])


async def create_conversation(request: Request) -> Response:
    svc = services(request)
    who = tenant(request)
    body = await read_json(request)
    unknown = set(body) - {"items", "metadata"}
    if unknown:
        name = sorted(unknown)[0]
        raise errors.InvalidRequest(
            f"Unknown parameter: '{name}'.", param=name, code="unknown_parameter"
        )
    items = _items(body, required=False)
    req = state_service_pb2.CreateConversationRequest(
        tenant=who,
        metadata=_metadata(body),
        items=[turn.item_to_proto(i) for i in items],
        request_id=request.headers.get("idempotency-key", "").strip(),
    )
    reply = await svc.state.call("CreateConversation", req)
    return JSONResponse(conversation_json(reply.conversation))


async def get_conversation(request: Request) -> Response:
    svc = services(request)
    cid = _conversation_id(request)
    reply = await svc.state.call(
        "GetConversation",
        state_service_pb2.GetConversationRequest(tenant=tenant(request), conversation_id=cid),
        not_found=_not_found(cid),
    )
    return JSONResponse(conversation_json(reply.conversation))


async def update_conversation(request: Request) -> Response:
    svc = services(request)
    who = tenant(request)
    cid = _conversation_id(request)
    body = await read_json(request)
    if "metadata" not in body:
        raise errors.InvalidRequest(
            "Missing required parameter: 'metadata'.",
            param="metadata",
            code="missing_required_parameter",
        )
    reply = await svc.state.call(
        "UpdateConversation",
        state_service_pb2.UpdateConversationRequest(
            tenant=who, conversation_id=cid, metadata=_metadata(body)
        ),
        not_found=_not_found(cid),
    )
    return JSONResponse(conversation_json(reply.conversation))


async def delete_conversation(request: Request) -> Response:
    svc = services(request)
    who = tenant(request)
    cid = _conversation_id(request)
    await svc.state.call(
        "DeleteConversation",
        state_service_pb2.DeleteConversationRequest(tenant=who, conversation_id=cid),
        not_found=_not_found(cid),
    )
    # Execution sessions held for the conversation go with it (best effort, never fails the call).
    await svc.bootstrapper.release(tenant=who, conversation_id=cid)
    return JSONResponse({"id": cid, "object": "conversation.deleted", "deleted": True})


async def create_items(request: Request) -> Response:
    svc = services(request)
    who = tenant(request)
    cid = _conversation_id(request)
    body = await read_json(request)
    items = _items(body, required=True)
    if not items:
        raise errors.InvalidRequest(
            "Invalid 'items': empty array. Expected an array with minimum length 1.",
            param="items",
            code="empty_array",
        )
    reply = await svc.state.call(
        "CreateConversationItems",
        state_service_pb2.CreateConversationItemsRequest(
            tenant=who, conversation_id=cid, items=[turn.item_to_proto(i) for i in items]
        ),
        not_found=_not_found(cid),
        param="items",
    )
    return JSONResponse(list_page([turn.item_from_proto(i) for i in reply.items], False))


async def list_items(request: Request) -> Response:
    svc = services(request)
    cid = _conversation_id(request)
    limit = query_limit(request)
    order = query_order(request)
    after = request.query_params.get("after", "")
    reply = await svc.state.call(
        "ListConversationItems",
        state_service_pb2.ListConversationItemsRequest(
            tenant=tenant(request),
            conversation_id=cid,
            order=state_service_pb2.ORDER_ASC if order == "asc" else state_service_pb2.ORDER_DESC,
            page_size=limit,
            after_item_id=after,
        ),
        not_found=_not_found(cid),
        param="after",
    )
    data = [turn.item_from_proto(i) for i in reply.items]
    return JSONResponse(list_page(data, bool(reply.next_page_token)))


async def get_item(request: Request) -> Response:
    svc = services(request)
    cid = _conversation_id(request)
    reply = await svc.state.call(
        "GetConversationItem",
        state_service_pb2.GetConversationItemRequest(
            tenant=tenant(request), conversation_id=cid, item_id=request.path_params["item_id"]
        ),
        not_found=_not_found(cid),
    )
    return JSONResponse(turn.item_from_proto(reply.item))


async def delete_item(request: Request) -> Response:
    svc = services(request)
    cid = _conversation_id(request)
    reply = await svc.state.call(
        "DeleteConversationItem",
        state_service_pb2.DeleteConversationItemRequest(
            tenant=tenant(request), conversation_id=cid, item_id=request.path_params["item_id"]
        ),
        not_found=_not_found(cid),
    )
    return JSONResponse(conversation_json(reply.conversation))


routes = [
    Route("/v1/conversations", create_conversation, methods=["POST"]),
    Route("/v1/conversations/{conversation_id}", get_conversation, methods=["GET"]),
    Route("/v1/conversations/{conversation_id}", update_conversation, methods=["POST"]),
    Route("/v1/conversations/{conversation_id}", delete_conversation, methods=["DELETE"]),
    Route("/v1/conversations/{conversation_id}/items", create_items, methods=["POST"]),
    Route("/v1/conversations/{conversation_id}/items", list_items, methods=["GET"]),
    Route("/v1/conversations/{conversation_id}/items/{item_id}", get_item, methods=["GET"]),
    Route("/v1/conversations/{conversation_id}/items/{item_id}", delete_item, methods=["DELETE"]),
]
