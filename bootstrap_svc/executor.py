"""Runs the calls of code_interpreter and shell in their sessions' sandboxes.

A code_interpreter session has one long-lived sandboxed interpreter (:class:`Kernel`, running
``sandbox_runner``), started at its first Python call and kept until the session goes, so Python
state survives from call to call and from turn to turn. A call that reaches its wall-clock timeout,
its CPU limit or kills the interpreter otherwise stops it: the next call starts a fresh one (the
files remain). Between calls the interpreter is frozen (SIGSTOP, and whatever else is left in its
sandbox killed: :func:`memwatch.freeze`), so a thread a call left running waits for the next call.
Each shell command runs in a sandbox of its own, gone when the command ends.

While a call runs, :class:`memwatch.Watch` measures the session's processes (a command's, plus
its frozen interpreter's) every ``memory_check_s``; past ``session_memory_bytes`` it kills the
call's processes and the call ends at LIMIT_MEMORY (a Python call's interpreter with it).

Calls of one session run one at a time; at most ``max_concurrent_calls`` run at once in all.
Everything a call produces is reported through ``emit`` as ExecuteResponse messages, in order.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import orjson
from google.protobuf import duration_pb2

from bootstrap_svc import files, memwatch, sessions
from bootstrap_svc.sandbox import Child, Limits, Sandbox
from respgw.bootstrap.v1 import execution_resources_pb2 as res
from respgw.bootstrap.v1 import execution_service_pb2 as pb

log = logging.getLogger(__name__)

Emit = Callable[[pb.ExecuteResponse], None]
CHUNK_BYTES = 64 * 1024
_MIB = 1024 * 1024
# How long a call's output may still arrive after its process ended (or was killed).
_DRAIN_S = 2.0
_KERNEL_START_S = 20.0
_DISK_CHECK_S = 0.5
_NETWORK_ERRNOS = frozenset({101, 99, 111, 113, -2, -3, -5})  # unreachable, refused, no DNS


@dataclass(frozen=True)
class CallLimits:
    """What one Python call or one command may use."""

    timeout_s: float
    cpu_s: int
    memory_bytes: int
    processes: int
    file_bytes: int
    output_bytes: int
    disk_bytes: int
    session_memory_bytes: int = 0  # the session's processes together; 0: not bounded

    def sandbox(self, cpu_s: int | None = None) -> Limits:
        return Limits(
            cpu_s=cpu_s if cpu_s is not None else self.cpu_s,
            memory_bytes=self.memory_bytes,
            processes=self.processes,
            file_bytes=self.file_bytes,
        )

    def proto(self) -> res.ExecutionLimits:
        return res.ExecutionLimits(
            timeout=_duration(self.timeout_s),
            cpu_time=_duration(self.cpu_s),
            memory_bytes=self.memory_bytes,
            max_processes=self.processes,
            max_file_bytes=self.file_bytes,
            max_output_bytes=self.output_bytes,
            disk_bytes=self.disk_bytes,
            session_memory_bytes=self.session_memory_bytes,
        )


@dataclass
class Result:
    """How one command (or the Python call) ended."""

    outcome: res.Outcome.ValueType = res.OUTCOME_EXITED
    exit_code: int = 0
    limit: res.Limit.ValueType = res.LIMIT_UNSPECIFIED
    messages: list[str] | None = None
    stopped: bool = False  # the interpreter is gone
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    truncated: bool = False
    started: float = 0.0  # time.monotonic() when it began

    def say(self, text: str) -> None:
        if self.messages is None:
            self.messages = []
        self.messages.append(text)


def _duration(seconds: float) -> duration_pb2.Duration:
    out = duration_pb2.Duration()
    out.FromNanoseconds(int(seconds * 1e9))
    return out


def _mib(n: int) -> str:
    return f"{n / _MIB:g} MiB"


class _Pump:
    """Reads one output stream to its end: the first ``limit`` bytes are emitted as chunks, the
    rest counted and dropped; the first bytes of stderr are kept to recognise limit errors."""

    def __init__(self, emit: Emit, index: int, stream: res.OutputStream.ValueType, limit: int):
        self.emit = emit
        self.index = index
        self.stream = stream
        self.limit = limit
        self.total = 0
        self.head = b""

    @property
    def truncated(self) -> bool:
        return self.total > self.limit

    async def run(self, reader: asyncio.StreamReader) -> None:
        while True:
            chunk = await reader.read(CHUNK_BYTES)
            if not chunk:
                return
            room = self.limit - self.total
            self.total += len(chunk)
            if len(self.head) < 8192:
                self.head += chunk[: 8192 - len(self.head)]
            if room > 0:
                self.emit(
                    pb.ExecuteResponse(
                        output=pb.OutputChunk(
                            command_index=self.index, stream=self.stream, data=chunk[:room]
                        )
                    )
                )


async def _pipe_reader(fd: int) -> tuple[asyncio.StreamReader, asyncio.BaseTransport]:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=CHUNK_BYTES * 4)
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0)
    )
    return reader, transport


async def _finish(tasks: Sequence[asyncio.Task[None]]) -> None:
    """Waits a little for output still in the pipes, then gives up on it."""
    _, pending = await asyncio.wait(tasks, timeout=_DRAIN_S)
    for task in pending:
        task.cancel()
    for task in pending:
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _kill(proc: Child) -> None:
    """Kills a sandbox: its outer bubblewrap process, whose death kills the sandbox's init
    (--die-with-parent) and with it every process of the sandbox's PID namespace."""
    proc.kill()


def _signal_limit(status: int, limits: CallLimits, result: Result) -> bool:
    """Recognises a process killed at a limit by its exit status (bubblewrap and sh report a
    signal as 128 + its number)."""
    if status == 128 + signal.SIGXCPU:
        result.outcome, result.limit = res.OUTCOME_LIMIT_EXCEEDED, res.LIMIT_CPU_TIME
        result.say(f"It was stopped at its CPU time limit ({limits.cpu_s} s).")
        return True
    if status == 128 + signal.SIGXFSZ:
        result.outcome, result.limit = res.OUTCOME_LIMIT_EXCEEDED, res.LIMIT_FILE_SIZE
        result.say(f"It was stopped writing a file larger than {_mib(limits.file_bytes)}.")
        return True
    return False


def _stderr_hint(head: bytes, limits: CallLimits, result: Result) -> None:
    """A limit recognised from what a failed command printed."""
    text = head.decode(errors="replace")
    if "Cannot allocate memory" in text or "MemoryError" in text or "out of memory" in text:
        result.limit = res.LIMIT_MEMORY
        result.say(f"It ran out of memory (limit {_mib(limits.memory_bytes)} per process).")
    elif "Cannot fork" in text or ("fork" in text and "temporarily unavailable" in text):
        result.limit = res.LIMIT_PROCESSES
        result.say(f"It hit the limit of {limits.processes} processes.")
    elif "File too large" in text:
        result.limit = res.LIMIT_FILE_SIZE
        result.say(f"A file hit the size limit of {_mib(limits.file_bytes)}.")
    elif "No space left on device" in text:
        result.limit = res.LIMIT_DISK
        result.say("It ran out of room to write (the sandbox's /tmp or the session's disk).")
    elif "Network is unreachable" in text or "Temporary failure in name resolution" in text:
        result.say("The sandbox has no network access.")


class Kernel:
    """The sandboxed Python interpreter of one session (see sandbox_runner for its protocol)."""

    def __init__(
        self,
        sandbox: Sandbox,
        directory: str,
        uid: int,
        limits: CallLimits,
        memory_check_s: float = 0.05,
    ) -> None:
        self._sandbox = sandbox
        self._directory = directory
        self._uid = uid
        self.limits = limits
        self._memory_check_s = memory_check_s
        self._runner = 0  # the interpreter's pid, frozen between calls (see memwatch.freeze)
        self._runner_fd = -1  # a pidfd of it: signals reach it, never a later process
        self._proc: Child | None = None
        self._sock: socket.socket | None = None
        self._buffer = b""
        self._dead = False

    @property
    def alive(self) -> bool:
        return not self._dead and self._proc is not None and self._proc.returncode is None

    async def start(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # The interpreter's CPU limit over its whole life; each call gets a share of it.
        argv = self._sandbox.command(
            self._directory,
            self._uid,
            self.limits.sandbox(cpu_s=max(self.limits.cpu_s * 20, 600)),
            [*self._sandbox.python_command(), str(child.fileno())],
        )
        try:
            self._proc = Child(argv, stdout=False, stderr=True, pass_fds=(child.fileno(),))
        finally:
            child.close()
        parent.setblocking(False)
        self._sock = parent
        try:
            ready = await asyncio.wait_for(self._line(), _KERNEL_START_S)
        except TimeoutError:
            ready = None
        if ready and ready.get("ready"):
            self._proc.close_pipes()  # the runner writes nothing more there
            # The sandbox is now its outer bubblewrap, the namespace's init and the interpreter.
            pids = memwatch.tree(self._proc.popen.pid)
            if len(pids) == 3:
                with contextlib.suppress(OSError):
                    self._runner_fd = os.pidfd_open(pids[2])
            if len(pids) != 3 or self._runner_fd < 0:
                wrong = f"its sandbox holds {len(pids)} processes instead of 3"
            elif await memwatch.freeze(self._proc.popen.pid, pids[2], self._runner_fd) is None:
                wrong = "it could not be stopped to wait for its first call"
            else:
                self._runner = pids[2]
                return
            await self.stop()
            raise OSError(f"the sandboxed interpreter did not start: {wrong}")
        _kill(self._proc)  # it ended, or hangs: either way it is done
        problem = b""
        with contextlib.suppress(Exception):
            reader, transport = await self._proc.reader("stderr")
            try:
                problem = await asyncio.wait_for(reader.read(2000), 1.0)
            finally:
                transport.close()
        await self.stop()
        raise OSError(
            "the sandboxed interpreter did not start: "
            + (problem.decode(errors="replace").strip() or "no output")
        )

    async def _line(self) -> dict[str, object] | None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        while b"\n" not in self._buffer:
            data = await loop.sock_recv(self._sock, 65536)
            if not data:
                return None
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        parsed = orjson.loads(line)
        return parsed if isinstance(parsed, dict) else None

    def pids(self) -> list[int]:
        """The processes of the interpreter's sandbox (none once it is gone)."""
        return memwatch.tree(self._proc.popen.pid) if self.alive and self._proc else []

    async def run(self, code: str, limits: CallLimits, emit: Emit, watch: _DiskWatch) -> Result:
        """Runs one call; the result says whether it stopped the interpreter."""
        assert self._sock is not None and self._proc is not None
        loop = asyncio.get_running_loop()
        memwatch.thaw(self._runner, self._runner_fd)
        r_out, w_out = os.pipe()
        r_err, w_err = os.pipe()
        payload = code.encode()
        header = orjson.dumps({"size": len(payload), "cpu_s": limits.cpu_s}) + b"\n"
        try:
            fds = array.array("i", [w_out, w_err])
            self._sock.sendmsg([header], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
            await loop.sock_sendall(self._sock, payload)
        except OSError:
            os.close(r_out)
            os.close(r_err)
            raise
        finally:
            os.close(w_out)
            os.close(w_err)
        out_reader, out_transport = await _pipe_reader(r_out)
        err_reader, err_transport = await _pipe_reader(r_err)
        out = _Pump(emit, 0, res.OUTPUT_STREAM_STDOUT, limits.output_bytes)
        err = _Pump(emit, 0, res.OUTPUT_STREAM_STDERR, limits.output_bytes)
        pumps = [asyncio.create_task(out.run(out_reader)), asyncio.create_task(err.run(err_reader))]
        answer = asyncio.create_task(self._line())
        watching = asyncio.create_task(watch.run())
        memory = _memory_watch(self._proc.popen.pid, limits, self._memory_check_s)
        guarding = asyncio.create_task(memory.run() if memory else _forever())
        result = Result()
        try:
            done, _ = await asyncio.wait(
                {answer, watching, guarding},
                timeout=limits.timeout_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if guarding in done and memory is not None:
                result.stopped = True
                result.outcome, result.limit = res.OUTCOME_LIMIT_EXCEEDED, res.LIMIT_MEMORY
                result.say(memory.message())
            elif answer in done and answer.result() is not None:
                _python_result(answer.result() or {}, limits, result)
                await self._pause(limits, result)
            elif answer in done:
                # The interpreter died in the middle of the call.
                status = await self._proc.wait()
                result.stopped = True
                if not _signal_limit(status, limits, result):
                    result.outcome, result.limit = res.OUTCOME_LIMIT_EXCEEDED, res.LIMIT_MEMORY
                    result.say(
                        f"The interpreter was killed (exit status {status}), most likely out of "
                        f"memory (limit {_mib(limits.memory_bytes)})."
                    )
            elif watching in done:
                result.stopped = True
                result.outcome, result.limit = res.OUTCOME_LIMIT_EXCEEDED, res.LIMIT_DISK
                result.say(watch.message())
            else:
                result.stopped = True
                result.outcome = res.OUTCOME_TIMED_OUT
                result.say(f"It was stopped after {limits.timeout_s:g} s (its time limit).")
            if result.stopped:
                await self.stop()
            await _finish(pumps)
        except asyncio.CancelledError:
            # The call was abandoned midway: the interpreter is in an unknown state.
            self._dead = True
            _kill(self._proc)
            raise
        finally:
            for task in (answer, watching, guarding, *pumps):
                task.cancel()
            out_transport.close()
            err_transport.close()
        if result.outcome == res.OUTCOME_EXITED and result.exit_code and not result.messages:
            _stderr_hint(err.head, limits, result)
        if out.truncated or err.truncated:
            result.say(f"Output beyond {limits.output_bytes} bytes per stream was dropped.")
        _attach_counts(result, out, err)
        return result

    async def _pause(self, limits: CallLimits, result: Result) -> None:
        """After a call: freezes the interpreter until the next one (so that nothing it left
        running, a thread or a process, runs or grows between calls), and checks the memory it
        keeps against the session's limit once more (the last sample may be 50 ms old)."""
        assert self._proc is not None
        left = await memwatch.freeze(self._proc.popen.pid, self._runner, self._runner_fd)
        if left is None:
            result.stopped = True
            result.outcome, result.limit = res.OUTCOME_LIMIT_EXCEEDED, res.LIMIT_PROCESSES
            result.say("Processes it started could not be stopped after it ended.")
            return
        limit = limits.session_memory_bytes
        if limit and memwatch.resident(left) > limit:
            used = memwatch.proportional(left)
            if used > limit:
                result.stopped = True
                result.outcome, result.limit = res.OUTCOME_LIMIT_EXCEEDED, res.LIMIT_MEMORY
                result.say(memwatch.message(limit, used))

    async def stop(self) -> None:
        self._dead = True
        if self._proc is not None:
            if self._proc.returncode is None:
                _kill(self._proc)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._proc.wait(), 5.0)
            self._proc.close_pipes()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._runner_fd >= 0:
            os.close(self._runner_fd)
            self._runner_fd = -1


def _python_result(answer: dict[str, object], limits: CallLimits, result: Result) -> None:
    code = answer.get("exit_code")
    result.exit_code = code if isinstance(code, int) else 1
    kind = answer.get("exc_type")
    errno = answer.get("errno")
    if kind == "MemoryError":
        result.limit = res.LIMIT_MEMORY
        result.say(f"It ran out of memory (limit {_mib(limits.memory_bytes)} per process).")
    elif errno == 27:
        result.limit = res.LIMIT_FILE_SIZE
        result.say(f"A file hit the size limit of {_mib(limits.file_bytes)}.")
    elif kind == "BlockingIOError" and errno == 11:
        result.limit = res.LIMIT_PROCESSES
        result.say(f"It hit the limit of {limits.processes} processes.")
    elif errno in (28, 122):
        result.limit = res.LIMIT_DISK
        result.say("It ran out of room to write (the sandbox's /tmp or the session's disk).")
    elif errno in _NETWORK_ERRNOS or kind in ("gaierror", "ConnectionRefusedError"):
        result.say("The sandbox has no network access.")


def _attach_counts(result: Result, out: _Pump, err: _Pump) -> None:
    result.stdout_bytes = out.total
    result.stderr_bytes = err.total
    result.truncated = out.truncated or err.truncated


class _DiskWatch:
    """Fires when the session's files grow beyond its disk limit during a call."""

    def __init__(self, directory: str, limit: int) -> None:
        self.directory = directory
        self.limit = limit
        self.seen = 0

    def message(self) -> str:
        return (
            f"The session's files exceeded their limit of {_mib(self.limit)}; the files this call "
            "wrote were removed."
        )

    async def run(self) -> None:
        while True:
            await asyncio.sleep(_DISK_CHECK_S)
            tree = await asyncio.to_thread(files.walk, self.directory)
            self.seen = tree.total_bytes
            if tree.total_bytes > self.limit or tree.truncated:
                return


def _memory_watch(
    root: int, limits: CallLimits, interval_s: float, beside: Sequence[int] = ()
) -> memwatch.Watch | None:
    if not limits.session_memory_bytes:
        return None
    return memwatch.Watch(root, limits.session_memory_bytes, interval_s, beside)


async def _forever() -> None:
    await asyncio.Event().wait()


async def run_command(
    sandbox: Sandbox,
    directory: str,
    uid: int,
    command: str,
    index: int,
    limits: CallLimits,
    emit: Emit,
    *,
    memory_check_s: float = 0.05,
    beside: Sequence[int] = (),
) -> Result:
    """Runs one shell command in a sandbox of its own (``beside``: the processes of the session's
    frozen interpreter, whose memory counts against the session's limit too)."""
    argv = sandbox.command(directory, uid, limits.sandbox(), ["/bin/sh", "-c", command])
    proc = Child(argv, stdout=True, stderr=True)
    memory = _memory_watch(proc.popen.pid, limits, memory_check_s, beside)
    out_reader, out_transport = await proc.reader("stdout")
    err_reader, err_transport = await proc.reader("stderr")
    out = _Pump(emit, index, res.OUTPUT_STREAM_STDOUT, limits.output_bytes)
    err = _Pump(emit, index, res.OUTPUT_STREAM_STDERR, limits.output_bytes)
    pumps = [asyncio.create_task(out.run(out_reader)), asyncio.create_task(err.run(err_reader))]
    watch = _DiskWatch(directory, limits.disk_bytes)
    ended = asyncio.create_task(proc.wait())
    watching = asyncio.create_task(watch.run())
    guarding = asyncio.create_task(memory.run() if memory else _forever())
    result = Result()
    try:
        done, _ = await asyncio.wait(
            {ended, watching, guarding},
            timeout=limits.timeout_s,
            return_when=asyncio.FIRST_COMPLETED,
        )
        if guarding in done and memory is not None:
            _kill(proc)
            result.outcome, result.limit = res.OUTCOME_LIMIT_EXCEEDED, res.LIMIT_MEMORY
            result.say(memory.message())
        elif ended in done:
            status = ended.result()
            if not _signal_limit(status, limits, result):
                result.exit_code = status
        elif watching in done:
            _kill(proc)
            result.outcome, result.limit = res.OUTCOME_LIMIT_EXCEEDED, res.LIMIT_DISK
            result.say(watch.message())
        else:
            _kill(proc)
            result.outcome = res.OUTCOME_TIMED_OUT
            result.say(f"It was stopped after {limits.timeout_s:g} s (its time limit).")
        with contextlib.suppress(Exception):
            await asyncio.wait_for(proc.wait(), 5.0)
        await _finish(pumps)
    finally:
        for task in (ended, watching, guarding, *pumps):
            task.cancel()
        _kill(proc)
        out_transport.close()
        err_transport.close()
    if result.outcome == res.OUTCOME_EXITED and result.exit_code and not result.messages:
        _stderr_hint(err.head, limits, result)
    if out.truncated or err.truncated:
        result.say(f"Output beyond {limits.output_bytes} bytes per stream was dropped.")
    _attach_counts(result, out, err)
    return result


class Executor:
    """The sessions' interpreters, and the calls running in them."""

    def __init__(
        self,
        store: sessions.SessionStore,
        sandbox: Sandbox,
        defaults: CallLimits,
        *,
        max_concurrent_calls: int = 8,
        memory_check_s: float = 0.05,
    ) -> None:
        self.store = store
        self.sandbox = sandbox
        self.defaults = defaults
        self.memory_check_s = memory_check_s
        self._kernels: dict[str, Kernel] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._running = asyncio.Semaphore(max_concurrent_calls)
        store.on_forget.append(self._forgotten)
        store.on_create.append(self._created)

    # -- the sessions' uids (root mode) and lifecycle

    def uid(self, session: sessions.Session) -> int:
        """The uid a session's processes run as (root mode), its directory handed to it."""
        if not self.sandbox.as_root:
            return os.getuid()
        uid = self.sandbox.session_uid(self.store.ensure_slot(session))
        if os.stat(session.directory).st_uid != uid:
            os.chown(session.directory, uid, uid)
        return uid

    def _created(self, session: sessions.Session) -> None:
        if self.sandbox.as_root and session.slot is not None:
            uid = self.sandbox.session_uid(session.slot)
            os.chown(session.directory, uid, uid)

    def _forgotten(self, ids: Sequence[str]) -> None:
        for session_id in ids:
            self._locks.pop(session_id, None)
            kernel = self._kernels.pop(session_id, None)
            if kernel is not None:
                asyncio.get_running_loop().create_task(kernel.stop())

    async def close(self) -> None:
        kernels, self._kernels = list(self._kernels.values()), {}
        for kernel in kernels:
            await kernel.stop()

    def limits(
        self,
        session: sessions.Session,
        timeout_s: float | None,
        output_bytes: int,
        max_timeout_s: float,
    ) -> CallLimits:
        """The limits of a call: the defaults, the session's memory, the request's asks
        (clamped)."""
        limits = self.defaults
        if session.memory_bytes:
            limits = replace(limits, memory_bytes=session.memory_bytes)
            if limits.session_memory_bytes:
                limits = replace(limits, session_memory_bytes=session.memory_bytes)
        if timeout_s:
            limits = replace(limits, timeout_s=min(timeout_s, max_timeout_s))
        if output_bytes:
            limits = replace(
                limits, output_bytes=min(output_bytes, self.defaults.output_bytes * 16)
            )
        return limits

    # -- Execute

    async def execute(
        self,
        session: sessions.Session,
        *,
        code: str | None,
        commands: Sequence[str],
        limits: CallLimits,
        emit: Emit,
    ) -> None:
        """Runs one call and emits its whole stream (after ExecutionStarted, which the caller
        sends)."""
        lock = self._locks.setdefault(session.id, asyncio.Lock())
        async with lock, self._running:
            had_python = self.store.touch(session).had_python
            session = self.store.touch(session, python=code is not None)
            uid = self.uid(session)
            before = await asyncio.to_thread(files.walk, session.directory)
            finished = pb.ExecutionFinished()
            if code is not None:
                result, restarted = await self._python(session, uid, code, limits, emit, had_python)
                finished.interpreter_restarted = restarted
                finished.interpreter_stopped = result.stopped
                after = await self._check_disk(session, before, limits, result)
                emit(_command_result(0, result, result.started))
            else:
                after = before
                for index, command in enumerate(commands):
                    started = time.monotonic()
                    kernel = self._kernels.get(session.id)
                    beside = kernel.pids() if kernel and limits.session_memory_bytes else []
                    result = await run_command(
                        self.sandbox,
                        session.directory,
                        uid,
                        command,
                        index,
                        limits,
                        emit,
                        memory_check_s=self.memory_check_s,
                        beside=beside,
                    )
                    after = await self._check_disk(session, after, limits, result)
                    emit(_command_result(index, result, started))
            self.store.touch(session)
            changed = files.changed(before, after)
            records = self.store.register_files(session.id, changed, "assistant")
            for path in changed:
                finished.files_changed.append(session_file(records[path], after.files[path]))
            emit(pb.ExecuteResponse(finished=finished))

    async def _python(
        self,
        session: sessions.Session,
        uid: int,
        code: str,
        limits: CallLimits,
        emit: Emit,
        had_python: bool,
    ) -> tuple[Result, bool]:
        kernel = self._kernels.get(session.id)
        restarted = False
        if kernel is None or not kernel.alive or kernel.limits.memory_bytes != limits.memory_bytes:
            if kernel is not None:
                await kernel.stop()
            restarted = had_python
            kernel = Kernel(self.sandbox, session.directory, uid, limits, self.memory_check_s)
            try:
                await kernel.start()
            except OSError as exc:
                log.error("cannot start a sandboxed interpreter", extra={"error": str(exc)})
                result = Result(outcome=res.OUTCOME_FAILED, stopped=True, started=time.monotonic())
                result.say(f"The sandbox could not start: {exc}")
                return result, restarted
            self._kernels[session.id] = kernel
        start = time.monotonic()
        result = await kernel.run(
            code, limits, emit, _DiskWatch(session.directory, limits.disk_bytes)
        )
        result.started = start
        if result.stopped:
            self._kernels.pop(session.id, None)
            result.say(
                "The Python interpreter was stopped: variables from earlier calls are gone; the "
                "files in /mnt/data remain."
            )
        if restarted:
            result.messages = [
                "The Python interpreter had been restarted before this call: variables from "
                "earlier calls are gone; the files in /mnt/data remain.",
                *(result.messages or []),
            ]
        return result, restarted

    async def _check_disk(
        self, session: sessions.Session, before: files.Tree, limits: CallLimits, result: Result
    ) -> files.Tree:
        """The session's files after a call; when they exceed the disk limit, the files the
        call wrote are removed and the result says so."""
        after = await asyncio.to_thread(files.walk, session.directory)
        if after.total_bytes <= limits.disk_bytes and not after.truncated:
            return after
        changed = files.changed(before, after)
        for path in changed:
            with contextlib.suppress(OSError):
                files.remove(session.directory, path)
        self.store.forget_files(session.id, changed)
        if result.limit != res.LIMIT_DISK:
            result.outcome, result.limit = res.OUTCOME_LIMIT_EXCEEDED, res.LIMIT_DISK
            result.say(_DiskWatch(session.directory, limits.disk_bytes).message())
        return await asyncio.to_thread(files.walk, session.directory)


def _command_result(index: int, result: Result, started: float) -> pb.ExecuteResponse:
    began = result.started or started
    return pb.ExecuteResponse(
        command_result=pb.CommandResult(
            command_index=index,
            outcome=result.outcome,
            exit_code=result.exit_code if result.outcome == res.OUTCOME_EXITED else 0,
            limit=result.limit,
            message=" ".join(result.messages or []),
            stdout_bytes=result.stdout_bytes,
            stderr_bytes=result.stderr_bytes,
            output_truncated=result.truncated,
            duration=_duration(time.monotonic() - began),
        )
    )


def session_file(record: sessions.FileRecord, entry: files.Entry) -> res.SessionFile:
    """A registered file as the contract shows it."""
    out = res.SessionFile(
        file_id=record.file_id,
        path=files.shown(record.path),
        size_bytes=entry.size,
        source=res.FILE_SOURCE_USER if record.source == "user" else res.FILE_SOURCE_ASSISTANT,
        media_type=files.media_type(record.path),
    )
    out.create_time.FromNanoseconds(int(record.created_at * 1e9))
    return out
