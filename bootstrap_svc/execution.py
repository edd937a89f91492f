"""The reference ExecutionService servicer: validates calls as execution_service.proto says and
runs them with :class:`executor.Executor` in the sessions of the :class:`sessions.SessionStore`
the BootstrapService prepares.

Every refusal is a gRPC status with a google.rpc.ErrorInfo in the domain ``bootstrap.respgw.dev``
whose reason is one of these ``ErrorReason`` values (``error_reason.proto``, built from the
generated constants): TENANT_REQUIRED, SESSION_REQUIRED, ACTION_REQUIRED, CODE_REQUIRED,
COMMANDS_REQUIRED, TIMEOUT_INVALID, FILE_REQUIRED, PATH_INVALID, HEADER_REQUIRED,
PAGE_TOKEN_INVALID, REQUEST_ID_REQUIRED, IDLE_TTL_INVALID, MEMORY_LIMIT_INVALID
(INVALID_ARGUMENT); SESSION_NOT_FOUND, FILE_NOT_FOUND (NOT_FOUND); REQUEST_ID_CONFLICT
(ALREADY_EXISTS); SESSION_LIMIT, FILE_TOO_LARGE, DISK_FULL (RESOURCE_EXHAUSTED);
SANDBOX_UNAVAILABLE (FAILED_PRECONDITION); EXECUTION_FAILED (INTERNAL). They are the classes of
``bootstrap_svc.errors``, mapped to statuses by one boundary for every RPC.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import grpc
import orjson
from google.protobuf import timestamp_pb2

from bootstrap_svc import errors, files, sessions
from bootstrap_svc.errors import invalid as _invalid
from bootstrap_svc.executor import Executor, session_file
from bootstrap_svc.sandbox import Sandbox
from gateway import grpcerrors
from respgw.bootstrap.v1 import error_reason_pb2 as reasons
from respgw.bootstrap.v1 import execution_resources_pb2 as res
from respgw.bootstrap.v1 import execution_service_pb2 as pb
from respgw.bootstrap.v1 import execution_service_pb2_grpc, resources_pb2

log = logging.getLogger(__name__)

IMPLEMENTATION = "respgw-reference/0.2"
DOWNLOAD_CHUNK = 1024 * 1024
_KINDS = {
    "code_interpreter": resources_pb2.TOOL_KIND_CODE_INTERPRETER,
    "shell": resources_pb2.TOOL_KIND_SHELL,
}

Ctx = grpc.aio.ServicerContext[Any, Any]


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromNanoseconds(int(seconds * 1e9))
    return out


def session_proto(session: sessions.Session, default_memory: int) -> res.ExecutionSession:
    out = res.ExecutionSession(
        session_id=session.id,
        name=session.name,
        kind=_KINDS.get(session.kind, resources_pb2.TOOL_KIND_CODE_INTERPRETER),
        conversation_id=session.conversation_id,
        memory_limit_bytes=session.memory_bytes or default_memory,
    )
    out.create_time.CopyFrom(_timestamp(session.created_at))
    out.last_active_time.CopyFrom(_timestamp(session.last_used))
    out.expire_time.CopyFrom(_timestamp(session.expire_at))
    out.idle_ttl.FromNanoseconds(int(session.idle_ttl_s * 1e9))
    return out


def _page_size(value: int) -> int:
    return 100 if value <= 0 else min(value, 1000)


def _token(created_at: float, ident: str) -> str:
    return base64.urlsafe_b64encode(orjson.dumps([created_at, ident])).decode()


def _untoken(token: str) -> tuple[float, str] | None:
    if not token:
        return None
    try:
        value = orjson.loads(base64.urlsafe_b64decode(token.encode()))
        return float(value[0]), str(value[1])
    except (ValueError, TypeError, IndexError, orjson.JSONDecodeError) as exc:
        raise _invalid(
            reasons.ERROR_REASON_PAGE_TOKEN_INVALID,
            "page_token was not made by this service",
            "page_token",
        ) from exc


@grpcerrors.servicer(pb.DESCRIPTOR.services_by_name["ExecutionService"], log=log, warn=errors.WARN)
class ExecutionServicer(execution_service_pb2_grpc.ExecutionServiceServicer):
    """Implements respgw.bootstrap.v1.ExecutionService; see the module docstring."""

    def __init__(
        self,
        store: sessions.SessionStore,
        executor: Executor,
        *,
        max_timeout_s: float,
        max_memory_bytes: int,
        max_idle_ttl_s: float,
    ) -> None:
        self._store = store
        self._executor = executor
        self._max_timeout_s = max_timeout_s
        self._max_memory_bytes = max_memory_bytes
        self._max_idle_ttl_s = max_idle_ttl_s

    @property
    def _sandbox(self) -> Sandbox:
        return self._executor.sandbox

    async def GetExecutionCapabilities(
        self, request: pb.GetExecutionCapabilitiesRequest, context: Ctx
    ) -> pb.GetExecutionCapabilitiesResponse:
        defaults = self._executor.defaults
        maxima = defaults.proto()
        maxima.timeout.FromNanoseconds(int(self._max_timeout_s * 1e9))
        maxima.memory_bytes = self._max_memory_bytes
        if defaults.session_memory_bytes:
            maxima.session_memory_bytes = max(self._max_memory_bytes, defaults.session_memory_bytes)
        maxima.max_output_bytes = defaults.output_bytes * 16
        reply = pb.GetExecutionCapabilitiesResponse(
            runs_python=self._sandbox.ready,
            runs_commands=self._sandbox.ready,
            keeps_python_state=True,
            supports_files=True,
            supports_sessions=True,
            default_limits=defaults.proto(),
            max_limits=maxima,
            sandbox=self._sandbox.version if self._sandbox.ready else "",
            implementation=IMPLEMENTATION,
        )
        reply.max_idle_ttl.FromNanoseconds(int(self._max_idle_ttl_s * 1e9))
        return reply

    # -- sessions -------------------------------------------------------------------------------

    def _session(self, tenant: str, session_id: str) -> sessions.Session:
        if not tenant:
            raise _invalid(reasons.ERROR_REASON_TENANT_REQUIRED, "tenant is required", "tenant")
        if not session_id:
            raise _invalid(
                reasons.ERROR_REASON_SESSION_REQUIRED, "session_id is required", "session_id"
            )
        session = self._store.get(tenant, session_id)
        if session is None:
            raise errors.NotFound(
                reasons.ERROR_REASON_SESSION_NOT_FOUND,
                f"session {session_id!r} does not exist, expired or was deleted",
                "session_id",
            )
        return session

    def _proto(self, session: sessions.Session) -> res.ExecutionSession:
        return session_proto(session, self._executor.defaults.memory_bytes)

    async def CreateSession(
        self, request: pb.CreateSessionRequest, context: Ctx
    ) -> pb.CreateSessionResponse:
        return await self._create(request)

    async def _create(self, request: pb.CreateSessionRequest) -> pb.CreateSessionResponse:
        if not request.request_id:
            raise _invalid(
                reasons.ERROR_REASON_REQUEST_ID_REQUIRED, "request_id is required", "request_id"
            )
        if not request.tenant:
            raise _invalid(reasons.ERROR_REASON_TENANT_REQUIRED, "tenant is required", "tenant")
        idle_ttl: float | None = None
        if request.HasField("idle_ttl"):
            idle_ttl = request.idle_ttl.ToNanoseconds() / 1e9
            if not 1.0 <= idle_ttl <= self._max_idle_ttl_s:
                raise _invalid(
                    reasons.ERROR_REASON_IDLE_TTL_INVALID,
                    f"idle_ttl must be between 1 s and {self._max_idle_ttl_s:g} s",
                    "idle_ttl",
                )
        memory = request.memory_limit_bytes
        if memory and not 128 * 1024 * 1024 <= memory <= self._max_memory_bytes:
            raise _invalid(
                reasons.ERROR_REASON_MEMORY_LIMIT_INVALID,
                f"memory_limit_bytes must be between 128 MiB and {self._max_memory_bytes} bytes",
                "memory_limit_bytes",
            )
        fingerprint = hashlib.sha256(request.SerializeToString(deterministic=True)).digest()
        try:
            # RequestConflict and SessionLimit are refusals of their own.
            session, replayed = self._store.create(
                tenant=request.tenant,
                request_id=request.request_id,
                fingerprint=fingerprint,
                name=request.name,
                idle_ttl_s=idle_ttl,
                memory_bytes=memory,
            )
        except errors.SessionGone as exc:
            # The session a replayed CreateSession made is gone: for this RPC, NOT_FOUND.
            raise errors.NotFound(reasons.ERROR_REASON_SESSION_NOT_FOUND, exc.message) from exc
        log.info("created session", extra={"tenant": request.tenant, "session": session.id})
        return pb.CreateSessionResponse(session=self._proto(session), replayed=replayed)

    async def GetSession(
        self, request: pb.GetSessionRequest, context: Ctx
    ) -> pb.GetSessionResponse:
        session = self._session(request.tenant, request.session_id)
        return pb.GetSessionResponse(session=self._proto(session))

    async def ListSessions(
        self, request: pb.ListSessionsRequest, context: Ctx
    ) -> pb.ListSessionsResponse:
        if not request.tenant:
            raise _invalid(reasons.ERROR_REASON_TENANT_REQUIRED, "tenant is required", "tenant")
        size = _page_size(request.page_size)
        found = self._store.list_sessions(request.tenant, _untoken(request.page_token), size + 1)
        reply = pb.ListSessionsResponse(sessions=[self._proto(s) for s in found[:size]])
        if len(found) > size:
            last = found[size - 1]
            reply.next_page_token = _token(last.created_at, last.id)
        return reply

    async def DeleteSession(
        self, request: pb.DeleteSessionRequest, context: Ctx
    ) -> pb.DeleteSessionResponse:
        session = self._session(request.tenant, request.session_id)
        await self._store.delete(request.tenant, session.id)
        log.info("deleted session", extra={"tenant": request.tenant, "session": session.id})
        return pb.DeleteSessionResponse()

    # -- Execute --------------------------------------------------------------------------------

    async def Execute(
        self, request: pb.ExecuteRequest, context: Ctx
    ) -> AsyncIterator[pb.ExecuteResponse]:
        session, code, commands = self._check_execute(request)
        timeout = request.timeout.ToNanoseconds() / 1e9 if request.HasField("timeout") else None
        limits = self._executor.limits(
            session, timeout, request.max_output_bytes, self._max_timeout_s
        )
        queue: asyncio.Queue[pb.ExecuteResponse | None] = asyncio.Queue()
        started = pb.ExecuteResponse(
            started=pb.ExecutionStarted(session=self._proto(session), limits=limits.proto())
        )
        yield started

        async def run() -> None:
            try:
                await self._executor.execute(
                    session, code=code, commands=commands, limits=limits, emit=queue.put_nowait
                )
            finally:
                queue.put_nowait(None)

        task = asyncio.create_task(run())
        try:
            while (message := await queue.get()) is not None:
                yield message
            await task
        except asyncio.CancelledError:
            # The caller went away: the call stops (its interpreter with it).
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            raise
        except Exception as exc:
            log.exception("a call failed in the service")
            raise errors.Internal(
                reasons.ERROR_REASON_EXECUTION_FAILED, f"the call failed: {exc}"
            ) from exc
        log.info(
            "ran a call",
            extra={
                "tenant": request.tenant,
                "session": session.id,
                "call_id": request.call_id,
                "kind": "python" if code is not None else "commands",
            },
        )

    def _check_execute(
        self, request: pb.ExecuteRequest
    ) -> tuple[sessions.Session, str | None, list[str]]:
        if not request.tenant:
            raise _invalid(reasons.ERROR_REASON_TENANT_REQUIRED, "tenant is required", "tenant")
        if not request.session_id:
            raise _invalid(
                reasons.ERROR_REASON_SESSION_REQUIRED, "session_id is required", "session_id"
            )
        action = request.WhichOneof("action")
        if action is None:
            raise _invalid(
                reasons.ERROR_REASON_ACTION_REQUIRED, "python or commands is required", "action"
            )
        if action == "python" and not request.python.code.strip():
            raise _invalid(
                reasons.ERROR_REASON_CODE_REQUIRED, "python.code is empty", "python.code"
            )
        if action == "commands" and not request.commands.commands:
            raise _invalid(
                reasons.ERROR_REASON_COMMANDS_REQUIRED,
                "commands.commands is empty",
                "commands.commands",
            )
        if request.HasField("timeout") and request.timeout.ToNanoseconds() < 0:
            raise _invalid(reasons.ERROR_REASON_TIMEOUT_INVALID, "timeout is negative", "timeout")
        session = self._session(request.tenant, request.session_id)
        if not self._sandbox.ready:
            raise errors.FailedPrecondition(
                reasons.ERROR_REASON_SANDBOX_UNAVAILABLE,
                f"this service cannot run calls: {self._sandbox.problem or 'sandbox not checked'}",
            )
        if action == "python":
            return session, request.python.code, []
        return session, None, list(request.commands.commands)

    # -- files ----------------------------------------------------------------------------------

    async def _listing(self, session: sessions.Session) -> list[res.SessionFile]:
        """The session's files, oldest first; files found unregistered get an id, registered
        ones that are gone are forgotten."""
        tree = await asyncio.to_thread(files.walk, session.directory)
        known = self._store.files(session.id)
        self._store.forget_files(session.id, [p for p in known if p not in tree.files])
        records = self._store.register_files(session.id, sorted(tree.files), "assistant")
        out = [session_file(records[p], tree.files[p]) for p in tree.files]
        out.sort(key=lambda f: (f.create_time.ToNanoseconds(), f.file_id))
        return out

    async def _file(
        self, tenant: str, session_id: str, file_id: str
    ) -> tuple[sessions.Session, res.SessionFile]:
        session = self._session(tenant, session_id)
        if not file_id:
            raise _invalid(reasons.ERROR_REASON_FILE_REQUIRED, "file_id is required", "file_id")
        for found in await self._listing(session):
            if found.file_id == file_id:
                return session, found
        raise errors.NotFound(
            reasons.ERROR_REASON_FILE_NOT_FOUND,
            f"file {file_id!r} does not exist in session {session_id!r}",
            "file_id",
        )

    async def ListFiles(self, request: pb.ListFilesRequest, context: Ctx) -> pb.ListFilesResponse:
        session = self._session(request.tenant, request.session_id)
        after = _untoken(request.page_token)
        listing = await self._listing(session)
        if after is not None:
            mark = (int(after[0]), after[1])
            listing = [f for f in listing if (f.create_time.ToNanoseconds(), f.file_id) > mark]
        size = _page_size(request.page_size)
        reply = pb.ListFilesResponse(files=listing[:size])
        if len(listing) > size:
            last = listing[size - 1]
            reply.next_page_token = _token(last.create_time.ToNanoseconds(), last.file_id)
        return reply

    async def GetFile(self, request: pb.GetFileRequest, context: Ctx) -> pb.GetFileResponse:
        _, found = await self._file(request.tenant, request.session_id, request.file_id)
        return pb.GetFileResponse(file=found)

    async def DeleteFile(
        self, request: pb.DeleteFileRequest, context: Ctx
    ) -> pb.DeleteFileResponse:
        session, found = await self._file(request.tenant, request.session_id, request.file_id)
        path = files.relative(found.path)
        with contextlib.suppress(FileNotFoundError):
            files.remove(session.directory, path)
        self._store.forget_files(session.id, [path])
        return pb.DeleteFileResponse()

    async def DownloadFile(
        self, request: pb.DownloadFileRequest, context: Ctx
    ) -> AsyncIterator[pb.DownloadFileResponse]:
        session, found = await self._file(request.tenant, request.session_id, request.file_id)
        try:
            fd = files.open_for_read(session.directory, files.relative(found.path))
        except FileNotFoundError as exc:
            raise errors.NotFound(
                reasons.ERROR_REASON_FILE_NOT_FOUND, "the file is gone", "file_id"
            ) from exc
        with os.fdopen(fd, "rb") as stream:
            yield pb.DownloadFileResponse(file=found)
            while chunk := await asyncio.to_thread(stream.read, DOWNLOAD_CHUNK):
                yield pb.DownloadFileResponse(data=chunk)

    async def UploadFile(
        self, request_iterator: AsyncIterator[pb.UploadFileRequest], context: Ctx
    ) -> pb.UploadFileResponse:
        return await self._upload(request_iterator)

    async def _upload(self, parts: AsyncIterator[pb.UploadFileRequest]) -> pb.UploadFileResponse:
        first = await anext(aiter(parts), None)
        if first is None or first.WhichOneof("part") != "header":
            raise _invalid(
                reasons.ERROR_REASON_HEADER_REQUIRED,
                "the first message must carry the header",
                "header",
            )
        header = first.header
        session = self._session(header.tenant, header.session_id)
        try:
            path = files.relative(header.path)
        except files.BadPath as exc:
            raise _invalid(reasons.ERROR_REASON_PATH_INVALID, str(exc), "header.path") from exc
        limits = self._executor.defaults
        room = limits.disk_bytes - files.walk(session.directory).total_bytes
        uid = self._executor.uid(session) if self._sandbox.as_root else None
        try:
            fd = files.open_for_write(session.directory, path, uid)
        except files.BadPath as exc:
            raise _invalid(reasons.ERROR_REASON_PATH_INVALID, str(exc), "header.path") from exc
        written = 0
        try:
            with os.fdopen(fd, "wb") as out:
                async for part in parts:
                    if part.WhichOneof("part") != "data":
                        raise _invalid(
                            reasons.ERROR_REASON_HEADER_REQUIRED,
                            "only the first message has a header",
                            "header",
                        )
                    written += len(part.data)
                    if written > limits.file_bytes:
                        raise errors.ResourceExhausted(
                            reasons.ERROR_REASON_FILE_TOO_LARGE,
                            f"the file is larger than {limits.file_bytes} bytes",
                        )
                    if written > room:
                        raise errors.ResourceExhausted(
                            reasons.ERROR_REASON_DISK_FULL,
                            f"the session's files would exceed {limits.disk_bytes} bytes",
                        )
                    await asyncio.to_thread(out.write, part.data)
        except BaseException:
            with contextlib.suppress(OSError):
                files.remove(session.directory, path)
            raise
        self._store.touch(session)
        records = self._store.register_files(session.id, [path], "user", replace_source=True)
        entry = files.walk(session.directory).files.get(path) or files.Entry(path, written, 0)
        return pb.UploadFileResponse(file=session_file(records[path], entry))
