"""The stateful-tool bootstrap lifecycle in the router, against the real reference bootstrap
service, the real state service and the fake hub, in the streaming and non-streaming paths."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client import REGISTRY

from bootstrap_svc import server as bootstrap_server
from bootstrap_svc.config import BootstrapSettings
from tests.fakehub import FakeHub, Reply, text_of
from tests.support import Stack, ThreadLoop

CODE_INTERPRETER = {"type": "code_interpreter", "container": {"type": "auto"}}


def prepare_calls() -> float:
    total = 0.0
    for code in ("OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "INTERNAL"):
        total += (
            REGISTRY.get_sample_value(
                "respgw_grpc_server_requests_total", {"method": "PrepareTools", "code": code}
            )
            or 0.0
        )
    return total


class Bootstrap:
    def __init__(self, workdir: Path, **overrides: Any) -> None:
        self.tl = ThreadLoop()
        settings = replace(
            BootstrapSettings(),
            listen="127.0.0.1:0",
            workdir=str(workdir),
            metrics_port=0,
            **overrides,
        )
        self.running = self.tl.run(bootstrap_server.start(settings))

    def stop(self) -> None:
        self.tl.run(self.running.stop(0.5))
        self.tl.close()

    def live_sessions(self, tenant: str = "default") -> list[Any]:
        async def read() -> list[Any]:
            return self.running.store.live_sessions(tenant)

        return self.tl.run(read())


@pytest.fixture
def bootstrap(tmp_path: Path) -> Iterator[Bootstrap]:
    b = Bootstrap(tmp_path / "sessions", max_sessions_per_tenant=2)
    yield b
    b.stop()


@pytest.fixture
def tooled(hub: FakeHub, bootstrap: Bootstrap) -> Iterator[Stack]:
    s = Stack(hub.url, router={"bootstrap_address": f"127.0.0.1:{bootstrap.running.port}"}).start()
    yield s
    s.stop()


def client(stack: Stack) -> openai.OpenAI:
    return stack.client()


def injected(messages: list[dict[str, Any]]) -> list[str]:
    return [text_of(m) for m in messages if "code_interpreter tool runs your code" in text_of(m)]


def test_requests_without_stateful_tools_never_call_bootstrap(tooled: Stack, hub: FakeHub) -> None:
    before = prepare_calls()
    c = client(tooled)
    c.responses.create(model="m", input="plain")
    c.responses.create(
        model="m",
        input="with a function",
        tools=[
            {
                "type": "function",
                "name": "f",
                "parameters": {"type": "object", "properties": {}},
                "strict": False,
            }
        ],
    )
    assert prepare_calls() == before


@pytest.mark.parametrize("streaming", [False, True])
def test_bootstrap_runs_once_injects_ahead_of_input_and_is_never_stored(
    tooled: Stack, hub: FakeHub, streaming: bool
) -> None:
    c = client(tooled)

    def create(**kwargs: Any) -> Any:
        if not streaming:
            return c.responses.create(model="m", tools=[CODE_INTERPRETER], **kwargs)  # type: ignore[list-item]
        with c.responses.stream(model="m", tools=[CODE_INTERPRETER], **kwargs) as s:  # type: ignore[list-item]
            for _ in s:
                pass
            return s.get_final_response()

    before = prepare_calls()
    first = create(input="Compute 2+2", instructions="Use Python.")
    assert prepare_calls() == before + 1
    messages = hub.chat_requests()[-1]["messages"]
    texts = [text_of(m) for m in messages]
    # Instructions, then the injected item, then the caller's input.
    assert texts[0] == "Use Python."
    assert len(injected(messages)) == 1
    assert texts.index(injected(messages)[0]) == 1 and texts[2] == "Compute 2+2"
    # Stateful tools are not sent to a chat hub as tools.
    assert "tools" not in hub.chat_requests()[-1] or all(
        t.get("type") == "function" for t in hub.chat_requests()[-1]["tools"]
    )
    container = first.tools[0].container
    assert isinstance(container, str) and container
    stored = [text_of(i.model_dump()) for i in c.responses.input_items.list(first.id)]
    assert stored == ["Compute 2+2"]

    second = create(input="And 3+3?", previous_response_id=first.id)
    assert prepare_calls() == before + 2
    messages = hub.chat_requests()[-1]["messages"]
    texts = [text_of(m) for m in messages]
    # The history holds turn 1's input and output, never turn 1's injected item.
    assert len(injected(messages)) == 1
    assert texts == [
        "Compute 2+2",
        "echo: Compute 2+2",
        injected(messages)[0],
        "And 3+3?",
    ]
    # The same execution session serves the whole chain.
    assert second.tools[0].container == container


def test_bootstrap_failure_never_calls_the_hub_and_stores_nothing(hub: FakeHub) -> None:
    stack = Stack(
        hub.url, router={"bootstrap_address": "127.0.0.1:9", "bootstrap_timeout_s": 1.0}
    ).start()
    try:
        c = client(stack)
        conv = c.conversations.create(
            items=[{"type": "message", "role": "user", "content": "before"}]
        )
        for streaming in (False, True):
            with httpx.Client(timeout=20) as http:
                r = http.post(
                    f"{stack.url}/responses",
                    json={
                        "model": "m",
                        "input": "x",
                        "tools": [CODE_INTERPRETER],
                        "conversation": conv.id,
                        "stream": streaming,
                    },
                )
            assert r.status_code >= 400
            assert r.json()["error"]["code"] == "stateful_tool_bootstrap_failed"
        assert hub.chat_requests() == []
        assert len(list(c.conversations.items.list(conv.id))) == 1
    finally:
        stack.stop()


def test_invalid_request_never_triggers_bootstrap(tooled: Stack, hub: FakeHub) -> None:
    before = prepare_calls()
    with httpx.Client(timeout=10) as http:
        r = http.post(
            f"{tooled.url}/responses",
            json={"model": "m", "input": "x", "tools": [CODE_INTERPRETER], "temperature": "hot"},
        )
    assert r.status_code == 400
    with httpx.Client(timeout=10) as http:
        r = http.post(
            f"{tooled.url}/responses",
            json={
                "model": "m",
                "input": "x",
                "tools": [CODE_INTERPRETER],
                "previous_response_id": "resp_nope",
            },
        )
    assert r.status_code == 400 and r.json()["error"]["code"] == "previous_response_not_found"
    assert prepare_calls() == before
    assert hub.chat_requests() == []


def test_retry_with_the_same_idempotency_key_prepares_once(
    tooled: Stack, hub: FakeHub, bootstrap: Bootstrap
) -> None:
    hub.enqueue(Reply(status=500))
    body = {"model": "m", "input": "x", "tools": [CODE_INTERPRETER]}
    headers = {"Idempotency-Key": "retry-me"}
    with httpx.Client(timeout=10) as http:
        failed = http.post(f"{tooled.url}/responses", json=body, headers=headers)
        assert failed.status_code == 502
        ok = http.post(f"{tooled.url}/responses", json=body, headers=headers)
        assert ok.status_code == 200
        again = http.post(f"{tooled.url}/responses", json=body, headers=headers)
    assert again.json()["id"] == ok.json()["id"]
    assert len(bootstrap.live_sessions()) == 1
    assert len(hub.chat_requests()) == 2


def test_tenant_session_cap_is_a_429_and_the_hub_is_not_called(tooled: Stack, hub: FakeHub) -> None:
    c = client(tooled)
    for _ in range(2):
        conv = c.conversations.create()
        c.responses.create(model="m", input="x", tools=[CODE_INTERPRETER], conversation=conv.id)  # type: ignore[list-item]
    calls = len(hub.chat_requests())
    conv = c.conversations.create()
    with pytest.raises(openai.RateLimitError) as info:
        c.responses.create(model="m", input="x", tools=[CODE_INTERPRETER], conversation=conv.id)  # type: ignore[list-item]
    assert info.value.code == "stateful_tool_bootstrap_failed"
    assert len(hub.chat_requests()) == calls


def test_deleting_a_conversation_releases_its_session(
    tooled: Stack, hub: FakeHub, bootstrap: Bootstrap
) -> None:
    c = client(tooled)
    conv = c.conversations.create()
    c.responses.create(model="m", input="x", tools=[CODE_INTERPRETER], conversation=conv.id)  # type: ignore[list-item]
    assert len(bootstrap.live_sessions()) == 1
    c.conversations.delete(conv.id)
    assert bootstrap.live_sessions() == []
