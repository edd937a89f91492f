"""The router's side of the execution contract (respgw.bootstrap.v1.ExecutionService).

The ExecutionService is served on the bootstrap service's address (the contract says so), so the
router needs no other setting: :func:`make_executor` returns a client when a bootstrap address is
configured. The tool loop runs calls with :meth:`GrpcExecutor.execute`
(:mod:`router_svc.tool_calls`); the Containers API (:mod:`router_svc.routes.containers`) uses the
session and file RPCs. Each call's latency and failures are metrics (``EXECUTION_CALL_*``).

:meth:`GrpcExecutor.execute` follows the proto's rule for a call that is not idempotent: it is
retried (same request, short back-off) only when it failed with UNAVAILABLE before the service said
it started; any later failure becomes the call's ``error``, which the model reads, never a second
run. The other RPCs are mapped to OpenAI-shaped errors once, by :func:`api_error`, with an entry
for every ``grpc.StatusCode``.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from prometheus_client import Counter, Histogram

from gateway import grpcclient, grpcerrors
from gateway.grpcserver import DEFAULT_MAX_MESSAGE_BYTES, channel_options
from gateway.metrics import LATENCY_BUCKETS
from respgw.bootstrap.v1 import error_reason_pb2 as reasons
from respgw.bootstrap.v1 import execution_resources_pb2 as res
from respgw.bootstrap.v1 import execution_service_pb2 as pb
from respgw.bootstrap.v1 import execution_service_pb2_grpc
from router_svc import errors

log = logging.getLogger(__name__)

_SERVICE = pb.DESCRIPTOR.services_by_name["ExecutionService"].full_name

EXECUTION_CALL_LATENCY = Histogram(
    "respgw_router_execution_call_latency_seconds",
    "Time of one execution service call as the router sees it (an Execute call's attempt: until "
    "its stream ended).",
    ["method"],
    buckets=LATENCY_BUCKETS,
)
EXECUTION_CALL_ERRORS = Counter(
    "respgw_router_execution_call_errors_total",
    "Failed execution service calls (each failed attempt of a retried Execute), by method and "
    "status code.",
    ["method", "code"],
)

T = TypeVar("T")
# How long a capabilities answer (or its absence) is trusted.
CAPABILITIES_TTL_S = 30.0
RETRY_BACKOFF_S = (0.05, 0.2)
# UNAVAILABLE: nothing ran (a stream that started is never replayed: see Execute's contract).
RETRY = grpcclient.RetryPolicy(frozenset({grpc.StatusCode.UNAVAILABLE}), RETRY_BACKOFF_S)
UPLOAD_CHUNK = 1024 * 1024
_OUTCOMES = {
    res.OUTCOME_EXITED: "exited",
    res.OUTCOME_TIMED_OUT: "timed_out",
    res.OUTCOME_LIMIT_EXCEEDED: "limit_exceeded",
    res.OUTCOME_FAILED: "failed",
}


@dataclass(frozen=True)
class Capabilities:
    """What the execution service runs (GetExecutionCapabilities)."""

    runs_python: bool
    runs_commands: bool
    supports_files: bool
    supports_sessions: bool
    max_timeout_s: float
    default_timeout_s: float
    sandbox: str


@dataclass(frozen=True)
class FileInfo:
    """A file of a session (SessionFile)."""

    file_id: str
    path: str
    size_bytes: int
    created_at: int
    source: str  # "user" or "assistant"
    media_type: str

    @property
    def filename(self) -> str:
        return self.path.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class SessionInfo:
    """An execution session (ExecutionSession): a container, in the Containers API's words."""

    session_id: str
    name: str
    created_at: int
    last_active_at: int
    idle_ttl_s: float
    memory_limit_bytes: int


@dataclass
class CommandOutput:
    """How one command (or the Python call) went."""

    index: int
    outcome: str = "failed"  # exited, timed_out, limit_exceeded, failed
    exit_code: int = 0
    message: str = ""
    stdout: str = ""
    stderr: str = ""
    truncated: bool = False


@dataclass
class ExecResult:
    """Everything one call produced. ``error`` is set when the call could not run to its end
    (the service failed or was unreachable); the commands that did report are kept."""

    commands: list[CommandOutput] = field(default_factory=list)
    files: list[FileInfo] = field(default_factory=list)
    interpreter_restarted: bool = False
    interpreter_stopped: bool = False
    error: str = ""
    started: bool = False  # the service said the call began (ExecutionStarted)


# Called with (command index, "stdout" or "stderr", text) as output arrives.
OnOutput = Callable[[int, str, str], Awaitable[None]]


def file_info(f: res.SessionFile) -> FileInfo:
    return FileInfo(
        file_id=f.file_id,
        path=f.path,
        size_bytes=f.size_bytes,
        created_at=f.create_time.seconds,
        source="user" if f.source == res.FILE_SOURCE_USER else "assistant",
        media_type=f.media_type,
    )


def session_info(s: res.ExecutionSession) -> SessionInfo:
    return SessionInfo(
        session_id=s.session_id,
        name=s.name,
        created_at=s.create_time.seconds,
        last_active_at=s.last_active_time.seconds,
        idle_ttl_s=s.idle_ttl.ToNanoseconds() / 1e9,
        memory_limit_bytes=s.memory_limit_bytes,
    )


# For each status code of the execution service: the HTTP status and error class the client of the
# Containers API sees. Codes that mean "the service is unwell" are 503 (retryable); codes that mean
# "the router sent something wrong" are 500.
_STATUS: dict[grpc.StatusCode, tuple[type[errors.ApiError], int, str]] = {
    grpc.StatusCode.OK: (errors.ApiError, 500, "internal_error"),
    grpc.StatusCode.CANCELLED: (errors.ApiError, 503, "execution_unavailable"),
    grpc.StatusCode.UNKNOWN: (errors.ApiError, 502, "execution_failed"),
    grpc.StatusCode.INVALID_ARGUMENT: (errors.InvalidRequest, 400, "invalid_value"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (errors.ApiError, 504, "execution_timeout"),
    grpc.StatusCode.NOT_FOUND: (errors.NotFound, 404, "not_found"),
    grpc.StatusCode.ALREADY_EXISTS: (errors.InvalidRequest, 409, "idempotency_key_reused"),
    grpc.StatusCode.PERMISSION_DENIED: (errors.ApiError, 403, "permission_denied"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (errors.RateLimited, 429, "rate_limit_exceeded"),
    grpc.StatusCode.FAILED_PRECONDITION: (errors.InvalidRequest, 400, "containers_unavailable"),
    grpc.StatusCode.ABORTED: (errors.ApiError, 409, "conflict"),
    grpc.StatusCode.OUT_OF_RANGE: (errors.InvalidRequest, 400, "invalid_value"),
    grpc.StatusCode.UNIMPLEMENTED: (errors.InvalidRequest, 400, "containers_unavailable"),
    grpc.StatusCode.INTERNAL: (errors.ApiError, 502, "execution_failed"),
    grpc.StatusCode.UNAVAILABLE: (errors.ApiError, 503, "execution_unavailable"),
    grpc.StatusCode.DATA_LOSS: (errors.ApiError, 502, "execution_failed"),
    grpc.StatusCode.UNAUTHENTICATED: (errors.ApiError, 500, "internal_error"),
}
# Reasons whose HTTP status says more than their code's.
_REASONS: dict[str, tuple[type[errors.ApiError], int, str]] = {
    grpcerrors.reason(reasons.ErrorReason, reason): error
    for reason, error in (
        (reasons.ERROR_REASON_FILE_TOO_LARGE, (errors.InvalidRequest, 413, "file_too_large")),
        (reasons.ERROR_REASON_DISK_FULL, (errors.InvalidRequest, 413, "container_full")),
        (reasons.ERROR_REASON_SESSION_LIMIT, (errors.RateLimited, 429, "rate_limit_exceeded")),
    )
}


def api_error(err: grpcerrors.RemoteError, *, param: str | None = None) -> errors.ApiError:
    """A failed session or file call as the error the Containers API client sees."""
    cls, status, code = _REASONS.get(err.reason) or _STATUS.get(
        err.code, (errors.ApiError, 502, "execution_failed")
    )
    message = err.message or err.code.name
    if err.code == grpc.StatusCode.UNIMPLEMENTED:
        message = f"The execution service does not support this ({message})."
    elif cls is errors.ApiError and status >= 500:
        message = f"The execution service failed ({err.code.name}): {message}"
    error = cls(message, param=param, code=code, status=status)
    if err.code == grpc.StatusCode.ALREADY_EXISTS:
        error.type = errors.INVALID_REQUEST
    return error


class GrpcExecutor:
    """A client of one ExecutionService over one long-lived channel."""

    def __init__(
        self,
        target: str,
        timeout_s: float = 10.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self._max_message_bytes = max_message_bytes
        self._channel: grpc.aio.Channel | None = None
        self._stub: execution_service_pb2_grpc.ExecutionServiceAsyncStub | None = None
        self._capabilities: Capabilities | None = None
        self._capabilities_at = -CAPABILITIES_TTL_S

    def _client(self) -> execution_service_pb2_grpc.ExecutionServiceAsyncStub:
        if self._stub is None:
            self._channel = grpc.aio.insecure_channel(
                self.target, options=channel_options(self._max_message_bytes)
            )
            self._stub = execution_service_pb2_grpc.ExecutionServiceStub(self._channel)
        assert self._stub is not None
        return self._stub

    @contextlib.contextmanager
    def _traced(self, method: str) -> Iterator[tuple[tuple[str, str], ...]]:
        """The metadata of one call (gateway.grpcclient): the request id, and its CLIENT span's
        trace when tracing is on (so the execution service's spans join the request's trace);
        the call's latency and failure are recorded when it ends (``EXECUTION_CALL_*``)."""
        out = grpcclient.Outgoing(_SERVICE, method)
        code = "OK"
        failed = False
        try:
            yield out.metadata
        except grpc.aio.AioRpcError as exc:
            code, failed = exc.code().name, True
            raise
        except errors.ApiError:
            code, failed = "UNKNOWN", True
            raise
        finally:
            out.end(
                code,
                latency=EXECUTION_CALL_LATENCY,
                failures=EXECUTION_CALL_ERRORS if failed else None,
            )

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
            self._stub = None

    async def capabilities(self) -> Capabilities | None:
        """What the service runs; None when it serves no ExecutionService or cannot be reached
        (asked again after a while)."""
        now = time.monotonic()
        if now - self._capabilities_at < CAPABILITIES_TTL_S:
            return self._capabilities
        try:
            with self._traced("GetExecutionCapabilities") as metadata:
                reply = await self._client().GetExecutionCapabilities(
                    pb.GetExecutionCapabilitiesRequest(), timeout=self.timeout_s, metadata=metadata
                )
        except grpc.aio.AioRpcError as exc:
            level = (
                logging.DEBUG if exc.code() == grpc.StatusCode.UNIMPLEMENTED else logging.WARNING
            )
            log.log(level, "no execution service", extra={"code": exc.code().name})
            self._capabilities = None
        else:
            self._capabilities = Capabilities(
                runs_python=reply.runs_python,
                runs_commands=reply.runs_commands,
                supports_files=reply.supports_files,
                supports_sessions=reply.supports_sessions,
                max_timeout_s=reply.max_limits.timeout.ToNanoseconds() / 1e9 or 600.0,
                default_timeout_s=reply.default_limits.timeout.ToNanoseconds() / 1e9 or 60.0,
                sandbox=reply.sandbox,
            )
        self._capabilities_at = now
        return self._capabilities

    # -- Execute --------------------------------------------------------------------------------

    async def execute(
        self,
        *,
        tenant: str,
        session_id: str,
        prepared_state: bytes = b"",
        code: str | None = None,
        commands: list[str] | None = None,
        timeout_s: float | None = None,
        max_output_bytes: int = 0,
        call_id: str = "",
        on_output: OnOutput | None = None,
    ) -> ExecResult:
        """Runs one call and collects what it produced; never raises for a failed call (the
        result's ``error`` says what happened, for the model to read)."""
        request = pb.ExecuteRequest(
            tenant=tenant,
            session_id=session_id,
            prepared_state=prepared_state,
            max_output_bytes=max_output_bytes,
            call_id=call_id,
        )
        if code is not None:
            request.python.code = code
        else:
            request.commands.commands.extend(commands or [])
        if timeout_s:
            request.timeout.FromNanoseconds(int(timeout_s * 1e9))
        caps = await self.capabilities()
        per_call = timeout_s or (caps.default_timeout_s if caps else 60.0)
        deadline = per_call * max(1, len(request.commands.commands)) + 60.0
        result = ExecResult()
        for attempt in range(len(RETRY_BACKOFF_S) + 1):
            try:
                await self._stream(request, deadline, result, on_output)
            except _Started:
                pass  # recorded in result.error
            except grpc.aio.AioRpcError as exc:
                err = grpcerrors.error_info(exc)
                pause = RETRY.pause(err.code, attempt)
                if pause is not None:
                    # Nothing ran: the proto allows the retry.
                    await asyncio.sleep(pause)
                    continue
                log.warning(
                    "a tool call could not run",
                    extra={"code": err.code.name, "reason": err.reason, "detail": err.message},
                )
                result.error = _call_error(err)
            return result
        return result

    async def _stream(
        self,
        request: pb.ExecuteRequest,
        deadline: float,
        result: ExecResult,
        on_output: OnOutput | None,
    ) -> None:
        """Reads one Execute stream into ``result``. A failure after ExecutionStarted is recorded
        in ``result.error`` (and raises :class:`_Started` so that it is never retried); one before
        it raises the RpcError."""
        decoders: dict[tuple[int, str], codecs.IncrementalDecoder] = {}
        chunks: dict[tuple[int, str], list[str]] = {}
        result.started = False
        try:
            with self._traced("Execute") as metadata:
                await self._read(request, deadline, metadata, result, on_output, decoders, chunks)
        except grpc.aio.AioRpcError as exc:
            if not result.started:
                raise
            result.error = _call_error(grpcerrors.error_info(exc))
            _fill(result, decoders, chunks)
            raise _Started from exc
        _fill(result, decoders, chunks)

    async def _read(
        self,
        request: pb.ExecuteRequest,
        deadline: float,
        metadata: tuple[tuple[str, str], ...],
        result: ExecResult,
        on_output: OnOutput | None,
        decoders: dict[tuple[int, str], codecs.IncrementalDecoder],
        chunks: dict[tuple[int, str], list[str]],
    ) -> None:
        async for message in self._client().Execute(request, timeout=deadline, metadata=metadata):
            kind = message.WhichOneof("event")
            if kind == "started":
                result.started = True
            elif kind == "output":
                stream = "stdout" if message.output.stream == res.OUTPUT_STREAM_STDOUT else "stderr"
                key = (message.output.command_index, stream)
                decoder = decoders.setdefault(
                    key, codecs.getincrementaldecoder("utf-8")(errors="replace")
                )
                text = decoder.decode(message.output.data)
                if text:
                    chunks.setdefault(key, []).append(text)
                    if on_output is not None:
                        await on_output(key[0], stream, text)
            elif kind == "command_result":
                got = message.command_result
                result.commands.append(
                    CommandOutput(
                        index=got.command_index,
                        outcome=_OUTCOMES.get(got.outcome, "failed"),
                        exit_code=got.exit_code,
                        message=got.message,
                        truncated=got.output_truncated,
                    )
                )
            elif kind == "finished":
                done = message.finished
                result.files = [file_info(f) for f in done.files_changed]
                result.interpreter_restarted = done.interpreter_restarted
                result.interpreter_stopped = done.interpreter_stopped

    # -- sessions -------------------------------------------------------------------------------

    async def _unary(
        self,
        method: str,
        call: Callable[[tuple[tuple[str, str], ...]], Awaitable[T]],
        param: str | None = None,
    ) -> T:
        try:
            with self._traced(method) as metadata:
                return await call(metadata)
        except grpc.aio.AioRpcError as exc:
            err = grpcerrors.error_info(exc)
            log.warning(
                "execution service call failed",
                extra={"code": err.code.name, "reason": err.reason, "detail": err.message},
            )
            raise api_error(err, param=param) from exc

    async def create_session(
        self,
        *,
        tenant: str,
        request_id: str,
        name: str,
        idle_ttl_s: float | None,
        memory_limit_bytes: int,
    ) -> SessionInfo:
        request = pb.CreateSessionRequest(
            request_id=request_id, tenant=tenant, name=name, memory_limit_bytes=memory_limit_bytes
        )
        if idle_ttl_s is not None:
            request.idle_ttl.FromNanoseconds(int(idle_ttl_s * 1e9))
        reply = await self._unary(
            "CreateSession",
            lambda md: self._client().CreateSession(request, timeout=self.timeout_s, metadata=md),
        )
        return session_info(reply.session)

    async def get_session(self, tenant: str, session_id: str) -> SessionInfo:
        request = pb.GetSessionRequest(tenant=tenant, session_id=session_id)
        reply = await self._unary(
            "GetSession",
            lambda md: self._client().GetSession(request, timeout=self.timeout_s, metadata=md),
        )
        return session_info(reply.session)

    async def list_sessions(self, tenant: str) -> list[SessionInfo]:
        """Every live session of the tenant, oldest first."""
        out: list[SessionInfo] = []
        token = ""
        while True:
            request = pb.ListSessionsRequest(tenant=tenant, page_size=1000, page_token=token)
            reply = await self._unary(
                "ListSessions",
                lambda md, r=request: self._client().ListSessions(  # type: ignore[misc]
                    r, timeout=self.timeout_s, metadata=md
                ),
            )
            out.extend(session_info(s) for s in reply.sessions)
            token = reply.next_page_token
            if not token:
                return out

    async def delete_session(self, tenant: str, session_id: str) -> None:
        request = pb.DeleteSessionRequest(tenant=tenant, session_id=session_id)
        await self._unary(
            "DeleteSession",
            lambda md: self._client().DeleteSession(request, timeout=self.timeout_s, metadata=md),
        )

    # -- files ----------------------------------------------------------------------------------

    async def list_files(self, tenant: str, session_id: str) -> list[FileInfo]:
        """Every file of the session, oldest first."""
        out: list[FileInfo] = []
        token = ""
        while True:
            request = pb.ListFilesRequest(
                tenant=tenant, session_id=session_id, page_size=1000, page_token=token
            )
            reply = await self._unary(
                "ListFiles",
                lambda md, r=request: self._client().ListFiles(  # type: ignore[misc]
                    r, timeout=self.timeout_s, metadata=md
                ),
            )
            out.extend(file_info(f) for f in reply.files)
            token = reply.next_page_token
            if not token:
                return out

    async def get_file(self, tenant: str, session_id: str, file_id: str) -> FileInfo:
        request = pb.GetFileRequest(tenant=tenant, session_id=session_id, file_id=file_id)
        reply = await self._unary(
            "GetFile",
            lambda md: self._client().GetFile(request, timeout=self.timeout_s, metadata=md),
        )
        return file_info(reply.file)

    async def delete_file(self, tenant: str, session_id: str, file_id: str) -> None:
        request = pb.DeleteFileRequest(tenant=tenant, session_id=session_id, file_id=file_id)
        await self._unary(
            "DeleteFile",
            lambda md: self._client().DeleteFile(request, timeout=self.timeout_s, metadata=md),
        )

    async def upload_file(self, tenant: str, session_id: str, path: str, data: bytes) -> FileInfo:
        async def parts() -> AsyncIterator[pb.UploadFileRequest]:
            yield pb.UploadFileRequest(
                header=pb.UploadFileHeader(tenant=tenant, session_id=session_id, path=path)
            )
            for start in range(0, len(data), UPLOAD_CHUNK):
                yield pb.UploadFileRequest(data=data[start : start + UPLOAD_CHUNK])

        reply = await self._unary(
            "UploadFile",
            lambda md: self._client().UploadFile(parts(), timeout=self.timeout_s * 6, metadata=md),
            param="file",
        )
        return file_info(reply.file)

    async def download_file(
        self, tenant: str, session_id: str, file_id: str
    ) -> tuple[FileInfo, AsyncIterator[bytes]]:
        """The file and an iterator of its content. The first message is read here, so that a
        missing file is an error before any content is promised."""
        request = pb.DownloadFileRequest(tenant=tenant, session_id=session_id, file_id=file_id)
        calls: list[Any] = []

        async def first(md: tuple[tuple[str, str], ...]) -> pb.DownloadFileResponse:
            call = self._client().DownloadFile(request, timeout=self.timeout_s * 30, metadata=md)
            calls.append(call)
            message: pb.DownloadFileResponse = await anext(call.__aiter__())
            return message

        head = await self._unary("DownloadFile", first)
        call = calls[0]
        info = file_info(head.file)

        async def content() -> AsyncIterator[bytes]:
            try:
                async for message in call:
                    yield message.data
            finally:
                call.cancel()

        return info, content()

    async def read_file(self, tenant: str, session_id: str, file_id: str, limit: int) -> bytes:
        """A small file's content, or b"" when it is larger than ``limit`` or gone."""
        try:
            info, content = await self.download_file(tenant, session_id, file_id)
        except errors.ApiError:
            return b""
        if info.size_bytes > limit:
            await content.aclose()  # type: ignore[attr-defined]
            return b""
        return b"".join([chunk async for chunk in content])


class _Started(Exception):
    """An Execute stream failed after ExecutionStarted: recorded, never retried."""


def _fill(
    result: ExecResult,
    decoders: dict[tuple[int, str], codecs.IncrementalDecoder],
    chunks: dict[tuple[int, str], list[str]],
) -> None:
    for key, decoder in decoders.items():
        tail = decoder.decode(b"", final=True)
        if tail:
            chunks.setdefault(key, []).append(tail)
    by_index = {c.index: c for c in result.commands}
    for (index, stream), parts in chunks.items():
        command = by_index.get(index)
        if command is None:
            command = by_index[index] = CommandOutput(index=index)
            result.commands.append(command)
        setattr(command, stream, "".join(parts))
    result.commands.sort(key=lambda c: c.index)


def _call_error(err: grpcerrors.RemoteError) -> str:
    if err.code == grpc.StatusCode.NOT_FOUND:
        return (
            "The sandbox session of this tool no longer exists (it expired or was deleted); "
            "nothing ran."
        )
    if err.code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "The sandbox did not answer in time; the call may not have finished."
    return f"The sandbox could not run this call ({err.code.name}: {err.message})."


def make_executor(bootstrap_address: str, timeout_s: float = 10.0) -> GrpcExecutor | None:
    """The execution client, on the bootstrap service's address; None without one."""
    if not bootstrap_address:
        return None
    return GrpcExecutor(bootstrap_address, timeout_s)
