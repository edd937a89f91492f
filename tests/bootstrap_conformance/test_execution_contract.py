"""Conformance of an ExecutionService to respgw/bootstrap/v1/execution_service.proto.

It runs against the same implementations (or address) as test_contract.py: the ExecutionService
is served beside the BootstrapService. Only what the proto promises is checked, each optional
part only when GetExecutionCapabilities says the implementation has it; an implementation that
does not serve the ExecutionService at all is reported as skipped. Each test uses its own tenant.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import orjson
import pytest

from respgw.bootstrap.v1 import bootstrap_service_pb2 as bpb
from respgw.bootstrap.v1 import execution_resources_pb2 as res
from respgw.bootstrap.v1 import execution_service_pb2 as pb
from respgw.bootstrap.v1 import resources_pb2
from tests.bootstrap_conformance.conftest import Execution

TIMEOUT = 30.0
SERVICE_NAME = "respgw.bootstrap.v1.ExecutionService"


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


@pytest.fixture
def ex(execution: Execution) -> Execution:
    if execution.capabilities is None:
        pytest.skip(f"{execution.service.name} does not serve {SERVICE_NAME}")
    return execution


@pytest.fixture
def commands(ex: Execution) -> Execution:
    assert ex.capabilities is not None
    if not ex.capabilities.runs_commands:
        pytest.skip("the implementation runs no commands")
    return ex


@pytest.fixture
def python(ex: Execution) -> Execution:
    assert ex.capabilities is not None
    if not ex.capabilities.runs_python:
        pytest.skip("the implementation runs no Python")
    return ex


def _session(ex: Execution, tenant: str, kind: int = resources_pb2.TOOL_KIND_SHELL) -> str:
    """A session prepared by the implementation's own BootstrapService."""
    tool = (
        {"type": "shell"}
        if kind == resources_pb2.TOOL_KIND_SHELL
        else {
            "type": "code_interpreter",
            "container": {"type": "auto"},
        }
    )
    if kind not in ex.service.capabilities.tool_kinds:
        pytest.skip(f"the bootstrap service does not prepare kind {kind}")
    reply = ex.service.stub.PrepareTools(
        bpb.PrepareToolsRequest(
            request_id=_id("req"),
            tenant=tenant,
            tools=[resources_pb2.ToolDeclaration(kind=kind, json=orjson.dumps(tool))],  # type: ignore[arg-type]
            response_id=_id("resp"),
        ),
        timeout=TIMEOUT,
    )
    session_id = reply.prepared[0].resource_id
    assert session_id, "a session that runs calls is shown by its resource_id"
    return session_id


@dataclass
class Call:
    messages: list[pb.ExecuteResponse] = field(default_factory=list)

    def events(self) -> list[str]:
        return [str(m.WhichOneof("event")) for m in self.messages]

    def output(self, index: int, stream: int = res.OUTPUT_STREAM_STDOUT) -> bytes:
        return b"".join(
            m.output.data
            for m in self.messages
            if m.WhichOneof("event") == "output"
            and m.output.command_index == index
            and m.output.stream == stream
        )

    def results(self) -> list[pb.CommandResult]:
        return [
            m.command_result for m in self.messages if m.WhichOneof("event") == "command_result"
        ]

    @property
    def finished(self) -> pb.ExecutionFinished:
        return self.messages[-1].finished


def _run(ex: Execution, request: pb.ExecuteRequest) -> Call:
    return Call(list(ex.stub.Execute(request, timeout=TIMEOUT)))


def _commands(ex: Execution, tenant: str, session_id: str, *lines: str, **fields: object) -> Call:
    request = pb.ExecuteRequest(tenant=tenant, session_id=session_id, **fields)  # type: ignore[arg-type]
    request.commands.commands.extend(lines)
    return _run(ex, request)


def _code(call: object) -> grpc.StatusCode:
    assert isinstance(call, grpc.RpcError) and isinstance(call, grpc.Call)
    code: grpc.StatusCode = call.code()
    return code


def _fails(run: object, expected: grpc.StatusCode) -> None:
    with pytest.raises(grpc.RpcError) as info:
        result = run()  # type: ignore[operator]
        if isinstance(result, Iterator):
            list(result)
    assert _code(info.value) == expected, info.value


# -- the surface ---------------------------------------------------------------------------------


def test_capabilities_are_stable_and_consistent(ex: Execution) -> None:
    caps = ex.capabilities
    assert caps is not None
    again = ex.stub.GetExecutionCapabilities(pb.GetExecutionCapabilitiesRequest(), timeout=TIMEOUT)
    assert again == caps
    assert (caps.runs_python or caps.runs_commands) == bool(caps.sandbox)
    if caps.keeps_python_state:
        assert caps.runs_python


def test_optional_rpcs_are_unimplemented_exactly_when_capabilities_say(ex: Execution) -> None:
    caps = ex.capabilities
    assert caps is not None
    tenant = _id("tenant")
    missing = "cntr_" + "0" * 32
    file_rpcs = [
        lambda: ex.stub.ListFiles(
            pb.ListFilesRequest(tenant=tenant, session_id=missing), timeout=TIMEOUT
        ),
        lambda: ex.stub.GetFile(
            pb.GetFileRequest(tenant=tenant, session_id=missing, file_id="cfile_x"), timeout=TIMEOUT
        ),
        lambda: ex.stub.DeleteFile(
            pb.DeleteFileRequest(tenant=tenant, session_id=missing, file_id="cfile_x"),
            timeout=TIMEOUT,
        ),
        lambda: ex.stub.DownloadFile(
            pb.DownloadFileRequest(tenant=tenant, session_id=missing, file_id="cfile_x"),
            timeout=TIMEOUT,
        ),
    ]
    session_rpcs = [
        lambda: ex.stub.GetSession(
            pb.GetSessionRequest(tenant=tenant, session_id=missing), timeout=TIMEOUT
        ),
        lambda: ex.stub.DeleteSession(
            pb.DeleteSessionRequest(tenant=tenant, session_id=missing), timeout=TIMEOUT
        ),
    ]
    for rpcs, supported in (
        (file_rpcs, caps.supports_files),
        (session_rpcs, caps.supports_sessions),
    ):
        for rpc in rpcs:
            _fails(rpc, grpc.StatusCode.NOT_FOUND if supported else grpc.StatusCode.UNIMPLEMENTED)


# -- Execute -------------------------------------------------------------------------------------


def test_commands_stream_started_output_results_finished(commands: Execution) -> None:
    tenant = _id("tenant")
    sid = _session(commands, tenant)
    call = _commands(commands, tenant, sid, "echo one", "echo two >&2; exit 3", "printf three")
    events = call.events()
    assert events[0] == "started" and events[-1] == "finished"
    assert events.count("started") == 1 and events.count("finished") == 1
    assert call.messages[0].started.session.session_id == sid
    results = call.results()
    assert [r.command_index for r in results] == [0, 1, 2]
    assert [r.outcome for r in results] == [res.OUTCOME_EXITED] * 3
    assert [r.exit_code for r in results] == [0, 3, 0]
    assert call.output(0) == b"one\n"
    assert call.output(1, res.OUTPUT_STREAM_STDERR) == b"two\n"
    assert call.output(2) == b"three"
    # Each command's output comes before its result.
    position = {i: n for n, i in enumerate(events)}
    assert position["command_result"] > events.index("output")


def test_files_survive_from_call_to_call_in_mnt_data(commands: Execution) -> None:
    tenant = _id("tenant")
    sid = _session(commands, tenant)
    first = _commands(commands, tenant, sid, "pwd", "echo kept > notes.txt")
    assert first.output(0).strip() == b"/mnt/data"
    changed = [f.path for f in first.finished.files_changed]
    assert changed in ([], ["/mnt/data/notes.txt"])  # reporting changed files is best effort
    second = _commands(commands, tenant, sid, "cat /mnt/data/notes.txt")
    assert second.output(0) == b"kept\n"


def test_another_tenants_session_is_not_found(commands: Execution) -> None:
    tenant = _id("tenant")
    theirs = _session(commands, _id("tenant"))
    _fails(lambda: _commands(commands, tenant, theirs, "true"), grpc.StatusCode.NOT_FOUND)


def test_sessions_do_not_share_files(commands: Execution) -> None:
    tenant = _id("tenant")
    a = _session(commands, tenant)
    b_request = bpb.PrepareToolsRequest(
        request_id=_id("req"),
        tenant=tenant,
        tools=[
            resources_pb2.ToolDeclaration(
                kind=resources_pb2.TOOL_KIND_SHELL, json=b'{"type":"shell"}'
            )
        ],
        conversation_id=_id("conv"),
    )
    b = commands.service.stub.PrepareTools(b_request, timeout=TIMEOUT).prepared[0].resource_id
    assert a != b
    _commands(commands, tenant, a, "echo private > secret.txt")
    call = _commands(commands, tenant, b, "ls -a /mnt/data", "cat /mnt/data/secret.txt")
    assert b"secret.txt" not in call.output(0)
    assert call.results()[1].exit_code != 0


def test_a_call_without_network(commands: Execution) -> None:
    tenant = _id("tenant")
    sid = _session(commands, tenant)
    probe = (
        "python3 -c \"import socket; socket.create_connection(('1.1.1.1', 80), timeout=3); "
        "print('CONNECTED')\""
    )
    call = _commands(commands, tenant, sid, probe)
    (result,) = call.results()
    if result.exit_code == 127:
        pytest.skip("no python3 in the sandbox to open a socket with")
    assert b"CONNECTED" not in call.output(0)
    assert result.exit_code != 0


def test_the_timeout_of_a_call_is_an_outcome_not_an_error(commands: Execution) -> None:
    tenant = _id("tenant")
    sid = _session(commands, tenant)
    request = pb.ExecuteRequest(tenant=tenant, session_id=sid)
    request.commands.commands.extend(["sleep 20", "echo next"])
    request.timeout.FromMilliseconds(800)
    started = time.monotonic()
    call = _run(commands, request)
    assert time.monotonic() - started < 15
    results = call.results()
    assert results[0].outcome == res.OUTCOME_TIMED_OUT and results[0].exit_code == 0
    assert results[0].message
    assert results[1].outcome == res.OUTCOME_EXITED and call.output(1) == b"next\n"


def test_output_beyond_the_asked_maximum_is_dropped_and_counted(commands: Execution) -> None:
    tenant = _id("tenant")
    sid = _session(commands, tenant)
    call = _commands(commands, tenant, sid, "yes | head -c 300000", max_output_bytes=1000)
    (result,) = call.results()
    assert len(call.output(0)) == 1000
    assert result.stdout_bytes == 300000 and result.output_truncated


def test_execute_refusals(commands: Execution) -> None:
    tenant = _id("tenant")
    sid = _session(commands, tenant)
    cases = {
        "no tenant": pb.ExecuteRequest(session_id=sid),
        "no session": pb.ExecuteRequest(tenant=tenant),
        "no action": pb.ExecuteRequest(tenant=tenant, session_id=sid),
        "no commands": pb.ExecuteRequest(tenant=tenant, session_id=sid, commands=pb.RunCommands()),
    }
    for name, request in cases.items():
        if name != "no action" and name != "no commands":
            request.commands.commands.append("true")
        with pytest.raises(grpc.RpcError) as info:
            _run(commands, request)
        assert _code(info.value) == grpc.StatusCode.INVALID_ARGUMENT, name
    for session_id, who in ((sid, _id("tenant")), ("sess_" + "0" * 32, tenant)):
        request = pb.ExecuteRequest(tenant=who, session_id=session_id)
        request.commands.commands.append("true")
        with pytest.raises(grpc.RpcError) as info:
            _run(commands, request)
        assert _code(info.value) == grpc.StatusCode.NOT_FOUND


def test_a_released_session_is_not_found(commands: Execution) -> None:
    if not commands.service.capabilities.supports_release:
        pytest.skip("the bootstrap service keeps nothing to release")
    tenant = _id("tenant")
    conv = _id("conv")
    reply = commands.service.stub.PrepareTools(
        bpb.PrepareToolsRequest(
            request_id=_id("req"),
            tenant=tenant,
            tools=[
                resources_pb2.ToolDeclaration(
                    kind=resources_pb2.TOOL_KIND_SHELL, json=b'{"type":"shell"}'
                )
            ],
            conversation_id=conv,
        ),
        timeout=TIMEOUT,
    )
    sid = reply.prepared[0].resource_id
    _commands(commands, tenant, sid, "true")
    commands.service.stub.ReleaseTools(
        bpb.ReleaseToolsRequest(tenant=tenant, conversation_id=conv), timeout=TIMEOUT
    )
    _fails(lambda: _commands(commands, tenant, sid, "true"), grpc.StatusCode.NOT_FOUND)


def test_python_keeps_its_state_and_prints_a_last_expression(python: Execution) -> None:
    tenant = _id("tenant")
    sid = _session(python, tenant, resources_pb2.TOOL_KIND_CODE_INTERPRETER)

    def run(code: str) -> Call:
        return _run(
            python, pb.ExecuteRequest(tenant=tenant, session_id=sid, python=pb.RunPython(code=code))
        )

    first = run("x = 20\nx + 1")
    assert first.output(0) == b"21\n"
    (result,) = first.results()
    assert result.outcome == res.OUTCOME_EXITED and result.exit_code == 0
    failed = run("raise ValueError('boom')")
    (result,) = failed.results()
    assert result.exit_code == 1 and b"ValueError: boom" in failed.output(
        0, res.OUTPUT_STREAM_STDERR
    )
    assert python.capabilities is not None
    if python.capabilities.keeps_python_state:
        assert run("x * 2").output(0) == b"40\n"


# -- files and sessions -------------------------------------------------------------------------


def test_files_round_trip(commands: Execution) -> None:
    assert commands.capabilities is not None
    if not commands.capabilities.supports_files:
        pytest.skip("no file RPCs")
    tenant = _id("tenant")
    sid = _session(commands, tenant)

    def parts() -> Iterator[pb.UploadFileRequest]:
        yield pb.UploadFileRequest(
            header=pb.UploadFileHeader(tenant=tenant, session_id=sid, path="in.txt")
        )
        yield pb.UploadFileRequest(data=b"hello ")
        yield pb.UploadFileRequest(data=b"world")

    uploaded = commands.stub.UploadFile(parts(), timeout=TIMEOUT).file
    assert uploaded.path == "/mnt/data/in.txt" and uploaded.size_bytes == 11
    assert uploaded.source == res.FILE_SOURCE_USER and uploaded.file_id
    call = _commands(commands, tenant, sid, "tr a-z A-Z < in.txt > out.txt")
    assert call.results()[0].exit_code == 0
    listed = commands.stub.ListFiles(
        pb.ListFilesRequest(tenant=tenant, session_id=sid), timeout=TIMEOUT
    )
    by_path = {f.path: f for f in listed.files}
    assert set(by_path) == {"/mnt/data/in.txt", "/mnt/data/out.txt"}
    assert by_path["/mnt/data/in.txt"].file_id == uploaded.file_id
    assert by_path["/mnt/data/out.txt"].source == res.FILE_SOURCE_ASSISTANT
    out_id = by_path["/mnt/data/out.txt"].file_id
    chunks = list(
        commands.stub.DownloadFile(
            pb.DownloadFileRequest(tenant=tenant, session_id=sid, file_id=out_id), timeout=TIMEOUT
        )
    )
    assert chunks[0].WhichOneof("part") == "file" and chunks[0].file.file_id == out_id
    assert b"".join(c.data for c in chunks[1:]) == b"HELLO WORLD"
    commands.stub.DeleteFile(
        pb.DeleteFileRequest(tenant=tenant, session_id=sid, file_id=out_id), timeout=TIMEOUT
    )
    _fails(
        lambda: commands.stub.GetFile(
            pb.GetFileRequest(tenant=tenant, session_id=sid, file_id=out_id), timeout=TIMEOUT
        ),
        grpc.StatusCode.NOT_FOUND,
    )

    def escaping() -> Iterator[pb.UploadFileRequest]:
        yield pb.UploadFileRequest(
            header=pb.UploadFileHeader(tenant=tenant, session_id=sid, path="../x")
        )
        yield pb.UploadFileRequest(data=b"x")

    _fails(
        lambda: commands.stub.UploadFile(escaping(), timeout=TIMEOUT),
        grpc.StatusCode.INVALID_ARGUMENT,
    )


def test_sessions_create_idempotently_list_and_delete(ex: Execution) -> None:
    assert ex.capabilities is not None
    if not ex.capabilities.supports_sessions:
        pytest.skip("no session RPCs")
    tenant = _id("tenant")
    request = pb.CreateSessionRequest(request_id=_id("req"), tenant=tenant, name="made")
    first = ex.stub.CreateSession(request, timeout=TIMEOUT)
    again = ex.stub.CreateSession(request, timeout=TIMEOUT)
    assert not first.replayed and again.replayed and again.session == first.session
    changed = pb.CreateSessionRequest()
    changed.CopyFrom(request)
    changed.name = "other"
    _fails(lambda: ex.stub.CreateSession(changed, timeout=TIMEOUT), grpc.StatusCode.ALREADY_EXISTS)
    session = first.session
    assert session.name == "made" and session.session_id
    assert session.expire_time.ToNanoseconds() > session.last_active_time.ToNanoseconds()
    got = ex.stub.GetSession(
        pb.GetSessionRequest(tenant=tenant, session_id=session.session_id), timeout=TIMEOUT
    )
    assert got.session.session_id == session.session_id
    second = ex.stub.CreateSession(
        pb.CreateSessionRequest(request_id=_id("req"), tenant=tenant), timeout=TIMEOUT
    ).session
    page = ex.stub.ListSessions(pb.ListSessionsRequest(tenant=tenant, page_size=1), timeout=TIMEOUT)
    rest = ex.stub.ListSessions(
        pb.ListSessionsRequest(tenant=tenant, page_token=page.next_page_token), timeout=TIMEOUT
    )
    assert [s.session_id for s in (*page.sessions, *rest.sessions)] == [
        session.session_id,
        second.session_id,
    ]
    _fails(
        lambda: ex.stub.GetSession(
            pb.GetSessionRequest(tenant=_id("tenant"), session_id=session.session_id),
            timeout=TIMEOUT,
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    ex.stub.DeleteSession(
        pb.DeleteSessionRequest(tenant=tenant, session_id=session.session_id), timeout=TIMEOUT
    )
    _fails(
        lambda: ex.stub.DeleteSession(
            pb.DeleteSessionRequest(tenant=tenant, session_id=session.session_id), timeout=TIMEOUT
        ),
        grpc.StatusCode.NOT_FOUND,
    )
