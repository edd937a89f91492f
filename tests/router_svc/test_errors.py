"""Every gRPC status code the state and bootstrap services can return is mapped, once, to an
OpenAI-shaped error with a sensible HTTP status."""

from __future__ import annotations

import grpc
import pytest

from gateway.grpcerrors import RemoteError
from router_svc import errors


def remote(code: grpc.StatusCode, reason: str = "", **meta: str) -> RemoteError:
    return RemoteError(code=code, reason=reason, message="detail", metadata=meta, domain="d")


def test_every_status_code_has_a_state_and_a_bootstrap_mapping() -> None:
    codes = set(grpc.StatusCode)
    assert set(errors._STATE_STATUS) == codes
    assert set(errors._BOOTSTRAP_STATUS) == codes


@pytest.mark.parametrize("code", list(grpc.StatusCode))
def test_state_errors_have_openai_shape(code: grpc.StatusCode) -> None:
    err = errors.from_state_error(remote(code))
    body = err.body()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    assert 400 <= err.status <= 599
    assert body["code"]
    # The service being unwell is never the caller's fault, and never looks like it.
    if code in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
    ):
        assert err.status == 503 and body["type"] == "server_error"


@pytest.mark.parametrize("code", list(grpc.StatusCode))
def test_bootstrap_errors_always_carry_the_bootstrap_code(code: grpc.StatusCode) -> None:
    err = errors.from_bootstrap_error(remote(code, "SOME_REASON"))
    assert err.code == "stateful_tool_bootstrap_failed"
    assert err.body()["error"]["param"] == "tools"
    assert 400 <= err.status <= 599


@pytest.mark.parametrize(
    ("reason", "code", "status", "api_code"),
    [
        ("HISTORY_BROKEN", grpc.StatusCode.FAILED_PRECONDITION, 400, "history_unavailable"),
        ("VERSION_MISMATCH", grpc.StatusCode.ABORTED, 409, "conversation_locked"),
        ("ITEM_ID_CONFLICT", grpc.StatusCode.ALREADY_EXISTS, 400, "duplicate_item_id"),
        ("REQUEST_ID_CONFLICT", grpc.StatusCode.ALREADY_EXISTS, 400, "idempotency_key_reused"),
    ],
)
def test_reasons_refine_the_mapping(
    reason: str, code: grpc.StatusCode, status: int, api_code: str
) -> None:
    err = errors.from_state_error(remote(code, reason, item_id="msg_1"))
    assert (err.status, err.code) == (status, api_code)
