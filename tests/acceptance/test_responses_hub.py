"""A hub that speaks only the Responses API (as OpenAI itself does): the router sends it
store=false with the expanded history, and keeps the state itself."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fakehub import FakeHub, Reply
from tests.support import Stack


@pytest.fixture
def responses_stack(hub: FakeHub) -> Iterator[Stack]:
    s = Stack(hub.url, router={"hub_api": "responses"}).start()
    yield s
    s.stop()


def texts(items: list[dict[str, object]]) -> list[str]:
    out = []
    for item in items:
        content = item.get("content")
        if isinstance(content, str):
            out.append(content)
        elif isinstance(content, list):
            out.append("".join(str(p.get("text", "")) for p in content if isinstance(p, dict)))
    return out


@pytest.mark.parametrize("streaming", [False, True])
def test_responses_hub_gets_expanded_history_and_store_false(
    responses_stack: Stack, hub: FakeHub, streaming: bool
) -> None:
    client = responses_stack.client()
    hub.enqueue(Reply(text="first answer"), Reply(text="second answer"))
    first = client.responses.create(model="m", input="first question", instructions="Be kind.")
    assert first.output_text == "first answer"
    assert first.id != "resp_upstream1"
    if streaming:
        with client.responses.stream(
            model="m", input="second question", previous_response_id=first.id
        ) as s:
            types = [e.type for e in s]
            second = s.get_final_response()
        assert types[0] == "response.created" and types[-1] == "response.completed"
    else:
        second = client.responses.create(
            model="m", input="second question", previous_response_id=first.id
        )
    assert second.output_text == "second answer"
    assert second.previous_response_id == first.id

    upstream = hub.requests[-1]
    assert hub.paths[-1] == "/v1/responses"
    assert upstream["store"] is False
    assert "previous_response_id" not in upstream and "conversation" not in upstream
    assert upstream.get("instructions") in (None, "")
    assert texts(upstream["input"]) == ["first question", "first answer", "second question"]
    stored = client.responses.retrieve(second.id)
    assert stored.output_text == "second answer"
