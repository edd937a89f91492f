"""The Conversations API: conversations and their items."""

from __future__ import annotations

import hashlib
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from router_svc import checks, errors, idempotency, include, inputs, state_records
from router_svc.http import (
    MAX_ID_CHARS,
    JSONResponse,
    idempotency_key,
    list_page,
    parse_json,
    query_limit,
    query_order,
    read_body,
    read_json,
    sdk_attempt,
    services,
    shown_id,
    tenant,
    valid_id,
)
from router_svc.idempotency import RETRY_WINDOW_S
from router_svc.ids import new_id
from router_svc.services import Services
from router_svc.shapes import Item

MAX_ITEMS_PER_CALL = 20
# The request_id of a conversation an SDK call's first attempt creates: "sdk-retry:HASH:WINDOW".
_SDK_PREFIX = "sdk-retry:"


def _conversation_id(request: Request) -> str:
    conversation_id: str = request.path_params["conversation_id"]
    if not valid_id(conversation_id):
        # No conversation has such an id; the state service is not asked.
        raise errors.conversation_not_found(shown_id(conversation_id))
    return conversation_id


def _item_id(request: Request) -> str:
    item_id: str = request.path_params["item_id"]
    if not valid_id(item_id):
        raise errors.NotFound(f"Item with id '{shown_id(item_id)}' not found.", code="not_found")
    return item_id


def _item_not_found(item_id: str) -> errors.NotFound:
    return errors.NotFound(f"Item with id '{shown_id(item_id)}' not found.", code="not_found")


def _items(body: dict[str, Any], *, required: bool) -> list[Item]:
    raw = body.get("items")
    if raw is None:
        if required:
            raise errors.InvalidRequest(
                "Missing required parameter: 'items'.",
                param="items",
                code="missing_required_parameter",
            )
        return []
    items = inputs.normalize_items(raw, param="items")
    for i, item in enumerate(items):
        if not valid_id(str(item["id"])):
            raise errors.invalid_id(f"items[{i}].id", MAX_ID_CHARS)
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
    return checks.metadata(body["metadata"])


def _minted(body: dict[str, Any]) -> list[int]:
    """The indexes of the items whose id the router mints (the client sent none)."""
    raw = body.get("items")
    if not isinstance(raw, list):
        return []
    return [
        i
        for i, entry in enumerate(raw)
        if not (isinstance(entry, dict) and entry.get("id") is not None)
    ]


def _with_ids(items: list[Item], minted: list[int], seed: str) -> list[Item]:
    """``items`` with the ids the router minted replaced by ids derived from ``seed`` (the same
    on every attempt of one request), keeping each id's prefix."""
    out = list(items)
    for i in minted:
        prefix = str(items[i]["id"]).split("_", 1)[0]
        digest = hashlib.sha256(f"{seed}\x00{i}".encode()).hexdigest()[:48]
        out[i] = {**items[i], "id": f"{prefix}_{digest}"}
    return out


def _with_new_ids(items: list[Item], minted: list[int]) -> list[Item]:
    out = list(items)
    for i in minted:
        out[i] = {**items[i], "id": new_id(str(items[i]["id"]).split("_", 1)[0])}
    return out


async def create_conversation(request: Request) -> Response:
    svc = services(request)
    who = tenant(request)
    raw = await read_body(request)
    body = parse_json(raw)
    unknown = set(body) - {"items", "metadata"}
    if unknown:
        name = sorted(unknown)[0]
        raise errors.InvalidRequest(
            f"Unknown parameter: '{name}'.", param=name, code="unknown_parameter"
        )
    items = _items(body, required=False)
    new = _NewConversation(svc, who, _metadata(body), items, _minted(body))
    key = idempotency_key(request)
    if key:
        # A retry with the Idempotency-Key sends the same items: with the same ids.
        made = await new.create(key, f"conversation\x00{who}\x00{key}")
        return _answer(made.conversation)
    attempt = sdk_attempt(request)
    if attempt is None:
        # A request_id all the same, so that the router's own retries of the call (on
        # UNAVAILABLE) never make a second conversation; the client's retry would.
        return _answer((await new.create_fresh()).conversation)
    # An official SDK's call: its retries send the same body, so the first attempt's request_id
    # is derived from the tenant, the body and the time window (as for POST /v1/responses).
    body_hash = hashlib.sha256(f"{who}\x00".encode() + raw).hexdigest()[:40]
    window = int(time.time() // RETRY_WINDOW_S)

    def request_id(w: int) -> str:
        return f"{_SDK_PREFIX}{body_hash}:{w}"

    if attempt > 0:
        earlier = await new.made_by(request_id(window - 1))
        if earlier is not None and new.untouched(earlier):
            return _answer(earlier)
    reply = await new.create(request_id(window), request_id(window))
    if reply.replayed and (attempt == 0 or not new.untouched(reply.conversation)):
        # A first attempt whose body an earlier call of the window already sent is a new
        # conversation on purpose; and a conversation that was used since it was made is not the
        # one a lost first attempt made (nobody got that one's id): both get one of their own.
        reply = await new.create_fresh()
    return _answer(reply.conversation)


def _answer(conv: state_records.Conversation) -> Response:
    return JSONResponse(state_records.conversation_json(conv))


class _NewConversation:
    """The CreateConversation calls of one POST /v1/conversations."""

    def __init__(
        self,
        svc: Services,
        who: str,
        metadata: dict[str, str],
        items: list[Item],
        minted: list[int],
    ) -> None:
        self.svc = svc
        self.who = who
        self.metadata = metadata
        self.items = items
        self.minted = minted

    async def create(self, request_id: str, seed: str) -> state_records.CreateConversationReply:
        """CreateConversation under ``request_id`` (one a retry of the request finds), the ids
        the router mints derived from ``seed``."""
        items = _with_ids(self.items, self.minted, seed)
        return await self._call(request_id, items, retry_is_safe=True)

    async def create_fresh(self) -> state_records.CreateConversationReply:
        """A new conversation under a request_id of its own: one that no retry finds."""
        items = _with_new_ids(self.items, self.minted)
        return await self._call(new_id("creq"), items, retry_is_safe=False)

    async def _call(
        self, request_id: str, items: list[Item], retry_is_safe: bool
    ) -> state_records.CreateConversationReply:
        req = state_records.create_conversation(self.who, self.metadata, items, request_id)
        try:
            reply = await self.svc.state.create_conversation(req)
        except errors.ApiError as exc:
            # A retry that cannot find what this call may have made could make a second
            # conversation (README, "Retries").
            exc.retry_header(retry_is_safe=retry_is_safe)
            raise
        return reply

    async def made_by(self, request_id: str) -> state_records.Conversation | None:
        """The conversation a CreateConversation call with ``request_id`` made, if any."""
        try:
            found = await self.svc.state.find(
                self.svc.state.get_conversation(
                    state_records.get_conversation(self.who, request_id=request_id)
                )
            )
        except errors.ApiError as exc:
            exc.retry_header(retry_is_safe=True)  # a read: nothing was written
            raise
        return None if found is None else found.conversation

    def untouched(self, conv: state_records.Conversation) -> bool:
        """Whether ``conv`` is as this request would have made it: never appended to or updated
        since, as a conversation whose id nobody got."""
        return conv.version == len(self.items) and dict(conv.metadata) == self.metadata


async def get_conversation(request: Request) -> Response:
    svc = services(request)
    cid = _conversation_id(request)
    reply = await svc.state.get_conversation(
        state_records.get_conversation(tenant(request), conversation_id=cid)
    )
    return JSONResponse(state_records.conversation_json(reply.conversation))


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
    try:
        reply = await svc.state.update_conversation(
            state_records.update_conversation(who, cid, _metadata(body))
        )
    except errors.ApiError as exc:
        exc.retry_header(retry_is_safe=True)  # replacing the metadata again changes nothing
        raise
    return JSONResponse(state_records.conversation_json(reply.conversation))


async def delete_conversation(request: Request) -> Response:
    svc = services(request)
    who = tenant(request)
    cid = _conversation_id(request)
    try:
        await svc.state.delete_conversation(state_records.delete_conversation(who, cid))
    except errors.ApiError as exc:
        exc.retry_header(retry_is_safe=True)  # a replay is a 404, never a second delete
        raise
    # Execution sessions held for the conversation go with it (best effort, never fails the call).
    await svc.bootstrapper.release(tenant=who, conversation_id=cid)
    return JSONResponse({"id": cid, "object": "conversation.deleted", "deleted": True})


async def create_items(request: Request) -> Response:
    svc = services(request)
    who = tenant(request)
    cid = _conversation_id(request)
    raw = await read_body(request)
    body = parse_json(raw)
    items = _items(body, required=True)
    if not items:
        raise errors.InvalidRequest(
            "Invalid 'items': empty array. Expected an array with minimum length 1.",
            param="items",
            code="empty_array",
        )
    minted = _minted(body)
    key = idempotency_key(request)
    attempt = sdk_attempt(request)
    if not minted:
        # Every id is the client's: a retry is a replay of the same ids (or a 400).
        return await _append(svc, who, cid, items, retry_is_safe=True)
    if key:
        seeded = _with_ids(items, minted, f"items\x00{who}\x00{cid}\x00{key}")
        return await _append(svc, who, cid, seeded, retry_is_safe=True, key_reused=True)
    if attempt is None:
        return await _append(svc, who, cid, items, retry_is_safe=False)
    # An official SDK's call: its retries send the same body, so the ids are derived from it and
    # the time window (as for POST /v1/responses): a retry appends nothing twice.
    body_hash = hashlib.sha256(f"{who}\x00{cid}\x00".encode() + raw).hexdigest()[:40]
    window = int(time.time() // RETRY_WINDOW_S)

    def ids_of(w: int) -> list[Item]:
        return _with_ids(items, minted, f"sdk-items\x00{body_hash}\x00{w}")

    if attempt > 0:
        earlier = ids_of(window - 1)
        if await _stored(svc, who, cid, str(earlier[minted[0]]["id"])):
            return await _append(svc, who, cid, earlier, retry_is_safe=True)
        return await _append(svc, who, cid, ids_of(window), retry_is_safe=True)
    reply = await _call_append(svc, who, cid, ids_of(window), retry_is_safe=True)
    if reply.replayed:
        # The same items were appended earlier in the window by a request that this one does
        # not retry (its first attempt): a client adding them again on purpose.
        reply = await _call_append(svc, who, cid, _with_new_ids(items, minted), retry_is_safe=False)
    return JSONResponse(list_page(state_records.items_from_proto(reply.items), False))


async def _stored(svc: Services, who: str, cid: str, item_id: str) -> bool:
    try:
        found = await svc.state.find(
            svc.state.get_conversation_item(state_records.get_conversation_item(who, cid, item_id))
        )
    except errors.ApiError as exc:
        exc.retry_header(retry_is_safe=True)  # a read: nothing was written
        raise
    return found is not None


async def _append(
    svc: Services,
    who: str,
    cid: str,
    items: list[Item],
    *,
    retry_is_safe: bool,
    key_reused: bool = False,
) -> Response:
    reply = await _call_append(
        svc, who, cid, items, retry_is_safe=retry_is_safe, key_reused=key_reused
    )
    return JSONResponse(list_page(state_records.items_from_proto(reply.items), False))


async def _call_append(
    svc: Services,
    who: str,
    cid: str,
    items: list[Item],
    *,
    retry_is_safe: bool,
    key_reused: bool = False,
) -> state_records.CreateConversationItemsReply:
    """CreateConversationItems; ``retry_is_safe`` when a retry of the request appends the same
    ids (so x-should-retry is true after a call that may have been carried out)."""
    try:
        return await svc.state.create_conversation_items(
            state_records.create_conversation_items(who, cid, items), param="items"
        )
    except errors.ApiError as exc:
        if key_reused and exc.code == "duplicate_item_id":
            # The ids derived from the Idempotency-Key are there with other content.
            raise idempotency.idempotency_key_reused() from exc
        exc.retry_header(retry_is_safe=retry_is_safe)
        raise


async def list_items(request: Request) -> Response:
    asked = include.from_query(request)
    svc = services(request)
    cid = _conversation_id(request)
    limit = query_limit(request)
    order = query_order(request)
    after = request.query_params.get("after", "")
    if after and not valid_id(after):
        raise _item_not_found(after)
    reply = await svc.state.list_conversation_items(
        state_records.list_conversation_items(
            tenant(request), cid, ascending=order == "asc", page_size=limit, after_item_id=after
        ),
        param="after",
    )
    data = include.items(state_records.items_from_proto(reply.items), asked)
    return JSONResponse(list_page(data, bool(reply.next_page_token)))


async def get_item(request: Request) -> Response:
    asked = include.from_query(request)
    svc = services(request)
    cid = _conversation_id(request)
    reply = await svc.state.get_conversation_item(
        state_records.get_conversation_item(tenant(request), cid, _item_id(request))
    )
    return JSONResponse(include.items([state_records.item_from_proto(reply.item)], asked)[0])


async def delete_item(request: Request) -> Response:
    svc = services(request)
    cid = _conversation_id(request)
    try:
        reply = await svc.state.delete_conversation_item(
            state_records.delete_conversation_item(tenant(request), cid, _item_id(request))
        )
    except errors.ApiError as exc:
        exc.retry_header(retry_is_safe=True)  # a replay is a 404, never a second delete
        raise
    return JSONResponse(state_records.conversation_json(reply.conversation))


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
