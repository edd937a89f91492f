"""The Conversations API through the official openai SDK."""

from __future__ import annotations

import openai
import pytest

from tests.fakehub import FakeHub, text_of
from tests.support import Stack


def test_conversation_lifecycle(stack: Stack, hub: FakeHub) -> None:
    client = stack.client()
    conv = client.conversations.create(metadata={"a": "1"})
    assert conv.id.startswith("conv_") and conv.object == "conversation"
    assert client.conversations.retrieve(conv.id).metadata == {"a": "1"}
    updated = client.conversations.update(conv.id, metadata={"b": "2"})
    assert updated.metadata == {"b": "2"}

    created = client.conversations.items.create(
        conv.id,
        items=[{"type": "message", "role": "user", "content": f"m{i}"} for i in range(5)],  # type: ignore[misc]
    )
    ids = [i.id for i in created.data]
    assert len(ids) == 5 and len(set(ids)) == 5

    desc = client.conversations.items.list(conv.id, limit=2)
    assert [text_of(i.model_dump()) for i in desc.data] == ["m4", "m3"]
    assert desc.has_more
    walked = [
        text_of(i.model_dump())
        for i in client.conversations.items.list(conv.id, limit=2, order="asc")
    ]
    assert walked == ["m0", "m1", "m2", "m3", "m4"]
    after = client.conversations.items.list(conv.id, order="asc", after=ids[2])
    assert [i.id for i in after.data] == ids[3:]

    item = client.conversations.items.retrieve(ids[1], conversation_id=conv.id)
    assert item.id == ids[1] and text_of(item.model_dump()) == "m1"
    after_delete = client.conversations.items.delete(ids[1], conversation_id=conv.id)
    assert after_delete.id == conv.id
    with pytest.raises(openai.NotFoundError):
        client.conversations.items.retrieve(ids[1], conversation_id=conv.id)
    left = [i.id for i in client.conversations.items.list(conv.id, order="asc")]
    assert left == [ids[0], *ids[2:]]

    deleted = client.conversations.delete(conv.id)
    assert deleted.deleted is True and deleted.id == conv.id
    with pytest.raises(openai.NotFoundError):
        client.conversations.retrieve(conv.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="m", input="x", conversation=conv.id)
    assert hub.chat_requests() == []


def test_too_many_items_at_once_is_a_400(stack: Stack, hub: FakeHub) -> None:
    client = stack.client()
    conv = client.conversations.create()
    with pytest.raises(openai.BadRequestError) as info:
        client.conversations.items.create(
            conv.id,
            items=[{"type": "message", "role": "user", "content": "x"}] * 21,  # type: ignore[list-item]
        )
    assert info.value.param == "items"


def test_an_item_id_already_in_the_conversation_is_a_clear_400(stack: Stack, hub: FakeHub) -> None:
    client = stack.client()
    conv = client.conversations.create(
        items=[{"type": "message", "role": "user", "content": "hi", "id": "msg_fixed"}]  # type: ignore[list-item]
    )
    with pytest.raises(openai.BadRequestError) as info:
        client.conversations.items.create(
            conv.id,
            items=[{"type": "message", "role": "user", "content": "other", "id": "msg_fixed"}],  # type: ignore[list-item]
        )
    assert info.value.code == "duplicate_item_id"
    assert "msg_fixed" in info.value.message
