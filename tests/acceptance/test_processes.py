"""The gateway as Kubernetes runs it: the router and the state service as separate processes,
driven through the official openai SDK, with the fake hub recording what the model was sent."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.fakehub import FakeHub, text_of
from tests.support import ROUTER_READY, STATE_READY, Process, state_process


@pytest.fixture
def gateway(tmp_path: Path, hub: FakeHub) -> Iterator[str]:
    state = state_process("--backend", "sqlite", "--sqlite-path", str(tmp_path / "state.db"))
    state_port = state.start(STATE_READY)
    router = Process(
        [
            "router",
            "--port",
            "0",
            "--hub-url",
            hub.url,
            "--state-address",
            f"127.0.0.1:{state_port}",
        ]
    )
    try:
        port = router.start(ROUTER_READY)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        assert router.stopped_gracefully(), "".join(router.lines[-20:])
        assert any("Application shutdown complete" in line for line in router.lines)
        assert state.stopped_gracefully(), "".join(state.lines[-20:])


@pytest.fixture
def client(gateway: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gateway, api_key="unused", max_retries=0) as c:
        yield c


def test_chained_turn_replays_history_but_not_instructions(
    client: openai.OpenAI, hub: FakeHub
) -> None:
    first = client.responses.create(
        model="fake-model",
        instructions="Answer like a pirate.",
        input="What is the capital of France?",
    )
    assert first.status == "completed"
    assert first.output_text == "echo: What is the capital of France?"
    assert first.store is True

    second = client.responses.create(
        model="fake-model",
        instructions="Answer plainly.",
        input="And of Italy?",
        previous_response_id=first.id,
    )
    assert second.previous_response_id == first.id

    sent = hub.chat_requests()
    assert len(sent) == 2
    messages = sent[1]["messages"]
    roles = [m["role"] for m in messages]
    texts = [text_of(m) for m in messages]
    # Only turn 2's instructions, then turn 1's input and output, then turn 2's input.
    assert roles == ["system", "user", "assistant", "user"], messages
    assert texts == [
        "Answer plainly.",
        "What is the capital of France?",
        "echo: What is the capital of France?",
        "And of Italy?",
    ]
    assert all("pirate" not in t for t in texts)

    fetched = client.responses.retrieve(second.id)
    assert fetched.id == second.id
    assert fetched.output_text == second.output_text
    assert fetched.previous_response_id == first.id


def test_unknown_previous_response_is_a_400(client: openai.OpenAI, hub: FakeHub) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model="fake-model", input="hi", previous_response_id="resp_missing")
    body = info.value.body
    assert isinstance(body, dict)
    assert body["code"] == "previous_response_not_found"
    assert body["param"] == "previous_response_id"
    assert body["message"] == "Previous response with id 'resp_missing' not found."
    assert hub.chat_requests() == []
