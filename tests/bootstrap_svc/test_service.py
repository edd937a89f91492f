"""The reference bootstrap service's own behaviour, beyond the contract: execution sessions reused
across a conversation and a chain, idle expiry, release, the per-tenant cap, restarts, and the
ErrorInfo reasons of its refusals."""

from __future__ import annotations

import asyncio
import os
import stat
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import orjson
import pytest

from bootstrap_svc import server, sessions
from bootstrap_svc.config import BootstrapSettings
from gateway.grpcerrors import BOOTSTRAP_DOMAIN, error_info
from respgw.bootstrap.v1 import bootstrap_service_pb2 as pb
from respgw.bootstrap.v1 import bootstrap_service_pb2_grpc, resources_pb2
from tests.bootstrap_conformance import launch
from tests.bootstrap_svc.conftest import Start

if TYPE_CHECKING:
    Stub = bootstrap_service_pb2_grpc.BootstrapServiceAsyncStub
CI = resources_pb2.TOOL_KIND_CODE_INTERPRETER
SHELL = resources_pb2.TOOL_KIND_SHELL
TENANT = "acme"


def _tool(
    kind: resources_pb2.ToolKind.ValueType, obj: dict[str, Any] | None = None
) -> resources_pb2.ToolDeclaration:
    default = {"type": "code_interpreter" if kind == CI else "shell"}
    return resources_pb2.ToolDeclaration(kind=kind, json=orjson.dumps(obj or default))


def _req(*kinds: resources_pb2.ToolKind.ValueType, **fields: Any) -> pb.PrepareToolsRequest:
    base: dict[str, Any] = {
        "request_id": f"req_{uuid.uuid4().hex}",
        "tenant": TENANT,
        "tools": [_tool(k) for k in kinds or (CI,)],
        "response_id": f"resp_{uuid.uuid4().hex}",
    }
    base.update(fields)
    return pb.PrepareToolsRequest(**base)


async def _ids(stub: Stub, request: pb.PrepareToolsRequest) -> list[str]:
    reply = await stub.PrepareTools(request, timeout=10)
    return [p.resource_id for p in reply.prepared]


async def _refused(stub: Stub, request: pb.PrepareToolsRequest) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.PrepareTools(request, timeout=10)
    err = error_info(info.value)
    assert err.domain == BOOTSTRAP_DOMAIN
    return err.code, err.reason


async def _channel_stub(running: server.Running) -> tuple[grpc.aio.Channel, Stub]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    return channel, bootstrap_service_pb2_grpc.BootstrapServiceStub(channel)


# Files of the work folder are read and written through these small synchronous helpers: they
# are local and tiny, and the event loop has nothing else to do meanwhile.
def _exists(*parts: str) -> bool:
    return os.path.exists(os.path.join(*parts))


def _write(text: str, *parts: str) -> None:
    Path(*parts).write_text(text)


def _read(*parts: str) -> str:
    return Path(*parts).read_text()


def _mode(*parts: str) -> int:
    return stat.S_IMODE(os.stat(os.path.join(*parts)).st_mode)


async def _until(check: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


# -- what a prepared session is ----------------------------------------------------------------


async def test_a_session_is_a_private_directory_described_to_the_model(
    stub: Stub, running: server.Running, settings: BootstrapSettings
) -> None:
    reply = await stub.PrepareTools(_req(CI, SHELL), timeout=10)
    assert _mode(settings.workdir) == 0o700
    assert len(reply.injected_items) == 2
    kinds = zip(reply.prepared, reply.injected_items, ("cntr_", "sess_"), strict=True)
    for prepared, raw, prefix in kinds:
        assert prepared.resource_id.startswith(prefix)
        state = orjson.loads(prepared.state)
        assert state["session_id"] == prepared.resource_id
        directory = state["directory"]
        assert directory == os.path.join(running.store.workdir, prepared.resource_id)
        assert _mode(directory) == 0o700
        item = orjson.loads(raw)
        assert item["type"] == "message" and item["role"] == "developer"
        text = item["content"][0]["text"]
        assert prepared.resource_id in text and directory in text
        expires = prepared.expire_time.ToSeconds() - time.time()
        assert settings.idle_ttl_s - 60 < expires <= settings.idle_ttl_s


async def test_sessions_are_reused_across_a_conversation(stub: Stub) -> None:
    first = await _ids(stub, _req(CI, SHELL, conversation_id="conv_a"))
    assert await _ids(stub, _req(SHELL, CI, conversation_id="conv_a")) == first[::-1]
    assert await _ids(stub, _req(CI, conversation_id="conv_a")) == first[:1]
    other = await _ids(stub, _req(CI, SHELL, conversation_id="conv_b"))
    assert set(other).isdisjoint(first)
    # Ids are per tenant: another tenant's conversation of the same id is another conversation.
    foreign = await _ids(stub, _req(CI, conversation_id="conv_a", tenant="globex"))
    assert foreign != first[:1]


async def test_files_stay_across_the_turns_of_a_conversation(
    stub: Stub, settings: BootstrapSettings
) -> None:
    (session,) = await _ids(stub, _req(CI, conversation_id="conv_files"))
    _write("a,b\n", settings.workdir, session, "data.csv")
    (again,) = await _ids(stub, _req(CI, conversation_id="conv_files"))
    assert _read(settings.workdir, again, "data.csv") == "a,b\n"


async def test_sessions_are_reused_along_a_previous_response_chain(stub: Stub) -> None:
    r1 = _req(CI)
    (s1,) = await _ids(stub, r1)
    r2 = _req(CI, previous_response_id=r1.response_id)
    assert await _ids(stub, r2) == [s1]
    r3 = _req(CI, previous_response_id=r2.response_id)
    assert await _ids(stub, r3) == [s1]
    # A fork from an earlier response of the chain is still the chain.
    assert await _ids(stub, _req(CI, previous_response_id=r1.response_id)) == [s1]
    # A kind first declared later in the chain gets its own session, reused from then on.
    r4 = _req(CI, SHELL, previous_response_id=r3.response_id)
    s4 = await _ids(stub, r4)
    assert s4[0] == s1 and s4[1].startswith("sess_")
    assert await _ids(stub, _req(SHELL, previous_response_id=r4.response_id)) == s4[1:]
    # Unrelated requests, and chains of another tenant, get their own.
    (alone,) = await _ids(stub, _req(CI))
    assert alone != s1
    (foreign,) = await _ids(stub, _req(CI, tenant="globex", previous_response_id=r1.response_id))
    assert foreign != s1


async def test_a_container_id_names_the_session_to_reuse(stub: Stub) -> None:
    (s1,) = await _ids(stub, _req(CI))
    named = _tool(CI, {"type": "code_interpreter", "container": s1})
    assert await _ids(stub, _req(tools=[named], conversation_id="conv_x")) == [s1]
    for request in (
        _req(tools=[named], tenant="globex"),
        _req(tools=[_tool(CI, {"type": "code_interpreter", "container": "cntr_nope"})]),
        _req(tools=[_tool(SHELL, {"type": "shell", "container": s1})]),
    ):
        assert await _refused(stub, request) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "SESSION_GONE",
        )


# -- expiry, release, cap --------------------------------------------------------------------


async def test_an_auto_containers_memory_limit_sizes_the_session_made_for_it(
    start: Start,
) -> None:
    running = await start(max_memory_mb=4096)
    channel, stub = await _channel_stub(running)
    async with channel:
        auto = {"type": "code_interpreter", "container": {"type": "auto", "memory_limit": "4g"}}
        shell = {"type": "shell", "environment": {"type": "container_auto", "memory_limit": "1g"}}
        ci, sh = await _ids(
            stub, _req(tools=[_tool(CI, auto), _tool(SHELL, shell)], conversation_id="conv_m")
        )
        memory = {s.id: s.memory_bytes for s in running.store.live_sessions(TENANT)}
        assert memory == {ci: 4 << 30, sh: 1 << 30}
        # A session found again keeps its memory, whatever a later request asks.
        smaller = {"type": "code_interpreter", "container": {"type": "auto", "memory_limit": "1g"}}
        assert await _ids(stub, _req(tools=[_tool(CI, smaller)], conversation_id="conv_m")) == [ci]
        assert running.store.get(TENANT, ci).memory_bytes == 4 << 30  # type: ignore[union-attr]
        # Without one, the service's default (0 here: --memory-mb).
        (plain,) = await _ids(stub, _req(CI))
        assert running.store.get(TENANT, plain).memory_bytes == 0  # type: ignore[union-attr]
        for limit in ("16g", "2g", 4):
            asked = {
                "type": "code_interpreter",
                "container": {"type": "auto", "memory_limit": limit},
            }
            assert await _refused(stub, _req(tools=[_tool(CI, asked)])) == (
                grpc.StatusCode.INVALID_ARGUMENT,
                "TOOL_JSON_INVALID",
            )


async def test_idle_sessions_expire_and_their_directories_go(
    start: Start, settings: BootstrapSettings
) -> None:
    running = await start(idle_ttl_s=1.0)
    channel, stub = await _channel_stub(running)
    async with channel:
        (s1,) = await _ids(stub, _req(CI, conversation_id="conv_idle"))
        directory = os.path.join(settings.workdir, s1)
        # Use keeps it alive past its TTL.
        for _ in range(4):
            await asyncio.sleep(0.3)
            assert await _ids(stub, _req(CI, conversation_id="conv_idle")) == [s1]
        await _until(lambda: not _exists(directory))
        assert running.store.live_sessions(TENANT) == []
        (s2,) = await _ids(stub, _req(CI, conversation_id="conv_idle"))
        assert s2 != s1
        named = _tool(CI, {"type": "code_interpreter", "container": s1})
        assert (await _refused(stub, _req(tools=[named])))[1] == "SESSION_GONE"


async def test_release_removes_a_conversation_and_a_chain(
    stub: Stub, running: server.Running, settings: BootstrapSettings
) -> None:
    conv = await _ids(stub, _req(CI, SHELL, conversation_id="conv_rel"))
    r1 = _req(CI)
    (chain,) = await _ids(stub, r1)
    r2 = _req(CI, previous_response_id=r1.response_id)
    await _ids(stub, r2)
    (kept,) = await _ids(stub, _req(CI, conversation_id="conv_keep"))

    reply = await stub.ReleaseTools(
        pb.ReleaseToolsRequest(tenant=TENANT, conversation_id="conv_rel"), timeout=10
    )
    assert reply.released_count == 2
    assert not any(_exists(settings.workdir, s) for s in conv)
    # Any response of the chain names the whole chain.
    reply = await stub.ReleaseTools(
        pb.ReleaseToolsRequest(tenant=TENANT, response_id=r2.response_id), timeout=10
    )
    assert reply.released_count == 1
    assert not _exists(settings.workdir, chain)
    again = await stub.ReleaseTools(
        pb.ReleaseToolsRequest(tenant=TENANT, response_id=r1.response_id), timeout=10
    )
    assert again.released_count == 0
    assert [s.id for s in running.store.live_sessions(TENANT)] == [kept]
    # The conversation starts afresh.
    assert set(await _ids(stub, _req(CI, SHELL, conversation_id="conv_rel"))).isdisjoint(conv)


async def test_a_tenant_holds_at_most_max_sessions(
    start: Start, settings: BootstrapSettings
) -> None:
    running = await start(max_sessions_per_tenant=3)
    channel, stub = await _channel_stub(running)
    async with channel:
        await _ids(stub, _req(CI, SHELL, conversation_id="conv_1"))
        # One more would fit, two do not: nothing of the request is created.
        before = sorted(os.listdir(settings.workdir))
        code, reason = await _refused(stub, _req(CI, SHELL, conversation_id="conv_2"))
        assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "SESSION_LIMIT")
        assert sorted(os.listdir(settings.workdir)) == before
        (third,) = await _ids(stub, _req(CI, conversation_id="conv_2"))
        assert (await _refused(stub, _req(CI)))[1] == "SESSION_LIMIT"
        # Reusing held sessions is always fine, and other tenants have their own quota.
        await _ids(stub, _req(CI, SHELL, conversation_id="conv_1"))
        await _ids(stub, _req(CI, SHELL, tenant="globex"))
        await stub.ReleaseTools(
            pb.ReleaseToolsRequest(tenant=TENANT, conversation_id="conv_2"), timeout=10
        )
        assert not _exists(settings.workdir, third)
        await _ids(stub, _req(CI))


# -- restarts ----------------------------------------------------------------------------------


async def test_sessions_and_replays_survive_a_restart(
    start: Start, settings: BootstrapSettings
) -> None:
    first = await start()
    channel, stub = await _channel_stub(first)
    async with channel:
        caps = await stub.GetCapabilities(pb.GetCapabilitiesRequest(), timeout=10)
        assert caps.sessions_survive_restart
        request = _req(CI, SHELL, conversation_id="conv_r")
        before = await stub.PrepareTools(request, timeout=10)
        session = before.prepared[0].resource_id
        _write("x = 1\n", settings.workdir, session, "model.py")
    await first.stop()

    second = await start()
    channel, stub = await _channel_stub(second)
    async with channel:
        replay = await stub.PrepareTools(request, timeout=10)
        assert replay.replayed and list(replay.prepared) == list(before.prepared)
        changed = pb.PrepareToolsRequest()
        changed.CopyFrom(request)
        changed.conversation_id = "conv_other"
        assert (await _refused(stub, changed))[1] == "REQUEST_ID_CONFLICT"
        after = await _ids(stub, _req(CI, SHELL, conversation_id="conv_r"))
        assert after == [p.resource_id for p in before.prepared]
        assert _read(settings.workdir, session, "model.py") == "x = 1\n"


def _tamper(workdir: str, lost: str, orphan: str) -> None:
    os.rmdir(os.path.join(workdir, lost))
    os.mkdir(os.path.join(workdir, orphan))
    _write("kept", workdir, "notes.txt")


async def test_a_restart_removes_what_expired_or_was_lost_meanwhile(
    start: Start, settings: BootstrapSettings
) -> None:
    first = await start()
    channel, stub = await _channel_stub(first)
    async with channel:
        (lost,) = await _ids(stub, _req(CI, conversation_id="conv_lost"))
        (idle,) = await _ids(stub, _req(CI, conversation_id="conv_idle"))
    await first.stop()
    # While the service is down: a session directory vanishes, a directory nobody registered
    # appears (a crash between creating it and committing the registry), and time passes.
    orphan = "cntr_" + "0" * 32
    _tamper(settings.workdir, lost, orphan)
    await asyncio.sleep(0.3)

    second = await start(idle_ttl_s=0.2)
    assert not _exists(settings.workdir, orphan)
    assert _read(settings.workdir, "notes.txt") == "kept"
    assert not _exists(settings.workdir, idle)
    assert second.store.live_sessions(TENANT) == []


async def test_one_process_per_work_folder(start: Start) -> None:
    await start()
    with pytest.raises(sessions.WorkdirLocked):
        await start()


def test_the_module_runs_and_stops_gracefully_on_sigterm() -> None:
    proc = launch.start_reference()
    try:
        with grpc.insecure_channel(proc.address) as channel:
            stub = bootstrap_service_pb2_grpc.BootstrapServiceStub(channel)
            caps = stub.GetCapabilities(pb.GetCapabilitiesRequest(), timeout=10)
            assert caps.implementation.startswith("respgw-reference/")
    finally:
        proc.stop()
    assert proc.popen.returncode == 0


# -- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "code", "reason"),
    [
        ({"request_id": ""}, grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_ID_REQUIRED"),
        ({"tenant": ""}, grpc.StatusCode.INVALID_ARGUMENT, "TENANT_REQUIRED"),
        ({"tools": []}, grpc.StatusCode.INVALID_ARGUMENT, "TOOLS_REQUIRED"),
        (
            {"tools": [resources_pb2.ToolDeclaration(json=b"{}")]},
            grpc.StatusCode.INVALID_ARGUMENT,
            "KIND_UNSPECIFIED",
        ),
        (
            {"tools": [_tool(SHELL), _tool(SHELL)]},
            grpc.StatusCode.INVALID_ARGUMENT,
            "KIND_DUPLICATED",
        ),
        (
            {"tools": [resources_pb2.ToolDeclaration(kind=CI, json=b"[1]")]},
            grpc.StatusCode.INVALID_ARGUMENT,
            "TOOL_JSON_INVALID",
        ),
        (
            {"tools": [_tool(CI, {"type": "shell"})]},
            grpc.StatusCode.INVALID_ARGUMENT,
            "TOOL_JSON_INVALID",
        ),
        (
            {"tools": [_tool(CI, {"type": "code_interpreter", "container": 7})]},
            grpc.StatusCode.INVALID_ARGUMENT,
            "TOOL_JSON_INVALID",
        ),
        (
            {"conversation_id": "conv_1", "previous_response_id": "resp_1"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "SCOPE_CONFLICT",
        ),
        (
            {"tools": [resources_pb2.ToolDeclaration(kind=9, json=b"{}")]},  # type: ignore[arg-type]
            grpc.StatusCode.UNIMPLEMENTED,
            "KIND_UNSUPPORTED",
        ),
    ],
)
async def test_refusals_carry_error_info(
    stub: Stub,
    settings: BootstrapSettings,
    fields: dict[str, Any],
    code: grpc.StatusCode,
    reason: str,
) -> None:
    assert await _refused(stub, _req(**fields)) == (code, reason)
    # Nothing was prepared for a refused request.
    assert not [n for n in os.listdir(settings.workdir) if n.startswith(("cntr_", "sess_"))]


async def test_release_refusals_carry_error_info(stub: Stub) -> None:
    for request, reason in (
        (pb.ReleaseToolsRequest(conversation_id="conv_1"), "TENANT_REQUIRED"),
        (pb.ReleaseToolsRequest(tenant=TENANT), "SCOPE_REQUIRED"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ReleaseTools(request, timeout=10)
        err = error_info(info.value)
        assert (err.code, err.reason) == (grpc.StatusCode.INVALID_ARGUMENT, reason)


async def test_an_unwritable_work_folder_is_internal_and_leaves_nothing(
    stub: Stub, running: server.Running, settings: BootstrapSettings
) -> None:
    # root ignores directory permissions, so the folder is taken away instead of made read-only.
    moved = settings.workdir + ".moved"
    os.rename(settings.workdir, moved)
    try:
        code, reason = await _refused(stub, _req(CI, conversation_id="conv_w"))
    finally:
        os.rename(moved, settings.workdir)
    assert (code, reason) == (grpc.StatusCode.INTERNAL, "WORKDIR_UNAVAILABLE")
    assert running.store.live_sessions(TENANT) == []
    # The same request works once the folder is back.
    await _ids(stub, _req(CI, conversation_id="conv_w"))
