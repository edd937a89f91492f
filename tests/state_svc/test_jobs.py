"""Background responses as jobs: enqueue, claim, renew, the fenced writes, cancel, the caps and
the event log, held to the proto's rules on every backend (memory, SQLite, PostgreSQL)."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2

from respgw.state.v1 import resources_pb2
from respgw.state.v1 import state_service_pb2 as pb
from state_svc import server
from tests.state_svc.conftest import (
    STORES,
    TENANT,
    Client,
    Start,
    assert_error,
    fails,
    item,
    turn,
)

NOT_FOUND = grpc.StatusCode.NOT_FOUND
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
ALREADY_EXISTS = grpc.StatusCode.ALREADY_EXISTS
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def lease(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromMicroseconds(int(seconds * 1_000_000))
    return d


def running(response_id: str, **kwargs: Any) -> resources_pb2.StoredResponse:
    response = turn(response_id, body="queued", inputs=[item(f"{response_id}-in")], **kwargs)
    response.in_progress = True
    return response


def final(response_id: str, body: str = "completed", **kwargs: Any) -> resources_pb2.StoredResponse:
    return turn(
        response_id,
        body=body,
        inputs=[item(f"{response_id}-in")],
        outputs=[item(f"{response_id}-out-{body}")],
        **kwargs,
    )


def event(
    seq: int, kind: str = "response.output_text.delta", **fields: Any
) -> resources_pb2.ResponseEvent:
    body = {"type": kind, "sequence_number": seq, **fields}
    return resources_pb2.ResponseEvent(sequence_number=seq, json=json.dumps(body).encode())


class Jobs:
    """The background RPCs of one client, with short names."""

    def __init__(self, client: Client) -> None:
        self.c = client
        self.stub = client.stub
        self.tenant = client.tenant

    def enqueue(
        self,
        response: resources_pb2.StoredResponse,
        owner: str = "",
        seconds: float = 30,
        **kw: Any,
    ) -> Any:
        return self.stub.EnqueueBackgroundResponse(
            pb.EnqueueBackgroundResponseRequest(
                tenant=self.tenant,
                response=response,
                spec=b"spec of " + response.id.encode(),
                owner=owner,
                lease_duration=lease(seconds),
                **kw,
            )
        )

    async def claim(
        self,
        owner: str = "w",
        seconds: float = 30,
        any_tenant: bool = True,
        request_id: str = "",
    ) -> Any:
        reply = await self.stub.ClaimBackgroundResponse(
            pb.ClaimBackgroundResponseRequest(
                tenant="" if any_tenant else self.tenant,
                any_tenant=any_tenant,
                owner=owner,
                lease_duration=lease(seconds),
                request_id=request_id or secrets.token_hex(8),
            )
        )
        return reply.job if reply.HasField("job") else None

    def renew(self, response_id: str, token: int, seconds: float = 30) -> Any:
        return self.stub.RenewBackgroundLease(
            pb.RenewBackgroundLeaseRequest(
                tenant=self.tenant,
                response_id=response_id,
                lease_token=token,
                lease_duration=lease(seconds),
            )
        )

    def append(self, response_id: str, token: int, *events: resources_pb2.ResponseEvent) -> Any:
        return self.stub.AppendResponseEvents(
            pb.AppendResponseEventsRequest(
                tenant=self.tenant, response_id=response_id, lease_token=token, events=events
            )
        )

    def finish(
        self,
        response: resources_pb2.StoredResponse,
        token: int,
        *events: resources_pb2.ResponseEvent,
    ) -> Any:
        return self.stub.FinishBackgroundResponse(
            pb.FinishBackgroundResponseRequest(
                tenant=self.tenant, lease_token=token, response=response, events=events
            )
        )

    def cancel(self, response_id: str, event_json: bytes = b"", conversation: str = "") -> Any:
        return self.stub.CancelBackgroundResponse(
            pb.CancelBackgroundResponseRequest(
                tenant=self.tenant,
                response=turn(
                    response_id,
                    body="cancelled",
                    inputs=[item(f"{response_id}-in")],
                    conversation=conversation,
                ),
                cancel_event_json=event_json,
            )
        )

    async def watch(self, response_id: str, after: int | None = None) -> list[int]:
        request = pb.WatchResponseEventsRequest(tenant=self.tenant, response_id=response_id)
        if after is not None:
            request.starting_after = after
        seqs = []
        async for reply in self.stub.WatchResponseEvents(request):
            for e in reply.events:
                assert json.loads(e.json)["sequence_number"] == e.sequence_number
                seqs.append(e.sequence_number)
        return seqs


@pytest.fixture
def jobs(client: Client) -> Jobs:
    return Jobs(client)


def log_of(stored: resources_pb2.StoredResponse) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = json.loads(stored.stream_events_json or b"[]")
    return events


async def test_enqueue_claimed_at_once_then_renewed_logged_and_finished(
    jobs: Jobs, client: Client
) -> None:
    started = await jobs.enqueue(running("resp_bg"), owner="router-a")
    assert not started.replayed and started.response.id == "resp_bg"
    job = started.job
    assert (job.response_id, job.tenant, job.owner) == ("resp_bg", TENANT, "router-a")
    assert (job.lease_token, job.last_sequence_number, job.spec) == (1, -1, b"spec of resp_bg")
    assert (await client.get("resp_bg")).response.in_progress
    # A live lease is not claimable by anyone else.
    assert await jobs.claim() is None

    renewed = await jobs.renew("resp_bg", 1)
    assert not renewed.cancel_requested
    assert renewed.lease_expire_time.ToMicroseconds() >= job.lease_expire_time.ToMicroseconds()
    assert (
        await jobs.append("resp_bg", 1, event(0, "response.created"), event(1))
    ).last_sequence_number == 1
    # A replay of what is stored is skipped; the log goes on after it.
    assert (await jobs.append("resp_bg", 1, event(1), event(2))).last_sequence_number == 2

    done = await jobs.finish(final("resp_bg"), 1, event(3, "response.completed"))
    assert not done.replayed
    stored = (await client.get("resp_bg")).response
    assert not stored.in_progress
    assert [e["sequence_number"] for e in log_of(stored)] == [0, 1, 2, 3]
    assert log_of(stored)[-1]["type"] == "response.completed"
    assert [i.id for i in stored.output_items] == ["resp_bg-out-completed"]

    # The same finish again is a replay; everything else of that lease is refused now.
    again = await jobs.finish(final("resp_bg"), 1, event(3, "response.completed"))
    assert again.replayed and again.response == stored
    for call in (jobs.renew("resp_bg", 1), jobs.append("resp_bg", 1, event(4))):
        assert_error(await fails(call), FAILED_PRECONDITION, "LEASE_LOST", response_id="resp_bg")
    assert_error(
        await fails(jobs.finish(final("resp_bg", body="other"), 2)),
        FAILED_PRECONDITION,
        "LEASE_LOST",
    )
    assert await jobs.claim() is None


async def test_a_final_put_turn_finishes_the_job(jobs: Jobs, client: Client) -> None:
    # A caller that holds a job may store the final turn with PutTurn (a router does so for a
    # turn it streams): the job is finished then, never claimed, and no longer pending.
    await jobs.enqueue(running("resp_fg"), owner="router-a", seconds=0.3)
    await client.put(final("resp_fg"))
    await asyncio.sleep(0.4)
    assert await jobs.claim() is None  # its lease ran out, but it is finished
    for call in (
        jobs.renew("resp_fg", 1),
        jobs.append("resp_fg", 1, event(0)),
        jobs.finish(final("resp_fg", body="late"), 1),
    ):
        assert_error(await fails(call), FAILED_PRECONDITION, "LEASE_LOST")
    stored = (await client.get("resp_fg")).response
    assert not stored.in_progress
    assert [i.id for i in stored.output_items] == ["resp_fg-out-completed"]
    assert not (await jobs.enqueue(running("resp_next"), max_pending_total=1)).replayed
    # A running turn that replaces a running one leaves its job as it was.
    again = running("resp_next")
    again.response_json = b'{"status": "in_progress", "again": true}'
    await client.put(again)
    assert (await jobs.claim()).response_id == "resp_next"


async def test_expired_lease_is_taken_over_and_the_stale_holder_is_fenced(
    jobs: Jobs, client: Client
) -> None:
    queued = await jobs.enqueue(running("resp_bg"))
    assert not queued.HasField("job")
    first = await jobs.claim("router-a", seconds=0.3)
    assert (first.response_id, first.lease_token, first.owner) == ("resp_bg", 1, "router-a")
    await jobs.append("resp_bg", 1, event(0, "response.created"), event(1))
    assert await jobs.claim("router-b") is None
    await asyncio.sleep(0.4)
    # The lease ran out: the first holder may still renew while nobody claimed...
    assert not (await jobs.renew("resp_bg", 1, seconds=0.3)).cancel_requested
    await asyncio.sleep(0.4)
    # ...but once another claim took the job, its token is stale for good.
    second = await jobs.claim("router-b")
    assert (second.lease_token, second.owner, second.last_sequence_number) == (2, "router-b", 1)
    assert second.spec == b"spec of resp_bg"
    for call in (
        jobs.renew("resp_bg", 1),
        jobs.append("resp_bg", 1, event(2)),
        jobs.finish(final("resp_bg", body="stale"), 1),
    ):
        assert_error(await fails(call), FAILED_PRECONDITION, "LEASE_LOST", current_lease_token="2")
    await jobs.append("resp_bg", 2, event(2, "response.in_progress"))
    await jobs.finish(final("resp_bg", body="second"), 2, event(3, "response.completed"))
    stored = (await client.get("resp_bg")).response
    assert [i.id for i in stored.output_items] == ["resp_bg-out-second"]
    assert [e["sequence_number"] for e in log_of(stored)] == [0, 1, 2, 3]


async def test_cancel_finalizes_at_once_and_the_holder_learns_it(
    jobs: Jobs, client: Client
) -> None:
    await jobs.enqueue(running("resp_bg"), owner="router-a")
    await jobs.append("resp_bg", 1, event(0, "response.created"), event(1))
    cancel_event = json.dumps({"type": "response.cancelled", "response": {"status": "cancelled"}})
    cancelled = await jobs.cancel("resp_bg", cancel_event.encode())
    assert cancelled.cancelled and not cancelled.response.in_progress
    stored = (await client.get("resp_bg")).response
    assert stored == cancelled.response
    assert [(e["type"], e["sequence_number"]) for e in log_of(stored)][-1] == (
        "response.cancelled",
        2,
    )
    renewed = await jobs.renew("resp_bg", 1)
    assert renewed.cancel_requested and not renewed.HasField("lease_expire_time")
    err = await fails(jobs.finish(final("resp_bg"), 1, event(2, "response.completed")))
    assert_error(err, FAILED_PRECONDITION, "LEASE_LOST", cancelled="true")
    assert_error(
        await fails(jobs.append("resp_bg", 1, event(2))), FAILED_PRECONDITION, "LEASE_LOST"
    )
    # Cancelling again, or cancelling a finished response, changes nothing.
    again = await jobs.cancel("resp_bg", cancel_event.encode())
    assert not again.cancelled and again.response == stored
    await jobs.enqueue(running("resp_done"), owner="router-a")
    await jobs.finish(final("resp_done"), 1)
    finished = (await client.get("resp_done")).response
    unchanged = await jobs.cancel("resp_done", cancel_event.encode())
    assert not unchanged.cancelled and unchanged.response == finished
    assert await jobs.claim() is None


async def test_cancel_of_a_queued_response_and_of_one_without_job(
    jobs: Jobs, client: Client
) -> None:
    await jobs.enqueue(running("resp_q"))
    assert (await jobs.cancel("resp_q")).cancelled
    assert await jobs.claim() is None
    assert log_of((await client.get("resp_q")).response) == []
    await client.put(running("resp_plain"))
    err = await fails(jobs.cancel("resp_plain"))
    assert_error(err, FAILED_PRECONDITION, "NOT_BACKGROUND", response_id="resp_plain")
    assert_error(await fails(jobs.cancel("resp_missing")), NOT_FOUND, "RESPONSE_NOT_FOUND")


async def test_caps_per_tenant_and_in_all(
    running_server: server.Running, connect: Callable[..., Client]
) -> None:
    a, b = (
        Jobs(connect(running_server.port, "tenant-a")),
        Jobs(connect(running_server.port, "tenant-b")),
    )
    caps = {"max_pending_per_tenant": 2, "max_pending_total": 3}
    await a.enqueue(running("resp_a1"), **caps)
    await a.enqueue(running("resp_a2"), owner="w", **caps)
    err = await fails(a.enqueue(running("resp_a3"), **caps))
    assert_error(err, RESOURCE_EXHAUSTED, "BACKGROUND_QUEUE_FULL", scope="tenant", limit="2")
    assert_error(await fails(a.c.get("resp_a3")), NOT_FOUND, "RESPONSE_NOT_FOUND")
    await b.enqueue(running("resp_b1"), **caps)
    err = await fails(b.enqueue(running("resp_b2"), **caps))
    assert_error(err, RESOURCE_EXHAUSTED, "BACKGROUND_QUEUE_FULL", scope="total", limit="3")
    # A finished (or cancelled) response leaves room.
    await a.finish(final("resp_a2"), 1)
    await b.enqueue(running("resp_b2"), **caps)
    await a.cancel("resp_a1")
    await a.enqueue(running("resp_a3"), **caps)
    # Without caps nothing is counted.
    await a.enqueue(running("resp_a4"))


@pytest.fixture
async def running_server(start: Start) -> server.Running:
    return await start()


async def test_enqueue_is_idempotent_and_checks_like_put_turn(jobs: Jobs, client: Client) -> None:
    first = await jobs.enqueue(running("resp_bg", key="key-1"), owner="router-a")
    again = await jobs.enqueue(running("resp_bg", key="key-1"), owner="router-a")
    assert again.replayed and again.job.lease_token == 1 and again.job.owner == "router-a"
    other = await jobs.enqueue(running("resp_bg", key="key-1"), owner="router-b")
    assert other.replayed and not other.HasField("job")
    # The idempotency key of another response: that one, and no new job.
    by_key = await jobs.enqueue(running("resp_other", key="key-1"), owner="router-a")
    assert by_key.replayed and by_key.response.id == "resp_bg" and not by_key.HasField("job")
    assert_error(await fails(client.get("resp_other")), NOT_FOUND, "RESPONSE_NOT_FOUND")
    assert first.response.id == "resp_bg"
    err = await fails(jobs.enqueue(running("resp_next", previous="resp_bg")))
    assert_error(err, FAILED_PRECONDITION, "RESPONSE_IN_PROGRESS")
    err = await fails(jobs.enqueue(running("resp_x", previous="resp_missing")))
    assert_error(err, NOT_FOUND, "PREVIOUS_RESPONSE_NOT_FOUND")
    err = await fails(jobs.enqueue(final("resp_final")))
    assert_error(err, INVALID_ARGUMENT, "INVALID_ARGUMENT", field="response.in_progress")
    err = await fails(jobs.enqueue(running("resp_y"), owner="w", seconds=0))
    assert_error(err, INVALID_ARGUMENT, "INVALID_ARGUMENT", field="lease_duration")


async def test_conversation_turn_joins_its_conversation_when_finished(
    jobs: Jobs, client: Client
) -> None:
    conv = await client.conversation([item("a")])
    await jobs.enqueue(running("resp_bg", conversation=conv), owner="w")
    await client.append(conv, [item("b")])
    assert [i.id for i in await client.conversation_items(conv)] == ["a", "b"]
    done = await jobs.finish(final("resp_bg", conversation=conv), 1)
    assert done.conversation_version == 4
    assert [i.id for i in await client.conversation_items(conv)] == [
        "a", "b", "resp_bg-in", "resp_bg-out-completed",
    ]  # fmt: skip


async def test_event_rules(jobs: Jobs) -> None:
    await jobs.enqueue(running("resp_bg"), owner="w")
    err = await fails(jobs.append("resp_bg", 1, event(1)))
    assert_error(err, INVALID_ARGUMENT, "INVALID_ARGUMENT", field="events[0].sequence_number")
    err = await fails(jobs.append("resp_bg", 1, event(0), event(2)))
    assert_error(err, INVALID_ARGUMENT, "INVALID_ARGUMENT", field="events[1].sequence_number")
    bad = resources_pb2.ResponseEvent(sequence_number=0, json=b"[]")
    err = await fails(jobs.append("resp_bg", 1, bad))
    assert_error(err, INVALID_ARGUMENT, "INVALID_ARGUMENT", field="events[0].json")
    assert_error(await fails(jobs.append("resp_bg", 1)), INVALID_ARGUMENT, "INVALID_ARGUMENT")
    await jobs.append("resp_bg", 1, event(0), event(1))
    err = await fails(jobs.append("resp_bg", 1, event(1, "other"), event(2)))
    assert_error(err, ALREADY_EXISTS, "EVENT_CONFLICT", sequence_number="1")
    assert (await jobs.append("resp_bg", 1, event(0), event(1))).last_sequence_number == 1
    for call in (
        jobs.append("resp_missing", 1, event(0)),
        jobs.renew("resp_missing", 1),
        jobs.finish(final("resp_missing"), 1),
    ):
        assert_error(await fails(call), NOT_FOUND, "RESPONSE_NOT_FOUND")
    err = await fails(jobs.append("resp_bg", 0, event(2)))
    assert_error(err, INVALID_ARGUMENT, "INVALID_ARGUMENT", field="lease_token")


async def test_claims_are_scoped_to_a_tenant_and_skip_finished_or_deleted(
    running_server: server.Running, connect: Callable[..., Client]
) -> None:
    a, b = (
        Jobs(connect(running_server.port, "tenant-a")),
        Jobs(connect(running_server.port, "tenant-b")),
    )
    await a.enqueue(running("resp_a"))
    await b.enqueue(running("resp_b"))
    await b.enqueue(running("resp_gone"))
    await b.c.stub.DeleteResponse(
        pb.DeleteResponseRequest(tenant="tenant-b", response_id="resp_gone")
    )
    claimed = await b.claim(any_tenant=False)
    assert (claimed.tenant, claimed.response_id) == ("tenant-b", "resp_b")
    assert await b.claim(any_tenant=False) is None
    claimed = await b.claim(any_tenant=True)
    assert (claimed.tenant, claimed.response_id) == ("tenant-a", "resp_a")
    assert await a.claim() is None
    # Deleting a running response takes its job along: its holder finds it gone.
    await a.c.stub.DeleteResponse(pb.DeleteResponseRequest(tenant="tenant-a", response_id="resp_a"))
    assert_error(await fails(a.renew("resp_a", 1)), NOT_FOUND, "RESPONSE_NOT_FOUND")
    err = await fails(
        a.stub.ClaimBackgroundResponse(
            pb.ClaimBackgroundResponseRequest(
                tenant="t", any_tenant=True, owner="w", lease_duration=lease(1), request_id="c"
            )
        )
    )
    assert_error(err, INVALID_ARGUMENT, "INVALID_ARGUMENT", field="tenant")


async def test_watch_streams_the_log_live_and_ends_when_final(jobs: Jobs, client: Client) -> None:
    await jobs.enqueue(running("resp_bg"), owner="w")
    await jobs.append("resp_bg", 1, event(0, "response.created"), event(1), event(2))
    from_start = asyncio.create_task(jobs.watch("resp_bg"))
    resumed = asyncio.create_task(jobs.watch("resp_bg", after=1))
    await asyncio.sleep(0.1)
    assert not from_start.done()
    for seq in range(3, 8):
        await jobs.append("resp_bg", 1, event(seq))
        await asyncio.sleep(0.01)
    await jobs.finish(final("resp_bg"), 1, event(8), event(9, "response.completed"))
    assert await asyncio.wait_for(from_start, 5) == list(range(10))
    assert await asyncio.wait_for(resumed, 5) == list(range(2, 10))
    # A final response: its stored events after starting_after, then the end.
    assert await jobs.watch("resp_bg", after=7) == [8, 9]
    assert await jobs.watch("resp_bg", after=9) == []


async def test_watch_of_a_cancelled_response_ends_with_the_cancel(jobs: Jobs) -> None:
    await jobs.enqueue(running("resp_bg"), owner="w")
    await jobs.append("resp_bg", 1, event(0, "response.created"))
    watching = asyncio.create_task(jobs.watch("resp_bg"))
    await asyncio.sleep(0.1)
    await jobs.cancel("resp_bg", b'{"type": "response.cancelled"}')
    assert await asyncio.wait_for(watching, 5) == [0, 1]


async def test_watch_errors(jobs: Jobs, client: Client) -> None:
    assert_error(await fails(jobs.watch("resp_missing")), NOT_FOUND, "RESPONSE_NOT_FOUND")
    await client.put(running("resp_plain"))
    assert_error(await fails(jobs.watch("resp_plain")), FAILED_PRECONDITION, "NOT_BACKGROUND")
    await client.put(final("resp_final"))
    assert await jobs.watch("resp_final") == []
    err = await fails(jobs.watch("resp_final", after=-2))
    assert_error(err, INVALID_ARGUMENT, "INVALID_ARGUMENT", field="starting_after")


async def test_a_long_log_comes_in_batches(jobs: Jobs) -> None:
    await jobs.enqueue(running("resp_bg"), owner="w")
    await jobs.append("resp_bg", 1, *(event(n) for n in range(600)))
    await jobs.finish(final("resp_bg"), 1, event(600, "response.completed"))
    assert await jobs.watch("resp_bg", after=10) == list(range(11, 601))


@pytest.mark.parametrize("backend", STORES, indirect=True)
async def test_concurrent_claims_through_two_replicas_never_share_a_job(
    start: Start, connect: Callable[..., Client]
) -> None:
    replicas = [await start(), await start()]
    setup = Jobs(connect(replicas[0].port))
    ids = [f"resp_{n}" for n in range(20)]
    for response_id in ids:
        await setup.enqueue(running(response_id))
    workers = [Jobs(connect(replicas[n % 2].port)) for n in range(8)]

    async def drain(worker: Jobs, name: str) -> list[tuple[str, int]]:
        got = []
        while (job := await worker.claim(name)) is not None:
            got.append((job.response_id, job.lease_token))
        return got

    results = await asyncio.gather(*(drain(w, f"w{n}") for n, w in enumerate(workers)))
    claimed = [c for r in results for c in r]
    assert sorted(claimed) == sorted((i, 1) for i in ids)


@pytest.mark.parametrize("backend", STORES, indirect=True)
async def test_watch_wakes_on_an_append_through_another_replica(
    start: Start, connect: Callable[..., Client]
) -> None:
    replicas = [await start(watch_poll_interval_s=0.05), await start()]
    writer, reader = Jobs(connect(replicas[0].port)), Jobs(connect(replicas[1].port))
    await writer.enqueue(running("resp_bg"), owner="w")
    watching = asyncio.create_task(reader.watch("resp_bg"))
    await writer.append("resp_bg", 1, event(0, "response.created"))
    await writer.finish(final("resp_bg"), 1, event(1, "response.completed"))
    assert await asyncio.wait_for(watching, 5) == [0, 1]


async def test_a_retried_claim_gets_its_job_again(jobs: Jobs) -> None:
    await jobs.enqueue(running("resp_1"))
    await jobs.enqueue(running("resp_2"))
    first = await jobs.claim("w", request_id="claim-1", seconds=0.3)
    again = await jobs.claim("w", request_id="claim-1", seconds=0.3)
    assert (again.response_id, again.lease_token) == (first.response_id, 1)
    assert again.lease_expire_time == first.lease_expire_time
    other = await jobs.claim("w", request_id="claim-2")
    assert other.response_id != first.response_id
    # Once a later claim took the job, the replay is a claim of its own (nothing left here).
    await asyncio.sleep(0.4)
    taken = await jobs.claim("w", request_id="claim-3")
    assert (taken.response_id, taken.lease_token) == (first.response_id, 2)
    assert await jobs.claim("w", request_id="claim-1") is None
    err = await fails(
        jobs.stub.ClaimBackgroundResponse(
            pb.ClaimBackgroundResponseRequest(any_tenant=True, owner="w", lease_duration=lease(1))
        )
    )
    assert_error(err, INVALID_ARGUMENT, "INVALID_ARGUMENT", field="request_id")


async def test_a_job_whose_conversation_was_deleted_still_finishes(
    jobs: Jobs, client: Client
) -> None:
    conv = await client.conversation([item("a")])
    await jobs.enqueue(running("resp_bg", conversation=conv), owner="w")
    await jobs.enqueue(running("resp_bg2", conversation=conv), owner="w")
    await client.stub.DeleteConversation(
        pb.DeleteConversationRequest(tenant=TENANT, conversation_id=conv)
    )
    done = await jobs.finish(final("resp_bg", conversation=conv), 1, event(0, "response.completed"))
    assert not done.replayed and done.conversation_version == 0
    stored = (await client.get("resp_bg")).response
    assert not stored.in_progress and stored.conversation_id == conv
    assert [i.id for i in stored.output_items] == ["resp_bg-out-completed"]
    cancelled = await jobs.cancel("resp_bg2", conversation=conv)
    assert cancelled.cancelled and not cancelled.response.in_progress
    assert await jobs.claim() is None
