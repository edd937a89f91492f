"""PutCompaction and GetCompaction: the summaries of compaction items, held to the proto's
contract on every backend (memory, SQLite, PostgreSQL) through the real gRPC stub."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Awaitable, Callable

import asyncpg
import grpc
import pytest

from respgw.state.v1 import resources_pb2
from respgw.state.v1 import state_service_pb2 as pb
from state_svc import checks
from state_svc.config import StateSettings
from tests.state_svc.conftest import POSTGRES_DSN, TENANT, Client, Start, assert_error, fails
from tests.state_svc.test_backends import sleep_until

SUMMARY = b"The user plans a trip to Lisbon in May, under 900 EUR."


def put(
    client: Client, compaction_id: str, summary: bytes, tenant: str = TENANT
) -> Awaitable[pb.PutCompactionResponse]:
    return client.stub.PutCompaction(
        pb.PutCompactionRequest(
            tenant=tenant, compaction=resources_pb2.Compaction(id=compaction_id, summary=summary)
        )
    )


def get(
    client: Client, compaction_id: str, tenant: str = TENANT
) -> Awaitable[pb.GetCompactionResponse]:
    return client.stub.GetCompaction(
        pb.GetCompactionRequest(tenant=tenant, compaction_id=compaction_id)
    )


async def test_put_then_get_returns_the_summary_unchanged(client: Client) -> None:
    summary = "Résumé: ünïcode and bytes \x01 kept as given".encode()
    stored = await put(client, "cmp_1", summary)
    assert not stored.replayed
    assert stored.compaction.id == "cmp_1" and stored.compaction.summary == summary
    assert stored.compaction.HasField("create_time")
    assert not stored.compaction.HasField("expire_time")  # no retention: kept for good
    got = (await get(client, "cmp_1")).compaction
    assert (got.id, got.summary) == ("cmp_1", summary)
    assert got.create_time == stored.compaction.create_time


async def test_put_is_idempotent_on_the_id(client: Client) -> None:
    first = await put(client, "cmp_1", SUMMARY)
    replay = await put(client, "cmp_1", SUMMARY)
    assert replay.replayed
    assert replay.compaction == first.compaction  # the record stored first, times included
    err = await fails(put(client, "cmp_1", b"another summary"))
    assert_error(err, grpc.StatusCode.ALREADY_EXISTS, "ITEM_ID_CONFLICT", item_id="cmp_1")
    assert (await get(client, "cmp_1")).compaction.summary == SUMMARY


async def test_concurrent_first_writes_store_one_record(client: Client) -> None:
    replies = await asyncio.gather(*(put(client, "cmp_race", SUMMARY) for _ in range(8)))
    assert sum(not r.replayed for r in replies) == 1
    assert len({r.compaction.create_time.ToMicroseconds() for r in replies}) == 1


async def test_records_belong_to_their_tenant(client: Client) -> None:
    await put(client, "cmp_1", SUMMARY)
    err = await fails(get(client, "cmp_1", tenant="tenant-b"))
    assert_error(err, grpc.StatusCode.NOT_FOUND, "ITEM_NOT_FOUND", item_id="cmp_1")
    # The other tenant's id space is its own: the same id stores another summary there.
    theirs = await put(client, "cmp_1", b"tenant b's own", tenant="tenant-b")
    assert not theirs.replayed
    assert (await get(client, "cmp_1")).compaction.summary == SUMMARY
    assert (await get(client, "cmp_1", "tenant-b")).compaction.summary == b"tenant b's own"
    err = await fails(get(client, "cmp_never"))
    assert_error(err, grpc.StatusCode.NOT_FOUND, "ITEM_NOT_FOUND", item_id="cmp_never")


async def test_bad_requests_name_the_field(client: Client) -> None:
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    for request, field in [
        (pb.PutCompactionRequest(tenant=TENANT), "compaction.id"),
        (
            pb.PutCompactionRequest(tenant=TENANT, compaction=resources_pb2.Compaction(id="cmp_1")),
            "compaction.summary",
        ),
        (
            pb.PutCompactionRequest(
                tenant=TENANT,
                compaction=resources_pb2.Compaction(
                    id="cmp_1", summary=b"x" * (checks.MAX_SUMMARY_BYTES + 1)
                ),
            ),
            "compaction.summary",
        ),
        (
            pb.PutCompactionRequest(
                tenant=TENANT,
                compaction=resources_pb2.Compaction(id="c" * 513, summary=b"x"),
            ),
            "compaction.id",
        ),
    ]:
        err = await fails(client.stub.PutCompaction(request))
        assert_error(err, invalid, "INVALID_ARGUMENT", field=field)
    err = await fails(client.stub.GetCompaction(pb.GetCompactionRequest(tenant=TENANT)))
    assert_error(err, invalid, "INVALID_ARGUMENT", field="compaction_id")
    err = await fails(put(client, "cmp_1", SUMMARY, tenant=""))
    assert_error(err, invalid, "TENANT_REQUIRED")
    # Nothing was stored by the refused calls; the largest summary allowed is.
    assert_error(await fails(get(client, "cmp_1")), grpc.StatusCode.NOT_FOUND, "ITEM_NOT_FOUND")
    largest = b"y" * checks.MAX_SUMMARY_BYTES
    await put(client, "cmp_1", largest)
    assert (await get(client, "cmp_1")).compaction.summary == largest


async def test_records_expire_with_the_retention_and_are_swept(
    start: Start, connect: Callable[..., Client]
) -> None:
    running = await start(retention_s=1.0)
    client = connect(running.port)
    stored = (await put(client, "cmp_1", SUMMARY)).compaction
    assert stored.HasField("expire_time")
    retention_us = stored.expire_time.ToMicroseconds() - stored.create_time.ToMicroseconds()
    assert retention_us == 1_000_000
    await sleep_until(stored.expire_time.ToNanoseconds() / 1e9 + 0.05)
    err = await fails(get(client, "cmp_1"))
    assert_error(err, grpc.StatusCode.NOT_FOUND, "ITEM_NOT_FOUND")
    # An expired id is free again, even before the sweeper ran.
    fresh = await put(client, "cmp_1", b"a new summary")
    assert not fresh.replayed
    assert (await get(client, "cmp_1")).compaction.summary == b"a new summary"
    await sleep_until(fresh.compaction.expire_time.ToNanoseconds() / 1e9 + 0.05)
    assert time.time() > fresh.compaction.expire_time.ToNanoseconds() / 1e9
    assert await running.backend.sweep() >= 1
    assert await running.backend.sweep() == 0
    counts = await compaction_rows(running.settings)
    assert counts in (None, 0)


async def compaction_rows(settings: StateSettings) -> int | None:
    """How many compaction rows the store holds, read around the service (None for memory)."""
    if settings.backend == "sqlite":
        with sqlite3.connect(settings.sqlite_path) as db:
            count: int = db.execute("SELECT count(*) FROM compactions").fetchone()[0]
            return count
    if settings.backend == "postgres":
        conn = await asyncpg.connect(POSTGRES_DSN)
        try:
            schema = settings.postgres_schema
            return int(await conn.fetchval(f'SELECT count(*) FROM "{schema}".compactions'))
        finally:
            await conn.close()
    return None


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_a_store_keeps_its_records_across_restarts(
    start: Start, connect: Callable[..., Client]
) -> None:
    first = await start()
    await put(connect(first.port), "cmp_1", SUMMARY)
    await first.stop(0)
    again = await start()
    assert (await get(connect(again.port), "cmp_1")).compaction.summary == SUMMARY
