"""The reference ExecutionService: calls in sandboxed sessions, their state and files, and what
hostile code gets (every limit ends in a result the model can read; other sessions and the
service keep working)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import orjson
import pytest

from bootstrap_svc import memwatch, server
from respgw.bootstrap.v1 import bootstrap_service_pb2 as bpb
from respgw.bootstrap.v1 import (
    bootstrap_service_pb2_grpc,
    execution_service_pb2_grpc,
    resources_pb2,
)
from respgw.bootstrap.v1 import execution_resources_pb2 as res
from respgw.bootstrap.v1 import execution_service_pb2 as pb
from tests.bootstrap_svc.conftest import Start

TENANT = "acme"
CI = resources_pb2.TOOL_KIND_CODE_INTERPRETER
SHELL = resources_pb2.TOOL_KIND_SHELL
pytestmark = pytest.mark.timeout(120)


@dataclass
class Stubs:
    bootstrap: bootstrap_service_pb2_grpc.BootstrapServiceAsyncStub
    execution: execution_service_pb2_grpc.ExecutionServiceAsyncStub
    running: server.Running


@dataclass
class Call:
    """Everything one Execute stream said."""

    stdout: str = ""
    stderr: str = ""
    results: list[pb.CommandResult] = field(default_factory=list)
    finished: pb.ExecutionFinished = field(default_factory=pb.ExecutionFinished)
    started: pb.ExecutionStarted | None = None

    @property
    def result(self) -> pb.CommandResult:
        assert len(self.results) == 1
        return self.results[0]


async def _stubs(running: server.Running) -> AsyncIterator[Stubs]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield Stubs(
            bootstrap_service_pb2_grpc.BootstrapServiceStub(channel),
            execution_service_pb2_grpc.ExecutionServiceStub(channel),
            running,
        )


@pytest.fixture
async def svc(start: Start) -> AsyncIterator[Stubs]:
    running = await start(
        call_timeout_s=2.0,
        call_cpu_s=2,
        memory_mb=256,
        max_file_mb=8,
        disk_mb=32,
        max_output_kb=64,
        max_processes=32,
    )
    async for stubs in _stubs(running):
        yield stubs


async def prepare(
    stubs: Stubs, kind: int = CI, tenant: str = TENANT, conversation_id: str = ""
) -> str:
    tool = (
        {"type": "code_interpreter", "container": {"type": "auto"}}
        if kind == CI
        else {"type": "shell"}
    )
    reply = await stubs.bootstrap.PrepareTools(
        bpb.PrepareToolsRequest(
            request_id=f"req_{time.monotonic_ns()}",
            tenant=tenant,
            tools=[resources_pb2.ToolDeclaration(kind=kind, json=orjson.dumps(tool))],  # type: ignore[arg-type]
            conversation_id=conversation_id,
        ),
        timeout=10,
    )
    return reply.prepared[0].resource_id


async def run(
    stubs: Stubs,
    session_id: str,
    code: str | None = None,
    commands: list[str] | None = None,
    *,
    tenant: str = TENANT,
    timeout_s: float | None = None,
) -> Call:
    request = pb.ExecuteRequest(tenant=tenant, session_id=session_id, call_id="call_test")
    if code is not None:
        request.python.code = code
    else:
        request.commands.commands.extend(commands or [])
    if timeout_s is not None:
        request.timeout.FromNanoseconds(int(timeout_s * 1e9))
    call = Call()
    async for message in stubs.execution.Execute(request, timeout=60):
        kind = message.WhichOneof("event")
        if kind == "started":
            call.started = message.started
        elif kind == "output":
            text = message.output.data.decode(errors="replace")
            if message.output.stream == res.OUTPUT_STREAM_STDOUT:
                call.stdout += text
            else:
                call.stderr += text
        elif kind == "command_result":
            call.results.append(message.command_result)
        else:
            call.finished = message.finished
    assert call.started is not None
    return call


def _processes_of(uid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid == uid:
                    out.append(int(name))
            except OSError:
                pass
    return out


def _write(path: Path, text: str) -> None:
    path.write_text(text)


def _read(path: Path) -> str:
    return path.read_text()


async def _until(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


# -- what runs, and what survives ---------------------------------------------------------------


async def test_python_state_and_files_survive_from_call_to_call(svc: Stubs) -> None:
    sid = await prepare(svc)
    first = await run(svc, sid, "import math\nx = 6 * 7\nprint('hi')\nx")
    assert first.stdout == "hi\n42\n"
    assert first.result.outcome == res.OUTCOME_EXITED and first.result.exit_code == 0
    assert first.result.message == ""
    assert not first.finished.interpreter_restarted and not first.finished.interpreter_stopped
    second = await run(svc, sid, "open('out.txt', 'w').write(str(math.sqrt(x * x)))\nx + 1")
    assert second.stdout.splitlines()[-1] == "43"
    assert [f.path for f in second.finished.files_changed] == ["/mnt/data/out.txt"]
    changed = second.finished.files_changed[0]
    assert changed.file_id.startswith("cfile_") and changed.size_bytes == 4
    assert changed.source == res.FILE_SOURCE_ASSISTANT and changed.media_type == "text/plain"
    third = await run(svc, sid, commands=["cat out.txt", "pwd", "exit 3"])
    assert [r.exit_code for r in third.results] == [0, 0, 3]
    assert third.stdout == "42.0/mnt/data\n"
    assert third.started is not None and third.started.session.session_id == sid


async def test_an_exception_is_an_exit_with_its_traceback(svc: Stubs) -> None:
    sid = await prepare(svc)
    call = await run(svc, sid, "def f():\n    return 1 / 0\nf()")
    assert call.result.outcome == res.OUTCOME_EXITED and call.result.exit_code == 1
    assert "ZeroDivisionError" in call.stderr and 'File "<cell>", line 2, in f' in call.stderr
    assert "sandbox_runner" not in call.stderr
    # The interpreter lives on.
    assert (await run(svc, sid, "f.__name__")).stdout == "'f'\n"


async def test_a_chained_request_reaches_the_same_interpreter(svc: Stubs) -> None:
    first = await prepare(svc, conversation_id="conv_1")
    await run(svc, first, "secret = 'kept'")
    again = await prepare(svc, conversation_id="conv_1")
    assert again == first
    assert (await run(svc, again, "secret")).stdout == "'kept'\n"


# -- hostile input ------------------------------------------------------------------------------


async def test_an_infinite_loop_times_out_and_only_its_interpreter_is_lost(svc: Stubs) -> None:
    sid = await prepare(svc)
    other = await prepare(svc, conversation_id="conv_other")
    await run(svc, sid, "x = 1\nopen('kept.txt', 'w').write('yes')")
    await run(svc, other, "y = 2")
    loop = asyncio.create_task(run(svc, sid, "while True:\n    pass"))
    # Another session keeps working while the loop spins.
    await asyncio.sleep(0.3)
    assert (await run(svc, other, "y")).stdout == "2\n"
    looped = await loop
    assert looped.result.outcome in (res.OUTCOME_TIMED_OUT, res.OUTCOME_LIMIT_EXCEEDED)
    assert looped.finished.interpreter_stopped
    assert "variables from earlier calls are gone" in looped.result.message
    after = await run(svc, sid, "print(open('kept.txt').read())\nx")
    assert after.finished.interpreter_restarted
    assert after.stdout == "yes\n" and "NameError" in after.stderr
    assert "restarted before this call" in after.result.message
    # A call may ask for a shorter timeout.
    short = await run(svc, sid, "import time\ntime.sleep(30)", timeout_s=0.5)
    assert short.result.outcome == res.OUTCOME_TIMED_OUT
    assert short.result.duration.ToNanoseconds() < 2e9


async def test_a_fork_bomb_hits_the_process_limit(svc: Stubs) -> None:
    sid = await prepare(svc)
    bomb = await run(svc, sid, "import os\nwhile True:\n    os.fork()")
    assert bomb.result.limit == res.LIMIT_PROCESSES
    assert "processes" in bomb.result.message
    shell = await run(svc, sid, commands=["bomb() { bomb | bomb; }; bomb", "echo alive"])
    assert shell.results[0].outcome != res.OUTCOME_UNSPECIFIED
    assert shell.results[1].exit_code == 0 and shell.stdout.endswith("alive\n")
    # Nothing the bombs started is left running: only the session's interpreter.
    if svc.running.executor.sandbox.as_root:
        session = svc.running.store.get(TENANT, sid)
        assert session is not None and session.slot is not None
        uid = svc.running.executor.sandbox.session_uid(session.slot)
        assert len(_processes_of(uid)) <= 1
    assert (await run(svc, sid, "1 + 1")).stdout == "2\n"


async def test_a_memory_bomb_is_a_memory_error(svc: Stubs) -> None:
    sid = await prepare(svc)
    call = await run(svc, sid, "hog = []\nwhile True:\n    hog.append(bytearray(16 * 1024 * 1024))")
    assert call.result.limit == res.LIMIT_MEMORY
    assert "out of memory" in call.result.message
    assert (await run(svc, sid, "del hog\n'ok'")).stdout == "'ok'\n"


# Children of the interpreter, each holding `mib` MiB (written, so resident) while under its own
# address-space limit; the parent reports when all are full, then waits.
MEMORY_HOGS = """
import os, time
def hogs(n, mib):
    r, w = os.pipe()
    for _ in range(n):
        if os.fork() == 0:
            keep = b"x" * (mib << 20)
            os.write(w, b"1")
            time.sleep(60)
            os._exit(0)
    os.close(w)
    got = 0
    while got < n:
        got += len(os.read(r, n))
    return got
"""


@pytest.fixture
async def watched(start: Start) -> AsyncIterator[Stubs]:
    """Each process may map 256 MiB; a session's processes together may hold 400 MiB."""
    running = await start(
        call_timeout_s=30.0,
        call_cpu_s=20,
        memory_mb=256,
        session_memory_mb=400,
        max_processes=16,
        max_output_kb=64,
    )
    async for stubs in _stubs(running):
        yield stubs


def _session_processes(stubs: Stubs, session_id: str) -> list[int]:
    session = stubs.running.store.get(TENANT, session_id)
    assert session is not None and session.slot is not None
    return _processes_of(stubs.running.executor.sandbox.session_uid(session.slot))


async def test_processes_together_past_the_session_memory_limit_are_stopped(
    watched: Stubs,
) -> None:
    """Six processes holding 100 MiB each stay under their own limit (256 MiB) but pass the
    session's (400 MiB): the service kills them all, the model reads the limit, the interpreter is lost as
    at any limit that stops it, and the next call, other sessions and the service go on."""
    sid = await prepare(watched)
    other = await prepare(watched, tenant="globex")
    await run(watched, sid, MEMORY_HOGS + "x = 1\nopen('kept.txt', 'w').write('yes')")
    hogs, beside = await asyncio.gather(
        run(watched, sid, "hogs(6, 100)\ntime.sleep(10)\nprint('never')"),
        run(watched, other, "sum(range(10))", tenant="globex"),
    )
    assert beside.stdout == "45\n" and beside.result.outcome == res.OUTCOME_EXITED
    assert hogs.result.outcome == res.OUTCOME_LIMIT_EXCEEDED
    assert hogs.result.limit == res.LIMIT_MEMORY
    assert "memory limit of 400 MiB exceeded" in hogs.result.message
    assert "never" not in hogs.stdout
    assert hogs.finished.interpreter_stopped
    # Stopped at the limit, long before the call's timeout.
    assert hogs.result.duration.ToNanoseconds() < 20e9
    # Nothing of the session is left running.
    if watched.running.executor.sandbox.as_root:
        await _until(lambda: not _session_processes(watched, sid))
    after = await run(watched, sid, "print(open('kept.txt').read())\n1 + 1")
    assert after.finished.interpreter_restarted and after.stdout == "yes\n2\n"
    assert (await run(watched, other, "'still'", tenant="globex")).stdout == "'still'\n"


async def test_a_session_under_its_memory_limit_is_untouched(watched: Stubs) -> None:
    """Processes that together stay under the limit run to their end, and so do forked children
    sharing their parent's pages: each page counts once (their resident sizes add up to more
    than the limit, their proportional ones do not)."""
    sid = await prepare(watched)
    await run(watched, sid, MEMORY_HOGS)
    two = await run(watched, sid, "hogs(2, 100)")
    assert two.stdout == "2\n" and two.result.outcome == res.OUTCOME_EXITED
    shared = await run(
        watched,
        sid,
        "import os, time\nbig = b'x' * (150 << 20)\npids = [os.fork() for _ in range(3)]\n"
        "if 0 in pids:\n    time.sleep(1)\n    os._exit(0)\ntime.sleep(1)\nlen(big) >> 20",
    )
    assert shared.stdout.splitlines()[-1] == "150", shared
    assert shared.result.outcome == res.OUTCOME_EXITED and shared.result.message == ""
    assert not shared.finished.interpreter_stopped
    assert (await run(watched, sid, "len(big) >> 20")).stdout == "150\n"


async def test_a_command_counts_the_interpreters_memory_too(watched: Stubs) -> None:
    """The session's interpreter keeps 220 MiB between calls; two 100 MiB processes of a command
    pass the limit with it (420 MiB), and alone they do not."""
    sid = await prepare(watched)
    hog = "python3 -c 'import time; x = b\"x\" * (100 << 20); time.sleep(3)'"
    command = f"{hog} & {hog} & wait; echo done"
    alone = await run(watched, sid, commands=[command])
    assert alone.result.outcome == res.OUTCOME_EXITED and alone.stdout == "done\n"
    await run(watched, sid, "kept = b'x' * (220 << 20)")
    together = await run(watched, sid, commands=[command, "echo alive"])
    first, second = together.results
    assert first.outcome == res.OUTCOME_LIMIT_EXCEEDED and first.limit == res.LIMIT_MEMORY
    assert "memory limit of 400 MiB exceeded" in first.message
    assert second.exit_code == 0 and together.stdout == "alive\n"
    # The interpreter was not the one stopped: its variables are there.
    assert (await run(watched, sid, "len(kept) >> 20")).stdout == "220\n"


async def test_nothing_runs_in_a_session_between_calls(watched: Stubs) -> None:
    """A thread left running by a call is frozen with its interpreter until the next call, and
    processes it starts are killed: between calls a session cannot grow. In the next call the
    thread runs again, and the watch stops it at the session's limit."""
    sid = await prepare(watched)
    call = await run(
        watched,
        sid,
        "import subprocess, threading, time\nstarted, kept, cap = [], [], 2\n"
        "hog = 'import time; x = b\"x\" * (60 << 20); time.sleep(60)'\n"
        "def grow():\n    while True:\n        if len(kept) < 150:\n"
        "            kept.append(b'x' * (1 << 20))\n        if len(started) < cap:\n"
        "            started.append(subprocess.Popen(['python3', '-c', hog]))\n"
        "        time.sleep(0.01)\n"
        "threading.Thread(target=grow, daemon=True).start()\ntime.sleep(0.3)\nlen(started) > 0",
    )
    assert call.stdout == "True\n" and call.result.outcome == res.OUTCOME_EXITED
    kernel = watched.running.executor._kernels[sid]
    runner = kernel.pids()[2]
    used = memwatch.proportional(kernel.pids())
    await asyncio.sleep(1.0)
    assert memwatch.proportional(kernel.pids()) == used
    # Left: bubblewrap, the namespace's init and the stopped interpreter (and the zombies of
    # what it started, which it reaps in its next call).
    live = [pid for pid in kernel.pids() if memwatch.state(pid) != b"Z"]
    assert len(live) == 3 and live[-1] == runner and memwatch.state(runner) == b"T"
    if watched.running.executor.sandbox.as_root:
        mine = _session_processes(watched, sid)
        assert [pid for pid in mine if memwatch.state(pid) != b"Z"] == [runner]
    grown = await run(watched, sid, "cap = 100\ntime.sleep(20)")
    assert grown.result.limit == res.LIMIT_MEMORY and grown.finished.interpreter_stopped


async def test_a_1_gb_write_stops_at_the_file_size_limit(svc: Stubs) -> None:
    sid = await prepare(svc)
    code = (
        "with open('big.bin', 'wb') as f:\n"
        "    for _ in range(1024):\n"
        "        f.write(b'0' * (1024 * 1024))"
    )
    call = await run(svc, sid, code)
    assert call.result.limit == res.LIMIT_FILE_SIZE
    assert "size limit" in call.result.message
    shell = await run(svc, sid, commands=["head -c 1073741824 /dev/zero > big2.bin"])
    assert shell.result.outcome == res.OUTCOME_LIMIT_EXCEEDED
    assert shell.result.limit == res.LIMIT_FILE_SIZE
    directory = Path(svc.running.store.workdir, sid)
    assert (directory / "big2.bin").stat().st_size <= 8 * 1024 * 1024


async def test_many_files_stop_at_the_session_disk_limit(svc: Stubs) -> None:
    sid = await prepare(svc)
    code = (
        "for i in range(12):\n"
        "    with open(f'part{i}.bin', 'wb') as f:\n"
        "        f.write(b'0' * (4 * 1024 * 1024))"
    )
    call = await run(svc, sid, code)
    assert call.result.limit == res.LIMIT_DISK
    assert "were removed" in call.result.message
    assert not [p for p in os.listdir(Path(svc.running.store.workdir, sid)) if p.startswith("part")]
    assert (await run(svc, sid, "'still here'")).stdout == "'still here'\n"


async def test_a_huge_stdout_is_cut_and_counted(svc: Stubs) -> None:
    sid = await prepare(svc)
    call = await run(
        svc, sid, "import sys\nfor _ in range(200):\n    sys.stdout.write('x' * 100_000)"
    )
    assert len(call.stdout) == 64 * 1024
    assert call.result.stdout_bytes == 20_000_000
    assert call.result.output_truncated and "dropped" in call.result.message
    shell = await run(svc, sid, commands=["yes | head -c 5000000"])
    assert len(shell.stdout) == 64 * 1024 and shell.result.stdout_bytes == 5_000_000


async def test_a_session_cannot_reach_another_sessions_files_or_the_service(svc: Stubs) -> None:
    mine = await prepare(svc, conversation_id="conv_a")
    theirs = await prepare(svc, conversation_id="conv_b", tenant="globex")
    await run(svc, theirs, "open('secret.txt', 'w').write('globex secret')", tenant="globex")
    workdir = svc.running.store.workdir
    probe = (
        "import os\n"
        "found = []\n"
        f"for path in [{workdir + '/' + theirs + '/secret.txt'!r}, '/mnt/data/../secret.txt',\n"
        f"             '../{theirs}/secret.txt', {workdir + '/registry.sqlite3'!r}]:\n"
        "    try:\n"
        "        found.append(open(path).read())\n"
        "    except OSError as exc:\n"
        "        found.append(type(exc).__name__)\n"
        "print(found)\n"
        "print(sorted(os.listdir('/')))"
    )
    call = await run(svc, mine, probe)
    assert "globex secret" not in call.stdout
    assert call.stdout.splitlines()[0].count("FileNotFoundError") == 4
    assert (
        call.stdout.splitlines()[1]
        == str(
            sorted(
                ["bin", "dev", "etc", "lib", "lib64", "mnt", "opt", "proc", "sbin", "tmp", "usr"]
            )
        )
        or workdir.split("/")[1] not in call.stdout.splitlines()[1]
    )
    shell = await run(svc, mine, commands=[f"cat {workdir}/{theirs}/secret.txt; ls {workdir}"])
    assert "globex secret" not in shell.stdout and shell.result.exit_code != 0
    # Nor through the file RPCs, with the other tenant's session id.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await svc.execution.ListFiles(pb.ListFilesRequest(tenant=TENANT, session_id=theirs))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_opening_a_socket_fails_without_network(svc: Stubs) -> None:
    sid = await prepare(svc)
    call = await run(
        svc, sid, "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=3)"
    )
    assert call.result.exit_code == 1 and "no network access" in call.result.message
    dns = await run(svc, sid, "import socket\nsocket.getaddrinfo('example.com', 443)")
    assert "no network access" in dns.result.message
    shell = await run(svc, sid, commands=["cat /proc/net/dev | tail -n +3"])
    assert [line.split(":")[0].strip() for line in shell.stdout.splitlines()] == ["lo"]


async def test_a_cancelled_call_stops_its_interpreter(svc: Stubs) -> None:
    sid = await prepare(svc)
    await run(svc, sid, "x = 1")
    request = pb.ExecuteRequest(tenant=TENANT, session_id=sid)
    request.python.code = "import time\ntime.sleep(60)"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in svc.execution.Execute(request, timeout=0.5):
            pass
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    after = await run(svc, sid, "'fresh'")
    assert after.stdout == "'fresh'\n" and after.finished.interpreter_restarted


# -- sessions and files -------------------------------------------------------------------------


async def test_files_upload_list_download_delete(svc: Stubs) -> None:
    sid = await prepare(svc)

    async def parts() -> AsyncIterator[pb.UploadFileRequest]:
        yield pb.UploadFileRequest(
            header=pb.UploadFileHeader(tenant=TENANT, session_id=sid, path="in/data.csv")
        )
        yield pb.UploadFileRequest(data=b"a,b\n")
        yield pb.UploadFileRequest(data=b"1,2\n")

    uploaded = (await svc.execution.UploadFile(parts())).file
    assert uploaded.path == "/mnt/data/in/data.csv" and uploaded.size_bytes == 8
    assert uploaded.source == res.FILE_SOURCE_USER and uploaded.media_type == "text/csv"
    call = await run(svc, sid, "open('out.txt', 'w').write(open('in/data.csv').read().upper())")
    listed = await svc.execution.ListFiles(pb.ListFilesRequest(tenant=TENANT, session_id=sid))
    assert [f.path for f in listed.files] == ["/mnt/data/in/data.csv", "/mnt/data/out.txt"]
    assert listed.files[1].file_id == call.finished.files_changed[0].file_id
    paged = await svc.execution.ListFiles(
        pb.ListFilesRequest(tenant=TENANT, session_id=sid, page_size=1)
    )
    rest = await svc.execution.ListFiles(
        pb.ListFilesRequest(tenant=TENANT, session_id=sid, page_token=paged.next_page_token)
    )
    assert [f.file_id for f in (*paged.files, *rest.files)] == [f.file_id for f in listed.files]
    assert rest.next_page_token == ""
    out_id = listed.files[1].file_id
    chunks = [
        m
        async for m in svc.execution.DownloadFile(
            pb.DownloadFileRequest(tenant=TENANT, session_id=sid, file_id=out_id)
        )
    ]
    assert chunks[0].file.file_id == out_id
    assert b"".join(c.data for c in chunks[1:]) == b"A,B\n1,2\n"
    got = await svc.execution.GetFile(
        pb.GetFileRequest(tenant=TENANT, session_id=sid, file_id=out_id)
    )
    assert got.file == listed.files[1]
    await svc.execution.DeleteFile(
        pb.DeleteFileRequest(tenant=TENANT, session_id=sid, file_id=out_id)
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await svc.execution.DeleteFile(
            pb.DeleteFileRequest(tenant=TENANT, session_id=sid, file_id=out_id)
        )
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "out.txt" not in os.listdir(Path(svc.running.store.workdir, sid))


@pytest.mark.parametrize(
    "path", ["/etc/passwd", "../x", "a/../../x", "/mnt/data/", "", "/mnt/database"]
)
async def test_an_upload_outside_mnt_data_is_refused(svc: Stubs, path: str) -> None:
    sid = await prepare(svc)

    async def parts() -> AsyncIterator[pb.UploadFileRequest]:
        yield pb.UploadFileRequest(
            header=pb.UploadFileHeader(tenant=TENANT, session_id=sid, path=path)
        )
        yield pb.UploadFileRequest(data=b"x")

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await svc.execution.UploadFile(parts())
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_link_left_by_a_call_is_never_followed(svc: Stubs) -> None:
    sid = await prepare(svc)
    target = Path(svc.running.store.workdir, "outside.txt")
    _write(target, "service file")
    await run(svc, sid, commands=[f"ln -s {target} link.txt", "ln -s /etc ed"])

    async def parts(path: str) -> AsyncIterator[pb.UploadFileRequest]:
        yield pb.UploadFileRequest(
            header=pb.UploadFileHeader(tenant=TENANT, session_id=sid, path=path)
        )
        yield pb.UploadFileRequest(data=b"overwritten")

    for path in ("link.txt", "ed/passwd"):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await svc.execution.UploadFile(parts(path))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _read(target) == "service file"
    listed = await svc.execution.ListFiles(pb.ListFilesRequest(tenant=TENANT, session_id=sid))
    assert listed.files == []


async def test_sessions_created_listed_and_deleted(svc: Stubs) -> None:
    request = pb.CreateSessionRequest(
        request_id="create_1", tenant=TENANT, name="analysis", memory_limit_bytes=512 << 20
    )
    request.idle_ttl.FromSeconds(600)
    made = await svc.execution.CreateSession(request)
    again = await svc.execution.CreateSession(request)
    assert again.replayed and again.session == made.session
    session = made.session
    assert session.session_id.startswith("cntr_") and session.name == "analysis"
    assert session.memory_limit_bytes == 512 << 20 and session.idle_ttl.seconds == 600
    assert session.expire_time.seconds - session.last_active_time.seconds == 600
    other = pb.CreateSessionRequest()
    other.CopyFrom(request)
    other.name = "changed"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await svc.execution.CreateSession(other)
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    call = await run(
        svc, session.session_id, "import resource\nresource.getrlimit(resource.RLIMIT_AS)[0] >> 20"
    )
    assert call.stdout == "512\n"
    assert call.started is not None and call.started.limits.session_memory_bytes == 512 << 20
    prepared = await prepare(svc)
    listed = await svc.execution.ListSessions(pb.ListSessionsRequest(tenant=TENANT))
    assert [s.session_id for s in listed.sessions] == [session.session_id, prepared]
    # A code_interpreter naming the container runs in it; so does a shell referencing it.
    tools = [
        resources_pb2.ToolDeclaration(
            kind=CI,
            json=orjson.dumps({"type": "code_interpreter", "container": session.session_id}),
        ),
        resources_pb2.ToolDeclaration(
            kind=SHELL,
            json=orjson.dumps(
                {
                    "type": "shell",
                    "environment": {
                        "type": "container_reference",
                        "container_id": session.session_id,
                    },
                }
            ),
        ),
    ]
    reply = await svc.bootstrap.PrepareTools(
        bpb.PrepareToolsRequest(request_id="req_named", tenant=TENANT, tools=tools)
    )
    assert [p.resource_id for p in reply.prepared] == [session.session_id] * 2
    await svc.execution.DeleteSession(
        pb.DeleteSessionRequest(tenant=TENANT, session_id=session.session_id)
    )
    for rpc in (svc.execution.DeleteSession, svc.execution.GetSession):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await rpc(pb.DeleteSessionRequest(tenant=TENANT, session_id=session.session_id))  # type: ignore[arg-type]
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_session_created_with_its_own_idle_ttl_expires_after_it(start: Start) -> None:
    """A container's expires_after: its own TTL, not the service's (20 minutes here)."""
    running = await start(idle_ttl_s=1200.0)
    async for svc in _stubs(running):
        short = pb.CreateSessionRequest(request_id="create_short", tenant=TENANT, name="short")
        short.idle_ttl.FromSeconds(1)
        sid = (await svc.execution.CreateSession(short)).session.session_id
        kept = (
            await svc.execution.CreateSession(
                pb.CreateSessionRequest(request_id="create_kept", tenant=TENANT, name="kept")
            )
        ).session.session_id
        await run(svc, sid, "x = 1")
        assert sid in os.listdir(running.store.workdir)
        await _until(lambda: running.store.get(TENANT, sid) is None)  # noqa: B023
        for rpc in (svc.execution.GetSession, svc.execution.DeleteSession):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await rpc(pb.GetSessionRequest(tenant=TENANT, session_id=sid))  # type: ignore[arg-type]
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await run(svc, sid, "x")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        listed = await svc.execution.ListSessions(pb.ListSessionsRequest(tenant=TENANT))
        assert [s.session_id for s in listed.sessions] == [kept]
        # The sweep (every 30 s at most at this TTL) removes its directory.
        assert await running.store.sweep() == 1
        assert sid not in os.listdir(running.store.workdir)
        assert (await run(svc, kept, "'kept'")).stdout == "'kept'\n"


async def test_releasing_a_conversation_stops_its_interpreter(svc: Stubs) -> None:
    sid = await prepare(svc, conversation_id="conv_gone")
    await run(svc, sid, "x = 1")
    session = svc.running.store.get(TENANT, sid)
    assert session is not None
    await svc.bootstrap.ReleaseTools(
        bpb.ReleaseToolsRequest(tenant=TENANT, conversation_id="conv_gone")
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await run(svc, sid, "x")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    if svc.running.executor.sandbox.as_root and session.slot is not None:
        uid = svc.running.executor.sandbox.session_uid(session.slot)
        await _until(lambda: not _processes_of(uid))


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ("tenant", grpc.StatusCode.INVALID_ARGUMENT),
        ("session", grpc.StatusCode.INVALID_ARGUMENT),
        ("action", grpc.StatusCode.INVALID_ARGUMENT),
        ("empty code", grpc.StatusCode.INVALID_ARGUMENT),
        ("no commands", grpc.StatusCode.INVALID_ARGUMENT),
        ("unknown session", grpc.StatusCode.NOT_FOUND),
        ("other tenant", grpc.StatusCode.NOT_FOUND),
    ],
)
async def test_execute_refusals(svc: Stubs, change: str, code: grpc.StatusCode) -> None:
    sid = await prepare(svc)
    request = pb.ExecuteRequest(tenant=TENANT, session_id=sid)
    request.python.code = "1"
    if change == "tenant":
        request.tenant = ""
    elif change == "session":
        request.session_id = ""
    elif change == "action":
        request.ClearField("python")
    elif change == "empty code":
        request.python.code = "  "
    elif change == "no commands":
        request.commands.SetInParent()
    elif change == "unknown session":
        request.session_id = "cntr_" + "0" * 32
    else:
        request.tenant = "globex"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in svc.execution.Execute(request, timeout=10):
            pass
    assert info.value.code() == code


async def test_capabilities_say_what_runs(svc: Stubs) -> None:
    caps = await svc.execution.GetExecutionCapabilities(pb.GetExecutionCapabilitiesRequest())
    assert caps.runs_python and caps.runs_commands and caps.keeps_python_state
    assert caps.supports_files and caps.supports_sessions
    assert caps.sandbox.startswith("bubblewrap")
    assert caps.default_limits.timeout.seconds == 2 and caps.default_limits.max_processes == 32
    assert caps.default_limits.memory_bytes == 256 << 20
    assert caps.default_limits.session_memory_bytes == 1 << 30
    assert caps.max_limits.session_memory_bytes == caps.max_limits.memory_bytes == 4 << 30


async def test_a_missing_sandbox_refuses_calls_but_serves_the_rest(start: Start) -> None:
    running = await start(sandbox_bwrap="no-such-bwrap")
    async for stubs in _stubs(running):
        caps = await stubs.execution.GetExecutionCapabilities(pb.GetExecutionCapabilitiesRequest())
        assert not caps.runs_python and not caps.runs_commands and caps.sandbox == ""
        sid = await prepare(stubs)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await run(stubs, sid, "1")
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        listed = await stubs.execution.ListFiles(pb.ListFilesRequest(tenant=TENANT, session_id=sid))
        assert listed.files == []
