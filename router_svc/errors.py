"""The router's errors, and the one place where they become OpenAI-shaped HTTP responses.

Exception tree::

    ApiError                      any error the client sees; carries status, type, code, param
    ├── InvalidRequest            400 invalid_request_error (a bad field; param names it)
    ├── Unauthenticated           401 (missing or wrong API key)
    ├── NotFound                  404 (a response, conversation or item that does not exist)
    ├── Conflict                  409 (a conversation changed under a turn; safe to retry)
    ├── RateLimited               429
    ├── UpstreamError             502 / 504 server_error (the hub failed, timed out or spoke nonsense)
    ├── StateUnavailable          503 server_error (the state service cannot be reached)
    ├── RequestTooLarge           413 invalid_request_error (a body over --max-body-bytes)
    └── BootstrapFailed           code stateful_tool_bootstrap_failed (the bootstrap service failed)

Errors from gRPC services are mapped once, here (:func:`from_state_error`,
:func:`from_bootstrap_error`), with ``raise ... from exc`` at the call site; the state service's
reasons are compared with the generated ``ErrorReason`` constants, never spelled. Every
``grpc.StatusCode`` has an entry; a test fails if one is added without a mapping.
"""

from __future__ import annotations

from typing import Any

import grpc

from gateway.grpcerrors import RemoteError, reason
from respgw.state.v1 import error_reason_pb2 as state_reasons

SERVER_ERROR = "server_error"
INVALID_REQUEST = "invalid_request_error"


class ApiError(Exception):
    """An error answered to the client as ``{"error": {message, type, param, code}}``."""

    status: int = 500
    type: str = SERVER_ERROR
    default_code: str | None = None
    # True when the state service answered NOT_FOUND (set by router_svc.state_client, whose
    # ``find`` answers None for it).
    state_not_found: bool = False

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        if status is not None:
            self.status = status
        self.headers: dict[str, str] = dict(headers or {})
        # True when the failed call may have written what it was asked to (a deadline, a broken
        # connection): a retry of the request could then duplicate it, unless something makes the
        # retry the same write (an idempotency key, ids fixed by the first attempt).
        self.outcome_unknown = False

    def retry_header(self, *, retry_is_safe: bool) -> None:
        """Sets ``x-should-retry`` on a server-side failure: ``true`` when nothing was written
        or a retry is the same write, ``false`` when a retry could duplicate what was written."""
        if self.status >= 500:
            safe = retry_is_safe or not self.outcome_unknown
            self.headers["x-should-retry"] = "true" if safe else "false"

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequest(ApiError):
    status = 400
    type = INVALID_REQUEST


class Unauthenticated(ApiError):
    status = 401
    type = INVALID_REQUEST
    default_code = "invalid_api_key"


class NotFound(ApiError):
    status = 404
    type = INVALID_REQUEST
    default_code = "not_found"


class Conflict(ApiError):
    status = 409
    type = INVALID_REQUEST
    default_code = "conversation_locked"


class RateLimited(ApiError):
    status = 429
    type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


class UpstreamError(ApiError):
    status = 502
    default_code = "upstream_error"


class StateUnavailable(ApiError):
    status = 503
    default_code = "state_unavailable"


class RequestTooLarge(ApiError):
    status = 413
    type = INVALID_REQUEST
    default_code = "request_too_large"


def invalid_id(param: str, limit: int) -> InvalidRequest:
    """A 400 for an id (or key) that no stored object can have: too long, or with control
    characters."""
    return InvalidRequest(
        f"Invalid '{param}': expected an ID of at most {limit} printable characters.",
        param=param,
        code="invalid_value",
    )


class BootstrapFailed(ApiError):
    default_code = "stateful_tool_bootstrap_failed"


def previous_response_not_found(response_id: str) -> InvalidRequest:
    return InvalidRequest(
        f"Previous response with id '{response_id}' not found.",
        param="previous_response_id",
        code="previous_response_not_found",
    )


def item_not_found(item_id: str, param: str) -> InvalidRequest:
    """An item reference to an item the tenant has not stored (OpenAI's 400)."""
    return InvalidRequest(f"Item with id '{item_id}' not found.", param=param, code="not_found")


def response_not_found(response_id: str) -> NotFound:
    return NotFound(f"Response with id '{response_id}' not found.", code="not_found")


def conversation_not_found(conversation_id: str, param: str | None = None) -> NotFound:
    return NotFound(
        f"Conversation with id '{conversation_id}' not found.", param=param, code="not_found"
    )


# For each status code of the state service: the HTTP status and error class used when the
# reason gives nothing more specific. Codes that mean "the service is unwell" become 503 so the
# client may retry; codes that mean "the router sent something wrong" become 500 (a bug here).
_STATE_STATUS: dict[grpc.StatusCode, tuple[type[ApiError], int]] = {
    grpc.StatusCode.OK: (ApiError, 500),
    grpc.StatusCode.CANCELLED: (StateUnavailable, 503),
    grpc.StatusCode.UNKNOWN: (StateUnavailable, 503),
    grpc.StatusCode.INVALID_ARGUMENT: (InvalidRequest, 400),
    grpc.StatusCode.DEADLINE_EXCEEDED: (StateUnavailable, 503),
    grpc.StatusCode.NOT_FOUND: (NotFound, 404),
    grpc.StatusCode.ALREADY_EXISTS: (Conflict, 409),
    grpc.StatusCode.PERMISSION_DENIED: (ApiError, 500),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (StateUnavailable, 503),
    grpc.StatusCode.FAILED_PRECONDITION: (InvalidRequest, 400),
    grpc.StatusCode.ABORTED: (Conflict, 409),
    grpc.StatusCode.OUT_OF_RANGE: (InvalidRequest, 400),
    grpc.StatusCode.UNIMPLEMENTED: (ApiError, 500),
    grpc.StatusCode.INTERNAL: (StateUnavailable, 503),
    grpc.StatusCode.UNAVAILABLE: (StateUnavailable, 503),
    grpc.StatusCode.DATA_LOSS: (ApiError, 500),
    grpc.StatusCode.UNAUTHENTICATED: (ApiError, 500),
}


def _state_reason(value: state_reasons.ErrorReason.ValueType) -> str:
    return reason(state_reasons.ErrorReason, value)


RESPONSE_IN_PROGRESS = _state_reason(state_reasons.ERROR_REASON_RESPONSE_IN_PROGRESS)
HISTORY_BROKEN = _state_reason(state_reasons.ERROR_REASON_HISTORY_BROKEN)
ITEM_ID_CONFLICT = _state_reason(state_reasons.ERROR_REASON_ITEM_ID_CONFLICT)
REQUEST_ID_CONFLICT = _state_reason(state_reasons.ERROR_REASON_REQUEST_ID_CONFLICT)
VERSION_MISMATCH = _state_reason(state_reasons.ERROR_REASON_VERSION_MISMATCH)

# The state service's reason for "nothing was written, try again" (every other 5xx may have written).
_NOTHING_WRITTEN = frozenset({_state_reason(state_reasons.ERROR_REASON_BACKEND_UNAVAILABLE)})

_STATE_CODES: dict[grpc.StatusCode, str] = {
    grpc.StatusCode.DEADLINE_EXCEEDED: "state_timeout",
    grpc.StatusCode.ALREADY_EXISTS: "conflict",
    grpc.StatusCode.FAILED_PRECONDITION: "history_unavailable",
    grpc.StatusCode.ABORTED: "conversation_locked",
    grpc.StatusCode.OUT_OF_RANGE: "invalid_value",
    grpc.StatusCode.INVALID_ARGUMENT: "invalid_value",
}


def from_state_error(err: RemoteError, *, param: str | None = None) -> ApiError:
    """Maps a failed state service call to the error the client sees."""
    cls, status = _STATE_STATUS.get(err.code, (StateUnavailable, 503))
    if err.reason == RESPONSE_IN_PROGRESS:
        response_id = err.metadata.get("response_id") or err.metadata.get(
            "previous_response_id", ""
        )
        return InvalidRequest(
            f"Previous response with id '{response_id}' is still in progress; wait until it "
            "has finished before building on it.",
            param=param or "previous_response_id",
            code="previous_response_in_progress",
        )
    if err.reason == HISTORY_BROKEN:
        return InvalidRequest(
            "The history of this response cannot be loaded because an earlier response in its "
            "chain was deleted or has expired.",
            param=param,
            code="history_unavailable",
        )
    if err.reason == ITEM_ID_CONFLICT:
        item = err.metadata.get("item_id", "")
        return InvalidRequest(
            f"An item with id '{item}' is already in this conversation with other content."
            if item
            else "An item with one of these ids is already in this conversation.",
            param=param or "items",
            code="duplicate_item_id",
        )
    if err.reason == REQUEST_ID_CONFLICT:
        return InvalidRequest(
            "This Idempotency-Key was already used for a request with other content.",
            code="idempotency_key_reused",
        )
    if err.reason == VERSION_MISMATCH:
        return Conflict(
            "Another request changed this conversation while this one was running. "
            "Please try again.",
            param=param,
        )
    # The detail of a server-side failure (gRPC's transport messages name addresses) goes to the
    # router's log (state_client), never to the client.
    if cls is StateUnavailable:
        unavailable = StateUnavailable(
            f"The state service is unavailable ({err.code.name.lower()}); please try again.",
            code=_STATE_CODES.get(err.code, "state_unavailable"),
        )
        unavailable.outcome_unknown = err.reason not in _NOTHING_WRITTEN
        return unavailable
    if cls is ApiError:
        failed = ApiError(
            f"The state service rejected the router's call ({err.code.name}).",
            code="internal_error",
            status=status,
        )
        failed.outcome_unknown = True
        return failed
    return cls(err.message, param=param, code=_STATE_CODES.get(err.code), status=status)


# For each status code of the bootstrap service: the HTTP status the client sees. The contract in
# bootstrap_service.proto says which of them a caller retries; the router has already retried
# those it may by the time it maps the error.
_BOOTSTRAP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 500,
    grpc.StatusCode.CANCELLED: 503,
    grpc.StatusCode.UNKNOWN: 502,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 400,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 400,
    grpc.StatusCode.INTERNAL: 502,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 502,
    grpc.StatusCode.UNAUTHENTICATED: 502,
}


def from_bootstrap_error(err: RemoteError) -> BootstrapFailed:
    """Maps a failed bootstrap call to ``stateful_tool_bootstrap_failed``."""
    status = _BOOTSTRAP_STATUS.get(err.code, 502)
    error = BootstrapFailed(
        f"Preparing the stateful tools failed ({err.code.name}"
        + (f", {err.reason}" if err.reason else "")
        + f"): {err.message or 'no detail'}",
        param="tools",
        status=status,
    )
    error.type = INVALID_REQUEST if status < 500 and status != 429 else SERVER_ERROR
    return error
