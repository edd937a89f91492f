"""Many clients chaining at once, and the openai-agents SDK, against the real router."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import openai
import pytest
from agents import Agent, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled

from tests.fakehub import FakeHub, Reply, text_of
from tests.support import Stack

CLIENTS = 8
TURNS = 20


async def test_concurrent_chains_each_see_exactly_their_own_history(
    stack: Stack, hub: FakeHub
) -> None:
    client = openai.AsyncOpenAI(base_url=stack.url, api_key="unused", max_retries=0)

    async def chain(c: int) -> None:
        previous = None
        for t in range(TURNS):
            resp = await client.responses.create(
                model="m",
                input=f"client {c} turn {t}",
                instructions=f"instructions {c}.{t}",
                **({"previous_response_id": previous} if previous else {}),
            )
            previous = resp.id

    await asyncio.gather(*(chain(c) for c in range(CLIENTS)))
    await client.close()

    requests = hub.chat_requests()
    assert len(requests) == CLIENTS * TURNS
    for request in requests:
        messages = request["messages"]
        last = text_of(messages[-1])
        c, t = (int(x) for x in last.removeprefix("client ").split(" turn "))
        expected = [("system", f"instructions {c}.{t}")]
        for earlier in range(t):
            expected += [
                ("user", f"client {c} turn {earlier}"),
                ("assistant", f"echo: client {c} turn {earlier}"),
            ]
        expected.append(("user", last))
        assert [(m["role"], text_of(m)) for m in messages] == expected


@pytest.fixture
async def agent_client(stack: Stack) -> AsyncIterator[openai.AsyncOpenAI]:
    set_tracing_disabled(True)
    client = openai.AsyncOpenAI(base_url=stack.url, api_key="unused", max_retries=0)
    yield client
    await client.close()


@function_tool
def add(a: int, b: int) -> int:
    """Adds two numbers."""
    return a + b


async def test_agents_runner_with_previous_response_id(
    agent_client: openai.AsyncOpenAI, hub: FakeHub
) -> None:
    agent = Agent(
        name="calc",
        instructions="Use the tool.",
        tools=[add],
        model=OpenAIResponsesModel(model="m", openai_client=agent_client),
    )
    hub.enqueue(
        Reply(
            text=None,
            tool_calls=[{"id": "call_add", "name": "add", "arguments": '{"a": 2, "b": 3}'}],
            finish_reason="tool_calls",
        ),
        Reply(text="The sum is 5."),
    )
    result = await Runner.run(agent, "What is 2 + 3?")
    assert result.final_output == "The sum is 5."
    # The runner sends the tool output chained on the tool call with previous_response_id; the
    # hub must have seen the call and its output.
    second = hub.chat_requests()[1]["messages"]
    roles = [m["role"] for m in second]
    assert roles[-2:] == ["assistant", "tool"]
    assert second[-1]["tool_call_id"] == "call_add" and text_of(second[-1]) == "5"

    follow = await Runner.run(agent, "And again?", previous_response_id=result.last_response_id)
    assert follow.final_output == "echo: And again?"
    texts = [text_of(m) for m in hub.chat_requests()[2]["messages"]]
    assert texts[0] == "Use the tool."
    assert "What is 2 + 3?" in texts and "The sum is 5." in texts and texts[-1] == "And again?"


async def test_agents_runner_with_a_conversation(
    agent_client: openai.AsyncOpenAI, hub: FakeHub
) -> None:
    agent = Agent(
        name="chat",
        instructions="Be brief.",
        model=OpenAIResponsesModel(model="m", openai_client=agent_client),
    )
    conv = await agent_client.conversations.create()
    await Runner.run(agent, "first message", conversation_id=conv.id)
    second = await Runner.run(agent, "second message", conversation_id=conv.id)
    assert second.final_output == "echo: second message"
    texts = [text_of(m) for m in hub.chat_requests()[-1]["messages"]]
    assert texts == ["Be brief.", "first message", "echo: first message", "second message"]
    items = [
        text_of(i.model_dump())
        async for i in agent_client.conversations.items.list(conv.id, order="asc")
    ]
    assert items == [
        "first message",
        "echo: first message",
        "second message",
        "echo: second message",
    ]


async def test_concurrent_turns_on_one_conversation_never_answer_from_a_stale_history(
    stack: Stack, hub: FakeHub
) -> None:
    # Both turns read the empty history; the second to store is refused with 409 and the SDK's
    # own retry runs it again on top of the first turn.
    client = openai.AsyncOpenAI(base_url=stack.url, api_key="unused", max_retries=2)
    conv = await client.conversations.create()
    hub.enqueue(Reply(text="answer A", delay_s=0.3), Reply(text="answer B", delay_s=0.3))
    a, b = await asyncio.gather(
        client.responses.create(model="m", input="question A", conversation=conv.id),
        client.responses.create(model="m", input="question B", conversation=conv.id),
    )
    items = [
        text_of(i.model_dump()) async for i in client.conversations.items.list(conv.id, order="asc")
    ]
    await client.close()
    assert len(hub.chat_requests()) == 3
    first, second = (a, b) if items[0] == "question A" else (b, a)
    assert items == [
        f"question {'A' if first is a else 'B'}",
        first.output_text,
        f"question {'B' if first is a else 'A'}",
        second.output_text,
    ]
    retried = [text_of(m) for m in hub.chat_requests()[-1]["messages"]]
    assert retried == items[:3]
