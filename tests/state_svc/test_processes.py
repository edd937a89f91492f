"""The state service as real processes (``python -m state_svc``) sharing one store: replicas
appending to one conversation, and acknowledged writes surviving a SIGKILL."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from respgw.state.v1 import state_service_pb2 as pb
from state_svc.config import StateSettings
from tests.state_svc.conftest import (
    STORES,
    TENANT,
    Client,
    StateProcess,
    base_settings,
    item,
    simple_turn,
    turn,
)
from tests.state_svc.test_backends import check_total_order

pytestmark = pytest.mark.slow

Processes = Callable[[StateSettings], StateProcess]


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> StateSettings:
    schema = request.getfixturevalue("pg_schema") if request.param == "postgres" else "unused"
    return base_settings(request.param, tmp_path, schema)


async def test_two_processes_append_in_one_total_order(
    store: StateSettings, processes: Processes, connect: Callable[..., Client]
) -> None:
    # Both start at once on a fresh store: creating the schema must not race either.
    started = [processes(store) for _ in range(2)]
    ports = await asyncio.gather(*(asyncio.to_thread(p.start) for p in started))
    conv = await connect(ports[0]).conversation([item("first")])
    callers = [connect(ports[n % 2]) for n in range(40)]

    async def one(n: int, client: Client) -> None:
        inputs, outputs = [item(f"t{n}-in-1"), item(f"t{n}-in-2")], [item(f"t{n}-out")]
        if n >= 32:
            # Mixed in: plain appends, which take sequence numbers the same way.
            await client.append(conv, [*inputs, *outputs])
            return
        reply = await client.put(
            turn(f"resp_{n}", conversation=conv, inputs=inputs, outputs=outputs)
        )
        assert not reply.replayed

    await asyncio.gather(*(one(n, c) for n, c in enumerate(callers)))
    for port in ports:
        items = await connect(port).conversation_items(conv)
        check_total_order(items, [f"t{n}" for n in range(40)], ["in-1", "in-2", "out"], first=1)
    for proc in started:
        assert proc.stop() == 0, "".join(proc.lines[-20:])


async def test_acknowledged_writes_survive_sigkill(
    store: StateSettings, processes: Processes, connect: Callable[..., Client]
) -> None:
    proc = processes(store)
    port = proc.start()
    setup = connect(port)
    conv = await setup.conversation()
    acked_chains: dict[int, list[str]] = {}
    acked_turns: list[str] = []
    acked_items: list[str] = []
    stop_at = time.monotonic() + 1.5

    async def chain_writer(worker: int) -> None:
        client = connect(port)
        chain = acked_chains.setdefault(worker, [])
        n = 0
        while time.monotonic() < stop_at + 10:
            response_id = f"resp_w{worker}_{n}"
            previous = chain[-1] if chain else ""
            try:
                await client.put(simple_turn(response_id, previous=previous))
            except grpc.aio.AioRpcError:
                return  # the process is gone
            chain.append(response_id)
            n += 1

    async def conversation_writer(worker: int) -> None:
        client = connect(port)
        n = 0
        while time.monotonic() < stop_at + 10:
            response_id = f"c{worker}x{n}"
            try:
                await client.put(simple_turn(response_id, conversation=conv))
            except grpc.aio.AioRpcError:
                return
            acked_turns.append(response_id)
            acked_items.extend([f"{response_id}-in", f"{response_id}-out"])
            n += 1

    async def killer() -> None:
        await asyncio.sleep(max(0.0, stop_at - time.monotonic()))
        # Mid-load: every writer has a call in flight right now.
        proc.stop(signal.SIGKILL)

    writers = [chain_writer(w) for w in range(4)] + [conversation_writer(w) for w in range(4)]
    await asyncio.wait_for(asyncio.gather(killer(), *writers), timeout=30)
    assert proc.proc is not None and proc.proc.returncode == -signal.SIGKILL
    assert sum(len(c) for c in acked_chains.values()) > 20 and len(acked_turns) > 10

    port = processes(store).start()
    client = connect(port)
    for worker, chain in acked_chains.items():
        if not chain:
            continue
        history = await client.history(response_id=chain[-1])
        assert list(history.response_ids) == chain, worker
        assert [i.id for i in history.items] == [f"{r}-{k}" for r in chain for k in ("in", "out")]
        last = (await client.get(chain[-1])).response
        assert last.response_json == simple_turn(chain[-1]).response_json
    items = await client.conversation_items(conv)
    # Gapless, and every acknowledged turn is there, whole and contiguous; a turn that was
    # committed but not yet acknowledged when the process died may be there too.
    assert [i.sequence for i in items] == list(range(1, len(items) + 1))
    ids = [i.id for i in items]
    assert set(acked_items) <= set(ids)
    for start in range(0, len(ids), 2):
        owner = ids[start].rsplit("-", 1)[0]
        assert ids[start : start + 2] == [f"{owner}-in", f"{owner}-out"]
        assert items[start].json == item(f"{owner}-in").json
    conversation = await client.stub.GetConversation(
        pb.GetConversationRequest(tenant=TENANT, conversation_id=conv)
    )
    assert conversation.conversation.version == len(items)
