"""The router's client of the execution contract: every status code maps to an OpenAI error."""

from __future__ import annotations

import grpc
import pytest

from gateway.grpcerrors import RemoteError
from router_svc import errors, execution


@pytest.mark.parametrize("code", list(grpc.StatusCode), ids=lambda c: c.name)
def test_every_status_code_is_mapped(code: grpc.StatusCode) -> None:
    assert code in execution._STATUS
    error = execution.api_error(RemoteError(code, "", "details", {}, "bootstrap.respgw.dev"))
    assert isinstance(error, errors.ApiError)
    body = error.body()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["message"]
    assert 400 <= error.status < 600


def test_the_common_codes() -> None:
    def status(code: grpc.StatusCode, reason: str = "") -> int:
        return execution.api_error(RemoteError(code, reason, "x", {}, "d")).status

    assert status(grpc.StatusCode.NOT_FOUND) == 404
    assert status(grpc.StatusCode.INVALID_ARGUMENT) == 400
    assert status(grpc.StatusCode.RESOURCE_EXHAUSTED) == 429
    assert status(grpc.StatusCode.RESOURCE_EXHAUSTED, "FILE_TOO_LARGE") == 413
    assert status(grpc.StatusCode.UNAVAILABLE) == 503
    assert status(grpc.StatusCode.DEADLINE_EXCEEDED) == 504
