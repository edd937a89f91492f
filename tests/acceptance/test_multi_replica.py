"""Two routers and two state services sharing PostgreSQL, all separate processes, with
client-side round robin; one state service is killed while conversations go on."""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import Iterator

import asyncpg
import openai
import pytest

from tests.fakehub import FakeHub, text_of
from tests.support import POSTGRES_DSN, ROUTER_READY, STATE_READY, Process

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


@pytest.fixture
def schema() -> Iterator[str]:
    name = f"respgw_mr_{uuid.uuid4().hex[:10]}"
    yield name

    async def drop() -> None:
        conn = await asyncpg.connect(POSTGRES_DSN)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        finally:
            await conn.close()

    asyncio.run(drop())


def test_two_routers_two_state_services_survive_a_state_kill(hub: FakeHub, schema: str) -> None:
    states = [
        Process(
            [
                "state",
                "--backend",
                "postgres",
                "--postgres-dsn",
                POSTGRES_DSN,
                "--postgres-schema",
                schema,
                "--listen",
                "127.0.0.1:0",
                "--metrics-port",
                "0",
            ]
        )
        for _ in range(2)
    ]
    routers: list[Process] = []
    clients: list[openai.OpenAI] = []
    try:
        state_ports = [s.start(STATE_READY) for s in states]
        target = "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in state_ports)
        routers = [
            Process(["router", "--port", "0", "--hub-url", hub.url, "--state-address", target])
            for _ in range(2)
        ]
        urls = [f"http://127.0.0.1:{r.start(ROUTER_READY)}/v1" for r in routers]
        clients += [openai.OpenAI(base_url=u, api_key="unused", max_retries=0) for u in urls]

        chains: dict[int, str | None] = {c: None for c in range(4)}
        conv = clients[0].conversations.create()

        def turn(step: int) -> None:
            for c in chains:
                # Interleave: each turn of a chain goes to the other router.
                client = clients[(step + c) % 2]
                kwargs = {"previous_response_id": chains[c]} if chains[c] else {}
                chains[c] = client.responses.create(
                    model="m", input=f"chain {c} step {step}", **kwargs
                ).id  # type: ignore[arg-type]
            clients[step % 2].responses.create(
                model="m", input=f"conv step {step}", conversation=conv.id
            )

        for step in range(3):
            turn(step)
        states[0].stop(signal.SIGKILL)
        for step in range(3, 6):
            turn(step)

        # Every hub request carried its chain's whole history, in order.
        for request in hub.chat_requests():
            texts = [text_of(m) for m in request["messages"]]
            last = texts[-1]
            if last.startswith("chain "):
                c, step = (int(x) for x in last.removeprefix("chain ").split(" step "))
                expected = []
                for s in range(step):
                    expected += [f"chain {c} step {s}", f"echo: chain {c} step {s}"]
                assert texts == [*expected, last]
            else:
                step = int(last.removeprefix("conv step "))
                expected = []
                for s in range(step):
                    expected += [f"conv step {s}", f"echo: conv step {s}"]
                assert texts == [*expected, last]
        items = [
            text_of(i.model_dump())
            for i in clients[1].conversations.items.list(conv.id, order="asc")
        ]
        assert len(items) == 12
    finally:
        for client in clients:
            client.close()
        for r in routers:
            r.stop()
        for s in states:
            s.stop()
