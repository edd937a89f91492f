"""Fixtures for the state service: real grpc.aio servers on 127.0.0.1:0 over a real store
(memory, a SQLite file in tmp_path, or a fresh PostgreSQL schema dropped afterwards), real
``python -m state_svc`` processes, and a small client over the generated stub."""

from __future__ import annotations

import json
import os
import secrets
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from gateway.grpcerrors import RemoteError, error_info
from respgw.state.v1 import resources_pb2, state_service_pb2, state_service_pb2_grpc
from state_svc import server
from state_svc.config import StateSettings
from tests.support import STATE_READY, Process

POSTGRES_DSN = os.environ.get(
    "RESPGW_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test"
)
TENANT = "tenant-a"

BACKENDS = ["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
STORES = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


# --- messages -----------------------------------------------------------------------------


def item(item_id: str, text: str = "", **extra: Any) -> resources_pb2.Item:
    """An item whose JSON is a message carrying ``text`` (the id by default)."""
    body = {"id": item_id, "type": "message", "role": "user", "content": text or item_id}
    return resources_pb2.Item(id=item_id, json=json.dumps({**body, **extra}).encode())


def turn(
    response_id: str,
    *,
    inputs: Iterable[resources_pb2.Item] = (),
    outputs: Iterable[resources_pb2.Item] = (),
    previous: str = "",
    conversation: str = "",
    key: str = "",
    body: str = "",
) -> resources_pb2.StoredResponse:
    return resources_pb2.StoredResponse(
        id=response_id,
        previous_response_id=previous,
        conversation_id=conversation,
        input_items=list(inputs),
        output_items=list(outputs),
        response_json=json.dumps({"id": response_id, "object": "response", "x": body}).encode(),
        idempotency_key=key,
    )


def simple_turn(response_id: str, **kwargs: Any) -> resources_pb2.StoredResponse:
    """A turn with one input item ``<id>-in`` and one output item ``<id>-out``."""
    return turn(
        response_id,
        inputs=[item(f"{response_id}-in")],
        outputs=[item(f"{response_id}-out")],
        **kwargs,
    )


def chunked(
    request: state_service_pb2.PutTurnRequest, piece_bytes: int = 7
) -> list[state_service_pb2.PutTurnChunkedRequest]:
    """``request`` as the messages of a PutTurnChunked call: its head, then each large field in
    pieces of ``piece_bytes``, the fields' pieces interleaved."""
    head = state_service_pb2.PutTurnChunkedHead()
    head.request.CopyFrom(request)
    fields = {}
    for name in ("response_json", "response_json_with_output_items", "stream_events_json"):
        data = getattr(request.response, name)
        head.request.response.ClearField(name)
        setattr(head, f"{name}_size", len(data))
        fields[name] = [data[i : i + piece_bytes] for i in range(0, len(data), piece_bytes)]
    messages = [state_service_pb2.PutTurnChunkedRequest(head=head)]
    while any(fields.values()):
        for name, pieces in fields.items():
            if pieces:
                message = state_service_pb2.PutTurnChunkedRequest()
                setattr(message, name, pieces.pop(0))
                messages.append(message)
    return messages


async def fails(call: Awaitable[Any]) -> RemoteError:
    """Awaits a call that must fail; returns its code and ErrorInfo."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return error_info(info.value)


def assert_error(err: RemoteError, code: grpc.StatusCode, reason: str, **metadata: str) -> None:
    assert (err.code, err.reason) == (code, reason), err
    assert err.domain == "state.respgw.dev"
    for key, value in metadata.items():
        assert err.metadata.get(key) == value, err


# --- a client -----------------------------------------------------------------------------


class Client:
    """One channel to a state service and shortcuts for the calls the tests make."""

    def __init__(self, port: int, tenant: str = TENANT) -> None:
        self.port = port
        self.tenant = tenant
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.stub = state_service_pb2_grpc.StateServiceStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    def put(
        self,
        response: resources_pb2.StoredResponse,
        *,
        expected: int | None = None,
        tenant: str | None = None,
    ) -> Awaitable[state_service_pb2.PutTurnResponse]:
        request = state_service_pb2.PutTurnRequest(
            tenant=self.tenant if tenant is None else tenant, response=response
        )
        if expected is not None:
            request.expected_conversation_version = expected
        return self.stub.PutTurn(request, timeout=30)

    async def put_chunked(
        self,
        response: resources_pb2.StoredResponse,
        *,
        expected: int | None = None,
        piece_bytes: int = 7,
    ) -> state_service_pb2.PutTurnResponse:
        """:meth:`put` through PutTurnChunked (see :func:`chunked`)."""
        request = state_service_pb2.PutTurnRequest(tenant=self.tenant, response=response)
        if expected is not None:
            request.expected_conversation_version = expected
        reply = await self.stub.PutTurnChunked(iter(chunked(request, piece_bytes)), timeout=30)
        return reply.put_turn

    def get(self, response_id: str) -> Awaitable[state_service_pb2.GetResponseResponse]:
        return self.stub.GetResponse(
            state_service_pb2.GetResponseRequest(tenant=self.tenant, response_id=response_id)
        )

    def history(
        self, *, response_id: str = "", conversation_id: str = "", max_items: int = 0
    ) -> Awaitable[state_service_pb2.GetHistoryResponse]:
        request = state_service_pb2.GetHistoryRequest(tenant=self.tenant, max_items=max_items)
        if response_id:
            request.response_id = response_id
        else:
            request.conversation_id = conversation_id
        return self.stub.GetHistory(request)

    def items(self, *item_ids: str) -> Awaitable[state_service_pb2.GetItemsResponse]:
        return self.stub.GetItems(
            state_service_pb2.GetItemsRequest(tenant=self.tenant, item_ids=list(item_ids))
        )

    async def conversation(
        self, items: Iterable[resources_pb2.Item] = (), request_id: str = "", **metadata: str
    ) -> str:
        reply = await self.stub.CreateConversation(
            state_service_pb2.CreateConversationRequest(
                tenant=self.tenant, items=list(items), request_id=request_id, metadata=metadata
            )
        )
        return reply.conversation.id

    def append(
        self,
        conversation_id: str,
        items: Iterable[resources_pb2.Item],
        *,
        expected: int | None = None,
    ) -> Awaitable[state_service_pb2.CreateConversationItemsResponse]:
        request = state_service_pb2.CreateConversationItemsRequest(
            tenant=self.tenant, conversation_id=conversation_id, items=list(items)
        )
        if expected is not None:
            request.expected_version = expected
        return self.stub.CreateConversationItems(request)

    def list_items(
        self,
        conversation_id: str,
        *,
        order: int = state_service_pb2.ORDER_ASC,
        page_size: int = 0,
        page_token: str = "",
        after: str = "",
    ) -> Awaitable[state_service_pb2.ListConversationItemsResponse]:
        return self.stub.ListConversationItems(
            state_service_pb2.ListConversationItemsRequest(
                tenant=self.tenant,
                conversation_id=conversation_id,
                order=order,  # type: ignore[arg-type]
                page_size=page_size,
                page_token=page_token,
                after_item_id=after,
            )
        )

    async def conversation_items(self, conversation_id: str) -> list[resources_pb2.Item]:
        """The conversation's whole history, from GetHistory."""
        return list((await self.history(conversation_id=conversation_id)).items)


# --- services -----------------------------------------------------------------------------


@pytest.fixture
async def pg_schema() -> AsyncIterator[str]:
    """A fresh PostgreSQL schema name for one test; the schema is dropped afterwards."""
    name = "state_test_" + secrets.token_hex(6)
    yield name
    conn = await asyncpg.connect(POSTGRES_DSN)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    finally:
        await conn.close()


def base_settings(backend: str, tmp_path: Path, schema: str) -> StateSettings:
    return StateSettings(
        listen="127.0.0.1:0",
        backend=backend,
        sqlite_path=str(tmp_path / "state.db"),
        postgres_dsn=POSTGRES_DSN,
        postgres_schema=schema,
        postgres_pool_size=4,
        metrics_port=0,
        sweep_interval_s=0,
        shutdown_grace_s=2,
        max_connection_age_s=0,
        log_format="text",
    )


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def settings(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> StateSettings:
    schema = request.getfixturevalue("pg_schema") if backend == "postgres" else "unused"
    return base_settings(backend, tmp_path, schema)


Start = Callable[..., Awaitable[server.Running]]


@pytest.fixture
async def start(settings: StateSettings) -> AsyncIterator[Start]:
    """Starts a state service (settings overridden by keyword); all are stopped afterwards."""
    started: list[server.Running] = []

    async def starter(**overrides: Any) -> server.Running:
        running = await server.start(replace(settings, **overrides))
        started.append(running)
        return running

    yield starter
    for running in started:
        await running.stop(0)


@pytest.fixture
async def connect() -> AsyncIterator[Callable[..., Client]]:
    """Opens clients (one channel each); all are closed afterwards."""
    clients: list[Client] = []

    def opener(port: int, tenant: str = TENANT) -> Client:
        client = Client(port, tenant)
        clients.append(client)
        return client

    yield opener
    for client in clients:
        await client.close()


@pytest.fixture
async def running(start: Start) -> server.Running:
    return await start()


@pytest.fixture
def client(running: server.Running, connect: Callable[..., Client]) -> Client:
    return connect(running.port)


# --- processes ----------------------------------------------------------------------------


class StateProcess(Process):
    """A state service process, run as in production (``respgw state``), on ``settings``."""

    def __init__(self, settings: StateSettings) -> None:
        s = settings
        super().__init__(
            [
                "state",
                "--backend",
                s.backend,
                "--listen",
                "127.0.0.1:0",
                "--sqlite-path",
                s.sqlite_path,
                "--postgres-dsn",
                s.postgres_dsn,
                "--postgres-schema",
                s.postgres_schema,
                "--postgres-pool-size",
                str(s.postgres_pool_size),
                "--metrics-port",
                "0",
                "--shutdown-grace-s",
                "2",
            ]
        )
        self.settings = settings

    def start(self, ready: str = STATE_READY, timeout: float = 30) -> int:
        return super().start(ready, timeout)


@pytest.fixture
def processes() -> Iterator[Callable[[StateSettings], StateProcess]]:
    """Makes state service processes; any still running afterwards is killed."""
    made: list[StateProcess] = []

    def maker(settings: StateSettings) -> StateProcess:
        proc = StateProcess(settings)
        made.append(proc)
        return proc

    yield maker
    for proc in made:
        proc.stop(signal.SIGKILL)
